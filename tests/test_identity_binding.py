"""AKS identity binding: exchanges through the cluster's token proxy instead of Entra (issue 4).

Name: test_identity_binding
Scope: the proxy as a real process (uid 1501) on loopback, against a fake binding token
    proxy: support/fake_entra.py with `--sni-only NAME`, a real TLS server whose certificate
    is valid only for NAME (not for 127.0.0.1), which refuses handshakes with another SNI and
    records the SNI, the connection number and the path of everything it sees. Module-scoped
    fakes and proxies serve tests that only read; a test that rotates certificates or CA
    files gets its own. The CA file is laid out as the kubelet projects a ConfigMap
    (`ca.crt -> ..data/ca.crt`, `..data` swapped atomically). One root test runs the whole
    pod in network namespaces.
Depends: support.fixtures (the pod, the fake Entra that AZURE_AUTHORITY_HOST names, proxy
    factories), support.netns, trustme.

What is asserted is CONTRACT.md ("With AZURE_KUBERNETES_TOKEN_PROXY set, the same request goes
to that https URL …") and what azure-identity's token-binding transport does
(`_internal/token_binding_transport_mixin.py`): SNI sent and verified, only the given CA
trusted, the CA file re-read when it changes, the last good CA kept mid-rotation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from support.fake_entra import (
    ASSERTION_TYPE,
    FORM_FIELDS,
    FakeEntraClient,
    decode_fake_token,
    issue_server_cert,
)
from support.proxyproc import (
    SUPPORT_DIR,
    EntraHandle,
    ImdsHandle,
    Pod,
    ProxyProcess,
    Response,
    ScriptProcess,
    free_port,
    pod_env,
    run_proxy_command,
    shared_tempdir,
    start_fake_entra,
    start_script,
    unique_resource,
)

from azwi_netproxy.demo.sandbox import ns_argv
from azwi_netproxy.logs import AccessLog
from azwi_netproxy.proxy import config, run
from azwi_netproxy.proxy.app import TokenApp
from azwi_netproxy.proxy.cache import TokenCache
from azwi_netproxy.proxy.metrics import Metrics
from azwi_netproxy.proxy.router import Router
from azwi_netproxy.proxy.tokens import CacheKey, Token
from azwi_netproxy.proxy.wire import Request

pytest_plugins = ["support.fixtures"]
pytestmark = pytest.mark.timeout(60)

# A name the binding proxy's certificate is valid for, as the webhook injects it; never an IP.
SNI = "tokenproxy.azure-workload-identity.svc"
OTHER_SNI = "other.azure-workload-identity.svc"
PREFIX = "/some/prefix"
BINDING_PORT = 8443
TOKEN_FIELDS = {"access_token", "client_id", "expires_in", "expires_on", "ext_expires_in",
                "not_before", "resource", "token_type"}
# What an error_description must name when TLS to the token proxy fails (issue 4: "fails
# with a clear error to the app").
TLS_CAUSE = ("certificate", "tls", "ssl", "sni", "handshake")

ProxyFactory = Callable[..., ProxyProcess]


# ---- the CA file as the kubelet projects it ---------------------------------------------------


class ProjectedCA:
    """`ca.crt -> ..data/ca.crt`, `..data -> ..<stamp>/`: the kubelet's AtomicWriter layout.

    `rotate` writes a new timestamped directory and renames a fresh symlink over `..data`,
    so a reader sees the old or the new bundle, never half of one. `truncate`, `garble`,
    `unreadable` and `binary` damage the file in place (what a reader may meet mid-rotation or
    on a misbehaving volume).
    """

    def __init__(self, directory: Path, pem: bytes | None) -> None:
        self.directory = directory
        self.path = directory / "ca.crt"
        self._current: Path | None = None
        if pem is not None:
            self.rotate(pem)

    def rotate(self, pem: bytes) -> None:
        stamp = f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{uuid.uuid4().hex[:9]}"
        new_dir = self.directory / stamp
        new_dir.mkdir(mode=0o755)
        new_dir.chmod(0o755)
        (new_dir / "ca.crt").write_bytes(pem)
        (new_dir / "ca.crt").chmod(0o644)
        tmp_link = self.directory / "..data_tmp"
        tmp_link.symlink_to(stamp)
        tmp_link.rename(self.directory / "..data")
        if not self.path.is_symlink():
            self.path.symlink_to("..data/ca.crt")
        if self._current is not None:
            shutil.rmtree(self._current)
        self._current = new_dir

    def _target(self) -> Path:
        assert self._current is not None
        return self._current / "ca.crt"

    def truncate(self) -> None:
        with self._target().open("wb"):
            pass

    def garble(self) -> None:
        self._target().write_bytes(b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n"
                                   b"-----END CERTIFICATE-----\n")

    def unreadable(self) -> None:
        self._target().chmod(0o000)

    def binary(self) -> None:
        """Bytes that are not text at all: a file caught mid-write on a broken volume."""
        self._target().write_bytes(b"\xff\xfe\x00\x9c-----BEGIN CERTIFICATE-----\x00\xff")


# ---- fakes and helpers --------------------------------------------------------------------


@dataclass
class BindingServer:
    """A fake binding token proxy: its process, control client, CA and certificate dir."""

    process: ScriptProcess
    client: FakeEntraClient
    ca: trustme.CA
    ca_file: str
    cert_dir: Path

    @property
    def url(self) -> str:
        return self.process.url

    def rotate_certificate(self) -> trustme.CA:
        """A new CA and a server certificate from it for SNI, served to new connections."""
        new_ca = trustme.CA()
        issue_server_cert(new_ca, self.cert_dir, SNI)
        self.client.reload_cert()
        # The control client must trust the new CA too.
        new_ca.cert_pem.write_to_path(self.ca_file)
        self.client = FakeEntraClient(self.url, self.ca_file, sni_name=SNI)
        return new_ca


def start_binding_server(directory: Path, *, sni_only: str | None = SNI) -> BindingServer:
    """A fake binding token proxy on 127.0.0.1 whose certificate names only SNI."""
    ca = trustme.CA()
    directory.mkdir(parents=True, exist_ok=True)
    ca_file = directory / "control-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert_dir = directory / "certs"
    issue_server_cert(ca, cert_dir, SNI)
    process = start_fake_entra(cert_dir, directory / "binding.log", sni_only=sni_only)
    return BindingServer(process, FakeEntraClient(process.url, str(ca_file), sni_name=SNI), ca,
                         str(ca_file), cert_dir)


def prepare(server: BindingServer, pod: Pod, **settings: Any) -> FakeEntraClient:
    """Reset the fake, serve under PREFIX and register the pod's app."""
    client = server.client
    client.reset()
    client.configure(path_prefix=PREFIX, **settings)
    client.add_app(pod.tenant_id, pod.client_id, [pod.subject], pod.issuer)
    return client


