"""Security claims of SECURITY.md: where the proxy listens, what it logs, where traffic can go.

Name: test_security
Scope: proxy processes (uid 1501) on loopback against the fake Entra and IMDS, plus a
    second fake IMDS (the "decoy") that no request may ever reach through the proxy; one
    POD/IMDS namespace topology (support.netns) with the real init for the reachability
    test; an in-process Passthrough against a tiny redirecting server.
Depends: support.fixtures, support.netns (root tests), /proc of the proxy's PID.

Each test is named after the claim it proves; SECURITY.md links to them.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
from support.fake_entra import FakeEntraClient
from support.fake_imds import INSTANCE, NODE_TOKEN_MARK, FakeImdsClient
from support.metrics import scrape
from support.netns import hits, probe_many, start_responder
from support.proxyproc import (
    Pod,
    ProxyProcess,
    RawConnection,
    free_port,
    http_request,
    start_fake_imds,
    token_target,
    unique_resource,
)

from azwi_netproxy.demo.sandbox import Processes, Topology, processes, run_in, topology
from azwi_netproxy.errors import UpstreamUnavailable
from azwi_netproxy.proxy.passthrough import Passthrough
from azwi_netproxy.proxy.wire import Request

pytest_plugins = ["support.fixtures"]
pytestmark = pytest.mark.timeout(90)

ProxyFactory = Callable[..., ProxyProcess]


# ---- /proc helpers ---------------------------------------------------------------------------


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = str(entry.readlink())
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def _address(hex_address: str) -> tuple[str, int]:
    address, _, port = hex_address.rpartition(":")
    if len(address) == 8:
        host = socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1])
    else:  # /proc/net/tcp6: four little-endian 32-bit words
        raw = b"".join(bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, 32, 8))
        host = socket.inet_ntop(socket.AF_INET6, raw)
    return host, int(port, 16)


def bound_sockets(pid: int) -> dict[str, set[tuple[str, int]]]:
    """The proxy's listening TCP sockets and any bound UDP/raw sockets, per table."""
    inodes = socket_inodes(pid)
    found: dict[str, set[tuple[str, int]]] = {}
    for table in ("tcp", "tcp6", "udp", "udp6", "raw", "raw6"):
        path = Path(f"/proc/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            listening = fields[3] == "0A" if table.startswith("tcp") else True
            if fields[9] in inodes and listening:
                found.setdefault(table, set()).add(_address(fields[1]))
    return found


# ---- where it listens, with what rights ------------------------------------------------------


def test_the_token_port_listens_on_loopback_only(proxy: ProxyProcess) -> None:
    assert bound_sockets(proxy.proc.pid) == {"tcp": {("127.0.0.1", proxy.port)}}


# Every label a sample may carry, and the fixed set its values come from (SECURITY.md: no
# identities). A client ID, resource, path or anything else a client sends is in none of them.
_LABEL_VALUES: dict[tuple[str, str], Callable[[str], bool]] = {
    ("azwi_netproxy_requests_total", "route"):
        {"token", "ready", "passthrough", "refused", "invalid"}.__contains__,
    ("azwi_netproxy_requests_total", "status"): lambda value: re.fullmatch(r"[1-5][0-9][0-9]", value) is not None,
    ("azwi_netproxy_exchanges_total", "outcome"):
        {"success", "rejected", "throttled", "unavailable", "error"}.__contains__,
    ("azwi_netproxy_cache_events_total", "event"):
        {"hit", "miss", "refresh", "stale", "evict", "refresh_failed"}.__contains__,
    ("azwi_netproxy_exchange_duration_seconds_bucket", "le"):
        lambda value: re.fullmatch(r"\+Inf|[0-9]+(\.[0-9]+)?", value) is not None,
}


def labels_outside_the_fixed_sets(samples: Iterable[tuple[str, frozenset[tuple[str, str]]]]) -> list[str]:
    """Every label of every sample (support.metrics.scrape's keys) that `_LABEL_VALUES` does
    not allow, by name or by value."""
    found = []
    for name, labels in samples:
        for key, value in sorted(labels):
            allowed = _LABEL_VALUES.get((name, key))
            if allowed is None or not allowed(value):
                found.append(f"{name}{{{key}={value!r}}}")
    return sorted(found)


def test_the_metrics_port_serves_metrics_only_and_never_a_token(
        proxy_factory: ProxyFactory, entra: FakeEntraClient, pod: Pod,
        new_app: Callable[..., str]) -> None:
    metrics_port = free_port()
    proxy = proxy_factory(args=[f"--metrics-port={metrics_port}"])
    # Prometheus scrapes it from outside the pod, so it is the one wildcard listener.
    assert bound_sockets(proxy.proc.pid) == {"tcp": {("127.0.0.1", proxy.port),
                                                     ("0.0.0.0", metrics_port)}}
    # Every route, with identities and resources a label could carry: the default client and
    # another by client_id, a hit, a pass-through, a refusal, an error, readiness.
    other_app = new_app()
    resources = [unique_resource("metrics"), unique_resource("metrics-other")]
    token = proxy.token(resources[0]).json()["access_token"]
    assert proxy.token(resources[0]).status == 200
    assert proxy.token(resources[1], other_app).status == 200
    instance = "/metadata/instance?api-version=2021-02-01"
    assert proxy.get(instance, {"Metadata": "true"}).status == 200
    assert proxy.get("/metadata/%69dentity/oauth2/token?resource=x", {"Metadata": "true"}).status == 404
    assert proxy.get(token_target(resources[0])).status == 400  # no Metadata: true
    assert proxy.get("/readyz").status == 200
    for target in (token_target(unique_resource("via-metrics")), "/readyz", instance):
        answer = http_request(metrics_port, target, headers={"Metadata": "true"})
        assert answer.status == 404, (target, answer)
    samples = scrape(metrics_port)
    outside = labels_outside_the_fixed_sets(samples)
    assert outside == [], f"labels outside the fixed sets: {outside}"
    # Not vacuous: the labelled families hold samples of what was asked.
    seen = {(name, *label) for name, labels in samples for label in labels}
    for route in ("token", "passthrough", "refused", "ready"):
        assert ("azwi_netproxy_requests_total", "route", route) in seen, route
    assert ("azwi_netproxy_requests_total", "status", "400") in seen
    assert ("azwi_netproxy_exchanges_total", "outcome", "success") in seen
    assert {("azwi_netproxy_cache_events_total", "event", e) for e in ("hit", "miss")} <= seen
    exposition = http_request(metrics_port, "/metrics").body.decode()
    told = {"a token": token, "the service account token": pod.token.read(),
            "the default client ID": pod.client_id, "another client ID": other_app,
            "a resource": resources[0], "another resource": resources[1], "a path": "/metadata/"}
    assert [what for what, value in told.items() if value.lower() in exposition.lower()] == []
    assert not re.search(r"fake\.[\w-]{20,}\.", exposition)
    assert len(entra.exchanges()) == 2  # nothing asked on the metrics port was exchanged


def test_the_proxy_runs_unprivileged(proxy: ProxyProcess) -> None:
    status = dict(line.split(":\t", 1) for line in
                  Path(f"/proc/{proxy.proc.pid}/status").read_text().splitlines() if ":\t" in line)
    assert status["Uid"].split() == ["1501"] * 4
    assert status["Gid"].split() == ["1501"] * 4
    assert status["Groups"].strip() == ""
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0


# ---- tokens never reach the logs ------------------------------------------------------------

FAKE_TOKEN = re.compile(r"fake\.[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]+")
SECRET_HEADER = "Bearer do-not-log-this-3f9c1e"


def test_no_token_or_assertion_in_a_debug_log_of_every_path(
        proxy_factory: ProxyFactory, entra: FakeEntraClient, imds: FakeImdsClient, pod: Pod,
        new_app: Callable[..., str]) -> None:
    proxy = proxy_factory(args=["--log-level=debug"])
    delivered: list[str] = []
    app_a, app_b, refresh_app = new_app(), new_app(), new_app()

    def token(resource: str, client_id: str | None = None) -> int:
        answer = proxy.token(resource, client_id)
        if answer.status == 200:
            delivered.append(answer.json()["access_token"])
        return answer.status

    hot = unique_resource("log")
    assert token(hot) == 200 and token(hot) == 200  # miss, then hit
    assert token(unique_resource("log"), app_a) == 200
    entra.fault(client_id=app_b, times=1, reset=True)  # a retry, logged at info
    assert token(unique_resource("log"), app_b) == 200
    entra.fault(client_id=app_b, times=None, aadsts=70021)  # Entra's text reaches the app
    assert token(unique_resource("log"), app_b) == 400
    entra.clear_faults()
    entra.fault(client_id=app_a, times=None, non_json=True)
    assert token(unique_resource("log"), app_a) == 503
    # A token whose background renewal fails: logged at warning, with the key but no token.
    entra.fault(client_id=refresh_app, times=1, refresh_in=1)
    refresh_resource = unique_resource("log")
    assert token(refresh_resource, refresh_app) == 200
    entra.fault(client_id=refresh_app, times=None, status=500)
    time.sleep(1.2)
    assert token(refresh_resource, refresh_app) == 200
    # Pass-through with credentials the app may send along: forwarded, never logged.
    answer = proxy.get("/metadata/instance?api-version=2021-02-01",
                       {"Metadata": "true", "Authorization": SECRET_HEADER,
                        "Cookie": "session=do-not-log"})
    assert answer.status == 200
    # Refusals.
    assert proxy.get(token_target(hot)).status == 400
    assert proxy.get("/metadata/%69dentity/oauth2/token?resource=x",
                     {"Metadata": "true"}).status == 404
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET /readyz HTTP/1.1\r\nHost: 169.254.169.254\r\nAuthorization: " + SECRET_HEADER.encode() + b"\r\nBad\r\n\r\n")
        assert conn.read_response().status == 400
    # Wait for the background renewal's retries to end and be logged.
    deadline = time.monotonic() + 10
    while "background token refresh failed" not in proxy.log_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    proxy.stop()

    text = proxy.log_text()
    assert "background token refresh failed" in text
    sa_token = pod.token.read()
    secrets = {"the service account token": sa_token, "its signature": sa_token.rsplit(".", 1)[1],
               "its claims": sa_token.split(".")[1], "the Authorization header": SECRET_HEADER,
               "a cookie": "do-not-log"}
    secrets |= {f"access token {n}": value for n, value in enumerate(delivered)}
    leaked = [name for name, value in secrets.items() if value in text]
    assert leaked == []
    assert FAKE_TOKEN.findall(text) == []  # no token Entra issued, delivered or not
    assert NODE_TOKEN_MARK not in text
    for line in text.splitlines():
        if line.startswith("---"):  # ProxyProcess.log_text's file separators
            continue
        json.loads(line)  # one JSON object a line, even for errors


# ---- pass-through cannot be steered ----------------------------------------------------------


@pytest.fixture(scope="module")
def decoy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeImdsClient]:
    """Name: decoy. Scope: module. A second fake IMDS nothing may reach through the proxy."""
    process = start_fake_imds(tmp_path_factory.mktemp("decoy") / "decoy.log")
    try:
        yield FakeImdsClient(process.url)
    finally:
        process.stop()


