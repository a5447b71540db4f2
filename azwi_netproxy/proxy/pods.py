"""The pods a node process serves: add one, drop one, serve them all again after a restart.

Each served pod is a listener on 127.0.0.1:<its port> inside its own network namespace,
answered by an app of its own (its identities, its token file, its slice of the cache) on
the one server every pod shares (server.py). This module owns that set, as ztunnel's
statemanager.rs owns its workloads:

1. `add` builds the pod's app first (a bad value refuses the pod before anything is bound),
   then binds in the namespace, checking its cookie first, then serves. Adding a sandbox
   already served replaces it.
2. `drop` closes the listener and every connection it accepted, and closes the pod's cache
   (its tokens and its running exchanges). The process holds no descriptor of that
   namespace afterwards: the namespace's descriptor is closed as soon as the listener is
   bound, and the listener and its connections are the only sockets made there.
3. `replay` serves the pods of the records left by the CNI plugin (after a restart), each
   only if its namespace path still names the namespace it was enrolled with, and only
   while its record is still there (a DEL may remove it meanwhile); `reconcile` drops the
   served pods whose record is gone (a DEL while this process was down or restarting) and
   tries again the records it could not serve (their port was taken, say), reporting each
   such pod once, not at every try.

Must not know: the control socket's wire format, the CNI spec, netfilter.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from azwi_netproxy.enrolment import Enrolment
from azwi_netproxy.errors import ConfigError
from azwi_netproxy.proxy import netns
from azwi_netproxy.proxy.app import TokenApp
from azwi_netproxy.proxy.cache import TokenCache
from azwi_netproxy.proxy.server import HttpServer, Listener

log = logging.getLogger(__name__)

LISTEN_HOST: Final = "127.0.0.1"


class PodRefused(Exception):
    """The pod cannot be served: `kind` "invalid" (its values) or "failed" (this node)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class PodApp:
    """What answers one pod: its app and the cache the app answers from."""

    app: TokenApp
    cache: TokenCache


@dataclass(slots=True)
class ServedPod:
    enrolment: Enrolment
    listener: Listener
    cache: TokenCache


class PodRegistry:
    def __init__(
        self,
        *,
        server: HttpServer,
        build: Callable[[Enrolment], PodApp],
    ) -> None:
        self._server = server
        self._build = build
        self._pods: dict[str, ServedPod] = {}
        # Records that could not be served again, already reported.
        self._unserved: set[str] = set()

    def __len__(self) -> int:
        return len(self._pods)

    def __contains__(self, container_id: object) -> bool:
        return container_id in self._pods

    def caches(self) -> Iterator[TokenCache]:
        return (pod.cache for pod in self._pods.values())

    async def add(self, enrolment: Enrolment, netns_fd: int) -> None:
        """Serve the pod on its port inside the namespace `netns_fd` names.

        Raises:
            PodRefused: "invalid" for the pod's values, "failed" when the namespace cannot
                be entered or the port cannot be bound there.
        """
        try:
            built = self._build(enrolment)
        except ConfigError as exc:
            raise PodRefused("invalid", str(exc)) from None
        if enrolment.container_id in self._pods:
            await self.drop(enrolment.container_id, reason="enrolled again")
        try:
            sock = netns.listen_in(
                netns_fd, LISTEN_HOST, enrolment.proxy_port, expected_cookie=enrolment.netns_cookie
            )
        except netns.NotThatNamespace as exc:
            await built.cache.aclose()
            raise PodRefused("invalid", f"the network namespace is not the pod's: {exc}") from None
        except OSError as exc:
            await built.cache.aclose()
            raise PodRefused(
                "failed",
                f"cannot listen on {LISTEN_HOST}:{enrolment.proxy_port} in the pod's network namespace: "
                f"{exc.strerror or exc}",
            ) from None
        listener = await self._server.listen(sock, built.app, log_extra={"pod": enrolment.pod})
        self._pods[enrolment.container_id] = ServedPod(enrolment, listener, built.cache)
        log.info(
            "serving pod",
            extra={
                "pod": enrolment.pod,
                "pod_uid": enrolment.pod_uid,
                "port": enrolment.proxy_port,
                "default_client_id": enrolment.client_id,
                "pods": len(self._pods),
            },
        )

    async def drop(self, container_id: str, *, reason: str) -> bool:
        """Stop serving the sandbox and forget its tokens; False if it was not served."""
        pod = self._pods.pop(container_id, None)
        if pod is None:
            return False
        self._server.close_listener(pod.listener)
        await pod.cache.aclose()
        log.info("stopped serving pod", extra={"pod": pod.enrolment.pod, "reason": reason,
                                               "pods": len(self._pods)})
        return True

    async def replay(self, records: Mapping[str, Enrolment], still_enrolled: Callable[[str], bool]) -> None:
        """Serve again the pods of `records` (this process restarted) that are still there:
        their namespace path names the same namespace, and `still_enrolled(container_id)`
        (their record exists) once they are served."""
        for container_id, enrolment in records.items():
            if container_id in self._pods:
                continue
            try:
                fd = os.open(enrolment.netns, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                # The runtime removes the path with the sandbox: the pod is gone, or going.
                self._unservable(container_id, "not serving a pod again: its network namespace is gone",
                                 pod=enrolment.pod, netns=enrolment.netns, error=exc.strerror)
                continue
            try:
                await self.add(enrolment, fd)
            except PodRefused as exc:
                self._unservable(container_id, "cannot serve a pod again", pod=enrolment.pod, error=str(exc))
                continue
            finally:
                os.close(fd)
            self._unserved.discard(container_id)
            if not still_enrolled(container_id):
                await self.drop(container_id, reason="deleted while it was served again")

    async def reconcile(
        self, records: Mapping[str, Enrolment], still_enrolled: Callable[[str], bool]
    ) -> None:
        """Drop the served pods whose record is gone (deleted while nobody told us), and try
        again to serve the records that could not be served."""
        for container_id in [c for c in self._pods if c not in records]:
            await self.drop(container_id, reason="its enrolment record is gone")
        self._unserved &= set(records)
        await self.replay({c: e for c, e in records.items() if c not in self._pods}, still_enrolled)

    def _unservable(self, container_id: str, message: str, **extra: object) -> None:
        if container_id not in self._unserved:
            self._unserved.add(container_id)
            log.warning(message, extra=extra)

    async def aclose(self) -> None:
        for container_id in list(self._pods):
            await self.drop(container_id, reason="the node process stops")
