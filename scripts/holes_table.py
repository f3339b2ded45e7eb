#!/usr/bin/env python3
"""Which copy tools copy a cold hsmfs stub's holes as zeros, per open_fill setting and filesystem.

Why this exists: ``SEEK_DATA``/``SEEK_HOLE``, ``FIEMAP`` and readahead raise no fanotify event
(KERNEL_FACTS §3, §11), so a tool that trusts a stub's holes copies zeros without the kernel door
ever hearing of it.  hsmfs's answer is the open-time fill (KERNEL_FACTS_2 §1, DESIGN §6); this
script measures, with the real ``hsmfs serve`` and real tools, exactly which combinations that
answer covers and which it does not, and writes the result to ``docs/holes.md``.

For every (filesystem layout, ``open_fill`` setting) pair it starts one kernel door on a fresh
cache, with one cold 1 MiB + 123 byte object per tool, copies each cold stub once, and compares the
copy's sha256 with the S3 object's, recording the door's event and fetch counters around the copy
(``hsmfs stats --json``).  Layouts: a cache directory inside ext4 ``/`` (per-stub inode marks),
and loop-mounted ext4, xfs and btrfs images whose root *is* the cache (one filesystem mark).
Copies go out of the cache to ``/`` on the ext4 layouts; on xfs and btrfs they stay inside the
same filesystem, so that ``cp``'s default ``--reflink=auto`` really clones.

Run as root, from the repository root::

    python3 scripts/holes_table.py            # prints the table, writes docs/holes.md
    python3 scripts/holes_table.py --no-doc   # prints only

Everything it starts (moto, the doors) is stopped by PID and every loop mount is unmounted in
``finally`` blocks; every child runs under a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from conftest import (  # noqa: E402 - the test helpers live beside the tests
    AWS_ENV,
    MotoServer,
    _precontent_missing,
    file_sha256,
    seeded,
    sha256,
)
from support.doors import Served, serve_door  # noqa: E402

#: Not page-aligned, so a fill that stops at a page or chunk boundary shows up as wrong bytes.
SIZE = 1024 * 1024 + 123
#: A sparse image of this size gets mke2fs's "default" profile (4 KiB blocks, 256-byte inodes);
#: below 512 MiB it would pick "small" (1 KiB blocks), which is not what a cache volume uses.
IMAGE_SIZE = "1G"
COPY_TIMEOUT = 60.0


@dataclasses.dataclass(frozen=True)
class Layout:
    key: str
    label: str
    mkfs: tuple[str, ...] | None  # None: a plain directory on ext4 `/`
    reflink: bool  # FICLONE works inside it
    expected_mark: str


LAYOUTS = [
    Layout("root", "ext4 `/` (inode marks)", None, False, "inode"),
    Layout("ext4", "ext4 loop root (fs mark)", ("mkfs.ext4", "-q", "-F"), False, "filesystem"),
    Layout("xfs", "xfs loop root (fs mark)", ("mkfs.xfs", "-q", "-f"), True, "filesystem"),
    Layout("btrfs", "btrfs loop root (fs mark)", ("mkfs.btrfs", "-q", "-f"), True, "filesystem"),
]


@dataclasses.dataclass(frozen=True)
class Setting:
    key: str
    label: str
    opts: tuple[str, ...]


SETTINGS = [
    Setting("off", "`open_fill=off`", ("open_fill=off",)),
    Setting("below", "default, file below 64 MiB", ()),
    Setting("above", "`open_fill=256K`, 1 MiB file (above)", ("open_fill=256K",)),
    Setting("all", "`open_fill=all`", ("open_fill=all",)),
]

# tool name -> (source file, destination directory) -> (argv, destination file)
Copier = Callable[[Path, Path], tuple[list[str], Path]]


def _tar(src: Path, out: Path) -> tuple[list[str], Path]:
    script = (f"tar -C '{src.parent}' -cSf - '{src.name}' | tar -C '{out}' -xf -")
    return ["bash", "-o", "pipefail", "-c", script], out / src.name


TOOLS: dict[str, Copier] = {
    "cp": lambda s, o: (["cp", str(s), str(o / s.name)], o / s.name),
    "cp --sparse=never": lambda s, o: (["cp", "--sparse=never", str(s), str(o / s.name)],
                                       o / s.name),
    "cp --reflink=always": lambda s, o: (["cp", "--reflink=always", str(s), str(o / s.name)],
                                         o / s.name),
    "tar -cSf - | tar -xf -": _tar,
    "rsync -S": lambda s, o: (["rsync", "-S", str(s), str(o / s.name)], o / s.name),
    "shutil.copyfile": lambda s, o: ([sys.executable, "-c",
                                      f"import shutil; shutil.copyfile({str(s)!r}, "
                                      f"{str(o / s.name)!r})"], o / s.name),
}


@dataclasses.dataclass
class Cell:
    """One copy of one cold stub: what came out, and what the door saw while it ran."""

    tool: str
    layout: str
    setting: str
    outcome: str  # "ok", "zeros", "wrong", "error", "n/a"
    events: dict[str, int] = dataclasses.field(default_factory=dict)
    not_ours: int = 0
    open_fills: int = 0
    fetched: int = 0
    blocks_before: int = 0
    note: str = ""

    @property
    def symbol(self) -> str:
        return {"ok": "✓", "zeros": "✗ zeros", "wrong": "✗ wrong", "error": "error",
                "n/a": "n/a"}[self.outcome]


# -- loop filesystems ------------------------------------------------------------------------

def _run(cmd: list[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, timeout=timeout, check=check)


def _mounted(path: Path) -> bool:
    from hsmfs.mounts import is_mounted

    return is_mounted(os.path.realpath(path))


@contextlib.contextmanager
def loop_fs(mkfs: tuple[str, ...], image: Path, mountpoint: Path) -> Iterator[Path]:
    """A fresh loop filesystem mounted at ``mountpoint``; unmounted and detached whatever happens.

    Lazy umount is the fallback for a mount some straggler still holds; the loop device is
    then detached explicitly, because autoclear only fires once the last reference is gone.
    """
    mountpoint.mkdir(parents=True, exist_ok=True)
    _run(["truncate", "-s", IMAGE_SIZE, str(image)])
    _run([*mkfs, str(image)], timeout=120)
    _run(["mount", "-o", "loop", str(image), str(mountpoint)])
    try:
        yield mountpoint
    finally:
        if _mounted(mountpoint) and _run(["umount", str(mountpoint)], check=False).returncode:
            _run(["umount", "-l", str(mountpoint)], check=False)
        out = _run(["losetup", "-j", str(image)], check=False).stdout.decode()
        for line in out.splitlines():
            _run(["losetup", "-d", line.split(":", 1)[0]], check=False)
        with contextlib.suppress(OSError):
            image.unlink()


# -- one door, one row of copies ------------------------------------------------------------

def _counters(door: Served) -> dict:
    s = door.stats()
    return {"events": dict(s["kernel"]["events"]), "not_ours": s["kernel"]["not_ours"],
            "open_fills": s["kernel"]["open_fills"], "fetched": s["fetched_bytes"],
            "mark": s["kernel"]["mark"]}


def _slug(tool: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in tool).strip("_")


def _all_zero(path: Path) -> bool:
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            if block.count(0) != len(block):
                return False
    return True


def copy_one(door: Served, tool: str, src: Path, out: Path, want: str, layout: Layout,
             setting: Setting) -> Cell:
    """Copy one cold stub with one tool and judge the copy by digest against S3."""
    cell = Cell(tool, layout.key, setting.key, "n/a")
    if tool == "cp --reflink=always" and not layout.reflink:
        cell.note = "no reflink on ext4"
        return cell
    cell.blocks_before = os.stat(src).st_blocks  # stat raises no event
    before = _counters(door)
    argv, dst = TOOLS[tool](src, out)
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=COPY_TIMEOUT)
        rc, err = proc.returncode, proc.stderr.decode(errors="replace").strip()
    except subprocess.TimeoutExpired:
        rc, err = -1, f"timed out after {COPY_TIMEOUT}s"
    after = _counters(door)
    cell.events = {k: after["events"].get(k, 0) - before["events"].get(k, 0)
                   for k in after["events"] if after["events"].get(k, 0)
                   != before["events"].get(k, 0)}
    cell.not_ours = after["not_ours"] - before["not_ours"]
    cell.open_fills = after["open_fills"] - before["open_fills"]
    cell.fetched = after["fetched"] - before["fetched"]
    if rc != 0 or not dst.exists():
        cell.outcome, cell.note = "error", (err.splitlines() or [f"rc {rc}"])[-1][:120]
    elif file_sha256(dst) == want:
        cell.outcome = "ok"
    else:
        cell.outcome = "zeros" if _all_zero(dst) else "wrong"
    return cell


def measure(layout: Layout, setting: Setting, base: Path, moto: MotoServer) -> list[Cell]:
    """One fresh cache (and filesystem), one door, one cold stub per tool."""
    name = f"holes-{layout.key}-{setting.key}-{os.getpid()}"
    client = moto.client()
    client.create_bucket(Bucket=name)
    objects: dict[str, bytes] = {}
    for tool in TOOLS:
        key = f"{_slug(tool)}.bin"
        objects[key] = seeded(SIZE, f"{name}:{key}")
        client.put_object(Bucket=name, Key=key, Body=objects[key])
    workdir = base / f"{layout.key}-{setting.key}"
    cache = workdir / "cache"
    cache.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        if layout.mkfs is not None:
            stack.enter_context(loop_fs(layout.mkfs, base / f"{layout.key}-{setting.key}.img",
                                        cache))
        door = stack.enter_context(serve_door("kernel", f"s3://{name}", workdir,
                                              moto.endpoint, *setting.opts, "cover=off"))
        mark = door.stats()["kernel"]["mark"]
        if mark != layout.expected_mark:
            raise RuntimeError(f"{layout.key}: expected a {layout.expected_mark} mark, "
                               f"the door reports {mark!r}")
        # ext4 layouts copy out to `/`; xfs/btrfs copy inside the same filesystem (reflink).
        out = cache / "copies" if layout.reflink else workdir / "copies"
        out.mkdir()
        cells = [copy_one(door, tool, cache / f"{_slug(tool)}.bin", out,
                          sha256(objects[f"{_slug(tool)}.bin"]), layout, setting)
                 for tool in TOOLS]
        # The door itself must serve every stub right, or the table means nothing.
        for key, data in objects.items():
            if file_sha256(cache / key) != sha256(data):
                raise RuntimeError(f"{layout.key}/{setting.key}: the door served wrong bytes "
                                   f"for {key}:\n{door.log()[-3000:]}")
    return cells


# -- report ----------------------------------------------------------------------------------

def _md(tool: str) -> str:
    """A tool name as a table cell: GFM splits cells on ``|`` even inside backticks."""
    return "`" + tool.replace("|", "\\|") + "`"


def _fmt_events(cell: Cell) -> str:
    if cell.outcome == "n/a":
        return "-"
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(cell.events.items())) or "none"
    return kinds + (f" ({cell.not_ours} on the copy)" if cell.not_ours else "")


def table(cells: list[Cell], layouts: list[Layout]) -> str:
    """Rows: tools; columns: one per (setting, filesystem)."""
    by = {(c.tool, c.layout, c.setting): c for c in cells}
    cols = [(s, lay) for s in SETTINGS for lay in layouts]
    head = ["tool"] + [f"{s.key} · {lay.key}" for s, lay in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for tool in TOOLS:
        row = [_md(tool)]
        for s, lay in cols:
            c = by.get((tool, lay.key, s.key))
            row.append(c.symbol if c else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def detail(cells: list[Cell]) -> str:
    lines = ["| fs | setting | tool | result | events seen by the door | open fills | "
             "fetched bytes | st_blocks before | note |", "|" + "---|" * 9]
    for c in cells:
        lines.append(f"| {c.layout} | {c.setting} | {_md(c.tool)} | {c.symbol} | {_fmt_events(c)} "
                     f"| {c.open_fills} | {c.fetched} | {c.blocks_before} | {c.note} |")
    return "\n".join(lines)


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "?"


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    tools = {
        "coreutils": _version(["cp", "--version"]),
        "tar": _version(["tar", "--version"]),
        "rsync": _version(["rsync", "--version"]),
        "xfsprogs": _version(["mkfs.xfs", "-V"]),
        "btrfs-progs": _version(["mkfs.btrfs", "--version"]),
        "e2fsprogs": _version(["mke2fs", "-V"]),
    }
    lines = [f"- Kernel: `{platform.release()}` ({platform.machine()}), {os.cpu_count()} vCPU, "
             f"{mem:.0f} GiB RAM; Python {platform.python_version()}."]
    lines += [f"- {k}: `{v}`" for k, v in tools.items()]
    return "\n".join(lines)


def unguarded(cells: list[Cell]) -> str:
    """The failing cells, one line per tool: where its copy of a cold stub was wrong."""
    lines = []
    for tool in TOOLS:
        bad = [c for c in cells if c.tool == tool and c.outcome in {"zeros", "wrong", "error"}]
        if bad:
            where = ", ".join(f"{c.setting} · {c.layout} ({c.symbol})" for c in bad)
            lines.append(f"- `{tool}`: {where}")  # not a table: no escaping
    if not lines:
        return "Every measured combination copied the right bytes."
    return "Measured wrong copies of a cold stub:\n\n" + "\n".join(lines)


DOC = """\
# Copy tools and a cold stub's holes

