"""A TCP proxy that makes a loopback S3 server look remote: first-byte latency and bandwidth caps.

Owns: the proxy itself (stdlib asyncio, no HTTP parsing), its request/byte counters, and two ways
to run it — in-process on its own thread (`ProxyThread`, for tests) or as a subprocess
(`ProxyProcess`, what the benchmark uses, so that the proxy never competes for the benchmark's
GIL). Also parses the `--s3-latency 20:80ms` / `--s3-bandwidth 90MB/s` strings.

Model (`tc netem` is missing on the kernels we run on):
* First-byte latency: when a client starts a request (first client->server bytes after the
  previous response began), the first response byte is held until request start + ttfb (fixed, or
  uniform lo:hi sampled per request). A slower upstream adds no extra delay. An
  "Expect: 100-continue" PUT pays the latency twice, as against a real remote endpoint.
* Bandwidth: a token bucket per connection and direction, plus an optional aggregate cap.
* Counting requests this way is exact for HTTP/1.1 keep-alive without pipelining (boto3); bytes
  include HTTP headers.

CLI:  python3 -m hsmfs.bench.latency_proxy --listen 127.0.0.1:0 --upstream 127.0.0.1:7480 \
          --ttfb-ms 20:80 --bw-MBps 90 [--total-bw-MBps 0] [--connect-ms 0] [--seed 1] \
          [--stats-file F]
It prints "listening HOST:PORT" once serving; SIGUSR1 writes its counters as JSON to the stats
file; SIGINT/SIGTERM stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Large enough to keep syscalls coarse at ~500 MiB/s, small enough for smooth rate limiting.
CHUNK = 256 * 1024
# The token bucket lets this much time of burst pass before sleeping, to keep sleeps coarse.
BURST_S = 0.005
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0

Sampler = Callable[[random.Random], float]


def parse_latency_ms(text: str) -> str:
    """'20:80ms' / '30ms' / '30' -> the proxy's --ttfb-ms form ('20:80' / '30')."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)(?:\s*:\s*(\d+(?:\.\d+)?))?\s*(?:ms)?\s*", text)
    if not m:
        raise ValueError(f"bad latency {text!r}: expected N[ms] or LO:HI[ms]")
    lo, hi = m.group(1), m.group(2)
    if hi is not None and float(hi) < float(lo):
        raise ValueError(f"bad latency {text!r}: HI < LO")
    return lo if hi is None else f"{lo}:{hi}"


def parse_bandwidth_mbps(text: str) -> float:
    """'90MB/s' / '90MBps' / '90' -> 90.0 (decimal MB/s, like the proxy's --bw-MBps)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:MB/s|MBps|MB)?\s*", text, flags=re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"bad bandwidth {text!r}: expected N[MB/s] with N > 0")
    return float(m.group(1))


def make_sampler(ttfb_ms: str) -> Sampler:
    """A per-request first-byte delay in seconds: fixed '30' or uniform '20:80'."""
    if ":" in ttfb_ms:
        lo, hi = (float(x) / 1000 for x in ttfb_ms.split(":"))
        return lambda rnd: rnd.uniform(lo, hi)
    fixed = float(ttfb_ms) / 1000
    return lambda rnd: fixed


class Bucket:
    """Token bucket expressed as 'time when the next byte may leave'; rate 0 = unlimited."""

    def __init__(self, rate_bytes_per_s: float) -> None:
        self.rate = rate_bytes_per_s
        self.next_t = 0.0

    async def take(self, n: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        self.next_t = max(self.next_t, now) + n / self.rate
        wait = self.next_t - now - BURST_S
        if wait > 0:
            await asyncio.sleep(wait)


@dataclass
class ProxyConfig:
    upstream_host: str
    upstream_port: int
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    ttfb_ms: str = "0"
    bw_mbps: float = 0.0
    total_bw_mbps: float = 0.0
    connect_ms: float = 0.0
    seed: int | None = None


@dataclass
class Counters:
    requests: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    connections: int = 0


@dataclass
class _Conn:
    """Per-connection request timing: set when a request starts, cleared at its first reply byte."""

    req_t0: float | None = None
    delay: float = 0.0
    down: Bucket = field(default_factory=lambda: Bucket(0))
    up: Bucket = field(default_factory=lambda: Bucket(0))


class LatencyProxy:
    """The asyncio proxy. Counters are plain ints mutated on the loop thread only."""

    def __init__(self, cfg: ProxyConfig) -> None:
        self.cfg = cfg
        self.counters = Counters()
        self._rnd = random.Random(cfg.seed)
        self._sample = make_sampler(cfg.ttfb_ms)
        self._total = Bucket(cfg.total_bw_mbps * 1e6)

    async def serve(self, stop: asyncio.Event, ready: Callable[[int], None]) -> None:
        srv = await asyncio.start_server(
            self._handle, self.cfg.listen_host, self.cfg.listen_port, reuse_address=True
        )
        ready(int(srv.sockets[0].getsockname()[1]))
        async with srv:
            await stop.wait()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.counters.connections += 1
        if self.cfg.connect_ms:
            await asyncio.sleep(self.cfg.connect_ms / 1000)
        try:
            ur, uw = await asyncio.open_connection(self.cfg.upstream_host, self.cfg.upstream_port)
        except OSError:
            cw.close()
            return
        bw = self.cfg.bw_mbps * 1e6
        conn = _Conn(down=Bucket(bw), up=Bucket(bw))
        try:
            await asyncio.gather(self._c2s(cr, uw, conn), self._s2c(ur, cw, conn))
        except asyncio.CancelledError:
            # Only at shutdown (the server stops with keep-alive connections open; the loop
            # closes their sockets). Returning instead of re-raising: asyncio's stream callback
            # would log every cancelled connection's task as an error ("Exception in callback
            # ... CancelledError").
            return
        uw.close()

    async def _c2s(self, cr: asyncio.StreamReader, uw: asyncio.StreamWriter, conn: _Conn) -> None:
        try:
            while data := await cr.read(CHUNK):
                if conn.req_t0 is None:
                    conn.req_t0 = time.monotonic()
                    conn.delay = self._sample(self._rnd)
                    self.counters.requests += 1
                self.counters.bytes_up += len(data)
                await conn.up.take(len(data))
                uw.write(data)
                await uw.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                uw.write_eof()

    async def _s2c(self, ur: asyncio.StreamReader, cw: asyncio.StreamWriter, conn: _Conn) -> None:
        try:
            while data := await ur.read(CHUNK):
                if conn.req_t0 is not None:
                    wait = conn.req_t0 + conn.delay - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    conn.req_t0 = None
                await conn.down.take(len(data))
                await self._total.take(len(data))
                self.counters.bytes_down += len(data)
                cw.write(data)
                await cw.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            cw.close()


class ProxyThread:
    """The proxy on its own thread and event loop, in this process (used by tests)."""

    def __init__(self, cfg: ProxyConfig) -> None:
        self.proxy = LatencyProxy(cfg)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="latency-proxy", daemon=True)

    def _run(self) -> None:
        def ready(port: int) -> None:
            self.port = port
            self._ready.set()

        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self.proxy.serve(self._stop, ready))
        self._loop.close()

    def start(self) -> ProxyThread:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise RuntimeError("latency proxy thread did not start")
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(STOP_TIMEOUT_S)


class ProxyProcess:
    """The proxy as a subprocess of this one; stopped by its PID."""

    def __init__(self, cfg: ProxyConfig, stats_file: Path) -> None:
        self.cfg = cfg
        self.stats_file = stats_file
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        c = self.cfg
        argv = [
            sys.executable, "-m", "hsmfs.bench.latency_proxy",
            "--listen", f"{c.listen_host}:{c.listen_port}",
            "--upstream", f"{c.upstream_host}:{c.upstream_port}",
            "--ttfb-ms", c.ttfb_ms, "--bw-MBps", str(c.bw_mbps),
            "--total-bw-MBps", str(c.total_bw_mbps), "--connect-ms", str(c.connect_ms),
            "--stats-file", str(self.stats_file),
        ]
        return argv + (["--seed", str(c.seed)] if c.seed is not None else [])

    def start(self, env: dict[str, str] | None = None) -> ProxyProcess:
        # A stale file from an earlier proxy would carry a higher sequence number than ours.
        self.stats_file.unlink(missing_ok=True)
        self._proc = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env
        )
        try:
            self.port = _read_port(self._proc, START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        return self

    def stats(self, timeout: float = 5.0) -> Counters | None:
        """Ask the proxy (SIGUSR1) for its counters; None if it does not answer in time."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        before = _read_stats(self.stats_file)
        seq = before[0] if before else -1
        self._proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = _read_stats(self.stats_file)
            if got and got[0] > seq:
                return got[1]
            time.sleep(0.01)
        return None

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)
        if proc.stdout:
            proc.stdout.close()


