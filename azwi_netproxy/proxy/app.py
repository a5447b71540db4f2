"""The request handler: imds → router → cache → entra, and THE one place errors become answers.

Every request takes one path: `dispatch` judges it (route, method, headers, query, identity)
and answers it. It returns a Response when it can answer without I/O (a cache hit, an error,
a probe) and a coroutine otherwise (a miss, a pass-through), so the server answers hits
without creating a task. `error_response` renders every error body the sidecar sends: the
server's own (a broken request, a crash) reach it through `refuse`.

One memo, `_targets` (bounded): what a request target means (its route, and for the token
path its cache key, client ID and resource) does not depend on anything else in the
request, so it is judged once per distinct target; the entry also keeps the last 200 body
rendered for it, reused while the token and the second it was rendered in are the same,
and the constant parts of its access lines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

from azwi_netproxy.errors import (
    BadRequest,
    IdentityRejected,
    MalformedRequest,
    MethodNotAllowed,
    NetproxyError,
    NotFound,
    NotReady,
    PassthroughLoop,
    PassthroughRefused,
    UpstreamError,
)
from azwi_netproxy.logs import AccessLog
from azwi_netproxy.proxy import imds
from azwi_netproxy.proxy.cache import TokenCache
from azwi_netproxy.proxy.metrics import Metrics
from azwi_netproxy.proxy.passthrough import LOOP_DETECTED, LOOP_HEADER, Passthrough
from azwi_netproxy.proxy.router import Router
from azwi_netproxy.proxy.tokens import CacheKey, Token
from azwi_netproxy.proxy.wire import Request, Response

log = logging.getLogger(__name__)

_TEXT: Final = b"text/plain; charset=utf-8"
# Distinct targets judged and kept; an app asking with fresh UUIDs (a new resource each
# time) empties it rather than growing it.
_MEMO_LIMIT: Final = 1024
_MEMO_TARGET_BYTES: Final = 1024
AsyncResponse = Coroutine[Any, Any, Response]
_TOKEN: Final = imds.Route.TOKEN
_monotonic: Final = time.monotonic


class _Target:
    """What a request target means, and the last 200 answer rendered for it."""

    __slots__ = (
        "answer",
        "client_id",
        "error",
        "key",
        "log_fields",
        "path",
        "query",
        "resource_json",
        "route",
    )

    def __init__(
        self,
        route: imds.Route,
        path: str,
        query: str,
        key: CacheKey | None = None,
        client_id: str = "",
        resource_json: str = "",
        error: NetproxyError | None = None,
    ) -> None:
        self.route = route
        self.path = path
        self.query = query
        self.key = key
        self.client_id = client_id
        self.resource_json = resource_json
        self.error = error
        # (second, token, answer): reused within the second it was rendered in.
        self.answer: tuple[int, Token, Response] | None = None
        # The constant parts of this target's 200 access lines, per cache outcome.
        self.log_fields: dict[str, tuple[str, str]] = {}


def error_response(exc: NetproxyError) -> Response:
    """IMDS-shaped JSON for one of our errors; internal ones never show their text."""
    if not exc.public:
        return Response(500, imds.render_error("internal_error", "Internal error in azwi-netproxy"))
    code = exc.entra_error if isinstance(exc, IdentityRejected) else exc.code
    headers = None
    if isinstance(exc, UpstreamError) and exc.retry_after_s is not None:
        headers = [(b"Retry-After", str(exc.retry_after_s).encode())]
    elif isinstance(exc, PassthroughLoop):
        # So that the proxy whose request came back can tell (passthrough.py).
        headers = [(LOOP_HEADER, LOOP_DETECTED)]
    # After a broken request or a loop nothing more is read on the connection.
    close = isinstance(exc, (MalformedRequest, PassthroughLoop))
    return Response(exc.status, imds.render_error(code, str(exc)), headers=headers, close=close)


class TokenApp:
    def __init__(
        self,
        *,
        router: Router,
        cache: TokenCache,
        endpoint_id: str,
        passthrough: Passthrough | None,
        metrics: Metrics,
        access_log: AccessLog,
        clock: Callable[[], float] | None = None,
        pod: str | None = None,
        memo_limit: int = _MEMO_LIMIT,
    ) -> None:
        self._router = router
        self._cache = cache
        self._endpoint_id = endpoint_id
        self._passthrough = passthrough
        self._metrics = metrics
        self._access = access_log
        # The cache's own clock unless told otherwise: one reading serves the cache, the
        # answer's expires_in and the access line.
        self._clock = clock if clock is not None else cache.clock
        self._targets: dict[bytes, _Target] = {}
        self._memo_limit = memo_limit
        # Node mode: the pod this app answers (namespace/name), named in every log line.
        self._pod = pod
        self._log_extra: dict[str, object] = {} if pod is None else {"pod": pod}
        self.ready = True

    # ---- entry points ----
    def dispatch(self, request: Request) -> Response | AsyncResponse:
        started = _monotonic()
        target = self._targets.get(request.target) or self._understand(request.target)
        route = target.route
        if route is _TOKEN:
            refusal = self._refusal(request, target)
            if refusal is not None:
                return self._fail(request, refusal, started, target)
            key: CacheKey = target.key  # type: ignore[assignment]  # set for TOKEN targets
            now = self._clock()
            hit = self._cache.peek(key, now)
            if hit is None:
                return self._token_miss(request, target, key, started)
            token, outcome = hit
            return self._token_answer(request, target, token, outcome, started, now)
        if route is imds.Route.READY:
            if request.method not in ("GET", "HEAD"):
                return self._fail(request, MethodNotAllowed("Method not allowed"), started, target)
            if not self.ready:
                return self._fail(request, NotReady("shutting down"), started, target)
            response = Response(200, b"ok", _TEXT)
        elif route is imds.Route.INVALID:
            return self._fail(request, BadRequest("Invalid request target"), started, target)
        elif route is imds.Route.REFUSED:
            self._metrics.passthrough_refused += 1
            refused = NotFound("Not an instance metadata identity endpoint: refused by azwi-netproxy")
            return self._fail(request, refused, started, target)
        else:
            return self._passthrough_or_refuse(request, target, started)
        self._finish(request, response, started, route.value, None, None)
        return response

    def refuse(self, error: NetproxyError) -> Response:
        """The answer to an error the server met itself (server.Handler)."""
        if not error.public:
            log.error("internal error", extra={**self._log_extra, "error": repr(error)})
        return error_response(error)

    # ---- judging ----
    def _understand(self, raw_target: bytes) -> _Target:
        route, path, query = imds.read_target(raw_target.decode("latin-1"))
        result: _Target
        if route is not imds.Route.TOKEN:
            result = _Target(route, path, query)
        else:
            try:
                parsed = imds.parse_token_query(query)
                identity = self._router.resolve(parsed.selector)
                key = CacheKey(
                    self._endpoint_id,
                    identity.tenant_id,
                    identity.client_id,
                    imds.scope_for(parsed.resource),
                )
                result = _Target(route, path, query, key, identity.client_id, parsed.resource_json)
            except NetproxyError as exc:
                result = _Target(route, path, query, error=exc)
        if len(raw_target) <= _MEMO_TARGET_BYTES:
            if len(self._targets) >= self._memo_limit:
                self._targets.clear()
            self._targets[raw_target] = result
        return result

    @staticmethod
    def _refusal(request: Request, target: _Target) -> NetproxyError | None:
        """Why IMDS would refuse this token request, or None."""
        # CONTRACT.md: 405 for any method other than GET. A HEAD would cost an exchange
        # for an answer without a token in it.
        if request.method != "GET":
            return MethodNotAllowed(imds.MSG_METHOD)
        metadata: bytes | None = None
        metadata_count = 0
        forwarded = False
        for name, value in request.headers:
            if name == b"metadata":
                metadata_count += 1
                metadata = value
            elif name == b"x-forwarded-for":
                forwarded = True
        # SDK credential chains probe without the header: answer at once, no exchange.
        if metadata_count != 1 or metadata is None or metadata.strip().lower() != b"true":
            return BadRequest(imds.MSG_NO_METADATA)
        if forwarded:
            return BadRequest(imds.MSG_FORWARDED)
        return target.error

    # ---- the token path ----
    async def _token_miss(self, request: Request, target: _Target, key: CacheKey, started: float) -> Response:
        try:
            token, outcome = await self._cache.get(key)
        except NetproxyError as exc:
            return self._fail(request, exc, started, target)
        except Exception:
            log.exception("token request failed", extra={**self._log_extra, "client_id": target.client_id})
            return self._fail(request, NetproxyError("internal"), started, target)
        return self._token_answer(request, target, token, outcome, started, self._clock())

    def _token_answer(
        self, request: Request, target: _Target, token: Token, outcome: str, started: float, now: float
    ) -> Response:
        """A 200 with `token`, counted and logged; rendered once per second and token."""
        second = int(now)
        answer = target.answer
        if answer is not None and answer[0] == second and answer[1] is token:
            response = answer[2]
        else:
            response = Response(
                200,
                imds.render_token(
                    access_token=token.access_token,
                    client_id=target.client_id,
                    resource_json=target.resource_json,
                    expires_on=token.expires_on,
                    ext_expires_on=token.ext_expires_on,
                    not_before=token.issued_at,
                    token_type=token.token_type,
                    now=second,
                ),
            )
            target.answer = (second, token, response)
        self._metrics.token_ok += 1
        access = self._access
        if access.enabled:
            fields = target.log_fields.get(outcome)
            if fields is None:
                # CacheOutcome is a StrEnum: the member is its own string.
                fields = access.fields("GET", request.target, 200, target.client_id, outcome, self._pod)
                target.log_fields[outcome] = fields
            access.line(now, fields, int((_monotonic() - started) * 1_000_000))
        return response

    # ---- pass-through ----
    def _passthrough_or_refuse(
        self, request: Request, target: _Target, started: float
    ) -> Response | AsyncResponse:
        passthrough = self._passthrough
        if passthrough is not None and passthrough.is_own_loop(request):
            # Our own pass-through request came back: answer so the sender can report it.
            return self._fail(request, PassthroughLoop("pass-through loop"), started, target, "passthrough")
        if passthrough is None:
            refused = PassthroughRefused(
                "Pass-through to the instance metadata service is disabled in this pod"
            )
            return self._fail(request, refused, started, target)
        return self._forward(passthrough, request, target, started)

    async def _forward(
        self, passthrough: Passthrough, request: Request, target: _Target, started: float
    ) -> Response:
        try:
            response = await passthrough.forward(request, target.path, target.query)
        except NetproxyError as exc:
            extra = {**self._log_extra, "path": target.path, "error": str(exc)}
            if isinstance(exc, UpstreamError):
                log.warning("pass-through failed", extra=extra)
            elif isinstance(exc, BadRequest):
                log.info("pass-through refused", extra=extra)
            else:
                log.error("pass-through failed", extra=extra)
            return self._fail(request, exc, started, target)
        except Exception:
            log.exception("pass-through failed", extra={**self._log_extra, "path": target.path})
            return self._fail(request, NetproxyError("internal"), started, target)
        self._finish(request, response, started, "passthrough", None, None)
        return response

    # ---- answering ----
    def _fail(
        self, request: Request, exc: NetproxyError, started: float, target: _Target, route: str | None = None
    ) -> Response:
        response = self.refuse(exc)
        self._finish(request, response, started, route or target.route.value, target.client_id or None, None)
        return response

    def _finish(
        self,
        request: Request,
        response: Response,
        started: float,
        route: str,
        client_id: str | None,
        cache: str | None,
    ) -> None:
        self._metrics.count_request(route, response.status)
        access = self._access
        if access.enabled:
            access.request(
                self._clock(),
                request.method,
                request.target,
                response.status,
                int((_monotonic() - started) * 1_000_000),
                client_id,
                cache,
                self._pod,
            )
