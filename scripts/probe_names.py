#!/usr/bin/env python3
"""What a FAN_REPORT_DFID_NAME_TARGET notification group reports of a program's namespace changes.

The facts behind hsmfs.names (docs/KERNEL_FACTS_3.md §4).  Run as root on a directory of `/`
(ext4): the kernel door's per-stub inode-mark layout, where the pre-content group never sees a
file it did not make.  It marks one directory of a tree with DIR_MASK (hsmfs.names), then runs
each operation in a separate process (``sh``) and prints what arrived:

  create + write + close; rename within the tree; unlink; mkdir; rename a directory out of the
  tree and one back in; a file moved in from outside; an open of an existing file (FAN_OPEN,
  eviction's recency); open_by_handle_at through an O_PATH fd (EBADF) vs an O_RDONLY one.

Usage:  python3 scripts/probe_names.py
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from hsmfs.fanotify import FAN_MARK_ADD, fanotify_mark_fd, open_private_tree
from hsmfs.names import DIR_MASK, NameWatcher, parse

BASE = "/tmp/probe_names"
FAN_OPEN = 0x20
NAMES = {0x8: "CLOSE_WRITE", 0x20: "OPEN", 0x100: "CREATE", 0x200: "DELETE",
         0x1000_0000: "RENAME", 0x4000_0000: "ONDIR"}


def _mask(mask: int) -> str:
    return "|".join(n for bit, n in NAMES.items() if mask & bit) or hex(mask)


class _Cache:
    """What NameWatcher reads of a cache: nothing is registered, writeback is off."""

    class cfg:
        writeback_s = 0.0


def main() -> None:
    shutil.rmtree(BASE, ignore_errors=True)
    os.makedirs(f"{BASE}/tree/d")
    os.makedirs(f"{BASE}/outside")
    with open(f"{BASE}/tree/d/existing", "w") as f:
        f.write("x")
    root = open_private_tree(f"{BASE}/tree")
    try:
        w = NameWatcher(_Cache(), f"{BASE}/tree", root, filesystem_mark=False)  # type: ignore
        d = os.open(f"{BASE}/tree/d", os.O_RDONLY)
        fanotify_mark_fd(w.fan_fd, FAN_MARK_ADD, DIR_MASK | FAN_OPEN, d)
        os.close(d)
        libc = ctypes.CDLL(None, use_errno=True)
        handle = bytearray(8 + 128)
        handle[0:4] = (128).to_bytes(4, "little")
        mount_id = ctypes.c_int()
        buf = (ctypes.c_char * len(handle)).from_buffer(handle)
        libc.name_to_handle_at(root, b"d", buf, ctypes.byref(mount_id), 0)
        rc = libc.open_by_handle_at(root, buf, os.O_PATH)
        print(f"open_by_handle_at(O_PATH mount fd): {rc} errno {ctypes.get_errno()}"
              " (9 = EBADF: an O_PATH fd is refused as mount_fd)")
        rc = libc.open_by_handle_at(w.mount_fd, buf, os.O_PATH)
        print(f"open_by_handle_at(O_RDONLY mount fd): fd {rc} -> "
              f"{os.readlink(f'/proc/self/fd/{rc}')!r} (a path within the detached mount)")
        os.close(rc)
        steps = [
            ("create, write, close", "echo a > d/f1"),
            ("rename within the tree", "mv d/f1 d/f2"),
            ("unlink", "rm d/f2"),
            ("mkdir", "mkdir d/sub"),
            ("directory moved out", f"mv d/sub {BASE}/outside/sub"),
            ("file moved in from outside", f"echo b > {BASE}/outside/g && mv {BASE}/outside/g d/g"),
            ("open of an existing file (read)", "cat d/existing > /dev/null"),
        ]
        for what, script in steps:
            subprocess.run(["sh", "-c", script], cwd=f"{BASE}/tree", check=True, timeout=10)
            time.sleep(0.05)
            try:
                data = os.read(w.fan_fd, 65536)
            except BlockingIOError:
                data = b""
            print(f"\n{what}: {script}")
            for e in parse(data):
                print(f"  {_mask(e.mask):24} pid {e.pid:7} target {e.target} "
                      f"name={w._rel(e.name)!r} old={w._rel(e.old)!r} new={w._rel(e.new)!r}")
        w.close()
    finally:
        os.close(root)
        shutil.rmtree(BASE, ignore_errors=True)


if __name__ == "__main__":
    main()
