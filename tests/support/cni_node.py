"""A node for the CNI plugin: the real agent in its own mount namespace, and a runtime that
calls a conflist's plugins as libcni does.

Name: support.cni_node
Scope: `node()` builds a node in a temp dir (CNI bin dir, conf dir, run dir) and removes
    it, and stops the agent by PID, when its `with` block ends.
Depends: root (mount namespaces, netfilter in the pods' namespaces), util-linux's
    `unshare` and `nsenter`, the reference CNI plugins (Debian's containernetworking-plugins,
    /usr/lib/cni), the package's `azwi-netproxy-cni-agent` in this venv.

The agent runs as the DaemonSet runs it: `azwi-netproxy-cni-agent` as root in a mount
namespace of its own (`unshare --mount`), writing the shim into a bin dir that holds
nothing else, chaining the conflist that the test wrote as the cluster's network plugin
would. `Runtime` is what containerd's libcni does with a conflist, written from the CNI
spec ("Execution of Network Configurations", section "Attachment"): each plugin gets the
list's `name` and `cniVersion`, `runtimeConfig` for the capabilities it declares, and the
previous plugin's result as `prevResult`; DEL goes in reverse order. The plugins run with
only the CNI_ variables in their environment: whatever they need beyond that they must
bring themselves.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from support.proxyproc import stop_process

REFERENCE_PLUGINS: Final = Path("/usr/lib/cni")
AGENT: Final = Path(sys.executable).with_name("azwi-netproxy-cni-agent")
CONFLIST_NAME: Final = "10-cluster.conflist"


@dataclass
class Outcome:
    """One plugin call: exit code, stdout as JSON (or None), stderr."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def body(self) -> Any:
        return json.loads(self.stdout) if self.stdout.strip() else None

    def __str__(self) -> str:
        return f"exit {self.returncode}\nstdout: {self.stdout}\nstderr: {self.stderr[-2000:]}"


@dataclass
class Node:
    base: Path
    bin_dir: Path
    conf_dir: Path
    run_dir: Path
    agent_log: Path
    agent: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def conflist_path(self) -> Path:
        return self.conf_dir / CONFLIST_NAME

    def conflist(self) -> dict[str, Any]:
        return dict(json.loads(self.conflist_path.read_text()))

    def write_conflist(self, conflist: Mapping[str, Any]) -> None:
        """As a cluster's network agent writes its conflist: a new file renamed into place."""
        staged = self.conf_dir / f".{CONFLIST_NAME}.staged"
        staged.write_text(json.dumps(conflist, indent=2))
        staged.rename(self.conflist_path)

    def agent_env(self, **extra: str) -> dict[str, str]:
        return {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "AZWI_CNI_BIN_DIR": str(self.bin_dir),
            "AZWI_CNI_CONF_DIR": str(self.conf_dir),
            "AZWI_CNI_RUN_DIR": str(self.run_dir),
            "AZWI_CNI_INTERVAL_S": "0.2",
            "LOG_LEVEL": "debug",
            **self.env,
            **extra,
        }

    def agent_check(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(AGENT), "--check", *args], env=self.agent_env(**extra),
                              capture_output=True, text=True, timeout=30, check=False)

    def start_agent(self, *args: str, ready_timeout_s: float = 20.0, **extra: str) -> None:
        """Start the agent (in its own mount namespace) and wait until it reports ready."""
        assert self.agent is None or self.agent.poll() is not None, "an agent is already running"
        log = self.agent_log.open("ab")
        self.agent = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", str(AGENT), *args],
            env=self.agent_env(**extra), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            cwd="/",
        )
        log.close()
        deadline = time.monotonic() + ready_timeout_s
        done = self.agent_check(*args, **extra)
        while done.returncode != 0:
            if self.agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the CNI agent never became ready:\n{done.stdout}\n"
                                   f"{self.agent_log.read_text()[-3000:]}")
            time.sleep(0.1)
            done = self.agent_check(*args, **extra)

    def stop_agent(self) -> int | None:
        """Stop the agent we started, by its PID (SIGTERM, as the kubelet does); its exit code
        (None if none was running)."""
        agent, self.agent = self.agent, None
        if agent is None:
            return None
        stop_process(agent, timeout_s=10)
        return agent.returncode


