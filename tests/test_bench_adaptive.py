"""`splitprune bench adaptive`'s own logic: the replay of `--budget auto` (adaptive_sim) and the training
verdict (adaptive_train). Torch-free, no clock."""
import pytest

from splitprune.adaptive.controller import Option
from splitprune.adaptive.replay import Measured, Replayed, controller_replay, fixed, reactions, replay
from splitprune.bench.adaptive.training import accuracy_verdict
from splitprune.link.trace import LinkTrace

OPTIONS = [Option(1, "int8", 68, 17), Option(256, "int8", 6195, 17), Option(512, "int8", 12336, 17)]


def steady_run(seconds: float = 5.0) -> tuple[LinkTrace, list[Measured]]:
    trace = LinkTrace.from_rows([(0, 10.0, 20.0)], name="steady 10 Mbit/s")
    real = [Measured(t=0.1 * i, residual=0.02, server=0.005, compute=0.025, gap=0.0) for i in range(int(seconds * 10))]
    return trace, real


def test_a_fixed_option_takes_the_modelled_network_time_plus_the_residual():
    trace, real = steady_run(1.0)
    requests = replay(trace, OPTIONS, real, fixed(2), 0.2)
    # 12353 B at 10 Mbit/s ~ 9.9 ms, 2 x 20 ms one way, 5 ms server, 20 ms residual
    assert all(abs(r.latency - (0.0099 + 0.04 + 0.005 + 0.02)) < 0.002 for r in requests)


def test_the_replayed_controller_starts_from_its_warm_up_like_the_real_stream():
    # the real stream observes the largest and the smallest option before it counts a request: on a link
    # where every option fits, its first counted request is already the largest
    trace, real = steady_run()
    requests = controller_replay(trace, OPTIONS, real, 0.2)
    assert requests[0][2] == len(OPTIONS) - 1
    assert all(r.option == len(OPTIONS) - 1 for r in requests)


def test_reactions_time_each_rate_step_of_2x_from_the_request_that_answers_it():
    # 10 -> 1 Mbit/s at 5 s, 1 -> 1.5 at 8 s (under 2x: no step), 1.5 -> 10 at 10 s; a request every 0.5 s
    trace = LinkTrace.from_rows([(0, 10, 20), (5, 1, 20), (8, 1.5, 20), (10, 10, 20)])
    times = [0.25 + 0.5 * i for i in range(30)]
    chosen = [2 if t < 5 else 0 if t < 11.2 else 2 for t in times]
    latency = [0.3 if t == 5.25 or t == 5.75 else 0.1 for t in times]   # the first two after the fall miss
    best = [2 if t < 5 or t >= 10 else 0 for t in times]
    steps = reactions(trace, [Replayed(i, t, k, lat) for i, (t, k, lat) in enumerate(zip(times, chosen, latency))],
                      best, 0.2)
    assert [(s["at"], s["direction"]) for s in steps] == [(5, "fall"), (10, "rise")]
    assert abs(steps[0]["seconds"] - 1.25) < 1e-9 and steps[0]["late"] == 2     # in time again at 6.25 s
    assert abs(steps[1]["seconds"] - 1.25) < 1e-9 and steps[1]["late"] == 0     # at the oracle's option at 11.25 s


def test_the_training_verdict_counts_one_seeds_noise_against_auto():
    # 500 test images: about 1.8 pt standard error per accuracy, counted against auto on both sides
    assert accuracy_verdict(0.776, 0.776, 500).startswith("not resolved")
    assert accuracy_verdict(0.732, 0.776, 500).startswith("fails")       # 4.4 pt below: more than the noise
    assert accuracy_verdict(0.80, 0.76, 500).startswith("holds")
    assert accuracy_verdict(0.75, 0.76, 100_000).startswith("fails")      # a point is resolved on many images


def test_a_share_of_requests_is_a_wilson_interval_that_does_not_collapse_at_the_edges():
    from splitprune.bench.core.verdict import binomial, verdict
    assert verdict(binomial(1010 / 1019, 1019), 0.99) == "not resolved"   # 99.1 %: one error below is 98.8 %
    assert verdict(binomial(0.995, 1000), 0.99) == "holds"
    assert verdict(binomial(0.98, 1000), 0.99) == "fails"
    none_late = binomial(1.0, 1000)
    assert 0.998 < none_late.low < 1.0 and none_late.high == 1.0
    assert verdict(binomial(1.0, 50), 0.99) == "not resolved"              # 50 on time do not show 99 %


