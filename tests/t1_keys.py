"""Hostile S3 keys through ``keys.key_to_relpath`` and ``keys.place``.

An S3 key is any UTF-8 string; the backing tree is a real directory.  Every key that is accepted
must land strictly inside the cache root and never in hsmfs's own ``.hsmfs`` state; every key that
is refused says why, in words a log reader understands.
"""

from __future__ import annotations

import os.path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hsmfs.keys import NAME_MAX, PATH_MAX, STATE_DIR, key_to_relpath, place

ROOT = "/srv/hsmfs-cache"

LONG_NAME = "n" * (NAME_MAX + 1)  # 256 bytes
LONG_PATH = "/".join(["d" * 200] * 21)  # 21 * 201 - 1 = 4220 bytes > PATH_MAX, names all legal


@pytest.mark.parametrize(
    ("key", "prefix", "reason_word"),
    [
        ("..", "", "'..'"),
        ("../escape", "", "'..'"),
        ("a/../b", "", "'..'"),
        ("a/..", "", "'..'"),
        ("p/../../etc/passwd", "p/", "'..'"),
        ("/etc/passwd", "", "absolute"),
        ("p//etc/passwd", "p/", "absolute"),  # prefix + "/..." is absolute once the prefix goes
        ("a//b", "", "empty path segment"),
        ("a//b/", "", "empty path segment"),  # a directory marker with an empty segment
        (".", "", "'.'"),
        ("./a", "", "'.'"),
        ("a/./b", "", "'.'"),
        ("a\0b", "", "NUL"),
        ("\0", "", "NUL"),
        (LONG_NAME, "", f"longer than {NAME_MAX} bytes"),
        ("dir/" + LONG_NAME + "/x", "", f"longer than {NAME_MAX} bytes"),
        # Multi-byte UTF-8: 128 characters, 256 bytes; the limit is in bytes, not characters.
        ("é" * 128, "", f"longer than {NAME_MAX} bytes"),
        (LONG_PATH, "", f"longer than {PATH_MAX} bytes"),
        (f"{STATE_DIR}/x", "", "reserved"),
        (f"{STATE_DIR}/staging/abc", "", "reserved"),
        (f"{STATE_DIR}/", "", "reserved"),
        (f"p/{STATE_DIR}/x", "p/", "reserved"),
        ("other/x", "p/", "outside the prefix"),
        ("px", "p/", "outside the prefix"),
        ("p", "p/", "outside the prefix"),
        ("p/", "p/", "prefix itself"),
    ],
)
def test_hostile_key_is_refused_with_a_clear_reason(key, prefix, reason_word):
    rel, reason = key_to_relpath(key, prefix)
    assert rel is None
    assert reason_word in reason
    # A reason reads as the rest of "key ...": short, one line, no repr of the whole key.
    assert "\n" not in reason and len(reason) < 80


@pytest.mark.parametrize(
    ("key", "prefix", "rel"),
    [
        ("a", "", "a"),
        ("a/b/c.txt", "", "a/b/c.txt"),
        ("p/a/b", "p/", "a/b"),
        ("dir/", "", "dir/"),  # directory marker keeps its slash so callers can tell
        ("p/dir/sub/", "p/", "dir/sub/"),
        ("..a", "", "..a"),  # dots inside a name are just a name
        ("a..", "", "a.."),
        ("...", "", "..."),
        (".hidden", "", ".hidden"),
        (f"{STATE_DIR}x", "", f"{STATE_DIR}x"),  # only the exact reserved name is refused
        (f"a/{STATE_DIR}/x", "", f"a/{STATE_DIR}/x"),  # reserved only at the root
        ("n" * NAME_MAX, "", "n" * NAME_MAX),  # exactly NAME_MAX is fine
        ("with space/and\ttab/ünïcödé", "", "with space/and\ttab/ünïcödé"),
        ("back\\slash", "", "back\\slash"),
    ],
)
def test_ordinary_keys_are_kept(key, prefix, rel):
    assert key_to_relpath(key, prefix) == (rel, "")


