"""The cover: what the cache dir shows while no hsmfs process guards it.

Why (measured in ``scripts/probe_unguarded.py``, written up in docs/unguarded.md): when the
fanotify pre-content group closes (``hsmfs stop``, or the holder H dying), the kernel forgets
every mark. From then on every unfetched byte of every stub reads as zeros, with no event.
Nothing at the mount level can make an fd that is already open fail. New opens *by path* can
be stopped, though. Before the group closes, hsmfs mounts a **cover** over the cache dir: an
empty, read-only tmpfs that holds one explanatory file. Every open through that path then fails
with ENOENT (a create with EROFS) instead of reading zeros.

What the cover reaches (Linux 6.18):

* The cache path, and mount namespaces made after the cover: ENOENT.
* Bind mounts and mount namespaces made *before* the cover only get it through mount
  propagation. Shared peers and slaves get ENOENT. Private copies (docker's default ``-v``
  is rprivate) still read zeros.
* Fds held across the stop, and a cwd or dir fd inside the tree: still zeros. The cover keeps
  new fds from being opened in that gap. That matters twice over: an fd opened while no group
  exists is never guarded again, not even after the next start, while one opened under the old
  group is guarded again once the next group marks it.
* The cover is a mount in the caller's namespace and belongs to no process. It stays until
  :func:`uncover`, also after SIGKILL of everything. No kernel mechanism ties a mount visible
  at a path to a process's life, except FUSE, which would put a daemon in the data path.

API (all need CAP_SYS_ADMIN in the caller's mount namespace):

``cover(cache_dir) -> bool``
    Attach a cover, atomically: it is built detached (fsopen/fsmount), filled, made
    read-only, then attached with one move_mount. Returns False if the top mount at
    ``cache_dir`` is already an hsmfs cover. ~0.3 ms; ``uncover`` and ``is_covered`` ~0.4 ms.
``uncover(cache_dir) -> bool``
    Remove hsmfs's covers from the top of ``cache_dir``. Returns False when there was none.
    It never removes a mount it did not make: it stops at the first mount that is not
    recognisably a cover (see below), and it unmounts through an fd of exactly the mount it
    checked (``umount2("/proc/self/fd/N", MNT_DETACH)``).
``is_covered(cache_dir) -> bool``
    True if the top mount at ``cache_dir`` is an hsmfs cover.
``open_beneath(cache_dir) -> int``
    A detached ``open_tree`` clone of the tree at ``cache_dir`` as it lies *beneath* the cover,
    or of ``cache_dir`` itself when it is not covered. It is the same kind of fd as
    ``fanotify.open_private_tree`` (an O_PATH fd of a clone that no path reaches), so it can be
    the daemon's private door while the cover still keeps everyone else out during start-up.
    A helper process makes it: the helper unshares its mount namespace, makes it private,
    detaches the cover there only, clones, and passes the fd back (SCM_RIGHTS). ~75 ms (one
    Python start; 140 ms under load). Without a cover it is a plain ``open_tree``.
``is_mount_beneath(cache_dir) -> bool``
    ``os.path.ismount`` of what lies beneath the cover. A cover is itself a mount, so
    ``os.path.ismount`` is always True while one is up.

A cover is recognised by all of these:

* the top mount at the canonical path is a mount root, of type tmpfs (``fstatfs``);
* its ``/proc/self/mountinfo`` line (matched by ``statx`` mount id) says fstype ``tmpfs``, source
  ``hsmfs-cover``, mount point = the canonical cache dir;
* its root holds ``.hsmfs-cover``, whose first line is ``hsmfs-cover v1`` and which names the
  covered path (``covered: PATH``).

Command line (for admins, and for a service manager's post-stop hook such as systemd's
``ExecStopPost=``, which runs even after SIGKILL)::

    python3 -m hsmfs.cover cover|uncover|status DIR

This module imports only the standard library: H imports it, and H runs without trio or boto3.
The syscall numbers are those of x86_64 and of every architecture that uses the generic table
(the mount API was numbered alike everywhere except alpha).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import errno
import os
import socket
import stat
import struct
import subprocess
import sys
import time

# Absolute: this file also runs as a script (open_beneath's helper, a service manager's
# hook); hsmfs.mounts needs only the standard library.
from hsmfs.mounts import mountinfo

__all__ = [
    "COVER_SOURCE",
    "MARKER",
    "cover",
    "is_covered",
    "is_mount_beneath",
    "main",
    "open_beneath",
    "uncover",
]

#: The tmpfs "source" of every cover, shown by mountinfo, findmnt and ``mount``.
COVER_SOURCE = "hsmfs-cover"
#: The one file in a cover: what it is, what it covers, how to remove it.
MARKER = ".hsmfs-cover"
_MAGIC = "hsmfs-cover v1"
_TMPFS_MAGIC = 0x01021994
#: hsmfs's state directory in the cache root (hsmfs.keys.STATE_DIR; not imported, so this
#: module stays standalone for a service manager's hook).
STATE_DIR_NAME = ".hsmfs"
_MAX_STACK = 16  # covers stacked by racing callers, removed one by one (bounded)

_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 428, 429, 430, 431, 432
_SYS_MOUNT_SETATTR = 442
_AT_FDCWD, _AT_EMPTY_PATH = -100, 0x1000
_OPEN_TREE_CLONE = 1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_FSOPEN_CLOEXEC, _FSMOUNT_CLOEXEC = 1, 1
_FSCONFIG_SET_STRING, _FSCONFIG_CMD_CREATE = 1, 6
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV, _MOUNT_ATTR_NOEXEC = 1, 2, 4, 8
_MNT_DETACH = 2
_MS_REC, _MS_PRIVATE = 0x4000, 0x40000
_CLONE_NEWNS = 0x20000
_STATX_MNT_ID = 0x1000
_STATX_ATTR_MOUNT_ROOT = 0x2000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                        ctypes.c_void_p]
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _raise(what: str, path: str | None = None) -> None:
    e = ctypes.get_errno()
    raise OSError(e, f"{what}: {os.strerror(e)}", path)


def _syscall(nr: int, *args: object, what: str, path: str | None = None) -> int:
    r = _libc.syscall(ctypes.c_long(nr), *args)
    if r < 0:
        _raise(what, path)
    return int(r)


# ---------------------------------------------------------------------------- public API


def cover(cache_dir: str | os.PathLike[str]) -> bool:
    """Mount a cover over ``cache_dir``; False if the top mount there is one already.

    H calls this just before it lets the group close (every exit path that can still run code),
    while the group still holds every access. Then nothing can open a stub by its path in the
    gap between the last answer and the next start.
    """
    path = _canonical(cache_dir)
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "cannot cover a non-directory", path)
    if is_covered(path):
        return False
    # hsmfs's own state (pid file, log, control socket, staging) stays reachable through the
    # cover: a bind of the real state directory on an empty one in the cover.  A start can
    # then write its pid file and log while the cover still keeps every stub out of reach,
    # and the worker lifts the cover only once every stub is guarded again.
    state = os.path.join(path, STATE_DIR_NAME)
    state_fd = _open_tree(state) if os.path.isdir(state) else None
    try:
        mfd = _build_cover(path, st, with_state=state_fd is not None)
        try:
            _syscall(_SYS_MOVE_MOUNT, ctypes.c_long(mfd), ctypes.c_char_p(b""),
                     ctypes.c_long(_AT_FDCWD), ctypes.c_char_p(os.fsencode(path)),
                     ctypes.c_long(_MOVE_MOUNT_F_EMPTY_PATH), what="move_mount", path=path)
        finally:
            os.close(mfd)
        if state_fd is not None:
            _syscall(_SYS_MOVE_MOUNT, ctypes.c_long(state_fd), ctypes.c_char_p(b""),
                     ctypes.c_long(_AT_FDCWD), ctypes.c_char_p(os.fsencode(state)),
                     ctypes.c_long(_MOVE_MOUNT_F_EMPTY_PATH), what="move_mount(state)",
                     path=state)
    finally:
        if state_fd is not None:
            os.close(state_fd)
    return True


def uncover(cache_dir: str | os.PathLike[str]) -> bool:
    """Remove every hsmfs cover from the top of ``cache_dir``; False if there was none.

    Stops at the first mount that is not an hsmfs cover, whatever lies beneath it. A process
    whose cwd is inside the cover keeps the detached (empty) tmpfs alive until it leaves; that
    holds nothing of the tree.
    """
    path = _canonical(cache_dir)
    removed = False
    for _ in range(_MAX_STACK):
        fd = _open_top(path)
        try:
            if not _is_ours(fd, path):
                break
            # The magic link resolves to exactly the mount checked through this fd.  The fd
            # itself holds the mount, so only a lazy detach can succeed.
            if _libc.umount2(f"/proc/self/fd/{fd}".encode(), _MNT_DETACH) < 0:
                _raise("umount2", path)
            removed = True
        finally:
            os.close(fd)
    return removed


def is_covered(cache_dir: str | os.PathLike[str]) -> bool:
    """True if the top mount at ``cache_dir`` is an hsmfs cover."""
    path = _canonical(cache_dir)
    fd = _open_top(path)
    try:
        return _is_ours(fd, path)
    finally:
        os.close(fd)


def is_mount_beneath(cache_dir: str | os.PathLike[str]) -> bool:
    """``os.path.ismount(cache_dir)`` as it would be without hsmfs's covers."""
    path = _canonical(cache_dir)
    fd = _open_top(path)
    try:
        if not _is_ours(fd, path):
            return os.path.ismount(path)
        mounts = _mountinfo()
        info = mounts.get(_statx_mount(fd)[1])
    finally:
        os.close(fd)
    # Follow the parents down through our covers.  Whatever lies beneath is a mount root at
    # ``path`` exactly when the first parent that is not a cover is mounted at ``path`` too.
    while info is not None and _looks_like_cover(info, path):
        info = mounts.get(info.parent)
    return info is not None and info.mount_point == path


