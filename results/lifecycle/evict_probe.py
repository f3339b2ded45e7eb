"""Release rate and reads under a cache budget, through both doors, in one run (issue 12 "Speed",
issue 15 item 4).

Run as root from the repository (PYTHONPATH=. if hsmfs is installed from another tree):
`python3 results/lifecycle/evict_probe.py [--files 64 --file-mib 4] [--reps 3] [--endpoint URL]`
(~4 minutes here with the defaults).

With no ``--endpoint`` it starts moto in server mode (tests/conftest.py's MotoServer, its own
process); ``--endpoint`` points it at a real S3 such as Ceph RGW (the shelf's S3_SERVERS.md)
(credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY). The output names the server. Each
door is a real ``hsmfs mount -f`` / ``hsmfs serve -f`` (tests/support/doors.py), fresh for
every phase, stopped by PID (a FUSE mount whose daemon will not die is aborted via fusectl).

    release   read the release set (``--release-files`` objects of ``--release-kib``, under
              their own prefix) through the door, then one ``hsmfs release`` of all of them
              (the CLI: one request); files/s and GiB/s freed (du before and after), timed
              from the command's start to its exit; then the same command again on the stubs:
              its fixed cost (start-up, request, walk); then every file read again (S3's bytes)
    evict     the working set (every file) read whole in a shuffled order, twice (seeded: the
              same orders for every door and budget), then once in name order, with
              ``-o cache_size=`` half the working set, and again with no budget: MiB/s, S3
              bytes per byte read (the backend's ``s3_bytes``), evictions, ``evict_peak_bytes``
              against the budget, and the data on disk (st_blocks beyond each bare stub's)
              sampled every 5 ms while it runs (tests/t4_evict.py's Sampler) and after each pass

Every byte read is compared with the object (sha256); a wrong byte, a budget passed (the
daemon's peak, a disk sample beyond one file of walk skew, the data on disk after a pass) or
a hang fails the run (exit 1) after the daemon log's last lines are printed.
Writes --json and appends a section to --rows (results/lifecycle/README_rows.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import AWS_ENV, MotoServer  # noqa: E402
from support.doors import Served, serve_door  # noqa: E402
from t4_evict import Sampler, _blocks, _on_disk  # noqa: E402

from hsmfs.bench.doors import S3Target  # noqa: E402
from hsmfs.cover import uncover  # noqa: E402
from hsmfs.mounts import mountinfo  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
HERE = Path(__file__).resolve().parent
DOORS = ("kernel", "fuse")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class ProbeFailure(RuntimeError):
    """A wrong byte, a budget passed or a hang: the run reports nothing but this."""


# -- the data set ---------------------------------------------------------------------------------

def upload(target: S3Target, files: int, size: int, seed: int) -> dict[str, str]:
    """``files`` objects of ``size`` seeded bytes; returns key -> sha256."""
    client = target.client(pool=16)
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=target.bucket)

    def put(i: int) -> tuple[str, str]:
        key = f"{target.prefix}/f{i:04d}.bin"
        body = random.Random(f"{seed}:{i}").randbytes(size)
        client.put_object(Bucket=target.bucket, Key=key, Body=body)
        return f"f{i:04d}.bin", hashlib.sha256(body).hexdigest()

    with ThreadPoolExecutor(8) as pool:
        return dict(pool.map(put, range(files)))


# -- measuring ------------------------------------------------------------------------------------

def du(tree: Path) -> int:
    """Bytes allocated to the backing files (st_blocks, as ``du``; a stat raises no event)."""
    return sum(_blocks(tree).values())


def read_checked(root: Path, names: list[str], digests: dict[str, str]) -> int:
    """Read each file whole in 1 MiB reads; raise on any byte that is not the object's."""
    total = 0
    buf = bytearray(MiB)
    view = memoryview(buf)
    for name in names:
        h = hashlib.sha256()
        with open(root / name, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
                total += n
        if h.hexdigest() != digests[name]:
            raise ProbeFailure(f"wrong bytes read from {root / name}")
    return total


def bounded(fn: Any, timeout: float, what: str) -> Any:
    """Run ``fn`` in a thread; a hang becomes ProbeFailure (the cleanup then aborts the door,
    which wakes the stuck reader)."""
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(fn).result(timeout)
    except FutureTimeout as exc:
        raise ProbeFailure(f"{what}: no answer after {timeout:.0f} s (hang)") from exc
    finally:
        pool.shutdown(wait=False)


def hsmfs(*args: str, timeout: float) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "hsmfs", *args], capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise ProbeFailure(f"`hsmfs {args[0]}` timed out after {timeout:.0f} s") from exc
    return proc, time.perf_counter() - t0


