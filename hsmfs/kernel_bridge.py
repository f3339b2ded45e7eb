"""The kernel door: fanotify pre-content events on the backing tree, answered by the core.

Applications (and containers that bind-mount the cache) read the backing files directly; the
kernel holds each access to a guarded file until this door answers.  A translation, nothing
more: an event in, :meth:`StubCache.ensure` for its range, ``FAN_ALLOW`` or
``FAN_DENY_ERRNO(to_errno(...))`` out.  The facts every choice here rests on are measured in
KERNEL_FACTS.md / KERNEL_FACTS_2.md; the short version:

* **Process shape.** The holder H (:mod:`hsmfs.holder`) owns the group, reads it and writes every
  response; this module runs in the worker W, which receives events over a socket.  If W dies,
  blocked applications stay blocked (never zeros) until the next W answers them.
* **Marks, by layout.**  A cache that is the root of its own filesystem gets one filesystem
  mark (nothing pinned, nothing to re-mark).  A cache inside a shared filesystem gets one inode
  mark per stub, added while the stub is still in staging, so no opener can ever hold an
  unguarded fd of it (whether an fd raises events is fixed at open: KERNEL_FACTS_2 §3).
  Mount marks are never used for guarding: they miss bind mounts and other namespaces.
* **Resident = an ignore mask**, never a removed mark, so eviction stays safe for open fds.
* **The private door** is a detached ``open_tree`` clone with a mount ignore mark covering every
  permission event we mark: all of hsmfs's own I/O goes through it and raises nothing, and no
  path to it exists for anyone else.
* **Open-time fill.** ``SEEK_DATA``/``FIEMAP`` raise no event, so ``cp``/``tar -S`` would copy a
  stub's holes as zeros.  Files up to ``open_fill_max`` are filled whole at ``FAN_OPEN_PERM``
  (skipped for ``O_TRUNC`` opens, read from ``/proc/<tid>/syscall``); ``FAN_OPEN_EXEC_PERM``
  always fills the whole file, so a binary never faults on a missing page.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import platform
import resource
import time
from collections import Counter
from typing import Any

import trio

from .cache import Intent, Pin, StubCache
from .config import KernelConfig
from .cover import is_mount_beneath, open_beneath, uncover
from .errors import HsmError, to_errno
from .fanotify import (
    FAN_ALLOW,
    FAN_MARK_ADD,
    FAN_MARK_EVICTABLE,
    FAN_MARK_FILESYSTEM,
    FAN_MARK_IGNORE,
    FAN_MARK_IGNORE_SURV,
    FAN_MARK_REMOVE,
    FAN_OPEN_EXEC_PERM,
    FAN_OPEN_PERM,
    FAN_PRE_ACCESS,
    deny_errno,
    fanotify_mark,
    fanotify_mark_fd,
    ignore_mount,
)

log = logging.getLogger(__name__)

# openat(2), open(2), creat(2), truncate(2), ftruncate(2) on x86_64: what a blocked thread is in.
_SYS_OPEN, _SYS_CREAT, _SYS_OPENAT = 2, 85, 257
_SYS_TRUNCATE, _SYS_FTRUNCATE = 76, 77
PAGE = 4096


#: The syscall numbers above are x86_64's: elsewhere (arm64's 76 is splice) nothing is read
#: from /proc/<tid>/syscall, and every event takes the safe reading (fill; a read, not a
#: truncate).
_SYSCALLS_KNOWN = platform.machine() == "x86_64"


def _syscall(tid: int) -> list[str] | None:
    """The fields of ``/proc/<tid>/syscall`` of a thread blocked in a syscall, or None
    (another architecture, another PID namespace, an io_uring worker, a thread that moved
    on)."""
    if not _SYSCALLS_KNOWN:
        return None
    try:
        with open(f"/proc/{tid}/syscall") as f:
            return f.read().split()
    except OSError:
        return None


def opened_with_trunc(tid: int) -> bool:
    """Whether the thread blocked in this open asked for ``O_TRUNC`` (KERNEL_FACTS_2 §1d).

    A truncating open needs no fill: its old bytes are about to go.  Anything unreadable
    (another PID namespace, io_uring workers, openat2) answers False, and the file is filled:
    the safe direction.
    """
    fields = _syscall(tid)
    try:
        nr = int(fields[0]) if fields else -1
        if nr == _SYS_CREAT:
            return True
        if nr == _SYS_OPENAT and fields:
            return bool(int(fields[3], 16) & os.O_TRUNC)
        if nr == _SYS_OPEN and fields:
            return bool(int(fields[2], 16) & os.O_TRUNC)
    except (ValueError, IndexError):
        pass
    return False


def truncating_to(tid: int, ino: int) -> int | None:
    """The new length if the thread is blocked in truncate(2)/ftruncate(2), else None.

    The kernel reports a truncate as an access event (KERNEL_FACTS §3: a shrink to an aligned
    size is (size, 0), to an unaligned one the page holding the new end), indistinguishable
    from a read by its range; read as a read, count 0 ("to EOF") fetched every byte the truncate
    was about to throw away (issue 10, defect 5).  Unreadable: None, and the event is handled as
    a read (it fetches too much, never too little).
    """
    fields = _syscall(tid)
    try:
        nr = int(fields[0]) if fields else -1
        if nr == _SYS_FTRUNCATE and fields:
            # The fd it truncates must be this file (a 32-bit program's numbers differ).
            if os.stat(f"/proc/{tid}/fd/{int(fields[1], 16)}").st_ino != ino:
                return None
            return int(fields[2], 16)
        if nr == _SYS_TRUNCATE and fields:
            return int(fields[2], 16)
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclasses.dataclass
class BridgeStats:
    events: Counter[str] = dataclasses.field(default_factory=Counter)
    denied: Counter[str] = dataclasses.field(default_factory=Counter)
    not_ours: int = 0
    resident_answers: int = 0  # answered in the receive loop: their bytes were resident
    open_fills: int = 0
    trunc_opens: int = 0
    truncates: int = 0  # truncate(2)/ftruncate(2) of a stub, recorded without a fetch
    busy_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        total = sum(self.events.values())
        return {
            "events": dict(self.events),
            "denied": dict(self.denied),
            "not_ours": self.not_ours,
            "resident_answers": self.resident_answers,
            "open_fills": self.open_fills,
            "trunc_opens": self.trunc_opens,
            "truncates": self.truncates,
            "mean_event_ms": round(1000 * self.busy_s / total, 3) if total else 0.0,
        }


class KernelBridge:
    """The worker's half of the kernel door: marks, private door, event handling."""

    def __init__(self, cache_dir: str, cfg: KernelConfig, link: Any) -> None:
        self.cfg = cfg
        self.link = link
        self.fan_fd: int = link.fan_fd
        self.cache_dir = cache_dir
        self.cache: StubCache | None = None
        self.stats_ = BridgeStats()
        self.mask = FAN_PRE_ACCESS | FAN_OPEN_EXEC_PERM
        # A stop covers the cache dir (hsmfs.cover) until this worker has guarded every stub:
        # the layout and the private door are those of the tree beneath the cover.
        self.filesystem_mark = is_mount_beneath(cache_dir)
        self.root_fd = open_beneath(cache_dir)

    def attach(self, cache: StubCache) -> None:
        """Learn the core, then guard the tree.  Called before the core makes or adopts any
        stub, so every stub gets its mark before it can be opened.

        OPEN_EXEC_PERM always: exec fills the whole binary before it runs.  OPEN_PERM only when
        the core fills at open (``open_fill``); the core decides which opens fill.
        """
        self.cache = cache
        if cache.cfg.open_fill_max != 0:
            self.mask |= FAN_OPEN_PERM
        # The private door must ignore *every* permission event the marks carry, or hsmfs's own
        # open of a stub deadlocks on itself (KERNEL_FACTS_2 §1e).
        ignore_mount(self.fan_fd, self.root_fd)
        if self.filesystem_mark:
            fanotify_mark(self.fan_fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, self.mask,
                          self.cache_dir)
        fill = cache.cfg.open_fill_max
        log.info("kernel door on %s: %s mark, mask %#x, open fill %s", self.cache_dir,
                 "filesystem" if self.filesystem_mark else "per-stub inode", self.mask,
                 "all files" if fill < 0 else f"up to {fill} bytes" if fill else "off")

    # -- CacheListener: guard stubs, and stop guarding what is resident ------------------------

    def on_stub(self, fd: int, resident: bool) -> None:
        if not self.filesystem_mark:
            fanotify_mark_fd(self.fan_fd, FAN_MARK_ADD, self.mask, fd)
        if resident:
            self.on_resident(fd)
        else:
            # A restarted worker shares its predecessor's group: an ignore mask it left on this
            # inode must not outlive the residency it stood for.
            with contextlib.suppress(OSError):
                fanotify_mark_fd(self.fan_fd, FAN_MARK_REMOVE | FAN_MARK_IGNORE, self.mask, fd)

    def on_resident(self, fd: int) -> None:
        # With a filesystem mark the ignore mark may be evicted under memory pressure: that only
        # brings events back (the safe direction).  An inode mark's ignore mask lives with it.
        flags = FAN_MARK_ADD | FAN_MARK_IGNORE_SURV
        if self.filesystem_mark:
            flags |= FAN_MARK_EVICTABLE
        fanotify_mark_fd(self.fan_fd, flags, self.mask, fd)

    # -- serving -------------------------------------------------------------------------------

    async def serve(self, cache: StubCache, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from .holder_link import HolderGone

        assert self.cache is cache, "attach() the core before it makes stubs"
        # Every stub is guarded now: a cover the last stop left may go.  An access between here
        # and ready blocks in H (it dispatches to ready workers only) instead of reading zeros.
        if await trio.to_thread.run_sync(uncover, self.cache_dir):
            log.info("lifted the cover the last stop left over %s: every stub is guarded",
                     self.cache_dir)
        await self.link.ready()  # H may now tell `hsmfs serve` to return
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        ident, event, fd = await self.link.receive()
                    except HolderGone:
                        log.error("the holder is gone; stopping")
                        await trio.to_thread.run_sync(self._last_guard)
                        raise
                    if not self._answer_resident(ident, event, fd, nursery):
                        nursery.start_soon(self._handle, ident, event, fd)
        except trio.Cancelled:
            # A deliberate stop (signal, unmount): tell H not to restart us.  A crash is not a
            # stop: H sees the worker die, restarts it, and re-dispatches what it held.
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self.link.stopping()
            raise

    def _last_guard(self) -> None:
        """H died and this worker holds the last fd of the group: until this process exits,
        every access blocks (measured, docs/unguarded.md §D); when it exits, every pending and
        later access is allowed over the holes.  So, before exiting: cover the cache dir (new
        opens by path fail with ENOENT), deny what is queued, and deny every event H had read
        (any holder of the group may answer by number, KERNEL_FACTS §8) with EIO.  What
        arrives between the last denial and the exit, and fds already open, stay exposed."""
        from .cover import cover
        from .fanotify import parse_events, write_response

        started = time.perf_counter()
        covered = False
        if self.cfg.cover:
            try:
                covered = cover(self.cache_dir)
            except OSError as exc:
                log.error("cannot cover %s: %s", self.cache_dir, exc)
        eio = deny_errno(errno.EIO)
        denied = 0
        for _ in range(1000):  # the group is non-blocking (H made it so): EAGAIN ends this
            try:
                buf = os.read(self.fan_fd, 64 * 1024)
            except OSError:
                break
            for ev in parse_events(buf):
                if ev.fd >= 0:
                    with contextlib.suppress(OSError):
                        write_response(self.fan_fd, ev.fd, eio)
                        denied += 1
                    os.close(ev.fd)
        limit = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 1 << 20)
        for number in range(limit):
            for _ in range(64):  # two pending events may share a number (KERNEL_FACTS §8 C'')
                try:
                    write_response(self.fan_fd, number, eio)
                except OSError:
                    break
                denied += 1
        log.error("holder gone: %s, %d events denied with EIO in %.0f ms; exiting",
                  "cache dir covered" if covered else "cache dir NOT covered", denied,
                  1000 * (time.perf_counter() - started))

    def _answer_resident(self, ident: int, event: Any, fd: int,
                         nursery: trio.Nursery) -> bool:
        """Answer a plain access to resident bytes right here in the receive loop: no task,
        no await.  False (nothing done) for anything else: a miss, an open, an exec, a
        truncated file, a file the core does not know, a count-0 access (a truncate or a
        whole-file clone, which the task path tells apart).

        A partly resident file raises an event on every read, also of local bytes (a stream
        reading what read-ahead landed, the hot pages of a big database).  Measured
        (scripts/event_cost.py): a task per such event cost ~193 us a round trip, this
        69-88 us; misses are no slower (docs/design.md, "Kernel door").
        """
        assert self.cache is not None
        if (event.mask & (FAN_OPEN_PERM | FAN_OPEN_EXEC_PERM) or not event.mask & FAN_PRE_ACCESS
                or not event.count):
            return False
        started = time.perf_counter()
        try:
            st = os.fstat(fd)  # never raises an event
            start, stop = _event_range(event, st.st_size)
            stub = self.cache.resident_file(fd, st, start, stop)
        except Exception:  # nothing done yet: the task path takes it
            log.exception("cannot check %r in the receive loop; handling it as a task", event)
            return False
        if stub is None:
            return False
        os.close(fd)
        if not self.link.try_reply(ident, FAN_ALLOW):
            nursery.start_soon(self.link.reply, ident, FAN_ALLOW)  # the socket is full: wait
        self.stats_.events["access"] += 1
        self.stats_.resident_answers += 1
        self.cache.note_hit(stub, start, stop)
        self.cache.note_served(max(stop - start, 0))
        self.stats_.busy_s += time.perf_counter() - started
        return True

    async def _handle(self, ident: int, event: Any, fd: int) -> None:
        """Answer one event exactly once, whatever happens; then close its fd."""
        started = time.perf_counter()
        response = deny_errno(errno.EIO)
        pin: Pin | None = None
        try:
            response, pin = await self._decide(event, fd)
        except Exception:
            log.exception("unexpected failure handling event %r", event)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
            self.stats_.busy_s += time.perf_counter() - started
            with trio.CancelScope(shield=True):
                await self.link.reply(ident, response)
            if pin is not None:
                pin.release()  # held until the answer left: no release punches before it

    async def _decide(self, event: Any, fd: int) -> tuple[int, Pin | None]:
        """(response, pin): the core decides, this only translates."""
        assert self.cache is not None
        kind = ("exec" if event.mask & FAN_OPEN_EXEC_PERM else
                "open" if event.mask & FAN_OPEN_PERM else "access")
        self.stats_.events[kind] += 1
        try:
            stub = await self.cache.lookup(fd)
            if stub is None:
                self.stats_.not_ours += 1  # created locally: holds no byte S3 owes it
                return FAN_ALLOW, None
            start, stop = 0, stub.size
            if kind == "exec":
                intent = Intent.EXEC
            elif kind == "open":
                intent = Intent.OPEN_TRUNC if opened_with_trunc(event.pid) else Intent.OPEN
                if intent is Intent.OPEN_TRUNC:
                    self.stats_.trunc_opens += 1
                elif not stub.local:
                    self.stats_.open_fills += 1
            else:
                # A truncate reports (new end, 0) or the page holding it (KERNEL_FACTS §3):
                # only such events are worth a look at what the thread is doing.
                new_size = (truncating_to(event.pid, stub.ino)
                            if event.count in (0, PAGE) else None)
                if new_size is not None:
                    intent, start, stop = Intent.TRUNCATE, new_size, new_size
                    self.stats_.truncates += 1
                else:
                    intent = Intent.READ
                    start, stop = _event_range(event, os.fstat(fd).st_size)
            pin = await self.cache.ensure(stub, start, stop, intent, fd=fd)
            if intent is Intent.READ:
                # Bytes released to the application (page-rounded: the event's own range).
                self.cache.note_served(max(stop - start, 0))
            return FAN_ALLOW, pin
        except Exception as exc:
            code = to_errno(exc)
            self.stats_.denied[errno.errorcode.get(code, str(code))] += 1
            if not isinstance(exc, (HsmError, OSError)):
                log.exception("unexpected failure on event %r", event)
            return deny_errno(code), None

    def stats(self) -> dict[str, object]:
        out = self.stats_.as_dict()
        out["mark"] = "filesystem" if self.filesystem_mark else "inode"
        return out


def _event_range(event: Any, size: int) -> tuple[int, int]:
    """The bytes an access event asks for, clipped to the file.  Count 0 means "from offset
    to EOF" (a whole-file clone reports (0, 0)); ranges are page-rounded and not clipped to
    EOF by the kernel.  (A truncate also reports count 0: the task path tells it apart.)"""
    start = event.offset or 0
    return start, min(start + event.count if event.count else size, size)
