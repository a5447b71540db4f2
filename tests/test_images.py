"""The images as built by podman, run as a pod runs them: containers in one network namespace.

Name: test_images
Scope: the images are built once per session (`images`, support.images: base image, both
    Dockerfile targets, an app image with curl and azure-identity); every pod test makes its
    own namespaces, fakes and containers and removes them. Each test prints its transcript
    (the podman commands it ran and what they printed): `-rP` shows it for passing tests.
Depends: root, podman and mmdebstrap (scripts/bootstrap.sh installs them), the package index
    and a Debian mirror for the builds; skipped with the reason when podman cannot run.

What is asserted is issue 17: both targets build from a plain Debian base, stay within their
size budgets and carry only what their program runs; the init container with NET_ADMIN and
NET_RAW only installs either backend; the proxy container (read-only, no capabilities,
no-new-privileges, the image's own uid 1501) answers the postStart hook, and apps as uid
1000 (curl, azure-identity's ManagedIdentityCredential) get tokens from a fake Entra
(or identity binding's token proxy) through the redirect, never from the node's IMDS; with
the proxy stopped they fail closed; `podman stop` ends the proxy with 0 at once; and the
native-sidecar manifest's order and security contexts work as written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import images as img
from support import netns
from support.fake_entra import decode_fake_token
from support.fake_imds import INSTANCE
from support.images import Containers, ImageSet, Podman, PodNet, Transcript
from support.manifests import role
from support.proxyproc import make_sa_token, new_guid

# test_pod_netns has support.pod's asserts rewritten; importing it unrewritten first would
# make that a collection error.
pytest.register_assert_rewrite("support.pod")
from support.pod import in_netns  # noqa: E402

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(180, func_only=True)]

REASON = img.unusable_reason()
BACKENDS = ("nftables", "iptables")
PROXY_PORT = 8000
PROXY_UID = 1501
APP_UID = 1000
METADATA = f"http://{netns.METADATA_IP}"
TOKEN_URL = (
    f"{METADATA}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/"
)
INSTANCE_URL = f"{METADATA}/metadata/instance?api-version=2021-02-01"
# Where workload identity webhook v1.6 mounts the projected token and identity binding's CA.
WI_TOKEN_DIR = "/var/run/secrets/azure/wi/token"
WI_CA_DIR = "/var/run/secrets/azure/wi/ca-cert"
TOKEN_FILE_NAME = "azure-identity-token"
NATIVE_SIDECAR = img.REPO / "deploy" / "manual" / "native-sidecar.yaml"
GRACE_S = 30  # terminationGracePeriodSeconds' default
MB = 1_000_000  # as podman reports sizes
BUDGET = {"proxy": 25 * MB, "proxy-init": 40 * MB}

# azure-identity as an app uses it: no endpoint override, so it calls 169.254.169.254.
SDK_SCRIPT = """
import json, sys
from azure.identity import ManagedIdentityCredential
token = ManagedIdentityCredential().get_token(sys.argv[1])
print(json.dumps({"token": token.token, "expires_on": token.expires_on}))
"""
APP_ENV = ("-e", "HOME=/tmp", "-e", "LANG=C.UTF-8")  # and nothing that names an endpoint
APP_FLAGS = (
    "--user",
    f"{APP_UID}:{APP_UID}",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
    *APP_ENV,
)


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def images() -> Iterator[ImageSet]:
    """Name: images. Scope: session. Depends: podman, mmdebstrap (or a cached base), the
    package index. Both targets and the app image under this session's tags, removed at the end
    (with the stale build cache; the base image and this session's cache stay, see support.images)."""
    if REASON is not None:
        pytest.skip(f"podman cannot run here: {REASON}")
    session = uuid.uuid4().hex[:10]
    podman = Podman()
    scratch = Path(tempfile.mkdtemp(prefix="azwi-img-build-"))
    used: set[str] = set()
    with img.storage_lock():
        try:
            yield img.build_images(podman, session, scratch, used)
        finally:
            img.remove_images(podman, used)
            shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture
def transcript(request: pytest.FixtureRequest) -> Iterator[Transcript]:
    """Name: transcript. Scope: function. What the test ran, printed when it ends."""
    log = Transcript()
    yield log
    print(f"\n---- {request.node.name} ----\n{log.text()}")


@pytest.fixture
def podman(transcript: Transcript) -> Podman:
    """Name: podman. Scope: function. podman on the tests' storage, logging to the transcript."""
    return Podman(transcript)


@pytest.fixture
def net() -> Iterator[PodNet]:
    """Name: net. Scope: function. The pod's namespace, the node's and the fakes in it."""
    with img.pod_network() as built:
        yield built


@pytest.fixture
def containers(podman: Podman, net: PodNet) -> Iterator[Containers]:
    """Name: containers. Scope: function. This test's containers, removed at the end."""
    made = Containers(podman, net)
    try:
        yield made
    finally:
        made.close()


# ---- the pod's identity and its files ----------------------------------------------------------


@dataclass
class Identity:
    tenant_id: str
    client_id: str
    subject: str
    sa_token: str
    token_dir: Path
    ca_dir: Path


def make_identity(net: PodNet, tenant_id: str | None = None, client_id: str | None = None) -> Identity:
    """A service account token (the kubelet's projected file) and the app the fakes know it by."""
    namespace, account = "team-" + uuid.uuid4().hex[:6], "workload"
    issuer = f"https://oidc.prod-aks.azure.com/{new_guid()}/"
    ident = Identity(
        tenant_id or new_guid(),
        client_id or new_guid(),
        f"system:serviceaccount:{namespace}:{account}",
        make_sa_token(namespace, account, issuer=issuer),
        net.work / "token",
        net.work / "ca-cert",
    )
    for directory in (ident.token_dir, ident.ca_dir):
        directory.mkdir(mode=0o755)
        directory.chmod(0o755)
    token = ident.token_dir / TOKEN_FILE_NAME
    token.write_text(ident.sa_token)
    token.chmod(0o644)
    ca = ident.ca_dir / "ca.crt"
    shutil.copyfile(net.ca_file, ca)
    ca.chmod(0o644)
    for client in (net.entra_client, net.binding_client):
        in_netns(
            net.node, lambda c=client: c().add_app(ident.tenant_id, ident.client_id, [ident.subject], issuer)
        )
    return ident


def webhook_env(ident: Identity, token_dir: str = WI_TOKEN_DIR) -> dict[str, str]:
    """What the webhook injects into the proxy, the authority being the fake Entra."""
    return {
        "AZURE_CLIENT_ID": ident.client_id,
        "AZURE_TENANT_ID": ident.tenant_id,
        "AZURE_FEDERATED_TOKEN_FILE": f"{token_dir}/{TOKEN_FILE_NAME}",
        "AZURE_AUTHORITY_HOST": f"https://{img.ENTRA_ADDR}/",
    }


def env_flags(env: Mapping[str, str]) -> list[str]:
    return [flag for name, value in env.items() for flag in ("-e", f"{name}={value}")]


def proxy_flags(ident: Identity, env: Mapping[str, str], token_dir: str = WI_TOKEN_DIR) -> list[str]:
    """The proxy container as the webhook's securityContext has it, with no --user: the
    image's own USER must be the uid the redirect exempts."""
    return [
        "--read-only",
        "--read-only-tmpfs=false",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "-v",
        f"{ident.token_dir}:{token_dir}:ro",
        "-v",
        f"{ident.ca_dir}:{WI_CA_DIR}:ro",
        *env_flags(env),
    ]


INIT_FLAGS = (
    "--user",
    "0",
    "--cap-drop",
    "ALL",
    "--cap-add",
    "NET_ADMIN",
    "--cap-add",
    "NET_RAW",
    "-e",
    f"PROXY_PORT={PROXY_PORT}",
)


# ---- what the apps and the fakes see -----------------------------------------------------------


@dataclass
class Curl:
    exit_code: int
    status: int
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


def curl(containers: Containers, images: ImageSet, url: str, flags: tuple[str, ...] = APP_FLAGS) -> Curl:
    done = containers.run(
        "curl",
        images.app,
        "curl",
        "-sS",
        "--max-time",
        "10",
        "-H",
        "Metadata: true",
        "-w",
        "\n%{http_code}",
        url,
        flags=flags,
    )
    body, _, code = done.stdout.rpartition("\n")
    return Curl(done.returncode, int(code or 0), body)


def sdk_token(
    containers: Containers, images: ImageSet, scope: str, flags: tuple[str, ...] = APP_FLAGS
) -> dict[str, Any]:
    done = containers.run("sdk", images.app, "/opt/app/bin/python", "-c", SDK_SCRIPT, scope, flags=flags)
    assert done.returncode == 0, f"azure-identity failed:\n{done.stderr[-3000:]}"
    doc = json.loads(done.stdout)
    assert isinstance(doc, dict)
    return doc


def imds_records(net: PodNet) -> list[dict[str, Any]]:
    return in_netns(net.node, lambda: net.imds_client().records())


def token_requests(net: PodNet) -> list[dict[str, Any]]:
    return [r for r in imds_records(net) if "/identity/" in r["path"].lower()]


def assert_minted_for(
    net: PodNet, ident: Identity, access_token: str, scope: str, *, binding: bool = False
) -> None:
    """The fake's token for the pod's identity and `scope`, exchanged for its SA token."""
    claims = decode_fake_token(access_token)
    assert (claims["tid"], claims["appid"], claims["scp"], claims["sub"]) == (
        ident.tenant_id,
        ident.client_id,
        scope,
        ident.subject,
    )
    client = net.binding_client if binding else net.entra_client
    found = [r for r in in_netns(net.node, lambda: client().exchanges()) if r.get("token_n") == claims["n"]]
    assert len(found) == 1, "no exchange minted this token"
    assert found[0]["form"]["client_assertion"] == ident.sa_token


def wait_for_startup_check(net: PodNet, timeout_s: float = 10) -> None:
    """The proxy's start-up pass-through request, sent as uid 1501, reaches the node's IMDS:
    the image's USER is the uid the redirect exempts."""
    deadline = time.monotonic() + timeout_s
    while not any(r["path"] == "/metadata/versions" for r in imds_records(net)):
        assert time.monotonic() < deadline, "the proxy's start-up request never reached the node's IMDS"
        time.sleep(0.1)


def stop_within_grace(podman: Podman, name: str, transcript: Transcript) -> float:
    """`podman stop` (SIGTERM, then SIGKILL after the grace period) as the kubelet stops it;
    asserts exit 0 and returns how long it took."""
    started = time.monotonic()
    podman.ok("stop", "-t", str(GRACE_S), name, timeout=GRACE_S + 30)
    took = time.monotonic() - started
    state = json.loads(podman.ok("inspect", "--format", "{{json .State}}", name))
    transcript.note(f"{name} stopped in {took:.2f} s, exit code {state['ExitCode']}")
    assert state["ExitCode"] == 0, state
    assert took < GRACE_S / 3, f"SIGTERM took {took:.1f} s: the kubelet would have killed it"
    return took


def show_logs(podman: Podman, name: str, transcript: Transcript, lines: int = 8) -> str:
    done = podman.run("logs", name, quiet=True)
    text = done.stdout + done.stderr
    transcript.note(f"logs of {name} (last {lines} lines):")
    transcript.lines.extend(f"           | {line[:300]}" for line in text.strip().splitlines()[-lines:])
    return text


def init_rules_present(net: PodNet, backend: str) -> bool:
    return init_rules_present_in(netns.netfilter_snapshot(net.pod), backend)


# ---- the images themselves -------------------------------------------------------------------


def run_no_network(podman: Podman, image: str, *argv: str, entrypoint: str = "/bin/sh") -> str:
    return podman.ok(
        "run",
        "--rm",
        "--network",
        "none",
        *img.ULIMITS,
        "--user",
        "0",
        "--entrypoint",
        entrypoint,
        image,
        *argv,
    )


# What the venv holds, and whatever else on the image's PATH or disk betrays a build tool.
CONTENTS = r"""
import importlib.metadata as m, json, os, shutil
pycs = [os.path.join(r, f) for r, _, files in os.walk("/opt/venv") for f in files if f.endswith(".pyc")]
def flags(path):
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8)[4:8], "little")
print(json.dumps({
    # PEP 552 flags 0b01: hash-based and unchecked, valid whatever mtimes the image gives.
    "pyc": {"opt-2": sum(".opt-2." in p for p in pycs), "level-0": sum(os.path.basename(p).count(".") == 2 for p in pycs),
            "not-unchecked-hash": sum(flags(p) != 1 for p in pycs)},
    "dists": sorted(d.metadata["Name"].lower() for d in m.distributions()),
    "tools": sorted(t for t in ("gcc", "cc", "pip", "pip3", "make") if shutil.which(t)),
    "dirs": sorted(p for p in ("/src", "/wheels", "/opt/builder", "/root/.cache/pip") if os.path.exists(p)),
    "tests": sorted(os.path.join(r, f) for r, _, files in os.walk("/opt/venv") for f in files
                    if f in ("conftest.py", "fake_entra.py") or (f.startswith("test_") and "azwi_netproxy" in r)),
}))
"""


@pytest.mark.timeout(1500)  # the first test builds the images (func_only off: setup counts)
def test_both_images_build_within_budget_and_carry_only_their_program(
    images: ImageSet, podman: Podman, transcript: Transcript
) -> None:
    transcript.note(f"images built in {images.build_seconds:.0f} s on {images.base}")
    base = images.size(podman, images.base)
    sizes = {"proxy": images.size(podman, images.proxy), "proxy-init": images.size(podman, images.init)}
    transcript.note(
        f"base {base / MB:.0f} MB; "
        + "; ".join(
            f"{target} {size / MB:.0f} MB (+{(size - base) / MB:.1f} MB)" for target, size in sizes.items()
        )
    )
    for target, size in sizes.items():
        assert size - base <= BUDGET[target], f"{target} adds {(size - base) / MB:.1f} MB to its base"

    proxy = json.loads(
        run_no_network(podman, images.proxy, "-c", CONTENTS, entrypoint="/opt/venv/bin/python")
    )
    init = json.loads(run_no_network(podman, images.init, "-c", CONTENTS, entrypoint="/opt/venv/bin/python"))
    for contents in (proxy, init):
        assert "azwi-netproxy" in contents["dists"]
        assert not {"pip", "setuptools", "wheel", "pyroute2", "pytest"} & set(contents["dists"]), contents
        assert contents["tools"] == [] and contents["dirs"] == [] and contents["tests"] == [], contents
    # Bytecode at the one level each program runs at (the proxy with PYTHONOPTIMIZE=2).
    assert proxy["pyc"]["level-0"] == 0 and proxy["pyc"]["opt-2"] > 100, proxy["pyc"]
    assert init["pyc"]["opt-2"] == 0 and init["pyc"]["level-0"] > 100, init["pyc"]
    assert proxy["pyc"]["not-unchecked-hash"] == init["pyc"]["not-unchecked-hash"] == 0
    assert "python-iptables" not in proxy["dists"]
    assert "python-iptables" in init["dists"]
    # Both backends' tools and the libraries python-iptables loads, in the init image only.
    tools = run_no_network(
        podman,
        images.init,
        "-c",
        "nft --version && iptables-legacy --version && ls /usr/lib/*/libip4tc.so.2 "
        "/usr/lib/*/libxtables.so.12",
    )
    assert "nftables" in tools and "legacy" in tools
    assert "nft" not in run_no_network(podman, images.proxy, "-c", "command -v nft iptables || true")

    # The host's CA bundle was mounted into the builds; no layer keeps it.
    def bundle(image: str) -> str:
        return run_no_network(podman, image, "-c", "sha256sum < /etc/ssl/certs/ca-certificates.crt").split()[
            0
        ]

    base_bundle = bundle(images.base)
    assert bundle(images.proxy) == bundle(images.init) == base_bundle
    if img.HOST_CA_BUNDLE.is_file():
        host = hashlib.sha256(img.HOST_CA_BUNDLE.read_bytes()).hexdigest()
        transcript.note(f"host CA bundle {'differs from' if host != base_bundle else 'equals'} the base's")


def test_image_configs_are_upstreams(images: ImageSet, podman: Podman) -> None:
    proxy = podman.inspect(images.proxy)["Config"]
    init = podman.inspect(images.init)["Config"]
    # Numeric, so runAsNonRoot can verify it; the redirect exempts this uid.
    assert proxy["User"] == f"{PROXY_UID}:{PROXY_UID}"
    assert proxy["Entrypoint"] == ["/proxy"] and not proxy.get("Cmd")
    assert init.get("User", "") in ("", "0", "root")
    assert init["Entrypoint"] == ["/init/azwi-netproxy-init"] and not init.get("Cmd")
    env = {k: v for k, _, v in (e.partition("=") for e in proxy["Env"])}
    assert env["PYTHONOPTIMIZE"] == "2" and env["PATH"].startswith("/opt/venv/bin:")
    for config in (proxy, init):
        assert "PYTHONNOUSERSITE=1" in config["Env"], config["Env"]
    version = run_no_network(podman, images.proxy, "--version", entrypoint="/proxy")
    assert version.strip().startswith("azwi-netproxy ")
    version = run_no_network(podman, images.init, "--version", entrypoint="/init/azwi-netproxy-init")
    assert version.strip().startswith("azwi-netproxy-init ")


# ---- the pod the webhook makes ----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_webhook_pod_gets_tokens_through_the_redirect_and_fails_closed(
    backend: str,
    images: ImageSet,
    podman: Podman,
    net: PodNet,
    containers: Containers,
    transcript: Transcript,
) -> None:
    ident = make_identity(net)
    transcript.note(
        f"pod namespace {net.pod} (eth0 {img.POD_ADDR}, default via {img.NODE_ADDR} in {net.node})"
    )

    # The init container: NET_ADMIN and NET_RAW only, exit 0, and --check passes afterwards.
    assert (
        containers.run(
            "init-check", images.init, "--backend", backend, "--check", flags=INIT_FLAGS
        ).returncode
        == 1
    )
    done = containers.run("init", images.init, "--backend", backend, flags=INIT_FLAGS)
    assert done.returncode == 0, done.stderr
    assert init_rules_present(net, backend)
    assert (
        containers.run(
            "init-check", images.init, "--backend", backend, "--check", flags=INIT_FLAGS
        ).returncode
        == 0
    )

    # The proxy container, and its postStart hook as the kubelet runs it.
    env = {**webhook_env(ident), "SSL_CERT_FILE": f"{WI_CA_DIR}/ca.crt"}
    proxy = containers.start(
        "proxy", images.proxy, f"--proxy-port={PROXY_PORT}", "--log-level=info", flags=proxy_flags(ident, env)
    )
    hook = podman.run(
        "exec", proxy, "/proxy", f"--proxy-port={PROXY_PORT}", "--probe", "--log-level=info", timeout=30
    )
    assert hook.returncode == 0, hook.stderr
    wait_for_startup_check(net)

    # The apps, as uid 1000, with no endpoint override.
    got = curl(containers, images, TOKEN_URL)
    assert got.status == 200, got
    doc = got.json()
    assert (doc["client_id"], doc["token_type"]) == (ident.client_id, "Bearer")
    assert_minted_for(net, ident, doc["access_token"], "https://management.azure.com//.default")
    scope = "https://storage.azure.com/.default"
    sdk = sdk_token(containers, images, scope)
    assert_minted_for(net, ident, sdk["token"], scope)
    assert sdk["expires_on"] > time.time()
    passed = curl(containers, images, INSTANCE_URL)
    assert (passed.status, passed.json()) == (200, INSTANCE), passed
    assert token_requests(net) == []
    logs = show_logs(podman, proxy, transcript)
    assert '"uri":"/metadata/identity/oauth2/token' in logs.replace(" ", "")

    # SIGTERM: exit 0 at once; then the pod fails closed.
    stop_within_grace(podman, proxy, transcript)
    before = imds_records(net)
    for url in (TOKEN_URL, INSTANCE_URL):
        refused = curl(containers, images, url)
        assert (refused.exit_code, refused.status) == (7, 0), refused  # 7: could not connect
    assert imds_records(net) == before


