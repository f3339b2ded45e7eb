"""The FUSE door read-write (issue 11 item 1): unaware programs write through the mount.

Real ``hsmfs mount -f`` (``serve_door("fuse", ...)``), a real moto S3 server, programs as bounded
subprocesses.  After each program: a changed stub is ``dirty`` (``hsmfs state --json``), and the
bytes read back through the mount and in the backing tree equal what the program wrote.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import Bucket, MotoServer, run, seeded, wait_until
from support.doors import serve_door

pytestmark = [pytest.mark.needs_fuse, pytest.mark.timeout(60)]

# Small chunks and no whole-file shortcut: a cold stub stays a stub until a write needs it.
RANGED = ("chunk=64K", "small_file=0", "max_request=256K", "readahead=256K")


def _state(path: Path) -> str:
    out = run([sys.executable, "-m", "hsmfs", "state", "--json", str(path)])
    assert out.returncode == 0, out.stderr
    [row] = json.loads(out.stdout)
    return row["state"]


def _ok(cmd: list[str] | str, **kw: object) -> subprocess.CompletedProcess:
    out = run(cmd if isinstance(cmd, list) else ["sh", "-c", cmd], **kw)  # type: ignore[arg-type]
    assert out.returncode == 0, (cmd, out.stderr)
    return out


def _same_everywhere(mnt: Path, cache: Path, rel: str, want: bytes) -> None:
    """What the program wrote, read back through the mount and in the backing tree."""
    assert (mnt / rel).read_bytes() == want
    assert (cache / rel).read_bytes() == want


def _dirty(mnt: Path, cache: Path, rel: str) -> None:
    assert _state(mnt / rel) == "dirty"
    assert _state(cache / rel) == "dirty"


def test_programs_change_stubs(bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    """``echo >>``, ``dd conv=notrunc``, ``truncate`` grow/shrink, ``cp`` in: right bytes,
    changed stubs dirty, the untouched ones still clean stubs, nothing fetched for a shrink."""
    log = bucket.put("log.txt", seeded(200_000, "log"))
    mid = bucket.put("mid.bin", seeded(5 * 65536 + 100, "mid"))
    grow = bucket.put("grow.bin", seeded(3 * 65536, "grow"))
    shrink = bucket.put("shrink.bin", seeded(8 * 65536, "shrink"))
    bucket.put("quiet.bin", seeded(65536, "quiet"))
    src = tmp_path / "src.bin"
    src.write_bytes(seeded(300_000, "cp"))
    with serve_door("fuse", f"s3://{bucket.name}", tmp_path, moto.endpoint, *RANGED) as d:
        m, c = d.root, d.cache
        _ok(f"echo 'one more line' >> {m / 'log.txt'}")
        _same_everywhere(m, c, "log.txt", log + b"one more line\n")
        _dirty(m, c, "log.txt")

        # dd into the middle of a cold stub: every other byte is S3's
        patch = b"P" * 5000
        (tmp_path / "patch").write_bytes(patch)
        assert _state(m / "mid.bin") == "stub"
        _ok(["dd", f"if={tmp_path / 'patch'}", f"of={m / 'mid.bin'}", "bs=1000", "seek=150",
             "conv=notrunc", "status=none"])
        want = mid[:150_000] + patch + mid[155_000:]
        _same_everywhere(m, c, "mid.bin", want)
        _dirty(m, c, "mid.bin")

        _ok(["truncate", "-s", "+70000", str(m / "grow.bin")])
        _same_everywhere(m, c, "grow.bin", grow + bytes(70000))
        _dirty(m, c, "grow.bin")

        before = d.stats()["fetched_bytes"]
        _ok(["truncate", "-s", "100000", str(m / "shrink.bin")])
        assert d.stats()["fetched_bytes"] == before  # a shrink fetches nothing
        _dirty(m, c, "shrink.bin")
        _same_everywhere(m, c, "shrink.bin", shrink[:100_000])  # holes below it still owed

        _ok(["cp", str(src), str(m / "copied.bin")])
        _same_everywhere(m, c, "copied.bin", src.read_bytes())
        assert _state(m / "copied.bin") == "local"  # no record: the archive uploads it as new
        assert _state(m / "quiet.bin") == "stub"  # opened for nothing: untouched


def test_archives_trees_and_databases(bucket: Bucket, moto: MotoServer,
                                      tmp_path: Path) -> None:
    """``tar -x``, ``rsync -a``, ``sqlite3`` with its journal, ``mkdir -p``/``mv``/``rmdir``."""
    bucket.put("keep/a.txt", b"remote a\n")
    tree = tmp_path / "tree"
    (tree / "sub/deeper").mkdir(parents=True)
    files = {"top.txt": b"top\n", "sub/x.bin": seeded(70_000, "x"),
             "sub/deeper/y.txt": b"y" * 10, "exec.sh": b"#!/bin/sh\necho hi\n"}
    for rel, data in files.items():
        (tree / rel).write_bytes(data)
    os.chmod(tree / "exec.sh", 0o751)
    os.utime(tree / "top.txt", (1_600_000_000, 1_600_000_000))
    archive = tmp_path / "t.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(tree, arcname="tree")
    with serve_door("fuse", f"s3://{bucket.name}", tmp_path, moto.endpoint, *RANGED) as d:
        m, c = d.root, d.cache
        _ok(["tar", "-xf", str(archive), "-C", str(m)])
        _ok(["rsync", "-a", f"{tree}/", str(m / "synced")])
        for base in ("tree", "synced"):
            for rel, data in files.items():
                _same_everywhere(m, c, f"{base}/{rel}", data)
            assert os.stat(m / base / "exec.sh").st_mode & 0o777 == 0o751
            assert os.stat(m / base / "top.txt").st_mtime == 1_600_000_000
        assert _ok(["sh", str(m / "synced/exec.sh")]).stdout == b"hi\n"

        db = m / "db/test.sqlite"
        _ok(["mkdir", "-p", str(m / "db")])
        for sql in ("PRAGMA journal_mode=DELETE; CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT);",
                    "INSERT INTO t(v) SELECT hex(randomblob(500)) FROM "
                    "(WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM r WHERE i<400)"
                    " SELECT i FROM r);",
                    "BEGIN; UPDATE t SET v='changed' WHERE k % 7 = 0; DELETE FROM t WHERE k>390;"
                    " COMMIT;"):
            _ok(["sqlite3", str(db), sql])
        out = _ok(["sqlite3", str(db), "SELECT count(*), sum(v='changed') FROM t; "
                   "PRAGMA integrity_check;"]).stdout
        assert out.split() == [b"390|55", b"ok"]
        assert (c / "db/test.sqlite").read_bytes() == db.read_bytes()
        assert not (m / "db/test.sqlite-journal").exists()
        wal = m / "db/wal.sqlite"  # WAL: the -shm file is a shared, writable mmap
        _ok(["sqlite3", str(wal), "PRAGMA journal_mode=WAL; CREATE TABLE t(v); "
             "INSERT INTO t VALUES (1), (2), (3); UPDATE t SET v = v * 10;"])
        assert _ok(["sqlite3", str(wal), "SELECT sum(v) FROM t;"]).stdout == b"60\n"

        _ok(["mkdir", "-p", str(m / "a/b/c")])
        _ok(["mv", str(m / "tree"), str(m / "a/b/c/moved")])  # a directory, with its files
        _ok(["mv", str(m / "keep/a.txt"), str(m / "a/renamed.txt")])  # a stub
        assert (m / "a/b/c/moved/sub/x.bin").read_bytes() == files["sub/x.bin"]
        # the kernel's cached dentries below the moved directory name inodes whose paths the
        # door must have moved too: a setattr by inode finds the file at its new path
        os.chmod(m / "a/b/c/moved/sub/deeper", 0o700)  # a directory: no fd, by its path
        assert os.stat(c / "a/b/c/moved/sub/deeper").st_mode & 0o777 == 0o700
        _same_everywhere(m, c, "a/renamed.txt", b"remote a\n")  # fetched after its rename
        assert not (m / "tree").exists() and not (m / "keep/a.txt").exists()
        _ok(["rmdir", str(m / "keep")])
        _ok(["rm", "-r", str(m / "a/b")])
        assert sorted(os.listdir(m / "a")) == ["renamed.txt"]
        with pytest.raises(OSError) as err:
            os.rmdir(m / "a")
        assert err.value.errno == errno.ENOTEMPTY


def test_editor_save_links_names_and_state_dir(bucket: Bucket, moto: MotoServer,
                                               tmp_path: Path) -> None:
    """Write a temp file, fsync, rename it over a stub; ``ln`` gets EPERM; a name over 255
    bytes ENAMETOOLONG; the state dir stays hidden and unwritable; symlinks, modes, owners."""
    bucket.put("notes.txt", b"old text\n")
    with serve_door("fuse", f"s3://{bucket.name}", tmp_path, moto.endpoint, *RANGED) as d:
        m, c = d.root, d.cache
        with open(m / "notes.txt", "rb") as held:  # a program still holding the old file
            tmp = m / ".notes.txt.swp"
            with open(tmp, "wb") as f:
                f.write(b"new text\n")
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, m / "notes.txt")
            assert held.read() == b"old text\n"
            assert os.fstat(held.fileno()).st_size == 9
        _same_everywhere(m, c, "notes.txt", b"new text\n")
        assert _state(m / "notes.txt") == "local"  # a new file: the stub was replaced
        assert "user.hsm.key" not in os.listxattr(m / "notes.txt")

        fd = os.open(m / "scratch", os.O_RDWR | os.O_CREAT, 0o644)  # the tmpfile pattern
        try:
            os.unlink(m / "scratch")
            os.write(fd, b"0123456789")
            os.ftruncate(fd, 4)
            assert os.fstat(fd).st_size == 4 and os.pread(fd, 10, 0) == b"0123"
        finally:
            os.close(fd)

        out = run(["ln", str(m / "notes.txt"), str(m / "hard")])
        assert out.returncode != 0 and b"not permitted" in out.stderr
        assert d.log().count("hard link to") == 1
        with pytest.raises(OSError) as err:
            (m / ("n" * 256)).write_bytes(b"x")
        assert err.value.errno == errno.ENAMETOOLONG
        (m / ("n" * 255)).write_bytes(b"x")

        for attempt in (lambda: os.mkdir(m / ".hsmfs"), lambda: (m / ".hsmfs").write_bytes(b""),
                        lambda: os.rename(m / "notes.txt", m / ".hsmfs"),
                        lambda: os.symlink("x", m / ".hsmfs")):
            with pytest.raises(OSError) as err:
                attempt()
            assert err.value.errno == errno.EPERM
        assert ".hsmfs" not in os.listdir(m) and (c / ".hsmfs").is_dir()

        os.symlink("notes.txt", m / "link")
        assert os.readlink(m / "link") == "notes.txt"
        assert (m / "link").read_bytes() == b"new text\n"
        os.chmod(m / "notes.txt", 0o600)
        os.chown(m / "notes.txt", 1234, 5678)
        os.utime(m / "notes.txt", ns=(1_000_000_000, 2_000_000_000))
        st = os.stat(c / "notes.txt")
        assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o600, 1234, 5678)
        assert st.st_mtime_ns == 2_000_000_000 == os.stat(m / "notes.txt").st_mtime_ns
        old = os.umask(0o027)
        try:
            (m / "made.txt").write_bytes(b"m")
            os.mkdir(m / "made.d", 0o777)
        finally:
            os.umask(old)
        assert os.stat(c / "made.txt").st_mode & 0o777 == 0o640
        assert os.stat(c / "made.d").st_mode & 0o777 == 0o750
        sv = os.statvfs(m)
        assert sv.f_namemax == 255 and sv.f_bavail > 0


def test_read_only_mount_refuses_writes(bucket: Bucket, moto: MotoServer,
                                        tmp_path: Path) -> None:
    data = bucket.put("f.bin", seeded(1000, "ro"))
    with serve_door("fuse", f"s3://{bucket.name}", tmp_path, moto.endpoint, "ro") as d:
        m = d.root
        assert (m / "f.bin").read_bytes() == data
        for attempt in (lambda: open(m / "f.bin", "r+b"),  # noqa: SIM115
                        lambda: (m / "new").write_bytes(b"x"),
                        lambda: os.mkdir(m / "d"), lambda: os.unlink(m / "f.bin"),
                        lambda: os.truncate(m / "f.bin", 0)):
            with pytest.raises(OSError) as err:
                attempt()
            assert err.value.errno == errno.EROFS
        assert _state(m / "f.bin") == "resident"


def test_sigkill_after_a_write_leaves_the_stub_dirty(bucket: Bucket, moto: MotoServer,
                                                      tmp_path: Path) -> None:
    data = bucket.put("big.bin", seeded(6 * 65536, "kill"))
    with serve_door("fuse", f"s3://{bucket.name}", tmp_path, moto.endpoint, *RANGED) as d:
        fd = os.open(d.root / "big.bin", os.O_RDWR)
        try:
            assert os.pwrite(fd, b"CHANGED", 200_000) == 7
            os.kill(d.proc.pid, signal.SIGKILL)
        finally:
            with contextlib.suppress(OSError):  # the mount is dead: its flush fails
                os.close(fd)
        wait_until(lambda: d.proc.poll() is not None, 10, "daemon dead")
    want = data[:200_000] + b"CHANGED" + data[200_007:]
    with serve_door("fuse", f"s3://{bucket.name}", tmp_path / "again", moto.endpoint,
                    *RANGED, f"cache={tmp_path / 'cache'}") as d:
        assert _state(d.root / "big.bin") == "dirty"
        assert (d.root / "big.bin").read_bytes() == want
        assert (tmp_path / "cache/big.bin").read_bytes() == want


def test_cache_disk_full_is_enospc(bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    """A full cache disk: the program gets ENOSPC, the stub it could not change stays clean."""
    bucket.put("s.bin", seeded(65536, "full"))
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs")
    try:
        with serve_door("fuse", f"s3://{bucket.name}", tmp_path / "w", moto.endpoint,
                        *RANGED, f"cache={disk / 'cache'}") as d:
            m = d.root
            with pytest.raises(OSError) as err:
                (m / "fill.bin").write_bytes(bytes(4 << 20))
            assert err.value.errno == errno.ENOSPC
            fd = os.open(m / "s.bin", os.O_WRONLY | os.O_APPEND)
            try:
                with pytest.raises(OSError) as err:
                    os.write(fd, b"more")  # the stub's bytes cannot be made local
                assert err.value.errno == errno.ENOSPC
            finally:
                os.close(fd)
            assert _state(m / "s.bin") in ("stub", "partial")  # clean: nothing recorded
            os.unlink(m / "fill.bin")
            _ok(f"printf more >> {m / 's.bin'}")
            assert _state(m / "s.bin") == "dirty"
            assert (m / "s.bin").read_bytes() == seeded(65536, "full") + b"more"
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
