"""One JSON object a line on stderr, in the upstream proxy's shape.

    {"level":"info","timestamp":"2025-10-06T21:53:35.850460Z","logger":"proxy",
     "caller":"app.py:88","message":"successfully acquired token","method":"GET",...}

Messages are fixed strings; values go in `extra=`. This is the only module that installs
handlers. Tokens never reach it: callers pass client IDs, paths and statuses, never
assertions or access tokens (the URI logged is the request's, which carries neither).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from typing import IO, Any, Final

_STD_ATTRS: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime", "taskName"}
)
_LEVELS: Final = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warn",
    logging.ERROR: "error",
    logging.CRITICAL: "fatal",
}


def rfc3339(epoch_s: float) -> str:
    """RFC 3339 with microseconds in UTC, as the upstream logger writes it."""
    return dt.datetime.fromtimestamp(epoch_s, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class JsonFormatter(logging.Formatter):
    def __init__(self, logger_name: str) -> None:
        super().__init__()
        self._logger_name = logger_name

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "level": _LEVELS.get(record.levelno, record.levelname.lower()),
            "timestamp": rfc3339(record.created),
            "logger": self._logger_name,
            "caller": f"{record.module}.py:{record.lineno}",
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


def configure(level: str, *, logger_name: str, stream: IO[str] | None = None) -> None:
    """Send every azwi_netproxy log record to `stream` (stderr) as JSON at `level`."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(logger_name))
    root = logging.getLogger("azwi_netproxy")
    root.handlers[:] = [handler]
    root.setLevel({"warning": logging.WARNING}.get(level, getattr(logging, level.upper(), 20)))
    root.propagate = False
    # httpx/httpcore log full URLs and headers at debug; keep them out of our stream.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # asyncio reports errors in protocol callbacks; they must be JSON lines too.
    loop_logger = logging.getLogger("asyncio")
    loop_logger.handlers[:] = [handler]
    loop_logger.setLevel(logging.WARNING)
    loop_logger.propagate = False


# A write(2) per event-loop turn costs as much as answering a cache hit; lines are kept
# until the flush that `schedule_flush` runs (the proxy: 50 ms later) or this many pile up.
# Not more: formatting a batch holds up every connection (about 1 µs a line), and a
# large batch's strings stay in the heap as RSS (512 lines cost 0.5 MB and p99 spikes).
MAX_BUFFERED_LINES: Final = 128
_DIGITS3: Final = tuple(f"{n:03d}" for n in range(1000))


class AccessLog:
    """One line per request, built by hand and written in batches.

    Going through logging.Logger costs several microseconds per record (record object,
    handler lock, json.dumps of a dict); at tens of thousands of answers a second that is
    the larger part of a cache hit. The line has the same shape as JsonFormatter's.
    """

    __slots__ = (
        "_fd",
        "_fields",
        "_flush_scheduled",
        "_pending",
        "_prefix",
        "_second",
        "enabled",
    )

    def __init__(self, *, enabled: bool, fd: int = 2) -> None:
        # A plain attribute, not a property: it is read for every request.
        self.enabled = enabled
        self._fd = fd
        self._pending: list[tuple[float, tuple[str, str], float]] = []
        self._flush_scheduled = False
        self._second = -1
        self._prefix = ""
        # Requests repeat (the same few token URLs); escape each once.
        self._fields: dict[tuple[str, bytes, int, str | None, str | None], tuple[str, str]] = {}

    def _format_pending(self) -> str:
        # One pass, no calls per line: this runs for every request the proxy answers.
        parts: list[str] = []
        append = parts.append
        second = self._second
        prefix = self._prefix
        for now, (head, tail), duration_ms in self._pending:
            whole = int(now)
            if whole != second:
                second = whole
                stamp = dt.datetime.fromtimestamp(whole, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
                prefix = f'{{"level":"info","timestamp":"{stamp}.'
            # Two table lookups zero-pad the microseconds in half a format spec's time.
            millis, micros = divmod(int((now - whole) * 1_000_000), 1000)
            append(f"{prefix}{_DIGITS3[millis]}{_DIGITS3[micros]}{head}{duration_ms:.3f}{tail}")
        self._second, self._prefix = second, prefix
        self._pending.clear()
        return "".join(parts)

    def fields(
        self, method: str, target: bytes, status: int, client_id: str | None, cache: str | None
    ) -> tuple[str, str]:
        """The constant parts of a line around the duration, escaped once per distinct request."""
        key = (method, target, status, client_id, cache)
        fields = self._fields.get(key)
        if fields is None:
            message = "successfully acquired token" if status == 200 and cache else "request"
            head = (
                'Z","logger":"proxy",'
                f'"caller":"server.py:access","message":"{message}","method":{json.dumps(method)},'
                f'"uri":{json.dumps(target.decode("latin-1"))},"status":{status},"duration_ms":'
            )
            tail = ""
            if client_id is not None:
                tail += f',"client_id":{json.dumps(client_id)}'
            if cache is not None:
                tail += f',"cache":{json.dumps(cache)}'
            fields = (head, tail + "}\n")
            if len(self._fields) > 2048:
                self._fields.clear()
            self._fields[key] = fields
        return fields

    def line(self, schedule_flush: Any, now: float, fields: tuple[str, str], duration_ms: float) -> None:
        """The hot path's access line: `fields` from `fields()`, kept by the caller.

        Only the values are kept here; the line is formatted when the batch is written,
        which keeps the batch small in memory between writes.
        """
        self._pending.append((now, fields, duration_ms))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            schedule_flush(self.flush)
        elif len(self._pending) >= MAX_BUFFERED_LINES:
            self._write()

    def request(
        self,
        schedule_flush: Any,
        now: float,
        method: str,
        target: bytes,
        status: int,
        duration_ms: float,
        client_id: str | None,
        cache: str | None,
    ) -> None:
        """An access line for any answer (errors, pass-through, probes)."""
        if self.enabled:
            self.line(schedule_flush, now, self.fields(method, target, status, client_id, cache), duration_ms)

    def flush(self) -> None:
        self._flush_scheduled = False
        self._write()

    def _write(self) -> None:
        if not self._pending:
            return
        data = self._format_pending().encode()
        try:
            while data:
                written = os.write(self._fd, data)
                data = data[written:]
        except BlockingIOError:
            pass  # a full, non-blocking stderr pipe: drop the rest rather than stall the loop
        except OSError:
            self.enabled = False
