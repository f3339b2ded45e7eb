"""Directory read-ahead: the policy (hsmfs.siblings) and the cache fetching what it picks.

The cache tests run against the in-memory fetcher at the cache's seam (t2_cache.Harness); the
doors' end-to-end version (grep over a tree through each door, against moto) is in t4_read.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import trio
import trio.testing
from conftest import seeded
from t2_cache import KiB, h, serving, settle  # noqa: F401 - h is a fixture

from hsmfs.errors import BackendUnavailable
from hsmfs.siblings import SiblingReadAhead, extension

# -- the policy ---------------------------------------------------------------------------------


@dataclass
class F:
    path: str
    size: int = 1000


def policy(files: list[F], budget: int = 10**9, small: int = 4096,
           done: set[str] | None = None) -> SiblingReadAhead:
    done = done if done is not None else set()

    def siblings(d: str) -> list[F]:
        return [f for f in files if f.path.rpartition("/")[0] == d]

    return SiblingReadAhead(budget, small, siblings, lambda f: f.path not in done)


def paths(picked) -> list[str]:
    return [f.path for f in picked]


def test_extension():
    assert extension("a/b.py") == ".py"
    assert extension("a.b/c") == ""
    assert extension("a/.bashrc") == ""
    assert extension("x.tar.gz") == ".gz"


def test_one_read_is_not_a_walk_and_two_are():
    files = [F(f"d/{n}.py") for n in "abcde"]
    p = policy(files)
    assert p.note_whole_read(files[2]) == []
    # The second read triggers: every other unread sibling, in name order.
    assert paths(p.note_whole_read(files[0])) == ["d/b.py", "d/d.py", "d/e.py"]
    assert p.note_whole_read(files[1]) == []  # a directory triggers once


def test_only_matching_extensions_small_files_and_unfetched_ones():
    files = [F("d/a.py"), F("d/b.py"), F("d/c.py"), F("d/data.bin"), F("d/README"),
             F("d/big.py", size=10_000), F("d/done.py")]
    p = policy(files, done={"d/done.py"})
    p.note_whole_read(files[0])
    assert paths(p.note_whole_read(files[1])) == ["d/c.py"]


def test_the_budget_bounds_the_bytes_picked():
    files = [F(f"d/{i:02}.txt", size=1000) for i in range(20)]
    p = policy(files, budget=3500)
    p.note_whole_read(files[0])
    assert paths(p.note_whole_read(files[1])) == ["d/02.txt", "d/03.txt", "d/04.txt"]


def test_a_walk_continues_into_subdirectories_on_their_first_read():
    files = [F("top/a.c"), F("top/b.c"), F("top/sub/x.c"), F("top/sub/y.c"),
             F("top/sub/deeper/z.c"), F("top/sub/deeper/w.c"), F("far/away/p.c"),
             F("far/away/q.c")]
    p = policy(files)
    p.note_whole_read(files[0])
    p.note_whole_read(files[1])
    assert paths(p.note_whole_read(files[2])) == ["top/sub/y.c"]
    assert paths(p.note_whole_read(files[4])) == ["top/sub/deeper/w.c"]
    assert p.note_whole_read(files[6]) == []  # neither below nor next to a walk: needs two


def test_a_walk_continues_into_sibling_directories_on_their_first_read():
    files = [F("src/json/a.py"), F("src/json/b.py"), F("src/json/c.py"),
             F("src/http/x.py"), F("src/http/y.py"), F("doc/m.txt"), F("doc/n.txt")]
    p = policy(files)
    p.note_whole_read(files[0])
    assert paths(p.note_whole_read(files[1])) == ["src/json/c.py"]
    assert paths(p.note_whole_read(files[3])) == ["src/http/y.py"]  # next to a walked one
    assert p.note_whole_read(files[5]) == []  # doc/ is next to src/, not to src/json/


def test_big_files_and_a_zero_budget_never_trigger():
    files = [F("d/a", 5000), F("d/b", 5000), F("d/c")]
    p = policy(files)
    p.note_whole_read(files[0])
    assert p.note_whole_read(files[1]) == []
    small = [F("e/a"), F("e/b"), F("e/c")]
    off = policy(small, budget=0)
    off.note_whole_read(small[0])
    assert off.note_whole_read(small[1]) == []


def test_top_level_files_walk_too():
    files = [F("a.md"), F("b.md"), F("c.md")]
    p = policy(files)
    p.note_whole_read(files[0])
    assert paths(p.note_whole_read(files[1])) == ["c.md"]


# -- the cache ----------------------------------------------------------------------------------

def put_tree(f, n: int, ext: str = ".py", top: str = "src") -> dict[str, bytes]:
    out = {}
    for i in range(n):
        key = f"{top}/m{i:03}{ext}"
        f.put(key, seeded(3 * KiB + i, key))
        out[key] = f.data(key)
    return out


async def test_reading_two_files_fetches_the_rest_of_the_directory(h):  # noqa: F811
    f = h.fetcher
    tree = put_tree(f, 12)
    f.put("src/data.bin", seeded(2 * KiB, "data"))  # other extension: never guessed
    f.put("src/huge.py", seeded(64 * KiB, "huge"))  # over small_file: never guessed
    cache = h.cache(dir_readahead=1 << 20)
    await cache.populate(f.listing())
    async with serving(cache, f):
        for key in ("src/m000.py", "src/m001.py"):
            await cache.ensure(cache.stub_at(key), 0, 100)
        await settle(cache)
        await trio.testing.wait_all_tasks_blocked()
    fetched = sorted(key for key, _, _ in f.calls)
    assert fetched == sorted(tree)  # each .py once, nothing else
    assert cache.counters.sibling_prefetches == 10
    for key in tree:
        assert cache.stub_at(key).state == "resident"
        h.assert_content(key, key)
    assert cache.stub_at("src/data.bin").state == "stub"
    assert cache.stub_at("src/huge.py").state == "stub"


async def test_a_reader_racing_the_prefetch_fetches_each_file_once(h):  # noqa: F811
    """The program reads every file while directory read-ahead runs: each object is still
    fetched exactly once, and every read returns S3's bytes."""
    f = h.fetcher
    tree = put_tree(f, 30)
    cache = h.cache(dir_readahead=1 << 20, concurrency=4)
    await cache.populate(f.listing())
    async with serving(cache, f):
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for key in reversed(sorted(tree)):  # against the prefetch's order
                    nursery.start_soon(cache.ensure, cache.stub_at(key), 0, 10)
        await settle(cache)
    assert sorted(key for key, _, _ in f.calls) == sorted(tree)
    for key in tree:
        h.assert_content(key, key)