def binding_env(server: BindingServer, *, ca_file: str | None = None,
                ca_data: str | None = None, sni: str | None = SNI) -> dict[str, str | None]:
    """The webhook's identity-binding variables for `server` (overrides for pod_env)."""
    return {
        "AZURE_KUBERNETES_TOKEN_PROXY": server.url + PREFIX,
        "AZURE_KUBERNETES_SNI_NAME": sni,
        "AZURE_KUBERNETES_CA_FILE": ca_file,
        "AZURE_KUBERNETES_CA_DATA": ca_data,
    }


def pem_file(ca: trustme.CA, directory: Path, name: str) -> str:
    path = directory / name
    ca.cert_pem.write_to_path(str(path))
    path.chmod(0o644)
    return str(path)


def assert_token(response: Response, resource: str, pod: Pod) -> dict[str, Any]:
    """A 200 IMDS answer carrying the fake's token for the pod's app and `resource`."""
    assert response.status == 200, str(response)
    body = response.json()
    assert set(body) == TOKEN_FIELDS and all(isinstance(v, str) for v in body.values()), body
    assert body["resource"] == resource
    claims = decode_fake_token(body["access_token"])
    assert (claims["appid"], claims["tid"]) == (pod.client_id.lower(), pod.tenant_id.lower())
    assert claims["scp"] == resource + "/.default"
    return claims


