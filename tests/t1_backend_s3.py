"""S3Backend against the real moto server over loopback HTTP, and behind a fault-injecting proxy.

Nothing here is mocked: the backend speaks HTTP through boto3 to moto (its own process), or to
``hsmfs.faultproxy.FaultProxy`` in front of moto, which answers some requests itself (503
SlowDown, 500, 403, dropped connections, cut bodies, latency, connection refused).  Every read
compares bytes against the seeded source.  Backoff is set tiny so retries cost milliseconds.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import seeded, sha256
from support.fixtures import fault_proxy  # noqa: F401 - fixture

from hsmfs.backend_s3 import ObjectVersion, S3Backend
from hsmfs.config import S3Config
from hsmfs.errors import (
    AccessDenied,
    BackendUnavailable,
    ObjectChanged,
    ObjectMissing,
    ShortBody,
    Throttled,
    to_errno,
)
from hsmfs.faultproxy import FaultProxy

MiB = 1024 * 1024
ATTEMPTS = 4


def make_backend(endpoint: str, bucket: str, prefix: str = "", **kw) -> S3Backend:
    cfg = dict(bucket=bucket, prefix=prefix, endpoint_url=endpoint, region="us-east-1",
               attempts=ATTEMPTS, backoff_base_s=0.01, backoff_cap_s=0.05,
               connect_timeout_s=2.0, read_timeout_s=5.0)
    cfg.update(kw)
    return S3Backend(S3Config(**cfg))


def listed(backend: S3Backend) -> dict[str, ObjectVersion]:
    return {v.key: v for v in backend.list()}


@pytest.fixture
def direct(moto, bucket):
    """A backend straight at moto (no proxy)."""
    return make_backend(moto.endpoint, bucket.name)


@pytest.fixture(params=[True, False], ids=["lean-get", "boto3-get"])
def proxied(request, fault_proxy, bucket):  # noqa: F811 - fixture argument
    """A backend behind the fault proxy, once per GET path: every fault must read the same
    through the lean signed GET and through boto3's client."""
    return make_backend(fault_proxy.endpoint, bucket.name, lean_get=request.param)


# -- listing ------------------------------------------------------------------------------------

def test_list_paginates_past_1000_keys(bucket, fault_proxy):  # noqa: F811
    n = 1007
    keys = [f"pfx/k{i:05d}" for i in range(n)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: bucket.put(keys[i], seeded(i % 13, f"page:{i}")), range(n)))
    bucket.put("elsewhere/k", b"not under the prefix")
    bucket.put("pfxnot/k", b"shares the string prefix but not the directory")

    backend = make_backend(fault_proxy.endpoint, bucket.name, prefix="pfx/")
    versions = list(backend.list())

    assert [v.key for v in versions] == keys  # every key once, in S3's (lexicographic) order
    for i, v in enumerate(versions):
        assert v.size == i % 13
        assert v.etag.startswith('"') and v.etag.endswith('"')
        assert abs(v.mtime - time.time()) < 600
    # 1007 keys at S3's 1000-key pages: exactly two list requests, nothing retried.
    assert fault_proxy.count(method="GET", match="list-type=2") == 2
    assert backend.stats()["s3_requests"] == 2
    assert backend.stats()["s3_retries"] == 0


def test_list_empty_prefix_and_empty_bucket(direct, bucket):
    assert list(direct.list()) == []
    bucket.put("a", b"x")
    bucket.put("d/b", b"yy")
    got = listed(direct)
    assert {k: v.size for k, v in got.items()} == {"a": 1, "d/b": 2}


def test_list_retries_a_throttled_page(proxied, bucket, fault_proxy):  # noqa: F811
    bucket.put("one", b"1")
    fault_proxy.fail_next(2, status=503, code="SlowDown", match="list-type=2")
    assert list(listed(proxied)) == ["one"]
    assert proxied.stats()["s3_retries"] == 2


# -- head ---------------------------------------------------------------------------------------

