"""Node mode's enrolment record: what crosses from the CNI plugin to the node process.

Name: test_enrolment
Scope: pure unit tests, no I/O.
Depends: azwi_netproxy.enrolment only.

The record is read back from a file and a socket, so every field is checked again there:
a record that could make the node process read outside a pod's directory, write outside
the records dir, or serve a pod with values its annotations could never have had is refused
with an error that names the field.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from azwi_netproxy.enrolment import MAX_IDENTITY_MAP_BYTES, Enrolment, enrolment, from_json
from azwi_netproxy.errors import ConfigError

GOOD: dict[str, Any] = {
    "container_id": "4b8e0c2a9f",
    "pod_uid": "0f4c3a8e-1d2b-4c5d-8e9f-0a1b2c3d4e5f",
    "pod": "team-a/app-0",
    "netns": "/var/run/netns/cni-1234",
    "netns_cookie": 4107,
    "proxy_port": 8000,
    "client_id": "11111111-1111-1111-1111-111111111111",
    "tenant_id": "contoso.onmicrosoft.com",
    "identity_map": '{"identities": [{"clientID": "22222222-2222-2222-2222-222222222222"}]}',
}


def test_a_record_reads_back_as_it_was_written() -> None:
    record = enrolment(**GOOD)
    assert from_json(record.to_json()) == record
    assert record.parsed_identity_map().identities[0].client_id == "22222222-2222-2222-2222-222222222222"


def test_optional_values_may_be_absent() -> None:
    record = enrolment(**{**GOOD, "client_id": None, "tenant_id": None, "identity_map": None})
    assert from_json(record.to_json()) == record
    assert record.parsed_identity_map().identities == ()


def test_client_ids_are_lower_cased() -> None:
    record = enrolment(**{**GOOD, "client_id": "ABCDEF12-1111-1111-1111-111111111111"})
    assert record.client_id == "abcdef12-1111-1111-1111-111111111111"


BAD: list[tuple[dict[str, Any], str]] = [
    ({"pod_uid": "../../etc"}, "K8S_POD_UID"),
    ({"pod_uid": "0F4C3A8E-1D2B-4C5D-8E9F-0A1B2C3D4E5F"}, "K8S_POD_UID"),  # the kubelet writes lower case
    ({"container_id": "a/b"}, "CNI_CONTAINERID"),
    ({"container_id": ".hidden"}, "CNI_CONTAINERID"),
    ({"container_id": ""}, "CNI_CONTAINERID"),
    ({"netns_cookie": 0}, "netns_cookie"),
    ({"netns_cookie": True}, "netns_cookie"),
    ({"netns": "var/run/netns/x"}, "netns"),
    ({"proxy_port": 0}, "azwi-netproxy.io/proxy-port"),
    ({"proxy_port": 70000}, "azwi-netproxy.io/proxy-port"),
    ({"client_id": "not-a-guid"}, "azwi-netproxy.io/client-id"),
    ({"tenant_id": "a tenant/../x"}, "azwi-netproxy.io/tenant-id"),
    ({"identity_map": "identities: []"}, "azwi-netproxy.io/identity-map: not a JSON object"),
    ({"identity_map": '{"identities": [{"clientID": "x"}]}'}, "azwi-netproxy.io/identity-map: identities[0]"),
    ({"identity_map": '{"identities": [], "extra": 1}'}, "azwi-netproxy.io/identity-map: unknown key"),
    ({"identity_map": '{"identities": []' + " " * MAX_IDENTITY_MAP_BYTES + "}"},
     "azwi-netproxy.io/identity-map: larger than"),
]


@pytest.mark.parametrize(("change", "named"), BAD, ids=[f"{next(iter(c))}-{i}" for i, (c, _) in enumerate(BAD)])
def test_a_bad_field_is_refused_naming_it(change: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{named.replace('[', '.').replace(']', '.')}"):
        enrolment(**{**GOOD, **change})
    # Read back from a record, the same field is refused the same way.
    with pytest.raises(ConfigError, match=rf"^{named.replace('[', '.').replace(']', '.')}"):
        from_json(json.dumps({**GOOD, **change}))


@pytest.mark.parametrize(
    "text",
    [b"", b"not json", b"[]", json.dumps({k: v for k, v in GOOD.items() if k != "pod"}).encode(),
     json.dumps({**GOOD, "more": 1}).encode(), json.dumps({**GOOD, "pod": 5}).encode(),
     json.dumps({**GOOD, "proxy_port": "8000"}).encode(), json.dumps({**GOOD, "client_id": 5}).encode(),
     b"\xff\xfe"],
    ids=["empty", "text", "list", "missing-field", "extra-field", "pod-number", "port-string",
         "client-number", "not-utf8"],
)
def test_what_is_not_a_record_is_refused(text: bytes) -> None:
    with pytest.raises(ConfigError, match=r"^enrolment: "):
        from_json(text)


def test_the_record_masks_nothing_secret_because_it_holds_nothing_secret() -> None:
    """No token or assertion is ever part of a record: only where to find the pod's."""
    assert set(Enrolment.__dataclass_fields__) == set(GOOD)
