"""REPORT.md: what the export held, what was generated, what was not migrated and why.

Rules:
1. Pure: a `Plan` and the list of generated files in, Markdown out. Decides nothing: every fact
   comes from the plan, so the report cannot disagree with the files.
2. Deterministic: no timestamps, no absolute paths beyond what the user typed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from azwi_netproxy.migrate import model
from azwi_netproxy.migrate.plan import (
    CLIENT_ID_ANNOTATION,
    DEFAULT_PROXY_IMAGE,
    DEFAULT_PROXY_INIT_IMAGE,
    FIC_AUDIENCE,
    ISSUER_VARIABLE,
    Finding,
    Plan,
    WorkloadPlan,
)
from azwi_netproxy.migrate.render import (
    CNI_DEFAULT_PORT,
    IDENTITY_BINDING_ANNOTATION,
    INIT_CONTAINER,
    INJECT_PROXY_ANNOTATION,
    MAP_DIR,
    MAP_KEY,
    NODE_AGENT_MANIFEST,
    NODE_MODE_MANIFEST,
    PASSTHROUGH_VARIABLE,
    PROXY_CONTAINER,
    PROXY_PORT_ANNOTATION,
    REDIRECT_ANNOTATION,
    USE_LABEL,
    OutputFile,
)
from azwi_netproxy.settings import (
    CNI_PASSTHROUGH_ANNOTATION,
    CNI_PORT_ANNOTATION,
    NODE_CLIENT_ID_ANNOTATION,
    NODE_IDENTITY_MAP_ANNOTATION,
    NODE_PROXY_ANNOTATION,
    NODE_TENANT_ID_ANNOTATION,
)

TITLE = "# Migration from AKS pod identity to workload identity (azwi-netproxy-migrate)"


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return [*lines, ""]


def _cluster_cols(plan: Plan, cluster: str) -> list[str]:
    return [cluster] if plan.multi_cluster else []


def _findings(plan: Plan, findings: Sequence[Finding], what: str) -> list[str]:
    headers = (["Cluster"] if plan.multi_cluster else []) + [what, "Where", "Why"]
    return _table(
        headers, ([*_cluster_cols(plan, f.cluster), f"`{f.subject}`", f.where, f.reason] for f in findings)
    )


def _mode(wp: WorkloadPlan) -> str:
    return "identity binding" if wp.identity_binding else "FIC per service account"


_MODE_NAMES = {"sidecar": "sidecar", "cni": "CNI", "node": "node"}


def _fallback(plan: Plan) -> str:
    """The name of the mode that --node leaves workloads in."""
    return _MODE_NAMES[plan.options.fallback_mode]


def _summary(plan: Plan, files: Mapping[str, OutputFile]) -> list[str]:
    multi = sum(1 for w in plan.workloads if w.needs_identity_map)
    binding = sum(1 for w in plan.workloads if w.identity_binding)
    unchanged = sum(len(docs) for docs in plan.unchanged.values())
    over = [b for b in plan.budget if b.over_limit]
    lines = ["## Summary", ""]
    for cluster in plan.clusters:
        label = f"Cluster `{cluster.name}`" if cluster.name else "The export"
        issuer = (
            f"issuer `{cluster.issuer}`"
            if cluster.issuer
            else f"issuer not given (the commands use `${{{ISSUER_VARIABLE}}}`)"
        )
        lines.append(
            f"- {label}: {cluster.documents} objects, {cluster.pod_identity_objects} pod identity "
            f"resources, {cluster.workloads_seen} workloads; {issuer}."
        )
    lines += [
        "- Bindings are matched as pod identity's namespaced mode does: an "
        "AzureIdentityBinding serves pods of its own namespace and names an AzureIdentity of that "
        "namespace. (A cluster that ran pod identity non-namespaced shows pods served from another "
        'namespace as "matches no binding" below.)',
        f"- **{len(plan.workloads)} workloads migrated**"
        + (f", {multi} of them with several identities (identity map)" if multi else "")
        + (f", {binding} through identity binding" if binding else "")
        + ".",
        f'- **{len(plan.not_migrated)} not migrated** (see "Not migrated").',
        *_passthrough_summary(plan),
        f"- {len(plan.excepted)} matched by an AzurePodIdentityException (nothing to migrate).",
        f"- {len(plan.fics)} federated identity credentials to create "
        f"(`fic-commands.sh`, `fics.json`)"
        + (
            f"; {len(over)} identities over the limit of {plan.options.fic_limit} FICs use "
            f"identity binding instead"
            if over
            else ""
        )
        + ".",
        f"- {unchanged} other objects copied unchanged to `unchanged/`; "
        f"{len(plan.omitted)} runtime objects of migrated workloads left out.",
        f"- {sum(1 for p in files if p.startswith('manifests/'))} manifests written.",
        "",
    ]
    if plan.options.cni:
        lines[-1:-1] = [
            f"- **CNI mode** (`--cni`): install the node agent (`{NODE_AGENT_MANIFEST}`) on every "
            f'node first (see "CNI mode").',
        ]
    if plan.options.node:
        in_node = sum(1 for w in plan.workloads if w.node)
        lines[-1:-1] = [
            f"- **Node mode** (`--node`): {in_node} workloads in node mode, "
            f"{len(plan.workloads) - in_node} kept in {_fallback(plan)} mode (see \"Node mode\"). "
            f"Install the node DaemonSet (`{NODE_MODE_MANIFEST}`) on every node first.",
        ]
    return lines


def _pod_templates(plan: Plan) -> list[str]:
    """The "What was generated" lines about pod templates, one per mode the run can write."""
    # The heading apart from the body: under --node the body goes under another heading.
    heading = "Pod template (CNI mode)" if plan.options.cni else "Pod template"
    body = (
        f'label `{USE_LABEL}: "true"`, annotation '
        f'`{REDIRECT_ANNOTATION}: "true"` (and `{CNI_PORT_ANNOTATION}` where the proxy cannot '
        f'listen on {CNI_DEFAULT_PORT}, `{CNI_PASSTHROUGH_ANNOTATION}: "none"` and '
        f"`{PASSTHROUGH_VARIABLE}=none` on the proxy where the pod does without pass-through), "
        f"the proxy `{PROXY_CONTAINER}` declared as the first init "
        f"container (a native sidecar), no `{INIT_CONTAINER}`, no `{INJECT_PROXY_ANNOTATION}`, "
        f'`serviceAccountName`; `{IDENTITY_BINDING_ANNOTATION}: "true"` where the FIC budget '
        f"calls for identity binding."
        if plan.options.cni
        else f'label `{USE_LABEL}: "true"`, annotations '
        f'`{INJECT_PROXY_ANNOTATION}: "true"` and `{PROXY_PORT_ANNOTATION}` where the pod keeps '
        f"pass-through and has one identity; otherwise our two containers declared instead, with "
        f'`{PASSTHROUGH_VARIABLE}=none` on both (see "Pass-through") or the identity map (see '
        f'"Identity maps"); `serviceAccountName`; `{IDENTITY_BINDING_ANNOTATION}: "true"` where '
        f"the FIC budget calls for identity binding."
    )
    if not plan.options.node:
        return [f"  - {heading}: {body}"]
    node = (
        f'  - Pod template (node mode): label `{USE_LABEL}: "true"` (the webhook still projects '
        f'the token), annotations `{NODE_PROXY_ANNOTATION}: "true"`, `{NODE_CLIENT_ID_ANNOTATION}` '
        f"(the default identity), `{NODE_TENANT_ID_ANNOTATION}` where the service account names a "
        f"tenant, `{NODE_IDENTITY_MAP_ANNOTATION}` (the identity map as JSON) for several "
        f"identities, `{CNI_PORT_ANNOTATION}` where the port is not {CNI_DEFAULT_PORT}, "
        f"`serviceAccountName`; no proxy, no init container, no `{INJECT_PROXY_ANNOTATION}`."
    )
    return [node, f'  - Pod template of workloads kept in {_fallback(plan)} mode (see "Node mode"): {body}']


def _passthrough_summary(plan: Plan) -> list[str]:
    with_proxy = [wp for wp in plan.workloads if not wp.node]
    if not with_proxy:
        return []
    kept = sum(1 for wp in with_proxy if wp.passthrough == "all")
    return [
        f"- **Pass-through to the node's IMDS**: {len(with_proxy) - kept} workloads do without it "
        f"(`{PASSTHROUGH_VARIABLE}=none`: no uid exempted from the redirect), {kept} keep it "
        '(see "Pass-through").'
    ]


def _generated(plan: Plan) -> list[str]:
    per_cluster = " (one directory per cluster)" if plan.multi_cluster else ""
    lines = [
        "## What was generated",
        "",
        f"- `manifests/`{per_cluster}: per namespace, the migrated workloads and their service "
        f"accounts (and identity map ConfigMaps); `_cluster/` holds cluster-scoped RBAC for "
        f"identity binding. Apply with `kubectl apply -R -f manifests/`.",
        *_pod_templates(plan),
        f"  - Service account: annotation `{CLIENT_ID_ANNOTATION}` (the default identity) and "
        f'label `{USE_LABEL}: "true"`. An exported service account is patched (its other '
        f"fields kept); a workload on `default` (or none) gets its own `<workload>-wi`, so that "
        f"the FIC's subject names that workload only.",
        "  - Fields the API server fills in (status, uid, resourceVersion, managedFields, "
        "last-applied-configuration, …) are removed so the files apply cleanly.",
        f"- `identity-maps/`{per_cluster}: the identity map of each workload that used several "
        f"identities (also in a ConfigMap under `manifests/`, mounted into its proxy; see "
        f'"Identity maps")'
        + ("; node-mode pods carry theirs in an annotation instead." if plan.options.node else "."),
        "- `fic-commands.sh`: `az identity federated-credential create` for each FIC "
        "(`set -euo pipefail`; review before running). `fics.json`: the same, with the budget "
        "and the identity bindings, for automation.",
        f"- `unchanged/`{per_cluster}: every other object of the export, written back as it was "
        f"(original text and comments where possible), grouped by input file.",
        "",
    ]
    if not plan.options.remove_binding_label:
        lines += [
            f"The `{model.BINDING_LABEL}` label is kept: pod identity keeps serving the pods "
            f"while you verify workload identity. Run again with `--remove-aadpodidbinding` at "
            f"cut-over.",
            "",
        ]
    else:
        lines += [
            f"Cut-over (`--remove-aadpodidbinding`): the `{model.BINDING_LABEL}` label is removed "
            f"from the pod templates, except where a selector still uses it (listed per "
            f"workload).",
            "",
        ]
    return lines


def _workloads(plan: Plan) -> list[str]:
    lines = ["## Workloads migrated", ""]
    if not plan.workloads:
        return [*lines, "None.", ""]
    headers = (["Cluster"] if plan.multi_cluster else []) + [
        "Workload",
        "Service account",
        "Default identity",
        "Other identities",
        *(["Mode"] if plan.options.node else []),
        "Pass-through",
        "Proxy port",
        "Credentials",
        "Notes",
    ]
    rows = []
    for wp in plan.workloads:
        sa_text = {
            "patch": f"{wp.service_account} (patched)",
            "create": f"{wp.service_account} (new)",
            "create-missing": f"{wp.service_account} (not in export, generated)",
        }[wp.sa_action]
        others = ", ".join(f"{b.pod_identity} ({b.identity.client_id})" for b in wp.identities[1:])
        notes = list(wp.notes)
        if wp.needs_identity_map:
            notes.append(f"default = first binding by name ({wp.default.binding}); identity map")
        if wp.label_kept_because:
            notes.append(f"{model.BINDING_LABEL} kept at cut-over: " + "; ".join(wp.label_kept_because))
        rows.append(
            [
                *_cluster_cols(plan, wp.cluster),
                f"`{wp.ref}`",
                sa_text,
                f"{wp.default.pod_identity} ({wp.default.identity.client_id})",
                others or "—",
                *([_MODE_NAMES[wp.mode]] if plan.options.node else []),
                "— (node)" if wp.node else wp.passthrough,
                wp.proxy_port,
                _mode(wp),
                "; ".join(notes) or "—",
            ]
        )
    return lines + _table(headers, rows)


def _identities(plan: Plan) -> list[str]:
    lines = ["## Pod identities found (AzureIdentity)", ""]
    if not plan.identity_rows:
        return [*lines, "None.", ""]
    headers = (["Cluster"] if plan.multi_cluster else []) + [
        "AzureIdentity",
        "Type",
        "Client ID",
        "Managed identity",
        "Bindings",
        "Migrated workloads",
        "Status",
    ]
    rows = []
    for row in plan.identity_rows:
        identity = row.pod_identity
        type_text = (
            model.IDENTITY_TYPES.get(identity.type, str(identity.type))
            if identity.type is not None
            else "unknown"
        )
        managed = f"{row.managed.name} (rg {row.managed.resource_group})" if row.managed else "—"
        rows.append(
            [
                *_cluster_cols(plan, row.cluster),
                f"`{identity.namespace}/{identity.name}`",
                f"{identity.type} ({type_text})",
                identity.client_id or "—",
                managed,
                ", ".join(row.bindings) or "—",
                ", ".join(row.used_by) or "—",
                "migratable" if row.problem is None else f"**not migratable**: {row.problem}",
            ]
        )
    return lines + _table(headers, rows)


def _budget(plan: Plan) -> list[str]:
    lines = [
        "## Federated identity credentials and the FIC budget",
        "",
        f"Each migrated workload needs, on each identity it uses, one FIC per cluster issuer "
        f"and subject `system:serviceaccount:NAMESPACE:SERVICEACCOUNT`, audience "
        f"`{FIC_AUDIENCE}`. Entra allows {plan.options.fic_limit} FICs per managed identity. "
        f"FIC names are `[CLUSTER-]NAMESPACE-SERVICEACCOUNT`, with characters other than "
        f"letters, digits, `-` and `_` replaced by `-` (and a hash suffix where needed to stay "
        f"unique and within 120 characters).",
        "",
        "The counts below are what *this* migration needs; they do not include FICs the "
        "identities already have. Check with "
        "`az identity federated-credential list --identity-name NAME -g RESOURCE_GROUP`.",
        "",
    ]
    if not plan.budget:
        return [*lines, "No identity is used by a migrated workload.", ""]
    headers = [
        "Managed identity",
        "Client ID",
        "AzureIdentity objects",
        "Needed",
        *(["Per cluster"] if plan.multi_cluster else []),
        "Planned FICs",
        "Status",
    ]
    rows = []
    for line in plan.budget:
        status = (
            "**over the limit**: identity binding for every workload using it"
            if line.over_limit
            else (
                "ok"
                if line.planned == line.needed
                else "ok (some of its workloads use identity binding for another identity)"
            )
        )
        shown = ", ".join(line.pod_identities[:4]) + (
            f" and {len(line.pod_identities) - 4} more" if len(line.pod_identities) > 4 else ""
        )
        rows.append(
            [
                line.identity.name,
                line.identity.client_id,
                shown,
                line.needed,
                *([", ".join(f"{c}: {n}" for c, n in line.per_cluster)] if plan.multi_cluster else []),
                line.planned,
                status,
            ]
        )
    return lines + _table(headers, rows)


def _identity_binding(plan: Plan) -> list[str]:
    if not plan.identity_bindings:
        return []
    lines = [
        "## Identity binding (AKS, preview)",
        "",
        "For identities over the FIC limit, the plan uses AKS identity binding instead of one FIC "
        f'per service account: those workloads get `{IDENTITY_BINDING_ANNOTATION}: "true"` and '
        "no per-service-account FIC commands. The webhook then points the pod's token requests "
        "at the cluster's token proxy (AZURE_KUBERNETES_TOKEN_PROXY, which azwi-netproxy "
        "follows). Because that applies to the whole pod, a workload that needs identity "
        "binding for one identity uses it for all of its identities.",
        "",
        "What it takes, per identity and cluster (not generated as commands, because the "
        "cluster's resource group and AKS name are not in the export):",
        "",
        "1. Register the `IdentityBindingPreview` feature and use an `aks-preview` CLI "
        "extension that has `az aks identity-binding`.",
        "2. `az aks identity-binding create -g CLUSTER_RESOURCE_GROUP --cluster-name CLUSTER "
        "-n NAME --managed-identity-resource-id RESOURCE_ID`. AKS itself creates the identity's "
        "one FIC for identity binding (`aks-identity-binding`, shared by all bindings of that "
        "identity); do not create or edit it by hand. Its issuer is the binding's own "
        "(`az aks identity-binding show … --query oidcIssuer`), not the cluster's.",
        "3. Apply the generated `ClusterRole`/`ClusterRoleBinding` (`manifests/…/_cluster/`), "
        "which grant the service accounts the `use-managed-identity` verb on the identity's "
        "client ID.",
        "",
    ]
    headers = (["Cluster"] if plan.multi_cluster else []) + [
        "Managed identity",
        "Resource ID",
        "Service accounts",
        "Workloads",
        "Why",
    ]
    rows = [
        [
            *_cluster_cols(plan, need.cluster),
            need.identity.name,
            need.identity.resource_id,
            ", ".join(f"{ns}/{sa}" for ns, sa in need.service_accounts),
            ", ".join(need.used_by),
            need.reason,
        ]
        for need in plan.identity_bindings
    ]
    return lines + _table(headers, rows)


def _identity_maps(plan: Plan) -> list[str]:
    with_map = [wp for wp in plan.workloads if wp.needs_identity_map]
    lines = ["## Identity maps (workloads that used several identities)", ""]
    if not with_map:
        return [
            *lines,
            "No migrated workload used several identities.",
            "",
            "A workload with one identity needs no map for `client_id` requests. If its app "
            "asks by `msi_res_id`/`mi_res_id`, give it a map (same format) mounted into a "
            "declared proxy, as `deploy/webhook/multi-identity.yaml` does.",
            "",
        ]
    images = f"`{plan.options.proxy_image}` and `{plan.options.proxy_init_image}`"
    default_images = (
        plan.options.proxy_image == DEFAULT_PROXY_IMAGE
        or plan.options.proxy_init_image == DEFAULT_PROXY_INIT_IMAGE
    )
    lines += [
        "Pod identity gave these pods several identities; a service account carries one "
        f"default client ID (`{CLIENT_ID_ANNOTATION}`). The plan picks the identity of the "
        "**first matching binding by name** as the default, deterministically, and lists all of "
        "them in an identity map (`onlyListed: true`, each with `clientID` and `resourceID`) so "
        "that requests naming a `client_id`, `msi_res_id` or `mi_res_id` keep working and any "
        "other identity is refused, as pod identity did. Every identity gets a FIC for the "
        "workload's service account. Each map was checked with the proxy's own parser.",
        "",
    ]
    if not all(wp.node for wp in with_map):
        lines += [
            *(_cni_map_delivery() if plan.options.cni else _init_map_delivery(plan, images, default_images)),
            "",
        ]
    if any(wp.node for wp in with_map):
        lines += [
            "**How the map reaches the node process.** A node-mode pod has no proxy to mount a map "
            f"into: the map is the pod's annotation `{NODE_IDENTITY_MAP_ANNOTATION}` (the same map "
            "as compact JSON, checked with the proxy's parser too), which the node process reads "
            "when the pod's sandbox is created. No ConfigMap is written for it.",
            "",
        ]
    headers = (["Cluster"] if plan.multi_cluster else []) + [
        "Workload",
        "Default",
        "All identities",
        "ConfigMap",
    ]
    rows = [
        [
            *_cluster_cols(plan, wp.cluster),
            f"`{wp.ref}`",
            f"{wp.default.pod_identity} (binding {wp.default.binding})",
            ", ".join(f"{b.pod_identity} ← {b.binding}" for b in wp.identities),
            f"— (annotation `{NODE_IDENTITY_MAP_ANNOTATION}`)" if wp.node else wp.configmap_name,
        ]
        for wp in with_map
    ]
    return lines + _table(headers, rows)


def _cni_map_delivery() -> list[str]:
    return [
        "**How the map reaches the proxy.** In CNI mode every migrated pod declares the proxy "
        f"itself (`{PROXY_CONTAINER}`, the first init container, a native sidecar); for these "
        f"workloads it also gets `AZWI_IDENTITY_MAP={MAP_DIR}/{MAP_KEY}` and the ConfigMap "
        "mounted read-only. The webhook still adds the `AZURE_*` variables and the projected "
        'token to every container, ours included (see "CNI mode").',
    ]


def _init_map_delivery(plan: Plan, images: str, default_images: bool) -> list[str]:
    return [
        "**How the map reaches the proxy.** The webhook injects its proxy sidecar with fixed "
        "arguments: it cannot be given a variable or a mount. So these workloads declare our two "
        f"containers themselves, under upstream's names: `{INIT_CONTAINER}` as the first init "
        f"container, and `{PROXY_CONTAINER}` with `AZWI_IDENTITY_MAP={MAP_DIR}/{MAP_KEY}` and the "
        f"ConfigMap mounted read-only; and they carry no `{INJECT_PROXY_ANNOTATION}` annotation "
        "(as `deploy/webhook/multi-identity.yaml` does). The webhook then injects no containers, "
        "and still adds the `AZURE_*` variables and the projected token to every container, ours "
        "included. This works with the AKS add-on, whose images cannot be changed, and whether "
        "the webhook would inject native or classic sidecars.",
        "",
        f"- Long-running workloads get `{PROXY_CONTAINER}` as their first container, with "
        "upstream's postStart probe, so the app starts once the proxy answers. Jobs, CronJobs "
        "and pods that are not restarted get it as a native sidecar (an init container with "
        "`restartPolicy: Always` and a startup probe; Kubernetes 1.29 or later), because a "
        "classic sidecar never exits and the Job would never complete.",
        f"- Images: {images}"
        + (
            ". Replace `myregistry.azurecr.io` with your registry, or run again with "
            "`--proxy-image` and `--proxy-init-image`."
            if default_images
            else "."
        )
        + " The init container runs as root with `NET_ADMIN` and `NET_RAW` only; the proxy "
        "as uid 1501, which the init container exempts from the redirect only where the pod keeps "
        'pass-through (see "Pass-through").',
        "- Workloads with one identity get no map: `client_id` requests need none (they keep "
        "the injected sidecar where they keep pass-through). If such an app asks by "
        "`msi_res_id`/`mi_res_id`, give it a map the same way.",
    ]


def _cni(plan: Plan) -> list[str]:
    """What CNI mode asks of the cluster before the manifests are applied."""
    if not plan.options.cni:
        return []
    images = f"`{plan.options.proxy_image}`"
    return [
        "## CNI mode (`--cni`)",
        "",
        f"The migrated pods carry no `{INIT_CONTAINER}` and ask for no capability: the annotation "
        f'`{REDIRECT_ANNOTATION}: "true"` asks the azwi-netproxy CNI plugin, chained after the '
        "cluster's network plugin on every node, to install the redirect in the pod's network "
        f"namespace while its sandbox is created (`{CNI_PORT_ANNOTATION}` names the proxy's port "
        f"where it is not {CNI_DEFAULT_PORT}). Our containers add nothing that the Pod Security "
        '"restricted" level forbids; your own containers are left as they were.',
        "",
        f"1. **Install the node agent first**: the DaemonSet `{NODE_AGENT_MANIFEST}` (in "
        "`kube-system`, with your registry and version in its image), and wait until it is ready "
        "on every node (`kubectl -n kube-system rollout status daemonset/azwi-netproxy-cni`). "
        "On a node without a running agent, a pod that asks for the redirect fails sandbox "
        "creation (the kubelet retries) rather than starting without it.",
        "2. The nodes need containerd or CRI-O passing pod annotations to chained plugins, and "
        '`nsenter` (util-linux); see deploy/README.md, "CNI mode".',
        f"3. Kubernetes 1.29 or later: `{PROXY_CONTAINER}` is the first init container with "
        "`restartPolicy: Always` (a native sidecar), so it is listening before any other "
        "container of the pod, your init containers included, is redirected to it.",
        f"4. Every migrated pod declares the proxy image {images}"
        + (
            ": replace `myregistry.azurecr.io` with your registry, or run again with `--proxy-image`."
            if plan.options.proxy_image == DEFAULT_PROXY_IMAGE
            else "."
        )
        + " The webhook (the `use` label) still adds the `AZURE_*` variables and the projected "
        f"token; no pod carries `{INJECT_PROXY_ANNOTATION}`, which would make the webhook add its "
        "privileged init container.",
        "",
    ]


def _node(plan: Plan) -> list[str]:
    """What node mode asks of the cluster, and which workloads it does not take."""
    if not plan.options.node:
        return []
    fallback = _fallback(plan)
    kept = [wp for wp in plan.workloads if not wp.node]
    lines = [
        "## Node mode (`--node`)",
        "",
        f"Node-mode pods carry no proxy and no init container, and ask for no capability. The "
        f'annotation `{NODE_PROXY_ANNOTATION}: "true"` asks the azwi-netproxy CNI plugin to install '
        "the redirect in the pod's network namespace with no uid exemption at all (every packet "
        "to 169.254.169.254 goes to the node process or is refused) while the sandbox is created, "
        "and the node process to listen on 127.0.0.1 in that namespace before the sandbox is "
        "ready. It answers as the sidecar does, with the pod's own projected service account token "
        "(read from the kubelet's pods directory), and never answers one pod with a token obtained "
        "for another.",
        "",
        f"1. **Install the node DaemonSet first**: `{NODE_MODE_MANIFEST}` (in `kube-system`, with "
        "your registry and version in its images; it is the CNI node agent of "
        f"`{NODE_AGENT_MANIFEST}` with the node process beside it, under the same name, so it "
        "replaces that DaemonSet and CNI-mode pods keep working), and wait until it is ready on every "
        "node (`kubectl -n kube-system rollout status daemonset/azwi-netproxy-cni`). Set its "
        "`AZURE_TENANT_ID` to the tenant of your identities. On a node without a running node "
        "process, a node-mode pod fails sandbox creation (the kubelet retries); a pod whose node "
        "process stops gets its IMDS connections refused, never the node's IMDS.",
        "2. The nodes need Linux 5.14 or later, containerd 1.6 or later or CRI-O 1.22 or later "
        "(they pass the pod's UID to the plugin), pod annotations passed to chained plugins, and "
        '`nsenter`; see deploy/README.md, "Node mode".',
        "3. **No pass-through.** The node process answers IMDS paths other than the token's "
        "(`/metadata/instance`, `/metadata/scheduledevents`, …) with 403: it would reach the "
        "node's IMDS from the node, not from the pod. Workloads whose pods show a sign of needing "
        f'those paths stay in {fallback} mode, with pass-through, below (see "Pass-through").',
        f"4. Workloads that need AKS identity binding stay in {fallback} mode too: the node "
        "process reads only a pod's annotations, not the token proxy settings the webhook gives "
        "the pod's containers.",
        "",
        *([] if kept else _signs_rule()),
    ]
    if not kept:
        return [*lines, "Every migrated workload is in node mode.", ""]
    headers = [*(["Cluster"] if plan.multi_cluster else []), "Workload", f"Kept in {fallback} mode because"]
    rows = [
        [*_cluster_cols(plan, wp.cluster), f"`{wp.ref}`", "; ".join(wp.mode_because) or "—"] for wp in kept
    ]
    return lines + _table(headers, rows)


def _passthrough(plan: Plan) -> list[str]:
    """Which workloads keep pass-through to the node's IMDS, why, and what the others got."""
    with_proxy = [wp for wp in plan.workloads if not wp.node]
    if not with_proxy:
        return []
    kept = [wp for wp in with_proxy if wp.passthrough == "all"]
    closed = [wp for wp in with_proxy if wp.passthrough == "none"]
    injected_before = [wp for wp in closed if not wp.needs_identity_map and not wp.cni]
    lines = [
        "## Pass-through (IMDS paths other than the token's)",
        "",
        "The proxy answers the token path itself and passes other IMDS paths (`/metadata/instance`, "
        "…) through to the real IMDS, as upstream's does. For that, the redirect exempts the "
        "proxy's uid (1501), and a container of the pod that runs as root can switch to that uid "
        "and reach the node's IMDS, and with it the managed identities of the node, which often "
        "still include every identity pod identity assigned there. Workloads that show no sign of "
        "needing those paths do without pass-through: "
        + (
            f'CNI mode writes the plugin\'s annotation `{CNI_PASSTHROUGH_ANNOTATION}: "none"` and '
            f"`{PASSTHROUGH_VARIABLE}=none` on the proxy"
            if plan.options.cni
            else f"`{PASSTHROUGH_VARIABLE}=none` is set on both of our containers, `{INIT_CONTAINER}` "
            f"and `{PROXY_CONTAINER}`"
        )
        + ". Then no uid is exempted, nothing in the pod reaches 169.254.169.254 but through the "
        "proxy, and the proxy answers other IMDS paths with 403.",
        "",
        *_signs_rule(),
    ]
    if injected_before and not plan.options.cni:
        images = f"`{plan.options.proxy_image}` and `{plan.options.proxy_init_image}`"
        lines += [
            "The webhook injects its containers with fixed settings, so a workload without "
            "pass-through declares our two containers itself, as one with several identities does "
            f'(see "Identity maps"), with images {images}'
            + (
                ": replace `myregistry.azurecr.io` with your registry, or run again with "
                "`--proxy-image` and `--proxy-init-image`"
                if plan.options.proxy_image == DEFAULT_PROXY_IMAGE
                or plan.options.proxy_init_image == DEFAULT_PROXY_INIT_IMAGE
                else ""
            )
            + f". Here that is {len(injected_before)} workloads that would otherwise get the injected "
            f"sidecar. Long-running ones get `{PROXY_CONTAINER}` as their first container, with "
            "upstream's postStart probe; Jobs, CronJobs and pods that are not restarted get it as a "
            "native sidecar (Kubernetes 1.29 or later), so that they can complete.",
            "",
        ]
    if not kept:
        return [*lines, "Every migrated workload with a proxy in the pod does without pass-through.", ""]
    headers = [*(["Cluster"] if plan.multi_cluster else []), "Workload", "Keeps pass-through because"]
    rows = [
        [*_cluster_cols(plan, wp.cluster), f"`{wp.ref}`", "; ".join(wp.passthrough_because)] for wp in kept
    ]
    return lines + _table(headers, rows)


