"""Node mode: find the service account token the kubelet projected for one pod, and read it.

The workload identity webhook adds a projected volume to the pod; the kubelet keeps its
files under the pod's directory:

    <pods dir>/<pod UID>/volumes/kubernetes.io~projected/<volume>/token/azure-identity-token   (webhook v1.6)
    <pods dir>/<pod UID>/volumes/kubernetes.io~projected/<volume>/azure-identity-token         (earlier)

The volume's name carries a hash in v1.6, so it is looked for, never computed. The search
runs at every exchange, as the sidecar re-reads its file at every exchange: the kubelet
rotates the token (a new `..data` directory swapped in) and a late mount appears later.

Rules:
1. Only the directory of the pod the reader was made for is ever read: the UID was checked
   (enrolment.check_pod_uid) before it became a path, and a file whose real path leaves
   that pod's projected volumes is not read.
2. A missing or unreadable token is the sidecar's error (UpstreamUnavailable: 503 with
   Retry-After), naming the file or the pattern looked for.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Final

from azwi_netproxy.errors import UpstreamUnavailable
from azwi_netproxy.proxy.entra import read_assertion_file

TOKEN_FILE_NAME: Final = "azure-identity-token"
PROJECTED: Final = Path("volumes") / "kubernetes.io~projected"
# Where each layout puts the file inside a projected volume, newest first.
_LAYOUTS: Final = (Path("token") / TOKEN_FILE_NAME, Path(TOKEN_FILE_NAME))


def projected_dir(pods_dir: str, pod_uid: str) -> Path:
    return Path(pods_dir) / pod_uid / PROJECTED


def pattern(pods_dir: str, pod_uid: str) -> str:
    """What is looked for, as a message can name it."""
    return f"{projected_dir(pods_dir, pod_uid)}/*/[token/]{TOKEN_FILE_NAME}"


def find_token_file(pods_dir: str, pod_uid: str) -> Path | None:
    """The pod's projected token file, or None if the kubelet has not projected one (yet).

    Volumes are tried in name order and, in each, the v1.6 layout first: a pod has one such
    volume, and if it had more, which one is used does not change from one exchange to the
    next.
    """
    base = projected_dir(pods_dir, pod_uid)
    try:
        volumes = sorted(entry.name for entry in os.scandir(base) if not entry.name.startswith("."))
    except OSError:
        return None
    real_base = os.path.realpath(base)
    for volume in volumes:
        for layout in _LAYOUTS:
            candidate = base / volume / layout
            if candidate.is_file() and os.path.realpath(candidate).startswith(real_base + os.sep):
                return candidate
    return None


def token_reader(pods_dir: str, pod_uid: str) -> Callable[[], str]:
    """A reader for the Exchanger: the pod's token, found and read anew at each call.

    Raises (when called):
        UpstreamUnavailable: no token file yet, or it cannot be read (503, Retry-After).
    """

    def read() -> str:
        path = find_token_file(pods_dir, pod_uid)
        if path is None:
            raise UpstreamUnavailable(
                f"Cannot find the pod's service account token: no {pattern(pods_dir, pod_uid)}",
                retry_after_s=1,
            )
        return read_assertion_file(str(path))()

    return read
