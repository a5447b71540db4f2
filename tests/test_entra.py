"""The token exchange: form fields, retries and back-off, error mapping, token parsing.

Name: test_entra
Scope: unit tests; Entra is an httpx.MockTransport behind a small Endpoint, sleeps are
    recorded (and advance a fake monotonic clock) instead of waiting.
Depends: azwi_netproxy.proxy.entra, azwi_netproxy.proxy.binding (identity-binding endpoint), trustme.
"""

from __future__ import annotations

import email.utils
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from azwi_netproxy.errors import (
    IdentityRejected,
    UpstreamError,
    UpstreamThrottled,
    UpstreamUnavailable,
)
from azwi_netproxy.proxy import entra
from azwi_netproxy.proxy.binding import BindingEndpoint
from azwi_netproxy.proxy.config import IdentityBinding
from azwi_netproxy.proxy.entra import (
    ASSERTION_TYPE,
    AuthorityEndpoint,
    ExchangePolicy,
    Exchanger,
    read_assertion_file,
)
from azwi_netproxy.proxy.imds import scope_for
from azwi_netproxy.proxy.tokens import CacheKey, Token

NOW = 1_700_000_000
TENANT = "00000000-0000-0000-0000-00000000000a"
CLIENT = "11111111-1111-1111-1111-111111111111"
AUTHORITY = "https://login.example.test"
KEY = CacheKey(AUTHORITY, TENANT, CLIENT, scope_for("https://management.azure.com/"))

AADSTS700016 = (
    "AADSTS700016: Application with identifier '11111111-1111-1111-1111-111111111111' was not found "
    "in the directory 'contoso'.\r\nTrace ID: 0000\r\nCorrelation ID: 1111\r\nTimestamp: 2024-01-01 00:00:00Z"
)

Reply = httpx.Response | Exception


def ok(**fields: Any) -> httpx.Response:
    body = {"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": "eyJ.a.b"}
    body.update(fields)
    return httpx.Response(200, json=body)


class FakeEntra:
    """Answers each POST with the next scripted reply (the last one repeats); records the forms."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    @property
    def forms(self) -> list[dict[str, str]]:
        return [dict(urllib.parse.parse_qsl(r.content.decode())) for r in self.requests]


class MockEndpoint:
    """An Endpoint whose client talks to a FakeEntra through httpx.MockTransport."""

    def __init__(self, entra_fake: FakeEntra) -> None:
        self._client = httpx.AsyncClient(transport=httpx.MockTransport(entra_fake), timeout=httpx.Timeout(5.0))

    @property
    def endpoint_id(self) -> str:
        return AUTHORITY

    def token_url(self, tenant_id: str) -> str:
        return f"{AUTHORITY}/{tenant_id}/oauth2/v2.0/token"

    def client(self) -> tuple[httpx.AsyncClient, dict[str, Any]]:
        return self._client, {}

    async def aclose(self) -> None:
        await self._client.aclose()


class FakeTime:
    """Stands in for the `time` module inside entra: monotonic moves only when slept."""

    def __init__(self) -> None:
        self.mono = 1000.0

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return float(NOW)


class Assertions:
    """A service account token reader that counts reads and rotates its value."""

    def __init__(self) -> None:
        self.reads = 0

    def __call__(self) -> str:
        self.reads += 1
        return f"sa-token-{self.reads}"


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    """Name: fake_time. Scope: function. entra's view of time.monotonic/time.time, driven by sleeps."""
    fake = FakeTime()
    monkeypatch.setattr(entra, "time", fake)
    return fake


class Harness:
    def __init__(self, fake_time: FakeTime) -> None:
        self.fake_time = fake_time
        self.delays: list[float] = []
        self.results: list[str] = []
        self.assertions = Assertions()
        self.endpoints: list[MockEndpoint] = []

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        self.fake_time.mono += delay

    def exchanger(
        self, fake: FakeEntra, *, deadline_s: float = 20.0, read: Callable[[], str] | None = None
    ) -> Exchanger:
        endpoint = MockEndpoint(fake)
        self.endpoints.append(endpoint)
        return Exchanger(
            endpoint,
            read or self.assertions,
            policy=ExchangePolicy(deadline_s=deadline_s),
            on_result=lambda outcome, _s: self.results.append(outcome),
            clock=lambda: float(NOW),
            sleep=self.sleep,
        )


