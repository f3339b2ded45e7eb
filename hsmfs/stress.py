"""``hsmfs stress --seconds N``: both doors at once over one cache, with faults and crashes,
every byte checked.

Owns the run: the S3 it reads (an embedded moto server with sample objects unless
``--endpoint``), a fault-injecting proxy between hsmfs and S3 (:mod:`hsmfs.faultproxy`), the
daemon serving both doors (:mod:`hsmfs.stress_daemon`), reader processes
(:mod:`hsmfs.stress_reader`), the model of what every file must hold, and the verdict.

* Readers (processes, half on each door) read random ranges of random objects by ``read``,
  ``pread`` and ``mmap``.  Every byte is compared with the model: S3's bytes, or the last
  local write of a file written since.
* One conductor thread, serially: fault windows at the proxy (503 SlowDown, 500, 403, dropped
  connections, cut bodies, connection refused, latency, a single blip) with files released
  at their start so reads need S3; ``hsmfs release``; a write to a stub through either door,
  read back through both; ``hsmfs archive``, then S3 must hold the written bytes; SIGKILL of
  the kernel door's worker (the holder restarts it; it serves the FUSE mount too); SIGKILL of
  the whole daemon, started again.
* An error while a fault or restart is under way (or within a grace after it) is counted by
  errno, if it is one a fault may cause; any other error, any wrong byte, any reader stuck
  past the hang timeout is a failure.

Why a gate around the kernel door's readers during a whole-daemon crash: with no group, the
backing tree's stubs read as zeros through any fd (a documented limit, docs/unguarded.md),
so those readers hold no fd across that window.  FUSE readers keep going (ENOTCONN, ENOENT).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .faultproxy import FaultProxy
from .stress_daemon import BothDoors, DaemonFailed
from .stress_reader import Reader, digest

KiB, MiB = 1 << 10, 1 << 20
DOORS = ("fuse", "kernel")
#: Errnos a fault or a restart may cause (README's errno table: EIO, EPERM for a 403; a dead
#: or remounting FUSE mount: ENOTCONN, an aborted connection: ECONNABORTED, an empty
#: mountpoint: ENOENT).  Not EAGAIN: throttling past the retries is EIO now.
EXPECTED = frozenset({errno.EIO, errno.EPERM, errno.ENOTCONN, errno.ENOENT,
                      errno.ECONNABORTED})
#: How long after a fault or restart an error still counts as caused by it: a fetch begun in
#: the window retries (retries=2, timeout=5 below) and a reader may wait on it.
GRACE_S = 8.0
DAEMON_OPTIONS = ["retries=2", "timeout=5"]
FAULTS = ("503", "500", "403", "close", "truncate", "refuse", "delay", "blip")


# -- the model -----------------------------------------------------------------------------

class RWLock:
    """Many readers or one writer; a waiting writer keeps new readers out (no starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self, timeout: float) -> Iterator[None]:
        deadline = time.monotonic() + timeout
        with self._cond:
            self._waiting += 1
            try:
                while self._writer or self._readers:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("readers did not drain")
                    self._cond.wait(left)
                self._writer = True
            finally:
                self._waiting -= 1
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class Obj:
    key: str  # S3 key
    rel: str  # path below the mount / cache
    local: bytearray  # what every read must return
    mutable: bool  # written and archived by the conductor
    lock: RWLock = field(default_factory=RWLock)
    dirty: bool = False
    lost: bool = False  # a write failed half-way: its bytes are unknown, nobody reads it
    #: The bytes before the last write, and that write (door, offset, length, time): a wrong
    #: read that returns them is named stale, which says where to look.
    before: bytes | None = None
    last_write: str = ""

    @property
    def size(self) -> int:
        return len(self.local)


def sample_objects(n: int, rnd: random.Random) -> dict[str, bytes]:
    """Sizes from a tail of a block to above open_fill (8 MiB: ranged fetches through the
    kernel door too), never block-aligned, in nested prefixes."""
    classes = (3 * KiB + 5, 64 * KiB + 77, 700 * KiB + 1, 3 * MiB + 4097, 12 * MiB + 333)
    out = {}
    for i in range(n):
        size = classes[i % len(classes)] + rnd.randrange(4096)
        out[f"set{i % 3}/obj-{i:03d}.bin"] = rnd.randbytes(size)
    return out


