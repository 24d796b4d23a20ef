"""Any-budget models: the prefix wire format, the nested-prefix objective, one model at every budget, over
the network bit for bit as in-process, and `--from` a gated model (the cut reordered, the function kept)."""

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from support import assert_remote_equals_local, sandwich_step
from splitprune.adaptive.budgets import budget_quality
from splitprune.bench.adaptive.accuracy import accuracy_at_budgets, compare
from splitprune.cli import main
from splitprune.compression import ChannelCodec, encode_labels, keep_channels
from splitprune.compression.rungs import ladder, rung
from splitprune.compression.budget import channel_mask
from splitprune.compression.codec import Decoded
from splitprune.config import make_config, resolve_schedule
from splitprune.data import make_loaders, validation_loader
from splitprune.errors import ProtocolError, UserError
from splitprune.export import load_workers
from splitprune.proto import pb
from splitprune.training.checkpoint import load_module, read_meta, read_tensors
from splitprune.training.objectives import NestedPrefixes, prefix_input
from splitprune.training.rng import RngStream
from splitprune.training.server_worker import ServerWorker
from splitprune.training.setup import build_workers, load_pretrained
from splitprune.training.trainer import Trainer
from splitprune.wire.codec import WIRE_DTYPES, encode_values, kept_count
from splitprune.wire.entropy import EC_DTYPES
from splitprune.wire.refusals import BadTensor, BudgetExceeded

SMALL = dict(model="vgg11_bn_compact", dataset="fashion-mnist", train_subset=32, test_subset=32, batch_size=16,
             test_batch_size=32, threads=1, seed=0)


def _values(n=3, k=5, seed=0):
    return torch.rand(n, k, 4, 4, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the wire
@pytest.mark.parametrize("dtype", [d for d in WIRE_DTYPES if d not in EC_DTYPES])  # ec*: tests/test_entropy.py
def test_prefix_round_trip_is_byte_identical_in_both_codecs_and_names_no_index(dtype):
    values = _values()
    torch_bytes = ChannelCodec(dtype).compress(values, torch.arange(5), 512, prefix=True).SerializeToString()
    numpy_bytes = encode_values(values.numpy(), np.arange(5), 512, WIRE_DTYPES[dtype], prefix=True).SerializeToString()
    assert torch_bytes == numpy_bytes
    assert encode_values(values.numpy(), None, 512, WIRE_DTYPES[dtype], prefix=True).SerializeToString() == numpy_bytes
    msg = pb.EncodedTensor.FromString(torch_bytes)
    assert msg.prefix == 5 and msg.channels == b"" and kept_count(msg) == 5
    indexed = ChannelCodec(dtype).compress(values, torch.arange(5), 512).SerializeToString()  # gated: indices
    assert pb.EncodedTensor.FromString(indexed).prefix == 0 and len(indexed) > len(torch_bytes)
    decoded = ChannelCodec.decompress(msg)
    assert decoded.prefix and torch.equal(decoded.channels, torch.arange(5))
    reference = ChannelCodec.decompress(pb.EncodedTensor.FromString(indexed))
    assert not reference.prefix and torch.equal(decoded.dense(), reference.dense())


def test_all_channels_as_a_prefix_are_the_plain_message():
    values = _values(2, 8)
    assert ChannelCodec("fp16").compress(values, None, 8, prefix=True) == ChannelCodec("fp16").compress(values, None, 8)


def _prefix_message(**changes):
    msg = ChannelCodec("fp16").compress(_values(2, 2), None if "channels" in changes else torch.arange(2), 8, prefix=True)
    for key, value in changes.items():
        setattr(msg, key, value)
    return msg


@pytest.mark.parametrize("changes,match", [
    ({"prefix": 9}, "exceeds the 8 channels"),
    ({"prefix": 2, "channels": np.array([0, 1], "<u2").tobytes()}, "both a channel prefix and channel indices"),
    ({"prefix": 3}, "holds 128 bytes"),
])
def test_decoder_range_checks_the_prefix(changes, match):
    with pytest.raises(ProtocolError, match=match):
        ChannelCodec.decompress(_prefix_message(**changes))


def test_encoder_refuses_a_prefix_that_is_not_one():
    with pytest.raises(ProtocolError, match="prefix message carries channels 0..1"):
        ChannelCodec("fp16").compress(_values(2, 2), torch.tensor([0, 2]), 8, prefix=True)


# ---------------------------------------------------------------- the objective
def test_sandwich_trains_the_smallest_the_whole_and_one_ladder_budget_between():
    assert ladder(512) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512] and ladder(6) == [1, 2, 4, 6] and ladder(1) == [1]
    assert [rung(b, 512) for b in (1, 2, 3, 300, 511, 512, None)] == [0, 1, 1, 8, 8, 9, 9]
    rng = RngStream(3)
    with rng.active():
        draws = [NestedPrefixes("sandwich").budgets(512) for _ in range(40)]
        single = [NestedPrefixes("random").budgets(6) for _ in range(40)]
    assert all(d[0] == 512 and d[-1] == 1 and len(d) == 3 and d[1] in ladder(512)[1:-1] for d in draws)
    assert len({d[1] for d in draws}) > 3
    assert all(len(s) == 1 and s[0] in (1, 2, 4, 6) for s in single) and len({s[0] for s in single}) == 4
    with RngStream(3).active():
        assert [NestedPrefixes("sandwich").budgets(512) for _ in range(40)] == draws
    assert NestedPrefixes().budgets(2) == [2, 1] and NestedPrefixes().budgets(1) == [1]
    with RngStream(3).active():
        wide = [NestedPrefixes("sandwich4").budgets(512) for _ in range(40)]
    assert all(d[0] == 512 and d[-1] == 1 and len(d) == 4 and set(d[1:3]) <= set(ladder(512)[1:-1]) for d in wide)
    assert len({b for d in wide for b in d[1:3]}) == 8 and NestedPrefixes("sandwich4").passes == 4
    assert NestedPrefixes("sandwich4").budgets(6) == [6, 4, 2, 1] and NestedPrefixes("sandwich4").budgets(4) == [4, 2, 1]


