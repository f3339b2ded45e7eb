"""The fault matrix (issue 13, item 1): each S3 fault x each door x each operation.

Every cell asserts, against the one table in ``tests/support/faultmatrix.py`` (which the README
prints): the errno the operation ends with when the fault outlasts the retry budget (the
errno table of hsmfs/errors.py), that the unaware tool printed its usual message, that no
hole was ever handed out as data, that the daemon keeps serving other files, that exactly one
log line (level WARNING or above) names the object, and that it names key, range, HTTP status
and cause; and for a transient fault, that one which clears within the budget ends with the
right bytes (compared with S3).

Cost: one daemon per door for the module (module-scoped ``served``), one fresh object per
cell, faults matched by key in the proxy, short ``timeout=`` and ``retries=``.  Operations run
as subprocesses with a timeout: a read blocked in FUSE or fanotify cannot be woken in-process.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, Bucket, MotoServer, seeded, uncover_under
from support.doors import DOORS, Served, serve_door
from support.faultmatrix import FAULTS, LATENCY_MS, OPS, Fault, Op, expected, logged, strerror

from hsmfs.faultproxy import FaultProxy

#: The client's read timeout and retries: a stall of STALL_S is past it, and a persistent
#: fault costs RETRIES + 1 attempts (full-jitter backoff from 0.1 s).
TIMEOUT_S = 1.0  # every request of the daemon pays it: moto on a loaded VM needs margin
RETRIES = 1
STALL_S = 2.5
#: A fault armed "for good" (until the cell clears it).
FOREVER = 1000
#: Each operation's own bound (a hang is a failure, never a stuck test).
OP_TIMEOUT_S = 30
SIZE = 100_000  # below small_file and open_fill: one whole-file GET per object
CUT = 1000  # bytes of a body sent before a cut: fewer than any object has

pytestmark = [pytest.mark.timeout(120)]

ELF = Path(shutil.which("echo") or "/usr/bin/echo").read_bytes()


def _db_bytes(tmp: Path) -> bytes:
    path = tmp / "cell.db"
    con = sqlite3.connect(path)
    con.execute("create table t (id integer primary key, v text)")
    con.executemany("insert into t values (?, ?)", [(i, f"v{i}") for i in range(300)])
    con.commit()
    con.close()
    return path.read_bytes()


# -- module fixtures: S3, proxy, bucket of one object per cell, one daemon per door -------------

@pytest.fixture(scope="module")
def proxy(moto: MotoServer) -> Iterator[FaultProxy]:
    p = FaultProxy(moto.endpoint)
    p.start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def cells(moto: MotoServer, tmp_path_factory: pytest.TempPathFactory) -> Bucket:
    """A bucket holding, for each (fault, op): ``a`` (meets the fault for good), ``b`` (meets
    it once), ``d`` (read cold while ``a`` fails) and one resident-to-be ``c`` per fault."""
    b = Bucket(moto.client(), f"faults-{uuid.uuid4().hex[:10]}")
    db = _db_bytes(tmp_path_factory.mktemp("db"))
    for fault in FAULTS:
        b.put(f"{fault.name}/c.bin", seeded(SIZE, f"{fault.name}/c"))
        for op in OPS:
            for which in "abd":
                key = _key(fault, op, which)
                b.put(key, ELF if op.name == "exec" and which != "d"
                      else db if op.name == "sqlite3" and which != "d"
                      else seeded(SIZE, key), mode=0o100755 if op.name == "exec" else None)
    return b


@pytest.fixture(scope="module", params=DOORS)
def served(request: pytest.FixtureRequest, cells: Bucket, proxy: FaultProxy,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    work = tmp_path_factory.mktemp(f"faults-{request.param}")
    try:
        yield from _serve(request.param, work, cells, proxy)
    finally:
        uncover_under(work)  # a kernel door's stop covers its dir (the autouse fixture is per test)


def _serve(kind: str, work: Path, cells: Bucket, proxy: FaultProxy) -> Iterator[Served]:
    with serve_door(kind, f"s3://{cells.name}", work, proxy.endpoint,
                    f"timeout={TIMEOUT_S}", f"retries={RETRIES}",
                    # No HEAD per object at start (310 of them): every file 0755 instead of
                    # the exec objects' x-amz-meta-mode (hostile modes: t4_hostile.py).
                    "head=0", "file_mode=0755",
                    # Every cell's objects share a directory: read-ahead of siblings would
                    # fetch them before their fault is armed.
                    "dir_readahead=off") as d:
        yield d


def _key(fault: Fault, op: Op, which: str) -> str:
    ext = ".db" if op.name == "sqlite3" and which != "d" else ".bin"
    return f"{fault.name}/{op.name}-{which}{ext}"


# -- faults -------------------------------------------------------------------------------------

def _arm(proxy: FaultProxy, fault: Fault, key: str, n: int, method: str | None) -> None:
    """Make the next ``n`` requests for ``key`` meet ``fault`` (``gone``: every request)."""
    match = f"/{key}"
    if fault.name == "slowdown":
        proxy.fail_next(n, 503, "SlowDown", method=method, match=match)
    elif fault.name == "internal":
        proxy.fail_next(n, 500, "InternalError", method=method, match=match)
    elif fault.name == "denied":
        proxy.fail_next(n, 403, "AccessDenied", method=method, match=match)
    elif fault.name == "missing":
        proxy.fail_next(n, 404, "NoSuchKey", method=method, match=match)
    elif fault.name == "changed":
        proxy.fail_next(n, 412, "PreconditionFailed", method=method, match=match)
    elif fault.name == "reset":
        proxy.reset_next(n, keep=CUT, method=method, match=match)
    elif fault.name == "truncated":
        proxy.truncate_next(n, keep=CUT, method=method, match=match)
    elif fault.name == "latency":
        proxy.set_delay(LATENCY_MS, method=method, match=match)
    elif fault.name == "stall":
        proxy.stall_next(n, STALL_S, method=method, match=match)
    elif fault.name == "gone":
        proxy.refuse()
    else:
        raise AssertionError(fault)


# -- operations (subprocesses, each bounded) ----------------------------------------------------

_PY_PREAD = ("import os, sys, hashlib; fd = os.open(sys.argv[1], os.O_RDONLY); "
             "sys.stdout.write(hashlib.sha256(os.pread(fd, 4096, 8192)).hexdigest())")
_PY_MMAP = ("import mmap, sys, hashlib; f = open(sys.argv[1], 'rb'); "
            "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ); "
            "sys.stdout.write(hashlib.sha256(m[:]).hexdigest())")
# What the program got: its bytes' digest, or "None" (io's answer to EAGAIN: "no data yet").
_PY_READ = ("import sys, hashlib; data = open(sys.argv[1], 'rb').read(); "
            "sys.stdout.write('None' if data is None else hashlib.sha256(data).hexdigest())")
_PY_WRITE = ("import os, sys; fd = os.open(sys.argv[1], os.O_WRONLY); "
             "os.pwrite(fd, b'hsmfs', 100); os.close(fd)")
PATCH = (100, b"hsmfs")
NEW = b"new bytes " * 1000  # what an archive cell's file holds when archived
SQL = "select count(*), sum(length(v)) from t;"


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, timeout=OP_TIMEOUT_S)


def _hsmfs(*args: str) -> list[str]:
    return [sys.executable, "-m", "hsmfs", *args]


def run_op(op: Op, path: Path, tmp: Path) -> subprocess.CompletedProcess:
    py = sys.executable, "-S"  # no site: a third of the interpreter's start-up
    match op.name:
        case "read":
            return _run(["cat", str(path)])
        case "pread":
            return _run([*py, "-c", _PY_PREAD, str(path)])
        case "mmap":
            return _run([*py, "-c", _PY_MMAP, str(path)])
        case "exec":
            return _run(["env", str(path), "hsmfs-ok"])
        case "cp":
            dst = tmp / f"copy-{uuid.uuid4().hex[:8]}"
            out = _run(["cp", str(path), str(dst)])
            out.copied = dst  # type: ignore[attr-defined]
            return out
        case "sqlite3":
            return _run(["sqlite3", f"file:{path}?immutable=1", SQL])
        case "pyread":
            return _run([*py, "-c", _PY_READ, str(path)])
        case "write":
            return _run([*py, "-c", _PY_WRITE, str(path)])
        case "archive":
            return _run(_hsmfs("archive", str(path)))
        case "release":
            return _run(_hsmfs("release", str(path)))
    raise AssertionError(op)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_right(op: Op, out: subprocess.CompletedProcess, path: Path, want: bytes) -> None:
    """The operation succeeded with S3's bytes (``want``: the object as S3 holds it)."""
    assert out.returncode == 0, (op.name, out.returncode, out.stderr[-500:])
    match op.name:
        case "read":
            assert out.stdout == want
        case "pread":
            assert out.stdout.decode() == _sha(want[8192:8192 + 4096])
        case "mmap" | "pyread":
            assert out.stdout.decode() == _sha(want)
        case "exec":
            assert out.stdout == b"hsmfs-ok\n"
        case "cp":
            assert out.copied.read_bytes() == want  # type: ignore[attr-defined]
        case "sqlite3":
            assert out.stdout.strip() == _sqlite_answer()
        case "archive":
            assert want == NEW, "S3 does not hold the archived bytes"
        case "write":
            at, patch = PATCH
            assert _run(["cat", str(path)]).stdout == want[:at] + patch + want[at + len(patch):]


