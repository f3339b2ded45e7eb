"""``hsmfs release`` and ``hsmfs pin``/``unpin`` through the real doors (issue 12, item 1).

Real parts only: ``hsmfs serve -f`` (the kernel door: fanotify pre-content events on the
backing tree) and ``hsmfs mount -f`` (the FUSE door; with ``-o kernel`` both doors in one daemon
over the same backing files), a real moto S3 server over loopback HTTP, unaware programs as
processes (``cat``, a program holding an fd, a program holding a mapping).  Every byte read is
compared with the bytes S3 holds.

* a release frees the space (``st_blocks`` ~0), keeps size, mtime and mode, the file says
  ``stub``, and a re-read through either door fetches S3's bytes again (the FUSE door's page
  cache is invalidated);
* a dirty or conflicting file is refused and keeps its bytes;
* a file a program holds open, or mapped (fd closed, mapping alive), is refused with EBUSY
  through either door, and the program's bytes stay right;
* readers through both doors racing with repeated releases never see a wrong byte;
* a pin blocks release (and makes the file resident), survives a restart; unpin allows it;
* SIGKILL of the daemon between the punch and the record, then a restart: right bytes, the
  file counted by its extents.

Every wait is bounded; every process is stopped by PID (or process group) even on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Bucket, MotoServer, force_unmount, run, sha256, stop_process
from support.doors import DOORS, Served, serve_door
from support.heldfd import FdProgram

from hsmfs import control
from hsmfs.cover import uncover

pytestmark = [pytest.mark.timeout(180)]

KiB, MiB = 1 << 10, 1 << 20
CRASH_ENV = "HSMFS_TEST_CRASH_RELEASE"
BOTH = [pytest.mark.needs_fuse, pytest.mark.needs_precontent]


def blob(n: int, seed: str) -> bytes:
    return random.Random(seed).randbytes(n)


def hsmfs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hsmfs", *args], capture_output=True,
                          text=True, timeout=timeout)


def release(*paths: Path) -> tuple[int, str]:
    out = hsmfs("release", *map(str, paths))
    return out.returncode, out.stdout + out.stderr


def state(path: Path) -> dict:
    out = hsmfs("state", "--json", str(path))
    assert out.returncode == 0, out.stderr
    [row] = json.loads(out.stdout)
    return row


def cat(path: Path, timeout: float = 60) -> bytes:
    out = run(["cat", str(path)], timeout=timeout)
    assert out.returncode == 0, f"cat {path}: {out.stderr.decode().strip()}"
    return out.stdout


def blocks(path: Path) -> int:
    """512-byte blocks.  A punched file keeps up to 16 (8 KiB): an xattr block and an extent
    tree block on ext4; no data."""
    return os.stat(path).st_blocks


@contextlib.contextmanager
def both_doors(bucket: Bucket, moto: MotoServer, workdir: Path, *opts: str
               ) -> Iterator[Served]:
    """One daemon, both doors: applications read ``d.root`` (FUSE) and ``d.cache`` (kernel)."""
    with serve_door("fuse", f"s3://{bucket.name}", workdir, moto.endpoint, "kernel",
                    *opts) as d:
        yield d


class Mapper:
    """A program that maps a file, closes its fd, and keeps the mapping (MAP_SHARED, read)."""

    CODE = ("import hashlib,mmap,os,sys\n"
            "fd=os.open(sys.argv[1],os.O_RDONLY); m=mmap.mmap(fd,0,prot=mmap.PROT_READ)\n"
            "os.close(fd); print(hashlib.sha256(m[:]).hexdigest(),flush=True)\n"
            "for _ in sys.stdin: print(hashlib.sha256(m[:]).hexdigest(),flush=True)\n")

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, str(path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.first = self._line()

    def _line(self, timeout: float = 30) -> str:
        assert self.proc.stdout is not None
        box: list[str] = []
        t = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()),
                             daemon=True)
        t.start()
        t.join(timeout)
        if not box:
            self.kill()
            raise TimeoutError("the mapping program did not answer")
        return box[0].strip()

    def digest(self) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return self._line()

    def kill(self) -> None:
        stop_process(self.proc, timeout=5)

    def __enter__(self) -> Mapper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def where(d: Served, door: str) -> Path:
    """Where applications read through ``door`` in a daemon serving both."""
    return d.root if door == "fuse" else d.cache


# -- release frees space, keeps metadata, and reads come back through fetch ----------------------

@pytest.mark.parametrize("kind", DOORS)
def test_release_frees_space_keeps_metadata_and_refetches(kind: str, bucket: Bucket,
                                                          moto: MotoServer,
                                                          tmp_path: Path) -> None:
    data = bucket.put("d/big.bin", blob(3 * MiB + 123, "big"))
    with serve_door(kind, f"s3://{bucket.name}", tmp_path / "w", moto.endpoint) as d:
        path, backing = d.root / "d/big.bin", d.cache / "d/big.bin"
        assert cat(path) == data
        before = os.stat(backing)
        assert before.st_blocks * 512 >= len(data), "not resident after a whole read"
        assert state(path)["state"] == "resident"
        gets = d.stats()["cache_s3_gets"]
        out = hsmfs("release", "--dry-run", str(d.root / "d"))  # a directory: its stubs
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.split()[:2] == ["would", "release"], out.stdout
        assert str(len(data)) in out.stdout and str(path) in out.stdout, out.stdout
        assert os.stat(backing).st_blocks == before.st_blocks
        code, out = release(path)
        assert code == 0, out
        assert out.startswith("released"), out
        after = os.stat(backing)
        assert after.st_blocks <= 16, f"{after.st_blocks} blocks left after the release"
        assert (after.st_size, after.st_mtime_ns, after.st_mode) == (
            before.st_size, before.st_mtime_ns, before.st_mode)
        assert state(path)["state"] == "stub"
        s = d.stats()
        assert (s["releases"], s["released_bytes"]) == (1, len(data))
        # A release of a stub frees nothing and is no failure.
        code, out = release(path)
        assert code == 0 and out.startswith("stub"), out
        # Read again: S3's bytes, fetched again (the FUSE door's page cache was dropped).
        assert cat(path) == data
        assert d.stats()["cache_s3_gets"] > gets, "the re-read was not fetched"
        assert os.stat(path).st_mtime_ns == before.st_mtime_ns


@pytest.mark.needs_fuse
@pytest.mark.needs_precontent
def test_release_through_both_doors_of_one_daemon(bucket: Bucket, moto: MotoServer,
                                                  tmp_path: Path) -> None:
    """The FUSE door and the kernel door serve the same backing file: a release through
    either path, then a read through the other, fetches again and reads S3's bytes."""
    data = bucket.put("f.bin", blob(2 * MiB, "both"))
    with both_doors(bucket, moto, tmp_path / "w") as d:
        for read_by, release_by in (("fuse", "kernel"), ("kernel", "fuse"), ("fuse", "fuse")):
            assert cat(where(d, read_by) / "f.bin") == data, read_by
            assert blocks(d.cache / "f.bin") * 512 >= len(data)
            gets = d.stats()["cache_s3_gets"]
            code, out = release(where(d, release_by) / "f.bin")
            assert code == 0 and out.startswith("released"), (read_by, release_by, out)
            assert blocks(d.cache / "f.bin") <= 16
            for door in ("fuse", "kernel"):
                assert cat(where(d, door) / "f.bin") == data, (read_by, release_by, door)
            assert d.stats()["cache_s3_gets"] > gets, (read_by, release_by)


