"""Command line: ``hsmfs mount|serve|stop|state|restore|archive|stats|bench|demo`` and
``mount.hsmfs``.

Owns argv and ``-o`` parsing, daemonization, the choice of process shape and what the user is
told when the daemon cannot start (one line); builds the config objects and hands them to
:mod:`hsmfs.daemon` (FUSE door alone) or :mod:`hsmfs.worker` (the kernel door: this process
becomes the holder, so it must not import trio or boto3 on that path).

``mount -t fuse.hsmfs SRC DIR -o ...`` arrives here twice over: mount(8) runs
``mount.fuse.hsmfs``/``mount.hsmfs SRC DIR -o opts``, and ``mount.fuse3`` runs
``hsmfs SRC DIR -o opts``; both forms are accepted.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from . import __version__, sdnotify, startprogress
from .config import Options, build_options, options_help, split_options
from .errors import HsmError
from .keys import STATE_DIR
from .logsetup import (
    describe_start_failure,
    logs_to_stderr,
    root_cause,
    setup_logging,
    start_failure_line,
)
from .mounts import clear_dead_mount, is_fuse_mount

log = logging.getLogger("hsmfs")
PID_FILE = "daemon.pid"
LOG_FILE = "hsmfs.log"
#: How long ``hsmfs mount`` waits for the daemon to list the bucket and mount.
READY_TIMEOUT_S = 600.0


# -- process plumbing ------------------------------------------------------------------------

def _state_dir(opts: Options) -> str:
    d = os.path.join(opts.cache.cache_dir, STATE_DIR)
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def _write_pid_file(pid_path: str) -> None:
    """``hsmfs stop``'s way to the daemon.  A full cache disk must not stop a start (resident
    files still read, and freeing space resumes fills): without room for it the file is
    left out, with a warning, and the daemon stops with SIGTERM or its mount's unmount."""
    try:
        with open(pid_path, "w") as f:
            f.write(f"{os.getpid()}\n")
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        with contextlib.suppress(OSError):
            os.unlink(pid_path)  # never an empty or cut pid file
        logging.getLogger("hsmfs").warning(
            "cache disk full: no pid file (%s); `hsmfs stop` will not find this daemon "
            "(pid %d): stop it with SIGTERM or by unmounting", exc.strerror, os.getpid())


def _run_daemon(opts: Options, ready: Callable[[str], None]) -> int:
    """Run the daemon in this process until it is stopped."""
    pid_path = os.path.join(_state_dir(opts), PID_FILE)
    _write_pid_file(pid_path)
    try:
        if opts.kernel is not None:
            # This process becomes the holder: only hsmfs.worker's light half is imported.
            from .worker import run_kernel_daemon

            def before_close(guarded: bool) -> None:
                # The pid file first: once covered, its path leads to the cover.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(pid_path)
                # A start that failed guarded nothing and changes nothing: the tree stays as
                # it was, and its log readable.
                if guarded and opts.kernel is not None and opts.kernel.cover:
                    from .cover import cover

                    if cover(opts.cache.cache_dir):
                        log.info("covered %s: new opens fail (ENOENT) until the next start",
                                 opts.cache.cache_dir)

            return run_kernel_daemon(opts, ready, before_close)
        from . import daemon

        daemon.run(opts, ready)
        return 0
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pid_path)


def _failure_line(opts: Options, exc: BaseException, was_ready: bool) -> str:
    """The one line that tells why the daemon did not start (or, once it served, ended).

    Logged too when the log is a file; a traceback only for what is not a known failure (a
    bug), where it is what a report needs.
    """
    from .worker import StartFailed, source_of

    cause = root_cause(exc)
    if isinstance(cause, StartFailed):
        line = str(cause)  # the worker's own line, from the other process
    elif was_ready:
        line = f"the daemon for {source_of(opts)} failed: {describe_start_failure(cause)}"
    else:
        line = start_failure_line(source_of(opts), cause)
    known = isinstance(cause, HsmError | StartFailed)
    if not known:
        log.error("%s", line, exc_info=exc)
    elif not logs_to_stderr():
        log.error("%s", line)
    return line


