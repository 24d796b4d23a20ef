"""Vectorised batch transforms: uint8 images [N,H,W,C] -> normalised float32 model input [N,C,S,S]."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from splitprune.errors import UserError
from splitprune.inputs import LUMA_WEIGHTS, pad_box

AUGMENT_PADDING = 4


def to_luminance(x: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] -> [N,1,H,W] with ITU-R 601 luma weights."""
    weights = torch.tensor(LUMA_WEIGHTS, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def check_channels(source: int, target: int) -> None:
    if source != target and (source, target) not in ((1, 3), (3, 1)):
        raise UserError(f"cannot convert {source}-channel images to {target} channels (only 1<->3 is supported)")


def fit_to_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """Make [N,C,H,W] square of side ``size``: centre zero-padding when the image is smaller by at most
    PAD_LIMIT pixels (Fashion-MNIST 28 -> 32 pads 2 each side), otherwise bilinear antialiased resize."""
    height, width = x.shape[-2:]
    if height == width == size:
        return x
    box = pad_box(height, width, size)
    if box is not None:
        top, left = box
        return F.pad(x, (left, size - width - left, top, size - height - top))
    return F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """CIFAR-style augmentation of [N,C,H,W]: random crop after ``padding`` pixels of zero padding, then a
    horizontal flip with probability 1/2, per sample, done as one gather for the whole batch."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
    flip = torch.randint(0, 2, (n, 1), generator=generator).bool()
    rows = dy + torch.arange(h)
    cols = dx + torch.where(flip, torch.arange(w - 1, -1, -1), torch.arange(w))
    flat_index = rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]
    return padded.flatten(2).gather(2, flat_index.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)


def adapt_stats(values: Sequence[float], channels: int) -> tuple[float, ...]:
    """Per-channel statistics for ``channels`` channels: one value is repeated, RGB values are reduced to one
    by luma weights (an approximation for std)."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if len(values) == 3 and channels == 1:
        return (sum(w * v for w, v in zip(LUMA_WEIGHTS, values)),)
    raise UserError(f"{len(values)} normalisation values do not fit {channels} channels")


class BatchTransform:
    """uint8 [N,H,W,C] -> float32 [N,in_channels,S,S]: optional augmentation, channel conversion, pad or
    resize to ``input_size``, scaling to [0,1] and normalisation by ``mean``/``std``."""

    def __init__(self, input_size: int, in_channels: int, mean: Sequence[float], std: Sequence[float], augment: bool):
        if input_size <= 0:
            raise UserError(f"input size must be positive, got {input_size}")
        mean_t = torch.tensor(adapt_stats(mean, in_channels)).view(1, in_channels, 1, 1)
        std_t = torch.tensor(adapt_stats(std, in_channels)).view(1, in_channels, 1, 1)
        if (std_t <= 0).any():
            raise UserError(f"normalisation std must be positive, got {tuple(std)}")
        self.input_size, self.in_channels, self.augment = input_size, in_channels, augment
        self.scale = 1.0 / (255.0 * std_t)
        self.bias = -mean_t / std_t

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2)
        check_channels(x.shape[1], self.in_channels)
        if self.augment:
            if generator is None:
                raise ValueError("augmentation needs an explicit torch.Generator")
            x = random_crop_flip(x, AUGMENT_PADDING, generator)
        x = x.float()
        if x.shape[1] == 3 and self.in_channels == 1:
            x = to_luminance(x)
        x = fit_to_size(x, self.input_size)
        if x.shape[1] == 1 and self.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        return torch.addcmul(self.bias, x, self.scale)


def fit_uint8_images(images: np.ndarray, size: int, chunk: int = 1024) -> np.ndarray:
    """Pad or resize a whole uint8 [N,H,W,C] set to [N,size,size,C] (as :func:`fit_to_size`), chunk by chunk."""
    if images.shape[1] == images.shape[2] == size:
        return images
    out = np.empty((len(images), size, size, images.shape[3]), dtype=np.uint8)
    for start in range(0, len(images), chunk):
        x = torch.from_numpy(images[start:start + chunk]).permute(0, 3, 1, 2).float()
        fitted = fit_to_size(x, size).round_().clamp_(0, 255).to(torch.uint8)
        out[start:start + chunk] = fitted.permute(0, 2, 3, 1).numpy()
    return out
