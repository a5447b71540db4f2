"""`azwi-netproxy --probe`: the postStart hook's readiness wait, as upstream's.

GET /readyz on 127.0.0.1:PORT until it answers 200, for a few seconds. Stdlib only, so
the probe starts fast and needs no event loop.
"""

from __future__ import annotations

import http.client
import sys
import time
from typing import Final

PROBE_DEADLINE_S: Final = 10.0
PROBE_INTERVAL_S: Final = 0.1


def probe(port: int, *, deadline_s: float = PROBE_DEADLINE_S) -> int:
    """0 once /readyz answers 200, 1 when the deadline passes first."""
    until = time.monotonic() + deadline_s
    last = "no answer"
    while True:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
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
        time.sleep(PROBE_INTERVAL_S)
