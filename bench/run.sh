#!/usr/bin/env bash
# The benchmark: installs wrk and the venv where missing, then prints the table and the targets.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$("$REPO/scripts/bootstrap.sh" wrk | tail -n 1)"
# The proxy runs with PYTHONOPTIMIZE=2 as in its image, where the python base image ships
# the standard library's level-2 bytecode; a Debian python has only level 0. Compile it
# here (as root) so that the proxy, run as uid 1501, does not compile it at every start.
"$VENV/bin/python" -OO -m compileall -q "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')" >/dev/null 2>&1 || true
# --node-mode: node mode's benchmark (bench/node_mode.py) instead of the sidecar's.
SCRIPT="$REPO/bench/run.py"
if [ "${1:-}" = "--node-mode" ]; then SCRIPT="$REPO/bench/node_mode.py"; shift; fi
exec "$VENV/bin/python" "$SCRIPT" "$@"
