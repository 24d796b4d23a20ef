"""The device's budget controller: estimate the link from its own requests, pick what fits a deadline.

Pure Python (no torch, no sockets, no clock): the caller feeds it what it already knows about each
finished request (bytes up and down, the latency it measured, the part of it spent computing rather
than on the link, when it finished) and asks which option to use next. Tests replay recorded sequences.

The link model is that of a request over one serialized link:
``latency - compute = base + bytes * per_byte`` (``base`` the round trip, ``per_byte`` one over the rate).
``compute`` is what the caller can tell apart: the server's reported compute time, plus the device's
own when it timed the call separately (`splitprune infer` and `splitprune-device infer` do: device
compute varies by tens of ms on a busy CPU, and left in it would swamp the rate fit of small messages).
Both are fitted on the requests of the last ``window`` seconds (at least the last ``min_points``) with the
Theil-Sen estimator: ``per_byte`` is the median slope over pairs of requests whose sizes differ by at
least ``spread``, ``base`` the median of ``latency - compute - bytes * per_byte``. Medians make one noisy
request move nothing. Requests of one size cannot tell the round trip from the rate: while the window has
no such pair, ``per_byte`` is the last fitted one (a prior of ``1 / prior_rate`` before any) and ``base``
follows the current requests, so a change in delay or rate shows at once in the prediction for the
option in use. A missed request blames the rate (``per_byte`` raised to explain it) for as long as it is
in the window, and until a request is in time again every option is also predicted as if the miss had
been a longer round trip at the old rate, the worse of the two counting (a fade brings both: blaming the
rate alone sent the next requests one option down at a time, each missing too); then the last fit returns, so a one-off stall (a busy CPU, a retransmission) is
forgotten instead of pinning a pessimistic rate for as long as the choice stays put, and a lasting
slowdown is measured again by the next step up (whose size makes a pair with the ones before). A fit
not renewed by a pair for ``refit_after`` seconds is relaxed to the prior if it is slower: a fit from
two nearly equal sizes can be wildly pessimistic, and options of nearly one size never correct it.

``estimator`` (estimators.py) may instead learn the rate from every request (RobustMPC's discounted harmonic
mean, "harmonic", or a size-conditioned predictor after Fugu, "sized"), the round trip taken from the last pair
fit and lowered by any quicker request. On held-out synthetic and real cellular uplink traces neither beat the
fit over pairs (scripts/estimator_heldout.py, bench_results/adaptive/estimators_full_ladder.md): the default.

Choosing: the best option whose predicted latency is within ``safety * target`` wins (the first choice
after a fit over two sizes goes straight there, within ``up_margin * target``), with brakes so
that a steady link does not make the choice oscillate: stepping up waits ``hold`` seconds after a step
down (staying at the smallest option while the link is too slow even for it is no step down), and it
needs the prediction within ``up_margin * target``; then it goes to the best option within that margin
that sends at most ``growth`` times the bytes of the current one, as TCP's slow start grows its window:
each jump's size pairs with the one before, so the next fit measures the link before the next jump
(held-out traces at 200 ms, scripts/controller_heldout.py: after a rise of 2x or more, the oracle's option
0.9 s later, median, against 2.5 s one option at a time with the hold restarted at the bottom; a jump
straight to the best option on a fit from before a fade, one size seen since, sent 4 % of the requests
late on a step down). A step up of one option needs only
``safety * target`` once the choice has not changed for ``settle`` seconds (without that,
a link whose next option fits between the two margins kept the choice one option below the best that
meets the target for good: 0.5 pt below the oracle on held-out steady links). A settled step up that a
step down undoes doubles the settle time before the next one (one that holds for it restores it): with
residual latencies spiking now and then, an option at the edge was otherwise retried every few seconds
(4.4 switches per 100 requests on a held-out steady link).
Stepping down has no brake: a prediction over the target, or a request that missed it, moves down to
the best option that fits right away (at least one option down after a miss). A miss that the usual
compute time would have avoided (the device or server stalled, the link did not) moves nothing: a
smaller option would not have helped. When even the smallest
option cannot meet the target (a target below the round-trip time) the smallest is used and
``Decision.impossible`` says so.
"""
from __future__ import annotations

