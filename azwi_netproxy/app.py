"""The request handler: imds → router → cache → entra, and THE one place errors become answers.

`dispatch` returns a Response when it can answer without I/O (a cache hit, an error, a
probe) and a coroutine otherwise, so the server answers hits without creating a task.
Parsing and routing a request target are pure functions of the target, so their result
is memoised per target: a repeated token URL costs one dict lookup before the cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

from azwi_netproxy import imds
from azwi_netproxy.cache import CacheOutcome, TokenCache
from azwi_netproxy.errors import (
    BadRequest,
    IdentityRejected,
    MethodNotAllowed,
    NetproxyError,
    NotFound,
    PassthroughRefused,
    UpstreamError,
)
from azwi_netproxy.http11 import Request, Response
from azwi_netproxy.logs import AccessLog
from azwi_netproxy.metrics import Metrics
from azwi_netproxy.passthrough import LOOP_DETECTED, LOOP_HEADER, Passthrough
from azwi_netproxy.router import Router
from azwi_netproxy.tokens import CacheKey, Token

log = logging.getLogger(__name__)

_TEXT: Final = b"text/plain; charset=utf-8"
_MEMO_LIMIT: Final = 2048
_MEMO_TARGET_BYTES: Final = 1024
AsyncResponse = Coroutine[Any, Any, Response]
_HIT: Final = CacheOutcome.HIT


class _Target:
    """What a request target means, independent of method and headers.

    Also holds the last 200 answer for it (per second and token), so cache hits within
    one second reuse one Response (and the server its serialised bytes).
    """

    __slots__ = (
        "client_id",
        "error",
        "key",
        "log_fields",
        "memo",
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
        self.memo: tuple[int, Token, Response] | None = None
        # The constant parts of this target's access lines, per cache outcome.
        self.log_fields: dict[str, tuple[str, str]] = {}


def error_response(exc: NetproxyError) -> Response:
    """IMDS-shaped JSON for one of our errors; internal ones never show their text."""
    if not exc.public:
        return Response(500, imds.render_error("internal_error", "Internal error in azwi-netproxy"))
    code = exc.entra_error if isinstance(exc, IdentityRejected) else exc.code
    headers = None
    if isinstance(exc, UpstreamError) and exc.retry_after_s is not None:
        headers = [(b"Retry-After", str(exc.retry_after_s).encode())]
    return Response(exc.status, imds.render_error(code, str(exc)), headers=headers)


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
    ) -> None:
        self._router = router
        self._cache = cache
        self._endpoint_id = endpoint_id
        self._passthrough = passthrough
        self._metrics = metrics
        self._access = access_log
        # The cache's own clock unless told otherwise: the fast path hands its one reading
        # to the cache.
        self._clock = clock if clock is not None else cache.clock
        self._targets: dict[bytes, _Target] = {}
        self.ready = True

    # ---- entry point ----
    def dispatch(self, request: Request) -> Response | AsyncResponse:
        started = time.monotonic()
        verdict = request.verdict
        if verdict is None:
            verdict = request.verdict = self._judge(request)
        target: _Target
        refusal: NetproxyError | None
        target, refusal = verdict  # type: ignore[misc]  # the tuple _judge returns
        route = target.route
        if route is imds.Route.TOKEN:
            if refusal is not None:
                return self._fail(request, refusal, started, target)
            key: CacheKey = target.key  # type: ignore[assignment]  # set for TOKEN targets
            hit = self._cache.peek(key)
            if hit is None:
                return self._token_miss(request, target, key, started)
            response = self._token_answer(request.target, target, *hit, started)
            if request.fast is None and request.http_version == "1.1":
                request.fast = self._fast_hit(request, target, key)
            return response
        if route is imds.Route.READY:
            response = self._ready(request)
        elif route is imds.Route.INVALID:
            response = error_response(BadRequest("Invalid request target"))
        elif route is imds.Route.REFUSED:
            self._metrics.passthrough_refused += 1
            response = error_response(
                NotFound("Not an instance metadata identity endpoint: refused by azwi-netproxy")
            )
        else:
            return self._passthrough_or_refuse(request, target, started)
        self._finish(request, response, started, route.value, None, None)
        return response

    def _fast_hit(self, request: Request, target: _Target, key: CacheKey) -> Callable[[], Response | None]:
        """The answer to this very request again, without dispatch, while it is a cache hit.

        Set on a memoised Request (identical bytes, parsed once) after an HTTP/1.1 GET was
        answered from the cache: the server then calls it instead of dispatch. It still
        asks the cache (expiry, refresh ahead), counts the request and logs it. None means
        a miss: the server takes the normal path, which awaits the exchange.
        """
        peek = self._cache.peek
        token_answer = self._token_answer
        raw_target = request.target
        clock = self._clock
        monotonic = time.monotonic
        metrics = self._metrics
        access = self._access
        hit_fields = access.fields("GET", raw_target, 200, target.client_id, CacheOutcome.HIT)

        def answer() -> Response | None:
            # One clock for the cache, the body's second, the line and its duration: each
            # reading costs as much as a dict lookup here.
            now = clock()
            hit = peek(key, now)
            if hit is None:
                return None
            token, outcome = hit
            memo = target.memo
            if outcome is not _HIT or memo is None or memo[1] is not token or memo[0] != int(now):
                # A refresh, or the first answer of this second: the general path, which
                # times answers on the monotonic clock.
                return token_answer(raw_target, target, token, outcome, monotonic() - (clock() - now))
            # What _token_answer does for a hit within the second its answer was made in.
            metrics.token_ok += 1
            if access.enabled:
                duration_us = int((clock() - now) * 1_000_000)
                # A wall clock stepped back in between must not log a negative duration.
                access.line(now, hit_fields, duration_us if duration_us > 0 else 0)
            return memo[2]

        return answer

    def _judge(self, request: Request) -> tuple[_Target, NetproxyError | None]:
        """Everything about a request that depends only on its bytes, decided once."""
        target = self._targets.get(request.target)
        if target is None:
            target = self._understand(request.target)
        if target.route is not imds.Route.TOKEN:
            return target, None
        # CONTRACT.md: 405 for any method other than GET. A HEAD would cost an exchange
        # for an answer without a token in it.
        if request.method != "GET":
            return target, MethodNotAllowed(imds.MSG_METHOD)
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
            return target, BadRequest(imds.MSG_NO_METADATA)
        if forwarded:
            return target, BadRequest(imds.MSG_FORWARDED)
        return target, target.error

    # ---- routes ----
    def _ready(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return error_response(MethodNotAllowed("Method not allowed"))
        if not self.ready:
            return Response(503, b"shutting down", _TEXT)
        return Response(200, b"ok", _TEXT)

    async def _token_miss(self, request: Request, target: _Target, key: CacheKey, started: float) -> Response:
        try:
            token, outcome = await self._cache.get(key)
        except NetproxyError as exc:
            return self._fail(request, exc, started, target)
        except Exception:
            log.exception("token request failed", extra={"client_id": target.client_id})
            return self._fail(request, NetproxyError("internal"), started, target)
        return self._token_answer(request.target, target, token, outcome, started)

    def _passthrough_or_refuse(
        self, request: Request, target: _Target, started: float
    ) -> Response | AsyncResponse:
        passthrough = self._passthrough
        if passthrough is not None and passthrough.is_own_loop(request):
            # Our own pass-through request came back: answer so the sender can report it.
            response = Response(
                508,
                imds.render_error("loop_detected", "pass-through loop"),
                headers=[(LOOP_HEADER, LOOP_DETECTED)],
                close=True,
            )
            self._finish(request, response, started, "passthrough", None, None)
            return response
        if passthrough is None:
            return self._fail(
                request,
                PassthroughRefused("Pass-through to the instance metadata service is disabled in this pod"),
                started,
                target,
            )
        return self._forward(passthrough, request, target, started)

    async def _forward(
        self, passthrough: Passthrough, request: Request, target: _Target, started: float
    ) -> Response:
        try:
            response = await passthrough.forward(request, target.path, target.query)
        except NetproxyError as exc:
            if isinstance(exc, UpstreamError):
                log.warning("pass-through failed", extra={"path": target.path, "error": str(exc)})
            elif isinstance(exc, BadRequest):
                log.info("pass-through refused", extra={"path": target.path, "error": str(exc)})
            else:
                log.error("pass-through failed", extra={"path": target.path, "error": str(exc)})
            return self._fail(request, exc, started, target)
        except Exception:
            log.exception("pass-through failed", extra={"path": target.path})
            return self._fail(request, NetproxyError("internal"), started, target)
        self._finish(request, response, started, "passthrough", None, None)
        return response

    # ---- helpers ----
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
            if len(self._targets) >= _MEMO_LIMIT:
                self._targets.clear()
            self._targets[raw_target] = result
        return result

    def _token_answer(
        self, raw_target: bytes, target: _Target, token: Token, outcome: str, started: float
    ) -> Response:
        """A 200 with `token`, counted and logged: the hot path of every cache hit.

        One clock reading serves the body, the log and the duration; the body is rendered
        once per second and token, and the constant parts of the log line once per outcome.
        """
        now = self._clock()
        second = int(now)
        memo = target.memo
        if memo is not None and memo[0] == second and memo[1] is token:
            response = memo[2]
        else:
            response = self._token_response(target, token, second)
        self._metrics.token_ok += 1
        access = self._access
        if access.enabled:
            fields = target.log_fields.get(outcome)
            if fields is None:
                # CacheOutcome is a StrEnum: the member is its own string.
                fields = access.fields("GET", raw_target, 200, target.client_id, outcome)
                target.log_fields[outcome] = fields
            access.line(now, fields, int((time.monotonic() - started) * 1_000_000))
        return response

    def _token_response(self, target: _Target, token: Token, now: int) -> Response:
        """Render the 200 for `token` at second `now`, and keep it for the rest of that second."""
        body = imds.render_token(
            access_token=token.access_token,
            client_id=target.client_id,
            resource_json=target.resource_json,
            expires_on=token.expires_on,
            ext_expires_on=token.ext_expires_on,
            not_before=token.issued_at,
            token_type=token.token_type,
            now=now,
        )
        response = Response(200, body)
        target.memo = (now, token, response)
        return response

    def _fail(self, request: Request, exc: NetproxyError, started: float, target: _Target) -> Response:
        response = error_response(exc)
        if not exc.public:
            log.error("internal error", extra={"error": repr(exc)})
        self._finish(request, response, started, target.route.value, target.client_id or None, None)
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
                int((time.monotonic() - started) * 1_000_000),
                client_id,
                cache,
            )