A stub is a sparse file of the object's size: until hsmfs fills it, every byte is a hole.  The
kernel door (`hsmfs serve`) is told about a *read* of a stub (`FAN_PRE_ACCESS`, with its range)
and fills the range before the reader continues.  But a tool that asks the filesystem *where the
data is* before reading never reads the holes: `lseek(SEEK_DATA/SEEK_HOLE)`, `FIEMAP` and
readahead raise **no event at all** (KERNEL_FACTS §3, §11), and `st_blocks` of a stub is ~0.  Such
a tool concludes "all holes" and writes a sparse, all-zero copy, and hsmfs never hears of it.

What hsmfs does about it (DESIGN §6, KERNEL_FACTS_2 §1): it also marks `FAN_OPEN_PERM` and fills
the whole file while the opener waits, for files up to `open_fill` (default 64 MiB; `all` = every
file, `off` = never; `O_TRUNC` opens are not filled).  A tool that stats the file *after* opening
it, as coreutils `cp`, GNU tar and rsync do, then sees a full file.  A whole-file clone (`FICLONE`,
which `cp` tries first on xfs/btrfs) reports `FAN_PRE_ACCESS` with count 0; the door reads that as
"offset to EOF" and fills the file before the clone proceeds.

## Result

Cold stub (never read, {size} bytes, seeded content), copied once; ✓ = the copy's sha256 equals
the S3 object's, ✗ zeros = the copy is all zeros (the holes were copied), ✗ wrong = other wrong
bytes, error = the tool failed, n/a = not applicable (no reflink on ext4).  Columns are
*setting · filesystem*: `off` = `open_fill=off`; `below` = default `open_fill` (64 MiB) with the
1 MiB file below it; `above` = `open_fill=256K`, so the same 1 MiB file is above the threshold;
`all` = `open_fill=all`.  Filesystems: `root` = a cache directory on ext4 `/` (one inode mark per
stub); `ext4`, `xfs`, `btrfs` = a loop-mounted image whose root is the cache (one filesystem
mark).  On `root` and `ext4` the copy goes to `/`; on `xfs` and `btrfs` it stays inside the same
filesystem, so `cp` (default `--reflink=auto`) and `cp --reflink=always` clone.

