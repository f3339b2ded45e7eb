#!/usr/bin/env python3
"""How deep does sequential read-ahead keep the GETs when S3 is far away?  (issue 15)

A cold sequential read of one large object through the kernel door, behind the bench's
latency proxy (first-byte latency and a per-connection cap, as `hsmfs bench --profile
network`), beside raw S3 reading the same object as 8 MiB ranged GETs, 16 at a time.  For each
set of door options: the door's MB/s, its ratio to raw S3 in the same round, and the mean
number of its GETs in flight (from the daemon's flight trace, ``HSMFS_TRACE_FLIGHTS``).
Rounds alternate the option sets, so a loaded machine's drift hits them alike.

    python3 scripts/readahead_depth.py --endpoint http://127.0.0.1:7480 \\
        --options readahead=64M readahead=128M readahead=256M --rounds 3 \
        --out results/network/readahead

Credentials come from the AWS environment (Ceph's bench user: hsmfsaccesskey/hsmfssecretkey).
It makes its own bucket, and stops every process it starts by PID.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
from botocore.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hsmfs.bench.latency_proxy import ProxyConfig, ProxyThread

MiB = 1 << 20
GET = 8 * MiB
RAW_CONCURRENCY = 16


def raw_read(client, bucket: str, key: str, size: int) -> float:
    """MB/s of raw S3: every 8 MiB range at once, 16 in flight (what the door's read-ahead
    is measured against)."""
    def get(at: int) -> int:
        body = client.get_object(Bucket=bucket, Key=key,
                                 Range=f"bytes={at}-{min(at + GET, size) - 1}")["Body"]
        return len(body.read())

    started = time.monotonic()
    with cf.ThreadPoolExecutor(RAW_CONCURRENCY) as pool:
        got = sum(pool.map(get, range(0, size, GET)))
    assert got == size
    return size / (time.monotonic() - started) / 1e6


def mean_in_flight(trace: Path) -> tuple[float, int]:
    """Time-weighted mean of flights between take-off and landing, and the flight count."""
    events = []
    rows = [line.split() for line in trace.read_text().splitlines() if line.strip()]
    for _start, _stop, off, landed, _pf in rows:
        events += [(float(off), 1), (float(landed), -1)]
    events.sort()
    area, now, last = 0.0, 0, events[0][0]
    for t, step in events:
        area += now * (t - last)
        last, now = t, now + step
    return area / max(events[-1][0] - events[0][0], 1e-9), len(rows)


def door_read(endpoint: str, bucket: str, size: int, options: str, work: Path) -> dict:
    """One cold read of the object through a fresh kernel door; its MB/s and depth."""
    cache, trace, log = work / "cache", work / "trace.txt", work / "door.log"
    shutil.rmtree(cache, ignore_errors=True)
    trace.unlink(missing_ok=True)
    opts = ",".join(o for o in (f"endpoint={endpoint}", options) if o)
    env = {**os.environ, "HSMFS_TRACE_FLIGHTS": str(trace)}
    with open(log, "wb") as out:
        door = subprocess.Popen([sys.executable, "-m", "hsmfs", "serve", "-f",
                                 f"s3://{bucket}", str(cache), "-o", opts], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "ready" not in log.read_text(errors="replace"):
            if door.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the door did not start:\n{log.read_text()}")
            time.sleep(0.05)
        started = time.monotonic()
        subprocess.run(["dd", f"if={cache}/big.bin", "of=/dev/null", "bs=1M"], check=True,
                       capture_output=True, timeout=600)
        mbps = size / (time.monotonic() - started) / 1e6
    finally:
        door.send_signal(signal.SIGTERM)
        try:
            door.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(door.pid, signal.SIGKILL)
            door.wait(10)
        subprocess.run([sys.executable, "-m", "hsmfs.cover", "uncover", str(cache)],
                       capture_output=True, timeout=30)
    depth, flights = mean_in_flight(trace)
    return {"options": options, "door_MBps": round(mbps, 1), "mean_in_flight": round(depth, 2),
            "flights": flights}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--endpoint", required=True, help="the S3 server (Ceph RGW)")
    ap.add_argument("--ttfb-ms", default="150", help="first-byte latency, N or LO:HI")
    ap.add_argument("--bw-MBps", type=float, default=90.0, help="per-connection cap")
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--options", nargs="+",
                    default=["readahead=64M", "readahead=128M", "readahead=256M"],
                    help="door option sets to compare ('' = the defaults)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write results.json here")
    args = ap.parse_args()

    up = args.endpoint.removeprefix("http://").split(":")
    s3 = boto3.client("s3", endpoint_url=args.endpoint)
    bucket = f"ra-depth-{os.getpid()}"
    size = args.size_mb * MiB
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="big.bin", Body=os.urandom(size))
    proxy = ProxyThread(ProxyConfig(up[0], int(up[1]), ttfb_ms=args.ttfb_ms,
                                    bw_mbps=args.bw_MBps)).start()
    endpoint = f"http://127.0.0.1:{proxy.port}"
    client = boto3.client("s3", endpoint_url=endpoint,
                          config=Config(max_pool_connections=2 * RAW_CONCURRENCY))
    rows = []
    work = Path(tempfile.mkdtemp(prefix="hsmfs-ra."))
    try:
        for rnd in range(args.rounds):
            for options in args.options:
                raw = raw_read(client, bucket, "big.bin", size)
                row = door_read(endpoint, bucket, size, options, work)
                row.update(round=rnd, raw_MBps=round(raw, 1),
                           ratio=round(row["door_MBps"] / raw, 2),
                           load=round(os.getloadavg()[0], 1))
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        client.close()  # its kept-alive connections first: the proxy then stops quietly
        proxy.stop()
        shutil.rmtree(work, ignore_errors=True)
        s3.delete_object(Bucket=bucket, Key="big.bin")
        s3.delete_bucket(Bucket=bucket)
    for options in args.options:
        mine = [r for r in rows if r["options"] == options]
        ratios = sorted(r["ratio"] for r in mine)
        print(f"{options or 'defaults':>16}: ratio to raw S3 median {ratios[len(ratios) // 2]}"
              f" (runs {ratios}), mean GETs in flight "
              f"{sum(r['mean_in_flight'] for r in mine) / len(mine):.1f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(
            {"ttfb_ms": args.ttfb_ms, "bw_MBps": args.bw_MBps, "size_mb": args.size_mb,
             "raw_concurrency": RAW_CONCURRENCY, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
