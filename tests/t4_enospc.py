"""Issue 13, item 2: the local disk fills while populating, through both doors.

The cache is the root of a small (48 MiB) ext4 image, loop-mounted.  Two files are made
resident, the rest of the disk is taken by a local file, and a program reads a stub bigger
than what is left.  What must hold:

* the reader gets ENOSPC (``errors.CacheFull``: FUSE reply / ``FAN_DENY_ERRNO``), never a hole;
* nothing half-written counts as resident: the file's data extents on disk are exactly the
  bytes the daemon claims (a part-written flight is punched back), and its mtime is still its
  version's (a moved mtime makes the next start record the file dirty);
* the daemon neither dies nor wedges, other resident files keep reading right, and
  ``user.hsm.error`` says ``cache_full``/``ENOSPC`` through the door;
* service resumes by itself once space is freed: after ``hsmfs release`` of another file, and
  after a local file is deleted, the same read returns S3's bytes (no restart).

Reads run in subprocesses under ``timeout -s KILL`` (a read blocked in FUSE or fanotify cannot be
woken in-process); the image is unmounted and detached, the daemon stopped by PID, whatever
happens.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Bucket, MotoServer, run, seeded, sha256
from support.doors import DOORS, Served, serve_door

pytestmark = [pytest.mark.timeout(240)]

MiB = 1 << 20
IMAGE = "48M"
LEFT = 3 * MiB  # free bytes left when the disk is "full": less than one stub to read

# A sequential reader in its own process: prints what it got, or the errno that stopped it.
READER = r"""
import hashlib, json, os, sys
h, n = hashlib.sha256(), 0
try:
    fd = os.open(sys.argv[1], os.O_RDONLY)
    try:
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk); n += len(chunk)
    finally:
        os.close(fd)
    print(json.dumps({"ok": True, "sha": h.hexdigest(), "bytes": n}))
except OSError as exc:
    print(json.dumps({"ok": False, "errno": exc.errno, "bytes": n}))
"""


def read_file(path: Path, timeout: int = 60) -> dict:
    out = subprocess.run(["timeout", "-s", "KILL", str(timeout), sys.executable, "-c", READER,
                          str(path)], capture_output=True, text=True, timeout=timeout + 10)
    assert out.returncode == 0, f"reader of {path} died ({out.returncode}): {out.stderr}"
    return json.loads(out.stdout)


def hsmfs(*args: str, timeout: int = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hsmfs", *args], capture_output=True,
                          text=True, timeout=timeout)


def state_of(path: Path) -> dict:
    out = hsmfs("state", "--json", str(path))
    assert out.returncode == 0, out.stderr
    [row] = json.loads(out.stdout)
    return row


def error_view(path: Path) -> str | None:
    try:
        return os.getxattr(path, "user.hsm.error").decode()
    except OSError as exc:
        assert exc.errno == errno.ENODATA, exc
        return None


@contextlib.contextmanager
def small_ext4(tmp_path: Path) -> Iterator[Path]:
    """A fresh 48 MiB ext4 (4 KiB blocks, 256-byte inodes, no root reserve) loop-mounted at
    ``tmp_path/w/cache``; yields the workdir.  Unmounted (lazily if it must be), detached and
    deleted whatever happens."""
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 missing (apt-get install e2fsprogs)")
    workdir = tmp_path / "w"
    cache = workdir / "cache"
    cache.mkdir(parents=True)
    image = tmp_path / "ext4.img"
    run(["truncate", "-s", IMAGE, str(image)], check=True)
    try:
        run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-I", "256", "-m", "0", str(image)],
            timeout=60, check=True)
        run(["mount", "-o", "loop", str(image), str(cache)], check=True)
        yield workdir
    finally:
        from hsmfs.cover import uncover
        from hsmfs.mounts import is_mounted

        with contextlib.suppress(OSError):
            uncover(cache)  # a kernel-door stop covers the cache dir: that mount goes first
        if is_mounted(os.path.realpath(cache)) and run(["umount", str(cache)]).returncode:
            run(["umount", "-l", str(cache)])
        for line in run(["losetup", "-j", str(image)]).stdout.decode().splitlines():
            run(["losetup", "-d", line.split(":", 1)[0]])
        with contextlib.suppress(OSError):
            image.unlink()


def fill_disk(cache: Path, name: str, leave: int) -> Path:
    """A local file taking all but ``leave`` bytes of the cache's filesystem (written on the
    filesystem itself, beside the tree: a file with no record, like any user's)."""
    st = os.statvfs(cache)
    free = st.f_bavail * st.f_frsize
    assert free > leave + MiB, f"only {free} bytes free"
    filler = cache / name
    run(["fallocate", "-l", str(free - leave), str(filler)], check=True)
    return filler


