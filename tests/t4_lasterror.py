"""Issue 13, item 3: ``user.hsm.error`` for HSM-aware programs, through both doors.

A real fault (hsmfs/faultproxy.py in front of moto) fails a read; the program gets the
table's errno, then reads the cause with ``getxattr`` through the door it used (the FUSE mount,
or the backing file for the kernel door) and with ``hsmfs state`` (text and ``--json``):

* cause, errno and HTTP status (403) for an S3 refusal; cause and errno, no status, for a
  connection refused;
* a storm of the same failure writes the xattr once (``error_views_written``);
* a later successful read of the file removes it;
* it is informational: nobody can set it through the mount, and a value written on the
  backing file changes nothing that is served.

Reads run in subprocesses under ``timeout -s KILL``; the daemon is stopped by PID whatever
happens.  (Its survival across a restart is in tests/t4_enospc.py.)
"""

from __future__ import annotations

import calendar
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Bucket, seeded, sha256
from support.doors import DOORS, serve_door

pytestmark = [pytest.mark.timeout(120)]

KiB = 1 << 10
X_ERROR = "user.hsm.error"

READER = r"""
import hashlib, json, os, sys
try:
    with open(sys.argv[1], "rb") as f:
        data = f.read()
    print(json.dumps({"ok": True, "sha": hashlib.sha256(data).hexdigest()}))
except OSError as exc:
    print(json.dumps({"ok": False, "errno": exc.errno}))
"""


def read_file(path: Path, timeout: int = 30) -> dict:
    out = subprocess.run(["timeout", "-s", "KILL", str(timeout), sys.executable, "-c", READER,
                          str(path)], capture_output=True, text=True, timeout=timeout + 10)
    assert out.returncode == 0, f"reader of {path} died ({out.returncode}): {out.stderr}"
    return json.loads(out.stdout)


def view(path: Path) -> str | None:
    try:
        return os.getxattr(path, X_ERROR).decode()
    except OSError as exc:
        assert exc.errno == errno.ENODATA, exc
        return None


def words(value: str) -> dict[str, str]:
    return dict(w.split("=", 1) for w in value.split())


def state(path: Path, *json_flag: str) -> str:
    out = subprocess.run([sys.executable, "-m", "hsmfs", "state", *json_flag, str(path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("door", DOORS)
def test_last_error_through_both_doors(door: str, bucket: Bucket, fault_proxy,
                                       tmp_path: Path) -> None:
    a = bucket.put("a.bin", seeded(256 * KiB + 3, "a"))
    b = bucket.put("b.bin", seeded(256 * KiB + 5, "b"))
    c = bucket.put("c.bin", seeded(256 * KiB + 7, "c"))
    with serve_door(door, f"s3://{bucket.name}", tmp_path / "w", fault_proxy.endpoint,
                    "retries=2", "open_fill=off") as d:
        # S3 refuses (403): EPERM, five times; one xattr write.
        started = time.time()
        fault_proxy.fail_next(1000, 403, "AccessDenied", match="/a.bin")
        for _ in range(5):
            got = read_file(d.root / "a.bin")
            assert got == {"ok": False, "errno": errno.EPERM}, got
        fault_proxy.restore()
        value = view(d.root / "a.bin")
        assert value is not None, d.log()
        w = words(value)
        assert (w["cause"], w["errno"], w["http"]) == ("denied", "EPERM", "403"), value
        when = calendar.timegm(time.strptime(w["time"], "%Y-%m-%dT%H:%M:%SZ"))
        assert started - 2 <= when <= time.time() + 1, value
        assert view(d.cache / "a.bin") == value  # persisted on the backing file
        stats = d.stats()
        assert stats["errors"].get("denied", 0) >= 5, stats["errors"]
        assert stats["error_views_written"] == 1, "a storm of one failure wrote more than once"

        # hsmfs state shows it, in text and JSON.
        text = state(d.root / "a.bin")
        assert f"last error: denied EPERM HTTP 403 at {w['time']}" in text, text
        [row] = json.loads(state(d.root / "a.bin", "--json"))
        assert row["error"] == {"cause": "denied", "errno": "EPERM", "errno_number": errno.EPERM,
                                "http": 403, "time": w["time"]}, row

        # S3 unreachable: EIO, no HTTP status.
        fault_proxy.refuse()
        try:
            got = read_file(d.root / "b.bin")
        finally:
            fault_proxy.restore()
        assert got == {"ok": False, "errno": errno.EIO}, got
        w = words(view(d.root / "b.bin") or "")
        assert (w.get("cause"), w.get("errno"), w.get("http")) == ("unavailable", "EIO", None), w

        # A successful read ends it, on the door and on the backing file.
        for name, data in (("a.bin", a), ("b.bin", b)):
            assert read_file(d.root / name) == {"ok": True, "sha": sha256(data)}, name
            assert view(d.root / name) is None and view(d.cache / name) is None, name
            assert "last error" not in state(d.root / name)
            [row] = json.loads(state(d.root / name, "--json"))
            assert row["error"] is None and row["state"] == "resident", row

        # Informational only: not settable through the mount; a value forged on the backing
        # file is shown, never acted on (the stub is served as usual).
        if door == "fuse":
            with pytest.raises(PermissionError):
                os.setxattr(d.root / "c.bin", X_ERROR, b"cause=forged")
        os.setxattr(d.cache / "c.bin", X_ERROR, b"cause=forged errno=EIO http=999")
        assert read_file(d.root / "c.bin") == {"ok": True, "sha": sha256(c)}
        assert d.proc.poll() is None, d.log()
