"""What a service manager sees (issue 14, item 2), through both real doors: ``READY=1`` on
``$NOTIFY_SOCKET`` once the door serves (hsmfs-serve@.service is ``Type=notify``), and a
SIGTERM that ends with exit status 0, every process of the daemon gone and nothing left
mounted but the kernel door's cover (pending kernel-door events answered at a SIGTERM:
tests/t4_holder.py, ``sigterm``); and ``-o log_format=json``."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    Bucket,
    MotoServer,
    force_unmount,
    is_mounted,
    seeded,
    stop_process,
    wait_until,
)
from support.doors import DOORS, serve_door

from hsmfs.cover import is_covered

pytestmark = [pytest.mark.timeout(120), pytest.mark.parametrize("door", DOORS)]


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_notify_ready_then_sigterm_stops_cleanly(door: str, bucket: Bucket, moto: MotoServer,
                                                 tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    data = bucket.put("f.bin", seeded(200_000, "svc"))
    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(address)
        manager.settimeout(30)
        monkeypatch.setenv("NOTIFY_SOCKET", address)  # what systemd sets for Type=notify
        with serve_door(door, f"s3://{bucket.name}", tmp_path, moto.endpoint) as d:
            message = manager.recv(4096).decode()
            fields = dict(line.split("=", 1) for line in message.splitlines())
            assert fields["READY"] == "1" and fields["STATUS"]  # what hsmfs mount prints
            assert (d.root / "f.bin").read_bytes() == data  # ready meant serving

            started = time.monotonic()
            d.proc.send_signal(signal.SIGTERM)
            assert d.proc.wait(60) == 0, d.log()
            stop_s = time.monotonic() - started
            wait_until(lambda: _group_gone(d.proc.pid), 15, "every daemon process gone")
            if door == "fuse":
                assert not is_mounted(d.root)
            else:
                # The one mount left on purpose: new opens fail until the next start.
                assert is_covered(str(d.cache))
            assert "Traceback" not in d.log() and " ERROR " not in d.log(), d.log()
            assert stop_s < 30


def test_log_format_json(door: str, bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    """``-o log_format=json``: every line the daemon logs is one JSON object, and a failure is
    one line with what failed, where, why and the errno the program got."""
    bucket.put("gone.bin", seeded(70_000, "gone"))
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    mnt.mkdir()
    log_path = tmp_path / "daemon.log"
    opts = f"endpoint={moto.endpoint},log_format=json,log={log_path},small_file=0,chunk=64K"
    cmd = (["mount", "-f", f"s3://{bucket.name}", str(mnt), "-o", f"cache={cache},{opts}"]
           if door == "fuse" else ["serve", "-f", f"s3://{bucket.name}", str(cache), "-o", opts])
    root = mnt if door == "fuse" else cache
    proc = subprocess.Popen([sys.executable, "-m", "hsmfs", *cmd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        def lines() -> list[dict]:
            text = log_path.read_text() if log_path.exists() else ""
            return [json.loads(line) for line in text.splitlines()]  # each one JSON

        def ready() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            return any(r["message"].startswith("ready: ") for r in lines())

        wait_until(ready, 60, "the daemon's ready line")
        bucket.delete("gone.bin")
        with pytest.raises(OSError) as err:
            (root / "gone.bin").read_bytes()
        assert err.value.errno == errno.EIO
        wait_until(lambda: any(r.get("event") == "fetch_failed" for r in lines()), 10,
                   "the failure line")
        # One line per failed GET (the FUSE door's kernel may ask for a second range).
        for failure in [r for r in lines() if r.get("event") == "fetch_failed"]:
            assert failure["level"] == "ERROR" and failure["key"] == "gone.bin"
            assert failure["cause"] == "missing" and failure["errno"] == "EIO"
            assert failure["status"] == 404
            start, stop = failure["range"]
            assert 0 <= start < stop <= 70_000
            assert failure["time"].endswith("Z") and failure["pid"] > 0
    finally:
        stop_process(proc, timeout=15)
        if door == "fuse":
            force_unmount(mnt)
        if proc.stderr:
            proc.stderr.close()
