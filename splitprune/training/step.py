"""One split-training step, shared by every method, in-process and over a network.

The device part (DeviceWorker) and the server part (ServerWorker) share no objects: only serialized
protobuf messages pass between them, through a Link. LocalLink calls the server in the same process;
the gRPC client in splitprune.transport is the same Link over a real network.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Protocol, TypeVar

import torch
from google.protobuf.message import Message

from splitprune.adaptive.policy import StepBudget
from splitprune.compression import (ChannelCodec, TensorSpec, budget_loss, channel_mask, decode_labels,
                                    decode_tensor, encode_labels, keep_channels, reset_gate)
from splitprune.compression.bottleneck import ChannelSelector, TopBByGate
from splitprune.compression.codec import MAX_MESSAGE_BYTES, Decoded
from splitprune.errors import ProtocolError
from splitprune.proto import pb
from splitprune.training.halves import DeviceHalf, Geometry, ServerHalf
from splitprune.training.objectives import CrossEntropy, ServerObjective
from splitprune.training.rng import RngStream
from splitprune.transport.errors import BadMessage, BadTensor, BudgetExceeded, NoPhase
from splitprune.wire import kept_count

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


def check_lr_scale(scale: float) -> float:
    """A TrainRequest's lr_scale as a factor: 0 (unset) means 1; outside [0, 1] is refused."""
    if not math.isfinite(scale) or not 0.0 <= scale <= 1.0:
        raise BadMessage(f"lr_scale {scale} is outside [0, 1]")
    return scale or 1.0


def check_phase(req: pb.PhaseRequest, channels: int) -> int:
    """A PhaseRequest's settings; returns its budget (0 = all channels)."""
    for name in ("lr", "momentum", "weight_decay"):
        value = getattr(req, name)
        if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
            kind = "positive" if name == "lr" else "non-negative"
            raise BadMessage(f"phase {name} must be a finite {kind} number, got {value}")
    if req.budget > channels:
        raise BudgetExceeded(f"budget {req.budget} exceeds the {channels} channels at the cut")
    return req.budget or channels


def check_kept(t: pb.EncodedTensor, budget: int | None) -> None:
    """At most `budget` channels (None: any), read from the header before anything is decoded."""
    k = kept_count(t)
    if budget is not None and k > budget:
        raise BudgetExceeded(f"{k} channels sent but the budget is {budget}")


