"""The *archive* transition: local changes go back to S3, conditionally, and are never lost.

A transition module of the core (docs/design.md, "State machine"): it acts on the same
:class:`~hsmfs.state.Stub` objects and trusted records as :mod:`hsmfs.cache`, and uses its
internals (the registry, the per-file truncate lock, the fetch engine's flights).  The bytes go
through :mod:`hsmfs.backend_s3`; nothing here imports boto3 or a door.

Which files: a ``dirty`` stub is uploaded with ``If-Match`` of the ETag it is based on; a file
with no record (created locally) with ``If-None-Match: *`` — or, if it replaced a stub hsmfs
knew at that path (an editor's write-temp-and-rename save), with ``If-Match`` of that stub's
version; a stub renamed locally is uploaded to the key of its new path.  ``clean`` and
``stale`` files are unchanged; ``conflict`` files are reported, never uploaded.

The steps, one function each (their docstrings say what is persisted, in which order, and what
a SIGKILL before or after leaves):

1. :func:`Archiver._recover` — a file carrying an upload marker from an interrupted archive:
   HEAD says (by the marker's token in ``x-amz-meta-hsmfs-upload``) whether that upload
   landed; if so it is not sent again, and the file is recorded clean only if its bytes,
   hashed once there, are S3's;
2. :func:`Archiver._begin` — every owed byte made local; the upload begun (a multipart upload
   created, empty); the marker (``trusted.hsmfs.upload``) persisted; size, mtime and ctime
   taken: the start point, before any byte is read;
3. :func:`Archiver._send` — every byte read once, hashed as read (Content-MD5, the ETag), sent;
   the start point checked before the object can become visible; the conditional PUT or
   CompleteMultipartUpload;
4. :func:`Archiver._record` — the new version recorded: ``clean`` if size, mtime and ctime are
   still the start point's, else still ``dirty`` but based on the new version;
   or :func:`Archiver._conflict` — a failed condition: ``conflict``, bytes kept;
5. :func:`Archiver._delete` (``--delete`` only) — a stub whose file is gone locally is deleted
   in S3 (``If-Match``, HEAD-checked).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import trio

from . import crashpoint
from .backend_s3 import ObjectInfo, ObjectVersion, S3Backend, SourceChanged, Upload, etag_of
from .cache import StubCache
from .errors import HsmError, ObjectChanged, ObjectMissing, cause_of, to_errno
from .keys import STATE_DIR, key_to_relpath
from .logsetup import http_status
from .ranges import RangeMap
from .state import Intent, Pin, Stub
from .stubfile import (
    CLEAN,
    CONFLICT,
    DIRTY,
    GONE,
    STALE,
    X_OWED,
    X_REMOTE,
    X_SYNC,
    X_VERSION,
    RemoteVersion,
    generation,
    write_identity,
    write_sync,
    write_view,
)
from .tombstones import Tombstone

log = logging.getLogger(__name__)

#: The upload in progress: JSON of :class:`Marker`.  trusted.* like the record (only
#: CAP_SYS_ADMIN may write it), so no user can make hsmfs believe an upload landed.
X_UPLOAD = "trusted.hsmfs.upload"
#: S3's limit on a key's length, in UTF-8 bytes.
KEY_MAX = 1024
#: Files archived at once: small files are a few round trips each, so a tree of them wants
#: several in flight; large files bring their own part parallelism (backend_s3.PART_THREADS).
FILES_AT_ONCE = 8
#: Files at least this large are listed by ``archive_progress`` (the CLI's progress line).
PROGRESS_MIN = 8 << 20
#: Snapshots tried per file when it keeps changing while it is read.
SNAPSHOT_TRIES = 3

# The words of a result row; FAILED_RESULTS make ``hsmfs archive`` exit non-zero.
UPLOADED, UNCHANGED, CONFLICTED, REFUSED, FAILED = (
    "uploaded", "unchanged", "conflict", "refused", "failed")
DELETED, WOULD_UPLOAD, WOULD_DELETE = "deleted", "would-upload", "would-delete"
FAILED_RESULTS = frozenset({CONFLICTED, REFUSED, FAILED})


@dataclass(frozen=True)
class Marker:
    """An upload that may be in S3 without the file's record saying so: where, based on what
    (``base``: the ETag S3 must hold; None: a new key), and the file as it was when its bytes
    began to be read (``size``, ``mtime_ns``).

    Nothing about the bytes is known when the marker is written (each part is hashed once,
    as it is sent), so the marker does not name the ETag.  S3 recognises the upload by
    ``token``, a random id sent with it as ``x-amz-meta-hsmfs-upload``; ``part_size`` (0: one
    PUT) lets a crash recovery hash the file the way S3 names it."""

    key: str
    base: str | None
    size: int
    mtime_ns: int
    token: str | None = None
    part_size: int | None = None
    #: A multipart upload's id (created before the marker): a crash leaves it unfinished,
    #: and the next archive aborts it (its parts are stored and billed until then).
    upload_id: str | None = None
    #: Markers of the previous format named the ETag (hashed before sending), not a token.
    etag: str | None = None

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def read(cls, fd: int) -> Marker | None:
        try:
            raw = os.getxattr(fd, X_UPLOAD)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP):
                return None
            raise
        try:
            return cls(**json.loads(raw))
        except (ValueError, TypeError):
            log.warning("ignoring a malformed upload marker %r", raw[:200])
            return None

    def is_ours(self, head: ObjectInfo | None) -> bool:
        """Whether ``head`` (what S3 holds at the key now) is this marker's upload."""
        if head is None:
            return False
        if self.token is not None:
            return head.upload == self.token
        return self.etag is not None and head.version.etag == self.etag


