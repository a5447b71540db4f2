"""deploy/: every manifest parses, passes `validate_manifest_docs`, and each variant keeps its promise.

The shared validator (tests/support/manifests.py) runs our own programs on the containers'
args and env; here we add what each variant is for (webhook labels and annotations,
init-first order, native sidecar, no NET_ADMIN anywhere), run the init's `--dry-run` with
each manifest's environment and check its output, and show that the validator catches the
mistakes it is there to catch.

Name: test_deploy
Scope: function.
Depends: PyYAML; azure-identity and msal for the AZURE_POD_IDENTITY_AUTHORITY_HOST check
(skipped with a reason without them).
"""

from __future__ import annotations

import copy
import http.server
import json
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.manifests import (
    AUDIENCE,
    IDENTITY_BINDING_ANNOTATION,
    INIT_NAME,
    INJECT_ANNOTATION,
    PORT_ANNOTATION,
    PROXY_NAME,
    TOKEN_FILE,
    USE_LABEL,
    InitRunner,
    WebhookSettings,
    image_repository,
    image_tag,
    load_documents,
    pod_template,
    role,
    simulate_webhook,
    validate_manifest_docs,
)

import azwi_netproxy
from azwi_netproxy import cli
from azwi_netproxy.identitymap import parse_identity_map
from azwi_netproxy.proxy import config

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
MANIFESTS = sorted(DEPLOY.rglob("*.yaml"))
VARIANTS = {
    "webhook/single-identity.yaml",
    "webhook/identity-binding.yaml",
    "webhook/multi-identity.yaml",
    "manual/classic-sidecar.yaml",
    "manual/native-sidecar.yaml",
    "no-init/sidecar-only.yaml",
}
OUR_IMAGES = WebhookSettings(
    proxy_image=f"myregistry.azurecr.io/azwi-netproxy/proxy:{azwi_netproxy.__version__}",
    proxy_init_image=f"myregistry.azurecr.io/azwi-netproxy/proxy-init:{azwi_netproxy.__version__}",
)


def rel(path: Path) -> str:
    return path.relative_to(DEPLOY).as_posix()


def docs_of(name: str) -> list[dict[str, Any]]:
    return load_documents([DEPLOY / name])


