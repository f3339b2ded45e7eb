"""The benchmark's data set: built deterministically on local disk, then uploaded to S3.

Owns: the sizes of each profile (full / quick / net / tiny), the layout every door exposes,
building the files from a seed, the manifest (sizes, hashes, one digest for the whole set) and
the upload (boto3, path-style, concurrent, skipped when the bucket already holds the same
digest).

Layout (relative to a door's root, and to the S3 prefix):
    big.bin              one large random object (sequential, random, mmap workloads)
    tree/dNN/fNNNN.bin   >= 2,000 small random files, 4-64 KiB (tree workload)
    bin/true             a small ELF binary, uploaded with metadata mode=33261 as s3fs writes it
    src/<pkg>/...py      Python stdlib packages copied from this interpreter (grep, compile)
    many/fNN.bin         16 random files of one size (the many-readers workloads)

Random content comes from `random.Random` seeded with a string per group, so a change to one
group's size never changes another group's bytes. The source tree and the binary come from this
machine, so their bytes differ between machines; the manifest digest covers them.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sysconfig
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MiB = 1 << 20
KiB = 1 << 10
BIG = "big.bin"
TREE = "tree"
BINARY = "bin/true"
SRC = "src"
MANY = "many"
MANY_FILES = 16  # the most concurrent readers of different files the bench runs
MODE_FILE = 0o100644  # 33188: what s3fs stores in x-amz-meta-mode for a regular file
MODE_EXEC = 0o100755  # 33261: the same for an executable
WRITE_PIECE = 8 * MiB  # generate the big object in pieces, never all in memory
ELF_MAGIC = b"\x7fELF"
MULTIPART_THRESHOLD = 64 * MiB  # big objects go up multipart, as real upload tools do
MULTIPART_CHUNK = 16 * MiB

Log = Callable[[str], None]


@dataclass(frozen=True)
class Sizes:
    """How big each part of the data set is, and how many operations each workload does."""

    big_bytes: int
    tree_files: int
    tree_dirs: int
    tree_min: int
    tree_max: int
    src_packages: tuple[str, ...]
    rand_ops: int
    mmap_ops: int
    exec_runs: int
    many_bytes: int = 4 * MiB  # size of each file of many/ (16 of them)


_SRC_QUICK = (
    "json", "email", "asyncio", "concurrent", "http", "urllib", "xml", "importlib", "logging",
    "unittest", "multiprocessing",
)
_SRC_FULL = (
    *_SRC_QUICK, "tkinter", "idlelib", "lib2to3", "distutils", "encodings", "ctypes", "html",
    "xmlrpc", "re", "collections", "wsgiref",
)

PROFILES: dict[str, Sizes] = {
    # ~7 MB of source: "enough for a few MB" while compileall stays ~10 s on 2 cores.
    "full": Sizes(256 * MiB, 2000, 25, 4 * KiB, 64 * KiB, _SRC_FULL, 2000, 2000, 30, 16 * MiB),
    # The issue requires >= 2,000 small files even for --quick; the big object shrinks instead.
    "quick": Sizes(64 * MiB, 2000, 25, 4 * KiB, 64 * KiB, _SRC_QUICK, 500, 500, 10, 4 * MiB),
    # For S3 across a network (--profile network / cross-region): every raw-S3 request pays
    # 100-300 ms there, so the serial references (2,000 small files, 2,000 random reads) of the
    # full sizes alone would take over 10 minutes per door. Fewer files and operations, the
    # same kinds of reads.
    "net": Sizes(64 * MiB, 200, 10, 4 * KiB, 64 * KiB,
                 ("json", "concurrent", "email", "http", "asyncio"), 40, 40, 5, 4 * MiB),
    # For the test suite against moto (keep objects <= 8 MiB there); seconds, not minutes.
    "tiny": Sizes(2 * MiB, 40, 4, 4 * KiB, 16 * KiB, ("json", "concurrent"), 20, 20, 3,
                  64 * KiB),
}


@dataclass(frozen=True)
class Entry:
    """One file of the data set; `rel` is '/'-separated, relative to the root and the prefix."""

    rel: str
    size: int
    sha256: str
    mode: int


@dataclass(frozen=True)
class Dataset:
    root: Path
    seed: int
    sizes: Sizes
    entries: tuple[Entry, ...]
    digest: str

    def group(self, name: str) -> list[Entry]:
        """Entries of one group: 'big', 'tree', 'bin' or 'src' (sorted by path)."""
        prefix = {"big": BIG, "tree": TREE + "/", "bin": BINARY, "src": SRC + "/",
                  "many": MANY + "/"}[name]
        return [e for e in self.entries if e.rel == prefix or e.rel.startswith(prefix)]

    def total_bytes(self, name: str) -> int:
        return sum(e.size for e in self.group(name))

    def manifest(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "digest": self.digest, "sizes": asdict(self.sizes),
            "entries": [asdict(e) for e in self.entries],
        }


def _rng(seed: int, group: str) -> random.Random:
    # String seeds are hashed with SHA-512 by random.seed(version=2): stable across runs.
    return random.Random(f"hsmfs-bench:{seed}:{group}")


def _write_big(root: Path, size: int, seed: int) -> None:
    rng = _rng(seed, "big")
    with (root / BIG).open("wb") as f:
        left = size
        while left:
            n = min(left, WRITE_PIECE)
            f.write(rng.randbytes(n))
            left -= n


def _write_tree(root: Path, s: Sizes, seed: int) -> None:
    rng = _rng(seed, "tree")
    for i in range(s.tree_files):
        path = root / TREE / f"d{i % s.tree_dirs:02d}" / f"f{i:04d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.randint(s.tree_min, s.tree_max)))


def many_rel(i: int) -> str:
    """The i-th file of the many-readers group."""
    return f"{MANY}/f{i:02d}.bin"


def _write_many(root: Path, s: Sizes, seed: int) -> None:
    rng = _rng(seed, "many")
    (root / MANY).mkdir(parents=True, exist_ok=True)
    for i in range(MANY_FILES):
        (root / many_rel(i)).write_bytes(rng.randbytes(s.many_bytes))


def _find_binary() -> Path:
    found = shutil.which("true")
    if found is None:
        raise RuntimeError("no `true` binary on PATH to use as the exec workload's program")
    path = Path(found).resolve()
    with path.open("rb") as f:
        if f.read(4) != ELF_MAGIC:
            raise RuntimeError(f"{path} is not an ELF binary")
    return path


def _write_binary(root: Path) -> None:
    dest = root / BINARY
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_find_binary(), dest)
    dest.chmod(MODE_EXEC & 0o7777)


def source_files(packages: Iterable[str]) -> Iterable[tuple[Path, str]]:
    """(absolute source, relative destination) of every .py file of the stdlib packages."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"__pycache__", "test", "tests", "idle_test"}
    for pkg in packages:
        base = stdlib / pkg
        if not base.is_dir():
            continue  # removed in newer Pythons (distutils, lib2to3); the digest records it
        for path in sorted(base.rglob("*.py")):
            if skip.isdisjoint(path.relative_to(base).parts):
                yield path, f"{SRC}/{pkg}/{path.relative_to(base).as_posix()}"