def _uncover(cache_dir: str) -> str | None:
    """Remove the cover the last kernel-door stop left over the cache dir (:mod:`hsmfs.cover`):
    first, before anything opens a path under it.  Returns what to log once logging is set up
    (the log file itself lies beneath the cover)."""
    if not os.path.isdir(cache_dir):
        return None
    from .cover import uncover

    try:
        if uncover(cache_dir):
            return f"removed the cover the last stop left over {cache_dir}"
    except OSError as exc:
        return f"cannot check {cache_dir} for a cover: {exc}"
    return None


def _start(opts: Options) -> int:
    """Foreground: run here.  Background: fork, detach, and return once the door serves.

    Either way a daemon that cannot start makes this return non-zero with one line on stderr
    that names the cause (``hsmfs: cannot serve s3://b/: bucket does not exist ...``).
    """
    # The FUSE door alone does not guard the backing tree: it lifts a cover a kernel-door stop
    # left at once.  The kernel door keeps it until every stub is guarded again (its worker
    # lifts it then, KernelBridge.serve); its pid file and log reach hsmfs's state through it.
    uncovered = _uncover(opts.cache.cache_dir) if opts.kernel is None else None
    if opts.foreground:
        setup_logging(opts.debug, opts.log_file, opts.log_format)
        if uncovered:
            log.info("%s", uncovered)
        served = threading.Event()

        def ready(summary: str) -> None:
            served.set()
            log.info("ready: %s", summary)
            sdnotify.ready(summary)  # systemd Type=notify (hsmfs-serve@.service)

        drawer = _draw_progress_here(served)
        try:
            return _run_daemon(opts, ready)
        except Exception as exc:
            print(f"hsmfs: {_failure_line(opts, exc, served.is_set())}", file=sys.stderr)
            return 1
        finally:
            served.set()
            if drawer is not None:
                drawer.join(2.0)
    log_file = opts.log_file or os.path.join(_state_dir(opts), LOG_FILE)
    read_end, write_end = os.pipe()
    # A progress bar only where someone sees it: on a pipe or file, no pipe for it at all.
    progress_r, progress_w = os.pipe() if sys.stderr.isatty() else (None, None)
    pid = os.fork()
    if pid:
        os.close(write_end)
        if progress_w is not None:
            os.close(progress_w)
        return _wait_ready(read_end, pid, log_file, progress_r)
    # Child: detach from the terminal and the caller's session (mount(8) waits for us to exit).
    os.close(read_end)
    if progress_r is not None:
        os.close(progress_r)
        os.environ[startprogress.ENV_FD] = str(progress_w)
    os.setsid()
    if os.fork():
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    setup_logging(opts.debug, log_file, opts.log_format)
    if uncovered:
        log.info("%s", uncovered)
    code = 1
    # Written once: "ok SUMMARY" when the door serves, or "fail LINE" if it never does.  The
    # kernel door calls ready() from a thread, so the lock keeps the two from both writing.
    told = threading.Lock()
    pipe = [write_end]

    def tell(message: str) -> None:
        with told:
            if not pipe:
                return
            fd = pipe.pop()
            with contextlib.suppress(OSError):  # the caller gave up waiting
                os.write(fd, f"{message}\n".encode())
            os.close(fd)

    try:
        code = _run_daemon(opts, lambda summary: tell(f"ok {summary}"))
    except BaseException as exc:
        tell(f"fail {_failure_line(opts, exc, not pipe)}")
    finally:
        tell("fail the daemon exited before it served")  # no-op once anything was told
        logging.shutdown()
        os._exit(code)


def _draw_progress_here(served: threading.Event) -> threading.Thread | None:
    """Foreground on a terminal: the start's progress line, drawn by a thread of this
    process until the door serves (:mod:`hsmfs.startprogress`)."""
    if not sys.stderr.isatty():
        return None
    progress_r, progress_w = os.pipe()
    os.environ[startprogress.ENV_FD] = str(progress_w)  # read by the daemon (or its worker)

    def draw() -> None:
        import select

        line = startprogress.ProgressLine()
        try:
            while not served.is_set():
                r, _, _ = select.select([progress_r], [], [], 0.25)
                if r:
                    chunk = os.read(progress_r, 4096)
                    if not chunk:
                        break
                    line.feed(chunk)
        finally:
            line.clear()
            os.close(progress_r)

    t = threading.Thread(target=draw, name="progress", daemon=True)
    t.start()
    return t


