"""The init container's desired netfilter state, as data, and its renderings.

Rules:
1. Pure: no subprocess, sockets, files or iptc. `netfilter/` applies what this module
   renders and reads the kernel; `initrun` decides what to do.
2. The whole desired state is rendered at once, so a backend applies it as one unit: one nft
   transaction (add table, delete table, re-create: twice leaves one copy), or one libiptc
   commit per table.
3. Every rule carries the comment `azwi-proxy/<purpose>`: that is how an operator, `--check`
   and `--cleanup` tell our rules from a mesh's (linkerd's `proxy-init/<purpose>` idea).
4. nft expressions are written in the form `nft -j list` prints them back, and iptables rules
   in the form `iptc.easy.decode_iptc_rule` returns them, so `--check` is a plain comparison
   (tests/test_init_netns.py proves both round trips on a real kernel).

What the rules do:
- nat OUTPUT: TCP from the pod's processes to METADATA_IP:METADATA_PORT is redirected to
  127.0.0.1:PROXY_PORT.
- filter OUTPUT (fail closed, on by default): anything else to METADATA_IP is rejected. The
  filter hook (priority 0) runs after the nat hook (priority -100), so a redirected packet
  arrives there with daddr 127.0.0.1 and passes; what still carries METADATA_IP is another
  port or protocol.
- The exemption, only where the sidecar's pass-through needs it (`exempt_uid`): TCP from
  PROXY_UID to METADATA_IP:METADATA_PORT, and nothing else of that uid, skips both. Any
  process that can become that uid (root in the pod can) reaches the real IMDS through it,
  so every mode that needs no pass-through (`--passthrough none`, node mode) installs none.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from azwi_netproxy.init.config import InitConfig

COMMENT_PREFIX: Final = "azwi-proxy/"

NFT_FAMILY: Final = "ip"
NFT_TABLE: Final = "azwi_proxy"
NFT_NAT_CHAIN: Final = "nat_output"
NFT_FILTER_CHAIN: Final = "filter_output"
# The nat output hook has no named "dstnat" priority in nft; -100 is NF_IP_PRI_NAT_DST.
NFT_NAT_PRIORITY: Final = -100
NFT_FILTER_PRIORITY: Final = 0

IPT_HOOK_CHAIN: Final = "OUTPUT"
IPT_OUTPUT_CHAIN: Final = "AZWI_PROXY_OUTPUT"
IPT_REDIRECT_CHAIN: Final = "AZWI_PROXY_REDIRECT"
IPT_FILTER_CHAIN: Final = "AZWI_PROXY_FILTER"
IPT_JUMP_COMMENT: Final = COMMENT_PREFIX + "jump"
# Every chain name we may ever have created, per table: cleanup and stale-chain removal look
# only for these, so a mesh's chains are never touched.
IPT_OWNED_CHAINS: Final[Mapping[str, tuple[str, ...]]] = {
    "nat": (IPT_OUTPUT_CHAIN, IPT_REDIRECT_CHAIN),
    "filter": (IPT_FILTER_CHAIN,),
}

Hook = Literal["nat", "filter"]
Verdict = Literal["return", "redirect", "reject-tcp-reset", "reject"]
# One rule as python-iptables' `iptc.easy` dicts describe it (counters left out).
IptcRule = dict[str, Any]
NftObject = dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One backend-neutral rule: all given matches, then the verdict."""

    hook: Hook
    purpose: str
    verdict: Verdict
    uid: int | None = None
    daddr: str | None = None
    protocol: Literal["tcp"] | None = None
    dport: int | None = None
    established: bool = False
    to_port: int | None = None

    @property
    def comment(self) -> str:
        return COMMENT_PREFIX + self.purpose


