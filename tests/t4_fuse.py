"""The FUSE door's own surface: mount(8) and fstab-style mounting, ``-o ro`` semantics, state
xattrs, ``hsmfs state``, and failing closed when the daemon is killed."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    Bucket,
    MotoServer,
    file_sha256,
    force_unmount,
    is_mounted,
    run,
    seeded,
    sha256,
    wait_until,
)
from support.doors import serve_door

pytestmark = [pytest.mark.needs_fuse, pytest.mark.timeout(120)]


def _daemon_pid(cache: Path) -> int:
    return int((cache / ".hsmfs" / "daemon.pid").read_text())


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_mount_command_and_umount(bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    """``mount -t fuse.hsmfs`` returns once serving; ``umount`` stops the daemon cleanly."""
    data = bucket.put("p/x/data.bin", seeded(300_000, "m"))
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    opts = f"cache={cache},endpoint={moto.endpoint},nodev,nosuid,_netdev"
    try:
        out = run(["mount", "-t", "fuse.hsmfs", f"s3://{bucket.name}/p", str(mnt), "-o", opts],
                  env={**os.environ})
        assert out.returncode == 0, out
        assert is_mounted(mnt)
        pid = _daemon_pid(cache)
        assert file_sha256(mnt / "x/data.bin") == sha256(data)
        assert run(["umount", str(mnt)]).returncode == 0
        wait_until(lambda: _gone(pid), 20, "daemon exit after umount")
        assert not (cache / ".hsmfs" / "daemon.pid").exists()
    finally:
        force_unmount(mnt)


def test_background_mount_and_hsmfs_stop(bucket: Bucket, moto: MotoServer,
                                         tmp_path: Path) -> None:
    bucket.put("f", b"payload")
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    try:
        out = run([sys.executable, "-m", "hsmfs", "mount", f"s3://{bucket.name}", str(mnt), "-o",
                   f"cache={cache},endpoint={moto.endpoint}"])
        assert out.returncode == 0, out
        assert b"1 objects" in out.stderr
        assert (mnt / "f").read_bytes() == b"payload"
        pid = _daemon_pid(cache)
        assert run([sys.executable, "-m", "hsmfs", "stop", str(mnt)]).returncode == 0
        wait_until(lambda: _gone(pid), 20, "daemon exit after hsmfs stop")
        assert not is_mounted(mnt)
    finally:
        force_unmount(mnt)


def test_bad_source_fails_with_a_clear_message(moto: MotoServer, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = run([sys.executable, "-m", "hsmfs", "mount", "s3://no-such-bucket", str(mnt), "-o",
               f"cache={tmp_path / 'c'},endpoint={moto.endpoint}"])
    assert out.returncode == 1
    assert b"NoSuchBucket" in out.stderr or b"gone" in out.stderr
    assert not is_mounted(mnt)
    out = run([sys.executable, "-m", "hsmfs", "mount", "s3://b", str(mnt), "-o", "bogus=1"])
    assert out.returncode == 2 and b"unknown option 'bogus'" in out.stderr


def test_read_only_hidden_state_and_xattrs(bucket: Bucket, moto: MotoServer,
                                           tmp_path: Path) -> None:
    data = bucket.put("dir/obj.bin", seeded(5 * 65536, "x"))
    # -o ro: read-only on request (the default is read-write: tests/t4_fuse_write.py)
    with serve_door("fuse", f"s3://{bucket.name}", tmp_path, moto.endpoint, "chunk=64K",
                    "small_file=0", "readahead=64K", "ro") as d:
        path = d.root / "dir/obj.bin"
        assert os.listdir(d.root) == ["dir"]  # .hsmfs is hidden
        assert not (d.root / ".hsmfs").exists()
        with pytest.raises(OSError) as err:
            open(path, "r+b")  # noqa: SIM115
        assert err.value.errno == errno.EROFS
        with pytest.raises(OSError) as err:
            (d.root / "new").write_bytes(b"x")
        assert err.value.errno == errno.EROFS
        assert os.getxattr(path, "user.hsm.state") == b"stub"
        assert os.getxattr(path, "user.hsm.key") == b"dir/obj.bin"
        assert os.getxattr(path, "user.hsm.remote_size") == str(len(data)).encode()
        assert "user.hsm.etag" in os.listxattr(path)
        assert not [n for n in os.listxattr(path) if n.startswith("trusted.")]
        with open(path, "rb") as f:
            assert os.pread(f.fileno(), 10, 65536 * 2) == data[65536 * 2:65536 * 2 + 10]
        assert os.getxattr(path, "user.hsm.state") == b"partial"
        out = run([sys.executable, "-m", "hsmfs", "state", "--json", str(path)])
        [row] = json.loads(out.stdout)
        assert row["state"] == "partial" and 0 < row["resident_bytes"] < len(data)
        assert row["path"] == str(path) and row["size"] == len(data)
        assert file_sha256(path) == sha256(data)
        assert os.getxattr(path, "user.hsm.state") == b"resident"
        [row] = json.loads(run([sys.executable, "-m", "hsmfs", "state", "--json",
                                str(path)]).stdout)
        assert row["state"] == "resident" and row["resident_bytes"] == len(data)
        # the backing file says the same, without a daemon round trip
        [row] = json.loads(run([sys.executable, "-m", "hsmfs", "state", "--json",
                                str(d.cache / "dir/obj.bin")]).stdout)
        assert row["state"] == "resident"


def test_killed_daemon_fails_closed_and_remounts(bucket: Bucket, moto: MotoServer,
                                                tmp_path: Path) -> None:
    data = bucket.put("big.bin", seeded(4 * 65536, "k"))
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    opts = f"cache={cache},endpoint={moto.endpoint},chunk=64K,small_file=0"
    try:
        assert run([sys.executable, "-m", "hsmfs", "mount", f"s3://{bucket.name}", str(mnt),
                    "-o", opts]).returncode == 0
        os.kill(_daemon_pid(cache), signal.SIGKILL)
        time.sleep(0.2)
        with pytest.raises(OSError) as err:
            (mnt / "big.bin").read_bytes()
        assert err.value.errno == errno.ENOTCONN  # never zeros
        # a new mount over the dead one clears it and serves again
        out = run([sys.executable, "-m", "hsmfs", "mount", f"s3://{bucket.name}", str(mnt),
                   "-o", opts])
        assert out.returncode == 0, out
        assert file_sha256(mnt / "big.bin") == sha256(data)
        subprocess.run(["umount", str(mnt)], timeout=10)
    finally:
        force_unmount(mnt)
