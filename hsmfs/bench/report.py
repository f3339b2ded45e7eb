"""Turning measurements into results: rows, ratios, goals, markdown, JSON and PNG plots.

Owns: the result schema (one row per door x workload x cache state; the JSON's "results"), the
median over repetitions, the ratios against native and against raw S3, the issue's goals and
whether each is met, and every output format. It does no measuring and starts nothing.

Ratios are speed ratios, > 1 = faster than the reference: throughput over the reference's
throughput, or, for latency-only workloads (exec), the reference's p50 over ours. References:
a cold or warm/dropped row compares with native cold (both read from disk), a warm/hot row with
native warm/hot; every row compares with the raw-S3 row of the same workload.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .workloads import WORKLOADS, Sample

Row = dict[str, Any]
KEY_FIELDS = ("door", "workload", "cache", "page_cache")
NUMERIC = ("MBps", "p50_ms", "p99_ms", "ttfb_ms", "s3_requests", "s3_bytes", "daemon_cpu_s",
           "bytes", "seconds", "ops", "resident_pct", "proxy_requests", "proxy_bytes",
           "files_per_s", "fixed_ms")
DOOR_ORDER = ("native", "kernel", "fuse", "pyfuse3", "s3", "s3par")
CACHE_ORDER = (("cold", "dropped"), ("cold", None), ("warm", "dropped"), ("warm", "hot"))
# Goal targets from issue #3.
KERNEL_WARM_MIN = 0.97
FUSE_WARM_MIN = 0.90
COLD_SEQ_VS_S3_MIN = 0.90
RAND4K_EXTRA_MS = 1.0
SRC_TIME_MAX = 1.05
# Goal target from issue #11: `hsmfs archive` of a big file vs boto3's upload_file.
ARCHIVE_VS_S3_MIN = 0.90
AMPLIFICATION_MAX = 1.25
RANDOM_WORKLOADS = ("rand4k", "rand64k")
SOURCE_WORKLOADS = ("grep", "compile")
# Goal targets from issue #15 (S3 across a network).
SRC_VS_S3_SERIAL_MAX = 1.0  # a cold grep/compileall: faster than raw S3 one file at a time
SRC_VS_S3_PARALLEL_MAX = 1.5  # ... and within 1.5x of raw S3 at full concurrency
WARM_VS_BASELINE_MIN = 0.90  # warm rows "unchanged": x native at least 0.9x the loopback run's
COALESCE_MAX = 1.0  # 16 readers of one cold file: S3 bytes <= one file's bytes
MANY_PREFIXES = ("many", "same")
# Lifecycle rows issue #15 asks for that `hsmfs bench` does not measure (yet): listed, not dropped.
MISSING_ROWS = {
    "release rate": "`hsmfs release` is not a bench workload; measured by "
                    "results/lifecycle/evict_probe.py (moto, loopback) only",
    "eviction under a budget": "`-o cache_size` is not a bench workload; measured by "
                               "results/lifecycle/evict_probe.py (moto, loopback) only",
}


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def sample_row(door: str, workload: str, mode: tuple[str, str | None], rep: int,
               sample: Sample | None, counters: dict[str, Any] | None = None,
               resident: float | None = None, skipped: str | None = None,
               error: str | None = None) -> Row:
    """One measured (or skipped/failed) repetition, in the schema of the JSON's rows."""
    row: Row = {"door": door, "workload": workload, "cache": mode[0], "page_cache": mode[1],
                "rep": rep, "skipped": skipped, "error": error}
    row.update(dict.fromkeys(NUMERIC))
    if sample is not None:
        latency_only = WORKLOADS[workload].latency_only
        row.update(
            MBps=None if latency_only else sample.mbps, p50_ms=percentile(sample.lat_ms, 50),
            p99_ms=percentile(sample.lat_ms, 99), ttfb_ms=sample.ttfb_ms, bytes=sample.bytes,
            seconds=sample.seconds, ops=len(sample.lat_ms), fixed_ms=sample.fixed_ms,
        )
        if WORKLOADS[workload].per_file and sample.seconds > 0:
            row["files_per_s"] = len(sample.lat_ms) / sample.seconds
    row.update({k: v for k, v in (counters or {}).items() if k in NUMERIC})
    row["resident_pct"] = None if resident is None else 100.0 * resident
    return row


