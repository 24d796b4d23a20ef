"""A bottleneck that starts as a pass-through, for models loaded with --weights: with every channel kept, the
split model computes what the loaded one did (GatedEncoder/Decoder.start_as_identity use these)."""
from __future__ import annotations

import torch
from torch import nn

from splitprune.errors import UserError

# A pass-through start (models loaded with --weights): the encoder sends sigmoid(s x) with s small enough that
# sigmoid is nearly linear over the activations of a trained network (x is given back (s x)^2 / 12 too small in
# relative terms: 0.5 % at |x| = 4, 2 % at 8), large enough that fp16 on the wire keeps x to ~0.03.
IDENTITY_SCALE = 1 / 16
IDENTITY_GATE = 15.0


def identity_kernel(conv: nn.modules.conv._ConvNd, gain: float = 1.0) -> None:
    if conv.stride != (1, 1) or conv.in_channels != conv.out_channels or conv.groups != 1:
        raise UserError("a pass-through start needs resolution factor 1")
    conv.weight.zero_()
    k = conv.kernel_size[0] // 2
    idx = torch.arange(conv.in_channels)
    conv.weight[idx, idx, k, k] = gain
    conv.bias.zero_()


def set_norm(bn: nn.BatchNorm2d, scale: float, shift: float) -> None:
    bn.weight.fill_(scale)
    bn.bias.fill_(shift)
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)  # so that the evaluation transform is exactly scale * x + shift


@torch.no_grad()
def fit_norm(bn: nn.BatchNorm2d, y: torch.Tensor, scale: float) -> None:
    """Set `bn`'s affine transform so that its training output on this batch is scale * y (and its statistics to
    the batch's, so that evaluation agrees)."""
    var, mean = torch.var_mean(y.detach().float(), dim=(0, 2, 3), unbiased=False)
    std = torch.sqrt(var + bn.eps)
    bn.weight.copy_(scale * std)
    bn.bias.copy_(scale * mean)
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
