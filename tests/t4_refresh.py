"""Namespace refresh (issue 12, item 3): ``hsmfs sync [PATH]`` and ``-o refresh=SECONDS``.

Real parts only: a moto S3 server over loopback HTTP (changed with boto3 while a daemon serves),
``hsmfs mount -f`` (FUSE door) and ``hsmfs serve -f`` (kernel door) as subprocesses, unaware
programs (``cat``, ``ls``, a program holding fds) as processes.  Every byte read is compared
with the bytes S3 holds, or held for local data; a read may fail with EIO where the design says
so, never return zeros or another version's bytes.

Every wait is bounded (subprocess timeouts, deadlines, a pytest-timeout per test); every daemon
is stopped by PID (its process group) and every mount removed, even when a test fails.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Bucket, MotoServer, run, stop_process
from support.doors import DOORS, Served, serve_door
from support.heldfd import FdProgram, ReadFailed, group_alive

pytestmark = [pytest.mark.timeout(180)]

KiB = 1 << 10
#: Entry and attribute timeouts of the FUSE mounts here: far longer than any test, so a name or
#: a size the test sees change was invalidated by the sync, not expired.
LONG = "attr_timeout=3600"


# -- helpers -----------------------------------------------------------------------------------

def blob(n: int, seed: str) -> bytes:
    return random.Random(seed).randbytes(n)


def hsmfs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hsmfs", *args], capture_output=True,
                          text=True, timeout=timeout)


def cat(path: Path) -> bytes:
    out = run(["cat", str(path)], timeout=30)
    if out.returncode != 0:
        raise OSError(f"cat {path}: exit {out.returncode}: {out.stderr.decode().strip()}")
    return out.stdout


def state(path: Path) -> dict:
    out = hsmfs("state", "--json", str(path))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)[0]


def sync(path: Path) -> tuple[str, dict[str, tuple[str, str]]]:
    """``hsmfs sync PATH``: (its summary line, {path relative to PATH: (kind, detail)})."""
    out = hsmfs("sync", str(path), timeout=120)
    assert out.returncode == 0, f"hsmfs sync {path}: exit {out.returncode}\n{out.stderr}"
    summary, *lines = out.stdout.splitlines()
    changes = {}
    for line in lines:
        kind, shown, *detail = line.split(None, 2)
        changes[os.path.relpath(shown, path)] = (kind, detail[0] if detail else "")
    return summary, changes


@contextlib.contextmanager
def door(kind: str, bucket: Bucket, endpoint: str, workdir: Path, *opts: str
         ) -> Iterator[Served]:
    """One daemon (FUSE door with long timeouts, or the kernel door); stopped by PID, its
    whole process group gone, whatever happened."""
    if kind == "fuse":
        opts = (LONG, *opts)
    with serve_door(kind, f"s3://{bucket.name}", workdir, endpoint, *opts) as d:
        try:
            yield d
        finally:
            stop_process(d.proc, timeout=15)
            deadline = time.monotonic() + 15
            while group_alive(d.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if group_alive(d.proc.pid):
                    os.killpg(d.proc.pid, 9)


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("kind", DOORS)
def test_sync_does_not_make_again_a_stub_the_user_renamed(kind: str, bucket: Bucket,
                                                          moto: MotoServer,
                                                          tmp_path: Path) -> None:
    """``mv a b`` then ``hsmfs sync``: S3 still holds ``a`` at the version ``b`` is a copy of,
    and the listing must not make ``a`` again (populate's rule; refresh used to undo the mv)."""
    data = bucket.put("a.bin", blob(50 * KiB, "renamed"))
    with door(kind, bucket, moto.endpoint, tmp_path) as d:
        (d.root / "a.bin").rename(d.root / "b.bin")
        sync(d.root)
        assert not (d.root / "a.bin").exists()
        assert cat(d.root / "b.bin") == data


# -- sync: new, changed and deleted objects, with and without local data -----------------------

@pytest.mark.parametrize("kind", DOORS)
def test_sync_makes_the_tree_follow_s3(kind: str, bucket: Bucket, moto: MotoServer,
                                       tmp_path: Path) -> None:
    old = {name: bucket.put(name, blob(300 * KiB, f"old-{name}")) for name in (
        "same.bin", "changed_stub.bin", "changed_clean.bin", "changed_dirty.bin",
        "gone_stub.bin", "gone_clean.bin", "gone_dirty.bin")}
    # No directory read-ahead: reading two files whole would fetch their siblings too.
    with door(kind, bucket, moto.endpoint, tmp_path, "dir_readahead=off") as d:
        root = d.root
        # Local data: clean bytes (read whole: small files are fetched whole on first touch)
        # and local changes (an append: every byte local, then dirty).
        for name in ("changed_clean.bin", "gone_clean.bin"):
            assert cat(root / name) == old[name]
        for name in ("changed_dirty.bin", "gone_dirty.bin"):
            with open(root / name, "ab") as f:
                f.write(b"local change\n")
        new = {"new.bin": bucket.put("new.bin", blob(200 * KiB, "new")),
               "sub/deeper/new2.bin": bucket.put("sub/deeper/new2.bin", blob(5000, "new2"))}
        changed = {name: bucket.put(name, blob(310 * KiB, f"new-{name}"))
                   for name in ("changed_stub.bin", "changed_clean.bin", "changed_dirty.bin")}
        for name in ("gone_stub.bin", "gone_clean.bin", "gone_dirty.bin"):
            bucket.delete(name)

        summary, changes = sync(root)
        assert summary.endswith("6 objects listed: 2 new, 1 refreshed, 1 stale, 1 conflict, "
                                "1 removed, 2 kept"), summary
        assert {p: k for p, (k, _) in changes.items()} == {
            "new.bin": "new", "sub/deeper/new2.bin": "new",
            "changed_stub.bin": "refreshed", "changed_clean.bin": "stale",
            "changed_dirty.bin": "conflict", "gone_stub.bin": "removed",
            "gone_clean.bin": "kept", "gone_dirty.bin": "kept"}, changes
        assert "stale" in changes["gone_clean.bin"][1]
        assert "conflict" in changes["gone_dirty.bin"][1]

        # New objects read S3's bytes; a stub with nothing local reads the new version.
        for name, data in new.items():
            assert cat(root / name) == data, name
        assert cat(root / "changed_stub.bin") == changed["changed_stub.bin"]
        assert cat(root / "same.bin") == old["same.bin"]
        # Clean local bytes: stale, the old version's bytes kept, never stitched.
        assert state(root / "changed_clean.bin")["state"] == "stale"
        assert cat(root / "changed_clean.bin") == old["changed_clean.bin"]
        # Local changes: conflict, bytes intact.
        assert state(root / "changed_dirty.bin")["state"] == "conflict"
        assert cat(root / "changed_dirty.bin") == old["changed_dirty.bin"] + b"local change\n"
        # Deleted: gone with nothing local; kept with local bytes or changes.
        assert not (root / "gone_stub.bin").exists()
        assert state(root / "gone_clean.bin")["state"] == "stale"
        assert cat(root / "gone_clean.bin") == old["gone_clean.bin"]
        assert state(root / "gone_dirty.bin")["state"] == "conflict"
        assert cat(root / "gone_dirty.bin") == old["gone_dirty.bin"] + b"local change\n"

        # A second sync finds nothing to do (decided states are not decided again).
        summary, changes = sync(root)
        assert changes == {}, changes
        stats = d.stats()
        assert stats["refreshes"] == 2 and stats["last_refresh"], stats
        assert stats["last_refresh_changes"]["new"] == 0, stats


@pytest.mark.parametrize("kind", DOORS)
def test_sync_of_a_subtree_touches_nothing_else(kind: str, bucket: Bucket, moto: MotoServer,
                                                tmp_path: Path) -> None:
    a1 = bucket.put("a/one.txt", b"a one\n")
    bucket.put("b/one.txt", b"b one\n")
    with door(kind, bucket, moto.endpoint, tmp_path) as d:
        root = d.root
        a2 = bucket.put("a/inner/two.txt", b"a two\n")
        bucket.put("b/two.txt", b"b two\n")
        bucket.delete("b/one.txt")
        a1 = bucket.put("a/one.txt", b"a one, version 2\n")
        _, changes = sync(root / "a")
        assert {p: k for p, (k, _) in changes.items()} == {
            "inner/two.txt": "new", "one.txt": "refreshed"}, changes
        assert cat(root / "a/inner/two.txt") == a2
        assert cat(root / "a/one.txt") == a1
        # Outside the subtree: nothing listed, so nothing added or removed.
        assert not (root / "b/two.txt").exists()
        assert (root / "b/one.txt").exists()  # (gone from S3, never read: EIO if read now)
        # One file as the subtree.
        bucket.put("b/two.txt", b"b two, version 2\n")
        _, changes = sync(root / "b/one.txt")
        assert changes == {".": ("removed", "")}, changes
        assert not (root / "b/one.txt").exists() and not (root / "b/two.txt").exists()
        _, changes = sync(root)
        assert {p: k for p, (k, _) in changes.items()} == {"b/two.txt": "new"}, changes
        assert cat(root / "b/two.txt") == b"b two, version 2\n"


# -- the FUSE door shows the change at once, despite long timeouts ------------------------------

@pytest.mark.needs_fuse
def test_fuse_ls_and_stat_see_a_sync_at_once(bucket: Bucket, moto: MotoServer,
                                             tmp_path: Path) -> None:
    bucket.put("d/keep.txt", b"kept\n")
    bucket.put("d/replaced.bin", blob(1000, "v1"))
    bucket.put("d/removed.bin", blob(1000, "removed"))
    with door("fuse", bucket, moto.endpoint, tmp_path) as d:
        mnt = d.root / "d"
        # The kernel caches these entries and attributes for an hour (LONG).
        assert sorted(os.listdir(mnt)) == ["keep.txt", "removed.bin", "replaced.bin"]
        assert os.stat(mnt / "replaced.bin").st_size == 1000
        assert os.stat(mnt / "removed.bin").st_size == 1000
        v2 = bucket.put("d/replaced.bin", blob(5555, "v2"))
        bucket.delete("d/removed.bin")
        new = bucket.put("d/new.txt", b"new\n")
        sync(d.root)
        ls = run(["ls", "-l", str(mnt)])
        assert ls.returncode == 0, ls.stderr
        names = [line.split()[-1] for line in ls.stdout.decode().splitlines()[1:]]
        assert names == ["keep.txt", "new.txt", "replaced.bin"], ls.stdout.decode()
        assert os.stat(mnt / "replaced.bin").st_size == 5555
        assert not os.path.exists(mnt / "removed.bin")
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / "removed.bin")
        assert cat(mnt / "replaced.bin") == v2
        assert cat(mnt / "new.txt") == new