# -- what happened ---------------------------------------------------------------------------

@dataclass
class Window:
    what: str
    start: float
    end: float | None = None  # None: under way


class Stats:
    """Every count the summary prints, behind one lock (readers are threads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reads: Counter[str] = Counter()  # verified reads by door
        self.ops: Counter[str] = Counter()  # verified reads by op
        self.bytes: Counter[str] = Counter()  # bytes verified by door
        self.expected: Counter[str] = Counter()  # errno name -> count, while disturbed
        self.expected_by: Counter[str] = Counter()  # "door, what was on: errno" -> count
        self.unexpected: Counter[str] = Counter()
        self.wrong = 0
        self.hangs = 0
        self.restarts: Counter[str] = Counter()
        self.restart_s: dict[str, list[float]] = {"worker": [], "daemon": []}
        self.faults: Counter[str] = Counter()
        self.actions: Counter[str] = Counter()
        self.details: list[str] = []  # the first failures, for the report
        self.windows: list[Window] = []

    def fail(self, line: str) -> None:
        if len(self.details) < 50:
            self.details.append(line)

    def disturbed(self, t0: float, t1: float) -> str | None:
        """The fault or restart (if any) that overlaps [t0 - grace, t1]."""
        with self.lock:
            for w in reversed(self.windows):
                end = w.end if w.end is not None else t1
                if t0 <= end + GRACE_S and t1 >= w.start:
                    return w.what
        return None

    @contextlib.contextmanager
    def window(self, what: str) -> Iterator[None]:
        w = Window(what, time.monotonic())
        with self.lock:
            self.windows.append(w)
            del self.windows[:-64]  # older ones are past any grace
        try:
            yield
        finally:
            w.end = time.monotonic()


# -- the run ---------------------------------------------------------------------------------

class Run:
    def __init__(self, args: argparse.Namespace, objects: dict[str, Obj], mnt: Path,
                 cache: Path, daemon: BothDoors, proxy: FaultProxy, s3, bucket: str,
                 prefix: str, env: dict[str, str]) -> None:
        self.args, self.objects, self.mnt, self.cache = args, objects, mnt, cache
        self.daemon, self.proxy, self.s3, self.bucket, self.prefix = (daemon, proxy, s3,
                                                                      bucket, prefix)
        self.env = env
        self.stats = Stats()
        self.gate = RWLock()  # kernel-door readers: shared; a whole-daemon crash: exclusive
        self.stop = threading.Event()
        self.fatal: str | None = None
        self.started = time.monotonic()
        self.readers: list[Reader] = []
        self.names = sorted(objects)

    def path(self, door: str, obj: Obj) -> str:
        return str((self.mnt if door == "fuse" else self.cache) / obj.rel)

    # -- one verified access -------------------------------------------------------------------

    def access(self, reader: Reader, door: str, obj: Obj, op: str, off: int, n: int) -> bool:
        """Read [off, off+n) of obj through door and check it against the model; the caller
        holds nothing.  Counts the outcome; whether the read was right."""
        gate = self.gate.shared() if door == "kernel" else contextlib.nullcontext()
        with gate, obj.lock.shared():
            if obj.lost:
                return True
            # Hashed before the read: a view kept over the bytearray would pin its buffer.
            want = obj.local[off:off + n]
            want_n, want_h = len(want), digest(want)
            del want
            t0 = time.monotonic()
            res = reader.call({"op": op, "path": self.path(door, obj), "off": off, "n": n},
                              self.args.hang_timeout)
            t1 = time.monotonic()
            ok = "h" in res and res["n"] == want_n and res["h"] == want_h
            where = f"{door} {op} {obj.rel} [{off}, +{n})"
            if "h" in res and not ok and obj.before is not None:
                stale = res["h"] == digest(obj.before[off:off + n])
                where += (f" ({'STALE: the bytes before' if stale else 'not the bytes before'}"
                          f" the last write, {obj.last_write})")
            self.outcome(res, ok, where, door, op, t0, t1)
            return ok

    def outcome(self, res: dict, ok: bool, where: str, door: str, op: str, t0: float,
                t1: float) -> None:
        at = f"t={t0 - self.started:.1f}s"
        if ok:
            with self.stats.lock:
                self.stats.reads[door] += 1
                self.stats.ops[op] += 1
                self.stats.bytes[door] += res["n"]
            return
        cause = self.stats.disturbed(t0, t1)
        with self.stats.lock:
            if "hang" in res:
                self.stats.hangs += 1
                self.stats.fail(f"HANG {at} {where}: no answer in {self.args.hang_timeout} s")
            elif "h" in res:
                self.stats.wrong += 1
                self.stats.fail(f"WRONG BYTES {at} {where}: got {res['n']} bytes, "
                                f"{res.get('z', 0)} all-zero blocks (during: {cause})")
            else:
                name = (res["signal"] if "signal" in res
                        else errno.errorcode.get(res.get("errno") or 0, str(res.get("errno"))))
                fine = cause is not None and (res.get("errno") in EXPECTED
                                              or res.get("signal") == "SIGBUS")
                if fine:
                    self.stats.expected[name] += 1
                    kind = (cause or "").split(" ")[0]  # fault / worker / daemon
                    self.stats.expected_by[f"{door}, {kind}: {name}"] += 1
                else:
                    self.stats.unexpected[name] += 1
                    self.stats.fail(f"UNEXPECTED {name} {at} {where}: {res.get('err', '')} "
                                    f"(during: {cause})")

    # -- readers ------------------------------------------------------------------------------

    def reader_loop(self, i: int, door: str) -> None:
        rnd = random.Random(self.args.seed * 1000 + i)
        reader = self.readers[i]
        while not self.stop.is_set():
            obj = self.objects[rnd.choice(self.names)]
            op = rnd.choice(("read", "pread", "mmap"))
            off, n = pick_range(rnd, obj.size)
            if not self.access(reader, door, obj, op, off, n):
                # A dead mount answers at once: without a pause the count of expected
                # errors would only measure how fast a loop spins.
                self.stop.wait(0.05)

    # -- the conductor ------------------------------------------------------------------------

    def conductor(self) -> None:
        rnd = random.Random(self.args.seed)
        hands = Reader(self.env)
        self.readers.append(hands)
        try:
            while not self.stop.is_set():
                plan = ["fault", "fault", "fault", "release", "write", "write", "archive",
                        "worker", "worker", "daemon"]
                rnd.shuffle(plan)
                for action in plan:
                    if self.stop.wait(rnd.uniform(0.3, 1.2)):
                        return
                    getattr(self, f"do_{action}")(rnd, hands)
                    with self.stats.lock:
                        self.stats.actions[action] += 1
        except DaemonFailed as exc:
            self.fatal = str(exc)
        except Exception as exc:  # a bug of the conductor must end the run, not hang it
            self.fatal = f"conductor: {exc!r}"
        finally:
            self.stop.set()

    def hsmfs(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hsmfs", *args], capture_output=True,
                              text=True, timeout=timeout, env=self.env)

    def release(self, objs: list[Obj]) -> None:
        """``hsmfs release``; a refusal (open, dirty) is counted, not a failure."""
        out = self.hsmfs("release", *[self.path("kernel", o) for o in objs])
        with self.stats.lock:
            for line in out.stdout.splitlines():
                self.stats.actions["release:" + line.split()[0]] += 1

    def do_release(self, rnd: random.Random, hands: Reader) -> None:
        self.release(rnd.sample(list(self.objects.values()), 4))

    def do_fault(self, rnd: random.Random, hands: Reader) -> None:
        kind = rnd.choice(FAULTS)
        # Cold files first, so the readers' next reads need S3 while the fault is on.
        cold = rnd.sample(list(self.objects.values()), 4)
        self.release(cold)
        with self.stats.window(f"fault {kind}"):
            p = self.proxy
            if kind in ("503", "500", "403"):
                p.fail_next(100000, status=int(kind), method=None, code={
                    "503": "SlowDown", "500": "InternalError", "403": "AccessDenied"}[kind])
            elif kind == "close":
                p.close_next(100000, method=None)
            elif kind == "truncate":
                p.truncate_next(100000, keep=rnd.randrange(0, 65536))
            elif kind == "refuse":
                p.refuse()
            elif kind == "delay":
                p.set_delay(rnd.uniform(50, 400))
            else:
                p.fail_next(1, status=503, code="SlowDown")
            # And one read of a cold file through each door, so every window meets a fetch
            # (the readers' own may all hit resident bytes).
            for door in DOORS:
                obj = rnd.choice(cold)
                self.access(hands, door, obj, rnd.choice(("read", "pread", "mmap")),
                            *pick_range(rnd, obj.size))
            self.stop.wait(rnd.uniform(0.5, 2.5))
            p.restore()
        with self.stats.lock:
            self.stats.faults[kind] += 1

    def do_worker(self, rnd: random.Random, hands: Reader) -> None:
        with self.stats.window("worker SIGKILL"):
            took = self.daemon.kill_worker()
        with self.stats.lock:
            self.stats.restarts["worker"] += 1
            self.stats.restart_s["worker"].append(took)

    def do_daemon(self, rnd: random.Random, hands: Reader) -> None:
        with self.gate.exclusive(self.args.hang_timeout + 30), \
                self.stats.window("daemon SIGKILL"):
            t0 = time.monotonic()
            self.daemon.kill_all()
            self.daemon.start()
            took = time.monotonic() - t0
        with self.stats.lock:
            self.stats.restarts["daemon"] += 1
            self.stats.restart_s["daemon"].append(took)

    def do_write(self, rnd: random.Random, hands: Reader) -> None:
        """A write through one door (to a stub, when the file is clean: released first), then
        read back through both: every reader's model is the local bytes from now on."""
        obj = self.objects[rnd.choice([k for k in self.names if self.objects[k].mutable])]
        if obj.lost:
            return
        if not obj.dirty:
            self.release([obj])
        door = rnd.choice(DOORS)
        off = rnd.randrange(obj.size)
        data = rnd.randbytes(min(obj.size - off, rnd.choice((1, 100, 4096, 70000))))
        gate = self.gate.shared() if door == "kernel" else contextlib.nullcontext()
        with gate, obj.lock.exclusive(self.args.hang_timeout + 30):
            t0 = time.monotonic()
            res = hands.call({"op": "write", "path": self.path(door, obj), "off": off,
                              "data": data.hex()}, self.args.hang_timeout)
            t1 = time.monotonic()
            if res.get("n") == len(data):
                obj.before = bytes(obj.local)
                obj.last_write = (f"{door} [{off}, +{len(data)}) at "
                                  f"t={t0 - self.started:.1f}s-{t1 - self.started:.1f}s")
                obj.local[off:off + len(data)] = data
                obj.dirty = True
            else:
                # What the file holds now is not known: nobody reads it again.
                obj.lost = True
                self.outcome(res, False, f"{door} write {obj.rel} [{off}, +{len(data)})",
                             door, "write", t0, t1)
                return
        with self.stats.lock:
            self.stats.actions["write:" + door] += 1
        lo = max(0, off - 5000)
        for back in DOORS:
            self.access(hands, back, obj, rnd.choice(("read", "pread", "mmap")), lo,
                        len(data) + 10000)

    def do_archive(self, rnd: random.Random, hands: Reader) -> None:
        """``hsmfs archive`` of the written files; S3 must then hold their local bytes."""
        dirty = [o for o in self.objects.values() if o.dirty and not o.lost]
        if not dirty:
            return
        t0 = time.monotonic()
        out = self.hsmfs("archive", *[self.path("kernel", o) for o in dirty], timeout=120)
        t1 = time.monotonic()
        if out.returncode != 0:
            cause = self.stats.disturbed(t0, t1)
            with self.stats.lock:
                (self.stats.expected if cause else self.stats.unexpected)["archive failed"] += 1
                if not cause:
                    self.stats.fail(f"UNEXPECTED archive failure: {out.stdout} {out.stderr}")
            return
        for o in dirty:
            with o.lock.shared():
                body = self.s3.get_object(Bucket=self.bucket, Key=o.key)["Body"].read()
                same = body == bytes(o.local)
                o.dirty = False
            with self.stats.lock:
                self.stats.actions["archive:verified" if same else "archive:WRONG"] += 1
                if not same:
                    self.stats.wrong += 1
                    self.stats.fail(f"WRONG BYTES in S3 after archive of {o.rel}")

    # -- the end ------------------------------------------------------------------------------

    def final_sweep(self) -> None:
        """Every object whole through both doors, once everything is quiet."""
        hands = Reader(self.env)
        self.readers.append(hands)
        for name in self.names:
            for door in DOORS:
                self.access(hands, door, self.objects[name], "pread", 0, self.objects[name].size)


