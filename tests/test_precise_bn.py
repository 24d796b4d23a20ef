"""Precise BN: before an evaluation both halves' BatchNorm statistics are recomputed for the weights as they are
(--bn-calibration N training images), so a short run at the paper's constant lr no longer reads ~10 % while its
training accuracy climbs; nothing is trained by it and no random state is used up."""
import tempfile

import torch
from torch import nn

from splitprune.compression.rungs import RungBatchNorm
from splitprune.config import make_config
from splitprune.data import calibration_batches
from splitprune.training.evaluation import evaluate
from splitprune.training.halves import end_calibration, start_calibration
from splitprune.training.trainer import Trainer

SHORT = dict(model="vgg11_bn_compact", method="ca", budget=4, batch_size=16, test_batch_size=256, threads=1)


def test_a_short_run_at_a_constant_lr_reads_what_its_weights_can_do_once_calibrated():
    # 40 steps at lr 0.01: the running statistics lag the weights (measured: ~10 % on these images)
    cfg = make_config({**SHORT, "epochs": 2, "train_subset": 320, "test_subset": 256, "bn_calibration": 0})
    trainer = Trainer(cfg, tempfile.mkdtemp(), show_progress=False, checkpoints=False)
    trainer.run()
    link = trainer.endpoint.link
    lagging = evaluate(trainer.device, link, trainer.parts.test_loader).accuracy
    up, down = trainer.device.calibrate(calibration_batches(trainer.parts.train_loader, 256, 128), link)
    calibrated = evaluate(trainer.device, link, trainer.parts.test_loader).accuracy
    assert lagging < 0.35 and calibrated > lagging + 0.3, (lagging, calibrated)
    assert up > 256 * 4 * 16 * 2 and down > 0  # the calibration images' kept channels travelled, and were answered


def _weights(trainer: Trainer) -> dict:
    parts = {**{f"d.{k}": v for k, v in trainer.device.half.named_parameters()},
             **{f"s.{k}": v for k, v in trainer.parts.server_worker.half.named_parameters()}}
    return {k: v.detach().clone() for k, v in parts.items()}


def test_calibrating_trains_nothing_and_leaves_the_random_streams_alone():
    runs = []
    for images in (0, 64):
        cfg = make_config({**SHORT, "epochs": 2, "train_subset": 48, "test_subset": 32, "test_batch_size": 32,
                           "method": "deprune", "schedule": "4:1,all:1", "bn_calibration": images})
        trainer = Trainer(cfg, tempfile.mkdtemp(), show_progress=False, checkpoints=False)
        summary = trainer.run()
        runs.append((trainer, summary))
    (plain, plain_summary), (calibrated, calibrated_summary) = runs
    a, b = _weights(plain), _weights(calibrated)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # every step the same
    assert torch.equal(plain.device.rng.state, calibrated.device.rng.state)
    assert torch.equal(plain.parts.server_worker.rng.state, calibrated.parts.server_worker.rng.state)
    assert plain_summary["bytes_up"] == calibrated_summary["bytes_up"]
    assert [r["train_loss"] for r in plain.progress.rows] == \
        [r["train_loss"] for r in calibrated.progress.rows]
    assert all(r["calibration_bytes_up"] > 0 for r in calibrated.progress.rows)
    assert all(r["calibration_bytes_up"] == 0 for r in plain.progress.rows)


def test_statistics_are_the_plain_average_of_the_rounds_batches_then_running_again():
    norm, rung = nn.BatchNorm2d(3), RungBatchNorm(3, 8)
    module = nn.ModuleList([norm, rung])
    batches = [torch.randn(4, 3, 2, 2) + i for i in range(3)]
    saved = start_calibration(module)
    module.train()
    for x in batches:
        norm(x)
        rung.track_rung(1, x)
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in batches]).mean(0)
    assert torch.allclose(norm.running_mean, means, atol=1e-6) and torch.allclose(rung.running_mean[1], means,
                                                                                  atol=1e-6)
    assert torch.equal(rung.running_mean[0], torch.zeros(3))  # a rung the round never saw is left as it was
    end_calibration(saved)
    assert norm.momentum == 0.1 and rung.calibrating is None
    before = rung.running_mean[1].clone()
    rung.track_rung(1, torch.zeros(4, 3, 2, 2))
    assert torch.allclose(rung.running_mean[1], before * 0.9)  # the running update again (momentum 0.1)
