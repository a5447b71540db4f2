"""Command lines of `azwi-netproxy`, `azwi-netproxy-init`, `azwi-netproxy-cni` and its agent,
and `azwi-netproxy-node` (node mode's node process), and the entry of `azwi-netproxy-demo`.

The only module that sees argv and os.environ. Exit codes: 0 success, 1 runtime failure,
2 bad flag, environment value or file (one clear line on stderr, nothing changed).
"""

from __future__ import annotations

import gc
import os
import re
import sys
from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Final, NoReturn

from azwi_netproxy import __version__
from azwi_netproxy.errors import ConfigError

if TYPE_CHECKING:
    import argparse

    from azwi_netproxy import logs

# logs (logging, json, ...) is imported by each program's main when it configures logging,
# not here: `--probe`, the postStart hook's own process, writes no log line.


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    """argparse that prints one line (not the usage block) and exits 2 on a bad flag."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            sys.stderr.write(f"{self.prog}: error: {message}\n")
            raise SystemExit(2)

    return Parser(prog=prog, description=description)


def _config_error(prog: str, exc: ConfigError) -> int:
    sys.stderr.write(f"{prog}: error: {exc}\n")
    return 2


_GO_TRUE: Final = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE: Final = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_GO_LEGACY_OCTAL: Final = re.compile(r"[+-]?0[0-7_]+")


def go_int(text: str) -> int:
    """An integer as Go's strconv.ParseInt(text, 0, 64) reads it, which upstream's flags use.

    Base prefixes 0x, 0o, 0b, a leading 0 for octal, a sign, underscores between digits;
    no blank space.

    Raises:
        ValueError: anything else.
    """
    if text != text.strip():
        raise ValueError(text)
    if _GO_LEGACY_OCTAL.fullmatch(text):
        # Go reads a bare leading 0 as octal; Python's base 0 refuses it.
        return int(text, 8)
    return int(text, 0)


class ProxyFlags:
    """The sidecar's flags, parsed as upstream's Go `flag` package parses them.

    Not argparse: argparse (with gettext) stays in memory for the life of the process, about
    0.6 MB of a sidecar that runs in every pod, for six flags; and Go's syntax differs from
    it (one or two dashes, `-flag=false` for booleans, the next argument taken as a value
    even when it begins with a dash). Positional arguments, which Go would silently ignore
    (and with them every flag after the first), are refused instead.
    """

    prog: Final = "azwi-netproxy"
    # name -> (kind, help); upstream's flags first, so the webhook's container args and its
    # postStart hook (`/proxy --proxy-port=N --probe --log-level=L`) work unchanged.
    flags: Final = {
        "proxy-port": ("int", "port on 127.0.0.1 (default 8000)"),
        "probe": ("bool", "exit 0 once /readyz answers 200 (the webhook's postStart hook)"),
        "log-level": ("string", "debug, info, warning or error (upstream's names accepted too)"),
        "version": ("bool", "print the version and exit"),
        "passthrough": ("string", "other IMDS paths: all (default, as upstream) or none"),
        "metrics-port": ("int", "serve Prometheus metrics on this port (0.0.0.0)"),
    }
    _choices: Final = {"passthrough": ("all", "none")}

    def parse_args(self, argv: Sequence[str] | None = None) -> SimpleNamespace:
        """Flags as attributes (None when not given); exits on help, --version or a bad flag."""
        values: dict[str, object] = {name.replace("-", "_"): None for name in self.flags}
        values["probe"] = False
        args = list(sys.argv[1:] if argv is None else argv)
        while args:
            arg = args.pop(0)
            if arg == "--":
                break
            if len(arg) < 2 or arg[0] != "-":
                self.error(f"unexpected argument {arg!r}: give values as -flag=value")
            name = arg[2:] if arg.startswith("--") else arg[1:]
            if not name or name[0] in "-=":
                self.error(f"bad flag syntax: {arg}")
            name, has_value, value = name.partition("=")
            if name in ("h", "help"):
                self._help()
            if name not in self.flags:
                self.error(f"flag provided but not defined: -{name}")
            kind, _ = self.flags[name]
            key = name.replace("-", "_")
            if kind == "bool":
                if has_value and value not in _GO_TRUE | _GO_FALSE:
                    self.error(f"invalid boolean value {value!r} for -{name}: parse error")
                values[key] = not has_value or value in _GO_TRUE
                continue
            if not has_value:
                if not args:
                    self.error(f"flag needs an argument: -{name}")
                value = args.pop(0)
            if kind == "int":
                try:
                    value = str(go_int(value))
                except ValueError:
                    self.error(f"invalid value {value!r} for flag -{name}: parse error")
            choices = self._choices.get(name)
            if choices is not None and value not in choices:
                self.error(f"invalid value {value!r} for flag -{name}: choose from {', '.join(choices)}")
            values[key] = value
        if args:
            self.error(f"unexpected argument {args[0]!r}: give values as -flag=value")
        if values["version"]:
            sys.stdout.write(f"{self.prog} {__version__}\n")
            raise SystemExit(0)
        return SimpleNamespace(**values)

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)

    def _help(self) -> NoReturn:
        lines = [f"usage: {self.prog} [flags]", "", "IMDS token proxy for workload identity", ""]
        for name, (kind, text) in self.flags.items():
            shown = f"--{name}" if kind == "bool" else f"--{name} {name.upper().replace('-', '_')}"
            lines.append(f"  {shown:<28} {text}")
        sys.stdout.write("\n".join(lines) + "\n")
        raise SystemExit(0)


def _environment_proxies() -> dict[str, str]:
    """The proxies the environment names, as httpx reads them: urllib's own reading (the
    lower-case name wins, an empty one unsets), imported only when a variable is there."""
    if not any(name.lower().endswith("_proxy") for name in os.environ):
        return {}
    import urllib.request

    return urllib.request.getproxies_environment()


def proxy_parser() -> ProxyFlags:
    return ProxyFlags()


def proxy_main(argv: Sequence[str] | None = None) -> int:
    args = proxy_parser().parse_args(argv)
    # What the start imports (tens of thousands of objects) lives as long as the process:
    # collecting while it is made cost 3 % of the instructions to the first /readyz. run.serve
    # freezes it and turns collection back on before it builds anything else.
    gc.disable()
    try:
        return _start_proxy(args)
    finally:
        gc.enable()


def _start_proxy(args: SimpleNamespace) -> int:
    if args.probe:
        return _probe(args)
    try:
        from azwi_netproxy.proxy import config, files

        cfg = config.load(vars(args), os.environ, _environment_proxies())
        # Reading the map (PyYAML's import and parse, for a YAML one) makes garbage: collected
        # as it is made, not frozen with the start's modules (0.2 MB with a YAML map).
        gc.enable()
        cfg = files.with_files(cfg)
        gc.disable()
        from azwi_netproxy.proxy import run

        run.check_modules(run.deferred_modules(cfg))
    except ConfigError as exc:
        return _config_error("azwi-netproxy", exc)
    from azwi_netproxy import logs

    writer = logs.configure(cfg.log_level, logger_name="proxy")
    from azwi_netproxy.proxy.run import run_proxy

    return run_proxy(cfg, writer)


def _probe(args: SimpleNamespace) -> int:
    """--probe: the postStart hook's own process, which starts beside the sidecar and shares
    its CPU while the sidecar starts. It checks its two values as config.load does for the
    hook, without config.py and what that imports (ssl, dataclasses, ...: 30 ms of CPU)."""
    from azwi_netproxy.settings import DEFAULT_PROXY_PORT, parse_log_level, parse_port

    try:
        parse_log_level(args.log_level)
        port = parse_port(args.proxy_port or DEFAULT_PROXY_PORT, "--proxy-port")
    except ConfigError as exc:
        return _config_error("azwi-netproxy", exc)
    from azwi_netproxy.proxy.probe import probe, seconds_since_process_start

    return probe(port, elapsed_s=seconds_since_process_start())


def init_parser() -> argparse.ArgumentParser:
    parser = _parser("azwi-netproxy-init", "install the IMDS redirect rules")
    parser.add_argument("--proxy-port", default=None, help="env PROXY_PORT (default 8000)")
    parser.add_argument("--proxy-uid", default=None, help="env PROXY_UID (default 1501)")
    parser.add_argument("--metadata-ip", default=None, help="env METADATA_IP (169.254.169.254)")
    parser.add_argument("--metadata-port", default=None, help="env METADATA_PORT (default 80)")
    parser.add_argument("--backend", default="auto", help="auto, nftables or iptables")
    parser.add_argument(
        "--allow-other-metadata-traffic",
        action="store_true",
        help="do not reject other ports/protocols to METADATA_IP from the pod (fail open)",
    )
    parser.add_argument(
        "--passthrough",
        default=None,
        help="env AZWI_PASSTHROUGH, the sidecar's: all (default) exempts PROXY_UID's TCP to "
        "METADATA_IP:METADATA_PORT for pass-through; none exempts nothing",
    )
    parser.add_argument("--log-level", default=None, help="debug, info, warning or error")
    parser.add_argument("--version", action="version", version=f"azwi-netproxy-init {__version__}")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run",
        dest="action",
        action="store_const",
        const="dry-run",
        help="print the rules, change nothing",
    )
    mode.add_argument(
        "--check",
        dest="action",
        action="store_const",
        const="check",
        help="exit 0 only if the rules are in place as configured",
    )
    mode.add_argument(
        "--cleanup",
        dest="action",
        action="store_const",
        const="cleanup",
        help="remove what this program installed, nothing else",
    )
    return parser


def init_main(argv: Sequence[str] | None = None) -> int:
    args = init_parser().parse_args(argv)
    try:
        from azwi_netproxy.init import config

        cfg = config.load(vars(args), os.environ)
    except ConfigError as exc:
        return _config_error("azwi-netproxy-init", exc)
    from azwi_netproxy import logs

    writer = logs.configure(cfg.log_level, logger_name="proxy-init")
    from azwi_netproxy.init.run import run_init

    try:
        return run_init(cfg)
    finally:
        if writer is not None:
            writer.drain()


def _cni_answer(body: object) -> None:
    import json

    sys.stdout.write(json.dumps(body, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def cni_main() -> int:
    """The CNI plugin: CNI_ variables and the network configuration on stdin, as the spec
    has it (no flags). Exit 0 with the result on stdout, or 1 with the spec's error JSON."""
    from azwi_netproxy import logs
    from azwi_netproxy.cni import plugin, spec

    version = spec.SUPPORTED_VERSIONS[-1]
    writer: logs.LineWriter | None = None
    try:
        stdin = b"" if os.environ.get("CNI_COMMAND") == "VERSION" else sys.stdin.buffer.read()
        invocation = spec.parse(os.environ, stdin)
        version = invocation.cni_version
        writer = logs.configure(invocation.log_level, logger_name="cni")
        body = plugin.run(invocation, os.environ)
    except spec.CniError as exc:
        _cni_answer(spec.error_body(exc, version))
        return 1
    except Exception as exc:  # the runtime must get JSON, whatever went wrong
        _cni_answer(
            spec.error_body(spec.CniError(199, "internal error in azwi-netproxy-cni", repr(exc)), version)
        )
        return 1
    finally:
        if writer is not None:
            writer.drain()
    if body is not None:
        _cni_answer(body)
    return 0


