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
from pathlib import Path
from typing import Any

import pytest

from hsmfs.bench import bench_main, dataset, report
from hsmfs.bench.latency_proxy import (
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
