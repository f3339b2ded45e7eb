"""A throw-away Ceph RGW cluster for `hsmfs bench` (the real S3 the benchmark runs against).

Owns: installing the Debian packages if they are missing, bringing a 1-mon/1-osd/1-rgw cluster
up with the shipped `ceph_up.sh` on free ports, waiting until RGW answers, and tearing it down by
the PIDs in its run directory. It never touches a cluster it did not start.

Why Ceph and not moto: moto copies the whole object for every ranged GET (a 4 KiB range of a
256 MiB object takes ~170 ms), so it must never be benchmarked. RGW is what many sites run.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

ACCESS_KEY = "hsmfsaccesskey"
SECRET_KEY = "hsmfssecretkey"
PACKAGES = ("ceph-mon", "ceph-osd", "radosgw", "ceph-common")
# The binaries ceph_up.sh calls; any one missing means the packages are not (fully) installed.
BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph")
# Measured: ~50 s to install on a fast mirror; allow for a slow one.
INSTALL_TIMEOUT_S = 900.0
# Measured: ~1.5 s (memstore) / ~5 s (bluestore) to start; the mon quorum wait alone may take 60 s.
UP_TIMEOUT_S = 180.0
READY_TIMEOUT_S = 60.0
# ceph_down.sh waits up to 15 s per daemon group before SIGKILL.
DOWN_TIMEOUT_S = 60.0
# Stop order matters: radosgw hangs on shutdown if the mon is already gone.
STOP_ORDER = (("client.rgw.a",), ("osd.0", "mon.a"))

Log = Callable[[str], None]


class CephUnavailable(RuntimeError):
    """Ceph cannot be installed or started here; the message says why."""


@dataclass(frozen=True)
class CephEndpoint:
    """Where the started cluster's S3 API listens, and how to log in."""

    url: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY


def _script(name: str) -> Path:
    """Path of a shell script shipped as package data beside this module."""
    path = Path(str(resources.files("hsmfs.bench") / name))
    if not path.is_file():
        raise CephUnavailable(f"package data {name} is missing from hsmfs.bench")
    return path


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def ensure_installed(log: Log) -> None:
    """Install the Ceph packages with apt-get if any binary is missing (needs root)."""
    missing = missing_binaries()
    if not missing:
        return
    if os.geteuid() != 0:
        raise CephUnavailable(
            f"Ceph is not installed (missing {', '.join(missing)}) and installing needs root: "
            f"apt-get install --no-install-recommends {' '.join(PACKAGES)}, or pass --endpoint"
        )
    if shutil.which("apt-get") is None:
        raise CephUnavailable("Ceph is not installed and there is no apt-get; pass --endpoint")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log(f"installing {' '.join(PACKAGES)} (apt-get, ~1 min)")
    for cmd in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
    ):
        _run_checked(cmd, env, INSTALL_TIMEOUT_S)
    still = missing_binaries()
    if still:
        raise CephUnavailable(f"after apt-get install, still missing: {', '.join(still)}")


