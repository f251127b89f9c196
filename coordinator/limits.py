"""Per-device bounds on the coordinator's work: token-bucket rate limits and a refusal log
that aggregates instead of writing one synced row and one log line per bad message.

Everything a device sends costs the coordinator's single handler thread some work; an
enrolled device that is compromised (or broken) must not be able to buy more than its
share. Both classes take the clock as a parameter, so tests drive them without sleeping.
Every bound is listed in docs/protocol.md ("Bounds").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from fedcoe_edge.protocol import reason_class

__all__ = ["RateLimiter", "RefusalLog", "reason_class"]

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
    as ONE row (with ``count``) and ONE line when the interval ends. While the refusals
    go on, each later interval writes only its summary (one row, one line). The table
    keeps the newest ``retention`` rows of refusals. Memory: at most ``max_keys`` open
    windows; at most ``max_new_per_interval`` windows open per interval, refusals past that
    (made-up device ids) share one window under device ``*``."""

    sink: _Sink
    log: logging.Logger
    interval_s: float = 60.0
    per_interval: int = 3
    retention: int = 10_000
    max_keys: int = 1000
    clock: Clock = time.monotonic
    kind: str = "rejected"
    label: str = "rejected"  # the first word of its log lines
    who: str = "device"  # what the sender is called in them
    max_new_per_interval: int = 200
    _windows: dict[tuple[str, str], _Window] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _since_prune: int = 0
    _opened: tuple[float, int] = (float("-inf"), 0)  # (interval start, windows opened in it)

    def refuse(self, rnd: int, device: str, reason: str, cls: str | None = None,
               per_interval: int | None = None) -> bool:
        """Record one refusal; True when it was written individually (so the caller may
        also tell the device), False when it was only counted. ``cls`` groups refusals
        under a class of the caller's instead of the reason's (e.g. every unauthenticated
        message of a sender, whatever its defect); ``per_interval`` overrides how many of
        that class are written individually."""
        now = self.clock()
        limit = self.per_interval if per_interval is None else per_interval
        key = (device, cls if cls is not None else reason_class(reason))
        flush: list[tuple[tuple[str, str], _Window]] = []
        with self._lock:
            w = self._windows.get(key)
            if w is not None and now - w.started >= self.interval_s:
                flush.append((key, self._windows.pop(key)))
                w = self._summarised(key, flush[-1][1], now, limit)
            if w is None:
                start, opened = self._opened
                if now - start >= self.interval_s:
                    start, opened = now, 0
                if opened >= self.max_new_per_interval and device != "*":
                    self._opened = (start, opened)
                    key = ("*", key[1])
                    w = self._windows.get(key)
                else:
                    self._opened = (start, opened + 1)
            if w is None:
                if len(self._windows) >= self.max_keys:  # bound memory: close the oldest
                    old = next(iter(self._windows))
                    flush.append((old, self._windows.pop(old)))
                w = self._windows[key] = _Window(now)
            single = w.written < limit
            if single:
                w.written += 1
            else:
                w.suppressed += 1
                w.round, w.example = rnd, reason
        self._write(flush)
        if single:
            self.log.warning("%s %s=%s round=%d reason=%s", self.label, self.who, device, rnd,
                             reason)
            self._add(rnd, device, reason, 1)
        return single

    def flush(self, force: bool = False) -> None:
        """Write the summaries of intervals that ended (all of them with ``force``)."""
        now = self.clock()
        with self._lock:
            done = [(k, w) for k, w in self._windows.items()
                    if force or now - w.started >= self.interval_s]
            for k, w in done:
                del self._windows[k]
                if not force:
                    self._summarised(k, w, now, self.per_interval)
        self._write(done)

    def _summarised(self, key: tuple[str, str], w: _Window, now: float,
                    limit: int) -> _Window | None:
        """After an interval whose excess was summarised, the next one starts with its
        individual lines spent: a refusal that goes on writes one summary per interval,
        not ``per_interval`` lines plus a summary. Lock held."""
        if not w.suppressed:
            return None
        nw = self._windows[key] = _Window(now, written=max(limit, 1))
        return nw

    def _write(self, items: list[tuple[tuple[str, str], _Window]]) -> None:
        for (device, _), w in items:
            if not w.suppressed:
                continue
            self.log.warning("%s %s=%s round=%d reason=%s (and %d more like it in %.0fs)",
                             self.label, self.who, device, w.round, w.example, w.suppressed,
                             self.interval_s)
            self._add(w.round, device, f"{w.suppressed} x {w.example}", w.suppressed)

    def _add(self, rnd: int, device: str, reason: str, count: int) -> None:
        self.sink.add_event(rnd, device, self.kind, reason, count)
        self._since_prune += 1
        if self._since_prune >= max(1, self.retention // 10):
            self._since_prune = 0
            self.sink.prune_events(self.kind, self.retention)
