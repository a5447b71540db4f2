"""Configuration values of both programs, checked once, up front.

Rules:
1. Everything here is pure: the caller hands in the parsed flags, the environment and a
   file reader. Nothing reads os.environ or argv here.
2. Every check raises ConfigError naming the flag or variable, so the CLI can print one
   clear line and exit 2 before anything is changed.
3. Secrets never live here (tokens are read from files at exchange time) and the CA data
   is masked in repr.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from azwi_netproxy.errors import ConfigError
from azwi_netproxy.identitymap import IdentityMap, parse_identity_map

Backend = Literal["auto", "nftables", "iptables"]
InitAction = Literal["install", "dry-run", "check", "cleanup"]
PassthroughPolicy = Literal["all", "none"]

DEFAULT_PROXY_PORT: Final = 8000
DEFAULT_PROXY_UID: Final = 1501
DEFAULT_METADATA_IP: Final = "169.254.169.254"
DEFAULT_METADATA_PORT: Final = 80
DEFAULT_AUTHORITY_HOST: Final = "https://login.microsoftonline.com/"
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
# A tenant in the token URL's path: a GUID or a domain name, as azidentity accepts one.
_TENANT: Final = re.compile(r"^[0-9A-Za-z.-]+$")
# A server name for TLS: dot-separated labels (underscores tolerated, as some names carry them).
_HOST_NAME: Final = re.compile(r"^[0-9A-Za-z_-]+(\.[0-9A-Za-z_-]+)*$")
_GUID: Final = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


# Upstream's logger (mlog) also knows these names, and the webhook passes its own current
# level to the sidecar and its probe, so all of them must be accepted. An empty value is
# mlog's warning level (the webhook's default); no flag at all is our default, info.
_LOG_LEVEL_ALIASES: Final = {"": "warning", "warn": "warning", "trace": "debug", "all": "debug"}


def parse_log_level(value: object) -> str:
    """debug, info, warning or error (upstream's warn, trace and all accepted too).

    Raises:
        ConfigError: any other name.
    """
    level = "info" if value is None else str(value).strip().lower()
    level = _LOG_LEVEL_ALIASES.get(level, level)
    if level not in LOG_LEVELS:
        raise ConfigError(f"--log-level: {value!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


def parse_port(value: str | int, name: str) -> int:
    """A TCP port 1..65535.

    Raises:
        ConfigError: not a number or out of range.
    """
    try:
        port = int(str(value).strip(), 10)
    except ValueError:
        raise ConfigError(f"{name}: {value!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"{name}: port {port} is out of range 1-65535")
    return port


def parse_uid(value: str | int, name: str) -> int:
    """A numeric uid (names cannot be resolved in a distroless pod).

    Raises:
        ConfigError: not a non-negative number.
    """
    text = str(value).strip()
    if not text.isdigit():
        raise ConfigError(f"{name}: {value!r} is not a numeric uid")
    uid = int(text)
    if uid > 2**32 - 2:
        raise ConfigError(f"{name}: uid {uid} is out of range")
    return uid


def parse_ipv4(value: str, name: str) -> str:
    """A dotted IPv4 address.

    Raises:
        ConfigError: not IPv4.
    """
    try:
        return str(ipaddress.IPv4Address(value.strip()))
    except ValueError:
        raise ConfigError(f"{name}: {value!r} is not an IPv4 address") from None


def _pick(flag: object, environ: Mapping[str, str], env_name: str, default: object) -> object:
    """Flags override the environment, which overrides the default."""
    if flag is not None:
        return flag
    value = environ.get(env_name)
    if value is not None and value.strip() != "":
        return value
    return default


@dataclass(frozen=True, slots=True, kw_only=True)
class InitConfig:
    proxy_port: int = DEFAULT_PROXY_PORT
    proxy_uid: int = DEFAULT_PROXY_UID
    metadata_ip: str = DEFAULT_METADATA_IP
    metadata_port: int = DEFAULT_METADATA_PORT
    backend: Backend = "auto"
    action: InitAction = "install"
    # Fail closed: processes other than the proxy reach METADATA_IP only through the proxy.
    fail_closed: bool = True
    log_level: str = "info"


def load_init(flags: Mapping[str, object], environ: Mapping[str, str]) -> InitConfig:
    """Build the init's configuration from parsed flags (None = not given) and environment.

    Raises:
        ConfigError: any bad value, naming it.
    """
    backend = str(flags.get("backend") or "auto")
    if backend not in ("auto", "nftables", "iptables"):
        raise ConfigError(f"--backend: {backend!r} is not one of auto, nftables, iptables")
    action = str(flags.get("action") or "install")
    if action not in ("install", "dry-run", "check", "cleanup"):
        raise ConfigError(f"unknown action {action!r}")
    log_level = parse_log_level(flags.get("log_level"))
    proxy_port = parse_port(
        _pick(flags.get("proxy_port"), environ, "PROXY_PORT", DEFAULT_PROXY_PORT),  # type: ignore[arg-type]
        "PROXY_PORT" if flags.get("proxy_port") is None else "--proxy-port",
    )
    proxy_uid = parse_uid(
        _pick(flags.get("proxy_uid"), environ, "PROXY_UID", DEFAULT_PROXY_UID),  # type: ignore[arg-type]
        "PROXY_UID" if flags.get("proxy_uid") is None else "--proxy-uid",
    )
    metadata_ip = parse_ipv4(
        str(_pick(flags.get("metadata_ip"), environ, "METADATA_IP", DEFAULT_METADATA_IP)),
        "METADATA_IP" if flags.get("metadata_ip") is None else "--metadata-ip",
    )
    metadata_port = parse_port(
        _pick(flags.get("metadata_port"), environ, "METADATA_PORT", DEFAULT_METADATA_PORT),  # type: ignore[arg-type]
        "METADATA_PORT" if flags.get("metadata_port") is None else "--metadata-port",
    )
    return InitConfig(
        proxy_port=proxy_port,
        proxy_uid=proxy_uid,
        metadata_ip=metadata_ip,
        metadata_port=metadata_port,
        backend=backend,  # type: ignore[arg-type]
        action=action,  # type: ignore[arg-type]
        fail_closed=not bool(flags.get("allow_other_metadata_traffic")),
        log_level=log_level,
    )


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
    identity_map: IdentityMap = field(default_factory=IdentityMap)
    metadata_ip: str = DEFAULT_METADATA_IP
    metadata_port: int = DEFAULT_METADATA_PORT
    passthrough: PassthroughPolicy = "all"
    metrics_port: int | None = None
    # Trust for the authority host (OpenSSL's own variables, honoured as the Go proxy does).
    ssl_cert_file: str | None = None
    ssl_cert_dir: str | None = None
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


def environment_proxies(environ: Mapping[str, str]) -> dict[str, str]:
    """The `<scheme>_proxy` variables as httpx reads them, through urllib's getproxies.

    A lower-case name wins over any other spelling, and an empty lower-case one unsets
    the scheme; under CGI (REQUEST_METHOD set) only a lower-case http_proxy counts. The
    values are not stripped: httpx does not strip them either.
    """
    proxies: dict[str, str] = {}
    for name, value in environ.items():
        if value and name.lower().endswith("_proxy"):
            proxies[name.lower()[:-6]] = value
    if "REQUEST_METHOD" in environ:
        proxies.pop("http", None)
    for name, value in environ.items():
        if name.endswith("_proxy"):
            if value:
                proxies[name.lower()[:-6]] = value
            else:
                proxies.pop(name.lower()[:-6], None)
    return proxies


def exchange_proxies(environ: Mapping[str, str]) -> dict[str, str]:
    """The proxy variables exchanges go through, by scheme: none unless HTTPS_PROXY or
    HTTP_PROXY is set (ALL_PROXY alone is ignored, as the Go proxy ignores it), and then
    what httpx reads, ALL_PROXY included. Judged at start, and decides the exchange client."""
    proxies = environment_proxies(environ)
    if not (proxies.get("https") or proxies.get("http")):
        return {}
    return {scheme: proxies[scheme] for scheme in ("https", "http", "all") if proxies.get(scheme)}


def _check_environment_proxies(environ: Mapping[str, str]) -> None:
    for scheme, value in exchange_proxies(environ).items():
        _check_proxy_url(value, f"{scheme.upper()}_PROXY")


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


def _read_file(
    read_text: Callable[[str], str], path: str, name: str, *, not_text: str = "is not UTF-8 text"
) -> str:
    """The text of the file variable `name` names, or a ConfigError that says why not."""
    try:
        return read_text(path)
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: {path} {not_text}") from None


def _check_trust_store(
    ca_file: str | None, ca_dir: str | None, read_text: Callable[[str], str]
) -> None:
    """SSL_CERT_FILE and SSL_CERT_DIR, which replace the system store for every exchange.

    Raises:
        ConfigError: a file that cannot be read or holds no PEM certificate, or a directory
            list none of whose directories exists. Either would fail every exchange (the Go
            proxy then has an empty root pool); a missing directory among others is allowed,
            as Go and OpenSSL skip it.
    """
    if ca_file:
        text = _read_file(read_text, ca_file, "SSL_CERT_FILE", not_text="holds no PEM certificate")
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise ConfigError(f"SSL_CERT_FILE: {ca_file} holds no PEM certificate")
    if ca_dir and not any(os.path.isdir(directory) for directory in ca_dir.split(":") if directory):
        raise ConfigError(f"SSL_CERT_DIR: {ca_dir!r} names no existing directory")


def load_proxy(
    flags: Mapping[str, object],
    environ: Mapping[str, str],
    read_text: Callable[[str], str],
) -> ProxyConfig:
    """Build the proxy's configuration from parsed flags (None = not given) and environment.

    Raises:
        ConfigError: any bad value or a malformed identity map, naming it.
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
    if not _TENANT.match(tenant_id):
        raise ConfigError(f"AZURE_TENANT_ID: {tenant_id!r} is not a tenant ID (a GUID or a domain name)")
    token_file = environ.get("AZURE_FEDERATED_TOKEN_FILE", "").strip()
    if not token_file:
        raise ConfigError("AZURE_FEDERATED_TOKEN_FILE is not set (the workload identity webhook injects it)")
    authority = environ.get("AZURE_AUTHORITY_HOST", "").strip() or DEFAULT_AUTHORITY_HOST
    parsed = urllib.parse.urlsplit(authority)
    if parsed.scheme not in ("https", "http") or not parsed.hostname:
        raise ConfigError(f"AZURE_AUTHORITY_HOST: {authority!r} is not an https URL")
    if parsed.scheme == "http" and parsed.hostname not in ("localhost", "127.0.0.1"):
        raise ConfigError(f"AZURE_AUTHORITY_HOST: {authority!r} must use https")
    # The token URL is the authority followed by a path: these would break every exchange.
    _check_url_rest(parsed, authority, "AZURE_AUTHORITY_HOST")

    _check_environment_proxies(environ)

    metadata_ip = parse_ipv4(environ.get("METADATA_IP") or DEFAULT_METADATA_IP, "METADATA_IP")
    metadata_port = parse_port(environ.get("METADATA_PORT") or DEFAULT_METADATA_PORT, "METADATA_PORT")

    passthrough = str(flags.get("passthrough") or environ.get("AZWI_PASSTHROUGH") or "all")
    if passthrough not in ("all", "none"):
        raise ConfigError(f"--passthrough: {passthrough!r} is not one of all, none")

    metrics_port: int | None = None
    if flags.get("metrics_port") is not None:
        metrics_port = parse_port(flags["metrics_port"], "--metrics-port")  # type: ignore[arg-type]
        if metrics_port == proxy_port:
            raise ConfigError("--metrics-port must differ from --proxy-port")

    identity_map = IdentityMap()
    map_path = environ.get("AZWI_IDENTITY_MAP", "").strip()
    if map_path:
        text = _read_file(read_text, map_path, "AZWI_IDENTITY_MAP")
        identity_map = parse_identity_map(text, source=map_path)

    default_client_id = environ.get("AZURE_CLIENT_ID", "").strip() or None
    if default_client_id is not None and not _GUID.match(default_client_id):
        raise ConfigError(f"AZURE_CLIENT_ID: {default_client_id!r} is not a client ID (a GUID)")

    identity_binding = _load_binding(environ)
    ssl_cert_file = environ.get("SSL_CERT_FILE", "").strip() or None
    ssl_cert_dir = environ.get("SSL_CERT_DIR", "").strip() or None
    if identity_binding is None:  # identity binding trusts its own CA, not these
        _check_trust_store(ssl_cert_file, ssl_cert_dir, read_text)

    return ProxyConfig(
        proxy_port=proxy_port,
        probe=False,
        log_level=log_level,
        tenant_id=tenant_id,
        default_client_id=default_client_id,
        federated_token_file=token_file,
        authority_host=authority,
        identity_binding=identity_binding,
        identity_map=identity_map,
        metadata_ip=metadata_ip,
        metadata_port=metadata_port,
        passthrough=passthrough,  # type: ignore[arg-type]
        metrics_port=metrics_port,
        ssl_cert_file=ssl_cert_file,
        ssl_cert_dir=ssl_cert_dir,
    )
