"""Containers (issue 14, item 1): a program in its own mount, PID and user namespaces, with the
cache bind-mounted at another path, uses the backing files directly through the kernel door.

The tests make the namespaces the way runtimes do, with ``unshare(1)``: a new mount namespace
where the cache is bind-mounted at a ``/data``-like path, a new PID namespace, and a user
namespace created by an unprivileged uid.  The last test runs podman itself (Debian's, which
scripts/setup.sh installs) with the README's ``-v`` recipe.  Docker cannot be run here: there is
a client but no daemon, and no registry to pull an image from (podman runs a root directory).
The kernel door's marks are on the inodes (or the filesystem), not on a path or a mount, so
every bind mount of the tree in every namespace is guarded: the program is blocked until hsmfs
filled the range.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Bucket, MotoServer, seeded, uncover_under
from support.doors import serve_door

pytestmark = [pytest.mark.needs_precontent, pytest.mark.timeout(120)]

NOBODY = 65534


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A work dir every uid can traverse (pytest's tmp dirs are 0700), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="hsmfs-ctr.", dir="/var/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        uncover_under(d)  # the kernel door's stop covers its cache (outside tmp_path here)
        shutil.rmtree(d, ignore_errors=True)


def _in_namespaces(cache: Path, script: str, *, user: bool = False,
                   read_only: bool = False) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) in new mount and PID namespaces where ``cache`` is bind-mounted at
    ``$CTR``; with ``user``, as uid 65534 in a user namespace of its own (root inside)."""
    # The mount point sits beside the cache (in the test's own directory, removed with it):
    # the namespace's mounts die with it, a directory made on the host would not.
    ctr = cache.parent / "ctr"
    ctr.mkdir(exist_ok=True)
    ctr.chmod(0o755)
    opts = "-o ro" if read_only else ""
    inner = (f"mount --bind {opts} {cache} {ctr} && CTR={ctr} && export CTR && {script}")
    cmd = ["unshare", "--mount", "--pid", "--fork", "--propagation", "private"]
    if user:
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
               "unshare", "--user", "--map-root-user", "--mount", "--pid", "--fork",
               "--propagation", "private"]
    return subprocess.run([*cmd, "sh", "-c", inner], capture_output=True, timeout=60)


def _dirty_then_archived(cache: Path, bucket: Bucket, want: dict[str, bytes], *,
                         dirty: str) -> None:
    """Writes from a container: ``dirty`` is recorded dirty (``hsmfs state``), and after
    ``hsmfs archive`` S3 holds ``want`` (key -> bytes)."""
    states = subprocess.run([sys.executable, "-m", "hsmfs", "state", "--json",
                             str(cache / dirty)], capture_output=True, text=True, timeout=30)
    assert states.returncode == 0, states.stderr
    assert json.loads(states.stdout)[0]["state"] == "dirty", states.stdout
    archived = subprocess.run([sys.executable, "-m", "hsmfs", "archive", str(cache)],
                              capture_output=True, text=True, timeout=60)
    assert archived.returncode == 0, archived.stdout + archived.stderr
    for key, body in want.items():
        assert bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read() == body, key


def _userns_allowed() -> bool:
    out = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                          "--clear-groups", "unshare", "--user", "--map-root-user", "true"],
                         capture_output=True, timeout=10)
    return out.returncode == 0


