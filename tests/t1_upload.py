"""S3Backend's conditional uploads and deletes against the real moto server over loopback HTTP.

Nothing is mocked: the backend speaks HTTP through boto3 to moto in its own process; files are
real files read through real fds.  What lands in S3 is compared byte for byte with the source,
and every refused write is checked to have left S3 as it was (no object, no unfinished
multipart upload).  Multipart is made cheap with a small threshold (S3's minimum part is 5 MiB).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from conftest import seeded

from hsmfs.backend_s3 import S3Backend, SourceChanged, etag_of
from hsmfs.config import S3Config
from hsmfs.errors import ObjectChanged, ObjectMissing

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


def make_backend(endpoint: str, bucket: str, **kw) -> S3Backend:
    cfg = dict(bucket=bucket, prefix="", endpoint_url=endpoint, region="us-east-1",
               attempts=3, backoff_base_s=0.01, backoff_cap_s=0.05,
               connect_timeout_s=2.0, read_timeout_s=10.0)
    cfg.update(kw)
    return S3Backend(S3Config(**cfg))


@pytest.fixture
def backend(moto, bucket) -> S3Backend:
    b = make_backend(moto.endpoint, bucket.name)
    # Multipart from 6 MiB in 5 MiB parts: a 12 MiB file is three parts, two in parallel.
    b.multipart_threshold, b.part_size, b.part_threads = 6 * MiB, 5 * MiB, 2
    return b


def a_file(tmp_path: Path, data: bytes, name: str = "f") -> int:
    p = tmp_path / name
    p.write_bytes(data)
    return os.open(p, os.O_RDONLY)


def stored(bucket, key: str) -> bytes:
    return bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read()


def unfinished_uploads(bucket) -> list:
    return bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", [])


def test_single_put_if_match_then_412_on_a_stale_base(backend, bucket, tmp_path):
    old = bucket.put("d/k", b"version one")
    etag1 = backend.head_key("d/k").version.etag
    data = seeded(1000, "v2")
    fd = a_file(tmp_path, data)
    try:
        v2 = backend.put("d/k", fd, len(data), base=etag1, mtime=1_700_000_000.7,
                         mode=0o100640)
        assert v2.etag == f'"{hashlib.md5(data).hexdigest()}"'
        assert v2.size == len(data) and v2.mtime > 0
        assert stored(bucket, "d/k") == data
        # The same upload based on the version S3 no longer holds: refused, S3 unchanged.
        newer = seeded(1000, "v3")
        fd3 = a_file(tmp_path, newer, "g")
        try:
            with pytest.raises(ObjectChanged):
                backend.put("d/k", fd3, len(newer), base=etag1, mtime=0, mode=0o100644)
        finally:
            os.close(fd3)
        assert stored(bucket, "d/k") == data != old
    finally:
        os.close(fd)


def test_new_key_if_none_match_and_a_based_on_key_that_is_gone(backend, bucket, tmp_path):
    data = b"a new file"
    fd = a_file(tmp_path, data)
    try:
        v = backend.put("new", fd, len(data), base=None, mtime=1, mode=0o100644)
        assert stored(bucket, "new") == data and v.etag == f'"{hashlib.md5(data).hexdigest()}"'
        # A second "new" file at the same key loses: first writer wins.
        with pytest.raises(ObjectChanged):
            backend.put("new", fd, 3, base=None, mtime=1, mode=0o100644)
        assert stored(bucket, "new") == data
        # Based on a version of a key S3 no longer has: ObjectMissing, nothing created.
        with pytest.raises(ObjectMissing):
            backend.put("gone", fd, len(data), base='"0123456789abcdef0123456789abcdef"',
                        mtime=1, mode=0o100644)
        assert backend.head_key("gone") is None
    finally:
        os.close(fd)


def test_a_retry_that_meets_its_own_landed_upload_is_success(backend, bucket, tmp_path):
    """A PUT whose answer was lost lands; its retry's If-Match then fails.  S3 holds exactly
    the planned bytes, so that is success, never a conflict."""
    bucket.put("r", b"base")
    base = backend.head_key("r").version.etag
    data = seeded(5000, "retry")
    fd = a_file(tmp_path, data)
    try:
        bucket.put("r", data)  # "the first attempt" landed (the same bytes, no token)
        v = backend.put("r", fd, len(data), base=base, mtime=1, mode=0o100644)
        assert v.etag == f'"{hashlib.md5(data).hexdigest()}"' and stored(bucket, "r") == data
    finally:
        os.close(fd)


def test_metadata_round_trip_s3fs_convention(backend, bucket, tmp_path):
    fd = a_file(tmp_path, b"meta")
    try:
        upload = backend.begin_upload("m", 4, base=None, mtime=1_712_345_678.9, mode=0o100751)
        backend.send(upload, fd)
    finally:
        os.close(fd)
    meta = bucket.client.head_object(Bucket=bucket.name, Key="m")["Metadata"]
    assert meta == {"mtime": "1712345678", "mode": str(0o100751),  # decimal, as s3fs writes
                    "hsmfs-upload": upload.token}
    info = backend.head_key("m")
    assert info is not None and info.mode == 0o100751 and info.upload == upload.token


def test_multipart_etag_is_planned_and_bytes_round_trip(backend, bucket, tmp_path):
    data = seeded(12 * MiB + 123, "mpu")
    fd = a_file(tmp_path, data)
    sent = []
    try:
        upload = backend.begin_upload("big", len(data), base=None, mtime=5, mode=0o100600)
        assert upload.parts == 3 and upload.upload_id
        assert [u["UploadId"] for u in unfinished_uploads(bucket)] == [upload.upload_id]
        assert backend.head_key("big") is None  # begun: nothing visible yet
        v = backend.send(upload, fd, progress=sent.append)
        local = etag_of(fd, len(data), upload.part_size)
    finally:
        os.close(fd)
    assert v.etag == local and local.endswith('-3"') and v.size == len(data)
    assert stored(bucket, "big") == data
    assert sum(sent) == len(data)
    assert bucket.client.head_object(Bucket=bucket.name, Key="big")["Metadata"]["mtime"] == "5"
    assert not unfinished_uploads(bucket)


def test_multipart_head_check_refuses_what_moto_would_not(backend, bucket, tmp_path):
    """moto ignores If-Match on CompleteMultipartUpload: without our HEAD right before
    completing, this upload based on a stale version would overwrite the newer object."""
    bucket.put("big", b"v1")
    stale = backend.head_key("big").version.etag
    bucket.put("big", b"v2 written by someone else")
    data = seeded(7 * MiB, "mpu-stale")
    fd = a_file(tmp_path, data)
    try:
        with pytest.raises(ObjectChanged):
            backend.put("big", fd, len(data), base=stale, mtime=1, mode=0o100644)
        # And a new-key multipart over a key that exists.
        with pytest.raises(ObjectChanged):
            backend.put("big", fd, len(data), base=None, mtime=1, mode=0o100644)
    finally:
        os.close(fd)
    assert stored(bucket, "big") == b"v2 written by someone else"
    assert not unfinished_uploads(bucket)  # aborted, not left to be billed


def test_a_change_seen_before_completing_stores_nothing(backend, bucket, tmp_path):
    """``check`` runs after every byte was read and before anything can become visible: a
    file that changed meanwhile (here: it says so) leaves S3 without the object, single PUT
    or multipart, and without an unfinished upload.  A file shorter than the upload's size
    is a change too."""
    data = seeded(7 * MiB, "changing")
    p = tmp_path / "f"
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    calls = []

    def changed() -> None:
        calls.append(1)
        raise SourceChanged("the test says so")

    try:
        for size in (len(data), 1000):  # multipart, then one PUT
            upload = backend.begin_upload("c", size, base=None, mtime=1, mode=0o100644)
            with pytest.raises(SourceChanged):
                backend.send(upload, fd, check=changed)
        os.truncate(p, 100)
        for size in (len(data), 1000):
            with pytest.raises(SourceChanged):  # shorter than the upload's size
                backend.put("c", fd, size, base=None, mtime=1, mode=0o100644)
    finally:
        os.close(fd)
    assert len(calls) == 2
    assert backend.head_key("c") is None and not unfinished_uploads(bucket)


def test_etag_of_matches_what_s3_computes(backend, bucket, tmp_path):
    """The crash recovery's hash: the same ETag S3 reports, for one PUT and for parts."""
    for size in (0, 1000, 12 * MiB + 5):
        data = seeded(size, f"etag-{size}")
        fd = a_file(tmp_path, data, f"e{size}")
        try:
            v = backend.put(f"e{size}", fd, size, base=None, mtime=1, mode=0o100644)
            assert etag_of(fd, size, backend.part_size_for(size)) == v.etag \
                == backend.head_key(f"e{size}").version.etag
        finally:
            os.close(fd)


