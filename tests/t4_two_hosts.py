"""Two hosts, one bucket (issue 11, item 5): two daemons with two caches, S3 the shared engine.

Each "host" is a real `hsmfs mount -f` FUSE door over its own cache, both on one moto bucket;
programs write through the mounts and `hsmfs archive` uploads.  Conditional writes decide every
race: the first archive of a version wins, the other host's file becomes `conflict` with its
bytes intact, and S3 holds exactly one version, byte for byte.  Each interleaving of edit and
archive on the two hosts that can differ is its own test.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Bucket, MotoServer, seeded
from support.doors import Served, serve_door

pytestmark = [pytest.mark.needs_fuse, pytest.mark.timeout(120)]

KEY = "doc.txt"


def hsmfs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hsmfs", *args], capture_output=True,
                          text=True, timeout=60)


def state(path: Path) -> str:
    out = hsmfs("state", "--json", str(path))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)[0]["state"]


def append(path: Path, text: bytes) -> None:
    with open(path, "ab") as f:
        f.write(text)


def archive(path: Path) -> subprocess.CompletedProcess:
    return hsmfs("archive", str(path))


def in_s3(bucket: Bucket) -> bytes:
    return bucket.client.get_object(Bucket=bucket.name, Key=KEY)["Body"].read()


@contextlib.contextmanager
def hosts(bucket: Bucket, moto: MotoServer, tmp_path: Path) -> Iterator[tuple[Served, Served]]:
    source = f"s3://{bucket.name}"
    with serve_door("fuse", source, tmp_path / "a", moto.endpoint) as a, \
            serve_door("fuse", source, tmp_path / "b", moto.endpoint) as b:
        yield a, b


@pytest.fixture
def v1(bucket: Bucket) -> bytes:
    return bucket.put(KEY, seeded(3000, "v1"))


def test_edit_archive_then_edit_archive_on_the_other_host(bucket: Bucket, moto: MotoServer,
                                                          tmp_path: Path, v1: bytes) -> None:
    with hosts(bucket, moto, tmp_path) as (a, b):
        assert (b.root / KEY).read_bytes() == v1  # B holds v1 whole (it was reading it)
        append(a.root / KEY, b"from A\n")
        assert archive(a.root / KEY).returncode == 0
        assert in_s3(bucket) == v1 + b"from A\n"
        append(b.root / KEY, b"from B\n")  # B's copy is still v1: its edit is based on v1
        out = archive(b.root / KEY)
        assert out.returncode != 0 and "conflict" in out.stdout, out.stdout + out.stderr
        assert in_s3(bucket) == v1 + b"from A\n"  # exactly one version: A's
        assert (b.root / KEY).read_bytes() == v1 + b"from B\n"  # B's bytes intact
        assert state(b.root / KEY) == "conflict"
        assert state(a.root / KEY) == "resident"


def test_an_edit_of_a_copy_that_can_no_longer_be_completed_fails(
        bucket: Bucket, moto: MotoServer, tmp_path: Path, v1: bytes) -> None:
    """B never read the file; A archives a new version; B's write needs every byte of v1 first
    (a change is made to a whole copy), which S3 no longer has: EIO, never a stitched file.
    After a restart B's untouched copy follows S3."""
    source = f"s3://{bucket.name}"
    with hosts(bucket, moto, tmp_path) as (a, b):
        append(a.root / KEY, b"from A\n")
        assert archive(a.root / KEY).returncode == 0
        with pytest.raises(OSError) as failed:
            append(b.root / KEY, b"from B\n")
        assert failed.value.errno == 5
        assert state(b.root / KEY) == "stale"
    with serve_door("fuse", source, tmp_path / "b", moto.endpoint) as b:
        assert (b.root / KEY).read_bytes() == v1 + b"from A\n"


def test_both_edit_then_the_second_archives_first(bucket: Bucket, moto: MotoServer,
                                                 tmp_path: Path, v1: bytes) -> None:
    with hosts(bucket, moto, tmp_path) as (a, b):
        append(a.root / KEY, b"from A\n")
        append(b.root / KEY, b"from B\n")
        assert archive(b.root / KEY).returncode == 0  # first writer wins, whoever edited first
        assert archive(a.root / KEY).returncode != 0
        assert in_s3(bucket) == v1 + b"from B\n"
        assert (a.root / KEY).read_bytes() == v1 + b"from A\n"
        assert state(a.root / KEY) == "conflict"


def test_the_other_host_sees_an_archived_edit_after_it_refreshes(
        bucket: Bucket, moto: MotoServer, tmp_path: Path, v1: bytes) -> None:
    source = f"s3://{bucket.name}"
    with serve_door("fuse", source, tmp_path / "b", moto.endpoint) as b:
        assert (b.root / KEY).read_bytes()[:10] == v1[:10]  # B holds part of v1: clean bytes
    with serve_door("fuse", source, tmp_path / "a", moto.endpoint) as a:
        append(a.root / KEY, b"from A\n")
        assert archive(a.root / KEY).returncode == 0
    # B comes back (a refresh is a restart until `hsmfs sync` exists): its copy of v1 was
    # whole and clean, so it follows S3... as stale, never stitched: it says so.
    with serve_door("fuse", source, tmp_path / "b", moto.endpoint) as b:
        assert state(b.root / KEY) == "stale"
        assert (b.root / KEY).read_bytes() == v1  # its own clean bytes, whole, never mixed
    # A host that never read the file gets A's version at its next start.
    with serve_door("fuse", source, tmp_path / "c", moto.endpoint) as c:
        assert (c.root / KEY).read_bytes() == v1 + b"from A\n"


def test_a_host_with_local_changes_keeps_them_across_a_restart_after_the_other_archives(
        bucket: Bucket, moto: MotoServer, tmp_path: Path, v1: bytes) -> None:
    source = f"s3://{bucket.name}"
    with serve_door("fuse", source, tmp_path / "b", moto.endpoint) as b:
        append(b.root / KEY, b"from B\n")  # dirty, not archived
    with serve_door("fuse", source, tmp_path / "a", moto.endpoint) as a:
        append(a.root / KEY, b"from A\n")
        assert archive(a.root / KEY).returncode == 0
    with serve_door("fuse", source, tmp_path / "b", moto.endpoint) as b:
        assert state(b.root / KEY) == "conflict"
        assert (b.root / KEY).read_bytes() == v1 + b"from B\n"
        assert archive(b.root / KEY).returncode != 0  # still refused: A's version stays
    assert in_s3(bucket) == v1 + b"from A\n"
