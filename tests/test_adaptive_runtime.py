"""`--budget auto` end to end: infer over a real `splitprune link --trace` proxy against a real server, the
impossible-target warning, and the per-step budget of a training run on a simulated clock."""
from __future__ import annotations

import json

import pytest

from splitprune.adaptive.budgets import ladder, model_budgets, uplink_dtypes
from splitprune.adaptive.policy import AutoStepBudget
from splitprune.bench.adaptive.inference import start_link, trace_started
from splitprune.cli import main
from splitprune.config import make_config
from splitprune.errors import UserError
from splitprune.proto import pb
from splitprune.server.app import start_app
from splitprune.server.config import ServeConfig
from splitprune.training.setup import LocalEndpoint, build_run
from splitprune.training.trainer import Trainer

STEP_AT = 5.0     # seconds into the trace: 20 Mbit/s -> 0.02 Mbit/s


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny ca model with budget 64 (so the options span ~70 B to ~2.2 kB) and a server hosting it."""
    run = tmp_path_factory.mktemp("auto") / "run"
    assert main(["train", "--method", "ca", "--budget", "64", "--epochs", "1", "--train-subset", "32",
                 "--test-subset", "16", "--threads", "1", "--quiet", "--out", str(run)]) == 0
    handle = start_app(ServeConfig(listen="127.0.0.1:0", model=(str(run),)))
    yield run, handle
    handle.stop(grace=0.5)


def test_budgets_come_from_the_model():
    assert model_budgets({"budget": 4}) == [1, 2, 3, 4]
    assert model_budgets({"budgets": {"8": {}, "2": {}}, "budget": 99}) == [2, 8]    # an export manifest
    assert ladder(list(range(1, 513))) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert ladder(list(range(1, 49)), limit=24) == [1, 2, 4, 8, 16, 24]
    assert uplink_dtypes(None, "fp16") == ["fp16", "int8"] and uplink_dtypes(None, "int4") == ["int4"]
    with pytest.raises(UserError, match="dtypes-up"):
        uplink_dtypes("fp16,int3", "fp16")


def test_infer_auto_steps_down_when_the_link_does(model, tmp_path, capsys):
    run, server = model
    trace = tmp_path / "step.csv"
    trace.write_text(f"seconds,rate_mbit,delay_ms\n0,20,5\n{STEP_AT},0.02,5\n")
    link, address = start_link(server.address, str(trace))   # `splitprune link --trace FILE --trace-on-connect`
    try:
        log, out = tmp_path / "log.json", tmp_path / "out.json"
        rc = main(["infer", "--server", address, "--checkpoint", str(run), "--budget", "auto", "--latency-ms", "250",
                   "--duration", str(STEP_AT + 3.0), "--every", "0", "--log", str(log), "--out", str(out),
                   "--warmup", "3", "--no-stream"])   # unary: the options are sized as Infer calls
        # the 2nd and 3rd warm-up requests (largest, smallest option) fit the link: no climb needed
        trace_start = trace_started(link)   # its clock started at the first connection
    finally:
        link.terminate()
        link.wait(10)
    text = capsys.readouterr().out
    assert rc == 0
    doc, summary = json.loads(log.read_text()), json.loads(out.read_text())
    rows = doc["rows"]
    before = [r["budget"] for r in rows if r["unix"] - trace_start < STEP_AT - 0.3]
    after = [r["budget"] for r in rows if r["unix"] - trace_start > STEP_AT + 1.0]
    assert before and after, (len(before), len(after))
    assert max(before) == 64, before              # on the fast link it sends the whole model
    assert max(after) <= 16 and after[-1] <= 8, after    # on the slow one (2.5 kB/s) only <= 8 channels fit
    assert summary["requests"] == len(rows) == sum(summary["options_used"].values())
    assert summary["within_target"] == sum(r["within"] for r in rows)
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in rows)
    sized = {(o["budget"], o["dtype"]): o["bytes_up"] for o in doc["options"]}
    assert all(abs(r["bytes_up"] - sized[r["budget"], r["dtype"]]) <= 2 for r in rows)   # request ids grow
    assert f"{summary['requests']} requests" in text and "warning" not in text


def test_impossible_target_warns_once_and_sends_the_smallest(model, tmp_path, capsys):
    run, server = model
    log = tmp_path / "log.json"
    rc = main(["infer", "--server", server.address, "--checkpoint", str(run), "--budget", "auto",
               "--latency-ms", "0.01", "--test-subset", "6", "--warmup", "1", "--log", str(log)])
    text = capsys.readouterr().out
    assert rc == 0
    assert text.count("warning: the latency target 0.01 ms is below what this link allows") == 1
    rows = json.loads(log.read_text())["rows"]
    smallest = json.loads(log.read_text())["options"][0]
    assert len(rows) == 6 and all((r["budget"], r["dtype"]) == (smallest["budget"], smallest["dtype"]) for r in rows)
    assert all(r["impossible"] for r in rows[1:])
    assert main(["infer", "--server", server.address, "--checkpoint", str(run), "--latency-ms", "5"]) == 2
    assert "--latency-ms goes with --budget auto" in capsys.readouterr().err


def test_on_a_stream_the_options_are_sized_as_the_items_that_travel(model, tmp_path):
    run, server = model
    log = tmp_path / "log.json"
    assert main(["infer", "--server", server.address, "--checkpoint", str(run), "--budget", "auto",
                 "--latency-ms", "500", "--test-subset", "8", "--warmup", "3", "--log", str(log)]) == 0
    doc = json.loads(log.read_text())
    sized = {(o["budget"], o["dtype"]): (o["bytes_up"], o["bytes_down"]) for o in doc["options"]}
    for r in doc["rows"]:
        up, down = sized[r["budget"], r["dtype"]]
        assert r["bytes_up"] == up and abs(r["bytes_down"] - down) <= 1, (r, up, down)   # server_us's varint
    smallest = doc["options"][0]
    assert smallest["bytes_up"] < 40   # an item: no fingerprint, budget or tensor header (an Infer call: ~100 B)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SimulatedLink:
    """The in-process link, taking simulated time on `clock`: the server's `server_s` (which its reply then
    reports), then 10 ms + bytes / rate, the rate dropping 100x after step `drop`. It records the channels
    each TrainRequest carried."""

    def __init__(self, inner, clock: Clock, drop: int, server_s: float = 0.002) -> None:
        self.inner, self.clock, self.drop, self.server_s = inner, clock, drop, server_s
        self.sent: list[int] = []

    def train(self, request: bytes) -> bytes:
        msg = pb.TrainRequest.FromString(request)
        self.sent.append(len(msg.activations.channels) // 2)
        reply = pb.TrainReply.FromString(self.inner.train(request))
        assert reply.server_us > 0   # the real server's time, replaced by the simulated one
        reply.server_us = round(self.server_s * 1e6)
        reply = reply.SerializeToString()
        rate = 10e6 if len(self.sent) <= self.drop else 1e5
        self.clock.now += self.server_s + 0.010 + (len(request) + len(reply)) / rate
        return reply

    def evaluate(self, request: bytes) -> bytes:
        return self.inner.evaluate(request)

    def start_phase(self, request: bytes) -> bytes:
        return self.inner.start_phase(request)

    def calibrate(self, request: bytes) -> bytes:
        return self.inner.calibrate(request)


AUTO_TRAINING = {"model": "vgg11_bn_compact", "split": "conv5", "dataset": "fashion-mnist", "train_subset": 80,
                 "test_subset": 8, "batch_size": 8, "test_batch_size": 8, "threads": 1, "method": "ca", "budget": 16}


def test_step_budget_follows_the_link_in_training(tmp_path):
    from splitprune.client.auto import step_budget

    cfg = make_config({**AUTO_TRAINING, "epochs": 1})
    parts = build_run(cfg)
    endpoint = LocalEndpoint(parts.server_worker)
    clock = Clock()
    endpoint.link = SimulatedLink(endpoint.link, clock, drop=5)
    auto = step_budget(parts, 50, clock=clock)
    assert isinstance(auto, AutoStepBudget)
    Trainer(cfg, tmp_path / "run", endpoint=endpoint, parts=parts, show_progress=False, checkpoints=False,
            step_budget=auto).run()
    chosen = [b for b, _ in auto.history]
    assert endpoint.link.sent == chosen                       # what was chosen is what travelled
    # climbs the ladder on the fast link in jumps of at most 4x the bytes (1, 2, 8, 16: with the server's 2 ms
    # the jump to 4 is predicted just over the up margin), steps down at once after the drop (to the smallest:
    # one slow step cannot tell a slower rate from a longer round trip)
    assert chosen == [1, 2, 8, 16, 16, 16, 1, 1, 1, 1]
    # the server's time from each reply reached the controller (the device's own compute takes no simulated time)
    assert auto.compute == [pytest.approx(0.002, abs=1e-9)] * 10
    assert auto.eval_budget() == 1        # evaluated at what the run trained most
    seconds = [s for _, s in auto.history]
    assert max(seconds[:5]) < 0.05 < seconds[5] and max(seconds[6:]) < 0.05   # one slow step, then on target


def test_a_training_reply_claiming_more_server_time_than_the_round_trip_stops_the_run(tmp_path):
    cfg = make_config({**AUTO_TRAINING, "epochs": 1})
    parts = build_run(cfg)
    endpoint = LocalEndpoint(parts.server_worker)
    # it claims 10 s; without a step budget the device times the round trip on its own (real) clock
    endpoint.link = SimulatedLink(endpoint.link, Clock(), drop=100, server_s=10.0)
    with pytest.raises(UserError, match="training step failed: bad server time in the TrainReply: 10000.000 ms, "
                                        "longer than the .* ms the device waited for it"):
        Trainer(cfg, tmp_path / "run", endpoint=endpoint, parts=parts, show_progress=False, checkpoints=False).run()
    assert len(endpoint.link.sent) == 1


def test_train_auto_flags_go_together(tmp_path, capsys):
    assert main(["train", "--budget", "auto", "--out", str(tmp_path / "a")]) == 2
    assert "--budget auto needs a --step-ms target" in capsys.readouterr().err
    assert main(["train", "--step-ms", "100", "--out", str(tmp_path / "b")]) == 2
    assert "--step-ms goes with --budget auto" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_resumed_auto_run_counts_the_steps_before_the_resume(tmp_path, monkeypatch):
    from collections import Counter

    from splitprune.client.auto import step_budget

    cfg = make_config({**AUTO_TRAINING, "epochs": 2})

    def trainer(drop: int) -> tuple[Trainer, AutoStepBudget]:
        parts = build_run(cfg)
        endpoint = LocalEndpoint(parts.server_worker)
        clock = Clock()
        endpoint.link = SimulatedLink(endpoint.link, clock, drop=drop)
        auto = step_budget(parts, 50, clock=clock)
        return Trainer(cfg, tmp_path / "run", endpoint=endpoint, parts=parts, show_progress=False,
                       step_budget=auto), auto

    original = Trainer._run_epoch

    def crash_in_the_second_epoch(self, phase):
        if self.progress.epoch == 1:
            raise KeyboardInterrupt
        return original(self, phase)

    monkeypatch.setattr(Trainer, "_run_epoch", crash_in_the_second_epoch)
    first, first_auto = trainer(drop=100)       # a fast link: climbs to 16 and stays
    with pytest.raises(KeyboardInterrupt):
        first.run()
    before = Counter(b for b, _ in first_auto.history)
    assert before[16] == 7                      # 1, 2, 8, then 16 for the other 7 of 10 steps
    monkeypatch.setattr(Trainer, "_run_epoch", original)
    second, second_auto = trainer(drop=0)       # a slow one after the resume: B=1
    second.run()
    after = Counter(b for b, _ in second_auto.history)
    assert sum(after.values()) == 10 and after[16] < 7
    assert second_auto.steps_per_budget() == dict(before + after)
    assert second_auto.eval_budget() == max(before + after, key=lambda b: ((before + after)[b], b))


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
def test_a_hedge_answers_when_the_main_request_is_late_and_the_stream_moves_on(model, tmp_path, capsys, stream):
    """--hedge over a real link that falls from 20 to 0.02 Mbit/s: the first large request after the fall
    (2.2 kB: ~0.9 s) is abandoned at the deadline, the hedge sent before it (~70 B) answers in time."""
    run, server = model
    step = 2.0
    trace = tmp_path / "fall.csv"
    trace.write_text(f"seconds,rate_mbit,delay_ms\n0,20,5\n{step},0.02,5\n")
    link, address = start_link(server.address, str(trace))
    try:
        log, out = tmp_path / "log.json", tmp_path / "out.json"
        rc = main(["infer", "--server", address, "--checkpoint", str(run), "--budget", "auto", "--latency-ms", "250",
                   "--duration", str(step + 2.0), "--every", "0", "--log", str(log), "--out", str(out), "--warmup",
                   "3", "--hedge", *([] if stream else ["--no-stream"])])
        trace_start = trace_started(link)
    finally:
        link.terminate()
        link.wait(10)
    text = capsys.readouterr().out
    assert rc == 0, text
    doc, summary = json.loads(log.read_text()), json.loads(out.read_text())
    rows, smallest = doc["rows"], doc["options"][0]
    hedged = [r for r in rows if r["hedged"]]
    # on the fast link the main answers come in time (a loaded CI machine may still miss one: not asserted);
    # the fall makes the first large request after it late, and its hedge answers
    after = [r for r in hedged if r["unix"] - trace_start > step - 0.3]
    assert after, [r["unix"] - trace_start for r in hedged]
    first = after[0]
    assert first["budget"] > smallest["budget"], first
    if stream:   # items on one stream travel in the order sent: the hedge's bytes go first
        assert first["within"] and first["latency_ms"] <= 250, first
    else:   # two unary calls on one connection: gRPC may write some of the main's DATA before the hedge's (seen
        # under load: 431 ms), but the hedge still answers before the main request could (2.2 kB: ~0.9 s)
        assert first["latency_ms"] < 800, first
    assert first["bytes_down"] == 0   # the main answer was abandoned (cancelled, or read and dropped later)
    alone = [r["bytes_up"] for r in rows if (r["budget"], r["dtype"]) == (smallest["budget"], smallest["dtype"])]
    assert alone   # after the fall the smallest option goes alone: that is what a hedge sends
    for r in rows:   # every request above the smallest option sent a hedge, of that size (request ids grow)
        big = (r["budget"], r["dtype"]) != (smallest["budget"], smallest["dtype"])
        assert (r["hedge_bytes_up"] > 0) == big and (not big or abs(r["hedge_bytes_up"] - min(alone)) <= 2)
    assert summary["hedged_answers"] == len(hedged)
    assert summary["hedge_bytes_up"] == sum(r["hedge_bytes_up"] for r in rows)
    assert summary["within_target"] == sum(r["within"] for r in rows)
    assert "hedges:" in text
