"""Router: the request's identity selector (or none) → client ID and tenant.

Name: test_router
Scope: pure unit tests.
Depends: azwi_netproxy.proxy.router and azwi_netproxy.identitymap (maps built from YAML text).
"""

from __future__ import annotations

import pytest

from azwi_netproxy.errors import BadRequest, UnknownIdentity
from azwi_netproxy.identitymap import IdentityMap, parse_identity_map
from azwi_netproxy.proxy.router import Identity, Router

TENANT = "00000000-0000-0000-0000-00000000000a"
OTHER_TENANT = "33333333-3333-3333-3333-333333333333"
DEFAULT = "aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa"
APP_A = "11111111-1111-1111-1111-111111111111"
APP_B = "44444444-4444-4444-4444-444444444444"
OBJ_A = "22222222-2222-2222-2222-222222222222"
UNLISTED = "99999999-9999-9999-9999-999999999999"
RES_A = (
    "/subscriptions/s1/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/app-a"
)
RES_B = "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/app-b"


def _map(only_listed: bool) -> IdentityMap:
    return parse_identity_map(
        f"""
onlyListed: {str(only_listed).lower()}
identities:
  - clientID: {APP_A}
    resourceID: {RES_A}
    objectID: {OBJ_A}
  - clientID: {APP_B.upper()}
    resourceID: {RES_B}/
    tenantID: {OTHER_TENANT}
"""
    )


def _router(*, only_listed: bool = False, default: str | None = DEFAULT) -> Router:
    return Router(default_client_id=default, tenant_id=TENANT, identity_map=_map(only_listed))


RESOLVE_CASES = [
    (None, Identity(DEFAULT, TENANT), "default"),
    (("client_id", APP_A), Identity(APP_A, TENANT), "listed-client"),
    (("client_id", APP_A.upper()), Identity(APP_A, TENANT), "client-id-upper-case"),
    (("client_id", UNLISTED), Identity(UNLISTED, TENANT), "unlisted-client-allowed"),
    (("client_id", APP_B), Identity(APP_B, OTHER_TENANT), "per-identity-tenant"),
    (("object_id", OBJ_A), Identity(APP_A, TENANT), "object-id"),
    (("object_id", OBJ_A.upper()), Identity(APP_A, TENANT), "object-id-upper-case"),
    (("msi_res_id", RES_A), Identity(APP_A, TENANT), "msi-res-id"),
    (("mi_res_id", RES_A), Identity(APP_A, TENANT), "mi-res-id"),
    (("msi_res_id", RES_A.upper()), Identity(APP_A, TENANT), "res-id-upper-case"),
    (("msi_res_id", RES_A.lower()), Identity(APP_A, TENANT), "res-id-lower-case"),
    (("msi_res_id", RES_A + "/"), Identity(APP_A, TENANT), "res-id-trailing-slash"),
    (("mi_res_id", RES_B), Identity(APP_B, OTHER_TENANT), "res-id-listed-with-slash-and-own-tenant"),
]


@pytest.mark.parametrize(
    ("selector", "identity"),
    [(s, i) for s, i, _ in RESOLVE_CASES],
    ids=[name for *_, name in RESOLVE_CASES],
)
def test_resolve(selector: tuple[str, str] | None, identity: Identity) -> None:
    assert _router().resolve(selector) == identity


def test_default_client_id_is_lower_cased() -> None:
    router = Router(default_client_id=DEFAULT.upper(), tenant_id=TENANT, identity_map=IdentityMap())
    assert router.resolve(None) == Identity(DEFAULT, TENANT)


def test_no_default_and_no_selector_is_a_bad_request_that_says_why() -> None:
    with pytest.raises(BadRequest) as info:
        _router(default=None).resolve(None)
    assert "AZURE_CLIENT_ID" in str(info.value)
    assert type(info.value) is BadRequest


BAD_CASES = [
    (("client_id", "not-a-guid"), "client_id 'not-a-guid' is not a GUID", "client-id-not-guid"),
    (("client_id", APP_A + "0"), "is not a GUID", "client-id-too-long"),
    (("client_id", "{" + APP_A + "}"), "is not a GUID", "client-id-braces"),
    (("object_id", UNLISTED), f"object_id '{UNLISTED}' is not in this pod's identity map", "object-id-unknown"),
    (("msi_res_id", "/subscriptions/nope"), "msi_res_id '/subscriptions/nope'", "msi-res-id-unknown"),
    (("mi_res_id", "/subscriptions/nope"), "mi_res_id '/subscriptions/nope'", "mi-res-id-unknown"),
    (("bogus_id", "x"), "bogus_id 'x'", "unknown-selector-named"),
]


@pytest.mark.parametrize(
    ("selector", "message"),
    [(s, m) for s, m, _ in BAD_CASES],
    ids=[name for *_, name in BAD_CASES],
)
def test_resolve_rejects(selector: tuple[str, str], message: str) -> None:
    with pytest.raises(BadRequest) as info:
        _router().resolve(selector)
    assert message in str(info.value)
    # Not "Identity not found": these are malformed or unmapped selectors, and say so.
    assert not isinstance(info.value, UnknownIdentity)
    assert info.value.status == 400


ONLY_LISTED_CASES = [
    (None, Identity(DEFAULT, TENANT), "default-always-usable"),
    (("client_id", DEFAULT.upper()), Identity(DEFAULT, TENANT), "default-by-client-id"),
    (("client_id", APP_A), Identity(APP_A, TENANT), "listed"),
    (("client_id", APP_B), Identity(APP_B, OTHER_TENANT), "listed-own-tenant"),
    (("object_id", OBJ_A), Identity(APP_A, TENANT), "listed-by-object-id"),
    (("msi_res_id", RES_B), Identity(APP_B, OTHER_TENANT), "listed-by-res-id"),
]


@pytest.mark.parametrize(
    ("selector", "identity"),
    [(s, i) for s, i, _ in ONLY_LISTED_CASES],
    ids=[name for *_, name in ONLY_LISTED_CASES],
)
def test_only_listed_allows(selector: tuple[str, str] | None, identity: Identity) -> None:
    assert _router(only_listed=True).resolve(selector) == identity


def test_only_listed_refuses_an_unlisted_client_with_identity_not_found() -> None:
    with pytest.raises(UnknownIdentity) as info:
        _router(only_listed=True).resolve(("client_id", UNLISTED))
    assert str(info.value) == "Identity not found"
    assert (info.value.status, info.value.code) == (400, "invalid_request")


def test_only_listed_without_default_refuses_unlisted() -> None:
    with pytest.raises(UnknownIdentity):
        _router(only_listed=True, default=None).resolve(("client_id", UNLISTED))
