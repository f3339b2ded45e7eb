"""StubCache over a real directory, with an in-memory S3 at its ``Fetcher`` seam.

The fake (:class:`MemFetcher`) is the one allowed: it holds objects with S3-like ETags, answers
``If-Match`` like S3 (a changed object is :class:`ObjectChanged`), records every ``(key, start,
stop)`` it is asked for, can be told to fail with any :class:`HsmError`, and can hold every
fetch on a trio-unaware ``threading.Event`` so tests can line up races deterministically.
Everything else is real: stubs are sparse files with xattrs on the test's filesystem, residency is
read back with ``SEEK_DATA``, the full-disk test fills a real tmpfs.  Every content check compares
digests against the seeded source.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import seeded, sha256

from hsmfs.backend_s3 import ObjectInfo, ObjectVersion
from hsmfs.bench.workloads import random_offsets
from hsmfs.cache import (
    PARTIAL,
    RESIDENT,
    STAGING_DIR,
    STALE,
    STUB,
    Intent,
    StubCache,
)
from hsmfs.config import CacheConfig
from hsmfs.errors import (
    DENY_ERRNOS,
    AccessDenied,
    BackendUnavailable,
    BadResponse,
    CacheFull,
    FileBusy,
    HsmError,
    ObjectChanged,
    ObjectMissing,
    QuotaExceeded,
    ShortBody,
    Superseded,
    TextBusy,
    Throttled,
    cause_of,
    to_errno,
)
from hsmfs.ranges import RangeMap
from hsmfs.stubfile import X_ETAG as XATTR_ETAG
from hsmfs.stubfile import X_KEY as XATTR_KEY
from hsmfs.stubfile import X_RSIZE as XATTR_SIZE
from hsmfs.stubfile import X_VERSION as XATTR_VERSION
from hsmfs.stubfile import X_VIEW as XATTR_STATE

KiB = 1024
C = 64 * KiB  # chunk size in these tests: small files, same arithmetic as 1 MiB
MTIME = 1_700_000_000.25
GATE_TIMEOUT_S = 10.0  # a held fetch gives up after this, so a failing test cannot hang


class MemFetcher:
    """An in-memory S3 at the cache's Fetcher seam.  Thread-safe; called from worker threads."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, str, int | None]] = {}
        self.calls: list[tuple[str, int, int]] = []
        self.fail: HsmError | None = None  # raised by every fetch until cleared
        self.short = False  # return one byte less than asked (a broken backend)
        self.blocked = 0  # fetches waiting at the gate right now
        self._gate: threading.Event | None = None
        self._lock = threading.Lock()

    # -- the S3 side ---------------------------------------------------------------------------

    def put(self, key: str, data: bytes, mode: int | None = None,
            version_id: str | None = None) -> ObjectInfo:
        self.objects[key] = (data, f'"{hashlib.md5(data).hexdigest()}"', mode)
        return self.info(key, version_id)

    def delete(self, key: str) -> None:
        del self.objects[key]

    def info(self, key: str, version_id: str | None = None) -> ObjectInfo:
        data, etag, mode = self.objects[key]
        return ObjectInfo(ObjectVersion(key, etag, len(data), MTIME, version_id), mode)

    def listing(self) -> list[ObjectInfo]:
        return [self.info(k) for k in sorted(self.objects)]

    def data(self, key: str) -> bytes:
        return self.objects[key][0]

    # -- the race controls ---------------------------------------------------------------------

    def hold(self) -> None:
        """Every fetch from now on waits until :meth:`release`."""
        self._gate = threading.Event()

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.set()

    # -- the seam ------------------------------------------------------------------------------

    def fetch_into(self, version, start: int, buf: memoryview) -> int:
        got = self.fetch(version, start, start + len(buf))
        buf[:len(got)] = got
        return len(got)

    def fetch(self, version, start: int, stop: int) -> bytes:
        with self._lock:
            self.calls.append((version.key, start, stop))
        gate = self._gate
        if gate is not None:
            with self._lock:
                self.blocked += 1
            try:
                if not gate.wait(GATE_TIMEOUT_S):
                    raise AssertionError("test never released the fetch gate")
            finally:
                with self._lock:
                    self.blocked -= 1
        if self.fail is not None:
            raise self.fail
        if version.key not in self.objects:
            raise ObjectMissing(f"{version.key!r}: 404")
        data, etag, _ = self.objects[version.key]
        if etag != version.etag:  # what If-Match does
            raise ObjectChanged(f"{version.key!r}: 412")
        if stop > len(data):
            raise ObjectChanged(f"{version.key!r}: 416")
        if self.short:
            return data[start:stop - 1]
        return data[start:stop]


