"""Start-up errors fail at once (issue 10, item 6): a wrong bucket or an endpoint where nothing
listens makes ``hsmfs serve`` and ``hsmfs mount`` (background and ``-f``) exit non-zero within
the backend's retry budget, with one line on stderr that names the cause; the kernel door's
holder starts its worker once for it, not six times.

Real parts only: the ``hsmfs`` command as a subprocess, moto in server mode (for "no such
bucket"), a free loopback port (for "nothing listens").  Every process is stopped by PID and
nothing stays mounted, even when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import MotoServer, force_unmount, free_port, is_mounted, stop_process

from hsmfs.errors import AccessDenied, BackendUnavailable, ObjectMissing
from hsmfs.logsetup import describe_start_failure

pytestmark = [pytest.mark.timeout(180)]
#: The backend's retry budget is six attempts with at most ~5 s of backoff in all (config.py);
#: add two interpreter starts (holder, worker) on a busy 2-core machine.  A holder that
#: restarted its worker six times (0.2 + 0.4 + ... + 5 s of backoff alone) would need more.
BUDGET_S = 45.0

DOORS = [
    pytest.param("serve", marks=pytest.mark.needs_precontent, id="serve"),
    pytest.param("mount", marks=pytest.mark.needs_fuse, id="mount"),
]


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _kill_daemon(cache: Path) -> None:
    """A background daemon runs in its own session: find it by its pid file, kill it and its
    worker by PID (only if they are still hsmfs processes)."""
    try:
        pid = int((cache / ".hsmfs" / "daemon.pid").read_text())
    except (OSError, ValueError):
        return
    for p in [*_children(pid), pid]:
        with contextlib.suppress(OSError):
            if b"hsmfs" in Path(f"/proc/{p}/cmdline").read_bytes():
                os.kill(p, signal.SIGKILL)


def _run(tmp_path: Path, door: str, source: str, endpoint: str, foreground: bool):
    cache = tmp_path / "cache"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if door == "serve":
        cmd = ["serve", source, str(cache), "-o", f"endpoint={endpoint}"]
    else:
        cmd = ["mount", source, str(mnt), "-o", f"cache={cache},endpoint={endpoint}"]
    if foreground:
        cmd.insert(1, "-f")
    proc = subprocess.Popen([sys.executable, "-m", "hsmfs", *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    started = time.monotonic()
    try:
        _out, err = proc.communicate(timeout=BUDGET_S + 30)
        elapsed = time.monotonic() - started
    finally:
        stop_process(proc)
        _kill_daemon(cache)
        if is_mounted(mnt):
            force_unmount(mnt)
    assert not is_mounted(mnt)
    return proc.returncode, err.decode(errors="replace"), elapsed, cache


def _log(door: str, foreground: bool, stderr: str, cache: Path) -> str:
    if foreground:
        return stderr
    path = cache / ".hsmfs" / "hsmfs.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _check(door: str, foreground: bool, rc: int, stderr: str, elapsed: float, cache: Path,
           expected: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc != 0, stderr
    assert elapsed < BUDGET_S, (elapsed, stderr)
    assert "Traceback" not in stderr, stderr
    if foreground:
        # -f logs to stderr as it goes; the line that names the cause comes last.
        assert re.fullmatch(expected, lines[-1]), stderr
    else:
        assert len(lines) == 1 and re.fullmatch(expected, lines[0]), stderr
    if door == "serve":
        log = _log(door, foreground, stderr, cache)
        assert len(re.findall(r"worker pid \d+ started", log)) == 1, log
        assert "restarting the worker" not in log, log
        assert "the worker failed to start (status 78" in log, log


@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
@pytest.mark.parametrize("door", DOORS)
def test_missing_bucket(moto: MotoServer, tmp_path: Path, door: str, foreground: bool) -> None:
    name = f"nosuch-{uuid.uuid4().hex[:8]}"
    rc, err, elapsed, cache = _run(tmp_path, door, f"s3://{name}", moto.endpoint, foreground)
    expected = re.escape(f"hsmfs: cannot serve s3://{name}/: bucket does not exist "
                         "(NoSuchBucket)")
    _check(door, foreground, rc, err, elapsed, cache, expected)


@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
@pytest.mark.parametrize("door", DOORS)
def test_unreachable_endpoint(tmp_path: Path, door: str, foreground: bool) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    rc, err, elapsed, cache = _run(tmp_path, door, "s3://some-bucket", endpoint, foreground)
    expected = (re.escape("hsmfs: cannot serve s3://some-bucket/: S3 endpoint unreachable or "
                          "failing (") + ".*" + re.escape(endpoint.split("//")[1]) + r".*\)")
    _check(door, foreground, rc, err, elapsed, cache, expected)


def test_start_failure_words() -> None:
    """The backend's classification is made for reads; at start it must read as a cause."""
    assert describe_start_failure(ObjectMissing("list '': HTTP 404 NoSuchBucket: object gone")) \
        == "bucket does not exist (NoSuchBucket)"
    assert describe_start_failure(AccessDenied("list '': HTTP 403 InvalidAccessKeyId")).startswith(
        "S3 refused the credentials")
    assert describe_start_failure(
        ExceptionGroup("x", [BackendUnavailable("list '': connection refused")])
    ).startswith("S3 endpoint unreachable or failing (list '': connection refused")
