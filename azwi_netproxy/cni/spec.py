"""What the CNI spec says a plugin invocation is, as data: parsing, checking, answering.

Pure: `parse` gets the environment and stdin bytes, `result_for` and `error_body` build what
goes to stdout. No file, no namespace, no netfilter here (plugin.py does those).

Rules (CNI spec 1.0.0, "Execution Protocol" and "Error"; configs of 0.3.1 and 0.4.0 too):
1. Every refusal is a `CniError` with one of the spec's codes: 1 incompatible version, 2 a
   field we do not know in our config, 4 a missing or bad CNI_ variable, 6 stdin that is not
   JSON, 7 a bad value in the config or the pod's annotations, 11 try again later; ours are
   100 and up. Refusing a pod's annotation with 7 fails its sandbox: it asked for something
   we cannot do, so it must not start without it (fail closed).
2. The result of ADD is prevResult unchanged, converted to the config's cniVersion: 1.0.0
   dropped `ips[].version`, which 0.3.x and 0.4.0 require.
3. Keys that the runtime or the spec put into every plugin's config are accepted; any other
   key that is not one of ours is refused (code 2), so that a misspelt `proxyport` cannot
   silently send a pod's traffic to the default port.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from azwi_netproxy.enrolment import check_identity_map, check_pod_uid
from azwi_netproxy.errors import ConfigError
from azwi_netproxy.init.config import InitConfig, Passthrough
from azwi_netproxy.settings import (
    CNI_PASSTHROUGH_ANNOTATION,
    CNI_PORT_ANNOTATION,
    CNI_REDIRECT_ANNOTATION,
    DEFAULT_METADATA_IP,
    DEFAULT_METADATA_PORT,
    DEFAULT_PROXY_PORT,
    DEFAULT_PROXY_UID,
    NODE_CLIENT_ID_ANNOTATION,
    NODE_IDENTITY_MAP_ANNOTATION,
    NODE_PROXY_ANNOTATION,
    NODE_TENANT_ID_ANNOTATION,
    PASSTHROUGH_POLICIES,
    parse_client_id,
    parse_ipv4,
    parse_log_level,
    parse_port,
    parse_tenant_id,
    parse_uid,
)

SUPPORTED_VERSIONS: Final = ("0.3.1", "0.4.0", "1.0.0")
# 0.3.0 results have the same shape as 0.3.1's; runtimes still write it in old conflists.
_ACCEPTED_VERSIONS: Final = frozenset({"0.3.0", *SUPPORTED_VERSIONS})
PLUGIN_TYPE: Final = "azwi-netproxy"
ANNOTATIONS_CAPABILITY: Final = "io.kubernetes.cri.pod-annotations"
REDIRECT_ANNOTATION: Final = CNI_REDIRECT_ANNOTATION
PORT_ANNOTATION: Final = CNI_PORT_ANNOTATION
PASSTHROUGH_ANNOTATION: Final = CNI_PASSTHROUGH_ANNOTATION

Command = Literal["ADD", "DEL", "CHECK", "VERSION"]
_COMMANDS: Final = ("ADD", "DEL", "CHECK", "VERSION")

# Spec codes (section "Error") and ours.
INCOMPATIBLE_VERSION: Final = 1
UNSUPPORTED_FIELD: Final = 2
UNKNOWN_CONTAINER: Final = 3
INVALID_ENVIRONMENT: Final = 4
IO_FAILURE: Final = 5
UNDECODABLE: Final = 6
INVALID_CONFIG: Final = 7
TRY_AGAIN_LATER: Final = 11
RULES_FAILED: Final = 100
RULES_DIFFER: Final = 101
# Node mode: the node process could not serve the pod, or (CHECK) does not serve it.
NODE_FAILED: Final = 102
NODE_NOT_SERVING: Final = 103

_STANDARD_KEYS: Final = frozenset(
    {
        "cniVersion",
        "cniVersions",
        "name",
        "type",
        "capabilities",
        "runtimeConfig",
        "prevResult",
        "args",
        "ipam",
        "dns",
        "disableCheck",
        "disableGC",
    }
)
_OUR_KEYS: Final = frozenset({"proxyPort", "proxyUID", "metadataIP", "metadataPort", "backend", "logLevel"})
_TRUE: Final = "true"
_FALSE: Final = "false"


class CniError(Exception):
    """A refusal the runtime gets as the spec's error JSON and a non-zero exit."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeRequest:
    """A pod that asked for node mode: what the node process needs to serve it (checked)."""

    pod_uid: str
    client_id: str | None
    tenant_id: str | None
    identity_map: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Invocation:
    """One checked call of the plugin."""

    command: Command
    cni_version: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    # What ADD and CHECK act on; None for pods that did not ask for the redirect.
    rules: InitConfig | None = None
    # Node mode (its rules, in `rules`, exempt no uid); None for other pods.
    node: NodeRequest | None = None
    # What DEL removes: ours, in the config's backend (both frameworks for auto).
    cleanup: InitConfig = field(default_factory=lambda: InitConfig(action="cleanup"))
    prev_result: Mapping[str, Any] | None = None
    log_level: str = "info"
    # "namespace/name" from CNI_ARGS (K8S_POD_NAMESPACE, K8S_POD_NAME), for the logs only.
    pod: str = ""