def test_a_container_reads_a_stub_nobody_read_through_its_bind_mount(
        bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    body = bucket.put("data/cold.bin", seeded(3 << 20, "ctr"))
    with serve_door("kernel", f"s3://{bucket.name}", tmp_path, moto.endpoint,
                    "open_fill=off") as d:
        out = _in_namespaces(d.cache, 'echo "pid $$"; sha256sum "$CTR/data/cold.bin"')
        assert out.returncode == 0, out.stderr.decode()
        lines = out.stdout.decode().split("\n")
        assert lines[0] == "pid 1"  # its own PID namespace: it is init there
        assert lines[1].split()[0] == hashlib.sha256(body).hexdigest()


def test_an_unprivileged_user_namespace_reads_the_right_bytes(
        bucket: Bucket, moto: MotoServer, shared_dir: Path) -> None:
    if not _userns_allowed():
        pytest.skip("this kernel refuses user namespaces to unprivileged users")
    body = bucket.put("cold.bin", seeded(2 << 20, "userns"))
    with serve_door("kernel", f"s3://{bucket.name}", shared_dir, moto.endpoint,
                    "open_fill=off") as d:
        d.cache.chmod(0o755)
        out = _in_namespaces(d.cache, 'id -u; dd if="$CTR/cold.bin" bs=64k skip=7 count=3 '
                             '2>/dev/null | sha256sum', user=True)
        assert out.returncode == 0, out.stderr.decode()
        lines = out.stdout.decode().split("\n")
        assert lines[0] == "0"  # root inside, uid 65534 outside
        want = hashlib.sha256(body[7 * 65536:10 * 65536]).hexdigest()
        assert lines[1].split()[0] == want


def test_writes_from_inside_land_as_dirty_files(bucket: Bucket, moto: MotoServer,
                                               tmp_path: Path) -> None:
    body = bucket.put("log.txt", seeded(100_000, "ctr-write"))
    with serve_door("kernel", f"s3://{bucket.name}", tmp_path, moto.endpoint) as d:
        out = _in_namespaces(d.cache, 'printf "from the container\\n" >> "$CTR/log.txt"; '
                             'printf "new\\n" > "$CTR/new.txt"')
        assert out.returncode == 0, out.stderr.decode()
        assert (d.cache / "log.txt").read_bytes() == body + b"from the container\n"
        _dirty_then_archived(d.cache, bucket, {"log.txt": body + b"from the container\n",
                                                "new.txt": b"new\n"}, dirty="log.txt")


def test_a_read_only_bind_mount_reads_cold_stubs_and_refuses_writes(
        bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    """The kernel opens each event's fd on the mount the access came through.  With O_RDWR
    event fds a read-only mount could not get one (EROFS) and the kernel denied the read
    (EPERM); the event fds are read-only now (hsmfs.holder), so a container's ``:ro`` volume
    reads cold stubs like any other.  Writes get EROFS, as on any read-only mount."""
    cold = bucket.put("cold.bin", seeded(1 << 20, "ro-cold"))
    with serve_door("kernel", f"s3://{bucket.name}", tmp_path, moto.endpoint,
                    "open_fill=off") as d:
        out = _in_namespaces(d.cache, 'sha256sum "$CTR/cold.bin"; echo x >> "$CTR/cold.bin"; '
                             'echo "write=$?"', read_only=True)
        text, err = out.stdout.decode(), out.stderr.decode()
        assert text.split()[0] == hashlib.sha256(cold).hexdigest(), text + err
        assert "write=0" not in text and "Read-only file system" in err, text + err
        assert (d.cache / "cold.bin").read_bytes() == cold
        assert "came without an fd" not in d.log()


# -- podman itself (issue 14, item 1: "if podman is installable here, run the recipe") ---------

#: What this machine's podman needs beyond the README's recipe, and why: the default runtime
#: (crun) refuses its cgroup layout (v1 with a v2 "unified" mount: "hybrid mode"), so runc;
#: podman's default RLIMIT_NOFILE and NPROC exceed this machine's hard limits.  No image: no
#: registry is reachable, so the root filesystem is a directory holding a static busybox.
PODMAN_HERE = ["--runtime", "runc", "--network=none", "--ulimit", "nofile=1024:1024",
               "--ulimit", "nproc=1024:1024"]
BUSYBOX_APPLETS = ("sh", "cat", "sha256sum", "dd", "echo", "printf")


def _podman_missing() -> str | None:
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup.sh test installs it)"
    if not Path("/bin/busybox").is_file():
        return "no static /bin/busybox for the container's root filesystem (busybox-static)"
    return None


def _busybox_root(where: Path) -> Path:
    root = where / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "data").mkdir()
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    for name in BUSYBOX_APPLETS:
        (root / "bin" / name).symlink_to("busybox")
    return root


def _podman_run(root: Path, volume: str, script: str) -> subprocess.CompletedProcess:
    """One container, removed whatever happens: a timeout kills only the podman client, and
    the container (runc, bind-mounting the cache) would outlive it."""
    name = f"hsmfs-t-{uuid.uuid4().hex[:12]}"
    try:
        return subprocess.run(["podman", "run", "--rm", "--name", name, *PODMAN_HERE,
                               "-v", volume, "--rootfs", str(root), "/bin/sh", "-c", script],
                              capture_output=True, timeout=90)
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "0", "--ignore", name],
                       capture_output=True, timeout=60)


@pytest.mark.timeout(300)
def test_podman_run_with_the_cache_as_a_volume(bucket: Bucket, moto: MotoServer,
                                               tmp_path: Path) -> None:
    """The README's recipe, run: ``podman run -v CACHE:/data`` reads a stub nobody read before
    (blocked until the kernel door filled it), and its writes land as a dirty file and a new
    one, which ``hsmfs archive`` sends to S3; ``-v CACHE:/data:ro`` reads a cold stub too."""
    missing = _podman_missing()
    if missing:
        pytest.skip(missing)
    cold = bucket.put("d/cold.bin", seeded(3 << 20, "podman"))
    ro_cold = bucket.put("d/ro.bin", seeded(1 << 20, "podman-ro"))
    log = bucket.put("d/log.txt", seeded(50_000, "podman-log"))
    root = _busybox_root(tmp_path)
    with serve_door("kernel", f"s3://{bucket.name}", tmp_path / "w", moto.endpoint,
                    "open_fill=off") as d:
        out = _podman_run(root, f"{d.cache}:/data",
                          'sha256sum /data/d/cold.bin && printf "from podman\\n" >> '
                          '/data/d/log.txt && printf "new\\n" > /data/d/new.txt')
        assert out.returncode == 0, out.stderr.decode()
        assert out.stdout.decode().split()[0] == hashlib.sha256(cold).hexdigest()
        out = _podman_run(root, f"{d.cache}:/data:ro", "sha256sum /data/d/ro.bin")
        assert out.returncode == 0, out.stderr.decode()
        assert out.stdout.decode().split()[0] == hashlib.sha256(ro_cold).hexdigest()
        _dirty_then_archived(d.cache, bucket, {"d/log.txt": log + b"from podman\n",
                                                "d/new.txt": b"new\n"}, dirty="d/log.txt")
