"""A stand-in Entra token endpoint for the benchmark: HTTPS on loopback, uvloop + httptools.

Answers POST /{tenant}/oauth2/v2.0/token with a realistic-size token and counts the
exchanges (GET /_stats). It checks the form's shape but not signatures: the tests' fake
Entra (tests/support/fake_entra.py) is the one that validates everything.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import urllib.parse

import httptools
import uvloop

EXCHANGES = 0
TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9." + "y" * 1100 + ".sig"


class TokenService(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body = b""

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        global EXCHANGES
        if self.url == b"/_stats":
            self._send(200, json.dumps({"exchanges": EXCHANGES}).encode())
            return
        form = dict(urllib.parse.parse_qsl(self.body.decode()))
        if form.get("grant_type") != "client_credentials" or not form.get("client_assertion"):
            self._send(400, b'{"error":"invalid_request","error_description":"AADSTS900144: bad form"}')
            return
        EXCHANGES += 1
        self._send(
            200,
            json.dumps(
                {"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": TOKEN}
            ).encode(),
        )

    def _send(self, status: int, body: bytes) -> None:
        self.transport.write(  # type: ignore[attr-defined]
            b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (status, len(body), body)
        )


async def main(port: int, cert: str, key: str) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(TokenService, "127.0.0.1", port, ssl=context, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
