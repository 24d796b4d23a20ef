"""A tier of server replicas on torch.distributed (`splitprune serve --distributed`, docs/replicas.md).

Each replica is one `splitprune serve` process with its own gRPC port and its own clients; all of them
hold the same server halves, kept consistent by periodic weighted averaging (averaging.py). One thread
per replica, the tier thread, is the only one that issues collectives:

- every `poll_s` it all-reduces three numbers: steps applied since the last synchronisation, halves
  waiting to join, replicas stopping;
- when the tier applied `sync_every` steps, or steps wait for longer than `max_delay_s`, or a half
  waits to join, or a replica stops, every replica all-gathers a header (its halves, their configs and
  counters; JSON, never pickled) and averages each half in fingerprint order under the half's mutex.

A replica whose half is new (built for a Hello, or loaded from its save) joins the tier before its
first client is answered: the Hello waits for the next round (SplitService calls `admit`). When a
collective fails or times out (a replica died: gloo raises at once on a closed socket, and within
`timeout_s` on a silent peer) the replica says so in one line and stops, so that the tier restarts
as a whole; clients reconnect and resume.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from splitprune.errors import UserError
from splitprune.proto import service_pb2 as spb
from splitprune.server.hosting import HostedHalf
from splitprune.server.replicas.averaging import average_half, plan_weights
from splitprune.server.replicas.rendezvous import SECRET_ENV, TierEnv, open_store
from splitprune.server.store import _phase_dict, _phase_req
from splitprune.wire.refusals import ShuttingDown

log = logging.getLogger("splitprune.serve")
HEADER_BYTES = 256 * 1024   # a replica's header: up to 8 halves with their configs, as JSON
_STORES: list = []


def join_process_group(env: TierEnv, accelerator: str, timeout_s: float) -> None:
    """gloo on CPU; on CUDA, NCCL for the halves and gloo for the small CPU messages."""
    backend = "cpu:gloo,cuda:nccl" if accelerator == "cuda" else "gloo"
    if accelerator == "cuda":
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    try:
        # kept here: the process group holds our Python store without keeping it alive
        _STORES.append(open_store(env, timeout_s))
        dist.init_process_group(backend, store=_STORES[-1], rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(seconds=timeout_s))
    except (PermissionError, RuntimeError, ValueError) as exc:  # DistStoreError is a RuntimeError
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        # SignedStore's PermissionError, raised as itself or wrapped by the C++ caller
        if isinstance(exc, PermissionError) or "not signed with this tier's secret" in text:
            raise UserError(f"replica {env.rank}: refused the tier at {env.master_addr}:{env.master_port}: "
                            f"{text} (a replica or joiner with another ${SECRET_ENV})") from None
        raise UserError(f"replica {env.rank}: cannot join the tier at {env.master_addr}:{env.master_port} "
                        f"within {timeout_s:g} s: {text}") from None


class Tier:
    """This replica's part in the tier: hooks for SplitService and the tier thread."""

    def __init__(self, rank: int, world_size: int, *, sync_every: int = 64, max_delay_s: float = 10.0,
                 poll_s: float = 0.05, timeout_s: float = 60.0) -> None:
        self.rank, self.world_size = rank, world_size
        self.sync_every, self.max_delay_s, self.poll_s, self.timeout_s = sync_every, max_delay_s, poll_s, timeout_s
        self.service = None
        self.joined: set[str] = set()
        self.steps: dict[str, int] = {}      # per fingerprint, since the last synchronisation
        self.samples: dict[str, int] = {}
        self.rounds = self.mismatches = 0
        self._count_lock = threading.Lock()
        self.failure: str | None = None      # why the tier broke, when it did
        self.peer_stopped = False
        self.down = threading.Event()        # the tier thread has ended (stopped or broke)
        self._stopping = threading.Event()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- hooks (SplitService)
    def admit(self, half: HostedHalf) -> None:
        """Wait until this half holds the tier's state (not under its mutex)."""
        if half.read_only or half.fingerprint in self.joined:
            return
        with self._changed:
            self._changed.wait_for(lambda: half.fingerprint in self.joined or self.down.is_set(), self.timeout_s)
        if half.fingerprint not in self.joined:
            raise ShuttingDown(f"server replica {self.rank} could not join its tier"
                               + (f": {self.failure}" if self.failure else "") + "; reconnect to resume")

    def applied(self, half: HostedHalf, samples: int) -> None:
        """A training step was applied (half.mutex held)."""
        fp = half.fingerprint
        with self._count_lock:
            self.steps[fp] = self.steps.get(fp, 0) + 1
            self.samples[fp] = self.samples.get(fp, 0) + samples

    # ---------------------------------------------------------------- lifecycle
    def start(self, service) -> None:
        self.service = service
        self._thread = threading.Thread(target=self._run, name="splitprune-tier", daemon=True)
        self._thread.start()

    def leave(self, wait_s: float = 30.0) -> None:
        """Stop taking steps, synchronise once more with the others, end the tier thread."""
        if self.service is not None:
            self.service.draining = True
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(wait_s)

    def exit_message(self) -> str | None:
        if self.failure:
            return (f"replica {self.rank}: the tier broke ({self.failure}); stopped after saving: restart the tier "
                    "(torchrun --max-restarts, or Kubernetes restarts the pod); clients resume")
        if self.peer_stopped:
            return f"replica {self.rank}: another replica stopped, so the tier stopped together (state saved)"
        return None

    # ---------------------------------------------------------------- the tier thread
    def _halves(self) -> list[HostedHalf]:
        with self.service.halves_lock:
            return sorted((h for h in self.service.halves.values() if not h.read_only), key=lambda h: h.fingerprint)

    def _run(self) -> None:
        last_sync = time.monotonic()
        first = True
        try:
            while True:
                waiting = sum(1 for h in self._halves() if h.fingerprint not in self.joined)
                with self._count_lock:
                    steps = sum(self.steps.values())
                late = steps > 0 and time.monotonic() - last_sync >= self.max_delay_s
                # every replica decides from the same reduced numbers: they all enter a round, or none does
                flags = torch.tensor([steps, waiting, int(self._stopping.is_set()), int(late)], dtype=torch.int64)
                dist.all_reduce(flags)
                total, joining, stopping, late_somewhere = (int(v) for v in flags)
                if first or joining or stopping or late_somewhere or total >= self.sync_every:
                    self._round()
                    last_sync, first = time.monotonic(), False
                if stopping:
                    self.peer_stopped = not self._stopping.is_set()
                    return
                self._stopping.wait(self.poll_s)
        except Exception as exc:  # noqa: BLE001 - a broken collective: say it in one line and stop
            text = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\] ", "", str(exc).splitlines()[0] if str(exc) else "")
            text = text.split(". ")[0]  # gloo goes on with generic advice
            self.failure = f"a collective failed, a replica is gone or silent ({type(exc).__name__}: {text})"[:300]
            log.error("replica %d: lost the tier: %s", self.rank, self.failure)
        finally:
            self.down.set()
            with self._changed:
                self._changed.notify_all()

    def _header(self) -> dict:
        halves = []
        for h in self._halves():
            with h.mutex:
                saved = Path(h.source) / "meta.json" if h.source else None
                halves.append({
                    "fingerprint": h.fingerprint, "config": h.cfg.to_dict(), "num_classes": h.num_classes,
                    "in_channels": h.in_channels, "joined": h.fingerprint in self.joined,
                    "samples": self._samples(h.fingerprint),
                    "saved_ns": saved.stat().st_mtime_ns if saved is not None and saved.exists() else 0,
                    "phase": _phase_dict(h.phase_req), "optimizer": h.worker.optimizer is not None})
        return {"halves": halves}

    def _samples(self, fingerprint: str) -> int:
        with self._count_lock:
            return self.samples.get(fingerprint, 0)

    def _gather_headers(self) -> list[dict]:
        data = json.dumps(self._header()).encode()
        if len(data) + 8 > HEADER_BYTES:
            raise RuntimeError(f"this replica's header is {len(data)} bytes, over {HEADER_BYTES}")
        buf = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
        buf[:8] = torch.frombuffer(bytearray(len(data).to_bytes(8, "little")), dtype=torch.uint8)
        buf[8:8 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        gathered = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.all_gather(gathered, buf)
        out = []
        for g in gathered:
            raw = g.numpy().tobytes()
            out.append(json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")]))
        return out

    def _build(self, entry: dict) -> HostedHalf:
        """A half another replica hosts and this one does not yet: built as a Hello would build it."""
        from splitprune.config import stored_config

        hello = spb.Hello(num_classes=entry["num_classes"], in_channels=entry["in_channels"])
        return self.service._get_or_build(stored_config(entry["config"]), hello)

    def _round(self) -> None:
        headers = self._gather_headers()
        entries: dict[str, list[dict | None]] = {}
        for rank, header in enumerate(headers):
            for e in header["halves"]:
                entries.setdefault(e["fingerprint"], [None] * self.world_size)[rank] = e
        self.rounds += 1
        for fp, per_rank in entries.items():  # first build what others host (no mutex held while the others wait)
            if fp not in self.service.halves:
                self._build(next(e for e in per_rank if e is not None))
            elif self.service.halves[fp].read_only:
                raise RuntimeError(f"half {fp} is trained on another replica and hosted read-only (--model) here")
        dist.barrier()
        for fp in sorted(entries):
            known = next(e for e in entries[fp] if e is not None)
            filled = [e or {**known, "joined": False, "samples": 0, "saved_ns": 0, "phase": None, "optimizer": False}
                      for e in entries[fp]]
            self._sync(self.service.halves[fp], filled)
            with self._changed:
                self.joined.add(fp)
                self._changed.notify_all()

    def _sync(self, half: HostedHalf, filled: list[dict]) -> None:
        """Average one half (every replica decides the same from the same headers)."""
        weights, needed = plan_weights(filled)
        donor = filled[weights.index(max(weights))]
        momentum = len({json.dumps(e["phase"], sort_keys=True) for e in filled}) == 1 and all(
            e["optimizer"] for e in filled)
        with half.mutex:
            if half.phase_req is None and donor["phase"]:  # a replica new to the half takes the tier's phase
                half.start_phase(_phase_req(donor["phase"], half.cfg, half.channels))
            if needed:
                start = time.perf_counter()
                synced = average_half(half, weights[self.rank], sum(weights), momentum)
                self.mismatches += synced.mismatches
                log.info("replica %d sync round %d: half %s, weights %s, momentum %s, %d values in %.1f ms, "
                         "state sha256 %s%s", self.rank, self.rounds, half.fingerprint, [round(w) for w in weights],
                         momentum, synced.elements, 1e3 * (time.perf_counter() - start), synced.digest,
                         " (results differed: rank 0's broadcast)" if synced.mismatches else "")
            with self._count_lock:
                self.steps[half.fingerprint] = self.samples[half.fingerprint] = 0
