"""Command lines of `azwi-netproxy` and `azwi-netproxy-init`.

The only module that sees argv and os.environ. Exit codes: 0 success, 1 runtime failure,
2 bad flag, environment value or file (one clear line on stderr, nothing changed).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Final, NoReturn

from azwi_netproxy import __version__, config, logs
from azwi_netproxy.errors import ConfigError

if TYPE_CHECKING:
    import argparse


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


class ProxyFlags:
    """The sidecar's few flags, parsed without argparse.

    argparse (with gettext) stays in memory for the life of the process: about 0.6 MB of
    a sidecar that runs in every pod, for six flags. Same syntax (`--flag value`,
    `--flag=value`), same one-line errors and exit code 2.
    """

    prog: Final = "azwi-netproxy"
    # name -> (takes a value, help); upstream's flags first, so the webhook's container
    # args and its postStart hook (`/proxy --proxy-port=N --probe`) work unchanged.
    flags: Final = {
        "--proxy-port": (True, "port on 127.0.0.1 (default 8000)"),
        "--probe": (False, "exit 0 once /readyz answers 200 (the webhook's postStart hook)"),
        "--log-level": (True, "debug, info, warning or error (upstream's names accepted too)"),
        "--version": (False, "print the version and exit"),
        "--passthrough": (True, "other IMDS paths: all (default, as upstream) or none"),
        "--metrics-port": (True, "serve Prometheus metrics on this port (0.0.0.0)"),
    }

    def parse_args(self, argv: Sequence[str] | None = None) -> SimpleNamespace:
        """Flags as attributes (None when not given); exits on --help, --version or a bad flag."""
        values: dict[str, object] = {name[2:].replace("-", "_"): None for name in self.flags}
        values["probe"] = False
        args = list(sys.argv[1:] if argv is None else argv)
        while args:
            arg = args.pop(0)
            if arg in ("-h", "--help"):
                self._help()
            name, has_value, value = arg.partition("=")
            if name not in self.flags:
                self.error(f"unrecognized arguments: {arg}")
            takes_value, _ = self.flags[name]
            key = name[2:].replace("-", "_")
            if not takes_value:
                if has_value:
                    self.error(f"argument {name}: ignored explicit argument {value!r}")
                if name == "--version":
                    sys.stdout.write(f"{self.prog} {__version__}\n")
                    raise SystemExit(0)
                values[key] = True
                continue
            if not has_value:
                if not args or (args[0].startswith("--") and args[0] != "--"):
                    self.error(f"argument {name}: expected one argument")
                value = args.pop(0)
            if name == "--passthrough" and value not in ("all", "none"):
                self.error(f"argument --passthrough: invalid choice: {value!r} (choose from 'all', 'none')")
            values[key] = value
        return SimpleNamespace(**values)

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)

    def _help(self) -> NoReturn:
        lines = [f"usage: {self.prog} [options]", "", "IMDS token proxy for workload identity", ""]
        for name, (takes_value, text) in self.flags.items():
            shown = f"{name} {name[2:].upper().replace('-', '_')}" if takes_value else name
            lines.append(f"  {shown:<28} {text}")
        sys.stdout.write("\n".join(lines) + "\n")
        raise SystemExit(0)


def proxy_parser() -> ProxyFlags:
    return ProxyFlags()


def proxy_main(argv: Sequence[str] | None = None) -> int:
    args = proxy_parser().parse_args(argv)
    try:
        cfg = config.load_proxy(vars(args), os.environ, lambda p: Path(p).read_text("utf-8"))
    except ConfigError as exc:
        return _config_error("azwi-netproxy", exc)
    if cfg.probe:
        from azwi_netproxy.probe import probe

        return probe(cfg.proxy_port)
    logs.configure(cfg.log_level, logger_name="proxy")
    from azwi_netproxy.run import run_proxy

    return run_proxy(cfg)


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
        cfg = config.load_init(vars(args), os.environ)
    except ConfigError as exc:
        return _config_error("azwi-netproxy-init", exc)
    logs.configure(cfg.log_level, logger_name="proxy-init")
    from azwi_netproxy.initrun import run_init

    return run_init(cfg)
