"""One JSON object a line on stderr, in the upstream proxy's shape.

    {"level":"info","timestamp":"2025-10-06T21:53:35.850460Z","logger":"proxy",
     "caller":"app.py:88","message":"successfully acquired token","method":"GET",...}

Messages are fixed strings; values go in `extra=`. This is the only module that installs
handlers. Tokens never reach it: callers pass client IDs, paths and statuses, never
assertions or access tokens (the URI logged is the request's, which carries neither).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import stat
import struct
import termios
import time
from collections.abc import Callable
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
    # datetime.fromtimestamp's text and rounding (half even), without importing datetime
    # before the sidecar's listener is up.
    fraction, whole = math.modf(epoch_s)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    elif micros < 0:
        whole, micros = whole - 1, micros + 1_000_000
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(whole))}.{micros:06d}Z"


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


def configure(level: str, *, logger_name: str, stream: IO[str] | None = None) -> LineWriter | None:
    """Send every log record to stderr as JSON at `level`; return the writer that does it.

    Records of every level, ours and other libraries' (httpx's, asyncio's, Python warnings),
    go through one `LineWriter` on stderr, which never blocks: a container's stderr is a pipe
    whose reader may stall. With `stream` (tests) records go to it instead, blocking, and
    None is returned.
    """
    writer: LineWriter | None = None
    handler: logging.Handler
    if stream is None:
        writer = LineWriter(2)
        handler = LineHandler(writer)
    else:
        handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(logger_name))
    ours = logging.getLogger("azwi_netproxy")
    ours.handlers[:] = [handler]
    ours.setLevel({"warning": logging.WARNING}.get(level, getattr(logging, level.upper(), 20)))
    ours.propagate = False
    # httpx/httpcore log full URLs and headers at debug; keep them out of our stream.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # asyncio reports errors in protocol callbacks; they must be JSON lines too.
    loop_logger = logging.getLogger("asyncio")
    loop_logger.handlers[:] = [handler]
    loop_logger.setLevel(logging.WARNING)
    loop_logger.propagate = False
    if stream is None:
        # Everything else that logs (or warns) reaches the root logger; without a handler
        # there, logging's last resort writes to sys.stderr, which blocks on a full pipe.
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(logging.WARNING)
        logging.captureWarnings(True)
    return writer


class LineHandler(logging.Handler):
    """A logging handler that writes through a LineWriter: a record never blocks."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.writer.write((self.format(record) + "\n").encode())
        except Exception:
            self.handleError(record)


# A write(2) per event-loop turn costs as much as answering a cache hit; lines are kept
# until the flush that `schedule_flush` runs (the proxy: 50 ms later) or this many pile up.
# Not more: formatting a batch holds up every connection (about 1 µs a line), and a
# large batch's strings stay in the heap as RSS (512 lines cost 0.5 MB and p99 spikes).
MAX_BUFFERED_LINES: Final = 128
# What a slow reader of our stderr has not taken yet is kept up to this much; past it new
# lines are dropped whole, and counted, until the reader catches up.
MAX_BACKLOG_BYTES: Final = 1 << 20
_DIGITS3: Final = tuple(f"{n:03d}" for n in range(1000))
_SUB_MILLISECOND: Final = tuple(f"0.{n:03d}" for n in range(1000))
_F_GETPIPE_SZ: Final = getattr(fcntl, "F_GETPIPE_SZ", 1032)
# A pipe frees its buffer a page at a time: a partly read first page and a partly filled
# last one can hold up to two pages of room that a write cannot use.
_PIPE_SLACK_BYTES: Final = 8192


def pipe_room(fd: int) -> tuple[int, bool]:
    """Bytes a pipe (or FIFO) takes now without blocking, and whether it is empty.

    Its size minus what is queued, minus the slack; an empty pipe takes its whole size
    (every page is free), so a small pipe still makes progress.
    """
    queued: int = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    size = int(fcntl.fcntl(fd, _F_GETPIPE_SZ))
    if queued == 0:
        return size, True
    return size - queued - _PIPE_SLACK_BYTES, False