def _wait_ready(read_end: int, pid: int, log_file: str, progress_r: int | None = None) -> int:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)  # the first child exits at once (double fork)
    deadline = time.monotonic() + READY_TIMEOUT_S
    buf = b""
    import select

    line = startprogress.ProgressLine()
    watched = [read_end] + ([progress_r] if progress_r is not None else [])
    while time.monotonic() < deadline:
        r, _, _ = select.select(watched, [], [], 1.0)
        if progress_r in r:
            chunk = os.read(progress_r, 4096)
            if chunk:
                line.feed(chunk)
            else:
                watched.remove(progress_r)  # every writer closed it: the start is over
        if read_end not in r:
            continue
        chunk = os.read(read_end, 4096)
        if not chunk:
            break
        buf += chunk
        if buf.endswith(b"\n"):
            break
    line.clear()
    os.close(read_end)
    if progress_r is not None:
        os.close(progress_r)
    if buf.startswith(b"ok"):
        print(f"hsmfs: {buf[3:].decode().strip()}", file=sys.stderr)
        return 0
    if buf.startswith(b"fail "):
        print(f"hsmfs: {buf[5:].decode(errors='replace').strip()}", file=sys.stderr)
        return 1
    print(f"hsmfs: the daemon did not start; see {log_file}:", file=sys.stderr)
    with contextlib.suppress(OSError), open(log_file, errors="replace") as f:
        sys.stderr.writelines(f.readlines()[-15:])
    return 1


# -- commands ----------------------------------------------------------------------------------

def _cmd_mount(args: argparse.Namespace) -> int:
    opts = build_options(args.source, split_options(args.o or []), mountpoint=args.mountpoint,
                         cache_dir=None, kernel_door=False, foreground=args.foreground)
    if args.debug:
        opts = _replace(opts, debug=True)
    clear_dead_mount(args.mountpoint)
    return _start(opts)


def _cmd_serve(args: argparse.Namespace) -> int:
    raw = split_options(args.o or [])
    raw.setdefault("cache", args.dir)
    opts = build_options(args.source, raw, mountpoint=None, cache_dir=args.dir,
                         kernel_door=True, foreground=args.foreground)
    if args.debug:
        opts = _replace(opts, debug=True)
    return _start(opts)


def _replace(opts: Options, **kw: object) -> Options:
    import dataclasses

    return dataclasses.replace(opts, **kw)  # type: ignore[arg-type]


def _cache_dir_of(path: str) -> str:
    """A FUSE mount names its cache in a root xattr; anything else is the cache itself."""
    with contextlib.suppress(OSError):
        return os.getxattr(path, "user.hsmfs.cache_dir").decode()
    return os.path.abspath(path)


def _cmd_stop(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.path)
    if os.path.ismount(path) and is_fuse_mount(path):
        return subprocess.run(["fusermount3", "-u", path]).returncode
    pid_path = os.path.join(_cache_dir_of(path), STATE_DIR, PID_FILE)
    try:
        with open(pid_path) as f:
            pid = int(f.read())
    except (OSError, ValueError):
        print(f"hsmfs: no daemon serves {path}", file=sys.stderr)
        return 1
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return 0
        time.sleep(0.05)
    print(f"hsmfs: daemon {pid} did not stop within {args.timeout}s", file=sys.stderr)
    return 1


def _cmd_state(args: argparse.Namespace) -> int:
    from .cache import PARTIAL, describe

    rows = []
    code = 0
    for p in args.paths:
        try:
            row = describe(p)
        except OSError as exc:
            print(f"hsmfs: {p}: {exc.strerror}", file=sys.stderr)
            code = 1
            continue
        if row["state"] == PARTIAL:
            row["resident_bytes"] = _exact_resident(p, row)
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['state']:<9} {r['resident_bytes']:>12}/{r['size']:<12} {r['path']}"
                  + ("  pinned" if r.get("pinned") else "") + _error_text(r.get("error")))
    return code


