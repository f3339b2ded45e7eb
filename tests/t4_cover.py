"""The cover (hsmfs.cover): the cache dir behind an empty read-only mount while nothing guards it.

When the pre-content group closes, every unfetched byte of every stub reads as zeros
(docs/unguarded.md).  The cover turns new opens through the cache path into ENOENT.  These tests
check what it hides and what it cannot hide.  They also check that it never removes a mount it
did not make, and the start-up sequence behind it: the private door comes from beneath the
cover, and the stubs are marked before anyone can open them.

Everything is real: mounts in this mount namespace, reads by separate processes (each killed
after a timeout, so a read blocked in the kernel cannot hang a test), and a real fanotify
pre-content group where guarding matters.  Every mount a test makes is removed in ``finally``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, run

from hsmfs import cover as cv
from hsmfs.fanotify import (
    FAN_ALLOW,
    FAN_CLASS_PRE_CONTENT,
    FAN_CLOEXEC,
    FAN_MARK_ADD,
    FAN_NONBLOCK,
    FAN_PRE_ACCESS,
    FAN_UNLIMITED_QUEUE,
    deny_errno,
    fanotify_init,
    fanotify_mark_fd,
    ignore_mount,
    parse_events,
    write_response,
)

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root"),
]

STUB_SIZE = 1 << 20
DATA = b"hsmfs cover test\n" * 100
PAGE = 4096

#: One reader process: open + pread(4 KiB) -> DATA / ZEROS / EOF / an errno name.
READER = r"""
import errno, os, sys
try:
    fd = os.open(sys.argv[1], os.O_RDONLY)
    b = os.pread(fd, 4096, int(sys.argv[2]))
    print("DATA" if b.strip(b"\0") else "ZEROS" if b else "EOF")
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno))
"""


class FdProgram:
    """An unaware program in its own process that opens files and preads them on command, so
    a test can read through an fd opened before a stop.  Every answer is awaited with a
    deadline; the process is SIGKILLed by PID when the test leaves the ``with`` block."""

    CODE = r"""
import json, os, sys
for line in sys.stdin:
    c = json.loads(line)
    try:
        if c["op"] == "open":
            out = {"fd": os.open(c["path"], os.O_RDONLY)}
        else:
            out = {"hex": os.pread(c["fd"], c["n"], c["off"]).hex()}
    except OSError as e:
        out = {"errno": e.errno}
    print(json.dumps(out), flush=True)
"""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        self._buf = b""

    def __enter__(self) -> FdProgram:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.proc.stdin.close()
        self.proc.stdout.close()

    def _call(self, timeout: float = 10, **cmd: object) -> dict:
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            r, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            if not r:
                raise TimeoutError(f"no answer to {cmd} within {timeout} s (blocked?)")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the program died during {cmd}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        out = json.loads(line)
        if "errno" in out:
            raise OSError(out["errno"], os.strerror(out["errno"]))
        return out

    def open(self, path: str | os.PathLike) -> int:
        return self._call(op="open", path=str(path))["fd"]

    def pread(self, fd: int, n: int, off: int) -> bytes:
        return bytes.fromhex(self._call(op="pread", fd=fd, n=n, off=off)["hex"])


def read_child(path: str | os.PathLike, off: int = 0, prefix: tuple[str, ...] = (),
               timeout: float = 5) -> str:
    """What a separate, unaware process reads; BLOCKED if it was still waiting at ``timeout``."""
    p = run(["timeout", "-s", "KILL", str(timeout), *prefix, sys.executable, "-c", READER,
             str(path), str(off)], timeout=timeout + 15)
    if p.returncode in (137, -9):
        return "BLOCKED"
    return p.stdout.decode().strip() or f"rc={p.returncode} {p.stderr.decode()[-200:]}"


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_at(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(fstype, source) of every mount whose mount point is ``path``.  The test's own reader on
    purpose: an oracle independent of hsmfs.mounts, which hsmfs.cover itself uses."""
    target = os.path.realpath(path)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4]) == target:
                sep = fields.index("-", 6)
                out.append((fields[sep + 1], _unescape(fields[sep + 2])))
    return out


def _mount_points_under(base: str) -> list[str]:
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = _unescape(line.split()[4])
            if mp == base or mp.startswith(base + "/"):
                found.append(mp)
    return sorted(found, key=len, reverse=True)


def unmount_everything_under(base: Path) -> None:
    """Lazily unmount every mount under ``base`` (all of them this test's own), bounded."""
    target = os.path.realpath(base)
    for _ in range(20):
        points = _mount_points_under(target)
        if not points:
            return
        for mp in points:
            run(["umount", "-l", mp], timeout=30)
    raise AssertionError(f"still mounted under {target}: {_mount_points_under(target)}")


