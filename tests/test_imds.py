"""The IMDS wire model: path classification, the token query, scope suffix, rendered JSON.

Name: test_imds
Scope: pure unit tests, no I/O.
Depends: azwi_netproxy.proxy.imds only.

Tables in the style of upstream's Go tests: one row per input, an id naming the case.
"""

from __future__ import annotations

import json
import urllib.parse

import pytest

from azwi_netproxy.errors import BadRequest
from azwi_netproxy.proxy import imds
from azwi_netproxy.proxy.imds import Route

TOKEN = Route.TOKEN
READY = Route.READY
REFUSED = Route.REFUSED
PASS = Route.PASSTHROUGH
INVALID = Route.INVALID

# CONTRACT.md: only an origin-form target none of whose segments, decoded and cleaned,
# begins with "identity" is passed through. Literal rows, not a second reading of the rule.
TARGET_CASES = [
    ("/metadata/identity/oauth2/token", TOKEN, "token"),
    ("/metadata/identity/oauth2/token/", TOKEN, "token-trailing-slash"),
    ("/METADATA/identity/oauth2/token", TOKEN, "metadata-upper"),
    ("/MetaData/identity/oauth2/token", TOKEN, "metadata-mixed-case"),
    ("/metadata/identity/oauth2/token?api-version=1&resource=x", TOKEN, "token-with-query"),
    ("/metadata/IDENTITY/oauth2/token", REFUSED, "identity-upper"),
    ("/metadata/identity/OAUTH2/token", REFUSED, "oauth2-upper"),
    ("/metadata/identity/oauth2/TOKEN", REFUSED, "token-upper"),
    ("/metadata/identity/oauth2/token//", REFUSED, "two-trailing-slashes"),
    ("//metadata/identity/oauth2/token", REFUSED, "leading-double-slash"),
    ("//host/metadata/instance", REFUSED, "network-path-reference"),
    ("//metadata/instance", REFUSED, "network-path-reference-no-identity"),
    ("/\\host/metadata/instance", REFUSED, "backslash-network-path-reference"),
    ("/metadata//identity/oauth2/token", REFUSED, "inner-double-slash"),
    ("/metadata/identity/oauth2//token", REFUSED, "double-slash-before-token"),
    ("/metadata/%69dentity/oauth2/token", REFUSED, "percent-encoded-letter"),
    ("/metadata/%49DENTITY/oauth2/token", REFUSED, "percent-encoded-upper"),
    ("/metadata%2Fidentity/oauth2/token", REFUSED, "encoded-slash"),
    ("/metadata%2fidentity%2foauth2%2ftoken", REFUSED, "encoded-slashes-lower"),
    ("/%6Detadata/identity/oauth2/token", REFUSED, "encoded-metadata"),
    ("/metadata/%2569dentity/oauth2/token", REFUSED, "double-encoded"),
    ("/metadata/%252569dentity/oauth2/token", REFUSED, "triple-encoded"),
    ("/metadata/%" + "25" * 9 + "69dentity", REFUSED, "encoded-past-the-rounds"),
    ("/metadata/./identity/oauth2/token", REFUSED, "dot-segment"),
    ("/metadata/instance/../identity/oauth2/token", REFUSED, "dot-dot-segment"),
    ("/metadata/instance/%2e%2e/identity/oauth2/token", REFUSED, "encoded-dot-dot"),
    ("/metadata/identity/oauth2/token/.", REFUSED, "trailing-dot-segment"),
    ("/metadata\\identity\\oauth2\\token", REFUSED, "backslashes"),
    ("/metadata%5Cidentity/oauth2/token", REFUSED, "encoded-backslash"),
    ("/metadata/identity", REFUSED, "identity-root"),
    ("/metadata/identity/", REFUSED, "identity-root-slash"),
    ("/metadata/identity/oauth2/token;x=1", REFUSED, "path-parameter-on-token"),
    ("/metadata/identity;x/oauth2/token", REFUSED, "path-parameter-on-identity"),
    ("/metadata./identity/oauth2/token", REFUSED, "trailing-dot-on-metadata"),
    ("/metadata/identity./oauth2/token", REFUSED, "trailing-dot-on-identity"),
    ("/metadata/identity%00/oauth2/token", REFUSED, "nul"),
    ("/metadata/identity%20/oauth2/token", REFUSED, "trailing-space"),
    ("/metadata/%20identity/oauth2/token", REFUSED, "leading-space"),
    ("/metadata/identity%09/oauth2/token", REFUSED, "tab"),
    ("/metadata/iden%00tity/oauth2/token", REFUSED, "nul-inside"),
    ("/metadata/%EF%BD%89dentity/oauth2/token", REFUSED, "full-width-i"),
    ("/metadata/identity%ff/oauth2/token", REFUSED, "invalid-utf8-after"),
    ("/metadta/identity/oauth2/token", REFUSED, "misspelt-metadata"),
    ("/metadata/identityoauth2/token", REFUSED, "identity-prefix-of-a-segment"),
    ("/metadata/identityfoo", REFUSED, "identity-prefix-only"),
    ("/identity/oauth2/token", REFUSED, "no-metadata-prefix"),
    ("/anything/else/identity", REFUSED, "identity-anywhere"),
    ("http://169.254.169.254/metadata/instance", REFUSED, "absolute-form"),
    ("HTTP://other-host/metadata/instance", REFUSED, "absolute-form-upper-scheme"),
    ("http://other-host", REFUSED, "absolute-form-no-path"),
    ("http://other-host/METADATA/identity/oauth2/token/", TOKEN, "absolute-form-token"),
    ("\\metadata/identity/oauth2/token", INVALID, "leading-backslash"),
    ("*", INVALID, "asterisk"),
    ("169.254.169.254:80", INVALID, "authority-form"),
    ("http://[::1/x", INVALID, "absolute-form-bad-host"),
    ("/metadata/instance", PASS, "instance"),
    ("/metadata/instance/compute?api-version=2021-02-01", PASS, "instance-compute"),
    ("/metadata/versions", PASS, "versions"),
    ("/metadata/scheduledevents", PASS, "scheduled-events"),
    ("/metadata/attested/document?api-version=2020-09-01", PASS, "attested"),
    ("/metadata/instance?x=/identity/oauth2/token", PASS, "identity-in-the-query-only"),
    ("/metadata/ident", PASS, "ident-is-not-identity"),
    ("/", PASS, "root"),
    ("/readyz", READY, "readyz"),
    ("/healthz", READY, "healthz"),
    ("/readyz/", PASS, "readyz-trailing-slash-is-not-ready"),
]