def test_delete_if_match(backend, bucket):
    bucket.put("x", b"one")
    v1 = backend.head_key("x").version
    bucket.put("x", b"two")
    with pytest.raises(ObjectChanged):
        backend.delete(v1)
    assert stored(bucket, "x") == b"two"
    v2 = backend.head_key("x").version
    assert backend.delete(v2) is True
    assert backend.head_key("x") is None
    assert backend.delete(v2) is False  # already gone


def test_head_honours_s3fs_metadata_and_refuses_what_lies(backend, bucket):
    """x-amz-meta-mtime becomes the version's mtime (what stubs are made with); a mode asking
    for setuid keeps only its permission bits, from the HEAD on; garbage is ignored."""
    client = bucket.client
    client.put_object(Bucket=bucket.name, Key="meta", Body=b"x",
                      Metadata={"mtime": "1600000000", "mode": str(0o104755)})
    client.put_object(Bucket=bucket.name, Key="lies", Body=b"y",
                      Metadata={"mtime": "yesterday", "mode": "rwx"})
    versions = {v.key: v for v in backend.list()}
    meta = backend.head(versions["meta"])
    assert meta.version.mtime == 1600000000 and meta.mode == 0o100755
    lies = backend.head(versions["lies"])
    assert lies.version.mtime == versions["lies"].mtime and lies.mode is None
