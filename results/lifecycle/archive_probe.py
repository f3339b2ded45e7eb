"""Where `hsmfs archive` of a big file spends its time, step by step, against raw boto3.

Run as root from the repository: `python3 results/lifecycle/archive_probe.py [MiB] [reps]`.
Starts its own throw-away Ceph RGW (hsmfs.bench.ceph), writes one file of MiB (default 256) with
the bench's writer (same bytes as the archive workload), and times, each `reps` times, in
alternating order, with the file in the page cache:

    md5        one MD5 pass over the file in 4 MiB reads, single-threaded (what plan_upload does)
    plan       S3Backend.plan_upload: the snapshot hash `hsmfs archive` makes before it sends
    put        S3Backend.put of that plan: the parts re-read and re-hashed as sent, upload_part
               with Content-MD5, HEAD before complete, complete, HEAD (no daemon, no CLI)
    boto3      boto3 upload_file, hsmfs's upload shape (the bench's raw-S3 reference)
    cli        `python3 -m hsmfs --help`: interpreter and CLI start-up

Prints one JSON object (medians and every sample). Product code is only called, not changed.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from boto3.s3.transfer import TransferConfig

from hsmfs.backend_s3 import MULTIPART_THRESHOLD, PART_SIZE, PART_THREADS, S3Backend
from hsmfs.bench import ceph
from hsmfs.bench.doors import S3Target
from hsmfs.bench.workloads import write_file
from hsmfs.config import S3Config

MiB = 1 << 20


def md5_pass(path: Path) -> None:
    import hashlib

    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb", buffering=0) as f:
        while piece := f.read(4 * MiB):
            h.update(piece)


def main() -> int:
    size = int(sys.argv[1]) * MiB if len(sys.argv) > 1 else 256 * MiB
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    samples: dict[str, list[float]] = {k: [] for k in ("md5", "plan", "put", "boto3", "cli")}
    cpu: dict[str, list[float]] = {"put": [], "boto3": []}
    with tempfile.TemporaryDirectory(prefix="archive-probe-", dir="/var/tmp") as tmp, \
            ceph.ceph_cluster(Path(tmp) / "ceph", log) as ep:
        root = Path(tmp)
        params = {"path": "probe.bin", "size": size, "seed": 1}
        write_file(root, params)
        path = root / "probe.bin"
        target = S3Target(ep.url, "probe", "", ep.access_key, ep.secret_key)
        client = target.client(pool=PART_THREADS + 2)
        client.create_bucket(Bucket="probe")
        os.environ.update(AWS_ACCESS_KEY_ID=ep.access_key, AWS_SECRET_ACCESS_KEY=ep.secret_key)
        backend = S3Backend(S3Config(bucket="probe", endpoint_url=ep.url))
        tcfg = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD + 1,
                              multipart_chunksize=PART_SIZE, max_concurrency=PART_THREADS)
        fd = os.open(path, os.O_RDONLY)
        md5_pass(path)  # page cache hot for everyone
        for i in range(reps):
            order = ("hsmfs", "boto3") if i % 2 == 0 else ("boto3", "hsmfs")
            for who in order:
                c0 = time.process_time()
                t0 = time.perf_counter()
                if who == "boto3":
                    client.upload_file(str(path), "probe", f"boto3-{i}", Config=tcfg)
                    samples["boto3"].append(time.perf_counter() - t0)
                    cpu["boto3"].append(time.process_time() - c0)
                    continue
                plan = backend.plan_upload(fd, size)
                t1 = time.perf_counter()
                samples["plan"].append(t1 - t0)
                c1 = time.process_time()
                backend.put(f"hsmfs-{i}", fd, plan, base=None, mtime=time.time(), mode=0o100644)
                samples["put"].append(time.perf_counter() - t1)
                cpu["put"].append(time.process_time() - c1)
            t = time.perf_counter()
            md5_pass(path)
            samples["md5"].append(time.perf_counter() - t)
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "hsmfs", "--help"], capture_output=True,
                           check=True)
            samples["cli"].append(time.perf_counter() - t)
        os.close(fd)
    med = {k: statistics.median(v) for k, v in samples.items() if v}
    out = {
        "size_MiB": size // MiB, "reps": reps, "host_cpus": os.cpu_count(),
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "MBps": {k: round(size / v / 1e6, 1) for k, v in med.items() if k != "cli"},
        "cpu_s_median": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
        "samples_s": {k: [round(x, 3) for x in v] for k, v in samples.items()},
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