def test_paired_differences_cancel_what_both_got_right_or_wrong():
    import math

    from splitprune.bench.core.verdict import paired

    def differences(a: list[int], b: list[int]) -> list[float]:
        return [float(x - y) for x, y in zip(a, b)]

    # expected values by hand: mean of the differences +- z * sqrt(sum((d - mean)^2) / (n - 1) / n)
    # both right or both wrong on every image: every difference is 0, so the mean and its error are 0
    same = paired(differences([1, 1, 0, 1, 0, 0, 1, 1], [1, 1, 0, 1, 0, 0, 1, 1]))
    assert (same.low, same.high, same.mid, same.spread) == (0.0, 0.0, 0.0, 0.0)
    # a constant difference has no spread either: the interval is that one value
    constant = paired([0.5] * 10)
    assert (constant.low, constant.high) == (0.5, 0.5)
    # one flip in 100 images: mean 0.01; squared deviations 0.99^2 + 99 * 0.01^2 = 0.99,
    # / 99 / 100 = 1e-4, standard error 0.01: [0.00, 0.02]
    one_flip = paired(differences([1] + [0] * 99, [0] * 100))
    assert math.isclose(one_flip.mid, 0.01, abs_tol=1e-12)
    assert math.isclose(one_flip.low, 0.0, abs_tol=1e-12) and math.isclose(one_flip.high, 0.02, abs_tol=1e-12)
    # one flip each way in 5 images: [0, 1, 0, -1, 0], mean 0; squared deviations 2, / 4 / 5 = 0.1
    both_ways = paired(differences([1, 1, 0, 0, 1], [1, 0, 0, 1, 1]))
    assert math.isclose(both_ways.mid, 0.0, abs_tol=1e-12)
    assert math.isclose(both_ways.high, math.sqrt(0.1), rel_tol=1e-12) and both_ways.low == -both_ways.high
    # two flips in 4 images: [1, 1, 0, 0], mean 0.5; squared deviations 4 * 0.25 = 1, / 3 / 4 = 1/12;
    # z = 2 standard errors: 0.5 +- 2 / sqrt(12)
    two = paired([1.0, 1.0, 0.0, 0.0], z=2.0)
    assert math.isclose(two.mid, 0.5, rel_tol=1e-12)
    assert math.isclose(two.low, 0.5 - 2 / math.sqrt(12), rel_tol=1e-12)
    assert math.isclose(two.high, 0.5 + 2 / math.sqrt(12), rel_tol=1e-12)
    # one image: no spread can be estimated; no image: nothing measured
    assert paired([1.0]) == paired([1.0], z=5.0) and (paired([1.0]).low, paired([1.0]).high) == (1.0, 1.0)
    assert paired([]) is None


def _policy(name: str, requests: int, within: float, option_share: dict) -> dict:
    accuracy = {"B=1 int8": 0.80, "B=512 int8": 0.83}
    return {"policy": name, "requests": requests, "share_within_target": within, "option_share": option_share,
            "accuracy": sum(share * accuracy[label] for label, share in option_share.items())}


def test_the_inference_verdict_counts_the_noise_against_auto():
    from splitprune.bench.adaptive.inference import verdict
    # 1,000 test images: B=512 gets right 30 that B=1 gets wrong, and no others
    correct = {"B=1 int8": [True] * 800 + [False] * 200, "B=512 int8": [True] * 830 + [False] * 170}
    auto = _policy("auto (real run)", 1019, 1010 / 1019, {"B=1 int8": 0.5, "B=512 int8": 0.5})
    simulated = [_policy("oracle (knows the trace, simulated)", 1020, 0.992, {"B=1 int8": 0.45, "B=512 int8": 0.55}),
                 _policy("fixed B=1 int8 (simulated)", 1180, 1.0, {"B=1 int8": 1.0}),
                 # misses 99 % by less than the noise: still a rival
                 _policy("fixed B=512 int8 (simulated)", 1000, 0.989, {"B=512 int8": 1.0})]
    v = verdict(auto, simulated, correct)
    assert v["within_99"] == "not resolved"
    assert v["within_half_pt_of_oracle"] == "holds"   # -0.15 pt, +- 0.05 pt
    assert v["best_fixed_meeting_99"] == "fixed B=512 int8 (simulated)"
    assert v["above_best_fixed_meeting_99"] == "fails"   # 1.5 pt below it, well beyond 0.3 pt of noise
    simulated[-1]["share_within_target"] = 0.97   # now it misses 99 % beyond the noise
    v = verdict(auto, simulated, correct)
    assert v["best_fixed_meeting_99"] == "fixed B=1 int8 (simulated)" and v["above_best_fixed_meeting_99"] == "holds"
    same = verdict(_policy("auto (real run)", 1180, 1.0, {"B=1 int8": 1.0}), simulated[:-1], correct)
    assert same["above_best_fixed_meeting_99"] == "tie" and same["within_99"] == "holds"


