"""Crash tests (issue 12, item 6): SIGKILL in the middle of populate, refresh and release.

The daemon SIGKILLs itself at a named step (test hooks, :mod:`hsmfs.crashpoint`): the kernel
door's worker alone (the holder restarts it, and the restarted worker adopts the tree as it
is), or the whole daemon (its process group: holder and worker, or the FUSE daemon), which is
then started again on the same cache.  What docs/design.md claims each step leaves behind is
then checked on the real files:

* every byte read through the door is S3's (or, for a file with local changes, its own);
* nothing is counted resident that is not (the daemon's residency and ``hsmfs state``'s view
  agree with the extents and with ``st_blocks``: what ``du`` shows);
* nothing dirty became clean, and no staging leftover is left behind.

Real parts only: ``hsmfs serve -f`` / ``hsmfs mount -f`` as subprocesses in their own session,
a moto S3 server over loopback.  Every wait is bounded; every daemon is stopped by PID or
process group, and every mount removed, even on failure.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Bucket, MotoServer, force_unmount
from support.doors import Served, serve_door
from support.heldfd import group_alive, the_worker, wait_new_worker_ready

from hsmfs import control, crashpoint
from hsmfs.cover import uncover
from hsmfs.mounts import mountinfo
from hsmfs.stubfile import X_RELEASING, describe

pytestmark = [pytest.mark.timeout(120)]

KiB, MiB = 1 << 10, 1 << 20

#: (door, what dies).  The FUSE door is one process: its crash is the daemon's.  The kernel
#: door's worker can die alone (the holder keeps the fanotify group and restarts it).
SCOPES = [
    pytest.param("fuse", "daemon", marks=pytest.mark.needs_fuse, id="fuse-daemon"),
    pytest.param("kernel", "worker", marks=pytest.mark.needs_precontent, id="kernel-worker"),
    pytest.param("kernel", "daemon", marks=pytest.mark.needs_precontent, id="kernel-daemon"),
]
#: Both doors in one daemon (``mount -o kernel``): the worker serves the FUSE mount too, so its
#: death takes the mount, and the holder's next worker mounts it again.
BOTH_WORKER = pytest.param("both", "worker", marks=[pytest.mark.needs_fuse,
                                                    pytest.mark.needs_precontent],
                           id="fuse+kernel-worker")


def blob(n: int, seed: str) -> bytes:
    return random.Random(seed).randbytes(n)


def hsmfs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hsmfs", *args], capture_output=True,
                          text=True, timeout=timeout)


def read(path: Path) -> bytes:
    """The whole file, as an unaware program reads it (this process: the kernel door serves
    it like any other; the test's timeout bounds a hang)."""
    with open(path, "rb") as f:
        return f.read()


def make_dirty(path: Path, at: int, data: bytes) -> None:
    """A program's in-place write through the door: the file holds local changes."""
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def reap(d: Served, timeout: float = 20) -> None:
    """The daemon killed itself: wait (bounded) for every process of it (the holder's group,
    and each worker the log names: a worker has its own process group), then clear what a
    dead FUSE daemon leaves (a mount answering ENOTCONN)."""
    d.proc.wait(timeout)
    workers = [int(p) for p in re.findall(r"worker pid (\d+) started", d.log())]
    deadline = time.monotonic() + timeout
    while group_alive(d.proc.pid) or any(alive(p) for p in workers):
        if time.monotonic() > deadline:
            for pid in [d.proc.pid, *workers]:  # by PID: nothing of it may outlive the test
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"daemon {d.proc.pid} outlived its SIGKILL")
        time.sleep(0.05)
    if d.kind == "fuse":
        force_unmount(d.root)


def covered(cache: Path) -> bool:
    return any(m.source == "hsmfs-cover" and m.mount_point == str(cache.resolve())
               for m in mountinfo())


def keep_log(d: Served, name: str) -> None:
    """serve_door truncates its log at the next start: keep the crashed run's."""
    with contextlib.suppress(OSError):
        (d.log_path.parent / name).write_bytes(d.log_path.read_bytes())


