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
    PodIdentityException,
    Workload,
)
from azwi_netproxy.migrate.signs import (
    OUR_CONTAINERS,
    ConfigMaps,
    explicit_choice,
    explicit_policy,
    metadata_use,
)
from azwi_netproxy.settings import CNI_PASSTHROUGH_ANNOTATION
from azwi_netproxy.settings import PassthroughPolicy as Passthrough

FIC_LIMIT: Final = 20  # federated identity credentials per managed identity (Entra limit)
FIC_AUDIENCE: Final = "api://AzureADTokenExchange"
CLIENT_ID_ANNOTATION: Final = "azure.workload.identity/client-id"
# The webhook gives the sidecar this tenant (else its own default); node mode's pods carry it.
TENANT_ID_ANNOTATION: Final = "azure.workload.identity/tenant-id"
ISSUER_VARIABLE: Final = "AKS_OIDC_ISSUER"

_GUID: Final = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
_UAMI_ID: Final = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourcegroups/(?P<rg>[^/]+)/providers/"
    r"microsoft\.managedidentity/userassignedidentities/(?P<name>[^/]+)/?$",
    re.I,
)
_OS_KEYS: Final = ("kubernetes.io/os", "beta.kubernetes.io/os")
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
    # Node mode (deploy/node/): one process per node answers the pods' IMDS; pods carry
    # annotations and no proxy. Workloads it cannot serve keep the other mode (cni or sidecar).
    node: bool = False

    @property
    def fallback_mode(self) -> Mode:
        """The mode of workloads that node mode does not take (and of all without --node)."""
        return "cni" if self.cni else "sidecar"


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
# How a workload's pods get their proxy (the phase choose_mode decides, per workload).
Mode = Literal["sidecar", "cni", "node"]


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
    # How the pods get their proxy (choose_mode): "sidecar" (the init container and the proxy,
    # injected or declared), "cni" (the plugin's redirect and the proxy as a native sidecar) or
    # "node" (the plugin's redirect to the node's process: annotations only).
    mode: Mode = "sidecar"
    # Pass-through to the node's IMDS for paths other than the token's (signs.py). In node
    # mode it is the node's setting (off by default), never the pod's.
    passthrough: Passthrough = "all"
    passthrough_because: tuple[str, ...] = ()  # what decided (signs.py); empty: no sign found
    mode_because: tuple[str, ...] = ()  # under --node: why this workload is not in node mode
    tenant_id: str | None = None  # the exported service account's tenant-id annotation
    notes: list[str] = field(default_factory=list)

    @property
    def cni(self) -> bool:
        """The redirect comes from the CNI plugin to the pod's own proxy (CNI mode)."""
        return self.mode == "cni"

    @property
    def node(self) -> bool:
        """The node's process answers the pod's IMDS (node mode): no proxy in the pod."""
        return self.mode == "node"

    @property
    def declares_proxy(self) -> bool:
        """Whether the pod declares our containers instead of asking the webhook to inject them.

        The webhook injects its containers with fixed arguments and environment: it cannot give
        the proxy an identity map, nor either container AZWI_PASSTHROUGH=none. CNI mode always
        declares the proxy (the webhook would bring its NET_ADMIN init container); node mode
        declares nothing.
        """
        return not self.node and (self.cni or self.needs_identity_map or self.passthrough == "none")

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
        if container.get("name") in OUR_CONTAINERS:
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


# ---------------------------------------------------------------------------- planning phases
#
# `_plan_cluster` runs these phases in order for each cluster, and `build_plan` then runs
# `fic_budget` across all of them. Each phase is a function of what the earlier ones found and
# returns its own result with its findings, so that each can be tested alone
# (tests/test_migrate_model.py). In order:
#
#   read_objects                  which workloads to consider; duplicates, runtime objects
#   resolve_identities            AzureIdentity → managed identity; bindings by selector
#   workload_identities           one workload's identities, or why it has none we can migrate
#   choose_mode                   sidecar, CNI or node mode for one workload, and pass-through
#   blockers                      what rules the proxy out for one workload in its mode
#   service_account_for           the service account that will carry the FIC subject
#   proxy_port_for                a port no container of the pod declares
#   label_selectors,              selectors naming aadpodidbinding, and which of them removing
#   selectors_emptied_by_cut_over   the label at cut-over would empty for one workload
#   agree_on_service_accounts     workloads sharing a service account must share identities
#   leave_out_runtime_objects     objects a migrated controller re-creates
#   service_account_warnings      other workloads that gain identities through a migrated SA
#   identity_table                the report's AzureIdentity rows, unused identities/bindings
#   fic_budget                    FICs per identity; identity binding over the limit
#   modes_after_budget            node mode gives way where identity binding is needed