@dataclass(frozen=True, slots=True, kw_only=True)
class Ruleset:
    """The configuration values the rules depend on."""

    proxy_port: int
    # The uid whose TCP to METADATA_IP:METADATA_PORT skips the redirect (the sidecar's
    # pass-through); None: nothing is exempt, whatever uid a process runs as.
    exempt_uid: int | None
    metadata_ip: str
    metadata_port: int
    fail_closed: bool = True

    @classmethod
    def from_config(cls, cfg: InitConfig) -> Ruleset:
        return cls(
            proxy_port=cfg.proxy_port,
            exempt_uid=cfg.proxy_uid if cfg.passthrough == "all" else None,
            metadata_ip=cfg.metadata_ip,
            metadata_port=cfg.metadata_port,
            fail_closed=cfg.fail_closed,
        )

    def rules(self) -> tuple[Rule, ...]:
        """The desired rules in evaluation order, nat hook first."""
        ip, port = self.metadata_ip, self.metadata_port
        nat = (
            *self._exemption("nat"),
            Rule(
                hook="nat",
                purpose="redirect-imds",
                daddr=ip,
                protocol="tcp",
                dport=port,
                verdict="redirect",
                to_port=self.proxy_port,
            ),
        )
        if not self.fail_closed:
            return nat
        established: tuple[Rule, ...] = ()
        if self.exempt_uid is not None:
            # The proxy's own connections to IMDS must be able to close: after close() the
            # socket is orphaned, `meta skuid`/`-m owner` no longer match its FIN and RST, and
            # the kernel's TIME_WAIT replies carry no socket at all. Conntrack still knows the
            # flow. Nothing else can be established to that port, because the first packet of
            # any other flow is rejected below (its conntrack entry is never confirmed).
            # Without an exemption nothing is ever established there.
            established = (
                Rule(
                    hook="filter",
                    purpose="established",
                    daddr=ip,
                    protocol="tcp",
                    dport=port,
                    established=True,
                    verdict="return",
                ),
            )
        return (
            *nat,
            *self._exemption("filter"),
            *established,
            Rule(
                hook="filter", purpose="fail-closed-tcp", daddr=ip, protocol="tcp", verdict="reject-tcp-reset"
            ),
            Rule(hook="filter", purpose="fail-closed", daddr=ip, verdict="reject"),
        )

    def _exemption(self, hook: Hook) -> tuple[Rule, ...]:
        """Only what pass-through needs: the uid's TCP to IMDS's own port. Its other traffic to
        the address (other ports, UDP, ICMP) is redirected or rejected like anyone's."""
        if self.exempt_uid is None:
            return ()
        return (
            Rule(
                hook=hook,
                purpose="proxy-uid-bypass",
                uid=self.exempt_uid,
                daddr=self.metadata_ip,
                protocol="tcp",
                dport=self.metadata_port,
                verdict="return",
            ),
        )


# ---------------------------------------------------------------------------------------------
# nftables


def _nft_chain_names(ruleset: Ruleset) -> tuple[tuple[Hook, str], ...]:
    chains: tuple[tuple[Hook, str], ...] = (("nat", NFT_NAT_CHAIN),)
    if ruleset.fail_closed:
        chains += (("filter", NFT_FILTER_CHAIN),)
    return chains


def nft_chains(ruleset: Ruleset) -> list[NftObject]:
    """Our base chains, each as the body of a JSON `chain` object (as `nft -j list` shows it)."""
    chains: list[NftObject] = []
    for hook, name in _nft_chain_names(ruleset):
        chains.append(
            {
                "family": NFT_FAMILY,
                "table": NFT_TABLE,
                "name": name,
                "type": hook,
                "hook": "output",
                "prio": NFT_NAT_PRIORITY if hook == "nat" else NFT_FILTER_PRIORITY,
                "policy": "accept",
            }
        )
    return chains


def _nft_match(left: NftObject, right: object, op: str = "==") -> NftObject:
    return {"match": {"op": op, "left": left, "right": right}}


