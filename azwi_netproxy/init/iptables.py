"""The legacy iptables backend, through python-iptables (libiptc); never the iptables binary.

Rules:
1. python-iptables drives libiptc, which reaches only the *legacy* xtables backend, not
   iptables-nft. That is the case this backend exists for: a namespace where another init
   container (a mesh's) already uses legacy iptables. A namespace using iptables-nft shows
   nft tables instead, and `auto` picks the nft backend there.
2. Our objects are the chains in `rules.IPT_OWNED_CHAINS` and the rules of the builtin OUTPUT
   chains whose comment starts with `azwi-proxy/`. Our chains are compared with the plan and,
   when different, flushed and refilled (NMI's "ensure", linkerd's flush-and-refill); the jump
   is inserted at the top only when absent. Rules of others are never flushed or reordered.
3. All changes to a table go through one libiptc handle with autocommit off and are committed
   once, so each table changes atomically; nat is committed before filter.
4. python-iptables caches its Table handles per process (`iptc.Table._cache`), so every use
   starts with `refresh()`, and the init runs as its own process inside the target namespace
   (`ip netns exec`) rather than switching namespaces under a long-lived process.
5. Probes never create a table: opening a legacy table that the namespace does not have yet
   instantiates it, so `/proc/net/ip_tables_names` (the tables this namespace has) is read
   first, and a table not listed there holds nothing of anybody's.
6. `iptc` is imported lazily: the nft path, --dry-run and --help never need libxtables.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from azwi_netproxy.errors import RuleInstallError
from azwi_netproxy.init import rules
from azwi_netproxy.init.backend import NEEDS_CAP_NET_ADMIN, BackendName, is_permission_error

log = logging.getLogger(__name__)

TABLES_FILE: Final = Path("/proc/net/ip_tables_names")
# The tables python-iptables can open (iptc.Table.ALL), without importing it for the list.
_KNOWN_TABLES: Final = ("filter", "nat", "mangle", "raw", "security")
_OUR_TABLES: Final = ("nat", "filter")


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """Turn python-iptables' exceptions into RuleInstallError naming the cause.

    It raises IPTCError, XTablesError, ValueError or AttributeError depending on the layer
    that failed, so the translation catches them all, at this one edge.
    """
    try:
        yield
    except RuleInstallError:
        raise
    except Exception as exc:
        text = str(exc) or type(exc).__name__
        if is_permission_error(text):
            raise RuleInstallError(f"iptables: {what} was refused ({text}): {NEEDS_CAP_NET_ADMIN}") from exc
        raise RuleInstallError(f"iptables: {what} failed: {text}") from exc


def _is_ours(rule: rules.IptcRule) -> bool:
    comments = rule.get("comment")
    for comment in comments if isinstance(comments, list) else [comments]:
        if isinstance(comment, dict) and str(comment.get("comment", "")).startswith(rules.COMMENT_PREFIX):
            return True
    return False


class IptablesBackend:
    """Our rules as chains of our own in the legacy nat and filter tables."""

    def __init__(self, tables_file: Path = TABLES_FILE) -> None:
        self._tables_file = tables_file
        self._iptc: Any = None
        self._easy: Any = None

    @property
    def name(self) -> BackendName:
        return "iptables"

    # -- plumbing --------------------------------------------------------------------------

    def _lib(self) -> tuple[Any, Any]:
        """The iptc and iptc.easy modules.

        Raises:
            RuleInstallError: python-iptables or the libiptc/libxtables it loads is missing.
        """
        if self._iptc is None:
            try:
                # The one untyped import; `unused-ignore` because pyproject also lists iptc
                # under ignore_missing_imports.
                import iptc.easy  # type: ignore[import-untyped, unused-ignore]
            except Exception as exc:  # ImportError, OSError or XTablesError from its loader
                raise RuleInstallError(
                    f"iptables: python-iptables cannot load libiptc/libxtables: {exc}"
                ) from exc
            self._iptc, self._easy = iptc, iptc.easy
        return self._iptc, self._easy

    def _live_tables(self) -> set[str]:
        """The legacy tables this namespace has (without creating any).

        Raises:
            RuleInstallError: the file is unreadable (not root in the namespace).
        """
        try:
            text = self._tables_file.read_text("ascii")
        except FileNotFoundError:
            # ip_tables is not loaded at all: no legacy table exists anywhere.
            return set()
        except PermissionError as exc:
            raise RuleInstallError(
                f"iptables: reading {self._tables_file} was refused ({exc.strerror}): {NEEDS_CAP_NET_ADMIN}"
            ) from exc
        except OSError as exc:
            raise RuleInstallError(f"iptables: cannot read {self._tables_file}: {exc.strerror}") from exc
        return set(text.split())

    def _open(self, name: str) -> Any:
        iptc, _ = self._lib()
        with _translated(f"opening the {name} table"):
            table = iptc.Table(name, autocommit=False)
            table.autocommit = False
            table.refresh()
        return table

    def _decode(self, rule: Any) -> rules.IptcRule:
        _, easy = self._lib()
        decoded: rules.IptcRule = easy.decode_iptc_rule(rule)
        decoded.pop("counters", None)
        return decoded

    def _encode(self, entry: rules.IptcRule) -> Any:
        # encode_iptc_rule mutates its argument and skips what it cannot encode without a
        # word; install() reads everything back and compares, so a skipped match is caught.
        _, easy = self._lib()
        return easy.encode_iptc_rule(copy.deepcopy(entry))

    def _rules_of(self, table: Any, chain: str) -> list[rules.IptcRule]:
        iptc, _ = self._lib()
        return [self._decode(r) for r in iptc.Chain(table, chain).rules]

    def _observe(self, name: str, live: set[str]) -> rules.IptablesTable:
        """Our part of one table as the kernel holds it."""
        if name not in live:
            return rules.IptablesTable(name=name)
        table = self._open(name)
        with _translated(f"listing the {name} table"):
            chains = tuple(
                (chain, tuple(self._rules_of(table, chain)))
                for chain in rules.IPT_OWNED_CHAINS[name]
                if table.is_chain(chain)
            )
            jumps = tuple(
                (position, rule)
                for position, rule in enumerate(self._rules_of(table, rules.IPT_HOOK_CHAIN), 1)
                if _is_ours(rule)
            )
        return rules.IptablesTable(name=name, chains=chains, jumps=jumps)

    def _apply(self, want: rules.IptablesTable) -> bool:
        """Make our part of one table `want` in one commit; True if anything changed."""
        iptc, _ = self._lib()
        table = self._open(want.name)
        wanted = dict(want.chains)
        desired_jump = want.jumps[0][1] if want.jumps else None
        changed = False
        with _translated(f"updating the {want.name} table"):
            for chain in wanted:
                if not table.is_chain(chain):
                    table.create_chain(chain)
                    changed = True
            for chain, entries in wanted.items():
                if self._rules_of(table, chain) != list(entries):
                    table.flush_entries(chain)
                    ours = iptc.Chain(table, chain)
                    for entry in entries:
                        ours.append_rule(self._encode(entry))
                    changed = True
            hook = iptc.Chain(table, rules.IPT_HOOK_CHAIN)
            kept = False
            for rule in list(hook.rules):
                decoded = self._decode(rule)
                if not _is_ours(decoded):
                    continue
                if decoded == desired_jump and not kept:
                    kept = True  # where it is: moving it would reorder others' rules
                    continue
                hook.delete_rule(rule)
                changed = True
            if desired_jump is not None and not kept:
                hook.insert_rule(self._encode(desired_jump), 0)
                changed = True
            # Chains of ours the plan no longer has (fail-closed switched off): the jumps to
            # them are gone by now, so they can be flushed and deleted.
            for chain in rules.IPT_OWNED_CHAINS[want.name]:
                if chain not in wanted and table.is_chain(chain):
                    table.flush_entries(chain)
                    table.delete_chain(chain)
                    changed = True
            if changed:
                table.commit()
            table.refresh()
        return changed

    # -- Backend ---------------------------------------------------------------------------

    def unsupported_reason(self) -> str | None:
        # Importing python-iptables costs about 0.4 s (distutils, libxtables), and most runs
        # never open a legacy table, so the probe only looks for the package. A missing
        # shared library still surfaces, as RuleInstallError, when a table is first opened.
        if self._iptc is None and importlib.util.find_spec("iptc") is None:
            return "python-iptables is not installed"
        return None

    def present(self) -> bool:
        live = self._live_tables()
        for name in _OUR_TABLES:
            ours = self._observe(name, live)
            if ours.chains or ours.jumps:
                return True
        return False

    def in_use_by_others(self) -> bool:
        live = self._live_tables()
        for name in _KNOWN_TABLES:
            if name not in live:
                continue
            iptc, _ = self._lib()
            table = self._open(name)
            with _translated(f"listing the {name} table"):
                for chain in table.chains:
                    if not table.builtin_chain(chain.name):
                        if chain.name not in rules.IPT_OWNED_CHAINS.get(name, ()):
                            return True
                        continue
                    if any(not _is_ours(r) for r in self._rules_of(table, chain.name)):
                        return True
                    policy, _counters = table.get_policy(chain.name)
                    if policy is not None and policy.name != iptc.Policy.ACCEPT:
                        return True
        return False

    def install(self, ruleset: rules.Ruleset) -> None:
        live = self._live_tables()
        for want in rules.iptables_plan(ruleset):
            if not want.chains and want.name not in live:
                continue  # nothing of ours can be there, and opening it would create it
            changed = self._apply(want)
            log.debug(
                "iptables table updated" if changed else "iptables table already as planned",
                extra={"backend": self.name, "table": want.name},
            )
        differences = self.check(ruleset)
        if differences:
            raise RuleInstallError(
                "iptables: the kernel holds other rules than the ones committed (is an xtables "
                "extension such as owner, conntrack, comment or REDIRECT missing?): " + "; ".join(differences)
            )

    def check(self, ruleset: rules.Ruleset) -> list[str]:
        live = self._live_tables()
        differences: list[str] = []
        for want in rules.iptables_plan(ruleset):
            differences += rules.iptables_diff(want, self._observe(want.name, live))
        return differences

    def cleanup(self) -> bool:
        live = self._live_tables()
        removed = False
        for name in _OUR_TABLES:
            if name in live:
                removed = self._apply(rules.IptablesTable(name=name)) or removed
        return removed

    def listing(self) -> str:
        live = self._live_tables()
        return rules.iptables_text([self._observe(name, live) for name in _OUR_TABLES])
