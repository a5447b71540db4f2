"""The whole pod in network namespaces: topology, fake IMDS, fake Entra, init, proxy, clients.

Name: support.pod (a pytest plugin: test modules load it with
    `pytest_plugins = ["support.pod"]`)
Scope: module (`pod_sandbox`: one pod per backend, parametrised over nftables and
    iptables), function (`live_pod`: the same pod, put back in its installed state after
    every test, and `pod_procs` for a test's own responders). The names are unique because
    a plugin's fixtures are visible to every module (support.fixtures has its own `pod`).
Depends: root + netns + nft (the `root` marker's probe), conftest's `python_for_other_uids`
    and `package_pythonpath`, trustme, curl, azure-identity in the venv, @azure/identity in
    the venv's node-sdk folder (scripts/bootstrap.sh), support.netns,
    support.fake_entra, support.fake_imds, support.proxyproc.

What is built (`build_pod`), on the topology of support.netns (POD, IMDS, STS, PEER):
- IMDS: tests/support/fake_imds.py on 169.254.169.254:80, recording every request; none in a
  pod built with `passthrough="none"`, whose proxy never goes there: its tests put tripwires
  (support.netns.start_responder) on that address instead.
- STS: tests/support/fake_entra.py over HTTPS on 198.18.1.2:443, with a certificate for that
  address from a throwaway trustme CA; the pod's app trusts the pod's service account.
- POD: the real `azwi-netproxy-init --backend B` as root, then the real proxy as uid 1501 on
  127.0.0.1:8000 with the webhook's environment (AZURE_AUTHORITY_HOST = the fake Entra,
  SSL_CERT_FILE = the CA, no METADATA_* override: production defaults). Both get
  AZWI_PASSTHROUGH (`all` unless built otherwise), as one setting in a manifest serves both.

The test runner itself lives in the root namespace and never sends anything there. To talk
to a fake's control paths or the proxy's /readyz, `in_netns` runs a function in a short-lived
thread that first joins the target namespace (setns(2) on a network namespace is per thread,
so the rest of pytest stays where it is); sockets that thread creates belong to that
namespace. Clients that matter to the rules (uid 1000, uid 1501) are separate processes.

On a failed test the plugin attaches what every log file of the pod (proxy, init runs,
fakes) gained during that test, as upstream's e2e dumps its containers' logs.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import pytest
import trustme

from azwi_netproxy.init import rules
from support import netns
from support.fake_entra import FakeEntraClient, decode_fake_token, issue_server_cert
from support.fake_imds import FakeImdsClient
from support.netns import METADATA_IP, Processes, Topology
from support.proxyproc import (
    ProjectedToken,
    ScriptProcess,
    base_env,
    http_request,
    make_sa_token,
    new_guid,
    shared_tempdir,
    stop_process,
)

BACKENDS: Final = ("nftables", "iptables")
PROXY_UID: Final = 1501
CLIENT_UID: Final = 1000
PROXY_PORT: Final = 8000
ENTRA_PORT: Final = 443
IMDS_PORT: Final = 80
TOKEN_URL: Final = (
    f"http://{METADATA_IP}/metadata/identity/oauth2/token"
    "?api-version=2018-02-01&resource=https://management.azure.com/"
)
INSTANCE_URL: Final = f"http://{METADATA_IP}/metadata/instance?api-version=2021-02-01"
RULESET: Final = rules.Ruleset(proxy_port=PROXY_PORT, exempt_uid=PROXY_UID,
                               metadata_ip=METADATA_IP, metadata_port=IMDS_PORT)

# azure-identity as an app uses it: no endpoint override, so it calls 169.254.169.254.
SDK_SCRIPT: Final = """
import json, sys
from azure.identity import ManagedIdentityCredential
token = ManagedIdentityCredential().get_token(sys.argv[1])
print(json.dumps({"token": token.token, "expires_on": token.expires_on}))
"""

# @azure/identity for JavaScript as an app uses it, with no endpoint override: msal-node asks
# 169.254.169.254 for the token; DefaultAzureCredential first probes it (see the test).
NODE_SDK: Final = Path(sys.prefix) / "node-sdk"
NODE_SDK_SCRIPT: Final = """
const identity = require("@azure/identity");
const [kind, scope, clientId] = process.argv.slice(1);
const credential = kind === "DefaultAzureCredential"
  ? new identity.DefaultAzureCredential(clientId ? { managedIdentityClientId: clientId } : {})
  : new identity.ManagedIdentityCredential(clientId ? { clientId } : {});
