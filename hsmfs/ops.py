"""The FUSE door: pyfuse3 operations over the backing tree.

A translation, nothing more: a FUSE request in, :meth:`StubCache.ensure` for the bytes it
touches, the backing file's bytes or an errno out.  What is resident, when to fetch and which
errno belong to the core (``cache.py``, ``errors.to_errno``).

Choices (measured in FUSE_BASELINE.md):

* FUSE inode numbers are the backing files' own ``st_ino`` (the cache root maps to
  ``ROOT_INODE``), so both doors name a file the same way and no table must survive a restart.
* ``keep_cache=True`` for a clean file: a re-read of a resident file is served by the kernel
  page cache and never reaches Python.  A dirty one drops its pages at each open: it may be
  written behind the mount (:meth:`Operations._keep_cache`).  Requests are 1 MiB (the mount's
  ``read_ahead_kb`` is raised right after mounting), and entry/attribute timeouts are long
  (never 0).
* Nothing blocks the trio loop: every syscall that may touch the disk (stat, open, readdir,
  xattrs, pread) runs in a worker thread.  Reads first try ``preadv(RWF_NOWAIT)`` inline, which
  never blocks by definition — a page-cache hit costs no thread hop — and go to a thread only
  when the data is not cached.  ``close`` of a read-only local fd stays inline: it does no I/O.
* Read-write by default (``-o ro``: a read-only mount, ``EROFS`` from the kernel and from every
  write handler).  Writes go to the backing file through a private ``O_RDWR`` fd per write
  handle (never cached: a writable fd would make an exec of the backing file ``ETXTBSY``);
  reads keep the shared, cached ``O_RDONLY`` fd.  Before the first byte of a write lands in a
  stub the core makes the file local and records it dirty, durably (``Intent.WRITE``); a
  length change of a stub is the core's *local truncate* (``cache.truncate``: nothing fetched).
  Files created through the mount carry no record: nothing is owed.
* Only ``FUSEError`` may leave a handler (pyfuse3's contract); :func:`_boundary` turns anything
  else into ``EIO`` with one log line, so a bug fails one request instead of the mount.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import posixpath
import resource
import stat
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

from .cache import Change, Intent, Pin, Stub, StubCache
from .config import FuseConfig
from .errors import HsmError, Superseded, to_errno
from .keys import STATE_DIR
from .mounts import fuse_device
from .mounts import mountinfo as mountinfo  # re-exported: hsmfs.bench.passfs reads it here
from .stubfile import CLEAN, CONFLICT, DIRTY, X_VIEW, RemoteVersion
from .stubfile import X_ERROR as XATTR_ERROR

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

#: The kernel opens an executable with ``__FMODE_EXEC`` in the flags it passes to FUSE_OPEN.
#: A binary is fetched whole before it runs: pages of a running text must never be missing.
FMODE_EXEC = 0x20

#: Backing fds kept open for warm opens: at most this many, and at most a quarter of the
#: open-file limit (the daemon raises its soft limit to the hard one at start).
MAX_CACHED_FDS = 4096

#: Xattrs the door computes rather than reads from the backing file.
XATTR_CACHE_DIR = "user.hsmfs.cache_dir"

#: File capabilities: the kernel reads them before every write to a file.
XATTR_CAPS = "security.capability"

#: The longest name a directory entry may have (ext4, and what statfs reports).
NAME_MAX = 255

#: Open flags that ask for write access (O_TRUNC alone on an O_RDONLY open too: it changes
#: the file).
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND


def _boundary(fn: F) -> F:
    """Let only FUSEError out of a handler; log anything else once and answer EIO."""

    @functools.wraps(fn)
    async def wrapper(self: Operations, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except FUSEError:
            raise
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise FUSEError(exc.errno) from None
            log.warning("%s%s: %s", fn.__name__, _brief(args), exc)
            raise FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected failure in %s%s", fn.__name__, _brief(args))
            raise FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def _brief(args: tuple[Any, ...]) -> str:
    """A handler's arguments for a log line: a write's data as its length, never its bytes."""
    return "(" + ", ".join(f"<{len(a)} bytes>" if isinstance(a, (bytes, bytearray, memoryview))
                           and len(a) > 64 else repr(a) for a in args[:3]) + ")"


@dataclass
class _Handle:
    fd: int  # read-only: shared with other handles (Operations._backing_fd); else private
    stub: Stub | None  # None: a local file hsmfs does not manage
    inode: int
    writable: bool = False  # fd is this handle's own O_RDWR fd, closed at release
    rw: int | None = None  # read-only handle of a superseded stub: an O_RDWR reopen to fill
    created: bool = False  # made by this handle's create(): it has no xattrs of its own


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, cache: StubCache, cfg: FuseConfig) -> None:
        super().__init__()
        self.cache = cache
        self.cfg = cfg
        self.root_fd = cache.root_fd
        self.root_ino = os.stat(".", dir_fd=self.root_fd).st_ino
        # inode -> path relative to the cache root ("" for the root); filled by lookup/readdir,
        # moved by rename (a directory's descendants with it), dropped by unlink/rmdir.
        self._paths: dict[int, str] = {pyfuse3.ROOT_INODE: ""}
        self._handles: dict[int, _Handle] = {}
        self._fds: OrderedDict[int, list[int]] = OrderedDict()  # inode -> [fd, open handles]
        self._wfds: dict[int, list[int]] = {}  # inode -> the O_RDWR fds of its write handles
        self._created: dict[int, int] = {}  # inode -> open handles of create() (see getxattr)
        #: inode -> the clean version the kernel's cached pages of it were read from
        #: (:meth:`_keep_cache`)
        self._page_versions: dict[int, RemoteVersion] = {}
        self._max_fds = min(MAX_CACHED_FDS,
                            resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4)
        self._dirs: dict[int, tuple[str, list[tuple[bytes, pyfuse3.EntryAttributes]]]] = {}
        self._next_fh = 1
        self.requests: dict[str, int] = {}
        #: ``-o lazy``: lists a directory from S3 before its first lookup or opendir
        #: (:mod:`hsmfs.lazy`); None: the tree is whole from the start.
        self.lazy: Any = None
        # A release must not punch under a handle of this mount (an mmap keeps one open), and
        # an fd of ours would defeat its write lease: the core asks first (release_check).
        cache.release_guards.append(self)

    # -- helpers -----------------------------------------------------------------------------

    def _count(self, op: str) -> None:
        self.requests[op] = self.requests.get(op, 0) + 1

    def _path(self, inode: int) -> str:
        try:
            return self._paths[inode]
        except KeyError:
            raise FUSEError(errno.ENOENT) from None

    def _rel(self, path: str) -> str:
        return path or "."

    def _inode_of(self, st: os.stat_result) -> int:
        return pyfuse3.ROOT_INODE if st.st_ino == self.root_ino else st.st_ino

    def _attrs(self, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = self._inode_of(st)
        a.generation = 0
        a.entry_timeout = self.cfg.attr_timeout_s
        a.attr_timeout = self.cfg.attr_timeout_s
        # -o uid/gid/umask change what the mount shows (and the kernel checks), never the
        # backing file: the kernel door and the tree keep the real owner and mode.
        a.st_mode = st.st_mode & ~self.cfg.umask
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid if self.cfg.uid is None else self.cfg.uid
        a.st_gid = st.st_gid if self.cfg.gid is None else self.cfg.gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = 1 << 20  # tells cp & co. to use 1 MiB buffers: fewer, larger requests
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def _stat(self, path: str) -> os.stat_result:
        return os.stat(self._rel(path), dir_fd=self.root_fd, follow_symlinks=False)

    def _stat_inode(self, inode: int) -> os.stat_result:
        """The inode's attributes by its path; ENOENT if the path now leads to another file
        (replaced behind the mount): never another file's attributes under this inode."""
        st = self._stat(self._path(inode))
        if self._inode_of(st) != inode:
            raise FileNotFoundError(errno.ENOENT, "replaced", self._paths.get(inode))
        return st

    def _open_fd(self, inode: int) -> int | None:
        """Any fd the door holds on the inode (it keeps the inode alive, even unlinked)."""
        entry = self._fds.get(inode)
        if entry is not None:
            return entry[0]
        wfds = self._wfds.get(inode)
        return wfds[0] if wfds else None

    def _hidden(self, parent_path: str, name: str) -> bool:
        return parent_path == "" and name == STATE_DIR

    def _child(self, parent_inode: int, name: bytes, *, creating: bool = False) -> str:
        """The path of ``name`` in ``parent_inode``; the state dir is never reachable (ENOENT
        to find it, EPERM to make or replace it) and a name has at most NAME_MAX bytes."""
        if len(name) > NAME_MAX:
            raise FUSEError(errno.ENAMETOOLONG)
        parent = self._path(parent_inode)
        sname = os.fsdecode(name)
        if self._hidden(parent, sname):
            raise FUSEError(errno.EPERM if creating else errno.ENOENT)
        return f"{parent}/{sname}" if parent else sname

    async def _listed(self, path: str) -> None:
        """``-o lazy``: the directory ``path`` is listed from S3 before anything in it is
        looked up or read; a listing that fails fails the request (never an empty dir)."""
        if self.lazy is None:
            return
        try:
            await self.lazy.ensure(path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise FUSEError(exc.errno) from None  # removed or replaced meanwhile
            raise FUSEError(to_errno(exc)) from None
        except HsmError as exc:
            raise FUSEError(to_errno(exc)) from None

    async def _listed_if_dir(self, path: str) -> None:
        if self.lazy is None:
            return
        try:
            st = await _io(self._stat, path)
        except OSError:
            return  # absent: the operation itself says so
        if stat.S_ISDIR(st.st_mode):
            await self._listed(path)

    def _writes_allowed(self) -> None:
        if self.cfg.read_only:
            raise FUSEError(errno.EROFS)

    def _proc_path(self, path: str) -> str:
        # Path-based calls (xattrs) reach the backing file through the private door's fd.
        return f"/proc/self/fd/{self.root_fd}/{path}" if path else f"/proc/self/fd/{self.root_fd}"

    # -- metadata ----------------------------------------------------------------------------

    @_boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None
                     ) -> pyfuse3.EntryAttributes:
        self._count("lookup")
        path = self._child(parent_inode, name)
        await self._listed(self._path(parent_inode))
        st = await _io(self._stat, path)
        self._paths[self._inode_of(st)] = path
        return self._attrs(st)

    @_boundary
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        self._count("getattr")
        fd = self._open_fd(inode)
        if fd is not None:
            # Inline: an open inode is in memory, and the answer is right even once the file
            # is unlinked or renamed behind the mount.
            return self._attrs(os.fstat(fd))
        return self._attrs(await _io(self._stat_inode, inode))

    @_boundary
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        self._count("readlink")
        target = await _io(functools.partial(os.readlink, self._path(inode),
                                             dir_fd=self.root_fd))
        return os.fsencode(target)

    @_boundary
    async def opendir(self, inode: int, ctx: Any) -> int:
        self._count("opendir")
        path = self._path(inode)
        await self._listed(path)
        entries = await _io(self._list_dir, path)
        fh = self._new_fh()
        self._dirs[fh] = (path, entries)
        return fh

    def _list_dir(self, path: str) -> list[tuple[bytes, pyfuse3.EntryAttributes]]:
        """Snapshot a directory with full attributes (readdirplus: a walk needs no lookups)."""
        fd = os.open(self._rel(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                     dir_fd=self.root_fd)
        out: list[tuple[bytes, pyfuse3.EntryAttributes]] = []
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    if self._hidden(path, entry.name):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    child = f"{path}/{entry.name}" if path else entry.name
                    self._paths[self._inode_of(st)] = child
                    out.append((os.fsencode(entry.name), self._attrs(st)))
        finally:
            os.close(fd)
        out.sort(key=lambda e: e[0])
        return out

    @_boundary
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        self._count("readdir")
        entries = self._dirs[fh][1] if fh in self._dirs else []
        for i in range(start_id, len(entries)):
            name, attrs = entries[i]
            if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                break

    @_boundary
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self._count("fsyncdir")
        if fh in self._dirs:
            await _io(self._fsync_path, self._dirs[fh][0])

    def _fsync_path(self, path: str) -> None:
        fd = os.open(self._rel(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                     dir_fd=self.root_fd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @_boundary
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        self._count("statfs")
        sv = await _io(os.statvfs, self.cache.cfg.cache_dir)
        d = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail"):
            setattr(d, attr, getattr(sv, attr))
        d.f_namemax = min(sv.f_namemax, NAME_MAX)
        return d

    @_boundary
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        # default_permissions is on: the kernel checks modes itself; only a ro mount refuses.
        return not (self.cfg.read_only and mode & os.W_OK)

    # -- xattrs: the state word and remote identity, for HSM-aware tools ---------------------

    def _stub_named(self, inode: int, path: str) -> Stub | None:
        """The core's stub at ``path`` if it is this inode (a file created over a stub's
        path, or a renamed stub, must never show another file's identity)."""
        stub = self.cache.stub_at(path)
        return stub if stub is not None and stub.ino == inode else None

    @_boundary
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        self._count("getxattr")
        sname = os.fsdecode(name)
        path = self._path(inode)
        if inode == pyfuse3.ROOT_INODE and sname == XATTR_CACHE_DIR:
            return os.fsencode(self.cache.cfg.cache_dir)
        if sname == XATTR_CAPS and self._created.get(inode):
            # The kernel asks before every write (to kill privileges).  A file this mount
            # created, still held open by its creator, has none (security.* cannot be set
            # through the mount): answered without a thread hop, 1 of ~6 per small file.
            raise FUSEError(errno.ENODATA)
        stub = self._stub_named(inode, path)
        if stub is not None:
            view = _identity_view(stub).get(sname)
            if view is not None:
                # The core's own answer, fresher than any xattr on the file; no I/O.
                return view.encode()
        try:
            return await _io(os.getxattr, self._proc_path(path), sname)
        except OSError as exc:
            raise FUSEError(errno.ENODATA if exc.errno == errno.ENODATA else exc.errno) from None

    @_boundary
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        self._count("listxattr")
        path = self._path(inode)
        names = [os.fsencode(n) for n in await _io(os.listxattr, self._proc_path(path))
                 if not n.startswith(PRIVATE_XATTRS)]
        stub = self._stub_named(inode, path)
        if stub is not None:
            names += [n.encode() for n in _identity_view(stub) if n.encode() not in names]
        if inode == pyfuse3.ROOT_INODE:
            names.append(XATTR_CACHE_DIR.encode())
        return names

    def _user_xattr(self, name: bytes, *, removing: bool = False) -> str:
        """Programs may set their own ``user.*`` xattrs; hsmfs's names and every other
        namespace are not theirs to write through the mount (the kernel's own removal of
        ``security.capability`` when a file is written is always honoured)."""
        self._writes_allowed()
        sname = os.fsdecode(name)
        if removing and sname == XATTR_CAPS:
            return sname
        if not sname.startswith("user."):
            raise FUSEError(errno.ENOTSUP)
        if sname.startswith(("user.hsm.", "user.hsmfs.")):
            raise FUSEError(errno.EPERM)
        return sname

    @_boundary
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        self._count("setxattr")
        sname = self._user_xattr(name)
        await _io(os.setxattr, self._proc_path(self._path(inode)), sname, value)

    @_boundary
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        self._count("removexattr")
        sname = self._user_xattr(name, removing=True)
        await _io(os.removexattr, self._proc_path(self._path(inode)), sname)

    # -- data --------------------------------------------------------------------------------

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    @_boundary
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        self._count("open")
        if flags & WRITE_FLAGS:
            return await self._open_write(inode, flags)
        path = self._path(inode)
        fd = await self._backing_fd(inode, path)
        fh = self._new_fh()
        h = self._handles[fh] = _Handle(fd, None, inode)
        try:
            # The core says which file this is (the unknown-inode rule, a truncate found by
            # size) and what an exec needs first.
            h.stub = await self.cache.lookup(fd)
            if h.stub is not None:
                # Eviction's recency: with keep_cache, reads of cached pages never reach
                # us, so an open is what says the file is in use.
                self.cache.touch(h.stub.ino, h.stub.gen)
            if h.stub is not None and flags & FMODE_EXEC:
                pin = await self._ensure(h, 0, h.stub.size, Intent.EXEC)
                pin.release()
        except Exception as exc:
            await self._close_handle(fh)
            raise FUSEError(_errno_for(exc, "open", path)) from None
        return pyfuse3.FileInfo(fh=fh, keep_cache=self._keep_cache(inode, h.stub))

    async def _open_write(self, inode: int, flags: int) -> pyfuse3.FileInfo:
        """A write handle: its own O_RDWR fd.  O_TRUNC of a stub is the core's local
        truncate (recorded dirty, durably, before the length changes; nothing fetched)."""
        self._writes_allowed()
        path = self._path(inode)
        fd = await _io(self._open_checked, path, inode, os.O_RDWR)
        fh = self._new_fh()
        self._handles[fh] = h = _Handle(fd, None, inode, writable=True)
        self._wfds.setdefault(inode, []).append(fd)
        try:
            h.stub = await self.cache.lookup(fd)
            if flags & os.O_TRUNC:
                await self._truncate(fd, h.stub, 0)
        except Exception as exc:
            await self._close_handle(fh)
            raise FUSEError(_errno_for(exc, "open", path)) from None
        return pyfuse3.FileInfo(fh=fh, keep_cache=self._keep_cache(inode, h.stub))

    def _keep_cache(self, inode: int, stub: Stub | None) -> bool:
        """Whether an open keeps the kernel's page cache of the inode: only for a clean copy
        of the same remote version its pages were read from.  A dirty file (or one with no
        record) may be written behind the mount, through the kernel door or by anything else
        writing the backing tree, with no word to this door; so its pages are dropped at
        each open (close-to-open, as NFS does), and so are a clean file's when its version
        is not the one they were read from (written behind the mount, then archived).
        Before, every open kept them, and reads through the mount returned the bytes from
        before a write through the kernel door (found by ``hsmfs stress``)."""
        version = stub.version if stub is not None and stub.sync == CLEAN else None
        keep = version is not None and self._page_versions.get(inode) == version
        if version is None:
            self._page_versions.pop(inode, None)
        else:
            self._page_versions[inode] = version
        return keep

    def _open_checked(self, path: str, inode: int, mode: int) -> int:
        """``path`` opened with ``mode``, if it still leads to ``inode`` (else ENOENT)."""
        fd = os.open(self._rel(path), mode | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.root_fd)
        try:
            if self._inode_of(os.fstat(fd)) != inode:
                raise FileNotFoundError(errno.ENOENT, "replaced", path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def _backing_fd(self, inode: int, path: str) -> int:
        """A read-only fd of the backing file, shared by every handle of the inode and kept
        after the last release (LRU), so a warm open costs no syscall and no thread hop.
        Sharing is safe: every read is positional."""
        entry = self._fds.get(inode)
        if entry is None:
            fd = await _io(self._open_checked, path, inode, os.O_RDONLY)
            entry = self._fds.get(inode)  # another open may have won the race meanwhile
            if entry is None:
                entry = self._fds[inode] = [fd, 0]
            else:
                os.close(fd)
        self._fds.move_to_end(inode)
        entry[1] += 1
        self._trim_fds()
        return entry[0]

    def _trim_fds(self) -> None:
        excess = len(self._fds) - self._max_fds
        if excess <= 0:
            return  # the common case: no scan at all
        idle = [i for i, (_, users) in self._fds.items() if users == 0]  # LRU first
        for inode in idle[:excess]:
            os.close(self._fds.pop(inode)[0])

    def _drop_idle_fd(self, inode: int) -> None:
        """The inode lost its name: an idle cached fd would only keep its blocks allocated."""
        entry = self._fds.get(inode)
        if entry is not None and entry[1] == 0:
            del self._fds[inode]
            os.close(entry[0])

    def release_check(self, stub: Stub) -> str | None:
        """The core's :class:`~hsmfs.cache.ReleaseGuard`: refuse while a handle of the inode is
        open (reads and mappings go through the kernel's page cache of this mount, which a
        punch of the backing file would not reach), else close the idle cached fd."""
        entry = self._fds.get(stub.ino)
        handles = (entry[1] if entry is not None else 0) + len(self._wfds.get(stub.ino, ()))
        if handles:
            return f"open through the FUSE mount ({handles} handle{'s' * (handles > 1)})"
        self._drop_idle_fd(stub.ino)
        return None

    async def released(self, stub: Stub) -> None:
        """Punched: drop the kernel's page cache of the inode (keep_cache) and its st_blocks.

        In the background, never awaited: the invalidation waits for the lock of every page
        of the inode, and a page the kernel is reading (its read-ahead, still in flight
        after the program closed the file) stays locked until we answer that READ, which
        may itself wait for the releasing task (under ``-o cache_size``, for the evictor
        that is running this release: measured, a deadlock).  Nothing depends on the pages
        being gone: they hold the very version the stub still names, so a read served from
        them is right; a refresh that changes the version invalidates on its own."""
        def invalidate() -> None:
            _invalidate(pyfuse3.invalidate_inode, stub.ino, False)

        nursery = self.cache.engine.nursery
        if nursery is None:
            await trio.to_thread.run_sync(invalidate)
        else:
            nursery.start_soon(trio.to_thread.run_sync, invalidate)

    async def _ensure(self, h: _Handle, start: int, stop: int, intent: Intent) -> Pin:
        """``cache.ensure`` for a handle.  A stub whose path no longer leads to it (renamed
        or unlinked through the mount) fills through the door's fd, which must be O_RDWR: a
        read handle gets an O_RDWR reopen of its own inode (``/proc/self/fd``)."""
        assert h.stub is not None
        fd = h.fd if h.writable or h.rw is None else h.rw
        try:
            return await self.cache.ensure(h.stub, start, stop, intent, fd=fd)
        except Superseded:
            if h.writable or h.rw is not None:
                raise
        h.rw = await _io(os.open, f"/proc/self/fd/{h.fd}", os.O_RDWR | os.O_CLOEXEC)
        return await self.cache.ensure(h.stub, start, stop, intent, fd=h.rw)

    @_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:
        self._count("read")
        h = self._handles[fh]
        if h.stub is None:
            return await self._pread(h.fd, size, off)
        try:
            pin = await self._ensure(h, off, off + size, Intent.READ)
        except Exception as exc:
            raise FUSEError(_errno_for(exc, "read", h.stub.path)) from None
        with pin:  # no release may punch these bytes before they are read
            return await self._pread(h.fd, size, off)

    async def _pread(self, fd: int, size: int, off: int) -> bytearray | memoryview | bytes:
        data = self._pread_nowait(fd, size, off)
        if data is None:
            data = await _io(os.pread, fd, size, off)
        self.cache.note_served(len(data))
        return data

    @staticmethod
    def _pread_nowait(fd: int, size: int, off: int) -> bytearray | memoryview | None:
        """A page-cache hit, inline; None when the read would block on the disk.

        The buffer read into is the reply: pyfuse3 takes any buffer (``PyObject_GetBuffer``),
        so a 1 MiB request costs one copy here, not three (``bytes(buf[:n])`` made two more).
        """
        buf = bytearray(size)
        try:
            n = os.preadv(fd, [buf], off, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return None
            raise
        if n < size and n < _remaining(fd, off):
            return None  # part of it was not cached; let a thread read it all
        return buf if n == size else memoryview(buf)[:n]

    @_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self._count("write")
        self._writes_allowed()
        h = self._handles[fh]
        if not h.writable:
            raise FUSEError(errno.EBADF)
        stub = h.stub
        if stub is None and self.cache.stub_for_ino(h.inode) is not None:
            # The core took the file on since the open (an upload gave it a record).
            stub = h.stub = await self.cache.lookup(h.fd)
        if stub is None or (stub.local and stub.sync in (DIRTY, CONFLICT)):
            n = await _io(_pwrite_all, h.fd, buf, off)
            if stub is not None and stub.sync not in (DIRTY, CONFLICT):
                # An archive recorded the file clean while these bytes were on their way
                # (it holds the core's per-file lock for that): they are a change again.
                await self.cache.mark_dirty(stub, fd=h.fd)
            return n
        try:
            # Every owed byte local, then dirty (fsync'd): only then may the new bytes land.
            pin = await self._ensure(h, 0, stub.size, Intent.WRITE)
        except Exception as exc:
            raise FUSEError(_errno_for(exc, "write", stub.path)) from None
        with pin:
            return await _io(_pwrite_all, h.fd, buf, off)

    async def _truncate(self, fd: int, stub: Stub | None, size: int) -> None:
        """Set the length of the file behind the O_RDWR ``fd``.  For a stub, the core's local
        truncate first: ``owed`` lowered and dirty recorded, fsync'd, before the length
        changes; nothing is fetched (a shrink throws the bytes away, a grow adds zeros past
        what S3 owes; holes still owed below the new end are fetched when read, or by the
        first write's ``Intent.WRITE``)."""
        if stub is not None:
            await self.cache.truncate(stub, size, fd=fd)
        await _io(os.ftruncate, fd, size)

    @_boundary
    async def flush(self, fh: int) -> None:
        self._count("flush")  # nothing buffered here: every write went to the backing file

    @_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        self._count("fsync")
        h = self._handles[fh]
        await _io(os.fdatasync if datasync else os.fsync, h.fd)

    @_boundary
    async def release(self, fh: int) -> None:
        await self._close_handle(fh)

    async def _close_handle(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is None:
            return
        if h.rw is not None:
            os.close(h.rw)  # never written through: nothing to flush
        if not h.writable:
            self._release_fd(h.inode)
            return
        wfds = self._wfds.get(h.inode, [])
        if h.fd in wfds:
            wfds.remove(h.fd)
        if not wfds:
            self._wfds.pop(h.inode, None)
        if h.created:
            self._created[h.inode] -= 1
            if not self._created[h.inode]:
                del self._created[h.inode]
        # A thread: closing a written file may start writeback (ext4 auto_da_alloc).
        await _io(os.close, h.fd)
        # Writeback's "closed and idle" clock (hsmfs.archive.Writeback) starts at the close of
        # the last writer; while another write handle is open, ``writing`` holds it back.
        if not wfds:
            stub = h.stub or self.cache.stub_for_ino(h.inode)
            if stub is not None and not stub.superseded:
                self.cache.note_closed(stub)
            elif h.inode in self._paths:
                self.cache.note_closed(self._rel(self._path(h.inode)))

    def writing(self, rel: str) -> bool:
        """Whether a write handle of this mount holds the file at ``rel`` open (writeback
        never uploads such a file: its writer is not done)."""
        return any(self._rel(self._path(ino)) == rel for ino in list(self._wfds)
                   if ino in self._paths)

    def _release_fd(self, inode: int) -> None:
        entry = self._fds.get(inode)
        if entry is not None:
            entry[1] -= 1
            self._trim_fds()

    # -- changes to the tree -----------------------------------------------------------------

    @_boundary
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any
                      ) -> pyfuse3.EntryAttributes:
        self._count("setattr")
        self._writes_allowed()
        h = self._handles.get(fh) if fh is not None else None
        if fields.update_size:
            if h is not None and h.writable:
                fd, own = h.fd, False
            else:
                fd, own = await _io(self._rw_fd, inode), True
            try:
                # The handle's stub, or the core's answer (it may have taken the file on since
                # the open: an upload gives a new file a record).
                stub = (h.stub if h is not None and h.writable and h.stub is not None
                        else await self.cache.lookup(fd))
                try:
                    await self._truncate(fd, stub, attr.st_size)
                except (HsmError, OSError) as exc:
                    raise FUSEError(_errno_for(exc, "truncate", self._paths.get(inode, "?"))
                                    ) from None
            finally:
                if own:
                    await _io(os.close, fd)
        fd = h.fd if h is not None else self._open_fd(inode)
        st = await _io(self._set_meta, inode, fd, attr, fields)
        return self._attrs(st)

    def _rw_fd(self, inode: int) -> int:
        """An O_RDWR fd of the inode: a reopen of an fd the door holds (right even once the
        file is unlinked or renamed), else by its path."""
        held = self._open_fd(inode)
        if held is not None:
            return os.open(f"/proc/self/fd/{held}", os.O_RDWR | os.O_CLOEXEC)
        return self._open_checked(self._path(inode), inode, os.O_RDWR)

    def _set_meta(self, inode: int, fd: int | None, attr: Any, fields: Any) -> os.stat_result:
        """Mode, owner and times, through an fd the door holds on the inode when there is one
        (right even if the file was unlinked), else by its path; the new attributes."""
        if fd is not None:
            st = os.fstat(fd)
            target: int | str = fd
            kw: dict[str, Any] = {}
        else:
            st = self._stat_inode(inode)
            target = self._rel(self._paths[inode])
            kw = {"dir_fd": self.root_fd, "follow_symlinks": False}
        if fields.update_uid or fields.update_gid:
            os.chown(target, attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1, **kw)
        if fields.update_mode and not stat.S_ISLNK(st.st_mode):
            mode = stat.S_IMODE(attr.st_mode)
            if fd is not None:
                os.chmod(fd, mode)
            else:  # not a symlink (checked): following it is following nothing
                os.chmod(target, mode, dir_fd=self.root_fd)
        if fields.update_atime or fields.update_mtime:
            ns = (attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                  attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns)
            os.utime(target, ns=ns, **kw)
        return os.fstat(fd) if fd is not None else self._stat_inode(inode)

    def _owner(self, path: str, ctx: Any) -> tuple[int, int, bool]:
        """(uid, gid, setgid dir) of a new entry in ``path``'s parent: the caller's, or the
        parent's group when the parent is set-group-ID (what a local filesystem does)."""
        parent = os.path.dirname(path)
        pst = self._stat(parent)
        sgid = bool(pst.st_mode & stat.S_ISGID)
        return ctx.uid, pst.st_gid if sgid else ctx.gid, sgid

    @_boundary
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """A new local file: no record, nothing owed (the archive uploads it as new)."""
        self._count("create")
        self._writes_allowed()
        path = self._child(parent_inode, name, creating=True)
        try:
            fd, st = await _io(self._create_file, path, mode, ctx)
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            # Made behind the mount since the kernel's lookup: open what is there.
            st = await _io(self._stat, path)
            inode = self._inode_of(st)
            self._paths[inode] = path
            return await self.open(inode, flags, ctx), self._attrs(st)
        inode = self._inode_of(st)
        self._paths[inode] = path
        fh = self._new_fh()
        self._handles[fh] = _Handle(fd, None, inode, writable=True, created=True)
        self._wfds.setdefault(inode, []).append(fd)
        self._created[inode] = self._created.get(inode, 0) + 1
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._attrs(st)

    def _create_file(self, path: str, mode: int, ctx: Any) -> tuple[int, os.stat_result]:
        uid, gid, _ = self._owner(path, ctx)
        perm = stat.S_IMODE(mode) & ~ctx.umask
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC,
                     perm, dir_fd=self.root_fd)
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, perm)  # the daemon's own umask must not narrow it
            return fd, os.fstat(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path, dir_fd=self.root_fd)
            raise

    @_boundary
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any
                    ) -> pyfuse3.EntryAttributes:
        self._count("mkdir")
        self._writes_allowed()
        path = self._child(parent_inode, name, creating=True)
        st = await _io(self._make_dir, path, mode, ctx)
        self._paths[self._inode_of(st)] = path
        return self._attrs(st)

    def _make_dir(self, path: str, mode: int, ctx: Any) -> os.stat_result:
        uid, gid, sgid = self._owner(path, ctx)
        perm = (stat.S_IMODE(mode) & ~ctx.umask) | (stat.S_ISGID if sgid else 0)
        os.mkdir(path, perm, dir_fd=self.root_fd)
        try:
            os.chown(path, uid, gid, dir_fd=self.root_fd, follow_symlinks=False)
            os.chmod(path, perm, dir_fd=self.root_fd)
            return self._stat(path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rmdir(path, dir_fd=self.root_fd)
            raise

    @_boundary
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any
                      ) -> pyfuse3.EntryAttributes:
        self._count("symlink")
        self._writes_allowed()
        path = self._child(parent_inode, name, creating=True)
        st = await _io(self._make_symlink, path, target, ctx)
        self._paths[self._inode_of(st)] = path
        return self._attrs(st)

    def _make_symlink(self, path: str, target: bytes, ctx: Any) -> os.stat_result:
        uid, gid, _ = self._owner(path, ctx)
        os.symlink(target, path, dir_fd=self.root_fd)
        os.chown(path, uid, gid, dir_fd=self.root_fd, follow_symlinks=False)
        return self._stat(path)

    @_boundary
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
                   ) -> pyfuse3.EntryAttributes:
        self._count("link")
        log.warning("hard link to %r refused (EPERM): S3 has no hard links",
                    self._paths.get(inode, f"inode {inode}"))
        raise FUSEError(errno.EPERM)

    @_boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._count("unlink")
        self._writes_allowed()
        path = self._child(parent_inode, name)
        st = await _io(self._remove, path, False)
        self._forget_path(self._inode_of(st), path)
        self.cache.unlinked(path, st.st_ino)  # the core's index follows

    @_boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._count("rmdir")
        self._writes_allowed()
        path = self._child(parent_inode, name)
        # -o lazy: a directory not listed yet may look empty here and hold objects in S3.
        await self._listed_if_dir(path)
        st = await _io(self._remove, path, True)
        self._forget_path(self._inode_of(st), path)
        if self.lazy is not None:
            self.lazy.forget(path)

    def _remove(self, path: str, is_dir: bool) -> os.stat_result:
        st = self._stat(path)
        if is_dir:
            os.rmdir(path, dir_fd=self.root_fd)
        else:
            os.unlink(path, dir_fd=self.root_fd)
        return st

    def _forget_path(self, inode: int, path: str) -> None:
        """``path`` no longer names ``inode``: requests by inode must not find the next file
        made at that path (a handle's fd still serves the inode: see :meth:`getattr`)."""
        if self._paths.get(inode) == path:
            del self._paths[inode]
        self._drop_idle_fd(inode)

    @_boundary
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        self._count("rename")
        self._writes_allowed()
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new, creating=True)
        # -o lazy: a directory moves with its children, so it is listed first (its mark, an
        # xattr, moves with it; the in-memory state is read again from it).
        await self._listed_if_dir(old)
        await self._listed_if_dir(new)
        src, dst = await _io(self._rename, old, new, flags)
        if self.lazy is not None:
            self.lazy.forget(old)
            self.lazy.forget(new)
        src_ino = self._inode_of(src)
        dst_ino = self._inode_of(dst) if dst is not None else None
        if src_ino == dst_ino:
            return  # two names of one file: rename(2) does nothing
        moves = {old: new}
        if flags & RENAME_EXCHANGE and dst is not None:
            moves[new] = old
            self._paths[dst_ino] = old  # type: ignore[index]
        elif dst_ino is not None:
            self._forget_path(dst_ino, new)
        self._paths[src_ino] = new
        if stat.S_ISDIR(src.st_mode) or (dst is not None and stat.S_ISDIR(dst.st_mode)):
            self._move_subtrees(moves)
        self.cache.moved(moves)  # the core's index follows (an exchange: both ways)

    def _rename(self, old: str, new: str, flags: int
                ) -> tuple[os.stat_result, os.stat_result | None]:
        src = self._stat(old)
        try:
            dst: os.stat_result | None = self._stat(new)
        except FileNotFoundError:
            dst = None
        if flags:
            _renameat2(self.root_fd, old, self.root_fd, new, flags)
        else:
            os.rename(old, new, src_dir_fd=self.root_fd, dst_dir_fd=self.root_fd)
        return src, dst

    def _move_subtrees(self, moves: dict[str, str]) -> None:
        """Directories moved: every known path below them follows (computed before any is
        changed, so an exchange of two directories swaps their subtrees)."""
        changes = {}
        for ino, path in self._paths.items():
            for old, new in moves.items():
                if path.startswith(old + "/"):
                    changes[ino] = new + path[len(old):]
                    break
        self._paths.update(changes)

    async def namespace_changed(self, changes: Iterable[Change]) -> None:
        """A refresh changed the backing tree behind the mount (``hsmfs sync``,
        ``-o refresh``): drop what the kernel caches of it despite the long entry and attribute
        timeouts, and make the inode map follow.  Called by the daemon once the refresh is
        done, never from a request handler: an invalidation waits for requests on the same
        entries, which a handler would be (a deadlock).  Returns once the kernel dropped them.

        * A name added, replaced or removed: the kernel's entry goes, so the next lookup finds
          what is there now.  A replaced or removed file's old inode no longer has that path
          here (requests by it answer ENOENT, never the new file's attributes) and its idle
          cached fd is closed.  Handles that hold the old inode keep it, served as a
          superseded stub; its cached pages stay: they are that version's bytes.
        * A file whose state changed in place (stale, conflict, kept): only its attributes
          (the record's xattrs moved its ctime), never its pages: its bytes did not change.
        """
        inode_of = {path: ino for ino, path in self._paths.items()}
        entries: list[tuple[int, bytes]] = []
        inodes: set[int] = set()
        for c in changes:
            if c.old_ino is not None and c.old_ino == c.new_ino:
                if c.old_ino in self._paths:
                    inodes.add(c.old_ino)
                continue
            if c.old_ino is not None:
                self._forget_path(c.old_ino, c.path)
            parent, name = posixpath.split(c.path)
            parent_ino = inode_of.get(parent)
            if parent_ino is not None:  # else the kernel never looked it up: nothing cached
                entries.append((parent_ino, os.fsencode(name)))
                inodes.add(parent_ino)  # its mtime and link count moved

        def invalidate() -> None:
            for parent_ino, name in entries:
                _invalidate(pyfuse3.invalidate_entry, parent_ino, name)
            for ino in inodes:
                _invalidate(pyfuse3.invalidate_inode, ino, True)

        if entries or inodes:
            await trio.to_thread.run_sync(invalidate)

    def stats(self) -> dict[str, object]:
        return {"fuse_requests": dict(self.requests), "open_files": len(self._handles)}


