#!/usr/bin/env python3
"""A fake of the node's Azure IMDS (plain HTTP), to see what the proxy passes through.

Owns: realistic answers for `/metadata/instance` (200 JSON, `Metadata: true` and
`api-version` required as IMDS requires them) and for `/metadata/identity/oauth2/token`
(the NODE's identity: a token marked `imds-node-token` that no test should ever see come
back from the proxy), and a record of every request (method, path, query, headers, body)
with, for judges of pass-through that must see exactly what arrived, the raw head as it
came off the socket (`raw_head`: request line and header lines, latin-1; `raw_target`: the
target exactly as sent, where `target` is http.server's reading of it), the header
fields as sent (`raw_headers`: [name, value] in order, name case kept, value without its
surrounding whitespace only), the body's bytes (`body_hex`) and the body it answered
with (`answer_hex`).

Must not know: anything of azwi_netproxy. Standard library only, so it runs under any
python3, as its own process and inside `ip netns exec` (e.g. on 169.254.169.254:80):

    python3 tests/support/fake_imds.py --bind 127.0.0.1:0

prints `ready http://HOST:PORT` once it listens. The control paths live under
`/__fake_imds/` (`GET .../records`, `POST .../reset`) so they cannot be confused with an
IMDS path the proxy might pass through; they are not recorded.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import http.server
import json
import sys
import threading
import time
import urllib.parse
from typing import Any

CONTROL_PREFIX = "/__fake_imds/"
NODE_TOKEN_MARK = "imds-node-token"
NODE_CLIENT_ID = "99999999-9999-9999-9999-999999999999"

INSTANCE: dict[str, Any] = {
    "compute": {
        "azEnvironment": "AzurePublicCloud",
        "location": "westeurope",
        "name": "aks-nodepool1-12345678-vmss_0",
        "osType": "Linux",
        "resourceGroupName": "MC_rg_cluster_westeurope",
        "subscriptionId": "00000000-0000-0000-0000-000000000000",
        "vmId": "5c08b38e-4d57-4c23-ac45-aca61037f084",
        "vmSize": "Standard_D2s_v3",
        "zone": "1",
    },
    "network": {
        "interface": [{
            "ipv4": {"ipAddress": [{"privateIpAddress": "10.224.0.4", "publicIpAddress": ""}],
                     "subnet": [{"address": "10.224.0.0", "prefix": "16"}]},
            "ipv6": {"ipAddress": []},
            "macAddress": "000D3A2B3C4D",
        }],
    },
}


class _HeadTee:
    """The handler's rfile, keeping the lines read through readline(): the request line
    and the header block (the body is read with read() and not kept here)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.lines: list[bytes] = []

    def readline(self, *args: Any) -> bytes:
        line: bytes = self._stream.readline(*args)
        self.lines.append(line)
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _raw_fields(head: bytes) -> list[list[str]]:
    """Header fields of a raw head, as sent: no folding undone, no case changed."""
    fields: list[list[str]] = []
    for raw_line in head.split(b"\n")[1:]:
        line = raw_line.removesuffix(b"\r")
        if not line:
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1] += " " + line.strip(b" \t").decode("latin-1")
            continue
        name, _, value = line.partition(b":")
        fields.append([name.decode("latin-1"), value.strip(b" \t").decode("latin-1")])
    return fields


class FakeImdsServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int]) -> None:
        self.lock = threading.Lock()
        self.records: list[dict[str, Any]] = []
        self.counter = 0
        super().__init__(address, Handler)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeImdsServer
    server_version = "FakeIMDS/1.0"
    sys_version = ""

    rfile: Any
    raw_requestline: bytes

    def setup(self) -> None:
        super().setup()
        self.rfile = _HeadTee(self.rfile)

    def handle_one_request(self) -> None:
        # Each request's raw head starts at its own request line (keep-alive reuses rfile).
        self.rfile.lines.clear()
        super().handle_one_request()

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"fake_imds: {self.address_string()} {format % args}\n")

    def _send_json(self, status: int, doc: Any, record: dict[str, Any] | None = None) -> None:
        body = json.dumps(doc).encode()
        # Real IMDS compresses when asked; a proxy must relay those bytes as they are, and
        # must not ask for compression a client did not ask for.
        gzipped = "gzip" in (self.headers.get("Accept-Encoding") or "").lower()
        if gzipped:
            body = gzip.compress(body, mtime=0)
        if record is not None:
            # Before the first byte leaves: whoever reads the answer may ask for the record next.
            record["status"] = status
            record["answer_hex"] = "" if self.command == "HEAD" else body.hex()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        raw_head = b"".join(self.rfile.lines)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            body = self._read_chunked()
        split = urllib.parse.urlsplit(self.path)
        if split.path.startswith(CONTROL_PREFIX):
            self._control(split.path[len(CONTROL_PREFIX):])
            return
        record = {
            "time": time.time(),
            # Who connected: a pass-through comes from its proxy's address, never a pod's.
            "peer": self.client_address[0],
            "method": self.command,
            "target": self.path,
            "path": split.path,
            "query": split.query,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body": body.decode("utf-8", "replace"),
            # http.server folds a leading "//" of self.path into "/": the target as sent is
            # the request line's second word.
            "raw_target": self.raw_requestline.split(b" ")[1].decode("latin-1"),
            "raw_head": raw_head.decode("latin-1"),
            "raw_headers": _raw_fields(raw_head),
            "body_hex": body.hex(),
            "status": None,
            "answer_hex": None,
        }
        with self.server.lock:
            self.server.records.append(record)
        status, doc = self._answer(split.path, urllib.parse.parse_qs(split.query))
        self._send_json(status, doc, record)

    def _read_chunked(self) -> bytes:
        """A chunked body, whole (a relay may re-frame a body it was given chunked)."""
        body = b""
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return body
            body += self.rfile.read(size)
            self.rfile.readline()

    def _answer(self, path: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        # Real IMDS refuses proxied requests and requests without the metadata header.
        if self.headers.get("X-Forwarded-For") is not None:
            return 400, {"error": "invalid_request",
                         "error_description": "Request contains X-Forwarded-For header"}
        if (self.headers.get("Metadata") or "").lower() != "true":
            return 400, {"error": "Bad request. Required metadata header not specified"}
        if "api-version" not in query:
            return 400, {"error": "Bad request. api-version was not specified in the request.",
                         "newest-versions": ["2023-07-01", "2021-12-13", "2021-11-15"]}
        if path == "/metadata/instance":
            return 200, INSTANCE
        if path in ("/metadata/identity/oauth2/token", "/metadata/identity/oauth2/token/"):
            with self.server.lock:
                self.server.counter += 1
                n = self.server.counter
            now = int(time.time())
            resource = query.get("resource", [""])[0]
            return 200, {
                "access_token": f"{NODE_TOKEN_MARK}.{n}", "client_id": NODE_CLIENT_ID,
                "expires_in": "86399", "expires_on": str(now + 86399),
                "ext_expires_in": "86399", "not_before": str(now), "resource": resource,
                "token_type": "Bearer",
            }
        return 404, {"error": "Not found"}

    def _control(self, op: str) -> None:
        with self.server.lock:
            if op == "records":
                doc: Any = {"requests": list(self.server.records)}
            elif op == "reset" and self.command == "POST":
                self.server.records.clear()
                doc = {"ok": True}
            else:
                self._send_json(404, {"error": f"unknown control path {op!r}"})
                return
        self._send_json(200, doc)

    do_GET = _handle
    do_POST = _handle
    do_PUT = _handle
    do_DELETE = _handle
    do_PATCH = _handle
    do_HEAD = _handle
    do_OPTIONS = _handle


class FakeImdsClient:
    """Reads and clears a FakeImdsServer's records (stdlib only)."""

    def __init__(self, base_url: str, *, timeout_s: float = 10.0) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"not an http URL: {base_url}")
        self.base_url = base_url.rstrip("/")
        self.host = parts.hostname
        self.port = parts.port or 80
        self._timeout = timeout_s

    def _call(self, method: str, op: str) -> Any:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self._timeout)
        try:
            conn.request(method, CONTROL_PREFIX + op)
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"fake IMDS {method} {op}: {resp.status} {data!r}")
            return json.loads(data)
        finally:
            conn.close()

    def records(self) -> list[dict[str, Any]]:
        """Every non-control request so far, oldest first; headers as [name, value] pairs."""
        return list(self._call("GET", "records")["requests"])

    def reset(self) -> None:
        self._call("POST", "reset")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bind", required=True, help="HOST:PORT (port 0 picks a free one)")
    args = parser.parse_args(argv)
    host, _, port = args.bind.rpartition(":")
    server = FakeImdsServer((host.strip("[]"), int(port)))
    bound_host, bound_port = str(server.server_address[0]), int(server.server_address[1])
    sys.stdout.write(f"ready http://{bound_host}:{bound_port}\n")
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
