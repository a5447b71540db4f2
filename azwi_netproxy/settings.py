"""Values every program checks the same way: ports, uids, IPv4 addresses, log levels; and
the defaults and names that more than one program uses.

Pure: strings in, values or ConfigError out; each error names the flag or variable, so the
command line prints one line and exits 2 before anything changes. Each program's own
configuration (proxy/config.py, init/config.py) builds on these.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final, Literal, cast

from azwi_netproxy.errors import ConfigError

DEFAULT_PROXY_PORT: Final = 8000
DEFAULT_PROXY_UID: Final = 1501
DEFAULT_METADATA_IP: Final = "169.254.169.254"
DEFAULT_METADATA_PORT: Final = 80
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
# Where the CNI plugin, its agent and the node process keep their state (AZWI_CNI_RUN_DIR):
# the host's path, mounted at the same path in the DaemonSet's containers.
DEFAULT_RUN_DIR: Final = "/var/run/azwi-netproxy"
# The pod annotations of CNI mode and node mode (CONTRACT.md, azwi-netproxy-cni and "Node
# mode"): the plugin reads them, the migration tool writes them.
CNI_REDIRECT_ANNOTATION: Final = "azwi-netproxy.io/redirect"
CNI_PORT_ANNOTATION: Final = "azwi-netproxy.io/proxy-port"
CNI_PASSTHROUGH_ANNOTATION: Final = "azwi-netproxy.io/passthrough"
NODE_PROXY_ANNOTATION: Final = "azwi-netproxy.io/node-proxy"
NODE_CLIENT_ID_ANNOTATION: Final = "azwi-netproxy.io/client-id"
NODE_TENANT_ID_ANNOTATION: Final = "azwi-netproxy.io/tenant-id"
NODE_IDENTITY_MAP_ANNOTATION: Final = "azwi-netproxy.io/identity-map"
# The sidecar's and the init's pass-through policy (--passthrough, AZWI_PASSTHROUGH), the
# node process's (AZWI_NODE_PASSTHROUGH) and the CNI annotation's.
PassthroughPolicy = Literal["all", "none"]
PASSTHROUGH_POLICIES: Final = ("all", "none")

# Entra client, object and tenant IDs are GUIDs; a tenant may also be named by its domain,
# as azidentity accepts it in the token URL's path.
GUID: Final = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
TENANT: Final = re.compile(r"^[0-9A-Za-z.-]+$")

# What ipaddress.IPv4Address accepts: four decimal octets up to 255, none with a leading
# zero (which inet_aton reads as octal). A pattern, not ipaddress itself (1 ms to import),
# so that what imports this module without checking an address (`--probe`) pays nothing.
_OCTET: Final = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_IPV4: Final = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")

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
    text = value.strip()
    if not _IPV4.fullmatch(text):
        raise ConfigError(f"{name}: {value!r} is not an IPv4 address")
    return text


def flag_or_env(flag: object, environ: Mapping[str, str], env_name: str, default: object) -> object:
    """Flags override the environment, which overrides the default."""
    if flag is not None:
        return flag
    value = environ.get(env_name)
    if value is not None and value.strip() != "":
        return value
    return default


def parse_passthrough(value: str, name: str) -> PassthroughPolicy:
    """A pass-through policy (PASSTHROUGH_POLICIES): the sidecar's, the init's and the node
    process's setting, read alike so that one value in a manifest means one thing.

    Raises:
        ConfigError: anything else.
    """
    text = value.strip()
    if text not in PASSTHROUGH_POLICIES:
        raise ConfigError(f"{name}: {text!r} is not one of {', '.join(PASSTHROUGH_POLICIES)}")
    return cast(PassthroughPolicy, text)


def parse_client_id(value: str, name: str) -> str:
    """A client ID (a GUID), lower-cased.

    Raises:
        ConfigError: anything else.
    """
    text = value.strip()
    if not GUID.match(text):
        raise ConfigError(f"{name}: {value!r} is not a client ID (a GUID)")
    return text.lower()


def parse_tenant_id(value: str, name: str) -> str:
    """A tenant: a GUID or a domain name, as it goes into the token URL's path.

    Raises:
        ConfigError: anything else.
    """
    text = value.strip()
    if not TENANT.match(text):
        raise ConfigError(f"{name}: {value!r} is not a tenant ID (a GUID or a domain name)")
    return text