# -- refusals: local changes -------------------------------------------------------------------

@pytest.mark.parametrize("kind", DOORS)
def test_release_refuses_dirty_and_conflict(kind: str, bucket: Bucket, moto: MotoServer,
                                            tmp_path: Path) -> None:
    bucket.put("dirty.txt", b"0123456789" * 1000)
    bucket.put("conflict.txt", b"abcdefghij" * 1000)
    with serve_door(kind, f"s3://{bucket.name}", tmp_path / "w", moto.endpoint) as d:
        dirty, conflict = d.root / "dirty.txt", d.root / "conflict.txt"
        with open(dirty, "r+b") as f:
            f.seek(10)
            f.write(b"LOCAL")
        want_dirty = (b"0123456789" * 1000)[:10] + b"LOCAL" + (b"0123456789" * 1000)[15:]
        with open(conflict, "r+b") as f:
            f.write(b"MINE")
        want_conflict = b"MINE" + (b"abcdefghij" * 1000)[4:]
        bucket.put("conflict.txt", b"someone else's version")
        out = hsmfs("archive", str(conflict))
        assert out.returncode != 0 and "conflict" in out.stdout, out.stdout + out.stderr
        assert state(conflict)["state"] == "conflict"
        for path, word, want in ((dirty, "dirty", want_dirty),
                                 (conflict, "conflict", want_conflict)):
            code, out = release(path)
            assert code != 0, out
            assert out.startswith("refused") and word in out, out
            assert cat(path) == want
            assert blocks(d.cache / path.name) > 0
        assert d.stats()["releases"] == 0


