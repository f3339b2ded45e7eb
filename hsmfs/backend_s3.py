"""S3 access: list, head, ranged GET pinned to an ETag.  The only module that imports boto3.

Every call here blocks; the cache runs them in worker threads.  Ranged GETs, the hot path,
skip botocore's request pipeline: they are signed with botocore's own SigV4 signer and sent
over a urllib3 pool (:class:`_LeanGet`), ~0.5 ms of CPU per GET instead of ~1.5 ms.  Retries
live here and only here (exponential backoff with full jitter), and every botocore or urllib3
failure leaves this module as one of the domain errors in :mod:`hsmfs.errors`, so nothing
above knows about HTTP.
"""

from __future__ import annotations

import http.client
import logging
import os
import random
import threading
import time
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import boto3
import botocore.exceptions
import urllib3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config

from .config import S3Config
from .errors import (
    AccessDenied,
    BackendUnavailable,
    HsmError,
    ObjectChanged,
    ObjectMissing,
    ShortBody,
    Throttled,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ObjectVersion:
    """What identifies cached bytes: a key at one ETag (and size).  Bytes of two versions are
    never stitched together: every ranged GET carries ``If-Match: etag``."""

    key: str
    etag: str
    size: int
    mtime: float
    version_id: str | None = None


@dataclass(frozen=True)
class ObjectInfo:
    version: ObjectVersion
    #: ``st_mode`` from s3fs's ``x-amz-meta-mode`` (decimal), when HEAD was asked for and present.
    mode: int | None = None


# HTTP statuses worth another attempt: server errors and throttling.
_RETRY_STATUS = frozenset({500, 502, 503, 504})
_THROTTLE_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException",
                             "RequestLimitExceeded", "TooManyRequests"})


class _Retryable(Exception):
    """Internal: a failure that another attempt may cure; carries the error to raise at the end."""

    def __init__(self, final: HsmError) -> None:
        self.final = final


