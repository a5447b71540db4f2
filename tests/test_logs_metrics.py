"""Log line shapes (JsonFormatter, AccessLog) and the Prometheus exposition.

Name: test_logs_metrics
Scope: unit tests; the access log writes to an os.pipe, the formatter to a StringIO.
Depends: azwi_netproxy.logs, azwi_netproxy.proxy.metrics (prometheus-client at render time).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import inspect
import io
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from azwi_netproxy import logs
from azwi_netproxy.logs import MAX_BUFFERED_LINES, AccessLog, JsonFormatter, rfc3339
from azwi_netproxy.proxy.metrics import Metrics

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
RFC3339_MICRO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """Name: captured. Scope: function. A package logger writing JsonFormatter lines to a buffer."""
    logger = logging.getLogger("azwi_netproxy.tests.logs")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("proxy"))
    saved = (logger.handlers[:], logger.level, logger.propagate)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, stream
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_formatter_shape(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    frame = inspect.currentframe()
    assert frame is not None
    line = frame.f_lineno + 1
    logger.info("successfully acquired token", extra={"client_id": "abc", "status": 200})
    [entry] = _lines(stream)
    assert list(entry)[:5] == ["level", "timestamp", "logger", "caller", "message"]
    assert entry["level"] == "info"
    assert RFC3339_MICRO_Z.match(entry["timestamp"])
    assert entry["logger"] == "proxy"
    assert entry["caller"] == f"test_logs_metrics.py:{line}"
    assert entry["message"] == "successfully acquired token"
    assert (entry["client_id"], entry["status"]) == ("abc", 200)
    assert stream.getvalue().count("\n") == 1


LEVELS = [
    (logging.DEBUG, "debug"),
    (logging.INFO, "info"),
    (logging.WARNING, "warn"),
    (logging.ERROR, "error"),
    (logging.CRITICAL, "fatal"),
]


@pytest.mark.parametrize(("level", "name"), LEVELS, ids=[n for _, n in LEVELS])
def test_json_formatter_levels(captured: tuple[logging.Logger, io.StringIO], level: int, name: str) -> None:
    logger, stream = captured
    logger.log(level, "m")
    assert _lines(stream)[0]["level"] == name


def test_json_formatter_exception_and_odd_values(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        logger.exception("failed: %s", "x", extra={"obj": object(), "text": 'quote " and \n newline'})
    raw = stream.getvalue()
    assert raw.count("\n") == 1  # one object per line, whatever the values hold
    [entry] = _lines(stream)
    assert entry["message"] == "failed: x"
    assert "ValueError: boom" in entry["error"]
    assert entry["obj"].startswith("<object object")
    assert entry["text"] == 'quote " and \n newline'


def test_rfc3339() -> None:
    assert rfc3339(1_700_000_000.5) == "2023-11-14T22:13:20.500000Z"
    assert rfc3339(0) == "1970-01-01T00:00:00.000000Z"


def test_rfc3339_matches_datetime_rounding() -> None:
    # rfc3339 no longer goes through datetime (not imported before the listener is up);
    # datetime judges it, half-microsecond ties and carries into the next second included.
    judge = random.Random(25)
    stamps = [1.9999996, 1.0000005, 1.0000015, 2**31 + 0.9999999, 1_796_607_134.7431524, -0.5, -1.0000005]
    for _ in range(20_000):
        whole = judge.randrange(0, 4_000_000_000)
        stamps += [whole + judge.random(), whole + (judge.randrange(1_000_000) + 0.5) / 1e6]
    for stamp in stamps:
        expected = dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert rfc3339(stamp) == expected, stamp


@pytest.fixture
def restore_package_logger() -> Iterator[None]:
    """Name: restore_package_logger. Scope: function. Undo logs.configure's global changes."""
    names = ("azwi_netproxy", "httpx", "httpcore", "asyncio")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level, logging.getLogger(n).propagate)
             for n in names}
    try:
        yield
    finally:
        for name, (handlers, level, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


@pytest.mark.usefixtures("restore_package_logger")
def test_configure_level_and_stream() -> None:
    stream = io.StringIO()
    logs.configure("warning", logger_name="proxy-init", stream=stream)
    logger = logging.getLogger("azwi_netproxy.proxy.app")
    logger.info("hidden")
    logger.warning("shown", extra={"path": "/x"})
    [entry] = _lines(stream)
    assert (entry["message"], entry["level"], entry["logger"], entry["path"]) == ("shown", "warn", "proxy-init", "/x")
    assert logging.getLogger("httpx").level == logging.WARNING


@pytest.mark.usefixtures("restore_package_logger")
def test_configure_twice_keeps_one_handler() -> None:
    stream = io.StringIO()
    logs.configure("info", logger_name="proxy", stream=stream)
    logs.configure("debug", logger_name="proxy", stream=stream)
    logging.getLogger("azwi_netproxy.x").debug("once")
    assert len(_lines(stream)) == 1


# ---- access log -------------------------------------------------------------------------


class _Pipe:
    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)

    def read(self) -> bytes:
        try:
            return os.read(self.read_fd, 1 << 20)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


