"""Where `hsmfs archive` of a big file spends its time, step by step, against raw boto3.

Run as root from the repository:
`python3 results/lifecycle/archive_probe.py [MiB] [reps] [main|shape]`.
Starts its own throw-away Ceph RGW (hsmfs.bench.ceph), writes one file of MiB (default 256) with
the bench's writer (same bytes as the archive workload), and times, each `reps` times, in
alternating order, with the file in the page cache (every object is deleted after its sample
and RGW's garbage collection run, so memstore's 4 GiB is never full). `main` (the default)
times boto3, send, send_signed and send_nomd5; `shape` the part-size and thread pairs:

    boto3        boto3 upload_file, hsmfs's upload shape (the bench's raw-S3 reference)
    send         S3Backend.begin_upload + send, what `hsmfs archive` does without daemon and
                 CLI: each part read once into a reused buffer, MD5'd as read, upload_part with
                 Content-MD5 and UNSIGNED-PAYLOAD, an fstat check, HEAD before complete,
                 complete, HEAD (Ceph's complete answers no ETag)
    send_signed  `send` with botocore's default over http: the SHA-256 of every part signed
                 too (what hsmfs did before, on top of the MD5)
    send_nomd5   `send` with the part MD5 replaced by nothing and no Content-MD5 sent (the
                 local ETag is then wrong; the HEAD after still knows the upload by its
                 token): the cost of the one hash, as a bound; not a product mode
    send_p32, boto3_p32, send_p64, boto3_p64   part size 32 / 64 MiB, both sides
    send_t2, boto3_t2   2 part threads, both sides
    read_reuse / read_bytes / read_mmap   no network: the parts read and MD5'd in PART_THREADS
                 threads, into one reused buffer per thread (preadv), into a fresh `bytes` per
                 part (pread), or sliced from an mmap
    md5          one single-threaded MD5 pass over the file (the old snapshot hash, and what
                 a crash recovery costs once)
    cli          `python3 -m hsmfs --help`: interpreter and CLI start-up

Prints one JSON object (medians, the ratio boto3/x per variant from the same run, and every
sample). Product code is only called, not changed (send_nomd5 swaps hashlib.md5 in the
backend module for the duration of its sample, and drops ContentMD5 from its own client).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig

import hsmfs.backend_s3 as b3
from hsmfs.backend_s3 import MULTIPART_THRESHOLD, PART_SIZE, PART_THREADS, S3Backend
from hsmfs.bench import ceph
from hsmfs.bench.doors import S3Target
from hsmfs.bench.workloads import write_file
from hsmfs.config import S3Config

MiB = 1 << 20


def md5_pass(path: Path) -> None:
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb", buffering=0) as f:
        while piece := f.read(4 * MiB):
            h.update(piece)


def read_parts(fd: int, size: int, how: str) -> None:
    """The parts of `send`, read and hashed in PART_THREADS threads, nothing sent."""
    n = -(-size // PART_SIZE)
    local = threading.local()
    mm = mmap.mmap(fd, size, prot=mmap.PROT_READ) if how == "mmap" else None

    def one(i: int) -> None:
        start = i * PART_SIZE
        length = min(PART_SIZE, size - start)
        if how == "reuse":
            buf = getattr(local, "buf", None)
            if buf is None or len(buf) != length:
                buf = local.buf = bytearray(length)
            b3._pread_into(fd, start, memoryview(buf))
            body: Any = buf
        elif how == "bytes":
            body = b3._pread_exactly(fd, start, length)
        else:
            assert mm is not None
            body = mm[start:start + length]  # upload_part needs bytes: a copy, as here
        hashlib.md5(body, usedforsecurity=False).digest()

    with ThreadPoolExecutor(PART_THREADS) as pool:
        list(pool.map(one, range(n)))
    if mm is not None:
        mm.close()


class _NoMD5:
    """hashlib.md5 stand-in for send_nomd5: no work, a fixed digest."""

    def __init__(self, *_a: Any, **_k: Any) -> None:
        pass

    def digest(self) -> bytes:
        return b"\0" * 16

    def hexdigest(self) -> str:
        return "0" * 32


def main() -> int:
    size = int(sys.argv[1]) * MiB if len(sys.argv) > 1 else 256 * MiB
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    group = sys.argv[3] if len(sys.argv) > 3 else "main"
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    samples: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
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
        signed = S3Backend(S3Config(bucket="probe", endpoint_url=ep.url))
        signed._upload_client = signed._client  # payload signing as botocore defaults
        fd = os.open(path, os.O_RDONLY)
        start = os.fstat(fd)

        def check() -> None:
            now = os.fstat(fd)
            if (now.st_size, now.st_mtime_ns, now.st_ctime_ns) != \
                    (start.st_size, start.st_mtime_ns, start.st_ctime_ns):
                raise b3.SourceChanged("changed")

        def send_with(be: S3Backend, part: int = PART_SIZE, threads: int = PART_THREADS
                      ) -> Callable[[str], None]:
            def run(key: str) -> None:
                be.part_size, be.part_threads = part, threads
                up = be.begin_upload(key, size, base=None, mtime=time.time(), mode=0o100644)
                be.send(up, fd, check=check)
            return run

        def boto3_with(part: int = PART_SIZE, threads: int = PART_THREADS
                       ) -> Callable[[str], None]:
            tcfg = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD + 1,
                                  multipart_chunksize=part, max_concurrency=threads)
            return lambda key: client.upload_file(str(path), "probe", key, Config=tcfg)

        bare = S3Backend(S3Config(bucket="probe", endpoint_url=ep.url))
        real_part = bare._upload_client.upload_part
        # No Content-MD5 either: the zero digest of _NoMD5 would be refused (BadDigest).
        bare._upload_client.upload_part = lambda **kw: real_part(  # type: ignore[method-assign]
            **{k: v for k, v in kw.items() if k != "ContentMD5"})

        def nomd5(key: str) -> None:
            real = b3.hashlib.md5
            b3.hashlib.md5 = _NoMD5  # type: ignore[assignment]
            try:
                send_with(bare)(key)
            finally:
                b3.hashlib.md5 = real

        uploads: dict[str, Callable[[str], None]] = {
            "boto3": boto3_with(), "send": send_with(backend),
            "send_signed": send_with(signed), "send_nomd5": nomd5,
        } if group == "main" else {
            "boto3": boto3_with(), "send": send_with(backend),
            "send_p32": send_with(backend, 32 * MiB), "boto3_p32": boto3_with(32 * MiB),
            "send_p64": send_with(backend, 64 * MiB), "boto3_p64": boto3_with(64 * MiB),
            "send_t2": send_with(backend, threads=2), "boto3_t2": boto3_with(threads=2),
        }
        [conf] = (root / "ceph").glob("ceph-*/ceph.conf")

        def collect_garbage() -> None:
            # Deleted objects stay in memstore until RGW's GC runs (hours by default).
            subprocess.run(["radosgw-admin", "-c", str(conf), "gc", "process", "--include-all"],
                           capture_output=True, check=False, timeout=120)
        local: dict[str, Callable[[], None]] = {
            "read_reuse": lambda: read_parts(fd, size, "reuse"),
            "read_bytes": lambda: read_parts(fd, size, "bytes"),
            "read_mmap": lambda: read_parts(fd, size, "mmap"),
            "md5": lambda: md5_pass(path),
            "cli": lambda: subprocess.run([sys.executable, "-m", "hsmfs", "--help"],
                                          capture_output=True, check=True),
        }
        md5_pass(path)  # page cache hot for everyone
        names = list(uploads)
        for i in range(reps):
            order = names if i % 2 == 0 else names[::-1]
            for who in order:
                key = f"{who}-{i}"
                c0, t0 = time.process_time(), time.perf_counter()
                uploads[who](key)
                samples.setdefault(who, []).append(time.perf_counter() - t0)
                cpu.setdefault(who, []).append(time.process_time() - c0)
                client.delete_object(Bucket="probe", Key=key)
                collect_garbage()
                log(f"rep {i} {who}: {samples[who][-1]:.3f} s")
            for who, fn in local.items():
                t0 = time.perf_counter()
                fn()
                samples.setdefault(who, []).append(time.perf_counter() - t0)
        os.close(fd)
    med = {k: statistics.median(v) for k, v in samples.items()}
    ref = {s: med[f"boto3{s}"] for s in ("", "_p32", "_p64", "_t2") if f"boto3{s}" in med}
    ratio = {}
    for k in uploads:
        if k.startswith("send"):
            suffix = next((s for s in ("_p32", "_p64", "_t2") if k.endswith(s)), "")
            ratio[k] = round(ref[suffix] / med[k], 3)
    out = {
        "size_MiB": size // MiB, "reps": reps, "group": group, "host_cpus": os.cpu_count(),
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "MBps": {k: round(size / v / 1e6, 1) for k, v in med.items() if k != "cli"},
        "ratio_vs_boto3_same_shape": ratio,
        "cpu_s_median": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
        "samples_s": {k: [round(x, 3) for x in v] for k, v in samples.items()},
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
