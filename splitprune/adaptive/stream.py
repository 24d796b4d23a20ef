"""`infer --budget auto`: stream requests one after another, each with the option the controller picks.

Torch-free: the caller passes `send(index, option) -> Outcome`, which runs one request (the device half,
the encoding, the call) and reports what it saw; `splitprune infer` (PyTorch) and `splitprune-device
infer` (ONNX Runtime) both stream through `run_stream`. Every finished request is fed back to the
controller: the bytes of its encoded messages, the latency the device measured around the whole
request (device compute, encoding, the call, decoding), and the part of it spent computing (the
device's own work outside the call plus the server's reported compute time). With `--hedge` the
counted requests go through adaptive.hedge instead: the rows and the summary say which answers came from the
hedge.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Callable

from splitprune.adaptive.controller import Option
from splitprune.adaptive.hedge import Hedged, Pending, Start, from_start, race
from splitprune.adaptive.policy import AutoBudget, Clock
from splitprune.errors import UserError


@dataclass(frozen=True)
class Outcome:
    """One finished request, as `send` reports it."""

    samples: int
    correct: int | None     # samples predicted right; None without labels
    bytes_up: int           # the request message as sent
    bytes_down: int         # the reply message as received
    seconds: float          # measured on the device around the whole request
    call_seconds: float     # of which the call itself: uplink, server, downlink (measured around the RPC)
    server_seconds: float   # what the server reported (0 when it reports nothing)

    @property
    def compute_seconds(self) -> float:
        """The part not on the link: the device's own work outside the call, and the server's reported compute."""
        return max(self.seconds - self.call_seconds, 0.0) + min(self.server_seconds, self.call_seconds)


def submitted(call: Future, cancel: Callable[[], None], sent: int, started: float, compute: float, samples: int,
              score: Callable[[object], int | None]) -> Pending:
    """A call on its way as a Pending: once `call` gives (reply, round trip s, server s, bytes up, bytes down),
    `score(reply)` (the samples predicted right, or None) makes its Outcome, seconds counted from `started`."""
    outcome: Future = Future()

    def answered(f: Future) -> None:
        if f.cancelled():
            outcome.cancel()
            return
        try:
            reply, round_trip, server, up, down = f.result()
            correct = score(reply)
        except Exception as exc:  # noqa: BLE001 - handed to whoever waits for this answer
            outcome.set_exception(exc)
            return
        outcome.set_result(Outcome(samples, correct, up, down, time.perf_counter() - started, round_trip, server))

    call.add_done_callback(answered)
    return Pending(outcome, cancel, started, compute, samples, sent)


@dataclass(frozen=True)
class Row:
    index: int
    t: float                # seconds since the stream started, when the request was sent
    unix: float             # wall-clock time it was sent (to line the log up with a link trace)
    budget: int             # the option chosen (the main request, under --hedge)
    dtype: str
    predicted_ms: float
    latency_ms: float       # until the answer used
    server_ms: float        # of the main request, as the controller was told it (so are compute and bytes)
    compute_ms: float
    bytes_up: int
    bytes_down: int         # 0: abandoned before its answer came (--hedge)
    correct: int | None     # of the answer used
    within: bool            # the answer used was in time
    impossible: bool
    estimated_mbit: float | None   # the controller's rate estimate when it chose (None before any request)
    hedged: bool = False    # --hedge: the answer used came from the hedge (the smallest option)
    hedge_bytes_up: int = 0     # the hedge sent with it (0: none, the smallest option was chosen)
    hedge_bytes_down: int = 0   # its answer, when it came before the device moved on


@dataclass
class StreamResult:
    target_ms: float
    options: list[Option]
    started_unix: float
    rows: list[Row] = field(default_factory=list)
    warning: str | None = None

    def summary(self) -> dict:
        rows, n = self.rows, len(self.rows)
        labelled = [r for r in rows if r.correct is not None]
        latencies = [r.latency_ms for r in rows]
        used: dict[str, int] = {}
        for r in rows:
            used[f"B={r.budget} {r.dtype}"] = used.get(f"B={r.budget} {r.dtype}", 0) + 1
        return {
            "requests": n, "target_ms": self.target_ms,
            "within_target": sum(r.within for r in rows), "share_within_target": sum(r.within for r in rows) / max(n, 1),
            "accuracy": sum(r.correct for r in labelled) / len(labelled) if labelled else None,
            "latency_ms": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
                           "mean": sum(latencies) / n if n else None},
            "bytes_up": sum(r.bytes_up for r in rows), "bytes_down": sum(r.bytes_down for r in rows),
            "mean_budget": sum(r.budget for r in rows) / max(n, 1), "options_used": used,
            "impossible_requests": sum(r.impossible for r in rows), "warning": self.warning,
            "hedged_answers": sum(r.hedged for r in rows), "hedges": sum(r.hedge_bytes_up > 0 for r in rows),
            "hedge_bytes_up": sum(r.hedge_bytes_up for r in rows),
            "hedge_bytes_down": sum(r.hedge_bytes_down for r in rows),
        }

    def log(self) -> str:
        """The whole run as JSON text: settings, the option ladder, every request, the summary (`--log`)."""
        return json.dumps({"target_ms": self.target_ms, "started_unix": self.started_unix,
                           "options": [asdict(o) for o in self.options], "summary": self.summary(),
                           "rows": [asdict(r) for r in self.rows]}, indent=1)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def impossible_warning(auto: AutoBudget, predicted: float) -> str:
    smallest = auto.options[0]
    est = auto.controller.estimate()
    rtt = f", round trip and compute ~{1e3 * (est.rtt + est.compute):.1f} ms" if est.rtt is not None else ""
    return (f"warning: the latency target {1e3 * auto.target_seconds:g} ms is below what this link allows "
            f"(the smallest option {smallest.label()} is predicted to take {1e3 * predicted:.1f} ms{rtt}); "
            f"sending the smallest option")


AUTO_FLAGS = ("latency_ms", "dtypes_up", "duration", "log", "hedge")   # the flags of `--budget auto`, both CLIs


def add_auto_flags(parser, description: str, per: str, model: str, inputs: str) -> None:
    """The `--budget auto` flags (AUTO_FLAGS and --every) of both CLIs: `per` names one request, `model`
    where its default dtype comes from, `inputs` what a stream cycles through."""
    auto = parser.add_argument_group("--budget auto", description)
    auto.add_argument("--latency-ms", type=float, help=f"latency target per {per}")
    auto.add_argument("--dtypes-up", help=f"uplink dtypes to choose from, comma-separated (default: the {model} "
                                          "one and the cheaper ones down to int8)")
    auto.add_argument("--duration", type=float, help=f"stream for this many seconds, cycling through the {inputs} "
                                                     f"(default: each of them once)")
    auto.add_argument("--every", type=int, default=1, help="print every N-th request (0: none; default: 1)")
    auto.add_argument("--log", help="write every request (time, budget, dtype, latency, bytes, correct) as JSON "
                                    "here, for `splitprune plot LOG.json`")
    auto.add_argument("--hedge", action="store_true", default=None,
                      help="with every request above the smallest option, send the smallest one first; take its "
                           "answer when the chosen one misses the target, and move on (one smallest request's bytes "
                           "more per request; bytes already sent still cross the link)")


def check_auto_args(args, auto: bool) -> None:
    """The `--budget auto` flags of `splitprune infer` / `splitprune-device infer`, checked before any work."""
    given = [name for name in AUTO_FLAGS if getattr(args, name, None) is not None]
    if not auto:
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} goes with --budget auto")
        return
    if args.latency_ms is None or not args.latency_ms > 0:
        raise UserError("--budget auto needs a positive --latency-ms target")
    if args.duration is not None and not args.duration > 0:
        raise UserError(f"--duration must be positive, got {args.duration}")
    if args.every < 0:
        raise UserError(f"--every must be >= 0, got {args.every}")
    if args.batch_size != 1:
        raise UserError("--budget auto streams one image per request: leave --batch-size at 1")


def warmup_option(i: int, options: list[Option]) -> Option:
    """The option of warm-up request `i`: the smallest and the largest in turn. Request 0 opens the connection
    and is not observed; 1 (the largest) and 2 (the smallest) give the controller a fit over both ends."""
    return options[i % 2 * (len(options) - 1)]


def run_stream(send: Callable[[int, Option], Outcome], auto: AutoBudget, requests: int | None = None,
               duration: float | None = None, clock: Clock = time.perf_counter,
               show: Callable[[str], None] | None = None, every: int = 1, warmup: int = 0,
               hedge: Start | None = None) -> StreamResult:
    """Send requests 0, 1, 2, ... until `requests` are done or `duration` seconds have passed (at least one
    of them). `show` gets one line per `every`-th request and the impossible-target warning (once). The
    `warmup` requests before (the smallest and the largest option in turn: connections open, each code path
    runs once) are not counted; all but the first (connection setup) are shown to the controller, so that
    with two or more it starts from a fit over both ends of the ladder instead of climbing it. With `hedge`
    (which starts a request and returns at once: adaptive.hedge) the counted requests are hedged."""
    if requests is None and duration is None:
        raise UserError("say how long to stream: a number of requests or a duration")
    if requests is not None and requests < 1 or duration is not None and duration <= 0:
        raise UserError("the stream needs at least one request and a positive duration")
    first, last = auto.options[0], auto.options[-1]
    if show:
        show(f"auto budget: {len(auto.options)} options from {first.label()} ({first.bytes_up} B up) to "
             f"{last.label()} ({last.bytes_up} B up), target {1e3 * auto.target_seconds:g} ms")
    for i in range(warmup):   # the first opens the connection; the others are observed, not counted
        out = send(i, warmup_option(i, auto.options))
        if i:
            auto.observe(out.bytes_up, out.bytes_down, out.seconds, out.compute_seconds)
    result = StreamResult(1e3 * auto.target_seconds, list(auto.options), time.time())
    start = clock()
    index = 0
    while (requests is None or index < requests) and (duration is None or clock() - start < duration):
        decision = auto.choose()
        rate = auto.controller.estimate().rate
        if decision.impossible and result.warning is None:
            result.warning = impossible_warning(auto, decision.predicted_seconds)
            if show:
                show(result.warning)
        sent_at, sent_unix = clock() - start, time.time()
        if hedge is None:
            out = send(index, decision.option)
            h = Hedged(out, out, False, 0, 0)
        else:
            h = hedged(hedge, index, decision.option, auto)
        main = h.main
        auto.observe(main.bytes_up, main.bytes_down, main.seconds, main.compute_seconds)
        row = Row(index, round(sent_at, 6), sent_unix, decision.option.budget, decision.option.dtype,
                  round(1e3 * decision.predicted_seconds, 3), round(1e3 * h.used.seconds, 3),
                  round(1e3 * main.server_seconds, 3), round(1e3 * main.compute_seconds, 3), main.bytes_up,
                  main.bytes_down, h.used.correct, h.used.seconds <= auto.target_seconds, decision.impossible,
                  None if rate is None else round(rate * 8 / 1e6, 4), h.hedged, h.hedge_bytes_up, h.hedge_bytes_down)
        result.rows.append(row)
        if show and every and index % every == 0:
            show(row_line(row))
        index += 1
    return result


def hedged(start: Start, index: int, option: Option, auto: AutoBudget) -> Hedged:
    """One counted request under --hedge: the smallest option alone is not hedged (nothing smaller to fall
    back on), it is waited for."""
    if option == auto.options[0]:
        pending = start(index, option)
        out = from_start(pending, pending.started)
        return Hedged(out, out, False, 0, 0)
    return race(start(index, auto.options[0]), start(index, option), auto.target_seconds)


def row_line(r: Row) -> str:
    mark = {None: "", 1: " ok"}.get(r.correct, " wrong" if r.correct == 0 else f" {r.correct} right")
    late = "" if r.within else " LATE"
    hedge = " (hedge answered)" if r.hedged else ""
    return (f"#{r.index} {r.t:7.2f}s B={r.budget} {r.dtype} {r.latency_ms:.1f} ms "
            f"(predicted {r.predicted_ms:.1f}){late}{hedge} up {r.bytes_up} B{mark}")


def summary_lines(s: dict) -> list[str]:
    acc = f", accuracy {100 * s['accuracy']:.2f}%" if s["accuracy"] is not None else ""
    lat = s["latency_ms"]
    used = ", ".join(f"{k} x{v}" for k, v in s["options_used"].items())
    return [f"auto budget, target {s['target_ms']:g} ms: {s['requests']} requests, "
            f"{100 * s['share_within_target']:.1f}% within the target ({s['within_target']}){acc}; "
            f"latency p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms",
            f"bytes (encoded messages): up {s['bytes_up']} ({s['bytes_up'] / max(s['requests'], 1):.1f} per request), "
            f"down {s['bytes_down']}; mean budget {s['mean_budget']:.1f}; options used: {used}"] + ([
            f"hedges: {s['hedges']} sent ({s['hedge_bytes_up']} B up, {s['hedge_bytes_down']} B down), "
            f"{s['hedged_answers']} answers used from them"] if s.get("hedges") else [])