#: Local-disk syscalls in flight at once: enough to keep a disk queue busy, few enough that a
#: slow disk cannot pile up threads.
_DISK = trio.CapacityLimiter(16)


async def _io(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a syscall that may block on the disk in a worker thread, off the trio loop."""
    return await trio.to_thread.run_sync(fn, *args, limiter=_DISK)


def _invalidate(fn: Callable[..., Any], *args: Any) -> None:
    """One kernel invalidation; ENOENT means the kernel holds nothing of it (fine)."""
    try:
        fn(*args)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.info("%s%r: %s", fn.__name__, args, exc)


def _errno_for(exc: Exception, op: str, path: str) -> int:
    """The errno table's answer; a failure the core did not expect is logged here, once (the
    core already logged every fetch failure with its key, range and cause)."""
    if not isinstance(exc, (HsmError, OSError)):
        log.exception("unexpected failure in %s of %r", op, path)
    return to_errno(exc)


#: The core's record on the backing file: never listed (``trusted.*`` is root's anyway).
PRIVATE_XATTRS = "trusted.hsmfs."


def _identity_view(stub: Stub) -> dict[str, str]:
    """What HSM-aware tools read through the mount: the state word and the remote identity,
    computed from the core's state (the record itself is root-only, ``trusted.*``)."""
    view = {X_VIEW: stub.state, "user.hsm.key": stub.version.key,
            "user.hsm.etag": stub.version.etag, "user.hsm.remote_size": str(stub.version.size)}
    if stub.version.version_id:
        view["user.hsm.version"] = stub.version.version_id
    if stub.pinned:
        view["user.hsm.pinned"] = "1"  # hsmfs pin (the record's trusted.* is hidden here)
    if stub.error is not None:
        # The last failure, from memory: fresher than the backing xattr, which a full disk
        # or the write rate limit may have kept from being written.
        view[XATTR_ERROR] = stub.error
    return view


