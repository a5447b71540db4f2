"""azwi-netproxy: an IMDS token endpoint for Azure Workload Identity pods.

One subpackage per program; at the top only what every program shares:

    azwi_netproxy/
      cli.py          argv and the environment → each program's config → run; exit codes
      errors.py       the exception tree; every status is decided there
      logs.py         JSON lines on stderr that never block
      settings.py     the value checks every program shares (ports, uids, IPv4, log levels)
      identitymap.py  the identity map's format: the sidecar reads it, migrate writes it
      enrolment.py    node mode's record of a pod: the CNI plugin writes it, the node process reads it
      nodecontrol.py  node mode's run dir: the records and the node process's control socket
      proxy/          the sidecar (`azwi-netproxy`), and node mode's node process
                      (`azwi-netproxy-node`): the same request path serving many pods
      init/           the redirect (`azwi-netproxy-init`, and the CNI plugin's rules)
      cni/            the chained CNI plugin (`azwi-netproxy-cni`)
      migrate/        pod identity exports → workload identity (`azwi-netproxy-migrate`)
      demo/           the demo and its sandbox of namespaces (never imported by a program)

A program never imports another program's package.
"""

__version__ = "0.1.0"
