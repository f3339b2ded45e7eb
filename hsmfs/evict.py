"""Eviction: ``-o cache_size=SIZE[,min_free=PCT]`` keeps the cache's resident bytes under a budget
by releasing the least recently used clean files (issue 12, item 2).

**Room is made before bytes land, not after.**  Every flight asks :meth:`Evictor.make_room` for
its bytes before its GET (both doors, read-ahead and restore included), and releases run until
the bytes fit, so the budget holds at every instant rather than being restored a tick later.
A background tick recounts from the registry (writes, truncates and the other door move the
count without asking) and keeps ``min_free`` of the filesystem free.  Each round evicts down to
a low-water mark (``LOW_WATER`` of the budget), so a stream of misses does not pay a release
per flight.

**Never evicted** (each refusal is :meth:`StubCache.release`'s own): a dirty, conflicting or
stale file; a file pinned with ``hsmfs pin``; a file a door is serving (a Pin), filling, or
that any program has open, mapped or running (the write lease); the file the flight is for.
When what is left cannot meet the budget, the flight goes ahead anyway (a read never fails
for want of budget: the budget is a target, the disk is the limit): the daemon says so once
per episode in the log and always in ``hsmfs stats`` (``over_budget``, ``unevictable_bytes``).

**Recency** is ``Stub.used_at``: every ``ensure`` (a miss or a served range through either
door), the FUSE door's open, and on the kernel door every open of a file (the names group's
``FAN_OPEN``, with eviction on only: a resident file raises no permission event).

**Crashes.**  Eviction persists nothing of its own: each release is the release transition,
with its own answers (docs/design.md).  The count is memory, recounted at start.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from .fetch import NoRoom
from .state import Stub

if TYPE_CHECKING:
    from .cache import StubCache

log = logging.getLogger(__name__)

#: One round of eviction frees down to this share of the budget.
LOW_WATER = 0.9
#: Read-ahead may hold at most this share of the budget in flight.
SPECULATIVE_SHARE = 0.5
TICK_S = 1.0


@dataclass
class EvictionStats:
    budget: int = 0
    min_free_pct: float = 0.0
    resident_bytes: int = 0
    reserved_bytes: int = 0
    speculative_bytes: int = 0  # of reserved_bytes, read-ahead's
    peak_bytes: int = 0  # the most resident + reserved ever was (what the budget bounds)
    evictions: int = 0
    evicted_bytes: int = 0
    refused: int = 0  # releases refused (open, mapped, in use) while looking for room
    over_budget: bool = False
    unevictable_bytes: int = 0  # resident bytes no eviction may touch (last time it looked)

    def as_dict(self) -> dict[str, object]:
        return {f"evict_{k}" if not k.startswith(("budget", "min_free")) else k: v
                for k, v in self.__dict__.items()}


class Evictor:
    def __init__(self, cache: StubCache, budget: int, min_free_pct: float = 0.0) -> None:
        self.cache = cache
        self.stats = EvictionStats(budget=budget, min_free_pct=min_free_pct)
        self._lock = trio.Lock()
        self._warned = False

    @property
    def budget(self) -> int:
        return self.stats.budget

    # -- the count ----------------------------------------------------------------------------

    def recount(self) -> int:
        """Resident bytes of every stub the registry knows (on the loop: it is the loop's)."""
        seen: set[int] = set()
        total = 0
        for stub in [*self.cache.registry.by_path.values(),
                     *self.cache.registry.by_ino.values()]:
            if id(stub) not in seen:
                seen.add(id(stub))
                total += stub.resident_bytes
        self.stats.resident_bytes = total
        return total

    def landed(self, nbytes: int, reserved: int, *, speculative: bool = False) -> None:
        """A flight is over: ``nbytes`` written (0: it failed) of the ``reserved`` it asked
        room for."""
        s = self.stats
        s.reserved_bytes = max(s.reserved_bytes - reserved, 0)
        if speculative:
            s.speculative_bytes = max(s.speculative_bytes - reserved, 0)
        s.resident_bytes += nbytes

    async def _shortfall(self) -> int:
        """:meth:`_free_shortfall` off the loop (``statvfs`` may block on a sick disk)."""
        if self.stats.min_free_pct <= 0:
            return 0
        return await trio.to_thread.run_sync(self._free_shortfall)

    def _free_shortfall(self) -> int:
        """Bytes to free so that ``min_free`` percent of the cache's filesystem is free."""
        if self.stats.min_free_pct <= 0:
            return 0
        try:
            st = os.statvfs(self.cache.cfg.cache_dir)
        except OSError:
            return 0
        want = st.f_blocks * st.f_frsize * self.stats.min_free_pct / 100.0
        return max(int(want - st.f_bavail * st.f_frsize), 0)

    # -- making room --------------------------------------------------------------------------

    async def make_room(self, stub: Stub, nbytes: int, *, speculative: bool = False) -> int:
        """Before a flight of ``nbytes`` for ``stub``: release LRU clean files until the bytes
        fit; returns what was reserved (give it back with :meth:`landed`).

        A reader's flight never fails for want of room: it goes ahead, and the shortfall is
        reported.  A ``speculative`` one (read-ahead, directory read-ahead) gives way
        (:class:`NoRoom`) when it would go over the budget, and read-ahead never holds more
        than :data:`SPECULATIVE_SHARE` of the budget in flight: a dozen siblings fetched at
        once must not evict the file being read to make room for guesses."""
        async with self._lock:
            s = self.stats
            if speculative and s.speculative_bytes + nbytes > self.budget * SPECULATIVE_SHARE:
                raise NoRoom(stub.path)
            need = s.resident_bytes + s.reserved_bytes + nbytes - self.budget
            short = await self._shortfall()
            if need > 0 or short > 0:
                target = max(need + int(self.budget * (1 - LOW_WATER)), short)
                await self._evict(target, spare=stub)
                still = s.resident_bytes + s.reserved_bytes + nbytes - self.budget
                if speculative and (still > 0 or await self._shortfall() > 0):
                    raise NoRoom(stub.path)
            s.reserved_bytes += nbytes
            if speculative:
                s.speculative_bytes += nbytes
            s.peak_bytes = max(s.peak_bytes, s.resident_bytes + s.reserved_bytes)
            return nbytes

    async def _evict(self, target: int, *, spare: Stub | None = None) -> int:
        """Release least recently used clean files until ``target`` bytes are freed (or no
        candidate is left); returns the bytes freed.  Under ``_lock``."""
        freed = 0
        candidates = self._candidates(spare)
        for stub in candidates:
            if freed >= target:
                break
            try:
                done = await self.cache.release(stub, wait=False)
            except Exception as exc:  # one file's failure must not stop the others
                log.warning("eviction: cannot release %r: %s", stub.path, exc)
                continue
            if done.result == "released":
                self.stats.evictions += 1
                self.stats.evicted_bytes += done.resident_bytes
                self.stats.resident_bytes = max(self.stats.resident_bytes
                                                - done.resident_bytes, 0)
                freed += done.resident_bytes
            elif done.result == "refused":
                self.stats.refused += 1
        short = freed < target
        if short and not self._warned:
            self.stats.unevictable_bytes = sum(
                s.resident_bytes for s in self.cache.registry.by_path.values()
                if self._never(s))
            log.warning("cache_size: cannot meet the budget of %d bytes: %d resident, %d of "
                        "them dirty, pinned, stale or in conflict, the rest open or in use; "
                        "reads go on over budget", self.budget, self.stats.resident_bytes,
                        self.stats.unevictable_bytes)
        elif not short and self._warned:
            log.info("cache_size: back under the budget of %d bytes", self.budget)
        self._warned = short
        self.stats.over_budget = short
        return freed

    def _never(self, stub: Stub) -> bool:
        """Release refuses it as it stands (dirty, conflict, stale, pinned, superseded): the
        core's one rule (StubCache.release_refusal), not a copy of it."""
        refusal = self.cache.release_refusal(stub)
        return refusal is not None and refusal[1] == errno.EPERM

    def _candidates(self, spare: Stub | None) -> list[Stub]:
        """Stubs release would take now, with resident bytes, least recently used first (a
        file whose per-file lock is held is passed by: its holder may be waiting for room)."""
        out = [s for s in self.cache.registry.by_path.values()
               if s is not spare and s.resident_bytes > 0
               and self.cache.release_refusal(s) is None
               and not self.cache.file_lock_held(s.ino)]
        out.sort(key=lambda s: s.used_at)
        return out

    # -- the tick ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Recount, and evict what writes or the other door brought over the budget (or under
        ``min_free``), every :data:`TICK_S`.  Never raises out."""
        self.recount()
        task_status.started()
        while True:
            try:
                async with self._lock:
                    over = self.recount() + self.stats.reserved_bytes - self.budget
                    short = await self._shortfall()
                    if over > 0 or short > 0:
                        await self._evict(max(over + int(self.budget * (1 - LOW_WATER)),
                                              short))
                    elif self.stats.over_budget:
                        self.stats.over_budget = False
                        self._warned = False
            except Exception:
                log.exception("eviction tick failed")
            await trio.sleep(TICK_S)

    def snapshot(self) -> dict[str, object]:
        out = self.stats.as_dict()
        out["evict_checked_at"] = time.time()
        return out
