"""Configuration: one frozen dataclass per layer, built only by the command line (``__main__``).

No layer reads the environment or argv itself.  Every default is documented where it is set.
``parse_mount_options`` turns ``-o a=b,c`` (the syntax of mount(8) and fstab) into those objects.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@dataclass(frozen=True)
class S3Config:
    bucket: str
    #: Key prefix without a leading slash, ending in "/" when not empty.
    prefix: str = ""
    #: None means the standard AWS configuration (``AWS_ENDPOINT_URL``, profiles, ...) decides.
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    #: Attempts per request, retries included.  Backoff is exponential with full jitter, so six
    #: attempts span about 3 s: long enough for a blip, short enough that a reader gets its errno.
    attempts: int = 6
    backoff_base_s: float = 0.1
    backoff_cap_s: float = 2.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    #: Connection pool size; also the S3 CapacityLimiter so no request waits for a socket.
    max_connections: int = 16
    #: Ranged GETs signed and sent without botocore's request pipeline (a third of the CPU).
    lean_get: bool = True


@dataclass(frozen=True)
class CacheConfig:
    cache_dir: str
    #: Fetch unit.  1 MiB matches the largest FUSE request and Ceph serves a 1 MiB range in
    #: ~5 ms (S3_SERVERS.md), so per-request latency stays a small share of transfer time.
    chunk_size: int = 1 * MiB
    #: Adjacent missing chunks merge into one GET up to this size: fewer round trips, while a
    #: single slow GET still cannot hold more than this much of a file hostage.
    max_request: int = 8 * MiB
    #: Sequential read-ahead doubles from one chunk up to this window.
    readahead_max: int = 64 * MiB
    #: Files at most this large are fetched whole on first touch (one GET instead of several).
    small_file: int = 1 * MiB
    #: Simultaneous ranged GETs across the whole cache.
    concurrency: int = 16
    #: Directory read-ahead budget (:mod:`hsmfs.siblings`): once a program has read two small
    #: files of a directory, up to this many bytes of its other small files with the same
    #: extensions are fetched in the background.  0 disables it.
    dir_readahead: int = 64 * MiB
    file_mode: int = 0o644
    dir_mode: int = 0o755
    #: HEAD each object at population to read s3fs's ``x-amz-meta-mode`` (exec bits).
    head_for_mode: bool = True
    #: Whole-file fill at open for files up to this size, so that cp/tar/rsync, which trust
    #: SEEK_DATA/st_blocks, never copy holes as zeros (KERNEL_FACTS_2 §1).  -1 means every
    #: file (the opt-in "closed for every file" mode); 0 disables it.  8 MiB: most files of a
    #: source or config tree, a fill of ~20 ms from Ceph; larger files keep range-by-range
    #: fetching (an open of a big file must not cost the whole object).  Only the kernel door
    #: asks (FAN_OPEN_PERM); FUSE reads never see a hole.
    open_fill_max: int = 8 * MiB
    #: ``-o writeback=SECONDS``: archive a dirty or new file once every writer has closed it
    #: and it has not been written for this long (:mod:`hsmfs.archive`, ``writeback``).
    #: 0: off (the default: changes reach S3 only when ``hsmfs archive`` says so).
    writeback_s: float = 0.0
    #: ``-o refresh=SECONDS``: list S3 this often and make the tree follow it (new, changed
    #: and deleted objects: ``hsmfs sync`` on a timer).  0: off (the default: the listing of
    #: the start, and ``hsmfs sync`` when asked).  A listing costs one request per 1000
    #: objects, so a period of minutes suits a large bucket.
    refresh_s: float = 0.0
    #: ``-o cache_size=SIZE``: keep resident bytes under this by releasing the least recently
    #: used clean files (:mod:`hsmfs.evict`).  0: unlimited (the default).
    cache_size: int = 0
    #: ``-o min_free=PCT``: also keep this share of the cache's filesystem free (0: off).
    min_free_pct: float = 0.0


@dataclass(frozen=True)
class KernelConfig:
    #: At stop, before the group closes, mount an empty read-only cover over the cache dir so
    #: new opens by path fail (ENOENT) instead of reading unguarded stubs as zeros
    #: (docs/unguarded.md).  The next start removes it.
    cover: bool = True
    #: The holder kills (and restarts) a worker whose loop leaves a ping unanswered this long:
    #: a worker that hangs without dying would hold every guarded access forever.  0: never.
    watchdog_s: float = 30.0


@dataclass(frozen=True)
class FuseConfig:
    mountpoint: str
    #: Mount's bdi read_ahead_kb, set as root right after mounting: 1 MiB FUSE requests
    #: (FUSE_BASELINE: +30-70 % first-read throughput, -40 % daemon CPU).
    read_ahead_kb: int = 1024
    #: Entry/attribute timeouts; never 0 (12-33x slower walks, FUSE_BASELINE §5).
    attr_timeout_s: float = 300.0
    allow_other: bool = False
    fsname: str = "hsmfs"
    #: ``-o ro``: the mount is read-only (the kernel answers EROFS to every write).  Default:
    #: read-write (``-o rw``).
    read_only: bool = False


@dataclass(frozen=True)
class Options:
    """Everything one ``hsmfs mount``/``serve`` invocation was asked for."""

    s3: S3Config
    cache: CacheConfig
    kernel: KernelConfig | None = None
    fuse: FuseConfig | None = None
    foreground: bool = False
    debug: bool = False
    log_file: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


# Options that mount(8)/fstab pass and that mean nothing to hsmfs (or are implied by FUSE).
IGNORED_OPTIONS = frozenset(
    {"dev", "nodev", "suid", "nosuid", "exec", "noexec", "_netdev", "auto", "noauto", "defaults",
     "nofail", "user", "users", "nouser", "async", "sync", "atime", "noatime",
     "relatime", "nodiratime", "owner", "group", "default_permissions"}
)

_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*$")


def parse_size(text: str) -> int:
    """``"4M"``, ``"512k"``, ``"1GiB"`` or plain bytes → bytes (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    mult = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}[m.group(2).lower()]
    return int(m.group(1)) * mult


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")


