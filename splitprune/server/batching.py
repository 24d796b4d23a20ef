"""Batched server steps (serve --batch-window-ms, --batch-max-samples, --batch-train; docs/protocol.md 3.6).

Requests to one hosted half that arrive within a window are stacked into one server forward (and
backward, for training steps) by training/stacked.py. A Batcher is a queue and a worker thread. The
window opens when a request is waiting and the worker is free (the later of the two): the batch closes
when the window ends or its samples reach the cap; the worker takes the half's lock, runs the stack and
hands every waiting request its own result or its own refusal. Opening the window only once the worker
is free lets the clients just answered rejoin the next batch: with a window counted from the first
arrival, closed-loop clients split into two alternating half-size batches. Window 0 (the default)
keeps no batcher at all: every request runs alone under the half's lock, as without this module.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from splitprune.proto import pb
from splitprune.server.config import ServeConfig
from splitprune.server.hosting import HostedHalf
from splitprune.server.sessions import Session, stored_reply
from splitprune.training.stacked import Request, evaluate_stacked, train_stacked
from splitprune.wire.envelopes import TRAIN, frame
from splitprune.wire.refusals import Refusal

LINGER_S = 2.0          # an idle worker thread ends after this long; the next request starts a new one


@dataclass
class Pending:
    """One request waiting in a Batcher."""

    payload: Any
    samples: int
    key: Any = None                      # only requests with the head's key share its batch
    owner: str = ""                      # at most one request per owner in a batch ("" = no rule)
    arrived: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class Batcher:
    """A queue, a window and a worker thread for one kind of request to one hosted half."""

    def __init__(self, window_s: float, max_samples: int, run: Callable[[list[Pending]], None], name: str) -> None:
        self.window_s, self.max_samples, self.run, self.name = window_s, max_samples, run, name
        self._queue: list[Pending] = []
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None
        self.batches = self.requests = 0

    def submit(self, item: Pending) -> Any:
        """Queue `item`, wait for its batch; its result, or raise its error."""
        with self._cond:
            self._queue.append(item)
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._worker.start()
            self._cond.notify_all()
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result

    def _select(self) -> tuple[list[Pending], bool]:
        """The head and every later compatible request that fits; whether the batch is full."""
        head = self._queue[0]
        batch, total, owners, full = [head], head.samples, {head.owner}, head.samples >= self.max_samples
        for item in self._queue[1:]:
            if item.key != head.key or (item.owner and item.owner in owners):
                continue
            if total + item.samples > self.max_samples:
                full = True
                continue
            batch.append(item)
            total += item.samples
            owners.add(item.owner)
            full = full or total >= self.max_samples
        return batch, full

    def _next_batch(self) -> list[Pending] | None:
        free = time.monotonic()
        with self._cond:
            if not self._queue and not self._cond.wait_for(lambda: self._queue, LINGER_S):
                self._worker = None
                return None
            while True:
                batch, full = self._select()
                left = max(batch[0].arrived, free) + self.window_s - time.monotonic()
                if full or left <= 0:
                    break
                self._cond.wait(left)
            taken = {id(item) for item in batch}
            self._queue = [item for item in self._queue if id(item) not in taken]
            self.batches += 1
            self.requests += len(batch)
            return batch

    def _loop(self) -> None:
        import torch

        torch.set_num_threads(torch.get_num_threads())  # this thread's OpenMP team: the process's thread count
        while (batch := self._next_batch()) is not None:
            try:
                self.run(batch)
            except BaseException as exc:  # noqa: BLE001 - whoever has no answer yet gets this failure
                for item in batch:
                    if item.result is None and item.error is None:
                        item.error = exc
            finally:
                for item in batch:
                    item.done.set()


def sample_count(t: pb.EncodedTensor, cap: int) -> int:
    """Samples a request claims (its header), in 1..cap: a false claim fails at decoding, alone."""
    return min(max(int(t.shape[0]), 1), cap) if len(t.shape) == 4 else 1


def _settle(items: list[Pending], outcomes: list) -> None:
    for item, outcome in zip(items, outcomes):
        if isinstance(outcome, BaseException):
            item.error = outcome
        else:
            item.result = outcome


class Batching:
    """The batchers of one server: per hosted half, one for evaluations and, with `train`, one for steps."""

    def __init__(self, config: ServeConfig, check_draining: Callable[[], None],
                 applied: Callable[[HostedHalf, int], None] = lambda half, samples: None) -> None:
        self.window_s, self.max_samples = config.batch_window_ms / 1000, config.batch_max_samples
        self.check_draining = check_draining
        self.applied = applied  # told of every applied step (half, samples), under the half's lock
        self.evaluates = config.batch_window_ms > 0
        self.trains = self.evaluates and config.batch_train
        self._batchers: dict[tuple[HostedHalf, str], Batcher] = {}
        self._lock = threading.Lock()

    def _batcher(self, half: HostedHalf, kind: str, run: Callable[[HostedHalf, list[Pending]], None]) -> Batcher:
        with self._lock:
            batcher = self._batchers.get((half, kind))
            if batcher is None:
                limit = half.max_train_batch if kind == "train" else half.max_batch
                cap = min(self.max_samples or limit, limit)
                batcher = Batcher(self.window_s, cap, lambda items: run(half, items),
                                  f"splitprune-batch-{kind}-{half.fingerprint[:8]}")
                self._batchers[(half, kind)] = batcher
            return batcher

    def counts(self) -> dict[str, tuple[int, int]]:
        """(batches run, requests in them) per kind ("eval", "train"), over every half."""
        with self._lock:
            batchers = list(self._batchers.items())
        out: dict[str, tuple[int, int]] = {}
        for (_, kind), b in batchers:
            batches, requests = out.get(kind, (0, 0))
            out[kind] = (batches + b.batches, requests + b.requests)
        return out

    def evaluate(self, half: HostedHalf, req: pb.EvalRequest, dtype: int | None, max_kept: int | None) -> pb.EvalReply:
        """An evaluation, stacked with those that reach `half` within the window."""
        batcher = self._batcher(half, "eval", _run_eval)
        item = Pending(Request(req, dtype, max_kept), sample_count(req.activations, batcher.max_samples))
        return batcher.submit(item)

    def train(self, s: Session, req: pb.TrainRequest, digest: bytes) -> tuple[bytes, bool]:
        """A training step, stacked with those that reach the session's half within the window: the framed
        reply, and whether it was applied now (False: a retry answered from the stored reply)."""
        with s.half.mutex:  # a retry of the step already applied is answered at once, without a window
            self.check_draining()
            s.check_current()
            retry = stored_reply(s.half.record(s.client_id), req.step_id, digest)
        if retry is not None:
            return retry, False
        batcher = self._batcher(s.half, "train", self._run_train)
        item = Pending((s, req, digest), sample_count(req.activations, batcher.max_samples), key=req.lr_scale,
                       owner=s.client_id)
        return batcher.submit(item)

    def _run_train(self, half: HostedHalf, items: list[Pending]) -> None:
        """Under the half's lock: per-request session, draining and step-id checks exactly as a lone step
        has them, then one stacked step over the new steps; records and replies per client."""
        with half.mutex:
            live = []
            for item in items:
                s, req, digest = item.payload
                try:
                    self.check_draining()
                    s.check_current()
                    record = half.record(s.client_id)
                    retry = stored_reply(record, req.step_id, digest)
                except Refusal as exc:
                    item.error = exc
                    continue
                if retry is not None:
                    item.result = (retry, False)  # a retry of the step already applied: not applied twice
                else:
                    live.append((item, record))
            steps = [Request(req, s.dtype_up, s.max_budget) for (s, req, _) in (i.payload for i, _ in live)]
            outcomes = train_stacked(half.worker, steps) if steps else []
            applied = False
            for (item, record), reply in zip(live, outcomes):
                if isinstance(reply, BaseException):
                    item.error = reply
                    continue
                out = frame(TRAIN, reply.SerializeToString())
                record.last_step, record.digest, record.reply = reply.step_id, item.payload[2], out
                item.result, applied = (out, True), True
                self.applied(half, item.payload[1].activations.shape[0])
            if applied:
                half.bump()


def _run_eval(half: HostedHalf, items: list[Pending]) -> None:
    with half.mutex:
        _settle(items, evaluate_stacked(half.worker, [item.payload for item in items]))
