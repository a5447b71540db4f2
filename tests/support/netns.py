"""Closed network-namespace topologies for root tests: real veths, routes and processes.

Name: support.netns
Scope: every helper builds and removes what it made inside one `with` block (namespaces,
    their veths and addresses, background processes), even when the block raises; test
    modules wrap them in function-scoped fixtures, one topology per test.
Depends: root with CAP_SYS_ADMIN + CAP_NET_ADMIN (probed by `support.caps.CAN_NETNS`, which
    the `root` marker uses), pyroute2, iproute2's `ip netns exec`, util-linux `setpriv`,
    and for `netfilter_snapshot` the `nft` and `iptables-legacy-save` commands.

The topology and its safety rules (nothing linked to the root namespace, no forwarding,
198.18.0.0/15 addresses only inside these namespaces, unique names, processes killed by
PID) are those of `azwi_netproxy.demo.sandbox`, which the demo uses too; this module re-exports
it and adds what only tests need.

Running code: `ns_argv(ns, argv, uid=...)` wraps argv in `ip netns exec` (and `setpriv` for
another uid); `run_in` runs it to completion; `Processes` starts background ones.
`start_responder` and `probe` are a tiny TCP/UDP server and client to see where traffic lands
(a responder on the metadata address is a tripwire: `hits` lists who reached it);
`probe_many` tries many destinations (TCP, UDP, ICMP echo) from one process.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from azwi_netproxy.demo.sandbox import (  # re-exported for the test modules (__all__)
    METADATA_IP,
    Processes,
    Topology,
    add_address,
    add_route,
    connect,
    namespace,
    ns_argv,
    processes,
    run_in,
    topology,
)
from support.proxyproc import SUPPORT_DIR, ScriptProcess, start_script

__all__ = [
    "METADATA_IP", "SYSTEM_PYTHON", "Processes", "Topology", "add_address", "add_route",
    "connect", "hits", "legacy_tables", "namespace", "netfilter_snapshot", "ns_argv", "probe",
    "probe_many", "processes", "run_in", "start_fake_in", "start_responder", "topology",
]

# Processes run under other uids need an interpreter they can read; Debian's is (STYLE 9).
SYSTEM_PYTHON = "/usr/bin/python3"


def start_fake_in(ns: str, script: str, bind: str, log: Path, *extra: str) -> ScriptProcess:
    """One of support's fakes (fake_imds.py, fake_entra.py) in `ns`, once it says it is ready."""
    argv = ns_argv(ns, [sys.executable, str(SUPPORT_DIR / script), "--bind", bind, *extra])
    return start_script(argv, log)


# ---- where does traffic land? ------------------------------------------------------------

Proto = Literal["tcp", "udp"]

# Serves a fixed reply and prints one line per connection (TCP) or datagram (UDP).
_RESPONDER = r"""
import socket, sys
host, port, proto, reply = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].encode()
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
sock = socket.socket(socket.AF_INET, kind)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind((host, port))
if proto == "tcp":
    sock.listen(16)
print("ready", flush=True)
while True:
    if proto == "tcp":
        conn, peer = sock.accept()
        print("hit", peer[0], flush=True)
        conn.sendall(reply)
        conn.close()
    else:
        data, peer = sock.recvfrom(2048)
        print("hit", peer[0], flush=True)
        sock.sendto(reply, peer)
"""

# Prints the reply, or what went wrong: refused, timeout, or error:<errno name>.
_PROBE = r"""
import errno, socket, sys
host, port, proto, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
try:
    if proto == "tcp":
        sock = socket.create_connection((host, port), timeout=timeout)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.send(b"ping")
    print(sock.recv(2048).decode() or "closed")
except ConnectionRefusedError:
    print("refused")
except (TimeoutError, socket.timeout):
    print("timeout")
except OSError as exc:
    print("error:" + errno.errorcode.get(exc.errno or 0, str(exc.errno)))
"""


def start_responder(
    procs: Processes,
    ns: str,
    host: str,
    port: int,
    reply: str,
    *,
    proto: Proto = "tcp",
    uid: int | None = None,
) -> subprocess.Popen[str]:
    """A server on host:port in `ns` that answers `reply`; `hits(procs, it)` counts clients."""
    return procs.start(
        ns, [SYSTEM_PYTHON, "-c", _RESPONDER, host, str(port), proto, reply],
        uid=uid, ready_line="ready",
    )


