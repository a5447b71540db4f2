# syntax=docker/dockerfile:1
#
# Two images, drop-in replacements for upstream azure-workload-identity's, selected with
# the webhook's PROXY_INIT_IMAGE and PROXY_IMAGE:
#
#   docker build --target proxy-init -t REGISTRY/azwi-netproxy/proxy-init:VERSION .
#   docker build --target proxy      -t REGISTRY/azwi-netproxy/proxy:VERSION .
#
# tests/test_dockerfile.py lints this file and replays its RUN steps (apt-get excepted) in a
# temporary directory, so keep every path the images use under /opt/venv, /src, /wheels,
# /init or /proxy, and keep apt-get in RUN steps of its own.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: wheels of the package and its dependencies, installed into /opt/venv ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
# python-iptables ships only an sdist with a small C extension (libxtwrapper).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY azwi_netproxy/ azwi_netproxy/
# Build every wheel first, then install offline from them, so the venv holds exactly what
# was built here. Bytecode is compiled as unchecked-hash: it stays valid whatever mtimes
# COPY gives the sources, so the read-only images never need to write a .pyc. Level 2
# (-OO) too, for the proxy (see its PYTHONOPTIMIZE below).
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip wheel --wheel-dir /wheels /src \
    && /opt/venv/bin/pip install --no-index --find-links /wheels /wheels/azwi_netproxy-*.whl \
    && /opt/venv/bin/python -m compileall -q -f -o 0 -o 2 --invalidation-mode unchecked-hash /opt/venv/lib

# ---- runtime: what both images share ----
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/venv /opt/venv

# ---- proxy-init: installs the NAT rules, as root with NET_ADMIN (the webhook sets runAsUser 0) ----
FROM runtime AS proxy-init
# nft for the nftables backend; iptables and the libiptc/libxtables libraries that
# python-iptables loads for the legacy backend.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends nftables iptables libip4tc2 libxtables12 \
    && rm -rf /var/lib/apt/lists/*
COPY --chmod=0755 init/ /init/
ENTRYPOINT ["/init/azwi-netproxy-init"]

# ---- proxy: the sidecar, non-root, nothing to write ----
FROM runtime AS proxy
# Upstream's binary is /proxy and the webhook's postStart hook runs
# `/proxy --proxy-port=N --probe`: a symlink to the console script keeps both working
# (the script's shebang names /opt/venv/bin/python, so it runs from anywhere).
RUN ln -s /opt/venv/bin/azwi-netproxy /proxy
# -OO: without the docstrings of everything it imports (asyncio, ssl, httpx, email, ...)
# the sidecar needs about 1 MB less in every pod; nothing it runs reads a docstring or
# relies on an assert. The stdlib's level-2 bytecode ships with the python image.
ENV PYTHONOPTIMIZE=2
# Numeric, as runAsNonRoot needs to verify it; upstream's proxy image uses the same uid,
# and azwi-netproxy-init exempts it (PROXY_UID) from the redirect.
USER 1501:1501
ENTRYPOINT ["/proxy"]