def test_identity_binding_pod_exchanges_through_the_token_proxy(
    images: ImageSet, podman: Podman, net: PodNet, containers: Containers
) -> None:
    ident = make_identity(net)
    assert containers.run("init", images.init, flags=INIT_FLAGS).returncode == 0
    env = {
        **webhook_env(ident),
        "AZURE_KUBERNETES_TOKEN_PROXY": f"https://{img.ENTRA_ADDR}:{img.BINDING_PORT}",
        "AZURE_KUBERNETES_SNI_NAME": img.BINDING_SNI,
        "AZURE_KUBERNETES_CA_FILE": f"{WI_CA_DIR}/ca.crt",
    }
    proxy = containers.start(
        "proxy", images.proxy, f"--proxy-port={PROXY_PORT}", "--log-level=info", flags=proxy_flags(ident, env)
    )
    assert (
        podman.run("exec", proxy, "/proxy", f"--proxy-port={PROXY_PORT}", "--probe", timeout=30).returncode
        == 0
    )
    scope = "https://vault.azure.net/.default"
    assert_minted_for(net, ident, sdk_token(containers, images, scope)["token"], scope, binding=True)
    [exchange] = in_netns(net.node, lambda: net.binding_client().exchanges())
    assert exchange["sni"] == img.BINDING_SNI
    assert in_netns(net.node, lambda: net.entra_client().exchanges()) == []


