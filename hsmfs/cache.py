"""The backing tree and the fetch engine: one core for both doors.

Owns: stub files in the cache directory (one sparse file per object, identity in xattrs), which
bytes of each are resident, and getting missing bytes from S3 into them.  Both doors call
:meth:`StubCache.ensure` and nothing else to make a range readable; every rule about *what* is
resident, *when* to fetch and *how much* lives here.  Must not: import pyfuse3 or boto3, choose an
errno (that is :func:`hsmfs.errors.to_errno`), or know which door is asking.

Invariants (see docs/design.md):

* **Never claim a hole.**  A range enters a stub's :class:`RangeMap` only after ``pwrite`` wrote
  every byte of it into the backing file.  The map is a cache of the file's own data extents
  (``SEEK_DATA``), which are its source of truth across restarts: data written before a crash is
  data after it, and nothing else is.
* **Each byte fetched once.**  ``_inflight`` maps ``(inode, chunk)`` to the flights carrying
  bytes of that chunk; a reader, through either door, waits for the flights that carry bytes it
  needs and fetches only what no flight carries.  No two flights carry the same missing byte.
  Between the check of ``_inflight`` and the registration of new flights there is no ``await``.
* **Remote bytes never overwrite resident ones**: a flight writes only the gaps that are still
  missing when its data arrives (resident bytes may hold an application's writes).
* **Pinned versions.**  Every fetch names the stub's ETag; a changed object marks the stub
  ``stale`` and is never stitched into it.
* All I/O happens through ``root_fd``, the daemon's private door (for the kernel door, a detached
  mount whose accesses raise no fanotify events), and all blocking calls run in worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import secrets
import stat
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import trio

from .config import CacheConfig
from .errors import (
    BackendUnavailable,
    CacheFull,
    HsmError,
    ObjectChanged,
    ShortBody,
    cause_of,
)
from .keys import STATE_DIR, place
from .ranges import RangeMap, Span
from .siblings import SiblingReadAhead

log = logging.getLogger(__name__)

# Identity and state travel with the file (DESIGN §2).  Identity names are hsmfs's own; the
# state word uses the generic ``user.hsm.state`` that HSM-aware tools read through either door.
XATTR_KEY = "user.hsmfs.key"
XATTR_ETAG = "user.hsmfs.etag"
XATTR_SIZE = "user.hsmfs.size"  # remote size: bytes below it come from S3
XATTR_VERSION = "user.hsmfs.version"
XATTR_STATE = "user.hsm.state"
XATTR_DIRTY = "user.hsmfs.dirty"  # "1": local changes S3 does not have
IDENTITY_XATTRS = (XATTR_KEY, XATTR_ETAG, XATTR_SIZE, XATTR_VERSION)

STUB, PARTIAL, RESIDENT, DIRTY, STALE = "stub", "partial", "resident", "dirty", "stale"
#: States in which every byte is local: nothing to fetch, nothing for a door to guard.
LOCAL_STATES = frozenset({RESIDENT, DIRTY})
STAGING_DIR = f"{STATE_DIR}/staging"


class ObjectVersionLike(Protocol):
    key: str
    etag: str
    size: int
    mtime: float
    version_id: str | None


class ObjectInfoLike(Protocol):
    version: ObjectVersionLike
    mode: int | None


class Fetcher(Protocol):
    """The seam to S3: the backend, or an in-memory fake in unit tests.  Blocking; the cache
    calls it from worker threads.  Must fill the whole buffer with bytes of that version or
    raise a :class:`~hsmfs.errors.HsmError`."""

    def fetch_into(self, version: ObjectVersionLike, start: int, buf: memoryview) -> int:
        """Fill ``buf`` with the bytes at ``start``; return how many came."""
        ...


class CacheListener(Protocol):
    """Told about stubs so a door can guard them (the kernel door's fanotify marks).

    Called synchronously with an fd of the stub opened through the private door.
    """

    def on_stub(self, fd: int, resident: bool) -> None:
        """A stub exists.  For a new stub this runs *before* it is reachable by its public path
        (it is still in staging), so a guard put in place here covers every later opener."""

    def on_resident(self, fd: int) -> None:
        """Every byte of the stub is now local."""


@dataclass
class Stub:
    """One backing file: its remote identity and what the cache knows of its residency."""

    path: str
    version: ObjectVersionLike
    ino: int
    state: str = STUB
    ranges: RangeMap | None = None  # None until loaded from the file's data extents
    fd: int | None = None  # O_RDWR through the private door, opened on first fill
    # Sequential read-ahead: where the last access ended, and the current window.
    dirty: bool = False  # local changes S3 does not have (a local truncate, so far)
    ra_streak: int = 0  # consecutive accesses near the previous one
    ra_horizon: int = 0  # end of what read-ahead has requested so far
    ra_last_start: int = 0
    ra_last_stop: int = 0
    ra_window: int = 0

    @property
    def size(self) -> int:
        return self.version.size


@dataclass
class _Flight:
    """One ranged GET in progress; every reader of its chunks waits on ``done``."""

    start: int
    stop: int
    chunks: list[int]  # the chunk indices this flight owns in ``_inflight``
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


@dataclass
class Counters:
    s3_gets: int = 0  # ranged GETs the cache issued (retries are the backend's own count)
    fetched_bytes: int = 0
    chunks_fetched: int = 0
    served_bytes: int = 0  # reported by the doors
    hits: int = 0  # ensure() calls already resident
    misses: int = 0  # ensure() calls that had to wait for S3
    coalesced_waits: int = 0  # chunks a reader waited for instead of fetching again
    prefetched_bytes: int = 0
    sibling_prefetches: int = 0  # files fetched by directory read-ahead
    errors: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class PopulateReport:
    created: int
    kept: int
    replaced: int
    removed: int
    rejected: list[tuple[str, str]]
    dirs: int


class StubCache:
    def __init__(self, cfg: CacheConfig, fetcher: Fetcher, root_fd: int | None = None) -> None:
        self.cfg = cfg
        self.fetcher = fetcher
        os.makedirs(cfg.cache_dir, exist_ok=True)
        # Without a private door (FUSE door alone), a plain directory fd serves: nothing marks
        # the tree, so hsmfs's own I/O raises no events either way.
        self.root_fd = root_fd if root_fd is not None else os.open(
            cfg.cache_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.counters = Counters()
        self.listeners: list[CacheListener] = []
        self._by_path: dict[str, Stub] = {}
        self._by_ino: dict[int, Stub] = {}
        # (inode, chunk) -> the flights carrying bytes of that chunk right now.
        self._inflight: dict[tuple[int, int], list[_Flight]] = {}
        self._s3_limiter = trio.CapacityLimiter(cfg.concurrency)
        # Directory read-ahead takes at most half the GET slots: a program's own misses
        # must never queue behind a directory's worth of guesses.
        self._sibling_slots = trio.Semaphore(max(cfg.concurrency // 2, 1))
        self._siblings = SiblingReadAhead(cfg.dir_readahead, cfg.small_file,
                                          self._stubs_in, self._wants_fetch)
        self._dir_index: dict[str, list[Stub]] | None = None  # rebuilt after changes
        self._nursery: trio.Nursery | None = None
        self._fd_lock = threading.Lock()
        # One GET buffer per worker thread (at most ``concurrency`` x ``max_request`` bytes);
        # trio retires idle worker threads, and their buffers with them.
        self._buffers = threading.local()
        self._ensure_state_dirs()

    # -- life cycle --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery that background read-ahead runs in; run until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def close(self) -> None:
        for stub in self._by_path.values():
            if stub.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(stub.fd)
                stub.fd = None

    # -- lookups -----------------------------------------------------------------------------

    def stub_at(self, path: str) -> Stub | None:
        return self._by_path.get(path)

    def stub_for_ino(self, ino: int) -> Stub | None:
        return self._by_ino.get(ino)

    def stubs(self) -> Iterable[Stub]:
        return self._by_path.values()

    # -- population --------------------------------------------------------------------------

    async def populate(self, objects: Iterable[ObjectInfoLike], prefix: str = "") -> PopulateReport:
        """Make the backing tree mirror a listing: create missing stubs, keep stubs of unchanged
        objects (and their resident bytes), replace stubs of changed ones, remove stubs of
        objects gone from S3.  Local files that are not stubs are never touched."""
        return await trio.to_thread.run_sync(self._populate_sync, list(objects), prefix)

    def _populate_sync(self, objects: list[ObjectInfoLike], prefix: str) -> PopulateReport:
        by_key = {o.version.key: o for o in objects}
        layout = place(by_key, prefix)
        for key, reason in layout.rejected:
            log.warning("skipping object %r: key %s", key, reason)
        created = kept = replaced = removed = 0
        for d in sorted(layout.dirs, key=lambda p: p.count("/")):
            self._mkdir(d)
        existing = dict(self._scan_stubs())
        for rel, key in sorted(layout.files.items()):
            info = by_key[key]
            old = existing.pop(rel, None)
            if old is not None and old.etag == info.version.etag:
                self._adopt(rel, info, old)
                kept += 1
                continue
            if old is None and not self._parents_are_dirs(rel):
                # *at() calls follow symlinks in parent components: a symlink planted
                # in the tree (kernel door: apps write here) must not take a stub outside it.
                log.warning("skipping object %r: a parent of %r is not a directory", key, rel)
                continue
            if old is None and self._exists(rel):
                log.warning("skipping object %r: a local file that is not a stub holds %r", key,
                            rel)
                continue
            try:
                self._create_stub(rel, info)
            except OSError as exc:
                log.warning("skipping object %r: cannot create its stub %r: %s", key, rel, exc)
                continue
            if old is not None:
                replaced += 1
            else:
                created += 1
        for rel in existing:
            # The object is gone from S3 (or its key is now refused): a clean stub is only a
            # copy, so it goes too.  Dirty data would be kept; there is none before writes exist.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(rel, dir_fd=self.root_fd)
                removed += 1
            # Forget it as well, or stub_at()/stub_for_ino() keep answering for a
            # file that is gone.  (Its fd, if any, is left open: a flight may still write to it.)
            gone = self._by_path.pop(rel, None)
            if gone is not None:
                self._by_ino.pop(gone.ino, None)
        self._dir_index = None
        report = PopulateReport(created, kept, replaced, removed, layout.rejected,
                                len(layout.dirs))
        log.info("populated %s: %d new, %d kept, %d replaced, %d removed, %d refused",
                 self.cfg.cache_dir, created, kept, replaced, removed, len(layout.rejected))
        return report

    def _ensure_state_dirs(self) -> None:
        for d in (STATE_DIR, STAGING_DIR):
            with contextlib.suppress(FileExistsError):
                os.mkdir(d, 0o700, dir_fd=self.root_fd)
        # Leftovers of a crash between create and rename: unreachable, delete them.
        sfd = os.open(STAGING_DIR, os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.root_fd)
        try:
            for name in os.listdir(sfd):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=sfd)
        finally:
            os.close(sfd)

    def _mkdir(self, rel: str) -> None:
        if not self._parents_are_dirs(rel):
            # Never create a directory through a symlinked parent (see populate).
            log.warning("cannot create directory %r: a parent is not a directory", rel)
            return
        try:
            os.mkdir(rel, self.cfg.dir_mode, dir_fd=self.root_fd)
            # mkdir's mode is filtered by the daemon's umask; dir_mode is what the
            # user asked for (stubs get file modes with fchmod, umask-free, likewise).
            os.chmod(rel, self.cfg.dir_mode, dir_fd=self.root_fd)
        except FileExistsError:
            st = os.stat(rel, dir_fd=self.root_fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                # A local file stands where S3 has a directory; local data is never clobbered.
                # The objects below it fail one by one with a clear line each.
                log.warning("a local file %r blocks the directory of S3 objects below it", rel)
        except OSError as exc:
            log.warning("cannot create directory %r: %s", rel, exc)

    def _parents_are_dirs(self, rel: str) -> bool:
        """True when every parent of ``rel`` is a real directory, not a symlink.
        Checked from the root down, so each lstat resolves through real directories only."""
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            try:
                st = os.stat("/".join(parts[:i]), dir_fd=self.root_fd, follow_symlinks=False)
            except FileNotFoundError:
                return False
            if not stat.S_ISDIR(st.st_mode):
                return False
        return True

    def _exists(self, rel: str) -> bool:
        try:
            os.stat(rel, dir_fd=self.root_fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    def _scan_stubs(self) -> Iterable[tuple[str, _Identity]]:
        """Every regular file in the tree that carries hsmfs identity xattrs."""
        for dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=self.root_fd):
            if dirpath == ".":
                with contextlib.suppress(ValueError):
                    dirnames.remove(STATE_DIR)
            for name in filenames:
                rel = os.path.normpath(os.path.join(dirpath, name))
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
                except OSError:
                    continue
                try:
                    ident = _Identity.read(fd)
                finally:
                    os.close(fd)
                if ident is not None:
                    yield rel, ident

    def _adopt(self, rel: str, info: ObjectInfoLike, ident: _Identity) -> None:
        fd = os.open(rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.root_fd)
        try:
            st = os.fstat(fd)
            # The listing shows this very version again, so an old "stale" no longer holds.
            # Data extents, not st_blocks: st_blocks also counts an external xattr
            # block (ext4 with small inodes: the identity xattrs alone take 4 KiB).
            version = info.version
            if ident.size < version.size:  # truncated locally in an earlier run
                version = _with_size(version, ident.size)
            state = (ident.state if ident.state in LOCAL_STATES
                     else PARTIAL if _has_data(fd, version.size) else STUB)
            stub = Stub(path=rel, version=version, ino=st.st_ino, state=state,
                        dirty=ident.state == DIRTY)
            self._register(stub)
            for listener in self.listeners:
                listener.on_stub(fd, stub.state in LOCAL_STATES)
        finally:
            os.close(fd)

    def _create_stub(self, rel: str, info: ObjectInfoLike) -> None:
        """Create in staging, guard, then rename into place: no opener ever sees it unguarded."""
        v = info.version
        tmp = f"{STAGING_DIR}/{secrets.token_hex(8)}"
        mode = stat.S_IMODE(info.mode) if info.mode is not None else self.cfg.file_mode
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600,
                     dir_fd=self.root_fd)
        try:
            os.ftruncate(fd, v.size)
            os.setxattr(fd, XATTR_KEY, v.key.encode())
            os.setxattr(fd, XATTR_ETAG, v.etag.encode())
            os.setxattr(fd, XATTR_SIZE, str(v.size).encode())
            if v.version_id:
                os.setxattr(fd, XATTR_VERSION, v.version_id.encode())
            resident = v.size == 0  # nothing to fetch
            os.setxattr(fd, XATTR_STATE, (RESIDENT if resident else STUB).encode())
            os.fchmod(fd, mode)
            os.utime(fd, (v.mtime, v.mtime))
            for listener in self.listeners:
                listener.on_stub(fd, resident)
            os.rename(tmp, rel, src_dir_fd=self.root_fd, dst_dir_fd=self.root_fd)
            st = os.fstat(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.root_fd)
            raise
        finally:
            os.close(fd)
        # A new stub has no data: its range map is known without a scan.
        self._register(Stub(path=rel, version=v, ino=st.st_ino,
                            state=RESIDENT if resident else STUB, ranges=RangeMap()))

    def _register(self, stub: Stub) -> None:
        old = self._by_path.get(stub.path)
        if old is not None:
            self._by_ino.pop(old.ino, None)
        self._by_path[stub.path] = stub
        self._by_ino[stub.ino] = stub
        self._dir_index = None

    def _stubs_in(self, directory: str) -> list[Stub]:
        """The stubs directly in ``directory`` (relative, '' = the root)."""
        if self._dir_index is None:
            index: dict[str, list[Stub]] = {}
            for stub in list(self._by_path.values()):
                index.setdefault(posixpath.dirname(stub.path), []).append(stub)
            self._dir_index = index
        return self._dir_index.get(directory, [])

    # -- the one entry point of both doors ----------------------------------------------------

    async def ensure(self, stub: Stub, start: int, stop: int, *, whole: bool = False) -> None:
        """Return once ``[start, stop)`` of ``stub`` is resident, or raise why it cannot be.

        ``whole`` asks for the entire file (exec, open-time fill).  Ranges past the remote size
        are local bytes and need nothing.  Small files are fetched whole on first touch.
        Sequential access fetches whole chunks and reads ahead; random access fetches only the
        pages it touches (a small GET costs about the latency of a large one, and the bytes
        around a random read are rarely read next).
        """
        if stub.state in LOCAL_STATES:
            self.counters.hits += 1
            return
        size = stub.size
        if whole or self._whole_on_touch(stub):
            start, stop, whole = 0, size, True
        start, stop = max(start, 0), min(stop, size)
        if stop <= start:
            return
        ranges = await self._ranges(stub)
        if ranges.covers(start, stop):
            self._account_hit(stub, start, stop, whole)
            return
        sequential = self._note_access(stub, start, stop) if not whole else True
        # Whole chunks once a stream's window has grown to a chunk; pages before that, so a
        # stream that turns out to be luck costs little.
        whole_chunks = whole or (sequential and stub.ra_window >= self.cfg.chunk_size)
        self.counters.misses += 1
        if stub.state == STALE:
            raise ObjectChanged(f"{stub.version.key!r} changed in S3; stub is stale")
        if whole:
            # Before our own GET, so the siblings' GETs overlap it.
            self._read_siblings_ahead(stub)
        else:
            # Like Linux's sync + async read-ahead, sent together: the window's GETs fly
            # alongside the one the reader waits for, not a round trip after it (with
            # 20-80 ms of S3 latency, every stall of a stream used to cost two).
            self._read_ahead(stub, stop)
        await self._fetch(stub, start, stop, wait=True, whole_chunks=whole_chunks)
        if not whole:
            self._read_ahead(stub, stop)

    def resident_now(self, stub: Stub, start: int, stop: int) -> bool:
        """No I/O, no await: whether ``[start, stop)`` of ``stub`` is resident right now.

        For a door that answers reads of resident bytes without a task (the kernel door's
        receive loop); it then calls :meth:`note_hit`.  False when unsure (residency not
        loaded yet): ask :meth:`ensure`.  Residency only grows while hsmfs serves a stub
        (``stub.ranges`` is set once; eviction, when it comes, must keep this answer true).
        """
        if stub.state in LOCAL_STATES:
            return True
        ranges = stub.ranges
        if ranges is None:
            return False
        return ranges.covers(max(start, 0), min(stop, stub.size))

    def note_hit(self, stub: Stub, start: int, stop: int) -> None:
        """A door served ``[start, stop)`` after :meth:`resident_now`: keep the same books as
        :meth:`ensure` keeps for a hit (counters, access pattern, read-ahead)."""
        if stub.state in LOCAL_STATES:
            self.counters.hits += 1
            return
        self._account_hit(stub, max(start, 0), min(stop, stub.size), self._whole_on_touch(stub))

    def _whole_on_touch(self, stub: Stub) -> bool:
        """Small files are fetched whole on first touch: one GET, no access pattern."""
        return stub.size <= self.cfg.small_file

    def _account_hit(self, stub: Stub, start: int, stop: int, whole: bool) -> None:
        self.counters.hits += 1
        if not whole:
            # A stream reading resident bytes moves its window on: the read-ahead it earns.
            self._note_access(stub, start, stop)
            self._read_ahead(stub, stop)

    def note_size(self, stub: Stub, size: int) -> None:
        """A door saw the backing file at ``size`` bytes.  hsmfs never shrinks a stub, so a
        size below the remote size is a local truncate: the bytes above it are gone from this
        file and must never be fetched back over what the application writes next.  The remote
        size drops to match (persisted), and the file is dirty: it no longer equals S3."""
        if size >= stub.size:
            return
        log.info("%r truncated locally to %d bytes (remote size %d): now dirty", stub.path,
                 size, stub.size)
        stub.version = _with_size(stub.version, size)
        stub.dirty = True
        fd = self._rw_fd(stub)
        os.setxattr(fd, XATTR_SIZE, str(size).encode())
        os.setxattr(fd, XATTR_DIRTY, b"1")
        if (stub.ranges is not None and stub.ranges.covers(0, size)) or size == 0:
            self._mark_resident(stub)

    def note_served(self, nbytes: int) -> None:
        self.counters.served_bytes += nbytes

    # -- fetching ----------------------------------------------------------------------------

    async def _ranges(self, stub: Stub) -> RangeMap:
        if stub.ranges is None:
            loaded = await trio.to_thread.run_sync(self._load_ranges, stub)
            if stub.ranges is None:  # another task may have loaded it meanwhile
                stub.ranges = loaded
        return stub.ranges

    def _load_ranges(self, stub: Stub) -> RangeMap:
        """Read residency from the file's own data extents (``SEEK_DATA``/``SEEK_HOLE``)."""
        return RangeMap(data_extents(self._rw_fd(stub), stub.size))

    def _rw_fd(self, stub: Stub) -> int:
        with self._fd_lock:  # worker threads of one stub may race to open it
            return self._rw_fd_locked(stub)

    def _rw_fd_locked(self, stub: Stub) -> int:
        if stub.fd is None:
            fd = os.open(stub.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.root_fd)
            if os.fstat(fd).st_ino != stub.ino:
                os.close(fd)
                raise ObjectChanged(f"backing file {stub.path!r} was replaced under hsmfs")
            stub.fd = fd
        return stub.fd

    def _chunk_span(self, stub: Stub, index: int) -> tuple[int, int]:
        c = self.cfg.chunk_size
        return index * c, min((index + 1) * c, stub.size)

    async def _fetch(self, stub: Stub, start: int, stop: int, *, wait: bool,
                     whole_chunks: bool = True, prefetch: bool | None = None) -> None:
        """Fetch what is missing of ``[start, stop)``.

        Per chunk, the missing bytes (the whole chunk's when ``whole_chunks``, else only the
        pages of the range) become one piece; adjacent pieces merge into GETs of at most
        ``max_request``.  A chunk already in flight is waited for, not fetched again.  With
        ``wait``, return once the range is resident or raise the failure it depended on.
        Another reader's flight may have covered other pages of a shared chunk than ours, so
        after waiting the plan is made again (a few rounds at most).
        """
        assert stub.ranges is not None
        if prefetch is None:
            prefetch = not wait
        for _ in range(4):
            own, waits = self._plan_flights(stub, start, stop, wait, whole_chunks)
            if self._nursery is not None:
                # Own flights run in the cache's nursery, not the reader's: a reader
                # cancelled mid-fetch (FUSE interrupt, killed process) must not fail the
                # readers waiting on its flights with "fetch cancelled".
                for f in own:
                    self._nursery.start_soon(self._fly, stub, f, prefetch)
            else:
                async with trio.open_nursery() as nursery:
                    for f in own:
                        nursery.start_soon(self._fly, stub, f, prefetch)
            if not wait:
                return
            for f in own + waits:
                await f.done.wait()
            if stub.ranges.covers(start, stop):
                return
            failed = [f.error for f in own + waits if f.error is not None]
            if failed:
                raise failed[0]
            if not own and not waits:
                break
        # Never hand out the hole (e.g. the stub turned stale between plan and fetch).
        raise BackendUnavailable(f"{stub.path!r} [{start}, {stop}) not resident after fetch")

    def _plan_flights(self, stub: Stub, start: int, stop: int, wait: bool,
                      whole_chunks: bool) -> tuple[list[_Flight], list[_Flight]]:
        """(new flights, registered; flights of others to wait for).  Synchronous on purpose:
        no await between reading ``_inflight`` and registering in it (coalescing invariant).

        Per chunk: the bytes wanted (the whole chunk, or the range's pages in it) minus what is
        resident minus what flights in progress already carry.  A reader waits only for flights
        that carry bytes it needs, and fetches the rest alongside them.
        """
        assert stub.ranges is not None
        chunk = self.cfg.chunk_size
        per_request = max(self.cfg.max_request // chunk, 1)
        lo, hi = _page_floor(start), min(_page_ceil(stop), stub.size)
        waits: list[_Flight] = []
        pieces: list[tuple[int, int, list[int]]] = []
        for index in range(start // chunk, (stop + chunk - 1) // chunk):
            c0, c1 = self._chunk_span(stub, index)
            want = (c0, c1) if whole_chunks else (max(c0, lo), min(c1, hi))
            missing = stub.ranges.missing(*want)
            if not missing:
                continue
            need = RangeMap(missing)
            flying = self._inflight.get((stub.ino, index), ())
            for f in flying:
                if any(f.start < m.stop and m.start < f.stop for m in need):
                    if wait and f not in waits:
                        waits.append(f)
                        self.counters.coalesced_waits += 1
                    need.remove(f.start, f.stop)
            gaps = list(need)
            if gaps and whole_chunks and not flying:
                gaps = [Span(gaps[0].start, gaps[-1].stop)]  # one GET; only gaps get written
            for gap in gaps:
                last = pieces[-1] if pieces else None
                if (last and last[1] == gap.start
                        and len(set(last[2]) | {index}) <= per_request):
                    pieces[-1] = (last[0], gap.stop, sorted(set(last[2]) | {index}))
                else:
                    pieces.append((gap.start, gap.stop, [index]))
        own = []
        for p0, p1, indices in pieces:
            f = _Flight(p0, p1, indices)
            for index in indices:
                self._inflight.setdefault((stub.ino, index), []).append(f)
            own.append(f)
        return own, waits

    async def _fly(self, stub: Stub, flight: _Flight, prefetch: bool) -> None:
        """Run one flight to the end.  Never raises: the error is kept for every waiter."""
        try:
            assert stub.ranges is not None
            # Write only what is missing: resident bytes inside the span may hold an
            # application's writes (kernel door), which remote bytes must never overwrite.
            # The flight owns its missing bytes (no other flight carries them, and
            # applications write only resident ranges), so the gaps cannot change until it
            # lands: they are computed here, and the GET and the write happen in one worker
            # thread call (one hop per miss, not two).  If the flight completes the file, the
            # same call marks it resident.
            gaps = stub.ranges.missing(flight.start, flight.stop)
            completes = all(flight.start <= g.start and g.stop <= flight.stop
                            for g in stub.ranges.missing(0, stub.size))
            await trio.to_thread.run_sync(self._fetch_and_fill, stub, flight, gaps, completes,
                                          limiter=self._s3_limiter)
            self.counters.s3_gets += 1
            stub.ranges.add(flight.start, flight.stop)
            n = flight.stop - flight.start
            self.counters.fetched_bytes += n
            self.counters.chunks_fetched += len(flight.chunks)
            if prefetch:
                self.counters.prefetched_bytes += n
            await self._after_fill(stub)
        except trio.Cancelled:
            flight.error = BackendUnavailable("fetch cancelled")
            raise
        except BaseException as exc:
            flight.error = exc
            self._record_failure(stub, flight, exc, prefetch)
            if stub.state == STALE:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._persist_stale, stub)
        finally:
            for index in flight.chunks:
                flying = self._inflight.get((stub.ino, index))
                if flying is not None and flight in flying:
                    flying.remove(flight)
                    if not flying:
                        del self._inflight[(stub.ino, index)]
            flight.done.set()

    def _record_failure(self, stub: Stub, flight: _Flight, exc: BaseException,
                        prefetch: bool) -> None:
        cause = cause_of(exc)
        self.counters.errors[cause] += 1
        if isinstance(exc, ObjectChanged) and stub.state != STALE:
            stub.state = STALE  # the xattr follows in _persist_stale, off the loop
        level = logging.INFO if prefetch else logging.ERROR
        if not isinstance(exc, (HsmError, OSError)):
            log.exception("unexpected failure fetching %r", stub.version.key)
        else:
            log.log(level, "%sfetch of %r [%d, %d) failed (%s): %s",
                    "pre" if prefetch else "", stub.version.key, flight.start, flight.stop,
                    cause, exc)

    def _persist_stale(self, stub: Stub) -> None:
        """Worker thread: record ``stale`` on the file, for HSM-aware tools and restarts."""
        with contextlib.suppress(OSError):
            os.setxattr(self._rw_fd(stub), XATTR_STATE, STALE.encode())

    def _fetch_and_fill(self, stub: Stub, flight: _Flight, gaps: list[Span],
                        completes: bool) -> None:
        """Worker thread: GET the flight's span, verify its length, fill the gaps."""
        data = self._buffer(flight.stop - flight.start)
        got = self.fetcher.fetch_into(stub.version, flight.start, data)
        if got != len(data):
            # Never claim a hole: the range is claimed after this returns, so its length is
            # verified here too, whatever the Fetcher promised (DESIGN §3).
            raise ShortBody(f"{stub.version.key!r} [{flight.start}, {flight.stop}): "
                            f"fetcher returned {got} bytes")
        self._fill(stub, flight.start, data, gaps, completes)

    def _buffer(self, size: int) -> memoryview:
        """Worker thread: this thread's GET buffer, at least ``size`` bytes, reused across
        flights (a flight's bytes are written out before the thread takes another)."""
        buf: bytearray | None = getattr(self._buffers, "buf", None)
        if buf is None or len(buf) < size:
            buf = bytearray(max(size, self.cfg.max_request))
            self._buffers.buf = buf
        return memoryview(buf)[:size]

    def _fill(self, stub: Stub, base: int, data: bytes | memoryview, gaps: list[Span],
              completes: bool) -> None:
        """Worker thread: write the gaps, then record the new state word."""
        self._write_gaps(stub, base, data, gaps)
        if completes:
            self._mark_resident(stub)
        elif stub.state == STUB:
            os.setxattr(self._rw_fd(stub), XATTR_STATE, PARTIAL.encode())
            stub.state = PARTIAL

    def _write_gaps(self, stub: Stub, base: int, data: bytes | memoryview,
                    gaps: list[Span]) -> None:
        """Write the fetched bytes of each gap into the stub; return when all are there."""
        fd = self._rw_fd(stub)
        # The file may have been truncated below the remote size through the kernel door since;
        # never extend it again with remote bytes.
        size = os.fstat(fd).st_size
        view = memoryview(data)
        try:
            for gap in gaps:
                offset, end = gap.start, min(gap.stop, size)
                while offset < end:
                    offset += os.pwrite(fd, view[offset - base:end - base], offset)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheFull(f"cache disk full writing {stub.path!r}: {exc}") from exc
            raise

    async def _after_fill(self, stub: Stub) -> None:
        assert stub.ranges is not None
        if stub.ranges.covers(0, stub.size) and stub.state not in LOCAL_STATES:
            # Completed by bytes that were already local (e.g. a truncate): mark it now.
            await trio.to_thread.run_sync(self._mark_resident, stub)

    def _mark_resident(self, stub: Stub) -> None:
        if stub.state in LOCAL_STATES:
            return
        fd = self._rw_fd(stub)
        state = DIRTY if stub.dirty else RESIDENT
        os.setxattr(fd, XATTR_STATE, state.encode())
        stub.state = state
        for listener in self.listeners:
            listener.on_resident(fd)
        # A resident file is read through the doors' own fds; keep no descriptor for it.
        with self._fd_lock:
            os.close(fd)
            stub.fd = None

    def _note_access(self, stub: Stub, start: int, stop: int) -> bool:
        """Follow the access pattern; return whether access is sequential.

        Sequential means: the read starts the file, or it is the second access in a row that
        lands near the previous one (within ``SEQ_SLACK``, which absorbs the kernel's
        out-of-order async read-ahead requests).  One near access in a random stream is luck,
        not a pattern.  A stream's read-ahead window starts at 4x the request (at least
        ``SEQ_MIN_WINDOW``) and doubles with every access up to ``readahead_max``, so a
        mistaken stream costs little and a real one ramps up within a few reads (as Linux's
        own read-ahead does); a jump drops it.
        """
        # In pages: two reads of the same page are one access, whatever their byte offsets.
        start, stop = _page_floor(start), _page_ceil(stop)
        if stub.ra_last_start <= start and stop <= stub.ra_last_stop:
            # Nothing new: a repeat, or another reader of the same range (the kernel door sees
            # one event per reader).  It says nothing about the direction of travel.
            return stub.ra_window > 0
        first = stub.ra_last_stop == 0
        near = stub.ra_last_start - SEQ_SLACK <= start <= stub.ra_last_stop + SEQ_SLACK
        if first and start == 0:
            stub.ra_streak = 2
        elif near and not first:
            stub.ra_streak += 1
        else:
            stub.ra_streak = 0
        sequential = stub.ra_streak >= 2
        if not sequential:
            stub.ra_window = 0
        elif stub.ra_window == 0:
            stub.ra_window = min(max(SEQ_MIN_WINDOW, 4 * (stop - start)),
                                 self.cfg.readahead_max)
        else:
            stub.ra_window = min(stub.ra_window * 2, self.cfg.readahead_max)
        stub.ra_last_start = start
        stub.ra_last_stop = max(stop, stub.ra_last_stop) if sequential else stop
        return sequential

    def _read_ahead(self, stub: Stub, stop: int) -> None:
        """Prefetch the window past ``stop`` in the background, in batches.

        Like Linux's async read-ahead marker: the next batch goes out only once the reader has
        moved a batch past what has been requested (``ra_horizon``).  A batch is half the
        window while the window ramps up, and one ``max_request`` GET once it is large: the
        window then stays full, ``readahead_max / max_request`` GETs deep, as raw parallel
        GETs are.  Measured (Ceph, 256 MiB, 8 MiB chunks): sliding by every read made one
        GET per chunk-sized step (boto3's ~1 ms of CPU each); half-window batches let the
        depth swing between half and all of the window (348 MB/s); GET-sized batches, ~650.
        """
        if self._nursery is None or stub.state in (RESIDENT, DIRTY, STALE):
            return
        if not stub.ra_window or stop >= stub.size:
            stub.ra_horizon = 0
            return
        if stub.ra_window < min(READ_AHEAD_MIN_WINDOW, self.cfg.readahead_max):
            # Two near reads of a random stream open a 128 KiB window by luck now and then
            # (4 KiB random reads over 64 MiB: four times in 500 reads, measured); a stream
            # of small reads proves itself over four accesses before guesses go to S3.
            return
        horizon = max(stub.ra_horizon, stop)
        target = min(stop + stub.ra_window, stub.size)
        batch = min(max(stub.ra_window // 2, SEQ_MIN_WINDOW), self.cfg.max_request)
        if target - horizon >= batch or (target == stub.size and horizon < target):
            stub.ra_horizon = target
            self._nursery.start_soon(self._prefetch, stub, horizon, target)

    def _read_siblings_ahead(self, stub: Stub) -> None:
        """A program reads ``stub`` whole: if that reveals a walk of its directory, fetch
        the siblings it will read next in the background (:mod:`hsmfs.siblings`)."""
        if self._nursery is None:
            return
        picked = self._siblings.note_whole_read(stub)
        if picked:
            log.debug("directory read-ahead in %r: %d files",
                      posixpath.dirname(stub.path) or ".", len(picked))
            self._nursery.start_soon(self._prefetch_files, picked)

    def _wants_fetch(self, stub: Stub) -> bool:
        return stub.state in (STUB, PARTIAL) and (stub.ino, 0) not in self._inflight

    async def _prefetch_files(self, stubs: list[Stub]) -> None:
        async with trio.open_nursery() as nursery:
            for stub in stubs:
                await self._sibling_slots.acquire()
                nursery.start_soon(self._prefetch_file, stub)

    async def _prefetch_file(self, stub: Stub) -> None:
        """Fetch one sibling whole, unless a reader got to it first.  Failures are logged
        and counted by the flight; the file stays a stub for its reader to retry."""
        try:
            if not self._wants_fetch(stub):
                return
            await self._ranges(stub)
            if stub.state not in (STUB, PARTIAL):  # changed while its ranges loaded
                return
            self.counters.sibling_prefetches += 1
            await self._fetch(stub, 0, stub.size, wait=True, prefetch=True)
        except (HsmError, OSError):
            pass
        finally:
            self._sibling_slots.release()

    async def _prefetch(self, stub: Stub, start: int, stop: int) -> None:
        # A young window goes out as RAMP_GETS parallel GETs, not one: S3 caps each connection
        # (~90 MB/s), so its first part lands, the reader moves on and the window grows a
        # round trip sooner (through a 20-80 ms / 20 MB/s proxy, 4 MiB as one GET took 250 ms,
        # as four 1 MiB GETs ~110).  A large window is split by max_request anyway.
        step = max(stub.ra_window // RAMP_GETS, SEQ_MIN_WINDOW)
        whole_chunks = stub.ra_window >= self.cfg.chunk_size
        for piece in range(start, stop, step):
            await self._fetch(stub, piece, min(piece + step, stop), wait=False,
                              whole_chunks=whole_chunks)

    # -- reporting ---------------------------------------------------------------------------

    def state_of(self, stub: Stub) -> tuple[str, int]:
        """(state word, resident bytes below the remote size): exact, from the data extents."""
        if stub.state in LOCAL_STATES:
            return stub.state, stub.size
        if stub.ranges is None:
            # SEEK_DATA through the private door: a few syscalls, no event, no fill.
            stub.ranges = self._load_ranges(stub)
        return stub.state, stub.ranges.total()

    def stats(self) -> dict[str, object]:
        c = self.counters
        out: dict[str, object] = {
            "cache_s3_gets": c.s3_gets,
            "fetched_bytes": c.fetched_bytes,
            "chunks_fetched": c.chunks_fetched,
            "served_bytes": c.served_bytes,
            "hits": c.hits,
            "misses": c.misses,
            "coalesced_waits": c.coalesced_waits,
            "prefetched_bytes": c.prefetched_bytes,
            "sibling_prefetches": c.sibling_prefetches,
            "errors": dict(c.errors),
            "stubs": len(self._by_path),
            "resident_files": sum(1 for s in self._by_path.values()
                                  if s.state in LOCAL_STATES),
            "inflight_chunks": len(self._inflight),
        }
        backend_stats = getattr(self.fetcher, "stats", None)
        if callable(backend_stats):
            out.update(backend_stats())
        return out


def _with_size(version: ObjectVersionLike, size: int) -> ObjectVersionLike:
    import dataclasses

    return dataclasses.replace(version, size=size)  # type: ignore[type-var]


@dataclass(frozen=True)
class _Identity:
    key: str
    etag: str
    size: int
    state: str

    @classmethod
    def read(cls, fd: int) -> _Identity | None:
        try:
            key = os.getxattr(fd, XATTR_KEY).decode()
            etag = os.getxattr(fd, XATTR_ETAG).decode()
            size = int(os.getxattr(fd, XATTR_SIZE))
        except OSError:
            return None
        try:
            state = os.getxattr(fd, XATTR_STATE).decode()
        except OSError:
            state = STUB
        return cls(key, etag, size, state)


def _has_data(fd: int, size: int) -> bool:
    """Whether any byte below ``size`` is data (``SEEK_DATA``)."""
    try:
        return os.lseek(fd, 0, os.SEEK_DATA) < size
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return False
        raise


def describe(path: str) -> dict[str, object]:
    """State of one file (for ``hsmfs state``) from its xattrs and ``stat`` alone, so it never
    opens the file (an open may be a fill) and works through either door or with no daemon.
    ``resident_bytes`` of a partial file is an estimate here (``st_blocks`` may count an xattr
    block); ``hsmfs state`` asks the daemon, or scans the extents, for the exact figure."""
    st = os.stat(path)
    info: dict[str, object] = {"path": path, "size": st.st_size}
    try:
        state = os.getxattr(path, XATTR_STATE).decode()
        key = os.getxattr(path, XATTR_KEY).decode()
        remote = int(os.getxattr(path, XATTR_SIZE))
    except OSError:
        info.update(state="local", resident_bytes=st.st_size, key=None)
        return info
    if state not in (STUB, PARTIAL, RESIDENT, DIRTY, STALE):
        state = STUB
    resident = (remote if state in LOCAL_STATES else 0 if state == STUB
                else min(st.st_blocks * 512, remote))
    info.update(state=state, resident_bytes=resident, key=key, remote_size=remote,
                etag=os.getxattr(path, XATTR_ETAG).decode(), mtime=time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.st_mtime)))
    return info


PAGE = 4096
#: How far from the previous access a read may start and still continue a sequential stream:
#: FUSE has up to 12 async read-ahead requests of 1 MiB in flight, answered out of order.
SEQ_SLACK = 1 << 20
#: A stream's smallest first read-ahead window (it is 4x the request when that is larger).
SEQ_MIN_WINDOW = 128 << 10
READ_AHEAD_MIN_WINDOW = 4 * SEQ_MIN_WINDOW
#: A read-ahead batch is spread over this many GETs at least (see StubCache._prefetch).
RAMP_GETS = 4


def _page_floor(n: int) -> int:
    return n - n % PAGE


def _page_ceil(n: int) -> int:
    return -(-n // PAGE) * PAGE


def data_extents(fd: int, end: int) -> Iterator[tuple[int, int]]:
    """The data extents of a file below ``end``, by ``SEEK_DATA``/``SEEK_HOLE`` (which raise no
    fanotify event).  Dirty page-cache data counts as data; holes and unwritten extents don't."""
    pos = 0
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            raise
        if data >= end:
            return
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        yield data, min(hole, end)
        pos = hole


def scan_resident_bytes(path: str, remote_size: int) -> int:
    """Exact resident bytes of a backing file by its data extents.  Opens the file: call it
    only when no daemon guards the tree (with no marks, an open raises no event)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return sum(stop - start for start, stop in data_extents(fd, remote_size))
    finally:
        os.close(fd)
