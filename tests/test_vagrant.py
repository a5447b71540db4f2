"""The test VM (issue 24): Vagrant accepts the Vagrantfile with either box, and the local box
boots for real, as an unprivileged user, with the namespace tests and the demo passing inside.

Name: test_vagrant
Scope: function. The boot test builds the box (cached in BOX_CACHE between runs), then makes
    everything else for itself and removes it, even when it fails: a throwaway user, its libvirt
    session daemon, its copy of the checkout, its Vagrant home and the VM.
Depends: vagrant with vagrant-libvirt for the validation; for the boot also root, QEMU
    (skipped with the reason only where qemu-system-x86_64 is missing), libvirtd, mmdebstrap,
    e2fsprogs and qemu-img (the box), git, pip reaching PyPI from the host (the wheelhouse, kept
    in BOX_CACHE too), support.vagrant_vm.

The VM's network is QEMU's user-mode one: the boot test checks that the host's ip_forward never
changed and that no bridge, tap or libvirt network appeared while it ran.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
from support.vagrant_vm import (
    IP_FORWARD,
    HostNetworkWatch,
    Transcript,
    chown_tree,
    command_of,
    copy_checkout,
    leftovers,
    libvirt_session,
    run_as,
    throwaway_user,
)

REPO = Path(__file__).resolve().parent.parent
VAGRANT_DIR = REPO / "vagrant"
VAGRANTFILE = VAGRANT_DIR / "Vagrantfile"
PROVISION = VAGRANT_DIR / "provision.sh"
BOX_CACHE = Path("/var/lib/azwi-netproxy-test/vagrant")
PUBLIC_BOX = "debian/bookworm64"
# pytest's closing line: "==== 9 passed, 1 skipped in 140.02s (0:02:20) ====".
SUMMARY = re.compile(r"^=+ (?P<counts>\d+ \w+.*) in (?P<seconds>[\d.]+)s\b.*=+$")
DEMO_OK = "demo: every step behaved as expected"
# Lines of `vagrant up` whose times the test prints (the README's timings): what, and the line.
MILESTONES = (("box added", "Successfully added box"), ("domain started", "Starting domain"),
              ("SSH answers", "Machine booted and ready"), ("rsync", "Rsyncing folder"),
              ("provisioner", "Running provisioner"), ("installed", "provision: installed"),
              ("demo done", "provision: the demo exited"), ("tests done", r"=+ .* in [0-9.]+s"))


def vagrant_env(scratch: Path, box: str) -> dict[str, str]:
    """Vagrant's state and home in a scratch dir, so validating leaves nothing behind."""
    return {
        **os.environ,
        "VAGRANT_CWD": str(VAGRANT_DIR),
        "VAGRANT_DOTFILE_PATH": str(scratch / "dotfile"),
        "VAGRANT_HOME": str(scratch / "home"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",
        "AZWI_VAGRANT_BOX": box,
    }


@pytest.mark.parametrize("box", ["local", PUBLIC_BOX])
def test_vagrant_validate_accepts_the_vagrantfile(box: str) -> None:
    vagrant = shutil.which("vagrant")
    if vagrant is None:
        pytest.skip("vagrant is not installed (apt-get install vagrant)")
    with tempfile.TemporaryDirectory(prefix="azwi-vagrant-") as scratch:
        env = vagrant_env(Path(scratch), box)
        result = subprocess.run([vagrant, "validate"], capture_output=True, text=True, env=env, timeout=120,
                                check=False)
        if result.returncode != 0 and "No usable default provider" in result.stdout + result.stderr:
            # No VirtualBox or libvirt here: check everything but the provider blocks.
            result = subprocess.run([vagrant, "validate", "--ignore-provider"], capture_output=True, text=True,
                                    env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout


def default_tests() -> list[str]:
    """The node ids provision.sh runs when AZWI_PYTEST_ARGS is empty."""
    block = re.search(r"^DEFAULT_TESTS=\((?P<ids>.*?)^\)", PROVISION.read_text("utf-8"), re.S | re.M)
    assert block, "provision.sh lists its DEFAULT_TESTS"
    return re.findall(r'"([^"]+)"', block["ids"])


def test_vagrantfile_provisions_as_root_with_either_box() -> None:
    text = VAGRANTFILE.read_text("utf-8")
    # The box: the local one, or any other by name, the public Debian box by default.
    assert re.search(r'ENV\.fetch\("AZWI_VAGRANT_BOX"', text)
    assert f'"{PUBLIC_BOX}"' in text
    assert re.search(r"config\.vm\.box\s*=\s*BOX\b", text)
    # One shell provisioner, as root, running provision.sh in the synced checkout.
    provision = re.search(r'config\.vm\.provision\s+"test",(?P<opts>.*?)\n\s*env:', text, re.S)
    assert provision, "a shell provisioner named 'test'"
    assert 'type: "shell"' in provision["opts"] and "privileged: true" in provision["opts"]
    assert 'path: "provision.sh"' in provision["opts"]
    assert '"AZWI_PYTEST_ARGS" => ENV.fetch("AZWI_PYTEST_ARGS", "")' in text
    script = PROVISION.read_text("utf-8")
    assert "cd /vagrant" in script
    assert '"$VENV/bin/azwi-netproxy-demo"' in script
    assert '"$VENV/bin/pytest"' in script
    assert "--no-index" in script, "the local box's guest installs offline"
    assert "scripts/bootstrap.sh" in script, "a public box's guest installs as the README says"
    # Every default test exists, so a rename fails here rather than ten minutes into a boot.
    for node in default_tests():
        path, _, name = node.partition("::")
        assert re.search(rf"^(async )?def {name}\(", (REPO / path).read_text("utf-8"), re.M), node
    # The synced folder is the checkout, the parent of vagrant/.
    assert re.search(r'synced_folder\s+"\.\.",\s*"/vagrant",\s*type:\s*"rsync"', text)
    for provider in ("virtualbox", "libvirt"):
        block = re.search(rf'provider\s+"{provider}"\s+do\s+\|(\w+)\|(.*?)\bend\b', text, re.S)
        assert block, provider
        assert re.search(rf"{block[1]}\.cpus\s*=\s*2\b", block[2])
        assert re.search(rf"{block[1]}\.memory\s*=\s*4096\b", block[2])
    # The local box: the user's own libvirt, no management network, QEMU's restricted
    # user-mode network with SSH on 127.0.0.1 only.
    assert 'lv.uri = "qemu:///session"' in text
    assert "lv.mgmt_attach = false" in text
    assert re.search(r"user,id=\w+,restrict=on,hostfwd=tcp:127\.0\.0\.1:", text)
    readme = (REPO / "README.md").read_text("utf-8")
    assert "## Test VM" in readme
    for command in ("vagrant/build-box.sh", "vagrant up", "vagrant provision", "vagrant destroy -f"):
        assert command in readme, command


# ---- the boot, for real ------------------------------------------------------------------------


def timed(argv: list[str], env: dict[str, str] | None = None, timeout_s: float = 1200) -> tuple[str, float]:
    """Run a root command to success; its stdout's last line and the seconds it took."""
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "", time.monotonic() - started


def summary_line(transcript: Transcript) -> str:
    """pytest's closing line, as the VM printed it (Vagrant prefixes "    default: ")."""
    for _, line in reversed(transcript.lines):
        text = re.sub(r"^\s*default:\s?", "", line).strip()
        if SUMMARY.match(text):
            return text
    return ""


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_local_box_boots_and_the_namespace_tests_pass_inside(capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("QEMU is not installed (scripts/bootstrap.sh installs qemu-system-x86 where Debian has it)")
    missing = [tool for tool in ("vagrant", "libvirtd", "virsh", "mmdebstrap", "qemu-img", "mkfs.ext4", "git",
                                 "useradd", "setpriv")
               if shutil.which(tool) is None]
    assert not missing, f"missing {missing}: run scripts/bootstrap.sh"
    with tempfile.TemporaryDirectory(prefix="azwi-vagrant-") as scratch:  # no ~/.vagrant.d for root
        plugins = subprocess.run(["vagrant", "plugin", "list"], capture_output=True, text=True, check=False,
                                 env=vagrant_env(Path(scratch), "local")).stdout
    assert "vagrant-libvirt" in plugins, f"vagrant-libvirt is missing (apt-get install vagrant-libvirt): {plugins}"

    timings: dict[str, float] = {}
    box_file, timings["box build"] = timed([str(VAGRANT_DIR / "build-box.sh")],
                                           env={**os.environ, "AZWI_VAGRANT_CACHE": str(BOX_CACHE)})
    assert box_file.endswith(".box") and Path(box_file).is_file(), box_file
    forward_before = IP_FORWARD.read_text().strip()

    up = destroy = Transcript()
    session_networks = "not listed"
    with HostNetworkWatch() as watch, ExitStack() as stack:
        user = stack.enter_context(throwaway_user())
        checkout = user.home / "azwi-netproxy"
        copy_checkout(REPO, checkout, user)
        # The wheels, built by root from the user's copy (the checkout this runs from keeps no
        # build/), their dependencies kept in the cache between runs; the `vagrant up` trigger
        # then finds them current and rebuilds only the package's own wheel, offline.
        with (BOX_CACHE / ".wheelhouse.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be filling the same cache
            _, timings["wheelhouse"] = timed(
                [str(checkout / "vagrant" / "wheelhouse.sh")],
                env={**os.environ, "AZWI_WHEELHOUSE": str(BOX_CACHE / "wheelhouse"),
                     "AZWI_WHEELHOUSE_PYTHON": sys.executable})
            shutil.copytree(BOX_CACHE / "wheelhouse", checkout / "vagrant" / "wheelhouse")
        box_copy = user.home / "azwi-netproxy-bookworm.box"
        shutil.copyfile(box_file, box_copy)
        chown_tree(user.home, user)
        daemon_log = user.home / "libvirtd.log"
        stack.enter_context(libvirt_session(user, daemon_log))

        env = {"VAGRANT_HOME": str(user.home / ".vagrant.d"), "VAGRANT_CHECKPOINT_DISABLE": "1",
               "VAGRANT_DEFAULT_PROVIDER": "libvirt", "AZWI_VAGRANT_BOX": "local",
               "AZWI_VAGRANT_BOX_FILE": str(box_copy)}
        vagrant_dir = checkout / "vagrant"

        def destroy_vm() -> None:
            nonlocal destroy
            if destroy.returncode is None:
                destroy = run_as(user, ["vagrant", "destroy", "-f"], cwd=vagrant_dir, timeout_s=600, env=env)

        stack.callback(destroy_vm)
        up = run_as(user, ["vagrant", "up", "--no-color"], cwd=vagrant_dir, timeout_s=1500, env=env)
        session_networks = run_as(user, ["virsh", "-c", "qemu:///session", "net-list", "--all", "--name"],
                                  cwd=user.home, timeout_s=60).text.strip()
        if up.returncode != 0:
            console = vagrant_dir / ".vagrant" / "azwi-console.log"
            for name, log in (("the VM's console", console), ("libvirtd", daemon_log)):
                if log.exists():
                    tail = log.read_text(errors="replace").splitlines()[-60:]
                    up.lines += [(up.elapsed_s, f"--- {name} ---"), *((up.elapsed_s, line) for line in tail)]
        # Destroy now, to time it and to see the VM gone (the callback then finds nothing).
        destroy_vm()
        qemu_left = [pid for pid in user.pids() if "qemu" in command_of(pid)]
    left = leftovers(user)
    timings["vagrant up"] = up.elapsed_s
    timings["vagrant destroy"] = destroy.elapsed_s

    summary = summary_line(up)
    tests_s = float(SUMMARY.match(summary)["seconds"]) if summary else 0.0
    accel = next((line for _, line in up.lines if "QEMU accelerator" in line), "(no accelerator line)")
    with capsys.disabled():
        print(f"\n{accel}\ninside the VM: {summary or '(no pytest summary)'}")
        print("timings: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
              + f"; tests inside {tests_s:.0f} s; boot to SSH "
              + f"{(up.when('Machine booted and ready') or 0) - (up.when('Starting domain') or 0):.0f} s")
        for label, pattern in MILESTONES:
            at = up.when(pattern)
            print(f"  {'-' if at is None else f'{at:4.0f} s'}  {label}")

    assert up.returncode == 0, f"vagrant up failed ({up.returncode}):\n{up.tail()}"
    assert summary, f"no pytest summary line:\n{up.tail()}"
    assert "passed" in summary and not re.search(r"\b(failed|error|errors)\b", summary), f"{summary}\n{up.tail()}"
    assert DEMO_OK in up.text and "provision: the demo exited 0" in up.text, up.tail()
    assert destroy.returncode == 0, destroy.tail()
    assert not qemu_left, f"QEMU still runs after vagrant destroy: {qemu_left}"
    assert session_networks == "", f"a libvirt network was defined: {session_networks}"
    assert forward_before == "0" and watch.forward_seen == {"0"}, f"ip_forward was not 0 throughout: {watch.forward_seen}"
    assert not watch.new_links, f"bridges or taps appeared on the host: {watch.new_links}"
    assert not left, f"left behind: {left}"
