"""The server part of a split-training step (ServerWorker): decodes and checks what the device sent, runs the
decoder and the server layers, returns encoded gradients or predictions; and LocalLink, the in-process link
to it. It shares no objects with the device part: only serialized messages pass between them."""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Callable

import numpy as np
import torch

from splitprune.compression import ChannelCodec, TensorSpec, decode_labels, encode_labels
from splitprune.compression.codec import Decoded
from splitprune.errors import ProtocolError
from splitprune.models.randomness import private_rng
from splitprune.proto import pb
from splitprune.training.checkpoint import load_module, load_optimizer, module_tensors, optimizer_tensors
from splitprune.training.halves import Calibration, Geometry, ServerHalf, end_calibration, start_calibration
from splitprune.training.link import OptimizerSettings, parse_message, set_lr
from splitprune.training.objectives import CrossEntropy, Objective
from splitprune.training.rng import RngStream
from splitprune.wire.codec import kept_count
from splitprune.wire.refusals import BadMessage, BadTensor, BudgetExceeded, NoPhase
from splitprune.wire.timing import microseconds


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
                 seed: int, max_batch: int = 4096, objective: Objective | None = None,
                 steps: int = 1, tables: dict[int, np.ndarray] | None = None) -> None:
        self.half = half
        self.objective: Objective = objective or CrossEntropy()
        self.steps = steps
        self.num_classes = num_classes
        self.codec = codec_down
        self.geometry = geometry
        self.spec = TensorSpec(*geometry.wire_shape, max_batch=max_batch, tables=tables)
        # a training request keeps the objective's forward passes for its backward: the network server
        # sizes its limit apart from the evaluation one (server.hosting)
        self.max_train_batch = max_batch
        self.rng = RngStream(seed + 1)
        self.optimizer: torch.optim.SGD | None = None
        self._calibration: Calibration | None = None   # a calibration round in progress (its BatchNorms' momenta)
        self._calibrated = 0
        self.phase_lr = 0.0
        self.budget: int | None = None
        self.phase = -1

    @property
    def accelerator(self) -> torch.device:
        return next(self.half.parameters()).device

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything a resume needs, as checkpoint tensors: the half's weights ("server.*"), its optimizer's
        momentum buffers ("opt.server.*", in a phase) and its random state ("rng.server")."""
        tensors = module_tensors("server", self.half)
        if self.optimizer is not None:
            tensors.update(optimizer_tensors("opt.server", self.optimizer, self.half))
        tensors["rng.server"] = self.rng.state.clone()
        return tensors

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """The tensors of `state_tensors`, into this worker (its phase's optimizer started first)."""
        load_module("server", self.half, tensors)
        if self.optimizer is not None:
            load_optimizer("opt.server", self.optimizer, self.half, tensors)
        if "rng.server" in tensors:
            self.rng.state = tensors["rng.server"].clone()

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
            return self.codec.decompress(t, spec)
        except ProtocolError as exc:
            raise BadTensor(str(exc)) from None

    def calibrate(self, req: pb.CalibrateRequest, dtype: int | None = None,
                  max_kept: int | None = None) -> pb.CalibrateReply:
        """One batch of a calibration round (precise BN): its activations through the half in train mode, every
        BatchNorm averaging the round's batches from scratch; nothing is trained, no random state is used up."""
        received = self._decode(req.activations, dtype, max_kept).to(self.accelerator)
        if req.first or self._calibration is None:
            self.end_calibration()
            self._calibration, self._calibrated = start_calibration(self.half), 0
        with private_rng(), torch.no_grad():
            self.half.train()
            self.half(received.dense(), received.channels.numel())
        self._calibrated += 1
        batches = self._calibrated
        if req.last:
            self.end_calibration()
        return pb.CalibrateReply(request_id=req.request_id, batches=batches)

    def end_calibration(self) -> None:
        """Back to running statistics (a round a client left unfinished ends at the next step or evaluation)."""
        if self._calibration is not None:
            end_calibration(self._calibration)
            self._calibration = None

    def train(self, req: pb.TrainRequest, dtype: int | None = None, max_kept: int | None = None) -> pb.TrainReply:
        if self.optimizer is None:
            raise NoPhase("no training phase started: send a PhaseRequest first")
        start = time.perf_counter()
        self.end_calibration()
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
                gradient = self.codec.compress(compact.grad, received.channels.cpu() if partial else None,
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
        # read before the clock: both wait for the accelerator's queued work, which is part of the step's time
        correct, loss_value = int((logits.detach().argmax(1) == labels).sum()), loss.item()
        return pb.TrainReply(step_id=req.step_id, gradient=gradient, loss=loss_value, correct=correct,
                             server_us=microseconds(time.perf_counter() - start))

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
        self.end_calibration()
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

    def calibrate(self, request: bytes) -> bytes:
        return self.server.calibrate(parse_message(pb.CalibrateRequest, request)).SerializeToString()
