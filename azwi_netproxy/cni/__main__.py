"""`python -m azwi_netproxy.cni`: the plugin, as the node shim runs it."""

from azwi_netproxy.cli import cni_main

if __name__ == "__main__":
    raise SystemExit(cni_main())
