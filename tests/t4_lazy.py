"""``-o lazy`` (issue 12, item 4): the FUSE door lists S3 one directory at a time.

Real parts only: a moto S3 server over loopback HTTP, ``hsmfs mount -f ... -o lazy`` as a
subprocess (tests/support/doors.py), ``ls``/``cat`` as processes.  Every byte read is compared
with the bytes S3 holds (or the local bytes a local file holds).  S3 requests are counted by the
daemon's own stats (``s3_requests_by``: ``list``) and, where it matters, by a proxy in front of
moto.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import Bucket, MotoServer, run
from support.doors import serve_door

pytestmark = [pytest.mark.needs_fuse, pytest.mark.timeout(300)]

LISTED = "trusted.hsmfs.listed"


def blob(n: int, seed: str) -> bytes:
    return random.Random(seed).randbytes(n)


def hsmfs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hsmfs", *args], capture_output=True,
                          text=True, timeout=timeout)


def cat(path: Path) -> bytes:
    out = run(["cat", str(path)], timeout=30)
    assert out.returncode == 0, f"cat {path}: {out.stderr.decode()}"
    return out.stdout


def ls(path: Path) -> list[str]:
    out = run(["ls", "-a", str(path)], timeout=30)
    assert out.returncode == 0, f"ls {path}: {out.stderr.decode()}"
    return sorted(n for n in out.stdout.decode().split("\n") if n and n not in (".", ".."))


def lists(stats: dict) -> int:
    """ListObjectsV2 requests the daemon sent so far."""
    return sum(stats.get("s3_requests_by", {}).get("list", {}).values())


def fill(bucket: Bucket, dirs: int, per_dir: int) -> dict[str, bytes]:
    """``dirs`` directories of ``per_dir`` small objects each (and a deep path), in parallel."""
    keys = [f"d{i:03d}/f{j:02d}.bin" for i in range(dirs) for j in range(per_dir)]
    keys += ["deep/a/b/c/leaf.bin", "deep/a/b/c/leaf2.txt", "deep/a/side.bin", "top.txt"]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: bucket.put(k, blob(100 + len(k) * 37, k)), keys))
    return dict(bucket.objects)


def lazy_mount(bucket: Bucket, endpoint: str, workdir: Path, *opts: str):
    return serve_door("fuse", f"s3://{bucket.name}", workdir, endpoint, "lazy", *opts)


def test_mount_lists_nothing_and_ls_lists_only_the_way(bucket: Bucket, moto: MotoServer,
                                                       tmp_path: Path) -> None:
    """2,000 objects in 200 directories: the mount sends no LIST; ``ls`` of a deep path lists
    the directories on the way and nothing else; concurrent lookups of one unlisted directory
    list it once; every read gives S3's bytes."""
    objects = fill(bucket, 200, 10)
    with lazy_mount(bucket, moto.endpoint, tmp_path) as d:
        st = d.stats()
        assert lists(st) == 0, st.get("s3_requests_by")
        assert "lazy: adopting" in d.log() and "lazy: listed" not in d.log()
        # Nothing of the bucket in the backing tree yet.
        assert sorted(os.listdir(d.cache)) == [".hsmfs"]

        assert ls(d.root / "deep/a/b/c") == ["leaf.bin", "leaf2.txt"]
        st = d.stats()
        # root, deep, deep/a, deep/a/b, deep/a/b/c: one LIST each (no page is full).
        assert lists(st) == 5 and st["lazy"]["dirs_listed"] == 5, st["lazy"]
        # The root's listing made the 200 directories, none of their files.
        assert len([n for n in os.listdir(d.cache) if n.startswith("d0") or n.startswith("d1")]) \
            == 200
        assert os.listdir(d.cache / "d123") == []
        assert sorted(os.listdir(d.cache / "deep/a")) == ["b", "side.bin"]
        for rel in ("deep/a/b/c/leaf.bin", "deep/a/b/c/leaf2.txt", "deep/a/side.bin", "top.txt"):
            assert cat(d.root / rel) == objects[rel], rel
        for p in ("", "deep", "deep/a", "deep/a/b", "deep/a/b/c"):
            assert os.getxattr(d.cache / p, LISTED) if p else os.getxattr(d.cache, LISTED)
        assert lists(d.stats()) == 5  # listed directories are never listed again

        # Eight programs look into one unlisted directory at once: one LIST.
        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda _: ls(d.root / "d042"), range(8)))
        assert all(o == [f"f{j:02d}.bin" for j in range(10)] for o in outs), outs
        assert lists(d.stats()) == 6
        for j in range(10):
            rel = f"d042/f{j:02d}.bin"
            assert cat(d.root / rel) == objects[rel], rel
        # A lookup by name (stat, no readdir) lists its directory too.
        rel = "d077/f03.bin"
        assert (d.root / rel).stat().st_size == len(objects[rel])
        assert cat(d.root / rel) == objects[rel]
        assert lists(d.stats()) == 7
        assert not os.listdir(d.cache / "d078")