def assert_retryable_503(response: Response) -> str:
    """A 503 IMDS error with Retry-After (SDKs retry it); its error_description."""
    assert response.status == 503, str(response)
    assert int(response.headers["retry-after"]) > 0
    doc = response.json()
    assert set(doc) == {"error", "error_description"}, doc
    assert doc["error"] == "service_unavailable"
    return str(doc["error_description"])


def warnings_about(proxy: ProxyProcess, path: Path) -> list[str]:
    """The messages of the proxy's warning log lines about `path`."""
    found = []
    for line in proxy.stderr_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") == "warn" and entry.get("path") == str(path):
            found.append(str(entry.get("message")))
    return found


def conns_of(client: FakeEntraClient) -> list[int]:
    """The connection number of each token exchange the fake served, in order."""
    return [r["conn"] for r in client.exchanges()]


# ---- module resources -------------------------------------------------------------------


@pytest.fixture(scope="module")
def binding_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BindingServer]:
    """Name: binding_server. Scope: module. The fake binding token proxy (--sni-only SNI)."""
    server = start_binding_server(tmp_path_factory.mktemp("binding"))
    try:
        yield server
    finally:
        server.process.stop()


@pytest.fixture(scope="module")
def binding_ca_file(binding_server: BindingServer) -> Iterator[str]:
    """Name: binding_ca_file. Scope: module. The binding server's CA, readable by uid 1501."""
    directory = shared_tempdir("azwi-bca-")
    try:
        yield pem_file(binding_server.ca, directory, "ca.crt")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def binding(binding_server: BindingServer, pod: Pod) -> FakeEntraClient:
    """Name: binding. Scope: function. The module binding fake, reset, app registered."""
    return prepare(binding_server, pod)


@pytest.fixture(scope="module")
def binding_proxy(module_proxy_factory: ProxyFactory, binding_server: BindingServer,
                  binding_ca_file: str) -> ProxyProcess:
    """Name: binding_proxy. Scope: module. A proxy in binding mode with AZURE_KUBERNETES_CA_FILE;
    AZURE_AUTHORITY_HOST still names the fake Entra of support.fixtures."""
    return module_proxy_factory(**binding_env(binding_server, ca_file=binding_ca_file))


@pytest.fixture(scope="module")
def binding_proxy_ca_data(module_proxy_factory: ProxyFactory,
                          binding_server: BindingServer) -> ProxyProcess:
    """Name: binding_proxy_ca_data. Scope: module. The same with AZURE_KUBERNETES_CA_DATA."""
    pem = binding_server.ca.cert_pem.bytes().decode()
    return module_proxy_factory(**binding_env(binding_server, ca_data=pem))


@pytest.fixture
def scratch() -> Iterator[Path]:
    """Name: scratch. Scope: function. A temp dir uid 1501 can read, removed afterwards."""
    directory = shared_tempdir("azwi-bind-")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ---- the exchange goes to the token proxy ------------------------------------------------


@pytest.mark.parametrize("ca_source", ["ca-file", "ca-data"])
def test_exchange_goes_to_the_token_proxy_with_its_sni_path_and_entras_form(
        request: pytest.FixtureRequest, binding: FakeEntraClient, entra: FakeEntraClient,
        pod: Pod, ca_source: str) -> None:
    proxy: ProxyProcess = request.getfixturevalue(
        "binding_proxy" if ca_source == "ca-file" else "binding_proxy_ca_data")
    resource = unique_resource("bind")
    assert_token(proxy.token(resource), resource, pod)
    [record] = binding.exchanges()
    # The certificate names only SNI, not 127.0.0.1: the handshake succeeded because the
    # proxy sent SNI and verified the certificate against it.
    assert record["sni"] == SNI
    assert record["method"] == "POST"
    assert record["path"] == f"{PREFIX}/{pod.tenant_id}/oauth2/v2.0/token"
    assert record["query"] == ""
    assert record["headers"]["content-type"].startswith("application/x-www-form-urlencoded")
    assert record["form"] == {
        "grant_type": "client_credentials",
        "client_id": pod.client_id,
        "scope": resource + "/.default",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": pod.token.read(),
    }
    assert set(record["form"]) == FORM_FIELDS
    # AZURE_AUTHORITY_HOST names a working fake Entra; binding mode never goes there.
    assert entra.records() == []


