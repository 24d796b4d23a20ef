"""Stacked server steps: several clients' requests to one ServerWorker in one forward (and backward).

Each request is checked and decoded on its own, with its own session's dtype and budget limit, exactly
as ServerWorker checks a lone request; one that fails gets its own refusal and never enters the stack.
The survivors' dense cut tensors [N_i, C, H, W] are concatenated in request order:

- evaluate_stacked: one eval-mode forward; each request gets the argmax of its own rows.
- train_stacked: one train-mode forward over the union, loss = mean cross-entropy over the union's
  N = sum N_i samples, one backward, one optimizer step. Request i gets d(loss)/d(its decoded kept
  values), i.e. its own slice of the union's gradient (N_i/N times what a lone step over its batch would
  give), encoded with its own kept channels; its reply's loss and correct count are of its own samples.
  If any slice is not finite, the stacked step is undone (batch-norm statistics, random state) and
  every request runs alone, in order, through ServerWorker.train: the bad one is refused as it would
  be alone (and its forward undone too), the others are applied one at a time.

Callers hold the half's lock, as for ServerWorker.train/evaluate.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from splitprune.compression import decode_labels, encode_labels
from splitprune.compression.codec import Decoded
from splitprune.errors import ProtocolError
from splitprune.proto import pb
from splitprune.training.link import set_lr
from splitprune.training.objectives import CrossEntropy
from splitprune.training.server_worker import ServerWorker, check_lr_scale
from splitprune.wire.refusals import BadTensor, NoPhase, Refusal
from splitprune.wire.timing import microseconds


@dataclass(frozen=True)
class Request:
    """One client's request with its session's narrowing rules (as ServerWorker.train/evaluate take them)."""

    message: pb.TrainRequest | pb.EvalRequest
    dtype: int | None = None
    max_kept: int | None = None


def as_refusal(exc: ProtocolError) -> Refusal:
    return exc if isinstance(exc, Refusal) else BadTensor(str(exc))


def _decode(worker: ServerWorker, r: Request, budget: int | None, training: bool = False) -> Decoded:
    return worker._decode(r.message.activations, r.dtype, budget, training).to(worker.accelerator)


def _dense(received: Decoded, values: torch.Tensor) -> torch.Tensor:
    partial = received.channels.numel() < received.num_channels
    return Decoded(values, received.channels, received.num_channels).dense() if partial else values


@torch.no_grad()
def evaluate_stacked(worker: ServerWorker, requests: list[Request]) -> list[pb.EvalReply | Refusal]:
    """Predictions for every request from one eval-mode forward over the stack of the valid ones."""
    worker.end_calibration()
    out: list[pb.EvalReply | Refusal | None] = [None] * len(requests)
    valid: list[tuple[int, Decoded]] = []
    for i, r in enumerate(requests):
        try:
            valid.append((i, _decode(worker, r, r.max_kept)))
        except ProtocolError as exc:
            out[i] = as_refusal(exc)
    # one forward per number of channels received: an any-budget decoder normalises by it (its budget)
    groups: dict[int, list[tuple[int, Decoded]]] = {}
    for i, d in valid:
        groups.setdefault(d.channels.numel(), []).append((i, d))
    for kept, group in groups.items():
        with worker.rng.active():
            worker.half.eval()
            logits = worker.half(torch.cat([d.dense() for _, d in group]), kept)
        predictions = logits.argmax(1).split([d.values.shape[0] for _, d in group])
        for (i, _), p in zip(group, predictions):
            out[i] = pb.EvalReply(request_id=requests[i].message.request_id, predictions=encode_labels(p))
    return out  # type: ignore[return-value]


def _receive(worker: ServerWorker, r: Request) -> tuple[Decoded, torch.Tensor]:
    """A TrainRequest's checks and decoding, as ServerWorker.train does them."""
    check_lr_scale(r.message.lr_scale)
    budget = worker.budget if r.max_kept is None else min(r.max_kept, worker.budget or r.max_kept)
    received = _decode(worker, r, budget, training=True)
    try:
        labels = decode_labels(r.message.labels, received.values.shape[0], worker.num_classes)
    except ProtocolError as exc:
        raise BadTensor(str(exc)) from None
    return received, labels.to(worker.accelerator)