def _error_text(error: object) -> str:
    """The last failure (user.hsm.error) as ``hsmfs state`` prints it after the path."""
    if not isinstance(error, dict) or not error:
        return ""
    words = [str(error.get("cause", "?")), str(error.get("errno", "?"))]
    if error.get("http"):
        words.append(f"HTTP {error['http']}")
    return f"  last error: {' '.join(words)} at {error.get('time', '?')}"


def _locate(path: str) -> tuple[str, str, bool] | None:
    """(cache dir, path relative to it, through FUSE?) for a file of an hsmfs tree."""
    path = os.path.abspath(path)
    d = os.path.dirname(path)
    while True:
        if os.path.exists(os.path.join(d, STATE_DIR)):
            return d, os.path.relpath(path, d), False
        with contextlib.suppress(OSError):
            cache = os.getxattr(d, "user.hsmfs.cache_dir").decode()
            return cache, os.path.relpath(path, d), True
        if d == "/":
            return None
        d = os.path.dirname(d)


def _exact_resident(path: str, row: dict) -> object:
    """A partial file's resident bytes: from the daemon's map, else from the extents."""
    from . import control
    from .cache import scan_resident_bytes

    where = _locate(path)
    if where is None:
        return row["resident_bytes"]
    cache, rel, via_fuse = where
    try:
        [state] = control.query(cache, {"cmd": "state", "paths": [rel]})["states"]
        return state["resident_bytes"]
    except (OSError, ValueError, KeyError):
        pass
    if via_fuse:
        return row["resident_bytes"]
    return scan_resident_bytes(path, int(row["remote_size"]))  # no daemon: no marks, safe


def _cmd_restore(args: argparse.Namespace) -> int:
    """Make files resident now (prefetch), through the daemon that serves them."""
    from . import control

    code = 0
    for p in args.paths:
        where = _locate(p)
        if where is None:
            print(f"hsmfs: {p}: not in an hsmfs tree", file=sys.stderr)
            code = 1
            continue
        cache, rel, _ = where
        stop = threading.Event()
        bar = None
        if sys.stderr.isatty():
            with contextlib.suppress(OSError):
                size = os.stat(p).st_size
                bar = threading.Thread(target=_restore_progress, args=(cache, p, size, stop),
                                       daemon=True)
                bar.start()
        try:
            [row] = control.query(cache, {"cmd": "restore", "paths": [rel]}, timeout=None)[
                "states"]
        except OSError as exc:
            print(f"hsmfs: {p}: no daemon serves it: {exc}", file=sys.stderr)
            code = 1
            continue
        finally:
            stop.set()
            if bar is not None:
                bar.join(timeout=5)
        if "error" in row:
            print(f"hsmfs: {p}: {row['error']}", file=sys.stderr)
            code = 1
        else:
            print(f"{row['state']:<9} {row['resident_bytes']:>12}/{row['size']:<12} {p}")
    return code