def test_second_request_for_the_same_resource_is_a_cache_hit(
        binding: FakeEntraClient, binding_proxy: ProxyProcess, pod: Pod) -> None:
    resource = unique_resource("hit")
    first = assert_token(binding_proxy.token(resource), resource, pod)
    second = assert_token(binding_proxy.token(resource), resource, pod)
    assert first == second
    assert len(binding.exchanges()) == 1


# ---- TLS failures: a clear 503 to the app, the proxy stays healthy ---------------------------


@dataclass
class FailureRun:
    proxy: ProxyProcess
    response: Response
    handshakes: list[dict[str, Any]]
    exchanges: list[dict[str, Any]]
    readyz_after: int


FAILURE_CASES = {
    # The CA file names a CA that did not sign the server's certificate; SSL_CERT_FILE names
    # the one that did: the system/env trust must not be used for the binding endpoint.
    "untrusted-ca": "strict",
    # SNI the server does not serve: it refuses the handshake (unrecognized_name).
    "sni-refused-by-server": "strict",
    # SNI the certificate is not valid for, on a server that answers any SNI: only the
    # proxy's own hostname check can stop this one.
    "sni-not-in-certificate": "lenient",
}


@pytest.fixture(scope="module")
def tls_failures(module_proxy_factory: ProxyFactory, pod: Pod,
                 tmp_path_factory: pytest.TempPathFactory,
                 entra_ca: tuple[trustme.CA, str]) -> Iterator[dict[str, FailureRun]]:
    """Name: tls_failures. Scope: module. Depends: the pod, support.fixtures' CA.

    Each failing exchange is retried with back-off for about three seconds before the app
    gets its answer, so the cases run side by side: one proxy each, against two fakes of
    their own (strict: --sni-only SNI; lenient: any SNI), with requests sent at once.
    """
    base = tmp_path_factory.mktemp("tls-failures")
    servers = {kind: start_binding_server(base / kind, sni_only=SNI if kind == "strict" else None)
               for kind in ("strict", "lenient")}
    readable = shared_tempdir("azwi-tlsf-")
    try:
        for server in servers.values():
            prepare(server, pod)
        _other_ca, other_ca_file = entra_ca
        signing_ca = {kind: pem_file(s.ca, readable, f"{kind}.pem") for kind, s in servers.items()}
        envs = {
            "untrusted-ca": {**binding_env(servers["strict"], ca_file=other_ca_file),
                             "SSL_CERT_FILE": signing_ca["strict"]},
            "sni-refused-by-server": binding_env(servers["strict"], ca_file=signing_ca["strict"],
                                                 sni=OTHER_SNI),
            "sni-not-in-certificate": binding_env(servers["lenient"],
                                                  ca_file=signing_ca["lenient"], sni=OTHER_SNI),
        }
        with concurrent.futures.ThreadPoolExecutor(len(envs)) as pool:
            proxies = dict(zip(envs, pool.map(lambda env: module_proxy_factory(**env),
                                              envs.values()), strict=True))
            responses = dict(zip(envs, pool.map(
                lambda case: proxies[case].token(unique_resource("tls")), envs), strict=True))
        runs = {}
        for case, proxy in proxies.items():
            server = servers[FAILURE_CASES[case]]
            runs[case] = FailureRun(proxy, responses[case], server.client.handshakes(),
                                    server.client.exchanges(), proxy.get("/readyz").status)
        yield runs
    finally:
        for server in servers.values():
            server.process.stop()
        shutil.rmtree(readable, ignore_errors=True)


