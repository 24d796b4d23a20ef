"""The budget controller on simulated request sequences: deterministic, no wall clock, no sockets."""
from __future__ import annotations

import random

import pytest

from splitprune.adaptive import BudgetController, Observation, Option, option_ladder
from splitprune.adaptive.budgets import budget_quality, model_options
from splitprune.adaptive.policy import AutoStepBudget
from splitprune.errors import UserError
from splitprune.link.trace import LinkTrace

BUDGETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


def wire_bytes(budget: int, dtype: str) -> tuple[int, int]:
    """A 4x4 cut: 16 values per channel, plus ~100 B of message and framing; the reply is small."""
    per_value = {"fp32": 4, "fp16": 2, "int8": 1}[dtype]
    return 100 + 16 * per_value * budget, 40


OPTIONS = option_ladder(BUDGETS, ["fp16"], wire_bytes)


def simulate(trace: LinkTrace, controller: BudgetController, seconds: float, gap: float = 0.05,
             server: float = 0.002, noise: float = 0.001, seed: int = 0) -> list[tuple[float, Option, float]]:
    """Requests one after another (`gap` apart) over the trace's link; returns (start, option, latency)."""
    rng = random.Random(seed)
    t, log = 0.0, []
    while t < seconds:
        option = controller.decide().option
        sent = trace.finish(t, option.bytes_up)                      # uplink serialization
        arrive = sent + trace.delay_at(sent) + server
        back = trace.finish(arrive, option.bytes_down)
        latency = back + trace.delay_at(back) - t + abs(rng.gauss(0, noise))
        controller.observe(Observation(t + latency, option.bytes_up, option.bytes_down, latency, server))
        log.append((t, option, latency))
        t += latency + gap
    return log


def test_ladder_drops_options_that_cost_more_and_carry_less():
    ladder = option_ladder([2, 4], ["fp32", "int8"], wire_bytes)
    assert [o.label() for o in ladder] == ["B=2 int8", "B=4 int8", "B=4 fp32"]   # B=2 fp32 (228 B) > B=4 int8 (164 B)
    assert [o.bytes for o in ladder] == sorted(o.bytes for o in ladder)


def test_a_model_that_measured_its_budgets_is_ranked_by_validation_accuracy():
    table = {"accuracy": {"1": 0.80, "2": 0.79, "4": 0.83, "8": 0.83}}
    ranked = model_options({"budget": 8, "budget_validation": table}, ["fp16", "int8"], wire_bytes)
    # B=2 is a point worse than B=1 on validation data: not worth its bytes; B=8 is as good as B=4 (within
    # the tolerance): kept, so the ladder has no large byte gap
    assert [o.label() for o in ranked] == ["B=1 int8", "B=1 fp16", "B=4 int8", "B=8 int8", "B=4 fp16", "B=8 fp16"]
    strict = option_ladder([1, 2, 4, 8], ["fp16", "int8"], wire_bytes, budget_quality(
        {"budget": 8, "budget_validation": table}, [1, 2, 4, 8]))
    assert [o.label() for o in strict] == ["B=1 int8", "B=1 fp16", "B=4 int8", "B=4 fp16"]
    by_size = model_options({"budget": 8}, ["fp16"], wire_bytes)
    assert [o.budget for o in by_size] == [1, 2, 4, 8]
    # a table that misses an offered budget ranks by size as if there were none
    partial = {"accuracy": {"1": 0.8, "2": 0.9}}
    assert budget_quality({"budget": 8, "budget_validation": partial}, [1, 2, 4, 8]) is None
    assert model_options({"budget": 8, "budget_validation": partial}, ["fp16"], wire_bytes) == by_size
    # a damaged one is refused with one clear message, not quietly ranked by size
    for bad in ({"accuracy": {**table["accuracy"], "4": 1.5}}, {"accuracy": 3}, {"accuracy": {"x": 0.5}}, [0.8], {}):
        with pytest.raises(UserError, match="budget_validation table is damaged"):
            model_options({"budget": 8, "budget_validation": bad}, ["fp16"], wire_bytes)


SAFETY, UP = BudgetController.safety, BudgetController.up_margin   # the defaults: stay within, step up within


def fitting(rate_mbit: float, delay_ms: float, limit: float, server: float = 0.002) -> Option:
    """The largest option whose latency on this link is within `limit` seconds."""
    rtt = 2 * delay_ms / 1000
    return [o for o in OPTIONS if rtt + server + o.bytes / (rate_mbit * 1e6 / 8) <= limit][-1]


