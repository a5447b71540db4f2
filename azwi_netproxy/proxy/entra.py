"""The token exchange: the pod's service account token for an Entra access token.

Owns the outbound HTTP (httpx) to Entra or, in identity-binding mode, to the cluster's
token proxy. httpx types never leave this module: every failure becomes an UpstreamError
(transient: retried here with back-off, then 429/503 for the app) or IdentityRejected
(permanent: the AADSTS code and description reach the app as a 400).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol

from azwi_netproxy import __version__
from azwi_netproxy.errors import (
    IdentityRejected,
    UpstreamError,
    UpstreamThrottled,
    UpstreamUnavailable,
)
from azwi_netproxy.proxy.tokens import CacheKey, Token

if TYPE_CHECKING:
    # httpx is imported when the first client is built, after the server listens: its
    # import is a large share of start-up time and /readyz must answer quickly.
    import httpx

log = logging.getLogger(__name__)

ASSERTION_TYPE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
USER_AGENT: Final = f"azwi-netproxy/{__version__}"
_RETRY_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504})
_MAX_ATTEMPTS: Final = 4
_BACKOFF_BASE_S: Final = 0.4
_DEFAULT_RETRY_AFTER_S: Final = 5
_ERROR_CODE: Final = re.compile(r"^[a-z_]{1,64}$")
_MAX_ANSWER_BYTES: Final = 1024 * 1024
# Exchanges are rare (a miss, a refresh): one idle connection per client is plenty, and a
# connection that failed is never the one a second try gets.
_MAX_IDLE_CONNECTIONS: Final = 1


class Endpoint(Protocol):
    """Where exchanges go: Entra itself, or the identity-binding token proxy."""

    @property
    def endpoint_id(self) -> str: ...

    def token_url(self, tenant_id: str) -> str: ...

    def client(self) -> tuple[httpx.AsyncClient, dict[str, Any]]:
        """The client to use now and the request extensions (e.g. sni_hostname)."""
        ...

    async def aclose(self) -> None: ...


def exchange_client(
    *, ssl_context: ssl.SSLContext, trust_env: bool, timeout_s: float, keepalive_expiry_s: float | None = None
) -> httpx.AsyncClient:
    """httpx's own client and transport for exchanges: pooled, idle connections expired.

    `trust_env` lets HTTPS_PROXY / NO_PROXY apply as httpx reads them (the Go proxy honours
    them too); the trust store is always `ssl_context`, never the environment's.
    """
    import httpx

    from azwi_netproxy.proxy.outbound import KEEPALIVE_EXPIRY_S

    return httpx.AsyncClient(
        verify=ssl_context,
        trust_env=trust_env,
        timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
        limits=httpx.Limits(
            max_keepalive_connections=_MAX_IDLE_CONNECTIONS,
            keepalive_expiry=KEEPALIVE_EXPIRY_S if keepalive_expiry_s is None else keepalive_expiry_s,
        ),
        headers={"User-Agent": USER_AGENT},
        follow_redirects=False,
    )


class AuthorityEndpoint:
    """Entra at AZURE_AUTHORITY_HOST, through one long-lived pooled client."""

    def __init__(
        self,
        authority_host: str,
        *,
        timeout_s: float,
        ca_file: str | None = None,
        ca_dir: str | None = None,
        keepalive_expiry_s: float | None = None,
        via_environment_proxy: bool = False,
    ) -> None:
        self._authority = authority_host.rstrip("/")
        # HTTPS_PROXY / HTTP_PROXY / NO_PROXY, as the Go proxy honours them (config.py
        # decides whether they are set; httpx reads them).
        self._trust_env = via_environment_proxy
        self._timeout_s = timeout_s
        self._ca_file = ca_file
        self._ca_dir = ca_dir
        self._keepalive_expiry_s = keepalive_expiry_s
        self._client: httpx.AsyncClient | None = None

    @property
    def endpoint_id(self) -> str:
        return self._authority

    def token_url(self, tenant_id: str) -> str:
        return f"{self._authority}/{tenant_id}/oauth2/v2.0/token"

    def client(self) -> tuple[httpx.AsyncClient, dict[str, Any]]:
        if self._client is None:
            self._client = exchange_client(
                ssl_context=authority_context(self._ca_file, self._ca_dir),
                trust_env=self._trust_env,
                timeout_s=self._timeout_s,
                keepalive_expiry_s=self._keepalive_expiry_s,
            )
        return self._client, {}

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def authority_context(ca_file: str | None, ca_dir: str | None) -> ssl.SSLContext:
    """TLS trust for Entra: SSL_CERT_FILE / SSL_CERT_DIR when set, else the system store.

    Like the Go proxy (system roots), not certifi's bundle. Without SSL_CERT_FILE the
    system store is used through its hashed directory, which OpenSSL reads one
    certificate at a time when a chain needs it: loading the whole bundle file up front
    would cost about a megabyte of the sidecar's memory in every pod.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file or ca_dir:
        context.load_verify_locations(cafile=ca_file or None, capath=ca_dir or None)
        return context
    defaults = ssl.get_default_verify_paths()
    if (
        defaults.capath
        and os.path.isdir(defaults.capath)
        and any(name.endswith(".0") for name in os.listdir(defaults.capath))
    ):
        context.load_verify_locations(capath=defaults.capath)
    else:
        context.set_default_verify_paths()
    return context


