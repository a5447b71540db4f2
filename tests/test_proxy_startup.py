"""End to end: the proxy's command line, start-up checks and the postStart probe.

Bad flags or environment must stop the proxy before it listens, with exit code 2 and one
line on stderr (CONTRACT.md); `--probe` is what upstream's postStart hook runs, without
the sidecar's environment, and must wait for /readyz.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support.proxyproc import (
    ProxyProcess,
    as_uid,
    base_env,
    free_port,
    http_request,
    proxy_argv,
    run_proxy_command,
    start_proxy,
)

pytest_plugins = ["support.fixtures"]
pytestmark = pytest.mark.timeout(60)

CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"

# id: (flags, env overrides, a word the one stderr line must contain)
BAD_STARTS: dict[str, tuple[list[str], dict[str, str | None], str]] = {
    "no-tenant": ([], {"AZURE_TENANT_ID": None}, "AZURE_TENANT_ID"),
    "blank-tenant": ([], {"AZURE_TENANT_ID": "  "}, "AZURE_TENANT_ID"),
    "port-0": (["--proxy-port", "0"], {}, "--proxy-port"),
    "port-abc": (["--proxy-port", "abc"], {}, "-proxy-port"),
    "port-65536": (["--proxy-port=65536"], {}, "--proxy-port"),
    "sni-without-token-proxy": ([], {"AZURE_KUBERNETES_SNI_NAME": "binding.example"},
                                "AZURE_KUBERNETES_TOKEN_PROXY"),
    "ca-file-without-token-proxy": ([], {"AZURE_KUBERNETES_CA_FILE": "/etc/ca.pem"},
                                    "AZURE_KUBERNETES_TOKEN_PROXY"),
    "http-token-proxy": ([], {"AZURE_KUBERNETES_TOKEN_PROXY": "http://binding.example:443"},
                         "AZURE_KUBERNETES_TOKEN_PROXY"),
    "token-proxy-with-query": ([], {"AZURE_KUBERNETES_TOKEN_PROXY": "https://b.example/?x=1"},
                               "AZURE_KUBERNETES_TOKEN_PROXY"),
    "token-proxy-with-userinfo": ([], {"AZURE_KUBERNETES_TOKEN_PROXY":
                                       "https://user:pw@b.example/"},
                                  "AZURE_KUBERNETES_TOKEN_PROXY"),
    "ca-file-and-ca-data": ([], {"AZURE_KUBERNETES_TOKEN_PROXY": "https://b.example",
                                 "AZURE_KUBERNETES_CA_FILE": "/etc/ca.pem",
                                 "AZURE_KUBERNETES_CA_DATA": CA_PEM},
                            "AZURE_KUBERNETES_CA"),
    "unknown-flag": (["--bogus"], {}, "-bogus"),
    "bad-log-level": (["--log-level", "loud"], {}, "--log-level"),
}


@pytest.mark.parametrize(("flags", "overrides", "named"), list(BAD_STARTS.values()),
                         ids=list(BAD_STARTS))
def test_bad_flag_or_env_exits_2_with_one_stderr_line(
        python_for_other_uids: str, proxy_env: Callable[..., dict[str, str]],
        flags: list[str], overrides: dict[str, str | None], named: str) -> None:
    port = free_port()
    args = flags if any(f.startswith("--proxy-port") for f in flags) else [
        "--proxy-port", str(port), *flags]
    done = run_proxy_command(python_for_other_uids, proxy_env(**overrides), args)
    assert done.returncode == 2, done
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert named in lines[0]
    assert "pw@" not in lines[0]
    with pytest.raises(OSError):
        http_request(port, "/readyz", timeout_s=1)


def test_version(python_for_other_uids: str, proxy_env: Callable[..., dict[str, str]]) -> None:
    done = run_proxy_command(python_for_other_uids, proxy_env(), ["--version"])
    assert done.returncode == 0, done
    assert done.stdout.startswith("azwi-netproxy ")


def test_probe_exits_0_when_the_proxy_is_up(python_for_other_uids: str, package_pythonpath: str,
                                            proxy: ProxyProcess) -> None:
    # postStart runs `/proxy --proxy-port=N --probe` without the sidecar's environment.
    started = time.monotonic()
    done = run_proxy_command(python_for_other_uids, base_env(package_pythonpath),
                             [f"--proxy-port={proxy.port}", "--probe"])
    assert done.returncode == 0, done
    assert time.monotonic() - started < 5


def test_probe_waits_for_a_proxy_that_is_starting(
        python_for_other_uids: str, package_pythonpath: str,
        proxy_env: Callable[..., dict[str, str]], tmp_path: Path) -> None:
    port = free_port()
    probe = subprocess.Popen(
        as_uid(1501, proxy_argv(python_for_other_uids, port, ["--probe"])),
        env=base_env(package_pythonpath), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd="/")
    proxy: ProxyProcess | None = None
    try:
        time.sleep(1.0)
        assert probe.poll() is None  # still waiting
        proxy = start_proxy(python_for_other_uids, proxy_env(), tmp_path, port=port)
        assert probe.wait(15) == 0
    finally:
        if probe.poll() is None:
            probe.kill()
        probe.communicate()
        if proxy is not None:
            proxy.stop()


@pytest.mark.slow
def test_probe_fails_after_a_few_seconds_when_nothing_listens(
        python_for_other_uids: str, package_pythonpath: str) -> None:
    started = time.monotonic()
    done = run_proxy_command(python_for_other_uids, base_env(package_pythonpath),
                             ["--proxy-port", str(free_port()), "--probe"])
    elapsed = time.monotonic() - started
    assert done.returncode != 0
    assert 1 <= elapsed <= 30
    assert done.stderr.strip()