IdentityEntry = tuple[PodIdentity, ManagedIdentity | None, str | None]


@dataclass(frozen=True, slots=True)
class ClusterObjects:
    """Phase `read_objects`: the export's workloads sorted into what the next phases look at."""

    workloads: tuple[Workload, ...]  # no owner, first definition of each, sorted by ns/kind/name
    owned: tuple[Workload, ...]  # created by a controller (ownerReferences), sorted likewise
    keys: frozenset[tuple[str, str, str]]  # (namespace, kind, name) of every workload exported
    exceptions: Mapping[str, tuple[PodIdentityException, ...]]  # by namespace, sorted by name
    not_copied: tuple[Document, ...]  # pod identity's own resources and second definitions
    warnings: tuple[Finding, ...]


def read_objects(inventory: Inventory, cluster: str) -> ClusterObjects:
    """Which workloads the plan considers, and which documents never go to unchanged/."""
    not_copied: list[Document] = list(inventory.pod_identity_docs)
    warnings: list[Finding] = []
    workloads: list[Workload] = []
    owned: list[Workload] = []
    seen: set[tuple[str, str, str]] = set()
    for workload in sorted(inventory.workloads, key=lambda w: (w.namespace, w.kind, w.name)):
        key = (workload.namespace, workload.kind, workload.name)
        if key in seen:
            # Copying the second definition to unchanged/ could undo the migration when both
            # are applied: leave it out and say so.
            not_copied.append(workload.doc)
            warnings.append(
                Finding(
                    cluster,
                    workload.ref,
                    workload.doc.where,
                    "defined twice in the export: the first definition is used, this one is left out",
                )
            )
            continue
        seen.add(key)
        if model.api_group(workload.doc.data) == "extensions":
            warnings.append(
                Finding(
                    cluster,
                    workload.ref,
                    workload.doc.where,
                    "uses the removed extensions API group: convert it to apps/v1 before applying",
                )
            )
        (owned if workload.owner is not None else workloads).append(workload)
    for doc in inventory.documents:
        if not model.metadata(doc.data).get("namespace") and model.is_workload(doc.data):
            warnings.append(
                Finding(
                    cluster,
                    f"{model.kind_of(doc.data)}/{model.name_of(doc.data)}",
                    doc.where,
                    "has no metadata.namespace: taken to be in namespace default",
                )
            )
    exceptions: dict[str, list[PodIdentityException]] = defaultdict(list)
    for exception in sorted(inventory.exceptions, key=lambda e: (e.namespace, e.name)):
        exceptions[exception.namespace].append(exception)
    return ClusterObjects(
        workloads=tuple(workloads),
        owned=tuple(owned),
        keys=frozenset((w.namespace, w.kind, w.name) for w in inventory.workloads),
        exceptions={ns: tuple(found) for ns, found in exceptions.items()},
        not_copied=tuple(not_copied),
        warnings=tuple(warnings),
    )


def excepted_by(workload: Workload, objects: ClusterObjects) -> tuple[PodIdentityException, ...]:
    """The AzurePodIdentityExceptions of the workload's namespace that match its pods."""
    return tuple(
        e for e in objects.exceptions.get(workload.namespace, ()) if e.matches(workload.pod_labels)
    )


@dataclass(frozen=True, slots=True)
class ResolvedIdentities:
    """Phase `resolve_identities`: AzureIdentity objects as Azure identities, bindings by selector."""

    # (namespace, name) → (the AzureIdentity, its managed identity or None, why None)
    pod_identities: Mapping[tuple[str, str], IdentityEntry]
    # (namespace, selector) → the bindings with that selector and an identity, sorted by name
    bindings: Mapping[tuple[str, str], tuple[IdentityBinding, ...]]
    warnings: tuple[Finding, ...]