def _seconds(text: str) -> float:
    """``"30"``, ``"30s"``, ``"500ms"``, ``"2m"`` → seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    return float(m.group(1)) * {None: 1.0, "s": 1.0, "ms": 0.001, "m": 60.0}[m.group(2)]


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket[/prefix]`` → (bucket, normalized prefix)."""
    if not url.startswith("s3://"):
        raise ValueError(f"source must look like s3://BUCKET[/PREFIX], got {url!r}")
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url!r}")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/") if prefix else ""


def split_options(opts: list[str]) -> dict[str, str]:
    """Merge several ``-o`` strings; later options win.  Flags map to ``""``."""
    out: dict[str, str] = {}
    for chunk in opts:
        for item in chunk.split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, value = item.partition("=")
            out[key.strip()] = value.strip() if sep else ""
    return out


def _flag(value: str) -> bool:
    return value.lower() not in {"0", "no", "false", "off"}


def build_options(
    source: str, opts: dict[str, str], *, mountpoint: str | None, cache_dir: str | None,
    kernel_door: bool, foreground: bool = False,
) -> Options:
    """Validate ``-o`` options into config objects; unknown options are an error, never ignored."""
    bucket, prefix = parse_s3_url(source)
    opts = dict(opts)
    s3_kw: dict[str, object] = {}
    cache_kw: dict[str, object] = {}
    kernel_kw: dict[str, object] = {}
    fuse_kw: dict[str, object] = {}
    debug = False
    log_file = None
    kernel = kernel_door
    for key, value in list(opts.items()):
        match key:
            case "cache":
                cache_dir = value
            case "endpoint":
                s3_kw["endpoint_url"] = value
            case "region":
                s3_kw["region"] = value
            case "profile":
                s3_kw["profile"] = value
            case "retries":
                s3_kw["attempts"] = int(value) + 1
            case "timeout":
                s3_kw["read_timeout_s"] = float(value)
            case "connections":
                s3_kw["max_connections"] = int(value)
            case "lean_get":
                s3_kw["lean_get"] = _flag(value)
            case "chunk":
                cache_kw["chunk_size"] = parse_size(value)
            case "max_request":
                cache_kw["max_request"] = parse_size(value)
            case "readahead":
                cache_kw["readahead_max"] = parse_size(value)
            case "small_file":
                cache_kw["small_file"] = parse_size(value)
            case "dir_readahead":
                cache_kw["dir_readahead"] = 0 if value == "off" else parse_size(value)
            case "concurrency":
                cache_kw["concurrency"] = int(value)
            case "file_mode":
                cache_kw["file_mode"] = int(value, 8)
            case "dir_mode":
                cache_kw["dir_mode"] = int(value, 8)
            case "head":
                cache_kw["head_for_mode"] = _flag(value)
            case "kernel":
                kernel = _flag(value) if value else True
            case "open_fill":
                cache_kw["open_fill_max"] = (
                    -1 if value == "all" else 0 if value in {"off", "0"} else parse_size(value)
                )
            case "writeback":
                cache_kw["writeback_s"] = 0.0 if value in {"off", ""} else _seconds(value)
            case "refresh":
                cache_kw["refresh_s"] = 0.0 if value in {"off", ""} else _seconds(value)
            case "cache_size":
                cache_kw["cache_size"] = 0 if value in {"off", "0"} else parse_size(value)
            case "min_free":
                pct = float(value.rstrip("%"))
                if not 0 <= pct < 100:
                    raise ValueError(f"min_free={value}: a percentage from 0 to 99")
                cache_kw["min_free_pct"] = pct
            case "cover":
                kernel_kw["cover"] = _flag(value)
            case "watchdog":
                kernel_kw["watchdog_s"] = 0.0 if value == "off" else _seconds(value)
            case "read_ahead_kb":
                fuse_kw["read_ahead_kb"] = int(value)
            case "attr_timeout":
                fuse_kw["attr_timeout_s"] = float(value)
            case "allow_other":
                fuse_kw["allow_other"] = True
            case "fsname":
                fuse_kw["fsname"] = value
            case "ro":
                fuse_kw["read_only"] = True
            case "rw":
                fuse_kw["read_only"] = False
            case "debug":
                debug = True
            case "log":
                log_file = value
            case "foreground":
                foreground = True
            case _ if key in IGNORED_OPTIONS or key.startswith("x-") or key.startswith("comment="):
                pass
            case _:
                raise ValueError(f"unknown option {key!r}")
    if not cache_dir:
        raise ValueError("no cache directory: pass -o cache=DIR")
    cache_kw["cache_dir"] = os.path.abspath(cache_dir)
    cache_cfg = CacheConfig(**cache_kw)  # type: ignore[arg-type]
    if cache_cfg.chunk_size <= 0 or cache_cfg.chunk_size % 4096:
        raise ValueError("chunk must be a positive multiple of 4 KiB")
    if cache_cfg.max_request < cache_cfg.chunk_size:
        cache_cfg = dataclasses.replace(cache_cfg, max_request=cache_cfg.chunk_size)
    return Options(
        s3=S3Config(bucket=bucket, prefix=prefix, **s3_kw),  # type: ignore[arg-type]
        cache=cache_cfg,
        kernel=KernelConfig(**kernel_kw) if kernel else None,  # type: ignore[arg-type]
        fuse=FuseConfig(mountpoint=os.path.abspath(mountpoint), **fuse_kw)  # type: ignore[arg-type]
        if mountpoint else None,
        foreground=foreground,
        debug=debug,
        log_file=log_file,
    )