def version_body() -> dict[str, Any]:
    return {"cniVersion": SUPPORTED_VERSIONS[-1], "supportedVersions": list(SUPPORTED_VERSIONS)}


def error_body(error: CniError, cni_version: str = SUPPORTED_VERSIONS[-1]) -> dict[str, Any]:
    body: dict[str, Any] = {"cniVersion": cni_version, "code": error.code, "msg": error.msg}
    if error.details:
        body["details"] = error.details
    return body


def _decode(stdin: bytes) -> dict[str, Any]:
    try:
        config = json.loads(stdin)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CniError(UNDECODABLE, "the network configuration on stdin is not JSON", str(exc)) from None
    if not isinstance(config, dict):
        raise CniError(UNDECODABLE, "the network configuration on stdin is not a JSON object")
    return config


def _version_of(config: Mapping[str, Any]) -> str:
    version = config.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(INVALID_CONFIG, "the network configuration has no cniVersion")
    if version not in _ACCEPTED_VERSIONS:
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"cniVersion {version} is not supported",
            f"supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    return version


def _config_value(config: Mapping[str, Any], key: str, default: str | int) -> str | int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise CniError(INVALID_CONFIG, f"{key}: {value!r} is not a string or a number")
    return value


def _settings(config: Mapping[str, Any]) -> tuple[InitConfig, str]:
    """The init's rule config from our keys, and the log level.

    Raises:
        CniError: code 2 for a key we do not know, 7 for a bad value.
    """
    unknown = sorted(set(config) - _STANDARD_KEYS - _OUR_KEYS)
    if unknown:
        raise CniError(
            UNSUPPORTED_FIELD,
            f"unknown key {unknown[0]!r} in the azwi-netproxy configuration",
            f"known keys: {', '.join(sorted(_OUR_KEYS))}",
        )
    backend = config.get("backend", "auto")
    if backend not in ("auto", "nftables", "iptables"):
        raise CniError(INVALID_CONFIG, f"backend: {backend!r} is not one of auto, nftables, iptables")
    try:
        log_level = parse_log_level(config.get("logLevel"))
        rules = InitConfig(
            proxy_port=parse_port(_config_value(config, "proxyPort", DEFAULT_PROXY_PORT), "proxyPort"),
            proxy_uid=parse_uid(_config_value(config, "proxyUID", DEFAULT_PROXY_UID), "proxyUID"),
            metadata_ip=parse_ipv4(
                str(_config_value(config, "metadataIP", DEFAULT_METADATA_IP)), "metadataIP"
            ),
            metadata_port=parse_port(
                _config_value(config, "metadataPort", DEFAULT_METADATA_PORT), "metadataPort"
            ),
            backend=backend,
        )
    except ConfigError as exc:
        raise CniError(INVALID_CONFIG, str(exc).replace("--log-level", "logLevel")) from None
    return rules, log_level


def check_settings(settings: Mapping[str, Any]) -> None:
    """Raise the CniError the plugin would give for these keys of its config."""
    _settings(settings)


def _annotations(config: Mapping[str, Any]) -> Mapping[str, Any]:
    runtime = config.get("runtimeConfig")
    if runtime is None:
        return {}
    if not isinstance(runtime, dict):
        raise CniError(INVALID_CONFIG, "runtimeConfig is not an object")
    annotations = runtime.get(ANNOTATIONS_CAPABILITY)
    if annotations is None:
        return {}
    if not isinstance(annotations, dict):
        raise CniError(INVALID_CONFIG, f"runtimeConfig[{ANNOTATIONS_CAPABILITY!r}] is not an object")
    return annotations


def _asks(annotations: Mapping[str, Any], name: str) -> bool:
    """Whether the boolean annotation `name` says "true".

    Raises:
        CniError: code 7 for a value other than "true" or "false".
    """
    value = annotations.get(name)
    if value is None:
        return False
    # Kubernetes annotation values are strings; the same spelling the webhook's are.
    if not isinstance(value, str) or value.strip().lower() not in (_TRUE, _FALSE):
        raise CniError(INVALID_CONFIG, f'annotation {name}: {value!r} is not "true" or "false"')
    return value.strip().lower() == _TRUE