def test_read_only_proxy_never_compiles_python_at_run_time(
    images: ImageSet, podman: Podman, net: PodNet, containers: Containers, transcript: Transcript
) -> None:
    # PYTHONVERBOSE names the file of every module's code: a module without its level-2
    # bytecode in the image would be compiled from source at every start (and in every pod).
    ident = make_identity(net)
    assert containers.run("init", images.init, flags=INIT_FLAGS).returncode == 0
    env = {**webhook_env(ident), "SSL_CERT_FILE": f"{WI_CA_DIR}/ca.crt", "PYTHONVERBOSE": "1"}
    proxy = containers.start(
        "proxy", images.proxy, f"--proxy-port={PROXY_PORT}", flags=proxy_flags(ident, env)
    )
    assert (
        podman.run("exec", proxy, "/proxy", f"--proxy-port={PROXY_PORT}", "--probe", timeout=30).returncode
        == 0
    )
    assert curl(containers, images, TOKEN_URL).status == 200
    assert curl(containers, images, INSTANCE_URL).status == 200
    podman.ok("stop", "-t", str(GRACE_S), proxy, timeout=GRACE_S + 30)
    logs = podman.run("logs", proxy, quiet=True)
    loaded, from_source = code_loaded(logs.stdout + logs.stderr)
    transcript.note(f"{len(loaded)} modules loaded, {len(from_source)} compiled from source")
    assert len(loaded) > 100
    assert from_source == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_init_never_compiles_python_at_run_time(
    backend: str, images: ImageSet, net: PodNet, containers: Containers, transcript: Transcript
) -> None:
    # The init container runs at every pod start: a stdlib module without its bytecode in
    # the image is compiled there each time (the images test builds on a base without any).
    flags = (*INIT_FLAGS, "-e", "PYTHONVERBOSE=1")
    for argv in (("--backend", backend), ("--backend", backend, "--check")):
        done = containers.run("init", images.init, *argv, flags=flags)
        assert done.returncode == 0, done.stderr[-3000:]
        loaded, from_source = code_loaded(done.stdout + done.stderr)
        transcript.note(f"init {' '.join(argv)}: {len(loaded)} modules loaded, {len(from_source)} compiled from source")
        assert len(loaded) > 50
        assert from_source == [], "\n".join(from_source)
    assert init_rules_present(net, backend)


