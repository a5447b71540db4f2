"""Check Kubernetes manifests that run azwi-netproxy, as the cluster and our programs would see them.

Owns: loading YAML documents; simulating what upstream's workload identity webhook
(pkg/webhook/webhook.go) does to a pod (env, token volume, and, with the
`inject-proxy-sidecar` annotation, the `azwi-proxy-init` and `azwi-proxy` containers, in
its native-sidecar and classic forms); and `validate_manifest_docs`, which returns every
problem found: structure, security contexts, container order, port and uid agreement
between the init and the proxy, and whether our own programs accept the containers' args
and environment (the init runs `--dry-run` as a subprocess, the proxy's flags and env go
through `cli.proxy_parser` and `proxy.config.load`, identity maps through the ConfigMap
they are mounted from). CNI mode too: pods annotated `azwi-netproxy.io/redirect: "true"` get
their rules from the chained plugin (no init container, and the proxy must be up before any
other container of the pod talks to IMDS), and the node agent's DaemonSet container is checked
against what it must see of the host (its `--check` runs once `azwi_netproxy.cni` exists). And
`pod_security_violations`, a judge of the Pod Security Standards' baseline and restricted levels
written from their published rules. Node mode too: pods annotated `azwi-netproxy.io/node-proxy:
"true"` carry well-formed annotations for the node's process (client and tenant GUIDs, a port,
an identity map our parser accepts, with the default in it) and nothing of the other modes (no
sidecar, no init container, no capability, no redirect or inject annotation), and meet the Pod
Security level asked for; and the node process's container of the node DaemonSet is checked
against what it must see of the host (the kubelet's pods directory and the runtime's netns
directory read-only with HostToContainer propagation, the agent's run directory, its tenant,
SYS_ADMIN and DAC_READ_SEARCH and no other capability, its readiness check).

Used by tests/test_deploy.py for deploy/ and by the migration tool's tests for what it
writes. Must not know: which files a caller loads or what a particular manifest is for
(a caller adds its own checks on top).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import io
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple

import yaml

from azwi_netproxy import cli
from azwi_netproxy.errors import ConfigError
from azwi_netproxy.identitymap import parse_identity_map
from azwi_netproxy.init import config as init_config
from azwi_netproxy.proxy import config as proxy_config
from azwi_netproxy.proxy import files as proxy_files
from azwi_netproxy.settings import parse_log_level

# ---- upstream's names (pkg/webhook/consts.go) ----
USE_LABEL: Final = "azure.workload.identity/use"
CLIENT_ID_ANNOTATION: Final = "azure.workload.identity/client-id"
TENANT_ID_ANNOTATION: Final = "azure.workload.identity/tenant-id"
INJECT_ANNOTATION: Final = "azure.workload.identity/inject-proxy-sidecar"
PORT_ANNOTATION: Final = "azure.workload.identity/proxy-sidecar-port"
SKIP_CONTAINERS_ANNOTATION: Final = "azure.workload.identity/skip-containers"
IDENTITY_BINDING_ANNOTATION: Final = "azure.workload.identity/use-identity-binding"
INIT_NAME: Final = "azwi-proxy-init"
PROXY_NAME: Final = "azwi-proxy"
TOKEN_VOLUME: Final = "azure-identity-token"
TOKEN_MOUNT_PATH: Final = "/var/run/secrets/azure/tokens"
TOKEN_FILE: Final = f"{TOKEN_MOUNT_PATH}/{TOKEN_VOLUME}"
AUDIENCE: Final = "api://AzureADTokenExchange"
DEFAULT_PORT: Final = 8000
IMAGE_UID: Final = 1501  # USER of our proxy image (and of upstream's)

# ---- node mode (CONTRACT.md, "Node mode"; issue 26) ----
# Spelled here, not imported from azwi_netproxy.settings: a judge with its own spelling
# catches a typo in the product's constants.
NODE_PROXY_ANNOTATION: Final = "azwi-netproxy.io/node-proxy"
NODE_CLIENT_ID_ANNOTATION: Final = "azwi-netproxy.io/client-id"
NODE_TENANT_ID_ANNOTATION: Final = "azwi-netproxy.io/tenant-id"
NODE_IDENTITY_MAP_ANNOTATION: Final = "azwi-netproxy.io/identity-map"
PASSTHROUGH_ANNOTATION: Final = "azwi-netproxy.io/passthrough"
# What our other modes give a pod and node mode makes needless: a leftover is a mistake.
SIDECAR_CAPABILITIES: Final = frozenset({"NET_ADMIN", "NET_RAW", "SYS_ADMIN"})
# The node process (the node-proxy container of deploy/node/node-agent.yaml).
NODE_COMMAND: Final = "azwi-netproxy-node"
NODE_ENV: Final = ("AZURE_TENANT_ID", "AZURE_AUTHORITY_HOST", "AZWI_KUBELET_PODS_DIR", "AZWI_CNI_RUN_DIR",
                   "AZWI_NODE_PASSTHROUGH", "LOG_LEVEL")
# setns(2) into pods' network namespaces; reading tokens the kubelet gave a pod's uid, mode 0600.
NODE_CAPABILITIES: Final = frozenset({"SYS_ADMIN", "DAC_READ_SEARCH"})
NETNS_DIR: Final = "/var/run/netns"

# ---- CNI mode (CONTRACT.md, `azwi-netproxy-cni`; issue 19) ----
REDIRECT_ANNOTATION: Final = "azwi-netproxy.io/redirect"
CNI_PORT_ANNOTATION: Final = "azwi-netproxy.io/proxy-port"
# The plugin's default proxyUID: a node whose conflist sets another one is not visible here.
CNI_PROXY_UID: Final = 1501
CNI_AGENT_COMMAND: Final = "azwi-netproxy-cni-agent"
CNI_MODULE: Final = "azwi_netproxy.cni"
# The agent's environment: (container-side directory it writes, or the host's view of one).
CNI_AGENT_DIRS: Final = ("AZWI_CNI_BIN_DIR", "AZWI_CNI_CONF_DIR", "AZWI_CNI_RUN_DIR")
CNI_AGENT_ENV: Final = (*CNI_AGENT_DIRS, "AZWI_CNI_UNINSTALL", "AZWI_CNI_PLUGIN_CONFIG", "LOG_LEVEL")

GUID: Final = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
KNOWN_KINDS: Final = {
    "ServiceAccount": "v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "Pod": "v1",
    "Namespace": "v1",
    "Service": "v1",
    "Deployment": "apps/v1",
    "StatefulSet": "apps/v1",
    "DaemonSet": "apps/v1",
    "ReplicaSet": "apps/v1",
    "Job": "batch/v1",
    "CronJob": "batch/v1",
}


@dataclass(frozen=True)
class WebhookSettings:
    """What the simulated webhook injects; images and tenant are the cluster's settings."""

    tenant_id: str = "00000000-0000-0000-0000-0000000000aa"
    authority_host: str = "https://login.microsoftonline.com/"
    proxy_image: str = "mcr.microsoft.com/oss/azure/workload-identity/proxy:v1.5.1"
    proxy_init_image: str = "mcr.microsoft.com/oss/azure/workload-identity/proxy-init:v1.5.1"
    log_level: str = "info"
    # AKS injects these for identity binding; the values only need the right shape here.
    binding_env: Mapping[str, str] = field(default_factory=lambda: {
        "AZURE_KUBERNETES_TOKEN_PROXY": "https://kubernetes.default.svc",
        "AZURE_KUBERNETES_SNI_NAME": "ib.aks.example",
        "AZURE_KUBERNETES_CA_FILE": f"{TOKEN_MOUNT_PATH}/ca.crt",
    })


