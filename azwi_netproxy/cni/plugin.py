"""The plugin's I/O: join the pod's network namespace, act with the init's rules, answer.

Rules:
1. The pod's namespace comes as an open descriptor (`AZWI_CNI_NETNS_FD`, which the node
   shim opens from CNI_NETNS before it enters the agent's mount namespace, where that path
   does not exist) or, run directly, as the path CNI_NETNS. The whole process joins it
   before any netfilter call: python-iptables works in-process, nft is a child that
   inherits it.
2. ADD and CHECK for a pod that did not ask for the redirect touch nothing.
3. DEL succeeds when the namespace, or our rules in it, are already gone (spec: DEL must
   tolerate missing resources); it removes only ours.
4. The rules, backends and their logs are the init's (azwi_netproxy.init.run); this module
   adds the CNI codes: a failed install is code 100, rules not in place at CHECK 101.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from collections.abc import Mapping
from typing import Any, Final

from azwi_netproxy.cni import spec
from azwi_netproxy.cni.spec import CniError, Invocation
from azwi_netproxy.errors import RuleInstallError

log = logging.getLogger(__name__)

NETNS_FD_VARIABLE: Final = "AZWI_CNI_NETNS_FD"
_CLONE_NEWNET: Final = 0x40000000


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _open_netns(invocation: Invocation, environ: Mapping[str, str]) -> int | None:
    """An open descriptor of the pod's network namespace, or None if it is gone.

    Raises:
        CniError: code 4 for a bad descriptor variable, 5 when it cannot be opened.
    """
    given = environ.get(NETNS_FD_VARIABLE, "")
    if given:
        if not given.isdigit():
            raise CniError(spec.INVALID_ENVIRONMENT, f"{NETNS_FD_VARIABLE}: {given!r} is not a descriptor")
        return int(given)
    if not invocation.netns:
        return None
    try:
        return os.open(invocation.netns, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CniError(
            spec.IO_FAILURE,
            f"cannot open the pod's network namespace {invocation.netns}",
            exc.strerror or str(exc),
        ) from None


def _enter(invocation: Invocation, environ: Mapping[str, str]) -> bool:
    """Join the pod's network namespace; False if it is gone (DEL only tolerates that).

    Raises:
        CniError: the namespace is missing (ADD, CHECK: code 3) or cannot be joined (5).
    """
    fd = _open_netns(invocation, environ)
    if fd is None:
        if invocation.command == "DEL":
            return False
        raise CniError(
            spec.UNKNOWN_CONTAINER, f"the pod's network namespace {invocation.netns} does not exist"
        )
    try:
        _setns(fd)
    except OSError as exc:
        if invocation.command == "DEL" and exc.errno == errno.EINVAL:
            return False
        raise CniError(
            spec.IO_FAILURE,
            f"cannot join the pod's network namespace {invocation.netns}",
            exc.strerror or str(exc),
        ) from None
    return True


def _context(invocation: Invocation) -> dict[str, Any]:
    context = {
        "command": invocation.command,
        "container_id": invocation.container_id,
        "netns": invocation.netns,
    }
    if invocation.pod:
        context["pod"] = invocation.pod
    return context


def run(invocation: Invocation, environ: Mapping[str, str]) -> dict[str, Any] | None:
    """Carry out the invocation; what to print on stdout (None: nothing).

    Raises:
        CniError: the refusal the runtime gets.
    """
    # The init's rules and backends are imported only where they are used: VERSION, and
    # ADD and CHECK of a pod that did not ask, never load them.
    if invocation.command == "VERSION":
        return spec.version_body()
    if invocation.command == "DEL":
        from azwi_netproxy.init import run as init_run

        if not _enter(invocation, environ):
            log.info("the pod's network namespace is gone: nothing to remove", extra=_context(invocation))
            return None
        try:
            init_run.remove_rules(invocation.cleanup)
        except RuleInstallError as exc:
            raise CniError(spec.RULES_FAILED, "could not remove the redirect's rules", str(exc)) from None
        return None
    if invocation.rules is None:
        log.info("the pod did not ask for the redirect", extra=_context(invocation))
        return spec.result_for(invocation) if invocation.command == "ADD" else None
    from azwi_netproxy.init import run as init_run

    _enter(invocation, environ)
    if invocation.command == "CHECK":
        try:
            differences = init_run.rule_differences(invocation.rules)
        except RuleInstallError as exc:
            raise CniError(spec.RULES_FAILED, "could not read the redirect's rules", str(exc)) from None
        if differences:
            raise CniError(spec.RULES_DIFFER, "the redirect's rules are not in place", "; ".join(differences))
        return None
    result = spec.result_for(invocation)
    try:
        backend = init_run.install_rules(invocation.rules)
    except RuleInstallError as exc:
        # Fail closed: the runtime tears the sandbox down and retries; the pod never runs
        # without the rules it asked for.
        raise CniError(spec.RULES_FAILED, "could not install the redirect's rules", str(exc)) from None
    log.info(
        "redirect installed",
        extra={**_context(invocation), "backend": backend, "proxy_port": invocation.rules.proxy_port},
    )
    return result