def test_steady_link_settles_and_does_not_oscillate():
    trace = LinkTrace.from_rows([(0, 2, 20)])
    controller = BudgetController(OPTIONS, target_seconds=0.1)
    log = simulate(trace, controller, 30, noise=0.002)
    settled = [(t, o, lat) for t, o, lat in log if t > 2 + BudgetController.settle]
    assert len({o.budget for _, o, _ in settled}) == 1                 # one choice, held to the end
    chosen = settled[0][1]
    assert fitting(2, 20, UP * 0.1).budget <= chosen.budget <= fitting(2, 20, SAFETY * 0.1).budget
    assert all(lat <= 0.1 for _, _, lat in settled)


def test_a_settled_choice_steps_up_to_what_fits_within_safety_not_only_the_up_margin():
    """At 1.8 Mbit/s B=256 takes about 75 ms of a 100 ms target: above the up margin (70 ms), within the
    stay limit (85 ms). After `settle` seconds without a switch the controller takes it; with settling off
    (`settle=inf`, what training steps use) it stays one option below for good."""
    trace = LinkTrace.from_rows([(0, 1.8, 20)])
    assert fitting(1.8, 20, UP * 0.1).budget == 128 and fitting(1.8, 20, SAFETY * 0.1).budget == 256
    chosen = {}
    for settle in (BudgetController.settle, float("inf")):
        log = simulate(trace, BudgetController(OPTIONS, target_seconds=0.1, settle=settle), 30, noise=0.002)
        chosen[settle] = [(t, o.budget) for t, o, lat in log]
        assert all(lat <= 0.1 for *_, lat in log)
    up = min(t for t, b in chosen[BudgetController.settle] if b == 256)
    assert up < 2 + BudgetController.settle and {b for t, b in chosen[BudgetController.settle] if t > up} == {256}
    assert {b for t, b in chosen[float("inf")] if t > 5} == {128}


def test_a_settled_step_up_that_is_undone_waits_twice_as_long_before_the_next():
    trace = LinkTrace.from_rows([(0, 1.8, 20)])
    controller = BudgetController(OPTIONS, target_seconds=0.1)
    log = simulate(trace, controller, 2 + BudgetController.settle, noise=0.002)
    assert log[-1][1].budget == 256                                    # the settled step up (previous test)
    o, end = log[-1][1], log[-1][0] + log[-1][2]
    controller.observe(Observation(end + 0.2, o.bytes_up, o.bytes_down, 0.15, 0.002))   # one late request
    assert controller.decide().option.budget < 256
    again, t = None, end + 0.3
    while again is None and t < end + 4 * BudgetController.settle:
        option = controller.decide().option
        if option.budget == 256:
            again = t
        latency = 0.04 + 0.002 + option.bytes / trace.rate_at(t)
        controller.observe(Observation(t + latency, option.bytes_up, option.bytes_down, latency, 0.002))
        t += latency + 0.05
    assert again is not None and again - end >= 2 * BudgetController.settle


def test_step_down_is_followed_within_one_second():
    trace = LinkTrace.from_rows([(0, 20, 20), (20, 1, 20)])
    controller = BudgetController(OPTIONS, target_seconds=0.1)
    log = simulate(trace, controller, 40)
    before = [o.budget for t, o, _ in log if 15 < t < 20]
    after = [(t, o, lat) for t, o, lat in log if t >= 21]
    assert min(before) == 512                                          # 20 Mbit/s carries everything in time
    assert all(lat <= 0.1 for _, _, lat in after)                      # no miss a second after the drop
    assert max(o.budget for _, o, _ in after) <= fitting(1, 20, SAFETY * 0.1).budget
    misses = [t for t, _, lat in log if lat > 0.1]
    assert misses and all(19.5 <= t < 21 for t in misses)              # only right at the change


