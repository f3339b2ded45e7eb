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
* **Writes** (docs/kernel_writes.md, KERNEL_FACTS_3 §2).  A write to a guarded (not resident)
  file raises ``FAN_PRE_ACCESS`` like a read; ``/proc/<tid>/syscall`` of the waiting thread
  tells them apart (write, pwrite64, writev, pwritev(2), fallocate, copy_file_range /
  sendfile / splice *into* this file, a shared writable mmap).  A write becomes
  ``Intent.WRITE``: every owed byte local and the file durably dirty before the write lands.
  A write to a resident file raises no ``PRE_ACCESS`` (ignored): the marks also carry
  ``FAN_MODIFY``, which H forwards as a notice after the fact, and the file is marked dirty
  then; a dirty file gets ``FAN_MODIFY`` in its ignore mask (:meth:`KernelBridge.ignore_writes`)
  so a write-heavy program costs one notice, until archive makes it clean again
  (:meth:`KernelBridge.watch_writes`).  Truncate and mmap writes raise no ``FAN_MODIFY``.
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
import threading
import time
from collections import Counter
from typing import Any

import trio

from .cache import CLEAN, STALE, Intent, Pin, StubCache
from .config import KernelConfig
from .cover import is_mount_beneath, open_beneath, uncover
from .errors import HsmError, to_errno
from .fanotify import (
    FAN_ALLOW,
    FAN_CLOSE_WRITE,
    FAN_MARK_ADD,
    FAN_MARK_EVICTABLE,
    FAN_MARK_FILESYSTEM,
    FAN_MARK_IGNORE,
    FAN_MARK_IGNORE_SURV,
    FAN_MARK_REMOVE,
    FAN_MODIFY,
    FAN_OPEN_EXEC_PERM,
    FAN_OPEN_PERM,
    FAN_PRE_ACCESS,
    PERM_EVENTS,
    deny_errno,
    fanotify_mark,
    fanotify_mark_fd,
    ignore_mount,
)
from .histogram import Histogram
from .names import NameWatcher

log = logging.getLogger(__name__)

# openat(2), open(2), creat(2), truncate(2), ftruncate(2) on x86_64: what a blocked thread is in.
_SYS_OPEN, _SYS_CREAT, _SYS_OPENAT = 2, 85, 257
_SYS_TRUNCATE, _SYS_FTRUNCATE = 76, 77
#: Write-family syscalls (x86_64) whose first argument is the written fd: each raised
#: FAN_PRE_ACCESS on the file it writes, with the thread waiting in it (KERNEL_FACTS_3 §2).
_SYS_WRITES_FD1 = frozenset({
    1,    # write
    18,   # pwrite64
    20,   # writev
    296,  # pwritev
    328,  # pwritev2
    285,  # fallocate (also PUNCH_HOLE, ZERO_RANGE, COLLAPSE/INSERT_RANGE)
    40,   # sendfile(out_fd, in_fd, ...): out_fd is argument 1; the source raises one too
})
#: Two-file syscalls: (number, index of the destination fd in /proc/<tid>/syscall's fields).
#: Both files raise an event; only the destination's is a write.
_SYS_WRITES_DEST = {
    326: 3,  # copy_file_range(fd_in, off_in, fd_out, ...)
    275: 3,  # splice(fd_in, off_in, fd_out, ...)
}
_SYS_MMAP = 9
_PROT_WRITE, _MAP_SHARED = 0x2, 0x1
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
    return _SYSCALL_FILES.read(tid)


class _SyscallFiles:
    """``/proc/<tid>/syscall`` of recent threads, kept open: a ``pread`` at offset 0 of an
    open one re-reads the thread's current syscall (3.6 us here) where open+read+close costs
    9.5 us, and the receive loop reads it for every access to a file that is not wholly local
    and dirty (:meth:`KernelBridge._may_write`).  A proc fd belongs to its thread, not to the
    number: once the thread is gone it fails (ESRCH) and is opened again, so a reused tid never
    reads another thread's line.  At most :attr:`MAX` open; the oldest goes first."""

    MAX = 128

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def read(self, tid: int) -> list[str] | None:
        with self._lock:
            for attempt in (0, 1):
                fd = self._fds.get(tid)
                fresh = fd is None
                if fresh:
                    try:
                        fd = os.open(f"/proc/{tid}/syscall", os.O_RDONLY | os.O_CLOEXEC)
                    except OSError:
                        return None
                    if len(self._fds) >= self.MAX:
                        os.close(self._fds.pop(next(iter(self._fds))))
                    self._fds[tid] = fd
                try:
                    return os.pread(fd, 512, 0).decode("ascii", "replace").split()
                except OSError:
                    del self._fds[tid]
                    os.close(fd)
                    if fresh or attempt:
                        return None
            return None


