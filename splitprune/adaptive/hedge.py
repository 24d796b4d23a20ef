"""`--budget auto --hedge`: a request above the smallest option also sends the smallest one, first. Torch-free.

The device computes and encodes the hedge (the same sample at the smallest option, tens of bytes) and puts it on
the wire, then the chosen option (the main request): on a stream the hedge's bytes go first; as two unary calls
on one connection gRPC may interleave their frames, so part of the main's can travel before the hedge's. It
takes the main answer if it arrives by the deadline (the latency target, from the start of the request), else
the hedge's if that one arrived by then, else whichever comes first; then it moves on. The answer it does not
take is abandoned: a unary call is cancelled, an answer on a stream is read and dropped when it comes (streams
answer in order: splitprune.wire.stream).
Bytes handed to the socket still cross the link, so a hedge cannot make a faded link faster: it buys an answer
in time (at the smallest option's accuracy) and keeps one late request from holding up the next.

The controller is told about the main request only: its answer as it came, or, abandoned, a miss of the
seconds the device waited for it (a lower bound; it steps down). A hedge's answer is never taken for the
main option's latency.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, replace
from typing import Callable

from splitprune.adaptive.controller import Option


def waited(target: float) -> float:
    """What the controller is told of a main request abandoned at the deadline: just over the target (a miss)."""
    return math.nextafter(target, math.inf)


@dataclass
class Pending:
    """One request on its way: the device's work is done, the call is out; `future` gives its Outcome
    (seconds counted from `started`), `cancel` abandons it."""

    future: Future
    cancel: Callable[[], None]
    started: float          # time.perf_counter() when the device started on it
    compute: float          # seconds of device work before the call went out
    samples: int
    bytes_up: int


Start = Callable[[int, Option], Pending]   # (sample index, option) -> the request on its way


@dataclass(frozen=True)
class Hedged:
    """What a hedged request gave: the answer used, what the controller is told of the main request, the hedge."""

    used: object             # adaptive.stream.Outcome, seconds from the start of the request
    main: object             # adaptive.stream.Outcome; abandoned: a miss of the seconds waited, nothing received
    hedged: bool             # the answer used is the hedge's
    hedge_bytes_up: int
    hedge_bytes_down: int    # 0 when its answer had not come when the device moved on


def from_start(pending: Pending, since: float):
    """Its Outcome, its seconds counted from `since` (the start of the request) instead of its own start."""
    out = pending.future.result()
    return replace(out, seconds=out.seconds + pending.started - since)


def abandoned(pending: Pending, since: float, seconds: float, answer):
    """The Outcome the controller is told of a main request abandoned after `seconds`: nothing came back,
    the device's own work (the hedge's included) is its compute. `answer` is the hedge's Outcome (every field
    replaced: this module does not import adaptive.stream, which imports it)."""
    compute = pending.started - since + pending.compute
    return replace(answer, samples=pending.samples, correct=None, bytes_up=pending.bytes_up, bytes_down=0,
                   seconds=seconds, call_seconds=max(seconds - compute, 0.0), server_seconds=0.0)


def race(hedge: Pending, main: Pending, target: float) -> Hedged:
    """Wait for the main answer until the deadline (`target` seconds after the hedge's start), then see above."""
    since = hedge.started
    wait([main.future], timeout=max(since + target - time.perf_counter(), 0.0))
    if not main.future.done() and not ok(hedge):   # neither in time: whichever comes first
        wait([main.future, hedge.future], return_when=FIRST_COMPLETED)
        if not ok(hedge):   # the hedge failed: the main answer it is
            wait([main.future])
    if main.future.done():
        hedge.cancel()
        used = from_start(main, since)
        return Hedged(used, used, False, hedge.bytes_up, hedge.future.result().bytes_down if ok(hedge) else 0)
    main.cancel()
    used = from_start(hedge, since)
    seconds = max(time.perf_counter() - since, waited(target))
    return Hedged(used, abandoned(main, since, seconds, used), True, hedge.bytes_up, used.bytes_down)


def ok(pending: Pending) -> bool:
    return pending.future.done() and not pending.future.cancelled() and pending.future.exception() is None
