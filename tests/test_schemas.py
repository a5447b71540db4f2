"""Every manifest in deploy/ and every one azwi-netproxy-migrate writes, against the Kubernetes API schemas.

The schemas are the API server's OpenAPI, as the kubernetes-validate package ships them for
each minor version, in their strict form: a field the API does not know is refused (as
`kubectl apply --validate=strict` refuses it), as is a value of the wrong type or a missing
required field. The same check is shown to refuse deliberately broken manifests, so a pass
means something.

Versions. The project states no oldest Kubernetes version: deploy/README.md says the classic
sidecar runs on "any Kubernetes version" and names 1.29 only as the floor of native sidecars.
So everything is validated against OLDEST, the oldest minor kubernetes-validate ships, and
against the newest it ships. A document with a native sidecar (an init container with
`restartPolicy`: alpha behind a feature gate in 1.28, beta and on by default from 1.29) is
validated against 1.29 instead of OLDEST, the oldest version that runs it; that the 1.25
schema refuses such a document is checked too, so the floor is not a formality.

Custom resources are not in those schemas. aad-pod-identity's kinds have their reason in
CUSTOM_RESOURCES; a custom resource copied into migrate's unchanged/ from the user's export is
skipped with a reason naming its kind. Every skip is returned and asserted, never silent; a
kind without a schema anywhere else is a failure.

Name: test_schemas
Scope: function; migrate's outputs are built once per module (tmp_path_factory).
Depends: kubernetes-validate (the `test` extra), PyYAML; runs azwi_netproxy.migrate.cli.main
in process, on the fixtures of tests/test_migrate.py (its export, the multi-cluster form,
the two-identity Jobs).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from test_migrate import EXPORT, FIXTURES, ISSUER, MIXED, TWO_IDENTITIES, cluster_export

from azwi_netproxy.migrate.cli import main

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate (the test extra) holds the Kubernetes schemas"
)

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
OLDEST = "1.25"
NEWEST = kubernetes_validate.utils.major_minor(kubernetes_validate.latest_version())
NATIVE_SIDECAR_SINCE = "1.29"
CUSTOM_RESOURCES = {
    ("aadpodidentity.k8s.io", "AzureIdentity"): "aad-pod-identity's CRD: not in the Kubernetes OpenAPI",
    (
        "aadpodidentity.k8s.io",
        "AzureIdentityBinding",
    ): "aad-pod-identity's CRD: not in the Kubernetes OpenAPI",
    (
        "aadpodidentity.k8s.io",
        "AzurePodIdentityException",
    ): "aad-pod-identity's CRD: not in the Kubernetes OpenAPI",
    (
        "aadpodidentity.k8s.io",
        "AzureAssignedIdentity",
    ): "aad-pod-identity's CRD (written by its MIC): not in the Kubernetes OpenAPI",
}


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


class KubernetesLoader(yaml.SafeLoader):
    """YAML as the API server reads it (through JSON): an unquoted timestamp stays a string.

    PyYAML would make `2024-01-01T10:00:00Z` a datetime, which no schema accepts as the
    string Kubernetes sees.
    """

    yaml_implicit_resolvers: ClassVar[dict[Any, Any]] = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


def load(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, object) of every object in a file; a List's items one by one, as kubectl applies them."""
    found: list[tuple[str, dict[str, Any]]] = []
    for index, doc in enumerate(yaml.load_all(path.read_text("utf-8"), Loader=KubernetesLoader)):
        if doc is None:
            continue
        assert isinstance(doc, dict), f"{path}#{index} is not a mapping"
        items = doc.get("items") if doc.get("kind") == "List" else [doc]
        found += [(f"{path.name}#{index}", item) for item in items or []]
    return found


def group_of(obj: dict[str, Any]) -> str:
    api_version = str(obj.get("apiVersion", ""))
    return api_version.split("/", 1)[0] if "/" in api_version else ""


def has_native_sidecar(obj: Any) -> bool:
    """Whether any pod spec in `obj` has an init container with a restartPolicy."""
    if isinstance(obj, dict):
        inits = obj.get("initContainers")
        if isinstance(inits, list) and any(isinstance(c, dict) and "restartPolicy" in c for c in inits):
            return True
        return any(has_native_sidecar(value) for value in obj.values())
    if isinstance(obj, list):
        return any(has_native_sidecar(value) for value in obj)
    return False


