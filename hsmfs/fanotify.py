"""The fanotify and open_tree ABI as hsmfs uses it on Linux 6.18: constants, syscalls, structs.

What this module owns:
  * the numeric constants of the fanotify uapi that hsmfs needs.  The system header on the build
    machine (Debian 12, 6.1-era) lacks the pre-content ones, so every value is written out here
    and justified by a pointer to ``shared/KERNEL_FACTS.md`` (the team shelf) (cited as "KF §n") or
    ``KERNEL_FACTS_2.md`` ("KF2 §n"), where it was verified on this kernel;
  * thin ctypes wrappers for ``fanotify_init(2)``, ``fanotify_mark(2)`` and ``open_tree(2)`` that
    raise :class:`OSError` with the kernel's errno;
  * the event record parser (:func:`parse_events`) and the response writer
    (:func:`write_response`).

What it must not do: decide anything.  No policy (which events to mark, which errno to answer,
when to fill), no logging, no threads, no trio, no knowledge of the cache.  Those live in the
holder (``hsmfs/holder.py``) and the kernel bridge.  Every function here is a direct translation
of one syscall or one struct, so it can be read against the man pages line by line.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import struct
from collections.abc import Iterator

__all__ = [
    "AT_FDCWD",
    "FANOTIFY_METADATA_VERSION",
    "FAN_ACCESS_PERM",
    "FAN_ALLOW",
    "FAN_AUDIT",
    "FAN_CLASS_CONTENT",
    "FAN_CLASS_NOTIF",
    "FAN_CLASS_PRE_CONTENT",
    "FAN_CLOEXEC",
    "FAN_CLOSE_WRITE",
    "FAN_DENY",
    "FAN_ENABLE_AUDIT",
    "FAN_EVENT_INFO_TYPE_PIDFD",
    "FAN_EVENT_INFO_TYPE_RANGE",
    "FAN_EVENT_ON_CHILD",
    "FAN_MARK_ADD",
    "FAN_MARK_DONT_FOLLOW",
    "FAN_MARK_EVICTABLE",
    "FAN_MARK_FILESYSTEM",
    "FAN_MARK_FLUSH",
    "FAN_MARK_IGNORE",
    "FAN_MARK_IGNORED_MASK",
    "FAN_MARK_IGNORED_SURV_MODIFY",
    "FAN_MARK_IGNORE_SURV",
    "FAN_MARK_INODE",
    "FAN_MARK_MOUNT",
    "FAN_MARK_REMOVE",
    "FAN_MODIFY",
    "FAN_NOFD",
    "FAN_NONBLOCK",
    "FAN_ONDIR",
    "FAN_OPEN_EXEC_PERM",
    "FAN_OPEN_PERM",
    "FAN_PRE_ACCESS",
    "FAN_Q_OVERFLOW",
    "FAN_REPORT_FD_ERROR",
    "FAN_REPORT_PIDFD",
    "FAN_REPORT_TID",
    "FAN_UNLIMITED_MARKS",
    "FAN_UNLIMITED_QUEUE",
    "NOTIFY_EVENTS",
    "OPEN_TREE_CLOEXEC",
    "OPEN_TREE_CLONE",
    "PERM_EVENTS",
    "PRIVATE_IGNORE_MASK",
    "Event",
    "deny_errno",
    "describe_mask",
    "fanotify_init",
    "fanotify_mark",
    "fanotify_mark_fd",
    "ignore_mount",
    "open_private_tree",
    "parse_events",
    "write_response",
]

# --------------------------------------------------------------------------------------------
# fanotify_init(2) flags (KF §1, table "Constants"; KF §5 "fanotify_init with PRE_CONTENT").

#: Event fds (and the group fd) get O_CLOEXEC, so a spawned worker inherits only what it is
#: handed explicitly.
FAN_CLOEXEC = 0x0000_0001
#: read() of the group returns EAGAIN instead of blocking.
FAN_NONBLOCK = 0x0000_0002
#: Notification-only group: cannot carry FAN_PRE_ACCESS (mark → EINVAL, KF §5).
FAN_CLASS_NOTIF = 0x0000_0000
#: Permission group: can deny, but FAN_DENY_ERRNO with a custom errno → EINVAL (KF2 §2).
FAN_CLASS_CONTENT = 0x0000_0004
#: The only class that may mark FAN_PRE_ACCESS and answer with FAN_DENY_ERRNO (KF §1, §4).
FAN_CLASS_PRE_CONTENT = 0x0000_0008
#: Without it a burst past max_queued_events (16384) is *silently allowed*: apps read zeros
#: (KF §9).  Always set it on an HSM group.
FAN_UNLIMITED_QUEUE = 0x0000_0010
#: Lifts max_user_marks (205039 per user here, KF §1; one inode mark per stub, KF2 §6).
FAN_UNLIMITED_MARKS = 0x0000_0020
#: Only makes FAN_AUDIT valid in responses; no other effect seen (KF §9).
FAN_ENABLE_AUDIT = 0x0000_0040
#: Adds a PIDFD info record (type 4) before the RANGE record (KF §2).
FAN_REPORT_PIDFD = 0x0000_0080
#: ``pid`` is the accessing thread's tid, so ``/proc/<tid>/syscall`` shows what it is doing
#: (KF §3: reads and writes both report FAN_PRE_ACCESS; KF2 §1d: O_TRUNC opens).
FAN_REPORT_TID = 0x0000_0100
#: When the kernel cannot open the event fd, deliver the event with ``fd = -errno`` instead of
#: failing the read() (KF §1; KF §7 "ETXTBSY"). The kernel auto-denies that permission event.
FAN_REPORT_FD_ERROR = 0x0000_2000

# --------------------------------------------------------------------------------------------
# fanotify_mark(2) flags (KF §1; behaviour KF §5, §6, §7b).

FAN_MARK_ADD = 0x0000_0001
FAN_MARK_REMOVE = 0x0000_0002
#: Do not follow a trailing symlink (a symlink itself cannot carry PRE_ACCESS: EINVAL, KF §5).
FAN_MARK_DONT_FOLLOW = 0x0000_0004
#: Old-API ignore mask; an app write clears it unless SURV_MODIFY is also set (KF §6).
FAN_MARK_IGNORED_MASK = 0x0000_0020
#: Keep an ignore mask across writes.  Without it, an ignore added while anyone (including the
#: HSM's own O_RDWR event fd) has the file open for write silently adds nothing (KF §6).
FAN_MARK_IGNORED_SURV_MODIFY = 0x0000_0040
#: Remove every mark of the given type (inode/mount/filesystem) of the group (KF2 §6: 100k
#: inode marks in ~50 ms).
FAN_MARK_FLUSH = 0x0000_0080
#: The mark may be dropped with the inode under memory pressure.  Safe only for ignore marks
#: (their loss brings events back); an evictable *watch* mark leaves a stub unguarded (KF2 §6).
FAN_MARK_EVICTABLE = 0x0000_0200
#: New-API ignore mask (6.0+); pair it with SURV_MODIFY, see :data:`FAN_MARK_IGNORE_SURV`.
FAN_MARK_IGNORE = 0x0000_0400
#: The ignore flavour hsmfs uses everywhere: survives writes (KF §6, KF2 §4 "ignore-mask
#: designs"), and as a mount mark on the private tree it silences hsmfs's own I/O (KF §7b).
FAN_MARK_IGNORE_SURV = FAN_MARK_IGNORE | FAN_MARK_IGNORED_SURV_MODIFY
#: Mark object types.  INODE is the default (0).  FAN_MARK_MNTNS (0x110) is EINVAL with
#: pre-content events on this kernel (KF §5) and is deliberately not defined.
FAN_MARK_INODE = 0x0000_0000
FAN_MARK_MOUNT = 0x0000_0010
FAN_MARK_FILESYSTEM = 0x0000_0100

# --------------------------------------------------------------------------------------------
# Event mask bits (KF §1).

#: Notification (no answer, after the fact): a write through a file descriptor landed.  Raised
#: by write/pwrite/writev/pwritev2/O_APPEND, fallocate (also PUNCH_HOLE), copy_file_range,
#: sendfile and splice into the file; **not** by truncate/ftruncate (a dentry event, which a
#: group without FID reporting never gets) nor by writes through a shared mmap
#: (KERNEL_FACTS_3 §2).  Allowed in a pre-content group (KF §5).  Merged with an unread
#: MODIFY of the same file in the queue.
FAN_MODIFY = 0x0000_0002
#: Notification: the last reference of a file opened for writing was closed (also when nothing
#: was written; after munmap for a shared mapping).  KERNEL_FACTS_3 §2.
FAN_CLOSE_WRITE = 0x0000_0008
#: Permission event at open(); filling the whole file here makes cp/tar/rsync copy the right
#: bytes of a stub (KF2 §1).  No RANGE record (KF §2).
FAN_OPEN_PERM = 0x0001_0000
#: Permission event on read(); no RANGE record.  Raised after PRE_ACCESS (KF §5).
FAN_ACCESS_PERM = 0x0002_0000
#: Permission event at the open of execve()/uselib (KF2 §1c).  No RANGE record.
FAN_OPEN_EXEC_PERM = 0x0004_0000
#: The pre-content event: every read, write, truncate, mmap... of a watched file, with a
#: page-rounded RANGE record, never merged, not clipped to EOF (KF §3).  0x00200000 (a proposed
#: FAN_PRE_MODIFY) is EINVAL on this kernel (KF §1).
FAN_PRE_ACCESS = 0x0010_0000
#: The queue overflowed; this event has ``fd == FAN_NOFD`` and the overflowing permission
#: events were *allowed* without being seen (KF §9).  Cannot happen with FAN_UNLIMITED_QUEUE.
FAN_Q_OVERFLOW = 0x0000_4000
#: A directory mark also reports its children (KF §5).
FAN_EVENT_ON_CHILD = 0x0800_0000
#: Report events on directories; EINVAL together with FAN_PRE_ACCESS (KF §5).
FAN_ONDIR = 0x4000_0000

#: Every event bit that waits for a response.  An event with any of these bits must be answered
#: exactly once, or the accessing task blocks (killably) until the group dies (KF §8).
PERM_EVENTS = FAN_OPEN_PERM | FAN_ACCESS_PERM | FAN_OPEN_EXEC_PERM | FAN_PRE_ACCESS

#: The notification events hsmfs marks in its pre-content group (writes seen after the fact).
#: They carry an fd but want no answer; the holder forwards them to the worker.
NOTIFY_EVENTS = FAN_MODIFY | FAN_CLOSE_WRITE

#: Default mask of the private tree's mount ignore mark: every permission event, so that no mark
#: hsmfs might add can raise an event for hsmfs's own I/O (leaving OPEN_PERM out while stubs
#: carry it self-deadlocks the daemon's own open(), KF2 §1e), and the notification events: a
#: mount ignore mark without FAN_MODIFY lets hsmfs's own fills raise FAN_MODIFY, which would
#: mark every filled file dirty (KERNEL_FACTS_3 §2, columns priv / priv+).
PRIVATE_IGNORE_MASK = PERM_EVENTS | NOTIFY_EVENTS

# --------------------------------------------------------------------------------------------
# Responses (KF §1, §4).

FAN_ALLOW = 0x01
FAN_DENY = 0x02
#: Valid only in a group made with FAN_ENABLE_AUDIT; EINVAL otherwise (KF §4).
FAN_AUDIT = 0x10
#: The errno of FAN_DENY_ERRNO() lives in the top byte of the response word (KF §1).
_FAN_ERRNO_SHIFT = 24
_FAN_ERRNO_MASK = 0xFF
#: "No fd" in a metadata record, e.g. the overflow event (KF §1).
FAN_NOFD = -1

# --------------------------------------------------------------------------------------------
# Info records and struct layouts (KF §2; little-endian x86_64 as observed on the wire).

#: Observed ``vers=3`` on every event (KF §1).  A different value means a different layout.
FANOTIFY_METADATA_VERSION = 3
FAN_EVENT_INFO_TYPE_PIDFD = 4
FAN_EVENT_INFO_TYPE_RANGE = 6

#: struct fanotify_event_metadata {u32 event_len; u8 vers; u8 reserved; u16 metadata_len;
#: u64 mask; s32 fd; s32 pid;} — 24 bytes (KF §2).
_METADATA = struct.Struct("=IBBHQii")
#: struct fanotify_event_info_header {u8 info_type; u8 pad; u16 len;}
_INFO_HEADER = struct.Struct("=BBH")
#: struct fanotify_event_info_range {hdr; u32 pad; u64 offset; u64 count;} — 24 bytes.
_INFO_RANGE = struct.Struct("=BBHIQQ")
#: struct fanotify_event_info_pidfd {hdr; s32 pidfd;} — 8 bytes.
_INFO_PIDFD = struct.Struct("=BBHi")
#: struct fanotify_response {s32 fd; u32 response;} — write exactly 8 bytes (4 → EINVAL, KF §4).
_RESPONSE = struct.Struct("=iI")

# --------------------------------------------------------------------------------------------
# open_tree(2) (x86_64 syscall 428; same number on every architecture since the 5.1 unified
# syscall table).  Measured today: a clone of the cache directory is a *detached* mount that no
# path reaches, and a FAN_MARK_MOUNT ignore mark on it silences every access made through it
# (DESIGN §6 update; see docs/design.md).

AT_FDCWD = -100
_SYS_OPEN_TREE = 428
#: Make a detached copy of the mount (only the top one: submounts such as a bind mount that
#: hides a staging directory from the public are *not* copied, so the private view sees below).
OPEN_TREE_CLONE = 1
#: Same value as O_CLOEXEC.
OPEN_TREE_CLOEXEC = 0o2000000

# --------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_init.restype = ctypes.c_int
_libc.fanotify_mark.argtypes = [
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.c_uint64,
    ctypes.c_int,
    ctypes.c_char_p,
]
_libc.fanotify_mark.restype = ctypes.c_int
# syscall(2) is variadic; every argument is passed as a full long so no register carries
# garbage in its upper half.
_libc.syscall.restype = ctypes.c_long

PathArg = str | bytes | os.PathLike[str] | os.PathLike[bytes]


def _raise_errno(what: str, filename: object = None) -> None:
    e = ctypes.get_errno()
    raise OSError(e, f"{what}: {os.strerror(e)}", filename)


def fanotify_init(flags: int, event_f_flags: int) -> int:
    """Create a fanotify group and return its fd (``fanotify_init(2)``).

    ``event_f_flags`` are the open flags of the fds the kernel creates for events (KF §5: O_DIRECT
    is EINVAL; KF §7: O_RDWR makes events on a binary that runs since before its mark fail with
    ETXTBSY).  Raises OSError (EINVAL for an unsupported flag combination, EPERM without
    CAP_SYS_ADMIN, EMFILE past max_user_groups).
    """
    fd = _libc.fanotify_init(flags, event_f_flags)
    if fd < 0:
        _raise_errno("fanotify_init")
    return fd


def fanotify_mark(
    fan_fd: int, flags: int, mask: int, path: PathArg | None, dirfd: int = AT_FDCWD
) -> None:
    """Add/remove/flush a mark on the object named by ``dirfd`` + ``path`` (``fanotify_mark(2)``).

    ``path`` is resolved relative to ``dirfd`` (an O_PATH fd such as :func:`open_private_tree`'s
    is fine as ``dirfd``).  Raises OSError: EINVAL for an event the group class or the object
    cannot carry, EOPNOTSUPP on filesystems without HSM support such as tmpfs/overlay/FUSE
    (KF §5), ENOENT, EBADF.
    """
    cpath = None if path is None else os.fsencode(path)
    if _libc.fanotify_mark(fan_fd, flags, mask, dirfd, cpath) < 0:
        _raise_errno("fanotify_mark", path)


def fanotify_mark_fd(fan_fd: int, flags: int, mask: int, fd: int) -> None:
    """Mark the object that the open fd ``fd`` refers to (pathname NULL, ``dirfd`` = fd).

    ``fd`` must be a real open file: the kernel rejects an O_PATH fd here with EBADF.  For an
    O_PATH fd use ``fanotify_mark(fan_fd, flags, mask, ".", dirfd=fd)``, as
    :func:`ignore_mount` does.
    """
    if _libc.fanotify_mark(fan_fd, flags, mask, fd, None) < 0:
        _raise_errno("fanotify_mark(fd)", fd)


def deny_errno(err: int) -> int:
    """The response word ``FAN_DENY_ERRNO(err)``: deny, and make the access fail with ``err``.

    This only encodes.  The kernel accepts EPERM, EIO, EAGAIN, EBUSY, ETXTBSY, ENOSPC and EDQUOT
    (and 0, meaning EPERM) in a pre-content group and refuses every other errno with EINVAL while
    the event *stays pending* (KF §4; the set is ``hsmfs.errors.DENY_ERRNOS``).  The holder
    therefore turns a refused response into ``deny_errno(EIO)``.
    """
    if not 0 <= err <= _FAN_ERRNO_MASK:
        raise ValueError(f"errno {err} does not fit in FAN_DENY_ERRNO's 8 bits")
    return FAN_DENY | (err << _FAN_ERRNO_SHIFT)


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One fanotify event as read from a pre-content group.

    ``fd``: the event fd, owned by whoever read the event and to be closed by it.  It is
    ``FAN_NOFD`` (-1) for :data:`FAN_Q_OVERFLOW`; with :data:`FAN_REPORT_FD_ERROR` it is
    ``-errno`` when the kernel could not open the file (see :attr:`fd_error`).
    ``pid``: tgid, or tid with :data:`FAN_REPORT_TID`.
    ``offset``/``count``: the RANGE record (KF §3), or None for events without one
    (FAN_OPEN_PERM, FAN_OPEN_EXEC_PERM, FAN_ACCESS_PERM).  ``count == 0`` means "from offset to
    EOF" or an aligned truncate (KF §11.2).
    ``pidfd``: from a PIDFD record (groups with FAN_REPORT_PIDFD only), owned by the reader like
    ``fd``; negative values are the kernel's FAN_NOPIDFD/FAN_EPIDFD.
    """

    mask: int
    fd: int
    pid: int
    offset: int | None = None
    count: int | None = None
    pidfd: int | None = None

    @property
    def is_permission(self) -> bool:
        """True if the event waits for exactly one response (unless :attr:`fd_error` is set)."""
        return bool(self.mask & PERM_EVENTS)

    @property
    def is_overflow(self) -> bool:
        return bool(self.mask & FAN_Q_OVERFLOW)

    @property
    def fd_error(self) -> int | None:
        """The errno why the kernel could not open the event fd, or None if ``fd`` is usable.

        Such a permission event has already been denied by the kernel and must *not* be
        answered (KF §7: ETXTBSY of a running binary under O_RDWR event fds).  Only meaningful
        for groups with FAN_REPORT_FD_ERROR; an overflow event (fd -1) is not an error.
        """
        if self.fd >= 0 or self.is_overflow:
            return None
        return -self.fd


