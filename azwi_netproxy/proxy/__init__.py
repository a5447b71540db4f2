"""The sidecar, `azwi-netproxy`: IMDS token requests on 127.0.0.1 answered with Entra tokens.

Owns, from the wire inwards: `wire` (sans-IO HTTP/1.1), `server` (asyncio protocol),
`app` (judges a request and answers it: the one place errors become answers), `imds`
(the IMDS wire model), `router` (which identity, with the shared `azwi_netproxy.identitymap`),
`cache` (tokens), `entra` and `binding` (the exchange, and identity binding's TLS), `passthrough`,
`outbound` (connection policy for both), `metrics`, `probe`, `config` and `files` (start-up
values and the files they name), `run` (assembly).

Node mode (`azwi-netproxy-node`) is the same path serving many pods, not a second server:
`node` (assembly), `pods` (the pods served: add, drop, replay after a restart), `netns`
(a listening socket made inside a pod's network namespace), `control` (the CNI plugin's
requests), `podtoken` (a pod's projected token under the kubelet's pods dir). The sidecar
never imports them.

Must not know: the init's rules or netfilter, the CNI plugin, migrate, the demo's sandbox
(pyroute2 is never imported by the sidecar). Only `azwi_netproxy.cli` reads argv and the
environment.
"""
