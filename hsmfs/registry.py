"""The backing tree's directory side: which stubs exist, where, and how a new one is made.

Owns the in-memory index of stubs (by path, by inode) and the tree mechanics the state machine
uses: making directories, scanning the tree for records, creating a stub in staging and
renaming it into place.  It decides no transition (that is :class:`hsmfs.cache.StubCache`).
All I/O goes through ``root_fd``, the daemon's private door; every call here blocks (the
façade runs them in worker threads).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import posixpath
import secrets
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from . import crashpoint
from .keys import STATE_DIR
from .state import Stub
from .stubfile import (
    RESIDENT,
    STUB,
    Record,
    VersionLike,
    generation,
    has_data,
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


class Changed(Exception):
    """An application changed or replaced a file between the tree scan and hsmfs's action on
    it: the action is not taken (the decision was made on what the scan saw)."""


class NewerFormat(Exception):
    """The cache was made by a newer hsmfs: this one must not misread it."""


@dataclass(frozen=True, slots=True)
class Found:
    """A regular file found in the tree with its record (None: a local file)."""

    rel: str
    ino: int
    gen: int
    size: int
    record: Record | None
    legacy: bool  # carries only the old forgeable record
    mtime: float = 0.0


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
        # Leftovers of a crash between create and rename: unreachable stubs with no data,
        # deleted.  Anything holding data (a file being put back when hsmfs died) is kept.
        sfd = os.open(STAGING_DIR, os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.root_fd)
        try:
            for name in os.listdir(sfd):
                with contextlib.suppress(FileNotFoundError):
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sfd)
                    try:
                        holds = has_data(fd, max(os.fstat(fd).st_size, 1))
                    finally:
                        os.close(fd)
                    if holds:
                        log.warning("%s/%s holds data: kept for you to look at", STAGING_DIR,
                                    name)
                    else:
                        os.unlink(name, dir_fd=sfd)
        finally:
            os.close(sfd)
        try:
            fd = os.open(FORMAT_FILE, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.root_fd)
        except FileNotFoundError:
            pass
        else:
            try:
                found = os.read(fd, 64).decode(errors="replace").strip()
            finally:
                os.close(fd)
            if not found.isdigit() or int(found) > int(FORMAT):
                raise NewerFormat(f"the cache is in format {found!r}, this hsmfs knows "
                                  f"format {FORMAT} and older: use a newer hsmfs")
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

    def open_rw(self, rel: str) -> int:
        return os.open(rel, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.root_fd)

    def open_checked(self, rel: str, ino: int, gen: int) -> int:
        """``rel`` opened O_RDWR, if it is still the file the scan saw; else :class:`Changed`."""
        fd = self.open_rw(rel)
        try:
            st = os.fstat(fd)
            if (st.st_ino, generation(fd)) != (ino, gen):
                raise Changed(f"{rel!r} is another file than the one scanned")
        except BaseException:
            os.close(fd)
            raise
        return fd

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
                                record is None and legacy_identity(fd), st.st_mtime)
                except OSError as exc:
                    log.warning("cannot read the record of %r: %s; treated as a local file",
                                rel, exc)
                finally:
                    os.close(fd)

    def create_stub(self, rel: str, version: VersionLike, mode: int | None,
                    guard: Callable[[int], None], *,
                    replace: tuple[int, int] | None = None,
                    any_data: bool = False) -> tuple[int, int]:
        """Create a stub of ``version`` at ``rel``; return its (inode, generation).

        Made in staging and guarded there (``guard(fd)``: the kernel door's mark) before it
        becomes reachable, so no opener can ever hold an unguarded fd of it.  The record is
        complete before then: a crash leaves either no stub (the staging leftover is deleted at
        the next start) or a complete one.

        ``replace``: the (inode, generation) of the file the caller found at ``rel`` and
        decided holds nothing local.  The two are *exchanged* (``RENAME_EXCHANGE``), so the
        old file lands in staging, where it is checked again: if it is not that file any more,
        or holds data now (an application wrote between the scan and here), the exchange is
        undone and :class:`Changed` raised.  Without ``replace`` an existing file is never
        touched: link + unlink fails with EEXIST instead.  ``any_data``: the caller decided
        the old file's bytes may go (``hsmfs resolve --take-remote``): only its identity is
        checked.
        """
        tmp = f"{STAGING_DIR}/{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600,
                     dir_fd=self.root_fd)
        try:
            os.ftruncate(fd, version.size)
            write_identity(fd, version)
            write_view(fd, RESIDENT if version.size == 0 else STUB)  # nothing to fetch
            # Permission bits only: metadata never makes a setuid, setgid or sticky file.
            os.fchmod(fd, stat.S_IMODE(mode) & 0o777 if mode is not None else self.file_mode)
            os.utime(fd, (version.mtime, version.mtime))
            guard(fd)
            crashpoint.crash_point(crashpoint.POPULATE, "staged")  # tests only: marked, unlinked
            if replace is not None:
                self._exchange(tmp, rel)
                crashpoint.crash_point(crashpoint.REFRESH, "exchanged")  # tests only
                try:
                    retired = self._retire(tmp, replace, any_data)
                except BaseException:
                    self._exchange(tmp, rel)  # unsure: the old file goes back where it was
                    raise
                if not retired:
                    self._exchange(tmp, rel)  # the application's file goes back
                    raise Changed(f"{rel!r} changed between the scan and its replacement")
            else:
                # link + unlink: fails with EEXIST rather than replace a file that appeared
                # since the caller looked (an application creating the same name).
                os.link(tmp, rel, src_dir_fd=self.root_fd, dst_dir_fd=self.root_fd)
                os.unlink(tmp, dir_fd=self.root_fd)
            st = os.fstat(fd)
            return st.st_ino, generation(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_ino == os.stat(tmp, dir_fd=self.root_fd).st_ino:
                    os.unlink(tmp, dir_fd=self.root_fd)  # our unfinished stub, nothing else
            raise
        finally:
            os.close(fd)

    def _exchange(self, a: str, b: str) -> None:
        if _libc.renameat2(self.root_fd, os.fsencode(a), self.root_fd, os.fsencode(b),
                           _RENAME_EXCHANGE) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"renameat2(RENAME_EXCHANGE): {os.strerror(err)}", b)

    def _retire(self, tmp: str, expected: tuple[int, int], any_data: bool = False) -> bool:
        """The old file sits at ``tmp`` (staging): remove it if it is still the file the scan
        saw and holds no data (or ``any_data``) (True); else leave it there for the caller to
        put back."""
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.root_fd)
        try:
            st = os.fstat(fd)
            same = (st.st_ino, generation(fd)) == expected and (any_data or not has_data(
                fd, max(st.st_size, 1)))
        finally:
            os.close(fd)
        if same:
            os.unlink(tmp, dir_fd=self.root_fd)
        return same

    def unlink(self, rel: str, ino: int, gen: int, any_data: bool = False) -> bool:
        """Remove ``rel`` if it is still the file the scan saw, holding no data; True if it
        was removed.  Moved into staging first and checked there, so an application's new
        file or fresh bytes at that name are never the ones removed; put back otherwise
        (never over a file that appeared at ``rel`` meanwhile) and :class:`Changed` raised."""
        tmp = f"{STAGING_DIR}/{secrets.token_hex(8)}"
        try:
            os.rename(rel, tmp, src_dir_fd=self.root_fd, dst_dir_fd=self.root_fd)
        except FileNotFoundError:
            return False
        try:
            retired = self._retire(tmp, (ino, gen), any_data)
        except BaseException:
            self._put_back(tmp, rel)
            raise
        if not retired:
            self._put_back(tmp, rel)
            raise Changed(f"{rel!r} changed between the scan and its removal")
        return True

    def _put_back(self, tmp: str, rel: str) -> None:
        if _libc.renameat2(self.root_fd, os.fsencode(tmp), self.root_fd, os.fsencode(rel),
                           _RENAME_NOREPLACE) < 0:
            err = ctypes.get_errno()
            log.error("cannot put %r back (%s): it is kept at %s/%s until the next start "
                      "removes staging leftovers", rel, os.strerror(err), STAGING_DIR, tmp)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
