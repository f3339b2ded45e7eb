"""The on-disk format of a stub: what a backing file carries about itself, and how it is read.

A backing file is its own record.  Its **data extents** say which bytes are local (the only
residency truth: ``SEEK_DATA``/``SEEK_HOLE``, which raise no fanotify event); its **trusted
xattrs** say which remote version it is a copy of and whether it holds local changes.  Nothing
else is needed to restart, and nothing an application can write decides what is served:

* ``trusted.*`` xattrs need ``CAP_SYS_ADMIN`` to read or write, so a user who can write the file
  cannot forge them (``user.*`` ones could be: issue 10, defect 6).  Root can, as root can write
  the bytes themselves.
* Residency is never stored as a word.  A word could claim bytes a crash lost (power loss between
  the word and the data) or bytes nobody wrote (a forged word); extents cannot.
* ``user.hsm.state`` is a *view* for HSM-aware tools (``getfattr`` through either door); it is
  written at transitions and never read back by hsmfs to decide anything.
* ``user.hsm.error`` is another view: the last failure a program was given for this file
  (:func:`format_error`).  Informational only; see docs/design.md, "The last failure".

Record (all values ASCII):

==========================  ======================================================================
``trusted.hsmfs.key``       object key the file is a copy of
``trusted.hsmfs.etag``      ETag of that version (immutable once written)
``trusted.hsmfs.version``   S3 version id, when the bucket has one
``trusted.hsmfs.rsize``     size of that version in S3
``trusted.hsmfs.mtime``     LastModified of that version (seconds, float)
``trusted.hsmfs.owed``      bytes below this offset that are holes are still owed by S3; absent
                            means ``rsize``.  Lowered (never raised) by a local truncate: bytes
                            the application cut off must never be fetched back over what it
                            writes next.
``trusted.hsmfs.sync``      ``clean`` | ``dirty`` | ``stale`` | ``conflict`` (absent: clean)
``trusted.hsmfs.remote``    for ``stale``/``conflict``: the ETag S3 holds now, or ``-`` if the
                            object is gone (for the message that names both versions)
``trusted.hsmfs.pinned``    ``1``: ``hsmfs pin`` — kept local, never released (absent: not pinned)
==========================  ======================================================================

What must not: import trio or boto3, decide a transition (that is :mod:`hsmfs.cache`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

# -- names ---------------------------------------------------------------------------------------

X_KEY = "trusted.hsmfs.key"
X_ETAG = "trusted.hsmfs.etag"
X_VERSION = "trusted.hsmfs.version"
X_RSIZE = "trusted.hsmfs.rsize"
X_MTIME = "trusted.hsmfs.mtime"
X_OWED = "trusted.hsmfs.owed"
X_SYNC = "trusted.hsmfs.sync"
X_REMOTE = "trusted.hsmfs.remote"
#: ``hsmfs pin``: a policy of the user's, not a state; trusted like the record, so a user who
#: may write the file cannot pin (or unpin) it for root's eviction.
X_PINNED = "trusted.hsmfs.pinned"
#: A release is punching this clean file (set under the lease before the punch, removed after
#: the version's mtime is put back): a start that finds it on a file with no data and a moved
#: mtime knows the punch, not a program, moved it (docs/design.md, Release).
X_RELEASING = "trusted.hsmfs.releasing"
#: The view: generic name HSM-aware tools read; never read back to decide anything.
X_VIEW = "user.hsm.state"
#: The last failure a program was given for this file (a view, like :data:`X_VIEW`): its
#: cause, errno, HTTP status when known, and time.  Never read back to decide anything.
X_ERROR = "user.hsm.error"
#: The format before this one kept its record in ``user.*`` (forgeable).  Files carrying only
#: that are never trusted: see :func:`legacy_identity`.
LEGACY_KEY = "user.hsmfs.key"

# -- words ---------------------------------------------------------------------------------------

# Residency (derived from extents, never stored).
STUB, PARTIAL, RESIDENT = "stub", "partial", "resident"
# Sync status (stored).
CLEAN, DIRTY, STALE, CONFLICT = "clean", "dirty", "stale", "conflict"
SYNC_WORDS = frozenset({CLEAN, DIRTY, STALE, CONFLICT})
#: Every word ``state`` may show: the sync status when it is not clean, else the residency.
STATE_WORDS = frozenset({STUB, PARTIAL, RESIDENT, DIRTY, STALE, CONFLICT})
#: ``trusted.hsmfs.remote`` of an object that is gone from S3.
GONE = "-"


class VersionLike(Protocol):
    key: str
    etag: str
    size: int
    mtime: float
    version_id: str | None


@dataclass(frozen=True, slots=True)
class RemoteVersion:
    """One version of one object: the immutable thing a stub is a copy of."""

    key: str
    etag: str
    size: int
    mtime: float
    version_id: str | None = None


@dataclass(frozen=True, slots=True)
class Record:
    """What a backing file says about itself (its trusted xattrs)."""

    version: RemoteVersion
    owed: int  # holes below this are owed by S3 (<= version.size)
    sync: str
    remote: str | None  # what S3 holds now, for stale/conflict
    pinned: bool = False  # hsmfs pin: never released
    releasing: bool = False  # X_RELEASING: a release was punching it when hsmfs last stopped


def _get(fd: int, name: str) -> str | None:
    try:
        return os.getxattr(fd, name).decode()
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise


def read_record(fd: int) -> Record | None:
    """The record of a backing file, or None if it carries none (a local file) or a malformed
    one (never trusted: it is treated as a local file, which is the safe direction — a local
    file is never filled from S3)."""
    key = _get(fd, X_KEY)
    if key is None:
        return None
    etag, rsize = _get(fd, X_ETAG), _get(fd, X_RSIZE)
    if etag is None or rsize is None:
        return None
    try:
        size = int(rsize)
        mtime = float(_get(fd, X_MTIME) or 0.0)
        owed_text = _get(fd, X_OWED)
        owed = size if owed_text is None else int(owed_text)
    except ValueError:
        return None
    sync = _get(fd, X_SYNC) or CLEAN
    if size < 0 or not 0 <= owed <= size or sync not in SYNC_WORDS:
        return None
    version = RemoteVersion(key, etag, size, mtime, _get(fd, X_VERSION))
    return Record(version, owed, sync, _get(fd, X_REMOTE), _get(fd, X_PINNED) == "1",
                  _get(fd, X_RELEASING) is not None)


def write_releasing(fd: int, releasing: bool) -> None:
    """Set or drop :data:`X_RELEASING`.  Not fsync'd, like the punch it brackets: SIGKILL
    loses neither; a power cut that kept the punch but lost the marker leaves what there was
    without it (the start records the file dirty: the safe direction)."""
    if releasing:
        os.setxattr(fd, X_RELEASING, b"1")
    else:
        with contextlib.suppress(OSError):
            os.removexattr(fd, X_RELEASING)


def write_identity(fd: int, version: VersionLike) -> None:
    """The remote version a new stub is a copy of.  Written once, in staging, before the stub
    can be reached: an identity never changes under a reachable file."""
    os.setxattr(fd, X_KEY, version.key.encode())
    os.setxattr(fd, X_ETAG, version.etag.encode())
    os.setxattr(fd, X_RSIZE, str(version.size).encode())
    os.setxattr(fd, X_MTIME, repr(float(version.mtime)).encode())
    if version.version_id:
        os.setxattr(fd, X_VERSION, version.version_id.encode())


def write_sync(fd: int, sync: str, remote: str | None = None, *, durable: bool) -> None:
    """Record a sync status.  ``durable``: fsync before returning, for states that protect
    local data (``dirty``, ``conflict``): a crash right after must still find them."""
    assert sync in SYNC_WORDS
    if remote is not None:
        os.setxattr(fd, X_REMOTE, remote.encode())
    os.setxattr(fd, X_SYNC, sync.encode())
    if durable:
        os.fsync(fd)


def write_owed(fd: int, owed: int) -> None:
    os.setxattr(fd, X_OWED, str(owed).encode())


def read_pinned(fd: int) -> bool:
    return _get(fd, X_PINNED) == "1"


def write_pinned(fd: int, pinned: bool) -> None:
    """Record (or drop) a pin, fsync'd: a pin the user was told about survives a crash."""
    if pinned:
        os.setxattr(fd, X_PINNED, b"1")
    else:
        try:
            os.removexattr(fd, X_PINNED)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
    os.fsync(fd)