# -- refusals: a program holds the file open or mapped -------------------------------------------

@pytest.mark.parametrize("kind", DOORS)
def test_release_refused_while_open_or_mapped(kind: str, bucket: Bucket, moto: MotoServer,
                                              tmp_path: Path) -> None:
    data = bucket.put("m.bin", blob(1 * MiB + 7, "mapped"))
    with serve_door(kind, f"s3://{bucket.name}", tmp_path / "w", moto.endpoint) as d:
        path = d.root / "m.bin"
        assert cat(path) == data
        with FdProgram() as prog:
            fd = prog.open(path)
            code, out = release(path)
            assert code != 0 and out.startswith("refused"), out
            assert "EBUSY" in out and "open" in out, out
            assert prog.pread(fd, len(data) + 10, 0) == data
            assert blocks(d.cache / "m.bin") * 512 >= len(data)
            prog.close(fd)
        with Mapper(path) as m:
            assert m.first == sha256(data)
            code, out = release(path)
            assert code != 0 and out.startswith("refused") and "EBUSY" in out, out
            assert m.digest() == sha256(data)
            assert blocks(d.cache / "m.bin") * 512 >= len(data)
        # The program is gone: the release goes through.  (The FUSE kernel sends RELEASE
        # asynchronously after the last unmap: retry briefly.)
        deadline = time.monotonic() + 10
        while True:
            code, out = release(path)
            if code == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert code == 0 and out.startswith("released"), out
        assert cat(path) == data