def pick_range(rnd: random.Random, size: int) -> tuple[int, int]:
    """A range as programs ask them: block-aligned or not, tiny to 1 MiB, at the start, the
    middle, across EOF or past it."""
    n = rnd.choice((1, 17, 4096, 4096 * 3 + 5, 65536, 131072 + 7, MiB, rnd.randrange(1, 300000)))
    where = rnd.random()
    if where < 0.1:
        off = 0
    elif where < 0.2:
        off = max(0, size - rnd.randrange(1, 9000))
    elif where < 0.23:
        off = size + rnd.randrange(0, 100)  # past EOF: an empty read is the right answer
    elif where < 0.5:
        off = rnd.randrange(max(1, size)) // 4096 * 4096
    else:
        off = rnd.randrange(max(1, size))
    return off, n


# -- command line ----------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="hsmfs stress",
        description="Readers x objects x random ranges (read, pread, mmap) through both doors "
        "at once over one cache, with S3 faults, releases, writes, archives and SIGKILLs of "
        "the kernel worker and of the whole daemon; every byte checked against S3 or the last "
        "local write.  Exit 1 on any wrong byte, unexpected error or hang.")
    p.add_argument("--seconds", type=float, default=60, help="how long to run (default 60)")
    p.add_argument("--readers", type=int, default=6, help="reader processes, half per door")
    p.add_argument("--objects", type=int, default=15, help="sample objects (embedded S3)")
    p.add_argument("--endpoint", help="a real S3 endpoint (default: embedded moto)")
    p.add_argument("--bucket", help="with --endpoint: a bucket to put the sample objects in "
                   "(under a fresh prefix, deleted at the end)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--hang-timeout", type=float, default=60,
                   help="a reader with no answer after this many seconds is a hang (failure)")
    p.add_argument("--progress", type=float, default=None, metavar="S",
                   help="one progress line every S seconds (default: a live line on a "
                   "terminal, nothing on a pipe)")
    p.add_argument("--json", metavar="PATH", help="write the summary as JSON to PATH ('-': "
                   "stdout, instead of the text summary)")
    p.add_argument("--workdir", type=Path, help="where the cache and mount go (default: a "
                   "fresh directory in /tmp, removed unless the run fails)")
    a = p.parse_args(argv)
    if a.endpoint and not a.bucket:
        p.error("--endpoint needs --bucket")
    if a.readers < 2:
        p.error("--readers: at least 2 (one per door)")
    return a