class ServerWorker:
    """The server part: decodes activations, runs decoder + server layers, returns encoded gradients.

    It never sees device parameters or the budget term. Every rule of a request is checked here, once,
    before anything is decoded or computed; `dtype` and `max_kept` narrow them for one network session.
    It holds no lock: the network server applies updates of a shared half one at a time under its own.
    `objective`: the loss it trains on (default: cross-entropy; any-budget models: nested prefixes).
    `steps`: optimizer steps per training request; the device's gradient comes from the first, the others
    run the objective again on the same activations (they cost server compute only).
    """

    def __init__(self, half: ServerHalf, geometry: Geometry, num_classes: int, codec_down: ChannelCodec,
                 seed: int, max_batch: int = 4096, objective: ServerObjective | None = None,
                 steps: int = 1) -> None:
        self.half = half
        self.objective: ServerObjective = objective or CrossEntropy()
        self.steps = steps
        self.num_classes = num_classes
        self.codec = codec_down
        self.spec = TensorSpec(*geometry.wire_shape, max_batch=max_batch)
        # a training request keeps the objective's forward passes for its backward: the network server
        # sizes its limit apart from the evaluation one (transport.hosting)
        self.max_train_batch = max_batch
        self.rng = RngStream(seed + 1)
        self.optimizer: torch.optim.SGD | None = None
        self.phase_lr = 0.0
        self.budget: int | None = None
        self.phase = -1

    @property
    def accelerator(self) -> torch.device:
        return next(self.half.parameters()).device

    def start_phase(self, req: pb.PhaseRequest) -> pb.PhaseReply:
        budget = check_phase(req, self.spec.channels)
        self.optimizer = OptimizerSettings(req.lr, req.momentum, req.weight_decay).build(self.half)
        self.phase_lr, self.budget, self.phase = req.lr, budget, req.phase
        return pb.PhaseReply(phase=req.phase)

    def _decode(self, t: pb.EncodedTensor, dtype: int | None, budget: int | None,
                training: bool = False) -> Decoded:
        check_kept(t, budget)
        spec = self.spec if dtype is None else replace(self.spec, dtypes=(dtype,))
        if training:
            spec = replace(spec, max_batch=min(spec.max_batch, self.max_train_batch))
        try:
            return decode_tensor(t, spec)
        except ProtocolError as exc:
            raise BadTensor(str(exc)) from None

    def train(self, req: pb.TrainRequest, dtype: int | None = None, max_kept: int | None = None) -> pb.TrainReply:
        if self.optimizer is None:
            raise NoPhase("no training phase started: send a PhaseRequest first")
        lr_scale = check_lr_scale(req.lr_scale)
        budget = self.budget if max_kept is None else min(max_kept, self.budget or max_kept)
        received = self._decode(req.activations, dtype, budget, training=True)
        try:
            labels = decode_labels(req.labels, received.values.shape[0], self.num_classes)
        except ProtocolError as exc:
            raise BadTensor(str(exc)) from None
        labels, received = labels.to(self.accelerator), received.to(self.accelerator)
        partial = received.channels.numel() < received.num_channels
        undo = self.undo_point()
        try:
            with self.rng.active():
                self.half.train()
                compact = received.values.requires_grad_()
                loss, logits = self.objective(self.half, received, compact, labels)
                self.optimizer.zero_grad(set_to_none=True)
                set_lr(self.optimizer, self.phase_lr * lr_scale)
                loss.backward()
                # encoding refuses a non-finite gradient: a diverged step is reported, never applied
                gradient = self.codec.encode(compact.grad, received.channels.cpu() if partial else None,
                                             received.num_channels, received.prefix)
                self.optimizer.step()
                for _ in range(self.steps - 1):
                    self.optimizer.zero_grad(set_to_none=True)
                    again, _ = self.objective(self.half, received, compact.detach(), labels)
                    if not torch.isfinite(again):   # a diverged extra step is not applied either
                        break
                    again.backward()
                    self.optimizer.step()
        except ProtocolError:
            undo()  # nor are its batch-norm statistics kept
            raise
        correct = int((logits.detach().argmax(1) == labels).sum())
        return pb.TrainReply(step_id=req.step_id, gradient=gradient, loss=loss.item(), correct=correct)

    def undo_point(self) -> Callable[[], None]:
        """What a refused step's forward changes (batch-norm statistics, random state), to be put back."""
        buffers = {name: b.clone() for name, b in self.half.named_buffers()}
        rng_state = self.rng.state

        def undo() -> None:
            with torch.no_grad():
                for name, b in self.half.named_buffers():
                    b.copy_(buffers[name])
            self.rng.state = rng_state
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)

        return undo

    @torch.no_grad()
    def evaluate(self, req: pb.EvalRequest, dtype: int | None = None, max_kept: int | None = None) -> pb.EvalReply:
        received = self._decode(req.activations, dtype, max_kept).to(self.accelerator)
        with self.rng.active():
            self.half.eval()
            logits = self.half(received.dense(), received.channels.numel())
        return pb.EvalReply(request_id=req.request_id, predictions=encode_labels(logits.argmax(1)))


class LocalLink:
    """The in-process link: every message still goes through its serialized bytes."""

    def __init__(self, server: ServerWorker) -> None:
        self.server = server

    def train(self, request: bytes) -> bytes:
        return self.server.train(parse_message(pb.TrainRequest, request)).SerializeToString()

    def evaluate(self, request: bytes) -> bytes:
        return self.server.evaluate(parse_message(pb.EvalRequest, request)).SerializeToString()

    def start_phase(self, request: bytes) -> bytes:
        return self.server.start_phase(parse_message(pb.PhaseRequest, request)).SerializeToString()


@dataclass
class StepStats:
    samples: int
    loss: float
    correct: int
    bytes_up: int
    bytes_down: int


