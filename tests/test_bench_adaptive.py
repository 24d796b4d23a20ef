"""`splitprune bench adaptive`'s own logic: the replay of `--budget auto` (adaptive_sim) and the training
verdict (adaptive_train). Torch-free, no clock."""
from splitprune.adaptive.controller import Option
from splitprune.bench.adaptive_sim import Measured, controller_replay, fixed, replay
from splitprune.bench.adaptive_train import accuracy_verdict
from splitprune.transport.trace import LinkTrace

OPTIONS = [Option(1, "int8", 68, 17), Option(256, "int8", 6195, 17), Option(512, "int8", 12336, 17)]


def steady_run(seconds: float = 5.0) -> tuple[LinkTrace, list[Measured]]:
    trace = LinkTrace.from_rows([(0, 10.0, 20.0)], name="steady 10 Mbit/s")
    real = [Measured(t=0.1 * i, residual=0.02, server=0.005, compute=0.025, gap=0.0) for i in range(int(seconds * 10))]
    return trace, real


def test_a_fixed_option_takes_the_modelled_network_time_plus_the_residual():
    trace, real = steady_run(1.0)
    requests = replay(trace, OPTIONS, real, fixed(2), 0.2)
    # 12353 B at 10 Mbit/s ~ 9.9 ms, 2 x 20 ms one way, 5 ms server, 20 ms residual
    assert all(abs(latency - (0.0099 + 0.04 + 0.005 + 0.02)) < 0.002 for *_, latency in requests)


def test_the_replayed_controller_starts_from_its_warm_up_like_the_real_stream():
    # the real stream observes the largest and the smallest option before it counts a request: on a link
    # where every option fits, its first counted request is already the largest
    trace, real = steady_run()
    requests = controller_replay(trace, OPTIONS, real, 0.2)
    assert requests[0][2] == len(OPTIONS) - 1
    assert all(k == len(OPTIONS) - 1 for _, _, k, _ in requests)


def test_the_training_verdict_counts_one_seeds_noise_against_auto():
    # 500 test images: about 1.8 pt standard error per accuracy, counted against auto on both sides
    assert accuracy_verdict(0.776, 0.776, 500).startswith("not resolved")
    assert accuracy_verdict(0.732, 0.776, 500).startswith("fails")       # 4.4 pt below: more than the noise
    assert accuracy_verdict(0.80, 0.76, 500).startswith("holds")
    assert accuracy_verdict(0.75, 0.76, 100_000).startswith("fails")      # a point is resolved on many images
