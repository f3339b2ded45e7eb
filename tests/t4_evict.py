"""Eviction under ``-o cache_size`` through both real doors (issue 12, item 2).

Real parts only: ``hsmfs mount -f`` / ``hsmfs serve -f`` (tests/support/doors.py), a real moto
S3 server.  A sampler thread measures what the cache really holds on disk (``st_blocks`` of
every backing file, the way ``du`` does) every few milliseconds while the workload runs: the
budget must hold at every sample, and every byte read must be S3's.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Bucket, MotoServer, run, seeded, wait_until
from support.doors import DOORS, serve_door

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
BUDGET = 8 * MiB
FILES = 16  # 16 MiB of objects: twice the budget


def _blocks(cache: Path) -> dict[str, int]:
    """Bytes allocated to each backing file (``st_blocks``, as ``du`` counts), by path."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(cache):
        if dirpath == str(cache):
            dirnames[:] = [d for d in dirnames if d != ".hsmfs"]
        for name in filenames:
            path = os.path.join(dirpath, name)
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                out[path] = os.lstat(path).st_blocks * 512
    return out


def _on_disk(cache: Path, baseline: dict[str, int]) -> int:
    """Data bytes on disk: what each file holds beyond what it held as a bare stub (a stub
    already owns a block for its xattrs on ext4 when the inode has no room for them:
    metadata, which the budget does not count)."""
    return sum(max(n - baseline.get(p, 0), 0) for p, n in _blocks(cache).items())


