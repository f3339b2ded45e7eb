"""Shared fixtures: a real S3 server on loopback, capability markers, mounts that always clean up.

Real parts only (README "How we test"): the S3 server is moto in server mode, in its own
process, spoken to over HTTP; mounts are real FUSE mounts of the real ``hsmfs`` command run as a
subprocess; every process started here is stopped by PID, and every mount is unmounted, even
when the test fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


# -- capabilities --------------------------------------------------------------------------------

def _fuse_missing() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "fusermount3 not installed (apt-get install fuse3)"
    try:
        import pyfuse3  # noqa: F401
    except ImportError as exc:
        return f"pyfuse3 not importable: {exc}"
    return None


def _precontent_missing() -> str | None:
    """Probe the capability itself, never the kernel version: a pre-content group and a
    FAN_PRE_ACCESS mark on a file of the filesystem the tests use."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.fanotify_init(0x08 | 0x01, os.O_RDONLY)  # FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC
    if fd < 0:
        return f"fanotify_init(FAN_CLASS_PRE_CONTENT): {os.strerror(ctypes.get_errno())}"
    try:
        with tempfile.NamedTemporaryFile(dir=tempfile.gettempdir()) as f:
            libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64,
                                           ctypes.c_int, ctypes.c_char_p]
            r = libc.fanotify_mark(fd, 0x1, 0x00100000, -100, f.name.encode())  # PRE_ACCESS
            if r < 0:
                return f"fanotify_mark(FAN_PRE_ACCESS): {os.strerror(ctypes.get_errno())}"
    finally:
        os.close(fd)
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_fuse: needs /dev/fuse and fusermount3")
    config.addinivalue_line("markers", "needs_precontent: needs fanotify pre-content events")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    checks = {"needs_fuse": _fuse_missing, "needs_precontent": _precontent_missing}
    reasons = {name: None for name in checks}
    for item in items:
        for name, probe in checks.items():
            if item.get_closest_marker(name) is None:
                continue
            if reasons[name] is None:
                reasons[name] = probe() or ""
            reason = reasons[name]
            if reason:
                if IN_CI:
                    # CI must prove the product works; a missing capability is a failure there.
                    item.user_properties.append(("ci_missing", reason))
                else:
                    item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    for name, reason in item.user_properties:
        if name == "ci_missing":
            pytest.fail(f"CI=true and a required capability is missing: {reason}")


# -- processes -----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL of its whole process group (a kernel-door holder and its worker,
    started with ``start_new_session``): by PID, bounded."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout)


