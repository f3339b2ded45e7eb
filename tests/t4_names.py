"""The kernel door's names group (hsmfs.names): creates, renames and removals made directly in
the backing tree reach the core (issue 11 item 2, issue 12's refresh rules for local removals).

Real parts only: ``hsmfs serve -f`` on a cache under tmp (``/``: the per-stub inode-mark layout,
where the pre-content group never sees a file it did not make), a real moto S3 server, ``sh``
as the program.  Every result is compared with S3 or with the bytes written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import Bucket, MotoServer, run, seeded, wait_until
from support.doors import serve_door

pytestmark = pytest.mark.timeout(90)

UPLOAD_WAIT_S = 12.0


def _s3(bucket: Bucket, key: str) -> bytes | None:
    try:
        return bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read()
    except bucket.client.exceptions.NoSuchKey:
        return None


def _state(path: Path) -> dict:
    out = run([sys.executable, "-m", "hsmfs", "state", "--json", str(path)])
    assert out.returncode == 0, out.stderr
    [row] = json.loads(out.stdout)
    return row


def _sh(script: str) -> None:
    out = run(["sh", "-c", script])
    assert out.returncode == 0, out.stderr


@pytest.mark.needs_precontent
def test_files_made_directly_in_the_tree_are_written_back(bucket: Bucket, moto: MotoServer,
                                                          tmp_path: Path) -> None:
    """Per-stub inode marks never see a new file; the names group's directory marks do, in
    directories that existed at start and in ones made (or moved in) since."""
    bucket.put("sub/old.txt", seeded(10_000, "old"))
    outside = tmp_path / "outside"
    with serve_door("kernel", f"s3://{bucket.name}", tmp_path, moto.endpoint,
                    "writeback=1") as d:
        root = d.root
        _sh(f'echo one > "{root}/top.txt"; echo two > "{root}/sub/new.txt"; '
            f'mkdir -p "{root}/made/deeper" && echo three > "{root}/made/deeper/f.txt"')
        outside.mkdir()
        (outside / "g.txt").write_bytes(b"moved in\n")
        _sh(f'mv "{outside}" "{root}/sub/movedin"')
        expect = {"top.txt": b"one\n", "sub/new.txt": b"two\n",
                  "made/deeper/f.txt": b"three\n", "sub/movedin/g.txt": b"moved in\n"}
        for key, data in expect.items():
            wait_until(lambda k=key, b=data: _s3(bucket, k) == b, UPLOAD_WAIT_S,
                       f"{key} written back")
        kernel = d.stats()["kernel"]
        assert kernel["name_events"] > 0 and kernel["watched_dirs"] >= 4, kernel
        assert _s3(bucket, "sub/old.txt") == seeded(10_000, "old")


@pytest.mark.needs_precontent
def test_rename_and_removal_reach_the_core_and_survive_a_restart(
        bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    a, b = seeded(40_000, "a"), seeded(30_000, "b")
    bucket.put("a.bin", a)
    bucket.put("b.bin", b)
    bucket.put("keep.bin", b"kept")
    with serve_door("kernel", f"s3://{bucket.name}", tmp_path, moto.endpoint) as d:
        _sh(f'mkdir "{d.root}/dir" && mv "{d.root}/b.bin" "{d.root}/dir/b2.bin" '
            f'&& rm "{d.root}/a.bin"')
        # The core follows the rename: the stub at its new path is still a copy of b.bin,
        # served (a cold read through the new name) with S3's bytes.
        wait_until(lambda: _state(d.root / "dir/b2.bin").get("key") == "b.bin", 10,
                   "the renamed stub indexed at its new path")
        assert (d.root / "dir/b2.bin").read_bytes() == b
    # A new daemon lists S3 again: the removed and the renamed-away names are not made again.
    with serve_door("kernel", f"s3://{bucket.name}", tmp_path, moto.endpoint) as d:
        assert not (d.root / "a.bin").exists(), "a removed stub came back at restart"
        assert not (d.root / "b.bin").exists(), "a renamed-away stub came back at restart"
        assert (d.root / "dir/b2.bin").read_bytes() == b
        assert (d.root / "keep.bin").read_bytes() == b"kept"
        # S3 still has both until archive --delete says otherwise.
        assert _s3(bucket, "a.bin") == a and _s3(bucket, "b.bin") == b
        out = run([sys.executable, "-m", "hsmfs", "archive", "--delete", str(d.root)],
                  timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert _s3(bucket, "a.bin") is None and _s3(bucket, "b.bin") is None
        assert _s3(bucket, "dir/b2.bin") == b
    # And after that, nothing to remember: a third start makes neither.
    with serve_door("kernel", f"s3://{bucket.name}", tmp_path, moto.endpoint) as d:
        assert sorted(p.name for p in d.root.iterdir() if p.name != ".hsmfs") == [
            "dir", "keep.bin"]


@pytest.mark.needs_precontent
def test_removal_of_an_object_changed_in_s3_since_does_not_delete_it(
        bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    """A tombstone is of one version: another host's newer bytes are made again locally at
    the next start, and never deleted from S3."""
    bucket.put("shared.txt", b"version one\n")
    with serve_door("kernel", f"s3://{bucket.name}", tmp_path, moto.endpoint) as d:
        _sh(f'rm "{d.root}/shared.txt"')
        wait_until(lambda: (tmp_path / "cache/.hsmfs/removed.log").exists(), 10,
                   "the removal remembered")
    bucket.put("shared.txt", b"version two, from another host\n")
    with serve_door("kernel", f"s3://{bucket.name}", tmp_path, moto.endpoint) as d:
        assert (d.root / "shared.txt").read_bytes() == b"version two, from another host\n"
        out = run([sys.executable, "-m", "hsmfs", "archive", "--delete", str(d.root)],
                  timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert _s3(bucket, "shared.txt") == b"version two, from another host\n"


@pytest.mark.needs_fuse
def test_fuse_removal_survives_a_restart(bucket: Bucket, moto: MotoServer,
                                         tmp_path: Path) -> None:
    """The FUSE door tells the core of its own unlinks: the same tombstone, the same rules."""
    bucket.put("gone.txt", b"removed through the mount\n")
    bucket.put("stays.txt", b"still here\n")
    with serve_door("fuse", f"s3://{bucket.name}", tmp_path, moto.endpoint) as d:
        (d.root / "gone.txt").unlink()
    with serve_door("fuse", f"s3://{bucket.name}", tmp_path, moto.endpoint) as d:
        assert sorted(p.name for p in d.root.iterdir()) == ["stays.txt"]
        assert (d.root / "stays.txt").read_bytes() == b"still here\n"
        out = run([sys.executable, "-m", "hsmfs", "archive", "--delete", str(d.root)],
                  timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert _s3(bucket, "gone.txt") is None
