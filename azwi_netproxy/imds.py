"""The IMDS wire model: which path is which, the token query, and the JSON IMDS answers with.

Rules:
1. Pure: strings and bytes in, values or BadRequest out. No sockets, no clock calls (the
   caller passes `now`).
2. Only this module knows IMDS's field names and messages.
3. A path that *could* be read as the identity endpoint by anything that decodes or
   normalises it is never classified as pass-through: `classify` looks at the decoded,
   normalised path, so `/metadata/%69dentity/...` or `//metadata/./identity/...` are
   refused instead of being forwarded to the node's real IMDS, which would answer with
   the node's identity.
"""

from __future__ import annotations

import enum
import json
import posixpath
import re
import urllib.parse
from typing import Final, NamedTuple

from azwi_netproxy.errors import BadRequest

TOKEN_PATH_TAIL: Final = ("/identity/oauth2/token", "/identity/oauth2/token/")
READY_PATHS: Final = frozenset({"/readyz", "/healthz"})
# Query parameters that select an identity (IMDS's names; principal_id is IMDS's alias of object_id).
SELECTORS: Final = ("client_id", "object_id", "principal_id", "msi_res_id", "mi_res_id")
_MAX_QUERY_FIELDS: Final = 32
_ABSOLUTE_FORM: Final = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# A "%" not followed by two hex digits: Go's url.ParseQuery (upstream) rejects those.
_BAD_ESCAPE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")

MSG_NO_METADATA: Final = "Required metadata header not specified"
MSG_FORWARDED: Final = "Request contains X-Forwarded-For header, which is not allowed"
MSG_NO_RESOURCE: Final = "Required audience parameter not specified"
MSG_NO_API_VERSION: Final = "Required query variable 'api-version' is missing"
MSG_IDENTITY_NOT_FOUND: Final = "Identity not found"
MSG_METHOD: Final = "Method not allowed: the token endpoint answers GET"


class Route(enum.Enum):
    INVALID = "invalid"  # "*" or authority-form targets: nothing here answers those
    TOKEN = "token"
    READY = "ready"
    NEAR_MISS = "near_miss"
    PASSTHROUGH = "passthrough"


class TokenRequest(NamedTuple):
    resource: str
    api_version: str
    # ("client_id", value), ("object_id", value), ("msi_res_id", value) or None (the default).
    selector: tuple[str, str] | None
    # The resource as a JSON string literal, escaped once, reused in every answer.
    resource_json: str


def split_target(target: str) -> tuple[str, str]:
    """Path and query of an origin-form or absolute-form request target.

    Absolute form (`GET HTTP://other-host/x`; schemes are case-insensitive, RFC 3986
    section 3.1) keeps only its path and query: the host named there is never used.
    """
    target = target.partition("#")[0]
    if _ABSOLUTE_FORM.match(target):
        try:
            parts = urllib.parse.urlsplit(target)
        except ValueError:  # e.g. "http://[::1/…": not a target anything here answers
            return "", ""
        return parts.path or "/", parts.query
    path, _, query = target.partition("?")
    return path, query


def _normalised(path: str) -> str:
    """The path as the most lenient server could read it: decoded, folded, dot-segments gone."""
    previous = None
    decoded = path
    # Decode until stable so double encoding (%2569) cannot hide a segment either.
    for _ in range(4):
        if decoded == previous:
            break
        previous, decoded = decoded, urllib.parse.unquote(decoded, errors="replace")
    decoded = decoded.replace("\\", "/")
    folded = posixpath.normpath("/" + decoded.lstrip("/"))
    return folded.lower()


def classify(path: str) -> Route:
    """Which handler a request path belongs to."""
    if not path.startswith("/"):
        return Route.INVALID
    # IMDS matches "/metadata" case-insensitively and the rest exactly (upstream does too).
    if path[:9].lower() == "/metadata" and path[9:] in TOKEN_PATH_TAIL:
        return Route.TOKEN
    if path in READY_PATHS:
        return Route.READY
    normalised = _normalised(path)
    if normalised == "/metadata/identity" or normalised.startswith("/metadata/identity/"):
        return Route.NEAR_MISS
    return Route.PASSTHROUGH


def parse_token_query(query: str) -> TokenRequest:
    """Parse and check the token endpoint's query string.

    Raises:
        BadRequest: undecodable, duplicated or missing parameters, several selectors.
    """
    if _BAD_ESCAPE.search(query):
        raise BadRequest("The query string has an invalid percent-encoding")
    try:
        pairs = urllib.parse.parse_qsl(
            query, keep_blank_values=True, errors="strict", max_num_fields=_MAX_QUERY_FIELDS
        )
    except UnicodeDecodeError:
        raise BadRequest("The query string is not valid UTF-8") from None
    except ValueError:
        raise BadRequest("Too many query parameters") from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in params:
            raise BadRequest(f"Query parameter '{name}' is specified more than once")
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
            raise BadRequest(f"Query parameter '{name}' contains control characters")
        params[name] = value
    api_version = params.get("api-version", "")
    if not api_version:
        raise BadRequest(MSG_NO_API_VERSION)
    resource = params.get("resource", "")
    if not resource.strip():
        raise BadRequest(MSG_NO_RESOURCE)
    given = [(name, params[name]) for name in SELECTORS if params.get(name)]
    if len(given) > 1:
        names = ", ".join(name for name, _ in given)
        raise BadRequest(f"Only one identity selector may be given, got {names}")
    selector: tuple[str, str] | None = None
    if given:
        name, value = given[0]
        selector = ("object_id" if name == "principal_id" else name, value.strip())
    return TokenRequest(resource, api_version, selector, json.dumps(resource))


def scope_for(resource: str) -> str:
    """The v2 scope for a v1 resource: append /.default unless it is there already.

    The resource is kept as sent, trailing slash included: ARM accepts tokens for
    "https://management.azure.com/" only with the audience the client asked for
    (see MSAL's note: https://github.com/AzureAD/microsoft-authentication-library-for-python/issues/84).
    """
    return resource if resource.endswith("/.default") else resource + "/.default"


def render_token(
    *,
    access_token: str,
    client_id: str,
    resource_json: str,
    expires_on: int,
    ext_expires_on: int,
    not_before: int,
    token_type: str,
    now: int,
) -> bytes:
    """The 200 body, eight string fields in IMDS's order; expires_in counted from `now`.

    The access token is a JWT (base64url and dots) and the client ID a GUID we checked, so
    only the resource needs JSON escaping, done once in parse_token_query.
    """
    expires_in = max(expires_on - now, 0)
    ext_expires_in = max(ext_expires_on - now, 0)
    return (
        f'{{"access_token":{json.dumps(access_token)},"client_id":{json.dumps(client_id)},'
        f'"expires_in":"{expires_in}","expires_on":"{expires_on}",'
        f'"ext_expires_in":"{ext_expires_in}","not_before":"{not_before}",'
        f'"resource":{resource_json},"token_type":{json.dumps(token_type)}}}'
    ).encode()


def render_error(code: str, description: str) -> bytes:
    """IMDS's error body."""
    return json.dumps({"error": code, "error_description": description}, separators=(",", ":")).encode()
