"""The identity map of CONTRACT.md: which managed identities this pod may use, and their aliases.

Pure: takes the file's text, returns a frozen IdentityMap or raises ConfigError with one
line that names the file and the entry at fault.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final

from azwi_netproxy.errors import ConfigError
from azwi_netproxy.settings import GUID

_KNOWN_TOP: Final = frozenset({"onlyListed", "identities"})
_KNOWN_ENTRY: Final = frozenset({"clientID", "resourceID", "objectID", "tenantID", "name"})


@dataclass(frozen=True, slots=True)
class MappedIdentity:
    client_id: str
    tenant_id: str | None = None
    resource_id: str | None = None
    object_id: str | None = None


@dataclass(frozen=True, slots=True)
class IdentityMap:
    only_listed: bool = False
    identities: tuple[MappedIdentity, ...] = ()
    # Lookup tables, built by parse_identity_map; keys are lower-cased.
    by_client_id: dict[str, MappedIdentity] = field(default_factory=dict, compare=False)
    by_resource_id: dict[str, MappedIdentity] = field(default_factory=dict, compare=False)
    by_object_id: dict[str, MappedIdentity] = field(default_factory=dict, compare=False)


def _guid(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str) or not GUID.match(value.strip()):
        raise ConfigError(f"{where}: {key} {value!r} is not a GUID")
    return value.strip().lower()


def parse_identity_map(text: str, *, source: str = "identity map", label: str | None = None) -> IdentityMap:
    """Parse and check an identity map (YAML or JSON).

    Errors begin with `label` (default: AZWI_IDENTITY_MAP and the file's name, `source`).

    Raises:
        ConfigError: malformed document, unknown keys, bad GUIDs or duplicates.
    """
    label = label or f"AZWI_IDENTITY_MAP {source}"
    doc: Any
    if text.lstrip().startswith("{"):
        # JSON first: it allows tab indentation, which YAML does not.
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{label}: not valid JSON at line {exc.lineno}: {exc.msg}"
            ) from None
    else:
        try:
            import yaml  # only pods with a YAML map pay for PyYAML's import, at start-up
        except ImportError:
            raise ConfigError(
                f"{label}: reading a YAML map needs PyYAML, which cannot be "
                "imported: install it, or give the map as JSON"
            ) from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{label}: not valid YAML or JSON{at}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{label}: expected a mapping with 'identities'")
    unknown = set(doc) - _KNOWN_TOP
    if unknown:
        raise ConfigError(f"{label}: unknown key {sorted(map(str, unknown))[0]!r}")
    only_listed = doc.get("onlyListed", False)
    if not isinstance(only_listed, bool):
        raise ConfigError(f"{label}: onlyListed must be true or false")
    entries = doc.get("identities")
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise ConfigError(f"{label}: identities must be a list")

    by_client: dict[str, MappedIdentity] = {}
    by_resource: dict[str, MappedIdentity] = {}
    by_object: dict[str, MappedIdentity] = {}
    identities: list[MappedIdentity] = []
    for index, entry in enumerate(entries):
        where = f"{label}: identities[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping")
        unknown = set(entry) - _KNOWN_ENTRY
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(map(str, unknown))[0]!r}")
        if "clientID" not in entry:
            raise ConfigError(f"{where}: clientID is required")
        client_id = _guid(entry["clientID"], where, "clientID")
        tenant_id = _guid(entry["tenantID"], where, "tenantID") if entry.get("tenantID") else None
        object_id = _guid(entry["objectID"], where, "objectID") if entry.get("objectID") else None
        resource_id: str | None = None
        if entry.get("resourceID"):
            raw = entry["resourceID"]
            if not isinstance(raw, str) or not raw.strip().lower().startswith("/subscriptions/"):
                raise ConfigError(f"{where}: resourceID {raw!r} is not an ARM resource ID")
            resource_id = raw.strip().rstrip("/")
        identity = MappedIdentity(client_id, tenant_id, resource_id, object_id)
        if client_id in by_client:
            raise ConfigError(f"{where}: clientID {client_id} is listed twice")
        by_client[client_id] = identity
        if resource_id is not None:
            if resource_id.lower() in by_resource:
                raise ConfigError(f"{where}: resourceID is listed twice")
            by_resource[resource_id.lower()] = identity
        if object_id is not None:
            if object_id in by_object:
                raise ConfigError(f"{where}: objectID {object_id} is listed twice")
            by_object[object_id] = identity
        identities.append(identity)
    return IdentityMap(only_listed, tuple(identities), by_client, by_resource, by_object)
