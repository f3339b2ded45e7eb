"""A latency histogram with fixed buckets, in the shape Prometheus expects (cumulative counts
per upper bound, a sum and a count).  A leaf: pure, no locking (callers that observe from
several threads hold their own lock), no trio."""

from __future__ import annotations

import bisect

#: Upper bounds in seconds: from a page-cache answer in the kernel door's receive loop
#: (~0.1 ms) to an S3 request riding out its retries (seconds); about 2.5x apart, so a
#: quantile read from them is within a bucket's width of the truth.
BOUNDS_S: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                               0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    def __init__(self) -> None:
        self._counts = [0] * (len(BOUNDS_S) + 1)  # the last one: above every bound
        self.sum_s = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self._counts[bisect.bisect_left(BOUNDS_S, seconds)] += 1
        self.sum_s += seconds
        self.count += 1

    def as_dict(self) -> dict[str, object]:
        """{"buckets": {upper bound: cumulative count, "+Inf": count}, "sum": s, "count": n}."""
        buckets: dict[str, int] = {}
        total = 0
        for bound, n in zip(BOUNDS_S, self._counts, strict=False):
            total += n
            buckets[repr(bound)] = total
        buckets["+Inf"] = self.count
        return {"buckets": buckets, "sum": round(self.sum_s, 6), "count": self.count}