def make_tree(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "stub", "wb") as f:
        f.truncate(STUB_SIZE)  # a fully sparse stub: every byte is a hole
    (cache / "data").write_bytes(DATA)
    return cache


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Path]:
    """A cache dir on this test's filesystem (the inode-mark layout)."""
    try:
        yield make_tree(tmp_path / "cache")
    finally:
        unmount_everything_under(tmp_path)


@contextlib.contextmanager
def loop_fs(tmp_path: Path) -> Iterator[Path]:
    """A fresh ext4 image mounted at ``tmp_path/vol`` (the filesystem-mark layout)."""
    image, vol = tmp_path / "vol.img", tmp_path / "vol"
    vol.mkdir()
    run(["truncate", "-s", "64M", str(image)], check=True)
    try:
        run(["mkfs.ext4", "-q", "-F", str(image)], timeout=120, check=True)
        run(["mount", "-o", "loop", str(image), str(vol)], check=True)
        yield make_tree(vol)
    finally:
        unmount_everything_under(tmp_path)
        for line in run(["losetup", "-j", str(image)]).stdout.decode().splitlines():
            run(["losetup", "-d", line.split(":", 1)[0]])
        with contextlib.suppress(OSError):
            image.unlink()


class Guard:
    """A minimal holder: a pre-content group whose listener thread fills what is read with
    b"H" (through the event fd) and allows it.  The stubs are marked through ``door``, a
    private tree with a mount ignore mark, as the kernel door does."""

    def __init__(self, door: int, names: list[str]) -> None:
        self.fan = fanotify_init(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK
                                 | FAN_UNLIMITED_QUEUE, os.O_RDWR | os.O_LARGEFILE)
        ignore_mount(self.fan, door, FAN_PRE_ACCESS)
        for name in names:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=door)
            try:
                fanotify_mark_fd(self.fan, FAN_MARK_ADD, FAN_PRE_ACCESS, fd)
            finally:
                os.close(fd)
        self.events = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select([self.fan], [], [], 0.05)
            if not r:
                continue
            try:
                buf = os.read(self.fan, 65536)
            except BlockingIOError:
                continue
            for ev in parse_events(buf):
                if ev.fd < 0:
                    continue
                self.events += 1
                size = os.fstat(ev.fd).st_size
                off = ev.offset or 0
                end = size if not ev.count else min(size, off + ev.count)
                if end > off:
                    os.pwrite(ev.fd, b"H" * (end - off), off)
                write_response(self.fan, ev.fd, FAN_ALLOW)
                os.close(ev.fd)

    def close(self) -> None:
        """Stop listening, deny whatever is still queued, close the group (as H's stop does)."""
        if self.fan < 0:
            return
        self._stop.set()
        self._thread.join(10)
        for _ in range(100):
            try:
                events = parse_events(os.read(self.fan, 65536))
            except BlockingIOError:
                break
            for ev in events:
                if ev.fd >= 0:
                    with contextlib.suppress(OSError):
                        write_response(self.fan, ev.fd, deny_errno(errno.EIO))
                    os.close(ev.fd)
        os.close(self.fan)
        self.fan = -1


# -- what the cover hides ------------------------------------------------------------------------

def test_cover_hides_the_tree_until_uncovered(tree: Path) -> None:
    assert read_child(tree / "stub") == "ZEROS"  # unguarded: the hazard this module is for
    assert read_child(tree / "data") == "DATA"
    assert not cv.is_covered(tree)

    assert cv.cover(tree) is True
    assert cv.is_covered(tree)
    assert mounts_at(tree)[-1] == ("tmpfs", cv.COVER_SOURCE)
    for name in ("stub", "data"):
        assert read_child(tree / name) == "ENOENT"
    assert read_child(tree / "stub", prefix=("unshare", "-m")) == "ENOENT"  # a new mntns
    assert os.listdir(tree) == [cv.MARKER]
    marker = (tree / cv.MARKER).read_text()
    assert marker.splitlines()[:2] == ["hsmfs-cover v1", f"covered: {os.path.realpath(tree)}"]
    with pytest.raises(OSError) as exc:
        os.open(tree / "new", os.O_CREAT | os.O_WRONLY, 0o644)
    assert exc.value.errno == errno.EROFS
    assert os.path.ismount(tree)  # the cover is a mount ...
    assert not cv.is_mount_beneath(tree)  # ... over a plain directory

    assert cv.uncover(tree) is True
    assert not cv.is_covered(tree)
    assert mounts_at(tree) == []
    assert sorted(os.listdir(tree)) == ["data", "stub"]
    assert read_child(tree / "data") == "DATA"
    assert cv.uncover(tree) is False


def test_cover_twice_mounts_one_cover(tree: Path) -> None:
    assert cv.cover(tree) is True
    assert cv.cover(str(tree) + "/") is False  # same directory, other spelling
    assert mounts_at(tree) == [("tmpfs", cv.COVER_SOURCE)]
    assert cv.uncover(tree) is True
    assert mounts_at(tree) == []


