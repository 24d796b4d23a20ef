"""One synchronisation of a hosted half across the replicas of a tier (torch.distributed collectives).

What is averaged: every parameter, the float BatchNorm buffers (running mean and variance) and, when
every replica is in the same phase, the SGD momentum buffers (a missing buffer counts as zeros, which
is what SGD without dampening starts from). Integer buffers (BatchNorm's num_batches_tracked) take the
largest value. The average is weighted: replica r contributes weights[r] / sum(weights) (the samples it
trained since the last synchronisation, see replicas.py), so a replica whose half was idle does not
dilute the others' progress and a weight of 1 on one replica copies its state exactly (x*1 + 0 = x).

After the all-reduce every replica hashes the result and the hashes are compared (all-gather): gloo's
ring all-reduce hands every rank the same bits, but this is checked each time, not assumed; on a
mismatch rank 0's result is broadcast and written instead, and counted.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from splitprune.server.hosting import HostedHalf


@dataclass
class Synced:
    digest: str        # sha256 of the averaged state, identical on every replica (checked)
    mismatches: int    # 1 when the replicas' results differed and rank 0's was broadcast instead
    elements: int      # float values all-reduced


def _float_tensors(half: HostedHalf, momentum: bool) -> list[torch.Tensor]:
    module = half.worker.half
    tensors = [p.data for p in module.parameters()]
    tensors += [b for b in module.buffers() if b.is_floating_point()]
    if momentum:
        optimizer = half.worker.optimizer
        for p in module.parameters():
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:  # SGD (no dampening) starts its buffer from zeros
                state["momentum_buffer"] = torch.zeros_like(p.data)
            tensors.append(state["momentum_buffer"])
    return tensors


def _int_tensors(half: HostedHalf) -> list[torch.Tensor]:
    return [b for b in half.worker.half.buffers() if not b.is_floating_point()]


def _digest(flat: torch.Tensor, ints: torch.Tensor) -> bytes:
    h = hashlib.sha256(memoryview(flat.detach().cpu().numpy()).cast("B"))  # no copy of the bytes
    h.update(memoryview(ints.detach().cpu().numpy()).cast("B"))
    return h.digest()


def _same_everywhere(digest: bytes, world: int) -> bool:
    mine = torch.frombuffer(bytearray(digest), dtype=torch.uint8)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def average_half(half: HostedHalf, weight: float, total: float, momentum: bool) -> Synced:
    """Replace the half's state by the weighted average over the tier (caller holds half.mutex; every
    replica calls this for the same half, in the same order, with the same `total` and `momentum`)."""
    floats = _float_tensors(half, momentum)
    ints = _int_tensors(half)
    flat = torch.cat([t.reshape(-1) for t in floats]).to(torch.float32)
    flat.mul_(weight / total)
    stacked = torch.stack([t.reshape(()) for t in ints]) if ints else torch.zeros(0, dtype=torch.int64)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    if stacked.numel():
        dist.all_reduce(stacked, op=dist.ReduceOp.MAX)
    digest = _digest(flat, stacked)
    mismatches = 0
    if not _same_everywhere(digest, dist.get_world_size()):
        mismatches = 1
        dist.broadcast(flat, src=0)
        dist.broadcast(stacked, src=0)
        digest = _digest(flat, stacked)
    offset = 0
    with torch.no_grad():
        for t in floats:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        for t, value in zip(ints, stacked):
            t.fill_(value)
    half.bump()
    return Synced(digest.hex(), mismatches, flat.numel())


def plan_weights(entries: list[dict]) -> tuple[list[float], bool]:
    """Each replica's weight for one half, from what every replica reported of it (a list indexed by
    rank: {"joined", "samples", "saved_ns"}), and whether anything must travel at all.

    - Replicas that hold the tier's half (joined) weigh by the samples they trained since the last
      synchronisation; a replica that built or loaded the half since (not joined) weighs 0: it adopts
      the tier's state. With no samples anywhere, the lowest joined replica's state is copied.
    - When no replica has joined yet (the tier's first round, or a half first opened now): the newest
      save wins (a restarted tier continues from it), else the samples, else the lowest replica.
    """
    joined = [r for r, e in enumerate(entries) if e["joined"]]
    samples = [float(e["samples"]) for e in entries]
    if joined:
        weights = [samples[r] if r in joined else 0.0 for r in range(len(entries))]
        if sum(weights) == 0:
            weights = [1.0 if r == joined[0] else 0.0 for r in range(len(entries))]
        needed = any(not e["joined"] for e in entries) or sum(samples) > 0
        return weights, needed
    saved = [int(e["saved_ns"]) for e in entries]
    if max(saved) > 0:
        newest = saved.index(max(saved))
        return [1.0 if r == newest else 0.0 for r in range(len(entries))], True
    if sum(samples) > 0:
        return samples, True
    return [1.0 if r == 0 else 0.0 for r in range(len(entries))], True