@contextlib.contextmanager
def s3_server(args: argparse.Namespace) -> Iterator[tuple[str, str, str]]:
    """(endpoint, bucket, prefix): the embedded moto server and a fresh bucket, or the given
    endpoint and bucket with a fresh prefix."""
    if args.endpoint:
        yield args.endpoint, args.bucket, f"hsmfs-stress-{uuid.uuid4().hex[:8]}/"
        return
    from .demo import embedded_s3

    with embedded_s3() as endpoint:
        yield endpoint, "hsmfs-stress", ""


def stress_main(argv: list[str]) -> int:
    args = parse_args(argv)
    # Ctrl-C and SIGTERM unwind through every finally below (everything stopped by PID).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="hsmfs-stress-"))
    workdir.mkdir(parents=True, exist_ok=True)
    failed = True
    try:
        summary = run(args, workdir)
        failed = not summary["ok"]
        report(args, summary, workdir)
        return 1 if failed else 0
    except KeyboardInterrupt:
        print("hsmfs stress: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    except DaemonFailed as exc:
        print(f"hsmfs stress: {exc}", file=sys.stderr)
        return 1
    finally:
        if failed:
            print(f"hsmfs stress: logs kept in {workdir}", file=sys.stderr)
        elif args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace, workdir: Path) -> dict:
    from .demo import _client

    env = dict(os.environ)
    for k, v in (("AWS_ACCESS_KEY_ID", "stress"), ("AWS_SECRET_ACCESS_KEY", "stress"),
                 ("AWS_DEFAULT_REGION", "us-east-1")):
        if not args.endpoint:
            env.setdefault(k, v)
            os.environ.setdefault(k, v)
    with contextlib.ExitStack() as stack:
        endpoint, bucket, prefix = stack.enter_context(s3_server(args))
        s3 = _client(endpoint)
        rnd = random.Random(args.seed)
        if not args.endpoint:
            s3.create_bucket(Bucket=bucket)
        data = sample_objects(args.objects, rnd)
        objects: dict[str, Obj] = {}
        for i, (rel, body) in enumerate(data.items()):
            s3.put_object(Bucket=bucket, Key=prefix + rel, Body=body)
            objects[rel] = Obj(prefix + rel, rel, bytearray(body), mutable=i % 4 == 1)
        if args.endpoint:
            stack.callback(lambda: [s3.delete_object(Bucket=bucket, Key=o.key)
                                    for o in objects.values()])
        proxy = FaultProxy(endpoint, record=False)
        proxy.start()
        stack.callback(proxy.stop)
        mnt, cache = workdir / "mnt", workdir / "cache"
        mnt.mkdir(exist_ok=True)
        cache.mkdir(exist_ok=True)
        daemon = BothDoors(f"s3://{bucket}/{prefix}", mnt, cache, workdir,
                           [f"endpoint={proxy.endpoint}", *DAEMON_OPTIONS], env)
        stack.callback(daemon.stop)
        daemon.start()
        r = Run(args, objects, mnt, cache, daemon, proxy, s3, bucket, prefix, env)
        stack.callback(lambda: [x.kill() for x in list(r.readers)])
        return drive(r)


