"""The test VM booted for real, as a user would: a throwaway unprivileged user, its own libvirt
session daemon, `vagrant up` with the local box, and a watch on the host's network meanwhile.

Name: support.vagrant_vm
Scope: every helper removes what it made when its `with` block ends, even when the block
    raises: the user (its home, where Vagrant, libvirt and the VM's disks live), every process
    running as that user (all started by this module, ended by PID), and the files it left
    elsewhere.
Depends: root, useradd/userdel, util-linux `setpriv`, libvirtd, vagrant with vagrant-libvirt,
    QEMU, git (to list the checkout's files), support.proxyproc (`stop_process`).

Safety (issue 24): nothing here creates a network object on the host. The VM's only network is
QEMU's user-mode one (restrict=on, SSH forwarded to 127.0.0.1), in the user's session libvirt,
which defines no network. `HostNetworkWatch` samples what would show a mistake: the root
namespace's `net.ipv4.ip_forward`, and any bridge or tun/tap interface that was not there before.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from support.proxyproc import stop_process

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
SYS_NET = Path("/sys/class/net")
# Where a leftover of the user could lie outside its home (userdel removes home and mail).
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run")
# Never copied into the user's checkout (git already leaves out what it ignores): Vagrant's state
# and the wheelhouse of the checkout this runs from.
NOT_COPIED = re.compile(r"^vagrant/(\.vagrant|wheelhouse)/")


# ---- the host's network, watched -----------------------------------------------------------


def _bridges_and_taps() -> set[str]:
    """Interfaces of this (the root) namespace that are bridges or tun/tap devices."""
    found = set()
    for link in SYS_NET.iterdir():
        if (link / "bridge").exists() or (link / "tun_flags").exists() or link.name.startswith(("virbr", "vnet")):
            found.add(link.name)
    return found


@dataclass
class HostNetworkWatch:
    """Samples ip_forward and the bridges and taps of the root namespace every `period_s`."""

    period_s: float = 0.5
    baseline: set[str] = field(default_factory=set)
    forward_seen: set[str] = field(default_factory=set)
    new_links: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _sample(self) -> None:
        self.forward_seen.add(IP_FORWARD.read_text().strip())
        self.new_links |= _bridges_and_taps() - self.baseline

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            with contextlib.suppress(OSError):  # a link may vanish while it is read
                self._sample()

    def __enter__(self) -> HostNetworkWatch:
        self.baseline = _bridges_and_taps()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="host-network-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._sample()


# ---- the throwaway user --------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: Path

    @property
    def runtime_dir(self) -> Path:
        """XDG_RUNTIME_DIR: in the home, so it goes with it (no login session makes /run/user)."""
        return self.home / ".run"

    def env(self, **extra: str) -> dict[str, str]:
        """A clean environment for this user's commands: nothing of root's but the locale."""
        return {
            "HOME": str(self.home), "USER": self.name, "LOGNAME": self.name,
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8",
            "XDG_RUNTIME_DIR": str(self.runtime_dir), "LIBVIRT_DEFAULT_URI": "qemu:///session",
            **extra,
        }

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups",
                "env", "-i", *(f"{k}={v}" for k, v in self.env().items()), *argv]

    def pids(self) -> list[int]:
        """Every live process running as this user (not the ended ones their parent has yet to reap)."""
        found = []
        for status in Path("/proc").glob("[0-9]*/status"):
            with contextlib.suppress(OSError, StopIteration):
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
                if int(fields["Uid"].split()[1]) == self.uid and not fields["State"].strip().startswith("Z"):
                    found.append(int(status.parent.name))
        return found


def command_of(pid: int) -> str:
    """A process's command line ("" once it has ended)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def end_process(pid: int, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`, one process by its PID."""

    def alive() -> bool:
        try:
            return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def throwaway_user() -> Iterator[User]:
    """A new unprivileged user with a home; afterwards its processes (ended by PID), the user,
    its group, its home and its files in the scratch directories are gone."""
    name = "azvg" + uuid.uuid4().hex[:10]
    subprocess.run(["useradd", "--create-home", "--user-group", "--shell", "/bin/bash",
                    "--comment", "azwi-netproxy test_vagrant", name], check=True, capture_output=True)
    entry = pwd.getpwnam(name)
    user = User(name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir))
    try:
        user.runtime_dir.mkdir(mode=0o700)
        os.chown(user.runtime_dir, user.uid, user.gid)
        yield user
    finally:
        for _ in range(3):  # a process may start another while the first ones end
            for pid in user.pids():
                end_process(pid)
        subprocess.run(["userdel", "--remove", name], capture_output=True, check=False)
        shutil.rmtree(user.home, ignore_errors=True)
        for path in _scratch_files(user):
            with contextlib.suppress(OSError):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)


