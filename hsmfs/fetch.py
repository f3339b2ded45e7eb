"""The fetch engine: missing bytes of a stub become ranged GETs, landed in the backing file.

Owns flights (one ranged GET each), the table of flights in progress, coalescing, the GET
concurrency limit and the counters of fetching.  Knows nothing of states or doors: the façade
(:class:`hsmfs.cache.StubCache`) gives it a writable fd per stub and is told when bytes landed
or a fetch failed (:class:`FillHost`).

Invariants (see docs/design.md, "Fetch engine"):

* **Never claim a hole.**  A range enters a stub's :class:`RangeMap` only after ``pwrite`` wrote
  every byte of it, and a GET's length is verified before anything is written.
* **Each byte fetched once.**  ``_inflight`` maps ``(inode, chunk)`` to the flights carrying
  bytes of that chunk; a reader, through either door, waits for the flights that carry bytes it
  needs and fetches only what no flight carries.  No two flights carry the same missing byte.
  Between the check of ``_inflight`` and the registration of new flights there is no ``await``.
* **Remote bytes never overwrite resident ones**: a flight writes only the gaps that are still
  missing when its data arrives (resident bytes may hold an application's writes).
* **Pinned versions.**  Every fetch names the stub's ETag (the fetcher sends ``If-Match``).
* A flight never raises: its error is kept for every waiter.  All blocking calls run in worker
  threads.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import trio

from . import crashpoint
from .config import CacheConfig
from .errors import (
    BackendUnavailable,
    CacheFull,
    HsmError,
    ShortBody,
    Superseded,
    cause_of,
)
from .logsetup import failure_fields, http_status
from .ranges import RangeMap, Span
from .readahead import page_ceil, page_floor
from .state import Stub
from .stubfile import VersionLike, punch

log = logging.getLogger(__name__)

#: A failed flight of an object that started less than this many seconds after a failure of
#: that object for the same cause was logged is logged at DEBUG (still counted): one
#: application read through FUSE is two requests when it fails (the kernel's read-ahead, then
#: at once its synchronous retry of the page: each pays the whole retry budget), and a program
#: that retries in a loop would otherwise write a line per try.  DESIGN §5: logged once.
FAILURE_QUIET_S = 10.0


#: ``HSMFS_TRACE_FLIGHTS=FILE``: a line per landed flight (start, stop, took off, landed, on
#: trio's clock; read-ahead or not), for measuring how deep read-ahead keeps the GETs
#: (scripts/readahead_depth.py).  A diagnostic: unset, it costs one test per flight.
TRACE_FLIGHTS = os.environ.get("HSMFS_TRACE_FLIGHTS", "")


def _trace_flight(flight: Flight, prefetch: bool) -> None:
    with contextlib.suppress(OSError), open(TRACE_FLIGHTS, "a") as f:
        f.write(f"{flight.start} {flight.stop} {flight.started:.4f} "
                f"{trio.current_time():.4f} {int(prefetch)}\n")


class NoRoom(Exception):
    """A read-ahead flight gave way: under ``-o cache_size`` there was no room for it without
    going over the budget.  Not a failure: a reader waiting on it plans its own flight."""


class Fetcher(Protocol):
    """The seam to S3: the backend, or an in-memory fake in unit tests.  Blocking; the engine
    calls it from worker threads.  Must fill the whole buffer with bytes of that version or
    raise a :class:`~hsmfs.errors.HsmError`."""

    def fetch_into(self, version: VersionLike, start: int, buf: memoryview) -> int:
        """Fill ``buf`` with the bytes at ``start``; return how many came."""
        ...


class FillHost(Protocol):
    """What the engine needs of the façade."""

    def writable_fd(self, stub: Stub) -> int:
        """Worker thread: an O_RDWR fd of exactly this stub's inode, raising no events."""
        ...

    def filled(self, stub: Stub, completes: bool) -> None:
        """Worker thread: bytes landed (every owed byte is now local if ``completes``)."""
        ...

    def put_back_mtime(self, stub: Stub) -> None:
        """Worker thread: bytes were written to ``stub`` (or punched back after a failed
        write): put its mtime back where a clean copy keeps it."""
        ...

    async def make_room(self, stub: Stub, nbytes: int, speculative: bool) -> int:
        """Before ``nbytes`` land in ``stub``: room under the cache's budget (eviction).
        A ``speculative`` (read-ahead) flight gets :class:`NoRoom` rather than go over it."""
        ...

    def landed(self, nbytes: int, reserved: int, speculative: bool) -> None:
        """After the flight: ``nbytes`` written (0: it failed) of ``reserved``."""
        ...

    async def after_fill(self, stub: Stub) -> None:
        """Loop: the flight's range was added to ``stub.ranges``."""
        ...

    async def fetch_failed(self, stub: Stub, exc: BaseException) -> None:
        """Loop: a flight failed with ``exc`` (already logged and counted).  Must not raise."""
        ...