def daemon_span(text: str, marker: str) -> float | None:
    """Seconds from the first to the last daemon log line holding ``marker`` (asctime, ms)."""
    stamps = [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
              for line in text.splitlines() if marker in line and line[:4].isdigit()]
    return (stamps[-1] - stamps[0]).total_seconds() if len(stamps) > 1 else None


def tail(d: Served, n: int = 25) -> str:
    return "\n".join(d.log().splitlines()[-n:])


@contextlib.contextmanager
def door(kind: str, target: S3Target, work: Path, opts: list[str], timeout: float):
    """One fresh door; on failure, the daemon log's last lines go to stderr."""
    with serve_door(kind, target.url, work, target.endpoint, *opts, timeout=timeout) as d:
        try:
            yield d
        except BaseException:
            log(f"{kind}: daemon log, last lines:\n{tail(d)}")
            raise
    with contextlib.suppress(OSError):
        uncover(work / "cache")  # a kernel-door stop covers the tree (hsmfs.cover)


# -- the phases -----------------------------------------------------------------------------------

def release_phase(kind: str, target: S3Target, work: Path, digests: dict[str, str],
                  timeout: float) -> dict[str, Any]:
    names = sorted(digests)
    with door(kind, target, work, [], timeout) as d:
        stubs = _blocks(d.cache)
        bounded(lambda: read_checked(d.root, names, digests), timeout, f"{kind} read")
        time.sleep(0.5)  # FUSE sends RELEASE after close() returns: let the handles go
        du0, data0 = du(d.cache), _on_disk(d.cache, stubs)
        proc, seconds = hsmfs("release", *(str(d.root / m) for m in names), timeout=timeout)
        du1, data1 = du(d.cache), _on_disk(d.cache, stubs)
        released = proc.stdout.count("\nreleased") + proc.stdout.startswith("released")
        if proc.returncode != 0 or released != len(names):
            raise ProbeFailure(f"{kind}: `hsmfs release` exited {proc.returncode}, "
                               f"{released}/{len(names)} released:\n{proc.stdout[-1500:]}"
                               f"{proc.stderr[-1500:]}")
        _, fixed = hsmfs("release", *(str(d.root / m) for m in names), timeout=timeout)
        stats = d.stats()
        span = daemon_span(d.log(), " released: ")
        # Released files read S3's bytes again.
        bounded(lambda: read_checked(d.root, names, digests), timeout, f"{kind} re-read")
    freed = du0 - du1
    row = {"door": kind, "files": len(names), "seconds": round(seconds, 4),
           "fixed_seconds": round(fixed, 4), "du_before": du0, "du_after": du1,
           "data_before": data0, "data_after": data1, "freed_bytes": freed,
           "daemon_releases": stats.get("releases"),
           "daemon_released_bytes": stats.get("released_bytes"),
           "files_per_s": round(len(names) / seconds, 1),
           "GiB_per_s": round(freed / GiB / seconds, 3),
           # The daemon's own pace: its first to its last "released" log line (n - 1 files).
           "daemon_span_s": span,
           "daemon_files_per_s": round((len(names) - 1) / span, 1) if span else None,
           "daemon_GiB_per_s": (round(freed * (len(names) - 1) / len(names) / GiB / span, 3)
                                if span else None)}
    log(f"release {kind}: {len(names)} files, {freed / MiB:.0f} MiB freed in {seconds:.3f} s "
        f"({row['files_per_s']} files/s, {row['GiB_per_s']} GiB/s; the command alone "
        f"{fixed:.3f} s; the daemon {row['daemon_files_per_s']} files/s)")
    return row


STAT_KEYS = ("s3_bytes", "s3_requests", "fetched_bytes", "cache_s3_gets", "hits", "misses",
             "evict_evictions", "evict_evicted_bytes", "evict_refused",
             "readahead_no_room")