def versions_for(obj: dict[str, Any]) -> list[str]:
    """The oldest version that runs the object (see the module docstring) and the newest."""
    oldest = NATIVE_SIDECAR_SINCE if has_native_sidecar(obj) else OLDEST
    return [oldest, NEWEST]


class SchemaReport:
    """What the check found: problems (each a failure) and skipped objects (each with its reason)."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.skipped: list[tuple[str, str]] = []  # (where kind/name, reason)
        self.validated = 0


def check_objects(
    objects: list[tuple[str, dict[str, Any]]],
    *,
    user_copies: bool = False,
    versions: Callable[[dict[str, Any]], list[str]] = versions_for,
) -> SchemaReport:
    """Validate every object strictly. `user_copies`: objects copied from a user's export, whose
    custom resources (no built-in schema) are skipped with a reason instead of failing."""
    report = SchemaReport()
    for where, obj in objects:
        kind = str(obj.get("kind"))
        label = f"{where} {kind}/{(obj.get('metadata') or {}).get('name')}"
        reason = CUSTOM_RESOURCES.get((group_of(obj), kind))
        if reason is not None:
            report.skipped.append((label, f"{kind}.{group_of(obj)}: {reason}"))
            continue
        for version in versions(obj):
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                report.problems.append(f"{label} against {version}: {path}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError:
                if user_copies and "." in group_of(obj):
                    report.skipped.append(
                        (
                            label,
                            f"{kind}.{group_of(obj)}: a custom resource copied unchanged from the export; "
                            f"its schema is its CRD's, not in the Kubernetes OpenAPI",
                        )
                    )
                    break
                report.problems.append(
                    f"{label}: no Kubernetes {version} schema for {obj.get('apiVersion')} {kind}, and no "
                    f"reason to skip it"
                )
            else:
                report.validated += 1
    return report


def test_the_versions_are_shipped() -> None:
    shipped = {kubernetes_validate.utils.major_minor(v) for v in kubernetes_validate.utils.all_versions()}
    assert {OLDEST, NATIVE_SIDECAR_SINCE, NEWEST} <= shipped, sorted(shipped)
    assert _version_key(NEWEST) >= (1, 32)  # upstream's webhook injects native sidecars from 1.32


# ---- deploy/ ----

DEPLOY_FILES = sorted(DEPLOY.rglob("*.yaml"))


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_deploy_manifest_matches_the_kubernetes_schemas(path: Path) -> None:
    objects = load(path)
    report = check_objects(objects)
    assert report.problems == []
    assert report.skipped == []  # deploy/ holds no custom resources
    assert report.validated == 2 * len(objects)


def test_native_sidecars_are_validated_from_1_29_because_1_25_refuses_them() -> None:
    (deployment,) = [
        obj for _, obj in load(DEPLOY / "manual/native-sidecar.yaml") if obj["kind"] == "Deployment"
    ]
    assert versions_for(deployment) == [NATIVE_SIDECAR_SINCE, NEWEST]
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicy"):
        kubernetes_validate.validate(deployment, OLDEST, strict=True)
    (classic,) = [
        obj for _, obj in load(DEPLOY / "manual/classic-sidecar.yaml") if obj["kind"] == "Deployment"
    ]
    assert versions_for(classic) == [OLDEST, NEWEST]


# ---- the same check refuses broken manifests ----


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


BROKEN: list[tuple[str, str, Callable[[dict[str, Any]], None], str]] = [
    (
        "unknown container field",
        "manual/classic-sidecar.yaml",
        lambda o: _pod_spec(o)["containers"][0].update({"imagePullPolicyy": "Always"}),
        "imagePullPolicyy",
    ),
    ("unknown pod field", "cni/pod.yaml", lambda o: _pod_spec(o).update({"sidecars": []}), "sidecars"),
    (
        "unknown metadata field",
        "webhook/single-identity.yaml",
        lambda o: o["metadata"].update({"annotation": {"a": "b"}}),
        "annotation",
    ),
    (
        "unknown hostPath field",
        "cni/node-agent.yaml",
        lambda o: _pod_spec(o)["volumes"][0]["hostPath"].update({"readOnly": True}),
        "readOnly",
    ),
    (
        "replicas as a string",
        "webhook/multi-identity.yaml",
        lambda o: o["spec"].update({"replicas": "2"}),
        "'2'",
    ),
    (
        "boolean as a string",
        "cni/pod.yaml",
        lambda o: _pod_spec(o)["initContainers"][0]["securityContext"].update({"runAsNonRoot": "true"}),
        "'true'",
    ),
    (
        "port as a string",
        "no-init/sidecar-only.yaml",
        lambda o: _pod_spec(o)["containers"][0].update({"ports": [{"containerPort": "8000"}]}),
        "'8000'",
    ),
    (
        "args not a list",
        "manual/native-sidecar.yaml",
        lambda o: _pod_spec(o)["initContainers"][1].update({"args": "--proxy-port=8000"}),
        "--proxy-port=8000",
    ),
    (
        "container without a name",
        "webhook/identity-binding.yaml",
        lambda o: _pod_spec(o)["containers"][0].pop("name"),
        "'name' is a required property",
    ),
    (
        "env value a number",
        "cni/node-agent.yaml",
        lambda o: _pod_spec(o)["containers"][0]["env"][0].update({"value": 1}),
        "1 is not of type",
    ),
    (
        "unknown volumeMount field",
        "node/node-agent.yaml",
        lambda o: _pod_spec(o)["containers"][1]["volumeMounts"][0].update({"propagation": "HostToContainer"}),
        "propagation",
    ),
    (
        "readOnly as a string",
        "node/node-agent.yaml",
        lambda o: _pod_spec(o)["containers"][1]["volumeMounts"][0].update({"readOnly": "true"}),
        "'true'",
    ),
    (
        "annotation not a string",
        "node/pod.yaml",
        lambda o: o["spec"]["template"]["metadata"]["annotations"].update({"azwi-netproxy.io/proxy-port": 8000}),
        "8000",
    ),
]


@pytest.mark.parametrize(
    ("name", "mutate", "expected"), [(n, m, e) for _, n, m, e in BROKEN], ids=[i for i, _, _, _ in BROKEN]
)
def test_the_same_check_refuses_a_broken_manifest(
    name: str, mutate: Callable[[dict[str, Any]], None], expected: str
) -> None:
    objects = load(DEPLOY / name)
    broken = []
    for where, original in objects:
        obj = copy.deepcopy(original)
        if obj["kind"] in ("Deployment", "DaemonSet"):
            mutate(obj)
        broken.append((where, obj))
    report = check_objects(broken)
    for version in versions_for(next(o for _, o in broken if o["kind"] in ("Deployment", "DaemonSet"))):
        assert any(f"against {version}" in p and expected in p for p in report.problems), (
            version,
            report.problems,
        )


def test_a_kind_without_a_schema_fails_unless_it_has_a_reason() -> None:
    identity = {
        "apiVersion": "aadpodidentity.k8s.io/v1",
        "kind": "AzureIdentity",
        "metadata": {"name": "kv-reader", "namespace": "orders"},
        "spec": {"type": 0},
    }
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    report = check_objects([("a#0", identity), ("a#1", unknown)])
    assert report.skipped == [
        (
            "a#0 AzureIdentity/kv-reader",
            "AzureIdentity.aadpodidentity.k8s.io: "
            + CUSTOM_RESOURCES[("aadpodidentity.k8s.io", "AzureIdentity")],
        )
    ]
    assert len(report.problems) == 2 and all(
        "Widget" in p and "no reason to skip" in p for p in report.problems
    )
    # Copied from a user's export, an unknown custom resource is skipped, and says why.
    report = check_objects([("a#1", unknown)], user_copies=True)
    assert report.problems == [] and [label for label, _ in report.skipped] == ["a#1 Widget/w"]
    assert "copied unchanged from the export" in report.skipped[0][1]


# ---- what azwi-netproxy-migrate writes ----


def _migrate(argv: list[str], cwd: Path = FIXTURES) -> None:
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        assert main(argv) == 0
    finally:
        os.chdir(previous)


def _multi_cluster(out: Path, work: Path, *extra: str) -> None:
    argv = ["-o", str(out), *extra]
    for number, cluster in enumerate(("east", "west", "north")):
        path = work / f"{cluster}.yaml"
        path.write_text(cluster_export(8, MIXED if cluster == "east" else ""))
        argv += ["--cluster", cluster, f"https://{cluster}.oic.example/tenant/{number}/", str(path)]
    _migrate(argv)


def _two_identities(out: Path, work: Path, *extra: str) -> None:
    (work / "jobs.yaml").write_text(TWO_IDENTITIES)
    _migrate(["-o", str(out), *extra, str(work / "jobs.yaml")])


SCENARIOS: dict[str, Callable[[Path, Path], None]] = {
    "fixture": lambda out, _: _migrate(["-o", str(out), "--issuer", ISSUER, "export"]),
    "fixture-cut-over": lambda out, _: _migrate(
        ["-o", str(out), "--issuer", ISSUER, "--remove-aadpodidbinding", "export"]
    ),
    "fixture-cni": lambda out, _: _migrate(["-o", str(out), "--issuer", ISSUER, "--cni", "export"]),
    "multi-cluster": _multi_cluster,
    "multi-cluster-cni": lambda out, work: _multi_cluster(out, work, "--cni"),
    "jobs-two-identities": _two_identities,
    "jobs-two-identities-cni": lambda out, work: _two_identities(out, work, "--cni"),
    "fixture-node": lambda out, _: _migrate(["-o", str(out), "--issuer", ISSUER, "--node", "export"]),
    "multi-cluster-node": lambda out, work: _multi_cluster(out, work, "--node"),
    "jobs-two-identities-node": lambda out, work: _two_identities(out, work, "--node"),
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Name: outputs. Scope: module. Depends: tmp_path_factory.

    migrate's output directory for each scenario, built once (pytest removes them).
    """
    built: dict[str, Path] = {}
    for name, build in SCENARIOS.items():
        work = tmp_path_factory.mktemp(name)
        build(work / "out", work)
        built[name] = work / "out"
    return built


