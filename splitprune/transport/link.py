"""User-space link emulation: a byte-transparent TCP proxy that adds a rate limit, delay and jitter.

``LinkProxy`` listens on one address and forwards every accepted connection to an upstream address
(e.g. it sits between a gRPC client and server). It never looks at the bytes. Each direction
behaves like one side of a real point-to-point link:

1. **Serialization (rate).** Every direction has ONE serializer shared by all connections (it models a
   single Wi-Fi/Ethernet link, so concurrent connections share the rate; they are served round-robin,
   one chunk at a time). Bytes are stamped with their arrival time when the proxy reads them; the
   serializer is a virtual clock ``vt``: a chunk of ``n`` bytes that arrived at ``a`` finishes
   serializing at ``vt = max(vt, a) + n / rate``. The schedule is computed from arrival stamps, not
   from when the proxy's timers happen to fire, so scheduling lateness never lowers the rate; an idle
   link gives no burst credit, so an isolated message takes ``size / rate`` to serialize. A chunk is
   about 2 ms worth of bytes (at least 1448 B, one TCP segment; at most 256 KiB).
2. **Propagation (delay, jitter).** A chunk is released to the far side at
   ``release = max(previous_release, serialized_at + delay + U(-jitter, +jitter))``, so jitter never
   reorders bytes. A single small message therefore takes ``delay + size / rate`` one way.

Flow control: the proxy keeps at most ~10 ms of data queued in each serializer and a bounded amount
read ahead per connection; beyond that it stops reading from the sender, whose TCP window then
pushes back (like a lossless link with a short queue). It does not emulate loss, reordering, the
TCP handshake (connecting through the proxy costs no extra RTT) or MTU effects.

With a ``LinkTrace`` (``splitprune link --trace``) the rate and the delay follow the trace's schedule:
a chunk's serialization time integrates the rate as it changes, and its delay is the one in force when it
finishes serializing (releases stay in order when the delay drops). The trace's clock starts with the
proxy, or with its first connection (``trace_on_connect``: a replay then does not depend on how long the
client took to start); ``trace_started`` says when, in Unix seconds.

Half-closes (FIN) are forwarded after the data before them (and after the delay); a reset or error
on either socket aborts both sockets of that connection only. Counters count bytes delivered to the
far side: ``bytes_up`` client -> upstream, ``bytes_down`` upstream -> client.

Runs an asyncio loop in one background daemon thread; all state is touched only by that thread
except the counters (lock-protected).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import socket
import threading
import time
from dataclasses import dataclass

from splitprune.errors import UserError
from splitprune.transport.addresses import format_hostport, parse_hostport
from splitprune.transport.trace import LinkTrace

__all__ = ["LinkProfile", "LinkCounters", "LinkProxy", "LinkTrace", "parse_hostport", "format_hostport"]

log = logging.getLogger(__name__)

_CHUNK_SECONDS = 0.002  # store-and-forward unit of the serializer, in seconds of link time
_MIN_CHUNK = 1448  # one TCP segment on a 1500-byte MTU
_MAX_CHUNK = 256 * 1024
_BACKLOG_SECONDS = 0.010  # at most this much link time queued in a serializer
_READ_AHEAD_SECONDS = 0.020  # per-connection bytes read but not yet scheduled (in link time) ...
_MIN_READ_AHEAD = 64 * 1024  # ... but at least this many bytes
_UNLIMITED_LINE_CAP = 16 * 1024 * 1024  # bytes in flight per connection+direction when rate is unlimited
# asyncio's epoll wait rounds its timeout up to whole milliseconds, so timers fire 0-1 ms late (plus
# wake-up cost). Timers are armed this much early and may release chunks due within this much, which
# centres the release-time error on zero instead of biasing every delay by ~+0.5 ms.
_EARLY = 5e-4


def _finite_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise UserError(f"{name} must be finite, got {value}")
    return value


@dataclass(frozen=True)
class LinkProfile:
    """What one direction of the emulated link looks like (both directions get the same profile)."""

    rate_mbit: float | None = None  # per direction, 1 Mbit = 1e6 bit; None = unlimited
    delay_ms: float = 0.0  # one-way propagation delay added to each direction
    jitter_ms: float = 0.0  # uniform +-jitter on the delay; never reorders bytes

    def __post_init__(self) -> None:
        if self.rate_mbit is not None:
            rate = _finite_number("rate_mbit", self.rate_mbit)
            if rate <= 0:
                raise UserError(f"rate_mbit must be > 0 (or None for unlimited), got {self.rate_mbit}")
        delay = _finite_number("delay_ms", self.delay_ms)
        jitter = _finite_number("jitter_ms", self.jitter_ms)
        if delay < 0:
            raise UserError(f"delay_ms must be >= 0, got {self.delay_ms}")
        if jitter < 0:
            raise UserError(f"jitter_ms must be >= 0, got {self.jitter_ms}")
        if jitter > delay:
            raise UserError(f"jitter_ms ({self.jitter_ms}) must not exceed delay_ms ({self.delay_ms})")

    @property
    def rate_bytes_per_s(self) -> float | None:
        return None if self.rate_mbit is None else float(self.rate_mbit) * 1e6 / 8.0

    def describe(self) -> str:
        rate = "unlimited" if self.rate_mbit is None else f"{self.rate_mbit:g} Mbit/s"
        text = f"{rate} per direction, {self.delay_ms:g} ms one-way delay"
        if self.jitter_ms:
            text += f" +-{self.jitter_ms:g} ms jitter"
        return text


@dataclass
class LinkCounters:
    """A snapshot of bytes delivered per direction and connections accepted since start()."""

    bytes_up: int = 0  # client -> upstream
    bytes_down: int = 0  # upstream -> client
    connections: int = 0


class _Schedule:
    """Rate and delay over loop time: constant (a LinkProfile) or following a LinkTrace from `t0`."""

    def __init__(self, profile: LinkProfile, trace: LinkTrace | None, t0: float):
        self.trace = trace
        self.t0 = t0
        self.rate = profile.rate_bytes_per_s
        self.delay = profile.delay_ms / 1000.0
        self.max_rate = max(trace.rates) if trace is not None else self.rate  # None = unlimited

    def rate_at(self, now: float) -> float:
        return self.trace.rate_at(now - self.t0) if self.trace is not None else self.rate

    def delay_at(self, when: float) -> float:
        return self.trace.delay_at(when - self.t0) if self.trace is not None else self.delay

    def finish(self, start: float, nbytes: int) -> float:
        if self.trace is None:
            return start + nbytes / self.rate
        return self.t0 + self.trace.finish(start - self.t0, nbytes)


class _Serializer:
    """One direction of the link: a virtual-clock FIFO shared by all connections, round-robin."""

    def __init__(self, loop: asyncio.AbstractEventLoop, schedule: _Schedule):
        self.loop = loop
        self.schedule = schedule
        self.vt = -math.inf  # loop time at which everything scheduled so far has been serialized
        self.active: collections.deque[_Pipe] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None

    def kick(self, pipe: "_Pipe") -> None:
        if not pipe.in_active:
            pipe.in_active = True
            self.active.append(pipe)
        if self.timer is None:
            self.step()

    def step(self) -> None:
        self.timer = None
        now = self.loop.time()
        rate = self.schedule.rate_at(now)
        chunk = int(min(_MAX_CHUNK, max(_MIN_CHUNK, rate * _CHUNK_SECONDS)))
        backlog = max(_BACKLOG_SECONDS, 2 * chunk / rate)
        while self.active and self.vt - now < backlog:
            pipe = self.active.popleft()
            if pipe.dead or not pipe.pending:
                pipe.in_active = False
                continue
            self.vt = pipe.take(chunk, self.vt, self.schedule)
            if pipe.pending and not pipe.dead:
                self.active.append(pipe)
            else:
                pipe.in_active = False
        if self.active:
            self.timer = self.loop.call_at(self.vt - backlog / 2, self.step)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.active.clear()


class _Pipe:
    """One direction of one connection: read-ahead buffer -> shared serializer -> delay line -> socket."""

    def __init__(self, conn: "_Conn", src: "_Side", dst: "_Side", serializer: _Serializer | None, up: bool):
        proxy = conn.proxy
        self.conn = conn
        self.proxy = proxy
        self.loop = proxy._loop
        self.src = src
        self.dst = dst
        self.serializer = serializer
        self.up = up
        self.schedule = proxy._schedule
        self.jitter = proxy.profile.jitter_ms / 1000.0
        rate = self.schedule.max_rate
        self.read_ahead = _UNLIMITED_LINE_CAP if rate is None else max(_MIN_READ_AHEAD, int(rate * _READ_AHEAD_SECONDS))
        self.pending: collections.deque[list] = collections.deque()  # [arrival, memoryview]
        self.pending_bytes = 0
        self.eof_at: float | None = None
        self.eof_queued = False
        self.line: collections.deque[tuple[float, bytes | None]] = collections.deque()  # (release, data|EOF)
        self.line_bytes = 0
        self.last_release = -math.inf
        self.timer: asyncio.TimerHandle | None = None
        self.in_active = False
        self.done = False  # EOF delivered to dst
        self.dead = False

    # -- input side -------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if self.dead or not data:
            return
        now = self.loop.time()
        if self.serializer is None:  # unlimited rate: straight into the delay line
            self._enqueue(now, bytes(data))
            if self.line_bytes > _UNLIMITED_LINE_CAP:
                self.src.pause("line")
            return
        self.pending.append([now, memoryview(data)])
        self.pending_bytes += len(data)
        if self.pending_bytes > self.read_ahead:
            self.src.pause("read-ahead")
        self.serializer.kick(self)

    def feed_eof(self) -> None:
        if self.dead or self.eof_at is not None:
            return
        self.eof_at = self.loop.time()
        self._maybe_queue_eof()

    def _maybe_queue_eof(self) -> None:
        if self.eof_at is not None and not self.pending and not self.eof_queued:
            self.eof_queued = True
            self._enqueue(self.eof_at, None)

    def take(self, chunk: int, vt: float, schedule: _Schedule) -> float:
        """Serialize up to `chunk` pending bytes starting at virtual time `vt`; return the new vt."""
        parts = []
        n = 0
        while self.pending and n < chunk:
            seg = self.pending[0]
            arrival, view = seg
            room = chunk - n
            if len(view) > room:
                piece = view[:room]
                seg[1] = view[room:]
            else:
                piece = view
                self.pending.popleft()
            vt = schedule.finish(max(vt, arrival), len(piece))
            parts.append(piece)
            n += len(piece)
        self.pending_bytes -= n
        self._enqueue(vt, b"".join(parts))
        if self.pending_bytes <= self.read_ahead // 2:
            self.src.unpause("read-ahead")
        self._maybe_queue_eof()
        return vt

    # -- delay line -------------------------------------------------------------------------------
    def _enqueue(self, serialized_at: float, data: bytes | None) -> None:
        release = serialized_at + self.schedule.delay_at(serialized_at)
        if self.jitter:
            release += self.proxy._rng.uniform(-self.jitter, self.jitter)
        if release < self.last_release:
            release = self.last_release
        self.last_release = release
        self.line.append((release, data))
        if data is not None:
            self.line_bytes += len(data)
        if self.timer is None:  # the line was empty (invariant: non-empty line <=> timer armed)
            if release <= self.loop.time() + _EARLY:
                self.flush()
            else:
                self.timer = self.loop.call_at(release - _EARLY, self.flush)

    def flush(self) -> None:
        self.timer = None
        if self.dead:
            return
        limit = self.loop.time() + _EARLY
        out = []
        eof = False
        while self.line and self.line[0][0] <= limit:
            _, data = self.line.popleft()
            if data is None:
                eof = True
                break
            out.append(data)
        transport = self.dst.transport
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            self.line_bytes -= len(data)
            if transport is None or transport.is_closing():
                self.conn.abort()
                return
            self.proxy._count(self.up, len(data))  # before write: a reader that got the bytes sees them counted
            transport.write(data)
        if eof:
            self.done = True
            try:
                if transport is not None and not transport.is_closing() and transport.can_write_eof():
                    transport.write_eof()
            except OSError:
                self.conn.abort()
                return
            self.conn.pipe_done()
            return
        if self.dead:  # write() may have failed synchronously and aborted the connection
            return
        if self.line:
            self.timer = self.loop.call_at(self.line[0][0] - _EARLY, self.flush)
        if self.serializer is None and self.line_bytes <= _UNLIMITED_LINE_CAP // 2:
            self.src.unpause("line")

    def kill(self) -> None:
        self.dead = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pending.clear()
        self.pending_bytes = 0
        self.line.clear()
        self.line_bytes = 0


class _Side(asyncio.Protocol):
    """Protocol for one socket of a proxied connection (the client's or the upstream's)."""

    def __init__(self, conn: "_Conn", is_client: bool):
        self.conn = conn
        self.is_client = is_client
        self.transport: asyncio.Transport | None = None
        self.out_pipe: _Pipe | None = None  # fed by what this socket reads
        self.in_pipe: _Pipe | None = None  # writes into this socket
        self._pause_reasons: set[str] = set()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if self.conn.closed:  # the client went away while we were connecting upstream
            transport.abort()
            return
        if self._pause_reasons:  # pauses requested before the socket existed
            transport.pause_reading()
        if self.is_client:
            self.conn.client_connected()

    def data_received(self, data: bytes) -> None:
        self.out_pipe.feed(data)

    def eof_received(self) -> bool:
        self.out_pipe.feed_eof()
        return True  # keep our write side open (half-close)

    def connection_lost(self, exc) -> None:
        self.conn.side_lost(self, exc)

    def pause_writing(self) -> None:  # our socket's send buffer is full: stop reading the sender
        self.in_pipe.src.pause("peer-slow")

    def resume_writing(self) -> None:
        self.in_pipe.src.unpause("peer-slow")

    def pause(self, reason: str) -> None:
        if reason in self._pause_reasons:
            return
        self._pause_reasons.add(reason)
        if len(self._pause_reasons) == 1 and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def unpause(self, reason: str) -> None:
        if reason not in self._pause_reasons:
            return
        self._pause_reasons.discard(reason)
        if not self._pause_reasons and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()


class _Conn:
    """One proxied connection: the client socket, the upstream socket and a pipe each way."""

    def __init__(self, proxy: "LinkProxy"):
        self.proxy = proxy
        self.closed = False
        self.client = _Side(self, is_client=True)
        self.upstream = _Side(self, is_client=False)
        self.up = _Pipe(self, self.client, self.upstream, proxy._ser_up, up=True)
        self.down = _Pipe(self, self.upstream, self.client, proxy._ser_down, up=False)
        self.client.out_pipe, self.client.in_pipe = self.up, self.down
        self.upstream.out_pipe, self.upstream.in_pipe = self.down, self.up
        self.connect_task: asyncio.Task | None = None

    def client_connected(self) -> None:
        self.proxy._conns.add(self)
        self.proxy._count_connection()
        self.client.pause("connecting")  # bytes wait in the kernel until there is somewhere to send them
        self.connect_task = self.proxy._loop.create_task(self._connect())

    async def _connect(self) -> None:
        host, port = self.proxy._upstream
        try:
            await self.proxy._loop.create_connection(lambda: self.upstream, host, port)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # refused, unreachable, DNS, ...: drop the client
            log.debug("link: cannot connect upstream %s: %s", format_hostport(self.proxy._upstream), exc)
            self.abort()
            return
        if not self.closed:
            self.client.unpause("connecting")

    def pipe_done(self) -> None:
        if self.up.done and self.down.done and not self.closed:
            self._finish(abort=False)

    def side_lost(self, side: _Side, exc) -> None:
        if not self.closed:
            # A reset/error, or a close we did not initiate: tear down the other socket too.
            self._finish(abort=True)

    def abort(self) -> None:
        if not self.closed:
            self._finish(abort=True)

    def _finish(self, abort: bool) -> None:
        self.closed = True
        self.proxy._conns.discard(self)
        if abort:
            self.up.kill()
            self.down.kill()
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        for side in (self.client, self.upstream):
            t = side.transport
            if t is not None and not t.is_closing():
                if abort:
                    t.abort()
                else:
                    t.close()  # flushes what is still buffered, then closes


def _check_addr(name: str, addr, allow_port_zero: bool) -> tuple[str, int]:
    if isinstance(addr, str):
        addr = parse_hostport(addr)
    try:
        host, port = addr
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a (host, port) pair, got {addr!r}") from None
    if not isinstance(host, str) or not host or isinstance(port, bool) or not isinstance(port, int):
        raise UserError(f"{name} must be a (host: str, port: int) pair, got {addr!r}")
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise UserError(f"{name} port out of range: {port}")
    return host, port


class LinkProxy:
    """A TCP proxy emulating one link between clients and an upstream server (see module docstring)."""

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], profile: LinkProfile, seed: int = 0,
                 trace: LinkTrace | None = None, trace_on_connect: bool = False):
        if not isinstance(profile, LinkProfile):
            raise UserError(f"profile must be a LinkProfile, got {type(profile).__name__}")
        if trace is not None and profile != LinkProfile():
            raise UserError("a link follows either a trace or a fixed rate, delay and jitter, not both")
        self.trace = trace
        self.trace_on_connect = trace_on_connect
        self.trace_started: float | None = None   # Unix seconds when the trace's clock started
        self._schedule: _Schedule | None = None
        self._listen = _check_addr("listen", listen, allow_port_zero=True)
        self._upstream = _check_addr("upstream", upstream, allow_port_zero=False)
        self.profile = profile
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._counters = LinkCounters()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._address: tuple[str, int] | None = None
        self._conns: set[_Conn] = set()
        self._ser_up: _Serializer | None = None
        self._ser_down: _Serializer | None = None
        self._started = False
        self._stopped = False

    # -- public API -------------------------------------------------------------------------------
    def start(self) -> "LinkProxy":
        if self._started:
            raise RuntimeError("LinkProxy.start() called twice")
        self._started = True
        ready = threading.Event()
        error: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(ready, error), name="splitprune-link", daemon=True)
        self._thread.start()
        ready.wait()
        if error:
            self._thread.join()
            exc = error[0]
            if isinstance(exc, OSError):
                raise UserError(f"cannot listen on {format_hostport(self._listen)}: {exc.strerror or exc}") from exc
            raise exc
        return self

    @property
    def address(self) -> tuple[str, int]:
        if self._address is None:
            raise RuntimeError("LinkProxy is not started")
        return self._address

    @property
    def upstream(self) -> tuple[str, int]:
        return self._upstream

    def counters(self) -> LinkCounters:
        with self._lock:
            c = self._counters
            return LinkCounters(c.bytes_up, c.bytes_down, c.connections)

    def stop(self) -> None:
        if not self._started or self._stopped:
            return
        self._stopped = True
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            try:
                loop.call_soon_threadsafe(self._shutdown)
            except RuntimeError:  # loop already closed
                pass
            thread.join()

    def __enter__(self) -> "LinkProxy":
        return self if self._started else self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def describe(self) -> str:
        return self.profile.describe() if self.trace is None else self.trace.describe()

    def elapsed(self) -> float:
        """Seconds since the link started (the trace's clock)."""
        if self._loop is None or self._schedule is None:
            raise RuntimeError("LinkProxy is not started")
        return self._loop.time() - self._schedule.t0

    def __repr__(self) -> str:
        where = format_hostport(self._address or self._listen)
        return f"LinkProxy({where} -> {format_hostport(self._upstream)}, {self.describe()})"

    # -- loop thread ------------------------------------------------------------------------------
    def _run(self, ready: threading.Event, error: list) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._schedule = _Schedule(self.profile, self.trace, loop.time())
            if not self.trace_on_connect:
                self.trace_started = time.time()
            if self._schedule.max_rate is not None:
                self._ser_up = _Serializer(loop, self._schedule)
                self._ser_down = _Serializer(loop, self._schedule)
            host, port = self._listen
            try:
                self._server = loop.run_until_complete(
                    loop.create_server(lambda: _Conn(self).client, host, port, reuse_address=True)
                )
            except BaseException as exc:  # noqa: BLE001 - handed to start()
                error.append(exc)
                ready.set()
                return
            self._address = tuple(self._server.sockets[0].getsockname()[:2])
            ready.set()
            loop.run_forever()
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in pending:
                    t.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(asyncio.sleep(0))  # let aborted transports call connection_lost
            finally:
                loop.close()

    def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.abort()
        for ser in (self._ser_up, self._ser_down):
            if ser is not None:
                ser.close()
        self._loop.stop()

    def _count(self, up: bool, n: int) -> None:
        with self._lock:
            if up:
                self._counters.bytes_up += n
            else:
                self._counters.bytes_down += n

    def _count_connection(self) -> None:
        with self._lock:
            self._counters.connections += 1
        if self.trace_started is None:   # the first connection starts the trace (loop thread, nothing sent yet)
            self._schedule.t0 = self._loop.time()
            self.trace_started = time.time()