def test_head_reads_mode_from_metadata(direct, bucket):
    bucket.put("exec.sh", seeded(100, "exec"), mode=0o100755)
    bucket.put("plain", seeded(100, "plain"))
    v = listed(direct)
    info = direct.head(v["exec.sh"])
    assert info.mode == 0o100755
    assert info.version == v["exec.sh"]  # unversioned bucket: no version id
    assert direct.head(v["plain"]).mode is None


def test_head_ignores_malformed_mode(direct, bucket, caplog):
    bucket.client.put_object(Bucket=bucket.name, Key="weird", Body=b"x",
                             Metadata={"mode": "rwxr-xr-x"})
    v = listed(direct)["weird"]
    with caplog.at_level(logging.WARNING, logger="hsmfs.backend_s3"):
        assert direct.head(v).mode is None
    assert any("malformed x-amz-meta-mode" in r.getMessage() for r in caplog.records)


def test_head_of_changed_and_deleted_object(direct, bucket):
    bucket.put("k", seeded(10, "v1"))
    v1 = listed(direct)["k"]
    bucket.put("k", seeded(10, "v2"))
    with pytest.raises(ObjectChanged):
        direct.head(v1)  # HEAD is pinned to the listed ETag: 412
    bucket.delete("k")
    with pytest.raises(ObjectMissing):
        direct.head(v1)


# -- fetch --------------------------------------------------------------------------------------

def test_ranged_fetch_is_byte_exact(direct, bucket):
    data = bucket.put("big.bin", seeded(3 * MiB + 123, "big"))
    v = listed(direct)["big.bin"]
    assert v.size == len(data)
    spans = [(0, 1), (0, 4096), (1, 4097), (MiB - 7, MiB + 9), (2 * MiB, 3 * MiB),
             (len(data) - 1, len(data)), (len(data) - 5000, len(data)), (0, len(data))]
    total = 0
    for start, stop in spans:
        got = direct.fetch(v, start, stop)
        assert len(got) == stop - start
        assert sha256(got) == sha256(data[start:stop]), (start, stop)
        total += stop - start
    stats = direct.stats()
    assert stats["s3_bytes"] == total
    assert stats["s3_requests"] == 1 + len(spans)  # the listing, then one GET per range
    assert stats["s3_retries"] == 0


