"""End to end: the proxy's command line, start-up checks and the postStart probe.

Bad flags or environment must stop the proxy before it listens, with exit code 2 and one
line on stderr (CONTRACT.md); `--probe` is what upstream's postStart hook runs, without
the sidecar's environment, and must wait for /readyz. What the proxy imports only after
its listener is up (httpx and what it needs, prometheus_client with --metrics-port) is
found at start, so a missing one stops the start the same way; and each configuration
imports only what it uses (no prometheus_client without a metrics port, no PyYAML without
a YAML map), as the interpreter's own record of its imports shows.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support.proxyproc import (
    Pod,
    ProxyProcess,
    as_uid,
    base_env,
    free_port,
    http_request,
    proxy_argv,
    run_proxy_command,
    shared_tempdir,
    start_proxy,
    stop_process,
    unique_resource,
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


# ---- what the proxy imports after its listener is up, and only when configured ----------------

# Runs the proxy as its console script does, with one module made unimportable first:
# None in sys.modules is what import treats as not installed.
WITHOUT_MODULE = (
    "import sys\n"
    "sys.modules[sys.argv.pop(1)] = None\n"
    "from azwi_netproxy.cli import proxy_main\n"
    "raise SystemExit(proxy_main())\n"
)


@pytest.mark.parametrize(
    ("module", "metrics"),
    [("httpx", False), ("httpcore", False), ("anyio", False), ("prometheus_client", True)],
    ids=["httpx", "httpcore", "anyio", "prometheus_client-with-metrics-port"],
)
def test_a_missing_module_it_imports_later_stops_the_start_with_one_line(
        python_for_other_uids: str, proxy_env: Callable[..., dict[str, str]], module: str,
        metrics: bool) -> None:
    # httpx and the libraries under it are imported once the listener is up, and anyio
    # only by httpcore's first request: without the check at start, a missing one would
    # be an error answer to every exchange instead.
    port, metrics_port = free_port(), free_port()
    args = [f"--proxy-port={port}", *([f"--metrics-port={metrics_port}"] if metrics else [])]
    done = subprocess.run(
        as_uid(1501, [python_for_other_uids, "-c", WITHOUT_MODULE, module, *args]),
        env=proxy_env(), capture_output=True, text=True, timeout=30, cwd="/", check=False)
    assert done.returncode == 2, done
    [line] = done.stderr.splitlines()
    assert line.startswith("azwi-netproxy: error: ") and repr(module) in line, line
    for listening in (port, metrics_port):
        with pytest.raises(OSError):
            http_request(listening, "/readyz", timeout_s=1)


def test_a_module_that_fails_to_import_stops_the_proxy_right_after_start(
        python_for_other_uids: str, package_pythonpath: str,
        proxy_env: Callable[..., dict[str, str]], tmp_path: Path) -> None:
    # Found at start, broken when imported (once, after the listener is up): the proxy
    # says why and exits 1, rather than answering every exchange with an error.
    shadow = shared_tempdir("azwi-broken-httpx-")
    try:
        package = shadow / "httpx"
        package.mkdir()
        package.chmod(0o755)
        (package / "__init__.py").write_text("raise ImportError('a broken httpx, on purpose')\n")
        (package / "__init__.py").chmod(0o644)
        env = proxy_env(PYTHONPATH=f"{shadow}:{package_pythonpath}")
        err_path = tmp_path / "proxy.err"
        with err_path.open("wb") as err:
            proc = subprocess.Popen(as_uid(1501, proxy_argv(python_for_other_uids, free_port())),
                                    env=env, stdout=subprocess.DEVNULL, stderr=err, cwd="/")
        try:
            assert proc.wait(30) == 1
        finally:
            stop_process(proc)
        entries = [json.loads(line) for line in err_path.read_text().splitlines()]
        messages = [entry["message"] for entry in entries]
        assert "starting the proxy server" in messages, messages  # it listened first
        [failed] = [e for e in entries if e["message"] == "cannot import a module the proxy needs: stopping"]
        assert failed["level"] == "error" and "a broken httpx, on purpose" in failed["error"]
    finally:
        shutil.rmtree(shadow)


def _imported(stderr: str) -> list[str]:
    """The modules the interpreter reports importing (PYTHONPROFILEIMPORTTIME), in order, with
    the proxy's own log messages in between as ('log', message)."""
    order: list[str] = []
    for line in stderr.splitlines():
        if line.startswith("import time:"):
            name = line.split("|")[2].strip()
            if name != "imported package":
                order.append(name)
        elif line.startswith("{"):
            order.append("log: " + json.loads(line)["message"])
    return order


MAPS = {
    "json": '{"identities": [{"clientID": "%s"}]}\n',
    "yaml": "identities:\n  - clientID: %s\n",
}


@pytest.mark.parametrize(
    ("metrics", "identity_map", "passthrough"),
    [(False, None, "none"), (False, None, "all"), (True, None, "none"), (False, "json", "none"),
     (False, "yaml", "none")],
    ids=["plain", "pass-through", "metrics-port", "json-map", "yaml-map"],
)
def test_only_what_the_configuration_uses_is_imported(
        proxy_factory: Callable[..., ProxyProcess], pod: Pod, entra: object, metrics: bool,
        identity_map: str | None, passthrough: str) -> None:
    # The judge is the interpreter's own record of every import (PYTHONPROFILEIMPORTTIME),
    # in the order it happened among the proxy's log lines, after a token was fetched
    # (a miss, then a hit) and, with --metrics-port, scraped.
    overrides: dict[str, str] = {"PYTHONPROFILEIMPORTTIME": "1", "PYTHONOPTIMIZE": "2",
                                 "AZWI_PASSTHROUGH": passthrough}
    directory = shared_tempdir("azwi-map-")
    try:
        if identity_map is not None:
            path = directory / f"map.{identity_map}"
            path.write_text(MAPS[identity_map] % pod.client_id)
            path.chmod(0o644)
            overrides["AZWI_IDENTITY_MAP"] = str(path)
        metrics_port = free_port()
        proxy = proxy_factory(args=[f"--metrics-port={metrics_port}"] if metrics else [], **overrides)
        resource = unique_resource("imports")
        for _ in range(2):
            assert proxy.token(resource).status == 200
        if metrics:
            assert http_request(metrics_port, "/metrics").status == 200
        proxy.stop()
    finally:
        shutil.rmtree(directory)
    order = _imported(proxy.stderr_path.read_text())
    assert ("prometheus_client" in order) == metrics
    assert ("yaml" in order) == (identity_map == "yaml")
    # httpx (the exchange, pass-through's loop check) only once the listener is up.
    assert "httpx" in order
    assert order.index("log: starting the proxy server") < order.index("httpx")