credential.getToken(scope).then(
  (token) => console.log(JSON.stringify({ token: token.token, expires_on_ms: token.expiresOnTimestamp })),
  (error) => { console.error(error && error.stack ? error.stack : String(error)); process.exit(1); },
);
"""

T = TypeVar("T")

# ---- running code inside a namespace from the test process -------------------------------

_CLONE_NEWNET: Final = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Call `fn` in a fresh thread that has joined network namespace `ns`; its result.

    Only that thread changes namespace, and it ends with the call. If joining fails, `fn`
    never runs (so nothing is ever sent from the root namespace by mistake).
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            outcome["value"] = fn()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=f"in-netns-{ns}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]


# ---- the pod -----------------------------------------------------------------------------


@dataclass
class Identity:
    """What the webhook gives the pod: tenant, default client, projected SA token."""

    tenant_id: str
    client_id: str
    subject: str
    issuer: str
    token: ProjectedToken


@dataclass
class PodProxy:
    """The proxy running in POD as `uid`."""

    proc: subprocess.Popen[bytes]
    uid: int
    stderr_path: Path

    def running(self) -> bool:
        return self.proc.poll() is None

    def log_entries(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.stderr_path.read_text(errors="replace").splitlines():
            with suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
        return entries


@dataclass
class Curl:
    """What curl made of one request: exit code, HTTP status (0 when none), body, stderr."""

    exit_code: int
    status: int
    body: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.body)

    def __str__(self) -> str:
        return f"curl exit {self.exit_code}, HTTP {self.status}: {self.body[:400]!r} {self.stderr!r}"


def curl_in(ns: str, url: str, *headers: str, uid: int | None = CLIENT_UID,
            max_time_s: float = 10.0, via: Sequence[str] = ()) -> Curl:
    """curl in namespace `ns` as `uid` (None: root), with `Metadata: true` and any extra headers;
    `via` runs it through a command first (e.g. root's own `setpriv --reuid=1501`)."""
    argv = [*via, "curl", "-sS", "--max-time", str(max_time_s), "-H", "Metadata: true"]
    for header in headers:
        argv += ["-H", header]
    argv += ["-w", "\n%{http_code}", url]
    done = netns.run_in(ns, argv, uid=uid, env={"PATH": "/usr/bin:/bin"}, timeout=max_time_s + 10)
    body, _, code = done.stdout.rpartition("\n")
    return Curl(done.returncode, int(code or 0), body, done.stderr.strip())


@dataclass
class PodSandbox:
    """One whole pod and the handles tests use on it (see the module docstring)."""

    topo: Topology
    backend: str
    python: str
    pythonpath: str
    work: Path
    identity: Identity
    entra_process: ScriptProcess
    imds_process: ScriptProcess | None
    ca_file: str
    passthrough: str = "all"  # AZWI_PASSTHROUGH of the init and the proxy
    proxy: PodProxy | None = None
    pristine: str = ""  # `netfilter_snapshot` before the first init
    installed: str = ""  # ... and after it: what every test finds and leaves
    broken: str | None = None
    _runs: int = 0

    def __repr__(self) -> str:
        return f"PodSandbox({self.backend}, pod={self.topo.pod}, work={self.work})"

    @property
    def logs_dir(self) -> Path:
        return self.work / "logs"

    # ---- the fakes, reached from their own namespaces ----

    def entra(self) -> FakeEntraClient:
        return FakeEntraClient(f"https://{self.topo.sts_addr}:{ENTRA_PORT}", self.ca_file)

    def entra_exchanges(self) -> list[dict[str, Any]]:
        """Every token request the fake Entra saw, oldest first."""
        return in_netns(self.topo.sts, self.entra().exchanges)

    def exchange_of(self, access_token: str) -> dict[str, Any]:
        """The fake Entra's record of the exchange that minted `access_token`."""
        n = decode_fake_token(access_token)["n"]
        found = [r for r in self.entra_exchanges() if r.get("token_n") == n]
        assert len(found) == 1, f"no exchange minted token #{n}"
        return found[0]

    def imds_records(self) -> list[dict[str, Any]]:
        """Every request the fake IMDS saw, oldest first."""
        assert self.imds_process is not None, "this pod has no fake IMDS (passthrough none)"
        client = FakeImdsClient(f"http://{METADATA_IP}:{IMDS_PORT}")
        return in_netns(self.topo.imds, client.records)

    # ---- the init ----

    def _log_file(self, kind: str) -> Path:
        self._runs += 1
        return self.logs_dir / f"{self._runs:03d}-{kind}.log"

    def init(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the real init as root in POD with `--backend B` and `args`."""
        argv = [self.python, "-m", "azwi_netproxy.init", "--backend", self.backend, *args]
        env = {**base_env(self.pythonpath), "PROXY_PORT": str(PROXY_PORT),
               "AZWI_PASSTHROUGH": self.passthrough}
        done = netns.run_in(self.topo.pod, argv, env=env)
        self._log_file("init").write_text(
            f"$ {' '.join(argv[1:])}\nexit {done.returncode}\n--- stdout ---\n{done.stdout}"
            f"--- stderr ---\n{done.stderr}"
        )
        return done

    def init_ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = self.init(*args)
        assert done.returncode == 0, f"init {args} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        return done

    def snapshot(self) -> str:
        return netns.netfilter_snapshot(self.topo.pod)

    # ---- the proxy ----

    def proxy_env(self) -> dict[str, str]:
        ident = self.identity
        return {
            **base_env(self.pythonpath),
            "AZURE_TENANT_ID": ident.tenant_id,
            "AZURE_CLIENT_ID": ident.client_id,
            "AZURE_FEDERATED_TOKEN_FILE": str(ident.token.path),
            "AZURE_AUTHORITY_HOST": f"https://{self.topo.sts_addr}/",
            "SSL_CERT_FILE": self.ca_file,
            "AZWI_PASSTHROUGH": self.passthrough,
        }

    def readyz(self) -> int:
        """The status of GET /readyz on 127.0.0.1:PROXY_PORT inside POD."""
        return in_netns(self.topo.pod, lambda: http_request(PROXY_PORT, "/readyz", timeout_s=2).status)

    def start_proxy(self, uid: int = PROXY_UID, ready_timeout_s: float = 15.0) -> PodProxy:
        """Start the proxy in POD as `uid` and wait for /readyz.

        As PROXY_UID with pass-through on, its start-up pass-through check reaches the fake
        IMDS; this waits for that request too, so no test sees it arrive late.

        Raises:
            RuntimeError: it exited or never became ready (its log is in the message).
        """
        assert self.proxy is None or not self.proxy.running(), "a proxy is already running"
        checks = uid == PROXY_UID and self.passthrough == "all"
        checks_before = self._startup_checks() if checks else 0
        log = self._log_file(f"proxy-uid{uid}")
        argv = netns.ns_argv(self.topo.pod, [self.python, "-m", "azwi_netproxy",
                                             f"--proxy-port={PROXY_PORT}"], uid=uid)
        with log.open("wb") as err:
            proc = subprocess.Popen(argv, env=self.proxy_env(), stdin=subprocess.DEVNULL,
                                    stdout=err, stderr=err, cwd="/")
        self.proxy = proxy = PodProxy(proc, uid, log)
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"proxy (uid {uid}) exited with {proc.returncode}:\n"
                                   f"{log.read_text(errors='replace')}")
            with suppress(OSError):
                if self.readyz() == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"proxy (uid {uid}) not ready after {ready_timeout_s} s:\n"
                                   f"{log.read_text(errors='replace')}")
            time.sleep(0.05)
        while checks and self._startup_checks() == checks_before:
            if time.monotonic() > deadline:
                raise RuntimeError("the proxy's start-up request never reached the fake IMDS:\n"
                                   f"{log.read_text(errors='replace')}")
            time.sleep(0.05)
        return proxy

    def _startup_checks(self) -> int:
        return sum(r["path"] == "/metadata/versions" for r in self.imds_records())

    def stop_proxy(self, sig: int = signal.SIGTERM) -> None:
        """Stop the running proxy by its PID (SIGKILL simulates a crash)."""
        proxy = self.proxy
        if proxy is None:
            return
        if proxy.running():
            os.kill(proxy.proc.pid, sig)
            try:
                proxy.proc.wait(10)
            except subprocess.TimeoutExpired:
                proxy.proc.kill()
                proxy.proc.wait(10)
        self.proxy = None

    # ---- clients in POD ----

    def curl(self, url: str, *headers: str, uid: int | None = CLIENT_UID,
             max_time_s: float = 10.0, via: Sequence[str] = ()) -> Curl:
        """curl as `uid` (None: root) in POD, with `Metadata: true` and any extra headers;
        `via` runs it through a command first (e.g. root's own `setpriv --reuid=1501`)."""
        return curl_in(self.topo.pod, url, *headers, uid=uid, max_time_s=max_time_s, via=via)

    def sdk_token(self, scope: str, uid: int = CLIENT_UID) -> dict[str, Any]:
        """azure-identity's ManagedIdentityCredential().get_token(scope) as `uid` in POD.

        A clean environment: nothing tells the SDK where IMDS is, so it goes to
        169.254.169.254 as in production.
        """
        return self._sdk_client("azure-identity", [self.python, "-c", SDK_SCRIPT, scope], uid)

    def node_sdk_token(self, credential: str, scope: str, client_id: str | None = None,
                       uid: int = CLIENT_UID) -> dict[str, Any]:
        """@azure/identity's `new <credential>(<client_id>).getToken(scope)` in Node.js as
        `uid` in POD, in a clean environment (no endpoint override); `credential` is
        ManagedIdentityCredential or DefaultAzureCredential."""
        node = shutil.which("node")
        if node is None or not (NODE_SDK / "node_modules" / "@azure" / "identity").is_dir():
            pytest.skip("no Node.js 20+ with @azure/identity: scripts/test.sh installs it (through "
                        f"scripts/bootstrap.sh) into {NODE_SDK} where this machine or its Debian "
                        "release has Node.js 20+")
        argv = [node, "-e", NODE_SDK_SCRIPT, credential, scope, *([client_id] if client_id else [])]
        return self._sdk_client("@azure/identity", argv, uid,
                                NODE_PATH=str(NODE_SDK / "node_modules"))

    def _sdk_client(self, sdk: str, argv: list[str], uid: int, **env: str) -> dict[str, Any]:
        """Run an SDK client script in POD as `uid` in a clean environment (nothing tells the
        SDK where IMDS is); the JSON object it prints."""
        env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", **env}
        done = netns.run_in(self.topo.pod, argv, uid=uid, env=env, timeout=60)
        assert done.returncode == 0, f"{sdk} failed:\n{done.stderr[-3000:]}"
        doc = json.loads(done.stdout)
        assert isinstance(doc, dict)
        return doc

    # ---- keeping the pod usable across tests ----

    def log_offsets(self) -> dict[Path, int]:
        return {p: p.stat().st_size for p in self.logs_dir.iterdir()}

    def logs_since(self, offsets: dict[Path, int]) -> list[tuple[str, str]]:
        """(file name, text written since `offsets`) for every log file of the pod."""
        sections = []
        for path in sorted(self.logs_dir.iterdir()):
            with path.open("rb") as f:
                f.seek(offsets.get(path, 0))
                text = f.read().decode(errors="replace")
            if text:
                sections.append((path.name, text[-20000:]))
        return sections

    def _reset_netfilter(self) -> None:
        """Remove every rule and chain in POD, ours or not (after a test left a mess)."""
        pod = self.topo.pod
        netns.run_in(pod, ["nft", "flush", "ruleset"])
        for table in netns.legacy_tables(pod):
            netns.run_in(pod, ["iptables-legacy", "-t", table, "-F"])
            netns.run_in(pod, ["iptables-legacy", "-t", table, "-X"])

    def restore(self) -> None:
        """Back to the installed state: our rules only, the proxy running as uid 1501.

        Raises:
            AssertionError: the pod cannot be restored (later tests are then refused).
        """
        try:
            if self.snapshot() != self.installed:
                self._reset_netfilter()
                assert self.snapshot() == self.pristine, "cannot clear the pod's netfilter state"
                self.init_ok()
                assert self.snapshot() == self.installed, "re-installing gave other rules"
            if self.proxy is None or not self.proxy.running() or self.proxy.uid != PROXY_UID:
                self.stop_proxy()
                self.start_proxy()
        except BaseException as exc:
            self.broken = f"{type(exc).__name__}: {exc}"
            raise

    def close(self) -> None:
        self.stop_proxy(signal.SIGKILL)



def build_pod(stack: ExitStack, backend: str, python: str, pythonpath: str,
              redirect: Callable[[PodSandbox], None] | None = None,
              passthrough: str = "all") -> PodSandbox:
    """Build the whole pod (module docstring); everything is undone when `stack` closes.

    `redirect` installs the rules instead of the init container (the CNI plugin's tests).
    `passthrough` is AZWI_PASSTHROUGH of the init and the proxy; with "none" there is no
    fake IMDS (nothing may reach that address: tests put tripwires there).
    """
    topo = stack.enter_context(netns.topology(with_peer=True))
    work = shared_tempdir("azwi-pod-")
    stack.callback(shutil.rmtree, work, True)
    (work / "logs").mkdir()

    ca = trustme.CA()
    ca_file = work / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca_file.chmod(0o644)
    cert_dir = work / "entra-cert"
    issue_server_cert(ca, cert_dir, topo.sts_addr)

    imds = None
    if passthrough == "all":
        imds = netns.start_fake_in(topo.imds, "fake_imds.py", f"{METADATA_IP}:{IMDS_PORT}",
                                   work / "logs" / "fake_imds.log")
        stack.callback(stop_process, imds.proc)
    entra = netns.start_fake_in(topo.sts, "fake_entra.py", f"{topo.sts_addr}:{ENTRA_PORT}",
                        work / "logs" / "fake_entra.log", "--cert-dir", str(cert_dir))
    stack.callback(stop_process, entra.proc)

    sa_dir = work / "sa"
    sa_dir.mkdir(mode=0o755)
    sa_dir.chmod(0o755)
    namespace, account = "team-" + uuid.uuid4().hex[:6], "workload"
    issuer = f"https://oidc.prod-aks.azure.com/{new_guid()}/"
    identity = Identity(new_guid(), new_guid(), f"system:serviceaccount:{namespace}:{account}",
                        issuer, ProjectedToken(sa_dir, make_sa_token(namespace, account,
                                                                     issuer=issuer)))
    sandbox = PodSandbox(topo=topo, backend=backend, python=python, pythonpath=pythonpath,
                         work=work, identity=identity, entra_process=entra, imds_process=imds,
                         ca_file=str(ca_file), passthrough=passthrough)
    stack.callback(sandbox.close)
    in_netns(topo.sts, lambda: sandbox.entra().add_app(
        identity.tenant_id, identity.client_id, [identity.subject], issuer))

    sandbox.pristine = sandbox.snapshot()
    if redirect is None:
        sandbox.init_ok()
    else:
        redirect(sandbox)
    sandbox.installed = sandbox.snapshot()
    assert sandbox.installed != sandbox.pristine, "the init installed nothing"
    sandbox.start_proxy()
    return sandbox


# ---- fixtures ------------------------------------------------------------------------------

_OFFSETS = pytest.StashKey[tuple[PodSandbox, dict[Path, int]]]()


@pytest.fixture(scope="module", params=BACKENDS)
def pod_sandbox(request: pytest.FixtureRequest, python_for_other_uids: str,
                package_pythonpath: str) -> Iterator[PodSandbox]:
    """Name: pod_sandbox. Scope: module, once per backend. Depends: conftest's interpreter
    and import path. The whole pod, installed and running; removed at the end."""
    with ExitStack() as stack:
        yield build_pod(stack, str(request.param), python_for_other_uids, package_pythonpath)


@pytest.fixture
def live_pod(request: pytest.FixtureRequest, pod_sandbox: PodSandbox) -> Iterator[PodSandbox]:
    """Name: live_pod. Scope: function. Depends: pod_sandbox. The module's pod in its
    installed state; whatever the test changed (rules, the proxy) is put back afterwards."""
    if pod_sandbox.broken is not None:
        pytest.fail(f"the {pod_sandbox.backend} pod is unusable since an earlier test: "
                    f"{pod_sandbox.broken}")
    request.node.stash[_OFFSETS] = (pod_sandbox, pod_sandbox.log_offsets())
    yield pod_sandbox
    pod_sandbox.restore()


@pytest.fixture
def pod_procs() -> Iterator[Processes]:
    """Name: pod_procs. Scope: function. A test's own background processes, killed by PID."""
    with netns.processes() as registry:
        yield registry


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    found = item.stash.get(_OFFSETS, None)
    if found is not None and report.failed:
        sandbox, offsets = found
        for name, text in sandbox.logs_since(offsets):
            report.sections.append((f"pod {sandbox.backend}: {name}", text))
    return report
