"""The kernel door's own guarantees, with real fanotify, a real S3 server, unaware programs.

What a container sees (bind mounts, other mount namespaces), no events for resident files,
stubs guarded from the instant they appear, no wrong byte when the worker is SIGKILLed, exec
and dlopen on first use, copy tools that trust holes, and both doors sharing one cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Bucket, MotoServer, file_sha256, run, seeded, sha256, wait_until
from support.doors import serve_door

pytestmark = [pytest.mark.needs_precontent, pytest.mark.timeout(180)]
CHUNK = 64 * 1024
RANGED = ("chunk=64K", "small_file=0", "max_request=256K", "readahead=256K", "open_fill=off")


@contextlib.contextmanager
def bind_mount(src: Path, dst: Path):
    dst.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(src), str(dst)], check=True, timeout=10)
    try:
        yield dst
    finally:
        subprocess.run(["umount", "-l", str(dst)], timeout=10)


def test_bind_mount_and_new_mount_namespace(bucket: Bucket, moto: MotoServer,
                                            tmp_path: Path) -> None:
    a = bucket.put("x/a.bin", seeded(5 * CHUNK + 7, "a"))
    b = bucket.put("x/b.bin", seeded(3 * CHUNK + 1, "b"))
    with serve_door("kernel", f"s3://{bucket.name}", tmp_path / "w", moto.endpoint,
                    *RANGED) as d, bind_mount(d.root, tmp_path / "bound") as bound:
        assert file_sha256(bound / "x/a.bin") == sha256(a)
        # what a container sees: its own mount namespace, the cache bind-mounted at /data
        script = (f"mkdir -p {tmp_path}/ns && mount --bind {d.root} {tmp_path}/ns && "
                  f"sha256sum {tmp_path}/ns/x/b.bin")
        out = run(["unshare", "-m", "--propagation", "private", "sh", "-c", script])
        assert out.returncode == 0, out
        assert out.stdout.split()[0].decode() == sha256(b)


def test_resident_files_raise_no_events(bucket: Bucket, moto: MotoServer,
                                        tmp_path: Path) -> None:
    data = bucket.put("r.bin", seeded(4 * CHUNK, "r"))
    with serve_door("kernel", f"s3://{bucket.name}", tmp_path, moto.endpoint, *RANGED) as d:
        assert file_sha256(d.root / "r.bin") == sha256(data)
        before = d.stats()["kernel"]["events"]
        for _ in range(5):
            assert file_sha256(d.root / "r.bin") == sha256(data)
            run(["cat", str(d.root / "r.bin")])
        assert d.stats()["kernel"]["events"] == before


def test_stub_is_guarded_from_the_instant_it_appears(bucket: Bucket, moto: MotoServer,
                                                     tmp_path: Path) -> None:
    """A reader racing the daemon's start opens each stub the moment its name exists."""
    names = [f"race/{i}.bin" for i in range(30)]
    for i, name in enumerate(names):
        bucket.put(name, seeded(2 * CHUNK + i, name))
    cache = tmp_path / "cache"
    found: dict[str, bytes] = {}
    stop = threading.Event()

    def racer() -> None:
        while not stop.is_set() and len(found) < len(names):
            for name in names:
                if name in found:
                    continue
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    fd = os.open(cache / name, os.O_RDONLY)
                    try:
                        # opened the instant it appeared: must still be guarded
                        found[name] = os.pread(fd, 3 * CHUNK, 0)
                    finally:
                        os.close(fd)

    t = threading.Thread(target=racer, daemon=True)
    t.start()
    try:
        with serve_door("kernel", f"s3://{bucket.name}", tmp_path, moto.endpoint, *RANGED):
            t.join(60)
    finally:
        stop.set()
    assert len(found) == len(names)
    for name in names:
        assert sha256(found[name]) == sha256(bucket.objects[name]), name


def _worker_pids(holder_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(holder_pid), "-f", "hsmfs.worker"],
                         capture_output=True, text=True, timeout=5)
    return [int(p) for p in out.stdout.split()]


def _worker_pid(holder_pid: int) -> int:
    pids = _worker_pids(holder_pid)
    assert len(pids) == 1, pids
    return pids[0]