def test_restart_adopts_without_listing(bucket: Bucket, moto: MotoServer,
                                        tmp_path: Path) -> None:
    """A restart lists nothing at start, nor in directories an earlier run listed; their files
    are the same inodes with their resident bytes."""
    objects = fill(bucket, 20, 5)
    with lazy_mount(bucket, moto.endpoint, tmp_path) as d:
        assert cat(d.root / "d003/f01.bin") == objects["d003/f01.bin"]
        before = {n: (d.cache / "d003" / n).stat().st_ino for n in os.listdir(d.cache / "d003")}
        assert lists(d.stats()) == 2
    with lazy_mount(bucket, moto.endpoint, tmp_path) as d:
        assert lists(d.stats()) == 0
        assert ls(d.root / "d003") == [f"f{j:02d}.bin" for j in range(5)]
        assert lists(d.stats()) == 0, d.stats()["lazy"]
        assert d.stats()["lazy"]["dirs_adopted"] == 2
        assert {n: (d.cache / "d003" / n).stat().st_ino for n in before} == before
        st = json.loads(hsmfs("state", "--json", str(d.root / "d003/f01.bin")).stdout)[0]
        assert st["state"] == "resident", st
        for j in range(5):
            rel = f"d003/f{j:02d}.bin"
            assert cat(d.root / rel) == objects[rel]
        assert ls(d.root / "d004") == [f"f{j:02d}.bin" for j in range(5)]
        assert lists(d.stats()) == 1


def test_local_files_and_removals_survive_a_listing(bucket: Bucket, moto: MotoServer,
                                                    tmp_path: Path) -> None:
    """A local file in a directory not yet listed (even at an object's name) is kept by the
    listing; a stub removed here is not made again when its directory is listed again (a crash
    before the mark: the mark is taken away), and the stubs made by the first listing are
    kept, not replaced."""
    objects = fill(bucket, 10, 4)
    with lazy_mount(bucket, moto.endpoint, tmp_path) as d:
        assert ls(d.root)[:2] == ["d000", "d001"]  # the root only
        assert ls(d.root / "d006") == [f"f{j:02d}.bin" for j in range(4)]
        os.unlink(d.root / "d006/f01.bin")  # removed here: a tombstone
        inodes = {n: (d.cache / "d006" / n).stat().st_ino for n in os.listdir(d.cache / "d006")}
    # Behind the daemon: local files in d005 (never listed), one at an object's name; d006
    # loses its mark, as if the daemon had died before writing it.
    (d.cache / "d005/f02.bin").write_bytes(b"mine, not S3's\n")
    (d.cache / "d005/notes.txt").write_bytes(b"local notes\n")
    os.removexattr(d.cache / "d006", LISTED)
    with lazy_mount(bucket, moto.endpoint, tmp_path) as d:
        assert ls(d.root / "d005") == ["f00.bin", "f01.bin", "f02.bin", "f03.bin", "notes.txt"]
        assert cat(d.root / "d005/f02.bin") == b"mine, not S3's\n"
        assert cat(d.root / "d005/notes.txt") == b"local notes\n"
        for rel in ("d005/f00.bin", "d005/f01.bin", "d005/f03.bin"):
            assert cat(d.root / rel) == objects[rel]
        assert ls(d.root / "d006") == ["f00.bin", "f02.bin", "f03.bin"]
        assert {n: (d.cache / "d006" / n).stat().st_ino for n in inodes} == inodes
        for rel in ("d006/f00.bin", "d006/f02.bin"):
            assert cat(d.root / rel) == objects[rel]
        lazy = d.stats()["lazy"]
        assert lazy["dirs_listed"] == 2 and lazy["removed_locally"] == 1, lazy
        assert lazy["kept"] == 4, lazy  # d005/f02.bin and d006's three stubs