def test_path_max_boundary():
    # Exactly PATH_MAX bytes is allowed, one more is not.
    names = ["d" * 200] * 20
    base = "/".join(names)  # 4019 bytes
    fits = base + "/" + "f" * (PATH_MAX - len(base) - 1)
    assert len(fits.encode()) == PATH_MAX
    assert key_to_relpath(fits, "") == (fits, "")
    too_long = fits + "g"
    rel, reason = key_to_relpath(too_long, "")
    assert rel is None and str(PATH_MAX) in reason


def test_place_file_and_prefix_of_other_keys():
    """``a`` and ``a/b``: a path cannot be a file and a directory; the directory wins."""
    p = place(["a", "a/b"], "")
    assert p.files == {"a/b": "a/b"}
    assert p.dirs == {"a"}
    assert p.rejected == [("a", "is both an object and a prefix of other keys")]
    # Order of the listing does not change the outcome.
    q = place(["a/b", "a"], "")
    assert (q.files, q.dirs, q.rejected) == (p.files, p.dirs, p.rejected)


def test_place_file_and_directory_marker():
    p = place(["a", "a/"], "")
    assert p.files == {}
    assert p.dirs == {"a"}
    assert [k for k, _ in p.rejected] == ["a"]


def test_repeated_trailing_slashes_are_one_directory_marker():
    assert key_to_relpath("a///", "") == ("a///", "")
    p = place(["a///", "a/"], "")
    assert (p.files, p.dirs, p.rejected) == ({}, {"a"}, [])


def test_place_directory_markers_and_parents():
    p = place(["top/", "x/y/z/", "x/y/f", "g"], "")
    assert p.files == {"x/y/f": "x/y/f", "g": "g"}
    assert p.dirs == {"top", "x", "x/y", "x/y/z"}
    assert p.rejected == []


def test_place_with_prefix_and_hostile_mix():
    keys = [
        "p/ok.txt", "p/d/e.bin", "p/../etc/passwd", "p//abs", "p/a//b", "p/./x", "q/outside",
        "p/.hsmfs/x", "p/nul\0", "p/" + LONG_NAME, "p/sub/", "p/",
    ]
    p = place(keys, "p/")
    assert p.files == {"ok.txt": "p/ok.txt", "d/e.bin": "p/d/e.bin"}
    assert p.dirs == {"d", "sub"}
    rejected = dict(p.rejected)
    assert set(rejected) == set(keys) - {"p/ok.txt", "p/d/e.bin", "p/sub/"}
    assert all(reason for reason in rejected.values())
    assert "outside the prefix" in rejected["q/outside"]
    assert "reserved" in rejected["p/.hsmfs/x"]


def test_place_dirs_sort_parents_first():
    p = place(["a/b/c/d/e"], "")
    ordered = sorted(p.dirs, key=lambda d: d.count("/"))
    assert ordered == ["a", "a/b", "a/b/c", "a/b/c/d"]


# -- property: accepted means strictly inside the root --------------------------------------------

# Keys built from the pieces that make paths dangerous, plus arbitrary text.
_piece = st.sampled_from(["", ".", "..", "...", "/", "//", "a", "b", STATE_DIR, "\0", "é", "\\",
                          " ", "~", "$HOME", "%2e%2e"])
_keys = st.one_of(
    st.lists(_piece, max_size=8).map("".join),
    st.lists(st.one_of(_piece, st.text(max_size=6)), max_size=8).map("/".join),
    st.text(max_size=40),
)
_prefixes = st.sampled_from(["", "p/", "deep/er/"])