def test_sandwich_sums_the_label_losses_of_its_prefixes():
    class Probe(torch.nn.Module):   # a server half that sees which channels are zero
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8 * 4, 3)

        def forward(self, x, budget=None):
            return self.lin(x.flatten(1))

    torch.manual_seed(0)
    half, values, labels = Probe(), torch.randn(6, 8, 2, 2), torch.randint(3, (6,))
    received = Decoded(values, torch.arange(8), 8)
    with RngStream(1).active():
        budgets = NestedPrefixes().budgets(8)
    with RngStream(1).active():
        loss, reported = NestedPrefixes()(half, received, values, labels)
    whole = half(values)
    smaller = [F.cross_entropy(half(prefix_input(values, b, 8)), labels) for b in budgets[1:]]
    assert len(smaller) == 2 and torch.allclose(loss, F.cross_entropy(whole, labels) + sum(smaller))
    assert torch.equal(reported, whole)


def test_each_rung_has_its_own_affine_transform_trained_by_its_forwards():
    cfg = make_config({**SMALL, "method": "anybudget"})
    _, server, _ = build_workers(cfg, 10, 1)
    half = server.half
    trained = sandwich_step(half)
    values = torch.rand(4, 512, 4, 4)
    for norm in (half.decoder.bn, dict(half.layers.named_modules())["features.19"]):
        assert norm.weight.shape == norm.bias.shape == (10, 512)
        moved = [r for r in range(10) if norm.weight.grad[r].abs().sum() > 0]
        assert moved == trained, (moved, trained)   # only the rungs this step ran at
    half.eval()
    with torch.no_grad():   # evaluation at a budget uses that rung's transform
        before = half(prefix_input(values, 4, 512), 4)
        dict(half.layers.named_modules())["features.19"].bias[rung(4, 512)] += 1.0
        assert not torch.allclose(before, half(prefix_input(values, 4, 512), 4))
        assert torch.equal(half(values, 512), half(values, 512))


