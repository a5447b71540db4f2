"""`azwi-netproxy --probe`: the postStart hook's readiness wait, as upstream's.

GET /readyz on 127.0.0.1:PORT until it answers 200. CONTRACT.md: give up with a non-zero
exit within 10 s of the process's own start, interpreter start included, so the deadline
is counted from the kernel's record of when this process began, not from when this code
first runs. A socket and the answer's status line, no HTTP client library: this process
starts beside the sidecar and shares its CPU while the sidecar starts (http.client brings
email, ssl and urllib.parse, 30 ms of CPU), and the app's container waits for both.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from typing import Final

# Under the contract's 10 s, with room for the last attempt's stderr line and the exit.
PROBE_DEADLINE_S: Final = 9.5
# The app's container starts when this returns: a 100 ms wait between attempts put on
# average 50 ms more between the proxy's first /readyz and the app's start. A refused
# connection costs both sides tens of microseconds, so ask often.
PROBE_INTERVAL_S: Final = 0.01
_ATTEMPT_TIMEOUT_S: Final = 1.0


def seconds_since_process_start() -> float:
    """How long ago the kernel started this process (0.0 where /proc cannot tell)."""
    try:
        with open("/proc/self/stat", "rb") as handle:
            stat = handle.read()
        # Field 22, counted after the command name's closing parenthesis (it may hold spaces).
        start_ticks = int(stat[stat.rindex(b")") + 2 :].split()[19])
        since_boot_s = time.clock_gettime(time.CLOCK_BOOTTIME)
        return max(since_boot_s - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


def probe(port: int, *, deadline_s: float = PROBE_DEADLINE_S, elapsed_s: float = 0.0) -> int:
    """0 once /readyz answers 200, 1 when `deadline_s` passes first; `elapsed_s` of it are
    already gone (the command line passes `seconds_since_process_start()`)."""
    until = time.monotonic() + deadline_s - elapsed_s
    last = "no answer"
    while True:
        # At least one attempt, however late, and long enough for an answer: a last attempt cut
        # to a few ms would report its own timeout instead of what the server last answered.
        remaining = max(until - time.monotonic(), 0.1)
        try:
            status = _readyz_status(port, min(_ATTEMPT_TIMEOUT_S, remaining))
            if status == 200:
                return 0
            last = f"HTTP {status}" if status else "not an HTTP answer"
        except OSError as exc:
            last = exc.strerror or type(exc).__name__
        if time.monotonic() >= until:
            sys.stderr.write(f"azwi-netproxy: probe of 127.0.0.1:{port}/readyz failed: {last}\n")
            return 1
        time.sleep(max(min(PROBE_INTERVAL_S, until - time.monotonic()), 0.0))


def _readyz_status(port: int, timeout_s: float) -> int:
    """The status of one GET /readyz (0: the answer did not start with an HTTP status line).

    Raises:
        OSError: no connection, or no status line within `timeout_s`.
    """
    # A socket of its own, not create_connection: its getaddrinfo loads the idna codec.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = b""
        while b"\r\n" not in answer and len(answer) < 4096:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        # Then the rest, to the server's close (Connection: close): closing with it unread
        # would reset the connection under the server's feet. Not worth a failure.
        with contextlib.suppress(OSError):
            while sock.recv(4096):
                pass
    version, _, rest = answer.partition(b" ")
    code = rest[:3]
    if not version.startswith(b"HTTP/1.") or not code.isdigit():
        return 0
    return int(code)
