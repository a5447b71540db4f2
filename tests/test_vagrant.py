"""The test VM's Vagrantfile: Vagrant accepts it, and it runs the suite the way the README says.

Name: test_vagrant
Scope: function.
Depends: the `vagrant` command for the validation (skipped with a reason without it); the
check of what the provisioner runs needs nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VAGRANTFILE = REPO / "vagrant" / "Vagrantfile"
TEST_COMMAND = "scripts/test.sh"


def test_vagrant_validate_accepts_the_vagrantfile() -> None:
    vagrant = shutil.which("vagrant")
    if vagrant is None:
        pytest.skip("vagrant is not installed (apt-get install vagrant)")
    with tempfile.TemporaryDirectory(prefix="azwi-vagrant-") as scratch:
        # Vagrant's state and home go to a scratch dir, so validating leaves nothing in the checkout.
        env = {
            **os.environ,
            "VAGRANT_CWD": str(VAGRANTFILE.parent),
            "VAGRANT_DOTFILE_PATH": str(Path(scratch) / "dotfile"),
            "VAGRANT_HOME": str(Path(scratch) / "home"),
            "VAGRANT_CHECKPOINT_DISABLE": "1",
        }
        result = subprocess.run([vagrant, "validate"], capture_output=True, text=True, env=env, timeout=120,
                                check=False)
        if result.returncode != 0 and "No usable default provider" in result.stdout + result.stderr:
            # No VirtualBox or libvirt here: check everything but the provider blocks.
            result = subprocess.run([vagrant, "validate", "--ignore-provider"], capture_output=True, text=True,
                                    env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout


def test_vagrantfile_runs_the_readmes_test_command_as_root_on_debian_12() -> None:
    text = VAGRANTFILE.read_text("utf-8")
    assert re.search(r'config\.vm\.box\s*=\s*"debian/bookworm64"', text)
    provision = re.search(r'config\.vm\.provision\s+"test",(?P<opts>.*?)inline:\s*<<-SHELL\n(?P<body>.*?)SHELL',
                          text, re.S)
    assert provision, "a shell provisioner named 'test' with an inline script"
    assert "privileged: true" in provision["opts"]
    body = [line.strip() for line in provision["body"].splitlines() if line.strip() and
            not line.strip().startswith("#")]
    assert "cd /vagrant" in body
    assert any(line.startswith(f"bash {TEST_COMMAND}") for line in body), body
    assert (REPO / TEST_COMMAND).exists()
    readme = REPO / "README.md"
    if readme.exists():
        assert TEST_COMMAND in readme.read_text("utf-8"), "README.md names another test command"
    # The synced folder is the checkout, the parent of vagrant/.
    assert re.search(r'synced_folder\s+"\.\.",\s*"/vagrant",\s*type:\s*"rsync"', text)
    for provider in ("virtualbox", "libvirt"):
        block = re.search(rf'provider\s+"{provider}"\s+do\s+\|(\w+)\|(.*?)\bend\b', text, re.S)
        assert block, provider
        assert re.search(rf"{block[1]}\.cpus\s*=\s*2\b", block[2])
        assert re.search(rf"{block[1]}\.memory\s*=\s*4096\b", block[2])
