"""One coordinator per state folder: an exclusive ``flock`` on ``STATE/coordinator.lock``.

Two coordinators on one state folder would both append to the round log and both publish
the retained status, flapping it every second (docs/daemons.md, "One coordinator per state
folder"). The lock is taken before the database is opened and held for the life of the
process; the kernel drops it when the process dies, however it dies (``kill -9`` included),
so a stale lock file never blocks a restart. The file also says who holds it (pid, host,
start time), which the refused second coordinator prints and ``fedcoe status`` reads.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from fedcoe_edge.errors import ConfigError

LOCK_NAME = "coordinator.lock"

__all__ = ["LOCK_NAME", "StateLock", "holder", "holder_text"]


def holder(state_dir: Path) -> dict[str, Any] | None:
    """What the lock file says about its last holder (``pid``, ``host``, ``started``), or
    None when there is no readable lock file. It may name a process that has ended: the
    flock, not the file, is the lock."""
    try:
        doc = json.loads((Path(state_dir) / LOCK_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def holder_text(doc: dict[str, Any] | None) -> str:
    """``pid 123 on host pi4 since 2026-12-07T04:25:22+00:00`` (what is known of it)."""
    if not doc:
        return "a process that has not written its name yet"
    started = doc.get("started")
    when = (datetime.fromtimestamp(float(started)).astimezone().isoformat(timespec="seconds")
            if isinstance(started, int | float) else "an unknown time")
    return f"pid {doc.get('pid', '?')} on host {doc.get('host', '?')} since {when}"


class StateLock:
    """``with StateLock(dir):`` or ``acquire()``/``release()``; a second holder (another
    process, or another open of the file in this one) gets a :class:`ConfigError` at once."""

    def __init__(self, state_dir: Path, role: str = "coordinator") -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LOCK_NAME
        self.role = role
        self._fd: int | None = None

    def acquire(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"state folder {self.state_dir} is in use by another coordinator "
                              f"({holder_text(holder(self.state_dir))}); stop it first, or give "
                              "this one its own [federation] state_dir") from None
        except OSError as exc:  # e.g. a file system without locks
            os.close(fd)
            raise ConfigError(f"cannot lock {self.path}: {exc}") from None
        doc = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
               "role": self.role}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(doc) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Unlock (the file stays: its content names the last holder, harmlessly)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
