"""Directory read-ahead: which sibling files to fetch before anyone opens them.

Byte read-ahead (the cache's window) helps one file read front to back.  Trees of small files
(`grep -r`, `compileall`, `tar`, a build) are read file after file instead, and each file's
first byte costs a whole S3 round trip, one at a time: the cold source-tree bench ran 18x
slower than native, almost all of it waiting on GETs in series.  The same idea applies one
level up: once a program has read two small files of a directory whole, it is walking the
directory, so the rest of that directory's small files are fetched in the background, in
parallel, in name order (`compileall` and `ls` order; `grep` and `find` read in readdir order,
and the files they reach before the prefetch does are fetched on demand alongside it).

What keeps this from fetching bytes nobody reads:

* Only siblings sharing an extension with the files read so far (`compileall` reads the
  ``.py`` files, not the data files next to them), and only small files (``small_file``,
  the size the cache fetches whole anyway).
* A byte budget per directory (``dir_readahead``, default 64 MiB): a program that reads two
  files of a huge directory and stops costs at most that much.
* Each directory triggers once.  A directory next to or below a triggered one triggers on its
  first small-file read: the walk has already shown itself (`src/json/` walked, then
  `src/http/` or `src/json/tests/` is the walk going on, not a new guess).

This module only decides; the cache fetches.  It sees whole-file misses only: files already
resident raise no event on the kernel door, so there is no signal of "consumed" to pace by,
which is why the budget, not a sliding window, bounds the work.
"""

from __future__ import annotations

import posixpath
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

#: Whole-file reads in one directory that reveal a walk.
WALK_THRESHOLD = 2
#: Directories remembered (those that triggered, and those counting toward a trigger).
MAX_REMEMBERED_DIRS = 4096


class SiblingLike(Protocol):
    path: str

    @property
    def size(self) -> int: ...


@dataclass
class _DirState:
    read: set[str] = field(default_factory=set)  # paths read before the trigger (at most 2)
    extensions: set[str] = field(default_factory=set)
    triggered: bool = False


def extension(path: str) -> str:
    """``'.py'`` for ``'a/b.py'``; ``''`` for no extension (dotfiles have none)."""
    return posixpath.splitext(posixpath.basename(path))[1]


class SiblingReadAhead:
    """Per-directory walk detection.  Not thread-safe: the cache calls it from its trio loop.

    ``siblings(dir)`` lists the stubs directly in ``dir``; ``wanted(stub)`` says whether a
    stub still needs fetching (not resident, not stale, not in flight).
    """

    def __init__(self, budget: int, small_file: int,
                 siblings: Callable[[str], Iterable[SiblingLike]],
                 wanted: Callable[[SiblingLike], bool]) -> None:
        self.budget = budget
        self.small_file = small_file
        self._siblings = siblings
        self._wanted = wanted
        self._dirs: OrderedDict[str, _DirState] = OrderedDict()
        # Parents of triggered directories: a walk seen there makes their other children hot.
        self._walked_parents: OrderedDict[str, None] = OrderedDict()

    def note_whole_read(self, stub: SiblingLike) -> list[SiblingLike]:
        """A program read ``stub`` whole from S3 (a miss).  Return the siblings to fetch now:
        empty unless this read reveals a walk of its directory."""
        if self.budget <= 0 or stub.size > self.small_file:
            return []
        parent = posixpath.dirname(stub.path)
        state = self._state(parent)
        if state.triggered:
            return []
        state.read.add(stub.path)
        state.extensions.add(extension(stub.path))
        if len(state.read) < WALK_THRESHOLD and not self._walked_into(parent):
            return []
        state.triggered = True
        if parent:
            self._remember_walk(posixpath.dirname(parent))
        picked = self._pick(parent, state)
        state.read.clear()
        return picked

    def _pick(self, parent: str, state: _DirState) -> list[SiblingLike]:
        picked: list[SiblingLike] = []
        spent = 0
        for sib in sorted(self._siblings(parent), key=lambda s: s.path):
            if (sib.path in state.read or sib.size > self.small_file
                    or extension(sib.path) not in state.extensions or not self._wanted(sib)):
                continue
            if spent + sib.size > self.budget:
                break
            spent += sib.size
            picked.append(sib)
        return picked

    def _walked_into(self, directory: str) -> bool:
        """Whether ``directory`` is below a triggered directory or next to one."""
        if not directory:
            return False
        above = posixpath.dirname(directory)
        state = self._dirs.get(above)
        return (state is not None and state.triggered) or above in self._walked_parents

    def _remember_walk(self, parent: str) -> None:
        self._walked_parents[parent] = None
        self._walked_parents.move_to_end(parent)
        while len(self._walked_parents) > MAX_REMEMBERED_DIRS:
            self._walked_parents.popitem(last=False)

    def _state(self, parent: str) -> _DirState:
        state = self._dirs.get(parent)
        if state is None:
            state = self._dirs[parent] = _DirState()
            while len(self._dirs) > MAX_REMEMBERED_DIRS:
                self._dirs.popitem(last=False)
        else:
            self._dirs.move_to_end(parent)
        return state
