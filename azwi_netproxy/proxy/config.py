"""The sidecar's configuration: upstream's flags and the webhook's variables, checked up front.

Rules:
1. Pure: the caller (cli.py) hands in the parsed flags, the environment and the proxies
   the environment names. No file is read here: files.py reads and checks the files
   these values name, at the edge.
2. Every check raises ConfigError naming the flag or variable, so the command line can
   print one clear line and exit 2 before anything starts.
3. Secrets never live here (tokens are read from files at exchange time) and the CA data
   is masked in repr.
"""

from __future__ import annotations

import re
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from azwi_netproxy.errors import ConfigError
from azwi_netproxy.identitymap import IdentityMap
from azwi_netproxy.settings import (
    DEFAULT_METADATA_IP,
    DEFAULT_METADATA_PORT,
    DEFAULT_PROXY_PORT,
    DEFAULT_RUN_DIR,
    GUID,
    PassthroughPolicy,
    flag_or_env,
    parse_ipv4,
    parse_log_level,
    parse_passthrough,
    parse_port,
    parse_tenant_id,
)

DEFAULT_AUTHORITY_HOST: Final = "https://login.microsoftonline.com/"
DEFAULT_KUBELET_PODS_DIR: Final = "/var/lib/kubelet/pods"
# A server name for TLS: dot-separated labels (underscores tolerated, as some names carry them).
_HOST_NAME: Final = re.compile(r"^[0-9A-Za-z_-]+(\.[0-9A-Za-z_-]+)*$")