def code_loaded(verbose_output: str) -> tuple[list[str], list[str]]:
    """PYTHONVERBOSE's "code object from" lines: every module's, and those read from source."""
    loaded = [line for line in verbose_output.splitlines() if line.startswith("# code object from")]
    return loaded, [line for line in loaded if not line.rstrip("'").endswith(".pyc")]


# ---- the native sidecar, as deploy/manual/native-sidecar.yaml lays out the pod ----------------


def security_flags(context: Mapping[str, Any], *, user: bool = True) -> list[str]:
    """podman flags for a container's securityContext (the fields our manifests use)."""
    assert not context.get("privileged"), "our manifests never ask for privileged containers"
    flags: list[str] = []
    if user and "runAsUser" in context:
        flags += ["--user", f"{context['runAsUser']}:{context.get('runAsGroup', context['runAsUser'])}"]
    caps = context.get("capabilities") or {}
    flags += [f for cap in caps.get("drop") or [] for f in ("--cap-drop", cap)]
    flags += [f for cap in caps.get("add") or [] for f in ("--cap-add", cap)]
    if context.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    if context.get("readOnlyRootFilesystem"):
        flags += ["--read-only", "--read-only-tmpfs=false"]
    return flags


def container_env(container: Mapping[str, Any]) -> dict[str, str]:
    return {str(e["name"]): str(e["value"]) for e in container.get("env") or []}


