"""The `azwi-netproxy-migrate` command line: read the exports, plan, write OUTDIR in one step.

The only module here that touches argv, stdin and files. Exit codes: 0 written; 2 bad usage,
unreadable or malformed input, or an OUTDIR we must not replace (one line on stderr, nothing
written); 1 an internal check failed or OUTDIR could not be written.

OUTDIR is built in a temporary directory next to it and renamed into place at the end, so it
is either the complete new output or untouched. An existing OUTDIR is replaced only when it is
empty or a previous output of this tool (its REPORT.md says so): `-o .` cannot wipe a directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

from azwi_netproxy.errors import ConfigError
from azwi_netproxy.migrate import model
from azwi_netproxy.migrate.plan import (
    DEFAULT_PROXY_IMAGE,
    DEFAULT_PROXY_INIT_IMAGE,
    ClusterInput,
    Options,
    build_plan,
)
from azwi_netproxy.migrate.render import OutputFile, RenderError, render
from azwi_netproxy.migrate.report import TITLE, render_report

PROG = "azwi-netproxy-migrate"
_SUFFIXES = (".yaml", ".yml", ".json")


class _Parser(argparse.ArgumentParser):
    """argparse that prints one line (not the usage block) and exits 2 on bad usage."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Plan the move from AKS pod identity to workload identity with azwi-netproxy: "
        "migrated manifests, identity maps, federated credential commands and REPORT.md.",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUTDIR",
        help="directory to write (replaced if it holds a previous output)",
    )
    p.add_argument(
        "--issuer",
        metavar="URL",
        help="the cluster's OIDC issuer URL (default: ${AKS_OIDC_ISSUER} in commands)",
    )
    p.add_argument(
        "--cluster",
        nargs=3,
        action="append",
        metavar=("NAME", "ISSUER_URL", "PATH"),
        help="one cluster's export (repeat for several clusters; instead of positional PATHs)",
    )
    p.add_argument(
        "--remove-aadpodidbinding",
        action="store_true",
        help="cut-over: remove the aadpodidbinding label from the pod templates",
    )
    p.add_argument(
        "--proxy-port",
        default="8000",
        metavar="PORT",
        help="azure.workload.identity/proxy-sidecar-port (default 8000)",
    )
    p.add_argument(
        "--cni",
        action="store_true",
        help="CNI mode: pods get the azwi-netproxy.io/redirect annotation and the proxy as a native "
        "sidecar (Kubernetes 1.29+), no init container and no NET_ADMIN; the node agent "
        "(deploy/cni/node-agent.yaml) must be installed first",
    )
    p.add_argument(
        "--node",
        action="store_true",
        help="node mode: pods get the azwi-netproxy.io/node-proxy annotation (with their client ID, "
        "tenant and identity map) and no proxy, no init container, no capability; one process per "
        "node answers them, with no pass-through to the node's IMDS, so workloads showing a sign of "
        "needing instance metadata (or AKS identity binding) stay in sidecar mode (CNI mode with "
        "--cni). The node DaemonSet (deploy/node/node-agent.yaml) must be installed first",
    )
    p.add_argument(
        "--proxy-image",
        metavar="IMAGE",
        default=DEFAULT_PROXY_IMAGE,
        help="proxy image that pods with several identities (with --cni: all pods) declare "
        "(default %(default)s)",
    )
    p.add_argument(
        "--proxy-init-image",
        metavar="IMAGE",
        default=DEFAULT_PROXY_INIT_IMAGE,
        help="init image that pods with several identities declare (default %(default)s)",
    )
    p.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="export file, directory (*.yaml, *.yml, *.json, recursively) or - for stdin",
    )
    return p


