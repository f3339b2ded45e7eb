"""The floor of any pyfuse3 door: a bare read-only passthrough of a local tree.

Owns: nothing of hsmfs.  No cache, no S3, no states, no threads: every handler does its syscall
inline, with FUSE_BASELINE.md's best practical settings (keep_cache, 1 MiB requests through the
mount's read_ahead_kb, long entry/attribute timeouts, readdirplus).  The benchmark mounts it over
the native data set as the `pyfuse3` door, so a FUSE-door row can be read against what pyfuse3
and this libfuse reach at all on the same machine, in the same run: the part of a warm FUSE-door
miss that belongs to hsmfs is the part between these two rows.

    python3 -m hsmfs.bench.passfs SOURCE MOUNTPOINT     (runs until unmounted; SIGTERM unmounts)
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from typing import Any

import pyfuse3
import trio
from pyfuse3 import FUSEError

from ..ops import mountinfo, raise_read_ahead

TIMEOUT_S = 300.0  # entry/attribute timeouts: the tree never changes under the benchmark
READ_AHEAD_KB = 1024  # 1 MiB requests, as the FUSE door asks for


class PassFs(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, source: str) -> None:
        super().__init__()
        self.root_fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.root_ino = os.fstat(self.root_fd).st_ino
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: "."}
        self.dirs: dict[int, list[tuple[bytes, pyfuse3.EntryAttributes]]] = {}
        self.fds: dict[int, int] = {}
        self.next_fh = 1

    def _attrs(self, st: os.stat_result, path: str) -> pyfuse3.EntryAttributes:
        ino = pyfuse3.ROOT_INODE if st.st_ino == self.root_ino else st.st_ino
        self.paths[ino] = path
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = a.attr_timeout = TIMEOUT_S
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                     "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(a, name, getattr(st, name))
        a.st_blksize = 1 << 20
        return a

    def _path(self, inode: int) -> str:
        try:
            return self.paths[inode]
        except KeyError:
            raise FUSEError(errno.ENOENT) from None

    def _stat(self, path: str) -> pyfuse3.EntryAttributes:
        try:
            st = os.stat(path, dir_fd=self.root_fd, follow_symlinks=False)
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None
        return self._attrs(st, path)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None
                     ) -> pyfuse3.EntryAttributes:
        return self._stat(os.path.join(self._path(parent_inode), os.fsdecode(name)))

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._stat(self._path(inode))

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return os.fsencode(os.readlink(self._path(inode), dir_fd=self.root_fd))

    async def opendir(self, inode: int, ctx: Any) -> int:
        path = self._path(inode)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.root_fd)
        with os.scandir(fd) as it:
            entries = sorted(
                (os.fsencode(e.name),
                 self._attrs(e.stat(follow_symlinks=False), os.path.join(path, e.name)))
                for e in it
            )
        os.close(fd)
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        self.dirs[fh] = entries
        return fh

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = self.dirs.get(fh, [])
        for i in range(start_id, len(entries)):
            if not pyfuse3.readdir_reply(token, *entries[i], i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise FUSEError(errno.EROFS)
        fd = os.open(self._path(inode), os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.root_fd)
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        self.fds[fh] = fd
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.fds[fh], size, off)

    async def release(self, fh: int) -> None:
        os.close(self.fds.pop(fh))

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self.root_fd)
        d = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(d, attr, getattr(sv, attr))
        return d


async def _serve(mountpoint: str) -> None:
    async with trio.open_nursery() as nursery:
        async def fuse_main() -> None:
            await pyfuse3.main()  # returns once unmounted or terminated
            nursery.cancel_scope.cancel()

        nursery.start_soon(fuse_main)
        nursery.start_soon(_terminate_on_signal)
        # The mount's read-ahead is settable once INIT is done, i.e. once a request is answered.
        await trio.to_thread.run_sync(os.stat, mountpoint)
        raise_read_ahead(mountpoint, READ_AHEAD_KB)
        print("serving", flush=True)


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    source, mountpoint = (os.path.abspath(a) for a in argv)
    opts = set(pyfuse3.default_options) | {"fsname=passfs", "ro"}
    pyfuse3.init(PassFs(source), mountpoint, opts)
    try:
        trio.run(_serve, mountpoint)
    finally:
        mounted = any(f[4] == mountpoint for f in mountinfo())
        pyfuse3.close(unmount=mounted)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
