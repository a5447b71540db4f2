"""The pure parts of azwi-netproxy-migrate: YAML loading, pod identity parsing, plan rules.

Name: test_migrate_model
Scope: model.py and plan.py through their functions, on small inline documents; no files.
Depends: hypothesis for the FIC name property.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from azwi_netproxy.errors import ConfigError
from azwi_netproxy.identitymap import parse_identity_map
from azwi_netproxy.migrate import model, plan
from azwi_netproxy.migrate import render as render_module
from azwi_netproxy.migrate import signs as signs_module
from azwi_netproxy.migrate.model import Document, PodIdentity, dump_yaml, load_documents
from azwi_netproxy.migrate.plan import ClusterInput, Options, build_plan
from azwi_netproxy.migrate.render import render

RID = (
    "/subscriptions/0b1f6471-1bf0-4dda-aec3-111122223333/resourceGroups/rg-x/providers/"
    "Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
)


def docs(text: str, source: str = "in.yaml") -> list[Document]:
    return load_documents(text, source=source, output_name=source)


# ---------------------------------------------------------------------------- loading

def test_documents_keep_lines_text_and_comments() -> None:
    text = (
        "# header\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n"
        "---\n"
        "---\n"  # an empty document is skipped
        "# about b\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n"
        "...\n"
    )
    a, b = docs(text)
    assert (a.index, a.line, b.index, b.line) == (1, 2, 3, 8)
    assert a.text == "# header\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n"
    assert b.text == "# about b\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n"
    assert b.where == "in.yaml:8 (document 3)"


def test_list_items_are_flattened_with_their_lines() -> None:
    text = (
        '{"apiVersion": "v1", "kind": "List", "items": [\n'
        '  {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}},\n'
        '  {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "b"}}\n'
        "]}\n"
    )
    items = docs(text, "x.json")
    assert [(d.data["kind"], d.line, d.item, d.text) for d in items] == [
        ("ConfigMap", 2, 0, None), ("Secret", 3, 1, None),
    ]


def test_timestamps_stay_strings_and_yaml11_scalars_round_trip() -> None:
    (doc,) = docs(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, creationTimestamp: 2024-01-01T10:00:00Z}\n"
        "data: {a: 'yes', b: '0755', c: '1.10'}\n"
    )
    assert doc.data["metadata"]["creationTimestamp"] == "2024-01-01T10:00:00Z"
    assert model.load_yaml(dump_yaml(doc.data)) == doc.data
    assert "'yes'" in dump_yaml(doc.data)  # still a string for kubectl's YAML 1.1 parser


def test_anchors_are_expanded_on_output() -> None:
    (doc,) = docs("a: &x {k: v}\nb: *x\n")
    assert dump_yaml(doc.data) == "a:\n  k: v\nb:\n  k: v\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 1\n---\nb: [\n", r"in\.yaml: document 2: not valid YAML at line 4, column 1"),
        ("a: 1\na: 2\n", r"document 1: not valid YAML at line 2, column 1: duplicate key 'a'"),
        ("just a string\n", r"document 1 \(line 1\): expected a Kubernetes object \(a mapping\), got str"),
        ("kind: List\nitems: {a: 1}\n", r"List\.items is not a list"),
        ("kind: List\nitems: [1]\n", r"item 0 of the List is not a mapping"),
    ],
    ids=["syntax", "duplicate-key", "scalar", "list-items-mapping", "list-item-scalar"],
)
def test_load_errors_name_document_and_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        docs(text)


# ---------------------------------------------------------------------------- pod identity

def identity(**spec: Any) -> PodIdentity:
    (doc,) = docs(dump_yaml({
        "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
        "metadata": {"name": "i", "namespace": "n"}, "spec": spec,
    }))
    return model.parse_pod_identity(doc)


GOOD_CLIENT = "6F0E2C1A-1D4B-4C55-9B1E-2A6C0D1E0001"


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"type": 0, "resourceID": RID.format(name="a"), "clientID": GOOD_CLIENT}, None),
        ({"resourceID": RID.format(name="a"), "clientID": GOOD_CLIENT}, None),  # Go zero value
        ({"type": "0", "ResourceID": RID.format(name="a").lower(), "ClientID": GOOD_CLIENT}, None),
        ({"type": 1, "clientID": GOOD_CLIENT, "clientPassword": {"name": "s"}}, "type 1 (service principal (client secret))"),
        ({"type": 2, "clientID": GOOD_CLIENT}, "type 2 (service principal (certificate))"),
        ({"type": "x", "clientID": GOOD_CLIENT}, "spec.type is not 0, 1 or 2"),
        ({"type": 0, "resourceID": RID.format(name="a"), "clientID": "nope"}, "is not a GUID"),
        ({"type": 0, "clientID": GOOD_CLIENT}, "resourceID is missing"),
        ({"type": 0, "clientID": GOOD_CLIENT,
          "resourceID": "/subscriptions/s/resourceGroups/r/providers/Microsoft.Compute/virtualMachines/v"},
         "is not a user-assigned managed identity"),
    ],
    ids=["msi", "no-type", "case-variants", "sp-secret", "sp-cert", "bad-type", "bad-guid", "no-resource-id", "not-uami"],
)
def test_managed_identity_or_why_not(spec: dict[str, Any], problem: str | None) -> None:
    managed, why = plan.parse_managed_identity(identity(**spec))
    if problem is None:
        assert why is None and managed is not None
        assert (managed.name, managed.resource_group, managed.client_id) == ("a", managed.resource_group, GOOD_CLIENT.lower())
        assert managed.resource_group.lower() == "rg-x"
        assert managed.subscription == "0b1f6471-1bf0-4dda-aec3-111122223333"
    else:
        assert managed is None and why is not None and problem in why


def test_exception_matches_any_label_case_insensitively() -> None:
    exception = model.PodIdentityException("n", "e", {"app": "Blackbox", "tier": "x"}, "here")
    assert exception.matches({"app": "blackbox"})
    assert exception.matches({"tier": "x", "app": "other"})
    assert not exception.matches({"app": "other"})


@pytest.mark.parametrize(
    ("spec", "windows"),
    [
        ({"nodeSelector": {"kubernetes.io/os": "windows"}}, True),
        ({"nodeSelector": {"beta.kubernetes.io/os": "Windows"}}, True),
        ({"nodeSelector": {"kubernetes.io/os": "linux"}}, False),
        ({"os": {"name": "windows"}}, True),
        ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/os", "operator": "In", "values": ["windows"]}]}]}}}}, True),
        ({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["windows"]}]},
                {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}]},
            ]}}}}, False),
        ({}, False),
    ],
    ids=["selector", "beta-selector", "linux", "os-field", "affinity", "affinity-either", "none"],
)
def test_windows_detection(spec: dict[str, Any], windows: bool) -> None:
    assert (plan.is_windows(spec) is not None) is windows


_DNS = st.from_regex(r"\A[a-z0-9]([-a-z0-9.]{0,80}[a-z0-9])?\Z", fullmatch=True)


@given(cluster=st.sampled_from(["", "east", "prod_eu-1"]), namespace=_DNS, sa=_DNS)
def test_fic_names_are_valid_for_entra(cluster: str, namespace: str, sa: str) -> None:
    name = plan.fic_base_name(cluster, namespace, sa)
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{2,119}", name), name
    assert name == plan.fic_base_name(cluster, namespace, sa)


# ---------------------------------------------------------------------------- plan rules

def _team(number: int, identity_name: str = "shared") -> str:
    ns = f"team-{number}"
    return f"""\
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentity
metadata: {{name: {identity_name}, namespace: {ns}}}
spec: {{type: 0, resourceID: "{RID.format(name='id-' + identity_name)}", clientID: 9a9a9a9a-0000-4000-8000-000000000001}}
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentityBinding
metadata: {{name: b, namespace: {ns}}}
spec: {{azureIdentity: {identity_name}, selector: s}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: app, namespace: {ns}}}
spec:
  selector: {{matchLabels: {{app: app}}}}
  template:
    metadata: {{labels: {{app: app, aadpodidbinding: s}}}}
    spec: {{containers: [{{name: app, image: i}}]}}
