#!/usr/bin/env python3
"""What can keep unpopulated stubs from reading as zeros once no hsmfs process guards them?

A probe in the house style of the team shelf's kprobe*/ scripts: self-contained (ctypes
only, no hsmfs import), run as root, loop images and scratch dirs under /tmp/probe_unguarded,
every reader a separate process bounded by a timeout, everything unmounted and removed in
``finally``.  The results and conclusions are in docs/unguarded.md (and KERNEL_FACTS_3.md §1).

Sections (default: all):

  A  today: what readers see after the pre-content group closes (cache path, a bind mount
     made earlier, mount namespaces made before/after, an fd held across the stop, a cwd
     inside the tree), and an fd held across a group *restart*.
  B  a cover mount over the cache dir, put in place before the group closes (an empty
     read-only tmpfs built with fsopen/fsmount and attached with move_mount): private vs shared
     propagation, the cache dir inside a filesystem vs the root of its own filesystem,
     uncovering, and reaching the tree beneath a cover from a child mount namespace.
  C  mounts whose life might end with the holder H: a self-bind with the cover beneath it
     (MOVE_MOUNT_BENEATH), an attached open_tree clone whose fd H holds, a mount made in H's
     own mount namespace, FUSE (alone and beneath a bind), a /proc/<H>/fd magic link.
  D  the worker W holds a dup of the group: H SIGKILLed while W lives; W then exits (today)
     or covers, drains the queue, flushes orphaned event numbers and exits (window, cost).
  T  a "tombstone" holder that keeps the group after stop and answers EIO, and adoption of
     that group by a new holder with pidfd_getfd (no marks re-added).
  E  the stub itself: mode 000, chattr +i, renaming stubs aside (cost), ext4 shutdown.

Usage:  cp scripts/probe_unguarded.py /tmp/ && python3 /tmp/probe_unguarded.py [A B C D T E]
Sub-roles the driver runs (not for direct use): holder, worker, fuse.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time

BASE = "/tmp/probe_unguarded"
SELF = os.path.abspath(__file__)
STUB = 1 << 20
PAGE = 4096

# ------------------------------------------------------------------------------ syscalls (x86_64)
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                               ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
libc.unshare.argtypes = [ctypes.c_int]

FAN_CLOEXEC, FAN_NONBLOCK = 0x1, 0x2
FAN_CLASS_PRE_CONTENT, FAN_UNLIMITED_QUEUE = 0x8, 0x10
FAN_MARK_ADD, FAN_MARK_FILESYSTEM = 0x1, 0x100
FAN_PRE_ACCESS = 0x00100000
FAN_ALLOW, FAN_DENY = 0x1, 0x2
FAN_EVENT_INFO_TYPE_RANGE = 6
AT_FDCWD, AT_EMPTY_PATH, AT_RECURSIVE = -100, 0x1000, 0x8000
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC = 1, os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH, MOVE_MOUNT_BENEATH = 0x4, 0x200
FSOPEN_CLOEXEC, FSMOUNT_CLOEXEC = 1, 1
FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 1, 6
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC = 1, 2, 4, 8
MNT_DETACH = 2
MS_REC, MS_PRIVATE = 0x4000, 0x40000
CLONE_NEWNS = 0x20000
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT = 428, 429, 430, 431, 432
SYS_MOUNT_SETATTR, SYS_PIDFD_GETFD = 442, 438
EXT4_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
PR_SET_CHILD_SUBREAPER = 36
COVER_SOURCE = "hsmfs-cover"
COVER_MARKER = ".hsmfs-cover"


def _check(r, what):
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return int(r)


def _sys(nr, *args, what="syscall"):
    return _check(libc.syscall(ctypes.c_long(nr), *args), what)


_L, _S = ctypes.c_long, ctypes.c_char_p


def open_tree(path, flags):
    return _sys(SYS_OPEN_TREE, _L(AT_FDCWD), _S(path.encode()), _L(flags), what="open_tree")


def move_mount(from_fd, to_path, flags=0):
    return _sys(SYS_MOVE_MOUNT, _L(from_fd), _S(b""), _L(AT_FDCWD), _S(to_path.encode()),
                _L(MOVE_MOUNT_F_EMPTY_PATH | flags), what="move_mount")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def tmpfs_detached(source, files):
    """A detached, read-only tmpfs mount (fsopen/fsmount) holding ``files``; returns its fd."""
    fs = _sys(SYS_FSOPEN, _S(b"tmpfs"), _L(FSOPEN_CLOEXEC), what="fsopen")
    try:
        for k, v in (("source", source), ("mode", "0555"), ("size", "64k"),
                     ("nr_inodes", "16")):
            _sys(SYS_FSCONFIG, _L(fs), _L(FSCONFIG_SET_STRING), _S(k.encode()), _S(v.encode()),
                 _L(0), what="fsconfig")
        _sys(SYS_FSCONFIG, _L(fs), _L(FSCONFIG_CMD_CREATE), _S(None), _S(None), _L(0),
             what="fsconfig create")
        m = _sys(SYS_FSMOUNT, _L(fs), _L(FSMOUNT_CLOEXEC),
                 _L(MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC), what="fsmount")
    finally:
        os.close(fs)
    for name, data in files.items():
        fd = os.open(name, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o444, dir_fd=m)
        os.write(fd, data)
        os.close(fd)
    attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    _sys(SYS_MOUNT_SETATTR, _L(m), _S(b""), _L(AT_EMPTY_PATH), ctypes.byref(attr), _L(32),
         what="mount_setattr")
    return m


def cover(path, beneath=False):
    m = tmpfs_detached(COVER_SOURCE, {COVER_MARKER: b"probe cover\n"})
    try:
        move_mount(m, path, MOVE_MOUNT_BENEATH if beneath else 0)
    finally:
        os.close(m)


def uncover(path):
    """Lazily detach the top mount at ``path`` if it is a probe cover (checked through an fd)."""
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.stat(COVER_MARKER, dir_fd=fd)
        except FileNotFoundError:
            return False
        _check(libc.umount2(f"/proc/self/fd/{fd}".encode(), MNT_DETACH), "umount2")
        return True
    finally:
        os.close(fd)


def clone_beneath(path):
    """A detached clone of what lies beneath the cover at ``path``: a child process unshares its
    mount namespace, makes it private, detaches the cover there only, clones ``path`` with
    open_tree and passes the fd back (SCM_RIGHTS)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # child: only raw syscalls, then _exit
        code = 1
        try:
            a.close()
            _check(libc.unshare(CLONE_NEWNS), "unshare")
            _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount private")
            _check(libc.umount2(path.encode(), MNT_DETACH), "umount2")
            fd = open_tree(path, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)
            socket.send_fds(b, [b"ok"], [fd])
            code = 0
        except BaseException as e:  # report anything, then _exit
            with _suppress():
                b.send(f"err {e}".encode())
        finally:
            os._exit(code)
    b.close()
    try:
        a.settimeout(10)
        msg, fds, _, _ = socket.recv_fds(a, 256, 1)
    finally:
        a.close()
        _waitpid(pid, 10)
    if not fds:
        raise OSError(errno.EIO, msg.decode())
    return fds[0]


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


