"""The daemon's control socket: ``hsmfs stats`` and ``hsmfs state`` ask a running daemon.

One JSON request per connection, one JSON reply, on a unix socket in the cache's state
directory (root-only, like the rest of ``.hsmfs/``).  The server runs on the trio loop and only
reads in-memory counters, so it never blocks a door.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import trio

from .keys import STATE_DIR

log = logging.getLogger(__name__)
SOCKET_NAME = "control.sock"
MAX_REQUEST = 1 << 16

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def socket_path(cache_dir: str) -> str:
    return os.path.join(cache_dir, STATE_DIR, SOCKET_NAME)


async def serve(cache_dir: str, handler: Handler, *,
                task_status: trio.TaskStatus[None] | None = None) -> None:
    # trio is imported here, not at the top: every CLI command imports this module for
    # query(), and trio alone is most of a command's start-up (~0.15 s of ~0.25 s, -X
    # importtime), which `hsmfs archive` of one file pays on top of its upload.
    import trio

    if task_status is None:
        task_status = trio.TASK_STATUS_IGNORED
    path = socket_path(cache_dir)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    ours = os.stat(path).st_ino
    sock.listen(16)
    task_status.started()
    try:
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await sock.accept()
                nursery.start_soon(_answer, conn, handler)
    finally:
        sock.close()
        # Only our own socket: a worker that outlived its holder stops after a new daemon
        # bound this path, and removing that one would leave the new daemon unreachable.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == ours:
                os.unlink(path)


async def _answer(conn: trio.socket.SocketType, handler: Handler) -> None:
    import trio  # see serve()

    with conn:
        try:
            with trio.fail_after(5):
                buf = b""
                while not buf.endswith(b"\n") and len(buf) < MAX_REQUEST:
                    chunk = await conn.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                request = json.loads(buf or b"{}")
            try:
                reply = await handler(request)  # may take long (restore): no deadline
            except Exception as exc:  # a bad request must not take the daemon down
                log.exception("control request %r failed", request)
                reply = {"error": str(exc)}
            with trio.fail_after(5):
                out = memoryview(json.dumps(reply).encode() + b"\n")
                while out:
                    out = out[await conn.send(out):]
        except (trio.TooSlowError, OSError, ValueError) as exc:
            log.info("control connection dropped: %s", exc)
        except Exception:  # the control socket must never take the doors down with it
            log.exception("control connection failed")


def query(cache_dir: str, request: dict[str, Any], timeout: float | None = 10.0
          ) -> dict[str, Any]:
    """Client side (blocking): send one request to the daemon serving ``cache_dir``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(socket_path(cache_dir))
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    return json.loads(buf)
