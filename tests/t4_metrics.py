"""Prometheus metrics from a real daemon (issue 14, item 3): ``-o metrics=127.0.0.1:PORT``
scraped over HTTP with a real client and parsed with ``prometheus_client``'s parser, through
both doors; ``hsmfs stats --prometheus`` gives the same counters."""

from __future__ import annotations

import errno
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import Bucket, MotoServer, free_port, seeded
from prometheus_client.parser import text_string_to_metric_families
from support.doors import DOORS, serve_door

pytestmark = [pytest.mark.timeout(120), pytest.mark.parametrize("door", DOORS)]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    return _samples(text)


def test_scrape_a_real_daemon(door: str, bucket: Bucket, moto: MotoServer,
                              tmp_path: Path) -> None:
    data = bucket.put("d/a.bin", seeded(3 * 65536 + 123, "metrics"))
    bucket.put("d/gone.bin", seeded(70000, "gone"))
    port = free_port()
    with serve_door(door, f"s3://{bucket.name}", tmp_path, moto.endpoint, "chunk=64K",
                    "small_file=0", "open_fill=off", "dir_readahead=off",
                    f"metrics=127.0.0.1:{port}") as d:
        before = _scrape(port)
        assert before[("hsmfs_fetched_bytes_total", ())] == 0
        assert before[("hsmfs_files", ())] == 2
        assert (d.root / "d/a.bin").read_bytes() == data
        # An object deleted behind the daemon's back: the read fails, and is counted by cause.
        bucket.delete("d/gone.bin")
        with pytest.raises(OSError) as err:
            (d.root / "d/gone.bin").read_bytes()
        assert err.value.errno == errno.EIO

        m = _scrape(port)
        stats = d.stats()
        assert m[("hsmfs_fetched_bytes_total", ())] == stats["fetched_bytes"] >= len(data)
        assert m[("hsmfs_s3_requests_total", ())] == stats["s3_requests"] > 0
        attempts = {k[1]: v for k, v in m.items() if k[0] == "hsmfs_s3_attempts_total"}
        assert sum(attempts.values()) == stats["s3_requests"]
        assert attempts[(("kind", "list"), ("status", "2xx"))] >= 1
        assert attempts[(("kind", "get"), ("status", "2xx"))] >= 1
        assert attempts[(("kind", "get"), ("status", "404"))] >= 1  # the deleted object
        assert m[("hsmfs_misses_total", ())] >= 1
        assert m[("hsmfs_resident_bytes", ())] == len(data) == stats["resident_bytes"]
        assert m[("hsmfs_resident_files", ())] == 1
        assert m[("hsmfs_dirty_files", ())] == 0
        assert m[("hsmfs_releases_total", ())] == 0
        assert m[("hsmfs_fetch_errors_total", (("cause", "missing"), ("errno", "EIO")))] >= 1
        # Every attempt timed: the histogram counts what the attempt counter counts.
        for kind in ("list", "get"):
            timed = m[("hsmfs_s3_request_seconds_count", (("kind", kind),))]
            assert timed == sum(v for k, v in attempts.items() if k[0] == ("kind", kind))
        if door == "kernel":
            events = sum(v for k, v in m.items() if k[0] == "hsmfs_kernel_events_total")
            assert 1 <= m[("hsmfs_kernel_event_seconds_count", ())] <= events
            assert m[("hsmfs_kernel_events_total", (("kind", "access"),))] >= 1
            assert m[("hsmfs_kernel_denied_total", (("errno", "EIO"),))] >= 1
        else:
            assert m[("hsmfs_fuse_requests_total", (("op", "read"),))] >= 1

        # hsmfs stats --prometheus: the same families from the same counters.
        out = subprocess.run([sys.executable, "-m", "hsmfs", "stats", "--prometheus",
                              str(d.root)], capture_output=True, text=True, timeout=20)
        assert out.returncode == 0, out.stderr
        cli = _samples(out.stdout)
        assert set(m) <= set(cli)  # the command's own getxattr may add a FUSE op
        assert cli[("hsmfs_fetched_bytes_total", ())] == m[("hsmfs_fetched_bytes_total", ())]

        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/nothing", timeout=10)
        assert err.value.code == 404


def test_stats_watch_prints_live_rates(door: str, bucket: Bucket, moto: MotoServer,
                                      tmp_path: Path) -> None:
    """``hsmfs stats --watch``: a header, then one line of rates per interval; a read during
    the watch shows as fetched MB/s."""
    body = bucket.put("big.bin", seeded(8 << 20, "watch"))
    with serve_door(door, f"s3://{bucket.name}", tmp_path, moto.endpoint) as d:
        watch = subprocess.Popen([sys.executable, "-m", "hsmfs", "stats", "--watch", "0.3",
                                  "--count", "6", str(d.root)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        try:
            assert watch.stdout is not None
            header = watch.stdout.readline()  # the watch is up: now read
            time.sleep(0.5)  # its first sample taken (the base of the first rate)
            assert (d.root / "big.bin").read_bytes() == body
            out, err = watch.communicate(timeout=30)
            out = header + out
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait(10)
        assert watch.returncode == 0, err
        lines = out.splitlines()
        assert "fetched MB/s" in lines[0] and len(lines) == 7, out
        fetched = [float(line.split()[0]) for line in lines[1:]]
        assert max(fetched) > 0, out