def _sqlite_answer() -> bytes:
    return f"300|{sum(len(f'v{i}') for i in range(300))}".encode()


# -- what the tool said -----------------------------------------------------------------------

_ERRNO_NAMES = {strerror(n): n for n in ("EIO", "EAGAIN", "EPERM", "EBUSY", "ENOSPC",
                                         "ETXTBSY", "EDQUOT")}


def outcome(op: Op, out: subprocess.CompletedProcess) -> str:
    """The cell's outcome as the table spells it, read from the tool's own output."""
    err = out.stderr.decode(errors="replace")
    if op.name == "release":
        return out.stdout.decode().split()[0] if out.stdout else f"rc {out.returncode}: {err}"
    if op.name == "archive":
        words = out.stdout.decode().split()
        if not words:
            return f"rc {out.returncode}: {err}"
        if words[0] == "failed":
            return f"failed {words[2].rstrip(':')}"
        return words[0]
    if out.returncode == 0:
        return "read() returns None (?)" if out.stdout == b"None" else "ok"
    if out.returncode == -7:
        return "SIGBUS (?)"  # the errno is the log line's (checked there)
    if op.name == "sqlite3":
        for text in ("disk I/O error", "unable to open database file"):
            if text in err:
                return f"{text} (?)"
        return f"sqlite3: {err.strip()}"
    for text, name in _ERRNO_NAMES.items():
        if text in err:
            return name
    return f"rc {out.returncode}: {err.strip()[-300:]}"


