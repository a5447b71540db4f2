"""Pytest fixtures for end-to-end tests of the proxy; test modules load it with
`pytest_plugins = ["support.fixtures"]` (and import helpers from support.proxyproc, never
from here, so pytest can still rewrite this module's asserts).

Name: support.fixtures
Scope: session (the CA), module (one fake Entra, one fake IMDS, one pod identity, one
    proxy, and a factory for more proxies that live until the module ends), function (the
    fakes reset with the pod's app registered again, a factory for per-test proxies).
Depends: conftest's `python_for_other_uids` and `package_pythonpath`; `trustme`.

On a failed test, the output of every proxy the test used (for a shared proxy, only the
part written during the test) is attached to the report, as upstream's e2e dumps the
containers' logs.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from support.fake_entra import FakeEntraClient, issue_server_cert
from support.fake_imds import FakeImdsClient
from support.proxyproc import (
    EntraHandle,
    ImdsHandle,
    Pod,
    ProjectedToken,
    ProxyProcess,
    make_sa_token,
    new_guid,
    pod_env,
    shared_tempdir,
    start_fake_entra,
    start_fake_imds,
    start_proxy,
)

_OFFSETS = pytest.StashKey[dict[int, int]]()
_STARTED = pytest.StashKey[list[ProxyProcess]]()

ProxyFactory = Callable[..., ProxyProcess]


# ---- session / module resources -------------------------------------------------------


@pytest.fixture(scope="session")
def entra_ca() -> Iterator[tuple[trustme.CA, str]]:
    """Name: entra_ca. Scope: session. The fake Entra's CA and its PEM (readable by uid 1501)."""
    ca = trustme.CA()
    directory = shared_tempdir("azwi-ca-")
    try:
        ca_file = directory / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        ca_file.chmod(0o644)
        yield ca, str(ca_file)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def fake_entra_server(entra_ca: tuple[trustme.CA, str],
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[EntraHandle]:
    """Name: fake_entra_server. Scope: module. Depends: entra_ca. One fake Entra on loopback."""
    ca, ca_file = entra_ca
    base = tmp_path_factory.mktemp("entra")
    cert_dir = base / "certs"
    issue_server_cert(ca, cert_dir, "127.0.0.1", "localhost")
    process = start_fake_entra(cert_dir, base / "fake_entra.log")
    try:
        yield EntraHandle(process, FakeEntraClient(process.url, ca_file), process.url, ca_file,
                          cert_dir)
    finally:
        process.stop()


@pytest.fixture(scope="module")
def fake_imds_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImdsHandle]:
    """Name: fake_imds_server. Scope: module. A fake node IMDS on loopback."""
    process = start_fake_imds(tmp_path_factory.mktemp("imds") / "fake_imds.log")
    try:
        client = FakeImdsClient(process.url)
        yield ImdsHandle(process, client, client.host, client.port)
    finally:
        process.stop()


@pytest.fixture(scope="module")
def pod() -> Iterator[Pod]:
    """Name: pod. Scope: module. A tenant, a default client and a projected token file."""
    directory = shared_tempdir("azwi-sa-")
    try:
        namespace, sa = "team-" + uuid.uuid4().hex[:6], "workload"
        issuer = "https://oidc.prod-aks.azure.com/" + new_guid() + "/"
        token = ProjectedToken(directory, make_sa_token(namespace, sa, issuer=issuer))
        yield Pod(new_guid(), new_guid(), namespace, sa, issuer, token)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def proxy_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("proxy-logs")


def _factory(started: list[ProxyProcess], python: str, pythonpath: str, pod: Pod,
             entra: EntraHandle, imds: ImdsHandle, logs: Path) -> ProxyFactory:
    def make(*, args: tuple[str, ...] | list[str] = (), **overrides: str | None) -> ProxyProcess:
        env = pod_env(pod, entra, imds, pythonpath, **overrides)
        process = start_proxy(python, env, logs, args=args)
        started.append(process)
        return process

    return make