class Crash:
    """Arm a crash point for one daemon run, and see the crash through (restart, log)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, bucket: Bucket, moto: MotoServer,
                 workdir: Path, kind: str, scope: str, *opts: str) -> None:
        self.mp, self.bucket, self.moto, self.workdir = monkeypatch, bucket, moto, workdir
        self.kind, self.scope, self.opts = kind, scope, opts
        self.env: str | None = None
        self.worker: int | None = None

    def serve(self) -> contextlib.AbstractContextManager[Served]:
        if self.kind == "both":
            return serve_door("fuse", f"s3://{self.bucket.name}", self.workdir,
                              self.moto.endpoint, "kernel", *self.opts)
        return serve_door(self.kind, f"s3://{self.bucket.name}", self.workdir,
                          self.moto.endpoint, *self.opts)

    def arm(self, env: str, step: str) -> None:
        self.env = env
        self.mp.setenv(env, step)
        if self.scope == "daemon":
            self.mp.setenv(crashpoint.GROUP, "1")

    def disarm(self) -> None:
        for name in (self.env, crashpoint.GROUP):
            if name:
                self.mp.delenv(name, raising=False)

    def note_worker(self, d: Served) -> None:
        """Before the crash: the worker that is to die (kernel door)."""
        if self.kind in ("kernel", "both"):
            self.worker = the_worker(d.proc.pid, d.log_path)

    @contextlib.contextmanager
    def after(self, d: Served) -> Iterator[Served]:
        """The crash happened (or is happening): the daemon serving again on the same cache.
        The worker scope: the holder's new worker, same daemon.  The daemon scope: the group
        is gone; a new ``hsmfs serve``/``mount`` with the crash point disarmed."""
        deadline = time.monotonic() + 20
        while f"{self.env}=" not in d.log():
            assert time.monotonic() < deadline, f"no crash at {self.env}:\n{d.log()[-3000:]}"
            time.sleep(0.05)
        if self.scope == "worker":
            assert self.worker is not None
            wait_new_worker_ready(d.log_path, self.worker, timeout=30)
            self.disarm()
            yield d
            return
        reap(d)
        keep_log(d, "crashed.log")
        self.disarm()
        with self.serve() as d2:
            yield d2


def daemon_rows(d: Served, rels: list[str]) -> dict[str, dict]:
    """The serving daemon's own view of each file (residency from the extents, sync)."""
    reply = control.query(str(d.cache), {"cmd": "state", "paths": rels}, timeout=30)
    return {rel: row for rel, row in zip(rels, reply["states"], strict=True)}


