"""Shared fixtures and capability probes.

Name: conftest
Scope: session-wide probes, per-test environment hygiene.
Depends: nothing of the package beyond its import path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

from support.caps import CAN_NETNS, NETNS_SKIP_REASON

# support.pod is a helper library several modules import and a fixture plugin some load
# (pytest_plugins): registered here, before any module imports it, its asserts are rewritten
# whichever module pytest collects first.
pytest.register_assert_rewrite("support.pod")

REPO = Path(__file__).resolve().parent.parent

# Property tests: derandomised by default, so a failure in CI reproduces with the same
# command; `AZWI_HYPOTHESIS_PROFILE=long` (or `--hypothesis-profile=long`) runs 20 times as
# many examples from a fresh random seed, printing the blob that reproduces a failure.
settings.register_profile("ci", derandomize=True, database=None, print_blob=False)
settings.register_profile("long", derandomize=False, database=None, max_examples=2000, print_blob=True)
settings.load_profile(os.environ.get("AZWI_HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_root = pytest.mark.skip(reason=NETNS_SKIP_REASON)
    for item in items:
        if "root" in item.keywords and not CAN_NETNS:
            item.add_marker(skip_root)


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never inherit Azure or TLS settings from the shell that runs them."""
    for name in list(os.environ):
        if name.startswith(("AZURE_", "SSL_CERT_", "AZWI_", "MSI_", "IDENTITY_")) or name in (
            "PROXY_PORT", "PROXY_UID", "METADATA_IP", "METADATA_PORT",
            "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy",
        ):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "*")


@pytest.fixture
def unique_name() -> str:
    """A short unique name for netns/veth objects (veth names are limited to 15 bytes)."""
    return "az" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def package_pythonpath() -> str:
    """The directory the package is imported from, for subprocesses under other uids."""
    import azwi_netproxy

    return str(Path(azwi_netproxy.__file__).resolve().parent.parent)


@pytest.fixture(scope="session")
def python_for_other_uids() -> str:
    """An interpreter (with the package's dependencies) that uid 1501 and 1000 can run."""
    exe = sys.executable
    if os.geteuid() == 0 and shutil.which("setpriv"):
        probe = subprocess.run(
            ["setpriv", "--reuid=1501", "--regid=1501", "--clear-groups", exe, "-c",
             "import httptools, uvloop, httpx"],
            capture_output=True, text=True, cwd="/",
        )
        if probe.returncode != 0:
            pytest.skip(f"{exe} is not usable by uid 1501 (build the venv with scripts/bootstrap.sh): "
                        f"{probe.stderr.strip()[-200:]}")
    return exe
