"""Throwaway sandboxes of network namespaces: a pod, the node's metadata service, a token service.

Used by `azwi-netproxy-demo` and by the root tests (tests/support/netns.py re-exports it).

The topology (`topology()`):

        PEER (optional)              POD (lo up)                 IMDS
     198.18.2.2/30 ---------- 198.18.2.1   198.18.0.1 ---------- 198.18.0.2/30
                                    |                            169.254.169.254/32
                              198.18.1.1
                                    |
                              198.18.1.2/30
                                   STS

Safety:
- Nothing is linked to the root namespace: each veth pair is created inside POD with its
  peer placed directly into the other namespace, so no end ever exists in the root one.
- No forwarding is enabled anywhere; every path is POD <-> one neighbour.
- Addresses come from 198.18.0.0/15 (RFC 2544, benchmarking) and exist only in these
  namespaces; METADATA_IP lives only in the IMDS namespace, reached by POD's /32 route.
- Names are unique (uuid) and every process started here is killed by its PID.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass

from pyroute2 import IPRoute, netns

METADATA_IP = "169.254.169.254"


@contextmanager
def _rtnl(ns: str) -> Iterator[IPRoute]:
    """An RTNL socket inside `ns`.

    pyroute2 opens it in a forked child that leaves its copy of the socket to the garbage
    collector; under pytest's `filterwarnings=error` the child would print that
    ResourceWarning as noise, so the fork happens with the warning ignored.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        ipr = IPRoute(netns=ns)
    try:
        yield ipr
    finally:
        ipr.close()