{table}

## What remains unguarded, and why

{unguarded}

- **Files above `open_fill`** (and every file with `open_fill=off`) are guarded only per access.
  Tools that read every byte get the right bytes either way: `rsync -S` reads the whole file and
  only then decides what to write sparsely, and Python 3.11's `shutil.copyfile` uses
  `sendfile`, which raises an event for its range.  Tools that look for holes first copy zeros
  for every byte not yet filled, and hsmfs cannot notice: the kernel reports neither the probe
  nor the decision that followed it.  Seen with strace on this machine: `cp` (every `--sparse`
  mode) calls `lseek(fd, 0, SEEK_DATA)`, gets `ENXIO` ("no data") and never reads;
  `--sparse=never` merely *writes* the zeros instead of leaving holes.  `tar -cS` does the same
  `SEEK_DATA` probe and stores an all-hole member.  (A partly filled stub would be copied with
  its filled ranges right and its holes as zeros: the same mechanism, not measured here.)
- **Whole-file clones are guarded at every setting.**  On xfs and btrfs, `cp` tries `FICLONE`
  before anything else (its default is `--reflink=auto`; `--sparse=never` does not change that),
  and the clone raises one `PRE_ACCESS(0, 0)` on the source (and one on the destination).  The
  door reads count 0 as "to EOF" and fills the whole file before the kernel shares its extents,
  which is why `cp` is ✓ on xfs/btrfs even with `open_fill=off`, while `tar -S` on the same
  filesystem is not.  Copied to *another* filesystem, the clone fails with `EXDEV` and `cp`
  falls back to the `SEEK_DATA` path of the ext4 columns (not a column here; see the strace
  above).  `FICLONERANGE` reports its exact range (KERNEL_FACTS §3).