def wanted_rules(config: Mapping[str, Any], base: InitConfig) -> InitConfig | None:
    """The rules this pod asked for with its annotations (CNI mode), or None if it did not ask.

    Raises:
        CniError: code 7 for an annotation value we cannot act on.
    """
    annotations = _annotations(config)
    if not _asks(annotations, REDIRECT_ANNOTATION):
        return None
    return dataclasses.replace(
        base, proxy_port=_port_annotation(annotations, base), passthrough=_passthrough_annotation(annotations)
    )


def _optional(
    annotations: Mapping[str, Any], name: str, parse: Callable[[str, str], str]
) -> str | None:
    """The annotation's value checked by `parse` (which names what it checks), or None.

    Raises:
        CniError: code 7, naming the annotation.
    """
    value = annotations.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise CniError(INVALID_CONFIG, f"annotation {name}: {value!r} is not a string")
    try:
        return parse(value, f"annotation {name}")
    except ConfigError as exc:
        raise CniError(INVALID_CONFIG, str(exc)) from None


def wanted_node(
    config: Mapping[str, Any], base: InitConfig, cni_args: Mapping[str, str]
) -> tuple[InitConfig, NodeRequest] | None:
    """The rules and node-process request of a pod that asked for node mode, or None.

    The rules exempt no uid: nothing in the pod, whatever uid it runs as, reaches the
    metadata address except through the node process's listener.

    Raises:
        CniError: code 7 for an annotation we cannot act on (named), or a pod that asks
            for both modes; code 4 when the runtime passes no K8S_POD_UID.
    """
    annotations = _annotations(config)
    if not _asks(annotations, NODE_PROXY_ANNOTATION):
        return None
    if _asks(annotations, REDIRECT_ANNOTATION):
        raise CniError(
            INVALID_CONFIG,
            f"annotations {NODE_PROXY_ANNOTATION} and {REDIRECT_ANNOTATION} both ask: choose one mode",
        )
    pod_uid = cni_args.get("K8S_POD_UID", "")
    if not pod_uid:
        raise CniError(
            INVALID_ENVIRONMENT,
            "CNI_ARGS has no K8S_POD_UID: node mode needs a runtime that passes it "
            "(containerd 1.6 or later, CRI-O 1.22 or later)",
        )
    try:
        uid = check_pod_uid(pod_uid)
    except ConfigError as exc:
        raise CniError(INVALID_ENVIRONMENT, str(exc)) from None
    request = NodeRequest(
        pod_uid=uid,
        client_id=_optional(annotations, NODE_CLIENT_ID_ANNOTATION, parse_client_id),
        tenant_id=_optional(annotations, NODE_TENANT_ID_ANNOTATION, parse_tenant_id),
        identity_map=_optional(annotations, NODE_IDENTITY_MAP_ANNOTATION, check_identity_map),
    )
    if PASSTHROUGH_ANNOTATION in annotations:
        # Node mode's pass-through is the node's setting (AZWI_NODE_PASSTHROUGH), never a pod's.
        raise CniError(
            INVALID_CONFIG,
            f"annotation {PASSTHROUGH_ANNOTATION} does not apply to node mode: "
            "pass-through is the node's setting",
        )
    rules = dataclasses.replace(base, proxy_port=_port_annotation(annotations, base), passthrough="none")
    return rules, request


def _port_annotation(annotations: Mapping[str, Any], base: InitConfig) -> int:
    """The pod's proxy port: its annotation, else the node's proxyPort.

    Raises:
        CniError: code 7 for a value that is not a port.
    """
    port_text = annotations.get(PORT_ANNOTATION)
    if port_text is None:
        return base.proxy_port
    if not isinstance(port_text, str):
        raise CniError(INVALID_CONFIG, f"annotation {PORT_ANNOTATION}: {port_text!r} is not a string")
    try:
        return parse_port(port_text, f"annotation {PORT_ANNOTATION}")
    except ConfigError as exc:
        raise CniError(INVALID_CONFIG, str(exc)) from None


def _passthrough_annotation(annotations: Mapping[str, Any]) -> Passthrough:
    """The pod's pass-through policy (as its sidecar's AZWI_PASSTHROUGH): "all" unless it says "none".

    Raises:
        CniError: code 7 for another value.
    """
    value = annotations.get(PASSTHROUGH_ANNOTATION, "all")
    if not isinstance(value, str) or value.strip().lower() not in PASSTHROUGH_POLICIES:
        raise CniError(
            INVALID_CONFIG,
            f"annotation {PASSTHROUGH_ANNOTATION}: {value!r} is not one of {', '.join(PASSTHROUGH_POLICIES)}",
        )
    return "none" if value.strip().lower() == "none" else "all"


