"""The nftables backend: our table `ip azwi_proxy`, applied with `nft -j -f -`.

Rules:
1. The install is ONE JSON transaction rendered by `rules.nft_document` (as kube-proxy's
   nftables mode and firewalld do): the kernel takes all of it or none of it. No rule-by-rule
   calls.
2. Only our table is ever added or deleted; other tables (a mesh's, iptables-nft's) are only
   listed, to answer `in_use_by_others`.
3. `nft` is run with an argument list and a timeout, never through a shell; its stderr becomes
   the text of RuleInstallError.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from azwi_netproxy.errors import RuleInstallError
from azwi_netproxy.init import rules
from azwi_netproxy.init.backend import NEEDS_CAP_NET_ADMIN, BackendName, is_permission_error

log = logging.getLogger(__name__)

# PATH in a minimal image may lack the sbin directories where nft lives.
_NFT_FALLBACKS: Final = ("/usr/sbin/nft", "/sbin/nft", "/usr/local/sbin/nft")
_TIMEOUT_S: Final = 30.0


class NftBackend:
    """Our rules as one nftables table, changed only in whole-table transactions."""

    def __init__(self, nft: str | None = None) -> None:
        self._nft = nft

    @property
    def name(self) -> BackendName:
        return "nftables"

    def _executable(self) -> str | None:
        if self._nft is None:
            found = shutil.which("nft")
            if found is None:
                found = next((p for p in _NFT_FALLBACKS if Path(p).is_file()), None)
            self._nft = found
        return self._nft

    def _run(self, args: Sequence[str], what: str, stdin: str | None = None) -> str:
        """Run nft, return its stdout.

        Raises:
            RuleInstallError: nft is missing, timed out, or failed (EPERM named as such).
        """
        exe = self._executable()
        if exe is None:
            raise RuleInstallError(f"nftables: {what} failed: the nft command is not installed")
        try:
            proc = subprocess.run(
                [exe, *args],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise RuleInstallError(
                f"nftables: {what} failed: nft did not answer within {_TIMEOUT_S:.0f} s"
            ) from None
        except OSError as exc:
            raise RuleInstallError(f"nftables: {what} failed: cannot run {exe}: {exc}") from exc
        if proc.returncode != 0:
            detail = " ".join(proc.stderr.split()) or f"exit status {proc.returncode}"
            if is_permission_error(proc.stderr):
                raise RuleInstallError(f"nftables: {what} was refused ({detail}): {NEEDS_CAP_NET_ADMIN}")
            raise RuleInstallError(f"nftables: {what} failed: {detail}")
        return proc.stdout

    def _objects(self, args: Sequence[str], what: str) -> list[dict[str, Any]]:
        """The objects of a JSON listing (metainfo dropped)."""
        text = self._run(["-j", *args], what)
        try:
            document = json.loads(text)
            objects = document["nftables"]
        except (ValueError, KeyError, TypeError) as exc:
            raise RuleInstallError(f"nftables: {what}: nft printed no JSON listing") from exc
        return [o for o in objects if isinstance(o, dict) and "metainfo" not in o]

    def _tables(self) -> list[tuple[str, str]]:
        objects = self._objects(["list", "tables"], "listing the tables")
        return [(str(o["table"].get("family")), str(o["table"].get("name"))) for o in objects if "table" in o]

    def unsupported_reason(self) -> str | None:
        if self._executable() is None:
            return "the nft command is not installed"
        try:
            self._tables()
        except RuleInstallError as exc:
            if NEEDS_CAP_NET_ADMIN in str(exc):
                raise
            # Anything else (no nf_tables in the kernel, an nft without JSON) means: not here.
            return str(exc)
        return None

    def present(self) -> bool:
        return (rules.NFT_FAMILY, rules.NFT_TABLE) in self._tables()

    def in_use_by_others(self) -> bool:
        return any(t != (rules.NFT_FAMILY, rules.NFT_TABLE) for t in self._tables())

    def install(self, ruleset: rules.Ruleset) -> None:
        document = json.dumps(rules.nft_document(ruleset), separators=(",", ":"))
        log.debug("nft transaction", extra={"backend": self.name, "document": document})
        self._run(["-j", "-f", "-"], "installing table ip azwi_proxy", stdin=document)
        # nft rejects what it cannot install and the transaction is all or nothing, so a
        # difference here can only be another nft version listing the same rules in another
        # form: worth a warning (and a bug report), not a pod that never starts.
        differences = self.check(ruleset)
        if differences:
            log.warning(
                "nft lists the installed rules differently",
                extra={"backend": self.name, "differences": differences},
            )

    def _listed(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        objects = self._objects(
            ["list", "table", rules.NFT_FAMILY, rules.NFT_TABLE], "listing table ip azwi_proxy"
        )
        chains = [o["chain"] for o in objects if "chain" in o]
        listed_rules = [o["rule"] for o in objects if "rule" in o]
        return chains, listed_rules

    def check(self, ruleset: rules.Ruleset) -> list[str]:
        if not self.present():
            return [f"nftables: table {rules.NFT_FAMILY} {rules.NFT_TABLE} is missing"]
        chains, listed_rules = self._listed()
        return rules.nft_diff(ruleset, chains, listed_rules)

    def cleanup(self) -> bool:
        if not self.present():
            return False
        document = json.dumps(rules.nft_cleanup_document(), separators=(",", ":"))
        self._run(["-j", "-f", "-"], "deleting table ip azwi_proxy", stdin=document)
        return True

    def listing(self) -> str:
        if not self.present():
            return ""
        # nft's own text, not our rendering: what the kernel holds, in the syntax operators know.
        text = self._run(["list", "table", rules.NFT_FAMILY, rules.NFT_TABLE], "listing table ip azwi_proxy")
        return text.rstrip("\n")
