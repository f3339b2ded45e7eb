"""The holder H: keeps the fanotify group alive and is its only reader and only responder.

Why it exists (KERNEL_FACTS §8, KERNEL_FACTS_2 §5, DESIGN §6 "Death of the daemon"): when the last
fd of a pre-content group closes, the kernel *allows* every pending and queued event, and the
marks die with the group, so applications read the zeros of unpopulated stubs.  A worker that
crashes must therefore never own the group alone.  And because the kernel matches a response to
the *first* pending event carrying that fd number, a restarted worker that reads the group itself
answers its dead predecessor's events with its own numbers.  So:

  * H creates the group and is the only process that ever ``read()``s it or writes a response.
  * H passes each permission event to the worker W over a ``SOCK_SEQPACKET`` socketpair: a
    fixed-size message plus the event fd (SCM_RIGHTS).  The message id is H's own fd number for
    the event; H keeps that fd open until it has written the response, so the number cannot be
    reused by another event while this one is pending.  A sequence number travels with it, so
    even a late or duplicate reply for an id that H has since reused is recognised and dropped:
    no response can land on the wrong event.
  * Notification events the worker's marks ask for (FAN_MODIFY: a write landed, for the
    worker to record the file dirty) carry an fd but want no answer: H forwards each to a ready
    worker as a *notice* (below) and closes its own fd at once.  H holds no number for them,
    so they can never be confused with a pending permission event.
  * W gets a dup of the group fd only to *add marks* (marks belong to the group and survive W).
  * When W dies, every pending event stays blocked (H still holds the fds: apps wait instead of
    reading zeros), H restarts W with backoff, and re-dispatches every pending event to it once
    it reports ``ready``.
  * **H never fails open.**  While it runs it holds the group, whatever the workers do.  When
    workers keep dying (more than ``max_rapid_crashes`` deaths in a row, each within
    ``healthy_after`` of its start) or no worker has been ready for ``degrade_after`` seconds
    since the last ready one was lost, H enters *degraded mode*: it answers every pending and
    every new permission event itself with ``FAN_DENY_ERRNO(EIO)`` at once (applications get an
    error now rather than a hang, and never zeros), keeps restarting the worker with a capped
    exponential backoff, and logs loudly (rate-limited, plus a periodic summary).  The next
    worker that reports ``ready`` ends degraded mode.  H ends only when asked to stop (SIGTERM,
    SIGINT, :meth:`Holder.request_stop`, or a worker that says ``stopping`` and exits), or at a
    failed start: no worker of this H ever became ready and one exited with
    :data:`EXIT_START_FAILED` (a configuration error such as a missing bucket, which no restart
    cures) or the first workers kept dying.  Before any worker was ready nothing was guarded
    on this H's word, so exiting then exposes nothing that was protected.
  * Before H lets the group close, it answers every pending and queued event with
    ``FAN_DENY_ERRNO(EIO)``.

Wire format (native byte order; both ends are on the same machine):

  H → W, 48 bytes + exactly one fd in SCM_RIGHTS (:data:`EVENT_MSG`, ``"=IiIIQiIQQ"``)::

      0  u32 kind      = MSG_EVENT (1)
      4  i32 id        H's fd number of the event
      8  u32 seq       H's sequence number of the event (same on a re-dispatch)
     12  u32 flags     bit 0 (FLAG_HAS_RANGE): offset/count are valid
     16  u64 mask      fanotify event mask
     24  i32 pid       tid of the accessing thread (FAN_REPORT_TID)
     28  u32 reserved  0
     32  u64 offset    RANGE record
     40  u64 count     RANGE record (0 = to EOF, see hsmfs.fanotify.Event)

  H → W, a notification (no reply), same 48-byte layout + exactly one fd in SCM_RIGHTS::

      0  u32 kind      = MSG_NOTICE (7)
      4  i32 id        -1 (:data:`NOTICE_ID`: nothing to answer)
      8  u32 seq       0
     12  u32 flags     0
     16  u64 mask      fanotify event mask (FAN_MODIFY and/or FAN_CLOSE_WRITE)
     24  i32 pid       tid of the writing thread
     28  u32 reserved  0
     32  u64 offset    0
     40  u64 count     0

    The kernel raises these for the notification bits the worker adds to its marks
    (:data:`hsmfs.fanotify.NOTIFY_EVENTS`: a write landed, docs/kernel_writes.md).  H closes
    its own fd as soon as the message is sent: nothing waits on a notification, so H keeps no
    number for it.  They are sent only to a ready worker, after the permission events of the
    same turn; while they wait in H they are coalesced by inode (a second FAN_MODIFY of a file
    whose notice is still queued only ORs its mask in), at most :data:`_MAX_NOTICES` files
    (past that the newest are dropped and counted, ``notices_dropped``).  A worker that dies
    loses the notices it had not handled (the write is still found by the size/mtime check at
    the next start); notices are not re-dispatched.

  W → H, 16 bytes, no fds (:data:`CTRL_MSG`, ``"=IiII"``)::

      0  u32 kind      MSG_REPLY (2) | MSG_READY (3) | MSG_STOPPING (4)
      4  i32 id        the event's id for MSG_REPLY, else 0
      8  u32 seq       the event's seq for MSG_REPLY, else 0
     12  u32 response  the fanotify response word for MSG_REPLY, else 0

The worker learns its two fds from the environment: ``HSMFS_FAN_FD`` (the group) and
``HSMFS_HOLDER_FD`` (its end of the socketpair); ``HSMFS_WORKER_GENERATION`` says which worker
of this H it is (1, then 2, 3, ... for restarts).  Its obligations: add marks through the group
fd but never ``read()`` it and never write a response to it (the one exception is
:class:`hsmfs.holder_link.HolderLink` denying its own outstanding events once H is gone); send
``ready`` once its marks are in place; reply exactly once per event, in any order; close every
event fd it receives, and every notice's fd (never replying to a notice); exit on
``HolderGone``; exit with :data:`EXIT_START_FAILED` when it fails
before it sent ``ready``.

What this module owns: the H process (:class:`Holder`, :func:`main`) and the wire format.  The
worker's end of the link is :mod:`hsmfs.holder_link` (trio).  What it must not do: know anything
about stubs, S3 or the cache, or import trio or boto3 (a test says so).  H never opens files,
never fills, never decides a response for a worker (it only substitutes EIO when the kernel
refuses the worker's, and answers EIO itself in degraded mode); it stays small so that it does
not crash.  Keep it single-threaded and plain blocking Python.
"""

