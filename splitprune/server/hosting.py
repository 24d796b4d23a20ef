"""Hosted server halves: one per config fingerprint, shared by every session with that fingerprint.

A HostedHalf owns the ServerWorker, the per-client step records and the half's mutex: every update
(step, phase, state load) and every read of its state happens under that one lock. It also sizes the
largest batch a request may carry from what one sample costs in memory (the stated per-request bound).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from math import prod

import torch

from splitprune.config import RunConfig
from splitprune.errors import UserError
from splitprune.proto import pb
from splitprune.server.config import DEFAULT_REQUEST_MB, MIB
from splitprune.training.checkpoint import module_tensors, state_to_bytes, weights_digest
from splitprune.training.server_worker import ServerWorker
from splitprune.training.setup import build_server_worker, load_checkpoint
from splitprune.wire.refusals import BadState

MAX_CLIENT_RECORDS = 1024  # per half; the least recently used record of a detached client goes first
DEFAULT_REQUEST_MEMORY = int(DEFAULT_REQUEST_MB * MIB)  # bytes (serve --max-request-mb)
BATCH_CEILING = 4096


@dataclass
class ClientRecord:
    """What the server remembers of one client id on one half: its last applied step and that reply."""

    last_step: int = 0
    digest: bytes = b""
    reply: bytes = b""  # framed ServerMessage answering last_step


def sample_bytes(worker: ServerWorker, wire_shape: tuple[int, int, int]) -> tuple[int, int]:
    """Memory one sample costs an (evaluation, training) request, an upper estimate: the dense cut tensor
    and every layer's output, each kept for the backward pass and matched by a gradient of its size: 2 x 4
    bytes per value; the layers' outputs once per forward pass a training step keeps (the objective's
    `passes`: the any-budget sandwich keeps three). An evaluation keeps nothing for a backward; it is sized
    as one pass of a training step. One forward of one sample counts the layers' outputs for both."""
    values = 0

    def count(_module, _inputs, output) -> None:
        nonlocal values
        if isinstance(output, torch.Tensor):
            values += output.numel()

    leaves = [m for m in worker.half.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    was_training = worker.half.training
    try:
        worker.half.eval()  # eval mode: no batch statistics change, no randomness drawn
        with torch.no_grad():
            worker.half(torch.zeros(1, *wire_shape, device=worker.accelerator))
    finally:
        for h in handles:
            h.remove()
        worker.half.train(was_training)
    cut = prod(wire_shape)
    return 8 * (cut + values), 8 * (cut + worker.objective.passes * values)


class HostedHalf:
    """A server half for one config fingerprint."""

    def __init__(self, cfg: RunConfig, num_classes: int, in_channels: int, read_only: bool = False,
                 source: str = "", accelerator: str = "cpu", max_batch: int | None = None,
                 request_memory: int = DEFAULT_REQUEST_MEMORY, worker: ServerWorker | None = None,
                 weights_files: dict[str, str] | None = None, initial: bool = True) -> None:
        """`worker`: a server worker of `cfg` already loaded (a trained model); default: a fresh one, from the
        file of `weights_files` (SHA-256 -> path) the config names, if any. `initial` False: its state is
        loaded next (the weights file is not needed)."""
        self.weights = (weights_files or {}).get(cfg.weights_sha256 or "")
        self.cfg = cfg
        self.accelerator = accelerator
        self.fingerprint = cfg.fingerprint()
        self.num_classes, self.in_channels = num_classes, in_channels
        self.read_only, self.source = read_only, source
        self.requested_batch, self.request_memory = max_batch, request_memory
        self.mutex = threading.Lock()  # the one lock of every update and every state read
        self.clients: dict[str, ClientRecord] = {}
        self.phase_req: pb.PhaseRequest | None = None
        self.version = 1
        self.saved_version = 0
        self._digest_cache: tuple[int, str] | None = None
        self._build(worker, initial)

    def _build(self, worker: ServerWorker | None = None, initial: bool = True) -> None:
        if worker is None:
            worker, _ = build_server_worker(self.cfg, self.num_classes, self.in_channels, self.weights, initial)
        geometry = worker.geometry
        if self.accelerator == "cuda":  # the server's choice (serve --accelerator), whatever the client's config says
            worker.half.cuda()
        self.worker: ServerWorker = worker
        self.geometry = geometry
        self.channels = geometry.wire_shape[0]
        self.sample_bytes, self.train_sample_bytes = sample_bytes(worker, geometry.wire_shape)
        self.max_batch = self.requested_batch or self._fits(self.sample_bytes)
        self.max_train_batch = self.requested_batch or self._fits(self.train_sample_bytes)
        worker.spec = replace(worker.spec, max_batch=self.max_batch)
        worker.max_train_batch = self.max_train_batch

    def _fits(self, per_sample: int) -> int:
        return min(BATCH_CEILING, max(1, self.request_memory // per_sample))

    @property
    def budget(self) -> int:
        return self.worker.budget or self.channels

    @property
    def phase(self) -> int:
        return self.phase_req.phase if self.phase_req is not None else -1

    def reset(self) -> None:
        """A new run: weights, optimizer and random state as the config's seed makes them (mutex held)."""
        self._build()
        self.clients.clear()
        self.phase_req = None
        self.version += 1

    def record(self, client_id: str, keep: list[str] | tuple = ()) -> ClientRecord:
        """This client's record, now the most recently used; the oldest records of clients not in `keep`
        are forgotten beyond MAX_CLIENT_RECORDS (mutex held)."""
        record = self.clients.pop(client_id, None) or ClientRecord()
        if len(self.clients) >= MAX_CLIENT_RECORDS:
            for old in [c for c in self.clients if c not in keep][:len(self.clients) + 1 - MAX_CLIENT_RECORDS]:
                del self.clients[old]
        self.clients[client_id] = record
        return record

    def bump(self) -> None:
        self.version += 1

    def start_phase(self, req: pb.PhaseRequest) -> bool:
        """Start a phase unless it is the current one (a reconnect keeps momentum buffers); mutex held."""
        if self.phase_req == req:
            return False
        self.worker.start_phase(req)
        self.phase_req = pb.PhaseRequest()
        self.phase_req.CopyFrom(req)
        self.bump()
        return True

    # -- state (caller holds the mutex) ---------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.worker.state_tensors()

    def state_bytes(self) -> tuple[int, bytes]:
        """(version, the safetensors file of weights, optimizer buffers and random state); not cached:
        a hosted half holds no copy of its state between requests."""
        return self.version, state_to_bytes(self.state_tensors())

    def digest(self) -> str:
        if self._digest_cache is None or self._digest_cache[0] != self.version:
            self._digest_cache = (self.version, weights_digest(module_tensors("server", self.worker.half)))
        return self._digest_cache[1]

    def state_limit(self) -> int:
        """Largest acceptable pushed state: weights + momentum buffers + random state + headers."""
        weights = sum(t.numel() * t.element_size() for t in self.worker.half.state_dict().values())
        return 2 * weights + (1 << 20) + 64 * len(self.worker.half.state_dict())

    def check_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Every tensor must be one the half has, with its shape and dtype, and finite."""
        reference = {f"server.{k}": v for k, v in self.worker.half.state_dict().items()}
        reference.update({f"opt.server.{k}": v for k, v in self.worker.half.named_parameters()})
        reference["rng.server"] = self.worker.rng.state
        unknown = sorted(set(tensors) - set(reference))
        if unknown:
            raise BadState(f"state holds tensors the server half does not have: {unknown[:3]}")
        missing = sorted(k for k in reference if k.startswith("server.") and k not in tensors)
        if missing:
            raise BadState(f"state lacks {len(missing)} server tensors (e.g. {missing[0]})")
        for name, t in tensors.items():
            ref = reference[name]
            if tuple(t.shape) != tuple(ref.shape) or t.dtype != ref.dtype:
                raise BadState(f"state tensor {name} has shape {list(t.shape)} and dtype {t.dtype}; "
                               f"the server half needs shape {list(ref.shape)} and dtype {ref.dtype}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise BadState(f"state tensor {name} holds NaN or Inf")

    def load_state(self, tensors: dict[str, torch.Tensor], phase: pb.PhaseRequest | None = None) -> None:
        """As the in-process resume does: a fresh optimizer for the phase (the current one unless given),
        then the saved weights, optimizer buffers and random state."""
        phase = phase if phase is not None else self.phase_req
        if phase is not None:
            self.worker.start_phase(phase)
            self.phase_req = pb.PhaseRequest()
            self.phase_req.CopyFrom(phase)
        self.worker.load_state(tensors)
        self.bump()

    @classmethod
    def from_model(cls, path: str, accelerator: str = "cpu", max_batch: int | None = None,
                   request_memory: int = DEFAULT_REQUEST_MEMORY, weights_files: dict | None = None) -> "HostedHalf":
        """A trained model checkpoint (from `splitprune train`), hosted read-only for inference."""
        loaded = load_checkpoint(path, ("server",))
        meta = loaded.meta
        if meta.get("fingerprint") and meta["fingerprint"] != loaded.cfg.fingerprint():
            raise UserError(f"{path}: the config's fingerprint does not match the recorded one")
        return cls(loaded.cfg, int(meta["num_classes"]), int(meta["in_channels"]), read_only=True,
                   source=meta["_folder"], accelerator=accelerator, max_batch=max_batch,
                   request_memory=request_memory, worker=loaded.server)
