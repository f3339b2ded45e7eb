#!/usr/bin/env python3
"""Where does a cold sequential read's time go?  The floor under the bench's `seq cold` rows
(as root; starts its own Ceph RGW, as the bench does).

An HSM cannot just download: every byte must land in the backing file (a page-cache fill) and
the reader must copy it out again.  This script times, with no door involved, the same 8 MiB
ranged GETs at the bench's concurrency (8), each step adding one part of that data path:

    raw        boto3 get_object, body read in 1 MiB pieces and dropped (the bench's raw S3 row)
    lean       hsmfs's signed GET straight into a reused buffer, dropped
    +land      lean, then pwrite into a new sparse file (what the cache does with a GET)
    +reader    +land, and one reader copying the file out in order, 1 MiB at a time, each
               read waiting for its chunk (what an application behind a door does)
    cache      hsmfs's StubCache itself, no door: the reader's loop asks `ensure` for each
               1 MiB and copies it out; GETs come from the cache's read-ahead, bounded by its
               window, not from a free-running pool
    kernel     the real kernel door (`hsmfs serve`, as the bench starts it): this process
               reads the backing file cold, 1 MiB at a time, and the kernel holds each read
               for the daemon's fanotify answer
    fuse       the real FUSE door (`hsmfs mount`): the same reader through the mount

Each repetition runs every step in turn (side by side on a noisy machine); it reports the
median MB/s and the CPU seconds each party spent on the read: this process (the GET threads
or the reader), the hsmfs daemon (holder and worker, all threads), and the Ceph daemons.  On a
machine whose CPUs are all busy, MB/s follows the total: that is the limit this shows.

    python3 scripts/seq_floor.py [--size 256M] [--repeat 5] [--out results/seq_floor]
    (about a minute per repetition)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import trio

from hsmfs.backend_s3 import ObjectInfo, S3Backend
from hsmfs.bench.ceph import ceph_cluster
from hsmfs.bench.doors import S3Target
from hsmfs.bench.workloads import prefault
from hsmfs.cache import StubCache
from hsmfs.config import CacheConfig, S3Config, parse_size

BUCKET = "seqfloor"
KEY = "big.bin"
CHUNK = 8 << 20
THREADS = 8
READ = 1 << 20
CEPH_DAEMONS = ("radosgw", "ceph-osd", "ceph-mon")


def ceph_cpu_s() -> float:
    """utime + stime of every Ceph daemon on the machine (only ours run here)."""
    ceph = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() in CEPH_DAEMONS:
                ceph.append(int(pid))
    return pid_cpu_s(ceph)


Row = tuple[float, float, float, float]  # MB/s, this process's CPU s, the daemon's, Ceph's


def pid_cpu_s(pids: list[int]) -> float:
    """utime + stime of these processes (all their threads); a vanished one counts 0."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


def hsmfs(*args: str) -> dict:
    """Run the hsmfs command; the JSON it printed, if any."""
    out = subprocess.run([sys.executable, "-m", "hsmfs", *args], capture_output=True,
                         text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"hsmfs {args[0]} failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout) if args[0] == "stats" else {}


def door_read(kind: str, endpoint: str, size: int, work: Path) -> Row:
    """Start a door as the bench does, read the object cold through it in 1 MiB reads, stop
    it; only the read is timed, and only its CPU counted (the daemon: holder and worker)."""
    base = Path(tempfile.mkdtemp(dir=work))
    tree, mnt = base / "tree", base / "mnt"
    tree.mkdir()
    opts = f"endpoint={endpoint},chunk={CHUNK >> 20}M,cover=off"  # the tree is removed after
    if kind == "kernel":
        hsmfs("serve", f"s3://{BUCKET}", str(tree), "-o", opts)
        read_at, stats_at = tree, tree
    else:
        mnt.mkdir()
        hsmfs("mount", f"s3://{BUCKET}", str(mnt), "-o", f"cache={tree},{opts}")
        read_at, stats_at = mnt, mnt
    try:
        worker = int(hsmfs("stats", "--json", str(stats_at))["pid"])
        daemon = [worker]
        holder = int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[1])
        if kind == "kernel":
            daemon.append(holder)  # the worker's parent owns the fanotify group
        subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=True)

        def read_through() -> float:
            cpu0 = pid_cpu_s(daemon)
            fd = os.open(read_at / KEY, os.O_RDONLY)
            buf, total = bytearray(READ), 0
            try:
                while n := os.readv(fd, [buf]):
                    total += n
            finally:
                os.close(fd)
            assert total == size
            return pid_cpu_s(daemon) - cpu0

        return measure(read_through, size)
    finally:
        if kind == "kernel":
            hsmfs("stop", str(tree))
        else:
            subprocess.run(["umount", str(mnt)], timeout=60, check=False)
        shutil.rmtree(base, ignore_errors=True)


