"""The daemon ``hsmfs stress`` owns: both doors in one daemon over one cache, and its crashes.

Both doors over one cache is the supported shape ``hsmfs mount SRC MNT -o cache=DIR,kernel``
(README "Both doors in one daemon"): the holder owns the fanotify group on DIR, its worker
serves the kernel door *and* the FUSE mount at MNT.  (A separate ``hsmfs serve DIR`` beside
``hsmfs mount -o cache=DIR`` would be two cores, two sets of books, over one tree: not
supported.)  So a SIGKILL of the worker takes the FUSE mount with it until the holder's next
worker mounts it again, and a SIGKILL of the whole daemon (holder and worker) leaves a dead
mount (ENOTCONN) and an unguarded backing tree until ``hsmfs mount`` runs again.

Every process is found and killed by PID (the holder is the child we started, its workers
are named by its log and checked in ``/proc`` before any signal), and every mount is removed
(lazily, and its FUSE connection aborted) even when the run fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .cover import uncover
from .mounts import fuse_device, is_mounted

_STARTED = re.compile(rb"worker pid (\d+) started")
_READY = re.compile(rb"worker pid (\d+) ready")
#: The daemon's own line once both doors serve (a bare "ready:" also matches the holder's
#: "no worker was ever ready: giving up").
_DAEMON_READY = b": ready: "


class DaemonFailed(RuntimeError):
    """The daemon did not start, or a restart did not come back, in time."""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait (bounded) until none of ``pids`` is alive; the ones still alive."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if _alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [p for p in left if _alive(p)]
    return left


def force_unmount(mnt: Path) -> None:
    """Remove a FUSE mount whatever its daemon's state: lazy unmount, and abort the connection
    so nothing waits on a daemon that will never answer."""
    where = str(mnt)
    for _ in range(16):  # every layer: dead mounts may be stacked there
        if not is_mounted(where):
            return
        dev = fuse_device(where)
        subprocess.run(["fusermount3", "-u", "-z", where], capture_output=True, timeout=10)
        if dev is not None:
            conn = os.path.join("/sys/fs/fuse/connections", dev.split(":")[1])
            with contextlib.suppress(OSError), open(os.path.join(conn, "abort"), "w") as f:
                f.write("1")
        elif is_mounted(where):
            subprocess.run(["umount", "-l", where], capture_output=True, timeout=10)


class BothDoors:
    """``hsmfs mount -f SRC MNT -o cache=CACHE,kernel,...`` as a child in its own session."""

    def __init__(self, source: str, mnt: Path, cache: Path, workdir: Path,
                 options: list[str], env: dict[str, str]) -> None:
        self.source, self.mnt, self.cache, self.workdir = source, mnt, cache, workdir
        self.options = ["kernel", f"cache={cache}", *options]
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.generation = 0
        self.log_path = workdir / "daemon-0.log"
        self._workers_seen: set[int] = set()
        # stop() may run on the main thread (Ctrl-C) while the conductor restarts the daemon:
        # once closed, no start may spawn a daemon that nobody would stop.
        self._lock = threading.Lock()
        self._closed = False

    # -- life cycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> float:
        """Start the daemon and wait until both doors serve; seconds it took."""
        t0 = time.monotonic()
        with self._lock:
            if self._closed:
                raise DaemonFailed("stopped")
            self.generation += 1
            self.log_path = self.workdir / f"daemon-{self.generation}.log"
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "hsmfs", "mount", "-f", self.source, str(self.mnt),
                     "-o", ",".join(self.options)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=self.env, start_new_session=True)
        self._wait(lambda: _DAEMON_READY in self._log(), t0 + timeout,
                   f"hsmfs mount not ready after {timeout:.0f} s")
        self._note_workers()
        return time.monotonic() - t0

    def _wait(self, done: Callable[[], bool], deadline: float, late: str) -> None:
        """Poll (bounded) until ``done()``; fail at once if stopped or the daemon exited."""
        while not done():
            if self._closed:
                raise DaemonFailed("stopped")
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise DaemonFailed(f"hsmfs mount exited with {code} (log: {self.log_path})")
            if time.monotonic() > deadline:
                raise DaemonFailed(f"{late} (log: {self.log_path})")
            time.sleep(0.02)

    def stop(self) -> None:
        """Clean stop (unmount, SIGTERM), then SIGKILL by PID of whatever is left; the mount
        and the cover the holder puts on the cache at a stop are removed."""
        with self._lock:
            self._closed = True
            proc = self.proc
        if proc is not None and proc.poll() is None:
            if is_mounted(str(self.mnt)):
                subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True,
                               timeout=10)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                _kill(proc.pid)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        self._kill_workers()
        force_unmount(self.mnt)
        with contextlib.suppress(OSError):
            uncover(self.cache)

    # -- crashes ------------------------------------------------------------------------------

    def worker_pid(self) -> int | None:
        """The worker serving now: the last one the log reports ready, if alive."""
        ready = [int(p) for p in _READY.findall(self._log())]
        for pid in reversed(ready):
            if self._is_worker(pid):
                return pid
        return None

    def kill_worker(self, timeout: float = 60.0) -> float:
        """SIGKILL the worker; wait until the holder's next worker reports ready.  Seconds
        from the kill to ready."""
        old = self.worker_pid()
        if old is None:
            raise DaemonFailed("no ready worker to kill")
        t0 = time.monotonic()
        _kill(old)
        def replaced() -> bool:
            ready = [int(p) for p in _READY.findall(self._log())]
            return bool(ready) and ready[-1] != old and old in ready

        self._wait(replaced, t0 + timeout,
                   f"no new worker ready {timeout:.0f} s after SIGKILL of worker {old}")
        self._note_workers()
        return time.monotonic() - t0

    def kill_all(self, timeout: float = 30.0) -> None:
        """SIGKILL the whole daemon at once (holder and every worker), as a crash would, and
        clear the dead mount it leaves."""
        if self.proc is None:
            return
        self._note_workers()
        pids = [self.proc.pid, *sorted(p for p in self._workers_seen if self._is_worker(p))]
        for pid in pids:
            _kill(pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        self._kill_workers()  # one the holder may have started between the two kills
        left = _wait_gone(pids, timeout)
        if left:
            raise DaemonFailed(f"processes {left} outlived their SIGKILL")
        force_unmount(self.mnt)

    # -- internals ------------------------------------------------------------------------------

    def _log(self) -> bytes:
        try:
            return self.log_path.read_bytes()
        except OSError:
            return b""

    def _note_workers(self) -> None:
        self._workers_seen.update(int(p) for p in _STARTED.findall(self._log()))

    def _is_worker(self, pid: int) -> bool:
        """Still one of *this cache's* hsmfs workers (never a reused PID)."""
        cmd = _cmdline(pid)
        return (_alive(pid) and b"hsmfs" in cmd
                and os.fsencode(str(self.cache)) in cmd)

    def _kill_workers(self) -> None:
        self._note_workers()
        for pid in sorted(self._workers_seen):
            if self._is_worker(pid):
                _kill(pid)
        _wait_gone(sorted(self._workers_seen), 10)
