"""`splitprune link`: run a link-emulation proxy (rate limit, delay, jitter) in front of a TCP server."""
from __future__ import annotations

import argparse
import signal
import threading
import time

from splitprune.errors import UserError
from splitprune.link.proxy import LinkProfile, LinkProxy
from splitprune.link.trace import LinkTrace, builtin_traces
from splitprune.wire.addresses import format_hostport, parse_hostport

DEFAULT_HOST = "127.0.0.1"


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        help="emulate a network link: a TCP proxy with a rate limit, delay and jitter",
        description=(
            "Forward every TCP connection made to --listen to --upstream through an emulated link: "
            "each direction is serialized at --rate-mbit (one rate shared by all connections, like one "
            "Wi-Fi link), then delayed by --delay-ms (+- --jitter-ms, never reordering bytes). "
            "With --trace, rate and delay follow a schedule over time instead (CSV: seconds,rate_mbit,delay_ms). "
            "Byte-transparent: put it between a `splitprune infer`/`train` client and `splitprune serve`. "
            "Runs until Ctrl-C or SIGTERM."
        ),
    )
    p.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help=f"address to accept connections on (HOST defaults to {DEFAULT_HOST}; PORT 0 picks a free one)")
    p.add_argument("--upstream", required=True, metavar="HOST:PORT",
                   help=f"server to forward to (HOST defaults to {DEFAULT_HOST})")
    p.add_argument("--rate-mbit", type=float, default=None, metavar="R",
                   help="rate per direction in Mbit/s (1 Mbit = 10^6 bit; default: unlimited)")
    p.add_argument("--delay-ms", type=float, default=0.0, metavar="D", help="one-way delay in ms (default 0)")
    p.add_argument("--jitter-ms", type=float, default=0.0, metavar="J",
                   help="uniform +-jitter on the delay in ms, at most --delay-ms (default 0)")
    p.add_argument("--trace", default=None, metavar="FILE|NAME",
                   help="replay a rate/delay schedule: a CSV file (seconds,rate_mbit,delay_ms) or a built-in "
                        f"trace ({', '.join(builtin_traces())}); replaces --rate-mbit, --delay-ms and --jitter-ms")
    p.add_argument("--trace-on-connect", action="store_true",
                   help="with --trace: start the trace's clock at the first connection, not at start-up (a replay "
                        "then does not depend on how long the client takes to start); a line says when")
    p.add_argument("--seed", type=int, default=0, help="seed of the jitter generator (default 0)")
    p.add_argument("--interval", type=float, default=5.0, metavar="S",
                   help="seconds between status lines (default 5; 0 = no status lines)")
    p.set_defaults(run=run)
    return p


def _mbit(nbytes: int, seconds: float) -> float:
    return nbytes * 8 / 1e6 / seconds if seconds > 0 else 0.0


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def run(args: argparse.Namespace) -> int:
    if args.interval < 0:
        raise UserError(f"--interval must be >= 0, got {args.interval}")
    listen = parse_hostport(args.listen, default_host=DEFAULT_HOST)
    upstream = parse_hostport(args.upstream, default_host=DEFAULT_HOST)
    if upstream[1] == 0:
        raise UserError("--upstream needs a port other than 0")
    trace = LinkTrace.load(args.trace) if args.trace is not None else None
    if trace is not None and (args.rate_mbit is not None or args.delay_ms or args.jitter_ms):
        raise UserError("--trace replaces --rate-mbit, --delay-ms and --jitter-ms: give one or the other")
    if args.trace_on_connect and trace is None:
        raise UserError("--trace-on-connect goes with --trace")
    profile = LinkProfile(rate_mbit=args.rate_mbit, delay_ms=args.delay_ms, jitter_ms=args.jitter_ms)

    proxy = LinkProxy(listen, upstream, profile, seed=args.seed, trace=trace,
                      trace_on_connect=args.trace_on_connect).start()
    t_start = time.monotonic()
    stop = threading.Event()
    old_term = None
    try:
        try:  # SIGTERM -> clean shutdown (only possible from the main thread)
            old_term = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
        except ValueError:
            pass
        print(f"splitprune link: listening on {format_hostport(proxy.address)} -> {format_hostport(upstream)} "
              f"({proxy.describe()})", flush=True)
        last_t, last = t_start, proxy.counters()
        announced = not args.trace_on_connect
        while not stop.wait(0.05 if not announced else 0.25):  # short waits keep Ctrl-C / SIGTERM responsive
            now = time.monotonic()
            if not announced and proxy.trace_started is not None:
                print(f"splitprune link: trace {trace.name} started at the first connection "
                      f"(unix {proxy.trace_started:.3f})", flush=True)
                announced = True
            if args.interval <= 0 or now - last_t < args.interval:
                continue
            c = proxy.counters()
            dt = now - last_t
            now_rate = f"  link {trace.mbit_at(proxy.elapsed()):g} Mbit/s" if trace is not None else ""
            print(f"[{now - t_start:7.1f}s]{now_rate} up {_fmt_bytes(c.bytes_up)} ({_mbit(c.bytes_up - last.bytes_up, dt):.2f} Mbit/s)"
                  f"  down {_fmt_bytes(c.bytes_down)} ({_mbit(c.bytes_down - last.bytes_down, dt):.2f} Mbit/s)"
                  f"  connections {c.connections}", flush=True)
            last_t, last = now, c
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    elapsed = time.monotonic() - t_start
    c = proxy.counters()
    print(f"splitprune link: totals: up {c.bytes_up} bytes, down {c.bytes_down} bytes, "
          f"{c.connections} connections in {elapsed:.1f}s "
          f"(mean up {_mbit(c.bytes_up, elapsed):.2f} Mbit/s, down {_mbit(c.bytes_down, elapsed):.2f} Mbit/s)",
          flush=True)
    return 0

