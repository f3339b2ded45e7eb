"""One hsmfs daemon: list the bucket, populate the backing tree, serve the doors until stopped.

Owns the process's single trio loop and its root nursery: the cache's background work, the
control socket, the FUSE door (``pyfuse3.main``) and the kernel door run side by side in it.
Must not: parse argv (``__main__`` does), or know how a door works inside.
"""

from __future__ import annotations

import dataclasses
import errno
import inspect
import logging
import os
import resource
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

import trio

from . import control
from .archive import Archiver, Writeback
from .backend_s3 import ObjectInfo, S3Backend
from .cache import Intent, RefreshReport, StubCache, describe
from .config import Options
from .errors import HsmError, to_errno
from .keys import STATE_DIR, key_to_relpath
from .mounts import unmount_after

log = logging.getLogger(__name__)


class KernelDoor(Protocol):
    """What the daemon needs of the kernel door (``kernel_bridge.KernelBridge``)."""

    root_fd: int

    def attach(self, cache: StubCache) -> None: ...
    def on_stub(self, fd: int, resident: bool) -> None: ...
    def on_resident(self, fd: int) -> None: ...
    async def serve(self, cache: StubCache, *, task_status: trio.TaskStatus[None]) -> None: ...
    def stats(self) -> dict[str, object]: ...


async def list_objects(backend: S3Backend, opts: Options, *, lister: S3Backend | None = None,
                       wanted: Callable[[Any], bool] | None = None) -> list[ObjectInfo]:
    """The listing, with each object's mode from HEAD when asked (concurrently, in threads).

    ``lister``: the backend to list with (a refresh of a subtree lists under a longer
    prefix); ``wanted(version)``: whether that object needs a HEAD (a refresh asks only for
    objects it does not hold at that version: a HEAD per object per period would cost more
    than the listing)."""
    versions = await trio.to_thread.run_sync(lambda: list((lister or backend).list()))
    if not opts.cache.head_for_mode:
        return [ObjectInfo(v) for v in versions]
    infos: dict[str, ObjectInfo] = {}
    limiter = trio.CapacityLimiter(opts.s3.max_connections)

    async def head_one(v: Any) -> None:
        try:
            infos[v.key] = await trio.to_thread.run_sync(backend.head, v, limiter=limiter)
        except HsmError as exc:
            # Changed or gone between LIST and HEAD: keep the listed version; its reads will
            # report the change.  The mode falls back to the default.
            log.info("HEAD %r: %s; using the listing", v.key, exc)
            infos[v.key] = ObjectInfo(v)

    async with trio.open_nursery() as nursery:
        for v in versions:
            if v.key.endswith("/") or (wanted is not None and not wanted(v)):
                infos[v.key] = ObjectInfo(v)  # directory marker, or held: nothing to ask
            else:
                nursery.start_soon(head_one, v)
    return [infos[v.key] for v in versions]


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

    def _wanted(self, version: Any) -> bool:
        """HEAD (for the mode) only objects the tree does not hold at this version."""
        rel = key_to_relpath(version.key, self.opts.s3.prefix)[0]
        stub = self.cache.stub_at(rel) if rel else None
        return stub is None or stub.version.etag != version.etag

    def _archiving(self, stub: Any) -> bool:
        """An archive of the file is under way: S3 may hold its upload before its record
        says so, and the listing may show it (the archiver's per-file lock, by inode)."""
        lock = self.archiver._locks.get((stub.ino, stub.gen))
        return lock is not None and lock.locked()

    async def sync(self, rel: str = "") -> RefreshReport:
        async with self.lock:
            held = self.cache.versions()  # before the listing: what it may predate
            try:
                lister = self.backend
                if rel:
                    # The backend lists under its own prefix; a subtree lists under a longer
                    # one (a client of its own: one more connection pool for one listing).
                    sub = dataclasses.replace(self.opts.s3, prefix=self.opts.s3.prefix + rel)
                    lister = await trio.to_thread.run_sync(S3Backend, sub)
                objects = await list_objects(self.backend, self.opts, lister=lister,
                                             wanted=self._wanted)
            except Exception as exc:
                stats = self.cache.refresh_stats
                stats.failures += 1
                stats.last_error = f"{time.strftime('%H:%M:%SZ', time.gmtime())} {exc}"
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
    objects: list[ObjectInfo] | None = None
    if _restarted_worker():
        # A worker restarted by the holder adopts the tree as it is: guarding what exists
        # needs no S3 (which may be what just failed), and a listing could replace files that
        # programs still hold (they stay served as superseded stubs, but need not be).
        log.info("restarted worker: adopting %s without listing S3", opts.cache.cache_dir)
    else:
        log.info("listing s3://%s/%s", opts.s3.bucket, opts.s3.prefix)
        objects = await list_objects(backend, opts)
    report = await cache.populate(objects, opts.s3.prefix)
    archiver = Archiver(cache, backend, opts.s3.prefix)
    ops = None
    if opts.fuse is not None:
        from .ops import Operations  # pyfuse3 only where a FUSE door is asked for

        ops = Operations(cache, opts.fuse)
    writeback = Writeback(archiver, opts.cache.writeback_s,
                          ops.writing if ops is not None else None) \
        if opts.cache.writeback_s > 0 else None
    refresher = Refresher(cache, backend, opts, ops, archiver)

    async def handle(request: dict[str, Any]) -> dict[str, Any]:
        match request.get("cmd"):
            case "stats":
                usage = resource.getrusage(resource.RUSAGE_SELF)
                out: dict[str, Any] = {
                    "pid": os.getpid(),
                    "uptime_s": round(time.monotonic() - started, 3),
                    "daemon_cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
                    **cache.stats(),
                }
                if ops is not None:
                    out["fuse"] = ops.stats()
                if kernel is not None:
                    out["kernel"] = kernel.stats()
                if writeback is not None:
                    out["writeback"] = writeback.snapshot()
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
        if kernel is not None:
            await nursery.start(kernel.serve, cache)
        if writeback is not None:
            await nursery.start(writeback.run)
        if opts.cache.refresh_s > 0:
            nursery.start_soon(refresher.run, opts.cache.refresh_s, name="refresh")
        stop = trio.Event()
        nursery.start_soon(_watch_signals, stop, ops is not None)
        if ops is not None:
            await _start_fuse(nursery, ops, opts, stop)
        summary = (f"{len(objects) if objects is not None else 'no listing:'} objects, "
                   f"{report.created} new stubs, {report.kept} kept, {report.replaced} replaced, "
                   f"{report.stale} stale, {report.conflicts} conflicts, "
                   f"{len(report.rejected)} refused keys")
        log.info("serving: %s", summary)
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


