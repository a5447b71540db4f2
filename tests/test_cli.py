"""Command lines: exit codes, one stderr line per bad value, --version, --probe.

Name: test_cli
Scope: in-process calls of cli.proxy_main / cli.init_main with a monkeypatched environment.
Depends: azwi_netproxy.cli; a stdlib HTTP server on 127.0.0.1:0 for --probe. Nothing here
    installs rules or starts the proxy: run_proxy and logs.configure are replaced by
    recorders where a test gets past the checks.
"""

from __future__ import annotations

import functools
import gc
import http.server
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from azwi_netproxy import __version__, cli, logs
from azwi_netproxy.proxy import probe, run
from azwi_netproxy.proxy.config import ProxyConfig

TENANT = "00000000-0000-0000-0000-00000000000a"
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"


def _exit_code(main: Callable[[Sequence[str]], int], argv: list[str]) -> int:
    """The process exit code: argparse exits through SystemExit, our checks return it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.fixture
def proxy_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """Name: proxy_env. Scope: function. A valid proxy environment; tests break one value."""
    token = tmp_path / "token"
    token.write_text("sa-token")
    monkeypatch.setenv("AZURE_TENANT_ID", TENANT)
    monkeypatch.setenv("AZURE_FEDERATED_TOKEN_FILE", str(token))
    return monkeypatch


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[ProxyConfig]:
    """Name: started. Scope: function. Records configs that would have started the proxy."""
    configs: list[ProxyConfig] = []

    def fake_run(cfg: ProxyConfig, writer: object = None) -> int:
        configs.append(cfg)
        return 0

    monkeypatch.setattr(run, "run_proxy", fake_run)
    monkeypatch.setattr(logs, "configure", lambda *a, **k: None)
    return configs


def _one_error_line(err: str, prog: str) -> str:
    assert err.endswith("\n")
    assert err.count("\n") == 1, err
    assert err.startswith(f"{prog}: error: "), err
    return err


# ---- proxy ------------------------------------------------------------------------------


def test_proxy_valid_environment_starts(proxy_env: pytest.MonkeyPatch, started: list[ProxyConfig]) -> None:
    proxy_env.setenv("AZWI_PASSTHROUGH", "none")
    assert cli.proxy_main(["--proxy-port=9100", "--passthrough", "all"]) == 0
    [cfg] = started
    assert (cfg.proxy_port, cfg.tenant_id, cfg.passthrough) == (9100, TENANT, "all")


def test_proxy_start_collects_no_garbage_until_it_listens(
    proxy_env: pytest.MonkeyPatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    collecting: list[bool] = []

    def fake_run(cfg: ProxyConfig, writer: object = None) -> int:
        collecting.append(gc.isenabled())
        return 0

    monkeypatch.setattr(run, "run_proxy", fake_run)
    monkeypatch.setattr(logs, "configure", lambda *a, **k: None)
    assert cli.proxy_main(["--proxy-port=9100"]) == 0
    # Off while the start imports; run.serve turns it on before it builds and listens, and
    # proxy_main leaves it on whatever happened.
    assert collecting == [False]
    assert gc.isenabled()
    assert _exit_code(cli.proxy_main, ["--proxy-port=0"]) == 2
    assert gc.isenabled()


@pytest.mark.parametrize(
    ("module", "flags"),
    [("httpx", []), ("anyio", []), ("prometheus_client", ["--metrics-port=9101"])],
    ids=["httpx", "anyio", "prometheus_client-with-metrics-port"],
)
def test_proxy_a_module_it_imports_later_is_checked_at_start(
    proxy_env: pytest.MonkeyPatch,
    started: list[ProxyConfig],
    capsys: pytest.CaptureFixture[str],
    module: str,
    flags: list[str],
) -> None:
    proxy_env.setitem(sys.modules, module, None)  # what import treats as not installed
    assert cli.proxy_main(["--proxy-port=9100", *flags]) == 2
    line = _one_error_line(capsys.readouterr().err, "azwi-netproxy")
    assert repr(module) in line
    assert started == []


def test_proxy_without_a_metrics_port_needs_no_prometheus_client(
    proxy_env: pytest.MonkeyPatch, started: list[ProxyConfig]
) -> None:
    proxy_env.setitem(sys.modules, "prometheus_client", None)
    assert cli.proxy_main(["--proxy-port=9100"]) == 0
    assert len(started) == 1


PROXY_BAD = [
    ([], {"AZURE_TENANT_ID": None}, "AZURE_TENANT_ID is not set", "missing-tenant"),
    ([], {"AZURE_FEDERATED_TOKEN_FILE": None}, "AZURE_FEDERATED_TOKEN_FILE is not set", "missing-token-file"),
    (["--proxy-port", "0"], {}, "--proxy-port: port 0", "port-0"),
    (["--proxy-port", "65536"], {}, "--proxy-port: port 65536", "port-65536"),
    (["--proxy-port=abc"], {}, "invalid value 'abc' for flag -proxy-port", "port-abc"),
    (["--log-level", "chatty"], {}, "--log-level", "log-level"),
    (["--passthrough", "some"], {}, "invalid value 'some' for flag -passthrough", "passthrough-choice"),
    (["--no-such-flag"], {}, "flag provided but not defined: -no-such-flag", "unknown-flag"),
    ([], {"AZURE_AUTHORITY_HOST": "not a url"}, "AZURE_AUTHORITY_HOST", "authority-not-url"),
    ([], {"AZURE_AUTHORITY_HOST": "http://login.microsoftonline.com/"}, "must use https", "authority-http"),
    ([], {"AZURE_KUBERNETES_TOKEN_PROXY": "http://p"}, "must be an https URL", "binding-http"),
    ([], {"AZURE_KUBERNETES_TOKEN_PROXY": "https://u:p@p"}, "user info", "binding-userinfo"),
    ([], {"AZURE_KUBERNETES_TOKEN_PROXY": "https://p/?q=1"}, "query or fragment", "binding-query"),
    ([], {"AZURE_KUBERNETES_TOKEN_PROXY": "https://p/#f"}, "query or fragment", "binding-fragment"),
    (
        [],
        {"AZURE_KUBERNETES_TOKEN_PROXY": "https://p", "AZURE_KUBERNETES_CA_FILE": "/ca", "AZURE_KUBERNETES_CA_DATA": PEM},
        "mutually exclusive",
        "binding-ca-file-and-data",
    ),
    ([], {"AZURE_KUBERNETES_SNI_NAME": "sni"}, "AZURE_KUBERNETES_TOKEN_PROXY is not", "binding-sni-without-url"),
    ([], {"AZURE_KUBERNETES_CA_FILE": "/ca"}, "AZURE_KUBERNETES_TOKEN_PROXY is not", "binding-ca-without-url"),
    (
        [],
        {"AZURE_KUBERNETES_TOKEN_PROXY": "https://p", "AZURE_KUBERNETES_CA_DATA": "abc"},
        "holds no PEM certificate",
        "binding-ca-data-not-pem",
    ),
    ([], {"METADATA_IP": "::1"}, "METADATA_IP", "metadata-ip"),
    ([], {"HTTPS_PROXY": "socks5://proxy:1080"}, "HTTPS_PROXY", "https-proxy-socks"),
    ([], {"HTTPS_PROXY": " "}, "HTTPS_PROXY is blank", "https-proxy-blank"),
    ([], {"HTTPS_PROXY": " http://proxy:3128"}, "has blank space around it", "https-proxy-spaced"),
    ([], {"SSL_CERT_FILE": "/nonexistent/ca.pem"}, "SSL_CERT_FILE: cannot read", "ssl-cert-file-missing"),
]


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [(a, e, m) for a, e, m, _ in PROXY_BAD],
    ids=[name for *_, name in PROXY_BAD],
)
def test_proxy_bad_value_exits_2_with_one_line(
    proxy_env: pytest.MonkeyPatch,
    started: list[ProxyConfig],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    env: dict[str, str | None],
    message: str,
) -> None:
    for name, value in env.items():
        if value is None:
            proxy_env.delenv(name)
        else:
            proxy_env.setenv(name, value)
    assert _exit_code(cli.proxy_main, argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert message in _one_error_line(err, "azwi-netproxy")
    assert started == []


# Upstream's `proxy` parses its flags with Go's `flag` package (cmd/proxy/main.go): one or
# two dashes, `=value` or the next argument, booleans as `-flag` or `-flag=<ParseBool>`,
# integers as strconv.ParseInt(s, 0, 64) reads them. Each row: argv, the config it means.
GO_SPELLINGS = [
    (["-proxy-port=9101"], {"proxy_port": 9101}, "one-dash-equals"),
    (["--proxy-port", "9101"], {"proxy_port": 9101}, "two-dashes-separate-value"),
    (["-proxy-port", "9101"], {"proxy_port": 9101}, "one-dash-separate-value"),
    (["--proxy-port=9101"], {"proxy_port": 9101}, "two-dashes-equals"),
    (["-proxy-port=0x238d"], {"proxy_port": 9101}, "hex"),
    (["-proxy-port=0o21615"], {"proxy_port": 9101}, "octal-prefix"),
    (["-proxy-port=021615"], {"proxy_port": 9101}, "legacy-octal"),
    (["-proxy-port=0b10001110001101"], {"proxy_port": 9101}, "binary"),
    (["-proxy-port=9_101"], {"proxy_port": 9101}, "underscore"),
    (["-proxy-port=+9101"], {"proxy_port": 9101}, "plus-sign"),
    (["-proxy-port=1", "-proxy-port=9101"], {"proxy_port": 9101}, "last-one-wins"),
    (["-log-level", "debug"], {"log_level": "debug"}, "log-level-separate-value"),
    (["-log-level=debug"], {"log_level": "debug"}, "log-level-equals"),
    (["--log-level="], {"log_level": "warning"}, "log-level-empty-is-mlogs-default"),
    (["-passthrough", "none"], {"passthrough": "none"}, "our-flag-one-dash"),
    (["-metrics-port=0x2382"], {"metrics_port": 9090}, "metrics-port-hex"),
    (["--proxy-port=9101", "--"], {"proxy_port": 9101}, "double-dash-ends-flags"),
]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [(a, e) for a, e, _ in GO_SPELLINGS],
    ids=[name for *_, name in GO_SPELLINGS],
)
def test_upstreams_go_flag_spellings_mean_the_same(
    proxy_env: pytest.MonkeyPatch, started: list[ProxyConfig], argv: list[str], expected: dict[str, object]
) -> None:
    assert cli.proxy_main(argv) == 0
    [cfg] = started
    assert {name: getattr(cfg, name) for name in expected} == expected


PROBE_SPELLINGS = [
    (["--probe"], True), (["-probe"], True), (["--probe=true"], True), (["-probe=1"], True),
    (["-probe=t"], True), (["-probe=T"], True), (["-probe=TRUE"], True), (["-probe=True"], True),
    (["--probe=false"], False), (["-probe=0"], False), (["-probe=f"], False), (["-probe=F"], False),
    (["-probe=FALSE"], False), (["-probe=False"], False), ([], False),
]


@pytest.mark.parametrize(("argv", "probe"), PROBE_SPELLINGS, ids=[" ".join(a) or "none" for a, _ in PROBE_SPELLINGS])
def test_probe_takes_gos_boolean_spellings(argv: list[str], probe: bool) -> None:
    assert cli.proxy_parser().parse_args(argv).probe is probe


GO_REFUSED = [
    (["-probe=yes"], "invalid boolean value 'yes' for -probe", "bool-yes"),
    (["-probe", "true"], "unexpected argument 'true'", "bool-separate-value"),
    (["-proxy-port"], "flag needs an argument: -proxy-port", "missing-value"),
    (["-proxy-port=abc"], "invalid value 'abc' for flag -proxy-port", "not-a-number"),
    (["-proxy-port=08"], "invalid value '08' for flag -proxy-port", "bad-legacy-octal"),
    (["-proxy-port= 8000"], "invalid value ' 8000' for flag -proxy-port", "blank-space"),
    (["-proxy-port=9_"], "invalid value '9_' for flag -proxy-port", "trailing-underscore"),
    (["---proxy-port=8000"], "bad flag syntax: ---proxy-port=8000", "three-dashes"),
    (["-=8000"], "bad flag syntax: -=8000", "no-name"),
    (["-no-such-flag"], "flag provided but not defined: -no-such-flag", "unknown"),
    (["extra"], "unexpected argument 'extra'", "positional"),
    (["--", "extra"], "unexpected argument 'extra'", "positional-after-double-dash"),
    (["-version=maybe"], "invalid boolean value 'maybe' for -version", "version-bad-bool"),
]


@pytest.mark.parametrize(
    ("argv", "message"),
    [(a, m) for a, m, _ in GO_REFUSED],
    ids=[name for *_, name in GO_REFUSED],
)
def test_spellings_go_refuses_exit_2_with_one_line(
    proxy_env: pytest.MonkeyPatch, started: list[ProxyConfig], capsys: pytest.CaptureFixture[str],
    argv: list[str], message: str,
) -> None:
    assert _exit_code(cli.proxy_main, argv) == 2
    assert message in _one_error_line(capsys.readouterr().err, "azwi-netproxy")
    assert started == []


@pytest.mark.parametrize("argv", [["-h"], ["-help"], ["--help"]])
def test_help_in_gos_spellings_prints_usage_and_exits_0(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert _exit_code(cli.proxy_main, argv) == 0
    assert "--proxy-port" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["-version"], ["--version=true"]])
def test_version_in_gos_spellings(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert _exit_code(cli.proxy_main, argv) == 0
    assert capsys.readouterr().out == f"azwi-netproxy {__version__}\n"


MAP_FILES = [
    (b"identities:\n  - clientID: nope\n", "clientID 'nope' is not a GUID", "bad-guid"),
    (b"identities: [\n", "not valid YAML or JSON at line", "invalid-yaml"),
    (b"- 1\n- 2\n", "expected a mapping", "list"),
    (b"onlyListed: maybe\n", "onlyListed must be true or false", "only-listed"),
    # A file that is not UTF-8 (a binary or UTF-16 export) is a malformed map too.
    (b"\xff\xfei\x00d\x00", "AZWI_IDENTITY_MAP", "not-utf8"),
]


@pytest.mark.parametrize(
    ("content", "message"),
    [(c, m) for c, m, _ in MAP_FILES],
    ids=[name for *_, name in MAP_FILES],
)
def test_proxy_malformed_identity_map_exits_2(
    proxy_env: pytest.MonkeyPatch,
    started: list[ProxyConfig],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    content: bytes,
    message: str,
) -> None:
    path = tmp_path / "map.yaml"
    path.write_bytes(content)
    proxy_env.setenv("AZWI_IDENTITY_MAP", str(path))
    assert _exit_code(cli.proxy_main, []) == 2
    err = capsys.readouterr().err
    assert message in _one_error_line(err, "azwi-netproxy")
    assert started == []


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_proxy_unreadable_identity_map_exits_2(
    proxy_env: pytest.MonkeyPatch,
    started: list[ProxyConfig],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    kind: str,
) -> None:
    path = tmp_path / "map.yaml"
    if kind == "directory":
        path.mkdir()
    proxy_env.setenv("AZWI_IDENTITY_MAP", str(path))
    assert _exit_code(cli.proxy_main, []) == 2
    err = _one_error_line(capsys.readouterr().err, "azwi-netproxy")
    assert f"AZWI_IDENTITY_MAP: cannot read {path}" in err


def test_proxy_good_identity_map_starts(
    proxy_env: pytest.MonkeyPatch, started: list[ProxyConfig], tmp_path: Path
) -> None:
    path = tmp_path / "map.json"
    path.write_text('{"onlyListed": true, "identities": [{"clientID": "11111111-1111-1111-1111-111111111111"}]}')
    proxy_env.setenv("AZWI_IDENTITY_MAP", str(path))
    assert cli.proxy_main([]) == 0
    assert started[0].identity_map.only_listed is True


@pytest.mark.parametrize(
    ("main", "name"),
    [(cli.proxy_main, "azwi-netproxy"), (cli.init_main, "azwi-netproxy-init")],
    ids=["proxy", "init"],
)
def test_version(capsys: pytest.CaptureFixture[str], main: Callable[[Sequence[str]], int], name: str) -> None:
    assert _exit_code(main, ["--version"]) == 0
    assert capsys.readouterr().out == f"{name} {__version__}\n"


# ---- --probe ----------------------------------------------------------------------------


@pytest.fixture
def short_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Name: short_probe. Scope: function. The probe gives up after 0.5 s instead of 10 s."""
    monkeypatch.setattr(probe, "probe", functools.partial(probe.probe, deadline_s=0.5))