def written_manifests(out: Path) -> Iterator[tuple[Path, bool]]:
    """(file, copied from the export) for every Kubernetes manifest migrate wrote.

    identity-maps/ (proxy configuration, no Kubernetes objects), fics.json, the script and
    REPORT.md are not manifests; the maps are checked inside their ConfigMaps.
    """
    for path in sorted((out / "manifests").rglob("*")):
        if path.is_file():
            yield path, False
    for path in sorted((out / "unchanged").rglob("*")):
        if path.is_file():
            yield path, True


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_migrate_output_matches_the_kubernetes_schemas(scenario: str, outputs: dict[str, Path]) -> None:
    out = outputs[scenario]
    files = list(written_manifests(out))
    assert any(not copied for _, copied in files)
    generated = [obj for path, copied in files if not copied for obj in load(path)]
    report = check_objects(generated)
    assert report.problems == [] and report.skipped == []  # migrate generates no custom resources
    assert report.validated == 2 * len(generated)
    copies = [obj for path, copied in files if copied for obj in load(path)]
    report = check_objects(copies, user_copies=True)
    assert report.problems == []
    # The fixtures hold no custom resources beyond pod identity's, which are never copied.
    assert report.skipped == []
    if scenario.endswith("-cni"):
        assert any(has_native_sidecar(obj) for _, obj in generated)
    if scenario.endswith("-node"):
        templates = [t for _, obj in generated if (t := _template(obj)) is not None]
        assert any("azwi-netproxy.io/node-proxy" in (t["metadata"].get("annotations") or {}) for t in templates)


