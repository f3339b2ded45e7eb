"""File state that cannot lie (issue 10, defects 2-6), through the real kernel door.

Real parts only: ``hsmfs serve -f`` as a subprocess guarding a backing tree with fanotify
pre-content events, a real moto S3 server over loopback HTTP, unaware programs as processes.
Every byte an application reads is compared with the bytes S3 holds (or held, for local data);
a read may also fail with the table's errno (EIO) where the issue says so, never return zeros.

* D2: a program holds an fd of a stub; the object is replaced (or deleted) in S3 and the worker
  is SIGKILLed.  The restarted worker no longer knows the old inode: a read of the held fd must
  fail with EIO, not be allowed over a hole.
* D3: a file renamed over an unread stub that a program holds open, and Python rewriting stale
  ``__pycache__/*.pyc`` through the door: right bytes or EIO, and the worker lives on.
* D4: a local truncate, then a remote change or delete, then a restart: the local data is kept
  (``conflict``); clean stubs follow S3.
* D5: a shrinking truncate fetches none of the bytes it throws away.
* D6: a forged ``user.*`` state word is not trusted at restart, and a SIGKILL of the whole
  daemon in the middle of fills leaves no wrong byte after the restart.

Every wait is bounded (subprocess timeouts, deadlines in loops, a pytest-timeout per test);
every process started here is stopped by PID or process group, even when a test fails.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import os
import py_compile
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Bucket, MotoServer, run, sha256, stop_process
from support.doors import Served, serve_door
from support.heldfd import (
    FdProgram,
    ReadFailed,
    group_alive,
    the_worker,
    wait_new_worker_ready,
    worker_pids,
)

pytestmark = [pytest.mark.needs_precontent, pytest.mark.timeout(120)]

KiB, MiB = 1 << 10, 1 << 20
CHUNK = 64 * KiB
# Small chunks and windows, no whole-file shortcut, no open-time fill: a read fetches a few
# pages, so most of a stub stays a hole for the scenarios to aim at.
RANGED = ("chunk=64K", "small_file=0", "max_request=256K", "readahead=256K", "open_fill=off")


# -- helpers -----------------------------------------------------------------------------------

def blob(n: int, seed: str) -> bytes:
    """Deterministic bytes, fast enough for tens of MiB (and never a run of zeros)."""
    return random.Random(seed).randbytes(n)


def what(got: bytes, want: bytes | None = None, other: bytes | None = None) -> str:
    """Name what a read returned, for failure messages."""
    if want is not None and got == want:
        return "the right bytes"
    if other is not None and got == other:
        return "the NEW object's bytes"
    if not got:
        return "nothing (EOF)"
    if not any(got):
        return f"{len(got)} zero bytes (a hole served as data)"
    if want is not None:
        pairs = enumerate(zip(got, want, strict=False))
        first = next((i for i, (a, b) in pairs if a != b), min(len(got), len(want)))
        rest = got[first:]
        if rest and not any(rest):
            return (f"{len(got)} bytes, right up to offset {first} and zeros from there "
                    f"({len(rest)} zero bytes: a hole served as data)")
        return (f"{len(got)} bytes (want {len(want)}), wrong from offset {first}: "
                f"{rest[:12].hex()}...")
    return f"{len(got)} wrong bytes {got[:12].hex()}..."


def log_tail(d: Served, n: int = 25) -> str:
    lines = d.log().splitlines()
    return "\n".join(lines[-n:])


def cat(path: Path, timeout: float = 30) -> bytes:
    """The whole file as ``cat`` reads it (a bounded subprocess: a hung read is killed)."""
    out = run(["cat", str(path)], timeout=timeout)
    if out.returncode != 0:
        raise OSError(f"cat {path}: exit {out.returncode}: {out.stderr.decode().strip()}")
    return out.stdout


def truncate(path: Path, size: int) -> None:
    out = run(["truncate", "-s", str(size), str(path)])
    assert out.returncode == 0, f"truncate -s {size} {path}: {out.stderr.decode().strip()}"


def hsmfs_state(path: Path) -> dict:
    out = run([sys.executable, "-m", "hsmfs", "state", "--json", str(path)])
    assert out.returncode == 0, f"hsmfs state {path}: {out.stderr.decode().strip()}"
    [row] = json.loads(out.stdout)
    return row


def reap_group(pgid: int, timeout: float = 15) -> None:
    """Wait (bounded) until no process of the daemon's group is left; SIGKILL what remains."""
    deadline = time.monotonic() + timeout
    while group_alive(pgid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            time.sleep(0.2)
            left = group_alive(pgid)
            assert not left, f"processes {left} of daemon group {pgid} survived SIGKILL"
            return
        time.sleep(0.05)


@contextlib.contextmanager
def serving(bucket: Bucket, moto: MotoServer, workdir: Path, *opts: str) -> Iterator[Served]:
    """``hsmfs serve -f`` on ``workdir/cache`` (kernel door); on exit the daemon is stopped
    (SIGTERM, bounded) and its whole process group is gone, whatever happened."""
    with serve_door("kernel", f"s3://{bucket.name}", workdir, moto.endpoint, *opts) as d:
        try:
            yield d
        finally:
            stop_process(d.proc, timeout=15)
            reap_group(d.proc.pid)


def keep_log(d: Served, name: str) -> None:
    """serve_door truncates its log at the next start: keep this run's for the post-mortem."""
    with contextlib.suppress(OSError):
        (d.log_path.parent / name).write_bytes(d.log_path.read_bytes())


def worker_died(d: Served, worker: int, settle: float = 0.5) -> str | None:
    """Why the worker ``worker`` is not serving any more (it crashed), or None.  Watches for
    ``settle`` seconds: a crash may come just after the reply that caused it."""
    deadline = time.monotonic() + settle
    while True:
        if "worker gone" in d.log():
            return "the holder logged 'worker gone':\n" + log_tail(d)
        now = worker_pids(d.proc.pid, d.log())
        if now != [worker]:
            return f"worker pid {worker} is gone (workers now {now}):\n" + log_tail(d)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


# -- D2: zeros after a worker restart ----------------------------------------------------------

@pytest.mark.parametrize("change", ["replaced", "deleted"])
def test_held_fd_after_worker_restart_gets_eio_not_zeros(
        change: str, bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    """A program keeps an fd of a 16 MiB stub it read 4 bytes of; the object is replaced (or
    deleted) in S3 and the worker SIGKILLed.  The restarted worker re-populates and no longer
    knows the old inode; the old version is gone from an unversioned bucket, so a read of a
    hole through the held fd can only fail: EIO, never zeros, never the new object's bytes."""
    size = 16 * MiB
    old = bucket.put("big.bin", blob(size, "d2-old"))
    new = None
    with serving(bucket, moto, tmp_path, *RANGED) as d, FdProgram() as app:
        fd = app.open(d.root / "big.bin")
        got = app.pread(fd, 4, 0)
        assert got == old[:4], f"first read: {what(got, old[:4])}"
        if change == "replaced":
            new = bucket.put("big.bin", blob(size, "d2-new"))
        else:
            bucket.delete("big.bin")
        worker = the_worker(d.proc.pid, d.log_path)
        os.kill(worker, signal.SIGKILL)
        wait_new_worker_ready(d.log_path, worker, timeout=30)
        off = 8 * MiB
        try:
            got = app.pread(fd, 4, off)
        except ReadFailed as exc:
            assert exc.errno == errno.EIO, (
                f"pread(held fd, 4, 8 MiB) after the object was {change} and the worker "
                f"restarted failed with errno {exc.errno} ({exc}); want EIO")
            return
        pytest.fail(
            f"pread(held fd, 4, 8 MiB) after the object was {change} and the worker restarted "
            f"returned {what(got, None, None if new is None else new[off:off + 4])} "
            f"{got!r}; want EIO (the old version cannot be fetched any more)\n" + log_tail(d))


# -- D3: renaming a file over an unread stub ---------------------------------------------------

def test_rename_over_an_unread_stub_held_open(bucket: Bucket, moto: MotoServer,
                                              tmp_path: Path) -> None:
    """A program opens an unread stub and keeps the fd; another process renames a new local
    file over the stub's path.  Reads of the old fd give the stub's bytes (S3 still has that
    version) or EIO, never zeros; the worker does not die; another stub still reads right; the
    local file that took the path keeps its bytes."""
    victim = bucket.put("d/victim.bin", blob(4 * CHUNK, "d3-victim"))
    other = bucket.put("d/other.bin", blob(4 * CHUNK, "d3-other"))
    local = b"a local file renamed over the stub\n" * 1000
    problems: list[str] = []
    with serving(bucket, moto, tmp_path, *RANGED) as d, FdProgram() as app:
        worker = the_worker(d.proc.pid, d.log_path)
        fd = app.open(d.root / "d/victim.bin")
        (d.root / "d/victim.new").write_bytes(local)
        mv = run(["mv", "-f", str(d.root / "d/victim.new"), str(d.root / "d/victim.bin")])
        assert mv.returncode == 0, mv.stderr
        for off in (0, 2 * CHUNK + 100):
            want = victim[off:off + 4096]
            try:
                got = app.pread(fd, 4096, off)
            except ReadFailed as exc:
                if exc.errno != errno.EIO:
                    problems.append(f"held fd, pread at {off}: errno {exc.errno} ({exc}); "
                                    "want the stub's bytes or EIO")
                continue
            if got != want:
                problems.append(f"held fd, pread at {off}: {what(got, want)}; want the "
                                "stub's bytes from S3 or EIO")
        died = worker_died(d, worker)
        if died:
            problems.append("the worker crashed on the renamed-over stub: " + died)
        got = cat(d.root / "d/other.bin")
        if got != other:
            problems.append(f"another stub read afterwards: {what(got, other)}")
        got = cat(d.root / "d/victim.bin")
        if got != local:
            problems.append(f"the local file renamed over the stub reads {what(got, local)}")
    assert not problems, "\n".join(problems)


def _stale_package(bucket: Bucket, scratch: Path, n: int) -> dict[str, bytes]:
    """Upload ``pkg`` (``__init__``, ``mod`` and ``n`` modules ``mod`` imports, last first)
    and, for each, a ``__pycache__`` .pyc compiled from different source, so Python finds
    every .pyc stale (recorded source size and mtime differ) and rewrites it."""
    sources = {f"pkg/m{i:02d}.py": f"V = {i}\n" for i in range(n)}
    sources["pkg/__init__.py"] = "X = 1\n"
    sources["pkg/mod.py"] = ("".join(f"from . import m{i:02d}\n" for i in reversed(range(n)))
                             + "VALUE = 'fresh-from-s3'\n")
    for rel, text in sources.items():
        bucket.put(rel, text.encode())
        old = scratch / rel
        old.parent.mkdir(parents=True, exist_ok=True)
        old.write_text(text.replace("fresh-from-s3", "stale-pyc") + "# an older version\n")
        pyc = Path(importlib.util.cache_from_source(str(old)))
        py_compile.compile(str(old), cfile=str(pyc), doraise=True)
        bucket.put(f"pkg/__pycache__/{pyc.name}", pyc.read_bytes())
    return {rel: text.encode() for rel, text in sources.items()}


def test_python_rewrites_stale_pyc_through_the_door(bucket: Bucket, moto: MotoServer,
                                                    tmp_path: Path) -> None:
    """``import pkg.mod`` with stale .pyc objects: Python reads each .pyc, finds it stale,
    compiles the source and renames a new .pyc over the stub.  The import succeeds (twice),
    the worker lives on, and the sources and another stub still read S3's bytes."""
    sources = _stale_package(bucket, tmp_path / "scratch", 8)
    other = bucket.put("other.bin", blob(4 * CHUNK, "d3-pyc-other"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    problems: list[str] = []
    with serving(bucket, moto, tmp_path / "w", *RANGED) as d:
        env["PYTHONPATH"] = str(d.root)
        worker = the_worker(d.proc.pid, d.log_path)
        for attempt in ("first", "second"):
            out = run([sys.executable, "-c", "import pkg.mod; print(pkg.mod.VALUE)"], env=env,
                      cwd=tmp_path)
            if out.returncode != 0 or out.stdout != b"fresh-from-s3\n":
                problems.append(f"{attempt} import: exit {out.returncode}, stdout "
                                f"{out.stdout!r}, stderr {out.stderr.decode()[-800:]}")
        died = worker_died(d, worker)
        if died:
            problems.append("the worker crashed while Python rewrote .pyc files: " + died)
        for rel, want in sources.items():
            got = cat(d.root / rel)
            if got != want:
                problems.append(f"{rel} reads {what(got, want)}")
        got = cat(d.root / "other.bin")
        if got != other:
            problems.append(f"another stub read afterwards: {what(got, other)}")
    assert not problems, "\n".join(problems)


# -- D4: local changes kept across a restart ---------------------------------------------------

def test_local_changes_survive_a_restart_after_a_remote_change(
        bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    """Truncate files locally (one read whole first, one read in part), stop, change or delete
    their objects in S3, start again on the same cache: each keeps its 100 local bytes and is
    reported ``conflict``.  Clean never-read stubs follow S3: refreshed, or gone."""
    size = MiB + 4097
    names = {  # name -> (how it was read before the truncate, what happens in S3)
        "whole-replaced.bin": ("whole", "replace"),
        "whole-deleted.bin": ("whole", "delete"),
        "part-replaced.bin": ("part", "replace"),
        "part-deleted.bin": ("part", "delete"),
        "whole-unchanged.bin": ("whole", None),
    }
    orig = {name: bucket.put(name, blob(size, f"d4-{name}")) for name in names}
    clean_new = bucket.put("clean-replaced.bin", blob(size, "d4-clean-old"))
    bucket.put("clean-deleted.bin", blob(size, "d4-clean-gone"))
    with serving(bucket, moto, tmp_path, *RANGED) as d:
        for name, (how, _) in names.items():
            path = d.root / name
            if how == "whole":
                got = cat(path)
                assert got == orig[name], f"{name}: first read {what(got, orig[name])}"
            else:
                with FdProgram() as app:
                    fd = app.open(path)
                    got = app.pread(fd, 4096, 0)
                    assert got == orig[name][:4096], f"{name}: {what(got, orig[name][:4096])}"
            truncate(path, 100)
            assert path.stat().st_size == 100
        keep_log(d, "run1.log")
    remote: dict[str, bytes] = {}
    for name, (_, change) in names.items():
        if change == "replace":
            remote[name] = bucket.put(name, blob(size + 1, f"d4-{name}-v2"))
        elif change == "delete":
            bucket.delete(name)
    clean_new = bucket.put("clean-replaced.bin", blob(size, "d4-clean-new"))
    bucket.delete("clean-deleted.bin")
    problems: list[str] = []
    with serving(bucket, moto, tmp_path, *RANGED) as d:
        # clean stubs first: they follow S3 (these held before the fix too)
        try:
            got = cat(d.root / "clean-replaced.bin")
            if got != clean_new:
                problems.append(f"clean-replaced.bin: {what(got, clean_new)}; want the new "
                                "object's bytes")
        except OSError as exc:
            problems.append(f"clean-replaced.bin: {exc}")
        if (d.root / "clean-deleted.bin").exists():
            problems.append("clean-deleted.bin: still there though its object is gone")
        for name, (_, change) in names.items():
            path = d.root / name
            if not path.exists():
                problems.append(f"{name} (truncated locally, object {change}d): the file is "
                                "GONE: local data destroyed at the start")
                continue
            st_size = path.stat().st_size
            if st_size != 100:
                problems.append(f"{name} (truncated locally, object {change}d): size "
                                f"{st_size}, want the local 100")
            try:
                got = cat(path)[:100]
                if got != orig[name][:100]:
                    new = remote.get(name, b"")[:100] or None
                    problems.append(f"{name}: first 100 bytes are "
                                    f"{what(got, orig[name][:100], new)}; want the original "
                                    "object's (the local data)")
            except OSError as exc:
                problems.append(f"{name}: {exc}")
            if change is not None:
                state = hsmfs_state(path).get("state")
                if state != "conflict":
                    problems.append(f"{name}: hsmfs state says {state!r}, want 'conflict'")
    assert not problems, "\n".join(problems)


# -- D5: a shrinking truncate fetches nothing it throws away -----------------------------------

def test_shrinking_truncate_fetches_nothing_it_throws_away(bucket: Bucket, moto: MotoServer,
                                                           tmp_path: Path) -> None:
    """``truncate -s`` of unread 32 MiB stubs: the kernel reports ftruncate as (new size,
    count 0); none of the bytes above the new size may be fetched."""
    size = 32 * MiB
    a = bucket.put("t/a.bin", blob(size, "d5-a"))
    bucket.put("t/b.bin", blob(size, "d5-b"))
    c = bucket.put("t/c.bin", blob(size, "d5-c"))
    problems: list[str] = []
    with serving(bucket, moto, tmp_path) as d:
        fetched = d.stats()["fetched_bytes"]
        truncate(d.root / "t/a.bin", MiB)
        delta = d.stats()["fetched_bytes"] - fetched
        if delta >= MiB:
            problems.append(f"truncate -s 1M of a 32 MiB stub fetched {delta} bytes; want "
                            "under 1 MiB (at most a page or so)")
        if (d.root / "t/a.bin").stat().st_size != MiB:
            problems.append(f"a.bin: size {(d.root / 't/a.bin').stat().st_size} after -s 1M")
        got = cat(d.root / "t/a.bin")
        if got != a[:MiB]:
            problems.append(f"a.bin after truncate -s 1M reads {what(got, a[:MiB])}")

        fetched = d.stats()["fetched_bytes"]
        truncate(d.root / "t/b.bin", 0)
        delta = d.stats()["fetched_bytes"] - fetched
        if delta != 0:
            problems.append(f"truncate -s 0 of a 32 MiB stub fetched {delta} bytes; want 0")
        if (d.root / "t/b.bin").stat().st_size != 0:
            problems.append("b.bin: not empty after truncate -s 0")

        fetched = d.stats()["fetched_bytes"]
        truncate(d.root / "t/c.bin", 100000)
        delta = d.stats()["fetched_bytes"] - fetched
        if delta >= 4 * MiB:
            problems.append(f"truncate -s 100000 of a 32 MiB stub fetched {delta} bytes; "
                            "want no more than the partial page's chunk")
        got = cat(d.root / "t/c.bin")
        if got != c[:100000]:
            problems.append(f"c.bin after truncate -s 100000 reads {what(got, c[:100000])}")
    assert not problems, "\n".join(problems)


# -- D6: no state word is trusted at restart ---------------------------------------------------

FORGERIES = {  # file -> the user.* xattrs an application sets on a never-read stub
    "resident.bin": {"user.hsm.state": "resident"},
    "dirty.bin": {"user.hsm.state": "dirty"},
    "size.bin": {"user.hsmfs.size": "1"},
    "size-resident.bin": {"user.hsmfs.size": "4096", "user.hsm.state": "resident"},
    "flag-resident.bin": {"user.hsmfs.dirty": "1", "user.hsm.state": "resident"},
    "etag.bin": {"user.hsmfs.etag": '"0123456789abcdef0123456789abcdef"'},
}


def test_forged_state_xattrs_are_not_trusted_at_restart(bucket: Bucket, moto: MotoServer,
                                                        tmp_path: Path) -> None:
    """Serve, stop, forge state words on never-read stubs with ``setfattr`` (anyone who can
    write the file can), start again: every stub still reads S3's bytes, not zeros."""
    data = {name: bucket.put(f"f/{name}", blob(4 * CHUNK + 123, f"d6-{name}"))
            for name in FORGERIES}
    with serving(bucket, moto, tmp_path, *RANGED) as d:
        root = d.root
        keep_log(d, "run1.log")
    # The stop covered the tree (hsmfs.cover): an admin lifts the cover, and anyone who may
    # write the files forges while no daemon runs.
    out = run([sys.executable, "-m", "hsmfs.cover", "uncover", str(root)])
    assert out.returncode == 0, out.stderr.decode()
    for name, xattrs in FORGERIES.items():
        for attr, value in xattrs.items():
            out = run(["setfattr", "-n", attr, "-v", value, str(root / "f" / name)])
            assert out.returncode == 0, f"setfattr {attr} on {name}: {out.stderr.decode()}"
    problems: list[str] = []
    with serving(bucket, moto, tmp_path, *RANGED) as d:
        for name, xattrs in FORGERIES.items():
            try:
                got = cat(d.root / "f" / name)
            except OSError as exc:
                problems.append(f"{name} with forged {xattrs}: {exc}; want S3's bytes")
                continue
            if got != data[name]:
                problems.append(f"{name} with forged {xattrs}: {what(got, data[name])}")
    assert not problems, "\n".join(problems)


_READER = r"""
import os, random, sys, time
paths, seed, until = sys.argv[1:-2], int(sys.argv[-2]), time.monotonic() + float(sys.argv[-1])
rng = random.Random(seed)
fds = [os.open(p, os.O_RDONLY) for p in paths]
size = os.fstat(fds[0]).st_size
while time.monotonic() < until:
    fd = rng.choice(fds)
    n = rng.choice([4096, 16384, 65536, 200000])
    try:
        os.pread(fd, n, rng.randrange(0, size))
    except OSError:
        pass
"""


def test_sigkill_of_the_daemon_mid_fill_leaves_no_wrong_byte(
        bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    """Readers hit random ranges of cold stubs; the whole daemon (holder and worker, its
    process group) is SIGKILLed in the middle of its fills and started again on the same
    cache: every byte read after the restart, by range and whole, equals S3's."""
    size = 8 * MiB
    names = [f"c/{i}.bin" for i in range(3)]
    data = {name: bucket.put(name, blob(size, f"d6-crash-{name}")) for name in names}
    readers: list[subprocess.Popen] = []
    try:
        with serving(bucket, moto, tmp_path, *RANGED) as d:
            paths = [str(d.root / n) for n in names]
            for seed in range(3):
                readers.append(subprocess.Popen([sys.executable, "-c", _READER, *paths,
                                                 str(seed), "20"]))
            deadline = time.monotonic() + 20
            while d.stats()["fetched_bytes"] < 2 * MiB:  # well into the fills
                assert time.monotonic() < deadline, "readers fetched nothing in 20 s"
                time.sleep(0.05)
            os.killpg(d.proc.pid, signal.SIGKILL)
            d.proc.wait(10)
            reap_group(d.proc.pid, timeout=10)
            keep_log(d, "run1.log")
    finally:
        for r in readers:
            with contextlib.suppress(ProcessLookupError):
                r.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                r.wait(10)
    problems: list[str] = []
    rng = random.Random(10)
    with serving(bucket, moto, tmp_path, *RANGED) as d, FdProgram() as app:
        for name in names:
            fd = app.open(d.root / name)
            for _ in range(40):
                off, n = rng.randrange(0, size), rng.choice([4096, 65536, 300000])
                try:
                    got = app.pread(fd, n, off)
                except ReadFailed as exc:
                    problems.append(f"{name} [{off}, +{n}): errno {exc.errno} ({exc})")
                    continue
                want = data[name][off:off + n]
                if got != want:
                    problems.append(f"{name} [{off}, +{n}): {what(got, want)}")
        for name in names:
            got = cat(d.root / name)
            if sha256(got) != sha256(data[name]):
                problems.append(f"{name} whole: {what(got, data[name])}")
    assert not problems, "\n".join(problems[:20])