def open_beneath(cache_dir: str | os.PathLike[str], timeout: float = 10.0) -> int:
    """Return an O_PATH fd of a detached clone (``open_tree``) of the tree beneath the cover.

    Without a cover this is ``open_tree(cache_dir, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)``. With
    one, a helper process (this module run as a script, so it is safe in threaded callers)
    unshares its mount namespace, makes it private so that nothing propagates back, detaches
    the covers in its own namespace, clones the tree and passes the fd back. The host keeps
    its cover. The clone belongs to no namespace: it outlives the helper, no path reaches it,
    and it disappears when the fd (and everything opened through it) is closed.
    """
    path = _canonical(cache_dir)
    if not is_covered(path):
        return _open_tree(path)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", os.path.abspath(__file__), "_beneath", path,
                 str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        finally:
            theirs.close()
        try:
            ours.settimeout(timeout)
            try:
                msg, fds, _flags, _addr = socket.recv_fds(ours, 1024, 1)
            except TimeoutError:
                proc.kill()
                raise OSError(errno.ETIMEDOUT, "open_beneath: helper timed out", path) from None
        finally:
            try:
                _out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                _out, err = proc.communicate(timeout=5)
    if not fds:
        detail = msg.decode(errors="replace") or err.decode(errors="replace").strip()[-300:]
        raise OSError(errno.EIO, f"open_beneath: {detail or 'helper failed'}", path)
    os.set_inheritable(fds[0], False)
    return fds[0]


