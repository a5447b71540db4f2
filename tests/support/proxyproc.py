"""Real processes for end-to-end tests: the proxy (as uid 1501), the fakes, and HTTP to them.

Owns: starting `python -m azwi_netproxy` with the environment the workload identity webhook
injects (pointed at the fakes on loopback, never at 169.254.169.254), waiting for /readyz,
capturing its stdout/stderr to files and killing it by PID; starting the fake Entra/IMDS
scripts and reading their `ready` line; the projected service account token file with the
kubelet's `..data` symlink layout and atomic rotation; small HTTP helpers (http.client and
raw sockets) to talk to the proxy.

Must not know: the proxy's internals. Everything here goes through argv, the environment,
files and sockets, as a pod would.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.fake_entra import FakeEntraClient
from support.fake_imds import FakeImdsClient

SUPPORT_DIR = Path(__file__).resolve().parent
PROXY_UID = 1501
CLIENT_UID = 1000
TOKEN_PATH = "/metadata/identity/oauth2/token"
DEFAULT_API_VERSION = "2018-02-01"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def as_uid(uid: int, argv: Sequence[str]) -> list[str]:
    """argv run as `uid` (gid = uid, no supplementary groups) when we are root."""
    if os.geteuid() != 0:
        return list(argv)
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]


def shared_tempdir(prefix: str) -> Path:
    """A temp dir other uids can read (0755)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


# ---- the service account token --------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_sa_token(namespace: str, service_account: str, *, issuer: str,
                  lifetime_s: int = 3600) -> str:
    """A projected service account token as the kubelet writes it (signature is random)."""
    now = int(time.time())
    header = {"alg": "RS256", "kid": "fake-" + uuid.uuid4().hex[:8]}
    claims = {
        "aud": ["api://AzureADTokenExchange"],
        "exp": now + lifetime_s,
        "iat": now,
        "nbf": now,
        "iss": issuer,
        "jti": str(uuid.uuid4()),
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": service_account, "uid": str(uuid.uuid4())},
        },
        "sub": f"system:serviceaccount:{namespace}:{service_account}",
    }
    return ".".join((b64url(json.dumps(header).encode()), b64url(json.dumps(claims).encode()),
                     b64url(os.urandom(64))))


class ProjectedToken:
    """The token volume: `token -> ..data/token`, `..data -> ..<stamp>/`, swapped atomically.

    Rotation follows the kubelet's AtomicWriter: write a new timestamped dir, point a temp
    symlink at it and rename it over `..data`, so a reader sees the old or the new token,
    never a partial one. `relpath` is the item's path in the volume (the kubelet links its
    first component): `token` here, `token/azure-identity-token` as webhook v1.6 projects it.
    """

    def __init__(self, directory: Path, content: str, relpath: str = "token") -> None:
        self.directory = directory
        self.relpath = relpath
        self.path = directory / relpath
        self._current: Path | None = None
        self.rotate(content)
        top = relpath.split("/", maxsplit=1)[0]
        (directory / top).symlink_to(f"..data/{top}")

    def rotate(self, content: str) -> None:
        stamp = f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{uuid.uuid4().hex[:9]}"
        new_dir = self.directory / stamp
        new_dir.mkdir(mode=0o755)
        new_dir.chmod(0o755)
        token = new_dir / self.relpath
        token.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        token.write_text(content)
        token.chmod(0o644)
        tmp_link = self.directory / "..data_tmp"
        tmp_link.symlink_to(stamp)
        tmp_link.rename(self.directory / "..data")
        if self._current is not None:
            shutil.rmtree(self._current)
        self._current = new_dir

    def read(self) -> str:
        return self.path.read_text()


