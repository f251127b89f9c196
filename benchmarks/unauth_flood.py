"""How fast the coordinator discards messages nobody with a key signed (docs/protocol.md,
"Bounds"): an in-memory one-round federation, then 10,000 heartbeat / control messages
from a peer without the device's key (a float 1e999, 40,000-deep JSON, random bytes, a
forged envelope), every rate limit lifted so each one reaches the decoder, each call
wrapped the way the transport's worker wraps a handler (an exception is logged with its
traceback). Prints messages discarded per second and the log written.

    PYTHONPATH=$PWD python benchmarks/unauth_flood.py [--log FILE] [-n 10000]

Run it with PYTHONPATH pointing at another checkout to compare versions on one machine.
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
import time
from pathlib import Path

from coordinator.harness import EmbeddedFederation
from coordinator.limits import RateLimiter
from fedcoe_edge.transport import MemoryBroker, Message
from fedcoe_edge.wire import Envelope, encode_envelope


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", type=Path, default=None, help="log file (default: a temp file)")
    ap.add_argument("-n", type=int, default=10_000, help="messages to send")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="unauth-flood-"))
    log_path = args.log or tmp / "flood.log"
    logging.basicConfig(filename=log_path, level=logging.INFO)
    broker = MemoryBroker()
    fed = EmbeddedFederation(tmp, lambda cid, will, birth: broker.client(cid, will=will, birth=birth),
                             devices=2, rounds=1)
    fed.start()
    try:
        fed.wait_rounds(120)
        c = fed.coordinator
        assert c is not None
        c._ctl_limit = RateLimiter(1e9, 1e9)
        c._hb_limit = RateLimiter(1e9, 1e9)  # absent before heartbeats had a budget: harmless
        env = Envelope.new("hb", federation="test", sender="0", recipient="coordinator",
                           body={"rss_mb": 1.0}, ttl_s=120)
        forged = encode_envelope(env, b"w" * 32)  # not device 0's key
        deep = b'{"body":' + b"[" * 40_000 + b"]" * 40_000 + b',"sender":"0"}'
        payloads = [forged.replace(b'"rss_mb":1.0', b'"rss_mb":1e999'), deep,
                    random.Random(0).randbytes(300), forged]
        worker = logging.getLogger("fedcoe.transport")
        size0 = log_path.stat().st_size
        t0 = time.perf_counter()
        for i in range(args.n):
            p = payloads[i % len(payloads)]
            try:
                if i % 2:
                    c._on_heartbeat(Message("fl/v1/test/up/0/hb", p, qos=0))
                else:
                    c._on_ctl(Message("fl/v1/test/up/0/ctl", p))
            except Exception:  # what the transport worker does with a handler's exception
                worker.exception("handler failed")
        dt = time.perf_counter() - t0
        c.refusals.flush(force=True)
        grown = log_path.stat().st_size - size0
    finally:
        fed.stop()
    print(f"{args.n / dt:,.0f} messages/s discarded ({dt:.2f} s for {args.n:,}); "
          f"log +{grown:,} bytes ({log_path})")


if __name__ == "__main__":
    main()