def _established_to(port: int) -> int:
    """This process's established TCP connections to ``port`` on loopback."""
    own = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                own.add(link[8:-1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                cols = line.split()
                if int(cols[2].rsplit(":", 1)[1], 16) == port and cols[3] == "01" \
                        and cols[9] in own:
                    count += 1
    return count


def test_fetch_into_fills_the_buffer_and_reuses_one_connection(proxied, bucket,
                                                                fault_proxy):  # noqa: F811
    """Bodies are read straight into the caller's buffer; each finished body hands its
    keep-alive connection back to the pool, so sequential GETs share one connection (through
    the proxy: it keeps connections alive, moto's server closes them)."""
    data = bucket.put("k", seeded(2 * MiB, "into"))
    v = listed(proxied)["k"]
    port = urllib.parse.urlsplit(fault_proxy.endpoint).port
    before = _established_to(port)  # boto3's, from the listing
    buf = bytearray(2 * MiB)
    for start, stop in [(0, MiB), (5, 6), (MiB - 3, 2 * MiB), (MiB, 2 * MiB)] * 5:
        view = memoryview(buf)[:stop - start]
        assert proxied.fetch_into(v, start, view) == stop - start
        assert sha256(view) == sha256(data[start:stop])
    assert _established_to(port) <= before + 1  # the GETs' pool: one connection, reused
    assert fault_proxy.count(method="GET", match="/k") == 20


def test_fetch_into_a_buffer_past_the_object_is_object_changed(direct, bucket):
    bucket.put("k", b"0123456789")
    v = listed(direct)["k"]
    with pytest.raises(ObjectChanged):
        direct.fetch_into(v, 5, memoryview(bytearray(6)))


AWKWARD_KEYS = ["a b.txt", "plus+sign", "pct%41", "uni/\u00fc\u20ac.txt", "tilde~x", "q?x#y",
                "semi;colon=1&b", "dir//double", "star*(1)", "quote'\"", "caret^`{}|"]


@pytest.mark.parametrize("lean", [True, False], ids=["lean-get", "boto3-get"])
def test_awkward_keys_fetch_byte_exact_on_both_get_paths(moto, bucket, lean):
    """The lean GET builds and signs its own URL: every key S3 accepts must still match
    botocore's encoding (a mismatch is a 403 SignatureDoesNotMatch, not a silent miss)."""
    backend = make_backend(moto.endpoint, bucket.name, lean_get=lean)
    assert (backend._lean is not None) == lean
    want = {key: bucket.put(key, seeded(5000 + i, key)) for i, key in enumerate(AWKWARD_KEYS)}
    got = listed(backend)
    assert set(got) == set(want)
    for key, data in want.items():
        assert sha256(backend.fetch(got[key], 0, len(data))) == sha256(data), key
        assert backend.fetch(got[key], 17, 4000) == data[17:4000], key


def test_fetch_empty_range_makes_no_request(direct, bucket):
    bucket.put("k", b"abc")
    v = listed(direct)["k"]
    before = direct.stats()["s3_requests"]
    assert direct.fetch(v, 2, 2) == b""
    assert direct.fetch(v, 3, 1) == b""
    assert direct.stats()["s3_requests"] == before


def test_fetch_with_wrong_etag_is_object_changed(direct, bucket):
    data = bucket.put("k", seeded(5000, "etag"))
    v = listed(direct)["k"]
    wrong = ObjectVersion(v.key, '"0123456789abcdef0123456789abcdef"', v.size, v.mtime)
    with pytest.raises(ObjectChanged) as ei:
        direct.fetch(wrong, 0, 100)
    assert "412" in str(ei.value)
    assert to_errno(ei.value) == errno.EIO
    assert direct.stats()["s3_retries"] == 0  # a 412 is final, never retried
    assert direct.fetch(v, 0, 100) == data[:100]


def test_fetch_after_overwrite_never_mixes_versions(direct, bucket):
    old = bucket.put("k", seeded(8192, "old"))
    v_old = listed(direct)["k"]
    assert direct.fetch(v_old, 0, 4096) == old[:4096]
    new = bucket.put("k", seeded(8192, "new"))
    with pytest.raises(ObjectChanged):
        direct.fetch(v_old, 4096, 8192)
    v_new = listed(direct)["k"]
    assert v_new.etag != v_old.etag
    assert direct.fetch(v_new, 4096, 8192) == new[4096:]


def test_fetch_of_deleted_object_is_object_missing(direct, bucket):
    bucket.put("gone", seeded(100, "gone"))
    v = listed(direct)["gone"]
    bucket.delete("gone")
    with pytest.raises(ObjectMissing) as ei:
        direct.fetch(v, 0, 10)
    assert "404" in str(ei.value)
    assert to_errno(ei.value) == errno.EIO
    assert direct.stats()["s3_retries"] == 0


def test_fetch_past_listed_size_is_object_changed_without_a_request(direct, bucket):
    bucket.put("k", seeded(100, "size"))
    v = listed(direct)["k"]
    before = direct.stats()["s3_requests"]
    with pytest.raises(ObjectChanged):
        direct.fetch(v, 50, 101)
    assert direct.stats()["s3_requests"] == before


def test_fetch_past_real_size_is_object_changed(direct, bucket):
    """The stub believes the object is larger than S3 has it (same ETag): S3 answers 416."""
    bucket.put("k", seeded(100, "shrunk"))
    v = listed(direct)["k"]
    believed = ObjectVersion(v.key, v.etag, 1000, v.mtime)
    with pytest.raises(ObjectChanged) as ei:
        direct.fetch(believed, 500, 600)
    assert "416" in str(ei.value)


# -- faults through the proxy ---------------------------------------------------------------------

def test_proxy_passes_traffic_unchanged(proxied, bucket, fault_proxy):  # noqa: F811
    data = bucket.put("p.bin", seeded(2 * MiB + 1, "proxy"), mode=0o100640)
    v = listed(proxied)["p.bin"]
    assert proxied.head(v).mode == 0o100640
    assert sha256(proxied.fetch(v, 0, v.size)) == sha256(data)
    assert sha256(proxied.fetch(v, 12345, 1234567)) == sha256(data[12345:1234567])
    assert fault_proxy.count(action="pass") == 4  # list, head, two GETs
    assert fault_proxy.count(method="HEAD") == 1


@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (500, "InternalError"),
                                              (502, "BadGateway"), (504, "GatewayTimeout")])