def resolve_identities(
    inventory: Inventory, cluster: str, known: dict[str, ManagedIdentity]
) -> ResolvedIdentities:
    """Resolve every AzureIdentity and index the bindings that can give one.

    `known` holds the managed identities seen so far, across clusters, by resource ID: the
    first clientID given for a resource ID wins, and this phase adds the new ones to it.
    """
    warnings: list[Finding] = []
    pod_identities: dict[tuple[str, str], IdentityEntry] = {}
    for identity in sorted(inventory.identities, key=lambda i: (i.namespace, i.name)):
        key = (identity.namespace, identity.name)
        if key in pod_identities:
            warnings.append(
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
            first = known.setdefault(managed.key, managed)
            if first.client_id != managed.client_id:
                managed, problem = (
                    None,
                    (
                        f"clientID {identity.client_id} differs from {first.client_id}, the clientID "
                        f"another AzureIdentity gives for the same resourceID"
                    ),
                )
            else:
                managed = first
        pod_identities[key] = (identity, managed, problem)

    bindings: dict[tuple[str, str], list[IdentityBinding]] = defaultdict(list)
    for binding in sorted(inventory.bindings, key=lambda b: (b.namespace, b.name)):
        subject = f"{binding.namespace}/AzureIdentityBinding/{binding.name}"
        if binding.selector is None:
            warnings.append(
                Finding(cluster, subject, binding.where, "has no spec.selector: it matched no pod")
            )
            continue
        if binding.identity is None:
            warnings.append(
                Finding(cluster, subject, binding.where, "has no spec.azureIdentity: it gave no identity")
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
            warnings.append(
                Finding(
                    cluster,
                    subject,
                    binding.where,
                    f"refers to AzureIdentity {binding.identity!r}, which is not in namespace "
                    f"{binding.namespace} of the export{hint}",
                )
            )
        bindings[(binding.namespace, binding.selector)].append(binding)
    return ResolvedIdentities(
        pod_identities=pod_identities,
        bindings={key: tuple(found) for key, found in bindings.items()},
        warnings=tuple(warnings),
    )


@dataclass(frozen=True, slots=True)
class WorkloadIdentities:
    """Phase `workload_identities`: what pod identity gave one workload's pods."""

    bound: tuple[BoundIdentity, ...]  # in binding-name order: the first is the default
    problems: tuple[str, ...]  # why some identity cannot be migrated (empty: all can)
    bindings_used: tuple[tuple[str, str], ...]  # (namespace, name) of the bindings that match


def workload_identities(workload: Workload, resolved: ResolvedIdentities) -> WorkloadIdentities:
    """The identities of a workload's pods through their `aadpodidbinding` label (namespaced mode)."""
    selector = workload.binding_label
    matching = resolved.bindings.get((workload.namespace, selector), ()) if selector is not None else ()
    problems: list[str] = []
    if not matching:
        problems.append(
            f"label {BINDING_LABEL}={selector} matches no AzureIdentityBinding selector in "
            f"namespace {workload.namespace}: it had no pod identity to migrate"
        )
    bound: list[BoundIdentity] = []
    for binding in matching:
        assert binding.identity is not None  # resolve_identities indexes only bindings with one
        entry = resolved.pod_identities.get((workload.namespace, binding.identity))
        if entry is None:
            problems.append(
                f"binding {binding.name} refers to AzureIdentity {binding.identity!r}, which "
                f"is not in the export"
            )
            continue
        identity, managed, problem = entry
        if managed is None:
            problems.append(f"AzureIdentity {identity.name} (binding {binding.name}): {problem}")
            continue
        if all(b.identity.key != managed.key for b in bound):
            bound.append(BoundIdentity(binding.name, identity.name, managed))
    return WorkloadIdentities(
        bound=tuple(bound),
        problems=tuple(problems),
        bindings_used=tuple((b.namespace, b.name) for b in matching),
    )


@dataclass(frozen=True, slots=True)
class ModeChoice:
    """Phase `choose_mode`: how one workload's pods get their proxy, and pass-through."""

    mode: Mode
    passthrough: Passthrough
    because: tuple[str, ...]  # what decided pass-through: the pod's annotation or the signs (signs.py)
    overridden: tuple[str, ...] = ()  # signs that the annotation's "none" overrides


def choose_mode(workload: Workload, options: Options, config_maps: ConfigMaps) -> ModeChoice:
    """The mode that fits the workload, and its pass-through, from the options and its pods.

    Pass-through is what keeps a door in the redirect: the init container (or the CNI plugin)
    exempts the proxy's uid so that the proxy can reach the real IMDS, and any root container
    of the pod can switch to that uid and reach the node's identities (issue 25). A workload
    with no sign of needing IMDS beyond tokens (signs.py) gets `none`: no uid is exempted.
    Node mode has no pass-through at all (the node's IMDS is the node's, and pass-through from
    the node would bypass a cluster's block on link-local addresses), so under --node a
    workload with a sign keeps the other mode, with pass-through, and the report says which
    sign.
    """
    use = metadata_use(workload, config_maps)
    if options.node and not use.needs_passthrough:
        return ModeChoice("node", "none", (), use.overridden)
    mode = options.fallback_mode
    return ModeChoice(mode, "all" if use.needs_passthrough else "none", use.because, use.overridden)


def blockers(workload: Workload, mode: Mode) -> list[str]:
    """What about the workload's pods rules the proxy out in `mode` (empty: nothing)."""
    reasons: list[str] = []
    if workload.pod_spec.get("hostNetwork") is True:
        reasons.append(
            "hostNetwork: true — no CNI plugin runs for a pod on the node's network, so the "
            "redirect would never be installed; use the Azure Identity SDK's workload identity "
            "credential in this workload instead"
            if mode == "cni"
            else "hostNetwork: true — no CNI plugin runs for a pod on the node's network, so node "
            "mode could neither redirect it nor listen in its namespace (which is the node's); "
            "use the Azure Identity SDK's workload identity credential in this workload instead"
            if mode == "node"
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
    choice = explicit_choice(workload)
    if choice is not None and explicit_policy(choice) is None:
        reasons.append(
            f"pod annotation {CNI_PASSTHROUGH_ANNOTATION}: {choice!r} is neither all nor none (the "
            f"CNI plugin refuses such a pod): set the pass-through this workload needs"
        )
    return reasons


@dataclass(frozen=True, slots=True)
class ServiceAccountChoice:
    """Phase `service_account_for`: the service account the migrated pods run as."""

    name: str
    action: SaAction
    doc: Document | None  # the exported ServiceAccount to patch, if any
    notes: tuple[str, ...]
    tenant_id: str | None = None  # its tenant-id annotation (a GUID), which the webhook honours


def service_account_for(
    workload: Workload,
    default_client_id: str,
    service_accounts: Mapping[tuple[str, str], Document],
) -> ServiceAccountChoice:
    """Patch the service account the workload uses, or give it its own.

    A FIC on `default` would serve every pod of the namespace that runs as `default`: a
    workload on it (or on none) gets `<name>-wi`, so that the FIC's subject names it alone.
    """
    current = workload.service_account
    notes: list[str] = []
    if current in (None, "default"):
        name = _sa_name_for(workload)
        notes.append(
            f"used the {'default' if current else 'implicit default'} service account: "
            f"now uses its own, {name}"
        )
    else:
        name = current
    doc = service_accounts.get((workload.namespace, name))
    action: SaAction
    tenant_id: str | None = None
    if doc is not None:
        action = "patch"
        existing = model.dig(doc.data, "metadata", "annotations", CLIENT_ID_ANNOTATION)
        if existing and str(existing).lower() != default_client_id:
            notes.append(
                f"service account {name} had {CLIENT_ID_ANNOTATION} {existing}: replaced "
                f"by {default_client_id}"
            )
        tenant = model.dig(doc.data, "metadata", "annotations", TENANT_ID_ANNOTATION)
        if isinstance(tenant, str) and _GUID.match(tenant.strip()):
            tenant_id = tenant.strip().lower()
    elif name != current:
        action = "create"
    else:
        action = "create-missing"
        notes.append(
            f"service account {name} is not in the export: a minimal one is generated "
            f"(kubectl apply merges the annotation into an existing one)"
        )
    return ServiceAccountChoice(name, action, doc, tuple(notes), tenant_id)


def proxy_port_for(workload: Workload, wanted: int) -> tuple[int, tuple[str, ...]]:
    """The proxy's port: `wanted`, or the next one no container of the pod declares."""
    port = _choose_port(wanted, _declared_tcp_ports(workload))
    if port == wanted:
        return port, ()
    return port, (f"a container declares port {wanted}: the proxy listens on {port} instead",)


def _kind_notes(workload: Workload) -> tuple[str, ...]:
    if workload.kind == "Pod":
        return ("a bare Pod: delete and re-create it to apply (its spec is immutable)",)
    if workload.kind == "Job":
        return (
            "a Job: its pod template is immutable, delete and re-create it (or leave a "
            "finished Job alone)",
        )
    return ()


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """A selector in the export that names the aadpodidbinding label."""

    labels: Mapping[str, Any] | None  # None: a matchExpressions term, which is not evaluated
    label: str  # "Kind/name path.to.selector", for the report
    doc: Document


def label_selectors(documents: Sequence[Document]) -> dict[str, list[LabelSelector]]:
    """Selectors that name aadpodidbinding, by namespace.

    Removing the label at cut-over would silently empty them (Service endpoints,
    NetworkPolicies, PodDisruptionBudgets, …). Objects created by a controller (ReplicaSets,
    …) copy their owner's selector: only the owner's counts.
    """
    found: dict[str, list[LabelSelector]] = defaultdict(list)
    for doc in documents:
        if model.api_group(doc.data) == model.POD_IDENTITY_GROUP or model.metadata(doc.data).get(
            "ownerReferences"
        ):
            continue
        for labels, path in _label_references(doc):
            label = f"{model.kind_of(doc.data)}/{model.name_of(doc.data)} {path}"
            found[model.namespace_of(doc.data)].append(LabelSelector(labels, label, doc))
    return found


def selectors_emptied_by_cut_over(
    selectors: Mapping[str, Sequence[LabelSelector]], workload: Workload
) -> tuple[str, ...]:
    """The selectors that select the workload's pods by the label, sorted: why it must stay."""
    kept: set[str] = set()
    for selector in selectors.get(workload.namespace, ()):
        if _selects(selector.labels, workload.pod_labels):
            own = selector.doc is workload.doc
            kept.add(f"its own {selector.label.split(' ', 1)[1]}" if own else selector.label)
    return tuple(sorted(kept))


def agree_on_service_accounts(
    candidates: Sequence[WorkloadPlan], cluster: str
) -> tuple[list[WorkloadPlan], list[Finding]]:
    """The candidates that can be migrated, and a finding for each that cannot.

    One service account carries one default client ID, and a FIC on it serves every pod
    using it: workloads sharing a service account must agree on their identities.
    """
    by_sa: dict[tuple[str, str], list[WorkloadPlan]] = defaultdict(list)
    for candidate in candidates:
        by_sa[(candidate.workload.namespace, candidate.service_account)].append(candidate)
    migrated: list[WorkloadPlan] = []
    refused: list[Finding] = []
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
            refused.append(
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
    return migrated, refused


@dataclass(frozen=True, slots=True)
class RuntimeObjects:
    """Phase `leave_out_runtime_objects`: owned objects left out, and those that block nothing."""

    omitted: tuple[Finding, ...]  # re-created by a migrated controller: not copied
    not_migrated: tuple[Finding, ...]  # pod identity pods whose controller is not exported
    not_copied: tuple[Document, ...]


def leave_out_runtime_objects(
    owned: Sequence[Workload],
    migrated: Sequence[WorkloadPlan],
    keys: frozenset[tuple[str, str, str]],
    cluster: str,
) -> RuntimeObjects:
    """Objects created by a migrated controller, directly or through another one.

    A Deployment's ReplicaSet and its Pods, a CronJob's Jobs: the controller re-creates them
    from the migrated template, so they are left out.
    """
    replaced = {(p.workload.namespace, p.workload.kind, p.workload.name) for p in migrated}
    omitted: list[Finding] = []
    not_copied: list[Document] = []
    remaining = list(owned)
    changed = True
    while changed:
        changed = False
        for workload in list(remaining):
            assert workload.owner is not None
            if (workload.namespace, workload.owner.kind, workload.owner.name) in replaced:
                replaced.add((workload.namespace, workload.kind, workload.name))
                remaining.remove(workload)
                not_copied.append(workload.doc)
                omitted.append(
                    Finding(
                        cluster,
                        workload.ref,
                        workload.doc.where,
                        f"created by {workload.owner.kind}/{workload.owner.name}, which is migrated "
                        f"(or created by one that is): its controller re-creates it",
                    )
                )
                changed = True
    not_migrated: list[Finding] = []
    for workload in remaining:
        assert workload.owner is not None
        owner_ref = f"{workload.owner.kind}/{workload.owner.name}"
        if (
            workload.binding_label is not None
            and (workload.namespace, workload.owner.kind, workload.owner.name) not in keys
        ):
            not_migrated.append(
                Finding(
                    cluster,
                    workload.ref,
                    workload.doc.where,
                    f"created by {owner_ref}, which is not in the export: export and migrate "
                    f"{owner_ref} itself (this object is copied unchanged)",
                )
            )
    return RuntimeObjects(tuple(omitted), tuple(not_migrated), tuple(not_copied))


def service_account_warnings(
    workloads: Sequence[Workload], migrated: Sequence[WorkloadPlan], cluster: str
) -> list[Finding]:
    """Workloads left as they are that run as a service account the migration federates.

    A FIC trusts every pod that runs as its service account, where pod identity looked at the
    pod's label: those workloads gain the migrated one's identities once the FICs exist.
    """
    migrated_sas: dict[tuple[str, str], list[WorkloadPlan]] = defaultdict(list)
    for wp in migrated:
        migrated_sas[(wp.workload.namespace, wp.service_account)].append(wp)
    migrated_docs = {id(p.workload.doc) for p in migrated}
    warnings: list[Finding] = []
    for workload in sorted(workloads, key=lambda w: (w.namespace, w.kind, w.name)):
        if workload.owner is not None or id(workload.doc) in migrated_docs:
            continue
        users_of_sa = migrated_sas.get((workload.namespace, workload.service_account or "default"))
        if users_of_sa:
            identities_text = ", ".join(b.pod_identity for b in users_of_sa[0].identities)
            warnings.append(
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
    return warnings


def identity_table(
    resolved: ResolvedIdentities,
    bindings: Sequence[IdentityBinding],
    bindings_used: set[tuple[str, str]],
    migrated: Sequence[WorkloadPlan],
    cluster: str,
) -> tuple[list[IdentityRow], list[Finding]]:
    """The report's row for each AzureIdentity, and warnings for identities and bindings no pod used."""
    users: dict[tuple[str, str], list[str]] = defaultdict(list)
    for wp in migrated:
        for bound in wp.identities:
            users[(wp.workload.namespace, bound.pod_identity)].append(wp.ref)
    bindings_of: dict[tuple[str, str], list[str]] = defaultdict(list)
    for binding in bindings:
        if binding.identity is not None:
            bindings_of[(binding.namespace, binding.identity)].append(binding.name)
    rows: list[IdentityRow] = []
    warnings: list[Finding] = []
    for (namespace, name), (identity, managed, problem) in sorted(resolved.pod_identities.items()):
        rows.append(
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
            warnings.append(
                Finding(
                    cluster,
                    f"{namespace}/AzureIdentity/{name}",
                    identity.where,
                    "no AzureIdentityBinding refers to it: no pod used it",
                )
            )
    for binding in sorted(bindings, key=lambda b: (b.namespace, b.name)):
        if (
            binding.selector is not None
            and binding.identity is not None
            and ((binding.namespace, binding.name) not in bindings_used)
        ):
            warnings.append(
                Finding(
                    cluster,
                    f"{binding.namespace}/AzureIdentityBinding/{binding.name}",
                    binding.where,
                    f"no workload in the export has the label {BINDING_LABEL}={binding.selector}",
                )
            )
    return rows, warnings


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
    """Run the phases for one cluster; the findings go to `plan`, the migrated workloads are returned."""
    cluster = state.cluster.name
    inventory = state.inventory
    options = plan.options

    objects = read_objects(inventory, cluster)
    resolved = resolve_identities(inventory, cluster, identities_by_key)
    selectors = label_selectors(inventory.documents)
    plan.warnings += [*objects.warnings, *resolved.warnings]
    state.consumed.update(id(doc) for doc in objects.not_copied)

    bindings_used: set[tuple[str, str]] = set()
    candidates: list[WorkloadPlan] = []
    for workload in objects.workloads:
        excepted = excepted_by(workload, objects)
        if excepted:
            names = ", ".join(f"{e.namespace}/{e.name}" for e in excepted)
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
        if workload.binding_label is None:
            continue  # not a pod identity workload: unchanged
        identities = workload_identities(workload, resolved)
        bindings_used.update(identities.bindings_used)
        choice = choose_mode(workload, options, inventory.config_maps)
        reasons = [*blockers(workload, choice.mode), *identities.problems]
        if reasons:
            plan.not_migrated.append(Finding(cluster, workload.ref, workload.doc.where, "; ".join(reasons)))
            continue
        account = service_account_for(
            workload, identities.bound[0].identity.client_id, inventory.service_accounts
        )
        port, port_notes = proxy_port_for(workload, options.proxy_port)
        if choice.overridden:
            plan.warnings.append(
                Finding(
                    cluster,
                    workload.ref,
                    workload.doc.where,
                    f'its pod annotation {CNI_PASSTHROUGH_ANNOTATION}: "none" closes pass-through, but '
                    + "; ".join(choice.overridden)
                    + ": requests for those paths will get 403",
                )
            )
        kept = selectors_emptied_by_cut_over(selectors, workload)
        candidates.append(
            WorkloadPlan(
                cluster=cluster,
                workload=workload,
                identities=identities.bound,
                service_account=account.name,
                sa_action=account.action,
                sa_doc=account.doc,
                proxy_port=port,
                remove_binding_label=options.remove_binding_label and not kept,
                label_kept_because=kept,
                mode=choice.mode,
                passthrough=choice.passthrough,
                passthrough_because=choice.because,
                # Node mode's choice has no `because`: under --node, one says why it was not taken.
                mode_because=choice.because if options.node else (),
                tenant_id=account.tenant_id,
                notes=[*account.notes, *port_notes, *_kind_notes(workload)],
            )
        )

    migrated, refused = agree_on_service_accounts(candidates, cluster)
    plan.not_migrated += refused
    runtime = leave_out_runtime_objects(objects.owned, migrated, objects.keys, cluster)
    plan.omitted += runtime.omitted
    plan.not_migrated += runtime.not_migrated
    state.consumed.update(id(doc) for doc in runtime.not_copied)
    for wp in migrated:
        state.consumed.add(id(wp.workload.doc))
        if wp.sa_doc is not None:
            state.consumed.add(id(wp.sa_doc))
    plan.warnings += service_account_warnings(inventory.workloads, migrated, cluster)
    rows, unused = identity_table(resolved, inventory.bindings, bindings_used, migrated, cluster)
    plan.identity_rows += rows
    plan.warnings += unused
    return migrated


def fic_budget(plan: Plan, rows_by_key: Mapping[str, list[str]]) -> None:
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


NODE_NO_IDENTITY_BINDING: Final = (
    "needs AKS identity binding (over the FIC budget), which node mode serves only node-wide: the "
    "node process's AZURE_KUBERNETES_TOKEN_PROXY would send every pod's exchanges there, not this one's"
)


def modes_after_budget(plan: Plan) -> None:
    """Move node-mode workloads that the budget put on identity binding to the other mode.

    The webhook points identity binding at the pod's own containers (AZURE_KUBERNETES_TOKEN_PROXY
    and its CA); the node process reads none of a pod's environment, only its annotations.
    """
    for wp in plan.workloads:
        if wp.node and wp.identity_binding:
            # It was in node mode, so nothing asked for pass-through: the other mode gets none.
            wp.mode = plan.options.fallback_mode
            wp.mode_because = (NODE_NO_IDENTITY_BINDING,)


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

    rows_by_key: dict[str, list[str]] = defaultdict(list)
    for row in plan.identity_rows:
        if row.managed is not None:
            prefix = f"{row.cluster}:" if row.cluster else ""
            rows_by_key[row.managed.key].append(
                f"{prefix}{row.pod_identity.namespace}/{row.pod_identity.name}"
            )
    plan.workloads.sort(key=lambda w: (w.cluster, w.workload.namespace, w.workload.kind, w.workload.name))
    fic_budget(plan, rows_by_key)
    modes_after_budget(plan)

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