def parse_events(buf: bytes | bytearray | memoryview) -> list[Event]:
    """Parse the bytes of one ``read()`` of a fanotify group into events.

    Understands RANGE (type 6) and PIDFD (type 4) records and skips any other record by its
    length.  Raises ValueError on a metadata version other than 3 or a malformed length, which
    would mean the ABI is not the one this module was written against.
    """
    return list(_iter_events(memoryview(buf)))


def _iter_events(buf: memoryview) -> Iterator[Event]:
    off = 0
    end = len(buf)
    while off < end:
        if end - off < _METADATA.size:
            raise ValueError(f"truncated fanotify metadata at byte {off}")
        event_len, vers, _reserved, metadata_len, mask, fd, pid = _METADATA.unpack_from(buf, off)
        if vers != FANOTIFY_METADATA_VERSION:
            raise ValueError(f"fanotify metadata version {vers}, expected 3")
        if metadata_len < _METADATA.size or event_len < metadata_len or off + event_len > end:
            raise ValueError(f"bad fanotify event lengths {event_len}/{metadata_len} at {off}")
        offset = count = pidfd = None
        rec = off + metadata_len
        stop = off + event_len
        while rec < stop:
            if stop - rec < _INFO_HEADER.size:
                raise ValueError(f"truncated fanotify info header at byte {rec}")
            info_type, _pad, info_len = _INFO_HEADER.unpack_from(buf, rec)
            if info_len < _INFO_HEADER.size or rec + info_len > stop:
                raise ValueError(f"bad fanotify info record length {info_len} at byte {rec}")
            if info_type == FAN_EVENT_INFO_TYPE_RANGE and info_len >= _INFO_RANGE.size:
                _t, _p, _l, _pad2, offset, count = _INFO_RANGE.unpack_from(buf, rec)
            elif info_type == FAN_EVENT_INFO_TYPE_PIDFD and info_len >= _INFO_PIDFD.size:
                pidfd = _INFO_PIDFD.unpack_from(buf, rec)[3]
            # Any other record type (FID, ERROR, MNT... none are reported to pre-content groups
            # on this kernel, KF §2) is skipped by its length.
            rec += info_len
        yield Event(mask=mask, fd=fd, pid=pid, offset=offset, count=count, pidfd=pidfd)
        off += event_len