from __future__ import annotations

import argparse
import array
import collections
import contextlib
import dataclasses
import errno
import logging
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hsmfs.fanotify import (
    FAN_CLASS_PRE_CONTENT,
    FAN_CLOEXEC,
    FAN_DENY,
    FAN_NONBLOCK,
    FAN_REPORT_FD_ERROR,
    FAN_REPORT_TID,
    FAN_UNLIMITED_QUEUE,
    NOTIFY_EVENTS,
    Event,
    deny_errno,
    describe_mask,
    fanotify_init,
    parse_events,
    write_response,
)

log = logging.getLogger(__name__)

#: Group flags (DESIGN §6).  UNLIMITED_QUEUE: a bounded queue silently *allows* what overflows
#: (KF §9).  REPORT_TID: the worker can read /proc/<tid>/syscall to tell reads from writes and
#: see O_TRUNC (KF §3, KF2 §1d).  REPORT_FD_ERROR: an event whose fd the kernel cannot open
#: arrives with fd = -errno instead of failing the whole read() (KF §7).  NONBLOCK: measured
#: here, a queued (unread) permission event *vanishes* when its application is killed, so poll()
#: can report the group readable and a blocking read() then sleeps forever — with H asleep every
#: access to a stub would hang.  H reads only after poll() and treats EAGAIN as "nothing".
HOLDER_INIT_FLAGS = (
    FAN_CLASS_PRE_CONTENT
    | FAN_CLOEXEC
    | FAN_NONBLOCK
    | FAN_UNLIMITED_QUEUE
    | FAN_REPORT_TID
    | FAN_REPORT_FD_ERROR
)
#: Event fds are read-only.  The kernel opens each on the mount the access came through: with
#: O_RDWR, an access through a read-only bind mount (a container's ``-v DIR:/data:ro``) got no
#: fd (EROFS) and the kernel denied it (EPERM), and so did a binary exec'd before its mark
#: (deny-write: ETXTBSY, KF §7).  Fills go through the private door; a stub no path leads to
#: any more is filled through its inode reopened by handle on the private mount
#: (hsmfs.handles), never through the event fd.
HOLDER_EVENT_F_FLAGS = os.O_RDONLY | os.O_LARGEFILE

ENV_FAN_FD = "HSMFS_FAN_FD"
ENV_HOLDER_FD = "HSMFS_HOLDER_FD"
#: 1 for the first worker H starts, 2, 3, ... for its restarts.
ENV_GENERATION = "HSMFS_WORKER_GENERATION"
#: "1" when some earlier worker of this H reported ready (it had built and guarded the whole
#: tree), else "0".  A restart before any worker was ready (one SIGKILLed in the middle of its
#: first populate) must build the tree again, not adopt the half it finds (tests/t4_crash.py).
ENV_TREE_READY = "HSMFS_WORKER_TREE_READY"
#: A worker that fails before it reported ``ready`` exits with this status (sysexits EX_CONFIG:
#: at a first start the cause is almost always configuration: bucket, endpoint, credentials).
#: If no worker of this H was ever ready, H takes it as fatal: restarting cannot cure it.
EXIT_START_FAILED = 78

MSG_EVENT = 1
MSG_REPLY = 2
MSG_READY = 3
MSG_STOPPING = 4
#: H -> W: "is your loop alive?" (an EVENT_MSG with ident -1 and no fd); W -> H: the answer,
#: from W's trio loop, carrying the ping's sequence number.
MSG_PING = 5
MSG_PONG = 6
#: H -> W: a notification event (FAN_MODIFY...) with its fd; no reply (see the wire format).
MSG_NOTICE = 7
#: The id of every MSG_NOTICE: no event number to answer.
NOTICE_ID = -1
FLAG_HAS_RANGE = 0x1
EVENT_MSG = struct.Struct("=IiIIQiIQQ")
CTRL_MSG = struct.Struct("=IiII")

#: One read() of the group.  A PRE_ACCESS event is 48 bytes (KF §2), so 64 KiB takes a burst of
#: ~1300 events per syscall; the kernel only ever returns whole events.
READ_BUFSIZE = 64 * 1024

#: Restart backoff: first retry after 0.2 s, doubling, capped at 10 s.  The first retry is short
#: so that applications held across one crash barely notice it.  The cap bounds both costs of a
#: worker that keeps failing: service comes back at most ~10 s (plus a start) after the cause is
#: cured, and a failing start (Python, boto3, a listing: about 1 s of CPU here) every 10 s costs
#: at most a tenth of a core.
RESTART_BACKOFF_MIN = 0.2
DEFAULT_BACKOFF_MAX = 10.0
#: Exponent bound for the backoff: days of degraded restarts must not overflow a float.
_BACKOFF_MAX_DOUBLINGS = 16
#: A worker that crashes within this many seconds of its start counts as a "rapid" crash; one
#: that lived longer resets the count (it was working, this is a fresh failure).
DEFAULT_HEALTHY_AFTER = 10.0
#: More rapid crashes in a row than this and H stops holding events for the next worker: it
#: enters degraded mode (denies with EIO at once).  An event that crashes every worker that
#: takes it (a poison event) is then answered instead of being re-dispatched for ever.  Before
#: any worker was ready, it ends H instead (a failed start, see the module docstring).
DEFAULT_MAX_RAPID_CRASHES = 5
#: No ready worker for this long since the last ready one was lost: degraded mode.  Longer than
#: a normal restart (0.2 s backoff plus ~1-3 s of start on a busy 2-core machine), so one crash
#: never costs an application an error; about the backend's own retry budget (six attempts,
#: ~3-5 s of backoff, 5 s connect timeout), so an application never waits much longer for a
#: missing worker than it would for a failing S3 before it gets its EIO.
DEFAULT_DEGRADE_AFTER = 10.0
#: While degraded, a summary line (events denied, restarts) this often.
_DEGRADED_SUMMARY_EVERY = 10.0
#: How long H waits for the worker to exit after forwarding SIGTERM, before SIGKILL.
DEFAULT_STOP_TIMEOUT = 5.0
#: Bound on waiting for a SIGKILLed process to be reaped.  Only a task stuck in an unkillable
#: (D state) sleep exceeds it; H then carries on rather than hang.
_REAP_TIMEOUT = 2.0
#: How long a crashed worker whose socket closed may take to exit by itself before SIGKILL (a
#: stopping one gets the stop timeout).  H blocks meanwhile, which is harmless: with no worker
#: nobody could serve an event anyway, and events wait in the (unlimited) queue.
_EXIT_GRACE = 1.0
#: The watchdog: a ready worker whose loop has not answered a ping for this long is killed (and,
#: as after any crash, restarted, its pending events re-dispatched).  A worker that hangs
#: without dying (a deadlock, a call stuck on a dead disk) would otherwise hold every guarded
#: access forever.  A slow S3 never trips it: fetches wait in threads, the loop stays free.
DEFAULT_WATCHDOG = 30.0
#: Pings go out this often (at most), so a hung worker is found within about the watchdog time.
_PING_EVERY = 5.0
#: The poll loop never sleeps longer than this, so every deadline is checked even if a wakeup
#: were lost.
_POLL_TICK = 1.0
#: Most messages taken from the worker per loop turn, so a flood of replies cannot starve the
#: group (and vice versa: one read() per turn).
_MAX_MSGS_PER_TURN = 512
#: Most notices (files with a write seen, not yet sent to a worker) H keeps; each holds an fd.
_MAX_NOTICES = 4096
#: Log the first few fd errors (per errno) and read errors, then every n-th: a running binary
#: under an O_RDWR event fd raises one per access and must not flood the log.
_ERROR_LOG_FIRST = 10
_ERROR_LOG_EVERY = 1000