@pytest.fixture
async def harness(fake_time: FakeTime) -> Any:
    """Name: harness. Scope: function. Builds Exchangers on MockTransport; closes their clients."""
    h = Harness(fake_time)
    yield h
    for endpoint in h.endpoints:
        await endpoint.aclose()


# ---- the request ------------------------------------------------------------------------


async def test_exchange_sends_the_client_assertion_form(harness: Harness) -> None:
    fake = FakeEntra(ok())
    token = await harness.exchanger(fake)(KEY)
    [request] = fake.requests
    assert request.method == "POST"
    assert str(request.url) == f"{AUTHORITY}/{TENANT}/oauth2/v2.0/token"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert fake.forms == [
        {
            "grant_type": "client_credentials",
            "client_id": CLIENT,
            "scope": "https://management.azure.com//.default",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": "sa-token-1",
        }
    ]
    assert token.access_token == "eyJ.a.b"
    assert harness.results == ["success"]


async def test_assertion_is_read_again_at_every_exchange(harness: Harness) -> None:
    fake = FakeEntra(ok())
    exchanger = harness.exchanger(fake)
    await exchanger(KEY)
    await exchanger(KEY._replace(scope="https://vault.azure.net/.default"))
    assert harness.assertions.reads == 2
    assert [form["client_assertion"] for form in fake.forms] == ["sa-token-1", "sa-token-2"]
    assert fake.forms[1]["scope"] == "https://vault.azure.net/.default"


async def test_assertion_is_read_again_on_a_retry(harness: Harness) -> None:
    fake = FakeEntra(httpx.Response(503), ok())
    await harness.exchanger(fake)(KEY)
    assert [form["client_assertion"] for form in fake.forms] == ["sa-token-1", "sa-token-2"]


# ---- token parsing ----------------------------------------------------------------------


async def test_token_times(harness: Harness) -> None:
    token = await harness.exchanger(FakeEntra(ok(expires_in=3599, ext_expires_in=7199)))(KEY)
    assert token == Token(
        access_token="eyJ.a.b",
        token_type="Bearer",
        issued_at=NOW,
        expires_on=NOW + 3599,
        ext_expires_on=NOW + 7199,
        refresh_on=NOW + 3599 - 600,
    )


