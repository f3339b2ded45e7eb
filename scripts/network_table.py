"""Print the README's headline table of a `hsmfs bench --profile network` run.

    python3 scripts/network_table.py results/network/network/results.json

One line per read workload: the metric that names it (MB/s, or p50 ms for random reads and exec),
each door cold and warm/hot, raw S3 one request at a time and (file trees) at full concurrency;
then the goals of issue 15 with met/missed and the measured numbers behind them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

LATENCY = ("rand4k", "rand64k", "exec")
READS = ("seq", "rand4k", "rand64k", "mmap", "tree", "exec", "grep", "compile",
         "many1", "many4", "many16", "same4", "same16")
ISSUE15 = ("cold sequential", "cold 4 KiB", "cold source tree", "readers of one cold file",
           "warm row unchanged")


def _find(rows: list[dict[str, Any]], door: str, w: str, cache: str,
          pc: str | None) -> dict[str, Any] | None:
    for r in rows:
        if (r["door"], r["workload"], r["cache"], r["page_cache"]) == (door, w, cache, pc):
            return r
    return None


def _cell(r: dict[str, Any] | None, field: str) -> str:
    if r is None or r.get("skipped") or r.get(field) is None:
        return "-"
    v = r[field]
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}" if v < 1 else f"{v:.1f}"


def main(path: str) -> int:
    doc = json.loads(Path(path).read_text())
    rows = doc["results"]
    cols = (("kernel", "cold", "dropped"), ("fuse", "cold", "dropped"), ("s3", "cold", None),
            ("s3par", "cold", None), ("native", "warm", "hot"), ("kernel", "warm", "hot"),
            ("fuse", "warm", "hot"))
    print("| workload | metric | kernel cold | FUSE cold | raw S3 | raw S3 parallel "
          "| native warm | kernel warm | FUSE warm |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for w in READS:
        field = "p50_ms" if w in LATENCY else "MBps"
        cells = [_cell(_find(rows, d, w, c, pc), field) for d, c, pc in cols]
        print(f"| {w} | {'p50 ms' if field == 'p50_ms' else 'MB/s'} | " + " | ".join(cells)
              + " |")
    print()
    goals = [g for g in doc["goals"] if g["goal"].startswith(ISSUE15)]
    met = sum(g["status"] == "met" for g in goals)
    missed = sum(g["status"] == "missed" for g in goals)
    print(f"Issue 15 goals: {met} met, {missed} missed, {len(goals) - met - missed} n/a")
    print()
    print("| goal | door | workload | cache | value | target | status | measured |")
    print("|---|---|---|---|---:|---|---|---|")
    for g in goals:
        v = "-" if g["value"] is None else f"{g['value']:.2f}"
        print(f"| {g['goal']} | {g['door']} | {g['workload']} | {g['cache']} | {v} "
              f"| {g['target']} | **{g['status']}** | {g.get('limit') or ''} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