@pytest.fixture(scope="module")
def module_proxy_factory(python_for_other_uids: str, package_pythonpath: str, pod: Pod,
                         fake_entra_server: EntraHandle, fake_imds_server: ImdsHandle,
                         proxy_logs: Path) -> Iterator[ProxyFactory]:
    """Name: module_proxy_factory. Scope: module. Depends: pod, the fakes.
    Starts proxies (as uid 1501, pod env + overrides, `args=[...]`) that live until the
    module ends."""
    started: list[ProxyProcess] = []
    try:
        yield _factory(started, python_for_other_uids, package_pythonpath, pod,
                       fake_entra_server, fake_imds_server, proxy_logs)
    finally:
        for process in started:
            process.stop()


@pytest.fixture(scope="module")
def proxy(module_proxy_factory: ProxyFactory) -> ProxyProcess:
    """Name: proxy. Scope: module. The proxy with the pod's environment, optimised (-OO)
    as the proxy image runs it. Tests use their own identities or resources so its cache
    carries nothing from one test to the next."""
    return module_proxy_factory(PYTHONOPTIMIZE="2")


# ---- per test ---------------------------------------------------------------------------


@pytest.fixture
def entra(fake_entra_server: EntraHandle, pod: Pod) -> FakeEntraClient:
    """Name: entra. Scope: function. The fake Entra, reset, with the pod's app registered."""
    client = fake_entra_server.client
    client.reset()
    client.add_app(pod.tenant_id, pod.client_id, [pod.subject], pod.issuer)
    return client


@pytest.fixture
def imds(fake_imds_server: ImdsHandle) -> FakeImdsClient:
    """Name: imds. Scope: function. The fake IMDS with its records cleared."""
    fake_imds_server.client.reset()
    return fake_imds_server.client


@pytest.fixture
def new_app(entra: FakeEntraClient, pod: Pod) -> Callable[..., str]:
    """Name: new_app. Scope: function. Registers a fresh app that trusts the pod's subject."""

    def make(tenant_id: str | None = None, client_id: str | None = None) -> str:
        client_id = client_id or new_guid()
        entra.add_app(tenant_id or pod.tenant_id, client_id, [pod.subject], pod.issuer)
        return client_id

    return make


@pytest.fixture
def proxy_factory(request: pytest.FixtureRequest, python_for_other_uids: str,
                  package_pythonpath: str, pod: Pod, fake_entra_server: EntraHandle,
                  fake_imds_server: ImdsHandle, proxy_logs: Path) -> Iterator[ProxyFactory]:
    """Name: proxy_factory. Scope: function. Like module_proxy_factory, but the proxies
    are stopped when the test ends."""
    started: list[ProxyProcess] = request.node.stash.setdefault(_STARTED, [])
    try:
        yield _factory(started, python_for_other_uids, package_pythonpath, pod,
                       fake_entra_server, fake_imds_server, proxy_logs)
    finally:
        for process in started:
            process.stop()


@pytest.fixture
def proxy_env(package_pythonpath: str, pod: Pod, fake_entra_server: EntraHandle,
              fake_imds_server: ImdsHandle) -> Callable[..., dict[str, str]]:
    """Name: proxy_env. Scope: function. The pod's proxy environment with overrides."""

    def make(**overrides: str | None) -> dict[str, str]:
        return pod_env(pod, fake_entra_server, fake_imds_server, package_pythonpath,
                       **overrides)

    return make


# ---- logs on failure ----------------------------------------------------------------------


def _proxies_of(item: pytest.Item) -> list[ProxyProcess]:
    funcargs: dict[str, Any] = getattr(item, "funcargs", {})
    found = [value for value in funcargs.values() if isinstance(value, ProxyProcess)]
    started: list[ProxyProcess] = item.stash.get(_STARTED, [])
    return found + started


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if call.when == "setup":
        item.stash[_OFFSETS] = {id(p): p.log_size() for p in _proxies_of(item)}
    elif call.when == "call" and report.failed:
        offsets = item.stash.get(_OFFSETS, {})
        for process in _proxies_of(item):
            text = process.log_text(since=offsets.get(id(process), 0))
            report.sections.append((f"proxy :{process.port} log (pid {process.proc.pid})",
                                    text[-20000:] or "(empty)"))
    return report