def _key(row: Row) -> tuple[Any, ...]:
    return tuple(row[k] for k in KEY_FIELDS)


def _median(values: Iterable[Any]) -> Any:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    # Counts stay counts: the lower median is a value some repetition really had.
    return statistics.median_low(vals) if all(isinstance(v, int) for v in vals) else (
        statistics.median(vals))


def aggregate(samples: list[Row]) -> list[Row]:
    """Median of every number over the successful repetitions of each door/workload/cache."""
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for s in samples:
        groups.setdefault(_key(s), []).append(s)
    rows = []
    for key, reps in groups.items():
        ok = [r for r in reps if not r["skipped"] and not r["error"]]
        row: Row = dict(zip(KEY_FIELDS, key, strict=True))
        row.update({k: _median(r[k] for r in ok) for k in NUMERIC})
        row["n"] = len(ok)
        row["spread_pct"] = _spread(ok)
        skips = [r["skipped"] for r in reps if r["skipped"]]
        row["skipped"] = skips[0] if skips and not ok else None
        row["error"] = next((r["error"] for r in reps if r["error"]), None)
        rows.append(row)
    rows.sort(key=_sort_key)
    add_ratios(rows)
    return rows


def _spread(reps: list[Row]) -> float | None:
    """(max - min) / median of the row's main number over its repetitions, in percent."""
    field = "MBps" if any(r["MBps"] for r in reps) else "p50_ms"
    vals = [r[field] for r in reps if r[field]]
    if len(vals) < 2:
        return None
    return 100.0 * (max(vals) - min(vals)) / statistics.median(vals)


def _sort_key(row: Row) -> tuple[int, int, int]:
    names = list(WORKLOADS)
    w = names.index(row["workload"]) if row["workload"] in names else len(names)
    d = DOOR_ORDER.index(row["door"]) if row["door"] in DOOR_ORDER else len(DOOR_ORDER)
    mode = (row["cache"], row["page_cache"])
    c = CACHE_ORDER.index(mode) if mode in CACHE_ORDER else len(CACHE_ORDER)
    return w, d, c


def speed_ratio(row: Row, ref: Row | None) -> float | None:
    """> 1 = faster than `ref`: throughput ratio, or inverse p50 ratio for latency-only rows."""
    if ref is None or row.get("skipped") or ref.get("skipped"):
        return None
    if row["MBps"] and ref["MBps"]:
        return float(row["MBps"] / ref["MBps"])
    if row["p50_ms"] and ref["p50_ms"]:
        return float(ref["p50_ms"] / row["p50_ms"])
    return None


def find_row(rows: list[Row], door: str, workload: str, cache: str,
             page_cache: str | None) -> Row | None:
    """The aggregated row of one door x workload x cache state, if any."""
    for r in rows:
        if (r["door"], r["workload"], r["cache"], r["page_cache"]) == (
                door, workload, cache, page_cache):
            return r
    return None


def native_ref(rows: list[Row], row: Row) -> Row | None:
    # Native data is always resident: "cold" native is the warm tree with the page cache dropped.
    pc = "hot" if (row["cache"], row["page_cache"]) == ("warm", "hot") else "dropped"
    return find_row(rows, "native", row["workload"], "warm" if pc == "hot" else "cold", pc)


def add_ratios(rows: list[Row]) -> None:
    for r in rows:
        nat = None if r["door"] == "native" else native_ref(rows, r)
        s3 = None if r["door"] == "s3" else find_row(rows, "s3", r["workload"], "cold", None)
        r["x_native"] = speed_ratio(r, nat)
        r["x_s3"] = speed_ratio(r, s3)
        r["amplification"] = (r["s3_bytes"] / r["bytes"]
                              if r["s3_bytes"] is not None and r["bytes"] else None)
        r["s3_req_per_MB"] = (r["s3_requests"] / (r["bytes"] / 1e6)
                              if r["s3_requests"] is not None and r["bytes"] else None)


# ---- goals ------------------------------------------------------------------------------------


