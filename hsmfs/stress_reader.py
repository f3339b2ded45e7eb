"""One ``hsmfs stress`` reader: an unaware program in its own process, and its parent's handle.

Why a process and not a thread: an mmap read of a range the door fails (a fault injected)
raises SIGBUS, which would kill the whole stress run, and a read stuck in the kernel cannot be
interrupted in a thread.  Here the child dies alone (its parent counts the signal and starts
another), and a child that does not answer within the hang timeout is SIGKILLed by PID and
reported as a hang.

Protocol: one JSON line in, one JSON line out.  In: ``{"op": "read"|"pread"|"mmap", "path",
"off", "n"}`` or ``{"op": "write", "path", "off", "data": HEX}``.  Out: ``{"n", "h", "z"}``
(bytes read, their BLAKE2b digest, 4 KiB-aligned all-zero blocks among them: a hole served as
data shows up as zeros) or ``{"errno", "err"}``.  The data itself never crosses the pipe: the
parent hashes what it expects.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import select
import signal
import subprocess
import sys
import time

BLOCK = 4096
_ZERO = bytes(BLOCK)


def digest(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def zero_blocks(data: bytes, off: int) -> int:
    """All-zero 4 KiB blocks of the file (aligned to the file, not to the read) within data."""
    first = (-off) % BLOCK
    view = memoryview(data)
    return sum(1 for i in range(first, len(data) - BLOCK + 1, BLOCK)
               if view[i:i + BLOCK] == _ZERO)


def _read(path: str, off: int, n: int, how: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        if how == "mmap":
            size = os.fstat(fd).st_size
            if off >= size or n == 0:
                return b""
            with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as mm:
                return mm[off:off + n]
        out = bytearray()
        if how == "read":
            os.lseek(fd, off, os.SEEK_SET)
        while len(out) < n:
            chunk = (os.read(fd, n - len(out)) if how == "read"
                     else os.pread(fd, n - len(out), off + len(out)))
            if not chunk:
                break
            out += chunk
        return bytes(out)
    finally:
        os.close(fd)


def _write(path: str, off: int, data: bytes) -> int:
    fd = os.open(path, os.O_WRONLY)
    try:
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], off + done)
        return done
    finally:
        os.close(fd)


def serve() -> int:
    """The child's loop (``python3 -m hsmfs.stress_reader``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when readers stop
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "write":
                out = {"n": _write(cmd["path"], cmd["off"], bytes.fromhex(cmd["data"]))}
            else:
                data = _read(cmd["path"], cmd["off"], cmd["n"], cmd["op"])
                out = {"n": len(data), "h": digest(data), "z": zero_blocks(data, cmd["off"])}
        except OSError as exc:
            out = {"errno": exc.errno, "err": str(exc)}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    return 0


class Reader:
    """The parent's handle on one reader process: :meth:`call` never waits past its timeout."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._buf = b""
        self.starts = 0

    def _start(self) -> subprocess.Popen[bytes]:
        self.proc = subprocess.Popen([sys.executable, "-m", "hsmfs.stress_reader"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=self.env,
                                     start_new_session=True)  # Ctrl-C is the parent's
        self._buf = b""
        self.starts += 1
        return self.proc

    def call(self, cmd: dict, timeout: float) -> dict:
        """Run one op.  ``{"signal": NAME}`` if the child died of a signal (SIGBUS: an mmap
        read the door failed), ``{"hang": True}`` if it did not answer in time (it is then
        killed; the next call starts a new one)."""
        proc = self.proc if self.proc is not None and self.proc.poll() is None else self._start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(cmd).encode() + b"\n")
            proc.stdin.flush()
        except BrokenPipeError:
            return self._died()
        deadline = time.monotonic() + timeout
        fd = proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                return {"hang": True}
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return self._died()
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def _died(self) -> dict:
        proc = self.proc
        self.proc = None
        code = None
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = proc.wait(10)
            _close(proc)
        if code is not None and code < 0:
            return {"signal": signal.Signals(-code).name}
        return {"signal": f"exit {code}"}

    def kill(self) -> None:
        """SIGKILL by PID; waits (bounded) for it: a process stuck in the kernel may take a
        moment to die, and one that never does is left to its parent's end."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        _close(proc)


def _close(proc: subprocess.Popen[bytes]) -> None:
    for f in (proc.stdin, proc.stdout):
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()


if __name__ == "__main__":
    sys.exit(serve())
