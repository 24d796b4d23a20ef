import pytest
import torch

from splitprune.compression import (Decoder, GatedEncoder, budget_loss, channel_mask, encoded_shape, keep_channels,
                                    reset_gate, select_top_b, soft_count)
from splitprune.errors import UserError


def test_top_b_keeps_exactly_b_largest_ascending():
    mask = torch.tensor([0.1, 0.9, 0.5, 0.95, 0.2, 0.7])
    assert select_top_b(mask, 3).tolist() == [1, 3, 5]
    assert select_top_b(mask, 1).tolist() == [3]


def test_top_b_ties_never_keep_more_than_b_and_prefer_lower_indices():
    mask = torch.ones(512)
    for b in (1, 4, 32, 511):
        kept = select_top_b(mask, b)
        assert kept.tolist() == list(range(b))


def test_top_b_matches_torch_topk_values_on_random_masks():
    for seed in range(5):
        mask = torch.rand(512, generator=torch.Generator().manual_seed(seed))
        kept = select_top_b(mask, 32)
        assert kept.numel() == 32
        assert torch.equal(mask[kept].sort().values, torch.topk(mask, 32).values.sort().values)


def test_soft_count_and_mask():
    logits = torch.zeros(1, 4, 1, 1)
    assert torch.allclose(channel_mask(logits), torch.full((4,), 0.25))
    assert torch.isclose(soft_count(logits), torch.tensor(1.0))


def test_budget_loss_value_and_gradient_match_the_formula():
    logits = torch.randn(1, 16, 1, 1, generator=torch.Generator().manual_seed(0)).requires_grad_()
    eps, delta, budget = 1000.0, 0.01, 4
    loss = budget_loss(logits, budget, eps, delta)
    s = (torch.sigmoid(logits.detach()) ** 2).sum()
    expected = eps * (torch.exp(delta * (s - budget)) + torch.exp(-delta * (s - budget)))
    assert torch.isclose(loss, expected)
    loss.backward()
    sig = torch.sigmoid(logits.detach())
    dloss_ds = eps * delta * (torch.exp(delta * (s - budget)) - torch.exp(-delta * (s - budget)))
    assert torch.allclose(logits.grad, dloss_ds * 2 * sig ** 2 * (1 - sig), rtol=1e-4)


def test_budget_loss_is_two_sided_and_minimal_at_the_budget():
    at = budget_loss(torch.full((1, 8, 1, 1), 20.0), 8)   # S == 8 exactly
    assert torch.isclose(at, torch.tensor(2000.0))
    assert budget_loss(torch.full((1, 8, 1, 1), 20.0), 2) > at
    assert budget_loss(torch.full((1, 8, 1, 1), 20.0), 14) > at


def test_keep_channels_paper_scaling_multiplies_by_mask():
    z = torch.ones(2, 4, 2, 2)
    mask = torch.tensor([0.1, 0.2, 0.3, 0.4])
    idx = torch.tensor([1, 3])
    assert torch.allclose(keep_channels(z, idx, mask, "paper")[0, :, 0, 0], torch.tensor([0.2, 0.4]))
    assert torch.equal(keep_channels(z, idx, mask, "binary"), torch.ones(2, 2, 2, 2))


def test_reset_rule_opens_kept_channels_and_reinitialises_closed_ones():
    logits = torch.tensor([-5.0, 0.5, 0.9, 3.0, 14.0]).view(1, 5, 1, 1)
    opened = reset_gate(logits, 0.9, 3.0, 15.0, torch.Generator().manual_seed(0))
    flat = logits.view(-1)
    assert opened == 3
    assert flat[2:].tolist() == [15.0, 15.0, 15.0]
    assert ((flat[:2] >= 0) & (flat[:2] <= 3)).all()


def test_encoder_output_is_the_features_times_the_gate():
    enc = GatedEncoder(8).eval()
    x = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = torch.sigmoid(enc.bn(enc.conv(x)))
        logits = torch.tensor([-30.0, -2.0, 0.0, 0.5, 1.0, 2.0, 4.0, 30.0]).view(1, 8, 1, 1)
        enc.gate_logits.copy_(logits)
        z = enc(x)
    assert torch.allclose(z, features * torch.sigmoid(logits))  # per channel: its own gate value, no other
    assert z[:, 0].abs().max() < 1e-12                            # a closed gate sends nothing
    assert torch.allclose(z[:, 2], 0.5 * features[:, 2])          # logit 0 halves the channel
    assert torch.allclose(z[:, 7], features[:, 7])                # an open gate passes it through


@pytest.mark.parametrize("r,size", [(1, 4), (2, 4), (1, 12), (2, 12), (3, 8)])
def test_decoder_restores_the_cut_size(r, size):
    c, h, w = encoded_shape((8, size, size), r)
    z = GatedEncoder(8, r)(torch.randn(2, 8, size, size))
    assert z.shape == (2, 8, h, w)
    assert Decoder(8, r)(z).shape == (2, 8, size, size)


def test_impossible_resolution_is_refused_with_a_clear_message():
    with pytest.raises(UserError, match="resolution factor 3 does not fit a 512x4x4 cut"):
        encoded_shape((512, 4, 4), 3)
    with pytest.raises(UserError, match="at least 1|must be 1 or more"):
        encoded_shape((512, 4, 4), 0)
