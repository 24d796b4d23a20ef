"""Turn a trained gated model into the start of an any-budget one: the same function, its cut's channels
in the order of its gate, its server BatchNorms (statistics and affine transform) copied to every budget rung.

`splitprune train --method anybudget --from RUN` starts from a gated model with its channels sorted by the
source gate (largest mask first), so every prefix 0..B-1 starts from the channels that gate rated best.
The cut's channels are the encoder's output channels (its conv's out-channels, its BatchNorm, its gate
logits) and the decoder's input channels (its transposed conv's in-channels, dim 0 of that weight); the
backbone on either side is untouched.
"""
from __future__ import annotations

import torch

from splitprune.compression.rungs import ladder
from splitprune.compression.budget import channel_mask

GATE = "device.encoder.gate_logits"
ENCODER_OUT = ("device.encoder.conv.weight", "device.encoder.conv.bias", "device.encoder.bn.weight",
               "device.encoder.bn.bias", "device.encoder.bn.running_mean", "device.encoder.bn.running_var")
DECODER_IN = ("server.decoder.deconv.weight",)
DECODER_BIAS = "server.decoder.deconv.bias"


def gate_order(gate_logits: torch.Tensor) -> torch.Tensor:
    """Channel indices by the gate's mask, largest first (ties to the lower index)."""
    return torch.argsort(channel_mask(gate_logits).detach(), descending=True, stable=True)


def permute_cut(tensors: dict[str, torch.Tensor], order: torch.Tensor) -> dict[str, torch.Tensor]:
    """A copy of checkpoint `tensors` ("device.*", "server.*") whose cut channel i is the old channel order[i]."""
    out = dict(tensors)
    for key in (*ENCODER_OUT, *DECODER_IN):
        out[key] = tensors[key].index_select(0, order).contiguous()
    out[GATE] = tensors[GATE].index_select(1, order).contiguous()
    return out


def order_by_gate(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with the cut's channels in the order of their gate (best first)."""
    return permute_cut(tensors, gate_order(tensors[GATE]))


def with_rung_norms(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy whose server BatchNorms (one set of statistics and one affine transform per layer: the decoder's
    and the backbone's after it) serve every rung of the budget ladder (RungBatchNorm)."""
    out = dict(tensors)
    rungs = len(ladder(tensors[GATE].numel()))
    norms = [key[:-len("running_mean")] for key in tensors
             if key.startswith("server.") and key.endswith(".running_mean")]
    for layer in norms:
        for name in ("weight", "bias", "running_mean", "running_var"):
            out[layer + name] = tensors[layer + name].reshape(1, -1).repeat(rungs, 1)
        if layer + "num_batches_tracked" in tensors:
            out[layer + "num_batches_tracked"] = tensors[layer + "num_batches_tracked"].reshape(1).repeat(rungs)
    return out


def with_rung_decoder(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy whose decoder deconvolution (one, shared) is one per rung of the ladder, each a copy of the shared
    one's rows for its channels (compression.rungs.RungDeconv): the same function, --rung-decoder's layout."""
    out = dict(tensors)
    weight, bias = out.pop(DECODER_IN[0]), out.pop(DECODER_BIAS)
    rungs = ladder(weight.shape[0])
    for r, b in enumerate(rungs):
        out[f"{DECODER_IN[0]}.{r}"] = weight[:b].clone()
    out[DECODER_BIAS] = bias.reshape(1, -1).repeat(len(rungs), 1)
    return out


def gated_to_anybudget(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights of a gated checkpoint as an any-budget model's starting point (module docstring)."""
    return with_rung_norms(order_by_gate(tensors))