# ---------------------------------------------------------------------------- building a cover


def _canonical(cache_dir: str | os.PathLike[str]) -> str:
    path = os.path.realpath(os.fspath(cache_dir))
    if path == "/" or "\n" in path:
        raise ValueError(f"refusing to cover {path!r}")
    return path


def _marker_text(path: str, st: os.stat_result) -> bytes:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return (
        f"{_MAGIC}\n"
        f"covered: {path}\n"
        f"covered-inode: {st.st_dev}:{st.st_ino}\n"
        f"covered-by-pid: {os.getpid()}\n"
        f"covered-at: {when}\n"
        "\n"
        "No hsmfs process guards this directory now, so its files are hidden: the parts of a\n"
        "file not yet fetched from S3 would read as zeros.  hsmfs removes this cover when it\n"
        "starts serving the directory again.  `python3 -m hsmfs.cover uncover DIR` removes it\n"
        "by hand (unfetched parts then read as zeros until hsmfs runs).\n"
    ).encode()


def _build_cover(path: str, st: os.stat_result, *, with_state: bool = False) -> int:
    """A detached, read-only tmpfs holding the marker (and, ``with_state``, an empty
    directory for hsmfs's state to be bound on); returns its mount fd."""
    fs = _syscall(_SYS_FSOPEN, ctypes.c_char_p(b"tmpfs"), ctypes.c_long(_FSOPEN_CLOEXEC),
                  what="fsopen(tmpfs)", path=path)
    try:
        for key, value in (("source", COVER_SOURCE), ("mode", "0555"), ("size", "64k"),
                           ("nr_inodes", "8")):
            _syscall(_SYS_FSCONFIG, ctypes.c_long(fs), ctypes.c_long(_FSCONFIG_SET_STRING),
                     ctypes.c_char_p(key.encode()), ctypes.c_char_p(value.encode()),
                     ctypes.c_long(0), what=f"fsconfig({key})", path=path)
        _syscall(_SYS_FSCONFIG, ctypes.c_long(fs), ctypes.c_long(_FSCONFIG_CMD_CREATE),
                 ctypes.c_char_p(None), ctypes.c_char_p(None), ctypes.c_long(0),
                 what="fsconfig(create)", path=path)
        mfd = _syscall(_SYS_FSMOUNT, ctypes.c_long(fs), ctypes.c_long(_FSMOUNT_CLOEXEC),
                       ctypes.c_long(_MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV | _MOUNT_ATTR_NOEXEC),
                       what="fsmount", path=path)
    finally:
        os.close(fs)
    try:
        fd = os.open(MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o444,
                     dir_fd=mfd)
        try:
            os.write(fd, _marker_text(path, st))
        finally:
            os.close(fd)
        if with_state:
            os.mkdir(STATE_DIR_NAME, 0o700, dir_fd=mfd)
        attr = _MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0)
        _syscall(_SYS_MOUNT_SETATTR, ctypes.c_long(mfd), ctypes.c_char_p(b""),
                 ctypes.c_long(_AT_EMPTY_PATH), ctypes.byref(attr),
                 ctypes.c_long(ctypes.sizeof(attr)), what="mount_setattr(rdonly)", path=path)
    except BaseException:
        os.close(mfd)
        raise
    return mfd


