"""A broken Entra: every fault the fake token service can inject, against the live proxy.

Name: test_faults
Scope: one proxy process (uid 1501) for the module; each case uses its own app (client ID)
    so faults, attempts and cached tokens never mix between cases. Cases that only wait
    out the proxy's back-off run at the same time in threads. A second proxy, trusting
    another CA, stands for a TLS failure.
Depends: support.fixtures (proxy, fake Entra with fault injection, fake IMDS), trustme.

What is asserted is issue 7, "A broken Entra": for slow answers past the 10 s attempt
timeout, 429 with Retry-After, 5xx, connection resets, TLS failure and 200s without a
usable token, the app gets a clear IMDS-style answer (CONTRACT.md: permanent errors 400
with the AADSTS code; transient ones 429/503 with Retry-After) or, while a cached token
is still valid, that token; nothing hangs past the 20 s deadline; and the attempts the
fake Entra records are the ones entra.py promises: at most 4, spaced by 0.4 s * 2^n
(+-25 %) or by the upstream's Retry-After when that is longer, never past the deadline.
"""

from __future__ import annotations

import concurrent.futures
import email.utils
import itertools
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import trustme
from support.fake_entra import FakeEntraClient, decode_fake_token
from support.proxyproc import Pod, ProxyProcess, shared_tempdir, unique_resource

pytest_plugins = ["support.fixtures"]
pytestmark = pytest.mark.timeout(90)

MAX_ATTEMPTS = 4
BACKOFF_BASE_S = 0.4
JITTER = 0.25
DEADLINE_S = 20.0
# What we allow on top of the promised delay for a connection, TLS and the fake's thread.
SLACK_S = 1.0
# An immediate second send comes well before the shortest back-off (0.4 s - 25 %).
RESEND_WITHIN_S = 0.25


# ---- running one case ---------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    status: int
    headers: dict[str, str]
    body: dict[str, Any]
    elapsed_s: float
    # The spaced attempts entra.py promises (at most 4), and apart from them the immediate
    # second sends of an attempt whose pooled connection was dropped (outbound.py).
    attempts: list[dict[str, Any]]
    resends: list[dict[str, Any]]

    @property
    def gaps_s(self) -> list[float]:
        times = [record["time"] for record in self.attempts]
        return [later - earlier for earlier, later in itertools.pairwise(times)]


def run_case(proxy: ProxyProcess, entra: FakeEntraClient, name: str, client_id: str,
             resource: str | None = None) -> Outcome:
    started = time.monotonic()
    response = proxy.token(resource or unique_resource(name), client_id)
    elapsed = time.monotonic() - started
    attempts, resends = split_resends(entra.exchanges(), client_id)
    return Outcome(name, response.status, response.headers, json.loads(response.body), elapsed,
                   attempts, resends)


