"""The worker's end of the link to the holder H (:mod:`hsmfs.holder`), in trio.

Lives apart from the holder so that H's process never imports trio (or anything the worker
needs): H must stay small and plain so that it does not crash, and a module it imports is a
module that can fail for it.  The wire format and its constants are H's (:mod:`hsmfs.holder`
documents them); this module only speaks it.

What it owns: receiving events (and notices: notification events such as FAN_MODIFY, which
want no reply) with their fds, replying exactly once per event, the ``ready``,
``stopping`` and ``pong`` messages, and the last-resort denial of this worker's own outstanding
events when H is gone.  What it must not do: read the group or answer an event through it while
H lives (H is the only responder: KERNEL_FACTS §8).
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Mapping
from typing import NamedTuple

import trio

from .fanotify import Event, deny_errno, write_response
from .holder import (
    CTRL_MSG,
    ENV_FAN_FD,
    ENV_GENERATION,
    ENV_HOLDER_FD,
    EVENT_MSG,
    FLAG_HAS_RANGE,
    MSG_EVENT,
    MSG_NOTICE,
    MSG_PING,
    MSG_PONG,
    MSG_READY,
    MSG_REPLY,
    MSG_STOPPING,
    NOTICE_ID,
)

log = logging.getLogger(__name__)

#: Ancillary space for receiving fds.  Room for a few so a protocol error (more than one fd) is
#: seen and every extra fd closed instead of the kernel truncating the control message.
_ANC_SPACE = socket.CMSG_SPACE(4 * array.array("i").itemsize)


def worker_generation(environ: Mapping[str, str] = os.environ) -> int:
    """Which worker of its holder this process is: 1 for the first, 2, 3, ... for restarts
    (``HSMFS_WORKER_GENERATION``; 1 when absent).  A restart may trust the tree its predecessor
    built instead of building it again."""
    try:
        return max(int(environ.get(ENV_GENERATION, "1")), 1)
    except ValueError:
        return 1


class Ping(NamedTuple):
    """H asks whether the worker's loop is alive; answer with :meth:`HolderLink.pong`."""

    seq: int


class HolderGone(Exception):
    """The holder closed the link: it died or stopped.  The worker must exit.

    Before this is raised, every event this worker received and has not answered was denied
    with EIO directly through the group fd: with H gone nobody else can answer them, and once
    the worker exits the group closes and the kernel would *allow* them (zeros).
    """


