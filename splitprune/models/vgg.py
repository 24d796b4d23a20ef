"""VGG-11 with BatchNorm (Simonyan & Zisserman, cfg A), laid out like torchvision's VGG."""
from __future__ import annotations

import torch
from torch import nn

CFG_A: list[int | str] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]

# The paper's names for cuts: name -> (the layer the cut follows, description)
CUTS: dict[str, tuple[str, str]] = {
    "pool1": ("features.3", "after the 1st max-pool: 64 channels at H/2 (device: 64 M)"),
    "pool2": ("features.7", "after the 2nd max-pool: 128 channels at H/4 (device: 64 M 128 M)"),
    "pool3": ("features.14", "after the 3rd max-pool: 256 channels at H/8 (device: 64 M 128 M 256 256 M)"),
    "conv5": ("features.17", "after the 5th conv block: 512 channels at H/8 (device: 64 M 128 M 256 256 M 512)"),
    "conv6": ("features.20", "after the 6th conv block: 512 channels at H/8 (device: 64 M 128 M 256 256 M 512 512)"),
    "pool4": ("features.21", "after the 4th max-pool: 512 channels at H/16 (device: 64 M 128 M 256 256 M 512 512 M)"),
}


class VGG(nn.Module):
    """`features` -> `avgpool` -> flatten -> `classifier`, as in torchvision."""

    def __init__(self, features: nn.Sequential, avgpool: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.avgpool = avgpool
        self.classifier = classifier
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def make_features(cfg: list[int | str], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            out = int(v)
            layers += [nn.Conv2d(channels, out, kernel_size=3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
    return nn.Sequential(*layers)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)


def vgg11_bn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """The paper's VGG-11-BN: cfg A features and the 25088-4096-4096-C classifier (~128.8M params at C=10)."""
    classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 4096),
        nn.ReLU(inplace=True),
        nn.Dropout(p=0.5),
        nn.Linear(4096, 4096),
        nn.ReLU(inplace=True),
        nn.Dropout(p=0.5),
        nn.Linear(4096, num_classes),
    )
    return VGG(make_features(CFG_A, in_channels), nn.AdaptiveAvgPool2d((7, 7)), classifier)


def vgg11_bn_compact(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-11-BN features with a global-average-pool and a single Linear(512, C) head (~9.2M params)."""
    return VGG(make_features(CFG_A, in_channels), nn.AdaptiveAvgPool2d(1), nn.Linear(512, num_classes))
