"""Signs that a workload's pods need instance metadata: IMDS answers other than tokens.

The proxy answers the token path itself. Any other IMDS path (`/metadata/instance`,
`/metadata/scheduledevents`, `/metadata/attested/document`, …) only works through
pass-through, which the redirect allows by exempting the proxy's uid: a door that a root
container of the pod can use to reach the node's identities (issue 25). Node mode has no
pass-through by default (issue 26). So the plan asks, per workload, whether its pods might
need those other paths; this module answers from what the export shows.

Rules:
1. Pure: a workload and the ConfigMaps of the export in, a `MetadataUse` out. It reads only
   the export: what an image does at run time is not visible here, and Secrets are not read.
2. Conservative: anything that may mean "this pod asks IMDS for more than tokens" is a sign,
   and one sign keeps pass-through (and, under --node, the sidecar). A false sign costs what
   every pod pays today; a missed one turns the app's IMDS calls into 403s.
   The signs are, in the pod's own containers (init containers included; not ours) and in
   the ConfigMaps they take environment variables or volumes from:
   - the metadata address 169.254.169.254 anywhere but directly before a path under
     `/metadata/identity` (a base URL such as `http://169.254.169.254` may serve any path);
   - an IMDS path other than `/metadata/identity/…` (`metadata/instance`,
     `metadata/scheduledevents`, `metadata/attested`, `metadata/loadbalancer`, …). Paths
     under `/metadata/identity/` need no pass-through: the proxy answers the token path and
     never forwards the others.
   An AzurePodIdentityException that matches the pod is the strongest sign (NMI sent that
   pod straight to IMDS), but such workloads are not migrated at all (plan.excepted_by): they
   keep reaching IMDS directly, so they never get here.
3. Explicit wins: the pod annotation `azwi-netproxy.io/passthrough` (the CNI plugin's own
   per-pod setting, CONTRACT.md) set to "all" keeps pass-through whatever the signs, and set
   to "none" closes it whatever the signs. Any other value is not a choice (plan.blockers
   refuses the workload, as the plugin would refuse the pod).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from azwi_netproxy.migrate.model import Workload, dig
from azwi_netproxy.settings import CNI_PASSTHROUGH_ANNOTATION, DEFAULT_METADATA_IP, PASSTHROUGH_POLICIES
from azwi_netproxy.settings import PassthroughPolicy as Passthrough

# Upstream's container names. Signs skip them (a re-exported migrated pod's proxy mentions IMDS
# by design) and so does plan.py's port check; plan imports this module, so they live here.
OUR_CONTAINERS: Final = ("azwi-proxy", "azwi-proxy-init")
# Container fields that say which program runs, not how it talks: an image named
# ".../metadata/..." is no sign.
_NOT_SCANNED: Final = ("name", "image", "imagePullPolicy")
_ADDRESS: Final = re.compile(re.escape(DEFAULT_METADATA_IP))
# What may follow the address without being a sign: a path under /metadata/identity (the token
# path, which the proxy answers, or a neighbour it refuses and never forwards).
_IDENTITY_PATH: Final = re.compile(r"/metadata/identity(?![A-Za-z0-9_-])", re.I)
# "metadata/<segment>" as a path, not inside a longer word (GCP's computeMetadata/v1 is not
# Azure's); "identity" segments excepted (see rule 2).
_OTHER_PATH: Final = re.compile(r"(?<![A-Za-z0-9_])metadata/(?!identity(?![A-Za-z0-9_-]))[A-Za-z]", re.I)

ConfigMaps = Mapping[tuple[str, str], Mapping[str, Any]]  # (namespace, name) → data


@dataclass(frozen=True, slots=True)
class MetadataUse:
    """What the export shows of a workload's need for IMDS beyond tokens."""

    explicit: Passthrough | None  # the pod's azwi-netproxy.io/passthrough annotation, if valid
    signs: tuple[str, ...]  # each: where, and what it names

    @property
    def needs_passthrough(self) -> bool:
        if self.explicit is not None:
            return self.explicit == "all"
        return bool(self.signs)

    @property
    def because(self) -> tuple[str, ...]:
        """What decided: the explicit annotation, else the signs (empty: none was found)."""
        if self.explicit is not None:
            return (f'pod annotation {CNI_PASSTHROUGH_ANNOTATION}: "{self.explicit}"',)
        return self.signs

    @property
    def overridden(self) -> tuple[str, ...]:
        """Signs that an explicit "none" overrides: the app's requests there will get 403."""
        return self.signs if self.explicit == "none" else ()