def _waitpid(pid, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return status
        time.sleep(0.01)
    with _suppress():
        os.kill(pid, signal.SIGKILL)
    with _suppress():
        return os.waitpid(pid, 0)[1]
    return None


# ------------------------------------------------------------------------------ fanotify
_META = struct.Struct("=IBBHQii")
_RANGE = struct.Struct("=BBHIQQ")
_RESP = struct.Struct("=iI")


def fan_group():
    return _check(libc.fanotify_init(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK
                                      | FAN_UNLIMITED_QUEUE, os.O_RDWR | os.O_LARGEFILE),
                  "fanotify_init")


def fan_mark_fs(fan, path):
    _check(libc.fanotify_mark(fan, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, FAN_PRE_ACCESS,
                              AT_FDCWD, path.encode()), "fanotify_mark")


def fan_read(fan):
    """Non-blocking read of queued events: [(fd, offset, count)]."""
    try:
        buf = os.read(fan, 65536)
    except BlockingIOError:
        return []
    out, off = [], 0
    while off + _META.size <= len(buf):
        ev_len, _v, _r, meta_len, _mask, fd, _pid = _META.unpack_from(buf, off)
        rng = (0, 0)
        i = off + meta_len
        while i + 4 <= off + ev_len:
            typ, _pad, ln = struct.unpack_from("=BBH", buf, i)
            if typ == FAN_EVENT_INFO_TYPE_RANGE:
                _t, _p, _l, _pad2, o, c = _RANGE.unpack_from(buf, i)
                rng = (o, c)
            i += max(ln, 4)
        out.append((fd, *rng))
        off += ev_len
    return out


def fan_respond(fan, fd, response):
    os.write(fan, _RESP.pack(fd, response))


def deny_errno(err):
    return FAN_DENY | (err << 24)


def flush_numbers(fan, upto):
    """Answer EIO to every pending event whose number is in [0, upto): (answered, seconds)."""
    t0, n = time.monotonic(), 0
    for num in range(upto):
        while True:
            try:
                fan_respond(fan, num, deny_errno(errno.EIO))
                n += 1
            except OSError:
                break
    return n, time.monotonic() - t0


# ------------------------------------------------------------------------------ sub-role: holder
def role_holder(argv):
    ap = argparse.ArgumentParser(prog="probe_unguarded.py holder")
    ap.add_argument("root")
    ap.add_argument("--mode", default="fill", choices=("fill", "deny", "hold"))
    ap.add_argument("--stop-cover")
    ap.add_argument("--worker")
    ap.add_argument("--worker-cover", default="")
    ap.add_argument("--worker-out", default="")
    ap.add_argument("--flush", type=int, default=65536)
    ap.add_argument("--self-bind-beneath")
    ap.add_argument("--attach-clone")
    ap.add_argument("--ns-view")
    ap.add_argument("--opath")
    ap.add_argument("--adopt")
    ap.add_argument("--inode", action="store_true", help="inode marks on every file under root")
    a = ap.parse_args(argv)
    info = {"r": "ready", "pid": os.getpid()}
    if a.adopt:
        pid, num = (int(x) for x in a.adopt.split(":"))
        pidfd = os.pidfd_open(pid)
        fan = _sys(SYS_PIDFD_GETFD, _L(pidfd), _L(num), _L(0), what="pidfd_getfd")
        os.close(pidfd)
        os.set_blocking(fan, False)
    else:
        fan = fan_group()
        if a.inode:
            for d, _dirs, files in os.walk(a.root):
                for name in files:
                    _check(libc.fanotify_mark(fan, FAN_MARK_ADD, FAN_PRE_ACCESS, AT_FDCWD,
                                              os.path.join(d, name).encode()), "inode mark")
        else:
            fan_mark_fs(fan, a.root)
    info["fan"] = fan
    keep = []
    if a.self_bind_beneath:
        p = a.self_bind_beneath
        clone = open_tree(p, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)
        move_mount(clone, p)
        os.close(clone)
        try:
            cover(p, beneath=True)
            info["beneath"] = "ok"
        except OSError as e:
            info["beneath"] = errno.errorcode.get(e.errno, str(e))
    if a.attach_clone:
        clone = open_tree(a.attach_clone, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)
        move_mount(clone, a.attach_clone)
        keep.append(clone)  # H keeps the fd of the attached mount until it dies
    if a.ns_view:
        m = tmpfs_detached("probe-view", {"VIEW": b"view\n"})
        move_mount(m, a.ns_view)
        os.close(m)
    if a.opath:
        info["opath"] = os.open(a.opath, os.O_PATH | os.O_DIRECTORY)
    if a.worker:
        h_end, w_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        w = subprocess.Popen([sys.executable, SELF, "worker", a.worker, str(fan),
                              str(w_end.fileno()), a.worker_cover, a.worker_out, str(a.flush)],
                             pass_fds=(fan, w_end.fileno()))
        w_end.close()
        keep.append(h_end)
        info["worker"] = w.pid
    state = {"mode": a.mode, "stop": False, "pause": False}
    signal.signal(signal.SIGTERM, lambda *_: state.update(stop=True))
    signal.signal(signal.SIGUSR1, lambda *_: state.update(mode="deny"))
    signal.signal(signal.SIGUSR2, lambda *_: state.update(pause=True))
    print(json.dumps(info), flush=True)
    held = []
    while True:
        if state["stop"]:
            if state["pause"]:
                os._exit(0)  # handover: the adopter holds the group, nothing to drain
            out = {"r": "stopped"}
            if a.stop_cover:
                t0 = time.monotonic()
                cover(a.stop_cover)
                out["cover_ms"] = round(1000 * (time.monotonic() - t0), 2)
            for fd in held:
                with _suppress():
                    fan_respond(fan, fd, deny_errno(errno.EIO))
                os.close(fd)
            for _ in range(1000):
                evs = fan_read(fan)
                if not evs:
                    break
                for fd, _o, _c in evs:
                    with _suppress():
                        fan_respond(fan, fd, deny_errno(errno.EIO))
                    os.close(fd)
            os.close(fan)
            print(json.dumps(out), flush=True)
            return 0
        if state["pause"]:
            time.sleep(0.05)
            continue
        r, _, _ = select.select([fan], [], [], 0.1)
        if not r:
            continue
        for fd, off, cnt in fan_read(fan):
            if fd < 0:
                continue
            if state["mode"] == "hold":
                held.append(fd)
                continue
            if state["mode"] == "fill":
                size = os.fstat(fd).st_size
                end = size if cnt == 0 else min(size, off + cnt)
                if end > off:
                    os.pwrite(fd, b"H" * (end - off), off)
                resp = FAN_ALLOW
            else:
                resp = deny_errno(errno.EIO)
            with _suppress():
                fan_respond(fan, fd, resp)
            os.close(fd)


# ------------------------------------------------------------------------------ sub-role: worker
def role_worker(argv):
    """W: holds a dup of the group; waits for H's end of the socketpair to close (H died)."""
    policy, fan, sock_fd, cover_path, out_path, flush = argv
    fan, flush = int(fan), int(flush)
    s = socket.socket(fileno=int(sock_fd))
    while s.recv(64):
        pass
    t_eof = time.time()
    if policy == "idle":
        while True:
            time.sleep(1)
    res = {"t_eof": t_eof}
    if policy == "guard":
        cover(cover_path)
        res["t_cover"] = time.time()
        drained = 0
        for _ in range(1000):
            evs = fan_read(fan)
            if not evs:
                break
            for fd, _o, _c in evs:
                with _suppress():
                    fan_respond(fan, fd, deny_errno(errno.EIO))
                os.close(fd)
                drained += 1
        res["drained"] = drained
        res["t_drain"] = time.time()
        res["flushed"], res["flush_s"] = flush_numbers(fan, flush)
        res["t_flush"] = time.time()
    with open(out_path, "w") as f:
        json.dump(res, f)
    return 0


# ------------------------------------------------------------------------------ sub-role: fuse
def role_fuse(argv):
    import pyfuse3
    import trio

    class Ops(pyfuse3.Operations):
        async def getattr(self, inode, ctx=None):
            e = pyfuse3.EntryAttributes()
            if inode == pyfuse3.ROOT_INODE:
                e.st_mode, e.st_size = stat.S_IFDIR | 0o755, 0
            elif inode == 2:
                e.st_mode, e.st_size = stat.S_IFREG | 0o644, STUB
            else:
                raise pyfuse3.FUSEError(errno.ENOENT)
            e.st_ino = inode
            e.entry_timeout = e.attr_timeout = 0
            return e

        async def lookup(self, parent, name, ctx=None):
            if parent == pyfuse3.ROOT_INODE and name == b"f":
                return await self.getattr(2)
            raise pyfuse3.FUSEError(errno.ENOENT)

        async def opendir(self, inode, ctx):
            return inode

        async def readdir(self, fh, start_id, token):
            if start_id == 0:
                pyfuse3.readdir_reply(token, b"f", await self.getattr(2), 1)

        async def open(self, inode, flags, ctx):
            return pyfuse3.FileInfo(fh=inode)

        async def read(self, fh, off, size):
            return b"F" * max(0, min(size, STUB - off))

    opts = set(pyfuse3.default_options)
    opts.add("fsname=probe_unguarded")
    pyfuse3.init(Ops(), argv[0], opts)
    print(json.dumps({"r": "ready", "pid": os.getpid()}), flush=True)
    trio.run(pyfuse3.main)


# ------------------------------------------------------------------------------ readers
READ1 = r"""
import errno, os, sys
try:
    fd = os.open(sys.argv[1], os.O_RDONLY)
    b = os.pread(fd, 4096, int(sys.argv[2]))
    print("DATA" if b.strip(b"\0") else "ZEROS" if len(b) == 4096 else "EOF" if not b else "SHORT")
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno))
"""

AGENT = r"""
import errno, json, os, sys
held = {}
def cl(b):
    return "DATA" if b.strip(b"\0") else "ZEROS" if len(b) == 4096 else "EOF" if not b else "SHORT"
print(json.dumps({"r": "ready"}), flush=True)
for line in sys.stdin:
    c = json.loads(line)
    op = c["op"]
    try:
        if op == "read":
            fd = os.open(c["path"], os.O_RDONLY)
            try:
                r = cl(os.pread(fd, 4096, c["off"]))
            finally:
                os.close(fd)
        elif op == "hold":
            held[c["key"]] = os.open(c["path"], os.O_RDONLY)
            r = "held"
        elif op == "fdread":
            r = cl(os.pread(held[c["key"]], 4096, c["off"]))
        elif op == "chdir":
            os.chdir(c["path"])
            r = "ok"
        elif op == "ls":
            r = ",".join(sorted(os.listdir(c["path"]))) or "(empty)"
        elif op == "create":
            fd = os.open(c["path"], os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.close(fd)
            os.unlink(c["path"])
            r = "created"
        else:
            r = "bad op"
    except OSError as e:
        r = errno.errorcode.get(e.errno, str(e.errno))
    print(json.dumps({"r": r}), flush=True)
"""

NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
PROCS: list[subprocess.Popen] = []


def ns(prop):
    return ("unshare", "-m", "--propagation", prop)


def oneshot(path, off=0, prefix=()):
    """One reader process: open + pread(4 KiB @ off), killed after 3 s (BLOCKED)."""
    try:
        p = subprocess.run(["timeout", "-s", "KILL", "3", *prefix, sys.executable, "-c", READ1,
                            path, str(off)], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "BLOCKED"
    if p.returncode in (137, -9):
        return "BLOCKED"
    return p.stdout.strip() or f"rc={p.returncode} {p.stderr.strip()[-80:]}"


class LineProc:
    """A child that prints JSON lines; lines are read with a deadline."""

    def __init__(self, cmd, **kw):
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, **kw)
        PROCS.append(self.p)
        self.buf = b""
        self.pending = False

    def get(self, timeout):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self.p.stdout], [], [], left)
            if r:
                chunk = os.read(self.p.stdout.fileno(), 65536)
                if not chunk:
                    try:
                        rc = self.p.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        rc = "?"
                    return {"r": f"died(rc={rc})"}
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def kill(self, sig=signal.SIGKILL):
        with _suppress():
            self.p.send_signal(sig)

    def wait(self, timeout=10):
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            return self.p.wait(timeout=5)


