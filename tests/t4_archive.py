"""``hsmfs archive`` through the real kernel door (issue 11, item 3).

Real parts only: ``hsmfs serve -f`` as a subprocess guarding a backing tree with fanotify
pre-content events, a real moto S3 server over loopback HTTP, ``cat``/``truncate``/``cp`` as
the programs, and ``hsmfs archive``/``hsmfs state`` as the user runs them.  After every archive
S3 is read back and compared with the local bytes.

A local change is made by truncating a stub through the backing tree (the write paths through
the doors are other work of issue 11): read whole, then ``truncate -s``, which the archive's
lookup records as ``dirty``.

Every wait is bounded (subprocess timeouts, a pytest-timeout per test); every daemon is
stopped by PID and its process group reaped, even when a test fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Bucket, MotoServer, run, seeded, stop_process
from support.doors import Served, serve_door

pytestmark = [pytest.mark.needs_precontent, pytest.mark.timeout(90)]


@contextlib.contextmanager
def serving(bucket: Bucket, moto: MotoServer, workdir: Path) -> Iterator[Served]:
    with serve_door("kernel", f"s3://{bucket.name}", workdir, moto.endpoint) as d:
        try:
            yield d
        finally:
            stop_process(d.proc, timeout=15)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(d.proc.pid, signal.SIGKILL)  # a worker left behind, if any


def hsmfs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hsmfs", *args], capture_output=True,
                          text=True, timeout=timeout)


def archive(*args: str) -> tuple[int, dict[str, str]]:
    """Exit code and ``{path: line}`` of ``hsmfs archive`` (not a terminal: no progress)."""
    out = hsmfs("archive", *args)
    assert "%" not in out.stderr, f"a progress line on a pipe: {out.stderr!r}"
    lines = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        lines[parts[1]] = line
    if out.returncode and not lines:
        lines["<stderr>"] = out.stderr  # a failure with no row: say why in the assertion
    return out.returncode, lines


def state(path: Path) -> str:
    out = hsmfs("state", "--json", str(path))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)[0]["state"]


def s3_bytes(bucket: Bucket, key: str) -> bytes:
    return bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read()


def s3_etag(bucket: Bucket, key: str) -> str:
    return bucket.client.head_object(Bucket=bucket.name, Key=key)["ETag"]


def versions(bucket: Bucket, key: str) -> int:
    listed = bucket.client.list_object_versions(Bucket=bucket.name, Prefix=key)
    return len([v for v in listed.get("Versions", []) if v["Key"] == key])


def cat(path: Path) -> bytes:
    out = run(["cat", str(path)])
    assert out.returncode == 0, out.stderr
    return out.stdout


def make_dirty(path: Path, size: int) -> bytes:
    """Read the stub whole (it becomes resident), then truncate it through the tree."""
    whole = cat(path)
    out = run(["truncate", "-s", str(size), str(path)])
    assert out.returncode == 0, out.stderr
    return whole[:size]


def test_archive_uploads_conflicts_creates_and_deletes(bucket: Bucket, moto: MotoServer,
                                                      tmp_path: Path) -> None:
    bucket.put("d/a.bin", seeded(300_000, "a"))
    bucket.put("d/b.bin", seeded(200_000, "b"))
    bucket.put("d/gone.txt", b"removed locally")
    bucket.put("d/keep.txt", b"never touched")
    with serving(bucket, moto, tmp_path) as d:
        a, b = d.root / "d/a.bin", d.root / "d/b.bin"
        want_a = make_dirty(a, 123_457)
        want_b = make_dirty(b, 1000)
        other = bucket.put("d/b.bin", b"someone else's edit")  # S3 moves on under b
        etag_b_before = hashlib.md5(seeded(200_000, "b")).hexdigest()
        (d.root / "d/new.txt").write_bytes(b"created locally\n")
        os.unlink(d.root / "d/gone.txt")

        code, lines = archive("--dry-run", "--delete", str(d.root / "d"))
        assert code == 0, lines
        new = str(d.root / "d/new.txt")
        assert "would-upload" in lines[str(a)] and "would-upload" in lines[new]
        assert "would-delete" in lines[str(d.root / "d/gone.txt")]
        assert s3_bytes(bucket, "d/gone.txt") == b"removed locally"  # a dry run sends nothing

        code, lines = archive("--delete", str(d.root / "d"))
        assert code == 1, "a conflict must make the archive fail"
        # a: S3 holds exactly the local bytes; the file is clean and resident.
        assert lines[str(a)].startswith("uploaded"), lines
        assert s3_bytes(bucket, "d/a.bin") == want_a == cat(a)
        assert state(a) == "resident"
        # b: someone else's edit won; the local bytes are kept and the file says conflict,
        # and the line names both versions.
        line = lines[str(b)]
        assert line.startswith("conflict"), lines
        assert etag_b_before in line and s3_etag(bucket, "d/b.bin") in line, line
        assert s3_bytes(bucket, "d/b.bin") == other
        assert cat(b) == want_b
        assert state(b) == "conflict"
        # A new file went up as a new key; a removed stub's object is gone; the rest stays.
        assert lines[str(d.root / "d/new.txt")].startswith("uploaded")
        assert s3_bytes(bucket, "d/new.txt") == b"created locally\n"
        assert state(d.root / "d/new.txt") == "resident"
        assert lines[str(d.root / "d/gone.txt")].startswith("deleted")
        assert "d/gone.txt" not in {o["Key"] for o in bucket.client.list_objects_v2(
            Bucket=bucket.name).get("Contents", [])}
        assert lines[str(d.root / "d/keep.txt")].startswith("unchanged")
        assert s3_bytes(bucket, "d/keep.txt") == b"never touched"

        # Archiving again sends nothing: everything is clean (b stays in conflict).
        etag_a = s3_etag(bucket, "d/a.bin")
        code, lines = archive(str(a), str(d.root / "d/new.txt"))
        assert code == 0 and all(v.startswith("unchanged") for v in lines.values()), lines
        assert s3_etag(bucket, "d/a.bin") == etag_a


def test_an_upload_that_landed_before_a_crash_is_not_sent_again(
        bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    """SIGKILL of the daemon after the upload landed and before the record was written,
    simulated exactly: the marker the archive persists before sending, and the upload it
    names stored in S3.  The daemon restarts (its listing sees S3's new ETag on a dirty file:
    conflict, for now) and the next archive recognises its own upload: it completes the
    record, sends nothing, and the file is clean.  A versioned bucket counts the PUTs."""
    bucket.client.put_bucket_versioning(Bucket=bucket.name,
                                        VersioningConfiguration={"Status": "Enabled"})
    bucket.put("c.bin", seeded(100_000, "c"))
    base = s3_etag(bucket, "c.bin")
    with serving(bucket, moto, tmp_path / "run1") as d:
        path = d.root / "c.bin"
        local = make_dirty(path, 54_321)
        hsmfs("state", str(path))  # nothing to assert: the archive's lookup records it
        st = path.stat()
        etag = f'"{hashlib.md5(local).hexdigest()}"'
        marker = {"key": "c.bin", "etag": etag, "base": base, "size": st.st_size,
                  "mtime_ns": st.st_mtime_ns}
        os.setxattr(path, "trusted.hsmfs.upload", json.dumps(marker).encode())
        bucket.client.put_object(Bucket=bucket.name, Key="c.bin", Body=local)  # "our" upload
        os.killpg(d.proc.pid, signal.SIGKILL)
        d.proc.wait(10)
        time.sleep(0.2)
    assert versions(bucket, "c.bin") == 2
    # The next daemon serves the same cache (lifting any cover the dead one left).
    with serving(bucket, moto, tmp_path / "run1") as d:
        path = d.root / "c.bin"
        code, lines = archive(str(path))
        assert code == 0, lines
        assert lines[str(path)].startswith("uploaded") and "nothing sent again" in \
            lines[str(path)], lines
        assert versions(bucket, "c.bin") == 2, "the upload was sent twice"
        assert s3_bytes(bucket, "c.bin") == local == cat(path)
        assert state(path) == "resident"
        with pytest.raises(OSError):
            os.getxattr(path, "trusted.hsmfs.upload")
        code, lines = archive(str(path))
        assert code == 0 and lines[str(path)].startswith("unchanged"), lines


def test_sigkill_mid_upload_leaves_no_partial_object_and_uploads_once(
        bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    """A real SIGKILL of the daemon (holder and worker) while a 72 MiB new file goes up in
    parts: S3 shows no object, or the whole one, never a part of it; the next daemon's
    archive stores it exactly once (a versioned bucket counts what was stored) and aborts the
    unfinished multipart upload the kill left."""
    from hsmfs import control

    bucket.client.put_bucket_versioning(Bucket=bucket.name,
                                        VersioningConfiguration={"Status": "Enabled"})
    data = os.urandom(72 << 20)  # multipart: above backend_s3.MULTIPART_THRESHOLD
    with serving(bucket, moto, tmp_path) as d:
        path = d.root / "big.bin"
        path.write_bytes(data)
        job = subprocess.Popen([sys.executable, "-m", "hsmfs", "archive", str(path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while True:  # kill once parts are going out, before the last one is sent
                assert time.monotonic() < deadline, "the upload never started"
                with contextlib.suppress(OSError, ValueError, KeyError):
                    sent = control.query(str(d.cache), {"cmd": "archive_progress"},
                                         timeout=2)["progress"].get("big.bin", [0])[0]
                    if sent > 0:
                        break
                time.sleep(0.01)
            os.killpg(d.proc.pid, signal.SIGKILL)
            d.proc.wait(10)
        finally:
            job.kill()
            job.wait(10)
    listed = bucket.client.list_object_versions(Bucket=bucket.name).get("Versions", [])
    if listed:  # the complete got in before the kill: then it is all of it
        assert s3_bytes(bucket, "big.bin") == data
    with serving(bucket, moto, tmp_path) as d:
        path = d.root / "big.bin"
        code, lines = archive(str(path))
        assert code == 0 and lines[str(path)].startswith("uploaded"), lines
        assert versions(bucket, "big.bin") == 1, "stored twice"
        assert s3_bytes(bucket, "big.bin") == data
        assert state(path) == "resident"
    # The killed upload's id was in the marker: the archive aborted it (no parts billed).
    assert not bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads")


def crash_archive(bucket: Bucket, moto: MotoServer, workdir: Path, rel: str, step: str,
                  change: Callable[[Path], bytes], monkeypatch: pytest.MonkeyPatch
                  ) -> tuple[bytes, dict]:
    """Serve ``workdir``, make the file ``change`` returns the bytes of, and run
    ``hsmfs archive`` on it with the daemon SIGKILLing itself at ``step``
    (``HSMFS_TEST_CRASH_AT``, archive.py); then kill what is left of the daemon.  Returns the
    file's bytes and the marker the crash left on it."""
    monkeypatch.setenv("HSMFS_TEST_CRASH_AT", step)
    with serving(bucket, moto, workdir) as d:
        path = d.root / rel
        local = change(path)
        code, lines = archive(str(path))
        assert code != 0, f"the archive should have died at {step}: {lines}"
        marker = json.loads(os.getxattr(path, "trusted.hsmfs.upload"))
        assert f"HSMFS_TEST_CRASH_AT={step}" in d.log()
        os.killpg(d.proc.pid, signal.SIGKILL)
        d.proc.wait(10)
        time.sleep(0.2)
    monkeypatch.delenv("HSMFS_TEST_CRASH_AT")
    return local, marker


