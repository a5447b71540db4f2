"""End to end: the proxy as a real process (uid 1501) between real clients and a fake Entra.

Clients are what pods run: curl, azure-identity's ManagedIdentityCredential, MSAL's
ManagedIdentityClient, and raw sockets for the HTTP edge cases. Entra is the HTTPS fake
of support/fake_entra.py, which checks every exchange as Entra would and records it; the
node's IMDS is support/fake_imds.py. One proxy serves the whole module; each test uses
its own identity or resource so the proxy's cache carries nothing between tests.
What is asserted is CONTRACT.md ("azwi-netproxy" and "The token endpoint").
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.fake_entra import ASSERTION_TYPE, FakeEntraClient, decode_fake_token
from support.fake_imds import INSTANCE, NODE_TOKEN_MARK, FakeImdsClient
from support.proxyproc import (
    CLIENT_UID,
    TOKEN_PATH,
    Pod,
    ProjectedToken,
    ProxyProcess,
    RawConnection,
    as_uid,
    free_port,
    http_request,
    shared_tempdir,
    token_target,
    unique_resource,
)

pytest_plugins = ["support.fixtures"]
pytestmark = pytest.mark.timeout(60)

TOKEN_FIELDS = {"access_token", "client_id", "expires_in", "expires_on", "ext_expires_in",
                "not_before", "resource", "token_type"}


def token_request(target: str, *, extra: bytes = b"", version: bytes = b"HTTP/1.1",
                  method: bytes = b"GET") -> bytes:
    return (method + b" " + target.encode() + b" " + version + b"\r\nHost: 169.254.169.254\r\n"
            b"Metadata: true\r\n" + extra + b"\r\n")


READYZ = b"GET /readyz HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n"
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n"


def assert_token_for(body: dict[str, object], *, client_id: str, tenant_id: str,
                     scope: str | None = None) -> dict[str, object]:
    """The fake Entra token in `body` was minted for this app (and scope)."""
    claims = decode_fake_token(str(body["access_token"]))
    assert claims["appid"] == client_id.lower()
    assert claims["tid"] == tenant_id.lower()
    if scope is not None:
        assert claims["scp"] == scope
    return claims


def assert_imds_error(status: int, body: bytes, expected_status: int,
                      error: str | None = "invalid_request") -> dict[str, str]:
    assert status == expected_status, body
    doc: dict[str, str] = json.loads(body)
    assert set(doc) == {"error", "error_description"}, doc
    assert isinstance(doc["error_description"], str) and doc["error_description"]
    if error is not None:
        assert doc["error"] == error
    return doc


# ---- real clients ---------------------------------------------------------------------------


def test_curl_as_another_uid_gets_the_default_identitys_token(
        proxy: ProxyProcess, entra: FakeEntraClient, pod: Pod) -> None:
    url = (f"{proxy.base_url}{TOKEN_PATH}?api-version=2018-02-01"
           "&resource=https://management.azure.com/")
    done = subprocess.run(as_uid(CLIENT_UID, ["curl", "-s", "-H", "Metadata:true", "-w",
                                              "\n%{http_code}", url]),
                          capture_output=True, text=True, timeout=20, cwd="/", check=False)
    body, _, code = done.stdout.rpartition("\n")
    assert code == "200", done.stdout + done.stderr
    doc = json.loads(body)
    assert doc["resource"] == "https://management.azure.com/"
    assert doc["client_id"] == pod.client_id
    assert_token_for(doc, client_id=pod.client_id, tenant_id=pod.tenant_id,
                     scope="https://management.azure.com//.default")


@pytest.mark.parametrize("with_client_id", [True, False], ids=["user-assigned", "default"])
def test_azure_identity_managed_identity_credential(
        proxy: ProxyProcess, entra: FakeEntraClient, pod: Pod, new_app: Callable[..., str],
        monkeypatch: pytest.MonkeyPatch, with_client_id: bool) -> None:
    from azure.identity import ManagedIdentityCredential

    # azure-identity (and MSAL) send IMDS requests to this host instead of 169.254.169.254.
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", proxy.base_url)
    client_id = new_app() if with_client_id else pod.client_id
    resource = unique_resource("azid").rstrip("/")
    credential = (ManagedIdentityCredential(client_id=client_id) if with_client_id
                  else ManagedIdentityCredential())
    with credential:
        token = credential.get_token(resource + "/.default")
    claims = decode_fake_token(token.token)
    assert claims["appid"] == client_id
    assert claims["tid"] == pod.tenant_id
    assert claims["scp"] == resource + "/.default"
    assert token.expires_on > time.time() + 3000
    assert [r["client_id"] for r in entra.exchanges()] == [client_id]


@pytest.mark.parametrize("user_assigned", [True, False], ids=["user-assigned", "system-assigned"])
def test_msal_managed_identity_client(
        proxy: ProxyProcess, entra: FakeEntraClient, pod: Pod, new_app: Callable[..., str],
        monkeypatch: pytest.MonkeyPatch, user_assigned: bool) -> None:
    import msal
    import requests

    # msal/managed_identity.py (_obtain_token_on_azure_vm) reads this variable too.
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", proxy.base_url)
    client_id = new_app() if user_assigned else pod.client_id
    identity = (msal.UserAssignedManagedIdentity(client_id=client_id) if user_assigned
                else msal.SystemAssignedManagedIdentity())
    resource = unique_resource("msal")
    with requests.Session() as session:
        app = msal.ManagedIdentityClient(identity, http_client=session)
        result = app.acquire_token_for_client(resource=resource)
        again = app.acquire_token_for_client(resource=resource)
    assert "access_token" in result, result
    assert_token_for(result, client_id=client_id, tenant_id=pod.tenant_id,
                     scope=resource + "/.default")
    assert 3000 < result["expires_in"] <= 3599
    assert again["access_token"] == result["access_token"]
    assert len(entra.exchanges()) == 1


# ---- the 200 answer and the exchange behind it -------------------------------------------


def test_token_answer_is_exactly_imds_eight_string_fields(
        proxy: ProxyProcess, entra: FakeEntraClient, pod: Pod, new_app: Callable[..., str]
) -> None:
    client_id = new_app()
    # Characters that need escaping in JSON and in the query: the answer echoes them verbatim.
    resource = unique_resource("shape").rstrip("/") + '/p?a=b&c="d"\\é'
    before = int(time.time())
    response = proxy.token(resource, client_id)
    after = int(time.time())
    assert response.status == 200, response
    assert response.headers["content-type"].startswith("application/json")
    doc = response.json()
    assert set(doc) == TOKEN_FIELDS
    assert all(isinstance(value, str) for value in doc.values()), doc
    for name in ("expires_in", "expires_on", "ext_expires_in", "not_before"):
        assert doc[name].isdigit(), (name, doc[name])
    assert doc["token_type"] == "Bearer"
    assert doc["resource"] == resource
    assert doc["client_id"] == client_id
    expires_in, expires_on = int(doc["expires_in"]), int(doc["expires_on"])
    assert 3590 <= expires_in <= 3599
    assert before + expires_in - 2 <= expires_on <= after + expires_in + 2
    assert before - 2 <= int(doc["not_before"]) <= after + 1
    assert 3590 <= int(doc["ext_expires_in"]) <= 3599
    assert_token_for(doc, client_id=client_id, tenant_id=pod.tenant_id,
                     scope=resource + "/.default")


@pytest.mark.parametrize(
    ("resource", "scope"),
    [
        ("https://vault.azure.net", "https://vault.azure.net/.default"),
        ("https://management.azure.com/", "https://management.azure.com//.default"),
        ("api://11111111-2222-3333-4444-555555555555/.default",
         "api://11111111-2222-3333-4444-555555555555/.default"),
    ],
    ids=["no-slash", "trailing-slash-kept", "already-default"],
)
def test_exchange_entra_sees(proxy: ProxyProcess, entra: FakeEntraClient, pod: Pod,
                             new_app: Callable[..., str], resource: str, scope: str) -> None:
    client_id = new_app()
    response = proxy.token(resource, client_id)
    assert response.status == 200, response
    exchanges = entra.exchanges()
    assert len(exchanges) == 1
    seen = exchanges[0]
    assert seen["method"] == "POST"
    assert seen["path"] == f"/{pod.tenant_id}/oauth2/v2.0/token"
    assert seen["query"] == ""
    assert seen["headers"]["content-type"].startswith("application/x-www-form-urlencoded")
    assert seen["form"] == {
        "grant_type": "client_credentials",
        "client_id": client_id,
        "scope": scope,
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": pod.token.read(),
    }
    assert seen["status"] == 200


def test_rotated_token_file_is_used_by_the_next_exchange(
        proxy_factory: Callable[..., ProxyProcess], entra: FakeEntraClient, pod: Pod) -> None:
    directory = shared_tempdir("azwi-rot-")
    try:
        token = ProjectedToken(directory, pod.new_sa_token())
        first_assertion = token.read()
        proxy = proxy_factory(AZURE_FEDERATED_TOKEN_FILE=str(token.path))
        first = unique_resource("rot1")
        assert proxy.token(first).status == 200
        # The kubelet swaps the ..data symlink; the path the proxy was given stays the same.
        token.rotate(pod.new_sa_token())
        assert token.read() != first_assertion
        second = unique_resource("rot2")
        assert proxy.token(second).status == 200
        assert proxy.token(first).status == 200  # a cache hit: no third exchange
        assertions = [(r["form"]["scope"], r["form"]["client_assertion"])
                      for r in entra.exchanges()]
        assert assertions == [(first + "/.default", first_assertion),
                              (second + "/.default", token.read())]
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ---- the cache ------------------------------------------------------------------------------


def test_second_identical_request_is_served_from_the_cache(
        proxy: ProxyProcess, entra: FakeEntraClient, new_app: Callable[..., str]) -> None:
    client_id = new_app()
    resource = unique_resource("cache")
    first = proxy.token(resource, client_id)
    second = proxy.token(resource, client_id)
    assert first.status == second.status == 200
    assert second.json()["access_token"] == first.json()["access_token"]
    assert len(entra.exchanges()) == 1
    # Another resource or another identity is another key.
    assert proxy.token(unique_resource("cache"), client_id).status == 200
    assert len(entra.exchanges()) == 2


def test_hundred_concurrent_requests_for_one_new_key_make_one_exchange(
        proxy: ProxyProcess, entra: FakeEntraClient, new_app: Callable[..., str]) -> None:
    client_id = new_app()
    # A slow Entra keeps the exchange in flight while all 100 requests arrive.
    entra.fault(client_id=client_id, delay_s=1.0)
    target = token_target(unique_resource("flight"), client_id)
    with concurrent.futures.ThreadPoolExecutor(max_workers=100) as pool:
        futures = [pool.submit(http_request, proxy.port, target,
                               headers={"Metadata": "true"}) for _ in range(100)]
        responses = [f.result() for f in futures]
    assert [r.status for r in responses] == [200] * 100
    assert len({r.json()["access_token"] for r in responses}) == 1
    assert len(entra.exchanges()) == 1


# ---- choosing the identity --------------------------------------------------------------------


def test_client_id_picks_the_identity_and_none_means_azure_client_id(
        proxy: ProxyProcess, entra: FakeEntraClient, pod: Pod, new_app: Callable[..., str]
) -> None:
    app_a, app_b = new_app(), new_app()
    resource = unique_resource("pick")
    answers = {name: proxy.token(resource, client_id) for name, client_id in
               (("a", app_a), ("b", app_b), ("default", None))}
    for name, client_id in (("a", app_a), ("b", app_b), ("default", pod.client_id)):
        assert answers[name].status == 200, answers[name]
        assert answers[name].json()["client_id"] == client_id
        assert_token_for(answers[name].json(), client_id=client_id, tenant_id=pod.tenant_id)
    assert sorted(r["client_id"] for r in entra.exchanges()) == sorted(
        [app_a, app_b, pod.client_id])


def test_no_client_id_and_no_azure_client_id_is_400_naming_what_to_set(
        proxy_factory: Callable[..., ProxyProcess], entra: FakeEntraClient) -> None:
    proxy = proxy_factory(AZURE_CLIENT_ID=None)
    response = proxy.token(unique_resource("nodefault"))
    doc = assert_imds_error(response.status, response.body, 400)
    assert "AZURE_CLIENT_ID" in doc["error_description"]
    assert entra.exchanges() == []


def test_unknown_client_is_entras_permanent_error_as_400(
        proxy: ProxyProcess, entra: FakeEntraClient, pod: Pod) -> None:
    stranger = "0badc0de-0000-4000-8000-000000000000"
    response = proxy.token(unique_resource("stranger"), stranger)
    doc = assert_imds_error(response.status, response.body, 400, error=None)
    assert "AADSTS700016" in doc["error_description"]
    assert stranger in doc["error_description"]
    # Permanent: no retries.
    assert len(entra.exchanges()) == 1


# ---- error paths ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Metadata": "false"}, {"Metadata": ""}],
    ids=["absent", "false", "empty"],
)
def test_without_metadata_true_is_400_at_once_and_no_exchange(
        proxy: ProxyProcess, entra: FakeEntraClient, pod: Pod,
        headers: dict[str, str]) -> None:
    # Even with a slow Entra the answer is immediate: SDK chains probe this way.
    entra.fault(delay_s=5.0, times=None)
    started = time.monotonic()
    response = proxy.get(token_target(unique_resource("probe")), headers)
    elapsed = time.monotonic() - started
    assert_imds_error(response.status, response.body, 400)
    assert elapsed < 1.0
    assert entra.exchanges() == []


def test_x_forwarded_for_is_400(proxy: ProxyProcess, entra: FakeEntraClient) -> None:
    response = proxy.get(token_target(unique_resource("xff")),
                         {"Metadata": "true", "X-Forwarded-For": "10.0.0.7"})
    assert_imds_error(response.status, response.body, 400)
    assert entra.exchanges() == []


@pytest.mark.parametrize(
    "target",
    [
        f"{TOKEN_PATH}?api-version=2018-02-01",
        f"{TOKEN_PATH}?api-version=2018-02-01&resource=",
        f"{TOKEN_PATH}?resource=https%3A%2F%2Fvault.azure.net",
        TOKEN_PATH,
    ],
    ids=["no-resource", "empty-resource", "no-api-version", "no-query"],
)
def test_missing_query_parameters_are_400(proxy: ProxyProcess, entra: FakeEntraClient,
                                          target: str) -> None:
    response = proxy.get(target, {"Metadata": "true"})
    assert_imds_error(response.status, response.body, 400)
    assert entra.exchanges() == []


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_other_methods_on_the_token_path_are_405(proxy: ProxyProcess, entra: FakeEntraClient,
                                                 method: str) -> None:
    response = proxy.get(token_target(unique_resource("verb")), {"Metadata": "true"},
                         method=method)
    assert_imds_error(response.status, response.body, 405, error=None)
    assert entra.exchanges() == []


@pytest.mark.parametrize(
    ("code", "status"),
    [(70021, 400), (700016, 400), (90002, 400), (500011, 400), (7000215, 401)],
    ids=["AADSTS70021", "AADSTS700016", "AADSTS90002", "AADSTS500011", "AADSTS7000215-401"],
)
def test_entra_permanent_errors_are_400_with_the_aadsts_code(
        proxy: ProxyProcess, entra: FakeEntraClient, new_app: Callable[..., str],
        code: int, status: int) -> None:
    client_id = new_app()
    entra.fault(client_id=client_id, aadsts=code, status=status)
    response = proxy.token(unique_resource("perm"), client_id)
    doc = assert_imds_error(response.status, response.body, 400, error=None)
    assert f"AADSTS{code}" in doc["error_description"]
    assert len(entra.exchanges()) == 1  # not retried


def test_a_failure_is_remembered_briefly_then_retried(
        proxy: ProxyProcess, entra: FakeEntraClient, new_app: Callable[..., str]) -> None:
    client_id = new_app()
    entra.fault(client_id=client_id, aadsts=70021)
    resource = unique_resource("backoff")
    assert proxy.token(resource, client_id).status == 400
    # The app retries at once and often; Entra sees none of these until the back-off ends,
    # and then the same request succeeds (the failure was not cached for the token's life).
    deadline = time.monotonic() + 10
    statuses = []
    while time.monotonic() < deadline:
        statuses.append(proxy.token(resource, client_id).status)
        if statuses[-1] == 200:
            break
        time.sleep(0.2)
    assert statuses[-1] == 200, statuses
    assert set(statuses[:-1]) <= {400}
    assert [r["status"] for r in entra.exchanges()] == [400, 200]


# Transient failures that outlast the proxy's retries: (fault, status the app gets).
# CONTRACT.md: throttling, 5xx and unreachable come back as 429/503 with Retry-After; a
# 200 without a usable token is not a token either.
LASTING_FAILURES: dict[str, tuple[dict[str, Any], int | None]] = {
    "429": ({"status": 429, "headers": {"Retry-After": "1"},
             "body": {"error": "temporarily_unavailable",
                      "error_description": "AADSTS50196: throttled", "error_codes": [50196]}},
            429),
    "500": ({"status": 500}, 503),
    "502": ({"status": 502, "body": "<html>Bad Gateway</html>",
             "content_type": "text/html"}, 503),
    "503": ({"status": 503, "headers": {"Retry-After": "1"}}, 503),
    "504": ({"status": 504}, 503),
    "reset": ({"reset": True}, 503),
    "200-html": ({"non_json": True}, None),
    "200-no-access_token": ({"omit": ["access_token"]}, None),
    "200-no-expires_in": ({"omit": ["expires_in"]}, None),
}


def test_lasting_transient_entra_failures(
        proxy: ProxyProcess, entra: FakeEntraClient, new_app: Callable[..., str]) -> None:
    # Each case waits out the proxy's back-off; they are independent, so run them at once.
    cases = {name: (new_app(), fault, status)
             for name, (fault, status) in LASTING_FAILURES.items()}
    for client_id, fault, _ in cases.values():
        entra.fault(client_id=client_id, times=None, **fault)
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(cases)) as pool:
        futures = {name: pool.submit(proxy.token, unique_resource("lasting"), client_id)
                   for name, (client_id, _, _) in cases.items()}
        responses = {name: future.result() for name, future in futures.items()}
    problems = []
    for name, response in responses.items():
        expected = cases[name][2]
        doc = response.json()
        if expected is None:
            ok = 500 <= response.status < 600 and "access_token" not in doc
        else:
            retry_after = response.headers.get("retry-after", "")
            ok = (response.status == expected and set(doc) == {"error", "error_description"}
                  and retry_after.isdigit() and int(retry_after) >= 1)
        if not ok:
            problems.append(f"{name}: expected {expected or '5xx'}, got {response}")
    assert problems == []
    tried = {r["client_id"] for r in entra.exchanges()}
    assert tried == {client_id for client_id, _, _ in cases.values()}


@pytest.mark.parametrize(
    "fault",
    [{"status": 503}, {"status": 429, "headers": {"Retry-After": "1"}}, {"reset": True}],
    ids=["503", "429", "reset"],
)
def test_one_transient_entra_failure_is_retried(
        proxy: ProxyProcess, entra: FakeEntraClient, new_app: Callable[..., str],
        fault: dict[str, Any]) -> None:
    client_id = new_app()
    entra.fault(client_id=client_id, times=1, **fault)
    response = proxy.token(unique_resource("retry"), client_id)
    assert response.status == 200, response
    assert [r["status"] for r in entra.exchanges()] == [fault.get("status", "reset"), 200]


def test_unreachable_entra_is_503_with_retry_after(
        proxy_factory: Callable[..., ProxyProcess]) -> None:
    dead = f"https://127.0.0.1:{free_port()}/"
    proxy = proxy_factory(AZURE_AUTHORITY_HOST=dead)
    response = proxy.token(unique_resource("dead"))
    assert_imds_error(response.status, response.body, 503, error=None)
    assert response.headers["retry-after"].isdigit()


def test_slow_entra_within_the_timeout_still_answers(
        proxy: ProxyProcess, entra: FakeEntraClient, new_app: Callable[..., str]) -> None:
    client_id = new_app()
    entra.fault(client_id=client_id, delay_s=1.5)
    assert proxy.token(unique_resource("slow"), client_id).status == 200


def test_readyz_and_healthz(proxy: ProxyProcess) -> None:
    for path in ("/readyz", "/healthz"):
        response = proxy.get(path)
        assert response.status == 200
        assert response.body.strip() == b"ok"


# ---- paths: the token path's spellings, pass-through and near misses ---------------------


@pytest.mark.parametrize(
    "path",
    ["/METADATA/identity/oauth2/token/", "/Metadata/identity/oauth2/token",
     "/metadata/identity/oauth2/token/"],
    ids=["upper-slash", "mixed", "slash"],
)
def test_token_path_spellings_imds_accepts(proxy: ProxyProcess, entra: FakeEntraClient,
                                           pod: Pod, imds: FakeImdsClient, path: str) -> None:
    response = proxy.get(token_target(unique_resource("spell"), path=path), {"Metadata": "true"})
    assert response.status == 200, response
    assert_token_for(response.json(), client_id=pod.client_id, tenant_id=pod.tenant_id)
    assert imds.records() == []


@pytest.mark.parametrize(
    "path",
    [
        "/metadata/identity/oauth2/tokenX",
        "/metadata/identity/foo",
        "/metadata/identity",
        "/METADATA/identity/oauth2/token/extra",
        "/metadata/%69dentity/oauth2/token",
        "/metadata/identity/oauth2/%74oken",
        "/metadata/%2569dentity/oauth2/token",
        "/metadata/identity%2Foauth2%2Ftoken",
        "//metadata/identity/oauth2/token",
        "/metadata/./identity/oauth2/token",
        "/x/../metadata/identity/oauth2/token",
        "/metadata/IDENTITY/oauth2/token",
    ],
)
def test_near_miss_identity_paths_are_refused_and_never_reach_imds(
        proxy: ProxyProcess, entra: FakeEntraClient, imds: FakeImdsClient, path: str) -> None:
    target = token_target(unique_resource("near"), path=path)
    response = proxy.get(target, {"Metadata": "true"})
    assert 400 <= response.status < 500, response
    assert NODE_TOKEN_MARK.encode() not in response.body
    assert imds.records() == []
    assert entra.exchanges() == []


def test_instance_metadata_passes_through_without_hop_by_hop_headers(
        proxy: ProxyProcess, imds: FakeImdsClient) -> None:
    response = proxy.get(
        "/metadata/instance?api-version=2021-02-01&format=json",
        {"Metadata": "true", "X-Custom": "kept", "Connection": "keep-alive, X-Hop",
         "X-Hop": "dropped", "Keep-Alive": "timeout=5", "Proxy-Authorization": "Basic eDp5",
         "TE": "trailers", "User-Agent": "e2e-test/1"},
    )
    assert response.status == 200, response
    assert response.json() == INSTANCE
    records = imds.records()
    assert len(records) == 1
    seen = records[0]
    assert seen["method"] == "GET"
    assert seen["path"] == "/metadata/instance"
    assert urllib.parse.parse_qs(seen["query"]) == {"api-version": ["2021-02-01"],
                                                    "format": ["json"]}
    names = {name.lower(): value for name, value in seen["headers"]}
    assert names["metadata"] == "true"
    assert names["x-custom"] == "kept"
    assert names["user-agent"] == "e2e-test/1"
    for hop in ("x-hop", "keep-alive", "proxy-authorization", "te", "x-forwarded-for"):
        assert hop not in names, (hop, names)


def test_instance_metadata_without_metadata_header_gets_imds_own_answer(
        proxy: ProxyProcess, imds: FakeImdsClient) -> None:
    response = proxy.get("/metadata/instance?api-version=2021-02-01")
    assert response.status == 400
    assert "metadata header" in response.json()["error"]
    assert len(imds.records()) == 1


def test_x_forwarded_for_never_reaches_imds(proxy: ProxyProcess,
                                            imds: FakeImdsClient) -> None:
    response = proxy.get("/metadata/instance?api-version=2021-02-01",
                         {"Metadata": "true", "X-Forwarded-For": "10.1.2.3"})
    records = imds.records()
    for record in records:
        assert "x-forwarded-for" not in {name.lower() for name, _ in record["headers"]}
    # Either refused by the proxy, or passed through without the header (and then answered).
    assert (response.status == 400 and records == []) or (
        response.status == 200 and len(records) == 1), response


def test_passthrough_none_refuses_other_paths(
        proxy_factory: Callable[..., ProxyProcess], imds: FakeImdsClient) -> None:
    proxy = proxy_factory(args=["--passthrough=none"])
    response = proxy.get("/metadata/instance?api-version=2021-02-01", {"Metadata": "true"})
    assert 400 <= response.status < 500, response
    assert "error" in response.json()
    assert imds.records() == []
    assert proxy.token(unique_resource("pnone")).status == 200


# ---- HTTP over a raw socket --------------------------------------------------------------


def test_keep_alive_serves_several_requests_on_one_connection(
        proxy: ProxyProcess, entra: FakeEntraClient) -> None:
    target = token_target(unique_resource("ka"))
    with RawConnection(proxy.port) as conn:
        for _ in range(3):
            conn.send(token_request(target))
            response = conn.read_response()
            assert response.status == 200
            assert response.json()["token_type"] == "Bearer"
        conn.send(READYZ)
        assert conn.read_response().body.strip() == b"ok"
    assert len(entra.exchanges()) == 1


def test_pipelined_requests_are_answered_in_order(
        proxy: ProxyProcess, entra: FakeEntraClient, new_app: Callable[..., str]) -> None:
    slow_client = new_app()
    entra.fault(client_id=slow_client, delay_s=0.5)
    first = unique_resource("pipe1")
    with RawConnection(proxy.port) as conn:
        # One send: a slow token request, a probe, and a bad request for the same path.
        conn.send(token_request(token_target(first, slow_client)) + READYZ
                  + b"GET " + token_target(first).encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        one, two, three = conn.read_response(), conn.read_response(), conn.read_response()
    assert one.status == 200
    assert one.json()["resource"] == first
    assert one.json()["client_id"] == slow_client
    assert (two.status, two.body.strip()) == (200, b"ok")
    assert three.status == 400


def test_http_1_0_is_answered_and_closed(proxy: ProxyProcess, entra: FakeEntraClient) -> None:
    with RawConnection(proxy.port) as conn:
        conn.send(token_request(token_target(unique_resource("h10")), version=b"HTTP/1.0"))
        response = conn.read_response()
        assert response.status == 200
        assert response.json()["token_type"] == "Bearer"
        assert conn.at_eof()


def test_connection_close_is_honoured(proxy: ProxyProcess) -> None:
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        response = conn.read_response()
        assert response.status == 200
        assert conn.at_eof()


def test_head_readyz_has_no_body_and_keeps_the_connection(proxy: ProxyProcess) -> None:
    with RawConnection(proxy.port) as conn:
        conn.send(b"HEAD /readyz HTTP/1.1\r\nHost: x\r\n\r\n" + HEALTHZ)
        head = conn.read_response(head=True)
        assert head.status == 200
        following = conn.read_response()
        # Had HEAD carried a body, it would be read here as the next status line.
        assert (following.status, following.body.strip()) == (200, b"ok")


def test_head_on_the_token_path_is_405(proxy: ProxyProcess, entra: FakeEntraClient) -> None:
    # CONTRACT.md: "405 for a method other than GET".
    with RawConnection(proxy.port) as conn:
        conn.send(token_request(token_target(unique_resource("head")), method=b"HEAD") + READYZ)
        head = conn.read_response(head=True)
        following = conn.read_response()
    assert head.status == 405
    assert following.status == 200
    assert entra.exchanges() == []


@pytest.mark.parametrize(
    "garbage",
    [b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: 169.254.169.254\r\nBad Header\r\n\r\n",
     b"GET /readyz HTTP/9.9\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40],
    ids=["no-version", "bad-header", "bad-version", "tls-hello"],
)
def test_malformed_request_gets_400_and_close(proxy: ProxyProcess, garbage: bytes) -> None:
    with RawConnection(proxy.port) as conn:
        conn.send(garbage)
        response = conn.read_response()
        assert response.status == 400
        assert conn.at_eof()


@pytest.mark.parametrize("first", ["token", "readyz"])
def test_good_request_then_garbage_in_one_send(proxy: ProxyProcess, entra: FakeEntraClient,
                                              first: str) -> None:
    # The good request was complete before the garbage: it is answered, then the 400.
    good = token_request(token_target(unique_resource("thengarbage"))) if first == "token" \
        else READYZ
    with RawConnection(proxy.port) as conn:
        conn.send(good + b"GARBAGE\r\n\r\n")
        response = conn.read_response()
        assert response.status == 200
        if first == "token":
            assert response.json()["token_type"] == "Bearer"
        assert conn.read_response().status == 400
        assert conn.at_eof()


# ---- where it listens ---------------------------------------------------------------------


def _listeners(port: int) -> list[str]:
    """Local addresses of LISTEN sockets on `port`, from /proc/net/tcp{,6} (state 0A)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        lines = Path(table).read_text().splitlines()[1:] if os.path.exists(table) else []
        for line in lines:
            fields = line.split()
            address, _, hex_port = fields[1].rpartition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:
                found.append(address)
    return found


def test_listens_on_127_0_0_1_only(proxy: ProxyProcess) -> None:
    # 0100007F is 127.0.0.1 in the kernel's little-endian hex.
    assert _listeners(proxy.port) == ["0100007F"]
    listing = subprocess.run(["ss", "-Hltn", f"sport = :{proxy.port}"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
    # Columns: State Recv-Q Send-Q Local:Port Peer:Port.
    assert [line.split()[3] for line in listing.splitlines()] == [f"127.0.0.1:{proxy.port}"]


def test_assertion_never_appears_in_the_proxy_output(
        proxy: ProxyProcess, entra: FakeEntraClient, pod: Pod) -> None:
    response = proxy.token(unique_resource("leak"))
    assert response.status == 200
    token = response.json()["access_token"]
    text = proxy.log_text()
    assert pod.token.read() not in text
    assert token not in text