def test_a_fade_is_followed_down_and_back_up():
    trace = LinkTrace.from_rows([(0, 10, 20), (10, 0.2, 40), (12, 10, 20)])
    controller = BudgetController(OPTIONS, target_seconds=0.15)
    log = simulate(trace, controller, 25)
    first_miss = min(t for t, _, lat in log if lat > 0.15)
    settled_in_fade = [(o, lat) for t, o, lat in log if first_miss + 1.0 <= t < 12]
    assert settled_in_fade and all(lat <= 0.15 for _, lat in settled_in_fade)
    assert max(o.budget for o, _ in settled_in_fade) <= fitting(0.2, 40, SAFETY * 0.15).budget
    recovered = [o.budget for t, o, _ in log if t > 13]
    assert min(recovered) == 512                                       # back up within a second of the fade's end


def test_after_a_fade_too_deep_for_every_option_it_climbs_back_in_jumps():
    """A fade so deep that even B=1 misses (the hold must not restart while nothing can step down), then
    the link returns: the climb goes up in jumps of at most `growth` times the bytes, so it is back at the
    largest option within 1.5 s of the fade's end; one option at a time takes longer."""
    trace = LinkTrace.from_rows([(0, 10, 20), (10, 0.05, 80), (12, 10, 20)])
    back = {}
    for growth in (1.0, 4.0):
        log = simulate(trace, BudgetController(OPTIONS, target_seconds=0.15, growth=growth), 16)
        back[growth] = min(t for t, o, _ in log if t > 12 and o.budget == 512)
        climb = [OPTIONS.index(o) for t, o, _ in log if 12 < t <= back[growth]]
        assert all(b == a + 1 or OPTIONS[b].bytes <= growth * OPTIONS[a].bytes for a, b in zip(climb, climb[1:]))
        assert all(b >= a for a, b in zip(climb, climb[1:]))
        assert all(lat <= 0.15 for t, _, lat in log if t > 12.1)
    assert back[4.0] < 13.5 < back[1.0]


def test_a_fade_that_also_adds_delay_costs_one_miss_not_a_cascade():
    """A fade cuts the rate 50x and doubles the round trip at once. The request in flight misses; what it
    says fits a slower rate or a longer delay, so the next choice must fit both, and nothing misses again."""
    trace = LinkTrace.from_rows([(0, 10, 20), (10, 0.2, 80), (14, 10, 20)])
    controller = BudgetController(OPTIONS, target_seconds=0.25)
    log = simulate(trace, controller, 20, server=0.03)
    misses = [t for t, _, lat in log if lat > 0.25]
    assert len(misses) == 1 and 10 <= misses[0] < 10.2
    assert [o.budget for t, o, _ in log if t > misses[0]][0] == 1
    # the smallest option right after the miss is a precaution, not a target below the round trip
    trace = LinkTrace.from_rows([(0, 10, 20), (10, 0.2, 80)])
    controller = BudgetController(OPTIONS, target_seconds=0.25)
    simulate(trace, controller, 10.2, server=0.03)
    decision = controller.decide()
    assert decision.index == 0 and decision.predicted_seconds > 0.25 and not decision.impossible


def test_impossible_target_uses_the_smallest_option_and_says_so():
    trace = LinkTrace.from_rows([(0, 10, 40)])                         # 80 ms round trip
    controller = BudgetController(OPTIONS, target_seconds=0.05)
    simulate(trace, controller, 3)
    decision = controller.decide()
    assert decision.index == 0 and decision.option.budget == 1
    assert decision.impossible


def test_no_observation_means_the_start_option():
    controller = BudgetController(OPTIONS, target_seconds=0.1, start_index=3)
    decision = controller.decide()
    assert decision.index == 3 and not decision.impossible


def test_a_miss_steps_down_at_once():
    controller = BudgetController(OPTIONS, target_seconds=0.1, start_index=5)
    o = OPTIONS[5]
    controller.observe(Observation(1.0, o.bytes_up, o.bytes_down, 0.3, 0.001))
    assert controller.decide().index < 5


@pytest.mark.parametrize("kwargs", [dict(target_seconds=0), dict(target_seconds=-1),
                                    dict(target_seconds=float("nan")), dict(target_seconds=0.1, start_index=99),
                                    dict(target_seconds=0.1, up_margin=0.9, safety=0.8),
                                    dict(target_seconds=0.1, settle=0), dict(target_seconds=0.1, settle=-1.0),
                                    dict(target_seconds=0.1, settle=float("nan")),
                                    dict(target_seconds=0.1, growth=0.5), dict(target_seconds=0.1, growth=float("nan"))])
def test_bad_settings_are_user_errors(kwargs):
    with pytest.raises(UserError):
        BudgetController(OPTIONS, **kwargs)


