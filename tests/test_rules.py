"""The desired netfilter state as data: exact nft documents, iptables plans and texts.

Name: test_rules
Scope: pure unit tests, no I/O (the documents' round trip through a real kernel is in
    test_init_netns.py).
Depends: azwi_netproxy.init.rules and azwi_netproxy.init.config only.

Whole documents are written out by hand, as linkerd2-proxy-init's iptables_test.go writes
out its planned rules: a change to the rules shows up here as a diff a reviewer can read.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from azwi_netproxy.init import rules
from azwi_netproxy.init.config import load as load_init

DEFAULT = rules.Ruleset(proxy_port=8000, exempt_uid=1501, metadata_ip="169.254.169.254",
                        metadata_port=80)
CUSTOM = rules.Ruleset(proxy_port=15080, exempt_uid=2000, metadata_ip="10.20.30.40",
                       metadata_port=8081)
# --passthrough none (and node mode): nothing is exempt.
NO_EXEMPTION = rules.Ruleset(proxy_port=8000, exempt_uid=None, metadata_ip="169.254.169.254",
                             metadata_port=80)
FAIL_OPEN = rules.Ruleset(proxy_port=8000, exempt_uid=1501, metadata_ip="169.254.169.254",
                          metadata_port=80, fail_closed=False)

TABLE = {"family": "ip", "name": "azwi_proxy"}


def _skuid(uid: int) -> dict[str, Any]:
    return {"match": {"op": "==", "left": {"meta": {"key": "skuid"}}, "right": uid}}


def _daddr(ip: str) -> dict[str, Any]:
    return {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                      "right": ip}}


def _dport(port: int) -> dict[str, Any]:
    return {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                      "right": port}}


NFT_DEFAULT = {"nftables": [
    {"metainfo": {"json_schema_version": 1}},
    {"add": {"table": TABLE}},
    {"delete": {"table": TABLE}},
    {"add": {"table": TABLE}},
    {"add": {"chain": {"family": "ip", "table": "azwi_proxy", "name": "nat_output",
                       "type": "nat", "hook": "output", "prio": -100, "policy": "accept"}}},
    {"add": {"chain": {"family": "ip", "table": "azwi_proxy", "name": "filter_output",
                       "type": "filter", "hook": "output", "prio": 0, "policy": "accept"}}},
    {"add": {"rule": {"family": "ip", "table": "azwi_proxy", "chain": "nat_output",
                      "comment": "azwi-proxy/proxy-uid-bypass",
                      "expr": [_skuid(1501), _daddr("169.254.169.254"), _dport(80), {"return": None}]}}},
    {"add": {"rule": {"family": "ip", "table": "azwi_proxy", "chain": "nat_output",
                      "comment": "azwi-proxy/redirect-imds",
                      "expr": [
                          _daddr("169.254.169.254"),
                          {"match": {"op": "==",
                                     "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                                     "right": 80}},
                          {"redirect": {"port": 8000}},
                      ]}}},
    {"add": {"rule": {"family": "ip", "table": "azwi_proxy", "chain": "filter_output",
                      "comment": "azwi-proxy/proxy-uid-bypass",
                      "expr": [_skuid(1501), _daddr("169.254.169.254"), _dport(80), {"return": None}]}}},
    {"add": {"rule": {"family": "ip", "table": "azwi_proxy", "chain": "filter_output",
                      "comment": "azwi-proxy/established",
                      "expr": [
                          _daddr("169.254.169.254"),
                          _dport(80),
                          {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                                     "right": ["established", "related"]}},
                          {"return": None},
                      ]}}},
    {"add": {"rule": {"family": "ip", "table": "azwi_proxy", "chain": "filter_output",
                      "comment": "azwi-proxy/fail-closed-tcp",
                      "expr": [_daddr("169.254.169.254"), {"reject": {"type": "tcp reset"}}]}}},
    {"add": {"rule": {"family": "ip", "table": "azwi_proxy", "chain": "filter_output",
                      "comment": "azwi-proxy/fail-closed",
                      "expr": [_daddr("169.254.169.254"),
                               {"reject": {"type": "icmp", "expr": "port-unreachable"}}]}}},
]}

NFT_CUSTOM = {"nftables": [
    {"metainfo": {"json_schema_version": 1}},
    {"add": {"table": TABLE}},
    {"delete": {"table": TABLE}},
    {"add": {"table": TABLE}},
    {"add": {"chain": {"family": "ip", "table": "azwi_proxy", "name": "nat_output",
                       "type": "nat", "hook": "output", "prio": -100, "policy": "accept"}}},
    {"add": {"chain": {"family": "ip", "table": "azwi_proxy", "name": "filter_output",
                       "type": "filter", "hook": "output", "prio": 0, "policy": "accept"}}},
    {"add": {"rule": {"family": "ip", "table": "azwi_proxy", "chain": "nat_output",
                      "comment": "azwi-proxy/proxy-uid-bypass",
                      "expr": [_skuid(2000), _daddr("10.20.30.40"), _dport(8081), {"return": None}]}}},
    {"add": {"rule": {"family": "ip", "table": "azwi_proxy", "chain": "nat_output",
                      "comment": "azwi-proxy/redirect-imds",
                      "expr": [
                          _daddr("10.20.30.40"),
                          {"match": {"op": "==",
                                     "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                                     "right": 8081}},
                          {"redirect": {"port": 15080}},
                      ]}}},
    {"add": {"rule": {"family": "ip", "table": "azwi_proxy", "chain": "filter_output",
                      "comment": "azwi-proxy/proxy-uid-bypass",
                      "expr": [_skuid(2000), _daddr("10.20.30.40"), _dport(8081), {"return": None}]}}},
    {"add": {"rule": {"family": "ip", "table": "azwi_proxy", "chain": "filter_output",
                      "comment": "azwi-proxy/established",
                      "expr": [
                          _daddr("10.20.30.40"),
                          _dport(8081),
                          {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                                     "right": ["established", "related"]}},
                          {"return": None},
                      ]}}},
    {"add": {"rule": {"family": "ip", "table": "azwi_proxy", "chain": "filter_output",
                      "comment": "azwi-proxy/fail-closed-tcp",
                      "expr": [_daddr("10.20.30.40"), {"reject": {"type": "tcp reset"}}]}}},
    {"add": {"rule": {"family": "ip", "table": "azwi_proxy", "chain": "filter_output",
                      "comment": "azwi-proxy/fail-closed",
                      "expr": [_daddr("10.20.30.40"),
                               {"reject": {"type": "icmp", "expr": "port-unreachable"}}]}}},
]}

NFT_FAIL_OPEN = {"nftables": [
    {"metainfo": {"json_schema_version": 1}},
    {"add": {"table": TABLE}},
    {"delete": {"table": TABLE}},
    {"add": {"table": TABLE}},
    {"add": {"chain": {"family": "ip", "table": "azwi_proxy", "name": "nat_output",
                       "type": "nat", "hook": "output", "prio": -100, "policy": "accept"}}},
    {"add": {"rule": {"family": "ip", "table": "azwi_proxy", "chain": "nat_output",
                      "comment": "azwi-proxy/proxy-uid-bypass",
                      "expr": [_skuid(1501), _daddr("169.254.169.254"), _dport(80), {"return": None}]}}},
    {"add": {"rule": {"family": "ip", "table": "azwi_proxy", "chain": "nat_output",
                      "comment": "azwi-proxy/redirect-imds",
                      "expr": [
                          _daddr("169.254.169.254"),
                          {"match": {"op": "==",
                                     "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                                     "right": 80}},
                          {"redirect": {"port": 8000}},
                      ]}}},
]}


@pytest.mark.parametrize(
    ("ruleset", "expected"),
    [(DEFAULT, NFT_DEFAULT), (CUSTOM, NFT_CUSTOM), (FAIL_OPEN, NFT_FAIL_OPEN)],
    ids=["default", "custom-ports-uid-ip", "fail-open"],
)
def test_nft_document(ruleset: rules.Ruleset, expected: dict[str, Any]) -> None:
    document = rules.nft_document(ruleset)
    assert document == expected
    # What `nft -j -f -` reads: plain JSON, nothing Python-only in it.
    assert json.loads(json.dumps(document)) == expected


def test_nft_document_clears_before_it_builds() -> None:
    """add + delete + add: one transaction that works with or without an earlier copy."""
    commands = rules.nft_document(DEFAULT)["nftables"][1:4]
    assert [next(iter(c)) for c in commands] == ["add", "delete", "add"]
    assert all(c[next(iter(c))] == {"table": TABLE} for c in commands)


def test_nft_cleanup_document_touches_only_our_table() -> None:
    assert rules.nft_cleanup_document() == {"nftables": [
        {"metainfo": {"json_schema_version": 1}},
        {"add": {"table": TABLE}},
        {"delete": {"table": TABLE}},
    ]}


NFT_TEXT_DEFAULT = """\
table ip azwi_proxy {
\tchain nat_output {
\t\ttype nat hook output priority -100; policy accept;
\t\tmeta skuid 1501 ip daddr 169.254.169.254 tcp dport 80 return comment "azwi-proxy/proxy-uid-bypass"
\t\tip daddr 169.254.169.254 tcp dport 80 redirect to :8000 comment "azwi-proxy/redirect-imds"
\t}

\tchain filter_output {
\t\ttype filter hook output priority filter; policy accept;
\t\tmeta skuid 1501 ip daddr 169.254.169.254 tcp dport 80 return comment "azwi-proxy/proxy-uid-bypass"
\t\tip daddr 169.254.169.254 tcp dport 80 ct state established,related return comment "azwi-proxy/established"
\t\tip daddr 169.254.169.254 reject with tcp reset comment "azwi-proxy/fail-closed-tcp"
\t\tip daddr 169.254.169.254 reject comment "azwi-proxy/fail-closed"
\t}
}"""

NFT_TEXT_FAIL_OPEN = """\
table ip azwi_proxy {
\tchain nat_output {
\t\ttype nat hook output priority -100; policy accept;
\t\tmeta skuid 1501 ip daddr 169.254.169.254 tcp dport 80 return comment "azwi-proxy/proxy-uid-bypass"
\t\tip daddr 169.254.169.254 tcp dport 80 redirect to :8000 comment "azwi-proxy/redirect-imds"
\t}
}"""

IPT_TEXT_DEFAULT = """\
*nat
:AZWI_PROXY_REDIRECT -
:AZWI_PROXY_OUTPUT -
-I OUTPUT 1 -m comment --comment "azwi-proxy/jump" -j AZWI_PROXY_OUTPUT
-A AZWI_PROXY_REDIRECT -p tcp -m comment --comment "azwi-proxy/redirect-to-proxy" -j REDIRECT --to-ports 8000
-A AZWI_PROXY_OUTPUT -d 169.254.169.254/32 -p tcp -m owner --uid-owner 1501 -m tcp --dport 80 -m comment --comment "azwi-proxy/proxy-uid-bypass" -j RETURN
-A AZWI_PROXY_OUTPUT -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -m comment --comment "azwi-proxy/redirect-imds" -j AZWI_PROXY_REDIRECT
COMMIT
*filter
:AZWI_PROXY_FILTER -
-I OUTPUT 1 -m comment --comment "azwi-proxy/jump" -j AZWI_PROXY_FILTER
-A AZWI_PROXY_FILTER -d 169.254.169.254/32 -p tcp -m owner --uid-owner 1501 -m tcp --dport 80 -m comment --comment "azwi-proxy/proxy-uid-bypass" -j RETURN
-A AZWI_PROXY_FILTER -d 169.254.169.254/32 -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -m tcp --dport 80 -m comment --comment "azwi-proxy/established" -j RETURN
-A AZWI_PROXY_FILTER -d 169.254.169.254/32 -p tcp -m comment --comment "azwi-proxy/fail-closed-tcp" -j REJECT --reject-with tcp-reset
-A AZWI_PROXY_FILTER -d 169.254.169.254/32 -m comment --comment "azwi-proxy/fail-closed" -j REJECT --reject-with icmp-port-unreachable
COMMIT"""

IPT_TEXT_CUSTOM_FAIL_OPEN = """\
*nat
:AZWI_PROXY_REDIRECT -
:AZWI_PROXY_OUTPUT -
-I OUTPUT 1 -m comment --comment "azwi-proxy/jump" -j AZWI_PROXY_OUTPUT
-A AZWI_PROXY_REDIRECT -p tcp -m comment --comment "azwi-proxy/redirect-to-proxy" -j REDIRECT --to-ports 15080
-A AZWI_PROXY_OUTPUT -d 10.20.30.40/32 -p tcp -m owner --uid-owner 2000 -m tcp --dport 8081 -m comment --comment "azwi-proxy/proxy-uid-bypass" -j RETURN
-A AZWI_PROXY_OUTPUT -d 10.20.30.40/32 -p tcp -m tcp --dport 8081 -m comment --comment "azwi-proxy/redirect-imds" -j AZWI_PROXY_REDIRECT
COMMIT"""


@pytest.mark.parametrize(
    ("ruleset", "backend", "expected"),
    [
        (DEFAULT, "nftables", NFT_TEXT_DEFAULT),
        (FAIL_OPEN, "nftables", NFT_TEXT_FAIL_OPEN),
        (DEFAULT, "iptables", IPT_TEXT_DEFAULT),
        (rules.Ruleset(proxy_port=15080, exempt_uid=2000, metadata_ip="10.20.30.40",
                       metadata_port=8081, fail_closed=False), "iptables",
         IPT_TEXT_CUSTOM_FAIL_OPEN),
    ],
    ids=["nft-default", "nft-fail-open", "iptables-default", "iptables-custom-fail-open"],
)
def test_dry_run_text(ruleset: rules.Ruleset, backend: str, expected: str) -> None:
    assert rules.render_text(ruleset, backend) == expected  # type: ignore[arg-type]


def _comment(purpose: str) -> dict[str, Any]:
    return {"comment": f"azwi-proxy/{purpose}"}


def test_iptables_plan_default() -> None:
    nat, filter_ = rules.iptables_plan(DEFAULT)
    assert nat == rules.IptablesTable(
        name="nat",
        chains=(
            ("AZWI_PROXY_REDIRECT", (
                {"protocol": "tcp", "comment": _comment("redirect-to-proxy"),
                 "target": {"REDIRECT": {"to-ports": "8000"}}},
            )),
            ("AZWI_PROXY_OUTPUT", (
                {"dst": "169.254.169.254/32", "protocol": "tcp", "owner": {"uid-owner": "1501"},
                 "tcp": {"dport": "80"}, "comment": _comment("proxy-uid-bypass"), "target": "RETURN"},
                {"dst": "169.254.169.254/32", "protocol": "tcp", "tcp": {"dport": "80"},
                 "comment": _comment("redirect-imds"), "target": "AZWI_PROXY_REDIRECT"},
            )),
        ),
        jumps=((1, {"comment": _comment("jump"), "target": "AZWI_PROXY_OUTPUT"}),),
    )
    assert filter_ == rules.IptablesTable(
        name="filter",
        chains=(
            ("AZWI_PROXY_FILTER", (
                {"dst": "169.254.169.254/32", "protocol": "tcp", "owner": {"uid-owner": "1501"},
                 "tcp": {"dport": "80"}, "comment": _comment("proxy-uid-bypass"), "target": "RETURN"},
                {"dst": "169.254.169.254/32", "protocol": "tcp",
                 "conntrack": {"ctstate": "RELATED,ESTABLISHED"}, "tcp": {"dport": "80"},
                 "comment": _comment("established"), "target": "RETURN"},
                {"dst": "169.254.169.254/32", "protocol": "tcp",
                 "comment": _comment("fail-closed-tcp"),
                 "target": {"REJECT": {"reject-with": "tcp-reset"}}},
                {"dst": "169.254.169.254/32", "comment": _comment("fail-closed"),
                 "target": {"REJECT": {"reject-with": "icmp-port-unreachable"}}},
            )),
        ),
        jumps=((1, {"comment": _comment("jump"), "target": "AZWI_PROXY_FILTER"}),),
    )


def test_iptables_plan_custom_fail_open() -> None:
    nat, filter_ = rules.iptables_plan(rules.Ruleset(
        proxy_port=15080, exempt_uid=2000, metadata_ip="10.20.30.40", metadata_port=8081,
        fail_closed=False,
    ))
    assert dict(nat.chains) == {
        "AZWI_PROXY_REDIRECT": (
            {"protocol": "tcp", "comment": _comment("redirect-to-proxy"),
             "target": {"REDIRECT": {"to-ports": "15080"}}},
        ),
        "AZWI_PROXY_OUTPUT": (
            {"dst": "10.20.30.40/32", "protocol": "tcp", "owner": {"uid-owner": "2000"},
             "tcp": {"dport": "8081"}, "comment": _comment("proxy-uid-bypass"), "target": "RETURN"},
            {"dst": "10.20.30.40/32", "protocol": "tcp", "tcp": {"dport": "8081"},
             "comment": _comment("redirect-imds"), "target": "AZWI_PROXY_REDIRECT"},
        ),
    }
    # Fail-open: nothing of ours in filter, so an install removes an earlier filter chain.
    assert filter_ == rules.IptablesTable(name="filter")


NFT_TEXT_NO_EXEMPTION = """\
table ip azwi_proxy {
\tchain nat_output {
\t\ttype nat hook output priority -100; policy accept;
\t\tip daddr 169.254.169.254 tcp dport 80 redirect to :8000 comment "azwi-proxy/redirect-imds"
\t}

\tchain filter_output {
\t\ttype filter hook output priority filter; policy accept;
\t\tip daddr 169.254.169.254 reject with tcp reset comment "azwi-proxy/fail-closed-tcp"
\t\tip daddr 169.254.169.254 reject comment "azwi-proxy/fail-closed"
\t}
}"""

IPT_TEXT_NO_EXEMPTION = """\
*nat
:AZWI_PROXY_REDIRECT -
:AZWI_PROXY_OUTPUT -
-I OUTPUT 1 -m comment --comment "azwi-proxy/jump" -j AZWI_PROXY_OUTPUT
-A AZWI_PROXY_REDIRECT -p tcp -m comment --comment "azwi-proxy/redirect-to-proxy" -j REDIRECT --to-ports 8000
-A AZWI_PROXY_OUTPUT -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -m comment --comment "azwi-proxy/redirect-imds" -j AZWI_PROXY_REDIRECT
COMMIT
*filter
:AZWI_PROXY_FILTER -
-I OUTPUT 1 -m comment --comment "azwi-proxy/jump" -j AZWI_PROXY_FILTER
-A AZWI_PROXY_FILTER -d 169.254.169.254/32 -p tcp -m comment --comment "azwi-proxy/fail-closed-tcp" -j REJECT --reject-with tcp-reset
-A AZWI_PROXY_FILTER -d 169.254.169.254/32 -m comment --comment "azwi-proxy/fail-closed" -j REJECT --reject-with icmp-port-unreachable
COMMIT"""


@pytest.mark.parametrize(("backend", "expected"),
                         [("nftables", NFT_TEXT_NO_EXEMPTION), ("iptables", IPT_TEXT_NO_EXEMPTION)])
def test_passthrough_none_exempts_no_uid(backend: str, expected: str) -> None:
    """--passthrough none: no rule names a uid, and no flow to the address is let through."""
    assert rules.render_text(NO_EXEMPTION, backend) == expected  # type: ignore[arg-type]
    assert all(rule.uid is None and not rule.established for rule in NO_EXEMPTION.rules())


@pytest.mark.parametrize(
    ("environ", "flags"),
    [({"AZWI_PASSTHROUGH": "none"}, {}), ({"AZWI_PASSTHROUGH": "all"}, {"passthrough": "none"}),
     ({"AZWI_PASSTHROUGH": " none "}, {})],
    ids=["environment", "flag-overrides-environment", "blank-space"],
)
def test_passthrough_none_from_flag_or_environment(environ: dict[str, str], flags: dict[str, Any]) -> None:
    assert rules.Ruleset.from_config(load_init(flags, environ)) == NO_EXEMPTION


def test_every_rule_carries_our_comment() -> None:
    for rule in rules.nft_rules(DEFAULT):
        assert rule["comment"].startswith("azwi-proxy/")
    for table in rules.iptables_plan(DEFAULT):
        for _chain, entries in table.chains:
            assert all(e["comment"]["comment"].startswith("azwi-proxy/") for e in entries)
        assert all(j["comment"]["comment"] == "azwi-proxy/jump" for _, j in table.jumps)


@pytest.mark.parametrize(
    ("environ", "flags", "expected"),
    [
        ({}, {}, DEFAULT),
        ({"PROXY_PORT": "15080", "PROXY_UID": "2000", "METADATA_IP": "10.20.30.40",
          "METADATA_PORT": "8081"}, {}, CUSTOM),
        ({"PROXY_PORT": "1"}, {"proxy_port": "8000", "allow_other_metadata_traffic": True},
         FAIL_OPEN),
    ],
    ids=["defaults", "environment", "flags-override-environment"],
)
def test_ruleset_from_config(
    environ: dict[str, str], flags: dict[str, Any], expected: rules.Ruleset
) -> None:
    assert rules.Ruleset.from_config(load_init(flags, environ)) == expected


# ---- reading back: how differences are reported ------------------------------------------


def _listed_chains(ruleset: rules.Ruleset) -> list[dict[str, Any]]:
    return [{**c, "handle": n} for n, c in enumerate(rules.nft_chains(ruleset), 1)]


def _listed_rules(ruleset: rules.Ruleset) -> list[dict[str, Any]]:
    return [{**r, "handle": n} for n, r in enumerate(rules.nft_rules(ruleset), 10)]


def test_nft_diff_ignores_handles() -> None:
    assert rules.nft_diff(DEFAULT, _listed_chains(DEFAULT), _listed_rules(DEFAULT)) == []


def test_nft_diff_names_each_difference() -> None:
    listed = _listed_rules(DEFAULT)
    listed[1] = {**listed[1], "expr": [*listed[1]["expr"][:-1], {"redirect": {"port": 9000}}]}
    listed.append({"family": "ip", "table": "azwi_proxy", "chain": "nat_output",
                   "handle": 99, "expr": [{"counter": {"packets": 0, "bytes": 0}}]})
    chains = [c for c in _listed_chains(DEFAULT) if c["name"] == "nat_output"]
    chains.append({"family": "ip", "table": "azwi_proxy", "name": "extra", "handle": 7})
    assert rules.nft_diff(DEFAULT, chains, [r for r in listed if r["chain"] == "nat_output"]) == [
        'nftables: chain nat_output: rule 2: expected ip daddr 169.254.169.254 tcp dport 80 '
        'redirect to :8000 comment "azwi-proxy/redirect-imds"; found ip daddr 169.254.169.254 '
        'tcp dport 80 redirect to :9000 comment "azwi-proxy/redirect-imds"',
        'nftables: chain nat_output: unexpected rule 3: {"counter":{"bytes":0,"packets":0}}',
        "nftables: chain filter_output is missing",
        "nftables: unexpected chain extra",
    ]


def test_nft_diff_reports_a_changed_hook() -> None:
    chains = _listed_chains(FAIL_OPEN)
    chains[0] = {**chains[0], "prio": 0}
    assert rules.nft_diff(FAIL_OPEN, chains, _listed_rules(FAIL_OPEN)) == [
        "nftables: chain nat_output: expected 'type nat hook output priority -100; policy "
        "accept;', found 'type nat hook output priority 0; policy accept;'",
    ]


def test_iptables_diff_ignores_jump_position() -> None:
    nat = rules.iptables_plan(DEFAULT)[0]
    moved = rules.IptablesTable(name="nat", chains=nat.chains, jumps=((3, nat.jumps[0][1]),))
    assert rules.iptables_diff(nat, moved) == []


def test_iptables_diff_names_each_difference() -> None:
    nat = rules.iptables_plan(DEFAULT)[0]
    chains = dict(nat.chains)
    found = rules.IptablesTable(
        name="nat",
        chains=(("AZWI_PROXY_OUTPUT", chains["AZWI_PROXY_OUTPUT"][:1]),),
        jumps=((1, nat.jumps[0][1]), (4, nat.jumps[0][1])),
    )
    assert rules.iptables_diff(nat, found) == [
        "iptables nat: chain AZWI_PROXY_REDIRECT is missing",
        "iptables nat: chain AZWI_PROXY_OUTPUT: rule 2 is missing: -d 169.254.169.254/32 -p tcp "
        '-m tcp --dport 80 -m comment --comment "azwi-proxy/redirect-imds" -j AZWI_PROXY_REDIRECT',
        'iptables nat: OUTPUT jump: unexpected rule 2: -m comment --comment "azwi-proxy/jump" '
        "-j AZWI_PROXY_OUTPUT",
    ]


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ({"protocol": "udp", "udp": {"dport": "53"}, "target": "ACCEPT"},
         "-p udp -m udp --dport 53 -j ACCEPT"),
        ({"src": "10.0.0.0/8", "out-interface": "lo", "target": {"goto": "MESH"}},
         "-s 10.0.0.0/8 -o lo -g MESH"),
        ({"comment": [{"comment": "a b"}, {"comment": "c"}], "target": "RETURN"},
         '-m comment --comment "a b" -m comment --comment "c" -j RETURN'),
        ({"mark": {"mark": "0x1"}, "target": {"MARK": {"set-xmark": "0x2/0xffffffff"}}},
         "-m mark --mark 0x1 -j MARK --set-xmark 0x2/0xffffffff"),
        ({"tcp": {"syn": ""}, "protocol": "tcp", "target": ""}, "-p tcp -m tcp --syn"),
    ],
    ids=["udp-accept", "goto", "two-comments", "target-params", "flag-without-value"],
)
def test_iptables_rule_args_of_rules_of_others(rule: dict[str, Any], expected: str) -> None:
    """A mesh's rules show up in check output; they must read like iptables-save."""
    assert rules.iptables_rule_args(rule) == expected


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ({"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "lo"}},
         "meta oifname != lo"),
        ({"accept": None}, "accept"),
        ({"counter": {"packets": 1, "bytes": 60}}, '{"counter":{"bytes":60,"packets":1}}'),
        ({"match": {"op": "<", "left": {"meta": {"key": "skuid"}}, "right": 5}},
         '{"match":{"left":{"meta":{"key":"skuid"}},"op":"<","right":5}}'),
    ],
    ids=["negated-match", "verdict", "unknown-statement", "unknown-operator"],
)
def test_nft_statement_text_of_rules_of_others(statement: dict[str, Any], expected: str) -> None:
    assert rules.nft_statement_text(statement) == expected