def wait_until(pred, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class MotoServer:
    """moto in server mode, in its own process (it must not share our GIL or our fate)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MotoServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **AWS_ENV},
            start_new_session=True,
        )

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.2):
                return True
            return False

        wait_until(up, 30, "moto server")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def client(self):
        return s3_client(self.endpoint)


def s3_client(endpoint: str):
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
        config=Config(s3={"addressing_style": "path"},
                      request_checksum_calculation="when_required",
                      response_checksum_validation="when_required"),
    )


@pytest.fixture(scope="session", autouse=True)
def _aws_env() -> Iterator[None]:
    old = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _no_cover_left(tmp_path: Path) -> Iterator[None]:
    """A kernel-door stop leaves a cover mounted over its cache dir (hsmfs.cover): remove every
    cover this test left under its own directory, whatever the test did."""
    yield
    uncover_under(tmp_path)


#: How long past its own timeout a test may stay wedged before :func:`_unwedge` frees it.
UNWEDGE_GRACE_S = 30.0


@pytest.fixture(autouse=True)
def _unwedge_after_timeout(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
    """pytest-timeout's SIGALRM cannot wake a test blocked in the kernel on a FUSE request or
    a fanotify permission event nobody answers: the whole run would hang there.  Past the
    test's timeout (plus a grace), a thread frees it the way an admin would: it aborts every
    FUSE connection mounted under the test's directory and SIGKILLs every hsmfs process whose
    command line names that directory (a closed fanotify group lets its pending events go).
    The blocked call then returns an error, and the test fails instead of hanging."""
    marker = request.node.get_closest_marker("timeout")
    given = request.config.getoption("timeout", None)  # pytest --timeout=N beats the ini
    limit = float(marker.args[0]) if marker and marker.args else \
        float(given if given is not None else request.config.getini("timeout") or 0)
    if limit <= 0:
        yield
        return
    timer = threading.Timer(limit + UNWEDGE_GRACE_S, _unwedge, args=(tmp_path,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _unwedge(directory: Path) -> None:
    sys.stderr.write(f"\nconftest: a test under {directory} outlived its timeout: aborting its "
                     "FUSE connections and killing its hsmfs processes\n")
    reap_hsmfs_under(directory)


def reap_hsmfs_under(directory: Path) -> None:
    """Abort every FUSE connection mounted under ``directory`` and SIGKILL every hsmfs
    process whose command line names it: by PID, whatever state they are in."""
    root = str(directory.resolve())
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1].startswith("fuse") and (fields[4] + "/").startswith(root + "/"):
                _abort_fuse(fields[2].split(":")[1])
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any("hsmfs" in a for a in argv) and any(root in a for a in argv):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(pid), signal.SIGKILL)


def uncover_under(directory: Path) -> None:
    """Remove every hsmfs cover mounted at or below ``directory``."""
    from hsmfs.cover import uncover
    from hsmfs.mounts import mountinfo

    root = str(directory.resolve())
    for m in mountinfo():
        if m.source == "hsmfs-cover" and (m.mount_point + "/").startswith(root + "/"):
            with contextlib.suppress(OSError):
                uncover(m.mount_point)


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    server = MotoServer().start()
    try:
        yield server
    finally:
        server.stop()


class Bucket:
    """A fresh bucket with helpers to put seeded objects and remember their digests."""

    def __init__(self, client, name: str) -> None:
        self.client = client
        self.name = name
        self.objects: dict[str, bytes] = {}
        client.create_bucket(Bucket=name)

    def put(self, key: str, data: bytes, mode: int | None = None) -> bytes:
        extra = {"Metadata": {"mode": str(mode)}} if mode is not None else {}
        self.client.put_object(Bucket=self.name, Key=key, Body=data, **extra)
        self.objects[key] = data
        return data

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.name, Key=key)
        self.objects.pop(key, None)


@pytest.fixture
def bucket(moto: MotoServer) -> Bucket:
    return Bucket(moto.client(), f"t-{uuid.uuid4().hex[:12]}")


def seeded(n: int, seed: int | str) -> bytes:
    """Deterministic pseudo-random bytes: every payload is reproducible from its seed."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# -- mounts --------------------------------------------------------------------------------------

def hsmfs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hsmfs", *args]


def is_mounted(path: str | os.PathLike) -> bool:
    from hsmfs.mounts import is_mounted as mounted

    return mounted(os.path.realpath(path))


def _fuse_connection(path: str | os.PathLike) -> str | None:
    """The fusectl connection number of the FUSE mount at ``path`` (its device minor)."""
    where = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4] == where and fields[sep + 1].startswith("fuse"):
                return fields[2].split(":")[1]
    return None


def _abort_fuse(conn: str) -> None:
    """Abort a FUSE connection: every request the daemon never answered fails (ENOTCONN), so a
    daemon thread stuck in the kernel on one (a page lock an unanswered READ holds) can die.
    Without it, SIGKILL leaves that thread in D state and the mount behind for good."""
    base = "/sys/fs/fuse/connections"
    if not os.path.isdir(os.path.join(base, conn)):
        subprocess.run(["mount", "-t", "fusectl", "none", base], capture_output=True, timeout=10)
    with contextlib.suppress(OSError), open(os.path.join(base, conn, "abort"), "w") as f:
        f.write("1")


def force_unmount(path: str | os.PathLike) -> None:
    """Remove a FUSE mount whatever its daemon's state: unmount, and abort the connection so
    nothing waits on a daemon that will never answer."""
    if is_mounted(path):
        conn = _fuse_connection(path)
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, timeout=10)
        if is_mounted(path):
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)
        if conn is not None:
            _abort_fuse(conn)


@contextlib.contextmanager
def fuse_mount(source: str, mnt: Path, cache: Path, endpoint: str, *opts: str,
               timeout: float = 30) -> Iterator[subprocess.Popen]:
    """Run ``hsmfs mount -f`` as a subprocess; yield once the mount serves; always clean up."""
    mnt.mkdir(parents=True, exist_ok=True)
    options = ",".join([f"cache={cache}", f"endpoint={endpoint}", *opts])
    log = open(cache.parent / f"{mnt.name}.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(hsmfs_cmd("mount", "-f", source, str(mnt), "-o", options),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                log.flush()
                raise RuntimeError(f"hsmfs exited with {proc.returncode}:\n"
                                   + (cache.parent / f"{mnt.name}.log").read_text())
            return is_mounted(mnt)
        wait_until(up, timeout, f"mount at {mnt}")
        yield proc
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        stop_process(proc)
        force_unmount(mnt)
        log.close()


def daemon_log(cache: Path, mnt: Path) -> str:
    p = cache.parent / f"{mnt.name}.log"
    return p.read_text(errors="replace") if p.exists() else ""


def run(cmd: list[str], timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    """An unaware program, bounded."""
    return subprocess.run(cmd, capture_output=True, timeout=timeout, **kw)


# Shared by the backend, FUSE and kernel-door tests.
from support.fixtures import fault_proxy  # noqa: E402, F401