def test_no_options_is_a_user_error():
    with pytest.raises(UserError):
        BudgetController([], target_seconds=0.1)


def test_a_one_off_stall_is_forgotten_and_a_lasting_slowdown_is_not():
    """A single request 300 ms late (a busy CPU) steps down, then the choice returns (within the up margin in
    ~2 s, to the settled choice after `settle` more); the same controller after a real rate drop stays down
    (a window of one size keeps the fitted round trip)."""
    trace = LinkTrace.from_rows([(0, 2, 20)])
    controller = BudgetController(OPTIONS, target_seconds=0.1)
    t, log, stalled, stall = 0.0, [], False, 3 + 2 * BudgetController.settle   # the settled step up has held
    while t < stall + 4 + BudgetController.settle:
        option = controller.decide().option
        latency = 0.04 + 0.002 + option.bytes / trace.rate_at(t)
        if t >= stall and not stalled:   # the first request from `stall` s on
            latency, stalled = latency + 0.3, True
        controller.observe(Observation(t + latency, option.bytes_up, option.bytes_down, latency, 0.002))
        log.append((t, option.budget, latency))
        t += latency + 0.05
    settled = {b for s, b, _ in log if stall - 2 < s < stall}
    assert len(settled) == 1
    assert [b for s, b, _ in log if stall < s < stall + 0.6][-1] < min(settled)    # stepped down after the stall
    assert {b for s, b, _ in log if s > stall + 3.5 + BudgetController.settle} == settled   # and came back
    assert sum(lat > 0.1 for *_, lat in log) == 1

    before = controller.decide().index
    o = OPTIONS[before]
    controller.observe(Observation(t + 1.0, o.bytes_up, o.bytes_down, 0.9, 0.85))    # a compute stall
    assert controller.decide().index == before                                      # is not the link's

    slow = LinkTrace.from_rows([(0, 2, 20), (6, 0.2, 20)])
    controller = BudgetController(OPTIONS, target_seconds=0.1)
    log = simulate(slow, controller, 12)
    assert max(o.budget for s, o, _ in log if s > 7) <= fitting(0.2, 20, SAFETY * 0.1).budget



def test_a_training_step_budget_fits_the_link_without_the_steps_compute():
    """AutoStepBudget on a simulated clock: every step computes 80 ms (most of the step), then its messages
    cross a 5 ms, 1 MB/s link; one step stalls 300 ms in compute. Told each step's compute (what the server
    reports plus the device's own), the controller fits the link alone, climbs to B=16 and keeps it through
    the stall; told none (the whole step taken for the link), the stall sends it down for good."""
    def run(told: bool) -> tuple[list[int], AutoStepBudget]:
        now = [0.0]
        auto = AutoStepBudget([1, 2, 4, 8, 16], lambda b: (1000 * b, 1000 * b), 0.2, "fp16", clock=lambda: now[0])
        chosen = []
        for step in range(14):
            budget = auto.next_budget(16)
            up, down = auto.bytes_for(budget)
            compute = 0.3 if step == 8 else 0.08
            now[0] += compute + 0.005 + (up + down) / 1e6
            auto.observe(up, down, compute if told else 0.0)
            chosen.append(budget)
        return chosen, auto

    chosen, auto = run(told=True)
    assert chosen[3:] == [16] * 11             # 117 ms a step at B=16, within the up margin of 200 ms
    link = auto.estimate()
    assert link.rtt == pytest.approx(0.005) and link.rate == pytest.approx(1e6) and link.compute == 0.08
    assert auto.compute == [0.08] * 8 + [0.3] + [0.08] * 5
    chosen, auto = run(told=False)
    assert chosen[3:9] == [16] * 6 and chosen[9:] == [1] * 5
    assert auto.estimate().rate < 2e5         # the stall, taken for the link, made it look five times slower


def test_a_longer_delay_is_not_taken_for_a_slower_rate():
    """The round trip grows by 80 ms at the same rate (a cellular fade's queueing): the choice settles where
    the new link allows, it does not collapse to the smallest option."""
    trace = LinkTrace.from_rows([(0, 2, 20), (6, 2, 60)])
    controller = BudgetController(OPTIONS, target_seconds=0.3)
    log = simulate(trace, controller, 16, noise=0.002)
    settled = [o.budget for t, o, _ in log if t > 9]
    assert fitting(2, 60, UP * 0.3).budget <= min(settled) and max(settled) <= fitting(2, 60, SAFETY * 0.3).budget


