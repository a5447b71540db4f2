#!/usr/bin/env python3
"""A fake Entra ID token service: a real HTTPS server that checks requests as Entra does.

Owns: the v2.0 token endpoint of one or more tenants (client-credentials grant with a
federated client assertion), their apps and federated credentials, fault injection, a
record of every request it saw, and the identity-binding mode (`--sni-only NAME`: a
certificate valid only for NAME, handshakes with another SNI refused, SNI recorded).
Every accepted TCP connection gets a serial number `conn`, kept in its handshake record
and in the record of each request it carried, so a test can tell a pooled connection
reused from a new one.

Must not know: anything of azwi_netproxy. The server part uses the standard library only,
so it runs under any python3, as its own process and inside `ip netns exec`:

    python3 tests/support/fake_entra.py --bind 127.0.0.1:0 --cert-dir DIR [--sni-only NAME]

DIR holds `cert.pem` (leaf first, then chain) and `key.pem`; `issue_server_cert()` writes
them from a `trustme.CA`. One line `ready https://HOST:PORT` on stdout means it listens.

Tests drive it through `FakeEntraClient` (also stdlib), which talks to two control paths on
the same server: `POST /_control` (configure, fault, reset, reload_cert) and
`GET /_records`. Control requests are never recorded.

Access tokens are `fake.<base64url JSON>.sig`; the JSON names the tenant (`tid`), the app
(`appid`), the scope and audience, the assertion's subject and a global counter `n`, so a
test can tell whose token an app got and which exchange minted it (`decode_fake_token`).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import http.server
import json
import re
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

TOKEN_EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FORM_FIELDS = frozenset(
    {"grant_type", "client_id", "scope", "client_assertion_type", "client_assertion"}
)
CONTROL_PATH = "/_control"
RECORDS_PATH = "/_records"
TOKEN_TAIL = "/oauth2/v2.0/token"
DEFAULT_EXPIRES_IN = 3599

_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_SUBJECT = re.compile(r"^system:serviceaccount:[a-z0-9]([-a-z0-9.]*[a-z0-9])?:[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")

# The errors Entra answers for the AADSTS codes tests ask for by number: (status, error, text).
# Status and `error` follow what login.microsoftonline.com sends for each code.
AADSTS: dict[int, tuple[int, str, str]] = {
    50027: (400, "invalid_request", "JWT token is invalid or malformed."),
    70003: (400, "unsupported_grant_type", "The app requested an unsupported grant type."),
    70011: (400, "invalid_scope", "The provided request must include a 'scope' input parameter. "
            "The provided value for the input parameter 'scope' is not valid."),
    70021: (400, "invalid_client", "No matching federated identity record found for presented "
            "assertion."),
    90002: (400, "invalid_request", "Tenant not found. Check to make sure you have the correct "
            "tenant ID and are signing into the correct cloud."),
    90014: (400, "invalid_request", "The request body must contain the following parameter."),
    500011: (400, "invalid_resource", "The resource principal was not found in the tenant."),
    700016: (400, "unauthorized_client", "Application with identifier was not found in the "
             "directory."),
    700024: (400, "invalid_client", "Client assertion is not within its valid time range."),
    700212: (400, "invalid_client", "No matching federated identity record found for presented "
             "assertion audience."),
    900144: (400, "invalid_request", "The request body must contain the following parameter."),
    900561: (400, "invalid_request", "The endpoint only accepts POST, OPTIONS requests."),
    7000215: (401, "invalid_client", "Invalid client secret provided."),
}


def b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def decode_fake_token(token: str) -> dict[str, Any]:
    """The claims of an access token minted by this fake (raises ValueError otherwise)."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != "fake":
        raise ValueError(f"not a fake Entra token: {token[:40]!r}")
    claims = json.loads(b64url_decode(parts[1]))
    if not isinstance(claims, dict):
        raise ValueError("fake token payload is not an object")
    return claims


def decode_jwt_claims(jwt: str) -> dict[str, Any]:
    """The payload of a compact JWT, unverified (raises ValueError when malformed)."""
    parts = jwt.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        raise ValueError("a JWT has three base64url parts")
    try:
        header = json.loads(b64url_decode(parts[0]))
        claims = json.loads(b64url_decode(parts[1]))
        if parts[2]:
            b64url_decode(parts[2])
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"JWT part is not base64url JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise ValueError("JWT header and payload must be JSON objects")
    return claims


