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
    CNI_AGENT_COMMAND,
    CNI_PORT_ANNOTATION,
    IDENTITY_BINDING_ANNOTATION,
    INIT_NAME,
    INJECT_ANNOTATION,
    PORT_ANNOTATION,
    PROXY_NAME,
    REDIRECT_ANNOTATION,
    TOKEN_FILE,
    USE_LABEL,
    CniAgentRunner,
    InitRunner,
    WebhookSettings,
    image_repository,
    image_tag,
    load_documents,
    pod_security_violations,
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
    "cni/node-agent.yaml",
    "cni/pod.yaml",
    "node/node-agent.yaml",
    "node/pod.yaml",
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
    (found,) = [d for d in docs if d["kind"] in ("Deployment", "DaemonSet")]
    return found


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
    assert validate_manifest_docs(docs, settings=OUR_IMAGES, agent_runner=CniAgentRunner()) == []


@pytest.mark.parametrize("path", MANIFESTS, ids=rel)
def test_our_images_carry_the_package_version(path: Path) -> None:
    template = template_of(load_documents([path]))
    for section in ("initContainers", "containers"):
        for container in template["spec"].get(section) or []:
            if role(container) is None:
                continue
            image = container["image"]
            # The CNI node agent ships in the init's image: the rules are the same code. The
            # node process in the proxy's: the answers are the same code.
            expected = "proxy" if role(container) in ("proxy", "node-proxy") else "proxy-init"
            assert image_repository(image).endswith(f"/azwi-netproxy/{expected}")
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


# Every manifest but the node agents' and node mode's pod, which run no sidecar (their own checks
# are further down).
WITH_PROXY = [p for p in MANIFESTS if rel(p) not in ("cni/node-agent.yaml", "node/node-agent.yaml", "node/pod.yaml")]


@pytest.mark.parametrize("path", WITH_PROXY, ids=rel)
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


def test_cni_pod_asks_the_plugin_and_declares_the_proxy_as_a_native_sidecar() -> None:
    docs = docs_of("cni/pod.yaml")
    template = template_of(docs)
    meta = template["metadata"]
    assert meta["labels"][USE_LABEL] == "true"
    assert meta["annotations"][REDIRECT_ANNOTATION] == "true"
    assert meta["annotations"][CNI_PORT_ANNOTATION] == "8000"
    # The webhook's inject annotation would bring its privileged init container back.
    assert INJECT_ANNOTATION not in meta["annotations"] and PORT_ANNOTATION not in meta["annotations"]
    spec = template["spec"]
    assert not ours(spec, "init")
    proxy = spec["initContainers"][0]
    assert proxy["name"] == PROXY_NAME and proxy["restartPolicy"] == "Always"
    # As manual/native-sidecar.yaml has them.
    native = _spec(docs_of("manual/native-sidecar.yaml"))["initContainers"][1]
    for key in ("args", "startupProbe", "resources"):
        assert proxy[key] == native[key], key
    assert proxy["securityContext"] == native["securityContext"] | {"seccompProfile": {"type": "RuntimeDefault"}}
    assert len(spec["initContainers"]) > 1  # a user init container after the proxy, which gets tokens
    assert service_account(docs)["metadata"]["annotations"]["azure.workload.identity/client-id"]


@pytest.mark.parametrize("level", ["baseline", "restricted"])
def test_cni_pod_meets_the_pod_security_level(level: Any) -> None:
    docs = docs_of("cni/pod.yaml")
    template = template_of(docs)
    assert pod_security_violations(template["spec"], level, template["metadata"]["annotations"]) == []
    # And as it runs: the webhook adds env, a token mount and a projected volume, nothing else.
    for form, spec in effective_pods(docs):
        assert pod_security_violations(spec, level) == [], form
    dumped = yaml.safe_dump(template)
    assert "NET_ADMIN" not in dumped and "NET_RAW" not in dumped and "add:" not in dumped