@pytest.mark.parametrize(
    ("fields", "refresh_in_s"),
    [
        ({"expires_in": 86399, "refresh_in": 43199}, 43199),
        ({"expires_in": 86399, "refresh_in": "43199"}, 43199),
        ({"expires_in": 3599, "refresh_in": 1800}, 1800),
        ({"expires_in": 86399}, 86399 // 2),
        ({"expires_in": "3599"}, 3599 - 600),
    ],
    ids=["refresh-in", "refresh-in-string", "refresh-in-short", "long-lived-half-life", "string-expires-in"],
)
async def test_refresh_on(harness: Harness, fields: dict[str, Any], refresh_in_s: int) -> None:
    token = await harness.exchanger(FakeEntra(ok(**fields)))(KEY)
    assert token.refresh_on == NOW + refresh_in_s
    assert token.refresh_on < token.expires_on


async def test_defaults_for_optional_fields(harness: Harness) -> None:
    reply = httpx.Response(200, json={"access_token": "t", "expires_in": 600})
    token = await harness.exchanger(FakeEntra(reply))(KEY)
    assert (token.token_type, token.ext_expires_on) == ("Bearer", NOW + 600)


def test_token_repr_hides_the_access_token() -> None:
    token = Token("eyJsecret", "Bearer", NOW, NOW + 1, NOW + 1, NOW)
    assert "eyJsecret" not in repr(token)


UNUSABLE_200 = [
    (httpx.Response(200, content=b"<html>proxy login</html>"), "html"),
    (httpx.Response(200, content=b""), "empty"),
    (httpx.Response(200, json=["access_token"]), "json-list"),
    (httpx.Response(200, json={"expires_in": 3599}), "no-access-token"),
    (httpx.Response(200, json={"access_token": "t"}), "no-expires-in"),
    (httpx.Response(200, json={"access_token": "", "expires_in": 3599}), "empty-access-token"),
    (httpx.Response(200, json={"access_token": 5, "expires_in": 3599}), "access-token-number"),
    (httpx.Response(200, json={"access_token": "t", "expires_in": "soon"}), "expires-in-text"),
    (httpx.Response(200, json={"access_token": "t", "expires_in": 0}), "expires-in-zero"),
    (httpx.Response(200, json={"access_token": "t", "expires_in": None}), "expires-in-null"),
    (httpx.Response(200, content=b'{"access_token": "t", "expires_in": 1e999}'), "expires-in-infinite"),
    (httpx.Response(200, content=b"\xff\xfe{}"), "not-utf8"),
]


@pytest.mark.parametrize("reply", [r for r, _ in UNUSABLE_200], ids=[n for _, n in UNUSABLE_200])
async def test_unusable_200_is_an_upstream_error(harness: Harness, reply: httpx.Response) -> None:
    with pytest.raises(UpstreamError) as info:
        await harness.exchanger(FakeEntra(reply))(KEY)
    # A token service that answers 200 without a token is broken for now: 503 with Retry-After.
    assert info.value.status == 503 and info.value.retry_after_s
    assert "eyJ" not in str(info.value)


# ---- permanent errors -------------------------------------------------------------------

PERMANENT = [
    (
        httpx.Response(400, json={"error": "unauthorized_client", "error_description": AADSTS700016}),
        "unauthorized_client",
        "AADSTS700016: Application with identifier",
        "aadsts700016",
    ),
    (
        httpx.Response(
            401, json={"error": "invalid_client", "error_description": "AADSTS7000215: Invalid secret"}
        ),
        "invalid_client",
        "AADSTS7000215",
        "invalid-client-401",
    ),
    (
        httpx.Response(
            400, json={"error": "invalid_request", "error_description": "AADSTS90002: Tenant not found"}
        ),
        "invalid_request",
        "AADSTS90002",
        "aadsts90002",
    ),
    (
        httpx.Response(400, json={"error": "Bad Code!", "error_description": "AADSTS70021: No match"}),
        "invalid_request",
        "AADSTS70021",
        "odd-error-code-replaced",
    ),
    (
        httpx.Response(404, content=b"<html>not here</html>"),
        "invalid_request",
        "refused the exchange with HTTP 404",
        "no-json",
    ),
    (
        httpx.Response(400, json={"error": "invalid_grant"}),
        "invalid_request",
        "refused the exchange with HTTP 400",
        "no-description",
    ),
]


@pytest.mark.parametrize(
    ("reply", "code", "description"),
    [(r, c, d) for r, c, d, _ in PERMANENT],
    ids=[name for *_, name in PERMANENT],
)
async def test_permanent_errors_are_not_retried(
    harness: Harness, reply: httpx.Response, code: str, description: str
) -> None:
    fake = FakeEntra(reply, ok())
    with pytest.raises(IdentityRejected) as info:
        await harness.exchanger(fake)(KEY)
    assert len(fake.requests) == 1
    assert harness.delays == []
    assert info.value.entra_error == code
    assert description in str(info.value)
    assert "\n" not in str(info.value) and "\r" not in str(info.value)
    assert info.value.status == 400
    assert harness.results == ["rejected"]


# ---- transient errors and retries -------------------------------------------------------


def _backoff_bounds(attempt: int) -> tuple[float, float]:
    base = 0.4 * 2**attempt
    return base * 0.75, base * 1.25


TRANSIENT = [
    (httpx.Response(500), UpstreamUnavailable, "500"),
    (httpx.Response(502), UpstreamUnavailable, "502"),
    (httpx.Response(503), UpstreamUnavailable, "503"),
    (httpx.Response(504), UpstreamUnavailable, "504"),
    (httpx.Response(408), UpstreamUnavailable, "408"),
    (httpx.Response(429), UpstreamThrottled, "429"),
    (httpx.ConnectError("refused"), UpstreamUnavailable, "connect-error"),
    (httpx.ReadTimeout("slow"), UpstreamUnavailable, "read-timeout"),
    (httpx.ProxyError("502 from the proxy"), UpstreamUnavailable, "proxy-error"),
]


@pytest.mark.parametrize(
    ("reply", "error"),
    [(r, e) for r, e, _ in TRANSIENT],
    ids=[name for *_, name in TRANSIENT],
)
async def test_transient_errors_are_retried_then_succeed(
    harness: Harness, reply: Reply, error: type[UpstreamError]
) -> None:
    fake = FakeEntra(reply, reply, ok())
    token = await harness.exchanger(fake)(KEY)
    assert token.access_token == "eyJ.a.b"
    assert len(fake.requests) == 3
    assert len(harness.delays) == 2
    for attempt, delay in enumerate(harness.delays):
        low, high = _backoff_bounds(attempt)
        assert low <= delay <= high or (error is UpstreamThrottled and delay == 5.0)
    assert harness.results == ["success"]


@pytest.mark.parametrize(
    ("reply", "error"),
    [(r, e) for r, e, _ in TRANSIENT],
    ids=[name for *_, name in TRANSIENT],
)
async def test_transient_errors_give_up_after_max_attempts(
    harness: Harness, reply: Reply, error: type[UpstreamError]
) -> None:
    fake = FakeEntra(reply)
    with pytest.raises(error) as info:
        await harness.exchanger(fake, deadline_s=60.0)(KEY)
    assert type(info.value) is error
    assert len(fake.requests) == 4
    assert len(harness.delays) == 3
    assert info.value.retry_after_s == 5
    assert harness.results == ["throttled" if error is UpstreamThrottled else "unavailable"]


DROPPED = [
    httpx.RemoteProtocolError("Server disconnected without sending a response."),
    httpx.ReadError("[Errno 104] Connection reset by peer"),
    httpx.WriteError("[Errno 32] Broken pipe"),
]


@pytest.mark.parametrize("dropped", DROPPED, ids=["disconnected", "reset", "broken-pipe"])
async def test_a_connection_dropped_before_the_answer_is_sent_once_more_at_once(
    harness: Harness, dropped: Exception
) -> None:
    fake = FakeEntra(dropped, ok())
    token = await harness.exchanger(fake)(KEY)
    assert token.access_token == "eyJ.a.b"
    assert len(fake.requests) == 2
    assert harness.delays == [], "the second try is not a spaced retry"
    assert fake.forms[0] == fake.forms[1]


@pytest.mark.parametrize("dropped", DROPPED, ids=["disconnected", "reset", "broken-pipe"])
async def test_connections_dropped_twice_go_on_to_the_spaced_retries(harness: Harness, dropped: Exception) -> None:
    fake = FakeEntra(dropped, dropped, ok())
    await harness.exchanger(fake)(KEY)
    assert len(fake.requests) == 3
    assert len(harness.delays) == 1
    assert harness.results == ["success"]


async def test_backoff_is_exponential_with_jitter(harness: Harness) -> None:
    firsts: set[float] = set()
    for _ in range(5):
        harness.delays.clear()
        with pytest.raises(UpstreamUnavailable):
            await harness.exchanger(FakeEntra(httpx.Response(503)), deadline_s=60.0)(KEY)
        assert len(harness.delays) == 3
        for attempt, delay in enumerate(harness.delays):
            low, high = _backoff_bounds(attempt)
            assert low <= delay <= high, (attempt, delay)
        firsts.add(harness.delays[0])
    assert len(firsts) > 1


async def test_retry_after_seconds_is_honoured_on_429(harness: Harness) -> None:
    fake = FakeEntra(httpx.Response(429, headers={"Retry-After": "3"}), ok())
    await harness.exchanger(fake)(KEY)
    assert harness.delays == [3.0]


async def test_retry_after_http_date_is_honoured_on_429(harness: Harness) -> None:
    when = email.utils.formatdate(NOW + 7, usegmt=True)
    fake = FakeEntra(httpx.Response(429, headers={"Retry-After": when}), ok())
    await harness.exchanger(fake)(KEY)
    assert harness.delays == [7.0]


async def test_retry_after_beyond_the_deadline_gives_up_at_once(harness: Harness) -> None:
    fake = FakeEntra(httpx.Response(429, headers={"Retry-After": "120"}), ok())
    with pytest.raises(UpstreamThrottled) as info:
        await harness.exchanger(fake, deadline_s=20.0)(KEY)
    assert harness.delays == []
    assert len(fake.requests) == 1
    # The app passes this on as Retry-After.
    assert info.value.retry_after_s == 120
    assert info.value.status == 429


async def test_retries_stay_within_the_deadline(harness: Harness) -> None:
    fake = FakeEntra(httpx.Response(503))
    with pytest.raises(UpstreamUnavailable):
        await harness.exchanger(fake, deadline_s=1.5)(KEY)
    assert 1 <= len(harness.delays) < 3
    assert sum(harness.delays) < 1.5
    assert len(fake.requests) == len(harness.delays) + 1


async def test_unreadable_assertion_is_transient_and_sends_nothing(harness: Harness, tmp_path: Path) -> None:
    fake = FakeEntra(ok())
    reader = read_assertion_file(str(tmp_path / "missing"))
    with pytest.raises(UpstreamUnavailable, match="Cannot read the service account token file"):
        await harness.exchanger(fake, read=reader, deadline_s=60.0)(KEY)
    assert fake.requests == []
    assert harness.results == ["unavailable"]


# ---- read_assertion_file ----------------------------------------------------------------


def test_read_assertion_file_reads_and_rereads(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first\n")
    read = read_assertion_file(str(path))
    assert read() == "first"
    path.write_text("second")
    assert read() == "second"


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "Cannot read the service account token file"), ("", "is empty"), (" \n\t", "is empty")],
    ids=["missing", "empty", "whitespace"],
)
def test_read_assertion_file_failures(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UpstreamUnavailable, match=message) as info:
        read_assertion_file(str(path))()
    assert info.value.retry_after_s == 1
    assert info.value.status == 503