def load_documents(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every non-empty YAML document of the files, each tagged with `_source` (file:index)."""
    docs: list[dict[str, Any]] = []
    for path in paths:
        for index, doc in enumerate(yaml.safe_load_all(path.read_text("utf-8"))):
            if doc is None:
                continue
            if not isinstance(doc, dict):
                raise ValueError(f"{path}: document {index} is not a mapping")
            docs.append({**doc, "_source": f"{path.name}#{index}"})
    return docs


def where(doc: Mapping[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    return f"{doc.get('_source', '?')} {doc.get('kind', '?')}/{meta.get('name', '?')}"


def pod_template(doc: Mapping[str, Any]) -> dict[str, Any] | None:
    """The pod template (metadata + spec) of a workload, or None for other kinds."""
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind == "Pod":
        return {"metadata": doc.get("metadata") or {}, "spec": spec}
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        template = spec.get("template")
        return template if isinstance(template, dict) else None
    if kind == "CronJob":
        template = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template")
        return template if isinstance(template, dict) else None
    return None


def namespace_of(doc: Mapping[str, Any]) -> str:
    return str((doc.get("metadata") or {}).get("namespace") or "default")


# ---- the webhook, as upstream's pkg/webhook/webhook.go mutates a pod ----


def _has(containers: list[dict[str, Any]], name: str) -> bool:
    return any(c.get("name") == name for c in containers)


def simulate_webhook(
    template: Mapping[str, Any],
    service_account: Mapping[str, Any] | None,
    settings: WebhookSettings,
    *,
    native_sidecar: bool,
) -> dict[str, Any]:
    """The pod template after upstream's webhook (it only sees pods labelled `use: "true"`).

    `native_sidecar` is the webhook's choice on Kubernetes >= 1.32: the sidecar goes to the
    front of the init containers with restartPolicy Always; before, to the front of the
    containers. Its init container is appended after the pod's own. Env and the token mount
    go to every container, never overriding what a container already sets.
    """
    pod = copy.deepcopy(dict(template))
    meta = pod.setdefault("metadata", {}) or {}
    labels = meta.get("labels") or {}
    if str(labels.get(USE_LABEL)) != "true":
        return pod
    annotations = meta.get("annotations") or {}
    spec = pod.setdefault("spec", {})
    inits: list[dict[str, Any]] = list(spec.get("initContainers") or [])
    containers: list[dict[str, Any]] = list(spec.get("containers") or [])
    if INJECT_ANNOTATION in annotations:
        port = int(str(annotations.get(PORT_ANNOTATION, DEFAULT_PORT)), 10)
        if not _has(inits, INIT_NAME):
            inits.append({
                "name": INIT_NAME,
                "image": settings.proxy_init_image,
                "imagePullPolicy": "IfNotPresent",
                "securityContext": {
                    "capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]},
                    "privileged": True,
                    "runAsNonRoot": False,
                    "runAsUser": 0,
                },
                "env": [{"name": "PROXY_PORT", "value": str(port)}],
            })
        sidecar: dict[str, Any] = {
            "name": PROXY_NAME,
            "image": settings.proxy_image,
            "imagePullPolicy": "IfNotPresent",
            "args": [f"--proxy-port={port}", f"--log-level={settings.log_level}"],
            "ports": [{"containerPort": port}],
            "lifecycle": {"postStart": {"exec": {"command": [
                "/proxy", f"--proxy-port={port}", "--probe", f"--log-level={settings.log_level}",
            ]}}},
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
                "privileged": False,
                "readOnlyRootFilesystem": True,
                "runAsNonRoot": True,
            },
        }
        if native_sidecar:
            if not _has(inits, PROXY_NAME):
                inits.insert(0, {**sidecar, "restartPolicy": "Always"})
        elif not _has(containers, PROXY_NAME):
            containers.insert(0, sidecar)

    sa_annotations = (service_account or {}).get("metadata", {}).get("annotations") or {}
    client_id = str(sa_annotations.get(CLIENT_ID_ANNOTATION, ""))
    tenant_id = str(sa_annotations.get(TENANT_ID_ANNOTATION, settings.tenant_id))
    desired = [
        ("AZURE_CLIENT_ID", client_id),
        ("AZURE_TENANT_ID", tenant_id),
        ("AZURE_FEDERATED_TOKEN_FILE", TOKEN_FILE),
        ("AZURE_AUTHORITY_HOST", settings.authority_host),
    ]
    if str(annotations.get(IDENTITY_BINDING_ANNOTATION)) == "true":
        desired += list(settings.binding_env.items())
    skip = {s.strip() for s in str(annotations.get(SKIP_CONTAINERS_ANNOTATION, "")).split(";") if s.strip()}
    for container in [*inits, *containers]:
        if container.get("name") in skip:
            continue
        env = list(container.get("env") or [])
        present = {e.get("name") for e in env}
        env += [{"name": n, "value": v} for n, v in desired if n not in present and v]
        container["env"] = env
        mounts = list(container.get("volumeMounts") or [])
        if not any(m.get("name") == TOKEN_VOLUME for m in mounts):
            mounts.append({"name": TOKEN_VOLUME, "mountPath": TOKEN_MOUNT_PATH, "readOnly": True})
        container["volumeMounts"] = mounts
    volumes = list(spec.get("volumes") or [])
    has_token = any(
        (src.get("serviceAccountToken") or {}).get("path") == TOKEN_VOLUME
        for v in volumes for src in ((v.get("projected") or {}).get("sources") or [])
    )
    if not has_token:
        volumes.append({"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
            "path": TOKEN_VOLUME, "expirationSeconds": 3600, "audience": AUDIENCE}}]}})
    spec["initContainers"], spec["containers"], spec["volumes"] = inits, containers, volumes
    return pod


# ---- validation ----


def image_repository(image: str) -> str:
    """`registry/path/name` of an image reference, without tag or digest."""
    name = image.split("@", maxsplit=1)[0]
    head, _, last = name.rpartition("/")
    last = last.split(":", maxsplit=1)[0]
    return f"{head}/{last}" if head else last


def image_tag(image: str) -> str | None:
    last = image.split("@", maxsplit=1)[0].rpartition("/")[2]
    return last.split(":", maxsplit=1)[1] if ":" in last else None


def role(container: Mapping[str, Any]) -> str | None:
    """'init', 'proxy', 'cni-agent' or 'node-proxy' for our containers (by upstream's names,
    command or image), else None.

    By image only under our or upstream's repository path: other meshes ship a `proxy-init` too.
    The CNI node agent runs from the proxy-init image and the node process from the proxy
    image: each is told apart by its command.
    """
    name = container.get("name")
    command = container.get("command") or []
    if command and posixpath.basename(str(command[0])) == CNI_AGENT_COMMAND:
        return "cni-agent"
    if command and posixpath.basename(str(command[0])) == NODE_COMMAND:
        return "node-proxy"
    repository = image_repository(str(container.get("image", "")))
    ours = "azwi-netproxy" in repository or "workload-identity" in repository
    if name == INIT_NAME or (ours and repository.endswith("/proxy-init")):
        return "init"
    if name == PROXY_NAME or (ours and repository.endswith("/proxy")):
        return "proxy"
    return None


class _Docs:
    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self.docs = docs
        self.by_kind: dict[tuple[str, str, str], dict[str, Any]] = {}
        for doc in docs:
            meta = doc.get("metadata") or {}
            if isinstance(meta, dict) and meta.get("name"):
                self.by_kind[(str(doc.get("kind")), namespace_of(doc), str(meta["name"]))] = doc

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.by_kind.get((kind, namespace, name))


@dataclass
class _Pod:
    label: str
    namespace: str
    spec: dict[str, Any]
    docs: _Docs
    problems: list[str]
    annotations: Mapping[str, Any] = field(default_factory=dict)
    # The Pod Security level a node-mode pod must meet (None: not judged; see validate_manifest_docs).
    node_pod_security: PodSecurityLevel | None = "restricted"

    def problem(self, text: str) -> None:
        self.problems.append(f"{self.label}: {text}")

    def containers(self) -> Iterator[tuple[str, int, dict[str, Any]]]:
        for section in ("initContainers", "containers"):
            for index, container in enumerate(self.spec.get(section) or []):
                yield section, index, container

    def env_of(self, container: Mapping[str, Any]) -> dict[str, str]:
        """The container's environment, with ConfigMap references resolved from the documents."""
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            ref = source.get("configMapRef")
            if ref:
                cm = self.docs.get("ConfigMap", self.namespace, str(ref.get("name")))
                if cm is None:
                    if not ref.get("optional"):
                        self.problem(f"{container.get('name')}: envFrom ConfigMap {ref.get('name')} is not defined")
                    continue
                prefix = str(source.get("prefix", ""))
                env.update({prefix + str(k): str(v) for k, v in (cm.get("data") or {}).items()})
        for item in container.get("env") or []:
            name = str(item.get("name"))
            if "value" in item:
                env[name] = str(item.get("value") if item.get("value") is not None else "")
                continue
            ref = (item.get("valueFrom") or {}).get("configMapKeyRef")
            if ref:
                cm = self.docs.get("ConfigMap", self.namespace, str(ref.get("name")))
                data = (cm or {}).get("data") or {}
                if str(ref.get("key")) in data:
                    env[name] = str(data[str(ref.get("key"))])
                elif not ref.get("optional"):
                    self.problem(f"{container.get('name')}: env {name} refers to a missing ConfigMap key")
            else:
                env[name] = f"<{name} from the cluster>"
        return env

    def volume(self, name: str) -> dict[str, Any] | None:
        for volume in self.spec.get("volumes") or []:
            if volume.get("name") == name:
                return dict(volume)
        return None

    def mounted_file(self, container: Mapping[str, Any], path: str) -> tuple[dict[str, Any], str] | None:
        """(volume, path inside it) that holds `path` in this container, longest mount first."""
        mounts = sorted(container.get("volumeMounts") or [], key=lambda m: -len(str(m.get("mountPath", ""))))
        for mount in mounts:
            base = str(mount.get("mountPath", "")).rstrip("/")
            if path.startswith(base + "/"):
                volume = self.volume(str(mount.get("name")))
                if volume is None:
                    return None
                inner = path[len(base) + 1:]
                if mount.get("subPath"):
                    inner = posixpath.join(str(mount["subPath"]), inner)
                return volume, inner
        return None

    def read_file(self, container: Mapping[str, Any], path: str) -> str:
        """The text a container would read at `path`, from a ConfigMap volume in the documents."""
        found = self.mounted_file(container, path)
        if found is None:
            raise FileNotFoundError(2, "No such file or directory (no volume mounted there)", path)
        volume, inner = found
        ref = volume.get("configMap")
        if not ref:
            raise FileNotFoundError(2, f"volume {volume.get('name')} is not a ConfigMap in these manifests", path)
        cm = self.docs.get("ConfigMap", self.namespace, str(ref.get("name")))
        if cm is None:
            raise FileNotFoundError(2, f"ConfigMap {ref.get('name')} is not defined", path)
        key = inner
        for item in ref.get("items") or []:
            if item.get("path") == inner:
                key = str(item.get("key"))
        data = cm.get("data") or {}
        if key not in data:
            raise FileNotFoundError(2, f"ConfigMap {ref.get('name')} has no key {key}", path)
        return str(data[key])


def _strings_only(mapping: Any, what: str, problems: list[str]) -> None:
    if mapping is None:
        return
    if not isinstance(mapping, dict):
        problems.append(f"{what} must be a mapping")
        return
    for key, value in mapping.items():
        if not isinstance(key, str) or not isinstance(value, str):
            problems.append(f"{what}: {key!r}: {value!r} must be a string (quote it)")


def _caps(container: Mapping[str, Any], which: str) -> set[str]:
    caps = ((container.get("securityContext") or {}).get("capabilities") or {}).get(which) or []
    return {str(c).upper().removeprefix("CAP_") for c in caps}


def _parse_proxy_argv(argv: list[str]) -> tuple[dict[str, Any] | None, str]:
    """Our proxy's flags, parsed as the program parses them: (flags, '') or (None, error line)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            args = cli.proxy_parser().parse_args(argv)
    except SystemExit:
        return None, stderr.getvalue().strip() or "rejected"
    return vars(args), ""


def _exec_commands(container: Mapping[str, Any]) -> Iterator[tuple[str, list[str] | None, bool]]:
    """(what, exec command or None for an httpGet/tcpSocket handler, is a probe) of hooks and probes."""
    post_start = ((container.get("lifecycle") or {}).get("postStart")) or None
    if post_start:
        yield "lifecycle.postStart", (post_start.get("exec") or {}).get("command"), False
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        handler = container.get(probe)
        if handler:
            yield probe, (handler.get("exec") or {}).get("command"), True


class InitRunner:
    """Runs `azwi-netproxy-init --dry-run` once per distinct (args, env); `results` keeps what it saw."""

    def __init__(self) -> None:
        self.results: dict[tuple[tuple[str, ...], tuple[tuple[str, str], ...]], subprocess.CompletedProcess[str]] = {}

    def dry_run(self, args: list[str], env: Mapping[str, str]) -> tuple[int, str]:
        key = (tuple(args), tuple(sorted(env.items())))
        if key not in self.results:
            run_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", **env}
            self.results[key] = subprocess.run(
                [sys.executable, "-m", "azwi_netproxy.init", "--dry-run", *args],
                capture_output=True, text=True, env=run_env, timeout=60, check=False, cwd="/",
            )
        done = self.results[key]
        return done.returncode, (done.stderr or done.stdout).strip()[-500:]


def _check_init(pod: _Pod, index: int, container: dict[str, Any], runner: InitRunner | None) -> init_config.InitConfig | None:
    name = container.get("name")
    inits = pod.spec.get("initContainers") or []
    for earlier in inits[:index]:
        if role(earlier) is None:
            pod.problem(f"init container {earlier.get('name')} runs before {name}, without the redirect; "
                        f"put {name} first")
    if container.get("restartPolicy"):
        pod.problem(f"{name}: an init container that installs rules must not have a restartPolicy")
    if container.get("command") not in (None, ["/init/azwi-netproxy-init"], ["azwi-netproxy-init"]):
        pod.problem(f"{name}: command {container.get('command')} replaces the image's entrypoint")
    sc = container.get("securityContext") or {}
    if sc.get("runAsUser") != 0:
        pod.problem(f"{name}: securityContext.runAsUser must be 0 (it installs NAT rules)")
    if sc.get("runAsNonRoot") is True:
        pod.problem(f"{name}: runAsNonRoot true cannot start a root init container")
    added = _caps(container, "add")
    if "NET_ADMIN" not in added:
        pod.problem(f"{name}: capabilities.add needs NET_ADMIN")
    if "NET_RAW" not in added and sc.get("privileged") is not True:
        pod.problem(f"{name}: capabilities.add needs NET_RAW too (the iptables backend opens a raw socket)")
    if "ALL" not in _caps(container, "drop"):
        pod.problem(f"{name}: capabilities.drop should be [ALL]")
    env = pod.env_of(container)
    args = [str(a) for a in container.get("args") or []]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            flags = vars(cli.init_parser().parse_args(args))
    except SystemExit:
        pod.problem(f"{name}: args {args} rejected: {stderr.getvalue().strip()}")
        return None
    try:
        cfg = init_config.load(flags, env)
    except ConfigError as exc:
        pod.problem(f"{name}: azwi-netproxy-init rejects its environment: {exc}")
        return None
    if runner is not None:
        code, output = runner.dry_run(args, env)
        if code != 0:
            pod.problem(f"{name}: azwi-netproxy-init --dry-run exited {code}: {output}")
    return cfg


def _check_proxy(
    pod: _Pod,
    section: str,
    index: int,
    container: dict[str, Any],
    *,
    redirected: bool,
    redirect: _Redirect | None,
) -> None:
    name = container.get("name")
    if section == "initContainers":
        if container.get("restartPolicy") != "Always":
            pod.problem(f"{name}: as an init container the proxy needs restartPolicy: Always (native sidecar), "
                        "or the pod never starts")
        waits = {what for what, _, _ in _exec_commands(container)} & {"startupProbe", "lifecycle.postStart"}
        if not waits:
            pod.problem(f"{name}: a native sidecar needs a startupProbe or postStart probe, or the next "
                        "container starts before the proxy listens")
    else:
        if container.get("restartPolicy"):
            pod.problem(f"{name}: restartPolicy belongs to native sidecars in initContainers only")
        if index != 0 or not any(what == "lifecycle.postStart" for what, _, _ in _exec_commands(container)):
            pod.problem(f"{name}: a classic sidecar goes first among the containers with the postStart "
                        "probe, so the apps start after the proxy listens")
    if container.get("command") not in (None, ["/proxy"], ["azwi-netproxy"]):
        pod.problem(f"{name}: command {container.get('command')} replaces the image's entrypoint")

    pod_sc = pod.spec.get("securityContext") or {}
    sc = container.get("securityContext") or {}
    for key, want in (("runAsNonRoot", True), ("readOnlyRootFilesystem", True), ("allowPrivilegeEscalation", False)):
        if sc.get(key, pod_sc.get(key) if key == "runAsNonRoot" else None) is not want:
            pod.problem(f"{name}: securityContext.{key} must be {str(want).lower()}")
    if sc.get("privileged") is True or _caps(container, "add"):
        pod.problem(f"{name}: the proxy needs no privilege and no capabilities")
    if "ALL" not in _caps(container, "drop"):
        pod.problem(f"{name}: capabilities.drop should be [ALL]")
    uid = sc.get("runAsUser", pod_sc.get("runAsUser", IMAGE_UID))
    if redirect is not None and redirect.passthrough == "all" and uid != redirect.proxy_uid:
        pod.problem(f"{name}: runs as uid {uid} but {redirect.by} exempts PROXY_UID {redirect.proxy_uid}: "
                    "its own IMDS pass-through would loop back to itself")

    args = [str(a) for a in container.get("args") or []]
    flags, error = _parse_proxy_argv(args)
    if flags is None:
        pod.problem(f"{name}: args {args} rejected: {error}")
        return
    env = pod.env_of(container)
    if flags.get("probe"):
        pod.problem(f"{name}: --probe in the container's args makes it exit instead of serving")
    try:
        # As cli.py does, with the files read from what is mounted in the container.
        cfg = proxy_files.with_files(proxy_config.load(flags, env), lambda path: pod.read_file(container, path))
    except ConfigError as exc:
        pod.problem(f"{name}: azwi-netproxy rejects its environment: {exc}")
        return
    if redirect is not None and cfg.proxy_port != redirect.proxy_port:
        pod.problem(f"{name}: listens on {cfg.proxy_port} but {redirect.by} redirects to {redirect.proxy_port}")
    if redirect is not None and cfg.passthrough != redirect.passthrough:
        if redirect.passthrough == "none":
            pod.problem(f"{name}: passes other IMDS paths through, but {redirect.by} exempts no uid: its "
                        "requests come back to itself. Set AZWI_PASSTHROUGH=none on it too")
        else:
            pod.problem(f"{name}: never passes through (AZWI_PASSTHROUGH=none), but {redirect.by} still exempts "
                        f"uid {redirect.proxy_uid}, a door to the node's IMDS for any root container of the pod. "
                        "Set none for the rules too")

    token = cfg.federated_token_file
    found = pod.mounted_file(container, token)
    sources = ((found[0].get("projected") or {}).get("sources") or []) if found else []
    projected = [s["serviceAccountToken"] for s in sources if s.get("serviceAccountToken")]
    if not found or not any(p.get("path") == found[1] for p in projected):
        pod.problem(f"{name}: AZURE_FEDERATED_TOKEN_FILE {token} is not a projected service account token "
                    "mounted in this container")
    elif not any(p.get("audience") == AUDIENCE for p in projected if p.get("path") == found[1]):
        pod.problem(f"{name}: the projected token's audience must be {AUDIENCE}")

    for what, command, _ in _exec_commands(container):
        if command is None:
            pod.problem(f"{name}: {what} must exec `/proxy --probe`: the proxy listens on 127.0.0.1 only, "
                        "where the kubelet's httpGet/tcpSocket cannot reach it")
            continue
        if not command or command[0] != "/proxy":
            pod.problem(f"{name}: {what} runs {command}; use ['/proxy', '--proxy-port=N', '--probe']")
            continue
        hook_flags, error = _parse_proxy_argv([str(c) for c in command[1:]])
        if hook_flags is None:
            pod.problem(f"{name}: {what} {command} rejected: {error}")
            continue
        try:
            hook_cfg = proxy_config.load(hook_flags, {})
        except ConfigError as exc:
            pod.problem(f"{name}: {what} {command} rejected: {exc}")
            continue
        if not hook_cfg.probe or hook_cfg.proxy_port != cfg.proxy_port:
            pod.problem(f"{name}: {what} must be `/proxy --proxy-port={cfg.proxy_port} --probe`")

    if not redirected:
        # Without the redirect only clients that honour AZURE_POD_IDENTITY_AUTHORITY_HOST find the
        # proxy. Init containers are left alone: a classic sidecar is not running yet for them.
        hosts = {f"http://127.0.0.1:{cfg.proxy_port}", f"http://localhost:{cfg.proxy_port}"}
        for other_section, _, other in pod.containers():
            if role(other) is not None or other_section == "initContainers":
                continue
            value = pod.env_of(other).get("AZURE_POD_IDENTITY_AUTHORITY_HOST", "").rstrip("/")
            if value not in hosts:
                pod.problem(f"{other.get('name')}: without the init's redirect it needs "
                            f"AZURE_POD_IDENTITY_AUTHORITY_HOST=http://127.0.0.1:{cfg.proxy_port}")


class CniAgentRunner:
    """Runs the node agent's `--check` with a container's environment, its directories re-rooted.

    The agent itself is issue 19's other half: until `azwi_netproxy.cni` exists in this
    checkout, `skip_reason()` says so, nothing runs, and `skipped` lists the containers whose
    run was skipped (callers skip with that reason; the static checks run regardless). Once
    it exists, the agent's own console script must be installed and accept the environment:
    `--check` in a scratch tree where nothing is installed yet may fail (exit 1: not ready),
    but a usage or configuration error (exit 2, this project's code for both) or a traceback
    is a problem. The host's real CNI directories are never touched.
    """

    def __init__(self) -> None:
        self.results: dict[tuple[tuple[str, ...], tuple[tuple[str, str], ...]], tuple[int, str]] = {}
        self.skipped: list[str] = []

    @staticmethod
    def skip_reason() -> str | None:
        if importlib.util.find_spec(CNI_MODULE) is None:
            return (f"{CNI_MODULE} is not in this checkout yet (issue 19): the node agent's own check of "
                    f"its environment cannot run")
        return None

    @staticmethod
    def script() -> str | None:
        return shutil.which(CNI_AGENT_COMMAND, path=str(Path(sys.executable).parent)) or shutil.which(CNI_AGENT_COMMAND)

    def check(self, label: str, args: list[str], env: Mapping[str, str]) -> tuple[int, str] | None:
        """(exit code, output tail) of `azwi-netproxy-cni-agent ARGS --check`, or None when skipped."""
        if self.skip_reason() is not None:
            self.skipped.append(label)
            return None
        key = (tuple(args), tuple(sorted(env.items())))
        if key in self.results:
            return self.results[key]
        script = self.script()
        if script is None:
            self.results[key] = (127, f"{CNI_MODULE} exists but its console script {CNI_AGENT_COMMAND} is not installed")
            return self.results[key]
        with tempfile.TemporaryDirectory(prefix="azwi-cni-agent-") as root:
            run_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", **env}
            for name in CNI_AGENT_DIRS:
                if name in env and env[name].startswith("/"):
                    run_env[name] = root + env[name]
                    Path(run_env[name]).mkdir(parents=True, exist_ok=True)
            done = subprocess.run([script, *args, "--check"], capture_output=True, text=True, env=run_env,
                                  timeout=60, check=False, cwd=root)
        self.results[key] = (done.returncode, (done.stderr or done.stdout).strip()[-500:])
        return self.results[key]


def _host_path(pod: _Pod, container: Mapping[str, Any], path: str) -> tuple[str, bool] | None:
    """(the host's path, mounted read-only) for a container path on a hostPath volume, else None."""
    mounts = sorted(container.get("volumeMounts") or [], key=lambda m: -len(str(m.get("mountPath", ""))))
    for mount in mounts:
        base = str(mount.get("mountPath", "")).rstrip("/")
        if path == base or path.startswith(base + "/"):
            volume = pod.volume(str(mount.get("name"))) or {}
            host = (volume.get("hostPath") or {}).get("path")
            if not host:
                return None
            return posixpath.join(str(host), path[len(base):].lstrip("/")).rstrip("/") or "/", bool(mount.get("readOnly"))
    return None


def _check_cni_agent(pod: _Pod, container: dict[str, Any], runner: CniAgentRunner | None) -> None:
    name = container.get("name")
    if container.get("command") != [CNI_AGENT_COMMAND]:
        pod.problem(f"{name}: command must be [{CNI_AGENT_COMMAND!r}], not {container.get('command')}")
    if pod.spec.get("hostNetwork") is not True:
        pod.problem(f"{name}: needs hostNetwork: true, or its own sandbox goes through the plugin it serves")
    if pod.spec.get("hostPID") is not True:
        pod.problem(f"{name}: needs hostPID: true: the shim on the host enters the agent's mount namespace "
                    "by its host PID")
    if (container.get("securityContext") or {}).get("privileged") is not True:
        pod.problem(f"{name}: must be privileged: it writes the host's CNI directories and enters pods' "
                    "network namespaces")
    env = pod.env_of(container)
    for key in CNI_AGENT_ENV:
        if key not in env:
            pod.problem(f"{name}: {key} is not set")
    if env.get("AZWI_CNI_UNINSTALL", "false") not in ("true", "false"):
        pod.problem(f"{name}: AZWI_CNI_UNINSTALL {env['AZWI_CNI_UNINSTALL']!r} must be \"true\" or \"false\"")
    try:
        parse_log_level(env.get("LOG_LEVEL"))
    except ConfigError as exc:
        pod.problem(f"{name}: LOG_LEVEL: {exc}")
    host_views: dict[str, str] = {}
    for key in CNI_AGENT_DIRS:
        value = env.get(key)
        if value is None:
            continue
        found = _host_path(pod, container, value) if value.startswith("/") else None
        if found is None:
            pod.problem(f"{name}: {key} {value} is not on a hostPath mount: the host never sees what the "
                        "agent writes there")
            continue
        host_views[key], read_only = found
        if read_only:
            pod.problem(f"{name}: {key} {value} is mounted read-only; the agent writes there")
    # The shim, on the host, reads the agent's state file at the path the agent writes it.
    run_dir = env.get("AZWI_CNI_RUN_DIR")
    if run_dir is not None and host_views.get("AZWI_CNI_RUN_DIR", run_dir) != run_dir:
        pod.problem(f"{name}: AZWI_CNI_RUN_DIR {run_dir} is seen by the host at "
                    f"{host_views['AZWI_CNI_RUN_DIR']}: the shim looks for it at {run_dir}")
    readiness = (container.get("readinessProbe") or {}).get("exec", {}).get("command")
    if readiness != [CNI_AGENT_COMMAND, "--check"]:
        pod.problem(f"{name}: readinessProbe must exec [{CNI_AGENT_COMMAND!r}, '--check'], not {readiness}")
    if runner is not None:
        result = runner.check(pod.label, [str(a) for a in container.get("args") or []], env)
        if result is not None and (result[0] in (2, 127) or "Traceback" in result[1]):
            pod.problem(f"{name}: {CNI_AGENT_COMMAND} --check exited {result[0]}: {result[1]}")


class _Redirect(NamedTuple):
    """Where the pod's IMDS traffic is sent, which uid is exempt, and who installs the rules."""

    proxy_port: int
    proxy_uid: int
    by: str
    # "none": no uid is exempted at all (CONTRACT.md, --passthrough none), so the proxy must not
    # pass anything through either.
    passthrough: str = "all"


def _port_annotation(pod: _Pod) -> int | None:
    """The proxy port the plugin and the node process use (DEFAULT_PORT when none is asked for),
    or None, the problem reported, when the annotation is no port."""
    port = pod.annotations.get(CNI_PORT_ANNOTATION, str(DEFAULT_PORT))
    if not isinstance(port, str) or not port.isdigit() or not 1 <= int(port) <= 65535:
        pod.problem(f"{CNI_PORT_ANNOTATION} {port!r} is not a port (1-65535, quoted)")
        return None
    return int(port)


def _cni_redirect(pod: _Pod) -> _Redirect | None:
    """The CNI plugin's redirect this pod asks for (CONTRACT.md), or None if its annotations are bad."""
    value = pod.annotations.get(REDIRECT_ANNOTATION)
    if value != "true":
        pod.problem(f'{REDIRECT_ANNOTATION} {value!r}: only "true" asks the plugin for the redirect')
        return None
    port = _port_annotation(pod)
    if port is None:
        return None
    passthrough = pod.annotations.get(PASSTHROUGH_ANNOTATION, "all")
    if passthrough not in ("all", "none"):
        pod.problem(f'{PASSTHROUGH_ANNOTATION} {passthrough!r}: the plugin knows "all" and "none"')
        return None
    return _Redirect(port, CNI_PROXY_UID, "the CNI plugin", str(passthrough))


def _check_cni_pod(pod: _Pod, inits: list[tuple[str, int, dict[str, Any]]],
                   proxies: list[tuple[str, int, dict[str, Any]]]) -> None:
    """What CNI mode adds: the plugin's rules exist before the first container, so the proxy must too."""
    if pod.spec.get("hostNetwork"):
        pod.problem("hostNetwork: no CNI plugin runs for a pod on the node's network; the redirect never "
                    "happens")
    for _, _, init in inits:
        pod.problem(f"{init.get('name')}: in CNI mode the plugin installs the rules; drop the init container "
                    "and the NET_ADMIN it needs")
    if not proxies:
        pod.problem(f"{REDIRECT_ANNOTATION} sends IMDS traffic to a proxy this pod does not run")
        return
    section, index, proxy = proxies[0]
    before = (pod.spec.get("initContainers") or [])[: index if section == "initContainers" else None]
    for other in before:
        if role(other) is None:
            pod.problem(f"init container {other.get('name')} runs before {proxy.get('name')} while the "
                        "plugin's redirect is already in place: its IMDS requests are refused. Make the "
                        "proxy the first init container (native sidecar)")


def _guid_annotation(pod: _Pod, key: str) -> str | None:
    value = pod.annotations.get(key)
    if value is not None and (not isinstance(value, str) or not GUID.match(value)):
        pod.problem(f"{key} {value!r} is not a GUID (the plugin fails the pod's ADD)")
        return None
    return value.lower() if isinstance(value, str) else None


def _check_node_pod(pod: _Pod, ours: list[tuple[str, int, dict[str, Any], str | None]]) -> None:
    """Node mode: annotations for the node's process, and nothing of the other modes in the pod."""
    value = pod.annotations.get(NODE_PROXY_ANNOTATION)
    if value != "true":
        pod.problem(f'{NODE_PROXY_ANNOTATION} {value!r}: only "true" asks for node mode')
    client_id = _guid_annotation(pod, NODE_CLIENT_ID_ANNOTATION)
    _guid_annotation(pod, NODE_TENANT_ID_ANNOTATION)
    _port_annotation(pod)
    text = pod.annotations.get(NODE_IDENTITY_MAP_ANNOTATION)
    if text is not None:
        try:
            document = json.loads(str(text))
        except ValueError as exc:
            pod.problem(f"{NODE_IDENTITY_MAP_ANNOTATION} is not JSON: {exc}")
            document = None
        if document is not None:
            try:
                identity_map = parse_identity_map(str(text), source=NODE_IDENTITY_MAP_ANNOTATION)
            except ConfigError as exc:
                pod.problem(f"{NODE_IDENTITY_MAP_ANNOTATION} is refused: {exc}")
            else:
                if identity_map.only_listed and client_id is not None and client_id not in identity_map.by_client_id:
                    pod.problem(f"{NODE_CLIENT_ID_ANNOTATION} {client_id} is not in the onlyListed map of "
                                f"{NODE_IDENTITY_MAP_ANNOTATION}: the default identity would be refused")
    elif client_id is None:
        pod.problem(f"neither {NODE_CLIENT_ID_ANNOTATION} nor {NODE_IDENTITY_MAP_ANNOTATION}: every request "
                    "would have to name an identity the node process knows nothing of")
    for key, why in ((REDIRECT_ANNOTATION, "asks for CNI mode's rules, which exempt the proxy's uid"),
                     (INJECT_ANNOTATION, "makes the webhook inject the sidecar pair node mode replaces")):
        if key in pod.annotations:
            pod.problem(f"{key} {why}")
    if pod.annotations.get(PASSTHROUGH_ANNOTATION, "none") != "none":
        pod.problem(f"{PASSTHROUGH_ANNOTATION} {pod.annotations[PASSTHROUGH_ANNOTATION]!r}: a node-mode pod gets "
                    "no pass-through (the node's AZWI_NODE_PASSTHROUGH decides for all); a pod that needs it "
                    "belongs in sidecar or CNI mode")
    if pod.spec.get("hostNetwork"):
        pod.problem("hostNetwork: no CNI plugin runs for a pod on the node's network; node mode cannot serve it")
    for _, _, container, what in ours:
        pod.problem(f"{container.get('name')}: a node-mode pod runs no {what} container of ours: the node "
                    "process answers its IMDS")
    for section, _, container in pod.containers():
        sc = container.get("securityContext") or {}
        needless = sorted(_caps(container, "add") & SIDECAR_CAPABILITIES)
        if needless or sc.get("privileged") is True:
            pod.problem(f"{section} {container.get('name')}: {', '.join(needless) or 'privileged'}: node "
                        "mode needs no capability in the pod")
    if pod.node_pod_security is not None:
        for violation in pod_security_violations(pod.spec, pod.node_pod_security, pod.annotations):
            pod.problem(f"Pod Security {pod.node_pod_security}: {violation}")


def _check_node_process(pod: _Pod, container: dict[str, Any]) -> None:
    """The node-proxy container: what node mode's process must see of the host, and no more."""
    name = container.get("name")
    if container.get("command") != [NODE_COMMAND]:
        pod.problem(f"{name}: command must be [{NODE_COMMAND!r}] (the proxy image's entrypoint is the sidecar)")
    if not image_repository(str(container.get("image", ""))).endswith("/azwi-netproxy/proxy"):
        pod.problem(f"{name}: image {container.get('image')} is not the proxy image")
    for arg in container.get("args") or []:
        match = re.fullmatch(r"--metrics-port=(\d+)", str(arg))
        if match is None or not 1 <= int(match.group(1)) <= 65535:
            pod.problem(f"{name}: arg {arg!r}: only --metrics-port=N is expected")
    if pod.spec.get("hostNetwork") is not True:
        pod.problem(f"{name}: the pod needs hostNetwork: true (the agent's), or its own sandbox goes through "
                    "the plugin it serves")
    sc = container.get("securityContext") or {}
    for key, want in (("runAsUser", 0), ("readOnlyRootFilesystem", True), ("allowPrivilegeEscalation", False)):
        if sc.get(key) is not want:
            pod.problem(f"{name}: securityContext.{key} must be {str(want).lower()}")
    if sc.get("privileged") is True:
        pod.problem(f"{name}: must not be privileged: {', '.join(sorted(NODE_CAPABILITIES))} are enough")
    if "ALL" not in _caps(container, "drop"):
        pod.problem(f"{name}: capabilities.drop should be [ALL]")
    added = _caps(container, "add")
    for cap in sorted(NODE_CAPABILITIES - added):
        pod.problem(f"{name}: capabilities.add needs {cap}")
    for cap in sorted(added - NODE_CAPABILITIES):
        pod.problem(f"{name}: capability {cap} is more than the node process needs")
    env = pod.env_of(container)
    for key in NODE_ENV:
        if key not in env:
            pod.problem(f"{name}: {key} is not set")
    if "AZURE_TENANT_ID" in env and not GUID.match(env["AZURE_TENANT_ID"]):
        pod.problem(f"{name}: AZURE_TENANT_ID {env['AZURE_TENANT_ID']!r} is not a GUID")
    authority = env.get("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com/")
    if not authority.startswith("https://"):
        pod.problem(f"{name}: AZURE_AUTHORITY_HOST {authority!r} is not an https URL")
    if env.get("AZWI_NODE_PASSTHROUGH", "none") not in ("none", "all"):
        pod.problem(f"{name}: AZWI_NODE_PASSTHROUGH {env['AZWI_NODE_PASSTHROUGH']!r} must be none or all")
    try:
        parse_log_level(env.get("LOG_LEVEL"))
    except ConfigError as exc:
        pod.problem(f"{name}: LOG_LEVEL: {exc}")
    mounts = {str(m.get("mountPath", "")).rstrip("/"): m for m in container.get("volumeMounts") or []}
    # (variable or directory, must be read-only, needs HostToContainer propagation)
    for what, path, read_only, propagation in (
        ("AZWI_KUBELET_PODS_DIR", env.get("AZWI_KUBELET_PODS_DIR"), True, True),
        ("AZWI_CNI_RUN_DIR", env.get("AZWI_CNI_RUN_DIR"), False, False),
        ("the netns directory", NETNS_DIR, True, True),
    ):
        if path is None:
            continue
        found = _host_path(pod, container, path)
        if found is None or found[0] != path.rstrip("/"):
            pod.problem(f"{name}: {what} {path} is not the host's {path} (a hostPath mount at the same path)")
            continue
        mount = mounts.get(path.rstrip("/"), {})
        if found[1] != read_only:
            pod.problem(f"{name}: {what} {path} must be mounted {'read-only' if read_only else 'read-write'}")
        if propagation and mount.get("mountPropagation") != "HostToContainer":
            pod.problem(f"{name}: {what} {path} needs mountPropagation: HostToContainer, or mounts the host "
                        "makes after the container started stay invisible")
    agents = [c for _, _, c in pod.containers() if role(c) == "cni-agent"]
    if not agents:
        pod.problem(f"{name}: runs without the CNI agent in its pod: nothing installs the redirect to it")
    for agent in agents:
        agent_run = pod.env_of(agent).get("AZWI_CNI_RUN_DIR")
        if agent_run is not None and agent_run != env.get("AZWI_CNI_RUN_DIR"):
            pod.problem(f"{name}: AZWI_CNI_RUN_DIR {env.get('AZWI_CNI_RUN_DIR')} is not the agent's {agent_run}: "
                        "the plugin would never find it")
    readiness = (container.get("readinessProbe") or {}).get("exec", {}).get("command")
    if readiness != [NODE_COMMAND, "--check"]:
        pod.problem(f"{name}: readinessProbe must exec [{NODE_COMMAND!r}, '--check'], not {readiness}")
    code, output = _node_check(tuple(sorted(env.items())))
    # No node process runs here, so the probe says "not ready" (1); a usage or configuration
    # error (2, this project's code for both) or anything else means the program refuses
    # the container's flags or environment.
    if code != 1 or "no node process listens" not in output:
        pod.problem(f"{name}: {NODE_COMMAND} --check with this environment exited {code}: {output}")


@functools.cache
def _node_check(env: tuple[tuple[str, str], ...]) -> tuple[int, str]:
    """(exit code, output tail) of the installed `azwi-netproxy-node --check` with `env`, its
    run dir re-rooted in a scratch dir (where no node process listens)."""
    script = shutil.which(NODE_COMMAND, path=str(Path(sys.executable).parent)) or shutil.which(NODE_COMMAND)
    if script is None:
        return 127, f"{NODE_COMMAND} is not installed"
    with tempfile.TemporaryDirectory(prefix="azwi-node-check-") as root:
        run_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", **dict(env)}
        run_env["AZWI_CNI_RUN_DIR"] = root + run_env.get("AZWI_CNI_RUN_DIR", "/var/run/azwi-netproxy")
        done = subprocess.run([script, "--check"], capture_output=True, text=True, env=run_env, timeout=60,
                              check=False, cwd=root)
    return done.returncode, (done.stderr + done.stdout).strip()[-500:]


def _check_pod(pod: _Pod, runner: InitRunner | None, agent_runner: CniAgentRunner | None = None) -> None:
    for _, _, container in pod.containers():
        if role(container) == "cni-agent":
            _check_cni_agent(pod, container, agent_runner)
        if role(container) == "node-proxy":
            _check_node_process(pod, container)
    ours = [(section, index, c, r) for section, index, c in pod.containers() if (r := role(c)) in ("init", "proxy")]
    if NODE_PROXY_ANNOTATION in pod.annotations:
        _check_node_pod(pod, ours)
        return
    names = [c.get("name") for _, _, c in pod.containers()]
    for name in {n for n in names if names.count(n) > 1}:
        pod.problem(f"container name {name} is used twice")
    inits = [(s, i, c) for s, i, c, r in ours if r == "init"]
    proxies = [(s, i, c) for s, i, c, r in ours if r == "proxy"]
    for section, _, container, what in ours:
        expected = INIT_NAME if what == "init" else PROXY_NAME
        if container.get("name") != expected:
            pod.problem(f"{container.get('name')}: name our {what} container {expected}, as upstream does, "
                        "so the webhook never injects a second one")
        if what == "init" and section != "initContainers":
            pod.problem(f"{container.get('name')}: the rules must be installed by an init container")
    cni = REDIRECT_ANNOTATION in pod.annotations
    redirect = _cni_redirect(pod) if cni else None
    if cni:
        _check_cni_pod(pod, inits, proxies)
    if not ours:
        return
    if pod.spec.get("hostNetwork") and not cni:
        pod.problem("hostNetwork: the init would change the node's rules; the proxy cannot run here")
    if len(inits) > 1 or len(proxies) > 1:
        pod.problem(f"{len(inits)} init and {len(proxies)} proxy containers: exactly one of each, "
                    "or one proxy alone")
    if not proxies and not cni:
        pod.problem("the init redirects IMDS traffic to a proxy this pod does not run")
    init_cfg = _check_init(pod, inits[0][1], inits[0][2], runner) if inits else None
    if init_cfg is not None and not cni:
        redirect = _Redirect(init_cfg.proxy_port, init_cfg.proxy_uid, "the init", init_cfg.passthrough)
    if proxies:
        section, index, container = proxies[0]
        _check_proxy(pod, section, index, container, redirected=bool(inits) or cni, redirect=redirect)


def validate_manifest_docs(
    docs: list[dict[str, Any]],
    *,
    settings: WebhookSettings | None = None,
    run_init: bool = True,
    init_runner: InitRunner | None = None,
    agent_runner: CniAgentRunner | None = None,
    node_pod_security: PodSecurityLevel | None = "restricted",
) -> list[str]:
    """Every problem found in these documents (one cluster's manifests, loaded together).

    Pods labelled for the webhook are checked as the webhook would leave them, in both its
    native-sidecar (Kubernetes >= 1.32) and classic forms. `run_init` also runs the CNI
    agent's `--check` (see CniAgentRunner for when that is skipped). Node-mode pods must meet
    `node_pod_security` as a whole: nothing of ours is in them, so a pod written for node mode
    has no reason to need more; pass None for pods whose own containers were not written for
    it (a migrated app keeps what it had).
    """
    settings = settings or WebhookSettings()
    problems: list[str] = []
    index = _Docs(docs)
    runner = (init_runner or InitRunner()) if run_init else None
    agents = (agent_runner or CniAgentRunner()) if run_init else None
    for doc in docs:
        label = where(doc)
        kind = doc.get("kind")
        if not doc.get("apiVersion") or not kind:
            problems.append(f"{label}: apiVersion and kind are required")
            continue
        if kind in KNOWN_KINDS and doc["apiVersion"] != KNOWN_KINDS[str(kind)]:
            problems.append(f"{label}: {kind} is {KNOWN_KINDS[str(kind)]}, not {doc['apiVersion']}")
        meta = doc.get("metadata")
        if not isinstance(meta, dict) or not meta.get("name"):
            problems.append(f"{label}: metadata.name is required")
            continue
        _strings_only(meta.get("labels"), f"{label}: metadata.labels", problems)
        _strings_only(meta.get("annotations"), f"{label}: metadata.annotations", problems)
        if kind == "ServiceAccount":
            for key in (CLIENT_ID_ANNOTATION, TENANT_ID_ANNOTATION):
                value = (meta.get("annotations") or {}).get(key)
                if value is not None and not GUID.match(str(value)):
                    problems.append(f"{label}: {key} {value!r} is not a GUID")
        if kind == "ConfigMap":
            _strings_only(doc.get("data"), f"{label}: data", problems)
        template = pod_template(doc)
        if template is None:
            if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"):
                problems.append(f"{label}: no pod template")
            continue
        tmeta = template.get("metadata") or {}
        _strings_only(tmeta.get("labels"), f"{label}: template labels", problems)
        _strings_only(tmeta.get("annotations"), f"{label}: template annotations", problems)
        selector = ((doc.get("spec") or {}).get("selector") or {}).get("matchLabels")
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet") and (
            not selector or any((tmeta.get("labels") or {}).get(k) != v for k, v in selector.items())
        ):
            problems.append(f"{label}: spec.selector.matchLabels must match the template's labels")
        spec = template.get("spec") or {}
        if not spec.get("containers"):
            problems.append(f"{label}: the pod has no containers")
            continue
        namespace = namespace_of(doc)
        sa_name = str(spec.get("serviceAccountName") or "default")
        service_account = index.get("ServiceAccount", namespace, sa_name)
        annotations = tmeta.get("annotations") or {}
        labels = tmeta.get("labels") or {}
        if INJECT_ANNOTATION in annotations:
            port = str(annotations.get(PORT_ANNOTATION, DEFAULT_PORT))
            if not port.isdigit() or not 1 <= int(port) <= 65535:
                problems.append(f"{label}: {PORT_ANNOTATION} {port!r} is not a port")
                continue
            if str(labels.get(USE_LABEL)) != "true":
                problems.append(f"{label}: {INJECT_ANNOTATION} does nothing without the label {USE_LABEL}: \"true\"")
            if REDIRECT_ANNOTATION in annotations:
                problems.append(f"{label}: {INJECT_ANNOTATION} makes the webhook add its privileged init "
                                f"container, which CNI mode ({REDIRECT_ANNOTATION}) is there to avoid")
        if str(labels.get(USE_LABEL)) == "true":
            if service_account is None and any(d.get("kind") == "ServiceAccount" for d in docs):
                problems.append(f"{label}: service account {sa_name} is not among these manifests")
            for native in (True, False):
                mutated = simulate_webhook(template, service_account, settings, native_sidecar=native)
                mode = "webhook, native sidecar" if native else "webhook, classic sidecar"
                _check_pod(_Pod(f"{label} ({mode})", namespace, mutated["spec"], index, problems, annotations,
                                node_pod_security), runner, agents)
        else:
            _check_pod(_Pod(label, namespace, spec, index, problems, annotations, node_pod_security), runner, agents)
    # A ConfigMap reference used by several containers is reported once.
    return list(dict.fromkeys(problems))


# ---- Pod Security Standards, as https://kubernetes.io/docs/concepts/security/pod-security-standards/
# states them (the "latest" policy version). A judge written from the published rules; nothing
# in the product checks these, so it shares no code with what it judges.

PodSecurityLevel = Literal["baseline", "restricted"]
_BASELINE_CAPS: Final = frozenset({
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
    "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
})
_SAFE_SYSCTLS: Final = frozenset({
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
})
_SELINUX_TYPES: Final = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
_RESTRICTED_VOLUMES: Final = frozenset({
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
})


def _security_context_violations(where: str, sc: Mapping[str, Any]) -> Iterator[str]:
    """Baseline rules that apply alike to the pod's and a container's securityContext."""
    if (sc.get("windowsOptions") or {}).get("hostProcess") is True:
        yield f"{where}: windowsOptions.hostProcess"
    selinux = sc.get("seLinuxOptions") or {}
    if str(selinux.get("type") or "") not in _SELINUX_TYPES:
        yield f"{where}: seLinuxOptions.type {selinux.get('type')}"
    for key in ("user", "role"):
        if selinux.get(key):
            yield f"{where}: seLinuxOptions.{key} is set"
    if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
        yield f"{where}: seccompProfile Unconfined"
    apparmor = (sc.get("appArmorProfile") or {}).get("type")
    if apparmor not in (None, "RuntimeDefault", "Localhost"):
        yield f"{where}: appArmorProfile {apparmor}"


def pod_security_violations(
    spec: Mapping[str, Any], level: PodSecurityLevel = "restricted", annotations: Mapping[str, Any] | None = None
) -> list[str]:
    """Every rule of the Pod Security Standards `level` that a pod spec breaks (empty: admitted).

    Container rules are reported per container ("initContainers azwi-proxy: ..."), so two
    pods' violations can be compared container by container.
    """
    found: list[str] = []
    pod_sc = spec.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key) is True:
            found.append(f"pod: {key}")
    found += _security_context_violations("pod", pod_sc)
    if level == "restricted":
        if pod_sc.get("runAsNonRoot") is False:
            found.append("pod: runAsNonRoot false")
        if pod_sc.get("runAsUser") == 0:
            found.append("pod: runAsUser 0")
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in _SAFE_SYSCTLS:
            found.append(f"pod: sysctl {sysctl.get('name')}")
    for key, value in (annotations or {}).items():
        if str(key).startswith("container.apparmor.security.beta.kubernetes.io/") and not (
            value == "runtime/default" or str(value).startswith("localhost/")
        ):
            found.append(f"pod: AppArmor annotation {key}: {value}")
    for volume in spec.get("volumes") or []:
        kinds = [k for k in volume if k != "name"]
        if "hostPath" in kinds:
            found.append(f"pod: hostPath volume {volume.get('name')}")
        elif level == "restricted" and not set(kinds) <= _RESTRICTED_VOLUMES:
            found.append(f"pod: volume {volume.get('name')} of type {', '.join(kinds)}")
    containers = [
        (section, c) for section in ("initContainers", "containers", "ephemeralContainers")
        for c in spec.get(section) or []
    ]
    for section, container in containers:
        where_ = f"{section} {container.get('name')}"
        sc = container.get("securityContext") or {}
        if sc.get("privileged") is True:
            found.append(f"{where_}: privileged")
        added = {str(c).upper().removeprefix("CAP_") for c in (sc.get("capabilities") or {}).get("add") or []}
        for cap in sorted(added - _BASELINE_CAPS):
            found.append(f"{where_}: capability {cap} added")
        if sc.get("procMount") not in (None, "Default"):
            found.append(f"{where_}: procMount {sc.get('procMount')}")
        for port in container.get("ports") or []:
            if port.get("hostPort") not in (None, 0):
                found.append(f"{where_}: hostPort {port.get('hostPort')}")
        found += _security_context_violations(where_, sc)
        if level != "restricted":
            continue
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where_}: allowPrivilegeEscalation is not false")
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if non_root is not True or sc.get("runAsNonRoot") is False:
            found.append(f"{where_}: runAsNonRoot is not true (neither it nor the pod sets it)")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            found.append(f"{where_}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{where_}: seccompProfile is not RuntimeDefault or Localhost (neither it nor the pod sets it)")
        caps = sc.get("capabilities") or {}
        if "ALL" not in {str(c).upper() for c in caps.get("drop") or []}:
            found.append(f"{where_}: capabilities.drop does not include ALL")
        for cap in sorted((added & _BASELINE_CAPS) - {"NET_BIND_SERVICE"}):
            found.append(f"{where_}: restricted allows adding only NET_BIND_SERVICE, not {cap}")
    return found
