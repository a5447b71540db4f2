"""Capability probes: can this run create a network namespace and load an nft table in it?"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid


def _probe_netns() -> str | None:
    """None when root tests can run, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root + netns + nft (CI and the Vagrant VM run these)"
    for tool in ("ip", "nft", "setpriv", "curl"):
        if shutil.which(tool) is None:
            return f"needs the {tool} command (scripts/bootstrap.sh installs it)"
    name = "azprobe" + uuid.uuid4().hex[:6]
    try:
        made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
        if made.returncode != 0:
            return f"cannot create a network namespace: {made.stderr.strip()}"
        nft = subprocess.run(
            ["ip", "netns", "exec", name, "nft", "add", "table", "ip", "azprobe"],
            capture_output=True, text=True,
        )
        if nft.returncode != 0:
            return f"cannot load an nft table in a namespace: {nft.stderr.strip()}"
        return None
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


NETNS_SKIP_REASON = _probe_netns() or ""
CAN_NETNS = NETNS_SKIP_REASON == ""