def _locate_any(path: str) -> tuple[str, str, bool] | None:
    """:func:`_locate` for a file or a directory, the tree's root included, and for a path
    that no longer exists (``archive --delete`` of a removed file)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, STATE_DIR)):
            return path, "", False
        with contextlib.suppress(OSError):
            return os.getxattr(path, "user.hsmfs.cache_dir").decode(), "", True
    return _locate(path)


#: How often `hsmfs archive` asks the daemon how far large uploads are (terminal only).
PROGRESS_POLL_S = 0.5


def _by_cache(paths: list[str]) -> tuple[dict[str, list[tuple[str, str]]], int]:
    """The paths grouped by the cache that holds them, as (relative path, path as given),
    and 1 if any is in no hsmfs tree (said on stderr), else 0."""
    by_cache: dict[str, list[tuple[str, str]]] = {}
    code = 0
    for p in paths:
        where = _locate_any(p)
        if where is None:
            print(f"hsmfs: {p}: not in an hsmfs tree", file=sys.stderr)
            code = 1
            continue
        cache, rel, _ = where
        by_cache.setdefault(cache, []).append((rel, p))
    return by_cache, code


def _cmd_archive(args: argparse.Namespace) -> int:
    """Upload local changes, one line per file; non-zero if any file failed."""
    from . import control

    by_cache, code = _by_cache(args.paths)
    for cache, items in by_cache.items():
        shown = {rel: p for rel, p in items}
        request = {"cmd": "archive", "paths": [rel for rel, _ in items],
                   "delete": args.delete, "dry_run": args.dry_run}
        stop = threading.Event()
        bar = None
        if sys.stderr.isatty() and not args.dry_run:
            bar = threading.Thread(target=_progress_lines, args=(cache, stop), daemon=True)
            bar.start()
        try:
            reply = control.query(cache, request, timeout=None)
        except OSError as exc:
            print(f"hsmfs: {', '.join(shown.values())}: no daemon serves it: {exc}",
                  file=sys.stderr)
            code = 1
            continue
        finally:
            stop.set()
            if bar is not None:
                bar.join()
        if "error" in reply:
            print(f"hsmfs: archive: {reply['error']}", file=sys.stderr)
            code = 1
            continue
        for row in reply["files"]:
            print(f"{row['result']:<12} {_shown_path(row['path'], shown)}"
                  + (f"  {row['detail']}" if row.get("detail") else ""))
            if row["result"] in {"conflict", "refused", "failed"}:
                code = 1
    return code


def _cmd_release(args: argparse.Namespace) -> int:
    """``hsmfs release|pin|unpin|resolve PATH...``: one line per file, through the daemon
    that serves it; non-zero if any file was refused or failed."""
    from . import control

    by_cache, code = _by_cache(args.paths)
    for cache, items in by_cache.items():
        shown = {rel: p for rel, p in items}
        request = {"cmd": args.cmd, "paths": [rel for rel, _ in items],
                   "dry_run": args.dry_run}
        if args.cmd == "resolve":
            request.update(mode="keep-local" if args.keep_local else "take-remote",
                           discard=args.discard)
        try:
            reply = control.query(cache, request, timeout=None)
        except OSError as exc:
            print(f"hsmfs: {', '.join(shown.values())}: no daemon serves it: {exc}",
                  file=sys.stderr)
            code = 1
            continue
        if "error" in reply:
            print(f"hsmfs: {args.cmd}: {reply['error']}", file=sys.stderr)
            code = 1
            continue
        for row in reply["files"]:
            path = _shown_path(row["path"], shown)
            result = row["result"]
            if result in ("released", "would release"):
                amount = row["freed"] if result == "released" else row["resident_bytes"]
                print(f"{result:<13} {amount:>12} bytes  {path}")
            elif result in ("pinned", "unpinned"):
                print(f"{result:<13} {row['state']:<9} {row['resident_bytes']:>12}/"
                      f"{row['size']:<12} {path}")
            else:
                print(f"{result:<13} {path}" + (f"  {row['detail']}" if row.get("detail")
                                                 else ""))
            if result in ("refused", "failed"):
                code = 1
    return code


def _cmd_sync(args: argparse.Namespace) -> int:
    """``hsmfs sync [PATH]``: the daemon lists S3 (under PATH only, when PATH is below the
    tree's root) and makes the tree follow; a summary line, then one line per change."""
    from . import control

    where = _locate_any(args.path)
    if where is None:
        print(f"hsmfs: {args.path}: not in an hsmfs tree", file=sys.stderr)
        return 1
    cache, rel, _ = where
    rel = "" if rel in ("", ".") else rel
    try:
        reply = control.query(cache, {"cmd": "sync", "path": rel}, timeout=None)
    except OSError as exc:
        print(f"hsmfs: sync {args.path}: no daemon serves {cache} ({exc.strerror or exc}); "
              "start one with hsmfs mount or hsmfs serve", file=sys.stderr)
        return 1
    if "error" in reply:
        print(f"hsmfs: sync {args.path}: {reply['error']}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{n} {kind}" for kind, n in reply["counts"].items())
    print(f"sync {args.path}: {reply['listed']} objects listed: {counts}"
          + (" (waited for another sync to finish)" if reply.get("waited") else ""))
    shown = {rel: args.path}
    for c in reply["changes"]:
        print(f"{c['kind']:<10} {_shown_path(c['path'], shown)}"
              + (f"  {c['detail']}" if c.get("detail") else ""))
    return 0


def _shown_path(rel: str, shown: dict[str, str]) -> str:
    """A row's path as the user named it (or below a directory they named)."""
    for named_rel, named in sorted(shown.items(), key=lambda kv: -len(kv[0])):
        if rel == named_rel:
            return named
        if named_rel == "" or rel.startswith(named_rel + "/"):
            return os.path.join(named, rel[len(named_rel):].lstrip("/"))
    return rel


def _progress_lines(cache: str, stop: threading.Event) -> None:
    """One self-overwriting stderr line for the large files in flight (a terminal only:
    a pipe or a log gets the result lines and nothing else)."""
    from . import control

    drawn = False
    while not stop.wait(PROGRESS_POLL_S):
        try:
            progress = control.query(cache, {"cmd": "archive_progress"}, timeout=5)["progress"]
        except (OSError, ValueError, KeyError):
            continue
        if not progress:
            continue
        parts = [f"{os.path.basename(rel)} {100 * sent // max(total, 1):3d}% "
                 f"{sent >> 20}/{total >> 20} MiB" for rel, (sent, total) in sorted(
                     progress.items())]
        sys.stderr.write("\r\x1b[K" + "  ".join(parts)[:200])
        sys.stderr.flush()
        drawn = True
    if drawn:
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()


def _restore_progress(cache: str, path: str, size: int, stop: threading.Event) -> None:
    """``hsmfs restore`` on a terminal: one self-overwriting stderr line, the daemon's fetched
    bytes since the restore began against the file's size (other readers' fetches count too:
    it is a progress line, not an account)."""
    from . import control

    def fetched() -> int:
        return int(control.query(cache, {"cmd": "stats"}, timeout=5).get("fetched_bytes", 0))

    try:
        base = fetched()
    except (OSError, ValueError):
        return
    drawn = False
    while not stop.wait(PROGRESS_POLL_S):
        with contextlib.suppress(OSError, ValueError):
            got = min(fetched() - base, size)
            sys.stderr.write(f"\r\x1b[K{os.path.basename(path)} "
                             f"{100 * got // max(size, 1):3d}% {got >> 20}/{size >> 20} MiB")
            sys.stderr.flush()
            drawn = True
    if drawn:
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()


#: ``hsmfs stats --watch``: the counters shown as rates, and the gauges shown as they are.
_WATCH_RATES = (("fetched_bytes", "fetched MB/s", 1e6), ("served_bytes", "served MB/s", 1e6),
                ("cache_s3_gets", "GETs/s", 1), ("hits", "hits/s", 1), ("misses", "misses/s", 1),
                ("releases", "releases/s", 1), ("evict_evictions", "evictions/s", 1))
_WATCH_GAUGES = (("resident_bytes", "resident MB", 1e6), ("inflight_chunks", "in flight", 1),
                 ("dirty_files", "dirty", 1))


def _watch_stats(cache: str, interval: float, count: int | None) -> int:
    """``hsmfs stats --watch``: one line per interval of live rates, until Ctrl-C (or
    ``count`` lines).  Rates are differences of the daemon's counters over the interval."""
    from . import control

    prev, t_prev, shown = None, 0.0, 0
    print("  ".join(f"{label:>12}" for _, label, _ in (*_WATCH_RATES, *_WATCH_GAUGES)),
          flush=True)
    try:
        while count is None or shown < count:
            try:
                now = control.query(cache, {"cmd": "stats"}, timeout=10)
            except OSError as exc:
                print(f"hsmfs: the daemon stopped answering: {exc}", file=sys.stderr)
                return 1
            t_now = time.monotonic()
            if prev is not None:
                dt = max(t_now - t_prev, 1e-6)
                cells = [(float(now.get(k, 0) or 0) - float(prev.get(k, 0) or 0)) / dt / unit
                         for k, _, unit in _WATCH_RATES]
                cells += [float(now.get(k, 0) or 0) / unit for k, _, unit in _WATCH_GAUGES]
                print("  ".join(f"{c:>12.1f}" for c in cells), flush=True)
                shown += 1
            prev, t_prev = now, t_now
            time.sleep(interval)
    except KeyboardInterrupt:
        pass
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from . import control

    if args.watch is not None:
        return _watch_stats(_cache_dir_of(args.path), args.watch, args.count)
    try:
        stats = control.query(_cache_dir_of(args.path), {"cmd": "stats"})
    except OSError as exc:
        print(f"hsmfs: no daemon answers for {args.path}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(stats, indent=2))
    elif args.prometheus:
        from .metrics import prometheus_text

        sys.stdout.write(prometheus_text(stats))
    else:
        for k, v in stats.items():
            print(f"{k:>20}: {_brief(v)}")
    return 0


def _brief(value: object) -> object:
    """A stats value for people: a latency histogram as its count and mean (the buckets are
    for --json and --prometheus)."""
    if isinstance(value, dict):
        if "buckets" in value and "count" in value:
            n = int(value["count"])
            return f"{n} timed, mean {1000 * float(value['sum']) / n:.3f} ms" if n else "0 timed"
        return {k: _brief(v) for k, v in value.items()}
    return value


def _cmd_bench(argv: list[str]) -> int:
    from .bench.main import bench_main

    return bench_main(argv)


def _cmd_demo(argv: list[str]) -> int:
    from .demo import demo_main

    return demo_main(argv)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hsmfs", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"hsmfs {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    # The -o list in --help comes from config.OPTIONS, the one place options are defined.
    m = sub.add_parser("mount", help="mount s3://BUCKET[/PREFIX] through the FUSE door",
                       description="Mount s3://BUCKET[/PREFIX] at MOUNTPOINT through the FUSE "
                       "door; returns once the mount serves.", epilog=options_help("mount"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("source", metavar="s3://BUCKET[/PREFIX]")
    m.add_argument("mountpoint")
    m.add_argument("-o", action="append", metavar="OPT[,OPT...]",
                   help="options, listed below")
    m.add_argument("-f", "--foreground", action="store_true", help="do not detach")
    m.add_argument("-d", "--debug", action="store_true", help="debug logging")
    m.set_defaults(func=_cmd_mount)

    s = sub.add_parser("serve", help="run the kernel door on a backing tree DIR",
                       description="Serve s3://BUCKET[/PREFIX] in DIR through the kernel door "
                       "(fanotify pre-content events): programs read DIR itself; returns once "
                       "every stub is guarded.", epilog=options_help("serve"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("source", metavar="s3://BUCKET[/PREFIX]")
    s.add_argument("dir")
    s.add_argument("-o", action="append", metavar="OPT[,OPT...]",
                   help="options, listed below")
    s.add_argument("-f", "--foreground", action="store_true", help="do not detach")
    s.add_argument("-d", "--debug", action="store_true", help="debug logging")
    s.set_defaults(func=_cmd_serve)

    st = sub.add_parser("stop", help="stop the daemon of a mountpoint or backing tree")
    st.add_argument("path")
    st.add_argument("--timeout", type=float, default=30.0)
    st.set_defaults(func=_cmd_stop)

    sa = sub.add_parser("state", help="state and resident bytes of files")
    sa.add_argument("paths", nargs="+")
    sa.add_argument("--json", action="store_true")
    sa.set_defaults(func=_cmd_state)

    sr = sub.add_parser("restore", help="make files resident now (prefetch them whole)")
    sr.add_argument("paths", nargs="+")
    sr.set_defaults(func=_cmd_restore)

    sv = sub.add_parser("archive", help="upload local changes (dirty and new files) to S3")
    sv.add_argument("paths", nargs="+", metavar="PATH")
    sv.add_argument("--delete", action="store_true",
                    help="also delete in S3 the objects whose files were removed locally")
    sv.add_argument("--dry-run", action="store_true", help="list what would be sent")
    sv.set_defaults(func=_cmd_archive)

    sl = sub.add_parser("release", help="punch clean files back to stubs (space freed; "
                        "size, times, identity kept)")
    sl.add_argument("paths", nargs="+", metavar="PATH")
    sl.add_argument("--dry-run", action="store_true", help="list what would be released")
    sl.set_defaults(func=_cmd_release, cmd="release")
    for name, what in (("pin", "keep files local: make them resident, never release them"),
                       ("unpin", "allow release of pinned files again")):
        sp = sub.add_parser(name, help=what)
        sp.add_argument("paths", nargs="+", metavar="PATH")
        sp.set_defaults(func=_cmd_release, cmd=name, dry_run=False)

    sr = sub.add_parser("resolve", help="end a conflict (or a stale copy): keep the local "
                        "bytes as a change of what S3 holds now, or take S3's version")
    which = sr.add_mutually_exclusive_group(required=True)
    which.add_argument("--keep-local", action="store_true",
                       help="the next archive replaces S3's version with the local bytes")
    which.add_argument("--take-remote", action="store_true",
                       help="the path becomes a stub of S3's version; conflicting local bytes "
                       "are kept in .hsmfs/kept/ unless --discard")
    sr.add_argument("--discard", action="store_true",
                    help="with --take-remote: drop the local bytes instead of keeping them")
    sr.add_argument("paths", nargs="+", metavar="PATH")
    sr.set_defaults(func=_cmd_release, cmd="resolve", dry_run=False)

    sy = sub.add_parser("sync", help="make the tree follow S3 now (new, changed and deleted "
                        "objects), under PATH only when given")
    sy.add_argument("path", nargs="?", default=".", metavar="PATH")
    sy.set_defaults(func=_cmd_sync)

    sb = sub.add_parser("stats", help="counters of a running daemon")
    sb.add_argument("path", metavar="MNT-or-DIR")
    fmt = sb.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--prometheus", action="store_true",
                     help="Prometheus text format (what -o metrics=HOST:PORT serves)")
    fmt.add_argument("--watch", type=float, nargs="?", const=1.0, default=None,
                     metavar="SECONDS", help="live rates, one line every SECONDS (default 1), "
                     "until Ctrl-C")
    sb.add_argument("--count", type=int, default=None, help=argparse.SUPPRESS)  # tests
    sb.set_defaults(func=_cmd_stats)

    sub.add_parser("bench", help="doors side by side (see hsmfs bench --help)", add_help=False)
    sub.add_parser("demo", help="the README's main job", add_help=False)
    sub.add_parser("stress", help="both doors at once with faults and crashes, every byte "
                   "checked (see hsmfs stress --help)", add_help=False)
    sub.add_parser("units", help="install the systemd units (see hsmfs units --help)",
                   add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("s3://"):
        return mount_helper_main(argv)  # mount.fuse3 runs "hsmfs SOURCE DIR -o opts"
    if argv and argv[0] == "bench":
        return _cmd_bench(argv[1:])
    if argv and argv[0] == "demo":
        return _cmd_demo(argv[1:])
    if argv and argv[0] == "stress":
        from .stress import stress_main

        return stress_main(argv[1:])
    if argv and argv[0] == "units":
        from .units import units_main

        return units_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"hsmfs: {exc}", file=sys.stderr)
        return 2


def mount_helper_main(argv: list[str] | None = None) -> int:
    """``mount.hsmfs SOURCE DIR [-sfnv] [-o opts] [-t type]``, as mount(8) calls helpers."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="mount.hsmfs")
    p.add_argument("source")
    p.add_argument("mountpoint")
    p.add_argument("-o", action="append")
    p.add_argument("-t", dest="fstype")
    p.add_argument("-N", dest="namespace")
    for flag in ("-s", "-n", "-v", "-r", "-w"):
        p.add_argument(flag, action="store_true")
    p.add_argument("-f", "--foreground", action="store_true")
    args = p.parse_args(argv)
    args.debug = False
    try:
        return _cmd_mount(args)
    except ValueError as exc:
        print(f"mount.hsmfs: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