"""


def plan_of(text: str, **options: Any) -> plan.Plan:
    return build_plan([ClusterInput("", None, tuple(docs(text)))], Options(**options))


@pytest.mark.parametrize(("teams", "over"), [(20, False), (21, True)], ids=["at-limit", "over-limit"])
def test_fic_limit_boundary(teams: int, over: bool) -> None:
    result = plan_of("---\n".join(_team(n) for n in range(teams)))
    (line,) = result.budget
    assert (line.needed, line.over_limit) == (teams, over)
    assert len(result.fics) == (0 if over else teams)
    assert all(w.identity_binding is over for w in result.workloads)


def test_patched_service_account_notes_a_replaced_client_id() -> None:
    text = _team(0) + """---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: app-wi
  namespace: team-0
  annotations: {azure.workload.identity/client-id: 11111111-2222-4333-8444-555555555555}
"""
    (wp,) = plan_of(text).workloads
    assert wp.sa_action == "patch"
    assert any("had azure.workload.identity/client-id 11111111" in n for n in wp.notes)


def test_deprecated_service_account_alias_is_kept_in_step() -> None:
    text = _team(0).replace("spec: {containers:", "spec: {serviceAccount: default, containers:")
    result = plan_of(text)
    files = render(result)
    manifest = model.load_yaml(files["manifests/team-0/deployment-app.yaml"].content)
    spec = manifest["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == spec["serviceAccount"] == "app-wi"
    assert manifest["metadata"]["namespace"] == "team-0"


def test_workload_without_namespace_lands_in_default_explicitly() -> None:
    text = _team(0).replace("namespace: team-0", "namespace: default").replace(
        "metadata: {name: app, namespace: default}", "metadata: {name: app}"
    )
    result = plan_of(text)
    (wp,) = result.workloads
    assert wp.subject == "system:serviceaccount:default:app-wi"
    manifest = model.load_yaml(render(result)["manifests/default/deployment-app.yaml"].content)
    assert manifest["metadata"]["namespace"] == "default"
    assert any("no metadata.namespace" in w.reason for w in result.warnings)


def test_bad_names_cannot_escape_outdir() -> None:
    text = _team(0).replace("metadata: {name: app,", "metadata: {name: ../../etc,")
    with pytest.raises(ConfigError, match="is not a valid Kubernetes name"):
        render(plan_of(text))


@pytest.mark.parametrize(
    "text",
    [
        "--- # first\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n--- # second\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n",
        "%YAML 1.1\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n"
        "--- {apiVersion: v1, kind: ConfigMap, metadata: {name: b}}\n",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata:\n  x: |\n    ---\n"
        "    not a marker: indented\n",
    ],
    ids=["marker-comments", "directive-and-inline", "marker-in-block-scalar"],
)
def test_unchanged_documents_load_back_to_the_same_data(text: str) -> None:
    originals = docs(text)
    files = render(build_plan([ClusterInput("", None, tuple(originals))], Options()))
    (content,) = [f.content for path, f in files.items() if path.startswith("unchanged/")]
    assert model.load_yaml_all(content) == [d.data for d in originals]
    assert "\n---\n---" not in "\n" + content  # no empty documents between them


def test_a_workload_defined_twice_is_used_once() -> None:
    result = plan_of(_team(0) + "---\n" + _team(0).split("---\n")[-1])
    assert len(result.workloads) == 1
    assert any("defined twice" in w.reason for w in result.warnings)
    assert not [d for d in result.unchanged[""] if d.data.get("kind") == "Deployment"]


# ---------------------------------------------------------------------------- the planner's phases, one by one
# Each phase of plan._plan_cluster on a small inventory; test_golden_output pins them together.

CLIENT_A = "9a9a9a9a-0000-4000-8000-0000000000a1"
CLIENT_B = "9a9a9a9a-0000-4000-8000-0000000000b2"


def inventory(text: str) -> model.Inventory:
    return model.classify(docs(text))


def azure_identity(name: str, client: str, ns: str = "n", identity_type: int = 0) -> str:
    return (
        f"apiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentity\nmetadata: {{name: {name}, namespace: {ns}}}\n"
        f"spec: {{type: {identity_type}, clientID: {client}, resourceID: \"{RID.format(name='id-' + name)}\"}}\n"
    )


def binding(name: str, identity_name: str | None, selector: str | None, ns: str = "n") -> str:
    spec = {k: v for k, v in (("azureIdentity", identity_name), ("selector", selector)) if v is not None}
    return dump_yaml({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentityBinding",
                      "metadata": {"name": name, "namespace": ns}, "spec": spec})


def deployment(name: str, ns: str | None = "n", label: str | None = None, *, sa: str | None = None,
               api: str = "apps/v1", kind: str = "Deployment", spec: dict[str, Any] | None = None,
               owner: str | None = None, selected_by_label: bool = False) -> str:
    """A workload of `kind` (a Deployment's shape) whose pods carry `aadpodidbinding: label`."""
    labels = {"app": name, **({"aadpodidbinding": label} if label else {})}
    pod_spec: dict[str, Any] = {"containers": [{"name": "app", "image": "i"}], **(spec or {})}
    if sa is not None:
        pod_spec["serviceAccountName"] = sa
    meta: dict[str, Any] = {"name": name, **({"namespace": ns} if ns else {})}
    if owner is not None:
        owner_kind, _, owner_name = owner.partition("/")
        meta["ownerReferences"] = [{"kind": owner_kind, "name": owner_name, "controller": True}]
    selector = labels if selected_by_label else {"app": name}
    return dump_yaml({"apiVersion": api, "kind": kind, "metadata": meta, "spec": {
        "selector": {"matchLabels": selector},
        "template": {"metadata": {"labels": labels}, "spec": pod_spec}}})


def join(*parts: str) -> str:
    return "---\n".join(parts)


def workload_of(text: str, name: str) -> model.Workload:
    return next(w for w in inventory(text).workloads if w.name == name)


def test_read_objects_sorts_workloads_and_leaves_out_second_definitions() -> None:
    text = join(
        deployment("b"), deployment("a"), deployment("a"),  # a second definition of a
        deployment("old", api="extensions/v1beta1"),
        deployment("rs", owner="Deployment/a"),
        deployment("loose", ns=None),
        azure_identity("i", CLIENT_A),
        "apiVersion: aadpodidentity.k8s.io/v1\nkind: AzurePodIdentityException\n"
        "metadata: {name: z, namespace: n}\nspec: {podLabels: {app: b}}\n",
        "apiVersion: aadpodidentity.k8s.io/v1\nkind: AzurePodIdentityException\n"
        "metadata: {name: y, namespace: n}\nspec: {podLabels: {app: c}}\n",
    )
    inv = inventory(text)
    objects = plan.read_objects(inv, "east")
    assert [w.name for w in objects.workloads] == ["loose", "a", "b", "old"]  # default < n
    assert [w.name for w in objects.owned] == ["rs"]
    second_a = [w.doc for w in inv.workloads if w.name == "a"][1]
    assert objects.not_copied == (*inv.pod_identity_docs, second_a)
    assert sorted((f.subject, f.reason.split(":")[0]) for f in objects.warnings) == [
        ("Deployment/loose", "has no metadata.namespace"),
        ("n/Deployment/a", "defined twice in the export"),
        ("n/Deployment/old", "uses the removed extensions API group"),
    ]
    assert all(f.cluster == "east" for f in objects.warnings)
    assert [e.name for e in objects.exceptions["n"]] == ["y", "z"]
    assert plan.excepted_by(next(w for w in objects.workloads if w.name == "b"), objects)[0].name == "z"
    assert plan.excepted_by(next(w for w in objects.workloads if w.name == "a"), objects) == ()
    assert ("n", "Deployment", "rs") in objects.keys and ("default", "Deployment", "loose") in objects.keys


def test_resolve_identities_keeps_the_first_definition_and_client_id() -> None:
    text = join(
        azure_identity("i", CLIENT_A), azure_identity("i", CLIENT_B),  # twice: the first counts
        azure_identity("sp", CLIENT_B, identity_type=1),
        azure_identity("i", CLIENT_A, ns="other"),
        binding("z-second", "i", "s"), binding("a-first", "sp", "s"),
        binding("no-selector", "i", None), binding("no-identity", None, "s"),
        binding("elsewhere", "missing", "t"), binding("cross-ns", "i", "u", ns="third"),
    )
    known: dict[str, plan.ManagedIdentity] = {}
    resolved = plan.resolve_identities(inventory(text), "", known)
    _identity, managed, problem = resolved.pod_identities[("n", "i")]
    assert managed is not None and managed.client_id == CLIENT_A and problem is None
    assert resolved.pod_identities[("n", "sp")][1] is None
    assert "service principal" in str(resolved.pod_identities[("n", "sp")][2])
    assert list(known) == [managed.key]  # the service principal is no managed identity
    # Bindings by (namespace, selector), sorted by name; those without selector or identity left out.
    assert [b.name for b in resolved.bindings[("n", "s")]] == ["a-first", "z-second"]
    assert [b.name for b in resolved.bindings[("third", "u")]] == ["cross-ns"]
    reasons = {f.subject.rsplit("/", 1)[1]: f.reason for f in resolved.warnings}
    assert reasons["i"] == "defined twice in the export; the first definition is used"
    assert reasons["no-selector"].startswith("has no spec.selector")
    assert reasons["no-identity"].startswith("has no spec.azureIdentity")
    assert "'missing', which is not in namespace n" in reasons["elsewhere"]
    assert "exists in n/i, other/i" in reasons["cross-ns"]
    # Another cluster naming the same resource ID with another client ID is refused.
    again = plan.resolve_identities(inventory(azure_identity("i", CLIENT_B)), "west", known)
    assert again.pod_identities[("n", "i")][1] is None
    assert f"differs from {CLIENT_A}" in str(again.pod_identities[("n", "i")][2])


def test_workload_identities_default_first_by_binding_name() -> None:
    text = join(
        azure_identity("a", CLIENT_A), azure_identity("b", CLIENT_B),
        azure_identity("a-again", CLIENT_A).replace("id-a-again", "id-a"),  # same managed identity
        binding("2-b", "b", "s"), binding("1-a", "a", "s"), binding("3-a", "a-again", "s"),
        deployment("app", label="s"),
    )
    inv = inventory(text)
    found = plan.workload_identities(workload_of(text, "app"), plan.resolve_identities(inv, "", {}))
    assert [(b.binding, b.identity.client_id) for b in found.bound] == [("1-a", CLIENT_A), ("2-b", CLIENT_B)]
    assert found.problems == ()
    assert found.bindings_used == (("n", "1-a"), ("n", "2-b"), ("n", "3-a"))


@pytest.mark.parametrize(
    ("extra", "label", "problem"),
    [
        ("", "nothing", "label aadpodidbinding=nothing matches no AzureIdentityBinding selector in namespace n"),
        (binding("b", "gone", "s"), "s", "binding b refers to AzureIdentity 'gone', which is not in the export"),
        (azure_identity("sp", CLIENT_B, identity_type=2) + "---\n" + binding("b", "sp", "s"), "s",
         "AzureIdentity sp (binding b): type 2 (service principal (certificate))"),
    ],
    ids=["no-binding", "identity-missing", "not-migratable"],
)
def test_workload_identities_say_why_not(extra: str, label: str, problem: str) -> None:
    text = join(*(p for p in (extra, deployment("app", label=label)) if p))
    found = plan.workload_identities(workload_of(text, "app"), plan.resolve_identities(inventory(text), "", {}))
    assert found.bound == ()
    assert len(found.problems) == 1 and found.problems[0].startswith(problem), found.problems


IMDS_ENV = {"containers": [{"name": "app", "image": "i", "env": [
    {"name": "IMDS", "value": "http://169.254.169.254/metadata/instance?api-version=2021-02-01"}]}]}
SIGN = "container app: env[IMDS].value names /metadata/instance"
EXPLICIT_ALL = 'pod annotation azwi-netproxy.io/passthrough: "all"'
EXPLICIT_NONE = 'pod annotation azwi-netproxy.io/passthrough: "none"'


@pytest.mark.parametrize(
    ("options", "spec", "annotation", "expected"),
    [
        # No sign: no pass-through, so no uid exempted (issue 25).
        ({}, None, None, ("sidecar", "none", ())),
        ({"cni": True}, None, None, ("cni", "none", ())),
        ({}, IMDS_ENV, None, ("sidecar", "all", (SIGN,))),
        ({"cni": True}, IMDS_ENV, None, ("cni", "all", (SIGN,))),
        ({}, None, "all", ("sidecar", "all", (EXPLICIT_ALL,))),
        ({"cni": True}, IMDS_ENV, "none", ("cni", "none", (EXPLICIT_NONE,))),
        ({"node": True}, None, None, ("node", "none", ())),
        ({"node": True}, IMDS_ENV, None, ("sidecar", "all", (SIGN,))),
        ({"node": True, "cni": True}, IMDS_ENV, None, ("cni", "all", (SIGN,))),
        ({"node": True, "cni": True}, None, None, ("node", "none", ())),
        ({"node": True}, None, "all", ("sidecar", "all", (EXPLICIT_ALL,))),
        ({"node": True}, IMDS_ENV, "none", ("node", "none", ())),  # explicit wins over the signs
    ],
    ids=["default", "cni", "default-with-sign", "cni-with-sign", "explicit-all", "cni-explicit-none", "node",
         "node-with-sign", "node-cni-with-sign", "node-cni", "node-explicit-all", "node-explicit-none"],
)
def test_choose_mode(options: dict[str, Any], spec: dict[str, Any] | None, annotation: str | None,
                     expected: tuple[str, str, tuple[str, ...]]) -> None:
    text = deployment("app", label="s", spec=spec)
    if annotation is not None:
        text = text.replace("      labels:\n", f"      annotations:\n        azwi-netproxy.io/passthrough: {annotation}\n"
                            "      labels:\n", 1)
    choice = plan.choose_mode(workload_of(text, "app"), Options(**options), {})
    assert (choice.mode, choice.passthrough, choice.because) == expected
    # An explicit "none" over a sign is reported, so the plan can warn that those paths get 403.
    assert choice.overridden == ((SIGN,) if annotation == "none" and spec is IMDS_ENV else ())


@pytest.mark.parametrize(
    ("spec", "mode", "expected"),
    [
        ({"hostNetwork": True}, "sidecar", ["hostNetwork: true — the proxy's init container would install"]),
        ({"hostNetwork": True}, "cni", ["hostNetwork: true — no CNI plugin runs"]),
        ({"nodeSelector": {"kubernetes.io/os": "windows"}}, "cni",
         ["runs on Windows nodes (nodeSelector kubernetes.io/os: windows)"]),
        ({"hostNetwork": False}, "sidecar", []),
    ],
    ids=["host-network-sidecar", "host-network-cni", "windows", "none"],
)
def test_blockers_in_each_mode(spec: dict[str, Any], mode: Any, expected: list[str]) -> None:
    reasons = plan.blockers(workload_of(deployment("app", label="s", spec=spec), "app"), mode)
    assert len(reasons) == len(expected)
    assert all(r.startswith(e) for r, e in zip(reasons, expected, strict=True)), reasons


SA_DOC = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: own, namespace: n}\n"


