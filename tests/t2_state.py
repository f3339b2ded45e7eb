"""The state machine of the core (hsmfs.cache over a real directory, the in-memory S3 of
t2_cache at the Fetcher seam): every transition's persisted record, what a restart re-derives,
and the rules that keep local data and never serve a hole.  The same scenarios through the
real doors and a real S3 server are in t4_state.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from conftest import seeded
from t2_cache import C, Harness, data_extents, serving, xattr

from hsmfs.cache import CONFLICT, DIRTY, PARTIAL, RESIDENT, STALE, STUB, Intent
from hsmfs.errors import ObjectChanged, Superseded
from hsmfs.stubfile import X_OWED, X_SYNC, X_VIEW, read_record


@pytest.fixture(name="h")
def _harness(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    try:
        yield harness
    finally:
        harness.close()


def rw(h: Harness, rel: str) -> int:
    return os.open(h.path(rel), os.O_RDWR)


async def test_truncate_fetches_nothing_and_persists_owed_and_dirty_first(h):
    f = h.fetcher
    f.put("big", seeded(32 * C, "big"))
    cache = h.cache()
    await cache.populate(f.listing())
    stub = cache.stub_at("big")
    fd = rw(h, "big")
    try:
        async with serving(cache, f):
            pin = await cache.ensure(stub, C + 100, C + 100, Intent.TRUNCATE, fd=fd)
            pin.release()
            assert f.calls == []  # the bytes thrown away are never downloaded
            # Persisted before the truncate may land: owed lowered, dirty.
            assert xattr(h.path("big"), X_OWED) == str(C + 100).encode()
            assert xattr(h.path("big"), X_SYNC) == DIRTY.encode()
            os.ftruncate(fd, C + 100)  # what the program's truncate then does
            (await cache.ensure(stub, 0, C + 100)).release()
        assert h.read("big") == seeded(32 * C, "big")[:C + 100]
        assert stub.state == DIRTY and stub.local
    finally:
        os.close(fd)


async def test_a_truncate_found_by_size_is_recorded(h):
    f = h.fetcher
    f.put("f", seeded(4 * C, "f"))
    cache = h.cache()
    await cache.populate(f.listing())
    os.truncate(h.path("f"), 2 * C)  # behind hsmfs's back (no daemon, or a resident file)
    fd = os.open(h.path("f"), os.O_RDONLY)
    try:
        async with serving(cache, f):
            stub = await cache.lookup(fd)
            assert stub is cache.stub_at("f") and stub.owed == 2 * C and stub.sync == DIRTY
            (await cache.ensure(stub, 0, 4 * C)).release()
        assert f.calls == [("f", 0, 2 * C)]
    finally:
        os.close(fd)
    h.assert_content("f", "f", 0, 2 * C)


async def test_restart_keeps_local_changes_as_conflict_when_s3_changes_or_deletes(h):
    f = h.fetcher
    f.put("edit", seeded(3 * C, "edit-v1"))
    f.put("gone", seeded(3 * C, "gone-v1"))
    first = h.cache()
    await first.populate(f.listing())
    async with serving(first, f):
        for rel in ("edit", "gone"):
            stub = first.stub_at(rel)
            (await first.ensure(stub, 0, 3 * C, Intent.WHOLE)).release()
            await first.truncate(stub, 100)  # recorded first, as the kernel door does
            os.truncate(h.path(rel), 100)  # then the program's truncate lands
    first.close()
    f.put("edit", seeded(3 * C, "edit-v2"))
    f.delete("gone")

    second = h.cache()
    report = await second.populate(f.listing())
    assert report.conflicts == 2 and report.removed == report.replaced == 0
    for rel in ("edit", "gone"):
        assert h.read(rel) == seeded(3 * C, f"{rel}-v1")[:100]  # nothing local was lost
        assert second.stub_at(rel).state == CONFLICT
        assert xattr(h.path(rel), X_SYNC) == CONFLICT.encode()
        assert xattr(h.path(rel), X_VIEW) == CONFLICT.encode()
    assert second.stub_at("edit").remote == f.info("edit").version.etag
    assert second.stub_at("gone").remote == "-"


async def test_clean_files_follow_s3_and_partial_ones_go_stale(h):
    f = h.fetcher
    for rel in ("cold", "part", "del-cold", "del-part"):
        f.put(rel, seeded(3 * C, f"{rel}-v1"))
    first = h.cache()
    await first.populate(f.listing())
    async with serving(first, f):
        for rel in ("part", "del-part"):
            (await first.ensure(first.stub_at(rel), 0, 10)).release()
    first.close()
    f.put("cold", seeded(3 * C, "cold-v2"))
    f.put("part", seeded(3 * C, "part-v2"))
    f.delete("del-cold")
    f.delete("del-part")
    second = h.cache()
    report = await second.populate(f.listing())
    # A deleted object's copy goes only if nothing of it is local: a write into resident
    # bytes raises no event, so local bytes are never assumed to be S3's.
    assert (report.replaced, report.stale, report.removed) == (1, 2, 1)
    assert not h.path("del-cold").exists()
    assert second.stub_at("del-part").state == STALE
    assert second.stub_at("del-part").remote == "-"
    part = second.stub_at("part")
    assert part.state == STALE
    async with serving(second, f):
        (await second.ensure(second.stub_at("cold"), 0, 3 * C)).release()
        with pytest.raises(ObjectChanged):
            await second.ensure(part, 2 * C, 3 * C)  # never stitched from v2
        (await second.ensure(part, 0, 10)).release()  # its own v1 bytes still read
    h.assert_content("cold", "cold")
    assert h.read("part", 0, 10) == seeded(3 * C, "part-v1")[:10]


async def test_a_forged_view_word_is_never_trusted(h):
    f = h.fetcher
    f.put("f", seeded(3 * C, "f"))
    first = h.cache()
    await first.populate(f.listing())
    first.close()
    os.setxattr(h.path("f"), X_VIEW, RESIDENT.encode())  # anyone who can write the file can
    os.setxattr(h.path("f"), "user.hsmfs.size", b"0")
    second = h.cache()
    await second.populate(f.listing())
    stub = second.stub_at("f")
    assert stub.state == STUB and not stub.local  # from the extents, never from a word
    assert xattr(h.path("f"), X_VIEW) == STUB.encode()  # and the view is put right
    async with serving(second, f):
        (await second.ensure(stub, 0, 3 * C)).release()
    h.assert_content("f", "f")


async def test_a_restarted_worker_adopts_the_tree_without_s3(h):
    f = h.fetcher
    f.put("a", seeded(3 * C, "a"))
    f.put("b", seeded(3 * C, "b"))
    first = h.cache()
    await first.populate(f.listing())
    async with serving(first, f):
        (await first.ensure(first.stub_at("a"), 0, 3 * C)).release()
    first.close()
    f.fail = ObjectChanged("S3 is not asked")
    second = h.cache()
    report = await second.populate(None)
    assert report.kept == 2
    assert second.stub_at("a").state == RESIDENT and second.stub_at("b").state == STUB


async def test_unknown_inodes_local_files_and_reused_numbers(h):
    f = h.fetcher
    f.put("f", seeded(3 * C, "f"))
    cache = h.cache()
    await cache.populate(f.listing())
    old = cache.stub_at("f")
    h.path("mine").write_bytes(b"local")
    fd = os.open(h.path("mine"), os.O_RDONLY)
    try:
        assert await cache.lookup(fd) is None  # created locally: nothing owed
    finally:
        os.close(fd)
    # An application removes the stub; the next file it creates may reuse the inode number.
    os.unlink(h.path("f"))
    for i in range(50):
        h.path(f"new{i}").write_bytes(b"x")
        if os.stat(h.path(f"new{i}")).st_ino == old.ino:
            fd = os.open(h.path(f"new{i}"), os.O_RDONLY)
            try:
                assert await cache.lookup(fd) is None  # (inode, generation) differs
            finally:
                os.close(fd)
            break


async def test_a_stub_renamed_over_is_still_served_through_the_programs_fd(h):
    f = h.fetcher
    f.put("f", seeded(3 * C, "f"))
    cache = h.cache()
    await cache.populate(f.listing())
    fd = rw(h, "f")  # a program holds the stub (the kernel door's event fd is O_RDWR)
    h.path("tmp").write_bytes(b"replacement")
    os.rename(h.path("tmp"), h.path("f"))  # e.g. Python rewriting a .pyc
    try:
        async with serving(cache, f):
            stub = await cache.lookup(fd)
            assert stub is not None
            (await cache.ensure(stub, 0, 3 * C, fd=fd)).release()
            assert stub.superseded
            assert cache.stub_at("f") is None  # the path now holds a local file
            assert os.pread(fd, 3 * C, 0) == seeded(3 * C, "f")
            # Without an fd to fill through, it fails: never zeros.
            f.put("g", seeded(3 * C, "g"))
            await cache.populate(f.listing())
            g = cache.stub_at("g")
            gfd = rw(h, "g")
            os.unlink(h.path("g"))
            try:
                with pytest.raises(Superseded):
                    await cache.ensure(g, 0, 10)
                (await cache.ensure(g, 0, 10, fd=gfd)).release()
                assert os.pread(gfd, 10, 0) == seeded(3 * C, "g")[:10]
            finally:
                os.close(gfd)
    finally:
        os.close(fd)
    assert h.read("f") == b"replacement"


async def test_a_removed_stub_is_found_again_by_its_record(h):
    """A worker that never knew the inode (restarted after the replace) serves it from its
    record through the door's fd: resident bytes read, missing ones of a changed object fail."""
    f = h.fetcher
    f.put("f", seeded(4 * C, "f-v1"))
    first = h.cache()
    await first.populate(f.listing())
    fd = rw(h, "f")
    try:
        async with serving(first, f):
            (await first.ensure(first.stub_at("f"), 0, 10)).release()
        first.close()
        os.unlink(h.path("f"))
        second = h.cache()
        await second.populate(f.listing())  # the object is listed: a new stub at the path
        async with serving(second, f):
            stub = await second.lookup(fd)
            assert stub is not None and stub.superseded and stub.state == PARTIAL
            (await second.ensure(stub, 2 * C, 3 * C, fd=fd)).release()  # S3 still has it
            assert os.pread(fd, C, 2 * C) == seeded(4 * C, "f-v1")[2 * C:3 * C]
            f.put("f", seeded(4 * C, "f-v2"))
            with pytest.raises(ObjectChanged):
                await second.ensure(stub, 3 * C, 4 * C, fd=fd)
        rec = read_record(fd)
        assert rec is not None and rec.sync == STALE
    finally:
        os.close(fd)


