"""Both doors, one body: applications read the right bytes, or get the table's errno, never zeros.

Every test runs against the FUSE door (reads through the mountpoint) and the kernel door
(reads of the backing tree itself, held by fanotify pre-content events), with the real
``hsmfs`` command, a real moto server over loopback HTTP and unaware programs as subprocesses.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import Bucket, MotoServer, run, seeded, sha256
from support.doors import DOORS, serve_door

CHUNK = 64 * 1024
# Small chunks and no whole-file shortcut, so ranges, merges and read-ahead are all exercised
# on objects moto serves quickly.  open_fill=off: the kernel door fills by range, not at open.
RANGED = ("chunk=64K", "small_file=0", "max_request=256K", "readahead=256K", "open_fill=off")
SIZES = [0, 1, 4095, 4097, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 517, 1024 * 1024 + 3]

pytestmark = [pytest.mark.timeout(180), pytest.mark.parametrize("door", DOORS)]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_awkward_sizes_every_reader(door: str, bucket: Bucket, moto: MotoServer,
                                    tmp_path: Path) -> None:
    for size in SIZES:
        bucket.put(f"sizes/{size}.bin", seeded(size, f"size{size}"))
    with serve_door(door, f"s3://{bucket.name}", tmp_path, moto.endpoint, *RANGED) as d:
        rng = random.Random(7)
        for size in SIZES:
            key = f"sizes/{size}.bin"
            want = bucket.objects[key]
            path = d.root / key
            assert path.stat().st_size == size
            # random preads first, while the file is still cold
            with open(path, "rb") as f:
                for _ in range(20):
                    off = rng.randrange(0, size + 10)
                    n = rng.choice([1, 100, 4096, CHUNK, 3 * CHUNK])
                    assert os.pread(f.fileno(), n, off) == want[off:off + n], (key, off, n)
            assert _digest(path) == sha256(want), key
            if size:
                with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
                    assert hashlib.sha256(m[:]).hexdigest() == sha256(want), key
            out = run(["cat", str(path)])
            assert out.returncode == 0 and sha256(out.stdout) == sha256(want), key
            out = run(["sha256sum", str(path)])
            assert out.stdout.split()[0].decode() == sha256(want), key
            dst = tmp_path / "copies" / f"{size}.bin"
            dst.parent.mkdir(exist_ok=True)
            assert run(["cp", str(path), str(dst)]).returncode == 0
            assert _digest(dst) == sha256(want), key


def test_cold_mmap_and_cp_before_any_read(door: str, bucket: Bucket, moto: MotoServer,
                                          tmp_path: Path) -> None:
    """The first touch of a stub is an mmap, or a cp (which trusts holes it sees)."""
    a = bucket.put("cold/a.bin", seeded(3 * CHUNK + 11, "a"))
    b = bucket.put("cold/b.bin", seeded(2 * CHUNK + 5, "b"))
    with serve_door(door, f"s3://{bucket.name}", tmp_path, moto.endpoint, "chunk=64K",
                    "small_file=0") as d:
        with open(d.root / "cold/a.bin", "rb") as f, \
                mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            assert hashlib.sha256(m[:]).hexdigest() == sha256(a)
        dst = tmp_path / "b.copy"
        assert run(["cp", str(d.root / "cold/b.bin"), str(dst)]).returncode == 0
        assert _digest(dst) == sha256(b)


def test_sqlite_query(door: str, bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    db = tmp_path / "src.db"
    con = sqlite3.connect(db)
    con.execute("create table t (id integer primary key, name text, blob blob)")
    rng = random.Random(3)
    rows = [(i, f"name-{i}", rng.randbytes(rng.randrange(10, 3000))) for i in range(2000)]
    con.executemany("insert into t values (?, ?, ?)", rows)
    con.commit()
    con.close()
    bucket.put("data/app.db", db.read_bytes())
    want_sum = sum(len(r[2]) for r in rows if r[0] % 7 == 3)
    with serve_door(door, f"s3://{bucket.name}", tmp_path / "d", moto.endpoint, *RANGED) as d:
        uri = f"file:{d.root / 'data/app.db'}?immutable=1"
        out = run(["sqlite3", uri, "select sum(length(blob)) from t where id % 7 = 3;"])
        assert out.returncode == 0, out.stderr
        assert int(out.stdout) == want_sum
        con = sqlite3.connect(uri, uri=True)
        try:
            assert con.execute("select name from t where id = 1234").fetchone() == ("name-1234",)
            assert con.execute("select count(*) from t").fetchone() == (2000,)
        finally:
            con.close()


def test_exec_elf_and_python(door: str, bucket: Bucket, moto: MotoServer,
                             tmp_path: Path) -> None:
    elf = Path(shutil.which("sha256sum") or "/usr/bin/sha256sum").read_bytes()
    bucket.put("bin/tool", elf, mode=0o100755)
    bucket.put("lib/mod.py", b"VALUE = 'from s3'\nprint(VALUE)\n")
    with serve_door(door, f"s3://{bucket.name}", tmp_path, moto.endpoint, *RANGED) as d:
        tool = d.root / "bin/tool"
        assert os.access(tool, os.X_OK)
        out = run([str(tool), "--version"])
        assert out.returncode == 0 and b"sha256sum" in out.stdout, out
        out = run([sys.executable, str(d.root / "lib/mod.py")])
        assert out.stdout == b"from s3\n", out
        assert _digest(tool) == sha256(elf)


def test_resident_reread_sends_nothing_to_s3(door: str, bucket: Bucket, moto: MotoServer,
                                            tmp_path: Path) -> None:
    data = bucket.put("f.bin", seeded(5 * CHUNK + 3, "f"))
    with serve_door(door, f"s3://{bucket.name}", tmp_path, moto.endpoint, *RANGED) as d:
        assert _digest(d.root / "f.bin") == sha256(data)
        before = d.stats()
        for _ in range(3):
            assert _digest(d.root / "f.bin") == sha256(data)
            run(["cat", str(d.root / "f.bin")])
        after = d.stats()
        assert after["s3_requests"] == before["s3_requests"]
        assert after["fetched_bytes"] == before["fetched_bytes"] == len(data)


def test_concurrent_readers_of_one_cold_chunk_fetch_it_once(
        door: str, bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    data = bucket.put("hot.bin", seeded(16 * CHUNK, "hot"))
    # The read-ahead window is off (one chunk) so the count is about coalescing alone.
    with serve_door(door, f"s3://{bucket.name}", tmp_path, moto.endpoint, *RANGED) as d:
        before = d.stats()["cache_s3_gets"]
        off = 8 * CHUNK + 100
        results: list[bytes] = []
        barrier = threading.Barrier(8)

        def reader() -> None:
            with open(d.root / "hot.bin", "rb", buffering=0) as f:
                barrier.wait(10)
                results.append(os.pread(f.fileno(), 1000, off))

        threads = [threading.Thread(target=reader) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [data[off:off + 1000]] * 8
        stats = d.stats()
        # FUSE may widen the request (kernel read-ahead) but it stays one merged GET.
        assert stats["cache_s3_gets"] - before == 1, stats


def test_grep_over_a_cold_tree_reads_each_object_once(door: str, bucket: Bucket,
                                                     moto: MotoServer, tmp_path: Path) -> None:
    """grep -r over a cold tree: directory read-ahead fetches siblings in the background while
    grep reads them on demand in its own (readdir) order.  Every file's bytes are S3's, each
    object is fetched exactly once, and the data file next to the sources is never guessed."""
    tree = {}
    for pkg in ("alpha", "beta", "beta/inner"):
        for i in range(12):
            key = f"src/{pkg}/m{i:02}.py"
            tree[key] = bucket.put(key, seeded(2000 + 97 * i, key) + b"\nneedle\n")
    bucket.put("src/alpha/blob.dat", seeded(50_000, "blob"))
    with serve_door(door, f"s3://{bucket.name}", tmp_path, moto.endpoint) as d:
        out = run(["grep", "-r", "-c", "--include=*.py", "needle", str(d.root / "src")])
        assert out.returncode == 0, out.stderr
        counts = dict(line.rsplit(b":", 1) for line in out.stdout.splitlines())
        assert len(counts) == len(tree) and set(counts.values()) == {b"1"}
        for key, data in tree.items():
            assert _digest(d.root / key) == sha256(data), key
        stats = d.stats()
        assert stats["sibling_prefetches"] > 0, stats
        assert stats["fetched_bytes"] == sum(map(len, tree.values())), stats  # once, no blob
        assert stats["cache_s3_gets"] == len(tree), stats


def _expect_errno(path: Path, want: int, off: int = 0) -> None:
    # os.pread, not FileIO.read: the latter turns EAGAIN into a silent None.
    with open(path, "rb", buffering=0) as f, pytest.raises(OSError) as err:
        os.pread(f.fileno(), 4096, off)
    assert err.value.errno == want, err.value


def test_s3_down_deleted_replaced_give_eio(door: str, tmp_path: Path) -> None:
    server = MotoServer().start()
    try:
        b = Bucket(server.client(), "faults")
        ok = b.put("ok.bin", seeded(3 * CHUNK, "ok"))
        b.put("gone.bin", seeded(3 * CHUNK, "gone"))
        b.put("changed.bin", seeded(3 * CHUNK, "old"))
        b.put("later.bin", seeded(3 * CHUNK, "later"))
        with serve_door(door, "s3://faults", tmp_path, server.endpoint, *RANGED,
                        "retries=1") as d:
            assert _digest(d.root / "ok.bin") == sha256(ok)
            b.delete("gone.bin")
            b.put("changed.bin", seeded(3 * CHUNK, "new"))
            _expect_errno(d.root / "gone.bin", errno.EIO)
            _expect_errno(d.root / "changed.bin", errno.EIO)
            out = run(["cat", str(d.root / "changed.bin")])
            assert out.returncode != 0 and b"Input/output error" in out.stderr
            assert b"\0" not in out.stdout  # whatever cat printed, it was never a hole
            server.stop()
            _expect_errno(d.root / "later.bin", errno.EIO, off=2 * CHUNK)
            # the resident file and the daemon are unaffected
            assert _digest(d.root / "ok.bin") == sha256(ok)
            log = d.log()
            assert "changed" in log and "missing" in log and "unavailable" in log
            errors = d.stats()["errors"]
            assert errors.get("missing") and errors.get("changed") and errors.get("unavailable")
    finally:
        server.stop()


def test_throttling_past_retries_gives_eio(door: str, bucket: Bucket, fault_proxy,
                                              tmp_path: Path) -> None:
    data = bucket.put("t.bin", seeded(4 * CHUNK, "t"))
    with serve_door(door, f"s3://{bucket.name}", tmp_path, fault_proxy.endpoint, *RANGED,
                    "retries=2") as d:
        # Persistent throttling: FUSE's own read-ahead request fails first and the kernel
        # retries synchronously, so a short burst would (rightly) be invisible to the reader.
        fault_proxy.fail_next(1000, status=503, code="SlowDown")
        _expect_errno(d.root / "t.bin", errno.EIO)  # not EAGAIN: see errors.to_errno
        assert d.stats()["errors"].get("throttled")
        fault_proxy.restore()
        # once S3 recovers, the same file reads right
        assert _digest(d.root / "t.bin") == sha256(data)


def test_hostile_keys_are_contained(door: str, bucket: Bucket, moto: MotoServer,
                                    tmp_path: Path) -> None:
    hostile = ["../escape", "a/../../escape2", "/abs", "d//e", "./dot", "n" * 256 + "/x",
               ".hsmfs/control.sock", "both", "both/inner"]
    for i, key in enumerate(hostile):
        bucket.put(key, seeded(100, i))
    good = bucket.put("fine/file.txt", b"fine\n")
    with serve_door(door, f"s3://{bucket.name}", tmp_path / "w", moto.endpoint) as d:
        assert (d.root / "fine/file.txt").read_bytes() == good
        assert (d.root / "both/inner").read_bytes() == bucket.objects["both/inner"]
        assert (d.root / "both").is_dir()
        names = sorted(p.name for p in d.root.iterdir() if p.name != ".hsmfs")
        assert names == ["both", "fine"]
        log = d.log()
        for reason in ("'..' path segment", "absolute", "empty path segment", "'.' path segment",
                       "longer than 255", "reserved name", "both an object and a prefix"):
            assert reason in log, reason
    # nothing escaped the work directory
    escaped = [p for p in (tmp_path / "escape", tmp_path / "w" / "escape",
                           tmp_path / "escape2", Path("/abs")) if p.exists()]
    assert not escaped
    assert subprocess.run(["find", str(tmp_path), "-name", "escape*"], capture_output=True,
                          text=True).stdout == ""


def test_restore_makes_files_resident(door: str, bucket: Bucket, moto: MotoServer,
                                      tmp_path: Path) -> None:
    data = bucket.put("dir/r.bin", seeded(6 * CHUNK + 9, "restore"))
    with serve_door(door, f"s3://{bucket.name}", tmp_path, moto.endpoint, *RANGED) as d:
        path = d.root / "dir/r.bin"
        out = run([sys.executable, "-m", "hsmfs", "restore", str(path)])
        assert out.returncode == 0, out
        assert out.stdout.split()[0] == b"resident"
        fetched = d.stats()["fetched_bytes"]
        assert fetched == len(data)
        assert _digest(path) == sha256(data)
        assert d.stats()["fetched_bytes"] == fetched  # nothing more from S3
        out = run([sys.executable, "-m", "hsmfs", "restore", str(tmp_path / "nowhere")])
        assert out.returncode == 1
