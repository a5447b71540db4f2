"""The projected service account token file: missing, empty, unreadable, garbled and rotated.

Name: test_tokenfile
Scope: one proxy process (uid 1501) per token-file case, each with its own volume laid out
    as the kubelet lays it out (`token -> ..data/token`, `..data -> ..<timestamp>/`); the
    cases run at the same time, since each waits out the proxy's retries.
Depends: support.fixtures (proxy factory, fake Entra), support.proxyproc.ProjectedToken.

What is asserted is issue 7, "The service account token file": each state of the file
gives the right result or a clear IMDS-style error (CONTRACT.md: a file the proxy cannot
use yet is transient, 503 with Retry-After; an assertion Entra refuses is 400 with the
AADSTS code), the proxy recovers once the file is good, and a token swapped in by the
kubelet's atomic `..data` rename while exchanges are in flight is used from the next
exchange on, with no answer ever built from a partial or mixed file.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.fake_entra import FakeEntraClient, decode_fake_token
from support.proxyproc import (
    Pod,
    ProjectedToken,
    ProxyProcess,
    Response,
    make_sa_token,
    shared_tempdir,
    unique_resource,
)

pytest_plugins = ["support.fixtures"]
pytestmark = pytest.mark.timeout(90)

ProxyFactory = Callable[..., ProxyProcess]


@pytest.fixture
def volumes() -> Iterator[Path]:
    """Name: volumes. Scope: function. A 0755 temp dir for token volumes; removed afterwards
    (modes put back first, so a chmod 000 case cannot block the cleanup)."""
    directory = shared_tempdir("azwi-tokfile-")
    try:
        yield directory
    finally:
        for root, dirs, files in os.walk(directory):
            for name in dirs + files:
                path = Path(root) / name
                if not path.is_symlink():
                    path.chmod(0o755)
        shutil.rmtree(directory, ignore_errors=True)


def resolved_token(volume: ProjectedToken) -> Path:
    """The real file behind `token -> ..data/token`."""
    return volume.path.resolve()


# ---- the file's states ----------------------------------------------------------------------


@dataclass(frozen=True)
class FileCase:
    status: int
    says: str  # in error_description (or, for 200, nothing)
    retry_after: bool


def prepare(name: str, directory: Path, pod: Pod) -> Path:
    """Put the volume for case `name` in `directory`; return AZURE_FEDERATED_TOKEN_FILE."""
    good = pod.new_sa_token()
    if name == "missing":
        return directory / "not-mounted-yet" / "token"
    volume = ProjectedToken(directory, good)
    real = resolved_token(volume)
    if name == "empty":
        real.write_text("")
    elif name == "whitespace":
        real.write_text(" \n\t\n")
    elif name == "unreadable-file":
        real.chmod(0o000)
    elif name == "unreadable-dir":
        real.parent.chmod(0o000)
    elif name == "dangling-data-link":
        shutil.rmtree(real.parent)
    elif name == "a-directory":
        real.unlink()
        real.mkdir(mode=0o755)
    elif name == "not-utf8":
        real.write_bytes(b"\xff\xfe\x00token\x80")
    elif name == "not-a-jwt":
        real.write_text("this is not a jwt\n")
    elif name == "expired-sa-token":
        real.write_text(make_sa_token(pod.namespace, pod.service_account, issuer=pod.issuer,
                                      lifetime_s=-120))
    elif name == "trailing-newline":
        real.write_text(good + "\n")
    else:
        raise AssertionError(name)
    return volume.path


FILE_CASES: dict[str, FileCase] = {
    "missing": FileCase(503, "No such file or directory", True),
    "empty": FileCase(503, "is empty", True),
    "whitespace": FileCase(503, "is empty", True),
    "unreadable-file": FileCase(503, "Permission denied", True),
    "unreadable-dir": FileCase(503, "Permission denied", True),
    "dangling-data-link": FileCase(503, "No such file or directory", True),
    "a-directory": FileCase(503, "Is a directory", True),
    "not-utf8": FileCase(503, "service account token file", True),
    "not-a-jwt": FileCase(400, "AADSTS50027", False),
    "expired-sa-token": FileCase(400, "AADSTS700024", False),
    "trailing-newline": FileCase(200, "", False),
}


def start_many(proxy_factory: ProxyFactory, envs: dict[str, str]) -> dict[str, ProxyProcess]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(envs)) as pool:
        futures = {name: pool.submit(proxy_factory, AZURE_FEDERATED_TOKEN_FILE=path)
                   for name, path in envs.items()}
        return {name: future.result() for name, future in futures.items()}


def test_each_state_of_the_token_file_gives_the_right_answer(
        proxy_factory: ProxyFactory, entra: FakeEntraClient, pod: Pod, volumes: Path) -> None:
    paths = {}
    for name in FILE_CASES:
        directory = volumes / name
        directory.mkdir(mode=0o755)
        directory.chmod(0o755)
        paths[name] = str(prepare(name, directory, pod))
    proxies = start_many(proxy_factory, paths)
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(proxies)) as pool:
        futures = {name: pool.submit(proxies[name].token, unique_resource(name))
                   for name in FILE_CASES}
        answers: dict[str, Response] = {name: f.result() for name, f in futures.items()}
    problems = []
    for name, case in FILE_CASES.items():
        answer = answers[name]
        doc = answer.json()
        ok = answer.status == case.status
        if case.status == 200:
            ok = ok and decode_fake_token(doc["access_token"])["appid"] == pod.client_id.lower()
        else:
            ok = (ok and set(doc) == {"error", "error_description"}
                  and case.says in doc["error_description"]
                  and ("retry-after" in answer.headers) == case.retry_after)
        if not ok:
            problems.append(f"{name}: expected {case.status} saying {case.says!r}, got {answer}")
        assert proxies[name].proc.poll() is None, name
    assert problems == []
    # Only the cases whose file could be read ever reached Entra, and with the file's text.
    sent = [r["form"]["client_assertion"] for r in entra.exchanges()]
    assert len(sent) == 3
    assert all(assertion and assertion == assertion.strip() for assertion in sent)


def test_the_proxy_recovers_when_the_token_is_mounted(
        proxy_factory: ProxyFactory, entra: FakeEntraClient, pod: Pod, volumes: Path) -> None:
    directory = volumes / "late"
    proxy = proxy_factory(AZURE_FEDERATED_TOKEN_FILE=str(directory / "token"))
    resource = unique_resource("late")
    first = proxy.token(resource)
    assert first.status == 503, first
    assert first.headers["retry-after"] == "1"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    volume = ProjectedToken(directory, pod.new_sa_token())
    # The failure is remembered for a moment (the app's retries must not each cost an
    # exchange attempt), then the next request exchanges the token now in place.
    deadline = time.monotonic() + 10
    while (answer := proxy.token(resource)).status != 200 and time.monotonic() < deadline:
        assert answer.status == 503, answer
        time.sleep(0.3)
    assert answer.status == 200, answer
    assert [r["form"]["client_assertion"] for r in entra.exchanges()] == [volume.read()]
    # The operator was told at start, once, which file was missing.
    warned = [line for line in proxy.log_text().splitlines() if "cannot read the federated token file" in line]
    assert len(warned) == 1 and '"level":"warn"' in warned[0] and str(directory / "token") in warned[0], warned


# ---- rotation while exchanges are in flight -----------------------------------------------


def test_rotation_during_a_burst_uses_the_new_token_from_the_next_exchange(
        proxy_factory: ProxyFactory, entra: FakeEntraClient, pod: Pod, volumes: Path) -> None:
    volume = ProjectedToken(volumes, pod.new_sa_token())
    written = [volume.read()]
    proxy = proxy_factory(AZURE_FEDERATED_TOKEN_FILE=str(volume.path))
    # Slow exchanges keep many of them in flight while the kubelet swaps `..data`.
    entra.fault(client_id=pod.client_id, times=None, delay_s=0.15)
    stop = threading.Event()

    def rotate() -> None:
        while not stop.wait(0.2):
            token = pod.new_sa_token()
            volume.rotate(token)
            written.append(token)

    def burst(worker: int) -> list[Response]:
        return [proxy.token(unique_resource(f"burst{worker}")) for _ in range(12)]

    rotator = threading.Thread(target=rotate)
    rotator.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
            answers = [a for batch in pool.map(burst, range(10)) for a in batch]
    finally:
        stop.set()
        rotator.join()

    problems = []
    for answer in answers:
        if answer.status == 200:
            continue
        doc = answer.json()
        # The kubelet removes the old directory right after the swap; a read racing that
        # may miss the file once and is retried. Only a clear, transient error is allowed.
        if not (answer.status == 503 and "service account token file" in doc["error_description"]):
            problems.append(str(answer))
    assert problems == []
    assert sum(a.status == 200 for a in answers) >= len(answers) * 0.95
    exchanges = entra.exchanges()
    used = [r["form"]["client_assertion"] for r in exchanges]
    assert set(used) <= set(written), "an exchange sent a partial or mixed token"
    assert len(set(used)) >= 3, "rotations were not seen during the burst"
    # Every token from the burst is for the right app, whichever assertion got it.
    for answer in answers:
        if answer.status == 200:
            assert decode_fake_token(answer.json()["access_token"])["appid"] == pod.client_id.lower()

    # After the last swap, the next exchange carries the newest token, and only that.
    entra.clear_faults()
    assert proxy.token(unique_resource("after-rotation")).status == 200
    assert entra.exchanges()[-1]["form"]["client_assertion"] == written[-1] == volume.read()
    assert proxy.proc.poll() is None