async def test_pins_count_the_doors_serving_bytes(h):
    f = h.fetcher
    f.put("f", seeded(3 * C, "f"))
    cache = h.cache()
    await cache.populate(f.listing())
    stub = cache.stub_at("f")
    async with serving(cache, f):
        with trio.fail_after(10):
            pin = await cache.ensure(stub, 0, 10)
            assert stub.pins == 1
            with await cache.ensure(stub, 0, 10):
                assert stub.pins == 2
            pin.release()
            pin.release()  # idempotent
            assert stub.pins == 0
            f.fail = ObjectChanged("412")
            with pytest.raises(ObjectChanged):
                await cache.ensure(stub, 2 * C, 3 * C)
            assert stub.pins == 0  # a failed ensure holds nothing


async def test_legacy_records_are_not_trusted(h):
    f = h.fetcher
    f.put("empty-old", seeded(2 * C, "e"))
    f.put("data-old", seeded(2 * C, "d"))
    h.dir.mkdir(parents=True, exist_ok=True)
    for rel, data in (("empty-old", b""), ("data-old", b"mine")):
        path = h.path(rel)
        with open(path, "wb") as out:
            out.write(data)
        os.truncate(path, 2 * C)
        os.setxattr(path, "user.hsmfs.key", rel.encode())
        os.setxattr(path, "user.hsm.state", b"resident")
    cache = h.cache()
    await cache.populate(f.listing())
    assert cache.stub_at("empty-old").state == STUB  # nothing local: re-made as a stub
    assert cache.stub_at("data-old") is None  # data of unknown origin: left alone
    assert h.read("data-old", 0, 4) == b"mine"
    assert data_extents(h.path("empty-old"), 2 * C) == []