def check_tree(d: Served, want: dict[str, bytes], *, local: dict[str, bytes] | None = None,
               gone: tuple[str, ...] = (), stale: dict[str, bytes] | None = None) -> None:
    """After a crash and restart.  ``want``: S3's bytes of the files that must read them;
    ``local``: files with local changes (must be dirty or conflict, and read their own bytes);
    ``stale``: files that must be stale and read their old version's bytes; ``gone``: paths
    that must not exist.  Checks residency against the extents first (a read changes it)."""
    local, stale = local or {}, stale or {}
    files = {**want, **local, **stale}
    problems = [f"{rel}: missing" for rel in sorted(files) if not (d.cache / rel).exists()]
    rels = sorted(rel for rel in files if (d.cache / rel).exists())
    rows = daemon_rows(d, rels)
    resident = 0
    for rel in rels:
        row, st = rows[rel], os.stat(d.cache / rel)
        alloc = st.st_blocks * 512  # what du counts
        if "error" in row or "residency" not in row:
            problems.append(f"{rel}: the daemon does not serve it: {row}")
            continue
        got = row["resident_bytes"]
        if row["residency"] == "resident":
            resident += 1
            if alloc < st.st_size or got != row["size"]:
                problems.append(f"{rel}: counted resident, {got} resident bytes, {alloc} "
                                f"allocated of {st.st_size} (half punched?)")
        if got > alloc or alloc - got > 16 * KiB:
            problems.append(f"{rel}: {got} bytes counted resident, du sees {alloc}")
        view = describe(str(d.cache / rel))["state"]  # what hsmfs state shows
        if view != row["state"]:
            problems.append(f"{rel}: hsmfs state shows {view!r}, the daemon knows "
                            f"{row['state']!r}")
        if rel in local and row["sync"] not in ("dirty", "conflict"):
            problems.append(f"{rel}: held local changes, now {row['sync']!r}")
        if rel in stale and row["sync"] != "stale":
            problems.append(f"{rel}: should be stale, is {row['sync']!r}")
        if rel not in local and row["sync"] == "dirty":
            problems.append(f"{rel}: clean before the crash, dirty after it")
    stats = d.stats()
    if stats["resident_files"] != resident:
        problems.append(f"stats count {stats['resident_files']} resident files, the rows "
                        f"{resident}")
    for rel, data in files.items():
        try:
            got_bytes = read(d.root / rel)
        except OSError as exc:
            problems.append(f"{rel}: read failed: {exc}")
            continue
        if got_bytes != data:
            zeros = not any(got_bytes)
            problems.append(f"{rel}: {len(got_bytes)} bytes read, wrong"
                            + (" (all zeros)" if zeros else ""))
    for rel in gone:
        if os.path.lexists(d.root / rel):
            problems.append(f"{rel}: still there")
    staging = d.cache / ".hsmfs" / "staging"
    left = sorted(os.listdir(staging)) if staging.is_dir() else []
    if left:
        problems.append(f"staging leftovers after the restart: {left}")
    assert not problems, "\n".join(problems[:30])


# -- populate: SIGKILL while a start makes the stubs of many new objects ------------------------