@dataclass
class Pod:
    """What the webhook gives one pod: tenant, default identity, service account token."""

    tenant_id: str
    client_id: str
    namespace: str
    service_account: str
    issuer: str
    token: ProjectedToken

    @property
    def subject(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"

    def new_sa_token(self) -> str:
        return make_sa_token(self.namespace, self.service_account, issuer=self.issuer)


def new_guid() -> str:
    return str(uuid.uuid4())


def unique_resource(label: str = "res") -> str:
    """A resource no other test asks for, so the proxy's cache never answers it early."""
    return f"https://{label}-{uuid.uuid4().hex[:10]}.example.com/"


# ---- scripts that print a ready line --------------------------------------------------


@dataclass
class ScriptProcess:
    """A fake server running as its own process."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, by PID; reap it."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def start_script(argv: Sequence[str], log_path: Path, *, timeout_s: float = 10.0,
                 env: Mapping[str, str] | None = None) -> ScriptProcess:
    """Start a fake server and wait for its `ready URL` line.

    Raises:
        RuntimeError: it exited or said nothing within timeout_s (its log is in the message).
    """
    with log_path.open("wb") as log:
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=log,
                                env=dict(env) if env is not None else None, cwd="/")
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        ready = sel.select(timeout_s)
    line = proc.stdout.readline().decode() if ready else ""
    if not line.startswith("ready "):
        stop_process(proc)
        raise RuntimeError(f"{argv[:3]} did not start: {line!r}\n"
                           f"{log_path.read_text(errors='replace')}")
    return ScriptProcess(proc, line.split()[1], log_path)


def start_fake_entra(cert_dir: Path, log_path: Path, *, bind: str = "127.0.0.1:0",
                     sni_only: str | None = None) -> ScriptProcess:
    argv = [sys.executable, str(SUPPORT_DIR / "fake_entra.py"), "--bind", bind,
            "--cert-dir", str(cert_dir)]
    if sni_only:
        argv += ["--sni-only", sni_only]
    return start_script(argv, log_path)


def start_fake_imds(log_path: Path, *, bind: str = "127.0.0.1:0") -> ScriptProcess:
    return start_script([sys.executable, str(SUPPORT_DIR / "fake_imds.py"), "--bind", bind],
                        log_path)


# ---- the proxy --------------------------------------------------------------------------


def base_env(pythonpath: str) -> dict[str, str]:
    """What every process we start gets, and nothing of the test runner's environment."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "PYTHONPATH": pythonpath,
        "PYTHONDONTWRITEBYTECODE": "1",
        "LANG": "C.UTF-8",
        "HOME": "/tmp",
        "NO_PROXY": "*",
    }


@dataclass
class ProxyProcess:
    """The proxy as a real process on 127.0.0.1:port."""

    proc: subprocess.Popen[bytes]
    port: int
    stdout_path: Path
    stderr_path: Path
    env: dict[str, str] = field(repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self, since: int = 0) -> str:
        parts = []
        for path in (self.stdout_path, self.stderr_path):
            if path.exists():
                with path.open("rb") as f:
                    f.seek(since if path == self.stderr_path else 0)
                    text = f.read().decode(errors="replace")
                if text:
                    parts.append(f"--- {path.name} ---\n{text}")
        return "\n".join(parts)

    def log_size(self) -> int:
        return self.stderr_path.stat().st_size if self.stderr_path.exists() else 0

    def get(self, target: str, headers: Mapping[str, str] | None = None, *,
            method: str = "GET", timeout_s: float = 30.0) -> Response:
        return http_request(self.port, target, headers=headers, method=method,
                            timeout_s=timeout_s)

    def token(self, resource: str, client_id: str | None = None, **params: str) -> Response:
        """GET the token endpoint with `Metadata: true`, as an SDK does."""
        return self.get(token_target(resource, client_id, **params), {"Metadata": "true"})

    def stop(self) -> None:
        stop_process(self.proc)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def __str__(self) -> str:
        return f"{self.status} {self.headers} {self.body[:500]!r}"


def token_target(resource: str, client_id: str | None = None, *,
                 api_version: str | None = DEFAULT_API_VERSION, path: str = TOKEN_PATH,
                 **params: str) -> str:
    query: dict[str, str] = {}
    if api_version is not None:
        query["api-version"] = api_version
    query["resource"] = resource
    if client_id is not None:
        query["client_id"] = client_id
    query.update(params)
    return path + "?" + urllib.parse.urlencode(query)