#: The usual message of each unaware tool, for an errno's text (``{e}``).
USUAL = {
    # (coreutils quote a name in the locale's quotation marks, not always ASCII ones.)
    "read": r"^cat: .*: {e}$",
    "cp": r"^cp: (error reading|cannot open) .*?( for reading)?: {e}$",
    "exec": r"^env: .*: {e}$",
    "pread": r"^\w+Error: \[Errno \d+\] {e}(: .*)?$",
    "pyread": r"^\w+Error: \[Errno \d+\] {e}(: .*)?$",
    "mmap": r"^\w+Error: \[Errno \d+\] {e}(: .*)?$",
    "write": r"^\w+Error: \[Errno \d+\] {e}(: .*)?$",
    "sqlite3": r"disk I/O error|unable to open database file",
}


def assert_usual_message(op: Op, errno_name: str, out: subprocess.CompletedProcess) -> None:
    if out.returncode < 0 or op.name not in USUAL or out.stdout == b"None":
        return  # a signal, or read() returning None, prints nothing
    pattern = re.compile(USUAL[op.name].format(e=re.escape(strerror(errno_name))), re.M)
    assert pattern.search(out.stderr.decode(errors="replace")), out.stderr[-500:]


# -- the log line -------------------------------------------------------------------------------

_LINE = re.compile(r"(?P<level>WARNING|ERROR) .*(?:fetch|archive) of '(?P<key>[^']+)' "
                   r"(?:\[(?P<start>\d+), (?P<stop>\d+)\) )?failed \((?P<cause>\w+), "
                   r"(?P<status>HTTP \d+|no HTTP answer)\)")


def loud_lines(d: Served, key: str, since: int) -> list[str]:
    """The log lines at WARNING or above naming ``key``, written after offset ``since``."""
    text = d.log_path.read_bytes()[since:].decode(errors="replace")
    return [line for line in text.splitlines()
            if f"'{key}'" in line and (" WARNING " in line or " ERROR " in line)]


def assert_one_line(d: Served, fault: Fault, op: Op, key: str, since: int) -> None:
    lines = loud_lines(d, key, since)
    assert len(lines) == 1, lines
    m = _LINE.search(lines[0])
    assert m, lines[0]
    assert m["key"] == key and (m["cause"], m["status"]) == logged(fault, op), lines
    if op.fetches:
        assert m["start"] is not None and 0 <= int(m["start"]) < int(m["stop"]) <= SIZE * 2


# -- the matrix -------------------------------------------------------------------------------

def _cells() -> list:
    return [pytest.param(f, op, id=f"{f.name}-{op.name}") for f in FAULTS for op in OPS]


