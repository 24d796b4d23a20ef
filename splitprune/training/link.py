"""What passes between the two halves of a step: serialized protobuf messages through a Link (the in-process
LocalLink, or the gRPC client's RemoteEndpoint over a network: the same bytes either way), and the optimizer
settings both halves step with."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
from google.protobuf.message import Message

from splitprune.errors import ProtocolError
from splitprune.wire.codec import MAX_MESSAGE_BYTES

M = TypeVar("M", bound=Message)


def parse_message(cls: type[M], data: bytes) -> M:
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"{cls.__name__} of {len(data)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    msg = cls()
    try:
        msg.ParseFromString(data)
    except Exception as exc:
        raise ProtocolError(f"malformed {cls.__name__}: {exc}") from None
    return msg


class Link(Protocol):
    """How the device reaches the server: serialized requests in, serialized replies out."""

    def train(self, request: bytes) -> bytes: ...

    def evaluate(self, request: bytes) -> bytes: ...

    def start_phase(self, request: bytes) -> bytes: ...

    def calibrate(self, request: bytes) -> bytes: ...


@dataclass(frozen=True)
class OptimizerSettings:
    lr: float
    momentum: float
    weight_decay: float

    def build(self, module: torch.nn.Module) -> torch.optim.SGD:
        return torch.optim.SGD(module.parameters(), lr=self.lr, momentum=self.momentum,
                               weight_decay=self.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def as_float32(value: float) -> float:
    """A value as a protobuf float field carries it, so both halves step with the very same lr."""
    return float(torch.tensor(value, dtype=torch.float32))


def lr_scale(schedule: str, step: int, steps: int) -> float:
    """The fraction of the phase's lr at a step of the phase (0-based) of `steps` steps."""
    if schedule == "cosine":
        return max(0.5 * (1.0 + math.cos(math.pi * step / steps)), 1e-6)
    return 1.0