def http_request(port: int, target: str, *, headers: Mapping[str, str] | None = None,
                 method: str = "GET", timeout_s: float = 30.0) -> Response:
    """One request on a fresh connection (http.client, so headers are exactly ours)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request(method, target, headers=dict(headers or {}))
        resp = conn.getresponse()
        body = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
    finally:
        conn.close()


def proxy_argv(python: str, port: int | str | None, args: Sequence[str] = ()) -> list[str]:
    argv = [python, "-m", "azwi_netproxy"]
    if port is not None:
        # The upstream webhook's spelling of the container args.
        argv.append(f"--proxy-port={port}")
    return [*argv, *args]


def run_proxy_command(python: str, env: Mapping[str, str], args: Sequence[str], *,
                      uid: int = PROXY_UID, timeout_s: float = 30.0
                      ) -> subprocess.CompletedProcess[str]:
    """Run `python -m azwi_netproxy ARGS` to completion as `uid`."""
    return subprocess.run(as_uid(uid, [python, "-m", "azwi_netproxy", *args]), env=dict(env),
                          capture_output=True, text=True, timeout=timeout_s, cwd="/",
                          check=False)


def start_proxy(python: str, env: Mapping[str, str], log_dir: Path, *,
                port: int | None = None, args: Sequence[str] = (), uid: int = PROXY_UID,
                ready_timeout_s: float = 20.0) -> ProxyProcess:
    """Start the proxy and wait until GET /readyz answers 200.

    Raises:
        RuntimeError: it exited or never became ready (its output is in the message).
    """
    port = port or free_port()
    tag = uuid.uuid4().hex[:6]
    stdout_path = log_dir / f"proxy-{port}-{tag}.out"
    stderr_path = log_dir / f"proxy-{port}-{tag}.err"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        proc = subprocess.Popen(as_uid(uid, proxy_argv(python, port, args)), env=dict(env),
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd="/")
    proxy = ProxyProcess(proc, port, stdout_path, stderr_path, dict(env))
    failure = wait_ready(proc, port, ready_timeout_s)
    if failure is not None:
        proxy.stop()
        raise RuntimeError(f"{failure}\n{proxy.log_text()}")
    return proxy


def wait_ready(proc: subprocess.Popen[bytes], port: int, timeout_s: float) -> str | None:
    """Poll GET /readyz until it answers 200: None, else why not."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            return f"proxy exited with {proc.returncode} before it was ready"
        try:
            if http_request(port, "/readyz", timeout_s=2).status == 200:
                return None
        except OSError:
            pass
        if time.monotonic() > deadline:
            return f"proxy not ready after {timeout_s}s"
        time.sleep(0.05)


# ---- the fakes and the pod's environment -----------------------------------------------


@dataclass
class EntraHandle:
    process: ScriptProcess
    client: FakeEntraClient
    url: str
    ca_file: str
    cert_dir: Path


@dataclass
class ImdsHandle:
    process: ScriptProcess
    client: FakeImdsClient
    host: str
    port: int


def pod_env(pod: Pod, entra: EntraHandle, imds: ImdsHandle, pythonpath: str,
            **overrides: str | None) -> dict[str, str]:
    """The webhook's environment for `pod`, aimed at the fakes; None in overrides unsets."""
    env = base_env(pythonpath)
    env.update({
        "AZURE_TENANT_ID": pod.tenant_id,
        "AZURE_CLIENT_ID": pod.client_id,
        "AZURE_FEDERATED_TOKEN_FILE": str(pod.token.path),
        "AZURE_AUTHORITY_HOST": entra.url + "/",
        "SSL_CERT_FILE": entra.ca_file,
        # Never the real 169.254.169.254 from the root namespace.
        "METADATA_IP": imds.host,
        "METADATA_PORT": str(imds.port),
    })
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


# ---- raw HTTP over a socket -------------------------------------------------------------


class RawConnection:
    """A socket to the proxy that sends bytes as given and parses responses one by one."""

    def __init__(self, port: int, timeout_s: float = 15.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self._buf = b""

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self._buf += chunk
        return True

    def _read_line(self) -> bytes:
        while b"\r\n" not in self._buf:
            if not self._fill():
                raise EOFError(f"connection closed mid-response: {self._buf!r}")
        line, self._buf = self._buf.split(b"\r\n", 1)
        return line

    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            if not self._fill():
                raise EOFError(f"connection closed mid-body: {self._buf!r}")
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def read_response(self, *, head: bool = False) -> RawResponse:
        """The next response; `head=True` when it answers a HEAD (no body follows)."""
        status_line = self._read_line()
        version, status, *reason = status_line.decode("latin-1").split(" ", 2)
        headers: list[tuple[str, str]] = []
        while True:
            line = self._read_line()
            if not line:
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers.append((name.strip().lower(), value.strip()))
        hmap = dict(headers)
        body = b""
        if not head and int(status) not in (204, 304) and int(status) >= 200:
            if "chunked" in hmap.get("transfer-encoding", "").lower():
                while True:
                    size = int(self._read_line().split(b";")[0], 16)
                    if size == 0:
                        while self._read_line():
                            pass
                        break
                    body += self._read_exact(size)
                    self._read_exact(2)
            elif "content-length" in hmap:
                body = self._read_exact(int(hmap["content-length"]))
            else:  # delimited by close
                while self._fill():
                    pass
                body, self._buf = self._buf, b""
        return RawResponse(version, int(status), reason[0] if reason else "", headers, body)

    def at_eof(self, timeout_s: float = 5.0) -> bool:
        """True when the peer closed (nothing but EOF arrives within timeout_s)."""
        if self._buf:
            return False
        self.sock.settimeout(timeout_s)
        try:
            return not self._fill()
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


@dataclass
class RawResponse:
    version: str
    status: int
    reason: str
    header_list: list[tuple[str, str]]
    body: bytes

    @property
    def headers(self) -> dict[str, str]:
        return dict(self.header_list)

    def json(self) -> Any:
        return json.loads(self.body)