class Agent(LineProc):
    """A long-lived reader (optionally in its own mount namespace) driven over stdin."""

    def __init__(self, prefix=(), cwd=None):
        super().__init__([*prefix, sys.executable, "-c", AGENT], cwd=cwd,
                         stderr=subprocess.DEVNULL)
        r = self.get(15)
        if not r or r["r"] != "ready":
            raise RuntimeError(f"agent did not start: {r}")

    def ask(self, timeout=2.5, **cmd):
        if self.pending:
            return "busy"
        try:
            self.p.stdin.write((json.dumps(cmd) + "\n").encode())
            self.p.stdin.flush()
        except BrokenPipeError:
            return "died"
        r = self.get(timeout)
        if r is None:
            self.pending = True
            return "BLOCKED"
        return r["r"]

    def late(self, timeout=3.0):
        r = self.get(timeout)
        if r is None:
            return "BLOCKED"
        self.pending = False
        return r["r"]


def start_holder(*args, prefix=()):
    h = LineProc([*prefix, sys.executable, SELF, "holder", *args])
    info = h.get(20)
    if not info or info.get("r") != "ready":
        raise RuntimeError(f"holder did not start: {info}")
    h.info = info
    return h


def stop_holder(h, timeout=10):
    h.kill(signal.SIGTERM)
    out = h.get(timeout) or {}
    h.wait(timeout)
    return out


