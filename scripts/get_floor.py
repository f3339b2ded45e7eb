#!/usr/bin/env python3
"""How fast can S3 hand over the bench's source tree at all?  The floor under the cold
source-tree rows of `hsmfs bench` (as root; starts its own Ceph RGW, as the bench does).

Uploads the bench's source tree (the same stdlib packages), then times fetching every object
whole with hsmfs's own backend: one GET at a time and N at a time, through boto3's client and
through the lean signed-GET path, next to `grep -r` over a local copy (page cache dropped).
No door is involved: whatever a door adds comes on top of these numbers.

    python3 scripts/get_floor.py [--profile quick|full] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hsmfs.backend_s3 import S3Backend
from hsmfs.bench.ceph import ceph_cluster
from hsmfs.bench.dataset import PROFILES, source_files
from hsmfs.bench.doors import S3Target
from hsmfs.config import S3Config

BUCKET = "getfloor"


def fetch_all(backend: S3Backend, threads: int) -> float:
    versions = list(backend.list())
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        sizes = list(pool.map(lambda v: len(backend.fetch(v, 0, v.size)), versions))
    seconds = time.perf_counter() - t
    assert sizes == [v.size for v in versions]
    return seconds


def native_grep(tree: Path) -> float:
    subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=True)
    t = time.perf_counter()
    subprocess.run(["grep", "-r", "-c", "-e", "import", str(tree)], stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    files = list(source_files(PROFILES[args.profile].src_packages))
    work = Path(tempfile.mkdtemp(prefix="hsmfs-getfloor-"))
    try:
        local = work / "tree"
        for src, rel in files:
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, local / rel)
        nbytes = sum((local / rel).stat().st_size for _, rel in files)
        with ceph_cluster(work / "ceph", lambda m: print(m, file=sys.stderr)) as ep:
            os.environ.update(AWS_ACCESS_KEY_ID=ep.access_key,
                              AWS_SECRET_ACCESS_KEY=ep.secret_key)
            cfg = S3Config(bucket=BUCKET, endpoint_url=ep.url, region="us-east-1")
            backend = S3Backend(cfg)
            s3 = S3Target(ep.url, BUCKET, "", ep.access_key, ep.secret_key).client()
            s3.create_bucket(Bucket=BUCKET)
            for src, rel in files:
                s3.put_object(Bucket=BUCKET, Key=rel, Body=src.read_bytes())
            boto = S3Backend(S3Config(bucket=BUCKET, endpoint_url=ep.url, region="us-east-1",
                                      lean_get=False))
            rows = [("grep -r, local copy, page cache dropped", lambda: native_grep(local))]
            for name, b in (("boto3 get_object", boto), ("lean signed GET", backend)):
                for threads in (1, 4, 8):
                    rows.append((f"{name}, {threads} at a time",
                                 lambda b=b, n=threads: fetch_all(b, n)))
            print(f"\n{len(files)} files, {nbytes / 1e6:.1f} MB, median of {args.repeat} "
                  f"(Ceph RGW on loopback, {os.cpu_count()} CPUs)\n")
            print("| what | ms |\n|---|---:|")
            for name, fn in rows:
                ms = statistics.median(fn() for _ in range(args.repeat)) * 1e3
                print(f"| {name} | {ms:.0f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