def evict_phase(kind: str, target: S3Target, work: Path, digests: dict[str, str],
                budget: int | None, orders: list[tuple[str, list[str]]], max_file: int,
                timeout: float) -> dict[str, Any]:
    opts = [f"cache_size={budget}"] if budget else []
    passes = []
    with door(kind, target, work, opts, timeout) as d, Sampler(d.cache) as sampler:
        for label, names in orders:
            before = d.stats()
            t0 = time.perf_counter()
            nbytes = bounded(lambda names=names: read_checked(d.root, names, digests), timeout,
                             f"{kind} {label} pass")
            seconds = time.perf_counter() - t0
            after = d.stats()
            delta = {k: after.get(k, 0) - before.get(k, 0) for k in STAT_KEYS
                     if isinstance(after.get(k), int)}
            on_disk = _on_disk(d.cache, sampler.baseline)
            p = {"pass": label, "bytes": nbytes, "seconds": round(seconds, 3),
                 "MiBps": round(nbytes / MiB / seconds, 1),
                 "s3_bytes_per_byte": round(delta.get("s3_bytes", 0) / nbytes, 3),
                 "data_on_disk_after": on_disk, **delta}
            passes.append(p)
            log(f"evict {kind} budget={budget // MiB if budget else 'none'}"
                f"{' MiB' if budget else ''} {label}: {p['MiBps']} MiB/s, "
                f"{p['s3_bytes_per_byte']} S3 B/B, {delta.get('evict_evictions', 0)} evictions,"
                f" {on_disk / MiB:.0f} MiB resident")
            if budget and on_disk > budget:
                raise ProbeFailure(f"{kind}: {on_disk} bytes resident after {label}, "
                                   f"budget {budget}")
        final = d.stats()
        over_logged = d.log().count("cannot meet the budget")
    total = sum(p["bytes"] for p in passes)
    secs = sum(p["seconds"] for p in passes)
    s3 = sum(p.get("s3_bytes", 0) for p in passes)
    row = {"door": kind, "budget": budget, "passes": passes,
           "MiBps": round(total / MiB / secs, 1), "s3_bytes_per_byte": round(s3 / total, 3),
           "evictions": final.get("evict_evictions"),
           "evict_peak_bytes": final.get("evict_peak_bytes"),
           "evict_over_budget": final.get("evict_over_budget"),
           "evict_refused": final.get("evict_refused"),
           "over_budget_log_lines": over_logged,
           "disk_peak_bytes": sampler.peak, "disk_samples": sampler.samples,
           "s3_retries": final.get("s3_retries"), "errors": final.get("errors")}
    # The sampler walks the tree (no snapshot): a file punched after it was counted and the
    # file filled in its place both count, so one file of slack, as tests/t4_evict.py allows.
    if budget and sampler.peak > budget + max_file:
        raise ProbeFailure(f"{kind}: {sampler.peak} bytes on disk at a sample, budget {budget}")
    if budget and (row["evict_peak_bytes"] or 0) > budget:
        raise ProbeFailure(f"{kind}: evict_peak_bytes {row['evict_peak_bytes']} > budget "
                           f"{budget}: {json.dumps(final)}")
    return row


# -- the report -----------------------------------------------------------------------------------

MAXED = ("evict_peak_bytes", "disk_peak_bytes", "over_budget_log_lines", "s3_retries")


