"""``hsmfs resolve --keep-local | --take-remote [--discard] PATH...``: the way out of
``conflict`` (local changes, and S3 holds another version or none) and ``stale`` (a clean copy
of a version S3 no longer holds).  Nothing here guesses: the user says which side wins.

**keep-local** (conflict only): the local bytes become a change *of what S3 holds now*, so the
next ``hsmfs archive`` replaces it, still conditionally (``If-Match`` on that version: a third
writer in between is a new conflict, not a silent overwrite).  If S3 holds nothing any more,
the file stops being a copy of anything: its record goes, and archive uploads it as new
(``If-None-Match: *``).  Every owed byte must be local (a hole of the old version can no longer
be fetched: S3 holds another), else refused.

**take-remote** (conflict or stale): the path becomes a fresh stub of what S3 holds now (or goes
away, if S3 holds nothing).  A conflicting file's bytes are the only copy of someone's work, so
they are first linked into ``.hsmfs/kept/`` (same filesystem: no copy, durable) and the row
says where; ``--discard`` skips that.  A stale file's local bytes are an old version nobody
changed: they are simply dropped.

Crash answers (SIGKILL between any two steps):

* keep-local, S3 holds R: ``owed=0``, then the identity of R, then ``sync=dirty`` (fsync'd).
  Before the identity: still ``conflict`` (run it again).  After the identity, before the sync
  word: a conflict based on R while S3 holds R, which the next start's listing turns into
  ``dirty`` on R (the "unstale" step): the intended end.  After: done.
* keep-local, S3 holds nothing: the key xattr goes first, which alone makes the file a local
  file (a record without its key is no record); the rest is tidying.
* take-remote: the kept link (fsync'd directory) before anything else, so from then on the
  bytes survive whatever follows; the new stub is complete and guarded in staging before the
  exchange puts it at the path (``RENAME_EXCHANGE``: the path always names one whole file);
  the old inode, now in staging, is removed last (a crash leaves it there, and the next start
  clears staging: its bytes live on in ``.hsmfs/kept/``).

*Open or mapped files*: keep-local changes only xattrs, so programs holding the file go on with
the same inode and bytes.  take-remote refuses while a door serves or fills the file (EBUSY);
a program that holds the old inode open keeps reading it (superseded: its bytes were local),
and new opens of the path reach the new stub.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import posixpath
import time
from typing import TYPE_CHECKING, Any

import trio

from .backend_s3 import ObjectInfo
from .keys import STATE_DIR
from .ranges import RangeMap
from .state import Stub
from .stubfile import (
    CONFLICT,
    DIRTY,
    STALE,
    X_ETAG,
    X_KEY,
    X_MTIME,
    X_OWED,
    X_REMOTE,
    X_RSIZE,
    X_SYNC,
    X_VERSION,
    RemoteVersion,
    write_identity,
    write_sync,
    write_view,
)

if TYPE_CHECKING:
    from .cache import StubCache

log = logging.getLogger(__name__)

KEPT_DIR = f"{STATE_DIR}/kept"


@dataclasses.dataclass(frozen=True)
class Resolved:
    result: str  # "kept local" | "took remote" | "refused"
    detail: str = ""
    errno: int = 0
    #: take-remote: (old inode, new inode or None) of the path, for the FUSE door's caches.
    inodes: tuple[int, int | None] | None = None

    def row(self, rel: str) -> dict[str, Any]:
        out: dict[str, Any] = {"path": rel, "result": self.result, "detail": self.detail}
        if self.errno:
            out["errno"] = self.errno
            out["detail"] = f"{errno.errorcode[self.errno]}: {self.detail}"
        return out


def _refused(why: str, code: int = errno.EPERM) -> Resolved:
    return Resolved("refused", why, code)


async def resolve(cache: StubCache, stub: Stub, head: ObjectInfo | None, *, keep_local: bool,
                  discard: bool = False) -> Resolved:
    """Resolve one file; ``head`` is what S3 holds at its key now (None: nothing)."""
    async with cache._file_lock(stub.ino):
        if stub.superseded:
            return _refused("no path leads to this copy any more")
        if keep_local:
            return await _keep_local(cache, stub, head)
        return await _take_remote(cache, stub, head, discard)


async def _keep_local(cache: StubCache, stub: Stub, head: ObjectInfo | None) -> Resolved:
    if stub.sync != CONFLICT:
        return _refused(f"{stub.state}: only a conflict has local changes to keep")
    ranges = await cache._ranges(stub)
    if not (stub.local or ranges.covers(0, stub.owed)):
        return _refused(f"part of version {stub.version.etag} was never fetched and S3 no "
                        "longer holds it; the local bytes are not a whole file")
    await cache.engine.wait_idle(stub)
    fd = await trio.to_thread.run_sync(cache.writable_fd, stub)  # an open: off the loop
    if head is None:
        await trio.to_thread.run_sync(_forget_record, fd)
        cache.registry.forget(stub)
        cache._close_fd(stub)
        log.info("%r: kept local; S3 holds nothing at %r, so it is a new file now",
                 stub.path, stub.version.key)
        return Resolved("kept local", "S3 holds nothing there: archive uploads it as new")
    remote = RemoteVersion(head.version.key, head.version.etag, head.version.size,
                           head.version.mtime, head.version.version_id)
    await trio.to_thread.run_sync(_rebase, fd, remote)
    stub.version, stub.owed, stub.remote, stub.sync = remote, 0, None, DIRTY
    stub.ranges, stub.local = RangeMap(), True
    log.info("%r: kept local, now a change of %s (archive replaces it)", stub.path, remote.etag)
    return Resolved("kept local", f"dirty on {remote.etag}: archive replaces it")


def _rebase(fd: int, remote: RemoteVersion) -> None:
    """keep-local with S3 holding ``remote``: in the order the module docstring answers for."""
    os.setxattr(fd, X_OWED, b"0")
    write_identity(fd, remote)
    if not remote.version_id:
        with contextlib.suppress(OSError):  # ENODATA: none was there
            os.removexattr(fd, X_VERSION)
    with contextlib.suppress(OSError):
        os.removexattr(fd, X_REMOTE)
    write_sync(fd, DIRTY, durable=True)
    with contextlib.suppress(OSError):
        write_view(fd, DIRTY)


def _forget_record(fd: int) -> None:
    """keep-local with S3 holding nothing: the key first (alone it makes the file local)."""
    for name in (X_KEY, X_ETAG, X_RSIZE, X_MTIME, X_VERSION, X_OWED, X_REMOTE, X_SYNC):
        with contextlib.suppress(OSError):
            os.removexattr(fd, name)
        if name == X_KEY:
            os.fsync(fd)
    with contextlib.suppress(OSError):
        write_view(fd, "local")


async def _take_remote(cache: StubCache, stub: Stub, head: ObjectInfo | None,
                       discard: bool) -> Resolved:
    if stub.sync not in (CONFLICT, STALE):
        return _refused(f"{stub.state}: nothing to resolve")
    rel, keep = stub.path, stub.sync == CONFLICT and not discard
    kept = await trio.to_thread.run_sync(_keep_aside, cache, stub) if keep else None
    # After the await, not before it: a door may have started to serve the old inode while
    # the link was made.  No await from here on: none can start between this check and the
    # exchange (a few metadata syscalls, on the loop; the kept link stays either way).
    if stub.pins or cache.engine.busy(stub) or stub.superseded:
        where = f"; its bytes are also kept at {kept}" if kept else ""
        return _refused("a door is serving it right now; try again" + where, errno.EBUSY)
    new_ino: int | None = None
    if head is None:
        cache.tree.unlink(rel, stub.ino, stub.gen, any_data=True)
        cache._supersede(stub, forget=True)
        got = "S3 holds nothing there: removed"
    else:
        v = head.version
        new_ino, gen = cache.tree.create_stub(rel, v, head.mode, cache._guard(v.size == 0),
                                              replace=(stub.ino, stub.gen), any_data=True)
        cache._supersede(stub, forget=True)
        cache.registry.add(Stub(path=rel, version=RemoteVersion(
            v.key, v.etag, v.size, v.mtime, v.version_id), ino=new_ino, gen=gen, owed=v.size,
            ranges=RangeMap(), local=v.size == 0))
        got = f"now a stub of {v.etag}"
    where = f"; the local bytes are kept at {kept}" if kept else ""
    log.info("%r: took the remote version: %s%s", rel, got, where)
    return Resolved("took remote", got + where, inodes=(stub.ino, new_ino))


def _keep_aside(cache: StubCache, stub: Stub) -> str:
    """Hard-link the conflicting file into ``.hsmfs/kept/`` and make the link durable; the
    path of the link, relative to the tree."""
    name = (f"{time.strftime('%Y%m%dT%H%M%S')}-{stub.version.etag.strip(chr(34))[:12]}-"
            f"{posixpath.basename(stub.path)}")
    target = f"{KEPT_DIR}/{name}"
    _mkdir(cache.root_fd, KEPT_DIR)
    os.link(stub.path, target, src_dir_fd=cache.root_fd, dst_dir_fd=cache.root_fd,
            follow_symlinks=False)
    fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cache.root_fd)
    try:
        if os.fstat(fd).st_ino != stub.ino:
            os.unlink(target, dir_fd=cache.root_fd)
            raise OSError(errno.ESTALE, f"{stub.path!r} changed while it was being kept")
    finally:
        os.close(fd)
    dfd = os.open(KEPT_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=cache.root_fd)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return target


def _mkdir(root_fd: int, rel: str) -> None:
    with contextlib.suppress(FileExistsError):
        os.mkdir(rel, 0o700, dir_fd=root_fd)