def explicit_choice(workload: Workload) -> str | None:
    """The raw value of the pod's pass-through annotation (None: not set)."""
    annotations = dig(workload.pod, "metadata", "annotations")
    found = annotations.get(CNI_PASSTHROUGH_ANNOTATION) if isinstance(annotations, dict) else None
    return found if isinstance(found, str) else None


def explicit_policy(choice: str) -> Passthrough | None:
    """The policy an annotation value names (None: neither), read as the CNI plugin reads it."""
    text = choice.strip().lower()
    if text not in PASSTHROUGH_POLICIES:
        return None
    return "all" if text == "all" else "none"


def _named(text: str) -> str | None:
    """What `text` names that is a sign, or None."""
    found = _OTHER_PATH.search(text)
    if found is not None:
        return "/" + re.split(r"[?#\s\"',;]", text[found.start() :], maxsplit=1)[0].rstrip("/")
    for match in _ADDRESS.finditer(text):
        if _IDENTITY_PATH.match(text, match.end()) is None:
            return f"{DEFAULT_METADATA_IP} (not only its identity paths)"
    return None


def _strings(node: Any, path: str) -> Iterator[tuple[str, str]]:
    """(path, string) of every string under `node`; env items are named by their variable."""
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            name = value.get("name") if isinstance(value, dict) else None
            yield from _strings(value, f"{path}[{name if isinstance(name, str) else index}]")


def _config_map_refs(workload: Workload, container: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(how, ConfigMap name) of the ConfigMaps a container reads from."""
    for source in container.get("envFrom") or []:
        ref = source.get("configMapRef") if isinstance(source, dict) else None
        if isinstance(ref, dict) and isinstance(ref.get("name"), str):
            yield "envFrom", ref["name"]
    for item in container.get("env") or []:
        ref = ((item.get("valueFrom") or {}) if isinstance(item, dict) else {}).get("configMapKeyRef")
        if isinstance(ref, dict) and isinstance(ref.get("name"), str):
            yield f"env {item.get('name')}", ref["name"]
    mounted = {m.get("name") for m in container.get("volumeMounts") or [] if isinstance(m, dict)}
    for volume in workload.pod_spec.get("volumes") or []:
        if not isinstance(volume, dict) or volume.get("name") not in mounted:
            continue
        projected = (volume.get("projected") or {}).get("sources") or []
        sources = [volume.get("configMap")] + [s.get("configMap") for s in projected if isinstance(s, dict)]
        for source in sources:
            if isinstance(source, dict) and isinstance(source.get("name"), str):
                yield f"volume {volume['name']}", source["name"]


def metadata_use(workload: Workload, config_maps: ConfigMaps) -> MetadataUse:
    """The explicit choice and the signs of the workload's pods (see the module's rules)."""
    choice = explicit_choice(workload)
    explicit = explicit_policy(choice) if choice is not None else None
    signs: list[str] = []
    for container in workload.containers():
        name = container.get("name")
        if name in OUR_CONTAINERS:
            continue
        scanned = {k: v for k, v in container.items() if k not in _NOT_SCANNED}
        for path, text in _strings(scanned, ""):
            what = _named(text)
            if what is not None:
                signs.append(f"container {name}: {path} names {what}")
        for how, cm_name in _config_map_refs(workload, container):
            data = config_maps.get((workload.namespace, cm_name))
            for key, text in _strings(data or {}, ""):
                what = _named(text)
                if what is not None:
                    signs.append(f"container {name}: ConfigMap {cm_name} ({how}) key {key} names {what}")
    return MetadataUse(explicit, tuple(dict.fromkeys(signs)))
