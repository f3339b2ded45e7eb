"""Logging set-up, and the one line a user reads when hsmfs cannot start.

Shared by the command line, the holder process and the worker (which logs to the same file as
the holder that started it).  Must not import trio, boto3 or any door: the holder imports it.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
import time

from .errors import (
    AccessDenied,
    BackendUnavailable,
    HsmError,
    ObjectMissing,
    Throttled,
    cause_of,
    status_of,
    to_errno,
)

#: Libraries whose INFO lines are per request: only their warnings reach our log.
_NOISY = ("botocore", "boto3", "urllib3", "s3transfer")


#: The structured fields a log line may carry (``extra=``, e.g. :func:`failure_fields`); the
#: JSON format writes each one present.
FIELDS = ("event", "key", "range", "cause", "status", "errno")


class JsonFormatter(logging.Formatter):
    """``-o log_format=json``: one JSON object per line (time, level, logger, pid, message,
    the :data:`FIELDS` present, and a traceback as ``exc``), for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            if hasattr(record, name):
                line[name] = getattr(record, name)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


LOG_FORMATS = ("text", "json")


def setup_logging(debug: bool, log_file: str | None, log_format: str = "text") -> None:
    """Send every log line to ``log_file`` (appending), or to stderr when it is None, as text
    or as JSON lines."""
    handler: logging.Handler = (logging.FileHandler(log_file) if log_file
                                else logging.StreamHandler(sys.stderr))
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(
        "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def current_log_file() -> str | None:
    """The file the root logger writes to, if any (a worker is told to log there too)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return None


def logs_to_stderr() -> bool:
    """Whether log lines already reach stderr (then the failure line is not logged again)."""
    return any(type(h) is logging.StreamHandler
               and getattr(h, "stream", None) in (sys.stderr, sys.__stderr__)
               for h in logging.getLogger().handlers)


def root_cause(exc: BaseException) -> BaseException:
    """The failure to report out of what trio may have wrapped in exception groups: the first
    domain error if there is one, else the first leaf."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = list(_leaves(exc))
        for leaf in leaves:
            if isinstance(leaf, HsmError):
                return leaf
        return leaves[0] if leaves else exc
    return exc


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def describe_start_failure(exc: BaseException) -> str:
    """What went wrong at start, in words a user acts on, then the backend's own detail.

    The backend's classification is made for reads (a 404 is "object gone"); at start the same
    errors mean a wrong bucket, endpoint or credentials.
    """
    exc = root_cause(exc)
    text = str(exc) or type(exc).__name__
    if "NoSuchBucket" in text:
        return "bucket does not exist (NoSuchBucket)"
    match exc:
        case AccessDenied():
            return f"S3 refused the credentials or the access ({text})"
        case BackendUnavailable():
            return f"S3 endpoint unreachable or failing ({text})"
        case Throttled():
            return f"S3 timed out or throttled every attempt ({text})"
        case ObjectMissing():
            return f"not found in S3 ({text})"
        case OSError() if exc.filename:
            return f"{exc.strerror or text}: {exc.filename}"
        case _:
            return text


def failure_fields(event: str, key: str, start: int, stop: int,
                   exc: BaseException) -> dict[str, object]:
    """The structured fields of a failure line (``log.error(..., extra=...)``): what failed,
    on which object and range, why, and the errno the doors answer for it."""
    return {"event": event, "key": key, "range": [start, stop], "cause": cause_of(exc),
            "status": status_of(exc),
            "errno": errno.errorcode.get(to_errno(exc), str(to_errno(exc)))}


def http_status(exc: BaseException) -> str:
    """The failure's HTTP status as its log line shows it: ``HTTP 503``, or ``no HTTP
    answer`` (refused, reset or timed out before a status line; a local failure)."""
    status = status_of(exc)
    return f"HTTP {status}" if status else "no HTTP answer"


def start_failure_line(source: str, exc: BaseException) -> str:
    """The one line ``hsmfs mount``/``serve`` prints when the daemon cannot start."""
    return f"cannot serve {source}: {describe_start_failure(exc)}"
