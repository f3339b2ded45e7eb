"""The benchmark's workloads: what is read, how, and what is measured.

Owns: the workload registry (`WORKLOADS`), one function per workload that takes a door's root path
and returns a `Sample` (bytes, seconds, per-operation latencies, time to first byte), the seeded
random offsets the raw-S3 reference replays, and the child-process runner.

Every measurement runs in a fresh child process (`python3 -m hsmfs.bench.workloads`): a read that
hangs on a broken door can then be killed (fanotify and FUSE waits are killable), the reader has
the GIL to itself, and nothing the benchmark process has cached leaks into the reader. Programs
that do not know about hsmfs (`grep -r`, `python3 -m compileall`, exec of a binary) run as
subprocesses of that child, because an unaware program is the point of those workloads.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MiB = 1 << 20
PAGE = mmap.PAGESIZE
SEQ_BLOCK = MiB  # the read size of `dd bs=1M`, and the largest FUSE request (max_pages 256)
GREP_PATTERN = "import"
WARM_THREADS = 8  # parallel readers for warm-ups (not measured)
# A single exec or grep must never take this long; it bounds each unaware program we start.
PROGRAM_TIMEOUT_S = 300.0

Params = dict[str, Any]
MANY_READERS = (1, 4, 16)  # the many-readers workloads: manyN (N files), sameN (one file)


class WorkloadError(RuntimeError):
    """The workload failed or timed out; the message is what the report shows."""


@dataclass
class Sample:
    """One measured run of one workload."""

    bytes: int
    seconds: float
    lat_ms: list[float] = field(default_factory=list)
    ttfb_ms: float | None = None
    fixed_ms: float | None = None  # archive: the command's fixed cost (a no-op archive)

    @property
    def mbps(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    group: str  # the dataset group it reads: what to warm and check for residency
    run: Callable[[Path, Params], Sample]
    latency_only: bool = False  # throughput is meaningless (exec): compare latencies
    # Lifecycle workloads (write, archive, create) change the tree: they run once per
    # repetition on a fresh door (its first cache state) and only on the doors named here.
    writes: bool = False
    doors: tuple[str, ...] | None = None  # None: every door
    per_file: bool = False  # report files/s (create)


def random_offsets(seed: int, file_size: int, size: int, ops: int) -> list[int]:
    """`ops` offsets aligned to `size`, uniform over the file; the S3 reference replays them."""
    rng = random.Random(f"hsmfs-bench-offsets:{seed}:{size}")
    slots = max(1, file_size // size)
    return [rng.randrange(slots) * size for _ in range(ops)]


def _ms(seconds: float) -> float:
    return seconds * 1000.0


def seq_read(root: Path, p: Params) -> Sample:
    """Read the big object front to back in 1 MiB reads, like `dd bs=1M`."""
    buf = bytearray(SEQ_BLOCK)
    lats: list[float] = []
    total, ttfb = 0, None
    t0 = time.perf_counter()
    fd = os.open(root / p["path"], os.O_RDONLY)
    try:
        while True:
            t = time.perf_counter()
            n = os.readv(fd, [buf])
            now = time.perf_counter()
            if n == 0:
                break
            lats.append(_ms(now - t))
            ttfb = _ms(now - t0) if ttfb is None else ttfb
            total += n
    finally:
        os.close(fd)
    return Sample(total, time.perf_counter() - t0, lats, ttfb)


def rand_read(root: Path, p: Params) -> Sample:
    """`ops` preads of `size` bytes at seeded random aligned offsets, one at a time."""
    offsets = random_offsets(p["seed"], p["file_size"], p["size"], p["ops"])
    lats: list[float] = []
    ttfb = None
    t0 = time.perf_counter()
    fd = os.open(root / p["path"], os.O_RDONLY)
    try:
        for off in offsets:
            t = time.perf_counter()
            got = len(os.pread(fd, p["size"], off))
            now = time.perf_counter()
            if got != p["size"]:
                raise WorkloadError(f"short read: {got} of {p['size']} bytes at {off}")
            lats.append(_ms(now - t))
            ttfb = _ms(now - t0) if ttfb is None else ttfb
    finally:
        os.close(fd)
    return Sample(p["size"] * len(offsets), time.perf_counter() - t0, lats, ttfb)


def mmap_read(root: Path, p: Params) -> Sample:
    """Map the big object and copy out `ops` random pages (each a page fault when cold)."""
    offsets = random_offsets(p["seed"], p["file_size"], PAGE, p["ops"])
    lats: list[float] = []
    ttfb = None
    t0 = time.perf_counter()
    fd = os.open(root / p["path"], os.O_RDONLY)
    try:
        # The kernel door sees one pre-content event for the whole range here, at mmap() time.
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as mm:
            for off in offsets:
                t = time.perf_counter()
                page = mm[off:off + PAGE]
                now = time.perf_counter()
                if len(page) != PAGE:
                    raise WorkloadError(f"short page at {off}")
                lats.append(_ms(now - t))
                ttfb = _ms(now - t0) if ttfb is None else ttfb
    finally:
        os.close(fd)
    return Sample(PAGE * len(offsets), time.perf_counter() - t0, lats, ttfb)


def _read_whole(path: Path, buf: bytearray) -> int:
    total = 0
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total


def _walk_files(top: Path) -> Iterator[Path]:
    """Files under `top` in a fixed order (like tar), found as the walk goes, not all first."""
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def tree_read(root: Path, p: Params) -> Sample:
    """Walk the small-file tree and read every file fully; latency per file (open..close)."""
    buf = bytearray(SEQ_BLOCK)
    lats: list[float] = []
    total, ttfb = 0, None
    t0 = time.perf_counter()
    for path in _walk_files(root / p["dir"]):
        t = time.perf_counter()
        total += _read_whole(path, buf)
        now = time.perf_counter()
        lats.append(_ms(now - t))
        ttfb = _ms(now - t0) if ttfb is None else ttfb
    return Sample(total, time.perf_counter() - t0, lats, ttfb)


def many_readers(root: Path, p: Params) -> Sample:
    """`len(paths)` threads start together (a barrier), each reading its file fully in 1 MiB
    reads; the paths are different files or one file repeated. Latency per reader (open to
    its last byte), ttfb the first byte any reader got; throughput is the aggregate."""
    paths = [root / rel for rel in p["paths"]]
    start = threading.Barrier(len(paths))
    lats: list[float] = [0.0] * len(paths)
    firsts: list[float] = []
    t0 = 0.0

    def read(i: int) -> int:
        buf = bytearray(SEQ_BLOCK)
        start.wait()
        t = time.perf_counter()
        total = 0
        with paths[i].open("rb", buffering=0) as f:
            while n := f.readinto(buf):
                if total == 0:
                    firsts.append(time.perf_counter())
                total += n
        lats[i] = _ms(time.perf_counter() - t)
        return total

    with ThreadPoolExecutor(len(paths), thread_name_prefix="reader") as pool:
        t0 = time.perf_counter()
        total = sum(pool.map(read, range(len(paths))))
    seconds = time.perf_counter() - t0
    return Sample(total, seconds, lats, _ms(min(firsts) - t0) if firsts else None)


def _program(argv: list[str], ok: tuple[int, ...] = (0,)) -> None:
    proc = subprocess.run(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        timeout=PROGRAM_TIMEOUT_S, check=False,
    )
    if proc.returncode not in ok:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise WorkloadError(f"{Path(argv[0]).name} exited {proc.returncode}: {' | '.join(tail)}")


def exec_binary(root: Path, p: Params) -> Sample:
    """Execute the small binary `runs` times; the first run is the one that may fetch."""
    path = root / p["path"]
    lats: list[float] = []
    t0 = time.perf_counter()
    for _ in range(p["runs"]):
        t = time.perf_counter()
        _program([str(path)])
        lats.append(_ms(time.perf_counter() - t))
    return Sample(p["bytes"], time.perf_counter() - t0, lats, lats[0] if lats else None)


def grep_tree(root: Path, p: Params) -> Sample:
    """`grep -r -c` over the source tree: reads every file fully (-c never stops early)."""
    t0 = time.perf_counter()
    _program(["grep", "-r", "-c", "-e", GREP_PATTERN, str(root / p["dir"])], ok=(0, 1))
    seconds = time.perf_counter() - t0
    return Sample(p["bytes"], seconds, [_ms(seconds)])


def compile_tree(root: Path, p: Params) -> Sample:
    """`python3 -m compileall -f` over the source tree, with .pyc files written elsewhere.

    pycache_prefix keeps the tree read-only: the doors are measured as readers, and each run
    compiles everything again (-f) instead of finding last run's .pyc.
    """
    with tempfile.TemporaryDirectory(prefix="hsmfs-bench-pyc-") as pyc:
        argv = [sys.executable, "-X", f"pycache_prefix={pyc}", "-m", "compileall", "-q", "-f",
                str(root / p["dir"])]
        t0 = time.perf_counter()
        _program(argv)
        seconds = time.perf_counter() - t0
    return Sample(p["bytes"], seconds, [_ms(seconds)])


# ---- lifecycle: writes into the tree ----------------------------------------------------------

LIFECYCLE = "lifecycle"  # where lifecycle workloads write, relative to a door's root


def _block(seed: int, size: int = SEQ_BLOCK) -> bytearray:
    """A seeded random block; callers stamp a counter into its first 8 bytes, so no two
    written blocks are equal and every door and raw S3 get the same bytes."""
    return bytearray(random.Random(f"hsmfs-bench-write:{seed}").randbytes(size))


def _write_fd(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def seq_write(root: Path, p: Params) -> Sample:
    """Write a new file of `size` bytes front to back in 1 MiB writes, then fsync (open..close
    timed). A latency per write; the last one is the fsync. ttfb: open to the first write done
    (for `overwrite` through a door, the time to make the file local)."""
    path = root / p["path"]
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = _block(p["seed"])
    lats: list[float] = []
    total, ttfb = 0, None
    flags = os.O_WRONLY if p.get("overwrite") else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    t0 = time.perf_counter()
    fd = os.open(path, flags, 0o644)
    try:
        while total < p["size"]:
            n = min(SEQ_BLOCK, p["size"] - total)
            buf[:8] = (total // SEQ_BLOCK).to_bytes(8, "little")
            t = time.perf_counter()
            _write_fd(fd, memoryview(buf)[:n])
            now = time.perf_counter()
            lats.append(_ms(now - t))
            ttfb = _ms(now - t0) if ttfb is None else ttfb
            total += n
        t = time.perf_counter()
        os.fsync(fd)
        lats.append(_ms(time.perf_counter() - t))
    finally:
        os.close(fd)
    return Sample(total, time.perf_counter() - t0, lats, ttfb)


def write_file(root: Path, p: Params) -> Sample:
    """Not a workload: write the file `seq_write` writes (the archive workload's dirty file,
    and raw S3's local copy of the same bytes); not measured."""
    return seq_write(root, p)


def create_files(root: Path, p: Params) -> Sample:
    """Create and write `len(sizes)` new small files in `dirs` directories, like `tar -x`:
    mkdir, then per file open(O_CREAT|O_EXCL), write, close; no fsync. Latency per file."""
    top = root / p["dir"]
    sizes: list[int] = p["sizes"]
    buf = _block(p.get("seed", 1), max(sizes, default=0))
    view = memoryview(buf)
    lats: list[float] = []
    total = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    t0 = time.perf_counter()
    for d in range(p["dirs"]):
        (top / f"d{d:02d}").mkdir(parents=True)
    for i, size in enumerate(sizes):
        path = top / f"d{i % p['dirs']:02d}" / f"f{i:04d}.bin"
        buf[:8] = i.to_bytes(8, "little")
        t = time.perf_counter()
        fd = os.open(path, flags, 0o644)
        try:
            _write_fd(fd, view[:size])
        finally:
            os.close(fd)
        lats.append(_ms(time.perf_counter() - t))
        total += size
    return Sample(total, time.perf_counter() - t0, lats)


def no_child(root: Path, p: Params) -> Sample:
    raise WorkloadError("this workload is measured by the door itself (doors.py), not a child")


def read_all(root: Path, p: Params) -> Sample:
    """Not a workload: read the given files/dirs fully once (warm-up, page-cache re-warm).

    Several files at a time: with injected S3 latency a serial warm-up of 2,000 small files
    takes minutes, and nothing here is measured.
    """
    files: list[Path] = []
    for rel in p["paths"]:
        target = root / rel
        files.extend(_walk_files(target) if target.is_dir() else [target])
    t0 = time.perf_counter()
    with ThreadPoolExecutor(WARM_THREADS, thread_name_prefix="warm") as pool:
        total = sum(pool.map(lambda path: _read_whole(path, bytearray(SEQ_BLOCK)), files))
    return Sample(total, time.perf_counter() - t0)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("seq", "sequential read of the big object, 1 MiB reads", "big", seq_read),
        Workload("rand4k", "random 4 KiB preads of the big object", "big", rand_read),
        Workload("rand64k", "random 64 KiB preads of the big object", "big", rand_read),
        Workload("mmap", "mmap the big object, copy out random pages", "big", mmap_read),
        Workload("tree", "read every file of the small-file tree", "tree", tree_read),
        Workload("exec", "exec a small ELF binary repeatedly", "bin", exec_binary,
                 latency_only=True),
        Workload("grep", "grep -r over the source tree", "src", grep_tree),
        Workload("compile", "python3 -m compileall over the source tree", "src", compile_tree),
        *(Workload(f"many{n}", f"{n} concurrent readers of {n} different files", "many",
                   many_readers) for n in MANY_READERS),
        *(Workload(f"same{n}", f"{n} concurrent readers of one file", "many", many_readers)
          for n in MANY_READERS if n > 1),
        Workload("write", "sequential write of a new big file, 1 MiB writes, then fsync", "big",
                 seq_write, writes=True, doors=("native", "kernel", "fuse")),
        Workload("overwrite", "overwrite the existing big object in place, 1 MiB writes, then "
                 "fsync (through a door: the whole file is made local first)", "big",
                 seq_write, writes=True, doors=("native", "kernel", "fuse")),
        Workload("archive", "`hsmfs archive` of a dirty big file (raw S3: boto3 upload_file)",
                 "big", no_child, writes=True, doors=("kernel", "fuse", "s3")),
        Workload("create", "create and write the small-file tree's files anew", "tree",
                 create_files, writes=True, doors=("native", "kernel", "fuse"), per_file=True),
    )
}
_HELPERS: dict[str, Callable[[Path, Params], Sample]] = {
    "_readall": read_all, "_writefile": write_file}