_SYSCALL_FILES = _SyscallFiles()


def _fd_is(tid: int, fields: list[str], index: int, ino: int) -> bool:
    """Whether the fd in argument ``index`` of the blocked syscall is the file ``ino``."""
    return os.stat(f"/proc/{tid}/fd/{int(fields[index], 16)}").st_ino == ino


def access_kind(tid: int, ino: int) -> tuple[str, int | None]:
    """What the thread behind a ``FAN_PRE_ACCESS`` on file ``ino`` is doing, from one read of
    ``/proc/<tid>/syscall``: ``("truncate", new_length)``, ``("write", None)`` or
    ``("read", None)``.

    Writes (KERNEL_FACTS_3 §2): write, pwrite64, writev, pwritev, pwritev2, fallocate,
    sendfile into this file, copy_file_range/splice with this file as the destination, and an
    ``mmap`` of it with ``PROT_WRITE`` and ``MAP_SHARED`` (its stores raise nothing later).
    Unreadable (another architecture or PID namespace, an io_uring worker, a thread that moved
    on) or anything else: a read, the safe reading for residency (it fetches the range; the
    write, if it was one, is then seen by FAN_MODIFY after the fact).
    """
    fields = _syscall(tid)
    try:
        nr = int(fields[0]) if fields else -1
        if nr in _SYS_WRITES_FD1:
            if nr == 40 and not _fd_is(tid, fields, 1, ino):
                return "read", None  # sendfile *from* this file
            return "write", None
        dest = _SYS_WRITES_DEST.get(nr)
        if dest is not None:
            return ("write" if _fd_is(tid, fields, dest, ino) else "read"), None
        if nr == _SYS_MMAP:
            prot, flags = int(fields[3], 16), int(fields[4], 16)
            if prot & _PROT_WRITE and flags & _MAP_SHARED:
                return "write", None
            return "read", None
        if nr == _SYS_FTRUNCATE:
            # The fd it truncates must be this file (a 32-bit program's numbers differ).
            if not _fd_is(tid, fields, 1, ino):
                return "read", None
            return "truncate", int(fields[2], 16)
        if nr == _SYS_TRUNCATE:
            return "truncate", int(fields[2], 16)
    except (OSError, ValueError, IndexError):
        pass
    return "read", None


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
    """The new length if the thread is blocked in truncate(2)/ftruncate(2) of ``ino``, else
    None (see :func:`access_kind`).

    The kernel reports a truncate as an access event (KERNEL_FACTS §3: a shrink to an aligned
    size is (size, 0), to an unaligned one the page holding the new end), indistinguishable
    from a read by its range; read as a read, count 0 ("to EOF") fetched every byte the truncate
    was about to throw away (issue 10, defect 5).
    """
    kind, new_size = access_kind(tid, ino)
    return new_size if kind == "truncate" else None


@dataclasses.dataclass
class BridgeStats:
    events: Counter[str] = dataclasses.field(default_factory=Counter)
    denied: Counter[str] = dataclasses.field(default_factory=Counter)
    not_ours: int = 0
    resident_answers: int = 0  # answered in the receive loop: their bytes were resident
    open_fills: int = 0
    trunc_opens: int = 0
    truncates: int = 0  # truncate(2)/ftruncate(2) of a stub, recorded without a fetch
    writes: int = 0  # write-family PRE_ACCESS events: whole file local + dirty before it lands
    notices: int = 0  # FAN_MODIFY notices received from H (writes already landed)
    marked_dirty: int = 0  # files a notice found clean and marked dirty
    busy_s: float = 0.0
    #: Seconds from the worker receiving an event to its answer (the H hops not included).
    latency: Histogram = dataclasses.field(default_factory=Histogram)

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
            "writes": self.writes,
            "notices": self.notices,
            "marked_dirty": self.marked_dirty,
            "mean_event_ms": round(1000 * self.busy_s / total, 3) if total else 0.0,
            "event_seconds": self.latency.as_dict(),
        }

    def took(self, seconds: float) -> None:
        self.busy_s += seconds
        self.latency.observe(seconds)


