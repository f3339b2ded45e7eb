"""A tiny hsmfs worker for the holder tests (tests/t4_holder.py); not product code.

Started by ``python3 -m hsmfs.holder -- python3 fill_worker.py ...``.  Through the group fd the
holder passed it, it puts an inode mark (FAN_PRE_ACCESS) on each stub named on the command line
and a mount ignore mark on its own private ``open_tree`` clone of the cache directory, then
tells the holder it is ready.  Each event's range is filled with the stub's known pattern
(:func:`pattern`) through the private clone, and answered ALLOW (or what ``--response`` says).

Test hooks: ``--stall-flag PATH`` makes it hold every event while PATH exists (``--stall-receive
PATH``: not even read the socket, so the holder's side fills up); ``--stop-after N``
makes it announce "stopping" and exit 0 after N events; ``--crash-if PATH`` exits at start
(status ``--crash-status``, default 3) while PATH exists; ``--hang-if PATH`` waits at start,
alive but not ready, while PATH exists; ``--ignore-sigterm``; ``--no-fill`` answers at once;
``--stale-reply`` sends a reply with a wrong sequence number before each real one; ``--quiet``
writes no per-event status lines (latency runs); ``--notices`` also marks FAN_MODIFY on each stub
and writes ``notice MASK REL`` for each notice H forwards (no reply: nothing to answer).  It
appends one line per step to ``--status`` so the test can follow it without parsing logs; the
first, ``start PID GENERATION``, carries the ``HSMFS_WORKER_GENERATION`` the holder gave it.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import random
import signal
import sys
import time

import trio

from hsmfs.fanotify import (
    FAN_ALLOW,
    FAN_MARK_ADD,
    FAN_MODIFY,
    FAN_PRE_ACCESS,
    deny_errno,
    fanotify_mark,
    ignore_mount,
    open_private_tree,
)
from hsmfs.holder import CTRL_MSG, ENV_GENERATION, MSG_REPLY
from hsmfs.holder_link import NOTICE_ID, HolderGone, HolderLink


@functools.cache
def pattern(name: str, size: int) -> bytes:
    """The content every stub is filled with: seeded by its name, so the test can recompute it."""
    return random.Random(f"hsmfs-t4:{name}").randbytes(size)


class Status:
    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def __call__(self, *words: object) -> None:
        # One O_APPEND write per line: lines from successive workers never interleave.
        os.write(self._fd, (" ".join(str(w) for w in words) + "\n").encode())


def parse_response(text: str) -> int:
    if text == "allow":
        return FAN_ALLOW
    if text.startswith("deny:"):
        return deny_errno(getattr(errno, text[5:]))
    raise ValueError(text)


async def serve(args: argparse.Namespace, status: Status) -> int:
    link = HolderLink.from_environ()
    tree = open_private_tree(args.cache)
    ignore_mount(link.fan_fd, tree)
    by_ino: dict[int, tuple[str, int]] = {}
    for rel in args.stubs:
        mask = FAN_PRE_ACCESS | (FAN_MODIFY if args.notices else 0)
        fanotify_mark(link.fan_fd, FAN_MARK_ADD, mask, rel, dirfd=tree)
        st = os.stat(rel, dir_fd=tree)
        by_ino[st.st_ino] = (rel, st.st_size)
    response = parse_response(args.response)
    received = 0

    def fill(rel: str, size: int, start: int, stop: int) -> None:
        fd = os.open(rel, os.O_WRONLY | os.O_CLOEXEC, dir_fd=tree)
        try:
            data = pattern(os.path.basename(rel), size)[start:stop]
            if os.pwrite(fd, data, start) != len(data):
                raise OSError(errno.EIO, "short fill")
        finally:
            os.close(fd)

    async def handle(ident: int, offset: int | None, count: int | None, fd: int) -> None:
        word = deny_errno(errno.EIO)
        cancelled = False
        try:
            st = os.fstat(fd)
            rel, size = by_ino[st.st_ino]
            if not args.quiet:
                status("event", ident, offset, count, rel)
            if args.stall_flag and os.path.exists(args.stall_flag):
                status("stall", ident)
                while os.path.exists(args.stall_flag):
                    await trio.sleep(0.02)
            if not args.no_fill and offset is not None:
                stop = size if not count else min(size, offset + count)
                if stop > offset:
                    await trio.to_thread.run_sync(fill, rel, size, offset, stop)
            word = response
        except trio.Cancelled:
            # A stopping worker leaves its events to the holder (which denies them with EIO):
            # that is the path the tests exercise.
            cancelled = True
            status("abandon", ident)
            raise
        finally:
            os.close(fd)
            if not cancelled:
                if args.stale_reply:
                    # What a duplicate or late reply looks like on the wire: right id, wrong
                    # seq.  The holder must drop it, so the real reply below still counts.
                    seq = link._outstanding[ident] ^ 0x5A5A
                    link._sock.send(CTRL_MSG.pack(MSG_REPLY, ident, seq, deny_errno(errno.EIO)))
                    status("stale-reply", ident)
                try:
                    await link.reply(ident, word)
                except HolderGone:
                    pass  # the receive loop sees it too and ends the worker
                else:
                    if not args.quiet:
                        status("reply", ident, hex(word))

    async with trio.open_nursery() as nursery:

        async def on_sigterm() -> None:
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    if args.ignore_sigterm:
                        status("sigterm-ignored")
                        continue
                    status("sigterm")
                    await link.stopping()
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(on_sigterm)
        await link.ready()
        status("ready")
        try:
            while True:
                while args.stall_receive and os.path.exists(args.stall_receive):
                    await trio.sleep(0.02)
                ident, event, fd = await link.receive()
                if ident == NOTICE_ID:
                    rel = by_ino.get(os.fstat(fd).st_ino, ("?", 0))[0]
                    os.close(fd)
                    status("notice", hex(event.mask), rel)
                    continue
                received += 1
                nursery.start_soon(handle, ident, event.offset, event.count, fd)
                if args.stop_after and received >= args.stop_after:
                    await trio.sleep(0.2)  # let the handler log its event
                    status("stopping")
                    await link.stopping()
                    nursery.cancel_scope.cancel()
        except HolderGone:
            status("holder-gone")
            return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", required=True)
    parser.add_argument("--status", required=True)
    parser.add_argument("--stall-flag")
    parser.add_argument("--stall-receive", help="do not even receive while this file exists")
    parser.add_argument("--stop-after", type=int, default=0)
    parser.add_argument("--crash-if")
    parser.add_argument("--crash-status", type=int, default=3)
    parser.add_argument("--hang-if", help="stay alive and not ready while this file exists")
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--no-fill", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no per-event status lines")
    parser.add_argument("--stale-reply", action="store_true", help="send a wrong-seq DENY first")
    parser.add_argument("--notices", action="store_true", help="mark FAN_MODIFY, log notices")
    parser.add_argument("--response", default="allow")
    parser.add_argument("stubs", nargs="+", help="stub paths relative to --cache")
    args = parser.parse_args()
    status = Status(args.status)
    status("start", os.getpid(), os.environ.get(ENV_GENERATION, "-"))
    if args.crash_if and os.path.exists(args.crash_if):
        status("crash", args.crash_status)
        return args.crash_status
    if args.hang_if and os.path.exists(args.hang_if):
        status("hang")
        while os.path.exists(args.hang_if):
            time.sleep(0.02)
    return trio.run(serve, args, status)


if __name__ == "__main__":
    sys.exit(main())