@dataclasses.dataclass
class HolderStats:
    """Counters of one holder's life, logged at exit."""

    events: int = 0  # permission events read with a usable fd
    dispatched: int = 0  # messages sent to workers (re-dispatches included)
    redispatched: int = 0  # events handed again to a restarted worker
    send_blocked: int = 0  # times the worker's socket was full and H waited for POLLOUT
    responses: int = 0  # responses the kernel accepted
    refused_responses: int = 0  # worker responses refused (EINVAL) and replaced by EIO
    denied_at_stop: int = 0  # events H answered with EIO itself while stopping
    denied_without_worker: int = 0  # events H answered with EIO itself in degraded mode
    degraded_entries: int = 0  # times H entered degraded mode
    unknown_replies: int = 0  # replies for an id that was not pending
    stale_responses: int = 0  # kernel said ENOENT: the event was no longer pending
    read_errors: int = 0  # read() of the group failed (never fatal)
    parse_errors: int = 0
    overflows: int = 0
    non_permission: int = 0  # notification events H did not forward (not ours, or no room)
    notices: int = 0  # notification events forwarded (or coalesced) to workers
    notices_sent: int = 0
    notices_dropped: int = 0
    bad_messages: int = 0
    fd_errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    worker_starts: int = 0
    worker_exits: int = 0
    watchdog_kills: int = 0  # workers killed because their loop stopped answering pings

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["fd_errors"] = dict(self.fd_errors)
        return d


@dataclasses.dataclass
class _Pending:
    event: Event
    seq: int
    message: bytes
    sent: bool = False  # handed to some worker at least once (a later send is a re-dispatch)


@dataclasses.dataclass
class _Worker:
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    pidfd: int
    started: float
    generation: int
    outbox: collections.deque[int]  # ids to send; filled only once the worker is ready
    ready: bool = False
    stopping: bool = False
    ping_seq: int = 0  # the ping awaiting its pong (with ping_sent)
    ping_sent: float | None = None
    next_ping: float = 0.0


