"""The ways the benchmark reads the data set: native, kernel door, FUSE door, raw S3, and a bare
pyfuse3 passthrough (the floor under the FUSE door's warm rows).

Owns: starting and stopping each door, warming it, reading its counters, and the raw-S3
reference. Every door answers the same `Door` interface, so a door plugs in by subclassing it and
adding itself to `DOORS`. A door that cannot start raises `DoorUnavailable`; the run reports it as
"skipped: reason" and carries on.

What the hsmfs doors expect of the `hsmfs` command (`--hsmfs-cmd`; default `python3 -m hsmfs` from
the source tree this package is in), with credentials in the standard AWS_* environment variables:
    hsmfs serve s3://BUCKET/PREFIX DIR -o endpoint=URL          returns once DIR is guarded
    hsmfs stop DIR                                              stops the kernel door
    hsmfs mount s3://BUCKET/PREFIX MNT -o cache=DIR,endpoint=URL,chunk=BYTES
                                                                returns once MNT is mounted
    umount MNT                                                  stops the FUSE door
    hsmfs stats PATH --json   -> {"s3_requests": int, "s3_bytes": int,
                                  optional "pid": int, optional "cpu_s": float}
Daemon CPU comes from "cpu_s" if given, else from /proc/PID/stat of "pid", else from the process
whose command line names the door's path.

Cache states (see main.py for the run order):
    cold          nothing resident: a fresh backing tree for every workload
    warm/dropped  everything resident on disk (read once through the door), page cache dropped
    warm/hot      resident and in the page cache (the workload's files re-read just before)
Native data is always resident, so native has cold (= page cache dropped) and warm/hot only; raw
S3 has no cache, so only cold.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from . import ceph
from .dataset import BIG, BINARY, MANY, MANY_FILES, SRC, TREE, Dataset
from .workloads import (
    LIFECYCLE,
    PAGE,
    SEQ_BLOCK,
    Params,
    Sample,
    Workload,
    WorkloadError,
    child_env,
    random_offsets,
    run_child,
)

Log = Callable[[str], None]
CacheMode = tuple[str, str | None]  # (cache, page_cache)
COLD: CacheMode = ("cold", "dropped")
WARM_DROPPED: CacheMode = ("warm", "dropped")
WARM_HOT: CacheMode = ("warm", "hot")
S3_COLD: CacheMode = ("cold", None)
# Every top-level entry of the data set: what "read everything once" reads.
ALL_PATHS = (BIG, TREE, BINARY.split("/")[0], SRC, MANY)
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
MOUNT_POLL_S = 0.05
STOP_GRACE_S = 10.0  # a daemon flushing state on SIGTERM/unmount gets this long before SIGKILL


class DoorUnavailable(RuntimeError):
    """The door cannot run here (command missing, failed to start, ...); the message says why."""


@dataclass(frozen=True)
class S3Target:
    """The S3 prefix every door serves, and how to reach it."""

    endpoint: str
    bucket: str
    prefix: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def env(self) -> dict[str, str]:
        """Standard AWS variables, so a door finds credentials the usual way."""
        return dict(
            os.environ, AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key,
            AWS_DEFAULT_REGION=self.region, AWS_ENDPOINT_URL=self.endpoint,
        )

    def client(self, pool: int = 10) -> Any:
        import boto3
        from botocore.config import Config

        # The one client configuration that worked on every server we tried (moto, Ceph RGW):
        # RGW 16 rejects boto3's default trailer checksums, and path style needs no DNS.
        cfg = Config(
            s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
            response_checksum_validation="when_required", max_pool_connections=pool,
            retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=60,
        )
        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=self.region, config=cfg,
        )


@dataclass
class Counters:
    """What a door reports about its S3 traffic and CPU; None = the door cannot tell."""

    s3_requests: int | None = None
    s3_bytes: int | None = None
    cpu_s: float | None = None

    def minus(self, before: Counters) -> Counters:
        def d(a: Any, b: Any) -> Any:
            return None if a is None or b is None else a - b

        return Counters(
            d(self.s3_requests, before.s3_requests), d(self.s3_bytes, before.s3_bytes),
            d(self.cpu_s, before.cpu_s),
        )


@dataclass
class DoorConfig:
    target: S3Target
    dataset: Dataset
    scratch: Path  # backing trees and mount points go here (ext4/xfs/btrfs for the kernel door)
    hsmfs_cmd: list[str]
    chunk: int
    concurrency: int
    timeout: float  # for starting/stopping a door and for warm-ups
    log: Log
    door_options: str = ""  # more -o options for both hsmfs doors (e.g. readahead=256M)

    def options(self, base: str) -> str:
        return f"{base},{self.door_options}" if self.door_options else base


def default_hsmfs_cmd() -> list[str]:
    # This interpreter and (through PYTHONPATH, see _HsmfsDoor._hsmfs) this source tree: the
    # doors measured are the ones this bench ships with, not whatever `hsmfs` is first on PATH.
    return [sys.executable, "-m", "hsmfs"]


def parse_hsmfs_cmd(text: str | None) -> list[str]:
    return shlex.split(text) if text else default_hsmfs_cmd()


def drop_page_cache() -> str | None:
    """Write back and drop the page cache (root only). Returns why it failed, or None."""
    os.sync()  # drop_caches drops only clean pages
    try:
        DROP_CACHES.write_text("3\n")
    except OSError as exc:
        return f"cannot drop the page cache ({exc.strerror}; needs root)"
    return None


def resident_fraction(backing: Path, rels: list[str]) -> float | None:
    """Share of the bytes of `rels` under `backing` that are data, not holes (SEEK_DATA).

    Asks the filesystem, not the door: SEEK_DATA/SEEK_HOLE raise no fanotify event. The open()
    does, though (FAN_OPEN_PERM, where the kernel door may fill a whole file), so call this only
    where filling is harmless: on trees that should already be resident.
    """
    total = data = 0
    for rel in rels:
        try:
            fd = os.open(backing / rel, os.O_RDONLY)
        except OSError:
            return None
        try:
            size = os.fstat(fd).st_size
            total += size
            data += _data_bytes(fd, size)
        finally:
            os.close(fd)
    return data / total if total else None


def _data_bytes(fd: int, size: int) -> int:
    pos = data = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        data += min(end, size) - start
        pos = end
    return data


class Door:
    """One way of reading the data set. Subclasses override what differs.

    Life cycle per measurement session: start() -> [warm()] -> measure()... -> stop().
    start() gives a fresh door with nothing resident (a new backing tree).
    """

    name: ClassVar[str] = "?"
    modes: ClassVar[tuple[CacheMode, ...]] = (COLD, WARM_DROPPED, WARM_HOT)
    workloads: ClassVar[tuple[str, ...] | None] = None  # the only workloads it runs (None: all)

    def __init__(self, cfg: DoorConfig) -> None:
        self.cfg = cfg
        self.root: Path | None = None  # where readers find the tree
        self.backing: Path | None = None  # where resident bytes live (residency checks)

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def counters(self) -> Counters:
        return Counters()

    def warm(self, paths: tuple[str, ...] = ALL_PATHS) -> Sample:
        """Read `paths` fully once through the door, so they become resident / page-cached."""
        assert self.root is not None
        return run_child("_readall", self.root, {"paths": list(paths)}, self.cfg.timeout)

    def measure(self, w: Workload, params: Params, timeout: float, prefault: int) -> Sample:
        assert self.root is not None
        return run_child(w.name, self.root, params, timeout, prefault)

    def prepare(self, w: Workload, params: Params) -> None:
        """What a lifecycle workload needs before it is measured (not measured, and before the
        counters are read): the archive workload's dirty file, written through the door."""
        if w.name == "archive":
            assert self.root is not None
            run_child("_writefile", self.root, params, self.cfg.timeout)

    def cleanup(self, w: Workload, params: Params) -> None:
        """Undo what a lifecycle workload left that would outlive this start of the door."""


