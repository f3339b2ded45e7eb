"""KERNEL_FACTS_3 §5: can an inode be reopened O_RDWR by file handle once it is renamed, and
once it is unlinked while still open?  Run as root (CAP_DAC_READ_SEARCH) on the filesystem to
test: ``python3 scripts/probe_handles.py [DIR]`` (default: a fresh directory in /var/tmp)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from hsmfs.handles import handle_of, open_handle


def main() -> int:
    base = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(dir="/var/tmp")
    try:
        path = os.path.join(base, "f")
        with open(path, "wb") as f:
            f.write(b"x" * 100)
        fd = os.open(path, os.O_RDONLY)
        handle = handle_of(fd)
        root = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        os.rename(path, path + ".renamed")
        for what in ("renamed", "unlinked while open"):
            if what != "renamed":
                os.unlink(path + ".renamed")
            try:
                got = open_handle(root, handle, os.O_RDWR)
                same = os.fstat(got).st_ino == os.fstat(fd).st_ino
                print(f"{what}: open_by_handle_at O_RDWR -> fd, same inode: {same}")
                os.close(got)
            except OSError as exc:
                print(f"{what}: open_by_handle_at O_RDWR -> {exc}")
        try:
            open_handle(os.open(base, os.O_PATH), handle, os.O_RDONLY)
            print("O_PATH mount fd: accepted")
        except OSError as exc:
            print(f"O_PATH mount fd: {exc}")
        os.close(fd)
        return 0
    finally:
        if len(sys.argv) <= 1:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
