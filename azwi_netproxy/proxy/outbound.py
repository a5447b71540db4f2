"""The sidecar's outbound connections (the token exchange, the pass-through): how long an idle
pooled connection is trusted, and when a request is sent once more.

Both go through httpx's own transport (httpcore), whose pool expires idle connections
after `KEEPALIVE_EXPIRY_S` and drops those the server has closed. What it does not do is
send again a request that died on a reused connection before any byte of the answer came
back, the race in which the server closes an idle connection just as it is reused:
`send_once_more_if_dropped` does, for requests that are safe to repeat.

Must not know: Entra, IMDS, our error tree (callers map httpx's errors), the event loop.
httpx is imported by the callers once the server listens, never at start-up.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

# An idle pooled connection is not reused after this long. A NAT on the way may forget an
# idle flow without telling either end (Azure's SNAT after 4 minutes): a request sent on
# such a connection is never answered and waits out the whole read timeout.
KEEPALIVE_EXPIRY_S: Final = 60.0
# RFC 9110, section 9.2.2: what a client may repeat on its own. The token exchange (a POST)
# is repeated by its caller, which knows that a client-credentials grant is.
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


async def send_once_more_if_dropped(
    send: Callable[[httpx.Request], Awaitable[httpx.Response]],
    request: httpx.Request,
    *,
    repeatable: bool | None = None,
) -> httpx.Response:
    """`send(request)`; if a reused connection failed before the answer's head, once more.

    `send` returns when the head of the answer is in (a transport's handle_async_request,
    or AsyncClient.send with stream=True), so a failure inside it is one before any byte
    of the answer was read. Only a connection taken from the pool is worth a second try
    (httpcore's `trace` extension tells: no connect_tcp event means one was reused): a new
    connection that fails is the server's answer, and the caller's retries (spaced, counted)
    deal with it. The pool has discarded the broken connection, so the second try opens a
    new one. `repeatable` defaults to the method's idempotence.

    Raises:
        httpx.HTTPError: what the second try (or a single one) raised.
    """
    import httpx

    if repeatable is None:
        repeatable = request.method in IDEMPOTENT_METHODS
    connected: list[str] = []
    outer_trace = request.extensions.get("trace")

    async def trace(event: str, info: dict[str, Any]) -> None:
        if event.endswith((".connect_tcp.started", ".connect_unix_socket.started")):
            connected.append(event)
        if outer_trace is not None:
            await outer_trace(event, info)

    request.extensions = {**request.extensions, "trace": trace}
    try:
        return await send(request)
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
        if not repeatable or connected:
            raise
        log.debug(
            "a kept-alive connection failed before the answer arrived: sending once more",
            extra={"host": request.url.host, "error": type(exc).__name__},
        )
    return await send(request)