def cni_agent_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "azwi-netproxy-cni-agent",
        "install azwi-netproxy's CNI plugin on this node and keep it chained "
        "(env AZWI_CNI_BIN_DIR, AZWI_CNI_CONF_DIR, AZWI_CNI_RUN_DIR, AZWI_CNI_UNINSTALL, "
        "AZWI_CNI_PLUGIN_CONFIG, LOG_LEVEL)",
    )
    parser.add_argument("--version", action="version", version=f"azwi-netproxy-cni-agent {__version__}")
    parser.add_argument(
        "--check", action="store_true", help="exit 0 only if this node is installed (with --uninstall: clean)"
    )
    parser.add_argument(
        "--uninstall", action="store_true", help="remove the plugin from this node, then wait"
    )
    return parser


def cni_agent_main(argv: Sequence[str] | None = None) -> int:
    args = cni_agent_parser().parse_args(argv)
    from azwi_netproxy.cni import agent

    try:
        settings = agent.load_settings(os.environ, uninstall_flag=args.uninstall, python=sys.executable)
    except ConfigError as exc:
        return _config_error("azwi-netproxy-cni-agent", exc)
    if args.check:
        return agent.check(settings)
    from azwi_netproxy import logs

    writer = logs.configure(settings.log_level, logger_name="cni-agent")
    try:
        return agent.run_agent(settings)
    finally:
        if writer is not None:
            writer.drain()


