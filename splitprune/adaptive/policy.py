"""The controller on a clock: per request (`AutoBudget`) and per training step (`StepBudget`). Torch-free.

`BudgetController` itself has no clock; these wrappers stamp each observation with the caller's clock
(`time.perf_counter` by default, a fake one in tests) so the same code runs live and in replays.
"""
from __future__ import annotations

import collections
import math
import time
from typing import Callable, Protocol

from splitprune.adaptive.budgets import ladder
from splitprune.adaptive.controller import (BudgetController, Decision, LinkEstimate, Observation, Option,
                                           option_ladder)

Clock = Callable[[], float]


class AutoBudget:
    """Chooses the option of every request from the requests before it."""

    def __init__(self, options: list[Option], target_seconds: float, clock: Clock = time.perf_counter,
                 **settings) -> None:
        self.controller = BudgetController(options, target_seconds, **settings)
        self.clock = clock

    @property
    def options(self) -> list[Option]:
        return self.controller.options

    @property
    def target_seconds(self) -> float:
        return self.controller.target_seconds

    def choose(self) -> Decision:
        return self.controller.decide()

    def observe(self, bytes_up: int, bytes_down: int, seconds: float, compute_seconds: float = 0.0) -> None:
        self.controller.observe(Observation(self.clock(), bytes_up, bytes_down, seconds, compute_seconds))


class StepBudget(Protocol):
    """Asked by `DeviceWorker.train_step` for the channels of each step and told what the step sent."""

    clock: Clock   # what steps are timed on; the device worker times its round trip on it too

    def next_budget(self, limit: int) -> int:
        """The budget of the next step, at most `limit` (the phase's budget)."""

    def observe(self, bytes_up: int, bytes_down: int, compute_seconds: float) -> None:
        """The step asked for last is done: its TrainRequest and TrainReply sizes, and the part of its time
        that was not on the link (the server's time as its TrainReply reports it, plus the device's own)."""

    def eval_budget(self) -> int | None:
        """The budget the end-of-epoch evaluation uses (None: the phase's budget)."""

    def steps_per_budget(self) -> dict[int, int]:
        """How many steps went at each budget over the whole run (kept in its checkpoint)."""

    def resume(self, steps_per_budget: dict[int, int]) -> None:
        """A resumed run: the steps of its earlier processes, as `steps_per_budget` gave them."""


# The controller's defaults were chosen for inference streams on held-out traces (scripts/controller_heldout.py);
# training steps were not part of that choice and keep the margins they were measured with: with the inference
# ones the fade training bench spread its steps up to B=256 and, evaluated there, ended at 61.8% against 72.8%
# (and no settled step ups: `settle` came after that measurement).
TRAINING_MARGINS = {"safety": 0.8, "up_margin": 0.6, "settle": math.inf}


class AutoStepBudget:
    """`train --budget auto --step-ms T`: the largest budget whose predicted step time meets T.

    The step time is measured from `next_budget` to `observe` on `clock` (the whole step: device compute,
    the round trip, the server's compute, the backward pass); `observe` is told the part of it that was
    compute (the server's time from its TrainReply, plus the device's forward, encoding and backward), so
    the controller fits the link on the rest and a compute stall is not taken for a slower link (a step
    late for its compute alone moves nothing). `bytes_for(budget)` gives the (TrainRequest, TrainReply)
    sizes of a step at that budget; only the budgets of the ladder up to the phase's budget are used, and
    the controller starts afresh when the phase's budget changes. The uplink dtype of a training session is
    fixed by its handshake: only the budget varies."""

    def __init__(self, budgets: list[int], bytes_for: Callable[[int], tuple[int, int]], target_seconds: float,
                 dtype: str, clock: Clock = time.perf_counter, **settings) -> None:
        self.budgets, self.bytes_for, self.target, self.dtype = budgets, bytes_for, target_seconds, dtype
        self.clock, self.settings = clock, {**TRAINING_MARGINS, **settings}
        self._limit: int | None = None
        self._auto: AutoBudget | None = None
        self._started: float | None = None
        self.history: list[tuple[int, float]] = []   # (budget, step seconds) of every observed step
        self.compute: list[float] = []               # the compute seconds of every observed step, as told
        self.impossible_steps = 0
        self._budget = 0
        self._earlier: collections.Counter = collections.Counter()   # steps of a resumed run's earlier processes

    def next_budget(self, limit: int) -> int:
        if limit != self._limit or self._auto is None:
            options = option_ladder(ladder(self.budgets, limit), [self.dtype], lambda b, _: self.bytes_for(b))
            self._auto = AutoBudget(options, self.target, self.clock, **self.settings)
            self._limit = limit
        decision = self._auto.choose()
        self.impossible_steps += decision.impossible
        self._budget = decision.option.budget
        self._started = self.clock()
        return self._budget

    def observe(self, bytes_up: int, bytes_down: int, compute_seconds: float) -> None:
        if self._started is None or self._auto is None:
            raise RuntimeError("observe() before next_budget()")
        seconds = self.clock() - self._started
        self._started = None
        self._auto.observe(bytes_up, bytes_down, seconds, compute_seconds)
        self.history.append((self._budget, seconds))
        self.compute.append(compute_seconds)

    def estimate(self) -> LinkEstimate | None:
        """The link and compute the controller has fitted so far (None before the first phase's first step)."""
        return None if self._auto is None else self._auto.controller.estimate()

    def eval_budget(self) -> int | None:
        """The budget of the most steps so far (ties: the larger): an any-budget model trains the prefixes it
        is sent, so a budget the link allowed only lately has barely trained channels. Measured through the
        looped cellular-fades link: B=64, first sent in the third epoch (27 of its 50 steps), scored 11% at
        the end, while the median budget of each epoch was the rule; B=8, sent in 58 of the 150 steps, is
        what the run trained. A resumed run counts the steps of its earlier processes too."""
        counts = self.steps_per_budget()
        return max(counts, key=lambda b: (counts[b], b)) if counts else None

    def steps_per_budget(self) -> dict[int, int]:
        counts = collections.Counter(self._earlier)
        counts.update(budget for budget, _ in self.history)
        return dict(counts)

    def resume(self, steps_per_budget: dict[int, int]) -> None:
        self._earlier = collections.Counter(steps_per_budget)