def test_transient_errors_are_retried_and_succeed(proxied, bucket, fault_proxy,  # noqa: F811
                                                  status, code):
    data = bucket.put("k", seeded(70000, f"transient{status}"))
    v = listed(proxied)["k"]
    fault_proxy.fail_next(ATTEMPTS - 1, status=status, code=code, match="/k")
    got = proxied.fetch(v, 1000, 65000)
    assert sha256(got) == sha256(data[1000:65000])
    assert fault_proxy.count(action="fail", match="/k") == ATTEMPTS - 1
    assert fault_proxy.count(action="pass", match="/k") == 1
    stats = proxied.stats()
    assert stats["s3_retries"] == ATTEMPTS - 1
    assert stats["s3_requests"] == 1 + ATTEMPTS  # the listing, then every attempt
    assert stats["s3_bytes"] == 64000


def test_slowdown_past_every_attempt_is_throttled(proxied, bucket, fault_proxy):  # noqa: F811
    bucket.put("k", seeded(100, "throttled"))
    v = listed(proxied)["k"]
    fault_proxy.fail_next(ATTEMPTS, status=503, code="SlowDown", match="/k")
    with pytest.raises(Throttled) as ei:
        proxied.fetch(v, 0, 100)
    assert to_errno(ei.value) == errno.EIO  # the cause stays Throttled: see to_errno
    assert "503" in str(ei.value) and "SlowDown" in str(ei.value)
    assert fault_proxy.count(action="fail") == ATTEMPTS
    assert fault_proxy.pending() == 0
    assert proxied.stats()["s3_retries"] == ATTEMPTS - 1
    # The next call starts afresh and succeeds.
    assert proxied.fetch(v, 0, 100) == bucket.objects["k"]


def test_500_past_every_attempt_is_backend_unavailable(proxied, bucket, fault_proxy):  # noqa: F811
    bucket.put("k", seeded(100, "500"))
    v = listed(proxied)["k"]
    fault_proxy.fail_next(ATTEMPTS, status=500, code="InternalError", match="/k")
    with pytest.raises(BackendUnavailable) as ei:
        proxied.fetch(v, 0, 100)
    assert to_errno(ei.value) == errno.EIO
    assert fault_proxy.count(action="fail") == ATTEMPTS


def test_access_denied_is_final(proxied, bucket, fault_proxy):  # noqa: F811
    bucket.put("k", seeded(100, "403"))
    v = listed(proxied)["k"]
    fault_proxy.fail_next(ATTEMPTS, status=403, code="AccessDenied", match="/k")
    with pytest.raises(AccessDenied) as ei:
        proxied.fetch(v, 0, 100)
    assert to_errno(ei.value) == errno.EPERM
    assert fault_proxy.count(action="fail") == 1  # never retried
    assert proxied.stats()["s3_retries"] == 0


def test_head_503_is_retried(proxied, bucket, fault_proxy):  # noqa: F811
    bucket.put("x", b"x", mode=0o100600)
    v = listed(proxied)["x"]
    fault_proxy.fail_next(2, status=503, code="SlowDown", method="HEAD")
    assert proxied.head(v).mode == 0o100600
    assert fault_proxy.count(method="HEAD", action="fail") == 2


def test_dropped_connections_are_retried(proxied, bucket, fault_proxy):  # noqa: F811
    data = bucket.put("k", seeded(50000, "drop"))
    v = listed(proxied)["k"]
    fault_proxy.close_next(2, match="/k")
    assert sha256(proxied.fetch(v, 0, 50000)) == sha256(data)
    assert fault_proxy.count(action="close") == 2
    assert proxied.stats()["s3_retries"] == 2