@dataclass
class Goal:
    goal: str
    door: str
    workload: str
    cache: str
    value: float | None
    target: str
    status: str  # met | missed | n/a
    limit: str | None = None  # what was measured around it (every miss says what held it)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def cache_label(cache: str, page_cache: str | None) -> str:
    """'cold' (the page cache is always dropped for cold runs), 'warm/dropped', 'warm/hot'."""
    return cache if cache == "cold" or page_cache is None else f"{cache}/{page_cache}"


def _goal(goal: str, row: Row | None, value: float | None, target: str,
          ok: bool | None, limit: str | None = None) -> Goal:
    status = "n/a" if ok is None or value is None else ("met" if ok else "missed")
    door = row["door"] if row else "?"
    if limit is None and row is not None and status != "n/a":
        limit = _measured(row)
    return Goal(goal, door, row["workload"] if row else "?",
                cache_label(row["cache"], row["page_cache"]) if row else "?", value, target,
                status, limit)


def _num(v: Any, digits: int = 2) -> str:
    return "-" if v is None else f"{v:,.{digits}f}" if isinstance(v, float) else f"{v:,}"


def _measured(row: Row, name: str | None = None) -> str:
    """The row's own numbers, as a goal's measured limit: what it did and what it cost."""
    parts = [f"{name or row['door']}:"]
    if row["MBps"] is not None:
        parts.append(f"{_num(row['MBps'], 1)} MB/s")
    if row["seconds"] is not None:
        parts.append(f"{_num(row['seconds'], 3)} s")
    if row["p50_ms"] is not None:
        parts.append(f"p50 {_num(row['p50_ms'])} ms")
    if row["s3_requests"] is not None:
        mb = (row["s3_bytes"] or 0) / 1e6
        parts.append(f"{row['s3_requests']} S3 requests, {_num(mb, 1)} MB")
    if row["daemon_cpu_s"] is not None and row["door"] not in ("s3", "s3par"):
        parts.append(f"daemon CPU {_num(row['daemon_cpu_s'])} s")
    return " ".join(parts)


def _warm_goals(rows: list[Row], door: str, target: float) -> list[Goal]:
    out = []
    for r in rows:
        if r["door"] == door and r["cache"] == "warm":
            v = r["x_native"]
            out.append(_goal(f"{door} warm >= {target}x native", r, v, f">= {target}",
                             None if v is None else v >= target))
    return out


def _vs(row: Row, ref: Row | None) -> str:
    """A goal's measured limit: the row's numbers beside its reference's."""
    return _measured(row) + ("" if ref is None else "; " + _measured(ref))


def _cold_goals(rows: list[Row], door: str) -> list[Goal]:
    out = []
    seq = find_row(rows, door, "seq", "cold", "dropped")
    if seq:
        v = seq["x_s3"]
        ref = find_row(rows, "s3", "seq", "cold", None)
        out.append(_goal("cold sequential >= 0.9x raw S3", seq, v, f">= {COLD_SEQ_VS_S3_MIN}",
                         None if v is None else v >= COLD_SEQ_VS_S3_MIN, _vs(seq, ref)))
    r4 = find_row(rows, door, "rand4k", "cold", "dropped")
    s3 = find_row(rows, "s3", "rand4k", "cold", None)
    if r4:
        ok, v, target = None, r4["p50_ms"], "raw S3 p50 + 1 ms"
        if v is not None and s3 and s3["p50_ms"] is not None and not r4["skipped"]:
            limit = s3["p50_ms"] + RAND4K_EXTRA_MS
            ok, target = v <= limit, f"<= {limit:.2f} ms"
        out.append(_goal("cold 4 KiB random read p50 <= raw GET p50 + 1 ms", r4, v, target, ok,
                         _vs(r4, s3)))
    for name in RANDOM_WORKLOADS:
        r = find_row(rows, door, name, "cold", "dropped")
        if r:
            v = r["amplification"]
            out.append(_goal("fetch amplification (S3 bytes / bytes read)", r, v,
                             f"<= {AMPLIFICATION_MAX}",
                             None if v is None else v <= AMPLIFICATION_MAX))
    return out


