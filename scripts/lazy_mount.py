#!/usr/bin/env python3
"""``-o lazy`` at scale (issue 12, item 4): mount time and the first ``ls`` of a deep path,
eager vs lazy, on a bucket of N objects.

The FUSE door (``hsmfs mount -f``) of one bucket, each mode on a fresh (empty) cache:

* ``mount s``: command start to the daemon's ``ready`` line;
* ``first ls s``: ``ls -l`` of a deep directory (three levels down) just after, and a ``cat``
  of one file in it checked against S3's bytes;
* the ListObjectsV2 (and HEAD) requests the daemon sent by then (``hsmfs stats``);
* ``restart s``: stop, mount again over the same cache (lazy: adopts, lists nothing).

S3 is an embedded moto server (slow to fill: ~150 objects/s on 2 shared vCPUs, so the default
is N=20,000 rather than 100,000) or any server given with ``--endpoint`` (credentials from the
environment).  Both modes use ``-o head=0`` unless ``--head``: a HEAD per object would dominate
the eager start and say nothing about listing.

As root, from the source tree:

    python3 scripts/lazy_mount.py [--objects 20000] [--dirs 2000] [--endpoint URL]

Writes ``results/lazy/lazy-N.json`` and ``lazy-N.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results" / "lazy"
ENV = dict(os.environ, PYTHONPATH=str(REPO))


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def client(url: str) -> Any:
    return boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"},
                                      max_pool_connections=32,
                                      request_checksum_calculation="when_required",
                                      response_checksum_validation="when_required"))


def keys(n: int, dirs: int) -> list[str]:
    """``n`` keys in ``dirs`` leaf directories three levels down (``aNN/bNNN/cNN/f.bin``)."""
    top = max(1, round(dirs ** (1 / 3)))
    out = []
    for i in range(n):
        d = i % dirs
        out.append(f"a{d % top:02d}/b{d // top % top:03d}/c{d // top // top:02d}/f{i:06d}.bin")
    return out


def body(key: str) -> bytes:
    return random.Random(key).randbytes(random.Random(key).randint(100, 4096))


def seed(s3: Any, bucket: str, ks: list[str]) -> float:
    started = time.monotonic()
    with contextlib.suppress(Exception):
        s3.create_bucket(Bucket=bucket)
    have = sum(p.get("KeyCount", 0) for p in s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket))
    if have >= len(ks):
        say(f"bucket {bucket} holds {have} objects already")
        return 0.0
    done = [0]

    def put(k: str) -> None:
        s3.put_object(Bucket=bucket, Key=k, Body=body(k))
        done[0] += 1
        if done[0] % 2000 == 0:
            say(f"  {done[0]}/{len(ks)} put")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, ks))
    return time.monotonic() - started


def stats(cache: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "hsmfs", "stats", "--json", str(cache)],
                         capture_output=True, text=True, timeout=60, env=ENV)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def requests(st: dict[str, Any], kind: str) -> int:
    return sum(st.get("s3_requests_by", {}).get(kind, {}).values())


class Mount:
    def __init__(self, source: str, endpoint: str, work: Path, opts: list[str]) -> None:
        self.mnt = work / "mnt"
        self.cache = work / "cache"
        self.log = work / "mount.log"
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.cmd = [sys.executable, "-m", "hsmfs", "mount", "-f", source, str(self.mnt), "-o",
                    ",".join([f"cache={self.cache}", f"endpoint={endpoint}", *opts])]
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        self.log.write_bytes(b"")
        started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdout=open(self.log, "ab"),  # noqa: SIM115
                                     stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
        while b": ready: " not in self.log.read_bytes():
            if self.proc.poll() is not None:
                raise RuntimeError(self.log.read_text(errors="replace"))
            time.sleep(0.01)
        return time.monotonic() - started

    def stop(self) -> None:
        subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True, timeout=30)
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None


def run_mode(mode: str, source: str, endpoint: str, work: Path, deep: str, sample: str,
             expected: bytes, head: bool) -> dict[str, Any]:
    shutil.rmtree(work, ignore_errors=True)
    opts = [] if head else ["head=0"]
    if mode == "lazy":
        opts.append("lazy")
    m = Mount(source, endpoint, work, opts)
    row: dict[str, Any] = {"mode": mode, "options": ",".join(opts)}
    try:
        row["mount_s"] = round(m.start(), 3)
        st = stats(m.cache)
        row["lists_at_ready"] = requests(st, "list")
        row["heads_at_ready"] = requests(st, "head")
        started = time.monotonic()
        out = subprocess.run(["ls", "-l", str(m.mnt / deep)], capture_output=True, timeout=600)
        assert out.returncode == 0, out.stderr
        data = (m.mnt / sample).read_bytes()
        row["first_ls_s"] = round(time.monotonic() - started, 3)
        assert data == expected, f"{sample}: bytes differ from S3's"
        row["entries"] = len(out.stdout.splitlines()) - 1
        st = stats(m.cache)
        row["lists_after_ls"] = requests(st, "list")
        row["dirs_listed"] = st.get("lazy", {}).get("dirs_listed")
        m.stop()
        row["restart_s"] = round(m.start(), 3)
        row["lists_at_restart"] = requests(stats(m.cache), "list")
        started = time.monotonic()
        out = subprocess.run(["ls", "-l", str(m.mnt / deep)], capture_output=True, timeout=600)
        assert out.returncode == 0
        assert (m.mnt / sample).read_bytes() == expected
        row["ls_after_restart_s"] = round(time.monotonic() - started, 3)
        row["lists_after_restart_ls"] = requests(stats(m.cache), "list")
    finally:
        m.stop()
    say(f"{mode}: {row}")
    return row


def markdown(result: dict[str, Any]) -> str:
    lines = [f"N = {result['objects']:,} objects in {result['dirs']:,} leaf directories "
             f"(three levels), {result['s3']}; deep path `{result['deep']}`.", "",
             "| mode | options | mount s | LIST at ready | first `ls -l` + `cat` s | LIST after | "
             "restart s | LIST at restart |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['mode']} | `{r['options']}` | {r['mount_s']} | {r['lists_at_ready']}"
                     f" | {r['first_ls_s']} | {r['lists_after_ls']} | {r['restart_s']} | "
                     f"{r['lists_at_restart']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=20_000)
    ap.add_argument("--dirs", type=int, default=1000)
    ap.add_argument("--endpoint", help="an S3 server (default: an embedded moto)")
    ap.add_argument("--bucket", default=None)
    ap.add_argument("--head", action="store_true", help="keep -o head (default head=0)")
    args = ap.parse_args()
    moto = None
    endpoint = args.endpoint
    if endpoint is None:
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1")
        ENV.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                   AWS_DEFAULT_REGION="us-east-1")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                 str(port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(300):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.1)
    bucket = args.bucket or f"lazy-{args.objects}"
    try:
        s3 = client(endpoint)
        ks = keys(args.objects, args.dirs)
        say(f"seeding {len(ks)} objects into {bucket} at {endpoint}")
        seed_s = seed(s3, bucket, ks)
        sample = ks[-1]
        deep = os.path.dirname(sample)
        expected = body(sample)
        work = Path(tempfile.mkdtemp(prefix="lazy-mount-"))
        rows = [run_mode(mode, f"s3://{bucket}", endpoint, work / mode, deep, sample, expected,
                         args.head) for mode in ("eager", "lazy")]
        result = {"objects": args.objects, "dirs": args.dirs, "deep": deep,
                  "s3": "embedded moto" if moto else endpoint, "seed_s": round(seed_s, 1),
                  "when": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), "rows": rows}
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"lazy-{args.objects}.json").write_text(json.dumps(result, indent=1) + "\n")
        (RESULTS / f"lazy-{args.objects}.md").write_text(markdown(result))
        print(markdown(result))
        shutil.rmtree(work, ignore_errors=True)
    finally:
        if moto is not None:
            os.killpg(moto.pid, signal.SIGTERM)
            moto.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