@pytest.mark.parametrize(("kind", "scope", "step"), [
    *(pytest.param(*p.values, "created", marks=p.marks, id=f"{p.id}-created") for p in SCOPES),
    # The 30th stub made and guarded in staging, not linked in: the restarted worker finds a
    # marked leftover (the group's marks outlive the worker) and must not block on it.
    pytest.param("kernel", "worker", "staged", marks=pytest.mark.needs_precontent,
                 id="kernel-worker-staged"),
])
def test_sigkill_while_populate_makes_stubs(kind: str, scope: str, step: str, bucket: Bucket,
                                           moto: MotoServer, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A first run leaves a resident file and a dirty one.  S3 then gains 80 objects, and the
    next start dies after making 30 of their stubs (staging and rename, the *create*
    transition).  After the restart every object is there and reads S3's bytes, nothing made
    half way is left in staging, the resident file is still counted so, the dirty one dirty."""
    res = bucket.put("keep/res.bin", blob(300 * KiB + 7, "res"))
    dirty = bytearray(bucket.put("keep/dirty.bin", blob(200 * KiB, "dirty")))
    c = Crash(monkeypatch, bucket, moto, tmp_path / "w", kind, scope)
    with c.serve() as d:
        assert read(d.root / "keep/res.bin") == res
        make_dirty(d.root / "keep/dirty.bin", 1000, b"LOCAL CHANGE")
        dirty[1000:1012] = b"LOCAL CHANGE"
    many = {f"many/{i % 7}/{i:03d}.bin": bucket.put(f"many/{i % 7}/{i:03d}.bin",
                                                    blob(random.Random(i).randrange(1, 40 * KiB),
                                                         f"m{i}"))
            for i in range(80)}
    c.arm(crashpoint.POPULATE, f"{step}:30")
    cache = c.workdir / "cache"
    if scope == "worker":
        # The first worker dies at its 30th stub, before it was ever ready; the holder starts
        # another, and `hsmfs serve` returns once that one serves.
        with c.serve() as d:
            assert f"{crashpoint.POPULATE}=" in d.log() and "worker gone" in d.log(), d.log()
            c.disarm()
            check_tree(d, {"keep/res.bin": res, **many}, local={"keep/dirty.bin": bytes(dirty)})
        return
    with pytest.raises(RuntimeError, match="exited"), c.serve():
        pass
    if kind == "kernel":
        # The first run's clean stop covered the tree, and a kernel-door start lifts the cover
        # only once every stub is guarded: the crash left it, so no program saw the half tree.
        assert covered(cache), "a start that died before ready left the tree uncovered"
        uncover(str(cache))  # to count beneath it
    made = sum(1 for rel in many if (cache / rel).exists())
    assert made == 30, f"the crash came after {made} stubs, not 30"  # "created" only
    c.disarm()
    with c.serve() as d:
        check_tree(d, {"keep/res.bin": res, **many}, local={"keep/dirty.bin": bytes(dirty)})


# -- release: SIGKILL at each step of the punch ---------------------------------------------------

#: Steps of StubCache.release (docs/design.md, Release), and whether the file is punched after.
RELEASE_STEPS = {
    "leased": False,  # guard back, lease taken, nothing punched
    "punched-only": True,  # punched; the punch moved the mtime, not put back yet
    "punched": True,  # punched, mtime put back; the view not written, the lease held
    "released": True,  # all done on disk, the lease dropped; the doors not told yet
}


@pytest.mark.parametrize("step", list(RELEASE_STEPS))
@pytest.mark.parametrize(("kind", "scope"), [*SCOPES, BOTH_WORKER])
def test_sigkill_in_the_middle_of_a_release(kind: str, scope: str, step: str, bucket: Bucket,
                                            moto: MotoServer, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A resident clean file is released and the daemon (or the worker) dies at ``step``.
    After the restart it is either resident (nothing punched) or a clean stub (all of it
    punched), never counted resident over holes; it reads S3's bytes and releases again; a
    dirty file beside it is still dirty with its own bytes."""
    data = bucket.put("r/c.bin", blob(1 * MiB + 5, "crash"))
    other = bucket.put("r/o.bin", blob(64 * KiB, "other"))
    dirty = bytearray(bucket.put("r/d.bin", blob(100 * KiB, "d")))
    c = Crash(monkeypatch, bucket, moto, tmp_path / "w", kind, scope)
    c.arm(crashpoint.RELEASE, step)
    with c.serve() as d:
        assert read(d.root / "r/c.bin") == data
        mtime = os.stat(d.cache / "r/c.bin").st_mtime_ns
        make_dirty(d.root / "r/d.bin", 10, b"mine")
        dirty[10:14] = b"mine"
        c.note_worker(d)
        out = hsmfs("release", str(d.root / "r/c.bin"))
        assert out.returncode != 0, f"the release was to die at {step}: {out.stdout}"
        with c.after(d) as d:
            backing = d.cache / "r/c.bin"
            punched = os.stat(backing).st_blocks <= 16
            assert punched == RELEASE_STEPS[step], (step, os.stat(backing).st_blocks)
            row = daemon_rows(d, ["r/c.bin"])["r/c.bin"]
            assert (row["residency"], row["sync"]) == (
                "stub" if punched else "resident", "clean"), row
            assert os.stat(backing).st_mtime_ns == mtime, "the version's mtime was not kept"
            with pytest.raises(OSError):  # the start cleared the release's marker
                os.getxattr(backing, X_RELEASING)
            check_tree(d, {"r/c.bin": data, "r/o.bin": other},
                       local={"r/d.bin": bytes(dirty)})
            out = hsmfs("release", str(d.root / "r/c.bin"))
            assert out.returncode == 0 and out.stdout.startswith("released"), out.stdout
            assert read(d.root / "r/c.bin") == data


# -- eviction: SIGKILL in the middle of a release that -o cache_size started ----------------------

@pytest.mark.parametrize("step", ["leased", "punched"])
@pytest.mark.parametrize(("kind", "scope"), SCOPES)
def test_sigkill_in_the_middle_of_an_eviction(kind: str, scope: str, step: str, bucket: Bucket,
                                              moto: MotoServer, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``-o cache_size``, reading one file evicts another: the daemon (or the worker)
    dies in the middle of that release, with the reader waiting.  After the restart the evicted
    file is whole or a clean stub, never counted resident over holes; every file reads S3's
    bytes; a dirty file beside them is still dirty; the budget is enforced again."""
    a = bucket.put("e/a.bin", blob(1 * MiB, "evict-a"))
    b = bucket.put("e/b.bin", blob(1 * MiB, "evict-b"))
    dirty = bytearray(bucket.put("e/d.bin", blob(32 * KiB, "evict-d")))
    c = Crash(monkeypatch, bucket, moto, tmp_path / "w", kind, scope,
              f"cache_size={MiB + 64 * KiB}", "dir_readahead=off")
    c.arm(crashpoint.RELEASE, step)  # the first release is the eviction below
    with c.serve() as d:
        make_dirty(d.root / "e/d.bin", 3, b"mine")
        dirty[3:7] = b"mine"
        assert read(d.root / "e/a.bin") == a  # fits: nothing evicted yet
        c.note_worker(d)
        # The reader of b makes room by evicting a; the daemon dies inside that release.  The
        # reader may get an error (its daemon died) or, with the worker alone dead, the
        # holder's next worker answers it: either way it is no part of what is checked.
        subprocess.run(["cat", str(d.root / "e/b.bin")], capture_output=True, timeout=60)
        with c.after(d) as d:
            check_tree(d, {"e/a.bin": a, "e/b.bin": b}, local={"e/d.bin": bytes(dirty)})
            stats = d.stats()
            assert stats["evict_peak_bytes"] <= MiB + 64 * KiB + 32 * KiB, stats


# -- refresh: SIGKILL in the middle of a reconcile (hsmfs sync) ----------------------------------

#: Where the refresh dies: after its first change (the replaced stub), in the middle of the new
#: stubs, before the last (unlisted) paths, and between a replacement's RENAME_EXCHANGE and the
#: removal of the old stub from staging.
REFRESH_STEPS = ["applied:1", "applied:5", "applied:7", "exchanged"]


@pytest.mark.parametrize("step", REFRESH_STEPS)
@pytest.mark.parametrize(("kind", "scope"), SCOPES)
def test_sigkill_in_the_middle_of_a_refresh(kind: str, scope: str, step: str, bucket: Bucket,
                                            moto: MotoServer, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 changes, adds and deletes objects under a tree with stubs, clean resident files and
    dirty ones; ``hsmfs sync`` dies at ``step``.  After the restart (and, for a worker that
    adopted the tree without listing, one more sync) the tree is what one uninterrupted sync
    makes: S3's new bytes where nothing was local, stale copies kept, local changes kept as
    conflict or dirty, removed stubs gone, no staging leftover."""
    old = {rel: bucket.put(rel, blob(n, rel)) for rel, n in (
        ("s/b-changed.bin", 200 * KiB), ("s/c-stale.bin", 150 * KiB),
        ("s/d-dirty.bin", 100 * KiB), ("s/f-same.bin", 80 * KiB), ("s/g-gone.bin", 50 * KiB),
        ("s/h-gone-res.bin", 60 * KiB), ("s/i-dirty.bin", 70 * KiB))}
    mine = {rel: bytearray(old[rel]) for rel in ("s/d-dirty.bin", "s/i-dirty.bin")}
    # No directory read-ahead: the files left unread must stay stubs (nothing local).
    c = Crash(monkeypatch, bucket, moto, tmp_path / "w", kind, scope, "dir_readahead=off")
    c.arm(crashpoint.REFRESH, step)
    with c.serve() as d:
        for rel in ("s/c-stale.bin", "s/f-same.bin", "s/h-gone-res.bin"):
            assert read(d.root / rel) == old[rel]
        for rel, local in mine.items():
            make_dirty(d.root / rel, 5, b"local edit")
            local[5:15] = b"local edit"
        new = {rel: bucket.put(rel, blob(n, rel + "v2")) for rel, n in (
            ("s/b-changed.bin", 210 * KiB), ("s/c-stale.bin", 150 * KiB),
            ("s/d-dirty.bin", 90 * KiB), ("s/e-new1.bin", 10 * KiB),
            ("s/e-new2.bin", 20 * KiB), ("s/e-new3.bin", 0))}
        for rel in ("s/g-gone.bin", "s/h-gone-res.bin"):
            bucket.delete(rel)
        c.note_worker(d)
        out = hsmfs("sync", str(d.root))
        assert out.returncode != 0, f"the sync was to die at {step}: {out.stdout}"
        with c.after(d) as d:
            if scope == "worker":
                out = hsmfs("sync", str(d.root))  # the new worker adopted; this one finishes
                assert out.returncode == 0, out.stdout + out.stderr
            check_tree(d, {rel: new[rel] for rel in new if rel.startswith(("s/b", "s/e"))}
                       | {"s/f-same.bin": old["s/f-same.bin"]},
                       local={rel: bytes(b) for rel, b in mine.items()},
                       stale={rel: old[rel] for rel in ("s/c-stale.bin", "s/h-gone-res.bin")},
                       gone=("s/g-gone.bin",))
            rows = daemon_rows(d, ["s/d-dirty.bin", "s/i-dirty.bin"])
            assert rows["s/d-dirty.bin"]["sync"] == "conflict", rows
            assert rows["s/i-dirty.bin"]["sync"] == "dirty", rows
            out = hsmfs("sync", str(d.root))  # and nothing is left to do
            assert out.returncode == 0, out.stdout + out.stderr
            assert not [line for line in out.stdout.splitlines()[1:]
                        if not line.startswith("kept")], out.stdout


# -- fill: SIGKILL between a fill's write and its mtime put back ---------------------------------

@pytest.mark.parametrize(("kind", "scope"), [SCOPES[0], SCOPES[1]])
def test_sigkill_between_a_fill_and_its_mtime(kind: str, scope: str, bucket: Bucket,
                                              moto: MotoServer, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A fill's pwrite moves the mtime and the fill puts the version's back; a start takes any
    other mtime on a clean file for a program's write made while no door watched.  Killed in
    between: a file whose every byte is local and hashes to its ETag is S3's copy, so it stays
    clean (its mtime put back); a partial file cannot be told from one written while
    unguarded, and is kept as holding local changes (the safe way: never released, its bytes
    archived again rather than lost).  Every byte reads right either way."""
    small = bucket.put("f/small.bin", blob(300 * KiB + 5, "small"))  # fetched whole
    big = bucket.put("f/big.bin", blob(12 * MiB, "big"))  # above the kernel door's open fill
    part = bucket.put("g/part.bin", blob(12 * MiB, "part"))  # read only after the 2nd start
    c = Crash(monkeypatch, bucket, moto, tmp_path / "w", kind, scope)
    c.arm(crashpoint.FILL, "written")  # the daemon reads its environment at start
    with c.serve() as d:
        c.note_worker(d)
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(["cat", str(d.root / "f/small.bin")], capture_output=True, timeout=30)
        with c.after(d) as d2:
            check_tree(d2, {"f/small.bin": small, "f/big.bin": big})
            version_mtime = float(os.getxattr(d2.cache / "f/small.bin", "trusted.hsmfs.mtime"))
            assert abs(os.stat(d2.cache / "f/small.bin").st_mtime - version_mtime) < 1e-3
    c.arm(crashpoint.FILL, "written")
    with c.serve() as d:
        c.note_worker(d)
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(["dd", f"if={d.root / 'g/part.bin'}", "of=/dev/null", "bs=4096",
                            "skip=1000", "count=1"], capture_output=True, timeout=30)
        with c.after(d) as d2:
            row = daemon_rows(d2, ["g/part.bin"])["g/part.bin"]
            assert row["residency"] == "partial" and row["sync"] == "dirty", row  # the safe way
            assert read(d2.root / "g/part.bin") == part