class S3Backend:
    """Blocking S3 client shared by every worker thread (boto3 clients are thread-safe)."""

    def __init__(self, cfg: S3Config) -> None:
        self.cfg = cfg
        session = boto3.session.Session(profile_name=cfg.profile)
        self._client = session.client(
            "s3",
            endpoint_url=cfg.endpoint_url,
            region_name=cfg.region or session.region_name or "us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                # Trailer checksums are rejected by Ceph RGW 16 (S3_SERVERS.md).
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                # We retry ourselves, with the classification below.
                retries={"total_max_attempts": 1, "mode": "standard"},
                connect_timeout=cfg.connect_timeout_s,
                read_timeout=cfg.read_timeout_s,
                max_pool_connections=cfg.max_connections,
                tcp_keepalive=True,
            ),
        )
        self._lean = _LeanGet.for_client(self._client, session, cfg) if cfg.lean_get else None
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes = 0
        self.retries = 0

    # -- public calls --------------------------------------------------------------------------

    def list(self) -> Iterator[ObjectVersion]:
        """Every object under the prefix (paginated), keys as stored in S3."""
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.cfg.bucket, "Prefix": self.cfg.prefix}
            if token:
                kw["ContinuationToken"] = token
            page = self._call(f"list {self.cfg.prefix!r}",
                              lambda kw=kw: self._client.list_objects_v2(**kw))
            for obj in page.get("Contents", []):
                yield ObjectVersion(
                    key=obj["Key"],
                    etag=obj["ETag"],
                    size=int(obj["Size"]),
                    mtime=obj["LastModified"].timestamp(),
                )
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def head(self, version: ObjectVersion) -> ObjectInfo:
        """HEAD pinned to the listed ETag: the mode from metadata, the version id if any."""
        resp = self._call(
            f"head {version.key!r}",
            lambda: self._client.head_object(Bucket=self.cfg.bucket, Key=version.key,
                                             IfMatch=version.etag),
        )
        mode = None
        raw = resp.get("Metadata", {}).get("mode")
        if raw is not None:
            try:
                mode = int(raw)
            except ValueError:
                log.warning("ignoring malformed x-amz-meta-mode %r on %r", raw, version.key)
        vid = resp.get("VersionId")
        if vid and vid != "null":
            version = ObjectVersion(version.key, version.etag, version.size, version.mtime, vid)
        return ObjectInfo(version=version, mode=mode)

    def fetch(self, version: ObjectVersion, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` of exactly this version, or a domain error.  Never short."""
        if stop <= start:
            return b""
        buf = bytearray(stop - start)
        self.fetch_into(version, start, memoryview(buf))
        return bytes(buf)

    def fetch_into(self, version: ObjectVersion, start: int, buf: memoryview) -> int:
        """Fill ``buf`` with bytes ``[start, start + len(buf))`` of exactly this version and
        return ``len(buf)``, or raise a domain error.  Never short.

        The body goes from the socket straight into ``buf`` (one copy, no allocation): the
        cache passes a buffer it reuses, because allocating and faulting in a fresh 8 MiB
        ``bytes`` per GET, then unmapping it, cost about a tenth of a cold sequential read's
        CPU on a 2-vCPU machine (perf).
        """
        stop = start + len(buf)
        if stop <= start:
            return 0
        if stop > version.size:
            raise ObjectChanged(f"range {start}-{stop} past size {version.size} of {version.key!r}")
        kw: dict[str, Any] = {
            "Bucket": self.cfg.bucket,
            "Key": version.key,
            "Range": f"bytes={start}-{stop - 1}",  # the one place HTTP's inclusive end appears
            "IfMatch": version.etag,
        }
        if version.version_id:
            kw["VersionId"] = version.version_id
        what = f"get {version.key!r} [{start}, {stop})"

        def attempt() -> int:
            if self._lean is not None:
                return self._lean.get_into(version, start, buf, what)
            resp = self._client.get_object(**kw)
            body = resp["Body"]
            try:
                return _take_body(what, version, resp.get("ETag"), len(buf),
                                  lambda: _read_body_into(body, buf))
            except BaseException:
                body.close()  # mid-stream or refused: the connection cannot be reused
                raise

        got = self._call(what, attempt)
        with self._lock:
            self.bytes += got
        return got

    # -- retry and classification ---------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        attempts = max(self.cfg.attempts, 1)
        last: HsmError | None = None
        for n in range(attempts):
            if n:
                # Full jitter (AWS architecture blog): spreads retries of many readers apart.
                cap = min(self.cfg.backoff_cap_s, self.cfg.backoff_base_s * (2 ** n))
                delay = random.uniform(0, cap)
                level = logging.DEBUG if n < 2 else logging.INFO if n < 4 else logging.WARNING
                log.log(level, "%s: attempt %d/%d after %.2fs: %s", what, n + 1, attempts, delay,
                        last)
                with self._lock:
                    self.retries += 1
                time.sleep(delay)
            with self._lock:
                self.requests += 1
            try:
                return fn()
            except _Retryable as exc:
                last = exc.final
            except HsmError:
                raise
            except botocore.exceptions.ClientError as exc:
                final = self._classify(what, exc)
                if not isinstance(final, _Retryable):
                    raise final from exc
                last = final.final
            except _HttpError as exc:
                final = classify_status(what, exc.status, exc.code)
                if not isinstance(final, _Retryable):
                    raise final from exc
                last = final.final
            except urllib3.exceptions.NewConnectionError as exc:  # a ConnectTimeoutError too
                last = BackendUnavailable(f"{what}: {exc}")
            except (urllib3.exceptions.ConnectTimeoutError,
                    urllib3.exceptions.ReadTimeoutError) as exc:
                last = Throttled(f"{what}: timed out: {exc}")
            except urllib3.exceptions.HTTPError as exc:
                last = BackendUnavailable(f"{what}: {exc}")
            except (botocore.exceptions.ConnectTimeoutError,
                    botocore.exceptions.ReadTimeoutError) as exc:
                last = Throttled(f"{what}: timed out: {exc}")
            except (botocore.exceptions.EndpointConnectionError,
                    botocore.exceptions.ConnectionClosedError,
                    botocore.exceptions.ProxyConnectionError,
                    botocore.exceptions.HTTPClientError,
                    ConnectionError) as exc:
                last = BackendUnavailable(f"{what}: {exc}")
            except botocore.exceptions.NoCredentialsError as exc:
                raise AccessDenied(
                    f"{what}: no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                    "AWS_PROFILE or -o profile=)") from exc
            except botocore.exceptions.BotoCoreError as exc:
                raise BackendUnavailable(f"{what}: {exc}") from exc
        assert last is not None
        raise last

    @staticmethod
    def _classify(what: str, exc: botocore.exceptions.ClientError) -> HsmError | _Retryable:
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return classify_status(what, status, code)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"s3_requests": self.requests, "s3_bytes": self.bytes,
                    "s3_retries": self.retries}


def classify_status(what: str, status: int, code: str) -> HsmError | _Retryable:
    """An S3 error response (HTTP status, XML ``Code``) as a domain error, or as retryable."""
    detail = f"{what}: HTTP {status} {code}"
    if status == 412 or code == "PreconditionFailed":
        return ObjectChanged(f"{detail}: object changed since its stub was made")
    if status == 404 or code in {"NoSuchKey", "NotFound", "NoSuchVersion"}:
        return ObjectMissing(f"{detail}: object gone")
    if status == 416 or code == "InvalidRange":
        return ObjectChanged(f"{detail}: object shrank")
    if status == 403 or code in {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
        return AccessDenied(detail)
    if code in _THROTTLE_CODES or status == 429:
        return _Retryable(Throttled(detail))
    if status in _RETRY_STATUS or code in {"InternalError", "ServiceUnavailable"}:
        return _Retryable(BackendUnavailable(detail))
    if code == "NoSuchBucket":
        return ObjectMissing(detail)
    return BackendUnavailable(detail)


def _read_body_into(body: Any, buf: memoryview) -> int:
    """Read a GET's body into ``buf``; return how many bytes came (less = the body was short;
    ``len(buf) + 1`` = it was longer, e.g. a server that ignored the range).

    botocore's StreamingBody offers only ``read()`` (a new ``bytes`` per call).  It wraps a
    urllib3 response, which wraps an ``http.client.HTTPResponse`` whose ``readinto`` fills our
    buffer from the socket directly; botocore never content-decodes S3 bodies, so these raw
    bytes are the object's bytes.  http.client closes its response at the end of the body;
    the connection then goes back to urllib3's pool.  A body left unfinished (an error, extra
    bytes) closes the connection instead: it is mid-stream and cannot be reused.  A body of any
    other shape falls back to ``read()`` and a copy.  Socket-level failures leave here as the
    exceptions botocore would raise, so the caller classifies them in one place.
    """
    stream = getattr(body, "_raw_stream", None)
    if stream is None or not hasattr(getattr(stream, "_fp", None), "readinto") \
            or not hasattr(stream, "release_conn"):
        return _read_body_copying(body, buf)
    return _read_urllib3_into(stream, buf)


def _read_urllib3_into(stream: urllib3.BaseHTTPResponse, buf: memoryview) -> int:
    """:func:`_read_body_into` for a urllib3 response (the lean path's, or botocore's)."""
    raw: Any = getattr(stream, "_fp", None)
    got = 0
    try:
        while got < len(buf):
            n = raw.readinto(buf[got:])
            if not n:
                break
            got += n
    except TimeoutError as exc:
        stream.close()
        raise botocore.exceptions.ReadTimeoutError(endpoint_url=str(exc)) from exc
    except (OSError, http.client.HTTPException) as exc:
        stream.close()
        raise ConnectionError(f"body cut off after {got} bytes: {exc!r}") from exc
    if raw.isclosed():
        stream.release_conn()
        return got
    stream.close()
    return len(buf) + 1 if got == len(buf) else got


def _read_body_copying(body: Any, buf: memoryview) -> int:
    got = 0
    while got < len(buf):
        chunk = body.read(len(buf) - got)
        if not chunk:
            return got
        buf[got:got + len(chunk)] = chunk
        got += len(chunk)
    return len(buf) + 1 if body.read(1) else got


class _HttpError(Exception):
    """An S3 error response on the lean path, classified by :func:`classify_status`."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__(f"HTTP {status} {code}")
        self.status = status
        self.code = code


class _LeanGet:
    """Ranged GETs signed with botocore's SigV4 signer and sent over a urllib3 pool.

    botocore's client pipeline (event hooks, parameter validation, serializer, response
    parser) costs ~1.5 ms of CPU per GET on this class of machine; signing and sending the
    same request directly costs ~0.5 ms (measured against Ceph, 4 KiB ranges).  On 2 vCPUs
    that CPU is the limit for trees of small files and for random reads, so the hot path
    takes the lean road; listing and HEAD keep boto3.  Same endpoint, region, credentials
    (refreshable ones refresh here too), path-style URLs, timeouts and pool size as the
    client; no retries in urllib3 (ours classify first).  Not used behind an HTTP proxy or
    without credentials: boto3 knows those cases, this class does not.
    """

    def __init__(self, endpoint: str, region: str, bucket: str, credentials: Any,
                 cfg: S3Config) -> None:
        self._base = f"{endpoint.rstrip('/')}/{urllib.parse.quote(bucket, safe='')}/"
        self._region = region
        self._credentials = credentials
        self._pool = urllib3.PoolManager(
            num_pools=2, maxsize=cfg.max_connections, retries=False,
            timeout=urllib3.Timeout(connect=cfg.connect_timeout_s, read=cfg.read_timeout_s),
            ca_certs=os.environ.get("AWS_CA_BUNDLE") or None,
        )

    @classmethod
    def for_client(cls, client: Any, session: Any, cfg: S3Config) -> _LeanGet | None:
        credentials = session.get_credentials()
        if credentials is None or urllib.request.getproxies():
            return None
        return cls(client.meta.endpoint_url, client.meta.region_name, cfg.bucket, credentials,
                   cfg)

    def url(self, version: ObjectVersion) -> str:
        # S3's canonical URI: every byte of the key percent-encoded except unreserved
        # characters and "/", exactly as botocore builds it, so the signature matches.
        url = self._base + urllib.parse.quote(version.key, safe="/~")
        if version.version_id:
            url += "?versionId=" + urllib.parse.quote(version.version_id, safe="~")
        return url

    def get_into(self, version: ObjectVersion, start: int, buf: memoryview, what: str) -> int:
        url = self.url(version)
        request = AWSRequest(method="GET", url=url, headers={
            "Range": f"bytes={start}-{start + len(buf) - 1}",
            "If-Match": version.etag,
        })
        S3SigV4Auth(self._credentials.get_frozen_credentials(), "s3",
                    self._region).add_auth(request)
        resp = self._pool.request("GET", url, headers=dict(request.headers.items()),
                                  preload_content=False, redirect=False)
        try:
            if resp.status >= 300:
                raise _HttpError(resp.status, _error_code(resp.read(64 * 1024)))
            length = resp.headers.get("Content-Length")
            if length is not None and int(length) != len(buf):
                raise _Retryable(ShortBody(f"{what}: {resp.status} with {length} bytes"))
            return _take_body(what, version, resp.headers.get("ETag"), len(buf),
                              lambda: _read_urllib3_into(resp, buf))
        finally:
            _finish(resp)


def _take_body(what: str, version: ObjectVersion, etag: str | None, want: int,
               read: Callable[[], int]) -> int:
    """The rules for a GET's answer, whichever path sent it: the ETag is the stub's, and the
    body is exactly ``want`` bytes.  A timeout mid-body is throttling; a body cut off
    mid-stream is a short body (DESIGN §5: EIO, not EAGAIN).  Both are worth another try."""
    if etag and etag != version.etag:
        raise ObjectChanged(f"{what}: ETag {etag} != {version.etag}")
    try:
        got = read()
    except botocore.exceptions.ReadTimeoutError as exc:
        raise _Retryable(Throttled(f"{what}: body read timed out: {exc}")) from exc
    except (botocore.exceptions.ResponseStreamingError, ConnectionError) as exc:
        raise _Retryable(ShortBody(f"{what}: body read failed: {exc}")) from exc
    if got != want:
        raise _Retryable(ShortBody(f"{what}: got {got} bytes"))
    return got


def _finish(resp: urllib3.BaseHTTPResponse) -> None:
    """Hand the connection back to the pool if its response was read to the end; close it
    otherwise (an unread body would be the next request's response)."""
    fp: Any = getattr(resp, "_fp", None)
    if fp is not None and fp.isclosed():
        resp.release_conn()
    else:
        resp.close()


def _error_code(body: bytes) -> str:
    """The ``<Code>`` of an S3 XML error body ('' if there is none: HEAD-like or garbage)."""
    try:
        node = ET.fromstring(body).find("Code")
    except ET.ParseError:
        return ""
    return (node.text or "") if node is not None else ""
