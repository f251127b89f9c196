"""FedCoE federations over a real Mosquitto (started on a free loopback port).

* three devices complete rounds, and reach exactly what the in-memory transport reaches
  for the same seed (the same strategy code path), with every message chunked under a
  small broker packet limit;
* each bad input (malformed envelope, bad HMAC, chunk for an unknown transfer, wrong
  shapes, non-finite values, a duplicate, an update for a closed round) is rejected with a
  log line naming device, round and reason and counted in the round log, while the rounds
  still complete;
* a device vanishing mid-round (socket cut, last-will published) is a failure at the
  deadline, not a hang.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.config import FederationSettings
from coordinator.harness import DEMO_SECRET, EmbeddedFederation, small
from device_agent.daemon import AgentHooks, DeviceAgent
from fedcoe_edge.errors import WireError
from fedcoe_edge.protocol import BrokerSettings, device_key, mqtt_factory
from fedcoe_edge.strategies import ClientResult
from fedcoe_edge.transport import MemoryBroker, Topics
from fedcoe_edge.transport.mqtt import MqttTransport
from fedcoe_edge.wire import Envelope, encode_chunk, encode_envelope

pytestmark = pytest.mark.integration

PACKET_LIMIT = 8 * 1024


def memory_factory() -> Any:
    broker = MemoryBroker()
    return lambda cid, will, birth: broker.client(cid, will=will, birth=birth)


def run_federation(root: Path, factory: Any, **kw: Any) -> dict[str, Any]:
    fed = EmbeddedFederation(root, factory, **kw, **small())
    fed.start()
    try:
        fed.wait_rounds(120)
        c = fed.coordinator
        assert c is not None
        return {"rows": [c.store.round_summary(r) for r in range(1, fed.rounds + 1)],
                "state": dict(c.strategy.global_state), "events": c.store.events(),
                "max_packet": c.transport.max_packet_size if c.transport else None,
                "federation": fed.federation}
    finally:
        fed.stop()


def test_three_devices_over_mosquitto_match_the_memory_transport(tmp_path: Path, make_mosquitto: Any) -> None:
    broker = make_mosquitto(max_packet_size=PACKET_LIMIT)
    # batch aggregation: compared bit for bit, and streamed sums depend on the arrival order
    mqtt = run_federation(tmp_path / "mqtt", mqtt_factory(BrokerSettings(port=broker.port)),
                          devices=3, rounds=3, aggregation="batch")
    mem = run_federation(tmp_path / "mem", memory_factory(), devices=3, rounds=3, aggregation="batch")
    assert [r["accepted"] for r in mqtt["rows"]] == [3, 3, 3]
    assert [r["global_acc"] for r in mqtt["rows"]] == [r["global_acc"] for r in mem["rows"]]
    assert [r["personalized_acc"] for r in mqtt["rows"]] == [r["personalized_acc"] for r in mem["rows"]]
    for name, value in mem["state"].items():
        np.testing.assert_array_equal(mqtt["state"][name], value, err_msg=name)
    assert mqtt["events"] == []
    # every transfer exceeded one broker packet, so it could only have arrived in chunks
    assert mqtt["max_packet"] == PACKET_LIMIT
    per_device_down = mqtt["rows"][0]["bytes_down"] / 3
    assert per_device_down > 3 * PACKET_LIMIT
    t = MqttTransport("probe", broker.host, broker.port)
    t.connect()
    try:
        with pytest.raises(WireError, match="send it as a chunked transfer"):
            t.check_size(Topics(mqtt["federation"]).dn_blob("0", "x"), int(per_device_down), 1, False)
    finally:
        t.close()


def forged(sender: str, key: bytes, rnd: int, federation: str) -> bytes:
    env = Envelope.new("result", federation=federation, sender=sender, recipient="coordinator", round=rnd,
                       body={"num_samples": 1})
    return encode_envelope(env, key)


def nudged(result: ClientResult) -> ClientResult:
    """The same update with every float moved a little: different bytes, same shapes."""
    params = {k: (v * np.float32(1.001)).astype(v.dtype) for k, v in result.params.items()}
    return dataclasses.replace(result, params=params)


def test_bad_inputs_are_rejected_and_counted_while_rounds_complete(
        tmp_path: Path, make_mosquitto: Any, caplog: pytest.LogCaptureFixture) -> None:
    broker = make_mosquitto()
    release = threading.Event()

    def wrong_shape(rnd: int, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if rnd == 1:
            name = "global.gate.net.weight" if "global.gate.net.weight" in params else sorted(params)[0]
            params[name] = params[name].reshape(-1)
        return params

    def non_finite(rnd: int, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if rnd == 2:
            name = sorted(params)[-1]
            params[name] = params[name].copy()
            params[name].flat[0] = np.nan
        return params

    def hold_round1(agent: DeviceAgent, rnd: int) -> bool:
        if rnd == 1:
            release.wait(60)  # keep round 1 open while the test injects its bad inputs
        return True

    hooks = {"0": AgentHooks(tamper=wrong_shape),
             "1": AgentHooks(tamper=non_finite, before_upload=hold_round1)}
    fed = EmbeddedFederation(tmp_path, mqtt_factory(BrokerSettings(port=broker.port)), devices=3,
                             rounds=2, compress=False, hooks=hooks, **small())
    fed.start()
    intruder = MqttTransport("intruder", broker.host, broker.port)
    try:
        c = fed.coordinator
        assert c is not None
        fed.wait(lambda: c.round == 1 and "2" in c.results and "0" in c.failed, 60, "round 1 half done")
        topics = Topics(fed.federation)
        intruder.connect()
        intruder.publish(topics.up_ctl("0"), b"{not json")
        intruder.publish(topics.up_ctl("1"), forged("1", b"k" * 32, 1, fed.federation))
        intruder.publish(topics.up_blob("2", "feedface"), encode_chunk("feedface", 0, 1, b"junk"))
        # device 2 re-sends its accepted round-1 update: the same bytes are a retransmission
        # (acknowledged again), a different update for the same round is a duplicate
        a2 = fed.agents["2"]
        assert a2.last_result is not None and a2.last_result[0] == 1
        assert a2._upload(1, a2.last_result[1], a2.last_result[2]) is True
        assert not a2._upload(1, nudged(a2.last_result[1]), a2.last_result[2])

        def rejected(dev: str, rnd: int, text: str) -> bool:
            return any(e["device"] == dev and e["round"] == rnd and text in e["reason"]
                       for e in c.store.events(kind="rejected"))
        fed.wait(lambda: rejected("0", 1, "no HMAC member") and rejected("1", 1, "bad HMAC")
                 and rejected("2", 1, "chunk for unknown transfer"), 30, "intruder rejections")
        release.set()
        fed.wait_rounds(120)
        # after the last round: device 2 re-sends its round-2 update
        a2._upload(2, nudged(a2.last_result[1]), a2.last_result[2])
        fed.wait(lambda: rejected("2", 2, "update for closed round 2"), 30, "closed-round rejection")
        rows = [c.store.round_summary(r) for r in (1, 2)]
        failures = {(f["device"], f["round"]): f["reason"] for f in c.store.events(kind="failure")}
        events = c.store.events(kind="rejected")
    finally:
        release.set()
        intruder.close()
        fed.stop()

    expected = [("0", 1, "envelope: envelope from '0': no HMAC member"), ("1", 1, "bad HMAC"),
                ("2", 1, "chunk for unknown transfer 'feedface'"),
                ("0", 1, "has shape"), ("2", 1, "duplicate update for round 1"),
                ("1", 2, "non-finite value"), ("2", 2, "update for closed round 2")]
    for dev, rnd, text in expected:
        assert any(e["device"] == dev and e["round"] == rnd and text in e["reason"] for e in events), text
        assert any(f"rejected device={dev} round={rnd} reason=" in line and text in line
                   for line in caplog.text.splitlines()), (dev, rnd, text)
    assert [r["state"] for r in rows] == ["closed", "closed"]
    assert (rows[0]["accepted"], rows[0]["failed"]) == (2, 1)  # device 0: wrong shapes
    assert (rows[1]["accepted"], rows[1]["failed"]) == (2, 1)  # device 1: non-finite
    assert rows[0]["rejected"] >= 5 and rows[1]["rejected"] >= 1
    assert "update rejected" in failures[("0", 1)] and "non-finite" in failures[("1", 2)]
    # the devices know: a refused update is not reported as uploaded
    assert "0: round 1 upload refused by the coordinator" in caplog.text
    assert "1: round 2 upload refused by the coordinator" in caplog.text


def test_device_vanishing_mid_round_is_a_failure_at_the_deadline(
        tmp_path: Path, make_mosquitto: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fedcoe")
    broker = make_mosquitto()

    def vanish(agent: DeviceAgent, rnd: int) -> bool:
        if rnd == 2:
            t = agent.transport
            assert isinstance(t, MqttTransport)
            t.drop_connection()  # power loss: no DISCONNECT, the broker publishes the will
            t.close()
            agent.stop()
            return False
        return True

    fed = EmbeddedFederation(tmp_path, mqtt_factory(BrokerSettings(port=broker.port)), devices=3,
                             rounds=2, deadline_s=8.0, hooks={"2": AgentHooks(before_upload=vanish)}, **small())
    fed.start()
    try:
        c = fed.coordinator
        assert c is not None
        fed.wait(lambda: c.finished, 90, "two rounds")
        rows = [c.store.round_summary(r) for r in (1, 2)]
        failures = c.store.events(2, "failure")
        online = c.available()
    finally:
        fed.stop()
    assert [r["accepted"] for r in rows] == [3, 2]
    assert [(f["device"], f["reason"]) for f in failures] == [("2", "deadline passed with no accepted update")]
    assert rows[1]["applied"] and "2" not in online
    assert "device 2 went offline" in caplog.text
    assert "failure device=2 round=2 reason=deadline passed" in caplog.text
    assert device_key(DEMO_SECRET, "2") != device_key(DEMO_SECRET, "1")


def test_broker_restart_mid_round_changes_nothing(tmp_path: Path, make_mosquitto: Any) -> None:
    """Mosquitto (no persistence: sessions, subscriptions, queued and retained messages are
    lost) restarts while round 2's transfers are in flight. Clients reconnect and
    resubscribe, manifests are re-announced, windows retransmit; the federation finishes
    with every update accepted and the same result as the in-memory transport."""
    broker = make_mosquitto()
    restarted = threading.Event()

    def restart_during_upload(agent: DeviceAgent, rnd: int) -> bool:
        if rnd == 2 and not restarted.is_set():
            restarted.set()
            broker.stop()
            broker.start()
        return True

    mqtt = run_federation(tmp_path / "mqtt", mqtt_factory(BrokerSettings(port=broker.port)),
                          devices=3, rounds=3, hooks={"0": AgentHooks(before_upload=restart_during_upload)})
    mem = run_federation(tmp_path / "mem", memory_factory(), devices=3, rounds=3)
    assert restarted.is_set()
    assert [r["accepted"] for r in mqtt["rows"]] == [3, 3, 3]
    assert [r["failed"] for r in mqtt["rows"]] == [0, 0, 0]
    for name, value in mem["state"].items():
        np.testing.assert_array_equal(mqtt["state"][name], value, err_msg=name)


def test_federation_over_the_deploy_template_tls_passwords_acl(tmp_path: Path) -> None:
    """The shipped broker template (TLS, passwords, per-device ACL) carries a whole federation:
    every topic the daemons use is one the ACL grants them."""
    import os
    import shutil
    import socket
    import subprocess

    from fedcoe_edge.broker import MosquittoBroker, find_mosquitto

    if not (shutil.which("openssl") and shutil.which("mosquitto_passwd")):
        pytest.skip("needs openssl and mosquitto_passwd")
    find_mosquitto()

    def sh(*args: str) -> None:
        subprocess.run(args, cwd=tmp_path, check=True, capture_output=True)

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
       "-days", "1", "-subj", "/CN=fedcoe-test-ca")
    sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
       "-subj", "/CN=127.0.0.1")
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    sh("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
       "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "san.ext")
    passwords = {"coordinator": "pw-c", "0": "pw-0", "1": "pw-1"}
    sh("mosquitto_passwd", "-c", "-b", "passwd", "coordinator", passwords["coordinator"])
    for dev in ("0", "1"):
        sh("mosquitto_passwd", "-b", "passwd", dev, passwords[dev])
    deploy = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto"
    # deploy/mosquitto/README.md, step 3: the template plus one entry per device, as dev0/dev1
    template = (deploy / "acl").read_text()
    entry = template[template.index("user dev0\n"):template.index("user dev1\n")].strip()
    # the device's own federation id in its shared-download line (the README's step 3)
    entry = entry.replace("fl/v1/fleet1/", f"fl/v1/{FederationSettings.id}/")
    (tmp_path / "acl").write_text(template + "".join(
        f"\n{entry.replace('dev0', dev)}\n" for dev in ("0", "1")))
    plain, tls = free_port(), free_port()
    conf = (deploy / "mosquitto.conf").read_text()
    for old, new in [("/etc/mosquitto/fedcoe/", f"{tmp_path}/"),
                     ("listener 1883 127.0.0.1", f"listener {plain} 127.0.0.1"),
                     ("listener 8883", f"listener {tls} 127.0.0.1"),
                     ("persistence_location /var/lib/mosquitto/", f"persistence_location {tmp_path}/"),
                     ("log_dest syslog", f"log_dest file {tmp_path}/mosquitto.log")]:
        conf = conf.replace(old, new)
    if os.geteuid() == 0:
        conf += "user root\n"
    conf += "log_type debug\n"  # Mosquitto logs ACL denials at debug level

    def factory(cid: str, will: Any, birth: Any) -> Any:
        settings = BrokerSettings(port=tls, tls=True, ca_file=str(tmp_path / "ca.crt"), username=cid,
                                  password=passwords[cid])
        return mqtt_factory(settings)(cid, will, birth)

    with MosquittoBroker(port=tls, config_text=conf, workdir=tmp_path):
        got = run_federation(tmp_path / "fed", factory, devices=2, rounds=2)
        clean = (tmp_path / "mosquitto.log").read_text()
        # control: device 1 writing device 0's uplink is denied, and the broker says so
        spoof = factory("1", None, None)
        spoof.connect()
        spoof.publish(Topics(got["federation"]).up_ctl("0"), b"forged")
        spoof.close()
    mem = run_federation(tmp_path / "mem", memory_factory(), devices=2, rounds=2)
    assert [r["accepted"] for r in got["rows"]] == [2, 2] and got["events"] == []
    assert [r["global_acc"] for r in got["rows"]] == [r["global_acc"] for r in mem["rows"]]
    assert "Denied" not in clean
    assert "Denied PUBLISH from 1" in (tmp_path / "mosquitto.log").read_text()
