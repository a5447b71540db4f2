"""Open a listening socket inside another network namespace, and come back.

The node process serves each pod through a listener on 127.0.0.1 in that pod's own network
namespace (as Istio's ztunnel does, src/inpod/netns.rs): a socket belongs to the namespace
its creator was in when it made it, and stays there wherever its descriptor goes. So the
calling thread enters the pod's namespace, makes and binds the socket, and returns to its
own. setns(2) on a network namespace changes only the calling thread; nothing else runs on
this thread meanwhile (the call is synchronous), so no other socket is made in the pod's
namespace by mistake.

If the thread cannot return to its own namespace, every socket it made afterwards (token
exchanges with Entra included) would be made inside a pod: the process stops at once
rather than go on (ztunnel refuses to go on as well).

Needs CAP_SYS_ADMIN (setns). Must not know: pods, HTTP, enrolment records.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
from typing import Final

from azwi_netproxy.nodecontrol import current_netns_cookie

log = logging.getLogger(__name__)

_CLONE_NEWNET: Final = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


class NotThatNamespace(OSError):
    """The descriptor names another namespace than the one expected (its cookie differs)."""


def listen_in(
    netns_fd: int, host: str, port: int, *, expected_cookie: int, backlog: int = 128
) -> socket.socket:
    """A TCP socket listening on host:port inside the network namespace `netns_fd` names.

    Before anything is bound there, the namespace's cookie must be `expected_cookie`: a
    path (and even an inode number) can name another pod's namespace later, a cookie never
    names two namespaces in one boot.

    Raises:
        NotThatNamespace: the cookie differs (nothing was bound).
        OSError: the namespace cannot be entered, or the address cannot be bound there
            (the calling thread is back in its own namespace either way).
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(netns_fd)
        try:
            cookie = current_netns_cookie()
            if cookie != expected_cookie:
                raise NotThatNamespace(f"namespace cookie {cookie}, not {expected_cookie}")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
                sock.listen(backlog)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
        finally:
            _return_home(own)
    finally:
        os.close(own)
    return sock


def _return_home(own: int) -> None:
    try:
        _setns(own)
    except OSError as exc:  # pragma: no cover - the kernel never refuses a namespace we came from
        log.critical("cannot return to the node process's own network namespace", extra={"error": str(exc)})
        os.abort()