class NativeDoor(Door):
    """The data set on local disk, fully resident, no hsmfs: the reference for warm speed."""

    name = "native"
    modes = (COLD, WARM_HOT)  # native data is always resident: warm/dropped == cold

    def start(self) -> None:
        self.root = self.backing = self.cfg.dataset.root

    def stop(self) -> None:
        self.root = None

    def prepare(self, w: Workload, params: Params) -> None:
        # The native tree is the data set itself: overwrite a copy of the big object, on disk
        # (fsync'd) and so as resident as a native file is; `params` now names the copy.
        if w.name == "overwrite" and self.root is not None:
            copy = self.root / params["native_copy"]
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.root / params["path"], copy)
            fd = os.open(copy, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            params["path"] = params["native_copy"]

    def cleanup(self, w: Workload, params: Params) -> None:
        # The native tree is the data set itself, shared by every run: take the writes out.
        if w.writes and self.root is not None:
            shutil.rmtree(self.root / LIFECYCLE, ignore_errors=True)


class _HsmfsDoor(Door):
    """What the kernel and FUSE doors share: running `hsmfs ...`, stats, finding the daemon."""

    def _new_dir(self) -> Path:
        return _fresh_dir(self.cfg.scratch, self.name)

    def _hsmfs(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        argv = [*self.cfg.hsmfs_cmd, *args]
        env = {**child_env(), **self.cfg.target.env()}
        try:
            return subprocess.run(
                argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                text=True, timeout=timeout or self.cfg.timeout, check=False,
            )
        except FileNotFoundError as exc:
            raise DoorUnavailable(f"command not found: {argv[0]}") from exc
        except subprocess.TimeoutExpired as exc:
            raise DoorUnavailable(f"`hsmfs {args[0]}` timed out") from exc

    def _checked(self, *args: str) -> None:
        proc = self._hsmfs(*args)
        if proc.returncode != 0:
            why = _error_line(proc.stderr or proc.stdout)
            raise DoorUnavailable(f"`hsmfs {args[0]}` exited {proc.returncode}: {why}")

    def _stats_json(self) -> dict[str, Any] | None:
        if self.root is None:
            return None
        try:
            proc = self._hsmfs("stats", str(self.root), "--json", timeout=30)
            data = json.loads(proc.stdout) if proc.returncode == 0 else None
        except (DoorUnavailable, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def counters(self) -> Counters:
        st = self._stats_json() or {}
        cpu = st.get("cpu_s", st.get("daemon_cpu_s"))
        if cpu is None:
            cpu = _proc_cpu_s(self._daemon_pid(st))
        return Counters(st.get("s3_requests"), st.get("s3_bytes"), cpu)

    def _daemon_pid(self, st: dict[str, Any] | None = None) -> int | None:
        st = self._stats_json() if st is None else st
        pid = (st or {}).get("pid", (st or {}).get("daemon_pid"))
        if isinstance(pid, int):
            return pid
        return _find_pid_naming(self.root) if self.root else None

    def _kill_daemon(self, pid: int | None, grace: float = STOP_GRACE_S) -> None:
        """After a stop: give the daemon we started `grace` seconds to exit, then SIGKILL it."""
        if pid is None:
            return
        deadline = time.monotonic() + grace
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(MOUNT_POLL_S)
        if _running(pid):
            self.cfg.log(f"{self.name}: daemon {pid} still running after stop, SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        ceph.reap(pid)  # a no-op unless it is our child

    def _bring_up(self, launch: Callable[[], None]) -> None:
        """Run ``launch`` (start the daemon, wait for it), then check the tree it serves; on
        any failure, stop whatever came up before re-raising."""
        try:
            launch()
            self._check_tree()
        except BaseException:
            self.stop()
            raise

    def measure(self, w: Workload, params: Params, timeout: float, prefault: int) -> Sample:
        if w.name != "archive":
            return super().measure(w, params, timeout, prefault)
        return self._archive(params, timeout)

    def _archive(self, params: Params, timeout: float) -> Sample:
        """`hsmfs archive PATH` of the dirty file `prepare` wrote, timed as a user sees it
        (command start to exit: CLI start-up, the daemon's snapshot hash, the upload, the HEAD).
        Then the same command once more on the now clean file: its time is the fixed cost of
        the command (start-up, request, walk), reported as fixed_ms."""
        assert self.root is not None
        path = str(self.root / params["path"])
        try:
            t0 = time.perf_counter()
            proc = self._hsmfs("archive", path, timeout=timeout)
            seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            again = self._hsmfs("archive", path, timeout=timeout)
            fixed = time.perf_counter() - t1
        except DoorUnavailable as exc:
            raise WorkloadError(str(exc)) from exc
        if proc.returncode != 0 or not proc.stdout.startswith("uploaded"):
            why = _error_line(proc.stderr or proc.stdout)
            raise WorkloadError(f"`hsmfs archive` exited {proc.returncode}: {why}")
        if again.returncode != 0 or not again.stdout.startswith("unchanged"):
            raise WorkloadError(f"second `hsmfs archive` did not find the file clean: "
                                f"{_error_line(again.stderr or again.stdout)}")
        self._check_uploaded(f"{self.cfg.target.prefix}/{params['path']}", params["size"])
        return Sample(params["size"], seconds, [seconds * 1000], fixed_ms=fixed * 1000)

    def _check_uploaded(self, key: str, size: int) -> None:
        head = self.cfg.target.client().head_object(Bucket=self.cfg.target.bucket, Key=key)
        if head["ContentLength"] != size:
            raise WorkloadError(f"S3 holds {head['ContentLength']} bytes at {key}, not {size}")

    def cleanup(self, w: Workload, params: Params) -> None:
        # Local writes go with the door's fresh tree at stop(); an archived object would show
        # up in every later door's tree, so it goes now.
        if w.name == "archive":
            _delete_key(self.cfg.target, f"{self.cfg.target.prefix}/{params['path']}")

    def _check_tree(self) -> None:
        assert self.root is not None
        if not (self.root / BIG).exists():
            raise DoorUnavailable(f"`{self.name}` started but {BIG} is not visible in its tree")


class KernelDoor(_HsmfsDoor):
    """`hsmfs serve`: fanotify pre-content events on the backing tree, read in place."""

    name = "kernel"

    def start(self) -> None:
        base = self._new_dir()
        tree = base / "tree"
        tree.mkdir()
        self.root = self.backing = tree
        # The same fetch unit as the FUSE door: the comparison is of doors, not settings.
        self._bring_up(lambda: self._checked(
            "serve", self.cfg.target.url, str(tree), "-o",
            self.cfg.options(f"endpoint={self.cfg.target.endpoint},chunk={self.cfg.chunk},"
                             f"concurrency={self.cfg.concurrency}")))

    def stop(self) -> None:
        if self.root is None:
            return
        pid = self._daemon_pid()
        try:
            proc = self._hsmfs("stop", str(self.root))
            if proc.returncode != 0 and pid is not None:
                self.cfg.log(f"kernel: `hsmfs stop` exited {proc.returncode}")
        except DoorUnavailable as exc:
            self.cfg.log(f"kernel: {exc}")
        self._kill_daemon(pid)
        from ..cover import uncover

        with contextlib.suppress(OSError):
            uncover(self.root)  # the stop covered the tree (hsmfs.cover); it goes now
        shutil.rmtree(self.root.parent, ignore_errors=True)
        self.root = self.backing = None


class FuseDoor(_HsmfsDoor):
    """`hsmfs mount`: a FUSE mount over a backing tree in a cache directory."""

    name = "fuse"

    def start(self) -> None:
        base = self._new_dir()
        mnt, cache = base / "mnt", base / "cache"
        mnt.mkdir()
        cache.mkdir()
        self.root, self.backing = mnt, cache
        opts = self.cfg.options(
            f"cache={cache},endpoint={self.cfg.target.endpoint},chunk={self.cfg.chunk},"
            f"concurrency={self.cfg.concurrency}")

        def launch() -> None:
            self._checked("mount", self.cfg.target.url, str(mnt), "-o", opts)
            _wait_for(lambda: os.path.ismount(mnt), self.cfg.timeout, "mount")

        self._bring_up(launch)

    def stop(self) -> None:
        if self.root is None:
            return
        mnt = self.root
        # Found by name too: after a failed `hsmfs mount` the daemon may still be coming up.
        pid = self._daemon_pid()
        if os.path.ismount(mnt):
            _unmount(mnt, self.cfg.timeout, self.cfg.log)
        self._kill_daemon(pid)
        if os.path.ismount(mnt):  # the daemon mounted while we were stopping it
            _unmount(mnt, self.cfg.timeout, self.cfg.log)
        if not os.path.ismount(mnt):  # never rm -rf through a live mount
            shutil.rmtree(mnt.parent, ignore_errors=True)
        self.root = self.backing = None


class S3Door(Door):
    """Raw S3: boto3 ranged GETs replaying each workload's reads. The cold-speed reference.

    Sequential reads use the doors' chunk size and concurrency; everything else issues one GET
    per operation, one at a time, like the single reader of the file workloads.
    """

    name = "s3"
    modes = (S3_COLD,)

    def __init__(self, cfg: DoorConfig) -> None:
        super().__init__(cfg)
        self._client: Any = None
        self._lock = threading.Lock()  # the sequential reference counts from worker threads
        self._requests = 0
        self._bytes = 0

    def start(self) -> None:
        # One extra connection beyond the workers, for the in-order consumer's first GET.
        self._client = self.cfg.target.client(pool=max(self.cfg.concurrency, MANY_FILES) + 2)
        try:
            self._client.head_object(Bucket=self.cfg.target.bucket, Key=self._key(BIG))
        except Exception as exc:
            raise DoorUnavailable(f"cannot HEAD {BIG}: {exc}") from exc

    def stop(self) -> None:
        self._client = None

    def counters(self) -> Counters:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        # The client's CPU (this process is otherwise idle while the reference runs).
        return Counters(self._requests, self._bytes, ru.ru_utime + ru.ru_stime)

    def warm(self, paths: tuple[str, ...] = ALL_PATHS) -> Sample:
        raise DoorUnavailable("raw S3 has no cache to warm")

    def _key(self, rel: str) -> str:
        return f"{self.cfg.target.prefix}/{rel}"

    # -- the archive reference: boto3 upload_file of the same bytes --

    def _upload_base(self) -> Path:
        return self.cfg.scratch / f"s3-upload-{os.getpid()}"

    def _upload_key(self, params: Params) -> str:
        # Beside the data set's prefix, never inside it: no door's tree ever lists it.
        return f"{self.cfg.target.prefix}-upload/{params['path']}"

    def prepare(self, w: Workload, params: Params) -> None:
        if w.name == "archive":
            run_child("_writefile", self._upload_base(), params, self.cfg.timeout)

    def cleanup(self, w: Workload, params: Params) -> None:
        if w.name == "archive":
            shutil.rmtree(self._upload_base(), ignore_errors=True)
            _delete_key(self.cfg.target, self._upload_key(params))

    def _archive(self, p: Params) -> Sample:
        """boto3 `upload_file` with hsmfs's upload shape (backend_s3): one PUT up to the
        multipart threshold, above it 16 MiB parts, 4 at a time."""
        from boto3.s3.transfer import TransferConfig

        from ..backend_s3 import MULTIPART_THRESHOLD, PART_SIZE, PART_THREADS

        # s3transfer goes multipart at size >= threshold, hsmfs above it: + 1 matches them.
        cfg = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD + 1,
                             multipart_chunksize=PART_SIZE, max_concurrency=PART_THREADS)
        src, key = self._upload_base() / p["path"], self._upload_key(p)
        t0 = time.perf_counter()
        self._client.upload_file(str(src), self.cfg.target.bucket, key, Config=cfg)
        seconds = time.perf_counter() - t0
        size = self._client.head_object(Bucket=self.cfg.target.bucket, Key=key)["ContentLength"]
        if size != p["size"]:
            raise WorkloadError(f"S3 holds {size} bytes at {key}, not {p['size']}")
        parts = 1 if size <= MULTIPART_THRESHOLD else -(-size // PART_SIZE) + 2
        with self._lock:
            self._requests += parts
        return Sample(size, seconds, [seconds * 1000])

    def _get(self, rel: str, start: int | None = None, length: int | None = None,
             first_block: Callable[[], None] | None = None) -> int:
        kw: dict[str, Any] = {"Bucket": self.cfg.target.bucket, "Key": self._key(rel)}
        if start is not None and length is not None:
            kw["Range"] = f"bytes={start}-{start + length - 1}"  # HTTP ranges are inclusive
        body = self._client.get_object(**kw)["Body"]
        got = 0
        try:
            while piece := body.read(SEQ_BLOCK):
                if got == 0 and first_block is not None:
                    first_block()
                got += len(piece)
        finally:
            body.close()
        with self._lock:
            self._requests += 1
            self._bytes += got
        return got

    def measure(self, w: Workload, params: Params, timeout: float, prefault: int) -> Sample:
        plan = {
            "seq": self._seq, "rand4k": self._rand, "rand64k": self._rand, "mmap": self._mmap,
            "tree": self._whole_group, "grep": self._whole_group, "compile": self._whole_group,
            "exec": self._exec, "archive": self._archive,
        }.get(w.name)
        if plan is None and w.group == "many" and not w.writes:
            plan = self._readers
        if plan is None:
            raise WorkloadError(f"no raw-S3 equivalent for {w.name}")
        return plan(params)

    def _seq(self, p: Params) -> Sample:
        size, chunk = self.cfg.dataset.total_bytes("big"), self.cfg.chunk
        t0 = time.perf_counter()
        first: list[float] = []

        def fetch(off: int) -> tuple[int, float]:
            t = time.perf_counter()
            mark = (lambda: first.append(time.perf_counter() - t0)) if off == 0 else None
            n = self._get(p["path"], off, min(chunk, size - off), mark)
            return n, (time.perf_counter() - t) * 1000

        with ThreadPoolExecutor(self.cfg.concurrency, thread_name_prefix="s3ref") as pool:
            done = list(pool.map(fetch, range(0, size, chunk)))  # in order, like a reader
        seconds = time.perf_counter() - t0
        ttfb = first[0] * 1000 if first else None
        return Sample(sum(n for n, _ in done), seconds, [lat for _, lat in done], ttfb)

    def _one_at_a_time(self, reads: list[tuple[str, int | None, int | None]]) -> Sample:
        lats: list[float] = []
        total = 0
        t0 = time.perf_counter()
        for rel, start, length in reads:
            t = time.perf_counter()
            total += self._get(rel, start, length)
            lats.append((time.perf_counter() - t) * 1000)
        seconds = time.perf_counter() - t0
        return Sample(total, seconds, lats, lats[0] if lats else None)

    def _rand(self, p: Params) -> Sample:
        offs = random_offsets(p["seed"], p["file_size"], p["size"], p["ops"])
        return self._one_at_a_time([(p["path"], off, p["size"]) for off in offs])

    def _mmap(self, p: Params) -> Sample:
        offs = random_offsets(p["seed"], p["file_size"], PAGE, p["ops"])
        return self._one_at_a_time([(p["path"], off, PAGE) for off in offs])

    def _whole_group(self, p: Params) -> Sample:
        group = {TREE: "tree", SRC: "src"}[p["dir"]]
        s = self._one_at_a_time([(e.rel, None, None) for e in self.cfg.dataset.group(group)])
        if p["dir"] == SRC:
            s.lat_ms, s.ttfb_ms = [s.seconds * 1000], None  # one op, as grep/compile report it
        return s

    def _readers(self, p: Params) -> Sample:
        """One thread per reader, each GETting its whole object (the same object repeated for
        sameN: without a cache, N readers of one object cost N downloads)."""
        t0 = time.perf_counter()
        first: list[float] = []

        def fetch(rel: str) -> tuple[int, float]:
            t = time.perf_counter()
            n = self._get(rel, first_block=lambda: first.append(time.perf_counter() - t0))
            return n, (time.perf_counter() - t) * 1000

        with ThreadPoolExecutor(len(p["paths"]), thread_name_prefix="s3readers") as pool:
            done = list(pool.map(fetch, p["paths"]))
        seconds = time.perf_counter() - t0
        return Sample(sum(n for n, _ in done), seconds, [lat for _, lat in done],
                      min(first) * 1000 if first else None)

    def _exec(self, p: Params) -> Sample:
        # Without a cache every exec fetches the whole program again: bytes = size x runs.
        return self._one_at_a_time([(p["path"], None, None)] * p["runs"])


class S3ParallelDoor(S3Door):
    """Raw S3 downloading a small-file group's files `concurrency` at a time: the best a
    client that knew every file in advance could do (the source-tree goals' second reference;
    `s3` downloads them one at a time, like a program reading them)."""

    name = "s3par"
    workloads: ClassVar[tuple[str, ...] | None] = ("tree", "grep", "compile")

    def measure(self, w: Workload, params: Params, timeout: float, prefault: int) -> Sample:
        if w.name not in (self.workloads or ()):
            raise WorkloadError(f"no parallel raw-S3 reference for {w.name}")
        group = {TREE: "tree", SRC: "src"}[params["dir"]]
        rels = [e.rel for e in self.cfg.dataset.group(group)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(self.cfg.concurrency, thread_name_prefix="s3par") as pool:
            total = sum(pool.map(self._get, rels))
        seconds = time.perf_counter() - t0
        lats = [seconds * 1000]
        return Sample(total, seconds, lats)


class PyFuse3Door(Door):
    """A bare pyfuse3 passthrough of the native tree (`passfs.py`): the floor of any pyfuse3
    door on this machine, for reading the FUSE door's warm rows.  Nothing comes from S3, so it
    has warm rows only; its page cache is the FUSE mount's, warmed like the FUSE door's."""

    name = "pyfuse3"
    modes = (WARM_DROPPED, WARM_HOT)

    def __init__(self, cfg: DoorConfig) -> None:
        super().__init__(cfg)
        self._proc: subprocess.Popen[bytes] | None = None
        self._mnt: Path | None = None

    def start(self) -> None:
        base = _fresh_dir(self.cfg.scratch, self.name)
        self._mnt = base / "mnt"
        self._mnt.mkdir()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "hsmfs.bench.passfs", str(self.cfg.dataset.root),
             str(self._mnt)],
            env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        try:
            _wait_for(lambda: self._serving(), self.cfg.timeout, "pyfuse3 passthrough mount")
        except BaseException:
            self.stop()
            raise
        self.root, self.backing = self._mnt, self.cfg.dataset.root

    def _serving(self) -> bool:
        assert self._proc is not None and self._mnt is not None
        if self._proc.poll() is not None:
            why = _error_line((self._proc.stderr.read() if self._proc.stderr else b"").decode())
            raise DoorUnavailable(f"passfs exited {self._proc.returncode}: {why}")
        return os.path.ismount(self._mnt)

    def stop(self) -> None:
        mnt, proc = self._mnt, self._proc
        self.root = self.backing = self._mnt = self._proc = None
        if mnt is not None and os.path.ismount(mnt):
            _unmount(mnt, self.cfg.timeout, self.cfg.log)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
        if mnt is not None and not os.path.ismount(mnt):  # never rm -rf through a live mount
            shutil.rmtree(mnt.parent, ignore_errors=True)

    def counters(self) -> Counters:
        return Counters(cpu_s=_proc_cpu_s(self._proc.pid if self._proc else None))


DOORS: dict[str, type[Door]] = {
    d.name: d for d in (NativeDoor, KernelDoor, FuseDoor, S3Door, S3ParallelDoor, PyFuse3Door)
}


# ---- helpers ---------------------------------------------------------------------------------


_serial = itertools.count(1)


def _fresh_dir(scratch: Path, door: str) -> Path:
    """A new empty directory for one start of a door (backing tree, mount point)."""
    path = scratch / f"{door}-{os.getpid()}-{next(_serial)}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise DoorUnavailable(f"{what} not ready after {timeout:.0f} s")
        time.sleep(MOUNT_POLL_S)


def _unmount(mnt: Path, timeout: float, log: Log) -> None:
    """`umount MNT` stops the FUSE door; fall back to fusermount, then a lazy unmount."""
    for argv in (["umount", str(mnt)], ["fusermount3", "-u", str(mnt)],
                 ["fusermount", "-u", str(mnt)], ["umount", "-l", str(mnt)]):
        try:
            subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=timeout, check=False)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            continue
        if not os.path.ismount(mnt):
            return
    log(f"fuse: could not unmount {mnt}")


def _delete_key(target: S3Target, key: str) -> None:
    # Cleanup only: a leftover object never fails the run.
    with contextlib.suppress(Exception):
        target.client().delete_object(Bucket=target.bucket, Key=key)


def _error_line(text: str, limit: int = 200) -> str:
    """The line of a failed command's output that best says why (not its INFO chatter)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return "no output"
    marked = [ln for ln in lines if re.search(r"error|exception|failed|denied|not found", ln, re.I)]
    line = (marked or lines)[-1]
    return line if len(line) <= limit else line[:limit] + "..."


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _proc_cpu_s(pid: int | None) -> float | None:
    """utime + stime of a process, all threads (fields 14 and 15 of /proc/PID/stat)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _find_pid_naming(path: Path) -> int | None:
    """The hsmfs process whose command line names `path` (when `stats` gives no pid)."""
    needle = str(path).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"hsmfs" in cmdline and needle in cmdline.split(b"\0") and b"stats" not in cmdline:
            return int(entry.name)
    return None
