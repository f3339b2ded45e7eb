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
from typing import Any, Protocol

import trio

from . import control
from .archive import Archiver, Writeback
from .backend_s3 import ObjectInfo, S3Backend
from .cache import Intent, StubCache, describe
from .config import Options
from .errors import HsmError, to_errno
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


async def list_objects(backend: S3Backend, opts: Options) -> list[ObjectInfo]:
    """The listing, with each object's mode from HEAD when asked (concurrently, in threads)."""
    versions = await trio.to_thread.run_sync(lambda: list(backend.list()))
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
            if v.key.endswith("/"):
                infos[v.key] = ObjectInfo(v)  # directory marker: nothing to ask
            else:
                nursery.start_soon(head_one, v)
    return [infos[v.key] for v in versions]


def _restarted_worker() -> bool:
    """Whether the holder started this process as a replacement for a worker that died."""
    try:
        return int(os.environ.get("HSMFS_WORKER_GENERATION", "1")) > 1
    except ValueError:
        return False


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
