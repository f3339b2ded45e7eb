"""``hsmfs stress --seconds 60`` as CI runs it (issue 13, item 4): both doors at once over one
cache, S3 faults, releases, writes, archives, SIGKILLs of the worker and of the whole daemon.

Real parts only: the command is run as a user would, as a subprocess, with its own embedded
S3 (moto), fault proxy, daemon and readers; it must stop everything it started by itself.
What is asserted is its JSON summary: 0 wrong bytes, 0 unexpected errors, 0 hangs, reads
through both doors, and at least one restart of each kind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import force_unmount, reap_hsmfs_under, seeded, wait_until
from support.doors import serve_door
from support.heldfd import ready_workers, the_worker, wait_new_worker_ready

pytestmark = [pytest.mark.needs_fuse, pytest.mark.needs_precontent, pytest.mark.timeout(240)]


def _mounts_under(path: Path) -> list[str]:
    root = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if (line.split()[4] + "/").startswith(root + "/")]


def test_stress_60s_both_doors(tmp_path: Path) -> None:
    work = tmp_path / "work"
    summary_path = tmp_path / "summary.json"
    # Popen, not run(timeout=): a SIGKILL on expiry would skip the command's own clean-up
    # (its mount, daemon, S3 and readers live in sessions of their own).
    proc = subprocess.Popen(
        [sys.executable, "-m", "hsmfs", "stress", "--seconds", "60", "--hang-timeout", "20",
         "--json", str(summary_path), "--workdir", str(work)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        stdout, stderr = proc.communicate(timeout=200)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # stress unwinds: stops and removes what it started
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate(timeout=10)
        raise AssertionError(f"hsmfs stress outlived 200 s:\n{stdout}\n{stderr}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        force_unmount(work / "mnt")
        reap_hsmfs_under(work)  # by PID: anything of it still running, however it ended
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert summary_path.exists(), out.stdout + out.stderr
    s = json.loads(summary_path.read_text())
    report = out.stdout + out.stderr
    assert s["wrong"] == 0, report
    assert s["errors_unexpected"] == {}, report
    assert s["hangs"] == 0, report
    assert s["fatal"] is None, report
    assert s["reads_by_door"].get("fuse", 0) > 0 and s["reads_by_door"].get("kernel", 0) > 0
    assert s["restarts"]["worker"] > 0 and s["restarts"]["daemon"] > 0, report
    assert sum(s["faults"].values()) > 0, report
    assert out.returncode == 0, report
    # A pipe gets no progress line, and nothing it started is left mounted.
    assert "\r" not in out.stderr
    assert _mounts_under(work) == []


def test_fuse_reader_sees_a_write_through_the_kernel_door(moto, bucket, tmp_path: Path) -> None:
    """Both doors in one daemon: a write to the backing tree (the kernel door) is what the
    next open through the mount reads, also for pages the mount had cached (keep_cache) and
    for a second write to a file already dirty, which raises no event at all.  Found by
    ``hsmfs stress``: the mount kept returning the bytes from before the write."""
    data = bytearray(seeded(200_000, "coherent"))
    bucket.put("x.bin", bytes(data))
    with serve_door("fuse", f"s3://{bucket.name}", tmp_path / "d", moto.endpoint,
                    "kernel") as d:
        mounted, backing = d.root / "x.bin", d.cache / "x.bin"
        assert backing.read_bytes() == data  # resident and clean
        for _ in range(2):  # the mount's page cache now holds [0, 64 KiB)
            assert _pread(mounted, 0, 60_000) == data[:60_000]
        for off, patch in ((5000, b"K" * 10), (6000, b"L" * 10)):
            with open(backing, "r+b") as f:
                f.seek(off)
                f.write(patch)
            data[off:off + len(patch)] = patch
            assert _pread(backing, 0, 60_000) == data[:60_000]
            assert _pread(mounted, 0, 60_000) == data[:60_000]


def _pread(path: Path, off: int, n: int) -> bytes:
    """A range that stops short of EOF (a read past it makes the kernel refresh attributes)."""
    with open(path, "rb") as f:
        return os.pread(f.fileno(), n, off)


def test_worker_restarts_never_stack_dead_mounts(moto, bucket, tmp_path: Path) -> None:
    """Both doors in one daemon: the worker serves the FUSE mount, so its SIGKILL leaves the
    mount dead, and the next worker must clear it before it mounts again.  The kernel answers
    a stat of the mount's root from its attribute cache, so the dead mount used to look
    alive and each restart stacked one more (found by ``hsmfs stress``: 4 dead mounts at the
    mountpoint, one of them left after the stop, answering ENOTCONN)."""
    data = seeded(10_000, "layers")
    bucket.put("x.bin", data)
    with serve_door("fuse", f"s3://{bucket.name}", tmp_path / "d", moto.endpoint,
                    "kernel") as d:
        for _ in range(3):
            os.stat(d.root)  # the root's attributes are now in the kernel's cache
            assert (d.root / "x.bin").read_bytes() == data
            worker = the_worker(d.proc.pid, d.log_path)
            seen = set(ready_workers(d.log_path.read_text(errors="replace")))
            os.kill(worker, signal.SIGKILL)
            wait_new_worker_ready(d.log_path, worker, seen=seen)
            wait_until(lambda: _answers(d.root), 30, "the new worker's mount")
            assert _layers(d.root) == 1
            assert (d.root / "x.bin").read_bytes() == data
    assert _layers(d.root) == 0


def _answers(path: Path) -> bool:
    """A FUSE mount at ``path`` is served (statvfs always reaches the daemon)."""
    if _layers(path) == 0:
        return False
    try:
        os.statvfs(path)
    except OSError:
        return False
    return True


def _layers(path: Path) -> int:
    """Mounts stacked at ``path``."""
    where = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        return sum(1 for line in f if line.split()[4] == where)


def test_fuse_reader_sees_a_kernel_door_write_once_archived(moto, bucket,
                                                            tmp_path: Path) -> None:
    """The mount cached a clean file's pages; a write through the kernel door made it dirty
    and ``hsmfs archive`` clean again (S3 now holds the new bytes).  The next open through the
    mount must read the archived bytes, not the pages cached before the write: a clean file
    keeps its pages only while it is the same version they were read from."""
    data = bytearray(seeded(200_000, "archived"))
    bucket.put("x.bin", bytes(data))
    with serve_door("fuse", f"s3://{bucket.name}", tmp_path / "d", moto.endpoint,
                    "kernel") as d:
        mounted, backing = d.root / "x.bin", d.cache / "x.bin"
        assert backing.read_bytes() == data
        for _ in range(2):
            assert _pread(mounted, 0, 60_000) == data[:60_000]
        with open(backing, "r+b") as f:
            f.seek(5000)
            f.write(b"A" * 10)
        data[5000:5010] = b"A" * 10
        out = subprocess.run([sys.executable, "-m", "hsmfs", "archive", str(backing)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert bucket.client.get_object(Bucket=bucket.name, Key="x.bin")["Body"].read() == data
        assert _pread(mounted, 0, 60_000) == data[:60_000]