class DeviceWorker:
    """The device part: backbone layers, the gated encoder, the budget and its loss, the codec uplink."""

    def __init__(self, half: DeviceHalf, geometry: Geometry, num_classes: int, codec_up: ChannelCodec,
                 scaling: str = "paper", budget_eps: float = 1000.0, budget_delta: float = 0.01, seed: int = 0,
                 selector: ChannelSelector | None = None) -> None:
        self.half = half
        self.selector: ChannelSelector = selector or TopBByGate()
        self.geometry = geometry
        self.num_classes = num_classes
        self.codec = codec_up
        self.scaling = scaling
        self.budget_eps, self.budget_delta = budget_eps, budget_delta
        self.rng = RngStream(seed + 2)
        self.optimizer: torch.optim.SGD | None = None
        self.phase_lr = 0.0
        self.budget: int | None = None      # None = every channel
        self.use_budget_loss = False
        self.step_id = 0

    @property
    def channels(self) -> int:
        return self.geometry.channels

    @property
    def accelerator(self) -> torch.device:
        return self.half.gate_logits.device

    def start_phase(self, link: Link, phase: int, budget: int | None, optimizer: OptimizerSettings,
                    use_budget_loss: bool) -> None:
        self.budget, self.use_budget_loss = budget, use_budget_loss and self.selector.uses_budget_loss
        self.optimizer = optimizer.build(self.half)
        self.phase_lr = as_float32(optimizer.lr)
        req = pb.PhaseRequest(phase=phase, budget=budget or self.channels, lr=optimizer.lr,
                              momentum=optimizer.momentum, weight_decay=optimizer.weight_decay)
        reply = parse_message(pb.PhaseReply, link.start_phase(req.SerializeToString()))
        if reply.phase != phase:
            raise ProtocolError(f"server acknowledged phase {reply.phase}, expected {phase}")

    def reset_gate(self, threshold: float, low_max: float, high: float) -> int:
        with self.rng.active():
            return reset_gate(self.half.gate_logits, threshold, low_max, high)

    def kept_channels(self, budget: int | None = None) -> torch.Tensor | None:
        budget = self.budget if budget is None else budget
        if budget is None or budget >= self.channels:
            return None
        return self.selector.select(self.half.gate_logits, budget)

    def _encode(self, z: torch.Tensor, channels: torch.Tensor | None) -> tuple[torch.Tensor, pb.EncodedTensor]:
        kept = keep_channels(z, channels, channel_mask(self.half.gate_logits), self.scaling)
        return kept, self.codec.encode(kept, channels, self.channels, self.selector.prefix)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, link: Link, lr_scale: float = 1.0,
                   step_budget: StepBudget | None = None) -> StepStats:
        """One step of both halves; lr_scale (0, 1] scales the phase's lr of both for this step.

        `step_budget` (train --budget auto) picks this step's channels, at most the phase's budget, and is told
        the sizes of the step's messages when it is done; without it every step sends the phase's budget."""
        assert self.optimizer is not None, "start_phase first"
        limit = self.budget or self.channels
        budget = None if step_budget is None else min(step_budget.next_budget(limit), limit)
        lr_scale = as_float32(lr_scale)
        self.step_id += 1
        self.half.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.rng.active():
            z = self.half(x.to(self.accelerator))
        channels = self.kept_channels(budget)
        kept, activations = self._encode(z, channels)
        request = pb.TrainRequest(step_id=self.step_id, activations=activations, labels=encode_labels(y),
                                  lr_scale=0.0 if lr_scale == 1.0 else lr_scale)
        up = request.SerializeToString()
        down = link.train(up)
        reply = parse_message(pb.TrainReply, down)
        if reply.step_id != self.step_id:
            raise ProtocolError(f"reply to step {reply.step_id} received for step {self.step_id}")
        gradient = decode_tensor(reply.gradient)
        if tuple(gradient.values.shape) != tuple(kept.shape):
            raise ProtocolError(f"gradient shape {tuple(gradient.values.shape)} != sent {tuple(kept.shape)}")
        tensors, grads = [kept], [gradient.values.to(self.accelerator)]
        if self.use_budget_loss:
            tensors.append(budget_loss(self.half.gate_logits, self.budget or self.channels,
                                       self.budget_eps, self.budget_delta))
            grads.append(torch.ones((), device=self.accelerator))
        torch.autograd.backward(tensors, grads)
        set_lr(self.optimizer, self.phase_lr * lr_scale)  # a scale the server refused never gets here
        self.optimizer.step()
        if step_budget is not None:
            step_budget.observe(len(up), len(down))
        return StepStats(len(y), reply.loss, reply.correct, len(up), len(down))

    def predict(self, x: torch.Tensor, link: Link, budget: int | None = None) -> tuple[torch.Tensor, int, int]:
        """Split inference: predicted classes, uplink and downlink bytes."""
        return self.predict_budgets(x, link, [budget])[0]

    @torch.no_grad()
    def predict_budgets(self, x: torch.Tensor, link: Link,
                        budgets: list[int | None]) -> list[tuple[torch.Tensor, int, int]]:
        """`predict` at each budget, one request each, the device half run once."""
        self.half.eval()
        z = self.half(x.to(self.accelerator))
        out = []
        for budget in budgets:
            self.step_id += 1
            _, activations = self._encode(z, self.kept_channels(budget))
            up = pb.EvalRequest(request_id=self.step_id, activations=activations).SerializeToString()
            down = link.evaluate(up)
            reply = parse_message(pb.EvalReply, down)
            if reply.request_id != self.step_id:
                raise ProtocolError(f"reply to request {reply.request_id} received for {self.step_id}")
            out.append((decode_labels(reply.predictions, len(x), self.num_classes), len(up), len(down)))
        return out
