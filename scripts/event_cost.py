#!/usr/bin/env python3
"""Measure the kernel door's cost per fanotify event round trip (as root).

A partly resident stub stays guarded, so every read of it raises a FAN_PRE_ACCESS event even
where the bytes are already local: the holder relays it to the worker, the core finds the
range resident, and the answer is FAN_ALLOW.  The cost of that round trip is the time of a
4 KiB pread of a resident page of such a file minus the time of the same pread of an
unguarded file.  Starts its own moto server; everything it starts it stops.

    python3 scripts/event_cost.py [--reads 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import AWS_ENV, Bucket, MotoServer, seeded


def pread_loop(path: Path, reads: int) -> list[float]:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, 4096, 0)
        out = []
        for _ in range(reads):
            t = time.perf_counter()
            os.pread(fd, 4096, 0)
            out.append((time.perf_counter() - t) * 1e6)
        return out
    finally:
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reads", type=int, default=5000)
    args = ap.parse_args()
    os.environ.update(AWS_ENV)
    server = MotoServer().start()
    work = Path(tempfile.mkdtemp(prefix="hsmfs-event-cost-"))
    cache = work / "cache"
    daemon = None
    try:
        bucket = Bucket(server.client(), "events")
        data = bucket.put("partial.bin", seeded(4 << 20, "events"))
        plain = work / "plain.bin"
        plain.write_bytes(data)
        daemon = subprocess.Popen(
            [sys.executable, "-m", "hsmfs", "serve", "-f", "s3://events", str(cache), "-o",
             f"endpoint={server.endpoint},open_fill=off,small_file=0,chunk=64K,readahead=64K,"
             "cover=off"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while subprocess.run([sys.executable, "-m", "hsmfs", "stats", "--json", str(cache)],
                             capture_output=True).returncode != 0:
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise RuntimeError("hsmfs serve did not start")
            time.sleep(0.1)
        stub = cache / "partial.bin"

        def events() -> int:
            out = subprocess.run([sys.executable, "-m", "hsmfs", "stats", "--json", str(cache)],
                                 capture_output=True, text=True, timeout=20)
            return sum(json.loads(out.stdout)["kernel"]["events"].values())

        pread_loop(stub, 10)  # page 0 becomes resident; the file stays partial
        before = events()
        guarded = pread_loop(stub, args.reads)
        raised = events() - before
        native = pread_loop(plain, args.reads)
        g, n = statistics.median(guarded), statistics.median(native)
        print(f"reads: {args.reads}, events raised: {raised} ({raised / args.reads:.2f} per read)")
        print(f"pread 4 KiB, unguarded file: p50 {n:.1f} us")
        print(f"pread 4 KiB, guarded resident page: p50 {g:.1f} us, "
              f"p99 {sorted(guarded)[int(0.99 * len(guarded))]:.1f} us")
        print(f"event round trip (holder -> worker -> core -> answer): {g - n:.1f} us")
        return 0
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.terminate()
            try:
                daemon.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, 9)
        server.stop()
        subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    sys.exit(main())
