"""Node mode's benchmark: the node process's memory per pod, the time ADD adds, a cache hit.

Usage (as root, from the repository; bench/run.sh installs wrk and the venv first):
    bench/run.sh --node-mode [--pods 1,10,50,100] [--duration 4] [--rounds 5]
    python bench/node_mode.py ...                 (the same, with the venv's python)

What runs, all on this machine and nothing linked to any network:
- bench/token_service.py (HTTPS on the root namespace's loopback), as in bench/run.py;
- `azwi-netproxy-node` as root in the root namespace (its own "node" namespace, as a
  DaemonSet's hostNetwork), pinned to the server core, PYTHONOPTIMIZE=2 as the proxy image
  runs it, access lines into a pipe drained on the load core (bench/run.py's `start`);
- pods: one network namespace each (`ip netns add azbn-...`, lo only), a kubelet-style dir
  with a projected token (webhook v1.6 layout), enrolled by ADD: the CNI plugin run directly
  (`python -I -m azwi_netproxy.cni`, the command the agent's shim runs inside the agent's
  container, without the shim's nsenter), with the CNI_ variables and the annotations as
  containerd passes them. Each enrolled pod then gets one miss (an exchange) and one cache
  hit from curl inside its namespace, so its app and cache are warm;
- the sidecar, for the comparisons made in the same run: as bench/run.py's `start_proxy`
  runs it (uid 1501, PYTHONOPTIMIZE=2, the same pinning and pipe), but in a pod namespace of
  its own with its redirect rules (a CNI-mode ADD: the init container's rules), and a token
  service on that pod's loopback for its one exchange, so that both sides are measured in a
  pod's namespace with a nat table (conntrack on every packet) and wrk run the same way.

Figures:
1. the node process's anonymous memory (smaps_rollup) and RSS with each count of pods, the
   marginal cost per pod, and the process with the most pods against one sidecar's anonymous
   memory after the same warm-up (one miss, one hit);
2. the wall time of ADD for a node-mode pod, a CNI-mode pod (`azwi-netproxy.io/redirect`)
   and a pod that asked for nothing (the interpreter's floor), alternating, each in a fresh
   namespace: median and p99 over the largest pod count;
3. a cache hit at c=16 keep-alive: wrk inside the first node-mode pod's namespace against
   its listener (127.0.0.1:8000 there), and inside the sidecar's pod against the sidecar
   (127.0.0.1:8000 there), alternating rounds, best of each (bench/run.py's method). Both
   are reached on 127.0.0.1 directly: an app's packets to 169.254.169.254 take the same nat
   redirect in either mode.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import run as base  # bench/run.py (this script's directory is first on sys.path)

NODE_BINARY = Path(sys.executable).with_name("azwi-netproxy-node")
POD_PORT = 8000
TOKEN_URL = f"http://127.0.0.1:{POD_PORT}{base.TOKEN_PATH}"
CNI_VERSION = "1.0.0"
PREV_RESULT = {"cniVersion": CNI_VERSION, "interfaces": [{"name": "lo"}], "ips": [{"address": "127.0.0.1/8", "interface": 0}]}
TARGET_KB_PER_POD = 150
TARGET_VS_SIDECAR = 1.5
GUARD_HIT_RATIO = 0.8


@dataclass
class BenchPod:
    ns: str
    uid: str
    container_id: str
    index: int


def memory_kb(pid: int) -> tuple[int, int]:
    """(anonymous, RSS) in kB, from smaps_rollup: what the process pays alone, and in all."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Anonymous", "Rss"):
            values[key] = int(rest.split()[0])
    return values["Anonymous"], values["Rss"]


