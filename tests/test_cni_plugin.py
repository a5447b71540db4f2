"""The CNI plugin driven as a runtime drives it, on a node set up as the DaemonSet sets it up.

Name: test_cni_plugin
Scope: module (`cni_node`: one node, its agent running; `cni_pod`: one whole pod per
    backend whose rules the plugin's ADD installed), function (the agent tests' own nodes).
Depends: root + netns + nft (the `root` marker), support.cni_node, support.pod (fake IMDS,
    fake Entra over HTTPS, the proxy as uid 1501, clients as uid 1000), the reference CNI
    plugins (Debian's containernetworking-plugins).

The plugin is only ever executed as the runtime would: from a CNI bin dir holding nothing
but the shim the agent wrote, with only the CNI_ variables in its environment and the
network configuration on stdin, for real network namespaces. What it did is judged by the
kernel (`nft list ruleset`, `iptables-legacy-save`), by where clients' traffic lands (the
fake IMDS records what reaches it, the fake Entra what it was asked for), and by the CNI
spec's words on results and errors, never by the plugin's own code.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from support import netns
from support.caps import CAN_NETNS, NETNS_SKIP_REASON
from support.cni_node import AGENT, REFERENCE_PLUGINS, Node, Runtime, cluster_conflist, node
from support.pod import TOKEN_URL, PodSandbox, build_pod
from support.proxyproc import new_guid

pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not CAN_NETNS, reason=NETNS_SKIP_REASON),
    pytest.mark.skipif(not (REFERENCE_PLUGINS / "loopback").exists(),
                       reason="the reference CNI plugins are missing (apt-get install containernetworking-plugins)"),
]

REDIRECT = {"azwi-netproxy.io/redirect": "true"}
# The spec's error object (section "Error"): these keys, the code a number.
ERROR_KEYS = {"cniVersion", "code", "msg", "details"}


def _runtime(node_: Node, ns: str, annotations: dict[str, str] | None = None) -> Runtime:
    return Runtime([node_.bin_dir, REFERENCE_PLUGINS], container_id=uuid.uuid4().hex,
                   netns=f"/run/netns/{ns}", annotations=annotations)


def _ours(conflist: dict[str, Any]) -> dict[str, Any]:
    return next(p for p in conflist["plugins"] if p["type"] == "azwi-netproxy")


def _with_ours(conflist: dict[str, Any], **settings: Any) -> dict[str, Any]:
    """The node's conflist with our entry's settings changed, as AZWI_CNI_PLUGIN_CONFIG would."""
    changed = json.loads(json.dumps(conflist))
    _ours(changed).update(settings)
    return changed


def _assert_error(outcome: Any, code: int) -> dict[str, Any]:
    assert outcome.returncode != 0, f"expected error code {code}, got success:\n{outcome}"
    body = json.loads(outcome.stdout)
    assert set(body) <= ERROR_KEYS and {"cniVersion", "code", "msg"} <= set(body), body
    assert isinstance(body["code"], int) and body["code"] == code, f"expected code {code}:\n{outcome}"
    assert body["msg"], body
    return body


def _loopback_result(node_: Node, conflist: dict[str, Any]) -> Any:
    """What the reference loopback plugin alone answers for a fresh namespace: our ADD
    must hand it on unchanged (the namespace's path differs per call, so it is blanked)."""
    with netns.namespace("azcnilo") as ns:
        runtime = _runtime(node_, ns)
        outcome = runtime.call("ADD", "loopback",
                               runtime.plugin_config(conflist, {"type": "loopback"}, None))
        assert outcome.returncode == 0, str(outcome)
        return _blank_sandbox(outcome.body)


def _blank_sandbox(result: Any) -> Any:
    result = json.loads(json.dumps(result))
    for interface in result.get("interfaces", []):
        interface.pop("sandbox", None)
    return result


# ---- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cni_node() -> Iterator[Node]:
    """Name: cni_node. Scope: module. The node with its agent running and ready."""
    with node(cluster_conflist()) as made:
        made.start_agent()
        yield made


@pytest.fixture(scope="module", params=["nftables", "iptables"])
def cni_pod(request: pytest.FixtureRequest, cni_node: Node, python_for_other_uids: str,
            package_pythonpath: str) -> Iterator[tuple[PodSandbox, Runtime, dict[str, Any]]]:
    """Name: cni_pod. Scope: module, once per backend. The whole pod, its rules from ADD."""
    conflist = _with_ours(cni_node.conflist(), backend=request.param)
    runtimes: list[Runtime] = []

    def add(sandbox: PodSandbox) -> None:
        runtime = _runtime(cni_node, sandbox.topo.pod, REDIRECT)
        outcome = runtime.add(conflist)
        assert outcome.returncode == 0, f"ADD failed:\n{outcome}"
        runtimes.append(runtime)

    with ExitStack() as stack:
        sandbox = build_pod(stack, str(request.param), python_for_other_uids, package_pythonpath,
                            redirect=add)
        yield sandbox, runtimes[0], conflist


@pytest.fixture
def pod(cni_pod: tuple[PodSandbox, Runtime, dict[str, Any]]
        ) -> Iterator[tuple[PodSandbox, Runtime, dict[str, Any]]]:
    """Name: pod. Scope: function. The module's pod, put back (rules by ADD, proxy up) after."""
    sandbox, runtime, conflist = cni_pod
    yield cni_pod
    if sandbox.snapshot() != sandbox.installed:
        sandbox._reset_netfilter()
        assert runtime.add(conflist).returncode == 0
        assert sandbox.snapshot() == sandbox.installed
    if sandbox.proxy is None or not sandbox.proxy.running():
        sandbox.start_proxy()


@pytest.fixture
def scratch_ns() -> Iterator[str]:
    """Name: scratch_ns. Scope: function. An empty namespace with lo up."""
    with netns.namespace("azcni") as ns:
        yield ns


# ---- the whole token flow through the plugin's rules --------------------------------------


def test_add_installs_the_redirect_and_apps_get_tokens(pod: tuple[PodSandbox, Runtime, dict[str, Any]],
                                                       cni_node: Node) -> None:
    sandbox, runtime, conflist = pod
    assert sandbox.installed != sandbox.pristine, "ADD installed nothing"
    table = "table ip azwi_proxy" if sandbox.backend == "nftables" else "-A OUTPUT"
    assert table in sandbox.installed, sandbox.installed
    # The result of the chain is the cluster plugin's, handed on unchanged.
    assert _blank_sandbox(runtime.cached) == _loopback_result(cni_node, conflist)
    before = len(sandbox.entra_exchanges())
    got = sandbox.curl(TOKEN_URL)
    assert got.status == 200, str(got)
    assert got.json()["token_type"] == "Bearer" and got.json()["access_token"]
    assert sandbox.exchange_of(got.json()["access_token"])["client_id"] == sandbox.identity.client_id
    sdk = sandbox.sdk_token("https://vault.azure.net/.default")
    assert sdk["token"]
    assert len(sandbox.entra_exchanges()) >= before + 2


def test_fails_closed_while_the_proxy_is_down(pod: tuple[PodSandbox, Runtime, dict[str, Any]]) -> None:
    sandbox = pod[0]
    sandbox.stop_proxy()
    seen = len(sandbox.imds_records())
    got = sandbox.curl(TOKEN_URL, max_time_s=3)
    assert got.status == 0 and got.exit_code != 0, str(got)
    assert len(sandbox.imds_records()) == seen, "a request reached the node's IMDS"


def test_check_passes_only_while_the_rules_are_in_place(pod: tuple[PodSandbox, Runtime, dict[str, Any]]) -> None:
    sandbox, runtime, conflist = pod
    assert runtime.check(conflist).returncode == 0
    sandbox._reset_netfilter()  # with nft and iptables-legacy themselves, not our code
    body = _assert_error(runtime.check(conflist), 101)
    assert "not in place" in body["msg"]
    assert runtime.add(conflist).returncode == 0
    assert sandbox.snapshot() == sandbox.installed
    assert runtime.check(conflist).returncode == 0


def test_del_removes_every_trace_and_tolerates_repeats(pod: tuple[PodSandbox, Runtime, dict[str, Any]]) -> None:
    sandbox, runtime, conflist = pod
    outcome = runtime.delete(conflist)
    assert outcome.returncode == 0 and outcome.stdout == "", str(outcome)
    assert sandbox.snapshot() == sandbox.pristine
    # Without the rules, uid 1000 reaches the (fake) node IMDS again: the redirect is gone.
    seen = len(sandbox.imds_records())
    sandbox.curl(TOKEN_URL, max_time_s=3)
    assert len(sandbox.imds_records()) == seen + 1
    assert runtime.delete(conflist).returncode == 0
    assert sandbox.snapshot() == sandbox.pristine


# ---- one plugin call at a time, in namespaces of their own -----------------------------------


def test_add_for_a_pod_that_did_not_ask_changes_nothing(cni_node: Node, scratch_ns: str) -> None:
    conflist = cni_node.conflist()
    before = netns.netfilter_snapshot(scratch_ns)
    for asked in ({}, {"azwi-netproxy.io/redirect": "false"}, {"other": "true"}):
        runtime = _runtime(cni_node, scratch_ns, asked)
        outcome = runtime.add(conflist)
        assert outcome.returncode == 0, str(outcome)
        assert _blank_sandbox(outcome.body) == _loopback_result(cni_node, conflist)
        assert netns.netfilter_snapshot(scratch_ns) == before
        assert runtime.delete(conflist).returncode == 0


def test_proxy_port_annotation_and_del_of_a_vanished_namespace(cni_node: Node) -> None:
    conflist = cni_node.conflist()
    with netns.namespace("azcnipt") as ns:
        runtime = _runtime(cni_node, ns, {**REDIRECT, "azwi-netproxy.io/proxy-port": "8123"})
        outcome = runtime.add(conflist)
        assert outcome.returncode == 0, str(outcome)
        listed = netns.run_in(ns, ["nft", "list", "table", "ip", "azwi_proxy"]).stdout
        assert "8123" in listed and "8000" not in listed, listed
    # The namespace is gone now: DEL (also with CNI_NETNS empty, as at RemovePodSandbox) succeeds.
    assert runtime.delete(conflist).returncode == 0
    assert runtime.delete(conflist, netns="").returncode == 0


def test_passthrough_none_annotation_installs_no_exemption(cni_node: Node, scratch_ns: str) -> None:
    """Judged by what the kernel lists: with "none" no rule names a uid; without it, one does."""
    conflist = cni_node.conflist()
    for passthrough, exempt in (("none", False), ("all", True)):
        runtime = _runtime(cni_node, scratch_ns, {**REDIRECT, "azwi-netproxy.io/passthrough": passthrough})
        outcome = runtime.add(conflist)
        assert outcome.returncode == 0, str(outcome)
        listed = netns.run_in(scratch_ns, ["nft", "list", "table", "ip", "azwi_proxy"]).stdout
        assert "redirect to :8000" in listed, listed
        assert ("skuid" in listed) is exempt, listed
        assert runtime.delete(conflist).returncode == 0


@pytest.mark.parametrize(
    ("change", "annotations", "code"),
    [
        ({"proxyPort": 0}, REDIRECT, 7),
        ({"proxyPort": "99999"}, REDIRECT, 7),
        ({"proxyUID": "root"}, REDIRECT, 7),
        ({"metadataIP": "169.254.169.254.1"}, REDIRECT, 7),
        ({"backend": "ebpf"}, REDIRECT, 7),
        ({"proxyport": 8001}, REDIRECT, 2),
        ({}, {"azwi-netproxy.io/redirect": "yes"}, 7),
        ({}, {**REDIRECT, "azwi-netproxy.io/proxy-port": "http"}, 7),
        ({}, {**REDIRECT, "azwi-netproxy.io/passthrough": "some"}, 7),
        ({"cniVersion": "2.0.0"}, REDIRECT, 1),
    ],
)
def test_bad_config_is_refused_and_changes_nothing(cni_node: Node, scratch_ns: str, change: dict[str, Any],
                                                   annotations: dict[str, str], code: int) -> None:
    conflist = cni_node.conflist()
    runtime = _runtime(cni_node, scratch_ns, annotations)
    config = runtime.plugin_config(conflist, _ours(conflist), {"cniVersion": "1.0.0"})
    config.update(change)
    before = netns.netfilter_snapshot(scratch_ns)
    _assert_error(runtime.call("ADD", "azwi-netproxy", config), code)
    assert netns.netfilter_snapshot(scratch_ns) == before


def test_garbage_on_stdin_and_missing_variables(cni_node: Node, scratch_ns: str) -> None:
    runtime = _runtime(cni_node, scratch_ns, REDIRECT)
    _assert_error(runtime.call("ADD", "azwi-netproxy", b"{not json"), 6)
    _assert_error(runtime.call("ADD", "azwi-netproxy", b"[1, 2]"), 6)
    _assert_error(runtime.call("GC-ALL", "azwi-netproxy", b"{}"), 4)
    config = runtime.plugin_config(cni_node.conflist(), _ours(cni_node.conflist()), None)
    _assert_error(runtime.call("ADD", "azwi-netproxy", config, netns=""), 4)
    _assert_error(runtime.call("ADD", "azwi-netproxy", config, netns="/run/netns/azcni-gone"), 3)


# ---- installing fails: ADD fails closed (code 100) and changes nothing ----------------------

# Holds table ip azwi_proxy as its owner (NFT_TABLE_F_OWNER): while its nft lives, the kernel
# refuses every other process any change to that table (EPERM), root's included. nft dies with
# this process (end of its stdin, and PR_SET_PDEATHSIG), and the table with nft.
_TABLE_OWNER = r"""
import ctypes, signal, subprocess, time
nft = subprocess.Popen(["nft", "-i"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, text=True,
                       preexec_fn=lambda: ctypes.CDLL(None).prctl(1, signal.SIGKILL))
nft.stdin.write("add table ip azwi_proxy { flags owner; }\n")
nft.stdin.flush()
while subprocess.run(["nft", "list", "table", "ip", "azwi_proxy"], capture_output=True).returncode:
    time.sleep(0.05)
print("ready", flush=True)
nft.wait()
"""


def test_add_fails_closed_when_the_kernel_refuses_the_rules(cni_node: Node, scratch_ns: str) -> None:
    """Another program owns a table by our name: the kernel refuses our transaction."""
    conflist = _with_ours(cni_node.conflist(), backend="nftables")
    with netns.processes() as procs:
        procs.start(scratch_ns, [netns.SYSTEM_PYTHON, "-c", _TABLE_OWNER], ready_line="ready")
        before = netns.netfilter_snapshot(scratch_ns)
        assert "flags owner" in before, before
        runtime = _runtime(cni_node, scratch_ns, REDIRECT)
        body = _assert_error(runtime.add(conflist), 100)
        assert "could not install" in body["msg"] and "not permitted" in body["details"], body
        assert netns.netfilter_snapshot(scratch_ns) == before
        # The runtime's DEL after the failed ADD succeeds (the sandbox must be removable),
        # and touches nothing it does not own.
        deleted = runtime.delete(conflist)
        assert deleted.returncode == 0, str(deleted)
        assert netns.netfilter_snapshot(scratch_ns) == before


def _real_files(pattern: str) -> list[str]:
    return sorted({str(Path(found).resolve()) for found in glob.glob(pattern)})


# What the agent's container lacks, per backend (an image built without nft, or without the
# C library python-iptables loads), and how the plugin's error names it.
MISSING = {"nftables": ("/usr/sbin/nft", "the nft command is not installed"),
           "iptables": ("/usr/lib/*/libip4tc.so*", "python-iptables cannot load libiptc")}


@pytest.mark.parametrize("backend", list(MISSING))
def test_add_fails_closed_when_the_agent_lacks_the_backends_tool(backend: str, scratch_ns: str) -> None:
    """The node's config asks for a backend the agent's container cannot run: ADD fails."""
    with node(cluster_conflist()) as made:
        made.start_agent()
        assert made.agent is not None
        # Masked in the agent's own mount namespace only (the plugin runs there): /dev/null
        # over the file is an empty, non-executable file.
        pattern, detail = MISSING[backend]
        paths = _real_files(pattern)
        assert paths, f"nothing to take away: no {pattern} on this machine"
        for path in paths:
            masked = subprocess.run(["nsenter", f"--target={made.agent.pid}", "--mount", "--",
                                     "mount", "--bind", "/dev/null", path], capture_output=True, text=True)
            assert masked.returncode == 0, masked.stderr
        conflist = _with_ours(made.conflist(), backend=backend)
        before = netns.netfilter_snapshot(scratch_ns)
        runtime = _runtime(made, scratch_ns, REDIRECT)
        body = _assert_error(runtime.add(conflist), 100)
        assert "could not install" in body["msg"] and detail in body["details"], body
        assert netns.netfilter_snapshot(scratch_ns) == before
        deleted = runtime.delete(conflist)
        assert deleted.returncode == 0, str(deleted)
        assert netns.netfilter_snapshot(scratch_ns) == before


def test_versions_and_result_conversion(cni_node: Node, scratch_ns: str) -> None:
    version = _runtime(cni_node, scratch_ns).call("VERSION", "azwi-netproxy", b"")
    assert version.returncode == 0, str(version)
    assert set(version.body["supportedVersions"]) >= {"0.3.1", "0.4.0", "1.0.0"}
    for cni_version in ("0.3.1", "0.4.0"):
        conflist = {**cni_node.conflist(), "cniVersion": cni_version}
        runtime = _runtime(cni_node, scratch_ns, REDIRECT)
        outcome = runtime.add(conflist)
        assert outcome.returncode == 0, str(outcome)
        result = outcome.body
        # 0.3.x and 0.4.0 results carry ips[].version (spec 0.4.0, "Result"), 1.0.0 dropped it.
        assert result["cniVersion"] == cni_version
        assert {ip["version"] for ip in result["ips"]} <= {"4", "6"} and result["ips"]
        if cni_version == "0.3.1":
            # CHECK came with 0.4.0 (libcni refuses it before calling anything; a plugin
            # called anyway must refuse it too).
            ours = runtime.plugin_config(conflist, _ours(conflist), runtime.cached)
            _assert_error(runtime.call("CHECK", "azwi-netproxy", ours), 1)
        else:
            assert runtime.check(conflist).returncode == 0
        assert runtime.delete(conflist).returncode == 0
    # A 1.0.0 prevResult handed to a 0.4.0 config is converted; and back.
    runtime = _runtime(cni_node, scratch_ns)
    ours = _ours(cni_node.conflist())
    prev_1 = {"cniVersion": "1.0.0", "ips": [{"address": "198.18.9.2/24"}, {"address": "fd00::2/64"}]}
    down = runtime.call("ADD", "azwi-netproxy", {**ours, "name": "n", "cniVersion": "0.4.0", "prevResult": prev_1})
    assert down.body == {"cniVersion": "0.4.0", "ips": [{"address": "198.18.9.2/24", "version": "4"},
                                                       {"address": "fd00::2/64", "version": "6"}]}
    up = runtime.call("ADD", "azwi-netproxy", {**ours, "name": "n", "cniVersion": "1.0.0", "prevResult": down.body})
    assert up.body == prev_1


# ---- the agent -------------------------------------------------------------------------


def test_agent_installs_only_the_shim_and_chains_last(cni_node: Node) -> None:
    assert sorted(os.listdir(cni_node.bin_dir)) == ["azwi-netproxy"]
    conflist = cni_node.conflist()
    assert conflist["plugins"][0] == {"type": "loopback"}
    assert conflist["plugins"][-1]["type"] == "azwi-netproxy"
    assert conflist["plugins"][-1]["capabilities"] == {"io.kubernetes.cri.pod-annotations": True}
    mode = (cni_node.bin_dir / "azwi-netproxy").stat().st_mode & 0o7777
    assert mode == 0o755
    syntax = subprocess.run(["sh", "-n", str(cni_node.bin_dir / "azwi-netproxy")], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


def test_agent_chains_again_after_the_cluster_rewrites_its_conflist(cni_node: Node) -> None:
    original = cluster_conflist(name="rewritten")
    cni_node.write_conflist(original)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = cni_node.conflist()
        if now["plugins"][-1]["type"] == "azwi-netproxy":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the agent did not chain the rewritten conflist: {cni_node.conflist()}")
    assert now["name"] == "rewritten" and now["plugins"][:-1] == original["plugins"]
    assert cni_node.agent_check().returncode == 0


def test_without_agent_a_pod_that_asks_fails_closed_and_others_start(cni_node: Node, scratch_ns: str) -> None:
    state = cni_node.run_dir / "cni-agent"
    assert cni_node.stop_agent() == 0
    try:
        assert not state.exists(), "the agent left its state file behind"
        assert (cni_node.bin_dir / "azwi-netproxy").exists(), "the shim must stay: fail closed"
        conflist = cni_node.conflist()
        before = netns.netfilter_snapshot(scratch_ns)
        runtime = _runtime(cni_node, scratch_ns, REDIRECT)
        body = _assert_error(runtime.add(conflist), 11)
        assert "agent is not running" in body["msg"]
        assert runtime.delete(conflist).returncode == 0
        # The node's other pods do not depend on our agent: prevResult is handed on.
        for asked in ({}, {"azwi-netproxy.io/redirect": "false"}):
            runtime = _runtime(cni_node, scratch_ns, asked)
            outcome = runtime.add(conflist)
            assert outcome.returncode == 0, str(outcome)
            assert _blank_sandbox(outcome.body) == _loopback_result(cni_node, conflist)
            assert runtime.check(conflist).returncode == 0
            assert runtime.delete(conflist).returncode == 0
        assert netns.netfilter_snapshot(scratch_ns) == before
        check = cni_node.agent_check()
        assert check.returncode == 1 and "does not name a running agent" in check.stdout
        # A state file naming a live process that is not the agent (a reused PID) is refused.
        with subprocess.Popen(["sleep", "60"]) as other:
            try:
                state.write_text(f"{other.pid} 1\n")
                _assert_error(_runtime(cni_node, scratch_ns, REDIRECT).add(conflist), 11)
            finally:
                other.kill()
        state.unlink()
    finally:
        cni_node.start_agent()
    assert _runtime(cni_node, scratch_ns, REDIRECT).add(cni_node.conflist()).returncode == 0


def test_agent_uninstall_restores_the_cluster_conflist() -> None:
    original = cluster_conflist(name="cluster-" + new_guid()[:8])
    with node(original) as made:
        made.start_agent(AZWI_CNI_PLUGIN_CONFIG='{"backend": "iptables", "proxyPort": 8100}')
        assert _ours(made.conflist()) == {"type": "azwi-netproxy", "backend": "iptables", "proxyPort": 8100,
                                          "capabilities": {"io.kubernetes.cri.pod-annotations": True}}
        assert made.stop_agent() == 0
        made.start_agent("--uninstall")
        assert made.conflist() == original
        assert os.listdir(made.bin_dir) == []
        assert made.agent is not None and made.agent.poll() is None, "it waits, so the DaemonSet stays up"
        assert made.stop_agent() == 0
        assert made.agent_check(AZWI_CNI_UNINSTALL="true").returncode == 0


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("AZWI_CNI_UNINSTALL", "maybe", "AZWI_CNI_UNINSTALL"),
        ("AZWI_CNI_PLUGIN_CONFIG", '{"proxyPort": 0}', "proxyPort"),
        ("AZWI_CNI_PLUGIN_CONFIG", '{"type": "other"}', "AZWI_CNI_PLUGIN_CONFIG"),
        ("AZWI_CNI_CONF_DIR", "relative/dir", "AZWI_CNI_CONF_DIR"),
    ],
)
def test_agent_refuses_bad_settings_with_one_line(variable: str, value: str, message: str) -> None:
    done = subprocess.run([str(AGENT)], env={"PATH": "/usr/bin:/bin", variable: value},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr


def test_agent_is_not_ready_while_the_primary_config_cannot_be_chained(cni_node: Node) -> None:
    """A single-plugin .conf sorting first is what the runtime loads: nothing can be chained
    to it, and the agent says so (readiness fails) instead of editing another file."""
    single = cni_node.conf_dir / "05-single.conf"
    single.write_text(json.dumps({"cniVersion": "1.0.0", "name": "single", "type": "loopback"}))
    try:
        time.sleep(0.5)
        check = cni_node.agent_check()
        assert check.returncode == 1 and "05-single.conf is not a conflist" in check.stdout, check
        assert json.loads(single.read_text()) == {"cniVersion": "1.0.0", "name": "single", "type": "loopback"}
    finally:
        single.unlink()
    deadline = time.monotonic() + 10
    while cni_node.agent_check().returncode != 0:
        assert time.monotonic() < deadline, cni_node.agent_check().stdout
        time.sleep(0.1)
