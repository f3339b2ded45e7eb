"""The kernel door's two processes: the holder H that ``hsmfs serve``/``mount`` becomes, and the
worker W it runs as ``python -m hsmfs.worker --worker OPTIONS``.

H side (:func:`run_kernel_daemon`): start :class:`hsmfs.holder.Holder` with the worker's
command line, tell the caller once the first worker guards every stub, and turn a failed start
into :class:`StartFailed` carrying the worker's one-line cause.  This half is imported by the
holder process, so it must import neither trio nor boto3 (a test says so): the daemon and the
door are imported only inside :func:`worker_main`.

W side (:func:`worker_main`): the trio daemon (:mod:`hsmfs.daemon`) with the kernel door (and
the FUSE door, if asked), fed by H through :class:`hsmfs.holder_link.HolderLink`.  A worker
that fails before it told H ``ready`` logs the cause, writes it as one line to the fd named by
``HSMFS_START_ERROR_FD``, and exits :data:`hsmfs.holder.EXIT_START_FAILED`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import threading
from collections.abc import Callable

from .config import CacheConfig, FuseConfig, KernelConfig, Options, S3Config
from .holder import EXIT_START_FAILED, Holder
from .logsetup import current_log_file, root_cause, setup_logging, start_failure_line
from .mounts import clear_dead_mount

# Named, not __name__: the worker runs this module as __main__.
log = logging.getLogger("hsmfs.worker")

#: The worker writes the one-line cause of a failed start here (a pipe H's caller reads).
ENV_START_ERROR_FD = "HSMFS_START_ERROR_FD"
#: Most bytes of causes kept; the pipe is never read while H runs, and writes to it never block.
_CAUSE_MAX = 64 * 1024


class StartFailed(Exception):
    """The kernel door never served: no worker became ready.  ``str()`` is the line to show."""


def source_of(opts: Options) -> str:
    return f"s3://{opts.s3.bucket}/{opts.s3.prefix}"


def encode_options(opts: Options) -> str:
    return json.dumps(dataclasses.asdict(opts))


def decode_options(text: str) -> Options:
    d = json.loads(text)
    layers = {"s3", "cache", "kernel", "fuse"}
    return Options(
        s3=S3Config(**d["s3"]),
        cache=CacheConfig(**d["cache"]),
        kernel=KernelConfig(**d["kernel"]) if d["kernel"] else None,
        fuse=FuseConfig(**d["fuse"]) if d["fuse"] else None,
        # The plain fields (foreground, debug, log_file, metrics, ...) as they are: a new one
        # needs no change here.
        **{k: v for k, v in d.items() if k not in layers},
    )


# ---------------------------------------------------------------------------------- H side

def run_kernel_daemon(opts: Options, ready: Callable[[str], None],
                      before_close: Callable[[bool], None] | None = None) -> int:
    """Become the holder H and supervise a worker running both doors asked for.

    Returns H's exit status once it stops.  ``ready`` is called (from another thread) once the
    first worker has every stub guarded (and, with a FUSE door, mounted).  Raises
    :class:`StartFailed` when no worker ever became ready (a wrong bucket, an unreachable
    endpoint, refused credentials, no fanotify): H then ended at once instead of restarting.
    """
    assert opts.kernel is not None
    worker_opts = dataclasses.replace(opts, log_file=current_log_file())
    argv = [sys.executable, "-m", "hsmfs.worker", "--worker", encode_options(worker_opts)]
    # Both ends non-blocking: a worker must never block on telling its cause (nobody reads
    # while H runs), and H reads what is there only after it stopped.
    cause_r, cause_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        holder = Holder(argv, ready_fd=write_end, watchdog=opts.kernel.watchdog_s,
                        worker_env={**os.environ, ENV_START_ERROR_FD: str(cause_w)},
                        pass_fds=(cause_w, *_progress_fd()), before_close=before_close)
    except OSError as exc:
        for fd in (cause_r, cause_w, read_end, write_end):
            os.close(fd)
        raise StartFailed(f"cannot serve {source_of(opts)}: cannot create the fanotify group "
                          f"({os.strerror(exc.errno or 0)}; the kernel door needs root and "
                          "Linux >= 6.14)") from exc
    became_ready = threading.Event()

    def wait_ready() -> None:
        try:
            if os.read(read_end, 1):
                became_ready.set()
                what = opts.fuse.mountpoint if opts.fuse else opts.cache.cache_dir
                ready(f"kernel door guarding {opts.cache.cache_dir}"
                      + (f", FUSE door at {what}" if opts.fuse else ""))
        finally:
            os.close(read_end)

    waiter = threading.Thread(target=wait_ready, name="ready", daemon=True)
    waiter.start()
    try:
        status = holder.run()
    finally:
        os.close(cause_w)
        cause = _last_line(cause_r)
        os.close(cause_r)
    waiter.join(5.0)  # H closed the ready fd: the thread ends at once
    if not became_ready.is_set() and status != 0:
        raise StartFailed(cause or f"cannot serve {source_of(opts)}: the worker exited with "
                          f"status {status} before it was ready; see the log")
    return status


def _progress_fd() -> tuple[int, ...]:
    """The start-progress pipe the waiting command gave (hsmfs.startprogress), for the worker:
    it is the one that lists and populates."""
    from .startprogress import ENV_FD

    with contextlib.suppress(KeyError, ValueError, OSError):
        fd = int(os.environ[ENV_FD])
        os.fstat(fd)
        return (fd,)
    return ()


def _last_line(fd: int) -> str:
    data = b""
    with contextlib.suppress(BlockingIOError):
        while len(data) < _CAUSE_MAX and (chunk := os.read(fd, 4096)):
            data += chunk
    lines = data.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------------------- W side

def worker_main(argv: list[str]) -> int:
    """W: run the daemon with the kernel door until stopped; the exit status tells H what
    happened (0 stopped, EXIT_START_FAILED failed before ready, 1 failed after)."""
    opts = decode_options(argv[argv.index("--worker") + 1])
    setup_logging(opts.debug, opts.log_file, opts.log_format)
    cause_fd = _inherited_fd(ENV_START_ERROR_FD)
    link = None
    try:
        # Here, not at the top: H imports this module and must not import trio or boto3.
        from . import daemon
        from .holder_link import HolderGone, HolderLink
        from .kernel_bridge import KernelBridge

        assert opts.kernel is not None
        link = HolderLink.from_environ()
        if opts.fuse is not None:
            # A previous worker's mount answers ENOTCONN since it died: clear it, mount again.
            clear_dead_mount(opts.fuse.mountpoint)
        bridge = KernelBridge(opts.cache.cache_dir, opts.kernel, link)
        daemon.run(opts, lambda summary: log.info("worker serving: %s", summary), kernel=bridge)
    except Exception as exc:
        if link is not None and link.ready_sent:
            if not isinstance(root_cause(exc), HolderGone):  # that one is logged already
                log.exception("the worker failed after it was ready")
            return 1
        line = start_failure_line(source_of(opts), exc)
        from .errors import HsmError

        # A domain error is a configuration or S3 problem: its line says it all.  Anything
        # else is a bug, and its traceback goes to the log.
        log.error("%s", line, exc_info=not isinstance(root_cause(exc), HsmError))
        if cause_fd is not None:
            with contextlib.suppress(OSError):
                os.write(cause_fd, (line.replace("\n", " ") + "\n").encode())
        return EXIT_START_FAILED
    return 0


def _inherited_fd(name: str) -> int | None:
    """An fd H passed in the environment, made close-on-exec for this worker's children."""
    try:
        fd = int(os.environ[name])
        os.set_inheritable(fd, False)
    except (KeyError, ValueError, OSError):
        return None
    return fd


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
