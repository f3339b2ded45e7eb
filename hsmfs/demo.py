"""``hsmfs demo``: the README's main job, end to end, in about a minute.

Starts an embedded S3 server (moto) with sample data unless ``--endpoint``/``--bucket`` name a
real one, serves the bucket through the FUSE door and (where the kernel has pre-content events)
the kernel door, runs the same unaware programs through each — ``cat``, ``sha256sum``, an ELF
binary, ``sqlite3``, ``grep -r`` — checks every byte against S3, and prints what happened: objects,
bytes fetched, S3 requests, time, side by side.  Everything it starts it stops, by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20
DEMO_BUCKET = "hsmfs-demo"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _client(endpoint: str | None):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"},
                                      request_checksum_calculation="when_required",
                                      response_checksum_validation="when_required"))


@contextlib.contextmanager
def embedded_s3() -> Iterator[str]:
    """moto in server mode, in its own process, on a free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "demo")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "demo")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the embedded S3 server (moto) did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _seeded(n: int, seed: str) -> bytes:
    return random.Random(seed).randbytes(n)


def upload_sample(client, bucket: str, workdir: Path) -> None:
    """A small world: a big file, a source tree, a binary, a database, some text."""
    client.create_bucket(Bucket=bucket)
    put = lambda key, body, **kw: client.put_object(Bucket=bucket, Key=key, Body=body, **kw)  # noqa: E731
    put("README.txt", b"Objects from S3, read as local files by programs that never heard of S3.\n")
    put("data/big.bin", _seeded(48 * MiB, "big"))
    tool = shutil.which("sha256sum") or "/usr/bin/sha256sum"
    put("bin/sha256sum", Path(tool).read_bytes(), Metadata={"mode": str(0o100755)})
    db = workdir / "shop.db"
    con = sqlite3.connect(db)
    con.execute("create table orders (id integer primary key, customer text, cents integer)")
    rng = random.Random(1)
    con.executemany("insert into orders values (?, ?, ?)",
                    [(i, f"customer-{rng.randrange(500)}", rng.randrange(100, 100_000))
                     for i in range(50_000)])
    con.commit()
    con.close()
    put("db/shop.sqlite", db.read_bytes())
    src = Path(os.__file__).parent
    n = 0
    for pkg in ("json", "email", "http", "urllib", "logging", "asyncio"):
        for path in sorted((src / pkg).rglob("*.py")):
            put(f"src/{path.relative_to(src)}", path.read_bytes())
            n += 1
    say(f"  uploaded sample data: 48 MiB binary, {n} Python sources, an ELF binary, "
        "a 50,000-row SQLite database")


@dataclass
class Door:
    name: str
    root: Path
    cache: Path
    stop_cmd: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    s3_bytes: dict[str, int] = field(default_factory=dict)


def _hsmfs(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hsmfs", *args], capture_output=True,
                          text=True, timeout=timeout)


def _stats(cache: Path) -> dict:
    out = _hsmfs("stats", "--json", str(cache), timeout=30)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def precontent_available() -> bool:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.fanotify_init(0x08 | 0x01, os.O_RDONLY)
    if fd < 0:
        return False
    os.close(fd)
    return True


def expected_digests(client, bucket: str, prefix: str) -> dict[str, str]:
    """What S3 holds: digests of every object, read straight from S3 (the raw reference)."""
    digests = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if key.endswith("/"):
                continue
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            digests[key[len(prefix):]] = hashlib.sha256(body).hexdigest()
    return digests


def run_workloads(door: Door, digests: dict[str, str]) -> list[str]:
    """The same unaware programs through one door; returns the problems found."""
    problems = []

    def timed(label: str, fn) -> object:
        before = _stats(door.cache).get("fetched_bytes", 0)
        t = time.perf_counter()
        result = fn()
        door.timings[label] = time.perf_counter() - t
        door.s3_bytes[label] = _stats(door.cache).get("fetched_bytes", 0) - before
        return result

    def sha(rel: str) -> str:
        out = subprocess.run(["sha256sum", str(door.root / rel)], capture_output=True,
                             timeout=300)
        return out.stdout.split()[0].decode() if out.returncode == 0 else f"error {out.stderr!r}"

    if "data/big.bin" in digests:
        for label in ("big file, cold", "big file, warm"):
            got = timed(label, lambda: sha("data/big.bin"))
            if got != digests["data/big.bin"]:
                problems.append(f"{door.name}: data/big.bin digest {got}")
    if "bin/sha256sum" in digests:
        out = timed("ELF binary", lambda: subprocess.run(
            [str(door.root / "bin/sha256sum"), "--version"], capture_output=True, timeout=60))
        if out.returncode != 0:  # type: ignore[attr-defined]
            problems.append(f"{door.name}: bin/sha256sum did not run: {out}")
    if "db/shop.sqlite" in digests:
        uri = f"file:{door.root / 'db/shop.sqlite'}?immutable=1"
        out = timed("sqlite3 query", lambda: subprocess.run(
            ["sqlite3", uri, "select count(*), sum(cents) from orders where customer "
             "like 'customer-4%';"], capture_output=True, text=True, timeout=60))
        if out.returncode != 0:  # type: ignore[attr-defined]
            problems.append(f"{door.name}: sqlite3 failed: {out}")
    if any(k.startswith("src/") for k in digests):
        timed("grep -r source tree", lambda: subprocess.run(
            ["grep", "-rc", "def ", str(door.root / "src")], capture_output=True, timeout=120))
    bad = timed("verify every file", lambda: [k for k, v in digests.items() if sha(k) != v])
    problems += [f"{door.name}: {k} differs from S3" for k in bad]  # type: ignore[union-attr]
    return problems