@pytest.mark.parametrize(
    ("sa", "extra", "expected", "note"),
    [
        (None, "", ("app-wi", "create"), "used the implicit default service account: now uses its own, app-wi"),
        ("default", "", ("app-wi", "create"), "used the default service account: now uses its own, app-wi"),
        ("own", SA_DOC, ("own", "patch"), None),
        ("own", SA_DOC.replace("n}", f"n, annotations: {{azure.workload.identity/client-id: {CLIENT_B}}}}}"),
         ("own", "patch"), f"service account own had azure.workload.identity/client-id {CLIENT_B}: replaced by {CLIENT_A}"),
        ("own", "", ("own", "create-missing"), "service account own is not in the export"),
        ("default", SA_DOC.replace("name: own", "name: app-wi"), ("app-wi", "patch"),
         "used the default service account: now uses its own, app-wi"),
    ],
    ids=["implicit-default", "default", "exported", "exported-other-client", "not-exported", "own-already-exported"],
)
def test_service_account_for(sa: str | None, extra: str, expected: tuple[str, str], note: str | None) -> None:
    text = join(*(p for p in (extra, deployment("app", label="s", sa=sa)) if p))
    inv = inventory(text)
    choice = plan.service_account_for(workload_of(text, "app"), CLIENT_A, inv.service_accounts)
    assert (choice.name, choice.action) == expected
    assert (choice.doc is not None) == (choice.action == "patch")
    if note is None:
        assert choice.notes == ()
    else:
        assert any(n.startswith(note) for n in choice.notes), choice.notes