class Harness:
    """A cache directory, one fake S3, and every StubCache opened over them (closed at the end)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "cache"
        self.fetcher = MemFetcher()
        self._opened: list[tuple[StubCache, int]] = []

    def cache(self, **kw) -> StubCache:
        cfg = dict(chunk_size=C, max_request=4 * C, readahead_max=0, small_file=16 * KiB,
                   concurrency=8, file_mode=0o644, dir_mode=0o755, head_for_mode=False)
        cfg.update(kw)
        self.dir.mkdir(parents=True, exist_ok=True)
        # The test owns the root fd (StubCache.close() leaves a root fd alone).
        fd = os.open(self.dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        cache = StubCache(CacheConfig(cache_dir=str(self.dir), **cfg), self.fetcher, root_fd=fd)
        self._opened.append((cache, fd))
        return cache

    def close(self) -> None:
        self.fetcher.release()
        for cache, fd in self._opened:
            cache.close()
            os.close(fd)
        self._opened.clear()

    def path(self, rel: str) -> Path:
        return self.dir / rel

    def read(self, rel: str, start: int = 0, stop: int | None = None) -> bytes:
        with open(self.path(rel), "rb") as f:
            f.seek(start)
            return f.read(-1 if stop is None else stop - start)

    def assert_content(self, rel: str, key: str, start: int = 0, stop: int | None = None) -> None:
        src = self.fetcher.data(key)
        stop = len(src) if stop is None else stop
        assert sha256(self.read(rel, start, stop)) == sha256(src[start:stop]), (rel, start, stop)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    try:
        yield harness
    finally:
        harness.close()


@contextlib.asynccontextmanager
async def serving(cache: StubCache, fetcher: MemFetcher) -> AsyncIterator[StubCache]:
    """The cache with its background nursery running; on the way out, held fetches are
    released (worker threads are never abandoned) and the nursery is cancelled."""
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        try:
            yield cache
        finally:
            fetcher.release()
            nursery.cancel_scope.cancel()


async def until(pred, what: str, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.005)


async def settle(cache: StubCache) -> None:
    """Wait until background read-ahead has nothing in flight."""
    with trio.fail_after(10):
        while True:
            await trio.testing.wait_all_tasks_blocked()
            if cache.stats()["inflight_chunks"] == 0:
                await trio.testing.wait_all_tasks_blocked()
                if cache.stats()["inflight_chunks"] == 0:
                    return
            await trio.sleep(0.005)


def xattr(path: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        raise


def data_extents(path: Path, size: int) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        out, pos = RangeMap(), 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            if start >= size:
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.add(start, min(pos, size))
        return [tuple(s) for s in out]
    finally:
        os.close(fd)


def spans(rm: RangeMap | None) -> list[tuple[int, int]]:
    assert rm is not None
    return [tuple(s) for s in rm]


# -- populate -------------------------------------------------------------------------------------

async def test_populate_creates_sparse_stubs(h):
    f = h.fetcher
    objs = [
        f.put("a.bin", seeded(5 * C + 17, "a")),
        f.put("bin/run.sh", seeded(3000, "run"), mode=0o100755),
        f.put("d/e/secret.txt", seeded(10, "secret"), mode=0o100600, version_id="v-123"),
        f.put("empty", b""),
        f.put("marker/", b""),  # a directory marker, not a file
    ]
    cache = h.cache(dir_mode=0o775)  # not what umask 022 leaves of it
    report = await cache.populate(objs)
    assert (report.created, report.kept, report.replaced, report.removed) == (4, 0, 0, 0)
    assert report.rejected == []
    assert report.dirs == 4  # bin, d, d/e, marker
    for d in ("bin", "d", "d/e", "marker"):
        st = os.stat(h.path(d))
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o775, d

    expected_mode = {"a.bin": 0o644, "bin/run.sh": 0o755, "d/e/secret.txt": 0o600, "empty": 0o644}
    for rel, mode in expected_mode.items():
        info = f.info(rel)
        st = os.stat(h.path(rel))
        assert stat.S_ISREG(st.st_mode)
        assert st.st_size == info.version.size
        # Sparse: no data extents.  (st_blocks is no test: ext4 may put the identity xattrs
        # in an external block, which st_blocks counts.)
        assert data_extents(h.path(rel), st.st_size) == [], f"{rel} is not sparse"
        assert st.st_mtime == pytest.approx(MTIME, abs=1e-6)
        assert stat.S_IMODE(st.st_mode) == mode, rel
        assert xattr(h.path(rel), XATTR_KEY) == rel.encode()
        assert xattr(h.path(rel), XATTR_ETAG) == info.version.etag.encode()
        assert xattr(h.path(rel), XATTR_SIZE) == str(info.version.size).encode()
        stub = cache.stub_at(rel)
        assert stub is not None and stub.ino == st.st_ino
        assert cache.stub_for_ino(st.st_ino) is stub
    assert xattr(h.path("d/e/secret.txt"), XATTR_VERSION) == b"v-123"
    assert xattr(h.path("a.bin"), XATTR_VERSION) is None
    for rel in ("a.bin", "bin/run.sh", "d/e/secret.txt"):
        assert xattr(h.path(rel), XATTR_STATE) == STUB.encode()
        assert cache.stub_at(rel).state == STUB
    # A zero-size object has nothing to fetch: resident from the start.
    assert xattr(h.path("empty"), XATTR_STATE) == RESIDENT.encode()
    assert cache.stub_at("empty").state == RESIDENT
    assert cache.state_of(cache.stub_at("a.bin")) == (STUB, 0)
    assert cache.stub_at("marker") is None
    assert os.listdir(h.path(STAGING_DIR)) == []
    assert cache.stats()["stubs"] == 4

    async with serving(cache, f):
        await cache.ensure(cache.stub_at("empty"), 0, 100)
    assert f.calls == []


async def test_repopulate_keeps_replaces_removes_and_spares_local_files(h):
    f = h.fetcher
    f.put("keep", seeded(4 * C, "keep"))
    f.put("change", seeded(3 * C, "change-v1"))
    f.put("vanish", seeded(2 * C, "vanish"))
    f.put("read", seeded(3 * C, "read-v1"))
    cache = h.cache()
    await cache.populate(f.listing())
    async with serving(cache, f):
        await cache.ensure(cache.stub_at("keep"), 0, C)
        await cache.ensure(cache.stub_at("read"), 0, C)
    assert len(f.calls) == 2
    keep_ino = os.stat(h.path("keep")).st_ino
    change_ino = os.stat(h.path("change")).st_ino
    vanish_stub = cache.stub_at("vanish")

    # Local files that are not stubs: one nobody lists, one where S3 now has an object.
    h.path("local.txt").write_bytes(b"my own notes")
    h.path("taken").write_bytes(b"a local file first")
    f.put("change", seeded(3 * C, "change-v2"))
    f.put("read", seeded(3 * C, "read-v2"))
    f.delete("vanish")
    f.put("taken", seeded(100, "taken"))
    f.put("new", seeded(C + 1, "new"))

    report = await cache.populate(f.listing())
    assert (report.created, report.kept, report.replaced, report.removed) == (1, 1, 1, 1)
    # Changed with clean bytes local: stale, kept with its v1 bytes, never stitched to v2.
    assert report.stale == 1
    assert cache.stub_at("read").state == STALE
    assert data_extents(h.path("read"), 3 * C) == [(0, C)]

    # Unchanged: same file, its resident bytes kept, nothing refetched.
    assert os.stat(h.path("keep")).st_ino == keep_ino
    assert data_extents(h.path("keep"), 4 * C) == [(0, C)]
    assert xattr(h.path("keep"), XATTR_STATE) == PARTIAL.encode()
    # Changed: a new sparse stub with the new identity.
    st = os.stat(h.path("change"))
    assert st.st_ino != change_ino
    assert data_extents(h.path("change"), 3 * C) == []
    assert xattr(h.path("change"), XATTR_ETAG) == f.info("change").version.etag.encode()
    assert xattr(h.path("change"), XATTR_STATE) == STUB.encode()
    # Vanished: gone from disk and from the cache's tables.
    assert not h.path("vanish").exists()
    assert cache.stub_at("vanish") is None
    assert cache.stub_for_ino(vanish_stub.ino) is None
    # Local files untouched, never adopted.
    assert h.path("local.txt").read_bytes() == b"my own notes"
    assert h.path("taken").read_bytes() == b"a local file first"
    assert xattr(h.path("taken"), XATTR_KEY) is None
    assert cache.stub_at("taken") is None
    assert cache.stub_at("local.txt") is None
    assert cache.stats()["stubs"] == 4  # keep, change, read, new

    calls_before = len(f.calls)
    async with serving(cache, f):
        await cache.ensure(cache.stub_at("keep"), 0, C)
        assert len(f.calls) == calls_before  # kept bytes served from disk
        await cache.ensure(cache.stub_at("change"), 0, 3 * C, Intent.WHOLE)
        await cache.ensure(cache.stub_at("new"), 0, C + 1)
    h.assert_content("keep", "keep", 0, C)
    h.assert_content("change", "change")  # the new version, nothing of the old one
    h.assert_content("new", "new")


async def test_repopulate_of_an_idle_cache_is_a_no_op(h):
    f = h.fetcher
    f.put("x", seeded(2 * C, "x"))
    cache = h.cache()
    await cache.populate(f.listing())
    report = await cache.populate(f.listing())
    assert (report.created, report.kept, report.replaced, report.removed) == (0, 1, 0, 0)
    assert os.listdir(h.path(STAGING_DIR)) == []


HOSTILE = [
    "../escape", "a/../../escape2", "/abs/olute", "a//b", "./dot", "dir/./x", "nul\0byte",
    ".hsmfs/staging/evil", ".hsmfs/x", "n" * 256, "/".join(["d" * 200] * 21), "..", ".",
]


async def test_populate_refuses_hostile_keys_and_writes_nothing_outside(h, tmp_path):
    f = h.fetcher
    for i, key in enumerate(HOSTILE):
        f.objects[key] = (seeded(10, f"hostile{i}"), f'"{i:032x}"', None)
    f.put("ok/fine", seeded(10, "fine"))
    f.put("x", seeded(10, "x"))  # both a file and a prefix of x/y: the directory wins
    f.put("x/y", seeded(10, "xy"))
    cache = h.cache()
    report = await cache.populate(f.listing())
    assert {k for k, _ in report.rejected} == {*HOSTILE, "x"}
    assert all(reason for _, reason in report.rejected)
    assert report.created == 2

    assert sorted(os.listdir(tmp_path)) == ["cache"]
    found = set()
    for dirpath, dirnames, filenames in os.walk(h.dir):
        if dirpath == str(h.dir):
            dirnames.remove(".hsmfs")  # hsmfs's own state
        for name in filenames:
            found.add(os.path.relpath(os.path.join(dirpath, name), h.dir))
    assert found == {"ok/fine", "x/y"}
    assert os.listdir(h.path(STAGING_DIR)) == []


async def test_populate_with_prefix_strips_it_and_refuses_the_rest(h, tmp_path):
    f = h.fetcher
    f.put("p/a", seeded(5, "pa"))
    f.put("p/../up", seeded(5, "up"))
    f.put("q/other", seeded(5, "other"))
    cache = h.cache()
    report = await cache.populate(f.listing(), prefix="p/")
    assert report.created == 1
    assert {k for k, _ in report.rejected} == {"p/../up", "q/other"}
    assert cache.stub_at("a") is not None
    assert sorted(os.listdir(tmp_path)) == ["cache"]


async def test_populate_never_follows_a_local_symlink_out_of_the_tree(h, tmp_path):
    """Through the kernel door applications write to the backing tree: one may plant a symlink
    where S3 has a directory.  Populate must neither create stubs nor directories through it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    h.dir.mkdir()
    os.symlink(outside, h.dir / "link")
    f = h.fetcher
    f.put("link/file", seeded(10, "evil-file"))
    f.put("link/sub/deeper", seeded(10, "evil-dir"))
    f.put("fine", seeded(10, "fine"))
    cache = h.cache()
    report = await cache.populate(f.listing())
    assert os.listdir(outside) == []
    assert os.path.islink(h.dir / "link")
    assert cache.stub_at("link/file") is None
    assert cache.stub_at("fine") is not None
    assert report.created == 1


