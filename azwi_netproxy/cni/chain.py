"""Chaining our plugin into the node's network configuration, as data.

Pure: the agent reads the files and hands their names and JSON here; this says which file
the runtime uses and what it should hold. libcni (containerd, CRI-O) uses the first file
of the conf dir, by name, ending in .conf, .conflist or .json; only a list of plugins can
be chained, and our entry goes last, after the cluster's own network plugin, so that it
gets that plugin's result as prevResult.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any, Final

from azwi_netproxy.cni.spec import ANNOTATIONS_CAPABILITY, PLUGIN_TYPE

CONFIG_SUFFIXES: Final = (".conf", ".conflist", ".json")


def our_entry(settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Our plugin's entry: the node's settings for it (proxyPort, backend, ...; checked by
    the agent), and the capability that makes the runtime pass the pod's annotations."""
    return {"type": PLUGIN_TYPE, **(settings or {}), "capabilities": {ANNOTATIONS_CAPABILITY: True}}


def primary_config(names: Iterable[str]) -> str | None:
    """The file of the conf dir that the runtime loads, or None if there is none yet."""
    # As libcni's ConfFiles: by extension only (dot files included), in lexical order.
    candidates = sorted(name for name in names if name.endswith(CONFIG_SUFFIXES))
    return candidates[0] if candidates else None


def is_list(config: Mapping[str, Any]) -> bool:
    return isinstance(config.get("plugins"), list)


def _ours(plugin: object) -> bool:
    return isinstance(plugin, dict) and plugin.get("type") == PLUGIN_TYPE


def chained(config: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any] | None:
    """`config` with `entry` last, or None if it is already so (nothing to write).

    An entry of ours elsewhere in the list, or one that differs, is replaced: the cluster's
    plugin may have been added after ours when its agent rewrote the file.
    """
    plugins = list(config["plugins"])
    if plugins and plugins[-1] == entry and sum(_ours(p) for p in plugins) == 1:
        return None
    new = copy.deepcopy(dict(config))
    new["plugins"] = [copy.deepcopy(p) for p in plugins if not _ours(p)] + [copy.deepcopy(dict(entry))]
    return new


def unchained(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """`config` without our entries, or None if it has none."""
    plugins = config.get("plugins")
    if not isinstance(plugins, list) or not any(_ours(p) for p in plugins):
        return None
    new = copy.deepcopy(dict(config))
    new["plugins"] = [copy.deepcopy(p) for p in plugins if not _ours(p)]
    return new


def is_chained(config: Mapping[str, Any], entry: Mapping[str, Any]) -> bool:
    return is_list(config) and chained(config, entry) is None
