"""The fakes the proxy's end-to-end tests trust: do they refuse what Entra and IMDS refuse?

The e2e tests only catch a malformed exchange if the fake Entra rejects it, so its
validation is checked here against hand-made requests, together with the identity-binding
mode (SNI-only certificate, path prefix, certificate reload) and running the stdlib fakes
inside a network namespace with Debian's python3, as the root tests do.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from support.fake_entra import (
    ASSERTION_TYPE,
    FakeEntraClient,
    b64url_encode,
    decode_fake_token,
    issue_server_cert,
)
from support.proxyproc import (
    SUPPORT_DIR,
    EntraHandle,
    Pod,
    start_fake_entra,
    start_script,
)

pytest_plugins = ["support.fixtures"]
pytestmark = pytest.mark.timeout(60)


def post_token(handle: EntraHandle, path: str, body: bytes | str,
               content_type: str = "application/x-www-form-urlencoded",
               method: str = "POST") -> tuple[int, dict[str, object]]:
    parts = urllib.parse.urlsplit(handle.url)
    ctx = ssl.create_default_context(cafile=handle.ca_file)
    conn = http.client.HTTPSConnection(str(parts.hostname), parts.port, context=ctx, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def good_form(pod: Pod, **changes: str | None) -> dict[str, str]:
    form = {
        "grant_type": "client_credentials",
        "client_id": pod.client_id,
        "scope": "https://vault.azure.net/.default",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": pod.token.read(),
    }
    for name, value in changes.items():
        if value is None:
            form.pop(name)
        else:
            form[name] = value
    return form


def jwt(claims: dict[str, object]) -> str:
    return ".".join((b64url_encode(b'{"alg":"RS256"}'), b64url_encode(json.dumps(claims).encode()),
                     b64url_encode(b"sig")))


def test_fake_entra_issues_a_token_naming_tenant_client_and_scope(
        fake_entra_server: EntraHandle, entra: FakeEntraClient, pod: Pod) -> None:
    status, doc = post_token(fake_entra_server, f"/{pod.tenant_id}/oauth2/v2.0/token",
                             urllib.parse.urlencode(good_form(pod)))
    assert status == 200, doc
    assert set(doc) == {"token_type", "expires_in", "ext_expires_in", "access_token"}
    claims = decode_fake_token(str(doc["access_token"]))
    assert (claims["tid"], claims["appid"], claims["scp"], claims["n"]) == (
        pod.tenant_id, pod.client_id, "https://vault.azure.net/.default", 1)
    [record] = entra.records()
    assert record["form"] == good_form(pod)
    assert record["status"] == 200


def _bad_cases(pod: Pod) -> dict[str, tuple[dict[str, str], int]]:
    sub = pod.subject
    exp = int(time.time()) + 600
    aud = ["api://AzureADTokenExchange"]
    return {
        "no-grant_type": (good_form(pod, grant_type=None), 900144),
        "password-grant": (good_form(pod, grant_type="password"), 70003),
        "no-scope": (good_form(pod, scope=None), 900144),
        "scope-without-default": (good_form(pod, scope="https://vault.azure.net"), 70011),
        "two-scopes": (good_form(pod, scope="https://a/.default https://b/.default"), 70011),
        "client-not-guid": (good_form(pod, client_id="my-app"), 700016),
        "unknown-client": (good_form(pod, client_id="00000000-0000-4000-8000-000000000000"),
                           700016),
        "assertion-type": (good_form(pod, client_assertion_type="jwt"), 50027),
        "no-assertion": (good_form(pod, client_assertion=None), 900144),
        "assertion-not-jwt": (good_form(pod, client_assertion="not-a-jwt"), 50027),
        "expired": (good_form(pod, client_assertion=jwt(
            {"iss": pod.issuer, "sub": sub, "aud": aud, "exp": int(time.time()) - 5})), 700024),
        "wrong-audience": (good_form(pod, client_assertion=jwt(
            {"iss": pod.issuer, "sub": sub, "aud": ["https://kubernetes.default"], "exp": exp})),
            700212),
        "other-subject": (good_form(pod, client_assertion=jwt(
            {"iss": pod.issuer, "sub": "system:serviceaccount:other:sa", "aud": aud,
             "exp": exp})), 70021),
        "other-issuer": (good_form(pod, client_assertion=jwt(
            {"iss": "https://evil.example/", "sub": sub, "aud": aud, "exp": exp})), 70021),
        "extra-field": ({**good_form(pod), "client_secret": "x"}, 90014),
    }


def test_fake_entra_refuses_what_entra_refuses(fake_entra_server: EntraHandle,
                                               entra: FakeEntraClient, pod: Pod) -> None:
    path = f"/{pod.tenant_id}/oauth2/v2.0/token"
    wrong = []
    for name, (form, code) in _bad_cases(pod).items():
        status, doc = post_token(fake_entra_server, path, urllib.parse.urlencode(form))
        if status not in (400, 401) or doc.get("error_codes") != [code] or not str(
                doc.get("error_description", "")).startswith(f"AADSTS{code}:"):
            wrong.append((name, status, doc))
    assert wrong == []
    # The request itself: content type, method, tenant.
    body = urllib.parse.urlencode(good_form(pod))
    assert post_token(fake_entra_server, path, json.dumps(good_form(pod)),
                      content_type="application/json")[1]["error_codes"] == [900144]
    assert post_token(fake_entra_server, path, body, method="PUT")[1]["error_codes"] == [900561]
    assert post_token(fake_entra_server, "/other-tenant/oauth2/v2.0/token",
                      body)[1]["error_codes"] == [90002]
    assert post_token(fake_entra_server, f"/{pod.tenant_id}/oauth2/token", body)[0] == 404


def test_fake_entra_faults(fake_entra_server: EntraHandle, entra: FakeEntraClient,
                           pod: Pod) -> None:
    path, body = f"/{pod.tenant_id}/oauth2/v2.0/token", urllib.parse.urlencode(good_form(pod))
    entra.fault(client_id=pod.client_id, times=2, status=429, headers={"Retry-After": "7"})
    entra.fault(expires_in=120, refresh_in=60)
    assert post_token(fake_entra_server, path, body)[0] == 429
    assert post_token(fake_entra_server, path, body)[0] == 429
    status, doc = post_token(fake_entra_server, path, body)
    assert (status, doc["expires_in"], doc["refresh_in"]) == (200, 120, 60)
    assert post_token(fake_entra_server, path, body)[1]["expires_in"] == 3599
    entra.fault(aadsts=700016)
    assert post_token(fake_entra_server, path, body)[1]["error_codes"] == [700016]
    entra.fault(reset=True)
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
        post_token(fake_entra_server, path, body)
    assert [r["status"] for r in entra.records()] == [429, 429, 200, 200, 400, "reset"]


@pytest.fixture
def binding(entra_ca: tuple[trustme.CA, str], tmp_path: Path) -> Iterator[EntraHandle]:
    """Name: binding. Scope: function. A fake Entra in identity-binding mode (SNI-only)."""
    ca, ca_file = entra_ca
    issue_server_cert(ca, tmp_path / "certs", "binding.azwi.test")
    process = start_fake_entra(tmp_path / "certs", tmp_path / "binding.log",
                               sni_only="binding.azwi.test")
    try:
        client = FakeEntraClient(process.url, ca_file, sni_name="binding.azwi.test")
        yield EntraHandle(process, client, process.url, ca_file, tmp_path / "certs")
    finally:
        process.stop()


def _handshake(url: str, ca_file: str, sni: str) -> ssl.SSLSocket:
    parts = urllib.parse.urlsplit(url)
    ctx = ssl.create_default_context(cafile=ca_file)
    sock = socket.create_connection((str(parts.hostname), int(parts.port or 443)), timeout=5)
    try:
        return ctx.wrap_socket(sock, server_hostname=sni)
    except BaseException:
        sock.close()
        raise


def test_binding_mode_accepts_only_its_sni_and_records_it(
        binding: EntraHandle, entra_ca: tuple[trustme.CA, str], pod: Pod) -> None:
    client = binding.client
    client.configure(path_prefix="/tenants-proxy")
    client.add_app(pod.tenant_id, pod.client_id, [pod.subject], pod.issuer)
    # Dialling the IP sends no SNI (RFC 6066 forbids IP literals there): refused.
    with pytest.raises(ssl.SSLError):
        _handshake(binding.url, binding.ca_file, "127.0.0.1").close()
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        _handshake(binding.url, binding.ca_file, "other.azwi.test").close()
    with _handshake(binding.url, binding.ca_file, "binding.azwi.test") as tls:
        form = urllib.parse.urlencode(good_form(pod)).encode()
        tls.sendall(b"POST /tenants-proxy/" + pod.tenant_id.encode() + b"/oauth2/v2.0/token"
                    b" HTTP/1.1\r\nHost: binding.azwi.test\r\nConnection: close\r\n"
                    b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: "
                    + str(len(form)).encode() + b"\r\n\r\n" + form)
        reply = b""
        while chunk := tls.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    [record] = client.records()
    assert record["sni"] == "binding.azwi.test"
    assert record["path"] == f"/tenants-proxy/{pod.tenant_id}/oauth2/v2.0/token"
    refused = [h for h in client.handshakes() if not h["accepted"]]
    assert [h["sni"] for h in refused] == [None, "other.azwi.test"]


def test_binding_mode_serves_a_reloaded_certificate(binding: EntraHandle) -> None:
    new_ca = trustme.CA()
    new_ca_file = binding.cert_dir.parent / "new-ca.pem"
    new_ca.cert_pem.write_to_path(str(new_ca_file))
    issue_server_cert(new_ca, binding.cert_dir, "binding.azwi.test")
    binding.client.reload_cert()
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(binding.url, binding.ca_file, "binding.azwi.test").close()
    _handshake(binding.url, str(new_ca_file), "binding.azwi.test").close()


@pytest.mark.root
def test_fakes_run_with_debian_python_inside_a_netns(unique_name: str, tmp_path: Path,
                                                     pod: Pod, entra_ca: tuple[trustme.CA, str]
                                                     ) -> None:
    python3 = shutil.which("python3", path="/usr/bin") or sys.executable
    ca, ca_file = entra_ca
    issue_server_cert(ca, tmp_path / "certs", "169.254.169.254")
    subprocess.run(["ip", "netns", "add", unique_name], check=True)
    processes = []
    try:
        inside = ["ip", "netns", "exec", unique_name]
        subprocess.run([*inside, "ip", "link", "set", "lo", "up"], check=True)
        subprocess.run([*inside, "ip", "addr", "add", "169.254.169.254/32", "dev", "lo"],
                       check=True)
        imds = start_script([*inside, python3, str(SUPPORT_DIR / "fake_imds.py"), "--bind",
                             "169.254.169.254:80"], tmp_path / "imds.log")
        processes.append(imds)
        entra = start_script([*inside, python3, str(SUPPORT_DIR / "fake_entra.py"), "--bind",
                              "169.254.169.254:443", "--cert-dir", str(tmp_path / "certs")],
                             tmp_path / "entra.log")
        processes.append(entra)
        assert (imds.url, entra.url) == ("http://169.254.169.254:80",
                                         "https://169.254.169.254:443")
        got = subprocess.run([*inside, "curl", "-s", "-H", "Metadata: true",
                              "http://169.254.169.254/metadata/instance?api-version=2021-02-01"],
                             capture_output=True, text=True, timeout=10, check=True)
        assert json.loads(got.stdout)["compute"]["osType"] == "Linux"
        form = urllib.parse.urlencode(good_form(pod))
        got = subprocess.run([*inside, "curl", "-s", "--cacert", ca_file, "-d", form,
                              f"https://169.254.169.254/{pod.tenant_id}/oauth2/v2.0/token"],
                             capture_output=True, text=True, timeout=10, check=True)
        # Nothing is configured in this instance: Entra's "tenant not found" proves the
        # form got through TLS and validation.
        assert json.loads(got.stdout)["error_codes"] == [90002]
    finally:
        for process in processes:
            process.stop()
        subprocess.run(["ip", "netns", "del", unique_name], check=False)
