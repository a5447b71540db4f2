"""The plan as files: manifests, identity maps, FIC commands and JSON, unchanged/.

Rules:
1. Pure: a `Plan` in, `{relative path: OutputFile}` out. Writing them is cli.py's job.
   Pods follow deploy/: `webhook/single-identity.yaml` (the webhook injects the proxy) and,
   for several identities, `webhook/multi-identity.yaml` (the pod declares it); in CNI mode
   `cni/pod.yaml` (the plugin's annotation, the proxy declared as a native sidecar, no init);
   in node mode `node/pod.yaml` (annotations only: no proxy, no init, the map inline).
2. Input objects are deep-copied before they are changed; unchanged documents are written back
   from their original text whenever that text loads to the same data.
3. Every identity map is checked with the proxy's own parser before it is returned: a map the
   proxy would reject is a bug here, reported as such.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Final

import yaml

from azwi_netproxy.errors import ConfigError
from azwi_netproxy.identitymap import parse_identity_map
from azwi_netproxy.migrate.model import BINDING_LABEL, Document, dump_yaml, load_yaml_all
from azwi_netproxy.migrate.plan import (
    CLIENT_ID_ANNOTATION,
    FIC_AUDIENCE,
    ISSUER_VARIABLE,
    JOB_GENERATED_LABELS,
    FederatedCredential,
    Plan,
    WorkloadPlan,
    fit_name,
    rbac_name,
)
from azwi_netproxy.settings import (
    CNI_PASSTHROUGH_ANNOTATION,
    CNI_PORT_ANNOTATION,
    CNI_REDIRECT_ANNOTATION,
    DEFAULT_PROXY_PORT,
    DEFAULT_PROXY_UID,
    NODE_CLIENT_ID_ANNOTATION,
    NODE_IDENTITY_MAP_ANNOTATION,
    NODE_PROXY_ANNOTATION,
    NODE_TENANT_ID_ANNOTATION,
)

USE_LABEL: Final = "azure.workload.identity/use"
# The upstream webhook injects the proxy when this annotation is present (pkg/webhook/consts.go
# InjectProxySidecarAnnotation); the migration guide sets it to "true".
INJECT_PROXY_ANNOTATION: Final = "azure.workload.identity/inject-proxy-sidecar"
PROXY_PORT_ANNOTATION: Final = "azure.workload.identity/proxy-sidecar-port"
IDENTITY_BINDING_ANNOTATION: Final = "azure.workload.identity/use-identity-binding"
# CNI mode (CONTRACT.md, azwi-netproxy-cni): the chained plugin redirects pods annotated so.
REDIRECT_ANNOTATION: Final = CNI_REDIRECT_ANNOTATION
CNI_DEFAULT_PORT: Final = DEFAULT_PROXY_PORT  # the plugin's proxyPort when the annotation is absent
NODE_AGENT_MANIFEST: Final = "deploy/cni/node-agent.yaml"
# Node mode (CONTRACT.md, "Node mode"): the CNI agent's DaemonSet with the node process beside it.
NODE_MODE_MANIFEST: Final = "deploy/node/node-agent.yaml"
# The pod annotations only node mode reads; a pod in another mode must not carry them, nor
# node-mode pods the annotations of CNI mode's redirect (which would exempt the proxy's uid).
NODE_ANNOTATIONS: Final = (
    NODE_PROXY_ANNOTATION,
    NODE_CLIENT_ID_ANNOTATION,
    NODE_TENANT_ID_ANNOTATION,
    NODE_IDENTITY_MAP_ANNOTATION,
)
PROXY_CONTAINER: Final = "azwi-proxy"  # upstream ProxySidecarContainerName
INIT_CONTAINER: Final = "azwi-proxy-init"  # upstream ProxyInitContainerName
PROXY_UID: Final = DEFAULT_PROXY_UID  # the proxy image's USER, which the init exempts
# The init's and the sidecar's own variable (CONTRACT.md), so one value serves both containers.
PASSTHROUGH_VARIABLE: Final = "AZWI_PASSTHROUGH"
MAP_VOLUME: Final = "azwi-identity-map"
MAP_DIR: Final = "/etc/azwi-netproxy"
MAP_KEY: Final = "identity-map.yaml"
GENERATOR: Final = "azwi-netproxy-migrate"

_SERVER_METADATA: Final = (
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)
_SERVER_ANNOTATIONS: Final = (
    "kubectl.kubernetes.io/last-applied-configuration",
    "deployment.kubernetes.io/revision",
)
_PATH_COMPONENT: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True, slots=True)
class OutputFile:
    content: str
    executable: bool = False


class RenderError(Exception):
    """Something we generated fails our own checks: a bug in this tool, never the input's fault."""