def test_cni_node_agent_is_the_daemonset_the_plugin_needs() -> None:
    docs = docs_of("cni/node-agent.yaml")
    assert {(d["kind"], d["metadata"]["namespace"]) for d in docs} == {
        ("ServiceAccount", "kube-system"), ("DaemonSet", "kube-system"),
    }
    daemonset = workload(docs)
    assert daemonset["metadata"]["name"] == "azwi-netproxy-cni"
    assert daemonset["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    spec = template_of(docs)["spec"]
    assert spec["serviceAccountName"] == service_account(docs)["metadata"]["name"]
    assert spec["hostNetwork"] is True and spec["hostPID"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    (agent,) = spec["containers"]
    assert role(agent) == "cni-agent" and not spec.get("initContainers")
    assert agent["command"] == [CNI_AGENT_COMMAND]
    assert image_repository(agent["image"]) == "myregistry.azurecr.io/azwi-netproxy/proxy-init"
    assert agent["securityContext"]["privileged"] is True
    assert agent["resources"] == {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}}
    assert env_of(agent) == {
        "AZWI_CNI_BIN_DIR": "/host/opt/cni/bin",
        "AZWI_CNI_CONF_DIR": "/host/etc/cni/net.d",
        "AZWI_CNI_RUN_DIR": "/var/run/azwi-netproxy",
        "AZWI_CNI_UNINSTALL": "false",
        "AZWI_CNI_PLUGIN_CONFIG": "{}",
        "LOG_LEVEL": "info",
    }
    assert agent["readinessProbe"]["exec"]["command"] == [CNI_AGENT_COMMAND, "--check"]
    volumes = {v["name"]: v["hostPath"] for v in spec["volumes"]}
    mounts = {volumes[m["name"]]["path"]: m["mountPath"] for m in agent["volumeMounts"]}
    assert mounts == {
        "/opt/cni/bin": "/host/opt/cni/bin",
        "/etc/cni/net.d": "/host/etc/cni/net.d",
        "/var/run/azwi-netproxy": "/var/run/azwi-netproxy",
    }
    assert {v["path"]: v.get("type") for v in volumes.values()}["/var/run/azwi-netproxy"] == "DirectoryOrCreate"
    # It needs what the Pod Security levels forbid; that is why it lives in kube-system alone.
    violations = pod_security_violations(spec, "baseline")
    for expected in ("pod: hostNetwork", "pod: hostPID", "pod: hostPath volume", "privileged"):
        assert any(expected in v for v in violations), (expected, violations)


def test_cni_agent_accepts_the_manifests_environment() -> None:
    pytest.importorskip(
        "azwi_netproxy.cni",
        reason="azwi_netproxy.cni (issue 19's plugin and node agent) is not in this checkout yet: "
        "the agent's own check of the DaemonSet's environment cannot run",
    )
    docs = docs_of("cni/node-agent.yaml")
    (agent,) = template_of(docs)["spec"]["containers"]
    runner = CniAgentRunner()
    result = runner.check("cni/node-agent.yaml", [str(a) for a in agent.get("args") or []], env_of(agent))
    assert result is not None and not runner.skipped
    code, output = result
    # In an empty scratch tree nothing is installed yet (not ready), but the environment is accepted.
    assert code not in (2, 127) and "Traceback" not in output, (code, output)


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


def _init_without_passthrough(docs: list[dict[str, Any]]) -> None:
    _spec(docs)["initContainers"][0]["env"].append({"name": "AZWI_PASSTHROUGH", "value": "none"})


def _proxy_without_passthrough(docs: list[dict[str, Any]]) -> None:
    _spec(docs)["initContainers"][1].setdefault("env", []).append({"name": "AZWI_PASSTHROUGH", "value": "none"})


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
    # Issue 25: AZWI_PASSTHROUGH=none on one of the pair only.
    ("init none, proxy passes through", _init_without_passthrough, "exempts no uid: its requests come back to itself"),
    ("proxy none, init exempts", _proxy_without_passthrough, "still exempts uid 1501, a door"),
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


# ---- CNI mode: the validator and the Pod Security judge catch what they are for ----


def _cni_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _spec(docs)["initContainers"][0]


def _cni_meta(docs: list[dict[str, Any]]) -> dict[str, Any]:
    meta: dict[str, Any] = template_of(docs)["metadata"]
    return meta


def _agent(docs: list[dict[str, Any]]) -> dict[str, Any]:
    container: dict[str, Any] = _spec(docs)["containers"][0]
    return container


def _agent_env(docs: list[dict[str, Any]], name: str, value: str) -> None:
    for item in _agent(docs)["env"]:
        if item["name"] == name:
            item["value"] = value


def _user_init_first(docs: list[dict[str, Any]]) -> None:
    inits = _spec(docs)["initContainers"]
    inits.insert(0, inits.pop())


def _add_our_init(docs: list[dict[str, Any]]) -> None:
    init = copy.deepcopy(_spec(docs_of("manual/native-sidecar.yaml"))["initContainers"][0])
    _spec(docs)["initContainers"].insert(0, init)


def _no_proxy(docs: list[dict[str, Any]]) -> None:
    del _spec(docs)["initContainers"][0]


def _bin_mount_read_only(docs: list[dict[str, Any]]) -> None:
    _agent(docs)["volumeMounts"][0]["readOnly"] = True


def _conf_not_host_path(docs: list[dict[str, Any]]) -> None:
    _spec(docs)["volumes"][1] = {"name": "cni-conf", "emptyDir": {}}


CNI_MUTATIONS: list[tuple[str, str, Callable[[list[dict[str, Any]]], None], str]] = [
    ("redirect not true", "cni/pod.yaml", lambda d: _cni_meta(d)["annotations"].update({REDIRECT_ANNOTATION: "yes"}),
     'only "true" asks'),
    ("port annotation differs", "cni/pod.yaml", lambda d: _cni_meta(d)["annotations"].update({CNI_PORT_ANNOTATION: "8001"}),
     "the CNI plugin redirects to 8001"),
    ("port annotation not a port", "cni/pod.yaml",
     lambda d: _cni_meta(d)["annotations"].update({CNI_PORT_ANNOTATION: "80000"}), "is not a port"),
    ("user init before the proxy", "cni/pod.yaml", _user_init_first, "runs before azwi-proxy while the plugin's redirect"),
    ("webhook injection as well", "cni/pod.yaml",
     lambda d: _cni_meta(d)["annotations"].update({INJECT_ANNOTATION: "true"}), "privileged init container"),
    ("our init as well", "cni/pod.yaml", _add_our_init, "drop the init container"),
    ("proxy uid not the plugin's", "cni/pod.yaml", lambda d: _cni_pod(d)["securityContext"].update({"runAsUser": 2000}),
     "the CNI plugin exempts PROXY_UID 1501"),
    ("no proxy", "cni/pod.yaml", _no_proxy, "a proxy this pod does not run"),
    ("hostNetwork pod", "cni/pod.yaml", lambda d: _spec(d).update({"hostNetwork": True}), "no CNI plugin runs"),
    ("passthrough none, proxy passes through", "cni/pod.yaml",
     lambda d: _cni_meta(d)["annotations"].update({"azwi-netproxy.io/passthrough": "none"}),
     "the CNI plugin exempts no uid"),
    ("passthrough not a choice", "cni/pod.yaml",
     lambda d: _cni_meta(d)["annotations"].update({"azwi-netproxy.io/passthrough": "maybe"}),
     'the plugin knows "all" and "none"'),
    ("agent without hostPID", "cni/node-agent.yaml", lambda d: _spec(d).pop("hostPID"), "hostPID"),
    ("agent without hostNetwork", "cni/node-agent.yaml", lambda d: _spec(d).pop("hostNetwork"), "hostNetwork"),
    ("agent not privileged", "cni/node-agent.yaml", lambda d: _agent(d)["securityContext"].pop("privileged"),
     "must be privileged"),
    ("run dir elsewhere on the host", "cni/node-agent.yaml", lambda d: _agent_env(d, "AZWI_CNI_RUN_DIR", "/run/azwi"),
     "not on a hostPath"),
    ("bin dir read-only", "cni/node-agent.yaml", _bin_mount_read_only, "mounted read-only"),
    ("conf dir not the host's", "cni/node-agent.yaml", _conf_not_host_path, "AZWI_CNI_CONF_DIR /host/etc/cni/net.d is not on a hostPath"),
    ("uninstall not a boolean", "cni/node-agent.yaml", lambda d: _agent_env(d, "AZWI_CNI_UNINSTALL", "yes"),
     "AZWI_CNI_UNINSTALL 'yes'"),
    ("bad log level", "cni/node-agent.yaml", lambda d: _agent_env(d, "LOG_LEVEL", "loud"), "LOG_LEVEL"),
    ("no readiness probe", "cni/node-agent.yaml", lambda d: _agent(d).pop("readinessProbe"), "readinessProbe"),
    ("agent env missing", "cni/node-agent.yaml", lambda d: _agent(d)["env"].pop(0), "AZWI_CNI_BIN_DIR is not set"),
]


@pytest.mark.parametrize(("name", "mutate", "expected"), [(n, m, e) for _, n, m, e in CNI_MUTATIONS],
                         ids=[i for i, _, _, _ in CNI_MUTATIONS])
def test_validator_reports_the_cni_mistake(name: str, mutate: Callable[[list[dict[str, Any]]], None],
                                           expected: str) -> None:
    docs = copy.deepcopy(docs_of(name))
    assert validate_manifest_docs(docs, settings=OUR_IMAGES, run_init=False) == []
    mutate(docs)
    problems = validate_manifest_docs(docs, settings=OUR_IMAGES, run_init=False)
    assert any(expected in p for p in problems), problems


def _container_sc(docs: list[dict[str, Any]]) -> dict[str, Any]:
    sc: dict[str, Any] = _spec(docs)["containers"][0]["securityContext"]
    return sc


def _no_seccomp_anywhere(docs: list[dict[str, Any]]) -> None:
    del _spec(docs)["securityContext"]["seccompProfile"]
    del _container_sc(docs)["seccompProfile"]


def _root_allowed(docs: list[dict[str, Any]]) -> None:
    del _spec(docs)["securityContext"]["runAsNonRoot"]
    del _container_sc(docs)["runAsNonRoot"]


PSS_MUTATIONS: list[tuple[str, Callable[[list[dict[str, Any]]], None], str, str]] = [
    ("NET_ADMIN added", lambda d: _container_sc(d)["capabilities"].update({"add": ["NET_ADMIN"]}), "baseline",
     "containers ledger: capability NET_ADMIN added"),
    ("CHOWN added", lambda d: _container_sc(d)["capabilities"].update({"add": ["CHOWN"]}), "restricted",
     "only NET_BIND_SERVICE, not CHOWN"),
    ("privileged", lambda d: _container_sc(d).update({"privileged": True}), "baseline", "containers ledger: privileged"),
    ("hostNetwork", lambda d: _spec(d).update({"hostNetwork": True}), "baseline", "pod: hostNetwork"),
    ("hostPath", lambda d: _spec(d).update({"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}), "baseline",
     "pod: hostPath volume h"),
    ("hostPort", lambda d: _spec(d)["containers"][0].update({"ports": [{"containerPort": 80, "hostPort": 80}]}),
     "baseline", "hostPort 80"),
    ("seccomp Unconfined", lambda d: _container_sc(d).update({"seccompProfile": {"type": "Unconfined"}}), "baseline",
     "containers ledger: seccompProfile Unconfined"),
    ("no seccomp profile", _no_seccomp_anywhere, "restricted", "containers ledger: seccompProfile is not RuntimeDefault"),
    ("privilege escalation", lambda d: _container_sc(d).update({"allowPrivilegeEscalation": True}), "restricted",
     "containers ledger: allowPrivilegeEscalation"),
    ("runAsNonRoot false", lambda d: _container_sc(d).update({"runAsNonRoot": False}), "restricted",
     "containers ledger: runAsNonRoot"),
    ("runAsNonRoot unset", _root_allowed, "restricted", "containers ledger: runAsNonRoot"),
    ("uid 0", lambda d: _container_sc(d).update({"runAsUser": 0}), "restricted", "containers ledger: runAsUser 0"),
    ("capabilities kept", lambda d: _container_sc(d).pop("capabilities"), "restricted", "drop does not include ALL"),
    ("hostPath-free but not allowed", lambda d: _spec(d).update({"volumes": [{"name": "n", "nfs": {"server": "s", "path": "/"}}]}),
     "restricted", "volume n of type nfs"),
    ("unsafe sysctl", lambda d: _spec(d)["securityContext"].update({"sysctls": [{"name": "net.core.somaxconn", "value": "1"}]}),
     "baseline", "sysctl net.core.somaxconn"),
]


@pytest.mark.parametrize(("mutate", "level", "expected"), [(m, lv, e) for _, m, lv, e in PSS_MUTATIONS],
                         ids=[i for i, _, _, _ in PSS_MUTATIONS])
def test_pod_security_judge_refuses_what_the_level_forbids(
    mutate: Callable[[list[dict[str, Any]]], None], level: Any, expected: str
) -> None:
    docs = copy.deepcopy(docs_of("cni/pod.yaml"))
    mutate(docs)
    violations = pod_security_violations(_spec(docs), level)
    assert any(expected in v for v in violations), violations
    if level == "restricted":  # and baseline still admits it: the rule is restricted's own
        assert pod_security_violations(_spec(docs), "baseline") == []


def test_pod_security_judge_allows_what_restricted_allows() -> None:
    docs = copy.deepcopy(docs_of("cni/pod.yaml"))
    _container_sc(docs)["capabilities"]["add"] = ["NET_BIND_SERVICE"]
    del _container_sc(docs)["seccompProfile"]  # the pod's RuntimeDefault covers it
    _spec(docs)["volumes"] = [{"name": "scratch", "emptyDir": {}}, {"name": "cfg", "configMap": {"name": "x"}}]
    assert pod_security_violations(_spec(docs), "restricted") == []
    # The init container variants need NET_ADMIN as root: restricted and baseline refuse them.
    spec = _spec(docs_of("manual/native-sidecar.yaml"))
    assert "initContainers azwi-proxy-init: capability NET_ADMIN added" in pod_security_violations(spec, "baseline")


# ---- node mode (issue 26) ----

NODE_PROXY_ANNOTATION = "azwi-netproxy.io/node-proxy"


def _node_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = [c for c in _spec(docs)["containers"] if c["name"] == "node-proxy"]
    return container


def test_node_daemonset_is_the_cni_agent_plus_the_node_process() -> None:
    cni, node = docs_of("cni/node-agent.yaml"), docs_of("node/node-agent.yaml")
    # The same objects, so that it replaces the CNI-mode DaemonSet instead of running beside it.
    assert [(d["kind"], d["metadata"]["name"]) for d in node] == [(d["kind"], d["metadata"]["name"]) for d in cni]
    cni_spec, node_spec = template_of(cni)["spec"], template_of(node)["spec"]
    assert [c["name"] for c in node_spec["containers"]] == ["azwi-netproxy-cni", "node-proxy"]
    assert node_spec["containers"][0] == cni_spec["containers"][0]  # the agent exactly as in CNI mode
    for key in ("serviceAccountName", "hostNetwork", "hostPID", "priorityClassName", "tolerations"):
        assert node_spec[key] == cni_spec[key], key
    assert node_spec["volumes"][: len(cni_spec["volumes"])] == cni_spec["volumes"]
    container = _node_container(node)
    assert role(container) == "node-proxy"
    assert container["image"] == f"myregistry.azurecr.io/azwi-netproxy/proxy:{azwi_netproxy.__version__}"
    assert container["command"] == ["azwi-netproxy-node"]
    env = env_of(container)
    assert env == {
        "AZURE_TENANT_ID": env["AZURE_TENANT_ID"],
        "AZURE_AUTHORITY_HOST": "https://login.microsoftonline.com/",
        "AZWI_KUBELET_PODS_DIR": "/var/lib/kubelet/pods",
        "AZWI_CNI_RUN_DIR": "/var/run/azwi-netproxy",
        "AZWI_NODE_PASSTHROUGH": "none",
        "LOG_LEVEL": "info",
    }
    assert env["AZWI_CNI_RUN_DIR"] == env_of(node_spec["containers"][0])["AZWI_CNI_RUN_DIR"]
    assert container["readinessProbe"]["exec"]["command"] == ["azwi-netproxy-node", "--check"]
    assert container["securityContext"] == {
        "runAsUser": 0, "runAsNonRoot": False, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN", "DAC_READ_SEARCH"]},
    }
    assert container["resources"] == {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}
    volumes = {v["name"]: v["hostPath"] for v in node_spec["volumes"]}
    mounts = {volumes[m["name"]]["path"]: {k: v for k, v in m.items() if k != "name"} for m in container["volumeMounts"]}
    assert mounts == {
        "/var/lib/kubelet/pods": {"mountPath": "/var/lib/kubelet/pods", "readOnly": True,
                                  "mountPropagation": "HostToContainer"},
        "/var/run/azwi-netproxy": {"mountPath": "/var/run/azwi-netproxy"},
        "/var/run/netns": {"mountPath": "/var/run/netns", "readOnly": True, "mountPropagation": "HostToContainer"},
    }
    # Every choice is explained where it is made.
    text = (DEPLOY / "node" / "node-agent.yaml").read_text()
    for why in ("SYS_ADMIN: setns(2)", "DAC_READ_SEARCH:", "HostToContainer: the projected token volumes",
                "its control socket", "needs no host PID", "AZURE_TENANT_ID", "get 403"):
        assert why in text, why


def test_node_pod_has_annotations_and_nothing_of_ours() -> None:
    docs = docs_of("node/pod.yaml")
    template = template_of(docs)
    meta = template["metadata"]
    assert meta["labels"][USE_LABEL] == "true"  # the webhook still projects the token
    annotations = meta["annotations"]
    assert annotations[NODE_PROXY_ANNOTATION] == "true"
    for absent in (INJECT_ANNOTATION, PORT_ANNOTATION, REDIRECT_ANNOTATION, "azwi-netproxy.io/passthrough"):
        assert absent not in annotations, absent
    identity_map = parse_identity_map(annotations["azwi-netproxy.io/identity-map"], source="node/pod.yaml")
    assert json.loads(annotations["azwi-netproxy.io/identity-map"])  # JSON, as the contract says
    assert identity_map.only_listed and len(identity_map.identities) == 2
    assert annotations["azwi-netproxy.io/client-id"] in identity_map.by_client_id
    spec = template["spec"]
    assert not spec.get("initContainers") and [role(c) for c in spec["containers"]] == [None]
    dumped = yaml.safe_dump(template)
    assert "add:" not in dumped and "privileged" not in dumped and "hostNetwork" not in dumped


@pytest.mark.parametrize("level", ["baseline", "restricted"])
def test_node_pod_meets_the_pod_security_level(level: Any) -> None:
    docs = docs_of("node/pod.yaml")
    template = template_of(docs)
    assert pod_security_violations(template["spec"], level, template["metadata"]["annotations"]) == []
    for form, spec in effective_pods(docs):  # as it runs, after the webhook: env, a token mount
        assert pod_security_violations(spec, level) == [], form
        assert not ours(spec, "proxy") and not ours(spec, "init"), form


def test_node_daemonset_needs_what_the_levels_forbid_so_it_lives_in_kube_system() -> None:
    docs = docs_of("node/node-agent.yaml")
    assert {d["metadata"]["namespace"] for d in docs} == {"kube-system"}
    violations = pod_security_violations(template_of(docs)["spec"], "baseline")
    for expected in ("pod: hostNetwork", "pod: hostPath volume kubelet-pods", "pod: hostPath volume netns",
                     "containers node-proxy: capability SYS_ADMIN added",
                     "containers node-proxy: capability DAC_READ_SEARCH added"):
        assert expected in violations, (expected, violations)
    assert not [v for v in violations if v.startswith("containers node-proxy: privileged")]


def _node_env(docs: list[dict[str, Any]], name: str, value: str | None) -> None:
    container = _node_container(docs)
    container["env"] = [e for e in container["env"] if e["name"] != name]
    if value is not None:
        container["env"].append({"name": name, "value": value})


def _node_mount(docs: list[dict[str, Any]], volume: str, **changes: Any) -> None:
    for mount in _node_container(docs)["volumeMounts"]:
        if mount["name"] == volume:
            mount.update(changes)
            for key in [k for k, v in changes.items() if v is None]:
                del mount[key]


def _node_pod_meta(docs: list[dict[str, Any]]) -> dict[str, Any]:
    annotations: dict[str, Any] = template_of(docs)["metadata"]["annotations"]
    return annotations


NODE_MUTATIONS: list[tuple[str, str, Callable[[list[dict[str, Any]]], None], str]] = [
    ("node: pods dir writable", "node/node-agent.yaml", lambda d: _node_mount(d, "kubelet-pods", readOnly=None),
     "AZWI_KUBELET_PODS_DIR /var/lib/kubelet/pods must be mounted read-only"),
    ("node: no propagation", "node/node-agent.yaml",
     lambda d: _node_mount(d, "kubelet-pods", mountPropagation=None), "needs mountPropagation: HostToContainer"),
    ("node: netns without propagation", "node/node-agent.yaml",
     lambda d: _node_mount(d, "netns", mountPropagation="None"), "the netns directory /var/run/netns needs"),
    ("node: run dir not the agent's", "node/node-agent.yaml",
     lambda d: (_node_env(d, "AZWI_CNI_RUN_DIR", "/run/elsewhere")), "not the host's /run/elsewhere"),
    ("node: run dir read-only", "node/node-agent.yaml", lambda d: _node_mount(d, "run", readOnly=True),
     "AZWI_CNI_RUN_DIR /var/run/azwi-netproxy must be mounted read-write"),
    ("node: no tenant", "node/node-agent.yaml", lambda d: _node_env(d, "AZURE_TENANT_ID", None),
     "AZURE_TENANT_ID is not set"),
    ("node: tenant not a GUID", "node/node-agent.yaml", lambda d: _node_env(d, "AZURE_TENANT_ID", "contoso"),
     "AZURE_TENANT_ID 'contoso' is not a GUID"),
    ("node: passthrough not a choice", "node/node-agent.yaml",
     lambda d: _node_env(d, "AZWI_NODE_PASSTHROUGH", "some"), "AZWI_NODE_PASSTHROUGH 'some'"),
    ("node: http authority", "node/node-agent.yaml",
     lambda d: _node_env(d, "AZURE_AUTHORITY_HOST", "http://login.example/"), "is not an https URL"),
    ("node: privileged", "node/node-agent.yaml",
     lambda d: _node_container(d)["securityContext"].update({"privileged": True}), "must not be privileged"),
    ("node: NET_ADMIN too", "node/node-agent.yaml",
     lambda d: _node_container(d)["securityContext"]["capabilities"]["add"].append("NET_ADMIN"),
     "capability NET_ADMIN is more than"),
    ("node: no SYS_ADMIN", "node/node-agent.yaml",
     lambda d: _node_container(d)["securityContext"]["capabilities"].update({"add": ["DAC_READ_SEARCH"]}),
     "capabilities.add needs SYS_ADMIN"),
    ("node: writable root", "node/node-agent.yaml",
     lambda d: _node_container(d)["securityContext"].update({"readOnlyRootFilesystem": False}),
     "readOnlyRootFilesystem must be true"),
    ("node: another command line", "node/node-agent.yaml",
     lambda d: _node_container(d).update({"command": ["azwi-netproxy-node", "--passthrough=all"]}),
     "command must be ['azwi-netproxy-node']"),
    ("node: a flag it does not have", "node/node-agent.yaml",
     lambda d: _node_container(d).update({"args": ["--proxy-port=8000"]}), "only --metrics-port=N"),
    ("node: no readiness", "node/node-agent.yaml", lambda d: _node_container(d).pop("readinessProbe"),
     "readinessProbe must exec ['azwi-netproxy-node', '--check']"),
    ("node: no agent", "node/node-agent.yaml", lambda d: _spec(d)["containers"].pop(0),
     "runs without the CNI agent"),
    ("pod: node-proxy not true", "node/pod.yaml", lambda d: _node_pod_meta(d).update({NODE_PROXY_ANNOTATION: "yes"}),
     'only "true" asks for node mode'),
    ("pod: client id not a GUID", "node/pod.yaml",
     lambda d: _node_pod_meta(d).update({"azwi-netproxy.io/client-id": "reports"}), "is not a GUID"),
    ("pod: map not JSON", "node/pod.yaml",
     lambda d: _node_pod_meta(d).update({"azwi-netproxy.io/identity-map": "onlyListed: true"}), "is not JSON"),
    ("pod: default not in the map", "node/pod.yaml",
     lambda d: _node_pod_meta(d).update({"azwi-netproxy.io/client-id": "99999999-9999-9999-9999-999999999999"}),
     "the default identity would be refused"),
    ("pod: CNI redirect too", "node/pod.yaml", lambda d: _node_pod_meta(d).update({REDIRECT_ANNOTATION: "true"}),
     "exempt the proxy's uid"),
    ("pod: pass-through asked", "node/pod.yaml",
     lambda d: _node_pod_meta(d).update({"azwi-netproxy.io/passthrough": "all"}), "gets no pass-through"),
    ("pod: inject too", "node/pod.yaml", lambda d: _node_pod_meta(d).update({INJECT_ANNOTATION: "true"}),
     "a node-mode pod runs no"),
    ("pod: NET_ADMIN left", "node/pod.yaml",
     lambda d: _spec(d)["containers"][0]["securityContext"]["capabilities"].update({"add": ["NET_ADMIN"]}),
     "node mode needs no capability"),
    ("pod: not restricted", "node/pod.yaml",
     lambda d: _spec(d)["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
     "Pod Security restricted: containers reports: allowPrivilegeEscalation"),
    ("pod: hostNetwork", "node/pod.yaml", lambda d: _spec(d).update({"hostNetwork": True}), "node mode cannot serve it"),
]


@pytest.mark.parametrize(("name", "mutate", "expected"), [(n, m, e) for _, n, m, e in NODE_MUTATIONS],
                         ids=[i for i, _, _, _ in NODE_MUTATIONS])
def test_validator_reports_the_node_mode_mistake(name: str, mutate: Callable[[list[dict[str, Any]]], None],
                                                 expected: str) -> None:
    docs = copy.deepcopy(docs_of(name))
    assert validate_manifest_docs(docs, settings=OUR_IMAGES, run_init=False) == []
    mutate(docs)
    problems = validate_manifest_docs(docs, settings=OUR_IMAGES, run_init=False)
    assert any(expected in p for p in problems), problems