def test_dropped_connections_past_every_attempt(proxied, bucket, fault_proxy):  # noqa: F811
    bucket.put("k", seeded(100, "drop-all"))
    v = listed(proxied)["k"]
    fault_proxy.close_next(ATTEMPTS, match="/k")
    with pytest.raises(BackendUnavailable) as ei:
        proxied.fetch(v, 0, 100)
    assert to_errno(ei.value) == errno.EIO


def test_cut_body_is_retried(proxied, bucket, fault_proxy):  # noqa: F811
    """Headers promise the whole range, the connection dies half-way through the body."""
    data = bucket.put("k", seeded(300000, "cut"))
    v = listed(proxied)["k"]
    fault_proxy.truncate_next(2, keep=1000, match="/k")
    got = proxied.fetch(v, 0, 300000)
    assert sha256(got) == sha256(data)
    assert fault_proxy.count(action="truncate") == 2
    assert proxied.stats()["s3_retries"] == 2


def test_cut_body_past_every_attempt_is_a_domain_error(proxied, bucket, fault_proxy):  # noqa: F811
    bucket.put("k", seeded(300000, "cut-all"))
    v = listed(proxied)["k"]
    fault_proxy.truncate_next(ATTEMPTS, keep=1000, match="/k")
    with pytest.raises(ShortBody) as ei:
        proxied.fetch(v, 0, 300000)
    # A connection cut mid-body is a short body, EIO (DESIGN §5), not throttling (EAGAIN).
    assert to_errno(ei.value) == errno.EIO
    assert fault_proxy.count(action="truncate") == ATTEMPTS


def test_latency_below_the_timeout_only_slows_down(proxied, bucket, fault_proxy):  # noqa: F811
    data = bucket.put("k", seeded(1000, "slow"))
    v = listed(proxied)["k"]
    fault_proxy.set_delay(200, match="/k")
    t0 = time.monotonic()
    assert proxied.fetch(v, 0, 1000) == data
    assert time.monotonic() - t0 >= 0.2
    assert proxied.stats()["s3_retries"] == 0


def test_latency_past_the_read_timeout_is_throttled(bucket, fault_proxy):  # noqa: F811
    backend = make_backend(fault_proxy.endpoint, bucket.name, read_timeout_s=0.3, attempts=2)
    bucket.put("k", seeded(1000, "timeout"))
    v = listed(backend)["k"]
    fault_proxy.set_delay(1500, match="/k")
    t0 = time.monotonic()
    with pytest.raises(Throttled) as ei:
        backend.fetch(v, 0, 1000)
    assert "timed out" in str(ei.value)
    assert to_errno(ei.value) == errno.EIO  # the cause stays Throttled: see to_errno
    assert time.monotonic() - t0 < 1.4  # gave up on its own timeout, not the proxy's delay
    fault_proxy.restore()
    assert backend.fetch(v, 0, 1000) == bucket.objects["k"]


def test_refused_connection_is_backend_unavailable(proxied, bucket, fault_proxy):  # noqa: F811
    data = bucket.put("k", seeded(1000, "refused"))
    v = listed(proxied)["k"]
    assert proxied.fetch(v, 0, 10) == data[:10]  # a pooled keep-alive connection exists
    fault_proxy.refuse()
    with pytest.raises(BackendUnavailable) as ei:
        proxied.fetch(v, 0, 1000)
    assert to_errno(ei.value) == errno.EIO
    with pytest.raises(BackendUnavailable):
        proxied.head(v)
    with pytest.raises(BackendUnavailable):
        list(proxied.list())
    requests_while_down = proxied.stats()["s3_requests"]
    assert proxied.stats()["s3_retries"] == 3 * (ATTEMPTS - 1)
    fault_proxy.restore()
    assert proxied.fetch(v, 0, 1000) == data
    assert proxied.stats()["s3_requests"] == requests_while_down + 1


