"""The archive transition (hsmfs.archive) on a real StubCache over a real backing directory, with
the real S3Backend against the moto server over loopback HTTP.

No door runs here: programs' changes are made with plain file I/O on the backing tree, and the
transitions a door would cause are called on the cache itself.  One backend is a subclass that
changes the file right after its upload returns: a program writing during the upload, at the
one moment that must leave the file dirty.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from conftest import seeded

from hsmfs.archive import Archiver
from hsmfs.backend_s3 import ObjectInfo, S3Backend
from hsmfs.cache import StubCache
from hsmfs.config import CacheConfig, S3Config
from hsmfs.state import Intent

pytestmark = pytest.mark.timeout(60)


def s3cfg(endpoint: str, bucket: str) -> S3Config:
    return S3Config(bucket=bucket, prefix="", endpoint_url=endpoint, region="us-east-1",
                    attempts=3, backoff_base_s=0.01, backoff_cap_s=0.05)


class WriterDuringUpload(S3Backend):
    """The real backend; a program appends to ``path`` once the upload has landed."""

    path: Path

    def send(self, *args, **kw):
        version = super().send(*args, **kw)
        with open(self.path, "ab") as f:
            f.write(b" and a line written during the upload")
        return version


class WriterWhileRead(S3Backend):
    """The real backend; a program writes ``path`` after every byte of the first upload was
    read and sent, before it can become visible (the moment ``check`` guards)."""

    path: Path
    writes = 0

    def send(self, upload, fd, *, check=None, progress=None):
        def write_then_check() -> None:
            if self.writes == 0:
                self.writes += 1
                with open(self.path, "r+b") as f:
                    f.write(b"WRITTEN WHILE READ")  # same length: only the times tell
            if check is not None:
                check()

        return super().send(upload, fd, check=write_then_check, progress=progress)


@contextlib.asynccontextmanager
async def running(root: Path, backend: S3Backend) -> AsyncIterator[tuple[StubCache, Archiver]]:
    cache = StubCache(CacheConfig(cache_dir=str(root), head_for_mode=False), backend)
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        infos = [ObjectInfo(v) for v in await trio.to_thread.run_sync(
            lambda: list(backend.list()))]
        await cache.populate(infos)
        try:
            yield cache, Archiver(cache, backend, "")
        finally:
            nursery.cancel_scope.cancel()
            cache.close()


def s3_bytes(bucket, key: str) -> bytes:
    return bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read()


async def make_dirty(cache: StubCache, rel: str, size: int) -> bytes:
    """A stub read whole, then truncated (the transition the kernel door records)."""
    stub = cache.stub_at(rel)
    (await cache.ensure(stub, 0, stub.owed, Intent.WHOLE)).release()
    os.truncate(os.path.join(cache.cfg.cache_dir, rel), size)
    await cache.truncate(stub, size)
    return Path(cache.cfg.cache_dir, rel).read_bytes()


async def test_a_file_written_during_its_upload_stays_dirty_on_the_new_version(
        moto, bucket, tmp_path):
    bucket.put("f.txt", seeded(50_000, "f"))
    root = tmp_path / "cache"
    backend = WriterDuringUpload(s3cfg(moto.endpoint, bucket.name))
    backend.path = root / "f.txt"
    async with running(root, backend) as (cache, archiver):
        local = await make_dirty(cache, "f.txt", 1000)
        [row] = await archiver.run(["f.txt"])
        assert row["result"] == "uploaded" and "still dirty" in row["detail"], row
        stub = cache.stub_at("f.txt")
        assert stub.sync == "dirty"
        assert s3_bytes(bucket, "f.txt") == local  # what was read when the upload began
        uploaded = stub.version.etag
        assert uploaded == bucket.client.head_object(Bucket=bucket.name, Key="f.txt")["ETag"]
        # The next archive is based on the version just stored, so it is not a conflict.
        archiver.backend.__class__ = S3Backend  # no more writes during uploads
        [row] = await archiver.run(["f.txt"])
        assert row["result"] == "uploaded" and "still dirty" not in row["detail"], row
        assert s3_bytes(bucket, "f.txt") == (root / "f.txt").read_bytes() != local
        assert stub.sync == "clean" and stub.local and stub.version.etag != uploaded


async def test_saves_by_rename_renames_and_long_keys(moto, bucket, tmp_path):
    bucket.put("doc.txt", b"first version\n")
    bucket.put("old/name.txt", b"renamed locally\n")
    root = tmp_path / "cache"
    backend = S3Backend(s3cfg(moto.endpoint, bucket.name))
    async with running(root, backend) as (cache, archiver):
        # An editor's save: write a temp file, rename it over the stub.  The new file has no
        # record, yet it is the next version of doc.txt: If-Match, not a conflict.
        (root / "doc.txt.tmp").write_bytes(b"second version\n")
        os.rename(root / "doc.txt.tmp", root / "doc.txt")
        # A stub renamed locally goes up under its new key; --delete removes the old one.
        (root / "new").mkdir()
        os.rename(root / "old/name.txt", root / "new/name.txt")
        # A path whose key would exceed S3's 1,024 bytes is refused and kept.
        deep = root.joinpath(*["d" * 200] * 6)
        deep.mkdir(parents=True)
        (deep / "x.txt").write_bytes(b"kept")
        rows = {r["path"]: r for r in await archiver.run([""], delete=True)}
        assert rows["doc.txt"]["result"] == "uploaded", rows["doc.txt"]
        assert s3_bytes(bucket, "doc.txt") == b"second version\n"
        assert rows["new/name.txt"]["result"] == "uploaded", rows["new/name.txt"]
        assert s3_bytes(bucket, "new/name.txt") == b"renamed locally\n"
        assert rows["old/name.txt"]["result"] == "deleted", rows
        keys = {o["Key"] for o in bucket.client.list_objects_v2(
            Bucket=bucket.name).get("Contents", [])}
        assert keys == {"doc.txt", "new/name.txt"}
        [long_row] = [r for p, r in rows.items() if p.endswith("x.txt")]
        assert long_row["result"] == "refused" and "1024" in long_row["detail"]
        assert (deep / "x.txt").read_bytes() == b"kept"
        assert cache.stub_at("doc.txt").sync == "clean"
        assert cache.stub_at("new/name.txt").version.key == "new/name.txt"


async def test_a_write_while_the_bytes_are_read_stores_no_torn_object(moto, bucket, tmp_path):
    """Bytes read while a program wrote the file may mix two versions: S3 must never hold
    them.  The change is seen before the upload can become visible (single PUT and
    multipart), nothing is stored, and the file is read again: S3 then holds exactly the
    file's bytes, stored once (a versioned bucket counts), and the file is clean."""
    bucket.client.put_bucket_versioning(Bucket=bucket.name,
                                        VersioningConfiguration={"Status": "Enabled"})
    root = tmp_path / "cache"
    backend = WriterWhileRead(s3cfg(moto.endpoint, bucket.name))
    backend.multipart_threshold, backend.part_size, backend.part_threads = 6 << 20, 5 << 20, 2
    async with running(root, backend) as (cache, archiver):
        for name, size in (("small.bin", 10_000), ("parts.bin", 11 << 20)):
            path = root / name
            path.write_bytes(seeded(size, name))
            backend.path, backend.writes = path, 0
            [row] = await archiver.run([name])
            assert row["result"] == "uploaded" and "still dirty" not in row["detail"], row
            assert backend.writes == 1
            final = path.read_bytes()
            assert final.startswith(b"WRITTEN WHILE READ")
            assert s3_bytes(bucket, name) == final
            listed = bucket.client.list_object_versions(Bucket=bucket.name, Prefix=name)
            assert len(listed.get("Versions", [])) == 1, "a torn version was stored"
            assert cache.stub_at(name).sync == "clean"
        assert not bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads")
