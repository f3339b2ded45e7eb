"""The progress of a start, from the daemon that lists and populates to the command that waits.

Why a pipe of its own: the first populate of a large bucket takes minutes (100,000 objects
with HEADs: about 5 min on Ceph here), while ``hsmfs mount`` waits silently for the daemon to
say ready.  The daemon may be a forked child (background), or a worker process two forks away
(the kernel door: the holder spawns it), and the cache dir may be covered while it starts, so
neither a file in the tree nor the control socket (it serves only once the door does) can
carry it.  An inherited pipe reaches both: its write end goes down through the environment
(``HSMFS_PROGRESS_FD``) and the holder's ``pass_fds``, as the start-error pipe does.

Daemon side: :class:`StartProgress` holds plain counters that the listing, the HEAD workers
and populate's thread bump (one int each under the GIL: a lost update is a late bar, never a
wrong answer), and :meth:`StartProgress.report` writes one JSON line per tick.  Writes are
non-blocking and best-effort: a full pipe drops a tick, a reader gone (the waiting command
ended) ends the reports.  Nothing is persisted, so a death anywhere leaves nothing behind.

Waiting side: :class:`ProgressLine` draws the latest line on a terminal only; on a pipe or
file it draws nothing (``hsmfs mount ... 2>log`` stays one line per outcome).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import sys
import threading
import time
from typing import TextIO

ENV_FD = "HSMFS_PROGRESS_FD"

#: Seconds between two reports: often enough to look alive, rarely enough to cost nothing.
TICK_S = 0.5


class StartProgress:
    """What a start has done so far (see the module docstring)."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.started = time.monotonic()
        self.phase = "listing"
        self.listing_done = False
        self.listed = 0
        self.heads_wanted = 0
        self.heads_done = 0
        self.placed = 0  # listed objects populate has taken (of ``listed``)
        # send() and close() from two threads: never write to an fd number closed (and maybe
        # reused by another open) under the writer.
        self._lock = threading.Lock()

    @classmethod
    def from_environ(cls) -> StartProgress:
        """The reporter for this process: with no inherited fd it counts and says nothing.
        The fd is made close-on-exec here, so programs this daemon runs do not hold it."""
        fd: int | None
        # Taken out of the environment: nothing this process starts may inherit the number
        # of an fd it does not have (the kernel door's holder hands its worker a copy).
        raw = os.environ.pop(ENV_FD, None)
        try:
            fd = int(raw) if raw is not None else None
            if fd is not None and not stat.S_ISFIFO(os.fstat(fd).st_mode):
                fd = None  # a stale number naming some other file: never write into it
            if fd is not None:
                os.set_inheritable(fd, False)
                os.set_blocking(fd, False)
        except (ValueError, OSError):
            fd = None
        return cls(fd)

    def snapshot(self) -> dict[str, object]:
        return {"phase": self.phase, "listing_done": self.listing_done, "listed": self.listed,
                "heads_wanted": self.heads_wanted, "heads_done": self.heads_done,
                "to_place": self.listed, "placed": self.placed,
                "elapsed": round(time.monotonic() - self.started, 1)}

    def send(self) -> None:
        """One report now; the reports end for good once nobody reads them."""
        line = (json.dumps(self.snapshot()) + "\n").encode()
        with self._lock:
            if self.fd is None:
                return
            try:
                os.write(self.fd, line)  # < PIPE_BUF: written whole or not at all
                return
            except BlockingIOError:
                return  # the reader is behind: this tick is dropped, the next one says more
            except OSError:
                pass  # EPIPE: the waiting command is gone (it stopped waiting)
        self.close()

    def start(self) -> None:
        """Report every tick from a thread until :meth:`close`: the loop is busy with the
        listing, and populate runs in a worker thread, so neither can be asked to."""
        if self.fd is None:
            return

        def loop() -> None:
            while self.fd is not None:
                self.send()
                time.sleep(TICK_S)

        threading.Thread(target=loop, name="start-progress", daemon=True).start()

    def finish(self) -> None:
        """The start is over (ready, or failed): one last report, then no more."""
        self.phase = "ready"
        self.send()
        self.close()

    def close(self) -> None:
        with self._lock:
            if self.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self.fd)
                self.fd = None


def render(p: dict[str, object], width: int) -> str:
    """One line for a report: counts always, a bar once the total is known (the listing is
    whole: stubs are made while it still arrives, so their total grows until then)."""
    listed = int(p.get("listed", 0))  # type: ignore[arg-type]
    whole = bool(p.get("listing_done"))
    parts = [f"listed {listed:,} objects" if whole else f"listing: {listed:,} objects"]
    wanted = int(p.get("heads_wanted", 0))  # type: ignore[arg-type]
    if wanted:
        parts.append(f"HEAD {int(p.get('heads_done', 0)):,}/{wanted:,}")  # type: ignore[arg-type]
    done, total = 0, 0
    if p.get("phase") == "populating":
        done = int(p.get("placed", 0))  # type: ignore[arg-type]
        total = int(p.get("to_place", 0)) if whole else 0  # type: ignore[arg-type]
        parts.append(f"stubs {done:,}/{total:,}" if total else f"stubs {done:,}")
    elif p.get("phase") == "guarding":
        parts.append("guarding the stubs")
    text = "hsmfs: " + " · ".join(parts) + f" · {float(p.get('elapsed', 0)):.0f} s"  # type: ignore[arg-type]
    room = width - len(text) - 3
    if total and room >= 10:
        filled = min(room, room * done // total)
        text += " [" + "#" * filled + "." * (room - filled) + "]"
    return text[: max(width - 1, 1)]


class ProgressLine:
    """Draws the newest report over itself on a terminal; does nothing anywhere else."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self.live = self.out.isatty()
        self.buf = b""
        self.drawn = False

    def feed(self, data: bytes) -> None:
        """Take bytes read from the pipe; draw the last whole line among them."""
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        if not lines or not self.live:
            return
        try:
            report = json.loads(lines[-1])
        except ValueError:
            return
        width = shutil.get_terminal_size((100, 24)).columns
        self.out.write("\r\x1b[K" + render(report, width))
        self.out.flush()
        self.drawn = True

    def clear(self) -> None:
        """Wipe the line, so the outcome's own line starts clean."""
        if self.drawn:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self.drawn = False