def steering_attempts(decoy: str, entra: str) -> dict[str, bytes]:
    path = "/metadata/instance?api-version=2021-02-01"
    md = b"Metadata: true\r\n"

    def get(target: str, *headers: str) -> bytes:
        if not any(h.lower().startswith("host:") for h in headers):
            headers = ("Host: 169.254.169.254", *headers)
        extra = "".join(h + "\r\n" for h in headers).encode()
        return f"GET {target} HTTP/1.1\r\n".encode() + md + extra + b"Connection: close\r\n\r\n"

    return {
        "absolute-form": get(f"http://{decoy}{path}", f"Host: {decoy}"),
        "absolute-form-https": get(f"https://{decoy}{path}"),
        "absolute-form-upper-scheme": get(f"HTTP://{decoy}{path}"),
        "absolute-form-to-entra": get(f"http://{entra}{path}"),
        "userinfo-names-imds": get(f"http://169.254.169.254@{decoy}{path}"),
        "userinfo-names-decoy": get(f"http://{decoy}@169.254.169.254{path}"),
        "host-header": get(path, f"Host: {decoy}"),
        "two-host-headers": get(path, "Host: 169.254.169.254", f"Host: {decoy}"),
        "x-forwarded-host": get(path, f"X-Forwarded-Host: {decoy}"),
        "forwarded": get(path, f"Forwarded: host={decoy};proto=http"),
        "x-original-url": get(path, f"X-Original-URL: http://{decoy}{path}"),
        "network-path": get(f"//{decoy}{path}"),
        "triple-slash": get(f"///{decoy}{path}"),
        "backslashes": get(f"/\\\\{decoy}{path}"),
        "encoded-absolute": get(f"/http%3A%2F%2F{decoy}{path}"),
        "at-in-path": get(f"/metadata/instance@{decoy}?api-version=2021-02-01"),
        "connect": f"CONNECT {decoy} HTTP/1.1\r\nHost: {decoy}\r\n\r\n".encode(),
        "authority-form-get": get(decoy),
        "asterisk": b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    }