@pytest.fixture
def pipe() -> Iterator[_Pipe]:
    """Name: pipe. Scope: function. An os.pipe the access log writes to."""
    p = _Pipe()
    try:
        yield p
    finally:
        p.close()


class _CallSoon:
    """Records callbacks instead of scheduling them; the test runs them."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], None]] = []

    def __call__(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)

    def run(self) -> None:
        callbacks, self.callbacks = self.callbacks, []
        for callback in callbacks:
            callback()


def _request(log: AccessLog, **overrides: Any) -> None:
    fields: dict[str, Any] = {
        "now": 1_700_000_000.25,
        "method": "GET",
        "target": b"/metadata/identity/oauth2/token?api-version=1&resource=x",
        "status": 200,
        "duration_us": 1235,
        "client_id": "11111111-1111-1111-1111-111111111111",
        "cache": "hit",
    }
    fields.update(overrides)
    log.request(**fields)


def test_access_line_shape(pipe: _Pipe) -> None:
    call_soon = _CallSoon()
    log = AccessLog(enabled=True, schedule_flush=call_soon, fd=pipe.write_fd)
    _request(log)
    assert pipe.read() == b""  # written once per loop turn, not per request
    call_soon.run()
    raw = pipe.read()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    entry = json.loads(raw)
    assert list(entry) == [
        "level", "timestamp", "logger", "caller", "message", "method", "uri", "status", "duration_ms",
        "client_id", "cache",
    ]
    assert entry["level"] == "info"
    assert entry["timestamp"] == "2023-11-14T22:13:20.250000Z"
    assert RFC3339_MICRO_Z.match(entry["timestamp"])
    assert entry["logger"] == "proxy"
    assert entry["message"] == "successfully acquired token"
    assert entry["uri"] == "/metadata/identity/oauth2/token?api-version=1&resource=x"
    assert (entry["status"], entry["duration_ms"], entry["cache"]) == (200, 1.235, "hit")


@pytest.mark.parametrize(
    ("now", "duration_us", "timestamp", "duration"),
    [
        (1_700_000_000.0, 0, "2023-11-14T22:13:20.000000Z", b'"duration_ms":0.000,'),
        (1_700_000_000.000001, 999, "2023-11-14T22:13:20.000001Z", b'"duration_ms":0.999,'),
        (1_700_000_000.999999, 1000, "2023-11-14T22:13:20.999999Z", b'"duration_ms":1.000,'),
        (1_700_000_059.5, 1_234_567, "2023-11-14T22:14:19.500000Z", b'"duration_ms":1234.567,'),
    ],
)
def test_access_line_timestamp_and_duration_digits(
    pipe: _Pipe, now: float, duration_us: int, timestamp: str, duration: bytes
) -> None:
    call_soon = _CallSoon()
    log = AccessLog(enabled=True, schedule_flush=call_soon, fd=pipe.write_fd)
    _request(log, now=now, duration_us=duration_us)
    call_soon.run()
    raw = pipe.read()
    assert duration in raw  # three decimals, as the upstream logger writes milliseconds
    assert json.loads(raw)["timestamp"] == timestamp


def test_one_batch_across_milliseconds_and_seconds_keeps_every_timestamp(pipe: _Pipe) -> None:
    call_soon = _CallSoon()
    log = AccessLog(enabled=True, schedule_flush=call_soon, fd=pipe.write_fd)
    times = [1_700_000_000.0005, 1_700_000_000.0009, 1_700_000_000.0015, 1_700_000_001.0005, 1_700_000_001.0005]
    for n, now in enumerate(times):
        _request(log, now=now, duration_us=n * 600)
    call_soon.run()
    entries = [json.loads(line) for line in pipe.read().splitlines()]
    assert [e["timestamp"] for e in entries] == [
        "2023-11-14T22:13:20.000500Z",
        "2023-11-14T22:13:20.000900Z",
        "2023-11-14T22:13:20.001500Z",
        "2023-11-14T22:13:21.000500Z",
        "2023-11-14T22:13:21.000500Z",
    ]
    assert [e["duration_ms"] for e in entries] == [0.0, 0.6, 1.2, 1.8, 2.4]


def test_access_line_without_client_or_cache_and_odd_target(pipe: _Pipe) -> None:
    call_soon = _CallSoon()
    log = AccessLog(enabled=True, schedule_flush=call_soon, fd=pipe.write_fd)
    target = b'/metadata/instance?x="q"\\\xff'
    _request(log, target=target, status=404, client_id=None, cache=None, method='G"T')
    call_soon.run()
    entry = json.loads(pipe.read())
    assert "client_id" not in entry and "cache" not in entry
    assert entry["message"] == "request"
    assert entry["uri"] == target.decode("latin-1")
    assert entry["method"] == 'G"T'


def test_access_log_batches_lines_per_turn(pipe: _Pipe) -> None:
    call_soon = _CallSoon()
    log = AccessLog(enabled=True, schedule_flush=call_soon, fd=pipe.write_fd)
    for status in (200, 400, 503):
        _request(log, status=status)
    assert len(call_soon.callbacks) == 1
    call_soon.run()
    assert [json.loads(line)["status"] for line in pipe.read().splitlines()] == [200, 400, 503]
    _request(log)
    assert len(call_soon.callbacks) == 1  # a new turn schedules a new flush


def test_access_log_disabled_writes_nothing(pipe: _Pipe) -> None:
    call_soon = _CallSoon()
    log = AccessLog(enabled=False, schedule_flush=call_soon, fd=pipe.write_fd)
    _request(log)
    assert call_soon.callbacks == []
    log.flush()
    assert pipe.read() == b""


def test_access_log_turns_itself_off_when_stderr_is_gone(pipe: _Pipe) -> None:
    call_soon = _CallSoon()
    # Writing to the pipe's read end fails with EBADF, as a closed stderr would.
    log = AccessLog(enabled=True, schedule_flush=call_soon, fd=pipe.read_fd)
    _request(log)
    call_soon.run()  # EBADF: must not raise out of a loop callback
    assert log.enabled is False


def _small_pipe() -> _Pipe:
    """A blocking pipe of 4 pages, as a container's stderr is blocking: a write that does
    not fit would hang the test (and the proxy's event loop)."""
    p = _Pipe()
    fcntl.fcntl(p.write_fd, F_SETPIPE_SZ, 16384)
    assert os.get_blocking(p.write_fd)
    return p


def _read_all(p: _Pipe) -> bytes:
    out = b""
    while chunk := p.read():
        out += chunk
    return out


def test_a_stalled_reader_never_blocks_and_never_gets_a_torn_line() -> None:
    p = _small_pipe()
    try:
        call_soon = _CallSoon()
        log = AccessLog(enabled=True, schedule_flush=call_soon, fd=p.write_fd, max_backlog_bytes=20_000)
        fields = log.fields("GET", b"/metadata/identity/oauth2/token?n=1", 200, "c", "hit")
        total = 1000  # about 200 KB: far more than the pipe and the backlog hold
        for n in range(total):
            log.line(1_700_000_000 + n / 1000, fields, n * 1000)
        call_soon.run()
        # Nothing blocked; the pipe is full, a bounded backlog waits, the rest was dropped.
        assert 0 < log.dropped_lines < total
        assert 0 < log.writer.backlog_bytes <= 20_000 + MAX_BUFFERED_LINES * 300
        assert len(call_soon.callbacks) == 1  # the backlog comes back on the next flush
        received = _read_all(p)
        while call_soon.callbacks:  # the reader catches up
            call_soon.run()
            received += _read_all(p)
        assert not log.writer.backlog_bytes and log.enabled
        lines = [json.loads(line) for line in received.splitlines()]  # every line whole
        assert len(lines) == total - log.dropped_lines
        durations = [entry["duration_ms"] for entry in lines]
        assert durations == sorted(durations)  # in order, drops only in whole batches
        log.line(1_700_000_002.0, fields, 500)  # and logging goes on
        call_soon.run()
        assert json.loads(_read_all(p))["duration_ms"] == 0.5
    finally:
        p.close()


def test_drain_at_shutdown_waits_for_a_slow_reader_but_not_forever() -> None:
    p = _small_pipe()
    try:
        call_soon = _CallSoon()
        log = AccessLog(enabled=True, schedule_flush=call_soon, fd=p.write_fd)
        fields = log.fields("GET", b"/readyz", 200, None, None)
        for n in range(100):
            log.line(1_700_000_000.0, fields, n * 1000)
        received: list[bytes] = []
        drained = threading.Event()

        def late_reader() -> None:
            time.sleep(0.2)
            while not drained.is_set():
                received.append(_read_all(p))
                time.sleep(0.005)

        reader = threading.Thread(target=late_reader)
        reader.start()
        log.drain(timeout_s=5.0)  # the pipe is full until the reader comes, 0.2 s later
        drained.set()
        reader.join()
        received.append(_read_all(p))
        assert len(b"".join(received).splitlines()) == 100
        started = time.monotonic()
        for n in range(100):
            log.line(1_700_000_000.0, fields, n * 1000)
        log.drain(timeout_s=0.3)  # nobody reads any more: give up after the timeout
        assert 0.25 < time.monotonic() - started < 2.0
    finally:
        p.close()


def test_a_one_page_pipe_still_gets_lines_and_a_line_longer_than_it_is_dropped() -> None:
    # Past the per-user pipe budget the kernel hands out small pipes: room is counted
    # against the slack only while the pipe holds something, so lines still go through.
    p = _Pipe()
    try:
        fcntl.fcntl(p.write_fd, F_SETPIPE_SZ, 4096)
        call_soon = _CallSoon()
        log = AccessLog(enabled=True, schedule_flush=call_soon, fd=p.write_fd)
        small = log.fields("GET", b"/readyz", 200, None, None)
        huge = log.fields("GET", b"/metadata/instance?q=" + b"a" * 6000, 404, None, None)
        for duration, fields in ((1000, small), (2000, huge), (3000, small), (4000, small)):
            log.line(1_700_000_000.0, fields, duration)
        received = b""
        for _ in range(20):
            log.flush()
            received += _read_all(p)
        assert [json.loads(line)["duration_ms"] for line in received.splitlines()] == [1.0, 3.0, 4.0]
        assert log.dropped_lines == 1 and not log.writer.backlog_bytes
    finally:
        p.close()


def test_a_file_gets_every_line_in_one_write(tmp_path: Any) -> None:
    with open(tmp_path / "stderr", "wb") as regular:
        call_soon = _CallSoon()
        log = AccessLog(enabled=True, schedule_flush=call_soon, fd=regular.fileno(), max_backlog_bytes=1000)
        fields = log.fields("GET", b"/readyz", 200, None, None)
        for n in range(500):  # far past the backlog bound: a file never holds anything back
            log.line(1_700_000_000.0, fields, n * 1000)
        call_soon.run()
        assert log.dropped_lines == 0 and not log.writer.backlog_bytes
    assert len((tmp_path / "stderr").read_bytes().splitlines()) == 500


# ---- metrics ----------------------------------------------------------------------------

FAMILIES = [
    ("azwi_netproxy_passthrough_refused_total", "counter"),
    ("azwi_netproxy_requests_total", "counter"),
    ("azwi_netproxy_exchanges_total", "counter"),
    ("azwi_netproxy_cache_events_total", "counter"),
    ("azwi_netproxy_exchange_duration_seconds", "histogram"),
    ("azwi_netproxy_cached_tokens", "gauge"),
    ("azwi_netproxy_earliest_token_expiry_seconds", "gauge"),
    ("azwi_netproxy_log_dropped_lines_total", "counter"),
]


def test_metrics_render_families_and_values() -> None:
    metrics = Metrics()
    metrics.count_request("token", 200)  # a 200 after a miss
    metrics.token_ok += 4  # cache hits: counted apart, one family when scraped
    metrics.count_request("passthrough", 503)
    metrics.count_exchange("success", 0.03)
    metrics.count_exchange("throttled", 12.0)
    metrics.count_cache("miss")
    metrics.cache_hits = lambda: 4
    metrics.cached_tokens = lambda: 3
    metrics.log_lines_dropped = lambda: 7
    metrics.earliest_expiry = lambda: time.time() + 100
    body, content_type = metrics.render()
    text = body.decode()
    assert content_type.startswith(b"text/plain")
    for family, kind in FAMILIES:
        assert f"# TYPE {family} {kind}\n" in text, family
    assert 'azwi_netproxy_requests_total{route="token",status="200"} 5.0' in text
    assert 'azwi_netproxy_requests_total{route="passthrough",status="503"} 1.0' in text
    assert 'azwi_netproxy_exchanges_total{outcome="success"} 1.0' in text
    assert 'azwi_netproxy_cache_events_total{event="hit"} 4.0' in text
    assert 'azwi_netproxy_cache_events_total{event="miss"} 1.0' in text
    assert 'azwi_netproxy_exchange_duration_seconds_bucket{le="0.05"} 1.0' in text
    assert 'azwi_netproxy_exchange_duration_seconds_bucket{le="10.0"} 1.0' in text
    assert 'azwi_netproxy_exchange_duration_seconds_bucket{le="+Inf"} 2.0' in text
    assert "azwi_netproxy_exchange_duration_seconds_count 2.0" in text
    assert "azwi_netproxy_cached_tokens 3.0" in text
    assert "azwi_netproxy_log_dropped_lines_total 7.0" in text
    [expiry] = re.findall(r"^azwi_netproxy_earliest_token_expiry_seconds ([0-9.e+]+)$", text, re.M)
    assert 95 < float(expiry) <= 100


def test_metrics_empty_cache_has_no_expiry_sample() -> None:
    text = Metrics().render()[0].decode()
    assert "# TYPE azwi_netproxy_earliest_token_expiry_seconds gauge" in text
    assert not re.search(r"^azwi_netproxy_earliest_token_expiry_seconds ", text, re.M)
    assert "azwi_netproxy_cached_tokens 0.0" in text


def test_metrics_render_twice_is_stable() -> None:
    metrics = Metrics()
    metrics.count_request("ready", 200)
    first = metrics.render()[0].decode()
    metrics.count_request("ready", 200)
    second = metrics.render()[0].decode()
    assert 'azwi_netproxy_requests_total{route="ready",status="200"} 1.0' in first
    assert 'azwi_netproxy_requests_total{route="ready",status="200"} 2.0' in second


def test_access_lines_keep_their_order_and_a_full_batch_is_written_at_once(tmp_path: Any) -> None:
    from azwi_netproxy.logs import MAX_BUFFERED_LINES

    path = tmp_path / "stderr"
    with open(path, "wb") as sink:
        scheduled: list[Any] = []
        log = AccessLog(enabled=True, schedule_flush=scheduled.append, fd=sink.fileno())
        fields = log.fields("GET", b"/metadata/identity/oauth2/token?x=1", 200, "c", "hit")
        log.line(1_800_000_000.25, fields, 500)
        log.request(1_800_000_000.5, "GET", b"/readyz", 200, 100, None, None)
        log.line(1_800_000_001.75, fields, 700)
        assert len(scheduled) == 1  # one flush scheduled for the whole batch
        scheduled[0]()
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert [(e["uri"], e["timestamp"]) for e in lines] == [
            ("/metadata/identity/oauth2/token?x=1", "2027-01-15T08:00:00.250000Z"),
            ("/readyz", "2027-01-15T08:00:00.500000Z"),
            ("/metadata/identity/oauth2/token?x=1", "2027-01-15T08:00:01.750000Z"),
        ]
        # A batch that fills up is written without waiting for the scheduled flush.
        for _ in range(MAX_BUFFERED_LINES + 1):
            log.line(1_800_000_002.0, fields, 100)
        assert len(path.read_text().splitlines()) >= 3 + MAX_BUFFERED_LINES