def test_stats_count_requests_bytes_and_retries(proxied, bucket, fault_proxy):  # noqa: F811
    data = bucket.put("k", seeded(4096, "stats"))
    v = listed(proxied)["k"]  # 1 request
    proxied.head(v)  # 1 request
    fault_proxy.fail_next(1, status=503, code="SlowDown", match="/k")
    assert proxied.fetch(v, 0, 4096) == data  # 2 requests, 1 retry
    assert proxied.fetch(v, 100, 200) == data[100:200]  # 1 request
    stats = proxied.stats()
    latency = stats.pop("s3_seconds_by")
    assert stats == {"s3_requests": 5, "s3_bytes": 4196, "s3_retries": 1,
                     "s3_requests_by": {"list": {"2xx": 1}, "head": {"2xx": 1},
                                        "get": {"2xx": 2, "503": 1}}}
    # Every attempt timed, by kind: the 503 too.
    assert {k: h["count"] for k, h in latency.items()} == {"list": 1, "head": 1, "get": 3}
    assert latency["get"]["buckets"]["+Inf"] == 3 and latency["get"]["sum"] > 0
    assert fault_proxy.count() == 5


# -- the proxy itself ----------------------------------------------------------------------------

def test_fault_proxy_start_stop_and_restart(moto, bucket):
    threads_before = set(threading.enumerate())
    proxy = FaultProxy(moto.endpoint)
    try:
        endpoint = proxy.start()
        port = proxy.port
        assert endpoint == f"http://127.0.0.1:{port}"
        backend = make_backend(endpoint, bucket.name)
        assert list(backend.list()) == []  # leaves a keep-alive connection open
        proxy.refuse()
        proxy.fail_next(1)
        assert proxy.restore() == endpoint  # same port again, faults cleared
        assert proxy.pending() == 0
        assert list(backend.list()) == []
    finally:
        proxy.stop()
    proxy.stop()  # idempotent
    # Every thread the proxy started (listener and per-connection handlers) is gone.
    assert set(threading.enumerate()) <= threads_before


# -- issue 13: the status an error carries, answers that lie, metadata modes ---------------------

def test_classified_errors_carry_their_http_status() -> None:
    from hsmfs.backend_s3 import _Retryable, classify_status

    for status, code in [(404, "NoSuchKey"), (412, "PreconditionFailed"), (403, "AccessDenied"),
                         (503, "SlowDown"), (500, "InternalError")]:
        final = classify_status("get 'k'", status, code)
        exc = final.final if isinstance(final, _Retryable) else final
        assert exc.status == status, (status, exc)


@pytest.mark.parametrize(("status", "content_range", "cause"), [
    (206, "bytes 100-199/1000", None),
    (206, "bytes 100-199/*", None),
    (200, None, "bad_response"),  # the whole object to a range of it
    (204, None, "bad_response"),
    (206, None, "bad_response"),
    (206, "bytes 0-99/1000", "bad_response"),  # another range
    (206, "bytes 100-198/1000", "bad_response"),
    (206, "items 100-199/1000", "bad_response"),
    (206, "bytes garbage", "bad_response"),
    (206, "bytes 100-199/2000", "changed"),  # the object is not the listed size
])
def test_check_range(status: int, content_range: str | None, cause: str | None) -> None:
    from hsmfs.backend_s3 import _check_range
    from hsmfs.errors import HsmError

    v = ObjectVersion("k", '"e"', 1000, 0.0)
    if cause is None:
        _check_range("get", v, 100, 100, status, content_range)
        return
    with pytest.raises(HsmError) as err:
        _check_range("get", v, 100, 100, status, content_range)
    assert err.value.cause == cause and err.value.status == status


def test_a_200_for_the_whole_object_is_the_same_bytes() -> None:
    from hsmfs.backend_s3 import _check_range

    _check_range("get", ObjectVersion("k", '"e"', 1000, 0.0), 0, 1000, 200, None)


@pytest.mark.parametrize(("raw", "want"), [
    ("33261", 0o100755), ("420", 0o644), (str(0o104755), 0o100755),
    (str(0o107777), 0o100777), (str(0o041777), None), ("-1", None), ("rwxr-xr-x", None),
    (str(1 << 40), None), ("", None), ("0x1ed", None),
    ("\u00b2", None), ("9" * 5000, None),  # isdigit() but not int(): must not raise
])
def test_metadata_mode(raw: str, want: int | None) -> None:
    from hsmfs.backend_s3 import _mode_of

    assert _mode_of("k", {"Metadata": {"mode": raw}}) == want