async def test_a_failed_sibling_prefetch_leaves_a_stub_that_a_read_retries(h):  # noqa: F811
    f = h.fetcher
    put_tree(f, 6)
    cache = h.cache(dir_readahead=1 << 20)
    await cache.populate(f.listing())
    async with serving(cache, f):
        await cache.ensure(cache.stub_at("src/m000.py"), 0, 10)
        f.fail = BackendUnavailable("503 while guessing")
        with pytest.raises(BackendUnavailable):  # this read triggers the guesses, which fail too
            await cache.ensure(cache.stub_at("src/m001.py"), 0, 10)
        await settle(cache)
        assert cache.counters.sibling_prefetches == 4
        assert cache.stub_at("src/m003.py").state == "stub"  # never claimed
        f.fail = None
        await cache.ensure(cache.stub_at("src/m003.py"), 0, 10)
    h.assert_content("src/m003.py", "src/m003.py")


async def test_dir_readahead_zero_fetches_only_what_is_read(h):  # noqa: F811
    f = h.fetcher
    put_tree(f, 8)
    cache = h.cache(dir_readahead=0)
    await cache.populate(f.listing())
    async with serving(cache, f):
        for key in ("src/m000.py", "src/m001.py", "src/m002.py"):
            await cache.ensure(cache.stub_at(key), 0, 100)
        await settle(cache)
    assert sorted(key for key, _, _ in f.calls) == ["src/m000.py", "src/m001.py", "src/m002.py"]
