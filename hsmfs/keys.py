"""Object keys → safe relative paths in the backing tree.

An S3 key is an arbitrary UTF-8 string; a path is not.  This module decides, once, which keys
can become files without escaping the cache directory or clobbering another object, and says
why the others cannot.  Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

#: The directory in the cache root that holds hsmfs's own state (staging, control socket).
#: Objects whose path starts with it are refused: they would collide with the daemon's files.
STATE_DIR = ".hsmfs"

NAME_MAX = 255
PATH_MAX = 4095


@dataclass(frozen=True)
class Placement:
    """Where the listing puts things: files by relative path, and every directory needed."""

    files: dict[str, str]  # relpath -> key
    dirs: set[str]  # relpaths of directories, parents before children when sorted by depth
    rejected: list[tuple[str, str]]  # (key, reason)


def key_to_relpath(key: str, prefix: str) -> tuple[str | None, str]:
    """Return ``(relpath, "")`` for a usable key, or ``(None, reason)``.

    A key ending in "/" is a directory marker: ``(relpath + "/", "")`` so callers can tell.
    """
    if not key.startswith(prefix):
        return None, "outside the prefix"
    rel = key[len(prefix):]
    if "\0" in rel:
        return None, "contains a NUL byte"
    if not rel:
        return None, "is the prefix itself"
    if rel.startswith("/"):
        return None, "absolute path (leading '/')"
    is_dir = rel.endswith("/")
    parts = rel.rstrip("/").split("/") if is_dir else rel.split("/")
    for part in parts:
        if part == "":
            return None, "empty path segment ('//')"
        if part in {".", ".."}:
            return None, f"'{part}' path segment"
        if len(part.encode()) > NAME_MAX:
            return None, f"a name longer than {NAME_MAX} bytes"
    if len(rel.encode()) > PATH_MAX:
        return None, f"a path longer than {PATH_MAX} bytes"
    if parts[0] == STATE_DIR:
        return None, f"reserved name {STATE_DIR!r}"
    return rel, ""


def place(keys: Iterable[str], prefix: str) -> Placement:
    """Lay out a listing: which keys become files, which directories exist, what is refused.

    A key that is both an object and a prefix of other keys (``a`` and ``a/b``) cannot be a file
    and a directory at once: the directory wins (it carries more objects) and the file is refused.
    """
    files: dict[str, str] = {}
    dirs: set[str] = set()
    rejected: list[tuple[str, str]] = []
    for key in keys:
        rel, reason = key_to_relpath(key, prefix)
        if rel is None:
            rejected.append((key, reason))
            continue
        if rel.endswith("/"):
            rel = rel.rstrip("/")
            dirs.add(rel)
        else:
            files[rel] = key
        parts = rel.split("/")
        for i in range(1, len(parts)):
            dirs.add("/".join(parts[:i]))
    for rel in sorted(files):
        if rel in dirs:
            rejected.append((files.pop(rel), BOTH_FILE_AND_PREFIX))
    return Placement(files=files, dirs=dirs, rejected=rejected)


@dataclass(frozen=True)
class Decision:
    """One thing a listing decides, as soon as it can: ``kind`` is ``dir`` (``rel``),
    ``file`` (``rel`` and ``key``) or ``rejected`` (``key`` and ``reason``)."""

    kind: str
    rel: str = ""
    key: str = ""
    reason: str = ""


#: The one reason :func:`place` and :class:`PlacementStream` give for ``a`` beside ``a/b``.
BOTH_FILE_AND_PREFIX = "is both an object and a prefix of other keys"


class PlacementStream:
    """:func:`place` for a listing taken one key at a time, in S3's order (UTF-8 binary, which
    is Python's code point order for the strings botocore decodes): a key is decided as soon
    as no later key can change its fate, so stubs are made while the listing still arrives.

    Only the file-or-directory question waits: a file ``a`` is refused once a key under
    ``a/`` arrives, and kept once a key arrives that sorts after every ``a/...`` (one that
    does not start with ``a``, or whose next character sorts after ``/``).  Keys like ``a!``
    or ``a.txt`` sort between ``a`` and ``a/``, so a few files may wait; the rest are decided
    at once.  Directories are decided at their first key, parents first.

    A server that does not list in order (S3 and Ceph do; ``ordered`` turns False and the
    caller is told once) still gets every object placed; only the ``a`` beside ``a/b`` rule may
    then keep the file that came first, whose directory objects are then skipped one by one
    with a line each, as for a local file blocking a directory.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.ordered = True
        self._last: str | None = None
        self._dirs: set[str] = set()
        self._pending: list[tuple[str, str]] = []  # undecided files (rel, key), in order

    def add(self, key: str) -> list[Decision]:
        if key == self._last:
            return []  # listed twice in a row (a server that replays a page): once is enough
        if self._last is not None and key < self._last:
            self.ordered = False
        self._last = key
        rel, reason = key_to_relpath(key, self.prefix)
        if rel is None:
            return [Decision("rejected", key=key, reason=reason)]
        is_dir = rel.endswith("/")
        out = self._decide(rel)  # a marker "a/" keeps its "/": it refuses a file "a" too
        rel = rel.rstrip("/")
        parts = rel.split("/")
        for i in range(1, len(parts) + (1 if is_dir else 0)):
            d = "/".join(parts[:i])
            if d not in self._dirs:
                self._dirs.add(d)
                out.append(Decision("dir", rel=d))
        if not is_dir:
            self._pending.append((rel, key))
        return out

    def finish(self) -> list[Decision]:
        """The listing ended: every file still waiting is a file."""
        out = [Decision("file", rel=rel, key=key) for rel, key in self._pending]
        self._pending.clear()
        return out

    def _decide(self, rel: str) -> list[Decision]:
        out: list[Decision] = []
        waiting: list[tuple[str, str]] = []
        for prel, pkey in self._pending:
            after = rel[len(prel)] if rel.startswith(prel) and len(rel) > len(prel) else ""
            if after == "/":
                out.append(Decision("rejected", key=pkey, reason=BOTH_FILE_AND_PREFIX))
            elif after and after < "/":
                waiting.append((prel, pkey))  # "a!" came: "a/..." may still follow
            else:
                out.append(Decision("file", rel=prel, key=pkey))
        self._pending = waiting
        return out
