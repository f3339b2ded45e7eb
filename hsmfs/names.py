"""The kernel door's second fanotify group: names (create, delete, rename, close of new files).

The pre-content group reports fds, never names, and refuses every directory event with EINVAL
(docs/KERNEL_FACTS_3.md §4).  Programs create, remove and rename files in the backing tree
directly, so this worker runs a second, notification-only group with
``FAN_REPORT_DFID_NAME_TARGET``: each event names the directory (a file handle), the entry, and
the file itself (its handle, which on ext4 is ``(inode, generation)``: exactly how the core
knows a stub).  What it is told, and what it does:

* ``FAN_DELETE`` of a stub's name → :meth:`StubCache.unlinked` (the stub is superseded; a
  program holding it is still served) and the cache's tombstone, so a restart does not make
  the removed file again from the listing, and ``archive --delete`` still knows to remove it.
* ``FAN_RENAME`` → :meth:`StubCache.moved` (files and whole directories; a name moved out of
  the tree counts as a removal).
* ``FAN_CLOSE_WRITE`` of a file with no record (inode-mark layout only: a filesystem mark
  already brings those closes through the pre-content group, with an fd) → writeback's clock.
* A new directory (inode-mark layout) is marked as soon as it is seen, then scanned: files made
  in it before the mark count as closed now.

**Why a second group may be lossy.**  Everything here is a hint about the *namespace*; nothing
here guards bytes.  A lost event (queue overflow, a worker restart: the group lives in the
worker, not the holder) costs at worst a writeback that waits for the next close, a stub indexed
at an old path until the next start's scan, or a removed stub whose object ``archive --delete``
finds by scanning for its path anyway.  hsmfs's own creates, renames and unlinks (staging,
populate, the FUSE door) are told to the core directly; the group cannot ignore the private
door's mount for directory events (EINVAL), so they are filtered by pid instead.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from .fanotify import (
    FAN_CLOEXEC,
    FAN_CLOSE_WRITE,
    FAN_EVENT_ON_CHILD,
    FAN_MARK_ADD,
    FAN_MARK_FILESYSTEM,
    FAN_NONBLOCK,
    FAN_ONDIR,
    FAN_Q_OVERFLOW,
    fanotify_init,
    fanotify_mark,
    fanotify_mark_fd,
)
from .handles import open_handle

if TYPE_CHECKING:
    from .cache import StubCache

log = logging.getLogger(__name__)

FAN_OPEN = 0x0000_0020
FAN_CREATE = 0x0000_0100
FAN_DELETE = 0x0000_0200
FAN_RENAME = 0x1000_0000
FAN_REPORT_FID = 0x0000_0200
FAN_REPORT_DIR_FID = 0x0000_0400
FAN_REPORT_NAME = 0x0000_0800
FAN_REPORT_TARGET_FID = 0x0000_1000
FAN_REPORT_DFID_NAME_TARGET = (FAN_REPORT_FID | FAN_REPORT_DIR_FID | FAN_REPORT_NAME
                               | FAN_REPORT_TARGET_FID)

_INFO_FID = 1
_INFO_DFID_NAME = 2
_INFO_DFID = 3
_INFO_OLD_DFID_NAME = 10
_INFO_NEW_DFID_NAME = 12

_METADATA = struct.Struct("=IBBHQii")
_INFO_HEADER = struct.Struct("=BBH")
_FSID = 8
_HANDLE_HEAD = struct.Struct("=Ii")
#: ext4/xfs FILEID_INO32_GEN and FILEID_INO32_GEN_PARENT: ``u32 ino, u32 gen`` first.
_INO32_GEN_TYPES = (1, 2)

#: Every directory's own events, and closes of the files in it (inode-mark layout).
DIR_MASK = FAN_CREATE | FAN_DELETE | FAN_RENAME | FAN_ONDIR | FAN_EVENT_ON_CHILD | FAN_CLOSE_WRITE
#: A filesystem mark: the pre-content group already sees every close, with an fd.
FS_MASK = FAN_CREATE | FAN_DELETE | FAN_RENAME | FAN_ONDIR
#: With eviction on (``-o cache_size``/``min_free``), opens too: a resident file raises no
#: permission event, so an open seen here is the kernel door's only sign that it is in use.
RECENCY_MASK = FAN_OPEN


@dataclass(frozen=True)
class Name:
    """A directory (as its file handle) and an entry name in it."""

    handle: bytes  # struct file_handle: handle_bytes, handle_type, f_handle
    name: str


@dataclass(frozen=True)
class NameEvent:
    mask: int
    pid: int
    name: Name | None = None       # CREATE, DELETE, CLOSE_WRITE: the entry
    old: Name | None = None        # RENAME: from
    new: Name | None = None        # RENAME: to
    target: tuple[int, int] | None = None  # (inode, generation) of the file, where decodable


def parse(buf: bytes) -> Iterator[NameEvent]:
    """The events in one read of a ``FAN_REPORT_DFID_NAME_TARGET`` group."""
    view = memoryview(buf)
    pos = 0
    while pos + _METADATA.size <= len(view):
        length, _ver, _res, meta_len, mask, _fd, pid = _METADATA.unpack_from(view, pos)
        if length < meta_len or pos + length > len(view):
            break
        fields: dict[str, object] = {}
        info = pos + meta_len
        while info + _INFO_HEADER.size <= pos + length:
            itype, _pad, ilen = _INFO_HEADER.unpack_from(view, info)
            if ilen == 0:
                break
            body = bytes(view[info + _INFO_HEADER.size + _FSID:info + ilen])
            hbytes, htype = _HANDLE_HEAD.unpack_from(body, 0)
            handle = body[:_HANDLE_HEAD.size + hbytes]
            name = body[_HANDLE_HEAD.size + hbytes:].split(b"\0", 1)[0]
            entry = Name(handle, os.fsdecode(name))
            if itype == _INFO_FID:
                if htype in _INO32_GEN_TYPES and hbytes >= 8:
                    fields["target"] = struct.unpack_from("=II", body, _HANDLE_HEAD.size)
            elif itype == _INFO_DFID_NAME:
                fields["name"] = entry
            elif itype == _INFO_OLD_DFID_NAME:
                fields["old"] = entry
            elif itype == _INFO_NEW_DFID_NAME:
                fields["new"] = entry
            info += ilen
        yield NameEvent(mask, pid, **fields)  # type: ignore[arg-type]
        pos += length


class NameWatcher:
    """Owns the names group of one kernel door (in the worker: see the module docstring)."""

    def __init__(self, cache: StubCache, cache_dir: str, root_fd: int,
                 filesystem_mark: bool) -> None:
        self.cache = cache
        # open_by_handle_at refuses an O_PATH fd (EBADF): a real fd of the private door's
        # root, so handles resolve to paths within it.
        self.mount_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)
        self.root_fd = root_fd
        self.filesystem_mark = filesystem_mark
        self.own_pid = os.getpid()
        self.events = 0
        self.overflows = 0
        self.marked_dirs = 0
        self.opens = 0
        extra = RECENCY_MASK if cache.cfg.cache_size > 0 or cache.cfg.min_free_pct > 0 else 0
        self.dir_mask = DIR_MASK | extra
        self.fan_fd = fanotify_init(FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_DFID_NAME_TARGET,
                                    os.O_RDONLY | os.O_CLOEXEC)
        try:
            if filesystem_mark:
                # By the private door's fd, not the path: behind a cover (a restart after a
                # stop) the path leads to the cover's tmpfs, not to the filesystem to watch.
                fanotify_mark(self.fan_fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, FS_MASK | extra, ".",
                              dirfd=root_fd)
            else:
                self._mark_tree(".", note_files=False)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in (self.fan_fd, self.mount_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- marks (inode-mark layout) ------------------------------------------------------------

    def _mark_tree(self, rel: str, *, note_files: bool) -> None:
        """Mark ``rel`` and every directory below it (not the metadata dir).  Marked first, then
        listed: a file made after the mark raises its own events, one made before is listed."""
        try:
            top = os.open(rel, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.root_fd)
        except OSError as exc:
            log.info("cannot watch names in %r: %s", rel, exc)
            return
        try:
            for dirpath, dirnames, filenames, dirfd in os.fwalk(dir_fd=top):
                if dirpath == "." and rel == ".":
                    dirnames[:] = [d for d in dirnames if d != ".hsmfs"]
                fanotify_mark_fd(self.fan_fd, FAN_MARK_ADD, self.dir_mask, dirfd)
                self.marked_dirs += 1
                if note_files and self.cache.cfg.writeback_s:
                    base = os.path.normpath(os.path.join(rel, dirpath))
                    for fname in filenames:
                        self._closed(os.path.join(base, fname), None)
        finally:
            os.close(top)

    # -- events -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Read and apply events until cancelled.  Applied on the loop: the registry is its."""
        while True:
            await trio.lowlevel.wait_readable(self.fan_fd)
            try:
                buf = os.read(self.fan_fd, 64 * 1024)
            except BlockingIOError:
                continue
            except OSError as exc:
                log.warning("names group: %s", exc)
                continue
            for event in parse(buf):
                try:
                    self.apply(event)
                except Exception:
                    log.exception("names group: cannot apply %r", event)

    def apply(self, event: NameEvent) -> None:
        if event.mask & FAN_Q_OVERFLOW:
            self.overflows += 1
            log.warning("names group overflowed: creates, renames or removals were missed; "
                        "the next start's scan sees them")
            return
        if event.pid == self.own_pid:
            # hsmfs's own staging, populate and FUSE door tell the core directly; but a
            # directory a refresh made must be watched like any other.
            if event.mask & FAN_CREATE and event.mask & FAN_ONDIR \
                    and not self.filesystem_mark:
                rel = self._rel(event.name)
                if rel is not None:
                    self._mark_tree(rel, note_files=False)
            return
        if event.mask & FAN_OPEN:
            self.opens += 1
            if event.target is not None:
                self.cache.touch(*event.target)
            if not event.mask & (FAN_CREATE | FAN_DELETE | FAN_RENAME | FAN_CLOSE_WRITE):
                return  # an open alone: no name to resolve (open_by_handle_at costs)
        self.events += 1
        if event.mask & FAN_RENAME:
            self._renamed(event)
            return
        if event.name is None:
            return
        rel = self._rel(event.name)
        if rel is None:
            return
        if event.mask & FAN_DELETE and not event.mask & FAN_ONDIR:
            self._deleted(rel, event.target)
        elif event.mask & FAN_CREATE and event.mask & FAN_ONDIR:
            if not self.filesystem_mark:
                self._mark_tree(rel, note_files=True)
        elif event.mask & FAN_CLOSE_WRITE and not event.mask & FAN_ONDIR:
            self._closed(rel, event.target)

    def _closed(self, rel: str, target: tuple[int, int] | None) -> None:
        if not self.cache.cfg.writeback_s:
            return
        stub = self.cache.stub_at(rel)
        if stub is not None and (target is None or (stub.ino, stub.gen) == tuple(target)):
            return  # a stub: the pre-content group's marks bring its closes, with an fd
        self.cache.note_closed(rel)

    def _deleted(self, rel: str, target: tuple[int, int] | None) -> None:
        stub = self.cache.stub_at(rel)
        if stub is None:
            self.cache.closed_local.pop(rel, None)
            return
        if target is not None and (stub.ino, stub.gen) != tuple(target):
            return  # another file by that name (the stub was renamed away first)
        self.cache.unlinked(rel, stub.ino)  # superseded, and its tombstone written

    def _renamed(self, event: NameEvent) -> None:
        old = self._rel(event.old) if event.old is not None else None
        new = self._rel(event.new) if event.new is not None else None
        directory = bool(event.mask & FAN_ONDIR)
        if old is not None and new is not None:
            self.cache.moved({old: new})
            if old in self.cache.closed_local:
                self.cache.closed_local[new] = self.cache.closed_local.pop(old)
        elif old is not None:  # moved out of the tree: gone from here
            if not directory:
                self._deleted(old, event.target)
            else:
                for stub in [s for p, s in self.cache.registry.by_path.items()
                             if p.startswith(old + "/")]:
                    self._deleted(stub.path, None)
        if new is not None:
            if directory and not self.filesystem_mark and old is None:
                self._mark_tree(new, note_files=True)  # moved in from outside: unmarked
            elif not directory and old is None:
                self._closed(new, event.target)

    def _rel(self, entry: Name | None) -> str | None:
        """The entry's path relative to the cache root, or None outside it (or gone)."""
        if entry is None or not entry.name or entry.name in (".", ".."):
            return None
        try:
            fd = open_handle(self.mount_fd, entry.handle, os.O_PATH | os.O_DIRECTORY)
        except OSError as exc:
            if exc.errno not in (errno.ESTALE, errno.ENOENT):
                log.debug("names group: cannot open a directory handle: %s", exc)
            return None
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None
        finally:
            os.close(fd)
        # Within the private door (a detached mount of the cache dir) a path reads "/a/b";
        # a directory outside it, or removed, does not read as a plain absolute path.
        if not where.startswith("/") or where.endswith(" (deleted)"):
            return None
        rel = f"{where.strip('/')}/{entry.name}".lstrip("/")
        if rel == ".hsmfs" or rel.startswith(".hsmfs/"):
            return None  # hsmfs's metadata and staging: never the user's namespace
        return rel

    def stats(self) -> dict[str, int]:
        return {"name_events": self.events, "name_opens": self.opens,
                "name_overflows": self.overflows,
                "watched_dirs": self.marked_dirs}
