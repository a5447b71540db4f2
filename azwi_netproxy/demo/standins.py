"""Stand-ins for the demo only: a token service that is NOT Entra, and a metadata service.

    python -m azwi_netproxy.demo.standins sts  HOST PORT CERT KEY
    python -m azwi_netproxy.demo.standins imds HOST PORT

The stand-in token service issues fake tokens ("standin.…"): they open nothing anywhere.
Nothing in the proxy knows of it; the demo points AZURE_AUTHORITY_HOST at it inside its
throwaway sandbox, exactly as a test points it at a fake. It still checks the exchange's
form the way Entra does, so the demo shows a real exchange.
Stdlib only: it runs in namespaces as root with any python3.
"""

from __future__ import annotations

import base64
import json
import ssl
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class StandInTokenService(_Quiet):
    count = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        parts = self.path.split("/")
        length = int(self.headers.get("Content-Length") or 0)
        form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
        problems = []
        if len(parts) != 5 or parts[2:] != ["oauth2", "v2.0", "token"]:
            problems.append(f"path {self.path}")
        if form.get("grant_type") != "client_credentials":
            problems.append("grant_type")
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            problems.append("client_assertion_type")
        if form.get("client_assertion", "").count(".") != 2:
            problems.append("client_assertion is not a JWT")
        if not form.get("scope", "").endswith("/.default"):
            problems.append("scope")
        if problems:
            print(f"stand-in token service: refused ({', '.join(problems)})", flush=True)
            self._answer(
                400, {"error": "invalid_request", "error_description": "AADSTS900144: " + ", ".join(problems)}
            )
            return
        with self.lock:
            StandInTokenService.count += 1
            number = StandInTokenService.count
        client, scope = form["client_id"], form["scope"]
        print(f"stand-in token service: exchange #{number} for client {client}, scope {scope}", flush=True)
        token = (
            "standin."
            + _b64({"appid": client, "tid": parts[1], "scp": scope, "n": number})
            + ".not-a-real-token"
        )
        self._answer(
            200, {"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": token}
        )


class StandInMetadataService(_Quiet):
    def do_GET(self) -> None:
        print(f"stand-in IMDS: {self.command} {self.path}", flush=True)
        if self.path.startswith("/metadata/identity"):
            # The node's own identity: the demo shows this is never reached by the pod's apps.
            self._answer(200, {"access_token": "node-identity-token", "expires_in": "3599"})
        elif self.headers.get("Metadata") != "true":
            self._answer(400, {"error": "Bad request. Required metadata header not specified"})
        else:
            self._answer(200, {"compute": {"location": "demoland", "vmSize": "Standard_Demo"}})


def main(argv: list[str]) -> int:
    kind, host, port = argv[0], argv[1], int(argv[2])
    handler = StandInTokenService if kind == "sts" else StandInMetadataService
    server = ThreadingHTTPServer((host, port), handler)
    if kind == "sts":
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(argv[3], argv[4])
        server.socket = context.wrap_socket(server.socket, server_side=True)
    print("ready", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