def _source_goals(rows: list[Row]) -> list[Goal]:
    out = []
    for r in rows:
        if r["door"] != "kernel" or r["workload"] not in SOURCE_WORKLOADS:
            continue
        x = r["x_native"]
        v = None if not x else 1.0 / x  # time ratio: our seconds over native seconds
        out.append(_goal("source tree on kernel door <= 1.05x native time", r, v,
                         f"<= {SRC_TIME_MAX}", None if v is None else v <= SRC_TIME_MAX))
        if r["cache"] == "cold":
            b = r["amplification"]
            out.append(_goal("source tree: S3 bytes <= bytes read", r, b, "<= 1.0",
                             None if b is None else b <= 1.0))
    return out


def _archive_goals(rows: list[Row]) -> list[Goal]:
    out = []
    for r in rows:
        if r["workload"] == "archive" and r["door"] in ("kernel", "fuse"):
            v = r["x_s3"]
            out.append(_goal(f"archive >= {ARCHIVE_VS_S3_MIN}x boto3 upload_file", r, v,
                             f">= {ARCHIVE_VS_S3_MIN}",
                             None if v is None else v >= ARCHIVE_VS_S3_MIN))
    return out


def _time_ratio(row: Row, ref: Row | None) -> float | None:
    """Our seconds over the reference's for the same bytes (< 1 = faster)."""
    x = speed_ratio(row, ref)
    return None if not x else 1.0 / x


def _network_source_goals(rows: list[Row]) -> list[Goal]:
    """Issue 15: a cold grep/compileall against raw S3 downloading the same files one at a time
    (s3) and at full concurrency (s3par)."""
    out = []
    for door in ("kernel", "fuse"):
        for name in SOURCE_WORKLOADS:
            r = find_row(rows, door, name, "cold", "dropped")
            if r is None:
                continue
            serial = find_row(rows, "s3", name, "cold", None)
            par = find_row(rows, "s3par", name, "cold", None)
            refs = "; ".join(_measured(x, n) for x, n in ((serial, "raw one at a time"),
                                                           (par, "raw in parallel")) if x)
            lim = _measured(r) + (f"; {refs}" if refs else "")
            if serial is not None:
                v = _time_ratio(r, serial)
                out.append(_goal("cold source tree faster than raw S3 one file at a time "
                                 "(time ratio)", r, v, f"< {SRC_VS_S3_SERIAL_MAX}",
                                 None if v is None else v < SRC_VS_S3_SERIAL_MAX, lim))
            if par is not None:
                v = _time_ratio(r, par)
                out.append(_goal("cold source tree within 1.5x of raw S3 at full concurrency "
                                 "(time ratio)", r, v, f"<= {SRC_VS_S3_PARALLEL_MAX}",
                                 None if v is None else v <= SRC_VS_S3_PARALLEL_MAX, lim))
    return out


def many_name(workload: str) -> tuple[int, bool] | None:
    """(readers, same file?) of a many-readers workload name (many4, same16), else None."""
    for prefix in MANY_PREFIXES:
        n = workload.removeprefix(prefix)
        if workload.startswith(prefix) and n.isdigit():
            return int(n), prefix == "same"
    return None


def _coalescing_goals(rows: list[Row]) -> list[Goal]:
    """N readers of one cold file cost one file's GETs: S3 bytes no more than one file, and no
    more GETs than one reader of it (many1 on the same door)."""
    out = []
    for r in rows:
        m = many_name(r["workload"])
        if m is None or not m[1] or r["cache"] != "cold" or r["door"] not in ("kernel", "fuse"):
            continue
        n, _ = m
        one = find_row(rows, r["door"], "many1", "cold", "dropped")
        file_bytes = r["bytes"] / n if r["bytes"] else None
        v = r["s3_bytes"] / file_bytes if file_bytes and r["s3_bytes"] is not None else None
        ok = None if v is None else v <= COALESCE_MAX and (
            one is None or one["s3_requests"] is None or r["s3_requests"] is None
            or r["s3_requests"] <= one["s3_requests"])
        out.append(_goal(f"{n} readers of one cold file cost one file's GETs (S3 bytes / "
                         "file size; GETs <= one reader's)", r, v, f"<= {COALESCE_MAX}", ok,
                         _vs(r, one)))
    return out