def _read_port(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """Read the child's 'listening HOST:PORT' line without ever blocking past `timeout`."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise RuntimeError(f"latency proxy did not start (exit {proc.poll()}): {buf!r}")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                continue
            buf += chunk
    line = buf.split(b"\n", 1)[0].decode()
    return int(line.rsplit(":", 1)[1])


def _read_stats(path: Path) -> tuple[int, Counters] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    seq = int(data.pop("seq"))
    return seq, Counters(**data)


def _write_stats(path: Path, seq: int, counters: Counters) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"seq": seq, **asdict(counters)}))
    os.replace(tmp, path)  # atomic: the reader never sees half a file


def _parse_args(argv: list[str]) -> tuple[ProxyConfig, Path | None]:
    ap = argparse.ArgumentParser(prog="python3 -m hsmfs.bench.latency_proxy")
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--ttfb-ms", default="0", help='fixed "30" or uniform range "20:80"')
    ap.add_argument("--bw-MBps", type=float, default=0, help="per-connection cap (0 = none)")
    ap.add_argument("--total-bw-MBps", type=float, default=0, help="aggregate server->client cap")
    ap.add_argument("--connect-ms", type=float, default=0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stats-file", type=Path, default=None)
    a = ap.parse_args(argv)
    up_host, up_port = a.upstream.rsplit(":", 1)
    lhost, lport = a.listen.rsplit(":", 1)
    cfg = ProxyConfig(
        upstream_host=up_host, upstream_port=int(up_port), listen_host=lhost,
        listen_port=int(lport), ttfb_ms=parse_latency_ms(a.ttfb_ms), bw_mbps=a.bw_MBps,
        total_bw_mbps=a.total_bw_MBps, connect_ms=a.connect_ms, seed=a.seed,
    )
    return cfg, a.stats_file


async def _amain(cfg: ProxyConfig, stats_file: Path | None) -> None:
    proxy = LatencyProxy(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    seq = 0

    def dump() -> None:
        nonlocal seq
        seq += 1
        if stats_file is not None:
            _write_stats(stats_file, seq, proxy.counters)

    loop.add_signal_handler(signal.SIGUSR1, dump)

    def ready(port: int) -> None:
        print(f"listening {cfg.listen_host}:{port}", flush=True)

    await proxy.serve(stop, ready)


def main(argv: list[str] | None = None) -> int:
    cfg, stats_file = _parse_args(sys.argv[1:] if argv is None else argv)
    asyncio.run(_amain(cfg, stats_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