def prefault(nbytes: int) -> None:
    """Touch and free `nbytes` of anonymous memory before measuring.

    On VMs whose host backs guest memory lazily, the first touch of new memory is slow, and
    filling a new page cache hits it (measured on our VMs: memset of 1 GiB of new memory took
    0.4-1.4 s, 0.03 s once touched); pre-touching evens that out.
    """
    if nbytes <= 0:
        return
    with mmap.mmap(-1, nbytes) as m:
        view = ctypes.c_char.from_buffer(m)
        ctypes.memset(ctypes.addressof(view), 1, nbytes)
        del view  # the buffer export must be gone before the mapping can close


# ---- the child side -------------------------------------------------------------------------


def _child(request: dict[str, Any]) -> dict[str, Any]:
    name = request["workload"]
    fn = _HELPERS.get(name) or WORKLOADS[name].run
    prefault(int(request.get("prefault_bytes", 0)))
    return asdict(fn(Path(request["root"]), request["params"]))


def main(argv: list[str]) -> int:
    """Child entry: argv[0] is a JSON request; print one JSON line (a Sample or an error)."""
    try:
        out = _child(json.loads(argv[0]))
        code = 0
    except Exception as exc:  # report every failure to the parent, which shows it in the table
        out = {"error": f"{type(exc).__name__}: {exc}"}
        code = 1
    sys.stdout.write(json.dumps(out) + "\n")
    return code


