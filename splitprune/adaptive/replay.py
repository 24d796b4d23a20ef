"""Replaying a `--budget auto` run's trace for other policies: every fixed option, an oracle, the controller.

Real time is too dear to run every policy over every trace, so only `--budget auto` runs for real; the
others are SIMULATED on the same trace with what the real run measured. For the real request i sent at
trace time t_i with option o_i, the network part is modelled as the proxy does it (uplink serialized at
the trace's rate, the one-way delay, the server's reported compute, the downlink serialized, the delay)
and everything else it took (device compute, encoding, gRPC and HTTP/2 overhead, scheduling) is its
residual: `residual_i = latency_i - network(t_i, o_i, server_i)`. A simulated request i of any option o
at any time t then takes `residual_i + network(t, o, server_i)`, and the next one starts after the gap
the real run left between requests. Accuracy comes from the model's real predictions: each request
counts the accuracy of its option (computed beforehand) over ALL the same test images, so every policy
is scored on the same images (scoring the sample each request happened to carry compared
policies on different subsets: a policy sending 240 requests saw images 0-239, one sending 350 saw
0-349, a difference of a point or two from the images alone).

With `hedge` (`--hedge`, adaptive.hedge) every request above the smallest option sends the smallest one first
(the hedge), then its own, up the same serialized link: the main one's uplink finishes when the summed bytes
do, and a later request's uplink starts when the link has serialized everything before it, abandoned
requests included (their bytes were handed to the socket). Downlinks (tens of bytes) and the hedge's own
device work are not modelled. Torch-free.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol

from splitprune.adaptive.controller import BudgetController, Observation, Option
from splitprune.adaptive.hedge import waited
from splitprune.adaptive.stream import warmup_option
from splitprune.errors import UserError


class LinkTrace(Protocol):
    """A link's rate and delay over time, as splitprune.link.trace.LinkTrace gives them (seconds, bytes)."""

    times: list[float]   # when each row of the schedule starts

    def finish(self, start: float, nbytes: float) -> float: ...

    def delay_at(self, t: float) -> float: ...

    def mbit_at(self, t: float) -> float: ...


def network_seconds(trace: LinkTrace, t: float, option: Option, server: float) -> float:
    """Send at trace time t: uplink serialization, delay, server compute, downlink serialization, delay."""
    sent = trace.finish(t, option.bytes_up)
    answered = sent + trace.delay_at(sent) + server
    back = trace.finish(answered, option.bytes_down)
    return back + trace.delay_at(back) - t


@dataclass(frozen=True)
class Measured:
    """What the real run measured for request i."""

    t: float          # trace seconds when it was sent
    residual: float   # latency minus the modelled network part (>= 0)
    server: float     # the server's reported compute, seconds
    compute: float    # what the controller was told was not on the link (device + server compute)
    gap: float        # seconds from its answer to the next request


def measured(trace: LinkTrace, rows: list[dict], options: list[Option], trace_start_unix: float) -> list[Measured]:
    """The per-request residuals of a real run's log rows (see the module docstring)."""
    if any(r.get("hedge_bytes_up") for r in rows):   # its latencies are of two requests' answers
        raise UserError("a run with --hedge cannot be replayed: replay one without it")
    by_label = {(o.budget, o.dtype): o for o in options}
    out = []
    for i, r in enumerate(rows):
        t = r["unix"] - trace_start_unix
        server = r["server_ms"] / 1e3
        latency = r["latency_ms"] / 1e3
        residual = max(latency - network_seconds(trace, t, by_label[r["budget"], r["dtype"]], server), 0.0)
        following = rows[i + 1]["unix"] - trace_start_unix if i + 1 < len(rows) else t + latency
        out.append(Measured(t, residual, server, r["compute_ms"] / 1e3, max(following - t - latency, 0.0)))
    return out


Chooser = Callable[[int, float, Measured], int]          # (request, trace time, measured) -> option index


Observer = Callable[[int, float, float, Measured, bool], None]   # (option, done, seconds, measured, answered)


class Replayed(NamedTuple):
    """One simulated request: its number, when it was sent (trace time), its option's index, the latency of the
    answer used, and with --hedge whether that answer was the hedge's (None: no hedging)."""

    index: int
    t: float
    option: int
    latency: float
    hedged: bool | None = None


