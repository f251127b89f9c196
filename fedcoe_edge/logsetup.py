"""Log line formats of every ``fedcoe`` command (docs/daemons.md, "Logs").

The command line configures logging in one place (:func:`fedcoe_edge.cli.main` calls
:func:`configure`); daemons and libraries only log. Two formats:

* ``text`` (the default): ``2026-12-07T04:25:22.123+00:00 INFO fedcoe.coordinator: msg``;
  the date is ISO 8601 with the UTC offset, so lines from a device and its coordinator in
  different time zones (or a journal read after a DST change) still sort and compare;
* ``json``: one object per line, ``{"ts", "level", "logger", "msg", ...fields}``, where the
  fields are what the call passed as ``extra=`` (e.g. the coordinator's per-round summary:
  ``round``, ``accepted``, ``failed``...), for a log shipper to index without parsing text.
  The keys ``ts``, ``level``, ``logger`` and ``msg`` are stable; fields are added, never renamed.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime
from typing import Any, TextIO

__all__ = ["FORMATS", "IsoFormatter", "JsonFormatter", "configure", "iso_time"]

FORMATS = ("text", "json")

# attributes every LogRecord has: anything else on a record came from ``extra=``
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def iso_time(created: float) -> str:
    """``created`` (epoch seconds) as local ISO 8601 with milliseconds and the UTC offset."""
    return datetime.fromtimestamp(created).astimezone().isoformat(timespec="milliseconds")


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra=`` fields of a record (every attribute a plain record does not have)."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class IsoFormatter(logging.Formatter):
    """``TS LEVEL LOGGER: message``; a traceback, if any, on the lines after it."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return iso_time(record.created)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; values JSON cannot hold are written as their ``str``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"ts": iso_time(record.created), "level": record.levelname,
                               "logger": record.name, "msg": record.getMessage()}
        for k, v in fields_of(record).items():
            doc.setdefault(k, v)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of the line (as logging's own
    last-resort handler does): a handler that kept the stream of its creation would write
    to a closed file once a test's captured stderr is gone."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def configure(level: int, fmt: str = "text", stream: TextIO | None = None,
              filters: tuple[logging.Filter, ...] = ()) -> logging.Handler | None:
    """Route every logger to one handler (stderr by default) in format ``fmt``.

    As :func:`logging.basicConfig`, it leaves a root logger that already has handlers
    someone else installed alone (an embedding program, a test runner) and returns None;
    a handler a previous call installed is replaced, so two calls do not double lines.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_fedcoe", False)]
    if len(ours) < len(root.handlers):
        return None
    handler: logging.Handler = (logging.StreamHandler(stream) if stream is not None
                                else _StderrHandler())
    handler.setFormatter(JsonFormatter() if fmt == "json" else IsoFormatter())
    for f in filters:
        handler.addFilter(f)
    for old in ours:
        root.removeHandler(old)
    handler._fedcoe = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    return handler