def _port(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise ConfigError(f"--proxy-port {value!r} is not a port number (1-65535)")
    return int(value)


def _image(value: str, flag: str) -> str:
    if not value or any(c.isspace() for c in value) or value != value.strip():
        raise ConfigError(f"{flag} {value!r} is not an image reference")
    return value


def _issuer(value: str, flag: str) -> str:
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(f"{flag} {value!r} is not an https URL")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"{flag} {value!r} must not have a query, fragment or user")
    # Kept byte for byte: Entra compares the FIC's issuer with the token's `iss` exactly, and
    # AKS issuers end with "/".
    return value


def _cluster_name(value: str) -> str:
    if (
        not value
        or len(value) > 63
        or not value[0].isalnum()
        or not all(c.isalnum() or c in "-_" for c in value)
        or not value.isascii()
    ):
        raise ConfigError(
            f"--cluster name {value!r}: use letters, digits, - and _ (at most 63, starting with a "
            f"letter or digit); it names a directory and is part of FIC names"
        )
    return value


class _Reader:
    """Reads PATH arguments into documents; every output name under unchanged/ is unique."""

    def __init__(self, outdir: Path) -> None:
        self.outdir = outdir.resolve()
        self.used_names: set[str] = set()
        self.stdin_used = False

    def next_cluster(self) -> None:
        """Each cluster has its own unchanged/ directory: names need only be unique within it."""
        self.used_names = set()

    def _unique(self, name: str) -> str:
        candidate, number = name, 1
        while candidate in self.used_names:
            number += 1
            stem, dot, suffix = name.rpartition(".")
            candidate = f"{stem}-{number}.{suffix}" if dot else f"{name}-{number}"
        self.used_names.add(candidate)
        return candidate

    def _file(self, path: Path, display: str, output_name: str) -> list[model.Document]:
        try:
            text = path.read_text(encoding="utf-8-sig")  # a BOM is not part of the YAML
        except UnicodeDecodeError:
            raise ConfigError(f"{display}: not UTF-8 text") from None
        except OSError as exc:
            raise ConfigError(f"{display}: {exc.strerror or exc}") from None
        return model.load_documents(text, source=display, output_name=self._unique(output_name))

    def read(self, arg: str, seen: set[Path]) -> list[model.Document]:
        if arg == "-":
            if self.stdin_used:
                raise ConfigError("- (stdin) can be given only once")
            self.stdin_used = True
            return model.load_documents(
                sys.stdin.read(), source="<stdin>", output_name=self._unique("stdin.yaml")
            )
        path = Path(arg)
        if not path.exists():
            raise ConfigError(f"{arg}: no such file or directory")
        resolved = path.resolve()
        if resolved == self.outdir or self.outdir in resolved.parents:
            raise ConfigError(f"{arg} is inside OUTDIR {self.outdir}, which gets replaced")
        if path.is_file():
            if resolved in seen:
                return []
            seen.add(resolved)
            return self._file(path, arg, path.name)
        if not path.is_dir():
            raise ConfigError(f"{arg}: not a file or directory")
        documents: list[model.Document] = []
        found = False
        top = resolved.name or "input"
        for root, dirs, names in os.walk(path):
            root_path = Path(root)
            # Sorted for a deterministic order; hidden directories (.git, …) and OUTDIR skipped.
            dirs[:] = sorted(
                d for d in dirs if not d.startswith(".") and (root_path / d).resolve() != self.outdir
            )
            for name in sorted(names):
                if name.startswith(".") or not name.lower().endswith(_SUFFIXES):
                    continue
                file_path = root_path / name
                found = True
                if file_path.resolve() in seen:
                    continue
                seen.add(file_path.resolve())
                relative = file_path.relative_to(path).as_posix()
                documents += self._file(file_path, file_path.as_posix(), f"{top}/{relative}")
        if not found:
            raise ConfigError(f"{arg}: no *.yaml, *.yml or *.json files in this directory")
        return documents


