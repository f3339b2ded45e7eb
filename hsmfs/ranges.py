"""A pure map of byte ranges: which bytes of a file are resident.

No I/O, no trio: property tests hammer it against a bitmap model.  Spans are half-open
``[start, stop)``, like Python slices; HTTP's inclusive ranges appear only in backend_s3.
Invariant: ``_spans`` is sorted, non-empty spans, never touching or overlapping.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from typing import NamedTuple

#: Sorts after every span that starts at the same offset (offsets are below 2**63).
_NO_END = 1 << 63


class Span(NamedTuple):
    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start


class RangeMap:
    __slots__ = ("_spans",)

    def __init__(self, spans: Iterable[tuple[int, int]] = ()) -> None:
        self._spans: list[Span] = []
        for start, stop in spans:
            self.add(start, stop)

    def __iter__(self) -> Iterator[Span]:
        return iter(self._spans)

    def __len__(self) -> int:
        return len(self._spans)

    def __repr__(self) -> str:
        return f"RangeMap({[tuple(s) for s in self._spans]})"

    def total(self) -> int:
        return sum(s.length for s in self._spans)

    def add(self, start: int, stop: int) -> None:
        """Mark ``[start, stop)`` present, merging with neighbours it touches."""
        if stop <= start:
            return
        spans = self._spans
        # First span whose stop >= start (touching counts, so neighbours merge).
        lo = bisect.bisect_left(spans, start, key=lambda s: s.stop)
        hi = lo
        while hi < len(spans) and spans[hi].start <= stop:
            start = min(start, spans[hi].start)
            stop = max(stop, spans[hi].stop)
            hi += 1
        spans[lo:hi] = [Span(start, stop)]

    def remove(self, start: int, stop: int) -> None:
        """Mark ``[start, stop)`` absent (a punched hole)."""
        if stop <= start:
            return
        out: list[Span] = []
        for s in self._spans:
            if s.stop <= start or s.start >= stop:
                out.append(s)
                continue
            if s.start < start:
                out.append(Span(s.start, start))
            if s.stop > stop:
                out.append(Span(stop, s.stop))
        self._spans = out

    def covers(self, start: int, stop: int) -> bool:
        """Whether all of ``[start, stop)`` is present.

        Safe to call from another thread while one thread adds: ``add`` changes the list in
        one slice assignment, so every span read here was present when read, and the answer
        is True only if one such span holds the whole range.  A concurrent change can make it
        answer False wrongly, never True.  ``remove`` is for maps nobody else reads.
        """
        if stop <= start:
            return True
        spans = self._spans
        # The last span starting at or before ``start``: tuples compare in C, no key call.
        i = bisect.bisect_right(spans, (start, _NO_END)) - 1
        if i < 0:
            return False
        try:
            span = spans[i]
        except IndexError:  # spans merged under us
            return False
        return span.start <= start and stop <= span.stop

    def missing(self, start: int, stop: int) -> list[Span]:
        """The sub-spans of ``[start, stop)`` not present, in order."""
        out: list[Span] = []
        pos = start
        i = max(bisect.bisect_right(self._spans, start, key=lambda s: s.start) - 1, 0)
        for s in self._spans[i:]:
            if s.start >= stop:
                break
            if s.stop <= pos:
                continue
            if s.start > pos:
                out.append(Span(pos, min(s.start, stop)))
            pos = max(pos, s.stop)
            if pos >= stop:
                break
        if pos < stop:
            out.append(Span(pos, stop))
        return out
