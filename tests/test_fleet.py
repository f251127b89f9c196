"""The fleet load generator end to end, small: 50 simulated devices, 2 rounds, against the
real coordinator process and a Mosquitto with the deploy template's limits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.fleet import FleetSpec, broker_limits, main, run_fleet, run_summary

pytestmark = pytest.mark.integration


def test_broker_limits_come_from_the_deploy_template() -> None:
    limits = dict(line.split() for line in broker_limits())
    assert limits["max_packet_size"] == "2000000"
    assert int(limits["max_queued_messages"]) >= 1000
    assert "max_inflight_messages" in limits


# slow: a multi-process deployment for tens of seconds; `make test-all` runs it (README, "Tests")
@pytest.mark.slow
def test_fifty_devices_two_rounds(tmp_path: Path, make_mosquitto: object) -> None:
    run = run_fleet(FleetSpec(devices=50, rounds=2, train_s=0.1, jitter_s=0.2, timeout_s=50,
                              workdir=str(tmp_path / "fleet")))
    assert run["rounds_completed"] == 2, run.get("coordinator_log_tail")
    rows = run["round_rows"]
    assert [r["accepted"] for r in rows] == [50, 50]
    assert [r["tasks_received"] for r in rows] == [50, 50]
    assert all(r["failed"] == 0 and r["rejected"] == 0 for r in rows)
    assert run["device_rejects_total"] == 0, run["reject_examples"]
    assert run["broker_drops_total"] == 0
    assert run["final_models"] == 50 and run["final_evals_acked"] == 50
    assert run["coordinator_exit"] == 0
    # the daemon's default download path: one per-device transfer each, no shared copy
    assert run["shared_downloads_on"] is False and run["shared_downloads"] == 0
    # every figure the report needs is there
    for r in rows:
        assert r["coord_cpu_s"] >= 0 and r["coord_peak_rss_mb"] > 0 and r["broker_peak_rss_mb"] > 0
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["last_task_s"] >= 0
    assert run_summary(run)["ok"]


# slow: a multi-process deployment for tens of seconds; `make test-all` runs it (README, "Tests")
@pytest.mark.slow
def test_thirty_devices_two_rounds_two_shards(tmp_path: Path, make_mosquitto: object) -> None:
    """A leader and two shard aggregator processes: every device served by its shard, the
    leader's CPU and each shard's reported."""
    from benchmarks.fleet import sharded_summary

    run = run_fleet(FleetSpec(devices=30, rounds=2, train_s=0.1, jitter_s=0.2, timeout_s=90,
                              shards=2, shared_downloads=True, workdir=str(tmp_path / "fleet")))
    assert run["rounds_completed"] == 2, run.get("coordinator_log_tail")
    rows = run["round_rows"]
    assert [r["accepted"] for r in rows] == [30, 30] and [r["selected"] for r in rows] == [30, 30]
    assert [r["tasks_received"] for r in rows] == [30, 30]
    assert all(r["failed"] == 0 and r["rejected"] == 0 for r in rows)
    assert run["device_rejects_total"] == 0, run["reject_examples"]
    assert run["final_models"] == 30 and run["final_evals_acked"] == 30
    assert run["coordinator_exit"] == 0 and run["shard_exits"] == [0, 0]
    # shared downloads switched on: as the agent does, every task and final refresh assembled
    # from the shard's shared copy, checked against the device's signed manifest, none fell
    # back to a per-device transfer
    assert run["shared_downloads"] >= 30 * 3, run["shared_fallback_reasons"]  # + re-fetches
    assert run["shared_fallbacks"] == 0
    for r in rows:
        assert r["coord_cpu_s"] >= 0 and len(r["shard_cpu_s"]) == 2
        assert all(c > 0 for c in r["shard_cpu_s"]) and all(m > 0 for m in r["shard_peak_rss_mb"])
    s = sharded_summary(run)
    assert s["ok"] and s["shards"] == 2 and len(s["shard_cpu_s"]) == 2
    # both shards served devices: each has a round log with its share
    from coordinator.store import Store
    for i in (0, 1):
        store = Store(tmp_path / "fleet" / "state" / f"shard-{i}" / "coordinator.sqlite", readonly=True)
        try:
            assert 0 < store.round_summary(1)["accepted"] < 30
        finally:
            store.close()


def test_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--devices", "0", "--json", str(tmp_path / "x.json")]) == 2
    assert "must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
    assert main(["--devices", "3", "--shards", "-1", "--json", str(tmp_path / "x.json")]) == 2
    assert "--shards must be in 0.." in capsys.readouterr().err


def test_report_files(tmp_path: Path) -> None:
    from benchmarks.fleet import write_markdown, write_plot

    row = {"round": 1, "selected": 10, "accepted": 10, "failed": 0, "rejected": 0,
           "device_rejects": 0, "wall_s": 1.0, "last_task_s": 0.1, "tasks_received": 10,
           "coord_cpu_s": 0.5, "coord_peak_rss_mb": 100.0, "broker_cpu_s": 0.1,
           "broker_peak_rss_mb": 10.0, "generator_cpu_s": 0.1, "bytes_up": 1000,
           "bytes_down": 2000, "broker_drops": 0.0}
    runs = [{"devices": n, "rounds": 1, "model": "deploy", "rounds_completed": 1,
             "round_rows": [{**row, "selected": n, "accepted": n, "wall_s": n / 10}],
             "coordinator_peak_rss_mb": 100.0 + n, "broker_peak_rss_mb": 10.0,
             "broker_drops_total": 0.0, "final_models": n, "device_rejects_total": 0,
             "broker_limits": ["max_queued_messages 1000"]} for n in (10, 100)]
    write_markdown(runs, tmp_path / "f.md", "python -m benchmarks.fleet --devices 10 100")
    write_plot(runs, tmp_path / "f.png")
    text = (tmp_path / "f.md").read_text()
    assert "| 100 | 1/1 |" in text and "log-log slope" in text
    assert (tmp_path / "f.png").stat().st_size > 1000
    json.dumps(runs)


def test_profile_summary_and_report_section(tmp_path: Path) -> None:
    """py-spy's collapsed stacks become own / inclusive shares over the working samples
    (waits set apart), kept per label, and fleet.md renders them as its own section."""
    from benchmarks import fleet_profile
    from benchmarks.fleet import write_markdown

    raw = "\n".join([
        "Thread._bootstrap (threading.py:1002);Coordinator._on_ctl (coordinator/daemon.py:640);"
        "decode_envelope (fedcoe_edge/wire/envelope.py:405) 6",
        "Thread._bootstrap (threading.py:1002);Coordinator._on_ctl (coordinator/daemon.py:650);"
        "Client.publish (paho/mqtt/client.py:9) 2",
        "Thread._bootstrap (threading.py:1002);Coordinator._pump_loop (coordinator/daemon.py:1) ;"
        "Event.wait (threading.py:600);Condition.wait (threading.py:320) 2",
        "garbage line", ""])
    p = fleet_profile.summarise(raw)
    assert p["samples"] == 10 and p["waiting_share"] == 0.2
    assert p["self"][0] == ["decode_envelope (fedcoe_edge/wire/envelope.py)", 0.75]
    assert p["inclusive"][0] == ["Coordinator._on_ctl (coordinator/daemon.py)", 1.0]
    assert all("paho" not in f and "threading" not in f for f, _ in p["inclusive"])
    doc = tmp_path / "profile.json"
    run = {"devices": 10, "rounds": 1, "rounds_completed": 1, "loadavg_1m_start": 0.5,
           "round_rows": [{"wall_s": 2.0, "accepted": 10, "failed": 0}], "coordinator_profile": p}
    fleet_profile.record(doc, "before", "cmd a", [run], {10: 4.0})
    fleet_profile.record(doc, "before", "cmd a2", [{**run, "devices": 20}], {20: 9.0})
    fleet_profile.record(doc, "after", "cmd b", [run], {10: 3.0})
    kept = json.loads(doc.read_text())
    # a size run on its own keeps the label's other sizes
    assert [s["coord_cpu_s_per_round"] for s in kept["before"]["sizes"]] == [4.0, 9.0]
    fleet_profile.record(doc, "after", "cmd b", [run], {10: 2.0})  # a repeat
    kept = json.loads(doc.read_text())
    row = {"round": 1, "selected": 10, "accepted": 10, "failed": 0, "rejected": 0,
           "wall_s": 1.0, "last_task_s": 0.1, "coord_cpu_s": 0.5, "broker_cpu_s": 0.1,
           "generator_cpu_s": 0.1, "bytes_up": 1, "bytes_down": 2}
    runs = [{"devices": 10, "rounds": 1, "model": "deploy", "rounds_completed": 1,
             "round_rows": [row], "coordinator_peak_rss_mb": 100.0, "final_models": 10}]
    write_markdown(runs, tmp_path / "f.md", "cmd", kept)
    text = (tmp_path / "f.md").read_text()
    assert "## Coordinator CPU profile" in text
    assert "| 10 | after | 2.00 | 1/1 | 10 | 2 | 0.5 | 10 |" in text  # each run
    assert "| 10 | 4.00 (1 run(s)) | 2.50 (2 run(s)) | -38% |" in text  # means and change
    assert "75.0% `decode_envelope (fedcoe_edge/wire/envelope.py)`" in text


def test_markdown_only_renders_the_kept_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--markdown-only re-renders fleet.md from fleet.json without running anything; a file
    without runs is one line and exit 2."""
    row = {"round": 1, "selected": 5, "accepted": 5, "failed": 0, "rejected": 0,
           "wall_s": 1.0, "last_task_s": 0.1, "coord_cpu_s": 0.5, "broker_cpu_s": 0.1,
           "generator_cpu_s": 0.1, "bytes_up": 1, "bytes_down": 2}
    kept = tmp_path / "fleet.json"
    kept.write_text(json.dumps({"command": "python -m benchmarks.fleet --devices 5", "runs": [
        {"devices": 5, "rounds": 1, "model": "deploy", "rounds_completed": 1,
         "round_rows": [row], "coordinator_peak_rss_mb": 100.0, "final_models": 5}]}))
    md = tmp_path / "fleet.md"
    args = ["--markdown-only", "--json", str(kept), "--md", str(md),
            "--profile-json", str(tmp_path / "none.json")]
    assert main(args) == 0
    assert "| 5 | 1/1 |" in md.read_text() and "Coordinator CPU profile" not in md.read_text()
    kept.write_text("{}")
    assert main(args) == 2
    assert "no fleet runs to render" in capsys.readouterr().err


