"""A fault-injecting HTTP/1.1 forwarder to put in front of an S3 server.

In the package (not under tests/) because ``hsmfs stress`` owns one at run time; the tests
import this same module.

Owns: one threaded stdlib HTTP server on loopback that forwards every request to an upstream
endpoint (moto) and, on command from its owner in the same process (a test, or ``hsmfs
stress``), answers some of them itself: an S3 error (``503 SlowDown``, ``500 InternalError``,
``403 AccessDenied``...), a dropped connection, a body cut short (clean close) or reset (TCP
RST) mid-body, added latency, a stall of N requests (held, then forwarded), an answer rewritten
by a test's function (lying headers, bodies, statuses), or no listener at all (connection
refused).  It records every request it saw and what it did with it, so tests can count S3
traffic.

It is a forwarder, not a TCP pipe: it parses each request so faults hit exactly the N next
requests that match (method and a substring of the path+query, e.g. a key or ``list-type=2``).
Keep-alive is kept on both sides, as boto3 expects.  The client's ``Host`` header is forwarded
unchanged so SigV4 signatures stay consistent.

Usage::

    proxy = FaultProxy(moto.endpoint)
    endpoint = proxy.start()            # "http://127.0.0.1:PORT"
    try:
        proxy.fail_next(2, status=503, code="SlowDown")
        ...                             # point S3Config(endpoint_url=endpoint) at it
        proxy.refuse()                  # connection refused from now on
        proxy.restore()                 # listening again, every fault cleared
    finally:
        proxy.stop()

Every thread it starts is joined by :meth:`stop`; waits inside it (delays) wake up on stop.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

# Hop-by-hop headers (RFC 9110 §7.6.1) are the forwarder's own business, never passed on.
# Content-Length is recomputed: bodies are read whole and sent with their real length.
_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                  "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
                  "expect", "content-length"})

_MESSAGES = {
    "SlowDown": "Please reduce your request rate.",
    "InternalError": "We encountered an internal error. Please try again.",
    "ServiceUnavailable": "Please reduce your request rate.",
    "AccessDenied": "Access Denied",
}

#: Upstream timeout: a wedged upstream must not wedge the proxy's stop for longer than this.
UPSTREAM_TIMEOUT_S = 30.0


@dataclass
class Seen:
    """One request as the proxy saw it, and what it did: ``pass`` (forwarded, upstream status
    in ``status``), ``fail`` (answered ``status`` itself), ``close``, ``truncate``, ``error``
    (upstream unreachable: answered 502)."""

    method: str
    path: str
    action: str
    status: int | None = None


#: An upstream answer as :meth:`FaultProxy.rewrite_next` hands it to a test's function, and as
#: the function returns it: (status, headers, body).
Answer = tuple[int, list[tuple[str, str]], bytes]


@dataclass
class _Rule:
    action: str  # "fail" | "close" | "truncate" | "reset" | "stall" | "rewrite"
    remaining: int
    method: str | None
    match: str | None
    status: int = 503
    code: str = "SlowDown"
    keep: int = 0
    stall_s: float = 0.0
    rewrite: Callable[[Answer], Answer] | None = None

    def matches(self, method: str, path: str) -> bool:
        return (self.remaining > 0
                and (self.method is None or self.method == method)
                and (self.match is None or self.match in path))


class FaultProxy:
    """A fault-injecting forwarder in front of ``upstream`` (``http://host:port``)."""

    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0, *,
                 record: bool = True) -> None:
        u = urlsplit(upstream)
        if u.scheme != "http" or not u.hostname or not u.port:
            raise ValueError(f"upstream must be http://HOST:PORT, got {upstream!r}")
        self.upstream = (u.hostname, u.port)
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._delay_s = 0.0
        self._delay_method: str | None = None
        self._delay_match: str | None = None
        self._seen: list[Seen] = []
        # A long stress run sends millions of requests: it keeps no record (counts only).
        self._record_seen = record
        #: requests by what the proxy did with them (pass, fail, close, truncate, error)
        self.actions: dict[str, int] = {}
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> str:
        """Listen (on a free port the first time, the same port afterwards); return the
        endpoint URL."""
        if self._server is not None:
            return self.endpoint
        self._stopping.clear()
        server = _Server((self.host, self.port), _Handler)
        server.proxy = self
        self.port = server.server_address[1]
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  name=f"faultproxy:{self.port}", daemon=True)
        thread.start()
        self._server, self._thread = server, thread
        return self.endpoint

    def stop(self) -> None:
        """Stop listening, drop every client connection, join every thread.  Idempotent."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        self._stopping.set()  # wakes handlers sleeping in a delay
        server.shutdown()  # the accept loop exits
        server.drop_connections()  # handlers blocked reading a keep-alive connection exit
        server.server_close()  # closes the listener and joins the handler threads
        if thread is not None:
            thread.join(10)

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults -------------------------------------------------------------------------------

    def fail_next(self, n: int, status: int = 503, code: str = "SlowDown", *,
                  method: str | None = "GET", match: str | None = None) -> None:
        """Answer the next ``n`` matching requests with an S3 error document (status, code)."""
        self._add(_Rule("fail", n, method, match, status=status, code=code))

    def close_next(self, n: int, *, method: str | None = "GET", match: str | None = None) -> None:
        """Read the next ``n`` matching requests, then close the connection without answering."""
        self._add(_Rule("close", n, method, match))

    def truncate_next(self, n: int, keep: int = 0, *, method: str | None = "GET",
                      match: str | None = None) -> None:
        """Forward the next ``n`` matching requests but send only ``keep`` bytes of each body
        (after the full ``Content-Length``), then close the connection.  An answer whose body
        is no longer than ``keep`` (a PUT's) is cut inside its status line instead."""
        self._add(_Rule("truncate", n, method, match, keep=keep))

    def reset_next(self, n: int, keep: int = 0, *, method: str | None = "GET",
                   match: str | None = None) -> None:
        """Like :meth:`truncate_next`, but end the connection with a TCP reset (RST) after
        ``keep`` bytes of the body: the client sees ECONNRESET mid-body, not an early EOF."""
        self._add(_Rule("reset", n, method, match, keep=keep))

    def stall_next(self, n: int, seconds: float, *, method: str | None = "GET",
                   match: str | None = None) -> None:
        """Hold the next ``n`` matching requests ``seconds`` (longer than the client's read
        timeout, for a stall), then forward them; the wait ends early on :meth:`stop`."""
        self._add(_Rule("stall", n, method, match, stall_s=seconds))

    def rewrite_next(self, n: int, fn: Callable[[Answer], Answer], *,
                     method: str | None = "GET", match: str | None = None) -> None:
        """Forward the next ``n`` matching requests and send ``fn(answer)`` instead of the
        upstream answer (status, headers, body; Content-Length is the new body's)."""
        self._add(_Rule("rewrite", n, method, match, rewrite=fn))

    def set_delay(self, ms: float, *, method: str | None = None,
                  match: str | None = None) -> None:
        """Hold every matching request ``ms`` milliseconds before forwarding it, until
        :meth:`restore` (or ``set_delay(0)``)."""
        with self._lock:
            self._delay_s = ms / 1000
            self._delay_method, self._delay_match = method, match

    def refuse(self) -> None:
        """Close the listener and every connection: clients get connection refused."""
        self.stop()

    def restore(self) -> str:
        """Clear every fault and delay; listen again (same port) if refused."""
        with self._lock:
            self._rules.clear()
            self._delay_s = 0.0
            self._delay_method = self._delay_match = None
        return self.start()

    def pending(self) -> int:
        """Faults armed and not yet used."""
        with self._lock:
            return sum(r.remaining for r in self._rules)

    # -- what was seen --------------------------------------------------------------------------

    @property
    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    def count(self, method: str | None = None, action: str | None = None,
              match: str | None = None) -> int:
        with self._lock:
            return sum(1 for s in self._seen
                       if (method is None or s.method == method)
                       and (action is None or s.action == action)
                       and (match is None or match in s.path))

    def reset_counts(self) -> None:
        with self._lock:
            self._seen.clear()

    # -- internals ------------------------------------------------------------------------------

    def _add(self, rule: _Rule) -> None:
        if rule.remaining < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            self._rules.append(rule)

    def _take(self, method: str, path: str) -> tuple[_Rule | None, float]:
        """The fault for this request (consumed), and the delay to apply before it."""
        with self._lock:
            delay = self._delay_s if (
                (self._delay_method is None or self._delay_method == method)
                and (self._delay_match is None or self._delay_match in path)) else 0.0
            for rule in self._rules:
                if rule.matches(method, path):
                    rule.remaining -= 1
                    return rule, delay
            return None, delay

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.actions[seen.action] = self.actions.get(seen.action, 0) + 1
            if self._record_seen:
                self._seen.append(seen)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the handler threads
    block_on_close = True
    allow_reuse_address = True  # restore() listens on the same port again at once
    proxy: FaultProxy

    def __init__(self, *args, **kwargs) -> None:
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request, client_address) -> None:
        # A client that went away mid-response is routine here (we cut connections on purpose).
        pass


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like S3
    server: _Server
    _upstream: http.client.HTTPConnection | None = None

    def log_message(self, format: str, *args) -> None:
        pass  # the proxy's record (FaultProxy.seen) is the log

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self._upstream is not None:
                self._upstream.close()

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()  # CRLF after the chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        proxy = self.server.proxy
        method, path = self.command, self.path
        body = self._read_body()
        rule, delay = proxy._take(method, path)
        if delay and proxy._stopping.wait(delay):
            self.close_connection = True
            return
        if rule is not None and rule.action == "stall":
            proxy._record(Seen(method, path, "stall"))  # now: the client gives up before
            if proxy._stopping.wait(rule.stall_s):
                self.close_connection = True
                return
        if rule is not None and rule.action == "close":
            proxy._record(Seen(method, path, "close"))
            self._drop()
            return
        if rule is not None and rule.action == "fail":
            proxy._record(Seen(method, path, "fail", rule.status))
            self._send_error(rule.status, rule.code)
            return
        try:
            status, reason, headers, payload = self._forward(method, path, body)
        except (OSError, http.client.HTTPException) as exc:
            proxy._record(Seen(method, path, "error", 502))
            self._send_error(502, "BadGateway", str(exc))
            return
        if rule is not None and rule.action in ("truncate", "reset"):
            proxy._record(Seen(method, path, rule.action, status))
            if len(payload) <= rule.keep:
                # Nothing of the body to cut (a PUT's empty answer): cut the status line, so
                # the request landed upstream and its answer is lost all the same.
                with contextlib.suppress(OSError):
                    self.wfile.write(b"HTTP/1.1 ")
            else:
                self._send(status, reason, headers, payload, declared=len(payload),
                           send=payload[: rule.keep] if method != "HEAD" else b"")
            self._drop(reset=rule.action == "reset")
            return
        if rule is not None and rule.action == "rewrite":
            assert rule.rewrite is not None
            status, headers, payload = rule.rewrite((status, list(headers), payload))
            proxy._record(Seen(method, path, "rewrite", status))
            self._send(status, reason, headers, payload,
                       declared=None if method == "HEAD" else len(payload), send=payload)
            return
        proxy._record(Seen(method, path, "pass", status))
        self._send(status, reason, headers, payload,
                   declared=None if method == "HEAD" else len(payload), send=payload)

    def _forward(self, method: str, path: str, body: bytes):
        if self._upstream is None:
            self._upstream = http.client.HTTPConnection(*self.server.proxy.upstream,
                                                        timeout=UPSTREAM_TIMEOUT_S)
        conn = self._upstream
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP:
                    conn.putheader(name, value)
            if body or method in {"PUT", "POST"}:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            payload = resp.read()
        except BaseException:
            conn.close()  # the next request reconnects
            raise
        if resp.will_close:
            conn.close()
        return resp.status, resp.reason, resp.getheaders(), payload

    def _send(self, status: int, reason: str, headers, payload: bytes, *,
              declared: int | None, send: bytes) -> None:
        self.send_response_only(status, reason)
        for name, value in headers:
            if name.lower() not in _HOP or (declared is None and name.lower() == "content-length"):
                self.send_header(name, value)
        if declared is not None:
            self.send_header("Content-Length", str(declared))
        self.end_headers()
        if send:
            self.wfile.write(send)
        self.wfile.flush()

    def _send_error(self, status: int, code: str, message: str | None = None) -> None:
        doc = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
               f"<Message>{message or _MESSAGES.get(code, code)}</Message>"
               f"<RequestId>faultproxy</RequestId></Error>").encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", "faultproxy")
        if status == 503:
            self.send_header("Retry-After", "1")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(doc)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(doc)
        self.wfile.flush()

    def _drop(self, reset: bool = False) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
        if reset:
            # SO_LINGER on, zero seconds: close() sends RST instead of FIN.
            with contextlib.suppress(OSError):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.connection.close()
            return
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