def _open_tree(path: str) -> int:
    return _syscall(_SYS_OPEN_TREE, ctypes.c_long(_AT_FDCWD), ctypes.c_char_p(os.fsencode(path)),
                    ctypes.c_long(_OPEN_TREE_CLONE | os.O_CLOEXEC), what="open_tree", path=path)


# ---------------------------------------------------------------------------- recognising one


@dataclasses.dataclass(frozen=True)
class _Mount:
    parent: int
    mount_point: str
    fstype: str
    source: str


def _open_top(path: str) -> int:
    """An O_PATH fd of the root of the top mount at ``path``."""
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _statx_mount(fd: int) -> tuple[bool, int]:
    """(is a mount root, mount id) of ``fd``."""
    buf = ctypes.create_string_buffer(256)
    if _libc.statx(fd, b"", _AT_EMPTY_PATH, _STATX_MNT_ID, buf) < 0:
        _raise("statx")
    mask, = struct.unpack_from("=I", buf, 0)
    attributes, = struct.unpack_from("=Q", buf, 8)
    attributes_mask, = struct.unpack_from("=Q", buf, 56)
    mnt_id, = struct.unpack_from("=Q", buf, 0x90)
    if not mask & _STATX_MNT_ID or not attributes_mask & _STATX_ATTR_MOUNT_ROOT:
        raise OSError(errno.ENOSYS, "statx: no mount id / mount-root attribute")
    return bool(attributes & _STATX_ATTR_MOUNT_ROOT), mnt_id


