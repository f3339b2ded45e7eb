"""The stats → Prometheus text mapping (hsmfs.metrics), parsed back with prometheus_client's
own parser; the real daemon is scraped in t4_metrics.py."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hsmfs.config import parse_address
from hsmfs.histogram import Histogram
from hsmfs.metrics import CORE, prometheus_text


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_every_core_metric_round_trips() -> None:
    hist = Histogram().as_dict()
    stats = {m.key: ({"get": hist} if m.kind == "histogram" else
                     {"get": {"2xx": 2}} if m.label == "kind/status" else
                     {"missing": 2} if m.label else 7) for m in CORE}
    fams = _families(prometheus_text(stats))
    for m in CORE:
        # The parser names a counter family without its _total suffix.
        name = "hsmfs_" + (m.name.removesuffix("_total") if m.kind == "counter" else m.name)
        assert fams[name].type == m.kind, m.name
        assert fams[name].documentation == m.help


def test_labels_are_escaped_and_errnos_named() -> None:
    weird = 'a"b\\c\nd'
    text = prometheus_text({"kernel": {"events": {weird: 3}, "mean_event_ms": 2.5},
                            "errors": {"throttled": 1, "enospc": 2, "missing": 4}})
    fams = _families(text)
    [sample] = fams["hsmfs_kernel_events"].samples
    assert sample.labels == {"kind": weird} and sample.value == 3
    assert fams["hsmfs_kernel_event_mean_seconds"].samples[0].value == pytest.approx(0.0025)
    by_cause = {s.labels["cause"]: s.labels["errno"] for s in fams["hsmfs_fetch_errors"].samples}
    assert by_cause == {"throttled": "EIO", "enospc": "ENOSPC", "missing": "EIO"}


def test_requests_by_kind_and_status() -> None:
    text = prometheus_text({"s3_requests_by": {"get": {"2xx": 5, "503": 2}, "head": {"2xx": 1}}})
    got = {(s.labels["kind"], s.labels["status"]): s.value
           for s in _families(text)["hsmfs_s3_attempts"].samples}
    assert got == {("get", "2xx"): 5, ("get", "503"): 2, ("head", "2xx"): 1}


def test_non_numbers_and_absent_sections_are_left_out() -> None:
    text = prometheus_text({"last_refresh": None, "hits": 1, "kernel": None})
    assert set(_families(text)) == {"hsmfs_hits"}


def test_address() -> None:
    assert parse_address("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert parse_address(":9100") == ("127.0.0.1", 9100)  # never every interface by default
    assert parse_address("[::1]:9100") == ("::1", 9100)
    with pytest.raises(ValueError):
        parse_address("localhost")


def test_histograms() -> None:
    h = Histogram()
    for seconds in (0.00005, 0.003, 0.003, 0.2, 50.0):
        h.observe(seconds)
    text = prometheus_text({"s3_seconds_by": {"get": h.as_dict()},
                            "kernel": {"event_seconds": h.as_dict()}})
    fams = _families(text)
    assert fams["hsmfs_s3_request_seconds"].type == "histogram"
    got = {(s.name, s.labels.get("le")): s.value for s in fams["hsmfs_s3_request_seconds"].samples
           if s.labels.get("kind") == "get"}
    assert got[("hsmfs_s3_request_seconds_bucket", "0.0001")] == 1
    assert got[("hsmfs_s3_request_seconds_bucket", "0.005")] == 3
    assert got[("hsmfs_s3_request_seconds_bucket", "10.0")] == 4
    assert got[("hsmfs_s3_request_seconds_bucket", "+Inf")] == 5
    assert got[("hsmfs_s3_request_seconds_count", None)] == 5
    assert got[("hsmfs_s3_request_seconds_sum", None)] == pytest.approx(50.20605)
    kernel = {s.name for s in fams["hsmfs_kernel_event_seconds"].samples}
    assert kernel == {"hsmfs_kernel_event_seconds_" + x for x in ("bucket", "sum", "count")}