import collections
import math
import statistics
from dataclasses import dataclass, field

from splitprune.adaptive.estimators import make_estimator
from splitprune.errors import UserError


@dataclass(frozen=True)
class Option:
    """One way to send a request: a budget and an uplink dtype, and the bytes that puts on the wire."""

    budget: int
    dtype: str
    bytes_up: int
    bytes_down: int

    @property
    def bytes(self) -> int:
        return self.bytes_up + self.bytes_down

    def label(self) -> str:
        return f"B={self.budget} {self.dtype}"


@dataclass(frozen=True)
class Observation:
    """A finished request as the device saw it."""

    at: float              # when it finished, seconds on the caller's monotonic clock
    bytes_up: int
    bytes_down: int
    seconds: float          # latency measured by the device, the whole request
    compute_seconds: float  # the part of it not on the link (server-reported compute, device compute if known)


@dataclass(frozen=True)
class Decision:
    option: Option
    index: int
    predicted_seconds: float
    impossible: bool = False   # even the smallest option's prediction misses the target


@dataclass
class LinkEstimate:
    rtt: float | None          # the fitted base: round trip plus fixed per-request costs
    rate: float | None         # bytes per second; None = no request seen yet
    compute: float


@dataclass
class BudgetController:
    """Options are ordered from the least to the most preferred (e.g. ascending budget)."""

    options: list[Option]
    target_seconds: float
    safety: float = 0.85       # chosen on held-out traces, never the shipped ones (scripts/controller_heldout.py)
    up_margin: float = 0.7
    hold: float = 1.0
    settle: float = 5.0        # seconds without a switch after which a step up needs only `safety`
    window: float = 1.0
    min_points: int = 8
    spread: float = 1.5
    prior_rate: float = 125_000.0      # bytes/s assumed before two sizes were seen (1 Mbit/s)
    refit_after: float = 10.0          # seconds a fit is trusted without a pair of sizes to renew it
    start_index: int = 0
    growth: float = 4.0        # a step up within up_margin sends at most this many times the bytes (>= 1)
    estimator: str = "pairs"   # how the rate is learned: estimators.py ("pairs": only from pairs of sizes)
    # (finished at, bytes, seconds on the link, compute seconds, missed the target) of recent requests
    _obs: collections.deque = field(default_factory=collections.deque, init=False, repr=False)
    _per_byte: float = field(default=0.0, init=False)
    _fitted: float | None = field(default=None, init=False)   # per_byte of the last fit over two sizes
    _fitted_at: float = field(default=-math.inf, init=False)
    _index: int = field(default=0, init=False)
    _last_down: float = field(default=-math.inf, init=False)
    _last_switch: float = field(default=-math.inf, init=False)
    _settle_now: float = field(default=math.inf, init=False)   # `settle`, doubled by each settled step up undone
    _probe_at: float | None = field(default=None, init=False)  # when the settled step up in force was made
    _now: float = field(default=-math.inf, init=False)
    _started: bool = field(default=False, init=False)   # a choice was made with observations
    _delay_blame: tuple[float, float] | None = field(default=None, init=False)  # (base, per_byte) if a miss was delay
    _rate: object = field(default=None, init=False, repr=False)   # the estimator learning from every request
    _rtt: float | None = field(default=None, init=False)   # round trip of the last pair fit, lowered by any request

    def __post_init__(self) -> None:
        if not self.options:
            raise UserError("the budget controller needs at least one option")
        if not (isinstance(self.target_seconds, (int, float)) and math.isfinite(self.target_seconds)
                and self.target_seconds > 0):
            raise UserError(f"the latency target must be a positive number of seconds, got {self.target_seconds!r}")
        if not 0 < self.up_margin <= self.safety <= 1:
            raise UserError("need 0 < up_margin <= safety <= 1")
        if not self.settle > 0:   # also refuses NaN; math.inf turns settled step ups off
            raise UserError(f"settle must be a positive number of seconds (inf: off), got {self.settle!r}")
        if not (isinstance(self.growth, (int, float)) and self.growth >= 1):   # refuses NaN too
            raise UserError(f"growth must be a number >= 1 (1: one option at a time), got {self.growth!r}")
        if not 0 <= self.start_index < len(self.options):
            raise UserError(f"start_index must be in 0..{len(self.options) - 1}")
        self._rate = make_estimator(self.estimator)
        self._index = self.start_index
        self._settle_now = self.settle
        self._per_byte = 1.0 / self.prior_rate

    # ---------------------------------------------------------------- estimation
    def observe(self, obs: Observation) -> None:
        if obs.seconds < 0 or obs.compute_seconds < 0 or obs.bytes_up < 0 or obs.bytes_down < 0:
            raise ValueError(f"an observation cannot be negative: {obs}")
        self._now = max(self._now, obs.at)
        size, network = obs.bytes_up + obs.bytes_down, max(obs.seconds - obs.compute_seconds, 0.0)
        missed = obs.seconds > self.target_seconds
        if missed and self._obs and network + self.estimate().compute <= self.target_seconds:
            missed = False   # with its usual compute time it was in time: a compute stall, not the link's doing
        if missed and self._obs:
            # The link changed under us. Blame the rate (what a smaller option can fix) and forget the
            # requests from before the change, which would otherwise hold the fit for a whole window.
            # One request cannot tell a slower rate from a longer delay (a fade brings both): until a
            # request is in time again, every option is predicted under both explanations, the worse one.
            before = self.estimate()
            self._delay_blame = (network - size * self._per_byte, self._per_byte)
            self._per_byte = max(self._per_byte, (network - before.rtt) / max(size, 1))
            self._obs.clear()
        elif not missed:
            self._delay_blame = None
        if self._rate is not None and self._rtt is not None:
            self._rtt = min(self._rtt, network)   # no request is quicker than the round trip
            self._rate.add(size, network - self._rtt)
        # a missed request is kept out of the slopes: one stall paired with quick requests would be the
        # slope of every pair (and the fitted base) until it leaves the window
        self._obs.append((obs.at, size, network, obs.compute_seconds, missed))
        while len(self._obs) > self.min_points and self._obs[0][0] < self._now - self.window:
            self._obs.popleft()
        points = list(self._obs)
        clean = [p for p in points if not p[4]]
        slopes = [(n2 - n1) / (s2 - s1) for i, (_, s1, n1, _, _) in enumerate(clean)
                  for _, s2, n2, _, _ in clean[i + 1:] if max(s1, s2) >= self.spread * min(s1, s2)]
        if slopes:
            self._per_byte = self._fitted = max(statistics.median(slopes), 1e-12)
            self._fitted_at = self._now
            self._rtt = max(statistics.median(n - s * self._per_byte for _, s, n, _, _ in clean), 0.0)
        elif self._fitted is not None and len(clean) == len(points):
            if self._now - self._fitted_at > self.refit_after:   # an old fit is no better than the prior:
                self._fitted = min(self._fitted, 1.0 / self.prior_rate)   # a noisy pessimistic one must not pin us
            self._per_byte = self._fitted   # the blame of a miss lasts while the miss is in the window
        if missed and self._index > 0:
            self._step_down(obs.at)

    def estimate(self) -> LinkEstimate:
        if not self._obs:
            return LinkEstimate(None, None, 0.0)
        base = statistics.median(p[2] - p[1] * self._seconds_per_byte(p[1]) for p in self._obs)
        compute = statistics.median(p[3] for p in self._obs)
        return LinkEstimate(max(base, 0.0), 1.0 / self._seconds_per_byte(self._obs[-1][1]), compute)

    def _seconds_per_byte(self, size: int) -> float:
        learned = self._rate.per_byte(size) if self._rate is not None else None
        return self._per_byte if learned is None else learned

    def predict(self, option: Option, doubt: bool = True) -> float:
        """Predicted latency; `doubt=False` leaves out the longer-round-trip reading of a recent miss."""
        est = self.estimate()
        if est.rate is None:
            return 0.0
        predicted = est.rtt + est.compute + option.bytes * self._seconds_per_byte(option.bytes)
        if doubt and self._delay_blame is not None:
            base, per_byte = self._delay_blame
            predicted = max(predicted, base + est.compute + option.bytes * per_byte)
        return predicted

    # ---------------------------------------------------------------- choosing
    def _best_fitting(self, limit: float) -> int | None:
        fitting = [i for i, option in enumerate(self.options) if self.predict(option) <= limit]
        return max(fitting) if fitting else None

    def _went_down(self, now: float) -> None:
        if self._probe_at is not None:   # a settled step up undone: retry it only after twice as long
            self._settle_now *= 2
            self._probe_at = None
        self._last_down = self._last_switch = now

    def _step_down(self, now: float) -> None:
        best = self._best_fitting(self.safety * self.target_seconds)
        new = min(self._index - 1, best) if best is not None else 0
        self._index = max(new, 0)
        self._went_down(now)

    def decide(self) -> Decision:
        """The option for the next request."""
        target = self.target_seconds
        if self._obs and not self._started:
            # The first choice with data: when requests of two sizes (e.g. a warm-up of the smallest and
            # the largest option) fitted the link, go straight to the best option within the up margin.
            self._started = True
            best = self._best_fitting(self.up_margin * target) if self._fitted is not None else None
            self._index = max(self._index, best if best is not None else 0)
            self._last_switch = self._now
        before = self._index
        if self._obs:
            current = self.predict(self.options[self._index])
            if self._probe_at is not None and self._now - self._probe_at >= self._settle_now:
                self._probe_at, self._settle_now = None, self.settle   # it held: back to the usual settle time
            settled = self._now - self._last_switch >= self._settle_now
            if current > self.safety * target:
                best = self._best_fitting(self.safety * target)
                self._index = best if best is not None else 0
                if self._index < before:   # staying at the smallest option is no step down
                    self._went_down(self._now)
            elif self._index + 1 < len(self.options) and self._now - self._last_down >= self.hold:
                following = self.predict(self.options[self._index + 1])
                if following <= self.up_margin * target:
                    cap = self.growth * self.options[before].bytes
                    self._index = max([self._index + 1] + [i for i, o in enumerate(self.options)
                                       if o.bytes <= cap and self.predict(o) <= self.up_margin * target])
                elif settled and following <= self.safety * target:
                    self._index += 1
                    self._probe_at = self._now
        if self._index != before:
            self._last_switch = self._now
        option = self.options[self._index]
        predicted = self.predict(option)
        # not on a doubt alone: one miss at a fade's start must not read as a target below the round trip
        impossible = bool(self._obs) and self._index == 0 and self.predict(option, doubt=False) > target
        return Decision(option, self._index, predicted, impossible)


