"""`azwi-netproxy-migrate`: from AKS pod identity exports to workload identity manifests.

    model.py   YAML text → documents → pod identity resources and workloads (pure)
    plan.py    documents of one or more clusters → the migration plan and FIC budget (pure),
               in named phases (its comment lists them)
    signs.py   one workload → the signs that it needs instance metadata beyond tokens (pure),
               which decide pass-through and whether node mode fits it
    render.py  plan → output files: manifests, identity maps, FIC commands/JSON (pure)
    report.py  plan → REPORT.md (pure)
    cli.py     argv, reading inputs, writing OUTDIR atomically; exit codes

Nothing here imports the proxy's server code; the only link to the proxy is
`azwi_netproxy.identitymap.parse_identity_map`, which checks every map we generate.
"""

from __future__ import annotations
