"""`hsmfs bench`: native vs the kernel door vs the FUSE door vs raw S3, on real S3 (Ceph RGW).

General layout (imports point down this list only):
    main.py           CLI (`bench_main(argv)`), S3 set-up, run order, progress
    report.py         result rows, ratios, goals, markdown / JSON / PNG output
    doors.py          start/stop/warm/count each door; the raw-S3 reference
    workloads.py      the workloads, measured in a child process per run
    dataset.py        the seeded data set and its upload
    ceph.py           a throw-away Ceph RGW cluster (ships ceph_up.sh / ceph_down.sh)
    latency_proxy.py  injected first-byte latency and bandwidth caps (in-process or subprocess)

This package never imports the rest of hsmfs: it drives the doors only through the `hsmfs`
command line (see doors.py), so it runs before, and independently of, the doors it measures.
"""

from __future__ import annotations

__all__ = ["bench_main"]


def bench_main(argv: list[str]) -> int:
    """Run `hsmfs bench` with `argv` (without the program name); returns the exit status."""
    from .main import bench_main as run  # lazy: keep `import hsmfs.bench` cheap

    return run(argv)