def test_passthrough_cannot_be_steered_to_another_host_or_port(
        proxy: ProxyProcess, imds: FakeImdsClient, entra: FakeEntraClient,
        decoy: FakeImdsClient) -> None:
    decoy.reset()
    own = f"{imds.host}:{imds.port}"
    attempts = steering_attempts(f"{decoy.host}:{decoy.port}", entra.base_url.split("://")[1])
    outcomes: dict[str, int] = {}
    for name, raw in attempts.items():
        with RawConnection(proxy.port) as conn:
            conn.send(raw)
            answer = conn.read_response()
        outcomes[name] = answer.status
        # Either the node's IMDS answered (through the proxy) or the proxy refused.
        assert answer.status in (200, 400, 404, 405), (name, answer)
        if answer.status == 200:
            assert answer.json() == INSTANCE, name
    assert decoy.records() == [], "pass-through reached another host"
    assert entra.records() == []
    for record in imds.records():
        assert [v for k, v in record["headers"] if k.lower() == "host"] == [own], record
    # A Host game reaches IMDS at its own address, nowhere else; absolute forms are refused
    # (CONTRACT.md: origin form only).
    assert outcomes["host-header"] == 200
    assert all(outcomes[name] == 404 for name in outcomes if name.startswith(("absolute-form", "userinfo")))
    assert outcomes["two-host-headers"] == 400
    assert outcomes["connect"] == outcomes["authority-form-get"] == outcomes["asterisk"] == 400


