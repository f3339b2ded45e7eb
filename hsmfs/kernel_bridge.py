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
import json
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import trio

from .cache import LOCAL_STATES, StubCache
from .config import CacheConfig, FuseConfig, KernelConfig, Options, S3Config
from .errors import HsmError, to_errno
from .fanotify import (
    FAN_ALLOW,
    FAN_MARK_ADD,
    FAN_MARK_EVICTABLE,
    FAN_MARK_FILESYSTEM,
    FAN_MARK_IGNORE_SURV,
    FAN_OPEN_EXEC_PERM,
    FAN_OPEN_PERM,
    FAN_PRE_ACCESS,
    deny_errno,
    fanotify_mark,
    fanotify_mark_fd,
    ignore_mount,
    open_private_tree,
)

log = logging.getLogger(__name__)

# openat(2), open(2), creat(2) on x86_64: where the flags of a blocked open are.
_SYS_OPEN, _SYS_CREAT, _SYS_OPENAT = 2, 85, 257


def opened_with_trunc(tid: int) -> bool:
    """Whether the thread blocked in this open asked for ``O_TRUNC`` (KERNEL_FACTS_2 §1d).

    A truncating open needs no fill: its old bytes are about to go.  Anything unreadable
    (another PID namespace, io_uring workers, openat2) answers False, and the file is filled:
    the safe direction.
    """
    try:
        with open(f"/proc/{tid}/syscall") as f:
            fields = f.read().split()
        nr = int(fields[0])
        if nr == _SYS_CREAT:
            return True
        if nr == _SYS_OPENAT:
            return bool(int(fields[3], 16) & os.O_TRUNC)
        if nr == _SYS_OPEN:
            return bool(int(fields[2], 16) & os.O_TRUNC)
    except (OSError, ValueError, IndexError):
        pass
    return False


