"""``-o lazy``: the namespace listed from S3 one directory at a time (FUSE door only).

At start the daemon lists nothing: it adopts the tree as it is on disk (the restart path,
:meth:`StubCache.populate` with no listing), so a bucket of millions of objects mounts at
once.  A directory is listed on its first ``lookup`` in it or ``opendir`` of it (the FUSE door
asks :meth:`LazyNamespace.ensure` first): ListObjectsV2 with ``Prefix=<dir>/`` and
``Delimiter=/``, every page; its objects become stubs (transition *create*, made and guarded
in staging by :meth:`Tree.create_stub`) and its common prefixes directories.

Why only the FUSE door: the kernel door serves the backing tree itself, so a program opens
files there without any lookup hsmfs could answer first; every stub must exist before anyone
can open it.  ``-o lazy`` is refused with it (:data:`hsmfs.config.LAZY_KERNEL`).

Rules (the same as populate's and refresh's for a new object):

* A path that holds anything already (a stub adopted at start, a local file, a directory, a
  file a program made in the directory before the listing reached it) is kept as it is: a
  listing only adds.  ``create_stub`` links with EEXIST, never over a file that appeared
  meanwhile.  Remote changes to files that exist are ``hsmfs sync PATH``'s job.
* A key removed here (a tombstone of that key and ETag, ``.hsmfs/removed.log``) or renamed here
  (a stub elsewhere carries that key and ETag) is not made again.
* Keys that cannot be paths are refused one by one (:func:`hsmfs.keys.key_to_relpath`), and an
  object that is also a prefix of other keys yields to the directory (as :func:`place`).

State: in memory (a set of listed directories) and durable as ``trusted.hsmfs.listed`` (the
time of the listing) on the backing directory, written only after every child exists and the
directory is fsync'd.  A crash in the middle leaves the directory unmarked: it is listed again
at its next lookup, and what the first listing made is kept (a no-op).  A restart reads the
mark on the first lookup of each directory and lists nothing that carries it.

Concurrency: one listing per directory at a time (a ``trio.Lock`` per directory; who waits
finds it listed).  A failure (S3, or a stub that cannot be made) fails the lookup or opendir
with the errno of :func:`hsmfs.errors.to_errno`; the directory stays unmarked (the stubs made
before the failure are complete and kept) and is tried again at the next lookup.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from .keys import STATE_DIR, key_to_relpath

if TYPE_CHECKING:
    from .backend_s3 import ObjectInfo, ObjectVersion, S3Backend
    from .cache import RefreshReport, StubCache

log = logging.getLogger(__name__)

#: The durable mark of a listed directory (on the backing directory; hidden from the mount
#: with every ``trusted.hsmfs.*`` name).
LISTED = "trusted.hsmfs.listed"


@dataclass
class LazyStats:
    dirs_listed: int = 0  # listings this daemon made
    dirs_adopted: int = 0  # directories found marked (listed by an earlier run)
    objects: int = 0  # objects the listings named
    created: int = 0
    kept: int = 0  # a path that held something already
    removed_locally: int = 0  # tombstoned or renamed here: not made again
    refused: int = 0  # keys that cannot be paths here
    failures: int = 0
    last_error: str | None = None
    seconds: float = 0.0  # spent listing, in total

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass
class _Plan:
    subdirs: list[str] = field(default_factory=list)
    files: list[tuple[str, Any]] = field(default_factory=list)  # (rel, ObjectInfo)


class LazyNamespace:
    def __init__(self, cache: StubCache, backend: S3Backend, prefix: str, *, head: bool,
                 connections: int) -> None:
        self.cache = cache
        self.backend = backend
        self.prefix = prefix
        self.head = head
        self._limiter = trio.CapacityLimiter(max(connections - 1, 1))
        self._listed: set[str] = set()
        self._locks: dict[str, trio.Lock] = {}
        self.stats = LazyStats()

    # -- queries -----------------------------------------------------------------------------

    def _open_dir(self, rel: str) -> int:
        return os.open(rel or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=self.cache.root_fd)

    def _marked(self, rel: str) -> bool:
        """Whether the backing directory carries the durable mark.  Blocking."""
        fd = self._open_dir(rel)
        try:
            os.getxattr(fd, LISTED)
            return True
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                return False
            raise
        finally:
            os.close(fd)

    async def is_listed(self, rel: str) -> bool:
        """Listed, by this daemon or an earlier one (``hsmfs sync PATH`` asks)."""
        if rel in self._listed:
            return True
        try:
            return await trio.to_thread.run_sync(self._marked, rel)
        except OSError:
            return False  # absent, or not a directory

    def forget(self, rel: str) -> None:
        """``rel`` was renamed or removed (the FUSE door): its in-memory state and its
        descendants' go; the marks travel with the directories and are read again."""
        self._listed.discard(rel)
        below = f"{rel}/"
        self._listed.difference_update([p for p in self._listed if p.startswith(below)])

    # -- the listing -------------------------------------------------------------------------

    async def ensure(self, rel: str) -> None:
        """Make sure directory ``rel`` ("" for the root) has been listed; list it if not.
        Raises what the listing raised (the caller answers :func:`to_errno` of it)."""
        if rel in self._listed:
            return
        lock = self._locks.setdefault(rel, trio.Lock())
        async with lock:
            if rel in self._listed:
                return  # listed while this one waited
            if await trio.to_thread.run_sync(self._marked, rel):
                self.stats.dirs_adopted += 1
            else:
                started = time.monotonic()
                try:
                    await self._list(rel)
                except BaseException as exc:
                    if isinstance(exc, Exception):
                        self.stats.failures += 1
                        self.stats.last_error = (f"{time.strftime('%H:%M:%SZ', time.gmtime())} "
                                                 f"{rel or '.'}: {exc}")
                        log.warning("lazy: cannot list %r: %s; tried again at its next lookup",
                                    rel or ".", exc)
                    raise
                finally:
                    self.stats.seconds += time.monotonic() - started
            self._listed.add(rel)
        # Listed: whoever still waits on this lock finds it so; newcomers never take it.
        self._locks.pop(rel, None)

    async def _list(self, rel: str) -> None:
        dir_prefix = f"{self.prefix}{rel}/" if rel else self.prefix
        objects, prefixes = await trio.to_thread.run_sync(self.backend.list_dir, dir_prefix,
                                                          limiter=self._limiter)
        self.stats.objects += len(objects)
        # Stubs renamed here carry their key elsewhere: a snapshot of the index, read in a
        # thread (the loop only copies the list).
        stubs = list(self.cache.registry.by_ino.values())
        plan = await trio.to_thread.run_sync(self._plan, rel, objects, prefixes, stubs)
        files = plan.files
        if self.head and files:
            files = await self._heads(files)
        created: list[tuple[str, Any, int, int]] = []
        error: BaseException | None = None
        try:
            await trio.to_thread.run_sync(self._create, files, created)
        except Exception as exc:  # re-raised below, once the index follows
            error = exc
        for r, v, ino, gen in created:
            self.cache.index_new(r, v, ino, gen)
        self.stats.created += len(created)
        if error is not None:
            raise error
        await trio.to_thread.run_sync(self._mark, rel)
        self.stats.dirs_listed += 1
        log.info("lazy: listed %r: %d objects, %d subdirectories, %d new stubs", rel or ".",
                 len(objects), len(prefixes), len(created))

    def _plan(self, rel: str, objects: list[ObjectVersion], prefixes: list[str],
              stubs: list[Any]) -> _Plan:
        """Worker thread: what the listing adds (directories made here; files decided)."""
        plan = _Plan()
        for p in prefixes:
            r, reason = key_to_relpath(p, self.prefix)
            if r is None:
                self.stats.refused += 1
                log.warning("skipping prefix %r: key %s", p, reason)
                continue
            plan.subdirs.append(r.rstrip("/"))
        dirs = set(plan.subdirs)
        tombs = self.cache.tombstones.load() if objects else {}
        away = {s.version.key: s.version.etag for s in stubs
                if not s.superseded and key_to_relpath(s.version.key, self.prefix)[0] != s.path}
        from .backend_s3 import ObjectInfo

        for v in objects:
            r, reason = key_to_relpath(v.key, self.prefix)
            if r is None:
                self.stats.refused += 1
                log.warning("skipping object %r: key %s", v.key, reason)
                continue
            if r.endswith("/"):
                continue  # a directory marker (this directory's own)
            if r in dirs:
                self.stats.refused += 1
                log.warning("skipping object %r: key is both an object and a prefix of other "
                            "keys", v.key)
                continue
            tomb = tombs.get(v.key)
            if (tomb is not None and tomb.etag == v.etag) or away.get(v.key) == v.etag:
                self.stats.removed_locally += 1
                continue  # removed or renamed here: archive --delete makes S3 follow
            try:
                os.stat(r, dir_fd=self.cache.root_fd, follow_symlinks=False)
                self.stats.kept += 1
                continue  # something is there: kept as it is (a listing only adds)
            except FileNotFoundError:
                pass
            plan.files.append((r, ObjectInfo(v)))
        for d in plan.subdirs:
            self.cache.tree.mkdir(d)  # an existing directory or a local file: left as it is
        return plan

    async def _heads(self, files: list[tuple[str, ObjectInfo]]) -> list[tuple[str, ObjectInfo]]:
        """``-o head``: the mode of each new file from HEAD, as a start does (overlapped),
        from as many worker tasks as the limiter has slots, never one task per file (a
        directory of 100,000 objects would make 100,000 waiting tasks: ~600 MB at start)."""
        out = list(files)
        send, recv = trio.open_memory_channel[int](0)

        async def worker(indices: trio.MemoryReceiveChannel[int]) -> None:
            async with indices:
                async for i in indices:
                    r, info = out[i]
                    try:
                        out[i] = (r, await trio.to_thread.run_sync(
                            self.backend.head, info.version, limiter=self._limiter))
                    except Exception as exc:  # the listing's version, default mode
                        log.info("HEAD %r: %s; using the listing", info.version.key, exc)

        async with trio.open_nursery() as nursery:
            for _ in range(min(int(self._limiter.total_tokens), len(out))):
                nursery.start_soon(worker, recv.clone())
            recv.close()
            async with send:
                for i in range(len(out)):
                    await send.send(i)
        return out

    def _create(self, files: list[tuple[str, Any]],
                created: list[tuple[str, Any, int, int]]) -> None:
        """Worker thread: transition *create* per file; ``created`` grows as stubs are made
        (the caller indexes them even if a later one fails)."""
        guard = self.cache._guard
        tree = self.cache.tree
        for r, info in files:
            v = info.version
            if not tree.parents_are_dirs(r):
                log.warning("skipping object %r: a parent of %r is not a directory", v.key, r)
                continue
            try:
                ino, gen = tree.create_stub(r, v, info.mode, guard(v.size == 0))
            except FileExistsError:
                self.stats.kept += 1  # a program made that name since the plan: kept
                continue
            created.append((r, v, ino, gen))

    # -- refresh (hsmfs sync, -o refresh) ----------------------------------------------------

    def _listed_under(self, rel: str) -> list[str]:
        """Worker thread: the listed directories at or below ``rel`` (in memory, or marked on
        disk by an earlier run), parents first.  A walk of the backing directories: in lazy
        mode only what was listed has children."""
        out = []
        try:
            top = self._open_dir(rel)
        except OSError:
            return []
        try:
            for dirpath, dirnames, _files, dfd in os.fwalk(".", dir_fd=top):
                d = os.path.normpath(os.path.join(rel, dirpath)) if rel else \
                    os.path.normpath(dirpath)
                d = "" if d == "." else d
                if d == "":
                    dirnames[:] = [n for n in dirnames if n != STATE_DIR]
                listed = d in self._listed
                if not listed:
                    try:
                        os.getxattr(dfd, LISTED)
                        listed = True
                    except OSError:
                        pass
                if listed:
                    out.append(d)
        finally:
            os.close(top)
        return out

    async def refresh(self, rel: str, *, wanted: Any, busy: Any,
                      into: RefreshReport | None = None) -> RefreshReport:
        """A refresh of the listed directories at or below ``rel`` only: each is listed again
        (Delimiter=/) and its files reconciled by the refresh's rules
        (:meth:`StubCache.refresh`, ``shallow``); its new subdirectories are made (listed at
        their first lookup).  A directory not listed stays so: a refresh never makes the
        bucket eager.  ``rel`` a file: that file only, from its directory's listing.
        ``into``: the report to add to, which keeps what the directories refreshed before a
        failure changed (the caller still tells the FUSE door)."""
        from .backend_s3 import ObjectInfo
        from .cache import RefreshReport

        report = into if into is not None else RefreshReport(0)
        is_file = rel and not await trio.to_thread.run_sync(self._is_dir, rel)
        dirs = [os.path.dirname(rel)] if is_file else \
            await trio.to_thread.run_sync(self._listed_under, rel)
        for d in dirs:
            held = self.cache.versions()  # before the listing: what it may predate
            dir_prefix = f"{self.prefix}{d}/" if d else self.prefix
            objects, prefixes = await trio.to_thread.run_sync(
                self.backend.list_dir, dir_prefix, limiter=self._limiter)
            infos: list[tuple[str, Any]] = [("", ObjectInfo(v)) for v in objects]
            if self.head:
                heads = [(r, i) for r, i in infos if wanted(i.version)]
                done = {i.version.key: i for _, i in await self._heads(heads)} if heads else {}
                infos = [("", done.get(i.version.key, i)) for _, i in infos]
            await trio.to_thread.run_sync(self._mkdirs, prefixes)
            part = await self.cache.refresh([i for _, i in infos], self.prefix,
                                            rel if is_file else d, held=held, busy=busy,
                                            shallow=not is_file)
            report.listed += part.listed
            report.rejected += part.rejected
            report.changes.extend(part.changes)
        return report

    def _is_dir(self, rel: str) -> bool:
        try:
            return stat.S_ISDIR(os.stat(rel, dir_fd=self.cache.root_fd,
                                        follow_symlinks=False).st_mode)
        except OSError:
            return False

    def _mkdirs(self, prefixes: list[str]) -> None:
        for p in prefixes:
            r = key_to_relpath(p, self.prefix)[0]
            if r is not None:
                self.cache.tree.mkdir(r.rstrip("/"))

    def _mark(self, rel: str) -> None:
        """Every child exists: make the directory durable, then mark it listed."""
        fd = self._open_dir(rel)
        try:
            os.fsync(fd)
            os.setxattr(fd, LISTED, f"{time.time():.3f}".encode())
        finally:
            os.close(fd)