def _inside(rel: str) -> None:
    path = os.path.normpath(os.path.join(ROOT, rel))
    assert path.startswith(ROOT + os.sep), (rel, path)
    assert path != ROOT
    # Normalization must not have changed anything: no segment was "." or ".." or empty.
    assert path == ROOT + "/" + rel.rstrip("/")
    assert os.path.relpath(path, ROOT).split(os.sep)[0] != STATE_DIR


@settings(max_examples=1000, deadline=None, derandomize=True, database=None)
@given(prefix=_prefixes, key=_keys)
@example(prefix="", key="a/../../x")
@example(prefix="p/", key="p/../x")
@example(prefix="", key="/")
def test_accepted_relpath_stays_strictly_inside_root(prefix, key):
    key = prefix + key
    rel, reason = key_to_relpath(key, prefix)
    if rel is None:
        assert reason
        return
    assert reason == ""
    assert "\0" not in rel
    assert len(rel.encode()) <= PATH_MAX
    _inside(rel)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(prefix=_prefixes, keys=st.lists(_keys, max_size=12))
def test_place_only_yields_inside_paths_and_no_file_is_a_dir(prefix, keys):
    keys = [prefix + k for k in keys]
    p = place(keys, prefix)
    for rel in [*p.files, *p.dirs]:
        _inside(rel)
    assert not set(p.files) & p.dirs
    # Every key is either placed (file or directory marker) or refused, never silently dropped.
    placed_keys = set(p.files.values())
    markers = {k for k in keys if (key_to_relpath(k, prefix)[0] or "").endswith("/")}
    refused = {k for k, _ in p.rejected}
    assert set(keys) == placed_keys | markers | refused
    # Every parent of a file is a directory.
    for rel in p.files:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            assert "/".join(parts[:i]) in p.dirs


def test_placement_stream_decides_as_place_does_on_ordered_listings() -> None:
    """Stubs are made while the listing arrives (issue 12, item 5): the streaming layout must
    decide every key as the whole-listing one does, directories before what they hold."""
    import random

    from hsmfs.keys import PlacementStream

    alphabet = ["a", "b", "/", "!", ".", "é", "z", "0"]  # around "/" in sort order
    for trial in range(3000):
        rng = random.Random(trial)
        keys = sorted({"p/" + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
                       for _ in range(rng.randint(1, 12))})
        ref = place(keys, "p/")
        stream = PlacementStream("p/")
        decided = [d for k in keys for d in stream.add(k)] + stream.finish()
        made: set[str] = set()
        for d in decided:
            if d.kind in ("dir", "file"):
                parts = d.rel.split("/")
                assert all("/".join(parts[:i]) in made for i in range(1, len(parts))), keys
                if d.kind == "dir":
                    made.add(d.rel)
        assert {d.rel: d.key for d in decided if d.kind == "file"} == ref.files, keys
        assert {d.rel for d in decided if d.kind == "dir"} == ref.dirs, keys
        assert sorted((d.key, d.reason) for d in decided if d.kind == "rejected") == \
            sorted(ref.rejected), keys
        assert stream.ordered


def test_placement_stream_decides_a_file_as_soon_as_no_later_key_can_refuse_it() -> None:
    from hsmfs.keys import PlacementStream

    s = PlacementStream("")
    assert s.add("a") == []  # "a/..." may follow
    assert [d.kind for d in s.add("a!")] == []  # still may: "!" sorts before "/"
    assert [(d.kind, d.rel) for d in s.add("a0")] == [("file", "a"), ("file", "a!")]
    assert [(d.kind, d.key or d.rel) for d in s.add("a0/x")] == [("rejected", "a0"),
                                                                  ("dir", "a0")]
    s2 = PlacementStream("")
    s2.add("b")
    got = s2.add("b/")  # a directory marker refuses the file "b" too
    assert ("rejected", "b") in [(d.kind, d.key) for d in got]
    assert ("dir", "b") in [(d.kind, d.rel) for d in got]
    s3 = PlacementStream("")
    s3.add("z")
    s3.add("c")
    assert not s3.ordered  # told, and the objects are still placed