def replay(trace: LinkTrace, options: list[Option], real: list[Measured], choose: Chooser, target: float,
           observe: Observer | None = None, hedge: bool = False) -> list[Replayed]:
    """Requests one after another over the real run's window."""
    t, end, out = real[0].t, real[-1].t, []
    i, busy = 0, -math.inf
    while t <= end:
        m = real[i % len(real)]
        k = choose(i, t, m)
        if hedge:
            latency, hedged, main, moved_on, busy = hedged_request(trace, options, k, t, busy, m, target)
            out.append(Replayed(i, t, k, latency, hedged))
            if observe:   # the main request as the device saw it: answered, or abandoned when it moved on
                observe(k, t + (moved_on if main is None else main), moved_on if main is None else main, m,
                        main is not None)
            t += moved_on + m.gap
            i += 1
            continue
        latency = m.residual + network_seconds(trace, t, options[k], m.server)
        out.append(Replayed(i, t, k, latency))
        if observe:
            observe(k, t + latency, latency, m, True)
        t += latency + m.gap
        i += 1
    return out


def hedged_request(trace: LinkTrace, options: list[Option], k: int, t: float, busy: float, m: Measured,
                   target: float) -> tuple[float, bool, float | None, float, float]:
    """One request of option k sent at t under --hedge, the link serializing until `busy`: (latency of the
    answer used, whether the hedge's, the main one's latency or None when abandoned, seconds until the device
    moved on, when the link has serialized this request's bytes)."""
    start, smallest, main = max(t, busy), options[0], options[k]

    def latency(sent: float, option: Option) -> float:   # its uplink done at `sent`: the answer on the device
        answered = sent + trace.delay_at(sent) + m.server
        back = trace.finish(answered, option.bytes_down)
        return back + trace.delay_at(back) + m.residual - t

    sent_main = trace.finish(start, main.bytes_up + (smallest.bytes_up if k else 0))
    own = latency(sent_main, main)
    if k == 0 or own <= target:
        return own, False, own, own, sent_main
    hedge = latency(trace.finish(start, smallest.bytes_up), smallest)
    if hedge <= target:
        return hedge, True, None, waited(target), sent_main
    if own <= hedge:
        return own, False, own, own, sent_main
    return hedge, True, None, hedge, sent_main


def fixed(k: int) -> Chooser:
    return lambda i, t, m: k


def oracle(trace: LinkTrace, options: list[Option], target: float) -> Chooser:
    """Knows the trace and each request's own residual: the best option that meets the target (the smallest
    when none does). An upper bound no causal controller reaches."""
    def choose(i: int, t: float, m: Measured) -> int:
        fits = [k for k, o in enumerate(options) if m.residual + network_seconds(trace, t, o, m.server) <= target]
        return max(fits) if fits else 0
    return choose


def controller_replay(trace: LinkTrace, options: list[Option], real: list[Measured], target: float,
                      hedge: bool = False, **settings):
    """The same BudgetController as the real run, on the simulated link (checks the simulator against reality).

    Like the real stream (adaptive.stream.run_stream, warm-up 3) it first observes one request of the largest
    and one of the smallest option, here as they would have gone at the first request's time: without them
    it starts from the prior rate and, on cellular-fades at 200 ms, never left B=1 (81.5% against the real
    run's 83.3%)."""
    controller = BudgetController(options, target, **settings)
    first = real[0]
    for o in (warmup_option(1, options), warmup_option(2, options)):
        latency = first.residual + network_seconds(trace, first.t, o, first.server)
        controller.observe(Observation(first.t, o.bytes_up, o.bytes_down, latency, min(first.compute, latency)))

    def observe(k: int, done: float, latency: float, m: Measured, answered: bool) -> None:
        o = options[k]
        controller.observe(Observation(done, o.bytes_up, o.bytes_down if answered else 0, latency,
                                       min(m.compute, latency)))

    return replay(trace, options, real, lambda i, t, m: controller.decide().index, target, observe, hedge)


def score(requests: list[Replayed], options: list[Option], accuracy: list[float], target: float) -> dict:
    """Share within the target (of the answer used), accuracy (the mean over requests of the accuracy of the
    option that answered, on the same test images), bytes, mean budget, and the share of the requests each
    option answered; of a hedged replay also the answers the hedge gave and the hedges' bytes."""
    n = len(requests)
    answered = [0 if r.hedged else r.option for r in requests]   # a hedge answers as the smallest
    out = {"requests": n, "share_within_target": sum(r.latency <= target for r in requests) / max(n, 1),
           "accuracy": sum(accuracy[k] for k in answered) / max(n, 1),
           "bytes_up": sum(options[r.option].bytes_up for r in requests),
           "bytes_down": sum(options[r.option].bytes_down for r in requests),
           "mean_budget": sum(options[r.option].budget for r in requests) / max(n, 1),
           "option_share": shares([options[k].label() for k in answered])}
    if requests and requests[0].hedged is not None:
        hedges = sum(r.option > 0 for r in requests)
        out |= {"hedged_answers": sum(bool(r.hedged) for r in requests), "hedges": hedges,
                "hedge_bytes_up": hedges * options[0].bytes_up, "hedge_bytes_down": hedges * options[0].bytes_down}
    return out


