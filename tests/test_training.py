import csv
import json
from pathlib import Path

import pytest
import torch

from splitprune.cli import main
from splitprune.config import make_config, resolve_schedule
from splitprune.errors import UserError
from splitprune.proto import pb
from splitprune.training.checkpoint import read_meta, read_tensors
from splitprune.training.evaluation import evaluate_checkpoint
from splitprune.training.link import OptimizerSettings
from splitprune.training.server_worker import LocalLink
from splitprune.training.setup import build_run
from splitprune.training.link import lr_scale
from splitprune.training.trainer import Trainer


def _train(out, **values):
    return Trainer(make_config(values), out, show_progress=False).run()


def _rows(out):
    with open(Path(out) / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


class RecordingLink(LocalLink):
    """The in-process link, recording every message the device sends."""

    def __init__(self, server):
        super().__init__(server)
        self.sent = []

    def train(self, request):
        assert isinstance(request, bytes)
        self.sent.append(request)
        return super().train(request)


def test_device_and_server_share_nothing_but_messages(tiny):
    parts = build_run(make_config({**tiny, "method": "ca", "budget": 4}))
    device_params = {id(p) for p in parts.device.half.parameters()}
    server_params = {id(p) for p in parts.server_worker.half.parameters()}
    assert not device_params & server_params
    assert not any("gate" in name for name in parts.server_worker.half.state_dict())
    link = RecordingLink(parts.server_worker)
    settings = OptimizerSettings(0.01, 0.0, 5e-4)
    parts.device.start_phase(link, 0, 4, settings, use_budget_loss=True)
    gate_before = parts.device.half.gate_logits.detach().clone()
    x, y = next(iter(parts.train_loader))
    stats = parts.device.train_step(x, y, link)
    request = pb.TrainRequest.FromString(link.sent[0])
    assert len(request.activations.channels) == 2 * 4          # only the 4 kept channels travel
    assert list(request.activations.shape) == [16, 512, 4, 4]
    assert stats.bytes_up == len(link.sent[0])
    # the budget term is the device's own: it moved the gate although the server only saw cross-entropy
    assert not torch.equal(parts.device.half.gate_logits.detach(), gate_before)


def test_lr_scale_scales_the_update_of_both_halves(tiny):
    def one_step(scale):
        parts = build_run(make_config({**tiny, "method": "ca", "budget": 4}))
        halves = (parts.device.half, parts.server_worker.half)
        before = [[p.detach().clone() for p in h.parameters()] for h in halves]
        link = LocalLink(parts.server_worker)
        parts.device.start_phase(link, 0, 4, OptimizerSettings(0.01, 0.0, 5e-4), use_budget_loss=True)
        x, y = next(iter(parts.train_loader))
        parts.device.train_step(x, y, link, lr_scale=scale)
        return [[p.detach() - b for p, b in zip(h.parameters(), hb)] for h, hb in zip(halves, before)]

    full, half = one_step(1.0), one_step(0.5)
    for side_full, side_half in zip(full, half):
        moved = [d for d in side_full if d.abs().max() > 0]
        assert moved
        for d_full, d_half in zip(side_full, side_half):  # float32 rounding of p - p0 aside
            assert (d_half - 0.5 * d_full).norm() <= 1e-2 * (0.5 * d_full).norm() + 1e-6


def test_cosine_lr_schedule_decays_each_phase_to_near_zero():
    assert lr_scale("constant", 90, 100) == 1.0
    steps = [lr_scale("cosine", t, 100) for t in range(100)]
    assert steps[0] == 1.0 and abs(steps[50] - 0.5) < 1e-9 and steps[-1] < 1e-3
    assert all(a > b for a, b in zip(steps, steps[1:]))
    with pytest.raises(UserError, match="lr_schedule"):
        make_config({"lr_schedule": "linear"})


def test_b4_fp16_uplink_is_128_bytes_per_sample_plus_labels_and_indices(tiny, tmp_path):
    summary = _train(tmp_path, **tiny, method="ca", budget=4, epochs=1)
    per_sample = summary["bytes_up"] / summary["train_samples"]
    assert 128 < per_sample < 128 + 4
    assert summary["phases"][0]["bytes_up"] == summary["bytes_up"]
    down = summary["bytes_down"] / summary["train_samples"]
    assert 256 < down < 256 + 4                                  # gradients of 4 channels, fp32


def test_same_seed_gives_identical_runs(tiny, tmp_path):
    a = _train(tmp_path / "a", **tiny, method="deprune", schedule="4:1,all:1")
    b = _train(tmp_path / "b", **tiny, method="deprune", schedule="4:1,all:1")
    strip = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]
    assert strip(_rows(tmp_path / "a")) == strip(_rows(tmp_path / "b"))
    wa = read_tensors(tmp_path / "a" / "checkpoint")
    wb = read_tensors(tmp_path / "b" / "checkpoint")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["final_test_accuracy"] == b["final_test_accuracy"]


