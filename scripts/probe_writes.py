#!/usr/bin/env python3
"""What a FAN_CLASS_PRE_CONTENT group sees of each way a program writes a marked file (6.18).

A probe in the house style of the team shelf's kprobe*/ scripts: self-contained (ctypes only, no
hsmfs import), run as root, one loop ext4 image under /tmp/probe_writes, every application a
separate process bounded by ``timeout -s KILL``, everything unmounted and removed in ``finally``.
The results are KERNEL_FACTS_3.md §2 and docs/kernel_writes.md (in the project).

For every write path (write, pwrite, O_APPEND, writev, pwritev, truncate, ftruncate, fallocate,
mmap MAP_SHARED + msync/munmap, copy_file_range/sendfile/splice into the file, shell `>>`,
`dd conv=notrunc`, open O_TRUNC, rename over, unlink) it records, per configuration:

  * PRE_ACCESS events: range and the syscall /proc/<tid>/syscall shows while the thread waits;
  * FAN_MODIFY and FAN_CLOSE_WRITE events, marked in the SAME pre-content group.

Configurations (columns):

  stub     inode mark PRE_ACCESS|MODIFY|CLOSE_WRITE on the file (no ignore mask)
  res      + FAN_MARK_IGNORE_SURV, mask PRE_ACCESS|OPEN_PERM|OPEN_EXEC_PERM on it (hsmfs's
           "resident" ignore)
  dirty    + the same ignore mask with FAN_MODIFY added
  fs       FAN_MARK_FILESYSTEM PRE_ACCESS|MODIFY|CLOSE_WRITE + the "res" inode ignore
  priv     the app writes through a bind mount carrying a mount ignore mark
           PRE_ACCESS|OPEN_PERM|OPEN_EXEC_PERM (hsmfs's private door today)
  priv+    same, mount ignore mask also MODIFY|CLOSE_WRITE

Section D: directory events (FAN_CREATE/DELETE/MOVED_*): refused in the pre-content group? seen
by a second FAN_CLASS_NOTIF|FAN_REPORT_DFID_NAME group? silenced by its mount ignore mark?

Usage:  cp scripts/probe_writes.py /tmp/ && python3 /tmp/probe_writes.py [T D]
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import shutil
import struct
import subprocess
import sys
import threading
import time

BASE = "/tmp/probe_writes"
IMG, MNT, PRIV = f"{BASE}/img", f"{BASE}/mnt", f"{BASE}/priv"
SIZE = 1 << 20
PAGE = 4096

libc = ctypes.CDLL(None, use_errno=True)
libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                               ctypes.c_char_p]

FAN_CLOEXEC, FAN_NONBLOCK = 0x1, 0x2
FAN_CLASS_NOTIF, FAN_CLASS_PRE_CONTENT, FAN_UNLIMITED_QUEUE = 0x0, 0x8, 0x10
FAN_REPORT_TID, FAN_REPORT_DFID_NAME = 0x100, 0x400 | 0x800
FAN_MARK_ADD, FAN_MARK_MOUNT, FAN_MARK_FILESYSTEM = 0x1, 0x10, 0x100
FAN_MARK_IGNORE_SURV = 0x400 | 0x40
FAN_ACCESS, FAN_MODIFY, FAN_ATTRIB, FAN_CLOSE_WRITE = 0x1, 0x2, 0x4, 0x8
FAN_MOVED_FROM, FAN_MOVED_TO, FAN_CREATE, FAN_DELETE = 0x40, 0x80, 0x100, 0x200
FAN_DELETE_SELF, FAN_MOVE_SELF = 0x400, 0x800
FAN_OPEN_PERM, FAN_OPEN_EXEC_PERM, FAN_PRE_ACCESS = 0x10000, 0x40000, 0x00100000
FAN_ONDIR, FAN_EVENT_ON_CHILD = 0x40000000, 0x08000000
PERM = FAN_OPEN_PERM | FAN_OPEN_EXEC_PERM | FAN_PRE_ACCESS
FAN_ALLOW = 0x1
RES_IGNORE = FAN_PRE_ACCESS | FAN_OPEN_PERM | FAN_OPEN_EXEC_PERM
META = struct.Struct("=IBBHQii")

# x86_64 syscall numbers -> names, for /proc/<tid>/syscall.
SYSCALLS = {0: "read", 1: "write", 9: "mmap", 17: "pread64", 18: "pwrite64", 19: "readv",
            20: "writev", 40: "sendfile", 76: "truncate", 77: "ftruncate", 82: "rename",
            257: "openat", 264: "renameat", 275: "splice", 285: "fallocate", 296: "pwritev",
            316: "renameat2", 326: "copy_file_range", 328: "pwritev2", 26: "msync", 11: "munmap"}
NAMES = {FAN_PRE_ACCESS: "PRE", FAN_MODIFY: "MOD", FAN_CLOSE_WRITE: "CW", FAN_CREATE: "CREATE",
         FAN_DELETE: "DELETE", FAN_MOVED_FROM: "MOVED_FROM", FAN_MOVED_TO: "MOVED_TO",
         FAN_ATTRIB: "ATTRIB", FAN_OPEN_PERM: "OPEN_PERM"}


def fan_init(flags, f_flags=os.O_RDWR | os.O_LARGEFILE):
    fd = libc.fanotify_init(flags, f_flags)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return fd


def fan_mark(fan, flags, mask, path):
    if libc.fanotify_mark(fan, flags, mask, -100, path.encode()) < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"fanotify_mark {path}: {os.strerror(e)}")


class Listener(threading.Thread):
    """Reads one group (non-blocking + poll), ALLOWs every permission event, records each event:
    (mask names, offset, count, syscall of the waiting thread)."""

    def __init__(self, fan):
        super().__init__(daemon=True)
        self.fan, self.events, self.stop = fan, [], False

    def run(self):
        p = select.poll()
        p.register(self.fan, select.POLLIN)
        while not self.stop:
            if not p.poll(20):
                continue
            try:
                buf = os.read(self.fan, 65536)
            except BlockingIOError:
                continue
            off = 0
            while off < len(buf):
                ev_len, _v, _r, mlen, mask, fd, pid = META.unpack_from(buf, off)
                rng = None
                rec = off + mlen
                while rec < off + ev_len:
                    t, _p, ln = struct.unpack_from("=BBH", buf, rec)
                    if t == 6:
                        rng = struct.unpack_from("=QQ", buf, rec + 8)
                    rec += ln
                sc = None
                if mask & PERM:
                    try:
                        with open(f"/proc/{pid}/syscall") as f:
                            nr = int(f.read().split()[0])
                        sc = SYSCALLS.get(nr, str(nr))
                    except (OSError, ValueError, IndexError):
                        sc = "?"
                    os.write(self.fan, struct.pack("=iI", fd, FAN_ALLOW))
                if fd >= 0:
                    os.close(fd)
                self.events.append((mask, rng, sc))
                off += ev_len

    def take(self, settle=0.15):
        time.sleep(settle)
        out, self.events = self.events, []
        return out


def fmt(events):
    """Short text: PRE(off,count)@syscall xn, MOD xn, CW xn."""
    parts = []
    for mask, rng, sc in events:
        names = "|".join(n for b, n in NAMES.items() if mask & b) or hex(mask)
        s = names
        if rng is not None:
            s += f"({rng[0]},{rng[1]})"
        if sc:
            s += f"@{sc}"
        if parts and parts[-1][0] == s:
            parts[-1][1] += 1
        else:
            parts.append([s, 1])
    return " ".join(s if n == 1 else f"{s}x{n}" for s, n in parts) or "-"


def sh(cmd, check=True):
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60)
    if check and r.returncode:
        raise RuntimeError(f"{cmd}: {r.stderr}")
    return r


def app(code, root):
    """Run ``code`` (python, with F = the file's path under ``root``) as its own process."""
    pre = (f"import os, mmap, ctypes; D={root!r}; F=D+'/f'; O=D+'/other'\n"
           "libc = ctypes.CDLL(None, use_errno=True)\n")
    r = subprocess.run(["timeout", "-s", "KILL", "10", sys.executable, "-c", pre + code],
                       capture_output=True, text=True)
    return "" if r.returncode == 0 else f" [rc {r.returncode} {r.stderr.strip()[-80:]}]"


OPS = [
    ("write 100 @5000", "fd=os.open(F,os.O_WRONLY); os.lseek(fd,5000,0); os.write(fd,b'w'*100)"),
    ("pwrite 100 @5000", "fd=os.open(F,os.O_WRONLY); os.pwrite(fd,b'w'*100,5000)"),
    ("pwrite 100 @2 MiB (extends)", "fd=os.open(F,os.O_WRONLY); os.pwrite(fd,b'w'*100,2<<20)"),
    ("O_APPEND write 100", "fd=os.open(F,os.O_WRONLY|os.O_APPEND); os.write(fd,b'a'*100)"),
    ("writev 2x100 @5000", "fd=os.open(F,os.O_WRONLY); os.lseek(fd,5000,0); "
                           "os.writev(fd,[b'v'*100,b'v'*100])"),
    ("pwritev 2x100 @5000", "fd=os.open(F,os.O_WRONLY); os.pwritev(fd,[b'v'*100]*2,5000)"),
    ("pwritev2 RWF_APPEND", "fd=os.open(F,os.O_WRONLY); os.pwritev(fd,[b'v'*100],0,0x10)"),
    ("truncate(path) 100000", "os.truncate(F,100000)"),
    ("ftruncate 3 MiB (extend)", "fd=os.open(F,os.O_WRONLY); os.ftruncate(fd,3<<20)"),
    ("open O_TRUNC + write 10", "fd=os.open(F,os.O_WRONLY|os.O_TRUNC); os.write(fd,b't'*10)"),
    ("fallocate mode 0 (5000,10000)", "fd=os.open(F,os.O_WRONLY); "
                                      "os.posix_fallocate(fd,5000,10000)"),
    ("fallocate extend (1 MiB,64 KiB)", "fd=os.open(F,os.O_WRONLY); "
                                        "os.posix_fallocate(fd,1<<20,65536)"),
    ("fallocate PUNCH_HOLE (8192,8192)", "fd=os.open(F,os.O_WRONLY); "
     "assert libc.fallocate(fd,3,ctypes.c_long(8192),ctypes.c_long(8192))==0"),
    ("mmap SHARED write+msync+munmap", "fd=os.open(F,os.O_RDWR); m=mmap.mmap(fd,65536); "
                                       "os.close(fd); m[5000:5010]=b'm'*10; m.flush(); m.close()"),
    ("copy_file_range other→f @5000", "s=os.open(O,os.O_RDONLY); d=os.open(F,os.O_WRONLY); "
                                      "os.copy_file_range(s,d,10000,0,5000)"),
    ("sendfile other→f", "s=os.open(O,os.O_RDONLY); d=os.open(F,os.O_WRONLY); "
                         "os.lseek(d,5000,0); os.sendfile(d,s,0,10000)"),
    ("splice pipe→f @5000", "r,w=os.pipe(); os.write(w,b's'*10000); d=os.open(F,os.O_WRONLY); "
                            "os.splice(r,d,10000,offset_dst=5000)"),
    ("open O_RDWR, close, no write", "fd=os.open(F,os.O_RDWR); os.close(fd)"),
    ("shell `echo x >> f`", "import subprocess; subprocess.run(['sh','-c','echo x >> '+F])"),
    ("`dd conv=notrunc` 1 KiB @8192", "import subprocess; subprocess.run(['dd','if=/dev/zero',"
     "'of='+F,'bs=1024','count=1','seek=8','conv=notrunc','status=none'])"),
    ("rename new file over f", "fd=os.open(D+'/new',os.O_WRONLY|os.O_CREAT); os.write(fd,b'n'); "
                               "os.close(fd); os.rename(D+'/new',F)"),
    ("unlink f", "os.unlink(F)"),
    ("chmod / utime f", "os.chmod(F,0o600); os.utime(F,(1,1))"),
]

CONFIGS = ["stub", "res", "dirty", "fs", "priv", "priv+"]


def reset_file():
    for n in ("f", "new"):
        if os.path.exists(f"{MNT}/{n}"):
            os.unlink(f"{MNT}/{n}")
    with open(f"{MNT}/f", "wb") as f:
        f.write(os.urandom(SIZE))
    if not os.path.exists(f"{MNT}/other"):
        with open(f"{MNT}/other", "wb") as f:
            f.write(os.urandom(SIZE))
    os.sync()


def one(config, code):
    reset_file()
    fan = fan_init(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK | FAN_UNLIMITED_QUEUE
                   | FAN_REPORT_TID)
    lst = Listener(fan)
    lst.start()
    try:
        watch = FAN_PRE_ACCESS | FAN_MODIFY | FAN_CLOSE_WRITE
        if config == "fs":
            fan_mark(fan, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, watch, MNT)
        else:
            fan_mark(fan, FAN_MARK_ADD, watch, f"{MNT}/f")
        if config in ("res", "fs"):
            fan_mark(fan, FAN_MARK_ADD | FAN_MARK_IGNORE_SURV, RES_IGNORE, f"{MNT}/f")
        if config == "dirty":
            fan_mark(fan, FAN_MARK_ADD | FAN_MARK_IGNORE_SURV, RES_IGNORE | FAN_MODIFY,
                     f"{MNT}/f")
        root = MNT
        if config.startswith("priv"):
            mask = RES_IGNORE | (FAN_MODIFY | FAN_CLOSE_WRITE if config == "priv+" else 0)
            fan_mark(fan, FAN_MARK_ADD | FAN_MARK_MOUNT | FAN_MARK_IGNORE_SURV, mask, PRIV)
            root = PRIV
        lst.take(0.05)  # nothing of the setup
        err = app(code, root)
        evs = lst.take()
        if config == "fs":  # only the file's events (the fs mark also sees "other", "new")
            pass
        return fmt(evs) + err
    finally:
        lst.stop = True
        lst.join()
        os.close(fan)


def sec_t():
    print("\n## T. write paths x configurations (cells: events seen; PRE(offset,count)@syscall)")
    print("| operation | " + " | ".join(CONFIGS) + " |")
    print("|---|" + "---|" * len(CONFIGS))
    for name, code in OPS:
        cells = [one(c, code) for c in CONFIGS]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def parse_dfid_names(buf):
    out, off = [], 0
    while off < len(buf):
        ev_len, _v, _r, mlen, mask, fd, _pid = META.unpack_from(buf, off)
        names, rec = [], off + mlen
        while rec < off + ev_len:
            t, _p, ln = struct.unpack_from("=BBH", buf, rec)
            if t in (2, 3, 4, 5) and ln > 16:  # DFID_NAME (2); 6.x also OLD/NEW_DFID_NAME
                hb = struct.unpack_from("=I", buf, rec + 12)[0]
                name = bytes(buf[rec + 20 + hb: rec + ln]).split(b"\0")[0].decode()
                names.append(name)
            rec += ln
        if fd >= 0:
            os.close(fd)
        label = "|".join(n for b, n in NAMES.items() if mask & b) or hex(mask)
        if mask & FAN_ONDIR:
            label += "|ONDIR"
        out.append(f"{label}({','.join(names)})")
        off += ev_len
    return out


def sec_d():
    print("\n## D. directory events")
    print("| what | result |\n|---|---|")
    os.makedirs(f"{MNT}/d", exist_ok=True)
    fan = fan_init(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_TID)
    for name, bit in (("CREATE", FAN_CREATE), ("DELETE", FAN_DELETE),
                      ("MOVED_FROM|MOVED_TO", FAN_MOVED_FROM | FAN_MOVED_TO),
                      ("ATTRIB", FAN_ATTRIB), ("DELETE_SELF", FAN_DELETE_SELF),
                      ("MODIFY|EVENT_ON_CHILD on the dir", FAN_MODIFY | FAN_EVENT_ON_CHILD)):
        try:
            fan_mark(fan, FAN_MARK_ADD, bit, f"{MNT}/d")
            res = "accepted"
        except OSError as e:
            res = errno.errorcode[e.errno]
        print(f"| pre-content group, inode mark on a dir: {name} | {res} |")
    try:
        fan_mark(fan, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, FAN_CREATE, MNT)
        res = "accepted"
    except OSError as e:
        res = errno.errorcode[e.errno]
    print(f"| pre-content group, filesystem mark: CREATE | {res} |")
    os.close(fan)
    # Child writes through a dir mark with EVENT_ON_CHILD in the pre-content group.
    fan = fan_init(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_TID)
    lst = Listener(fan)
    lst.start()
    fan_mark(fan, FAN_MARK_ADD, FAN_MODIFY | FAN_CLOSE_WRITE | FAN_EVENT_ON_CHILD, f"{MNT}/d")
    err = app("fd=os.open(D+'/d/new',os.O_WRONLY|os.O_CREAT,0o644); os.write(fd,b'x'); "
              "os.close(fd)", MNT)
    print(f"| pre-content group, dir mark MODIFY\\|CLOSE_WRITE\\|ON_CHILD, create+write a new "
          f"file in it | {fmt(lst.take())}{err} |")
    lst.stop = True
    lst.join()
    os.close(fan)
    os.unlink(f"{MNT}/d/new")
    # A second group with names.
    dmask = FAN_CREATE | FAN_DELETE | FAN_MOVED_FROM | FAN_MOVED_TO | FAN_ONDIR
    for how in ("fs mark", "fs mark + mount ignore on the private bind"):
        g = fan_init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_DFID_NAME,
                     os.O_RDONLY)
        fan_mark(g, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, dmask, MNT)
        ign = ""
        if "ignore" in how:
            try:
                fan_mark(g, FAN_MARK_ADD | FAN_MARK_MOUNT | FAN_MARK_IGNORE_SURV, dmask, PRIV)
                ign = "mount ignore accepted; "
            except OSError as e:
                ign = f"mount ignore {errno.errorcode[e.errno]}; "
        for label, root in (("public", MNT), ("private bind", PRIV)):
            err = app("fd=os.open(D+'/d/a',os.O_WRONLY|os.O_CREAT,0o644); os.close(fd); "
                      "os.mkdir(D+'/d/sub'); fd=os.open(D+'/d/tmp',os.O_WRONLY|os.O_CREAT); "
                      "os.close(fd); os.rename(D+'/d/tmp',D+'/d/a'); os.unlink(D+'/d/a'); "
                      "os.rmdir(D+'/d/sub')", root)
            time.sleep(0.1)
            try:
                evs = parse_dfid_names(os.read(g, 65536))
            except BlockingIOError:
                evs = []
            print(f"| NOTIF\\|REPORT_DFID_NAME group, {how}; create a, mkdir sub, create tmp, "
                  f"rename tmp over a, unlink a, rmdir sub, via {label} | {ign}"
                  f"{' '.join(evs) or '-'}{err} |")
        os.close(g)
    # Truncate and mmap stores raise no FAN_MODIFY in a group without FID: does a FID group see
    # them (FAN_MODIFY is sent by notify_change for a size change, as a dentry event)?
    for label, code in (("truncate(path) 100000", "os.truncate(F,100000)"),
                        ("ftruncate 3 MiB", "fd=os.open(F,os.O_WRONLY); os.ftruncate(fd,3<<20)"),
                        ("mmap SHARED store+msync+munmap", "fd=os.open(F,os.O_RDWR); "
                         "m=mmap.mmap(fd,65536); m[5000:5010]=b'm'*10; m.flush(); m.close()"),
                        ("chmod / utime", "os.chmod(F,0o600); os.utime(F,(1,1))")):
        reset_file()
        g = fan_init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | 0x200, os.O_RDONLY)  # FID
        fan_mark(g, FAN_MARK_ADD, FAN_MODIFY | FAN_ATTRIB | FAN_CLOSE_WRITE, f"{MNT}/f")
        err = app(code, MNT)
        time.sleep(0.1)
        try:
            evs = parse_dfid_names(os.read(g, 65536))
        except BlockingIOError:
            evs = []
        print(f"| NOTIF\\|REPORT_FID group, inode mark MODIFY\\|ATTRIB\\|CLOSE_WRITE: {label} | "
              f"{' '.join(evs) or '-'}{err} |")
        os.close(g)


def setup():
    cleanup()
    os.makedirs(MNT)
    os.makedirs(PRIV)
    sh(f"truncate -s 256M {IMG} && mkfs.ext4 -q -F {IMG} && mount -o loop {IMG} {MNT}")
    sh(f"mount --bind {MNT} {PRIV}")


def cleanup():
    for m in (PRIV, MNT):
        if os.path.exists(m) and os.path.ismount(m):
            sh(f"umount -l {m}", check=False)
    shutil.rmtree(BASE, ignore_errors=True)


def main():
    if os.geteuid() != 0:
        sys.exit("run as root")
    which = sys.argv[1:] or ["T", "D"]
    print(f"# probe_writes on {os.uname().release}")
    setup()
    try:
        if "T" in which:
            sec_t()
        if "D" in which:
            sec_d()
    finally:
        cleanup()


if __name__ == "__main__":
    main()