def test_cover_a_path_that_mountinfo_escapes(tmp_path: Path) -> None:
    """mountinfo writes space and backslash as \\040 and \\134: recognition must decode them."""
    cache = make_tree(tmp_path / "my cache\\dir")
    try:
        assert cv.cover(cache) is True
        assert cv.is_covered(cache)
        assert cv.cover(cache) is False
        assert read_child(cache / "data") == "ENOENT"
        assert cv.uncover(cache) is True
        assert read_child(cache / "data") == "DATA"
    finally:
        unmount_everything_under(tmp_path)


def test_cover_over_a_filesystem_root(tmp_path: Path) -> None:
    """The filesystem-mark layout: the cache dir is itself a mount point."""
    with loop_fs(tmp_path) as vol:
        assert cv.is_mount_beneath(vol)
        cv.cover(vol)
        assert [m[0] for m in mounts_at(vol)] == ["ext4", "tmpfs"]
        assert read_child(vol / "data") == "ENOENT"
        assert cv.is_mount_beneath(vol)  # still the ext4 root beneath
        door = cv.open_beneath(vol)
        try:
            fd = os.open("data", os.O_RDONLY, dir_fd=door)
            assert os.read(fd, len(DATA)) == DATA
            os.close(fd)
        finally:
            os.close(door)
        assert cv.uncover(vol)
        assert read_child(vol / "data") == "DATA"


def test_cover_outlives_the_process_that_made_it(tree: Path) -> None:
    """The cover is a mount of the namespace, owned by no process: SIGKILL leaves it."""
    code = ("import sys, time; from hsmfs import cover; cover.cover(sys.argv[1]); "
            "print('covered', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tree)], cwd=ROOT,
                            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        r, _, _ = select.select([proc.stdout], [], [], 30)
        assert r and proc.stdout.readline().strip() == b"covered"
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
    assert cv.is_covered(tree)
    assert read_child(tree / "stub") == "ENOENT"
    assert cv.uncover(tree)  # any process may remove it: recognition is by the mount
    assert read_child(tree / "data") == "DATA"


# -- never touching a mount it did not make ------------------------------------------------------

def test_uncover_leaves_a_plain_tmpfs_alone(tree: Path) -> None:
    run(["mount", "-t", "tmpfs", "-o", "size=1m", "sometmpfs", str(tree)], check=True)
    assert not cv.is_covered(tree)
    assert cv.uncover(tree) is False
    assert mounts_at(tree) == [("tmpfs", "sometmpfs")]


@pytest.mark.parametrize("marker", [None, "hsmfs-cover v1\ncovered: /somewhere/else\n",
                                    "not a cover\n"])
def test_uncover_leaves_a_forged_cover_alone(tree: Path, marker: str | None) -> None:
    """Right fstype and source, but no marker, or a marker for another path: not ours."""
    run(["mount", "-t", "tmpfs", "-o", "size=1m", cv.COVER_SOURCE, str(tree)], check=True)
    if marker is not None:
        (tree / cv.MARKER).write_text(marker)
    assert not cv.is_covered(tree)
    assert cv.uncover(tree) is False
    assert mounts_at(tree) == [("tmpfs", cv.COVER_SOURCE)]


def test_uncover_stops_at_a_foreign_mount_on_top(tree: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "theirs").write_text("x")
    cv.cover(tree)
    run(["mount", "--bind", str(other), str(tree)], check=True)  # somebody else's, on top
    assert not cv.is_covered(tree)
    assert cv.uncover(tree) is False
    assert [src == cv.COVER_SOURCE for _fstype, src in mounts_at(tree)] == [True, False]
    assert os.listdir(tree) == ["theirs"]
    # A new cover may go on top of theirs; uncover removes only that one.
    assert cv.cover(tree) is True
    assert cv.uncover(tree) is True
    assert os.listdir(tree) == ["theirs"]
    run(["umount", str(tree)], check=True)
    assert cv.is_covered(tree)
    assert cv.uncover(tree) is True


# -- what it reaches through mount propagation, and what it cannot reach -------------------------

def test_cover_reaches_shared_peers_but_not_private_binds(tmp_path: Path) -> None:
    outer = tmp_path / "outer"
    outer.mkdir()
    try:
        run(["mount", "--bind", str(outer), str(outer)], check=True)
        run(["mount", "--make-shared", str(outer)], check=True)
        cache = make_tree(outer / "cache")
        peer, private = tmp_path / "peer", tmp_path / "private"
        peer.mkdir()
        private.mkdir()
        run(["mount", "--bind", str(cache), str(peer)], check=True)  # a peer of outer
        run(["mount", "--bind", str(cache), str(private)], check=True)
        run(["mount", "--make-private", str(private)], check=True)  # like docker's -v

        cv.cover(cache)
        assert read_child(cache / "data") == "ENOENT"
        assert read_child(peer / "data") == "ENOENT"  # propagated
        assert read_child(private / "stub") == "ZEROS"  # what remains exposed
        assert cv.uncover(cache)
        assert read_child(peer / "data") == "DATA"  # the unmount propagated too
        assert [src == cv.COVER_SOURCE for _fstype, src in mounts_at(peer)] == [False]
    finally:
        unmount_everything_under(tmp_path)


def test_fds_held_across_the_stop_are_not_covered(tree: Path) -> None:
    """No mount can reach an open fd: this is the exposure docs/unguarded.md names."""
    with FdProgram() as app:
        fd = app.open(tree / "stub")
        cv.cover(tree)
        assert app.pread(fd, PAGE, 0) == bytes(PAGE)
        assert read_child(tree / "stub") == "ENOENT"


# -- start-up behind the cover -------------------------------------------------------------------

def test_open_beneath_reaches_the_tree_while_the_path_stays_covered(tree: Path) -> None:
    plain = cv.open_beneath(tree)  # not covered: a plain clone
    os.close(plain)
    cv.cover(tree)
    door = cv.open_beneath(tree)
    try:
        assert not os.get_inheritable(door)
        fd = os.open("data", os.O_RDONLY, dir_fd=door)
        assert os.read(fd, len(DATA)) == DATA
        os.close(fd)
        top = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=door)
        try:
            assert sorted(os.listdir(top)) == ["data", "stub"]
        finally:
            os.close(top)
    finally:
        os.close(door)
    assert cv.is_covered(tree)
    assert read_child(tree / "data") == "ENOENT"