@pytest.fixture
def closed_port() -> Iterator[int]:
    """Name: closed_port. Scope: function. A loopback port bound but not listening: connects are refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()


class _ReadyHandler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        body = b"ok" if self.path == "/readyz" else b"no"
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture
def ready_server(request: pytest.FixtureRequest) -> Iterator[int]:
    """Name: ready_server. Scope: function. A stdlib server answering /readyz (200 unless parametrised)."""
    status = getattr(request, "param", 200)
    handler = type("Handler", (_ReadyHandler,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_probe_succeeds_against_a_ready_server(ready_server: int, short_probe: None) -> None:
    # No AZURE_* environment: upstream's postStart hook runs the probe without it.
    assert cli.proxy_main([f"--proxy-port={ready_server}", "--probe"]) == 0


def test_probe_fails_quickly_when_nothing_listens(
    closed_port: int, short_probe: None, capsys: pytest.CaptureFixture[str]
) -> None:
    begun = time.monotonic()
    assert cli.proxy_main(["--proxy-port", str(closed_port), "--probe"]) != 0
    assert time.monotonic() - begun < 3.0
    err = capsys.readouterr().err
    assert f"127.0.0.1:{closed_port}/readyz" in err
    assert err.count("\n") == 1


def test_probe_with_nothing_listening_exits_within_10_s_of_its_own_start(closed_port: int) -> None:
    # CONTRACT.md: the postStart hook's probe gives up with a non-zero exit within 10 s of
    # its own start, interpreter start included: timed from before the exec, as a kubelet
    # would see it. It must also have tried for most of that time, not given up at once.
    begun = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "azwi_netproxy", f"--proxy-port={closed_port}", "--probe"],
                          capture_output=True, text=True, timeout=30, check=False, env={"PATH": "/usr/bin:/bin"})
    took_s = time.monotonic() - begun
    assert done.returncode != 0, done
    assert 8.0 < took_s < 10.0, took_s
    assert done.stderr.count("\n") == 1 and "/readyz failed" in done.stderr, done.stderr


@pytest.mark.parametrize("ready_server", [503], indirect=True)
def test_probe_fails_when_readyz_is_not_200(
    ready_server: int, short_probe: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.proxy_main(["--proxy-port", str(ready_server), "--probe"]) == 1
    assert "HTTP 503" in capsys.readouterr().err


def test_probe_bad_port_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(cli.proxy_main, ["--proxy-port", "0", "--probe"]) == 2
    _one_error_line(capsys.readouterr().err, "azwi-netproxy")


def test_probe_bad_log_level_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    # Checked as config.load checks it for the hook, which the probe no longer imports.
    assert _exit_code(cli.proxy_main, ["--proxy-port=8000", "--log-level=loud", "--probe"]) == 2
    assert "--log-level" in _one_error_line(capsys.readouterr().err, "azwi-netproxy")


def _raw_server(answer: bytes, *, close: bool) -> tuple[int, Callable[[], None]]:
    """A loopback server that sends `answer` to every connection, then closes it or not."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stopping = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.recv(65536)
            conn.sendall(answer)
            if close:
                conn.close()
            else:
                held.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def stop() -> None:
        stopping.set()
        thread.join(5)
        listener.close()
        for conn in held:
            conn.close()

    return listener.getsockname()[1], stop