@pytest.mark.parametrize("case", list(FAILURE_CASES))
def test_tls_failure_is_a_clear_503_and_the_proxy_stays_healthy(
        tls_failures: dict[str, FailureRun], case: str) -> None:
    run_ = tls_failures[case]
    description = assert_retryable_503(run_.response)
    assert run_.exchanges == [], "a request went over a connection that should not exist"
    assert run_.readyz_after == 200
    assert run_.proxy.proc.poll() is None
    if case == "untrusted-ca":
        # The right SNI reached the server (the control client's handshakes are the
        # accepted ones); the proxy then refused the certificate and ended the handshake.
        failed = [h for h in run_.handshakes if h["sni"] == SNI and not h["accepted"]]
        assert failed and all("error" in h for h in failed), run_.handshakes
    elif case == "sni-refused-by-server":
        refused = [h for h in run_.handshakes if h["sni"] == OTHER_SNI]
        assert refused and not any(h["accepted"] for h in refused), run_.handshakes
    else:
        # The server took OTHER_SNI; only the proxy's hostname check ended the handshake.
        ended = [h for h in run_.handshakes if h["sni"] == OTHER_SNI]
        assert ended and all("error" in h for h in ended), run_.handshakes
    assert any(word in description.lower() for word in TLS_CAUSE), (
        f"error_description does not name the TLS cause: {description!r}")


# ---- CA rotation while the proxy runs ----------------------------------------------------


@pytest.fixture
def rotating(tmp_path: Path, scratch: Path, pod: Pod,
             proxy_factory: ProxyFactory) -> Iterator[tuple[BindingServer, ProjectedCA, ProxyProcess]]:
    """Name: rotating. Scope: function. Depends: pod, proxy_factory.
    A fake binding server of this test's own, its CA projected as the kubelet does, and a
    proxy reading that file."""
    server = start_binding_server(tmp_path)
    try:
        prepare(server, pod)
        projected = ProjectedCA(scratch, server.ca.cert_pem.bytes())
        proxy = proxy_factory(**binding_env(server, ca_file=str(projected.path)))
        yield server, projected, proxy
    finally:
        server.process.stop()


def test_rotated_ca_and_certificate_work_without_restart_on_a_new_connection(
        rotating: tuple[BindingServer, ProjectedCA, ProxyProcess], pod: Pod) -> None:
    server, projected, proxy = rotating
    for _ in range(2):
        resource = unique_resource("before")
        assert_token(proxy.token(resource), resource, pod)
    first, second = conns_of(server.client)
    assert first == second, "two exchanges without a CA change should share a pooled connection"

    new_ca = server.rotate_certificate()
    projected.rotate(new_ca.cert_pem.bytes())
    resource = unique_resource("after")
    assert_token(proxy.token(resource), resource, pod)
    assert proxy.proc.poll() is None, "the proxy restarted"
    *_, third = conns_of(server.client)
    assert third != first, "the exchange after a CA change reused a connection made with the old CA"
    [handshake] = [h for h in server.client.handshakes() if h["conn"] == third]
    assert (handshake["sni"], handshake["accepted"]) == (SNI, True)


@pytest.mark.parametrize("damage", ["truncate", "garble", "unreadable", "binary"])
def test_damaged_ca_file_mid_rotation_keeps_the_last_good_ca(
        rotating: tuple[BindingServer, ProjectedCA, ProxyProcess], pod: Pod, damage: str) -> None:
    server, projected, proxy = rotating
    resource = unique_resource("good")
    assert_token(proxy.token(resource), resource, pod)
    getattr(projected, damage)()
    resource = unique_resource(damage)
    assert_token(proxy.token(resource), resource, pod)
    before, during = conns_of(server.client)
    # The last good CA's client is still in use: same pooled connection, no new handshake.
    assert before == during
    # …and that is because the damage was seen and set aside, not because nobody looked.
    assert warnings_about(proxy, projected.path), proxy.log_text()
    # The rotation completes: the new CA is picked up on a new connection.
    new_ca = server.rotate_certificate()
    projected.rotate(new_ca.cert_pem.bytes())
    resource = unique_resource("done")
    assert_token(proxy.token(resource), resource, pod)
    assert conns_of(server.client)[-1] != before