# ------------------------------------------------------------------------------ driver utilities
ROWS: list[tuple[str, str, str, str]] = []
_counter = {"stub": 0, "off": 0, "sub": 0}


def row(sec, situation, reader, result):
    ROWS.append((sec, situation, reader, str(result)))
    print(f"  [{sec}] {situation:<58} {reader:<44} {result}", flush=True)


def sh(cmd, check=True, timeout=120):
    p = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{cmd}: rc={p.returncode} {p.stderr.strip()}")
    return p


def nxt():
    _counter["stub"] += 1
    return f"s{_counter['stub']:03d}"


def nsub():
    _counter["sub"] += 1
    return f"r{_counter['sub']:03d}"


def noff():
    _counter["off"] += 1
    return (_counter["off"] * 8 * PAGE) % STUB


def make_stub(path, size=STUB):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, size)
    os.close(fd)


def our_mounts():
    """Mount points under BASE, deepest / latest first."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == BASE or mp.startswith(BASE + "/"):
                out.append(mp)
    return list(reversed(out))


def bind(src, dst):
    os.makedirs(dst, exist_ok=True)
    sh(["mount", "--bind", src, dst])
    return dst


def umount(path, lazy=True):
    return sh(["umount", *(["-l"] if lazy else []), path], check=False).returncode == 0


def umount_all(path):
    """Lazily unmount everything stacked at ``path`` (a path of ours under BASE)."""
    for _ in range(10):
        if not os.path.ismount(path) and stack_at(path) == "(none)":
            return
        umount(path)


def stack_at(path):
    """The mounts stacked at ``path``, top first, as 'fstype:source' (followed by parent ids:
    with MOVE_MOUNT_BENEATH the mountinfo order is not the stacking order)."""
    at = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == path:
                sep = fields.index("-")
                at[fields[0]] = (fields[1], f"{fields[sep + 1]}:{fields[sep + 2]}")
    chain = [i for i, (parent, _) in at.items() if parent not in at]
    while chain and len(chain) < len(at):
        above = [i for i, (parent, _) in at.items() if parent == chain[-1]]
        if not above:
            break
        chain.append(above[0])
    return " over ".join(at[i][1] for i in reversed(chain)) or "(none)"


def exists(path):
    return "yes" if os.path.exists(path) else "no"


class Env:
    def __init__(self):
        self.img = f"{BASE}/img/a.img"
        self.m = f"{BASE}/mnt/fs"
        self.p = f"{self.m}/cache"

    def setup(self):
        os.makedirs(f"{BASE}/img", exist_ok=True)
        os.makedirs(self.m, exist_ok=True)
        sh(f"truncate -s 256M {self.img} && mkfs.ext4 -q -F {self.img}")
        sh(["mount", "-o", "loop", self.img, self.m])
        os.makedirs(f"{self.p}/sub")
        for i in range(1, 400):
            make_stub(f"{self.p}/s{i:03d}")
        for i in range(1, 100):
            make_stub(f"{self.p}/sub/r{i:03d}")


# ------------------------------------------------------------------------------ section A
def sec_a(env):
    print("A: today, after the group closes", flush=True)
    p = env.p
    h = start_holder(env.m)
    app = Agent()
    held = nxt()
    app.ask(op="hold", path=f"{p}/{held}", key="h")
    app.ask(op="chdir", path=f"{p}/sub")
    b = bind(p, f"{BASE}/bindA")
    nsb = Agent(prefix=ns("private"))
    readers = [
        ("cache path, new open", lambda: oneshot(f"{p}/{nxt()}")),
        ("bind mount made while guarded", lambda: oneshot(f"{b}/{nxt()}")),
        ("mntns made while guarded (private)", lambda: nsb.ask(op="read", path=f"{p}/{nxt()}",
                                                              off=0)),
        ("fd opened while guarded", lambda: app.ask(op="fdread", key="h", off=noff())),
        ("cwd inside the tree, relative open", lambda: app.ask(op="read", path=nsub(), off=0)),
    ]
    for name, fn in readers:
        row("A", "guarded (holder fills)", name, fn())
    stop_holder(h)
    for name, fn in readers:
        row("A", "group closed (stop)", name, fn())
    row("A", "group closed (stop)", "mntns made after the stop",
        oneshot(f"{p}/{nxt()}", prefix=ns("private")))
    row("A", "group closed (stop)", "uid 65534, cache path", oneshot(f"{p}/{nxt()}",
                                                                    prefix=NOBODY))
    app.ask(op="hold", path=f"{p}/{nxt()}", key="gap")  # opened while nothing guards
    h2 = start_holder(env.m)
    row("A", "new group (restart), fs mark again", "fd opened while NO group existed",
        app.ask(op="fdread", key="gap", off=noff()))
    row("A", "new group (restart), fs mark again", "fd opened under the OLD group",
        app.ask(op="fdread", key="h", off=noff()))
    row("A", "new group (restart), fs mark again", "cache path, new open",
        oneshot(f"{p}/{nxt()}"))
    stop_holder(h2)
    # the same with inode marks (hsmfs's layout for a cache dir inside a shared filesystem)
    old_fd, gap_fd = nxt(), nxt()
    h = start_holder(p, "--inode")
    app.ask(op="hold", path=f"{p}/{old_fd}", key="old_i")
    stop_holder(h)
    app.ask(op="hold", path=f"{p}/{gap_fd}", key="gap_i")
    h = start_holder(p, "--inode")
    sit = "inode marks: stop, then a new group re-marks"
    row("A", sit, "fd opened under the OLD group", app.ask(op="fdread", key="old_i",
                                                          off=noff()))
    row("A", sit, "fd opened while NO group existed", app.ask(op="fdread", key="gap_i",
                                                             off=noff()))
    stop_holder(h)
    for ag in (app, nsb):
        ag.kill()
        ag.wait()
    umount(b)


# ------------------------------------------------------------------------------ section B
def sec_b(env):
    print("B: a cover mount put over the cache dir before the group closes", flush=True)
    p, m = env.p, env.m
    # B1: private propagation (this machine's /), cache dir inside a filesystem
    h = start_holder(m, "--stop-cover", p)
    app = Agent()
    app.ask(op="hold", path=f"{p}/{nxt()}", key="h")
    app.ask(op="chdir", path=f"{p}/sub")
    b = bind(p, f"{BASE}/bindB")
    nsb = Agent(prefix=ns("private"))
    row("B", "guarded (sanity)", "cache path", oneshot(f"{p}/{nxt()}"))
    out = stop_holder(h)
    sit = "covered, then group closed; propagation private"
    row("B", sit, "holder: time to build + attach the cover", f"{out.get('cover_ms')} ms")
    row("B", sit, "mount stack at the cache dir", stack_at(p))
    row("B", sit, "cache path, new open", oneshot(f"{p}/{nxt()}"))
    row("B", sit, "uid 65534, cache path", oneshot(f"{p}/{nxt()}", prefix=NOBODY))
    row("B", sit, "ls cache dir", app.ask(op="ls", path=p))
    row("B", sit, "create a file in the cache dir", app.ask(op="create", path=f"{p}/new"))
    row("B", sit, "mntns made after the cover", oneshot(f"{p}/{nxt()}", prefix=ns("private")))
    row("B", sit, "bind mount made while guarded", oneshot(f"{b}/{nxt()}"))
    row("B", sit, "mntns made while guarded (private)",
        nsb.ask(op="read", path=f"{p}/{nxt()}", off=0))
    row("B", sit, "fd opened while guarded", app.ask(op="fdread", key="h", off=noff()))
    row("B", sit, "cwd inside the tree, relative open", app.ask(op="read", path=nsub(), off=0))
    try:
        t0 = time.monotonic()
        fd = clone_beneath(p)
        ms = round(1000 * (time.monotonic() - t0), 1)
        try:
            sfd = os.open(nxt(), os.O_RDONLY, dir_fd=fd)
            data = os.pread(sfd, PAGE, 0)
            os.close(sfd)
            res = ("DATA" if data.strip(b"\0") else "ZEROS") + f" (clone in {ms} ms)"
        finally:
            os.close(fd)
    except OSError as e:
        res = f"failed: {e}"
    row("B", sit, "child mntns detaches cover, open_tree clone -> fd", res)
    row("B", sit, "cache path after that (host still covered?)", oneshot(f"{p}/{nxt()}"))
    row("B", "uncovered (umount2 /proc/self/fd/N, MNT_DETACH)", "uncover() removed it",
        uncover(p))
    row("B", "uncovered (umount2 /proc/self/fd/N, MNT_DETACH)", "cache path, new open",
        oneshot(f"{p}/{nxt()}"))
    for ag in (app, nsb):
        ag.kill()
        ag.wait()
    umount(b)

    # B2: shared propagation on the filesystem that holds the cache dir
    sh(["mount", "--make-shared", m])
    try:
        h = start_holder(m, "--stop-cover", p)
        peer = bind(p, f"{BASE}/bindS")
        priv = bind(p, f"{BASE}/bindD")
        sh(["mount", "--make-private", priv])  # what docker does for -v (rprivate)
        ag = {k: Agent(prefix=ns(k)) for k in ("unchanged", "slave", "private")}
        out = stop_holder(h)
        sit = "covered, then group closed; fs of cache dir SHARED"
        row("B", sit, "cache path, new open", oneshot(f"{p}/{nxt()}"))
        row("B", sit, "bind made earlier (peer, shared)", oneshot(f"{peer}/{nxt()}"))
        row("B", sit, "bind made earlier, then made private", oneshot(f"{priv}/{nxt()}"))
        for k, a in ag.items():
            row("B", sit, f"mntns made earlier, --propagation {k}",
                a.ask(op="read", path=f"{p}/{nxt()}", off=0))
        uncover(p)
        sit = "uncovered again (shared)"
        row("B", sit, "cache path", oneshot(f"{p}/{nxt()}"))
        row("B", sit, "bind made earlier (peer)", oneshot(f"{peer}/{nxt()}"))
        for k, a in ag.items():
            row("B", sit, f"mntns made earlier, --propagation {k}",
                a.ask(op="read", path=f"{p}/{nxt()}", off=0))
        for a in ag.values():
            a.kill()
            a.wait()
        umount(peer)
        umount(priv)
    finally:
        sh(["mount", "--make-private", m], check=False)

    # B3: the cache dir is the root of its own filesystem (the filesystem-mark layout)
    img2, v = f"{BASE}/img/vol.img", f"{BASE}/mnt/vol"
    os.makedirs(v, exist_ok=True)
    sh(f"truncate -s 128M {img2} && mkfs.ext4 -q -F {img2}")
    sh(["mount", "-o", "loop", img2, v])
    try:
        for i in range(1, 20):
            make_stub(f"{v}/v{i:02d}")
        sh(["mount", "--make-shared", v])
        h = start_holder(v, "--stop-cover", v)
        peer = bind(v, f"{BASE}/bindVS")
        priv = bind(v, f"{BASE}/bindVD")
        sh(["mount", "--make-private", priv])
        stop_holder(h)
        sit = "cache dir = fs root (shared); covered, closed"
        row("B", sit, "mount stack at the cache dir", stack_at(v))
        row("B", sit, "cache path, new open", oneshot(f"{v}/v01"))
        row("B", sit, "bind of the fs made earlier (peer)", oneshot(f"{peer}/v02"))
        row("B", sit, "bind of the fs made earlier, made private", oneshot(f"{priv}/v03"))
        uncover(v)
        row("B", "fs root uncovered", "cache path", oneshot(f"{v}/v04"))
        row("B", "fs root uncovered", "bind made earlier (peer)", oneshot(f"{peer}/v05"))
        umount(peer)
        umount(priv)
    finally:
        umount(v)


# ------------------------------------------------------------------------------ section C
def sec_c(env):
    print("C: mounts that might die with the holder", flush=True)
    p, m = env.p, env.m
    # C1: H bind-mounts the cache dir onto itself and puts the cover beneath (MOVE_MOUNT_BENEATH)
    h = start_holder(m, "--self-bind-beneath", p)
    sit = "H: self-bind on top, cover BENEATH (move_mount)"
    row("C", sit, "MOVE_MOUNT_BENEATH", h.info.get("beneath"))
    row("C", sit, "mount stack at the cache dir", stack_at(p))
    row("C", sit, "cache path while H serves", oneshot(f"{p}/{nxt()}"))
    h.kill()
    h.wait()
    sit = "... after SIGKILL of H"
    row("C", sit, "mount stack at the cache dir", stack_at(p))
    row("C", sit, "cache path, new open", oneshot(f"{p}/{nxt()}"))
    umount(p, lazy=False)  # what a clean stop would do: drop the top (self-bind)
    row("C", "... then top unmounted (as a clean stop would)", "cache path, new open",
        oneshot(f"{p}/{nxt()}"))
    uncover(p)

    # C2: an open_tree clone attached with move_mount; H holds its fd until it dies
    h = start_holder(m, "--attach-clone", p)
    h.kill()
    h.wait()
    sit = "H attached an open_tree clone, kept its fd; SIGKILL"
    row("C", sit, "mount stack at the cache dir", stack_at(p))
    row("C", sit, "cache path, new open", oneshot(f"{p}/{nxt()}"))
    umount(p)

    # C3: H makes its mount in its own mount namespace (peer of the host's, shared)
    sh(["mount", "--make-shared", m])
    try:
        h = start_holder(m, "--ns-view", p, prefix=ns("unchanged"))
        sit = "H in its own mntns (peer), mounts a view at the cache dir"
        row("C", sit, "host sees the view while H lives", exists(f"{p}/VIEW"))
        h.kill()
        h.wait()
        time.sleep(0.2)
        row("C", sit, "host sees the view after SIGKILL of H", exists(f"{p}/VIEW"))
        if os.path.exists(f"{p}/VIEW"):
            umount(p)
    finally:
        sh(["mount", "--make-private", m], check=False)

    # C4: FUSE alone: what a dead daemon's mount answers
    fmnt = f"{BASE}/fuse"
    os.makedirs(fmnt, exist_ok=True)
    fuse = LineProc([sys.executable, SELF, "fuse", fmnt], stderr=subprocess.DEVNULL)
    ready = fuse.get(20)
    if not ready or ready.get("r") != "ready":
        row("C", "FUSE", "daemon", f"did not start: {ready}")
    else:
        fb = bind(fmnt, f"{BASE}/fusebind")
        app = Agent()
        app.ask(op="hold", path=f"{fmnt}/f", key="f")
        nsb = Agent(prefix=ns("private"))
        sit = "FUSE mount, daemon alive"
        row("C", sit, "path", oneshot(f"{fmnt}/f"))
        row("C", sit, "fd held", app.ask(op="fdread", key="f", off=0))
        fuse.kill()
        fuse.wait()
        sit = "FUSE mount, daemon SIGKILLed"
        row("C", sit, "path, new open", oneshot(f"{fmnt}/f", off=0))
        row("C", sit, "fd held, page not cached", app.ask(op="fdread", key="f", off=768 * 1024))
        row("C", sit, "bind made earlier", oneshot(f"{fb}/f"))
        row("C", sit, "mntns made earlier", nsb.ask(op="read", path=f"{fmnt}/f", off=0))
        for a in (app, nsb):
            a.kill()
            a.wait()
        umount(fb)
        umount_all(fmnt)

    # C5: FUSE beneath a bind of the tree: the top mount still answers
    clone = open_tree(p, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)
    fuse = LineProc([sys.executable, SELF, "fuse", p], stderr=subprocess.DEVNULL)
    try:
        ready = fuse.get(20)
        if ready and ready.get("r") == "ready":
            move_mount(clone, p)
            os.close(clone)
            clone = -1
            fuse.kill()
            fuse.wait()
            sit = "tree bind on top of a FUSE mount; FUSE daemon SIGKILLed"
            row("C", sit, "mount stack at the cache dir", stack_at(p))
            row("C", sit, "cache path, new open", oneshot(f"{p}/{nxt()}"))
    finally:
        if clone >= 0:
            os.close(clone)
        umount_all(p)

    # C6: the public path as a symlink to /proc/<H>/fd/<O_PATH fd of the cache dir>
    h = start_holder(m, "--opath", p)
    link = f"{BASE}/link"
    os.symlink(f"/proc/{h.info['pid']}/fd/{h.info['opath']}", link)
    os.chmod(BASE, 0o755)
    sit = "symlink -> /proc/<H>/fd/N (magic link)"
    row("C", sit, "root via the link while H serves", oneshot(f"{link}/{nxt()}"))
    row("C", sit, "uid 65534 via the link while H serves", oneshot(f"{link}/{nxt()}",
                                                                  prefix=NOBODY))
    h.kill()
    h.wait()
    row("C", sit + ", H SIGKILLed", "root via the link", oneshot(f"{link}/{nxt()}"))
    os.unlink(link)


# ------------------------------------------------------------------------------ section D
def _wait_file(path, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and os.path.getsize(path):
            with open(path) as f:
                return json.load(f)
        time.sleep(0.01)
    return None


def sec_d(env):
    print("D: the worker keeps a dup of the group when H dies", flush=True)
    p, m = env.p, env.m
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphaned W is re-parented to us
    for policy in ("idle", "guard"):
        outf = f"{BASE}/w_{policy}.json"
        h = start_holder(m, "--mode", "hold", "--worker", policy, "--worker-cover", p,
                         "--worker-out", outf)
        wpid = h.info["worker"]
        app = Agent()
        app.ask(op="hold", path=f"{p}/{nxt()}", key="h")
        r1 = Agent()
        row("D", f"H holds events (W: {policy})", "reader 1, path",
            r1.ask(op="read", path=f"{p}/{nxt()}", off=0, timeout=1.0))
        r2 = Agent()
        if policy == "guard":
            h.kill(signal.SIGUSR2)  # H stops reading: reader 2's event stays queued, unread
            time.sleep(0.2)
            row("D", "H holds events, stopped reading (W: guard)", "reader 2, path",
                r2.ask(op="read", path=f"{p}/{nxt()}", off=0, timeout=1.0))
        t_kill = time.time()
        h.kill()
        h.wait()
        if policy == "idle":
            sit = "H SIGKILLed, W alive (idle, holds the dup)"
            time.sleep(1.0)
            row("D", sit, "reader 1 (its event was read by H)", r1.late(0.5))
            row("D", sit, "reader 2, path, new open", r2.ask(op="read", path=f"{p}/{nxt()}",
                                                            off=0, timeout=1.0))
            row("D", sit, "fd opened while guarded",
                app.ask(op="fdread", key="h", off=noff(), timeout=1.0))
            os.kill(wpid, signal.SIGKILL)
            _waitpid(wpid, 5)
            sit = "... then W exits without guarding (today)"
            row("D", sit, "reader 1 released with", r1.late(3))
            row("D", sit, "reader 2 released with", r2.late(3))
            row("D", sit, "fd held, its blocked read released with", app.late(3))
            row("D", sit, "cache path, new open", oneshot(f"{p}/{nxt()}"))
        else:
            sit = "H SIGKILLed; W covers, drains, flushes, exits"
            res = _wait_file(outf, 20)
            _waitpid(wpid, 10)
            if res is None:
                row("D", sit, "worker", "no result")
            else:
                row("D", sit, "H killed -> W sees EOF", f"{1000 * (res['t_eof'] - t_kill):.1f} ms")
                row("D", sit, "H killed -> cover in place",
                    f"{1000 * (res['t_cover'] - t_kill):.1f} ms")
                row("D", sit, "queued events W denied (drain)", res["drained"])
                row("D", sit, "orphans flushed / numbers tried",
                    f"{res['flushed']} / 65536 in {1000 * res['flush_s']:.0f} ms")
            row("D", sit, "reader 1 (event read by H) released with", r1.late(3))
            row("D", sit, "reader 2 (event queued, unread) released with", r2.late(3))
            row("D", sit, "cache path, new open", oneshot(f"{p}/{nxt()}"))
            row("D", sit, "fd opened while guarded, new read",
                app.ask(op="fdread", key="h", off=noff()))
            uncover(p)
        for a in (app, r1, r2):
            a.kill()
            a.wait()


# ------------------------------------------------------------------------------ section T
def sec_t(env):
    print("T: a tombstone holder after stop; adoption of its group", flush=True)
    p, m = env.p, env.m
    h = start_holder(m)
    app = Agent()
    app.ask(op="hold", path=f"{p}/{nxt()}", key="h")
    b = bind(p, f"{BASE}/bindT")
    nsb = Agent(prefix=ns("private"))
    readers = [
        ("cache path, new open", lambda: oneshot(f"{p}/{nxt()}")),
        ("bind mount made earlier", lambda: oneshot(f"{b}/{nxt()}")),
        ("mntns made earlier", lambda: nsb.ask(op="read", path=f"{p}/{nxt()}", off=0)),
        ("fd opened earlier", lambda: app.ask(op="fdread", key="h", off=noff())),
    ]
    h.kill(signal.SIGUSR1)  # tombstone: keep the group, answer EIO
    time.sleep(0.2)
    for name, fn in readers:
        row("T", "tombstone holder (group kept, answers EIO)", name, fn())
    h.kill(signal.SIGUSR2)  # stop reading (handover)
    time.sleep(0.2)
    r = Agent()
    row("T", "handover: nobody reads the group", "reader, path",
        r.ask(op="read", path=f"{p}/{nxt()}", off=0, timeout=0.5))
    n = start_holder(m, "--adopt", f"{h.info['pid']}:{h.info['fan']}")
    h.kill(signal.SIGTERM)
    h.wait()
    row("T", "handover", "that reader, once a new holder adopted", r.late(3))
    for name, fn in readers:
        row("T", "new holder adopted via pidfd_getfd, added no marks", name, fn())
    stop_holder(n)
    for a in (app, nsb, r):
        a.kill()
        a.wait()
    umount(b)


# ------------------------------------------------------------------------------ section E
def sec_e(env):
    print("E: the stub itself", flush=True)
    p = env.p
    s = f"{p}/{nxt()}"
    os.chmod(s, 0)
    row("E", "no group; stub mode 000", "root", oneshot(s))
    row("E", "no group; stub mode 000", "uid 65534", oneshot(s, prefix=NOBODY))
    os.chmod(s, 0o644)
    s = f"{p}/{nxt()}"
    if sh(["chattr", "+i", s], check=False).returncode == 0:
        try:
            row("E", "no group; chattr +i", "root", oneshot(s))
        finally:
            sh(["chattr", "-i", s], check=False)
    else:
        row("E", "no group; chattr +i", "root", "chattr failed")
    # rename aside: cost per stub
    d, aside = f"{p}/ren", f"{p}/.aside"
    os.makedirs(d)
    os.makedirs(aside)
    n = 5000
    for i in range(n):
        make_stub(f"{d}/x{i:05d}")
    sh("sync")
    t0 = time.monotonic()
    for i in range(n):
        os.rename(f"{d}/x{i:05d}", f"{aside}/x{i:05d}")
    t1 = time.monotonic()
    row("E", f"rename {n} stubs aside", "cache path, new open", oneshot(f"{d}/x00001"))
    for i in range(n):
        os.rename(f"{aside}/x{i:05d}", f"{d}/x{i:05d}")
    t2 = time.monotonic()
    row("E", f"rename {n} stubs aside", "cost per rename (aside / back)",
        f"{1e6 * (t1 - t0) / n:.1f} / {1e6 * (t2 - t1) / n:.1f} us")
    shutil.rmtree(d)
    shutil.rmtree(aside)

    # ext4 shutdown of a dedicated filesystem (the filesystem-mark layout)
    img3, v = f"{BASE}/img/shut.img", f"{BASE}/mnt/shut"
    os.makedirs(v, exist_ok=True)
    sh(f"truncate -s 128M {img3} && mkfs.ext4 -q -F {img3}")
    dev = sh(["losetup", "-f", "--show", img3]).stdout.strip()
    LOOPS.append(dev)
    try:
        sh(["mount", dev, v])
        for i in range(1, 10):
            make_stub(f"{v}/t{i}")
        with open(f"{v}/res", "wb") as f:
            f.write(b"R" * STUB)
        h = start_holder(v)
        b = bind(v, f"{BASE}/bindE")
        app = Agent()
        app.ask(op="hold", path=f"{v}/t1", key="stub")
        app.ask(op="hold", path=f"{v}/res", key="res")
        nsb = Agent(prefix=ns("private"))
        fd = os.open(v, os.O_RDONLY | os.O_DIRECTORY)
        try:
            import fcntl
            fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", 0))
            res = "ok"
        except OSError as e:
            res = errno.errorcode.get(e.errno, str(e))
        finally:
            os.close(fd)
        stop_holder(h)
        sit = "EXT4_IOC_SHUTDOWN, then group closed"
        row("E", sit, "ioctl", res)
        row("E", sit, "cache path, stub", oneshot(f"{v}/t2"))
        row("E", sit, "cache path, resident file", oneshot(f"{v}/res"))
        row("E", sit, "stat() of a stub", _try(lambda: os.stat(f"{v}/t3").st_size))
        row("E", sit, "fd held: stub / resident", f"{app.ask(op='fdread', key='stub', off=0)}"
            f" / {app.ask(op='fdread', key='res', off=0)}")
        row("E", sit, "bind made earlier", oneshot(f"{b}/t4"))
        row("E", sit, "mntns made earlier", nsb.ask(op="read", path=f"{v}/t5", off=0))
        umount(v)  # lazy: the held fds keep the old mount busy
        sh(["mount", dev, v])
        row("E", "remounted while the bind + mntns + fds still exist", "cache path, resident",
            oneshot(f"{v}/res"))
        for a in (app, nsb):
            a.kill()
            a.wait()
        umount(b, lazy=False)
        umount(v, lazy=False)
        sh(["mount", dev, v])
        row("E", "remounted after every mount was gone", "cache path: resident / stub",
            f"{oneshot(f'{v}/res')} / {oneshot(f'{v}/t6')}")
        umount(v, lazy=False)
    finally:
        umount(v)
        sh(["losetup", "-d", dev], check=False)
        LOOPS.remove(dev)


def _try(fn):
    try:
        return fn()
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e))


LOOPS: list[str] = []


# ------------------------------------------------------------------------------ driver
def cleanup():
    for pr in PROCS:
        if pr.poll() is None:
            with _suppress():
                pr.kill()
            with _suppress():
                pr.wait(timeout=5)
    for _ in range(10):
        mps = our_mounts()
        if not mps:
            break
        for mp in mps:
            umount(mp)
    for dev in LOOPS:
        sh(["losetup", "-d", dev], check=False)
    left = our_mounts()
    if left:
        print(f"WARNING: still mounted: {left}", flush=True)
    else:
        shutil.rmtree(BASE, ignore_errors=True)


def main():
    if len(sys.argv) > 1 and sys.argv[1] in ("holder", "worker", "fuse"):
        return {"holder": role_holder, "worker": role_worker, "fuse": role_fuse}[
            sys.argv[1]](sys.argv[2:])
    if os.geteuid() != 0:
        sys.exit("run as root")
    sections = [s.upper() for s in sys.argv[1:]] or list("ABCDTE")
    if our_mounts():
        sys.exit(f"{BASE} has mounts left from an earlier run: {our_mounts()}")
    shutil.rmtree(BASE, ignore_errors=True)
    os.makedirs(BASE)
    print(f"kernel {os.uname().release}; / propagation: "
          f"{sh(['findmnt', '-no', 'PROPAGATION', '/']).stdout.strip()}", flush=True)
    env = Env()
    try:
        env.setup()
        for s in sections:
            {"A": sec_a, "B": sec_b, "C": sec_c, "D": sec_d, "T": sec_t, "E": sec_e}[s](env)
    finally:
        cleanup()
    print("\n| section | situation | reader | saw |\n|---|---|---|---|")
    for r in ROWS:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
