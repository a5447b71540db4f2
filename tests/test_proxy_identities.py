"""End to end: which identity a request gets, with and without an identity map.

The proxy runs as a real process with `AZWI_IDENTITY_MAP` (CONTRACT.md, "The identity
map"); the fake Entra records which tenant and client each exchange was for, so a test
sees both what the app got and what was asked of Entra. A malformed map must stop the
proxy at start-up with exit code 2 and one line on stderr.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.fake_entra import FakeEntraClient, decode_fake_token
from support.proxyproc import (
    Pod,
    ProxyProcess,
    free_port,
    http_request,
    new_guid,
    run_proxy_command,
    shared_tempdir,
    unique_resource,
)

pytest_plugins = ["support.fixtures"]
pytestmark = pytest.mark.timeout(60)

ARM_PREFIX = "/subscriptions/{sub}/resourcegroups/rg-apps/providers/Microsoft.ManagedIdentity/userAssignedIdentities/"


@dataclass(frozen=True)
class Mapped:
    client_id: str
    object_id: str
    resource_id: str
    tenant_id: str | None


@dataclass(frozen=True)
class MapSetup:
    directory: Path
    app_a: Mapped  # in the pod's tenant
    app_b: Mapped  # in another tenant (tenantID in the map)

    def write(self, name: str, text: str) -> str:
        path = self.directory / name
        path.write_text(text)
        path.chmod(0o644)
        return str(path)

    def yaml(self, *, only_listed: bool) -> str:
        lines = [f"onlyListed: {'true' if only_listed else 'false'}", "identities:"]
        for app in (self.app_a, self.app_b):
            lines += [f"  - clientID: {app.client_id}",
                      f"    resourceID: {app.resource_id}",
                      f"    objectID: {app.object_id}"]
            if app.tenant_id:
                lines.append(f"    tenantID: {app.tenant_id}")
        return "\n".join(lines) + "\n"

    def json(self, *, only_listed: bool) -> str:
        entries = []
        for app in (self.app_a, self.app_b):
            entry = {"clientID": app.client_id, "resourceID": app.resource_id,
                     "objectID": app.object_id}
            if app.tenant_id:
                entry["tenantID"] = app.tenant_id
            entries.append(entry)
        return json.dumps({"onlyListed": only_listed, "identities": entries})


def _mapped(name: str, tenant_id: str | None) -> Mapped:
    arm = ARM_PREFIX.format(sub=new_guid()) + name
    return Mapped(new_guid(), new_guid(), arm, tenant_id)


@pytest.fixture(scope="module")
def identity_map() -> Iterator[MapSetup]:
    """Name: identity_map. Scope: module. Two mapped apps and a dir uid 1501 can read."""
    directory = shared_tempdir("azwi-map-")
    try:
        yield MapSetup(directory, _mapped("app-a", None), _mapped("app-b", new_guid()))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def mapped_proxy(module_proxy_factory: Callable[..., ProxyProcess],
                 identity_map: MapSetup) -> ProxyProcess:
    """Name: mapped_proxy. Scope: module. A proxy with a YAML map, onlyListed false, run
    optimised (-OO) as the proxy image runs it: PyYAML is imported under -OO too."""
    path = identity_map.write("map.yaml", identity_map.yaml(only_listed=False))
    return module_proxy_factory(AZWI_IDENTITY_MAP=path, PYTHONOPTIMIZE="2")


@pytest.fixture(scope="module")
def only_listed_proxy(module_proxy_factory: Callable[..., ProxyProcess],
                      identity_map: MapSetup) -> ProxyProcess:
    """Name: only_listed_proxy. Scope: module. A proxy with a JSON map, onlyListed true."""
    path = identity_map.write("map.json", identity_map.json(only_listed=True))
    return module_proxy_factory(AZWI_IDENTITY_MAP=path)


@pytest.fixture
def apps(entra: FakeEntraClient, pod: Pod, identity_map: MapSetup) -> MapSetup:
    """Name: apps. Scope: function. Entra knows both mapped apps, each in its tenant."""
    for app in (identity_map.app_a, identity_map.app_b):
        entra.add_app(app.tenant_id or pod.tenant_id, app.client_id, [pod.subject], pod.issuer)
    return identity_map


def _get(proxy: ProxyProcess, resource: str, **selector: str) -> tuple[int, dict[str, str]]:
    response = proxy.token(resource, **selector)
    return response.status, response.json()


def _selector_cases() -> list[object]:
    return [
        pytest.param("msi_res_id", lambda a: a.resource_id, id="msi_res_id"),
        pytest.param("mi_res_id", lambda a: a.resource_id, id="mi_res_id"),
        pytest.param("msi_res_id", lambda a: a.resource_id.upper(), id="msi_res_id-upper"),
        pytest.param("mi_res_id", lambda a: a.resource_id.lower(), id="mi_res_id-lower"),
        pytest.param("object_id", lambda a: a.object_id, id="object_id"),
        pytest.param("object_id", lambda a: a.object_id.upper(), id="object_id-upper"),
    ]


@pytest.mark.parametrize(("selector", "value_of"), _selector_cases())
@pytest.mark.parametrize("which", ["a", "b"], ids=["home-tenant", "mapped-tenant"])
def test_map_aliases_resolve_to_the_mapped_client_and_tenant(
        mapped_proxy: ProxyProcess, apps: MapSetup, entra: FakeEntraClient, pod: Pod,
        selector: str, value_of: Callable[[Mapped], str], which: str) -> None:
    app = apps.app_a if which == "a" else apps.app_b
    tenant = app.tenant_id or pod.tenant_id
    resource = unique_resource("alias")
    status, doc = _get(mapped_proxy, resource, **{selector: value_of(app)})
    assert status == 200, doc
    assert doc["client_id"] == app.client_id
    claims = decode_fake_token(doc["access_token"])
    assert (claims["appid"], claims["tid"]) == (app.client_id, tenant)
    [seen] = entra.exchanges()
    assert seen["path"] == f"/{tenant}/oauth2/v2.0/token"
    assert seen["form"]["client_id"] == app.client_id


def test_mapped_client_id_uses_the_mapped_tenant(
        mapped_proxy: ProxyProcess, apps: MapSetup, entra: FakeEntraClient) -> None:
    app = apps.app_b
    status, doc = _get(mapped_proxy, unique_resource("cid"), client_id=app.client_id)
    assert status == 200, doc
    assert decode_fake_token(doc["access_token"])["tid"] == app.tenant_id
    assert [r["path"] for r in entra.exchanges()] == [f"/{app.tenant_id}/oauth2/v2.0/token"]


def test_unlisted_client_id_is_exchanged_when_only_listed_is_false(
        mapped_proxy: ProxyProcess, apps: MapSetup, new_app: Callable[..., str], pod: Pod,
        entra: FakeEntraClient) -> None:
    outsider = new_app()
    status, doc = _get(mapped_proxy, unique_resource("outsider"), client_id=outsider)
    assert status == 200, doc
    assert decode_fake_token(doc["access_token"])["appid"] == outsider
    assert [r["path"] for r in entra.exchanges()] == [f"/{pod.tenant_id}/oauth2/v2.0/token"]


@pytest.mark.parametrize(
    ("selector", "value"),
    [
        ("msi_res_id", ARM_PREFIX.format(sub="00000000-0000-0000-0000-000000000001") + "ghost"),
        ("mi_res_id", ARM_PREFIX.format(sub="00000000-0000-0000-0000-000000000001") + "ghost"),
        ("object_id", "00000000-0000-0000-0000-0000000000ff"),
    ],
    ids=["msi_res_id", "mi_res_id", "object_id"],
)
def test_selector_not_in_the_map_is_400_naming_it_and_no_exchange(
        mapped_proxy: ProxyProcess, apps: MapSetup, entra: FakeEntraClient,
        selector: str, value: str) -> None:
    status, doc = _get(mapped_proxy, unique_resource("ghost"), **{selector: value})
    assert status == 400, doc
    assert set(doc) == {"error", "error_description"}
    assert doc["error"] == "invalid_request"
    assert selector in doc["error_description"] or value in doc["error_description"]
    assert entra.exchanges() == []


def test_alias_without_a_map_is_400_and_never_the_default_identity(
        proxy: ProxyProcess, entra: FakeEntraClient) -> None:
    arm = ARM_PREFIX.format(sub=new_guid()) + "app-x"
    status, doc = _get(proxy, unique_resource("nomap"), msi_res_id=arm)
    assert status == 400, doc
    assert doc["error"] == "invalid_request"
    assert "msi_res_id" in doc["error_description"]
    assert entra.exchanges() == []


def test_only_listed_refuses_an_unlisted_client_id_without_an_exchange(
        only_listed_proxy: ProxyProcess, apps: MapSetup, new_app: Callable[..., str],
        entra: FakeEntraClient) -> None:
    outsider = new_app()  # Entra would accept it: the proxy must not ask
    status, doc = _get(only_listed_proxy, unique_resource("listed"), client_id=outsider)
    assert status == 400, doc
    assert doc["error"] == "invalid_request"
    assert "Identity not found" in doc["error_description"]
    assert entra.exchanges() == []
    # Listed identities still work, by client ID and by alias (JSON map this time).
    for selector in ({"client_id": apps.app_a.client_id}, {"object_id": apps.app_b.object_id}):
        status, doc = _get(only_listed_proxy, unique_resource("listed"), **selector)
        assert status == 200, doc
    assert {r["client_id"] for r in entra.exchanges()} == {apps.app_a.client_id,
                                                           apps.app_b.client_id}


# ---- malformed maps stop the proxy -------------------------------------------------------


MALFORMED_MAPS = {
    "not-yaml": "identities: [\n  - clientID: {\n",
    "not-a-mapping": "- clientID: 11111111-1111-1111-1111-111111111111\n",
    "no-client-id": "identities:\n  - objectID: 11111111-1111-1111-1111-111111111111\n",
    "client-id-not-guid": "identities:\n  - clientID: app-a\n",
    "resource-id-not-arm": "identities:\n  - clientID: 11111111-1111-1111-1111-111111111111\n"
                           "    resourceID: app-a\n",
    "unknown-key": "identities:\n  - clientID: 11111111-1111-1111-1111-111111111111\n"
                   "    clientSecret: hunter2\n",
    "only-listed-not-bool": "onlyListed: maybe\nidentities: []\n",
    "duplicate-client": "identities:\n  - clientID: 11111111-1111-1111-1111-111111111111\n"
                        "  - clientID: 11111111-1111-1111-1111-111111111111\n",
    "bad-json": '{"identities": [{"clientID": "11111111-1111-1111-1111-111111111111"}',
}


@pytest.mark.parametrize("text", list(MALFORMED_MAPS.values()), ids=list(MALFORMED_MAPS))
def test_malformed_map_exits_2_with_one_line(
        python_for_other_uids: str, proxy_env: Callable[..., dict[str, str]],
        identity_map: MapSetup, text: str, request: pytest.FixtureRequest) -> None:
    path = identity_map.write(f"bad-{request.node.callspec.id}.yaml", text)
    port = free_port()
    done = run_proxy_command(python_for_other_uids, proxy_env(AZWI_IDENTITY_MAP=path),
                             ["--proxy-port", str(port)])
    assert done.returncode == 2, done
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "AZWI_IDENTITY_MAP" in lines[0]
    assert "hunter2" not in lines[0]
    assert done.stdout == ""
    with pytest.raises(OSError):
        http_request(port, "/readyz", timeout_s=1)


def test_missing_map_file_exits_2_with_one_line(
        python_for_other_uids: str, proxy_env: Callable[..., dict[str, str]],
        identity_map: MapSetup) -> None:
    done = run_proxy_command(
        python_for_other_uids,
        proxy_env(AZWI_IDENTITY_MAP=str(identity_map.directory / "absent.yaml")),
        ["--proxy-port", str(free_port())])
    assert done.returncode == 2, done
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "AZWI_IDENTITY_MAP" in done.stderr