# ---- endpoints --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authority",
    ["https://login.microsoftonline.com/", "https://login.microsoftonline.com"],
    ids=["slash", "bare"],
)
async def test_authority_endpoint_url(authority: str) -> None:
    endpoint = AuthorityEndpoint(authority, timeout_s=5.0)
    try:
        assert endpoint.endpoint_id == "https://login.microsoftonline.com"
        assert endpoint.token_url(TENANT) == f"https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token"
        client, extensions = endpoint.client()
        assert endpoint.client()[0] is client
        assert extensions == {}
    finally:
        await endpoint.aclose()


@pytest.fixture(scope="module")
def ca_pems() -> tuple[str, str]:
    """Name: ca_pems. Scope: module. Two unrelated CA certificates in PEM."""
    return trustme.CA().cert_pem.bytes().decode(), trustme.CA().cert_pem.bytes().decode()


@pytest.fixture
async def binding_endpoints() -> Any:
    """Name: binding_endpoints. Scope: function. Closes the BindingEndpoints a test builds."""
    built: list[BindingEndpoint] = []
    yield built
    for endpoint in built:
        await endpoint.aclose()


async def test_binding_endpoint_url_and_sni(
    binding_endpoints: list[BindingEndpoint], ca_pems: tuple[str, str]
) -> None:
    binding = IdentityBinding(
        token_proxy_url="https://10.0.0.1:443/base/", sni_name="token.aks.example", ca_data=ca_pems[0]
    )
    endpoint = BindingEndpoint(binding, timeout_s=5.0)
    binding_endpoints.append(endpoint)
    assert endpoint.token_url(TENANT) == f"https://10.0.0.1:443/base/{TENANT}/oauth2/v2.0/token"
    assert endpoint.endpoint_id == "https://10.0.0.1:443/base"
    _, extensions = endpoint.client()
    assert extensions == {"sni_hostname": "token.aks.example"}