@dataclass(frozen=True, slots=True)
class ExchangePolicy:
    timeout_s: float = 10.0
    deadline_s: float = 20.0
    max_attempts: int = _MAX_ATTEMPTS


class _Answer(NamedTuple):
    """The token service's answer, read whole (at most 1 MiB, decoded)."""

    status: int
    headers: httpx.Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _retry_after_s(response: _Answer) -> int | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value)
    import email.utils

    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(int(when.timestamp() - time.time()), 0)
    return None


def _clean(text: str, limit: int = 1000) -> str:
    return "".join(ch if ch.isprintable() else " " for ch in text)[:limit].strip()


def _permanent_error(response: _Answer) -> IdentityRejected:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict):
        code = str(body.get("error") or "")
        description = _clean(str(body.get("error_description") or ""))
        if description:
            return IdentityRejected(
                description,
                entra_error=code if _ERROR_CODE.match(code) else "invalid_request",
            )
    return IdentityRejected(f"The token service refused the exchange with HTTP {response.status}")


def _parse_token(response: _Answer, now: int) -> Token:
    try:
        body = response.json()
        access_token = body["access_token"]
        expires_in = int(body["expires_in"])
        ext_expires_in = int(body.get("ext_expires_in") or expires_in)
        refresh_in = body.get("refresh_in")
        token_type = str(body.get("token_type") or "Bearer")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, OverflowError):
        raise UpstreamUnavailable(
            "The token service answered 200 without a usable token (access_token, expires_in)",
            retry_after_s=_DEFAULT_RETRY_AFTER_S,
        ) from None
    if not isinstance(access_token, str) or not access_token or expires_in <= 0:
        raise UpstreamUnavailable(
            "The token service answered 200 without a usable token",
            retry_after_s=_DEFAULT_RETRY_AFTER_S,
        )
    expires_on = now + expires_in
    if refresh_in is not None and str(refresh_in).isdigit() and int(refresh_in) > 0:
        refresh_on = now + int(refresh_in)
    elif expires_in >= 7200:
        # MSAL's rule for long-lived tokens: renew at half life.
        refresh_on = now + expires_in // 2
    else:
        refresh_on = expires_on - min(600, expires_in // 2)
    # Renew before clients (5-minute margin) would have to come back for a new one.
    refresh_on = min(refresh_on, expires_on - 360) if expires_in > 720 else refresh_on
    return Token(
        access_token=access_token,
        token_type=token_type,
        issued_at=now,
        expires_on=expires_on,
        ext_expires_on=now + ext_expires_in,
        refresh_on=refresh_on,
    )


@contextlib.contextmanager
def _map_transport_errors(url_for_log: str, log_extra: Mapping[str, object]) -> Iterator[None]:
    """httpx errors → UpstreamUnavailable (the one place they are translated)."""
    import httpx

    try:
        yield
    except httpx.TimeoutException as exc:
        raise UpstreamUnavailable(
            "The token service did not answer in time", retry_after_s=_DEFAULT_RETRY_AFTER_S
        ) from exc
    except (httpx.TransportError, OSError) as exc:
        tls = _tls_failure(exc)
        if tls is not None:
            raise UpstreamUnavailable(
                f"TLS handshake with the token service failed: {tls}",
                retry_after_s=_DEFAULT_RETRY_AFTER_S,
            ) from exc
        cause = type(exc.__cause__ or exc).__name__
        log.debug("token service unreachable", extra={**log_extra, "url": url_for_log, "cause": cause})
        raise UpstreamUnavailable(
            f"Cannot reach the token service ({cause})", retry_after_s=_DEFAULT_RETRY_AFTER_S
        ) from exc


def _tls_failure(exc: BaseException) -> str | None:
    """The TLS reason behind an httpx error (wrapped twice: httpx → httpcore → ssl), if any."""
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {seen.verify_message}"
        if isinstance(seen, ssl.SSLError):
            return str(seen.reason or seen.strerror or type(seen).__name__)
        seen = seen.__cause__ or seen.__context__
    return None


class Exchanger:
    """The cache's fetcher: one exchange (with retries) per call."""

    def __init__(
        self,
        endpoint: Endpoint,
        read_assertion: Callable[[], str],
        *,
        policy: ExchangePolicy | None = None,
        on_result: Callable[[str, float], None] | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Any] = asyncio.sleep,
        log_extra: Mapping[str, object] | None = None,
    ) -> None:
        self._endpoint = endpoint
        # Fields every log line of this exchanger carries (node mode: the pod's name).
        self._log_extra = dict(log_extra or {})
        self._read_assertion = read_assertion
        self._policy = policy or ExchangePolicy()
        self._on_result = on_result
        self._clock = clock
        self._sleep = sleep

    @property
    def endpoint_id(self) -> str:
        return self._endpoint.endpoint_id

    async def __call__(self, key: CacheKey) -> Token:
        """Exchange for `key`, retrying transient failures within the deadline.

        Raises:
            IdentityRejected: Entra refused for good.
            UpstreamError: transient failures outlasted the retries or the deadline.
        """
        started = time.monotonic()
        outcome = "error"
        try:
            token = await self._exchange(key, started)
            outcome = "success"
            return token
        except IdentityRejected:
            outcome = "rejected"
            raise
        except UpstreamThrottled:
            outcome = "throttled"
            raise
        except UpstreamError:
            outcome = "unavailable"
            raise
        finally:
            if self._on_result is not None:
                self._on_result(outcome, time.monotonic() - started)

    async def _exchange(self, key: CacheKey, started: float) -> Token:
        policy = self._policy
        url = self._endpoint.token_url(key.tenant_id)
        last: UpstreamError | None = None
        for attempt in range(policy.max_attempts):
            try:
                # Re-read at every exchange: the kubelet rotates the projected token.
                assertion = self._read_assertion()
                remaining = policy.deadline_s - (time.monotonic() - started)
                return await self._attempt(url, key, assertion, max(min(policy.timeout_s, remaining), 0.1))
            except UpstreamError as exc:
                last = exc
            if attempt + 1 == policy.max_attempts:
                break
            # Not imported at the top: the start does not need it (httpx, loaded once the
            # listener is up, has imported it by the time an exchange runs).
            import random

            delay = _BACKOFF_BASE_S * (2**attempt) * (0.75 + random.random() / 2)  # noqa: S311
            if last.server_retry_after_s is not None:
                delay = max(delay, float(last.server_retry_after_s))
            remaining = policy.deadline_s - (time.monotonic() - started)
            if delay >= remaining:
                break
            log.info(
                "retrying token exchange",
                extra={
                    **self._log_extra,
                    "client_id": key.client_id,
                    "attempt": attempt + 2,
                    "reason": str(last),
                },
            )
            await self._sleep(delay)
        assert last is not None
        raise last

    async def _attempt(self, url: str, key: CacheKey, assertion: str, timeout_s: float) -> Token:
        client, extensions = self._endpoint.client()
        form = {
            "grant_type": "client_credentials",
            "client_id": key.client_id,
            "scope": key.scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
        }
        with _map_transport_errors(url, self._log_extra):
            response = await _post(client, url, form, timeout_s=timeout_s, extensions=extensions)
        status = response.status
        if status == 200:
            return _parse_token(response, int(self._clock()))
        if status == 429 or status in _RETRY_STATUSES or status >= 500:
            asked = _retry_after_s(response)
            kind = UpstreamThrottled if status == 429 else UpstreamUnavailable
            what = "is throttling requests" if status == 429 else "failed"
            raise kind(
                f"The token service {what} (HTTP {status})",
                retry_after_s=asked or _DEFAULT_RETRY_AFTER_S,
                server_retry_after_s=asked,
            )
        raise _permanent_error(response)


