"""Configuration of both programs: flags over environment over defaults, and every check up front.

Name: test_config
Scope: pure unit tests of init.config.load, proxy.config.load (with proxy.files, the edge
    that reads the files it names) and the shared value parsers.
Depends: azwi_netproxy.settings, azwi_netproxy.init.config, azwi_netproxy.proxy.config and
    .files; the proxies of an environment as the standard library reads them (httpx does).
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path
from unittest import mock

import pytest

from azwi_netproxy import settings
from azwi_netproxy.errors import ConfigError
from azwi_netproxy.init import config as init_config
from azwi_netproxy.init.config import InitConfig
from azwi_netproxy.proxy import config as proxy_config
from azwi_netproxy.proxy import files as proxy_files
from azwi_netproxy.proxy.config import IdentityBinding, ProxyConfig

TENANT = "00000000-0000-0000-0000-00000000000a"
CLIENT = "11111111-1111-1111-1111-111111111111"
# A real CA certificate: the CA data is parsed at start-up, so a placeholder would be refused.
PEM = __import__("trustme").CA().cert_pem.bytes().decode()
BASE_ENV = {"AZURE_TENANT_ID": TENANT, "AZURE_FEDERATED_TOKEN_FILE": "/var/run/secrets/token"}


def _no_files(path: str) -> str:
    raise FileNotFoundError(2, "No such file or directory", path)


def _proxies_of(env: dict[str, str]) -> dict[str, str]:
    """The proxies `env` names, read by the standard library itself, as cli.py reads them."""
    with mock.patch.dict(os.environ, env, clear=True):
        return urllib.request.getproxies_environment()


def _load_proxy(
    env: dict[str, str], flags: dict[str, object] | None = None, files: dict[str, str] | None = None
) -> ProxyConfig:
    """What cli.py does: the configuration, then the files it names (here from `files`)."""

    def read_text(path: str) -> str:
        if files is None or path not in files:
            return _no_files(path)
        return files[path]

    return proxy_files.with_files(proxy_config.load(flags or {}, env, _proxies_of(env)), read_text)


# ---- value parsers ----------------------------------------------------------------------

PORTS = [("8000", 8000), (" 8000 ", 8000), ("1", 1), ("65535", 65535), (443, 443)]
BAD_PORTS = [("0", "out of range"), ("65536", "out of range"), ("abc", "not a port number"),
             ("-1", "out of range"), ("80.0", "not a port number"), ("0x50", "not a port number"), ("", "not a port")]


@pytest.mark.parametrize(("value", "port"), PORTS, ids=[repr(v) for v, _ in PORTS])
def test_parse_port(value: str | int, port: int) -> None:
    assert settings.parse_port(value, "PROXY_PORT") == port


@pytest.mark.parametrize(("value", "message"), BAD_PORTS, ids=[repr(v) for v, _ in BAD_PORTS])
def test_parse_port_rejects(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings.parse_port(value, "PROXY_PORT")
    assert str(info.value).startswith("PROXY_PORT: ")
    assert message in str(info.value)


UIDS = [("1501", 1501), ("0", 0), (" 65534 ", 65534), ("4294967294", 2**32 - 2)]
BAD_UIDS = ["abc", "-1", "1.5", "4294967295", "", "root"]


@pytest.mark.parametrize(("value", "uid"), UIDS, ids=[v for v, _ in UIDS])
def test_parse_uid(value: str, uid: int) -> None:
    assert settings.parse_uid(value, "PROXY_UID") == uid


@pytest.mark.parametrize("value", BAD_UIDS, ids=[repr(v) for v in BAD_UIDS])
def test_parse_uid_rejects(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^PROXY_UID: "):
        settings.parse_uid(value, "PROXY_UID")


IPS = [("169.254.169.254", "169.254.169.254"), (" 10.0.0.1 ", "10.0.0.1")]
BAD_IPS = ["::1", "fe80::1", "169.254.169.254.1", "localhost", "010.1.1.1", "", "1.2.3"]


@pytest.mark.parametrize(("value", "ip"), IPS, ids=[v.strip() for v, _ in IPS])
def test_parse_ipv4(value: str, ip: str) -> None:
    assert settings.parse_ipv4(value, "METADATA_IP") == ip


@pytest.mark.parametrize("value", BAD_IPS, ids=[repr(v) for v in BAD_IPS])
def test_parse_ipv4_rejects(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^METADATA_IP: .* is not an IPv4 address$"):
        settings.parse_ipv4(value, "METADATA_IP")


# ---- init -------------------------------------------------------------------------------


def test_init_defaults_are_upstreams() -> None:
    assert init_config.load({}, {}) == InitConfig(
        proxy_port=8000, proxy_uid=1501, metadata_ip="169.254.169.254", metadata_port=80
    )


def test_init_reads_the_environment() -> None:
    env = {"PROXY_PORT": "9000", "PROXY_UID": "2000", "METADATA_IP": "10.1.2.3", "METADATA_PORT": "8080"}
    cfg = init_config.load({}, env)
    assert (cfg.proxy_port, cfg.proxy_uid, cfg.metadata_ip, cfg.metadata_port) == (9000, 2000, "10.1.2.3", 8080)


def test_init_flags_override_the_environment_even_when_it_is_bad() -> None:
    env = {"PROXY_PORT": "0", "PROXY_UID": "abc", "METADATA_IP": "::1", "METADATA_PORT": "x"}
    flags = {"proxy_port": "9001", "proxy_uid": "7", "metadata_ip": "10.0.0.9", "metadata_port": "81"}
    cfg = init_config.load(flags, env)
    assert (cfg.proxy_port, cfg.proxy_uid, cfg.metadata_ip, cfg.metadata_port) == (9001, 7, "10.0.0.9", 81)


def test_init_blank_environment_means_default() -> None:
    cfg = init_config.load({}, {"PROXY_PORT": "  ", "PROXY_UID": ""})
    assert (cfg.proxy_port, cfg.proxy_uid) == (8000, 1501)


INIT_ERRORS = [
    ({}, {"PROXY_PORT": "0"}, "PROXY_PORT: port 0 is out of range 1-65535", "env-port-0"),
    ({"proxy_port": "70000"}, {}, "--proxy-port: port 70000 is out of range", "flag-port"),
    ({}, {"PROXY_UID": "abc"}, "PROXY_UID: 'abc' is not a numeric uid", "env-uid"),
    ({"proxy_uid": "-5"}, {}, "--proxy-uid: '-5' is not a numeric uid", "flag-uid"),
    ({}, {"METADATA_IP": "::1"}, "METADATA_IP: '::1' is not an IPv4 address", "env-ipv6"),
    ({"metadata_ip": "x"}, {}, "--metadata-ip: 'x' is not an IPv4 address", "flag-ip"),
    ({}, {"METADATA_PORT": "65536"}, "METADATA_PORT: port 65536", "env-metadata-port"),
    ({"backend": "ipfw"}, {}, "--backend: 'ipfw' is not one of auto, nftables, iptables", "backend"),
    ({"log_level": "loud"}, {}, "--log-level: 'loud'", "log-level"),
]


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [(f, e, m) for f, e, m, _ in INIT_ERRORS],
    ids=[name for *_, name in INIT_ERRORS],
)
def test_init_errors_name_the_source(flags: dict[str, object], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        init_config.load(flags, env)
    assert message in str(info.value)


@pytest.mark.parametrize("action", ["install", "dry-run", "check", "cleanup"])
def test_init_actions(action: str) -> None:
    assert init_config.load({"action": action}, {}).action == action


@pytest.mark.parametrize("backend", ["auto", "nftables", "iptables"])
def test_init_backends(backend: str) -> None:
    assert init_config.load({"backend": backend}, {}).backend == backend


def test_init_exempts_the_proxy_uid_unless_passthrough_is_none() -> None:
    assert init_config.load({}, {}).passthrough == "all"
    assert init_config.load({}, {"AZWI_PASSTHROUGH": "none"}).passthrough == "none"
    assert init_config.load({"passthrough": "all"}, {"AZWI_PASSTHROUGH": "none"}).passthrough == "all"


def test_init_fails_closed_unless_asked() -> None:
    assert init_config.load({}, {}).fail_closed is True
    assert init_config.load({"allow_other_metadata_traffic": True}, {}).fail_closed is False


# ---- proxy ------------------------------------------------------------------------------


def test_proxy_minimal_environment() -> None:
    cfg = _load_proxy(BASE_ENV)
    assert cfg.tenant_id == TENANT
    assert cfg.federated_token_file == "/var/run/secrets/token"
    assert cfg.default_client_id is None
    assert cfg.authority_host == "https://login.microsoftonline.com/"
    assert cfg.proxy_port == 8000
    assert cfg.identity_binding is None
    assert cfg.identity_map.identities == ()
    assert cfg.passthrough == "all"
    assert (cfg.metadata_ip, cfg.metadata_port) == ("169.254.169.254", 80)


def test_proxy_full_environment() -> None:
    env = {
        **BASE_ENV,
        "AZURE_CLIENT_ID": f" {CLIENT} ",
        "AZURE_AUTHORITY_HOST": "https://login.microsoftonline.us/",
        "METADATA_IP": "10.0.0.5",
        "METADATA_PORT": "8080",
    }
    cfg = _load_proxy(env, {"proxy_port": "9000", "log_level": "DEBUG"})
    assert cfg.default_client_id == CLIENT
    assert cfg.authority_host == "https://login.microsoftonline.us/"
    assert (cfg.metadata_ip, cfg.metadata_port, cfg.proxy_port, cfg.log_level) == ("10.0.0.5", 8080, 9000, "debug")


def test_proxy_passthrough_flag_overrides_environment() -> None:
    assert _load_proxy({**BASE_ENV, "AZWI_PASSTHROUGH": "none"}).passthrough == "none"
    assert _load_proxy({**BASE_ENV, "AZWI_PASSTHROUGH": "none"}, {"passthrough": "all"}).passthrough == "all"
    assert _load_proxy(BASE_ENV, {"passthrough": "none"}).passthrough == "none"


def test_probe_needs_no_environment() -> None:
    cfg = _load_proxy({}, {"probe": True, "proxy_port": "8123"})
    assert cfg.probe is True
    assert cfg.proxy_port == 8123


@pytest.mark.parametrize("tenant", [TENANT, "contoso.onmicrosoft.com", " contoso-eu.example.com "])
def test_tenant_is_a_guid_or_a_domain(tenant: str) -> None:
    assert _load_proxy({**BASE_ENV, "AZURE_TENANT_ID": tenant}).tenant_id == tenant.strip()


def test_proxy_reads_the_identity_map() -> None:
    files = {"/etc/map.yaml": f"onlyListed: true\nidentities:\n  - clientID: {CLIENT}\n"}
    cfg = _load_proxy({**BASE_ENV, "AZWI_IDENTITY_MAP": "/etc/map.yaml"}, files=files)
    assert cfg.identity_map.only_listed is True
    assert CLIENT in cfg.identity_map.by_client_id


PROXY_ERRORS = [
    ({"AZURE_FEDERATED_TOKEN_FILE": "/t"}, {}, "AZURE_TENANT_ID is not set", "missing-tenant"),
    ({"AZURE_TENANT_ID": " ", "AZURE_FEDERATED_TOKEN_FILE": "/t"}, {}, "AZURE_TENANT_ID is not set", "blank-tenant"),
    ({"AZURE_TENANT_ID": TENANT}, {}, "AZURE_FEDERATED_TOKEN_FILE is not set", "missing-token-file"),
    ({**BASE_ENV, "AZURE_TENANT_ID": "contoso/../x"}, {}, "AZURE_TENANT_ID: 'contoso/../x' is not a tenant ID", "tenant-path"),
    ({**BASE_ENV, "AZURE_TENANT_ID": "a b"}, {}, "AZURE_TENANT_ID: 'a b' is not a tenant ID", "tenant-space"),
    (BASE_ENV, {"proxy_port": "0"}, "--proxy-port: port 0 is out of range", "port-0"),
    (BASE_ENV, {"proxy_port": "65536"}, "--proxy-port: port 65536 is out of range", "port-65536"),
    (BASE_ENV, {"proxy_port": "abc"}, "--proxy-port: 'abc' is not a port number", "port-abc"),
    (BASE_ENV, {"log_level": "verbose"}, "--log-level: 'verbose'", "log-level"),
    ({**BASE_ENV, "AZURE_AUTHORITY_HOST": "login.microsoftonline.com"}, {}, "AZURE_AUTHORITY_HOST", "no-scheme"),
    ({**BASE_ENV, "AZURE_AUTHORITY_HOST": "ftp://login/"}, {}, "AZURE_AUTHORITY_HOST", "ftp"),
    ({**BASE_ENV, "AZURE_AUTHORITY_HOST": "https://"}, {}, "AZURE_AUTHORITY_HOST", "no-host"),
    ({**BASE_ENV, "AZURE_AUTHORITY_HOST": "http://login.example/"}, {}, "must use https", "http-remote"),
    ({**BASE_ENV, "AZURE_AUTHORITY_HOST": "https://login.example:99999/"}, {}, "has a bad port", "authority-port"),
    ({**BASE_ENV, "AZURE_AUTHORITY_HOST": "https://login.example/?x=1"}, {}, "query or fragment", "authority-query"),
    ({**BASE_ENV, "AZURE_AUTHORITY_HOST": "https://login.example/#f"}, {}, "query or fragment", "authority-fragment"),
    ({**BASE_ENV, "AZURE_AUTHORITY_HOST": "https://u:secret@login.example/"}, {}, "must not contain user info", "authority-userinfo"),
    ({**BASE_ENV, "METADATA_IP": "::1"}, {}, "METADATA_IP: '::1' is not an IPv4 address", "metadata-ip"),
    ({**BASE_ENV, "METADATA_PORT": "0"}, {}, "METADATA_PORT: port 0", "metadata-port"),
    ({**BASE_ENV, "AZWI_PASSTHROUGH": "some"}, {}, "'some' is not one of all, none", "passthrough"),
    (BASE_ENV, {"metrics_port": "8000"}, "--metrics-port must differ from --proxy-port", "metrics-same-port"),
    (BASE_ENV, {"metrics_port": "0"}, "--metrics-port: port 0", "metrics-port-0"),
    ({**BASE_ENV, "HTTPS_PROXY": "socks5://10.0.0.1:1080"}, {}, "HTTPS_PROXY: 'socks5://", "proxy-socks"),
    ({**BASE_ENV, "https_proxy": "http://"}, {}, "HTTPS_PROXY: 'http://' has no host", "proxy-no-host"),
    ({**BASE_ENV, "HTTP_PROXY": "proxy:99999"}, {}, "HTTP_PROXY: 'proxy:99999' has a bad port", "proxy-port"),
    (
        {**BASE_ENV, "HTTPS_PROXY": "http://user:s3cret@proxy:99999"},
        {},
        "HTTPS_PROXY: 'http://proxy:99999' has a bad port",  # the password is not repeated
        "proxy-port-credentials",
    ),
    (
        {**BASE_ENV, "HTTPS_PROXY": "http://proxy:3128", "ALL_PROXY": "socks5h://proxy:1080"},
        {},
        "ALL_PROXY: 'socks5h://proxy:1080' is not an http or https proxy URL",
        "all-proxy-socks-with-https-proxy",
    ),
    ({**BASE_ENV, "HTTPS_PROXY": "  "}, {}, "HTTPS_PROXY is blank: unset it", "proxy-blank"),
    (
        {**BASE_ENV, "HTTP_PROXY": "http://proxy:3128", "https_proxy": " http://proxy:3128"},
        {},
        "HTTPS_PROXY: 'http://proxy:3128' has blank space around it",
        "proxy-leading-space",
    ),
    (
        {**BASE_ENV, "HTTPS_PROXY": "http://user:s3cret@proxy:3128\n"},
        {},
        "HTTPS_PROXY: 'http://proxy:3128' has blank space around it",  # the password is not repeated
        "proxy-trailing-newline-credentials",
    ),
    (
        {**BASE_ENV, "https_proxy": "socks5://proxy:1080", "HTTPS_PROXY": "http://proxy:3128"},
        {},
        "HTTPS_PROXY: 'socks5://proxy:1080'",  # httpx takes the lower-case one
        "proxy-lower-case-wins",
    ),
    (
        {**BASE_ENV, "AZURE_KUBERNETES_TOKEN_PROXY": "https://10.0.0.1", "AZURE_KUBERNETES_SNI_NAME": "a b"},
        {},
        "AZURE_KUBERNETES_SNI_NAME: 'a b' is not a host name",
        "sni-space",
    ),
    (
        {**BASE_ENV, "AZURE_KUBERNETES_TOKEN_PROXY": "https://10.0.0.1", "AZURE_KUBERNETES_SNI_NAME": ".svc"},
        {},
        "AZURE_KUBERNETES_SNI_NAME: '.svc' is not a host name",
        "sni-leading-dot",
    ),
    ({**BASE_ENV, "SSL_CERT_FILE": "/nope.pem"}, {}, "SSL_CERT_FILE: cannot read /nope.pem: No such file", "ca-file-missing"),
    ({**BASE_ENV, "SSL_CERT_FILE": "/etc/map.yaml"}, {}, "SSL_CERT_FILE: /etc/map.yaml holds no PEM certificate", "ca-file-not-pem"),
    ({**BASE_ENV, "SSL_CERT_DIR": "/nope:/nope2"}, {}, "SSL_CERT_DIR: '/nope:/nope2' names no existing directory", "ca-dir-missing"),
    (
        {**BASE_ENV, "AZWI_IDENTITY_MAP": "/nope.yaml"},
        {},
        "AZWI_IDENTITY_MAP: cannot read /nope.yaml: No such file or directory",
        "map-missing",
    ),
]


@pytest.mark.parametrize(
    "proxies",
    [
        {"HTTPS_PROXY": "http://proxy.corp:3128"},
        {"https_proxy": "proxy.corp:3128", "NO_PROXY": "localhost"},
        {"HTTP_PROXY": "https://user:secret@proxy.corp"},
        {"ALL_PROXY": "socks5://proxy.corp:1080"},  # ignored on its own, as the Go proxy does
        # An empty lower-case variable unsets the scheme for httpx: the other is never read.
        {"https_proxy": "", "HTTPS_PROXY": "socks5://proxy.corp:1080"},
        {"HTTPS_PROXY": "", "HTTP_PROXY": ""},
    ],
    ids=["https", "bare-host-port", "http-with-credentials", "all-proxy-alone", "empty-lower-case-unsets", "empty"],
)
def test_proxy_environment_accepted(proxies: dict[str, str]) -> None:
    _load_proxy({**BASE_ENV, **proxies}, {})


@pytest.mark.parametrize(
    ("proxies", "via"),
    [
        ({"HTTPS_PROXY": "http://proxy.corp:3128"}, True),
        ({"http_proxy": "http://proxy.corp:3128"}, True),
        ({"ALL_PROXY": "http://proxy.corp:3128"}, False),  # ignored on its own, as the Go proxy does
        ({"https_proxy": "", "HTTPS_PROXY": "http://proxy.corp:3128"}, False),  # urllib: lower case unsets
        ({}, False),
    ],
    ids=["https", "http-lower", "all-alone", "empty-lower-case-unsets", "none"],
)
def test_exchanges_go_through_a_proxy_only_when_https_or_http_proxy_is_set(
        proxies: dict[str, str], via: bool) -> None:
    assert _load_proxy({**BASE_ENV, **proxies}).via_environment_proxy is via


def test_identity_binding_never_goes_through_an_environment_proxy() -> None:
    env = {**BASE_ENV, "HTTPS_PROXY": "http://proxy.corp:3128", "AZURE_KUBERNETES_TOKEN_PROXY": "https://10.0.0.1",
           "AZURE_KUBERNETES_CA_DATA": PEM}
    assert _load_proxy(env).via_environment_proxy is False


@pytest.mark.parametrize(
    ("env", "flags", "message"),
    [(e, f, m) for e, f, m, _ in PROXY_ERRORS],
    ids=[name for *_, name in PROXY_ERRORS],
)
def test_proxy_errors(env: dict[str, str], flags: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load_proxy(env, flags, files={"/etc/map.yaml": "identities: []\n"})
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_the_trust_store_is_not_checked_under_identity_binding() -> None:
    # Exchanges then go to the in-cluster token proxy, trusted through its own CA.
    binding = {"AZURE_KUBERNETES_TOKEN_PROXY": "https://10.0.0.1:8443", "AZURE_KUBERNETES_CA_DATA": PEM}
    cfg = _load_proxy({**BASE_ENV, **binding, "SSL_CERT_FILE": "/nope.pem"})
    assert cfg.identity_binding is not None and cfg.ssl_cert_file == "/nope.pem"


def test_a_der_certificate_file_is_refused() -> None:
    def read_der(path: str) -> str:
        return b"\x30\x82\x03\xff".decode("utf-8")  # what reading a DER file as text raises

    cfg = proxy_config.load({}, {**BASE_ENV, "SSL_CERT_FILE": "/etc/ca.der"})
    with pytest.raises(ConfigError, match=r"^SSL_CERT_FILE: /etc/ca.der holds no PEM certificate$"):
        proxy_files.with_files(cfg, read_der)


def test_trust_store_accepted(tmp_path: Path) -> None:
    bundle = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    env = {**BASE_ENV, "SSL_CERT_FILE": " /etc/ssl/bundle.pem ", "SSL_CERT_DIR": f"/nope:{tmp_path}"}
    cfg = _load_proxy(env, files={"/etc/ssl/bundle.pem": bundle})
    # One existing directory among missing ones is enough, as for Go and OpenSSL.
    assert (cfg.ssl_cert_file, cfg.ssl_cert_dir) == ("/etc/ssl/bundle.pem", f"/nope:{tmp_path}")


@pytest.mark.parametrize(
    "authority", ["http://localhost:8080/", "http://127.0.0.1:9000"], ids=["localhost", "loopback"]
)
def test_plain_http_authority_only_on_loopback(authority: str) -> None:
    assert _load_proxy({**BASE_ENV, "AZURE_AUTHORITY_HOST": authority}).authority_host == authority


def test_malformed_identity_map_is_a_config_error() -> None:
    files = {"/m.yaml": "identities:\n  - clientID: nope\n"}
    with pytest.raises(ConfigError, match=r"^AZWI_IDENTITY_MAP /m.yaml: identities\[0\]: clientID"):
        _load_proxy({**BASE_ENV, "AZWI_IDENTITY_MAP": "/m.yaml"}, files=files)


# ---- identity binding -------------------------------------------------------------------

BINDING_OK = [
    (
        {"AZURE_KUBERNETES_TOKEN_PROXY": "https://10.0.0.1:443"},
        IdentityBinding(token_proxy_url="https://10.0.0.1:443"),
        "url-only",
    ),
    (
        {
            "AZURE_KUBERNETES_TOKEN_PROXY": "https://proxy.kube-system.svc/base/",
            "AZURE_KUBERNETES_SNI_NAME": "token.aks.azure.com",
            "AZURE_KUBERNETES_CA_FILE": "/var/run/ca.crt",
        },
        IdentityBinding(
            token_proxy_url="https://proxy.kube-system.svc/base/",
            sni_name="token.aks.azure.com",
            ca_file="/var/run/ca.crt",
        ),
        "url-sni-ca-file",
    ),
    (
        {"AZURE_KUBERNETES_TOKEN_PROXY": "HTTPS://proxy:8443", "AZURE_KUBERNETES_CA_DATA": PEM},
        IdentityBinding(token_proxy_url="HTTPS://proxy:8443", ca_data=PEM.strip()),
        "url-ca-data",
    ),
]


@pytest.mark.parametrize(
    ("env", "binding"),
    [(e, b) for e, b, _ in BINDING_OK],
    ids=[name for *_, name in BINDING_OK],
)
def test_identity_binding(env: dict[str, str], binding: IdentityBinding) -> None:
    assert _load_proxy({**BASE_ENV, **env}).identity_binding == binding


BINDING_ERRORS = [
    ({"AZURE_KUBERNETES_TOKEN_PROXY": "http://proxy"}, "must be an https URL", "http-url"),
    ({"AZURE_KUBERNETES_TOKEN_PROXY": "proxy:443"}, "must be an https URL", "no-scheme"),
    ({"AZURE_KUBERNETES_TOKEN_PROXY": "https://"}, "has no host", "no-host"),
    ({"AZURE_KUBERNETES_TOKEN_PROXY": "https://user:pw@proxy"}, "must not contain user info", "userinfo"),
    ({"AZURE_KUBERNETES_TOKEN_PROXY": "https://user@proxy"}, "must not contain user info", "user-only"),
    ({"AZURE_KUBERNETES_TOKEN_PROXY": "https://proxy/?a=1"}, "must not contain a query or fragment", "query"),
    ({"AZURE_KUBERNETES_TOKEN_PROXY": "https://proxy/?"}, "must not contain a query or fragment", "empty-query"),
    ({"AZURE_KUBERNETES_TOKEN_PROXY": "https://proxy/#x"}, "must not contain a query or fragment", "fragment"),
    ({"AZURE_KUBERNETES_TOKEN_PROXY": "https://proxy:99999"}, "has a bad port", "bad-port"),
    (
        {"AZURE_KUBERNETES_TOKEN_PROXY": "https://proxy", "AZURE_KUBERNETES_CA_FILE": "/ca",
         "AZURE_KUBERNETES_CA_DATA": PEM},
        "mutually exclusive",
        "ca-file-and-data",
    ),
    ({"AZURE_KUBERNETES_SNI_NAME": "sni"}, "AZURE_KUBERNETES_TOKEN_PROXY is not", "sni-without-url"),
    ({"AZURE_KUBERNETES_CA_FILE": "/ca"}, "AZURE_KUBERNETES_TOKEN_PROXY is not", "ca-file-without-url"),
    ({"AZURE_KUBERNETES_CA_DATA": PEM}, "AZURE_KUBERNETES_TOKEN_PROXY is not", "ca-data-without-url"),
    (
        {"AZURE_KUBERNETES_TOKEN_PROXY": "https://proxy", "AZURE_KUBERNETES_CA_DATA": "not a pem"},
        "AZURE_KUBERNETES_CA_DATA: holds no PEM certificate",
        "ca-data-not-pem",
    ),
]


@pytest.mark.parametrize(
    ("env", "message"),
    [(e, m) for e, m, _ in BINDING_ERRORS],
    ids=[name for *_, name in BINDING_ERRORS],
)
def test_identity_binding_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load_proxy({**BASE_ENV, **env})
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_userinfo_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        _load_proxy({**BASE_ENV, "AZURE_KUBERNETES_TOKEN_PROXY": "https://user:s3cret@proxy"})
    assert "s3cret" not in str(info.value)


def test_binding_repr_masks_ca_data() -> None:
    binding = IdentityBinding(token_proxy_url="https://p", ca_data=PEM)
    assert PEM.splitlines()[1] not in repr(binding)
    assert "<inline>" in repr(binding)
    cfg = _load_proxy({**BASE_ENV, "AZURE_KUBERNETES_TOKEN_PROXY": "https://p", "AZURE_KUBERNETES_CA_DATA": PEM})
    assert PEM.splitlines()[1] not in repr(cfg)


@pytest.mark.parametrize(
    ("given", "level"),
    [("warn", "warning"), ("trace", "debug"), ("all", "debug"), ("INFO", "info"), (None, "info"), ("", "warning")],
    ids=["warn", "trace", "all", "upper-case", "default", "empty-is-mlog-warning"],
)
def test_upstream_log_level_names_are_accepted(given: str | None, level: str) -> None:
    from azwi_netproxy.settings import parse_log_level

    assert parse_log_level(given) == level
