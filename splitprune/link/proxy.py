"""User-space link emulation: a byte-transparent TCP proxy that adds a rate limit, delay and jitter.

``LinkProxy`` listens on one address and forwards every accepted connection to an upstream address (e.g.
between a gRPC client and server), through an emulated link (pipes.py says how bytes move: a shared
serializer per direction, a delay line, flow control). It runs an asyncio loop in one background daemon
thread; all state is touched only by that thread except the counters (lock-protected).
"""
from __future__ import annotations

import asyncio
import logging
import random
import threading
import time

from splitprune.errors import UserError
from splitprune.link.pipes import _Pipe, _Serializer, _Side
from splitprune.link.profile import LinkCounters, LinkProfile, _Schedule
from splitprune.link.trace import LinkTrace
from splitprune.wire.addresses import format_hostport, parse_hostport

__all__ = ["LinkProfile", "LinkCounters", "LinkProxy", "LinkTrace"]

log = logging.getLogger("splitprune.link")


class _Conn:
    """One proxied connection: the client socket, the upstream socket and a pipe each way."""

    def __init__(self, proxy):  # the LinkProxy whose loop, serializers and counters it uses
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
