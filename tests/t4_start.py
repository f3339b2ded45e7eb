"""Start-up over a large listing (issue 12, item 5): what a start asks S3.

A start HEADs (for the mode, ``x-amz-meta-mode``) only objects whose path does not already hold
a stub of the listed ETag, from at most ``max_connections`` tasks: a restart over a tree that
holds every version sends no HEAD at all.  Real parts: a moto S3 server over loopback HTTP
behind the counting proxy, ``hsmfs mount -f`` as a subprocess (the FUSE door: no cover is left
behind), modes read through the mount.  Every daemon is stopped by PID and unmounted.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    Bucket,
    file_sha256,
    force_unmount,
    is_mounted,
    seeded,
    sha256,
    stop_process,
)
from support.doors import serve_door

pytestmark = [pytest.mark.needs_fuse, pytest.mark.timeout(180)]


def test_restart_heads_only_new_and_changed_objects(bucket: Bucket, fault_proxy,
                                                    tmp_path: Path) -> None:
    n = 40  # more than the 4 connections below: the workers are reused, never one per object
    data = {f"d{i % 4}/f{i}.bin": bucket.put(f"d{i % 4}/f{i}.bin", seeded(100 + i, str(i)),
                                             mode=0o100640 if i % 2 else 0o100750)
            for i in range(n)}
    bucket.client.put_object(Bucket=bucket.name, Key="d0/", Body=b"")  # a directory marker
    opts = ("connections=4", "attr_timeout=0")
    with serve_door("fuse", f"s3://{bucket.name}", tmp_path / "w", fault_proxy.endpoint,
                    *opts) as d:
        assert fault_proxy.count("HEAD") == n  # a first start asks every object, no marker
        assert stat.S_IMODE(os.stat(d.root / "d1/f1.bin").st_mode) == 0o640
        assert stat.S_IMODE(os.stat(d.root / "d0/f0.bin").st_mode) == 0o750
        assert file_sha256(d.root / "d1/f1.bin") == sha256(data["d1/f1.bin"])

    # While no daemon runs: one object changes (and its mode), one is new, one is gone.
    data["d2/f2.bin"] = bucket.put("d2/f2.bin", seeded(999, "new version"), mode=0o100600)
    data["d3/new.bin"] = bucket.put("d3/new.bin", seeded(77, "new"), mode=0o100700)
    bucket.delete("d3/f3.bin")
    del data["d3/f3.bin"]
    fault_proxy.reset_counts()
    with serve_door("fuse", f"s3://{bucket.name}", tmp_path / "w", fault_proxy.endpoint,
                    *opts) as d:
        heads = [s for s in fault_proxy.seen if s.method == "HEAD"]
        assert sorted(s.path.split("?")[0].split("/", 2)[2] for s in heads) == \
            ["d2/f2.bin", "d3/new.bin"], heads
        assert stat.S_IMODE(os.stat(d.root / "d2/f2.bin").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(d.root / "d3/new.bin").st_mode) == 0o700
        assert stat.S_IMODE(os.stat(d.root / "d0/f0.bin").st_mode) == 0o750  # kept, unasked
        assert not (d.root / "d3/f3.bin").exists()
        for key, body in data.items():
            assert file_sha256(d.root / key) == sha256(body), key


def test_stubs_are_made_while_the_listing_still_arrives(bucket: Bucket, fault_proxy,
                                                        tmp_path: Path) -> None:
    """Issue 12, item 5: listing pages are processed as they arrive, stubs included.  The
    second page of the listing is held back; the first page's stubs must exist in the backing
    tree while the daemon still waits for it, and the start must end with every object."""
    keys = [f"k/{i:05d}" for i in range(1003)]  # two pages of 1,000
    client = bucket.client
    for k in keys:
        client.put_object(Bucket=bucket.name, Key=k, Body=k.encode())
    # Long enough that 999 stubs are placed before it ends, even on a loaded machine (and
    # under the daemon's 30 s read timeout).
    fault_proxy.set_delay(12000, method="GET", match="continuation-token")
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    mnt.mkdir()
    log = open(tmp_path / "fuse.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "hsmfs", "mount", "-f", f"s3://{bucket.name}", str(mnt), "-o",
         f"cache={cache},endpoint={fault_proxy.endpoint},head=0"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        # 00998: the page's last key waits for the next one ("k/00999/..." could follow).
        while not (cache / "k" / "00998").exists():
            assert proc.poll() is None, (tmp_path / "fuse.log").read_text()
            assert time.monotonic() < deadline, "no stub of the first page appeared"
            time.sleep(0.05)
        # The first page is placed, and the second one is still held back by the proxy.
        assert not is_mounted(mnt)
        assert not (cache / "k" / "01000").exists()
        deadline = time.monotonic() + 60
        while not is_mounted(mnt):
            assert proc.poll() is None, (tmp_path / "fuse.log").read_text()
            assert time.monotonic() < deadline, "the mount never came up"
            time.sleep(0.05)
        assert sorted(p.name for p in (mnt / "k").iterdir()) == [k[2:] for k in keys]
        assert (mnt / "k" / "01002").read_bytes() == b"k/01002"
    finally:
        fault_proxy.set_delay(0)
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=10)
        stop_process(proc, timeout=10)
        force_unmount(mnt)
        log.close()


def test_a_listing_cut_short_removes_nothing(bucket: Bucket, fault_proxy,
                                             tmp_path: Path) -> None:
    """Stubs are placed while the listing arrives, but a path the listing does not name is a
    remote delete only once the listing is whole: a start whose second page fails ends with
    the listing's error and leaves every stub of the first start in place."""
    keys = [f"k/{i:05d}" for i in range(1003)]
    for k in keys:
        bucket.client.put_object(Bucket=bucket.name, Key=k, Body=k.encode())
    with serve_door("fuse", f"s3://{bucket.name}", tmp_path / "w", fault_proxy.endpoint,
                    "head=0"):
        pass
    cache = tmp_path / "w" / "cache"
    assert len(list((cache / "k").iterdir())) == 1003
    fault_proxy.fail_next(1000, status=403, code="AccessDenied", match="continuation-token")
    (tmp_path / "mnt2").mkdir()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "hsmfs", "mount", "-f", f"s3://{bucket.name}",
             str(tmp_path / "mnt2"), "-o",
             f"cache={cache},endpoint={fault_proxy.endpoint},head=0"],
            capture_output=True, text=True, timeout=60)
    finally:
        fault_proxy.restore()
        force_unmount(tmp_path / "mnt2")  # a start that wrongly succeeded, then was killed
    assert out.returncode != 0
    assert "denied" in out.stderr.lower() or "403" in out.stderr, out.stderr
    assert "ended before it was whole" not in out.stderr, out.stderr  # the cause, not ours
    assert sorted(p.name for p in (cache / "k").iterdir()) == [k[2:] for k in keys]
