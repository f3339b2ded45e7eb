"""The core's façade and its state machine: one function per transition of a file's state.

Both doors call :meth:`StubCache.lookup` (which file is this fd?) and :meth:`StubCache.ensure`
(make these bytes local for this intent) and nothing else to serve a file; every rule about
*what* is resident, *when* to fetch, *how much*, which inodes hsmfs vouches for and what a local
truncate means lives here.  Must not: import pyfuse3 or boto3, choose an errno (that is
:func:`hsmfs.errors.to_errno`), or know which door is asking.

The pieces (docs/design.md, "State machine"):

* :mod:`hsmfs.stubfile` — the on-disk record (trusted xattrs) and extents;
* :mod:`hsmfs.state` — one file's state in memory (:class:`~hsmfs.state.Stub`), pins, intents;
* :mod:`hsmfs.registry` — the index of stubs and the staging mechanics;
* :mod:`hsmfs.fetch` — flights, coalescing, landing bytes;
* :mod:`hsmfs.readahead` — the access pattern.

Transitions, each one method here (what it persists, in which order, and what a crash at each
step leaves, is in its docstring):

===================  ==========================================  ===========================
transition           caused by                                   method
===================  ==========================================  ===========================
create               a listing names an object with no file      :meth:`_create`
adopt (restart)      a start finds a file with a record          :meth:`_adopt`
fill                 a door's ensure, read-ahead, restore        :meth:`filled`
local truncate       the kernel door (before it lands) or a      :meth:`truncate`
                     size found below ``owed`` (after)
remote change        a listing shows another ETag, or a GET 412  :meth:`_remote_changed`,
                                                                 :meth:`fetch_failed`
remote delete        a listing no longer names the object        :meth:`_remote_gone`
supersede            the path no longer leads to the inode       :meth:`_supersede`
release              ``hsmfs release``                           :meth:`release`
pin / unpin          ``hsmfs pin`` / ``unpin``                   :meth:`set_pinned`
===================  ==========================================  ===========================

Upload (archive, :mod:`hsmfs.archive`) and release stand on :class:`~hsmfs.state.Pin` (no
punch under a door that serves bytes) and on ``sync`` (only clean files are released).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import posixpath
import signal
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio

from . import crashpoint
from .config import CacheConfig
from .errors import HsmError, ObjectChanged, Superseded, cause_of, status_of, to_errno
from .fetch import Counters, FetchEngine, Fetcher, NoRoom
from .handles import handle_of, open_handle
from .keys import STATE_DIR, Decision, PlacementStream, key_to_relpath, place
from .ranges import RangeMap
from .registry import STAGING_DIR, Changed, Found, Registry, Tree
from .siblings import SiblingReadAhead
from .startprogress import StartProgress
from .state import Intent, Pin, Stub
from .stubfile import (
    CLEAN,
    CONFLICT,
    DIRTY,
    GONE,
    PARTIAL,
    RESIDENT,
    STALE,
    STUB,
    X_ERROR,
    X_VIEW,
    Record,
    RemoteVersion,
    VersionLike,
    data_extents,
    describe,
    format_error,
    generation,
    has_data,
    legacy_identity,
    punch,
    read_pinned,
    read_record,
    scan_resident_bytes,
    write_error,
    write_owed,
    write_pinned,
    write_releasing,
    write_sync,
    write_view,
)
from .tombstones import Tombstones

if TYPE_CHECKING:
    from .evict import Evictor

__all__ = ["CLEAN", "CONFLICT", "DIRTY", "PARTIAL", "RESIDENT", "STAGING_DIR", "STALE", "STUB",
           "CacheListener", "Fetcher", "Intent", "Pin", "PopulateReport", "Stub", "StubCache",
           "data_extents", "describe", "scan_resident_bytes"]

log = logging.getLogger(__name__)


class ObjectInfoLike(Protocol):
    version: VersionLike
    mode: int | None


class CacheListener(Protocol):
    """Told about stubs so a door can guard them (the kernel door's fanotify marks).

    Called synchronously with an fd of the stub opened through the private door.
    """

    def on_stub(self, fd: int, resident: bool) -> None:
        """A stub exists.  For a new stub this runs *before* it is reachable by its public path
        (it is still in staging), so a guard put in place here covers every later opener.  For
        a stub adopted at start it runs while the cache dir is still covered (hsmfs.cover), so
        no new opener reaches it unguarded either."""

    def on_resident(self, fd: int) -> None:
        """Every byte of the stub is now local."""

    def on_released(self, fd: int) -> None:
        """The stub is about to be punched back to holes (:meth:`StubCache.release`): guard it
        again (the kernel door removes its ignore mask, so every access raises events).  Called
        before the write lease is taken, so an opener from then on holds a guarded fd."""


class ReleaseGuard(Protocol):
    """A door that holds fds of backing files itself (the FUSE door) and so must agree to a
    release: no handle of the inode open, and its idle cached fd closed (any fd of ours would
    defeat the write lease, KERNEL_FACTS_3 §3)."""

    def release_check(self, stub: Stub) -> str | None:
        """Why the file may not be released now (an open handle), or None after dropping any
        idle fd of the inode.  Called on the trio loop, with no await before the punch."""

    async def released(self, stub: Stub) -> None:
        """The file was punched: drop what the door's kernel caches of its bytes."""


@dataclass(frozen=True)
class Released:
    """What :meth:`StubCache.release` did to one file."""

    result: str  # "released" | "stub" (nothing local) | "refused" | "would release" (dry run)
    detail: str = ""
    resident_bytes: int = 0  # bytes below ``owed`` that were (or would be) punched
    freed: int = 0  # space given back (st_blocks before - after) * 512
    errno: int = 0  # for a refusal: EBUSY (in use, try again) or EPERM (never, as it stands)
    changed: bool = False  # refused because the file changed without an event: make it dirty


#: Test hooks (tests/t4_release.py, tests/t4_crash.py): SIGKILL this process at a named step of
#: a release (:mod:`hsmfs.crashpoint`); hold the lease this many seconds after the punch (an
#: opener must wait, then read right bytes).
CRASH_ENV = crashpoint.RELEASE
PAUSE_ENV = "HSMFS_TEST_RELEASE_PAUSE"


@dataclass(frozen=True)
class PopulateReport:
    created: int
    kept: int
    replaced: int
    removed: int
    rejected: list[tuple[str, str]]
    dirs: int
    stale: int = 0
    conflicts: int = 0


#: What a refresh did to one path (``hsmfs sync`` prints one line per change).
NEW, REFRESHED, REMOVED, KEPT = "new", "refreshed", "removed", "kept"


@dataclass(frozen=True)
class Change:
    """One path a refresh changed: ``kind`` is new / refreshed / stale / conflict / removed /
    kept.  ``old_ino``/``new_ino``: the backing inode the path led to before and leads to now
    (a door's caches of the old one must follow: :meth:`hsmfs.ops.Operations.namespace_changed`)."""

    kind: str
    path: str
    old_ino: int | None = None
    new_ino: int | None = None
    detail: str = ""


@dataclass
class RefreshReport:
    listed: int
    changes: list[Change] = dataclasses.field(default_factory=list)
    rejected: int = 0

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys((NEW, REFRESHED, STALE, CONFLICT, REMOVED, KEPT), 0)
        for c in self.changes:
            out[c.kind] = out.get(c.kind, 0) + 1
        return out


@dataclass
class RefreshStats:
    """``hsmfs stats``: how the namespace refreshes went (``hsmfs sync``, ``-o refresh``)."""

    refreshes: int = 0
    failures: int = 0
    last_at: float | None = None  # time.time() of the last completed refresh
    last_s: float = 0.0  # how long it took
    last_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    last_error: str | None = None  # of the last failed attempt

    def as_dict(self) -> dict[str, object]:
        return {"refreshes": self.refreshes, "refresh_failures": self.failures,
                "last_refresh": None if self.last_at is None else time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last_at)),
                "last_refresh_s": round(self.last_s, 3),
                "last_refresh_changes": dict(self.last_counts),
                "last_refresh_error": self.last_error}


@dataclass
class _Step:
    """A refresh's decision about one path, taken on the loop (:meth:`StubCache._apply`)."""

    what: str  # "new", "changed", "gone", "unstale", "adopt", "moved"
    rel: str
    info: ObjectInfoLike | None = None
    stub: Stub | None = None  # the stub hsmfs serves there now
    local: bool = False  # the file held data when the scan looked
    found: Found | None = None
    version: RemoteVersion | None = None  # the stub's version the decision was made on

    def __post_init__(self) -> None:
        if self.stub is not None and self.version is None:
            self.version = self.stub.version


class ListingCut(Exception):
    """A streamed listing ended without its end mark: what it did not name is unknown, not
    deleted.  The listing's own failure is the one to report (this one is not an HsmError)."""


class _AwayHere:
    """Keys whose path holds no file because a program moved or removed the stub here: a
    start's listing must not make them again (that would undo the user's ``mv`` or ``rm``).

    * renamed: a file elsewhere in the tree carries a record of that key and version;
    * removed: a tombstone of that key and version (:mod:`hsmfs.tombstones`).

    Asked per key as the listing arrives.  The removal log is compacted once the listing is
    whole: a tombstone of an older version than S3's is dropped (another host wrote the object
    since: its bytes are made again here, and never deleted from S3), and so is one whose
    object is gone.  Blocking (the removal log)."""

    def __init__(self, cache: StubCache, found: dict[str, Found], prefix: str) -> None:
        self.cache = cache
        self.moved = {(f.record.version.key, f.record.version.etag) for f in found.values()
                      if f.record is not None
                      and key_to_relpath(f.record.version.key, prefix)[0] != f.rel}
        self.readable = True
        try:
            self.tombs = cache.tombstones.load()
        except OSError as exc:
            log.warning("cannot read the removal log: %s; removed stubs may come back", exc)
            self.tombs, self.readable = {}, False
        self.now: dict[str, str] = {}  # a tombstoned key -> the ETag S3 lists now

    def listed(self, info: ObjectInfoLike) -> None:
        if info.version.key in self.tombs:
            self.now[info.version.key] = info.version.etag

    def here_no_more(self, key: str, info: ObjectInfoLike) -> bool:
        etag = info.version.etag
        if (key, etag) in self.moved:
            return True
        t = self.tombs.get(key)
        if t is None:
            return False
        if t.etag != etag:
            log.warning("%r was removed here as version %s, but S3 now holds %s (written "
                        "elsewhere): it is made again, and not deleted from S3", t.path,
                        t.etag, etag)
            return False
        return True

    def compact(self) -> None:
        if not self.readable:
            return
        try:
            self.cache.tombstones.compact(lambda t: self.now.get(t.key) == t.etag)
        except OSError as exc:
            log.warning("cannot rewrite the removal log: %s", exc)


def _below(rel: str, under: str) -> bool:
    return not under or rel == under or rel.startswith(under + "/")


