"""The one reader of /proc/self/mountinfo (hsmfs.mounts): octal escapes decoded in mount points,
roots and sources; every field where proc(5) puts it.  The last test makes a real bind mount
whose path holds a space, a tab and a backslash, and always unmounts it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from hsmfs import mounts

LINE = (rb"36 35 98:0 /mnt\040root\134x /mnt/a\040b\011c\012d\134e rw,noatime master:1 - "
        rb"fuse.hsmfs s3://b\040c rw,user_id=0")


def test_parse_a_line_with_every_escape() -> None:
    [m] = mounts.parse_mountinfo(LINE + b"\n")
    assert m.mount_id == 36 and m.parent_id == 35 and m.dev == "98:0"
    assert m.root == "/mnt root\\x"
    assert m.mount_point == "/mnt/a b\tc\nd\\e"
    assert m[4] == m.mount_point  # positional callers (hsmfs.bench.passfs) still work
    assert m.options == "rw,noatime" and m.optional == ("master:1",)
    assert (m.fstype, m.source, m.super_options) == ("fuse.hsmfs", "s3://b c", "rw,user_id=0")


def test_unescape_only_what_the_kernel_escapes() -> None:
    assert mounts.unescape(r"/a\040b") == "/a b"
    assert mounts.unescape(r"/a\0b\101") == r"/a\0b\101"  # not an escape the kernel makes
    assert mounts.unescape(b"/caf\xc3\xa9\\040x") == "/café x"
    assert mounts.unescape(b"/bad\xff") == os.fsdecode(b"/bad\xff")  # round-trips to bytes


def test_no_optional_fields_and_junk_lines() -> None:
    text = b"22 1 8:1 / / rw - ext4 /dev/sda1 rw\nnot a mountinfo line\n"
    [m] = mounts.parse_mountinfo(text)
    assert (m.mount_point, m.optional, m.fstype) == ("/", (), "ext4")


def test_this_process_has_a_root_mount() -> None:
    assert any(m.mount_point == "/" for m in mounts.mountinfo())


def test_bind_mount_with_a_space_in_its_path(tmp_path: Path) -> None:
    src = tmp_path / "src dir"
    dst = tmp_path / "bind target\twith \\ odd chars"
    src.mkdir()
    dst.mkdir()
    (src / "f").write_text("x")
    made = subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True,
                          timeout=10)
    if made.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {made.stderr.decode().strip()}")
    try:
        assert (dst / "f").read_text() == "x"
        assert mounts.is_mounted(str(dst))
        [m] = mounts.mounts_at(str(dst))
        assert m.mount_point == str(dst)
        assert m.root.endswith("/src dir")  # the bound directory, within its filesystem
        assert not mounts.is_fuse_mount(str(dst)) and mounts.fuse_device(str(dst)) is None
        assert mounts.unmount_after(str(dst))
    finally:
        subprocess.run(["umount", str(dst)], capture_output=True, timeout=10)
    assert not mounts.is_mounted(str(dst))