def _server(objective, steps=1):
    cfg = make_config({**SMALL, "method": "anybudget"})
    _, server, geometry = build_workers(cfg, 10, 1)
    server = ServerWorker(server.half, geometry, 10, ChannelCodec("fp32"), 0, objective=objective, steps=steps)
    server.start_phase(pb.PhaseRequest(phase=0, budget=512, lr=0.01))
    return server


def _train_request(channels, prefix):
    values = torch.rand(4, len(channels), 4, 4, generator=torch.Generator().manual_seed(1))
    act = ChannelCodec("fp32").compress(values, torch.tensor(channels), 512, prefix=prefix)
    return pb.TrainRequest(step_id=1, activations=act, labels=encode_labels(torch.tensor([0, 1, 2, 3])))


def test_one_gradient_for_the_received_prefix_and_indices_refused():
    server = _server(NestedPrefixes())
    reply = server.train(_train_request(list(range(8)), prefix=True))
    assert reply.gradient.prefix == 8 and reply.gradient.channels == b""
    grad = ChannelCodec.decompress(reply.gradient).values
    assert grad.shape == (4, 8, 4, 4) and all(grad[:, c].abs().sum() > 0 for c in range(8))
    with pytest.raises(BadTensor, match="prefix of its channels"):
        server.train(_train_request([0, 2, 5], prefix=False))
    # the budget of a prefix is read from its header, before anything is decoded
    with pytest.raises(BudgetExceeded, match="5 channels sent but the budget is 4"):
        server._decode(ChannelCodec("fp16").compress(_values(2, 5), None, 512, prefix=True), None, 4)


def test_a_second_server_step_is_the_same_request_applied_again_with_the_first_gradient_returned():
    # two steps a request == that request applied twice (the same sandwich draws, statistics and lr),
    # while the device's gradient is the first step's
    twice, once = _server(NestedPrefixes(), steps=2), _server(NestedPrefixes())
    request = _train_request(list(range(8)), prefix=True)
    reply = twice.train(request)
    first = once.train(request)
    assert reply.gradient == first.gradient and reply.loss == first.loss
    assert not all(torch.equal(a, b) for a, b in zip(twice.half.state_dict().values(), once.half.state_dict().values()))
    once.train(request)
    for (name, a), b in zip(twice.half.state_dict().items(), once.half.state_dict().values()):
        assert torch.equal(a, b), name


def test_server_steps_default_per_method_and_are_bounded():
    assert make_config({"method": "anybudget"}).server_steps == 2
    assert make_config({"method": "ca"}).server_steps_value() == 1
    assert make_config({"method": "ca"}).fingerprint() == make_config({"method": "ca", "server_steps": None}).fingerprint()
    assert make_config({"method": "anybudget", "server_steps": 1}).fingerprint() \
        != make_config({"method": "anybudget"}).fingerprint()
    _, server, _ = build_workers(make_config({**SMALL, "method": "anybudget"}), 10, 1)
    assert server.steps == 2
    with pytest.raises(UserError, match="server_steps must be an integer >= 1 and <= 4"):
        make_config({"method": "anybudget", "server_steps": 5})


# ---------------------------------------------------------------- one model, every budget
@pytest.fixture(scope="module")
def anybudget_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("anybudget") / "run"
    # its BatchNorm statistics as training leaves them (no calibration round before the evaluation)
    assert main(["train", "--method", "anybudget", "--epochs", "1", "--train-subset", "16", "--test-subset", "16",
                 "--validation-size", "24", "--threads", "1", "--quiet", "--bn-calibration", "0", "--out",
                 str(out)]) == 0
    return out