def _write_src(root: Path, packages: Iterable[str]) -> None:
    for src, rel in source_files(packages):
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)


def _entry(root: Path, path: Path) -> Entry:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while piece := f.read(WRITE_PIECE):
            h.update(piece)
    mode = MODE_EXEC if path.stat().st_mode & 0o111 else MODE_FILE
    return Entry(path.relative_to(root).as_posix(), path.stat().st_size, h.hexdigest(), mode)


def _digest(seed: int, sizes: Sizes, entries: Iterable[Entry]) -> str:
    h = hashlib.sha256(json.dumps({"seed": seed, "sizes": asdict(sizes)}, sort_keys=True).encode())
    for e in entries:
        h.update(f"{e.rel}\0{e.size}\0{e.sha256}\0{e.mode}\n".encode())
    return h.hexdigest()


def build(root: Path, sizes: Sizes, seed: int = 1) -> Dataset:
    """Write the data set under `root` (which must not exist or be empty) and describe it."""
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty")
    _write_big(root, sizes.big_bytes, seed)
    _write_tree(root, sizes, seed)
    _write_binary(root)
    _write_src(root, sizes.src_packages)
    _write_many(root, sizes, seed)
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    entries = tuple(_entry(root, p) for p in paths)
    return Dataset(root, seed, sizes, entries, _digest(seed, sizes, entries))


def s3_prefix(ds: Dataset) -> str:
    """Prefix that holds exactly this data set; a different digest never shares objects."""
    return f"hsmfs-bench/{ds.digest[:16]}"


def _marker_key(ds: Dataset) -> str:
    # Outside the prefix so that it never shows up as a file in a door's tree.
    return f"{s3_prefix(ds)}.complete"


def _ensure_bucket(client: Any, bucket: str) -> None:
    try:
        client.head_bucket(Bucket=bucket)
    except client.exceptions.ClientError:
        client.create_bucket(Bucket=bucket)


def _already_uploaded(client: Any, bucket: str, ds: Dataset) -> bool:
    try:
        client.head_object(Bucket=bucket, Key=_marker_key(ds))
    except client.exceptions.ClientError:
        return False
    return True


def _put(client: Any, bucket: str, prefix: str, ds: Dataset, e: Entry, concurrency: int) -> None:
    from boto3.s3.transfer import TransferConfig

    key = f"{prefix}/{e.rel}"
    meta = {"Metadata": {"mode": str(e.mode)}}
    if e.size >= MULTIPART_THRESHOLD:
        cfg = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK,
            max_concurrency=concurrency,
        )
        client.upload_file(str(ds.root / e.rel), bucket, key, ExtraArgs=meta, Config=cfg)
    else:
        client.put_object(Bucket=bucket, Key=key, Body=(ds.root / e.rel).read_bytes(), **meta)


def upload(client: Any, bucket: str, ds: Dataset, log: Log, concurrency: int = 16) -> str:
    """Upload the data set (unless already there) and return its S3 prefix (no trailing '/')."""
    prefix = s3_prefix(ds)
    _ensure_bucket(client, bucket)
    if _already_uploaded(client, bucket, ds):
        log(f"dataset: s3://{bucket}/{prefix} already holds digest {ds.digest[:16]}")
        return prefix
    total = sum(e.size for e in ds.entries)
    log(f"dataset: uploading {len(ds.entries)} objects, {total / MiB:.1f} MiB "
        f"to s3://{bucket}/{prefix}")
    with ThreadPoolExecutor(concurrency, thread_name_prefix="upload") as pool:
        # list() re-raises the first upload error here instead of dropping it.
        list(pool.map(lambda e: _put(client, bucket, prefix, ds, e, concurrency), ds.entries))
    client.put_object(Bucket=bucket, Key=_marker_key(ds), Body=json.dumps(ds.manifest()).encode())
    return prefix