# -- ensure: what gets fetched ----------------------------------------------------------------

async def test_ensure_fetches_exactly_the_missing_chunks_merged(h):
    f = h.fetcher
    size = 16 * C + 100  # 17 chunks, the last one short
    f.put("f", seeded(size, "exact"))
    cache = h.cache(max_request=4 * C)
    await cache.populate(f.listing())
    stub = cache.stub_at("f")
    async with serving(cache, f):
        await cache.ensure(stub, 2 * C + 5, 2 * C + 6)  # one random byte: its page
        await cache.ensure(stub, 5 * C, 6 * C)
        assert f.calls == [("f", 2 * C, 2 * C + 4096), ("f", 5 * C, 6 * C)]
        f.calls.clear()

        await cache.ensure(stub, 0, 12 * C)
        # Missing: 0-1, chunk 2 past its first page, 3-4, 6-11; adjacent gaps merge up to 4
        # chunks per GET.
        assert sorted(f.calls) == [("f", 0, 2 * C), ("f", 2 * C + 4096, 5 * C),
                                   ("f", 6 * C, 10 * C), ("f", 10 * C, 12 * C)]
        f.calls.clear()
        assert spans(stub.ranges) == [(0, 12 * C)]
        assert stub.state == PARTIAL
        assert xattr(h.path("f"), XATTR_STATE) == PARTIAL.encode()
        h.assert_content("f", "f", 0, 12 * C)
        assert data_extents(h.path("f"), size) == [(0, 12 * C)]  # nothing else written

        await cache.ensure(stub, size - 1, size + 4096)  # past the end: only the last chunk
        assert f.calls == [("f", 16 * C, size)]
        f.calls.clear()
        await cache.ensure(stub, size, size + 10)  # entirely past the remote size: nothing
        await cache.ensure(stub, 3 * C + 1, 11 * C - 1)  # resident already: nothing
        assert f.calls == []

        await cache.ensure(stub, 0, size)
        assert f.calls == [("f", 12 * C, 16 * C)]
    assert stub.state == RESIDENT
    assert xattr(h.path("f"), XATTR_STATE) == RESIDENT.encode()
    assert stub.fd is None  # a resident file keeps no descriptor
    h.assert_content("f", "f")
    c = cache.counters
    assert c.chunks_fetched == 18  # chunk 2 was fetched in two pieces
    assert c.fetched_bytes == size
    assert c.s3_gets == 8
    assert c.prefetched_bytes == 0
    assert cache.state_of(stub) == (RESIDENT, size)


