"""Prometheus metrics: the daemon's ``hsmfs stats`` counters as Prometheus text, served over
HTTP (``-o metrics=HOST:PORT``) and printed by ``hsmfs stats --prometheus``.

Owns the mapping from the stats dict (what the control socket answers ``{"cmd": "stats"}``) to
metric names, types and help, and a minimal HTTP/1.0 responder for ``GET /metrics``.  Must not
count anything itself: one set of counters, so ``hsmfs stats`` and a scrape never disagree.
No dependency on ``prometheus_client`` (the text format is a few lines); the tests parse what
this writes with that library's parser.
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from .config import parse_address
from .errors import HsmError, to_errno

log = logging.getLogger(__name__)

PREFIX = "hsmfs_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: A scrape request is a few hundred bytes; anything larger is not a scraper.
MAX_REQUEST = 8192
#: A client that sends no complete request line in this long is dropped: one slow client must
#: not keep a connection (and a task) open for ever.
REQUEST_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Metric:
    """One stats key as a metric.  ``label``: the stats value is a dict, one sample per key
    with that label (``"a/b"``: a dict of dicts, two labels); ``scale``: multiply (ms →
    seconds)."""

    key: str
    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    help: str
    label: str | None = None
    scale: float = 1.0


C, G, H = "counter", "gauge", "histogram"

#: Top-level keys of the core's stats (cache, fetch engine, S3 backend, refresh).
CORE: tuple[Metric, ...] = (
    Metric("uptime_s", "uptime_seconds", G, "Seconds since the daemon started serving."),
    Metric("daemon_cpu_s", "cpu_seconds_total", C, "CPU time of the serving process."),
    Metric("s3_requests", "s3_requests_total", C, "HTTP requests sent to S3 (every kind, "
           "retries included)."),
    Metric("s3_bytes", "s3_received_bytes_total", C, "Body bytes received from S3."),
    Metric("s3_retries", "s3_retries_total", C, "S3 requests retried after a transient "
           "failure."),
    Metric("s3_requests_by", "s3_attempts_total", C, "S3 requests by kind and outcome (2xx, "
           "the HTTP status of an error, or timeout/unreachable/short_body).",
           label="kind/status"),
    Metric("s3_seconds_by", "s3_request_seconds", H, "Seconds per S3 request attempt by kind "
           "(a GET's includes receiving its body).", label="kind"),
    Metric("cache_s3_gets", "fetch_gets_total", C, "Ranged GETs the cache issued."),
    Metric("fetched_bytes", "fetched_bytes_total", C, "Bytes fetched from S3 into stubs."),
    Metric("chunks_fetched", "fetched_chunks_total", C, "Chunks fetched from S3."),
    Metric("served_bytes", "served_bytes_total", C, "Bytes the doors served to programs."),
    Metric("hits", "hits_total", C, "Accesses whose bytes were already resident."),
    Metric("misses", "misses_total", C, "Accesses that waited for S3."),
    Metric("coalesced_waits", "coalesced_waits_total", C, "Chunks a reader waited for instead "
           "of fetching them again."),
    Metric("prefetched_bytes", "prefetched_bytes_total", C, "Bytes fetched by read-ahead."),
    Metric("sibling_prefetches", "sibling_prefetches_total", C, "Files fetched by directory "
           "read-ahead."),
    Metric("errors", "fetch_errors_total", C, "Failed fetches by cause, with the errno "
           "both doors answer for it.", label="cause"),
    Metric("stubs", "files", G, "Files the cache vouches for."),
    Metric("resident_files", "resident_files", G, "Files with every owed byte local."),
    Metric("resident_bytes", "resident_bytes", G, "Bytes of S3 objects held locally."),
    Metric("dirty_files", "dirty_files", G, "Files with local changes not yet archived."),
    Metric("stale_files", "stale_files", G, "Files whose object changed in S3 (clean copy)."),
    Metric("conflict_files", "conflict_files", G, "Files with local changes whose object "
           "changed in S3."),
    Metric("superseded_files", "superseded_files", G, "Files replaced or removed while open."),
    Metric("inflight_chunks", "inflight_chunks", G, "Chunks being fetched right now."),
    Metric("pinned_files", "pinned_files", G, "Files pinned local (hsmfs pin)."),
    Metric("releases", "releases_total", C, "Files punched back to stubs (hsmfs release)."),
    Metric("released_bytes", "released_bytes_total", C, "Bytes freed by releases."),
    Metric("refreshes", "refreshes_total", C, "Listings that made the tree follow S3."),
    Metric("refresh_failures", "refresh_failures_total", C, "Listings that failed."),
    Metric("last_refresh_s", "last_refresh_duration_seconds", G, "Duration of the last "
           "refresh."),
)

#: Keys of ``stats["kernel"]`` (the kernel door's worker).
KERNEL: tuple[Metric, ...] = (
    Metric("events", "kernel_events_total", C, "fanotify events the kernel door answered, by "
           "kind.", label="kind"),
    Metric("denied", "kernel_denied_total", C, "Events answered with an errno, by errno.",
           label="errno"),
    Metric("resident_answers", "kernel_resident_answers_total", C, "Events for bytes already "
           "resident, answered in the receive loop."),
    Metric("open_fills", "kernel_open_fills_total", C, "Files filled whole at open "
           "(open_fill)."),
    Metric("writes", "kernel_writes_total", C, "Writes seen before they landed."),
    Metric("truncates", "kernel_truncates_total", C, "Truncates seen before they landed."),
    Metric("notices", "kernel_notices_total", C, "Non-permission notices (FAN_MODIFY, ...)."),
    Metric("marked_dirty", "kernel_marked_dirty_total", C, "Files recorded dirty by the "
           "kernel door."),
    Metric("not_ours", "kernel_not_ours_total", C, "Events for files hsmfs does not vouch "
           "for."),
    Metric("mean_event_ms", "kernel_event_mean_seconds", G, "Mean time to answer an event.",
           scale=1e-3),
    Metric("event_seconds", "kernel_event_seconds", H, "Seconds from the worker receiving an "
           "event to its answer (the holder's hops not included)."),
    Metric("name_events", "kernel_name_events_total", C, "Directory name events."),
    Metric("watched_dirs", "kernel_watched_dirs", G, "Directories watched for names."),
)

#: Keys of ``stats["fuse"]``.
FUSE: tuple[Metric, ...] = (
    Metric("fuse_requests", "fuse_requests_total", C, "FUSE requests by operation.",
           label="op"),
    Metric("open_files", "fuse_open_files", G, "Open FUSE file handles."),
)

#: Keys of ``stats["writeback"]`` (``-o writeback``).
WRITEBACK: tuple[Metric, ...] = (
    Metric("uploads", "writeback_uploads_total", C, "Files uploaded by writeback."),
    Metric("conflicts", "writeback_conflicts_total", C, "Writeback uploads refused by S3's "
           "condition (conflict)."),
    Metric("failures", "writeback_failures_total", C, "Writeback uploads that failed."),
    Metric("pending", "writeback_pending_files", G, "Files waiting for their idle period."),
)

#: Keys of ``stats["lazy"]`` (``-o lazy``: :mod:`hsmfs.lazy`).
LAZY: tuple[Metric, ...] = (
    Metric("dirs_listed", "lazy_dirs_listed_total", C, "Directories listed from S3 on their "
           "first lookup."),
    Metric("objects", "lazy_objects_listed_total", C, "Objects those listings named."),
    Metric("created", "lazy_stubs_created_total", C, "Stubs made by those listings."),
    Metric("failures", "lazy_listing_failures_total", C, "Directory listings that failed (the "
           "lookup failed)."),
    Metric("seconds", "lazy_listing_seconds_total", C, "Time spent listing directories."),
)

SECTIONS: tuple[tuple[str | None, tuple[Metric, ...]], ...] = (
    (None, CORE), ("kernel", KERNEL), ("fuse", FUSE), ("writeback", WRITEBACK), ("lazy", LAZY))


def resident_bytes(stubs: Iterable[Any]) -> int:
    """Bytes of S3 objects held locally: each file's resident range below ``owed`` (the
    ``Stub`` fields of :mod:`hsmfs.state`; a file not yet loaded counts nothing)."""
    return sum(s.resident_bytes for s in stubs)


def errno_of_cause(cause: str) -> str:
    """The errno name the doors answer for a ``cause_of`` word (errors.to_errno, the one
    table), so errors can be summed by errno across causes."""

    def classes(base: type[HsmError]) -> Iterable[type[HsmError]]:
        for sub in base.__subclasses__():
            yield sub
            yield from classes(sub)

    for cls in (HsmError, *classes(HsmError)):
        if cls.cause == cause:
            return errno.errorcode[to_errno(cls(cause))]
    code = getattr(errno, cause.upper(), None)  # a local OSError: its errno name, lowercased
    return errno.errorcode[to_errno(OSError(code, cause))] if code else "EIO"


def _value(v: object) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    f = float(v)  # type: ignore[arg-type]
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    return repr(int(f)) if f.is_integer() and abs(f) < 2**53 else repr(f)


def _escape(label: str) -> str:
    return label.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _flatten(v: Mapping[str, Any], depth: int) -> list[tuple[tuple[str, ...], object]]:
    """A dict (of dicts, ``depth`` levels more) as (keys, value) pairs, sorted."""
    out: list[tuple[tuple[str, ...], object]] = []
    for k, x in sorted(v.items()):
        if depth and isinstance(x, Mapping):
            out += [((str(k), *keys), y) for keys, y in _flatten(x, depth - 1)]
        elif not depth:
            out.append(((str(k),), x))
    return out


def _labels(m: Metric, keys: tuple[str, ...]) -> str:
    assert m.label is not None
    pairs = list(zip(m.label.split("/"), keys, strict=True))
    if m.label == "cause":
        pairs.append(("errno", errno_of_cause(keys[0])))
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _numeric(v: object) -> bool:
    return isinstance(v, int | float) and not (isinstance(v, float) and math.isnan(v))


def prometheus_text(stats: Mapping[str, Any]) -> str:
    """The stats dict as Prometheus text exposition format 0.0.4."""
    lines: list[str] = []
    for section, metrics in SECTIONS:
        data = stats if section is None else stats.get(section)
        if not isinstance(data, Mapping):
            continue
        for m in metrics:
            if m.key not in data:
                continue
            v = data[m.key]
            name = PREFIX + m.name
            if m.kind == H:
                lines += _histogram(m, name, v)
                continue
            if m.label is not None:
                if not isinstance(v, Mapping):
                    continue
                samples = [(_labels(m, keys), x) for keys, x in _flatten(v, m.label.count("/"))
                           if _numeric(x)]
            elif _numeric(v):
                samples = [("", v)]
            else:
                continue
            lines.append(f"# HELP {name} {m.help}")
            lines.append(f"# TYPE {name} {m.kind}")
            lines += [f"{name}{labels} {_value(x * m.scale)}" for labels, x in samples]
    return "\n".join(lines) + "\n"


def _histogram(m: Metric, name: str, v: object) -> list[str]:
    """A histogram dict (:meth:`hsmfs.histogram.Histogram.as_dict`), or with ``label`` a dict
    of them, as ``_bucket``/``_sum``/``_count`` samples."""
    if not isinstance(v, Mapping):
        return []
    series = ([((), v)] if m.label is None else
              [((f'{m.label}="{_escape(str(k))}"',), h) for k, h in sorted(v.items())])
    out = [f"# HELP {name} {m.help}", f"# TYPE {name} histogram"]
    for labels, h in series:
        if not isinstance(h, Mapping):
            continue
        for le, n in h["buckets"].items():
            out.append(f'{name}_bucket{{{",".join([*labels, f"le={_q(le)}"])}}} {_value(n)}')
        tail = "{" + ",".join(labels) + "}" if labels else ""
        out.append(f"{name}_sum{tail} {_value(h['sum'])}")
        out.append(f"{name}_count{tail} {_value(h['count'])}")
    return out


def _q(text: str) -> str:
    return f'"{_escape(text)}"'


def _response(status: str, body: bytes, content_type: str = "text/plain") -> bytes:
    head = (f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


async def _answer(stream: trio.SocketStream,
                  stats: Callable[[], Awaitable[Mapping[str, Any]]]) -> None:
    try:
        buf = b""
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            while b"\r\n\r\n" not in buf and b"\n\n" not in buf and len(buf) < MAX_REQUEST:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                buf += chunk
        method, _, rest = buf.partition(b" ")
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            reply = _response("405 Method Not Allowed", b"GET /metrics\n")
        elif path in (b"/metrics", b"/"):
            body = prometheus_text(await stats()).encode()
            reply = _response("200 OK", b"" if method == b"HEAD" else body, CONTENT_TYPE)
        else:
            reply = _response("404 Not Found", b"GET /metrics\n")
        await stream.send_all(reply)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.debug("metrics: client went away: %s", exc)  # a scraper's problem, not ours
    finally:
        await stream.aclose()


async def serve(address: str, stats: Callable[[], Awaitable[Mapping[str, Any]]], *,
                task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
                ) -> None:
    """Serve ``GET /metrics`` on ``address`` until cancelled; ``started()`` once listening,
    with the (host, port) bound (port 0 picks one)."""
    host, port = parse_address(address)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[:2]
    log.info("metrics: http://%s:%d/metrics", host, bound[1])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, lambda s: _answer(s, stats), listeners)
        task_status.started((host, bound[1]))
