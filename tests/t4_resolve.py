"""``hsmfs resolve`` (issue 11: the way out of a conflict): two hosts on one bucket make a real
conflict through real FUSE mounts on a real S3 server; each test ends one way and compares
what S3 and the tree hold, byte for byte.
"""

from __future__ import annotations

import os

import pytest
from conftest import Bucket, MotoServer, seeded
from t4_two_hosts import KEY, append, archive, hosts, hsmfs, in_s3, state

pytestmark = [pytest.mark.needs_fuse, pytest.mark.timeout(120)]


def _conflict(a, b, v1: bytes) -> None:
    """A archives an edit of v1; B's edit of v1 then meets it: conflict on B."""
    assert (b.root / KEY).read_bytes() == v1
    append(a.root / KEY, b"from A\n")
    assert archive(a.root / KEY).returncode == 0
    append(b.root / KEY, b"from B\n")
    out = archive(b.root / KEY)
    assert out.returncode != 0 and "conflict" in out.stdout, out.stdout + out.stderr
    assert state(b.root / KEY) == "conflict"


def test_keep_local_makes_the_next_archive_replace_the_other_version(
        bucket: Bucket, moto: MotoServer, tmp_path) -> None:
    v1 = bucket.put(KEY, seeded(3000, "v1"))
    with hosts(bucket, moto, tmp_path) as (a, b):
        _conflict(a, b, v1)
        out = hsmfs("resolve", "--keep-local", str(b.root / KEY))
        assert out.returncode == 0 and "kept local" in out.stdout, out.stdout + out.stderr
        assert state(b.root / KEY) == "dirty"
        assert in_s3(bucket) == v1 + b"from A\n"  # nothing sent yet: archive decides
        out = archive(b.root / KEY)
        assert out.returncode == 0, out.stdout + out.stderr
        assert in_s3(bucket) == v1 + b"from B\n"
        assert (b.root / KEY).read_bytes() == v1 + b"from B\n"
        assert state(b.root / KEY) == "resident"


def test_keep_local_is_still_conditional_on_what_s3_held_when_resolved(
        bucket: Bucket, moto: MotoServer, tmp_path) -> None:
    v1 = bucket.put(KEY, seeded(3000, "v1"))
    with hosts(bucket, moto, tmp_path) as (a, b):
        _conflict(a, b, v1)
        assert hsmfs("resolve", "--keep-local", str(b.root / KEY)).returncode == 0
        bucket.put(KEY, b"a third writer\n")  # after the resolve, before B's archive
        out = archive(b.root / KEY)
        assert out.returncode != 0 and "conflict" in out.stdout, out.stdout + out.stderr
        assert in_s3(bucket) == b"a third writer\n"
        assert (b.root / KEY).read_bytes() == v1 + b"from B\n"


def test_take_remote_keeps_the_local_bytes_aside_and_serves_s3s_version(
        bucket: Bucket, moto: MotoServer, tmp_path) -> None:
    v1 = bucket.put(KEY, seeded(3000, "v1"))
    with hosts(bucket, moto, tmp_path) as (a, b):
        _conflict(a, b, v1)
        out = hsmfs("resolve", "--take-remote", str(b.root / KEY))
        assert out.returncode == 0 and "took remote" in out.stdout, out.stdout + out.stderr
        assert (b.root / KEY).read_bytes() == v1 + b"from A\n"  # at once, despite caches
        assert state(b.root / KEY) == "resident"
        kept = list((b.cache / ".hsmfs" / "kept").iterdir())
        assert len(kept) == 1 and kept[0].read_bytes() == v1 + b"from B\n"
        assert str(kept[0].relative_to(b.cache)) in out.stdout
        assert in_s3(bucket) == v1 + b"from A\n"


def test_take_remote_with_discard_keeps_nothing(bucket: Bucket, moto: MotoServer,
                                               tmp_path) -> None:
    v1 = bucket.put(KEY, seeded(3000, "v1"))
    with hosts(bucket, moto, tmp_path) as (a, b):
        _conflict(a, b, v1)
        out = hsmfs("resolve", "--take-remote", "--discard", str(b.root / KEY))
        assert out.returncode == 0, out.stdout + out.stderr
        assert (b.root / KEY).read_bytes() == v1 + b"from A\n"
        assert not (b.cache / ".hsmfs" / "kept").exists() \
            or not os.listdir(b.cache / ".hsmfs" / "kept")


def test_keep_local_when_s3_holds_nothing_uploads_it_as_new(bucket: Bucket, moto: MotoServer,
                                                           tmp_path) -> None:
    v1 = bucket.put(KEY, seeded(3000, "v1"))
    with hosts(bucket, moto, tmp_path) as (_a, b):
        assert (b.root / KEY).read_bytes() == v1
        append(b.root / KEY, b"from B\n")
        bucket.client.delete_object(Bucket=bucket.name, Key=KEY)
        out = archive(b.root / KEY)
        assert out.returncode != 0 and "conflict" in out.stdout, out.stdout + out.stderr
        out = hsmfs("resolve", "--keep-local", str(b.root / KEY))
        assert out.returncode == 0 and "new" in out.stdout, out.stdout + out.stderr
        out = archive(b.root / KEY)
        assert out.returncode == 0, out.stdout + out.stderr
        assert in_s3(bucket) == v1 + b"from B\n"


def test_a_clean_file_has_nothing_to_resolve(bucket: Bucket, moto: MotoServer,
                                             tmp_path) -> None:
    bucket.put(KEY, seeded(3000, "v1"))
    with hosts(bucket, moto, tmp_path) as (a, _b):
        for how in ("--keep-local", "--take-remote"):
            out = hsmfs("resolve", how, str(a.root / KEY))
            assert out.returncode != 0 and "refused" in out.stdout, out.stdout + out.stderr