async def test_small_files_are_fetched_whole(h):
    f = h.fetcher
    f.put("tiny", seeded(1000, "tiny"))
    f.put("at-limit", seeded(2 * C, "limit"))
    f.put("over-limit", seeded(2 * C + 1, "over"))
    cache = h.cache(small_file=2 * C)
    await cache.populate(f.listing())
    async with serving(cache, f):
        await cache.ensure(cache.stub_at("tiny"), 100, 200)
        await cache.ensure(cache.stub_at("at-limit"), 10, 20)
        await cache.ensure(cache.stub_at("over-limit"), 10, 20)
    # Over the limit: the page read now (a stream from offset 0 reads ahead in the background).
    assert f.calls[:3] == [("tiny", 0, 1000), ("at-limit", 0, 2 * C), ("over-limit", 0, 4096)]
    assert cache.stub_at("tiny").state == RESIDENT
    assert cache.stub_at("at-limit").state == RESIDENT
    assert cache.stub_at("over-limit").state == PARTIAL
    h.assert_content("tiny", "tiny")
    h.assert_content("at-limit", "at-limit")
    h.assert_content("over-limit", "over-limit", 0, 4096)


async def test_whole_fetches_the_entire_file(h):
    f = h.fetcher
    size = 10 * C - 3
    f.put("exe", seeded(size, "exe"), mode=0o100755)
    cache = h.cache(max_request=4 * C)
    await cache.populate(f.listing())
    stub = cache.stub_at("exe")
    async with serving(cache, f):
        await cache.ensure(stub, 0, 1, Intent.WHOLE)
        assert sorted(f.calls) == [("exe", 0, 4 * C), ("exe", 4 * C, 8 * C), ("exe", 8 * C, size)]
        await cache.ensure(stub, 0, size, Intent.WHOLE)
    assert len(f.calls) == 3
    assert stub.state == RESIDENT
    h.assert_content("exe", "exe")
    assert cache.counters.hits == 1


# -- coalescing -----------------------------------------------------------------------------------

async def test_concurrent_ensures_of_a_cold_chunk_make_one_fetch(h):
    f = h.fetcher
    f.put("f", seeded(8 * C, "coalesce"))
    cache = h.cache()
    await cache.populate(f.listing())
    stub = cache.stub_at("f")
    errors: list[BaseException] = []

    async def reader(i: int) -> None:
        try:
            await cache.ensure(stub, 3 * C + i * 500, 3 * C + i * 500 + 10)  # one page
        except BaseException as exc:  # collected, then asserted
            errors.append(exc)
            raise

    f.hold()
    async with serving(cache, f), trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(reader, i)
        # All eight are in: one fetch held at the gate, seven waiting on its flight.
        await until(lambda: f.blocked == 1 and cache.counters.coalesced_waits == 7,
                    "one fetch and seven waiters")
        assert f.calls == [("f", 3 * C, 3 * C + 4096)]
        f.release()
    assert errors == []
    assert f.calls == [("f", 3 * C, 3 * C + 4096)]
    assert cache.counters.coalesced_waits == 7
    assert cache.counters.misses == 8
    assert cache.counters.s3_gets == 1
    h.assert_content("f", "f", 3 * C, 3 * C + 4096)


