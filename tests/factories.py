"""Model factories a user might write, for `--model py:factories:NAME` (tests/ is on sys.path under pytest)."""
import torch
from torch import nn


def tiny_cnn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A small CNN that takes the class count."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


def fixed_head() -> nn.Module:
    """A CNN with its own 5-way head (it does not take the class count): the head is replaced."""
    return tiny_cnn(num_classes=5)


class _PooledHead(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def conv_head() -> nn.Module:
    """7 outputs from a convolution, no Linear head: nothing to replace for another class count."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 7, 1), _PooledHead())


def raises() -> nn.Module:
    raise RuntimeError("no GPU found")


def not_a_module():
    return {"conv": 1}


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.sum() > 0:  # control flow on values: torch.fx cannot trace it
            x = x.relu()
        return self.fc(x.mean(dim=(2, 3)))


def untraceable(num_classes: int = 10) -> nn.Module:
    return _DataDependent()


class _Tokens(nn.Module):
    """A ViT-like model: patches become tokens (N, T, D) that the blocks transform."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.block = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16), nn.GELU())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.block(tokens).mean(dim=1))


def tokens(num_classes: int = 10) -> nn.Module:
    return _Tokens(num_classes)
