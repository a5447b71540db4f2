# syntax=docker/dockerfile:1
#
# Two images, drop-in replacements for upstream azure-workload-identity's, selected with
# the webhook's PROXY_INIT_IMAGE and PROXY_IMAGE (README.md, "Building the images"):
#
#   docker buildx build --target proxy-init -t REGISTRY/azwi-netproxy/proxy-init:VERSION .
#   docker buildx build --target proxy      -t REGISTRY/azwi-netproxy/proxy:VERSION .
#   podman build        --target proxy      -t REGISTRY/azwi-netproxy/proxy:VERSION .
#
# Any Debian 12 based image with python3.11 (`python` on PATH), python3-venv and
# ca-certificates works as PYTHON_IMAGE (tests/test_images.py builds on one that mmdebstrap
# makes from Debian's packages).
#
# Behind a TLS-intercepting proxy, give the build your CA bundle without baking it in: the
# steps that download mount the secret `ca-certificates` over the image's bundle, so
# `--secret id=ca-certificates,src=/etc/ssl/certs/ca-certificates.crt` (buildx and podman)
# or podman's `-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro`.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: every wheel once; nothing of this stage ships ----
FROM ${PYTHON_IMAGE} AS build
# PIP_CERT: the system bundle (the mounted one, behind an intercepting proxy), whatever CA
# store this base's pip would use on its own (Debian's pip uses the system's, upstream's
# its vendored certifi).
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PYTHONDONTWRITEBYTECODE=1
# python-iptables ships only an sdist with a small C extension (libxtwrapper).
# hadolint ignore=DL3008
RUN --mount=type=secret,id=ca-certificates,target=/etc/ssl/certs/ca-certificates.crt,required=false \
    apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# The builder's own venv: pip (Debian's base has none outside a venv) and `wheel`, without
# which pip 23 (Debian 12's) cannot build python-iptables' setup.py-only sdist
# ("invalid command 'bdist_wheel'").
# hadolint ignore=DL3013
RUN --mount=type=secret,id=ca-certificates,target=/etc/ssl/certs/ca-certificates.crt,required=false \
    python -m venv /opt/builder \
    && /opt/builder/bin/pip install --upgrade "setuptools>=77" wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY azwi_netproxy/ azwi_netproxy/
RUN --mount=type=secret,id=ca-certificates,target=/etc/ssl/certs/ca-certificates.crt,required=false \
    /opt/builder/bin/pip wheel --wheel-dir /wheels "/src[init]"

# ---- one venv per image, at the same path, without pip or setuptools ----
# The builder's pip installs offline from /wheels into a venv that has no pip of its own,
# compiling nothing itself (it would compile at level 0 for the proxy too).
# Bytecode is compiled as unchecked-hash (valid whatever mtimes COPY gives the sources, so
# a read-only image never needs to write a .pyc), at the one optimisation level the
# image's program runs with, and the wheels' shared objects lose their symbols.
FROM build AS venv-proxy
RUN python -m venv --without-pip /opt/venv \
    && /opt/builder/bin/pip --python /opt/venv/bin/python install --no-compile --no-index --find-links /wheels azwi-netproxy \
    && find /opt/venv -name '*.so' -exec strip --strip-unneeded {} + \
    && /opt/venv/bin/python -m compileall -q -f -o 2 --invalidation-mode unchecked-hash /opt/venv/lib

FROM build AS venv-init
RUN python -m venv --without-pip /opt/venv \
    && /opt/builder/bin/pip --python /opt/venv/bin/python install --no-compile --no-index --find-links /wheels "azwi-netproxy[init]" \
    && find /opt/venv -name '*.so' -exec strip --strip-unneeded {} + \
    && /opt/venv/bin/python -m compileall -q -f -o 0 --invalidation-mode unchecked-hash /opt/venv/lib