async def test_a_clean_file_of_another_length_at_start_is_dirty(h):
    """A resident file raises no events, so a truncate of it can happen unseen (or while no
    daemon runs): the next start compares lengths and keeps the change."""
    f = h.fetcher
    f.put("f", seeded(3 * C, "f-v1"))
    first = h.cache()
    await first.populate(f.listing())
    async with serving(first, f):
        (await first.ensure(first.stub_at("f"), 0, 3 * C)).release()
    first.close()
    os.truncate(h.path("f"), 100)
    f.put("f", seeded(3 * C, "f-v2"))
    second = h.cache()
    report = await second.populate(f.listing())
    assert report.conflicts == 1
    assert h.read("f") == seeded(3 * C, "f-v1")[:100]
    assert second.stub_at("f").state == CONFLICT


async def test_a_write_makes_the_file_whole_then_dirty_before_it_lands(h):
    f = h.fetcher
    f.put("f", seeded(5 * C, "f"))
    f.put("stale", seeded(2 * C, "s-v1"))
    cache = h.cache()
    await cache.populate(f.listing())
    stub = cache.stub_at("f")
    async with serving(cache, f):
        (await cache.ensure(stub, 2 * C, 2 * C + 10, Intent.WRITE)).release()
        assert stub.local and stub.state == DIRTY
        assert xattr(h.path("f"), X_SYNC) == DIRTY.encode()  # durable before the write lands
        h.assert_content("f", "f")  # every byte S3 owed is local: no hole is owed any more
        stale = cache.stub_at("stale")
        (await cache.ensure(stale, 0, 10)).release()
        f.put("stale", seeded(2 * C, "s-v2"))
        with pytest.raises(ObjectChanged):
            await cache.ensure(stale, C, C + 10)
        with pytest.raises(ObjectChanged):  # a stale copy cannot be completed to be written
            await cache.ensure(stale, 0, 10, Intent.WRITE)
        await cache.mark_dirty(stale)  # a change found after the fact
        assert stale.state == CONFLICT


