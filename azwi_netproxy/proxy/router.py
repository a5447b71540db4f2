"""Which managed identity a token request is for.

Pure: the identity selector of the request (or none) plus the pod's configuration in, an
`Identity` (client ID and tenant) or a BadRequest/UnknownIdentity out. A selector that
cannot be resolved is an error that says why, never silently the default identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from azwi_netproxy.errors import BadRequest, UnknownIdentity
from azwi_netproxy.identitymap import IdentityMap
from azwi_netproxy.proxy.imds import MSG_IDENTITY_NOT_FOUND
from azwi_netproxy.settings import GUID

MSG_NO_DEFAULT: Final = (
    "No client_id in the request and AZURE_CLIENT_ID is not set: annotate the "
    "service account with azure.workload.identity/client-id or pass client_id"
)


@dataclass(frozen=True, slots=True)
class Identity:
    client_id: str
    tenant_id: str


class Router:
    """Resolves selectors against AZURE_CLIENT_ID and the optional identity map."""

    __slots__ = ("_default", "_map", "_no_default", "_tenant")

    def __init__(
        self,
        *,
        default_client_id: str | None,
        tenant_id: str,
        identity_map: IdentityMap,
        no_default: str = MSG_NO_DEFAULT,
    ) -> None:
        self._default = default_client_id.lower() if default_client_id else None
        self._tenant = tenant_id
        self._map = identity_map
        # What a request without client_id is told when there is no default (where the
        # default comes from differs: the sidecar's environment, node mode's annotation).
        self._no_default = no_default

    def resolve(self, selector: tuple[str, str] | None) -> Identity:
        """The identity for a request's selector (None = the pod's default).

        Raises:
            BadRequest: no default configured, a malformed client_id, or an alias not in the map.
            UnknownIdentity: onlyListed is on and the client ID is not listed.
        """
        if selector is None:
            if self._default is None:
                raise BadRequest(self._no_default)
            return self._client(self._default)
        kind, value = selector
        if kind == "client_id":
            if not GUID.match(value):
                raise BadRequest(f"client_id '{value}' is not a GUID")
            return self._client(value.lower())
        if kind == "object_id":
            entry = self._map.by_object_id.get(value.lower())
            what = "object_id"
        else:  # msi_res_id / mi_res_id: ARM IDs compare case-insensitively
            entry = self._map.by_resource_id.get(value.rstrip("/").lower())
            what = kind
        if entry is None:
            raise BadRequest(
                f"{what} '{value}' is not in this pod's identity map (AZWI_IDENTITY_MAP); "
                "the proxy can only resolve identities listed there"
            )
        return Identity(entry.client_id, entry.tenant_id or self._tenant)

    def _client(self, client_id: str) -> Identity:
        entry = self._map.by_client_id.get(client_id)
        if entry is not None:
            return Identity(client_id, entry.tenant_id or self._tenant)
        # The service account's own identity is always usable, listed or not.
        if self._map.only_listed and client_id != self._default:
            raise UnknownIdentity(MSG_IDENTITY_NOT_FOUND)
        return Identity(client_id, self._tenant)
