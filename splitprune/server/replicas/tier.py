"""A tier of server replicas on torch.distributed (`splitprune serve --distributed`, docs/replicas.md).

Each replica is one `splitprune serve` process with its own gRPC port and its own clients; all of them
hold the same server halves, kept consistent by periodic weighted averaging (averaging.py). One thread
per replica, the tier thread, is the only one that issues collectives:

- every `poll_s` it all-reduces five numbers: steps applied since the last synchronisation, halves
  waiting to join, replicas leaving, steps waiting too long, replicas waiting for the next generation;
- when the tier applied `sync_every` steps, or steps wait for longer than `max_delay_s`, or a half
  waits to join, or a replica leaves, every replica all-gathers a header (its halves, their configs and
  counters; JSON, never pickled) and averages each half in fingerprint order under the half's mutex.

The tier lives in generations (membership.py): when a collective fails (a replica died: gloo raises at
once on a closed socket, and within `timeout_s` on a silent peer), when a replica leaves, or when one
registers for the next generation (a restarted or new replica), the members destroy their process group
and form the next one. Clients are served throughout: steps apply locally and are averaged in at the
next generation's first round. A half new to a replica joins before its first client is answered (the
Hello waits for the next round; SplitService calls `admit`).
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from splitprune.errors import UserError
from splitprune.proto import service_pb2 as spb
from splitprune.server.hosting import HostedHalf
from splitprune.server.replicas.averaging import average_half, plan_weights
from splitprune.server.replicas.membership import Generation, Membership
from splitprune.server.replicas.rendezvous import SECRET_ENV, TierEnv, open_store
from splitprune.server.store import _phase_dict, _phase_req
from splitprune.wire.refusals import ShuttingDown

log = logging.getLogger("splitprune.serve")
HEADER_BYTES = 256 * 1024   # a replica's header: up to 8 halves with their configs, as JSON
RETRY_S = 2.0               # between attempts to reach the store while it is gone


def one_line(exc: BaseException) -> str:
    text = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\] ", "", str(exc).splitlines()[0] if str(exc) else "")
    return f"{type(exc).__name__}: {text.split('. ')[0]}"[:300]  # gloo goes on with generic advice


def join_tier_membership(env: TierEnv, accelerator: str, timeout_s: float, settle_s: float = 2.0) -> Membership:
    """This replica's membership, its first generation formed (gloo; NCCL is not re-formed, so CPU only)."""
    if accelerator == "cuda":
        raise UserError("a tier that re-forms runs its collectives on gloo: serve --distributed with "
                        "--accelerator cpu")
    membership = Membership(lambda: open_store(env, timeout_s), env.rank, env.world_size, settle_s=settle_s,
                            timeout_s=timeout_s)
    try:
        membership.form()
    except UserError:
        raise
    except (PermissionError, RuntimeError, ValueError) as exc:  # DistStoreError is a RuntimeError
        raise UserError(f"replica {env.rank}: cannot join the tier at {env.master_addr}:{env.master_port} "
                        f"within {timeout_s:g} s: {one_line(exc)} (all replicas need the same ${SECRET_ENV})") \
            from None
    return membership