def _template(obj: dict[str, Any]) -> dict[str, Any] | None:
    """A workload's pod template, or None for other kinds."""
    if obj["kind"] == "Pod":
        return obj
    if obj["kind"] == "CronJob":
        template: dict[str, Any] = obj["spec"]["jobTemplate"]["spec"]["template"]
        return template
    return obj.get("spec", {}).get("template") if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job") else None


def test_a_custom_resource_of_the_export_is_skipped_with_its_reason(tmp_path: Path) -> None:
    export = tmp_path / "export.yaml"
    export.write_text(
        (EXPORT / "pod-identity.yaml").read_text()
        + "\n---\n"
        + (EXPORT / "payments.yaml").read_text()
        + "\n---\napiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\n"
        "metadata: {name: payments, namespace: payments}\nspec: {endpoints: [{port: metrics}]}\n"
    )
    out = tmp_path / "out"
    _migrate(["-o", str(out), "--cni", str(export)])
    files = list(written_manifests(out))
    copies = [obj for path, copied in files if copied for obj in load(path)]
    report = check_objects(copies, user_copies=True)
    assert report.problems == []
    assert [label.split(" ", 1)[1] for label, _ in report.skipped] == ["ServiceMonitor/payments"]
    assert re.search(
        r"ServiceMonitor\.monitoring\.coreos\.com: a custom resource copied unchanged", report.skipped[0][1]
    )