@pytest.mark.parametrize(
    ("containers", "port"),
    [
        ([{"name": "app", "image": "i"}], 8000),
        ([{"name": "app", "image": "i", "ports": [{"containerPort": 8000}, {"containerPort": 8001}]}], 8002),
        ([{"name": "app", "image": "i", "ports": [{"containerPort": 8000, "protocol": "UDP"}]}], 8000),
        ([{"name": "azwi-proxy", "image": "p", "ports": [{"containerPort": 8000}]}], 8000),
    ],
    ids=["free", "taken-twice", "udp-does-not-count", "our-old-proxy-does-not-count"],
)
def test_proxy_port_for(containers: list[dict[str, Any]], port: int) -> None:
    workload = workload_of(deployment("app", label="s", spec={"containers": containers}), "app")
    chosen, notes = plan.proxy_port_for(workload, 8000)
    assert chosen == port
    assert notes == (() if port == 8000 else (f"a container declares port 8000: the proxy listens on {port} instead",))


def test_selectors_that_cut_over_would_empty() -> None:
    text = join(
        deployment("app", label="s", selected_by_label=True),
        deployment("other", label="s"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np, namespace: n}\n"
        "spec: {podSelector: {matchLabels: {aadpodidbinding: s}}}\n",
        "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata: {name: pdb, namespace: n}\n"
        "spec: {selector: {matchExpressions: [{key: aadpodidbinding, operator: Exists}]}}\n",
        "apiVersion: v1\nkind: Service\nmetadata: {name: svc, namespace: n}\n"
        "spec: {selector: {aadpodidbinding: other-value}}\n",
        "apiVersion: v1\nkind: Service\nmetadata: {name: elsewhere, namespace: m}\n"
        "spec: {selector: {aadpodidbinding: s}}\n",
        deployment("rs", label="s", owner="Deployment/app", kind="ReplicaSet", selected_by_label=True),
    )
    inv = inventory(text)
    selectors = plan.label_selectors(inv.documents)
    app, other = (next(w for w in inv.workloads if w.name == name) for name in ("app", "other"))
    assert sorted(s.label for s in selectors["n"]) == [
        "Deployment/app spec.selector.matchLabels",
        "NetworkPolicy/np spec.podSelector.matchLabels",
        "PodDisruptionBudget/pdb spec.selector.matchExpressions.[0]",
        "Service/svc spec.selector",
    ]  # the owned ReplicaSet's copy of its owner's selector does not count
    assert [s.labels for s in selectors["n"] if s.label.startswith("PodDisruptionBudget")] == [None]
    assert plan.selectors_emptied_by_cut_over(selectors, app) == (
        "NetworkPolicy/np spec.podSelector.matchLabels",
        "PodDisruptionBudget/pdb spec.selector.matchExpressions.[0]",  # not evaluated: assumed to select
        "its own spec.selector.matchLabels",
    )
    assert plan.selectors_emptied_by_cut_over(selectors, other) == (
        "NetworkPolicy/np spec.podSelector.matchLabels",
        "PodDisruptionBudget/pdb spec.selector.matchExpressions.[0]",
    )