def nft_expr(rule: Rule) -> list[NftObject]:
    """The JSON statements of one rule."""
    expr: list[NftObject] = []
    if rule.uid is not None:
        expr.append(_nft_match({"meta": {"key": "skuid"}}, rule.uid))
    if rule.daddr is not None:
        expr.append(_nft_match({"payload": {"protocol": "ip", "field": "daddr"}}, rule.daddr))
    # `tcp dport` and `reject with tcp reset` make nft add `meta l4proto tcp` by itself (and
    # leave it out of listings); an explicit one is only needed when neither is present.
    if rule.protocol is not None and rule.dport is None and rule.verdict != "reject-tcp-reset":
        expr.append(_nft_match({"meta": {"key": "l4proto"}}, rule.protocol))
    if rule.dport is not None:
        expr.append(_nft_match({"payload": {"protocol": "tcp", "field": "dport"}}, rule.dport))
    if rule.established:
        expr.append(_nft_match({"ct": {"key": "state"}}, ["established", "related"], op="in"))
    if rule.verdict == "return":
        expr.append({"return": None})
    elif rule.verdict == "redirect":
        expr.append({"redirect": {"port": rule.to_port}})
    elif rule.verdict == "reject-tcp-reset":
        expr.append({"reject": {"type": "tcp reset"}})
    else:
        expr.append({"reject": {"type": "icmp", "expr": "port-unreachable"}})
    return expr


def nft_rules(ruleset: Ruleset) -> list[NftObject]:
    """Our rules in chain order, each as the body of a JSON `rule` object (no handle)."""
    chain_of = dict(_nft_chain_names(ruleset))
    return [
        {
            "family": NFT_FAMILY,
            "table": NFT_TABLE,
            "chain": chain_of[rule.hook],
            "comment": rule.comment,
            "expr": nft_expr(rule),
        }
        for rule in ruleset.rules()
    ]


def nft_document(ruleset: Ruleset) -> dict[str, list[NftObject]]:
    """The whole install as ONE `nft -j -f -` transaction.

    `add table` then `delete table` clears whatever copy of our table exists (and cannot fail
    when there is none), then the table is built again. The kernel applies all of it or
    nothing, so there is no moment with half of our rules, and no other table is touched.
    """
    table = {"family": NFT_FAMILY, "name": NFT_TABLE}
    commands: list[NftObject] = [
        {"metainfo": {"json_schema_version": 1}},
        {"add": {"table": dict(table)}},
        {"delete": {"table": dict(table)}},
        {"add": {"table": dict(table)}},
    ]
    commands += [{"add": {"chain": chain}} for chain in nft_chains(ruleset)]
    commands += [{"add": {"rule": rule}} for rule in nft_rules(ruleset)]
    return {"nftables": commands}


def nft_cleanup_document() -> dict[str, list[NftObject]]:
    """Delete our table, and only it, in one transaction that also succeeds when it is absent."""
    table = {"family": NFT_FAMILY, "name": NFT_TABLE}
    return {
        "nftables": [
            {"metainfo": {"json_schema_version": 1}},
            {"add": {"table": dict(table)}},
            {"delete": {"table": dict(table)}},
        ]
    }


