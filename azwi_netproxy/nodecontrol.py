"""Where the CNI plugin and the node process meet: the run dir's records and control socket.

Layout under AZWI_CNI_RUN_DIR (the same variable for both programs, CONTRACT.md):

    node.sock             the node process's control socket (SOCK_SEQPACKET, root only)
    node-pods/<id>.json   one enrolment record per served pod sandbox, by CNI container ID

Rules:
1. The plugin owns the records: it writes one at ADD before it asks the node process to
   serve the pod, and removes it at DEL (also while the node process is down). The node
   process only reads them: after a restart they are the pods to serve again, and a pod
   whose record is gone is not served.
2. One control message per connection: a JSON object, with the pod's network namespace
   as an SCM_RIGHTS descriptor for "add"; one JSON answer, {"ok": true, ...} or
   {"ok": false, "kind": ..., "error": ...}. SOCK_SEQPACKET keeps each message whole.
3. Every write is a new file renamed into place: a reader never sees half a record.

Must not know: HTTP, tokens, netfilter. The checks of a record's fields are enrolment.py's.
"""

from __future__ import annotations

import array
import errno
import json
import logging
import os
import socket
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from azwi_netproxy.enrolment import Enrolment, check_container_id, from_json
from azwi_netproxy.errors import ConfigError

log = logging.getLogger(__name__)

CONTROL_SOCKET_NAME: Final = "node.sock"
RECORDS_DIR_NAME: Final = "node-pods"
# Enough for any message: an enrolment with the largest identity map allowed.
MAX_MESSAGE_BYTES: Final = 256 * 1024
# getsockopt(SOL_SOCKET, SO_NETNS_COOKIE): Linux 5.14 and later.
_SO_NETNS_COOKIE: Final = 71


class NodeUnavailable(Exception):
    """No node process answers on the control socket (not running, or restarting)."""


class NodeRefused(Exception):
    """The node process answered, and refused: `kind` is "invalid" (the pod's values) or
    "failed" (the node could not do it)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def control_socket_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONTROL_SOCKET_NAME


def records_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / RECORDS_DIR_NAME


def record_path(run_dir: str | Path, container_id: str) -> Path:
    return records_dir(run_dir) / f"{container_id}.json"


def netns_cookie(sock: socket.socket) -> int:
    """The cookie of the network namespace `sock` was made in.

    Raises:
        OSError: the kernel has no namespace cookies (before Linux 5.14).
    """
    return int(struct.unpack("Q", sock.getsockopt(socket.SOL_SOCKET, _SO_NETNS_COOKIE, 8))[0])


def current_netns_cookie() -> int:
    """The cookie of the calling thread's network namespace.

    Raises:
        OSError: as netns_cookie.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        return netns_cookie(probe)


# ---- records -------------------------------------------------------------------------------


def write_record(run_dir: str | Path, enrolment: Enrolment) -> Path:
    directory = records_dir(run_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = record_path(run_dir, enrolment.container_id)
    staged = directory / f".{enrolment.container_id}.tmp"
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(enrolment.to_json())
            out.flush()
            os.fsync(out.fileno())
        os.replace(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return path


def has_record(run_dir: str | Path, container_id: str) -> bool:
    return record_path(run_dir, container_id).exists()


def remove_record(run_dir: str | Path, container_id: str) -> bool:
    """Remove the pod's record; False if there was none (or the ID cannot name one)."""
    try:
        check_container_id(container_id)
    except ConfigError:
        return False
    try:
        record_path(run_dir, container_id).unlink()
    except FileNotFoundError:
        return False
    return True


def read_records(run_dir: str | Path) -> dict[str, Enrolment]:
    """Every readable record, by container ID; a damaged one is reported and skipped."""
    found: dict[str, Enrolment] = {}
    try:
        names = sorted(os.listdir(records_dir(run_dir)))
    except FileNotFoundError:
        return found
    for name in names:
        if name.startswith(".") or not name.endswith(".json"):
            continue
        path = records_dir(run_dir) / name
        try:
            record = from_json(path.read_bytes())
        except FileNotFoundError:
            continue  # removed by a DEL meanwhile
        except (OSError, ConfigError) as exc:
            log.warning("cannot read an enrolment record", extra={"file": str(path), "error": str(exc)})
            continue
        if record_path(run_dir, record.container_id) != path:
            log.warning("an enrolment record names another sandbox", extra={"file": str(path)})
            continue
        found[record.container_id] = record
    return found


# ---- the control socket's messages -------------------------------------------------------


def encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def decode(data: bytes) -> dict[str, Any]:
    """A message's JSON object.

    Raises:
        ValueError: not a JSON object.
    """
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    return message


def call(run_dir: str | Path, message: Mapping[str, Any], *, fd: int | None = None,
         timeout_s: float = 10.0) -> dict[str, Any]:
    """Send one message (with `fd` attached) to the node process and return its answer.

    Raises:
        NodeUnavailable: nothing listens on the control socket, or it did not answer.
        NodeRefused: it answered with a refusal.
    """
    path = control_socket_path(run_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as conn:
        conn.settimeout(timeout_s)
        try:
            conn.connect(str(path))
            fds = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            conn.sendmsg([encode(message)], fds)
            data = conn.recv(MAX_MESSAGE_BYTES)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NodeUnavailable(f"no node process listens on {path}") from exc
        except TimeoutError as exc:
            raise NodeUnavailable(f"the node process did not answer within {timeout_s:g} s") from exc
        except OSError as exc:
            if exc.errno in (errno.ECONNRESET, errno.EPIPE):
                raise NodeUnavailable(f"the node process closed {path} without answering") from exc
            raise
    if not data:
        raise NodeUnavailable(f"the node process closed {path} without answering")
    try:
        answer = decode(data)
    except ValueError as exc:
        raise NodeRefused("failed", "the node process answered something that is not JSON") from exc
    if answer.get("ok") is not True:
        raise NodeRefused(str(answer.get("kind", "failed")), str(answer.get("error", "refused")))
    return answer
