"""Mount table and FUSE-mount helpers: the one reader of ``/proc/self/mountinfo``.

Owns parsing mountinfo (with its octal escapes decoded), and the small mount chores the command
line and the daemon share: clearing a dead FUSE mount, asking whether a mount is still there,
finding a FUSE mount's device.  Must not: import pyfuse3, trio or boto3 (the holder process and
``hsmfs stop`` use it), or mount anything itself.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
from typing import NamedTuple

MOUNTINFO = "/proc/self/mountinfo"
#: The kernel escapes space, tab, newline and backslash in mountinfo's paths as a backslash and
#: three octal digits (``show_mountinfo`` → ``seq_path_root(..., " \t\n\\")``).  Nothing else
#: is escaped, so only these four are decoded: a path with a literal ``\\0`` in its name stays
#: intact.
_ESCAPE = re.compile(rb"\\(040|011|012|134)")
#: How long a lazy unmount of a dead mount may take before we give up on it.
_UNMOUNT_TIMEOUT_S = 30


class MountInfo(NamedTuple):
    """One line of mountinfo (proc(5)).  Field order is the file's, so ``m[4]`` is the mount
    point, as it was for the plain field lists callers used before."""

    mount_id: int
    parent_id: int
    dev: str  # "major:minor"
    root: str  # the root of the mount within its filesystem
    mount_point: str
    options: str
    optional: tuple[str, ...]  # "shared:N", "master:N", ...
    fstype: str
    source: str
    super_options: str


def unescape(field: str | bytes) -> str:
    """A mountinfo path field with its octal escapes decoded.  Bytes that are not UTF-8 come
    back as surrogate escapes (``os.fsdecode``), so the result names the same file."""
    raw = field.encode("utf-8", "surrogateescape") if isinstance(field, str) else field
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), raw))


def parse_mountinfo(data: bytes) -> list[MountInfo]:
    """Every mount of a mountinfo text (as bytes, so non-UTF-8 paths survive)."""
    mounts = []
    for line in data.splitlines():
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-", 6)
            mounts.append(MountInfo(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                dev=fields[2].decode(),
                root=unescape(fields[3]),
                mount_point=unescape(fields[4]),
                options=fields[5].decode(),
                optional=tuple(f.decode() for f in fields[6:sep]),
                fstype=fields[sep + 1].decode(),
                source=unescape(fields[sep + 2]),
                super_options=os.fsdecode(b" ".join(fields[sep + 3:])),
            ))
        except (ValueError, IndexError):
            continue  # not a mountinfo line; a later kernel may add fields, never remove them
    return mounts


def mountinfo(path: str = MOUNTINFO) -> list[MountInfo]:
    """This process's mounts, from ``/proc/self/mountinfo``."""
    with open(path, "rb") as f:
        return parse_mountinfo(f.read())


def mounts_at(mountpoint: str) -> list[MountInfo]:
    """The mounts whose mount point is ``mountpoint`` (absolute, not resolved: resolving would
    stat a FUSE mount, which may be the very daemon asking), bottom first."""
    target = os.path.abspath(mountpoint)
    return [m for m in mountinfo() if m.mount_point == target]


def is_mounted(mountpoint: str) -> bool:
    return bool(mounts_at(mountpoint))


def is_fuse_mount(mountpoint: str) -> bool:
    """Whether the topmost mount at ``mountpoint`` is a FUSE mount (``fuse``, ``fuse.hsmfs``)."""
    found = mounts_at(mountpoint)
    return bool(found) and found[-1].fstype.split(".")[0] in ("fuse", "fuseblk")


def fuse_device(mountpoint: str) -> str | None:
    """``major:minor`` of the FUSE mount at ``mountpoint`` (its bdi is named after it), or None.

    From mountinfo, never from ``stat(mountpoint)``: that would be a GETATTR to the daemon that
    asks, before its loop runs, a deadlock.
    """
    dev = None
    for m in mounts_at(mountpoint):
        if m.fstype.startswith("fuse"):
            dev = m.dev
    return dev


def unmount_after(mountpoint: str) -> bool:
    """Whether the FUSE mount is still in place (so closing the session must unmount it)."""
    return is_mounted(mountpoint)


#: Dead mounts stacked at one mountpoint that a start clears, at most (each is one unmount).
_MAX_DEAD_LAYERS = 64


def clear_dead_mount(mountpoint: str) -> None:
    """A crashed daemon leaves its mount answering ENOTCONN; clear it so a new one can mount.

    Asked with ``statvfs``, never ``stat``: the kernel answers a stat of a FUSE root from
    its attribute cache (``attr_timeout``, 300 s) without asking the daemon, so a dead mount
    looked alive and the next one was mounted on top of it: with both doors in one daemon
    every worker restart stacked one more dead mount, and an unmount later uncovered one
    answering ENOTCONN (found by ``hsmfs stress``).  ``statvfs`` always reaches the daemon.
    Every dead layer is cleared (a tree left stacked by an earlier version too)."""
    for _ in range(_MAX_DEAD_LAYERS):
        if not is_fuse_mount(mountpoint):
            return
        try:
            os.statvfs(mountpoint)
            return  # the topmost mount answers: alive
        except OSError as exc:
            if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
                return
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True,
                       timeout=_UNMOUNT_TIMEOUT_S)
