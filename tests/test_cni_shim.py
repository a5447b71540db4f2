"""The node shim on its own: what it answers while no agent runs, for any configuration.

Name: test_cni_shim
Scope: function. The real shim (as the agent renders it) run by /bin/sh with a state file
    that names no agent, and by every awk this machine has (the node's may be any).
Depends: /bin/sh, awk (mawk; gawk and busybox where installed), hypothesis.

The judge is Python's json module: the shim must hand on exactly the prevResult of the
configuration it got (as a runtime's next plugin would read it), whatever JSON the
cluster's plugin put there, for pods that did not ask for the redirect; and refuse every
configuration that names either annotation (the redirect's, node mode's) with any value but
"false" (as Go's encoder, which
containerd's libcni uses, writes it: no blank space; any other spelling, an escaped slash
included, counts as asking).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from azwi_netproxy.cni import shim

AWKS = [path for path in ("/usr/bin/mawk", "/usr/bin/gawk", "/usr/bin/original-awk") if os.access(path, os.X_OK)]
BUSYBOX = shutil.which("busybox")


def _shim(tmp: Path, awk: str) -> Path:
    """The shim, with `awk` first on its PATH (a directory holding only that awk)."""
    bindir = tmp / f"awk-{Path(awk).name}"
    bindir.mkdir(exist_ok=True)
    link = bindir / "awk"
    if not link.exists():
        if awk == "busybox":
            link.write_text(f"#!/bin/sh\nexec {BUSYBOX} awk \"$@\"\n")
            link.chmod(0o755)
        else:
            link.symlink_to(awk)
    text = shim.render(state_file=str(tmp / "no-agent"), python="/nonexistent/python")
    text = text.replace("PATH=/usr/local/sbin", f"PATH={bindir}:/usr/local/sbin", 1)
    path = tmp / f"shim-{Path(awk).name}"
    path.write_text(text)
    path.chmod(stat.S_IRWXU)
    return path


def _call(path: Path, command: str, config: Any) -> subprocess.CompletedProcess[str]:
    stdin = config if isinstance(config, str) else json.dumps(config)
    return subprocess.run(["/bin/sh", str(path)], input=stdin, capture_output=True, text=True, timeout=30,
                          env={"CNI_COMMAND": command, "CNI_CONTAINERID": "c", "CNI_NETNS": "/nonexistent",
                               "CNI_IFNAME": "eth0", "CNI_PATH": "/nonexistent"})


KINDS = [*AWKS, *(["busybox"] if BUSYBOX else [])]
json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=12) | st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
results = st.fixed_dictionaries({"cniVersion": st.just("1.0.0")},
                                optional={"ips": json_values, "dns": json_values, "interfaces": json_values})


@pytest.mark.parametrize("awk", KINDS)
# Text of any Unicode: Hypothesis builds its table of characters on first use (about 2 s in
# a fresh checkout), which the slow-generation health check would count against this test.
@settings(suppress_health_check=[HealthCheck.too_slow])
@given(prev=results, extra=st.dictionaries(st.sampled_from(["name", "x\"}{", "args", "ipam"]), json_values,
                                           max_size=3),
       indent=st.sampled_from([None, 2]))
def test_without_agent_a_pod_that_did_not_ask_gets_prev_result_unchanged(
    tmp_path_factory: pytest.TempPathFactory, awk: str, prev: dict[str, Any], extra: dict[str, Any],
    indent: int | None,
) -> None:
    path = _shim(tmp_path_factory.getbasetemp(), awk)
    config = {"cniVersion": "1.0.0", "type": "azwi-netproxy", **extra, "prevResult": prev,
              "runtimeConfig": {"io.kubernetes.cri.pod-annotations": {"team": "a"}}}
    done = _call(path, "ADD", json.dumps(config, indent=indent))
    assert done.returncode == 0, done
    assert json.loads(done.stdout) == prev


@pytest.mark.parametrize("annotation", ["azwi-netproxy.io/redirect", "azwi-netproxy.io/node-proxy"])
@pytest.mark.parametrize("awk", KINDS)
def test_without_agent_only_the_annotation_decides(tmp_path: Path, awk: str, annotation: str) -> None:
    path = _shim(tmp_path, awk)
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "198.18.0.2/30"}]}
    # The other mode's annotation saying "false" changes nothing: this one still asks.
    other = ({"azwi-netproxy.io/node-proxy": "false"} if annotation.endswith("redirect")
             else {"azwi-netproxy.io/redirect": "false"})
    for value in ("true", "True", "yes", ""):
        config = {"cniVersion": "1.0.0", "type": "azwi-netproxy", "prevResult": prev,
                  "runtimeConfig": {"io.kubernetes.cri.pod-annotations": {**other, annotation: value}}}
        for command in ("ADD", "CHECK"):
            done = _call(path, command, json.dumps(config, separators=(",", ":")))
            body = json.loads(done.stdout)
            assert done.returncode == 1 and body["code"] == 11 and "not running" in body["msg"], done
        # The same request with the slash escaped, as JSON allows (Python's json reads it as
        # the same name): still refused, whatever the value, "false" included.
        for escaped_value, slash in itertools.product((value, "false"), ("\\/", "\\u002f", "\\u002F")):
            text = json.dumps({**config, "runtimeConfig": {"io.kubernetes.cri.pod-annotations": {
                annotation: escaped_value}}}, separators=(",", ":"))
            text = text.replace(annotation, annotation.replace("/", slash))
            assert json.loads(text)["runtimeConfig"]["io.kubernetes.cri.pod-annotations"] == {
                annotation: escaped_value}
            done = _call(path, "ADD", text)
            assert done.returncode == 1 and json.loads(done.stdout)["code"] == 11, done
    off = {"cniVersion": "1.0.0", "type": "azwi-netproxy", "prevResult": prev,
           "runtimeConfig": {"io.kubernetes.cri.pod-annotations": {**other, annotation: "false"}}}
    done = _call(path, "ADD", json.dumps(off, separators=(",", ":")))
    assert done.returncode == 0 and json.loads(done.stdout) == prev, done
    # DEL succeeds whatever was asked; CHECK of a pod that did not ask passes; VERSION answers.
    assert _call(path, "DEL", json.dumps({"runtimeConfig": {"io.kubernetes.cri.pod-annotations": {
        annotation: "true"}}})).returncode == 0
    assert _call(path, "CHECK", json.dumps(off, separators=(",", ":"))).returncode == 0
    version = _call(path, "VERSION", "")
    assert version.returncode == 0 and "1.0.0" in json.loads(version.stdout)["supportedVersions"]
    # No prevResult (we would be first in the chain): a result of the config's version.
    first = _call(path, "ADD", json.dumps({"cniVersion": "0.4.0", "type": "azwi-netproxy"}))
    assert first.returncode == 0 and json.loads(first.stdout) == {"cniVersion": "0.4.0"}, first