def _mode_flags(plan: Plan) -> str:
    flags = (("--cni", plan.options.cni), ("--node", plan.options.node))
    return " ".join(flag for flag, given in flags if given)


def _signs_rule() -> list[str]:
    """How the plan reads a sign of needing instance metadata (signs.py), for the report."""
    return [
        "A **sign of needing instance metadata** is, in the workload's own containers (init "
        "containers included) or in a ConfigMap they take variables or volumes from: the address "
        "169.254.169.254 anywhere but directly before a path under `/metadata/identity` (the "
        "token path, which the proxy answers; a base URL may serve any path), or an IMDS path "
        "outside `/metadata/identity/` "
        "(`metadata/instance`, `metadata/scheduledevents`, `metadata/attested`, …). Only the "
        "export is read: images and Secrets are not. A workload matched by an "
        "AzurePodIdentityException used IMDS directly, and is not migrated at all. The pod "
        f'annotation `{CNI_PASSTHROUGH_ANNOTATION}` decides instead of the signs: `"all"` keeps '
        'pass-through, `"none"` closes it. Put it on a pod template in your export and run the '
        "migration again to choose yourself.",
        "",
    ]


def _next_steps(plan: Plan) -> list[str]:
    steps = [
        "Enable the OIDC issuer and workload identity on the cluster(s) "
        "(`az aks update --enable-oidc-issuer --enable-workload-identity`).",
        "Create the FICs: `./fic-commands.sh`"
        + (f" (with `{ISSUER_VARIABLE}` exported)" if any(f.issuer is None for f in plan.fics) else "")
        + "; and the identity bindings, if any. FICs take a few seconds to propagate.",
        *(
            [f"Install the node agent `{NODE_AGENT_MANIFEST}` and wait until it is ready on every node."]
            if plan.options.cni and not plan.options.node
            else []
        ),
        *(
            [
                f"Install the node DaemonSet `{NODE_MODE_MANIFEST}` and wait until it is ready on every "
                "node."
            ]
            if plan.options.node
            else []
        ),
        "Apply the manifests: `kubectl apply -R -f manifests/`"
        + (" (per cluster directory)" if plan.multi_cluster else "")
        + ". Bare Pods and Jobs must be deleted and re-created.",
        "Check that the pods have the proxy sidecar and get tokens (`kubectl logs POD -c "
        f"{PROXY_CONTAINER}`)"
        + (
            "; node-mode pods have none: the node process's log names each pod it answers "
            "(`kubectl -n kube-system logs daemonset/azwi-netproxy-cni -c node-proxy`)."
            if plan.options.node
            else "."
        ),
        "Cut-over: run again with `--remove-aadpodidbinding`"
        + (f" (and `{_mode_flags(plan)}`)" if _mode_flags(plan) else "")
        + ", apply, then delete the "
        "AzureIdentity, AzureIdentityBinding and AzurePodIdentityException objects (they are "
        "not copied to the output) and disable pod identity.",
    ]
    return [
        "## Order of operations",
        "",
        *(f"{number}. {step}" for number, step in enumerate(steps, start=1)),
        "",
    ]


def render_report(plan: Plan, files: Mapping[str, OutputFile]) -> str:
    lines = [TITLE, ""]
    lines += _summary(plan, files)
    lines += _generated(plan)
    lines += _workloads(plan)
    lines += ["## Not migrated", ""]
    lines += _findings(plan, plan.not_migrated, "Workload") if plan.not_migrated else ["None.", ""]
    lines += _identities(plan)
    lines += _budget(plan)
    lines += _identity_binding(plan)
    lines += _identity_maps(plan)
    lines += _cni(plan)
    lines += _node(plan)
    lines += _passthrough(plan)
    if plan.excepted:
        lines += ["## Matched by an AzurePodIdentityException", ""]
        lines += _findings(plan, plan.excepted, "Workload")
    if plan.omitted:
        lines += [
            "## Runtime objects left out",
            "",
            "Objects created by a migrated controller (ReplicaSets, Pods, Jobs): the controller "
            "re-creates them from the migrated template.",
            "",
        ]
        lines += _findings(plan, plan.omitted, "Object")
    if plan.warnings:
        lines += ["## Warnings", ""]
        lines += _findings(plan, plan.warnings, "Object")
    lines += _next_steps(plan)
    return "\n".join(lines).rstrip("\n") + "\n"
