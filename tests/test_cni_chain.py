"""Chaining into a node's network configuration: which file, and what it holds after.

Name: test_cni_chain
Scope: function. Pure: azwi_netproxy.cni.chain on data, judged against libcni's documented
rules (the first file by name ending in .conf, .conflist or .json is the one loaded).
"""

from __future__ import annotations

from azwi_netproxy.cni import chain

OURS = chain.our_entry()


def test_the_runtime_loads_the_first_config_file_by_name() -> None:
    names = ["99-late.conflist", "10-calico.conflist", "05-cilium.conf", "README", ".10-x.conflist.tmp"]
    assert chain.primary_config(names) == "05-cilium.conf"
    assert chain.primary_config(["10-a.conflist", "10-a.conflist.azwi-netproxy.tmp"]) == "10-a.conflist"
    assert chain.primary_config(["notes.txt"]) is None
    # libcni goes by the extension alone: a dot file with one is loaded, and first.
    assert chain.primary_config(["10-a.conflist", ".00-hidden.json"]) == ".00-hidden.json"


def test_our_entry_goes_last_once_and_others_are_untouched() -> None:
    cluster = {"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "calico", "ipam": {"type": "x"}},
                                                                  {"type": "portmap", "snat": True}]}
    once = chain.chained(cluster, OURS)
    assert once is not None and once["plugins"] == [*cluster["plugins"], OURS]
    assert cluster["plugins"][-1] == {"type": "portmap", "snat": True}, "the input was changed"
    assert chain.chained(once, OURS) is None
    # The cluster's agent appended a plugin after ours: ours moves back to the end.
    moved = {**once, "plugins": [*once["plugins"], {"type": "bandwidth"}]}
    again = chain.chained(moved, OURS)
    assert again is not None and [p["type"] for p in again["plugins"]] == ["calico", "portmap", "bandwidth",
                                                                           "azwi-netproxy"]
    # Settings changed on the node: the entry is replaced, not duplicated.
    tuned = chain.our_entry({"proxyPort": 8100})
    replaced = chain.chained(once, tuned)
    assert replaced is not None and replaced["plugins"][-1] == tuned and len(replaced["plugins"]) == 3


def test_unchaining_gives_back_exactly_the_cluster_config() -> None:
    cluster = {"cniVersion": "0.4.0", "name": "k8s", "plugins": [{"type": "bridge"}]}
    chained = chain.chained(cluster, OURS)
    assert chained is not None
    assert chain.unchained(chained) == cluster
    assert chain.unchained(cluster) is None
    assert not chain.is_list({"cniVersion": "0.4.0", "name": "single", "type": "bridge"})