def write_response(fan_fd: int, event_fd: int, response: int) -> None:
    """Answer the pending permission event whose fd number is ``event_fd`` (8-byte write).

    The kernel matches the *first* pending event carrying that number in the group, whoever
    wrote it (KF §8 C'), so only the process that read the event may answer it.  Raises OSError:
    EINVAL for a response word the kernel refuses — the event then stays pending and must be
    answered again (KF §4) — and ENOENT when no event with that number is pending.
    """
    if not 0 <= response <= 0xFFFF_FFFF:
        raise ValueError(f"response {response:#x} is not a u32")
    n = os.write(fan_fd, _RESPONSE.pack(event_fd, response))
    if n != _RESPONSE.size:  # cannot happen for an 8-byte write; never assume it was taken
        raise OSError(errno.EIO, f"short fanotify response write ({n} bytes)")


def open_private_tree(path: PathArg) -> int:
    """Clone the mount at ``path`` into a detached mount; return its O_PATH fd (``open_tree(2)``).

    The clone is reachable by no path, only through this fd (``os.open(rel, ...,
    dir_fd=tree_fd)``); it disappears when the fd and every file opened through it are closed.
    Give it a mount ignore mark with :func:`ignore_mount` before any I/O.  Needs CAP_SYS_ADMIN.
    """
    cpath = os.fsencode(path)
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPEN_TREE),
        ctypes.c_long(AT_FDCWD),
        ctypes.c_char_p(cpath),
        ctypes.c_long(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC),
    )
    if fd < 0:
        _raise_errno("open_tree", path)
    return int(fd)


