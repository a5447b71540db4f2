"""`azwi-netproxy --probe`: the postStart hook's readiness wait, as upstream's.

GET /readyz on 127.0.0.1:PORT until it answers 200. CONTRACT.md: give up with a non-zero
exit within 10 s of the process's own start, interpreter start included, so the deadline
is counted from the kernel's record of when this process began, not from when this code
first runs. Stdlib only, so the probe starts fast and needs no event loop.
"""

from __future__ import annotations

import http.client
import os
import sys
import time
from typing import Final

# Under the contract's 10 s, with room for the last attempt's stderr line and the exit.
PROBE_DEADLINE_S: Final = 9.5
PROBE_INTERVAL_S: Final = 0.1
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
        remaining = max(until - time.monotonic(), 0.01)  # at least one attempt, however late
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=min(_ATTEMPT_TIMEOUT_S, remaining))
        try:
            connection.request("GET", "/readyz")
            response = connection.getresponse()
            response.read()
            if response.status == 200:
                return 0
            last = f"HTTP {response.status}"
        except OSError as exc:
            last = exc.strerror or type(exc).__name__
        finally:
            connection.close()
        if time.monotonic() >= until:
            sys.stderr.write(f"azwi-netproxy: probe of 127.0.0.1:{port}/readyz failed: {last}\n")
            return 1
        time.sleep(max(min(PROBE_INTERVAL_S, until - time.monotonic()), 0.0))