class LineWriter:
    """Whole lines to stderr, which may be a pipe nobody reads: a write never blocks.

    A container's stderr is a pipe the runtime drains. Should that reader stall, a write to
    a full pipe would block the event loop and every token answer with it: lines go out
    only as far as the pipe has room, whole lines only, and wait in a bounded backlog for
    the rest; past it new lines are dropped whole and counted. Counting the room (FIONREAD)
    rather than setting O_NONBLOCK leaves the pipe's other writers alone, and needs no
    access to a pipe another uid created.

    `ahead`, when set, returns lines that must go out before any new one (the access log's
    batch), so that lines keep their order; `schedule_flush` (the event loop's, once it
    runs) brings the backlog back later.
    """

    __slots__ = (
        "_backlog",
        "_fd",
        "_fd_is_pipe",
        "_flush_scheduled",
        "_max_backlog_bytes",
        "ahead",
        "closed",
        "dropped_lines",
        "schedule_flush",
    )

    def __init__(
        self,
        fd: int = 2,
        *,
        max_backlog_bytes: int = MAX_BACKLOG_BYTES,
        schedule_flush: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        self._fd = fd
        try:
            self._fd_is_pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
        except OSError:
            self._fd_is_pipe = False
        self._backlog = bytearray()
        self._max_backlog_bytes = max_backlog_bytes
        self._flush_scheduled = False
        self.schedule_flush = schedule_flush
        self.ahead: Callable[[], bytes] | None = None
        self.dropped_lines = 0
        # stderr is gone: nothing left to write to.
        self.closed = False

    @property
    def backlog_bytes(self) -> int:
        return len(self._backlog)

    def write(self, lines: bytes) -> None:
        """Queue `lines` (whole lines) behind what waits, and write what the pipe takes now."""
        if self.ahead is not None:
            lines = self.ahead() + lines
        if self.closed:
            return
        if lines:
            if len(self._backlog) >= self._max_backlog_bytes:
                self.dropped_lines += lines.count(b"\n")
            else:
                self._backlog += lines
        self._push()

    def flush(self) -> None:
        self._flush_scheduled = False
        self.write(b"")

    def drain(self, timeout_s: float = 2.0) -> None:
        """Write everything, waiting at most `timeout_s` for a slow reader (at shutdown)."""
        self._flush_scheduled = True  # the loop is ending: nothing more is scheduled
        self.write(b"")
        deadline = time.monotonic() + timeout_s
        while self._backlog and not self.closed and time.monotonic() < deadline:
            time.sleep(0.01)  # a pipe's room is counted, not waited for (see above)
            self._push()

    def _writable_end(self, backlog: bytearray) -> int:
        """How much of `backlog` to write now: all of it to a file; to a pipe, the whole
        lines it has room for (0: none yet). A line longer than the whole pipe would hold
        up the rest for ever: it is dropped and counted."""
        while self._fd_is_pipe and backlog:
            try:
                room, empty = pipe_room(self._fd)
            except OSError:  # not countable after all: plain writes, as to a file
                self._fd_is_pipe = False
                break
            if room >= len(backlog):
                break
            end = backlog.rfind(b"\n", 0, max(room, 0)) + 1
            if end or not empty:
                return end
            self.dropped_lines += 1
            del backlog[: backlog.find(b"\n") + 1 or len(backlog)]
        return len(backlog)

    def _push(self) -> None:
        backlog = self._backlog
        while backlog:
            end = self._writable_end(backlog)
            if end == 0:
                break  # the reader is behind: the rest waits for the next flush
            try:
                with memoryview(backlog) as view:  # released before the backlog shrinks
                    written = os.write(self._fd, view[:end])
            except BlockingIOError:
                break  # a non-blocking descriptor that is full: as above
            except OSError:
                self.closed = True
                backlog.clear()
                return
            del backlog[:written]
        if backlog and not self._flush_scheduled and self.schedule_flush is not None:
            self._flush_scheduled = True
            self.schedule_flush(self.flush)


class AccessLog:
    """One line per request, built by hand and written in batches through a LineWriter.

    Going through logging.Logger costs several microseconds per record (record object,
    handler lock, json.dumps of a dict); at tens of thousands of answers a second that is
    the larger part of a cache hit. The line has the same shape as JsonFormatter's.
    """

    __slots__ = (
        "_fields",
        "_flush_scheduled",
        "_pending",
        "_prefix",
        "_schedule_flush",
        "_second",
        "enabled",
        "writer",
    )

    def __init__(
        self,
        *,
        enabled: bool,
        schedule_flush: Callable[[Callable[[], None]], object],
        writer: LineWriter | None = None,
        fd: int = 2,
        max_backlog_bytes: int = MAX_BACKLOG_BYTES,
    ) -> None:
        # A plain attribute, not a property: it is read for every request.
        self.enabled = enabled
        # The process's one writer on stderr (logs.configure's), else one of its own.
        self.writer = writer or LineWriter(fd, max_backlog_bytes=max_backlog_bytes)
        if self.writer.schedule_flush is None:
            self.writer.schedule_flush = schedule_flush
        # Other log lines written meanwhile go out after this batch, not before it.
        self.writer.ahead = self._take_pending
        self._pending: list[tuple[float, tuple[str, str], int]] = []
        self._flush_scheduled = False
        # Runs `flush` a little later (the proxy: loop.call_later, 50 ms).
        self._schedule_flush = schedule_flush
        self._second = -1
        self._prefix = ""
        # Requests repeat (the same few token URLs); escape each once.
        self._fields: dict[tuple[str, bytes, int, str | None, str | None, str | None], tuple[str, str]] = {}

    @property
    def dropped_lines(self) -> int:
        return self.writer.dropped_lines

    def _take_pending(self) -> bytes:
        return self._format_pending().encode() if self._pending else b""

    def _format_pending(self) -> str:
        # One pass over the batch: this runs for every request the proxy answers. Integer
        # arithmetic and table lookups instead of format specs (`:.3f` alone cost about
        # 250 ns a line); the timestamp up to its millisecond is built once per millisecond
        # (at tens of thousands of answers a second, dozens of lines share it), and a
        # duration under a millisecond, a cache hit's, is one lookup.
        parts: list[str] = []
        second = self._second
        prefix = self._prefix
        digits = _DIGITS3
        sub_millisecond = _SUB_MILLISECOND
        millisecond = -1
        stamp = ""
        for now, (head, tail), duration_us in self._pending:
            micros = int(now * 1_000_000)
            if micros // 1000 != millisecond:
                millisecond = micros // 1000
                whole = millisecond // 1000
                if whole != second:
                    second = whole
                    date = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
                    prefix = f'{{"level":"info","timestamp":"{date}.'
                stamp = prefix + digits[millisecond % 1000]
            if duration_us < 1000:
                duration = sub_millisecond[duration_us]
            else:
                millis, rest = divmod(duration_us, 1000)
                duration = f"{millis}.{digits[rest]}"
            parts += (stamp, digits[micros % 1000], head, duration, tail)
        self._second, self._prefix = second, prefix
        self._pending.clear()
        return "".join(parts)

    def fields(
        self,
        method: str,
        target: bytes,
        status: int,
        client_id: str | None,
        cache: str | None,
        pod: str | None = None,
    ) -> tuple[str, str]:
        """The constant parts of a line around the duration, escaped once per distinct request.

        `pod` (node mode: namespace/name) names the pod the request came from.
        """
        key = (method, target, status, client_id, cache, pod)
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
            if pod is not None:
                tail += f',"pod":{json.dumps(pod)}'
            fields = (head, tail + "}\n")
            if len(self._fields) > 2048:
                self._fields.clear()
            self._fields[key] = fields
        return fields

    def line(self, now: float, fields: tuple[str, str], duration_us: int) -> None:
        """The hot path's access line: `fields` from `fields()`, kept by the caller.

        Only the values are kept here; the line is formatted when the batch is written,
        which keeps the batch small in memory between writes.
        """
        self._pending.append((now, fields, duration_us))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._schedule_flush(self.flush)
        elif len(self._pending) >= MAX_BUFFERED_LINES:
            self._write()

    def request(
        self,
        now: float,
        method: str,
        target: bytes,
        status: int,
        duration_us: int,
        client_id: str | None,
        cache: str | None,
        pod: str | None = None,
    ) -> None:
        """An access line for any answer (errors, pass-through, probes)."""
        if self.enabled:
            self.line(now, self.fields(method, target, status, client_id, cache, pod), duration_us)

    def flush(self) -> None:
        self._flush_scheduled = False
        self._write()

    def drain(self, timeout_s: float = 2.0) -> None:
        """Write everything, waiting at most `timeout_s` for a slow reader (at shutdown)."""
        self._flush_scheduled = True  # the loop is ending: nothing more is scheduled
        self.writer.drain(timeout_s)

    def _write(self) -> None:
        self.writer.write(b"")  # the batch comes first through `ahead`
        if self.writer.closed:
            self.enabled = False
