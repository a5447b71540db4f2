"""Pod identity exports as data: YAML text in, documents, pod identity resources and workloads out.

Rules:
1. Pure: text in, values out, or ConfigError with one line naming the source, the document
   (1-based) and the line. No files, argv or environment.
2. Knows the shapes of Kubernetes workloads and of aad-pod-identity's resources; knows nothing of
   the plan or of any output format beyond `dump_yaml`.
3. Never mutates parsed data: later stages deep-copy what they change, so the original of every
   document stays available for `unchanged/`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

import yaml

from azwi_netproxy.errors import ConfigError

POD_IDENTITY_GROUP: Final = "aadpodidentity.k8s.io"
BINDING_LABEL: Final = "aadpodidbinding"

# Kinds whose pods we migrate, with the API groups they are served from ("" = core).
# `extensions` only appears in very old exports; such objects must be converted before applying,
# which the report says.
WORKLOAD_GROUPS: Final[Mapping[str, tuple[str, ...]]] = {
    "Deployment": ("apps", "extensions"),
    "StatefulSet": ("apps",),
    "DaemonSet": ("apps", "extensions"),
    "ReplicaSet": ("apps", "extensions"),
    "Job": ("batch",),
    "CronJob": ("batch",),
    "Pod": ("",),
}

# aad-pod-identity's AzureIdentity.spec.type values.
IDENTITY_TYPES: Final[Mapping[int, str]] = {
    0: "user-assigned managed identity",
    1: "service principal (client secret)",
    2: "service principal (certificate)",
}
USER_ASSIGNED_MSI: Final = 0


# ---------------------------------------------------------------------------- YAML in and out


def _strict_loader_base() -> type[yaml.SafeLoader]:
    # libyaml's parser is much faster on big exports; the constructor and resolver stay Python, so
    # the overrides below apply to both.
    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_strict_loader_base()):  # type: ignore[misc]
    """SafeLoader that refuses duplicate keys and keeps timestamps as strings.

    Kubernetes decodes YAML through JSON, so an unquoted `2024-01-01T00:00:00Z` is a string
    there; PyYAML would make it a datetime and dump it back in another format. Duplicate keys are
    silently "last wins" in PyYAML and an error for `kubectl apply`: refuse them here.
    """

    yaml_implicit_resolvers: ClassVar[dict[str, list[tuple[str, re.Pattern[str]]]]] = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value != "<<":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)  # type: ignore[no-any-return]


class _Dumper(yaml.SafeDumper):
    """Block style, keys in the order we built them, multi-line strings as `|` blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        # Inputs may use YAML anchors; manifests read better with the values spelled out.
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _represent_str)


def dump_yaml(data: Any) -> str:
    """One YAML document, deterministic, lines never wrapped (ARM IDs are long)."""
    return yaml.dump(
        data,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=1 << 16,
    )


