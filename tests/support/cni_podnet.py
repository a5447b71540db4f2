#!/usr/bin/python3
"""The cluster's network plugin, in miniature: gives a pod `eth0` and a default route.

Name: support.cni_podnet (installed into the test's CNI bin dir under a `type` name)
Scope: ADD makes a veth pair whose pod end is CNI_IFNAME in CNI_NETNS (one /30 per pod out of
    the config's `subnet`, default route via the other end) and whose node end sits in the
    test's own "node" namespace at the config's `nodeNetns` path; DEL deletes the pair.
    Allocations are kept in the config's `stateDir`.
Depends: only Debian's /usr/bin/python3 and ip (absolute paths: the runtime runs plugins
    with a clean environment).

containerd's CRI refuses a sandbox whose CNI result has no IP on `eth0` ("failed to find
network info for sandbox"), so a chain of loopback and a chained plugin alone never makes a
sandbox: something has to play the main plugin. This one never touches the root namespace:
both ends of the pair are created directly in the two test namespaces, and no forwarding is
enabled anywhere, so a pod can reach the node namespace and nothing beyond it.
"""

import fcntl
import ipaddress
import json
import os
import subprocess
import sys

SUPPORTED = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]
IP = "/usr/sbin/ip"


class PluginError(Exception):
    def __init__(self, code, msg, details=""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


def ip_argv(netns, *args):
    """`ip` in `netns`, given by path (nsenter) or by `ip netns` name."""
    if netns.startswith("/"):
        return ["/usr/bin/nsenter", f"--net={netns}", IP, *args]
    return [IP, "-n", netns, *args]


def ip(netns, *args):
    done = subprocess.run(ip_argv(netns, *args), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise PluginError(5, f"ip {' '.join(args)} failed", done.stderr.strip())
    return done.stdout


def allocate(state_dir, container_id):
    """The pod's index in the subnet: the same one again if the runtime retries ADD."""
    os.makedirs(state_dir, exist_ok=True)
    with open(os.path.join(state_dir, "lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = os.path.join(state_dir, "alloc.json")
        try:
            with open(path) as f:
                table = json.load(f)
        except FileNotFoundError:
            table = {"next": 0, "pods": {}}
        if container_id not in table["pods"]:
            table["pods"][container_id] = table["next"]
            table["next"] += 1
            with open(path + ".tmp", "w") as f:
                json.dump(table, f)
            os.replace(path + ".tmp", path)
        return table["pods"][container_id]


def peer_name(container_id):
    return "azp" + container_id[:12]


def add(config, env):
    netns, ifname, cid = env["CNI_NETNS"], env["CNI_IFNAME"], env["CNI_CONTAINERID"]
    node = config["nodeNetns"]
    subnet = ipaddress.ip_network(config.get("subnet", "198.18.128.0/17"))
    index = allocate(config["stateDir"], cid)
    base = subnet.network_address + 4 * index
    if base + 3 > subnet.broadcast_address:
        raise PluginError(11, "podnet: subnet exhausted")
    gateway, address = base + 1, base + 2
    peer = peer_name(cid)
    ip(netns, "link", "add", ifname, "type", "veth", "peer", "name", peer, "netns", node)
    try:
        ip(netns, "addr", "add", f"{address}/30", "dev", ifname)
        ip(netns, "link", "set", ifname, "up")
        ip(node, "addr", "add", f"{gateway}/30", "dev", peer)
        ip(node, "link", "set", peer, "up")
        ip(netns, "route", "add", "default", "via", str(gateway), "dev", ifname)
        mac = json.loads(ip(netns, "-j", "link", "show", ifname))[0]["address"]
    except PluginError:
        subprocess.run(ip_argv(node, "link", "del", peer), capture_output=True, check=False)
        raise
    version = config.get("cniVersion", "1.0.0")
    prev = config.get("prevResult") or {}
    interfaces = list(prev.get("interfaces", []))
    interfaces.append({"name": ifname, "mac": mac, "sandbox": netns})
    entry = {"address": f"{address}/30", "gateway": str(gateway), "interface": len(interfaces) - 1}
    if not version.startswith("1."):
        entry["version"] = "4"  # 0.3.x and 0.4.0 results name the IP version; 1.0.0 dropped it
    result = {
        "cniVersion": version,
        "interfaces": interfaces,
        "ips": [*prev.get("ips", []), entry],
        "routes": [*prev.get("routes", []), {"dst": "0.0.0.0/0", "gw": str(gateway)}],
        "dns": prev.get("dns", {}),
    }
    return result


def delete(config, env):
    node = config["nodeNetns"]
    peer = peer_name(env["CNI_CONTAINERID"])
    # Already gone (the pod's netns was destroyed, which takes both ends) is success: DEL
    # must be idempotent.
    subprocess.run(ip_argv(node, "link", "del", peer), capture_output=True, check=False)


def main():
    env = os.environ
    command = env.get("CNI_COMMAND", "")
    config = json.loads(sys.stdin.read() or "{}")
    version = config.get("cniVersion", "1.0.0")
    try:
        if command == "VERSION":
            print(json.dumps({"cniVersion": version, "supportedVersions": SUPPORTED}))
        elif command == "ADD":
            print(json.dumps(add(config, env)))
        elif command == "DEL":
            delete(config, env)
        elif command == "CHECK":
            pass
        else:
            raise PluginError(4, f"unknown CNI_COMMAND {command!r}")
    except PluginError as exc:
        print(json.dumps({"cniVersion": version, "code": exc.code, "msg": exc.msg,
                          "details": exc.details}))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