def _run_checked(cmd: list[str], env: dict[str, str], timeout: float) -> None:
    try:
        proc = subprocess.run(
            cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CephUnavailable(f"{' '.join(cmd)} timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise CephUnavailable(f"{' '.join(cmd)} failed ({proc.returncode}): {' | '.join(tail)}")


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (another session may run its own cluster)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http_ok(url: str, timeout: float) -> None:
    """Poll until `url` answers 200 (RGW's anonymous ListBuckets does once it is serving)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.1)
    raise CephUnavailable(f"RGW at {url} not ready after {timeout:.0f} s: {last}")


def _alive(pid: int) -> bool:
    """Running and not a zombie (a daemon whose parent has not reaped it is finished)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _pids(run_dir: Path, names: tuple[str, ...]) -> list[int]:
    pids = []
    for name in names:
        try:
            pids.append(int((run_dir / f"{name}.pid").read_text().strip()))
        except (OSError, ValueError):
            continue
    return pids


def _set_subreaper(on: bool) -> bool:
    pr_set_child_subreaper = 36
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(pr_set_child_subreaper, int(on), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def adopting_orphans() -> Iterator[None]:
    """While inside, daemons that fork away from our children become our children.

    Ceph daemons daemonize; without this they are re-parented to PID 1, and an init that does not
    reap (some VM and container inits) leaves them as zombies. Only for the duration of
    ceph_up.sh: a subreaper that does not reap at once would leave other daemons (the doors'),
    once stopped, as zombies of ours, and `kill(pid, 0)` keeps succeeding on a zombie.
    """
    _set_subreaper(True)
    try:
        yield
    finally:
        _set_subreaper(False)


def reap(pid: int, timeout: float = 5.0) -> None:
    """Wait for `pid` to exit and collect it if it is our (adopted) child. Never raises."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return  # not ours: whoever adopted it reaps it
        if done:
            return
        time.sleep(0.05)


def kill_leftovers(cluster_dir: Path, log: Log) -> None:
    """SIGKILL any daemon of this cluster still alive, by the PIDs in its run directory."""
    for names in STOP_ORDER:
        for pid in _pids(cluster_dir / "run", names):
            if _alive(pid):
                log(f"ceph: pid {pid} survived ceph_down.sh, SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            reap(pid)


def teardown(cluster_dir: Path, log: Log) -> None:
    """Stop the cluster started in `cluster_dir` and delete its data. Never raises."""
    if not cluster_dir.exists():
        return
    try:
        # --kill: the data is thrown away anyway, and SIGKILL is instant where TERM takes ~4 s.
        subprocess.run(
            ["bash", str(_script("ceph_down.sh")), str(cluster_dir), "--kill"],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=DOWN_TIMEOUT_S, check=False,
        )
    except (subprocess.TimeoutExpired, CephUnavailable, OSError) as exc:
        log(f"ceph: ceph_down.sh failed ({exc}); killing by PID")
    kill_leftovers(cluster_dir, log)
    shutil.rmtree(cluster_dir, ignore_errors=True)


def _bring_up(cluster_dir: Path, objectstore: str, log: Log) -> CephEndpoint:
    rgw_port, mon_port = free_port(), free_port()
    env = dict(os.environ, OBJECTSTORE=objectstore, RGW_PORT=str(rgw_port), MON_PORT=str(mon_port))
    # Output goes to a file, not a pipe: a daemon that kept the pipe open would block our read.
    log_path = cluster_dir.with_name(cluster_dir.name + ".up.log")
    with log_path.open("w") as out, adopting_orphans():
        try:
            proc = subprocess.run(
                ["bash", str(_script("ceph_up.sh")), str(cluster_dir)],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                timeout=UP_TIMEOUT_S, check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise CephUnavailable(f"ceph_up.sh timed out after {UP_TIMEOUT_S:.0f} s") from exc
    if proc.returncode != 0:
        tail = " | ".join(log_path.read_text().strip().splitlines()[-5:])
        raise CephUnavailable(f"ceph_up.sh failed ({proc.returncode}): {tail}")
    url = f"http://127.0.0.1:{rgw_port}"
    wait_http_ok(url + "/", READY_TIMEOUT_S)
    log(f"ceph: RGW ({objectstore}) ready at {url}")
    return CephEndpoint(url=url)


@contextlib.contextmanager
def ceph_cluster(workdir: Path, log: Log, objectstore: str = "memstore") -> Iterator[CephEndpoint]:
    """Install if needed, start a cluster under `workdir`, yield its endpoint, always tear down."""
    ensure_installed(log)
    workdir.mkdir(parents=True, exist_ok=True)
    cluster_dir = workdir / f"ceph-{os.getpid()}-{time.monotonic_ns()}"
    t0 = time.monotonic()
    try:
        endpoint = _bring_up(cluster_dir, objectstore, log)
        log(f"ceph: up in {time.monotonic() - t0:.1f} s")
        yield endpoint
    finally:
        teardown(cluster_dir, log)
        log("ceph: stopped")
