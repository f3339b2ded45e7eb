"""Where creating 2,000 small files through the FUSE door spends its time.

Run as root from the repository: `python3 results/lifecycle/create_probe.py [files]`.
Starts its own throw-away Ceph RGW (hsmfs.bench.ceph) with one object in the served prefix,
mounts the FUSE door (`hsmfs mount`, the bench's options), and creates `files` files of the
bench's tree sizes (4-64 KiB, 25 directories), timing each system call separately:
open(O_CREAT|O_EXCL) / write / close, plus the same on the native backing filesystem. Reports
the FUSE requests the daemon counted (`hsmfs stats --json` "fuse_requests") and its CPU.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hsmfs.bench import ceph
from hsmfs.bench.doors import S3Target, _proc_cpu_s, _unmount
from hsmfs.bench.workloads import child_env

MiB = 1 << 20


def create(top: Path, n: int) -> dict[str, float]:
    rng = random.Random("create-probe")
    sizes = [rng.randint(4096, 65536) for _ in range(n)]
    buf = memoryview(rng.randbytes(65536))
    t = {"open": 0.0, "write": 0.0, "close": 0.0}
    for d in range(25):
        (top / f"d{d:02d}").mkdir(parents=True)
    t0 = time.perf_counter()
    for i, size in enumerate(sizes):
        a = time.perf_counter()
        fd = os.open(top / f"d{i % 25:02d}" / f"f{i:04d}.bin",
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        b = time.perf_counter()
        os.write(fd, buf[:size])
        c = time.perf_counter()
        os.close(fd)
        d_ = time.perf_counter()
        t["open"] += b - a
        t["write"] += c - b
        t["close"] += d_ - c
    total = time.perf_counter() - t0
    return {"total_s": round(total, 3), "files_per_s": round(n / total, 0),
            **{f"{k}_us_per_file": round(v / n * 1e6, 1) for k, v in t.items()}}


def stats(env: dict[str, str], mnt: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "hsmfs", "stats", str(mnt), "--json"], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="create-probe-", dir="/var/tmp") as tmp, \
            ceph.ceph_cluster(Path(tmp) / "ceph", log) as ep:
        root = Path(tmp)
        target = S3Target(ep.url, "probe", "p", ep.access_key, ep.secret_key)
        client = target.client()
        client.create_bucket(Bucket="probe")
        client.put_object(Bucket="probe", Key="p/seed.txt", Body=b"x")
        mnt, cache, native = root / "mnt", root / "cache", root / "native"
        for d in (mnt, cache, native):
            d.mkdir()
        env = {**child_env(), **target.env()}
        subprocess.run([sys.executable, "-m", "hsmfs", "mount", "s3://probe/p", str(mnt), "-o",
                        f"cache={cache},endpoint={ep.url},chunk={8 * MiB}"], env=env, check=True)
        try:
            nat = create(native / "t", n)
            st0 = stats(env, mnt)
            pid = st0.get("pid")
            cpu0 = _proc_cpu_s(pid)
            fuse = create(mnt / "t", n)
            cpu1 = _proc_cpu_s(pid)
            st1 = stats(env, mnt)
        finally:
            _unmount(mnt, 60, log)
        def fuse_requests(st: dict) -> dict:
            f = st.get("fuse", {})
            return f.get("fuse_requests", f) if isinstance(f, dict) else {}

        before = fuse_requests(st0)
        reqs = {k: v - before.get(k, 0) for k, v in fuse_requests(st1).items()
                if isinstance(v, int) and v - before.get(k, 0)}
        cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
        out = {"files": n, "native": nat, "fuse": fuse, "fuse_requests": reqs,
               "fuse_requests_per_file": round(sum(reqs.values()) / n, 2),
               "daemon_cpu_s": cpu,
               "daemon_cpu_ms_per_file": None if cpu is None else round(cpu / n * 1000, 2),
               "daemon_cpu_us_per_request": None if cpu is None or not reqs else round(
                   cpu / sum(reqs.values()) * 1e6, 0),
               "fuse_stats": st1.get("fuse")}
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
