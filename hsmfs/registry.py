"""The backing tree's directory side: which stubs exist, where, and how a new one is made.

Owns the in-memory index of stubs (by path, by inode) and the tree mechanics the state machine
uses: making directories, scanning the tree for records, creating a stub in staging and
renaming it into place.  It decides no transition (that is :class:`hsmfs.cache.StubCache`).
All I/O goes through ``root_fd``, the daemon's private door; every call here blocks (the
façade runs them in worker threads).
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import secrets
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .keys import STATE_DIR
from .state import Stub
from .stubfile import (
    RESIDENT,
    STUB,
    Record,
    VersionLike,
    generation,
    legacy_identity,
    read_record,
    write_identity,
    write_view,
)

log = logging.getLogger(__name__)

STAGING_DIR = f"{STATE_DIR}/staging"
#: The cache's format, so an older or newer hsmfs recognises a tree it must not misread.
FORMAT_FILE = f"{STATE_DIR}/format"
FORMAT = "2"  # 2: trusted.* record, residency from extents only (1: user.* words)


@dataclass(frozen=True)
class Found:
    """A regular file found in the tree with its record (None: a local file)."""

    rel: str
    ino: int
    gen: int
    size: int
    record: Record | None
    legacy: bool  # carries only the old forgeable record


class Registry:
    """Stubs by path and by inode.  ``by_ino`` also holds superseded stubs while a program
    may still use them; ``by_path`` only stubs their path leads to."""

    def __init__(self) -> None:
        self.by_path: dict[str, Stub] = {}
        self.by_ino: dict[int, Stub] = {}
        self._dir_index: dict[str, list[Stub]] | None = None

    def add(self, stub: Stub) -> None:
        old = self.by_path.get(stub.path)
        if old is not None and old is not stub and self.by_ino.get(old.ino) is old:
            del self.by_ino[old.ino]
        self.by_path[stub.path] = stub
        self.by_ino[stub.ino] = stub
        self._dir_index = None

    def unlink_path(self, stub: Stub) -> None:
        """The stub's path no longer leads to it (it keeps its inode entry)."""
        if self.by_path.get(stub.path) is stub:
            del self.by_path[stub.path]
            self._dir_index = None

    def forget(self, stub: Stub) -> None:
        self.unlink_path(stub)
        if self.by_ino.get(stub.ino) is stub:
            del self.by_ino[stub.ino]

    def stubs_in(self, directory: str) -> list[Stub]:
        """The stubs directly in ``directory`` (relative, '' = the root)."""
        if self._dir_index is None:
            index: dict[str, list[Stub]] = {}
            for stub in list(self.by_path.values()):
                index.setdefault(posixpath.dirname(stub.path), []).append(stub)
            self._dir_index = index
        return self._dir_index.get(directory, [])


class Tree:
    """Blocking mechanics of the backing tree through the private door ``root_fd``."""

    def __init__(self, root_fd: int, dir_mode: int, file_mode: int) -> None:
        self.root_fd = root_fd
        self.dir_mode = dir_mode
        self.file_mode = file_mode

    def prepare(self) -> None:
        """The state directories exist; staging is empty; the format is recorded."""
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
        fd = os.open(FORMAT_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600,
                     dir_fd=self.root_fd)
        try:
            os.write(fd, f"{FORMAT}\n".encode())
        finally:
            os.close(fd)

    def mkdir(self, rel: str) -> None:
        if not self.parents_are_dirs(rel):
            # Never create a directory through a symlinked parent (see populate).
            log.warning("cannot create directory %r: a parent is not a directory", rel)
            return
        try:
            os.mkdir(rel, self.dir_mode, dir_fd=self.root_fd)
            # mkdir's mode is filtered by the daemon's umask; dir_mode is what the
            # user asked for (stubs get file modes with fchmod, umask-free, likewise).
            os.chmod(rel, self.dir_mode, dir_fd=self.root_fd)
        except FileExistsError:
            st = os.stat(rel, dir_fd=self.root_fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                # A local file stands where S3 has a directory; local data is never clobbered.
                # The objects below it fail one by one with a clear line each.
                log.warning("a local file %r blocks the directory of S3 objects below it", rel)
        except OSError as exc:
            log.warning("cannot create directory %r: %s", rel, exc)

    def parents_are_dirs(self, rel: str) -> bool:
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

    def exists(self, rel: str) -> bool:
        try:
            os.stat(rel, dir_fd=self.root_fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    def open_rw(self, rel: str) -> int:
        return os.open(rel, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.root_fd)

    def scan(self) -> Iterator[Found]:
        """Every regular file of the tree (outside the state directory) with its record."""
        for dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=self.root_fd):
            if dirpath == ".":
                with contextlib.suppress(ValueError):
                    dirnames.remove(STATE_DIR)
            for name in filenames:
                rel = os.path.normpath(os.path.join(dirpath, name))
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                                 dir_fd=dirfd)
                except OSError:
                    continue  # a fifo, a socket, a symlink: never a stub
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    record = read_record(fd)
                    yield Found(rel, st.st_ino, generation(fd), st.st_size, record,
                                record is None and legacy_identity(fd))
                except OSError as exc:
                    log.warning("cannot read the record of %r: %s; treated as a local file",
                                rel, exc)
                finally:
                    os.close(fd)

    def create_stub(self, rel: str, version: VersionLike, mode: int | None,
                    guard: Callable[[int], None], *, replace: bool) -> tuple[int, int]:
        """Create a stub of ``version`` at ``rel``; return its (inode, generation).

        Made in staging and guarded there (``guard(fd)``: the kernel door's mark) before the
        rename makes it reachable, so no opener can ever hold an unguarded fd of it.  The
        record is complete before the rename: a crash leaves either no stub (the staging
        leftover is deleted at the next start) or a complete one.  ``replace``: the rename may
        replace the file at ``rel`` (the caller decided it holds nothing local); otherwise an
        existing file is never touched.
        """
        tmp = f"{STAGING_DIR}/{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600,
                     dir_fd=self.root_fd)
        try:
            os.ftruncate(fd, version.size)
            write_identity(fd, version)
            write_view(fd, RESIDENT if version.size == 0 else STUB)  # nothing to fetch
            os.fchmod(fd, stat.S_IMODE(mode) if mode is not None else self.file_mode)
            os.utime(fd, (version.mtime, version.mtime))
            guard(fd)
            if replace:
                os.rename(tmp, rel, src_dir_fd=self.root_fd, dst_dir_fd=self.root_fd)
            else:
                # link + unlink: fails with EEXIST rather than replace a file that appeared
                # since the caller looked (an application creating the same name).
                os.link(tmp, rel, src_dir_fd=self.root_fd, dst_dir_fd=self.root_fd)
                os.unlink(tmp, dir_fd=self.root_fd)
            st = os.fstat(fd)
            return st.st_ino, generation(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.root_fd)
            raise
        finally:
            os.close(fd)

    def unlink(self, rel: str, ino: int) -> bool:
        """Remove ``rel`` if it is still inode ``ino``; True if it was removed."""
        try:
            st = os.stat(rel, dir_fd=self.root_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if st.st_ino != ino:
            return False
        os.unlink(rel, dir_fd=self.root_fd)
        return True

