"""Log set-up: ``--log-format text|json`` and ``--log-level``.

Structured events (one per connection, resolver updates, ...) pass their fields as
``extra={"fields": {...}}``. The text format appends them as ``key=value``; the JSON format
makes them top-level keys of one JSON object per line. ``Throttled`` keeps a flood of
lines of one kind (refused connections, accept errors) to one line a second.
"""

from __future__ import annotations

import json
import logging
import sys
import time

LEVELS = ("debug", "info", "warning", "error")


def _fmt_value(v) -> str:
    s = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    if not s or any(c in s for c in ' "='):
        return json.dumps(s)
    return s


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        line = f"{ts} {record.levelname:<7} {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={_fmt_value(v)}" for k, v in fields.items() if v is not None and k != "event")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


# --log-connections: which connections get their one line (logger "ambassadord.conn").
CONNECTION_LINES = ("all", "errors", "none")
CONNECTION_LOGGER = "ambassadord.conn"


class _NotOk(logging.Filter):
    """--log-connections errors: a connection line whose outcome is ok is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (getattr(record, "fields", None) or {}).get("outcome") != "ok"


def setup(fmt: str = "text", level: str = "info", stream=None, connections: str = "all") -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx (--docker's client) logs every request at INFO; its failures reach us as errors.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    conn = logging.getLogger(CONNECTION_LOGGER)
    conn.filters[:] = [_NotOk()] if connections == "errors" else []
    # none: above every level, so that isEnabledFor() is False and no line is even built
    # (connect mode then asks the kernel for no connection-end events either).
    conn.setLevel(logging.CRITICAL + 1 if connections == "none" else logging.NOTSET)


class Throttled:
    """Log lines of one kind at most once per ``every`` seconds each: a flood of refused
    connections must not become a flood of log lines too. A line says how many like it
    were left out since the last one."""

    def __init__(self, logger: logging.Logger | None = None, every: float = 1.0):
        self.logger, self.every = logger or logging.getLogger("ambassadord"), every
        self._next: dict = {}  # key -> monotonic time before which lines are held back
        self._held: dict = {}  # key -> lines held back since the last one logged

    def log(self, key, level: int, msg: str, *args, fields: dict | None = None) -> None:
        now = time.monotonic()
        if now < self._next.get(key, 0.0):
            self._held[key] = self._held.get(key, 0) + 1
            return
        self._next[key] = now + self.every
        held = self._held.pop(key, 0)
        if held:
            msg, args = msg + " (and %d more since the last such line)", (*args, held)
        self.logger.log(level, msg, *args, extra={"fields": fields} if fields else None)