def _ifindex(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise RuntimeError(f"interface {ifname} not found")
    return int(found[0])


@contextmanager
def namespace(prefix: str = "az") -> Iterator[str]:
    """A new, empty network namespace with `lo` up; yields its name, removes it afterwards."""
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    netns.create(name)
    try:
        with _rtnl(name) as ipr:
            ipr.link("set", index=1, state="up")
        yield name
    finally:
        with suppress(OSError):
            netns.remove(name)


def connect(near: str, far: str, *, near_addr: str, far_addr: str, prefixlen: int = 30) -> tuple[str, str]:
    """A veth pair between two test namespaces, both ends addressed and up.

    The pair is created inside `near` with its peer put straight into `far`, so no end is
    ever in the root namespace. Returns (near ifname, far ifname); the pair goes away with
    either namespace.
    """
    tag = uuid.uuid4().hex[:8]
    near_if, far_if = f"vn{tag}", f"vf{tag}"  # IFNAMSIZ: at most 15 bytes
    with _rtnl(near) as ipr:
        ipr.link("add", ifname=near_if, kind="veth", peer={"ifname": far_if, "net_ns_fd": far})
        index = _ifindex(ipr, near_if)
        ipr.addr("add", index=index, address=near_addr, prefixlen=prefixlen)
        ipr.link("set", index=index, state="up")
    with _rtnl(far) as ipr:
        index = _ifindex(ipr, far_if)
        ipr.addr("add", index=index, address=far_addr, prefixlen=prefixlen)
        ipr.link("set", index=index, state="up")
    return near_if, far_if


def add_address(ns: str, ifname: str, address: str, prefixlen: int = 32) -> None:
    """One more address on an interface of `ns`."""
    with _rtnl(ns) as ipr:
        ipr.addr("add", index=_ifindex(ipr, ifname), address=address, prefixlen=prefixlen)


def add_route(ns: str, dst: str, gateway: str) -> None:
    """A route in `ns` (dst in CIDR form) via a neighbour on a connected link."""
    with _rtnl(ns) as ipr:
        ipr.route("add", dst=dst, gateway=gateway)


@dataclass(frozen=True, slots=True)
class Topology:
    """Names and addresses of one built topology (see the module docstring)."""

    pod: str
    imds: str
    sts: str
    peer: str | None
    metadata_ip: str
    pod_imds_addr: str = "198.18.0.1"
    imds_addr: str = "198.18.0.2"
    pod_sts_addr: str = "198.18.1.1"
    sts_addr: str = "198.18.1.2"
    pod_peer_addr: str = "198.18.2.1"
    peer_addr: str = "198.18.2.2"


@contextmanager
def topology(*, metadata_ip: str = METADATA_IP, with_peer: bool = False) -> Iterator[Topology]:
    """POD with IMDS (holding `metadata_ip`), STS and optionally PEER as direct neighbours."""
    with ExitStack() as stack:
        pod = stack.enter_context(namespace("azpod"))
        imds = stack.enter_context(namespace("azimds"))
        sts = stack.enter_context(namespace("azsts"))
        peer = stack.enter_context(namespace("azpeer")) if with_peer else None
        topo = Topology(pod=pod, imds=imds, sts=sts, peer=peer, metadata_ip=metadata_ip)
        _pod_if, imds_if = connect(pod, imds, near_addr=topo.pod_imds_addr, far_addr=topo.imds_addr)
        add_address(imds, imds_if, metadata_ip)
        add_route(pod, f"{metadata_ip}/32", topo.imds_addr)
        connect(pod, sts, near_addr=topo.pod_sts_addr, far_addr=topo.sts_addr)
        if peer is not None:
            connect(pod, peer, near_addr=topo.pod_peer_addr, far_addr=topo.peer_addr)
        yield topo


def ns_argv(ns: str, argv: Sequence[str], *, uid: int | None = None) -> list[str]:
    """argv run inside `ns`, as `uid` (gid = uid, no supplementary groups) when given."""
    drop = [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    return ["ip", "netns", "exec", ns, *drop, *argv]


def run_in(
    ns: str,
    argv: Sequence[str],
    *,
    uid: int | None = None,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Run argv in `ns` to completion and capture its output (never raises on exit status)."""
    return subprocess.run(
        ns_argv(ns, argv, uid=uid),
        input=input,
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else None,
        timeout=timeout,
        cwd="/",
        check=False,
    )


class Processes:
    """Background processes started in namespaces; `close()` kills each by its PID.

    `ip netns exec` and `setpriv` exec into the command, so the PID Popen holds is the
    command's own.
    """

    def __init__(self) -> None:
        self._started: list[subprocess.Popen[str]] = []

    def start(
        self,
        ns: str,
        argv: Sequence[str],
        *,
        uid: int | None = None,
        env: Mapping[str, str] | None = None,
        ready_line: str | None = None,
        timeout: float = 10.0,
    ) -> subprocess.Popen[str]:
        """Start argv in `ns`; with `ready_line`, wait until it prints that line on stdout."""
        proc = subprocess.Popen(
            ns_argv(ns, argv, uid=uid),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(env) if env is not None else None,
            cwd="/",
        )
        self._started.append(proc)
        if ready_line is not None:
            self._wait_for_line(proc, ready_line, timeout)
        return proc

    @staticmethod
    def _wait_for_line(proc: subprocess.Popen[str], line: str, timeout: float) -> None:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    raise TimeoutError(f"{proc.args!r} did not print {line!r} in {timeout} s")
                got = proc.stdout.readline()
                if got == "":
                    err = proc.stderr.read() if proc.stderr else ""
                    raise RuntimeError(f"{proc.args!r} exited before {line!r}: {err.strip()}")
                if got.rstrip("\n") == line:
                    return

    def stop(self, proc: subprocess.Popen[str]) -> tuple[str, str]:
        """Kill one process by PID; returns what it printed (stdout, stderr) after ready."""
        if proc.poll() is None:
            os.kill(proc.pid, 9)
        out, err = proc.communicate(timeout=10)
        return out, err

    def close(self) -> None:
        for proc in self._started:
            with suppress(ProcessLookupError, ValueError, subprocess.TimeoutExpired):
                self.stop(proc)
        self._started.clear()


@contextmanager
def processes() -> Iterator[Processes]:
    """A `Processes` registry whose processes are all killed when the block ends."""
    registry = Processes()
    try:
        yield registry
    finally:
        registry.close()
