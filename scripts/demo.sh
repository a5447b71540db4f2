#!/usr/bin/env bash
# The whole flow in a throwaway sandbox of network namespaces: no Azure, no cluster needed.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Only what the demo needs: no test packages, the package's demo extra.
VENV="$(AZWI_EXTRAS=demo "$REPO/scripts/bootstrap.sh" | tail -n 1)"
exec "$VENV/bin/azwi-netproxy-demo" "$@"
