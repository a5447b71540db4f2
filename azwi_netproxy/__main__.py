from azwi_netproxy.cli import proxy_main

raise SystemExit(proxy_main())