def shares(labels: list[str]) -> dict[str, float]:
    """How often each option (by its label) was used, as a share of the requests."""
    return {label: c / len(labels) for label, c in sorted(Counter(labels).items())}


def rate_changes(trace: LinkTrace, start: float, end: float, factor: float = 2.0,
                 hold: float = 0.0) -> list[tuple[float, float, float]]:
    """(trace time, rate before, rate after) of every step in the trace's rate by `factor` or more in
    (start, end); with `hold`, only those after which the rate stays `factor` away from before for `hold` s."""
    rates = [trace.mbit_at(t) for t in trace.times]
    out = []
    for i, (t, before, after) in enumerate(zip(trace.times[1:], rates, rates[1:]), start=1):
        if not (start < t < end and max(after / before, before / after) >= factor):
            continue
        rise = after > before
        held = [r for s, r in zip(trace.times[i:], rates[i:]) if s < t + hold]
        if all((r >= factor * before) if rise else (r * factor <= before) for r in held):
            out.append((t, before, after))
    return out


def reactions(trace: LinkTrace, requests: list[Replayed], best: list[int], target: float,
              factor: float = 2.0, hold: float = 0.0) -> list[dict]:
    """How long a policy took to react to each rate step of `factor` or more, from its requests and the option
    the oracle would have used for each request (`best`, same length).

    A fall is answered by the first request sent after it that was in time: the seconds from the step to
    it, and the requests before it that were late (the one in flight at the step cannot be helped). A rise
    is answered by the first request sent after it at the oracle's option or a better one, in time."""
    out = []
    end = requests[-1].t if requests else 0.0
    for at, before, after in rate_changes(trace, requests[0].t if requests else 0.0, end, factor, hold):
        following = [(r, b) for r, b in zip(requests, best) if r.t >= at]
        if after < before:
            answer = next((r for r, _ in following if r.latency <= target), None)
        else:
            answer = next((r for r, b in following if r.option >= b and r.latency <= target), None)
        late = sum(1 for r, _ in following if (answer is None or r.t < answer.t) and r.latency > target)
        out.append({"at": at, "from_mbit": before, "to_mbit": after, "direction": "fall" if after < before else "rise",
                    "seconds": None if answer is None else answer.t - at, "late": late})
    return out


def switches_per_100(chosen: list[int]) -> float:
    """How often consecutive requests changed option, per 100 requests (oscillation)."""
    return 100 * sum(a != b for a, b in zip(chosen, chosen[1:])) / max(len(chosen), 1)


def reaction_stats(steps: list[dict]) -> dict[str, dict]:
    """Per direction ("fall", "rise"), over `reactions` steps (of one run or pooled): how many, the median
    and the longest seconds to the answer (None: never answered, as JSON has no infinity), how many within
    1 s, how many never answered, and the late requests on the way."""
    out = {}
    for direction in ("fall", "rise"):
        own = [s for s in steps if s["direction"] == direction]
        seconds = sorted(math.inf if s["seconds"] is None else s["seconds"] for s in own)
        finite = [None if x == math.inf else x for x in seconds]
        out[direction] = {"count": len(own), "median_seconds": finite[len(finite) // 2] if finite else None,
                          "max_seconds": finite[-1] if finite else None,
                          "within_1s": sum(x <= 1.0 for x in seconds),
                          "unanswered": sum(s["seconds"] is None for s in own),
                          "late": sum(s["late"] for s in own)}
    return out


def reaction_summary(trace: LinkTrace, rows: list[dict], options: list[Option], trace_start_unix: float,
                     target: float) -> dict:
    """A real run's reactions (`reactions`, the oracle given each request's own residual), their
    `reaction_stats` and its option switches per 100 requests."""
    real = measured(trace, rows, options, trace_start_unix)
    index = {(o.budget, o.dtype): k for k, o in enumerate(options)}
    requests = [Replayed(i, m.t, index[r["budget"], r["dtype"]], r["latency_ms"] / 1e3)
                for i, (r, m) in enumerate(zip(rows, real))]
    best = oracle(trace, options, target)
    steps = reactions(trace, requests, [best(i, m.t, m) for i, m in enumerate(real)], target)
    return {"steps": steps, "switches_per_100": switches_per_100([r.option for r in requests]),
            **reaction_stats(steps)}