@torch.no_grad()
def _direct_predictions(device_half, server_half, x: torch.Tensor, budget: int, channels: int = 512) -> torch.Tensor:
    """What the split model predicts at `budget`, computed without the code under test (no codec, link, worker
    or evaluate): the device half's cut, each channel times its mask (sigmoid(gate)^2, "paper" scaling), the
    first `budget` channels rounded to fp16 (the uplink dtype), the others zeros, the server half at that rung."""
    device_half.eval(), server_half.eval()
    z = device_half(x)
    mask = torch.sigmoid(device_half.gate_logits.reshape(-1)) ** 2
    sent = (z * mask.view(1, -1, 1, 1))[:, :budget].half().float()
    received = torch.cat([sent, sent.new_zeros(len(x), channels - budget, *sent.shape[2:])], 1)
    return server_half(received, budget).argmax(1)


def _direct_accuracy(device_half, server_half, loader, budget: int) -> float:
    correct = samples = 0
    for x, y in loader:
        correct += int((_direct_predictions(device_half, server_half, x, budget) == y).sum())
        samples += len(y)
    return correct / samples


def test_the_run_measures_every_ladder_budget_on_its_validation_images(anybudget_run):
    meta = read_meta(anybudget_run)
    table = meta["budget_validation"]
    assert table["samples"] == 24 and table["dtype_up"] == "fp16"
    assert list(table["accuracy"]) == [str(b) for b in ladder(512)]
    assert meta["config"]["scaling"] == "paper" and meta["config"]["dtype_up"] == "fp16"   # as _direct_predictions
    device, server, *_ = load_workers(str(anybudget_run))
    held_out = validation_loader("fashion-mnist", None, 32, 1, 24, 16)   # two batches
    for budget in ladder(512):
        expected = round(_direct_accuracy(device.half, server.half, held_out, budget), 6)
        assert table["accuracy"][str(budget)] == expected, budget
    assert budget_quality(meta, [1, 2, 512]) is not None   # what --budget auto ranks this model's options by


def test_a_gated_method_refuses_to_start_from_an_anybudget_model(anybudget_run, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["train", "--method", "prune", "--from", str(anybudget_run), "--epochs", "2", "--train-subset", "16",
                 "--test-subset", "16", "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is an any-budget model" in err and "--budget B" in err and "Traceback" not in err
    assert not out.exists()


def test_one_anybudget_model_evaluates_at_every_budget(anybudget_run, capsys):
    meta = read_meta(anybudget_run)
    assert meta["budget"] == 512 and meta["config"]["budget"] is None
    tracked = read_tensors(meta["_folder"])["server.decoder.bn.num_batches_tracked"]
    assert tracked.shape == (10,) and (tracked > 0).all()  # the decoder's statistics: every rung, every step
    # the backbone's BatchNorm after the decoder: the rungs the step's forwards ran at (sandwich: 1, one, all),
    # once per server step (two per batch)
    tail = read_tensors(meta["_folder"])["server.layers.features.19.num_batches_tracked"]
    assert tail.tolist()[0] == tail.tolist()[-1] == 2 and int(tail.sum()) == 6
    loader = make_loaders("fashion-mnist", None, 16, 32, 1, 0, 1, 32, False, 32)[1]  # 32 test images, 1 batch
    results = accuracy_at_budgets(anybudget_run / "checkpoint", (1, 3, 64, None), loader)
    for b, r in zip((1, 3, 64, 512), results.values()):
        values = b * 16 * 2 * 32  # fp16, 4x4 positions, 32 images in one request
        assert values < r["bytes_per_sample"] * 32 < values + 24, b  # a prefix: no channel index travels
    device, server, *_ = load_workers(str(anybudget_run))
    for b in (1, 3, 64, 512):
        expected = _direct_accuracy(device.half, server.half, loader, b)
        assert results[str(b) if b < 512 else "all"]["accuracy"] == expected, b
    assert main(["eval", "--checkpoint", str(anybudget_run), "--budget", "5", "--test-subset", "32", "--quiet"]) == 0
    assert "budget 5 of 512 channels" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(anybudget_run), "--budget", "513", "--quiet"]) == 2