def test_sigkill_of_worker_with_blocked_readers(bucket: Bucket, fault_proxy,
                                                tmp_path: Path) -> None:
    names = [f"k/{i}.bin" for i in range(3)]
    for name in names:
        bucket.put(name, seeded(4 * CHUNK, name))
    with serve_door("kernel", f"s3://{bucket.name}", tmp_path, fault_proxy.endpoint,
                    *RANGED) as d:
        holder = d.proc.pid
        first = _worker_pid(holder)
        fault_proxy.set_delay(1500, method="GET")  # every GET hangs 1.5 s: readers block
        readers = [subprocess.Popen(["sha256sum", str(d.root / n)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE) for n in names]
        try:
            wait_until(lambda: "k/2.bin" in d.log() or fault_proxy.count("GET") >= 3, 10,
                       "fetches to start")
            time.sleep(0.3)
            assert all(r.poll() is None for r in readers)  # blocked in the kernel
            os.kill(first, signal.SIGKILL)
            fault_proxy.restore()
            outs = [r.communicate(timeout=60) for r in readers]
        finally:
            for r in readers:
                if r.poll() is None:
                    r.kill()
        for name, (out, err) in zip(names, outs, strict=True):
            assert out.split()[0].decode() == sha256(bucket.objects[name]), (name, err)
        wait_until(lambda: _worker_pid(holder) != first, 20, "a new worker")
        assert "worker gone" in d.log()


def test_exec_and_dlopen_on_first_use(bucket: Bucket, moto: MotoServer,
                                      tmp_path: Path) -> None:
    elf = Path(shutil.which("sha256sum") or "/usr/bin/sha256sum").read_bytes()
    lib = Path("/lib/x86_64-linux-gnu/libz.so.1")
    if not lib.exists():
        lib = Path(subprocess.run([sys.executable, "-c", "import ctypes.util, zlib;"
                                   "print(ctypes.util.find_library('z'))"],
                                  capture_output=True, text=True).stdout.strip())
    bucket.put("bin/tool", elf, mode=0o100755)
    bucket.put("lib/libz.so.1", lib.read_bytes(), mode=0o100755)
    # open_fill=off: exec must still get the whole binary from its OPEN_EXEC_PERM event,
    # and dlopen gets its ranges from read and mmap events.
    with serve_door("kernel", f"s3://{bucket.name}", tmp_path, moto.endpoint, *RANGED) as d:
        for _ in range(2):
            out = run([str(d.root / "bin/tool"), "--version"])
            assert out.returncode == 0 and b"sha256sum" in out.stdout, out
        code = ("import ctypes,sys; z=ctypes.CDLL(sys.argv[1]); "
                "z.zlibVersion.restype=ctypes.c_char_p; print(z.zlibVersion().decode())")
        out = run([sys.executable, "-c", code, str(d.root / "lib/libz.so.1")])
        assert out.returncode == 0 and out.stdout.strip(), out
        assert file_sha256(d.root / "lib/libz.so.1") == sha256(lib.read_bytes())


COPIERS = {
    "cp": lambda src, dst: ["cp", src, dst],
    "cp --sparse=never": lambda src, dst: ["cp", "--sparse=never", src, dst],
    "cp --reflink=auto": lambda src, dst: ["cp", "--reflink=auto", src, dst],
    "tar -S": lambda src, dst: ["sh", "-c", f"tar -cSf - -C {os.path.dirname(src)} "
                                f"{os.path.basename(src)} | tar -xSf - -O > {dst}"],
    "rsync -S": lambda src, dst: ["rsync", "-S", src, dst],
    "shutil.copyfile": lambda src, dst: [sys.executable, "-c",
                                         f"import shutil; shutil.copyfile({src!r}, {dst!r})"],
}


def test_copy_tools_never_copy_holes_by_default(bucket: Bucket, moto: MotoServer,
                                                tmp_path: Path) -> None:
    names = [f"c/{i}.bin" for i in range(len(COPIERS))]
    for name in names:
        bucket.put(name, seeded(5 * CHUNK + 3, name))
    with serve_door("kernel", f"s3://{bucket.name}", tmp_path, moto.endpoint,
                    "chunk=64K", "small_file=0") as d:
        # the comparison file read (and filled) after the copy: compare against S3 itself
        results = {}
        for (tool, cmd), name in zip(COPIERS.items(), names, strict=True):
            dst = tmp_path / f"{name.replace('/', '_')}.copy"
            out = run(cmd(str(d.root / name), str(dst)))
            results[tool] = out.returncode == 0 and file_sha256(dst) == sha256(
                bucket.objects[name])
        assert all(results.values()), results
        assert d.stats()["kernel"]["open_fills"] >= len(COPIERS)


def test_trunc_open_skips_the_fill(bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    bucket.put("t/over.bin", seeded(8 * CHUNK, "o"))
    with serve_door("kernel", f"s3://{bucket.name}", tmp_path, moto.endpoint,
                    "chunk=64K", "small_file=0") as d:
        before = d.stats()
        (d.root / "t/over.bin").write_bytes(b"replaced\n")  # open(O_WRONLY|O_CREAT|O_TRUNC)
        after = d.stats()
        assert (d.root / "t/over.bin").read_bytes() == b"replaced\n"
        assert after["kernel"]["trunc_opens"] == before["kernel"]["trunc_opens"] + 1
        assert after["fetched_bytes"] == before["fetched_bytes"]


def test_serve_in_background_and_stop(bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    data = bucket.put("s.bin", seeded(3 * CHUNK, "s"))
    cache = tmp_path / "cache"
    out = run([sys.executable, "-m", "hsmfs", "serve", f"s3://{bucket.name}", str(cache), "-o",
               f"endpoint={moto.endpoint}"])
    try:
        assert out.returncode == 0, out
        assert b"kernel door guarding" in out.stderr
        assert file_sha256(cache / "s.bin") == sha256(data)
        [row] = json.loads(run([sys.executable, "-m", "hsmfs", "state", "--json",
                                str(cache / "s.bin")]).stdout)
        assert row["state"] == "resident"
    finally:
        stopped = run([sys.executable, "-m", "hsmfs", "stop", str(cache)], timeout=60)
    assert stopped.returncode == 0, stopped
    assert not (cache / ".hsmfs" / "daemon.pid").exists()


@pytest.mark.needs_fuse
def test_both_doors_share_one_cache(bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    a = bucket.put("a.bin", seeded(6 * CHUNK, "a"))
    b = bucket.put("b.bin", seeded(6 * CHUNK, "b"))
    with serve_door("fuse", f"s3://{bucket.name}", tmp_path, moto.endpoint, *RANGED,
                    "kernel") as d:
        backing = d.cache
        assert file_sha256(d.root / "a.bin") == sha256(a)  # through FUSE
        fetched = d.stats()["fetched_bytes"]
        assert file_sha256(backing / "a.bin") == sha256(a)  # resident for the kernel door
        assert file_sha256(backing / "b.bin") == sha256(b)  # through the kernel door
        assert file_sha256(d.root / "b.bin") == sha256(b)  # resident for FUSE
        assert d.stats()["fetched_bytes"] == fetched + len(b)


def test_reads_of_resident_bytes_are_answered_in_the_receive_loop(
        bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    """A partly resident file raises an event per read.  Reads of its resident bytes are
    answered at once in the worker's receive loop (no GET, no task); a read of bytes that are
    not resident still becomes a task and is fetched.  Both give S3's bytes, and the core's
    books (hits, served bytes) count the loop's answers."""
    data = bucket.put("p.bin", seeded(8 * CHUNK, "p"))
    with serve_door("kernel", f"s3://{bucket.name}", tmp_path, moto.endpoint, *RANGED) as d:
        path = d.root / "p.bin"
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 0) == data[:4096]  # a miss: fetched by the loop
            before = d.stats()
            for _ in range(20):
                assert os.pread(fd, 4096, 0) == data[:4096]
            after_hits = d.stats()
            far = 6 * CHUNK  # no read-ahead reached it (the window never opened)
            assert os.pread(fd, 4096, far) == data[far:far + 4096]
            after_miss = d.stats()
        finally:
            os.close(fd)
        k0, k1, k2 = (s["kernel"] for s in (before, after_hits, after_miss))
        assert k1["resident_answers"] - k0["resident_answers"] == 20
        assert after_hits["cache_s3_gets"] == before["cache_s3_gets"]
        assert after_hits["hits"] - before["hits"] == 20
        assert after_hits["served_bytes"] - before["served_bytes"] == 20 * 4096
        assert k2["resident_answers"] == k1["resident_answers"]
        assert after_miss["cache_s3_gets"] > after_hits["cache_s3_gets"]


def test_a_worker_whose_loop_hangs_is_killed_and_replaced(bucket: Bucket, moto: MotoServer,
                                                          tmp_path: Path) -> None:
    """A worker that stops answering without dying (SIGSTOP stands in for a deadlock or a
    call stuck on a dead disk) would hold its readers forever.  The holder's watchdog kills
    it once a ping goes unanswered; the next worker serves the blocked reader S3's bytes."""
    data = bucket.put("w.bin", seeded(4 * CHUNK, "w"))
    with serve_door("kernel", f"s3://{bucket.name}", tmp_path, moto.endpoint, *RANGED,
                    "watchdog=1s") as d:
        holder = d.proc.pid
        stuck = _worker_pid(holder)
        os.kill(stuck, signal.SIGSTOP)
        reader = subprocess.Popen(["sha256sum", str(d.root / "w.bin")], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        try:
            out, err = reader.communicate(timeout=60)
        finally:
            if reader.poll() is None:
                reader.kill()
            with contextlib.suppress(ProcessLookupError):
                os.kill(stuck, signal.SIGCONT)  # if the test failed before the watchdog
        assert out.split()[0].decode() == sha256(data), err
        wait_until(lambda: len(_worker_pids(holder)) == 1 and stuck not in _worker_pids(holder),
                   20, "a new worker")
        assert "has not answered a ping" in d.log()


def test_a_slow_s3_does_not_trip_the_watchdog(bucket: Bucket, fault_proxy,
                                              tmp_path: Path) -> None:
    """Fetches wait in threads, so the worker's loop keeps answering pings while every GET
    takes three times the watchdog's time: the same worker serves the read."""
    data = bucket.put("s.bin", seeded(2 * CHUNK, "s"))
    with serve_door("kernel", f"s3://{bucket.name}", tmp_path, fault_proxy.endpoint,
                    *RANGED, "watchdog=1s") as d:
        worker = _worker_pid(d.proc.pid)
        fault_proxy.set_delay(3000, method="GET")
        try:
            assert file_sha256(d.root / "s.bin") == sha256(data)
        finally:
            fault_proxy.restore()
        assert _worker_pid(d.proc.pid) == worker
        assert "has not answered a ping" not in d.log()