@dataclass(frozen=True, slots=True, kw_only=True)
class IdentityBinding:
    """AKS identity binding: exchanges go to a cluster-local token proxy over its own TLS."""

    token_proxy_url: str
    sni_name: str | None = None
    ca_file: str | None = None
    ca_data: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        ca = "<inline>" if self.ca_data else None
        return (
            f"IdentityBinding(token_proxy_url={self.token_proxy_url!r}, "
            f"sni_name={self.sni_name!r}, ca_file={self.ca_file!r}, ca_data={ca!r})"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyConfig:
    proxy_port: int = DEFAULT_PROXY_PORT
    probe: bool = False
    log_level: str = "info"
    tenant_id: str
    default_client_id: str | None
    federated_token_file: str
    authority_host: str = DEFAULT_AUTHORITY_HOST
    identity_binding: IdentityBinding | None = None
    # AZWI_IDENTITY_MAP; the map itself is read and parsed at start (files.py).
    identity_map_path: str | None = None
    identity_map: IdentityMap = field(default_factory=IdentityMap)
    metadata_ip: str = DEFAULT_METADATA_IP
    metadata_port: int = DEFAULT_METADATA_PORT
    passthrough: PassthroughPolicy = "all"
    metrics_port: int | None = None
    # Trust for the authority host (OpenSSL's own variables, honoured as the Go proxy does).
    ssl_cert_file: str | None = None
    ssl_cert_dir: str | None = None
    # HTTPS_PROXY / HTTP_PROXY apply to exchanges with the authority host (NO_PROXY too).
    via_environment_proxy: bool = False
    # Bounds on one exchange with Entra, retries included (azure-identity waits about as long).
    exchange_timeout_s: float = 10.0
    exchange_deadline_s: float = 20.0
    cache_max_entries: int = 1024


def _check_https_url(value: str, name: str) -> str:
    """The azure-identity rules for an identity-binding URL: https, no userinfo/query/fragment.

    Raises:
        ConfigError: the URL breaks one of those rules.
    """
    parsed = urllib.parse.urlsplit(value.strip())
    if parsed.scheme.lower() != "https":
        raise ConfigError(f"{name}: {value!r} must be an https URL")
    if not parsed.hostname:
        raise ConfigError(f"{name}: {value!r} has no host")
    _check_url_rest(parsed, value, name)
    return value.strip()


def _check_url_rest(parsed: urllib.parse.SplitResult, value: str, name: str) -> None:
    """No user info, query or fragment, and a valid port: a path is appended to this URL."""
    if parsed.username is not None or parsed.password is not None:
        raise ConfigError(f"{name}: must not contain user info")
    if parsed.query or parsed.fragment or value.strip().endswith(("?", "#")):
        raise ConfigError(f"{name}: {value!r} must not contain a query or fragment")
    try:
        parsed.port  # noqa: B018 - raises for a bad port
    except ValueError:
        raise ConfigError(f"{name}: {value!r} has a bad port") from None


def _check_proxy_url(value: str, name: str) -> None:
    """An HTTP proxy as httpx (and Go) take one: http:// or https://, or a bare host:port.

    Raises:
        ConfigError: a blank value or one with spaces around it (httpx would take it as it
            is, a host named by the spaces), another scheme (socks needs a package the
            image does not ship), no host, or a bad port. Checked at start: at the first
            exchange it would be a 500.
    """
    text = value.strip()
    if not text:
        raise ConfigError(f"{name} is blank: unset it, or give a proxy URL")
    parsed = urllib.parse.urlsplit(text if "://" in text else f"http://{text}")
    # A proxy URL may carry a password: never repeat it in an error.
    shown = repr(text.replace(parsed.netloc, parsed.netloc.rpartition("@")[2]) if parsed.netloc else text)
    if text != value:
        raise ConfigError(f"{name}: {shown} has blank space around it")
    if parsed.scheme.lower() not in ("http", "https"):
        raise ConfigError(f"{name}: {shown} is not an http or https proxy URL (socks is not supported)")
    if not parsed.hostname:
        raise ConfigError(f"{name}: {shown} has no host")
    try:
        parsed.port  # noqa: B018 - raises for a bad port
    except ValueError:
        raise ConfigError(f"{name}: {shown} has a bad port") from None


def exchange_proxies(proxies: Mapping[str, str]) -> dict[str, str]:
    """Of the proxies the environment names (urllib's getproxies_environment: what httpx
    reads), the ones exchanges go through, by scheme: none unless HTTPS_PROXY or HTTP_PROXY
    is set (ALL_PROXY alone is ignored, as the Go proxy ignores it)."""
    if not (proxies.get("https") or proxies.get("http")):
        return {}
    return {scheme: proxies[scheme] for scheme in ("https", "http", "all") if proxies.get(scheme)}


def _load_binding(environ: Mapping[str, str]) -> IdentityBinding | None:
    url = environ.get("AZURE_KUBERNETES_TOKEN_PROXY", "").strip()
    sni = environ.get("AZURE_KUBERNETES_SNI_NAME", "").strip() or None
    ca_file = environ.get("AZURE_KUBERNETES_CA_FILE", "").strip() or None
    ca_data = environ.get("AZURE_KUBERNETES_CA_DATA", "").strip() or None
    if not url:
        if sni or ca_file or ca_data:
            raise ConfigError(
                "AZURE_KUBERNETES_SNI_NAME, AZURE_KUBERNETES_CA_FILE or AZURE_KUBERNETES_CA_DATA "
                "is set but AZURE_KUBERNETES_TOKEN_PROXY is not"
            )
        return None
    _check_https_url(url, "AZURE_KUBERNETES_TOKEN_PROXY")
    if sni is not None and not _HOST_NAME.match(sni):
        # Sent in every handshake and matched against the certificate: it could never verify.
        raise ConfigError(f"AZURE_KUBERNETES_SNI_NAME: {sni!r} is not a host name")
    if ca_file and ca_data:
        raise ConfigError("AZURE_KUBERNETES_CA_FILE and AZURE_KUBERNETES_CA_DATA are mutually exclusive")
    if ca_data:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=ca_data)
        except (ssl.SSLError, ValueError):
            raise ConfigError("AZURE_KUBERNETES_CA_DATA: holds no PEM certificate") from None
    return IdentityBinding(token_proxy_url=url, sni_name=sni, ca_file=ca_file, ca_data=ca_data)