@pytest.mark.parametrize(("fault", "op"), _cells())
def test_cell(served: Served, fault: Fault, op: Op, cells: Bucket, proxy: FaultProxy,
              tmp_path: Path) -> None:
    d = served
    door = d.kind
    want = expected(fault, door, op)
    key_a, key_d = _key(fault, op, "a"), _key(fault, op, "d")
    path_a = d.root / key_a
    control = f"{fault.name}/c.bin"
    # The fault's control file is resident before the fault: it must keep reading even with S3
    # gone.  (Idempotent: later cells of this fault find it resident.)
    assert _run(["cat", str(d.root / control)]).stdout == cells.objects[control]
    prepare(op, path_a, d)
    method = _method(op)
    since = d.log_path.stat().st_size
    proxy.reset_counts()
    try:
        _arm(proxy, fault, key_a, FOREVER, method)
        out = run_op(op, path_a, tmp_path)
        got = outcome(op, out)
        # The errno is the tool's where it prints one; sqlite3 and SIGBUS print none, so their
        # "(?)" is the table's errno, proven by the log line below (cause -> errno).
        assert got.replace("(?)", f"({fault.errno})") == want, (got, out.stderr[-400:])
        never_a_hole(op, out, cells.objects.get(key_a, b""))
        if op.name == "release":
            assert proxy.count(match=f"/{key_a}") == 0  # release asks S3 nothing
        elif want == "ok" or want == "uploaded":
            assert_right(op, out, path_a, _s3_bytes(cells, key_a))
        elif want != "conflict":
            assert fault.errno is not None
            assert_usual_message(op, fault.errno, out)
            assert_one_line(d, fault, op, key_a, since)
        # The daemon keeps serving: the resident control file, and (S3 permitting) a cold one.
        assert _run(["cat", str(d.root / control)]).stdout == cells.objects[control]
        if fault.name != "gone":
            assert _run(["cat", str(d.root / key_d)]).stdout == cells.objects[key_d]
    finally:
        proxy.restore()
    if fault.name == "gone":
        assert _run(["cat", str(d.root / key_d)]).stdout == cells.objects[key_d]
    if fault.transient and op.name != "release":
        clears(fault, op, d, cells, proxy, tmp_path)


def clears(fault: Fault, op: Op, d: Served, cells: Bucket, proxy: FaultProxy,
           tmp: Path) -> None:
    """A transient fault: one that clears within the retry budget ends with the right bytes
    (``b``), and the file that failed past the budget reads right once S3 is back (``a``:
    nothing of the failure was kept as data)."""
    key_a, key_b = _key(fault, op, "a"), _key(fault, op, "b")
    path_a, path_b = d.root / key_a, d.root / key_b
    prepare(op, path_b, d)
    proxy.reset_counts()
    if fault.name != "gone":  # S3 gone for one attempt only is a race, not a test
        _arm(proxy, fault, key_b, 1, _method(op))
    try:
        out = run_op(op, path_b, tmp)
    finally:
        proxy.restore()
    assert outcome(op, out) == ("uploaded" if op.name == "archive" else "ok"), out.stderr
    assert_right(op, out, path_b, _s3_bytes(cells, key_b))
    if fault.name != "gone":  # it met the fault, then got through
        assert proxy.count(match=f"/{key_b}", action="pass") >= 1
        assert proxy.count(match=f"/{key_b}") > proxy.count(match=f"/{key_b}", action="pass")
    out = run_op(op, path_a, tmp)
    assert outcome(op, out) == ("uploaded" if op.name == "archive" else "ok"), out.stderr
    assert_right(op, out, path_a, _s3_bytes(cells, key_a))


def _method(op: Op) -> str | None:
    """The requests a cell's fault hits: a read's GETs, an archive's PUT (the request whose
    answer decides it; its HEADs ask who is there), and every request for a release."""
    return "GET" if op.fetches else "PUT" if op.name == "archive" else None


def prepare(op: Op, path: Path, d: Served) -> None:
    """Before the fault: a release needs a resident file, an archive a dirty one."""
    if op.name == "release":
        assert _run(["cat", str(path)]).returncode == 0
    elif op.name == "archive":
        out = _run([sys.executable, "-c",
                    f"import sys; open(sys.argv[1], 'wb').write({NEW!r})",
                    str(path)])
        assert out.returncode == 0, out.stderr


def _s3_bytes(cells: Bucket, key: str) -> bytes:
    return cells.client.get_object(Bucket=cells.name, Key=key)["Body"].read()


def never_a_hole(op: Op, out: subprocess.CompletedProcess, data: bytes) -> None:
    """Whatever a failing tool printed was S3's bytes, never a hole read as zeros."""
    if op.name == "read" and out.returncode != 0:
        assert data.startswith(out.stdout), "cat printed bytes that are not S3's"
    if op.name == "cp" and out.returncode != 0:
        copied: Path = out.copied  # type: ignore[attr-defined]
        if copied.exists():
            assert data.startswith(copied.read_bytes()), "cp copied bytes that are not S3's"


def test_readme_prints_the_matrix() -> None:
    """The README's fault matrix is the table the cells above assert."""
    out = subprocess.run([sys.executable, "scripts/fault_matrix.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert os.path.exists(ROOT / "README.md")