def _remote(version: VersionLike) -> RemoteVersion:
    return RemoteVersion(version.key, version.etag, version.size, version.mtime,
                         version.version_id)


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
        self.registry = Registry()
        self.tree = Tree(self.root_fd, cfg.dir_mode, cfg.file_mode)
        self.engine = FetchEngine(cfg, fetcher, self, self.counters)
        # Directory read-ahead takes at most half the GET slots: a program's own misses
        # must never queue behind a directory's worth of guesses.
        self._sibling_slots = trio.Semaphore(max(cfg.concurrency // 2, 1))
        self._siblings = SiblingReadAhead(cfg.dir_readahead, cfg.small_file,
                                          self.registry.stubs_in, self._wants_fetch)
        self._fd_lock = threading.Lock()
        # inode -> one lock for truncate, mark_dirty and archive's record step
        self._truncating: dict[int, trio.Lock] = {}
        #: inode -> set when its release is over: ensure waits for it (never serves holes).
        self._releasing: dict[int, trio.Event] = {}
        #: Doors that hold backing fds themselves (the FUSE door) and must agree to a release.
        self.release_guards: list[ReleaseGuard] = []
        self.releases = 0
        self.released_bytes = 0
        #: rel -> time.monotonic() of the last writable close of a file with no record (created
        #: locally): writeback's clock for files that have no Stub to carry ``closed_at``.
        self.closed_local: dict[str, float] = {}
        self.refresh_stats = RefreshStats()
        #: ``-o cache_size``: asked for room before every flight (None: unlimited).
        self.evictor: Evictor | None = None
        #: ``user.hsm.error`` writes: a token bucket shared by every file, so a storm of
        #: failures over many files is not a storm of metadata writes (note_failure).
        self._error_tokens = float(ERROR_WRITE_BURST)
        self._error_tokens_at = time.monotonic()
        self.tree.prepare()
        self.tombstones = Tombstones(self.root_fd)

    # -- life cycle --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery that background read-ahead runs in; run until cancelled."""
        async with trio.open_nursery() as nursery:
            self.engine.nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self.engine.nursery = None

    def close(self) -> None:
        for stub in list(self.registry.by_ino.values()):
            self._close_fd(stub)

    # -- lookups -----------------------------------------------------------------------------

    def stub_at(self, path: str) -> Stub | None:
        return self.registry.by_path.get(path)

    def stub_for_ino(self, ino: int) -> Stub | None:
        return self.registry.by_ino.get(ino)

    def note_closed(self, stub_or_path: Stub | str) -> None:
        """A door saw a writable handle of this file close (FUSE ``release``, the kernel
        door's ``FAN_CLOSE_WRITE``): writeback's "closed and idle" clock starts again.  A path
        (relative to the root) names a file with no record.  Memory only: after a restart
        writeback counts from its own start (a dirty record is durable anyway)."""
        now = time.monotonic()
        if isinstance(stub_or_path, Stub):
            stub_or_path.closed_at = now
        else:
            self.closed_local[stub_or_path] = now

    def stubs(self) -> Iterable[Stub]:
        return self.registry.by_path.values()

    async def lookup(self, fd: int) -> Stub | None:
        """The file a door's ``fd`` refers to, or None if hsmfs does not vouch for it.

        The unknown-inode rule: a file hsmfs knows by ``(inode, generation)`` is its stub; any
        other file carrying a trusted record is a stub hsmfs lost track of (superseded:
        replaced or removed while a program holds it, or renamed) and is served from its
        record through the door's fd; a file with no record was created locally and holds no
        byte S3 owes it.  A size below ``owed`` is a local truncate found after the fact
        (:meth:`truncate`).
        """
        st = os.fstat(fd)  # never raises an event
        gen = generation(fd)
        stub = self.registry.by_ino.get(st.st_ino)
        if stub is not None and stub.gen != gen:
            # Its inode was freed (an application removed the file) and the number reused.
            self._supersede(stub)
            self.registry.forget(stub)
            self._close_fd(stub)
            stub = None
        if stub is None:
            record = await trio.to_thread.run_sync(read_record, fd)
            if record is None:
                return None
            stub = await self._adopt_orphan(fd, st.st_ino, gen, record)
            if stub is None:
                return None
        if st.st_size < stub.owed:
            await self.truncate(stub, st.st_size, fd=fd)
        elif (stub.sync in (CLEAN, STALE) and not self.engine.busy(stub)
              and (st.st_size != stub.version.size
                   or abs(st.st_mtime - stub.version.mtime) >= MTIME_SLACK_S)):
            # The clean point: a clean copy keeps its version's length and mtime (fills put
            # the mtime back, in the flight, so not while one runs).  Anything else is a write
            # no access event announced: an mmap store or a truncate of a resident file.
            await self.mark_dirty(stub, fd=fd)
        return stub

    def resident_file(self, fd: int, st: os.stat_result, start: int, stop: int) -> Stub | None:
        """No disk I/O, no await: the stub if ``[start, stop)`` of the file behind ``fd`` is
        resident right now, else None (ask :meth:`lookup` and :meth:`ensure`).

        For a door that answers reads of resident bytes without a task (the kernel door's
        receive loop); it then calls :meth:`note_hit`.  None when unsure: not a known
        ``(inode, generation)``, residency not loaded yet, or a size below what S3 owes (a
        truncate to record).  Residency only grows while hsmfs serves a stub (release, when
        it comes, must keep this answer true: it removes the guard's ignore mask and takes a
        lease before it punches).
        """
        stub = self.registry.by_ino.get(st.st_ino)
        if stub is None or st.st_size < stub.owed or stub.gen != generation(fd):
            return None
        if stub.local:
            return stub
        ranges = stub.ranges
        if ranges is None or not ranges.covers(max(start, 0), min(stop, stub.owed)):
            return None
        return stub

    # -- transitions: the listing ------------------------------------------------------------

    async def scan(self) -> dict[str, Found]:
        """Every regular file of the tree with its record, by path, as :meth:`populate` needs
        it (``found``).  A clean file whose length or mtime changed while no door saw it is
        recorded dirty here, durably (:meth:`_size_checked`).  Disk work: in a thread."""
        return await trio.to_thread.run_sync(
            lambda: {f.rel: self._size_checked(f) for f in self.tree.scan()})

    async def populate(self, objects: Iterable[ObjectInfoLike] | None,
                       prefix: str = "", *, found: dict[str, Found] | None = None,
                       progress: StartProgress | None = None) -> PopulateReport:
        """Make the backing tree mirror a listing (or, with ``objects`` None, adopt the tree as
        it is: a restarted worker needs no S3 to guard what exists).

        Per file, by the rules of the state machine: a new object gets a stub; an unchanged
        one is adopted with its resident bytes; a changed one is refreshed if nothing of it is
        local, made ``stale`` if clean bytes are, ``conflict`` if local changes are; a deleted
        one goes away unless it holds local changes (then ``conflict``).  Local files that are
        not stubs are never touched.

        ``found``: the tree's :meth:`scan`, when the caller made it already (the daemon scans
        while it lists S3); it must be of this start, with nothing changed since but by
        programs (which populate re-checks per file, as always).  Populate consumes it (its
        entries are popped as they are placed: no second copy of 100,000 entries).

        For a start only, before any door serves: a serving daemon uses :meth:`refresh`
        (which says why this is not safe to call again).  ``progress``: the start's counters,
        bumped per file placed (:mod:`hsmfs.startprogress`)."""
        listed = None if objects is None or isinstance(objects, list) else list(objects)
        return await trio.to_thread.run_sync(
            self._populate_sync, objects if listed is None else listed, prefix, found,
            progress or StartProgress(None))

    async def populate_listing(self, batches: trio.MemoryReceiveChannel[list[ObjectInfoLike]],
                               prefix: str, *, found: dict[str, Found],
                               progress: StartProgress | None = None) -> PopulateReport:
        """:meth:`populate`, fed by a listing that still arrives: ``batches`` carry it in S3's
        order, then one empty batch that says it is whole.  A channel closed before that (the
        listing failed or was cancelled) ends this with :class:`ListingCut` before anything is
        removed: a path the listing did not name is a remote delete only in a whole listing.
        What was placed until then is complete, stub by stub, as after a death."""

        def objects() -> Iterator[ObjectInfoLike]:
            while True:
                try:
                    batch = trio.from_thread.run(batches.receive)
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    raise ListingCut("the listing ended before it was whole") from None
                if not batch:
                    return
                yield from batch

        return await trio.to_thread.run_sync(self._populate_sync, objects(), prefix, found,
                                             progress or StartProgress(None))

    def _populate_sync(self, objects: Iterable[ObjectInfoLike] | None, prefix: str,
                       found: dict[str, Found] | None = None,
                       progress: StartProgress | None = None) -> PopulateReport:
        """Place a listing taken in S3's order, one object at a time: each stub is made as
        soon as :class:`PlacementStream` decides its key, so a start makes stubs while the
        listing still arrives (``objects`` may be an iterator fed by it).  A list is sorted
        first: one algorithm for both.

        A death anywhere leaves stubs made so far complete (each is made in staging and
        renamed) and nothing else changed; the next start lists again and places the rest (a
        restarted worker does too, until one was ready: ``HSMFS_WORKER_TREE_READY``).  The
        removal log is compacted only at the end: a death before leaves entries that the next
        start drops, harmless meanwhile."""
        progress = progress or StartProgress(None)
        if found is None:
            found = {f.rel: self._size_checked(f) for f in self.tree.scan()}
        if objects is None:
            return self._adopt_tree(found)
        if isinstance(objects, list):
            objects = sorted(objects, key=lambda o: o.version.key)
        away = _AwayHere(self, found, prefix)
        stream = PlacementStream(prefix)
        waiting: dict[str, ObjectInfoLike] = {}  # listed, not yet decided
        n = dict(created=0, kept=0, replaced=0, removed=0, stale=0, conflicts=0)
        rejected: list[tuple[str, str]] = []
        dirs = 0
        progress.phase = "populating"

        def apply(decisions: list[Decision]) -> None:
            nonlocal dirs
            for d in decisions:
                if d.kind == "dir":
                    self.tree.mkdir(d.rel)
                    dirs += 1
                elif d.kind == "rejected":
                    waiting.pop(d.key, None)
                    log.warning("skipping object %r: key %s", d.key, d.reason)
                    rejected.append((d.key, d.reason))
                else:
                    info = waiting.pop(d.key, None)
                    if info is None:
                        continue  # a key listed twice (a server that replays a page): once
                    outcome = self._place_listed(d.rel, d.key, info, found, away)
                    if outcome:
                        n[outcome] += 1
                        if outcome == "created":
                            crashpoint.crash_point(crashpoint.POPULATE, "created")

        for info in objects:
            waiting[info.version.key] = info
            away.listed(info)
            apply(stream.add(info.version.key))
            progress.placed += 1  # of progress.listed (a bar, not an account: see there)
        apply(stream.finish())
        if not stream.ordered:
            log.warning("the listing was not in key order (S3 and Ceph list in UTF-8 order): "
                        "an object beside a directory of the same name may have been placed "
                        "as a file, and the objects under that name skipped")
        for f in found.values():
            if f.record is None:
                continue
            try:
                if key_to_relpath(f.record.version.key, prefix)[0] != f.rel:
                    self._adopt(f, f.record)  # renamed locally: kept, served from its record
                    continue
                n[self._remote_gone(f, f.record)] += 1
            except (OSError, Changed) as exc:
                log.warning("%r changed while hsmfs looked at it (%s); left as it is", f.rel,
                            exc)
        away.compact()
        report = PopulateReport(n["created"], n["kept"], n["replaced"], n["removed"],
                                rejected, dirs, n["stale"], n["conflicts"])
        log.info("populated %s: %d new, %d kept, %d replaced, %d removed, %d stale, "
                 "%d conflicts, %d refused", self.cfg.cache_dir, report.created, report.kept,
                 report.replaced, report.removed, report.stale, report.conflicts,
                 len(rejected))
        return report

    def _place_listed(self, rel: str, key: str, info: ObjectInfoLike, found: dict[str, Found],
                      away: _AwayHere) -> str | None:
        """One decided file of a start's listing; the outcome's counter."""
        f = found.pop(rel, None)
        if f is None and away.here_no_more(key, info):
            return None  # renamed or removed here: archive --delete makes S3 follow
        try:
            return self._place_object(rel, key, info, f)
        except (OSError, Changed) as exc:
            # An application changed or removed the file since the scan: leave it as it is
            # now; the next start (or refresh) decides again.
            log.warning("%r changed while hsmfs looked at it (%s); left as it is", rel, exc)
            return None

    def _place_object(self, rel: str, key: str, info: ObjectInfoLike,
                      f: Found | None) -> str | None:
        """One listed object and what the scan found at its path; the outcome's counter."""
        if f is not None and f.legacy and self._has_local_data(f):
            log.warning("%r carries a record of an older hsmfs (user.* xattrs) and local "
                        "data: kept as a local file; object %r is not served", rel, key)
            return None
        if f is None or f.record is None:
            if f is not None and not f.legacy:
                log.warning("skipping object %r: a local file that is not a stub holds %r",
                            key, rel)
                return None
            if f is None and not self.tree.parents_are_dirs(rel):
                # *at() calls follow symlinks in parent components: a symlink planted in the
                # tree (kernel door: apps write here) must not take a stub outside.
                log.warning("skipping object %r: a parent of %r is not a directory", key, rel)
                return None
            if self._create(rel, info, replace=f):
                return "replaced" if f is not None else "created"
            return None
        if f.record.version.key != key:
            log.warning("skipping object %r: %r holds a copy of %r (renamed locally)", key,
                        rel, f.record.version.key)
            self._adopt(f, f.record)
            return None
        return self._reconcile(f, f.record, info)

    def _size_checked(self, f: Found) -> Found:
        """Transition *local write*, found at start: a clean (or stale) file whose length or
        mtime is not its version's was changed while no door saw it (a resident file raises no
        access events; or no daemon ran).  hsmfs keeps a clean copy's mtime at its version's
        (stubs are made with it, and every fill puts it back), so any other mtime is a
        program's write.  Persisted before anything else looks at it: ``owed`` lowered to the
        length if it is shorter, ``sync=dirty`` (``conflict`` for a stale copy), fsync.  What
        it cannot see: a write that put the mtime back (``touch -r``) without changing the
        length."""
        record = f.record
        if record is not None and record.releasing:
            return self._release_interrupted(f, record)
        if (record is None or record.sync not in (CLEAN, STALE)
                or (f.size == record.version.size
                    and abs(f.mtime - record.version.mtime) < MTIME_SLACK_S)):
            return f
        owed = min(record.owed, f.size)
        sync = DIRTY if record.sync == CLEAN else CONFLICT  # a changed stale copy conflicts
        try:
            fd = self.tree.open_checked(f.rel, f.ino, f.gen)
        except (OSError, Changed):
            return f
        try:
            if record.sync == CLEAN and f.size == record.version.size == record.owed \
                    and _holds_exactly(fd, record.version):
                # Every byte local and S3's (the MD5 is the ETag): the mtime was moved by a
                # fill that died before it put it back (or by a write of the same bytes).
                # Nothing local to keep: the clean point is put back, the file stays clean.
                os.utime(fd, (os.fstat(fd).st_atime, record.version.mtime))
                log.info("%r: its mtime moved, its bytes are its version's (a fill cut short "
                         "by a crash): clean, the version's mtime put back", f.rel)
                return dataclasses.replace(f, mtime=record.version.mtime)
            if owed < record.owed:
                write_owed(fd, owed)
            write_sync(fd, sync, durable=True)
        finally:
            os.close(fd)
        log.info("%r is %d bytes (mtime %.3f), its version %d (mtime %.3f): changed locally, "
                 "now %s", f.rel, f.size, f.mtime, record.version.size, record.version.mtime,
                 sync)
        return dataclasses.replace(f, record=Record(record.version, owed, sync, record.remote))

    def _release_interrupted(self, f: Found, record: Record) -> Found:
        """A release was punching this file when hsmfs died (``X_RELEASING``).  Only a clean
        file at its version's length is released, and under the lease no program could open
        it, so a moved mtime on a file with no data below ``owed`` is the punch's: the mtime
        is put back and the file stays clean (a stub).  With data left, the punch never ran
        and a moved mtime is a program's write since: the usual rule (dirty).  The marker
        goes either way."""
        try:
            fd = self.tree.open_checked(f.rel, f.ino, f.gen)
        except (OSError, Changed):
            return f
        try:
            moved = abs(f.mtime - record.version.mtime) >= MTIME_SLACK_S
            if (moved and record.sync == CLEAN and f.size == record.version.size == record.owed
                    and not has_data(fd, record.owed)):
                st = os.fstat(fd)
                os.utime(fd, (st.st_atime, record.version.mtime))
                log.info("%r: its release was interrupted after the punch: a clean stub, "
                         "the version's mtime put back", f.rel)
                f = dataclasses.replace(f, mtime=record.version.mtime)
            write_releasing(fd, False)
        finally:
            os.close(fd)
        return self._size_checked(dataclasses.replace(
            f, record=dataclasses.replace(record, releasing=False)))

    def _adopt_tree(self, found: dict[str, Found]) -> PopulateReport:
        kept = 0
        for f in found.values():
            if f.record is not None:
                self._adopt(f, f.record)
                kept += 1
        log.info("adopted %s as it is: %d stubs", self.cfg.cache_dir, kept)
        return PopulateReport(0, kept, 0, 0, [], 0)

    def _reconcile(self, f: Found, record: Record, info: ObjectInfoLike) -> str:
        """One file whose object is listed: adopt it, or apply a remote change."""
        if record.version.etag == info.version.etag:
            if record.sync in (STALE, CONFLICT):
                # The listing shows this very version again (S3 went back to it): the side
                # state no longer holds.
                record = self._set_sync(f, DIRTY if record.sync == CONFLICT else CLEAN, record)
            self._adopt(f, record)
            return "kept"
        return self._remote_changed(f, record, info)

    def _create(self, rel: str, info: ObjectInfoLike, *, replace: Found | None) -> bool:
        """Transition *create*: a new stub at ``rel`` (``replace``: over the file the scan
        found there, which holds nothing local; exchanged, checked again, and put back if an
        application changed it meanwhile).

        Persists, in staging: size, record, view, mode, times; then the guard (the kernel
        door's mark); then the rename makes it reachable.  Crash before the rename: a leftover
        in staging, deleted at the next start, and the old file (if any) untouched.  After: a
        complete stub.  A program holding the replaced file keeps it and is served as a
        superseded stub (:meth:`lookup`)."""
        v = info.version
        resident = v.size == 0  # nothing to fetch

        def guard(fd: int) -> None:
            for listener in self.listeners:
                listener.on_stub(fd, resident)

        try:
            ino, gen = self.tree.create_stub(
                rel, v, info.mode, guard,
                replace=None if replace is None else (replace.ino, replace.gen))
        except Changed:
            raise
        except OSError as exc:
            log.warning("skipping object %r: cannot create its stub %r: %s", v.key, rel, exc)
            return False
        old = self.registry.by_path.get(rel)
        if old is not None:
            self._supersede(old, forget=True)
        # A new stub has no data: its range map is known without a scan.
        self.registry.add(Stub(path=rel, version=_remote(v), ino=ino, gen=gen, owed=v.size,
                               ranges=RangeMap(), local=resident))
        return True

    def _adopt(self, f: Found, record: Record) -> Stub | None:
        """Transition *adopt*: a file with a record found at start.

        Residency is re-derived from the extents below ``owed`` here, at every start, never
        taken from a word (a forged or crash-stale word cannot make a hole look resident).
        Persists nothing (the view word is corrected if it says otherwise).  The guard is put
        back (an ignore mask only if every owed byte is data).
        """
        try:
            fd = self.tree.open_rw(f.rel)
        except OSError as exc:
            log.warning("cannot adopt %r: %s", f.rel, exc)
            return None
        try:
            st = os.fstat(fd)
            if (st.st_ino, generation(fd)) != (f.ino, f.gen):
                log.warning("%r changed while the tree was scanned; not adopted", f.rel)
                return None
            ranges = RangeMap(data_extents(fd, record.owed))
            stub = Stub(path=f.rel, version=record.version, ino=f.ino, gen=f.gen,
                        owed=record.owed, sync=record.sync, remote=record.remote,
                        ranges=ranges, local=ranges.covers(0, record.owed),
                        pinned=read_pinned(fd))
            self._write_view_if_changed(fd, stub)
            self._adopt_error(fd, stub)
            self.registry.add(stub)
            for listener in self.listeners:
                listener.on_stub(fd, stub.local)
            return stub
        finally:
            os.close(fd)

    def _remote_changed(self, f: Found, record: Record, info: ObjectInfoLike) -> str:
        """Transition *remote change* (found by a listing): S3 holds another version.

        * local changes (``dirty``/``conflict``) → ``conflict``: kept, reported, never replaced;
        * clean bytes local → ``stale``: resident bytes still read, missing ones fail with
          EIO, nothing of the new version is stitched in;
        * nothing local → a fresh stub of the new version replaces it (:meth:`_create`).

        Persists the sync word (durably for ``conflict``) before anything else; the replace is
        a rename, atomic.  Crash before: the next start decides again, the same way.
        """
        if record.sync in (DIRTY, CONFLICT):
            record = self._set_sync(f, CONFLICT, record, remote=info.version.etag)
            log.warning("%r: local changes to version %s, and S3 now holds %s: conflict "
                        "(the local file is kept)", f.rel, record.version.etag,
                        info.version.etag)
            self._adopt(f, record)
            return "conflicts"
        if self._has_local_data(f):
            record = self._set_sync(f, STALE, record, remote=info.version.etag)
            log.info("%r: version %s is partly local and S3 now holds %s: stale", f.rel,
                     record.version.etag, info.version.etag)
            self._adopt(f, record)
            return "stale"
        return "replaced" if self._create(f.rel, info, replace=f) else "kept"

    def _remote_gone(self, f: Found, record: Record) -> str:
        """Transition *remote delete*: the listing no longer names the object.  A file with
        nothing local goes (``removed``).  A file with local bytes stays: ``conflict`` if it
        holds recorded local changes, else ``stale`` with the remote gone — an in-place write
        of a resident file raises no event and may not be recorded (issue 11), and a delete
        must never take a program's bytes with it.  A program holding a removed file keeps it
        (served as superseded).  Persists the sync word (durably for conflict) first."""
        if record.sync in (DIRTY, CONFLICT):
            record = self._set_sync(f, CONFLICT, record, remote=GONE)
            log.warning("%r: local changes to version %s, and the object is gone from S3: "
                        "conflict (the local file is kept)", f.rel, record.version.etag)
            self._adopt(f, record)
            return "conflicts"
        if self._has_local_data(f):
            if record.sync != STALE or record.remote != GONE:
                record = self._set_sync(f, STALE, record, remote=GONE)
            log.info("%r: the object is gone from S3; its local bytes are kept (stale)", f.rel)
            self._adopt(f, record)
            return "stale"
        self.tree.unlink(f.rel, f.ino, f.gen)
        gone = self.registry.by_path.get(f.rel)
        if gone is not None:
            self._supersede(gone, forget=True)
        return "removed"

    def _set_sync(self, f: Found, sync: str, record: Record, *,
                  remote: str | None = None) -> Record:
        fd = self.tree.open_checked(f.rel, f.ino, f.gen)
        try:
            write_sync(fd, sync, remote, durable=sync in (DIRTY, CONFLICT))
        finally:
            os.close(fd)
        return Record(record.version, record.owed, sync,
                      remote if remote is not None else record.remote)

    def _has_local_data(self, f: Found) -> bool:
        """Whether any byte of the file, up to its length, is data (not only below ``owed``:
        bytes a program wrote past a truncate are local data too)."""
        fd = self.tree.open_checked(f.rel, f.ino, f.gen)
        try:
            return has_data(fd, max(os.fstat(fd).st_size, 1))
        finally:
            os.close(fd)

    async def _adopt_orphan(self, fd: int, ino: int, gen: int, record: Record) -> Stub | None:
        """A file with a record that the registry does not know (superseded in an earlier
        worker's life, renamed, or replaced while a program held it): serve it from its
        record, filling through a dup of the door's fd (no path leads to it)."""
        def load() -> tuple[int, RangeMap]:
            own = os.dup(fd)
            try:
                return own, RangeMap(data_extents(own, record.owed))
            except BaseException:
                os.close(own)
                raise

        own, ranges = await trio.to_thread.run_sync(load)
        raced = self.registry.by_ino.get(ino)
        if raced is not None and raced.gen == gen:
            os.close(own)  # another event on the same inode got here first: one Stub per inode
            return raced
        stub = Stub(path=f"<{record.version.key} inode {ino}>", version=record.version,
                    ino=ino, gen=gen, owed=record.owed, sync=record.sync, remote=record.remote,
                    ranges=ranges, local=ranges.covers(0, record.owed), superseded=True,
                    pinned=record.pinned,
                    fd=own if _writable(own) else None)
        if stub.fd is None:
            os.close(own)
        self.registry.by_ino[ino] = stub
        log.info("serving %s from its record (its path no longer leads to it)", stub.path)
        return stub

    def _supersede(self, stub: Stub, *, forget: bool = False) -> None:
        """Transition *supersede*: the path no longer leads to ``stub``'s inode.  Persists
        nothing (the record travels with the inode).  Doors holding the stub keep being served
        and its unfilled ranges fill through their fds.  ``forget``: hsmfs itself removed or
        replaced the file, so it is dropped from the index too (a kernel-door event on it later
        finds it again by its record, :meth:`lookup`); found lazily, it stays indexed by inode,
        as a program is using it right now."""
        if forget:
            self.registry.forget(stub)
            if not self.engine.busy(stub):
                self._close_fd(stub)
        if stub.superseded:
            return
        stub.superseded = True
        self.registry.unlink_path(stub)
        log.info("%r no longer leads to the stub of %r (inode %d); programs holding it are "
                 "still served", stub.path, stub.version.key, stub.ino)

    def _adopt_error(self, fd: int, stub: Stub) -> None:
        """``user.hsm.error`` survives a restart (it is history, with its time), except on a
        file found resident: nothing is left to fetch, so it is removed (the view put right
        at start).  Kept in memory only so a later success knows to remove it; never read to
        decide anything else (a forged value costs at most that removal)."""
        with contextlib.suppress(OSError):
            try:
                value = os.getxattr(fd, X_ERROR).decode(errors="replace")
            except OSError:
                return
            if stub.local:
                write_error(fd, None)
            else:
                stub.error = value

    def _write_view_if_changed(self, fd: int, stub: Stub) -> None:
        with contextlib.suppress(OSError):
            word = stub.state.encode()
            try:
                current = os.getxattr(fd, X_VIEW)
            except OSError:
                current = b""
            if current != word:
                write_view(fd, stub.state)

    # -- transition: refresh (a listing while the doors serve) --------------------------------

    async def refresh(self, objects: Iterable[ObjectInfoLike], prefix: str = "",
                      under: str = "", *, held: dict[int, RemoteVersion] | None = None,
                      busy: Callable[[Stub], bool] | None = None,
                      shallow: bool = False) -> RefreshReport:
        """Make the tree, or only the subtree ``under`` (relative to the root), follow a
        listing while the doors serve it, by the rules of :meth:`populate`: a new object gets a
        stub (made and guarded in staging); a changed one is replaced if nothing of it is
        local, made ``stale`` if clean bytes are, ``conflict`` if local changes are; a deleted
        one goes if nothing of it is local, else is kept (``stale`` with remote ``-``, or
        ``conflict``).  ``objects`` must be the whole listing under ``under``: a path it does
        not name is a remote delete.

        :meth:`populate` is for a start, before any door serves: it makes a new in-memory
        :class:`Stub` for every file (a door's stub, pins, flights and access pattern would be
        orphaned), reads a fill's moved mtime as a program's write, and changes the index from
        a worker thread.  Here a worker thread only looks (scan, records, extents) and
        decides; each change to a file hsmfs serves is made on the loop under the file's lock
        (truncate, mark_dirty and archive's record step take it too), after its state is read
        again in memory.  A replace or a removal is done only when no door serves bytes of the
        file (no pin, no flight) and with no await between that check and the rename, so no
        read, fill or write can start on the old inode in between; a program that holds the
        old inode keeps it, served from its record as a superseded stub (right bytes while S3
        has that version, EIO after, never zeros).  Persists per change exactly what the
        transition of :meth:`populate` persists; a crash at any point leaves what the next
        start (or refresh) decides again the same way.

        ``held``: each stub's version when the listing began (:meth:`versions`); a stub whose
        version changed since (an archive recorded its upload) is left for the next refresh,
        as the listing may predate that upload.  ``busy(stub)``: an archive of it is under
        way (its upload may be in the listing before its record is written): left too.

        ``shallow`` (``-o lazy``: :mod:`hsmfs.lazy`): ``under`` is a directory and ``objects``
        its Delimiter listing: only the files directly in it are reconciled (a file of a
        subdirectory is neither listed nor taken for deleted).
        """
        started = time.monotonic()

        def skip(stub: Stub) -> bool:
            return ((held is not None and held.get(stub.ino) != stub.version)
                    or (busy is not None and busy(stub)))

        def wanted(rel: str) -> bool:
            return posixpath.dirname(rel) == under if shallow else _below(rel, under)

        objects = [o for o in objects if wanted(
            (key_to_relpath(o.version.key, prefix)[0] or "").rstrip("/"))]
        # Stubs renamed away from their key's path (on the loop: the registry is its), so the
        # listing does not make them again where they were (populate's rule, _removed_locally).
        moved_away = {(st.version.key, st.version.etag)
                      for st in self.registry.by_path.values()
                      if st.version.key != prefix + st.path
                      and key_to_relpath(st.version.key, prefix)[0] != st.path}
        steps, seen, rejected = await trio.to_thread.run_sync(
            self._refresh_plan, objects, prefix, under, skip, shallow, moved_away)
        report = RefreshReport(len(objects), rejected=rejected)
        # Renames first (the kernel door does not see them), so that a renamed stub is not
        # taken for a removed one; then stubs whose file is gone are let go, before a new
        # stub may take their path.
        for step in steps:
            if step.what == "moved":
                self._follow_rename(step)
        await self._forget_missing(under, seen, shallow)
        for step in steps:
            if step.what == "moved":
                continue
            if step.stub is not None and skip(step.stub):
                continue
            change = await self._apply(step)
            if change is not None:
                report.changes.append(change)
                crashpoint.crash_point(crashpoint.REFRESH, "applied")
        st = self.refresh_stats
        st.refreshes += 1
        st.last_at = time.time()
        st.last_s = time.monotonic() - started
        st.last_counts = report.counts()
        st.last_error = None
        # A period of a few seconds must not fill the log with refreshes that changed nothing.
        log.log(logging.INFO if report.changes else logging.DEBUG,
                "refreshed %s/%s: %d objects listed, %s", self.cfg.cache_dir, under,
                report.listed, ", ".join(f"{n} {k}" for k, n in st.last_counts.items()))
        return report

    def versions(self) -> dict[int, RemoteVersion]:
        """Each stub's version now (for :meth:`refresh`'s ``held``)."""
        return {s.ino: s.version for s in list(self.registry.by_ino.values())}

    def _refresh_plan(self, objects: list[ObjectInfoLike], prefix: str, under: str,
                      skip: Callable[[Stub], bool], shallow: bool = False,
                      moved_away: frozenset[tuple[str, str]] | set[tuple[str, str]]
                      = frozenset()) -> tuple[list[_Step], set[str], int]:
        """Worker thread: look, decide, change nothing but directories.  (steps, the paths
        the scan found, refused keys)."""
        by_key = {o.version.key: o for o in objects}
        layout = place(by_key, prefix)
        for key, reason in layout.rejected:
            log.debug("skipping object %r: key %s", key, reason)
        for d in sorted(layout.dirs, key=lambda p: p.count("/")):
            self.tree.mkdir(d)  # the subtree's and its parents (the listing is below it)
        found = {f.rel: f for f in (self._scan_dir(under) if shallow else self._scan(under))}
        seen = set(found)
        removed = self.tombstones.load()  # removed locally: archive --delete decides, not S3
        steps: list[_Step] = []
        for rel, key in sorted(layout.files.items()):
            f = found.pop(rel, None)
            tomb = removed.get(key)
            try:
                etag = by_key[key].version.etag
                gone_here = ((tomb is not None and tomb.etag == etag)
                             or (key, etag) in moved_away)
                step = self._plan_listed(rel, key, by_key[key], f, gone_here, skip)
            except (OSError, Changed) as exc:
                log.warning("%r changed while hsmfs looked at it (%s); left as it is", rel, exc)
                continue
            if step is not None:
                steps.append(step)
        for f in found.values():
            if f.record is None:
                continue
            try:
                step = self._plan_unlisted(f, prefix, skip)
            except (OSError, Changed) as exc:
                log.warning("%r changed while hsmfs looked at it (%s); left as it is", f.rel,
                            exc)
                continue
            if step is not None:
                steps.append(step)
        return steps, seen, len(layout.rejected)

    def _known(self, f: Found) -> Stub | None:
        """The stub hsmfs serves for the file the scan found, if it knows that inode."""
        stub = self.registry.by_ino.get(f.ino)
        return stub if stub is not None and stub.gen == f.gen and not stub.superseded else None

    def _plan_listed(self, rel: str, key: str, info: ObjectInfoLike, f: Found | None,
                     removed: bool, skip: Callable[[Stub], bool]) -> _Step | None:
        if f is None:
            if removed or not self.tree.parents_are_dirs(rel):
                return None  # removed locally, or a parent is not a directory (see populate)
            return _Step("new", rel, info)
        if f.record is None:
            return None  # a local file holds the path: never touched
        stub = self._known(f)
        if stub is None:
            return _Step("adopt", rel, found=f)
        if stub.path != rel:
            return _Step("moved", rel, stub=stub)  # decided at the next refresh, at its path
        if stub.version.key != key or skip(stub):
            return None  # a copy of another object renamed here, or being archived
        if stub.version.etag == info.version.etag:
            # S3 holds this very version (again): a side state about it no longer holds.
            return _Step("unstale", rel, stub=stub) if stub.sync in (STALE, CONFLICT) else None
        if stub.sync in (STALE, CONFLICT) and stub.remote == info.version.etag:
            return None  # decided already
        local = stub.sync in (CLEAN, STALE) and self._has_local_data(f)
        return _Step("changed", rel, info, stub=stub, local=local, found=f)

    def _plan_unlisted(self, f: Found, prefix: str,
                       skip: Callable[[Stub], bool]) -> _Step | None:
        stub = self._known(f)
        if stub is None:
            return _Step("adopt", f.rel, found=f)
        if stub.path != f.rel:
            return _Step("moved", f.rel, stub=stub)
        if key_to_relpath(stub.version.key, prefix)[0] != f.rel or skip(stub):
            return None  # renamed locally (kept, served from its record), or being archived
        if stub.sync in (STALE, CONFLICT) and stub.remote == GONE:
            return None  # decided already
        local = stub.sync in (CLEAN, STALE) and self._has_local_data(f)
        return _Step("gone", f.rel, stub=stub, local=local, found=f)

    def _scan(self, under: str) -> list[Found] | Iterator[Found]:
        """:meth:`Tree.scan` of the subtree ``under`` (a directory or one file)."""
        if not under:
            return self.tree.scan()
        if not self.tree.parents_are_dirs(under):
            return []
        try:
            fd = os.open(under, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=self.root_fd)
        except OSError:
            return []  # absent, or a symlink: nothing of hsmfs's
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                sub = Tree(fd, self.cfg.dir_mode, self.cfg.file_mode)
                return [dataclasses.replace(f, rel=f"{under}/{f.rel}") for f in sub.scan()]
            if not stat.S_ISREG(st.st_mode):
                return []
            record = read_record(fd)
            return [Found(under, st.st_ino, generation(fd), st.st_size, record,
                          record is None and legacy_identity(fd), st.st_mtime)]
        finally:
            os.close(fd)

    def _scan_dir(self, under: str) -> list[Found]:
        """The regular files directly in directory ``under`` (a shallow :meth:`_scan`)."""
        if under and not self.tree.parents_are_dirs(under + "/x"):
            return []
        try:
            dfd = os.open(under or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                          | os.O_CLOEXEC, dir_fd=self.root_fd)
        except OSError:
            return []
        out = []
        try:
            for name in os.listdir(dfd):
                if not under and name == STATE_DIR:
                    continue
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                                 | os.O_NONBLOCK, dir_fd=dfd)
                except OSError:
                    continue  # a symlink, gone: never a stub
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    record = read_record(fd)
                    rel = f"{under}/{name}" if under else name
                    out.append(Found(rel, st.st_ino, generation(fd), st.st_size, record,
                                     record is None and legacy_identity(fd), st.st_mtime))
                except OSError as exc:
                    log.warning("cannot read the record of %r: %s; treated as a local file",
                                name, exc)
                finally:
                    os.close(fd)
        finally:
            os.close(dfd)
        return out

    def _follow_rename(self, step: _Step) -> None:
        """A program renamed a stub where no door saw it (the kernel door sees no renames):
        the index follows, as :meth:`moved` does for the FUSE door."""
        stub = step.stub
        assert stub is not None
        if (not stub.superseded and self.registry.by_path.get(stub.path) is stub
                and step.rel not in self.registry.by_path):
            self.moved({stub.path: step.rel})

    async def _forget_missing(self, under: str, seen: set[str], shallow: bool = False) -> None:
        """Stubs whose path no longer leads to them (removed or replaced by a program where no
        door saw it) are superseded: still served to whoever holds them, never by path."""
        missing = [s for p, s in list(self.registry.by_path.items())
                   if (posixpath.dirname(p) == under if shallow else _below(p, under))
                   and p not in seen]
        if not missing:
            return

        def gone() -> list[Stub]:
            out = []
            for s in missing:
                try:
                    if os.stat(s.path, dir_fd=self.root_fd, follow_symlinks=False).st_ino == s.ino:
                        continue
                except FileNotFoundError:
                    pass
                except OSError:
                    continue  # unsure: keep it
                out.append(s)
            return out

        for s in await trio.to_thread.run_sync(gone):
            if self.registry.by_path.get(s.path) is s:
                self._supersede(s)

    async def _apply(self, step: _Step) -> Change | None:
        try:
            if step.what == "new":
                return await self._refresh_new(step)
            if step.what == "adopt":
                f = step.found
                assert f is not None and f.record is not None
                known = self.registry.by_ino.get(f.ino)
                if known is None or known.gen != f.gen:
                    # A file with a record hsmfs did not know (moved in from elsewhere): served
                    # as it is now; the next refresh decides about its object.  A few syscalls.
                    self._adopt(f, f.record)
                return None
            return await self._refresh_stub(step)
        except (OSError, Changed, Superseded) as exc:
            log.warning("%r changed while hsmfs looked at it (%s); left as it is", step.rel, exc)
            if step.stub is None:
                return None
            return Change(KEPT, step.rel, step.stub.ino, step.stub.ino,
                          "changed while hsmfs looked at it: decided at the next sync")

    def _guard(self, resident: bool) -> Callable[[int], None]:
        def guard(fd: int) -> None:
            for listener in self.listeners:
                listener.on_stub(fd, resident)
        return guard

    async def _refresh_new(self, step: _Step) -> Change:
        """Transition *create* for a refresh: made, recorded and guarded in staging (worker
        thread), then linked in (never over a file that appeared meanwhile: EEXIST)."""
        info = step.info
        assert info is not None
        v = info.version
        ino, gen = await trio.to_thread.run_sync(
            lambda: self.tree.create_stub(step.rel, v, info.mode, self._guard(v.size == 0)))
        self.index_new(step.rel, v, ino, gen)
        return Change(NEW, step.rel, new_ino=ino)

    def index_new(self, rel: str, v: VersionLike, ino: int, gen: int) -> None:
        """A stub just made by :meth:`Tree.create_stub` (a refresh, or ``-o lazy``'s listing
        of a directory) joins the index.  On the loop."""
        old = self.registry.by_path.get(rel)
        if old is not None:
            self._supersede(old)
        self.registry.add(Stub(path=rel, version=_remote(v), ino=ino, gen=gen,
                               owed=v.size, ranges=RangeMap(), local=v.size == 0))

    async def _refresh_stub(self, step: _Step) -> Change | None:
        stub = step.stub
        assert stub is not None
        async with self._file_lock(stub.ino):
            if (stub.superseded or self.registry.by_path.get(step.rel) is not stub
                    or stub.version is not step.version):
                return None  # renamed, removed, replaced or archived meanwhile
            return await self._refresh_decide(step, stub)

    async def _refresh_decide(self, step: _Step, stub: Stub) -> Change | None:
        """Under the file's lock, on what memory says now (a door may have written, filled
        or truncated since the scan)."""
        rel, ino = step.rel, stub.ino
        if step.what == "unstale":
            if stub.sync not in (STALE, CONFLICT):
                return None
            sync = DIRTY if stub.sync == CONFLICT else CLEAN
            await self._refresh_record(stub, sync, None)
            return Change(KEPT, rel, ino, ino, f"S3 holds this version again: {stub.state}")
        gone = step.what == "gone"
        remote = GONE if gone else step.info.version.etag  # type: ignore[union-attr]
        said = "the object is gone from S3" if gone else f"S3 now holds {remote}"
        if stub.sync in (DIRTY, CONFLICT):
            await self._refresh_record(stub, CONFLICT, remote)
            log.warning("%r: local changes to version %s, and %s: conflict (the local file "
                        "is kept)", rel, stub.version.etag, said)
            return Change(KEPT if gone else CONFLICT, rel, ino, ino,
                          f"local changes kept: conflict ({said})")
        # Memory is the truth of what is local below ``owed`` once the map is loaded (a fill
        # or a release since the scan); else what the scan saw, and the replace below checks
        # the extents again.  (Bytes above ``owed`` exist only in dirty files: handled above.)
        ranges = stub.ranges
        if (stub.local and stub.owed) or (ranges.total() > 0 if ranges is not None
                                          else step.local):
            await self._refresh_record(stub, STALE, remote)
            log.info("%r: version %s is partly local and %s: stale", rel, stub.version.etag,
                     said)
            return Change(KEPT if gone else STALE, rel, ino, ino,
                          f"local bytes of {stub.version.etag} kept: stale ({said})")
        if stub.pins or self.engine.busy(stub):
            return Change(KEPT, rel, ino, ino, "a door is serving it: decided at the next sync")
        # No await from here to the end: no door can start to read, fill or write the old
        # inode between the check above and the rename (a few metadata syscalls, on the loop).
        if gone:
            self.tree.unlink(rel, ino, stub.gen)  # Changed if it holds data now
            self._supersede(stub, forget=True)
            return Change(REMOVED, rel, old_ino=ino)
        info = step.info
        assert info is not None
        v = info.version
        new_ino, gen = self.tree.create_stub(rel, v, info.mode, self._guard(v.size == 0),
                                             replace=(ino, stub.gen))
        self._supersede(stub, forget=True)
        self.registry.add(Stub(path=rel, version=_remote(v), ino=new_ino, gen=gen, owed=v.size,
                               ranges=RangeMap(), local=v.size == 0))
        return Change(REFRESHED, rel, ino, new_ino)

    async def _refresh_record(self, stub: Stub, sync: str, remote: str | None) -> None:
        """Persist a sync word (durably for dirty and conflict) on the very inode the stub is,
        then memory."""
        word = sync if sync != CLEAN else stub.residency

        def persist() -> None:
            fd = self.tree.open_checked(stub.path, stub.ino, stub.gen)
            try:
                write_sync(fd, sync, remote, durable=sync in (DIRTY, CONFLICT))
                with contextlib.suppress(OSError):
                    write_view(fd, word)
            finally:
                os.close(fd)

        await trio.to_thread.run_sync(persist)
        stub.sync = sync
        stub.remote = remote

    # -- the one entry point of both doors ----------------------------------------------------

    async def ensure(self, stub: Stub, start: int, stop: int, intent: Intent = Intent.READ, *,
                     fd: int | None = None) -> Pin:
        """Make ``[start, stop)`` of ``stub`` local for ``intent``; return a :class:`Pin` the
        door holds while it serves those bytes, or raise why they cannot be.

        ``fd``: the door's own fd of the file (the kernel door's event fd), used to fill a
        stub whose path no longer leads to it.  Per intent: ``EXEC`` and ``WHOLE`` make the
        whole file local; ``OPEN`` too when the file is at most ``open_fill_max`` (so copy
        tools that trust holes copy the right bytes); ``OPEN_TRUNC`` and ``TRUNCATE`` fetch
        nothing (``TRUNCATE``: ``start`` is the new size).  Ranges past ``owed`` are local
        bytes.  Small files are fetched whole on first touch.  Sequential reads fetch whole
        chunks and read ahead; random reads fetch only the pages they touch.
        """
        while (releasing := self._releasing.get(stub.ino)) is not None:
            # Punching now: wait, then fetch what it took.  No await between this check and
            # the Pin, so a release either sees the pin or finishes before it is taken.
            await releasing.wait()
        pin = Pin(stub, self._unpinned)
        stub.used_at = time.monotonic()
        try:
            await self._ensure(stub, start, stop, intent, fd)
        except BaseException as exc:
            pin.release()
            if isinstance(exc, (HsmError, OSError)):
                # Before the door answers: a program that gets the errno and then reads
                # user.hsm.error finds this failure, not an older one.
                with trio.CancelScope(shield=True):
                    await self.note_failure(stub, exc)
            raise
        return pin

    async def _ensure(self, stub: Stub, start: int, stop: int, intent: Intent,
                      fd: int | None) -> None:
        if intent is Intent.TRUNCATE:
            await self.truncate(stub, start, fd=fd)
            return
        if intent is Intent.OPEN_TRUNC:
            return
        if intent is Intent.WRITE:
            await self._ensure(stub, 0, stub.owed, Intent.WHOLE, fd)
            await self.mark_dirty(stub, fd=fd)
            return
        if intent is Intent.OPEN:
            limit = self.cfg.open_fill_max
            if limit == 0 or 0 < limit < stub.owed:
                return
        if stub.local:
            if intent is not Intent.OPEN:
                self.counters.hits += 1
            return
        size = stub.owed
        whole = intent is not Intent.READ or self._whole_on_touch(stub)
        if whole:
            start, stop = 0, size
        start, stop = max(start, 0), min(stop, size)
        if stop <= start:
            return
        ranges = await self._ranges(stub, fd)
        if ranges.covers(start, stop):
            self._account_hit(stub, start, stop, whole)
            return
        sequential = (stub.pattern.note(start, stop, self.cfg.readahead_max)
                      if not whole else True)
        # Whole chunks once a stream's window has grown to a chunk; pages before that, so a
        # stream that turns out to be luck costs little.
        whole_chunks = whole or (sequential and stub.pattern.window >= self.cfg.chunk_size)
        self.counters.misses += 1
        if not stub.fetchable:
            raise ObjectChanged(f"{stub.version.key!r} changed in S3 since version "
                                f"{stub.version.etag}; {stub.path!r} is {stub.sync}")
        if stub.superseded:
            await self._writable(stub, fd)
        if whole:
            # Before our own GET, so the siblings' GETs overlap it.
            self._read_siblings_ahead(stub)
        else:
            # Like Linux's sync + async read-ahead, sent together: the window's GETs fly
            # alongside the one the reader waits for, not a round trip after it (with
            # 20-80 ms of S3 latency, every stall of a stream used to cost two).
            self._read_ahead(stub, stop)
        try:
            await self.engine.fetch(stub, start, stop, wait=True, whole_chunks=whole_chunks)
        except Superseded:
            # The flight found the path leading elsewhere (checked there, in its own thread,
            # so the common miss pays no extra hop): fill through the door's fd instead.
            if fd is None:
                raise
            await self._writable(stub, fd)
            await self.engine.fetch(stub, start, stop, wait=True, whole_chunks=whole_chunks)
        if stub.error is not None:
            # A reader's miss was served: whatever failed before is over for this file.
            await trio.to_thread.run_sync(self._clear_failure, stub)
        if not whole:
            self._read_ahead(stub, stop)

    def note_hit(self, stub: Stub, start: int, stop: int) -> None:
        """A door served ``[start, stop)`` after :meth:`resident_file`: keep the same books as
        :meth:`ensure` keeps for a hit (counters, access pattern, read-ahead)."""
        stub.used_at = time.monotonic()
        if stub.local:
            self.counters.hits += 1
            return
        self._account_hit(stub, max(start, 0), min(stop, stub.owed), self._whole_on_touch(stub))

    def _whole_on_touch(self, stub: Stub) -> bool:
        """Small files are fetched whole on first touch: one GET, no access pattern."""
        return stub.owed <= self.cfg.small_file

    def _account_hit(self, stub: Stub, start: int, stop: int, whole: bool) -> None:
        self.counters.hits += 1
        if not whole:
            # A stream reading resident bytes moves its window on: the read-ahead it earns.
            stub.pattern.note(start, stop, self.cfg.readahead_max)
            self._read_ahead(stub, stop)

    def note_served(self, nbytes: int) -> None:
        self.counters.served_bytes += nbytes

    def _unpinned(self, stub: Stub) -> None:
        """A pin was released.  A superseded stub keeps a dup of a door's fd only while it is
        in use: that fd keeps a removed inode (and its blocks) alive."""
        if stub.superseded and stub.pins == 0 and not self.engine.busy(stub):
            self._close_fd(stub)

    # -- transitions: the local namespace (a door that sees renames and removals) ------------

    def moved(self, moves: dict[str, str]) -> None:
        """Transition *local rename*, told by a door right after it renamed: every stub at a
        path in ``moves`` (old → new), or below one as a directory, now lives at the new path.
        Persists nothing: the record keeps the key it is a copy of, so a renamed copy is served
        from its record as before, and at the next start a record whose key does not map to
        its path is kept and served as renamed (archive --delete makes S3 follow).  A stub that
        stood at a destination is superseded (programs holding it are still served)."""
        by_path = self.registry.by_path
        moving: list[tuple[Stub, str]] = []
        for path, stub in list(by_path.items()):
            for old, new in moves.items():
                if path == old:
                    moving.append((stub, new))
                    break
                if path.startswith(old + "/"):
                    moving.append((stub, new + path[len(old):]))
                    break
        movers = {id(stub) for stub, _ in moving}
        for _, target in moving:
            displaced = by_path.get(target)
            if displaced is not None and id(displaced) not in movers:
                self._supersede(displaced)
        for stub, _ in moving:
            self.registry.unlink_path(stub)
        for stub, target in moving:
            stub.path = target
            self.registry.add(stub)

    def unlinked(self, path: str, ino: int) -> None:
        """Transition *local removal*, told by a door right after it removed ``path`` (which
        was inode ``ino``): a stub there is superseded, still served to programs holding it.
        Persists nothing (the inode is gone once the last holder closes it)."""
        stub = self.registry.by_path.get(path)
        if stub is not None and stub.ino == ino:
            self._supersede(stub)
            # Remembered across restarts, or the next start's listing makes it again
            # (hsmfs.tombstones; one appended line, no fsync: losing it undoes the removal,
            # never a byte).
            v = stub.version
            self.tombstones.add(v.key, v.etag, v.version_id, v.size, v.mtime, path)

    # -- transition: local write --------------------------------------------------------------

    async def mark_dirty(self, stub: Stub, *, fd: int | None = None) -> None:
        """Transition *local write*: the file holds (or is about to hold) changes S3 does not
        have.  ``clean`` becomes ``dirty``, ``stale`` becomes ``conflict``; persisted and
        fsync'd before this returns, so a door that calls it before letting a write land
        leaves a crash with a dirty file, never a changed file marked clean.  (A crash right
        after may leave a dirty file with no change: harmless, the next archive finds it equal.)
        Through :attr:`Intent.WRITE` every owed byte is made local first: once a file holds
        local changes, a hole in it is the program's data, never a byte S3 owes (DESIGN §4).
        """
        if stub.sync not in (CLEAN, STALE):
            return  # dirty or conflict already (read again under the lock below)
        # One per-file lock with truncate and archive's record step: a file recorded clean by
        # an archive while this write was announced is made dirty again, never left clean.
        lock = self._truncating.setdefault(stub.ino, trio.Lock())
        try:
            async with lock:
                await self._mark_dirty(stub, fd)
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._truncating.pop(stub.ino, None)

    async def _mark_dirty(self, stub: Stub, fd: int | None) -> None:
        sync = {CLEAN: DIRTY, STALE: CONFLICT}.get(stub.sync)
        if sync is None:
            return  # dirty or conflict already
        await self._writable(stub, fd)

        def persist() -> None:
            rw = self.writable_fd(stub)
            write_sync(rw, sync, durable=True)
            with contextlib.suppress(OSError):
                write_view(rw, sync)

        await trio.to_thread.run_sync(persist)
        stub.sync = sync
        log.info("%r changed locally: %s", stub.path, sync)
        if stub.ranges is not None and not stub.local:
            # A write seen after the fact may have landed in a hole: the map would still call
            # it missing and a later fill would write S3's bytes over the program's.  Read
            # residency again from the extents, once no flight can be writing.
            await self.engine.wait_idle(stub)
            stub.ranges = await trio.to_thread.run_sync(self._load_ranges, stub)

    # -- transition: local truncate ----------------------------------------------------------

    async def truncate(self, stub: Stub, new_size: int, *, fd: int | None = None) -> None:
        """Transition *local truncate*: the file is (about to be) ``new_size`` bytes long.

        The kernel door calls this while the truncating program waits (so nothing is fetched:
        the bytes above the new size are thrown away, and the page holding the new end is a
        hole that stays owed); :meth:`lookup` calls it when it finds a size below ``owed``
        after the fact.  In order: flights of the file finish (none may write past the new end
        after the truncate lands); ``owed`` lowered to the new size (bytes the program cut off
        must never be fetched back over what it writes next) and ``sync=dirty`` (``conflict``
        for a stale copy), fsync'd; then memory; then flights once more (none planned on the
        old ``owed`` may still run) — all before the program's truncate may land.  One
        truncate of a file at a time, and ``owed`` never rises.  Crash before the fsync:
        nothing recorded and nothing changed (the blocked truncate is re-dispatched to the
        next worker).  Crash after: dirty and owed are durable; if the truncate then never
        lands (the program was killed while it waited), bytes between the new ``owed`` and the
        old size stay holes that read as zeros in a file marked dirty: the one window,
        recorded in docs/design.md.
        """
        lock = self._truncating.setdefault(stub.ino, trio.Lock())
        try:
            async with lock:
                await self._truncate(stub, new_size, fd)
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._truncating.pop(stub.ino, None)

    async def _truncate(self, stub: Stub, new_size: int, fd: int | None) -> None:
        size_now = await trio.to_thread.run_sync(_size_of, fd) if fd is not None else None
        if new_size >= stub.owed and (size_now is None or new_size == size_now):
            return  # no byte S3 owes is cut off, and the length does not change
        await self.engine.wait_idle(stub)
        await self._writable(stub, fd)
        lowered = min(new_size, stub.owed)
        sync = {CLEAN: DIRTY, STALE: CONFLICT}.get(stub.sync, stub.sync)

        def persist() -> None:
            rw = self.writable_fd(stub)
            if lowered < stub.owed:
                write_owed(rw, lowered)
            if sync != stub.sync:
                write_sync(rw, sync, durable=True)
            else:
                os.fsync(rw)

        await trio.to_thread.run_sync(persist)
        if lowered < stub.owed:
            log.info("%r truncated locally to %d bytes (S3 owed %d): %s", stub.path, new_size,
                     stub.owed, sync)
        stub.owed = min(stub.owed, lowered)
        stub.sync = sync
        if stub.ranges is not None:
            stub.ranges.remove(stub.owed, max(stub.version.size, stub.owed))
        await self.engine.wait_idle(stub)
        if stub.local or (stub.ranges is not None and stub.ranges.covers(0, stub.owed)):
            stub.local = False
            await trio.to_thread.run_sync(self._mark_local, stub)
        else:
            await trio.to_thread.run_sync(self._write_view, stub)

    # -- transition: release (and the pins that keep a file from it) -------------------------

    @contextlib.asynccontextmanager
    async def _file_lock(self, ino: int) -> AsyncIterator[None]:
        """The per-file lock of truncate, mark_dirty and archive's record step."""
        lock = self._truncating.setdefault(ino, trio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._truncating.pop(ino, None)

    def release_refusal(self, stub: Stub) -> tuple[str, int] | None:
        """Why ``stub`` may never be released as it stands (EPERM), or is in use (EBUSY)."""
        if stub.superseded:
            return "no path leads to this copy any more", errno.EPERM
        if stub.sync == DIRTY:
            return ("dirty: it holds local changes S3 does not have (hsmfs archive it "
                    "first)"), errno.EPERM
        if stub.sync == CONFLICT:
            return ("conflict: it holds local changes and S3 holds another version; its "
                    "bytes are the only copy"), errno.EPERM
        if stub.sync == STALE:
            now = "is gone" if stub.remote == GONE else f"holds {stub.remote}"
            return (f"stale: S3 {now}, so version {stub.version.etag} could not be fetched "
                    "back"), errno.EPERM
        if stub.pinned:
            return "pinned (hsmfs unpin allows release)", errno.EPERM
        if stub.pins or self.engine.busy(stub) or stub.ino in self._releasing:
            return "being read or fetched right now", errno.EBUSY
        return None

    async def release(self, stub: Stub, *, dry_run: bool = False,
                      wait: bool = True) -> Released:
        """Transition *release*: punch a clean file back to a stub, freeing its space; size,
        mode, times and remote identity kept.

        Only a clean copy with a remote identity (refused: dirty, conflict, stale, pinned; a
        local file has no record and never reaches here), and never while a door serves its
        bytes (a :class:`Pin`), a flight fills it, or any program has it open or mapped.  Under
        the file's lock (shared with truncate, mark_dirty and archive's record step), so no
        write or archive interleaves.  In order:

        1. on the loop, with no await in between: the checks, every door agrees (the FUSE
           door: no handle open, its idle fd closed), :meth:`ensure` made to wait, the
           in-memory range map dropped and ``local`` cleared.  Residency is the extents, so
           from here a crash can only leave *fewer* bytes counted than are there;
        2. in one worker thread (nothing in it needs the loop, so an open of this file that
           blocks on the lease anywhere, even on the loop, cannot hold the lease up): an
           O_RDWR fd through the private door; the guard back (``on_released``: new opens
           raise events again); ``F_SETLEASE F_WRLCK`` (EAGAIN: a program has it open, mapped
           or running → refused, the guard's ignore mask put back); the clean point checked
           under the lease (a length or mtime not its version's is a write nobody announced:
           refused, and the file made dirty); the marker ``X_RELEASING``; the punch of
           ``[0, owed)``; the version's mtime put back (the punch moved it); the view
           ``stub``; the marker removed; ``F_UNLCK``, close;
        3. doors told (the FUSE door drops the kernel's page cache of the inode); waiters go.

        Nothing is fsync'd: a punch lost to a power cut leaves the bytes resident, which is
        right.  Crash before the punch: nothing changed on disk (the next start derives
        ``resident`` and puts the ignore mask back).  During the punch: a partial file, its
        holes fetched again on read.  Between the punch and the mtime: the next start finds
        the marker on a clean file with no data and a moved mtime, puts the mtime back and
        keeps it a clean stub (without the marker it took the punch's mtime for a program's
        write: dirty, so not releasable, and a later remote change made it a false
        conflict).  After: a stub, the view corrected and the marker removed at start.
        (``tests/t4_crash.py`` kills the daemon at each of these steps.)

        ``wait=False`` (eviction): refused (EBUSY) at once if the file's lock is held, never
        waited for: its holder (a truncate, a write) may itself wait for a flight that waits
        for the evictor, which would then wait here for ever.
        """
        if not wait and self.file_lock_held(stub.ino):
            return Released("refused", "being written or truncated right now", errno=errno.EBUSY)
        async with self._file_lock(stub.ino):
            refusal = self.release_refusal(stub)
            if refusal is not None:
                return Released("refused", refusal[0], errno=refusal[1])
            await self._ranges(stub)
            resident = stub.resident_bytes
            if resident == 0:
                return Released("stub", "nothing local")
            if dry_run:
                return Released("would release", resident_bytes=resident)
            # Awaited above: look again, then no await until the thread runs.
            refusal = self.release_refusal(stub)
            for guard in self.release_guards:
                if refusal is None:
                    why = guard.release_check(stub)
                    refusal = None if why is None else (why, errno.EBUSY)
            if refusal is not None:
                return Released("refused", refusal[0], errno=refusal[1])
            done = self._releasing[stub.ino] = trio.Event()
            saved = stub.local, stub.ranges
            stub.local, stub.ranges = False, RangeMap()
            self._close_fd(stub)  # our own fd would defeat the lease
            try:
                outcome = await trio.to_thread.run_sync(self._release_sync, stub, saved[0])
            except BaseException:
                stub.ranges = None  # unknown: read again from the extents when next needed
                raise
            finally:
                del self._releasing[stub.ino]
                done.set()
            if outcome.result != "released":
                stub.local, stub.ranges = saved
                if outcome.changed:
                    await self._mark_dirty(stub, None)
                return outcome
            self._crash_hook("released")  # on disk a stub; the doors not told yet
            self.releases += 1
            self.released_bytes += resident
            for guard in self.release_guards:
                await guard.released(stub)
            log.info("%r released: %d bytes punched, %d freed", stub.path, resident,
                     outcome.freed)
            return dataclasses.replace(outcome, resident_bytes=resident)

    def _release_sync(self, stub: Stub, was_local: bool) -> Released:
        """Step 2 of :meth:`release` (a worker thread).  ``was_local``: every owed byte was
        data, so a refusal may put the guard's ignore mask back; a partial file keeps its
        events (an ignore mask over its holes would let readers see zeros)."""
        try:
            fd = self.tree.open_checked(stub.path, stub.ino, stub.gen)
        except (OSError, Changed) as exc:
            return Released("refused", f"cannot open it: {exc}", errno=errno.EBUSY)
        try:
            before = os.fstat(fd)
            for listener in self.listeners:
                hook = getattr(listener, "on_released", None)
                if hook is not None:
                    hook(fd)
            # A lease break signals the holder (SIGIO, whose default action kills: measured,
            # KERNEL_FACTS_3 §3).  SIGURG's default is to ignore it; nobody here needs told.
            fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
            try:
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EBUSY):
                    raise
                self._reguard(fd, was_local)
                return Released("refused", "open, mapped or running in a program",
                                errno=errno.EBUSY)
            try:
                st = os.fstat(fd)
                if (st.st_size != stub.version.size or stub.owed != st.st_size
                        or abs(st.st_mtime - stub.version.mtime) >= MTIME_SLACK_S):
                    self._reguard(fd, was_local)
                    return Released("refused", f"changed locally ({st.st_size} bytes, mtime "
                                    f"{st.st_mtime:.3f}; its version: {stub.version.size}, "
                                    f"{stub.version.mtime:.3f}): now dirty",
                                    errno=errno.EPERM, changed=True)
                # The punch moves the mtime before it can be put back: say so first, so a
                # start after a crash in between knows it was this punch, not a program's
                # write (else it records a clean file dirty, and a later remote change makes
                # it a false conflict: tests/t4_crash.py found it).
                write_releasing(fd, True)
                self._crash_hook("leased")
                # To the end of the last block: a punch ending inside a block zeroes its
                # bytes but keeps the block, data the extents would count resident.  Past EOF
                # nothing lives (KEEP_SIZE; owed is the length, checked above).
                block = max(st.st_blksize, 4096)
                punch(fd, 0, -(-stub.owed // block) * block)  # failure: perhaps half punched
                self._crash_hook("punched-only")  # the punch moved the mtime
                os.utime(fd, (st.st_atime, stub.version.mtime))
                self._crash_hook("punched")
                with contextlib.suppress(OSError):
                    write_view(fd, STUB)
                write_releasing(fd, False)
            finally:
                with contextlib.suppress(OSError):  # the kernel may have broken it already
                    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            after = os.fstat(fd)
            return Released("released", freed=max(before.st_blocks - after.st_blocks, 0) * 512)
        finally:
            os.close(fd)

    def _reguard(self, fd: int, was_local: bool) -> None:
        """A release that did not happen: a wholly resident file is ignored again; a partial
        one keeps the guard ``on_released`` gave it back (its holes must raise events)."""
        if not was_local:
            return
        for listener in self.listeners:
            with contextlib.suppress(OSError):
                listener.on_resident(fd)

    @staticmethod
    def _crash_hook(step: str) -> None:
        crashpoint.crash_point(CRASH_ENV, step)
        if step == "punched" and os.environ.get(PAUSE_ENV):
            time.sleep(float(os.environ[PAUSE_ENV]))

    async def set_pinned(self, stub: Stub, pinned: bool) -> None:
        """``hsmfs pin``/``unpin``: keep a file from release (and eviction).  Durable
        (``trusted.hsmfs.pinned``, fsync'd) before it counts, under the file's lock so a
        release either finishes first or sees the pin.  Making a pinned file resident is the
        caller's (the daemon restores it, the same path as ``hsmfs restore``)."""
        async with self._file_lock(stub.ino):
            if stub.superseded:
                raise Superseded(f"{stub.path!r}: no path leads to this copy any more")

            def persist() -> None:
                fd = self.tree.open_checked(stub.path, stub.ino, stub.gen)
                try:
                    write_pinned(fd, pinned)
                finally:
                    os.close(fd)

            await trio.to_thread.run_sync(persist)
            stub.pinned = pinned

    # -- FillHost: what the fetch engine asks of the façade ------------------------------------

    async def _writable(self, stub: Stub, door_fd: int | None) -> None:
        """Make sure the engine can write to ``stub``: its own fd through the private door,
        or, once its path no longer leads to it, a dup of the door's fd."""
        if stub.fd is not None:
            return
        if not stub.superseded:
            try:
                await trio.to_thread.run_sync(self.writable_fd, stub)
                return
            except Superseded:
                self._supersede(stub)
        if door_fd is None or os.fstat(door_fd).st_ino != stub.ino:
            raise Superseded(f"{stub.path!r}: no path leads to this copy of "
                             f"{stub.version.key!r} and no fd to fill it through")
        if _writable(door_fd):
            fd = os.dup(door_fd)
        else:
            # A read-only door fd (the kernel door's event fds): the same inode, O_RDWR, on
            # the private door's mount, where writes raise no events (hsmfs.handles).
            fd = await trio.to_thread.run_sync(self._reopen_by_handle, door_fd, stub)
        with self._fd_lock:
            if stub.fd is None:
                stub.fd = fd
                return
        os.close(fd)

    def _reopen_by_handle(self, door_fd: int, stub: Stub) -> int:
        try:
            root = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.root_fd)
            try:
                fd = open_handle(root, handle_of(door_fd), os.O_RDWR | os.O_NOFOLLOW)
            finally:
                os.close(root)
        except OSError as exc:
            raise Superseded(f"{stub.path!r}: no path leads to this copy of "
                             f"{stub.version.key!r}, and its inode cannot be reopened to fill "
                             f"it ({exc})") from exc
        if (os.fstat(fd).st_ino, generation(fd)) != (stub.ino, stub.gen):
            os.close(fd)
            raise Superseded(f"{stub.path!r}: its inode is another file now")
        return fd

    def writable_fd(self, stub: Stub) -> int:
        with self._fd_lock:  # worker threads of one stub may race to open it
            if stub.fd is not None:
                return stub.fd
            if stub.superseded:
                raise Superseded(stub.path)
            try:
                fd = self.tree.open_rw(stub.path)
            except FileNotFoundError:
                raise Superseded(stub.path) from None
            try:
                st = os.fstat(fd)
                same = (st.st_ino, generation(fd)) == (stub.ino, stub.gen)
            except OSError:
                os.close(fd)
                raise
            if not same:
                os.close(fd)
                raise Superseded(stub.path)
            stub.fd = fd
            return fd

    def filled(self, stub: Stub, completes: bool) -> None:
        """Transition *fill* (worker thread, after the bytes were written): the view word
        moves to ``partial``, or, when every owed byte is local, to ``resident`` with the
        guard's ignore mask.  Persists only the view: residency is the extents themselves,
        so a crash at any point leaves exactly the bytes written as resident."""
        self.put_back_mtime(stub)
        if completes:
            self._mark_local(stub)
        elif stub.residency == STUB and stub.sync == CLEAN:
            with contextlib.suppress(OSError):
                write_view(self.writable_fd(stub), PARTIAL)

    def put_back_mtime(self, stub: Stub) -> None:
        """Worker thread, after a fill wrote bytes, or after a failed one punched back what it
        wrote: a fill's pwrite (or punch) moved the mtime; a clean copy keeps its version's
        (what `ls`, make and rsync must see, and how a start tells a program's write from a
        fill).  The version's, not the one seen before the write: flights of one file land
        concurrently, and a flight that failed must not put back the mtime another one's
        pwrite had just moved."""
        if stub.sync == CLEAN:
            with contextlib.suppress(OSError, HsmError):
                fd = self.writable_fd(stub)
                os.utime(fd, (os.fstat(fd).st_atime, stub.version.mtime))

    async def make_room(self, stub: Stub, nbytes: int, speculative: bool = False) -> int:
        """Before a flight lands ``nbytes`` in ``stub``: the evictor frees room under
        ``cache_size`` first (a no-op without one).  Returns what to hand to :meth:`landed`;
        raises :class:`NoRoom` for a ``speculative`` flight that would go over the budget."""
        if self.evictor is None or nbytes <= 0:
            return 0
        return await self.evictor.make_room(stub, nbytes, speculative=speculative)

    def landed(self, nbytes: int, reserved: int, speculative: bool = False) -> None:
        """After a flight (``nbytes`` written, 0 if it failed): give back its reservation."""
        if self.evictor is not None and reserved:
            self.evictor.landed(nbytes, reserved, speculative=speculative)

    def touch(self, ino: int, gen: int | None = None) -> None:
        """An open of the file with this inode (and generation, where known) through either
        door: eviction's recency clock."""
        stub = self.registry.by_ino.get(ino)
        if stub is not None and (gen is None or stub.gen == gen):
            stub.used_at = time.monotonic()

    def file_lock_held(self, ino: int) -> bool:
        """Truncate, mark_dirty or archive's record step holds the file right now: eviction
        passes it by rather than wait on a lock whose holder may be waiting for room."""
        lock = self._truncating.get(ino)
        return lock is not None and lock.locked()

    async def after_fill(self, stub: Stub) -> None:
        assert stub.ranges is not None
        if not stub.local and stub.ranges.covers(0, stub.owed):
            # Completed by bytes that were already local (e.g. a truncate): mark it now.
            await trio.to_thread.run_sync(self._mark_local, stub)

    async def fetch_failed(self, stub: Stub, exc: BaseException) -> None:
        """Transition *remote change* found by a GET (412): a clean file becomes ``stale``,
        one with local changes ``conflict`` (durably).  Never raises."""
        if not isinstance(exc, ObjectChanged) or not stub.fetchable:
            return
        stub.sync = STALE if stub.sync == CLEAN else CONFLICT

        def persist() -> None:
            try:
                fd = self.writable_fd(stub)
                write_sync(fd, stub.sync, durable=stub.sync == CONFLICT)
                write_view(fd, stub.state)
            except (OSError, HsmError) as err:
                log.warning("cannot record %s on %r: %s", stub.sync, stub.path, err)

        await trio.to_thread.run_sync(persist)

    def _mark_local(self, stub: Stub) -> None:
        """Every owed byte is local: nothing more to fetch or guard."""
        if stub.local:
            return
        fd = self.writable_fd(stub)
        with contextlib.suppress(OSError):
            write_view(fd, stub.state if stub.sync != CLEAN else RESIDENT)
        stub.local = True
        for listener in self.listeners:
            listener.on_resident(fd)
        if stub.error is not None:
            # Every owed byte is local: nothing left to fail.  Before the fd is closed (a
            # closed stub.fd under a listener's mark gave EBADF: the fill failed with EIO).
            self._clear_failure(stub)
        # A resident file is read through the doors' own fds; keep no descriptor for it.
        self._close_fd(stub)

    # -- the last failure: user.hsm.error (docs/design.md, "The last failure") ---------------

    async def note_failure(self, stub: Stub, exc: BaseException) -> None:
        """A program is about to be given ``exc`` for ``stub``: publish it as
        ``user.hsm.error`` (memory, for the FUSE door's getxattr, and the backing file's
        xattr, for the kernel door and ``hsmfs state``).  Never raises.

        Only on change: the same (cause, errno, HTTP status) again within
        :data:`ERROR_REFRESH` seconds writes nothing, and every file's writes share one token
        bucket (:data:`ERROR_WRITES_PER_S`), beyond which only memory is updated.  So a storm
        of failures costs at most one small xattr write per file per minute."""
        sig = (cause_of(exc), to_errno(exc), status_of(exc))
        now = time.monotonic()
        if sig == stub.error_sig and now - stub.error_at < ERROR_REFRESH:
            return
        stub.error = value = format_error(*sig, time.time())
        self._error_tokens = min(float(ERROR_WRITE_BURST), self._error_tokens
                                 + (now - self._error_tokens_at) * ERROR_WRITES_PER_S)
        self._error_tokens_at = now
        if self._error_tokens < 1:
            # Memory only; not remembered as written, so this file's next failure tries again.
            self.counters.error_views_skipped += 1
            return
        self._error_tokens -= 1
        stub.error_sig, stub.error_at = sig, now
        self.counters.error_views_written += 1
        await trio.to_thread.run_sync(self._publish_error, stub, value)

    def _publish_error(self, stub: Stub, value: str | None) -> None:
        """Worker thread: write (None: remove) the xattr.  A view: a failure to write it (a
        full disk may refuse a new xattr block) leaves memory, which the FUSE door shows."""
        if value is not None and (stub.local or stub.error != value):
            # Overtaken while this waited for its thread: the file became resident (its error
            # cleared, its fd closed: reopening it would leak one) or failed anew.
            return
        try:
            write_error(self.writable_fd(stub), value)
        except (OSError, HsmError) as err:
            log.debug("cannot publish user.hsm.error on %r: %s", stub.path, err)

    def _clear_failure(self, stub: Stub) -> None:
        """Worker thread: the file was served after a failure (a reader's miss landed, or
        every owed byte is local): the failure is over, its view goes."""
        stub.error, stub.error_sig, stub.error_at = None, None, 0.0
        self._publish_error(stub, None)

    def _write_view(self, stub: Stub) -> None:
        with contextlib.suppress(OSError, Superseded):
            write_view(self.writable_fd(stub), stub.state)

    def _close_fd(self, stub: Stub) -> None:
        with self._fd_lock:
            fd, stub.fd = stub.fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- residency ---------------------------------------------------------------------------

    async def _ranges(self, stub: Stub, door_fd: int | None = None) -> RangeMap:
        if stub.ranges is None:
            await self._writable(stub, door_fd)
            loaded = await trio.to_thread.run_sync(self._load_ranges, stub)
            if stub.ranges is None:  # another task may have loaded it meanwhile
                stub.ranges = loaded
        return stub.ranges

    def _load_ranges(self, stub: Stub) -> RangeMap:
        """Read residency from the file's own data extents (``SEEK_DATA``/``SEEK_HOLE``)."""
        return RangeMap(data_extents(self.writable_fd(stub), stub.owed))

    # -- read-ahead ----------------------------------------------------------------------------

    def _read_ahead(self, stub: Stub, stop: int) -> None:
        """Prefetch the window past ``stop`` in the background (:mod:`hsmfs.readahead`)."""
        if (self.engine.nursery is None or stub.local or not stub.fetchable or stub.superseded
                or stub.ino in self._releasing):
            return
        span = stub.pattern.next_batch(stop, stub.owed, self.cfg.max_request,
                                       self.cfg.readahead_max)
        if span is not None:
            self.engine.nursery.start_soon(self.engine.prefetch, stub, *span)

    def _read_siblings_ahead(self, stub: Stub) -> None:
        """A program reads ``stub`` whole: if that reveals a walk of its directory, fetch
        the siblings it will read next in the background (:mod:`hsmfs.siblings`)."""
        if self.engine.nursery is None or stub.superseded:
            return
        picked = self._siblings.note_whole_read(stub)
        if picked:
            log.debug("directory read-ahead in %r: %d files",
                      posixpath.dirname(stub.path) or ".", len(picked))
            self.engine.nursery.start_soon(self._prefetch_files, picked)

    def _wants_fetch(self, stub: Stub) -> bool:
        return (not stub.local and stub.fetchable and not stub.superseded
                and stub.ino not in self._releasing and not self.engine.flying_at_start(stub))

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
            if stub.local or not stub.fetchable:  # changed while its ranges loaded
                return
            self.counters.sibling_prefetches += 1
            await self.engine.fetch(stub, 0, stub.owed, wait=True, prefetch=True)
        except (HsmError, OSError, NoRoom):
            pass
        finally:
            self._sibling_slots.release()

    # -- reporting ---------------------------------------------------------------------------

    def state_of(self, stub: Stub) -> tuple[str, int]:
        """(state word, resident bytes below ``owed``): exact, from the data extents."""
        if stub.local:
            return stub.state, stub.owed
        ranges = stub.ranges
        if ranges is None:
            # SEEK_DATA through the private door: a few syscalls, no event, no fill.  Kept only
            # if no one loaded it meanwhile (one map per file: fills write its gaps).
            ranges = self._load_ranges(stub)
            if stub.ranges is None:
                stub.ranges = ranges
        return stub.state, ranges.total()

    def stats(self) -> dict[str, object]:
        c = self.counters
        stubs = list(self.registry.by_path.values())
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
            "readahead_no_room": c.readahead_no_room,
            "error_views_written": c.error_views_written,
            "error_views_skipped": c.error_views_skipped,
            "errors": dict(c.errors),
            "stubs": len(stubs),
            "resident_files": sum(1 for s in stubs if s.local),
            "dirty_files": sum(1 for s in stubs if s.sync == DIRTY),
            "stale_files": sum(1 for s in stubs if s.sync == STALE),
            "conflict_files": sum(1 for s in stubs if s.sync == CONFLICT),
            "superseded_files": sum(1 for s in self.registry.by_ino.values() if s.superseded),
            "inflight_chunks": self.engine.inflight_chunks(),
            "pinned_files": sum(1 for s in stubs if s.pinned),
            "releases": self.releases,
            "released_bytes": self.released_bytes,
        }
        out.update(self.refresh_stats.as_dict())
        backend_stats = getattr(self.fetcher, "stats", None)
        if callable(backend_stats):
            out.update(backend_stats())
        return out


#: user.hsm.error: the same failure of one file is published again at most this often (s).
ERROR_REFRESH = 60.0
#: user.hsm.error: xattr writes per second over all files (and the burst allowed).
ERROR_WRITES_PER_S = 20.0
ERROR_WRITE_BURST = 100


#: mtimes are compared to this precision (LastModified has whole seconds; some filesystems
#: keep microseconds of a float timestamp).
MTIME_SLACK_S = 1e-3


def _holds_exactly(fd: int, version: RemoteVersion) -> bool:
    """Whether ``fd`` holds every byte of ``version`` and they are S3's: no hole below its size
    and the MD5 of the bytes is its ETag.  Only a single-part ETag is an MD5 (a multipart one,
    "...-N", depends on a part size nobody recorded): for the others the answer is no, and
    the caller keeps the safe one (the file holds local changes).  One read of the file."""
    from .backend_s3 import SourceChanged, etag_of  # the one MD5-of-a-file rule

    etag = version.etag.strip('"')
    if len(etag) != 32 or any(c not in "0123456789abcdef" for c in etag.lower()):
        return False
    try:
        if version.size and os.lseek(fd, 0, os.SEEK_HOLE) < version.size:
            return False
        before = _changed_marks(os.fstat(fd))
        same = etag_of(fd, version.size, 0).strip('"').lower() == etag.lower()
        # A program may hold the file (a restarted worker adopts under open fds): a write
        # during the hash (an mmap store raises no event) moves the size, mtime or ctime.
        return same and _changed_marks(os.fstat(fd)) == before
    except (OSError, SourceChanged):
        return False


def _changed_marks(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _writable(fd: int) -> bool:
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR


def _size_of(fd: int) -> int:
    return os.fstat(fd).st_size