def test_micro_measures_the_fixed_items_and_the_report_shows_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m benchmarks.fleet_profile --micro LABEL N`` keeps CPU-s per item under its
    label and fleet.md's profile section shows them; a size that is not a number is exit 2."""
    from benchmarks import fleet_profile

    doc = tmp_path / "profile.json"
    assert fleet_profile.main(["--micro", "after", "5", "--profile-json", str(doc)]) == 0
    got = json.loads(doc.read_text())["micro"]["after"][0]
    assert got["devices"] == 5 and all(got[k] >= 0 for k in ("defend_s", "admit_s", "parse_json_s"))
    text = "\n".join(fleet_profile.markdown(json.loads(doc.read_text())))
    assert "| 5 | defend | " in text and "| 5 | parse_json | " in text
    assert fleet_profile.main(["--micro", "after", "x", "--profile-json", str(doc)]) == 2
    assert "fleet sizes N >= 1" in capsys.readouterr().err


# slow: a multi-process deployment for tens of seconds; `make test-all` runs it (README, "Tests")
@pytest.mark.slow
def test_realistic_defaults_twenty_devices_three_rounds(tmp_path: Path, make_mosquitto: object) -> None:
    """The generator's defaults behave like the device agent: the deploy template's broker
    (passwords, ACL, client id = username, persistence), the agent's keepalive and session,
    heartbeats, each device its own update bytes, three rounds. Only the heartbeat interval
    is shortened (the agent's 30 s would not come round in a test this short)."""
    import shutil

    from benchmarks.fleet import AGENT_KEEPALIVE_S

    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("needs mosquitto_passwd (the deploy broker's password file)")
    spec = FleetSpec(devices=20, rounds=3, train_s=0.2, jitter_s=0.3, timeout_s=90,
                     heartbeat_s=1.0, workdir=str(tmp_path / "fleet"))
    assert spec.broker == "deploy" and spec.distinct_updates and spec.agent_session
    assert spec.keepalive_s == AGENT_KEEPALIVE_S
    run = run_fleet(spec)
    assert run["rounds_completed"] == 3, run.get("coordinator_log_tail")
    rows = run["round_rows"]
    assert [r["accepted"] for r in rows] == [20, 20, 20]
    assert all(r["failed"] == 0 and r["rejected"] == 0 for r in rows)
    assert run["device_rejects_total"] == 0, run["reject_examples"]
    assert run["broker_drops_total"] == 0 and run["connect_failed_count"] == 0
    assert run["final_models"] == 20 and run["coordinator_exit"] == 0
    assert run["heartbeats_seen"] == 20 and run["heartbeats_sent"] >= 20
    assert run["updates_sent"] == 60 and run["distinct_updates_sent"] == 60
    assert run["update_build_cpu_s_total"] > 0
    assert run_summary(run)["ok"]
    # the broker ran the deploy template's rules, generated into the run's folder
    conf = (tmp_path / "fleet" / "broker" / "fedcoe.conf").read_text()
    for line in ("allow_anonymous false", "use_username_as_clientid true", "persistence true"):
        assert line in conf
    acl = (tmp_path / "fleet" / "broker" / "acl").read_text()
    assert "user dev00019" in acl and "pattern write fl/v1/+/up/%u/#" in acl


