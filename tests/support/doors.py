"""Run one hsmfs door as a real subprocess and hand tests the path applications read.

``fuse``: ``hsmfs mount -f SRC MNT`` — applications read the mountpoint.
``kernel``: ``hsmfs serve -f SRC DIR`` — applications read the backing tree itself.
The same test body runs against both (``door`` fixture), which is what makes the comparison of
the doors honest.  Every daemon is stopped by PID and every mount removed, even on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import force_unmount, is_mounted, stop_process

DOORS = [
    pytest.param("fuse", marks=pytest.mark.needs_fuse, id="fuse"),
    pytest.param("kernel", marks=pytest.mark.needs_precontent, id="kernel"),
]


@dataclass
class Served:
    kind: str
    root: Path  # where applications read the objects
    cache: Path
    proc: subprocess.Popen
    log_path: Path

    def stats(self) -> dict:
        out = subprocess.run([sys.executable, "-m", "hsmfs", "stats", "--json", str(self.cache)],
                             capture_output=True, text=True, timeout=20)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def serve_door(kind: str, source: str, workdir: Path, endpoint: str, *opts: str,
               timeout: float = 60) -> Iterator[Served]:
    workdir.mkdir(parents=True, exist_ok=True)
    cache = workdir / "cache"
    log_path = workdir / f"{kind}.log"
    options = [f"endpoint={endpoint}", *opts]
    if kind == "fuse":
        root = workdir / "mnt"
        root.mkdir(exist_ok=True)
        cmd = ["mount", "-f", source, str(root), "-o", ",".join([f"cache={cache}", *options])]
    else:
        root = cache
        cmd = ["serve", "-f", source, str(cache), "-o", ",".join(options)]
    log = open(log_path, "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([sys.executable, "-m", "hsmfs", *cmd], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        # ": ready: " is the daemon's own line ("INFO hsmfs.__main__: ready: ..."); a bare
        # "ready:" also matches the holder's "no worker was ever ready: giving up".
        while b": ready: " not in log_path.read_bytes():
            if proc.poll() is not None:
                raise RuntimeError(f"hsmfs {kind} exited with {proc.returncode}:\n"
                                   + log_path.read_text(errors="replace"))
            if time.monotonic() > deadline:
                raise TimeoutError(f"hsmfs {kind} not ready after {timeout}s:\n"
                                   + log_path.read_text(errors="replace"))
            time.sleep(0.02)
        yield Served(kind, root, cache, proc, log_path)
    finally:
        if kind == "fuse" and is_mounted(root):
            subprocess.run(["fusermount3", "-u", str(root)], capture_output=True, timeout=10)
        try:
            stop_process(proc, timeout=15)
        finally:  # even if it would not die: a stuck daemon's mount must not outlive the test
            _kill_workers(log_path, cache)
            if kind == "fuse":
                force_unmount(root)
            log.close()


def _kill_workers(log_path: Path, cache: Path) -> None:
    """A kernel-door worker has its own process group (hsmfs.holder), so killing the holder's
    group does not reach it: every worker the log names is killed by PID if it outlived it,
    and only if that PID is still an hsmfs worker of this cache (never a reused PID)."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return
    for pid in {int(p) for p in re.findall(r"worker pid (\d+) started", text)}:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue  # gone
        if b"hsmfs.worker" in cmdline and os.fsencode(str(cache)) in cmdline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