async def test_overlapping_ensures_share_in_flight_chunks(h):
    """A large request and a small one that overlaps it: the shared chunks are fetched once."""
    f = h.fetcher
    f.put("f", seeded(12 * C, "overlap"))
    cache = h.cache(max_request=8 * C)
    await cache.populate(f.listing())
    stub = cache.stub_at("f")
    f.hold()
    async with serving(cache, f), trio.open_nursery() as nursery:
        nursery.start_soon(cache.ensure, stub, 2 * C, 6 * C)
        await until(lambda: f.blocked == 1, "the first fetch")
        nursery.start_soon(cache.ensure, stub, 4 * C, 8 * C)
        await until(lambda: f.blocked == 2, "the second fetch")
        f.release()
    assert sorted(f.calls) == [("f", 2 * C, 6 * C), ("f", 6 * C, 8 * C)]
    h.assert_content("f", "f", 2 * C, 8 * C)


async def test_cancelled_reader_does_not_fail_the_readers_waiting_on_its_fetch(h):
    """A reader whose request is interrupted (FUSE interrupt, killed process) owned the flight
    others wait on: they must still get their bytes, not an error."""
    f = h.fetcher
    f.put("f", seeded(8 * C, "cancel"))
    cache = h.cache()
    await cache.populate(f.listing())
    stub = cache.stub_at("f")
    errors: list[BaseException] = []
    owner_scope = trio.CancelScope()

    async def owner() -> None:
        with owner_scope:
            await cache.ensure(stub, 3 * C, 3 * C + 10)

    async def waiter() -> None:
        try:
            await cache.ensure(stub, 3 * C + 100, 3 * C + 200)
        except HsmError as exc:
            errors.append(exc)

    f.hold()
    async with serving(cache, f), trio.open_nursery() as nursery:
        nursery.start_soon(owner)
        await until(lambda: f.blocked == 1, "the owner's fetch")
        nursery.start_soon(waiter)
        await until(lambda: cache.counters.coalesced_waits == 1, "the waiter")
        owner_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        f.release()
    assert errors == []
    assert owner_scope.cancelled_caught or stub.ranges.covers(3 * C, 3 * C + 4096)
    h.assert_content("f", "f", 3 * C, 3 * C + 4096)


# -- read-ahead -----------------------------------------------------------------------------------

