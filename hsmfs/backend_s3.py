"""S3 access: list, head, ranged GET pinned to an ETag, conditional upload and delete.  The only
module that imports boto3.

Every call here blocks; the cache runs them in worker threads.  Ranged GETs, the hot path,
skip botocore's request pipeline: they are signed with botocore's own SigV4 signer and sent
over a urllib3 pool (:class:`_LeanGet`), ~0.5 ms of CPU per GET instead of ~1.5 ms.  Retries
live here and only here (exponential backoff with full jitter), and every botocore or urllib3
failure leaves this module as one of the domain errors in :mod:`hsmfs.errors`, so nothing
above knows about HTTP.

Uploads (:meth:`S3Backend.begin_upload`, :meth:`S3Backend.send`) are conditional: ``If-Match`` of
the ETag the file is based on, or ``If-None-Match: *`` for a new key; a failed condition is
:class:`~hsmfs.errors.ObjectChanged` (412), a based-on object that is gone
:class:`~hsmfs.errors.ObjectMissing`.  What servers honour, measured here on moto 5.2.1 and
Ceph RGW 16.2.15 (``tests/t1_upload.py`` passes against both):

==================================  =========  ===========  =================================
condition                           moto 5     Ceph 16.2    what this module does
==================================  =========  ===========  =================================
PUT ``If-None-Match: *``            412        412          sends it; trusts the server
PUT ``If-Match`` (quoted ETag)      412 / 200  always 412   sends it quoted; after a 412
                                                            whose HEAD shows the base still
                                                            there, unquoted from then on
PUT ``If-Match`` (unquoted ETag)    412 / 200  412 / 200    (as above)
PUT ``If-Match``, key gone          404        412          HEAD tells: ObjectMissing
Complete MPU ``If-None-Match: *``   412        ignored      HEAD first (404 expected), then
                                                            sends it too
Complete MPU ``If-Match``           ignored    ignored      HEAD first (ETag must be the
                                                            base), then sends it too
Complete MPU answer's ETag          set        empty        if empty, HEAD after; else none
DELETE ``If-Match``                 412        **ignored**  HEAD first, then sends it
``Content-MD5`` on PUT / part       ignored    BadDigest    sent; each part hashed once
==================================  =========  ===========  =================================

Where the server ignores a condition, the window between our HEAD and the server applying the
request remains: another writer completing in those milliseconds is overwritten (multipart on
moto and RGW < 20.2.1), or its new version deleted (DELETE on RGW 16).  A single PUT is not
exposed on either server.

Metadata follows s3fs: ``x-amz-meta-mtime`` is the file's mtime in whole decimal seconds (s3fs
writes ``%llu`` of ``st_mtime``; rclone writes the same header as decimal seconds with a
fraction, and reads an integer fine, so one header serves both), ``x-amz-meta-mode`` is
``st_mode`` in decimal (s3fs; :meth:`S3Backend.head` reads it back).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import http.client
import itertools
import logging
import os
import random
import secrets
import threading
import time
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
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
    BadResponse,
    HsmError,
    ObjectChanged,
    ObjectMissing,
    ShortBody,
    Throttled,
)
from .histogram import Histogram
from .stubfile import RemoteVersion

log = logging.getLogger(__name__)
T = TypeVar("T")


#: What identifies cached bytes: a key at one ETag (and size).  Bytes of two versions are
#: never stitched together: every ranged GET carries ``If-Match: etag``.  One class for the
#: backend and the core's record (defined in the format module, which imports no boto3).
ObjectVersion = RemoteVersion


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    version: ObjectVersion
    #: ``st_mode`` from s3fs's ``x-amz-meta-mode`` (decimal), when HEAD was asked for and present.
    mode: int | None = None
    #: The ``x-amz-meta-hsmfs-upload`` token of the upload that stored it (head_key only).
    upload: str | None = None


MiB = 1 << 20
#: Above this size a file goes up in parts.  One PUT keeps a file to one request and one hash
#: pass; parts let several connections carry one large file (boto3's ``upload_file`` starts at
#: 8 MiB; a part costs a request, so small files stay single).  A single PUT's body is held in
#: memory (it is the snapshot that was hashed), so this also bounds that buffer.
MULTIPART_THRESHOLD = 64 * MiB
#: S3 allows 5 MiB to 5 GiB per part (the last may be smaller) and at most 10,000 parts; 16 MiB
#: parts cover files up to 156 GiB, and the part size grows beyond that.
PART_SIZE = 16 * MiB
MIN_PART_SIZE = 5 * MiB
MAX_PARTS = 10_000
#: Parts in flight at once, per file: enough to fill a link where one stream cannot (measured
#: single-stream PUTs on loopback Ceph are CPU-bound around one core), while the part buffers
#: stay at PART_THREADS x PART_SIZE of memory.
PART_THREADS = 4
#: The metadata key (``x-amz-meta-hsmfs-upload``) carrying an upload's :attr:`Upload.token`.
TOKEN_META = "hsmfs-upload"
#: Reads of :func:`etag_of` (the crash-recovery hash): bounded, no part-sized buffer.
HASH_READ = 4 * MiB


class SourceChanged(Exception):
    """The file changed while its bytes were read for an upload (it got shorter, or the
    caller's ``check`` saw its size, mtime or ctime move): nothing was stored (an unfinished
    multipart upload is aborted).  Not an :class:`~hsmfs.errors.HsmError`: it never reaches a
    door; the archive reads the file again."""


@dataclass(frozen=True)
class Upload:
    """One upload of a file's first ``size`` bytes to ``key``, begun by
    :meth:`S3Backend.begin_upload` and sent by :meth:`S3Backend.send`.

    Nothing about the bytes is known before they are sent: each part is read once, hashed
    as it is read (its MD5 goes out as ``Content-MD5``, and the parts' MD5s make the ETag S3
    must report), and sent.  What identifies the upload in S3 before its bytes are read is
    ``token``, a random id sent as ``x-amz-meta-hsmfs-upload`` (:data:`TOKEN_META`): a HEAD
    that shows it shows this upload (the archive's crash recovery relies on it).
    """

    key: str
    size: int
    part_size: int  # 0: a single PUT
    base: str | None  # If-Match of this ETag; None: If-None-Match: *
    token: str
    mtime: float
    mode: int
    #: A multipart upload's id (created by begin_upload: no byte is in it yet).
    upload_id: str | None = None

    @property
    def parts(self) -> int:
        return -(-self.size // self.part_size) if self.part_size else 0

    def meta(self) -> dict[str, str]:
        return {"mtime": str(int(self.mtime)), "mode": str(self.mode), TOKEN_META: self.token}


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
        def client(**s3: Any) -> Any:
            return session.client(
                "s3",
                endpoint_url=cfg.endpoint_url,
                region_name=cfg.region or session.region_name or "us-east-1",
                config=Config(
                    s3={"addressing_style": "path", **s3},
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

        self._client = client()
        #: PutObject and UploadPart bodies: sent with Content-MD5 (a signed header, so it
        #: cannot be swapped; AWS and RGW refuse a body that does not match it: BadDigest)
        #: and UNSIGNED-PAYLOAD.  Over plain http botocore otherwise signs the SHA-256 of
        #: every body too, a second full hash of every byte on top of the MD5 the ETag needs
        #: (archive_probe.py, loopback Ceph, 256 MiB: 0.85x of upload_file signed, 1.02x
        #: unsigned).  Over https botocore already sends such bodies unsigned.  A second
        #: client of the same session (~8 ms), so no other request changes.
        self._upload_client = client(payload_signing_enabled=False)
        self._lean = _LeanGet.for_client(self._client, session, cfg) if cfg.lean_get else None
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes = 0
        self.retries = 0
        #: Attempts by kind ("get", "head", "put part", ...) and outcome: "2xx", the HTTP
        #: status of an error response, or a cause word (timeout, unreachable, short_body).
        self.by_kind: dict[str, dict[str, int]] = {}
        #: Seconds per attempt by kind, whatever its outcome (a GET's includes its body).
        self.latency: dict[str, Histogram] = {}
        self.uploaded = 0  # bytes stored by put (not yet in stats(): its keys are pinned)
        # Upload shape: module defaults, per backend so a test can make multipart cheap.
        self.multipart_threshold = MULTIPART_THRESHOLD
        self.part_size = PART_SIZE
        self.part_threads = PART_THREADS
        #: Learnt from the server (Ceph RGW 16): If-Match on writes must be unquoted.
        self._unquoted_if_match = False

    # -- public calls --------------------------------------------------------------------------

    def list(self) -> Iterator[ObjectVersion]:
        """Every object under the prefix (paginated), keys as stored in S3."""
        for page in self.list_pages():
            yield from page

    def list_pages(self, prefix: str | None = None) -> Iterator[list[ObjectVersion]]:
        """The listing one page (up to 1,000 objects) at a time, as each response arrives:
        a caller can work on a page while the next one is asked for.  ``prefix``: a full key
        prefix below the backend's (``hsmfs sync PATH`` lists a subtree), else the backend's."""
        for page in self._pages(self.cfg.prefix if prefix is None else prefix):
            yield _listed(page)

    def list_dir(self, prefix: str) -> tuple[list[ObjectVersion], list[str]]:
        """One directory of the bucket (``-o lazy``): ListObjectsV2 with ``Prefix=prefix`` (a
        full key prefix ending in "/", or the backend's prefix for the root) and
        ``Delimiter=/``, every page.  (the objects directly below, the common prefixes: the
        keys of the subdirectories, ending in "/")."""
        objects: list[ObjectVersion] = []
        prefixes: list[str] = []
        for page in self._pages(prefix, delimiter="/"):
            objects.extend(_listed(page))
            prefixes.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
        return objects, prefixes

    def _pages(self, prefix: str, delimiter: str | None = None) -> Iterator[dict[str, Any]]:
        """ListObjectsV2's answers under ``prefix``, page after page (each call retried)."""
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.cfg.bucket, "Prefix": prefix}
            if delimiter:
                kw["Delimiter"] = delimiter
            if token:
                kw["ContinuationToken"] = token
            page = self._call(f"list {prefix!r}",
                              lambda kw=kw: self._client.list_objects_v2(**kw))
            yield page
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def head(self, version: ObjectVersion) -> ObjectInfo:
        """HEAD pinned to the listed ETag: the mode and mtime from metadata, the version id if
        any."""
        resp = self._call(
            f"head {version.key!r}",
            lambda: self._client.head_object(Bucket=self.cfg.bucket, Key=version.key,
                                             IfMatch=version.etag),
        )
        answered = resp.get("ETag")
        if answered and answered != version.etag:
            # A server (or a proxy) that ignored If-Match: this HEAD describes another
            # version, whose metadata must not dress the listed one.
            raise _status(ObjectChanged(f"head {version.key!r}: ETag {answered} != "
                                        f"{version.etag}"), 200)
        mode = _mode_of(version.key, resp)
        mtime = version.mtime
        raw_mtime = resp.get("Metadata", {}).get("mtime")
        if raw_mtime is not None:
            # s3fs's (and rclone's) x-amz-meta-mtime: the file's own mtime, which make, rsync
            # and Python's .pyc cache compare, rather than the upload's LastModified.
            try:
                value = float(raw_mtime)
                if not 0 <= value < 1 << 40:
                    raise ValueError("out of range")
                mtime = value
            except ValueError:
                log.warning("ignoring malformed x-amz-meta-mtime %r on %r", raw_mtime,
                            version.key)
        vid = resp.get("VersionId")
        if not vid or vid == "null":
            vid = version.version_id
        version = ObjectVersion(version.key, version.etag, version.size, mtime, vid)
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
                status = int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
                _check_range(what, version, start, len(buf), status, resp.get("ContentRange"))
                return _take_body(what, version, resp.get("ETag"), len(buf), status,
                                  lambda: _read_body_into(body, buf))
            except BaseException:
                body.close()  # mid-stream or refused: the connection cannot be reused
                raise

        got = self._call(what, attempt)
        with self._lock:
            self.bytes += got
        return got

    # -- upload and delete ------------------------------------------------------------------------

    def head_key(self, key: str) -> ObjectInfo | None:
        """What S3 holds at ``key`` now (any version), or None if nothing.  Not pinned: this
        is the question "who is there?", asked before and after conditional writes."""
        try:
            resp = self._call(f"head {key!r}",
                              lambda: self._client.head_object(Bucket=self.cfg.bucket, Key=key))
        except ObjectMissing:
            return None
        return ObjectInfo(version=_version_of(key, resp), mode=_mode_of(key, resp),
                          upload=resp.get("Metadata", {}).get(TOKEN_META))

    def part_size_for(self, size: int) -> int:
        """The part size an upload of ``size`` bytes uses; 0: one PUT."""
        if size <= self.multipart_threshold:
            return 0
        return max(self.part_size, MIN_PART_SIZE, -(-size // MAX_PARTS))

    def begin_upload(self, key: str, size: int, *, base: str | None, mtime: float, mode: int,
                     token: str | None = None) -> Upload:
        """Start an upload of ``size`` bytes to ``key`` if S3 still holds ``base`` there (an
        ETag), or nothing (``base`` None).  A multipart upload is created here (no byte of
        the file is in it, and nothing is visible until :meth:`send` completes it), so the
        caller can record its id before any byte goes out; a single PUT sends nothing yet.
        ``token`` (default: a fresh random id) goes out as ``x-amz-meta-hsmfs-upload``."""
        upload = Upload(key, size, self.part_size_for(size), base, token or _new_token(),
                        mtime, mode)
        if not upload.part_size:
            return upload
        created = self._call(f"create upload {key!r}",
                             lambda: self._client.create_multipart_upload(
                                 Bucket=self.cfg.bucket, Key=key, Metadata=upload.meta()))
        return dataclasses.replace(upload, upload_id=created["UploadId"])

    def send(self, upload: Upload, fd: int, *, check: Callable[[], None] | None = None,
             progress: Callable[[int], None] | None = None) -> ObjectVersion:
        """Read the file's bytes once, hash them as read, send them, and return the version
        stored (its ETag is the one computed from the bytes sent: S3's for unencrypted
        objects, the MD5 of the body, or the MD5 of the parts' MD5s and ``-N``).

        ``fd`` must raise no fanotify event (the private door).  ``check()``, called after
        every byte was read and before the object can become visible (before the single PUT,
        or before CompleteMultipartUpload), raises :class:`SourceChanged` if the file changed
        meanwhile: then nothing is stored, so S3 never holds a torn mix of two versions.

        Raises :class:`~hsmfs.errors.ObjectChanged` when S3 holds another version (412, or our
        HEAD found one), :class:`~hsmfs.errors.ObjectMissing` when ``base`` is gone,
        :class:`SourceChanged`, or the classified failure after every retry.  A retried request
        whose first attempt landed is recognised (S3 then holds this upload's token, or these
        very bytes) and counted as success, never as a conflict.  ``progress(n)`` is called
        (from worker threads) as bytes go out.  Any failure aborts a multipart upload."""
        key, base = upload.key, upload.base
        cond: dict[str, str] = {"IfMatch": base} if base else {"IfNoneMatch": "*"}
        sent: list[str] = []  # the ETag of the bytes sent, once known

        try:
            if not upload.part_size:
                etag, vid = self._put_single(upload, fd, cond, check, sent)
            else:
                etag, vid = self._put_multipart(upload, fd, cond, check, progress, sent)
        except (ObjectChanged, ObjectMissing) as exc:
            # A retry after a lost answer meets our own earlier attempt: S3 holds our bytes.
            landed = self.head_key(key)
            if landed is None and base is not None and isinstance(exc, ObjectChanged):
                # Ceph answers If-Match on a missing key with 412, moto and AWS with 404.
                raise ObjectMissing(f"put {key!r}: gone from S3 (was {base})") from exc
            if landed is None or not (landed.upload == upload.token
                                      or (sent and landed.version.etag == sent[0])):
                raise
            log.info("put %r: an earlier attempt landed (%s)", key, landed.version.etag)
            return landed.version
        if not upload.part_size and progress is not None:
            progress(upload.size)
        with self._lock:
            self.uploaded += upload.size
        if etag:
            # The server named the ETag of what it stored, and it is the one computed from
            # the bytes sent: no HEAD needed (the version's mtime is the caller's to set).
            return ObjectVersion(key, etag, upload.size, time.time(), vid)
        # Ceph answers CompleteMultipartUpload with an empty ETag: HEAD, and expect ours.
        head = self.head_key(key)
        if head is not None and (head.upload == upload.token or head.version.etag == sent[0]):
            return head.version
        # Someone wrote the key between our request and the HEAD (milliseconds): our version
        # is still the one we stored; the next listing shows the file as stale, as it is.
        log.warning("put %r: stored %s, but S3 already holds %s", key, sent[0],
                    head.version.etag if head else "nothing")
        return ObjectVersion(key, sent[0], upload.size, time.time(), vid)

    def put(self, key: str, fd: int, size: int, *, base: str | None, mtime: float, mode: int,
            progress: Callable[[int], None] | None = None) -> ObjectVersion:
        """:meth:`begin_upload` then :meth:`send`, with no one to tell in between."""
        return self.send(self.begin_upload(key, size, base=base, mtime=mtime, mode=mode), fd,
                         progress=progress)

    def _put_single(self, upload: Upload, fd: int, cond: dict[str, str],
                    check: Callable[[], None] | None,
                    sent: list[str]) -> tuple[str, str | None]:
        key = upload.key
        body = _pread_exactly(fd, 0, upload.size)
        digest = hashlib.md5(body, usedforsecurity=False).digest()
        etag = f'"{digest.hex()}"'
        sent.append(etag)
        if check is not None:
            check()
        kw: dict[str, Any] = {"Bucket": self.cfg.bucket, "Key": key, "Body": body,
                              "ContentMD5": _b64(digest), "Metadata": upload.meta(),
                              **self._condition(cond)}

        def put() -> dict[str, Any]:
            return self._call(f"put {key!r}", lambda: _digest_checked(
                lambda: self._upload_client.put_object(**kw)))

        try:
            resp = put()
        except ObjectChanged:
            base = cond.get("IfMatch")
            if base is None or self._unquoted_if_match:
                raise
            # Ceph RGW 16 compares If-Match on PUT with the unquoted ETag, so a quoted one
            # (RFC 9110's form, which AWS and moto take) fails even when it holds.  If S3
            # still holds the base, the condition held: say it RGW's way from now on.
            head = self.head_key(key)
            if head is None or head.version.etag != base:
                raise
            log.info("the server refuses a quoted If-Match on PUT; sending ETags unquoted")
            self._unquoted_if_match = True
            kw.update(self._condition(cond))
            resp = put()
        return _answered_etag(key, resp, etag), _vid(resp)

    def _put_multipart(self, upload: Upload, fd: int, cond: dict[str, str],
                       check: Callable[[], None] | None,
                       progress: Callable[[int], None] | None,
                       sent: list[str]) -> tuple[str, str | None]:
        bucket, key, upload_id = self.cfg.bucket, upload.key, upload.upload_id
        assert upload_id is not None, "begin_upload creates the multipart upload"
        n, part_size = upload.parts, upload.part_size
        etags: list[str] = [""] * n
        md5s: list[bytes] = [b""] * n
        buffers = threading.local()

        def send(i: int) -> None:
            start = i * part_size
            length = min(part_size, upload.size - start)
            # One buffer per thread, reused for its parts: a fresh 16 MiB bytes per part
            # costs its allocation and page faults again (measured: archive_probe.py).
            buf: bytearray | None = getattr(buffers, "buf", None)
            if buf is None or len(buf) != length:
                buf = buffers.buf = bytearray(length)
            _pread_into(fd, start, memoryview(buf))
            # The one hash of these bytes, of exactly the buffer sent: Content-MD5 makes the
            # server refuse anything else (AWS, RGW), and the parts' MD5s make the ETag the
            # object must have.  hashlib releases the GIL: parts hash in parallel.
            digest = hashlib.md5(buf, usedforsecurity=False).digest()
            md5s[i] = digest
            resp = self._call(f"put part {i + 1}/{n} of {key!r}", lambda: _digest_checked(
                lambda: self._upload_client.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=i + 1, Body=buf,
                    ContentMD5=_b64(digest))))
            etags[i] = resp["ETag"]
            if progress is not None:
                progress(length)

        try:
            pool = ThreadPoolExecutor(min(self.part_threads, n), thread_name_prefix="part")
            try:
                for future in [pool.submit(send, i) for i in range(n)]:
                    future.result()
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
            sent.append(f'"{hashlib.md5(b"".join(md5s), usedforsecurity=False).hexdigest()}-{n}"')
            if check is not None:
                check()  # every byte read: unchanged, or nothing becomes visible
            # moto and Ceph RGW < 20.2.1 ignore the condition on CompleteMultipartUpload: look
            # ourselves, right before completing (the window left is this HEAD's round trip).
            self._check_condition(key, upload.base)
            parts = {"Parts": [{"PartNumber": i + 1, "ETag": e} for i, e in enumerate(etags)]}
            resp = self._call(f"complete upload {key!r}",
                              lambda: self._client.complete_multipart_upload(
                                  Bucket=bucket, Key=key, UploadId=upload_id,
                                  MultipartUpload=parts, **self._condition(cond)))
        except BaseException:
            # Parts of an unfinished upload are stored (and billed) until aborted; an abort
            # after a complete that did land is a harmless NoSuchUpload.
            try:
                self._client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                log.info("abort upload %r: %s", key, exc)
            raise
        # Ceph answers CompleteMultipartUpload with an empty ETag: send() HEADs then.
        return _answered_etag(key, resp, sent[0]), _vid(resp)

    def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort a multipart upload a crash left unfinished (its parts are stored and billed
        until then).  One that is gone already (completed or aborted) is fine."""
        with contextlib.suppress(ObjectMissing):  # NoSuchUpload: nothing left to abort
            self._call(f"abort upload {key!r}", lambda: self._client.abort_multipart_upload(
                Bucket=self.cfg.bucket, Key=key, UploadId=upload_id))

    def _condition(self, cond: dict[str, str]) -> dict[str, str]:
        if self._unquoted_if_match and "IfMatch" in cond:
            return {"IfMatch": cond["IfMatch"].strip('"')}
        return cond

    def _check_condition(self, key: str, base: str | None) -> None:
        """What a conditional request would check, by HEAD, for servers that do not."""
        head = self.head_key(key)
        if base is None and head is not None:
            raise ObjectChanged(f"{key!r}: created meanwhile ({head.version.etag})")
        if base is not None and head is None:
            raise ObjectMissing(f"{key!r}: gone from S3 (was {base})")
        if base is not None and head is not None and head.version.etag != base:
            raise ObjectChanged(f"{key!r}: S3 holds {head.version.etag}, not {base}")

    def delete(self, version: ObjectVersion) -> bool:
        """Delete ``version.key`` if S3 still holds ``version.etag`` there; False if nothing was
        there.  HEAD first (a server that ignores ``If-Match`` on DELETE would remove whatever
        is there), then DELETE with ``If-Match`` (moto and AWS honour it).  In a versioned
        bucket this adds a delete marker: older versions stay recoverable."""
        try:
            self._check_condition(version.key, version.etag)
        except ObjectMissing:
            return False
        try:
            cond = self._condition({"IfMatch": version.etag})
            self._call(f"delete {version.key!r}", lambda: self._client.delete_object(
                Bucket=self.cfg.bucket, Key=version.key, **cond))
        except ObjectMissing:
            return False
        return True

    # -- retry and classification ---------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        attempts = max(self.cfg.attempts, 1)
        fn = self._tallied(what, fn)
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

    def _tallied(self, what: str, fn: Callable[[], T]) -> Callable[[], T]:
        """``fn`` counting each attempt in ``by_kind`` (the kind is ``what``'s leading words:
        "get", "put part", "complete upload", ...)."""
        kind = " ".join(itertools.takewhile(str.isalpha, what.split()))

        def attempt() -> T:
            started = time.monotonic()
            try:
                out = fn()
            except BaseException as exc:
                self._tally(kind, _outcome(exc), time.monotonic() - started)
                raise
            self._tally(kind, "2xx", time.monotonic() - started)
            return out

        return attempt

    def _tally(self, kind: str, outcome: str, seconds: float) -> None:
        with self._lock:
            row = self.by_kind.setdefault(kind, {})
            row[outcome] = row.get(outcome, 0) + 1
            hist = self.latency.get(kind)
            if hist is None:
                hist = self.latency[kind] = Histogram()
            hist.observe(seconds)

    @staticmethod
    def _classify(what: str, exc: botocore.exceptions.ClientError) -> HsmError | _Retryable:
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return classify_status(what, status, code)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"s3_requests": self.requests, "s3_bytes": self.bytes,
                    "s3_retries": self.retries,
                    "s3_requests_by": {k: dict(v) for k, v in self.by_kind.items()},
                    "s3_seconds_by": {k: h.as_dict() for k, h in self.latency.items()}}


def _outcome(exc: BaseException) -> str:
    """What one failed attempt counts as in ``by_kind``: the HTTP status of an error
    response, else the cause of the failure."""
    match exc:
        case botocore.exceptions.ClientError():
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return str(status or "error")
        case _HttpError():
            return str(exc.status)
        case _Retryable():
            return exc.final.cause
        case HsmError():
            return exc.cause
        case (urllib3.exceptions.ConnectTimeoutError | urllib3.exceptions.ReadTimeoutError
              | botocore.exceptions.ConnectTimeoutError | botocore.exceptions.ReadTimeoutError):
            return "timeout"
        case _:
            return "unreachable"


def classify_status(what: str, status: int, code: str) -> HsmError | _Retryable:
    """An S3 error response (HTTP status, XML ``Code``) as a domain error, or as retryable."""
    final = _classify_status(what, status, code)
    _status(final.final if isinstance(final, _Retryable) else final, status)
    return final


def _classify_status(what: str, status: int, code: str) -> HsmError | _Retryable:
    detail = f"{what}: HTTP {status} {code}"
    if status == 412 or code == "PreconditionFailed":
        return ObjectChanged(f"{detail}: object changed since its stub was made")
    if status == 404 or code in {"NoSuchKey", "NotFound", "NoSuchVersion"}:
        return ObjectMissing(f"{detail}: object gone")
    if status == 416 or code == "InvalidRange":
        return ObjectChanged(f"{detail}: object shrank")
    if status == 403 or code in {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
        return AccessDenied(detail)
    if code in {"ConditionalRequestConflict", "OperationAborted"}:
        # AWS: a concurrent conditional write or operation on the key is in progress; the
        # condition is decided once it ends, so ask again.
        return _Retryable(BackendUnavailable(detail))
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
            _check_range(what, version, start, len(buf), resp.status,
                         resp.headers.get("Content-Range"))
            length = resp.headers.get("Content-Length")
            if length is not None and int(length) != len(buf):
                raise _Retryable(_status(
                    ShortBody(f"{what}: {resp.status} with {length} bytes"), resp.status))
            return _take_body(what, version, resp.headers.get("ETag"), len(buf), resp.status,
                              lambda: _read_urllib3_into(resp, buf))
        finally:
            _finish(resp)


def _take_body(what: str, version: ObjectVersion, etag: str | None, want: int, status: int,
               read: Callable[[], int]) -> int:
    """The rules for a GET's answer, whichever path sent it: the ETag is the stub's, and the
    body is exactly ``want`` bytes.  A timeout mid-body is throttling; a body cut off
    mid-stream is a short body (DESIGN §5: EIO, not EAGAIN).  Both are worth another try.
    Each error carries the answer's ``status`` (the log line names it)."""
    if etag and etag != version.etag:
        raise _status(ObjectChanged(f"{what}: ETag {etag} != {version.etag}"), status)
    try:
        got = read()
    except botocore.exceptions.ReadTimeoutError as exc:
        raise _Retryable(_status(Throttled(f"{what}: body read timed out: {exc}"),
                                 status)) from exc
    except (botocore.exceptions.ResponseStreamingError, ConnectionError) as exc:
        raise _Retryable(_status(ShortBody(f"{what}: body read failed: {exc}"),
                                 status)) from exc
    if got != want:
        raise _Retryable(_status(ShortBody(f"{what}: got {got} bytes"), status))
    return got


def _status(exc: HsmError, status: int | None) -> HsmError:
    """``exc`` carrying the HTTP status of the answer it came from."""
    exc.status = status or None
    return exc


def _check_range(what: str, version: ObjectVersion, start: int, want: int, status: int,
                 content_range: str | None) -> None:
    """A ranged GET's answer must be that range of that object: ``206`` with
    ``Content-Range: bytes START-END/SIZE`` naming exactly the bytes asked for and the
    listed size.  A total that is not the listed size is another object than the stub's
    (a listing that lied, or a new version): :class:`ObjectChanged`.  Anything else is
    :class:`BadResponse` (its bytes would land at the wrong offsets).  A ``200`` (the whole
    object: a server that ignored Range) is taken only when the range asked for is the whole
    object, where the two are the same bytes."""
    if status == 200 and start == 0 and want == version.size:
        return
    if status != 206:
        raise _status(BadResponse(f"{what}: HTTP {status} to a ranged GET"), status)
    unit, _, spec = (content_range or "").partition(" ")
    first, _, rest = spec.partition("-")
    last, _, total = rest.partition("/")
    try:
        span = (int(first), int(last))
        size = None if total == "*" else int(total)
    except ValueError:
        raise _status(BadResponse(f"{what}: Content-Range {content_range!r}"),
                      status) from None
    if size is not None and size != version.size:
        raise _status(ObjectChanged(f"{what}: Content-Range {content_range!r}: the object "
                                    f"is {size} bytes, not the listed {version.size}"), status)
    if unit != "bytes" or span != (start, start + want - 1):
        raise _status(BadResponse(f"{what}: Content-Range {content_range!r} is not the "
                                  f"range asked for"), status)


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


def _listed(page: dict[str, Any]) -> list[ObjectVersion]:
    """The objects of one ListObjectsV2 answer, keys as stored in S3."""
    return [ObjectVersion(key=obj["Key"], etag=obj["ETag"], size=int(obj["Size"]),
                          mtime=obj["LastModified"].timestamp())
            for obj in page.get("Contents", [])]


def _version_of(key: str, resp: dict[str, Any]) -> ObjectVersion:
    """The version a HEAD (or GET) answer describes."""
    modified = resp.get("LastModified")
    return ObjectVersion(key, resp.get("ETag", ""), int(resp.get("ContentLength", 0)),
                         modified.timestamp() if modified is not None else 0.0, _vid(resp))


#: The permission bits an object's ``x-amz-meta-mode`` may give a file: never setuid,
#: setgid or sticky (an object store is not a place a set-id program may come from).
MODE_BITS = 0o777


def _mode_of(key: str, resp: dict[str, Any]) -> int | None:
    """s3fs's ``x-amz-meta-mode`` (decimal ``st_mode``) without set-id bits, or None (the
    file gets ``file_mode``) when it is not a plain decimal number of a regular file's mode.
    Set-id and sticky bits are dropped, with one warning: metadata is the uploader's claim,
    not ours to honour."""
    raw = resp.get("Metadata", {}).get("mode")
    if raw is None:
        return None
    text = raw.strip()
    # ASCII digits, and few: str.isdigit() takes "²" too, and int() refuses more than 4,300
    # digits; either would raise out of the HEAD and fail every start over this object.
    if not (text.isascii() and text.isdigit() and len(text) <= 10) or int(text) >= 1 << 32 \
            or (int(text) & 0o170000 not in (0, 0o100000)):
        log.warning("ignoring malformed x-amz-meta-mode %r on %r", raw[:64], key)
        return None
    mode = int(text)
    if mode & ~MODE_BITS & 0o7777:
        log.warning("dropping setuid/setgid/sticky bits of x-amz-meta-mode %o on %r",
                    mode & 0o7777, key)
    return mode & ~0o7777 | mode & MODE_BITS  # st_mode still: the type bits stay


def _vid(resp: dict[str, Any]) -> str | None:
    vid = resp.get("VersionId")
    return vid if vid and vid != "null" else None


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _digest_checked(fn: Callable[[], T]) -> T:
    """A server that checks ``Content-MD5`` refuses a body that is not what was hashed
    (BadDigest): the file changed under us, which no retry cures."""
    try:
        return fn()
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in {"BadDigest", "InvalidDigest"}:
            raise SourceChanged(str(exc)) from exc
        raise


def _new_token() -> str:
    return secrets.token_hex(16)


def _answered_etag(key: str, resp: dict[str, Any], computed: str) -> str:
    """The ETag the server answered for our write if it is the one computed from the bytes
    sent; '' if it answered none (Ceph's CompleteMultipartUpload) or another (an ETag that
    is not an MD5: SSE-KMS), so that the caller asks HEAD."""
    answered = resp.get("ETag") or ""
    if answered and answered != computed:
        log.warning("put %r: the server calls it %s, the bytes sent hash to %s", key,
                    answered, computed)
        return ""
    return answered


def etag_of(fd: int, size: int, part_size: int) -> str:
    """The ETag S3 gives ``size`` bytes of ``fd`` uploaded in ``part_size`` parts (0: one
    PUT): the body's MD5, or the MD5 of the parts' MD5s and ``-N``.  One read of the file:
    the archive's crash recovery, which must know whether S3 holds exactly these bytes.
    :class:`SourceChanged` if the file is shorter than ``size`` now."""
    if not part_size:
        h = hashlib.md5(usedforsecurity=False)
        for at in range(0, size, HASH_READ):
            h.update(_pread_exactly(fd, at, min(HASH_READ, size - at)))
        return f'"{h.hexdigest()}"'
    digests = []
    for start in range(0, size, part_size):
        h = hashlib.md5(usedforsecurity=False)
        stop = min(start + part_size, size)
        for at in range(start, stop, HASH_READ):
            h.update(_pread_exactly(fd, at, min(HASH_READ, stop - at)))
        digests.append(h.digest())
    whole = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
    return f'"{whole}-{len(digests)}"'


def _pread_into(fd: int, start: int, buf: memoryview) -> None:
    """Fill ``buf`` from ``fd`` at ``start``, or :class:`SourceChanged` if the file is shorter
    now (it changed under us)."""
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], start + got)
        if not n:
            raise SourceChanged(f"file shorter than {start + len(buf)} bytes now")
        got += n


def _pread_exactly(fd: int, start: int, length: int) -> bytes:
    """``length`` bytes at ``start``, or :class:`SourceChanged` if the file is shorter now."""
    parts = []
    got = 0
    while got < length:
        chunk = os.pread(fd, length - got, start + got)
        if not chunk:
            raise SourceChanged(f"file shorter than {start + length} bytes now")
        parts.append(chunk)
        got += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)