def extents_bytes(backing: Path, end: int) -> int:
    """Data bytes of a backing file by SEEK_DATA/SEEK_HOLE (no read, so no fill)."""
    from hsmfs.stubfile import data_extents

    fd = os.open(backing, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return sum(b - a for a, b in data_extents(fd, end))
    finally:
        os.close(fd)


def assert_nothing_half_written(d: Served, name: str, size: int) -> None:
    """What the disk says is resident is what the daemon claims, and the mtime is the
    version's: a part-written flight left no data extent and no moved mtime behind."""
    path = d.root / name
    row = state_of(path)
    assert row["state"] in ("stub", "partial"), row
    claimed = row["resident_bytes"]  # exact: the daemon's range map
    assert isinstance(claimed, int) and claimed < size, row
    on_disk = extents_bytes(d.cache / name, size)
    assert on_disk == claimed, (
        f"{name}: {on_disk} bytes of data extents on disk but the daemon claims {claimed}: "
        "a part-written flight left data behind that a start would count as resident")
    mtime = float(os.getxattr(d.cache / name, "trusted.hsmfs.mtime"))  # the version's
    assert abs(os.stat(d.cache / name).st_mtime - mtime) < 1e-3, "a failed fill moved the mtime"


@pytest.mark.parametrize("door", DOORS)
def test_cache_full_while_populating(door: str, bucket: Bucket, moto: MotoServer,
                                     tmp_path: Path) -> None:
    keep = bucket.put("keep.bin", seeded(2 * MiB + 11, "keep"))
    victim = bucket.put("victim.bin", seeded(12 * MiB, "victim"))
    big = bucket.put("big.bin", seeded(8 * MiB + 5, "big"))
    big2 = bucket.put("big2.bin", seeded(8 * MiB + 7, "big2"))
    big3 = bucket.put("big3.bin", seeded(8 * MiB + 3, "big3"))
    with small_ext4(tmp_path) as w:
        with serve_door(door, f"s3://{bucket.name}", w, moto.endpoint, "open_fill=off") as d:
            for name, data in (("keep.bin", keep), ("victim.bin", victim)):
                got = read_file(d.root / name)
                assert got == {"ok": True, "sha": sha256(data), "bytes": len(data)}, (name, got)
                assert state_of(d.root / name)["state"] == "resident"
            filler = fill_disk(d.cache, "filler.bin", LEFT)

            # 1. The disk fills during the read: ENOSPC, not a hole, not a hang.
            got = read_file(d.root / "big.bin")
            assert got["ok"] is False and got["errno"] == errno.ENOSPC, got
            assert d.proc.poll() is None, d.log()
            assert_nothing_half_written(d, "big.bin", len(big))
            view = error_view(d.root / "big.bin")
            assert view is not None and "cause=cache_full" in view and "errno=ENOSPC" in view, view
            stats = d.stats()
            assert stats["errors"].get("cache_full", 0) >= 1, stats["errors"]
            if door == "kernel":  # answered FAN_DENY_ERRNO(ENOSPC), and nothing else
                assert set(stats["kernel"]["denied"]) == {"ENOSPC"}, stats["kernel"]["denied"]
            # Resident files keep reading while the disk is full.
            assert read_file(d.root / "keep.bin")["sha"] == sha256(keep)
            # Again: still ENOSPC (nothing wedged), still nothing claimed.
            got = read_file(d.root / "big.bin")
            assert got["ok"] is False and got["errno"] == errno.ENOSPC, got
            assert_nothing_half_written(d, "big.bin", len(big))

            # 2. Space freed by `hsmfs release` of another file: the same read succeeds.
            out = hsmfs("release", str(d.root / "victim.bin"))
            assert out.returncode == 0, out.stdout + out.stderr
            got = read_file(d.root / "big.bin")
            assert got == {"ok": True, "sha": sha256(big), "bytes": len(big)}, got
            assert state_of(d.root / "big.bin")["state"] == "resident"
            assert error_view(d.root / "big.bin") is None  # resident: the failure is over

            # 3. Full again; space freed by deleting a local file: the same read succeeds.
            got = read_file(d.root / "big2.bin")
            assert got["ok"] is False and got["errno"] == errno.ENOSPC, got
            assert_nothing_half_written(d, "big2.bin", len(big2))
            filler.unlink()
            got = read_file(d.root / "big2.bin")
            assert got == {"ok": True, "sha": sha256(big2), "bytes": len(big2)}, got

            # Every file reads S3's bytes; the released one is fetched again.
            for name, data in (("keep.bin", keep), ("victim.bin", victim), ("big.bin", big)):
                assert read_file(d.root / name)["sha"] == sha256(data), name
            assert d.proc.poll() is None, d.log()

            # 4. Full again, and the daemon stops after the failure: the start that follows
            # finds what the failed fill left (the extents, the mtime), which must be a clean
            # partial copy, not a dirty one and not more resident than was written.
            filler = fill_disk(d.cache, "filler2.bin", LEFT)
            got = read_file(d.root / "big3.bin")
            assert got["ok"] is False and got["errno"] == errno.ENOSPC, got
            assert_nothing_half_written(d, "big3.bin", len(big3))
            before = error_view(d.cache / "big3.bin")
        # The kernel door's stop covers the cache dir; a start under a cover reaches the tree
        # through a helper run with ``python -I``, which imports the *installed* hsmfs (none,
        # or another tree's, when this runs from a worktree).  The cover is not what this
        # test is about: lift it first.
        from hsmfs.cover import uncover

        with contextlib.suppress(OSError):
            uncover(w / "cache")
        with serve_door(door, f"s3://{bucket.name}", w, moto.endpoint, "open_fill=off") as d:
            assert_nothing_half_written(d, "big3.bin", len(big3))  # adopted: clean, not dirty
            # user.hsm.error is history with its time: it survives the restart unchanged.
            assert before is not None and error_view(d.root / "big3.bin") == before
            filler.unlink()
            got = read_file(d.root / "big3.bin")
            assert got == {"ok": True, "sha": sha256(big3), "bytes": len(big3)}, got
            assert error_view(d.root / "big3.bin") is None
