"""Device agent configuration: ``agent.toml`` plus ``FEDCOE_<SECTION>_<KEY>`` overrides.

Sections: ``[device]`` (identity, role, tier, state folder, privacy and upload options),
``[broker]`` (MQTT), ``[security]`` (this device's HMAC key, or the federation secret it
derives from), ``[data]`` (an ``.npz``, a folder of images, or a shipped dataset plus a
client index for demos). FedCoE (arXiv 2605.21264) keeps a device's local experts and
local gate on the device; the state folder is where they live.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcoe_edge.config import TIER_WIDTH
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.protocol import (
    COORDINATOR_ID,
    BrokerSettings,
    apply_env,
    build_section,
    check_classes,
    check_username,
    device_key,
    load_toml,
    parse_key,
    read_secret,
    section_defaults,
)
from fedcoe_edge.transport.topics import check_id
from fedcoe_edge.wire import DEFAULT_CHUNK_SIZE, DEFAULT_WINDOW, check_chunk_size, check_window


@dataclass
class DeviceSettings:
    id: str = ""
    federation: str = "demo"
    coordinator_id: str = COORDINATOR_ID
    role: str = "train"  # "train": joins rounds; "cold": late device, cold-start path only
    tier: str = "medium"
    memory_mb: float = 0.0  # 0: measure
    state_dir: str = ""  # default: state/<id>
    share_label_histogram: bool = False  # label histograms leave the device only if allowed
    compress_uploads: bool = True  # int8 deltas against what the coordinator sent
    refresh_on_close: bool = True  # fetch the aggregated experts when a round closes
    chunk_size: int = DEFAULT_CHUNK_SIZE
    window: int = DEFAULT_WINDOW
    upload_timeout_s: float = 120.0
    heartbeat_s: float = 30.0  # telemetry on up/<id>/hb (QoS 0); 0 turns it off
    bundle: str = "final"  # rebuild the int8 ONNX bundle: "every" round close, "final" round only, "off"
    # "torch": train and predict with torch (the train install profile); "onnx": a cold device
    # predicts through its bundle (MoESession) and swaps downloaded experts into it, no torch
    # (the runtime profile); "auto": torch when it is installed, else onnx
    engine: str = "auto"
    bundle_path: str = ""  # the signed bundle the onnx engine runs and updates; default STATE/bundle
    trunk_weights: str = ""  # where this device keeps the federation's pretrained trunk file


@dataclass
class KeySettings:
    key: str = ""  # hex HMAC key of this device
    key_file: str = ""
    secret: str = ""  # or the federation secret (hex) the key derives from
    secret_file: str = ""


@dataclass
class DataSettings:
    npz: str = ""  # x_train/y_train[/x_test/y_test] or x[/y]
    image_folder: str = ""  # one sub-folder per class
    image_shape: list[int] = field(default_factory=lambda: [1, 8, 8])  # (C, H, W) for image folders
    # the federation's class names in label order; label i = classes[i]. Empty: taken from
    # the coordinator's welcome (image folders) or the labels as stored (npz). Set it when
    # the device must refuse a federation whose class list differs from its own.
    classes: list[str] = field(default_factory=list)
    dataset: str = ""  # a shipped dataset (demos): with client, num_clients, ...
    client: str = "0"  # "3" = training client 3, "new0" = held-out new client 0
    partition: str = "dirichlet"
    num_clients: int = 6
    new_clients: int = 1
    alpha: float = 0.5
    seed: int = 0
    min_samples: int = 20
    test_fraction: float = 0.25  # for npz x/y and image folders


@dataclass
class AgentConfig:
    device: DeviceSettings = field(default_factory=DeviceSettings)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    key: bytes = b""
    data: DataSettings = field(default_factory=DataSettings)
    source: str = "<defaults>"

    @property
    def state_dir(self) -> Path:
        return Path(self.device.state_dir)

    def validate(self) -> None:
        d, w = self.device, f"{self.source}: [device]"
        try:
            check_id(d.id, "id")
            check_id(d.federation, "federation")
            check_id(d.coordinator_id, "coordinator_id")
        except Exception as exc:
            raise ConfigError(f"{w} {exc}") from None
        if d.role not in ("train", "cold"):
            raise ConfigError(f"{w} role must be train|cold, got {d.role!r}")
        if d.tier not in TIER_WIDTH:
            raise ConfigError(f"{w} tier must be one of {sorted(TIER_WIDTH)}, got {d.tier!r}")
        check_chunk_size(d.chunk_size, w)
        check_window(d.window, w)
        if d.engine not in ("auto", "torch", "onnx"):
            raise ConfigError(f"{w} engine must be auto|torch|onnx, got {d.engine!r}")
        if d.engine == "onnx" and d.role == "train":
            raise ConfigError(f"{w} engine = \"onnx\" only predicts (no torch to train with): "
                              "set role = \"cold\" or engine = \"torch\"")
        if d.bundle not in ("every", "final", "off"):
            raise ConfigError(f"{w} bundle must be every|final|off, got {d.bundle!r}")
        if d.heartbeat_s < 0:
            raise ConfigError(f"{w} heartbeat_s must be >= 0, got {d.heartbeat_s}")
        if not d.upload_timeout_s > 0:
            raise ConfigError(f"{w} upload_timeout_s must be > 0")
        self.broker.validate(f"{self.source}: [broker]")
        check_username(self.broker.username, d.id, f"{self.source}: [broker]")
        src = [s for s in (self.data.npz, self.data.image_folder, self.data.dataset) if s]
        if len(src) != 1:
            raise ConfigError(f"{self.source}: [data] needs exactly one of npz, image_folder, dataset")
        if not 0 < self.data.test_fraction < 1:
            raise ConfigError(f"{self.source}: [data] test_fraction must be in (0, 1)")
        if len(self.key) < 16:
            raise ConfigError(f"{self.source}: [security] key must be at least 16 bytes")
        check_classes(self.data.classes, f"{self.source}: [data] classes")


SECTIONS: dict[str, type] = {"device": DeviceSettings, "broker": BrokerSettings,
                             "security": KeySettings, "data": DataSettings}


def env_defaults() -> dict[str, dict[str, Any]]:
    """Every overridable key, e.g. FEDCOE_DEVICE_ID, FEDCOE_BROKER_PORT, FEDCOE_SECURITY_KEY."""
    return {name: section_defaults(cls) for name, cls in SECTIONS.items()}


def config_from_doc(doc: dict[str, Any], source: str, base: Path,
                    env: dict[str, str] | None = None) -> AgentConfig:
    unknown = sorted(set(doc) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    doc = apply_env(doc, env_defaults(), env)
    dev = build_section(DeviceSettings, doc, "device", source)
    data = build_section(DataSettings, doc, "data", source)
    keys = build_section(KeySettings, doc, "security", source)
    if not dev.id:
        raise ConfigError(f"{source}: [device] id is required (or FEDCOE_DEVICE_ID)")
    if not dev.state_dir:
        dev.state_dir = f"state/{dev.id}"
    if not Path(dev.state_dir).is_absolute():
        dev.state_dir = str(base / dev.state_dir)
    if not dev.bundle_path:
        dev.bundle_path = str(Path(dev.state_dir) / "bundle")
    elif not Path(dev.bundle_path).is_absolute():
        dev.bundle_path = str(base / dev.bundle_path)
    if dev.trunk_weights and not Path(dev.trunk_weights).is_absolute():
        dev.trunk_weights = str(base / dev.trunk_weights)
    for name in ("npz", "image_folder"):
        val = getattr(data, name)
        if val and not Path(val).is_absolute():
            setattr(data, name, str(base / val))
    where = f"{source}: [security]"
    if keys.key or keys.key_file:
        key = read_secret(keys.key, keys.key_file, f"{where} key", base)
    elif keys.secret or keys.secret_file:
        key = device_key(read_secret(keys.secret, keys.secret_file, f"{where} secret", base), dev.id)
    else:
        raise ConfigError(f"{where} needs key, key_file, secret or secret_file")
    broker = build_section(BrokerSettings, doc, "broker", source)
    broker.resolve(base)
    cfg = AgentConfig(dev, broker, key, data, source)
    cfg.validate()
    return cfg


def load_config(path: Path, env: dict[str, str] | None = None) -> AgentConfig:
    """Read ``agent.toml``; relative paths inside are relative to the file's folder."""
    path = Path(path)
    return config_from_doc(load_toml(path), str(path), path.resolve().parent, env)


__all__ = ["AgentConfig", "DataSettings", "DeviceSettings", "KeySettings", "check_classes", "config_from_doc",
           "env_defaults", "load_config", "parse_key"]
