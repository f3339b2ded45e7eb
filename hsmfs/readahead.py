"""Sequential read-ahead as a pure object: accesses in, "prefetch this span" out.

No I/O, no trio, no knowledge of chunks in flight: the fetch engine asks :meth:`AccessPattern.note`
whether an access continues a stream and :meth:`AccessPattern.next_batch` what to prefetch, and
does the fetching itself.  Measured reasons for every constant are in docs/design.md ("Fetch
engine").
"""

from __future__ import annotations

from dataclasses import dataclass

PAGE = 4096
#: How far from the previous access a read may start and still continue a sequential stream:
#: FUSE has up to 12 async read-ahead requests of 1 MiB in flight, answered out of order.
SEQ_SLACK = 1 << 20
#: A stream's smallest first read-ahead window (it is 4x the request when that is larger).
SEQ_MIN_WINDOW = 128 << 10
#: Read-ahead goes to S3 only once a stream's window has grown this large.
READ_AHEAD_MIN_WINDOW = 4 * SEQ_MIN_WINDOW
#: A young read-ahead batch is spread over this many GETs at least (see fetch engine).
RAMP_GETS = 4


def page_floor(n: int) -> int:
    return n - n % PAGE


def page_ceil(n: int) -> int:
    return -(-n // PAGE) * PAGE


@dataclass(slots=True)
class AccessPattern:
    """The access pattern of one file: whether it is read as a stream, and how far ahead."""

    streak: int = 0  # consecutive accesses near the previous one
    horizon: int = 0  # end of what read-ahead has requested so far
    last_start: int = 0
    last_stop: int = 0
    window: int = 0

    def note(self, start: int, stop: int, readahead_max: int) -> bool:
        """Follow one access; return whether access is sequential.

        Sequential means: the read starts the file, or it is the second access in a row that
        lands near the previous one (within ``SEQ_SLACK``, which absorbs the kernel's
        out-of-order async read-ahead requests).  One near access in a random stream is luck,
        not a pattern.  A stream's window starts at 4x the request (at least ``SEQ_MIN_WINDOW``)
        and doubles with every access up to ``readahead_max``, so a mistaken stream costs little
        and a real one ramps up within a few reads (as Linux's own read-ahead does); a jump
        drops it.
        """
        # In pages: two reads of the same page are one access, whatever their byte offsets.
        start, stop = page_floor(start), page_ceil(stop)
        if self.last_start <= start and stop <= self.last_stop:
            # Nothing new: a repeat, or another reader of the same range (the kernel door sees
            # one event per reader).  It says nothing about the direction of travel.
            return self.window > 0
        first = self.last_stop == 0
        near = self.last_start - SEQ_SLACK <= start <= self.last_stop + SEQ_SLACK
        if first and start == 0:
            self.streak = 2
        elif near and not first:
            self.streak += 1
        else:
            self.streak = 0
        sequential = self.streak >= 2
        if not sequential:
            self.window = 0
        elif self.window == 0:
            self.window = min(max(SEQ_MIN_WINDOW, 4 * (stop - start)), readahead_max)
        else:
            self.window = min(self.window * 2, readahead_max)
        self.last_start = start
        self.last_stop = max(stop, self.last_stop) if sequential else stop
        return sequential

    def next_batch(self, stop: int, size: int, max_request: int,
                   readahead_max: int) -> tuple[int, int] | None:
        """The span to prefetch now after an access that ended at ``stop``, or None.

        Like Linux's async read-ahead marker: the next batch goes out only once the reader has
        moved a batch past what has been requested (``horizon``).  A batch is half the window
        while the window ramps up, and one ``max_request`` GET once it is large: the window
        then stays full, ``readahead_max / max_request`` GETs deep, as raw parallel GETs are.
        Measured (Ceph, 256 MiB, 8 MiB chunks): sliding by every read made one GET per
        chunk-sized step (boto3's ~1 ms of CPU each); half-window batches let the depth swing
        between half and all of the window (348 MB/s); GET-sized batches, ~650.
        """
        if not self.window or stop >= size:
            self.horizon = 0
            return None
        if self.window < min(READ_AHEAD_MIN_WINDOW, readahead_max):
            # Two near reads of a random stream open a 128 KiB window by luck now and then
            # (4 KiB random reads over 64 MiB: four times in 500 reads, measured); a stream
            # of small reads proves itself over four accesses before guesses go to S3.
            return None
        horizon = max(self.horizon, stop)
        target = min(stop + self.window, size)
        batch = min(max(self.window // 2, SEQ_MIN_WINDOW), max_request)
        if target - horizon >= batch or (target == size and horizon < target):
            self.horizon = target
            return horizon, target
        return None

    def ramp_step(self) -> int:
        """How large each GET of a prefetch batch is: a young window goes out as RAMP_GETS
        parallel GETs, not one (S3 caps each connection, so its first part lands sooner)."""
        return max(self.window // RAMP_GETS, SEQ_MIN_WINDOW)