def _fs_magic(fd: int) -> int:
    buf = ctypes.create_string_buffer(256)
    if _libc.fstatfs(fd, buf) < 0:
        _raise("fstatfs")
    return int(ctypes.c_long.from_buffer(buf).value)


def _mountinfo() -> dict[int, _Mount]:
    """The mount table by mount id, from the one reader (hsmfs.mounts: standard library only,
    so this module still runs as a service manager's hook)."""
    return {m.mount_id: _Mount(parent=m.parent_id, mount_point=m.mount_point,
                               fstype=m.fstype, source=m.source) for m in mountinfo()}


def _looks_like_cover(info: _Mount, path: str) -> bool:
    return info.fstype == "tmpfs" and info.source == COVER_SOURCE and info.mount_point == path


def _is_ours(fd: int, path: str) -> bool:
    """Is the mount whose root ``fd`` is an hsmfs cover of ``path``?  Every check must pass."""
    root, mnt_id = _statx_mount(fd)
    if not root or _fs_magic(fd) != _TMPFS_MAGIC:
        return False
    info = _mountinfo().get(mnt_id)
    if info is None or not _looks_like_cover(info, path):
        return False
    try:
        mfd = os.open(MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                      dir_fd=fd)
    except OSError:
        return False
    try:
        text = os.read(mfd, 4096).decode(errors="replace")
    finally:
        os.close(mfd)
    lines = text.splitlines()
    return bool(lines) and lines[0] == _MAGIC and f"covered: {path}" in lines[1:3]


# ---------------------------------------------------------------------------- helper, CLI


def _beneath_helper(path: str, sock_fd: int) -> int:
    """Run by :func:`open_beneath` in its own process: clone the tree beneath the cover."""
    sock = socket.socket(fileno=sock_fd)
    try:
        if _libc.unshare(_CLONE_NEWNS) < 0:
            _raise("unshare(CLONE_NEWNS)")
        # Private first: detaching the cover below must not propagate to the host's peers.
        if _libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) < 0:
            _raise("mount(MS_REC|MS_PRIVATE)")
        if not uncover(path):
            raise OSError(errno.ENOENT, "no hsmfs cover to look beneath", path)
        tree = _open_tree(path)
        socket.send_fds(sock, [b"ok"], [tree])
        return 0
    except OSError as e:
        with contextlib.suppress(OSError):
            sock.send(f"{e}".encode())
        return 1
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> int:
    """``python3 -m hsmfs.cover cover|uncover|status DIR``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_beneath"] and len(argv) == 3:
        return _beneath_helper(argv[1], int(argv[2]))
    parser = argparse.ArgumentParser(
        prog="python3 -m hsmfs.cover",
        description="Hide a backing tree that no hsmfs process guards behind an empty "
                    "read-only mount (or remove that cover).")
    parser.add_argument("action", choices=("cover", "uncover", "status"))
    parser.add_argument("dir")
    args = parser.parse_args(argv)
    try:
        if args.action == "cover":
            print("covered" if cover(args.dir) else "already covered")
            return 0
        if args.action == "uncover":
            print("uncovered" if uncover(args.dir) else "no hsmfs cover")
            return 0
        covered = is_covered(args.dir)
        print("covered" if covered else "not covered")
        return 0 if covered else 1
    except (OSError, ValueError) as e:
        print(f"hsmfs.cover: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
