"""The coordinator's ``/metrics`` and read-only dashboard (docs/daemons.md, "Metrics and
dashboard"): their figures are the store's, the dashboard ships every asset itself, only
GET of known paths is served, the work per request is bounded, a busy port is one line and
exit 2 before the broker is joined, and (slow) the page renders in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from coordinator.config import (
    CoordinatorConfig,
    DashboardSettings,
    FederationSettings,
    MetricsSettings,
    load_config,
)
from coordinator.dashboard import ASSETS, MAX_CLIENTS, HttpEndpoints, asset
from coordinator.harness import DEMO_SECRET, EmbeddedFederation, small
from coordinator.metrics import REASONS, reason_class
from coordinator.status import read_status
from coordinator.store import Store
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.protocol import BrokerSettings, mqtt_factory
from fedcoe_edge.transport import Topics

ROUNDS, DEVICES = 2, 2
HOSTILE = "<img src=x onerror=alert(1)>"  # a topic level a hostile client may publish to


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, sorted labels): value}, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    status, headers, body = get(url)
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two devices, two rounds over a real Mosquitto, the coordinator serving /metrics and
    the dashboard (and still running: it serves cold starts after the last round); one
    hostile client's refused messages in its round log."""
    from fedcoe_edge.broker import MosquittoBroker, find_mosquitto

    try:
        find_mosquitto()
    except ConfigError as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("fed")
    mport, dport = free_port(), free_port()
    with MosquittoBroker() as broker:
        factory = mqtt_factory(BrokerSettings(port=broker.port))
        fed = EmbeddedFederation(root, factory, devices=DEVICES, rounds=ROUNDS, federation="test",
                                 metrics=MetricsSettings(port=mport),
                                 dashboard=DashboardSettings(port=dport), **small())
        fed.start()
        try:
            fed.wait_rounds(180)
            c = fed.coordinator
            assert c is not None
            # refusals: an unsigned message claiming to be a device, and one on a topic
            # whose device level is markup (both classes, never these strings, as labels)
            t = factory("intruder", None, None)
            t.connect()
            topics = Topics("test")
            t.publish(topics.up_ctl("ghost-device-123"), b'{"not": "signed"}')
            t.publish(f"fl/v1/test/up/{HOSTILE}/ctl", b"x")
            fed.wait(lambda: len(c.store.events(kind="rejected")) >= 2, 30, "refusals stored")
            t.close()
            yield {"fed": fed, "root": root, "state": root / "coordinator",
                   "metrics": f"http://127.0.0.1:{mport}/metrics",
                   "dashboard": f"http://127.0.0.1:{dport}"}
        finally:
            fed.stop()


def test_metrics_agree_with_the_store(federation: dict[str, Any]) -> None:
    state = federation["state"]
    m = scrape(federation["metrics"])
    again = scrape(federation["metrics"])  # a second scrape counts nothing twice
    doc = read_status(state, rounds=ROUNDS, federation="test")
    rows = doc["round_log"]
    db = sqlite3.connect(f"file:{state / 'coordinator.sqlite'}?mode=ro", uri=True)
    traffic = {(d, p): b for d, p, b in db.execute(
        "SELECT direction, purpose, SUM(bytes) FROM traffic GROUP BY direction, purpose")}
    refused = db.execute("SELECT SUM(count) FROM events WHERE kind='rejected'").fetchone()[0]
    db.close()

    def val(name: str, **labels: str) -> float:
        return m[(name, tuple(sorted(labels.items())))]

    assert val("fedcoe_rounds_closed_total") == ROUNDS == sum(r["state"] == "closed" for r in rows)
    assert val("fedcoe_round") == doc["round"] == ROUNDS and val("fedcoe_round_open") == 0
    assert val("fedcoe_rounds_configured") == ROUNDS
    assert val("fedcoe_updates_accepted_total") == sum(r["accepted"] for r in rows) == ROUNDS * DEVICES
    assert val("fedcoe_bytes_total", direction="up", purpose="train") == sum(
        r["bytes_up"] for r in rows) == traffic[("up", "train")] > 0
    assert val("fedcoe_bytes_total", direction="down", purpose="train") == sum(
        r["bytes_down"] for r in rows) == traffic[("down", "train")] > 0
    for (d, p), b in traffic.items():
        assert val("fedcoe_bytes_total", direction=d, purpose=p) == b
    assert val("fedcoe_devices_online", role="train") == doc["devices_online"] == DEVICES
    assert val("fedcoe_devices_registered", role="train") == len(doc["devices"]) == DEVICES
    assert val("fedcoe_global_accuracy") == pytest.approx(rows[-1]["global_acc"])
    assert val("fedcoe_personalized_accuracy") == pytest.approx(rows[-1]["personalized_acc"])
    assert val("fedcoe_round_duration_seconds_count") == ROUNDS
    assert val("fedcoe_round_duration_seconds_sum") == pytest.approx(
        sum(r["wall_s"] for r in rows), abs=0.01)
    assert val("fedcoe_round_duration_seconds_bucket", le="+Inf") == ROUNDS
    # every refused message counted, under reason classes from the fixed set only
    ref = {dict(k[1])["reason"]: v for k, v in m.items()
           if k[0] == "fedcoe_refusals_total" and dict(k[1])["kind"] == "rejected"}
    assert sum(ref.values()) == refused >= 2
    assert ref.get("unauthenticated", 0) + ref.get("malformed", 0) >= 1 and ref.get("bad_topic") == 1
    labels = {v for k in m for _, v in k[1]}
    assert {dict(k[1])["reason"] for k in m if k[0] == "fedcoe_refusals_total"} <= set(REASONS)
    assert not any("ghost" in v or "<" in v for v in labels)
    assert again == m