class Sampler:
    """Samples the cache's bytes on disk until stopped; keeps the largest."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.baseline = _blocks(cache)  # taken while every file is a bare stub
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _on_disk(self.cache, self.baseline))
            self.samples += 1
            self._stop.wait(0.005)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _stats(cache: Path) -> dict:
    out = run([sys.executable, "-m", "hsmfs", "stats", "--json", str(cache)])
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("door", DOORS)
def test_working_set_twice_the_budget(door: str, bucket: Bucket, moto: MotoServer,
                                      tmp_path: Path) -> None:
    data = {f"d/f{i:02d}.bin": seeded(MiB, f"ev{i}") for i in range(FILES)}
    for key, body in data.items():
        bucket.put(key, body)
    with serve_door(door, f"s3://{bucket.name}", tmp_path, moto.endpoint,
                    f"cache_size={BUDGET}") as d:
        with Sampler(d.cache) as sampler:
            for _round in range(2):
                for key, body in data.items():
                    assert (d.root / key).read_bytes() == body, key
        stats = _stats(d.cache)
        assert sampler.samples > 10
        # The daemon's own count (resident + reserved for flights) never passed the budget.
        assert stats["evict_peak_bytes"] <= BUDGET, stats
        # The disk agrees.  A walk of the tree is not a snapshot: a file punched after it
        # was counted and the file filled in its place both count; one flight (1 MiB) of
        # slack covers that, and nothing more.
        assert sampler.peak <= BUDGET + MiB, (sampler.peak, stats)
        assert stats["evict_evictions"] >= FILES, stats
        assert not stats["evict_over_budget"], stats
        assert isinstance(stats["readahead_no_room"], int), stats  # shown by stats
        # At rest, the count is exactly what the disk holds.
        assert _on_disk(d.cache, sampler.baseline) == _stats(d.cache)["evict_resident_bytes"]
        # Every file still reads S3's bytes (evicted ones are fetched again).
        for key, body in data.items():
            assert (d.root / key).read_bytes() == body, key


@pytest.mark.needs_precontent
def test_open_dirty_and_pinned_files_are_never_evicted(bucket: Bucket, moto: MotoServer,
                                                       tmp_path: Path) -> None:
    data = {f"f{i:02d}.bin": seeded(MiB, f"keep{i}") for i in range(8)}
    for key, body in data.items():
        bucket.put(key, body)
    with serve_door("kernel", f"s3://{bucket.name}", tmp_path, moto.endpoint,
                    f"cache_size={4 * MiB}") as d:
        held = open(d.root / "f00.bin", "rb")  # noqa: SIM115 - closed below
        try:
            assert held.read() == data["f00.bin"]
            with open(d.root / "f01.bin", "r+b") as f:  # dirty: local changes
                f.write(b"local change")
            out = run([sys.executable, "-m", "hsmfs", "pin", str(d.root / "f02.bin")],
                      timeout=30)
            assert out.returncode == 0, out.stdout + out.stderr
            for key in sorted(data)[3:]:
                assert (d.root / key).read_bytes() == data[key], key
            for key in ("f00.bin", "f01.bin", "f02.bin"):
                assert (d.root / key).stat().st_blocks * 512 >= MiB, f"{key} was evicted"
            assert (d.root / "f01.bin").read_bytes()[:12] == b"local change"
            assert (d.root / "f02.bin").read_bytes() == data["f02.bin"]
        finally:
            held.close()
        stats = _stats(d.cache)
        assert stats["evict_evictions"] > 0, stats


def _held(path: Path) -> bool:
    """Whether a backing file still holds its data (not punched back to a stub)."""
    return path.stat().st_blocks * 512 >= MiB


@pytest.mark.parametrize("door", DOORS)
def test_the_least_recently_opened_file_goes_first(door: str, bucket: Bucket, moto: MotoServer,
                                                   tmp_path: Path) -> None:
    data = {f"f{i}.bin": seeded(MiB, f"lru{i}") for i in range(5)}
    for key, body in data.items():
        bucket.put(key, body)
    with serve_door(door, f"s3://{bucket.name}", tmp_path, moto.endpoint,
                    f"cache_size={4 * MiB}") as d:
        for i in range(4):
            assert (d.root / f"f{i}.bin").read_bytes() == data[f"f{i}.bin"]
        # f0 was filled first, but is opened again now: f1 is the least recently used.
        time.sleep(0.05)  # a later monotonic clock than the fills' (its resolution)
        opens = d.stats().get("kernel", {}).get("name_opens", 0)
        assert (d.root / "f0.bin").read_bytes() == data["f0.bin"]
        if door == "kernel":  # the kernel door learns of an open from a notification: async
            wait_until(lambda: d.stats()["kernel"]["name_opens"] > opens, 10,
                       "the names group's FAN_OPEN of f0")
        assert (d.root / "f4.bin").read_bytes() == data["f4.bin"]
        backing = d.cache
        assert _held(backing / "f0.bin"), "the file opened last was evicted"
        assert not _held(backing / "f1.bin"), "the least recently used file was kept"
        assert _held(backing / "f4.bin")
        # What was evicted reads S3's bytes again.
        assert (d.root / "f1.bin").read_bytes() == data["f1.bin"]


@pytest.mark.parametrize("door", DOORS)
def test_a_budget_that_cannot_be_met_is_reported_and_reads_go_on(
        door: str, bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    data = {f"f{i}.bin": seeded(MiB, f"over{i}") for i in range(3)}
    for key, body in data.items():
        bucket.put(key, body)
    with serve_door(door, f"s3://{bucket.name}", tmp_path, moto.endpoint,
                    f"cache_size={MiB}") as d:
        for key in data:
            out = run([sys.executable, "-m", "hsmfs", "pin", str(d.cache / key)], timeout=30)
            assert out.returncode == 0, out.stdout + out.stderr
        for key, body in data.items():  # every read still right: the budget is a target
            assert (d.root / key).read_bytes() == body, key
        stats = _stats(d.cache)
        assert stats["evict_over_budget"], stats
        assert stats["evict_unevictable_bytes"] >= MiB, stats
        assert stats["evict_evictions"] == 0, stats
        assert d.log().count("cannot meet the budget") == 1, d.log()[-2000:]  # once