async def test_sequential_reads_grow_read_ahead(h):
    f = h.fetcher
    size = 40 * C
    f.put("seq", seeded(size, "seq"))
    cache = h.cache(readahead_max=8 * C, max_request=8 * C)
    await cache.populate(f.listing())
    stub = cache.stub_at("seq")
    reads = 16
    async with serving(cache, f):
        for i in range(reads):
            await cache.ensure(stub, i * C, (i + 1) * C)
            await trio.testing.wait_all_tasks_blocked()
        await settle(cache)
    c = cache.counters
    assert c.prefetched_bytes > 0
    assert c.misses < reads  # read-ahead turned later reads into hits
    lengths = [stop - start for _, start, stop in f.calls]
    assert max(lengths) >= 2 * C  # the window grew past one chunk
    assert max(lengths) <= 8 * C  # and never past max_request
    # Nothing fetched twice, nothing fetched past the last read plus the largest window.
    chunks = [i for _, start, stop in f.calls for i in range(start // C, (stop + C - 1) // C)]
    assert len(chunks) == len(set(chunks))
    assert max(chunks) < reads + 8
    assert c.fetched_bytes == sum(lengths)
    resident = spans(stub.ranges)
    assert resident[0][0] == 0 and resident[0][1] >= reads * C
    for start, stop in resident:
        h.assert_content("seq", "seq", start, stop)


async def test_a_sequential_miss_sends_its_read_ahead_alongside_its_own_fetch(h):
    """Like Linux's sync + async read-ahead: the window's GETs go out with the one the reader
    waits for, not a round trip after it (with 20-80 ms of S3 latency, every stall of a
    stream used to cost two); a young window goes out as four GETs, so that its first part
    lands sooner from an S3 that caps each connection's bandwidth."""
    f = h.fetcher
    f.put("s", seeded(40 * C, "alongside"))
    cache = h.cache(readahead_max=8 * C, max_request=8 * C)
    await cache.populate(f.listing())
    stub = cache.stub_at("s")
    f.hold()
    async with serving(cache, f), trio.open_nursery() as nursery:
        nursery.start_soon(cache.ensure, stub, 0, 2 * C)  # starts the file: a stream
        await until(lambda: f.blocked == 5, "the reader's GET and the read-ahead GETs")
        assert sorted((start, stop) for _, start, stop in f.calls) == [
            (0, 2 * C), (2 * C, 4 * C), (4 * C, 6 * C), (6 * C, 8 * C), (8 * C, 10 * C)]
        f.release()
    await settle(cache)
    assert stub.ranges.covers(0, 10 * C)  # the read, and the 4x window after it
    h.assert_content("s", "s", 0, 10 * C)


async def test_one_near_read_in_a_random_stream_stays_page_sized(h):
    """Luck is not a pattern: a random read that happens to land near the previous one fetches
    its pages only; two near reads in a row are a stream and switch to whole chunks, and read
    ahead once its window has doubled to READ_AHEAD_MIN_WINDOW (capped by readahead_max)."""
    f = h.fetcher
    f.put("r", seeded(64 * C, "near"))
    cache = h.cache(readahead_max=4 * C, max_request=4 * C)
    await cache.populate(f.listing())
    stub = cache.stub_at("r")
    async with serving(cache, f):
        for off in (40 * C, 40 * C + 2 * 4096, 10 * C, 50 * C):  # one near pair, then jumps
            await cache.ensure(stub, off, off + 4096)
            await settle(cache)
        assert all(stop - start == 4096 for _, start, stop in f.calls), f.calls
        assert cache.counters.prefetched_bytes == 0
        f.calls.clear()
        for off in (20 * C, 20 * C + 4096, 20 * C + 2 * 4096):  # a stream: near, near
            await cache.ensure(stub, off, off + 4096)
            await settle(cache)
        assert f.calls[-1][2] == 21 * C, f.calls  # whole chunks now: the rest of chunk 20
        assert cache.counters.prefetched_bytes == 0  # but no guesses yet: the window is small
        await cache.ensure(stub, 20 * C + 3 * 4096, 20 * C + 4 * 4096)  # the window doubles
        await settle(cache)
        assert any(stop - start >= C for _, start, stop in f.calls), f.calls
        assert cache.counters.prefetched_bytes > 0
    h.assert_content("r", "r", 20 * C, 21 * C)


async def test_near_pairs_by_luck_in_random_reads_fetch_nothing_extra(h):
    """500 random 4 KiB reads over a file of 1024 chunks, as the bench's rand4k does: pairs
    of near reads happen by luck, and must not turn into read-ahead (amplification 1.24
    before READ_AHEAD_MIN_WINDOW, measured; 1.00 after)."""
    f = h.fetcher
    size = 1024 * C
    f.put("big", seeded(size, "luck"))
    cache = h.cache(readahead_max=1024 * C, max_request=128 * C, chunk_size=128 * C)
    await cache.populate(f.listing())
    stub = cache.stub_at("big")
    offsets = random_offsets(1, size, 4096, 500)  # the bench's: it has near pairs
    async with serving(cache, f):
        for off in offsets:
            await cache.ensure(stub, off, off + 4096)
        await settle(cache)
    assert cache.counters.prefetched_bytes == 0
    assert sum(stop - start for _, start, stop in f.calls) == 4096 * len(set(offsets))
    for off in offsets[:20]:
        h.assert_content("big", "big", off, off + 4096)


async def test_random_reads_do_not_read_ahead(h):
    f = h.fetcher
    f.put("rnd", seeded(64 * C, "rnd"))
    cache = h.cache(readahead_max=8 * C, max_request=8 * C)
    await cache.populate(f.listing())
    stub = cache.stub_at("rnd")
    # Every jump lands more than a chunk away from where the previous read ended.
    order = [40, 10, 55, 25, 3, 33, 60, 17, 47]
    async with serving(cache, f):
        for i in order:
            await cache.ensure(stub, i * C + 7, i * C + 4000)
            await trio.testing.wait_all_tasks_blocked()
        await settle(cache)
    # Random reads fetch only the pages they touch: no amplification, no read-ahead.
    assert sorted(f.calls) == sorted(("rnd", i * C, i * C + 4096) for i in order)
    assert cache.counters.prefetched_bytes == 0
    for i in order:
        h.assert_content("rnd", "rnd", i * C, i * C + 4096)


# -- residency across restarts ------------------------------------------------------------------

async def test_residency_survives_a_restart(h):
    f = h.fetcher
    f.put("part", seeded(8 * C, "part"))
    f.put("full", seeded(3 * C, "full"))
    f.put("cold", seeded(3 * C, "cold"))  # never read
    first = h.cache()
    await first.populate(f.listing())
    async with serving(first, f):
        await first.ensure(first.stub_at("part"), 0, C)
        await first.ensure(first.stub_at("part"), 5 * C, 7 * C)
        await first.ensure(first.stub_at("full"), 0, 3 * C, Intent.WHOLE)
    assert len(f.calls) == 3
    first.close()
    # Leftovers of a crash between create and rename (no data) are swept at start; a file
    # holding data there (one being put back when hsmfs died) is kept.
    with open(h.path(STAGING_DIR) / "0123456789abcdef", "wb") as half:
        half.truncate(3 * C)
    (h.path(STAGING_DIR) / "fedcba9876543210").write_bytes(b"someone's bytes")

    f.calls.clear()
    second = h.cache()
    assert os.listdir(h.path(STAGING_DIR)) == ["fedcba9876543210"]
    os.unlink(h.path(STAGING_DIR) / "fedcba9876543210")
    report = await second.populate(f.listing())
    assert (report.created, report.kept) == (0, 3)
    part, full = second.stub_at("part"), second.stub_at("full")
    assert part.state == PARTIAL and full.state == RESIDENT
    assert second.stub_at("cold").state == STUB
    assert second.state_of(full) == (RESIDENT, 3 * C)
    async with serving(second, f):
        await second.ensure(part, 10, C - 10)
        await second.ensure(part, 5 * C + 1, 7 * C)
        await second.ensure(full, 0, 3 * C)
        assert f.calls == []  # read back from the file's own data extents
        assert spans(part.ranges) == [(0, C), (5 * C, 7 * C)]
        await second.ensure(part, 2 * C, 3 * C)
        assert f.calls == [("part", 2 * C, 3 * C)]
    for start, stop in [(0, C), (2 * C, 3 * C), (5 * C, 7 * C)]:
        h.assert_content("part", "part", start, stop)
    assert data_extents(h.path("part"), 8 * C) == [(0, C), (2 * C, 3 * C), (5 * C, 7 * C)]
    h.assert_content("full", "full")


async def test_default_root_fd(h):
    """Without a private door the cache opens the directory itself."""
    f = h.fetcher
    f.put("k", seeded(100, "k"))
    h.dir.mkdir()
    cache = StubCache(CacheConfig(cache_dir=str(h.dir)), f)
    try:
        await cache.populate(f.listing())
        async with serving(cache, f):
            await cache.ensure(cache.stub_at("k"), 0, 100)
        h.assert_content("k", "k")
    finally:
        cache.close()
        os.close(cache.root_fd)


# -- failures -------------------------------------------------------------------------------------

@pytest.mark.parametrize("exc", [
    Throttled("503 SlowDown after 6 attempts"),
    BackendUnavailable("connection refused"),
    ObjectMissing("404"),
    ShortBody("got 10 bytes"),
    AccessDenied("403"),
], ids=lambda e: type(e).__name__)
async def test_fetch_error_reaches_every_waiter_and_is_counted(h, exc):
    f = h.fetcher
    f.put("f", seeded(8 * C, "fail"))
    cache = h.cache()
    await cache.populate(f.listing())
    stub = cache.stub_at("f")
    raised: list[BaseException] = []

    async def reader(i: int) -> None:
        try:
            await cache.ensure(stub, 2 * C + i, 2 * C + i + 1)
        except HsmError as e:
            raised.append(e)

    f.hold()
    f.fail = exc
    async with serving(cache, f), trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(reader, i)
        await until(lambda: f.blocked == 1 and cache.counters.coalesced_waits == 4, "readers")
        f.release()
    assert len(raised) == 5
    assert all(e is exc for e in raised)  # the one failure, to every reader
    assert to_errno(exc) in DENY_ERRNOS
    assert dict(cache.counters.errors) == {exc.cause: 1}
    assert cache.stats()["errors"] == {exc.cause: 1}
    assert len(f.calls) == 1
    assert stub.state == STUB  # not stale: only a changed object is
    assert not stub.ranges.covers(2 * C, 3 * C)
    assert data_extents(h.path("f"), 8 * C) == []
    assert cache.stats()["inflight_chunks"] == 0

    # The failure is not sticky: once S3 answers, the same range is fetched again.
    f.fail = None
    async with serving(cache, f):
        await cache.ensure(stub, 2 * C, 2 * C + 1)
    assert f.calls[-1] == ("f", 2 * C, 2 * C + 4096)
    h.assert_content("f", "f", 2 * C, 2 * C + 4096)


async def test_object_changed_marks_the_stub_stale(h):
    f = h.fetcher
    f.put("f", seeded(8 * C, "v1"))
    cache = h.cache()
    await cache.populate(f.listing())
    stub = cache.stub_at("f")
    async with serving(cache, f):
        await cache.ensure(stub, 0, C)
        f.put("f", seeded(8 * C, "v2"))  # overwritten in S3 behind the stub's back
        with pytest.raises(ObjectChanged):
            await cache.ensure(stub, 3 * C, 3 * C + 1)
        assert stub.state == STALE
        assert xattr(h.path("f"), XATTR_STATE) == STALE.encode()
        assert cache.counters.errors["changed"] == 1
        assert to_errno(ObjectChanged()) == errno.EIO
        n = len(f.calls)
        with pytest.raises(ObjectChanged):
            await cache.ensure(stub, 5 * C, 5 * C + 1)  # stale: refused without asking S3
        assert len(f.calls) == n
        assert not stub.ranges.covers(3 * C, 4 * C)
        assert data_extents(h.path("f"), 8 * C) == [(0, C)]  # v2 bytes were never written

    # The next listing shows the new version: a clean file with local bytes stays stale (its
    # bytes are v1's and are never stitched to v2's); it is not replaced.
    report = await cache.populate(f.listing())
    assert (report.replaced, report.stale) == (0, 1)
    again = cache.stub_at("f")
    assert again.state == STALE and again.version.etag == stub.version.etag
    async with serving(cache, f):
        with pytest.raises(ObjectChanged):
            await cache.ensure(again, 3 * C, 3 * C + 1)
        (await cache.ensure(again, 0, C)).release()  # its local v1 bytes still read
    assert h.read("f", 0, C) == seeded(8 * C, "v1")[:C]


async def test_short_fetch_never_claims_a_hole(h):
    """A fetcher that breaks its contract (fewer bytes than asked) must not make the cache
    claim bytes that were never written."""
    f = h.fetcher
    f.put("f", seeded(4 * C, "short"))
    cache = h.cache()
    await cache.populate(f.listing())
    stub = cache.stub_at("f")
    f.short = True
    async with serving(cache, f):
        with pytest.raises(ShortBody):
            await cache.ensure(stub, C, C + 1)
    assert not stub.ranges.covers(C, 2 * C)
    assert cache.counters.errors["short_body"] == 1


TMPFS_SIZE = 256 * KiB


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (sparse files and user xattrs work on it): a cache disk that fills."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0755", "tmpfs",
                    str(mnt)], check=True, capture_output=True, timeout=10)
    try:
        yield mnt
    finally:
        r = subprocess.run(["umount", str(mnt)], capture_output=True, timeout=10)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=10)


