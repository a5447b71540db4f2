"""The floor: the least an IMDS-style answer can cost on uvloop + httptools.

No routing, no validation, no logging, no metrics: a fixed token body of the real
answer's size whose expires_in is recomputed once a second. The proxy's figures are
reported as ratios to this server's, measured in the same run on the same core.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable

import httptools
import uvloop

TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9." + "x" * 1100 + ".sig"


def body_for(now: int) -> bytes:
    expires_on = now + 3599
    return (
        f'{{"access_token":"{TOKEN}","client_id":"11111111-1111-1111-1111-111111111111",'
        f'"expires_in":"{expires_on - now}","expires_on":"{expires_on}","ext_expires_in":"3599",'
        f'"not_before":"{now}","resource":"https://management.azure.com/","token_type":"Bearer"}}'
    ).encode()


class Floor(asyncio.Protocol):
    second = -1
    response = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        now = int(time.time())
        if now != Floor.second:
            body = body_for(now)
            Floor.second = now
            Floor.response = (
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        self.transport.write(Floor.response)  # type: ignore[attr-defined]
        if not self.parser.should_keep_alive():
            self.transport.close()


async def main(port: int, protocol: Callable[[], asyncio.Protocol]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(protocol, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def serve(protocol: Callable[[], asyncio.Protocol]) -> None:
    """Serve `protocol` on 127.0.0.1 at the port given as the first argument, on uvloop."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(int(sys.argv[1]), protocol))


if __name__ == "__main__":
    serve(Floor)
