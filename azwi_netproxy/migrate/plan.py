"""The migration plan: which workloads move to workload identity, how, and which FICs that takes.

Rules:
1. Pure: documents and options in, a `Plan` out. Everything the renderers and the report need
   is decided here, once; they only format it.
2. Deterministic: every list is sorted by stable keys, never by dict or set iteration order.
3. Conservative: a workload is migrated only when every identity it used can be migrated and
   nothing about its pods rules the proxy out; anything else is a `Finding` with the reason.

Pod identity semantics followed here (aad-pod-identity in namespaced mode):
a pod gets every AzureIdentity whose AzureIdentityBinding in the pod's namespace has a `selector`
equal to the pod's `aadpodidbinding` label; an AzurePodIdentityException in the namespace whose
`podLabels` share one label with the pod makes NMI pass the pod's requests to IMDS untouched.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from azwi_netproxy import __version__
from azwi_netproxy.migrate import model
from azwi_netproxy.migrate.model import (
    BINDING_LABEL,
    USER_ASSIGNED_MSI,
    Document,
    IdentityBinding,
    Inventory,
    PodIdentity,
    Workload,
)

FIC_LIMIT: Final = 20  # federated identity credentials per managed identity (Entra limit)
FIC_AUDIENCE: Final = "api://AzureADTokenExchange"
CLIENT_ID_ANNOTATION: Final = "azure.workload.identity/client-id"
ISSUER_VARIABLE: Final = "AKS_OIDC_ISSUER"

_GUID: Final = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
_UAMI_ID: Final = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourcegroups/(?P<rg>[^/]+)/providers/"
    r"microsoft\.managedidentity/userassignedidentities/(?P<name>[^/]+)/?$",
    re.I,
)
_OS_KEYS: Final = ("kubernetes.io/os", "beta.kubernetes.io/os")
_OUR_CONTAINERS: Final = ("azwi-proxy", "azwi-proxy-init")  # upstream's container names
_FIC_NAME_MAX: Final = 120
_DNS_SUBDOMAIN_MAX: Final = 253
# Labels the Job controller adds to a Job's pod template; they carry the old Job's UID.
JOB_GENERATED_LABELS: Final = (
    "controller-uid",
    "job-name",
    "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-name",
)


# deploy/'s example registry: the report says to replace it, or to pass --proxy-image.
DEFAULT_PROXY_IMAGE: Final = f"myregistry.azurecr.io/azwi-netproxy/proxy:{__version__}"
DEFAULT_PROXY_INIT_IMAGE: Final = f"myregistry.azurecr.io/azwi-netproxy/proxy-init:{__version__}"


@dataclass(frozen=True, slots=True)
class Options:
    proxy_port: int = 8000
    remove_binding_label: bool = False
    # Only workloads with several identities declare our containers; the others get them
    # from the webhook, with the images it is configured with.
    proxy_image: str = DEFAULT_PROXY_IMAGE
    proxy_init_image: str = DEFAULT_PROXY_INIT_IMAGE
    fic_limit: int = FIC_LIMIT
    # CNI mode (deploy/cni/): the node's chained plugin installs the redirect, so every pod
    # declares the proxy as a native sidecar and none needs the NET_ADMIN init container.
    cni: bool = False


@dataclass(frozen=True, slots=True)
class ClusterInput:
    name: str  # "" when a single cluster was given with positional paths
    issuer: str | None
    documents: tuple[Document, ...]


@dataclass(frozen=True, slots=True)
class ManagedIdentity:
    """A user-assigned managed identity in Azure (several AzureIdentity objects may name it)."""

    resource_id: str
    client_id: str
    subscription: str
    resource_group: str
    name: str

    @property
    def key(self) -> str:
        return self.resource_id.lower()


@dataclass(frozen=True, slots=True)
class BoundIdentity:
    """One identity of a workload: through which binding and AzureIdentity it came."""

    binding: str
    pod_identity: str
    identity: ManagedIdentity


SaAction = Literal["patch", "create", "create-missing"]


@dataclass(slots=True)
class WorkloadPlan:
    cluster: str
    workload: Workload
    identities: tuple[BoundIdentity, ...]  # the default (service account annotation) first
    service_account: str
    sa_action: SaAction
    sa_doc: Document | None  # the exported ServiceAccount we patch
    proxy_port: int
    remove_binding_label: bool
    # Why the aadpodidbinding label must stay although cut-over was asked for (or would be).
    label_kept_because: tuple[str, ...] = ()
    identity_binding: bool = False
    # The redirect comes from the CNI plugin (annotation) instead of the init container.
    cni: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def subject(self) -> str:
        return f"system:serviceaccount:{self.workload.namespace}:{self.service_account}"

    @property
    def default(self) -> BoundIdentity:
        return self.identities[0]

    @property
    def needs_identity_map(self) -> bool:
        return len(self.identities) > 1

    @property
    def ref(self) -> str:
        return self.workload.ref

    @property
    def configmap_name(self) -> str:
        """The ConfigMap that holds this workload's identity map."""
        return fit_name(
            f"azwi-identity-map-{self.workload.kind.lower()}-{self.workload.name}",
            _DNS_SUBDOMAIN_MAX,
        )


