"""The device part of a split-training step (DeviceWorker): the backbone layers up to the cut, the gated encoder,
the budget and its loss, the uplink codec; and split inference from the device side. It shares no objects with
the server part: only serialized messages pass between them, through a Link."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from splitprune.adaptive.policy import StepBudget
from splitprune.compression import (ChannelCodec, budget_loss, channel_mask, decode_labels, encode_labels,
                                    keep_channels, reset_gate)
from splitprune.compression.bottleneck import ChannelSelector, TopBByGate
from splitprune.errors import ProtocolError
from splitprune.models.randomness import private_rng
from splitprune.proto import pb
from splitprune.training.halves import DeviceHalf, Geometry, end_calibration, start_calibration
from splitprune.training.link import Link, OptimizerSettings, as_float32, parse_message, set_lr
from splitprune.training.rng import RngStream
from splitprune.wire.timing import server_seconds


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
                 selector: ChannelSelector | None = None, rate_lambda: float = 0.0, grid: int = 0) -> None:
        """`grid` L > 0: the values sent are rounded to dtype ecL's L+1 levels (--train-grid); their gradient
        passes to the unrounded values unchanged (straight through)."""
        self.half = half
        self.grid = grid
        self.rate_lambda = rate_lambda  # the rate term's weight (the half has a prior when it is > 0)
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

    @torch.no_grad()
    def cut_values(self, x: torch.Tensor) -> torch.Tensor:
        """What every channel would send for x, [N, C, H, W] (eval mode): the entropy tables count these."""
        self.half.eval()
        return keep_channels(self.half(x.to(self.accelerator)), None, channel_mask(self.half.gate_logits),
                             self.scaling)

    def _encode(self, z: torch.Tensor, channels: torch.Tensor | None) -> tuple[torch.Tensor, pb.EncodedTensor]:
        kept = keep_channels(z, channels, channel_mask(self.half.gate_logits), self.scaling)
        sent = kept.detach().mul(self.grid).round_().clamp_(0, self.grid).div_(self.grid) if self.grid else kept
        return kept, self.codec.compress(sent, channels, self.channels, self.selector.prefix)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, link: Link, lr_scale: float = 1.0,
                   step_budget: StepBudget | None = None) -> StepStats:
        """One step of both halves; lr_scale (0, 1] scales the phase's lr of both for this step.

        `step_budget` (train --budget auto) picks this step's channels, at most the phase's budget, and is told
        the sizes of the step's messages and its compute time (the server's, as its reply reports it, and this
        side's) when it is done; without it every step sends the phase's budget. The reply's server time is
        checked against the round trip measured here (ProtocolError for one that cannot be true)."""
        assert self.optimizer is not None, "start_phase first"
        limit = self.budget or self.channels
        budget = None if step_budget is None else min(step_budget.next_budget(limit), limit)
        # the budget's clock (a simulated one in tests) times the round trip, so that the server's time is
        # checked against, and later subtracted from, times on that one clock
        clock = time.perf_counter if step_budget is None else step_budget.clock
        started = clock()
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
        sent = clock()
        down = link.train(up)
        round_trip = clock() - sent
        reply = parse_message(pb.TrainReply, down)
        if reply.step_id != self.step_id:
            raise ProtocolError(f"reply to step {reply.step_id} received for step {self.step_id}")
        server = server_seconds(reply.server_us / 1e6, round_trip, "TrainReply")
        gradient = self.codec.decompress(reply.gradient)
        if tuple(gradient.values.shape) != tuple(kept.shape):
            raise ProtocolError(f"gradient shape {tuple(gradient.values.shape)} != sent {tuple(kept.shape)}")
        tensors, grads = [kept], [gradient.values.to(self.accelerator)]
        if self.use_budget_loss:
            tensors.append(budget_loss(self.half.gate_logits, self.budget or self.channels,
                                       self.budget_eps, self.budget_delta))
            grads.append(torch.ones((), device=self.accelerator))
        if self.rate_lambda > 0:
            with self.rng.active():
                self.last_rate_bits = self.half.prior.bits(kept, channels)
            tensors.append(self.rate_lambda * self.last_rate_bits)
            grads.append(torch.ones((), device=self.accelerator))
        torch.autograd.backward(tensors, grads)
        set_lr(self.optimizer, self.phase_lr * lr_scale)  # a scale the server refused never gets here
        self.optimizer.step()
        if step_budget is not None:   # this side's compute: the whole step but the round trip
            step_budget.observe(len(up), len(down), clock() - started - round_trip + server)
        return StepStats(len(y), reply.loss, reply.correct, len(up), len(down))

    def calibrate(self, batches: list[torch.Tensor], link: Link, budget: int | None = None) -> tuple[int, int]:
        """Recompute the BatchNorm statistics of both halves for the weights as they are (precise BN): the
        batches through the device half in train mode, every BatchNorm averaging them from scratch, their
        channels at `budget` on to the server, which does the same with its half. Nothing is trained and no
        random state of either side is used up. Returns (bytes up, bytes down)."""
        if not batches:
            return 0, 0
        channels = self.kept_channels(budget)
        up = down = 0
        saved = start_calibration(self.half)
        try:
            self.half.train()
            for i, x in enumerate(batches):
                self.step_id += 1
                with private_rng(), torch.no_grad():  # not held across the link: the server may need it
                    _, activations = self._encode(self.half(x.to(self.accelerator)), channels)
                request = pb.CalibrateRequest(request_id=self.step_id, activations=activations, first=i == 0,
                                              last=i == len(batches) - 1).SerializeToString()
                answer = link.calibrate(request)
                reply = parse_message(pb.CalibrateReply, answer)
                if reply.request_id != self.step_id:
                    raise ProtocolError(f"reply to request {reply.request_id} received for {self.step_id}")
                up, down = up + len(request), down + len(answer)
        finally:
            end_calibration(saved)
        return up, down

    def predict(self, x: torch.Tensor, link: Link, budget: int | None = None) -> tuple[torch.Tensor, int, int]:
        """Split inference: predicted classes, uplink and downlink bytes."""
        return self.predict_budgets(x, link, [budget])[0]

    @torch.no_grad()
    def predict_budgets(self, x: torch.Tensor, link: Link,
                        budgets: list[int | None]) -> list[tuple[torch.Tensor, int, int]]:
        """`predict` at each budget, one request each, the device half run once."""
        z = self.infer_half(x)
        out = []
        for budget in budgets:
            request_id, up = self.eval_request(z, budget)
            down = link.evaluate(up)
            out.append((self.eval_predictions(down, request_id, len(x)), len(up), len(down)))
        return out

    @torch.no_grad()
    def infer_half(self, x: torch.Tensor) -> torch.Tensor:
        """The device half's output for inference (what `eval_request` encodes at any budget)."""
        self.half.eval()
        return self.half(x.to(self.accelerator))

    @torch.no_grad()
    def eval_request(self, z: torch.Tensor, budget: int | None) -> tuple[int, bytes]:
        """(request id, EvalRequest) of the half's output `z` at `budget`, in this worker's codec."""
        self.step_id += 1
        _, activations = self._encode(z, self.kept_channels(budget))
        return self.step_id, pb.EvalRequest(request_id=self.step_id, activations=activations).SerializeToString()

    def eval_predictions(self, down: bytes, request_id: int, count: int) -> torch.Tensor:
        """The predicted classes of an EvalReply, refused unless it answers `request_id`."""
        reply = parse_message(pb.EvalReply, down)
        if reply.request_id != request_id:
            raise ProtocolError(f"reply to request {reply.request_id} received for {request_id}")
        return decode_labels(reply.predictions, count, self.num_classes)