def test_deploy_broker_refuses_anonymous_and_wrong_passwords(tmp_path: Path, make_mosquitto: object) -> None:
    """The generated broker really asks for logins: no username, or a wrong password, is
    refused; a device's own password is accepted."""
    import asyncio
    import shutil

    from benchmarks.fleet import _free_port, deploy_broker_files, password_of
    from benchmarks.mqtt_async import AsyncMqttClient, ConnectError
    from fedcoe_edge.broker import MosquittoBroker

    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("needs mosquitto_passwd")
    port = _free_port()
    conf = deploy_broker_files(tmp_path / "b", port, ["dev00000"], 0)
    with MosquittoBroker.from_config_file(conf, port, workdir=tmp_path / "b"):
        async def login(user: str, pw: str) -> bool:
            c = AsyncMqttClient(user or "anon", "127.0.0.1", port, username=user, password=pw)
            try:
                await c.connect_async(10.0)
            except (ConnectError, OSError, asyncio.TimeoutError):
                return False
            c.close()
            return True

        assert asyncio.run(login("dev00000", password_of("dev00000")))
        assert not asyncio.run(login("", ""))
        assert not asyncio.run(login("dev00000", "wrong"))


def test_keepalive_follows_paho_rule() -> None:
    """A PINGREQ is due when nothing went out, or nothing came in, for a keepalive; the
    agent's keepalive is the default of the generator's devices."""
    from benchmarks.fleet import AGENT_KEEPALIVE_S
    from benchmarks.mqtt_async import AsyncMqttClient
    from fedcoe_edge.protocol import BrokerSettings

    assert BrokerSettings().keepalive_s == AGENT_KEEPALIVE_S
    c = AsyncMqttClient("dev00000", "127.0.0.1", 1, keepalive_s=30)
    assert not c.keepalive_due(100.0)  # not connected
    c._connected = True
    c.last_send = c.last_recv = 100.0
    assert not c.keepalive_due(129.0)
    c.last_send = 125.0  # a heartbeat went out, nothing came back
    assert c.keepalive_due(130.0)
    c.last_recv = 125.0
    assert not c.keepalive_due(130.0) and c.keepalive_due(155.0)