class KernelBridge:
    """The worker's half of the kernel door: marks, private door, event handling."""

    def __init__(self, cache_dir: str, cfg: KernelConfig, link: Any) -> None:
        self.cfg = cfg
        self.link = link
        self.fan_fd: int = link.fan_fd
        self.cache_dir = cache_dir
        self.cache: StubCache | None = None
        self.stats_ = BridgeStats()
        # FAN_MODIFY: writes to resident files (whose permission events are ignored) are seen
        # after the fact.  FAN_CLOSE_WRITE: it fires on every close of a writable fd, written
        # or not (KERNEL_FACTS_3 §2), so it is no dirty signal by itself; but a truncate or an
        # mmap store of a resident file raises nothing else, and at the close the core compares
        # the file's length and mtime with its version's (the clean point, StubCache.lookup).
        self.mask = FAN_PRE_ACCESS | FAN_OPEN_EXEC_PERM | FAN_MODIFY | FAN_CLOSE_WRITE
        # A stop covers the cache dir (hsmfs.cover) until this worker has guarded every stub:
        # the layout and the private door are those of the tree beneath the cover.
        self.filesystem_mark = is_mount_beneath(cache_dir)
        self.root_fd = open_beneath(cache_dir)
        # Silence the private door now, not in attach(): the core's constructor already opens
        # files through it (Tree.prepare checks staging leftovers), and in a restarted worker
        # the group still marks them (marks are H's).  A leftover of a worker killed between a
        # stub's guard and its link (or a replacement's exchange and the retire) then raised
        # OPEN_PERM that H holds for a ready worker, which this one never became: every
        # restart blocked on it, then failed, for ever (tests/t4_crash.py found it).
        ignore_mount(self.fan_fd, self.root_fd)
        self._holder_pid = os.getppid()  # H spawned this worker
        self.names: NameWatcher | None = None

    def attach(self, cache: StubCache) -> None:
        """Learn the core, then guard the tree.  Called before the core makes or adopts any
        stub, so every stub gets its mark before it can be opened.

        OPEN_EXEC_PERM always: exec fills the whole binary before it runs.  OPEN_PERM only when
        the core fills at open (``open_fill``); the core decides which opens fill.
        """
        self.cache = cache
        if cache.cfg.open_fill_max != 0:
            self.mask |= FAN_OPEN_PERM
        # The private door (ignored since __init__) must ignore *every* permission event the
        # marks carry, or hsmfs's own open of a stub deadlocks on itself (KERNEL_FACTS_2 §1e),
        # and FAN_MODIFY, or its own fills would mark every file dirty (KERNEL_FACTS_3 §2):
        # PRIVATE_IGNORE_MASK has both, whatever mask attach() picks.
        if self.filesystem_mark:
            # Through the private door's fd, never the cache path: after a stop the path leads
            # to the cover (a tmpfs, which carries no pre-content events: EOPNOTSUPP), and the
            # filesystem to guard is the one beneath it, which only root_fd reaches.  The cover
            # stays up until serve() has guarded every stub, so a death before or after this
            # mark leaves the tree covered (ENOENT), never unguarded.
            fanotify_mark(self.fan_fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, self.mask, ".",
                          dirfd=self.root_fd)
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
        # Only the permission events: FAN_MODIFY of a clean resident file must still come.
        fanotify_mark_fd(self.fan_fd, self._ignore_flags(), self.mask & PERM_EVENTS, fd)

    def on_released(self, fd: int) -> None:
        # Before the release takes its lease: permission events come back for every fd, the
        # ones already open included (the mark stayed: KERNEL_FACTS_2 §4), so no opener from
        # here on can read a punched page without an event.  No ignore (evicted, or never
        # set on a partial file): nothing to remove.
        with contextlib.suppress(OSError):
            fanotify_mark_fd(self.fan_fd, FAN_MARK_REMOVE | FAN_MARK_IGNORE,
                             self.mask & PERM_EVENTS, fd)

    def _ignore_flags(self) -> int:
        flags = FAN_MARK_ADD | FAN_MARK_IGNORE_SURV
        if self.filesystem_mark:
            flags |= FAN_MARK_EVICTABLE
        return flags

    def ignore_writes(self, fd: int) -> None:
        """Stop FAN_MODIFY for this file: it is dirty (or holds no record: a local file that
        archive uploads as new anyway), and a write-heavy program must not send a notice per
        write.  Safe to lose (evictable with a filesystem mark): a notice comes again."""
        # With writeback on, FAN_CLOSE_WRITE keeps flowing for dirty files: it is the only
        # close this door sees (one notice per close of a writable fd, not per write), and
        # writeback's "closed and idle" clock starts at it (hsmfs.archive.Writeback).
        mask = FAN_MODIFY
        if self.cache is None or not self.cache.cfg.writeback_s:
            mask |= FAN_CLOSE_WRITE
        fanotify_mark_fd(self.fan_fd, self._ignore_flags(), mask, fd)

    def watch_writes(self, fd: int) -> None:
        """The archive hook: FAN_MODIFY again for this file.  Call it *before* reading the
        bytes to upload (docs/kernel_writes.md: a write during the upload then raises a
        notice, which keeps the file dirty).  Never raises for a file with no such mask."""
        with contextlib.suppress(OSError):
            fanotify_mark_fd(self.fan_fd, FAN_MARK_REMOVE | FAN_MARK_IGNORE,
                             FAN_MODIFY | FAN_CLOSE_WRITE, fd)

    # -- serving -------------------------------------------------------------------------------

    async def serve(self, cache: StubCache, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from .holder_link import NOTICE_ID, HolderGone

        assert self.cache is cache, "attach() the core before it makes stubs"
        # Names before the tree opens: a program's create, rename or removal from here on is
        # seen (hsmfs.names; a hint, never a guard, so failing to start it is only logged).
        try:
            self.names = await trio.to_thread.run_sync(
                lambda: NameWatcher(cache, self.cache_dir, self.root_fd, self.filesystem_mark))
        except OSError as exc:
            log.warning("no names group (%s): creates, renames and removals made directly in "
                        "%s are seen only by archive's scan and the next start", exc,
                        self.cache_dir)
        # Every stub is guarded now: a cover the last stop left may go.  An access between here
        # and ready blocks in H (it dispatches to ready workers only) instead of reading zeros.
        if await trio.to_thread.run_sync(uncover, self.cache_dir):
            log.info("lifted the cover the last stop left over %s: every stub is guarded",
                     self.cache_dir)
        await self.link.ready()  # H may now tell `hsmfs serve` to return
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                if self.names is not None:
                    nursery.start_soon(self.names.run)
                while True:
                    try:
                        ident, event, fd = await self.link.receive()
                    except HolderGone:
                        log.error("the holder is gone; stopping")
                        await trio.to_thread.run_sync(self._last_guard)
                        raise
                    if ident == NOTICE_ID:
                        nursery.start_soon(self._notice, event, fd)
                    elif not self._answer_resident(ident, event, fd, nursery):
                        nursery.start_soon(self._handle, ident, event, fd)
        except trio.Cancelled:
            # A deliberate stop (signal, unmount): tell H not to restart us.  A crash is not a
            # stop: H sees the worker die, restarts it, and re-dispatches what it held.
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self.link.stopping()
            raise

    def _successor(self) -> int | None:
        """The pid of another live daemon serving this tree (its pid file, read through the
        private door), or None.  This worker's own holder was its parent at start."""
        try:
            fd = os.open(".hsmfs/daemon.pid", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.root_fd)
        except OSError:
            return None
        try:
            pid = int(os.read(fd, 32).decode().strip() or 0)
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        if pid <= 0 or pid == self._holder_pid:
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

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
        successor = self._successor()
        if successor is not None:
            # This worker noticed late: a new daemon already serves the tree (it lifts a cover
            # once it guards every stub).  Covering now would hide a guarded tree from its users.
            log.error("holder gone; daemon %d already serves %s: not covering it", successor,
                      self.cache_dir)
        elif self.cfg.cover:
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
                if ev.fd >= 0 and not ev.is_permission:  # a FAN_MODIFY: nothing to answer
                    os.close(ev.fd)
                elif ev.fd >= 0:
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
        """Answer a plain *read* of resident bytes right here in the receive loop: no task,
        no await.  False (nothing done) for anything else: a miss, an open, an exec, a write
        (:meth:`_may_write`), a truncated file, a file the core does not know, a count-0
        access (a truncate or a whole-file clone, which the task path tells apart).

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
            if stub is not None and self._may_write(event, stub):
                return False  # a write needs Intent.WRITE: the task path
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
        self.stats_.took(time.perf_counter() - started)
        return True

    def _may_write(self, event: Any, stub: Any) -> bool:
        """Whether the receive loop must leave this event to a task: it may be a write, which
        needs ``Intent.WRITE``.  A dirty file that is wholly local needs nothing for a write, so
        its reads skip the look at ``/proc/<tid>/syscall``; every other file pays it (a pread
        of a kept-open proc file, 3.6-6 us: docs/kernel_writes.md, "Measured cost")."""
        if stub.local and stub.sync not in (CLEAN, STALE):
            return False
        return access_kind(event.pid, stub.ino)[0] != "read"

    async def _notice(self, event: Any, fd: int) -> None:
        """A write landed (FAN_MODIFY, forwarded by H; nothing to answer): record the file
        dirty, and stop its notices.  Never raises; closes ``fd``."""
        assert self.cache is not None
        self.stats_.notices += 1
        try:
            known = self.cache.stub_for_ino(os.fstat(fd).st_ino)
            before = known.sync if known is not None else None
            stub = await self.cache.lookup(fd)  # compares length and mtime: may mark it dirty
            if stub is not None and stub is known and before in (CLEAN, STALE) \
                    and stub.sync not in (CLEAN, STALE):
                self.stats_.marked_dirty += 1
            if stub is None:
                # Created locally: no record, nothing S3 owes; archive takes it as new whatever
                # is written, so its further writes need no notice.
                if event.mask & FAN_CLOSE_WRITE and self.cache.cfg.writeback_s:
                    rel = self._rel_of(fd)
                    if rel is not None:
                        self.cache.note_closed(rel)
                self.ignore_writes(fd)
                return
            if not event.mask & FAN_MODIFY:
                # A close after writing, or not: lookup compared length and mtime with the
                # version's and recorded a change; writeback's idle clock starts here.
                if stub.sync not in (CLEAN, STALE):
                    if event.mask & FAN_CLOSE_WRITE:
                        self.cache.note_closed(stub)
                    self.ignore_writes(fd)
                return
            if stub.sync in (CLEAN, STALE):
                await self.cache.mark_dirty(stub, fd=fd)
                self.stats_.marked_dirty += 1
            if event.mask & FAN_CLOSE_WRITE:  # merged with the close: the idle clock starts
                self.cache.note_closed(stub)
            self.ignore_writes(fd)
        except Exception as exc:
            level = logging.WARNING if isinstance(exc, (HsmError, OSError)) else logging.ERROR
            log.log(level, "cannot record a write (%r): %s", event, exc,
                    exc_info=level == logging.ERROR)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _rel_of(self, fd: int) -> str | None:
        """The path under the cache dir of a notice's fd (writeback finds a file with no
        record by path), or None where the program reached it through another mount (a
        bind mount elsewhere: the file is then written back only by ``hsmfs archive``).
        Only a filesystem mark reports new files at all: per-stub inode marks never see a
        file created in the backing tree."""
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None
        base = self.cache_dir.rstrip("/") + "/"
        return path[len(base):] if path.startswith(base) else None

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
            self.stats_.took(time.perf_counter() - started)
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
                # What the waiting thread does: a read, a write (KERNEL_FACTS_3 §2), or a
                # truncate, which reports (new end, 0) or the page holding it (KF §3).
                what, new_size = access_kind(event.pid, stub.ino)
                if what == "truncate" and new_size is not None:
                    intent, start, stop = Intent.TRUNCATE, new_size, new_size
                    self.stats_.truncates += 1
                elif what == "write":
                    # Every owed byte local and the file durably dirty before the write lands
                    # (an O_APPEND write reports the fd's position, not EOF: KF §3).
                    intent, start, stop = Intent.WRITE, 0, stub.owed
                    self.stats_.writes += 1
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
        if self.names is not None:
            out.update(self.names.stats())
        return out


def _event_range(event: Any, size: int) -> tuple[int, int]:
    """The bytes an access event asks for, clipped to the file.  Count 0 means "from offset
    to EOF" (a whole-file clone reports (0, 0)); ranges are page-rounded and not clipped to
    EOF by the kernel.  (A truncate also reports count 0: the task path tells it apart.)"""
    start = event.offset or 0
    return start, min(start + event.count if event.count else size, size)