def test_train_auto_sizes_an_anybudget_step_as_it_travels():
    from splitprune.client.auto import training_bytes
    from splitprune.training.link import OptimizerSettings
    from splitprune.training.setup import LocalEndpoint, build_run

    class Eight:   # a StepBudget that sends 8 channels and keeps the step's message sizes
        clock = time.perf_counter

        def next_budget(self, limit):
            return 8

        def observe(self, up, down, compute_seconds):
            self.sizes = (up, down)

    parts = build_run(make_config({**SMALL, "method": "anybudget", "train_subset": 16}))
    link = LocalEndpoint(parts.server_worker).link
    parts.device.start_phase(link, 0, 512, OptimizerSettings(0.01, 0.0, 0.0), True)
    step = Eight()
    x, y = next(iter(parts.train_loader))
    parts.device.train_step(x, y, link, 0.5, step)
    up, down = training_bytes(parts, 8)   # a prefix length, no channel indices, both ways
    assert step.sizes == (up, down), (step.sizes, (up, down))   # server_us is fixed-width: any step's time


def test_budget_caps_the_prefix_an_anybudget_run_sends():
    cfg = make_config({**SMALL, "method": "anybudget", "budget": 16})
    assert [(p.budget, p.epochs) for p in resolve_schedule(cfg, 512)] == [(16, 22)]
    assert resolve_schedule(make_config({**SMALL, "method": "anybudget"}), 512)[0].budget is None
    assert make_config({**SMALL, "method": "ca"}).budget == 4  # every other method's default is unchanged


def test_anybudget_over_grpc_equals_in_process_training(tmp_path):
    cfg = make_config({**SMALL, "method": "anybudget", "schedule": "8:1", "lr_schedule": "cosine",
                       "test_subset": 16})
    assert_remote_equals_local(cfg, tmp_path)


# ---------------------------------------------------------------- --from a gated model
def test_from_a_gated_model_reorders_the_cut_and_keeps_its_function(tmp_path):
    source = make_config({**SMALL, "method": "ca", "budget": 4, "epochs": 1, "train_subset": 16})
    Trainer(source, tmp_path / "ca", show_progress=False).run()
    cfg = make_config({**SMALL, "method": "anybudget", "from_checkpoint": str(tmp_path / "ca")})
    old_device, old_server, _ = build_workers(source, 10, 1)
    new_device, new_server, _ = build_workers(cfg, 10, 1)
    tensors = read_tensors(tmp_path / "ca" / "checkpoint")
    load_module("device", old_device.half, tensors)
    load_module("server", old_server.half, tensors)
    load_pretrained(cfg, new_device, new_server, 10)
    old_mask = channel_mask(old_device.half.gate_logits)
    new_mask = channel_mask(new_device.half.gate_logits)
    assert torch.equal(new_mask, old_mask.sort(descending=True, stable=True).values)
    assert not torch.equal(new_mask, old_mask)
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = []
        for device, server, mask in ((old_device, old_server, old_mask), (new_device, new_server, new_mask)):
            device.half.eval(), server.half.eval()
            logits.append(server.half(keep_channels(device.half(x), None, mask, "paper")))
    assert torch.allclose(logits[0], logits[1], atol=1e-5, rtol=1e-5)
    top4 = old_mask.argsort(descending=True, stable=True)[:4]
    with torch.no_grad():  # the source's top-4 channels are the new model's prefix 4
        assert torch.allclose(new_device.half(x)[:, :4], old_device.half(x)[:, top4], atol=1e-6)