PRECISION_BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}


def option_ladder(budgets: list[int], dtypes: list[str], bytes_for, quality=None,
                  tolerance: float = 0.0) -> list[Option]:
    """The options worth using, least preferred first: each sends more bytes than the one before and is better.

    `bytes_for(budget, dtype) -> (bytes_up, bytes_down)`. `quality(option)` orders options (e.g. validation
    accuracy at that budget and dtype); by default more channels win, then more precision. An option that
    costs more bytes than another without being better (e.g. B=2 fp32 against B=4 int8) is dropped, unless
    its quality's first element (an accuracy) is within `tolerance` of the best kept so far: a validation
    ranking strict to the last image dropped B=256 and left no option between 4.1 and 12.3 KB, where 3G
    rates sit."""
    quality = quality or (lambda o: (o.budget, PRECISION_BITS.get(o.dtype, 0)))
    options = sorted((Option(b, d, *bytes_for(b, d)) for b in budgets for d in dtypes),
                     key=lambda o: (o.bytes, quality(o)))
    kept: list[Option] = []
    best: tuple | None = None
    for option in options:
        q = quality(option)
        if best is not None and q <= quality(kept[-1]) and not (tolerance > 0 and q[0] >= best[0] - tolerance):
            continue
        kept.append(option)
        best = q if best is None or q > best else best
    return kept