def workload(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    return deployment


def template_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    template = pod_template(workload(docs))
    assert template is not None
    return template


def service_account(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (sa,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    return sa


def effective_pods(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The pod spec as it runs: after the webhook (both forms) where the pod is labelled for it."""
    template = template_of(docs)
    if template["metadata"].get("labels", {}).get(USE_LABEL) == "true":
        for native in (True, False):
            pod = simulate_webhook(template, service_account(docs), OUR_IMAGES, native_sidecar=native)
            yield ("native" if native else "classic"), pod["spec"]
    else:
        yield "as written", template["spec"]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container.get("env") or [] if "value" in e}


def ours(spec: dict[str, Any], what: str) -> list[tuple[str, int, dict[str, Any]]]:
    return [(section, index, c) for section in ("initContainers", "containers")
            for index, c in enumerate(spec.get(section) or []) if role(c) == what]


# ---- every manifest ----


def test_every_variant_is_shipped_and_documented() -> None:
    assert {rel(p) for p in MANIFESTS} == VARIANTS
    readme = (DEPLOY / "README.md").read_text("utf-8")
    for name in VARIANTS:
        assert name in readme, f"deploy/README.md does not mention {name}"


@pytest.mark.parametrize("path", MANIFESTS, ids=rel)
def test_manifest_passes_the_shared_validation(path: Path) -> None:
    docs = load_documents([path])
    assert docs
    for doc in docs:
        assert yaml.safe_dump(doc)  # plain data: no tags, no anchors the API server would refuse
    assert validate_manifest_docs(docs, settings=OUR_IMAGES) == []


@pytest.mark.parametrize("path", MANIFESTS, ids=rel)
def test_our_images_carry_the_package_version(path: Path) -> None:
    template = template_of(load_documents([path]))
    for section in ("initContainers", "containers"):
        for container in template["spec"].get(section) or []:
            if role(container) is None:
                continue
            image = container["image"]
            assert image_repository(image).endswith(f"/azwi-netproxy/{'proxy-init' if role(container) == 'init' else 'proxy'}")
            assert image_tag(image) == azwi_netproxy.__version__, image


@pytest.mark.parametrize("path", MANIFESTS, ids=rel)
def test_init_dry_run_with_the_manifests_environment(path: Path) -> None:
    docs = load_documents([path])
    for form, spec in effective_pods(docs):
        for _, _, init in ours(spec, "init"):
            env = env_of(init)
            result = subprocess.run(
                [sys.executable, "-m", "azwi_netproxy.init", "--dry-run", *init.get("args", [])],
                capture_output=True, text=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env},
                timeout=60, check=False, cwd="/",
            )
            assert result.returncode == 0, f"{form}: {result.stderr}"
            assert f":{env.get('PROXY_PORT', '8000')}" in result.stdout, form
            assert env.get("PROXY_UID", "1501") in result.stdout, form
            assert "169.254.169.254" in result.stdout, form


@pytest.mark.parametrize("path", MANIFESTS, ids=rel)
def test_proxy_accepts_the_manifests_args_and_env(path: Path, tmp_path: Path) -> None:
    docs = load_documents([path])
    token = tmp_path / "azure-identity-token"
    token.write_text("header.payload.signature")
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    for form, spec in effective_pods(docs):
        (section, _, proxy), = ours(spec, "proxy")
        env = env_of(proxy)
        assert env["AZURE_FEDERATED_TOKEN_FILE"] == TOKEN_FILE
        # The projected path, swapped for a real file, as the kubelet would provide it.
        env["AZURE_FEDERATED_TOKEN_FILE"] = str(token)
        args = cli.proxy_parser().parse_args(proxy.get("args", []))
        mounts = {m["mountPath"]: m["name"] for m in proxy.get("volumeMounts") or []}
        volumes = {v["name"]: v for v in spec.get("volumes") or []}

        def read(file: str, mounts: dict[str, str] = mounts, volumes: dict[str, Any] = volumes) -> str:
            directory, _, key = file.rpartition("/")
            cm = config_maps[volumes[mounts[directory]]["configMap"]["name"]]
            return str(cm["data"][key])

        cfg = config.load(vars(args), env)
        assert cfg.proxy_port == 8000, form
        assert cfg.federated_token_file == str(token)
        assert cfg.default_client_id == "11111111-1111-1111-1111-111111111111"
        if "AZWI_IDENTITY_MAP" in env:
            assert cfg.identity_map_path is not None
            identity_map = parse_identity_map(read(cfg.identity_map_path), source=cfg.identity_map_path)
            assert len(identity_map.identities) >= 2
        if IDENTITY_BINDING_ANNOTATION in template_of(docs)["metadata"].get("annotations", {}):
            assert cfg.identity_binding is not None
        else:
            assert cfg.identity_binding is None
        assert section in ("initContainers", "containers")


# ---- what each variant is for ----


@pytest.mark.parametrize("name", ["webhook/single-identity.yaml", "webhook/identity-binding.yaml"])
def test_webhook_variants_use_upstreams_labels_and_annotations(name: str) -> None:
    docs = docs_of(name)
    meta = template_of(docs)["metadata"]
    assert meta["labels"][USE_LABEL] == "true"
    assert meta["annotations"][INJECT_ANNOTATION] == "true"
    assert meta["annotations"][PORT_ANNOTATION] == "8000"
    binding = meta["annotations"].get(IDENTITY_BINDING_ANNOTATION)
    assert binding == ("true" if "binding" in name else None)
    sa = service_account(docs)
    assert sa["metadata"]["annotations"]["azure.workload.identity/client-id"]
    assert template_of(docs)["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    # The webhook supplies both of our containers.
    assert not ours(template_of(docs)["spec"], "init")
    assert not ours(template_of(docs)["spec"], "proxy")


def test_multi_identity_declares_our_containers_so_the_map_reaches_the_proxy() -> None:
    docs = docs_of("webhook/multi-identity.yaml")
    template = template_of(docs)
    assert template["metadata"]["labels"][USE_LABEL] == "true"
    # With the inject annotation the webhook would add a second proxy where it looks for one.
    assert INJECT_ANNOTATION not in (template["metadata"].get("annotations") or {})
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (text,) = config_map["data"].values()
    identity_map = parse_identity_map(text, source="multi-identity.yaml")
    assert identity_map.only_listed
    assert len(identity_map.identities) >= 2
    assert any(i.resource_id for i in identity_map.identities)
    assert any(i.tenant_id for i in identity_map.identities)
    default = service_account(docs)["metadata"]["annotations"]["azure.workload.identity/client-id"]
    assert default in identity_map.by_client_id
    spec = template["spec"]
    assert spec["initContainers"][0]["name"] == INIT_NAME
    assert spec["containers"][0]["name"] == PROXY_NAME


@pytest.mark.parametrize("name", ["manual/classic-sidecar.yaml", "manual/native-sidecar.yaml"])
def test_manual_variants_put_our_init_first_and_project_the_token(name: str) -> None:
    template = template_of(docs_of(name))
    assert USE_LABEL not in template["metadata"].get("labels", {})  # no webhook needed
    spec = template["spec"]
    init = spec["initContainers"][0]
    assert init["name"] == INIT_NAME
    sc = init["securityContext"]
    assert sc["runAsUser"] == 0
    assert set(sc["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert env_of(init) == {"PROXY_PORT": "8000", "PROXY_UID": "1501"}
    (volume,) = [v for v in spec["volumes"] if v["name"] == "azure-identity-token"]
    (source,) = volume["projected"]["sources"]
    assert source["serviceAccountToken"] == {"path": "azure-identity-token", "audience": AUDIENCE,
                                             "expirationSeconds": 3600}
    (_, _, proxy), = ours(spec, "proxy")
    psc = proxy["securityContext"]
    assert psc["runAsUser"] == 1501 and psc["runAsNonRoot"] is True
    assert psc["readOnlyRootFilesystem"] is True and psc["allowPrivilegeEscalation"] is False
    assert psc["capabilities"] == {"drop": ["ALL"]}
    assert proxy["args"] == ["--proxy-port=8000", "--log-level=info"]


def test_classic_sidecar_is_first_with_upstreams_post_start_hook() -> None:
    spec = template_of(docs_of("manual/classic-sidecar.yaml"))["spec"]
    proxy = spec["containers"][0]
    assert proxy["name"] == PROXY_NAME
    assert proxy["lifecycle"]["postStart"]["exec"]["command"] == ["/proxy", "--proxy-port=8000", "--probe"]
    assert [c["name"] for c in spec["initContainers"]] == [INIT_NAME]


def test_native_sidecar_restarts_always_and_starts_before_user_init_containers() -> None:
    spec = template_of(docs_of("manual/native-sidecar.yaml"))["spec"]
    names = [c["name"] for c in spec["initContainers"]]
    assert names[:2] == [INIT_NAME, PROXY_NAME] and len(names) > 2  # then the user's
    proxy = spec["initContainers"][1]
    assert proxy["restartPolicy"] == "Always"
    probe = proxy["startupProbe"]
    assert probe["exec"]["command"] == ["/proxy", "--proxy-port=8000", "--probe"]
    assert probe["timeoutSeconds"] > 10  # `--probe` itself waits up to 10 s
    assert not ours(spec, "proxy")[1:] and all(c["name"] != PROXY_NAME for c in spec["containers"])


def test_no_init_variant_needs_no_privilege_anywhere() -> None:
    spec = template_of(docs_of("no-init/sidecar-only.yaml"))["spec"]
    assert not spec.get("initContainers")
    assert not ours(spec, "init")
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["securityContext"]["runAsNonRoot"] is True
    for container in spec["containers"]:
        sc = container["securityContext"]
        assert "add" not in sc.get("capabilities", {}), container["name"]
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert sc.get("privileged") is not True
        assert sc["allowPrivilegeEscalation"] is False
        if role(container) is None:
            assert env_of(container)["AZURE_POD_IDENTITY_AUTHORITY_HOST"] == "http://127.0.0.1:8000"
    dumped = yaml.safe_dump(spec)
    assert "NET_ADMIN" not in dumped and "NET_RAW" not in dumped


# ---- the validator catches what it is for ----


def _native() -> list[dict[str, Any]]:
    return copy.deepcopy(docs_of("manual/native-sidecar.yaml"))


def _spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = template_of(docs)["spec"]
    return spec


def _swap_first_inits(docs: list[dict[str, Any]]) -> None:
    inits = _spec(docs)["initContainers"]
    inits.insert(0, inits.pop())


def _no_net_raw(docs: list[dict[str, Any]]) -> None:
    _spec(docs)["initContainers"][0]["securityContext"]["capabilities"]["add"] = ["NET_ADMIN"]


def _proxy_uid_2000(docs: list[dict[str, Any]]) -> None:
    _spec(docs)["initContainers"][1]["securityContext"]["runAsUser"] = 2000


def _port_mismatch(docs: list[dict[str, Any]]) -> None:
    _spec(docs)["initContainers"][0]["env"][0]["value"] = "8001"


def _http_get_probe(docs: list[dict[str, Any]]) -> None:
    _spec(docs)["initContainers"][1]["startupProbe"] = {"httpGet": {"path": "/readyz", "port": 8000}}


def _no_restart_policy(docs: list[dict[str, Any]]) -> None:
    del _spec(docs)["initContainers"][1]["restartPolicy"]


def _bad_proxy_flag(docs: list[dict[str, Any]]) -> None:
    _spec(docs)["initContainers"][1]["args"] = ["--proxy-port=8000", "--log-level=loud"]


def _unknown_proxy_flag(docs: list[dict[str, Any]]) -> None:
    _spec(docs)["initContainers"][1]["args"] = ["--port=8000"]


def _no_tenant(docs: list[dict[str, Any]]) -> None:
    env = _spec(docs)["initContainers"][1]["env"]
    env[:] = [e for e in env if e["name"] != "AZURE_TENANT_ID"]


def _bad_init_env(docs: list[dict[str, Any]]) -> None:
    _spec(docs)["initContainers"][0]["env"][1]["value"] = "proxy"


def _writable_root(docs: list[dict[str, Any]]) -> None:
    _spec(docs)["initContainers"][1]["securityContext"]["readOnlyRootFilesystem"] = False


def _token_not_mounted(docs: list[dict[str, Any]]) -> None:
    _spec(docs)["initContainers"][1]["volumeMounts"] = []


def _wrong_audience(docs: list[dict[str, Any]]) -> None:
    _spec(docs)["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]["audience"] = "api://other"


def _unquoted_label(docs: list[dict[str, Any]]) -> None:
    template_of(docs)["metadata"]["labels"]["tier"] = 2


def _selector_mismatch(docs: list[dict[str, Any]]) -> None:
    workload(docs)["spec"]["selector"]["matchLabels"] = {"app": "other"}


def _renamed_proxy(docs: list[dict[str, Any]]) -> None:
    _spec(docs)["initContainers"][1]["name"] = "token-proxy"


def _two_proxies(docs: list[dict[str, Any]]) -> None:
    _spec(docs)["containers"].insert(0, copy.deepcopy(_spec(docs)["initContainers"][1]) | {"name": "azwi-proxy-2"})


def _no_init_without_authority_host(docs: list[dict[str, Any]]) -> None:
    del _spec(docs)["initContainers"][0]


MUTATIONS: list[tuple[str, Callable[[list[dict[str, Any]]], None], str]] = [
    ("user init before ours", _swap_first_inits, "runs before azwi-proxy-init"),
    ("init without NET_RAW", _no_net_raw, "NET_RAW"),
    ("proxy uid differs from PROXY_UID", _proxy_uid_2000, "loop back"),
    ("proxy port differs from PROXY_PORT", _port_mismatch, "redirects to 8001"),
    ("httpGet probe", _http_get_probe, "127.0.0.1 only"),
    ("native sidecar without restartPolicy", _no_restart_policy, "restartPolicy: Always"),
    ("bad log level", _bad_proxy_flag, "--log-level"),
    ("unknown proxy flag", _unknown_proxy_flag, "flag provided but not defined"),
    ("no tenant", _no_tenant, "AZURE_TENANT_ID"),
    ("bad PROXY_UID", _bad_init_env, "PROXY_UID"),
    ("writable root", _writable_root, "readOnlyRootFilesystem"),
    ("token not mounted", _token_not_mounted, "AZURE_FEDERATED_TOKEN_FILE"),
    ("wrong audience", _wrong_audience, "audience"),
    ("unquoted label", _unquoted_label, "must be a string"),
    ("selector mismatch", _selector_mismatch, "matchLabels"),
    ("renamed proxy", _renamed_proxy, "name our proxy container azwi-proxy"),
    ("two proxies", _two_proxies, "exactly one of each"),
    ("no init, no authority host", _no_init_without_authority_host, "AZURE_POD_IDENTITY_AUTHORITY_HOST"),
]


@pytest.mark.parametrize(("mutate", "expected"), [(m, e) for _, m, e in MUTATIONS], ids=[i for i, _, _ in MUTATIONS])
def test_validator_reports_the_mistake(mutate: Callable[[list[dict[str, Any]]], None], expected: str) -> None:
    docs = _native()
    mutate(docs)
    problems = validate_manifest_docs(docs, settings=OUR_IMAGES, run_init=False)
    assert any(expected in p for p in problems), problems


def test_validator_resolves_the_identity_map_through_its_config_map() -> None:
    docs = copy.deepcopy(docs_of("webhook/multi-identity.yaml"))
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    config_map["data"]["identity-map.yaml"] = "identities:\n  - clientID: not-a-guid\n"
    problems = validate_manifest_docs(docs, settings=OUR_IMAGES, run_init=False)
    assert any("not a GUID" in p for p in problems), problems
    docs = [d for d in docs if d["kind"] != "ConfigMap"]
    problems = validate_manifest_docs(docs, settings=OUR_IMAGES, run_init=False)
    assert any("AZWI_IDENTITY_MAP" in p and "not defined" in p for p in problems), problems


def test_validator_flags_upstreams_init_after_a_user_init_container() -> None:
    # Upstream's webhook appends its init container after the pod's own: those run unredirected.
    docs = copy.deepcopy(docs_of("webhook/single-identity.yaml"))
    _spec(docs)["initContainers"] = [{"name": "migrate-db", "image": "myregistry.azurecr.io/migrate:1"}]
    problems = validate_manifest_docs(docs, settings=OUR_IMAGES, run_init=False)
    assert any("migrate-db runs before azwi-proxy-init" in p for p in problems), problems


def test_validator_runs_the_init_dry_run_once_per_environment() -> None:
    runner = InitRunner()
    docs = docs_of("webhook/single-identity.yaml")
    assert validate_manifest_docs(docs, settings=OUR_IMAGES, init_runner=runner) == []
    # Both webhook forms give the init the same environment: one run.
    (done,) = runner.results.values()
    assert done.returncode == 0
    assert "redirect to :8000" in done.stdout or "--to-ports 8000" in done.stdout, done.stdout


# ---- AZURE_POD_IDENTITY_AUTHORITY_HOST, as the no-init README promises ----


class _TokenHandler(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, dict[str, list[str]], str | None]]

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        self.seen.append((url.path, urllib.parse.parse_qs(url.query), self.headers.get("Metadata")))
        now = int(time.time())
        resource = urllib.parse.parse_qs(url.query).get("resource", [""])[0]
        body = json.dumps({
            "access_token": "fake-access-token", "client_id": "11111111-1111-1111-1111-111111111111",
            "expires_in": "3600", "expires_on": str(now + 3600), "ext_expires_in": "3600",
            "not_before": str(now), "resource": resource, "token_type": "Bearer",
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def token_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, dict[str, list[str]], str | None]]]:
    """Name: token_endpoint. Scope: test. Depends: nothing.

    A stand-in for the sidecar on 127.0.0.1, with AZURE_POD_IDENTITY_AUTHORITY_HOST naming it;
    yields the requests it saw.
    """
    seen: list[tuple[str, dict[str, list[str]], str | None]] = []
    handler = type("Handler", (_TokenHandler,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_python_sdk_and_msal_honour_the_authority_host(token_endpoint: list[Any]) -> None:
    identity = pytest.importorskip("azure.identity", reason="azure-identity is a test dependency")
    msal = pytest.importorskip("msal", reason="msal is a test dependency")
    credential = identity.ManagedIdentityCredential()
    try:
        assert credential.get_token("https://vault.azure.net/.default").token == "fake-access-token"
    finally:
        credential.close()
    requests = pytest.importorskip("requests", reason="msal needs an HTTP client")
    client = msal.ManagedIdentityClient(msal.SystemAssignedManagedIdentity(), http_client=requests.Session())
    result = client.acquire_token_for_client(resource="https://storage.azure.com")
    assert result.get("access_token") == "fake-access-token", result
    assert [(path, query["resource"], metadata) for path, query, metadata in token_endpoint] == [
        ("/metadata/identity/oauth2/token", ["https://vault.azure.net"], "true"),
        ("/metadata/identity/oauth2/token", ["https://storage.azure.com"], "true"),
    ]