def test_interrupted_run_resumes_to_the_same_result(tiny, tmp_path, monkeypatch):
    values = {**tiny, "method": "prune", "schedule": "8:1,4:2", "lr": 0.01}
    base = _train(tmp_path / "base", **{**tiny, "method": "sl", "epochs": 1})
    values["from_checkpoint"] = str(tmp_path / "base")
    _train(tmp_path / "full", **values)

    calls = {"n": 0}
    original = Trainer._run_epoch

    def crash_on_third_epoch(self, phase):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, phase)

    monkeypatch.setattr(Trainer, "_run_epoch", crash_on_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "cut", **values)
    assert len(_rows(tmp_path / "cut")) == 2
    monkeypatch.setattr(Trainer, "_run_epoch", original)
    _train(tmp_path / "cut", **values)
    strip = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]
    assert strip(_rows(tmp_path / "cut")) == strip(_rows(tmp_path / "full"))
    wa, wb = read_tensors(tmp_path / "cut" / "checkpoint"), read_tensors(tmp_path / "full" / "checkpoint")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "full" / "models" / "budget_8" / "model.safetensors").exists()
    pruned = evaluate_checkpoint(read_meta(tmp_path / "full" / "models" / "budget_4"), 2, "int8", test_subset=32)
    assert pruned["budget"] == 2 and pruned["test_samples"] == 32
    assert base["phases"][0]["budget"] == "all"


def test_deprune_resets_the_gate_when_the_budget_relaxes(tiny, tmp_path):
    trainer = Trainer(make_config({**tiny, "method": "deprune", "schedule": "4:1,all:1"}), tmp_path,
                      show_progress=False)
    seen = []
    original = trainer.device.reset_gate

    def reset(*args):
        before = trainer.device.half.gate_logits.detach().view(-1).clone()
        opened = original(*args)
        seen.append((args, before, trainer.device.half.gate_logits.detach().view(-1).clone(), opened))
        return opened

    trainer.device.reset_gate = reset
    trainer.run()
    assert [s[0] for s in seen] == [(0.9, 3.0, 15.0)]
    _, before, after, opened = seen[0]
    kept = before >= 0.9
    assert opened == int(kept.sum()) and 0 < opened < before.numel()  # the B=4 phase left some logits low
    assert torch.equal(after[kept], torch.full_like(after[kept], 15.0))
    assert ((after[~kept] >= 0) & (after[~kept] <= 3.0)).all()
    assert not torch.equal(after[~kept], before[~kept])  # redrawn, not left as they were


def test_schedules_resolve_with_paper_defaults_and_refuse_impossible_budgets():
    phases = resolve_schedule(make_config({"method": "deprune"}), 512)
    assert [(p.budget, p.epochs) for p in phases] == [(4, 15), (None, 7)]
    assert [(p.budget, p.epochs) for p in resolve_schedule(make_config({"method": "ca", "budget": 8}), 512)] == [(8, 22)]
    scaled = resolve_schedule(make_config({"method": "deprune", "epochs": 4}), 512)
    assert sum(p.epochs for p in scaled) == 4
    with pytest.raises(UserError, match="exceeds the 512 channels"):
        resolve_schedule(make_config({"method": "ca", "budget": 600}), 512)
    with pytest.raises(UserError, match="BUDGET:EPOCHS"):
        resolve_schedule(make_config({"method": "deprune", "schedule": "4-15"}), 512)


def _cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv,message", [
    (["--method", "ca", "--budget", "600"], "budget 600 exceeds the 512 channels at the cut"),
    (["--method", "deprune", "--schedule", "4:x"], "bad schedule phase"),
    (["--resolution", "3"], "resolution factor 3 does not fit a 512x4x4 cut"),
    (["--data-dir", "/nonexistent/fmnist"], "apt-get install dataset-fashion-mnist"),
    (["--method", "prune"], "needs --from"),
    (["--method", "prune", "--from", "/nonexistent"], "no checkpoint at /nonexistent"),
    (["--model", "vgg99"], "vgg11_bn_compact"),
    (["--dtype-up", "int3"], "--dtype-up must be one of fp32, fp16, int8, int4"),
])
def test_bad_input_gets_one_clear_message_and_exit_2(capsys, tmp_path, argv, message):
    code, _, err = _cli(capsys, "train", "--out", str(tmp_path / "run"), "--train-subset", "32",
                        "--test-subset", "32", "--quiet", *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_bad_yaml_config_is_refused(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("methd: sl\n")
    code, _, err = _cli(capsys, "train", "--config", str(config), "--out", str(tmp_path / "o"))
    assert code == 2 and "unknown config option(s): methd" in err


def test_cli_train_then_eval_at_a_smaller_budget(capsys, tmp_path):
    out = tmp_path / "ca"
    code, stdout, _ = _cli(capsys, "train", "--method", "ca", "--budget", "8", "--epochs", "1", "--train-subset", "48",
                           "--test-subset", "64", "--threads", "1", "--quiet", "--out", str(out))
    assert code == 0 and "final test accuracy" in stdout
    summary = json.loads((out / "summary.json").read_text())
    for key in ("method", "model", "split", "dataset", "epochs", "train_samples", "final_test_accuracy",
                "best_test_accuracy", "bytes_up", "bytes_down", "eval_bytes_up", "eval_bytes_down",
                "inference_bytes_per_sample", "wall_seconds", "phases"):
        assert key in summary
    assert 0.0 <= summary["final_test_accuracy"] <= 1.0
    code, stdout, _ = _cli(capsys, "eval", "--checkpoint", str(out), "--budget", "4", "--dtype-up", "int8",
                           "--test-subset", "64", "--out", str(out.parent / "eval.json"))
    assert code == 0 and not list((out / "checkpoint").glob("eval*"))  # nothing written into the checkpoint
    result = json.loads((out.parent / "eval.json").read_text())
    assert result["test_samples"] == 64 and result["budget"] == 4
    assert 64 < result["bytes_per_sample"] < 64 + 4   # 4 channels x 16 positions x 1 byte + header
    code, _, err = _cli(capsys, "eval", "--checkpoint", str(out), "--budget", "9")
    assert code == 2 and "trained for budget 8" in err
