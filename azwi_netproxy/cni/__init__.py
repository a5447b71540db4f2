"""The redirect as a chained CNI plugin, `azwi-netproxy-cni`, and the node agent that serves it.

The runtime calls CNI plugins while it creates a pod's sandbox, as root on the node and
before any container of the pod runs, so the rules are in place for the pod's own init
containers too and no container needs NET_ADMIN. On the node nothing of ours is installed
but a small shell shim: the agent (a DaemonSet, `azwi-netproxy-cni-agent`) writes it into
the CNI bin dir and chains `"type": "azwi-netproxy"` into the node's conflist; the shim
enters the agent's mount namespace and runs this package's plugin there, with the pod's
network namespace passed as an open descriptor.

Owns: `spec` (the CNI protocol as data: parsing, versions, results, error codes), `plugin`
(joining the pod's namespace, acting with the init's rules), `chain` (editing a conflist,
pure), `shim` (the node-side script, rendered), `agent` (installing, watching, uninstalling).

Must not know: the sidecar (azwi_netproxy.proxy), HTTP, tokens, the demo. The rules and
backends are the init's (azwi_netproxy.init): one rule model, two front ends.
"""