@pytest.mark.parametrize(
    ("target", "route"),
    [(target, route) for target, route, _ in TARGET_CASES],
    ids=[name for _, _, name in TARGET_CASES],
)
def test_read_target_routes(target: str, route: Route) -> None:
    assert imds.read_target(target).route is route


SPLIT_CASES = [
    ("/metadata/identity/oauth2/token?a=1&b=2", ("/metadata/identity/oauth2/token", "a=1&b=2"), "origin-form"),
    ("/metadata/instance", ("/metadata/instance", ""), "no-query"),
    ("/p?", ("/p", ""), "empty-query"),
    ("/p?a=1#frag", ("/p", "a=1"), "fragment-after-query"),
    ("/p#frag?a=1", ("/p", ""), "fragment-before-query"),
    ("/p?a=1?b=2", ("/p", "a=1?b=2"), "second-question-mark-stays-in-query"),
    ("/p%20q?a=%20", ("/p%20q", "a=%20"), "kept-encoded"),
    (
        "http://169.254.169.254/metadata/identity/oauth2/token?resource=x",
        ("/metadata/identity/oauth2/token", "resource=x"),
        "absolute-form-token",
    ),
    (
        "Http://other-host:8443/metadata/identity/oauth2/token?resource=x",
        ("/metadata/identity/oauth2/token", "resource=x"),
        "absolute-form-mixed-case-scheme-and-port",
    ),
]


@pytest.mark.parametrize(
    ("target", "expected"),
    [(target, expected) for target, expected, _ in SPLIT_CASES],
    ids=[name for _, _, name in SPLIT_CASES],
)
def test_read_target_keeps_path_and_query_as_sent(target: str, expected: tuple[str, str]) -> None:
    _, path, query = imds.read_target(target)
    assert (path, query) == expected


# ---- the token query ------------------------------------------------------------------

ARM = "https%3A%2F%2Fmanagement.azure.com%2F"
GUID = "11111111-2222-3333-4444-555555555555"

