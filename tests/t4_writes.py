"""The kernel door notices writes (issue 11, item 2), through the real door.

Real parts only: ``hsmfs serve -f`` (holder + worker, a real fanotify pre-content group) on a
backing tree, a real moto S3 server, unaware programs as bounded subprocesses (``sh -c 'echo
>>'``, ``dd conv=notrunc``, ``truncate``, ``fallocate --punch-hole``, Python programs that
pwrite, store through a shared mmap, or save like an editor).
After each write the file must hold exactly what the program wrote over S3's bytes (every other
byte equal to S3's, never a zero where S3 had data), ``hsmfs state --json`` must say ``dirty``
(``local`` for a file a program created and renamed over a stub: it has no record), and the
worker must still be the one that started.  The door's own fills must never make a file dirty.

One daemon per mark layout serves every case (inode marks on a cache inside ``/``; a filesystem
mark on a loop ext4 cache); the file stays well under 40 s.  The measured facts these rest on
are KERNEL_FACTS_3 §2 and docs/kernel_writes.md.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Bucket, MotoServer, run, stop_process
from support.doors import Served, serve_door
from t4_fsmark import loop_cache

pytestmark = [pytest.mark.needs_precontent, pytest.mark.timeout(90)]

KiB, MiB = 1 << 10, 1 << 20
# Ranged fetches, no whole-file shortcut, no open-time fill: a read fetches a few pages, so a
# stub stays partial for the dd case; a write must then make the rest local itself.
RANGED = ("chunk=64K", "small_file=0", "max_request=256K", "readahead=64K", "open_fill=off",
          "cover=off")


def blob(n: int, seed: str) -> bytes:
    return random.Random(seed).randbytes(n)


def state(path: Path) -> str:
    out = run([sys.executable, "-m", "hsmfs", "state", "--json", str(path)], timeout=20)
    assert out.returncode == 0, f"hsmfs state {path}: {out.stderr.decode().strip()}"
    [row] = json.loads(out.stdout)
    return row["state"]


def wait_state(path: Path, want: str, timeout: float = 5.0) -> str:
    """The state once it is ``want`` (a notice lands after the write), or the last one seen."""
    deadline = time.monotonic() + timeout
    while True:
        now = state(path)
        if now == want or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def sh(cmd: list[str], timeout: float = 30) -> None:
    out = run(cmd, timeout=timeout)
    assert out.returncode == 0, f"{cmd}: exit {out.returncode}: {out.stderr.decode().strip()}"


def read(path: Path) -> bytes:
    out = run(["cat", str(path)], timeout=30)
    assert out.returncode == 0, f"cat {path}: {out.stderr.decode().strip()}"
    return out.stdout


def diff(got: bytes, want: bytes) -> str:
    if got == want:
        return "equal"
    if len(got) != len(want):
        return f"{len(got)} bytes, want {len(want)}"
    first = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
    zeros = not any(got[first:first + 64])
    return f"first difference at byte {first}{' (zeros: a hole served as data)' if zeros else ''}"


def worker_pids(d: Served) -> list[str]:
    return [line.split("worker pid ")[1].split()[0] for line in d.log().splitlines()
            if "worker pid " in line and " ready after " in line]


@contextlib.contextmanager
def serving(bucket: Bucket, moto: MotoServer, tmp_path: Path, layout: str) -> Iterator[Served]:
    """The kernel door on a cache inside ``/`` (one inode mark per stub) or on the root of a
    fresh ext4 loop image (one filesystem mark: every local file raises FAN_MODIFY too)."""
    with contextlib.ExitStack() as stack:
        workdir = tmp_path / "w"
        if layout == "filesystem":
            workdir = stack.enter_context(loop_cache("ext4", tmp_path))
        d = stack.enter_context(serve_door("kernel", f"s3://{bucket.name}", workdir,
                                           moto.endpoint, *RANGED))
        try:
            assert d.stats()["kernel"]["mark"] == ("filesystem" if layout == "filesystem"
                                                   else "inode")
            yield d
        finally:
            stop_process(d.proc, timeout=15)


PY_PWRITE = ("import os,sys; fd=os.open(sys.argv[1],os.O_WRONLY); "
             "os.pwrite(fd,b'PW'*50,int(sys.argv[2]))")
PY_MMAP = ("import mmap,os,sys; fd=os.open(sys.argv[1],os.O_RDWR); m=mmap.mmap(fd,65536); "
           "os.close(fd); m[5000:5010]=b'M'*10; m.flush(); m.close()")
PY_SAVE = ("import os,sys; p=sys.argv[1]; t=p+'.swp'; fd=os.open(t,os.O_WRONLY|os.O_CREAT,0o644); "
           "os.write(fd,sys.argv[2].encode()); os.fsync(fd); os.close(fd); os.rename(t,p)")


@pytest.mark.parametrize("layout", ["inode", "filesystem"])
def test_writes_through_the_kernel_door_are_recorded_dirty(bucket: Bucket, moto: MotoServer,
                                                           tmp_path: Path, layout: str) -> None:
    objs = {
        "echo.txt": blob(200 * KiB, "echo"),
        "dd.bin": blob(MiB, "dd"),
        "pw.bin": blob(300 * KiB, "pw"),
        "save.txt": blob(50 * KiB, "save"),
        "trunc.bin": blob(MiB, "trunc"),
        "cold.bin": blob(700 * KiB, "cold"),
        "mmap.bin": blob(300 * KiB, "mmap"),
        "punch.bin": blob(300 * KiB, "punch"),
    }
    for key, data in objs.items():
        bucket.put(f"w/{key}", data)
    problems: list[str] = []
    with serving(bucket, moto, tmp_path, layout) as d:
        root = d.root / "w"
        [worker] = worker_pids(d)

        # The door's own fills never make a file dirty: a cold whole read (every byte fetched
        # through the private door, which raises no FAN_MODIFY).
        got = read(root / "cold.bin")
        if got != objs["cold.bin"]:
            problems.append(f"cold.bin read whole: {diff(got, objs['cold.bin'])}")
        time.sleep(0.5)  # a notice, if one came, would have landed
        if (s := state(root / "cold.bin")) != "resident":
            problems.append(f"cold.bin after a whole cold read is {s}, want resident (clean)")

        # echo >> on a stub: an O_APPEND write (reported at offset 0: KF §3).
        sh(["sh", "-c", f"echo appended >> {root / 'echo.txt'}"])
        want = objs["echo.txt"] + b"appended\n"
        if (got := read(root / "echo.txt")) != want:
            problems.append(f"echo.txt after echo >>: {diff(got, want)}")
        if (s := state(root / "echo.txt")) != "dirty":
            problems.append(f"echo.txt after echo >> is {s}, want dirty")

        # dd conv=notrunc into a partial stub (a page read first, far from the write).
        sh(["dd", f"if={root / 'dd.bin'}", "of=/dev/null", "bs=4096", "count=1", "skip=200",
            "status=none"])
        src = tmp_path / "patch"
        src.write_bytes(b"D" * 10000)
        sh(["dd", f"if={src}", f"of={root / 'dd.bin'}", "bs=10000", "count=1",
            "oflag=seek_bytes", "seek=300001", "conv=notrunc", "status=none"])
        want = bytearray(objs["dd.bin"])
        want[300001:310001] = b"D" * 10000
        if (got := read(root / "dd.bin")) != want:
            problems.append(f"dd.bin after dd conv=notrunc: {diff(got, bytes(want))}")
        if (s := state(root / "dd.bin")) != "dirty":
            problems.append(f"dd.bin after dd conv=notrunc is {s}, want dirty")

        # A pwrite into a resident file: no PRE_ACCESS (ignored), seen by FAN_MODIFY after.
        read(root / "pw.bin")
        if (s := wait_state(root / "pw.bin", "resident")) != "resident":
            problems.append(f"pw.bin after a whole read is {s}, want resident")
        sh([sys.executable, "-c", PY_PWRITE, str(root / "pw.bin"), "5000"])
        want = bytearray(objs["pw.bin"])
        want[5000:5100] = b"PW" * 50
        if (got := read(root / "pw.bin")) != want:
            problems.append(f"pw.bin after pwrite: {diff(got, bytes(want))}")
        if (s := wait_state(root / "pw.bin", "dirty")) != "dirty":
            problems.append(f"pw.bin (resident) after pwrite is {s}, want dirty")
        # A dirty file's writes raise no more notices (FAN_MODIFY in its ignore mask).
        before = d.stats()
        for off in (0, 8192, 65536):
            sh([sys.executable, "-c", PY_PWRITE, str(root / "pw.bin"), str(off)])
        time.sleep(0.3)
        kernel = d.stats().get("kernel", {})
        if kernel.get("notices", 0) != before.get("kernel", {}).get("notices", 0):
            problems.append(f"pwrites to a dirty file still raised notices: {kernel}")

        # Stores through a shared writable mapping of a stub raise nothing after mmap(): the
        # mapping itself (mmap with PROT_WRITE|MAP_SHARED) is taken as the write.
        sh([sys.executable, "-c", PY_MMAP, str(root / "mmap.bin")])
        want = bytearray(objs["mmap.bin"])
        want[5000:5010] = b"M" * 10
        if (got := read(root / "mmap.bin")) != want:
            problems.append(f"mmap.bin after a shared mmap store: {diff(got, bytes(want))}")
        if (s := state(root / "mmap.bin")) != "dirty":
            problems.append(f"mmap.bin after a shared mmap store is {s}, want dirty")

        # fallocate --punch-hole into a stub: the punched range reads zeros, the rest S3's.
        sh(["fallocate", "--punch-hole", "--offset", "8192", "--length", "8192",
            str(root / "punch.bin")])
        want = bytearray(objs["punch.bin"])
        want[8192:16384] = bytes(8192)
        if (got := read(root / "punch.bin")) != want:
            problems.append(f"punch.bin after fallocate --punch-hole: {diff(got, bytes(want))}")
        if (s := state(root / "punch.bin")) != "dirty":
            problems.append(f"punch.bin after fallocate --punch-hole is {s}, want dirty")

        # Editor-style save: write a new file, fsync, rename it over a stub.
        sh([sys.executable, "-c", PY_SAVE, str(root / "save.txt"), "new contents\n"])
        if (got := read(root / "save.txt")) != b"new contents\n":
            problems.append(f"save.txt after the save: {got[:40]!r}")
        if (s := state(root / "save.txt")) != "local":
            problems.append(f"save.txt after a rename over it is {s}, want local (no record)")
        # With a filesystem mark a local file raises FAN_MODIFY: one notice, then it is ignored.
        before = d.stats().get("kernel", {}).get("notices", 0)
        for off in (0, 4096, 8192):
            sh([sys.executable, "-c", PY_PWRITE, str(root / "save.txt"), str(off)])
        time.sleep(0.3)
        after = d.stats().get("kernel", {}).get("notices", 0)
        if after - before > 1:
            problems.append(f"3 pwrites to a local file raised {after - before} notices, want "
                            "at most 1")

        # truncate -s of a stub: shorter, and longer again.
        sh(["truncate", "-s", "100000", str(root / "trunc.bin")])
        if (got := read(root / "trunc.bin")) != objs["trunc.bin"][:100000]:
            problems.append(f"trunc.bin after truncate -s 100000: "
                            f"{diff(got, objs['trunc.bin'][:100000])}")
        if (s := state(root / "trunc.bin")) != "dirty":
            problems.append(f"trunc.bin after truncate is {s}, want dirty")

        kernel = d.stats().get("kernel", {})
        # echo >>, dd, mmap and fallocate went through Intent.WRITE (PRE_ACCESS in a write
        # syscall); the pwrite into the resident file through a notice.
        if kernel.get("writes", 0) < 4 or kernel.get("marked_dirty", 0) < 1:
            problems.append(f"the door did not see the writes as writes: {kernel}")
        if "worker gone" in d.log() or worker_pids(d) != [worker]:
            problems.append("the worker died:\n" + "\n".join(d.log().splitlines()[-30:]))
    assert not problems, "\n".join(problems)


def test_an_mmap_store_or_truncate_of_a_resident_file_is_seen_at_its_close(
        bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    """Neither raises FAN_MODIFY (KERNEL_FACTS_3 §2); the close (FAN_CLOSE_WRITE) lets the core
    compare the file's length and mtime with its version's."""
    objs = {name: bucket.put(name, blob(256 * 1024, name)) for name in ("m.bin", "t.bin")}
    with serving(bucket, moto, tmp_path, "inode") as d:
        root = d.root
        for name in objs:
            assert read(root / name) == objs[name]
            assert wait_state(root / name, "resident") == "resident"
        code = ("import mmap, os, sys, time\n"
                "fd = os.open(sys.argv[1], os.O_RDWR)\n"
                "m = mmap.mmap(fd, 0)\n"
                "time.sleep(0.05)\n"  # a store a little later than the open: another mtime
                "m[4096:4100] = b'MMAP'\n"
                "m.flush(); m.close(); os.close(fd)\n")
        sh([sys.executable, "-c", code, str(root / "m.bin")])
        want = bytearray(objs["m.bin"])
        want[4096:4100] = b"MMAP"
        assert read(root / "m.bin") == bytes(want)
        assert wait_state(root / "m.bin", "dirty") == "dirty"
        sh([sys.executable, "-c", "import os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
            "os.ftruncate(fd, 1000); os.close(fd)", str(root / "t.bin")])
        assert read(root / "t.bin") == objs["t.bin"][:1000]
        assert wait_state(root / "t.bin", "dirty") == "dirty"