def test_a_failed_listing_fails_the_lookup(bucket: Bucket, fault_proxy,
                                           tmp_path: Path) -> None:
    """S3 down: ``ls`` and ``stat`` fail with EIO (never an empty directory), nothing is
    marked; once S3 answers, the same directory lists."""
    objects = fill(bucket, 3, 3)
    with lazy_mount(bucket, fault_proxy.endpoint, tmp_path, "retries=0", "timeout=2") as d:
        assert fault_proxy.count() == 0  # the mount asked S3 nothing
        fault_proxy.refuse()
        out = run(["ls", str(d.root)], timeout=30)
        assert out.returncode != 0 and b"Input/output error" in out.stderr, out
        with pytest.raises(OSError) as err:
            os.stat(d.root / "d001/f01.bin")
        assert err.value.errno == errno.EIO
        assert sorted(os.listdir(d.cache)) == [".hsmfs"]
        with pytest.raises(OSError):
            os.getxattr(d.cache, LISTED)
        lazy = d.stats()["lazy"]
        assert lazy["failures"] >= 2 and lazy["dirs_listed"] == 0, lazy
        fault_proxy.restore()
        assert ls(d.root / "d001") == ["f00.bin", "f01.bin", "f02.bin"]
        assert cat(d.root / "d001/f01.bin") == objects["d001/f01.bin"]


def test_sync_refreshes_only_listed_directories(bucket: Bucket, moto: MotoServer,
                                                tmp_path: Path) -> None:
    """``hsmfs sync`` in lazy mode lists again only the directories listed so far (one LIST
    each, Delimiter=/): new, changed and deleted objects there follow S3, a local file stays,
    and a directory not listed stays unlisted (no stub made in it)."""
    objects = fill(bucket, 4, 2)
    with lazy_mount(bucket, moto.endpoint, tmp_path, "attr_timeout=3600", "dir_readahead=off"
                    ) as d:
        assert ls(d.root / "d001") == ["f00.bin", "f01.bin"]
        (d.root / "d001/local.txt").write_bytes(b"local\n")
        new = bucket.put("d001/new.bin", blob(5000, "new"))
        changed = bucket.put("d001/f00.bin", blob(7000, "changed"))
        bucket.delete("d001/f01.bin")
        bucket.put("d002/new.bin", blob(10, "unlisted"))
        bucket.put("brand/new.bin", blob(10, "brand"))
        before = lists(d.stats())
        out = hsmfs("sync", str(d.root))
        assert out.returncode == 0, out.stderr
        # Listed: the root and d001 (the command's own lookup of .hsmfs is in the root).
        assert lists(d.stats()) - before == 2, out.stdout
        assert "1 new, 1 refreshed" in out.stdout and "1 removed" in out.stdout, out.stdout
        assert ls(d.root / "d001") == ["f00.bin", "local.txt", "new.bin"]
        assert cat(d.root / "d001/new.bin") == new
        assert cat(d.root / "d001/f00.bin") == changed
        assert cat(d.root / "d001/local.txt") == b"local\n"
        assert os.listdir(d.cache / "d002") == []  # not listed: left for its first lookup
        assert os.listdir(d.cache / "brand") == []  # a new directory of the root: made, empty
        assert ls(d.root / "d002") == ["f00.bin", "f01.bin", "new.bin"]
        assert cat(d.root / "brand/new.bin") == bucket.objects["brand/new.bin"]
        assert cat(d.root / "d003/f01.bin") == objects["d003/f01.bin"]
        # A subtree: only d002 (listed now) under it.
        bucket.put("d002/newer.bin", blob(99, "newer"))
        before = lists(d.stats())
        out = hsmfs("sync", str(d.cache / "d002"))
        assert out.returncode == 0 and lists(d.stats()) - before == 1, out.stdout + out.stderr
        assert cat(d.root / "d002/newer.bin") == bucket.objects["d002/newer.bin"]