@dataclasses.dataclass
class BridgeStats:
    events: Counter[str] = dataclasses.field(default_factory=Counter)
    denied: Counter[str] = dataclasses.field(default_factory=Counter)
    not_ours: int = 0
    resident_answers: int = 0  # answered in the receive loop: their bytes were resident
    open_fills: int = 0
    trunc_opens: int = 0
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
        # OPEN_EXEC_PERM always: exec fills the whole binary before it runs.  OPEN_PERM only
        # when open-time fill is on.
        self.mask = FAN_PRE_ACCESS | FAN_OPEN_EXEC_PERM
        if cfg.open_fill_max != 0:
            self.mask |= FAN_OPEN_PERM
        self.filesystem_mark = os.path.ismount(cache_dir)
        self.root_fd = open_private_tree(cache_dir)
        # The private door must ignore *every* permission event the marks carry, or hsmfs's own
        # open of a stub deadlocks on itself (KERNEL_FACTS_2 §1e).
        ignore_mount(self.fan_fd, self.root_fd)
        if self.filesystem_mark:
            fanotify_mark(self.fan_fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, self.mask, cache_dir)
        log.info("kernel door on %s: %s mark, mask %#x, open fill %s", cache_dir,
                 "filesystem" if self.filesystem_mark else "per-stub inode", self.mask,
                 "all files" if cfg.open_fill_max < 0 else
                 f"up to {cfg.open_fill_max} bytes" if cfg.open_fill_max else "off")

    # -- CacheListener: guard stubs, and stop guarding what is resident ------------------------

    def on_stub(self, fd: int, resident: bool) -> None:
        if not self.filesystem_mark:
            fanotify_mark_fd(self.fan_fd, FAN_MARK_ADD, self.mask, fd)
        if resident:
            self.on_resident(fd)

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
        from .holder import HolderGone

        self.cache = cache
        await self.link.ready()  # every stub is guarded: H may now tell `hsmfs serve` to return
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        ident, event, fd = await self.link.receive()
                    except HolderGone:
                        log.error("the holder is gone; stopping")
                        raise
                    if not self._answer_resident(ident, event, fd, nursery):
                        nursery.start_soon(self._handle, ident, event, fd)
        except trio.Cancelled:
            # A deliberate stop (signal, unmount): tell H not to restart us.  A crash is not a
            # stop: H sees the worker die, restarts it, and re-dispatches what it held.
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self.link.stopping()
            raise

    def _answer_resident(self, ident: int, event: Any, fd: int,
                         nursery: trio.Nursery) -> bool:
        """Answer a plain access to resident bytes right here in the receive loop: no task,
        no await.  False (nothing done) for anything else: a miss, an open, an exec, a
        truncated file, a file that is not a stub.

        A partly resident file raises an event on every read, also of local bytes (a stream
        reading what read-ahead landed, the hot pages of a big database).  Measured
        (scripts/event_cost.py): a task per such event cost ~193 us a round trip, this
        69-88 us; misses are no slower (docs/design.md, "Kernel door").
        """
        try:
            read = self._resident_read(event, fd)
        except Exception:  # nothing done yet: the task path takes it
            log.exception("cannot check %r in the receive loop; handling it as a task", event)
            return False
        if read is None:
            return False
        stub, start, stop, started = read
        os.close(fd)
        if not self.link.try_reply(ident, FAN_ALLOW):
            nursery.start_soon(self.link.reply, ident, FAN_ALLOW)  # the socket is full: wait
        self.stats_.events["access"] += 1
        self.stats_.resident_answers += 1
        self.cache.note_hit(stub, start, stop)
        self.cache.note_served(max(stop - start, 0))
        self.stats_.busy_s += time.perf_counter() - started
        return True

    def _resident_read(self, event: Any, fd: int) -> tuple[Any, int, int, float] | None:
        """``(stub, start, stop, time started)`` if the event is a plain access to resident
        bytes of a stub, else None.  The core decides what is resident
        (:meth:`StubCache.resident_now`).  Only looks."""
        assert self.cache is not None
        if event.mask & (FAN_OPEN_PERM | FAN_OPEN_EXEC_PERM) or not event.mask & FAN_PRE_ACCESS:
            return None
        started = time.perf_counter()
        st = os.fstat(fd)  # never raises an event
        stub = self.cache.stub_for_ino(st.st_ino)
        if stub is None or st.st_size < stub.size:  # not ours, or truncated: the task records it
            return None
        start, stop = _event_range(event, st.st_size)
        if not self.cache.resident_now(stub, start, stop):
            return None
        return stub, start, stop, started

    async def _handle(self, ident: int, event: Any, fd: int) -> None:
        """Answer one event exactly once, whatever happens; then close its fd."""
        started = time.perf_counter()
        response = deny_errno(errno.EIO)
        try:
            response = await self._decide(event, fd)
        except Exception:
            log.exception("unexpected failure handling event %r", event)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
            self.stats_.busy_s += time.perf_counter() - started
            with trio.CancelScope(shield=True):
                await self.link.reply(ident, response)

    async def _decide(self, event: Any, fd: int) -> int:
        assert self.cache is not None
        kind = ("exec" if event.mask & FAN_OPEN_EXEC_PERM else
                "open" if event.mask & FAN_OPEN_PERM else "access")
        self.stats_.events[kind] += 1
        st = os.fstat(fd)  # never raises an event
        stub = self.cache.stub_for_ino(st.st_ino)
        if stub is None:
            self.stats_.not_ours += 1  # a local file, or something the filesystem mark saw
            return FAN_ALLOW
        try:
            if st.st_size < stub.size:  # an application truncated it: record that off the loop
                await trio.to_thread.run_sync(self.cache.note_size, stub, st.st_size)
            if kind == "exec":
                await self.cache.ensure(stub, 0, stub.size, whole=True)
            elif kind == "open":
                limit = self.cfg.open_fill_max
                if (limit < 0 or stub.size <= limit) and stub.state not in LOCAL_STATES:
                    if opened_with_trunc(event.pid):
                        self.stats_.trunc_opens += 1
                    else:
                        self.stats_.open_fills += 1
                        await self.cache.ensure(stub, 0, stub.size, whole=True)
            else:
                start, stop = _event_range(event, st.st_size)
                await self.cache.ensure(stub, start, stop)
                # Bytes released to the application (page-rounded: the event's own range).
                self.cache.note_served(max(stop - start, 0))
            return FAN_ALLOW
        except Exception as exc:
            code = to_errno(exc)
            self.stats_.denied[errno.errorcode.get(code, str(code))] += 1
            if not isinstance(exc, (HsmError, OSError)):
                log.exception("unexpected failure on %r", stub.path)
            return deny_errno(code)

    def stats(self) -> dict[str, object]:
        out = self.stats_.as_dict()
        out["mark"] = "filesystem" if self.filesystem_mark else "inode"
        return out


