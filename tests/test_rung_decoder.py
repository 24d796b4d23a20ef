"""--rung-decoder: an any-budget model whose decoder deconvolution is one per budget rung (compression.rungs)."""
from __future__ import annotations

import pytest
import torch

from support import assert_remote_equals_local, sandwich_step
from splitprune.cli import main as cli_main
from splitprune.compression.rungs import RungDeconv, ladder
from splitprune.config import make_config
from splitprune.errors import UserError
from splitprune.training.objectives import prefix_input
from splitprune.training.reorder import with_rung_decoder
from splitprune.training.setup import build_workers

SMALL = dict(model="vgg11_bn_compact", dataset="fashion-mnist", train_subset=32, test_subset=32, batch_size=16,
             test_batch_size=32, threads=1, seed=0, method="anybudget")


def _halves(**changes):
    _, shared, _ = build_workers(make_config({**SMALL, **changes}), 10, 1)
    _, per_rung, _ = build_workers(make_config({**SMALL, **changes, "rung_decoder": True}), 10, 1)
    return shared.half, per_rung.half


def test_a_rung_decoder_starts_as_the_shared_one_at_every_budget():
    shared, per_rung = _halves()
    assert isinstance(per_rung.decoder.deconv, RungDeconv)
    assert [w.shape[0] for w in per_rung.decoder.deconv.weight] == ladder(512)
    values = torch.rand(4, 512, 4, 4, generator=torch.Generator().manual_seed(0))
    shared.eval(), per_rung.eval()
    with torch.no_grad():
        for b in ladder(512):
            x = prefix_input(values[:, :b], b, 512)
            assert torch.allclose(shared(x, b), per_rung(x, b), atol=1e-5, rtol=1e-5), b
        # a budget between rungs is decoded by the rung below, from that rung's channels
        assert torch.equal(per_rung(prefix_input(values[:, :3], 3, 512), 3),
                           per_rung(prefix_input(values[:, :2], 2, 512), 2))


def test_each_rung_trains_its_own_deconvolution_and_its_statistics():
    _, half = _halves()
    trained = sandwich_step(half)
    deconv = half.decoder.deconv
    moved = [r for r, w in enumerate(deconv.weight) if w.grad is not None and w.grad.abs().sum() > 0]
    assert moved == trained and len(trained) == 3
    assert [r for r in range(10) if deconv.bias.grad[r].abs().sum() > 0] == trained
    # a forward at all channels gives every rung its statistics (each from its own deconvolution)
    assert (half.decoder.bn.num_batches_tracked > 0).all()


def test_shared_weights_convert_to_the_rung_layout_with_the_same_function():
    shared, per_rung = _halves(seed=3)
    tensors = {f"server.{k}": v for k, v in shared.state_dict().items()}
    converted = with_rung_decoder(tensors)
    per_rung.load_state_dict({k[len("server."):]: v for k, v in converted.items()})
    values = torch.rand(2, 512, 4, 4, generator=torch.Generator().manual_seed(1))
    shared.eval(), per_rung.eval()
    with torch.no_grad():
        assert torch.allclose(shared(prefix_input(values[:, :8], 8, 512), 8),
                              per_rung(prefix_input(values[:, :8], 8, 512), 8), atol=1e-5, rtol=1e-5)


def test_rung_decoder_is_an_anybudget_setting():
    with pytest.raises(UserError, match="--rung-decoder applies to method anybudget only"):
        make_config({**SMALL, "method": "ca", "rung_decoder": True})
    assert make_config(SMALL).fingerprint() != make_config({**SMALL, "rung_decoder": True}).fingerprint()


def test_rung_decoder_over_grpc_equals_in_process_training_and_evaluates_at_a_budget(tmp_path, capsys):
    cfg = make_config({**SMALL, "schedule": "8:1", "lr_schedule": "cosine", "test_subset": 16,
                       "rung_decoder": True})
    tensors = assert_remote_equals_local(cfg, tmp_path)
    assert "server.decoder.deconv.weight.3" in tensors
    capsys.readouterr()
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "local"), "--budget", "4", "--test-subset", "16",
                     "--quiet"]) == 0
    assert "budget 4 of 512 channels" in capsys.readouterr().out