class EntraError(Exception):
    """An answer in Entra's error format."""

    def __init__(self, code: int, detail: str = "", *, status: int | None = None,
                 error: str | None = None) -> None:
        default_status, default_error, text = AADSTS.get(code, (400, "invalid_request", ""))
        super().__init__(f"AADSTS{code}: {detail or text}")
        self.code = code
        self.status = status or default_status
        self.error = error or default_error


def entra_error_body(code: int, description: str, error: str) -> dict[str, Any]:
    trace, corr = str(uuid.uuid4()), str(uuid.uuid4())
    stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
    return {
        "error": error,
        "error_description": f"{description} Trace ID: {trace} Correlation ID: {corr} "
                             f"Timestamp: {stamp}",
        "error_codes": [code],
        "timestamp": stamp,
        "trace_id": trace,
        "correlation_id": corr,
        "error_uri": f"https://login.microsoftonline.com/error?code={code}",
    }


class State:
    """Apps, faults and records, shared by the handler threads (guarded by one lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        # tenant -> client_id -> {"subjects": [...] | None, "issuer": str | None}
        self.tenants: dict[str, dict[str, dict[str, Any]]] = {}
        self.faults: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []
        self.handshakes: list[dict[str, Any]] = []
        self.path_prefix = ""
        self.expires_in = DEFAULT_EXPIRES_IN
        self.refresh_in: int | None = None
        self.counter = 0
        self.seq = 0

    def configure(self, body: dict[str, Any]) -> None:
        for app in body.get("apps", []):
            tenant = str(app["tenant"]).lower()
            client = str(app["client_id"]).lower()
            self.tenants.setdefault(tenant, {})[client] = {
                "subjects": app.get("subjects"),
                "issuer": app.get("issuer"),
            }
        for tenant in body.get("tenants", []):
            self.tenants.setdefault(str(tenant).lower(), {})
        if "path_prefix" in body:
            self.path_prefix = str(body["path_prefix"] or "").rstrip("/")
        if "expires_in" in body:
            self.expires_in = int(body["expires_in"])
        if "refresh_in" in body:
            self.refresh_in = None if body["refresh_in"] is None else int(body["refresh_in"])

    def take_fault(self, tenant: str, client_id: str, scope: str) -> dict[str, Any] | None:
        """The first fault matching this request; one-shot faults are used up."""
        for fault in self.faults:
            if fault.get("client_id") not in (None, client_id):
                continue
            if fault.get("tenant") not in (None, tenant):
                continue
            if fault.get("scope") not in (None, scope):
                continue
            remaining = fault.get("times")
            if remaining is not None:
                if remaining <= 0:
                    continue
                fault["times"] = remaining - 1
            fault["hits"] = fault.get("hits", 0) + 1
            return dict(fault)
        return None


class FakeEntraServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # Enough for 100 concurrent connections without SYN drops.
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], cert_dir: Path, sni_only: str | None) -> None:
        self.cert_dir = cert_dir
        self.sni_only = sni_only
        self.state = State()
        # Never reset: connection numbers stay unique for the server's whole life.
        self.connections = 0
        self.context = self._make_context()
        super().__init__(address, Handler)

    def _make_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_dir / "cert.pem", self.cert_dir / "key.pem")
        ctx.sni_callback = self._on_sni
        return ctx

    def reload_cert(self) -> None:
        """Serve the cert/key now in cert_dir to new connections (CA rotation tests)."""
        self.context = self._make_context()

    def _on_sni(self, sock: Any, server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
        sock.fake_sni = server_name
        accepted = self.sni_only is None or server_name == self.sni_only
        entry: dict[str, Any] = {"sni": server_name, "accepted": accepted,
                                 "conn": getattr(sock, "fake_conn", None)}
        sock.fake_handshake = entry
        with self.state.lock:
            self.state.handshakes.append(entry)
        if not accepted:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        return None

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The handshake runs here, in the connection's own thread, so a slow or bad
        # client never stalls accept().
        request.settimeout(30)
        with self.state.lock:
            self.connections += 1
            conn = self.connections
        tls = self.context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        tls.fake_conn = conn  # type: ignore[attr-defined]  # read back by _on_sni and Handler
        try:
            tls.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            with self.state.lock:
                entry = getattr(tls, "fake_handshake", None)
                if entry is None:  # failed before SNI was looked at
                    self.state.handshakes.append({"sni": None, "accepted": False,
                                                  "conn": conn, "error": str(exc)})
                else:
                    entry["accepted"] = False
                    entry["error"] = str(exc)
            tls.close()
            return
        try:
            Handler(tls, client_address, self)
        finally:
            with contextlib.suppress(OSError):
                tls.close()

    def shutdown_request(self, request: Any) -> None:
        with contextlib.suppress(OSError):
            request.close()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeEntraServer
    server_version = "FakeEntra/1.0"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"fake_entra: {self.address_string()} {format % args}\n")

    # ---- plumbing -------------------------------------------------------------------

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, body: bytes, content_type: str = "application/json; charset=utf-8",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store, no-cache")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(doc).encode(), headers=headers)

    def _reset_connection(self) -> None:
        # SO_LINGER 0 makes close() send RST instead of FIN.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    # ---- verbs ----------------------------------------------------------------------

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path == RECORDS_PATH:
            with self.server.state.lock:
                doc = {"requests": list(self.server.state.records),
                       "handshakes": list(self.server.state.handshakes)}
            self._send_json(200, doc)
            return
        self._token(b"")

    def do_POST(self) -> None:
        body = self._read_body()
        if urllib.parse.urlsplit(self.path).path == CONTROL_PATH:
            self._control(body)
            return
        self._token(body)

    def do_PUT(self) -> None:
        self._token(self._read_body())

    do_DELETE = do_PUT
    do_PATCH = do_PUT

    def do_HEAD(self) -> None:
        self._token(b"")

    # ---- control --------------------------------------------------------------------

    def _control(self, raw: bytes) -> None:
        try:
            body = json.loads(raw or b"{}")
            op = body.get("op")
            state = self.server.state
            with state.lock:
                if op == "reset":
                    state.reset()
                elif op == "configure":
                    state.configure(body)
                elif op == "fault":
                    fault = dict(body["fault"])
                    fault.setdefault("times", 1)
                    if fault.get("client_id"):
                        fault["client_id"] = str(fault["client_id"]).lower()
                    if fault.get("tenant"):
                        fault["tenant"] = str(fault["tenant"]).lower()
                    state.faults.append(fault)
                elif op == "clear_faults":
                    state.faults.clear()
                elif op != "reload_cert":
                    raise ValueError(f"unknown op {op!r}")
            if op == "reload_cert":
                self.server.reload_cert()
        except (ValueError, KeyError, TypeError, OSError, ssl.SSLError) as exc:
            self._send_json(400, {"error": f"bad control request: {exc}"})
            return
        self._send_json(200, {"ok": True})

    # ---- the token endpoint ---------------------------------------------------------

    def _token(self, body: bytes) -> None:
        state = self.server.state
        split = urllib.parse.urlsplit(self.path)
        with state.lock:
            state.seq += 1
            record: dict[str, Any] = {
                "seq": state.seq,
                "time": time.time(),
                "method": self.command,
                "path": split.path,
                "query": split.query,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "sni": getattr(self.connection, "fake_sni", None),
                "conn": getattr(self.connection, "fake_conn", None),
                "form": None,
                "tenant": None,
                "client_id": None,
                "status": None,
            }
            state.records.append(record)
            prefix = state.path_prefix
        try:
            self._exchange(record, body, split.path, prefix)
        except EntraError as exc:
            self._answer_error(record, exc)

    def _answer_error(self, record: dict[str, Any], exc: EntraError,
                      headers: dict[str, str] | None = None) -> None:
        record["status"] = exc.status
        record["error_code"] = exc.code
        self._send_json(exc.status, entra_error_body(exc.code, str(exc), exc.error), headers)

    def _exchange(self, record: dict[str, Any], body: bytes, path: str, prefix: str) -> None:
        state = self.server.state
        if not path.startswith(prefix + "/") or not path.endswith(TOKEN_TAIL):
            record["status"] = 404
            self._send_json(404, {"error": "not_found", "error_description": f"no route {path}"})
            return
        tenant = path[len(prefix) + 1 : -len(TOKEN_TAIL)]
        record["tenant"] = tenant
        if self.command != "POST":
            raise EntraError(900561)
        if not tenant or "/" in tenant:
            raise EntraError(90002, f"Tenant '{tenant}' not found.")
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise EntraError(900144, f"Content-Type {ctype!r} is not "
                             "application/x-www-form-urlencoded; the request body must contain "
                             "the following parameter: 'grant_type'.")
        try:
            pairs = urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True,
                                           strict_parsing=True)
        except (UnicodeDecodeError, ValueError):
            raise EntraError(90014, "The request body is not a valid form.") from None
        form: dict[str, str] = {}
        for name, value in pairs:
            if name in form:
                raise EntraError(90014, f"Parameter '{name}' is duplicated.")
            form[name] = value
        record["form"] = dict(form)
        record["client_id"] = form.get("client_id")
        for name in sorted(FORM_FIELDS - set(form)):
            raise EntraError(900144, f"The request body must contain the following "
                             f"parameter: '{name}'.")
        for name in sorted(set(form) - FORM_FIELDS):
            raise EntraError(90014, f"Unexpected parameter '{name}' for a client credentials "
                             "request with a federated assertion.")
        if form["grant_type"] != "client_credentials":
            raise EntraError(70003, f"The app requested an unsupported grant type "
                             f"'{form['grant_type']}'.")
        if form["client_assertion_type"] != ASSERTION_TYPE:
            raise EntraError(50027, f"client_assertion_type "
                             f"'{form['client_assertion_type']}' is not supported.",
                             status=401, error="invalid_client")
        client_id = form["client_id"]
        if not _GUID.match(client_id):
            raise EntraError(700016, f"Application with identifier '{client_id}' was not found "
                             f"in the directory '{tenant}'.")
        scope = form["scope"]
        if " " in scope.strip() or not scope.endswith("/.default") or scope == "/.default":
            raise EntraError(70011, f"The provided value for the input parameter 'scope' "
                             f"is not valid. The scope {scope} is not valid.")
        claims = self._check_assertion(form["client_assertion"])
        tenant_l, client_l = tenant.lower(), client_id.lower()
        with state.lock:
            apps = state.tenants.get(tenant_l)
            app = None if apps is None else apps.get(client_l)
        if apps is None:
            raise EntraError(90002, f"Tenant '{tenant}' not found. Check to make sure you have "
                             "the correct tenant ID and are signing into the correct cloud.")
        if app is None:
            raise EntraError(700016, f"Application with identifier '{client_id}' was not found "
                             f"in the directory '{tenant}'. This can happen if the application "
                             "has not been installed by the administrator of the tenant or "
                             "consented to by any user in the tenant.")
        subjects = app.get("subjects")
        issuer = app.get("issuer")
        if (subjects is not None and claims["sub"] not in subjects) or (
            issuer is not None and claims["iss"] != issuer
        ):
            raise EntraError(70021, f"No matching federated identity record found for presented "
                             f"assertion. Assertion Issuer: '{claims['iss']}'. Assertion "
                             f"Subject: '{claims['sub']}'. Assertion Audience: "
                             f"'{TOKEN_EXCHANGE_AUDIENCE}'.")
        with state.lock:
            fault = state.take_fault(tenant_l, client_l, scope)
        record["fault"] = fault
        expires_in, refresh_in = state.expires_in, state.refresh_in
        if fault is not None:
            if fault.get("delay_s"):
                time.sleep(float(fault["delay_s"]))
            if fault.get("reset"):
                record["status"] = "reset"
                self._reset_connection()
                return
            if fault.get("aadsts"):
                headers = {k: str(v) for k, v in (fault.get("headers") or {}).items()}
                self._answer_error(record, EntraError(int(fault["aadsts"]),
                                                      status=fault.get("status")), headers)
                return
            if fault.get("status"):
                status = int(fault["status"])
                headers = {k: str(v) for k, v in (fault.get("headers") or {}).items()}
                raw = fault.get("body")
                if raw is None:
                    doc = entra_error_body(0, f"fake fault: HTTP {status}",
                                           "temporarily_unavailable")
                    doc["error_codes"] = []
                    raw = json.dumps(doc)
                elif not isinstance(raw, str):
                    raw = json.dumps(raw)
                record["status"] = status
                self._send(status, raw.encode(), headers=headers,
                           content_type=fault.get("content_type", "application/json; charset=utf-8"))
                return
            if fault.get("non_json"):
                record["status"] = 200
                self._send(200, b"<html><body>Sign in to your account</body></html>",
                           content_type="text/html; charset=utf-8")
                return
            if "expires_in" in fault:
                expires_in = int(fault["expires_in"])
            if "refresh_in" in fault:
                refresh_in = fault["refresh_in"]
        with state.lock:
            state.counter += 1
            n = state.counter
        resource = scope[: -len("/.default")]
        now = int(time.time())
        token_claims = {
            "tid": tenant_l, "appid": client_l, "azp": client_l, "scp": scope, "aud": resource,
            "sub": claims["sub"], "iss": f"https://sts.windows.net/{tenant_l}/",
            "iat": now, "nbf": now, "exp": now + expires_in, "n": n,
        }
        access_token = ("fake." + b64url_encode(json.dumps(token_claims).encode())
                        + "." + b64url_encode(uuid.uuid4().bytes))
        answer: dict[str, Any] = {"token_type": "Bearer", "expires_in": expires_in,
                                  "ext_expires_in": expires_in, "access_token": access_token}
        if refresh_in is not None:
            answer["refresh_in"] = refresh_in
        for name in (fault or {}).get("omit", []):
            answer.pop(name, None)
        record["status"] = 200
        record["token_n"] = n
        self._send_json(200, answer)

    def _check_assertion(self, assertion: str) -> dict[str, Any]:
        try:
            claims = decode_jwt_claims(assertion)
        except ValueError as exc:
            raise EntraError(50027, f"JWT token is invalid or malformed: {exc}.",
                             status=401, error="invalid_client") from None
        for name in ("iss", "sub", "aud", "exp"):
            if name not in claims:
                raise EntraError(50027, f"JWT token is invalid or malformed: no '{name}' claim.",
                                 status=401, error="invalid_client")
        if not isinstance(claims["sub"], str) or not _SUBJECT.match(claims["sub"]):
            raise EntraError(70021, f"No matching federated identity record found for presented "
                             f"assertion. Assertion Subject: '{claims['sub']}'.")
        aud = claims["aud"]
        audiences = aud if isinstance(aud, list) else [aud]
        if TOKEN_EXCHANGE_AUDIENCE not in audiences:
            raise EntraError(700212, f"No matching federated identity record found for presented "
                             f"assertion audience '{aud}'.")
        if not isinstance(claims["exp"], (int, float)) or claims["exp"] <= time.time():
            raise EntraError(700024, "Client assertion is not within its valid time range.")
        return claims


# ---- the test side ------------------------------------------------------------------


def issue_server_cert(ca: Any, cert_dir: Path, *names: str) -> None:
    """Write cert.pem/key.pem for `names` signed by a trustme.CA (test side only)."""
    cert_dir.mkdir(parents=True, exist_ok=True)
    leaf = ca.issue_cert(*names)
    leaf.private_key_pem.write_to_path(str(cert_dir / "key.pem"))
    with (cert_dir / "cert.pem").open("wb") as out:
        for blob in leaf.cert_chain_pems:
            out.write(blob.bytes())
    (cert_dir / "cert.pem").chmod(0o644)
    (cert_dir / "key.pem").chmod(0o644)


class _SniConnection(http.client.HTTPSConnection):
    """HTTPSConnection that sends `sni_name` instead of the host it dials."""

    def __init__(self, host: str, port: int, *, context: ssl.SSLContext, sni_name: str,
                 timeout: float) -> None:
        super().__init__(host, port, context=context, timeout=timeout)
        self._ctx = context
        self._sni_name = sni_name

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._ctx.wrap_socket(sock, server_hostname=self._sni_name)


class FakeEntraClient:
    """Drives a FakeEntraServer through its control paths (stdlib only)."""

    def __init__(self, base_url: str, ca_file: str, *, sni_name: str | None = None,
                 timeout_s: float = 10.0) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme != "https" or parts.hostname is None:
            raise ValueError(f"not an https URL: {base_url}")
        self.base_url = base_url.rstrip("/")
        self._host = parts.hostname
        self._port = parts.port or 443
        self._ctx = ssl.create_default_context(cafile=ca_file)
        self._sni = sni_name or self._host
        self._timeout = timeout_s

    def _call(self, method: str, path: str, doc: Any = None) -> Any:
        conn = _SniConnection(self._host, self._port, context=self._ctx, sni_name=self._sni,
                              timeout=self._timeout)
        try:
            body = None if doc is None else json.dumps(doc).encode()
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"fake Entra {method} {path}: {resp.status} {data!r}")
            return json.loads(data)
        finally:
            conn.close()

    def _control(self, doc: dict[str, Any]) -> None:
        self._call("POST", CONTROL_PATH, doc)

    def configure(self, *, apps: list[dict[str, Any]] | None = None,
                  tenants: list[str] | None = None, **settings: Any) -> None:
        """Add apps ({tenant, client_id, subjects?, issuer?}) and set path_prefix,
        expires_in or refresh_in (None = no refresh_in field)."""
        doc: dict[str, Any] = {"op": "configure", "apps": apps or [], "tenants": tenants or []}
        unknown = set(settings) - {"path_prefix", "expires_in", "refresh_in"}
        if unknown:
            raise TypeError(f"unknown settings {sorted(unknown)}")
        doc.update(settings)
        self._control(doc)

    def add_app(self, tenant: str, client_id: str, subjects: list[str] | None = None,
                issuer: str | None = None) -> None:
        self.configure(apps=[{"tenant": tenant, "client_id": client_id,
                              "subjects": subjects, "issuer": issuer}])

    def fault(self, *, client_id: str | None = None, tenant: str | None = None,
              scope: str | None = None, times: int | None = 1, **action: Any) -> None:
        """Inject a fault for matching exchanges (client_id/tenant/scope None = any).

        times=None keeps it forever. Actions: delay_s, reset=True, status (+ body, headers,
        content_type), aadsts=CODE (+ status, headers), non_json=True, omit=[fields],
        expires_in, refresh_in.
        """
        known = {"delay_s", "reset", "status", "body", "headers", "content_type", "aadsts",
                 "non_json", "omit", "expires_in", "refresh_in"}
        if set(action) - known:
            raise TypeError(f"unknown fault actions {sorted(set(action) - known)}")
        fault = {"client_id": client_id, "tenant": tenant, "scope": scope, "times": times,
                 **action}
        self._control({"op": "fault", "fault": fault})

    def clear_faults(self) -> None:
        self._control({"op": "clear_faults"})

    def reset(self) -> None:
        """Forget apps, faults, records and settings."""
        self._control({"op": "reset"})

    def reload_cert(self) -> None:
        """Serve the cert.pem/key.pem now in the cert dir to new connections."""
        self._control({"op": "reload_cert"})

    def records(self) -> list[dict[str, Any]]:
        """Every non-control request so far, oldest first."""
        return list(self._call("GET", RECORDS_PATH)["requests"])

    def exchanges(self) -> list[dict[str, Any]]:
        """The records of requests that reached the token path."""
        return [r for r in self.records() if r["path"].endswith(TOKEN_TAIL)]

    def handshakes(self) -> list[dict[str, Any]]:
        """Every TLS handshake's SNI, connection number `conn` and whether it was accepted
        (control calls included; a failed one also has `error`)."""
        return list(self._call("GET", RECORDS_PATH)["handshakes"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bind", required=True, help="HOST:PORT (port 0 picks a free one)")
    parser.add_argument("--cert-dir", required=True, type=Path,
                        help="directory with cert.pem and key.pem")
    parser.add_argument("--sni-only", default=None,
                        help="refuse TLS handshakes whose SNI is not this name")
    args = parser.parse_args(argv)
    host, _, port = args.bind.rpartition(":")
    server = FakeEntraServer((host.strip("[]"), int(port)), args.cert_dir, args.sni_only)
    bound_host, bound_port = str(server.server_address[0]), int(server.server_address[1])
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    sys.stdout.write(f"ready https://{shown}:{bound_port}\n")
    sys.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
