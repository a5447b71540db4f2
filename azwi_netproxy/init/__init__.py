"""The redirect, `azwi-netproxy-init`: NAT rules in a pod's network namespace that send its
TCP to the metadata address to the sidecar, except the sidecar's own uid; all else to that
address is rejected (fail closed).

Owns: `config` (InitConfig from upstream's variables and flags), `rules` (the desired state
as data), `backend` (what a backend is), `nft` and `iptables` (render and apply per
backend), `run` (pick a backend, apply / check / clean up, log). One rule model with two
front ends: the init container (cli.py) and the CNI plugin (azwi_netproxy.cni).

Must not know: the sidecar (azwi_netproxy.proxy), HTTP, tokens, the demo.
"""