def summarise(rows: list[dict[str, Any]], key: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per ``key`` over the repetitions: the median of every number (the worst for
    :data:`MAXED`), passes likewise by position; ``spread``: min and max of each rate."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in key), []).append(r)

    def merge(rs: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in rs[0].items():
            vals = [r.get(k) for r in rs]
            if k == "passes":
                out[k] = [merge([r["passes"][i] for r in rs]) for i in range(len(v))]
            elif isinstance(v, bool) or not isinstance(v, int | float) or k in key:
                out[k] = v if k in key or len(set(map(json.dumps, vals))) == 1 else vals
            elif any(x is None for x in vals):
                out[k] = None
            else:
                out[k] = max(vals) if k in MAXED else statistics.median(vals)
                if k in ("MiBps", "files_per_s", "GiB_per_s", "s3_bytes_per_byte", "seconds",
                         "daemon_files_per_s"):
                    out.setdefault("spread", {})[k] = [min(vals), max(vals)]
        return out

    return [merge(rs) for rs in groups.values()]


# -- the markdown --------------------------------------------------------------------------------

def rng(row: dict[str, Any], k: str, fmt: str) -> str:
    lo, hi = row.get("spread", {}).get(k, (row[k], row[k]))
    return f"{lo:{fmt}}-{hi:{fmt}}"


def rows_md(out: dict[str, Any]) -> str:
    ds = out["dataset"]
    lines = [
        "", f"## Release rate and reads under a budget ({out['date']}, evict_probe.py)", "",
        f"Source: `python3 results/lifecycle/evict_probe.py"
        f"{' ' + out['argv'] if out['argv'] else ''}` against "
        f"{out['server']}; {ds['files']} files x {ds['file_MiB']} MiB "
        f"({ds['files'] * ds['file_MiB']} MiB working set), both doors side by side in one run, "
        f"{out['reps']} repetitions (which door and which budget goes first alternates), medians "
        f"(raw data: [evict_probe.json](evict_probe.json)). Every byte read was checked "
        f"against its object (sha256)."
        + (" moto copies the whole object for every GET (S3_SERVERS.md): absolute MiB/s are "
           "moto's, the ratios within the run are the result." if "moto" in out["server"]
           else ""), "",
        f"Release: {ds['release_files']} files of {ds['release_KiB']} KiB made resident, then "
        "one `hsmfs release` of them all, timed as a user sees it (start to exit); "
        "\"command alone\" is the same command on the stubs that remain (start-up, request, "
        "walk). \"Daemon alone\": from the daemon's first to its last \"released\" log line.",
        "",
        "| door | release: files | s | files/s (range) | GiB/s freed (range) | command alone, s "
        "| daemon alone: files/s, GiB/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in out["release"]:
        lines.append(f"| {r['door']} | {r['files']:.0f} | {r['seconds']:.3f} | "
                     f"{r['files_per_s']:,.0f} ({rng(r, 'files_per_s', '.0f')}) | "
                     f"{r['GiB_per_s']:.2f} ({rng(r, 'GiB_per_s', '.2f')}) | "
                     f"{r['fixed_seconds']:.3f} | {r['daemon_files_per_s'] or 0:,.0f}, "
                     f"{r['daemon_GiB_per_s'] or 0:.2f} |")
    lines += ["", "| door | cache_size | MiB/s, all passes (range) | S3 B / B read | "
              + " | ".join(f"{p['pass']}: MiB/s, S3 B/B" for p in out["evict"][0]["passes"])
              + " | evictions | peak over budget, KiB: daemon / disk |",
              "|---|---|---:|---:|" + "---:|" * len(out["evict"][0]["passes"]) + "---:|---:|"]
    for r in out["evict"]:
        b = r["budget"]
        cells = " | ".join(f"{p['MiBps']:,.0f}, {p['s3_bytes_per_byte']:.2f}"
                           for p in r["passes"])
        peak = (f"{(r['evict_peak_bytes'] - b) / 1024:+,.0f} / "
                f"{(r['disk_peak_bytes'] - b) / 1024:+,.0f}" if b else "-")
        lines.append(f"| {r['door']} | {f'{b // MiB} MiB' if b else 'unlimited'} | "
                     f"{r['MiBps']:,.0f} ({rng(r, 'MiBps', '.0f')}) | "
                     f"{r['s3_bytes_per_byte']:.2f} | {cells} | "
                     f"{r['evictions'] or 0:.0f} | {peak} |")
    lines += ["", out["interpretation"], ""]
    return "\n".join(lines + table_rows(out))


def table_rows(out: dict[str, Any]) -> list[str]:
    """The lifecycle rows for the README's comparison table (issue 15 item 4)."""
    ds = out["dataset"]
    rel = {r["door"]: r for r in out["release"]}
    ev = {(r["door"], bool(r["budget"])): r for r in out["evict"]}
    if set(rel) != set(DOORS):
        return []

    def cell(kind: str, lim: bool) -> str:
        r = ev[kind, lim]
        return f"{r['MiBps']:,.0f} MiB/s, {r['s3_bytes_per_byte']:.2f}"

    half = ds["files"] * ds["file_MiB"] // 2
    return [
        "Rows for the existing table (cold columns: a fresh door; no native or raw-S3 "
        "equivalent):", "",
        "| workload | metric | native cold | kernel cold | FUSE cold | raw S3 |",
        "|---|---|---:|---:|---:|---:|",
        f"| release ({ds['release_files']} x {ds['release_KiB'] // 1024} MiB, one command) | "
        f"files/s | - | {rel['kernel']['files_per_s']:,.0f} | "
        f"{rel['fuse']['files_per_s']:,.0f} | - |",
        f"| release, same | GiB/s freed | - | {rel['kernel']['GiB_per_s']:.2f} | "
        f"{rel['fuse']['GiB_per_s']:.2f} | - |",
        f"| reads over 2x cache_size ({half} MiB budget, {len(out['orders'])} passes) | "
        "MiB/s, S3 B per B read | - | "
        f"{cell('kernel', True)} | {cell('fuse', True)} | - |",
        f"| same, no cache_size | MiB/s, S3 B per B read | - | {cell('kernel', False)} | "
        f"{cell('fuse', False)} | - |", ""]


def interpret(out: dict[str, Any]) -> str:
    parts, rereads = [], []
    over = max((r["disk_peak_bytes"] - r["budget"]) for r in out["evict"] if r["budget"])
    disk = (f", and in the 5 ms samples at most {over // 1024} KiB over it, most likely ext4's "
            "extent index block while a file is filled in pieces out of order (metadata, like "
            "each stub's xattr block; the daemon counts data; a 4 MiB file written in 16 "
            "alternate 128 KiB pieces gains a 4 KiB block that filling the gaps frees)"
            if over > 0 else ", and in every 5 ms sample")
    for kind in DOORS:
        lim = next(r for r in out["evict"] if r["door"] == kind and r["budget"])
        free = next(r for r in out["evict"] if r["door"] == kind and not r["budget"])
        rereads += [p["s3_bytes_per_byte"] for p in lim["passes"][1:]]
        parts.append(f"{kind} {lim['s3_bytes_per_byte']:.2f} against "
                     f"{free['s3_bytes_per_byte']:.2f} S3 bytes per byte read "
                     f"({lim['s3_bytes_per_byte'] / free['s3_bytes_per_byte']:.1f}x) at "
                     f"{lim['MiBps'] / free['MiBps']:.2f}x the throughput")
    return ("**Reading.** With half the working set as budget, over all passes: "
            + "; ".join(parts) + ". Every re-read pass refetches "
            f"{min(rereads):.0%}-{max(rereads):.0%} of its bytes, where the unlimited cache "
            "refetches none: LRU over a shuffled or cyclic order of a set twice the cache keeps "
            "only the files that happen to be read again before their turn to go, as expected "
            "of LRU (an oracle would keep half). The budget held on both doors: "
            "evict_peak_bytes <= cache_size, no over-budget episode, the data on disk <= "
            "cache_size after every pass" + disk + "; every byte read was right.")


def report(out: dict[str, Any], json_path: str, rows_path: str) -> None:
    """Interpret, write the JSON, append the markdown to ``rows_path`` (unless ''), print it."""
    both = {r["door"] for r in out["evict"]} == set(DOORS)
    out["interpretation"] = interpret(out) if both else ""
    Path(json_path).write_text(json.dumps(out, indent=1) + "\n")
    if rows_path:
        with open(rows_path, "a") as f:
            f.write(rows_md(out))
    print(rows_md(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--endpoint", help="S3 endpoint (default: an embedded moto server)")
    ap.add_argument("--bucket", default="evict-probe")
    ap.add_argument("--files", type=int, default=64)
    ap.add_argument("--file-mib", type=int, default=4)
    ap.add_argument("--release-files", type=int, default=256)
    ap.add_argument("--release-kib", type=int, default=1024, help="size of each release file")
    ap.add_argument("--budget-share", type=float, default=0.5,
                    help="cache_size as a share of the working set")
    ap.add_argument("--no-seq", action="store_true", help="skip the name-order pass")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3, help="repetitions (medians reported)")
    ap.add_argument("--doors", default=",".join(DOORS))
    ap.add_argument("--timeout", type=float, default=300, help="per start, pass and command")
    ap.add_argument("--scratch", default="/var/tmp")
    ap.add_argument("--json", default=str(HERE / "evict_probe.json"))
    ap.add_argument("--rows", default=str(HERE / "README_rows.md"), help="'' to skip")
    ap.add_argument("--from-json", help="only render --rows (and print) from this JSON")
    args = ap.parse_args()
    if args.from_json:
        report(json.loads(Path(args.from_json).read_text()), args.from_json, args.rows)
        return 0
    doors = [k for k in args.doors.split(",") if k]
    size = args.file_mib * MiB
    work_root = Path(args.scratch) / f"evict-probe-{os.getpid()}"
    work_root.mkdir(parents=True)
    moto: MotoServer | None = None
    try:
        if args.endpoint:
            target = S3Target(args.endpoint, args.bucket, "probe",
                              os.environ.get("AWS_ACCESS_KEY_ID", "hsmfsaccesskey"),
                              os.environ.get("AWS_SECRET_ACCESS_KEY", "hsmfssecretkey"))
            server = f"the S3 endpoint {args.endpoint}"
        else:
            moto = MotoServer().start()
            target = S3Target(moto.endpoint, args.bucket, "probe",
                              AWS_ENV["AWS_ACCESS_KEY_ID"], AWS_ENV["AWS_SECRET_ACCESS_KEY"])
            server = "an embedded moto server (moto_server, its own process, loopback)"
        os.environ.update(AWS_ACCESS_KEY_ID=target.access_key,
                          AWS_SECRET_ACCESS_KEY=target.secret_key,
                          AWS_DEFAULT_REGION=target.region)
        log(f"S3: {server}; uploading {args.files} x {args.file_mib} MiB")
        digests = upload(target, args.files, size, args.seed)
        rel_target = dataclasses.replace(target, prefix="release")
        log(f"uploading {args.release_files} x {args.release_kib} KiB for the release phase")
        rel_digests = upload(rel_target, args.release_files, args.release_kib * 1024,
                             args.seed + 1)
        names = sorted(digests)
        rng = random.Random(args.seed)
        orders = [(f"shuffled{i + 1}", rng.sample(names, len(names))) for i in range(2)]
        if not args.no_seq:
            orders.append(("sequential", names))
        budget = int(len(names) * size * args.budget_share)
        serial = iter(range(10000))
        out: dict[str, Any] = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "argv": " ".join(sys.argv[1:]), "server": server, "host_cpus": os.cpu_count(),
            "dataset": {"files": args.files, "file_MiB": args.file_mib, "seed": args.seed,
                        "release_files": args.release_files,
                        "release_KiB": args.release_kib},
            "budget": budget, "orders": [lbl for lbl, _ in orders], "reps": args.reps,
            "runs": []}
        for rep in range(args.reps):
            run: dict[str, list[dict[str, Any]]] = {"release": [], "evict": []}
            order = doors if rep % 2 == 0 else doors[::-1]  # neither door always goes first
            for kind in order:
                run["release"].append(release_phase(kind, rel_target,
                                                    work_root / f"r{next(serial)}",
                                                    rel_digests, args.timeout))
            for b in (budget, None) if rep % 2 == 0 else (None, budget):  # likewise
                for kind in order:
                    run["evict"].append(evict_phase(kind, target,
                                                    work_root / f"e{next(serial)}", digests, b,
                                                    orders, size, args.timeout))
                    r = run["evict"][-1]
                    log(f"rep {rep + 1}/{args.reps} evict {kind} budget="
                        f"{b // MiB if b else 'none'}: {r['MiBps']} MiB/s, "
                        f"{r['s3_bytes_per_byte']} S3 B/B, peak {r['evict_peak_bytes']}")
            out["runs"].append(run)
        out["release"] = summarise([r for run in out["runs"] for r in run["release"]],
                                   ("door",))
        out["evict"] = summarise([r for run in out["runs"] for r in run["evict"]],
                                 ("door", "budget"))
        report(out, args.json, args.rows)
        return 0
    except ProbeFailure as exc:
        log(f"FAILED: {exc}")
        return 1
    finally:
        if moto is not None:
            moto.stop()
        for m in mountinfo():  # covers a kernel door left if its stop went wrong
            if m.source == "hsmfs-cover" and m.mount_point.startswith(str(work_root) + "/"):
                with contextlib.suppress(OSError):
                    uncover(m.mount_point)
        if not any(m.mount_point.startswith(str(work_root) + "/") for m in mountinfo()):
            subprocess.run(["rm", "-rf", "--one-file-system", str(work_root)], check=False,
                           timeout=120)
        else:
            log(f"left {work_root}: something is still mounted below it")


if __name__ == "__main__":
    sys.exit(main())
