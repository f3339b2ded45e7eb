#!/usr/bin/env python3
"""Probe: write leases (F_SETLEASE F_WRLCK) as the release transition uses them (issue 12).

Measures on this kernel, on a directory of ``/`` (ext4) with a real pre-content group and a
detached ``open_tree`` private door carrying the mount ignore mark, the facts written down in
docs/KERNEL_FACTS_3.md §3.  Run as root from the repository:

    python scripts/probe_lease.py            # prints one line per fact

Every child process is bounded with a timeout and killed by pid; the directory is removed at
the end.  ``/proc/sys/fs/lease-break-time`` is lowered to 2 s for one row and put back.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hsmfs.fanotify import (
    FAN_ALLOW,
    FAN_CLASS_PRE_CONTENT,
    FAN_CLOEXEC,
    FAN_MARK_ADD,
    FAN_MARK_IGNORE,
    FAN_MARK_IGNORE_SURV,
    FAN_MARK_REMOVE,
    FAN_OPEN_PERM,
    FAN_PRE_ACCESS,
    FAN_REPORT_TID,
    FAN_UNLIMITED_QUEUE,
    fanotify_init,
    fanotify_mark,
    ignore_mount,
    open_private_tree,
    parse_events,
    write_response,
)

SIZE = 1 << 20
MASK = FAN_PRE_ACCESS | FAN_OPEN_PERM
BREAK_TIME = "/proc/sys/fs/lease-break-time"
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE

rows: list[tuple[str, str]] = []


def row(what: str, result: str) -> None:
    rows.append((what, result))
    print(f"{what:<78} {result}", flush=True)


def lease(fd: int, kind: int = fcntl.F_WRLCK) -> str:
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, kind)
        return "OK"
    except OSError as exc:
        return errno.errorcode[exc.errno]


def unlock(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)


def child(code: str) -> subprocess.Popen[bytes]:
    """A separate process that prints READY once it holds what ``code`` sets up, then waits."""
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.strip() == b"READY", line
    return p


def kill(p: subprocess.Popen[bytes]) -> None:
    with open(os.devnull):
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)


def make(path: str) -> None:
    with open(path, "wb") as f:
        f.write(b"A" * SIZE)


def main() -> int:
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 2
    base = tempfile.mkdtemp(prefix="probe_lease.", dir="/var/tmp")
    old_break = Path(BREAK_TIME).read_text().strip()
    fan = fanotify_init(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_UNLIMITED_QUEUE
                        | FAN_REPORT_TID, os.O_RDWR | os.O_LARGEFILE)
    tree = open_private_tree(base)
    ignore_mount(fan, tree)
    try:
        run(base, fan, tree)
    finally:
        with open(BREAK_TIME, "w") as f:
            f.write(old_break)
        os.close(fan)
        os.close(tree)
        shutil.rmtree(base, ignore_errors=True)
    return 0


def run(base: str, fan: int, tree: int) -> None:
    f = os.path.join(base, "f")
    make(f)
    row("kernel", os.uname().release)
    row("lease-break-time (s)", Path(BREAK_TIME).read_text().strip())

    # 1. Through the private door, nobody else has it open.
    fd = os.open("f", os.O_RDWR, dir_fd=tree)
    row("F_WRLCK on O_RDWR fd via the detached private mount, no other opener", lease(fd))
    row("F_GETLEASE while held", str(fcntl.fcntl(fd, fcntl.F_GETLEASE)))
    unlock(fd)
    ro = os.open("f", os.O_RDONLY, dir_fd=tree)
    row("... while this process holds a 2nd fd (O_RDONLY, private door)", lease(fd))
    os.close(ro)
    os.close(fd)
    fd = os.open("f", os.O_RDONLY, dir_fd=tree)
    row("F_WRLCK on an O_RDONLY fd (no other opener)", lease(fd))
    with __import__("contextlib").suppress(OSError):
        unlock(fd)
    os.close(fd)

    # 2. Other processes.
    cases = {
        "O_RDONLY open": f"import os;fd=os.open({f!r},os.O_RDONLY);print('READY',flush=True);"
                         "import time;time.sleep(60)",
        "O_RDWR open": f"import os;fd=os.open({f!r},os.O_RDWR);print('READY',flush=True);"
                       "import time;time.sleep(60)",
        "mmap PROT_READ, fd closed": f"import os,mmap;fd=os.open({f!r},os.O_RDONLY);"
                                     "m=mmap.mmap(fd,0,prot=mmap.PROT_READ);os.close(fd);"
                                     "print('READY',flush=True);import time;time.sleep(60)",
        "mmap MAP_SHARED RW, fd closed": f"import os,mmap;fd=os.open({f!r},os.O_RDWR);"
                                         "m=mmap.mmap(fd,0);os.close(fd);"
                                         "print('READY',flush=True);import time;time.sleep(60)",
    }
    for what, code in cases.items():
        p = child(code)
        try:
            fd = os.open("f", os.O_RDWR, dir_fd=tree)
            row(f"F_WRLCK while another process holds it: {what}", lease(fd))
            os.close(fd)
        finally:
            kill(p)
    exe = os.path.join(base, "sleeper")
    shutil.copy("/bin/sleep", exe)
    p = subprocess.Popen([exe, "60"])
    time.sleep(0.3)
    try:
        try:
            fd = os.open("sleeper", os.O_RDWR, dir_fd=tree)
            row("executing: open O_RDWR via private door", "OK")
            row("executing: F_WRLCK", lease(fd))
            os.close(fd)
        except OSError as exc:
            row("executing: open O_RDWR via private door", errno.errorcode[exc.errno])
        fd = os.open("sleeper", os.O_RDONLY, dir_fd=tree)
        row("executing: F_WRLCK on an O_RDONLY fd", lease(fd))
        os.close(fd)
    finally:
        kill(p)  # type: ignore[arg-type]

    # 3. A new opener while the lease is held: blocks until F_UNLCK?  And the SIGIO.
    signal.signal(signal.SIGIO, signal.SIG_DFL)
    opener = (f"import os,time;t=time.monotonic();fd=os.open({f!r},os.O_RDONLY);"
              "print(round(time.monotonic()-t,3),flush=True)")
    for how in ("F_SETSIG(SIGURG) before F_SETLEASE", "SIGIO ignored"):
        if how.startswith("SIGIO"):
            old = signal.signal(signal.SIGIO, signal.SIG_IGN)
        fd = os.open("f", os.O_RDWR, dir_fd=tree)
        if how.startswith("F_SETSIG"):
            fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        assert lease(fd) == "OK"
        p = subprocess.Popen([sys.executable, "-c", opener], stdout=subprocess.PIPE)
        time.sleep(1.0)
        blocked = p.poll() is None
        unlock(fd)
        out, _ = p.communicate(timeout=10)
        row(f"new open by another process while leased ({how}): blocked at 1 s / "
            "open took (s)", f"{blocked} / {out.decode().strip()}")
        os.close(fd)
        if how.startswith("SIGIO"):
            signal.signal(signal.SIGIO, old)
    # The default SIGIO: in a child, so that it may die.
    holder = ("import os,fcntl,time;"
              f"fd=os.open({f!r},os.O_RDWR);fcntl.fcntl(fd,fcntl.F_SETLEASE,fcntl.F_WRLCK);"
              "print('READY',flush=True);time.sleep(5)")
    p = child(holder)
    q = subprocess.Popen([sys.executable, "-c", opener], stdout=subprocess.PIPE)
    try:
        rc = p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        rc = None
    out, _ = q.communicate(timeout=60)
    row("lease holder with default SIGIO disposition, another process opens: holder",
        f"exit {rc} ({signal.Signals(-rc).name if rc and rc < 0 else ''}), "
        f"opener {out.decode().strip()} s")
    kill(p)
    # Holder that never unlocks: the kernel breaks the lease after lease-break-time.
    with open(BREAK_TIME, "w") as fh:
        fh.write("2")
    fd = os.open("f", os.O_RDWR, dir_fd=tree)
    fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
    assert lease(fd) == "OK"
    p = subprocess.Popen([sys.executable, "-c", opener], stdout=subprocess.PIPE)
    out, _ = p.communicate(timeout=30)
    row("lease-break-time=2, holder never unlocks: the opener's open took (s); lease after",
        f"{out.decode().strip()} / F_GETLEASE={fcntl.fcntl(fd, fcntl.F_GETLEASE)}")
    try:
        unlock(fd)
        row("... F_UNLCK after the kernel broke it", "OK")
    except OSError as exc:
        row("... F_UNLCK after the kernel broke it", errno.errorcode[exc.errno])
    os.close(fd)
    with open(BREAK_TIME, "w") as fh:
        fh.write("45")

    # 4. With the group: an inode mark (PRE_ACCESS|OPEN_PERM), resident = ignore mask.
    g = os.path.join(base, "g")
    make(g)
    fanotify_mark(fan, FAN_MARK_ADD, MASK, g)
    fanotify_mark(fan, FAN_MARK_ADD | FAN_MARK_IGNORE_SURV, MASK, g)
    events: list[tuple[float, int, float]] = []  # (read took, mask, at)
    stop = threading.Event()

    def listener() -> None:
        while not stop.is_set():
            import select
            r, _, _ = select.select([fan], [], [], 0.1)
            if not r:
                continue
            t = time.monotonic()
            buf = os.read(fan, 4096)
            took = time.monotonic() - t
            for ev in parse_events(buf):
                events.append((took, ev.mask, time.monotonic()))
                if ev.fd >= 0:
                    write_response(fan, ev.fd, FAN_ALLOW)
                    os.close(ev.fd)

    th = threading.Thread(target=listener, daemon=True)
    th.start()
    # An opener that opened while ignored keeps an fd: does it raise events after the ignore
    # is removed?  (It must: only then is "remove ignore, then lease" safe for it.)
    code = (f"import os,sys;fd=os.open({g!r},os.O_RDONLY);print('READY',flush=True);"
            "sys.stdin.readline();os.pread(fd,10,0);print('READ',flush=True)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stdin=subprocess.PIPE)
    assert p.stdout and p.stdin
    p.stdout.readline()
    n0 = len(events)
    fanotify_mark(fan, FAN_MARK_REMOVE | FAN_MARK_IGNORE, MASK, g)
    fd = os.open("g", os.O_RDWR, dir_fd=tree)
    row("fd opened while ignored, ignore removed: F_WRLCK", lease(fd))
    os.close(fd)
    p.stdin.write(b"\n")
    p.stdin.flush()
    p.stdout.readline()
    row("... that fd's next pread raises events", str(len(events) - n0))
    kill(p)
    # Lease held by this process (another thread reads the group): an opener raises
    # OPEN_PERM; the kernel opens the event fd for the listener's read().  Does that read block
    # on the lease (break_lease in the event fd's open)?
    fd = os.open("g", os.O_RDWR, dir_fd=tree)
    fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
    assert lease(fd) == "OK"
    n0 = len(events)
    time.monotonic()
    code = (f"import os,time;t=time.monotonic();fd=os.open({g!r},os.O_RDONLY);"
            "a=round(time.monotonic()-t,3);os.pread(fd,10,0);print(a,flush=True)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    time.sleep(1.0)
    seen = len(events) - n0
    punch = _libc.fallocate(fd, PUNCH, 0, SIZE)
    unlock(fd)
    t_unlock = time.monotonic()
    out, _ = p.communicate(timeout=10)
    os.close(fd)
    time.sleep(0.3)
    mine = events[n0:]
    row("leased; opener raises OPEN_PERM: events delivered to the listener before F_UNLCK",
        str(seen))
    if mine:
        row("... the listener's read() took (s) / first event delivered after F_UNLCK (s)",
            f"{mine[0][0]:.3f} / {mine[0][2] - t_unlock:+.3f}")
    row("... opener's open took (s); events for the opener in all", f"{out.decode().strip()} / "
        f"{len(mine)} (masks {[hex(m) for _, m, _ in mine]})")
    row("... punch through the lease fd (private door) while leased", f"rc={punch}")
    # An event fd held by the listener (event read, not yet answered) counts as an opener.
    hold = threading.Event()
    stop.set()
    th.join()
    code = (f"import os;fd=os.open({g!r},os.O_RDONLY);os.pread(fd,10,0);print('DONE')")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    import select
    evs = []
    deadline = time.monotonic() + 5
    while not evs and time.monotonic() < deadline:
        r, _, _ = select.select([fan], [], [], 0.2)
        if r:
            evs = parse_events(os.read(fan, 4096))
    fd = os.open("g", os.O_RDWR, dir_fd=tree)
    row("an event read and not yet answered (the listener holds its fd): F_WRLCK",
        lease(fd))
    os.close(fd)
    for ev in evs:
        write_response(fan, ev.fd, FAN_ALLOW)
        os.close(ev.fd)
    hold.set()
    # the pread after OPEN_PERM raises PRE_ACCESS: answer it too
    deadline = time.monotonic() + 5
    while p.poll() is None and time.monotonic() < deadline:
        r, _, _ = select.select([fan], [], [], 0.2)
        if r:
            for ev in parse_events(os.read(fan, 4096)):
                write_response(fan, ev.fd, FAN_ALLOW)
                os.close(ev.fd)
    kill(p)


if __name__ == "__main__":
    sys.exit(main())