@pytest.mark.needs_precontent
def test_stop_then_restart_behind_the_cover(tree: Path) -> None:
    """The sequence the holder is meant to run: serve; cover, then close the group; at the next
    start, take the private door from beneath the cover, mark, and uncover only after that."""
    door = cv.open_beneath(tree)
    guard = Guard(door, ["stub"])
    door2 = -1
    guard2 = None
    try:
        with FdProgram() as app:
            held = app.open(tree / "stub")
            assert app.pread(held, PAGE, 0) == b"H" * PAGE  # guarded: filled on access
            assert guard.events == 1

            # hsmfs stop: cover first, then close the group.
            cv.cover(tree)
            guard.close()
            os.close(door)
            door = -1
            assert read_child(tree / "stub", off=PAGE * 16) == "ENOENT"
            assert app.pread(held, PAGE, PAGE * 32) == bytes(PAGE)  # remains exposed

            # The next start: the door comes from beneath, the stubs are marked, then uncover.
            door2 = cv.open_beneath(tree)
            guard2 = Guard(door2, ["stub"])
            fd = os.open("stub", os.O_RDONLY, dir_fd=door2)
            assert os.pread(fd, PAGE, PAGE * 48) == bytes(PAGE)  # the door raises nothing
            os.close(fd)
            assert guard2.events == 0
            assert read_child(tree / "stub", off=PAGE * 64) == "ENOENT"  # still covered
            assert cv.uncover(tree)
            assert read_child(tree / "stub", off=PAGE * 80) == "DATA"
            # An fd opened under the old group is guarded again by the new group's mark.
            assert app.pread(held, PAGE, PAGE * 96) == b"H" * PAGE
            assert guard2.events == 2
    finally:
        guard.close()
        if guard2 is not None:
            guard2.close()
        for fd in (door, door2):
            if fd >= 0:
                os.close(fd)


# -- the command line, and what the module may import --------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "hsmfs.cover", *args], cwd=ROOT,
               env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_command_line(tree: Path) -> None:
    st = _cli("status", str(tree))
    assert (st.returncode, st.stdout.strip()) == (1, b"not covered")
    assert _cli("cover", str(tree)).stdout.strip() == b"covered"
    st = _cli("status", str(tree))
    assert (st.returncode, st.stdout.strip()) == (0, b"covered")
    assert _cli("cover", str(tree)).stdout.strip() == b"already covered"
    assert _cli("uncover", str(tree)).stdout.strip() == b"uncovered"
    assert _cli("uncover", str(tree)).stdout.strip() == b"no hsmfs cover"
    bad = _cli("cover", str(tree / "data"))
    assert bad.returncode == 2 and b"hsmfs.cover:" in bad.stderr
    assert mounts_at(tree) == [] and mounts_at(tree / "data") == []


def test_importable_without_trio_or_boto3() -> None:
    code = ("import sys, hsmfs.cover; "
            "bad = [m for m in ('trio', 'boto3', 'botocore', 'pyfuse3') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    p = run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stdout + p.stderr
