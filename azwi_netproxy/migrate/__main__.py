"""`python -m azwi_netproxy.migrate` → the `azwi-netproxy-migrate` console script."""

from azwi_netproxy.migrate.cli import main

raise SystemExit(main())
