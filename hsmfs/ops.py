"""The FUSE door: pyfuse3 operations over the backing tree.

A translation, nothing more: a FUSE request in, :meth:`StubCache.ensure` for the bytes it
touches, the backing file's bytes or an errno out.  What is resident, when to fetch and which
errno belong to the core (``cache.py``, ``errors.to_errno``).

Choices (measured in FUSE_BASELINE.md):

* FUSE inode numbers are the backing files' own ``st_ino`` (the cache root maps to
  ``ROOT_INODE``), so both doors name a file the same way and no table must survive a restart.
* ``keep_cache=True``: a re-read of a resident file is served by the kernel page cache and never
  reaches Python.  Requests are 1 MiB (the mount's ``read_ahead_kb`` is raised right after
  mounting), and entry/attribute timeouts are long (never 0).
* Nothing blocks the trio loop: every syscall that may touch the disk (stat, open, readdir,
  xattrs, pread) runs in a worker thread.  Reads first try ``preadv(RWF_NOWAIT)`` inline, which
  never blocks by definition — a page-cache hit costs no thread hop — and go to a thread only
  when the data is not cached.  ``close`` of a read-only local fd stays inline: it does no I/O.
* The door is read-only in this release: the mount is ``ro`` and write opens get ``EROFS``.
* Only ``FUSEError`` may leave a handler (pyfuse3's contract); :func:`_boundary` turns anything
  else into ``EIO`` with one log line, so a bug fails one request instead of the mount.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import resource
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

from .cache import Intent, Stub, StubCache
from .config import FuseConfig
from .errors import HsmError, to_errno
from .keys import STATE_DIR
from .mounts import fuse_device
from .mounts import mountinfo as mountinfo  # re-exported: hsmfs.bench.passfs reads it here
from .stubfile import X_VIEW

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
            log.warning("%s%r: %s", fn.__name__, args[:3], exc)
            raise FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected failure in %s%r", fn.__name__, args[:3])
            raise FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


@dataclass
class _Handle:
    fd: int  # shared with other handles of the inode: see Operations._backing_fd
    stub: Stub | None  # None: a local file hsmfs does not manage
    inode: int


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
        # inode -> path relative to the cache root ("" for the root); filled by lookup/readdir.
        self._paths: dict[int, str] = {pyfuse3.ROOT_INODE: ""}
        self._handles: dict[int, _Handle] = {}
        self._fds: OrderedDict[int, list[int]] = OrderedDict()  # inode -> [fd, open handles]
        self._max_fds = min(MAX_CACHED_FDS,
                            resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4)
        self._dirs: dict[int, list[tuple[bytes, pyfuse3.EntryAttributes]]] = {}
        self._next_fh = 1
        self.requests: dict[str, int] = {}

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
        a.st_mode = st.st_mode
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
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

    def _hidden(self, parent_path: str, name: str) -> bool:
        return parent_path == "" and name == STATE_DIR

    def _proc_path(self, path: str) -> str:
        # Path-based calls (xattrs) reach the backing file through the private door's fd.
        return f"/proc/self/fd/{self.root_fd}/{path}" if path else f"/proc/self/fd/{self.root_fd}"

    # -- metadata ----------------------------------------------------------------------------

    @_boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None
                     ) -> pyfuse3.EntryAttributes:
        self._count("lookup")
        parent = self._path(parent_inode)
        sname = os.fsdecode(name)
        if self._hidden(parent, sname):
            raise FUSEError(errno.ENOENT)
        path = f"{parent}/{sname}" if parent else sname
        st = await _io(self._stat, path)
        self._paths[self._inode_of(st)] = path
        return self._attrs(st)

    @_boundary
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        self._count("getattr")
        return self._attrs(await _io(self._stat, self._path(inode)))

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
        entries = await _io(self._list_dir, path)
        fh = self._new_fh()
        self._dirs[fh] = entries
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
        entries = self._dirs.get(fh, [])
        for i in range(start_id, len(entries)):
            name, attrs = entries[i]
            if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                break

    @_boundary
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_boundary
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        self._count("statfs")
        sv = await _io(os.statvfs, self.cache.cfg.cache_dir)
        d = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(d, attr, getattr(sv, attr))
        return d

    @_boundary
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        # default_permissions is on: the kernel checks modes itself; only refuse writes.
        return not (mode & os.W_OK)

    # -- xattrs: the state word and remote identity, for HSM-aware tools ---------------------

    @_boundary
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        self._count("getxattr")
        sname = os.fsdecode(name)
        path = self._path(inode)
        if inode == pyfuse3.ROOT_INODE and sname == XATTR_CACHE_DIR:
            return os.fsencode(self.cache.cfg.cache_dir)
        stub = self.cache.stub_at(path)
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
        stub = self.cache.stub_at(path)
        if stub is not None:
            names += [n.encode() for n in _identity_view(stub) if n.encode() not in names]
        if inode == pyfuse3.ROOT_INODE:
            names.append(XATTR_CACHE_DIR.encode())
        return names

    # -- data --------------------------------------------------------------------------------

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    @_boundary
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        self._count("open")
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise FUSEError(errno.EROFS)
        path = self._path(inode)
        fd = await self._backing_fd(inode, path)
        try:
            # The core says which file this is (the unknown-inode rule, a truncate found by
            # size) and what an exec needs first.
            stub = await self.cache.lookup(fd)
            if stub is not None and flags & FMODE_EXEC:
                pin = await self.cache.ensure(stub, 0, stub.size, Intent.EXEC, fd=fd)
                pin.release()
        except Exception as exc:
            self._release_fd(inode)
            raise FUSEError(_errno_for(exc, "open", path)) from None
        fh = self._new_fh()
        self._handles[fh] = _Handle(fd, stub, inode)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def _backing_fd(self, inode: int, path: str) -> int:
        """A read-only fd of the backing file, shared by every handle of the inode and kept
        after the last release (LRU), so a warm open costs no syscall and no thread hop.
        Sharing is safe: every read is positional."""
        entry = self._fds.get(inode)
        if entry is None:
            fd = await _io(functools.partial(os.open, path,
                                             os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                             dir_fd=self.root_fd))
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

    @_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:
        self._count("read")
        h = self._handles[fh]
        if h.stub is None:
            return await self._pread(h.fd, size, off)
        try:
            pin = await self.cache.ensure(h.stub, off, off + size, Intent.READ, fd=h.fd)
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
    async def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is not None:
            self._release_fd(h.inode)

    def _release_fd(self, inode: int) -> None:
        entry = self._fds.get(inode)
        if entry is not None:
            entry[1] -= 1
            self._trim_fds()

    # -- writes are refused in this release ---------------------------------------------------

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        raise FUSEError(errno.EROFS)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
                     ) -> Any:
        raise FUSEError(errno.EROFS)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        raise FUSEError(errno.EROFS)

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        raise FUSEError(errno.EROFS)

    def stats(self) -> dict[str, object]:
        return {"fuse_requests": dict(self.requests), "open_files": len(self._handles)}


#: Local-disk syscalls in flight at once: enough to keep a disk queue busy, few enough that a
#: slow disk cannot pile up threads.
_DISK = trio.CapacityLimiter(16)


async def _io(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a syscall that may block on the disk in a worker thread, off the trio loop."""
    return await trio.to_thread.run_sync(fn, *args, limiter=_DISK)


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
    return view


def _remaining(fd: int, off: int) -> int:
    return max(os.fstat(fd).st_size - off, 0)


def mount_options(cfg: FuseConfig) -> set[str]:
    opts = set(pyfuse3.default_options)
    opts |= {f"fsname={cfg.fsname}", "subtype=hsmfs", "ro"}
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
