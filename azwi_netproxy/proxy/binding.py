"""Identity binding: exchanges through the cluster's token proxy, with its own SNI and a rotating CA.

Behaves as azure-identity's token-binding transport does:
- the request goes to AZURE_KUBERNETES_TOKEN_PROXY with the original path
  (/{tenant}/oauth2/v2.0/token) appended to the URL's own path;
- TLS sends AZURE_KUBERNETES_SNI_NAME as the server name and verifies the certificate
  against that name, trusting only the given CA (never the system store);
- AZURE_KUBERNETES_CA_FILE is re-read at every exchange (exchanges are rare: a cache miss
  or a refresh) and a changed CA builds a new client, so pooled connections verified with
  the old CA are closed; an empty or unreadable file mid-rotation keeps the last good CA.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, Any

from azwi_netproxy.errors import UpstreamUnavailable
from azwi_netproxy.proxy.config import IdentityBinding
from azwi_netproxy.proxy.entra import exchange_client

if TYPE_CHECKING:
    # Imported by exchange_client, once the listener is up (run.warm_up), as without binding.
    import httpx

log = logging.getLogger(__name__)


def context_for(ca_pem: str) -> ssl.SSLContext:
    """A client context that trusts exactly `ca_pem`.

    Raises:
        ssl.SSLError: the PEM holds no usable certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cadata=ca_pem)
    return context


class BindingEndpoint:
    def __init__(self, binding: IdentityBinding, *, timeout_s: float) -> None:
        self._binding = binding
        self._base = binding.token_proxy_url.rstrip("/")
        self._timeout_s = timeout_s
        self._extensions: dict[str, Any] = {"sni_hostname": binding.sni_name} if binding.sni_name else {}
        self._ca_pem: str | None = None
        self._client: httpx.AsyncClient | None = None
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def endpoint_id(self) -> str:
        return self._base

    def token_url(self, tenant_id: str) -> str:
        return f"{self._base}/{tenant_id}/oauth2/v2.0/token"

    def client(self) -> tuple[httpx.AsyncClient, dict[str, Any]]:
        """The client for the CA in force now.

        Raises:
            UpstreamUnavailable: no usable CA has been seen yet.
        """
        if self._binding.ca_file:
            self._reload(self._binding.ca_file)
        elif self._client is None and self._binding.ca_data:
            # Built at the first call (run.warm_up's), not with the endpoint: the client
            # imports httpx, which waits until the listener is up. The data was checked
            # at start (config.py).
            self._install(self._binding.ca_data)
        if self._client is None:
            raise UpstreamUnavailable(
                f"No usable CA for the identity-binding token proxy in {self._binding.ca_file}",
                retry_after_s=5,
            )
        return self._client, self._extensions

    def _reload(self, path: str) -> None:
        try:
            with open(path, "rb") as handle:
                raw = handle.read()
        except OSError as exc:
            if self._client is not None:
                log.warning(
                    "cannot read CA file, keeping the last good CA",
                    extra={"path": path, "error": exc.strerror},
                )
            return
        try:
            # PEM is ASCII: anything else is a file caught mid-write or garbled.
            pem = raw.decode("ascii")
        except UnicodeDecodeError:
            if self._client is not None:
                log.warning("CA file is not PEM text, keeping the last good CA", extra={"path": path})
            return
        if pem == self._ca_pem:
            return
        if not pem.strip():
            if self._client is not None:
                log.warning("CA file is empty, keeping the last good CA", extra={"path": path})
            return
        try:
            self._install(pem)
        except (ssl.SSLError, ValueError) as exc:
            log.warning(
                "CA file holds no usable certificate, keeping the last good CA",
                extra={"path": path, "error": str(exc)},
            )
            return
        log.info("loaded identity-binding CA", extra={"path": path})

    def _install(self, pem: str) -> None:
        context = context_for(pem)
        old = self._client
        # Never an environment proxy: the token proxy is in the cluster.
        self._client = exchange_client(ssl_context=context, trust_env=False, timeout_s=self._timeout_s)
        self._ca_pem = pem
        if old is not None:
            # Connections verified with the old CA must not be reused.
            try:
                task = asyncio.get_running_loop().create_task(old.aclose())
            except RuntimeError:
                return
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
