"""What the init container does: pick a backend, apply the action, log the outcome.

Rules:
1. It gets a checked `InitConfig` (bad values never get here: cli exits 2 before) and returns
   the exit code: 0 done; 1 a kernel or permission failure, or `--check` found differences.
2. It knows the backends only through the `Backend` protocol: no nft JSON, no iptc here.
3. `auto` prefers what the namespace already uses, so our rules sit next to a mesh's in the
   same framework and their order is defined: first where our own rules already are, then
   nftables if any nft table exists, then legacy iptables if it holds rules, else nftables
   when the kernel has it, else iptables.
4. Logs are fixed messages with values in `extra` (cli installs the JSON formatter). An
   install ends with the rules the kernel holds; --dry-run and --check print to stdout.
5. `run_init` is the init container's front end (exit codes, stdout); `install_rules`,
   `rule_differences` and `remove_rules` are the same actions for the CNI plugin, which
   needs values and exceptions instead.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from typing import IO

from azwi_netproxy.errors import RuleInstallError
from azwi_netproxy.init import rules
from azwi_netproxy.init.backend import Backend, BackendName
from azwi_netproxy.init.config import InitConfig
from azwi_netproxy.init.iptables import IptablesBackend
from azwi_netproxy.init.nft import NftBackend

log = logging.getLogger(__name__)


class _Backends:
    """The two backends, with their support probed at most once."""

    def __init__(self, backends: Mapping[BackendName, Backend]) -> None:
        self.nft = backends["nftables"]
        self.ipt = backends["iptables"]
        self._unsupported: dict[BackendName, str | None] = {}

    def by_name(self, name: BackendName) -> Backend:
        return self.nft if name == "nftables" else self.ipt

    def other(self, backend: Backend) -> Backend:
        return self.ipt if backend.name == "nftables" else self.nft

    def unsupported(self, backend: Backend) -> str | None:
        if backend.name not in self._unsupported:
            self._unsupported[backend.name] = backend.unsupported_reason()
        return self._unsupported[backend.name]

    def usable(self, backend: Backend) -> bool:
        return self.unsupported(backend) is None

    def choose(self, wanted: str) -> tuple[Backend, str]:
        """The backend to act with, and why.

        Raises:
            RuleInstallError: the asked-for backend, or both for auto, cannot work here.
        """
        if wanted in ("nftables", "iptables"):
            chosen = self.by_name("nftables" if wanted == "nftables" else "iptables")
            missing = self.unsupported(chosen)
            if missing is not None:
                raise RuleInstallError(f"--backend {wanted} cannot work here: {missing}")
            return chosen, "asked for with --backend"
        nft, ipt = self.nft, self.ipt
        if self.usable(nft) and nft.present():
            return nft, "our nftables table is already installed"
        if self.usable(ipt) and ipt.present():
            return ipt, "our legacy iptables chains are already installed"
        if self.usable(nft) and nft.in_use_by_others():
            return nft, "the namespace already has nftables tables"
        if self.usable(ipt) and ipt.in_use_by_others():
            return ipt, "the namespace already has legacy iptables rules"
        if self.usable(nft):
            return nft, "the kernel supports nftables and the namespace has no rules yet"
        if self.usable(ipt):
            return ipt, f"nftables cannot work here ({self.unsupported(nft)})"
        raise self.neither()

    def neither(self) -> RuleInstallError:
        return RuleInstallError(
            f"neither backend can work here: nftables: {self.unsupported(self.nft)}; "
            f"iptables: {self.unsupported(self.ipt)}"
        )


def _install(cfg: InitConfig, ruleset: rules.Ruleset, backends: _Backends) -> BackendName:
    backend, reason = backends.choose(cfg.backend)
    log.info("using backend", extra={"backend": backend.name, "reason": reason})
    backend.install(ruleset)
    other = backends.other(backend)
    # Ours from an earlier run with the other --backend would still redirect, maybe to an old
    # port. Removed only after the new rules are in, so there is no moment without them.
    if backends.usable(other) and other.present() and other.cleanup():
        log.info("removed our rules of the other backend", extra={"backend": other.name})
    log.info("installed rules", extra={"backend": backend.name, "rules": backend.listing()})
    return backend.name


def _differences(cfg: InitConfig, ruleset: rules.Ruleset, backends: _Backends) -> list[str]:
    backend, reason = backends.choose(cfg.backend)
    log.info("using backend", extra={"backend": backend.name, "reason": reason})
    differences = backend.check(ruleset)
    other = backends.other(backend)
    if backends.usable(other) and other.present():
        differences.append(f"{other.name}: rules of ours are installed there too")
    if differences:
        log.warning("rules differ", extra={"backend": backend.name, "differences": differences})
    else:
        log.info("rules in place", extra={"backend": backend.name})
    return differences


def _check(cfg: InitConfig, ruleset: rules.Ruleset, backends: _Backends, out: IO[str]) -> int:
    differences = _differences(cfg, ruleset, backends)
    for line in differences:
        out.write(f"{line}\n")
    out.flush()
    return 1 if differences else 0


def _cleanup(cfg: InitConfig, backends: _Backends) -> list[BackendName]:
    if cfg.backend == "auto":
        # Whatever we left in either framework: none of it is anybody else's.
        candidates = [b for b in (backends.nft, backends.ipt) if backends.usable(b)]
        if not candidates:
            raise backends.neither()
    else:
        candidates = [backends.choose(cfg.backend)[0]]
    removed = [b.name for b in candidates if b.present() and b.cleanup()]
    if removed:
        log.info("removed our rules", extra={"backends": removed})
    else:
        log.info("no rules of ours to remove", extra={"backends": [b.name for b in candidates]})
    return removed


def _dry_run(cfg: InitConfig, ruleset: rules.Ruleset, backends: _Backends, out: IO[str]) -> int:
    name: BackendName
    if cfg.backend in ("nftables", "iptables"):
        name, reason = ("nftables" if cfg.backend == "nftables" else "iptables"), "asked for"
    else:
        try:
            chosen, reason = backends.choose("auto")
            name = chosen.name
        except RuleInstallError as exc:
            # A dry run is also for reading the rules on a machine where we may not probe.
            log.warning("cannot probe the namespace, showing the nftables rules", extra={"error": str(exc)})
            name, reason = "nftables", "the namespace could not be probed"
    if name == "nftables":
        log.debug(
            "rendered ruleset",
            extra={
                "backend": name,
                "document": json.dumps(rules.nft_document(ruleset), separators=(",", ":")),
            },
        )
    out.write(rules.render_text(ruleset, name) + "\n")
    out.flush()
    log.info("dry run: nothing changed", extra={"backend": name, "reason": reason})
    return 0


def run_init(
    cfg: InitConfig,
    *,
    backends: Mapping[BackendName, Backend] | None = None,
    out: IO[str] | None = None,
) -> int:
    """Carry out cfg.action and return the exit code (0 done, 1 failure or differences)."""
    ruleset = rules.Ruleset.from_config(cfg)
    chosen = _backends_of(backends)
    stdout = out if out is not None else sys.stdout
    log.debug(
        "desired rules",
        extra={
            "proxy_port": cfg.proxy_port,
            "proxy_uid": cfg.proxy_uid,
            "metadata_ip": cfg.metadata_ip,
            "metadata_port": cfg.metadata_port,
            "fail_closed": cfg.fail_closed,
            "passthrough": cfg.passthrough,
            "action": cfg.action,
        },
    )
    try:
        if cfg.action == "dry-run":
            return _dry_run(cfg, ruleset, chosen, stdout)
        if cfg.action == "check":
            return _check(cfg, ruleset, chosen, stdout)
        if cfg.action == "cleanup":
            _cleanup(cfg, chosen)
            return 0
        _install(cfg, ruleset, chosen)
        return 0
    except RuleInstallError as exc:
        log.error("netfilter rules failed", extra={"action": cfg.action, "error": str(exc)})
        return 1


# ---- the same actions for another front end (the CNI plugin): values and exceptions ----


def _backends_of(backends: Mapping[BackendName, Backend] | None) -> _Backends:
    return _Backends(backends or {"nftables": NftBackend(), "iptables": IptablesBackend()})


def install_rules(cfg: InitConfig, backends: Mapping[BackendName, Backend] | None = None) -> BackendName:
    """Install cfg's rules in the current network namespace; the backend that holds them.

    Raises:
        RuleInstallError: nothing could be installed (the namespace is left as it was or
            with the other backend's earlier rules of ours).
    """
    return _install(cfg, rules.Ruleset.from_config(cfg), _backends_of(backends))


def rule_differences(cfg: InitConfig, backends: Mapping[BackendName, Backend] | None = None) -> list[str]:
    """What differs between cfg's rules and the current namespace's; empty when in place.

    Raises:
        RuleInstallError: the namespace could not be read.
    """
    return _differences(cfg, rules.Ruleset.from_config(cfg), _backends_of(backends))


def remove_rules(cfg: InitConfig, backends: Mapping[BackendName, Backend] | None = None) -> list[BackendName]:
    """Remove our rules (cfg.backend's, or both frameworks' for auto); the backends that had some.

    Raises:
        RuleInstallError: the kernel refused.
    """
    return _cleanup(cfg, _backends_of(backends))
