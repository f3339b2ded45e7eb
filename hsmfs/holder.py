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
  * W gets a dup of the group fd only to *add marks* (marks belong to the group and survive W).
  * When W dies, every pending event stays blocked (H still holds the fds: apps wait instead of
    reading zeros), H restarts W with backoff, and re-dispatches every pending event to it.
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

  W → H, 16 bytes, no fds (:data:`CTRL_MSG`, ``"=IiII"``)::

      0  u32 kind      MSG_REPLY (2) | MSG_READY (3) | MSG_STOPPING (4)
      4  i32 id        the event's id for MSG_REPLY, else 0
      8  u32 seq       the event's seq for MSG_REPLY, else 0
     12  u32 response  the fanotify response word for MSG_REPLY, else 0

The worker learns its two fds from the environment: ``HSMFS_FAN_FD`` (the group) and
``HSMFS_HOLDER_FD`` (its end of the socketpair).  Its obligations: add marks through the group fd
but never ``read()`` it and never write a response to it (the one exception is
:class:`HolderLink` denying its own outstanding events once H is gone); send ``ready`` once its
marks are in place; reply exactly once per event, in any order; close every event fd it
receives; exit on :class:`HolderGone`.

What this module owns: the H process (:class:`Holder`, :func:`main`) and the worker's end of the
link (:class:`HolderLink`, trio).  What it must not do: know anything about stubs, S3 or the
cache.  H never opens files, never fills, never decides a response (it only substitutes EIO
when the kernel refuses the worker's); it stays small so that it does not crash.  Keep it
single-threaded and plain blocking Python: no trio on the H side (the module imports trio for
:class:`HolderLink`; H never runs it).
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
from typing import Any, NamedTuple

import trio

from hsmfs.fanotify import (
    FAN_CLASS_PRE_CONTENT,
    FAN_CLOEXEC,
    FAN_DENY,
    FAN_NONBLOCK,
    FAN_REPORT_FD_ERROR,
    FAN_REPORT_TID,
    FAN_UNLIMITED_QUEUE,
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
#: Event fds are O_RDWR so the worker may also fill through them (KF §7).  The price: a binary
#: that was exec'd before its file was marked holds deny-write, the kernel cannot open an O_RDWR
#: fd for it and *auto-denies* the event (fd = -ETXTBSY; the app gets EPERM).  A binary exec'd
#: while marked holds no deny-write (KF §7), and hsmfs marks stubs before anyone can open them.
HOLDER_EVENT_F_FLAGS = os.O_RDWR | os.O_LARGEFILE

ENV_FAN_FD = "HSMFS_FAN_FD"
ENV_HOLDER_FD = "HSMFS_HOLDER_FD"

MSG_EVENT = 1
MSG_REPLY = 2
MSG_READY = 3
MSG_STOPPING = 4
#: H -> W: "is your loop alive?" (an EVENT_MSG with ident -1 and no fd); W -> H: the answer,
#: from W's trio loop, carrying the ping's sequence number.
MSG_PING = 5
MSG_PONG = 6
FLAG_HAS_RANGE = 0x1
EVENT_MSG = struct.Struct("=IiIIQiIQQ")
CTRL_MSG = struct.Struct("=IiII")

#: One read() of the group.  A PRE_ACCESS event is 48 bytes (KF §2), so 64 KiB takes a burst of
#: ~1300 events per syscall; the kernel only ever returns whole events.
READ_BUFSIZE = 64 * 1024
#: Ancillary space for receiving fds.  Room for a few so a protocol error (more than one fd) is
#: seen and every extra fd closed instead of the kernel truncating the control message.
_ANC_SPACE = socket.CMSG_SPACE(4 * array.array("i").itemsize)

#: Restart backoff: first retry after 0.2 s, doubling to 5 s, per the brief.  Short enough that
#: blocked apps barely notice a crash, long enough not to spin on a broken worker.
RESTART_BACKOFF_MIN = 0.2
RESTART_BACKOFF_MAX = 5.0
#: A worker that crashes within this many seconds of its start counts as a "rapid" crash; one
#: that lived longer resets the count (it was working, this is a fresh failure).
DEFAULT_HEALTHY_AFTER = 10.0
#: After this many rapid crashes in a row H gives up: deny every pending event with EIO, exit 1.
DEFAULT_MAX_RAPID_CRASHES = 5
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
    denied_at_stop: int = 0  # events H answered with EIO itself (stop or give-up)
    unknown_replies: int = 0  # replies for an id that was not pending
    stale_responses: int = 0  # kernel said ENOENT: the event was no longer pending
    read_errors: int = 0  # read() of the group failed (never fatal)
    parse_errors: int = 0
    overflows: int = 0
    non_permission: int = 0
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


@dataclasses.dataclass
class _Worker:
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    pidfd: int
    started: float
    outbox: collections.deque[int]
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
      * a response is written only with a key of ``_pending``, and the fd is closed only after
        the kernel accepted a response (or said ENOENT), so a number is never reused while its
        event can still be answered;
      * the group fd is closed only after every pending and queued event got a response.
    """

    def __init__(
        self,
        worker_argv: Sequence[str],
        *,
        ready_fd: int | None = None,
        worker_env: Mapping[str, str] | None = None,
        max_rapid_crashes: int = DEFAULT_MAX_RAPID_CRASHES,
        healthy_after: float = DEFAULT_HEALTHY_AFTER,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        init_flags: int = HOLDER_INIT_FLAGS,
        event_f_flags: int = HOLDER_EVENT_F_FLAGS,
        watchdog: float = DEFAULT_WATCHDOG,
    ) -> None:
        """Create the group (raises OSError if the kernel refuses) and prepare, not start.

        ``ready_fd``: H writes one byte to it when the first worker reports ``ready`` (its marks
        are in place) and closes it; it is closed without a byte if H ends before that.
        Also raises this process's RLIMIT_NOFILE soft limit to the hard limit: every pending
        event holds an fd in H.  ``watchdog``: seconds a ready worker may leave a ping
        unanswered before it is killed (0: never).
        """
        if not worker_argv:
            raise ValueError("worker_argv is empty")
        self._argv = list(worker_argv)
        self._env = dict(os.environ if worker_env is None else worker_env)
        self._ready_fd = ready_fd
        self._max_rapid = max_rapid_crashes
        self._healthy_after = healthy_after
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
        self._worker: _Worker | None = None
        self._rapid_crashes = 0
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
        """Serve until stopped; return the exit status (0 clean stop, 1 gave up / worker failed).

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
        if self._worker is not None and self._worker.outbox:
            self._flush_outbox()
        self._check_timers()

    def _poll_timeout(self) -> float:
        now = time.monotonic()
        timeout = _POLL_TICK
        for deadline in (self._restart_at, self._stop_deadline, self._kill_deadline):
            if deadline is not None:
                timeout = min(timeout, max(0.0, deadline - now))
        return timeout

    def _check_timers(self) -> None:
        now = time.monotonic()
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
            self.stats.non_permission += 1
            os.close(ev.fd)
            return
        if ev.fd in self._pending:  # cannot happen: the number is open in this process
            log.critical("kernel reused pending event fd %d; keeping both open", ev.fd)
            self._stuck.add(ev.fd)
            return
        self.stats.events += 1
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
        if self._worker is not None:
            self._worker.outbox.append(ev.fd)

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
            if self._respond(ident, deny_errno(errno.EIO)):
                os.close(ident)
            else:
                self._stuck.add(ident)

    # ------------------------------------------------------------------ the worker

    def _spawn_worker(self) -> None:
        assert self._worker is None
        if self._stop_requested or self._exit_status is not None:
            return
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(self._env)
        env[ENV_FAN_FD] = str(self._fan)
        env[ENV_HOLDER_FD] = str(child.fileno())
        started = time.monotonic()
        try:
            # pass_fds hands the worker the group fd itself (in the child it is a dup of the
            # same open file, so its marks are the group's) and its socket end, both without
            # CLOEXEC.  Its own process group keeps a terminal's ^C away from it: only H decides
            # when the worker stops.
            proc = subprocess.Popen(
                self._argv,
                env=env,
                pass_fds=(self._fan, child.fileno()),
                stdin=subprocess.DEVNULL,
                process_group=0,
            )
        except OSError as e:
            parent.close()
            child.close()
            log.error("cannot start worker %s: %s", self._argv[0], e)
            self._after_crash(lived=0.0)
            return
        finally:
            if child.fileno() >= 0:
                child.close()
        parent.setblocking(False)
        pidfd = os.pidfd_open(proc.pid)
        outbox = collections.deque(self._pending)
        w = _Worker(proc=proc, sock=parent, pidfd=pidfd, started=started, outbox=outbox)
        self._worker = w
        self._poll.register(parent.fileno(), select.POLLIN)
        self._poll.register(pidfd, select.POLLIN)
        self.stats.worker_starts += 1
        if outbox:
            self.stats.redispatched += len(outbox)
            log.warning(
                "worker pid %d started; re-dispatching %d pending events", proc.pid, len(outbox)
            )
            # Now, not at the next poll wakeup: nothing else may happen for a while, and the
            # socket buffers the messages until the worker reads them.
            self._flush_outbox()
        else:
            log.info("worker pid %d started", proc.pid)

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
        events = select.POLLIN | (select.POLLOUT if w.outbox else 0)
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
            log.info("worker pid %d ready after %.3f s", w.proc.pid, time.monotonic() - w.started)
            w.ready = True
            self._signal_ready()
        elif kind == MSG_STOPPING:
            log.info("worker pid %d is stopping", w.proc.pid)
            w.stopping = True
        elif kind == MSG_PONG:
            if w.ping_sent is not None and seq == w.ping_seq:
                w.ping_sent = None
        else:
            self.stats.bad_messages += 1
            log.error("worker sent unknown message kind %d; ignored", kind)

    def _worker_gone(self, w: _Worker, reason: str) -> None:
        """Tear down a dead (or misbehaving) worker; then restart it, stop, or give up."""
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
        lived = time.monotonic() - w.started
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
            self._after_crash(lived)

    def _after_crash(self, lived: float) -> None:
        if lived >= self._healthy_after:
            self._rapid_crashes = 0
        else:
            self._rapid_crashes += 1
        if self._rapid_crashes > self._max_rapid:
            log.error(
                "worker crashed %d times in a row within %.0f s of starting; giving up",
                self._rapid_crashes,
                self._healthy_after,
            )
            self._finish(1)
            return
        delay = min(RESTART_BACKOFF_MIN * 2 ** max(self._rapid_crashes - 1, 0), RESTART_BACKOFF_MAX)
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
        if w is None:
            self._finish(0)
            return
        # The worker may still answer what it has (finish fills) while it stops; H keeps
        # relaying until it exits or the timeout kills it.
        with contextlib.suppress(ProcessLookupError):
            w.proc.send_signal(signal.SIGTERM)
        self._stop_deadline = time.monotonic() + self._stop_timeout

    def _finish(self, status: int) -> None:
        if self._exit_status is None:
            self._exit_status = status

    def _close_group(self) -> None:
        """Answer everything still pending or queued, then close the group.  Idempotent."""
        if self._fan < 0:
            return
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


# ---------------------------------------------------------------------------- worker side


class Ping(NamedTuple):
    """H asks whether the worker's loop is alive; answer with :meth:`HolderLink.pong`."""

    seq: int


class HolderGone(Exception):
    """The holder closed the link: it died or stopped.  The worker must exit.

    Before this is raised, every event this worker received and has not answered was denied
    with EIO directly through the group fd: with H gone nobody else can answer them, and once
    the worker exits the group closes and the kernel would *allow* them (zeros).
    """


class HolderLink:
    """The worker's end of the link to H (trio).

    One task calls :meth:`receive` in a loop; any number of tasks may call :meth:`reply` (or
    :meth:`try_reply`), in any order.  The worker owns each received event fd and must close
    it (before or after replying: H answers with its own copy).  Nothing here blocks the trio
    loop: the socket is non-blocking and waits go through
    ``trio.lowlevel.wait_readable``/``wait_writable``.
    """

    #: A reply that cannot be sent for this long means H is wedged; treated as H gone.
    SEND_TIMEOUT = 10.0

    def __init__(self, holder_fd: int, fan_fd: int) -> None:
        """Take ownership of ``holder_fd`` (the socket); ``fan_fd`` is the group, for marks."""
        self._sock = socket.socket(fileno=holder_fd)
        self._sock.setblocking(False)
        self._sock.set_inheritable(False)
        self.fan_fd = fan_fd
        self._send_lock = trio.Lock()
        self._outstanding: dict[int, int] = {}  # id -> seq of events received, not replied
        self._gone = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> HolderLink:
        """Build the link from ``HSMFS_FAN_FD`` and ``HSMFS_HOLDER_FD`` set by :class:`Holder`."""
        try:
            fan_fd = int(environ[ENV_FAN_FD])
            holder_fd = int(environ[ENV_HOLDER_FD])
        except (KeyError, ValueError) as e:
            raise RuntimeError(
                f"not started by an hsmfs holder ({ENV_FAN_FD}/{ENV_HOLDER_FD} missing)"
            ) from e
        # They were inherited without CLOEXEC; the worker's own children must not get them.
        os.set_inheritable(fan_fd, False)
        return cls(holder_fd, fan_fd)

    @property
    def outstanding(self) -> frozenset[int]:
        """Ids received and not yet replied to."""
        return frozenset(self._outstanding)

    async def receive(self) -> tuple[int, Event, int]:
        """Wait for the next event: ``(id, event, event_fd)``; ``event.fd == event_fd``.

        ``event_fd`` is this process's copy (O_CLOEXEC), owned by the caller.  Raises
        :class:`HolderGone` when H closed the link.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            try:
                item = self._receive_one()
            except BlockingIOError:
                # Cancellation here loses nothing: the message stays queued in the socket.
                await trio.lowlevel.wait_readable(self._sock)
                waited = True
                continue
            if item is None:
                continue
            if isinstance(item, int):  # an event without its fd: cannot be served
                await self.reply(item, deny_errno(errno.EIO))
                waited = True
                continue
            if isinstance(item, Ping):  # answered from this loop: it is alive
                await self.pong(item.seq)
                waited = True
                continue
            if not waited:
                # Every trio call is a schedule point; after a wait we already were one.  Never
                # a cancel point once the fd is ours (it would be lost).  Skipping the extra
                # pass through the scheduler saves one loop turn per event.
                await trio.lowlevel.cancel_shielded_checkpoint()
            return item

    def _receive_one(self) -> tuple[int, Event, int] | Ping | int | None:
        """One message off the socket (see :meth:`_decode`); None when it was dropped or the
        link died.  Raises BlockingIOError when nothing is queued, HolderGone once gone."""
        if self._gone:
            raise HolderGone("holder link closed")
        try:
            data, anc, flags, _addr = self._sock.recvmsg(
                EVENT_MSG.size, _ANC_SPACE, socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            raise
        except OSError as e:
            self._holder_gone(f"socket error {_ename(e.errno)}")
            return None
        fds = _fds_from_ancillary(anc)
        if not data:
            _close_all(fds)
            self._holder_gone("socket closed")
            return None
        return self._decode(data, flags, fds)

    def _decode(
        self, data: bytes, flags: int, fds: list[int]
    ) -> tuple[int, Event, int] | Ping | int | None:
        """Validate one message: the received item, a ping, a bare id (fd missing), or None
        (dropped)."""
        if len(data) != EVENT_MSG.size or flags & socket.MSG_TRUNC:
            log.error("holder sent a malformed %d-byte message; ignored", len(data))
            _close_all(fds)
            return None
        kind, ident, seq, mflags, mask, pid, _reserved, offset, count = EVENT_MSG.unpack(data)
        if kind == MSG_PING:
            _close_all(fds)
            return Ping(seq)
        if kind != MSG_EVENT:
            log.error("holder sent unknown message kind %d; ignored", kind)
            _close_all(fds)
            return None
        self._outstanding[ident] = seq
        if len(fds) != 1 or flags & socket.MSG_CTRUNC:
            # MSG_CTRUNC: this process hit its fd limit and the kernel dropped the fd.
            log.error(
                "event id %d arrived with %d fds (flags %#x); denying it", ident, len(fds), flags
            )
            _close_all(fds)
            return ident
        fd = fds[0]
        has_range = bool(mflags & FLAG_HAS_RANGE)
        event = Event(
            mask=mask,
            fd=fd,
            pid=pid,
            offset=offset if has_range else None,
            count=count if has_range else None,
        )
        return ident, event, fd

    async def reply(self, ident: int, response: int) -> None:
        """Send the response for event ``ident`` to H (H writes it to the kernel).

        Shielded from cancellation (bounded by :attr:`SEND_TIMEOUT`), so it may be called from a
        ``finally`` of a cancelled task: an event must be answered exactly once.
        """
        message = self._reply_message(ident, response)
        if message is None:
            await trio.lowlevel.checkpoint()
            return
        await self._send(message)

    def try_reply(self, ident: int, response: int) -> bool:
        """:meth:`reply` without waiting, for code that must not await: True once sent (or
        dropped as not ours, logged); False, with nothing sent, when the socket is full or a
        task is waiting on it (then ``await reply()``)."""
        if self._gone:
            raise HolderGone("holder link closed")
        if self._send_lock.locked():
            return False
        seq = self._outstanding.get(ident)
        if seq is None:
            self._reply_message(ident, response)  # logs it
            return True
        if not self._send_now(CTRL_MSG.pack(MSG_REPLY, ident, seq, response)):
            return False
        del self._outstanding[ident]
        return True

    def _send_now(self, message: bytes) -> bool:
        """Send without waiting: False if the socket is full.  Raises HolderGone."""
        try:
            self._sock.send(message, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return False
        except OSError as e:
            self._holder_gone(f"send failed: {_ename(e.errno)}")
            raise HolderGone("holder link closed") from e
        return True

    def _reply_message(self, ident: int, response: int) -> bytes | None:
        """The reply to send for ``ident``, or None (logged) if this worker does not hold it."""
        if self._gone:
            raise HolderGone("holder link closed")
        seq = self._outstanding.pop(ident, None)
        if seq is None:
            # Sending it could only be dropped by H (wrong seq) at best; say so loudly instead.
            log.error(
                "reply %#x for id %d, which this worker does not hold; not sent", response, ident
            )
            return None
        return CTRL_MSG.pack(MSG_REPLY, ident, seq, response)

    async def pong(self, seq: int) -> None:
        """Answer H's ping ``seq``: this worker's loop is alive (H's watchdog)."""
        await self._send(CTRL_MSG.pack(MSG_PONG, 0, seq, 0))

    async def ready(self) -> None:
        """Tell H that this worker's marks are in place (H then signals its readiness fd)."""
        await self._send(CTRL_MSG.pack(MSG_READY, 0, 0, 0))

    async def stopping(self) -> None:
        """Tell H this worker is exiting on purpose: H will not restart it.

        Once the worker has exited, H answers every event still pending with EIO and exits (0 if
        the worker's status is 0).
        """
        await self._send(CTRL_MSG.pack(MSG_STOPPING, 0, 0, 0))

    async def _send(self, message: bytes) -> None:
        if self._gone:
            raise HolderGone("holder link closed")
        # Fast path: a 12-byte message almost always fits in the socket at once.  No lock or
        # cancel scope needed; one schedule point, never a cancel point.
        if not self._send_lock.locked() and self._send_now(message):
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        # Slow path: the socket is full (H busy) or another task is already waiting on it.
        # Shielded, so a reply from a cancelled task's ``finally`` still goes out, but bounded.
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.SEND_TIMEOUT
            async with self._send_lock:
                while True:
                    if self._gone:
                        raise HolderGone("holder link closed")
                    try:
                        self._sock.send(message, socket.MSG_NOSIGNAL)
                        return
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(self._sock)
                    except OSError as e:
                        self._holder_gone(f"send failed: {_ename(e.errno)}")
        # Only reached when the deadline cancelled the shielded scope.
        self._holder_gone(f"holder accepted nothing for {self.SEND_TIMEOUT} s")
        raise HolderGone("holder link wedged")

    def _holder_gone(self, reason: str) -> None:
        if self._gone:
            return
        self._gone = True
        log.error(
            "holder gone (%s); denying %d outstanding events with EIO",
            reason,
            len(self._outstanding),
        )
        # Safe to answer by number here: H is the only other responder and it is gone, and an
        # id stays reserved (H's fd was open) until H wrote its response (see Holder).
        for ident in sorted(self._outstanding):
            with contextlib.suppress(OSError):  # ENOENT: H answered it before it went
                write_response(self.fan_fd, ident, deny_errno(errno.EIO))
        self._outstanding.clear()

    def close(self) -> None:
        """Close the socket (H sees EOF).  The group fd is left to the caller."""
        self._sock.close()


def _fds_from_ancillary(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


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
            stop_timeout=args.stop_timeout,
        )
    except OSError as e:
        log.error("cannot create the fanotify group: %s", e)
        return 2
    return holder.run()


if __name__ == "__main__":
    sys.exit(main())