- **What the kernel never reports**, so that no setting can help: `SEEK_DATA`/`SEEK_HOLE`,
  `FIEMAP`, `readahead(2)`/`posix_fadvise(WILLNEED)`, page faults after the `mmap()`-time event,
  `mremap` growth, `open(O_PATH)`, and any access through an fd opened before the mark existed.
  The open-time fill covers `cp`, `tar` and `rsync` only because they `fstat` the file *after*
  opening it (by then it is full, and `st_blocks` says so).  A tool that trusted a
  `stat()` or `st_blocks` taken before its own `open()` would still copy zeros.
- With a **filesystem mark** (`ext4`, `xfs`, `btrfs` columns), files that are not stubs (here,
  the copies written inside the cache filesystem) raise events too; the door answers them at
  once without fetching (`not_ours`): the "(n on the copy)" in the detail table.

To copy a large cold file with a hole-trusting tool, read it once first (`cat FILE >/dev/null`)
or raise `open_fill` (`open_fill=all` fills every file whole at open, at the price of fetching
whole objects that an application only wanted to open).

## Detail (events and fetches the door counted during each copy)

{detail}

## Machine

{machine}

Measured {date}, {duration:.0f} s.

## Reproduce

As root, on a kernel with fanotify pre-content events (Linux >= 6.14), from the repository root:

```
apt-get install -y xfsprogs btrfs-progs rsync
python3 scripts/holes_table.py
```

It starts its own moto S3 server, builds fresh loop images under a temporary directory, and
writes this file.
"""


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-doc", action="store_true", help="print, do not write docs/holes.md")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "holes.md")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("holes_table: run as root (loop mounts, fanotify)", file=sys.stderr)
        return 2
    if (why := _precontent_missing()) is not None:
        print(f"holes_table: no fanotify pre-content events here: {why}", file=sys.stderr)
        return 2
    missing = [t for t in ("rsync", "tar", "mkfs.ext4", "losetup") if shutil.which(t) is None]
    if missing:
        print(f"holes_table: missing {missing}", file=sys.stderr)
        return 2
    layouts = []
    for lay in LAYOUTS:
        if lay.mkfs is None or shutil.which(lay.mkfs[0]):
            layouts.append(lay)
        else:
            print(f"holes_table: {lay.mkfs[0]} missing: skipping {lay.key} "
                  "(apt-get install xfsprogs btrfs-progs)", file=sys.stderr)
    signal.signal(signal.SIGTERM, _interrupt)
    os.environ.update(AWS_ENV)
    started = time.monotonic()
    cells: list[Cell] = []
    base = Path(tempfile.mkdtemp(prefix="hsmfs-holes-"))
    moto = MotoServer()
    try:
        moto.start()
        for setting in SETTINGS:
            for lay in layouts:
                print(f"holes_table: {setting.key} on {lay.key} ...", file=sys.stderr)
                cells += measure(lay, setting, base, moto)
    finally:
        moto.stop()
        shutil.rmtree(base, ignore_errors=True)
    duration = time.monotonic() - started
    text = table(cells, layouts)
    print(text)
    print()
    print(detail(cells))
    if not args.no_doc:
        args.doc.parent.mkdir(parents=True, exist_ok=True)
        args.doc.write_text(DOC.format(
            size=SIZE, table=text, unguarded=unguarded(cells), detail=detail(cells),
            machine=machine(), date=time.strftime("%Y-%m-%d"), duration=duration))
        print(f"\nholes_table: wrote {args.doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
