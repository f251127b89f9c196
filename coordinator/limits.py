"""Per-device bounds on the coordinator's work: token-bucket rate limits and a refusal log
that aggregates instead of writing one synced row and one log line per bad message.

Everything a device sends costs the coordinator's single handler thread some work; an
enrolled device that is compromised (or broken) must not be able to buy more than its
share. Both classes take the clock as a parameter, so tests drive them without sleeping.
Every bound is listed in docs/protocol.md ("Bounds").
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

Clock = Callable[[], float]


class RateLimiter:
    """Token buckets keyed by (device, message class): ``burst`` at once, then ``rate``
    per second. ``max_keys`` bounds the memory (the oldest bucket is dropped first; a
    dropped bucket simply starts full again)."""

    def __init__(self, rate: float, burst: float, *, clock: Clock = time.monotonic,
                 max_keys: int = 10_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("RateLimiter needs rate > 0 and burst >= 1")
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        """Take one token for ``key``; False when its bucket is empty (refuse the message)."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            ok = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if ok else tokens, now)  # re-insert: newest last
            while len(self._buckets) > self.max_keys:
                self._buckets.pop(next(iter(self._buckets)))
            return ok


class _Sink(Protocol):
    def add_event(self, rnd: int, device: str, kind: str, reason: str, count: int = 1) -> None: ...
    def prune_events(self, kind: str, keep: int) -> int: ...


# hex literals first: "byte 0xbc" must blank to one class, not 256 (random garbage names a
# different byte in every decode error)
_VARIABLE = re.compile(r"'[^']*'|\"[^\"]*\"|0x[0-9a-fA-F]+|[0-9a-f]{8,}|\d+")


def reason_class(reason: str) -> str:
    """What stays the same across repeats of one refusal: quoted names, ids and numbers
    are blanked, so 10,000 chunks for 10,000 made-up transfers are one class."""
    return _VARIABLE.sub("#", reason)[:120]


@dataclass
class _Window:
    started: float
    written: int = 0
    suppressed: int = 0
    round: int = 0
    example: str = ""


@dataclass
class RefusalLog:
    """Refusals per (device, reason class) per ``interval_s``: the first ``per_interval``
    are written as rows and WARNING lines as they come; the rest are counted and written
    as ONE row (with ``count``) and ONE line when the interval ends. The table keeps the
    newest ``retention`` rows of refusals. Memory: at most ``max_keys`` open windows."""

    sink: _Sink
    log: logging.Logger
    interval_s: float = 60.0
    per_interval: int = 3
    retention: int = 10_000
    max_keys: int = 1000
    clock: Clock = time.monotonic
    kind: str = "rejected"
    _windows: dict[tuple[str, str], _Window] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _since_prune: int = 0

    def refuse(self, rnd: int, device: str, reason: str) -> bool:
        """Record one refusal; True when it was written individually (so the caller may
        also tell the device), False when it was only counted."""
        now = self.clock()
        key = (device, reason_class(reason))
        flush: list[tuple[tuple[str, str], _Window]] = []
        with self._lock:
            w = self._windows.get(key)
            if w is not None and now - w.started >= self.interval_s:
                flush.append((key, self._windows.pop(key)))
                w = None
            if w is None:
                if len(self._windows) >= self.max_keys:  # bound memory: close the oldest
                    old = next(iter(self._windows))
                    flush.append((old, self._windows.pop(old)))
                w = self._windows[key] = _Window(now)
            single = w.written < self.per_interval
            if single:
                w.written += 1
            else:
                w.suppressed += 1
                w.round, w.example = rnd, reason
        self._write(flush)
        if single:
            self.log.warning("rejected device=%s round=%d reason=%s", device, rnd, reason)
            self._add(rnd, device, reason, 1)
        return single

    def flush(self, force: bool = False) -> None:
        """Write the summaries of intervals that ended (all of them with ``force``)."""
        now = self.clock()
        with self._lock:
            done = [(k, w) for k, w in self._windows.items()
                    if force or now - w.started >= self.interval_s]
            for k, _ in done:
                del self._windows[k]
        self._write(done)

    def _write(self, items: list[tuple[tuple[str, str], _Window]]) -> None:
        for (device, _), w in items:
            if not w.suppressed:
                continue
            self.log.warning("rejected device=%s round=%d reason=%s (and %d more like it in %.0fs)",
                             device, w.round, w.example, w.suppressed, self.interval_s)
            self._add(w.round, device, f"{w.suppressed} x {w.example}", w.suppressed)

    def _add(self, rnd: int, device: str, reason: str, count: int) -> None:
        self.sink.add_event(rnd, device, self.kind, reason, count)
        self._since_prune += 1
        if self._since_prune >= max(1, self.retention // 10):
            self._since_prune = 0
            self.sink.prune_events(self.kind, self.retention)