def _client_of(identity_name: str) -> str:
    """A client ID of its own for each identity name (the map refuses one listed twice)."""
    return "9a9a9a9a-0000-4000-8000-" + hashlib.sha256(identity_name.encode()).hexdigest()[:12]


def _candidate(name: str, sa: str, *identity_names: str, kind: str = "Deployment") -> plan.WorkloadPlan:
    workload = workload_of(deployment(name, label="s", sa=sa, kind=kind), name)
    bound = tuple(
        plan.BoundIdentity(f"b-{i}", i, plan.ManagedIdentity(RID.format(name=i), _client_of(i), "sub", "rg", i))
        for i in identity_names
    )
    return plan.WorkloadPlan("", workload, bound, sa, "patch", None, 8000, False)


def test_agree_on_service_accounts() -> None:
    one, two = _candidate("one", "shared", "x"), _candidate("two", "shared", "x")
    three, four = _candidate("three", "mixed", "x"), _candidate("four", "mixed", "x", "y")
    alone = _candidate("alone", "own", "y")
    migrated, refused = plan.agree_on_service_accounts([one, two, three, four, alone], "c")
    assert [wp.workload.name for wp in migrated] == ["alone", "one", "two"]
    assert sorted(f.subject for f in refused) == ["n/Deployment/four", "n/Deployment/three"]
    assert all(
        f.reason.startswith("shares service account n/mixed with workloads that use other identities "
                            "(Deployment/three uses x; Deployment/four uses x, y)")
        for f in refused
    )


