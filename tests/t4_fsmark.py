"""The kernel door's filesystem-mark layout: the cache is the root of its own filesystem.

When the cache directory is a mount point, the bridge guards it with one ``FAN_MARK_FILESYSTEM``
mark instead of one inode mark per stub (DESIGN §6).  That layout has its own ways to go wrong,
which the inode-mark tests on ``/`` (t4_bridge.py) cannot see: the mark also covers every file
that is *not* a stub (local files, copies, ``lost+found``), resident files are silenced by
*evictable* ignore marks, and the single mark must still reach bind mounts and other mount
namespaces.  Every test here puts a fresh loop-mounted image at the cache path before the door
starts, and compares every byte it reads with S3 by digest.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import IN_CI, Bucket, MotoServer, file_sha256, run, seeded, sha256, wait_until
from support.doors import Served, serve_door

pytestmark = [pytest.mark.needs_precontent, pytest.mark.timeout(180)]
CHUNK = 64 * 1024
# Small chunks so that one read fetches part of a file, never the whole object at once.
RANGED = ("chunk=64K", "small_file=0", "max_request=256K", "readahead=256K")
MKFS = {
    "ext4": ("mkfs.ext4", "-q", "-F"),
    "xfs": ("mkfs.xfs", "-q", "-f"),
    "btrfs": ("mkfs.btrfs", "-q", "-f"),
}
APT = {"ext4": "e2fsprogs", "xfs": "xfsprogs", "btrfs": "btrfs-progs"}
# A 1 GiB sparse image: mke2fs picks its "default" profile (4 KiB blocks) from 512 MiB up,
# and mkfs.xfs refuses images below 300 MiB.  Sparse, so it costs only what is written.
IMAGE_SIZE = "1G"


# -- loop filesystems ----------------------------------------------------------------------------

def _is_mounted(path: Path) -> bool:
    from hsmfs.mounts import is_mounted

    return is_mounted(os.path.realpath(path))


def _need_mkfs(fs: str) -> None:
    """Skip when the mkfs tool is missing, except in CI, where a missing tool is a failure."""
    if shutil.which(MKFS[fs][0]) is None:
        msg = f"{MKFS[fs][0]} missing (apt-get install {APT[fs]})"
        if IN_CI:
            pytest.fail(f"CI=true: {msg}")
        pytest.skip(msg)


@contextlib.contextmanager
def loop_cache(fs: str, tmp_path: Path, populate: dict[str, bytes] | None = None
               ) -> Iterator[Path]:
    """A fresh ``fs`` image loop-mounted at ``tmp_path/w/cache``; yields the workdir for
    :func:`serve_door`.  ``populate`` writes local files into the new filesystem before any
    door exists.  Unmounted (lazily if it must be), detached and deleted whatever happens."""
    _need_mkfs(fs)
    workdir = tmp_path / "w"
    cache = workdir / "cache"
    cache.mkdir(parents=True)
    image = tmp_path / f"{fs}.img"
    run(["truncate", "-s", IMAGE_SIZE, str(image)], check=True)
    try:
        run([*MKFS[fs], str(image)], timeout=120, check=True)
        run(["mount", "-o", "loop", str(image), str(cache)], check=True)
        for rel, data in (populate or {}).items():
            (cache / rel).parent.mkdir(parents=True, exist_ok=True)
            (cache / rel).write_bytes(data)
        yield workdir
    finally:
        from hsmfs.cover import uncover

        with contextlib.suppress(OSError):
            uncover(cache)  # a kernel-door stop covers the cache dir: that mount goes first
        if _is_mounted(cache) and run(["umount", str(cache)]).returncode != 0:
            run(["umount", "-l", str(cache)])
        for line in run(["losetup", "-j", str(image)]).stdout.decode().splitlines():
            run(["losetup", "-d", line.split(":", 1)[0]])
        with contextlib.suppress(OSError):
            image.unlink()


@contextlib.contextmanager
def bind_mount(src: Path, dst: Path) -> Iterator[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    run(["mount", "--bind", str(src), str(dst)], check=True)
    try:
        yield dst
    finally:
        if run(["umount", str(dst)]).returncode != 0:
            run(["umount", "-l", str(dst)])


def _kernel(d: Served) -> dict:
    return d.stats()["kernel"]


def _total_events(d: Served) -> int:
    return sum(_kernel(d)["events"].values())


def _mmap_sha256(path: Path) -> str:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        return sha256(m[:])


# -- tests ---------------------------------------------------------------------------------------

def test_cold_reads_through_the_filesystem_mark(bucket: Bucket, moto: MotoServer,
                                                tmp_path: Path) -> None:
    """read, pread, mmap and cat of stubs above ``open_fill`` are filled per access event;
    cp of a stub below it is filled at open (cp trusts holes: docs/holes.md)."""
    big = {f"big/{k}.bin": bucket.put(f"big/{k}.bin", seeded(5 * CHUNK + 7 + i, k))
           for i, k in enumerate(["read", "pread", "mmap", "cat"])}
    small = bucket.put("small/cp.bin", seeded(3 * CHUNK + 5, "cp"))
    with loop_cache("ext4", tmp_path) as w, serve_door(
            "kernel", f"s3://{bucket.name}", w, moto.endpoint, *RANGED,
            "open_fill=256K") as d:
        stats = d.stats()
        assert stats["kernel"]["mark"] == "filesystem"
        assert stats["resident_files"] == 0 and stats["fetched_bytes"] == 0

        assert file_sha256(d.root / "big/read.bin") == sha256(big["big/read.bin"])

        data = big["big/pread.bin"]
        fd = os.open(d.root / "big/pread.bin", os.O_RDONLY)
        try:  # unaligned, crossing chunk boundaries, spanning and beyond EOF
            for off, n in [(4095, 10000), (CHUNK - 1, 2), (len(data) - 100, 8192),
                           (len(data) + 10, 100), (3 * CHUNK + 1, CHUNK)]:
                assert sha256(os.pread(fd, n, off)) == sha256(data[off:off + n]), (off, n)
        finally:
            os.close(fd)

        assert _mmap_sha256(d.root / "big/mmap.bin") == sha256(big["big/mmap.bin"])

        out = run(["cat", str(d.root / "big/cat.bin")])
        assert out.returncode == 0, out
        assert sha256(out.stdout) == sha256(big["big/cat.bin"])

        dst = tmp_path / "cp.copy"  # on `/`, another filesystem
        out = run(["cp", str(d.root / "small/cp.bin"), str(dst)])
        assert out.returncode == 0, out
        assert file_sha256(dst) == sha256(small)

        k = _kernel(d)
        assert k["open_fills"] >= 1 and k["events"].get("access", 0) >= 4, k
        assert not k["denied"], k
        # the whole files were read: each byte fetched at most once (one fetch per chunk)
        assert d.stats()["fetched_bytes"] <= sum(map(len, big.values())) + len(small)
        assert file_sha256(d.root / "big/pread.bin") == sha256(data)


def test_resident_file_raises_no_events(bucket: Bucket, moto: MotoServer,
                                        tmp_path: Path) -> None:
    """Residency is an evictable inode ignore mark under the filesystem mark: once a file is
    full, neither its opens nor its reads reach the daemon any more."""
    data = bucket.put("r.bin", seeded(6 * CHUNK + 3, "r"))
    with loop_cache("ext4", tmp_path) as w, serve_door(
            "kernel", f"s3://{bucket.name}", w, moto.endpoint, *RANGED) as d:
        assert _kernel(d)["mark"] == "filesystem"
        assert file_sha256(d.root / "r.bin") == sha256(data)  # filled at open
        wait_until(lambda: d.stats()["resident_files"] == 1, 10, "r.bin resident")
        before, fetched = _total_events(d), d.stats()["fetched_bytes"]
        assert before >= 1
        for i in range(3):
            assert file_sha256(d.root / "r.bin") == sha256(data)
            assert _mmap_sha256(d.root / "r.bin") == sha256(data)
            out = run(["cat", str(d.root / "r.bin")])
            assert sha256(out.stdout) == sha256(data)
            out = run(["cp", str(d.root / "r.bin"), str(tmp_path / f"r{i}.copy")])
            assert out.returncode == 0 and file_sha256(tmp_path / f"r{i}.copy") == sha256(data)
        assert _total_events(d) == before
        assert d.stats()["fetched_bytes"] == fetched


def test_local_files_are_never_blocked(bucket: Bucket, fault_proxy, tmp_path: Path) -> None:
    """The filesystem mark raises events for files hsmfs does not own too.  They must be
    allowed at once: never fetched, never denied, never queued behind a slow S3 fetch."""
    stub = bucket.put("s/stub.bin", seeded(4 * CHUNK, "stub"))
    early = seeded(3 * CHUNK + 11, "early")
    with loop_cache("ext4", tmp_path, populate={"local/early.bin": early}) as w, serve_door(
            "kernel", f"s3://{bucket.name}", w, fault_proxy.endpoint, *RANGED) as d:
        assert _kernel(d)["mark"] == "filesystem"
        assert d.stats()["stubs"] == 1  # population left the local file alone
        late = seeded(5 * CHUNK + 1, "late")
        (d.root / "local/late.bin").write_bytes(late)  # created while the door runs
        fetched = d.stats()["fetched_bytes"]

        # Every GET now hangs 8 s: a reader of the stub stays blocked in the kernel...
        fault_proxy.set_delay(8000, method="GET")
        reader = subprocess.Popen(["sha256sum", str(d.root / "s/stub.bin")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_until(lambda: d.stats()["inflight_chunks"] >= 1, 10, "the stub's fetch")
            # ...while every access to the local files goes through at once.
            started = time.monotonic()
            for rel, data in [("local/early.bin", early), ("local/late.bin", late)]:
                path = d.root / rel
                assert file_sha256(path) == sha256(data)
                assert _mmap_sha256(path) == sha256(data)
                out = run(["cat", str(path)], timeout=5)
                assert sha256(out.stdout) == sha256(data)
                out = run(["cp", str(path), str(tmp_path / "copy.bin")], timeout=5)
                assert out.returncode == 0 and file_sha256(tmp_path / "copy.bin") == sha256(data)
                with open(path, "r+b") as f:  # and writes
                    f.seek(0, os.SEEK_END)
                    f.write(b"more")
                assert file_sha256(path) == sha256(data + b"more")
            elapsed = time.monotonic() - started
            assert elapsed < 6, f"local files waited {elapsed:.1f}s behind the stub's fetch"
            assert reader.poll() is None, "the stub reader was not blocked: the test is void"
            fault_proxy.restore()
            out, err = reader.communicate(timeout=60)
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait(10)
        assert out.split()[0].decode() == sha256(stub), err
        k = _kernel(d)
        assert k["not_ours"] > 0 and not k["denied"], k
        assert d.stats()["fetched_bytes"] == fetched + len(stub)  # nothing local was fetched
        assert d.stats()["stubs"] == 1


@pytest.mark.parametrize("open_fill", ["off", "64M"])
@pytest.mark.parametrize("fs", ["xfs", "btrfs"])
def test_reflink_copy_of_cold_stub(bucket: Bucket, moto: MotoServer, tmp_path: Path, fs: str,
                                   open_fill: str) -> None:
    """A whole-file FICLONE reports PRE_ACCESS(0, 0): the door must fill to EOF before the
    kernel shares the stub's extents (with open_fill=off this is the only event; with the
    default, the open already filled it).  Plain cp clones too (--reflink=auto)."""
    objs = {mode: bucket.put(f"{mode}.bin", seeded(3 * CHUNK + 4097, f"{fs}{mode}"))
            for mode in ("always", "auto")}
    with loop_cache(fs, tmp_path) as w, serve_door(
            "kernel", f"s3://{bucket.name}", w, moto.endpoint, *RANGED,
            f"open_fill={open_fill}") as d:
        assert _kernel(d)["mark"] == "filesystem"
        copies = d.root / "copies"  # the same filesystem: a clone, not a copy
        copies.mkdir()
        for mode, data in objs.items():
            name = f"{mode}.bin"
            out = run(["cp", f"--reflink={mode}", str(d.root / name), str(copies / name)])
            assert out.returncode == 0, out
            assert file_sha256(copies / name) == sha256(data), (mode, d.stats()["kernel"])
            assert file_sha256(d.root / name) == sha256(data)
        assert not _kernel(d)["denied"]


def test_bind_mount_and_new_mount_namespace(bucket: Bucket, moto: MotoServer,
                                            tmp_path: Path) -> None:
    """One filesystem mark reaches every path to the filesystem: a bind mount, and a bind
    mount made inside a new mount namespace (what a container sees)."""
    a = bucket.put("x/a.bin", seeded(5 * CHUNK + 7, "a"))
    b = bucket.put("x/b.bin", seeded(3 * CHUNK + 1, "b"))
    c = bucket.put("x/c.bin", seeded(4 * CHUNK + 9, "c"))
    with loop_cache("ext4", tmp_path) as w, serve_door(
            "kernel", f"s3://{bucket.name}", w, moto.endpoint, *RANGED,
            "open_fill=off") as d, bind_mount(d.root, tmp_path / "bound") as bound:
        assert _kernel(d)["mark"] == "filesystem"
        assert file_sha256(bound / "x/a.bin") == sha256(a)
        assert _mmap_sha256(bound / "x/c.bin") == sha256(c)
        ns = tmp_path / "ns"
        ns.mkdir()
        script = f"mount --bind '{d.root}' '{ns}' && sha256sum '{ns}/x/b.bin'"
        out = run(["unshare", "-m", "--propagation", "private", "sh", "-c", script])
        assert out.returncode == 0, out
        assert out.stdout.split()[0].decode() == sha256(b)
        assert not _is_mounted(ns)  # the namespace's mount died with it
        assert _kernel(d)["events"].get("access", 0) >= 3
        assert d.stats()["fetched_bytes"] == len(a) + len(b) + len(c)



def test_restart_behind_the_cover(bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    """A kernel-door stop covers the cache dir (a tmpfs over the loop filesystem's root).  The
    next start must place its filesystem marks on the filesystem beneath the cover, through the
    private door's fd: by the cache path it would reach the cover (tmpfs, which carries no
    pre-content events), and the start would fail or guard nothing."""
    data = {k: bucket.put(k, seeded(5 * CHUNK + 11 + i, k))
            for i, k in enumerate(["d/a.bin", "d/b.bin"])}
    with loop_cache("ext4", tmp_path) as w:
        with serve_door("kernel", f"s3://{bucket.name}", w, moto.endpoint, *RANGED) as d:
            assert _kernel(d)["mark"] == "filesystem"
            assert file_sha256(d.root / "d/a.bin") == sha256(data["d/a.bin"])
        from hsmfs.cover import is_covered

        assert is_covered(w / "cache"), "a kernel-door stop leaves the cover up"
        with serve_door("kernel", f"s3://{bucket.name}", w, moto.endpoint, *RANGED) as d:
            assert not is_covered(w / "cache")
            assert _kernel(d)["mark"] == "filesystem"
            # b.bin was never read: every byte of it must come through the new marks.
            assert file_sha256(d.root / "d/b.bin") == sha256(data["d/b.bin"])
            assert file_sha256(d.root / "d/a.bin") == sha256(data["d/a.bin"])
            assert _total_events(d) >= 1
            assert "no names group" not in d.log()
