"""The link-emulation proxy over real loopback sockets: rate, delay, counters, resets, CLI."""
from __future__ import annotations

import argparse
import hashlib
import os
import queue
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from splitprune.errors import UserError
from splitprune.link.proxy import LinkCounters, LinkProfile, LinkProxy
from splitprune.wire.addresses import format_hostport, parse_hostport

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------- servers
class Server:
    """A threaded TCP server on 127.0.0.1 running `handler(conn)` for each connection."""

    def __init__(self, handler):
        self.handler = handler
        self.sock = socket.create_server((LOOPBACK, 0))
        self.address = self.sock.getsockname()[:2]
        self.threads: list[threading.Thread] = []
        self._closed = False
        self._accept = threading.Thread(target=self._loop, daemon=True)
        self._accept.start()

    def _loop(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, conn):
        try:
            self.handler(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (close() alone does not)
        except OSError:
            pass
        self.sock.close()
        self._accept.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def echo_handler(conn):
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


class Sink:
    """Reads to EOF, records when the last byte came, replies with (count, sha256) and closes."""

    def __init__(self):
        self.done: "queue.Queue[tuple[float, int, bytes]]" = queue.Queue()

    def __call__(self, conn):
        h, n = hashlib.sha256(), 0
        t_last = time.perf_counter()
        while True:
            data = conn.recv(262144)
            if not data:
                break
            t_last = time.perf_counter()
            h.update(data)
            n += len(data)
        self.done.put((t_last, n, h.digest()))
        conn.sendall(struct.pack("!Q", n) + h.digest())


def source_handler(payload: bytes):
    """Sends `payload` as soon as a connection arrives, then closes its side (for the down direction)."""

    def handler(conn):
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass

    return handler


def connect(addr) -> socket.socket:
    s = socket.create_connection(addr, timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"got {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_all(s: socket.socket) -> bytes:
    buf = bytearray()
    while True:
        chunk = s.recv(262144)
        if not chunk:
            return bytes(buf)
        buf += chunk


def echo_roundtrip(addr, payload: bytes) -> bytes:
    with connect(addr) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


# Timing bounds that hold on a busy 2-core machine: an emulated link can be slowed down by a loaded
# machine but never sped up, so the lower bound is tight (the shaper must hold data back for the whole
# schedule) and the upper one generous (it catches a link that stalls, not scheduler noise). How close
# the emulation gets to the exact figure is a benchmark (`splitprune bench link`), not a unit test.
EARLY = 0.97        # a scheduled delivery may fire this much early (timer granularity), no more
SLOWER, SLACK_S = 3.0, 0.3


def assert_schedule(elapsed: float, expected: float) -> None:
    assert elapsed >= EARLY * expected, f"{elapsed:.4f}s is faster than the link allows ({expected:.4f}s)"
    assert elapsed <= SLOWER * expected + SLACK_S, f"{elapsed:.4f}s for {expected:.4f}s expected: the link stalls"


# ------------------------------------------------------------------------------------------ rate
def test_rate_up_is_never_faster_than_the_link():
    n, rate = 1_500_000, 20.0
    payload = os.urandom(n)
    sink = Sink()
    with Server(sink) as server, LinkProxy((LOOPBACK, 0), server.address, LinkProfile(rate_mbit=rate)) as proxy:
        with connect(proxy.address) as s:
            t0 = time.perf_counter()
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            t_last, got, digest = sink.done.get(timeout=10)
            reply = recv_exact(s, 40)
        elapsed = t_last - t0
        expected = n * 8 / (rate * 1e6)
        assert got == n and digest == hashlib.sha256(payload).digest()
        assert reply == struct.pack("!Q", n) + digest
        assert_schedule(elapsed, expected)


def test_rate_down_with_delay_is_never_faster_than_the_link():
    n, rate, delay_ms = 1_000_000, 20.0, 20.0
    payload = os.urandom(n)
    with Server(source_handler(payload)) as server, \
            LinkProxy((LOOPBACK, 0), server.address, LinkProfile(rate_mbit=rate, delay_ms=delay_ms)) as proxy:
        with connect(proxy.address) as s:
            t0 = time.perf_counter()
            data = recv_all(s)
            elapsed = time.perf_counter() - t0
        assert data == payload
        # the server starts sending when the proxy connects upstream, a hair after t0
        expected = n * 8 / (rate * 1e6) + delay_ms / 1000
        assert_schedule(elapsed, expected)


def test_rate_is_shared_by_concurrent_connections():
    k, n, rate = 4, 250_000, 20.0
    payloads = [os.urandom(n) for _ in range(k)]
    sink = Sink()
    replies = [None] * k
    with Server(sink) as server, LinkProxy((LOOPBACK, 0), server.address, LinkProfile(rate_mbit=rate)) as proxy:
        socks = [connect(proxy.address) for _ in range(k)]
        barrier = threading.Barrier(k + 1)

        def push(i):
            barrier.wait()
            socks[i].sendall(payloads[i])
            socks[i].shutdown(socket.SHUT_WR)
            replies[i] = recv_exact(socks[i], 40)

        threads = [threading.Thread(target=push, args=(i,)) for i in range(k)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        results = [sink.done.get(timeout=10) for _ in range(k)]
        for t in threads:
            t.join(10)
        for s in socks:
            s.close()
        elapsed = max(r[0] for r in results) - t0
        expected = k * n * 8 / (rate * 1e6)
        assert_schedule(elapsed, expected)
        # round-robin: nobody finishes much before the others
        first = min(r[0] for r in results) - t0
        assert first > 0.75 * expected
        for i in range(k):
            assert replies[i] == struct.pack("!Q", n) + hashlib.sha256(payloads[i]).digest()
        assert proxy.counters() == LinkCounters(bytes_up=k * n, bytes_down=k * 40, connections=k)


# ----------------------------------------------------------------------------------------- delay
def test_one_way_delay_is_never_shorter_than_set():
    delay_ms = 50.0
    arrivals: "queue.Queue[float]" = queue.Queue()

    def stamp_echo(conn):
        while True:
            data = conn.recv(65536)
            if not data:
                break
            arrivals.put(time.perf_counter())
            conn.sendall(data)

    with Server(stamp_echo) as server, \
            LinkProxy((LOOPBACK, 0), server.address, LinkProfile(rate_mbit=None, delay_ms=delay_ms)) as proxy:
        with connect(proxy.address) as s:
            ups, rtts = [], []
            for i in range(4):
                msg = bytes([i]) * 100
                t0 = time.perf_counter()
                s.sendall(msg)
                t_server = arrivals.get(timeout=5)
                assert recv_exact(s, len(msg)) == msg
                t1 = time.perf_counter()
                ups.append(t_server - t0)
                rtts.append(t1 - t0)
    up, rtt = statistics.median(ups), statistics.median(rtts)
    assert_schedule(up, delay_ms / 1000)
    assert_schedule(rtt, 2 * delay_ms / 1000)


def test_small_message_takes_delay_plus_serialization():
    rate, delay_ms, size = 2.0, 50.0, 1000  # 1000 B at 2 Mbit/s = 4 ms each way
    with Server(echo_handler) as server, \
            LinkProxy((LOOPBACK, 0), server.address, LinkProfile(rate_mbit=rate, delay_ms=delay_ms)) as proxy:
        with connect(proxy.address) as s:
            rtts = []
            for i in range(3):
                msg = bytes([i]) * size
                t0 = time.perf_counter()
                s.sendall(msg)
                assert recv_exact(s, size) == msg
                rtts.append(time.perf_counter() - t0)
                time.sleep(0.02)  # let the link go idle: no burst credit is expected
    expected = 2 * (delay_ms / 1000 + size * 8 / (rate * 1e6))
    rtt = statistics.median(rtts)
    assert_schedule(rtt, expected)


def test_jitter_keeps_order_and_bounds():
    delay_ms, jitter_ms = 30.0, 20.0
    payload = os.urandom(200_000)
    with Server(echo_handler) as server, LinkProxy(
        (LOOPBACK, 0), server.address, LinkProfile(rate_mbit=50.0, delay_ms=delay_ms, jitter_ms=jitter_ms), seed=7
    ) as proxy:
        with connect(proxy.address) as s:
            # many small writes: each chunk gets its own jittered delay, yet bytes must stay in order
            for off in range(0, len(payload), 997):
                s.sendall(payload[off:off + 997])
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == payload
            rtts = []
        for _ in range(5):
            with connect(proxy.address) as s:
                t0 = time.perf_counter()
                s.sendall(b"x")
                assert recv_exact(s, 1) == b"x"
                rtts.append(time.perf_counter() - t0)
    lo = 2 * (delay_ms - jitter_ms) / 1000
    hi = 2 * (delay_ms + jitter_ms) / 1000 * SLOWER + SLACK_S
    assert all(lo <= r <= hi for r in rtts), rtts


# -------------------------------------------------------------------------------------- counters
def test_counters_exact_per_direction():
    n_up, n_down = 123_457, 54_321
    down_payload = os.urandom(n_down)

    def handler(conn):
        got = 0
        while True:
            data = conn.recv(65536)
            if not data:
                break
            got += len(data)
        assert got == n_up
        conn.sendall(down_payload)

    with Server(handler) as server, \
            LinkProxy((LOOPBACK, 0), server.address, LinkProfile(rate_mbit=100.0, delay_ms=2.0)) as proxy:
        assert proxy.counters() == LinkCounters(0, 0, 0)
        with connect(proxy.address) as s:
            s.sendall(os.urandom(n_up))
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == down_payload
        assert proxy.counters() == LinkCounters(bytes_up=n_up, bytes_down=n_down, connections=1)
        # an unlimited link counts the same way
    with Server(handler) as server, LinkProxy((LOOPBACK, 0), server.address, LinkProfile()) as proxy:
        for _ in range(2):
            with connect(proxy.address) as s:
                s.sendall(os.urandom(n_up))
                s.shutdown(socket.SHUT_WR)
                assert recv_all(s) == down_payload
        assert proxy.counters() == LinkCounters(bytes_up=2 * n_up, bytes_down=2 * n_down, connections=2)


def test_many_concurrent_echo_connections():
    k = 12
    payloads = [os.urandom(50_000 + 1000 * i) for i in range(k)]
    results = [None] * k
    with Server(echo_handler) as server, \
            LinkProxy((LOOPBACK, 0), server.address, LinkProfile(rate_mbit=200.0, delay_ms=5.0, jitter_ms=2.0)) as proxy:

        def worker(i):
            results[i] = echo_roundtrip(proxy.address, payloads[i])

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(k)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert results == payloads
        total = sum(map(len, payloads))
        assert proxy.counters() == LinkCounters(bytes_up=total, bytes_down=total, connections=k)


# -------------------------------------------------------------------------------- resets, errors
def _rst_close(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def test_peer_resets_do_not_kill_the_proxy():
    def resetting_handler(conn):
        conn.recv(10)
        _rst_close(conn)

    profile = LinkProfile(rate_mbit=10.0, delay_ms=20.0)
    with Server(echo_handler) as echo, LinkProxy((LOOPBACK, 0), echo.address, profile) as proxy:
        # client resets while data is queued in the emulated link
        s = connect(proxy.address)
        s.sendall(os.urandom(300_000))
        _rst_close(s)
        # client resets right after connecting
        _rst_close(connect(proxy.address))
        # client closes without reading what the echo server sends back
        s = connect(proxy.address)
        s.sendall(os.urandom(50_000))
        s.close()
        time.sleep(0.1)
        assert echo_roundtrip(proxy.address, b"still alive" * 100) == b"still alive" * 100

    with Server(resetting_handler) as server, LinkProxy((LOOPBACK, 0), server.address, profile) as proxy:
        with connect(proxy.address) as s:  # upstream resets: the client sees its connection end
            s.sendall(b"hello world, this is more than 10 bytes")
            with pytest.raises((ConnectionResetError, EOFError)):
                recv_exact(s, 1)
        with connect(proxy.address) as s:
            s.sendall(b"0123456789")
            with pytest.raises((ConnectionResetError, EOFError)):
                recv_exact(s, 1)
        assert proxy.counters().connections == 2

    # upstream refuses connections: the client is dropped, the proxy keeps accepting
    dead = socket.create_server((LOOPBACK, 0))
    dead_addr = dead.getsockname()[:2]
    dead.close()
    with LinkProxy((LOOPBACK, 0), dead_addr, profile) as proxy:
        for _ in range(2):
            with connect(proxy.address) as s:
                with pytest.raises((ConnectionResetError, EOFError)):
                    recv_exact(s, 1)
        assert wait_for(lambda: proxy.counters().connections == 2)


def test_half_close_is_forwarded_after_the_data():
    def reply_after_eof(conn):
        data = recv_all(conn)
        conn.sendall(b"got %d" % len(data))

    with Server(reply_after_eof) as server, \
            LinkProxy((LOOPBACK, 0), server.address, LinkProfile(rate_mbit=50.0, delay_ms=10.0)) as proxy:
        with connect(proxy.address) as s:
            s.sendall(b"a" * 70_000)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == b"got 70000"


def test_stop_closes_open_connections_and_is_idempotent():
    with Server(echo_handler) as server:
        proxy = LinkProxy((LOOPBACK, 0), server.address, LinkProfile(delay_ms=5.0)).start()
        s = connect(proxy.address)
        s.sendall(b"ping")
        assert recv_exact(s, 4) == b"ping"
        proxy.stop()
        proxy.stop()
        s.settimeout(5)
        try:
            assert s.recv(1) == b""
        except ConnectionResetError:
            pass
        s.close()
        with pytest.raises(OSError):
            connect(proxy.address).close()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rate_mbit=0),
        dict(rate_mbit=-5),
        dict(rate_mbit=float("nan")),
        dict(rate_mbit=float("inf")),
        dict(rate_mbit="10"),
        dict(rate_mbit=10, delay_ms=-1),
        dict(rate_mbit=10, delay_ms=5, jitter_ms=6),
        dict(rate_mbit=10, delay_ms=5, jitter_ms=-1),
        dict(rate_mbit=None, delay_ms=float("nan")),
    ],
)
def test_bad_profile_raises_user_error(kwargs):
    with pytest.raises(UserError):
        LinkProfile(**kwargs)


def test_bad_addresses_raise_user_error():
    for bad in ["", "host", "host:", ":80", "host:abc", "host:-1", "host:70000", "::1:80", "[::1]80", "a b:1", "h:²"]:
        with pytest.raises(UserError):
            parse_hostport(bad)
    assert parse_hostport("localhost:50051") == ("localhost", 50051)
    assert parse_hostport("[::1]:8080") == ("::1", 8080)
    assert parse_hostport(":0", default_host="127.0.0.1") == ("127.0.0.1", 0)
    assert parse_hostport("9000", default_host="127.0.0.1") == ("127.0.0.1", 9000)
    assert format_hostport(("::1", 1)) == "[::1]:1" and format_hostport(("h", 2)) == "h:2"
    with pytest.raises(UserError):
        LinkProxy((LOOPBACK, 0), (LOOPBACK, 0), LinkProfile())  # upstream port 0
    with pytest.raises(UserError):
        LinkProxy((LOOPBACK, 0), ("", 80), LinkProfile())
    with pytest.raises(UserError):
        LinkProxy((LOOPBACK, 0), (LOOPBACK, 80), {"rate_mbit": 1})
    taken = socket.create_server((LOOPBACK, 0))
    try:
        with pytest.raises(UserError):
            LinkProxy(taken.getsockname()[:2], (LOOPBACK, 80), LinkProfile()).start()
    finally:
        taken.close()


# ------------------------------------------------------------------------------------------- CLI
def _link_parser():
    from splitprune.cli import link as link_cli

    parser = argparse.ArgumentParser(prog="splitprune")
    link_cli.add_parser(parser.add_subparsers(dest="command"), "link")
    return parser


@pytest.mark.parametrize(
    "argv",
    [
        ["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--rate-mbit", "0"],
        ["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--delay-ms", "5", "--jitter-ms", "9"],
        ["--listen", "127.0.0.1:0", "--upstream", "nohostport"],
        ["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:0"],
        ["--listen", "127.0.0.1:99999", "--upstream", "127.0.0.1:1"],
    ],
)
def test_cli_bad_args_raise_user_error(argv):
    args = _link_parser().parse_args(["link", *argv])
    with pytest.raises(UserError):
        args.run(args)


def test_cli_runs_forwards_and_prints_totals():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with Server(echo_handler) as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "splitprune", "link", "--listen", "127.0.0.1:0",
             "--upstream", format_hostport(server.address), "--rate-mbit", "50", "--delay-ms", "5",
             "--interval", "0.2"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        lines: "queue.Queue[str]" = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
        reader.start()
        try:
            first = lines.get(timeout=60)  # generous: `python -m splitprune` imports every subcommand
            assert "listening on 127.0.0.1:" in first, first
            port = int(first.split("listening on 127.0.0.1:")[1].split()[0])
            payload = os.urandom(20_000)
            assert echo_roundtrip((LOOPBACK, port), payload) == payload
            deadline = time.monotonic() + 5
            status = ""
            while "up 20.00 kB" not in status and time.monotonic() < deadline:
                status = lines.get(timeout=5)
            assert "up 20.00 kB" in status and "down 20.00 kB" in status, status
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
            reader.join(5)
            out = "".join(lines.queue)
            err = proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        assert "totals: up 20000 bytes, down 20000 bytes, 1 connections" in out, out + err
        assert "Traceback" not in err, err