def test_ca_file_missing_at_start_is_a_503_until_it_appears(
        binding_server: BindingServer, binding: FakeEntraClient, pod: Pod, scratch: Path,
        proxy_factory: ProxyFactory) -> None:
    projected = ProjectedCA(scratch, None)
    proxy = proxy_factory(**binding_env(binding_server, ca_file=str(projected.path)))
    assert proxy.get("/readyz").status == 200
    description = assert_retryable_503(proxy.token(unique_resource("noca")))
    assert str(projected.path) in description and "CA" in description, description
    assert binding.exchanges() == []
    projected.rotate(binding_server.ca.cert_pem.bytes())
    resource = unique_resource("ca-appeared")
    assert_token(proxy.token(resource), resource, pod)
    assert [r["sni"] for r in binding.exchanges()] == [SNI]


# ---- start-up validation ---------------------------------------------------------------------

PEM_MARKERS = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
SECRET = "s3cr3t-pw"

STARTUP_ERRORS: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "http-url": ({"AZURE_KUBERNETES_TOKEN_PROXY": "http://127.0.0.1:9/p"},
                 ("AZURE_KUBERNETES_TOKEN_PROXY", "https")),
    "user-info": ({"AZURE_KUBERNETES_TOKEN_PROXY": f"https://user:{SECRET}@127.0.0.1:9/p"},
                  ("AZURE_KUBERNETES_TOKEN_PROXY", "user info")),
    "query": ({"AZURE_KUBERNETES_TOKEN_PROXY": "https://127.0.0.1:9/p?a=1"},
              ("AZURE_KUBERNETES_TOKEN_PROXY", "query")),
    "fragment": ({"AZURE_KUBERNETES_TOKEN_PROXY": "https://127.0.0.1:9/p#f"},
                 ("AZURE_KUBERNETES_TOKEN_PROXY", "fragment")),
    "ca-file-and-ca-data": ({"AZURE_KUBERNETES_TOKEN_PROXY": "https://127.0.0.1:9/p",
                             "AZURE_KUBERNETES_CA_FILE": "/etc/ca.crt",
                             "AZURE_KUBERNETES_CA_DATA": PEM_MARKERS},
                            ("AZURE_KUBERNETES_CA_FILE", "AZURE_KUBERNETES_CA_DATA",
                             "mutually exclusive")),
    "sni-without-url": ({"AZURE_KUBERNETES_SNI_NAME": SNI},
                        ("AZURE_KUBERNETES_SNI_NAME", "AZURE_KUBERNETES_TOKEN_PROXY")),
    "ca-file-without-url": ({"AZURE_KUBERNETES_CA_FILE": "/etc/ca.crt"},
                            ("AZURE_KUBERNETES_CA_FILE", "AZURE_KUBERNETES_TOKEN_PROXY")),
    "ca-data-without-url": ({"AZURE_KUBERNETES_CA_DATA": PEM_MARKERS},
                            ("AZURE_KUBERNETES_CA_DATA", "AZURE_KUBERNETES_TOKEN_PROXY")),
    "ca-data-not-pem": ({"AZURE_KUBERNETES_TOKEN_PROXY": "https://127.0.0.1:9/p",
                         "AZURE_KUBERNETES_CA_DATA": "not a certificate"},
                        ("AZURE_KUBERNETES_CA_DATA", "PEM")),
    # PEM armour around bytes that are no certificate: the SDKs fail when they load it.
    "ca-data-pem-markers-no-certificate": ({"AZURE_KUBERNETES_TOKEN_PROXY": "https://127.0.0.1:9/p",
                                            "AZURE_KUBERNETES_CA_DATA": PEM_MARKERS},
                                           ("AZURE_KUBERNETES_CA_DATA",)),
}


@pytest.fixture(scope="module")
def startup_results(python_for_other_uids: str, package_pythonpath: str, pod: Pod,
                    fake_entra_server: EntraHandle, fake_imds_server: ImdsHandle
                    ) -> dict[str, subprocess.CompletedProcess[str]]:
    """Name: startup_results. Scope: module. Depends: the pod's environment.
    Every bad setting at once, each as its own `python -m azwi_netproxy` as uid 1501 on a
    port of its own; one that does not exit within 10 s is killed and reported as such."""

    def attempt(overrides: dict[str, str]) -> subprocess.CompletedProcess[str]:
        env = pod_env(pod, fake_entra_server, fake_imds_server, package_pythonpath, **overrides)
        try:
            return run_proxy_command(python_for_other_uids, env, [f"--proxy-port={free_port()}"],
                                     timeout_s=10)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess([], -1, "", "still running after 10 s\n")

    with concurrent.futures.ThreadPoolExecutor(len(STARTUP_ERRORS)) as pool:
        done = list(pool.map(attempt, [env for env, _ in STARTUP_ERRORS.values()]))
    return dict(zip(STARTUP_ERRORS, done, strict=True))