def test_periodic_refresh_in_lazy_mode(bucket: Bucket, moto: MotoServer,
                                       tmp_path: Path) -> None:
    """``-o refresh`` with ``-o lazy``: each period lists the listed directories only."""
    fill(bucket, 30, 2)
    with lazy_mount(bucket, moto.endpoint, tmp_path, "refresh=1", "attr_timeout=3600") as d:
        assert ls(d.root / "d007") == ["f00.bin", "f01.bin"]
        added = bucket.put("d007/late.bin", blob(300, "late"))
        deadline = time.monotonic() + 30
        while not (d.cache / "d007/late.bin").exists():
            assert time.monotonic() < deadline, "no refresh picked up d007/late.bin"
            time.sleep(0.1)
        assert cat(d.root / "d007/late.bin") == added
        st = d.stats()
        assert st["refreshes"] >= 1
        # Two listed directories per period, never the 30 others.
        assert lists(st) <= 2 + 2 * (st["refreshes"] + 1), st["s3_requests_by"]
        assert sum(1 for n in os.listdir(d.cache) if n.startswith("d0")
                   and os.listdir(d.cache / n)) == 1


@pytest.mark.parametrize("cmd", ["serve", "mount-kernel"])
def test_lazy_refused_with_the_kernel_door(cmd: str, tmp_path: Path) -> None:
    if cmd == "serve":
        out = hsmfs("serve", "-f", "s3://b", str(tmp_path), "-o", "lazy")
    else:
        (tmp_path / "mnt").mkdir()
        out = hsmfs("mount", "-f", "s3://b", str(tmp_path / "mnt"), "-o",
                    f"cache={tmp_path / 'cache'},kernel,lazy")
    assert out.returncode == 2, out
    assert "-o lazy is for the FUSE door alone" in out.stderr, out.stderr
    assert not (tmp_path / "mnt").exists() or not os.path.ismount(tmp_path / "mnt")


def test_rmdir_and_rename_of_an_unlisted_directory(bucket: Bucket, moto: MotoServer,
                                                   tmp_path: Path) -> None:
    """A directory not listed yet is empty in the backing tree but not in S3: ``rmdir`` lists
    it first (ENOTEMPTY), ``mv`` lists it first (its files move with it)."""
    objects = fill(bucket, 3, 2)
    with lazy_mount(bucket, moto.endpoint, tmp_path) as d:
        assert "d001" in ls(d.root)
        assert os.listdir(d.cache / "d001") == []
        with pytest.raises(OSError) as err:
            os.rmdir(d.root / "d001")
        assert err.value.errno == errno.ENOTEMPTY
        os.rename(d.root / "d002", d.root / "moved")
        assert ls(d.root / "moved") == ["f00.bin", "f01.bin"]
        assert cat(d.root / "moved/f01.bin") == objects["d002/f01.bin"]
        assert "d002" not in ls(d.root)


def test_a_sync_that_fails_half_way_still_tells_the_mount(bucket: Bucket, fault_proxy,
                                                         tmp_path: Path) -> None:
    """A lazy sync refreshes the listed directories one by one, parents first.  When a later
    one's listing fails, what the earlier ones changed in the tree is still told to the FUSE
    door: ``stat`` shows the new size at once, despite an hour of attribute cache."""
    fill(bucket, 2, 2)
    with lazy_mount(bucket, fault_proxy.endpoint, tmp_path, "attr_timeout=3600", "retries=0",
                    "timeout=15") as d:
        assert "d000" in ls(d.root) and ls(d.root / "d000")  # the root and d000 listed
        old = os.stat(d.root / "top.txt").st_size
        new = bucket.put("top.txt", blob(old + 4321, "a new version"))
        fault_proxy.fail_next(20, status=500, code="InternalError", match="prefix=d000")
        out = hsmfs("sync", str(d.root))
        assert out.returncode != 0, out.stdout + out.stderr
        assert os.stat(d.root / "top.txt").st_size == len(new)  # the root was refreshed first
        assert cat(d.root / "top.txt") == new
