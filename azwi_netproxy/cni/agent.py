"""The node agent, `azwi-netproxy-cni-agent`: installs the plugin on its node and keeps it so.

One per node (a DaemonSet with hostPID and the host's CNI dirs mounted). Rules:
1. On start it records itself (host PID and start time) in the state file the shim reads,
   writes the shim into the CNI bin dir, then chains our entry into the conf dir's primary
   conflist. Every write is a new file renamed into place, so the runtime never reads half.
2. It re-checks every `interval_s`: a cluster network agent that rewrites its conflist
   drops our entry, and it goes back in within that time.
3. Stopping (SIGTERM) removes only the state file: the shim and the chain stay, so while
   no agent runs, new pods on the node fail ADD (code 11, retried) instead of starting
   without rules they may have asked for. Removing the plugin is explicit
   (AZWI_CNI_UNINSTALL=true, or --uninstall): our entry leaves every conflist first, then the
   shim goes, so the runtime never calls a plugin that is not there.
4. `--check` (the DaemonSet's readiness probe) says whether this node is installed (or,
   uninstalling, clean), one line per problem.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from azwi_netproxy.cni import chain, shim, spec
from azwi_netproxy.cni.spec import PLUGIN_TYPE
from azwi_netproxy.errors import ConfigError
from azwi_netproxy.settings import DEFAULT_RUN_DIR, parse_log_level

log = logging.getLogger(__name__)

STATE_FILE_NAME: Final = "cni-agent"
DEFAULT_BIN_DIR: Final = "/host/opt/cni/bin"
DEFAULT_CONF_DIR: Final = "/host/etc/cni/net.d"
DEFAULT_INTERVAL_S: Final = 2.0
_TRUE: Final = frozenset({"true", "1", "yes"})
_FALSE: Final = frozenset({"false", "0", "no", ""})


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentSettings:
    bin_dir: Path
    conf_dir: Path
    # The run dir as the host sees it, where the shim reads the state file (hostPath at
    # the same path in the DaemonSet).
    run_dir: Path
    python: str
    uninstall: bool = False
    log_level: str = "info"
    interval_s: float = DEFAULT_INTERVAL_S
    # Our keys for the conflist entry (AZWI_CNI_PLUGIN_CONFIG), checked as the plugin will.
    plugin_settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def entry(self) -> dict[str, Any]:
        return chain.our_entry(self.plugin_settings)

    @property
    def state_file(self) -> Path:
        return self.run_dir / STATE_FILE_NAME

    @property
    def shim_path(self) -> Path:
        return self.bin_dir / PLUGIN_TYPE

    def shim_text(self) -> str:
        return shim.render(state_file=str(self.state_file), python=self.python)


def _absolute(environ: Mapping[str, str], name: str, default: str) -> Path:
    value = environ.get(name, "") or default
    if not value.startswith("/"):
        raise ConfigError(f"{name}: {value!r} is not an absolute path")
    return Path(value)


def _plugin_settings(text: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        settings = json.loads(text)
    except ValueError:
        raise ConfigError("AZWI_CNI_PLUGIN_CONFIG: not a JSON object") from None
    if not isinstance(settings, dict):
        raise ConfigError("AZWI_CNI_PLUGIN_CONFIG: not a JSON object")
    if set(settings) & {"type", "capabilities", "cniVersion", "name", "runtimeConfig", "prevResult"}:
        raise ConfigError("AZWI_CNI_PLUGIN_CONFIG: only the plugin's own keys (proxyPort, backend, ...)")
    try:
        spec.check_settings(settings)
    except spec.CniError as exc:
        raise ConfigError(f"AZWI_CNI_PLUGIN_CONFIG: {exc.msg}") from None
    return settings


def load_settings(environ: Mapping[str, str], *, uninstall_flag: bool, python: str) -> AgentSettings:
    """The agent's settings from its environment (the DaemonSet's).

    Raises:
        ConfigError: a bad value, naming its variable.
    """
    uninstall_text = environ.get("AZWI_CNI_UNINSTALL", "").strip().lower()
    if uninstall_text not in _TRUE | _FALSE:
        raise ConfigError(f"AZWI_CNI_UNINSTALL: {uninstall_text!r} is not true or false")
    interval_text = environ.get("AZWI_CNI_INTERVAL_S", "") or str(DEFAULT_INTERVAL_S)
    try:
        interval_s = float(interval_text)
    except ValueError:
        raise ConfigError(f"AZWI_CNI_INTERVAL_S: {interval_text!r} is not a number of seconds") from None
    if not 0.05 <= interval_s <= 3600:
        raise ConfigError(f"AZWI_CNI_INTERVAL_S: {interval_s} is not between 0.05 and 3600")
    return AgentSettings(
        plugin_settings=_plugin_settings(environ.get("AZWI_CNI_PLUGIN_CONFIG", "")),
        bin_dir=_absolute(environ, "AZWI_CNI_BIN_DIR", DEFAULT_BIN_DIR),
        conf_dir=_absolute(environ, "AZWI_CNI_CONF_DIR", DEFAULT_CONF_DIR),
        run_dir=_absolute(environ, "AZWI_CNI_RUN_DIR", DEFAULT_RUN_DIR),
        python=python,
        uninstall=uninstall_flag or uninstall_text in _TRUE,
        log_level=parse_log_level(environ.get("LOG_LEVEL") or None),
        interval_s=interval_s,
    )


# ---- files -------------------------------------------------------------------------------


def _write_replacing(path: Path, text: str, mode: int) -> None:
    """Write `text` to a new file beside `path` and rename it over `path`.

    The temporary name starts with a dot and ends in neither .conf, .conflist nor .json, so
    a runtime that lists the directory meanwhile ignores it.
    """
    tmp = path.with_name(f".{path.name}.azwi-netproxy.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def process_start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat: with the PID, it names one process for the node's uptime."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()[19]


def _read_config(path: Path) -> dict[str, Any] | None:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("cannot read the network configuration", extra={"file": str(path), "error": str(exc)})
        return None
    return config if isinstance(config, dict) else None


def _dump(config: Mapping[str, Any]) -> str:
    return json.dumps(config, indent=2) + "\n"


def _primary(settings: AgentSettings) -> Path | None:
    try:
        names = os.listdir(settings.conf_dir)
    except FileNotFoundError:
        return None
    name = chain.primary_config(names)
    return None if name is None else settings.conf_dir / name


# ---- install, check, uninstall -------------------------------------------------------------


def record_self(settings: AgentSettings) -> None:
    settings.run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    pid = os.getpid()
    _write_replacing(settings.state_file, f"{pid} {process_start_time(pid)}\n", 0o644)


def forget_self(settings: AgentSettings) -> None:
    """Remove the state file if it still names this process (a newer agent may own it)."""
    try:
        pid_text = settings.state_file.read_text().split()[0]
    except (OSError, IndexError):
        return
    if pid_text == str(os.getpid()):
        settings.state_file.unlink(missing_ok=True)


def install_once(settings: AgentSettings) -> list[str]:
    """Put the shim and the chain in place; what was changed (empty: nothing to do)."""
    changed: list[str] = []
    text = settings.shim_text()
    try:
        current = settings.shim_path.read_text()
    except OSError:
        current = None
    if current != text or (settings.shim_path.stat().st_mode & 0o7777) != 0o755:
        _write_replacing(settings.shim_path, text, 0o755)
        changed.append(f"wrote {settings.shim_path}")
    primary = _primary(settings)
    if primary is None:
        return changed
    config = _read_config(primary)
    if config is None or not chain.is_list(config):
        return changed
    new = chain.chained(config, settings.entry)
    if new is not None:
        _write_replacing(primary, _dump(new), primary.stat().st_mode & 0o777)
        changed.append(f"chained into {primary}")
    return changed


def uninstall_once(settings: AgentSettings) -> list[str]:
    """Take our entry out of every conflist, then remove the shim; what was changed."""
    changed: list[str] = []
    try:
        names = sorted(os.listdir(settings.conf_dir))
    except FileNotFoundError:
        names = []
    for name in names:
        if not name.endswith(chain.CONFIG_SUFFIXES):
            continue
        path = settings.conf_dir / name
        config = _read_config(path)
        new = None if config is None else chain.unchained(config)
        if new is not None:
            _write_replacing(path, _dump(new), path.stat().st_mode & 0o777)
            changed.append(f"unchained from {path}")
    if settings.shim_path.exists():
        settings.shim_path.unlink()
        changed.append(f"removed {settings.shim_path}")
    return changed


def problems(settings: AgentSettings) -> list[str]:
    """Why this node is not (un)installed as it should be; empty when it is."""
    found: list[str] = []
    primary = _primary(settings)
    config = None if primary is None else _read_config(primary)
    if settings.uninstall:
        if settings.shim_path.exists():
            found.append(f"{settings.shim_path} is still installed")
        if config is not None and chain.unchained(config) is not None:
            found.append(f"{primary} still chains {PLUGIN_TYPE}")
        return found
    try:
        if settings.shim_path.read_text() != settings.shim_text():
            found.append(f"{settings.shim_path} is not the shim this agent writes")
    except OSError:
        found.append(f"{settings.shim_path} is missing")
    if primary is None:
        found.append(f"no network configuration in {settings.conf_dir} yet (the cluster's plugin writes it)")
    elif config is None or not chain.is_list(config):
        found.append(f"{primary} is not a conflist (a list of plugins), so nothing can be chained to it")
    elif not chain.is_chained(config, settings.entry):
        found.append(f"{primary} does not end with the {PLUGIN_TYPE} plugin")
    try:
        pid, start = settings.state_file.read_text().split()
        if process_start_time(int(pid)) != start:
            found.append(f"{settings.state_file} names a process that is not the agent")
    except (OSError, ValueError):
        found.append(f"{settings.state_file} does not name a running agent")
    return found


# ---- the agent's life ----------------------------------------------------------------------


def _tend(settings: AgentSettings, act: Callable[[AgentSettings], list[str]]) -> None:
    try:
        for change in act(settings):
            log.info("node updated", extra={"change": change})
    except OSError as exc:
        log.error("cannot update the node", extra={"error": str(exc)})


def run_agent(settings: AgentSettings, stop: threading.Event | None = None) -> int:
    """Install (or uninstall) and keep the node so until SIGTERM or `stop`; the exit code."""
    stopping = stop or threading.Event()
    if stop is None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stopping.set())
    # The shim's nsenter takes the agent's working directory: the container's root.
    os.chdir("/")
    if settings.uninstall:
        log.info("uninstalling the CNI plugin from this node", extra={"conf_dir": str(settings.conf_dir)})
        forget_self(settings)
        while not stopping.is_set():
            _tend(settings, uninstall_once)
            stopping.wait(settings.interval_s)
        return 0
    record_self(settings)
    log.info(
        "CNI agent started",
        extra={"bin_dir": str(settings.bin_dir), "conf_dir": str(settings.conf_dir), "pid": os.getpid()},
    )
    reported: list[str] = []
    try:
        while not stopping.is_set():
            _tend(settings, install_once)
            now = problems(settings)
            if now != reported:
                if now:
                    log.warning("node not ready for the redirect", extra={"problems": now})
                else:
                    log.info("node ready: new pods that ask for the redirect get it")
                reported = now
            stopping.wait(settings.interval_s)
    finally:
        forget_self(settings)
        log.info("CNI agent stopped; the plugin stays chained (pods asking for it wait for the next agent)")
    return 0


def check(settings: AgentSettings, out: Any = sys.stdout) -> int:
    found = problems(settings)
    for line in found:
        out.write(f"{line}\n")
    return 1 if found else 0