# ---- the parent side ------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """Environment for child Pythons: finds this package even when it is not installed."""
    pkg_parent = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=pkg_parent + (os.pathsep + path if path else ""))


def run_child(name: str, root: Path, params: Params, timeout: float,
              prefault_bytes: int = 0) -> Sample:
    """Run one workload (or '_readall') in a fresh child process, killed after `timeout`."""
    request = {"workload": name, "root": str(root), "params": params,
               "prefault_bytes": prefault_bytes}
    argv = [sys.executable, "-m", "hsmfs.bench.workloads", json.dumps(request)]
    # A new session makes the child a process-group leader: on timeout we kill its group
    # (grep, compileall, ...) by the child's PID, and nothing else.
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=child_env(), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        _kill_group(proc)
        raise WorkloadError(f"timed out after {timeout:.0f} s") from exc
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    return _parse_child_output(out, err, proc.returncode)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    # A child stuck in an uninterruptible wait dies when the door goes away; do not wait forever.
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=10)


def _parse_child_output(out: bytes, err: bytes, returncode: int) -> Sample:
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        data = json.loads(lines[-1])
    except (IndexError, ValueError) as exc:
        # e.g. SIGBUS: an mmap'd page the door could not fill
        how = (f"killed by {signal.Signals(-returncode).name}" if returncode < 0
               else f"exited {returncode}")
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        raise WorkloadError(f"reader {how}: {' | '.join(tail) or 'no output'}") from exc
    if "error" in data:
        raise WorkloadError(data["error"])
    return Sample(**data)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
