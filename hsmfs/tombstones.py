"""Local removals of stubs, remembered across restarts (``.hsmfs/removed.log``).

A program removes a stub (``rm`` through the FUSE door, or directly in the backing tree, seen by
the kernel door's names group).  S3 still holds the object, and only ``archive --delete``
removes it there.  Until then the removal must survive a restart: without a record, the next
start lists S3, finds an object with no file at its path, and makes the stub again; the user's
``rm`` is undone and a later ``archive --delete`` has nothing to delete.

The log is JSON lines, appended with one ``write`` per removal and no fsync: losing its tail in
a power cut undoes a removal (the stub comes back), it never loses a byte.  The last line of a
key wins; ``{"key": K, "done": true}`` forgets one.  A start compacts it.

A tombstone is of one *version*: if S3 changed the object after the local removal (another
host wrote it), the start makes the stub again and drops the tombstone: a removal of an older
copy never deletes someone else's newer bytes, locally or in S3 (``archive --delete`` deletes
with ``If-Match`` of the tombstone's ETag).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from .registry import STATE_DIR

log = logging.getLogger(__name__)

LOG_NAME = f"{STATE_DIR}/removed.log"


@dataclass(frozen=True)
class Tombstone:
    key: str
    etag: str
    version_id: str | None
    size: int
    mtime: float
    path: str  # where the stub was when it was removed (relative to the cache root)


class Tombstones:
    """The removal log of one cache; every method is blocking file I/O through ``root_fd``."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd

    def load(self) -> dict[str, Tombstone]:
        """key -> its tombstone.  A line that does not parse is skipped with one log line."""
        try:
            fd = os.open(LOG_NAME, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.root_fd)
        except FileNotFoundError:
            return {}
        with os.fdopen(fd, "rb") as f:
            data = f.read()
        out: dict[str, Tombstone] = {}
        for n, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = str(row["key"])
                if row.get("done"):
                    out.pop(key, None)
                    continue
                out[key] = Tombstone(key, str(row["etag"]), row.get("version_id"),
                                     int(row.get("size", 0)), float(row.get("mtime", 0.0)),
                                     str(row["path"]))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("%s line %d does not parse (%s): skipped", LOG_NAME, n, exc)
        return out

    def add(self, key: str, etag: str, version_id: str | None, size: int, mtime: float,
            path: str) -> None:
        self._append({"key": key, "etag": etag, "version_id": version_id, "size": size,
                      "mtime": mtime, "path": path})

    def drop(self, key: str) -> None:
        self._append({"key": key, "done": True})

    def compact(self, keep: Callable[[Tombstone], bool]) -> dict[str, Tombstone]:
        """Rewrite the log with the tombstones ``keep`` accepts (atomically: a new file renamed
        over the old one); returns them."""
        kept = {k: t for k, t in self.load().items() if keep(t)}
        tmp = LOG_NAME + ".new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600,
                     dir_fd=self.root_fd)
        try:
            for t in kept.values():
                os.write(fd, _line(t.__dict__))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, LOG_NAME, src_dir_fd=self.root_fd, dst_dir_fd=self.root_fd)
        return kept

    def _append(self, row: dict[str, object]) -> None:
        try:
            fd = os.open(LOG_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600,
                         dir_fd=self.root_fd)
        except OSError as exc:
            log.warning("cannot remember %r in %s: %s", row.get("key"), LOG_NAME, exc)
            return
        try:
            os.write(fd, _line(row))  # one write: a line is whole or absent
        except OSError as exc:
            log.warning("cannot remember %r in %s: %s", row.get("key"), LOG_NAME, exc)
        finally:
            os.close(fd)


def _line(row: dict[str, object]) -> bytes:
    return json.dumps(row, separators=(",", ":")).encode() + b"\n"
