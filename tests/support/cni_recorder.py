#!/usr/bin/python3
"""A chained CNI plugin that records how the runtime called it: the stand-in for ours.

Name: support.cni_recorder (installed into the test's CNI bin dir under a `type` name)
Scope: one JSON line per call, appended to the file named by the config key `recordFile`:
    its whole environment (the CNI_* variables among it), the whole stdin config, and for ADD and
    CHECK what the netns at CNI_NETNS looks like from inside (its inode, `ip -j link` there).
Depends: only Debian's /usr/bin/python3, nsenter and ip, with absolute paths, because the
    runtime runs it from its bin dir with the runtime's own (here: a clean) environment.

ADD prints prevResult unchanged (with the config's cniVersion), as a plugin chained after
the cluster's network plugin must. It fails ADD with the spec's error JSON when the pod's
annotation `azwi-netproxy.test/fail-add` is "true" (from runtimeConfig, where the runtime
puts the annotations for a plugin declaring the `io.kubernetes.cri.pod-annotations`
capability), so a test can show what the runtime does when a chained plugin fails closed.
"""

import json
import os
import subprocess
import sys

SUPPORTED = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]
FAIL_ANNOTATION = "azwi-netproxy.test/fail-add"


def netns_view(path):
    """What the namespace at `path` holds, seen from inside it (or why it could not be seen)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return {"error": f"stat: {exc}"}
    links = subprocess.run(
        ["/usr/bin/nsenter", f"--net={path}", "/usr/sbin/ip", "-j", "link", "show"],
        capture_output=True, text=True, check=False,
    )
    view = {"dev": st.st_dev, "ino": st.st_ino}
    if links.returncode != 0:
        view["error"] = links.stderr.strip()
    else:
        view["links"] = json.loads(links.stdout)
    return view


def main():
    command = os.environ.get("CNI_COMMAND", "")
    raw = sys.stdin.read()
    try:
        config = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        print(json.dumps({"cniVersion": "1.0.0", "code": 6, "msg": "cannot decode config",
                          "details": str(exc)}))
        return 1
    version = config.get("cniVersion", "1.0.0")
    record = {
        "command": command,
        "env": dict(os.environ),
        "argv0": sys.argv[0],
        "config": config,
    }
    if command in ("ADD", "CHECK") and os.environ.get("CNI_NETNS"):
        record["netns"] = netns_view(os.environ["CNI_NETNS"])
    target = config.get("recordFile")
    if target:
        with open(target, "a", encoding="utf-8") as out:
            out.write(json.dumps(record, sort_keys=True) + "\n")

    if command == "VERSION":
        print(json.dumps({"cniVersion": version, "supportedVersions": SUPPORTED}))
        return 0
    if command == "ADD":
        # containerd sends null for a pod without annotations.
        annotations = (config.get("runtimeConfig") or {}).get(
            "io.kubernetes.cri.pod-annotations") or {}
        if annotations.get(FAIL_ANNOTATION) == "true":
            print(json.dumps({"cniVersion": version, "code": 100,
                              "msg": "recorder: ADD refused for this pod",
                              "details": f"the pod asked for it with {FAIL_ANNOTATION}"}))
            return 1
        result = dict(config.get("prevResult") or {"interfaces": [], "ips": []})
        result["cniVersion"] = version
        print(json.dumps(result))
        return 0
    if command in ("DEL", "CHECK"):
        return 0
    print(json.dumps({"cniVersion": version, "code": 4, "msg": f"unknown CNI_COMMAND {command!r}"}))
    return 1


if __name__ == "__main__":
    sys.exit(main())
