"""Configuration: one frozen dataclass per layer, built only by the command line (``__main__``).

No layer reads the environment or argv itself.  Every default is documented where it is set.
``parse_mount_options`` turns ``-o a=b,c`` (the syntax of mount(8) and fstab) into those objects.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
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
    readahead_max: int = 256 * MiB  # 2 x concurrency x max_request: see docs/design.md
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
    #: ``-o lazy`` (FUSE door only): adopt the tree as it is at start and list S3 one
    #: directory at a time, on its first lookup or readdir (:mod:`hsmfs.lazy`).
    lazy: bool = False
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
    #: ``-o uid=``/``gid=``: the owner every file and directory of the mount shows (and that
    #: the kernel's permission checks, ``default_permissions``, use), as s3fs, rclone and
    #: mountpoint-s3 do.  None: the backing file's own owner.  The backing tree is unchanged,
    #: so the kernel door is unaffected.
    uid: int | None = None
    gid: int | None = None
    #: ``-o umask=``: permission bits cleared from every mode the mount shows (presentation,
    #: like ``uid``).  0: the backing file's mode as it is.
    umask: int = 0


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
    #: ``-o metrics=HOST:PORT``: serve Prometheus text there (:mod:`hsmfs.metrics`).
    metrics: str | None = None
    #: ``-o log_format=json``: one JSON object per log line (:mod:`hsmfs.logsetup`).
    log_format: str = "text"
    extra: dict[str, str] = field(default_factory=dict)


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


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6).  An empty host is 127.0.0.1: metrics reach
    other hosts only when asked for, with 0.0.0.0."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not HOST:PORT: {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _address(text: str) -> str:
    parse_address(text)
    return text


def split_options(opts: list[str]) -> dict[str, str]:
    """Merge several ``-o`` strings; later options win.  Flags map to ``""``."""
    out: dict[str, str] = {}
    for chunk in opts:
        for item in chunk.split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, value = item.partition("=")
            key = key.strip()
            # Re-inserted at the end: options apply in order, so for "ro,rw,ro" ro wins.
            out.pop(key, None)
            out[key] = value.strip() if sep else ""
    return out




# -- the -o options: one table --------------------------------------------------------------------
#
# Every ``-o`` option is one row of OPTIONS: its parser, where the value goes, its default and
# its meaning.  ``build_options`` parses from it, ``hsmfs mount --help``/``serve --help`` print
# it, and scripts/options_table.py writes the README's table from it (tests/t1_options.py fails
# when the README drifts), so the three can never disagree.

FLAG_OFF = frozenset({"0", "no", "false", "off"})


def _on(value: str) -> bool:
    """A flag: bare (``ro``) or ``=1/yes/on`` is on, ``=0/no/false/off`` is off."""
    return value.lower() not in FLAG_OFF


def _off_or(parse: Callable[[str], float | int]) -> Callable[[str], float | int]:
    """``off`` (or an empty value) is 0, anything else goes through ``parse``."""
    return lambda v: 0 if v in {"off", ""} else parse(v)


def _percent(text: str) -> float:
    value = float(text.rstrip("%"))
    if not 0 <= value < 100:
        raise ValueError("a percentage from 0 to 99")
    return value


def _octal(text: str) -> int:
    value = int(text, 8)
    if not 0 <= value <= 0o7777:
        raise ValueError(f"not a permission mode: {text!r}")
    return value


def _id(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32 - 1:  # (uid_t)-1 means "unchanged" to the kernel
        raise ValueError(f"not a uid/gid: {text!r}")
    return value


def _log_format(text: str) -> str:
    if text not in ("text", "json"):
        raise ValueError("text or json")
    return text


def _open_fill(text: str) -> int:
    return -1 if text == "all" else 0 if text in {"off", "0"} else parse_size(text)


#: The doors an option acts on.
BOTH, FUSE, KERNEL = "both", "fuse", "kernel"


@dataclass(frozen=True)
class OptionSpec:
    """One ``-o`` option."""

    name: str
    #: What follows ``=`` (``SIZE``, ``N``, ...); empty for a flag.
    value: str
    #: The default as a user would type it (``parse(default)`` is the config's default unless
    #: ``literal_default`` is False, e.g. "AWS config").
    default: str
    meaning: str
    door: str
    #: Where the parsed value goes: a config layer ("s3", "cache", "kernel", "fuse") or "top"
    #: (a field of :class:`Options` or of the command itself); None: accepted, changes nothing.
    layer: str | None
    field: str
    parse: Callable[[str], object]
    literal_default: bool = True

    @property
    def usage(self) -> str:
        return f"{self.name}={self.value}" if self.value else self.name


def _o(name: str, value: str, default: str, meaning: str, *, door: str = BOTH,
       layer: str | None, field: str = "", parse: Callable[[str], object] = str,
       literal_default: bool = True) -> OptionSpec:
    return OptionSpec(name, value, default, meaning, door, layer, field or name, parse,
                      literal_default)


OPTIONS: tuple[OptionSpec, ...] = (
    _o("cache", "DIR", "(required for mount)", "the backing tree (for serve: DIR itself)",
       layer="top", field="cache_dir", literal_default=False),
    _o("endpoint", "URL", "AWS config", "the S3 endpoint", layer="s3", field="endpoint_url",
       literal_default=False),
    _o("region", "NAME", "AWS config", "the S3 region", layer="s3", literal_default=False),
    _o("profile", "NAME", "AWS config", "the AWS profile for credentials", layer="s3",
       literal_default=False),
    _o("retries", "N", "5", "retries of a transient S3 failure (full-jitter backoff)",
       layer="s3", field="attempts", parse=lambda v: int(v) + 1),
    _o("timeout", "S", "30", "S3 read timeout, seconds", layer="s3", field="read_timeout_s",
       parse=float),
    _o("connections", "N", "16", "S3 connection pool size", layer="s3",
       field="max_connections", parse=int),
    _o("lean_get", "0|1", "on", "sign ranged GETs directly; off sends them through boto3's "
       "full client (a third more CPU)", layer="s3", parse=_on),
    _o("chunk", "SIZE", "1M", "fetch unit (aligned; a multiple of 4K)", layer="cache",
       field="chunk_size", parse=parse_size),
    _o("max_request", "SIZE", "8M", "adjacent missing chunks merge into one GET up to this",
       layer="cache", parse=parse_size),
    _o("readahead", "SIZE", "256M", "the sequential read-ahead window doubles up to this",
       layer="cache", field="readahead_max", parse=parse_size),
    _o("small_file", "SIZE", "1M", "files at most this large are fetched whole on first touch",
       layer="cache", parse=parse_size),
    _o("dir_readahead", "SIZE|off", "64M", "after two small files of a directory are read, "
       "fetch up to SIZE of its other small files with the same extensions in the background",
       layer="cache", parse=_off_or(parse_size)),
    _o("concurrency", "N", "16", "ranged GETs in flight", layer="cache", parse=int),
    _o("file_mode", "OCTAL", "0644", "mode of a file made from an object without an s3fs "
       "x-amz-meta-mode", layer="cache", parse=_octal),
    _o("dir_mode", "OCTAL", "0755", "mode of the directories made from key prefixes",
       layer="cache", parse=_octal),
    _o("head", "0|1", "on", "HEAD objects the tree does not hold at the listed ETag, to read "
       "x-amz-meta-mode (a restart over a full tree sends none); off skips it (a much faster "
       "first start of a large bucket, file_mode for every file)",
       layer="cache", field="head_for_mode", parse=_on),
    _o("refresh", "S|off", "off", "list S3 every S seconds and make the tree follow it (new, "
       "changed and deleted objects), as hsmfs sync does", layer="cache", field="refresh_s",
       parse=_off_or(_seconds)),
    _o("lazy", "", "off", "list S3 one directory at a time, on its first lookup or readdir, "
       "instead of the whole bucket at start (a bucket of millions of objects mounts at once); "
       "FUSE door alone (refused with the kernel door); hsmfs sync and refresh then list "
       "again only the directories listed so far", door=FUSE, layer="cache", parse=_on),
    _o("writeback", "S|off", "off", "upload a dirty or new file once every writer closed it "
       "and it was not written for S seconds (else only hsmfs archive uploads)",
       layer="cache", field="writeback_s", parse=_off_or(_seconds)),
    _o("cache_size", "SIZE|off", "off", "keep resident data under SIZE by releasing the least "
       "recently used clean files before each fetch; dirty, pinned, open and mapped files are "
       "never evicted, and a budget that cannot be met is logged and shown by hsmfs stats",
       layer="cache", parse=_off_or(parse_size)),
    _o("min_free", "PCT", "0", "also keep PCT percent of the cache's filesystem free",
       layer="cache", field="min_free_pct", parse=_percent),
    _o("kernel", "", "off (mount), on (serve)", "also run the kernel door on the cache",
       layer="top", parse=_on, literal_default=False),
    _o("open_fill", "SIZE|all|off", "8M", "fill files up to SIZE whole when "
       "opened, so cp/tar never copy holes as zeros", door=KERNEL, layer="cache",
       field="open_fill_max", parse=_open_fill),
    _o("cover", "0|1", "on", "cover the cache dir when the door stops, so "
       "unfetched bytes never read as zeros", door=KERNEL, layer="kernel", parse=_on),
    _o("watchdog", "S|off", "30s", "restart a worker whose loop leaves the "
       "holder's ping unanswered this long", door=KERNEL, layer="kernel", field="watchdog_s",
       parse=_off_or(_seconds)),
    _o("ro", "", "off", "mount read-only (writes get EROFS)", door=FUSE, layer="fuse",
       field="read_only", parse=_on),
    _o("rw", "", "on", "mount read-write (the default; the later of ro/rw wins)", door=FUSE,
       layer="fuse", field="read_only", parse=lambda v: not _on(v)),
    _o("allow_other", "", "off", "let users other than the one who mounted use the mount",
       door=FUSE, layer="fuse", parse=_on),
    _o("default_permissions", "", "on", "the kernel checks every access against the modes "
       "and owners the mount shows (always on; accepted for fstab)", door=FUSE, layer=None),
    _o("uid", "N", "file's own", "owner every file and directory of the mount shows",
       door=FUSE, layer="fuse", parse=_id, literal_default=False),
    _o("gid", "N", "file's own", "group every file and directory of the mount shows",
       door=FUSE, layer="fuse", parse=_id, literal_default=False),
    _o("umask", "OCTAL", "0", "permission bits cleared from every mode the mount shows",
       door=FUSE, layer="fuse", parse=_octal),
    _o("read_ahead_kb", "N", "1024", "the mount's read-ahead, so requests are 1 MiB",
       door=FUSE, layer="fuse", parse=int),
    _o("attr_timeout", "S", "300", "entry/attribute cache timeouts (never 0)", door=FUSE,
       layer="fuse", field="attr_timeout_s", parse=float),
    _o("fsname", "NAME", "hsmfs", "the source column of mount(8) and df", door=FUSE,
       layer="fuse"),
    _o("debug", "", "off", "debug logging", layer="top", parse=_on),
    _o("log", "FILE", "CACHE/.hsmfs/hsmfs.log", "where the daemon logs (stderr with -f)",
       layer="top", field="log_file", literal_default=False),
    _o("log_format", "text|json", "text", "json: one JSON object per log line (time, level, "
       "message; event, key, range, cause, HTTP status, errno on failures)", layer="top",
       parse=_log_format),
    _o("foreground", "", "off", "stay in the foreground (as -f)", layer="top", parse=_on),
    _o("metrics", "HOST:PORT", "off", "serve Prometheus metrics at http://HOST:PORT/metrics "
       "(the counters of hsmfs stats)", layer="top", parse=_address, literal_default=False),
)

OPTIONS_BY_NAME: dict[str, OptionSpec] = {o.name: o for o in OPTIONS}

# Options that mount(8)/fstab pass and that mean nothing to hsmfs (or are implied by FUSE).
IGNORED_OPTIONS = frozenset(
    {"dev", "nodev", "suid", "nosuid", "exec", "noexec", "_netdev", "auto", "noauto", "defaults",
     "nofail", "user", "users", "nouser", "async", "sync", "atime", "noatime",
     "relatime", "nodiratime", "owner", "group"}
)


def _ignored(key: str) -> bool:
    # x-*: userspace mount options (x-systemd.*, x-gvfs-*); comment=: fstab's old spelling.
    return key in IGNORED_OPTIONS or key.startswith("x-") or key == "comment"


#: Why ``-o lazy`` is refused with the kernel door (``serve``, ``mount -o kernel``).
LAZY_KERNEL = ("-o lazy is for the FUSE door alone (hsmfs mount without -o kernel): the "
               "kernel door serves the backing tree directly, so every stub must exist before "
               "anyone opens it, and a directory cannot be listed on its first lookup there")


def build_options(
    source: str, opts: dict[str, str], *, mountpoint: str | None, cache_dir: str | None,
    kernel_door: bool, foreground: bool = False,
) -> Options:
    """Validate ``-o`` options into config objects; unknown options are an error, never ignored.

    ``mountpoint=None`` means no FUSE door: a FUSE-only option is then an error too (it would
    silently change nothing).  Kernel-door options are accepted without the kernel door, so
    one option list serves both doors (as the tests and the bench use it).
    """
    bucket, prefix = parse_s3_url(source)
    layers: dict[str, dict[str, object]] = {"s3": {}, "cache": {}, "kernel": {}, "fuse": {},
                                            "top": {"kernel": kernel_door,
                                                    "foreground": foreground}}
    for key, value in opts.items():
        spec = OPTIONS_BY_NAME.get(key)
        if spec is None:
            if _ignored(key):
                continue
            raise ValueError(f"unknown option {key!r} (--help lists every option)")
        if key == "lazy" and mountpoint is None and _on(value):
            raise ValueError(LAZY_KERNEL)
        if spec.door == FUSE and mountpoint is None:
            raise ValueError(f"option {key!r} is for the FUSE door (hsmfs mount) only")
        if spec.layer is None:
            continue
        try:
            layers[spec.layer][spec.field] = spec.parse(value)
        except ValueError as exc:
            raise ValueError(f"option {key}={value}: {exc}") from None
    top = layers["top"]
    cache_dir = top.get("cache_dir", cache_dir)  # type: ignore[assignment]
    if not cache_dir:
        raise ValueError("no cache directory: pass -o cache=DIR")
    cache_kw = layers["cache"]
    cache_kw["cache_dir"] = os.path.abspath(cache_dir)
    cache_cfg = CacheConfig(**cache_kw)  # type: ignore[arg-type]
    if cache_cfg.lazy and top["kernel"]:
        raise ValueError(LAZY_KERNEL)
    if cache_cfg.chunk_size <= 0 or cache_cfg.chunk_size % 4096:
        raise ValueError("chunk must be a positive multiple of 4 KiB")
    if cache_cfg.max_request < cache_cfg.chunk_size:
        cache_cfg = dataclasses.replace(cache_cfg, max_request=cache_cfg.chunk_size)
    return Options(
        s3=S3Config(bucket=bucket, prefix=prefix, **layers["s3"]),  # type: ignore[arg-type]
        cache=cache_cfg,
        kernel=KernelConfig(**layers["kernel"]) if top["kernel"] else None,  # type: ignore[arg-type]
        fuse=FuseConfig(mountpoint=os.path.abspath(mountpoint),  # type: ignore[arg-type]
                        **layers["fuse"]) if mountpoint else None,
        foreground=bool(top["foreground"]),
        debug=bool(top.get("debug", False)),
        log_file=top.get("log_file"),  # type: ignore[arg-type]
        metrics=top.get("metrics"),  # type: ignore[arg-type]
        log_format=str(top.get("log_format", "text")),
    )


# -- the table, for people ------------------------------------------------------------------------

def options_for(command: str) -> list[OptionSpec]:
    """The options ``hsmfs mount`` (every door) or ``hsmfs serve`` (no FUSE) accept."""
    return [o for o in OPTIONS if command == "mount" or o.door != FUSE]


def options_help(command: str, width: int = 100) -> str:
    """The ``-o`` section of ``hsmfs mount --help``/``serve --help``."""
    import textwrap

    lines = ["-o options (comma-separated, as in fstab; later ones win):"]
    for o in options_for(command):
        lines.append(f"  {o.usage:<22} default: {o.default}")
        door = {KERNEL: "[kernel door] ", FUSE: "[FUSE door] ", BOTH: ""}[o.door]
        lines += textwrap.wrap(door + o.meaning, width, initial_indent=" " * 6,
                               subsequent_indent=" " * 6)
    lines.append("  mount(8)'s own options (_netdev, nofail, noauto, nodev, x-*, ...) are "
                 "accepted and ignored.")
    return "\n".join(lines)


def options_markdown() -> str:
    """The README's option table (scripts/options_table.py writes it)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = ["| option | default | doors | meaning |", "|---|---|---|---|"]
    for o in OPTIONS:
        doors = {BOTH: "both", FUSE: "FUSE", KERNEL: "kernel"}[o.door]
        rows.append(f"| `{cell(o.usage)}` | {cell(o.default)} | {doors} | {cell(o.meaning)} |")
    return "\n".join(rows)
