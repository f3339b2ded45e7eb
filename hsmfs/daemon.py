"""One hsmfs daemon: list the bucket, populate the backing tree, serve the doors until stopped.

Owns the process's single trio loop and its root nursery: the cache's background work, the
control socket, the FUSE door (``pyfuse3.main``) and the kernel door run side by side in it.
Must not: parse argv (``__main__`` does), or know how a door works inside.
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
import resource
import signal
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import trio

from . import control, metrics
from .archive import Archiver, Writeback
from .backend_s3 import ObjectInfo, S3Backend
from .cache import Intent, PopulateReport, RefreshReport, StubCache, describe
from .config import Options
from .errors import HsmError, to_errno
from .keys import STATE_DIR, key_to_relpath
from .mounts import unmount_after
from .startprogress import StartProgress

log = logging.getLogger(__name__)


class KernelDoor(Protocol):
    """What the daemon needs of the kernel door (``kernel_bridge.KernelBridge``)."""

    root_fd: int

    def attach(self, cache: StubCache) -> None: ...
    def on_stub(self, fd: int, resident: bool) -> None: ...
    def on_resident(self, fd: int) -> None: ...
    async def serve(self, cache: StubCache, *, task_status: trio.TaskStatus[None]) -> None: ...
    def stats(self) -> dict[str, object]: ...


#: Listing pages (1,000 objects each) that may wait between the listing thread and the loop:
#: enough to keep the listing going while the loop is busy, few enough to bound the memory.
PAGES_AHEAD = 8


async def list_objects(backend: S3Backend, opts: Options, *, under: str | None = None,
                       wanted: Callable[[Any], bool] | None = None,
                       decide_after: trio.Event | None = None,
                       progress: StartProgress | None = None,
                       emit: trio.MemorySendChannel[list[ObjectInfo]] | None = None
                       ) -> list[ObjectInfo]:
    """The listing, in S3's order, with each object's mode from HEAD when asked.

    Pages are taken as they arrive: the listing runs in a thread that hands each page to the
    loop through a bounded channel, and the objects that need a HEAD go at once to
    ``max_connections - 1`` worker tasks fed by a bounded channel, so HEADs overlap the
    listing and at most ``max_connections`` requests (and that many tasks) exist at a time,
    whatever the bucket size.

    ``emit`` (a start): each object is handed on, in listing order, as soon as it and every
    object before it are settled (HEAD back, or none needed), in batches, then one empty batch
    once the listing is whole; the channel is closed in any case, so a consumer that gets no
    empty batch knows the listing was cut.  Nothing is kept: the returned list is empty.
    Without ``emit`` (a refresh) the result is the whole listing, as one compact list (one
    :class:`ObjectInfo` per object).

    ``under``: the full key prefix to list (a refresh of a subtree lists under a longer
    prefix than the backend's); ``wanted(version)``: whether that object needs a HEAD (only
    objects the tree does not hold at that version: a HEAD per object per start or refresh
    period would cost more than the listing); ``decide_after``: ``wanted`` can be asked only
    once this event is set (at start, when the tree scan it reads is done; objects listed
    before wait, as indices);
    ``progress``: the start's counters (:mod:`hsmfs.startprogress`), bumped as pages and HEADs
    come back.

    Nothing is persisted: a death anywhere in here leaves the tree as it was."""
    infos: list[ObjectInfo | None] = []  # None: handed on already
    counts = progress or StartProgress(None)
    head = opts.cache.head_for_mode
    page_send, page_recv = trio.open_memory_channel[list[Any]](PAGES_AHEAD)
    # Indices into ``infos``: a HEAD's answer replaces the listed entry in place.
    head_send, head_recv = trio.open_memory_channel[int](2 * opts.s3.max_connections)
    # The listing holds one of the client's connections throughout: one worker fewer, or
    # urllib3's pool (max_connections) overflows and each HEAD past it opens a new connection.
    workers = max(opts.s3.max_connections - 1, 1)
    limiter = trio.CapacityLimiter(workers)
    unsettled: set[int] = set()  # waiting for the scan's decision or for a HEAD
    handed = 0  # infos[:handed] went to ``emit``
    hand_lock = trio.Lock()

    async def hand_on() -> None:
        # Every settled object at the front, in order; from the page loop and the HEAD tasks.
        nonlocal handed
        if emit is None:
            return
        async with hand_lock:
            batch: list[ObjectInfo] = []
            while handed < len(infos) and handed not in unsettled:
                info = infos[handed]
                assert info is not None
                batch.append(info)
                infos[handed] = None
                handed += 1
            if batch:
                await emit.send(batch)

    def pump() -> None:
        # In a thread: botocore's parsing holds it, not the loop.  A closed receiver (the loop
        # side failed or was cancelled) ends the listing early.
        for page in backend.list_pages(under):
            try:
                trio.from_thread.run(page_send.send, page)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def list_all() -> None:
        async with page_send:
            await trio.to_thread.run_sync(pump)

    async def head_worker(recv: trio.MemoryReceiveChannel[int]) -> None:
        async with recv:
            async for i in recv:
                v = infos[i].version  # type: ignore[union-attr]  # unsettled: not handed on
                try:
                    infos[i] = await trio.to_thread.run_sync(backend.head, v, limiter=limiter)
                except HsmError as exc:
                    # Changed or gone between LIST and HEAD: keep the listed version; its reads
                    # will report the change.  The mode falls back to the default.
                    log.info("HEAD %r: %s; using the listing", v.key, exc)
                counts.heads_done += 1
                unsettled.discard(i)
                await hand_on()

    async def decide(i: int) -> None:
        info = infos[i]
        assert info is not None
        if wanted is None or wanted(info.version):
            counts.heads_wanted += 1
            await head_send.send(i)  # unsettled until its HEAD is back
        else:
            unsettled.discard(i)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(list_all)
            if head:
                for _ in range(workers):
                    nursery.start_soon(head_worker, head_recv.clone())
            head_recv.close()
            waiting: list[int] = []  # listed before ``decide_after``: decided once it is set
            async with head_send:
                with page_recv:
                    async for page in page_recv:
                        counts.listed += len(page)
                        for v in page:
                            infos.append(ObjectInfo(v))
                            if not head or v.key.endswith("/"):
                                continue  # no HEAD asked, or a directory marker
                            unsettled.add(len(infos) - 1)
                            if decide_after is not None and not decide_after.is_set():
                                waiting.append(len(infos) - 1)
                            else:
                                await decide(len(infos) - 1)
                        if waiting and decide_after is not None and decide_after.is_set():
                            for i in waiting:
                                await decide(i)
                            waiting.clear()
                        await hand_on()
                if waiting and decide_after is not None:
                    await decide_after.wait()
                    for i in waiting:
                        await decide(i)
            counts.listing_done = True
        if emit is not None:
            await hand_on()
            await emit.send([])  # the listing is whole
    finally:
        if emit is not None:
            emit.close()
    return [] if emit is not None else infos  # type: ignore[return-value]  # none handed on


async def start_populate(cache: StubCache, backend: S3Backend, opts: Options,
                         progress: StartProgress | None = None) -> tuple[PopulateReport, int]:
    """A start: list S3 while the tree is scanned, and make the tree follow the listing as it
    arrives (:meth:`StubCache.populate_listing`); HEAD only objects whose path does not
    already hold a stub of the listed ETag (the mode is on the stub already; a restart over a
    tree that holds every version asks nothing).  Returns populate's report and how many
    objects were listed.

    The scan persists one thing: a clean file found changed (length or mtime) is recorded
    dirty, durably, before anything looks at it (``StubCache._size_checked``), as populate's
    own scan always did; a death after that leaves it dirty, which is true.  Populate starts
    once the scan is done (it needs all of it) and places each object the listing settles;
    a listing that fails ends it before anything is removed (the failure is the listing's)."""
    found: dict[str, Any] = {}
    scanned = trio.Event()
    prefix = opts.s3.prefix
    counts = progress or StartProgress(None)

    started = time.monotonic()
    scan_s = 0.0

    async def scan() -> None:
        nonlocal scan_s
        found.update(await cache.scan())
        scan_s = time.monotonic() - started
        scanned.set()

    def wanted(version: Any) -> bool:
        rel = key_to_relpath(version.key, prefix)[0]
        f = found.get(rel) if rel else None
        return f is None or f.record is None or f.record.version.etag != version.etag

    send, recv = trio.open_memory_channel[list[ObjectInfo]](PAGES_AHEAD)
    scanned_files = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scan)
        nursery.start_soon(partial(list_objects, backend, opts, wanted=wanted,
                                   decide_after=scanned, progress=counts, emit=send))
        await scanned.wait()
        scanned_files = len(found)
        with recv:
            report = await cache.populate_listing(recv, prefix, found=found, progress=counts)
    log.info("listed %d objects and placed them in %.1f s (tree scanned in %.1f s: %d files)",
             counts.listed, time.monotonic() - started, scan_s, scanned_files)
    return report, counts.listed