def steady(doc: dict[str, Any]) -> dict[str, Any]:
    """A status document without the one value that moves while nothing happens: a
    device's heartbeat refreshes its ``last_seen`` between two reads."""
    return {**doc, "devices": [{**d, "last_seen": None} for d in doc["devices"]]}


def test_api_status_is_the_status_document(federation: dict[str, Any]) -> None:
    status, headers, body = get(federation["dashboard"] + "/api/status")
    assert status == 200 and headers["Content-Type"] == "application/json"
    api = json.loads(body)
    # the coordinator's config allows any device with a key (an empty allowed_devices)
    assert steady(api) == steady(read_status(federation["state"], rounds=ROUNDS,
                                             federation="test", allowed=[]))
    assert api["allowed_devices"] == [] and all(d["allowed"] for d in api["devices"])
    assert all(d["last_seen"] for d in api["devices"])
    # and what `fedcoe status --json --config` prints for the same federation
    cfg = federation["root"] / "coordinator.toml"
    cfg.write_text(f'[federation]\nid = "test"\nrounds = {ROUNDS}\nstate_dir = '
                   f'"{federation["state"]}"\n[security]\nsecret = "{DEMO_SECRET.hex()}"\n')
    out = subprocess.run([sys.executable, "-m", "fedcoe_edge.cli", "status", "--json",
                          "--config", str(cfg)], capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert steady(api) == steady(json.loads(out.stdout))
    status, _, body = get(federation["dashboard"] + "/api/refusals")
    refusals = json.loads(body)["refusals"]
    assert status == 200 and len(refusals) >= 2
    assert {r["reason_class"] for r in refusals} <= set(REASONS)
    assert any(HOSTILE in r["reason"] for r in refusals)  # as text, for textContent


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def test_dashboard_html_serves_its_own_assets_only(federation: dict[str, Any]) -> None:
    base = federation["dashboard"]
    status, headers, page = get(base + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    parser = _Refs()
    parser.feed(page.decode())
    assert "/static/dashboard.js" in parser.refs and "/static/dashboard.css" in parser.refs
    for ref in parser.refs:
        assert ref.startswith("/") and not ref.startswith("//"), ref  # same origin only
        code, _, data = get(base + ref)
        assert code == 200 and data, ref
    for name in set(ASSETS.values()):  # nothing in any asset points elsewhere
        text = asset(name).decode().replace('"http://www.w3.org/2000/svg"', "")
        assert "http:" not in text and "https:" not in text and "//cdn" not in text, name
        assert "@import" not in text and "url(" not in text, name
    js = asset("dashboard.js").decode()
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "eval(" not in js


def test_only_get_of_known_paths(federation: dict[str, Any]) -> None:
    base = federation["dashboard"]
    assert get(base + "/nope")[0] == 404
    assert get(base + "/static/../../coordinator.sqlite")[0] == 404
    assert get(base + "/metrics")[0] == 404  # metrics are on their own port
    assert get(federation["metrics"].replace("/metrics", "/api/status"))[0] == 404
    assert get(base + "/api/status?round=1")[0] == 200  # a query string is ignored
    code, headers, _ = get(base + "/api/status", method="POST")
    assert code == 405 and headers["Allow"] == "GET, HEAD"
    assert get(base + "/api/status", method="DELETE")[0] == 405
    code, headers, body = get(base + "/api/status", method="HEAD")
    assert code == 200 and body == b"" and int(headers["Content-Length"]) > 0


# --- without a federation: a store written here -------------------------------------------


def _config(tmp_path: Path, **kw: Any) -> CoordinatorConfig:
    return CoordinatorConfig(federation=FederationSettings(state_dir=str(tmp_path / "state")),
                             secret=DEMO_SECRET, **kw)


def _store(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    s = Store(state / "coordinator.sqlite")
    s.register("d1", "train", {"tier": "pi"})
    s.open_round(1, ["d1"], {"d1": [0]}, time.time() + 60, 0, 100)
    s.add_traffic(1, "d1", "down", "train", 1000)
    for i in range(3):
        s.add_event(1, f"made-up-{i}-{'x' * 200}", "rejected", f"envelope: bad HMAC {i}")
    s.add_event(1, "d1", "rejected", "7 x rate limit: eval more often than 10 per 20s", count=7)
    s.close()
    return state


def test_a_scrape_reads_only_what_is_new(tmp_path: Path) -> None:
    state = _store(tmp_path)
    port = free_port()
    web = HttpEndpoints(_config(tmp_path, metrics=MetricsSettings(port=port)), state)
    web.start()
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        m = scrape(url)
        key = ("fedcoe_refusals_total", (("kind", "rejected"), ("reason", "unauthenticated")))
        assert m[key] == 3
        assert m[("fedcoe_refusals_total", (("kind", "rejected"), ("reason", "rate_limit")))] == 7
        assert m[("fedcoe_round", ())] == 1 and m[("fedcoe_round_open", ())] == 1
        assert m[("fedcoe_rounds_closed_total", ())] == 0
        s = Store(state / "coordinator.sqlite")
        s.add_event(1, "d1", "rejected", "envelope: bad HMAC")
        s.prune_events("rejected", 1)  # retention drops old rows: the counter never goes back
        s.add_update(1, "d1", 10, None, {}, 500, "p")
        s.add_traffic(1, "d1", "up", "train", 500)
        s.close_round(1, 1, True, "ok", global_acc=0.5)
        s.close()
        m = scrape(url)
        assert m[key] == 4
        assert m[("fedcoe_rounds_closed_total", ())] == 1 and m[("fedcoe_round_open", ())] == 0
        assert m[("fedcoe_updates_accepted_total", ())] == 1
        assert m[("fedcoe_bytes_total", (("direction", "up"), ("purpose", "train")))] == 500
        assert m[("fedcoe_global_accuracy", ())] == 0.5
        assert m[("fedcoe_round_duration_seconds_bucket", (("le", "1"),))] == 1
    finally:
        web.stop()
    # a restarted coordinator's endpoint continues the counters (they are the store's),
    # even though retention dropped refusal rows it never saw
    port = free_port()
    web = HttpEndpoints(_config(tmp_path, metrics=MetricsSettings(port=port)), state)
    web.start()
    try:
        again = scrape(f"http://127.0.0.1:{port}/metrics")
        assert {k: v for k, v in again.items() if k[0] != "fedcoe_refusals_total"} == {
            k: v for k, v in m.items() if k[0] != "fedcoe_refusals_total"}
        assert again[key] == 1  # the one row retention kept: documented, never a decrease mid-run
    finally:
        web.stop()


def test_connections_past_the_bound_are_closed_not_queued(tmp_path: Path) -> None:
    state = _store(tmp_path)
    port = free_port()
    web = HttpEndpoints(_config(tmp_path, dashboard=DashboardSettings(port=port)), state)
    web.start()
    idle = []
    try:
        for _ in range(MAX_CLIENTS):  # each holds a handler thread: it sends nothing
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        deadline = time.monotonic() + 30
        while True:  # once all slots are taken, a further connection is closed unanswered
            extra = socket.create_connection(("127.0.0.1", port), timeout=10)
            extra.sendall(b"GET /api/status HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = extra.recv(100)
            extra.close()
            if answer == b"":
                break
            assert time.monotonic() < deadline, "the bound never refused a connection"
        for s in idle:
            s.close()
        deadline = time.monotonic() + 30
        while get(f"http://127.0.0.1:{port}/api/status")[0] != 200:  # slots come back
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        for s in idle:
            s.close()
        web.stop()


def test_ipv6_loopback_and_a_warning_off_loopback(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    state = _store(tmp_path)
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    port, other = free_port(), free_port()
    try:
        web = HttpEndpoints(_config(tmp_path, dashboard=DashboardSettings(host="::1", port=port),
                                    metrics=MetricsSettings(host="0.0.0.0", port=other)), state)
    except ConfigError as exc:
        pytest.skip(f"cannot bind ::1 here: {exc}")
    with caplog.at_level("INFO", logger="fedcoe.coordinator.http"):
        web.start()
    try:
        assert web.url("dashboard") == f"http://[::1]:{port}/"
        assert get(f"http://[::1]:{port}/api/status")[0] == 200
        assert get(f"http://127.0.0.1:{other}/metrics")[0] == 200
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warned) == 1 and "metrics on http://0.0.0.0:" in warned[0]
        assert "no login" in warned[0]
    finally:
        web.stop()


@pytest.mark.parametrize("key", ["metrics", "dashboard"])
def test_a_busy_port_is_one_line_and_exit_2_before_the_broker(
        tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str]) -> None:
    from fedcoe_edge.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"^\[{key}\] port {port} on 127.0.0.1 is in use"):
            HttpEndpoints(_config(tmp_path, **{key: (MetricsSettings if key == "metrics"
                                                     else DashboardSettings)(port=port)}))
        # the daemon: the broker named is not listening, so reaching it would hang or fail
        # differently; the port is checked first
        cfg = tmp_path / "coordinator.toml"
        cfg.write_text(f'[federation]\nstate_dir = "state"\n[broker]\nport = {free_port()}\n'
                       f'[security]\nsecret = "{DEMO_SECRET.hex()}"\n[{key}]\nport = {port}\n')
        assert main(["coordinator", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"[{key}] port {port} on 127.0.0.1 is in use" in err[0]
    assert f"FEDCOE_{key.upper()}_PORT" in err[0]


def test_config_keys_ranges_and_env(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    base = f'[security]\nsecret = "{DEMO_SECRET.hex()}"\n'
    path.write_text(base)
    cfg = load_config(path)
    assert (cfg.metrics.port, cfg.metrics.host, cfg.dashboard.port, cfg.dashboard.host) == (
        0, "127.0.0.1", 0, "127.0.0.1")  # off, loopback
    assert load_config(path, {"FEDCOE_DASHBOARD_PORT": "8080"}).dashboard.port == 8080
    for text, msg in (("[metrics]\nport = 70000\n", r"\[metrics\] port must be in 0..65535"),
                      ("[dashboard]\nport = -1\n", r"\[dashboard\] port must be in 0..65535"),
                      ('[dashboard]\nhost = ""\nport = 1\n', r"\[dashboard\] host must not be empty"),
                      ("[metrics]\nport = 9100\n[dashboard]\nport = 9100\n", "both ask for"),
                      ('[metrics]\nport = "9100"\n', r"\[metrics\]"),
                      ("[dashboard]\npath = 1\n", "unknown option")):
        path.write_text(base + text)
        with pytest.raises(ConfigError, match=msg):
            load_config(path)


def test_the_init_template_and_the_deploy_config_parse(tmp_path: Path) -> None:
    """The commented [metrics]/[dashboard] block `fedcoe init` writes, uncommented, is a
    valid config with the documented ports; deploy/coordinator.toml keeps both off."""
    from coordinator.config import config_from_doc
    from fedcoe_edge.commands.init import HTTP_COMMENT
    from fedcoe_edge.protocol import load_toml

    lines = HTTP_COMMENT.splitlines()
    start = next(i for i, line in enumerate(lines) if line == "# [metrics]")
    path = tmp_path / "c.toml"
    path.write_text(f'[security]\nsecret = "{DEMO_SECRET.hex()}"\n'
                    + "\n".join(line.removeprefix("# ") for line in lines[start:]) + "\n")
    cfg = config_from_doc(load_toml(path), str(path), tmp_path)
    assert (cfg.metrics.port, cfg.dashboard.port, cfg.dashboard.host) == (9464, 8080, "127.0.0.1")
    deploy = Path(__file__).resolve().parents[1] / "deploy" / "coordinator.toml"
    cfg = load_config(deploy, {"FEDCOE_SECURITY_SECRET_FILE": "",
                               "FEDCOE_SECURITY_SECRET": DEMO_SECRET.hex()})
    assert cfg.metrics.port == cfg.dashboard.port == 0


def test_the_wheel_ships_the_dashboard_assets(tmp_path: Path) -> None:
    """The page, script and stylesheet are package data: a wheel built from a copy of the
    sources holds them beside coordinator/dashboard.py, byte for byte."""
    import zipfile

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "results", "*.pyc")
    for pkg in ("fedcoe_edge", "device_agent", "coordinator", "export", "benchmarks"):
        shutil.copytree(root / pkg, src / pkg, ignore=skip)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(src)], check=True, timeout=300,
                   capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        for name in set(ASSETS.values()):
            assert z.read(f"coordinator/dashboard_assets/{name}") == asset(name)


def test_reason_classes_are_a_fixed_set() -> None:
    cases = {
        "deadline passed with no accepted update": "deadline",
        "device declined: labels 12 outside 0..9": "declined",
        "rate limit: hello more often than 3 per 15s": "rate_limit",
        "12 x rate limit: more than 50 control messages/s": "rate_limit",
        "envelope: envelope: bad HMAC": "unauthenticated",
        "envelope: envelope from 'a': replayed msg_id 'b'": "replay",
        "envelope: expired 5000 ms ago (ttl 600 s)": "expired",
        f"topic: topic 'fl/v1/x/up/{HOSTILE}/ctl': not a FedCoE protocol topic": "bad_topic",
        "update for closed round 3 (current round 4)": "late",
        "device not selected for round 2": "not_selected",
        "duplicate update for round 2 (one already accepted)": "duplicate",
        "upload of 99999999 bytes exceeds 1000": "too_large",
        "upload dropped: no new chunk for 120s": "upload_dropped",
        "chunk from a device that is not allowed": "not_allowed",
        "device 'pi-b' is not in the federation's allowed_devices (never added, or removed "
        "with `fedcoe devices remove`); ask the operator to add it": "not_allowed",
        "device removed from the federation": "not_allowed",
        "blob: chunk for unknown transfer 'abc'": "bad_chunk",
        "update rejected: update: tensor 'w' has 3 non-finite value(s)": "invalid_update",
        "update delta: norm 1e9 exceeds bound 1e4": "invalid_update",
        "fetch: trunk downloaded 3 times in 24 h (at most 3)": "trunk_limit",
        "unknown message type 'x'": "malformed",
        "hello: field 'tier' must be a string": "malformed",
    }
    for text, cls in cases.items():
        assert reason_class(text) == cls, text
    for hostile in (HOSTILE, "x" * 10_000, "", "\x00\n", "ünïcode reason"):
        assert reason_class(hostile) == "other"
    assert set(cases.values()) < set(REASONS) and len(REASONS) == len(set(REASONS)) < 25


# --- slow: the page in a real browser ------------------------------------------------------


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.slow
def test_dashboard_renders_in_headless_chromium(federation: dict[str, Any],
                                                tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on PATH: `make chromium` installs Debian's (apt-get install chromium)")
    out = Path(os.environ.get("FEDCOE_TEST_ARTIFACTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=10000"]
    url = federation["dashboard"] + "/"
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120).stdout
    (out / "dashboard.html").write_text(dom)
    assert 'data-loaded="1"' in dom, dom[:2000]
    rounds = [f'data-round="{r}"' for r in range(1, ROUNDS + 1)]
    assert all(r in dom for r in rounds) and f'data-round="{ROUNDS + 1}"' not in dom
    assert all(f'data-device="{d}"' in dom for d in range(DEVICES))
    assert dom.count("<polyline") >= 3  # accuracy (global, personal) and bytes (up, down)
    assert "&lt;img src=x" in dom and "<img" not in dom  # a hostile string stays text
    shot = out / "dashboard.png"
    subprocess.run([*flags, "--window-size=1280,1600", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"dashboard screenshot: {shot}")