def test_leave_out_runtime_objects() -> None:
    text = join(
        deployment("app", label="s"),
        deployment("app-rs", label="s", owner="Deployment/app", kind="ReplicaSet"),
        deployment("app-rs-pod", label="s", owner="ReplicaSet/app-rs"),
        deployment("orphan", label="s", owner="Deployment/gone"),
        deployment("plain", owner="Deployment/gone"),  # no pod identity: nothing to say
        deployment("kept", label="s", owner="Deployment/unmigrated"),
        deployment("unmigrated", label="t"),
    )
    inv = inventory(text)
    objects = plan.read_objects(inv, "")
    migrated = [_candidate("app", "app", "x")]
    migrated[0].workload = next(w for w in objects.workloads if w.name == "app")
    runtime = plan.leave_out_runtime_objects(objects.owned, migrated, objects.keys, "")
    assert sorted(f.subject for f in runtime.omitted) == ["n/Deployment/app-rs-pod", "n/ReplicaSet/app-rs"]
    assert {id(d) for d in runtime.not_copied} == {
        id(w.doc) for w in inv.workloads if w.name in ("app-rs", "app-rs-pod")
    }
    (orphan,) = runtime.not_migrated
    assert orphan.subject == "n/Deployment/orphan"
    assert orphan.reason.startswith("created by Deployment/gone, which is not in the export")


def test_service_account_warnings_name_workloads_that_gain_identities() -> None:
    text = join(deployment("app", label="s", sa="shared"), deployment("cron", sa="shared"),
                deployment("mine", sa="other"), deployment("rs", sa="shared", owner="Deployment/app"))
    inv = inventory(text)
    wp = _candidate("app", "shared", "x")
    wp.workload = next(w for w in inv.workloads if w.name == "app")
    (warning,) = plan.service_account_warnings(inv.workloads, [wp], "")
    assert warning.subject == "n/Deployment/cron"
    assert warning.reason.startswith("is not migrated but runs as service account shared, which the migration "
                                     "federates with x")
    # A workload on the implicit default service account is on "default".
    implicit = join(deployment("app", label="s", sa="default"), deployment("bare"))
    inv = inventory(implicit)
    wp = _candidate("app", "default", "x")
    wp.workload = next(w for w in inv.workloads if w.name == "app")
    assert [f.subject for f in plan.service_account_warnings(inv.workloads, [wp], "")] == ["n/Deployment/bare"]


def test_identity_table_rows_and_unused_warnings() -> None:
    text = join(azure_identity("used", CLIENT_A), azure_identity("idle", CLIENT_B),
                azure_identity("unbound", CLIENT_B).replace("id-unbound", "id-idle"),
                binding("b-used", "used", "s"), binding("b-idle", "idle", "nobody"))
    inv = inventory(text)
    resolved = plan.resolve_identities(inv, "", {})
    wp = _candidate("app", "app", "used")
    rows, warnings = plan.identity_table(resolved, inv.bindings, {("n", "b-used")}, [wp], "")
    assert [(r.pod_identity.name, r.bindings, r.used_by) for r in rows] == [
        ("idle", ("b-idle",), ()), ("unbound", (), ()), ("used", ("b-used",), ("n/Deployment/app",)),
    ]
    assert sorted((f.subject, f.reason) for f in warnings) == [
        ("n/AzureIdentity/unbound", "no AzureIdentityBinding refers to it: no pod used it"),
        ("n/AzureIdentityBinding/b-idle", "no workload in the export has the label aadpodidbinding=nobody"),
    ]


def test_fic_budget_switches_identities_over_the_limit_to_identity_binding() -> None:
    result = plan.Plan(options=Options(fic_limit=2), multi_cluster=False)
    result.workloads = [
        _candidate("a", "sa-a", "big"), _candidate("b", "sa-b", "big"), _candidate("c", "sa-c", "big", "small"),
        _candidate("d", "sa-d", "small"), _candidate("e", "sa-d", "small"),  # one subject, one FIC
    ]
    plan.fic_budget(result, {})
    assert [wp.identity_binding for wp in result.workloads] == [True, True, True, False, False]
    lines = {line.identity.name: line for line in result.budget}
    assert (lines["big"].needed, lines["big"].planned, lines["big"].over_limit) == (3, 0, True)
    assert (lines["small"].needed, lines["small"].planned, lines["small"].over_limit) == (2, 1, False)
    (fic,) = result.fics
    assert (fic.identity.name, fic.subject, fic.name, fic.used_by) == (
        "small", "system:serviceaccount:n:sa-d", "n-sa-d", ("n/Deployment/d", "n/Deployment/e"))
    reasons = {(need.identity.name, need.reason) for need in result.identity_bindings}
    assert reasons == {("big", "needs 3 FICs, over the limit of 2"),
                       ("small", "used by a workload that needs identity binding for another identity")}