def test_native_sidecar_manifest_order_and_security_contexts(
    images: ImageSet, podman: Podman, net: PodNet, containers: Containers, transcript: Transcript
) -> None:
    [deployment] = [
        d for d in yaml.safe_load_all(NATIVE_SIDECAR.read_text()) if d and d["kind"] == "Deployment"
    ]
    spec = deployment["spec"]["template"]["spec"]
    inits, apps = spec["initContainers"], spec["containers"]
    assert [role(c) for c in inits] == ["init", "proxy", None], "init, then the sidecar, then the user's own"
    init_c, proxy_c, user_init_c = inits
    [app_c] = apps
    assert proxy_c["restartPolicy"] == "Always"
    # The manifest's uid for the proxy is the image's own: the container runs without --user.
    image_user = podman.inspect(images.proxy)["Config"]["User"]
    assert (
        f"{proxy_c['securityContext']['runAsUser']}:{proxy_c['securityContext']['runAsGroup']}" == image_user
    )
    proxy_env = container_env(proxy_c)
    ident = make_identity(net, tenant_id=proxy_env["AZURE_TENANT_ID"], client_id=proxy_env["AZURE_CLIENT_ID"])
    [mount] = proxy_c["volumeMounts"]
    token_dir = str(mount["mountPath"])
    assert proxy_env["AZURE_FEDERATED_TOKEN_FILE"] == f"{token_dir}/{TOKEN_FILE_NAME}"

    # 1. The init container runs to completion.
    transcript.note(
        f"init containers in order: {[c['name'] for c in inits]}; containers: {[c['name'] for c in apps]}"
    )
    done = containers.run(
        init_c["name"],
        images.init,
        flags=[*security_flags(init_c["securityContext"]), *env_flags(container_env(init_c))],
    )
    assert done.returncode == 0, done.stderr
    # 2. The sidecar starts; the next init container waits for its startupProbe.
    env = {
        **proxy_env,
        "AZURE_AUTHORITY_HOST": f"https://{img.ENTRA_ADDR}/",
        "SSL_CERT_FILE": f"{WI_CA_DIR}/ca.crt",
    }
    proxy = containers.start(
        proxy_c["name"],
        images.proxy,
        *proxy_c["args"],
        flags=[
            *security_flags(proxy_c["securityContext"], user=False),
            "-v",
            f"{ident.token_dir}:{token_dir}:ro",
            "-v",
            f"{ident.ca_dir}:{WI_CA_DIR}:ro",
            *env_flags(env),
        ],
    )
    probe = proxy_c["startupProbe"]
    for attempt in range(int(probe["failureThreshold"])):
        if (
            podman.run("exec", proxy, *probe["exec"]["command"], timeout=probe["timeoutSeconds"]).returncode
            == 0
        ):
            break
        assert attempt + 1 < probe["failureThreshold"], "the startupProbe never passed"
        time.sleep(probe["periodSeconds"])
    # 3. The user's init container gets a token, 4. then the app.
    user_flags = (*security_flags(user_init_c["securityContext"]), *APP_ENV)
    got = curl(containers, images, TOKEN_URL, flags=user_flags)
    assert got.status == 200, got
    assert_minted_for(net, ident, got.json()["access_token"], "https://management.azure.com//.default")
    app_flags = (*security_flags(app_c["securityContext"]), *APP_ENV)
    scope = "https://graph.microsoft.com/.default"
    assert_minted_for(net, ident, sdk_token(containers, images, scope, flags=app_flags)["token"], scope)
    assert token_requests(net) == []
    # 5. The kubelet stops the sidecar after the app.
    stop_within_grace(podman, proxy, transcript)