def write_view(fd: int, word: str) -> None:
    """The state word for HSM-aware tools.  A view: failures are the caller's to ignore."""
    os.setxattr(fd, X_VIEW, word.encode())


def format_error(cause: str, err: int, status: int | None, when: float) -> str:
    """The value of :data:`X_ERROR`: ``cause=WORD errno=NAME [http=NNN] time=ISO8601Z``.

    Short on purpose: on ext4 it shares the inode's or the record's xattr space, and it is
    written while the disk may be full.  Space-separated ``key=value``, so a shell reads it
    with ``getfattr --only-values`` and ``tr ' ' '\\n'``."""
    name = errno.errorcode.get(err, str(err))
    words = [f"cause={cause}", f"errno={name}"]
    if status:
        words.append(f"http={status}")
    words.append("time=" + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)))
    return " ".join(words)


def parse_error(text: str) -> dict[str, object]:
    """:data:`X_ERROR` as a dict (for ``hsmfs state``).  The value is a ``user.*`` xattr that
    whoever may write the file may also write: parsed for display only, unknown or malformed
    words ignored, never trusted for anything."""
    out: dict[str, object] = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if not sep or key not in ("cause", "errno", "http", "time"):
            continue
        if key == "http":
            if value.isdigit():
                out["http"] = int(value)
        elif key == "errno":
            out["errno"] = value
            number = getattr(errno, value, None)
            if isinstance(number, int):
                out["errno_number"] = number
        else:
            out[key] = value
    return out