# ---------------------------------------------------------------------------- signs of needing instance metadata

def _pod(containers: list[dict[str, Any]], *, inits: list[dict[str, Any]] | None = None,
         volumes: list[dict[str, Any]] | None = None, annotation: str | None = None) -> model.Workload:
    spec: dict[str, Any] = {"containers": containers}
    if inits:
        spec["initContainers"] = inits
    if volumes:
        spec["volumes"] = volumes
    meta: dict[str, Any] = {"name": "p", "namespace": "n", "labels": {"aadpodidbinding": "s"}}
    if annotation is not None:
        meta["annotations"] = {"azwi-netproxy.io/passthrough": annotation}
    return workload_of(dump_yaml({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}), "p")


def _env(value: str) -> list[dict[str, Any]]:
    return [{"name": "app", "image": "i", "env": [{"name": "URL", "value": value}]}]


CONFIG = {("n", "settings"): {"ENDPOINT": "http://169.254.169.254/metadata/scheduledevents?api-version=2020-07-01",
                               "OTHER": "x"},
          ("n", "plain"): {"A": "b"}}


@pytest.mark.parametrize(
    ("workload", "signs"),
    [
        (_pod(_env("http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01")), []),
        (_pod(_env("http://169.254.169.254/METADATA/identity/oauth2/token")), []),  # as the proxy reads it
        (_pod(_env("http://169.254.169.254")), ["container app: env[URL].value names 169.254.169.254 (not only its identity paths)"]),
        (_pod(_env("169.254.169.254:80")), ["container app: env[URL].value names 169.254.169.254 (not only its identity paths)"]),
        (_pod(_env("http://169.254.169.254/metadata/instance/compute?api-version=2021-02-01")),
         ["container app: env[URL].value names /metadata/instance/compute"]),
        (_pod([{"name": "app", "image": "i", "args": ["--source", "Metadata/Instance"]}]),
         ["container app: args[1] names /Metadata/Instance"]),
        (_pod([{"name": "app", "image": "i", "command": ["sh", "-c", "curl -H Metadata:true "
                                                          "'http://169.254.169.254/metadata/attested/document'"]}]),
         ["container app: command[2] names /metadata/attested/document"]),
        (_pod([{"name": "app", "image": "i", "livenessProbe": {"exec": {"command": [
            "curl", "http://169.254.169.254/metadata/versions"]}}}]),
         ["container app: livenessProbe.exec.command[1] names /metadata/versions"]),
        (_pod([{"name": "app", "image": "i"}], inits=[{"name": "wait", "image": "i", "args": ["metadata/loadbalancer"]}]),
         ["container wait: args[0] names /metadata/loadbalancer"]),
        (_pod(_env("http://169.254.169.254/metadata/identity/info")), []),  # refused by the proxy, never forwarded
        (_pod(_env("http://metadata.google.internal/computeMetadata/v1/instance")), []),  # not Azure's
        (_pod([{"name": "app", "image": "registry.example/metadata/instance-agent:1"}]), []),  # images are not read
        (_pod([{"name": "app", "image": "i", "envFrom": [{"configMapRef": {"name": "settings"}}]}]),
         ["container app: ConfigMap settings (envFrom) key ENDPOINT names /metadata/scheduledevents"]),
        (_pod([{"name": "app", "image": "i", "env": [{"name": "E", "valueFrom": {"configMapKeyRef": {
            "name": "settings", "key": "OTHER"}}}]}]),
         ["container app: ConfigMap settings (env E) key ENDPOINT names /metadata/scheduledevents"]),
        (_pod([{"name": "app", "image": "i", "volumeMounts": [{"name": "cfg", "mountPath": "/etc/app"}]}],
              volumes=[{"name": "cfg", "projected": {"sources": [{"configMap": {"name": "settings"}}]}}]),
         ["container app: ConfigMap settings (volume cfg) key ENDPOINT names /metadata/scheduledevents"]),
        # A volume no container mounts, a ConfigMap not in the export, one without a sign: nothing.
        (_pod([{"name": "app", "image": "i", "envFrom": [{"configMapRef": {"name": "missing"}},
                                                          {"configMapRef": {"name": "plain"}}]}],
              volumes=[{"name": "cfg", "configMap": {"name": "settings"}}]), []),
        # A previous migration's proxy names IMDS by design.
        (_pod([{"name": "azwi-proxy", "image": "p", "env": [{"name": "U", "value": "http://169.254.169.254"}]},
               {"name": "app", "image": "i"}]), []),
    ],
    ids=["token-url", "token-url-case", "base-url", "address-and-port", "instance", "path-alone-any-case",
         "attested-in-command", "probe", "init-container", "identity-info", "gcp", "image-name", "envfrom-configmap",
         "configmap-key-ref", "projected-volume", "nothing-readable", "our-proxy"],
)
def test_signs_of_needing_instance_metadata(workload: model.Workload, signs: list[str]) -> None:
    use = signs_module.metadata_use(workload, CONFIG)
    assert list(use.signs) == signs
    assert use.explicit is None and use.needs_passthrough is bool(signs) and use.because == tuple(signs)


@pytest.mark.parametrize(
    ("annotation", "explicit", "needs", "because"),
    [
        ("all", "all", True, ('pod annotation azwi-netproxy.io/passthrough: "all"',)),
        (" ALL ", "all", True, ('pod annotation azwi-netproxy.io/passthrough: "all"',)),
        ("none", "none", False, ('pod annotation azwi-netproxy.io/passthrough: "none"',)),
        ("maybe", None, True, ("container app: env[URL].value names 169.254.169.254 (not only its identity paths)",)),
    ],
    ids=["all", "all-spaced", "none", "not-a-choice"],
)
def test_the_explicit_annotation_decides_over_the_signs(
    annotation: str, explicit: str | None, needs: bool, because: tuple[str, ...]
) -> None:
    use = signs_module.metadata_use(_pod(_env("http://169.254.169.254"), annotation=annotation), {})
    assert (use.explicit, use.needs_passthrough, use.because) == (explicit, needs, because)