async def _post(
    client: httpx.AsyncClient, url: str, form: dict[str, str], *, timeout_s: float, extensions: dict[str, Any]
) -> _Answer:
    """POST `form` and read the answer, at most 1 MiB of it.

    A connection that dies before the answer comes back is tried once more at once (a
    client-credentials grant may be repeated: each one only issues a token), before the
    exchange's own spaced retries.

    Raises:
        httpx.HTTPError: as httpx raises them (mapped by the caller).
        UpstreamUnavailable: the answer is too large.
    """
    from azwi_netproxy.proxy.outbound import send_once_more_if_dropped

    request = client.build_request("POST", url, data=form, timeout=timeout_s, extensions=extensions)
    response = await send_once_more_if_dropped(
        functools.partial(client.send, stream=True), request, repeatable=True
    )
    try:
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > _MAX_ANSWER_BYTES:
                raise UpstreamUnavailable(
                    "The token service's answer is larger than 1 MiB", retry_after_s=_DEFAULT_RETRY_AFTER_S
                )
    finally:
        await response.aclose()
    return _Answer(response.status_code, response.headers, bytes(body))


def read_assertion_file(path: str) -> Callable[[], str]:
    """A reader for the projected service account token.

    Raises (when called):
        UpstreamUnavailable: the file is missing, unreadable or empty (the kubelet may be
            mid-rotation or the volume not yet mounted: worth a retry, not a 400).
    """

    def read() -> str:
        try:
            text = _read_bytes(path).decode("utf-8").strip()
        except OSError as exc:
            raise UpstreamUnavailable(
                f"Cannot read the service account token file {path}: {exc.strerror}",
                retry_after_s=1,
            ) from None
        except UnicodeDecodeError:
            raise UpstreamUnavailable(
                f"The service account token file {path} is not UTF-8 text", retry_after_s=1
            ) from None
        if not text:
            raise UpstreamUnavailable(f"The service account token file {path} is empty", retry_after_s=1)
        return text

    return read


def _read_bytes(path: str) -> bytes:
    # Plain system calls: open() builds a buffered text reader (codec lookup included),
    # three times the cost of the read itself, on the cold path of every exchange.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)