def load_yaml(text: str) -> Any:
    """One document with the loader used for inputs (tests use it to compare round trips)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def load_yaml_all(text: str, *, keep_empty: bool = False) -> list[Any]:
    """Every document (empty ones too if asked), with the loader used for inputs."""
    return [d for d in yaml.load_all(text, Loader=_Loader) if keep_empty or d is not None]


@dataclass(frozen=True, slots=True, eq=False)
class Document:
    """One Kubernetes object of the input (a document, or one item of a `kind: List`)."""

    source: str  # as the user named it ("<stdin>" for -)
    output_name: str  # relative name of its file under unchanged/
    index: int  # 1-based document number in its source
    line: int  # 1-based line where the document's content starts
    data: Any
    # The document's original text (comments included) when it can be written back verbatim;
    # None for List items and when the text could not be cut out exactly.
    text: str | None
    item: int | None = None  # 0-based position in a List document

    @property
    def where(self) -> str:
        item = f", item {self.item}" if self.item is not None else ""
        return f"{self.source}:{self.line} (document {self.index}{item})"


_SEPARATOR_LINE: Final = re.compile(r"^(?:---|\.\.\.)[ \t]*(?:#.*)?$|^[ \t]*$")


def _trim_leading_markers(chunk: str) -> str:
    """Drop leading `---`/`...` lines (we write our own separators) but keep comments."""
    lines = chunk.splitlines(keepends=True)
    kept: list[str] = []
    dropping = True
    for line in lines:
        if dropping and _SEPARATOR_LINE.match(line.rstrip("\n")):
            continue
        dropping = False
        kept.append(line)
    text = "".join(kept)
    if text and not text.endswith("\n"):
        text += "\n"
    return text


def _trim_trailing_end_marker(chunk: str) -> str:
    lines = chunk.rstrip("\n").splitlines(keepends=True)
    while lines and _SEPARATOR_LINE.match(lines[-1].rstrip("\n")):
        lines.pop()
    return "".join(lines).rstrip("\n") + "\n" if lines else ""


def load_documents(text: str, *, source: str, output_name: str) -> list[Document]:
    """Parse a multi-document YAML (or JSON) stream; `kind: List` objects are flattened.

    Raises:
        ConfigError: not valid YAML (with the document number, line and column), a duplicate key,
            or a document that is not a mapping, list of objects or empty.
    """
    loader = _Loader(text)
    parsed: list[tuple[Any, int, int, list[int]]] = []  # (data, first line, end, item lines)
    count = 0
    try:
        while loader.check_node():
            count += 1
            node = loader.get_node()
            data = loader.construct_document(node)
            parsed.append((data, node.start_mark.line + 1, node.end_mark.index, _item_lines(node)))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{source}: document {count or 1}: not valid YAML{at}: {problem}") from None
    finally:
        loader.dispose()

    documents: list[Document] = []
    previous_end = 0
    for position, (data, line, end, item_lines) in enumerate(parsed):
        index = position + 1
        # A document's text runs from the end of the previous one (so that comments above it
        # stay with it) to its own end, or to the end of the stream for the last one.
        cut_end = len(text) if position == len(parsed) - 1 else end
        chunk = _trim_trailing_end_marker(_trim_leading_markers(text[previous_end:cut_end]))
        previous_end = end
        if data is None:
            continue
        original: str | None = chunk
        try:
            if load_yaml(chunk) != data:
                original = None
        except yaml.YAMLError:
            original = None
        if isinstance(data, dict) and _is_list_kind(data):
            items = data.get("items") or []
            if not isinstance(items, list):
                raise ConfigError(f"{source}: document {index}: {data.get('kind')}.items is not a list")
            for number, item in enumerate(items):
                if not isinstance(item, dict):
                    raise ConfigError(
                        f"{source}: document {index}: item {number} of the List is not a mapping"
                    )
                item_line = item_lines[number] if number < len(item_lines) else line
                documents.append(Document(source, output_name, index, item_line, item, None, number))
            continue
        if not isinstance(data, dict):
            raise ConfigError(
                f"{source}: document {index} (line {line}): expected a Kubernetes object "
                f"(a mapping), got {type(data).__name__}"
            )
        documents.append(Document(source, output_name, index, line, data, original))
    return documents


def _item_lines(node: yaml.Node) -> list[int]:
    """1-based first lines of the `items` of a mapping node (for messages about List items)."""
    if not isinstance(node, yaml.MappingNode):
        return []
    for key_node, value_node in node.value:
        if (
            isinstance(key_node, yaml.ScalarNode)
            and key_node.value == "items"
            and isinstance(value_node, yaml.SequenceNode)
        ):
            return [item.start_mark.line + 1 for item in value_node.value]
    return []


def _is_list_kind(data: Mapping[str, Any]) -> bool:
    kind = data.get("kind")
    return isinstance(kind, str) and kind.endswith("List") and "items" in data


# ---------------------------------------------------------------------------- object accessors


def api_group(data: Mapping[str, Any]) -> str:
    api_version = data.get("apiVersion")
    if not isinstance(api_version, str):
        return ""
    return api_version.rpartition("/")[0] if "/" in api_version else ""


def kind_of(data: Mapping[str, Any]) -> str:
    kind = data.get("kind")
    return kind if isinstance(kind, str) else ""


def metadata(data: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = data.get("metadata")
    return meta if isinstance(meta, dict) else {}


def name_of(data: Mapping[str, Any]) -> str:
    name = metadata(data).get("name")
    return name if isinstance(name, str) else ""


def namespace_of(data: Mapping[str, Any]) -> str:
    # Exports carry the namespace; a hand-written object without one lands in "default" as far as
    # this tool is concerned (kubectl would use the context's namespace), and the report says so.
    namespace = metadata(data).get("namespace")
    return namespace if isinstance(namespace, str) and namespace else "default"


def dig(data: Any, *path: str) -> Any:
    """data[path[0]][path[1]]…, or None when any step is missing or not a mapping."""
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _spec_field(spec: Mapping[str, Any], wanted: str) -> Any:
    # aad-pod-identity's Go types use json tags `resourceID`, `clientID`, `azureIdentity`, but
    # older exports and hand-written manifests spell them `ResourceID`, `ClientID`,
    # `AzureIdentity` (Go's JSON decoding is case-insensitive, so the cluster accepted them).
    if wanted in spec:
        return spec[wanted]
    lowered = wanted.lower()
    for key, value in spec.items():
        if isinstance(key, str) and key.lower() == lowered:
            return value
    return None


# ---------------------------------------------------------------------------- pod identity


@dataclass(frozen=True, slots=True)
class PodIdentity:
    """An AzureIdentity resource."""

    namespace: str
    name: str
    type: int | None  # None: not a number we understand
    resource_id: str | None
    client_id: str | None
    where: str


@dataclass(frozen=True, slots=True)
class IdentityBinding:
    """An AzureIdentityBinding: pods whose `aadpodidbinding` label equals `selector` get `identity`."""

    namespace: str
    name: str
    identity: str | None
    selector: str | None
    where: str


@dataclass(frozen=True, slots=True)
class PodIdentityException:
    """An AzurePodIdentityException: pods with any of these labels bypassed NMI."""

    namespace: str
    name: str
    pod_labels: Mapping[str, str]
    where: str

    def matches(self, labels: Mapping[str, str]) -> bool:
        # aad-pod-identity's labelInExceptionList: one matching label is enough, and the value
        # comparison is case-insensitive (strings.EqualFold).
        return any(
            key in labels and labels[key].lower() == value.lower() for key, value in self.pod_labels.items()
        )


def _optional_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    return str(value)


def _identity_type(value: Any) -> int | None:
    if value is None:
        # Go's zero value: an AzureIdentity without `type` is a user-assigned MSI.
        return USER_ASSIGNED_MSI
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def parse_pod_identity(doc: Document) -> PodIdentity:
    spec = doc.data.get("spec")
    spec = spec if isinstance(spec, dict) else {}
    return PodIdentity(
        namespace=namespace_of(doc.data),
        name=name_of(doc.data),
        type=_identity_type(_spec_field(spec, "type")),
        resource_id=_optional_str(_spec_field(spec, "resourceID")),
        client_id=_optional_str(_spec_field(spec, "clientID")),
        where=doc.where,
    )


def parse_binding(doc: Document) -> IdentityBinding:
    spec = doc.data.get("spec")
    spec = spec if isinstance(spec, dict) else {}
    return IdentityBinding(
        namespace=namespace_of(doc.data),
        name=name_of(doc.data),
        identity=_optional_str(_spec_field(spec, "azureIdentity")),
        selector=_optional_str(_spec_field(spec, "selector")),
        where=doc.where,
    )


def parse_exception(doc: Document) -> PodIdentityException:
    labels = (
        _spec_field(doc.data.get("spec") or {}, "podLabels")
        if isinstance(doc.data.get("spec"), dict)
        else None
    )
    if labels is not None and not isinstance(labels, dict):
        raise ConfigError(f"{doc.where}: AzurePodIdentityException spec.podLabels is not a mapping")
    pod_labels = {str(k): str(v) for k, v in (labels or {}).items()}
    return PodIdentityException(namespace_of(doc.data), name_of(doc.data), pod_labels, doc.where)


# ---------------------------------------------------------------------------- workloads


@dataclass(frozen=True, slots=True)
class Owner:
    kind: str
    name: str


@dataclass(frozen=True, slots=True, eq=False)
class Workload:
    """A Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob or Pod of the export."""

    doc: Document
    kind: str
    namespace: str
    name: str
    template_path: tuple[str, ...]  # where the pod's {metadata, spec} lives in the object
    owner: Owner | None

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.kind}/{self.name}"

    @property
    def pod(self) -> Mapping[str, Any]:
        pod = dig(self.doc.data, *self.template_path) if self.template_path else self.doc.data
        return pod if isinstance(pod, dict) else {}

    @property
    def pod_labels(self) -> Mapping[str, str]:
        labels = dig(self.pod, "metadata", "labels")
        return labels if isinstance(labels, dict) else {}

    @property
    def pod_spec(self) -> Mapping[str, Any]:
        spec = self.pod.get("spec")
        return spec if isinstance(spec, dict) else {}

    @property
    def binding_label(self) -> str | None:
        value = self.pod_labels.get(BINDING_LABEL)
        return value if isinstance(value, str) else None

    @property
    def service_account(self) -> str | None:
        spec = self.pod_spec
        # `serviceAccount` is the deprecated alias; the API server prefers serviceAccountName.
        for key in ("serviceAccountName", "serviceAccount"):
            value = spec.get(key)
            if isinstance(value, str) and value:
                return value
        return None

    def containers(self) -> Iterator[Mapping[str, Any]]:
        for key in ("initContainers", "containers"):
            for container in self.pod_spec.get(key) or []:
                if isinstance(container, dict):
                    yield container


def template_path(kind: str) -> tuple[str, ...]:
    if kind == "Pod":
        return ()
    if kind == "CronJob":
        return ("spec", "jobTemplate", "spec", "template")
    return ("spec", "template")


def _owner(data: Mapping[str, Any]) -> Owner | None:
    refs = metadata(data).get("ownerReferences")
    if not isinstance(refs, list):
        return None
    candidates = [ref for ref in refs if isinstance(ref, dict)]
    controller = [ref for ref in candidates if ref.get("controller") is True]
    for ref in controller or candidates:
        return Owner(str(ref.get("kind", "")), str(ref.get("name", "")))
    return None


def parse_workload(doc: Document) -> Workload:
    """A workload whose pod template we can read.

    Raises:
        ConfigError: the pod template or its labels/annotations are not what Kubernetes accepts.
    """
    kind = kind_of(doc.data)
    path = template_path(kind)
    name = name_of(doc.data)
    if not name:
        raise ConfigError(f"{doc.where}: {kind} without metadata.name")
    pod = dig(doc.data, *path) if path else doc.data
    where = f"{doc.where}: {kind} {name}"
    if not isinstance(pod, dict):
        raise ConfigError(f"{where}: {'.'.join(path)} is missing or not a mapping")
    for section in ("labels", "annotations"):
        values = dig(pod, "metadata", section)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: pod {section} are not a mapping")
        for key, value in values.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ConfigError(
                    f"{where}: pod {section[:-1]} {key!r} has value {value!r}, which is not a "
                    f"string (quote it: Kubernetes accepts only strings here)"
                )
    spec = pod.get("spec")
    if spec is not None and not isinstance(spec, dict):
        raise ConfigError(f"{where}: pod spec is not a mapping")
    return Workload(doc, kind, namespace_of(doc.data), name, path, _owner(doc.data))


# ---------------------------------------------------------------------------- inventory


@dataclass(slots=True)
class Inventory:
    """What one cluster's export holds, sorted into the parts the planner looks at."""

    identities: list[PodIdentity] = field(default_factory=list)
    bindings: list[IdentityBinding] = field(default_factory=list)
    exceptions: list[PodIdentityException] = field(default_factory=list)
    workloads: list[Workload] = field(default_factory=list)
    service_accounts: dict[tuple[str, str], Document] = field(default_factory=dict)
    # (namespace, name) → data: what pods take as env or files may be where they name IMDS.
    config_maps: dict[tuple[str, str], Mapping[str, Any]] = field(default_factory=dict)
    # Pod identity's own resources (AzureIdentity, …): replaced by the migration, never copied.
    pod_identity_docs: list[Document] = field(default_factory=list)
    # Every document, in input order: the planner decides which ones go to unchanged/.
    documents: list[Document] = field(default_factory=list)