@pytest.mark.parametrize("case", list(STARTUP_ERRORS))
def test_bad_binding_setting_exits_2_with_one_line_naming_it(
        startup_results: dict[str, subprocess.CompletedProcess[str]], case: str) -> None:
    done = startup_results[case]
    _env, names = STARTUP_ERRORS[case]
    assert done.returncode == 2, f"exit {done.returncode}\n{done.stderr[-2000:]}"
    assert done.stdout == ""
    assert done.stderr.endswith("\n") and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("azwi-netproxy: error: "), done.stderr
    for name in names:
        assert name in done.stderr, done.stderr
    assert SECRET not in done.stderr


# ---- the cache key includes the endpoint ----------------------------------------------------

TENANT = "00000000-0000-4000-8000-00000000000a"
CLIENT = "11111111-1111-4111-8111-111111111111"
BINDING_URL = "https://tokenproxy.kube-system.svc:8443/some/prefix"
AUTHORITY = "https://login.microsoftonline.com/"


def _config(**extra: str) -> config.ProxyConfig:
    env = {"AZURE_TENANT_ID": TENANT, "AZURE_CLIENT_ID": CLIENT,
           "AZURE_FEDERATED_TOKEN_FILE": "/var/run/secrets/azure/tokens/azure-identity-token",
           "AZURE_AUTHORITY_HOST": AUTHORITY, **extra}
    return config.load({}, env)


async def test_cache_keys_of_the_two_modes_differ_so_neither_serves_the_others_token() -> None:
    """One cache, two apps wired as run.serve wires them (authority mode, binding mode):
    the same request to each is a miss of its own, keyed by its endpoint."""
    fetched: list[CacheKey] = []

    async def fetch(key: CacheKey) -> Token:
        fetched.append(key)
        now = int(time.time())
        return Token(access_token=f"token-{len(fetched)}", token_type="Bearer", issued_at=now,
                     expires_on=now + 3600, ext_expires_on=now + 3600, refresh_on=now + 3000)

    cache = TokenCache(fetch)
    loop = asyncio.get_running_loop()
    apps = {}
    for mode, cfg in (("authority", _config()),
                      ("binding", _config(AZURE_KUBERNETES_TOKEN_PROXY=BINDING_URL,
                                          AZURE_KUBERNETES_SNI_NAME=SNI,
                                          AZURE_KUBERNETES_CA_FILE="/ca/ca.crt"))):
        endpoint = run.make_endpoint(cfg)
        try:
            apps[mode] = TokenApp(
                router=Router(default_client_id=cfg.default_client_id, tenant_id=cfg.tenant_id,
                              identity_map=cfg.identity_map),
                cache=cache, endpoint_id=endpoint.endpoint_id, passthrough=None,
                metrics=Metrics(), access_log=AccessLog(enabled=False, schedule_flush=loop.call_soon))
        finally:
            await endpoint.aclose()
    target = b"/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net"
    tokens: dict[str, set[str]] = {}
    for mode in ("authority", "binding", "authority", "binding"):
        answer = apps[mode].dispatch(Request(method="GET", target=target, http_version="1.1",
                                             headers=[(b"metadata", b"true")]))
        response = answer if not asyncio.iscoroutine(answer) else await answer
        assert response.status == 200, response
        tokens.setdefault(mode, set()).add(json.loads(response.body)["access_token"])
    await cache.aclose()
    assert [k.endpoint for k in fetched] == [AUTHORITY.rstrip("/"), BINDING_URL]
    assert fetched[0]._replace(endpoint="") == fetched[1]._replace(endpoint="")
    assert tokens == {"authority": {"token-1"}, "binding": {"token-2"}}


