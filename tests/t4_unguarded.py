"""When the kernel door stops guarding: the cover over the cache dir (hsmfs.cover), through the
real `hsmfs serve`, a real S3 and real fanotify (docs/unguarded.md has the measurements).

* A clean stop covers the tree before the group closes: a new open by path fails (ENOENT)
  instead of reading an unfetched stub as zeros; the next start lifts the cover and serves.
* A holder that dies leaves its worker holding the last fd of the group: the worker covers the
  tree and denies what was pending before it exits.
* `-o cover=off` keeps the old behaviour for those who remove the tree themselves.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Bucket, MotoServer, seeded, sha256
from support.doors import serve_door

from hsmfs.cover import is_covered

pytestmark = [pytest.mark.needs_precontent, pytest.mark.timeout(120)]

MiB = 1 << 20
OPTS = ("open_fill=off", "small_file=0", "chunk=64K")


def _open_errno(path: Path) -> int | None:
    """errno of opening and reading ``path`` in a separate, bounded process (None: it read)."""
    code = ("import os, sys\n"
            "try:\n"
            "    fd = os.open(sys.argv[1], os.O_RDONLY); os.pread(fd, 4096, 1 << 20)\n"
            "except OSError as e:\n"
            "    print(e.errno); sys.exit(0)\n"
            "print('read')\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, timeout=30)
    word = out.stdout.strip()
    return None if word == "read" else int(word)


def test_stop_covers_the_tree_and_the_next_start_lifts_it(bucket: Bucket, moto: MotoServer,
                                                          tmp_path: Path) -> None:
    data = bucket.put("d/cold.bin", seeded(4 * MiB, "cold"))
    source = f"s3://{bucket.name}"
    with serve_door("kernel", source, tmp_path / "w", moto.endpoint, *OPTS) as d:
        cache = d.root
        assert not is_covered(cache)
    assert is_covered(cache)
    assert _open_errno(cache / "d/cold.bin") == errno.ENOENT  # never zeros
    # What is there says why; hsmfs's own state (its log) stays reachable through it.
    assert sorted(os.listdir(cache)) == [".hsmfs", ".hsmfs-cover"]
    with serve_door("kernel", source, tmp_path / "w", moto.endpoint, *OPTS) as d:
        assert not is_covered(cache)
        assert sha256((d.root / "d/cold.bin").read_bytes()) == sha256(data)
        assert "lifted the cover the last stop left" in d.log()


def test_a_start_lifts_the_cover_only_once_every_stub_is_guarded(
        bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    """A reader that keeps opening a cold stub by path while the door stops and starts again
    (inode marks: the cache shares `/`) sees right bytes, ENOENT (covered) or EIO (its read was
    pending when a door stopped), never zeros."""
    data = bucket.put("cold.bin", seeded(4 * MiB, "cold"))
    source = f"s3://{bucket.name}"
    with serve_door("kernel", source, tmp_path / "w", moto.endpoint, *OPTS) as d:
        cache = d.root
    code = ("import os, sys, time\n"
            "want = open(sys.argv[2], 'rb').read()\n"
            "end = time.monotonic() + float(sys.argv[3]); seen = set()\n"
            "while time.monotonic() < end:\n"
            "    off = int.from_bytes(os.urandom(3), 'little') % (len(want) - 4096) & ~4095\n"
            "    try:\n"
            "        fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "    except FileNotFoundError:\n"
            "        seen.add('enoent'); continue\n"
            "    try:\n"
            "        got = os.pread(fd, 4096, off)\n"
            "    except OSError as e:\n"
            "        if e.errno != 5: raise\n"
            "        seen.add('eio'); continue\n"  # pending when the door stopped: EIO
            "    finally:\n"
            "        os.close(fd)\n"
            "    if got != want[off:off + 4096]:\n"
            "        print('WRONG', off, got[:8]); sys.exit(1)\n"
            "    seen.add('data')\n"
            "print(' '.join(sorted(seen)))\n")
    want = tmp_path / "want.bin"
    want.write_bytes(data)
    reader = subprocess.Popen([sys.executable, "-c", code, str(cache / "cold.bin"), str(want),
                               "12"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        with serve_door("kernel", source, tmp_path / "w", moto.endpoint, *OPTS):
            time.sleep(2)
        out, _ = reader.communicate(timeout=60)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait(10)
    assert reader.returncode == 0, out
    assert "enoent" in out and "data" in out, out


def test_cover_off_leaves_the_tree_as_it_was(bucket: Bucket, moto: MotoServer,
                                             tmp_path: Path) -> None:
    bucket.put("f.bin", seeded(MiB, "f"))
    with serve_door("kernel", f"s3://{bucket.name}", tmp_path / "w", moto.endpoint, *OPTS,
                    "cover=off") as d:
        cache = d.root
    assert not is_covered(cache)
    assert (cache / "f.bin").stat().st_size == MiB


def test_a_dead_holder_leaves_a_covered_tree(bucket: Bucket, moto: MotoServer,
                                             tmp_path: Path) -> None:
    bucket.put("d/cold.bin", seeded(4 * MiB, "cold"))
    with serve_door("kernel", f"s3://{bucket.name}", tmp_path / "w", moto.endpoint,
                    *OPTS) as d:
        cache = d.root
        stats = d.stats()
        worker = int(stats["pid"])
        os.kill(d.proc.pid, signal.SIGKILL)  # the holder alone: its worker lives on
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"the worker {worker} outlived its holder by 30 s:\n{d.log()[-3000:]}")
        assert is_covered(cache), d.log()[-3000:]
        assert _open_errno(cache / "d/cold.bin") == errno.ENOENT
        assert "holder gone: cache dir covered" in d.log()