# ---- CNI mode: the node agent from the proxy-init image ----------------------------------------


def test_the_cni_agent_runs_from_the_init_image_as_its_daemonset_runs_it(
    images: ImageSet, podman: Podman, transcript: Transcript
) -> None:
    """deploy/cni/node-agent.yaml's container, as podman can run it: the init image with
    `azwi-netproxy-cni-agent`, privileged, the host's PID namespace, the node's CNI dirs and
    run dir mounted; no network (the DaemonSet's hostNetwork is the node's, which a test
    must not use, and the agent needs none). The plugin is then called as a runtime calls it,
    from a bin dir holding only the shim the containerised agent wrote, and works inside
    the image (nft, python-iptables' libraries) for a pod namespace of the test's."""
    from support.cni_node import REFERENCE_PLUGINS, Runtime, cluster_conflist, node

    with node(cluster_conflist()) as made, netns.namespace("azimgcni") as pod_ns:
        name = f"azwi-test-cni-agent-{uuid.uuid4().hex[:8]}"
        made.run_dir.mkdir()
        try:
            start_cni_agent(podman, images, made, name)
            assert sorted(p.name for p in made.bin_dir.iterdir()) == ["azwi-netproxy"]
            assert "PYTHON=/opt/venv/bin/python" in (made.bin_dir / "azwi-netproxy").read_text()
            conflist = made.conflist()
            assert conflist["plugins"][-1]["type"] == "azwi-netproxy"
            for backend in ("nftables", "iptables"):
                chained = json.loads(json.dumps(conflist))
                chained["plugins"][-1]["backend"] = backend
                runtime = Runtime([made.bin_dir, REFERENCE_PLUGINS], container_id=uuid.uuid4().hex,
                                  netns=f"/run/netns/{pod_ns}",
                                  annotations={"azwi-netproxy.io/redirect": "true"})
                added = runtime.add(chained)
                assert added.returncode == 0, str(added)
                snapshot = netns.netfilter_snapshot(pod_ns)
                assert init_rules_present_in(snapshot, backend), snapshot
                assert runtime.check(chained).returncode == 0
                deleted = runtime.delete(chained)
                assert deleted.returncode == 0, str(deleted)
                assert not init_rules_present_in(netns.netfilter_snapshot(pod_ns), backend)
            # The shim runs `python -I`, which writes the bytecode of what it had to compile
            # into the container: each module there is one every plugin call would compile
            # on a read-only root (the image's own bytecode is in its layers, not the diff).
            written = [line for line in podman.ok("diff", name).splitlines() if line.endswith(".pyc")]
            assert written == [], "\n".join(written)
            transcript.note("the agent's log:\n" + podman.ok("logs", name)[-2000:])
            stopped = podman.run("stop", "-t", "10", name)
            assert stopped.returncode == 0, stopped.stderr
            code = podman.ok("inspect", "--format", "{{.State.ExitCode}}", name).strip()
            assert code == "0", code
            assert not (made.run_dir / "cni-agent").exists(), "the stopped agent left its state file"
        finally:
            podman.run("rm", "-f", "-t", "0", name, quiet=True)