def versioned(bucket: Bucket) -> None:
    bucket.client.put_bucket_versioning(Bucket=bucket.name,
                                        VersioningConfiguration={"Status": "Enabled"})


def test_sigkill_after_the_upload_landed_then_the_next_archive_sends_nothing(
        bucket: Bucket, moto: MotoServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A real SIGKILL of the daemon after its upload landed and before the record: S3 holds
    the upload, with the marker's token; the file is still dirty with its marker.  The next
    daemon's archive recognises its own upload (HEAD: the token), hashes the file once to
    prove S3 holds exactly its bytes, completes the record, and sends nothing (a versioned
    bucket counts the PUTs)."""
    versioned(bucket)
    bucket.put("c.bin", seeded(100_000, "c"))
    local, marker = crash_archive(bucket, moto, tmp_path, "c.bin", "sent",
                                  lambda p: make_dirty(p, 54_321), monkeypatch)
    assert versions(bucket, "c.bin") == 2 and s3_bytes(bucket, "c.bin") == local
    head = bucket.client.head_object(Bucket=bucket.name, Key="c.bin")
    assert head["Metadata"]["hsmfs-upload"] == marker["token"]
    assert marker["size"] == len(local) and marker["base"] != head["ETag"]
    with serving(bucket, moto, tmp_path) as d:
        path = d.root / "c.bin"
        code, lines = archive(str(path))
        assert code == 0 and "nothing sent again" in lines[str(path)], lines
        assert versions(bucket, "c.bin") == 2, "the upload was sent twice"
        assert s3_bytes(bucket, "c.bin") == local == cat(path)
        assert state(path) == "resident"
        with pytest.raises(OSError):
            os.getxattr(path, "trusted.hsmfs.upload")
        code, lines = archive(str(path))
        assert code == 0 and lines[str(path)].startswith("unchanged"), lines
        assert versions(bucket, "c.bin") == 2


@pytest.mark.parametrize("how", ["append", "same size and mtime"])
def test_sigkill_after_the_upload_landed_then_a_write_uploads_again(
        bucket: Bucket, moto: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        how: str) -> None:
    """As above, and then the file is written while no daemon runs: S3 holds the upload
    (ours), but not the file's bytes.  The next archive must not record it clean: it records
    it dirty on the landed version and uploads it (based on that version: no conflict).
    ``same size and mtime``: other bytes of the same length, the mtime set back to the
    marker's (``rsync -t`` style), so only the recovery's hash can tell."""
    versioned(bucket)
    bucket.put("w.bin", seeded(100_000, "w"))
    local, marker = crash_archive(bucket, moto, tmp_path, "w.bin", "sent",
                                  lambda p: make_dirty(p, 60_000), monkeypatch)
    assert versions(bucket, "w.bin") == 2 and s3_bytes(bucket, "w.bin") == local
    path = tmp_path / "cache" / "w.bin"  # the backing tree: no daemon guards it now
    if how == "append":
        with open(path, "ab") as f:
            f.write(b"written after the crash")
    else:
        st = path.stat()
        with open(path, "r+b") as f:
            f.write(b"X" * 100)
        os.utime(path, ns=(st.st_atime_ns, marker["mtime_ns"]))
        assert path.stat().st_mtime_ns == marker["mtime_ns"]
        assert path.stat().st_size == marker["size"]
    want = path.read_bytes()
    assert want != local
    with serving(bucket, moto, tmp_path) as d:
        path = d.root / "w.bin"
        code, lines = archive(str(path))
        assert code == 0 and lines[str(path)].startswith("uploaded"), lines
        assert "nothing sent again" not in lines[str(path)], lines
        assert versions(bucket, "w.bin") == 3
        assert s3_bytes(bucket, "w.bin") == want == cat(path)
        assert state(path) == "resident"
        code, lines = archive(str(path))
        assert code == 0 and lines[str(path)].startswith("unchanged"), lines


@pytest.mark.parametrize("step,size", [("marked", 200_000), ("read", 72 << 20)],
                         ids=["marked-single", "read-multipart"])
def test_sigkill_before_the_upload_is_visible_uploads_once(
        bucket: Bucket, moto: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        step: str, size: int) -> None:
    """A real SIGKILL once the marker is durable and nothing was read (``marked``), or once
    every part was sent and the upload not completed (``read``, multipart): S3 shows no
    object, the marker names the unfinished multipart upload, and the next archive aborts
    it and stores the file exactly once."""
    versioned(bucket)
    data = os.urandom(size)

    def create(path: Path) -> bytes:
        path.write_bytes(data)
        return data

    _local, marker = crash_archive(bucket, moto, tmp_path, "n.bin", step, create,
                                   monkeypatch)
    assert versions(bucket, "n.bin") == 0, "a partial or unrecorded object is visible"
    uploads = bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", [])
    if size > 64 << 20:
        assert marker["upload_id"] and [u["UploadId"] for u in uploads] == [marker["upload_id"]]
    with serving(bucket, moto, tmp_path) as d:
        path = d.root / "n.bin"
        code, lines = archive(str(path))
        assert code == 0 and lines[str(path)].startswith("uploaded"), lines
        assert versions(bucket, "n.bin") == 1
        assert s3_bytes(bucket, "n.bin") == data
        assert state(path) == "resident"
    assert not bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads")