def is_workload(data: Mapping[str, Any]) -> bool:
    kind = kind_of(data)
    return kind in WORKLOAD_GROUPS and api_group(data) in WORKLOAD_GROUPS[kind]


def classify(documents: list[Document]) -> Inventory:
    """Sort documents into pod identity resources, workloads, service accounts, ConfigMaps and the rest.

    Raises:
        ConfigError: a workload or AzurePodIdentityException that Kubernetes would not accept.
    """
    inventory = Inventory(documents=list(documents))
    for doc in documents:
        data = doc.data
        kind = kind_of(data)
        if api_group(data) == POD_IDENTITY_GROUP:
            inventory.pod_identity_docs.append(doc)
            if kind == "AzureIdentity":
                inventory.identities.append(parse_pod_identity(doc))
            elif kind == "AzureIdentityBinding":
                inventory.bindings.append(parse_binding(doc))
            elif kind == "AzurePodIdentityException":
                inventory.exceptions.append(parse_exception(doc))
            # AzureAssignedIdentity and AzurePodIdentity are MIC's and NMI's runtime state:
            # nothing to migrate, and not copied (they go with pod identity).
        elif is_workload(data):
            inventory.workloads.append(parse_workload(doc))
        elif kind == "ServiceAccount" and api_group(data) == "" and name_of(data):
            inventory.service_accounts.setdefault((namespace_of(data), name_of(data)), doc)
        elif kind == "ConfigMap" and api_group(data) == "" and isinstance(data.get("data"), dict):
            inventory.config_maps.setdefault((namespace_of(data), name_of(data)), data["data"])
    return inventory