def _pwrite_all(fd: int, buf: bytes, off: int) -> int:
    """Write all of ``buf`` at ``off`` (a short write is retried; ENOSPC raises)."""
    view = memoryview(buf)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], off + done)
    return done


RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def _renameat2(olddirfd: int, old: str, newdirfd: int, new: str, flags: int) -> None:
    """renameat2(2) (RENAME_NOREPLACE, RENAME_EXCHANGE), which ``os.rename`` cannot pass."""
    r = _libc.renameat2(olddirfd, os.fsencode(old), newdirfd, os.fsencode(new),
                        ctypes.c_uint(flags))
    if r != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old)


def _remaining(fd: int, off: int) -> int:
    return max(os.fstat(fd).st_size - off, 0)


def mount_options(cfg: FuseConfig) -> set[str]:
    opts = set(pyfuse3.default_options)
    opts |= {f"fsname={cfg.fsname}", "subtype=hsmfs", "ro" if cfg.read_only else "rw"}
    if cfg.allow_other:
        opts.add("allow_other")
    return opts


def raise_read_ahead(mountpoint: str, kb: int) -> None:
    """Set the mount's bdi ``read_ahead_kb`` (root only) so FUSE sends 1 MiB requests.

    The device number comes from mountinfo, never from ``stat(mountpoint)``: that would be a
    GETATTR to this very daemon before its loop runs, a deadlock.
    """
    target = os.path.abspath(mountpoint)  # realpath() would lstat the mount: the same deadlock
    dev = fuse_device(target)
    if dev is None:
        log.warning("cannot find %s in mountinfo; read_ahead_kb unchanged", target)
        return
    path = f"/sys/class/bdi/{dev}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
    except OSError as exc:
        # Not root: 128 KiB requests, about 30-40 % slower first reads (FUSE_BASELINE §2).
        log.info("cannot raise %s to %d: %s", path, kb, exc)