class Tier:
    """This replica's part in the tier: hooks for SplitService and the tier thread."""

    def __init__(self, membership: Membership, *, sync_every: int = 64, max_delay_s: float = 10.0,
                 poll_s: float = 0.05, timeout_s: float = 60.0) -> None:
        self.membership = membership
        self.replica_id = membership.replica_id
        self.sync_every, self.max_delay_s, self.poll_s, self.timeout_s = sync_every, max_delay_s, poll_s, timeout_s
        self.service = None
        self.shared_checkpoints: str | None = None  # the clients' checkpoints, shared by the replicas
        self.joined: set[str] = set()
        self.steps: dict[str, int] = {}      # per fingerprint, since the last synchronisation
        self.samples: dict[str, int] = {}
        self.rounds = self.mismatches = 0
        self._count_lock = threading.Lock()
        self.failure: str | None = None      # why this replica cannot take part (its secret refused)
        self.down = threading.Event()        # the tier thread has ended (left, or refused)
        self._stopping = threading.Event()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def generation(self) -> Generation | None:
        return self.membership.generation

    @property
    def rank(self) -> int:
        return self.generation.rank

    @property
    def world_size(self) -> int:
        return self.generation.world_size

    # ---------------------------------------------------------------- hooks (SplitService)
    def admit(self, half: HostedHalf) -> None:
        """Wait until this half holds the tier's state (not under its mutex)."""
        if half.read_only or half.fingerprint in self.joined:
            return
        with self._changed:
            self._changed.wait_for(lambda: half.fingerprint in self.joined or self.down.is_set(), self.timeout_s)
        if half.fingerprint not in self.joined:
            raise ShuttingDown(f"server replica {self.replica_id} could not join its tier in time"
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
        """Stop taking steps, synchronise once more with the others, end the tier thread (the others re-form)."""
        if self.service is not None:
            self.service.draining = True
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(wait_s)

    def exit_message(self) -> str | None:
        return f"replica {self.replica_id}: {self.failure}" if self.failure else None

    # ---------------------------------------------------------------- the tier thread
    def _halves(self) -> list[HostedHalf]:
        with self.service.halves_lock:
            return sorted((h for h in self.service.halves.values() if not h.read_only), key=lambda h: h.fingerprint)

    def _run(self) -> None:
        try:
            while True:
                try:
                    if self._generation():
                        return  # this replica left
                except Exception as exc:  # noqa: BLE001 - a broken collective: say it in one line, re-form
                    log.warning("replica %d: generation %d broke (%s): a replica is gone or silent; re-forming",
                                self.replica_id, self.generation.number, one_line(exc))
                finally:
                    if dist.is_initialized():
                        dist.destroy_process_group()
                if self._stopping.is_set():
                    return
                self._reform()
        except UserError as exc:
            self.failure = str(exc)
            log.error("%s", exc)
        finally:
            self.down.set()
            with self._changed:
                self._changed.notify_all()

    def _reform(self) -> None:
        """Form the next generation, retrying while the store is unreachable (clients are served meanwhile)."""
        while not self._stopping.is_set():
            try:
                gen = self.membership.form()
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - the store's host is gone: try again
                log.warning("replica %d: cannot reach the tier's store (%s); serving alone, retrying in %g s",
                            self.replica_id, one_line(exc), RETRY_S)
                self.membership.drop_store()
                self._stopping.wait(RETRY_S)
                continue
            log.info("replica %d: generation %d formed: replicas %s (rank %d of %d)", self.replica_id, gen.number,
                     list(gen.members), gen.rank, gen.world_size)
            return

    def _generation(self) -> bool:
        """Serve one generation: True when this replica left, False when the tier must re-form."""
        last_sync, first = time.monotonic(), True
        self.rounds = 0
        while True:
            waiting = sum(1 for h in self._halves() if h.fingerprint not in self.joined)
            with self._count_lock:
                steps = sum(self.steps.values())
            late = steps > 0 and time.monotonic() - last_sync >= self.max_delay_s
            # every replica decides from the same reduced numbers: they all enter a round, or none does
            flags = torch.tensor([steps, waiting, int(self._stopping.is_set()), int(late),
                                  int(self.membership.waiting())], dtype=torch.int64)
            dist.all_reduce(flags)
            total, joining, stopping, late_somewhere, newcomer = (int(v) for v in flags)
            if first or joining or stopping or late_somewhere or total >= self.sync_every:
                self._round()
                last_sync, first = time.monotonic(), False
            if stopping or newcomer:
                return self._stopping.is_set()
            self._stopping.wait(self.poll_s)

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
                log.info("replica %d generation %d sync round %d: half %s, weights %s, momentum %s, %d values in "
                         "%.1f ms, state sha256 %s%s", self.replica_id, self.generation.number, self.rounds,
                         half.fingerprint, [round(w) for w in weights], momentum, synced.elements,
                         1e3 * (time.perf_counter() - start), synced.digest,
                         " (results differed: rank 0's broadcast)" if synced.mismatches else "")
            with self._count_lock:
                self.steps[half.fingerprint] = self.samples[half.fingerprint] = 0
