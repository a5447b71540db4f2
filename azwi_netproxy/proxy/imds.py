"""The IMDS wire model: which path is which, the token query, and the JSON IMDS answers with.

Rules:
1. Pure: strings and bytes in, values or BadRequest out. No sockets, no clock calls (the
   caller passes `now`).
2. Only this module knows IMDS's field names and messages.
3. A target that *could* be read as the identity endpoint by anything that decodes or
   normalises it is never classified as pass-through (`read_target`): not `//host/...`,
   not absolute form, not `/metadata/%69dentity/...` nor `/metadata/identity;x/...`. The
   node's real IMDS would answer those with the node's identity.
"""

from __future__ import annotations

import enum
import json
import re
import urllib.parse
from typing import Final, NamedTuple

from azwi_netproxy.errors import BadRequest

TOKEN_PATH_TAIL: Final = ("/identity/oauth2/token", "/identity/oauth2/token/")
READY_PATHS: Final = frozenset({"/readyz", "/healthz"})
# Query parameters that select an identity (IMDS's names; principal_id is IMDS's alias of object_id).
SELECTORS: Final = ("client_id", "object_id", "principal_id", "msi_res_id", "mi_res_id")
_MAX_QUERY_FIELDS: Final = 32
_MAX_DECODING_ROUNDS: Final = 8
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
    # Could be read as the identity endpoint, or not origin-form: 404, never forwarded.
    REFUSED = "refused"
    PASSTHROUGH = "passthrough"


class TokenRequest(NamedTuple):
    resource: str
    api_version: str
    # ("client_id", value), ("object_id", value), ("msi_res_id", value) or None (the default).
    selector: tuple[str, str] | None
    # The resource as a JSON string literal, escaped once, reused in every answer.
    resource_json: str


class Target(NamedTuple):
    route: Route
    # What is answered or forwarded: the target's own path and query, never re-encoded.
    path: str
    query: str


def read_target(target: str) -> Target:
    """Which handler a request target belongs to, with its path and query.

    CONTRACT.md: only an origin-form target (one leading "/") is passed through, and only
    if no segment of its path could be read as the identity endpoint. Absolute form
    (`GET http://host/...`; schemes are case-insensitive, RFC 3986 section 3.1) is answered
    on the token path only, as Go's server (upstream) routes it by its path; the host named
    there is never used.
    """
    target = target.partition("#")[0]
    if _ABSOLUTE_FORM.match(target):
        try:
            parts = urllib.parse.urlsplit(target)
        except ValueError:  # e.g. "http://[::1/…": not a target anything here answers
            return Target(Route.INVALID, "", "")
        path = parts.path or "/"
        route = Route.TOKEN if _is_token_path(path) else Route.REFUSED
        return Target(route, path, parts.query)
    path, _, query = target.partition("?")
    if not path.startswith("/"):
        # "*", authority-form (CONNECT) or garbage: nothing here answers those.
        return Target(Route.INVALID, path, query)
    if _is_token_path(path):
        return Target(Route.TOKEN, path, query)
    if path in READY_PATHS:
        return Target(Route.READY, path, query)
    # "//host/x" is a network-path reference: URL parsers read "/x" as its path (WHATWG
    # parsers read "/\\host/x" so too).
    if path.replace("\\", "/").startswith("//") or names_identity(path):
        return Target(Route.REFUSED, path, query)
    return Target(Route.PASSTHROUGH, path, query)


def _is_token_path(path: str) -> bool:
    # IMDS matches "/metadata" case-insensitively and the rest exactly (upstream does too).
    return path[:9].lower() == "/metadata" and path[9:] in TOKEN_PATH_TAIL


def names_identity(path: str) -> bool:
    """Whether any segment of `path`, read as leniently as any server or URL parser might,
    begins with "identity": such a path is never passed through to the node's IMDS, which
    would answer it with the node's own identity.

    Each segment is percent-decoded until stable (double encoding cannot hide one),
    backslashes are read as slashes (WHATWG URL parsers do), and it is cut at ";" (path
    parameters), NFKC-folded (full-width letters), stripped of dots, blank space and
    control bytes, and compared case-insensitively. No IMDS route outside the token path
    has such a segment, so the test errs on refusing. Dot segments need no resolving: every
    segment is looked at, wherever it would end up.
    """
    decoded = path
    for _ in range(_MAX_DECODING_ROUNDS):
        once = urllib.parse.unquote(decoded, errors="replace")
        if once == decoded:
            break
        decoded = once
    else:
        return True  # still decoding: nothing legitimate is encoded that deep
    for segment in decoded.replace("\\", "/").split("/"):
        folded = segment.partition(";")[0]
        if not folded.isascii():
            import unicodedata  # its tables cost every pod memory; ASCII paths never need them

            folded = unicodedata.normalize("NFKC", folded)
        cleaned = "".join(ch for ch in folded if ch.isprintable() and not ch.isspace())
        if cleaned.strip(".").casefold().startswith("identity"):
            return True
    return False


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
