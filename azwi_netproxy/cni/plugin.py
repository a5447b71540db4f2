"""The plugin's I/O: join the pod's network namespace, act with the init's rules, answer.

Rules:
1. The pod's namespace comes as an open descriptor (`AZWI_CNI_NETNS_FD`, which the node
   shim opens from CNI_NETNS before it enters the agent's mount namespace, where that path
   does not exist) or, run directly, as the path CNI_NETNS. The whole process joins it
   before any netfilter call: python-iptables works in-process, nft is a child that
   inherits it.
2. ADD and CHECK for a pod that did not ask for the redirect touch nothing.
3. DEL succeeds when the namespace, or our rules in it, are already gone (spec: DEL must
   tolerate missing resources), and when the kernel refuses to remove them (they go with
   the namespace, which the runtime removes next); it removes only ours.
4. The rules, backends and their logs are the init's (azwi_netproxy.init.run); this module
   adds the CNI codes: a failed install is code 100, rules not in place at CHECK 101.
5. Node mode: ADD installs rules that exempt no uid, records the pod's enrolment under the
   run dir and returns only once the node process listens in the pod's namespace for it
   (the namespace passed to it as a descriptor); no node process is code 11 (the runtime
   retries), a node process that cannot serve the pod is code 102, or 7 for the pod's own
   values. DEL removes the record first and tells the node process, if it runs, to stop
   serving the pod; the record's absence is what keeps a restarting node process from
   serving a deleted pod.
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
from azwi_netproxy.errors import ConfigError, RuleInstallError
from azwi_netproxy.settings import DEFAULT_RUN_DIR

log = logging.getLogger(__name__)

NETNS_FD_VARIABLE: Final = "AZWI_CNI_NETNS_FD"
RUN_DIR_VARIABLE: Final = "AZWI_CNI_RUN_DIR"
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


def _enter(invocation: Invocation, environ: Mapping[str, str]) -> int | None:
    """Join the pod's network namespace; its open descriptor, or None if it is gone (DEL
    only tolerates that).

    Raises:
        CniError: the namespace is missing (ADD, CHECK: code 3) or cannot be joined (5).
    """
    fd = _open_netns(invocation, environ)
    if fd is None:
        if invocation.command == "DEL":
            return None
        raise CniError(
            spec.UNKNOWN_CONTAINER, f"the pod's network namespace {invocation.netns} does not exist"
        )
    try:
        _setns(fd)
    except OSError as exc:
        if invocation.command == "DEL" and exc.errno == errno.EINVAL:
            return None
        raise CniError(
            spec.IO_FAILURE,
            f"cannot join the pod's network namespace {invocation.netns}",
            exc.strerror or str(exc),
        ) from None
    return fd


def _run_dir(environ: Mapping[str, str]) -> str:
    """AZWI_CNI_RUN_DIR, which the node shim sets from the agent's (as the node process's)."""
    return environ.get(RUN_DIR_VARIABLE, "") or DEFAULT_RUN_DIR


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

        _release_from_node(invocation, environ)
        if _enter(invocation, environ) is None:
            log.info("the pod's network namespace is gone: nothing to remove", extra=_context(invocation))
            return None
        try:
            init_run.remove_rules(invocation.cleanup)
        except RuleInstallError as exc:
            # DEL must not fail where nothing can be done (spec: DEL tolerates what is not
            # there): after a failed ADD our rules may never have been installed (a backend
            # that cannot work here, a table another program owns), and whatever is left goes
            # with the namespace the runtime removes next. A failed DEL would leave the
            # runtime unable to remove the sandbox at all.
            log.warning(
                "could not remove the redirect's rules; they go with the pod's network namespace",
                extra={**_context(invocation), "error": str(exc)},
            )
        return None
    if invocation.rules is None:
        log.info("the pod did not ask for the redirect", extra=_context(invocation))
        return spec.result_for(invocation) if invocation.command == "ADD" else None
    from azwi_netproxy.init import run as init_run

    netns_fd = _enter(invocation, environ)
    if invocation.command == "CHECK":
        try:
            differences = init_run.rule_differences(invocation.rules)
        except RuleInstallError as exc:
            raise CniError(spec.RULES_FAILED, "could not read the redirect's rules", str(exc)) from None
        if differences:
            raise CniError(spec.RULES_DIFFER, "the redirect's rules are not in place", "; ".join(differences))
        if invocation.node is not None:
            _check_node(invocation, environ)
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
    if invocation.node is not None:
        assert netns_fd is not None  # ADD fails above without the namespace
        _enrol_with_node(invocation, environ, netns_fd)
    return result


# ---- node mode ------------------------------------------------------------------------------


def _enrol_with_node(invocation: Invocation, environ: Mapping[str, str], netns_fd: int) -> None:
    """Record the pod and have the node process listen in its namespace before ADD returns.

    Raises:
        CniError: 11 without a node process, 7 for the pod's values, 102 when the node
            process cannot serve the pod (the record is removed in each case).
    """
    from azwi_netproxy import nodecontrol
    from azwi_netproxy.enrolment import enrolment

    node = invocation.node
    assert node is not None and invocation.rules is not None
    run_dir = _run_dir(environ)
    try:
        record = enrolment(
            container_id=invocation.container_id,
            pod_uid=node.pod_uid,
            pod=invocation.pod,
            netns=invocation.netns,
            # This process is in the pod's namespace now: the cookie is the pod's.
            netns_cookie=nodecontrol.current_netns_cookie(),
            proxy_port=invocation.rules.proxy_port,
            client_id=node.client_id,
            tenant_id=node.tenant_id,
            identity_map=node.identity_map,
        )
    except ConfigError as exc:
        raise CniError(spec.INVALID_CONFIG, str(exc)) from None
    except OSError as exc:
        raise CniError(spec.NODE_FAILED, "cannot read the network namespace's cookie (Linux 5.14 or later)",
                       str(exc)) from None
    nodecontrol.write_record(run_dir, record)
    try:
        nodecontrol.call(run_dir, {"op": "add", "enrolment": record.to_json()}, fd=netns_fd)
    except nodecontrol.NodeUnavailable as exc:
        nodecontrol.remove_record(run_dir, invocation.container_id)
        raise CniError(
            spec.TRY_AGAIN_LATER,
            "the azwi-netproxy node process is not running on this node",
            f"{exc}; the pod asked for node mode; the runtime retries once it runs",
        ) from None
    except nodecontrol.NodeRefused as exc:
        nodecontrol.remove_record(run_dir, invocation.container_id)
        code = spec.INVALID_CONFIG if exc.kind == "invalid" else spec.NODE_FAILED
        raise CniError(code, "the azwi-netproxy node process cannot serve the pod", str(exc)) from None
    log.info("node process serves the pod", extra={**_context(invocation), "pod_uid": node.pod_uid})


def _check_node(invocation: Invocation, environ: Mapping[str, str]) -> None:
    """CHECK: the node process serves this sandbox.

    Raises:
        CniError: 11 without a node process, 103 when it does not serve the pod.
    """
    from azwi_netproxy import nodecontrol

    try:
        answer = nodecontrol.call(_run_dir(environ), {"op": "check", "container_id": invocation.container_id})
    except (nodecontrol.NodeUnavailable, nodecontrol.NodeRefused) as exc:
        raise CniError(spec.TRY_AGAIN_LATER, "the node process does not answer", str(exc)) from None
    if answer.get("serving") is not True:
        raise CniError(spec.NODE_NOT_SERVING, "the azwi-netproxy node process does not serve the pod")


def _release_from_node(invocation: Invocation, environ: Mapping[str, str]) -> None:
    """DEL: remove the pod's record (even while no node process runs) and, if it had one,
    tell the node process to stop serving it. Never fails DEL: a node process that does not
    answer drops the pod when it finds the record gone (node.py's reconcile)."""
    from azwi_netproxy import nodecontrol

    run_dir = _run_dir(environ)
    if not nodecontrol.remove_record(run_dir, invocation.container_id):
        return
    try:
        nodecontrol.call(run_dir, {"op": "del", "container_id": invocation.container_id}, timeout_s=5.0)
    except (nodecontrol.NodeUnavailable, nodecontrol.NodeRefused, OSError) as exc:
        log.info("node process not told of the DEL", extra={**_context(invocation), "error": str(exc)})
        return
    log.info("node process released the pod", extra=_context(invocation))