def _baseline_goals(rows: list[Row], baseline: list[Row] | None) -> list[Goal]:
    """Warm rows unchanged from the loopback run: no S3 request, and x native at least 0.9x
    the loopback run's for the same door, workload and cache state."""
    if not baseline:
        return []
    out = []
    for r in rows:
        if r["cache"] != "warm" or r["door"] not in ("kernel", "fuse") or r["skipped"]:
            continue
        b = find_row(baseline, r["door"], r["workload"], r["cache"], r["page_cache"])
        if b is None:
            continue
        x, bx = r["x_native"], b.get("x_native")
        v = None if not x or not bx else x / bx
        lim = (f"x native {_num(x)} here, {_num(bx)} on loopback; "
               f"{r['s3_requests']} S3 requests here")
        out.append(_goal("warm row unchanged from the loopback run: x native / loopback's",
                         r, v, f">= {WARM_VS_BASELINE_MIN}",
                         None if v is None else v >= WARM_VS_BASELINE_MIN, lim))
    return out


def _warm_quiet_goals(rows: list[Row]) -> list[Goal]:
    """Warm rows send nothing to S3, however far away it is: the structural half of "warm rows
    unchanged" (their speed is the other half, against a loopback --baseline)."""
    out = []
    for r in rows:
        if r["cache"] != "warm" or r["door"] not in ("kernel", "fuse") or r["skipped"]:
            continue
        n = r["s3_requests"]
        out.append(_goal("warm row sends no S3 request", r, None if n is None else float(n),
                         "0", None if n is None else n == 0))
    return out


def evaluate_goals(rows: list[Row], baseline: list[Row] | None = None) -> list[Goal]:
    return [
        *_warm_goals(rows, "kernel", KERNEL_WARM_MIN),
        *_warm_goals(rows, "fuse", FUSE_WARM_MIN),
        *_cold_goals(rows, "kernel"),
        *_cold_goals(rows, "fuse"),
        *_source_goals(rows),
        *_archive_goals(rows),
        *_network_source_goals(rows),
        *_coalescing_goals(rows),
        *_warm_quiet_goals(rows),
        *_baseline_goals(rows, baseline),
    ]


# ---- markdown ---------------------------------------------------------------------------------