def _nft_operand(value: object) -> str | None:
    """nft syntax for the left or right side of a match we render; None if unknown."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str | int):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    if not isinstance(value, dict) or len(value) != 1:
        return None
    ((kind, body),) = value.items()
    if not isinstance(body, dict):
        return None
    if kind == "meta":
        return f"meta {body.get('key')}"
    if kind == "ct":
        return f"ct {body.get('key')}"
    if kind == "payload" and set(body) == {"protocol", "field"}:
        return f"{body['protocol']} {body['field']}"
    return None


def nft_statement_text(statement: Mapping[str, Any]) -> str:
    """nft syntax for one JSON statement; unknown statements are shown as compact JSON."""
    fallback = json.dumps(statement, separators=(",", ":"), sort_keys=True)
    if len(statement) != 1:
        return fallback
    ((kind, body),) = statement.items()
    if kind == "match" and isinstance(body, dict):
        left, right = _nft_operand(body.get("left")), _nft_operand(body.get("right"))
        op = body.get("op")
        if left is None or right is None or op not in ("==", "!=", "in"):
            return fallback
        return f"{left} {right}" if op in ("==", "in") else f"{left} != {right}"
    if kind in ("return", "accept", "drop", "continue") and body is None:
        return kind
    if kind == "redirect" and isinstance(body, dict) and set(body) == {"port"}:
        return f"redirect to :{body['port']}"
    if kind == "reject" and body is None:
        return "reject"
    if kind == "reject" and body == {"type": "tcp reset"}:
        return "reject with tcp reset"
    if kind == "reject" and body == {"type": "icmp", "expr": "port-unreachable"}:
        # nft's default for `reject` in an ip table, and how `nft list` prints it.
        return "reject"
    return fallback


def nft_rule_text(rule: Mapping[str, Any]) -> str:
    """One rule (the body of a JSON `rule` object) as a line of `nft list` syntax."""
    expr = rule.get("expr")
    parts = [nft_statement_text(s) for s in expr] if isinstance(expr, list) else ["<no expr>"]
    if rule.get("comment") is not None:
        parts.append(f"comment {json.dumps(rule['comment'])}")
    return " ".join(parts)


def nft_chain_text(chain: Mapping[str, Any]) -> str:
    """The header line of a base chain in `nft list` syntax."""
    prio = chain.get("prio")
    # How `nft list` names the standard filter priority.
    named = "filter" if chain.get("type") == "filter" and prio == 0 else str(prio)
    return (
        f"type {chain.get('type')} hook {chain.get('hook')} priority {named}; policy {chain.get('policy')};"
    )


def nft_text(chains: Sequence[Mapping[str, Any]], rules: Sequence[Mapping[str, Any]]) -> str:
    """A table in the layout `nft list table` prints (for --dry-run and the logs)."""
    lines = [f"table {NFT_FAMILY} {NFT_TABLE} {{"]
    for index, chain in enumerate(chains):
        if index:
            lines.append("")
        lines.append(f"\tchain {chain.get('name')} {{")
        lines.append(f"\t\t{nft_chain_text(chain)}")
        lines += [f"\t\t{nft_rule_text(r)}" for r in rules if r.get("chain") == chain.get("name")]
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines)


def nft_diff(
    ruleset: Ruleset, chains: Sequence[Mapping[str, Any]], rules: Sequence[Mapping[str, Any]]
) -> list[str]:
    """What differs between the desired table and the listed one (handles ignored)."""
    found_chains = {c.get("name"): _without(c, "handle") for c in chains}
    differences: list[str] = []
    for chain in nft_chains(ruleset):
        name = chain["name"]
        found = found_chains.pop(name, None)
        if found is None:
            differences.append(f"nftables: chain {name} is missing")
            continue
        if found != chain:
            differences.append(
                f"nftables: chain {name}: expected '{nft_chain_text(chain)}', found '{nft_chain_text(found)}'"
            )
        want = [r for r in nft_rules(ruleset) if r["chain"] == name]
        have = [_without(r, "handle") for r in rules if r.get("chain") == name]
        differences += _list_diff(f"nftables: chain {name}", want, have, nft_rule_text)
    differences += [f"nftables: unexpected chain {name}" for name in sorted(map(str, found_chains))]
    return differences


# ---------------------------------------------------------------------------------------------
# iptables (legacy, through python-iptables)


@dataclass(frozen=True, slots=True, kw_only=True)
class IptablesTable:
    """Our part of one iptables table: our chains (in creation order) and our jump rules.

    `jumps` holds (1-based position in OUTPUT, rule). The desired state asks for one jump at
    position 1 when it is missing; where an existing jump sits is left alone, because moving
    it would reorder the rules of others.
    """

    name: str
    chains: tuple[tuple[str, tuple[IptcRule, ...]], ...] = ()
    jumps: tuple[tuple[int, IptcRule], ...] = ()


def _iptc_rule(rule: Rule) -> list[tuple[str, IptcRule]]:
    """(chain, dict) pairs for one rule; the redirect becomes a jump plus a REDIRECT rule."""
    entry: IptcRule = {}
    if rule.daddr is not None:
        entry["dst"] = f"{rule.daddr}/32"
    if rule.protocol is not None:
        entry["protocol"] = rule.protocol
    if rule.uid is not None:
        entry["owner"] = {"uid-owner": str(rule.uid)}
    if rule.established:
        entry["conntrack"] = {"ctstate": "RELATED,ESTABLISHED"}
    if rule.dport is not None:
        entry["tcp"] = {"dport": str(rule.dport)}
    entry["comment"] = {"comment": rule.comment}
    chain = IPT_OUTPUT_CHAIN if rule.hook == "nat" else IPT_FILTER_CHAIN
    if rule.verdict == "return":
        return [(chain, {**entry, "target": "RETURN"})]
    if rule.verdict == "reject-tcp-reset":
        return [(chain, {**entry, "target": {"REJECT": {"reject-with": "tcp-reset"}}})]
    if rule.verdict == "reject":
        return [(chain, {**entry, "target": {"REJECT": {"reject-with": "icmp-port-unreachable"}}})]
    # Upstream's layout: the match in AZWI_PROXY_OUTPUT, the REDIRECT in its own chain.
    redirect: IptcRule = {
        "protocol": "tcp",
        "comment": {"comment": COMMENT_PREFIX + "redirect-to-proxy"},
        "target": {"REDIRECT": {"to-ports": str(rule.to_port)}},
    }
    return [(chain, {**entry, "target": IPT_REDIRECT_CHAIN}), (IPT_REDIRECT_CHAIN, redirect)]


def iptables_jump(chain: str) -> IptcRule:
    """The one rule in a builtin OUTPUT chain that sends packets through our chain."""
    return {"comment": {"comment": IPT_JUMP_COMMENT}, "target": chain}


def iptables_plan(ruleset: Ruleset) -> tuple[IptablesTable, IptablesTable]:
    """The desired nat and filter parts; filter is empty when fail-closed is off."""
    per_chain: dict[str, list[IptcRule]] = {
        IPT_REDIRECT_CHAIN: [],
        IPT_OUTPUT_CHAIN: [],
        IPT_FILTER_CHAIN: [],
    }
    for rule in ruleset.rules():
        for chain, entry in _iptc_rule(rule):
            per_chain[chain].append(entry)
    # AZWI_PROXY_REDIRECT comes first: a rule can only jump to a chain that exists.
    nat = IptablesTable(
        name="nat",
        chains=tuple((c, tuple(per_chain[c])) for c in (IPT_REDIRECT_CHAIN, IPT_OUTPUT_CHAIN)),
        jumps=((1, iptables_jump(IPT_OUTPUT_CHAIN)),),
    )
    if not ruleset.fail_closed:
        return nat, IptablesTable(name="filter")
    filter_ = IptablesTable(
        name="filter",
        chains=((IPT_FILTER_CHAIN, tuple(per_chain[IPT_FILTER_CHAIN])),),
        jumps=((1, iptables_jump(IPT_FILTER_CHAIN)),),
    )
    return nat, filter_


def _iptables_value(name: str, value: object) -> str:
    text = str(value)
    if name == "comment" or any(c.isspace() for c in text) or text == "":
        return json.dumps(text)
    return text


def iptables_rule_args(rule: Mapping[str, Any]) -> str:
    """The arguments of one `iptc.easy` rule as iptables-save prints them."""
    parts: list[str] = []
    for key, flag in (
        ("src", "-s"),
        ("dst", "-d"),
        ("in-interface", "-i"),
        ("out-interface", "-o"),
        ("protocol", "-p"),
    ):
        if key in rule:
            parts += [flag, str(rule[key])]
    if "fragment" in rule:
        parts.append("-f")
    for name, params in rule.items():
        if name in (
            "src",
            "dst",
            "in-interface",
            "out-interface",
            "protocol",
            "fragment",
            "target",
            "counters",
        ):
            continue
        for param in params if isinstance(params, list) else [params]:
            parts += ["-m", name]
            if isinstance(param, dict):
                for key, value in param.items():
                    parts.append(f"--{key}")
                    if value != "":
                        parts.append(_iptables_value(name, value))
            else:
                parts += [f"--{name}", _iptables_value(name, param)]
    target = rule.get("target")
    if isinstance(target, str) and target:
        parts += ["-j", target]
    elif isinstance(target, dict) and len(target) == 1:
        ((verb, body),) = target.items()
        if verb == "goto":
            parts += ["-g", str(body)]
        else:
            parts += ["-j", str(verb)]
            for key, value in body.items() if isinstance(body, dict) else ():
                parts.append(f"--{key}")
                if value != "":
                    parts.append(_iptables_value(verb, value))
    return " ".join(parts)


def iptables_text(tables: Sequence[IptablesTable]) -> str:
    """Our chains and jumps in iptables-save layout (for --dry-run and the logs)."""
    lines: list[str] = []
    for table in tables:
        if not table.chains and not table.jumps:
            continue
        lines.append(f"*{table.name}")
        lines += [f":{chain} -" for chain, _ in table.chains]
        lines += [f"-I {IPT_HOOK_CHAIN} {pos} {iptables_rule_args(r)}" for pos, r in table.jumps]
        for chain, rules in table.chains:
            lines += [f"-A {chain} {iptables_rule_args(r)}" for r in rules]
        lines.append("COMMIT")
    return "\n".join(lines)


def iptables_diff(want: IptablesTable, have: IptablesTable) -> list[str]:
    """What differs between our desired and our found part of one table.

    Jump positions are not compared: a rule others inserted above ours is theirs to place.
    """
    where = f"iptables {want.name}"
    differences: list[str] = []
    found = dict(have.chains)
    for chain, rules in want.chains:
        if chain not in found:
            differences.append(f"{where}: chain {chain} is missing")
            continue
        differences += _list_diff(
            f"{where}: chain {chain}", list(rules), list(found.pop(chain)), iptables_rule_args
        )
    differences += [f"{where}: unexpected chain {chain}" for chain in found]
    differences += _list_diff(
        f"{where}: {IPT_HOOK_CHAIN} jump",
        [r for _, r in want.jumps],
        [r for _, r in have.jumps],
        iptables_rule_args,
    )
    return differences


# ---------------------------------------------------------------------------------------------


def render_text(ruleset: Ruleset, backend: Literal["nftables", "iptables"]) -> str:
    """The rules as the chosen backend would hold them, for --dry-run."""
    if backend == "nftables":
        return nft_text(nft_chains(ruleset), nft_rules(ruleset))
    return iptables_text(iptables_plan(ruleset))


def _without(obj: Mapping[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != key}


def _list_diff(
    where: str,
    want: Sequence[Mapping[str, Any]],
    have: Sequence[Mapping[str, Any]],
    text: Callable[[Mapping[str, Any]], str],
) -> list[str]:
    """Position-by-position differences of two rule lists, each side shown as text."""
    differences: list[str] = []
    for index in range(max(len(want), len(have))):
        if index >= len(have):
            differences.append(f"{where}: rule {index + 1} is missing: {text(want[index])}")
        elif index >= len(want):
            differences.append(f"{where}: unexpected rule {index + 1}: {text(have[index])}")
        elif want[index] != have[index]:
            differences.append(
                f"{where}: rule {index + 1}: expected {text(want[index])}; found {text(have[index])}"
            )
    return differences
