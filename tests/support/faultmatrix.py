"""The fault matrix: what each S3 fault does to each operation through each door.

One table, two readers: ``tests/t4_faults.py`` asserts every cell against it, and
``scripts/fault_matrix.py`` writes it into the README (between ``<!-- faults:begin -->`` and
``<!-- faults:end -->``), so the README cannot drift from what the tests prove.  Edit the
table here, never the README's copy.

An outcome is what the operation ends with when the fault persists past the retry budget:
an errno name (what the tool reported), ``SIGBUS (EIO)`` (a page fault of a mapping that
could not be filled), ``ok`` (right bytes), or for the commands their result word.  A
transient fault that clears within the budget always ends with the right bytes; the
``clears`` column says which faults are retried at all.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

#: The added latency of the "latency" row: well below the tests' read timeout (0.5 s), so
#: it must end with the right bytes even on a loaded machine.
LATENCY_MS = 150


@dataclass(frozen=True)
class Fault:
    name: str  # the test id
    label: str  # the README's words
    errno: str | None  # what a read gets once retries are exhausted; None: it never fails
    transient: bool  # retried by the backend: clears within the budget -> right bytes
    status: str  # what the failure's log line names: "HTTP 503" or "no HTTP answer"
    cause: str  # the log line's and the counters' cause word


FAULTS: tuple[Fault, ...] = (
    Fault("slowdown", "503 SlowDown", "EIO", True, "HTTP 503", "throttled"),
    Fault("internal", "500 InternalError", "EIO", True, "HTTP 500", "unavailable"),
    Fault("denied", "403 AccessDenied", "EPERM", False, "HTTP 403", "denied"),
    Fault("missing", "404 NoSuchKey", "EIO", False, "HTTP 404", "missing"),
    Fault("changed", "412 PreconditionFailed", "EIO", False, "HTTP 412", "changed"),
    Fault("reset", "connection reset mid-body", "EIO", True, "HTTP 206", "short_body"),
    Fault("truncated", "body cut short (clean close)", "EIO", True, "HTTP 206", "short_body"),
    Fault("latency", f"{LATENCY_MS} ms added latency", None, False, "", ""),
    Fault("stall", "stall past the read timeout", "EIO", True, "no HTTP answer",
          "throttled"),
    Fault("gone", "S3 gone (connection refused)", "EIO", True, "no HTTP answer",
          "unavailable"),
)


@dataclass(frozen=True)
class Op:
    name: str
    label: str
    fetches: bool  # reads bytes from S3 through the door (else: a command of the daemon)


OPS: tuple[Op, ...] = (
    Op("read", "`cat`", True),
    Op("pread", "`pread`", True),
    Op("mmap", "`mmap`", True),
    Op("exec", "exec", True),
    Op("cp", "`cp`", True),
    Op("sqlite3", "`sqlite3`", True),
    Op("pyread", "`open().read()`", True),
    Op("write", "write to a stub", True),
    Op("archive", "`hsmfs archive`", False),
    Op("release", "`hsmfs release`", False),
)

DOOR_NAMES = ("fuse", "kernel")


def expected(fault: Fault, door: str, op: Op) -> str:
    """The outcome of one cell once the fault outlasts the retry budget."""
    if op.name == "release":
        # Release punches clean local bytes; it asks S3 nothing, so no fault reaches it.
        return "released"
    if op.name == "archive":
        return _archive(fault)
    if fault.errno is None:
        return "ok"
    if op.name == "mmap" and door == "fuse":
        # A page fault the FUSE daemon answered with an error: the kernel sends SIGBUS.
        # (The kernel door fills at open: the open itself fails with the errno.)
        return f"SIGBUS ({fault.errno})"
    if op.name == "sqlite3":
        # sqlite3 names no errno: a read error is SQLITE_IOERR, "disk I/O error"; an open
        # error (the kernel door fills at open) SQLITE_CANTOPEN.
        what = "disk I/O error" if door == "fuse" else "unable to open database file"
        return f"{what} ({fault.errno})"
    return fault.errno


def logged(fault: Fault, op: Op) -> tuple[str, str]:
    """(cause, HTTP status) the cell's one log line names."""
    if op.name == "archive" and fault.name in ("reset", "truncated"):
        # A PUT's answer has no body to cut: it is cut in its status line (no answer).
        return "unavailable", "no HTTP answer"
    return fault.cause, fault.status


def _archive(fault: Fault) -> str:
    """``hsmfs archive`` of a dirty file whose PUT meets the fault."""
    if fault.errno is None:
        return "uploaded"
    if fault.name in ("changed", "missing"):
        # If-Match failed or the base is gone: S3 holds another version; bytes kept.
        return "conflict"
    return f"failed {fault.errno}"


def strerror(name: str) -> str:
    """``EIO`` -> ``Input/output error``."""
    import os

    return os.strerror(getattr(errno, name))


def matrix_markdown() -> str:
    """The README's table: a row per fault, a column per operation; a cell names both doors'
    outcome once when they agree, else ``FUSE: x; kernel: y``."""
    head = ["fault", "log line", "clears in budget", *(op.label for op in OPS)]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for fault in FAULTS:
        line = f"`{fault.cause}, {fault.status}`" if fault.cause else "none"
        for op in OPS:
            if fault.cause and logged(fault, op) != (fault.cause, fault.status):
                line += f" ({op.label}: `{', '.join(logged(fault, op))}`)"
        # S3 gone for exactly one attempt cannot be arranged without a race: the test shows
        # the right bytes once S3 is back, and a clearing fault is the other faults' rows.
        clears = ("right bytes once back" if fault.name == "gone"
                  else "right bytes" if fault.transient else "—")
        cells = [fault.label, line, clears]
        for op in OPS:
            fuse, kernel = (expected(fault, d, op) for d in DOOR_NAMES)
            cells.append(fuse if fuse == kernel else f"FUSE: {fuse}; kernel: {kernel}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
