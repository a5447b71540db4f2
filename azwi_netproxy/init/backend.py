"""The seam between the init's decisions (`initrun`) and the kernel's netfilter.

Rules:
1. A backend owns exactly our objects: the nft table `ip azwi_proxy`, or the iptables chains
   named in `rules.IPT_OWNED_CHAINS` plus the jump rules carrying our comment. Nothing of
   others is ever flushed, deleted or moved.
2. Every kernel or permission failure leaves a backend as `RuleInstallError` naming the cause
   (`needs CAP_NET_ADMIN` for EPERM/EACCES), never as a library's own exception.
3. Probes (`unsupported_reason`, `present`, `in_use_by_others`, `check`, `listing`) change
   nothing in the namespace.
4. A backend knows nothing of flags or environment: it gets a `Ruleset`.
"""

from __future__ import annotations

from typing import Final, Literal, Protocol

from azwi_netproxy.init.rules import Ruleset

BackendName = Literal["nftables", "iptables"]

NEEDS_CAP_NET_ADMIN: Final = (
    "needs CAP_NET_ADMIN in the pod's network namespace (the init container: root with the "
    "NET_ADMIN capability; the CNI plugin: the agent's privileged container), and no other "
    "program may own a table or chain by our name"
)


def is_permission_error(text: str) -> bool:
    """Whether a tool's or library's error text is the kernel's EPERM/EACCES."""
    lowered = text.lower()
    return any(
        marker in lowered for marker in ("operation not permitted", "permission denied", "you must be root")
    )


class Backend(Protocol):
    """One way of putting our rules into the pod's network namespace."""

    @property
    def name(self) -> BackendName: ...

    def unsupported_reason(self) -> str | None:
        """None when this backend can work here, else why not (tool or kernel support missing).

        Raises:
            RuleInstallError: the probe was refused (permissions): no other backend can help.
        """
        ...

    def present(self) -> bool:
        """Whether any object of ours exists.

        Raises:
            RuleInstallError: the kernel refused the listing.
        """
        ...

    def in_use_by_others(self) -> bool:
        """Whether the namespace already holds tables, chains or rules that are not ours.

        Raises:
            RuleInstallError: the kernel refused the listing.
        """
        ...

    def install(self, ruleset: Ruleset) -> None:
        """Make our objects exactly `ruleset`, leaving everything else as it is.

        Raises:
            RuleInstallError: the kernel refused, or (iptables, where a match the library
                cannot encode is skipped silently) read back something else than asked.
        """
        ...

    def check(self, ruleset: Ruleset) -> list[str]:
        """Differences between `ruleset` and what is installed; empty when in place.

        Raises:
            RuleInstallError: the kernel refused the listing.
        """
        ...

    def cleanup(self) -> bool:
        """Remove our objects and nothing else; True if there was something to remove.

        Raises:
            RuleInstallError: the kernel refused.
        """
        ...

    def listing(self) -> str:
        """Our objects as the kernel holds them, in the backend's own syntax ('' if none).

        Raises:
            RuleInstallError: the kernel refused the listing.
        """
        ...
