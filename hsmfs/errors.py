"""Domain errors and the one errno table (DESIGN §5).

The backend raises these; the cache lets them propagate; each door turns them into an errno with
:func:`to_errno` and nothing else, so the same cause reaches an application as the same errno
through FUSE and through fanotify.  Every errno returned here is one that ``FAN_DENY_ERRNO``
accepts on this kernel (KERNEL_FACTS §4): a door never has to translate again.
"""

from __future__ import annotations

import errno

#: The errnos a pre-content group may answer with (KERNEL_FACTS §4).  Anything else is refused by
#: the kernel with EINVAL and the event stays pending, so the table below never leaves this set.
DENY_ERRNOS = frozenset(
    {errno.EPERM, errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETXTBSY, errno.ENOSPC, errno.EDQUOT}
)


class HsmError(Exception):
    """Base of every failure the core reports on a file's behalf.

    ``cause`` is a short stable word used for counters and logs (``errors_by_cause``).
    """

    cause = "error"
    #: The HTTP status of the S3 answer that caused it (set by hsmfs.backend_s3: 503, 404,
    #: 206 for a body cut short...), None when no answer came (timeout, refused, reset before
    #: the status line).  The failure's log line names it (DESIGN §5).
    status: int | None = None


class ObjectMissing(HsmError):
    """The object is gone from S3 (404)."""

    cause = "missing"


class ObjectChanged(HsmError):
    """The object in S3 is no longer the version this stub was made from (412, ETag or size)."""

    cause = "changed"


class Superseded(HsmError):
    """The file's path no longer leads to this copy (replaced, removed or renamed while a
    program held it) and the caller gave no fd to fill it through."""

    cause = "superseded"


class AccessDenied(HsmError):
    """S3 refused the credentials (403)."""

    cause = "denied"


class BackendUnavailable(HsmError):
    """S3 unreachable or failing (connection refused, 5xx) after every retry."""

    cause = "unavailable"


class Throttled(HsmError):
    """S3 throttled us (503 SlowDown) or timed out after every retry: worth retrying later."""

    cause = "throttled"


class ShortBody(HsmError):
    """S3 returned fewer (or more) bytes than the range asked for."""

    cause = "short_body"


class BadResponse(HsmError):
    """S3 answered something other than what was asked: a Content-Range that is not the
    requested range, a 200 (the whole object) to a ranged GET, a 2xx other than 206.  Its
    bytes are never used."""

    cause = "bad_response"


class CacheFull(HsmError):
    """The local cache disk is full while populating."""

    cause = "cache_full"


class QuotaExceeded(HsmError):
    """A configured remote quota refuses growth."""

    cause = "quota"


class FileBusy(HsmError):
    """The file is being released (holes punched): readers must not see it half-way."""

    cause = "busy"


class TextBusy(HsmError):
    """An executable cannot be populated or written while it runs."""

    cause = "text_busy"


def to_errno(exc: BaseException) -> int:
    """Map any failure to the errno an application sees, from :data:`DENY_ERRNOS` only."""
    match exc:
        case (ObjectMissing() | ObjectChanged() | Superseded() | BackendUnavailable()
              | ShortBody() | BadResponse() | Throttled()):
            # Unaware programs treat any read error as fatal; EIO is the honest "data not
            # available" and what a failing disk would give them.  Throttling too, though
            # DESIGN §5 gave it EAGAIN: the fault matrix showed Python's io take EAGAIN from
            # a regular file for "non-blocking, no data yet" and return None, or the bytes
            # read so far as if they were the whole file, raising nothing (a silent short
            # read).  HSM-aware programs tell throttling apart by user.hsm.error's cause.
            return errno.EIO
        case AccessDenied():
            return errno.EPERM
        case CacheFull():
            return errno.ENOSPC
        case QuotaExceeded():
            return errno.EDQUOT
        case FileBusy():
            return errno.EBUSY
        case TextBusy():
            return errno.ETXTBSY
        case OSError() if exc.errno in DENY_ERRNOS:
            # A local ENOSPC/EDQUOT while writing the backing file keeps its meaning.
            return exc.errno
        case _:
            # Anything unexpected is a bug or a local I/O failure: fail closed with EIO.
            return errno.EIO


def status_of(exc: BaseException) -> int | None:
    """The HTTP status behind a failure: :attr:`HsmError.status`, or a ``status`` on an
    exception it was raised from (the backend's lean-path error), or botocore's response
    metadata.  None for failures that had no answer (refused, timed out, local)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        status = getattr(cur, "status", None)
        if isinstance(status, int) and status >= 100:
            return status
        response = getattr(cur, "response", None)
        if isinstance(response, dict):
            code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(code, int):
                return code
        cur = cur.__cause__ or cur.__context__
    return None


def cause_of(exc: BaseException) -> str:
    """The counter key for a failure."""
    if isinstance(exc, HsmError):
        return exc.cause
    if isinstance(exc, OSError):
        return errno.errorcode.get(exc.errno or 0, "oserror").lower()
    return type(exc).__name__
