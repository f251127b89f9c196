"""A throw-away Mosquitto broker on a free loopback port, for tests and ``fedcoe demo``.

The FedCoE edge protocol (arXiv 2605.21264 over MQTT, docs/design.md section 8) is tested
against the real broker, because the facts that shape it (packet limits, silent drops
of queued QoS 1 messages, session handling across restarts) are Mosquitto's. The
listener is bound to 127.0.0.1 only and allows anonymous clients: never use this
configuration on a network (see ``deploy/mosquitto/`` for the TLS + ACL template).
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from fedcoe_edge.errors import ConfigError

__all__ = ["MosquittoBroker", "find_mosquitto", "port_in_use"]

_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


def find_mosquitto(binary: str | None = None) -> str:
    """Path of the mosquitto executable, or a :class:`ConfigError` saying how to get it."""
    if binary is not None:
        if os.access(binary, os.X_OK):
            return binary
        raise ConfigError(f"mosquitto binary {binary!r} not found or not executable")
    found = shutil.which("mosquitto")
    if found:
        return found
    for c in _CANDIDATES:
        if os.access(c, os.X_OK):
            return c
    raise ConfigError(
        "mosquitto broker not found (looked in PATH and /usr/sbin): "
        "install it with `apt-get install mosquitto`"
    )


def port_in_use(host: str, port: int) -> str | None:
    """Why a listener cannot bind ``host:port`` here ("address already in use"), or None
    when it can, or when ``host`` is not this machine's (the broker then runs elsewhere).
    Binds as Mosquitto does (SO_REUSEADDR), so closed connections in TIME_WAIT do not count;
    ``host`` "" means every interface."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return None
            return exc.strerror or str(exc)
    return None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class MosquittoBroker:
    """Start/stop a private Mosquitto. ``with MosquittoBroker() as b: ... b.port``.

    ``stop()`` then ``start()`` restarts it on the same port (for restart tests). With
    ``persistence=False`` (the default) a restart forgets sessions, subscriptions and
    queued messages, the harshest case for clients. ``max_packet_size`` and
    ``max_queued_messages`` reproduce the limits the protocol must live with.
    ``config_text`` replaces the generated configuration (e.g. to try the TLS + ACL
    template in deploy/mosquitto/); its listener must then be ``port`` on 127.0.0.1.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        persistence: bool = False,
        max_packet_size: int | None = None,
        max_queued_messages: int | None = None,
        extra_config: list[str] | None = None,
        binary: str | None = None,
        workdir: str | os.PathLike[str] | None = None,
        start_timeout: float = 10.0,
        config_text: str | None = None,
    ) -> None:
        self.host = "127.0.0.1"
        self.persistence = persistence
        self.max_packet_size = max_packet_size
        self.max_queued_messages = max_queued_messages
        self.extra_config = list(extra_config or [])
        self.start_timeout = start_timeout
        self._binary = binary
        self._fixed_port = port
        self._port: int | None = port
        self._own_dir = workdir is None
        self._dir = Path(workdir) if workdir is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._config_text = config_text
        self._from_file = ""  # the config file from_config_file runs (its port is checked)
        if config_text is not None and port is None:
            raise ConfigError("MosquittoBroker: config_text needs the port its listener uses")

    # --- public API ---

    @property
    def port(self) -> int:
        if self._port is None:
            raise ConfigError("MosquittoBroker: not started yet, so it has no port")
        return self._port

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def config_path(self) -> Path:
        return self._workdir() / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self._workdir() / "mosquitto.log"

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the broker log (for error messages and debugging)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> None:
        """Start (or restart on the same port) and wait until it accepts connections."""
        if self.running:
            return
        binary = find_mosquitto(self._binary)
        if self._from_file:
            busy = port_in_use(self.host, self.port)
            if busy is not None:  # else a broker already there would answer _wait_ready
                raise ConfigError(
                    f"cannot start mosquitto from {self._from_file}: {self.host}:{self.port} is "
                    f"already in use ({busy}), e.g. by the system's mosquitto service; give "
                    f"`fedcoe init --port N` a free port, or stop that service")
        attempts = 1 if self._port is not None else 3
        for attempt in range(attempts):
            if self._port is None:
                self._port = _free_port(self.host)
            self._write_config()
            self._proc = subprocess.Popen(
                [binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C on the test runner reaches us, not it
            )
            if self._wait_ready():
                return
            self._terminate()
            if attempt + 1 < attempts and self._fixed_port is None:
                self._port = None  # the free port was taken meanwhile: try another
        raise ConfigError(
            f"mosquitto did not start on {self.host}:{self._port} within {self.start_timeout} s; "
            f"log tail:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL); keeps the port and folder for start()."""
        self._terminate()

    def close(self) -> None:
        """Stop and remove the temporary folder."""
        self._terminate()
        if self._own_dir and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"MosquittoBroker({self.host}:{self._port}, {state})"

    @classmethod
    def from_config_file(cls, path: str | os.PathLike[str], port: int, *,
                         workdir: str | os.PathLike[str] | None = None,
                         binary: str | None = None) -> MosquittoBroker:
        """A broker that runs the configuration file at ``path`` (e.g. the one ``fedcoe init``
        writes) as it is, plus only what a test needs to read it back: every log line in
        ``workdir/mosquitto.log`` (connections included, so session takeovers show) and,
        when run as root, ``user root`` (Mosquitto would otherwise switch to the
        ``mosquitto`` user, who cannot read the 0600 password file). Its listener must be
        ``port``; call :meth:`start` (or use it as a context manager), which refuses in one
        line, naming the fix, when something already listens on that port (a broker there
        would otherwise answer the readiness check in place of this one)."""
        text = Path(path).read_text()
        broker = cls(port=port, workdir=workdir, binary=binary, config_text="")
        broker._from_file = str(path)
        log = broker._workdir() / "mosquitto.log"
        extra = [f"log_dest file {log}", "log_type error", "log_type warning", "log_type notice",
                 "log_type information", "connection_messages true", "log_timestamp true"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            extra.append("user root")
        broker._config_text = text.rstrip("\n") + "\n# added by MosquittoBroker.from_config_file\n" + \
            "\n".join(extra) + "\n"
        return broker

    # --- internals ---

    def _workdir(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="fedcoe-mosquitto-"))
        self._dir.mkdir(parents=True, exist_ok=True)  # a workdir the caller named may not exist yet
        return self._dir

    def config_text(self) -> str:
        """The configuration this broker runs with (``config_text`` verbatim if given)."""
        if self._config_text is not None:
            return self._config_text
        d = self._workdir()
        lines = [
            "# generated by fedcoe_edge.broker.MosquittoBroker: loopback only, tests/demo",
            "per_listener_settings false",
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            f"log_dest file {d / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp true",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            lines.append("user root")  # otherwise it drops to 'mosquitto' and cannot write here
        if self.persistence:
            lines += ["persistence true", f"persistence_location {d}/", "autosave_interval 1"]
        else:
            lines.append("persistence false")
        if self.max_packet_size is not None:
            lines.append(f"max_packet_size {int(self.max_packet_size)}")
        if self.max_queued_messages is not None:
            lines.append(f"max_queued_messages {int(self.max_queued_messages)}")
        lines += self.extra_config
        return "\n".join(lines) + "\n"

    def _write_config(self) -> None:
        self.config_path.write_text(self.config_text())

    def _wait_ready(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
