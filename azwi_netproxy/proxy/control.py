"""The node process's control socket: the CNI plugin's requests, answered on the event loop.

A Unix SOCK_SEQPACKET socket at `<run dir>/node.sock` (nodecontrol.py has the layout and
the message format). Rules:
1. Only root (or this process's own uid) may ask: the socket file is 0600, and the peer's
   credentials (SO_PEERCRED) are checked on every connection, so a looser mode on the file
   or the run dir cannot open it to a pod.
2. One request per connection, read whole in one recvmsg (the plugin sends it in one
   sendmsg); a descriptor passed with it is owned here and always closed, whatever the
   handler does with it (it dups what it keeps).
3. The handler's answer (a dict) is sent back; a handler that raises gets a generic
   refusal logged here, never a crash of the node process.

Must not know: pods, HTTP, netfilter: `handle` decides what a request means.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from azwi_netproxy.nodecontrol import MAX_MESSAGE_BYTES, decode, encode

log = logging.getLogger(__name__)

Handle = Callable[[dict[str, Any], int | None], Awaitable[dict[str, Any]]]
# One descriptor at most per message: room for a few, so that extra ones are seen (and closed).
_MAX_FDS: Final = 4


class ControlServer:
    def __init__(self, path: Path, handle: Handle) -> None:
        self._path = path
        self._handle = handle
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._allowed_uids = {0, os.geteuid()}

    async def start(self) -> None:
        """Listen on the socket path (a stale socket of an earlier process is replaced).

        Raises:
            OSError: the path cannot be bound.
        """
        self._path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()
        kind = socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        sock = socket.socket(socket.AF_UNIX, kind)
        try:
            # Bound under a umask that leaves it 0600 from the first moment.
            old_umask = os.umask(0o177)
            try:
                sock.bind(str(self._path))
            finally:
                os.umask(old_umask)
            sock.listen(64)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)

    async def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _accept(self) -> None:
        assert self._sock is not None
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("control socket: accept failed", extra={"error": str(exc)})
            return
        conn.setblocking(False)
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid not in self._allowed_uids:
            log.warning("control socket: refused a peer that is not root", extra={"uid": uid})
            conn.close()
            return
        asyncio.get_running_loop().add_reader(conn.fileno(), self._read, conn)

    def _read(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            data, ancdata, flags, _ = conn.recvmsg(MAX_MESSAGE_BYTES, socket.CMSG_SPACE(_MAX_FDS * 4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            loop.remove_reader(conn.fileno())
            conn.close()
            return
        loop.remove_reader(conn.fileno())
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                passed = array.array("i")
                passed.frombytes(payload[: len(payload) - len(payload) % passed.itemsize])
                fds.extend(passed)
        truncated = bool(flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC))
        task = loop.create_task(self._answer(conn, data, fds, truncated=truncated))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, conn: socket.socket, data: bytes, fds: list[int], *, truncated: bool) -> None:
        try:
            if truncated or len(fds) > 1 or not data:
                answer: dict[str, Any] = {"ok": False, "kind": "invalid", "error": "malformed request"}
            else:
                try:
                    message = decode(data)
                except ValueError:
                    answer = {"ok": False, "kind": "invalid", "error": "the request is not a JSON object"}
                else:
                    answer = await self._answer_message(message, fds[0] if fds else None)
            with contextlib.suppress(OSError):
                conn.send(encode(answer))
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()

    async def _answer_message(self, message: dict[str, Any], fd: int | None) -> dict[str, Any]:
        try:
            return await self._handle(message, fd)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("control socket: request failed", extra={"op": str(message.get("op"))})
            return {"ok": False, "kind": "failed", "error": "internal error in the node process"}