def _event_range(event: Any, size: int) -> tuple[int, int]:
    """The bytes an access event asks for, clipped to the file.  Count 0 means "from offset
    to EOF" (a whole-file clone reports (0, 0)); ranges are page-rounded and not clipped to
    EOF by the kernel."""
    start = event.offset or 0
    return start, min(start + event.count if event.count else size, size)


# -- processes ---------------------------------------------------------------------------------

def _encode(opts: Options) -> str:
    return json.dumps(dataclasses.asdict(opts))


def _decode(text: str) -> Options:
    d = json.loads(text)
    return Options(
        s3=S3Config(**d["s3"]),
        cache=CacheConfig(**d["cache"]),
        kernel=KernelConfig(**d["kernel"]) if d["kernel"] else None,
        fuse=FuseConfig(**d["fuse"]) if d["fuse"] else None,
        foreground=d["foreground"],
        debug=d["debug"],
        log_file=d["log_file"],
        extra=d["extra"],
    )


def run_kernel_daemon(opts: Options, ready: Callable[[str], None]) -> int:
    """Become the holder H and supervise a worker running both doors asked for.

    Returns H's exit status.  ``ready`` is called once the first worker has every stub
    guarded (and, with a FUSE door, mounted).
    """
    from .holder import Holder

    assert opts.kernel is not None
    log_file = _current_log_file()
    worker_opts = dataclasses.replace(opts, log_file=log_file)
    argv = [sys.executable, "-m", "hsmfs.kernel_bridge", "--worker", _encode(worker_opts)]
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    holder = Holder(argv, ready_fd=write_end, watchdog=opts.kernel.watchdog_s)

    def wait_ready() -> None:
        if os.read(read_end, 1):
            what = opts.fuse.mountpoint if opts.fuse else opts.cache.cache_dir
            ready(f"kernel door guarding {opts.cache.cache_dir}"
                  + (f", FUSE door at {what}" if opts.fuse else ""))
        os.close(read_end)

    threading.Thread(target=wait_ready, name="ready", daemon=True).start()
    return holder.run()


def _current_log_file() -> str | None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return None


def worker_main(argv: list[str]) -> int:
    """W: the trio daemon with the kernel door (and the FUSE door, if asked), fed by H."""
    from . import daemon
    from .__main__ import _clear_dead_mount, _setup_logging
    from .holder import HolderLink

    opts = _decode(argv[argv.index("--worker") + 1])
    _setup_logging(opts.debug, opts.log_file)
    assert opts.kernel is not None
    link = HolderLink.from_environ()
    if opts.fuse is not None:
        # A previous worker's mount answers ENOTCONN since it died: clear it and mount again.
        _clear_dead_mount(opts.fuse.mountpoint)
    bridge = KernelBridge(opts.cache.cache_dir, opts.kernel, link)
    try:
        daemon.run(opts, lambda summary: log.info("worker serving: %s", summary), kernel=bridge)
    except HsmError as exc:
        log.error("cannot serve s3://%s/%s: %s", opts.s3.bucket, opts.s3.prefix, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
