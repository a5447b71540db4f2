"""The identity map file: YAML and JSON forms, and one clear ConfigError for each malformed one.

Name: test_identitymap
Scope: pure unit tests on text.
Depends: azwi_netproxy.identitymap only.
"""

from __future__ import annotations

import json
import sys

import pytest

from azwi_netproxy.errors import ConfigError
from azwi_netproxy.identitymap import IdentityMap, MappedIdentity, parse_identity_map

A = "11111111-1111-1111-1111-111111111111"
B = "44444444-4444-4444-4444-444444444444"
OBJ = "22222222-2222-2222-2222-222222222222"
TEN = "33333333-3333-3333-3333-333333333333"
RES = "/subscriptions/s1/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/app-a"

YAML_MAP = f"""\
# comments are fine
onlyListed: true
identities:
  - clientID: {A.upper()}
    resourceID: {RES}/
    objectID: {OBJ}
    tenantID: {TEN}
    name: app-a
  - clientID: "{B}"
"""

JSON_MAP = json.dumps(
    {
        "onlyListed": True,
        "identities": [
            {"clientID": A.upper(), "resourceID": RES + "/", "objectID": OBJ, "tenantID": TEN, "name": "app-a"},
            {"clientID": B},
        ],
    }
)

EXPECTED = (
    MappedIdentity(client_id=A, tenant_id=TEN, resource_id=RES, object_id=OBJ),
    MappedIdentity(client_id=B),
)


@pytest.mark.parametrize(
    "text",
    [YAML_MAP, JSON_MAP, json.dumps(json.loads(JSON_MAP), indent=2), json.dumps(json.loads(JSON_MAP), indent="\t")],
    ids=["yaml", "json-one-line", "json-indented-spaces", "json-indented-tabs"],
)
def test_parse(text: str) -> None:
    parsed = parse_identity_map(text, source="/etc/azwi/map.yaml")
    assert parsed.only_listed is True
    assert parsed.identities == EXPECTED
    assert parsed.by_client_id[A] is parsed.identities[0]
    assert parsed.by_client_id[B] is parsed.identities[1]
    assert parsed.by_resource_id[RES.lower()] is parsed.identities[0]
    assert parsed.by_object_id[OBJ] is parsed.identities[0]


@pytest.mark.parametrize(
    "text",
    ["identities: []", "{}", "onlyListed: false", "identities:\n"],
    ids=["empty-list", "empty-json", "only-flag", "null-identities"],
)
def test_empty_maps(text: str) -> None:
    parsed = parse_identity_map(text)
    assert parsed == IdentityMap()
    assert parsed.only_listed is False


def _entry(**fields: object) -> str:
    return json.dumps({"identities": [fields]})


MALFORMED = [
    ("", "expected a mapping with 'identities'", "empty-document"),
    ("- a\n- b\n", "expected a mapping with 'identities'", "top-level-list"),
    ("just text", "expected a mapping with 'identities'", "scalar"),
    ("identities: []\nonlylisted: true\n", "unknown key 'onlylisted'", "unknown-top-key"),
    ("onlyListed: 'true'\n", "onlyListed must be true or false", "only-listed-string"),
    ("onlyListed: 1\n", "onlyListed must be true or false", "only-listed-int"),
    ("identities: a\n", "identities must be a list", "identities-scalar"),
    ("identities: {clientID: x}\n", "identities must be a list", "identities-mapping"),
    ("identities: {}\n", "identities must be a list", "identities-empty-mapping"),
    ("identities: 0\n", "identities must be a list", "identities-zero"),
    ("identities:\n  - just-a-string\n", "identities[0]: expected a mapping", "entry-scalar"),
    (_entry(clientID=A, clientId=A), "identities[0]: unknown key 'clientId'", "unknown-entry-key"),
    (_entry(resourceID=RES), "identities[0]: clientID is required", "missing-client-id"),
    (_entry(clientID="app-a"), "identities[0]: clientID 'app-a' is not a GUID", "client-id-not-guid"),
    (_entry(clientID=12345), "clientID 12345 is not a GUID", "client-id-number"),
    (_entry(clientID=None), "clientID None is not a GUID", "client-id-null"),
    (_entry(clientID=A, tenantID="contoso.com"), "tenantID 'contoso.com' is not a GUID", "tenant-not-guid"),
    (_entry(clientID=A, objectID="obj"), "objectID 'obj' is not a GUID", "object-not-guid"),
    (_entry(clientID=A, resourceID="app-a"), "resourceID 'app-a' is not an ARM resource ID", "res-not-arm"),
    (_entry(clientID=A, resourceID=["/subscriptions/x"]), "is not an ARM resource ID", "res-not-string"),
    (
        json.dumps({"identities": [{"clientID": A}, {"clientID": A.upper()}]}),
        f"identities[1]: clientID {A} is listed twice",
        "duplicate-client-id",
    ),
    (
        json.dumps({"identities": [{"clientID": A, "resourceID": RES}, {"clientID": B, "resourceID": RES.upper()}]}),
        "identities[1]: resourceID is listed twice",
        "duplicate-resource-id",
    ),
    (
        json.dumps({"identities": [{"clientID": A, "objectID": OBJ}, {"clientID": B, "objectID": OBJ}]}),
        f"identities[1]: objectID {OBJ} is listed twice",
        "duplicate-object-id",
    ),
    ("identities:\n  - clientID: [1\n", "not valid YAML or JSON at line 3", "invalid-yaml"),
    ('{"identities": [}', "not valid JSON at line 1", "invalid-json"),
    ("identities:\n\t- clientID: x\n", "not valid YAML or JSON at line 2", "tab-indented-yaml"),
]


@pytest.mark.parametrize(
    ("text", "message"),
    [(t, m) for t, m, _ in MALFORMED],
    ids=[name for *_, name in MALFORMED],
)
def test_malformed(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_identity_map(text, source="/etc/azwi/map.yaml")
    text_of_error = str(info.value)
    assert message in text_of_error
    assert text_of_error.startswith("AZWI_IDENTITY_MAP /etc/azwi/map.yaml: ")
    assert "\n" not in text_of_error


def test_error_names_the_entry_index() -> None:
    text = json.dumps({"identities": [{"clientID": A}, {"clientID": B}, {"clientID": "bad"}]})
    with pytest.raises(ConfigError, match=r"identities\[2\]"):
        parse_identity_map(text)


def test_multiline_bad_value_stays_on_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_identity_map(_entry(clientID="a\nb\nc"))
    assert "\n" not in str(info.value)


def test_a_yaml_map_without_pyyaml_is_one_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)  # what import treats as not installed
    with pytest.raises(ConfigError, match="PyYAML") as caught:
        parse_identity_map("identities: []\n", source="/etc/map.yaml")
    assert "\n" not in str(caught.value)
    assert parse_identity_map('{"identities": []}') == IdentityMap()  # JSON needs no PyYAML