def test_a_wild_fit_from_two_sizes_does_not_pin_the_choice():
    """A fit from one noisy pair says 3 ms per byte; the options near the smallest are too alike in size to
    correct it. After `refit_after` seconds the fit is relaxed to the prior and the controller climbs."""
    controller = BudgetController(OPTIONS, target_seconds=0.5)
    small, other = OPTIONS[0], OPTIONS[2]
    controller.observe(Observation(0.05, small.bytes_up, small.bytes_down, 0.05, 0.0))
    controller.observe(Observation(0.4, other.bytes_up, other.bytes_down, 0.35, 0.0))
    t, chosen = 0.5, []
    while t < 15:
        option = controller.decide().option
        latency = 0.05 + option.bytes / 1e6                     # the real link: 50 ms, 1 MB/s
        controller.observe(Observation(t + latency, option.bytes_up, option.bytes_down, latency, 0.0))
        chosen.append((t, option.budget))
        t += latency + 0.05
    assert max(b for s, b in chosen if s < 9) <= 2                      # pinned by the wild fit for a while
    assert max(b for s, b in chosen if s > 12) >= 64                     # then it climbs


def feed(controller: BudgetController, start: float, seconds: float, sizes: list[int], rate: float,
         rtt: float = 0.08, gap: float = 0.05) -> float:
    """Requests of `sizes` in turn over a link of `rate` bytes/s and round trip `rtt`; returns the clock after."""
    t, i = start, 0
    while t < start + seconds:
        size = sizes[i % len(sizes)]
        latency = rtt + size / rate
        t += latency
        controller.observe(Observation(t, size - 40, 40, latency, 0.0))
        t += gap
        i += 1
    return t


@pytest.mark.parametrize("estimator", ["harmonic", "sized"])
def test_an_estimator_that_learns_from_every_request_follows_a_rise_at_one_size(estimator):
    # sizes differ 1.5x or more only in the first 2 s; then one size while the rate rises 4x
    learning = BudgetController(OPTIONS, target_seconds=1.0, estimator=estimator)
    frozen = BudgetController(OPTIONS, target_seconds=1.0, estimator="pairs")
    for controller in (learning, frozen):
        t = feed(controller, 0.0, 2.0, [2_000, 20_000], rate=125_000)
        t = feed(controller, t, 2.0, [20_000], rate=125_000)
        assert controller.estimate().rate == pytest.approx(125_000, rel=0.1)
        feed(controller, t, 3.0, [20_000], rate=500_000)
    assert frozen.estimate().rate == pytest.approx(125_000, rel=0.1)       # the last pair's fit, frozen
    assert learning.estimate().rate > 2.5 * 125_000                        # the rise, learnt at one size
    big = Option(512, "fp16", 100_000, 40)
    assert learning.predict(big) < frozen.predict(big) * 0.5


def test_estimators_ignore_requests_too_small_for_their_transfer_to_show():
    from splitprune.adaptive.estimators import HarmonicRate, SizedRate
    for estimator in (HarmonicRate(), SizedRate()):
        estimator.add(70, 0.0005)                  # jitter, not a transfer
        assert estimator.per_byte(70) is None
        estimator.add(10_000, 0.08)                # 125 kB/s
        assert estimator.per_byte(10_000) == pytest.approx(8e-6)
    sized = SizedRate()
    for _ in range(5):
        sized.add(1_000, 0.004)                    # small messages: fixed costs read as a slow rate
        sized.add(100_000, 0.1)                    # large ones: the rate (1 MB/s)
    assert sized.per_byte(100_000) == pytest.approx(1e-6)   # a large one is predicted from large ones
    harmonic = HarmonicRate()
    harmonic.add(10_000, 0.01)
    harmonic.add(10_000, 0.04)                     # a surprise: 4x the predicted time
    # harmonic mean of 1 MB/s and 0.25 MB/s is 0.4 MB/s; the second came 0.75 slower than predicted: x 1.75
    assert harmonic.per_byte(10_000) == pytest.approx(1.75 * 2.5e-6)


def test_an_unknown_estimator_is_a_user_error():
    with pytest.raises(UserError, match="rate estimator"):
        BudgetController(OPTIONS, target_seconds=0.1, estimator="magic")
