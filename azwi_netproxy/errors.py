"""The exception tree of azwi-netproxy, and the one place each HTTP status is decided.

    NetproxyError                      500 internal_error (never shows its text to the app)
    ├── BadRequest                     400 invalid_request
    │   ├── UnknownIdentity            400 invalid_request  (IMDS: "Identity not found")
    │   ├── IdentityRejected           400 <Entra's error>  (permanent AADSTS errors)
    │   └── MalformedRequest           400 invalid_request  (broken HTTP/1.1: answered, then closed)
    │       ├── BodyTooLarge           413 invalid_request
    │       ├── TargetTooLong          414 invalid_request
    │       └── HeadersTooLarge        431 invalid_request
    ├── MethodNotAllowed               405 invalid_request
    ├── NotFound                       404 not_found        (refused targets, unknown paths)
    ├── NotReady                       503 service_unavailable (/readyz while draining)
    ├── PassthroughRefused             403 forbidden        (pass-through switched off)
    ├── PassthroughLoop                508 loop_detected    (our own traffic came back to us)
    ├── UpstreamError                  502 upstream_error   (+ retry_after_s)
    │   ├── UpstreamThrottled          429 too_many_requests
    │   └── UpstreamUnavailable        503 service_unavailable
    ├── ConfigError                    start-up only: one stderr line, exit code 2
    └── RuleInstallError               init only: exit code 1

Only `proxy/app.py` turns these into responses (`error_response`), the server's own errors
included; `public` says whether `str(exc)` may reach the app.
"""

from __future__ import annotations

from typing import Any, ClassVar


class NetproxyError(Exception):
    """Base. Subclasses set `status` and the IMDS `error` code."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    # Whether str(exc) is written for the app. Internal errors get a generic text instead.
    public: ClassVar[bool] = False


class BadRequest(NetproxyError):
    status, code, public = 400, "invalid_request", True


class UnknownIdentity(BadRequest):
    """The identity asked for is not one this pod may use (IMDS answers 400, not 404)."""


class IdentityRejected(BadRequest):
    """Entra refused the exchange for good (AADSTS700016, 70021, …): retrying cannot help."""

    def __init__(self, message: str, *, entra_error: str = "invalid_request") -> None:
        super().__init__(message)
        self.entra_error = entra_error


class MalformedRequest(BadRequest):
    """The client broke HTTP/1.1 or one of our limits: answered once, then the connection closes."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        # Requests the same bytes completed before the bad one (wire.Request objects):
        # answered first, in order.
        self.completed: list[Any] = []


class BodyTooLarge(MalformedRequest):
    status = 413


class TargetTooLong(MalformedRequest):
    status = 414


class HeadersTooLarge(MalformedRequest):
    status = 431


class MethodNotAllowed(NetproxyError):
    status, code, public = 405, "invalid_request", True


class NotFound(NetproxyError):
    status, code, public = 404, "not_found", True


class NotReady(NetproxyError):
    status, code, public = 503, "service_unavailable", True


class PassthroughRefused(NetproxyError):
    status, code, public = 403, "forbidden", True


class PassthroughLoop(NetproxyError):
    status, code, public = 508, "loop_detected", True


class UpstreamError(NetproxyError):
    """The token service (or the real IMDS) failed in a way that may pass."""

    status, code, public = 502, "upstream_error", True

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: int | None = None,
        server_retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        # What the app is told to wait (Retry-After of our answer).
        self.retry_after_s = retry_after_s
        # What the upstream itself asked for: our own retries wait at least this long.
        self.server_retry_after_s = server_retry_after_s


class UpstreamThrottled(UpstreamError):
    status, code = 429, "too_many_requests"


class UpstreamUnavailable(UpstreamError):
    status, code = 503, "service_unavailable"


class ConfigError(NetproxyError):
    """A bad flag, environment value or file at start-up: exit code 2."""


class RuleInstallError(NetproxyError):
    """The kernel or our permissions refused the NAT rules: exit code 1."""