class Refresher:
    """``hsmfs sync [PATH]`` and ``-o refresh=SECONDS``: list S3 (under PATH only, for a
    subtree), reconcile the tree (:meth:`StubCache.refresh`), and tell the FUSE door what
    changed so it drops its cached entries at once.  One refresh at a time (a second waits
    for the lock).  A listing that fails changes nothing: the reconcile needs all of it,
    since a path the listing does not name is a remote delete."""

    def __init__(self, cache: StubCache, backend: S3Backend, opts: Options, ops: Any,
                 archiver: Archiver) -> None:
        self.cache = cache
        self.archiver = archiver
        self.backend = backend
        self.opts = opts
        self.ops = ops
        self.lock = trio.Lock()
        #: ``-o lazy``: refresh only the listed directories (:meth:`LazyNamespace.refresh`).
        self.lazy: Any = None

    def _wanted(self, version: Any) -> bool:
        """HEAD (for the mode) only objects the tree does not hold at this version."""
        rel = key_to_relpath(version.key, self.opts.s3.prefix)[0]
        stub = self.cache.stub_at(rel) if rel else None
        return stub is None or stub.version.etag != version.etag

    def _archiving(self, stub: Any) -> bool:
        """An archive of the file is under way: S3 may hold its upload before its record
        says so, and the listing may show it (the archiver's per-file lock, by inode)."""
        return self.archiver.is_archiving(stub.ino, stub.gen)

    def _failed(self, exc: BaseException) -> None:
        stats = self.cache.refresh_stats
        stats.failures += 1
        stats.last_error = f"{time.strftime('%H:%M:%SZ', time.gmtime())} {exc}"

    async def sync(self, rel: str = "") -> RefreshReport:
        async with self.lock:
            if self.lazy is not None:
                report = RefreshReport(0)
                try:
                    await self.lazy.refresh(rel, wanted=self._wanted, busy=self._archiving,
                                            into=report)
                except Exception as exc:
                    self._failed(exc)
                    raise
                finally:
                    # The directories refreshed before a failure changed the tree: the FUSE
                    # door must still drop what it cached of them.
                    if self.ops is not None and report.changes:
                        await self.ops.namespace_changed(report.changes)
                return report
            held = self.cache.versions()  # before the listing: what it may predate
            try:
                # A subtree lists under a longer prefix than the backend's.
                objects = await list_objects(self.backend, self.opts,
                                             under=self.opts.s3.prefix + rel if rel else None,
                                             wanted=self._wanted)
            except Exception as exc:
                self._failed(exc)
                raise
            report = await self.cache.refresh(objects, self.opts.s3.prefix, rel, held=held,
                                              busy=self._archiving)
            if self.ops is not None and report.changes:
                await self.ops.namespace_changed(report.changes)
            return report

    async def run(self, period: float) -> None:
        """``-o refresh``: a sync of the whole tree every ``period`` seconds."""
        while True:
            await trio.sleep(period)
            try:
                await self.sync()
            except HsmError as exc:
                log.warning("refresh: cannot list s3://%s/%s (%s); nothing changed, next try "
                            "in %g s", self.opts.s3.bucket, self.opts.s3.prefix, exc, period)
            except Exception:
                log.exception("refresh failed; next try in %g s", period)


