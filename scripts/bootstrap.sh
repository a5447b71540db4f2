#!/usr/bin/env bash
# Install what the tests, the demo and the benchmark need on a fresh Debian machine (as root):
# Debian packages, then a virtual environment built from Debian's /usr/bin/python3 in a path
# every uid can read (the proxy runs as uid 1501 and clients as uid 1000 in the tests), with
# this package (not editable: the checkout may be unreadable for those uids) and its extras.
# AZWI_WITH_TESTS=1 (scripts/test.sh) adds what only the test suite needs; AZWI_EXTRAS names
# the package's extras (default: test, which holds all of them; scripts/demo.sh: demo).
set -euo pipefail
umask 022

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AZWI_VENV:-/opt/azwi-netproxy/test-venv}"
APT_PACKAGES=(
    iptables nftables iproute2 util-linux procps curl openssl ca-certificates
    python3 python3-venv python3-dev gcc libc6-dev
)
# Only the test suite's (AZWI_WITH_TESTS=1).
TEST_APT_PACKAGES=(
    # Node.js: the hostile tests judge targets with its WHATWG URL parser as well as urllib.
    nodejs
    # The CNI tests run a private containerd whose CRI plugin calls the chain.
    containerd runc containernetworking-plugins
    # The CNI shim's JSON scanner is tested with each awk a node may have.
    gawk busybox
    # The image tests build both images with podman (runc and conmon come with it) on a base
    # that mmdebstrap makes from Debian's packages, and run them as a pod.
    podman mmdebstrap
    # The test VM (tests/test_vagrant.py): Vagrant with libvirt in a user's session, and QEMU;
    # the box's file system (mkfs.ext4 -d) and the list of the checkout's files (git).
    vagrant vagrant-libvirt libvirt-daemon libvirt-clients qemu-system-x86 qemu-utils e2fsprogs git
)

if [[ $(id -u) -ne 0 ]]; then
    echo "bootstrap: run as root (it installs Debian packages and creates network namespaces)" >&2
    exit 2
fi

if [[ "${AZWI_WITH_TESTS:-0}" == 1 ]]; then
    APT_PACKAGES+=("${TEST_APT_PACKAGES[@]}")
fi
missing=()
for package in "${APT_PACKAGES[@]}" "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    echo "bootstrap: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.base_prefix != "/usr")'; then
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    /usr/bin/python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip setuptools wheel
fi
# setuptools builds in the checkout's build/ and never empties it: a module moved or deleted
# since the last install would come back into the venv from there.
rm -rf "$REPO/build"
"$VENV/bin/pip" install -q --upgrade "$REPO[${AZWI_EXTRAS:-test}]"
# Reinstall our package itself every time so the venv holds exactly this checkout.
"$VENV/bin/pip" install -q --no-deps --force-reinstall "$REPO"
# The proxy image runs with PYTHONOPTIMIZE=2; without level-2 bytecode next to the sources
# a proxy run that way as another uid would compile everything at every start. Some
# packages ship deliberately broken .py files (test data): compileall's status is ignored.
"$VENV/bin/python" -OO -m compileall -q "$VENV/lib" >/dev/null 2>&1 || true

# For the tests (AZWI_WITH_TESTS=1, set by scripts/test.sh), a JavaScript app as well:
# @azure/identity (msal-node under it), pinned, in the venv's folder for the pod tests. It
# needs Node.js 20 or later; where neither this machine nor its Debian release has that
# (Debian 12's nodejs is 18), those tests skip and say why.
node_major() { node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }
install_node_sdk() {
    local sdk="$VENV/node-sdk" package="@azure/identity@4.13.1" candidate installed
    if ! command -v npm >/dev/null || (($(node_major) < 20)); then
        candidate="$(apt-cache policy nodejs 2>/dev/null | awk '/Candidate:/ {print $2}' | sed -E 's/^[0-9]+://; s/[^0-9].*//' || true)"
        if [[ "$candidate" =~ ^[0-9]+$ ]] && ((candidate >= 20)); then
            echo "bootstrap: installing nodejs npm" >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null ||
                echo "bootstrap: could not install nodejs npm: the JavaScript SDK's tests will skip" >&2
        fi
    fi
    if ! command -v npm >/dev/null || (($(node_major) < 20)); then
        return 0
    fi
    installed="$(node -p "require('$sdk/node_modules/@azure/identity/package.json').version" 2>/dev/null || true)"
    if [[ "$installed" != "${package##*@}" ]]; then
        rm -rf "$sdk"
        npm install --prefix "$sdk" --no-audit --no-fund --loglevel=error "$package" >/dev/null
    fi
}
if [[ "${AZWI_WITH_TESTS:-0}" == 1 ]]; then
    install_node_sdk
fi
chmod -R a+rX "$VENV"
echo "$VENV"
