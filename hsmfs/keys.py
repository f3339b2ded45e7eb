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
            rejected.append((files.pop(rel), "is both an object and a prefix of other keys"))
    return Placement(files=files, dirs=dirs, rejected=rejected)
