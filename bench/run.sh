#!/usr/bin/env bash
# The benchmark: installs wrk and the venv where missing, then prints the table and the targets.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$("$REPO/scripts/bootstrap.sh" wrk | tail -n 1)"
exec "$VENV/bin/python" "$REPO/bench/run.py" "$@"