def split_resends(records: list[dict[str, Any]], client_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """This client's exchanges: (spaced attempts, immediate resends).

    A resend is a request on a new connection at once after one on a connection that had
    carried an earlier request (of any client: the pool is shared), as outbound.py sends
    one when a kept-alive connection is dropped. Told from the fake Entra's connection
    numbers, not from the proxy's reasoning.
    """
    used: set[Any] = set()
    seen_before: list[bool] = []
    for record in records:
        seen_before.append(record["conn"] in used)
        used.add(record["conn"])
    attempts: list[dict[str, Any]] = []
    resends: list[dict[str, Any]] = []
    previous: tuple[dict[str, Any], bool] | None = None
    for record, reused in zip(records, seen_before, strict=True):
        if (record["client_id"] or "").lower() != client_id.lower():
            continue
        if (previous is not None and previous[1] and not reused
                and record["time"] - previous[0]["time"] < RESEND_WITHIN_S and previous[0] is attempts[-1]):
            resends.append(record)
        else:
            attempts.append(record)
        previous = (record, reused)
    return attempts, resends


def run_parallel(proxy: ProxyProcess, entra: FakeEntraClient,
                 cases: dict[str, str]) -> dict[str, Outcome]:
    """Run each case (name -> client ID) in its own thread; their back-offs overlap."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(cases)) as pool:
        futures = {name: pool.submit(run_case, proxy, entra, name, client_id)
                   for name, client_id in cases.items()}
        return {name: future.result() for name, future in futures.items()}


def backoff_floor_s(n: int) -> float:
    """The least the code waits before attempt n+2 (n = 0 for the first retry)."""
    return BACKOFF_BASE_S * float(2**n) * (1 - JITTER)


def backoff_ceiling_s(n: int) -> float:
    return BACKOFF_BASE_S * float(2**n) * (1 + JITTER)


def imds_error(outcome: Outcome) -> dict[str, str]:
    assert set(outcome.body) == {"error", "error_description"}, outcome
    assert all(isinstance(v, str) and v for v in outcome.body.values()), outcome
    assert outcome.headers["content-type"].startswith("application/json"), outcome
    return outcome.body


def check(problems: list[str], outcome: Outcome, ok: bool, what: str) -> None:
    if not ok:
        problems.append(f"{outcome.name}: {what}; got {outcome.status} {outcome.body} "
                        f"retry-after={outcome.headers.get('retry-after')} "
                        f"attempts={len(outcome.attempts)} gaps={[round(g, 2) for g in outcome.gaps_s]} "
                        f"elapsed={outcome.elapsed_s:.1f}s")


# ---- transient failures that outlast the retries ------------------------------------------

HTML = {"body": "<html><body>Service Unavailable</body></html>", "content_type": "text/html"}


@dataclass(frozen=True)
class Lasting:
    fault: dict[str, Any]
    status: int  # what the app gets
    error: str  # its IMDS `error`
    retry_after: int | None  # the app's Retry-After; None: none promised
    attempts: int = MAX_ATTEMPTS
    upstream_retry_after_s: float = 0.0  # the least gap the upstream asked for


LASTING: dict[str, Lasting] = {
    "500": Lasting({"status": 500}, 503, "service_unavailable", 5),
    "502-html": Lasting({"status": 502, **HTML}, 503, "service_unavailable", 5),
    "503": Lasting({"status": 503}, 503, "service_unavailable", 5),
    "503-retry-after-2": Lasting({"status": 503, "headers": {"Retry-After": "2"}}, 503,
                                 "service_unavailable", 2, upstream_retry_after_s=2),
    "504": Lasting({"status": 504}, 503, "service_unavailable", 5),
    "408": Lasting({"status": 408}, 503, "service_unavailable", 5),
    "429-retry-after-1": Lasting({"status": 429, "headers": {"Retry-After": "1"}}, 429,
                                 "too_many_requests", 1, upstream_retry_after_s=1),
    "429": Lasting({"status": 429}, 429, "too_many_requests", 5),
    # Longer than the deadline allows: the code gives up at once and passes the wait on.
    "429-retry-after-30": Lasting({"status": 429, "headers": {"Retry-After": "30"}}, 429,
                                  "too_many_requests", 30, attempts=1),
    "reset": Lasting({"reset": True}, 503, "service_unavailable", 5),
    # A 200 without a usable token: the token service is broken for now, like a 5xx.
    "200-html": Lasting({"non_json": True}, 503, "service_unavailable", 5),
    "200-no-access_token": Lasting({"omit": ["access_token"]}, 503, "service_unavailable", 5),
    "200-no-expires_in": Lasting({"omit": ["expires_in"]}, 503, "service_unavailable", 5),
    "200-access_token-number": Lasting({"status": 200, "body": {"access_token": 12345,
                                                                "expires_in": 3600}},
                                       503, "service_unavailable", 5),
    "200-access_token-empty": Lasting({"status": 200, "body": {"access_token": "",
                                                               "expires_in": 3600}},
                                      503, "service_unavailable", 5),
    "200-expires_in-zero": Lasting({"status": 200, "body": {"access_token": "a.b.c",
                                                            "expires_in": 0}},
                                   503, "service_unavailable", 5),
    "200-expires_in-negative": Lasting({"status": 200, "body": {"access_token": "a.b.c",
                                                                "expires_in": -60}},
                                       503, "service_unavailable", 5),
    "200-expires_in-text": Lasting({"status": 200, "body": {"access_token": "a.b.c",
                                                            "expires_in": "soon"}},
                                   503, "service_unavailable", 5),
    # Python's json accepts these non-standard literals; int() of them must not escape.
    "200-expires_in-Infinity": Lasting({"status": 200, "body": '{"access_token":"a.b.c","expires_in":Infinity}'},
                                       503, "service_unavailable", 5),
    "200-expires_in-NaN": Lasting({"status": 200, "body": '{"access_token":"a.b.c","expires_in":NaN}'},
                                  503, "service_unavailable", 5),
    "200-json-array": Lasting({"status": 200, "body": "[]"}, 503, "service_unavailable", 5),
    "200-json-null": Lasting({"status": 200, "body": "null"}, 503, "service_unavailable", 5),
    "200-empty": Lasting({"status": 200, "body": ""}, 503, "service_unavailable", 5),
}


def test_lasting_transient_failures_are_retried_as_promised_then_answered(
        proxy: ProxyProcess, entra: FakeEntraClient, new_app: Callable[..., str]) -> None:
    apps = {name: new_app() for name in LASTING}
    for name, case in LASTING.items():
        entra.fault(client_id=apps[name], times=None, **case.fault)
    outcomes = run_parallel(proxy, entra, apps)
    problems: list[str] = []
    for name, case in LASTING.items():
        outcome = outcomes[name]
        check(problems, outcome, outcome.status == case.status, f"status {case.status}")
        check(problems, outcome, "access_token" not in outcome.body, "no token")
        doc = imds_error(outcome)
        check(problems, outcome, doc["error"] == case.error, f"error {case.error}")
        retry_after = outcome.headers.get("retry-after")
        if case.retry_after is None:
            check(problems, outcome, retry_after is None, "no Retry-After")
        else:
            check(problems, outcome, retry_after == str(case.retry_after),
                  f"Retry-After {case.retry_after}")
        check(problems, outcome, len(outcome.attempts) == case.attempts,
              f"{case.attempts} attempts")
        for n, gap in enumerate(outcome.gaps_s):
            floor = max(backoff_floor_s(n), case.upstream_retry_after_s)
            ceiling = max(backoff_ceiling_s(n), case.upstream_retry_after_s) + SLACK_S
            check(problems, outcome, floor <= gap <= ceiling,
                  f"retry {n + 1} after {floor:.2f}-{ceiling:.2f} s")
        check(problems, outcome, outcome.elapsed_s < DEADLINE_S + 2, "answered within the deadline")
    assert problems == []


def test_a_retry_after_date_is_honoured(proxy: ProxyProcess, entra: FakeEntraClient,
                                        new_app: Callable[..., str]) -> None:
    client_id = new_app()
    when = email.utils.formatdate(time.time() + 4, usegmt=True)
    entra.fault(client_id=client_id, times=1, status=503, headers={"Retry-After": when})
    outcome = run_case(proxy, entra, "retry-after-date", client_id)
    assert outcome.status == 200, outcome
    assert len(outcome.attempts) == 2
    # The HTTP-date is read to whole seconds: at least 2 s of the 4 asked for remain.
    assert outcome.gaps_s[0] >= 2.0, outcome.gaps_s


# ---- permanent refusals: answered at once, never retried ----------------------------------

PERMANENT: dict[str, tuple[dict[str, Any], str, str]] = {
    # fault, the app's `error`, what its description must say
    "AADSTS70021": ({"aadsts": 70021}, "invalid_client", "AADSTS70021"),
    "AADSTS700016": ({"aadsts": 700016}, "unauthorized_client", "AADSTS700016"),
    "AADSTS500011": ({"aadsts": 500011}, "invalid_resource", "AADSTS500011"),
    "AADSTS7000215-401": ({"aadsts": 7000215}, "invalid_client", "AADSTS7000215"),
    "AADSTS70021-403": ({"aadsts": 70021, "status": 403}, "invalid_client", "AADSTS70021"),
    "401-html": ({"status": 401, **HTML}, "invalid_request", "HTTP 401"),
    "404-json-without-description": ({"status": 404, "body": {"error": "not_found"}},
                                     "invalid_request", "HTTP 404"),
    "400-error-code-with-markup": ({"status": 400, "body": {"error": "<script>",
                                                            "error_description": "bad\r\nthing"}},
                                   "invalid_request", "bad"),
}


def test_permanent_refusals_are_400_with_entras_reason_and_not_retried(
        proxy: ProxyProcess, entra: FakeEntraClient, new_app: Callable[..., str]) -> None:
    apps = {name: new_app() for name in PERMANENT}
    for name, (fault, _, _) in PERMANENT.items():
        entra.fault(client_id=apps[name], times=None, **fault)
    outcomes = run_parallel(proxy, entra, apps)
    problems: list[str] = []
    for name, (_, error, says) in PERMANENT.items():
        outcome = outcomes[name]
        doc = imds_error(outcome)
        check(problems, outcome, outcome.status == 400, "400")
        check(problems, outcome, doc["error"] == error, f"error {error}")
        check(problems, outcome, says in doc["error_description"], f"description with {says!r}")
        check(problems, outcome, "\r" not in doc["error_description"], "no control characters")
        check(problems, outcome, len(outcome.attempts) == 1, "one attempt")
        check(problems, outcome, "retry-after" not in outcome.headers, "no Retry-After")
    assert problems == []


def test_odd_but_usable_token_answers_are_accepted(proxy: ProxyProcess, entra: FakeEntraClient,
                                                   new_app: Callable[..., str]) -> None:
    bodies: dict[str, dict[str, Any]] = {
        "expires_in-as-text": {"access_token": "fake.text.sig", "expires_in": "3600",
                               "token_type": "Bearer"},
        "no-token_type-no-ext": {"access_token": "fake.bare.sig", "expires_in": 3600},
        "extra-fields": {"access_token": "fake.extra.sig", "expires_in": 3600, "foo": [1, {}],
                         "refresh_in": "x"},
    }
    apps = {name: new_app() for name in bodies}
    for name, body in bodies.items():
        entra.fault(client_id=apps[name], times=1, status=200, body=body)
    outcomes = run_parallel(proxy, entra, apps)
    for name, body in bodies.items():
        outcome = outcomes[name]
        assert outcome.status == 200, outcome
        assert outcome.body["access_token"] == body["access_token"]
        assert outcome.body["token_type"] == "Bearer"
        assert 3500 <= int(outcome.body["expires_in"]) <= 3600
        assert len(outcome.attempts) == 1


# ---- a still-valid cached token is served when Entra fails transiently --------------------


def first_token(proxy: ProxyProcess, entra: FakeEntraClient, client_id: str, resource: str,
                **fault: Any) -> dict[str, Any]:
    entra.fault(client_id=client_id, times=1, **fault)
    response = proxy.token(resource, client_id)
    assert response.status == 200, response
    body: dict[str, Any] = response.json()
    return body


def test_transient_failure_serves_the_cached_token_while_it_is_valid(
        proxy: ProxyProcess, entra: FakeEntraClient, new_app: Callable[..., str]) -> None:
    client_id, resource = new_app(), unique_resource("stale")
    # 290 s is inside the 5-minute margin: the next request must try to renew.
    first = first_token(proxy, entra, client_id, resource, expires_in=290)
    entra.fault(client_id=client_id, times=None, status=503)
    outcome = run_case(proxy, entra, "stale", client_id, resource)
    assert outcome.status == 200, outcome
    assert outcome.body["access_token"] == first["access_token"]
    assert 30 < int(outcome.body["expires_in"]) <= 290
    assert len(outcome.attempts) == 1 + MAX_ATTEMPTS  # the renewal was really tried


def test_nearly_expired_token_is_not_served_stale(
        proxy: ProxyProcess, entra: FakeEntraClient, new_app: Callable[..., str]) -> None:
    client_id, resource = new_app(), unique_resource("expiring")
    # 25 s left is less than the 30 s a stale token must still have for the app.
    first_token(proxy, entra, client_id, resource, expires_in=25)
    entra.fault(client_id=client_id, times=None, status=503)
    outcome = run_case(proxy, entra, "expiring", client_id, resource)
    assert outcome.status == 503, outcome
    imds_error(outcome)
    assert outcome.headers["retry-after"].isdigit()


def test_permanent_refusal_is_not_papered_over_with_the_cached_token(
        proxy: ProxyProcess, entra: FakeEntraClient, new_app: Callable[..., str]) -> None:
    """The federated credential was removed: the pod must stop getting tokens for it."""
    client_id, resource = new_app(), unique_resource("revoked")
    first_token(proxy, entra, client_id, resource, expires_in=290)
    entra.fault(client_id=client_id, times=None, aadsts=70021)
    outcome = run_case(proxy, entra, "revoked", client_id, resource)
    assert outcome.status == 400, outcome
    assert "AADSTS70021" in imds_error(outcome)["error_description"]
    assert len(outcome.attempts) == 2


def test_failed_background_refresh_keeps_serving_the_cached_token(
        proxy: ProxyProcess, entra: FakeEntraClient, new_app: Callable[..., str]) -> None:
    client_id, resource = new_app(), unique_resource("refresh")
    first = first_token(proxy, entra, client_id, resource, refresh_in=1)
    entra.fault(client_id=client_id, times=None, status=500)
    time.sleep(1.2)  # past refresh_in: the next request starts a background renewal
    for _ in range(5):
        response = proxy.token(resource, client_id)
        assert response.status == 200, response
        assert response.json()["access_token"] == first["access_token"]
    # The renewal runs in the background with the same retries, and is logged when it fails.
    deadline = time.monotonic() + 10
    while True:
        tried = [r for r in entra.exchanges() if r["client_id"] == client_id]
        logged = "background token refresh failed" in proxy.log_text()
        if (len(tried) == 1 + MAX_ATTEMPTS and logged) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(tried) == 1 + MAX_ATTEMPTS
    assert logged
    assert proxy.token(resource, client_id).json()["access_token"] == first["access_token"]


# ---- slow Entra: past the 10 s attempt timeout, bounded by the 20 s deadline --------------


@pytest.mark.slow
def test_slow_entra_is_bounded_by_the_attempt_timeout_and_the_deadline(
        proxy: ProxyProcess, entra: FakeEntraClient, new_app: Callable[..., str],
        pod: Pod) -> None:
    apps = {"slow-once": new_app(), "slow-always": new_app(), "503-retry-after-8": new_app()}
    # One answer later than the 10 s attempt timeout, then a normal one: the retry succeeds.
    entra.fault(client_id=apps["slow-once"], times=1, delay_s=12)
    # Every answer late: attempt 2 gets only what is left of the 20 s deadline.
    entra.fault(client_id=apps["slow-always"], times=None, delay_s=12)
    # Retry-After 8 s: attempts at about 0, 8, 16 s; a fourth would pass the deadline.
    entra.fault(client_id=apps["503-retry-after-8"], times=None, status=503,
                headers={"Retry-After": "8"})
    hot = unique_resource("hot")
    assert proxy.token(hot).status == 200
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(run_case, proxy, entra, name, client_id)
                   for name, client_id in apps.items()}
        # While three exchanges hang, the proxy keeps answering everything else at once.
        time.sleep(1)
        for _ in range(10):
            started = time.monotonic()
            assert proxy.get("/readyz").status == 200
            hit = proxy.token(hot)
            assert hit.status == 200
            assert decode_fake_token(hit.json()["access_token"])["appid"] == pod.client_id.lower()
            assert time.monotonic() - started < 2.0
            time.sleep(0.3)
        outcomes = {name: future.result() for name, future in futures.items()}

    once, always, throttled = (outcomes["slow-once"], outcomes["slow-always"],
                               outcomes["503-retry-after-8"])
    assert once.status == 200, once
    assert len(once.attempts) == 2
    assert 10.0 <= once.elapsed_s < 10.0 + backoff_ceiling_s(0) + 3, once.elapsed_s

    assert always.status == 503, always
    assert imds_error(always)["error"] == "service_unavailable"
    assert always.headers["retry-after"].isdigit()
    assert len(always.attempts) == 2
    assert DEADLINE_S - 1 <= always.elapsed_s < DEADLINE_S + 3, always.elapsed_s

    assert throttled.status == 503, throttled
    assert throttled.headers["retry-after"] == "8"
    assert len(throttled.attempts) == 3
    assert all(8.0 <= gap < 8.0 + SLACK_S for gap in throttled.gaps_s), throttled.gaps_s
    assert throttled.elapsed_s < DEADLINE_S


# ---- TLS failure ---------------------------------------------------------------------------


@pytest.fixture
def other_ca_file() -> Iterator[str]:
    """Name: other_ca_file. Scope: function. A CA that did not sign the fake Entra's cert."""
    directory = shared_tempdir("azwi-otherca-")
    try:
        path = directory / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(path))
        path.chmod(0o644)
        yield str(path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_tls_failure_is_503_with_retry_after_and_retried(
        proxy_factory: Callable[..., ProxyProcess], entra: FakeEntraClient,
        other_ca_file: str) -> None:
    proxy = proxy_factory(SSL_CERT_FILE=other_ca_file)
    before = len([h for h in entra.handshakes() if h.get("error")])
    started = time.monotonic()
    response = proxy.token(unique_resource("tls"))
    elapsed = time.monotonic() - started
    assert response.status == 503, response
    doc = response.json()
    assert set(doc) == {"error", "error_description"}
    assert "token service" in doc["error_description"]
    assert response.headers["retry-after"].isdigit()
    assert entra.exchanges() == []  # no request was ever sent over an unverified channel
    failed = [h for h in entra.handshakes() if h.get("error")]
    assert len(failed) - before == MAX_ATTEMPTS
    assert elapsed < DEADLINE_S
    assert proxy.get("/readyz").status == 200


# ---- after all of it ------------------------------------------------------------------------


def test_the_proxy_is_healthy_after_every_fault(proxy: ProxyProcess, entra: FakeEntraClient,
                                                pod: Pod) -> None:
    assert proxy.proc.poll() is None
    assert proxy.get("/readyz").status == 200
    response = proxy.token(unique_resource("after"))
    assert response.status == 200
    assert decode_fake_token(response.json()["access_token"])["appid"] == pod.client_id.lower()
    log = proxy.log_text()
    assert "Traceback" not in log
    assert '"level":"error"' not in log