REDIRECT_TO = "http://{decoy}/metadata/instance?api-version=2021-02-01"


async def _redirecting_imds(location: str, body_size: int = 0) -> tuple[asyncio.Server, int]:
    """A tiny 'IMDS' that answers every request with a redirect (or a huge body)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if body_size:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % body_size)
            chunk = b"x" * 65536
            left = body_size
            try:
                while left:
                    writer.write(chunk[:left])
                    left -= min(left, len(chunk))
                    await writer.drain()
            except ConnectionError:
                pass
        else:
            writer.write(f"HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n".encode())
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


def _instance_request() -> Request:
    return Request(method="GET", target=b"/metadata/instance?api-version=2021-02-01",
                   http_version="1.1", headers=[(b"metadata", b"true")])


async def test_passthrough_never_follows_a_redirect(decoy: FakeImdsClient) -> None:
    decoy.reset()
    server, port = await _redirecting_imds(REDIRECT_TO.format(decoy=f"{decoy.host}:{decoy.port}"))
    passthrough = Passthrough("127.0.0.1", port, run_as_uid=1501)
    try:
        response = await passthrough.forward(_instance_request(), "/metadata/instance",
                                             "api-version=2021-02-01")
    finally:
        await passthrough.aclose()
        server.close()
        await server.wait_closed()
    assert response.status == 302  # handed to the app as IMDS sent it
    assert await asyncio.to_thread(decoy.records) == []


async def test_passthrough_refuses_an_oversized_answer() -> None:
    server, port = await _redirecting_imds("", body_size=8 * 1024 * 1024)
    passthrough = Passthrough("127.0.0.1", port, run_as_uid=1501)
    try:
        # Refused, never buffered whole (the transport stops reading at 1 MiB).
        with pytest.raises(UpstreamUnavailable):
            await passthrough.forward(_instance_request(), "/metadata/instance",
                                      "api-version=2021-02-01")
    finally:
        await passthrough.aclose()
        server.close()
        await server.wait_closed()


# ---- other uids in the pod cannot reach the metadata address ---------------------------------

OTHER_PORTS = [443, 8080, 22, 32526, 2375]


@pytest.fixture
def topo() -> Iterator[Topology]:
    """Name: topo. Scope: function. A POD/IMDS/STS topology (support.netns.topology)."""
    with topology() as built:
        yield built


@pytest.fixture
def procs() -> Iterator[Processes]:
    """Name: procs. Scope: function. Background processes, killed by PID at the end."""
    with processes() as registry:
        yield registry


@pytest.mark.root
def test_other_uids_cannot_reach_the_metadata_address_on_any_port(
        topo: Topology, procs: Processes) -> None:
    ip = topo.metadata_ip
    init = run_in(topo.pod, [sys.executable, "-m", "azwi_netproxy.init"])
    assert init.returncode == 0, init.stderr
    # Ping sockets for every gid, in the POD namespace only (the sysctl is per namespace).
    assert run_in(topo.pod, ["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"]
                        ).returncode == 0
    start_responder(procs, topo.pod, "127.0.0.1", 8000, "proxy")
    responders = {port: start_responder(procs, topo.imds, ip, port, f"imds-{port}")
                  for port in [80, *OTHER_PORTS]}
    udp = {port: start_responder(procs, topo.imds, ip, port, f"imds-udp-{port}", proto="udp")
           for port in (53, 123)}
    targets: list[tuple[str, int, str]] = [
        (ip, 80, "tcp"), *((ip, port, "tcp") for port in OTHER_PORTS),
        (ip, 53, "udp"), (ip, 123, "udp"), (ip, 0, "icmp"),
        (f"::ffff:{ip}", 80, "tcp"), (f"::ffff:{ip}", 8080, "tcp"),
    ]
    others = {uid: probe_many(topo.pod, targets, uid=uid) for uid in (1000, 0, 65534, 1502, 1500)}
    blocked = ["proxy", *(["refused"] * len(OTHER_PORTS)), "error:EPERM", "error:EPERM",
               "error:EPERM", "proxy", "refused"]
    assert others == dict.fromkeys(others, blocked)
    # The proxy's uid (and only it) reaches the real IMDS, and only where pass-through goes:
    # TCP to port 80. Every other port and protocol is closed to it too.
    exempt = probe_many(topo.pod, targets[:-2], uid=1501)
    assert exempt == ["imds-80", *(["refused"] * len(OTHER_PORTS)), "error:EPERM", "error:EPERM",
                      "error:EPERM"]
    assert hits(procs, responders.pop(80)) == [topo.pod_imds_addr]  # uid 1501's probe, nobody else's
    for responder in [*responders.values(), *udp.values()]:
        assert hits(procs, responder) == []