def cni_args_of(cni_args: str) -> dict[str, str]:
    """CNI_ARGS's KEY=VALUE pairs (separated by ';')."""
    return dict(part.split("=", 1) for part in cni_args.split(";") if "=" in part)


def pod_of(cni_args: str) -> str:
    """The pod that CNI_ARGS names (the kubelet's runtimes set K8S_POD_NAMESPACE and
    K8S_POD_NAME), as namespace/name; '' if it names none."""
    pairs = cni_args_of(cni_args)
    name = pairs.get("K8S_POD_NAME", "")
    return f"{pairs.get('K8S_POD_NAMESPACE', '')}/{name}" if name else ""


def _environment(environ: Mapping[str, str], command: Command) -> tuple[str, str, str]:
    container_id = environ.get("CNI_CONTAINERID", "")
    netns = environ.get("CNI_NETNS", "")
    ifname = environ.get("CNI_IFNAME", "")
    if not container_id:
        raise CniError(INVALID_ENVIRONMENT, "CNI_CONTAINERID is not set")
    if command in ("ADD", "CHECK") and not netns:
        raise CniError(INVALID_ENVIRONMENT, f"CNI_NETNS is not set ({command} needs the pod's namespace)")
    if not ifname:
        raise CniError(INVALID_ENVIRONMENT, "CNI_IFNAME is not set")
    return container_id, netns, ifname


def parse(environ: Mapping[str, str], stdin: bytes) -> Invocation:
    """The checked invocation that `environ` (CNI_ variables) and `stdin` describe.

    Raises:
        CniError: what the spec says the runtime gets for this input.
    """
    command_text = environ.get("CNI_COMMAND", "")
    if command_text not in _COMMANDS:
        raise CniError(
            INVALID_ENVIRONMENT, f"CNI_COMMAND: {command_text!r} is not one of {', '.join(_COMMANDS)}"
        )
    command: Command = command_text  # type: ignore[assignment]  # checked just above
    if command == "VERSION":
        return Invocation(command="VERSION", cni_version=SUPPORTED_VERSIONS[-1])
    config = _decode(stdin)
    version = _version_of(config)
    if config.get("type") != PLUGIN_TYPE:
        raise CniError(INVALID_CONFIG, f"type: {config.get('type')!r} is not {PLUGIN_TYPE!r}")
    if command == "CHECK" and version in ("0.3.0", "0.3.1"):
        raise CniError(INCOMPATIBLE_VERSION, f"CHECK is not defined for cniVersion {version}")
    container_id, netns, ifname = _environment(environ, command)
    base, log_level = _settings(config)
    prev = config.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(INVALID_CONFIG, "prevResult is not an object")
    cni_args = environ.get("CNI_ARGS", "")
    # DEL removes only ours, whatever the annotations say now: they are not read.
    node = None if command == "DEL" else wanted_node(config, base, cni_args_of(cni_args))
    if node is not None:
        rules: InitConfig | None = node[0]
    else:
        rules = None if command == "DEL" else wanted_rules(config, base)
    return Invocation(
        command=command,
        cni_version=version,
        container_id=container_id,
        netns=netns,
        ifname=ifname,
        rules=rules,
        node=None if node is None else node[1],
        cleanup=InitConfig(backend=base.backend, action="cleanup"),
        prev_result=prev,
        log_level=log_level,
        pod=pod_of(cni_args),
    )


def _ip_version(address: object) -> str:
    try:
        return str(ipaddress.ip_interface(str(address)).version)
    except ValueError:
        raise CniError(INVALID_CONFIG, f"prevResult: {address!r} is not an address with a prefix") from None


def convert_result(result: Mapping[str, Any], to_version: str) -> dict[str, Any]:
    """`result` (any supported version) in the shape of `to_version`, everything else kept.

    Raises:
        CniError: code 7 when an address in it cannot be read.
    """
    converted = dict(result)
    converted["cniVersion"] = to_version
    ips = result.get("ips")
    if isinstance(ips, list):
        new_ips: list[Any] = []
        for entry in ips:
            if not isinstance(entry, dict):
                new_ips.append(entry)
                continue
            item = dict(entry)
            if to_version == "1.0.0":
                item.pop("version", None)
            elif "version" not in item:
                item["version"] = _ip_version(item.get("address"))
            new_ips.append(item)
        converted["ips"] = new_ips
    return converted


def result_for(invocation: Invocation) -> dict[str, Any]:
    """What ADD prints: prevResult as it came, in the config's version (an empty result if
    we are first in the chain, which a conflist should never make us)."""
    if invocation.prev_result is None:
        return {"cniVersion": invocation.cni_version}
    return convert_result(invocation.prev_result, invocation.cni_version)