def test_acl_comes_from_the_deploy_template() -> None:
    """The ACL is deploy/mosquitto/acl's rules: its patterns, its coordinator entry (or its
    sharded example renamed for this federation and each shard), its device entry per id."""
    from benchmarks.fleet import DEPLOY_ACL, acl_from_template, aggregator_logins

    ids = ["dev00000", "dev00001"]
    template = DEPLOY_ACL.read_text()
    for shards in (0, 3):
        text = acl_from_template(ids, shards)
        users = {line.split()[1] for line in text.splitlines() if line.startswith("user ")}
        assert users == set(aggregator_logins(shards).values()) | set(ids)
        for line in template.splitlines():
            if line.startswith("pattern "):
                assert line in text
        assert "fleet1" not in text  # the template's example federation, renamed
    text = acl_from_template(ids, 3)
    assert "topic readwrite fl/v1/fleet.s2of3/#" in text
    assert "topic write fl/v1/fleet/agg/up/shard-2/#" in text
    assert "topic readwrite fl/v1/#" in acl_from_template(ids, 0)
    # each device reads the shared downloads of its own federation id (its shard's) only
    from fedcoe_edge.sharding import shard_federation, shard_of

    assert acl_from_template(ids, 0).count("topic read fl/v1/fleet/shared/#") == 2
    for dev in ids:
        entry = text.split(f"user {dev}\n", 1)[1].split("\n\n", 1)[0]
        assert f"topic read fl/v1/{shard_federation('fleet', shard_of(dev, 3), 3)}/shared/#" in entry