def load(
    flags: Mapping[str, object],
    environ: Mapping[str, str],
    proxies: Mapping[str, str] | None = None,
) -> ProxyConfig:
    """Build the proxy's configuration from parsed flags (None = not given), the environment
    and the proxies it names (`urllib.request.getproxies_environment()`, read by cli.py).

    The files it names (the identity map, SSL_CERT_FILE) are read and checked at the edge
    that reads them: proxy/files.py.

    Raises:
        ConfigError: any bad value, naming it.
    """
    log_level = parse_log_level(flags.get("log_level"))
    proxy_port = parse_port(flags.get("proxy_port") or DEFAULT_PROXY_PORT, "--proxy-port")  # type: ignore[arg-type]
    probe = bool(flags.get("probe"))
    if probe:
        # The postStart hook runs `/proxy --proxy-port=N --probe` without the sidecar's env.
        return ProxyConfig(
            proxy_port=proxy_port,
            probe=True,
            log_level=log_level,
            tenant_id="",
            default_client_id=None,
            federated_token_file="",
        )

    tenant_id = environ.get("AZURE_TENANT_ID", "").strip()
    if not tenant_id:
        raise ConfigError("AZURE_TENANT_ID is not set (the workload identity webhook injects it)")
    tenant_id = parse_tenant_id(tenant_id, "AZURE_TENANT_ID")
    token_file = environ.get("AZURE_FEDERATED_TOKEN_FILE", "").strip()
    if not token_file:
        raise ConfigError("AZURE_FEDERATED_TOKEN_FILE is not set (the workload identity webhook injects it)")
    exchange = _load_exchange(environ, proxies)
    metadata_ip = parse_ipv4(environ.get("METADATA_IP") or DEFAULT_METADATA_IP, "METADATA_IP")
    metadata_port = parse_port(environ.get("METADATA_PORT") or DEFAULT_METADATA_PORT, "METADATA_PORT")

    passthrough = parse_passthrough(
        str(flag_or_env(flags.get("passthrough"), environ, "AZWI_PASSTHROUGH", "all")),
        "AZWI_PASSTHROUGH" if flags.get("passthrough") is None else "--passthrough",
    )

    metrics_port: int | None = None
    if flags.get("metrics_port") is not None:
        metrics_port = parse_port(flags["metrics_port"], "--metrics-port")  # type: ignore[arg-type]
        if metrics_port == proxy_port:
            raise ConfigError("--metrics-port must differ from --proxy-port")

    map_path = environ.get("AZWI_IDENTITY_MAP", "").strip() or None

    default_client_id = environ.get("AZURE_CLIENT_ID", "").strip() or None
    if default_client_id is not None and not GUID.match(default_client_id):
        raise ConfigError(f"AZURE_CLIENT_ID: {default_client_id!r} is not a client ID (a GUID)")

    return ProxyConfig(
        proxy_port=proxy_port,
        probe=False,
        log_level=log_level,
        tenant_id=tenant_id,
        default_client_id=default_client_id,
        federated_token_file=token_file,
        identity_map_path=map_path,
        metadata_ip=metadata_ip,
        metadata_port=metadata_port,
        passthrough=passthrough,
        metrics_port=metrics_port,
        **exchange,
    )