def _scratch_files(user: User) -> list[str]:
    """What `user` owns in the scratch directories: the topmost such paths only (`-prune`)."""
    found: list[str] = []
    for scratch in SCRATCH_DIRS:
        # NUL-separated: a name may hold any other byte, newlines and spaces included.
        left = subprocess.run(["find", scratch, "-xdev", "-uid", str(user.uid), "-prune", "-print0"],
                              capture_output=True, check=False).stdout
        found += [os.fsdecode(path) for path in left.split(b"\0") if path]
    return found


def leftovers(user: User) -> list[str]:
    """What of `user` is still on the host: processes, its passwd entry, files."""
    found = [f"process {pid}" for pid in user.pids()]
    with contextlib.suppress(KeyError):
        pwd.getpwnam(user.name)
        found.append(f"user {user.name}")
    if user.home.exists():
        found.append(str(user.home))
    return found + _scratch_files(user)


# ---- the user's libvirt --------------------------------------------------------------------


@contextlib.contextmanager
def libvirt_session(user: User, log: Path) -> Iterator[int]:
    """The user's own libvirtd (`qemu:///session`), started here and ended by its PID; yields it.

    QEMU's output goes to a file (libvirt's stdio_handler), so that libvirtd starts no virtlogd,
    a daemon of its own this module would otherwise have to find and end.
    """
    socket = user.runtime_dir / "libvirt" / "libvirt-sock"
    config = user.home / ".config" / "libvirt"
    config.mkdir(parents=True, exist_ok=True)
    (config / "qemu.conf").write_text('stdio_handler = "file"\n')
    chown_tree(user.home / ".config", user)
    with log.open("wb") as out:
        daemon = subprocess.Popen(user.argv(["libvirtd"]), stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, cwd=user.home, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not socket.exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
        yield daemon.pid
    finally:
        stop_process(daemon, timeout_s=20)


# ---- the checkout, and commands as the user --------------------------------------------------


def copy_checkout(repo: Path, dest: Path, user: User) -> None:
    """The checkout's files (tracked, and new ones git does not ignore) into `dest`, owned by `user`."""
    listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode()
    for relative in sorted(set(filter(None, listed.split("\0")))):
        source = repo / relative
        if NOT_COPIED.search(relative) or not source.is_file():
            continue
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    chown_tree(dest, user)


def chown_tree(top: Path, user: User) -> None:
    for path in [top, *top.rglob("*")]:
        os.lchown(path, user.uid, user.gid)


@dataclass
class Transcript:
    """A command's output lines, each with the seconds since it started."""

    lines: list[tuple[float, str]] = field(default_factory=list)
    returncode: int | None = None
    elapsed_s: float = 0.0

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def when(self, pattern: str) -> float | None:
        """Seconds from the start to the first line matching `pattern`."""
        return next((at for at, line in self.lines if re.search(pattern, line)), None)

    def tail(self, count: int = 150) -> str:
        return "\n".join(f"[{at:7.1f}s] {line}" for at, line in self.lines[-count:])


def run_as(user: User, argv: Sequence[str], cwd: Path, timeout_s: float,
           env: Mapping[str, str] | None = None) -> Transcript:
    """Run `argv` as `user`, recording each output line with its time; killed (by PID, with
    every process of its session) if it outlives `timeout_s`."""
    extra = [f"{k}={v}" for k, v in (env or {}).items()]
    full = user.argv(["env", *extra, *argv])
    transcript = Transcript()
    started = time.monotonic()
    with subprocess.Popen(full, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, start_new_session=True) as process:
        timer = threading.Timer(timeout_s, _end_session, (process.pid,))
        timer.start()
        try:
            assert process.stdout is not None
            for raw in process.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                # Vagrant's progress bars rewrite one line with "\r" and ANSI erase codes.
                line = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line).split("\r")[-1]
                transcript.lines.append((time.monotonic() - started, line))
            transcript.returncode = process.wait()
        finally:
            timer.cancel()
            if process.poll() is None:
                _end_session(process.pid)
                process.wait()
            transcript.elapsed_s = time.monotonic() - started
            if transcript.returncode is None:  # interrupted (the test's timeout): what it last said
                print(f"{' '.join(argv)} interrupted after {transcript.elapsed_s:.0f} s:\n{transcript.tail(80)}")
    return transcript


def _end_session(leader: int) -> None:
    """End the command started as session leader `leader` and every process of its session."""
    for status in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = status.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == leader:  # field 6 of stat: the session id
                end_process(int(status.parent.name), timeout_s=5)
