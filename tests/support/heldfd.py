"""A program that keeps file descriptors open across a test's steps, and the daemon's processes.

:class:`FdProgram` is an unaware application in its own process: it opens files and ``pread``s
them on command (one JSON line in, one JSON line out), so a test can hold an fd of a stub open
while it changes S3, kills the worker or renames files, and then read from that same fd.  A
read blocked in the kernel cannot hang the test: every reply is awaited with a deadline, and the
program is SIGKILLed by PID when the deadline passes or the test ends.

:func:`worker_pids` finds a kernel-door holder's worker in ``/proc``: a child of the holder whose
command line names the worker entry point (``hsmfs.kernel_bridge`` today, ``hsmfs.worker``
perhaps tomorrow) or whose pid the holder's log names ("worker pid N started/ready").
:func:`wait_new_worker_ready` waits, bounded, for the log to report a new worker ready.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Collection
from pathlib import Path

_PROGRAM = r"""
import json, os, sys
fds = {}
for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd["op"]
    try:
        if op == "open":
            fd = os.open(cmd["path"], os.O_RDONLY)
            fds[fd] = cmd["path"]
            out = {"fd": fd}
        elif op == "pread":
            out = {"data": os.pread(cmd["fd"], cmd["n"], cmd["off"]).hex()}
        elif op == "close":
            os.close(cmd["fd"])
            fds.pop(cmd["fd"], None)
            out = {}
        else:
            out = {"error": "unknown op " + op}
    except OSError as exc:
        out = {"errno": exc.errno, "error": str(exc)}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
"""


class ReadFailed(Exception):
    def __init__(self, err: int, text: str) -> None:
        super().__init__(text)
        self.errno = err


class FdProgram:
    """An application holding fds; use as a context manager (it is killed on exit)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _PROGRAM], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._buf = b""

    def __enter__(self) -> FdProgram:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                f.close()

    def _call(self, timeout: float, **cmd: object) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        out = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise TimeoutError(f"the program did not answer {cmd} within {timeout} s "
                                   "(blocked in the kernel?)")
            r, _, _ = select.select([out], [], [], left)
            if r:
                chunk = os.read(out, 65536)
                if not chunk:
                    raise RuntimeError(f"the program exited while running {cmd}: "
                                       f"{self.proc.stderr.read().decode(errors='replace')}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def open(self, path: str | os.PathLike, timeout: float = 30) -> int:
        reply = self._call(timeout, op="open", path=str(path))
        if "errno" in reply:
            raise ReadFailed(reply["errno"], reply["error"])
        return reply["fd"]

    def pread(self, fd: int, n: int, off: int, timeout: float = 30) -> bytes:
        """The bytes read, or :class:`ReadFailed` carrying the errno the read failed with."""
        reply = self._call(timeout, op="pread", fd=fd, n=n, off=off)
        if "errno" in reply:
            raise ReadFailed(reply["errno"], reply["error"])
        return bytes.fromhex(reply["data"])

    def close(self, fd: int, timeout: float = 30) -> None:
        self._call(timeout, op="close", fd=fd)


# -- the kernel door's processes ---------------------------------------------------------------

#: A worker's command line names one of these (today ``python -m hsmfs.kernel_bridge --worker``).
WORKER_ENTRIES = ("hsmfs.kernel_bridge", "hsmfs.worker")


def _procs(field: int, value: int) -> list[int]:
    """Live (not zombie) processes whose /proc/PID/stat field ``field`` (counted after the
    command: 1 = ppid, 2 = pgrp) is ``value``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[field]) == value and fields[0] != "Z":
            out.append(int(entry))
    return out


def _children(pid: int) -> list[int]:
    return _procs(1, pid)


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


_NAMED = re.compile(r"worker pid (\d+) (?:started|ready)")
_READY = re.compile(r"worker pid (\d+) ready")


def worker_pids(holder: int, log: str = "") -> list[int]:
    """Live worker processes of the holder ``holder``: its children whose command line names
    the worker entry point, or (should the entry point be renamed) that its log names."""
    named = {int(p) for p in _NAMED.findall(log)}
    return [p for p in _children(holder)
            if p in named or any(entry in arg for arg in _cmdline(p) for entry in WORKER_ENTRIES)]


def the_worker(holder: int, log_path: Path | None = None, timeout: float = 20) -> int:
    """The holder's one live worker (waits, bounded, while a restart is under way)."""
    deadline = time.monotonic() + timeout
    while True:
        log = log_path.read_text(errors="replace") if log_path is not None else ""
        pids = worker_pids(holder, log)
        if len(pids) == 1:
            return pids[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"holder {holder} has workers {pids} after {timeout} s; "
                                 f"children: {[(p, _cmdline(p)) for p in _children(holder)]}")
        time.sleep(0.05)


def ready_workers(log: str) -> list[int]:
    """Worker pids the holder's log reports ready, in order."""
    return [int(m) for m in _READY.findall(log)]


def wait_new_worker_ready(log_path: Path, old: int, timeout: float = 30,
                          seen: Collection[int] = ()) -> int:
    """Wait (bounded) until the log reports a worker other than ``old`` ready; its pid.
    ``seen``: workers reported ready before the kill (a test that kills several in a row),
    which do not count either."""
    deadline = time.monotonic() + timeout
    while True:
        log = log_path.read_text(errors="replace")
        fresh = [p for p in ready_workers(log) if p != old and p not in seen]
        if fresh:
            return fresh[-1]
        if time.monotonic() > deadline:
            raise AssertionError(f"no new worker reported ready within {timeout} s after "
                                 f"worker {old} was killed; log:\n{log[-4000:]}")
        time.sleep(0.05)


def group_alive(pgid: int) -> list[int]:
    """Processes (not zombies) still in process group ``pgid``."""
    return _procs(2, pgid)
