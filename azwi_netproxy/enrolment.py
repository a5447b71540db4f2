"""Node mode's enrolment: what the CNI plugin learned about a pod, as the node process needs it.

The plugin builds an `Enrolment` from the pod's annotations and CNI_ARGS at ADD, keeps it as a
record under the run dir and hands it to the node process together with the pod's network
namespace; after a restart the node process serves the pods of those records again. The
record crosses a trust boundary twice (a file, a socket) between two programs, so both sides
read it through `from_json`, which checks every field the way the annotations were checked.

Pure: text in, an Enrolment or ConfigError out (each error names the field or annotation).
Must not know: sockets, files, netfilter, HTTP.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Final

from azwi_netproxy.errors import ConfigError
from azwi_netproxy.identitymap import IdentityMap, parse_identity_map
from azwi_netproxy.settings import (
    NODE_CLIENT_ID_ANNOTATION,
    NODE_IDENTITY_MAP_ANNOTATION,
    NODE_TENANT_ID_ANNOTATION,
    parse_client_id,
    parse_port,
    parse_tenant_id,
)

# The kubelet names a pod's directory by its UID; anything else could walk out of it.
_POD_UID: Final = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# CNI spec: "alphanumeric characters, hyphens, underscores and periods"; it names a file here.
_CONTAINER_ID: Final = re.compile(r"^[0-9A-Za-z][0-9A-Za-z_.-]{0,253}$")
# An annotation holds at most 256 KiB in all; a map this size is already far past any pod's.
MAX_IDENTITY_MAP_BYTES: Final = 64 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Enrolment:
    """One pod served by the node process."""

    container_id: str
    pod_uid: str
    # namespace/name, for the logs (from CNI_ARGS).
    pod: str
    # The namespace's path as the runtime gave it, and the kernel's cookie for it: a path
    # can name another namespace later, a cookie never names two in one boot.
    netns: str
    netns_cookie: int
    proxy_port: int
    client_id: str | None
    tenant_id: str | None
    # The annotation's JSON text, checked; the node process parses it again into its map.
    identity_map: str | None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    def parsed_identity_map(self) -> IdentityMap:
        if self.identity_map is None:
            return IdentityMap()
        return parse_identity_map(self.identity_map, label=NODE_IDENTITY_MAP_ANNOTATION)


# A record's keys: exactly the fields, no more, no fewer.
_FIELDS: Final = frozenset(field.name for field in fields(Enrolment))


def check_pod_uid(value: str) -> str:
    """A pod UID as the kubelet writes it (lower-case UUID).

    Raises:
        ConfigError: anything else: it becomes a path under the kubelet's pods dir.
    """
    if not _POD_UID.match(value):
        raise ConfigError(f"K8S_POD_UID: {value!r} is not a pod UID")
    return value


def check_container_id(value: str) -> str:
    """A CNI container ID, which names the pod's record file.

    Raises:
        ConfigError: anything but the spec's characters.
    """
    if not _CONTAINER_ID.match(value):
        raise ConfigError(f"CNI_CONTAINERID: {value!r} is not a container ID")
    return value


def check_identity_map(text: str, name: str = NODE_IDENTITY_MAP_ANNOTATION) -> str:
    """The identity-map annotation (`name` in errors): the contract's map as JSON.

    Raises:
        ConfigError: not a JSON object, too large, or a map the sidecar would refuse.
    """
    if len(text.encode()) > MAX_IDENTITY_MAP_BYTES:
        raise ConfigError(f"{name}: larger than {MAX_IDENTITY_MAP_BYTES} bytes")
    if not text.lstrip().startswith("{"):
        raise ConfigError(f"{name}: not a JSON object")
    parse_identity_map(text, label=name)
    return text


def enrolment(
    *,
    container_id: str,
    pod_uid: str,
    pod: str,
    netns: str,
    netns_cookie: int,
    proxy_port: int | str,
    client_id: str | None,
    tenant_id: str | None,
    identity_map: str | None,
) -> Enrolment:
    """An Enrolment with every field checked.

    Raises:
        ConfigError: the first bad field, named as the pod's annotation where it is one.
    """
    if not isinstance(netns_cookie, int) or isinstance(netns_cookie, bool) or netns_cookie <= 0:
        raise ConfigError(f"netns_cookie: {netns_cookie!r} is not a namespace cookie")
    if not netns.startswith("/"):
        raise ConfigError(f"netns: {netns!r} is not an absolute path")
    return Enrolment(
        container_id=check_container_id(container_id),
        pod_uid=check_pod_uid(pod_uid),
        pod=pod,
        netns=netns,
        netns_cookie=netns_cookie,
        proxy_port=parse_port(proxy_port, "azwi-netproxy.io/proxy-port"),
        client_id=None if client_id is None else parse_client_id(client_id, NODE_CLIENT_ID_ANNOTATION),
        tenant_id=None if tenant_id is None else parse_tenant_id(tenant_id, NODE_TENANT_ID_ANNOTATION),
        identity_map=None if identity_map is None else check_identity_map(identity_map),
    )


def from_json(text: str | bytes) -> Enrolment:
    """An Enrolment from its record (`Enrolment.to_json`), checked again.

    Raises:
        ConfigError: not a record, or a field that fails its check.
    """
    try:
        doc: Any = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise ConfigError("enrolment: not JSON") from None
    if not isinstance(doc, dict) or set(doc) != _FIELDS:
        raise ConfigError("enrolment: not an enrolment record")
    for name in ("container_id", "pod_uid", "pod", "netns"):
        if not isinstance(doc[name], str):
            raise ConfigError(f"enrolment: {name} is not a string")
    for name in ("client_id", "tenant_id", "identity_map"):
        if doc[name] is not None and not isinstance(doc[name], str):
            raise ConfigError(f"enrolment: {name} is not a string")
    if not isinstance(doc["proxy_port"], int):
        raise ConfigError("enrolment: proxy_port is not a number")
    return enrolment(**{name: doc[name] for name in _FIELDS})
