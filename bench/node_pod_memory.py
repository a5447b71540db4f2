"""Where a node-mode pod's memory goes: tracemalloc over pods enrolled in this process.

Usage (from the repository, with the venv's python; no root needed):
    python bench/node_pod_memory.py [--pods 100]

The node process's own parts (node.py's `PodApps`, pods.py's `PodRegistry`, the server, the
cache, the exchange) run in this process on one event loop, against bench/token_service.py,
with one change: each pod's listener is bound on 127.0.0.1 here (port chosen by the kernel)
instead of inside the pod's network namespace, since the point is the Python objects a pod
costs, not the namespace. After one warm-up pod, `--pods` more are enrolled, each warm (one
miss, one cache hit on one connection), and the growth of the traced heap per pod is printed
by module and by line. bench/node_mode.py measures the real process (smaps_rollup); this
says what its marginal figure is made of. What tracemalloc does not see: uvloop's libuv
handles, malloc's own overhead, the kernel's socket memory.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import socket
import sys
import tempfile
import tracemalloc
import uuid
from pathlib import Path

import run as base  # bench/run.py (this script's directory is first on sys.path)
import uvloop

TOKEN_REQUEST = (
    f"GET {base.TOKEN_PATH} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n\r\n".encode()
)


# The port of the listener bound last (one slot: nothing here grows with the pods).
LAST_PORT = [0]


def listen_here(netns_fd: int, host: str, port: int, *, expected_cookie: int, backlog: int = 128) -> socket.socket:
    """netns.listen_in's stand-in: a listener in this namespace, on a port the kernel picks."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind((host, 0))
    sock.listen(backlog)
    sock.setblocking(False)
    LAST_PORT[0] = sock.getsockname()[1]
    return sock


async def miss_and_hit(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(2):
        writer.write(TOKEN_REQUEST)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
        await reader.readexactly(length)
    writer.close()
    await writer.wait_closed()


async def measure(pods: int, pods_dir: Path) -> None:
    from azwi_netproxy.enrolment import enrolment
    from azwi_netproxy.logs import AccessLog
    from azwi_netproxy.proxy import config
    from azwi_netproxy.proxy.metrics import Metrics
    from azwi_netproxy.proxy.node import PodApps
    from azwi_netproxy.proxy.pods import PodRegistry
    from azwi_netproxy.proxy.run import make_endpoint
    from azwi_netproxy.proxy.server import HttpServer

    loop = asyncio.get_running_loop()
    cfg = config.load_node({}, os.environ, {})
    endpoint = make_endpoint(cfg)
    access_log = AccessLog(enabled=False, schedule_flush=lambda flush: loop.call_later(0.05, flush))
    server = HttpServer()
    apps = PodApps(cfg, endpoint=endpoint, passthrough=None, metrics=Metrics(), access_log=access_log)
    registry = PodRegistry(server=server, build=apps.build)

    async def one(index: int) -> None:
        uid = str(uuid.uuid4())
        token_dir = pods_dir / uid / "volumes" / "kubernetes.io~projected" / "azure-identity-token-x" / "token"
        token_dir.mkdir(parents=True)
        (token_dir / "azure-identity-token").write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJiZW5jaCJ9.c2ln")
        enrolled = enrolment(container_id=uuid.uuid4().hex, pod_uid=uid, pod=f"bench/pod-{index}",
                             netns="/run/netns/unused", netns_cookie=1, proxy_port=8000, client_id=base.CLIENT,
                             tenant_id=None, identity_map=None)
        await registry.add(enrolled, -1)
        await miss_and_hit(LAST_PORT[0])

    await one(0)
    await asyncio.sleep(0.2)
    gc.collect()
    tracemalloc.start(4)
    before = tracemalloc.take_snapshot()
    for index in range(1, pods + 1):
        await one(index)
    await asyncio.sleep(0.2)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    total = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    print(f"traced Python heap per pod: {total / pods / 1024:.1f} KB ({pods} pods, each warm)")
    print("by module (bytes per pod):")
    for stat in after.compare_to(before, "filename")[:12]:
        print(f"  {stat.size_diff / pods:7.0f}  {stat.traceback[0].filename.split('site-packages/')[-1]}")
    print("by line (bytes per pod):")
    for stat in after.compare_to(before, "lineno")[:12]:
        frame = stat.traceback[0]
        print(f"  {stat.size_diff / pods:7.0f}  {frame.filename.split('site-packages/')[-1]}:{frame.lineno}")
    await registry.aclose()
    await server.shutdown()
    await endpoint.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=100)
    args = parser.parse_args()
    from azwi_netproxy.proxy import netns

    netns.listen_in = listen_here
    bench = base.Bench(argparse.Namespace())
    try:
        ca_file, sts_port = bench.token_service()
        pods_dir = Path(tempfile.mkdtemp(dir=bench.tmp))
        os.environ.update({
            "AZURE_TENANT_ID": base.TENANT,
            "AZURE_AUTHORITY_HOST": f"https://127.0.0.1:{sts_port}/",
            "SSL_CERT_FILE": ca_file,
            "AZWI_KUBELET_PODS_DIR": str(pods_dir),
            "AZWI_CNI_RUN_DIR": str(bench.tmp / "run"),
        })
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(measure(args.pods, pods_dir))
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
