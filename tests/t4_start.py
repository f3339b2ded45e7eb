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
from pathlib import Path

import pytest
from conftest import Bucket, file_sha256, seeded, sha256
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
