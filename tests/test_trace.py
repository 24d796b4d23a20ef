"""Link traces: parsing, the rate integral, built-in traces, and a real proxy following a trace."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from splitprune.errors import UserError
from splitprune.link.proxy import LinkProfile, LinkProxy
from splitprune.link.trace import LinkTrace, builtin_traces

REPO = Path(__file__).resolve().parents[1]
HEADER = "seconds,rate_mbit,delay_ms\n"


# ------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("# only a comment\n", "empty"),
    ("time,rate,delay\n0,1,1\n", "header"),
    (HEADER, "no rows"),
    (HEADER + "0,1\n", "expected 3 values"),
    (HEADER + "0,fast,1\n", "not three numbers"),
    (HEADER + "1,10,5\n", "first row must be at 0"),
    (HEADER + "0,10,5\n2,10,5\n2,5,5\n", "seconds must increase"),
    (HEADER + "0,0,5\n", "rate_mbit must be > 0"),
    (HEADER + "0,-3,5\n", "rate_mbit must be > 0"),
    (HEADER + "0,10,-1\n", "delay_ms must be >= 0"),
    (HEADER + "0,nan,1\n", "finite"),
    (HEADER + "0,inf,1\n", "finite"),
])
def test_malformed_traces_are_one_clear_error(text, message):
    with pytest.raises(UserError, match=message):
        LinkTrace.parse(text, "t")


def test_parse_reads_units_and_comments():
    trace = LinkTrace.parse("# a comment\n" + HEADER + "0,8,20\n\n1.5, 0.8 ,5\n", "t")
    assert trace.times == (0.0, 1.5)
    assert trace.rates == (1e6, 1e5)            # bytes per second
    assert trace.delays == (0.02, 0.005)
    assert trace.rate_at(1.49) == 1e6 and trace.rate_at(1.5) == 1e5 and trace.rate_at(100) == 1e5
    assert trace.delay_at(0) == 0.02 and trace.delay_at(7) == 0.005


def test_load_missing_file_names_the_builtins(tmp_path):
    with pytest.raises(UserError, match="step-down"):
        LinkTrace.load(tmp_path / "nope.csv")


def test_builtin_traces_load_and_match_their_descriptions():
    assert set(builtin_traces()) >= {"steady", "step-down", "wifi-walk", "cellular-fades"}
    steady = LinkTrace.load("steady")
    assert steady.rates == (10e6 / 8,) and steady.delays == (0.02,)
    step = LinkTrace.load("step-down")
    assert step.mbit_at(19.9) == 20 and step.mbit_at(20) == 1
    wifi = LinkTrace.load("wifi-walk")
    assert max(wifi.rates) / min(wifi.rates) >= 10        # it swings 10x
    cell = LinkTrace.load("cellular-fades")
    assert min(cell.rates) * 8 / 1e6 < 0.35 and max(cell.rates) * 8 / 1e6 > 5


def test_builtin_traces_are_what_the_generator_writes(tmp_path):
    """The shipped files are reproducible from scripts/make_traces.py."""
    before = {p.name: p.read_text() for p in (REPO / "splitprune/link/traces").glob("*.csv")}
    code = ("import runpy, pathlib, sys; g = runpy.run_path(sys.argv[1]); "
            "g['OUT'] = pathlib.Path(sys.argv[2]); g['main'].__globals__['OUT'] = g['OUT']; g['main']()")
    subprocess.run([sys.executable, "-c", code, str(REPO / "scripts/make_traces.py"), str(tmp_path)], check=True)
    after = {p.name: p.read_text() for p in tmp_path.glob("*.csv")}
    assert after == before


# --------------------------------------------------------------------------------- rate integral
def test_finish_integrates_the_rate_across_rows():
    trace = LinkTrace.from_rows([(0, 8, 0), (1, 0.8, 0), (3, 80, 0)])   # 1 MB/s, 100 kB/s, 10 MB/s
    assert trace.finish(0.0, 500_000) == pytest.approx(0.5)
    assert trace.finish(0.5, 600_000) == pytest.approx(1.0 + 100_000 / 1e5)      # 0.5 MB at 1 MB/s, 0.1 MB slow
    assert trace.finish(0.9, 100_000 + 200_000 + 1e6) == pytest.approx(3.1)       # three rows
    assert trace.finish(5.0, 1e7) == pytest.approx(6.0)                          # after the last row


# ----------------------------------------------------------------------------- a real proxy
class _Sink:
    """A loopback TCP server that reads everything and notes (time, bytes so far) per read."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()[:2]
        self.reads: list[tuple[float, int]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.sock.accept()
        total = 0
        with conn:
            while data := conn.recv(65536):
                total += len(data)
                self.reads.append((time.monotonic(), total))
        self.sock.close()

    def received_by(self, t: float) -> int:
        return max((n for when, n in self.reads if when <= t), default=0)


def test_proxy_rate_follows_a_step_down():
    """Upper bounds hold on any machine (a rate limit never delivers more); the lower one is generous: it asks
    only that the first second delivered more than the slow row could, not a share of the fast row's rate,
    which a loaded machine need not reach."""
    trace = LinkTrace.from_rows([(0, 8, 0), (1.0, 0.4, 0)])       # 1 MB/s for 1 s, then 50 kB/s
    sink = _Sink()
    with LinkProxy(("127.0.0.1", 0), sink.address, LinkProfile(), trace=trace) as proxy:
        t0 = time.monotonic() - proxy.elapsed()
        with socket.create_connection(proxy.address) as s:
            s.settimeout(10)
            sender = threading.Thread(target=lambda: _send_quietly(s, 4_000_000), daemon=True)
            sender.start()
            time.sleep(2.6)
        fast = sink.received_by(t0 + 1.0)
        slow = sink.received_by(t0 + 2.5) - sink.received_by(t0 + 1.5)
    slow_second = 50_000 * 1.0 * 1.1 + 3000                 # one second of the slow row, a chunk of slack
    assert fast <= 1_000_000 * 1.0 + 300_000                # at most the fast row's bytes (+ buffers)
    assert slow <= slow_second
    # the step is visible: before it the link ran faster than the slow row allows (twice its second's bytes in
    # the first second; only a stall of most of that second, or the slow rate from the start, falls short)
    assert fast > 2 * slow_second, (fast, slow)


def _send_quietly(sock: socket.socket, n: int) -> None:
    try:
        sock.sendall(b"\0" * n)
    except OSError:
        pass


def test_proxy_delay_follows_the_trace():
    trace = LinkTrace.from_rows([(0, 100, 120), (1.0, 100, 2)])
    with socket.create_server(("127.0.0.1", 0)) as server:
        def echo():
            conn, _ = server.accept()
            with conn:
                while data := conn.recv(1024):
                    conn.sendall(data)
        threading.Thread(target=echo, daemon=True).start()
        with LinkProxy(("127.0.0.1", 0), server.getsockname()[:2], LinkProfile(), trace=trace) as proxy:
            with socket.create_connection(proxy.address) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.settimeout(10)
                def rtt() -> float:
                    t = time.monotonic()
                    s.sendall(b"x")
                    assert s.recv(1) == b"x"
                    return time.monotonic() - t
                early = rtt()
                time.sleep(max(0.0, 1.3 - proxy.elapsed()))
                late = min(rtt() for _ in range(3))
    assert early >= 0.240                                   # two 120 ms one-way delays, never less
    assert late < early / 2                                 # the delay dropped to 2 ms


@pytest.mark.parametrize("profile", [LinkProfile(rate_mbit=5), LinkProfile(delay_ms=3),
                                     LinkProfile(delay_ms=3, jitter_ms=1)])
def test_proxy_refuses_a_trace_with_a_fixed_profile(profile):
    with pytest.raises(UserError, match="either a trace"):
        LinkProxy(("127.0.0.1", 0), ("127.0.0.1", 1), profile, trace=LinkTrace.from_rows([(0, 10, 5)]))


# ------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("extra, message", [
    (["--trace", "no-such-trace"], "not a built-in trace"),
    (["--trace", "steady", "--rate-mbit", "5"], "--trace replaces"),
])
def test_cli_trace_errors_are_one_line(extra, message):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "splitprune", "link", "--listen", "127.0.0.1:0",
                           "--upstream", "127.0.0.1:9", *extra], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_cli_bad_trace_file_names_the_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "0,10,5\n1,ten,5\n")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "splitprune", "link", "--listen", "127.0.0.1:0",
                           "--upstream", "127.0.0.1:9", "--trace", str(bad)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "data line 3" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