# ---- proxy-init: installs the NAT rules, as root with NET_ADMIN (the webhook sets runAsUser 0) ----
# The whole package, so the same image can also run the package's other node-side programs.
FROM ${PYTHON_IMAGE} AS proxy-init
# nft for the nftables backend; iptables and the libiptc/libxtables libraries that
# python-iptables loads for the legacy backend.
# hadolint ignore=DL3008
RUN --mount=type=secret,id=ca-certificates,target=/etc/ssl/certs/ca-certificates.crt,required=false \
    apt-get update \
    && apt-get install -y --no-install-recommends nftables iptables libip4tc2 libxtables12 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log
# PYTHONNOUSERSITE: nothing here runs from a user's site-packages, so none goes on
# sys.path (a HOME the pod mounts writable would otherwise add code to every run).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONNOUSERSITE=1 \
    PYTHONUNBUFFERED=1
COPY --from=venv-init /opt/venv /opt/venv
COPY --chmod=0755 init/ /init/
# The level-0 bytecode of the stdlib modules the init, the CNI agent and the CNI plugin
# import (about 3 MB). The official python images delete every .pyc: without it each of
# them compiles logging, json, subprocess, ctypes, ... from source at every run: the init
# container at every pod start, the CNI plugin (`python -I`, which writes what it compiles
# into the agent's container) at its first calls, about 0.3 s of CPU each time.
# tests/test_images.py builds on a base without .pyc files and fails on any module the
# init or the plugin compiles at run time.
RUN --mount=type=bind,source=scripts/compile_stdlib.py,target=/tmp/compile_stdlib.py \
    python /tmp/compile_stdlib.py 0 'azwi_netproxy.init.*' 'azwi_netproxy.cni.*' iptc argparse encodings.ascii
ENTRYPOINT ["/init/azwi-netproxy-init"]

# ---- proxy: the sidecar, non-root, nothing to write ----
FROM ${PYTHON_IMAGE} AS proxy
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONNOUSERSITE=1 \
    PYTHONUNBUFFERED=1
COPY --from=venv-proxy /opt/venv /opt/venv
# Upstream's binary is /proxy and the webhook's postStart hook runs
# `/proxy --proxy-port=N --probe`: a symlink to the console script keeps both working
# (the script's shebang names /opt/venv/bin/python, so it runs from anywhere).
RUN ln -s /opt/venv/bin/azwi-netproxy /proxy
# -OO: without the docstrings of everything it imports (asyncio, ssl, httpx, email, ...)
# the sidecar needs about 1 MB less in every pod; nothing it runs reads a docstring or
# relies on an assert.
ENV PYTHONOPTIMIZE=2
# The level-2 bytecode of the stdlib modules the sidecar imports (about 4 MB). No base has
# it: the official python images delete every .pyc, Debian's python3.11 has level 0 only;
# without it the read-only proxy would compile asyncio, ssl, email, ... from source at
# every start (about 1 s of CPU).
# Importing every module of the proxy, the libraries it loads lazily and what those load
# when they first connect (the idna codec, importlib.resources' readers) finds them;
# argparse (and its gettext) for node mode's azwi-netproxy-node, which this image also runs
# (its flags; the sidecar parses its own without argparse). tests/test_images.py runs the
# proxy and the node process with PYTHONVERBOSE and fails on any module they compile.
RUN --mount=type=bind,source=scripts/compile_stdlib.py,target=/tmp/compile_stdlib.py \
    python /tmp/compile_stdlib.py 2 azwi_netproxy.cli 'azwi_netproxy.proxy.*' httpx httpcore anyio \
        prometheus_client.exposition prometheus_client.process_collector yaml \
        encodings.idna importlib.readers importlib.resources.readers zipfile argparse
# Numeric, as runAsNonRoot needs to verify it; upstream's proxy image uses the same uid,
# and azwi-netproxy-init exempts it (PROXY_UID) from the redirect.
USER 1501:1501
ENTRYPOINT ["/proxy"]