GOOD_QUERIES = [
    (f"api-version=2018-02-01&resource={ARM}", "https://management.azure.com/", None, "default-identity"),
    ("resource=https://vault.azure.net&api-version=2019-08-01", "https://vault.azure.net", None, "order-free"),
    (f"api-version=1&resource=x&client_id={GUID}", "x", ("client_id", GUID), "client-id"),
    (f"api-version=1&resource=x&client_id=%20{GUID}%20", "x", ("client_id", GUID), "client-id-stripped"),
    ("api-version=1&resource=x&object_id=abc", "x", ("object_id", "abc"), "object-id"),
    ("api-version=1&resource=x&principal_id=abc", "x", ("object_id", "abc"), "principal-id-is-object-id"),
    ("api-version=1&resource=x&msi_res_id=/subscriptions/s", "x", ("msi_res_id", "/subscriptions/s"), "msi-res-id"),
    ("api-version=1&resource=x&mi_res_id=/subscriptions/s", "x", ("mi_res_id", "/subscriptions/s"), "mi-res-id"),
    ("api-version=1&resource=x&client_id=", "x", None, "empty-selector-means-default"),
    ("api-version=1&resource=x&bearer=1&foo=", "x", None, "unknown-parameters-ignored"),
    ("api-version=1&resource=a+b", "a b", None, "plus-is-space"),
    ("api-version=1&resource=%E2%82%AC", "\u20ac", None, "utf8-resource"),
]


@pytest.mark.parametrize(
    ("query", "resource", "selector"),
    [(q, r, s) for q, r, s, _ in GOOD_QUERIES],
    ids=[name for *_, name in GOOD_QUERIES],
)
def test_parse_token_query_accepts(query: str, resource: str, selector: tuple[str, str] | None) -> None:
    parsed = imds.parse_token_query(query)
    assert parsed.resource == resource
    assert parsed.selector == selector
    assert json.loads(parsed.resource_json) == resource


def test_parse_token_query_keeps_api_version() -> None:
    assert imds.parse_token_query("api-version=2018-02-01&resource=x").api_version == "2018-02-01"


BAD_QUERIES = [
    ("api-version=1", imds.MSG_NO_RESOURCE, "missing-resource"),
    ("api-version=1&resource=", imds.MSG_NO_RESOURCE, "empty-resource"),
    ("api-version=1&resource=%20%20", imds.MSG_NO_RESOURCE, "blank-resource"),
    ("resource=x", imds.MSG_NO_API_VERSION, "missing-api-version"),
    ("resource=x&api-version=", imds.MSG_NO_API_VERSION, "empty-api-version"),
    ("", imds.MSG_NO_API_VERSION, "empty-query"),
    ("api-version=1&resource=x&resource=y", "'resource' is specified more than once", "duplicate-resource"),
    ("api-version=1&resource=x&resource=x", "'resource' is specified more than once", "duplicate-same-value"),
    ("api-version=1&api-version=2&resource=x", "'api-version' is specified more than once", "duplicate-api"),
    (f"api-version=1&resource=x&client_id={GUID}&client_id={GUID}", "'client_id'", "duplicate-client-id"),
    ("api-version=1&resource=%ff", "not valid UTF-8", "invalid-utf8"),
    ("api-version=1&resource=%c3%28", "not valid UTF-8", "invalid-utf8-sequence"),
    # Go's url.ParseQuery (upstream's proxy) rejects these; they must not become a scope verbatim.
    ("api-version=1&resource=https://x%zz", "", "bad-percent-escape"),
    ("api-version=1&resource=https://x%", "", "truncated-percent-escape"),
    ("api-version=1&resource=x%0D%0AInjected:%201", "'resource' contains control characters", "crlf"),
    ("api-version=1&resource=x%0A", "'resource' contains control characters", "lf"),
    ("api-version=1&resource=x%00", "'resource' contains control characters", "nul"),
    ("api-version=1&resource=x%7F", "'resource' contains control characters", "del"),
    ("api-version=1&resource=x&client_id=a%0db", "'client_id' contains control characters", "cr-in-selector"),
    (f"api-version=1&resource=x&client_id={GUID}&object_id=o", "client_id, object_id", "client-and-object"),
    ("api-version=1&resource=x&object_id=o&principal_id=p", "object_id, principal_id", "object-and-principal"),
    ("api-version=1&resource=x&msi_res_id=a&mi_res_id=b", "msi_res_id, mi_res_id", "both-resource-ids"),
    (
        "api-version=1&resource=x&" + "&".join(f"p{i}=1" for i in range(40)),
        "Too many query parameters",
        "too-many-fields",
    ),
]


