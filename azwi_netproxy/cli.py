"""Command lines of `azwi-netproxy` and `azwi-netproxy-init`.

The only module that sees argv and os.environ. Exit codes: 0 success, 1 runtime failure,
2 bad flag, environment value or file (one clear line on stderr, nothing changed).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from azwi_netproxy import __version__, config, logs
from azwi_netproxy.errors import ConfigError


class _Parser(argparse.ArgumentParser):
    """argparse that prints one line (not the usage block) and exits 2 on a bad flag."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _config_error(prog: str, exc: ConfigError) -> int:
    sys.stderr.write(f"{prog}: error: {exc}\n")
    return 2


def proxy_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="azwi-netproxy", description="IMDS token proxy for workload identity")
    # Upstream's flags, so the webhook's container args and postStart hook work unchanged.
    parser.add_argument("--proxy-port", default=None, help="port on 127.0.0.1 (default 8000)")
    parser.add_argument("--probe", action="store_true", help="exit 0 once /readyz answers 200")
    parser.add_argument("--log-level", default=None, help="debug, info, warning or error")
    parser.add_argument("--version", action="version", version=f"azwi-netproxy {__version__}")
    # Ours.
    parser.add_argument(
        "--passthrough",
        choices=("all", "none"),
        default=None,
        help="other IMDS paths: 'all' pass through as upstream does (default), 'none' refuses them",
    )
    parser.add_argument("--metrics-port", default=None, help="serve Prometheus metrics on this port")
    return parser


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
    parser = _Parser(prog="azwi-netproxy-init", description="install the IMDS redirect rules")
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