class Holder:
    """H: owns the group, spawns and supervises the worker, relays events and responses.

    Invariants:
      * every key of ``_pending`` is an fd open in this process for a permission event the
        kernel holds pending, and the only copy of that number among pending events;
      * a response is written only with a key of ``_pending`` (or, in degraded mode, with an
        event's fd that was never put there), and the fd is closed only after the kernel
        accepted a response (or said ENOENT), so a number is never reused while its event can
        still be answered;
      * events are sent only to a worker that reported ``ready``;
      * in degraded mode ``_pending`` is empty: every event is answered as it is read;
      * the group fd is closed only after every pending and queued event got a response, and
        only when :meth:`run` returns: on a requested stop or a failed start, never because
        workers keep failing.
    """

    def __init__(
        self,
        worker_argv: Sequence[str],
        *,
        ready_fd: int | None = None,
        worker_env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
        max_rapid_crashes: int = DEFAULT_MAX_RAPID_CRASHES,
        healthy_after: float = DEFAULT_HEALTHY_AFTER,
        degrade_after: float = DEFAULT_DEGRADE_AFTER,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        init_flags: int = HOLDER_INIT_FLAGS,
        event_f_flags: int = HOLDER_EVENT_F_FLAGS,
        watchdog: float = DEFAULT_WATCHDOG,
        before_close: Callable[[bool], None] | None = None,
    ) -> None:
        """Create the group (raises OSError if the kernel refuses) and prepare, not start.

        ``before_close``: called once, as soon as H knows it will close the group (a stop is
        requested, or it is about to close for any other reason), before any event is denied
        or the group closed, with whether any worker was ever ready (whether the group
        guarded anything): the caller's chance to keep new openers away from what the group
        will stop guarding (:mod:`hsmfs.cover`).  Its failures are logged, never fatal.

        ``ready_fd``: H writes one byte to it when the first worker reports ``ready`` (its marks
        are in place) and closes it; it is closed without a byte if H ends before that.
        ``pass_fds``: further fds every worker inherits (the caller's, e.g. a pipe for the
        cause of a failed start).  Also raises this process's RLIMIT_NOFILE soft limit to the
        hard limit: every pending event holds an fd in H.  ``watchdog``: seconds a ready worker
        may leave a ping unanswered before it is killed (0: never).  ``max_rapid_crashes``,
        ``healthy_after``, ``degrade_after``, ``backoff_max``: when degraded mode begins and how
        fast restarts go (see the module docstring and the constants' comments).
        """
        if not worker_argv:
            raise ValueError("worker_argv is empty")
        self._argv = list(worker_argv)
        self._before_close = before_close
        self._env = dict(os.environ if worker_env is None else worker_env)
        self._extra_fds = tuple(pass_fds)
        self._ready_fd = ready_fd
        self._max_rapid = max_rapid_crashes
        self._healthy_after = healthy_after
        self._degrade_after = degrade_after
        self._backoff_max = backoff_max
        self._stop_timeout = stop_timeout
        self._watchdog = watchdog
        self._ping_every = min(_PING_EVERY, watchdog / 3)
        self._ping_seq = 0
        self.stats = HolderStats()

        _raise_nofile_limit()
        self._fan = fanotify_init(init_flags, event_f_flags)
        self._pending: dict[int, _Pending] = {}  # insertion order = arrival order
        self._seq = 0
        self._stuck: set[int] = set()  # fds kept open because no response was accepted
        # Notification events waiting for a ready worker: (st_dev, st_ino) -> [mask, fd, pid].
        self._notices: dict[tuple[int, int], list[int]] = {}
        self._worker: _Worker | None = None
        self._generation = 0  # workers started so far (the last one's HSMFS_WORKER_GENERATION)
        self._rapid_crashes = 0
        self._ever_ready = False  # some worker of this H reported ready
        # When the last ready worker was lost (None while one serves, or before any was ready).
        self._unready_since: float | None = None
        self._degraded_since: float | None = None  # degraded mode: H denies every event at once
        self._next_summary = 0.0
        self._denied_at_summary = 0
        self._restart_at: float | None = None
        self._stop_requested = False
        self._stop_deadline: float | None = None
        self._kill_deadline: float | None = None
        self._exit_status: int | None = None
        self._signals: list[int] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self._fan, select.POLLIN)
        self._poll.register(self._wake_r, select.POLLIN)

    @property
    def fan_fd(self) -> int:
        """The group fd (for callers that want to add marks before :meth:`run`)."""
        return self._fan

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        """Serve until stopped; return the exit status: 0 after a clean stop, 1 when the worker
        that stopped on its own failed, and at a failed start :data:`EXIT_START_FAILED` (the
        worker said so) or 1 (no worker ever became ready).  Workers that keep failing after one
        was ready never end it: that is degraded mode.

        SIGTERM and SIGINT request a clean stop when ``run`` is called from the main thread.
        """
        restore = self._install_signal_handlers()
        try:
            self._spawn_worker()
            while self._exit_status is None:
                self._turn()
            return self._exit_status
        finally:
            try:
                self._close_group()
            finally:
                restore()

    def request_stop(self) -> None:
        """Begin a clean stop, as SIGTERM does.  Call only from the thread running :meth:`run`."""
        self._begin_stop("request")

    def _turn(self) -> None:
        timeout = self._poll_timeout()
        try:
            ready = self._poll.poll(timeout * 1000.0)
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for embedders
            ready = []
        # Order matters: replies first (they free apps and fds), then the group, then a
        # worker's death (after its last replies were taken), then signals.
        revents = dict(ready)
        w = self._worker
        if w is not None and revents.get(w.sock.fileno(), 0):
            self._read_worker()
        if revents.get(self._fan, 0):
            self._read_group()
        w = self._worker
        if w is not None and revents.get(w.pidfd, 0):
            self._worker_gone(w, "process exited")
        if revents.get(self._wake_r, 0) or self._signals:
            self._handle_signals()
        w = self._worker
        if w is not None and (w.outbox or (self._notices and w.ready)):
            self._flush_outbox()
        self._check_timers()

    def _poll_timeout(self) -> float:
        now = time.monotonic()
        timeout = _POLL_TICK
        for deadline in (self._restart_at, self._stop_deadline, self._kill_deadline,
                         self._degrade_deadline()):
            if deadline is not None:
                timeout = min(timeout, max(0.0, deadline - now))
        return timeout

    def _degrade_deadline(self) -> float | None:
        """When degraded mode begins for want of a ready worker (None: not counting)."""
        if self._degraded_since is not None or self._unready_since is None:
            return None
        return self._unready_since + self._degrade_after

    def _check_timers(self) -> None:
        now = time.monotonic()
        deadline = self._degrade_deadline()
        if deadline is not None and now >= deadline and not self._stop_requested:
            self._enter_degraded(f"no worker has been ready for {self._degrade_after:.1f} s")
        if self._degraded_since is not None and now >= self._next_summary:
            self._degraded_summary(now)
        if self._restart_at is not None and now >= self._restart_at:
            self._restart_at = None
            self._spawn_worker()
        w = self._worker
        if self._stop_deadline is not None and now >= self._stop_deadline:
            self._stop_deadline = None
            if w is not None:
                log.warning(
                    "worker pid %d still running %.1f s after SIGTERM; killing it",
                    w.proc.pid,
                    self._stop_timeout,
                )
                _kill(w.proc)
                self._kill_deadline = now + _REAP_TIMEOUT
        if self._kill_deadline is not None and now >= self._kill_deadline:
            self._kill_deadline = None
            if self._worker is not None:
                self._worker_gone(self._worker, "not reaped after SIGKILL")
        self._check_watchdog(now)

    def _check_watchdog(self, now: float) -> None:
        """Ping a ready worker's loop; kill the worker once a ping goes unanswered for the
        watchdog time.  Its death takes the crash path (restart, re-dispatch), so the
        applications it held get their bytes from the next worker instead of waiting forever."""
        w = self._worker
        if (self._watchdog <= 0 or w is None or not w.ready or w.stopping
                or self._stop_requested or self._kill_deadline is not None):
            return
        if w.ping_sent is not None:
            if now - w.ping_sent >= self._watchdog:
                log.error(
                    "worker pid %d has not answered a ping for %.1f s (%d events pending): "
                    "its loop is stuck; killing it",
                    w.proc.pid,
                    now - w.ping_sent,
                    len(self._pending),
                )
                self.stats.watchdog_kills += 1
                w.ping_sent = None
                _kill(w.proc)
                self._kill_deadline = now + _REAP_TIMEOUT  # its pidfd reports the exit first
            return
        if now < w.next_ping:
            return
        self._ping_seq = (self._ping_seq + 1) & 0xFFFF_FFFF
        w.ping_seq, w.ping_sent, w.next_ping = self._ping_seq, now, now + self._ping_every
        try:
            w.sock.send(EVENT_MSG.pack(MSG_PING, -1, w.ping_seq, 0, 0, 0, 0, 0, 0),
                        socket.MSG_NOSIGNAL)
        except BlockingIOError:
            pass  # the worker is not reading: the ping's time runs all the same
        except OSError as e:
            self._worker_gone(w, f"ping failed: {_ename(e.errno)}")

    # ------------------------------------------------------------------ the group

    def _read_group(self) -> bool:
        """One read() of the group; False if there was nothing to read."""
        try:
            buf = os.read(self._fan, READ_BUFSIZE)
        except BlockingIOError:
            return False  # e.g. the only queued event vanished: its application was killed
        except OSError as e:
            # Never fatal (KF §7: a listener that stopped on ETXTBSY froze every access).
            self.stats.read_errors += 1
            n = self.stats.read_errors
            if n <= _ERROR_LOG_FIRST or n % _ERROR_LOG_EVERY == 0:
                log.error(
                    "read() of the fanotify group failed: %s (%d so far); continuing",
                    _ename(e.errno),
                    n,
                )
            return True
        try:
            events = parse_events(buf)
        except ValueError as e:
            self.stats.parse_errors += 1
            log.error("cannot parse %d bytes from the fanotify group: %s", len(buf), e)
            return True
        for ev in events:
            self._take_event(ev)
        return True

    def _take_event(self, ev: Event) -> None:
        if ev.is_overflow:
            # Impossible with FAN_UNLIMITED_QUEUE; if it ever happens, events were allowed
            # unseen (KF §9) and that must be loud.
            self.stats.overflows += 1
            log.error("fanotify queue overflow: some accesses were allowed without a check")
            return
        if ev.fd < 0:
            self._fd_error(ev)
            return
        if not ev.is_permission:
            self._take_notice(ev)
            return
        if ev.fd in self._pending:  # cannot happen: the number is open in this process
            log.critical("kernel reused pending event fd %d; keeping both open", ev.fd)
            self._stuck.add(ev.fd)
            return
        self.stats.events += 1
        if self._degraded_since is not None and self._exit_status is None:
            self._deny_without_worker(ev)  # never held: no worker will serve it soon
            return
        self._seq = (self._seq + 1) & 0xFFFF_FFFF
        has_range = ev.offset is not None and ev.count is not None
        message = EVENT_MSG.pack(
            MSG_EVENT,
            ev.fd,
            self._seq,
            FLAG_HAS_RANGE if has_range else 0,
            ev.mask,
            ev.pid,
            0,
            ev.offset or 0,
            ev.count or 0,
        )
        self._pending[ev.fd] = _Pending(ev, self._seq, message)
        if self._exit_status is not None:
            return  # _close_group() answers it
        w = self._worker
        if w is not None and w.ready:
            w.outbox.append(ev.fd)
        # Else it waits here: the next worker gets it once ready (or degraded mode denies it).

    def _take_notice(self, ev: Event) -> None:
        """Queue a notification event (a write landed) for the worker, coalesced by inode; H
        never answers or holds it (see the wire format)."""
        if not ev.mask & NOTIFY_EVENTS or self._exit_status is not None or self._stop_requested:
            self.stats.non_permission += 1
            os.close(ev.fd)
            return
        try:
            st = os.fstat(ev.fd)  # never raises an event
        except OSError:
            self.stats.non_permission += 1
            os.close(ev.fd)
            return
        key = (st.st_dev, st.st_ino)
        self.stats.notices += 1
        queued = self._notices.get(key)
        if queued is not None:
            queued[0] |= ev.mask
            os.close(ev.fd)
            return
        if len(self._notices) >= _MAX_NOTICES:
            self.stats.notices_dropped += 1
            n = self.stats.notices_dropped
            if n <= _ERROR_LOG_FIRST or n % _ERROR_LOG_EVERY == 0:
                log.error("%d files with writes wait for the worker: dropped a %s of tid %d "
                          "(%d dropped so far; the start-time check finds the write)",
                          len(self._notices), describe_mask(ev.mask), ev.pid, n)
            os.close(ev.fd)
            return
        self._notices[key] = [ev.mask, ev.fd, ev.pid]

    def _flush_notices(self, w: _Worker) -> bool:
        """Send queued notices to ready worker ``w`` after its permission events; False if its
        socket is full (POLLOUT resumes)."""
        while self._notices and not w.outbox:
            key = next(iter(self._notices))
            mask, fd, pid = self._notices[key]
            message = EVENT_MSG.pack(MSG_NOTICE, NOTICE_ID, 0, 0, mask, pid, 0, 0, 0)
            try:
                w.sock.sendmsg([message],
                               [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))],
                               socket.MSG_NOSIGNAL)
            except BlockingIOError:
                self.stats.send_blocked += 1
                return False
            except OSError as e:
                self._worker_gone(w, f"send failed: {_ename(e.errno)}")
                return False
            del self._notices[key]
            os.close(fd)
            self.stats.notices_sent += 1
        return True

    def _drop_notices(self) -> None:
        for _mask, fd, _pid in self._notices.values():
            os.close(fd)
        self._notices.clear()

    def _fd_error(self, ev: Event) -> None:
        # The kernel could not open the event fd (KF §7: ETXTBSY for a binary that runs since
        # before its mark, under O_RDWR event fds).  It has already denied the access; there is
        # nothing to answer, only to count and tell.
        err = ev.fd_error or 0
        name = _ename(err)
        self.stats.fd_errors[name] += 1
        n = self.stats.fd_errors[name]
        if n <= _ERROR_LOG_FIRST or n % _ERROR_LOG_EVERY == 0:
            log.warning(
                "event %s of tid %d came without an fd (%s, %d so far): the kernel denied it",
                describe_mask(ev.mask),
                ev.pid,
                name,
                n,
            )

    # ------------------------------------------------------------------ responses

    def _answer(self, ident: int, seq: int, response: int) -> None:
        pending = self._pending.get(ident)
        if pending is None or pending.seq != seq:
            # A duplicate or late reply: the id may already belong to another event.
            self.stats.unknown_replies += 1
            log.warning(
                "reply %#x for id %d seq %d, which is not pending; ignored", response, ident, seq
            )
            return
        del self._pending[ident]
        if self._respond(ident, response):
            os.close(ident)
        else:
            self._stuck.add(ident)

    def _respond(self, ident: int, response: int) -> bool:
        """Write a response for ``ident``; True once the kernel no longer holds the event.

        A response the kernel refuses (EINVAL, KF §4) leaves the event pending, so it is
        replaced by FAN_DENY_ERRNO(EIO), then plain FAN_DENY: an event never stays pending.
        """
        for attempt, word in enumerate((response, deny_errno(errno.EIO), FAN_DENY)):
            try:
                write_response(self._fan, ident, word)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    # Not pending any more (e.g. answered by another holder of the group fd).
                    self.stats.stale_responses += 1
                    log.warning("response for id %d: the kernel has no such pending event", ident)
                    return True
                if attempt == 0:
                    self.stats.refused_responses += 1
                    log.error(
                        "kernel refused response %#x for id %d (%s); answering EIO instead",
                        word,
                        ident,
                        _ename(e.errno),
                    )
                else:
                    log.error("kernel refused %#x for id %d too (%s)", word, ident, _ename(e.errno))
                continue
            self.stats.responses += 1
            return True
        # Keep the fd open: closing it would let a new event reuse the number while this one is
        # still pending, and a later response would land here (KF §8 C').
        log.critical("no response accepted for id %d; it stays pending", ident)
        return False

    def _deny_all_pending(self, why: str) -> None:
        if self._pending:
            log.warning("%s: answering %d pending events with EIO", why, len(self._pending))
        for ident in list(self._pending):
            self._pending.pop(ident)
            self.stats.denied_at_stop += 1
            self._deny(ident)

    def _deny(self, ident: int) -> None:
        """Answer event ``ident`` (not, or no longer, in ``_pending``) with EIO; close its fd."""
        if self._respond(ident, deny_errno(errno.EIO)):
            os.close(ident)
        else:
            self._stuck.add(ident)

    # ------------------------------------------------------------------ degraded mode

    def _enter_degraded(self, why: str) -> None:
        """Stop holding events for a worker that is not coming: deny what is pending, and from
        now on every new event as it is read, until a worker reports ready."""
        if self._degraded_since is not None:
            return
        now = time.monotonic()
        self._degraded_since = now
        self._next_summary = now + _DEGRADED_SUMMARY_EVERY
        self._denied_at_summary = self.stats.denied_without_worker
        self.stats.degraded_entries += 1
        log.error(
            "DEGRADED: %s.  Every guarded access now fails with EIO at once (%d pending denied "
            "now) until a worker is ready again; the group stays held, restarts go on",
            why,
            len(self._pending),
        )
        for ident, pending in list(self._pending.items()):
            del self._pending[ident]
            self._deny_without_worker(pending.event)
        if self._worker is not None:
            self._worker.outbox.clear()

    def _deny_without_worker(self, ev: Event) -> None:
        self.stats.denied_without_worker += 1
        n = self.stats.denied_without_worker
        if n <= _ERROR_LOG_FIRST or n % _ERROR_LOG_EVERY == 0:
            log.error(
                "degraded: denied %s of tid %d with EIO: no worker (%d denied so far)",
                describe_mask(ev.mask),
                ev.pid,
                n,
            )
        self._deny(ev.fd)

    def _leave_degraded(self, w: _Worker) -> None:
        assert self._degraded_since is not None
        log.warning(
            "worker pid %d is ready: leaving degraded mode after %.1f s (%d accesses denied in "
            "all, %d worker starts so far)",
            w.proc.pid,
            time.monotonic() - self._degraded_since,
            self.stats.denied_without_worker,
            self.stats.worker_starts,
        )
        self._degraded_since = None

    def _degraded_summary(self, now: float) -> None:
        assert self._degraded_since is not None
        total = self.stats.denied_without_worker
        if self._worker is not None:
            state = f"worker pid {self._worker.proc.pid} starting"
        elif self._restart_at is not None:
            state = f"next worker start in {max(self._restart_at - now, 0.0):.1f} s"
        else:
            state = "no worker"
        log.error(
            "still DEGRADED after %.0f s: %d accesses denied with EIO (%d in the last %.0f s), "
            "%d worker starts, %d rapid crashes in a row; %s",
            now - self._degraded_since,
            total,
            total - self._denied_at_summary,
            _DEGRADED_SUMMARY_EVERY,
            self.stats.worker_starts,
            self._rapid_crashes,
            state,
        )
        self._denied_at_summary = total
        self._next_summary = now + _DEGRADED_SUMMARY_EVERY

    # ------------------------------------------------------------------ the worker

    def _spawn_worker(self) -> None:
        assert self._worker is None
        if self._stop_requested or self._exit_status is not None:
            return
        started = time.monotonic()
        try:
            w = self._start_process(started, self._generation + 1)
        except OSError as e:
            # EMFILE, ENOMEM, a missing interpreter: a failed start like any other, never an
            # exception out of run() (the group would close).
            log.error("cannot start worker %s: %s", self._argv[0], e)
            self._after_crash(lived=0.0, status=None)
            return
        self._worker = w
        self._generation = w.generation
        self._poll.register(w.sock.fileno(), select.POLLIN)
        self._poll.register(w.pidfd, select.POLLIN)
        self.stats.worker_starts += 1
        if self._pending:
            # Sent once it is ready: a worker reads its socket only then, and an event handed
            # to a worker that never gets ready would have to be taken back.
            log.warning(
                "worker pid %d started (generation %d); re-dispatching %d pending events once "
                "it is ready",
                w.proc.pid,
                w.generation,
                len(self._pending),
            )
        else:
            log.info("worker pid %d started (generation %d)", w.proc.pid, w.generation)

    def _start_process(self, started: float, generation: int) -> _Worker:
        """Start worker number ``generation``; raises OSError with nothing left open."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            env = dict(self._env)
            env[ENV_FAN_FD] = str(self._fan)
            env[ENV_HOLDER_FD] = str(child.fileno())
            env[ENV_GENERATION] = str(generation)
            env[ENV_TREE_READY] = "1" if self._ever_ready else "0"
            # pass_fds hands the worker the group fd itself (in the child it is a dup of the
            # same open file, so its marks are the group's) and its socket end, both without
            # CLOEXEC.  Its own process group keeps a terminal's ^C away from it: only H decides
            # when the worker stops.
            proc = subprocess.Popen(
                self._argv,
                env=env,
                pass_fds=(self._fan, child.fileno(), *self._extra_fds),
                stdin=subprocess.DEVNULL,
                process_group=0,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        try:
            pidfd = os.pidfd_open(proc.pid)
        except OSError:
            _kill(proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(_REAP_TIMEOUT)
            parent.close()
            raise
        parent.setblocking(False)
        return _Worker(proc=proc, sock=parent, pidfd=pidfd, started=started,
                       generation=generation, outbox=collections.deque())

    def _flush_outbox(self) -> None:
        w = self._worker
        assert w is not None
        while w.outbox:
            ident = w.outbox[0]
            pending = self._pending.get(ident)
            if pending is None:  # answered meanwhile (by a previous worker's late reply)
                w.outbox.popleft()
                continue
            try:
                w.sock.sendmsg(
                    [pending.message],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [ident]))],
                    socket.MSG_NOSIGNAL,
                )
            except BlockingIOError:
                # The worker's queue is full (~278 messages with an fd each here): never block
                # H on it; POLLOUT says when to go on.
                self.stats.send_blocked += 1
                break
            except OSError as e:
                self._worker_gone(w, f"send failed: {_ename(e.errno)}")
                return
            w.outbox.popleft()
            self.stats.dispatched += 1
            pending.sent = True
        notices = bool(self._notices) and w.ready
        if notices and not w.outbox:
            notices = not self._flush_notices(w)
            if self._worker is not w:
                return  # it died on the send
        events = select.POLLIN | (select.POLLOUT if w.outbox or notices else 0)
        self._poll.modify(w.sock.fileno(), events)

    def _read_worker(self) -> None:
        w = self._worker
        assert w is not None
        gone = self._take_messages(w, _MAX_MSGS_PER_TURN)
        if gone is not None:
            self._worker_gone(w, gone)

    def _take_messages(self, w: _Worker, limit: int) -> str | None:
        """Handle up to ``limit`` queued messages; return a reason if the link is dead."""
        for _ in range(limit):
            try:
                # recv() without an ancillary buffer: fds a confused worker might send are
                # discarded (closed) by the kernel.
                data = w.sock.recv(64)
            except BlockingIOError:
                return None
            except OSError as e:
                return f"socket error {_ename(e.errno)}"
            if not data:
                return "socket closed"
            self._handle_message(w, data)
        return None

    def _handle_message(self, w: _Worker, data: bytes) -> None:
        if len(data) != CTRL_MSG.size:
            self.stats.bad_messages += 1
            log.error("worker sent a %d-byte message; ignored", len(data))
            return
        kind, ident, seq, response = CTRL_MSG.unpack(data)
        if kind == MSG_REPLY:
            self._answer(ident, seq, response)
        elif kind == MSG_READY:
            self._worker_ready(w)
        elif kind == MSG_STOPPING:
            log.info("worker pid %d is stopping", w.proc.pid)
            w.stopping = True
        elif kind == MSG_PONG:
            if w.ping_sent is not None and seq == w.ping_seq:
                w.ping_sent = None
        else:
            self.stats.bad_messages += 1
            log.error("worker sent unknown message kind %d; ignored", kind)

    def _worker_ready(self, w: _Worker) -> None:
        """W's marks are in place and it reads its socket: hand it everything pending."""
        if w.ready:
            return
        log.info("worker pid %d ready after %.3f s", w.proc.pid, time.monotonic() - w.started)
        w.ready = True
        self._ever_ready = True
        self._unready_since = None
        if self._degraded_since is not None:
            self._leave_degraded(w)
        self.stats.redispatched += sum(1 for p in self._pending.values() if p.sent)
        w.outbox.extend(self._pending)  # sent at the end of this loop turn
        self._signal_ready()

    def _worker_gone(self, w: _Worker, reason: str) -> None:
        """Tear down a dead (or misbehaving) worker; then restart it, stop, or (at a failed
        start) give up."""
        if self._worker is not w:
            return
        # Replies the worker sent before it died are still queued in the socket: take them
        # first, they answer events that must not be re-dispatched.
        self._take_messages(w, 1_000_000)
        self._worker = None
        self._kill_deadline = None  # it was this worker's; its successor starts afresh
        self._poll.unregister(w.sock.fileno())
        self._poll.unregister(w.pidfd)
        # A worker closes its socket as it exits: give it a moment to finish on its own (a
        # stopping one may be unmounting or flushing: the whole stop timeout).
        grace = self._stop_timeout if (w.stopping or self._stop_requested) else _EXIT_GRACE
        # Socket closed but process alive past the grace: it must not live on next to its
        # successor with a copy of the group fd.
        _reap(w, grace)
        self.stats.worker_exits += 1
        rc = w.proc.returncode
        now = time.monotonic()
        lived = now - w.started
        if self._ever_ready and self._unready_since is None:
            self._unready_since = now  # the degraded-mode clock runs from the loss of service
        log.warning(
            "worker gone; %d pending (pid %d, %s, status %s, lived %.1f s)",
            len(self._pending),
            w.proc.pid,
            reason,
            rc,
            lived,
        )
        if self._stop_requested:
            self._finish(0)
        elif w.stopping:
            # A deliberate stop by the worker; any failure status makes it an unclean one.
            self._finish(0 if rc == 0 else 1)
        else:
            self._after_crash(lived, rc)

    def _after_crash(self, lived: float, status: int | None) -> None:
        """A worker died (or could not be started) without being asked to: restart it with
        backoff.  Degraded mode once deaths repeat; the end of H only at a failed start."""
        if lived >= self._healthy_after:
            self._rapid_crashes = 0
        else:
            self._rapid_crashes += 1
        repeated = self._rapid_crashes > self._max_rapid
        if not self._ever_ready and (status == EXIT_START_FAILED or repeated):
            # Nothing was ever guarded on this H's word, so ending exposes nothing that was
            # protected; and hsmfs serve/mount must fail now, with the cause, not retry a
            # configuration error for ever.
            if status == EXIT_START_FAILED:
                log.error("the worker failed to start (status %d, see its error above); "
                          "no worker was ever ready: giving up", status)
                self._finish(EXIT_START_FAILED)
            else:
                log.error("the worker died %d times in a row within %.0f s of starting and none "
                          "was ever ready: giving up", self._rapid_crashes, self._healthy_after)
                self._finish(1)
            return
        if repeated:
            self._enter_degraded(f"the worker died {self._rapid_crashes} times in a row, each "
                                 f"within {self._healthy_after:.0f} s of its start")
        doublings = min(max(self._rapid_crashes - 1, 0), _BACKOFF_MAX_DOUBLINGS)
        delay = min(RESTART_BACKOFF_MIN * 2**doublings, self._backoff_max)
        log.warning("restarting the worker in %.1f s", delay)
        self._restart_at = time.monotonic() + delay

    def _signal_ready(self) -> None:
        if self._ready_fd is None:
            return
        fd, self._ready_fd = self._ready_fd, None
        try:
            os.write(fd, b"R")
        except OSError as e:  # the caller went away; nothing to tell
            log.warning("cannot write to the readiness fd: %s", _ename(e.errno))
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ stopping

    def _install_signal_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def on_signal(signum: int, _frame: object) -> None:
            self._signals.append(signum)  # acted on in the loop, never inside the handler

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

        def restore() -> None:
            signal.set_wakeup_fd(old_wakeup)
            for s, handler in old.items():
                signal.signal(s, handler)

        return restore

    def _handle_signals(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass
        signals, self._signals = self._signals, []
        for signum in signals:
            self._begin_stop(signal.Signals(signum).name)

    def _begin_stop(self, why: str) -> None:
        w = self._worker
        if self._stop_requested:
            # A second request: do not wait for the worker any longer.
            if w is not None and self._kill_deadline is None:
                log.warning("%s again: killing worker pid %d now", why, w.proc.pid)
                _kill(w.proc)
                self._stop_deadline = None
                self._kill_deadline = time.monotonic() + _REAP_TIMEOUT
            return
        self._stop_requested = True
        self._restart_at = None
        log.info("%s: stopping (%d pending)", why, len(self._pending))
        self._run_before_close()
        if w is None:
            self._finish(0)
            return
        # The worker may still answer what it has (finish fills) while it stops; H keeps
        # relaying until it exits or the timeout kills it.
        with contextlib.suppress(ProcessLookupError):
            w.proc.send_signal(signal.SIGTERM)
        self._stop_deadline = time.monotonic() + self._stop_timeout

    def _run_before_close(self) -> None:
        hook, self._before_close = self._before_close, None
        if hook is None:
            return
        try:
            hook(self._ever_ready)
        except Exception:
            log.exception("the before-close step failed; closing the group all the same")

    def _finish(self, status: int) -> None:
        if self._exit_status is None:
            self._exit_status = status

    def _close_group(self) -> None:
        """Answer everything still pending or queued, then close the group.  Idempotent."""
        if self._fan < 0:
            return
        self._run_before_close()
        w = self._worker
        if w is not None:
            self._worker = None
            _reap(w, 0.0)
        # Closing the group would ALLOW every pending and queued event (KF §8: apps read zeros).
        # So: deny what H holds, then drain and deny what is still queued.  An access that
        # arrives between the last drain and close() is still allowed by the kernel, and after
        # close() no mark guards anything: that window is inherent to stopping.
        self._deny_all_pending("stopping")
        for _ in range(1000):  # bounded: a read error repeating forever must not hang the exit
            if not self._read_group():
                break
            self._deny_all_pending("stopping")
        self._drop_notices()
        os.close(self._fan)
        self._fan = -1
        for fd in self._stuck:
            os.close(fd)
        self._stuck.clear()
        if self._ready_fd is not None:
            os.close(self._ready_fd)  # EOF without a byte: "never became ready"
            self._ready_fd = None
        os.close(self._wake_r)
        os.close(self._wake_w)
        log.info("holder stopped; stats %s", self.stats.as_dict())


def _reap(w: _Worker, grace: float) -> None:
    """Give worker ``w`` up to ``grace`` seconds to exit, SIGKILL it if it is still alive,
    reap it (bounded), and close H's ends of it (socket, pidfd)."""
    if grace > 0:
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.proc.wait(grace)
    if w.proc.poll() is None:
        _kill(w.proc)
        try:
            w.proc.wait(_REAP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.error("worker pid %d not reaped after SIGKILL; abandoning it", w.proc.pid)
    w.sock.close()
    os.close(w.pidfd)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


def _ename(err: int | None) -> str:
    return errno.errorcode.get(err or 0, str(err))


def _raise_nofile_limit() -> None:
    # Every pending event holds an fd in H.  At EMFILE the kernel cannot create event fds and
    # auto-denies those accesses (fd = -EMFILE), so give H all the fds it may have.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, hard, e)


# ---------------------------------------------------------------------------- H's entry point


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 -m hsmfs.holder [options] -- WORKER_ARGV...``: run H until stopped."""
    parser = argparse.ArgumentParser(
        prog="python3 -m hsmfs.holder",
        description="Hold a fanotify pre-content group and relay its events to a worker.",
    )
    parser.add_argument("--ready-fd", type=int, help="write one byte here once the worker is ready")
    parser.add_argument("--max-rapid-crashes", type=int, default=DEFAULT_MAX_RAPID_CRASHES)
    parser.add_argument("--healthy-after", type=float, default=DEFAULT_HEALTHY_AFTER)
    parser.add_argument("--degrade-after", type=float, default=DEFAULT_DEGRADE_AFTER)
    parser.add_argument("--backoff-max", type=float, default=DEFAULT_BACKOFF_MAX)
    parser.add_argument("--stop-timeout", type=float, default=DEFAULT_STOP_TIMEOUT)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("worker", nargs=argparse.REMAINDER, help="-- worker command line")
    args = parser.parse_args(argv)
    worker = args.worker[1:] if args.worker[:1] == ["--"] else args.worker
    if not worker:
        parser.error("missing worker command line after --")
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s hsmfs-holder[%(process)d] %(levelname)s %(message)s",
    )
    if args.ready_fd is not None:
        os.set_inheritable(args.ready_fd, False)  # the worker must not hold it open
    try:
        holder = Holder(
            worker,
            ready_fd=args.ready_fd,
            max_rapid_crashes=args.max_rapid_crashes,
            healthy_after=args.healthy_after,
            degrade_after=args.degrade_after,
            backoff_max=args.backoff_max,
            stop_timeout=args.stop_timeout,
        )
    except OSError as e:
        log.error("cannot create the fanotify group: %s", e)
        return 2
    return holder.run()


if __name__ == "__main__":
    sys.exit(main())