def _ident(st: os.stat_result) -> tuple[int, int, int]:
    """What moves with every change of a file's bytes: size, mtime, and ctime (which also
    moves when a program sets the mtime back, as ``touch -d`` or ``rsync -t`` do).  This
    kernel's multigrain timestamps give a write right after an ``fstat`` a fresh time, so a
    coarse clock tick hides none."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


class Archiver:
    """Runs archives for one daemon (one per :class:`~hsmfs.cache.StubCache`).

    Invariants: at most one archive of a file at a time (``_locks``, by inode and
    generation); a marker is on a file exactly while an upload of it may be in S3 without
    its record saying so; a file is written ``clean`` only if its size, mtime and ctime have
    not moved since before its uploaded bytes were read (or, after a crash, its bytes hash
    to the ETag S3 holds).
    """

    def __init__(self, cache: StubCache, backend: S3Backend, prefix: str) -> None:
        self.cache = cache
        self.backend = backend
        self.prefix = prefix
        self._locks: dict[tuple[int, int], trio.Lock] = {}
        #: rel -> [bytes sent, bytes to send], for files of at least PROGRESS_MIN in flight.
        self.progress: dict[str, list[int]] = {}

    # -- the command -------------------------------------------------------------------------

    async def run(self, paths: Iterable[str], *, delete: bool = False,
                  dry_run: bool = False) -> list[dict[str, Any]]:
        """Archive every file at or under ``paths`` (relative to the cache root); one row
        per file, in path order."""
        rels = [_norm(p) for p in paths]
        files = await trio.to_thread.run_sync(self._walk, rels)
        # Candidates for --delete are taken before any upload moves a renamed stub's path.
        gone = await trio.to_thread.run_sync(self._removed, self._known(rels)) if delete else []
        rows: dict[str, dict[str, Any]] = {}
        limiter = trio.CapacityLimiter(FILES_AT_ONCE)

        async def one(rel: str, problem: str | None) -> None:
            async with limiter:
                if problem is not None:
                    rows[rel] = _row(rel, REFUSED, problem)
                    return
                try:
                    rows[rel] = await self.archive_file(rel, dry_run=dry_run)
                except (HsmError, OSError) as exc:
                    rows[rel] = _failed(rel, exc)
                    # The one line of this failure (DESIGN §5), like a failed fetch's.
                    log.error("archive of %r failed (%s, %s): %s", rel, cause_of(exc),
                              http_status(exc), exc)

        async with trio.open_nursery() as nursery:
            # Overlapping PATHs name a file once: one row, one archive.
            for rel, problem in dict(files).items():
                nursery.start_soon(one, rel, problem)
        out = [rows[r] for r in sorted(rows)]
        for version, rel in gone:
            out.append(await self._delete(version, rel, dry_run=dry_run))
        # A named path that is not there and (with --delete) named no removed stub either.
        for rel in rels:
            if rel not in rows and not any(_under(g, [rel]) for _v, g in gone) \
                    and not await trio.to_thread.run_sync(self._exists, rel):
                out.append(_row(rel, REFUSED, "no such file or directory"))
        return out

    def _exists(self, rel: str) -> bool:
        try:
            os.stat(rel or ".", dir_fd=self.cache.root_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def _walk(self, rels: list[str]) -> list[tuple[str, str | None]]:
        """Regular files at or under ``rels`` through the private door, with why one cannot
        be archived (None: it can).  A path that does not exist is left to ``--delete``."""
        out: list[tuple[str, str | None]] = []
        root = self.cache.root_fd
        for rel in rels:
            try:
                st = os.stat(rel or ".", dir_fd=root, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                out.append((rel, _not_a_file(st)))
                continue
            for dirpath, dirnames, filenames, _dirfd in os.fwalk(rel or ".", dir_fd=root):
                if dirpath == ".":
                    with contextlib.suppress(ValueError):
                        dirnames.remove(STATE_DIR)
                dirnames.sort()
                for name in sorted(filenames):
                    path = os.path.normpath(os.path.join(dirpath, name))
                    try:
                        fst = os.stat(path, dir_fd=root, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    out.append((path, _not_a_file(fst)))
        return out

    # -- one file ----------------------------------------------------------------------------

    def is_archiving(self, ino: int, gen: int) -> bool:
        """An archive of that file is under way: S3 may hold its upload before its record
        says so (a refresh must not take the new ETag for another host's write)."""
        lock = self._locks.get((ino, gen))
        return lock is not None and lock.locked()

    async def archive_file(self, rel: str, *, dry_run: bool = False) -> dict[str, Any]:
        key = self.prefix + rel
        if len(key.encode()) > KEY_MAX:
            return _row(rel, REFUSED, f"its key would be {len(key.encode())} bytes, over S3's "
                        f"{KEY_MAX}; the file is kept as it is")
        if key_to_relpath(key, self.prefix)[0] != rel:
            return _row(rel, REFUSED, "its path cannot be an S3 key hsmfs would list back")
        fd = await trio.to_thread.run_sync(self._open, rel)
        try:
            st = os.fstat(fd)
            lock = self._locks.setdefault((st.st_ino, generation(fd)), trio.Lock())
            async with lock:
                return await self._archive_open(rel, key, fd, dry_run)
        finally:
            os.close(fd)

    def _open(self, rel: str) -> int:
        # Through the private door: no fanotify event, no fill.  O_RDWR so the core can fill
        # a stub whose recorded path no longer leads to it (renamed) through this fd; a
        # running executable refuses it (ETXTBSY), and then O_RDONLY does for the rest
        # (xattrs and fsync need no write mode).
        flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            return os.open(rel, os.O_RDWR | flags, dir_fd=self.cache.root_fd)
        except OSError as exc:
            if exc.errno not in (errno.ETXTBSY, errno.EACCES, errno.EROFS):
                raise
            return os.open(rel, os.O_RDONLY | flags, dir_fd=self.cache.root_fd)

    async def _archive_open(self, rel: str, key: str, fd: int,
                            dry_run: bool) -> dict[str, Any]:
        stub = await self.cache.lookup(fd)  # also records a truncate found after the fact
        marker = await trio.to_thread.run_sync(Marker.read, fd)
        if marker is not None and not dry_run:
            done = await self._recover(rel, fd, stub, marker)
            if done is not None:
                return done
            stub = await self.cache.lookup(fd)  # the recovery may have recorded a version
        base = self._base(rel, key, stub)
        if stub is not None and stub.version.key == key:
            if stub.sync == CONFLICT:
                return _row(rel, CONFLICTED, _conflict_text(rel, stub.version.etag, stub.remote))
            if stub.sync == STALE:
                return _row(rel, UNCHANGED, f"stale: S3 holds {_show(stub.remote)} now; "
                            "nothing local to send")
            if stub.sync == CLEAN:
                if os.fstat(fd).st_size == stub.version.size or not stub.local:
                    return _row(rel, UNCHANGED, stub.version.etag)
                # A resident file changed length without an event (the kernel door ignores
                # resident files): record the change before it is sent.
                if not dry_run:
                    await self.cache.mark_dirty(stub, fd=fd)
        if dry_run:
            return _row(rel, WOULD_UPLOAD, f"based on {base}" if base else "new key",
                        size=os.fstat(fd).st_size)
        return await self._upload(rel, key, fd, stub, base)

    def _base(self, rel: str, key: str, stub: Stub | None) -> str | None:
        """The ETag S3 must hold at ``key`` for this upload to go ahead; None: no object."""
        if stub is not None and stub.version.key == key:
            return stub.version.etag
        # A new file at a stub's path (a save by rename over it), or a stub renamed onto it:
        # it is a new version of the object the path's stub was a copy of.
        prev = self.cache.registry.by_path.get(rel)
        if prev is not None and prev is not stub and prev.version.key == key \
                and prev.sync != CONFLICT:
            return prev.version.etag
        # A new file where a stub was removed before this daemon started (its tombstone).
        removed = self._tombstones().get(key)
        return removed.etag if removed is not None else None

    async def _upload(self, rel: str, key: str, fd: int, stub: Stub | None,
                      base: str | None) -> dict[str, Any]:
        # Before a byte is read: doors that stopped watching a dirty file's writes (the kernel
        # door's FAN_MODIFY ignore) watch again, so a write during or after the upload is a
        # change, never lost under a clean record.
        for listener in self.cache.listeners:
            watch = getattr(listener, "watch_writes", None)
            if watch is not None:
                watch(fd)
        pin = await self._local(stub, fd)
        try:
            for _attempt in range(SNAPSHOT_TRIES):
                t_begin = time.monotonic()
                begun = await self._begin(key, fd, base)
                if begun is None:
                    continue  # changed before a byte was read
                upload, marker, start = begun
                t_sent = time.monotonic()
                try:
                    version = await self._send(rel, fd, upload, start)
                except SourceChanged:
                    await trio.to_thread.run_sync(_drop_marker, fd)
                    continue  # nothing landed: read it again
                except (ObjectChanged, ObjectMissing) as exc:
                    return await self._conflict(rel, key, fd, stub, base, exc)
                # Any other failure leaves the marker: the upload may have landed after all,
                # and the next archive's HEAD decides (_recover).
                _crash_point("sent")
                t_record = time.monotonic()
                changed = await self._record(rel, fd, stub, version, marker.mtime_ns, start)
                log.info("%r: %d bytes, begin and mark %.3f s, send %.3f s, record %.3f s",
                         rel, upload.size, t_sent - t_begin, t_record - t_sent,
                         time.monotonic() - t_record)
                if base is not None and stub is None:
                    # It replaced a removed stub's version: nothing left for --delete.
                    await trio.to_thread.run_sync(self._forget_removed, key)
                return _row(rel, UPLOADED, version.etag + (
                    " (changed during the upload: still dirty, based on it)" if changed else ""),
                    size=upload.size)
            return _row(rel, FAILED, f"changed while it was read, {SNAPSHOT_TRIES} times; "
                        "still dirty: archive it again once it is quiet")
        finally:
            if pin is not None:
                pin.release()

    async def _local(self, stub: Stub | None, fd: int) -> Pin | None:
        """Every byte S3 owes the file made local, and pinned until the record is written
        (no release may punch what is being read)."""
        if stub is None:
            return None
        return await self.cache.ensure(stub, 0, stub.owed, Intent.WHOLE, fd=fd)

    # -- the steps ---------------------------------------------------------------------------

    async def _begin(self, key: str, fd: int, base: str | None
                     ) -> tuple[Upload, Marker, os.stat_result] | None:
        """Steps *begin* and *mark*: size, mtime and mode taken; the upload begun (a
        multipart upload created: no byte in it, nothing visible); the marker
        (:data:`X_UPLOAD`: key, base, size, mtime, the upload's token, part size and id)
        written and fsync'd; then the file's size, mtime and ctime, the point every later
        check compares with.  Returns None, having undone both, if the file changed before
        that point.  No byte of the file has been read or sent yet.

        SIGKILL before the marker is durable: nothing of the file is in S3 (at most an empty
        multipart upload, which the bucket's AbortIncompleteMultipartUpload rule removes), and
        the file is as it was (dirty, or new).  After: the next archive finds the marker and
        asks S3 (:meth:`_recover`).  The fsync also writes back the file's dirty pages, which
        write-protects any shared mapping of them: a later write through ``mmap`` faults and
        moves the mtime, so the checks below see it too."""
        st = await trio.to_thread.run_sync(os.fstat, fd)
        upload = await trio.to_thread.run_sync(lambda: self.backend.begin_upload(
            key, st.st_size, base=base, mtime=st.st_mtime_ns / 1e9, mode=st.st_mode))
        marker = Marker(key, base, st.st_size, st.st_mtime_ns, upload.token, upload.part_size,
                        upload.upload_id)

        def persist() -> os.stat_result:
            os.setxattr(fd, X_UPLOAD, marker.encode())
            os.fsync(fd)
            return os.fstat(fd)

        try:
            start = await trio.to_thread.run_sync(persist)
        except BaseException:
            await self._abort(key, upload.upload_id)
            raise
        _crash_point("marked")
        if (start.st_size, start.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            await self._abort(key, upload.upload_id)
            await trio.to_thread.run_sync(_drop_marker, fd)
            return None
        return upload, marker, start

    async def _abort(self, key: str, upload_id: str | None) -> None:
        if upload_id is None:
            return
        try:
            await trio.to_thread.run_sync(self.backend.abort_upload, key, upload_id)
        except HsmError as exc:  # the lifecycle rule will; the file is what matters
            log.info("%r: cannot abort the unfinished upload: %s", key, exc)

    async def _send(self, rel: str, fd: int, upload: Upload,
                    start: os.stat_result) -> ObjectVersion:
        """Step *send*: every byte read once, hashed as read (Content-MD5, and the ETag the
        stored object must have), sent; then, before the object can become visible (the
        single PUT, or CompleteMultipartUpload), the file's size, mtime and ctime compared
        with ``start``: if they moved, nothing is stored (:class:`SourceChanged`), so S3 never
        holds a torn mix of two versions.  Persists nothing locally.  SIGKILL during a single
        PUT: S3 has the whole object or nothing.  During a multipart upload: no object is
        visible until the complete, and the marker names the upload to abort.  After the
        upload landed: the marker and the token in S3 say so (:meth:`_recover`)."""
        track = upload.size >= PROGRESS_MIN
        if track:
            self.progress[rel] = [0, upload.size]

        def progress(n: int) -> None:
            if track:
                self.progress[rel][0] += n  # one int under the GIL: a lost update is a late bar

        def check() -> None:
            _crash_point("read")
            if _ident(os.fstat(fd)) != _ident(start):
                raise SourceChanged("the file changed while it was read")

        try:
            return await trio.to_thread.run_sync(
                lambda: self.backend.send(upload, fd, check=check, progress=progress))
        finally:
            self.progress.pop(rel, None)

    async def _record(self, rel: str, fd: int, stub: Stub | None, version: ObjectVersion,
                      mtime_ns: int, start: os.stat_result | None) -> bool:
        """Step *record*: the file becomes a copy of ``version``; True if it changed since its
        bytes were read (then it stays ``dirty``, now based on ``version``).

        ``start`` is the file's size, mtime and ctime taken before its bytes that S3 now holds
        were read (None: S3 does not hold the file's bytes; the file is dirty on ``version``).
        The file is recorded clean only if they have not moved since: no write, truncate or
        time change came between that read and this record.

        The recorded mtime is ``mtime_ns``, the file's as sent in ``x-amz-meta-mtime``: the
        clean point the core compares a clean copy with.  Persisted in this order, then fsync:
        ``sync=dirty`` and ``owed=0`` (a record still valid and still dirty whatever comes
        next); the identity (key, ETag, size, mtime, version id); ``owed`` (the size if
        unchanged: S3 holds exactly these bytes; 0 if changed: no hole of a changed file is
        S3's to fill); ``sync`` (clean or dirty), the stale ``remote`` removed, the view; the
        marker removed last.  A SIGKILL anywhere before the marker is removed leaves a dirty
        file with its marker, which the next archive completes without sending anything
        (:meth:`_recover`); after it, the record.

        Under the core's per-file truncate lock, so a truncate either lands before (and is
        seen here as a change) or after (and lowers the new ``owed``).  Memory follows the
        disk: version, owed, sync, residency, and the registry (a new or renamed file)."""
        # The core's own per-file truncate lock (a transition module may use it), released
        # and dropped the way StubCache.truncate drops it.
        ino = stub.ino if stub is not None else os.fstat(fd).st_ino
        truncating = self.cache._truncating
        lock = truncating.setdefault(ino, trio.Lock())
        try:
            async with lock:
                if stub is not None:
                    await self.cache.engine.wait_idle(stub)  # no flight of the old version
                st = await trio.to_thread.run_sync(os.fstat, fd)
                changed = start is None or _ident(st) != _ident(start)
                owed = 0 if changed else version.size
                sync = DIRTY if changed else CLEAN
                # The version's mtime is the file's own as uploaded (x-amz-meta-mtime, here
                # to the nanosecond), not S3's LastModified: a clean copy keeps its version's
                # mtime (the core's clean point, StubCache.lookup), and this file has it.
                version = dataclasses.replace(version, mtime=mtime_ns / 1e9)
                await trio.to_thread.run_sync(_write_record, fd, version, owed, sync)
                self._remember(rel, fd, st, stub, version, owed, sync)
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                truncating.pop(ino, None)
        log.info("%r archived as %s%s", rel, version.etag,
                 " (changed during the upload: still dirty)" if changed else "")
        return changed

    def _remember(self, rel: str, fd: int, st: os.stat_result, stub: Stub | None,
                  version: ObjectVersion, owed: int, sync: str) -> None:
        remote = RemoteVersion(version.key, version.etag, version.size, version.mtime,
                               version.version_id)
        registry = self.cache.registry
        other = registry.by_path.get(rel)
        if other is not None and other is not stub:
            # The stub this file replaced (or was renamed over): programs holding it are
            # still served from its record; its path is this file's now.
            self.cache._supersede(other)
        if stub is None:
            stub = Stub(path=rel, version=remote, ino=st.st_ino, gen=generation(fd), owed=owed,
                        sync=sync, ranges=RangeMap([(0, owed)] if owed else []), local=True)
            registry.add(stub)
            for listener in self.cache.listeners:
                listener.on_stub(fd, True)  # guarded like any stub, resident: ignored
            return
        stub.version = remote
        stub.owed = owed
        stub.sync = sync
        stub.remote = None
        stub.ranges = RangeMap([(0, owed)] if owed else [])
        stub.local = True
        if stub.path != rel or stub.superseded:
            # Renamed locally (or found by its record): it now lives at its own key's path.
            registry.unlink_path(stub)
            stub.path, stub.superseded = rel, False
            registry.add(stub)
        for listener in self.cache.listeners:
            listener.on_resident(fd)

    async def _conflict(self, rel: str, key: str, fd: int, stub: Stub | None,
                        base: str | None, exc: HsmError) -> dict[str, Any]:
        """Step *conflict*: S3 holds another version than the file was based on (412), or
        none any more (a delete is a write too: first writer wins, the user decides).
        Persists ``sync=conflict`` with ``remote`` = what S3 holds now (``-``: gone),
        fsync'd, then the view, then the marker removed.  The bytes are kept as they are.
        A file with no record keeps none (it is not a copy of anything): its view says
        ``conflict`` and the next archive meets the same 412.  SIGKILL before the fsync:
        dirty with a marker whose upload did not land: the next archive tries again and
        meets the same condition."""
        head = await trio.to_thread.run_sync(self.backend.head_key, key)
        remote = head.version.etag if head is not None else GONE

        def persist() -> None:
            if stub is not None and stub.version.key == key:
                write_sync(fd, CONFLICT, remote, durable=True)
            with contextlib.suppress(OSError):
                write_view(fd, CONFLICT)
            _drop_marker(fd)

        await trio.to_thread.run_sync(persist)
        if stub is not None and stub.version.key == key:
            stub.sync, stub.remote = CONFLICT, remote
        text = _conflict_text(rel, base, remote)
        log.warning("%s (%s)", text, exc)
        return _row(rel, CONFLICTED, text)

    async def _recover(self, rel: str, fd: int, stub: Stub | None,
                       marker: Marker) -> dict[str, Any] | None:
        """Step *recover*: the file carries a marker, so an archive was interrupted after it
        began an upload.  HEAD the key:

        * S3 does not hold the marker's upload (no object, or one without the marker's
          token): it never landed.  An unfinished multipart upload is aborted, the marker
          removed, and the file archived as usual (returns None).
        * S3 holds it: it landed, and is not sent again.  Whether the file still has exactly
          those bytes is decided by the file itself: its size and mtime are still the
          marker's, and its bytes, hashed now the way S3 names them (the marker's part size),
          give the ETag S3 reports, with its size, mtime and ctime unmoved across that hash.
          Then the record is completed clean (:meth:`_record`).  Otherwise the file changed
          since (or S3's ETag is not an MD5 of the bytes, SSE-KMS): it is recorded dirty on
          the landed version, and archived as usual from there (returns None), so the next
          upload is based on it, not a conflict with it.

        Persists what :meth:`_record` does, or the marker's removal; a SIGKILL here leaves
        the marker for the next archive to decide the same way.  Markers of the previous
        format name the ETag instead of a token; S3 holding that ETag means the same.

        A new daemon lists S3 before anyone archives: it sees the landed upload as another
        ETag under a dirty file and records ``conflict`` with that ETag as ``remote``.  Such a
        conflict is our own upload, and is resolved here like any other landed one."""
        head = await trio.to_thread.run_sync(self.backend.head_key, marker.key)
        if not marker.is_ours(head):
            await self._abort(marker.key, marker.upload_id)
            await trio.to_thread.run_sync(_drop_marker, fd)
            return None
        assert head is not None
        part_size = marker.part_size if marker.part_size is not None \
            else self.backend.part_size_for(marker.size)

        def verify() -> os.stat_result | None:
            """The file's size, mtime and ctime if its bytes are exactly S3's, else None."""
            before = os.fstat(fd)
            if (before.st_size, before.st_mtime_ns) != (marker.size, marker.mtime_ns) \
                    or before.st_size != head.version.size:
                return None
            try:
                etag = etag_of(fd, before.st_size, part_size)
            except SourceChanged:
                return None
            same = etag == head.version.etag and _ident(os.fstat(fd)) == _ident(before)
            return before if same else None

        start = await trio.to_thread.run_sync(verify)
        changed = await self._record(rel, fd, stub, head.version, marker.mtime_ns, start)
        if changed:
            return None  # dirty on the landed version: the caller uploads from there
        return _row(rel, UPLOADED, head.version.etag + " (by an interrupted archive; "
                    "nothing sent again)", size=marker.size)

    # -- --delete ----------------------------------------------------------------------------

    def _known(self, rels: list[str]) -> list[tuple[ObjectVersion, str]]:
        """Every version the registry knows a stub of under ``rels``, with its key's path: by
        path and by inode (a removed file a door found stays indexed by inode).  On the loop:
        the registry is the loop's."""
        known: dict[str, tuple[ObjectVersion, str]] = {}
        registry = self.cache.registry
        for stub in [*registry.by_path.values(), *registry.by_ino.values()]:
            v = stub.version
            rel, _ = key_to_relpath(v.key, self.prefix)
            if rel is None or rel.endswith("/") or not _under(rel, rels) \
                    or stub.sync == CONFLICT or v.key in known:
                continue
            known[v.key] = (ObjectVersion(v.key, v.etag, v.size, v.mtime, v.version_id), rel)
        # Stubs removed before this daemon started: only their tombstones know them.
        for t in self._tombstones().values():
            rel, _ = key_to_relpath(t.key, self.prefix)
            if rel is not None and _under(rel, rels) and t.key not in known:
                known[t.key] = (ObjectVersion(t.key, t.etag, t.size, t.mtime, t.version_id),
                                rel)
        return sorted(known.values(), key=lambda item: item[1])

    def _forget_removed(self, key: str) -> None:
        if key in self._tombstones():
            self.cache.tombstones.drop(key)

    def _tombstones(self) -> dict[str, Tombstone]:
        try:
            return self.cache.tombstones.load()
        except OSError as exc:
            log.warning("cannot read the removal log: %s", exc)
            return {}

    def _removed(self, known: list[tuple[ObjectVersion, str]]
                 ) -> list[tuple[ObjectVersion, str]]:
        """Those whose key's path leads to no file now: removed (or renamed away) locally."""
        return [(v, rel) for v, rel in known if not self._exists(rel)]

    async def _delete(self, version: ObjectVersion, rel: str, *,
                      dry_run: bool) -> dict[str, Any]:
        """Step *delete*: the object a removed stub was a copy of is deleted in S3 if S3
        still holds that version (HEAD, then DELETE with ``If-Match``).  Persists nothing
        locally (there is no file); a SIGKILL leaves S3 with or without the object, and the
        next ``--delete`` finds the same.  Checked again first: a file may have appeared."""
        try:
            os.stat(rel, dir_fd=self.cache.root_fd, follow_symlinks=False)
            return _row(rel, UNCHANGED, "a file exists at this path again: not deleted")
        except FileNotFoundError:
            pass
        if dry_run:
            return _row(rel, WOULD_DELETE, version.etag)
        try:
            removed = await trio.to_thread.run_sync(self.backend.delete, version)
        except ObjectChanged:
            head = await trio.to_thread.run_sync(self.backend.head_key, version.key)
            return _row(rel, CONFLICTED, f"{rel}: removed locally from version {version.etag},"
                        f" but S3 now holds {_show(head.version.etag if head else GONE)}: "
                        "not deleted")
        except HsmError as exc:
            return _failed(rel, exc)
        for stub in list(self.cache.registry.by_ino.values()):
            if stub.version.key == version.key and stub.version.etag == version.etag:
                self.cache.registry.forget(stub)
        stale = self.cache.registry.by_path.get(rel)
        if stale is not None and stale.version.key == version.key:
            self.cache.registry.unlink_path(stale)
        await trio.to_thread.run_sync(self.cache.tombstones.drop, version.key)
        return _row(rel, DELETED if removed else UNCHANGED,
                    version.etag if removed else "already gone from S3")


# -- persistence helpers (worker threads) ------------------------------------------------------

def _write_record(fd: int, version: ObjectVersion, owed: int, sync: str) -> None:
    """The record of :meth:`Archiver._record`, in its order (see there)."""
    os.setxattr(fd, X_SYNC, DIRTY.encode())
    os.setxattr(fd, X_OWED, b"0")
    write_identity(fd, version)
    if not version.version_id:
        with contextlib.suppress(OSError):  # ENODATA: none was there
            os.removexattr(fd, X_VERSION)
    os.setxattr(fd, X_OWED, str(owed).encode())
    with contextlib.suppress(OSError):
        os.removexattr(fd, X_REMOTE)
    write_sync(fd, sync, durable=False)
    with contextlib.suppress(OSError):
        write_view(fd, "resident" if sync == CLEAN else sync)
    os.fsync(fd)  # the record is durable before the marker goes
    _drop_marker(fd)


def _crash_point(step: str) -> None:
    """Tests only: ``HSMFS_TEST_CRASH_AT=<step>`` SIGKILLs this process at ``step`` of an
    upload (``marked``: the marker is durable, nothing read; ``read``: every byte read and
    sent, nothing visible; ``sent``: the upload landed, nothing recorded), the way a crash
    would, so the recovery of each can be tested for real.  The one crash-point mechanism
    (:mod:`hsmfs.crashpoint`: a worker the holder restarted never crashes again)."""
    crashpoint.crash_point(crashpoint.ARCHIVE, step)


def _drop_marker(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.removexattr(fd, X_UPLOAD)
        os.fsync(fd)


# -- small helpers --------------------------------------------------------------------------

def _norm(path: str) -> str:
    rel = os.path.normpath(path.lstrip("/")) if path else ""
    return "" if rel == "." else rel


def _under(rel: str, scopes: list[str]) -> bool:
    return any(s == "" or rel == s or rel.startswith(s + "/") for s in scopes)


def _not_a_file(st: os.stat_result) -> str | None:
    if stat.S_ISREG(st.st_mode):
        return None
    kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
    return f"{kind}: S3 holds files only"


def _show(etag: str | None) -> str:
    return "nothing (deleted)" if etag in (None, GONE) else str(etag)


def _conflict_text(rel: str, base: str | None, remote: str | None) -> str:
    based = f"version {base}" if base else "no version (a new file)"
    return (f"{rel}: conflict: the local file is based on {based}, S3 now holds "
            f"{_show(remote)}; the local bytes are kept")


def _row(rel: str, result: str, detail: str = "", **extra: Any) -> dict[str, Any]:
    return {"path": rel, "result": result, "detail": detail, **extra}


def _failed(rel: str, exc: BaseException) -> dict[str, Any]:
    name = errno.errorcode.get(to_errno(exc), "EIO")
    return _row(rel, FAILED, f"{name}: {exc}", errno=name)


#: How often writeback looks for files that became idle.
WRITEBACK_TICK_S = 1.0
#: Writeback uploads at most this many files at once: it runs beside programs, which should
#: keep most of the S3 connections.
WRITEBACK_AT_ONCE = 2
#: A failed upload is tried again after this long, doubling per failure up to the cap.
WRITEBACK_BACKOFF_S = 2.0
WRITEBACK_BACKOFF_CAP_S = 300.0


@dataclass
class WritebackStats:
    uploads: int = 0
    conflicts: int = 0
    failures: int = 0
    pending: int = 0  # dirty or closed-new files waiting for their idle period (last tick)


class Writeback:
    """``-o writeback=SECONDS``: archive a dirty file once every writer closed it and it has
    not been written for ``SECONDS``, with the same :class:`Archiver` as ``hsmfs archive``.

    Candidates, each tick: ``dirty`` stubs, and files with no record that a door saw closed
    after writing (:attr:`StubCache.closed_local`, FUSE door creates).  Idle means both:
    ``closed_at`` (the last writable close either door reported; a dirty file no door has
    reported since this daemon started counts from the daemon's start) is ``SECONDS`` old, and
    the file's mtime is ``SECONDS`` old (every write moves it, so writes reset the clock even
    where no door forwards them: the kernel door ignores ``FAN_MODIFY`` of dirty files).  A
    file the FUSE door holds open for writing (``busy``) is never a candidate; the kernel door
    cannot know about open fds, only closes, so there the mtime is what holds it back.

    Crash answers are those of the archive transition (docs/design.md, "State machine"):
    a SIGKILL *before* an upload leaves the file dirty, and the next daemon's writeback (from
    its start) uploads it; *during* it, the upload marker is on the file, so the next archive
    (this task or the command) HEADs the key and completes the record without sending again,
    or sends once if nothing landed; *after* the record, the file is clean and nothing is
    sent.  A program writing *during* an upload: the start-point check or the door's write hook
    leaves the file dirty based on the new version, its mtime moves, and the next idle period
    uploads it again.

    Never raises out of :meth:`run`: a failed upload is retried after a backoff (2 s doubling
    to 5 min); a conflict is logged once and left alone (``hsmfs state`` shows it).
    """

    def __init__(self, archiver: Archiver, idle_s: float,
                 busy: Any = None) -> None:
        self.archiver = archiver
        self.cache = archiver.cache
        self.idle_s = idle_s
        #: rel -> whether a door holds it open for writing (the FUSE door); None: no one knows.
        self.busy = busy
        self.stats = WritebackStats()
        self._started = 0.0
        self._retry: dict[str, tuple[float, float]] = {}  # rel -> (not before, backoff)
        #: rel -> when it was found in conflict: left alone until a door reports a new close
        #: (the user resolved it and wrote again), so the conflict is logged once.
        self._conflicted: dict[str, float] = {}
        self._running: set[str] = set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        self._started = time.monotonic()
        limiter = trio.CapacityLimiter(WRITEBACK_AT_ONCE)
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                await trio.sleep(WRITEBACK_TICK_S)
                try:
                    due = await trio.to_thread.run_sync(self._unwritten, self._idle())
                except Exception:
                    log.exception("writeback: cannot list idle files")
                    continue
                for rel in due:
                    if rel not in self._running and len(self._running) < WRITEBACK_AT_ONCE:
                        self._running.add(rel)
                        nursery.start_soon(self._one, rel, limiter)

    def _candidates(self) -> dict[str, float]:
        """rel -> the monotonic time its idle clock started."""
        out: dict[str, float] = {}
        for stub in list(self.cache.stubs()):
            if stub.sync == DIRTY and not stub.superseded:
                out[stub.path] = stub.closed_at if stub.closed_at is not None else self._started
        for rel, at in list(self.cache.closed_local.items()):
            if self.cache.stub_at(rel) is None or rel not in out:
                out[rel] = at
        return out

    def _idle(self) -> list[str]:
        """On the loop (the registry and the FUSE door's handles are the loop's): the
        candidates whose close is old enough, not held open for writing, not waiting out a
        backoff or a conflict."""
        now = time.monotonic()
        cands = self._candidates()
        self.stats.pending = len(cands)
        out = []
        for rel, at in sorted(cands.items()):
            if now - at < self.idle_s or at <= self._conflicted.get(rel, -1.0):
                continue
            if rel in self._retry and now < self._retry[rel][0]:
                continue
            if self.busy is not None and self.busy(rel):
                continue  # still open for writing through the FUSE door
            out.append(rel)
        return out

    def _unwritten(self, rels: list[str]) -> list[str]:
        """In a thread (stat): those not written for the idle period, by their mtime."""
        wall = time.time()
        due = []
        for rel in rels:
            try:
                st = os.stat(rel, dir_fd=self.cache.root_fd, follow_symlinks=False)
            except OSError:
                # Gone or renamed since its close: a new path is seen at its next close.
                self.cache.closed_local.pop(rel, None)
                continue
            if not stat.S_ISREG(st.st_mode) or wall - st.st_mtime < self.idle_s:
                continue  # written recently: the clock runs from the last write
            due.append(rel)
        return due

    async def _one(self, rel: str, limiter: trio.CapacityLimiter) -> None:
        try:
            async with limiter:
                try:
                    row = await self.archiver.archive_file(rel)
                except Exception as exc:  # never out of the task
                    row = _failed(rel, exc)
            result = row["result"]
            if result in (UPLOADED, UNCHANGED):
                self._retry.pop(rel, None)
                self._conflicted.pop(rel, None)
                stub = self.cache.stub_at(rel)
                if stub is None or stub.sync != DIRTY:
                    self.cache.closed_local.pop(rel, None)
                if result == UPLOADED:
                    self.stats.uploads += 1
                    log.info("writeback: uploaded %s: %s", rel, row["detail"])
            elif result == CONFLICTED:
                self.stats.conflicts += 1
                self._conflicted[rel] = time.monotonic()
                self.cache.closed_local.pop(rel, None)
                log.warning("writeback: %s is in conflict, left alone: %s", rel, row["detail"])
            else:
                self.stats.failures += 1
                backoff = min(self._retry.get(rel, (0.0, WRITEBACK_BACKOFF_S / 2))[1] * 2,
                              WRITEBACK_BACKOFF_CAP_S)
                self._retry[rel] = (time.monotonic() + backoff, backoff)
                log.warning("writeback: %s %s (%s); trying again in %.0f s", rel, result,
                            row["detail"], backoff)
        except Exception:
            log.exception("writeback: unexpected failure archiving %s", rel)
        finally:
            self._running.discard(rel)

    def snapshot(self) -> dict[str, int]:
        return dataclasses.asdict(self.stats)
