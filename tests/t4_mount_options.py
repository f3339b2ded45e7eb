"""The mount options users expect (issue 14, item 4), each through a real FUSE mount, checked
as another user (``nobody``) where the option is about who may do what.

``ro``/``rw``: read-only on request (also tests/t4_fuse.py), the later of the two wins.
``allow_other``: without it the kernel refuses every other user; with it they get in.
``default_permissions`` (always on): the kernel checks modes, so a 0600 file stays private even
though the daemon, root, could read it for anyone.  ``uid=``/``gid=``/``umask=``: what the mount
shows and checks; the backing tree keeps its real owner and mode.  ``file_mode=``/``dir_mode=``:
the modes of what hsmfs makes from objects without ``x-amz-meta-mode``.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Bucket, MotoServer, seeded
from support.doors import serve_door

pytestmark = [pytest.mark.needs_fuse, pytest.mark.timeout(120)]

NOBODY = 65534

@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp_path is 0700: ``nobody`` could not
    reach a mount under it whatever the mount allowed)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the checks run as another user")
    d = Path(tempfile.mkdtemp(prefix="hsmfs-opts-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)  # after serve_door unmounted (inner with)


def _as_nobody(*paths: Path) -> dict[str, object]:
    """As ``nobody``, with unaware programs (the interpreter may not be reachable by that
    user): {path: [mode, uid, gid(, sha256 of a file)]} or "EACCES"."""
    out: dict[str, object] = {}
    for p in paths:
        st = subprocess.run(["stat", "-c", "%a %u %g %F", str(p)], user=NOBODY, group=NOBODY,
                            extra_groups=[], capture_output=True, text=True, timeout=30, cwd="/")
        if st.returncode != 0:
            assert "Permission denied" in st.stderr, st.stderr
            out[str(p)] = "EACCES"
            continue
        mode, uid, gid, kind = st.stdout.split(maxsplit=3)
        row: list[object] = [int(mode, 8), int(uid), int(gid)]
        if kind.strip() == "regular file":
            sha = subprocess.run(["sha256sum", str(p)], user=NOBODY, group=NOBODY,
                                 extra_groups=[], capture_output=True, text=True, timeout=30,
                                 cwd="/")
            row.append(sha.stdout.split()[0] if sha.returncode == 0 else "EACCES")
        out[str(p)] = row
    return out


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _objects(bucket: Bucket) -> tuple[bytes, bytes]:
    pub = bucket.put("d/pub.txt", seeded(5000, "pub"))
    priv = bucket.put("d/priv.txt", seeded(3000, "priv"), mode=stat.S_IFREG | 0o600)
    return pub, priv


def test_allow_other_and_default_permissions(bucket: Bucket, moto: MotoServer,
                                             open_dir: Path) -> None:
    pub, _ = _objects(bucket)
    src = f"s3://{bucket.name}"
    with serve_door("fuse", src, open_dir / "a", moto.endpoint) as d:
        # Without allow_other the kernel lets no other user in, not even to stat.
        got = _as_nobody(d.root / "d/pub.txt")
        assert got[str(d.root / "d/pub.txt")] == "EACCES"
    with serve_door("fuse", src, open_dir / "b", moto.endpoint, "allow_other",
                    "default_permissions") as d:
        pub_p, priv_p = d.root / "d/pub.txt", d.root / "d/priv.txt"
        got = _as_nobody(pub_p, priv_p)
        assert got[str(pub_p)] == [0o644, 0, 0, _sha(pub)]
        # The daemon (root) would read it for anyone: the kernel's mode check says no.
        assert got[str(priv_p)] == [0o600, 0, 0, "EACCES"]
        assert stat.S_IMODE(priv_p.stat().st_mode) == 0o600


def test_uid_gid_umask_change_the_view_not_the_tree(bucket: Bucket, moto: MotoServer,
                                                    open_dir: Path) -> None:
    pub, priv = _objects(bucket)
    with serve_door("fuse", f"s3://{bucket.name}", open_dir, moto.endpoint, "allow_other",
                    f"uid={NOBODY}", f"gid={NOBODY}", "umask=027") as d:
        pub_p, priv_p, dir_p = d.root / "d/pub.txt", d.root / "d/priv.txt", d.root / "d"
        got = _as_nobody(pub_p, priv_p, dir_p)
        # Now nobody owns everything: it reads its 0600 file; umask 027 masks every mode.
        assert got[str(pub_p)] == [0o640, NOBODY, NOBODY, _sha(pub)]
        assert got[str(priv_p)] == [0o600, NOBODY, NOBODY, _sha(priv)]
        assert got[str(dir_p)] == [0o750, NOBODY, NOBODY]
        root_st = d.root.stat()
        assert (root_st.st_uid, stat.S_IMODE(root_st.st_mode)) == (NOBODY, 0o750)
        # The backing tree, which the kernel door serves, keeps the real owner and mode.
        back = (d.cache / "d/pub.txt").stat()
        assert (back.st_uid, back.st_gid, stat.S_IMODE(back.st_mode)) == (0, 0, 0o644)


def test_file_mode_dir_mode_and_rw_after_ro(bucket: Bucket, moto: MotoServer,
                                            tmp_path: Path) -> None:
    _objects(bucket)
    with serve_door("fuse", f"s3://{bucket.name}", tmp_path, moto.endpoint, "file_mode=0640",
                    "dir_mode=0750", "ro", "rw") as d:
        assert stat.S_IMODE((d.root / "d/pub.txt").stat().st_mode) == 0o640
        assert stat.S_IMODE((d.root / "d").stat().st_mode) == 0o750
        # An object's own x-amz-meta-mode wins over file_mode.
        assert stat.S_IMODE((d.root / "d/priv.txt").stat().st_mode) == 0o600
        # "ro,rw": the later one wins, so the mount is writable.
        (d.root / "d/new.txt").write_bytes(b"written")
        assert (d.cache / "d/new.txt").read_bytes() == b"written"
