"""One file's state in memory: the two independent axes, the remote version, pins and intents.

* **Residency** (``stub`` / ``partial`` / ``resident``) is derived from the file's data extents
  below ``owed`` and cached in :attr:`Stub.ranges`; it is never stored as a word.
* **Sync status** (``clean`` / ``dirty`` / ``stale`` / ``conflict``) is stored in the file's
  trusted record (:mod:`hsmfs.stubfile`).
* The **remote version** a file is a copy of (key, ETag, version id, size, mtime) is immutable;
  the bytes still owed by S3 (``owed``) and the local size are separate from it.

The transitions live in :class:`hsmfs.cache.StubCache`, one method each; this module only holds
what they act on.  No I/O here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .ranges import RangeMap
from .readahead import AccessPattern
from .stubfile import (
    CLEAN,
    CONFLICT,
    DIRTY,
    PARTIAL,
    RESIDENT,
    STALE,
    STUB,
    RemoteVersion,
)

__all__ = ["CLEAN", "CONFLICT", "DIRTY", "PARTIAL", "RESIDENT", "STALE", "STUB", "Intent",
           "Pin", "Stub"]


class Intent(enum.Enum):
    """Why a door asks for bytes.  The core, not the door, turns an intent into a fetch."""

    READ = "read"  # an application reads (or maps) [start, stop)
    EXEC = "exec"  # a binary is about to run: the whole file, before it starts
    OPEN = "open"  # an open: the whole file if it is small enough (open_fill), else nothing
    OPEN_TRUNC = "open_trunc"  # an open with O_TRUNC: its bytes are about to go, fetch nothing
    TRUNCATE = "truncate"  # the file is being truncated to ``start`` bytes: fetch nothing
    WHOLE = "whole"  # make every byte resident (restore)
    WRITE = "write"  # a program is about to change the file: all of it local, then dirty


# slots: one per file, 100,000 and more at scale; a __dict__ each was ~20 % of the worker's RSS.
@dataclass(slots=True)
class Stub:
    """One backing file the core vouches for: a copy of ``version``, possibly partial."""

    path: str  # relative to the cache root; meaningless once ``superseded``
    version: RemoteVersion  # immutable: the remote version the file is a copy of
    ino: int
    gen: int  # inode generation: (ino, gen) never names two files
    owed: int  # holes below this offset are owed by S3 (== version.size unless truncated)
    sync: str = CLEAN
    remote: str | None = None  # for stale/conflict: the ETag S3 holds now ("-": gone)
    ranges: RangeMap | None = None  # resident bytes below ``owed``; None until loaded
    local: bool = False  # every owed byte is resident: nothing to fetch, nothing to guard
    fd: int | None = None  # O_RDWR through the private door, while filling
    #: The path no longer leads to this inode (renamed over, unlinked, replaced): the core
    #: still serves it for programs that hold it open, through their own fds.
    superseded: bool = False
    pins: int = 0  # doors serving bytes of this file right now (see Pin)
    #: ``hsmfs pin``: kept local, never released (durable: ``trusted.hsmfs.pinned``).  Not a
    #: Pin, which is a door's hold for the length of one read.
    pinned: bool = False
    pattern: AccessPattern = field(default_factory=AccessPattern)
    #: time.monotonic() of the last close of a writable handle (either door): writeback's
    #: "closed and idle" clock.  None: no close seen since this daemon started.
    closed_at: float | None = None
    #: time.monotonic() of the last open or read through either door (0: none since this
    #: daemon started): eviction's least-recently-used clock (:mod:`hsmfs.evict`).
    used_at: float = 0.0
    #: ``user.hsm.error`` as published (None: no failure since the last success), and what it
    #: says and when (monotonic) it was published: the same failure again within
    #: ``ERROR_REFRESH`` seconds writes nothing (:meth:`hsmfs.cache.StubCache.note_failure`).
    error: str | None = None
    error_sig: tuple[str, int, int | None] | None = None
    error_at: float = 0.0

    @property
    def size(self) -> int:
        """Bytes below this come from S3 (the rest, if any, are local)."""
        return self.owed

    @property
    def resident_bytes(self) -> int:
        """Bytes below ``owed`` held locally, as far as memory knows (0 until the range map
        is loaded): the one count eviction, stats and metrics use."""
        if self.local:
            return self.owed
        return self.ranges.total() if self.ranges is not None else 0

    @property
    def residency(self) -> str:
        if self.local:
            return RESIDENT
        if self.ranges is not None and self.ranges.total():
            return PARTIAL
        return STUB

    @property
    def state(self) -> str:
        """The one word users see: the sync status when it is not clean, else the residency."""
        return self.residency if self.sync == CLEAN else self.sync

    @property
    def fetchable(self) -> bool:
        """Whether missing bytes may be fetched: never for a stale or conflicting file (S3 holds
        another version; nothing of it is stitched in)."""
        return self.sync in (CLEAN, DIRTY)


class Pin:
    """Held by a door while it serves bytes :meth:`StubCache.ensure` made resident, so a
    release (punching the file back to a stub) can never run between the ensure and the read.
    Release it exactly once; ``with pin:`` does."""

    __slots__ = ("_release", "_stub")

    def __init__(self, stub: Stub | None, release: object = None) -> None:
        self._stub = stub
        self._release = release
        if stub is not None:
            stub.pins += 1

    def release(self) -> None:
        stub, self._stub = self._stub, None
        if stub is None:
            return
        stub.pins -= 1
        if callable(self._release):
            self._release(stub)

    def __enter__(self) -> Pin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