@pytest.mark.parametrize(
    ("query", "message"),
    [(q, m) for q, m, _ in BAD_QUERIES],
    ids=[name for *_, name in BAD_QUERIES],
)
def test_parse_token_query_rejects(query: str, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        imds.parse_token_query(query)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert info.value.status == 400
    assert info.value.code == "invalid_request"


# ---- scope ----------------------------------------------------------------------------

SCOPE_CASES = [
    ("https://management.azure.com/", "https://management.azure.com//.default", "arm-trailing-slash-kept"),
    ("https://management.azure.com", "https://management.azure.com/.default", "arm-no-slash"),
    ("https://vault.azure.net", "https://vault.azure.net/.default", "vault"),
    ("https://vault.azure.net/.default", "https://vault.azure.net/.default", "already-default"),
    ("api://my-app/.default", "api://my-app/.default", "app-uri-already-default"),
    ("api://11111111-2222-3333-4444-555555555555", "api://11111111-2222-3333-4444-555555555555/.default", "app-uri"),
    ("https://x/.defaultx", "https://x/.defaultx/.default", "look-alike-suffix"),
]


@pytest.mark.parametrize(
    ("resource", "scope"),
    [(r, s) for r, s, _ in SCOPE_CASES],
    ids=[name for *_, name in SCOPE_CASES],
)
def test_scope_for(resource: str, scope: str) -> None:
    assert imds.scope_for(resource) == scope


# ---- rendering ------------------------------------------------------------------------

FIELDS = [
    "access_token",
    "client_id",
    "expires_in",
    "expires_on",
    "ext_expires_in",
    "not_before",
    "resource",
    "token_type",
]
NOW = 1_700_000_000


def _render(resource: str, *, expires_on: int = NOW + 3599, ext: int = NOW + 7199) -> bytes:
    return imds.render_token(
        access_token="eyJ0eXAi.eyJhdWQi.c2ln",
        client_id=GUID,
        resource_json=imds.parse_token_query(
            "api-version=1&resource=" + urllib.parse.quote(resource, safe="")
        ).resource_json,
        expires_on=expires_on,
        ext_expires_on=ext,
        not_before=NOW - 1,
        token_type="Bearer",
        now=NOW,
    )


def test_render_token_has_the_eight_string_fields_in_imds_order() -> None:
    pairs = json.loads(_render("https://management.azure.com/"), object_pairs_hook=list)
    assert [name for name, _ in pairs] == FIELDS
    assert all(isinstance(value, str) for _, value in pairs)
    body = dict(pairs)
    assert body == {
        "access_token": "eyJ0eXAi.eyJhdWQi.c2ln",
        "client_id": GUID,
        "expires_in": "3599",
        "expires_on": str(NOW + 3599),
        "ext_expires_in": "7199",
        "not_before": str(NOW - 1),
        "resource": "https://management.azure.com/",
        "token_type": "Bearer",
    }


def test_render_token_expires_in_counts_from_now_and_never_goes_negative() -> None:
    body = json.loads(_render("r", expires_on=NOW + 10, ext=NOW + 20))
    assert (body["expires_in"], body["ext_expires_in"]) == ("10", "20")
    body = json.loads(_render("r", expires_on=NOW - 5, ext=NOW - 5))
    assert (body["expires_in"], body["ext_expires_in"]) == ("0", "0")
    assert body["expires_on"] == str(NOW - 5)


@pytest.mark.parametrize(
    "resource",
    [
        'https://x/"quoted"',
        "https://x/back\\slash",
        "https://x/\u00e9t\u00e9/\u6771\u4eac",
        "https://x/</script>\u2028",
        "https://x/\U0001f511",
    ],
    ids=["quotes", "backslash", "unicode", "html-and-line-separator", "astral"],
)
def test_render_token_escapes_the_resource(resource: str) -> None:
    raw = _render(resource)
    raw.decode("ascii")  # ensure_ascii: every non-ASCII character is escaped
    assert json.loads(raw)["resource"] == resource


ERROR_CASES = [
    ("invalid_request", "Identity not found", b'{"error":"invalid_request","error_description":"Identity not found"}'),
    ("x", 'say "hi"\\', b'{"error":"x","error_description":"say \\"hi\\"\\\\"}'),
    ("x", "line\nbreak", b'{"error":"x","error_description":"line\\nbreak"}'),
]


@pytest.mark.parametrize(
    ("code", "description", "body"),
    [(c, d, b) for c, d, b in ERROR_CASES],
    ids=["plain", "quotes-backslash", "newline"],
)
def test_render_error(code: str, description: str, body: bytes) -> None:
    assert imds.render_error(code, description) == body
    assert json.loads(body) == {"error": code, "error_description": description}