def test_probe_reads_the_status_even_from_a_server_that_keeps_the_connection(short_probe: None) -> None:
    port, stop = _raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", close=False)
    try:
        assert cli.proxy_main([f"--proxy-port={port}", "--probe"]) == 0
    finally:
        stop()


def test_probe_fails_on_an_answer_that_is_not_http(
    short_probe: None, capsys: pytest.CaptureFixture[str]
) -> None:
    port, stop = _raw_server(b"SSH-2.0-OpenSSH_9.2\r\n", close=True)
    try:
        assert cli.proxy_main([f"--proxy-port={port}", "--probe"]) == 1
    finally:
        stop()
    assert "not an HTTP answer" in capsys.readouterr().err


# ---- init -------------------------------------------------------------------------------

INIT_BAD = [
    ([], {"PROXY_PORT": "0"}, "PROXY_PORT: port 0 is out of range", "env-port-0"),
    ([], {"PROXY_PORT": "65536"}, "PROXY_PORT: port 65536", "env-port-65536"),
    ([], {"PROXY_UID": "abc"}, "PROXY_UID: 'abc' is not a numeric uid", "env-uid-abc"),
    ([], {"METADATA_IP": "::1"}, "METADATA_IP: '::1' is not an IPv4 address", "env-ipv6"),
    ([], {"METADATA_PORT": "x"}, "METADATA_PORT: 'x'", "env-metadata-port"),
    (["--proxy-port", "0"], {}, "--proxy-port: port 0", "flag-port-0"),
    (["--proxy-uid", "root"], {}, "--proxy-uid: 'root'", "flag-uid-name"),
    (["--metadata-ip", "fe80::1"], {}, "--metadata-ip", "flag-ipv6"),
    (["--backend", "pf"], {}, "--backend: 'pf' is not one of auto, nftables, iptables", "unknown-backend"),
    (["--dry-run", "--check"], {}, "not allowed with argument", "dry-run-and-check"),
    (["--check", "--cleanup"], {}, "not allowed with argument", "check-and-cleanup"),
    (["--log-level", "verbose"], {}, "--log-level", "log-level"),
    (["extra"], {}, "unrecognized arguments: extra", "positional"),
    ([], {"AZWI_PASSTHROUGH": "some"}, "AZWI_PASSTHROUGH: 'some' is not one of all, none", "env-passthrough"),
    (["--passthrough", "None"], {}, "--passthrough: 'None' is not one of all, none", "flag-passthrough"),
]


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [(a, e, m) for a, e, m, _ in INIT_BAD],
    ids=[name for *_, name in INIT_BAD],
)
def test_init_bad_value_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    env: dict[str, str],
    message: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # Must fail before anything is installed: a call to the runner would be a bug.
    ran: list[object] = []
    monkeypatch.setattr(logs, "configure", lambda *a, **k: ran.append("configure"))
    assert _exit_code(cli.init_main, argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert message in _one_error_line(err, "azwi-netproxy-init")
    assert ran == []


# ---- the node process (node mode) ---------------------------------------------------------

NODE_BAD = [
    ({"AZWI_NODE_PASSTHROUGH": "some"}, [], "AZWI_NODE_PASSTHROUGH: 'some' is not one of all, none"),
    ({"AZURE_TENANT_ID": "a tenant"}, [], "AZURE_TENANT_ID: 'a tenant' is not a tenant ID"),
    ({"AZWI_KUBELET_PODS_DIR": "var/lib/kubelet/pods"}, [], "AZWI_KUBELET_PODS_DIR: 'var/lib/kubelet/pods' is not"),
    ({"AZWI_CNI_RUN_DIR": "run"}, [], "AZWI_CNI_RUN_DIR: 'run' is not an absolute path"),
    ({"AZURE_AUTHORITY_HOST": "ftp://login"}, [], "AZURE_AUTHORITY_HOST: 'ftp://login' is not an https URL"),
    ({"LOG_LEVEL": "loud"}, [], "--log-level: 'loud' is not one of"),
    ({}, ["--metrics-port", "0"], "--metrics-port: port 0 is out of range"),
    ({}, ["--port", "1"], "unrecognized arguments: --port"),
]


@pytest.mark.parametrize(("env", "argv", "message"), NODE_BAD, ids=[m.split(":")[0] for _, _, m in NODE_BAD])
def test_node_bad_value_exits_2_with_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                              env: dict[str, str], argv: list[str], message: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ran: list[object] = []
    monkeypatch.setattr(logs, "configure", lambda *a, **k: ran.append("configure"))
    assert _exit_code(cli.node_main, argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert message in _one_error_line(err, "azwi-netproxy-node")
    assert ran == []


def test_node_check_without_a_node_process_exits_1_and_says_why(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setenv("AZWI_CNI_RUN_DIR", str(tmp_path))
    assert _exit_code(cli.node_main, ["--check"]) == 1
    out, _ = capsys.readouterr()
    assert f"no node process listens on {tmp_path}/node.sock" in out
