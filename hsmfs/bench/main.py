"""`hsmfs bench`: the command line, the run order, and progress.

Owns: argument parsing (`bench_main(argv)` is what the `hsmfs bench` subcommand calls), setting up
S3 (a throw-away Ceph unless --endpoint; the latency proxy when asked), building and uploading the
data set, running every door x workload x cache state in a fixed order, and handing the samples to
report.py. Every process and server it starts is stopped in a `finally` (an ExitStack).

Run order, per repetition (outermost) and door: each workload cold on a fresh door (a new
backing tree, page cache dropped); then one warm session: start, read everything once, and for
each workload run it warm/dropped (page cache dropped just before) and warm/hot (its files re-read
just before). The re-read is needed because some VMs trim the guest page cache in the background
(measured on our 2-vCPU VMs: an idle 1 GiB file fell from 100 % to ~0 % resident in ~50 s).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import ceph, dataset, doors, report
from .dataset import BIG, BINARY, MANY, SRC, TREE, Dataset, Sizes, many_rel
from .latency_proxy import ProxyConfig, ProxyProcess, parse_bandwidth_mbps, parse_latency_ms
from .workloads import LIFECYCLE, WORKLOADS, Params, Workload, WorkloadError, child_env

MiB = 1 << 20
DEFAULT_CHUNK = 8 * MiB  # mountpoint-s3's part size: "largest value that achieves max throughput"
DEFAULT_CONCURRENCY = 8  # Ceph RGW on loopback peaks around 8 parallel ranged GETs
# Across a network, throughput comes from requests in flight: the daemon's own default.
NETWORK_CONCURRENCY = 16


@dataclass(frozen=True)
class NetworkProfile:
    """What `--profile` injects between every client and S3 (the bench's latency proxy), and
    why. The README's "S3 across a network" section gives the sources."""

    latency_ms: str | None  # first byte, per request: "LO:HI" uniform, or fixed
    bandwidth_mbps: float | None  # per connection, decimal MB/s
    why: str


NETWORK_PROFILES = {
    "loopback": NetworkProfile(None, None, "S3 on loopback: the CPU-bound case"),
    # AWS, "Best Practices Design Patterns: Optimizing Amazon S3 Performance" (2019) and the
    # S3 user guide's performance guidelines: small-object / first-byte latencies of about
    # 100-200 ms; one concurrent request per 85-90 MB/s of throughput wanted.
    "network": NetworkProfile("100:200", 90.0, "S3 in the same region (AWS: 100-200 ms first "
                              "byte, 85-90 MB/s per request)"),
    # The same service one inter-region round trip away (~75 ms, e.g. us-east-1 <-> eu-west-1),
    # with one TCP stream limited by its window over that round trip.
    "cross-region": NetworkProfile("175:275", 40.0, "S3 in another region: the in-region "
                                   "figures plus one ~75 ms round trip, 40 MB/s per stream"),
}
DOOR_TIMEOUT_S = 300.0
WORKLOAD_TIMEOUT_S = 900.0
PREFAULT = {"full": 2048 * MiB, "quick": 512 * MiB, "net": 512 * MiB,
            "tiny": 0}  # see workloads.prefault
GROUP_PATH = {"big": BIG, "tree": TREE, "bin": BINARY, "src": SRC, "many": MANY}
# Lifecycle workloads write new files into the tree: the big file's size (256 MiB in full,
# 64 MiB in quick) and the small-file tree's count and sizes (2,000 files of 4-64 KiB).


class BenchError(RuntimeError):
    """The benchmark cannot run at all (no S3, bad data set); the message says why."""


class Progress:
    """Progress lines on stderr, stamped with the time since the start."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.started = dt.datetime.now(dt.UTC)  # the run's start, for the report

    def __call__(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def _size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": MiB, "g": 1 << 30}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in "kmg" else (t, "")
    try:
        return int(float(num) * units[unit])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad size {text!r}") from exc


def _names(allowed: list[str]) -> Any:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}")
        return names

    return parse


def _check(parse: Any) -> Any:
    def wrapped(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return wrapped


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="hsmfs bench",
        description="Benchmark native vs the kernel door vs the FUSE door vs raw S3.")
    ap.add_argument("--quick", action="store_true", help="CI-size run (a few minutes)")
    ap.add_argument("--profile", dest="network", choices=list(NETWORK_PROFILES),
                    default="loopback",
                    help="where S3 is: loopback (CPU-bound), network (same region: 100-200 ms "
                         "first byte, 90 MB/s per connection), cross-region (175-275 ms, "
                         "40 MB/s); network profiles default to the 'net' sizes and "
                         "--concurrency 16")
    ap.add_argument("--sizes", choices=list(dataset.PROFILES),
                    help="data-set sizes (default full, --quick: quick, network profiles: net)")
    ap.add_argument("--rereport", type=Path, metavar="RESULTS_JSON",
                    help="measure nothing: write a run's tables, goals and plots again from "
                         "the samples in its results.json, with this version's report")
    ap.add_argument("--baseline", type=Path,
                    help="a loopback run's results.json (same sizes): the warm rows of this "
                         "run are checked against it (goal: warm rows unchanged)")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests only
    ap.add_argument("--endpoint", help="S3 endpoint URL (default: start a throw-away Ceph RGW)")
    ap.add_argument("--bucket", default="hsmfs-bench")
    ap.add_argument("--access-key", default=os.environ.get("AWS_ACCESS_KEY_ID", ceph.ACCESS_KEY))
    ap.add_argument("--secret-key",
                    default=os.environ.get("AWS_SECRET_ACCESS_KEY", ceph.SECRET_KEY))
    ap.add_argument("--s3-latency", type=_check(parse_latency_ms), metavar="LO:HIms",
                    help="first-byte latency injected per request, e.g. 20:80ms")
    ap.add_argument("--s3-bandwidth", type=_check(parse_bandwidth_mbps), metavar="NMB/s",
                    help="per-connection bandwidth cap, e.g. 90MB/s")
    ap.add_argument("--doors", type=_names(list(doors.DOORS)), default=list(doors.DOORS))
    ap.add_argument("--workloads", type=_names(list(WORKLOADS)), default=list(WORKLOADS))
    ap.add_argument("--json", type=Path, help="results JSON (default OUT/results.json)")
    ap.add_argument("--out", type=Path, default=Path("hsmfs-bench-out"))
    ap.add_argument("--scratch", type=Path,
                    help="backing trees and data (default OUT/scratch; the kernel door needs "
                         "ext4, xfs or btrfs here)")
    ap.add_argument("--repeat", type=int, default=None, help="runs per case (median reported)")
    ap.add_argument("--chunk", type=_size, default=DEFAULT_CHUNK, help="fetch size, e.g. 8M")
    ap.add_argument("--concurrency", type=int, default=None,
                    help=f"GETs in flight for the doors and raw S3 (default "
                         f"{DEFAULT_CONCURRENCY}, {NETWORK_CONCURRENCY} with a network profile)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--door-options", default="", metavar="OPT[,OPT]",
                    help="more -o options for the kernel and FUSE doors, e.g. readahead=256M")
    ap.add_argument("--hsmfs-cmd", help="how to run hsmfs (default: this python3 -m hsmfs)")
    ap.add_argument("--timeout", type=float, default=WORKLOAD_TIMEOUT_S,
                    help="seconds before one workload run is killed")
    ap.add_argument("--ceph-store", choices=("memstore", "bluestore"), default="memstore")
    ap.add_argument("--no-drop-caches", action="store_true",
                    help="never drop the page cache (skips native cold and warm/dropped)")
    ap.add_argument("--no-prefault", action="store_true")
    ap.add_argument("--keep-scratch", action="store_true")
    args = ap.parse_args(argv)
    net = NETWORK_PROFILES[args.network]
    remote = args.network != "loopback"
    args.profile = args.sizes or ("tiny" if args.tiny else "quick" if args.quick
                                  else "net" if remote else "full")
    if args.s3_latency is None and net.latency_ms is not None:
        args.s3_latency = net.latency_ms
    if args.s3_bandwidth is None and net.bandwidth_mbps is not None:
        args.s3_bandwidth = net.bandwidth_mbps
    if args.concurrency is None:
        args.concurrency = NETWORK_CONCURRENCY if remote else DEFAULT_CONCURRENCY
    if args.repeat is None:
        args.repeat = 3 if args.profile == "full" else 1
    if args.repeat < 1 or args.concurrency < 1 or args.chunk < 4096:
        ap.error("--repeat and --concurrency must be >= 1, --chunk >= 4096")
    return args


def workload_params(w: Workload, ds: Dataset, seed: int, tag: str = "run") -> Params:
    """What each workload reads (the raw-S3 reference replays the same reads) or writes.

    `tag` names a lifecycle workload's new files (door and repetition): an archived object
    never meets a leftover of another run at its key."""
    s = ds.sizes
    if w.group == "many" and not w.writes:
        n = int(w.name.removeprefix("many").removeprefix("same"))
        rels = [many_rel(i) for i in range(n)] if w.name.startswith("many") else (
            [many_rel(0)] * n)
        return {"paths": rels, "file_size": s.many_bytes}
    big = {"path": BIG, "file_size": s.big_bytes, "seed": seed}
    new_big = {"path": f"{LIFECYCLE}/{w.name}-{tag}.bin", "size": s.big_bytes, "seed": seed}
    return {
        "seq": {"path": BIG},
        "rand4k": {**big, "size": 4096, "ops": s.rand_ops},
        "rand64k": {**big, "size": 65536, "ops": s.rand_ops},
        "mmap": {**big, "ops": s.mmap_ops},
        "tree": {"dir": TREE},
        "exec": {"path": BINARY, "runs": s.exec_runs, "bytes": ds.total_bytes("bin")},
        "grep": {"dir": SRC, "bytes": ds.total_bytes("src")},
        "compile": {"dir": SRC, "bytes": ds.total_bytes("src")},
        "write": new_big,
        "archive": new_big,
        # In place over the data set's own big object: on a fresh door's tree (a cold stub),
        # and on native over a copy (prepare) so the shared data set stays as built.
        "overwrite": {"path": BIG, "size": s.big_bytes, "seed": seed, "overwrite": True,
                      "native_copy": f"{LIFECYCLE}/overwrite-{tag}.bin"},
        "create": {"dir": f"{LIFECYCLE}/create-{tag}", "dirs": s.tree_dirs, "seed": seed,
                   "sizes": [e.size for e in ds.group("tree")]},
    }[w.name]


def applies(door: doors.Door | type[doors.Door], w: Workload, mode: doors.CacheMode) -> bool:
    """Whether `door` runs `w` in `mode`. Lifecycle workloads run on the doors they name, once
    per repetition: in the door's first cache state (cold: a fresh door, nothing resident)."""
    if w.doors is not None and door.name not in w.doors:
        return False
    if door.workloads is not None and w.name not in door.workloads:
        return False
    return not w.writes or mode == door.modes[0]


@dataclass
class Runner:
    """Runs the plan and returns one sample row per door x workload x cache state x repetition."""

    cfg: doors.DoorConfig
    door_names: list[str]
    workloads: list[Workload]
    repeat: int
    drop_reason: str | None  # why the page cache cannot be dropped (None = it can)
    prefault: int
    timeout: float
    log: Progress
    proxy: ProxyProcess | None = None
    rows: list[report.Row] = field(default_factory=list)
    _done: int = 0
    _total: int = 0
    _dead: dict[str, str] = field(default_factory=dict)  # door -> why it cannot run

    def run(self) -> list[report.Row]:
        self._total = self.repeat * sum(
            applies(doors.DOORS[d], w, m) for d in self.door_names for w in self.workloads
            for m in doors.DOORS[d].modes)
        instances = [doors.DOORS[name](self.cfg) for name in self.door_names]
        # Repetitions on the outside: slow drift on a shared machine then spreads over every
        # door instead of biasing the door that happened to run last.
        for rep in range(self.repeat):
            for door in instances:
                self._cold(door, rep)
                self._warm(door, rep)
        return self.rows

    # -- bookkeeping --

    def _emit(self, row: report.Row) -> None:
        self.rows.append(row)
        self._done += 1
        label = report.cache_label(row["cache"], row["page_cache"])
        head = f"[{self._done}/{self._total}] {row['door']:<6} {label:<12} {row['workload']:<8}"
        self.log(f"{head} {_summary(row)}")

    def _skip(self, door: str, w: Workload, mode: doors.CacheMode, rep: int, why: str) -> None:
        self._emit(report.sample_row(door, w.name, mode, rep, None, skipped=why))

    def _mark_dead(self, door: doors.Door, exc: Exception) -> None:
        self._dead[door.name] = str(exc)
        self.log(f"{door.name}: skipped: {exc}")

    # -- measuring --

    def _measure(self, door: doors.Door, w: Workload, mode: doors.CacheMode, rep: int) -> None:
        params = workload_params(w, self.cfg.dataset, self.cfg.dataset.seed, f"{door.name}-{rep}")
        if mode[1] == "dropped" and self.drop_reason is None:
            doors.drop_page_cache()
        try:
            door.prepare(w, params)  # e.g. the dirty file to archive: not measured
        except WorkloadError as exc:
            self._emit(report.sample_row(door.name, w.name, mode, rep, None,
                                         error=f"prepare: {exc}"))
            door.cleanup(w, params)
            return
        try:
            self._measure_prepared(door, w, mode, rep, params)
        finally:
            door.cleanup(w, params)

    def _measure_prepared(self, door: doors.Door, w: Workload, mode: doors.CacheMode, rep: int,
                          params: Params) -> None:
        before, pbefore = door.counters(), self._proxy_counters()
        resident = None
        # Warm runs only: the check opens each file, and on the kernel door an open of a cold
        # stub may itself fetch the whole file (fill at FAN_OPEN_PERM), spoiling a cold run.
        if mode[0] == "warm" and door.backing is not None and door.name != "native":
            rels = [e.rel for e in self.cfg.dataset.group(w.group)]
            resident = doors.resident_fraction(door.backing, rels)
        try:
            sample = door.measure(w, params, self.timeout, self.prefault)
        except WorkloadError as exc:
            self._emit(report.sample_row(door.name, w.name, mode, rep, None, error=str(exc)))
            return
        counters = self._counter_fields(door.counters().minus(before), pbefore)
        self._emit(report.sample_row(door.name, w.name, mode, rep, sample, counters, resident))

    def _proxy_counters(self) -> Any:
        return self.proxy.stats() if self.proxy else None

    def _counter_fields(self, c: doors.Counters, pbefore: Any) -> dict[str, Any]:
        out = {"s3_requests": c.s3_requests, "s3_bytes": c.s3_bytes, "daemon_cpu_s": c.cpu_s}
        pafter = self._proxy_counters()
        if pbefore is not None and pafter is not None:
            out["proxy_requests"] = pafter.requests - pbefore.requests
            out["proxy_bytes"] = pafter.bytes_down - pbefore.bytes_down
        return out

    def _cold(self, door: doors.Door, rep: int) -> None:
        for mode in (m for m in door.modes if m[0] == "cold"):
            for w in self.workloads:
                if not applies(door, w, mode):
                    continue
                if door.name in self._dead:
                    self._skip(door.name, w, mode, rep, self._dead[door.name])
                elif door.name == "native" and self.drop_reason and not w.writes:
                    self._skip(door.name, w, mode, rep, self.drop_reason)
                else:
                    self._cold_one(door, w, mode, rep)

    def _cold_one(self, door: doors.Door, w: Workload, mode: doors.CacheMode, rep: int) -> None:
        try:
            door.start()
        except doors.DoorUnavailable as exc:
            self._mark_dead(door, exc)
            self._skip(door.name, w, mode, rep, str(exc))
            return
        try:
            self._measure(door, w, mode, rep)
        finally:
            door.stop()

    def _warm(self, door: doors.Door, rep: int) -> None:
        modes = [m for m in door.modes if m[0] == "warm"]
        if not any(applies(door, w, m) for w in self.workloads for m in modes):
            return  # no warm-up for nothing (e.g. a run of lifecycle workloads only)
        if door.name not in self._dead:
            self._warm_session(door, modes, rep)
            return
        for w in self.workloads:
            for mode in modes:
                if applies(door, w, mode):
                    self._skip(door.name, w, mode, rep, self._dead[door.name])

    def _warm_session(self, door: doors.Door, modes: list[doors.CacheMode], rep: int) -> None:
        try:
            door.start()
            t = time.monotonic()
            got = door.warm()
            self.log(f"{door.name}: warmed {got.bytes / MiB:.1f} MiB in "
                     f"{time.monotonic() - t:.1f} s")
        except (doors.DoorUnavailable, WorkloadError) as exc:
            door.stop()
            self._mark_dead(door, exc)
            for w in self.workloads:
                for mode in modes:
                    if applies(door, w, mode):
                        self._skip(door.name, w, mode, rep, str(exc))
            return
        try:
            for w in self.workloads:
                for mode in modes:
                    if applies(door, w, mode):
                        self._warm_one(door, w, mode, rep)
        finally:
            door.stop()

    def _warm_one(self, door: doors.Door, w: Workload, mode: doors.CacheMode, rep: int) -> None:
        if mode[1] == "dropped" and self.drop_reason:
            self._skip(door.name, w, mode, rep, self.drop_reason)
            return
        if mode[1] == "hot":
            try:
                door.warm((GROUP_PATH[w.group],))
            except WorkloadError as exc:
                self._emit(report.sample_row(door.name, w.name, mode, rep, None,
                                             error=f"re-warm: {exc}"))
                return
        self._measure(door, w, mode, rep)


def _ms(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.2f}" if v >= 1 else f"{v:.3g}"


def _summary(row: report.Row) -> str:
    if row["skipped"]:
        return f"skipped: {row['skipped']}"
    if row["error"]:
        return f"FAILED: {row['error']}"
    parts = []
    if row["MBps"] is not None:
        parts.append(f"{row['MBps']:,.1f} MB/s")
    for k in ("p50_ms", "p99_ms", "ttfb_ms"):
        if row[k] is not None:
            parts.append(f"{k.removesuffix('_ms')} {_ms(row[k])} ms")
    if row["s3_requests"] is not None:
        parts.append(f"S3 {row['s3_requests']} req {(row['s3_bytes'] or 0) / 1e6:.1f} MB")
    return ", ".join(parts)


# ---- set-up -----------------------------------------------------------------------------------


def _s3_endpoint(args: argparse.Namespace, stack: contextlib.ExitStack, scratch: Path,
                 log: Progress) -> tuple[str, str]:
    """The S3 endpoint to load data into, and a description for the report."""
    if args.endpoint:
        return args.endpoint, args.endpoint
    try:
        ep = stack.enter_context(ceph.ceph_cluster(scratch / "ceph", log, args.ceph_store))
    except ceph.CephUnavailable as exc:
        raise BenchError(f"cannot start Ceph: {exc}") from exc
    args.access_key, args.secret_key = ep.access_key, ep.secret_key
    return ep.url, f"Ceph RGW started by the bench ({args.ceph_store})"


def _proxy(args: argparse.Namespace, endpoint: str, stack: contextlib.ExitStack,
           scratch: Path, log: Progress) -> ProxyProcess | None:
    if not args.s3_latency and not args.s3_bandwidth:
        return None
    hostport = endpoint.split("://", 1)[-1].rstrip("/")
    host, port = hostport.rsplit(":", 1) if ":" in hostport else (hostport, "80")
    cfg = ProxyConfig(upstream_host=host, upstream_port=int(port),
                      ttfb_ms=args.s3_latency or "0", bw_mbps=args.s3_bandwidth or 0.0,
                      seed=args.seed)
    proxy = ProxyProcess(cfg, scratch / f"proxy-{os.getpid()}.json")
    stack.callback(proxy.stop)
    proxy.start(env=child_env())
    log(f"latency proxy on 127.0.0.1:{proxy.port}: ttfb {cfg.ttfb_ms} ms, "
        f"{cfg.bw_mbps or 'unlimited'} MB/s per connection")
    return proxy


def _build(scratch: Path, sizes: Sizes, seed: int, log: Progress) -> Dataset:
    root = scratch / f"native-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    t = time.monotonic()
    ds = dataset.build(root, sizes, seed)
    total = sum(e.size for e in ds.entries)
    log(f"dataset: built {len(ds.entries)} files, {total / MiB:.1f} MiB in "
        f"{time.monotonic() - t:.1f} s (digest {ds.digest[:16]})")
    return ds


def _meta(args: argparse.Namespace, ds: Dataset, endpoint_desc: str,
          drop_reason: str | None, prefault: int, started: dt.datetime,
          load_at_start: str | None = None) -> dict[str, Any]:
    return {
        "started": started.isoformat(timespec="seconds"),
        "profile": args.profile, "repeat": args.repeat, "doors": ",".join(args.doors),
        "workloads": ",".join(args.workloads), "s3": endpoint_desc,
        "network_profile": args.network, "network_profile_is": NETWORK_PROFILES[args.network].why,
        "s3_latency_ms": args.s3_latency, "s3_bandwidth_MBps": args.s3_bandwidth,
        "baseline": str(args.baseline) if args.baseline else None,
        "load_at_start": load_at_start,
        "chunk_bytes": args.chunk, "concurrency": args.concurrency, "seed": args.seed,
        "door_options": args.door_options or None,
        "dataset_digest": ds.digest, "page_cache_drop": drop_reason or "yes",
        "prefault_bytes": prefault, "host_cpus": os.cpu_count(), "kernel": platform.release(),
        "python": platform.python_version(), "sizes": asdict(ds.sizes),
    }


def _loadavg() -> str | None:
    """The 1/5/15-minute load averages: on a shared machine, how busy it was."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return None


def _mounts_under(path: Path) -> list[str]:
    from ..mounts import mountinfo

    points = [m.mount_point for m in mountinfo()]
    return [p for p in points if p == str(path) or p.startswith(str(path) + "/")]


def _remove_scratch(scratch: Path, log: Progress) -> None:
    """Delete the scratch tree, but never through a mount a door failed to unmount."""
    left = _mounts_under(scratch)
    if left:
        log(f"not deleting {scratch}: still mounted: {', '.join(left)}")
        return
    shutil.rmtree(scratch, ignore_errors=True)


def _drop_reason(args: argparse.Namespace) -> str | None:
    if args.no_drop_caches:
        return "page-cache drop disabled (--no-drop-caches)"
    if os.geteuid() != 0:
        return "dropping the page cache needs root"
    return None


def _run(args: argparse.Namespace, log: Progress) -> int:
    out = args.out.resolve()
    json_path = (args.json or out / "results.json").resolve()
    scratch = (args.scratch or out / "scratch").resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    sizes = dataset.PROFILES[args.profile]
    drop_reason = _drop_reason(args)
    prefault = 0 if args.no_prefault else PREFAULT[args.profile]
    log(f"hsmfs bench: profile {args.profile}, doors {','.join(args.doors)}, "
        f"workloads {','.join(args.workloads)}, repeat {args.repeat}")
    load_at_start = _loadavg()
    no_plots = report.plots_unavailable()
    if no_plots:
        log(f"no plots: {no_plots}; the tables and JSON are written as usual")
    with contextlib.ExitStack() as stack:
        if not args.keep_scratch:
            stack.callback(_remove_scratch, scratch, log)
        ds = _build(scratch, sizes, args.seed, log)
        endpoint, endpoint_desc = _s3_endpoint(args, stack, scratch, log)
        loader = doors.S3Target(endpoint, args.bucket, "", args.access_key, args.secret_key)
        try:
            prefix = dataset.upload(loader.client(pool=20), args.bucket, ds, log)
        except Exception as exc:  # any botocore failure: no data, no benchmark
            raise BenchError(f"cannot upload the data set to {endpoint}: {exc}") from exc
        proxy = _proxy(args, endpoint, stack, scratch, log)
        door_ep = f"http://127.0.0.1:{proxy.port}" if proxy else endpoint
        target = doors.S3Target(door_ep, args.bucket, prefix, args.access_key, args.secret_key)
        cfg = doors.DoorConfig(target, ds, scratch, doors.parse_hsmfs_cmd(args.hsmfs_cmd),
                               args.chunk, args.concurrency, DOOR_TIMEOUT_S, log,
                               args.door_options)
        runner = Runner(cfg, args.doors, [WORKLOADS[w] for w in args.workloads], args.repeat,
                        drop_reason, prefault, args.timeout, log, proxy)
        samples = runner.run()
        meta = _meta(args, ds, endpoint_desc, drop_reason, prefault, log.started,
                     load_at_start)
    meta["duration_s"] = round(time.monotonic() - log.t0, 1)
    meta["load_at_end"] = _loadavg()
    _write_outputs(json_path, meta, samples, log, no_plots, _baseline_rows(args.baseline))
    return 0


def _rereport(args: argparse.Namespace, log: Progress) -> int:
    path = args.rereport.resolve()
    try:
        doc = json.loads(path.read_text())
        meta, samples = doc["meta"], doc["samples"]
    except (OSError, ValueError, KeyError) as exc:
        raise BenchError(f"cannot read {path}: {exc}") from exc
    base = args.baseline or (Path(meta["baseline"]) if meta.get("baseline") else None)
    _write_outputs(path, meta, samples, log, report.plots_unavailable(), _baseline_rows(base))
    return 0


def _baseline_rows(path: Path | None) -> list[report.Row] | None:
    if path is None:
        return None
    try:
        rows = json.loads(path.read_text())["results"]
    except (OSError, ValueError, KeyError) as exc:
        raise BenchError(f"cannot read the baseline {path}: {exc}") from exc
    return rows if isinstance(rows, list) else None


def _write_outputs(json_path: Path, meta: dict[str, Any], samples: list[report.Row],
                   log: Progress, no_plots: str | None = None,
                   baseline: list[report.Row] | None = None) -> None:
    rows = report.aggregate(samples)
    goals = report.evaluate_goals(rows, baseline)
    report.write_json(json_path, meta, rows, goals, samples)
    md = report.markdown(rows, goals, meta)
    md_path = json_path.with_suffix(".md")
    md_path.write_text(md)
    pngs = [] if no_plots else report.plots(rows, json_path.parent)
    print(md)
    log(f"wrote {json_path}, {md_path}" + "".join(f", {p}" for p in pngs))
    if no_plots:
        log(f"plots skipped: {no_plots}")


def bench_main(argv: list[str]) -> int:
    """Entry point of `hsmfs bench`; returns the process exit status."""
    args = parse_args(argv)
    log = Progress()
    previous = _terminate_cleanly()
    try:
        if args.rereport:
            return _rereport(args, log)
        return _run(args, log)
    except BenchError as exc:
        log(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate_cleanly() -> Any:
    """Make SIGTERM (a CI timeout, `kill`) unwind like Ctrl-C, so every `finally` stops what it
    started: Ceph, the proxy, mounts, daemons. Returns the old handler (None off the main thread).
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def raise_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, raise_interrupt)


if __name__ == "__main__":
    sys.exit(bench_main(sys.argv[1:]))
