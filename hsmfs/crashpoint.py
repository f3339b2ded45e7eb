"""Tests only: SIGKILL this process at a named step of a transition, the way a crash would
(``tests/t4_crash.py``, ``tests/t4_release.py``), so what each step leaves behind is tested on
real files instead of argued.

``<ENV>=<step>`` kills at the first time ``step`` is reached, ``<ENV>=<step>:<n>`` at the n-th
(populate: "after 40 stubs").  With ``HSMFS_TEST_CRASH_GROUP=1`` the whole daemon goes: in the
kernel door's worker (its own process group) the holder, its parent, is killed first, so
nothing of the daemon survives to restart or cover anything.  A worker
the holder restarted (``HSMFS_WORKER_GENERATION`` > 1) never crashes here: it inherits the
environment, and a crash at every start would only test the holder's give-up rule.

Unset (always, outside tests) the cost is one ``os.environ.get`` per step.
"""

from __future__ import annotations

import collections
import logging
import os
import signal

log = logging.getLogger(__name__)

RELEASE = "HSMFS_TEST_CRASH_RELEASE"  # leased, punched-only, punched, released
REFRESH = "HSMFS_TEST_CRASH_REFRESH"  # applied[:n], exchanged
POPULATE = "HSMFS_TEST_CRASH_POPULATE"  # created[:n], staged[:n] (guarded, not linked in)
FILL = "HSMFS_TEST_CRASH_FILL"  # written (a fill's bytes, before its mtime is put back)
ARCHIVE = "HSMFS_TEST_CRASH_AT"  # marked, read, sent (hsmfs/archive.py)
GROUP = "HSMFS_TEST_CRASH_GROUP"

_reached: collections.Counter[str] = collections.Counter()


def crash_point(env: str, step: str) -> None:
    want = os.environ.get(env)
    if not want:
        return
    name, _, nth = want.partition(":")
    if name != step or os.environ.get("HSMFS_WORKER_GENERATION", "1") not in ("", "1"):
        return
    _reached[f"{env}={step}"] += 1
    if _reached[f"{env}={step}"] < int(nth or 1):
        return
    whole = bool(os.environ.get(GROUP))
    log.warning("%s=%s: SIGKILL%s", env, want, " of the whole daemon" if whole else "")
    if whole and os.environ.get("HSMFS_HOLDER_FD"):  # a kernel-door worker: the holder too
        os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
