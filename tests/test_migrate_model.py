"""The pure parts of azwi-netproxy-migrate: YAML loading, pod identity parsing, plan rules.

Name: test_migrate_model
Scope: model.py and plan.py through their functions, on small inline documents; no files.
Depends: hypothesis for the FIC name property.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from azwi_netproxy.errors import ConfigError
from azwi_netproxy.migrate import model, plan
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