def rbac_name(identity: ManagedIdentity) -> str:
    """ClusterRole(Binding) that grants identity binding's use-managed-identity verb."""
    return f"use-mi-{identity.client_id}"


@dataclass(frozen=True, slots=True)
class Finding:
    cluster: str
    subject: str  # what it is about: "ns/Kind/name"
    where: str  # file:line of the document
    reason: str


@dataclass(frozen=True, slots=True)
class FederatedCredential:
    identity: ManagedIdentity
    cluster: str
    issuer: str | None  # None: the cluster's issuer was not given (shell variable in commands)
    subject: str
    name: str
    used_by: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BudgetLine:
    identity: ManagedIdentity
    pod_identities: tuple[str, ...]  # "cluster:ns/name" of the AzureIdentity objects naming it
    needed: int  # FICs if every workload used one per service account and cluster
    per_cluster: tuple[tuple[str, int], ...]
    planned: int  # FICs in the plan (0 when identity binding replaces them)
    over_limit: bool


@dataclass(frozen=True, slots=True)
class IdentityBindingNeed:
    identity: ManagedIdentity
    cluster: str
    service_accounts: tuple[tuple[str, str], ...]  # (namespace, name)
    used_by: tuple[str, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class IdentityRow:
    """One AzureIdentity of an export, for the report."""

    cluster: str
    pod_identity: PodIdentity
    managed: ManagedIdentity | None
    problem: str | None
    bindings: tuple[str, ...]
    used_by: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ClusterSummary:
    name: str
    issuer: str | None
    documents: int
    pod_identity_objects: int
    workloads_seen: int


@dataclass(slots=True)
class Plan:
    options: Options
    multi_cluster: bool
    clusters: list[ClusterSummary] = field(default_factory=list)
    workloads: list[WorkloadPlan] = field(default_factory=list)
    not_migrated: list[Finding] = field(default_factory=list)
    excepted: list[Finding] = field(default_factory=list)
    omitted: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    identity_rows: list[IdentityRow] = field(default_factory=list)
    fics: list[FederatedCredential] = field(default_factory=list)
    budget: list[BudgetLine] = field(default_factory=list)
    identity_bindings: list[IdentityBindingNeed] = field(default_factory=list)
    unchanged: dict[str, list[Document]] = field(default_factory=dict)

    def issuer_of(self, cluster: str) -> str | None:
        for summary in self.clusters:
            if summary.name == cluster:
                return summary.issuer
        return None


# ---------------------------------------------------------------------------- helpers


def parse_managed_identity(identity: PodIdentity) -> tuple[ManagedIdentity | None, str | None]:
    """The Azure identity an AzureIdentity names, or why it cannot be migrated."""
    if identity.type is None:
        return None, "spec.type is not 0, 1 or 2"
    if identity.type != USER_ASSIGNED_MSI:
        kind = model.IDENTITY_TYPES.get(identity.type, f"type {identity.type}")
        return None, (
            f"type {identity.type} ({kind}): workload identity federates managed identities and app "
            f"registrations, not secrets or certificates; move this workload to a user-assigned "
            f"managed identity (or an app registration with a federated credential) first"
        )
    if not identity.client_id or not _GUID.match(identity.client_id):
        return None, f"clientID {identity.client_id!r} is not a GUID"
    if not identity.resource_id:
        return None, "resourceID is missing (needed for the FIC's identity name and resource group)"
    match = _UAMI_ID.match(identity.resource_id)
    if match is None:
        return None, (
            f"resourceID {identity.resource_id!r} is not a user-assigned managed identity "
            f"(/subscriptions/…/resourceGroups/…/providers/Microsoft.ManagedIdentity/"
            f"userAssignedIdentities/NAME)"
        )
    return ManagedIdentity(
        resource_id=identity.resource_id.rstrip("/"),
        client_id=identity.client_id.lower(),
        subscription=match["sub"],
        resource_group=match["rg"],
        name=match["name"],
    ), None


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def fit_name(name: str, limit: int) -> str:
    """`name`, or a prefix of it plus a hash of the whole when it is longer than `limit`."""
    if len(name) <= limit:
        return name
    return name[: limit - 9].rstrip("-.") + "-" + _short_hash(name)


def fic_base_name(cluster: str, namespace: str, service_account: str) -> str:
    """A valid FIC name: 3-120 of [A-Za-z0-9_-], starting with a letter or digit."""
    raw = "-".join(part for part in (cluster, namespace, service_account) if part)
    name = re.sub(r"[^A-Za-z0-9_-]", "-", raw)
    if not name[:1].isalnum():
        name = "fic-" + name
    return fit_name(name, _FIC_NAME_MAX)


def is_windows(spec: Mapping[str, Any]) -> str | None:
    """Why the pod runs on Windows nodes, or None."""
    os_name = model.dig(spec, "os", "name")
    if isinstance(os_name, str) and os_name.lower() == "windows":
        return "spec.os.name is windows"
    selector = spec.get("nodeSelector")
    if isinstance(selector, dict):
        for key in _OS_KEYS:
            value = selector.get(key)
            if isinstance(value, str) and value.lower() == "windows":
                return f"nodeSelector {key}: {value}"
    terms = model.dig(
        spec,
        "affinity",
        "nodeAffinity",
        "requiredDuringSchedulingIgnoredDuringExecution",
        "nodeSelectorTerms",
    )
    if isinstance(terms, list) and terms:

        def windows_term(term: Any) -> bool:
            for expr in (term.get("matchExpressions") or []) if isinstance(term, dict) else []:
                if (
                    isinstance(expr, dict)
                    and expr.get("key") in _OS_KEYS
                    and expr.get("operator") == "In"
                    and [str(v).lower() for v in expr.get("values") or []] == ["windows"]
                ):
                    return True
            return False

        if all(windows_term(term) for term in terms):
            return "required node affinity kubernetes.io/os In [windows]"
    return None


def _declared_tcp_ports(workload: Workload) -> set[int]:
    ports: set[int] = set()
    for container in workload.containers():
        if container.get("name") in _OUR_CONTAINERS:
            continue  # a previous migration's (or the webhook's) proxy: replaced, not in the way
        for port in container.get("ports") or []:
            if not isinstance(port, dict):
                continue
            if str(port.get("protocol") or "TCP").upper() != "TCP":
                continue
            number = port.get("containerPort")
            if isinstance(number, int):
                ports.add(number)
    return ports


def _choose_port(wanted: int, taken: set[int]) -> int:
    port = wanted
    while port in taken and port < 65535:
        port += 1
    return port


def _label_references(doc: Document) -> Iterator[tuple[Mapping[str, Any] | None, str]]:
    """Every selector in `doc` that names the aadpodidbinding label, with its path.

    Yields the selector's labels (matchLabels, Service.spec.selector, …), or None for a
    matchExpressions term, which we do not evaluate. Object and pod-template labels are not
    selectors and are skipped.
    """

    def walk(node: Any, path: tuple[str, ...]) -> Iterator[tuple[Mapping[str, Any] | None, str]]:
        if isinstance(node, dict):
            if path[-2:] == ("metadata", "labels"):
                return
            if BINDING_LABEL in node and path and path[-1] != "labels":
                yield node, ".".join(path)
            if node.get("key") == BINDING_LABEL and "operator" in node:
                yield None, ".".join(path)
            for key, value in node.items():
                yield from walk(value, (*path, str(key)))
        elif isinstance(node, list):
            for number, value in enumerate(node):
                yield from walk(value, (*path, f"[{number}]"))

    yield from walk(doc.data, ())


def _selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Whether a selector naming aadpodidbinding selects pods with `labels` (None: assume so)."""
    if selector is None:
        return True
    return all(labels.get(str(key)) == value for key, value in selector.items())


def _sa_name_for(workload: Workload) -> str:
    return fit_name(f"{workload.name}-wi", _DNS_SUBDOMAIN_MAX)


# ---------------------------------------------------------------------------- planning


@dataclass(slots=True)
class _ClusterState:
    cluster: ClusterInput
    inventory: Inventory
    consumed: set[int] = field(default_factory=set)  # id() of documents not copied to unchanged/


def _plan_cluster(
    state: _ClusterState,
    plan: Plan,
    identities_by_key: dict[str, ManagedIdentity],
) -> list[WorkloadPlan]:
    cluster = state.cluster.name
    inv = state.inventory
    options = plan.options

    for doc in inv.pod_identity_docs:
        state.consumed.add(id(doc))

    # AzureIdentity objects, resolved to Azure identities.
    pod_identities: dict[tuple[str, str], tuple[PodIdentity, ManagedIdentity | None, str | None]] = {}
    for identity in sorted(inv.identities, key=lambda i: (i.namespace, i.name)):
        key = (identity.namespace, identity.name)
        if key in pod_identities:
            plan.warnings.append(
                Finding(
                    cluster,
                    f"{identity.namespace}/AzureIdentity/{identity.name}",
                    identity.where,
                    "defined twice in the export; the first definition is used",
                )
            )
            continue
        managed, problem = parse_managed_identity(identity)
        if managed is not None:
            known = identities_by_key.setdefault(managed.key, managed)
            if known.client_id != managed.client_id:
                managed, problem = (
                    None,
                    (
                        f"clientID {identity.client_id} differs from {known.client_id}, the clientID "
                        f"another AzureIdentity gives for the same resourceID"
                    ),
                )
            else:
                managed = known
        pod_identities[key] = (identity, managed, problem)

    bindings_by_selector: dict[tuple[str, str], list[IdentityBinding]] = defaultdict(list)
    for binding in sorted(inv.bindings, key=lambda b: (b.namespace, b.name)):
        if binding.selector is None:
            plan.warnings.append(
                Finding(
                    cluster,
                    f"{binding.namespace}/AzureIdentityBinding/{binding.name}",
                    binding.where,
                    "has no spec.selector: it matched no pod",
                )
            )
            continue
        if binding.identity is None:
            plan.warnings.append(
                Finding(
                    cluster,
                    f"{binding.namespace}/AzureIdentityBinding/{binding.name}",
                    binding.where,
                    "has no spec.azureIdentity: it gave no identity",
                )
            )
            continue
        if (binding.namespace, binding.identity) not in pod_identities:
            elsewhere = sorted(f"{ns}/{name}" for ns, name in pod_identities if name == binding.identity)
            hint = (
                f" (an AzureIdentity of that name exists in {', '.join(elsewhere)}: in namespaced "
                f"mode bindings only see identities of their own namespace)"
                if elsewhere
                else ""
            )
            plan.warnings.append(
                Finding(
                    cluster,
                    f"{binding.namespace}/AzureIdentityBinding/{binding.name}",
                    binding.where,
                    f"refers to AzureIdentity {binding.identity!r}, which is not in namespace "
                    f"{binding.namespace} of the export{hint}",
                )
            )
        bindings_by_selector[(binding.namespace, binding.selector)].append(binding)

    exceptions_by_ns: dict[str, list[model.PodIdentityException]] = defaultdict(list)
    for exception in sorted(inv.exceptions, key=lambda e: (e.namespace, e.name)):
        exceptions_by_ns[exception.namespace].append(exception)

    # Selectors elsewhere that name the aadpodidbinding label: removing it at cut-over would
    # silently empty them (Service endpoints, NetworkPolicies, PodDisruptionBudgets, …).
    # Objects created by a controller (ReplicaSets, …) copy their owner's selector: only the
    # owner's counts.
    references: dict[str, list[tuple[Mapping[str, Any] | None, str, Document]]] = defaultdict(list)
    for doc in inv.documents:
        if model.api_group(doc.data) == model.POD_IDENTITY_GROUP or model.metadata(doc.data).get(
            "ownerReferences"
        ):
            continue
        for selector_labels, path in _label_references(doc):
            label = f"{model.kind_of(doc.data)}/{model.name_of(doc.data)} {path}"
            references[model.namespace_of(doc.data)].append((selector_labels, label, doc))

    workload_keys = {(w.namespace, w.kind, w.name) for w in inv.workloads}
    used_bindings: set[tuple[str, str]] = set()
    candidates: list[WorkloadPlan] = []
    owned: list[Workload] = []

    seen_workloads: set[tuple[str, str, str]] = set()
    for workload in sorted(inv.workloads, key=lambda w: (w.namespace, w.kind, w.name)):
        labels = workload.pod_labels
        key3 = (workload.namespace, workload.kind, workload.name)
        if key3 in seen_workloads:
            # Copying the second definition to unchanged/ could undo the migration when both
            # are applied: leave it out and say so.
            state.consumed.add(id(workload.doc))
            plan.warnings.append(
                Finding(
                    cluster,
                    workload.ref,
                    workload.doc.where,
                    "defined twice in the export: the first definition is used, this one is left out",
                )
            )
            continue
        seen_workloads.add(key3)
        if model.api_group(workload.doc.data) == "extensions":
            plan.warnings.append(
                Finding(
                    cluster,
                    workload.ref,
                    workload.doc.where,
                    "uses the removed extensions API group: convert it to apps/v1 before applying",
                )
            )
        if workload.owner is not None:
            owned.append(workload)
            continue
        excepted_by = [e for e in exceptions_by_ns.get(workload.namespace, []) if e.matches(labels)]
        if excepted_by:
            names = ", ".join(f"{e.namespace}/{e.name}" for e in excepted_by)
            plan.excepted.append(
                Finding(
                    cluster,
                    workload.ref,
                    workload.doc.where,
                    f"matched by AzurePodIdentityException {names}: NMI passed its token requests to "
                    f"IMDS, so it used the node's (kubelet) identity, never a pod identity. Nothing to "
                    f"migrate; it is copied unchanged and keeps reaching IMDS directly once pod "
                    f"identity is gone.",
                )
            )
            continue
        selector = workload.binding_label
        if selector is None:
            continue  # not a pod identity workload: unchanged
        matching = bindings_by_selector.get((workload.namespace, selector), [])
        for binding in matching:
            used_bindings.add((binding.namespace, binding.name))

        reasons: list[str] = []
        if workload.pod_spec.get("hostNetwork") is True:
            reasons.append(
                "hostNetwork: true — no CNI plugin runs for a pod on the node's network, so the "
                "redirect would never be installed; use the Azure Identity SDK's workload identity "
                "credential in this workload instead"
                if options.cni
                else "hostNetwork: true — the proxy's init container would install its NAT redirect in "
                "the node's network namespace, redirecting every pod's and the node's IMDS traffic "
                "(the workload identity webhook refuses such pods for the same reason); use the "
                "Azure Identity SDK's workload identity credential in this workload instead"
            )
        windows = is_windows(workload.pod_spec)
        if windows is not None:
            reasons.append(
                f"runs on Windows nodes ({windows}): the proxy's iptables redirect does not exist "
                f"there; use the Azure Identity SDK's workload identity credential instead"
            )
        if not matching:
            reasons.append(
                f"label {BINDING_LABEL}={selector} matches no AzureIdentityBinding selector in "
                f"namespace {workload.namespace}: it had no pod identity to migrate"
            )
        bound: list[BoundIdentity] = []
        for binding in matching:
            assert binding.identity is not None  # filtered above
            entry = pod_identities.get((workload.namespace, binding.identity))
            if entry is None:
                reasons.append(
                    f"binding {binding.name} refers to AzureIdentity {binding.identity!r}, which "
                    f"is not in the export"
                )
                continue
            identity, managed, problem = entry
            if managed is None:
                reasons.append(f"AzureIdentity {identity.name} (binding {binding.name}): {problem}")
                continue
            if all(b.identity.key != managed.key for b in bound):
                bound.append(BoundIdentity(binding.name, identity.name, managed))
        if reasons:
            plan.not_migrated.append(Finding(cluster, workload.ref, workload.doc.where, "; ".join(reasons)))
            continue

        # The service account: patch the one it uses, or give it its own so that the FIC's
        # subject names this workload only (a FIC on `default` would serve every pod there).
        current_sa = workload.service_account
        notes: list[str] = []
        if current_sa in (None, "default"):
            sa_name = _sa_name_for(workload)
            notes.append(
                f"used the {'default' if current_sa else 'implicit default'} service account: "
                f"now uses its own, {sa_name}"
            )
        else:
            sa_name = current_sa
        sa_doc = inv.service_accounts.get((workload.namespace, sa_name))
        action: SaAction
        if sa_doc is not None:
            action = "patch"
            existing = model.dig(sa_doc.data, "metadata", "annotations", CLIENT_ID_ANNOTATION)
            if existing and str(existing).lower() != bound[0].identity.client_id:
                notes.append(
                    f"service account {sa_name} had {CLIENT_ID_ANNOTATION} {existing}: replaced "
                    f"by {bound[0].identity.client_id}"
                )
        elif sa_name != current_sa:
            action = "create"
        else:
            action = "create-missing"
            notes.append(
                f"service account {sa_name} is not in the export: a minimal one is generated "
                f"(kubectl apply merges the annotation into an existing one)"
            )

        taken = _declared_tcp_ports(workload)
        port = _choose_port(options.proxy_port, taken)
        if port != options.proxy_port:
            notes.append(
                f"a container declares port {options.proxy_port}: the proxy listens on {port} instead"
            )

        # Removing the label at cut-over would change what these selectors select.
        kept: list[str] = []
        for selector_labels, label, doc in references.get(workload.namespace, []):
            if _selects(selector_labels, labels):
                own = doc is workload.doc
                kept.append(f"its own {label.split(' ', 1)[1]}" if own else label)
        if workload.kind == "Pod":
            notes.append("a bare Pod: delete and re-create it to apply (its spec is immutable)")
        if workload.kind == "Job":
            notes.append(
                "a Job: its pod template is immutable, delete and re-create it (or leave a "
                "finished Job alone)"
            )
        candidates.append(
            WorkloadPlan(
                cluster=cluster,
                workload=workload,
                identities=tuple(bound),
                service_account=sa_name,
                sa_action=action,
                sa_doc=sa_doc,
                proxy_port=port,
                remove_binding_label=options.remove_binding_label and not kept,
                label_kept_because=tuple(sorted(set(kept))),
                cni=options.cni,
                notes=notes,
            )
        )

    # One service account carries one default client ID, and a FIC on it serves every pod using
    # it: workloads sharing a service account must agree on their identities.
    by_sa: dict[tuple[str, str], list[WorkloadPlan]] = defaultdict(list)
    for candidate in candidates:
        by_sa[(candidate.workload.namespace, candidate.service_account)].append(candidate)
    migrated: list[WorkloadPlan] = []
    for (namespace, sa_name), group in sorted(by_sa.items()):
        variants = {tuple(b.identity.key for b in c.identities) for c in group}
        if len(variants) == 1:
            migrated.extend(group)
            continue
        described = "; ".join(
            f"{c.workload.kind}/{c.workload.name} uses " + ", ".join(b.pod_identity for b in c.identities)
            for c in group
        )
        for candidate in group:
            plan.not_migrated.append(
                Finding(
                    cluster,
                    candidate.ref,
                    candidate.workload.doc.where,
                    f"shares service account {namespace}/{sa_name} with workloads that use other "
                    f"identities ({described}): one service account carries one default client ID "
                    f"and its FICs serve every pod using it. Give these workloads their own service "
                    f"accounts (or the same bindings) and run the migration again",
                )
            )

    # Objects created by a migrated controller, directly or through another one (Deployment →
    # ReplicaSet → Pod), are left out: the controller re-creates them from the new template.
    replaced = {(p.workload.namespace, p.workload.kind, p.workload.name) for p in migrated}
    remaining = list(owned)
    changed = True
    while changed:
        changed = False
        for workload in list(remaining):
            assert workload.owner is not None
            if (workload.namespace, workload.owner.kind, workload.owner.name) in replaced:
                replaced.add((workload.namespace, workload.kind, workload.name))
                remaining.remove(workload)
                state.consumed.add(id(workload.doc))
                plan.omitted.append(
                    Finding(
                        cluster,
                        workload.ref,
                        workload.doc.where,
                        f"created by {workload.owner.kind}/{workload.owner.name}, which is migrated "
                        f"(or created by one that is): its controller re-creates it",
                    )
                )
                changed = True
    for workload in remaining:
        assert workload.owner is not None
        owner_key = (workload.namespace, workload.owner.kind, workload.owner.name)
        owner_ref = f"{workload.owner.kind}/{workload.owner.name}"
        if workload.binding_label is not None and owner_key not in workload_keys:
            plan.not_migrated.append(
                Finding(
                    cluster,
                    workload.ref,
                    workload.doc.where,
                    f"created by {owner_ref}, which is not in the export: export and migrate "
                    f"{owner_ref} itself (this object is copied unchanged)",
                )
            )

    for plan_ in migrated:
        state.consumed.add(id(plan_.workload.doc))
        if plan_.sa_doc is not None:
            state.consumed.add(id(plan_.sa_doc))

    # A FIC trusts every pod that runs as its service account, where pod identity looked at the
    # pod's label: other workloads on a migrated service account gain its identities.
    migrated_sas: dict[tuple[str, str], list[WorkloadPlan]] = defaultdict(list)
    for plan_ in migrated:
        migrated_sas[(plan_.workload.namespace, plan_.service_account)].append(plan_)
    migrated_docs = {id(p.workload.doc) for p in migrated}
    for workload in sorted(inv.workloads, key=lambda w: (w.namespace, w.kind, w.name)):
        if workload.owner is not None or id(workload.doc) in migrated_docs:
            continue
        users_of_sa = migrated_sas.get((workload.namespace, workload.service_account or "default"))
        if users_of_sa:
            identities_text = ", ".join(b.pod_identity for b in users_of_sa[0].identities)
            plan.warnings.append(
                Finding(
                    cluster,
                    workload.ref,
                    workload.doc.where,
                    f"is not migrated but runs as service account {workload.service_account}, which "
                    f"the migration federates with {identities_text}: once the FICs exist, its pods "
                    f"can get those identities' tokens. Give it another service account if it must "
                    f"not",
                )
            )

    # The identities table of the report.
    users: dict[tuple[str, str], list[str]] = defaultdict(list)
    for plan_ in migrated:
        for bound_identity in plan_.identities:
            users[(plan_.workload.namespace, bound_identity.pod_identity)].append(plan_.ref)
    bindings_of: dict[tuple[str, str], list[str]] = defaultdict(list)
    for binding in inv.bindings:
        if binding.identity is not None:
            bindings_of[(binding.namespace, binding.identity)].append(binding.name)
    for (namespace, name), (identity, managed, problem) in sorted(pod_identities.items()):
        plan.identity_rows.append(
            IdentityRow(
                cluster,
                identity,
                managed,
                problem,
                tuple(sorted(bindings_of.get((namespace, name), []))),
                tuple(sorted(users.get((namespace, name), []))),
            )
        )
        if not bindings_of.get((namespace, name)):
            plan.warnings.append(
                Finding(
                    cluster,
                    f"{namespace}/AzureIdentity/{name}",
                    identity.where,
                    "no AzureIdentityBinding refers to it: no pod used it",
                )
            )
    for binding in sorted(inv.bindings, key=lambda b: (b.namespace, b.name)):
        if (
            binding.selector is not None
            and binding.identity is not None
            and ((binding.namespace, binding.name) not in used_bindings)
        ):
            plan.warnings.append(
                Finding(
                    cluster,
                    f"{binding.namespace}/AzureIdentityBinding/{binding.name}",
                    binding.where,
                    f"no workload in the export has the label {BINDING_LABEL}={binding.selector}",
                )
            )
    return migrated


def _budget(plan: Plan, rows_by_key: Mapping[str, list[str]]) -> None:
    """Count FICs per identity, switch over-limit identities to identity binding, name the FICs."""
    subjects: dict[str, dict[tuple[str, str], list[WorkloadPlan]]] = defaultdict(lambda: defaultdict(list))
    identities: dict[str, ManagedIdentity] = {}
    for wp in plan.workloads:
        for bound in wp.identities:
            identities[bound.identity.key] = bound.identity
            subjects[bound.identity.key][(wp.cluster, wp.subject)].append(wp)

    over = {key for key, per_subject in subjects.items() if len(per_subject) > plan.options.fic_limit}
    # Identity binding is a property of the pod (the webhook points all of its token requests at
    # the cluster's token proxy), so a workload that needs it for one identity uses it for all.
    for wp in plan.workloads:
        if any(b.identity.key in over for b in wp.identities):
            wp.identity_binding = True

    planned: dict[str, int] = defaultdict(int)
    fic_entries: dict[tuple[str, str, str], list[WorkloadPlan]] = defaultdict(list)
    for wp in plan.workloads:
        if wp.identity_binding:
            continue
        for bound in wp.identities:
            fic_entries[(bound.identity.key, wp.cluster, wp.subject)].append(wp)

    names_per_identity: dict[str, set[str]] = defaultdict(set)
    for (key, cluster, subject), users in sorted(fic_entries.items()):
        identity = identities[key]
        namespace, sa_name = subject.split(":")[2:4]
        name = fic_base_name(cluster, namespace, sa_name)
        if name in names_per_identity[key]:
            name = fit_name(f"{name}-{_short_hash(cluster + subject)}", _FIC_NAME_MAX)
        names_per_identity[key].add(name)
        planned[key] += 1
        plan.fics.append(
            FederatedCredential(
                identity=identity,
                cluster=cluster,
                issuer=plan.issuer_of(cluster),
                subject=subject,
                name=name,
                used_by=tuple(sorted({u.ref for u in users})),
            )
        )

    plan.fics.sort(key=lambda f: (f.identity.name.lower(), f.identity.key, f.cluster, f.subject))
    for key in sorted(subjects, key=lambda k: (identities[k].name.lower(), k)):
        per_cluster: dict[str, int] = defaultdict(int)
        for cluster, _subject in subjects[key]:
            per_cluster[cluster] += 1
        plan.budget.append(
            BudgetLine(
                identity=identities[key],
                pod_identities=tuple(sorted(set(rows_by_key.get(key, [])))),
                needed=len(subjects[key]),
                per_cluster=tuple(sorted(per_cluster.items())),
                planned=planned.get(key, 0),
                over_limit=key in over,
            )
        )

    needs: dict[tuple[str, str], list[WorkloadPlan]] = defaultdict(list)
    for wp in plan.workloads:
        if wp.identity_binding:
            for bound in wp.identities:
                needs[(bound.identity.key, wp.cluster)].append(wp)
    for (key, cluster), users in sorted(needs.items()):
        reason = (
            f"needs {len(subjects[key])} FICs, over the limit of {plan.options.fic_limit}"
            if key in over
            else "used by a workload that needs identity binding for another identity"
        )
        plan.identity_bindings.append(
            IdentityBindingNeed(
                identity=identities[key],
                cluster=cluster,
                service_accounts=tuple(sorted({(u.workload.namespace, u.service_account) for u in users})),
                used_by=tuple(sorted({u.ref for u in users})),
                reason=reason,
            )
        )


def build_plan(clusters: Sequence[ClusterInput], options: Options) -> Plan:
    """Plan the migration of one or more clusters' exports.

    Raises:
        ConfigError: a document Kubernetes would not accept (see model.classify).
    """
    plan = Plan(options=options, multi_cluster=any(c.name for c in clusters))
    identities_by_key: dict[str, ManagedIdentity] = {}
    states: list[_ClusterState] = []
    for cluster in clusters:
        state = _ClusterState(cluster, model.classify(list(cluster.documents)))
        states.append(state)
        plan.clusters.append(
            ClusterSummary(
                name=cluster.name,
                issuer=cluster.issuer,
                documents=len(cluster.documents),
                pod_identity_objects=len(state.inventory.pod_identity_docs),
                workloads_seen=len(state.inventory.workloads),
            )
        )
    for state in states:
        plan.workloads.extend(_plan_cluster(state, plan, identities_by_key))
        for doc in state.inventory.documents:
            if not model.metadata(doc.data).get("namespace") and model.is_workload(doc.data):
                plan.warnings.append(
                    Finding(
                        state.cluster.name,
                        f"{model.kind_of(doc.data)}/{model.name_of(doc.data)}",
                        doc.where,
                        "has no metadata.namespace: taken to be in namespace default",
                    )
                )

    rows_by_key: dict[str, list[str]] = defaultdict(list)
    for row in plan.identity_rows:
        if row.managed is not None:
            prefix = f"{row.cluster}:" if row.cluster else ""
            rows_by_key[row.managed.key].append(
                f"{prefix}{row.pod_identity.namespace}/{row.pod_identity.name}"
            )
    plan.workloads.sort(key=lambda w: (w.cluster, w.workload.namespace, w.workload.kind, w.workload.name))
    _budget(plan, rows_by_key)

    # Objects we generate replace same-named ones of the input (a re-export of a previous
    # migration): copying those to unchanged/ as well would apply two versions.
    generated: dict[str, set[tuple[str, str, str]]] = defaultdict(set)
    for wp in plan.workloads:
        if wp.needs_identity_map:
            generated[wp.cluster].add(("ConfigMap", wp.workload.namespace, wp.configmap_name))
    for need in plan.identity_bindings:
        for kind in ("ClusterRole", "ClusterRoleBinding"):
            generated[need.cluster].add((kind, "", rbac_name(need.identity)))
    for state in states:
        ours = generated[state.cluster.name]
        for doc in state.inventory.documents:
            kind = model.kind_of(doc.data)
            namespace = "" if kind.startswith("Cluster") else model.namespace_of(doc.data)
            if (kind, namespace, model.name_of(doc.data)) in ours:
                state.consumed.add(id(doc))
        plan.unchanged[state.cluster.name] = [
            doc for doc in state.inventory.documents if id(doc) not in state.consumed
        ]
    for findings in (plan.not_migrated, plan.excepted, plan.omitted, plan.warnings):
        findings.sort(key=lambda f: (f.cluster, f.subject, f.reason))
    return plan