def chunks(size: int) -> list[int]:
    return list(range(0, size, CHUNK))


def raw(client: object, size: int, _work: Path) -> None:
    def one(off: int) -> int:
        rng = f"bytes={off}-{min(off + CHUNK, size) - 1}"
        body = client.get_object(Bucket=BUCKET, Key=KEY, Range=rng)["Body"]  # type: ignore[attr-defined]
        got = 0
        while piece := body.read(READ):
            got += len(piece)
        return got

    with ThreadPoolExecutor(THREADS) as pool:
        assert sum(pool.map(one, chunks(size))) == size


def lean(backend: S3Backend, size: int, work: Path, land: bool = False,
         reader: bool = False) -> None:
    version = next(v for v in backend.list() if v.key == KEY)
    local = threading.local()
    path = work / "landed"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, size)  # a sparse stub, as the cache makes them
    landed = {off: threading.Event() for off in chunks(size)}

    def one(off: int) -> int:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = bytearray(CHUNK)
        view = memoryview(buf)[:min(CHUNK, size - off)]
        n = backend.fetch_into(version, off, view)
        if land:
            done = 0
            while done < n:
                done += os.pwrite(fd, view[done:n], off + done)
        landed[off].set()
        return n

    def read_in_order() -> int:
        rfd = os.open(path, os.O_RDONLY)
        buf = bytearray(READ)
        total = 0
        try:
            for off in range(0, size, READ):
                if not landed[off - off % CHUNK].wait(60):
                    raise TimeoutError(f"chunk at {off} never landed")
                total += os.preadv(rfd, [buf], off)
        finally:
            os.close(rfd)
        return total

    try:
        with ThreadPoolExecutor(THREADS + 1) as pool:
            consumer = pool.submit(read_in_order) if reader else None
            assert sum(pool.map(one, chunks(size))) == size
            if consumer is not None:
                assert consumer.result() == size
    finally:
        os.close(fd)
        path.unlink()


def cache_read(backend: S3Backend, size: int, work: Path) -> None:
    info = ObjectInfo(next(v for v in backend.list() if v.key == KEY))
    tree = Path(tempfile.mkdtemp(dir=work))
    # The bench's settings: 8 MiB chunks (its --chunk), the default window and concurrency.
    cache = StubCache(CacheConfig(cache_dir=str(tree), chunk_size=CHUNK, head_for_mode=False),
                      backend)

    async def read_all() -> int:
        await cache.populate([info])
        stub = cache.stub_at(KEY)
        assert stub is not None
        buf, total = bytearray(READ), 0
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            fd = os.open(tree / KEY, os.O_RDONLY)
            try:
                for off in range(0, size, READ):
                    (await cache.ensure(stub, off, min(off + READ, size))).release()
                    total += os.preadv(fd, [buf], off)
            finally:
                os.close(fd)
            nursery.cancel_scope.cancel()
        return total

    try:
        assert trio.run(read_all) == size
    finally:
        cache.close()
        shutil.rmtree(tree, ignore_errors=True)


def measure(fn: Callable[[], float | None], size: int) -> Row:
    """Time one step; ``fn`` returns the daemon's CPU seconds when a door ran."""
    prefault(2 << 30)  # as the bench does: new guest memory is slow on first touch here
    ceph0, t0 = ceph_cpu_s(), os.times()
    start = time.perf_counter()
    daemon_cpu = fn() or 0.0
    seconds = time.perf_counter() - start
    t1 = os.times()
    own = t1.user + t1.system - t0.user - t0.system
    return size / seconds / 1e6, own, daemon_cpu, ceph_cpu_s() - ceph0


