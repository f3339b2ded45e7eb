"""RangeMap: table tests of each verb, then a Hypothesis state machine against a bitmap model.

The model is a bytearray with one byte per position (1 = present) over a small universe, so
every claim RangeMap makes (covers, missing, total, the spans themselves) can be checked
position by position.  RangeMap is pure: no I/O, no trio.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hsmfs.ranges import RangeMap, Span


def spans(rm: RangeMap) -> list[tuple[int, int]]:
    return [tuple(s) for s in rm]


# -- add ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("adds", "expected"),
    [
        ([], []),
        ([(0, 10)], [(0, 10)]),
        ([(5, 5)], []),  # empty span: nothing
        ([(7, 3)], []),  # reversed span: nothing
        ([(0, 10), (20, 30)], [(0, 10), (20, 30)]),
        ([(20, 30), (0, 10)], [(0, 10), (20, 30)]),  # order of adds does not matter
        ([(0, 10), (10, 20)], [(0, 20)]),  # touching on the right merges
        ([(10, 20), (0, 10)], [(0, 20)]),  # touching on the left merges
        ([(0, 10), (5, 15)], [(0, 15)]),  # overlap merges
        ([(0, 10), (2, 8)], [(0, 10)]),  # contained: no change
        ([(2, 8), (0, 10)], [(0, 10)]),  # containing: swallows
        ([(0, 5), (10, 15), (20, 25), (4, 21)], [(0, 25)]),  # bridges several
        ([(0, 5), (10, 15), (20, 25), (5, 10)], [(0, 15), (20, 25)]),  # fills a gap exactly
        ([(0, 5), (10, 15), (6, 9)], [(0, 5), (6, 9), (10, 15)]),  # gap stays a gap
        ([(0, 10), (0, 10)], [(0, 10)]),  # idempotent
        ([(10, 20), (10, 10)], [(10, 20)]),  # empty span at a border: nothing
    ],
)
def test_add(adds, expected):
    rm = RangeMap()
    for start, stop in adds:
        rm.add(start, stop)
    assert spans(rm) == expected
    assert rm.total() == sum(b - a for a, b in expected)
    assert len(rm) == len(expected)


def test_constructor_adds_and_merges():
    rm = RangeMap([(10, 20), (0, 10), (30, 30), (25, 40)])
    assert spans(rm) == [(0, 20), (25, 40)]
    assert repr(rm) == "RangeMap([(0, 20), (25, 40)])"


def test_spans_are_named():
    (s,) = list(RangeMap([(3, 10)]))
    assert isinstance(s, Span)
    assert (s.start, s.stop, s.length) == (3, 10, 7)


# -- remove ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("initial", "removes", "expected"),
    [
        ([(0, 10)], [(0, 10)], []),
        ([(0, 10)], [(5, 5)], [(0, 10)]),  # empty span: nothing
        ([(0, 10)], [(8, 2)], [(0, 10)]),  # reversed span: nothing
        ([(0, 10)], [(3, 6)], [(0, 3), (6, 10)]),  # punch in the middle splits
        ([(0, 10)], [(0, 3)], [(3, 10)]),
        ([(0, 10)], [(7, 10)], [(0, 7)]),
        ([(0, 10)], [(10, 20)], [(0, 10)]),  # touching, not overlapping: no change
        ([(10, 20)], [(0, 10)], [(10, 20)]),
        ([(0, 10), (20, 30)], [(5, 25)], [(0, 5), (25, 30)]),  # across a gap
        ([(0, 10), (20, 30), (40, 50)], [(0, 100)], []),
        ([], [(0, 10)], []),
        ([(0, 10)], [(2, 4), (6, 8)], [(0, 2), (4, 6), (8, 10)]),
    ],
)
def test_remove(initial, removes, expected):
    rm = RangeMap(initial)
    for start, stop in removes:
        rm.remove(start, stop)
    assert spans(rm) == expected
    assert rm.total() == sum(b - a for a, b in expected)


def test_add_after_remove_merges_again():
    rm = RangeMap([(0, 30)])
    rm.remove(10, 20)
    rm.add(10, 20)
    assert spans(rm) == [(0, 30)]


# -- covers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("initial", "query", "expected"),
    [
        ([], (0, 1), False),
        ([], (5, 5), True),  # an empty range is always covered
        ([], (9, 3), True),  # so is a reversed one
        ([(0, 10)], (0, 10), True),
        ([(0, 10)], (2, 8), True),
        ([(0, 10)], (0, 11), False),
        ([(0, 10)], (10, 11), False),  # stop is exclusive
        ([(0, 10)], (9, 10), True),
        ([(5, 10)], (4, 6), False),
        ([(0, 10), (10, 20)], (0, 20), True),  # merged on add
        ([(0, 10), (11, 20)], (0, 20), False),  # a one-byte hole
        ([(0, 10), (11, 20)], (11, 20), True),
        ([(0, 10), (20, 30)], (25, 30), True),
        ([(0, 10), (20, 30)], (15, 18), False),
    ],
)
def test_covers(initial, query, expected):
    assert RangeMap(initial).covers(*query) is expected


# -- missing --------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("initial", "query", "expected"),
    [
        ([], (0, 10), [(0, 10)]),
        ([], (5, 5), []),
        ([(0, 10)], (0, 10), []),
        ([(0, 10)], (5, 15), [(10, 15)]),
        ([(5, 10)], (0, 15), [(0, 5), (10, 15)]),
        ([(5, 10)], (0, 5), [(0, 5)]),  # touching on the right only
        ([(5, 10)], (10, 12), [(10, 12)]),
        ([(0, 2), (4, 6), (8, 10)], (0, 10), [(2, 4), (6, 8)]),
        ([(0, 2), (4, 6), (8, 10)], (1, 9), [(2, 4), (6, 8)]),
        ([(0, 2), (4, 6), (8, 10)], (3, 12), [(3, 4), (6, 8), (10, 12)]),
        ([(10, 20)], (0, 5), [(0, 5)]),
        ([(10, 20)], (25, 30), [(25, 30)]),
        ([(0, 100)], (30, 40), []),
    ],
)
def test_missing(initial, query, expected):
    got = RangeMap(initial).missing(*query)
    assert [tuple(s) for s in got] == expected
    assert all(isinstance(s, Span) for s in got)


# -- the state machine ------------------------------------------------------------------------

UNIVERSE = 64  # positions modelled; spans may reach past it a little
positions = st.integers(min_value=0, max_value=UNIVERSE)


class RangeMapVsBitmap(RuleBasedStateMachine):
    """Every operation goes to both RangeMap and a bytearray; they must always agree."""

    def __init__(self) -> None:
        super().__init__()
        self.rm = RangeMap()
        self.bits = bytearray(UNIVERSE + 1)

    def model_spans(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        i = 0
        while i < len(self.bits):
            if self.bits[i]:
                j = i
                while j < len(self.bits) and self.bits[j]:
                    j += 1
                out.append((i, j))
                i = j
            else:
                i += 1
        return out

    @rule(start=positions, stop=positions)
    def add(self, start, stop):
        self.rm.add(start, stop)
        for i in range(start, stop):
            self.bits[i] = 1

    @rule(start=positions, stop=positions)
    def remove(self, start, stop):
        self.rm.remove(start, stop)
        for i in range(start, stop):
            self.bits[i] = 0

    @rule(start=positions, stop=positions)
    def covers(self, start, stop):
        expected = all(self.bits[i] for i in range(start, stop))
        assert self.rm.covers(start, stop) is expected

    @precondition(lambda self: len(self.rm) > 0)
    @rule(data=st.data())
    def covers_a_held_span(self, data):
        # Random queries rarely land inside spans; aim some at them on purpose.
        span = data.draw(st.sampled_from(list(self.rm)))
        start = data.draw(st.integers(span.start, span.stop))
        stop = data.draw(st.integers(start, span.stop))
        assert self.rm.covers(start, stop)
        if span.stop < UNIVERSE:
            assert not self.rm.covers(start, span.stop + 1)

    @rule(start=positions, stop=positions)
    def missing(self, start, stop):
        got = self.rm.missing(start, stop)
        if stop <= start:
            assert got == []
            return
        expected = [
            (max(a, start), min(b, stop))
            for a, b in self.model_missing_spans(start, stop)
        ]
        assert [tuple(s) for s in got] == expected
        # What is missing and what is present partition the query exactly.
        assert sum(s.length for s in got) == sum(1 for i in range(start, stop)
                                                 if not self.bits[i])

    def model_missing_spans(self, start, stop):
        out: list[tuple[int, int]] = []
        i = start
        while i < stop:
            if not self.bits[i]:
                j = i
                while j < stop and not self.bits[j]:
                    j += 1
                out.append((i, j))
                i = j
            else:
                i += 1
        return out

    @invariant()
    def same_spans(self):
        assert [tuple(s) for s in self.rm] == self.model_spans()

    @invariant()
    def same_total(self):
        assert self.rm.total() == sum(self.bits)

    @invariant()
    def sorted_disjoint_nonempty_not_touching(self):
        prev_stop = -1
        for s in self.rm:
            assert s.start < s.stop
            assert s.start > prev_stop  # strictly after: touching spans would have merged
            prev_stop = s.stop


RangeMapVsBitmap.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None, derandomize=True,
    database=None,
)
TestRangeMapVsBitmap = RangeMapVsBitmap.TestCase


# -- covers beside a writer thread (the kernel door's event thread reads, the loop adds) ----------

def test_covers_from_another_thread_never_claims_what_was_not_added() -> None:
    """A reader thread asks ``covers`` while a writer adds spans in random order.  The writer
    marks a span in the model *before* adding it, so the model always holds at least what
    the map holds: any True the reader gets must be inside the model at that moment."""
    import random
    import threading
    import time

    rng = random.Random(7)
    universe = 4096
    pieces = [(i, i + 8) for i in range(0, universe, 8)]
    rng.shuffle(pieces)
    model = bytearray(universe)
    rm = RangeMap()
    done, running = threading.Event(), threading.Event()
    wrong: list[tuple[int, int]] = []
    answered = [0, 0]

    def reader() -> None:
        r = random.Random(11)
        running.set()
        while not done.is_set():
            start = r.randrange(universe)
            stop = min(start + r.choice((1, 8, 64, 512)), universe)
            if rm.covers(start, stop):
                answered[0] += 1
                if not all(model[start:stop]):
                    wrong.append((start, stop))
            else:
                answered[1] += 1

    t = threading.Thread(target=reader)
    t.start()
    try:
        assert running.wait(10)
        for start, stop in pieces:
            model[start:stop] = b"\x01" * (stop - start)
            rm.add(start, stop)
            time.sleep(0)  # let the reader in between adds (all of them fit in one GIL slice)
    finally:
        done.set()
        t.join(30)
    assert not wrong, wrong[:5]
    assert rm.covers(0, universe)
    assert answered[1] > 0  # the reader did run while the map was filling