@contextlib.contextmanager
def start_door(kind: str, source: str, work: Path, endpoint: str | None) -> Iterator[Door]:
    cache = work / f"cache-{kind}"
    opts = f"endpoint={endpoint}" if endpoint else ""
    if kind == "fuse":
        mnt = work / "mnt"
        mnt.mkdir()
        t = time.perf_counter()
        out = _hsmfs("mount", source, str(mnt), "-o", ",".join(filter(None, [
            f"cache={cache}", opts])))
        door = Door("FUSE door", mnt, cache, ["umount", str(mnt)])
    else:
        t = time.perf_counter()
        out = _hsmfs("serve", source, str(cache), *(["-o", opts] if opts else []))
        door = Door("kernel door", cache, cache,
                    [sys.executable, "-m", "hsmfs", "stop", str(cache)])
    if out.returncode != 0:
        raise RuntimeError(f"hsmfs {kind} failed:\n{out.stderr}")
    say(f"  {door.name}: {out.stderr.strip().removeprefix('hsmfs: ')} "
        f"({time.perf_counter() - t:.1f} s)")
    try:
        yield door
    finally:
        subprocess.run(door.stop_cmd, capture_output=True, timeout=60)
        if kind == "fuse":
            subprocess.run(["fusermount3", "-u", "-z", str(door.root)], capture_output=True)
        else:
            from .cover import uncover

            with contextlib.suppress(OSError):
                uncover(door.root)  # the stop covered the tree (hsmfs.cover); the demo is done


def demo_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hsmfs demo", description=__doc__.split("\n")[0])
    p.add_argument("--endpoint", help="S3 endpoint URL (default: an embedded moto server)")
    p.add_argument("--bucket", help="existing bucket to serve (default: sample data)")
    p.add_argument("--prefix", default="")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="hsmfs-demo-"))
    say(f"hsmfs demo (work directory {work})")
    try:
        with contextlib.ExitStack() as stack:
            endpoint = args.endpoint
            bucket = args.bucket
            if bucket is None:
                if endpoint is None:
                    endpoint = stack.enter_context(embedded_s3())
                    say(f"  embedded S3 server (moto) at {endpoint}")
                bucket = DEMO_BUCKET
                upload_sample(_client(endpoint), bucket, work)
            prefix = args.prefix.strip("/") + "/" if args.prefix.strip("/") else ""
            source = f"s3://{bucket}/{prefix}".rstrip("/")
            t = time.perf_counter()
            digests = expected_digests(_client(endpoint), bucket, prefix)
            raw_s = time.perf_counter() - t
            total = sum(1 for _ in digests)
            say(f"  {source}: {total} objects; reading all of them straight from S3 took "
                f"{raw_s:.2f} s (the raw reference)")
            kinds = ["fuse"] + (["kernel"] if precontent_available() else [])
            if "kernel" not in kinds:
                say("  (this kernel has no fanotify pre-content events: kernel door skipped)")
            doors: list[Door] = []
            problems: list[str] = []
            for kind in kinds:
                with start_door(kind, source, work, endpoint) as door:
                    problems += run_workloads(door, digests)
                    stats = _stats(door.cache)
                    say(f"  {door.name}: {stats.get('s3_requests', '?')} S3 requests, "
                        f"{stats.get('fetched_bytes', 0) / MiB:.1f} MiB fetched, "
                        f"{stats.get('served_bytes', 0) / MiB:.1f} MiB served")
                    doors.append(door)
            print_table(doors)
            if problems:
                say("PROBLEMS:\n  " + "\n  ".join(problems))
                return 1
            say(f"every byte of all {total} objects matched S3 through "
                + " and ".join(d.name for d in doors) + ".")
            return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def print_table(doors: list[Door]) -> None:
    labels = list(dict.fromkeys(label for d in doors for label in d.timings))
    head = "| workload | " + " | ".join(f"{d.name} s | S3 MiB" for d in doors) + " |"
    print(head)
    print("|" + "---|" * (1 + 2 * len(doors)))
    for label in labels:
        cells = []
        for d in doors:
            cells.append(f"{d.timings.get(label, float('nan')):.3f}")
            cells.append(f"{d.s3_bytes.get(label, 0) / MiB:.1f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