async def test_full_disk_is_cache_full_and_never_claimed(tiny_fs):
    h = Harness(tiny_fs)
    try:
        f = h.fetcher
        size = 16 * C  # 1 MiB into a 256 KiB filesystem
        f.put("big", seeded(size, "big"))
        cache = h.cache(max_request=2 * C)
        report = await cache.populate(f.listing())
        assert report.created == 1  # a sparse stub costs no data blocks
        stub = cache.stub_at("big")
        async with serving(cache, f):
            with pytest.raises(CacheFull) as ei:
                await cache.ensure(stub, 0, size, Intent.WHOLE)
        assert to_errno(ei.value) == errno.ENOSPC
        assert cache.counters.errors["cache_full"] >= 1
        assert stub.state != RESIDENT
        assert 0 < stub.ranges.total() < size
        # Every byte the map claims is on disk and is the object's byte.
        for start, stop in spans(stub.ranges):
            h.assert_content("big", "big", start, stop)
        # The flights that failed are not claimed, in memory...
        claimed = stub.ranges
        failed = [(s, e) for _, s, e in f.calls if not claimed.covers(s, e)]
        assert failed
        # ...and after a restart the map is rebuilt from what really is on disk: only real
        # bytes of the object (a cut write leaves whole pages of them), never a hole.
        cache.close()
        extents = data_extents(h.path("big"), size)
        assert extents
        for start, stop in extents:
            h.assert_content("big", "big", start, stop)
        again = h.cache(max_request=2 * C)
        await again.populate(f.listing())
        restarted = again.stub_at("big")
        f.fail = BackendUnavailable("S3 must not be asked for resident bytes")
        async with serving(again, f):
            await again.ensure(restarted, *extents[0])
        assert spans(restarted.ranges) == extents
    finally:
        h.close()