async def test_binding_ca_file_rotation_keeps_the_last_good_ca(
    binding_endpoints: list[BindingEndpoint], ca_pems: tuple[str, str], tmp_path: Path
) -> None:
    ca_file = tmp_path / "ca.crt"
    endpoint = BindingEndpoint(
        IdentityBinding(token_proxy_url="https://proxy", ca_file=str(ca_file)), timeout_s=5.0
    )
    binding_endpoints.append(endpoint)
    with pytest.raises(UpstreamUnavailable, match="No usable CA"):
        endpoint.client()
    ca_file.write_text(ca_pems[0])
    first, _ = endpoint.client()
    assert endpoint.client()[0] is first  # unchanged file: same client, pooled connections kept
    ca_file.write_text("")
    assert endpoint.client()[0] is first  # mid-rotation empty file: keep the last good CA
    ca_file.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    assert endpoint.client()[0] is first
    ca_file.unlink()
    assert endpoint.client()[0] is first
    ca_file.write_text(ca_pems[1])
    second, _ = endpoint.client()
    assert second is not first


def test_authority_context_uses_the_given_ca_file_only(tmp_path: Any) -> None:
    import ssl

    import trustme

    from azwi_netproxy.proxy.entra import authority_context

    ca = trustme.CA()
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    context = authority_context(str(bundle), None)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert len(context.get_ca_certs()) == 1


def test_authority_context_without_settings_reads_the_system_store_lazily() -> None:
    import ssl

    from azwi_netproxy.proxy.entra import authority_context

    context = authority_context(None, None)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    paths = ssl.get_default_verify_paths()
    if paths.capath and __import__("os").path.isdir(paths.capath):
        # Through the hashed directory nothing is loaded until a chain needs it.
        assert context.cert_store_stats()["x509_ca"] == 0