def test_rescoring_computes_every_accuracy_again_on_the_test_set_and_sends_nothing(anybudget_run, tmp_path):
    import dataclasses
    import json

    from splitprune.adaptive.controller import Option
    from splitprune.bench.adaptive.inference import rescore

    options = [Option(1, "fp16", 60, 17), Option(8, "fp16", 300, 17)]
    rows = [{"index": i, "t": 0.1 * i, "unix": 1000.0 + 0.1 * i, "budget": o.budget, "dtype": o.dtype,
             "latency_ms": 60.0, "server_ms": 5.0, "compute_ms": 20.0, "correct": True}
            for i, o in enumerate([options[0]] * 3 + [options[1]] * 7)]
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "steady.json").write_text(json.dumps({"options": [dataclasses.asdict(o) for o in options],
                                                                "rows": rows}))
    real = {"requests": 10, "share_within_target": 1.0, "bytes_up": 2280, "bytes_down": 170, "mean_budget": 5.9,
            "accuracy": 1.0}
    stored = {"latency_target_ms": 200.0, "traces": [
        {"trace": "steady", "log": "logs/steady.json", "trace_start_unix": 1000.0, "real": real,
         "policies": [{"policy": "auto (real run)"},
                      *({"policy": f"fixed {o.label()} (simulated)", "requests": 4, "bytes_up": 4 * o.bytes_up,
                         "bytes_down": 4 * o.bytes_down} for o in [*options, Option(2, "fp16", 90, 17)])]}]}
    (tmp_path / "adaptive_infer.json").write_text(json.dumps(stored))
    # the stored fixed B=8 was sized a byte apart from the log's: still one option, each image counted once
    stored["traces"][0]["policies"][2]["bytes_up"] += 4
    (tmp_path / "adaptive_infer.json").write_text(json.dumps(stored))
    summary = rescore(anybudget_run / "checkpoint", tmp_path, images=1000)
    assert summary["accuracy_images"] == 1000 and json.loads((tmp_path / "adaptive_infer.json").read_text())
    # each option's per-image correctness, checked on the first test images against the model's own predictions
    # computed here without the codec or the workers; its accuracy is the share of images it gets right
    assert [(o["budget"], o["dtype"]) for o in summary["option_accuracy"]] == [(1, "fp16"), (2, "fp16"), (8, "fp16")]
    device, server, *_ = load_workers(str(anybudget_run))
    x, y = next(iter(make_loaders("fashion-mnist", None, 16, 32, 1, 0, 1, None, False, 250)[1]))
    for o in summary["option_accuracy"]:
        hits = (_direct_predictions(device.half, server.half, x[:128], o["budget"]) == y[:128]).tolist()
        assert o["correct"][:128] == "".join("1" if h else "0" for h in hits), o["budget"]
        assert len(o["correct"]) == 1000 and o["accuracy"] == o["correct"].count("1") / 1000
    accuracy = {(o["budget"], o["dtype"]): o["accuracy"] for o in summary["option_accuracy"]}
    policies = summary["traces"][0]["policies"]
    assert [p["policy"] for p in policies] == ["auto (real run)", "auto (controller, simulated)",
                                               "auto + hedge (simulated)",
                                               "oracle (knows the trace, simulated)", "fixed B=1 fp16 (simulated)",
                                               "fixed B=8 fp16 (simulated)", "fixed B=2 fp16 (simulated)"]
    assert policies[0]["requests"] == 10 and policies[0]["share_within_target"] == 1.0   # the real run's own
    assert policies[0]["accuracy"] == pytest.approx(0.3 * accuracy[1, "fp16"] + 0.7 * accuracy[8, "fp16"])
    assert policies[0]["option_share"] == {"B=1 fp16": 0.3, "B=8 fp16": 0.7}
    assert policies[4]["accuracy"] == pytest.approx(accuracy[1, "fp16"])
    assert summary["traces"][0]["verdict"]["within_99"] == "not resolved"   # 10 requests show little


def test_adaptive_accuracy_names_what_is_missing(tmp_path):
    result = compare(tmp_path, profile="quick")
    assert result["overall"] == "not measured"
    four = result["verdicts"]["4"]
    assert four["rival"] == "ca4" and any(m.startswith("anybudget_seed1") for m in four["missing"])
    assert any("ca4 (not started under" in m for m in four["missing"])
    assert result["verdicts"]["all"]["rival"] == "sl"
