"""Containers (issue 14, item 1), without a container engine: programs in new mount, PID and
user namespaces (``unshare``) that see the cache bind-mounted at another path get the right
bytes through the kernel door, a stub nobody read before included; as ``nobody`` with a user
namespace (what rootless podman does), and as root (docker) where a read-only bind refuses
writes and a writable one records them as dirty files.

The kernel door guards the cache's inodes, not a path, so every bind of the cache, in any
namespace, is guarded (KERNEL_FACTS: bind mounts and mount namespaces).  podman and docker
themselves are not run: they need an image from a container registry, which this test
environment cannot reach.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Bucket, MotoServer, seeded
from support.doors import serve_door

from hsmfs.cover import uncover
from hsmfs.mounts import mountinfo

pytestmark = [pytest.mark.needs_precontent, pytest.mark.timeout(120)]

NOBODY = 65534


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp_path is 0700)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) (util-linux)")
    d = Path(tempfile.mkdtemp(prefix="hsmfs-ns-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        # A kernel-door stop covers its cache (hsmfs.cover); conftest lifts covers under
        # tmp_path only, and this directory is elsewhere.
        for m in mountinfo():
            if m.source == "hsmfs-cover" and m.mount_point.startswith(f"{d}/"):
                with contextlib.suppress(OSError):
                    uncover(m.mount_point)
        shutil.rmtree(d, ignore_errors=True)


def _in_namespaces(script: str, *, as_nobody: bool, **paths: Path) -> str:
    """Run ``sh -c script`` as PID 1 of new mount and PID namespaces (plus a user namespace
    mapping ``nobody`` to root in it, when ``as_nobody``); $NAME is each path given.  Every
    process is gone when this returns (the namespace's PID 1 exits, the kernel kills the rest)."""
    cmd = ["unshare", "--mount", "--pid", "--fork", "--kill-child"]
    if as_nobody:
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
               *cmd[:1], "--user", "--map-root-user", *cmd[1:]]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **{k: str(v) for k, v in paths.items()}}
    out = subprocess.run([*cmd, "sh", "-euc", script], env=env, capture_output=True,
                         text=True, timeout=60, cwd="/")
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
    return out.stdout


def _state(path: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "hsmfs", "state", "--json", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)[0]["state"]


def test_unprivileged_user_namespace_reads_a_cold_stub(bucket: Bucket, moto: MotoServer,
                                                       open_dir: Path) -> None:
    data = bucket.put("a/cold.bin", seeded(300_000, "ns-cold"))
    small = bucket.put("b.txt", seeded(5000, "ns-small"))
    view = open_dir / "view"
    view.mkdir(mode=0o755)
    with serve_door("kernel", f"s3://{bucket.name}", open_dir / "w", moto.endpoint,
                    "small_file=0", "chunk=64K", "open_fill=off") as d:
        assert _state(d.cache / "a/cold.bin") == "stub"
        out = _in_namespaces(
            'mount --bind "$CACHE" "$VIEW"\n'
            'echo "pid $$ uid $(id -u)"\n'
            'sha256sum "$VIEW/a/cold.bin" "$VIEW/b.txt"\n',
            as_nobody=True, CACHE=d.cache, VIEW=view)
        lines = out.splitlines()
        assert lines[0] == "pid 1 uid 0"  # PID 1 of its namespace, root only inside it
        got = {Path(p).name: digest for digest, p in (line.split() for line in lines[1:])}
        assert got == {"cold.bin": hashlib.sha256(data).hexdigest(),
                       "b.txt": hashlib.sha256(small).hexdigest()}
        assert _state(d.cache / "a/cold.bin") == "resident"  # fetched for the namespace
        stats = d.stats()
        assert stats["fetched_bytes"] >= len(data) and not stats["errors"]
        assert not os.path.ismount(view)  # the bind lived and died with its namespace


def test_read_only_bind_and_a_writable_one(bucket: Bucket, moto: MotoServer,
                                           open_dir: Path) -> None:
    """A read-only bind (``docker run -v CACHE:/data:ro``) reads what is resident and refuses
    writes; it **cannot fetch**: the holder's event fds are O_RDWR (holder.py,
    HOLDER_EVENT_F_FLAGS), which the kernel cannot open on a read-only mount, so it denies the
    access itself (EPERM to the program, an EROFS line in hsmfs's log).  A limit recorded
    here, not a goal (README, "Containers").  A writable bind fetches, and its writes are
    recorded as dirty files."""
    data = bucket.put("c.bin", seeded(200_000, "ns-ro"))
    base = bucket.put("w.txt", b"from S3\n")
    ro, rw = open_dir / "ro", open_dir / "rw"
    ro.mkdir()
    rw.mkdir()
    with serve_door("kernel", f"s3://{bucket.name}", open_dir / "w", moto.endpoint) as d:
        out = _in_namespaces(
            'mount --bind "$CACHE" "$RO"\n'
            'mount -o remount,bind,ro "$RO"\n'
            'if cat "$RO/c.bin" >/dev/null 2>&1; then echo cold-read; else echo cold-refused; fi\n'
            'mount --bind "$CACHE" "$RW"\n'
            'sha256sum < "$RW/c.bin"\n'
            'sha256sum < "$RO/c.bin"\n'
            'if echo x >> "$RO/c.bin" 2>/dev/null; then echo written; else echo refused; fi\n'
            'echo "from a container" >> "$RW/w.txt"\n',
            as_nobody=False, CACHE=d.cache, RO=ro, RW=rw)
        cold, via_rw, via_ro, write = [line.split()[0] for line in out.splitlines()]
        assert cold == "cold-refused"  # the limit above
        assert via_rw == via_ro == hashlib.sha256(data).hexdigest()  # resident: ro reads it
        assert write == "refused"
        assert "came without an fd (EROFS" in d.log()
        # The write through the container's bind landed on the cache and is recorded: whole
        # file local first (S3's bytes kept), then dirty, for hsmfs archive.
        assert (d.cache / "w.txt").read_bytes() == base + b"from a container\n"
        assert _state(d.cache / "w.txt") == "dirty"