@dataclass
class Flight:
    """One ranged GET in progress; every reader of its chunks waits on ``done``."""

    start: int
    stop: int
    chunks: list[int]  # the chunk indices this flight owns in ``_inflight``
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None
    started: float = 0.0  # trio.current_time() when it took off


@dataclass
class Counters:
    s3_gets: int = 0  # ranged GETs the cache issued (retries are the backend's own count)
    fetched_bytes: int = 0
    chunks_fetched: int = 0
    served_bytes: int = 0  # reported by the doors
    hits: int = 0  # ensure() calls already resident
    misses: int = 0  # ensure() calls that had to wait for S3
    coalesced_waits: int = 0  # chunks a reader waited for instead of fetching again
    prefetched_bytes: int = 0
    sibling_prefetches: int = 0  # files fetched by directory read-ahead
    readahead_no_room: int = 0  # read-ahead flights that gave way to -o cache_size
    error_views_written: int = 0  # user.hsm.error xattrs written (StubCache.note_failure)
    error_views_skipped: int = 0  # ... not written: the shared rate limit (memory only)
    errors: Counter[str] = field(default_factory=Counter)


class FetchEngine:
    def __init__(self, cfg: CacheConfig, fetcher: Fetcher, host: FillHost,
                 counters: Counters) -> None:
        self.cfg = cfg
        self.fetcher = fetcher
        self.host = host
        self.counters = counters
        # (inode, chunk) -> the flights carrying bytes of that chunk right now.
        self._inflight: dict[tuple[int, int], list[Flight]] = {}
        self._s3_limiter = trio.CapacityLimiter(cfg.concurrency)
        self.nursery: trio.Nursery | None = None
        #: (key, cause) -> when its failure was last logged loud (see FAILURE_QUIET_S).
        self._logged: dict[tuple[str, str], float] = {}
        # One GET buffer per worker thread (at most ``concurrency`` x ``max_request`` bytes);
        # trio retires idle worker threads, and their buffers with them.
        self._buffers = threading.local()

    def _flights_of(self, stub: Stub) -> list[Flight]:
        seen: list[Flight] = []
        for (ino, _chunk), flights in self._inflight.items():
            if ino == stub.ino:
                seen.extend(f for f in flights if f not in seen)
        return seen

    def busy(self, stub: Stub) -> bool:
        """Whether any flight of this inode is in progress (also beyond a lowered ``owed``)."""
        return any(ino == stub.ino for ino, _chunk in self._inflight)

    async def wait_idle(self, stub: Stub) -> None:
        """Return once no flight of this inode is in progress (their errors are theirs)."""
        while flights := self._flights_of(stub):
            for f in flights:
                await f.done.wait()

    def flying_at_start(self, stub: Stub) -> bool:
        return (stub.ino, 0) in self._inflight

    def inflight_chunks(self) -> int:
        return len(self._inflight)

    async def fetch(self, stub: Stub, start: int, stop: int, *, wait: bool,
                    whole_chunks: bool = True, prefetch: bool | None = None) -> None:
        """Fetch what is missing of ``[start, stop)``.

        Per chunk, the missing bytes (the whole chunk's when ``whole_chunks``, else only the
        pages of the range) become one piece; adjacent pieces merge into GETs of at most
        ``max_request``.  A chunk already in flight is waited for, not fetched again.  With
        ``wait``, return once the range is resident or raise the failure it depended on.
        Another reader's flight may have covered other pages of a shared chunk than ours, so
        after waiting the plan is made again (a few rounds at most).
        """
        assert stub.ranges is not None
        if prefetch is None:
            prefetch = not wait
        for _ in range(4):
            own, waits = self._plan(stub, start, stop, wait, whole_chunks)
            if self.nursery is not None:
                # Own flights run in the cache's nursery, not the reader's: a reader
                # cancelled mid-fetch (FUSE interrupt, killed process) must not fail the
                # readers waiting on its flights with "fetch cancelled".
                for f in own:
                    self.nursery.start_soon(self._fly, stub, f, prefetch)
            else:
                async with trio.open_nursery() as nursery:
                    for f in own:
                        nursery.start_soon(self._fly, stub, f, prefetch)
            if not wait:
                return
            for f in own + waits:
                await f.done.wait()
            if stub.ranges.covers(start, stop):
                return
            failed = [f.error for f in own + waits
                      if f.error is not None and not isinstance(f.error, NoRoom)]
            if failed:
                raise failed[0]
            if prefetch and any(isinstance(f.error, NoRoom) for f in own):
                raise NoRoom(stub.path)  # a read-ahead that waits: it gives way too
            if not own and not waits:
                break
            # A read-ahead flight we waited on gave way to the budget: plan again (our own
            # flight for those bytes; a reader's flight never gives way).
        # Never hand out the hole (e.g. the stub turned stale between plan and fetch).
        raise BackendUnavailable(f"{stub.path!r} [{start}, {stop}) not resident after fetch")

    def _chunk_span(self, stub: Stub, index: int) -> tuple[int, int]:
        c = self.cfg.chunk_size
        return index * c, min((index + 1) * c, stub.size)

    def _plan(self, stub: Stub, start: int, stop: int, wait: bool,
              whole_chunks: bool) -> tuple[list[Flight], list[Flight]]:
        """(new flights, registered; flights of others to wait for).  Synchronous on purpose:
        no await between reading ``_inflight`` and registering in it (coalescing invariant).

        Per chunk: the bytes wanted (the whole chunk, or the range's pages in it) minus what is
        resident minus what flights in progress already carry.  A reader waits only for flights
        that carry bytes it needs, and fetches the rest alongside them.
        """
        assert stub.ranges is not None
        chunk = self.cfg.chunk_size
        per_request = max(self.cfg.max_request // chunk, 1)
        lo, hi = page_floor(start), min(page_ceil(stop), stub.size)
        waits: list[Flight] = []
        pieces: list[tuple[int, int, list[int]]] = []
        for index in range(start // chunk, (stop + chunk - 1) // chunk):
            c0, c1 = self._chunk_span(stub, index)
            want = (c0, c1) if whole_chunks else (max(c0, lo), min(c1, hi))
            missing = stub.ranges.missing(*want)
            if not missing:
                continue
            need = RangeMap(missing)
            flying = self._inflight.get((stub.ino, index), ())
            for f in flying:
                if any(f.start < m.stop and m.start < f.stop for m in need):
                    if wait and f not in waits:
                        waits.append(f)
                        self.counters.coalesced_waits += 1
                    need.remove(f.start, f.stop)
            gaps = list(need)
            if gaps and whole_chunks and not flying:
                gaps = [Span(gaps[0].start, gaps[-1].stop)]  # one GET; only gaps get written
            for gap in gaps:
                last = pieces[-1] if pieces else None
                if (last and last[1] == gap.start
                        and len(set(last[2]) | {index}) <= per_request):
                    pieces[-1] = (last[0], gap.stop, sorted(set(last[2]) | {index}))
                else:
                    pieces.append((gap.start, gap.stop, [index]))
        own = []
        for p0, p1, indices in pieces:
            f = Flight(p0, p1, indices)
            for index in indices:
                self._inflight.setdefault((stub.ino, index), []).append(f)
            own.append(f)
        return own, waits

    async def _fly(self, stub: Stub, flight: Flight, prefetch: bool) -> None:
        """Run one flight to the end.  Never raises: the error is kept for every waiter."""
        flight.started = trio.current_time()
        try:
            assert stub.ranges is not None
            # Write only what is missing: resident bytes inside the span may hold an
            # application's writes (kernel door), which remote bytes must never overwrite.
            # The flight owns its missing bytes (no other flight carries them, and
            # applications write only resident ranges), so the gaps cannot change until it
            # lands: they are computed here, and the GET and the write happen in one worker
            # thread call (one hop per miss, not two).  If the flight completes the file, the
            # same call marks it resident.
            gaps = stub.ranges.missing(flight.start, flight.stop)
            completes = all(flight.start <= g.start and g.stop <= flight.stop
                            for g in stub.ranges.missing(0, stub.size))
            # Room first (-o cache_size), so the budget holds at every instant rather than
            # a tick later.  This stub cannot be released meanwhile (its flight makes it
            # busy), and nothing else fills its gaps, so they still hold afterwards.
            gap_bytes = sum(g.stop - g.start for g in gaps)
            reserved = await self.host.make_room(stub, gap_bytes, prefetch)
            try:
                await trio.to_thread.run_sync(self._fetch_and_fill, stub, flight, gaps,
                                              completes, limiter=self._s3_limiter)
            except BaseException:
                self.host.landed(0, reserved, prefetch)
                raise
            self.host.landed(gap_bytes, reserved, prefetch)
            if TRACE_FLIGHTS:
                _trace_flight(flight, prefetch)
            self.counters.s3_gets += 1
            stub.ranges.add(flight.start, flight.stop)
            n = flight.stop - flight.start
            self.counters.fetched_bytes += n
            self.counters.chunks_fetched += len(flight.chunks)
            if prefetch:
                self.counters.prefetched_bytes += n
            await self.host.after_fill(stub)
        except trio.Cancelled:
            flight.error = BackendUnavailable("fetch cancelled")
            raise
        except NoRoom as exc:  # read-ahead gave way to the budget: nothing failed
            flight.error = exc
            self.counters.readahead_no_room += 1
        except BaseException as exc:  # kept for the waiters, never re-raised
            flight.error = exc
            self._record_failure(stub, flight, exc, prefetch)
            try:
                with trio.CancelScope(shield=True):
                    await self.host.fetch_failed(stub, exc)
            except Exception:  # the promise above: a flight never raises
                log.exception("recording the failure of a fetch of %r failed", stub.path)
        finally:
            for index in flight.chunks:
                flying = self._inflight.get((stub.ino, index))
                if flying is not None and flight in flying:
                    flying.remove(flight)
                    if not flying:
                        del self._inflight[(stub.ino, index)]
            flight.done.set()

    def _record_failure(self, stub: Stub, flight: Flight, exc: BaseException,
                        prefetch: bool) -> None:
        cause = cause_of(exc)
        self.counters.errors[cause] += 1
        # A superseded file is retried through the reader's own fd: not a failure it sees.
        level = logging.INFO if prefetch or isinstance(exc, Superseded) else logging.ERROR
        if level >= logging.ERROR and self._repeated(stub.version.key, cause, flight.started):
            level = logging.DEBUG
        if not isinstance(exc, (HsmError, OSError)):
            log.exception("unexpected failure fetching %r", stub.version.key)
        else:
            log.log(level, "%sfetch of %r [%d, %d) failed (%s, %s): %s",
                    "pre" if prefetch else "", stub.version.key, flight.start, flight.stop,
                    cause, http_status(exc), exc, extra=failure_fields(
                        "prefetch_failed" if prefetch else "fetch_failed", stub.version.key,
                        flight.start, flight.stop, exc))

    def _repeated(self, key: str, cause: str, started: float) -> bool:
        """Whether a failure of ``key`` for ``cause`` was logged loud less than
        :data:`FAILURE_QUIET_S` before this flight started; else this one is, from now."""
        now = trio.current_time()
        last = self._logged.get((key, cause))
        if last is not None and started - last < FAILURE_QUIET_S:
            return True
        if len(self._logged) > 1024:  # keep it small: only recent lines matter
            self._logged = {k: t for k, t in self._logged.items() if now - t < FAILURE_QUIET_S}
        self._logged[(key, cause)] = now
        return False

    def _fetch_and_fill(self, stub: Stub, flight: Flight, gaps: list[Span],
                        completes: bool) -> None:
        """Worker thread: GET the flight's span, verify its length, fill the gaps."""
        data = self._buffer(flight.stop - flight.start)
        got = self.fetcher.fetch_into(stub.version, flight.start, data)
        if got != len(data):
            # Never claim a hole: the range is claimed after this returns, so its length is
            # verified here too, whatever the Fetcher promised (DESIGN §3).
            raise ShortBody(f"{stub.version.key!r} [{flight.start}, {flight.stop}): "
                            f"fetcher returned {got} bytes")
        self._write_gaps(stub, flight.start, data, gaps)
        # Written, the mtime moved, not put back yet (StubCache._size_checked's answer).
        crashpoint.crash_point(crashpoint.FILL, "written")
        self.host.filled(stub, completes)

    def _buffer(self, size: int) -> memoryview:
        """Worker thread: this thread's GET buffer, at least ``size`` bytes, reused across
        flights (a flight's bytes are written out before the thread takes another).

        An anonymous mapping, not a ``bytearray``: a bytearray is zero-filled, so all of its
        ``max_request`` bytes (8 MiB) are resident in every fetch thread from the first small
        file on (16 threads: +128 MB, measured); a mapping's pages become resident only as a
        GET writes them, so the buffer costs what the largest flight of that thread used, and
        munmap gives it all back when trio retires the idle thread."""
        buf: mmap.mmap | None = getattr(self._buffers, "buf", None)
        if buf is None or len(buf) < size:
            buf = mmap.mmap(-1, max(size, self.cfg.max_request))
            self._buffers.buf = buf
        return memoryview(buf)[:size]

    def _write_gaps(self, stub: Stub, base: int, data: bytes | memoryview,
                    gaps: list[Span]) -> None:
        """Write the fetched bytes of each gap into the stub; return when all are there."""
        fd = self.host.writable_fd(stub)
        # The file may have been truncated below the remote size through the kernel door since;
        # never extend it again with remote bytes.
        size = os.fstat(fd).st_size
        view = memoryview(data)
        try:
            for gap in gaps:
                offset, end = gap.start, min(gap.stop, size)
                while offset < end:
                    offset += os.pwrite(fd, view[offset - base:end - base], offset)
        except OSError as exc:
            self._undo_gaps(stub, fd, gaps, size)
            self.host.put_back_mtime(stub)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheFull(f"cache disk full writing {stub.path!r}: {exc}") from exc
            raise

    @staticmethod
    def _undo_gaps(stub: Stub, fd: int, gaps: list[Span], size: int) -> None:
        """A write of the gaps failed part-way (ENOSPC, EDQUOT, EIO): punch them back to holes
        (the caller puts the mtime back).  The range is not claimed in memory either way, but the
        extents are the residency truth at the next start (or when the range map is read
        again): a half-written block would be data there, its unwritten tail zeros served as
        the object's bytes; and a pwrite moved the mtime, which a start reads as a program's
        write (a clean file recorded dirty).  The flight owns its gaps (they were holes and
        nothing else writes them until it ends), so punching them cannot touch anyone's
        bytes; a gap that reaches the end of the file is punched to the end of its block."""
        try:
            block = os.fstat(fd).st_blksize or 4096
            for gap in gaps:
                stop = gap.stop
                if stop >= size:
                    stop = -(-stop // block) * block
                punch(fd, gap.start, stop)
        except OSError as exc:
            log.error("cannot punch back the part-written gaps of %r (%s): the next start may "
                      "count them resident", stub.path, exc)

    async def prefetch(self, stub: Stub, start: int, stop: int) -> None:
        """Read-ahead of ``[start, stop)`` in the background (never waited for)."""
        step = stub.pattern.ramp_step()
        whole_chunks = stub.pattern.window >= self.cfg.chunk_size
        for piece in range(start, stop, step):
            await self.fetch(stub, piece, min(piece + step, stop), wait=False,
                             whole_chunks=whole_chunks)