def log(message: str) -> None:
    print(message, file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="256M")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", help="also write seq_floor.md and seq_floor.png here")
    args = ap.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="hsmfs-seqfloor-") as tmp:
        work = Path(tmp)
        with ceph_cluster(work / "ceph", log) as ep:
            os.environ.update(AWS_ACCESS_KEY_ID=ep.access_key,
                              AWS_SECRET_ACCESS_KEY=ep.secret_key)
            client = S3Target(ep.url, BUCKET, "", ep.access_key, ep.secret_key).client(
                pool=THREADS + 2)
            client.create_bucket(Bucket=BUCKET)
            client.put_object(Bucket=BUCKET, Key=KEY, Body=os.urandom(size))
            backend = S3Backend(S3Config(bucket=BUCKET, endpoint_url=ep.url,
                                         region="us-east-1", max_connections=THREADS + 2))
            steps: dict[str, Callable[[], Row]] = {
                "raw": lambda: measure(lambda: raw(client, size, work), size),
                "lean": lambda: measure(lambda: lean(backend, size, work), size),
                "+land": lambda: measure(lambda: lean(backend, size, work, land=True), size),
                "+reader": lambda: measure(
                    lambda: lean(backend, size, work, land=True, reader=True), size),
                "cache": lambda: measure(lambda: cache_read(backend, size, work), size),
                "kernel": lambda: door_read("kernel", ep.url, size, work),
                "fuse": lambda: door_read("fuse", ep.url, size, work),
            }
            results: dict[str, list[Row]] = {k: [] for k in steps}
            for rep in range(args.repeat):
                for name, fn in steps.items():
                    results[name].append(fn())
                    log(f"rep {rep + 1}/{args.repeat} {name:8} {results[name][-1][0]:7.1f} MB/s")
    medians = {name: tuple(statistics.median(col) for col in zip(*rows, strict=True))
               for name, rows in results.items()}
    table = report(medians, size, args.repeat)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "seq_floor.md").write_text(table)
        plot(medians, out / "seq_floor.png")
        log(f"wrote {out / 'seq_floor.md'} and {out / 'seq_floor.png'}")
    return 0


def report(medians: dict[str, tuple[float, ...]], size: int, repeat: int) -> str:
    lines = [f"{size / 2**20:.0f} MiB, {CHUNK >> 20} MiB GETs x {THREADS}, median of {repeat} "
             f"(Ceph RGW memstore on loopback, {os.cpu_count()} CPUs, Linux "
             f"{os.uname().release})", "",
             "| step | MB/s | x raw | this process CPU s | daemon CPU s | Ceph CPU s | "
             "CPU s total | CPUs busy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = medians["raw"][0]
    for name, (mbps, own, daemon, ceph) in medians.items():
        total = own + daemon + ceph
        busy = total / (size / mbps / 1e6)  # CPU seconds per second of the read
        lines.append(f"| {name} | {mbps:.0f} | {mbps / base:.2f} | {own:.3f} | {daemon:.3f} | "
                     f"{ceph:.3f} | {total:.3f} | {busy:.2f} |")
    return "\n".join(lines) + "\n"


def plot(medians: dict[str, tuple[float, ...]], path: Path) -> None:
    """CPU seconds per party, stacked, per step; MB/s written above each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(medians)
    parts = (("this process (GETs or reader)", 1, "#4c72b0"), ("hsmfs daemon", 2, "#dd8452"),
             ("Ceph", 3, "#8c8c8c"))
    fig, ax = plt.subplots(figsize=(8, 4.2))
    bottom = [0.0] * len(names)
    for label, col, color in parts:
        values = [medians[n][col] for n in names]
        ax.bar(names, values, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for i, name in enumerate(names):
        ax.annotate(f"{medians[name][0]:.0f} MB/s", (i, bottom[i]), ha="center",
                    va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_ylabel("CPU seconds for the read")
    ax.set_title("Cold sequential read: CPU per party and throughput, step by step")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_ylim(0, max(bottom) * 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
