"""`python -m azwi_netproxy.init`: the init container's entry point."""

from azwi_netproxy.cli import init_main

if __name__ == "__main__":
    raise SystemExit(init_main())