def ignore_mount(fan_fd: int, tree_fd: int, mask: int = PRIVATE_IGNORE_MASK) -> None:
    """Put a surviving mount ignore mark for ``mask`` on the (detached) mount of ``tree_fd``.

    Every access through that mount then raises none of ``mask``'s events in this group, which
    keeps the daemon's own fills, punches and truncates from deadlocking on its own marks (KF §7b;
    measured on a detached ``open_tree`` clone today).  ``mask`` must hold every permission event
    the group's marks use (KF2 §1e).  The path "." is required: ``tree_fd`` is O_PATH, and a NULL
    path gives EBADF.
    """
    fanotify_mark(fan_fd, FAN_MARK_ADD | FAN_MARK_MOUNT | FAN_MARK_IGNORE_SURV, mask, ".", tree_fd)


_MASK_NAMES = (
    (FAN_MODIFY, "MODIFY"),
    (FAN_CLOSE_WRITE, "CLOSE_WRITE"),
    (FAN_OPEN_PERM, "OPEN_PERM"),
    (FAN_ACCESS_PERM, "ACCESS_PERM"),
    (FAN_OPEN_EXEC_PERM, "OPEN_EXEC_PERM"),
    (FAN_PRE_ACCESS, "PRE_ACCESS"),
    (FAN_Q_OVERFLOW, "Q_OVERFLOW"),
    (FAN_ONDIR, "ONDIR"),
)


def describe_mask(mask: int) -> str:
    """``"OPEN_PERM|PRE_ACCESS"``-style text for log lines; unknown bits as hex."""
    names = [name for bit, name in _MASK_NAMES if mask & bit]
    rest = mask & ~sum(bit for bit, _ in _MASK_NAMES)
    if rest:
        names.append(hex(rest))
    return "|".join(names) or "0"