async def _restore(cache: StubCache, path: str) -> dict[str, Any]:
    """Make a file resident (the whole file, through the same engine as any read)."""
    stub = cache.stub_at(path)
    if stub is None:
        return {"path": path, "error": "not a stub of this cache"}
    try:
        pin = await cache.ensure(stub, 0, stub.size, Intent.WHOLE)
        pin.release()
    except Exception as exc:
        return {"path": path, "error": f"{errno.errorcode.get(to_errno(exc), 'EIO')}: {exc}"}
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
                "detail": f"{errno.errorcode.get(to_errno(exc), 'EIO')}: {exc}"}
    row: dict[str, Any] = {"path": rel, "result": done.result, "detail": done.detail,
                           "resident_bytes": done.resident_bytes, "freed": done.freed}
    if done.errno:
        row["errno"] = done.errno
        row["detail"] = f"{errno.errorcode[done.errno]}: {done.detail}"
    return row


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
            pin = await cache.ensure(stub, 0, stub.size, Intent.WHOLE)
            pin.release()
    except Exception as exc:
        return {"path": rel, "result": "failed",
                "detail": f"{errno.errorcode.get(to_errno(exc), 'EIO')}: {exc}"}
    state, resident = cache.state_of(stub)
    return {"path": rel, "result": "pinned" if pinned else "unpinned", "state": state,
            "resident_bytes": resident, "size": stub.size}