def write_error(fd: int, value: str | None) -> None:
    """Publish (or, with None, remove) :data:`X_ERROR`.  Not fsync'd: a view."""
    if value is not None:
        os.setxattr(fd, X_ERROR, value.encode())
        return
    try:
        os.removexattr(fd, X_ERROR)
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise


def legacy_identity(fd: int) -> bool:
    """Whether the file carries the old, forgeable ``user.hsmfs.*`` record and no trusted one."""
    return _get(fd, LEGACY_KEY) is not None and _get(fd, X_KEY) is None


# -- extents -------------------------------------------------------------------------------------

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


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def punch(fd: int, start: int, stop: int) -> None:
    """Turn ``[start, stop)`` back into a hole (``PUNCH_HOLE|KEEP_SIZE``: the length stays).
    Through the private door it raises no event; it moves the file's mtime (the caller puts a
    clean copy's back)."""
    if stop <= start:
        return
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, stop - start):
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")


def has_data(fd: int, end: int) -> bool:
    """Whether any byte below ``end`` is data."""
    return next(data_extents(fd, end), None) is not None


# -- inode identity ------------------------------------------------------------------------------

#: FS_IOC_GETVERSION: the inode's generation, new for every inode the filesystem allocates.
_FS_IOC_GETVERSION = 0x80087601


def generation(fd: int) -> int:
    """The inode generation of ``fd`` (0 where the filesystem has none).

    An inode number alone does not name a file: once a stub's inode is freed (an application
    unlinked it), the next file created may get the same number, and filling *that* file with
    the old object's bytes would corrupt it.  ``(st_ino, generation)`` does not repeat.
    """
    try:
        buf = fcntl.ioctl(fd, _FS_IOC_GETVERSION, b"\0" * 8)
    except OSError:
        return 0
    # The ioctl is declared with a long but ext4, xfs and btrfs store an int: read 4 bytes.
    return struct.unpack_from("=I", buf)[0]


# -- a look without a daemon ---------------------------------------------------------------------

def describe(path: str) -> dict[str, object]:
    """State of one file (for ``hsmfs state``) from ``stat`` and xattrs alone, so it never opens
    the file (an open may be a fill) and works through either door or with no daemon.

    The word is the view (``user.hsm.state``), trusted here only for display; the identity is
    the trusted record when this process may read it.  ``resident_bytes`` of a partial file is an
    estimate (``st_blocks`` may count an xattr block); ``hsmfs state`` asks the daemon, or scans
    the extents, for the exact figure.
    """
    st = os.stat(path)
    info: dict[str, object] = {"path": path, "size": st.st_size}

    def get(name: str) -> str | None:
        try:
            return os.getxattr(path, name).decode()
        except OSError:
            return None

    key = get(X_KEY)
    word = get(X_VIEW)
    if key is None and word is None:
        info.update(state="local", resident_bytes=st.st_size, key=None)
        return info
    if word not in STATE_WORDS:
        word = STUB
    try:
        remote = int(get(X_RSIZE) or st.st_size)
    except ValueError:
        remote = st.st_size
    # Only ``resident`` says every owed byte is local; a dirty or conflicting file may be
    # partial (a truncated stub), so it gets the estimate.
    resident = (min(st.st_size, remote) if word == RESIDENT else 0
                if word == STUB else min(st.st_blocks * 512, st.st_size, remote))
    error = get(X_ERROR)
    info.update(state=word, resident_bytes=resident, key=key, remote_size=remote,
                error=parse_error(error) if error else None,
                pinned="1" in (get(X_PINNED), get("user.hsm.pinned")),  # FUSE: the view
                etag=get(X_ETAG), mtime=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                      time.gmtime(st.st_mtime)))
    return info


def scan_resident_bytes(path: str, end: int) -> int:
    """Exact resident bytes of a backing file by its data extents.  Opens the file: call it
    only when no daemon guards the tree (with no marks, an open raises no event)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return sum(stop - start for start, stop in data_extents(fd, end))
    finally:
        os.close(fd)