@pytest.mark.needs_fuse
@pytest.mark.needs_precontent
@pytest.mark.parametrize("holder", ["fuse", "kernel"])
def test_a_holder_through_one_door_blocks_a_release_through_the_other(
        holder: str, bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    data = bucket.put("h.bin", blob(512 * KiB, "held"))
    with both_doors(bucket, moto, tmp_path / "w") as d:
        other = "kernel" if holder == "fuse" else "fuse"
        assert cat(where(d, holder) / "h.bin") == data
        with Mapper(where(d, holder) / "h.bin") as m:
            code, out = release(where(d, other) / "h.bin")
            assert code != 0 and out.startswith("refused"), out
            assert m.digest() == sha256(data)
        with FdProgram() as prog:
            fd = prog.open(where(d, holder) / "h.bin")
            code, out = release(where(d, other) / "h.bin")
            assert code != 0 and out.startswith("refused"), out
            assert prog.pread(fd, len(data), 0) == data


# -- a release racing with readers through both doors -------------------------------------------

@pytest.mark.needs_fuse
@pytest.mark.needs_precontent
def test_release_racing_with_readers_never_yields_a_wrong_byte(bucket: Bucket, moto: MotoServer,
                                                               tmp_path: Path) -> None:
    files = {f"r{i}.bin": bucket.put(f"r{i}.bin", blob((i + 1) * 300 * KiB + i, f"r{i}"))
             for i in range(3)}
    reader = ("import hashlib,os,sys,time\n"
              "paths=sys.argv[2:]; want=dict(zip(paths[:len(paths)//2],paths[len(paths)//2:]))\n"
              "end=time.monotonic()+float(sys.argv[1]); n=bad=err=0\n"
              "while time.monotonic()<end:\n"
              "  for p,h in want.items():\n"
              "    try:\n"
              "      with open(p,'rb') as f: got=f.read()\n"
              "    except OSError as e:\n"
              "      err+=1; print('ERR',p,e.errno,flush=True); continue\n"
              "    n+=1\n"
              "    if hashlib.sha256(got).hexdigest()!=h: bad+=1; print('BAD',p,flush=True)\n"
              "print('DONE',n,bad,err,flush=True)\n")
    with both_doors(bucket, moto, tmp_path / "w") as d:
        procs = []
        try:
            for door in ("fuse", "kernel", "fuse", "kernel"):
                paths = [str(where(d, door) / name) for name in files]
                procs.append(subprocess.Popen(
                    [sys.executable, "-c", reader, "8", *paths,
                     *(sha256(data) for data in files.values())],
                    stdout=subprocess.PIPE, text=True))
            # Straight to the control socket (what `hsmfs release` sends), to release as
            # often as a daemon can: the races are in the daemon, not in the command.
            results: dict[str, int] = {}
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                reply = control.query(str(d.cache), {"cmd": "release", "paths": list(files)})
                for row in reply["files"]:
                    assert row["result"] != "failed", row
                    results[row["result"]] = results.get(row["result"], 0) + 1
                time.sleep(0.005)
            released = results.get("released", 0)
            outputs = [p.communicate(timeout=60)[0] for p in procs]
        finally:
            for p in procs:
                stop_process(p)
        done = [line.split() for out in outputs for line in out.splitlines()
                if line.startswith("DONE")]
        assert len(done) == 4, outputs
        reads = sum(int(x[1]) for x in done)
        bad = [line for out in outputs for line in out.splitlines() if line.startswith("BAD")]
        errors = [line for out in outputs for line in out.splitlines()
                  if line.startswith("ERR")]
        assert not bad, f"{len(bad)} wrong reads of {reads}: {bad[:5]}"
        # A reader may meet EBUSY (the table's errno for a file being released), nothing else.
        assert all(line.split()[2] == "16" for line in errors), errors[:5]
        assert released >= 10, f"only {released} releases went through: {results}"
        print(f"\n{reads} reads, releases: {results}, reader errors: {len(errors)}")
        assert reads > 20
        for name, data in files.items():
            for door in ("fuse", "kernel"):
                assert cat(where(d, door) / name) == data


# -- pins ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", DOORS)
def test_pin_blocks_release_survives_restart_and_unpin_allows_it(kind: str, bucket: Bucket,
                                                                 moto: MotoServer,
                                                                 tmp_path: Path) -> None:
    data = bucket.put("p.bin", blob(700 * KiB, "pinned"))
    workdir = tmp_path / "w"
    with serve_door(kind, f"s3://{bucket.name}", workdir, moto.endpoint) as d:
        path = d.root / "p.bin"
        assert state(path)["state"] == "stub"
        out = hsmfs("pin", str(path))
        assert out.returncode == 0 and out.stdout.startswith("pinned"), out.stdout + out.stderr
        # pin = keep local: a stub is made resident, like hsmfs restore.
        assert blocks(d.cache / "p.bin") * 512 >= len(data)
        row = state(d.cache / "p.bin")
        assert row["state"] == "resident" and row["pinned"] is True, row
        assert state(path)["pinned"] is True  # through the door as well
        assert hsmfs("state", str(path)).stdout.rstrip().endswith("pinned")
        code, out = release(path)
        assert code != 0 and "pinned" in out, out
    with serve_door(kind, f"s3://{bucket.name}", workdir, moto.endpoint) as d:
        path = d.root / "p.bin"
        code, out = release(path)
        assert code != 0 and "pinned" in out, f"the pin did not survive a restart: {out}"
        assert d.stats()["pinned_files"] == 1
        out = hsmfs("unpin", str(path))
        assert out.returncode == 0 and out.stdout.startswith("unpinned"), out.stdout
        assert state(d.cache / "p.bin")["pinned"] is False
        code, out = release(path)
        assert code == 0 and out.startswith("released"), out
        assert cat(path) == data


# -- crashes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("step", ["leased", "punched"])
@pytest.mark.parametrize("kind", DOORS)
def test_sigkill_in_the_middle_of_a_release_then_restart(kind: str, step: str, bucket: Bucket,
                                                        moto: MotoServer, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon (the kernel door's worker) SIGKILLs itself at ``step`` of a release: with
    the lease taken, before the punch; or after the punch and the mtime, before the view.
    After a restart of the whole daemon the file reads right and is counted by its extents."""
    data = bucket.put("c.bin", blob(1 * MiB + 5, "crash"))
    other = bucket.put("o.bin", blob(64 * KiB, "other"))
    workdir = tmp_path / "w"
    monkeypatch.setenv(CRASH_ENV, step)
    with serve_door(kind, f"s3://{bucket.name}", workdir, moto.endpoint) as d:
        path = d.root / "c.bin"
        assert cat(path) == data
        mtime = os.stat(d.cache / "c.bin").st_mtime_ns
        code, out = release(path)
        assert code != 0, f"the daemon was to die in the middle of the release: {out}"
        pgid = d.proc.pid
        stop_process(d.proc, timeout=15)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, 9)
        if kind == "fuse":
            force_unmount(d.root)
        else:
            uncover(d.cache)  # the stop covered the tree: look beneath
    monkeypatch.delenv(CRASH_ENV)
    backing = workdir / "cache" / "c.bin"
    punched = blocks(backing) <= 16
    assert punched == (step == "punched")
    assert os.stat(backing).st_mtime_ns == mtime
    with serve_door(kind, f"s3://{bucket.name}", workdir, moto.endpoint) as d:
        path = d.root / "c.bin"
        row = state(d.cache / "c.bin")
        assert row["state"] == ("stub" if punched else "resident"), row
        s = d.stats()
        assert s["resident_files"] == (0 if punched else 1), s
        assert s["dirty_files"] == 0, s
        assert cat(path) == data
        assert cat(d.root / "o.bin") == other
        code, out = release(path)
        assert code == 0 and out.startswith("released"), out
        assert cat(path) == data


@pytest.mark.needs_precontent
def test_release_on_a_filesystem_mark(bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    """The cache as the root of its own filesystem: one filesystem mark, resident files get
    evictable inode ignore marks.  A release removes that ignore (events come back), refuses
    a mapped file, and a re-read fetches again."""
    from t4_fsmark import loop_cache

    data = bucket.put("fs.bin", blob(1 * MiB + 3, "fsmark"))
    with loop_cache("ext4", tmp_path) as workdir, \
            serve_door("kernel", f"s3://{bucket.name}", workdir, moto.endpoint) as d:
        assert d.stats()["kernel"]["mark"] == "filesystem"
        path = d.root / "fs.bin"
        assert cat(path) == data
        with Mapper(path) as m:
            code, out = release(path)
            assert code != 0 and out.startswith("refused"), out
            assert m.digest() == sha256(data)
        code, out = release(path)
        assert code == 0 and out.startswith("released"), out
        assert blocks(path) <= 16
        gets = d.stats()["cache_s3_gets"]
        assert cat(path) == data
        assert d.stats()["cache_s3_gets"] > gets


@pytest.mark.needs_fuse
@pytest.mark.needs_precontent
@pytest.mark.parametrize("door", ["fuse", "kernel"])
def test_an_open_during_the_lease_waits_then_reads_right(door: str, bucket: Bucket,
                                                         moto: MotoServer, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The release holds its lease 3 s after the punch (test hook).  A program that opens
    the file meanwhile (through either door) blocks in open() until the unlock, then reads
    S3's bytes (fetched again), never the holes.  (3 s: this test sees the punch by polling,
    and a loaded machine may see it late; the open must still find the lease held.)"""
    data = bucket.put("w.bin", blob(2 * MiB + 9, "wait"))
    monkeypatch.setenv("HSMFS_TEST_RELEASE_PAUSE", "3")
    with both_doors(bucket, moto, tmp_path / "w") as d:
        path = where(d, door) / "w.bin"
        assert cat(path) == data
        rel = subprocess.Popen([sys.executable, "-m", "hsmfs", "release", str(path)],
                               stdout=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 10
            while blocks(d.cache / "w.bin") > 16:  # punched: the lease is held for 3 s
                assert time.monotonic() < deadline, "the release did not punch"
                time.sleep(0.01)
            t = time.monotonic()
            got = cat(path)
            waited = time.monotonic() - t
            out, _ = rel.communicate(timeout=30)
        finally:
            stop_process(rel)
        assert out.startswith("released"), out
        assert got == data, "a reader during the release got wrong bytes"
        assert waited > 0.5, f"the open did not wait for the lease ({waited:.3f} s)"