def _f(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        # Page-cache hits take microseconds: keep three significant digits below 1.
        return f"{v:,.{max(digits, 3)}f}" if 0 < abs(v) < 1 else f"{v:,.{digits}f}"
    return f"{v:,}"


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _row_md(r: Row) -> str:
    label = cache_label(r["cache"], r["page_cache"])
    head = f"| {r['door']} | {r['workload']} | {label} |"
    if r["skipped"]:
        return head + f" skipped: {r['skipped']} |" + " |" * 11
    mb = None if r["s3_bytes"] is None else r["s3_bytes"] / 1e6
    cells = [
        _f(r["MBps"]), _f(r["p50_ms"], 2), _f(r["p99_ms"], 2), _f(r["ttfb_ms"], 2),
        _f(r["s3_requests"]), _f(mb), _f(r["amplification"], 2), _f(r["daemon_cpu_s"], 2),
        _ratio(r["x_native"]), _ratio(r["x_s3"]), _f(r["resident_pct"], 0),
        (f"{r['n']} ok" + (f", ±{r['spread_pct'] / 2:.0f}%" if r["spread_pct"] else "")
         + (f"; failed: {r['error']}" if r["error"] else "")),
    ]
    return head + " " + " | ".join(cells) + " |"


def markdown(rows: list[Row], goals: list[Goal], meta: dict[str, Any]) -> str:
    lines = ["# hsmfs bench", ""]
    lines += [f"- **{k}**: {v}" for k, v in meta.items() if not isinstance(v, dict | list)]
    lines += [
        "", "Ratios are speed ratios (> 1 = faster): MB/s over the reference's MB/s, or the "
        "reference's p50 over ours for exec. cold and warm/dropped rows compare with native cold "
        "(native data is always resident: cold = page cache dropped), warm/hot rows with native "
        "warm/hot, every row with raw S3. Raw S3 replays the same reads as boto3 GETs (sequential: "
        "parallel ranged GETs of the chunk size; everything else one GET per operation, one at a "
        "time); for exec, grep and compile it only fetches the bytes, so x S3 there compares a "
        "program run with a download. For the s3 rows, daemon CPU is the client's CPU.",
        "", "| door | workload | cache | MB/s | p50 ms | p99 ms | ttfb ms | S3 req | S3 MB "
        "| S3 bytes / read | daemon CPU s | x native | x S3 | resident % | runs, spread |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += [_row_md(r) for r in rows]
    lines += ["", "## Goals", "",
              "| goal | door | workload | cache | value | target | status | measured |",
              "|---|---|---|---|---:|---|---|---|"]
    for g in goals:
        lines.append(f"| {g.goal} | {g.door} | {g.workload} | {g.cache} | {_f(g.value, 2)} "
                     f"| {g.target} | **{g.status}** | {g.limit or ''} |")
    if not goals:
        lines.append("| (no goal applies: neither the kernel nor the FUSE door was run) "
                     "| | | | | | | |")
    met = sum(g.status == "met" for g in goals)
    missed = sum(g.status == "missed" for g in goals)
    lines += ["", f"{met} met, {missed} missed, {len(goals) - met - missed} not measured.", ""]
    lines += _many_md(rows)
    lines += _lifecycle_md(rows)
    lines += _floor_md(rows)
    return "\n".join(lines)


def _many_md(rows: list[Row]) -> list[str]:
    """Many readers: aggregate MB/s and S3 requests per byte, per door, readers and cache."""
    mine = [r for r in rows if many_name(r["workload"]) is not None]
    if not mine:
        return []
    lines = [
        "## Many readers", "",
        "manyN: N threads start together (a barrier), each reading a different file of many/ "
        "fully in 1 MiB reads; sameN: N threads reading one file. MB/s is the aggregate; raw S3 "
        "is one whole-object GET per reader (sameN: N downloads of one object, no cache).", "",
        "| door | readers | files | cache | MB/s | p50 ms per reader | S3 req | S3 MB "
        "| S3 req / MB read | S3 bytes / read | runs |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in sorted(mine, key=lambda r: (DOOR_ORDER.index(r["door"])
                                         if r["door"] in DOOR_ORDER else 99,
                                         CACHE_ORDER.index((r["cache"], r["page_cache"]))
                                         if (r["cache"], r["page_cache"]) in CACHE_ORDER
                                         else 99, many_name(r["workload"]))):
        n, same = many_name(r["workload"]) or (0, False)
        head = (f"| {r['door']} | {n} | {'one' if same else 'different'} "
                f"| {cache_label(r['cache'], r['page_cache'])} |")
        if r["skipped"]:
            lines.append(head + f" skipped: {r['skipped']} |" + " |" * 6)
            continue
        mb = None if r["s3_bytes"] is None else r["s3_bytes"] / 1e6
        lines.append(head + f" {_f(r['MBps'])} | {_f(r['p50_ms'], 1)} | {_f(r['s3_requests'])} "
                     f"| {_f(mb)} | {_f(r['s3_req_per_MB'], 3)} | {_f(r['amplification'], 3)} "
                     f"| {r['n']} ok" + (f"; failed: {r['error']}" if r["error"] else "") + " |")
    return [*lines, ""]


def _lifecycle_md(rows: list[Row]) -> list[str]:
    """The write, archive and create rows on their own: the README's lifecycle table."""
    mine = [r for r in rows if r["workload"] in WORKLOADS and WORKLOADS[r["workload"]].writes]
    if not mine:
        return []
    lines = [
        "## Writes and archive", "",
        "write: a new file of the big object's size in 1 MiB writes, then fsync (the kernel "
        "door writes into its backing tree, which the daemon watches; the FUSE door through the "
        "mount). overwrite: the existing big object rewritten in place the same way (through a "
        "door a cold stub: the whole file is made local first, and ttfb is open to the first "
        "write done; native overwrites a copy). create: the small-file tree's files created "
        "anew (mkdir, open O_EXCL, write, close; no fsync). archive: `hsmfs archive FILE` of a "
        "freshly written dirty file, timed from command start to exit, against boto3 "
        "`upload_file` of the same bytes with the same upload shape (one PUT up to 64 MiB, "
        "above it 16 MiB parts, 4 at a time); fixed ms is the same command on the then clean "
        "file (start-up, request, walk: no upload). Each runs on a fresh door, once per "
        "repetition.", "",
        "| door | workload | MB/s | files/s | seconds | ttfb ms | S3 MB | daemon CPU s "
        "| fixed ms | x native | x S3 | runs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in mine:
        head = f"| {r['door']} | {r['workload']} |"
        mb = None if r["s3_bytes"] is None else r["s3_bytes"] / 1e6
        if r["skipped"]:
            lines.append(head + f" skipped: {r['skipped']} |" + " |" * 9)
            continue
        lines.append(
            head + f" {_f(r['MBps'])} | {_f(r['files_per_s'], 0)} | {_f(r['seconds'], 2)} "
            f"| {_f(r['ttfb_ms'], 0)} | {_f(mb)} | {_f(r['daemon_cpu_s'], 2)} "
            f"| {_f(r['fixed_ms'], 0)} | {_ratio(r['x_native'])} "
            f"| {_ratio(r['x_s3'])} | {r['n']} ok"
            + (f"; failed: {r['error']}" if r["error"] else "") + " |")
    lines += ["", "Lifecycle rows not measured by this command (listed, not dropped):", ""]
    lines += [f"* **{name}**: {why}" for name, why in MISSING_ROWS.items()]
    return [*lines, ""]


def fuse_floor(rows: list[Row]) -> list[tuple[Row, Row]]:
    """(FUSE-door row, bare-pyfuse3 row) pairs of the same workload and cache state."""
    pairs = []
    for r in rows:
        if r["door"] == "fuse" and r["cache"] == "warm" and not r["skipped"]:
            floor = find_row(rows, "pyfuse3", r["workload"], r["cache"], r["page_cache"])
            if floor is not None and not floor["skipped"]:
                pairs.append((r, floor))
    return pairs


def _floor_md(rows: list[Row]) -> list[str]:
    pairs = fuse_floor(rows)
    if not pairs:
        return []
    lines = [
        "## The FUSE door against a bare pyfuse3 passthrough", "",
        "`pyfuse3` is hsmfs.bench.passfs mounted over the native tree: no cache, no S3, every "
        "handler inline, the FUSE door's mount settings. What a pyfuse3 door can reach here at "
        "all; the FUSE door's share of a warm miss is the gap between the two.", "",
        "| workload | cache | fuse x native | pyfuse3 x native | fuse / pyfuse3 |",
        "|---|---|---:|---:|---:|",
    ]
    for fuse, floor in pairs:
        lines.append(f"| {fuse['workload']} | {cache_label(fuse['cache'], fuse['page_cache'])} "
                     f"| {_ratio(fuse['x_native'])} | {_ratio(floor['x_native'])} "
                     f"| {_ratio(speed_ratio(fuse, floor))} |")
    return [*lines, ""]


# ---- JSON and plots ---------------------------------------------------------------------------


def write_json(path: Path, meta: dict[str, Any], rows: list[Row], goals: list[Goal],
               samples: list[Row]) -> None:
    doc = {"meta": meta, "results": rows, "goals": [g.as_dict() for g in goals],
           "missing": [{"row": k, "why": v} for k, v in MISSING_ROWS.items()],
           "samples": samples}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


# One hue per door, one shade per cache state, so a door's bars read as a group.
DOOR_COLOURS = {"native": "#4c72b0", "kernel": "#55a868", "fuse": "#dd8452",
                "pyfuse3": "#c44e52", "s3": "#8172b3", "s3par": "#937860"}
CACHE_ALPHA = {"cold": 0.45, "warm/dropped": 0.7, "warm/hot": 1.0}


def _series(rows: list[Row]) -> list[tuple[str, str, str | None]]:
    seen: list[tuple[str, str, str | None]] = []
    for r in rows:
        s = (r["door"], r["cache"], r["page_cache"])
        if not r["skipped"] and s not in seen:
            seen.append(s)
    return seen


def _bar_values(rows: list[Row], series: tuple[str, str, str | None], workloads: list[str],
                field: str, err: str | None) -> tuple[list[float], list[float]]:
    """Bar heights (0 = missing) and the whisker above each bar (p99 - p50, or 0)."""
    door, cache, page_cache = series
    ys, ups = [], []
    for w in workloads:
        r = find_row(rows, door, w, cache, page_cache)
        y = r[field] if r and not r["skipped"] and r[field] is not None else 0.0
        top = r[err] if r and err and r[err] is not None and y else y
        ys.append(y)
        ups.append(max(0.0, top - y))
    return ys, ups


def _bars(ax: Any, rows: list[Row], workloads: list[str], field: str, err: str | None) -> None:
    series = _series(rows)
    width = 0.8 / max(1, len(series))
    for i, s in enumerate(series):
        ys, ups = _bar_values(rows, s, workloads, field, err)
        label = cache_label(s[1], s[2])
        ax.bar([j + i * width for j in range(len(workloads))], ys, width,
               yerr=[[0.0] * len(ys), ups] if err else None, capsize=2,
               color=DOOR_COLOURS.get(s[0], "#777777"), alpha=CACHE_ALPHA.get(label, 1.0),
               edgecolor="black", linewidth=0.4, label=f"{s[0]} {label}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(workloads))], workloads)
    ax.set_yscale("log")
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.legend(fontsize="x-small", ncols=2)


#: The one command that adds the plots (matplotlib is the bench extra, not a dependency).
PLOTS_INSTALL = "pip install 'hsmfs[bench]'"


def plots_unavailable() -> str | None:
    """Why :func:`plots` cannot draw (matplotlib missing), or None.  Asked at the start of a
    run, so a bench without the extra says so before minutes of work, not after."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        return f"matplotlib is not installed ({exc}); for the plots: {PLOTS_INSTALL}"
    return None


def plots(rows: list[Row], out_dir: Path) -> list[Path]:
    """throughput.png (MB/s) and latency.png (p50 bars, p99 whiskers), per door and workload."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    names = [w for w in WORKLOADS if any(r["workload"] == w for r in rows)]
    made = []
    for fname, title, field, err, ylabel, ws in (
        ("throughput.png", "throughput", "MBps", None, "MB/s (log)",
         [w for w in names if not WORKLOADS[w].latency_only]),
        ("latency.png", "latency per operation", "p50_ms", "p99_ms",
         "ms: p50 bar, p99 whisker (log)", names),
    ):
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(ws)), 4.5))
        if ws:
            _bars(ax, rows, ws, field, err)
        ax.set_ylabel(ylabel)
        ax.set_title(f"hsmfs bench: {title} per door and workload")
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        made.append(out_dir / fname)
    cold = _cold_vs_s3(rows, names)
    if cold:
        fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(cold[0]) + 2), 4.5))
        ws, series = cold
        width = 0.8 / len(series)
        for i, (label, colour, ys) in enumerate(series):
            ax.bar([j + i * width for j in range(len(ws))], ys, width, color=colour,
                   edgecolor="black", linewidth=0.4, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ws))], ws)
        ax.set_yscale("log")
        ax.set_ylabel("speed vs raw S3 as the program reads (log; > 1 = faster)")
        ax.set_title("cold reads against raw S3 (same reads, same S3, same latency)")
        ax.grid(axis="y", which="major", alpha=0.3)
        ax.legend(fontsize="x-small")
        fig.tight_layout()
        fig.savefig(out_dir / "cold_vs_s3.png", dpi=110)
        plt.close(fig)
        made.append(out_dir / "cold_vs_s3.png")
    return made


def _cold_vs_s3(rows: list[Row], names: list[str]
                ) -> tuple[list[str], list[tuple[str, str, list[float]]]] | None:
    """Per read workload: the cold doors' and the parallel reference's speed over raw S3's."""
    ws = [w for w in names if not WORKLOADS[w].writes
          and find_row(rows, "s3", w, "cold", None) is not None]
    series = []
    for door, cache, pc, label in (("kernel", "cold", "dropped", "kernel door cold"),
                                   ("fuse", "cold", "dropped", "FUSE door cold"),
                                   ("s3par", "cold", None, "raw S3, every key known, "
                                                           "all in flight")):
        ys = []
        for w in ws:
            r = find_row(rows, door, w, cache, pc)
            x = r["x_s3"] if r else None
            ys.append(x or 0.0)
        if any(ys):
            series.append((label, DOOR_COLOURS[door], ys))
    return (ws, series) if ws and series else None