# ---- node mode: the agent from the proxy-init image, the node process from the proxy image ------

NODE_DAEMONSET = img.REPO / "deploy" / "node" / "node-agent.yaml"
NODE_CA = "/etc/azwi-netproxy-test/ca.pem"


def node_proxy_container() -> dict[str, Any]:
    """deploy/node/node-agent.yaml's `node-proxy` container, and the DaemonSet's pod spec."""
    [daemonset] = [d for d in yaml.safe_load_all(NODE_DAEMONSET.read_text()) if d and d["kind"] == "DaemonSet"]
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    [container] = [c for c in spec["containers"] if c["name"] == "node-proxy"]
    return dict(container)


def test_node_mode_runs_from_the_images_as_its_daemonset_runs_them(
    images: ImageSet, podman: Podman, net: PodNet, containers: Containers, transcript: Transcript
) -> None:
    """The CNI agent from the proxy-init image (as the CNI test above runs it) and the node
    process from the proxy image as deploy/node/node-agent.yaml's `node-proxy` container has
    it: its command, securityContext (root with only SYS_ADMIN and DAC_READ_SEARCH, read-only
    root, no privilege escalation: the pod's token is its uid's, mode 0600), env and mounts (the run dir; the kubelet's pods dir and
    the host's /var/run/netns read-only, slave propagation), in the node's network namespace
    (hostNetwork). ADD through the shim the agent wrote enrols the pod's namespace; an app as
    uid 1000 there gets the token Entra minted for the pod's own projected token, and nothing
    reaches the node's IMDS; with the node container stopped (exit 0) the app is refused;
    started again it serves the pod again without a new ADD (it opens the recorded namespace
    through the /var/run/netns mount). PYTHONVERBOSE shows the node process compiles no
    Python at run time (the proxy image's bytecode covers it)."""
    from support.cni_node import REFERENCE_PLUGINS, Runtime, cluster_conflist, node
    from support.nodemode import KubeletPod, kubelet_dir

    spec = node_proxy_container()
    with node(cluster_conflist()) as made:
        made.run_dir.mkdir()
        pods_dir = net.work / "kubelet-pods"
        pods_dir.mkdir(mode=0o750)
        uid, namespace = str(uuid.uuid4()), "team-" + uuid.uuid4().hex[:6]
        pod = KubeletPod(ns=net.pod, uid=uid, namespace=namespace, name="app", service_account="workload",
                         issuer=f"https://oidc.prod-aks.azure.com/{new_guid()}/",
                         kubelet_dir=kubelet_dir(pods_dir, uid))
        token = pod.project_token()
        # As the kubelet projects it for a pod whose containers all run as one uid: that uid's,
        # mode 0600 (what the manifest's DAC_READ_SEARCH is for).
        token_file = token.path.resolve()
        os.chown(token_file, APP_UID, APP_UID)
        token_file.chmod(0o600)
        tenant_id, client_id = new_guid(), new_guid()
        in_netns(net.node, lambda: net.entra_client().add_app(tenant_id, client_id, [pod.subject], pod.issuer))

        # The manifest's volumes, each a directory of this test's (the netns one is the host's:
        # where `ip netns` pins the test's namespaces, as containerd and CRI-O pin theirs).
        hosts = {"kubelet-pods": str(pods_dir), "run": str(made.run_dir), "netns": "/run/netns"}
        mounts = []
        for mount in spec["volumeMounts"]:
            options = ["ro"] if mount.get("readOnly") else []
            if mount.get("mountPropagation") == "HostToContainer":
                options.append("rslave")
            mounts += ["-v", f"{hosts[mount['name']]}:{mount['mountPath']}" + (f":{','.join(options)}" if options else "")]
        env = {**container_env(spec), "AZURE_TENANT_ID": tenant_id,
               "AZURE_AUTHORITY_HOST": f"https://{img.ENTRA_ADDR}/", "SSL_CERT_FILE": NODE_CA,
               "PYTHONVERBOSE": "1"}
        [command, *args] = spec["command"]
        probe = spec["readinessProbe"]["exec"]["command"]

        agent = f"azwi-test-cni-agent-{uuid.uuid4().hex[:8]}"
        node_name = containers.name("node")

        def wait_ready() -> None:
            deadline = time.monotonic() + 30
            while podman.run("exec", node_name, *probe, quiet=True).returncode != 0:
                assert time.monotonic() < deadline, podman.run("logs", node_name).stderr[-3000:]
                time.sleep(0.2)

        try:
            start_cni_agent(podman, images, made, agent)
            podman.ok(
                "run", "-d", "--name", node_name, "--network", f"ns:/run/netns/{net.node}", *img.ULIMITS,
                *security_flags(spec["securityContext"]), *mounts, "-v", f"{net.ca_file}:{NODE_CA}:ro",
                *env_flags(env), "--entrypoint", command, images.proxy, *args,
            )
            wait_ready()

            # ADD as the runtime runs the chain, through the shim in the node's bin dir.
            runtime = Runtime([made.bin_dir, REFERENCE_PLUGINS], container_id=uuid.uuid4().hex,
                              netns=f"/run/netns/{net.pod}",
                              annotations={"azwi-netproxy.io/node-proxy": "true",
                                           "azwi-netproxy.io/client-id": client_id},
                              args={"K8S_POD_NAMESPACE": namespace, "K8S_POD_NAME": "app",
                                    "K8S_POD_INFRA_CONTAINER_ID": "x", "K8S_POD_UID": uid})
            conflist = made.conflist()
            added = runtime.add(conflist)
            assert added.returncode == 0, f"{added}\n{podman.run('logs', node_name).stderr[-3000:]}"
            transcript.note(f"ADD enrolled pod {namespace}/app (uid {uid}) in {net.pod}")

            got = curl(containers, images, TOKEN_URL)
            assert got.status == 200, got
            claims = decode_fake_token(got.json()["access_token"])
            assert (claims["tid"], claims["appid"], claims["sub"]) == (tenant_id, client_id, pod.subject), claims
            [exchange] = [r for r in in_netns(net.node, lambda: net.entra_client().exchanges())
                          if r.get("token_n") == claims["n"]]
            assert exchange["form"]["client_assertion"] == token.read()
            refused_other = curl(containers, images, INSTANCE_URL)
            assert refused_other.status == 403, refused_other  # pass-through is off in node mode
            assert imds_records(net) == []
            transcript.note(f"the app (uid {APP_UID}) got a token for {claims['appid']} minted for {claims['sub']}")

            stop_within_grace(podman, node_name, transcript)
            refused = curl(containers, images, TOKEN_URL)
            assert (refused.exit_code, refused.status) == (7, 0), refused  # 7: could not connect
            assert imds_records(net) == []

            # Started again (a rollout, a crash): the pod is served from its record, no ADD.
            podman.ok("start", node_name)
            wait_ready()
            again = curl(containers, images, TOKEN_URL)
            assert again.status == 200, again
            transcript.note("the node container started again: the pod is served again without a new ADD")
            stop_within_grace(podman, node_name, transcript)

            logs = podman.run("logs", node_name, quiet=True)
            loaded, from_source = code_loaded(logs.stdout + logs.stderr)
            transcript.note(f"node process (two starts): {len(loaded)} modules loaded, "
                            f"{len(from_source)} compiled from source")
            assert len(loaded) > 100
            assert from_source == [], "\n".join(from_source)
            transcript.note("the node process's own log lines:")
            transcript.lines.extend(f"           | {line[:300]}" for line in
                                    (logs.stdout + logs.stderr).splitlines() if line.startswith('{"level"'))

            deleted = runtime.delete(conflist)
            assert deleted.returncode == 0, str(deleted)
            assert list((made.run_dir / "node-pods").glob("*.json")) == []
        finally:
            podman.run("rm", "-f", "-t", "0", agent, quiet=True)