def drive(r: Run) -> dict:
    """Run the readers and the conductor for the time asked; the summary."""
    args = r.args
    threads = []
    for i in range(args.readers):
        r.readers.append(Reader(r.env))
        threads.append(threading.Thread(target=r.reader_loop, args=(i, DOORS[i % 2]),
                                        name=f"reader-{i}", daemon=True))
    threads.append(threading.Thread(target=r.conductor, name="conductor", daemon=True))
    for t in threads:
        t.start()
    deadline = r.started + args.seconds
    live = args.progress is None and sys.stderr.isatty()
    every = args.progress if args.progress else 1.0
    next_line = time.monotonic() + every
    try:
        while time.monotonic() < deadline and not r.stop.is_set():
            time.sleep(0.2)
            if (live or args.progress) and time.monotonic() >= next_line:
                next_line += every
                line = progress(r)
                print(f"\r{line}\033[K" if live else line, end="" if live else "\n",
                      file=sys.stderr, flush=True)
    finally:
        r.stop.set()
        # Bounded: each thread ends after its current op, which its hang timeout bounds.
        for t in threads:
            t.join(args.hang_timeout + 90)
        if live:
            print(file=sys.stderr)
    stuck = [t.name for t in threads if t.is_alive()]
    elapsed = time.monotonic() - r.started
    if not stuck and r.fatal is None:
        r.final_sweep()
    return summarize(r, elapsed, stuck)