def hits(procs: Processes, responder: subprocess.Popen[str]) -> list[str]:
    """Stop a responder and return the source address of every client it served."""
    out, _err = procs.stop(responder)
    return [line.split()[1] for line in out.splitlines() if line.startswith("hit ")]


def probe(
    ns: str, host: str, port: int, *, uid: int | None = None, proto: Proto = "tcp",
    timeout: float = 2.0,
) -> str:
    """Connect (or send a datagram) from `ns` as `uid`; the reply or what went wrong."""
    done = run_in(ns, [SYSTEM_PYTHON, "-c", _PROBE, host, str(port), proto, str(timeout)],
                  uid=uid, timeout=timeout + 10)
    if done.returncode != 0:
        raise RuntimeError(f"probe failed to run: {done.stderr.strip()}")
    return done.stdout.strip()


# Probes several destinations in one process; prints one JSON list of results: the reply,
# "refused", "timeout", "echo-reply" (ICMP) or error:<errno name>.
_MULTI_PROBE = r"""
import errno, json, socket, sys
results = []
for host, port, proto in json.loads(sys.argv[1]):
    try:
        if proto == "tcp":
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(2)
            sock.connect((host, port))
            results.append(sock.recv(64).decode() or "closed")
        elif proto == "udp":
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.settimeout(2)
            sock.connect((host, port))
            sock.send(b"ping")
            results.append(sock.recv(64).decode())
        else:  # ICMP echo over a ping socket (net.ipv4.ping_group_range must allow the gid)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
            sock.settimeout(2)
            sock.sendto(b"\x08\x00\x00\x00\x00\x01\x00\x01ping", (host, 0))
            sock.recv(64)
            results.append("echo-reply")
        sock.close()
    except ConnectionRefusedError:
        results.append("refused")
    except (TimeoutError, socket.timeout):
        results.append("timeout")
    except OSError as exc:
        results.append("error:" + errno.errorcode.get(exc.errno or 0, str(exc.errno)))
print(json.dumps(results))
"""

Target = tuple[str, int, str]  # host, port, "tcp" | "udp" | "icmp"


def probe_many(ns: str, targets: Sequence[Target], *, uid: int | None = None,
               via: Sequence[str] = ()) -> list[str]:
    """`probe` for each target from one process in `ns` as `uid` (None: root), run through
    `via` first if given (e.g. root's own `setpriv --reuid=1501`); one result per target."""
    done = run_in(ns, [*via, SYSTEM_PYTHON, "-c", _MULTI_PROBE, json.dumps(list(targets))],
                  uid=uid, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"probe failed to run: {done.stderr.strip()}")
    results: list[str] = json.loads(done.stdout)
    return results


# ---- what does the namespace's netfilter hold? ----------------------------------------

_COUNTERS = re.compile(r" \[\d+:\d+\]$")


def legacy_tables(ns: str) -> list[str]:
    """The legacy iptables tables `ns` has instantiated (reading creates none)."""
    done = run_in(ns, ["cat", "/proc/net/ip_tables_names"])
    return sorted(done.stdout.split()) if done.returncode == 0 else []


def netfilter_snapshot(ns: str) -> str:
    """The whole netfilter state of `ns`: `nft list ruleset` plus every legacy table.

    Legacy tables are saved one by one, and only those that exist, because a plain
    `iptables-legacy-save` would instantiate all five. Counters and comment lines are
    dropped, and a legacy table holding nothing (builtin chains, policy ACCEPT, no rules) is
    left out: the kernel cannot remove a legacy table once a program opened it, and such a
    table filters nothing.
    """
    parts = [run_in(ns, ["nft", "list", "ruleset"]).stdout.strip()]
    for table in legacy_tables(ns):
        saved = run_in(ns, ["iptables-legacy-save", "-t", table]).stdout
        lines = [_COUNTERS.sub("", line) for line in saved.splitlines()
                 if line and not line.startswith("#")]
        empty = all(
            line in (f"*{table}", "COMMIT")
            or (line.startswith(":") and line.endswith(" ACCEPT"))
            for line in lines
        )
        if not empty:
            parts.append("\n".join(lines))
    return "\n".join(p for p in parts if p)
