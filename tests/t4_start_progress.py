"""The first populate of a bucket shows its progress on a terminal, and nothing on a pipe (issue
14, item 5).

Real parts: a moto S3 server over loopback HTTP behind the fault proxy (HEADs slowed, so the
start lasts long enough to report), ``hsmfs mount`` and ``hsmfs serve`` run in the background
as users run them, their stderr a pseudo-terminal or a pipe.  The daemon each start leaves is
stopped by the PID in its pid file, and every mount and cover is removed, even on failure.
"""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    Bucket,
    file_sha256,
    force_unmount,
    hsmfs_cmd,
    reap_hsmfs_under,
    seeded,
    sha256,
)
from support.doors import DOORS

pytestmark = pytest.mark.timeout(180)

OBJECTS = 120


def _start(door: str, source: str, work: Path, endpoint: str, tty: bool) -> tuple[int, bytes]:
    """Run the door's start command in the background form; (exit status, all of stderr)."""
    cache = work / "cache"
    if door == "fuse":
        (work / "mnt").mkdir(parents=True, exist_ok=True)
        cmd = hsmfs_cmd("mount", source, str(work / "mnt"), "-o",
                        f"cache={cache},endpoint={endpoint},connections=4")
    else:
        cmd = hsmfs_cmd("serve", source, str(cache), "-o", f"endpoint={endpoint},connections=4")
    if not tty:
        out = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, timeout=120)
        return out.returncode, out.stderr
    master, slave = pty.openpty()
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=slave)
        os.close(slave)
        slave = -1
        got = b""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 0.5)
            if r:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: every slave end closed
                    break
                if not chunk:
                    break
                got += chunk
            elif proc.poll() is not None:
                break
        return proc.wait(10), got
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()  # the start command itself (the daemon it forked: _stopped_after)
            proc.wait(10)
        os.close(master)
        if slave >= 0:
            os.close(slave)


@contextlib.contextmanager
def _stopped_after(door: str, work: Path) -> Iterator[None]:
    """Whatever happens: the daemon the start left is stopped by its PID, its mount removed."""
    try:
        yield
    finally:
        pid_file = work / "cache" / ".hsmfs" / "daemon.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)
        if door == "fuse":
            force_unmount(work / "mnt")
        reap_hsmfs_under(work)  # a kernel-door worker (its own process group) that outlived it


@pytest.mark.parametrize("door", DOORS)
def test_first_populate_draws_progress_on_a_terminal_only(door: str, bucket: Bucket,
                                                          fault_proxy, tmp_path: Path) -> None:
    data = {f"d{i % 6}/f{i}.bin": bucket.put(f"d{i % 6}/f{i}.bin", seeded(64 + i, i))
            for i in range(OBJECTS)}
    fault_proxy.set_delay(20, method="HEAD")  # ~0.6 s of HEADs over 4 connections
    source = f"s3://{bucket.name}"

    with _stopped_after(door, tmp_path / "tty"):
        code, err = _start(door, source, tmp_path / "tty", fault_proxy.endpoint, tty=True)
        text = err.decode(errors="replace")
        assert code == 0, text
        assert "\r\x1b[K" in text, text  # a line drawn over itself, then wiped
        drawn = [part for part in text.split("\r\x1b[K") if part.startswith("hsmfs: list")]
        assert drawn, text
        # The last report drawn has the whole listing, and every HEAD asked came back.
        assert f"listed {OBJECTS:,} objects" in drawn[-1], drawn
        assert f"HEAD {OBJECTS:,}/{OBJECTS:,}" in drawn[-1], drawn
        # The outcome's own line follows, on a wiped line.
        assert text.rstrip().splitlines()[-1].split("\x1b[K")[-1].startswith("hsmfs: "), text
        root = tmp_path / "tty" / ("mnt" if door == "fuse" else "cache")
        assert file_sha256(root / "d1/f1.bin") == sha256(data["d1/f1.bin"])

    with _stopped_after(door, tmp_path / "pipe"):
        code, err = _start(door, source, tmp_path / "pipe", fault_proxy.endpoint, tty=False)
        text = err.decode(errors="replace")
        assert code == 0, text
        assert "\x1b[K" not in text and "\r" not in text and "listing" not in text, text
        assert len(text.strip().splitlines()) == 1, text  # the outcome, and nothing else