def train_stacked(worker: ServerWorker, requests: list[Request]) -> list[pb.TrainReply | Refusal]:
    """One optimizer step over the union of the valid requests' batches (module docstring). All requests
    carry the same lr_scale (the batcher stacks only those). Every reply's server_us is the time of this
    whole call, the stacked step it was part of (or the lone steps run in its stead, one after the other):
    no reply leaves before all of them are done, so that is the server's time for each of them."""
    if worker.optimizer is None:
        return [NoPhase("no training phase started: send a PhaseRequest first") for _ in requests]
    start = time.perf_counter()
    out = _train_stacked(worker, requests)
    took = microseconds(time.perf_counter() - start)
    for reply in out:
        if isinstance(reply, pb.TrainReply):
            reply.server_us = took
    return out


def _train_stacked(worker: ServerWorker, requests: list[Request]) -> list[pb.TrainReply | Refusal]:
    worker.end_calibration()
    out: list[pb.TrainReply | Refusal | None] = [None] * len(requests)
    valid: list[tuple[int, Decoded, torch.Tensor]] = []
    for i, r in enumerate(requests):
        try:
            valid.append((i, *_receive(worker, r)))
        except ProtocolError as exc:
            out[i] = as_refusal(exc)
    # nothing to stack: exactly the lone step; an any-budget half's loss over nested prefixes of each
    # request's channels is not one cross-entropy over the union, so its steps run alone too
    if len(valid) == 1 or not isinstance(worker.objective, CrossEntropy):
        return _one_at_a_time(worker, requests, out)
    if valid:
        replies = _union_step(worker, [requests[i] for i, _, _ in valid], [(d, y) for _, d, y in valid])
        if replies is None:
            return _one_at_a_time(worker, requests, out)
        for (i, _, _), reply in zip(valid, replies):
            out[i] = reply
    return out  # type: ignore[return-value]


def _union_step(worker: ServerWorker, requests: list[Request],
                received: list[tuple[Decoded, torch.Tensor]]) -> list[pb.TrainReply] | None:
    """The stacked step; None (and nothing changed) when a gradient slice is not finite."""
    assert worker.optimizer is not None
    undo = worker.undo_point()
    lr_scale = check_lr_scale(requests[0].message.lr_scale)
    with worker.rng.active():
        worker.half.train()
        leaves = [d.values.requires_grad_() for d, _ in received]
        labels = torch.cat([y for _, y in received])
        logits = worker.half(torch.cat([_dense(d, v) for (d, _), v in zip(received, leaves)]))
        loss = F.cross_entropy(logits, labels)
        worker.optimizer.zero_grad(set_to_none=True)
        set_lr(worker.optimizer, worker.phase_lr * lr_scale)
        loss.backward()
        try:
            gradients = [worker.codec.compress(v.grad, d.channels.cpu() if d.channels.numel() < d.num_channels
                                             else None, d.num_channels) for (d, _), v in zip(received, leaves)]
        except ProtocolError:  # the codec refuses a non-finite gradient
            gradients = None
        if gradients is not None:
            worker.optimizer.step()
    if gradients is None:
        undo()
        return None
    replies = []
    rows = logits.detach().split([d.values.shape[0] for d, _ in received])
    for r, (d, y), own, gradient in zip(requests, received, rows, gradients):
        replies.append(pb.TrainReply(step_id=r.message.step_id, gradient=gradient,
                                     loss=F.cross_entropy(own, y).item(), correct=int((own.argmax(1) == y).sum())))
    return replies


def _one_at_a_time(worker: ServerWorker, requests: list[Request],
                   out: list[pb.TrainReply | Refusal | None]) -> list[pb.TrainReply | Refusal]:
    """Every request not refused yet runs alone through ServerWorker.train, in order; a refused one
    leaves no trace (ServerWorker.train alone would keep its batch-norm statistics)."""
    for i, r in enumerate(requests):
        if out[i] is None:
            undo = worker.undo_point()
            try:
                out[i] = worker.train(r.message, r.dtype, r.max_kept)
            except ProtocolError as exc:
                undo()
                out[i] = as_refusal(exc)
    return out  # type: ignore[return-value]
