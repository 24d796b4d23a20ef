"""How the link proxy moves bytes: per direction a shared serializer (rate), a delay line (delay, jitter) and
flow control, per connection two pipes between two sockets (proxy.py holds them together).

``LinkProxy`` (proxy.py) listens on one address and forwards every accepted connection to an upstream address
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
import socket

from splitprune.link.profile import _Schedule

log = logging.getLogger("splitprune.link")

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

    def __init__(self, conn, src: "_Side", dst: "_Side", serializer: _Serializer | None, up: bool):
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

    def __init__(self, conn, is_client: bool):
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