class HolderLink:
    """The worker's end of the link to H (trio).

    One task calls :meth:`receive` in a loop; any number of tasks may call :meth:`reply` (or
    :meth:`try_reply`), in any order.  The worker owns each received event fd and must close
    it (before or after replying: H answers with its own copy).  Nothing here blocks the trio
    loop: the socket is non-blocking and waits go through
    ``trio.lowlevel.wait_readable``/``wait_writable``.
    """

    #: A reply that cannot be sent for this long means H is wedged; treated as H gone.
    SEND_TIMEOUT = 10.0

    def __init__(self, holder_fd: int, fan_fd: int) -> None:
        """Take ownership of ``holder_fd`` (the socket); ``fan_fd`` is the group, for marks."""
        self._sock = socket.socket(fileno=holder_fd)
        self._sock.setblocking(False)
        self._sock.set_inheritable(False)
        self.fan_fd = fan_fd
        self._send_lock = trio.Lock()
        self._outstanding: dict[int, int] = {}  # id -> seq of events received, not replied
        self._gone = False
        self._ready_sent = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> HolderLink:
        """Build the link from ``HSMFS_FAN_FD`` and ``HSMFS_HOLDER_FD``, set by the holder."""
        try:
            fan_fd = int(environ[ENV_FAN_FD])
            holder_fd = int(environ[ENV_HOLDER_FD])
        except (KeyError, ValueError) as e:
            raise RuntimeError(
                f"not started by an hsmfs holder ({ENV_FAN_FD}/{ENV_HOLDER_FD} missing)"
            ) from e
        # They were inherited without CLOEXEC; the worker's own children must not get them.
        os.set_inheritable(fan_fd, False)
        return cls(holder_fd, fan_fd)

    @property
    def outstanding(self) -> frozenset[int]:
        """Ids received and not yet replied to."""
        return frozenset(self._outstanding)

    @property
    def ready_sent(self) -> bool:
        """Whether :meth:`ready` went out.  A worker that fails before it did exits with
        :data:`hsmfs.holder.EXIT_START_FAILED`: for the first worker, H takes that as a
        start-up failure (fatal); after it, as a crash (restart, degraded mode)."""
        return self._ready_sent

    async def receive(self) -> tuple[int, Event, int]:
        """Wait for the next event: ``(id, event, event_fd)``; ``event.fd == event_fd``.

        ``event_fd`` is this process's copy (O_CLOEXEC), owned by the caller.  A notice (a
        notification event such as FAN_MODIFY, sent only if the worker's marks ask for one)
        comes with ``id == NOTICE_ID`` (-1): it must not be replied to, only its fd closed.
        Raises :class:`HolderGone` when H closed the link.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            try:
                item = self._receive_one()
            except BlockingIOError:
                # Cancellation here loses nothing: the message stays queued in the socket.
                await trio.lowlevel.wait_readable(self._sock)
                waited = True
                continue
            if item is None:
                continue
            if isinstance(item, int):  # an event without its fd: cannot be served
                await self.reply(item, deny_errno(errno.EIO))
                waited = True
                continue
            if isinstance(item, Ping):  # answered from this loop: it is alive
                await self.pong(item.seq)
                waited = True
                continue
            if not waited:
                # Every trio call is a schedule point; after a wait we already were one.  Never
                # a cancel point once the fd is ours (it would be lost).  Skipping the extra
                # pass through the scheduler saves one loop turn per event.
                await trio.lowlevel.cancel_shielded_checkpoint()
            return item

    def _receive_one(self) -> tuple[int, Event, int] | Ping | int | None:
        """One message off the socket (see :meth:`_decode`); None when it was dropped or the
        link died.  Raises BlockingIOError when nothing is queued, HolderGone once gone."""
        if self._gone:
            raise HolderGone("holder link closed")
        try:
            data, anc, flags, _addr = self._sock.recvmsg(
                EVENT_MSG.size, _ANC_SPACE, socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            raise
        except OSError as e:
            self._holder_gone(f"socket error {_ename(e.errno)}")
            return None
        fds = _fds_from_ancillary(anc)
        if not data:
            _close_all(fds)
            self._holder_gone("socket closed")
            return None
        return self._decode(data, flags, fds)

    def _decode(
        self, data: bytes, flags: int, fds: list[int]
    ) -> tuple[int, Event, int] | Ping | int | None:
        """Validate one message: the received item, a ping, a bare id (fd missing), or None
        (dropped)."""
        if len(data) != EVENT_MSG.size or flags & socket.MSG_TRUNC:
            log.error("holder sent a malformed %d-byte message; ignored", len(data))
            _close_all(fds)
            return None
        kind, ident, seq, mflags, mask, pid, _reserved, offset, count = EVENT_MSG.unpack(data)
        if kind == MSG_PING:
            _close_all(fds)
            return Ping(seq)
        if kind == MSG_NOTICE:
            if len(fds) != 1 or flags & socket.MSG_CTRUNC:
                log.error("notice %#x arrived with %d fds; dropped", mask, len(fds))
                _close_all(fds)
                return None
            return NOTICE_ID, Event(mask=mask, fd=fds[0], pid=pid), fds[0]
        if kind != MSG_EVENT:
            log.error("holder sent unknown message kind %d; ignored", kind)
            _close_all(fds)
            return None
        self._outstanding[ident] = seq
        if len(fds) != 1 or flags & socket.MSG_CTRUNC:
            # MSG_CTRUNC: this process hit its fd limit and the kernel dropped the fd.
            log.error(
                "event id %d arrived with %d fds (flags %#x); denying it", ident, len(fds), flags
            )
            _close_all(fds)
            return ident
        fd = fds[0]
        has_range = bool(mflags & FLAG_HAS_RANGE)
        event = Event(
            mask=mask,
            fd=fd,
            pid=pid,
            offset=offset if has_range else None,
            count=count if has_range else None,
        )
        return ident, event, fd

    async def reply(self, ident: int, response: int) -> None:
        """Send the response for event ``ident`` to H (H writes it to the kernel).

        Shielded from cancellation (bounded by :attr:`SEND_TIMEOUT`), so it may be called from a
        ``finally`` of a cancelled task: an event must be answered exactly once.
        """
        message = self._reply_message(ident, response)
        if message is None:
            await trio.lowlevel.checkpoint()
            return
        await self._send(message)

    def try_reply(self, ident: int, response: int) -> bool:
        """:meth:`reply` without waiting, for code that must not await: True once sent (or
        dropped as not ours, logged); False, with nothing sent, when the socket is full or a
        task is waiting on it (then ``await reply()``)."""
        if self._gone:
            raise HolderGone("holder link closed")
        if self._send_lock.locked():
            return False
        seq = self._outstanding.get(ident)
        if seq is None:
            self._reply_message(ident, response)  # logs it
            return True
        if not self._send_now(CTRL_MSG.pack(MSG_REPLY, ident, seq, response)):
            return False
        del self._outstanding[ident]
        return True

    def _send_now(self, message: bytes) -> bool:
        """Send without waiting: False if the socket is full.  Raises HolderGone."""
        try:
            self._sock.send(message, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return False
        except OSError as e:
            self._holder_gone(f"send failed: {_ename(e.errno)}")
            raise HolderGone("holder link closed") from e
        return True

    def _reply_message(self, ident: int, response: int) -> bytes | None:
        """The reply to send for ``ident``, or None (logged) if this worker does not hold it."""
        if self._gone:
            raise HolderGone("holder link closed")
        seq = self._outstanding.pop(ident, None)
        if seq is None:
            # Sending it could only be dropped by H (wrong seq) at best; say so loudly instead.
            log.error(
                "reply %#x for id %d, which this worker does not hold; not sent", response, ident
            )
            return None
        return CTRL_MSG.pack(MSG_REPLY, ident, seq, response)

    async def pong(self, seq: int) -> None:
        """Answer H's ping ``seq``: this worker's loop is alive (H's watchdog)."""
        await self._send(CTRL_MSG.pack(MSG_PONG, 0, seq, 0))

    async def ready(self) -> None:
        """Tell H that this worker's marks are in place (H then signals its readiness fd)."""
        await self._send(CTRL_MSG.pack(MSG_READY, 0, 0, 0))
        self._ready_sent = True

    async def stopping(self) -> None:
        """Tell H this worker is exiting on purpose: H will not restart it.

        Once the worker has exited, H answers every event still pending with EIO and exits (0 if
        the worker's status is 0).
        """
        await self._send(CTRL_MSG.pack(MSG_STOPPING, 0, 0, 0))

    async def _send(self, message: bytes) -> None:
        if self._gone:
            raise HolderGone("holder link closed")
        # Fast path: a 12-byte message almost always fits in the socket at once.  No lock or
        # cancel scope needed; one schedule point, never a cancel point.
        if not self._send_lock.locked() and self._send_now(message):
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        # Slow path: the socket is full (H busy) or another task is already waiting on it.
        # Shielded, so a reply from a cancelled task's ``finally`` still goes out, but bounded.
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.SEND_TIMEOUT
            async with self._send_lock:
                while True:
                    if self._gone:
                        raise HolderGone("holder link closed")
                    try:
                        self._sock.send(message, socket.MSG_NOSIGNAL)
                        return
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(self._sock)
                    except OSError as e:
                        self._holder_gone(f"send failed: {_ename(e.errno)}")
        # Only reached when the deadline cancelled the shielded scope.
        self._holder_gone(f"holder accepted nothing for {self.SEND_TIMEOUT} s")
        raise HolderGone("holder link wedged")

    def _holder_gone(self, reason: str) -> None:
        if self._gone:
            return
        self._gone = True
        log.error(
            "holder gone (%s); denying %d outstanding events with EIO",
            reason,
            len(self._outstanding),
        )
        # Safe to answer by number here: H is the only other responder and it is gone, and an
        # id stays reserved (H's fd was open) until H wrote its response (see Holder).
        for ident in sorted(self._outstanding):
            with contextlib.suppress(OSError):  # ENOENT: H answered it before it went
                write_response(self.fan_fd, ident, deny_errno(errno.EIO))
        self._outstanding.clear()

    def close(self) -> None:
        """Close the socket (H sees EOF).  The group fd is left to the caller."""
        self._sock.close()


def _fds_from_ancillary(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _ename(err: int | None) -> str:
    return errno.errorcode.get(err or 0, str(err))