def node_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "azwi-netproxy-node",
        "node mode: answer IMDS token requests for every pod of this node enrolled by the CNI "
        "plugin, inside each pod's network namespace (env AZURE_TENANT_ID, AZURE_AUTHORITY_HOST, "
        "AZWI_KUBELET_PODS_DIR, AZWI_NODE_PASSTHROUGH, AZWI_CNI_RUN_DIR, LOG_LEVEL, ...)",
    )
    parser.add_argument("--version", action="version", version=f"azwi-netproxy-node {__version__}")
    parser.add_argument("--log-level", default=None, help="debug, info, warning or error (env LOG_LEVEL)")
    parser.add_argument("--metrics-port", default=None, help="Prometheus metrics on this port (0.0.0.0)")
    parser.add_argument(
        "--check", action="store_true", help="exit 0 only if this node's node process answers (readiness)"
    )
    return parser


def node_main(argv: Sequence[str] | None = None) -> int:
    args = node_parser().parse_args(argv)
    try:
        from azwi_netproxy.proxy import config, files

        cfg = config.load_node(vars(args), os.environ, _environment_proxies())
        if not cfg.check:
            if cfg.identity_binding is None:
                files.check_trust_store(cfg.ssl_cert_file, cfg.ssl_cert_dir)
            from azwi_netproxy.proxy import run

            run.check_modules(run.deferred_modules(cfg))
    except ConfigError as exc:
        return _config_error("azwi-netproxy-node", exc)
    if cfg.check:
        from azwi_netproxy import nodecontrol

        try:
            nodecontrol.call(cfg.run_dir, {"op": "ping"}, timeout_s=5.0)
        except (nodecontrol.NodeUnavailable, nodecontrol.NodeRefused, OSError) as exc:
            sys.stdout.write(f"{exc}\n")
            return 1
        return 0
    from azwi_netproxy import logs

    writer = logs.configure(cfg.log_level, logger_name="node")
    from azwi_netproxy.proxy.node import run_node

    return run_node(cfg, writer)


def demo_main(argv: Sequence[str] | None = None) -> int:
    """`azwi-netproxy-demo`: the demo (azwi_netproxy.demo), or, where its extra is not
    installed (`pip install azwi-netproxy` brings no pyroute2), one line naming the extra
    and exit 2 instead of an import traceback."""
    try:
        from azwi_netproxy import demo
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "pyroute2":
            raise
        sys.stderr.write(
            "azwi-netproxy-demo: error: the demo needs pyroute2: pip install 'azwi-netproxy[demo]'\n"
        )
        return 2
    return demo.main(None if argv is None else list(argv))