def _component(value: str, what: str) -> str:
    # Names come from the input; Kubernetes names cannot hold "/" or "..", but a malformed file
    # could, and they become paths under OUTDIR.
    if not _PATH_COMPONENT.match(value) or ".." in value:
        raise ConfigError(f"{what} {value!r} is not a valid Kubernetes name")
    return value


def _prefix(plan: Plan, cluster: str) -> str:
    return f"{_component(cluster, 'cluster name')}/" if plan.multi_cluster else ""


def _clean(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy without what the API server fills in (applying it would conflict or mislead)."""
    result = copy.deepcopy(obj)
    result.pop("status", None)
    meta = result.get("metadata")
    if isinstance(meta, dict):
        for key in _SERVER_METADATA:
            meta.pop(key, None)
        annotations = meta.get("annotations")
        if isinstance(annotations, dict):
            for key in _SERVER_ANNOTATIONS:
                annotations.pop(key, None)
            if not annotations:
                meta.pop("annotations")
    return result


def _ensure_map(parent: dict[str, Any], key: str) -> dict[str, Any]:
    value = parent.get(key)
    if not isinstance(value, dict):
        value = {}
        parent[key] = value
    return value


def _header(lines: list[str]) -> str:
    return "".join(f"# {line}\n" if line else "#\n" for line in lines)


def _workload_manifest(plan: Plan, wp: WorkloadPlan) -> tuple[dict[str, Any], list[str]]:
    obj = _clean(wp.workload.doc.data)
    pod: dict[str, Any] = obj
    for key in wp.workload.template_path:
        pod = pod[key]
    if wp.workload.template_path:
        pod_meta = _ensure_map(pod, "metadata")
        pod_meta.pop("creationTimestamp", None)
    else:
        pod_meta = _ensure_map(obj, "metadata")
    # The FIC subject names this namespace: do not leave it to the kubectl context.
    _ensure_map(obj, "metadata").setdefault("namespace", wp.workload.namespace)
    labels = _ensure_map(pod_meta, "labels")
    annotations = _ensure_map(pod_meta, "annotations")
    spec = _ensure_map(pod, "spec")
    changes: list[str] = []

    labels[USE_LABEL] = "true"
    changes.append(f'pod label {USE_LABEL}: "true"')
    if wp.remove_binding_label:
        labels.pop(BINDING_LABEL, None)
        changes.append(f"pod label {BINDING_LABEL} removed (cut-over)")
    elif wp.label_kept_because:
        changes.append(f"pod label {BINDING_LABEL} kept: " + "; ".join(wp.label_kept_because))
    else:
        changes.append(f"pod label {BINDING_LABEL} kept until cut-over")
    if wp.node:
        changes += _node_mode(wp, annotations, spec)
    elif wp.cni:
        # The webhook's injection would bring back the NET_ADMIN init container.
        annotations.pop(INJECT_PROXY_ANNOTATION, None)
        annotations.pop(PROXY_PORT_ANNOTATION, None)
        annotations[REDIRECT_ANNOTATION] = "true"
        port_text = ""
        if wp.proxy_port != CNI_DEFAULT_PORT:
            annotations[CNI_PORT_ANNOTATION] = str(wp.proxy_port)
            port_text = f', {CNI_PORT_ANNOTATION}: "{wp.proxy_port}"'
        else:
            annotations.pop(CNI_PORT_ANNOTATION, None)
        if wp.passthrough == "none":
            # The plugin's own per-pod setting (CONTRACT.md): no uid exempted from its rules.
            annotations[CNI_PASSTHROUGH_ANNOTATION] = "none"
            port_text += f', {CNI_PASSTHROUGH_ANNOTATION}: "none"'
        _declare_proxy(plan, wp, spec)
        changes.append(
            f'pod annotation {REDIRECT_ANNOTATION}: "true"{port_text} (CNI mode: the plugin redirects)'
        )
        changes.append(
            f"declares {PROXY_CONTAINER} as the first init container (native sidecar, Kubernetes 1.29+, "
            f"port {wp.proxy_port})"
            + (f" with the identity map from ConfigMap {wp.configmap_name}" if wp.needs_identity_map else "")
            + f"; no {INIT_CONTAINER}, no capabilities, no {INJECT_PROXY_ANNOTATION}"
        )
    elif wp.declares_proxy:
        annotations.pop(INJECT_PROXY_ANNOTATION, None)
        annotations.pop(PROXY_PORT_ANNOTATION, None)
        _declare_proxy(plan, wp, spec)
        form = "native sidecar" if native_sidecar(wp) else "first container"
        changes.append(
            f"declares {INIT_CONTAINER} (first init container) and {PROXY_CONTAINER} ({form}, "
            f"port {wp.proxy_port})"
            + (f" with the identity map from ConfigMap {wp.configmap_name}" if wp.needs_identity_map else "")
            + f"; no {INJECT_PROXY_ANNOTATION}, so the webhook injects no containers"
        )
    else:
        annotations[INJECT_PROXY_ANNOTATION] = "true"
        annotations[PROXY_PORT_ANNOTATION] = str(wp.proxy_port)
        dropped = _drop_proxy(spec)
        if dropped:
            # A re-export that declared them: the webhook injects nothing where they exist.
            changes.append(f"{', '.join(dropped)} removed")
        changes.append(
            f'pod annotations {INJECT_PROXY_ANNOTATION}: "true", {PROXY_PORT_ANNOTATION}: "{wp.proxy_port}"'
        )
    if not wp.node:
        changes.append(_passthrough_change(wp))
        if not wp.cni:
            # A re-export of a CNI-mode migration: the plugin must no longer redirect these pods.
            stale = [
                key
                for key in (REDIRECT_ANNOTATION, CNI_PORT_ANNOTATION)
                if annotations.pop(key, None) is not None
            ]
            if stale:
                changes.append(f"pod annotations {', '.join(stale)} removed (not CNI mode)")
        # A re-export of a node-mode migration: the node process must no longer serve these pods.
        stale = [key for key in NODE_ANNOTATIONS if annotations.pop(key, None) is not None]
        if stale:
            changes.append(f"pod annotations {', '.join(stale)} removed (not node mode)")
    if wp.identity_binding:
        annotations[IDENTITY_BINDING_ANNOTATION] = "true"
        changes.append(f'pod annotation {IDENTITY_BINDING_ANNOTATION}: "true" (FIC budget)')
    if not annotations:
        pod_meta.pop("annotations")  # declared containers instead of the webhook's annotations
    spec["serviceAccountName"] = wp.service_account
    if "serviceAccount" in spec:
        spec["serviceAccount"] = wp.service_account  # the deprecated alias must agree
    changes.append(f"serviceAccountName: {wp.service_account}")

    if wp.workload.kind == "Job" and obj.get("spec", {}).get("manualSelector") is not True:
        # The selector and these labels carry the old Job's UID; the API server generates new
        # ones and rejects a re-created Job that brings the old ones along.
        obj["spec"].pop("selector", None)
        for key in JOB_GENERATED_LABELS:
            labels.pop(key, None)
        changes.append("controller-generated selector and labels removed (re-create the Job)")
    return obj, changes


def _passthrough_change(wp: WorkloadPlan) -> str:
    """The header line that says what became of pass-through, and why."""
    if wp.passthrough == "none":
        where = (
            f"{PASSTHROUGH_VARIABLE}=none on {PROXY_CONTAINER}, and the plugin's {CNI_PASSTHROUGH_ANNOTATION}"
            if wp.cni
            else f"{PASSTHROUGH_VARIABLE}=none on {INIT_CONTAINER} and {PROXY_CONTAINER}"
        )
        why = "; ".join(wp.passthrough_because) or "no sign of needing instance metadata"
        return (
            f"{where}: no uid is exempted from the redirect, and other IMDS paths get 403 ({why}; "
            f"see REPORT.md, Pass-through)"
        )
    return "pass-through to the node's IMDS kept (the redirect exempts the proxy's uid): " + "; ".join(
        wp.passthrough_because
    )


def _node_mode(wp: WorkloadPlan, annotations: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """The pod's annotations for the node process, as deploy/node/pod.yaml has them; no proxy.

    The `use` label stays, so the webhook still projects the service account token that the
    node process reads from the kubelet's pods directory; without inject-proxy-sidecar it
    injects no containers. CNI mode's redirect annotation would make the plugin install the
    rules that exempt the proxy's uid: it goes. A pass-through annotation here can only be the
    pod's explicit "none" (an explicit "all" keeps the workload out of node mode), which is what
    node mode does anyway: it stays, so that the choice survives a later run without --node.
    """
    not_here = (INJECT_PROXY_ANNOTATION, PROXY_PORT_ANNOTATION, REDIRECT_ANNOTATION)
    removed = [key for key in not_here if annotations.pop(key, None) is not None]
    for key in (NODE_TENANT_ID_ANNOTATION, NODE_IDENTITY_MAP_ANNOTATION, CNI_PORT_ANNOTATION):
        annotations.pop(key, None)
    annotations[NODE_PROXY_ANNOTATION] = "true"
    annotations[NODE_CLIENT_ID_ANNOTATION] = wp.default.identity.client_id
    written = [
        f'{NODE_PROXY_ANNOTATION}: "true"',
        f"{NODE_CLIENT_ID_ANNOTATION}: {wp.default.identity.client_id}",
    ]
    if wp.tenant_id is not None:
        annotations[NODE_TENANT_ID_ANNOTATION] = wp.tenant_id
        written.append(f"{NODE_TENANT_ID_ANNOTATION}: {wp.tenant_id} (from the service account)")
    if wp.needs_identity_map:
        annotations[NODE_IDENTITY_MAP_ANNOTATION] = identity_map_json(wp)
        written.append(f"{NODE_IDENTITY_MAP_ANNOTATION} ({len(wp.identities)} identities, onlyListed)")
    if wp.proxy_port != CNI_DEFAULT_PORT:
        annotations[CNI_PORT_ANNOTATION] = str(wp.proxy_port)
        written.append(f'{CNI_PORT_ANNOTATION}: "{wp.proxy_port}"')
    changes = [f"pod annotations {', '.join(written)} (node mode: the node's process answers IMDS)"]
    dropped = _drop_proxy(spec)
    if dropped:
        changes.append(f"{', '.join(dropped)} removed")
    changes.append(f"no proxy, no init container, no capabilities; no {INJECT_PROXY_ANNOTATION}")
    if removed:
        changes.append(f"pod annotations {', '.join(removed)} removed (node mode)")
    return changes


def _drop_proxy(spec: dict[str, Any]) -> list[str]:
    """Remove our containers and the map volume (a re-exported earlier migration); what was removed."""
    ours = (INIT_CONTAINER, PROXY_CONTAINER)
    removed: list[str] = []
    for key in ("initContainers", "containers"):
        containers = spec.get(key)
        if not isinstance(containers, list):
            continue
        kept = [c for c in containers if not (isinstance(c, dict) and c.get("name") in ours)]
        removed += [str(c["name"]) for c in containers if c not in kept]
        if kept or key == "containers":
            spec[key] = kept
        else:
            spec.pop(key)
    volumes = spec.get("volumes")
    if isinstance(volumes, list):
        kept_volumes = [v for v in volumes if not (isinstance(v, dict) and v.get("name") == MAP_VOLUME)]
        if len(kept_volumes) != len(volumes):
            removed.append(f"the volume {MAP_VOLUME}")
        if kept_volumes:
            spec["volumes"] = kept_volumes
        else:
            spec.pop("volumes")
    return removed


def _service_account(wp: WorkloadPlan) -> dict[str, Any]:
    if wp.sa_doc is not None:
        obj = _clean(wp.sa_doc.data)
    else:
        obj = {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": wp.service_account, "namespace": wp.workload.namespace},
        }
    meta = _ensure_map(obj, "metadata")
    meta.setdefault("namespace", wp.workload.namespace)
    # Current webhooks look at the pod's label; versions before v0.15 looked at the service
    # account's, so it is set on both.
    _ensure_map(meta, "labels")[USE_LABEL] = "true"
    _ensure_map(meta, "annotations")[CLIENT_ID_ANNOTATION] = wp.default.identity.client_id
    return obj


def _identity_map(wp: WorkloadPlan) -> dict[str, Any]:
    entries = [
        {"clientID": b.identity.client_id, "resourceID": b.identity.resource_id} for b in wp.identities
    ]
    return {"onlyListed": True, "identities": entries}


def identity_map_json(wp: WorkloadPlan) -> str:
    """The identity map as node mode's annotation carries it: compact JSON, checked like the file.

    Raises:
        RenderError: the proxy would reject or misread the map.
    """
    text = json.dumps(_identity_map(wp), separators=(",", ":"))
    return _checked(wp, text)


def identity_map_text(wp: WorkloadPlan) -> str:
    """The identity map of a workload that used several identities, checked with the proxy's parser.

    Raises:
        RenderError: the proxy would reject or misread the map.
    """
    body = dump_yaml(_identity_map(wp))
    default = wp.default
    header = _header(
        [
            f"Identity map (AZWI_IDENTITY_MAP) for {wp.workload.kind} "
            f"{wp.workload.namespace}/{wp.workload.name}, generated by {GENERATOR}.",
            "Pod identity gave these pods: "
            + ", ".join(f"{b.pod_identity} (binding {b.binding})" for b in wp.identities)
            + ".",
            f"Default identity (service account annotation): {default.pod_identity}, "
            f"from the first binding by name.",
            "onlyListed: a client_id, msi_res_id or mi_res_id not listed here gets 400 Identity not found.",
        ]
    )
    return _checked(wp, header + body)


def _checked(wp: WorkloadPlan, text: str) -> str:
    """`text` if the proxy's own parser reads it back as the workload's identities.

    Raises:
        RenderError: it does not.
    """
    try:
        parsed = parse_identity_map(text, source=f"{wp.ref}")
    except Exception as exc:
        raise RenderError(f"generated identity map for {wp.ref} rejected by the proxy: {exc}") from exc
    expected = [b.identity.client_id for b in wp.identities]
    if [i.client_id for i in parsed.identities] != expected or not parsed.only_listed:
        raise RenderError(f"generated identity map for {wp.ref} does not read back as written")
    for bound in wp.identities:
        resolved = parsed.by_resource_id.get(bound.identity.resource_id.lower())
        if resolved is None or resolved.client_id != bound.identity.client_id:
            raise RenderError(f"identity map for {wp.ref}: resourceID does not resolve")
    return text


def _configmap(wp: WorkloadPlan, map_text: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": wp.configmap_name, "namespace": wp.workload.namespace},
        "data": {MAP_KEY: map_text},
    }


def native_sidecar(wp: WorkloadPlan) -> bool:
    """Whether the declared proxy is a native sidecar (an init container that keeps running).

    A classic sidecar never exits, so a Job (or a Pod that is not restarted) would never
    complete with one; native sidecars need Kubernetes 1.29 or later, which every supported
    AKS version has. Long-running workloads keep the classic form, which any version runs.
    In CNI mode the redirect exists before the first container starts, so the proxy must be
    running before any other container: always a native sidecar, first.
    """
    restart = wp.workload.pod_spec.get("restartPolicy")
    return wp.cni or wp.workload.kind in ("Job", "CronJob") or restart in ("Never", "OnFailure")


def _resources() -> dict[str, Any]:
    return {"requests": {"cpu": "10m", "memory": "48Mi"}, "limits": {"memory": "128Mi"}}


def _declare_proxy(plan: Plan, wp: WorkloadPlan, spec: dict[str, Any]) -> None:
    """Declare our init and proxy containers, as deploy/webhook/multi-identity.yaml does.

    The webhook's injected sidecar cannot be given the identity map or AZWI_PASSTHROUGH, so the
    pod carries both containers under upstream's names and no inject-proxy-sidecar annotation:
    the webhook then injects no containers, and still adds the AZURE_* variables and the
    projected token to every container, ours included. In CNI mode only the proxy, as
    deploy/cni/pod.yaml declares it.
    """
    port = str(wp.proxy_port)
    # With none the init exempts no uid at all, so PROXY_UID would mean nothing: it goes.
    init_env = (
        [{"name": "PROXY_PORT", "value": port}, {"name": PASSTHROUGH_VARIABLE, "value": "none"}]
        if wp.passthrough == "none"
        else [{"name": "PROXY_PORT", "value": port}, {"name": "PROXY_UID", "value": str(PROXY_UID)}]
    )
    init = {
        "name": INIT_CONTAINER,
        "image": plan.options.proxy_init_image,
        "env": init_env,
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            # NET_RAW: the legacy iptables backend opens a raw socket.
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
        "resources": _resources(),
    }
    probe = ["/proxy", f"--proxy-port={port}", "--probe"]
    proxy: dict[str, Any] = {
        "name": PROXY_CONTAINER,
        "image": plan.options.proxy_image,
        "args": [f"--proxy-port={port}", "--log-level=info"],
    }
    env: list[dict[str, str]] = []
    if wp.needs_identity_map:
        env.append({"name": "AZWI_IDENTITY_MAP", "value": f"{MAP_DIR}/{MAP_KEY}"})
    if wp.passthrough == "none":
        # Other IMDS paths get 403 instead of a pass-through that the redirect would send back.
        env.append({"name": PASSTHROUGH_VARIABLE, "value": "none"})
    if env:
        proxy["env"] = env
    if wp.needs_identity_map:
        proxy["volumeMounts"] = [{"name": MAP_VOLUME, "mountPath": MAP_DIR, "readOnly": True}]
    proxy["securityContext"] = {
        # The image's user. With pass-through, the init container (or the CNI plugin, whose
        # default proxyUID it is) exempts this uid from the redirect.
        "runAsUser": PROXY_UID,
        "runAsGroup": PROXY_UID,
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    if wp.cni:
        # Pod Security "restricted" wants a seccomp profile; the pod's own may set none.
        proxy["securityContext"]["seccompProfile"] = {"type": "RuntimeDefault"}
    proxy["resources"] = _resources()
    inits = [
        c
        for c in spec.get("initContainers") or []
        if not (isinstance(c, dict) and c.get("name") in (INIT_CONTAINER, PROXY_CONTAINER))
    ]
    containers = [
        c
        for c in spec.get("containers") or []
        if not (isinstance(c, dict) and c.get("name") == PROXY_CONTAINER)
    ]
    if native_sidecar(wp):
        # The kubelet starts the next init container once the startup probe passes, so the
        # pod's own init containers get tokens too. exec, not httpGet: the proxy listens on
        # 127.0.0.1 only.
        proxy["restartPolicy"] = "Always"
        proxy["startupProbe"] = {
            "exec": {"command": probe},
            "periodSeconds": 2,
            "timeoutSeconds": 12,
            "failureThreshold": 10,
        }
        spec["initContainers"] = [proxy, *inits] if wp.cni else [init, proxy, *inits]
        spec["containers"] = containers
    else:
        # First, with upstream's postStart probe: the kubelet starts the app once it answers.
        proxy["lifecycle"] = {"postStart": {"exec": {"command": probe}}}
        spec["initContainers"] = [init, *inits]
        spec["containers"] = [proxy, *containers]
    volumes = [
        v for v in spec.get("volumes") or [] if not (isinstance(v, dict) and v.get("name") == MAP_VOLUME)
    ]
    if wp.needs_identity_map:
        volumes.append({"name": MAP_VOLUME, "configMap": {"name": wp.configmap_name}})
    if volumes:
        spec["volumes"] = volumes
    else:
        spec.pop("volumes", None)


def _cluster_rbac(plan: Plan) -> dict[str, OutputFile]:
    """RBAC that lets the service accounts use an identity through AKS identity binding."""
    files: dict[str, OutputFile] = {}
    for need in plan.identity_bindings:
        client_id = need.identity.client_id
        name = rbac_name(need.identity)
        base = f"manifests/{_prefix(plan, need.cluster)}_cluster"
        header = _header(
            [
                f"AKS identity binding (preview): lets these service accounts use managed identity "
                f"{need.identity.name} ({client_id}).",
                f"Reason: {need.reason}. Also create the identity binding itself: see REPORT.md.",
            ]
        )
        role = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name},
            "rules": [
                {
                    "apiGroups": ["cid.wi.aks.azure.com"],
                    "resources": [client_id],
                    "verbs": ["use-managed-identity"],
                }
            ],
        }
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [
                {"kind": "ServiceAccount", "name": sa, "namespace": ns} for ns, sa in need.service_accounts
            ],
        }
        files[f"{base}/clusterrole-{name}.yaml"] = OutputFile(header + dump_yaml(role))
        files[f"{base}/clusterrolebinding-{name}.yaml"] = OutputFile(header + dump_yaml(binding))
    return files


def _issuer_arg(fic: FederatedCredential) -> str:
    if fic.issuer is None:
        return f'"${{{ISSUER_VARIABLE}}}"'
    return shlex.quote(fic.issuer)


def fic_commands(plan: Plan) -> str:
    lines = [
        "#!/usr/bin/env bash",
        "# Federated identity credentials for the move from pod identity to workload identity,",
        f"# generated by {GENERATOR} (see REPORT.md). Review, then run with an Azure CLI (2.47+)",
        "# session allowed to write federated credentials on these managed identities.",
        "# `az identity federated-credential create` is a PUT: running the script again is harmless.",
        "# Entra refuses concurrent writes to one identity's credentials: the commands run one by one.",
        "set -euo pipefail",
        "",
    ]
    if any(f.issuer is None for f in plan.fics):
        lines += [
            "# The cluster's OIDC issuer URL (the --issuer flag was not given), e.g.",
            f'#   export {ISSUER_VARIABLE}="$(az aks show -g RESOURCE_GROUP -n CLUSTER '
            f'--query oidcIssuerProfile.issuerUrl -o tsv)"',
            # No quote characters in the message: bash parses quotes inside ${VAR:?word}.
            f': "${{{ISSUER_VARIABLE}:?export {ISSUER_VARIABLE}, the OIDC issuer URL of the '
            f'cluster, first}}"',
            "",
        ]
    by_identity: dict[str, list[FederatedCredential]] = defaultdict(list)
    for fic in plan.fics:
        by_identity[fic.identity.key].append(fic)
    if not plan.fics:
        lines.append("# Nothing to create: no workload was migrated with per-service-account FICs.")
    for key in sorted(by_identity, key=lambda k: (by_identity[k][0].identity.name.lower(), k)):
        fics = by_identity[key]
        identity = fics[0].identity
        lines.append(
            f"# {identity.name} (client ID {identity.client_id}): {len(fics)} credential"
            f"{'s' if len(fics) != 1 else ''}"
        )
        for fic in fics:
            lines.append(
                f"# for {', '.join(fic.used_by)}" + (f" in cluster {fic.cluster}" if fic.cluster else "")
            )
            args = [
                ("--name", shlex.quote(fic.name)),
                ("--identity-name", shlex.quote(identity.name)),
                ("--resource-group", shlex.quote(identity.resource_group)),
                ("--subscription", shlex.quote(identity.subscription)),
                ("--issuer", _issuer_arg(fic)),
                ("--subject", shlex.quote(fic.subject)),
                ("--audience", FIC_AUDIENCE),
            ]
            lines.append("az identity federated-credential create \\")
            lines += [
                f"  {flag} {value}" + (" \\" if n < len(args) - 1 else "")
                for n, (flag, value) in enumerate(args)
            ]
        lines.append("")
    if plan.identity_bindings:
        lines += [
            "# Identity binding (AKS preview) replaces per-service-account FICs for these",
            "# identities; nothing below runs. Per identity and cluster, create the binding (AKS",
            "# then creates and shares the identity's one FIC, aks-identity-binding), and apply",
            "# the ClusterRole/ClusterRoleBinding under manifests/…/_cluster/. See REPORT.md.",
        ]
        for need in plan.identity_bindings:
            cluster = need.cluster or "CLUSTER"
            lines.append(
                f"#   az aks identity-binding create -g CLUSTER_RESOURCE_GROUP --cluster-name "
                f"{shlex.quote(cluster)} -n {shlex.quote(fit_name(need.identity.name + '-ib', 63))} "
                f"--managed-identity-resource-id {shlex.quote(need.identity.resource_id)}"
            )
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def fics_json(plan: Plan) -> str:
    def identity(i: Any) -> dict[str, str]:
        return {
            "name": i.name,
            "resourceGroup": i.resource_group,
            "subscription": i.subscription,
            "resourceID": i.resource_id,
            "clientID": i.client_id,
        }

    credentials = []
    for fic in plan.fics:
        entry: dict[str, Any] = {
            "name": fic.name,
            "identity": identity(fic.identity),
            "cluster": fic.cluster or None,
            "issuer": fic.issuer,
        }
        if fic.issuer is None:
            entry["issuerFromEnvironment"] = ISSUER_VARIABLE
        entry.update({"subject": fic.subject, "audiences": [FIC_AUDIENCE], "usedBy": list(fic.used_by)})
        credentials.append(entry)
    document = {
        "generator": GENERATOR,
        "limitPerIdentity": plan.options.fic_limit,
        "federatedIdentityCredentials": credentials,
        "budget": [
            {
                "identity": identity(line.identity),
                "needed": line.needed,
                "perCluster": {c or "-": n for c, n in line.per_cluster},
                "planned": line.planned,
                "overLimit": line.over_limit,
            }
            for line in plan.budget
        ],
        "identityBindings": [
            {
                "identity": identity(need.identity),
                "cluster": need.cluster or None,
                "serviceAccounts": [f"{ns}/{sa}" for ns, sa in need.service_accounts],
                "usedBy": list(need.used_by),
                "reason": need.reason,
            }
            for need in plan.identity_bindings
        ],
    }
    return json.dumps(document, indent=2) + "\n"


def _unchanged(plan: Plan) -> dict[str, OutputFile]:
    files: dict[str, OutputFile] = {}
    for cluster, documents in sorted(plan.unchanged.items()):
        grouped: dict[str, list[Document]] = defaultdict(list)
        for doc in documents:
            grouped[doc.output_name].append(doc)
        for output_name, docs in grouped.items():
            verbatim = all(doc.text is not None for doc in docs)
            name = output_name
            if not verbatim and not name.endswith((".yaml", ".yml")):
                name += ".yaml"  # a JSON List we had to split is written back as YAML
            for part in name.split("/"):
                _component(part, "file name")
            parts = [doc.text if doc.text is not None else dump_yaml(doc.data) for doc in docs]
            content = "---\n".join(parts)
            try:
                verbatim = load_yaml_all(content, keep_empty=True) == [doc.data for doc in docs]
            except yaml.YAMLError:
                verbatim = False
            if not verbatim:
                # Some original text did not survive being cut out and joined (a directive, a
                # marker line with content): fall back to re-serialising, which loads the same.
                content = "---\n".join(dump_yaml(doc.data) for doc in docs)
            files[f"unchanged/{_prefix(plan, cluster)}{name}"] = OutputFile(content)
    return files


def render(plan: Plan) -> dict[str, OutputFile]:
    """Every output file but REPORT.md, by path relative to OUTDIR.

    Raises:
        ConfigError: an input name cannot be used as a file name.
        RenderError: a generated identity map fails the proxy's parser (a bug).
    """
    files: dict[str, OutputFile] = {}
    service_accounts: dict[str, WorkloadPlan] = {}
    for wp in plan.workloads:
        ns = _component(wp.workload.namespace, "namespace")
        name = _component(wp.workload.name, f"{wp.workload.kind} name")
        kind = wp.workload.kind.lower()
        base = f"manifests/{_prefix(plan, wp.cluster)}{ns}"
        manifest_path = f"{base}/{kind}-{name}.yaml"
        obj, changes = _workload_manifest(plan, wp)
        header = [
            f"Migrated to workload identity by {GENERATOR} from {wp.workload.doc.where}.",
            *changes,
            *wp.notes,
        ]
        files[manifest_path] = OutputFile(_header(header) + dump_yaml(obj))
        sa_path = f"{base}/serviceaccount-{_component(wp.service_account, 'service account')}.yaml"
        if sa_path not in service_accounts:
            service_accounts[sa_path] = wp
            sa_header = {
                "patch": f"Service account from {wp.sa_doc.where if wp.sa_doc else ''}, annotated.",
                "create": f"New service account for {wp.workload.kind} {name} (it used default).",
                "create-missing": "Not in the export: applying merges the annotation into the "
                "existing service account.",
            }[wp.sa_action]
            files[sa_path] = OutputFile(
                _header(
                    [
                        sa_header,
                        f"Default identity: {wp.default.pod_identity} ({wp.default.identity.name}).",
                    ]
                )
                + dump_yaml(_service_account(wp))
            )
        if wp.needs_identity_map and not wp.node:  # node mode: the map is the pod's annotation
            map_text = identity_map_text(wp)
            files[f"identity-maps/{_prefix(plan, wp.cluster)}{ns}-{kind}-{name}.yaml"] = OutputFile(map_text)
            cm_name = wp.configmap_name
            files[f"{base}/configmap-{cm_name}.yaml"] = OutputFile(
                _header(
                    [
                        f"Identity map of {wp.workload.kind} {name}, mounted into its {PROXY_CONTAINER} "
                        f"container at {MAP_DIR}/{MAP_KEY}.",
                    ]
                )
                + dump_yaml(_configmap(wp, map_text))
            )
    files.update(_cluster_rbac(plan))
    files.update(_unchanged(plan))
    files["fic-commands.sh"] = OutputFile(fic_commands(plan), executable=True)
    files["fics.json"] = OutputFile(fics_json(plan))
    return dict(sorted(files.items()))