def _restarted_worker() -> bool:
    """Whether the holder started this process as a replacement for a worker that died after
    one was ready.  Before that the tree may be half built (a worker killed in the middle of
    its first populate): a replacement then lists S3 and populates like a first start, or
    the objects it had not reached yet would be missing until the next sync."""
    try:
        restart = int(os.environ.get("HSMFS_WORKER_GENERATION", "1")) > 1
    except ValueError:
        return False
    return restart and os.environ.get("HSMFS_WORKER_TREE_READY", "1") != "0"


def _raise_nofile_limit() -> None:
    """Open files are the daemon's working set (cached backing fds, event fds): use the hard
    limit, not the soft default of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            log.info("cannot raise the open-file limit from %d: %s", soft, exc)


async def serve(opts: Options, *, ready: Callable[[str], None],
                kernel: KernelDoor | None = None) -> None:
    started = time.monotonic()
    _raise_nofile_limit()
    backend = S3Backend(opts.s3)
    cache = StubCache(opts.cache, backend, kernel.root_fd if kernel else None)
    if kernel is not None:
        kernel.attach(cache)
        cache.listeners.append(kernel)
    # The command waiting for this start draws these counts (on a terminal only).
    progress = StartProgress.from_environ()
    progress.start()
    report: PopulateReport | None = None
    listed: int | None = None
    if _restarted_worker():
        # A worker restarted by the holder adopts the tree as it is: guarding what exists
        # needs no S3 (which may be what just failed), and a listing could replace files that
        # programs still hold (they stay served as superseded stubs, but need not be).
        log.info("restarted worker: adopting %s without listing S3", opts.cache.cache_dir)
    elif opts.cache.lazy:
        # -o lazy: adopt what is on disk (stubs of directories listed by an earlier run, local
        # files) and list nothing; each directory is listed at its first lookup (hsmfs.lazy).
        log.info("lazy: adopting %s without listing S3; directories are listed as they are "
                 "looked up", opts.cache.cache_dir)
    else:
        log.info("listing s3://%s/%s", opts.s3.bucket, opts.s3.prefix)
        report, listed = await start_populate(cache, backend, opts, progress)
    if report is None:
        report = await cache.populate(None, opts.s3.prefix)  # adopt the tree as it is
    progress.phase = "guarding" if kernel is not None else "mounting"
    # Now, not at the next tick: the kernel door tells the holder it is ready from inside
    # kernel.serve, before this function's ready(); the waiting command stops reading then.
    progress.send()
    archiver = Archiver(cache, backend, opts.s3.prefix)
    ops = None
    lazy = None
    if opts.fuse is not None:
        from .ops import Operations  # pyfuse3 only where a FUSE door is asked for

        ops = Operations(cache, opts.fuse)
        if opts.cache.lazy:
            from .lazy import LazyNamespace

            ops.lazy = lazy = LazyNamespace(cache, backend, opts.s3.prefix,
                                            head=opts.cache.head_for_mode,
                                            connections=opts.s3.max_connections)
    writeback = Writeback(archiver, opts.cache.writeback_s,
                          ops.writing if ops is not None else None) \
        if opts.cache.writeback_s > 0 else None
    refresher = Refresher(cache, backend, opts, ops, archiver)
    refresher.lazy = lazy
    evictor = None
    if opts.cache.cache_size > 0 or opts.cache.min_free_pct > 0:
        from .evict import Evictor

        # min_free alone: no byte budget, only the filesystem's free share.
        evictor = cache.evictor = Evictor(cache, opts.cache.cache_size or 1 << 62,
                                          opts.cache.min_free_pct)

    async def handle(request: dict[str, Any]) -> dict[str, Any]:
        match request.get("cmd"):
            case "stats":
                usage = resource.getrusage(resource.RUSAGE_SELF)
                out: dict[str, Any] = {
                    "pid": os.getpid(),
                    "uptime_s": round(time.monotonic() - started, 3),
                    "daemon_cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
                    **cache.stats(),
                    "resident_bytes": metrics.resident_bytes(cache.registry.by_path.values()),
                }
                if ops is not None:
                    out["fuse"] = ops.stats()
                if kernel is not None:
                    out["kernel"] = kernel.stats()
                if lazy is not None:
                    out["lazy"] = lazy.stats.as_dict()
                if writeback is not None:
                    out["writeback"] = writeback.snapshot()
                if evictor is not None:
                    out.update(evictor.snapshot())
                return out
            case "state":
                # stat, xattrs and SEEK_DATA scans: disk work, off the loop.
                paths = list(request.get("paths", []))
                states = await trio.to_thread.run_sync(
                    lambda: [_state(cache, p) for p in paths])
                return {"states": states}
            case "restore":
                return {"states": [await _restore(cache, p) for p in request.get("paths", [])]}
            case "archive":
                rows = await archiver.run([str(p) for p in request.get("paths", [])],
                                          delete=bool(request.get("delete")),
                                          dry_run=bool(request.get("dry_run")))
                return {"files": rows}
            case "release":
                paths = [str(p) for p in request.get("paths", [])]
                dry_run = bool(request.get("dry_run"))
                return {"files": [await _release(cache, rel, dry_run)
                                  for p in paths for rel in _stub_paths(cache, p)]}
            case "pin" | "unpin":
                pinned = request["cmd"] == "pin"
                return {"files": [await _pin(cache, rel, pinned)
                                  for p in request.get("paths", [])
                                  for rel in _stub_paths(cache, str(p))]}
            case "resolve":
                keep = request.get("mode") == "keep-local"
                discard = bool(request.get("discard"))
                rows = []
                for p in request.get("paths", []):
                    for rel in _stub_paths(cache, str(p)):
                        rows.append(await _resolve(cache, backend, ops, rel, keep, discard))
                return {"files": rows}
            case "sync":
                path = os.path.normpath(str(request.get("path") or "."))
                rel = "" if path == "." else path
                if os.path.isabs(rel) or rel.split("/")[0] in ("..", STATE_DIR):
                    return {"error": f"{rel!r} is not a path in the tree"}
                waited = refresher.lock.locked()  # one sync at a time: this one waits its turn
                try:
                    report = await refresher.sync(rel)
                except HsmError as exc:
                    return {"error": f"cannot list s3://{opts.s3.bucket}/{opts.s3.prefix}{rel}"
                                     f": {exc}; nothing changed"}
                return {"listed": report.listed, "counts": report.counts(), "waited": waited,
                        "rejected": report.rejected,
                        "changes": [{"kind": c.kind, "path": c.path, "detail": c.detail}
                                    for c in report.changes]}
            case "archive_progress":
                # Polled by `hsmfs archive` on a terminal while its own request runs.
                return {"progress": {k: list(v) for k, v in archiver.progress.items()}}
            case other:
                return {"error": f"unknown command {other!r}"}

    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        await nursery.start(control.serve, opts.cache.cache_dir, handle)
        if opts.metrics:
            await nursery.start(metrics.serve, opts.metrics, lambda: handle({"cmd": "stats"}))
        if kernel is not None:
            await nursery.start(kernel.serve, cache)
        if writeback is not None:
            await nursery.start(writeback.run)
        if evictor is not None:
            await nursery.start(evictor.run)
        if opts.cache.refresh_s > 0:
            nursery.start_soon(refresher.run, opts.cache.refresh_s, name="refresh")
        stop = trio.Event()
        nursery.start_soon(_watch_signals, stop, ops is not None)
        if ops is not None:
            await _start_fuse(nursery, ops, opts, stop)
        summary = (f"{listed if listed is not None else 'no listing:'} objects, "
                   f"{report.created} new stubs, {report.kept} kept, {report.replaced} replaced, "
                   f"{report.stale} stale, {report.conflicts} conflicts, "
                   f"{len(report.rejected)} refused keys")
        log.info("serving: %s", summary)
        progress.finish()
        ready(summary)
        await stop.wait()
        log.info("stopping")
        nursery.cancel_scope.cancel()
    cache.close()


_fuse_session_open = False
#: How long a new mount may take to answer its first request.  It is answered by this very loop
#: once the kernel's INIT is processed (milliseconds); a mount that never answers must not
#: leave `hsmfs mount` waiting for ever.
MOUNT_ANSWER_TIMEOUT_S = 30.0
# trio >= 0.23 renamed to_thread.run_sync's `cancellable`; we support both (pyfuse3 allows 0.22).
_ABANDON_ON_CANCEL = (
    {"abandon_on_cancel": True}
    if "abandon_on_cancel" in inspect.signature(trio.to_thread.run_sync).parameters
    else {"cancellable": True}
)


async def _start_fuse(nursery: trio.Nursery, ops: Any, opts: Options, stop: trio.Event) -> None:
    """Mount, start serving, and return once the mount answers with 1 MiB read-ahead."""
    global _fuse_session_open
    import pyfuse3

    from .ops import mount_options, raise_read_ahead

    assert opts.fuse is not None
    pyfuse3.init(ops, opts.fuse.mountpoint, mount_options(opts.fuse))
    _fuse_session_open = True

    async def fuse_main() -> None:
        try:
            await pyfuse3.main()  # returns when unmounted, or after pyfuse3.terminate()
        finally:
            stop.set()

    nursery.start_soon(fuse_main, name="fuse")
    # The kernel sets the mount's read-ahead from our INIT reply, overwriting anything written
    # before it.  A stat is the first request after INIT: once it returns, INIT is done, the
    # value we write stays, and the mount is known to serve.
    with trio.move_on_after(MOUNT_ANSWER_TIMEOUT_S):
        await trio.to_thread.run_sync(os.stat, opts.fuse.mountpoint, **_ABANDON_ON_CANCEL)
        raise_read_ahead(opts.fuse.mountpoint, opts.fuse.read_ahead_kb)
        return
    # The abandoned stat thread is released when the session closes (the unmount answers it).
    raise OSError(errno.ETIMEDOUT, f"the new FUSE mount did not answer a stat within "
                  f"{MOUNT_ANSWER_TIMEOUT_S:.0f} s", opts.fuse.mountpoint)


def run(opts: Options, ready: Callable[[str], None], kernel: KernelDoor | None = None) -> None:
    """Run :func:`serve` on a new trio loop; close the FUSE session (unmounting if it is still
    mounted) however the loop ends.  pyfuse3.close() on a session never opened would crash."""
    global _fuse_session_open
    try:
        trio.run(lambda: serve(opts, ready=ready, kernel=kernel))
    finally:
        if _fuse_session_open and opts.fuse is not None:
            import pyfuse3

            _fuse_session_open = False
            pyfuse3.close(unmount=unmount_after(opts.fuse.mountpoint))


async def _watch_signals(stop: trio.Event, fuse: bool) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: shutting down", signum)
            stop.set()
            if fuse:
                import pyfuse3

                pyfuse3.terminate()
            return


def _state(cache: StubCache, path: str) -> dict[str, Any]:
    rel = os.path.relpath(os.path.abspath(path), cache.cfg.cache_dir) if os.path.isabs(
        path) else path
    stub = cache.stub_at(rel)
    if stub is None:
        return describe(os.path.join(cache.cfg.cache_dir, rel))
    state, resident = cache.state_of(stub)
    row = {"path": path, "state": state, "residency": stub.residency, "sync": stub.sync,
           "size": stub.size, "remote_size": stub.version.size, "resident_bytes": resident,
           "key": stub.version.key, "etag": stub.version.etag}
    if stub.remote is not None:
        row["remote_etag"] = None if stub.remote == "-" else stub.remote
    row["pinned"] = stub.pinned
    return row


def _errno_said(exc: BaseException) -> str:
    """A failure as the command line shows it: the errno a program would get, and why."""
    return f"{errno.errorcode.get(to_errno(exc), 'EIO')}: {exc}"


async def _make_resident(cache: StubCache, stub: Any) -> None:
    """The whole file, through the same engine as any read (``restore``, ``pin``)."""
    pin = await cache.ensure(stub, 0, stub.size, Intent.WHOLE)
    pin.release()


async def _restore(cache: StubCache, path: str) -> dict[str, Any]:
    """Make a file resident."""
    stub = cache.stub_at(path)
    if stub is None:
        return {"path": path, "error": "not a stub of this cache"}
    try:
        await _make_resident(cache, stub)
    except Exception as exc:
        return {"path": path, "error": _errno_said(exc)}
    return _state(cache, path)


def _stub_paths(cache: StubCache, path: str) -> list[str]:
    """``path`` (relative to the cache root), or every stub below it if it is a directory."""
    rel = os.path.normpath(path) if path not in ("", ".") else ""
    if cache.stub_at(rel) is not None or not os.path.isdir(
            os.path.join(cache.cfg.cache_dir, rel)):
        return [rel]
    below = "" if rel == "" else rel + "/"
    return sorted(s.path for s in cache.stubs() if s.path.startswith(below)) or [rel]


async def _release(cache: StubCache, rel: str, dry_run: bool) -> dict[str, Any]:
    """``hsmfs release``: one row per file (what it freed, or why not)."""
    stub = cache.stub_at(rel)
    if stub is None:
        why = ("a directory with no stubs" if os.path.isdir(os.path.join(cache.cfg.cache_dir, rel))
               else "not a stub of this cache (a local file: S3 has no copy to fetch back)")
        return {"path": rel, "result": "refused", "detail": why, "errno": errno.EPERM}
    try:
        done = await cache.release(stub, dry_run=dry_run)
    except Exception as exc:
        return {"path": rel, "result": "failed",
                "detail": _errno_said(exc)}
    row: dict[str, Any] = {"path": rel, "result": done.result, "detail": done.detail,
                           "resident_bytes": done.resident_bytes, "freed": done.freed}
    if done.errno:
        row["errno"] = done.errno
        row["detail"] = f"{errno.errorcode[done.errno]}: {done.detail}"
    return row


async def _resolve(cache: StubCache, backend: S3Backend, ops: Any, rel: str, keep_local: bool,
                   discard: bool) -> dict[str, Any]:
    """``hsmfs resolve``: one row per file (:mod:`hsmfs.resolve`)."""
    from .cache import REFRESHED, REMOVED, Change
    from .resolve import resolve

    stub = cache.stub_at(rel)
    if stub is None:
        return {"path": rel, "result": "refused", "errno": errno.EPERM,
                "detail": "EPERM: not a stub of this cache (a local file has nothing to resolve)"}
    try:
        head = await trio.to_thread.run_sync(backend.head_key, stub.version.key)
        done = await resolve(cache, stub, head, keep_local=keep_local, discard=discard)
    except Exception as exc:
        return {"path": rel, "result": "failed",
                "detail": _errno_said(exc)}
    if done.inodes is not None and ops is not None:
        old, new = done.inodes
        await ops.namespace_changed([Change(REFRESHED if new else REMOVED, rel, old, new)])
    return done.row(rel)


async def _pin(cache: StubCache, rel: str, pinned: bool) -> dict[str, Any]:
    """``hsmfs pin`` (durable, then the file made resident like ``hsmfs restore``: pin means
    keep local) / ``hsmfs unpin``."""
    stub = cache.stub_at(rel)
    if stub is None:
        return {"path": rel, "result": "refused",
                "detail": "not a stub of this cache (a local file is never released anyway)"}
    try:
        await cache.set_pinned(stub, pinned)
        if pinned and not stub.local and stub.fetchable:
            await _make_resident(cache, stub)
    except Exception as exc:
        return {"path": rel, "result": "failed",
                "detail": _errno_said(exc)}
    state, resident = cache.state_of(stub)
    return {"path": rel, "result": "pinned" if pinned else "unpinned", "state": state,
            "resident_bytes": resident, "size": stub.size}