async def test_fills_keep_the_versions_mtime_and_a_start_sees_a_same_length_write(h):
    f = h.fetcher
    f.put("f", seeded(3 * C, "f-v1"))
    first = h.cache()
    await first.populate(f.listing())
    async with serving(first, f):
        (await first.ensure(first.stub_at("f"), 0, C)).release()
        (await first.ensure(first.stub_at("f"), 2 * C, 3 * C)).release()
    assert os.stat(h.path("f")).st_mtime == pytest.approx(f.info("f").version.mtime, abs=1e-3)
    first.close()
    second = h.cache()
    assert (await second.populate(f.listing())).kept == 1
    assert second.stub_at("f").state == PARTIAL  # fills alone: still clean
    second.close()
    with open(h.path("f"), "r+b") as out:  # a same-length in-place edit while no daemon ran
        out.write(b"EDIT")
    third = h.cache()
    await third.populate(f.listing())
    assert third.stub_at("f").state == DIRTY
    assert h.read("f", 0, 4) == b"EDIT"


async def test_a_door_tells_the_core_of_renames_and_removals(h):
    f = h.fetcher
    for rel in ("d/a", "d/b", "x"):
        f.put(rel, seeded(C, rel))
    cache = h.cache()
    await cache.populate(f.listing())
    a, b, x = cache.stub_at("d/a"), cache.stub_at("d/b"), cache.stub_at("x")
    os.rename(h.path("d"), h.path("e"))
    cache.moved({"d": "e"})
    assert cache.stub_at("e/a") is a and cache.stub_at("e/b") is b and cache.stub_at("d/a") is None
    os.rename(h.path("e/a"), h.path("x"))
    cache.moved({"e/a": "x"})
    assert cache.stub_at("x") is a and x.superseded  # the one it replaced stays served
    os.unlink(h.path("e/b"))
    cache.unlinked("e/b", b.ino)
    assert cache.stub_at("e/b") is None and b.superseded
    async with serving(cache, f):
        (await cache.ensure(a, 0, C)).release()
    h.assert_content("x", "d/a")


async def test_metadata_never_makes_a_setuid_file(h):
    f = h.fetcher
    f.put("tool", seeded(10, "tool"), mode=0o104755)
    cache = h.cache()
    await cache.populate(f.listing())
    assert os.stat(h.path("tool")).st_mode & 0o7777 == 0o755