def test_a_step_never_answered_is_reported_as_never_not_as_infinity():
    import json

    from splitprune.adaptive.replay import reaction_summary
    from splitprune.bench.adaptive.inference import reaction_line

    # 10 -> 0.01 Mbit/s at 1 s: B=512 (12 kB) never fits again, and the run keeps sending it
    trace = LinkTrace.from_rows([(0, 10.0, 20.0), (1, 0.01, 20.0)])
    rows = [{"unix": 100.0 + 0.2 * i, "budget": 512, "dtype": "int8", "latency_ms": 60.0 if i < 5 else 900.0,
             "server_ms": 5.0, "compute_ms": 10.0} for i in range(15)]
    summary = reaction_summary(trace, rows, OPTIONS, 100.0, 0.2)
    assert summary["fall"] == {"count": 1, "median_seconds": None, "max_seconds": None, "within_1s": 0,
                               "unanswered": 1, "late": 10}                # every request from the step on
    json.dumps(summary, allow_nan=False)                                   # valid JSON
    assert "1 falls: 1 never answered, 10 requests late on the way" in reaction_line(summary)


def faded_run() -> tuple[LinkTrace, list[Measured]]:
    """10 Mbit/s with a 0.3 s fade to 0.05 Mbit/s every 3 s (12 kB take 2 s in it, 68 B 11 ms)."""
    rows = [row for c in range(10) for row in ((3 * c, 10.0, 20.0), (3 * c + 2.7, 0.05, 20.0))]
    real = [Measured(t=0.1 * i, residual=0.02, server=0.005, compute=0.025, gap=0.0) for i in range(290)]
    return LinkTrace.from_rows(rows), real


def test_hedged_auto_keeps_the_requests_of_a_deep_fade_in_time():
    from splitprune.adaptive.replay import score
    trace, real = faded_run()
    accuracy = [0.6, 0.8, 0.9]
    plain = score(controller_replay(trace, OPTIONS, real, 0.2), OPTIONS, accuracy, 0.2)
    requests = controller_replay(trace, OPTIONS, real, 0.2, hedge=True)
    hedged = score(requests, OPTIONS, accuracy, 0.2)
    late = {name: round((1 - s["share_within_target"]) * s["requests"]) for name, s in (("plain", plain),
                                                                                        ("hedged", hedged))}
    assert late["plain"] >= 5 and late["hedged"] == 0, late     # each fade catches one large request unhedged
    assert 0 < hedged["hedged_answers"] <= hedged["hedges"]
    assert hedged["hedge_bytes_up"] == hedged["hedges"] * OPTIONS[0].bytes_up
    by_b1 = sum(r.option == 0 or r.hedged for r in requests)   # a hedge answers as B=1, scored so
    assert hedged["option_share"]["B=1 int8"] == pytest.approx(by_b1 / len(requests))
    answered = [accuracy[0 if r.hedged else r.option] for r in requests]
    assert hedged["accuracy"] == pytest.approx(sum(answered) / len(requests))
    assert "hedged_answers" not in plain


def test_an_abandoned_request_still_holds_the_link_until_its_bytes_are_through():
    from splitprune.adaptive.replay import hedged_request
    trace = LinkTrace.from_rows([(0, 0.05, 20.0)])   # 6250 B/s: B=512 (12.3 kB) takes ~2 s to send
    m = Measured(t=0.0, residual=0.02, server=0.005, compute=0.025, gap=0.0)
    latency, hedged, main, moved_on, busy = hedged_request(trace, OPTIONS, 2, 0.0, -1.0, m, 0.2)
    assert hedged and main is None and latency < 0.2 and moved_on == pytest.approx(0.2)
    assert busy == pytest.approx((68 + 12336) / 6250, rel=1e-3)   # the hedge's bytes, then the main's
    # the next request, of the smallest option, waits behind them although the device moved on at 0.2 s
    latency, hedged, main, _, _ = hedged_request(trace, OPTIONS, 0, 0.2, busy, m, 0.2)
    assert not hedged and main == latency > busy - 0.2
