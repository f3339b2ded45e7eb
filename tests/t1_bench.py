"""`hsmfs bench`: report generation, data-set determinism, the latency proxy, and a smoke run.

The smoke run goes through `bench_main` end to end against moto (the shared `moto` fixture: a
server in its own process, stopped by PID) with the hidden --tiny sizes, so it takes seconds.
moto is fine for checking the plumbing and never for numbers (it copies the whole object for
every ranged GET).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from hsmfs.bench import bench_main, dataset, report
from hsmfs.bench.latency_proxy import (
    BURST_S,
    ProxyConfig,
    ProxyProcess,
    ProxyThread,
    parse_bandwidth_mbps,
    parse_latency_ms,
)
from hsmfs.bench.workloads import Sample, child_env, random_offsets

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- data set -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_dataset_same_seed_same_bytes(tmp_path: Path) -> None:
    sizes = dataset.PROFILES["tiny"]
    a = dataset.build(tmp_path / "a", sizes, seed=7)
    b = dataset.build(tmp_path / "b", sizes, seed=7)
    c = dataset.build(tmp_path / "c", sizes, seed=8)
    assert a.entries == b.entries and a.digest == b.digest
    assert c.digest != a.digest
    # Only the seeded groups change with the seed; the copied ones do not.
    changed = {e.rel for e, f in zip(a.entries, c.entries, strict=True) if e.sha256 != f.sha256}
    assert dataset.BIG in changed and not any(r.startswith(dataset.SRC) for r in changed)


@pytest.mark.timeout(60)
def test_dataset_layout(tmp_path: Path) -> None:
    sizes = dataset.PROFILES["tiny"]
    ds = dataset.build(tmp_path / "d", sizes)
    assert (tmp_path / "d" / dataset.BIG).stat().st_size == sizes.big_bytes
    tree = ds.group("tree")
    assert len(tree) == sizes.tree_files
    assert all(sizes.tree_min <= e.size <= sizes.tree_max for e in tree)
    [binary] = ds.group("bin")
    assert binary.mode == 33261  # what s3fs stores for an executable
    assert (tmp_path / "d" / binary.rel).read_bytes()[:4] == b"\x7fELF"
    assert ds.group("src") and all(e.rel.endswith(".py") for e in ds.group("src"))
    assert ds.total_bytes("src") == sum(e.size for e in ds.group("src"))


def test_random_offsets_are_seeded_and_aligned() -> None:
    a = random_offsets(1, 1 << 20, 4096, 50)
    assert a == random_offsets(1, 1 << 20, 4096, 50)
    assert a != random_offsets(2, 1 << 20, 4096, 50)
    assert all(o % 4096 == 0 and 0 <= o <= (1 << 20) - 4096 for o in a)


# -- report -------------------------------------------------------------------------------------


def _row(door: str, workload: str, cache: str, pc: str | None, mbps: float, p50: float,
         s3_bytes: int | None = None, rep: int = 0) -> report.Row:
    seconds = 1.0
    sample = Sample(int(mbps * 1e6 * seconds), seconds, [p50] * 10, p50)
    counters = {"s3_requests": 1 if s3_bytes else 0, "s3_bytes": s3_bytes}
    return report.sample_row(door, workload, (cache, pc), rep, sample, counters)


def _synthetic() -> list[report.Row]:
    return [
        _row("native", "seq", "cold", "dropped", 1000, 1.0),
        _row("native", "seq", "warm", "hot", 10000, 0.1),
        _row("s3", "seq", "cold", None, 400, 10.0, s3_bytes=400_000_000),
        _row("kernel", "seq", "cold", "dropped", 380, 10.0, s3_bytes=380_000_000),
        _row("kernel", "seq", "warm", "dropped", 990, 1.0),
        _row("kernel", "seq", "warm", "hot", 9000, 0.1),
        _row("s3", "rand4k", "cold", None, 2, 2.0, s3_bytes=2_000_000),
        _row("native", "rand4k", "cold", "dropped", 40, 0.1),
        _row("kernel", "rand4k", "cold", "dropped", 1.5, 2.5, s3_bytes=3_000_000),
        report.sample_row("fuse", "seq", ("cold", "dropped"), 0, None,
                          skipped="command not found: hsmfs"),
        _row("fuse", "seq", "warm", "hot", 5000, 0.2),
        _row("pyfuse3", "seq", "warm", "hot", 6250, 0.16),
    ]


def test_ratios_against_native_and_s3() -> None:
    rows = report.aggregate(_synthetic())
    k_cold = report.find_row(rows, "kernel", "seq", "cold", "dropped")
    k_hot = report.find_row(rows, "kernel", "seq", "warm", "hot")
    assert k_cold and k_hot
    assert k_cold["x_s3"] == pytest.approx(0.95)
    assert k_cold["x_native"] == pytest.approx(0.38)
    assert k_hot["x_native"] == pytest.approx(0.9)  # warm/hot compares with native warm/hot
    assert k_cold["amplification"] == pytest.approx(1.0)


def test_goals_met_and_missed() -> None:
    goals = {(g.goal, g.door, g.workload, g.cache): g for g in report.evaluate_goals(
        report.aggregate(_synthetic()))}
    seq_goal = "cold sequential >= 0.9x raw S3"
    assert goals[(seq_goal, "kernel", "seq", "cold")].status == "met"
    assert goals[(seq_goal, "fuse", "seq", "cold")].status == "n/a"  # skipped door
    warm = "kernel warm >= 0.97x native"
    assert goals[(warm, "kernel", "seq", "warm/dropped")].status == "met"
    assert goals[(warm, "kernel", "seq", "warm/hot")].status == "missed"
    rand = goals[("cold 4 KiB random read p50 <= raw GET p50 + 1 ms", "kernel", "rand4k", "cold")]
    assert rand.status == "met" and rand.value == pytest.approx(2.5)
    amp = goals[("fetch amplification (S3 bytes / bytes read)", "kernel", "rand4k", "cold")]
    assert amp.status == "missed" and amp.value == pytest.approx(2.0)


def test_median_over_repetitions_and_skips() -> None:
    samples = [_row("native", "seq", "warm", "hot", v, 1.0, rep=i)
               for i, v in enumerate((100, 300, 200))]
    samples.append(report.sample_row("kernel", "seq", ("cold", "dropped"), 0, None,
                                     skipped="no kernel door"))
    rows = report.aggregate(samples)
    nat = report.find_row(rows, "native", "seq", "warm", "hot")
    assert nat and nat["MBps"] == pytest.approx(200) and nat["n"] == 3
    ker = report.find_row(rows, "kernel", "seq", "cold", "dropped")
    assert ker and ker["skipped"] == "no kernel door" and ker["MBps"] is None


def test_markdown_json_and_plots(tmp_path: Path) -> None:
    rows = report.aggregate(_synthetic())
    goals = report.evaluate_goals(rows)
    md = report.markdown(rows, goals, {"profile": "tiny"})
    assert "| fuse | seq | cold | skipped: command not found: hsmfs |" in md
    assert "| kernel | seq | cold | 380.0 |" in md and "0.95x" in md
    assert "## Goals" in md and "**missed**" in md
    # The FUSE door read against the bare pyfuse3 floor: 0.50x and 0.62x native, 0.80x of it.
    assert "| seq | warm/hot | 0.50x | 0.62x | 0.80x |" in md
    report.write_json(tmp_path / "r.json", {"profile": "tiny"}, rows, goals, _synthetic())
    doc = json.loads((tmp_path / "r.json").read_text())
    assert {"door", "workload", "cache", "MBps", "p50_ms", "p99_ms", "ttfb_ms", "s3_requests",
            "s3_bytes", "daemon_cpu_s"} <= set(doc["results"][0])
    assert {r["door"] for r in doc["results"]} == {"native", "kernel", "fuse", "s3", "pyfuse3"}
    for png in report.plots(rows, tmp_path):
        assert png.read_bytes()[:8] == PNG_MAGIC


def _lifecycle() -> list[report.Row]:
    files = report.sample_row("native", "create", ("cold", "dropped"), 0,
                              Sample(2000 * 34_000, 2.0, [0.5] * 2000))
    fuse_files = report.sample_row("fuse", "create", ("cold", "dropped"), 0,
                                   Sample(2000 * 34_000, 8.0, [2.0] * 2000))
    return [
        _row("native", "write", "cold", "dropped", 1000, 1.0),
        _row("kernel", "write", "cold", "dropped", 950, 1.0),
        _row("fuse", "write", "cold", "dropped", 400, 2.5),
        _row("s3", "archive", "cold", None, 200, 1000.0),
        report.sample_row("kernel", "archive", ("cold", "dropped"), 0,
                          Sample(200_000_000, 1.05, [1050.0], fixed_ms=310.0)),
        _row("fuse", "archive", "cold", "dropped", 150, 1300.0),
        files, fuse_files,
    ]


def test_lifecycle_rows_ratios_and_archive_goal() -> None:
    rows = report.aggregate(_lifecycle())
    fuse_write = report.find_row(rows, "fuse", "write", "cold", "dropped")
    assert fuse_write and fuse_write["x_native"] == pytest.approx(0.4)
    fuse_create = report.find_row(rows, "fuse", "create", "cold", "dropped")
    assert fuse_create and fuse_create["files_per_s"] == pytest.approx(250.0)
    assert fuse_create["x_native"] == pytest.approx(0.25)  # same files: MB/s ratio = files/s
    goals = {(g.door, g.workload): g for g in report.evaluate_goals(rows)
             if g.goal.startswith("archive")}
    assert set(goals) == {("kernel", "archive"), ("fuse", "archive")}
    assert goals[("kernel", "archive")].status == "met"  # 190.5 / 200 MB/s
    assert goals[("kernel", "archive")].value == pytest.approx(200 / 1.05 / 200)
    assert goals[("fuse", "archive")].status == "missed"  # 0.75x
    md = report.markdown(rows, report.evaluate_goals(rows), {"profile": "tiny"})
    assert "## Writes and archive" in md
    assert "| kernel | archive | 190.5 | - | 1.05 | - | - | - | 310 | - | 0.95x | 1 ok |" in md
    assert "| fuse | create | 8.5 | 250 |" in md
    assert "| archive >= 0.9x boto3 upload_file | fuse | archive | cold | 0.750 |" in md


def test_lifecycle_plan() -> None:
    from hsmfs.bench import doors
    from hsmfs.bench.main import applies
    from hsmfs.bench.workloads import WORKLOADS

    w, a, c = WORKLOADS["write"], WORKLOADS["archive"], WORKLOADS["create"]
    o = WORKLOADS["overwrite"]
    assert applies(doors.FuseDoor, o, doors.COLD) and not applies(doors.S3Door, o, doors.S3_COLD)
    # Once per repetition, on a fresh door, on the doors each workload names.
    assert applies(doors.NativeDoor, w, doors.COLD)
    assert not applies(doors.NativeDoor, w, doors.WARM_HOT)
    assert not applies(doors.KernelDoor, c, doors.WARM_DROPPED)
    assert applies(doors.FuseDoor, c, doors.COLD)
    assert applies(doors.S3Door, a, doors.S3_COLD) and not applies(doors.S3Door, w, doors.S3_COLD)
    assert not applies(doors.NativeDoor, a, doors.COLD)
    assert not any(applies(doors.PyFuse3Door, x, m) for x in (w, a, c)
                   for m in doors.PyFuse3Door.modes)
    assert applies(doors.KernelDoor, WORKLOADS["seq"], doors.WARM_HOT)  # readers unchanged


def test_lifecycle_params_and_writers(tmp_path: Path) -> None:
    from hsmfs.bench.main import workload_params
    from hsmfs.bench.workloads import WORKLOADS, create_files, seq_write, write_file

    ds = dataset.build(tmp_path / "d", dataset.PROFILES["tiny"])
    p = workload_params(WORKLOADS["archive"], ds, 1, "fuse-0")
    assert p["path"] == "lifecycle/archive-fuse-0.bin" and p["size"] == ds.sizes.big_bytes
    s = seq_write(tmp_path, {**p, "size": 3 * (1 << 20) + 5})
    assert s.bytes == 3 * (1 << 20) + 5 and len(s.lat_ms) == 5  # 4 writes and the fsync
    again = tmp_path / "again"
    write_file(again, {**p, "size": 3 * (1 << 20) + 5})
    # The archive's dirty file and raw S3's copy hold the same bytes.
    assert (again / p["path"]).read_bytes() == (tmp_path / p["path"]).read_bytes()
    # overwrite: in place, no O_CREAT/O_TRUNC: the file keeps its inode and its length.
    big = tmp_path / "d" / dataset.BIG
    o = workload_params(WORKLOADS["overwrite"], ds, 1, "native-0")
    ino = big.stat().st_ino
    s = seq_write(tmp_path / "d", o)
    assert s.bytes == ds.sizes.big_bytes and s.ttfb_ms is not None
    assert big.stat().st_ino == ino and big.stat().st_size == ds.sizes.big_bytes
    c = workload_params(WORKLOADS["create"], ds, 1, "native-0")
    s = create_files(tmp_path, c)
    made = sorted((tmp_path / c["dir"]).rglob("*.bin"))
    assert len(made) == len(s.lat_ms) == ds.sizes.tree_files
    assert sorted(f.stat().st_size for f in made) == sorted(e.size for e in ds.group("tree"))


def test_percentile() -> None:
    assert report.percentile([], 50) is None
    assert report.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert report.percentile([float(i) for i in range(101)], 99) == pytest.approx(99.0)


# -- latency proxy ------------------------------------------------------------------------------


def test_parse_latency_and_bandwidth() -> None:
    assert parse_latency_ms("20:80ms") == "20:80"
    assert parse_latency_ms("30") == "30"
    assert parse_bandwidth_mbps("90MB/s") == 90.0
    for bad in ("80:20ms", "fast"):
        with pytest.raises(ValueError):
            parse_latency_ms(bad)
    with pytest.raises(ValueError):
        parse_bandwidth_mbps("0MB/s")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_upstream(tmp_path: Path) -> Iterator[int]:
    (tmp_path / "blob").write_bytes(b"x" * 1000)
    handler = lambda *a: _Quiet(*a, directory=str(tmp_path))  # noqa: E731
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield int(srv.server_address[1])
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


def _get(port: int) -> tuple[float, bytes]:
    t = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/blob", timeout=10) as r:
        body = r.read()
    return time.perf_counter() - t, body


@pytest.mark.timeout(30)
def test_proxy_thread_delays_first_byte(http_upstream: int) -> None:
    proxy = ProxyThread(ProxyConfig("127.0.0.1", http_upstream, ttfb_ms="60")).start()
    try:
        took, body = _get(proxy.port)
    finally:
        proxy.stop()
    assert body == b"x" * 1000
    assert took >= 0.06
    assert proxy.proxy.counters.requests == 1
    assert proxy.proxy.counters.bytes_down > 1000  # body plus headers


@pytest.mark.timeout(30)
def test_proxy_process_reports_counters(http_upstream: int, tmp_path: Path) -> None:
    proxy = ProxyProcess(ProxyConfig("127.0.0.1", http_upstream, ttfb_ms="20", seed=1),
                         tmp_path / "stats.json")
    proxy.start(env=child_env())
    try:
        took, _ = _get(proxy.port)
        _get(proxy.port)
        stats = proxy.stats()
    finally:
        proxy.stop()
    assert took >= 0.02
    assert stats is not None and stats.requests == 2 and stats.bytes_down > 2000


@pytest.fixture
def big_upstream(tmp_path: Path) -> Iterator[int]:
    """An HTTP/1.1 server holding `blob` (1,000 bytes) and `big` (2 MB)."""
    (tmp_path / "big").write_bytes(b"y" * BIG_BLOB)
    (tmp_path / "blob").write_bytes(b"x" * 1000)
    handler = lambda *a: _Quiet(*a, directory=str(tmp_path))  # noqa: E731
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield int(srv.server_address[1])
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


BIG_BLOB = 2_000_000


def _timed_get(port: int, path: str) -> tuple[float, int]:
    t = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{path}", timeout=30) as r:
        n = len(r.read())
    return time.perf_counter() - t, n


@pytest.mark.timeout(60)
def test_proxy_caps_each_connection(big_upstream: int) -> None:
    """Lower bounds only (a loaded machine can only make a transfer slower): 2 MB through a
    20 MB/s per-connection cap takes at least 0.1 s, on each of two connections at once (the
    cap is per connection: each one is held to it, not the pair to it together)."""
    bw = 20.0
    proxy = ProxyThread(ProxyConfig("127.0.0.1", big_upstream, bw_mbps=bw)).start()
    try:
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda _: _timed_get(proxy.port, "big"), range(2)))
    finally:
        proxy.stop()
    floor = BIG_BLOB / (bw * 1e6) - BURST_S
    for took, n in got:
        assert n == BIG_BLOB
        assert took >= floor
    assert proxy.proxy.counters.connections == 2 and proxy.proxy.counters.requests == 2


@pytest.mark.timeout(60)
def test_proxy_total_cap_holds_connections_together(big_upstream: int) -> None:
    proxy = ProxyThread(ProxyConfig("127.0.0.1", big_upstream, total_bw_mbps=40.0)).start()
    try:
        t = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda _: _timed_get(proxy.port, "big"), range(2)))
        took = time.perf_counter() - t
    finally:
        proxy.stop()
    assert took >= 2 * BIG_BLOB / 40e6 - BURST_S


@pytest.mark.timeout(60)
def test_proxy_delays_every_request_on_a_kept_connection(big_upstream: int) -> None:
    """First-byte latency is per request, not per connection: three GETs on one keep-alive
    connection each wait at least the latency, and the proxy counts three requests."""
    import http.client

    proxy = ProxyThread(ProxyConfig("127.0.0.1", big_upstream, ttfb_ms="50")).start()
    took = []
    try:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        for _ in range(3):
            t = time.perf_counter()
            conn.request("GET", "/blob")
            body = conn.getresponse().read()
            took.append(time.perf_counter() - t)
            assert body == b"x" * 1000
        conn.close()
    finally:
        proxy.stop()
    assert all(x >= 0.05 for x in took)
    assert proxy.proxy.counters.connections == 1 and proxy.proxy.counters.requests == 3


def test_proxy_process_passes_its_settings() -> None:
    cfg = ProxyConfig("127.0.0.1", 7480, ttfb_ms="100:200", bw_mbps=90.0, seed=3)
    argv = ProxyProcess(cfg, Path("/nonexistent/stats.json")).argv()
    assert argv[argv.index("--ttfb-ms") + 1] == "100:200"
    assert float(argv[argv.index("--bw-MBps") + 1]) == 90.0
    from hsmfs.bench.latency_proxy import _parse_args

    back, _ = _parse_args(argv[3:])  # what the subprocess will run with
    assert (back.ttfb_ms, back.bw_mbps, back.seed) == ("100:200", 90.0, 3)


def test_network_profiles_set_the_proxy() -> None:
    from hsmfs.bench.main import NETWORK_PROFILES, parse_args

    a = parse_args(["--profile", "network"])
    assert (a.s3_latency, a.s3_bandwidth) == ("100:200", 90.0)
    assert a.profile == "net" and a.concurrency == 16 and a.repeat == 1
    c = parse_args(["--profile", "cross-region", "--sizes", "quick", "--concurrency", "8"])
    assert (c.s3_latency, c.s3_bandwidth) == (NETWORK_PROFILES["cross-region"].latency_ms, 40.0)
    assert c.profile == "quick" and c.concurrency == 8
    o = parse_args(["--profile", "network", "--s3-latency", "5ms"])  # explicit flags win
    assert o.s3_latency == "5" and o.s3_bandwidth == 90.0
    lo = parse_args([])
    assert lo.s3_latency is None and lo.s3_bandwidth is None and lo.profile == "full"
    assert lo.concurrency == 8


# -- issue 15's goals ---------------------------------------------------------------------------


def _net_rows() -> list[report.Row]:
    src = 1_000_000
    mib4 = 4 << 20
    return [
        _row("native", "grep", "cold", "dropped", 100, 10.0),
        _row("s3", "grep", "cold", None, 1.0, 1000.0, s3_bytes=src),  # 1 s one at a time
        _row("s3par", "grep", "cold", None, 4.0, 250.0, s3_bytes=src),  # 0.25 s in parallel
        _row("kernel", "grep", "cold", "dropped", 5.0, 200.0, s3_bytes=src),  # 0.2 s: met both
        _row("fuse", "grep", "cold", "dropped", 1.25, 800.0, s3_bytes=src),  # 0.8 s: 3.2x par
        _row("s3", "compile", "cold", None, 1.0, 1000.0, s3_bytes=src),
        _row("kernel", "compile", "cold", "dropped", 0.8, 1250.0, s3_bytes=src),  # slower
        # 16 readers of one 4 MiB file: 64 MiB read; the kernel door fetched it once, FUSE
        # twice.
        report.sample_row("kernel", "many1", ("cold", "dropped"), 0,
                          Sample(mib4, 0.1, [100.0]), {"s3_requests": 1, "s3_bytes": mib4}),
        report.sample_row("kernel", "same16", ("cold", "dropped"), 0,
                          Sample(16 * mib4, 0.2, [200.0] * 16),
                          {"s3_requests": 1, "s3_bytes": mib4}),
        report.sample_row("fuse", "same16", ("cold", "dropped"), 0,
                          Sample(16 * mib4, 0.4, [400.0] * 16),
                          {"s3_requests": 2, "s3_bytes": 2 * mib4}),
        report.sample_row("s3", "same16", ("cold", None), 0, Sample(16 * mib4, 1.0, [900.0] * 16),
                          {"s3_requests": 16, "s3_bytes": 16 * mib4}),
        # warm rows: kernel as on loopback, FUSE at half its loopback ratio.
        _row("native", "seq", "warm", "hot", 1000, 0.1),
        _row("kernel", "seq", "warm", "hot", 950, 0.1),
        _row("fuse", "seq", "warm", "hot", 400, 0.1),
    ]


def _loopback_rows() -> list[report.Row]:
    return report.aggregate([
        _row("native", "seq", "warm", "hot", 1000, 0.1),
        _row("kernel", "seq", "warm", "hot", 960, 0.1),
        _row("fuse", "seq", "warm", "hot", 800, 0.1),
    ])


def test_network_goals_are_marked_with_their_limits() -> None:
    rows = report.aggregate(_net_rows())
    goals = {(g.goal.split(" (")[0], g.door, g.workload): g
             for g in report.evaluate_goals(rows, _loopback_rows())}
    serial = "cold source tree faster than raw S3 one file at a time"
    par = "cold source tree within 1.5x of raw S3 at full concurrency"
    assert goals[(serial, "kernel", "grep")].status == "met"
    assert goals[(serial, "kernel", "grep")].value == pytest.approx(0.2)
    assert goals[(par, "kernel", "grep")].status == "met"
    assert goals[(par, "kernel", "grep")].value == pytest.approx(0.8)  # 0.2 s / 0.25 s
    assert goals[(serial, "fuse", "grep")].status == "met"
    fuse_par = goals[(par, "fuse", "grep")]
    assert fuse_par.status == "missed" and fuse_par.value == pytest.approx(3.2)
    # A miss says what was measured: the door's time and both references'.
    assert fuse_par.limit and "raw one at a time" in fuse_par.limit
    assert "raw in parallel" in fuse_par.limit
    assert goals[(serial, "kernel", "compile")].status == "missed"
    assert (par, "kernel", "compile") not in goals  # no parallel reference row: no goal
    co = "16 readers of one cold file cost one file's GETs"
    assert goals[(co, "kernel", "same16")].status == "met"
    assert goals[(co, "kernel", "same16")].value == pytest.approx(1.0)
    assert goals[(co, "fuse", "same16")].status == "missed"
    assert goals[(co, "fuse", "same16")].value == pytest.approx(2.0)
    assert (co, "s3", "same16") not in goals and (co, "native", "same16") not in goals
    warm = "warm row unchanged from the loopback run: x native / loopback's"
    assert goals[("warm row sends no S3 request", "kernel", "seq")].status == "met"
    assert goals[(warm, "kernel", "seq")].status == "met"
    assert goals[(warm, "fuse", "seq")].status == "missed"
    assert goals[(warm, "fuse", "seq")].value == pytest.approx(0.5)
    assert "on loopback" in (goals[(warm, "fuse", "seq")].limit or "")
    for g in goals.values():
        assert g.status in ("met", "missed", "n/a")
        assert g.status != "missed" or g.limit, g  # every miss has its measured limit


def test_network_report_many_readers_and_missing_rows(tmp_path: Path) -> None:
    rows = report.aggregate(_net_rows())
    goals = report.evaluate_goals(rows)
    md = report.markdown(rows, goals, {"profile": "net", "network_profile": "network"})
    assert "## Many readers" in md
    assert "| kernel | 16 | one | cold |" in md and "| s3 | 16 | one | cold |" in md
    assert "| goal | door | workload | cache | value | target | status | measured |" in md
    kernel16 = report.find_row(rows, "kernel", "same16", "cold", "dropped")
    assert kernel16 and kernel16["s3_req_per_MB"] == pytest.approx(1 / (64 * (1 << 20) / 1e6))
    report.write_json(tmp_path / "r.json", {}, rows, goals, _net_rows())
    doc = json.loads((tmp_path / "r.json").read_text())
    assert {m["row"] for m in doc["missing"]} == {"release rate", "eviction under a budget"}
    assert all("limit" in g for g in doc["goals"])


# -- the whole command, against moto ------------------------------------------------------------


@pytest.mark.timeout(180)
def test_bench_smoke_against_moto(moto: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    json_path = tmp_path / "results.json"
    argv = [
        "--quick", "--tiny", "--doors", "native,s3,kernel,pyfuse3", "--workloads", "seq,rand4k",
        "--endpoint", moto.endpoint, "--bucket", f"bench-{uuid.uuid4().hex[:8]}",
        "--out", str(out), "--json", str(json_path), "--no-drop-caches", "--no-prefault",
        # A door whose command does not exist must be reported as skipped, not crash the run.
        "--hsmfs-cmd", str(tmp_path / "no-such-hsmfs"),
    ]
    assert bench_main(argv) == 0
    doc = json.loads(json_path.read_text())
    rows = {(r["door"], r["workload"], r["cache"], r["page_cache"]): r for r in doc["results"]}
    big = dataset.PROFILES["tiny"].big_bytes

    s3_seq = rows[("s3", "seq", "cold", None)]
    assert s3_seq["s3_bytes"] == big and s3_seq["MBps"] > 0 and s3_seq["ttfb_ms"] > 0
    s3_rand = rows[("s3", "rand4k", "cold", None)]
    assert s3_rand["s3_requests"] == dataset.PROFILES["tiny"].rand_ops
    assert s3_rand["amplification"] == pytest.approx(1.0)

    nat = rows[("native", "seq", "warm", "hot")]
    assert nat["bytes"] == big and nat["MBps"] > 0 and nat["x_s3"] > 0
    assert "drop" in rows[("native", "seq", "cold", "dropped")]["skipped"]
    assert "command not found" in rows[("kernel", "rand4k", "cold", "dropped")]["skipped"]
    floor = rows[("pyfuse3", "seq", "warm", "hot")]  # the bare passthrough needs no hsmfs command
    assert floor["bytes"] == big and floor["MBps"] > 0 and floor["daemon_cpu_s"] is not None

    assert (json_path.with_suffix(".md")).read_text().startswith("# hsmfs bench")
    for name in ("throughput.png", "latency.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert not (out / "scratch").exists()  # the bench cleans up after itself


@pytest.mark.timeout(180)
def test_bench_network_profile_smoke_against_moto(moto: Any, tmp_path: Path) -> None:
    """`--profile network` end to end: every raw-S3 GET goes through the proxy (the proxy's
    own count equals the reference's), the parallel reference and the many-readers rows exist,
    and the report says which profile ran. A 2 ms latency instead of 100-200 ms: plumbing,
    not numbers."""
    json_path = tmp_path / "results.json"
    argv = [
        "--profile", "network", "--sizes", "tiny", "--s3-latency", "2ms",
        "--doors", "native,s3,s3par", "--workloads", "many4,same4,grep",
        "--endpoint", moto.endpoint, "--bucket", f"bench-{uuid.uuid4().hex[:8]}",
        "--out", str(tmp_path / "out"), "--json", str(json_path), "--no-drop-caches",
        "--no-prefault",
    ]
    assert bench_main(argv) == 0
    doc = json.loads(json_path.read_text())
    meta = doc["meta"]
    assert meta["network_profile"] == "network" and meta["s3_bandwidth_MBps"] == 90.0
    assert meta["s3_latency_ms"] == "2" and meta["concurrency"] == 16
    rows = {(r["door"], r["workload"]): r for r in doc["results"]}
    tiny = dataset.PROFILES["tiny"]
    same = rows[("s3", "same4")]
    assert same["bytes"] == 4 * tiny.many_bytes and same["s3_requests"] == 4
    for key in (("s3", "same4"), ("s3", "many4"), ("s3", "grep"), ("s3par", "grep")):
        r = rows[key]
        assert not r["error"] and r["proxy_requests"] == r["s3_requests"] > 0, key
    assert rows[("s3par", "grep")]["bytes"] == rows[("s3", "grep")]["bytes"]
    assert ("s3par", "many4") not in rows  # the parallel reference is for file trees only
    assert rows[("native", "many4")]["bytes"] == 4 * tiny.many_bytes
    md = json_path.with_suffix(".md").read_text()
    assert "## Many readers" in md and "network_profile**: network" in md


@pytest.mark.timeout(180)
def test_bench_lifecycle_smoke_against_moto(moto: Any, tmp_path: Path) -> None:
    """write/create on native and raw S3's upload_file: the rows exist; no timing checks."""
    json_path = tmp_path / "results.json"
    argv = [
        "--quick", "--tiny", "--doors", "native,s3,fuse", "--workloads", "write,archive,create",
        "--endpoint", moto.endpoint, "--bucket", f"bench-{uuid.uuid4().hex[:8]}",
        "--out", str(tmp_path / "out"), "--json", str(json_path), "--no-drop-caches",
        "--no-prefault", "--hsmfs-cmd", str(tmp_path / "no-such-hsmfs"),
    ]
    assert bench_main(argv) == 0
    doc = json.loads(json_path.read_text())
    rows = {(r["door"], r["workload"]): r for r in doc["results"]}
    # Lifecycle workloads run once, cold, on the doors they name: no warm rows, no s3 write.
    assert set(rows) == {("native", "write"), ("native", "create"), ("s3", "archive"),
                         ("fuse", "write"), ("fuse", "archive"), ("fuse", "create")}
    assert all(r["cache"] == "cold" for r in doc["results"])
    tiny = dataset.PROFILES["tiny"]
    assert rows[("native", "write")]["bytes"] == tiny.big_bytes
    assert rows[("native", "create")]["ops"] == tiny.tree_files
    assert rows[("native", "create")]["files_per_s"] > 0
    assert rows[("s3", "archive")]["bytes"] == tiny.big_bytes and not rows[("s3", "archive")][
        "error"]
    assert "command not found" in rows[("fuse", "archive")]["skipped"]
    goal = [g for g in doc["goals"] if g["goal"].startswith("archive")]
    assert [g["status"] for g in goal] == ["n/a"]  # the FUSE door could not run
    assert "## Writes and archive" in json_path.with_suffix(".md").read_text()


# -- the bare pyfuse3 floor ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_passfs_serves_the_tree_byte_for_byte(tmp_path: Path) -> None:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    (src / "d" / "e").mkdir(parents=True)
    mnt.mkdir()
    files = {"a.bin": os.urandom(3 << 20), "d/b.txt": b"hello\n", "d/e/c": b""}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    proc = subprocess.Popen([sys.executable, "-m", "hsmfs.bench.passfs", str(src), str(mnt)],
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"serving\n"
        seen = {str(p.relative_to(mnt)) for p in mnt.rglob("*") if p.is_file()}
        assert seen == set(files)
        for rel, data in files.items():
            got = (mnt / rel).read_bytes()
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), rel
        with pytest.raises(OSError):  # read-only, like the door it stands beside
            (mnt / "new").write_bytes(b"x")
        proc.terminate()  # SIGTERM unmounts
        assert proc.wait(timeout=20) == 0
        assert not os.path.ismount(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.timeout(180)
def test_bench_without_matplotlib_writes_tables_and_says_so(moto: Any, tmp_path: Path) -> None:
    """Issue 14, item 6: the whole command, in a process where ``import matplotlib`` fails as
    it does without the bench extra (a package of that name that raises ModuleNotFoundError
    comes first on the path): it says so at the start, before any work, and at the end, and
    writes its tables and JSON without plots."""
    shadow = tmp_path / "no-extra" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'matplotlib'\", name='matplotlib')\n")
    json_path = tmp_path / "results.json"
    env = child_env()
    env["PYTHONPATH"] = f"{shadow.parent}{os.pathsep}{env['PYTHONPATH']}"
    out = subprocess.run(
        [sys.executable, "-m", "hsmfs", "bench", "--quick", "--tiny", "--doors", "native,s3",
         "--workloads", "seq", "--endpoint", moto.endpoint,
         "--bucket", f"bench-{uuid.uuid4().hex[:8]}", "--out", str(tmp_path / "out"),
         "--json", str(json_path), "--no-drop-caches", "--no-prefault"],
        env=env, capture_output=True, text=True, timeout=170)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    said = [i for i, line in enumerate(lines) if "no plots: matplotlib is not installed" in line]
    built = [i for i, line in enumerate(lines) if "dataset: built" in line]
    assert said and built and said[0] < built[0], out.stderr  # before any work
    assert "pip install 'hsmfs[bench]'" in lines[said[0]]
    assert "plots skipped" in lines[-1], out.stderr
    doc = json.loads(json_path.read_text())
    assert any(r["door"] == "s3" and r["MBps"] for r in doc["results"])
    assert json_path.with_suffix(".md").read_text().startswith("# hsmfs bench")
    assert not list(tmp_path.glob("*.png"))


def test_door_options_reach_both_doors_commands(tmp_path: Path) -> None:
    """--door-options is appended to the -o list each hsmfs door starts with."""
    from hsmfs.bench import doors
    from hsmfs.bench.main import parse_args

    assert parse_args(["--door-options", "readahead=256M"]).door_options == "readahead=256M"
    target = doors.S3Target("http://127.0.0.1:1", "b", "p", "a", "s")
    ds = dataset.build(tmp_path / "d", dataset.PROFILES["tiny"])
    cfg = doors.DoorConfig(target, ds, tmp_path, ["true"], 1 << 20, 16, 5.0, print,
                           "readahead=256M")
    assert cfg.options("endpoint=x,chunk=1") == "endpoint=x,chunk=1,readahead=256M"
    plain = doors.DoorConfig(target, ds, tmp_path, ["true"], 1 << 20, 16, 5.0, print)
    assert plain.options("endpoint=x") == "endpoint=x"


@pytest.mark.timeout(60)
def test_proxy_stops_quietly_with_a_kept_connection(http_upstream: int) -> None:
    """SIGTERM with a keep-alive connection open: exit 0 and nothing on stderr (each open
    connection's cancelled task used to be logged as an error)."""
    import http.client

    proc = subprocess.Popen(
        [sys.executable, "-m", "hsmfs.bench.latency_proxy", "--upstream",
         f"127.0.0.1:{http_upstream}", "--ttfb-ms", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().split(b":")[-1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/blob")
        assert conn.getresponse().read() == b"x" * 1000
        proc.terminate()
        _, err = proc.communicate(timeout=20)
        conn.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and err == b"", err[-500:]