def percentile(samples: list[float], pct: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[pct - 1]


class NodeBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bench = base.Bench(args)
        self.tmp = self.bench.tmp
        self.run_dir = self.tmp / "run"
        self.pods_dir = self.tmp / "kubelet-pods"
        self.pods_dir.mkdir(mode=0o750)
        self.namespaces: list[str] = []
        self.tag = uuid.uuid4().hex[:6]

    def close(self) -> None:
        self.bench.close()
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "delete", ns], check=False, capture_output=True)

    # ---- pieces ----

    def start_node(self, ca_file: str, sts_port: int) -> subprocess.Popen[bytes]:
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "AZURE_TENANT_ID": base.TENANT,
            "AZURE_AUTHORITY_HOST": f"https://127.0.0.1:{sts_port}/",
            "SSL_CERT_FILE": ca_file,
            "AZWI_KUBELET_PODS_DIR": str(self.pods_dir),
            "AZWI_CNI_RUN_DIR": str(self.run_dir),
            "LOG_LEVEL": "info",
            # As the proxy image runs it (Dockerfile).
            "PYTHONOPTIMIZE": "2",
            "PYTHONNOUSERSITE": "1",
        }
        proc = self.bench.start(base.pinned(base.SERVER_CPU, [str(NODE_BINARY)]), env=env, log="node.log", piped=True)
        deadline = time.monotonic() + 20
        while subprocess.run([str(NODE_BINARY), "--check"], env=env, capture_output=True, check=False).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the node process never became ready: {(self.tmp / 'node.log').read_text()[-2000:]}")
            time.sleep(0.05)
        return proc

    def new_pod(self, index: int, *, token: bool) -> BenchPod:
        ns = f"azbn-{self.tag}-{index}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        self.namespaces.append(ns)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        uid = str(uuid.uuid4())
        if token:
            # The webhook v1.6 layout; the volume's name carries a hash, as the kubelet's does.
            token_dir = self.pods_dir / uid / "volumes" / "kubernetes.io~projected" / f"azure-identity-token-{uid[:5]}" / "token"
            token_dir.mkdir(parents=True)
            (token_dir / "azure-identity-token").write_text(
                "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6YmVuY2g6cG9kIn0.c2ln")
        return BenchPod(ns=ns, uid=uid, container_id=uuid.uuid4().hex, index=index)

    def drop_pod(self, pod: BenchPod) -> None:
        subprocess.run(["ip", "netns", "delete", pod.ns], check=False, capture_output=True)
        self.namespaces.remove(pod.ns)

    def add(self, pod: BenchPod, annotations: dict[str, str]) -> float:
        """ADD as the runtime runs the plugin: its wall time in seconds."""
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "CNI_COMMAND": "ADD",
            "CNI_CONTAINERID": pod.container_id,
            "CNI_NETNS": f"/run/netns/{pod.ns}",
            "CNI_IFNAME": "eth0",
            "CNI_PATH": "/opt/cni/bin",
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME=pod-{pod.index};"
                        f"K8S_POD_INFRA_CONTAINER_ID={pod.container_id};K8S_POD_UID={pod.uid}",
            "AZWI_CNI_RUN_DIR": str(self.run_dir),
        }
        config = {"cniVersion": CNI_VERSION, "name": "bench", "type": "azwi-netproxy",
                  "runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations}, "prevResult": PREV_RESULT}
        stdin = json.dumps(config, separators=(",", ":")).encode()
        argv = base.pinned(base.LOAD_CPU, [sys.executable, "-I", "-m", "azwi_netproxy.cni"])
        started = time.perf_counter()
        done = subprocess.run(argv, input=stdin, env=env, capture_output=True, check=False, cwd="/")
        took = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"ADD failed for {pod.ns}: {done.stdout.decode()} {done.stderr.decode()[-2000:]}")
        return took

    def warm(self, pod: BenchPod) -> None:
        """One miss (an exchange) and one cache hit, on one connection, from inside the pod."""
        statuses = self.get(pod, TOKEN_URL, TOKEN_URL)
        if statuses != ["200", "200"]:
            raise RuntimeError(f"pod {pod.ns} was not served: {statuses}")

    def start_sidecar(self) -> tuple[subprocess.Popen[bytes], BenchPod]:
        """The sidecar in a pod namespace of its own with its redirect rules (CNI mode's ADD:
        the init container's rules, uid 1501 exempt), as bench/run.py's `start_proxy` runs it
        (uid 1501, PYTHONOPTIMIZE=2, the server core, a drained pipe), with a token service
        on that pod's loopback for its one exchange."""
        pod = self.new_pod(20_000, token=False)
        self.add(pod, {"azwi-netproxy.io/redirect": "true"})
        sts_port = base.free_port()
        pem = str(self.tmp / "server.pem")
        self.bench.start(base.pinned(base.LOAD_CPU, ["ip", "netns", "exec", pod.ns, sys.executable,
                                                     str(base.HERE / "token_service.py"), str(sts_port), pem, pem]),
                         log="sidecar-sts.log")
        deadline = time.monotonic() + 10
        while self.get(pod, f"https://127.0.0.1:{sts_port}/_stats", "--cacert", str(self.tmp / "ca.pem")) != ["200"]:
            if time.monotonic() > deadline:
                raise RuntimeError("the sidecar's token service never answered")
            time.sleep(0.05)
        token_file = self.tmp / "sidecar-sa-token"
        token_file.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6YmVuY2g6c2lkZWNhciJ9.c2ln")
        os.chmod(token_file, 0o644)
        env = {
            "PATH": "/usr/bin:/bin",
            "AZURE_TENANT_ID": base.TENANT,
            "AZURE_CLIENT_ID": base.CLIENT,
            "AZURE_FEDERATED_TOKEN_FILE": str(token_file),
            "AZURE_AUTHORITY_HOST": f"https://127.0.0.1:{sts_port}/",
            "SSL_CERT_FILE": str(self.tmp / "ca.pem"),
            "AZWI_PASSTHROUGH": "none",
            "PYTHONOPTIMIZE": "2",
            "PYTHONNOUSERSITE": "1",
        }
        argv = ["ip", "netns", "exec", pod.ns, *base.AS_PROXY,
                sys.executable, "-m", "azwi_netproxy", f"--proxy-port={POD_PORT}", "--log-level=info"]
        proc = self.bench.start(base.pinned(base.SERVER_CPU, argv), env=env, log="sidecar.log", piped=True)
        deadline = time.monotonic() + 20
        while self.get(pod, f"http://127.0.0.1:{POD_PORT}/readyz") != ["200"]:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the sidecar never became ready")
            time.sleep(0.05)
        return proc, pod

    def get(self, pod: BenchPod, *urls_and_options: str) -> list[str]:
        """The status of each GET of the URLs, on one connection, from inside the pod (curl's
        options may follow)."""
        argv = ["ip", "netns", "exec", pod.ns, "curl", "-sS", "-w", "%{http_code} ", "-H", "Metadata: true"]
        for arg in urls_and_options:
            argv += ["-o", "/dev/null", arg] if "://" in arg else [arg]
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.split()

    # ---- the run ----

    def run(self) -> int:
        bench = self.bench
        counts = sorted(int(n) for n in self.args.pods.split(","))
        ca_file, sts_port = bench.token_service()
        node = self.start_node(ca_file, sts_port)
        time.sleep(1.0)
        empty_anon, empty_rss = memory_kb(node.pid)

        # 1 and 2: enrol the pods one by one, timing each ADD beside a CNI-mode pod's and a
        # pod's that asked for nothing, and read the node process's memory at each count.
        node_mode = {"azwi-netproxy.io/node-proxy": "true",
                     "azwi-netproxy.io/client-id": base.CLIENT}
        cni_mode = {"azwi-netproxy.io/redirect": "true"}
        times: dict[str, list[float]] = {"node": [], "cni": [], "none": []}
        pods: list[BenchPod] = []
        memory: dict[int, tuple[int, int]] = {}
        for index in range(counts[-1]):
            for kind in ("node", "cni", "none") if index % 2 == 0 else ("none", "cni", "node"):
                if kind == "node":
                    pod = self.new_pod(index, token=True)
                    times["node"].append(self.add(pod, node_mode))
                    self.warm(pod)
                    pods.append(pod)
                else:
                    other = self.new_pod(10_000 + index, token=False)
                    times[kind].append(self.add(other, cni_mode if kind == "cni" else {}))
                    self.drop_pod(other)
            if len(pods) in counts:
                time.sleep(1.0)  # late access lines flushed, the sweeper's second passed
                memory[len(pods)] = memory_kb(node.pid)

        # The sidecar after the same warm-up as each pod: one miss, one hit.
        sidecar, sidecar_pod = self.start_sidecar()
        self.warm(sidecar_pod)
        time.sleep(1.0)
        sidecar_anon, sidecar_rss = memory_kb(sidecar.pid)

        # 3: a cache hit at c=16, each from inside its pod, alternating, best of each.
        first = pods[0]
        for ns in (first.ns, sidecar_pod.ns):
            base.wrk(TOKEN_URL, 16, 2, netns=ns)
        runs: dict[str, list[tuple[base.WrkResult, float]]] = {"node": [], "sidecar": []}
        for round_ in range(self.args.rounds):
            order = [("node", node.pid, first.ns), ("sidecar", sidecar.pid, sidecar_pod.ns)]
            for kind, pid, ns in order if round_ % 2 == 0 else reversed(order):
                runs[kind].append(base.measured(pid, functools.partial(base.wrk, TOKEN_URL, 16, self.args.duration, netns=ns)))
        best = {kind: max(results, key=lambda r: r[0].rps) for kind, results in runs.items()}
        after_load = {"node": memory_kb(node.pid), "sidecar": memory_kb(sidecar.pid)}

        self.report(counts, (empty_anon, empty_rss), memory, (sidecar_anon, sidecar_rss), times, best, after_load)
        return 0 if all(ok for _, ok, _ in bench.checks) else 1

    def report(
        self,
        counts: list[int],
        empty: tuple[int, int],
        memory: dict[int, tuple[int, int]],
        sidecar: tuple[int, int],
        times: dict[str, list[float]],
        best: dict[str, tuple[base.WrkResult, float]],
        after_load: dict[str, tuple[int, int]],
    ) -> None:
        bench = self.bench
        mb = 1024
        print("\nnode process memory (smaps_rollup), each pod warm (one exchange, one cache hit):")
        print(f"{'pods':>6}  {'anonymous MB':>12}  {'RSS MB':>8}  {'KB per pod since the previous row':>34}")
        print(f"{0:>6}  {empty[0] / mb:>12.2f}  {empty[1] / mb:>8.2f}")
        previous = None
        for n in counts:
            anon, rss = memory[n]
            step = "" if previous is None else f"{(anon - memory[previous][0]) / (n - previous):.1f}"
            print(f"{n:>6}  {anon / mb:>12.2f}  {rss / mb:>8.2f}  {step:>34}")
            previous = n
        low, high = counts[0], counts[-1]
        per_pod = (memory[high][0] - memory[low][0]) / (high - low)
        per_pod_rss = (memory[high][1] - memory[low][1]) / (high - low)
        print(f"one sidecar (same warm-up): anonymous {sidecar[0] / mb:.2f} MB, RSS {sidecar[1] / mb:.2f} MB")
        ratio = memory[high][0] / sidecar[0]
        bench.check(f"marginal anonymous memory per pod <= {TARGET_KB_PER_POD} KB ({low} to {high} pods)",
                    per_pod <= TARGET_KB_PER_POD, f"{per_pod:.1f} KB (RSS {per_pod_rss:.1f} KB)")
        bench.check(f"node process with {high} pods < {TARGET_VS_SIDECAR}x one sidecar's anonymous memory",
                    ratio < TARGET_VS_SIDECAR,
                    f"{memory[high][0] / mb:.2f} MB / {sidecar[0] / mb:.2f} MB = {ratio:.2f}x")

        print(f"\nADD wall time over {len(times['node'])} pods each (the plugin run directly, alternating):")
        for kind, label in (("node", "node mode"), ("cni", "CNI mode (redirect)"), ("none", "a pod that asked nothing")):
            samples = [t * 1000 for t in times[kind]]
            print(f"  {label:<26} median {statistics.median(samples):7.1f} ms   p99 {percentile(samples, 99):7.1f} ms")
        node_med = statistics.median(times["node"]) * 1000
        cni_med = statistics.median(times["cni"]) * 1000
        print(f"  node mode adds {node_med - cni_med:+.1f} ms (median) to CNI mode's ADD")

        node_hit, sidecar_hit = best["node"], best["sidecar"]
        hit_ratio = node_hit[0].rps / sidecar_hit[0].rps
        print(f"\ncache hit, keep-alive c=16 (best of {self.args.rounds} runs of {self.args.duration:g} s):")
        for kind, (result, cpu) in best.items():
            print(f"  {kind:<8} {result.rps:>9,.0f} req/s  p50 {result.p50_ms:.3f} ms  p99 {result.p99_ms:.3f} ms  "
                  f"server CPU {cpu:.1f} us/request  errors {result.errors}")
        print(f"  after the load: node process anonymous {after_load['node'][0] / mb:.2f} MB "
              f"(RSS {after_load['node'][1] / mb:.2f}), sidecar anonymous {after_load['sidecar'][0] / mb:.2f} MB "
              f"(RSS {after_load['sidecar'][1] / mb:.2f})")
        bench.check(f"cache hit c=16 through node mode >= {GUARD_HIT_RATIO}x the sidecar's", hit_ratio >= GUARD_HIT_RATIO,
                    f"{node_hit[0].rps:,.0f} / {sidecar_hit[0].rps:,.0f} = {hit_ratio:.2f}x")
        print("\ntargets:")
        for name, ok, detail in bench.checks:
            print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", default="1,10,50,100", help="pod counts at which memory is read (the largest: how many)")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=5, help="alternating runs of the cache-hit figure (best kept)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/node_mode.py: needs root (network namespaces, setns)", file=sys.stderr)
        return 2
    # setpriv too: without it base.AS_PROXY is empty and the sidecar would run as root.
    for tool in ("wrk", "curl", "ip", "nft", "setpriv"):
        if shutil.which(tool) is None:
            print(f"bench/node_mode.py: {tool} is not installed (bench/run.sh installs wrk)", file=sys.stderr)
            return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 8192), hard), hard))
    node_bench = NodeBench(args)
    try:
        return node_bench.run()
    finally:
        node_bench.close()


if __name__ == "__main__":
    raise SystemExit(main())
