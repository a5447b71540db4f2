"""Pass-through of non-token paths to the node's real IMDS, as the upstream proxy does.

The destination is fixed (METADATA_IP:METADATA_PORT): the request's Host, absolute-form
target or headers can never steer it elsewhere. The client's own headers go with it,
hop-by-hop headers and X-Forwarded-For dropped both ways, Host set to the destination (as
upstream sets it), and nothing is added but the loop marker. The proxy's own connection is exempt from the NAT
redirect only while it runs as PROXY_UID; if it is not (a pod-level runAsUser, say), the
request comes back to this very server. A per-process nonce header catches that: the server
answers it with 508 at once, and this module turns the 508 into a clear PassthroughLoop error.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Final

from azwi_netproxy.errors import BadRequest, PassthroughLoop, UpstreamUnavailable
from azwi_netproxy.proxy.outbound import KEEPALIVE_EXPIRY_S, send_once_more_if_dropped
from azwi_netproxy.proxy.wire import Request, Response

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

LOOP_HEADER: Final = b"x-azwi-netproxy-loop"
LOOP_DETECTED: Final = b"detected"
_HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"x-forwarded-for",
        # Set from the destination, METADATA_IP:METADATA_PORT, as upstream sets it (and what
        # a pod's client sent anyway: the redirect keeps the address it connected to).
        b"host",
        # Framing: httpx sets it for the body it sends (a chunked one arrives de-chunked).
        b"content-length",
        LOOP_HEADER,
    }
)
_MAX_RESPONSE_BYTES: Final = 1024 * 1024
_TIMEOUTS: Final = {"connect": 3.0, "read": 10.0, "write": 10.0, "pool": 10.0}


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    """Header names listed in Connection are hop-by-hop too (RFC 9110, section 7.6.1)."""
    named: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    return named


def forwardable(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    extra = _connection_tokens(headers)
    return [(n, v) for n, v in headers if n.lower() not in _HOP_BY_HOP and n.lower() not in extra]


class Passthrough:
    """Forwards requests to the fixed IMDS address over httpx's own transport (httpcore).

    The transport, not httpx.AsyncClient: a client adds its default headers (Accept,
    Accept-Encoding, User-Agent, Connection) to every request, and a pass-through must send
    the client's own headers and nothing else (CONTRACT.md). httpx.Request adds only what
    HTTP/1.1 framing needs: Host (the destination's), Content-Length for a body.
    """

    def __init__(self, metadata_ip: str, metadata_port: int, *, run_as_uid: int) -> None:
        # os.urandom rather than secrets: the same source, without importing hmac and friends.
        self.nonce = os.urandom(16).hex().encode()
        self._ip = metadata_ip
        self._port = metadata_port
        self._uid = run_as_uid
        self._transport: httpx.AsyncHTTPTransport | None = None

    def _http(self) -> httpx.AsyncHTTPTransport:
        if self._transport is None:
            import httpx

            # No environment proxies: the destination is the link-local IMDS, never a proxy.
            # Plain HTTP only (the URL is built here, redirects are never followed), so no
            # TLS context needs a trust store: verify=True would load certifi's bundle into
            # one, about 1 MB of every pod's memory for nothing.
            self._transport = httpx.AsyncHTTPTransport(
                trust_env=False,
                verify=False,
                limits=httpx.Limits(max_keepalive_connections=2, keepalive_expiry=KEEPALIVE_EXPIRY_S),
            )
        return self._transport

    def is_own_loop(self, request: Request) -> bool:
        return any(n == LOOP_HEADER and v == self.nonce for n, v in request.headers)

    async def forward(self, request: Request, path: str, query: str) -> Response:
        """Send `request` to IMDS with `path` and `query`, return its answer.

        Raises:
            PassthroughLoop: the request came back to this proxy.
            UpstreamUnavailable: IMDS cannot be reached or answered too much.
        """
        import httpx

        transport = self._http()
        raw_path = path.encode("latin-1", "replace") + (
            b"?" + query.encode("latin-1", "replace") if query else b""
        )
        try:
            url = httpx.URL(scheme="http", host=self._ip, port=self._port, raw_path=raw_path)
        except httpx.InvalidURL:
            raise BadRequest("The request target cannot be passed through") from None
        headers = forwardable(request.headers)
        headers.append((LOOP_HEADER, self.nonce))
        outbound = httpx.Request(
            request.method,
            url,
            headers=headers,
            content=request.body or None,
            extensions={"timeout": _TIMEOUTS},
        )
        try:
            response = await send_once_more_if_dropped(transport.handle_async_request, outbound)
            try:
                body = bytearray()
                # Raw: the answer's body is relayed as IMDS sent it, Content-Encoding and all.
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) > _MAX_RESPONSE_BYTES:
                        raise UpstreamUnavailable("The instance metadata answer is too large")
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(
                f"Cannot reach the instance metadata service at {self._ip}:{self._port} "
                f"({type(exc).__name__}: {exc})",
                retry_after_s=5,
            ) from exc
        if response.status_code == 508 and response.headers.get("x-azwi-netproxy-loop") == "detected":
            raise PassthroughLoop(
                f"Pass-through loop: this proxy's own request to {self._ip}:{self._port} was "
                f"redirected back to it. It runs as uid {self._uid}, which the init's rules do "
                "not exempt: run the proxy as PROXY_UID (a pod-level runAsUser may override "
                "the sidecar's user)"
            )
        out_headers = forwardable([(k.lower(), v) for k, v in response.headers.raw])
        content_type = b"application/octet-stream"
        rest: list[tuple[bytes, bytes]] = []
        for name, value in out_headers:
            if name == b"content-type":
                content_type = value
            elif name not in (b"date", b"server"):
                rest.append((name, value))
        return Response(response.status_code, bytes(body), content_type, rest or None)

    async def aclose(self) -> None:
        if self._transport is not None:
            await self._transport.aclose()