def progress(r: Run) -> str:
    s = r.stats
    with s.lock:
        return (f"{time.monotonic() - r.started:6.0f}s  reads {sum(s.reads.values())} "
                f"(fuse {s.reads['fuse']}, kernel {s.reads['kernel']})  "
                f"{sum(s.bytes.values()) / MiB:.0f} MiB verified  "
                f"errors {sum(s.expected.values())} expected, {sum(s.unexpected.values())} "
                f"unexpected  restarts worker {s.restarts['worker']} daemon "
                f"{s.restarts['daemon']}  wrong {s.wrong}  hangs {s.hangs}")


def summarize(r: Run, elapsed: float, stuck: list[str]) -> dict:
    s = r.stats
    with s.lock:
        reads = sum(s.reads.values())
        summary = {
            "seconds": round(elapsed, 1),
            "readers": r.args.readers,
            "objects": len(r.objects),
            "reads": reads,
            "reads_by_door": dict(s.reads),
            "reads_by_op": dict(s.ops),
            "reads_per_s_by_door": {d: round(s.reads[d] / elapsed, 1) for d in DOORS},
            "bytes_verified": sum(s.bytes.values()),
            "bytes_by_door": dict(s.bytes),
            "errors_expected": dict(s.expected),
            "errors_expected_by": dict(sorted(s.expected_by.items())),
            "errors_unexpected": dict(s.unexpected),
            "wrong": s.wrong,
            "hangs": s.hangs + len(stuck),
            "restarts": {"worker": s.restarts["worker"], "daemon": s.restarts["daemon"]},
            "restart_seconds_max": {k: round(max(v), 2) if v else None
                                    for k, v in s.restart_s.items()},
            "faults": dict(s.faults),
            "actions": dict(s.actions),
            "proxy": dict(r.proxy.actions),
            "fatal": r.fatal,
            "failures": s.details + [f"HANG: thread {t} did not end" for t in stuck],
        }
    summary["ok"] = (summary["wrong"] == 0 and not summary["errors_unexpected"]
                     and summary["hangs"] == 0 and r.fatal is None and reads > 0)
    return summary


