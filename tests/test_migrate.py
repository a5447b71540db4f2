"""azwi-netproxy-migrate end to end: golden output, inputs, errors, FIC budget, cut-over.

Name: test_migrate
Scope: runs `azwi_netproxy.migrate.cli.main` in process into tmp_path (one subprocess test for
    `python -m`); the fixture export is tests/fixtures/migrate/export, the expected output
    tests/fixtures/migrate/golden (and golden-node, with --node).
    `UPDATE_GOLDEN=1 pytest tests/test_migrate.py -k golden` rewrites them.
Depends: PyYAML, bash (syntax check and a fake `az` on PATH for fic-commands.sh).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.manifests import (
    InitRunner,
    WebhookSettings,
    pod_security_violations,
    simulate_webhook,
    validate_manifest_docs,
)
from support.manifests import load_documents as load_manifest_documents

from azwi_netproxy.identitymap import parse_identity_map
from azwi_netproxy.migrate.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "migrate"
EXPORT = FIXTURES / "export"
GOLDEN = FIXTURES / "golden"
ISSUER = (
    "https://eastus.oic.prod-aks.azure.com/72f988bf-86f1-41af-91ab-2d7cd011db47/"
    "5a3c0e2b-7d41-4a8e-b1c9-0f6e2d3c4b5a/"
)
GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}


# ---------------------------------------------------------------------------- helpers

def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """main(argv) → (exit code, stdout, stderr); argparse's own errors raise SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): p.read_text(encoding="utf-8")
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def migrate_fixture(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> Path:
    """Run on the fixture export from its directory, so source names are stable."""
    out = tmp_path / "out"
    cwd = os.getcwd()
    os.chdir(FIXTURES)
    try:
        code, _, err = run(["-o", str(out), "--issuer", ISSUER, *extra, "export"], capsys)
    finally:
        os.chdir(cwd)
    assert code == 0, err
    return out


def pod_template(obj: dict[str, Any]) -> dict[str, Any]:
    path = {"Pod": (), "CronJob": ("spec", "jobTemplate", "spec", "template")}.get(
        obj["kind"], ("spec", "template")
    )
    for key in path:
        obj = obj[key]
    return obj


def check_manifests(out: Path) -> int:
    """The checks `kubectl apply --dry-run=server` would start with; returns the object count.

    Every file holds one object with apiVersion, kind and a valid name, in the directory of its
    namespace; no server-populated fields; labels and annotations are strings; migrated pods
    have the workload identity label and proxy annotations; every serviceAccountName has a
    generated ServiceAccount carrying a client ID.
    """
    count = 0
    service_accounts: dict[tuple[str, str], dict[str, Any]] = {}
    workloads: list[tuple[Path, dict[str, Any]]] = []
    for path in sorted((out / "manifests").rglob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert len(docs) == 1, path
        obj = docs[0]
        count += 1
        assert isinstance(obj.get("apiVersion"), str) and obj["apiVersion"], path
        assert isinstance(obj.get("kind"), str) and obj["kind"], path
        meta = obj["metadata"]
        name = meta["name"]
        assert DNS_SUBDOMAIN.match(name) and len(name) <= 253, (path, name)
        assert path.name == f"{obj['kind'].lower()}-{name}.yaml", path
        if obj["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            assert path.parent.name == "_cluster" and "namespace" not in meta, path
        else:
            assert meta["namespace"] == path.parent.name, path
        assert "status" not in obj, path
        for field in ("uid", "resourceVersion", "managedFields", "creationTimestamp", "generation"):
            assert field not in meta, (path, field)
        for section in ("labels", "annotations"):
            for key, value in (meta.get(section) or {}).items():
                assert isinstance(key, str) and isinstance(value, str), (path, key, value)
        cluster = path.relative_to(out / "manifests").parts[:-2]
        if obj["kind"] == "ServiceAccount":
            service_accounts[(*cluster, meta["namespace"], name)] = obj
        if obj["kind"] in WORKLOAD_KINDS:
            workloads.append((path, obj))
    for path, obj in workloads:
        pod = pod_template(obj)
        labels = pod["metadata"]["labels"]
        annotations = pod["metadata"].get("annotations", {})  # none where our containers are declared
        for section in (labels, annotations):
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in section.items()), path
        assert labels["azure.workload.identity/use"] == "true", path
        declared_proxy = [
            c for c in [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]
            if c["name"] == "azwi-proxy"
        ]
        if annotations.get("azwi-netproxy.io/node-proxy") == "true":  # node mode: nothing in the pod
            assert not declared_proxy and "azure.workload.identity/inject-proxy-sidecar" not in annotations, path
            port = annotations.get("azwi-netproxy.io/proxy-port", "8000")
        elif declared_proxy:  # several identities (or CNI mode): our containers, no injection
            assert "azure.workload.identity/inject-proxy-sidecar" not in annotations, path
            port = declared_proxy[0]["args"][0].removeprefix("--proxy-port=")
        else:
            assert annotations["azure.workload.identity/inject-proxy-sidecar"] == "true", path
            port = annotations["azure.workload.identity/proxy-sidecar-port"]
        assert port.isdigit() and 1 <= int(port) <= 65535, path
        declared = {
            p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports") or []
        }
        assert int(port) not in declared, path
        names = [c["name"] for c in pod["spec"]["containers"]]
        assert names and len(names) == len(set(names)), path
        sa = pod["spec"]["serviceAccountName"]
        assert pod["spec"].get("serviceAccount", sa) == sa, path
        cluster = path.relative_to(out / "manifests").parts[:-2]
        key = (*cluster, obj["metadata"]["namespace"], sa)
        assert key in service_accounts, f"{path}: no ServiceAccount {key}"
        client_id = service_accounts[key]["metadata"]["annotations"]["azure.workload.identity/client-id"]
        assert GUID.match(client_id), path
        if obj["kind"] == "Job" and not obj["spec"].get("manualSelector"):
            assert "selector" not in obj["spec"], path
            assert "controller-uid" not in labels and "job-name" not in labels, path
    return count


def input_objects() -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for path in sorted(EXPORT.rglob("*")):
        if path.suffix in (".yaml", ".yml", ".json"):
            for doc in yaml.load_all(path.read_text(), Loader=yaml.BaseLoader):
                if doc is None:
                    continue
                objects.extend(doc["items"] if doc.get("kind") == "List" else [doc])
    return objects


def ref(obj: dict[str, Any]) -> tuple[str, str, str]:
    return (obj["kind"], obj["metadata"].get("namespace", "default"), obj["metadata"]["name"])


# ---------------------------------------------------------------------------- golden output

# Golden directory → the flags it is the output of (tests/fixtures/migrate/README.md).
GOLDENS = {"golden": (), "golden-node": ("--node",)}


@pytest.mark.parametrize("golden", sorted(GOLDENS))
def test_golden_output(golden: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = migrate_fixture(tmp_path, capsys, *GOLDENS[golden])
    if os.environ.get("UPDATE_GOLDEN") == "1":
        shutil.rmtree(FIXTURES / golden, ignore_errors=True)
        shutil.copytree(out, FIXTURES / golden)
    expected, actual = tree(FIXTURES / golden), tree(out)
    assert sorted(actual) == sorted(expected)
    for path, content in expected.items():
        assert actual[path] == content, f"{path} differs from the golden copy (UPDATE_GOLDEN=1)"
    assert os.access(out / "fic-commands.sh", os.X_OK)
    assert (out / "REPORT.md").stat().st_mode & 0o777 == 0o644


def test_generated_manifests_are_valid_kubernetes_objects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = migrate_fixture(tmp_path, capsys)
    assert check_manifests(out) == 22


def test_migration_decisions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = migrate_fixture(tmp_path, capsys)
    manifests = {p.name: yaml.safe_load(p.read_text()) for p in (out / "manifests").rglob("*.yaml")}
    # Two bindings with the pod's selector: default = first binding by name, map lists both.
    api = manifests["deployment-payments-api.yaml"]
    assert api["spec"]["template"]["metadata"]["labels"]["aadpodidbinding"] == "payments-api"
    sa = manifests["serviceaccount-payments-api.yaml"]
    assert sa["metadata"]["annotations"]["azure.workload.identity/client-id"] == (
        "6f0e2c1a-1d4b-4c55-9b1e-2a6c0d1e0001"
    )
    assert sa["imagePullSecrets"] == [{"name": "acr-pull"}]  # the exported SA's fields survive
    annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true"}
    cron = manifests["cronjob-settlement-report.yaml"]
    # No sign of needing instance metadata: our containers declared, pass-through off on both.
    assert "annotations" not in pod_template(cron)["metadata"]
    cron_inits = pod_template(cron)["spec"]["initContainers"]
    assert [c["name"] for c in cron_inits] == ["azwi-proxy-init", "azwi-proxy"]  # a native sidecar: it completes
    assert cron_inits[0]["env"] == [{"name": "PROXY_PORT", "value": "8000"}, {"name": "AZWI_PASSTHROUGH", "value": "none"}]
    assert cron_inits[1]["env"] == [{"name": "AZWI_PASSTHROUGH", "value": "none"}]
    # default / implicit service accounts get their own.
    assert manifests["statefulset-orders-db-backup.yaml"]["spec"]["template"]["spec"][
        "serviceAccountName"] == "orders-db-backup-wi"
    assert pod_template(cron)["spec"]["serviceAccountName"] == "settlement-report-wi"
    # The identity map: valid for the proxy, both identities, resourceID aliases.
    map_text = (out / "identity-maps" / "payments-deployment-payments-api.yaml").read_text()
    parsed = parse_identity_map(map_text)
    assert parsed.only_listed
    assert [i.client_id for i in parsed.identities] == [
        "6f0e2c1a-1d4b-4c55-9b1e-2a6c0d1e0001", "6f0e2c1a-1d4b-4c55-9b1e-2a6c0d1e0002",
    ]
    writer = (
        "/subscriptions/0b1f6471-1bf0-4dda-aec3-111122223333/resourcegroups/rg-payments/providers/"
        "microsoft.managedidentity/userassignedidentities/id-payments-writer"
    )
    assert parsed.by_resource_id[writer].client_id.endswith("0002")
    configmap = manifests["configmap-azwi-identity-map-deployment-payments-api.yaml"]
    assert configmap["data"]["identity-map.yaml"] == map_text
    # Several identities: the pod declares our containers (deploy/webhook/multi-identity.yaml).
    spec = api["spec"]["template"]["spec"]
    assert "azure.workload.identity/inject-proxy-sidecar" not in annotations
    assert [c["name"] for c in spec["initContainers"]] == ["azwi-proxy-init"]
    assert [c["name"] for c in spec["containers"]] == ["azwi-proxy", "api"]
    proxy = spec["containers"][0]
    assert proxy["args"][0] == "--proxy-port=8002"
    assert proxy["env"] == [{"name": "AZWI_IDENTITY_MAP", "value": "/etc/azwi-netproxy/identity-map.yaml"},
                            {"name": "AZWI_PASSTHROUGH", "value": "none"}]
    assert spec["initContainers"][0]["env"] == [{"name": "PROXY_PORT", "value": "8002"},
                                                {"name": "AZWI_PASSTHROUGH", "value": "none"}]
    assert spec["volumes"] == [{"name": "azwi-identity-map", "configMap": {"name": configmap["metadata"]["name"]}}]

    # Every identity of the two-identity workload gets a FIC for its service account; the
    # shared identity one per service account across namespaces.
    fics = json.loads((out / "fics.json").read_text())["federatedIdentityCredentials"]
    by_identity: dict[str, list[str]] = {}  # (in the order fics.json lists them)
    for fic in fics:
        assert fic["issuer"] == ISSUER and fic["audiences"] == ["api://AzureADTokenExchange"]
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{2,119}", fic["name"])
        by_identity.setdefault(fic["identity"]["name"], []).append(fic["subject"])
    assert by_identity == {
        "id-kv-reader": [
            "system:serviceaccount:orders:debug-shell-wi",
            "system:serviceaccount:orders:orders-db-backup-wi",
            "system:serviceaccount:payments:settlement-report-wi",
        ],
        "id-orders-api": ["system:serviceaccount:orders:orders-api"],
        "id-payments-reader": ["system:serviceaccount:payments:payments-api"],
        "id-payments-writer": ["system:serviceaccount:payments:payments-api"],
        "id-ops-reader": [f"system:serviceaccount:ops:{name}-wi" for name in (
            "health-probe", "inventory-report", "legacy-agent", "node-drainer", "token-client")],
    }

    report = (out / "REPORT.md").read_text()
    not_migrated = report.split("## Not migrated")[1].split("\n## ")[0]
    for workload, reason in [
        ("monitoring/DaemonSet/log-shipper", "hostNetwork: true"),
        ("web/Deployment/web-frontend", "Windows"),
        ("legacy/Deployment/billing-sync", "type 1 (service principal"),
        ("orders/Deployment/inventory-sync", "not in the export"),
        ("payments/Deployment/nightly-etl", "matches no AzureIdentityBinding"),
        ("payments/Deployment/worker-a", "shares service account payments/shared-worker"),
        ("payments/Deployment/worker-b", "shares service account payments/shared-worker"),
    ]:
        line = next(line for line in not_migrated.splitlines() if f"`{workload}`" in line)
        assert reason in line, line
    assert "`monitoring/Deployment/blackbox-exporter`" in report.split(
        "## Matched by an AzurePodIdentityException")[1]


def test_every_input_object_is_accounted_for(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each object is migrated, copied unchanged (same data), pod identity's own, or a runtime
    object of a migrated controller named in the report: nothing is lost or duplicated."""
    out = migrate_fixture(tmp_path, capsys)
    unchanged = [
        doc for path in sorted((out / "unchanged").rglob("*")) if path.is_file()
        for doc in yaml.load_all(path.read_text(), Loader=yaml.BaseLoader) if doc is not None
    ]
    unchanged_refs = [ref(d) for d in unchanged]
    assert len(unchanged_refs) == len(set(unchanged_refs))
    migrated = {
        (p.name.split("-", 1)[0], p.parent.name, p.name.split("-", 1)[1][: -len(".yaml")])
        for p in (out / "manifests").rglob("*.yaml")
    }
    report = (out / "REPORT.md").read_text()
    runtime = report.split("## Runtime objects left out")[1].split("\n## ")[0]
    for obj in input_objects():
        kind, namespace, name = ref(obj)
        if obj["apiVersion"].startswith("aadpodidentity.k8s.io/") or (
            (kind.lower(), namespace, name) in migrated and kind != "ServiceAccount"
        ):
            assert (kind, namespace, name) not in unchanged_refs
        elif (kind, namespace, name) in unchanged_refs:
            assert unchanged[unchanged_refs.index((kind, namespace, name))] == obj
        elif kind == "ServiceAccount":
            assert (kind.lower(), namespace, name) in migrated
        else:
            assert f"`{namespace}/{kind}/{name}`" in runtime, (kind, namespace, name)


def test_unrelated_documents_keep_their_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = migrate_fixture(tmp_path, capsys)
    original = (EXPORT / "misc" / "unrelated.yaml").read_text()
    copied = (out / "unchanged" / "export" / "misc" / "unrelated.yaml").read_text()
    # Comments and quoting survive; only the final `...` end marker is dropped.
    assert copied == original.replace("\n...\n", "\n")
    config = next(yaml.load_all(copied, Loader=yaml.BaseLoader))
    assert config["data"]["FEATURE_FLAG"] == "yes"
    assert config["data"]["created"] == "2024-01-01T10:00:00Z"
    # A JSON List had migrated items: what is left is written as YAML documents.
    rest = list(yaml.safe_load_all((out / "unchanged" / "export" / "orders.json.yaml").read_text()))
    assert [ref(d) for d in rest] == [
        ("Deployment", "orders", "inventory-sync"), ("Service", "orders", "orders-api"),
    ]


def test_running_twice_gives_identical_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = tree(migrate_fixture(tmp_path, capsys))
    second = tree(migrate_fixture(tmp_path, capsys))  # replaces the previous output in place
    assert first == second
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def reexport(out: Path) -> list[str]:
    """What a re-export of the cluster holds after `out` was applied: the migrated manifests,
    everything copied unchanged (the ConfigMaps that hold signs among it), and pod identity's
    resources, which stay until cut-over."""
    return [str(out / "manifests"), str(out / "unchanged"), str(EXPORT / "pod-identity.yaml")]


def test_migrating_its_own_output_again_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Cut-over runs on a re-export of migrated objects: the result must be a fixed point."""
    first = migrate_fixture(tmp_path, capsys)
    second = tmp_path / "second"
    code, _, err = run(["-o", str(second), "--issuer", ISSUER, *reexport(first)], capsys)
    assert code == 0, err

    def objects(root: Path) -> dict[str, Any]:
        return {p.relative_to(root).as_posix(): yaml.safe_load(p.read_text())
                for p in sorted((root / "manifests").rglob("*.yaml"))}

    assert objects(second) == objects(first)
    # The identity map ConfigMap of the input is regenerated, not copied as well.
    assert "azwi-identity-map" not in "".join(tree(second / "unchanged").values())


def test_cut_over_removes_the_label_unless_a_selector_needs_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = migrate_fixture(tmp_path, capsys, "--remove-aadpodidbinding")
    check_manifests(out)

    def labels(path: str) -> dict[str, str]:
        pod = pod_template(yaml.safe_load((out / "manifests" / path).read_text()))
        result: dict[str, str] = pod["metadata"]["labels"]
        return result

    assert "aadpodidbinding" not in labels("payments/deployment-payments-api.yaml")
    assert "aadpodidbinding" not in labels("payments/cronjob-settlement-report.yaml")
    # Its own (immutable) selector uses the label.
    assert labels("orders/deployment-orders-api.yaml")["aadpodidbinding"] == "orders-api"
    # A NetworkPolicy selects pods by it.
    assert labels("orders/statefulset-orders-db-backup.yaml")["aadpodidbinding"] == "kv-reader"
    # The Deployment's selector needs app=orders-api too, which the Job's pods lack.
    assert "aadpodidbinding" not in labels("orders/job-orders-reindex.yaml")
    header = (out / "manifests" / "orders" / "statefulset-orders-db-backup.yaml").read_text()
    assert "kept: NetworkPolicy/vault-egress spec.podSelector.matchLabels" in header


# ---------------------------------------------------------------------------- inputs

def test_stdin_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    text = (EXPORT / "pod-identity.yaml").read_text() + "---\n" + (EXPORT / "payments.yaml").read_text()
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    out = tmp_path / "out"
    code, stdout, err = run(["-o", str(out), "-"], capsys)
    assert code == 0, err
    assert "2 workloads migrated, 2 not migrated" in stdout  # worker-a/b share an SA
    assert (out / "manifests" / "payments" / "deployment-payments-api.yaml").exists()
    assert "<stdin>:" in (out / "manifests" / "payments" / "deployment-payments-api.yaml").read_text()
    assert (out / "unchanged" / "stdin.yaml").exists()
    check_manifests(out)


def test_python_m_reads_stdin(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "azwi_netproxy.migrate", "-o", str(out), "-"],
        input=(EXPORT / "workloads.yml").read_text() + "---\n" + (EXPORT / "pod-identity.yaml").read_text(),
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    script = (out / "fic-commands.sh").read_text()
    # No --issuer: the commands use the variable and the script refuses to run without it.
    assert '--issuer "${AKS_OIDC_ISSUER}"' in script
    assert ': "${AKS_OIDC_ISSUER:?' in script
    assert json.loads((out / "fics.json").read_text())["federatedIdentityCredentials"][0][
        "issuerFromEnvironment"] == "AKS_OIDC_ISSUER"


def test_directory_input_is_recursive_and_skips_hidden_and_outdir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "export"
    shutil.copytree(EXPORT, src)
    (src / ".git").mkdir()
    (src / ".git" / "junk.yaml").write_text(": not yaml [")
    (src / ".hidden.yaml").write_text(": not yaml [")
    (src / "notes.txt").write_text(": not yaml [")
    out = src / "migrated"  # OUTDIR inside the input directory: not read back
    code, _, err = run(["-o", str(out), "--issuer", ISSUER, str(src)], capsys)
    assert code == 0, err
    code, _, err = run(["-o", str(out), "--issuer", ISSUER, str(src)], capsys)
    assert code == 0, err
    assert (out / "unchanged" / "export" / "misc" / "unrelated.yaml").exists()
    assert not (out / "unchanged" / "export" / "migrated").exists()
    assert check_manifests(out) == 22


def test_same_file_names_from_two_arguments_do_not_collide(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cm.yaml").write_text(
            f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: x\n"
        )
    out = tmp_path / "out"
    code, _, err = run(["-o", str(out), str(tmp_path / "a" / "cm.yaml"), str(tmp_path / "b" / "cm.yaml")], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (out / "unchanged").iterdir()) == ["cm-2.yaml", "cm.yaml"]


# ---------------------------------------------------------------------------- errors: exit 2, nothing written

BROKEN = """\
apiVersion: v1
kind: ConfigMap
metadata: {name: one, namespace: x}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: two, namespace: x}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: broken
  labels: [unclosed
"""


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (BROKEN, r"broken\.yaml: document 3: not valid YAML at line 1[34], column \d+"),
        ("apiVersion: v1\nkind: ConfigMap\nkind: Secret\n", r"document 1: not valid YAML at line 3.*duplicate key 'kind'"),
        ("- just\n- a list\n", r"document 1 \(line 1\): expected a Kubernetes object"),
        (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d, namespace: n}\n"
            "spec:\n  template:\n    metadata:\n      labels: {aadpodidbinding: x, replicas: 3}\n",
            r"pod label 'replicas' has value 3, which is not a string",
        ),
        ("\tbad: tab\n", r"document 1: not valid YAML at line 1"),
    ],
    ids=["syntax-error-in-third-document", "duplicate-key", "not-a-mapping", "non-string-label", "tab"],
)
def test_malformed_input_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text(content)
    out = tmp_path / "out"
    code, stdout, err = run(["-o", str(out), str(EXPORT / "pod-identity.yaml"), str(bad)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("azwi-netproxy-migrate: error: "), err
    assert re.search(message, err), err
    assert stdout == ""
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken.yaml"]


def test_malformed_input_leaves_a_previous_output_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = migrate_fixture(tmp_path, capsys)
    before = tree(out)
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [\n")
    code, _, _ = run(["-o", str(out), str(bad)], capsys)
    assert code == 2
    assert tree(out) == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cluster", "east", ISSUER, "x.yaml", "y.yaml"], "not both"),
        (["--issuer", ISSUER, "--cluster", "east", ISSUER, "x.yaml"], "--issuer is for a single cluster"),
        ([], "nothing to read"),
        (["--issuer", "http://issuer.example/", "x.yaml"], "is not an https URL"),
        (["--issuer", "https://issuer.example/?a=b", "x.yaml"], "must not have a query"),
        (["--proxy-port", "0", "x.yaml"], "--proxy-port '0' is not a port number"),
        (["--proxy-port", "http", "x.yaml"], "is not a port number"),
        (["--cluster", "../east", ISSUER, "x.yaml"], "--cluster name '../east'"),
        (["--cluster", "a", ISSUER, "x.yaml", "--cluster", "b", ISSUER, "x.yaml"], "have the same issuer"),
        (["--cluster", "a", ISSUER, "x.yaml", "--cluster", "a", ISSUER + "x/", "x.yaml"], "two issuers"),
        (["missing.yaml"], "missing.yaml: no such file or directory"),
        (["-", "-"], "stdin) can be given only once"),
        (["--cluster", "east", ISSUER], "expected 3 arguments"),
    ],
    ids=[
        "cluster-and-positional", "issuer-with-cluster", "no-input", "http-issuer", "issuer-query",
        "port-zero", "port-text", "cluster-name-path", "same-issuer", "two-issuers", "missing-file",
        "stdin-twice", "cluster-two-args",
    ],
)
def test_bad_usage_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    argv: list[str], message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    (tmp_path / "y.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: y}\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, _, err = run(["-o", "out", *argv], capsys)
    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_refuses_to_replace_a_directory_it_did_not_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    code, _, err = run(["-o", str(precious), str(EXPORT / "payments.yaml")], capsys)
    assert code == 2 and "not a previous azwi-netproxy-migrate output" in err
    assert tree(precious) == {"thesis.tex": "years of work"}


def test_refuses_input_inside_outdir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    (out / "in").mkdir(parents=True)
    shutil.copy(EXPORT / "payments.yaml", out / "in")
    code, _, err = run(["-o", str(out), str(out / "in")], capsys)
    assert code == 2 and "is inside OUTDIR" in err
    assert (out / "in" / "payments.yaml").exists()


# ---------------------------------------------------------------------------- several clusters, FIC budget

def cluster_export(namespaces: int, extra: str = "") -> str:
    """One cluster: `namespaces` teams, each with a Deployment bound to the shared identity."""
    docs = []
    for number in range(namespaces):
        ns = f"team-{number}"
        docs.append(f"""\
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentity
metadata: {{name: shared, namespace: {ns}}}
spec:
  type: 0
  resourceID: /subscriptions/0b1f6471-1bf0-4dda-aec3-111122223333/resourceGroups/rg-platform/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-shared
  clientID: 9a9a9a9a-0000-4000-8000-000000000001
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentityBinding
metadata: {{name: shared, namespace: {ns}}}
spec: {{azureIdentity: shared, selector: shared}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: app, namespace: {ns}}}
spec:
  selector: {{matchLabels: {{app: app}}}}
  template:
    metadata:
      labels: {{app: app, aadpodidbinding: shared}}
    spec:
      containers: [{{name: app, image: "contoso.azurecr.io/app:1"}}]
""")
    docs.append("""\
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentity
metadata: {name: small, namespace: tools}
spec:
  type: 0
  resourceID: /subscriptions/0b1f6471-1bf0-4dda-aec3-111122223333/resourceGroups/rg-platform/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-small
  clientID: 9a9a9a9a-0000-4000-8000-000000000002
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentityBinding
metadata: {name: small, namespace: tools}
spec: {azureIdentity: small, selector: cli}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: cli, namespace: tools}
spec:
  selector: {matchLabels: {app: cli}}
  template:
    metadata:
      labels: {app: cli, aadpodidbinding: cli}
    spec:
      serviceAccountName: cli
      containers: [{name: cli, image: "contoso.azurecr.io/cli:1"}]
""")
    return "---\n".join(docs) + extra


MIXED = """---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentity
metadata: {name: shared, namespace: tools}
spec:
  type: 0
  resourceID: /subscriptions/0b1f6471-1bf0-4dda-aec3-111122223333/resourceGroups/rg-platform/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-shared
  clientID: 9a9a9a9a-0000-4000-8000-000000000001
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentityBinding
metadata: {name: mixed-shared, namespace: tools}
spec: {azureIdentity: shared, selector: mixed}
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentityBinding
metadata: {name: mixed-small, namespace: tools}
spec: {azureIdentity: small, selector: mixed}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: mixed, namespace: tools}
spec:
  selector: {matchLabels: {app: mixed}}
  template:
    metadata:
      labels: {app: mixed, aadpodidbinding: mixed}
    spec:
      containers: [{name: mixed, image: "contoso.azurecr.io/mixed:1"}]
"""


def test_multi_cluster_budget_switches_to_identity_binding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["-o", str(tmp_path / "out")]
    for number, cluster in enumerate(("east", "west", "north")):
        path = tmp_path / f"{cluster}.yaml"
        path.write_text(cluster_export(8, MIXED if cluster == "east" else ""))
        argv += ["--cluster", cluster, f"https://{cluster}.oic.example/tenant/{number}/", str(path)]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    out = tmp_path / "out"
    check_manifests(out)
    document = json.loads((out / "fics.json").read_text())
    budget = {line["identity"]["name"]: line for line in document["budget"]}
    # 8 teams x 3 clusters + the mixed workload = 25 subjects for id-shared.
    assert budget["id-shared"]["needed"] == 25
    assert budget["id-shared"]["perCluster"] == {"east": 9, "north": 8, "west": 8}
    assert budget["id-shared"]["overLimit"] and budget["id-shared"]["planned"] == 0
    # id-small: cli in 3 clusters + mixed; mixed goes through identity binding for both.
    assert budget["id-small"] == budget["id-small"] | {"needed": 4, "planned": 3, "overLimit": False}
    fics = document["federatedIdentityCredentials"]
    assert {f["identity"]["name"] for f in fics} == {"id-small"}
    assert sorted((f["cluster"], f["name"], f["issuer"]) for f in fics) == [
        ("east", "east-tools-cli", "https://east.oic.example/tenant/0/"),
        ("north", "north-tools-cli", "https://north.oic.example/tenant/2/"),
        ("west", "west-tools-cli", "https://west.oic.example/tenant/1/"),
    ]
    needs = {(n["identity"]["name"], n["cluster"]): n for n in document["identityBindings"]}
    assert sorted(needs) == [
        ("id-shared", "east"), ("id-shared", "north"), ("id-shared", "west"), ("id-small", "east"),
    ]
    assert "over the limit" in needs[("id-shared", "east")]["reason"]
    assert "another identity" in needs[("id-small", "east")]["reason"]
    assert "tools/mixed-wi" in needs[("id-small", "east")]["serviceAccounts"]

    # Per-cluster manifests: identity binding annotation exactly where planned.
    for cluster in ("east", "west", "north"):
        app = yaml.safe_load((out / "manifests" / cluster / "team-3" / "deployment-app.yaml").read_text())
        annotations = app["spec"]["template"]["metadata"]["annotations"]
        assert annotations["azure.workload.identity/use-identity-binding"] == "true"
        cli = yaml.safe_load((out / "manifests" / cluster / "tools" / "deployment-cli.yaml").read_text())
        assert "azure.workload.identity/use-identity-binding" not in cli["spec"]["template"]["metadata"].get(
            "annotations", {})
        role = yaml.safe_load(
            (out / "manifests" / cluster / "_cluster" / "clusterrolebinding-use-mi-9a9a9a9a-0000-4000-8000-000000000001.yaml").read_text()
        )
        assert len(role["subjects"]) == (9 if cluster == "east" else 8)
    mixed = yaml.safe_load((out / "manifests" / "east" / "tools" / "deployment-mixed.yaml").read_text())
    assert mixed["spec"]["template"]["metadata"]["annotations"][
        "azure.workload.identity/use-identity-binding"] == "true"
    assert (out / "identity-maps" / "east" / "tools-deployment-mixed.yaml").exists()

    script = (out / "fic-commands.sh").read_text()
    assert script.count("\naz identity federated-credential create") == 3
    assert "#   az aks identity-binding create" in script
    report = (out / "REPORT.md").read_text()
    assert "**over the limit**" in report and "## Identity binding (AKS, preview)" in report


# ---------------------------------------------------------------------------- fic-commands.sh

@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_fic_commands_script_runs_against_a_fake_az(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = migrate_fixture(tmp_path, capsys)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "az.log"
    fake = bin_dir / "az"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" "--END--" >> "{log}"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(
        ["bash", str(out / "fic-commands.sh")], env=env, capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    calls = [c.strip("\n").split("\n") for c in log.read_text().split("--END--\n") if c.strip()]
    expected = json.loads((out / "fics.json").read_text())["federatedIdentityCredentials"]
    assert len(calls) == len(expected) == 11
    for call, fic in zip(calls, expected, strict=True):
        args = dict(zip(call[3::2], call[4::2], strict=True))
        assert call[:3] == ["identity", "federated-credential", "create"]
        assert args == {
            "--name": fic["name"], "--identity-name": fic["identity"]["name"],
            "--resource-group": fic["identity"]["resourceGroup"],
            "--subscription": fic["identity"]["subscription"], "--issuer": ISSUER,
            "--subject": fic["subject"], "--audience": "api://AzureADTokenExchange",
        }


def test_fic_commands_without_issuer_refuse_to_run_unset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, _, err = run(["-o", str(out), str(EXPORT)], capsys)
    assert code == 0, err
    result = subprocess.run(
        ["bash", str(out / "fic-commands.sh")], env={"PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode != 0 and "AKS_OIDC_ISSUER" in result.stderr


def test_proxy_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = migrate_fixture(
        tmp_path, capsys, "--proxy-port", "9000", "--proxy-image", "contoso.azurecr.io/azwi-netproxy/proxy:0.1.0",
        "--proxy-init-image", "contoso.azurecr.io/azwi-netproxy/proxy-init:0.1.0",
    )
    cron = yaml.safe_load((out / "manifests" / "payments" / "cronjob-settlement-report.yaml").read_text())
    assert pod_template(cron)["spec"]["initContainers"][1]["args"][0] == "--proxy-port=9000"
    # A workload that keeps pass-through keeps the webhook's injection.
    report = yaml.safe_load((out / "manifests" / "ops" / "cronjob-inventory-report.yaml").read_text())
    assert pod_template(report)["metadata"]["annotations"]["azure.workload.identity/proxy-sidecar-port"] == "9000"
    api = yaml.safe_load((out / "manifests" / "payments" / "deployment-payments-api.yaml").read_text())
    spec = api["spec"]["template"]["spec"]
    assert spec["containers"][0]["image"] == "contoso.azurecr.io/azwi-netproxy/proxy:0.1.0"
    assert spec["containers"][0]["args"][0] == "--proxy-port=9000"
    assert spec["initContainers"][0]["image"] == "contoso.azurecr.io/azwi-netproxy/proxy-init:0.1.0"
    assert "myregistry.azurecr.io" not in (out / "REPORT.md").read_text()


# ---------------------------------------------------------------------------- kubectl, offline

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="needs kubectl (client only, no cluster)")

TWO_IDENTITIES = """\
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentity
metadata: {name: one, namespace: jobs}
spec: {type: 0, clientID: 9a9a9a9a-0000-4000-8000-000000000011, resourceID: /subscriptions/0b1f6471-1bf0-4dda-aec3-111122223333/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/one}
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentity
metadata: {name: two, namespace: jobs}
spec: {type: 0, clientID: 9a9a9a9a-0000-4000-8000-000000000012, resourceID: /subscriptions/0b1f6471-1bf0-4dda-aec3-111122223333/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/two}
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentityBinding
metadata: {name: a-one, namespace: jobs}
spec: {azureIdentity: one, selector: both}
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentityBinding
metadata: {name: b-two, namespace: jobs}
spec: {azureIdentity: two, selector: both}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly, namespace: jobs}
spec:
  schedule: "0 1 * * *"
  jobTemplate:
    spec:
      template:
        metadata: {labels: {aadpodidbinding: both}}
        spec:
          restartPolicy: Never
          containers: [{name: main, image: i}, {name: helper, image: h}]
---
apiVersion: v1
kind: Pod
metadata: {name: shell, namespace: jobs, labels: {aadpodidbinding: both}}
spec:
  containers: [{name: shell, image: s}]
"""


def kubectl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert KUBECTL is not None
    # --local works from the built-in scheme: no kubeconfig, no API server.
    return subprocess.run(
        [KUBECTL, *args], cwd=cwd, env={"PATH": "/usr/bin:/bin", "KUBECONFIG": "/dev/null"},
        capture_output=True, text=True, timeout=60, check=False,
    )


@needs_kubectl
def test_kubectl_decodes_every_generated_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = migrate_fixture(tmp_path, capsys)
    result = kubectl("patch", "--local", "-R", "-f", "manifests", "--type", "merge", "-p", "{}", "-o", "name", cwd=out)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 22


def validate_output(out: Path, node_pod_security: Any = None) -> list[str]:
    """The shared validation deploy/ passes (tests/support/manifests.py), per cluster directory.

    Node-mode pods are judged against a Pod Security level only when asked: a migrated app's
    own containers keep what they had (the tests compare before and after instead).
    """
    problems: list[str] = []
    runner = InitRunner()
    roots = sorted({p.parent.parent for p in (out / "manifests").rglob("*.yaml")})
    for root in roots:
        docs = load_manifest_documents(sorted(root.rglob("*.yaml")))
        problems += validate_manifest_docs(docs, init_runner=runner, node_pod_security=node_pod_security)
    return problems


def test_manifests_pass_the_validation_of_deploy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert validate_output(migrate_fixture(tmp_path, capsys)) == []


def test_jobs_with_several_identities_get_a_native_sidecar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "jobs.yaml").write_text(TWO_IDENTITIES)
    out = tmp_path / "out"
    code, _, err = run(["-o", str(out), str(tmp_path / "jobs.yaml")], capsys)
    assert code == 0, err
    assert validate_output(out) == []
    cron = pod_template(yaml.safe_load((out / "manifests" / "jobs" / "cronjob-nightly.yaml").read_text()))
    inits = cron["spec"]["initContainers"]
    assert [c["name"] for c in inits] == ["azwi-proxy-init", "azwi-proxy"]
    assert inits[1]["restartPolicy"] == "Always" and "startupProbe" in inits[1]
    assert [c["name"] for c in cron["spec"]["containers"]] == ["main", "helper"]
    # A bare Pod that is restarted (the default policy) keeps the classic form.
    pod = yaml.safe_load((out / "manifests" / "jobs" / "pod-shell.yaml").read_text())
    assert [c["name"] for c in pod["spec"]["containers"]] == ["azwi-proxy", "shell"]
    assert "postStart" in pod["spec"]["containers"][0]["lifecycle"]
    if KUBECTL is not None:
        result = kubectl("patch", "--local", "-R", "-f", "manifests", "--type", "merge", "-p", "{}",
                         "-o", "name", cwd=out)
        assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------- --cni (issue 19)

REDIRECT = "azwi-netproxy.io/redirect"
CNI_PORT = "azwi-netproxy.io/proxy-port"


def workload_manifests(out: Path) -> dict[str, dict[str, Any]]:
    """Migrated workloads by path under manifests/."""
    found = {}
    for path in sorted((out / "manifests").rglob("*.yaml")):
        obj = yaml.safe_load(path.read_text())
        if obj["kind"] in WORKLOAD_KINDS:
            found[path.relative_to(out / "manifests").as_posix()] = obj
    return found


def test_cni_mode_asks_the_plugin_and_declares_the_proxy_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = migrate_fixture(tmp_path, capsys, "--cni")
    assert check_manifests(out) == 22
    assert validate_output(out) == []  # the shared validator, with its CNI-mode checks
    workloads = workload_manifests(out)
    assert len(workloads) == 11
    for path, obj in workloads.items():
        pod = pod_template(obj)
        annotations = pod["metadata"]["annotations"]
        assert annotations[REDIRECT] == "true", path
        assert "azure.workload.identity/inject-proxy-sidecar" not in annotations, path
        assert "azure.workload.identity/proxy-sidecar-port" not in annotations, path
        assert pod["metadata"]["labels"]["azure.workload.identity/use"] == "true", path
        spec = pod["spec"]
        proxy = spec["initContainers"][0]
        assert proxy["name"] == "azwi-proxy" and proxy["restartPolicy"] == "Always", path
        assert proxy["startupProbe"]["exec"]["command"][0] == "/proxy", path
        assert proxy["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, path
        port = proxy["args"][0].removeprefix("--proxy-port=")
        assert annotations.get(CNI_PORT, "8000") == port, path
        assert all(c["name"] != "azwi-proxy" for c in spec["containers"]), path
        assert "azwi-proxy-init" not in yaml.safe_dump(obj), path
        assert "NET_ADMIN" not in yaml.safe_dump(obj), path
    # The one whose app listens on 8000 tells the plugin where the proxy is.
    api = pod_template(workloads["payments/deployment-payments-api.yaml"])
    assert api["metadata"]["annotations"][CNI_PORT] == "8002"
    assert {"name": "AZWI_IDENTITY_MAP", "value": "/etc/azwi-netproxy/identity-map.yaml"} in api["spec"]["initContainers"][0]["env"]
    # One identity: no map, no map volume; no sign of needing instance metadata: pass-through off.
    orders = pod_template(workloads["orders/deployment-orders-api.yaml"])
    assert CNI_PORT not in orders["metadata"]["annotations"]
    assert orders["metadata"]["annotations"][PASSTHROUGH] == "none"
    assert orders["spec"]["initContainers"][0]["env"] == [{"name": "AZWI_PASSTHROUGH", "value": "none"}]
    assert "volumeMounts" not in orders["spec"]["initContainers"][0]
    # Those with a sign keep it: no annotation (the plugin's default is all), no variable.
    for name, annotation in (("node-drainer", None), ("legacy-agent", "all")):
        pod = pod_template(workloads[f"ops/deployment-{name}.yaml"])
        assert pod["metadata"]["annotations"].get(PASSTHROUGH) == annotation, name
        assert "env" not in pod["spec"]["initContainers"][0], name
    report = (out / "REPORT.md").read_text()
    assert "## CNI mode (`--cni`)" in report
    assert "**Install the node agent first**: the DaemonSet `deploy/cni/node-agent.yaml`" in report
    steps = report.split("## Order of operations")[1]
    assert steps.index("deploy/cni/node-agent.yaml") < steps.index("kubectl apply -R -f manifests/")
    assert "hostNetwork: true — no CNI plugin runs" in report


def k8s_objects(root: Path) -> dict[tuple[str, str, str], dict[str, Any]]:
    """The export's objects by (kind, namespace, name), typed as the API server reads them."""
    objects: dict[tuple[str, str, str], dict[str, Any]] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix in (".yaml", ".yml", ".json"):
            for doc in yaml.safe_load_all(path.read_text()):
                for obj in (doc.get("items") if doc and doc.get("kind") == "List" else [doc]) or []:
                    if obj:
                        objects.setdefault(ref(obj), obj)
    return objects


def test_cni_mode_adds_nothing_pod_security_restricted_forbids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Our part of each migrated pod passes "restricted"; the app's containers keep what they had."""
    out = migrate_fixture(tmp_path, capsys, "--cni")
    inputs = k8s_objects(EXPORT)
    for path, obj in workload_manifests(out).items():
        before = pod_template(inputs[ref(obj)])["spec"]
        after = pod_template(obj)["spec"]
        added = set(pod_security_violations(after)) - set(pod_security_violations(before))
        assert added == set(), path
        assert not [v for v in pod_security_violations(after) if "azwi-proxy" in v], path


RESTRICTED_APP = """\
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentity
metadata: {name: one, namespace: strict}
spec: {type: 0, clientID: 9a9a9a9a-0000-4000-8000-000000000021, resourceID: /subscriptions/0b1f6471-1bf0-4dda-aec3-111122223333/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/one}
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentity
metadata: {name: two, namespace: strict}
spec: {type: 0, clientID: 9a9a9a9a-0000-4000-8000-000000000022, resourceID: /subscriptions/0b1f6471-1bf0-4dda-aec3-111122223333/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/two}
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentityBinding
metadata: {name: solo, namespace: strict}
spec: {azureIdentity: one, selector: solo}
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentityBinding
metadata: {name: duo-one, namespace: strict}
spec: {azureIdentity: one, selector: duo}
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentityBinding
metadata: {name: duo-two, namespace: strict}
spec: {azureIdentity: two, selector: duo}
""" + "".join(f"""---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: strict}}
spec:
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata:
      labels: {{app: {name}, aadpodidbinding: {name}}}
    spec:
      serviceAccountName: {name}
      initContainers:
        - name: warm-cache
          image: contoso.azurecr.io/warm:1
          securityContext:
            runAsNonRoot: true
            allowPrivilegeEscalation: false
            capabilities: {{drop: [ALL]}}
            seccompProfile: {{type: RuntimeDefault}}
      containers:
        - name: app
          image: contoso.azurecr.io/{name}:1
          securityContext:
            runAsNonRoot: true
            allowPrivilegeEscalation: false
            capabilities: {{drop: [ALL]}}
            seccompProfile: {{type: RuntimeDefault}}
""" for name in ("solo", "duo"))


@pytest.mark.parametrize("level", ["baseline", "restricted"])
def test_cni_mode_pods_of_a_restricted_app_stay_restricted(
    level: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export = tmp_path / "strict.yaml"
    export.write_text(RESTRICTED_APP)
    inputs = k8s_objects(tmp_path)
    for obj in inputs.values():
        if obj["kind"] == "Deployment":
            assert pod_security_violations(pod_template(obj)["spec"], level) == []
    settings = WebhookSettings()
    for cni in (True, False):
        out = tmp_path / f"out-{cni}"
        code, _, err = run(["-o", str(out), *(["--cni"] if cni else []), str(export)], capsys)
        assert code == 0, err
        # Without pass-through both pods declare our containers, our init first: warm-cache runs
        # redirected, where the webhook would have appended its init after it (deploy/README.md,
        # "Notes on upstream").
        assert validate_output(out) == []
        docs = load_manifest_documents(sorted((out / "manifests").rglob("*.yaml")))
        for path, obj in workload_manifests(out).items():
            template = pod_template(obj)
            sa = next(d for d in docs if d["kind"] == "ServiceAccount"
                      and d["metadata"]["name"] == template["spec"]["serviceAccountName"])
            # As the pod runs: after the webhook, in both of its forms.
            for native in (True, False):
                spec = simulate_webhook(template, sa, settings, native_sidecar=native)["spec"]
                violations = pod_security_violations(spec, level)
                if cni:
                    assert violations == [], (path, native)
                else:  # the init container's NET_ADMIN, which CNI mode is there to avoid
                    assert any("azwi-proxy-init: capability NET_ADMIN added" in v for v in violations), (path, violations)


def test_default_output_is_unchanged_by_the_cni_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --cni nothing of CNI mode appears (test_golden_output pins the rest); with it,
    only the workloads and REPORT.md differ: service accounts, maps and FICs are the same."""
    default = tree(migrate_fixture(tmp_path / "default", capsys))
    cni = tree(migrate_fixture(tmp_path / "cni", capsys, "--cni"))
    assert default == tree(GOLDEN)
    assert not [path for path, text in default.items() if REDIRECT in text or "CNI" in text]
    assert sorted(default) == sorted(cni)
    workloads = {f"manifests/{p}" for p in workload_manifests(tmp_path / "default" / "out")}
    differing = {path for path in default if default[path] != cni[path]}
    assert differing == workloads | {"REPORT.md"}


def test_cni_output_migrated_again_is_a_fixed_point_and_without_cni_loses_the_annotation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = migrate_fixture(tmp_path, capsys, "--cni")
    again = tmp_path / "again"
    inputs = reexport(first)
    code, _, err = run(["-o", str(again), "--issuer", ISSUER, "--cni", *inputs], capsys)
    assert code == 0, err
    assert workload_manifests(again) == workload_manifests(first)
    back = tmp_path / "back"
    code, _, err = run(["-o", str(back), "--issuer", ISSUER, *inputs], capsys)
    assert code == 0, err
    for path, obj in workload_manifests(back).items():
        annotations = pod_template(obj)["metadata"]["annotations"]
        assert REDIRECT not in annotations and CNI_PORT not in annotations, path
    assert "pod annotations azwi-netproxy.io/redirect" in (back / "manifests" / "payments" / "deployment-payments-api.yaml").read_text()


def test_cni_flag_is_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    assert "--cni" in text and "deploy/cni/node-agent.yaml" in text and "no NET_ADMIN" in text


# ---------------------------------------------------------------------------- --node (issue 26)

NODE_PROXY = "azwi-netproxy.io/node-proxy"
NODE_CLIENT_ID = "azwi-netproxy.io/client-id"
NODE_TENANT_ID = "azwi-netproxy.io/tenant-id"
NODE_MAP = "azwi-netproxy.io/identity-map"
PASSTHROUGH = "azwi-netproxy.io/passthrough"


def client_id_of(out: Path, obj: dict[str, Any], manifests: Path | None = None) -> str:
    sa_name = pod_template(obj)["spec"]["serviceAccountName"]
    sa_path = (manifests or out / "manifests") / obj["metadata"]["namespace"] / f"serviceaccount-{sa_name}.yaml"
    client_id: str = yaml.safe_load(sa_path.read_text())["metadata"]["annotations"]["azure.workload.identity/client-id"]
    return client_id


def assert_node_pod(path: str, obj: dict[str, Any]) -> dict[str, Any]:
    """What CONTRACT.md's "Node mode" asks of a pod; returns its annotations."""
    pod = pod_template(obj)
    annotations: dict[str, Any] = pod["metadata"]["annotations"]
    assert annotations[NODE_PROXY] == "true", path
    assert pod["metadata"]["labels"]["azure.workload.identity/use"] == "true", path  # the token is still projected
    for absent in ("azure.workload.identity/inject-proxy-sidecar", "azure.workload.identity/proxy-sidecar-port",
                   REDIRECT):
        assert absent not in annotations, (path, absent)
    assert annotations.get(PASSTHROUGH, "none") == "none", path  # an explicit "none" stays: node mode has none
    spec = pod["spec"]
    assert not [c for c in [*spec.get("initContainers", []), *spec["containers"]]
                if c["name"] in ("azwi-proxy", "azwi-proxy-init")], path
    assert not [c for c in [*spec.get("initContainers", []), *spec["containers"]]
                if (c.get("securityContext") or {}).get("capabilities", {}).get("add")], path
    assert all(v["name"] != "azwi-identity-map" for v in spec.get("volumes", [])), path
    return annotations


def node_workloads(out: Path) -> dict[str, dict[str, Any]]:
    return {path: obj for path, obj in workload_manifests(out).items()
            if NODE_PROXY in (pod_template(obj)["metadata"].get("annotations") or {})}


def test_node_mode_pods_carry_annotations_and_nothing_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = migrate_fixture(tmp_path, capsys, "--node")
    assert check_manifests(out) == 21  # the identity map's ConfigMap is gone: the pod carries the map
    assert validate_output(out) == []  # the shared validator, with its node-mode checks
    workloads = node_workloads(out)
    assert len(workload_manifests(out)) == 11 and len(workloads) == 8  # ops.yaml's three with a sign stay
    for path, obj in workloads.items():
        annotations = assert_node_pod(path, obj)
        assert annotations[NODE_CLIENT_ID] == client_id_of(out, obj), path
        assert NODE_TENANT_ID not in annotations, path  # no exported service account names one
    # The workload with two identities: the contract's map as compact JSON, as the proxy reads it.
    api = pod_template(workloads["payments/deployment-payments-api.yaml"])["metadata"]["annotations"]
    text = api[NODE_MAP]
    assert json.loads(text) == {"onlyListed": True, "identities": [
        {"clientID": "6f0e2c1a-1d4b-4c55-9b1e-2a6c0d1e0001", "resourceID": "/subscriptions/0b1f6471-1bf0-4dda-aec3-111122223333/resourcegroups/rg-payments/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-payments-reader"},
        {"clientID": "6f0e2c1a-1d4b-4c55-9b1e-2a6c0d1e0002", "resourceID": "/subscriptions/0b1f6471-1bf0-4dda-aec3-111122223333/resourcegroups/rg-payments/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-payments-writer"},
    ]}
    assert ": " not in text and ", " not in text
    parsed = parse_identity_map(text, source="annotation")
    sidecar_map = parse_identity_map((GOLDEN / "identity-maps" / "payments-deployment-payments-api.yaml").read_text())
    assert parsed == sidecar_map and api[NODE_CLIENT_ID] in parsed.by_client_id
    # Its app listens on 8000: the node process listens on 8002 in its namespace, and says so.
    assert api["azwi-netproxy.io/proxy-port"] == "8002"
    for path, obj in workloads.items():
        if "payments-api" not in path:
            assert "azwi-netproxy.io/proxy-port" not in pod_template(obj)["metadata"]["annotations"], path
            assert NODE_MAP not in pod_template(obj)["metadata"]["annotations"], path
    assert not (out / "identity-maps").exists()
    # Service accounts, FICs and the budget are those of the default run.
    default = tree(GOLDEN)
    for name in ("fics.json", "fic-commands.sh"):
        assert (out / name).read_text() == default[name]
    report = (out / "REPORT.md").read_text()
    assert "## Node mode (`--node`)" in report
    kept = report.split("## Node mode (`--node`)")[1].split("\n## ")[0]
    assert [line.split("`")[1] for line in kept.splitlines() if line.startswith("| `")] == [
        "ops/CronJob/inventory-report", "ops/Deployment/legacy-agent", "ops/Deployment/node-drainer"]
    assert "Install the node DaemonSet (`deploy/node/node-agent.yaml`) on every node first" in report
    steps = report.split("## Order of operations")[1]
    assert steps.index("deploy/node/node-agent.yaml") < steps.index("kubectl apply -R -f manifests/")
    assert "hostNetwork: true — no CNI plugin runs for a pod on the node's network, so node mode" in report


def test_node_mode_adds_nothing_pod_security_restricted_forbids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As the pods run (after the webhook): node mode adds no violation to what each app had."""
    out = migrate_fixture(tmp_path, capsys, "--node")
    inputs = k8s_objects(EXPORT)
    docs = load_manifest_documents(sorted((out / "manifests").rglob("*.yaml")))
    for path, obj in node_workloads(out).items():
        before = pod_template(inputs[ref(obj)])["spec"]
        template = pod_template(obj)
        sa = next(d for d in docs if d["kind"] == "ServiceAccount"
                  and d["metadata"]["name"] == template["spec"]["serviceAccountName"]
                  and d["metadata"]["namespace"] == obj["metadata"]["namespace"])
        for native in (True, False):
            after = simulate_webhook(template, sa, WebhookSettings(), native_sidecar=native)["spec"]
            added = set(pod_security_violations(after)) - set(pod_security_violations(before))
            assert added == set(), (path, native, added)


@pytest.mark.parametrize("level", ["baseline", "restricted"])
def test_node_mode_pods_of_a_restricted_app_stay_restricted(
    level: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export = tmp_path / "strict.yaml"
    export.write_text(RESTRICTED_APP)
    out = tmp_path / "out"
    code, _, err = run(["-o", str(out), "--node", str(export)], capsys)
    assert code == 0, err
    # The validator judges node-mode pods against the level itself when asked.
    assert validate_output(out, node_pod_security=level) == []
    docs = load_manifest_documents(sorted((out / "manifests").rglob("*.yaml")))
    workloads = workload_manifests(out)
    assert len(workloads) == 2
    for path, obj in workloads.items():
        assert_node_pod(path, obj)
        template = pod_template(obj)
        sa = next(d for d in docs if d["kind"] == "ServiceAccount"
                  and d["metadata"]["name"] == template["spec"]["serviceAccountName"])
        for native in (True, False):
            spec = simulate_webhook(template, sa, WebhookSettings(), native_sidecar=native)["spec"]
            assert pod_security_violations(spec, level, template["metadata"]["annotations"]) == [], (path, native)


def test_the_validator_refuses_a_broken_node_mode_pod(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """validate_output is no formality for node mode: each of these breaks is reported."""
    out = migrate_fixture(tmp_path, capsys, "--node")
    path = out / "manifests" / "payments" / "deployment-payments-api.yaml"
    original = path.read_text()
    breaks = {
        f"{NODE_CLIENT_ID}: 6f0e2c1a-1d4b-4c55-9b1e-2a6c0d1e0001": f"{NODE_CLIENT_ID}: not-a-guid",
        "azwi-netproxy.io/proxy-port: '8002'": "azwi-netproxy.io/proxy-port: '80000'",
        '"onlyListed":true': '"onlyListed":"yes"',
        "prometheus.io/scrape: 'true'": "prometheus.io/scrape: 'true'\n        azwi-netproxy.io/redirect: 'true'",
    }
    expected = ["is not a GUID", "is not a port", "onlyListed must be true or false", "exempt the proxy's uid"]
    for (old, new), message in zip(breaks.items(), expected, strict=True):
        assert old in original, old
        path.write_text(original.replace(old, new))
        problems = validate_output(out)
        assert any(message in p for p in problems), (message, problems)
    path.write_text(original)
    assert validate_output(out) == []


SIGNS_EXPORT = """\
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentity
metadata: {name: one, namespace: tools}
spec: {type: 0, clientID: 9a9a9a9a-0000-4000-8000-000000000031, resourceID: /subscriptions/0b1f6471-1bf0-4dda-aec3-111122223333/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/one}
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentityBinding
metadata: {name: one, namespace: tools}
spec: {azureIdentity: one, selector: one}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: scheduler-settings, namespace: tools}
data: {EVENTS_URL: "http://169.254.169.254/metadata/scheduledevents?api-version=2020-07-01"}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: drainer
  namespace: tools
  annotations: {azure.workload.identity/tenant-id: 11111111-2222-4333-8444-555555555555}
""" + "".join(f"""---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: tools}}
spec:
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata:
      labels: {{app: {name}, aadpodidbinding: one}}{annotations}
    spec:
      serviceAccountName: {name}
      containers:
        - name: main
          image: contoso.azurecr.io/{name}:1{extra}
""" for name, annotations, extra in (
    ("drainer", "", "\n          envFrom: [{configMapRef: {name: scheduler-settings}}]"),
    ("inventory", "", "\n          args: [--region-from, 'http://169.254.169.254/metadata/instance/compute/location']"),
    ("pinned", "\n      annotations: {azwi-netproxy.io/passthrough: all}", ""),
    ("tokens-only", "", "\n          env: [{name: MSI_ENDPOINT, value: 'http://169.254.169.254/metadata/identity/oauth2/token'}]"),
))


def test_node_mode_keeps_workloads_that_need_instance_metadata_in_another_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export = tmp_path / "tools.yaml"
    export.write_text(SIGNS_EXPORT)
    expected_because = {
        "tools/Deployment/drainer": "container main: ConfigMap scheduler-settings (envFrom) key EVENTS_URL names "
                                    "/metadata/scheduledevents",
        "tools/Deployment/inventory": "container main: args[1] names /metadata/instance/compute/location",
        "tools/Deployment/pinned": 'pod annotation azwi-netproxy.io/passthrough: "all"',
    }
    for flags, fallback in ((["--node"], "sidecar"), (["--node", "--cni"], "CNI")):
        out = tmp_path / "-".join(flags)
        code, _, err = run(["-o", str(out), *flags, str(export)], capsys)
        assert code == 0, err
        assert validate_output(out) == []
        workloads = workload_manifests(out)
        node = assert_node_pod("tokens-only", workloads["tools/deployment-tokens-only.yaml"])
        assert node[NODE_CLIENT_ID] == "9a9a9a9a-0000-4000-8000-000000000031"
        for name in ("drainer", "inventory", "pinned"):
            annotations = pod_template(workloads[f"tools/deployment-{name}.yaml"])["metadata"]["annotations"]
            assert NODE_PROXY not in annotations, name
            if fallback == "CNI":
                assert annotations[REDIRECT] == "true", name
            else:
                assert annotations["azure.workload.identity/inject-proxy-sidecar"] == "true", name
        report = (out / "REPORT.md").read_text()
        section = report.split("## Node mode (`--node`)")[1].split("\n## ")[0]
        assert f"| Workload | Kept in {fallback} mode because |" in section
        for ref_, because in expected_because.items():
            line = next(line for line in section.splitlines() if f"`{ref_}`" in line)
            assert because in line, line
        assert "tokens-only" not in section
        assert "- **Node mode** (`--node`): 1 workloads in node mode, 3 kept in " + fallback + " mode" in report
        # The pass-through annotation is the user's choice and stays on the pinned workload.
        pinned = pod_template(workloads["tools/deployment-pinned.yaml"])["metadata"]["annotations"]
        assert pinned[PASSTHROUGH] == "all"


def test_node_mode_carries_the_service_accounts_tenant(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    export = tmp_path / "tools.yaml"
    export.write_text(SIGNS_EXPORT.replace("envFrom: [{configMapRef: {name: scheduler-settings}}]", "args: [drain]"))
    out = tmp_path / "out"
    code, _, err = run(["-o", str(out), "--node", str(export)], capsys)
    assert code == 0, err
    drainer = pod_template(workload_manifests(out)["tools/deployment-drainer.yaml"])["metadata"]["annotations"]
    assert drainer[NODE_TENANT_ID] == "11111111-2222-4333-8444-555555555555"
    assert validate_output(out) == []


def test_node_mode_gives_way_where_identity_binding_is_needed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["-o", str(tmp_path / "out"), "--node"]
    for number, cluster in enumerate(("east", "west", "north")):
        path = tmp_path / f"{cluster}.yaml"
        path.write_text(cluster_export(8, MIXED if cluster == "east" else ""))
        argv += ["--cluster", cluster, f"https://{cluster}.oic.example/tenant/{number}/", str(path)]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    out = tmp_path / "out"
    assert validate_output(out) == []
    for cluster in ("east", "west", "north"):
        app = pod_template(yaml.safe_load((out / "manifests" / cluster / "team-3" / "deployment-app.yaml").read_text()))
        assert app["metadata"]["annotations"]["azure.workload.identity/use-identity-binding"] == "true"
        assert NODE_PROXY not in app["metadata"]["annotations"]
        cli = pod_template(yaml.safe_load((out / "manifests" / cluster / "tools" / "deployment-cli.yaml").read_text()))
        assert_node_pod(f"{cluster}/cli", {"kind": "Pod", **cli})
    report = (out / "REPORT.md").read_text()
    section = report.split("## Node mode (`--node`)")[1].split("\n## ")[0]
    assert "| east | `team-0/Deployment/app` | needs AKS identity binding (over the FIC budget)" in section


def test_node_output_migrated_again_is_a_fixed_point_and_without_node_loses_the_annotations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = migrate_fixture(tmp_path, capsys, "--node")
    inputs = reexport(first)
    again = tmp_path / "again"
    code, _, err = run(["-o", str(again), "--issuer", ISSUER, "--node", *inputs], capsys)
    assert code == 0, err
    assert workload_manifests(again) == workload_manifests(first)
    back = tmp_path / "back"
    code, _, err = run(["-o", str(back), "--issuer", ISSUER, *inputs], capsys)
    assert code == 0, err
    assert workload_manifests(back) == workload_manifests(migrate_fixture(tmp_path / "default", capsys))
    assert "pod annotations azwi-netproxy.io/node-proxy, azwi-netproxy.io/client-id, azwi-netproxy.io/identity-map " \
           "removed (not node mode)" in (back / "manifests" / "payments" / "deployment-payments-api.yaml").read_text()
    # And a sidecar-mode output migrated with --node loses our containers and the map volume.
    sidecar = tmp_path / "default" / "out"
    to_node = tmp_path / "to-node"
    code, _, err = run(["-o", str(to_node), "--issuer", ISSUER, "--node", *reexport(sidecar)], capsys)
    assert code == 0, err
    assert workload_manifests(to_node) == workload_manifests(first)
    assert "# azwi-proxy-init, azwi-proxy, the volume azwi-identity-map removed\n" in (
        to_node / "manifests" / "payments" / "deployment-payments-api.yaml").read_text()
    # A CNI-mode output too: its redirect annotation would have the plugin exempt the proxy's uid.
    cni = migrate_fixture(tmp_path / "cni", capsys, "--cni")
    from_cni = tmp_path / "from-cni"
    code, _, err = run(["-o", str(from_cni), "--issuer", ISSUER, "--node", *reexport(cni)], capsys)
    assert code == 0, err
    assert validate_output(from_cni) == []

    def without_passthrough(objects: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        # CNI mode wrote the plugin's passthrough: "none"; node mode keeps it (it is what node
        # mode does anyway) so that the choice survives a later run without --node.
        for obj in objects.values():
            pod_template(obj)["metadata"]["annotations"].pop(PASSTHROUGH, None)
        return objects

    assert without_passthrough(node_workloads(from_cni)) == without_passthrough(node_workloads(first))
    header = (from_cni / "manifests" / "orders" / "deployment-orders-api.yaml").read_text()
    assert "# azwi-proxy removed\n" in header and "# pod annotations azwi-netproxy.io/redirect removed (node mode)" in header


def test_default_output_is_unchanged_by_the_node_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With --node only the workloads, REPORT.md and the map's ConfigMap and file differ."""
    default = tree(migrate_fixture(tmp_path / "default", capsys))
    node = tree(migrate_fixture(tmp_path / "node", capsys, "--node"))
    assert default == tree(GOLDEN)
    assert not [path for path, text in default.items() if "node-proxy" in text or "Node mode" in text]
    map_files = {"identity-maps/payments-deployment-payments-api.yaml",
                 "manifests/payments/configmap-azwi-identity-map-deployment-payments-api.yaml"}
    assert sorted(default) == sorted(set(node) | map_files)
    # The three of ops.yaml that need instance metadata are the same sidecar workloads in both.
    workloads = {f"manifests/{p}" for p in node_workloads(tmp_path / "node" / "out")}
    assert len(workloads) == 8
    assert {path for path in node if default[path] != node[path]} == workloads | {"REPORT.md"}


def test_node_flag_is_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    assert "--node" in text and "deploy/node/node-agent.yaml" in text and "no pass- through" in text


# ---------------------------------------------------------------------------- pass-through (issue 25)

KEEPERS = {
    "ops/cronjob-inventory-report.yaml": "container report: args[1] names /metadata/instance/compute",
    "ops/deployment-legacy-agent.yaml": 'pod annotation azwi-netproxy.io/passthrough: "all"',
    "ops/deployment-node-drainer.yaml": "container drainer: ConfigMap scheduled-events (envFrom) key EVENTS_URL "
                                        "names /metadata/scheduledevents",
}


def ours_in(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = pod_template(obj)["spec"]
    return {c["name"]: c for c in [*spec.get("initContainers", []), *spec["containers"]]
            if c["name"] in ("azwi-proxy-init", "azwi-proxy")}


def test_pass_through_is_closed_where_nothing_asks_for_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = migrate_fixture(tmp_path, capsys)
    workloads = workload_manifests(out)
    assert len(workloads) == 11
    for path, obj in workloads.items():
        header = (out / "manifests" / path).read_text()
        ours = ours_in(obj)
        if path in KEEPERS:
            # The webhook injects its pair, which passes through as upstream's does.
            assert ours == {}, path
            assert pod_template(obj)["metadata"]["annotations"]["azure.workload.identity/inject-proxy-sidecar"] == "true"
            assert f"# pass-through to the node's IMDS kept (the redirect exempts the proxy's uid): {KEEPERS[path]}\n" in header
            continue
        assert set(ours) == {"azwi-proxy-init", "azwi-proxy"}, path
        init_env = {e["name"]: e["value"] for e in ours["azwi-proxy-init"]["env"]}
        proxy_env = {e["name"]: e["value"] for e in ours["azwi-proxy"]["env"]}
        assert init_env["AZWI_PASSTHROUGH"] == proxy_env["AZWI_PASSTHROUGH"] == "none", path
        assert "PROXY_UID" not in init_env, path  # nothing is exempted: the uid would mean nothing
        assert "# AZWI_PASSTHROUGH=none on azwi-proxy-init and azwi-proxy: no uid is exempted" in header, path
    # The one whose annotation decides against its own probe: closed, and the report warns.
    assert 'pod annotation azwi-netproxy.io/passthrough: "none"; see REPORT.md' in (
        out / "manifests" / "ops" / "deployment-health-probe.yaml").read_text()
    report = (out / "REPORT.md").read_text()
    assert "- **Pass-through to the node's IMDS**: 8 workloads do without it" in report and "3 keep it" in report
    section = report.split("## Pass-through (IMDS paths other than the token's)")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows == [f"| `{ref_}` | {because} |" for ref_, because in (
        ("ops/CronJob/inventory-report", KEEPERS["ops/cronjob-inventory-report.yaml"]),
        ("ops/Deployment/legacy-agent", KEEPERS["ops/deployment-legacy-agent.yaml"]),
        ("ops/Deployment/node-drainer", KEEPERS["ops/deployment-node-drainer.yaml"]),
    )]
    warnings = report.split("## Warnings")[1].split("\n## ")[0]
    assert ("`ops/Deployment/health-probe` | export/ops.yaml:103 (document 6) | its pod annotation "
            'azwi-netproxy.io/passthrough: "none" closes pass-through, but container probe: '
            "livenessProbe.exec.command[4] names /metadata/versions: requests for those paths will get 403") in warnings


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_the_init_with_the_migrated_environment_exempts_no_uid(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real init's --dry-run with each migrated init container's env: no uid rule where none was written.

    The judge is the rule text the init prints (nft `meta skuid`, iptables `--uid-owner`); that the
    kernel then lets no uid through is the init's own tripwire tests' job (tests/test_security.py).
    """
    out = migrate_fixture(tmp_path, capsys)
    seen = 0
    for path, obj in workload_manifests(out).items():
        ours = ours_in(obj)
        if not ours:
            continue
        env = {e["name"]: e["value"] for e in ours["azwi-proxy-init"]["env"]}
        result = subprocess.run(
            [sys.executable, "-m", "azwi_netproxy.init", "--dry-run", "--backend", backend],
            capture_output=True, text=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env},
            timeout=60, check=False, cwd="/",
        )
        assert result.returncode == 0, result.stderr
        rules = result.stdout
        assert "169.254.169.254" in rules and env["PROXY_PORT"] in rules, path
        assert "skuid" not in rules and "uid-owner" not in rules, (path, rules)
        seen += 1
    assert seen == 8
    # And the webhook's injected init (PROXY_PORT only) still exempts 1501, for those that keep pass-through.
    result = subprocess.run(
        [sys.executable, "-m", "azwi_netproxy.init", "--dry-run", "--backend", backend],
        capture_output=True, text=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PROXY_PORT": "8000"},
        timeout=60, check=False, cwd="/",
    )
    assert result.returncode == 0 and ("skuid 1501" in result.stdout or "--uid-owner 1501" in result.stdout)


def test_the_manifests_the_report_names_are_shipped() -> None:
    from azwi_netproxy.migrate.render import NODE_AGENT_MANIFEST, NODE_MODE_MANIFEST

    repo = Path(__file__).resolve().parent.parent
    for manifest in (NODE_AGENT_MANIFEST, NODE_MODE_MANIFEST):
        assert (repo / manifest).is_file(), manifest