# -- a program holding a file open across a sync that replaces it -------------------------------

@pytest.mark.parametrize("versioned", [False, True], ids=["unversioned", "versioned"])
@pytest.mark.parametrize("kind", DOORS)
def test_a_held_file_replaced_by_a_sync_reads_its_own_version(
        kind: str, versioned: bool, bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    """A program opens a stub (nothing fetched) and keeps the fd; S3 replaces the object and a
    sync replaces the stub.  The held fd is the old version's: its reads give that version's
    bytes while S3 still has it (a versioned bucket) and EIO once it does not, never zeros and
    never the new version; the path reads the new version."""
    if versioned:
        bucket.client.put_bucket_versioning(Bucket=bucket.name,
                                            VersioningConfiguration={"Status": "Enabled"})
    v1 = bucket.put("held.bin", blob(256 * KiB, "held-v1"))
    with door(kind, bucket, moto.endpoint, tmp_path, "open_fill=off", "small_file=0",
              "chunk=64K", "readahead=64K", "max_request=64K") as d, FdProgram() as app:
        path = d.root / "held.bin"
        fd = app.open(path)
        assert state(path)["resident_bytes"] == 0
        v2 = bucket.put("held.bin", blob(256 * KiB, "held-v2"))
        _, changes = sync(d.root)
        assert changes == {"held.bin": ("refreshed", "")}, changes
        for off in (0, 100 * KiB, 200 * KiB):
            try:
                got = app.pread(fd, 4096, off)
            except ReadFailed as exc:
                assert not versioned, f"held fd at {off}: errno {exc.errno}; S3 still has v1"
                assert exc.errno == errno.EIO, f"held fd at {off}: errno {exc.errno}, want EIO"
                continue
            what = ("zeros" if not any(got) else "the new version's bytes"
                    if got == v2[off:off + 4096] else "wrong bytes")
            assert got == v1[off:off + 4096], f"held fd at {off}: {what}"
        assert cat(path) == v2
        assert d.proc.poll() is None, "the daemon died"


# -- -o refresh=SECONDS ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", DOORS)
def test_refresh_option_picks_up_a_new_object(kind: str, bucket: Bucket, moto: MotoServer,
                                              tmp_path: Path) -> None:
    bucket.put("first.txt", b"first\n")
    with door(kind, bucket, moto.endpoint, tmp_path, "refresh=1") as d:
        data = bucket.put("later/added.bin", blob(70 * KiB, "added"))
        wait_for(lambda: (d.root / "later/added.bin").exists(), 20, "the refresh to add it")
        assert cat(d.root / "later/added.bin") == data
        stats = d.stats()
        assert stats["refreshes"] >= 1 and stats["last_refresh"], stats


@pytest.mark.needs_fuse
def test_s3_down_during_a_refresh_changes_nothing(bucket: Bucket, fault_proxy,
                                                  tmp_path: Path) -> None:
    """Every listing fails (connection refused): each period logs one line and changes nothing
    (no stub is taken for deleted); ``hsmfs sync`` says why and exits non-zero; once S3 answers
    again the next period picks up what changed."""
    kind = "fuse"
    names = {f"f{i}.txt": bucket.put(f"f{i}.txt", f"file {i}\n".encode()) for i in range(5)}
    with door(kind, bucket, fault_proxy.endpoint, tmp_path, "refresh=1", "retries=0",
              "timeout=2") as d:
        assert cat(d.root / "f0.txt") == names["f0.txt"]  # local bytes
        fault_proxy.refuse()
        wait_for(lambda: "cannot list" in d.log(), 20, "a failed refresh in the log")
        time.sleep(2.5)  # more failing periods
        assert sorted(p.name for p in d.root.iterdir() if p.name != ".hsmfs") == sorted(names)
        assert cat(d.root / "f0.txt") == names["f0.txt"]
        out = hsmfs("sync", str(d.root))
        assert out.returncode == 1 and "nothing changed" in out.stderr, out.stdout + out.stderr
        fails = [line for line in d.log().splitlines() if "refresh: cannot list" in line]
        assert 1 <= len(fails) <= 10, fails
        fault_proxy.restore()
        added = bucket.put("after.txt", b"after\n")
        wait_for(lambda: (d.root / "after.txt").exists(), 20, "the refresh after S3 is back")
        assert cat(d.root / "after.txt") == added
        stats = d.stats()
        assert stats["refresh_failures"] >= 2 and stats["refreshes"] >= 1, stats


# -- the command line --------------------------------------------------------------------------

def test_sync_without_a_daemon_refuses(tmp_path: Path) -> None:
    (tmp_path / "cache" / ".hsmfs").mkdir(parents=True)
    out = hsmfs("sync", str(tmp_path / "cache"))
    assert out.returncode == 1 and "no daemon serves" in out.stderr, out.stderr
    out = hsmfs("sync", str(tmp_path))
    assert out.returncode == 1 and "not in an hsmfs tree" in out.stderr, out.stderr


@pytest.mark.needs_fuse
def test_concurrent_syncs_run_one_at_a_time(bucket: Bucket, moto: MotoServer,
                                            tmp_path: Path) -> None:
    with door("fuse", bucket, moto.endpoint, tmp_path) as d:
        data = {f"n/{i:03d}.txt": bucket.put(f"n/{i:03d}.txt", f"{i}\n".encode())
                for i in range(60)}
        procs = [subprocess.Popen([sys.executable, "-m", "hsmfs", "sync", str(d.root)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]
        try:
            outs = [p.communicate(timeout=120) for p in procs]
        finally:
            for p in procs:
                stop_process(p)
        assert all(p.returncode == 0 for p in procs), outs
        news = [sum(1 for line in out.splitlines()[1:] if line.startswith("new "))
                for out, _ in outs]
        assert sorted(news) == [0, 0, 60], outs  # each object made once, by one of them
        for rel, want in data.items():
            assert cat(d.root / rel) == want


# -- two hosts, one bucket: a sync instead of a restart --------------------------------------

@pytest.mark.needs_fuse
def test_a_host_syncs_after_the_other_archives(bucket: Bucket, moto: MotoServer,
                                               tmp_path: Path) -> None:
    """A archives an edit of a file B holds whole (clean) and of one B never read.  A's own
    sync finds nothing to do (its archive is S3's version); B's sync makes the read one
    ``stale`` (its bytes, whole, never mixed) and refreshes the unread one to A's version."""
    read = bucket.put("read.txt", blob(3000, "read-v1"))
    unread = bucket.put("unread.txt", blob(3000, "unread-v1"))
    with door("fuse", bucket, moto.endpoint, tmp_path / "a") as a, \
            door("fuse", bucket, moto.endpoint, tmp_path / "b", "dir_readahead=off") as b:
        assert cat(b.root / "read.txt") == read
        for name in ("read.txt", "unread.txt"):
            with open(a.root / name, "ab") as f:
                f.write(b"from A\n")
        out = hsmfs("archive", str(a.root))
        assert out.returncode == 0, out.stdout + out.stderr
        _, changes = sync(a.root)
        assert changes == {}, changes
        assert state(a.root / "read.txt")["state"] == "resident"
        _, changes = sync(b.root)
        assert {p: k for p, (k, _) in changes.items()} == {
            "read.txt": "stale", "unread.txt": "refreshed"}, changes
        assert cat(b.root / "read.txt") == read
        assert cat(b.root / "unread.txt") == unread + b"from A\n"
        assert state(b.root / "read.txt")["state"] == "stale"


@pytest.mark.parametrize("kind", DOORS)
def test_a_file_being_filled_is_kept_and_decided_next_time(kind: str, bucket: Bucket,
                                                           fault_proxy, tmp_path: Path) -> None:
    """A sync never replaces a file while a door fills it: it is ``kept`` (in use) and the next
    sync decides, on what the fill left.  The reader gets the old version's bytes or EIO (its
    GET reached S3 after the change: 412), never zeros or the new version."""
    v1 = bucket.put("slow.bin", blob(64 * KiB, "slow-v1"))
    with door(kind, bucket, fault_proxy.endpoint, tmp_path, "open_fill=off",
              "dir_readahead=off") as d:
        fault_proxy.set_delay(5000, method="GET", match="slow.bin")
        reader = subprocess.Popen(["cat", str(d.root / "slow.bin")], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        try:
            wait_for(lambda: d.stats()["inflight_chunks"] > 0, 15, "the fill to start")
            v2 = bucket.put("slow.bin", blob(64 * KiB, "slow-v2"))  # straight to S3
            _, changes = sync(d.root)
            assert list(changes) == ["slow.bin"] and changes["slow.bin"][0] == "kept", changes
            assert "serving" in changes["slow.bin"][1], changes
            out, err = reader.communicate(timeout=60)
        finally:
            stop_process(reader)
        if reader.returncode == 0:
            assert out == v1, "the reader got " + ("the new version" if out == v2 else
                                                   "wrong bytes")
        else:
            assert b"Input/output error" in err, err
        fault_proxy.restore()
        _, changes = sync(d.root)
        if reader.returncode == 0:  # v1's bytes are local: stale, kept
            assert changes == {"slow.bin": ("stale", changes["slow.bin"][1])}, changes
            assert cat(d.root / "slow.bin") == v1
        else:  # nothing landed: the stub follows S3
            assert changes == {"slow.bin": ("refreshed", "")}, changes
            assert cat(d.root / "slow.bin") == v2
