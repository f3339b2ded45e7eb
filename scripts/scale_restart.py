#!/usr/bin/env python3
"""Restart at scale (issue 12, item 5): 100,000 stubs in a few thousand directories.

For both layouts of the kernel door's backing tree:

* ``root``: the cache is a directory on ``/`` (ext4): one inode mark per stub;
* ``loop``: the cache is the root of its own filesystem (a loop-mounted ext4 image): one
  filesystem mark;

it measures, with the real daemon (``hsmfs serve -f``): the first populate (empty cache →
ready), the restart over the existing tree (SIGTERM, start again → ready), the holder's and the
worker's RSS (VmRSS / VmHWM at ready and after a read workload), and the events that files made
resident raise when they are read again (goal: 0), also after a restart.  Optionally the FUSE
door's mount (``hsmfs mount -f``) of the same bucket, first and again.

S3 is a Ceph RGW (bluestore on a sparse file, so the seeded bucket survives between runs:
``--keep-s3`` leaves its data under ``--state``), or any server given with ``--endpoint``.
Timings on a shared 2-core machine are noisy: each is the median of ``--runs``.

As root, from the source tree:

    python3 scripts/scale_restart.py --objects 100000 --runs 3 [--py-spy]

Writes ``results/scale/scale-N.json``, ``scale-N.md`` and ``scale-N.png``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hsmfs import cover  # noqa: E402 - after the path is set: runs from a source tree
from hsmfs.bench import ceph  # noqa: E402

RESULTS = REPO / "results" / "scale"
READY = b": ready: "  # the daemon's own line; the holder's "never ready: giving up" is not it
ENV = dict(os.environ, AWS_ACCESS_KEY_ID=ceph.ACCESS_KEY,
           AWS_SECRET_ACCESS_KEY=ceph.SECRET_KEY, AWS_DEFAULT_REGION="us-east-1")
# Sparse: the bluestore file and the loop image take only what is written.
CEPH_BYTES = 32 << 30
LOOP_IMAGE_BYTES = 8 << 30
START_TIMEOUT_S = 1800.0
STOP_TIMEOUT_S = 120.0


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- S3 --------------------------------------------------------------------------------------


@dataclass
class Ceph:
    """A bluestore RGW cluster whose data lives in ``path`` across runs of this script."""

    path: Path
    url: str = ""

    def _conf(self) -> Path:
        return self.path / "ceph.conf"

    def up(self) -> str:
        ceph.ensure_installed(say)
        if self._conf().exists():
            # Restart the daemons of the kept cluster: the seeded bucket is still in it.
            conf = str(self._conf())
            with ceph.adopting_orphans():
                for cmd in (["ceph-mon", "-c", conf, "-i", "a"],
                            ["ceph-osd", "-c", conf, "-i", "0"],
                            ["radosgw", "-c", conf, "-n", "client.rgw.a"]):
                    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL,
                                   capture_output=True, timeout=120)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            env = dict(os.environ, OBJECTSTORE="bluestore", MEM_BYTES=str(CEPH_BYTES),
                       RGW_PORT=str(ceph.free_port()), MON_PORT=str(ceph.free_port()))
            log_path = self.path.with_name(self.path.name + ".up.log")
            with log_path.open("w") as out, ceph.adopting_orphans():
                proc = subprocess.run(["bash", str(REPO / "hsmfs/bench/ceph_up.sh"),
                                       str(self.path)], env=env, stdin=subprocess.DEVNULL,
                                      stdout=out, stderr=subprocess.STDOUT, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"ceph_up.sh failed: {log_path.read_text()[-2000:]}")
        port = re.search(r"beast endpoint=127\.0\.0\.1:(\d+)", self._conf().read_text())
        assert port is not None, "no RGW port in ceph.conf"
        self.url = f"http://127.0.0.1:{port.group(1)}"
        ceph.wait_http_ok(self.url + "/", 120)
        say(f"ceph RGW (bluestore, {self.path}) at {self.url}")
        return self.url

    def down(self, remove: bool) -> None:
        """Stop by the PIDs in its run directory (TERM keeps bluestore consistent)."""
        if not self.path.exists():
            return
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run(["bash", str(REPO / "hsmfs/bench/ceph_down.sh"), str(self.path)],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=90)
        ceph.kill_leftovers(self.path, say)
        if remove:
            shutil.rmtree(self.path, ignore_errors=True)


def s3_client(url: str, pool: int = 64) -> Any:
    return boto3.client(
        "s3", endpoint_url=url, region_name="us-east-1",
        aws_access_key_id=ceph.ACCESS_KEY, aws_secret_access_key=ceph.SECRET_KEY,
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=pool,
                      request_checksum_calculation="when_required",
                      response_checksum_validation="when_required",
                      retries={"max_attempts": 8, "mode": "standard"}))


def layout_keys(n: int, dirs: int) -> list[str]:
    """``n`` keys in ``dirs`` leaf directories, two levels deep (``tNN/sNNN/fNNNNNN.bin``), so
    populate makes a few thousand directories, as a real tree has."""
    top = max(1, round(dirs ** 0.5))
    keys = []
    for i in range(n):
        d = i % dirs
        keys.append(f"t{d % top:02d}/s{d // top:03d}/f{i:06d}.bin")
    return keys


def object_size(i: int) -> int:
    return random.Random(i).randint(1 << 10, 64 << 10)  # 1-64 KiB: stubs are sparse anyway


def count_objects(client: Any, bucket: str) -> tuple[int, float]:
    """Objects in the bucket and how long a bare paginated listing took (the floor under
    hsmfs's own listing)."""
    t = time.monotonic()
    n = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        n += page.get("KeyCount", 0)
    return n, time.monotonic() - t


def seed(url: str, bucket: str, n: int, dirs: int, threads: int) -> dict[str, Any]:
    """Make (or find) a bucket of ``n`` objects: many concurrent PUTs from threads."""
    client = s3_client(url, pool=threads + 4)
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    have, list_s = count_objects(client, bucket)
    if have == n:
        say(f"bucket {bucket}: {n} objects already seeded (bare listing {list_s:.1f} s)")
        return {"seeded_now": False, "bare_list_s": round(list_s, 2)}
    keys = layout_keys(n, dirs)
    done = 0
    lock = threading.Lock()
    t0 = time.monotonic()

    def put(i: int) -> None:
        nonlocal done
        size = object_size(i)
        body = (keys[i].encode() + b"\n") * (size // (len(keys[i]) + 1) + 1)
        client.put_object(Bucket=bucket, Key=keys[i], Body=body[:size])
        with lock:
            done += 1

    stop = threading.Event()

    def progress() -> None:
        while not stop.wait(5):
            rate = done / max(time.monotonic() - t0, 1e-9)
            say(f"seeding {bucket}: {done}/{n} PUTs, {rate:.0f}/s, "
                f"~{(n - done) / max(rate, 1):.0f} s left")

    reporter = threading.Thread(target=progress, daemon=True)
    reporter.start()
    try:
        with ThreadPoolExecutor(threads) as pool:
            for f in [pool.submit(put, i) for i in range(n)]:
                f.result()
    finally:
        stop.set()
    seconds = time.monotonic() - t0
    have, list_s = count_objects(client, bucket)
    assert have == n, f"seeded {have} objects, expected {n}"
    say(f"seeded {n} objects in {seconds:.0f} s ({n / seconds:.0f} PUT/s, {threads} threads); "
        f"bare listing {list_s:.1f} s")
    return {"seeded_now": True, "seed_s": round(seconds, 1), "put_per_s": round(n / seconds),
            "bare_list_s": round(list_s, 2)}


# -- layouts ---------------------------------------------------------------------------------


@dataclass
class Layout:
    """Where the cache lives; ``reset()`` empties it for a first populate."""

    name: str
    cache: Path
    state: Path
    loop_dev: str | None = None
    image: Path | None = None

    def reset(self) -> None:
        uncover_all(self.cache)
        if self.name == "loop":
            self.unmount()
            self.mount_fresh()
        else:
            shutil.rmtree(self.cache, ignore_errors=True)
            self.cache.mkdir(parents=True)

    def mount_fresh(self) -> None:
        assert self.image is not None
        self.image.unlink(missing_ok=True)
        with self.image.open("wb") as f:
            f.truncate(LOOP_IMAGE_BYTES)
        # One inode per 16 KiB: 500k inodes for 8 GiB, room for 100k stubs and their dirs.
        subprocess.run(["mkfs.ext4", "-q", "-F", "-i", "16384", str(self.image)], check=True)
        self.loop_dev = subprocess.run(["losetup", "--find", "--show", str(self.image)],
                                       check=True, capture_output=True,
                                       text=True).stdout.strip()
        self.cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", self.loop_dev, str(self.cache)], check=True)

    def unmount(self) -> None:
        """Covers first (a stop leaves one over the cache), then the image, then the loop."""
        if self.name != "loop":
            uncover_all(self.cache)
            return
        uncover_all(self.cache)
        for _ in range(5):
            if not is_mountpoint(self.cache):
                break
            subprocess.run(["umount", str(self.cache)], capture_output=True)
            if is_mountpoint(self.cache):
                time.sleep(0.5)
        if is_mountpoint(self.cache):
            subprocess.run(["umount", "-l", str(self.cache)], capture_output=True)
        if self.loop_dev:
            subprocess.run(["losetup", "-d", self.loop_dev], capture_output=True)
            self.loop_dev = None


def is_mountpoint(path: Path) -> bool:
    return subprocess.run(["mountpoint", "-q", str(path)]).returncode == 0


def uncover_all(path: Path) -> None:
    """Lift hsmfs's covers (a stopped kernel door leaves one over the tree) until none is left;
    ``cover.uncover`` removes only mounts it recognises as its own."""
    if not path.exists():
        return
    for _ in range(10):
        try:
            if not cover.uncover(path):
                return
        except OSError:
            return


# -- the daemon ------------------------------------------------------------------------------


def vm(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in KiB (0 if the process is gone)."""
    out = {"rss_kb": 0, "hwm_kb": 0}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_kb"] = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                out["hwm_kb"] = int(line.split()[1])
    return out


def log_time(line: str) -> float | None:
    """Seconds since the epoch of a log line (``2026-12-06 16:13:59,123 PID LEVEL ...``)."""
    m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ", line)
    if m is None:
        return None
    return time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1e3


@dataclass
class Daemon:
    """One ``hsmfs serve -f`` / ``hsmfs mount -f``, started and stopped by PID."""

    cmd: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None
    worker: int | None = None
    started: float = 0.0
    profiler: subprocess.Popen | None = None
    extra: list[int] = field(default_factory=list)

    def start(self, what: str, py_spy: Path | None = None) -> float:
        """Start and wait for ``: ready: ``; the seconds it took (progress every 10 s)."""
        self.log_path.unlink(missing_ok=True)
        log = self.log_path.open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "hsmfs", *self.cmd], stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     env=ENV, cwd=REPO)
        log.close()
        next_note = self.started + 10
        while True:
            text = self.log_path.read_bytes()
            if self.worker is None:
                m = re.search(rb"worker pid (\d+) started", text)
                if m:
                    self.worker = int(m.group(1))
                    if py_spy is not None:
                        self.profiler = subprocess.Popen(
                            ["py-spy", "record", "--pid", str(self.worker), "--format", "raw",
                             "--rate", "50", "--nonblocking", "-o", str(py_spy)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if READY in text:
                seconds = time.monotonic() - self.started
                self.stop_profiler()
                return seconds
            if self.proc.poll() is not None:
                raise RuntimeError(f"{what}: hsmfs exited with {self.proc.returncode}:\n"
                                   + text.decode(errors="replace")[-3000:])
            now = time.monotonic()
            if now > self.started + START_TIMEOUT_S:
                raise TimeoutError(f"{what}: not ready after {START_TIMEOUT_S:.0f} s")
            if now >= next_note:
                lines = text.decode(errors="replace").strip().splitlines()
                w = vm(self.worker) if self.worker else {"rss_kb": 0}
                say(f"  waiting for {what}: {now - self.started:.0f} s, worker RSS "
                    f"{w['rss_kb'] // 1024} MiB; last log: {lines[-1][-110:] if lines else ''}")
                next_note = now + 10
            time.sleep(0.05)

    def stop_profiler(self) -> None:
        if self.profiler is not None:
            with contextlib.suppress(ProcessLookupError):
                self.profiler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            try:
                self.profiler.wait(60)
            except subprocess.TimeoutExpired:
                self.profiler.kill()
                self.profiler.wait()
            self.profiler = None

    def memory(self) -> dict[str, int]:
        assert self.proc is not None
        h, w = vm(self.proc.pid), vm(self.worker) if self.worker else {"rss_kb": 0, "hwm_kb": 0}
        return {"holder_rss_kb": h["rss_kb"], "holder_hwm_kb": h["hwm_kb"],
                "worker_rss_kb": w["rss_kb"], "worker_hwm_kb": w["hwm_kb"],
                "total_rss_mb": round((h["rss_kb"] + w["rss_kb"]) / 1024, 1),
                "total_hwm_mb": round((h["hwm_kb"] + w["hwm_kb"]) / 1024, 1)}

    def stop(self) -> float:
        """SIGTERM to the holder (it stops its worker); seconds until it exited.  SIGKILL of
        both PIDs if it does not."""
        self.stop_profiler()
        if self.proc is None:
            return 0.0
        t = time.monotonic()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                say(f"hsmfs pid {self.proc.pid} did not stop: SIGKILL")
        seconds = time.monotonic() - t
        for pid in [self.proc.pid, *([self.worker] if self.worker else []), *self.extra]:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self.proc = None
        self.worker = None
        return seconds

    def phases(self) -> dict[str, float]:
        """Start → 'listing' → 'populated' → 'serving' from the log's own timestamps."""
        out: dict[str, float] = {}
        marks = {"listing s3://": "list_start", "populated ": "populated",
                 "adopted ": "populated", "serving: ": "serving"}
        for line in self.log_path.read_text(errors="replace").splitlines():
            for needle, name in marks.items():
                if needle in line and name not in out:
                    t = log_time(line)
                    if t is not None:
                        out[name] = t
        if {"list_start", "populated"} <= out.keys():
            out["list_and_populate_s"] = round(out["populated"] - out["list_start"], 2)
        return {k: v for k, v in out.items() if k.endswith("_s")}

    def holder_stats(self) -> dict[str, Any]:
        m = re.search(r"holder stopped; stats (\{.*\})", self.log_path.read_text(errors="replace"))
        if m is None:
            return {}
        with contextlib.suppress(ValueError, SyntaxError):
            return dict(ast.literal_eval(m.group(1)))
        return {}


def _alive(pid: int) -> bool:
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return st.rsplit(")", 1)[-1].split()[0] != "Z"


def kernel_stats(cache: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "hsmfs", "stats", "--json", str(cache)],
                         capture_output=True, text=True, timeout=60, env=ENV, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"hsmfs stats: {out.stderr}")
    return json.loads(out.stdout)


def event_total(stats: dict[str, Any]) -> int:
    return int(sum(stats.get("kernel", {}).get("events", {}).values()))


def read_files(root: Path, rels: list[str]) -> tuple[float, int]:
    """Read each file whole (as a program would); seconds and bytes."""
    t = time.monotonic()
    total = 0
    for rel in rels:
        with open(root / rel, "rb") as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return time.monotonic() - t, total


# -- one layout ------------------------------------------------------------------------------


def run_layout(lay: Layout, source: str, url: str, sample: list[str], runs: int,
               opts: str, py_spy_dir: Path | None,
               register: Callable[[Daemon], None]) -> dict[str, Any]:
    cmd = ["serve", "-f", source, str(lay.cache), "-o", f"endpoint={url}{opts}"]
    res: dict[str, Any] = {"populate": [], "restart": [], "stop_s": []}
    for run in range(runs):
        say(f"[{lay.name}] run {run + 1}/{runs}: empty cache")
        lay.reset()
        d = Daemon(cmd, lay.state / f"{lay.name}-populate-{run}.log")
        register(d)
        spy = py_spy_dir / f"pyspy-{lay.name}-populate.txt" if py_spy_dir and run == 0 else None
        try:
            seconds = d.start(f"[{lay.name}] first populate", spy)
            row: dict[str, Any] = {"s": round(seconds, 2), **d.phases(),
                                   "mem_ready": d.memory()}
            st = kernel_stats(lay.cache)
            row["mark"] = st.get("kernel", {}).get("mark")
            say(f"[{lay.name}] populated in {seconds:.1f} s ({row['mark']} mark), "
                f"RSS H+W {row['mem_ready']['total_rss_mb']} MB")
            if run == 0:
                # Make the sample resident (first read), then read it again: the re-read must
                # raise no event (resident files carry an ignore mask, or the fs mark's).
                e0 = event_total(st)
                cold_s, nbytes = read_files(lay.cache, sample)
                e1 = event_total(kernel_stats(lay.cache))
                warm_s, _ = read_files(lay.cache, sample)
                e2 = event_total(kernel_stats(lay.cache))
                row.update(first_read_s=round(cold_s, 2), first_read_events=e1 - e0,
                           reread_s=round(warm_s, 3), reread_events=e2 - e1,
                           read_bytes=nbytes, mem_after_reads=d.memory())
                say(f"[{lay.name}] {len(sample)} files: first read {cold_s:.1f} s, "
                    f"{e1 - e0} events; re-read {warm_s:.2f} s, {e2 - e1} events; RSS H+W "
                    f"{row['mem_after_reads']['total_rss_mb']} MB")
                row["events_at_stop_worker"] = e2
        finally:
            res["stop_s"].append(round(d.stop(), 2))
        row["holder"] = {k: v for k, v in d.holder_stats().items()
                         if k in ("events", "responses", "dispatched")}
        res["populate"].append(row)
        # Restarts over the tree this run made (and, in run 0, with resident files).
        # No uncover here: the restart starts behind the cover the stop left (on the loop
        # layout too, since the filesystem mark goes through the private door's fd).
        d = Daemon(cmd, lay.state / f"{lay.name}-restart-{run}.log")
        register(d)
        spy = py_spy_dir / f"pyspy-{lay.name}-restart.txt" if py_spy_dir and run == 0 else None
        try:
            seconds = d.start(f"[{lay.name}] restart", spy)
            rrow: dict[str, Any] = {"s": round(seconds, 2), **d.phases(),
                                    "mem_ready": d.memory()}
            say(f"[{lay.name}] restarted in {seconds:.1f} s, RSS H+W "
                f"{rrow['mem_ready']['total_rss_mb']} MB")
            if run == 0:
                e0 = event_total(kernel_stats(lay.cache))
                warm_s, _ = read_files(lay.cache, sample)
                e1 = event_total(kernel_stats(lay.cache))
                rrow.update(reread_s=round(warm_s, 3), reread_events=e1 - e0,
                            mem_after_reads=d.memory())
                say(f"[{lay.name}] after restart: re-read of {len(sample)} resident files "
                    f"{warm_s:.2f} s, {e1 - e0} events")
        finally:
            res["stop_s"].append(round(d.stop(), 2))
        rrow["holder"] = {k: v for k, v in d.holder_stats().items()
                          if k in ("events", "responses", "dispatched")}
        res["restart"].append(rrow)
    return res


def run_fuse(state: Path, source: str, url: str, runs: int, opts: str,
             register: Callable[[Daemon], None]) -> dict[str, Any]:
    """The FUSE door's mount of the same bucket: first (empty cache) and again."""
    mnt, cache = state / "fuse-mnt", state / "fuse-cache"
    res: dict[str, Any] = {"first": [], "again": []}
    for run in range(runs):
        shutil.rmtree(cache, ignore_errors=True)
        mnt.mkdir(parents=True, exist_ok=True)
        for phase in ("first", "again"):
            d = Daemon(["mount", "-f", source, str(mnt), "-o",
                        f"cache={cache},endpoint={url}{opts}"], state / f"fuse-{phase}-{run}.log")
            register(d)
            try:
                seconds = d.start(f"[fuse] {phase} mount")
                # The FUSE daemon is one process: "worker" is None, the holder row is it.
                res[phase].append({"s": round(seconds, 2), **d.phases(),
                                   "mem_ready": d.memory()})
                say(f"[fuse] {phase} mount in {seconds:.1f} s, RSS "
                    f"{res[phase][-1]['mem_ready']['total_rss_mb']} MB")
            finally:
                if is_mountpoint(mnt):
                    subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
                d.stop()
                if is_mountpoint(mnt):
                    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    return res


# -- report ----------------------------------------------------------------------------------


def med(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return round(statistics.median(vals), 2) if vals else None


def med_mem(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key]["total_rss_mb"] for r in rows if key in r]
    return round(statistics.median(vals), 1) if vals else None


def markdown(result: dict[str, Any]) -> str:
    n = result["objects"]
    lines = [f"Restart at scale: {n:,} objects in {result['dirs']:,} directories, "
             f"S3 = {result['s3']}; median of {result['runs']} run(s); "
             f"{result['host']}. Shared 2-core machine: timings are noisy.", "",
             "| layout | mark | first populate s (list+populate) | restart s (list+populate) "
             "| stop s | RSS H+W at ready MB | RSS H+W after reads MB (HWM) "
             "| events: re-read / after restart |",
             "|---|---|---|---|---|---|---|---|"]
    for name, lay in result["layouts"].items():
        pop, rst = lay["populate"], lay["restart"]
        first = pop[0]
        after = first.get("mem_after_reads", {})
        lines.append(
            f"| {name} | {first.get('mark')} | {med(pop, 's')} ({med(pop, 'list_and_populate_s')})"
            f" | {med(rst, 's')} ({med(rst, 'list_and_populate_s')}) "
            f"| {statistics.median(lay['stop_s']):.1f} "
            f"| {med_mem(pop, 'mem_ready')} / restart {med_mem(rst, 'mem_ready')} "
            f"| {after.get('total_rss_mb')} ({after.get('total_hwm_mb')}) "
            f"| {first.get('reread_events')} / {rst[0].get('reread_events')} |")
    if result.get("fuse"):
        f = result["fuse"]
        lines.append(f"| fuse mount | - | {med(f['first'], 's')} | {med(f['again'], 's')} | - "
                     f"| {med_mem(f['first'], 'mem_ready')} / again "
                     f"{med_mem(f['again'], 'mem_ready')} | - | - |")
    lines += ["", f"Reads: {result['sample']} files read whole twice (first read makes them "
              "resident); \"events\" = kernel-door events counted by the worker during the "
              "re-read (goal 0). RSS = VmRSS of holder + worker (goal < 300 MB).", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["layouts"])
    pop = [med(result["layouts"][x]["populate"], "s") or 0 for x in names]
    rst = [med(result["layouts"][x]["restart"], "s") or 0 for x in names]
    if result.get("fuse"):
        names.append("fuse")
        pop.append(med(result["fuse"]["first"], "s") or 0)
        rst.append(med(result["fuse"]["again"], "s") or 0)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], pop, 0.4, label="first populate")
    ax.bar([x + 0.2 for x in xs], rst, 0.4, label="restart")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("seconds to ready")
    ax.set_title(f"hsmfs start-up, {result['objects']:,} objects ({result['s3']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=100_000)
    ap.add_argument("--dirs", type=int, default=3_000)
    ap.add_argument("--runs", type=int, default=2, help="populate+restart runs per layout")
    ap.add_argument("--sample", type=int, default=1_000, help="files made resident and re-read")
    ap.add_argument("--layouts", default="root,loop")
    ap.add_argument("--fuse", action="store_true", help="also time the FUSE door's mount")
    ap.add_argument("--state", type=Path, default=Path("/var/tmp/hsmfs-scale"),
                    help="ceph data, caches, logs (on /, ext4)")
    ap.add_argument("--endpoint", help="an S3 server already running (else Ceph is started)")
    ap.add_argument("--keep-s3", action="store_true",
                    help="keep the Ceph data (the seeded bucket) for the next run")
    ap.add_argument("--put-threads", type=int, default=48)
    ap.add_argument("-o", dest="opts", default="", help="extra daemon options, e.g. head=0")
    ap.add_argument("--py-spy", action="store_true",
                    help="profile the worker during run 1's populate and restart")
    ap.add_argument("--seed-only", action="store_true", help="seed the bucket, then stop")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (fanotify pre-content, loop mounts)", file=sys.stderr)
        return 2
    args.state.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    opts = f",{args.opts}" if args.opts else ""
    bucket = f"scale-{args.objects}-{args.dirs}"
    daemons: list[Daemon] = []
    layouts: list[Layout] = []
    server = None if args.endpoint else Ceph(args.state / "ceph")

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        url = args.endpoint or server.up()  # type: ignore[union-attr]
        seeded = seed(url, bucket, args.objects, args.dirs, args.put_threads)
        if args.seed_only:
            return 0
        rng = random.Random(12)
        sample = sorted(rng.sample(layout_keys(args.objects, args.dirs),
                                   min(args.sample, args.objects)))
        result: dict[str, Any] = {
            "objects": args.objects, "dirs": args.dirs, "runs": args.runs,
            "s3": "Ceph RGW 16 (bluestore)" if server else args.endpoint,
            "host": f"{os.cpu_count()} cores, kernel {os.uname().release}",
            "sample": len(sample), "opts": args.opts, "seed": seeded, "layouts": {},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        spy_dir = RESULTS if args.py_spy else None
        for name in args.layouts.split(","):
            lay = Layout(name, args.state / f"{name}-cache", args.state,
                         image=args.state / "loop.img" if name == "loop" else None)
            layouts.append(lay)
            result["layouts"][name] = run_layout(lay, f"s3://{bucket}", url, sample, args.runs,
                                                 opts, spy_dir, daemons.append)
            lay.unmount()
        if args.fuse:
            result["fuse"] = run_fuse(args.state, f"s3://{bucket}", url, args.runs, opts,
                                      daemons.append)
        stem = RESULTS / f"scale-{args.objects}{args.tag}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        md = markdown(result)
        stem.with_suffix(".md").write_text(md)
        plot(result, stem.with_suffix(".png"))
        print(md)
        say(f"wrote {stem}.json, .md, .png")
        return 0
    finally:
        for d in daemons:
            with contextlib.suppress(Exception):
                d.stop()
        for lay in layouts:
            with contextlib.suppress(Exception):
                lay.unmount()
        if args.state.exists():
            with contextlib.suppress(Exception):
                uncover_all(args.state / "fuse-mnt")
                if is_mountpoint(args.state / "fuse-mnt"):
                    subprocess.run(["umount", "-l", str(args.state / "fuse-mnt")])
        if server is not None:
            server.down(remove=not args.keep_s3)


if __name__ == "__main__":
    sys.exit(main())