def report(args: argparse.Namespace, s: dict, workdir: Path) -> None:
    if args.json:
        text = json.dumps(s, indent=2, sort_keys=True)
        if args.json == "-":
            print(text)
            return
        Path(args.json).write_text(text + "\n")
    rate = s["reads_per_s_by_door"]
    lines = [
        f"hsmfs stress: {s['seconds']:.0f} s, {s['readers']} readers, {s['objects']} objects, "
        "both doors over one cache",
        f"  reads verified   {s['reads']} (fuse {s['reads_by_door'].get('fuse', 0)}, "
        f"kernel {s['reads_by_door'].get('kernel', 0)}; {rate['fuse']}/s and "
        f"{rate['kernel']}/s)",
        f"  by op            {s['reads_by_op']}",
        f"  bytes verified   {s['bytes_verified']} ({s['bytes_verified'] / MiB:.0f} MiB)",
        f"  errors expected  {s['errors_expected'] or 0} (while a fault or restart was on)",
        f"  errors unexpected {s['errors_unexpected'] or 0}",
        f"  restarts         worker {s['restarts']['worker']}, daemon "
        f"{s['restarts']['daemon']} (slowest {s['restart_seconds_max']})",
        f"  faults           {s['faults']}",
        f"  actions          {s['actions']}",
        f"  wrong bytes      {s['wrong']} reads",
        f"  hangs            {s['hangs']}",
    ]
    if s["fatal"]:
        lines.append(f"  FATAL            {s['fatal']}")
    lines += [f"  {f}" for f in s["failures"][:20]]
    lines.append("  result           " + ("OK" if s["ok"] else "FAILED"))
    print("\n".join(lines), file=sys.stdout if args.json != "-" else sys.stderr)