def start_cni_agent(podman: Podman, images: ImageSet, made: Any, name: str) -> None:
    """The agent's container as deploy/cni/node-agent.yaml has it (see the test above), for
    the node `made` (support.cni_node), once `--check` passes."""
    mounts = [("/host/opt/cni/bin", made.bin_dir), ("/host/etc/cni/net.d", made.conf_dir),
              (str(made.run_dir), made.run_dir)]
    env = {"AZWI_CNI_BIN_DIR": "/host/opt/cni/bin", "AZWI_CNI_CONF_DIR": "/host/etc/cni/net.d",
           "AZWI_CNI_RUN_DIR": str(made.run_dir), "AZWI_CNI_INTERVAL_S": "0.2", "LOG_LEVEL": "info"}
    flags = ["--privileged", "--pid", "host", "--network", "none", *img.ULIMITS,
             *(f for inside, outside in mounts for f in ("-v", f"{outside}:{inside}")),
             *(f for key, value in env.items() for f in ("-e", f"{key}={value}"))]
    podman.ok("run", "-d", "--name", name, *flags, "--entrypoint", "azwi-netproxy-cni-agent", images.init)
    deadline = time.monotonic() + 30
    while podman.run("exec", name, "azwi-netproxy-cni-agent", "--check", quiet=True).returncode != 0:
        assert time.monotonic() < deadline, podman.ok("logs", name)
        time.sleep(0.2)


def init_rules_present_in(snapshot: str, backend: str) -> bool:
    return ("table ip azwi_proxy" in snapshot) if backend == "nftables" else ("AZWI_PROXY_OUTPUT" in snapshot)
