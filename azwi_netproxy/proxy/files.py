"""The files the sidecar's configuration names, read and checked once at start.

The identity map (AZWI_IDENTITY_MAP) is read and parsed here; SSL_CERT_FILE and SSL_CERT_DIR
are checked here (their contents are loaded by the exchange's TLS context later). The token
file is not: a late mount is answered 503 until it appears, and the kubelet rotates it, so
it is read at every exchange (entra.py).

Must not know: the environment (config.py has read it) or anything of requests.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from azwi_netproxy.errors import ConfigError
from azwi_netproxy.identitymap import parse_identity_map
from azwi_netproxy.proxy.config import ProxyConfig


def _utf8(path: str) -> str:
    # open(), not pathlib: pathlib would be imported before the listener is up only for this
    # (2 ms of every start; httpx imports it later anyway).
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def with_files(cfg: ProxyConfig, read_text: Callable[[str], str] = _utf8) -> ProxyConfig:
    """`cfg` with its identity map read, after checking the trust store it names.

    Raises:
        ConfigError: a map that cannot be read or is malformed; a trust store that
            would fail every exchange.
    """
    if cfg.identity_binding is None:  # identity binding trusts its own CA, not these
        check_trust_store(cfg.ssl_cert_file, cfg.ssl_cert_dir, read_text)
    if cfg.identity_map_path is None:
        return cfg
    text = _read_text(read_text, cfg.identity_map_path, "AZWI_IDENTITY_MAP")
    return dataclasses.replace(cfg, identity_map=parse_identity_map(text, source=cfg.identity_map_path))


def check_trust_store(
    ca_file: str | None, ca_dir: str | None, read_text: Callable[[str], str] = _utf8
) -> None:
    """SSL_CERT_FILE and SSL_CERT_DIR, which replace the system store for every exchange.

    Raises:
        ConfigError: a file that cannot be read or holds no PEM certificate, or a directory
            list none of whose directories exists. Either would fail every exchange (the Go
            proxy then has an empty root pool); a missing directory among others is allowed,
            as Go and OpenSSL skip it. A full parse is left to the exchange client, built
            right after start: it costs a large bundle about 40 ms.
    """
    if ca_file:
        text = _read_text(read_text, ca_file, "SSL_CERT_FILE", not_text="holds no PEM certificate")
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise ConfigError(f"SSL_CERT_FILE: {ca_file} holds no PEM certificate")
    if ca_dir and not any(os.path.isdir(directory) for directory in ca_dir.split(":") if directory):
        raise ConfigError(f"SSL_CERT_DIR: {ca_dir!r} names no existing directory")


def _read_text(
    read_text: Callable[[str], str], path: str, name: str, *, not_text: str = "is not UTF-8 text"
) -> str:
    """The text of the file variable `name` names, or a ConfigError that says why not."""
    try:
        return read_text(path)
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: {path} {not_text}") from None