@contextlib.contextmanager
def node(conflist: Mapping[str, Any]) -> Iterator[Node]:
    """A node whose cluster network config is `conflist`; the agent not yet started."""
    base = Path(tempfile.mkdtemp(prefix="azwi-cni-node-"))
    made = Node(base=base, bin_dir=base / "opt-cni-bin", conf_dir=base / "etc-cni-net.d",
                run_dir=base / "var-run-azwi-netproxy", agent_log=base / "agent.log")
    try:
        made.bin_dir.mkdir()
        made.conf_dir.mkdir()
        made.write_conflist(conflist)
        yield made
    finally:
        made.stop_agent()
        shutil.rmtree(base, ignore_errors=True)


def cluster_conflist(cni_version: str = "1.0.0", name: str = "cluster") -> dict[str, Any]:
    """What a cluster's network plugin writes, reduced to the reference loopback plugin."""
    return {"cniVersion": cni_version, "name": name, "plugins": [{"type": "loopback"}]}


class Runtime:
    """libcni's handling of one conflist, for one container (module docstring)."""

    def __init__(self, bin_dirs: Sequence[Path], *, container_id: str, netns: str,
                 ifname: str = "eth0", annotations: Mapping[str, str] | None = None,
                 args: Mapping[str, str] | None = None) -> None:
        self.path = ":".join(str(d) for d in bin_dirs)
        self.container_id = container_id
        self.netns = netns
        self.ifname = ifname
        self.annotations = dict(annotations or {})
        # CNI_ARGS, as the CRI plugins set them (K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_UID).
        self.args = dict(args or {})
        self.cached: Any = None  # the ADD result, which DEL and CHECK get as prevResult

    def _find(self, plugin_type: str) -> Path:
        for directory in self.path.split(":"):
            candidate = Path(directory) / plugin_type
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
        raise FileNotFoundError(f"no plugin {plugin_type!r} in {self.path}")

    def plugin_config(self, conflist: Mapping[str, Any], plugin: Mapping[str, Any],
                      prev: Any) -> dict[str, Any]:
        config = {**plugin, "name": conflist["name"], "cniVersion": conflist["cniVersion"]}
        capabilities = plugin.get("capabilities") or {}
        runtime_config = {}
        if capabilities.get("io.kubernetes.cri.pod-annotations"):
            runtime_config["io.kubernetes.cri.pod-annotations"] = self.annotations
        if runtime_config:
            config["runtimeConfig"] = runtime_config
        config.pop("capabilities", None)
        if prev is not None:
            config["prevResult"] = prev
        return config

    def call(self, command: str, plugin_type: str, config: Mapping[str, Any] | bytes,
             *, netns: str | None = None) -> Outcome:
        """Exec one plugin as the runtime does: CNI_ variables only, config on stdin."""
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": self.container_id,
            "CNI_NETNS": self.netns if netns is None else netns,
            "CNI_IFNAME": self.ifname,
            "CNI_PATH": self.path,
        }
        if self.args:
            # containerd's order and its IgnoreUnknown, which tells plugins to skip keys they do not know.
            env["CNI_ARGS"] = ";".join(["IgnoreUnknown=1", *(f"{k}={v}" for k, v in self.args.items())])
        # Compact, as Go's encoding/json (libcni) writes it.
        stdin = config if isinstance(config, bytes) else json.dumps(config, separators=(",", ":")).encode()
        done = subprocess.run([str(self._find(plugin_type))], input=stdin, env=env,
                              capture_output=True, timeout=60, check=False, cwd="/")
        return Outcome(done.returncode, done.stdout.decode(errors="replace"),
                       done.stderr.decode(errors="replace"))

    def add(self, conflist: Mapping[str, Any]) -> Outcome:
        prev: Any = None
        outcome = Outcome(0, "", "")
        for plugin in conflist["plugins"]:
            outcome = self.call("ADD", plugin["type"], self.plugin_config(conflist, plugin, prev))
            if outcome.returncode != 0:
                return outcome
            prev = outcome.body
        self.cached = prev
        return outcome

    def check(self, conflist: Mapping[str, Any]) -> Outcome:
        outcome = Outcome(0, "", "")
        for plugin in conflist["plugins"]:
            outcome = self.call("CHECK", plugin["type"],
                                self.plugin_config(conflist, plugin, self.cached))
            if outcome.returncode != 0:
                return outcome
        return outcome

    def delete(self, conflist: Mapping[str, Any], *, netns: str | None = None) -> Outcome:
        outcome = Outcome(0, "", "")
        for plugin in reversed(conflist["plugins"]):
            outcome = self.call("DEL", plugin["type"],
                                self.plugin_config(conflist, plugin, self.cached), netns=netns)
            if outcome.returncode != 0:
                return outcome
        return outcome
