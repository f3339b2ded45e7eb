"""``-o writeback=SECONDS`` through both real doors (issue 11, item 3).

Real parts only: ``hsmfs mount -f``/``hsmfs serve -f`` (tests/support/doors.py), a real moto S3
server, ``sh``'s ``>>`` and Python's ``open`` as the programs.  Success is S3 holding exactly
the local bytes and the file clean, within a bounded wait; a file kept open for writing through
the FUSE door is checked to stay un-uploaded for several idle periods.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from conftest import Bucket, MotoServer, run, seeded, wait_until
from support.doors import serve_door

pytestmark = pytest.mark.timeout(60)

#: Idle period of these tests; uploads are expected within this plus a few ticks.
WB = "writeback=1"
UPLOAD_WAIT_S = 12.0


def _s3(bucket: Bucket, key: str) -> bytes | None:
    try:
        return bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read()
    except bucket.client.exceptions.NoSuchKey:
        return None


def _state(path: Path) -> str:
    out = run([sys.executable, "-m", "hsmfs", "state", "--json", str(path)])
    assert out.returncode == 0, out.stderr
    [row] = json.loads(out.stdout)
    return row["state"]


def _stats(path: Path) -> dict[str, int]:
    out = run([sys.executable, "-m", "hsmfs", "stats", "--json", str(path)])
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["writeback"]


def _written_back(bucket: Bucket, key: str, local: Path) -> bool:
    return _s3(bucket, key) == local.read_bytes() and _state(local) in ("resident", "partial")


def _append(path: Path, text: str) -> None:
    out = run(["sh", "-c", f'echo "{text}" >> "{path}"'])
    assert out.returncode == 0, out.stderr


def test_fuse_append_and_create_are_written_back(bucket: Bucket, moto: MotoServer,
                                                 tmp_path: Path) -> None:
    bucket.put("log.txt", seeded(100_000, "wb"))
    with serve_door("fuse", f"s3://{bucket.name}", tmp_path, moto.endpoint, WB) as d:
        _append(d.root / "log.txt", "one more line")
        (d.root / "new.txt").write_bytes(b"created through the door\n")
        wait_until(lambda: _written_back(bucket, "log.txt", d.root / "log.txt"),
                   UPLOAD_WAIT_S, "log.txt written back")
        wait_until(lambda: _written_back(bucket, "new.txt", d.root / "new.txt"),
                   UPLOAD_WAIT_S, "new.txt written back")
        stats = _stats(d.root)
        assert stats["uploads"] >= 2 and stats["failures"] == 0, stats
        # A second change after the upload: the next idle period sends it again.
        _append(d.root / "log.txt", "and another")
        wait_until(lambda: _written_back(bucket, "log.txt", d.root / "log.txt"),
                   UPLOAD_WAIT_S, "log.txt written back again")


def test_fuse_file_open_for_writing_is_not_uploaded(bucket: Bucket, moto: MotoServer,
                                                    tmp_path: Path) -> None:
    before = bucket.put("held.bin", seeded(10_000, "held"))
    with serve_door("fuse", f"s3://{bucket.name}", tmp_path, moto.endpoint, WB) as d:
        path = d.root / "held.bin"
        with open(path, "ab") as f:
            f.write(b"appended while held\n")
            f.flush()
            time.sleep(4)  # four idle periods, ticks included
            assert _s3(bucket, "held.bin") == before
            assert _state(path) == "dirty"
        wait_until(lambda: _written_back(bucket, "held.bin", path), UPLOAD_WAIT_S,
                   "held.bin written back after its close")


@pytest.mark.needs_precontent
def test_kernel_append_to_a_stub_is_written_back(bucket: Bucket, moto: MotoServer,
                                                 tmp_path: Path) -> None:
    bucket.put("k.txt", seeded(50_000, "kwb"))
    with serve_door("kernel", f"s3://{bucket.name}", tmp_path, moto.endpoint, WB) as d:
        _append(d.root / "k.txt", "appended in the backing tree")
        wait_until(lambda: _written_back(bucket, "k.txt", d.root / "k.txt"),
                   UPLOAD_WAIT_S, "k.txt written back")
        _append(d.root / "k.txt", "a second time")
        wait_until(lambda: _written_back(bucket, "k.txt", d.root / "k.txt"),
                   UPLOAD_WAIT_S, "k.txt written back again")
        assert _stats(d.root)["uploads"] >= 2


def test_writeback_option_units() -> None:
    from hsmfs.config import build_options

    def idle(value: str) -> float:
        return build_options("s3://b", {"writeback": value}, mountpoint=None,
                             cache_dir="/tmp/c", kernel_door=False).cache.writeback_s

    assert idle("30") == 30.0 and idle("30s") == 30.0 and idle("2m") == 120.0
    assert idle("500ms") == pytest.approx(0.5) and idle("off") == 0.0
    assert build_options("s3://b", {}, mountpoint=None, cache_dir="/tmp/c",
                         kernel_door=False).cache.writeback_s == 0.0
    with pytest.raises(ValueError):
        idle("soon")
