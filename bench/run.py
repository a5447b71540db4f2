"""Benchmark of the real proxy against a floor server, with the issue's targets checked.

Usage (as root, from the repository; bench/run.sh installs wrk and the venv first):
    python bench/run.py [--duration 8] [--quick] [--readyz-baseline-python PYTHON]

The proxy runs as a separate process against a local HTTPS stand-in token service, pinned
to one core; wrk runs on the other. Every figure of the proxy is reported next to the
floor server's (a minimal uvloop + httptools server with a fixed body of the same size,
bench/floor_server.py) measured in the same run, so ratios hold on a noisy machine. The
parse floor (bench/parse_floor.py: the floor handed each request's target and headers) is
measured against the floor too: the ceiling of any design that parses every request.

What each pod pays (memory after warm-up, exec to the first /readyz, the first token
request) is measured in four configurations: no metrics port, no identity map and
pass-through off (as the bench's other proxies run); the same with pass-through on (as the
webhook injects the sidecar); with --metrics-port; with a YAML identity map. With
--readyz-baseline-python (the python of a venv holding an earlier build) that build is
measured in the same rounds: its starts alternate with this build's, and its processes
join the c=16 rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import functools
import http.client
import json
import os
import re
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT = "11111111-1111-1111-1111-111111111111"
TOKEN_PATH = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# What the floor server did on the machine the issue's targets were set on.
REFERENCE_FLOOR_RPS = 100_000
REFERENCE_FLOOR_CPU_US = 9.5
REFERENCE_FLOOR_NEW_CONN_RPS = 26_000
CPUS = os.cpu_count() or 1
SERVER_CPU = "1" if CPUS > 1 else "0"
LOAD_CPU = "0"
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# The configurations without --metrics-port or a map, whose starts are also measured as a
# pod's postStart hook sees them; and how long after that hook returns the app asks for
# its first token here (its container is started then, and the app itself starts).
BASES = ("pass-through off", "pass-through on")
APP_START_S = 0.2
# The proxy image's uid. Without root (or setpriv) the bench cannot switch to it and runs
# everything as itself.
AS_PROXY = (
    ["setpriv", "--reuid=1501", "--regid=1501", "--clear-groups"] if os.geteuid() == 0 and shutil.which("setpriv") else []
)
# What a pod's container starts with. HOME: as a container runtime sets it for a uid
# without a passwd entry; without it, Python's site looks the user up (pwd), which on this
# machine loads libnss_systemd: 0.4 MB and a few ms that no pod of the image pays.
# PYTHONOPTIMIZE and PYTHONNOUSERSITE: as the proxy image runs it (Dockerfile).
POD_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/", "PYTHONOPTIMIZE": "2", "PYTHONNOUSERSITE": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def core_ticks(cpu: str) -> tuple[int, int]:
    """Busy and total jiffies of one core so far (idle and iowait are not busy)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            # user nice system idle iowait irq softirq steal; guest time is inside user.
            ticks = [int(value) for value in line.split()[1:9]]
            return sum(ticks) - ticks[3] - ticks[4], sum(ticks)
    return 0, 0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def anonymous_mb(pid: int) -> float:
    """Anonymous memory (heap, stacks, Python's objects): what a pod pays for itself, unshared
    with other pods on the node (the libraries' code pages are shared through the page cache)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """Time the process has spent on a CPU so far (the scheduler's nanoseconds, not ticks)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def wait_ready(port: int, path: str = "/readyz", timeout_s: float = 10.0) -> float:
    """Seconds until `path` answers 200, polling every millisecond."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                conn.close()
                return time.monotonic() - started
            conn.close()
        except OSError:
            time.sleep(0.001)
    raise RuntimeError(f"nothing answered on 127.0.0.1:{port}{path}")


def token_seconds(port: int) -> float:
    """Seconds for one token request on a new connection (a miss on a new proxy: an exchange)."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    asked = time.perf_counter()
    conn.request("GET", TOKEN_PATH, headers={"Metadata": "true"})
    answer = conn.getresponse()
    answer.read()
    took_s = time.perf_counter() - asked
    conn.close()
    assert answer.status == 200, answer.status
    return took_s


def pinned(cpu: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if shutil.which("taskset") else argv


def proxy_configs(tmp: Path) -> dict[str, dict[str, Any]]:
    """The configurations whose footprint is measured, by name: the start_proxy arguments
    each sets (metrics, identity_map, extra_env; one not set is off). The map file goes into `tmp`."""
    map_file = tmp / "identity-map.yaml"
    map_file.write_text(
        "onlyListed: false\nidentities:\n"
        f"  - clientID: {CLIENT}\n    name: default\n"
        "  - clientID: 22222222-2222-2222-2222-222222222222\n"
        "    resourceID: /subscriptions/s/resourceGroups/g/providers/"
        "Microsoft.ManagedIdentity/userAssignedIdentities/other\n"
    )
    os.chmod(map_file, 0o644)
    # The bench's proxies run with pass-through off (none of its requests is passed
    # through), and so do the --metrics-port and YAML map configurations. The webhook
    # injects the sidecar with it on, which makes the start check for a pass-through
    # loop through httpx's transport: measured as a configuration of its own.
    return {
        "pass-through off": {},
        "pass-through on": {"extra_env": {"AZWI_PASSTHROUGH": "all"}},
        "--metrics-port": {"metrics": True},
        "YAML identity map": {"identity_map": str(map_file)},
    }


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    # Share of the run that wrk's core was busy (wrk and the kernel's work for its
    # sockets): near 1, the figure is the load generator's limit, not the server's.
    load_core_busy: float = float("nan")


def _ms(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s)", text)
    if not match:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def wrk(
    url: str, connections: int, duration_s: float, *, close: bool = False, script: str | None = None,
    netns: str | None = None,
) -> WrkResult:
    """wrk against `url`; from inside the network namespace `netns` (`ip netns` name) if given."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s", "--latency", "-H", "Metadata: true"]
    if close:
        argv += ["-H", "Connection: close"]
    if script:
        argv += ["-s", script]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    out = subprocess.run(pinned(LOAD_CPU, [*argv, url]), capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    distribution = out.split("Latency Distribution", 1)[-1]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", distribution, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", distribution, re.M).group(1))  # type: ignore[union-attr]
    errors = 0
    for pattern in (r"Non-2xx or 3xx responses: (\d+)", r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"):
        match = re.search(pattern, out)
        if match:
            errors += sum(int(g) for g in match.groups())
    return WrkResult(rps, p50, p99, requests, errors)


def measured(pid: int, run: Callable[[], WrkResult]) -> tuple[WrkResult, float]:
    before = cpu_ticks(pid)
    load_busy, load_total = core_ticks(LOAD_CPU)
    result = run()
    ticks = cpu_ticks(pid) - before
    load_busy_after, load_total_after = core_ticks(LOAD_CPU)
    result.load_core_busy = (load_busy_after - load_busy) / max(load_total_after - load_total, 1)
    return result, ticks / CLK_TCK * 1e6 / max(result.requests, 1)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="azwi-bench-"))
        os.chmod(self.tmp, 0o755)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.collectors: list[subprocess.Popen[bytes]] = []
        self.rows: list[tuple[str, str, str, str]] = []
        self.checks: list[tuple[str, bool, str]] = []
        self.notes: list[str] = []
        self.baseline_figures: dict[str, tuple[WrkResult, float]] = {}

    def start(
        self, argv: list[str], env: dict[str, str] | None = None, log: str = "proc.log", *, piped: bool = False
    ) -> subprocess.Popen[bytes]:
        handle = open(self.tmp / log, "wb")  # noqa: SIM115 - closed with the process
        if not piped:
            proc = subprocess.Popen(argv, env=env, stdout=handle, stderr=handle, cwd="/")
            self.procs.append(proc)
            return proc
        # As in a pod: output goes into a pipe that somebody else drains (the container
        # runtime's shim, on a core of its own). Written straight to a file on this
        # machine's virtual disk, hundreds of MB of access lines made the proxy slower run
        # after run (page-cache writeback), which no pod pays. Here the drain shares the
        # load core with wrk, which is always busy, so the pipe gets room for about 50 ms
        # of lines: otherwise the proxy waits for a drain that a pod's shim would not keep
        # waiting. The last 4 MB are kept.
        read_end, write_end = os.pipe()
        fcntl.fcntl(write_end, F_SETPIPE_SZ, 1 << 20)
        proc = subprocess.Popen(argv, env=env, stdout=write_end, stderr=write_end, cwd="/")
        os.close(write_end)
        self.collectors.append(subprocess.Popen(pinned(LOAD_CPU, ["tail", "-c", "4000000"]), stdin=read_end, stdout=handle))
        os.close(read_end)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        for proc in self.procs:
            self.stop(proc)
        for collector in self.collectors:  # they end at the pipe's end, once their server is gone
            try:
                collector.wait(10)
            except subprocess.TimeoutExpired:
                self.stop(collector)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- set-up ----
    def token_service(self) -> tuple[str, int]:
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        cert.private_key_and_cert_chain_pem.write_to_path(str(self.tmp / "server.pem"))
        ca.cert_pem.write_to_path(str(self.tmp / "ca.pem"))
        os.chmod(self.tmp / "ca.pem", 0o644)
        port = free_port()
        self.start(pinned(LOAD_CPU, [sys.executable, str(HERE / "token_service.py"), str(port), str(self.tmp / "server.pem"), str(self.tmp / "server.pem")]), log="sts.log")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.01)
        return str(self.tmp / "ca.pem"), port

    def start_proxy(
        self, ca_file: str, sts_port: int, port: int, *, log_level: str = "info", log: str = "proxy.log",
        python: str | None = None, metrics: bool = True, identity_map: str | None = None,
        program: tuple[str, ...] = ("-m", "azwi_netproxy"), extra_env: dict[str, str] | None = None,
        probe: bool = False,
    ) -> tuple[subprocess.Popen[bytes], float]:
        """Start a proxy and wait for its first 200 on /readyz: (process, seconds from exec).

        `metrics` gives it --metrics-port (self.metrics_port), `identity_map` a map file.
        With `probe`, it is not polled: the postStart hook (`--probe`, run as the kubelet
        runs it, right after the container starts, on the same core, without the sidecar's
        environment) waits for it instead, and the seconds are until that hook returned.
        """
        token_file = self.tmp / "sa-token"
        token_file.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6ZGVmYXVsdDpiZW5jaCJ9.c2ln")
        os.chmod(token_file, 0o644)
        env = {
            **POD_ENV,
            "AZURE_TENANT_ID": TENANT,
            "AZURE_CLIENT_ID": CLIENT,
            "AZURE_FEDERATED_TOKEN_FILE": str(token_file),
            "AZURE_AUTHORITY_HOST": f"https://127.0.0.1:{sts_port}/",
            "SSL_CERT_FILE": ca_file,
            "METADATA_IP": "127.0.0.1",
            "METADATA_PORT": str(free_port()),
            "AZWI_PASSTHROUGH": "none",
            **(extra_env or {}),
        }
        if identity_map is not None:
            env["AZWI_IDENTITY_MAP"] = identity_map
        self.metrics_port = free_port()
        argv = [python or sys.executable, *program, f"--proxy-port={port}", f"--log-level={log_level}"]
        if metrics:
            argv.append(f"--metrics-port={self.metrics_port}")
        started = time.monotonic()
        proc = self.start(pinned(SERVER_CPU, [*AS_PROXY, *argv]), env=env, log=log, piped=True)
        if not probe:
            return proc, wait_ready(port)
        hook = [*AS_PROXY, python or sys.executable, "-m", "azwi_netproxy", f"--proxy-port={port}", "--probe"]
        done = subprocess.run(pinned(SERVER_CPU, hook), env=POD_ENV, capture_output=True, cwd="/", check=False)
        if done.returncode != 0:
            raise RuntimeError(f"the postStart probe failed: {done.stderr!r}")
        return proc, time.monotonic() - started

    # ---- figures ----
    def add(self, name: str, proxy: str, floor: str, ratio: str) -> None:
        self.rows.append((name, proxy, floor, ratio))

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append((name, ok, detail))

    def warm_proxy(
        self, ca_file: str, sts_port: int, log: str = "proxy.log", *, python: str | None = None,
        metrics: bool = True, identity_map: str | None = None, extra_env: dict[str, str] | None = None,
        program: tuple[str, ...] = ("-m", "azwi_netproxy"),
    ) -> tuple[subprocess.Popen[bytes], int, float, bytes]:
        """A proxy with its token cached and 2 s of load behind it: (process, port, readiness, body).

        With `metrics`, Prometheus has scraped it once, as it would have by then.
        """
        port = free_port()
        proxy, ready_s = self.start_proxy(
            ca_file, sts_port, port, log=log, python=python, metrics=metrics, identity_map=identity_map,
            extra_env=extra_env, program=program,
        )
        metrics_port = self.metrics_port
        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.request("GET", TOKEN_PATH, headers={"Metadata": "true"})
        warm = conn.getresponse()
        body = warm.read()
        assert warm.status == 200, body
        conn.close()
        wrk(f"http://127.0.0.1:{port}{TOKEN_PATH}", 16, 2)
        if metrics:
            scrape = http.client.HTTPConnection("127.0.0.1", metrics_port)
            scrape.request("GET", "/metrics")
            answer = scrape.getresponse()
            assert answer.status == 200, answer.read()
            answer.read()
            scrape.close()
        self.metrics_port = metrics_port
        return proxy, port, ready_s, body

    def warm_floor(
        self, log: str = "floor.log", script: str = "floor_server.py"
    ) -> tuple[subprocess.Popen[bytes], str, float]:
        port = free_port()
        floor = self.start(pinned(SERVER_CPU, [sys.executable, str(HERE / script), str(port)]), log=log)
        ready_s = wait_ready(port, "/")
        url = f"http://127.0.0.1:{port}{TOKEN_PATH}"
        wrk(url, 16, 2)
        return floor, url, ready_s

    def figure(
        self,
        label: str,
        connections: int,
        close: bool,
        proxies: list[tuple[int, str]],
        floors: list[tuple[int, str]],
        *,
        count_errors: bool = True,
        baselines: list[tuple[int, str]] | None = None,
    ) -> tuple[WrkResult, float, WrkResult, float]:
        """Each process's best run, and each side's median process.

        Proxy and floor runs alternate and each process keeps its best: a noisy neighbour
        then slows one run of each, not one side of the ratio. Who goes first swaps every
        round, so neither side always follows the other. With several processes a side,
        the median process is reported: processes of the same program differ here too.
        `baselines`, an earlier build's processes, join the same rounds; their median
        process goes into self.baseline_figures[label].
        """
        duration = self.args.duration
        sides = [proxies, floors] if baselines is None else [proxies, floors, baselines]
        order = [side for group in zip(*sides, strict=True) for side in group]
        runs: dict[int, list[tuple[WrkResult, float]]] = {pid: [] for pid, _ in order}
        for round_ in range(self.args.rounds):
            for pid, target in order if round_ % 2 == 0 else reversed(order):
                runs[pid].append(measured(pid, functools.partial(wrk, target, connections, duration, close=close)))
        best = {pid: max(pid_runs, key=lambda run: run[0].rps) for pid, pid_runs in runs.items()}

        def median_process(side: list[tuple[int, str]]) -> tuple[WrkResult, float]:
            ranked = sorted((best[pid] for pid, _ in side), key=lambda run: run[0].rps)
            return ranked[len(ranked) // 2]

        (p, p_cpu), (f, f_cpu) = median_process(proxies), median_process(floors)
        self.add(f"{label}: requests/s", f"{p.rps:,.0f}", f"{f.rps:,.0f}", f"{p.rps / f.rps:.2f}x")
        if baselines is not None:
            b, b_cpu = median_process(baselines)
            self.baseline_figures[label] = (b, b_cpu)
            self.add(
                f"{label}: the baseline build (proxy column), requests/s and CPU us/request",
                f"{b.rps:,.0f} / {b_cpu:.1f}",
                "",
                f"this build {p.rps / b.rps:.2f}x",
            )
            self.add(
                f"{label}: the baseline build's processes, best requests/s",
                " / ".join(f"{best[pid][0].rps / 1000:.1f}k" for pid, _ in baselines),
                "",
                "",
            )
        if len(proxies) > 1:
            self.add(
                f"{label}: best of each process, requests/s",
                " / ".join(f"{best[pid][0].rps / 1000:.1f}k" for pid, _ in proxies),
                " / ".join(f"{best[pid][0].rps / 1000:.1f}k" for pid, _ in floors),
                "",
            )
        self.add(f"{label}: p50 / p99 ms", f"{p.p50_ms:.3f} / {p.p99_ms:.3f}", f"{f.p50_ms:.3f} / {f.p99_ms:.3f}", "")
        self.add(f"{label}: server CPU us/request", f"{p_cpu:.1f}", f"{f_cpu:.1f}", f"{p_cpu / max(f_cpu, 1e-9):.2f}x")
        if CPUS > 1:
            # Which side ran out first: a server busy all the time is the limit; wrk's core
            # busy all the time while the server idles part of it is the load's limit.
            self.add(
                f"{label}: busy share of wrk's core / the server",
                f"{p.load_core_busy:.0%} / {p.rps * p_cpu / 1e6:.0%}",
                f"{f.load_core_busy:.0%} / {f.rps * f_cpu / 1e6:.0%}",
                "",
            )
        errors = sum(run.errors for pid, _ in proxies for run, _ in runs[pid])
        if errors and count_errors:
            self.check(f"{label}: no errors", False, f"{errors} errors")
        return p, p_cpu, f, f_cpu

    def parse_ceiling(
        self, floor_pid: int, floor_url: str
    ) -> tuple[tuple[WrkResult, float, WrkResult, float], tuple[WrkResult, float, WrkResult, float]]:
        """The parse floor against the floor, c=16 and a connection per request (rows of their own)."""
        parse_floor, parse_url, _ = self.warm_floor(log="parse-floor.log", script="parse_floor.py")
        try:
            sides = [(parse_floor.pid, parse_url)], [(floor_pid, floor_url)]
            # Like the floor, it closes as soon as it has answered, which wrk counts as read
            # errors; the proxy shuts its side first and does not get them.
            keep_alive = self.figure(
                "parse floor (proxy column) vs floor, keep-alive c=16", 16, False, *sides, count_errors=False
            )
            per_connection = self.figure(
                "parse floor (proxy column) vs floor, new connection c=16", 16, True, *sides, count_errors=False
            )
        finally:
            self.stop(parse_floor)
        return keep_alive, per_connection

    def run(self) -> int:
        ca_file, sts_port = self.token_service()
        baseline = self.args.readyz_baseline_python
        proxy, port, _, body = self.warm_proxy(ca_file, sts_port)
        url = f"http://127.0.0.1:{port}{TOKEN_PATH}"
        metrics_port = self.metrics_port
        floor, floor_url, _ = self.warm_floor()
        floor_rss, floor_anon = rss_mb(floor.pid), anonymous_mb(floor.pid)

        results: dict[str, tuple[WrkResult, float, WrkResult, float]] = {}
        for label, connections, close in (
            ("keep-alive c=1", 1, False),
            ("keep-alive c=16", 16, False),
            ("keep-alive c=64", 64, False),
            ("new connection per request c=16", 16, True),
        ):
            proxies, floors = [(proxy.pid, url)], [(floor.pid, floor_url)]
            baselines: list[tuple[int, str]] | None = None
            extra: list[subprocess.Popen[bytes]] = []
            if label == "keep-alive c=16":
                # The figure the guard is about: measured on several processes a side.
                for n in range(1, self.args.processes):
                    other, other_port, _, _ = self.warm_proxy(ca_file, sts_port, log=f"proxy-{n}.log")
                    other_floor, other_floor_url, _ = self.warm_floor(log=f"floor-{n}.log")
                    proxies.append((other.pid, f"http://127.0.0.1:{other_port}{TOKEN_PATH}"))
                    floors.append((other_floor.pid, other_floor_url))
                    extra += [other, other_floor]
                if baseline is not None:
                    baselines = []
                    for n in range(self.args.processes):
                        other, other_port, _, _ = self.warm_proxy(
                            ca_file, sts_port, log=f"baseline-{n}.log", python=baseline
                        )
                        baselines.append((other.pid, f"http://127.0.0.1:{other_port}{TOKEN_PATH}"))
                        extra.append(other)
            results[label] = self.figure(label, connections, close, proxies, floors, baselines=baselines)
            for process in extra:
                self.stop(process)
        ceiling = self.parse_ceiling(floor.pid, floor_url)
        self.stop(floor)
        self.add("body bytes", str(len(body)), "", "")
        self.footprint(ca_file, sts_port, floor_rss, floor_anon)

        ka16 = results["keep-alive c=16"]
        # Issue 18's rails against the floor (c=16 >= 0.75x, CPU per hit <= 1.4x, a
        # connection per request >= 0.8x) are retired (issue 25): the parse floor showed
        # that parsing alone uses most of them. Their figures stay in the table above.
        if "keep-alive c=16" in self.baseline_figures:
            # The throughput guard: a cache hit at c=16 against the baseline build, same rounds.
            base_rps = self.baseline_figures["keep-alive c=16"][0].rps
            self.check("cache hit c=16 >= 0.9x the baseline build", ka16[0].rps >= 0.9 * base_rps,
                       f"{ka16[0].rps:,.0f} / {base_rps:,.0f} = {ka16[0].rps / base_rps:.2f}x")
        # Not targets: what the floor that parses each request as the proxy must reaches
        # against the plain floor in this run, i.e. the best any such design can show.
        self.notes.append(
            "the parse floor (bench/parse_floor.py: httptools hands over the target and every header,"
            " nothing judged or logged) against the floor, the ceiling of any design that parses each"
            f" request: c=16 {ceiling[0][0].rps / ceiling[0][2].rps:.2f}x,"
            f" CPU per hit {ceiling[0][1] / ceiling[0][3]:.2f}x,"
            f" a connection per request {ceiling[1][0].rps / ceiling[1][2].rps:.2f}x"
        )

        self.cold_path(port, sts_port, ca_file)
        self.single_flight(port, sts_port, ca_file)
        if not self.args.quick:
            self.many_keys(proxy.pid, port)
        # Lines the log drain could not keep up with were dropped (and not written): say so.
        metrics = http.client.HTTPConnection("127.0.0.1", metrics_port)
        metrics.request("GET", "/metrics")
        text = metrics.getresponse().read().decode()
        dropped = re.search(r"^azwi_netproxy_log_dropped_lines_total (\S+)$", text, re.M)
        self.add("access lines dropped (stderr reader behind)", f"{float(dropped.group(1)) if dropped else float('nan'):,.0f}", "", "")
        self.report()
        return 0 if all(ok for _, ok, _ in self.checks) else 1

    def floor_start(self) -> tuple[float, float]:
        """The floor server started as the proxy is (uid 1501, -OO, a pod's HOME): seconds to
        its first answer and the CPU it took, the least any server on this stack needs."""
        port = free_port()
        argv = [*AS_PROXY, sys.executable, str(HERE / "floor_server.py"), str(port)]
        floor = self.start(pinned(SERVER_CPU, argv), env=POD_ENV, log="floor-start.log")
        ready_s = wait_ready(port, "/")
        cpu_s = cpu_seconds(floor.pid)
        self.stop(floor)
        return ready_s, cpu_s

    def module_cost(self, code: str) -> float:
        """Anonymous MB that `code` (importing a module) adds to a process that has imported
        what a warm proxy has: that module's own cost, for the configurations that need it."""
        script = (
            "import sys\n"
            "def anon():\n"
            "    for line in open('/proc/self/smaps_rollup'):\n"
            "        if line.startswith('Anonymous:'):\n"
            "            return int(line.split()[1]) / 1024\n"
            "import azwi_netproxy.cli, azwi_netproxy.proxy.files, azwi_netproxy.proxy.run\n"
            "import httpx, anyio._backends._asyncio\n"
            "before = anon()\n"
            "exec(sys.argv[1])\n"
            "print(anon() - before)\n"
        )
        done = subprocess.run([sys.executable, "-c", script, code], env=POD_ENV, capture_output=True, text=True,
                              check=True, cwd="/")
        return float(done.stdout.split()[-1])

    def footprint(self, ca_file: str, sts_port: int, floor_rss: float, floor_anon: float) -> None:
        """What each pod pays, in four configurations: memory after warm-up (its token cached,
        2 s of hits behind it, scraped once with --metrics-port), exec to the first 200 on
        /readyz and the CPU it took, and the first token request right after it (a miss:
        the exchange, with what start-up left for later). The baseline build's starts
        alternate with this build's; the floor is started as the proxy is."""
        baseline = self.args.readyz_baseline_python
        builds: list[tuple[str, str | None]] = [("this build", None)]
        if baseline is not None:
            builds.append(("baseline", baseline))
        configs = proxy_configs(self.tmp)
        map_file = configs["YAML identity map"]["identity_map"]
        memory: dict[tuple[str, str], tuple[float, float]] = {}
        starts: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        gates: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        for config, options in configs.items():
            for build, python in builds:
                proc, _, _, _ = self.warm_proxy(
                    ca_file, sts_port, log="footprint.log", python=python,
                    metrics=options.get("metrics", False), identity_map=options.get("identity_map"),
                    extra_env=options.get("extra_env"),
                )
                memory[(config, build)] = (anonymous_mb(proc.pid), rss_mb(proc.pid))
                self.stop(proc)
            for round_ in range(self.args.starts):
                for build, python in builds if round_ % 2 == 0 else list(reversed(builds)):
                    port = free_port()
                    proc, ready_s = self.start_proxy(
                        ca_file, sts_port, port, log="start.log", python=python,
                        metrics=options.get("metrics", False), identity_map=options.get("identity_map"),
                        extra_env=options.get("extra_env"),
                    )
                    cpu_s = cpu_seconds(proc.pid)
                    first_token_s = token_seconds(port)
                    self.stop(proc)
                    starts.setdefault((config, build), []).append((ready_s, cpu_s, first_token_s))
                    if config not in BASES:
                        continue
                    # As in a pod: the postStart hook polls, the app's container starts when
                    # it returns, and the app asks for its first token some time later.
                    port = free_port()
                    proc, gate_s = self.start_proxy(
                        ca_file, sts_port, port, log="start.log", python=python, metrics=False,
                        extra_env=options.get("extra_env"), probe=True,
                    )
                    time.sleep(APP_START_S)
                    later_token_s = token_seconds(port)
                    self.stop(proc)
                    gates.setdefault((config, build), []).append((gate_s, 0.0, later_token_s))
        floor_starts = [self.floor_start() for _ in range(self.args.starts)]
        floor_ready_ms = statistics.median(r for r, _ in floor_starts) * 1000
        floor_cpu_ms = statistics.median(c for _, c in floor_starts) * 1000
        costs = {
            "--metrics-port": self.module_cost(
                "import prometheus_client, prometheus_client.exposition, prometheus_client.process_collector"
            ),
            "YAML identity map": self.module_cost(f"import yaml; yaml.safe_load(open({map_file!r}).read())"),
        }

        def ms(samples: list[tuple[float, float, float]], index: int) -> tuple[float, float, float]:
            values = [sample[index] * 1000 for sample in samples]
            return statistics.median(values), min(values), max(values)

        for config in configs:
            anon, rss = memory[(config, "this build")]
            self.add(f"[{config}] anonymous memory after warm-up MB", f"{anon:.1f}", f"{floor_anon:.1f}",
                     f"{anon / floor_anon:.2f}x")
            self.add(f"[{config}] RSS after warm-up MB", f"{rss:.1f}", f"{floor_rss:.1f}", f"{rss / floor_rss:.2f}x")
            if config in costs:
                base_anon = memory[("pass-through off", "this build")][0]
                self.add(f"[{config}]   over pass-through off's / its module's own cost MB",
                         f"+{anon - base_anon:.2f}", f"{costs[config]:.2f}", "")
            ready, ready_min, ready_max = ms(starts[(config, "this build")], 0)
            cpu = ms(starts[(config, "this build")], 1)[0]
            token = ms(starts[(config, "this build")], 2)[0]
            n = len(starts[(config, "this build")])
            first = config in BASES
            self.add(f"[{config}] exec to first 200 on /readyz ms (median of {n}, range)",
                     f"{ready:.0f} ({ready_min:.0f}-{ready_max:.0f})", f"{floor_ready_ms:.0f}" if first else "", "")
            self.add(f"[{config}] CPU to first /readyz ms (median)", f"{cpu:.1f}", f"{floor_cpu_ms:.1f}" if first else "",
                     f"{cpu / floor_cpu_ms:.2f}x" if first else "")
            self.add(f"[{config}] first token request right after /readyz ms (median)", f"{token:.1f}", "", "")
            if config in BASES:
                gate, gate_min, gate_max = ms(gates[(config, "this build")], 0)
                later = ms(gates[(config, "this build")], 2)[0]
                self.add(f"[{config}] exec to the postStart probe's return ms (median, range)",
                         f"{gate:.0f} ({gate_min:.0f}-{gate_max:.0f})", "", "")
                self.add(f"[{config}] first token request {APP_START_S:.1f} s after the probe returned ms (median)",
                         f"{later:.1f}", "", "")
            if baseline is not None:
                b_anon, b_rss = memory[(config, "baseline")]
                b_ready = ms(starts[(config, "baseline")], 0)
                b_cpu = ms(starts[(config, "baseline")], 1)[0]
                b_token = ms(starts[(config, "baseline")], 2)[0]
                self.add(f"[{config}]   the baseline build: anonymous / RSS MB", f"{b_anon:.1f} / {b_rss:.1f}", "",
                         f"this build {anon - b_anon:+.1f} / {rss - b_rss:+.1f}")
                self.add(f"[{config}]   the baseline build: exec to first /readyz ms (median, range)",
                         f"{b_ready[0]:.0f} ({b_ready[1]:.0f}-{b_ready[2]:.0f})", "", f"this build {ready / b_ready[0]:.2f}x")
                self.add(f"[{config}]   the baseline build: CPU to first /readyz ms (median)", f"{b_cpu:.1f}", "",
                         f"this build {cpu / b_cpu:.2f}x")
                self.add(f"[{config}]   the baseline build: first token request ms (median)", f"{b_token:.1f}", "",
                         f"this build {token - b_token:+.1f} ms")
                if first:
                    self.check(f"exec to first /readyz <= 0.6x the baseline's ({config}, medians)",
                               ready <= 0.6 * b_ready[0], f"{ready:.0f} / {b_ready[0]:.0f} ms = {ready / b_ready[0]:.2f}x"
                               f" (CPU {cpu:.1f} / {b_cpu:.1f} ms = {cpu / b_cpu:.2f}x; the floor's CPU"
                               f" {floor_cpu_ms:.1f} ms = {floor_cpu_ms / b_cpu:.2f}x)")
                self.check(f"first token request right after /readyz no more than 10 ms slower than the baseline's ({config})",
                           token <= b_token + 10, f"{token:.1f} / {b_token:.1f} ms")
                if config in BASES:
                    b_gate = ms(gates[(config, "baseline")], 0)
                    b_later = ms(gates[(config, "baseline")], 2)[0]
                    self.add(f"[{config}]   the baseline build: exec to the probe's return ms (median, range)",
                             f"{b_gate[0]:.0f} ({b_gate[1]:.0f}-{b_gate[2]:.0f})", "", f"this build {gate / b_gate[0]:.2f}x")
                    self.add(f"[{config}]   the baseline build: first token {APP_START_S:.1f} s after the probe ms (median)",
                             f"{b_later:.1f}", "", f"this build {later - b_later:+.1f} ms")
                    self.check(f"first token request {APP_START_S:.1f} s after the probe returned no more than 10 ms"
                               f" slower than the baseline's ({config})", later <= b_later + 10,
                               f"{later:.1f} / {b_later:.1f} ms")
            elif first:
                self.check(f"exec to first 200 on /readyz < 200 ms ({config}, median)", ready < 200, f"{ready:.0f} ms")
            if first:
                self.check(f"anonymous memory after warm-up <= 1.1x the floor's ({config})",
                           anon <= 1.1 * floor_anon, f"{anon:.1f} / {floor_anon:.1f} MB = {anon / floor_anon:.2f}x")
                self.check(f"RSS after warm-up <= the floor's ({config})",
                           rss <= floor_rss, f"{rss:.1f} / {floor_rss:.1f} MB = {rss / floor_rss:.2f}x")
                self.check(f"RSS after warm-up <= 30 MB ({config})", rss <= 30,
                           f"{rss:.1f} MB (anonymous {anon:.1f} MB)")
            if config in costs:
                over = anon - memory[("pass-through off", "this build")][0]
                # The allowance: the module's own import, and 0.3 MB for what the proxy
                # keeps of it (the registry and its collector, the parsed map).
                self.check(f"{config} costs no more than its module (+0.3 MB)", over <= costs[config] + 0.3,
                           f"+{over:.2f} MB, the module {costs[config]:.2f} MB")

    def cold_path(self, port: int, sts_port: int, ca_file: str) -> None:
        """Latency of a cache miss at the app, minus the token service's own latency.

        Three rounds of 300 misses, each miss paired with the same POST sent straight to
        the token service; the best round's medians are kept, as for the other figures.
        """
        context = ssl.create_default_context(cafile=ca_file)
        direct = http.client.HTTPSConnection("127.0.0.1", sts_port, context=context)
        form = "grant_type=client_credentials&client_id=x&scope=s&client_assertion_type=t&client_assertion=a"
        via = http.client.HTTPConnection("127.0.0.1", port)
        rounds: list[tuple[float, float]] = []
        for round_ in range(3):
            sts_times, app_times = [], []
            for i in range(300):
                started = time.perf_counter()
                direct.request("POST", f"/{TENANT}/oauth2/v2.0/token", body=form, headers={"Content-Type": "application/x-www-form-urlencoded"})
                direct.getresponse().read()
                sts_times.append(time.perf_counter() - started)
                started = time.perf_counter()
                via.request("GET", TOKEN_PATH.replace("management.azure.com/", f"cold-{round_}-{i}.example/"), headers={"Metadata": "true"})
                response = via.getresponse()
                response.read()
                app_times.append(time.perf_counter() - started)
                assert response.status == 200
            rounds.append((statistics.median(app_times) * 1000, statistics.median(sts_times) * 1000))
        app, sts = min(rounds, key=lambda r: r[0] - r[1])
        spread = ", ".join(f"+{a - s:.2f}" for a, s in rounds)
        self.add("cold path: app latency / token service latency ms (median, best of 3)", f"{app:.3f}", f"{sts:.3f}", f"+{app - sts:.3f} ms ({spread})")
        self.check("cold path adds < 2 ms", app - sts < 2, f"+{app - sts:.3f} ms")

    def single_flight(self, port: int, sts_port: int, ca_file: str) -> None:
        def exchanges() -> int:
            conn = http.client.HTTPSConnection("127.0.0.1", sts_port, context=ssl.create_default_context(cafile=ca_file))
            conn.request("GET", "/_stats")
            return int(json.loads(conn.getresponse().read())["exchanges"])

        async def one(path: str) -> int:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nConnection: close\r\n\r\n".encode())
            data = await reader.read()
            writer.close()
            return int(data.split(b" ", 2)[1])

        async def burst() -> list[int]:
            path = TOKEN_PATH.replace("management.azure.com/", "single-flight.example/")
            return await asyncio.gather(*(one(path) for _ in range(1000)))

        before = exchanges()
        statuses = asyncio.run(burst())
        made = exchanges() - before
        ok = sum(1 for s in statuses if s == 200)
        self.add("1000 concurrent misses of one key: exchanges (200s)", f"{made} ({ok})", "", "")
        self.check("1000 concurrent misses make one exchange", made == 1 and ok == 1000, f"{made} exchanges, {ok} ok")

    def many_keys(self, pid: int, port: int) -> None:
        """RSS growth over a million requests spread across 1000 (client, resource) keys."""
        paths = [
            f"/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://r{r}.example/&client_id=0000{c:04d}-0000-0000-0000-000000000000"
            for c in range(10)
            for r in range(100)
        ]
        script = self.tmp / "keys.lua"
        script.write_text(
            "local paths = {" + ",".join(json.dumps(p) for p in paths) + "}\n"
            "local i = 0\n"
            "request = function()\n  i = i % #paths + 1\n"
            '  return wrk.format("GET", paths[i], {["Metadata"] = "true"})\nend\n'
        )
        url = f"http://127.0.0.1:{port}/"
        wrk(url, 16, 3, script=str(script))  # every key fetched once, then cached
        before = rss_mb(pid)
        total, runs = 0, 0
        while total < 1_000_000 and runs < 20:
            result = wrk(url, 16, 10, script=str(script))
            total += result.requests
            runs += 1
        after = rss_mb(pid)
        self.add("RSS before / after 1M requests over 1000 keys MB", f"{before:.1f} / {after:.1f}", "", f"+{after - before:.2f} MB")
        self.check("RSS growth < 2 MB over 1M requests, 1000 keys", after - before < 2, f"+{after - before:.2f} MB ({total:,} requests)")

    def report(self) -> None:
        width = max(len(r[0]) for r in self.rows)
        print(f"\n{'figure':<{width}}  {'proxy':>22}  {'floor':>22}  ratio")
        for name, proxy, floor, ratio in self.rows:
            print(f"{name:<{width}}  {proxy:>22}  {floor:>22}  {ratio}")
        print("\ntargets:")
        for name, ok, detail in self.checks:
            print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}")
        for note in self.notes:
            print(f"  [NOTE] {note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=5, help="alternating runs per figure (best kept)")
    parser.add_argument(
        "--processes", type=int, default=3, help="proxy and floor processes for the c=16 figure (median reported)"
    )
    parser.add_argument("--quick", action="store_true", help="skip the million-request memory run")
    parser.add_argument("--starts", type=int, default=9, help="starts of each build in each configuration")
    parser.add_argument(
        "--readyz-baseline-python", default=None,
        help="the python of a venv holding an earlier build: its starts alternate with this build's, its "
        "memory is measured beside, and its processes join the c=16 rounds (the throughput guard)",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("bench: wrk is not installed (bench/run.sh installs it)", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 8192), hard), hard))
    bench = Bench(args)
    try:
        return bench.run()
    finally:
        bench.close()


if __name__ == "__main__":
    raise SystemExit(main())
