"""File handles: reach an inode again through another mount (``name_to_handle_at`` +
``open_by_handle_at``, CAP_DAC_READ_SEARCH).

The kernel door's event fds are read-only (see ``hsmfs.holder.HOLDER_EVENT_F_FLAGS``), and a
stub whose path no longer leads to it (renamed away, or unlinked while a program holds it
open) can only be filled through an fd of that very inode.  Reopening the event fd through
``/proc/self/fd`` would open it on the *public* mount, where the worker's own writes raise
events it must answer itself (a deadlock); its handle, opened against the private door's root,
gives an O_RDWR fd on the private mount, which raises none.  Measured on ext4 (6.18): works for
a renamed file and for an unlinked one that is still open.
"""

from __future__ import annotations

import ctypes
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p,
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_int]
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_AT_EMPTY_PATH = 0x1000
_MAX_HANDLE = 128  # MAX_HANDLE_SZ
_HEAD = struct.Struct("=Ii")  # struct file_handle: handle_bytes, handle_type


def handle_of(fd: int) -> bytes:
    """The file handle of the inode behind ``fd``."""
    buf = ctypes.create_string_buffer(_HEAD.size + _MAX_HANDLE)
    _HEAD.pack_into(buf, 0, _MAX_HANDLE, 0)
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(fd, b"", buf, ctypes.byref(mount_id), _AT_EMPTY_PATH) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"name_to_handle_at: {os.strerror(err)}")
    size = _HEAD.unpack_from(buf, 0)[0]
    return buf.raw[:_HEAD.size + size]


def open_handle(mount_fd: int, handle: bytes, flags: int) -> int:
    """Open ``handle`` on the mount of ``mount_fd`` (a real fd, not O_PATH: EBADF)."""
    fd = _libc.open_by_handle_at(mount_fd, handle, flags | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"open_by_handle_at: {os.strerror(err)}")
    return fd
