"""The init's configuration: upstream's variables and flags, checked once, up front.

Pure: the caller (cli.py) hands in the parsed flags and the environment; every check raises
ConfigError naming the flag or variable. The CNI plugin builds the same InitConfig from its
network configuration, so one rule model serves both front ends.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from azwi_netproxy.errors import ConfigError
from azwi_netproxy.settings import (
    DEFAULT_METADATA_IP,
    DEFAULT_METADATA_PORT,
    DEFAULT_PROXY_PORT,
    DEFAULT_PROXY_UID,
    PassthroughPolicy,
    flag_or_env,
    parse_ipv4,
    parse_log_level,
    parse_passthrough,
    parse_port,
    parse_uid,
)

Backend = Literal["auto", "nftables", "iptables"]
InitAction = Literal["install", "dry-run", "check", "cleanup"]
# The sidecar's pass-through policy (its --passthrough / AZWI_PASSTHROUGH): only "all" needs
# the proxy's uid exempted from the redirect.
Passthrough = PassthroughPolicy


@dataclass(frozen=True, slots=True, kw_only=True)
class InitConfig:
    proxy_port: int = DEFAULT_PROXY_PORT
    proxy_uid: int = DEFAULT_PROXY_UID
    metadata_ip: str = DEFAULT_METADATA_IP
    metadata_port: int = DEFAULT_METADATA_PORT
    backend: Backend = "auto"
    action: InitAction = "install"
    # Fail closed: nothing but the exempt pass-through reaches METADATA_IP except through the proxy.
    fail_closed: bool = True
    # "none": no uid is exempt from the redirect (the sidecar never reaches IMDS itself).
    passthrough: Passthrough = "all"
    log_level: str = "info"


def load(flags: Mapping[str, object], environ: Mapping[str, str]) -> InitConfig:
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
        flag_or_env(flags.get("proxy_port"), environ, "PROXY_PORT", DEFAULT_PROXY_PORT),  # type: ignore[arg-type]
        "PROXY_PORT" if flags.get("proxy_port") is None else "--proxy-port",
    )
    proxy_uid = parse_uid(
        flag_or_env(flags.get("proxy_uid"), environ, "PROXY_UID", DEFAULT_PROXY_UID),  # type: ignore[arg-type]
        "PROXY_UID" if flags.get("proxy_uid") is None else "--proxy-uid",
    )
    metadata_ip = parse_ipv4(
        str(flag_or_env(flags.get("metadata_ip"), environ, "METADATA_IP", DEFAULT_METADATA_IP)),
        "METADATA_IP" if flags.get("metadata_ip") is None else "--metadata-ip",
    )
    metadata_port = parse_port(
        flag_or_env(flags.get("metadata_port"), environ, "METADATA_PORT", DEFAULT_METADATA_PORT),  # type: ignore[arg-type]
        "METADATA_PORT" if flags.get("metadata_port") is None else "--metadata-port",
    )
    passthrough = parse_passthrough(
        str(flag_or_env(flags.get("passthrough"), environ, "AZWI_PASSTHROUGH", "all")),
        "AZWI_PASSTHROUGH" if flags.get("passthrough") is None else "--passthrough",
    )
    return InitConfig(
        proxy_port=proxy_port,
        proxy_uid=proxy_uid,
        metadata_ip=metadata_ip,
        metadata_port=metadata_port,
        backend=backend,  # type: ignore[arg-type]
        action=action,  # type: ignore[arg-type]
        fail_closed=not bool(flags.get("allow_other_metadata_traffic")),
        passthrough=passthrough,
        log_level=log_level,
    )