def test_authority_mode_and_binding_mode_proxies_each_use_their_own_endpoint(
        proxy: ProxyProcess, binding_proxy: ProxyProcess, binding_server: BindingServer,
        entra: FakeEntraClient, pod: Pod) -> None:
    """The same pod, resource and fakes; only AZURE_KUBERNETES_TOKEN_PROXY differs."""
    binding = prepare(binding_server, pod, expires_in=2345)
    resource = unique_resource("mode")
    via_entra = assert_token(proxy.token(resource), resource, pod)
    via_binding = assert_token(binding_proxy.token(resource), resource, pod)
    assert via_entra["exp"] - via_entra["iat"] == 3599
    assert via_binding["exp"] - via_binding["iat"] == 2345
    assert [r["path"] for r in entra.exchanges()] == [f"/{pod.tenant_id}/oauth2/v2.0/token"]
    assert [r["path"] for r in binding.exchanges()] == [f"{PREFIX}/{pod.tenant_id}/oauth2/v2.0/token"]


# ---- the namespace scenario of the init issue, in binding mode --------------------------------


@pytest.mark.root
def test_pod_in_netns_gets_its_token_through_the_binding_token_proxy(
        python_for_other_uids: str, package_pythonpath: str) -> None:
    """The whole pod (support.pod, nftables): the binding token proxy runs in STS beside a
    working fake Entra that AZURE_AUTHORITY_HOST names; curl as uid 1000 asks
    169.254.169.254 and gets a token minted by the token proxy, Entra sees nothing."""
    from support.pod import TOKEN_URL, build_pod, in_netns

    with ExitStack() as stack:
        sandbox = build_pod(stack, "nftables", python_for_other_uids, package_pythonpath)
        topo, ident = sandbox.topo, sandbox.identity
        ca = trustme.CA()
        ca_file = pem_file(ca, sandbox.work, "binding-ca.pem")
        cert_dir = sandbox.work / "binding-cert"
        issue_server_cert(ca, cert_dir, SNI)
        bind = f"{topo.sts_addr}:{BINDING_PORT}"
        fake = start_script(ns_argv(topo.sts, [
            sys.executable, str(SUPPORT_DIR / "fake_entra.py"), "--bind", bind,
            "--cert-dir", str(cert_dir), "--sni-only", SNI]), sandbox.logs_dir / "binding.log")
        stack.callback(fake.stop)
        client = FakeEntraClient(fake.url, ca_file, sni_name=SNI)

        def register() -> None:
            client.configure(path_prefix=PREFIX)
            client.add_app(ident.tenant_id, ident.client_id, [ident.subject], ident.issuer)

        in_netns(topo.sts, register)

        # start_proxy() builds the proxy's environment from proxy_env(): add the webhook's
        # binding variables to what the pod already has (AZURE_AUTHORITY_HOST included).
        authority_env = sandbox.proxy_env
        sandbox.proxy_env = lambda: {  # type: ignore[method-assign]
            **authority_env(),
            "AZURE_KUBERNETES_TOKEN_PROXY": f"https://{bind}{PREFIX}",
            "AZURE_KUBERNETES_SNI_NAME": SNI,
            "AZURE_KUBERNETES_CA_FILE": ca_file,
        }
        sandbox.stop_proxy()
        sandbox.start_proxy()

        got = sandbox.curl(TOKEN_URL)
        assert got.status == 200, str(got)
        claims = decode_fake_token(got.json()["access_token"])
        assert (claims["appid"], claims["tid"]) == (ident.client_id, ident.tenant_id)
        [record] = in_netns(topo.sts, client.exchanges)
        assert record["sni"] == SNI
        assert record["path"] == f"{PREFIX}/{ident.tenant_id}/oauth2/v2.0/token"
        assert record["token_n"] == claims["n"]
        assert sandbox.entra_exchanges() == []
        assert not [r for r in sandbox.imds_records() if "/identity/" in r["path"]]
        assert sandbox.proxy is not None and sandbox.proxy.running()