def test_a_pass_through_annotation_that_is_no_choice_blocks_the_workload() -> None:
    (reason,) = plan.blockers(_pod(_env("x"), annotation="maybe"), "sidecar")
    assert reason.startswith("pod annotation azwi-netproxy.io/passthrough: 'maybe' is neither all nor none")
    assert plan.blockers(_pod(_env("x"), annotation="None"), "cni") == []


def test_service_account_tenant_is_carried_when_it_is_a_guid() -> None:
    tenant = "72F988BF-86F1-41AF-91AB-2D7CD011DB47"
    for value, expected in ((tenant, tenant.lower()), ("contoso.onmicrosoft.com", None)):
        text = join(SA_DOC.replace("n}", f"n, annotations: {{azure.workload.identity/tenant-id: {value}}}}}"),
                    deployment("app", label="s", sa="own"))
        choice = plan.service_account_for(workload_of(text, "app"), CLIENT_A, inventory(text).service_accounts)
        assert choice.tenant_id == expected


def test_node_mode_gives_way_to_identity_binding_after_the_budget() -> None:
    result = plan.Plan(options=Options(fic_limit=1, node=True), multi_cluster=False)
    result.workloads = [_candidate("a", "sa-a", "big"), _candidate("b", "sa-b", "big"), _candidate("c", "sa-c", "small")]
    for wp in result.workloads:
        wp.mode, wp.passthrough = "node", "none"
    plan.fic_budget(result, {})
    plan.modes_after_budget(result)
    # They were in node mode, so nothing asked for pass-through: the sidecar gets none too.
    assert [(wp.mode, wp.passthrough, wp.identity_binding) for wp in result.workloads] == [
        ("sidecar", "none", True), ("sidecar", "none", True), ("node", "none", False)]
    assert result.workloads[0].mode_because == (plan.NODE_NO_IDENTITY_BINDING,)
    assert result.workloads[2].mode_because == ()


def test_node_mode_identity_map_is_compact_json_the_proxy_accepts() -> None:
    wp = _candidate("app", "app", "one", "two")
    text = render_module.identity_map_json(wp)
    assert " " not in text and "\n" not in text and text.startswith("{")
    parsed = parse_identity_map(text, source="annotation")
    assert parsed.only_listed
    assert [(i.client_id, i.resource_id) for i in parsed.identities] == [
        (b.identity.client_id, b.identity.resource_id) for b in wp.identities]
    # The same map as the file a sidecar mounts.
    assert parse_identity_map(render_module.identity_map_text(wp)) == parsed


# ---------------------------------------------------------------------------- pass-through in the plan and the files

PASSTHROUGH_EXPORT = join(
    azure_identity("i", CLIENT_A), binding("b", "i", "s"),
    deployment("quiet", label="s"),
    deployment("reader", label="s", spec=IMDS_ENV),
    deployment("decided", label="s", spec=IMDS_ENV).replace(
        "      labels:\n", "      annotations:\n        azwi-netproxy.io/passthrough: none\n      labels:\n", 1),
)


def _files(**options: Any) -> dict[str, Any]:
    files = render(plan_of(PASSTHROUGH_EXPORT, **options))
    return {path: model.load_yaml(f.content) for path, f in files.items() if path.startswith("manifests/n/deployment-")}


def _containers(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = obj["spec"]["template"]["spec"]
    return {c["name"]: c for c in [*spec.get("initContainers", []), *spec["containers"]]}


def test_sidecar_mode_writes_none_on_both_containers_unless_a_sign_keeps_pass_through() -> None:
    files = _files()
    for name in ("quiet", "decided"):
        obj = files[f"manifests/n/deployment-{name}.yaml"]
        ours = _containers(obj)
        assert ours["azwi-proxy-init"]["env"] == [{"name": "PROXY_PORT", "value": "8000"},
                                                  {"name": "AZWI_PASSTHROUGH", "value": "none"}], name
        assert ours["azwi-proxy"]["env"] == [{"name": "AZWI_PASSTHROUGH", "value": "none"}], name
        assert "azure.workload.identity/inject-proxy-sidecar" not in str(obj), name
    reader = files["manifests/n/deployment-reader.yaml"]
    assert "azwi-proxy" not in _containers(reader)  # the webhook injects them, with pass-through
    assert reader["spec"]["template"]["metadata"]["annotations"]["azure.workload.identity/inject-proxy-sidecar"] == "true"
    result = plan_of(PASSTHROUGH_EXPORT)
    (warning,) = [w for w in result.warnings if w.subject == "n/Deployment/decided"]
    assert warning.reason == (f'its pod annotation azwi-netproxy.io/passthrough: "none" closes pass-through, but '
                              f"{SIGN}: requests for those paths will get 403")


def test_cni_mode_writes_the_plugins_annotation_and_none_on_the_proxy() -> None:
    files = _files(cni=True)
    quiet = files["manifests/n/deployment-quiet.yaml"]
    assert quiet["spec"]["template"]["metadata"]["annotations"]["azwi-netproxy.io/passthrough"] == "none"
    assert _containers(quiet)["azwi-proxy"]["env"] == [{"name": "AZWI_PASSTHROUGH", "value": "none"}]
    assert "azwi-proxy-init" not in _containers(quiet)
    reader = files["manifests/n/deployment-reader.yaml"]
    assert "azwi-netproxy.io/passthrough" not in reader["spec"]["template"]["metadata"]["annotations"]
    assert "env" not in _containers(reader)["azwi-proxy"]
