#!/usr/bin/env bash
# The full test suite, root-only namespace tests included. Extra arguments go to pytest.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The Debian packages only the tests need (containerd, podman, Node.js, ...) and, for the
# pod tests' JavaScript app, @azure/identity: the bootstrap adds them for the tests.
VENV="$(AZWI_WITH_TESTS=1 "$REPO/scripts/bootstrap.sh" | tail -n 1)"
cd "$REPO"
# The pytest script (not `python -m pytest`) keeps the checkout off sys.path: the tests use
# the installed package, which the proxy under uid 1501 can read.
exec "$VENV/bin/pytest" -p no:cacheprovider "$@"