def _inputs(args: argparse.Namespace, outdir: Path) -> list[ClusterInput]:
    reader = _Reader(outdir)
    if args.cluster and args.paths:
        raise ConfigError("give either --cluster NAME ISSUER_URL PATH (repeated) or PATH..., not both")
    if args.cluster and args.issuer:
        raise ConfigError("--issuer is for a single cluster; with --cluster each has its own")
    if not args.cluster and not args.paths:
        raise ConfigError("nothing to read: give PATH... (or - for stdin), or --cluster")
    if not args.cluster:
        issuer = _issuer(args.issuer, "--issuer") if args.issuer is not None else None
        seen: set[Path] = set()
        documents = [doc for arg in args.paths for doc in reader.read(arg, seen)]
        return [ClusterInput("", issuer, tuple(documents))]

    issuers: dict[str, str] = {}
    paths: dict[str, list[str]] = {}
    for raw_name, raw_issuer, path in args.cluster:
        name = _cluster_name(raw_name)
        issuer = _issuer(raw_issuer, f"--cluster {name}")
        if issuers.setdefault(name, issuer) != issuer:
            raise ConfigError(f"--cluster {name} is given with two issuers")
        paths.setdefault(name, []).append(path)
    by_issuer: dict[str, str] = {}
    for name, issuer in issuers.items():
        other = by_issuer.setdefault(issuer, name)
        if other != name:
            raise ConfigError(f"--cluster {other} and {name} have the same issuer {issuer}")
    clusters = []
    for name in sorted(issuers):
        reader.next_cluster()
        seen = set()
        documents = [doc for arg in paths[name] for doc in reader.read(arg, seen)]
        clusters.append(ClusterInput(name, issuers[name], tuple(documents)))
    return clusters


def _is_previous_output(outdir: Path) -> bool:
    try:
        with (outdir / "REPORT.md").open(encoding="utf-8") as report:
            return report.readline().rstrip("\n") == TITLE
    except OSError:
        return False


def write_output(outdir: Path, files: Mapping[str, OutputFile]) -> None:
    """Replace OUTDIR with exactly `files`, atomically as far as the filesystem allows.

    Raises:
        ConfigError: OUTDIR is not a directory, or holds something this tool did not write.
        OSError: the filesystem refused.
    """
    outdir = outdir.absolute()
    if outdir.exists():
        if not outdir.is_dir():
            raise ConfigError(f"OUTDIR {outdir} exists and is not a directory")
        if any(outdir.iterdir()) and not _is_previous_output(outdir):
            raise ConfigError(
                f"OUTDIR {outdir} is not empty and not a previous {PROG} output: refusing to replace it"
            )
    outdir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", dir=outdir.parent))
    try:
        staging.chmod(0o755)
        for relative, output in files.items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(output.content, encoding="utf-8")
            target.chmod(0o755 if output.executable else 0o644)
        if outdir.exists():
            retired = outdir.parent / f".{outdir.name}.old-{uuid.uuid4().hex[:8]}"
            outdir.rename(retired)
            staging.rename(outdir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(outdir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    outdir = Path(args.output)
    try:
        options = Options(
            proxy_port=_port(args.proxy_port),
            remove_binding_label=args.remove_aadpodidbinding,
            proxy_image=_image(args.proxy_image, "--proxy-image"),
            proxy_init_image=_image(args.proxy_init_image, "--proxy-init-image"),
            cni=args.cni,
            node=args.node,
        )
        clusters = _inputs(args, outdir)
        plan = build_plan(clusters, options)
        files = render(plan)
        files["REPORT.md"] = OutputFile(render_report(plan, files))
        write_output(outdir, files)
    except ConfigError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    except RenderError as exc:
        sys.stderr.write(f"{PROG}: internal error (nothing written): {exc}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(f"{PROG}: error: cannot write {outdir}: {exc}\n")
        return 1
    sys.stdout.write(
        f"{len(plan.workloads)} workloads migrated, {len(plan.not_migrated)} not migrated, "
        f"{len(plan.fics)} federated credentials planned; see {outdir / 'REPORT.md'}\n"
    )
    return 0