# -- the errno table ------------------------------------------------------------------------------

ERRNO_OF = {
    ObjectMissing: errno.EIO,
    ObjectChanged: errno.EIO,
    BackendUnavailable: errno.EIO,
    ShortBody: errno.EIO,
    BadResponse: errno.EIO,  # S3 answered another range or a 200 to a range: never used
    Throttled: errno.EIO,  # not EAGAIN: Python's io reads EAGAIN as "no data yet"
    AccessDenied: errno.EPERM,
    CacheFull: errno.ENOSPC,
    QuotaExceeded: errno.EDQUOT,
    FileBusy: errno.EBUSY,
    TextBusy: errno.ETXTBSY,
    Superseded: errno.EIO,
}


def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub, *_subclasses(sub)}
    return out


def test_deny_errnos_are_the_designed_set():
    assert {errno.EPERM, errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETXTBSY, errno.ENOSPC,
            errno.EDQUOT} == DENY_ERRNOS


def test_to_errno_table_is_complete():
    # A new HsmError without a row here fails this test: the table must be decided, not guessed.
    assert _subclasses(HsmError) == set(ERRNO_OF)
    for cls, expected in ERRNO_OF.items():
        assert to_errno(cls("x")) == expected, cls
        assert expected in DENY_ERRNOS
    causes = [cls.cause for cls in ERRNO_OF]
    assert len(set(causes)) == len(causes)  # counter keys never collide
    assert cause_of(CacheFull()) == "cache_full"


@pytest.mark.parametrize("code", sorted(errno.errorcode))
def test_to_errno_of_any_oserror_stays_in_the_deny_set(code):
    got = to_errno(OSError(code, os.strerror(code)))
    assert got in DENY_ERRNOS
    assert got == (code if code in DENY_ERRNOS else errno.EIO)


@pytest.mark.parametrize("exc", [HsmError("base"), ValueError("bug"), RuntimeError("bug"),
                                 KeyError("k"), OSError("no errno"), KeyboardInterrupt()],
                         ids=lambda e: type(e).__name__)
def test_to_errno_fails_closed_with_eio(exc):
    assert to_errno(exc) == errno.EIO


# -- user.hsm.error (issue 13, item 3) ------------------------------------------------------------

async def test_last_error_is_written_once_per_failure_and_rate_limited_over_files(h):
    """A storm of one failure on one file writes its xattr once; failures over many files share
    one bucket (memory only beyond it, which the FUSE door shows); a served miss removes it."""
    from hsmfs.cache import ERROR_WRITE_BURST, ERROR_WRITES_PER_S
    from hsmfs.stubfile import X_ERROR

    f = h.fetcher
    n = ERROR_WRITE_BURST + 20
    for i in range(n):
        f.put(f"d/{i:03}", seeded(2 * C, f"storm{i}"))
    cache = h.cache(small_file=0)
    await cache.populate(f.listing())
    f.fail = BackendUnavailable("S3 down")
    async with serving(cache, f):
        for _ in range(10):
            with pytest.raises(BackendUnavailable):
                await cache.ensure(cache.stub_at("d/000"), 0, 4096)
        assert cache.counters.error_views_written == 1
        first = xattr(h.path("d/000"), X_ERROR)
        assert first is not None and first.startswith(b"cause=unavailable errno=EIO time=")
        started = time.monotonic()
        for i in range(1, n):
            with pytest.raises(BackendUnavailable):
                await cache.ensure(cache.stub_at(f"d/{i:03}"), 0, 4096)
        elapsed = time.monotonic() - started
        written = cache.counters.error_views_written
        skipped = cache.counters.error_views_skipped
        # The bucket: a burst, then ERROR_WRITES_PER_S; a slow (loaded) machine refills more
        # while the loop runs, so the bound is the elapsed time's, not a fixed count.
        assert written + skipped == n, (written, skipped)
        assert written <= ERROR_WRITE_BURST + 1 + ERROR_WRITES_PER_S * elapsed + 1, \
            (written, skipped, elapsed)
        if elapsed < 0.5:
            assert skipped > 0, (written, skipped, elapsed)
        assert all(s.error for s in cache.stubs())  # memory has every one
        on_disk = sum(xattr(h.path(f"d/{i:03}"), X_ERROR) is not None for i in range(n))
        assert on_disk == written
        # Served: gone from memory and disk.
        f.fail = None
        await cache.ensure(cache.stub_at("d/000"), 0, 4096)
        assert cache.stub_at("d/000").error is None
        assert xattr(h.path("d/000"), X_ERROR) is None
        await settle(cache)