def _load_exchange(environ: Mapping[str, str], proxies: Mapping[str, str] | None) -> dict[str, Any]:
    """Where exchanges go and how (the sidecar's and the node process's alike): the authority
    host, identity binding, the trust store and the HTTP proxy, as config fields.

    Raises:
        ConfigError: any bad value, naming it.
    """
    authority = environ.get("AZURE_AUTHORITY_HOST", "").strip() or DEFAULT_AUTHORITY_HOST
    parsed = urllib.parse.urlsplit(authority)
    if parsed.scheme not in ("https", "http") or not parsed.hostname:
        raise ConfigError(f"AZURE_AUTHORITY_HOST: {authority!r} is not an https URL")
    if parsed.scheme == "http" and parsed.hostname not in ("localhost", "127.0.0.1"):
        raise ConfigError(f"AZURE_AUTHORITY_HOST: {authority!r} must use https")
    # The token URL is the authority followed by a path: these would break every exchange.
    _check_url_rest(parsed, authority, "AZURE_AUTHORITY_HOST")

    via_proxy = exchange_proxies(proxies or {})
    for scheme, value in via_proxy.items():
        _check_proxy_url(value, f"{scheme.upper()}_PROXY")
    identity_binding = _load_binding(environ)
    return {
        "authority_host": authority,
        "identity_binding": identity_binding,
        "ssl_cert_file": environ.get("SSL_CERT_FILE", "").strip() or None,
        "ssl_cert_dir": environ.get("SSL_CERT_DIR", "").strip() or None,
        # Identity binding's token proxy is in the cluster: never through an HTTP proxy.
        "via_environment_proxy": bool(via_proxy) and identity_binding is None,
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """The node process's configuration (node mode): the exchange as the sidecar's, and what
    every pod it serves shares. A pod's own values (client, tenant, map, port) come with its
    enrolment, not from here."""

    log_level: str = "info"
    check: bool = False
    # For pods without the azwi-netproxy.io/tenant-id annotation; without it they must have one.
    tenant_id: str | None = None
    authority_host: str = DEFAULT_AUTHORITY_HOST
    identity_binding: IdentityBinding | None = None
    metadata_ip: str = DEFAULT_METADATA_IP
    metadata_port: int = DEFAULT_METADATA_PORT
    # Pass-through leaves the node, not the pod: off unless the node's configuration says so.
    passthrough: PassthroughPolicy = "none"
    metrics_port: int | None = None
    ssl_cert_file: str | None = None
    ssl_cert_dir: str | None = None
    via_environment_proxy: bool = False
    exchange_timeout_s: float = 10.0
    exchange_deadline_s: float = 20.0
    # Per pod: a pod asks for a few identities and resources, not a thousand.
    cache_max_entries: int = 64
    kubelet_pods_dir: str = DEFAULT_KUBELET_PODS_DIR
    run_dir: str = DEFAULT_RUN_DIR


def load_node(
    flags: Mapping[str, object],
    environ: Mapping[str, str],
    proxies: Mapping[str, str] | None = None,
) -> NodeConfig:
    """Build the node process's configuration from its flags (None = not given), its
    environment (the DaemonSet's) and the proxies the environment names.

    Raises:
        ConfigError: any bad value, naming it.
    """
    log_level = parse_log_level(flags.get("log_level") or environ.get("LOG_LEVEL") or None)
    run_dir = _absolute_path(environ, "AZWI_CNI_RUN_DIR", DEFAULT_RUN_DIR)
    # Everything is checked for --check too (the readiness probe runs with the container's
    # environment): a setting the node process would refuse is never reported as ready.
    tenant_text = environ.get("AZURE_TENANT_ID", "").strip()
    passthrough = parse_passthrough(
        str(flag_or_env(None, environ, "AZWI_NODE_PASSTHROUGH", "none")), "AZWI_NODE_PASSTHROUGH"
    )
    metrics_port = None
    if flags.get("metrics_port") is not None:
        metrics_port = parse_port(flags["metrics_port"], "--metrics-port")  # type: ignore[arg-type]
    return NodeConfig(
        log_level=log_level,
        check=bool(flags.get("check")),
        tenant_id=parse_tenant_id(tenant_text, "AZURE_TENANT_ID") if tenant_text else None,
        metadata_ip=parse_ipv4(environ.get("METADATA_IP") or DEFAULT_METADATA_IP, "METADATA_IP"),
        metadata_port=parse_port(environ.get("METADATA_PORT") or DEFAULT_METADATA_PORT, "METADATA_PORT"),
        passthrough=passthrough,
        metrics_port=metrics_port,
        kubelet_pods_dir=_absolute_path(environ, "AZWI_KUBELET_PODS_DIR", DEFAULT_KUBELET_PODS_DIR),
        run_dir=run_dir,
        **_load_exchange(environ, proxies),
    )


def _absolute_path(environ: Mapping[str, str], name: str, default: str) -> str:
    value = environ.get(name, "").strip() or default
    if not value.startswith("/"):
        raise ConfigError(f"{name}: {value!r} is not an absolute path")
    return value
