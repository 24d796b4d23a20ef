"""Who is in the tier now: generations formed over the tier's signed store (docs/replicas.md "Membership").

The tier lives in generations. Generation g is one gloo process group of the replicas that registered for
it; when a replica is lost, leaves or arrives, the members form generation g+1 and go on, so the others
never stop serving. torch's own elastic rendezvous (DynamicRendezvousHandler) keeps its state in the
store as a pickle, and nothing this project reads is unpickled: the protocol here is small and JSON.

- A replica registers for g by adding to the counter `g{g}/count` and writing `g{g}/member/{id}` (signed).
- The first to register (the counter says 1) closes g after `settle_s`: it reads which ids registered, the
  values whose signature holds, and writes the sorted list to `g{g}/members` and g to `tier/latest`.
- Everyone else waits for that list: a replica in it takes its index as rank; one that came too late
  registers for g+1, which the members notice (`waiting`) and then re-form.
A closer that dies before closing, or a list not signed with the tier's secret, sends everyone to g+1.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch.distributed as dist

from splitprune.errors import UserError

log = logging.getLogger("splitprune.serve")
LATEST = "tier/latest"


@dataclass(frozen=True)
class Generation:
    number: int
    members: tuple[int, ...]   # replica ids (RANK), sorted; a member's rank is its index here
    replica_id: int

    @property
    def rank(self) -> int:
        return self.members.index(self.replica_id)

    @property
    def world_size(self) -> int:
        return len(self.members)


class Membership:
    """This replica's side of the protocol. `open_store` returns the tier's signed store (a new client
    connection each time: the one before may have died with its host)."""

    def __init__(self, open_store: Callable[[], object], replica_id: int, max_replicas: int, *,
                 settle_s: float = 2.0, timeout_s: float = 60.0) -> None:
        self.open_store, self.replica_id, self.max_replicas = open_store, replica_id, max_replicas
        self.settle_s, self.timeout_s = settle_s, timeout_s
        self.store = None
        self.generation: Generation | None = None
        self.refused: set[tuple[int, int]] = set()   # (generation, id) registrations not signed by the tier

    def form(self) -> Generation:
        """Register for the next generation until one that counts this replica closes; its process group
        is made (the previous one destroyed by the caller). Raises UserError when this replica's own
        secret is refused, RuntimeError / DistStoreError when the store cannot be reached."""
        if self.store is None:
            self.store = self.open_store()
            self._check_secret()
        store = self.store
        g = max(self._latest(), self.generation.number if self.generation else 0) + 1
        while True:
            first = store.add(f"g{g}/count", 1) == 1
            store.set(f"g{g}/member/{self.replica_id}", b"1")
            if first:
                self._settle(g)
                members = self._registered(g)
                store.set(f"g{g}/members", json.dumps(members).encode())
                store.set(LATEST, str(g).encode())
            store.wait([f"g{g}/members"], timedelta(seconds=self.settle_s + self.timeout_s))
            try:
                members = tuple(json.loads(store.get(f"g{g}/members")))
            except PermissionError:
                if first:  # our own list refused: this replica holds another secret than the store's writers
                    raise
                log.warning("replica %d: the member list of generation %d is not signed with this tier's secret; "
                            "registering for the next", self.replica_id, g)
                g += 1
                continue
            if self.replica_id in members:
                self.generation = Generation(g, members, self.replica_id)
                pg_store = dist.PrefixStore(f"g{g}/pg", store)
                dist.init_process_group("gloo", store=pg_store, rank=self.generation.rank,
                                        world_size=len(members), timeout=timedelta(seconds=self.timeout_s))
                return self.generation
            g += 1

    def _settle(self, g: int) -> None:
        """The closer waits until nobody registered for settle_s (at most timeout_s)."""
        deadline, count = time.monotonic() + self.timeout_s, 1
        quiet_until = time.monotonic() + self.settle_s
        while time.monotonic() < min(quiet_until, deadline):
            time.sleep(0.05)
            now = self.store.add(f"g{g}/count", 0)
            if now != count:
                count, quiet_until = now, time.monotonic() + self.settle_s

    def _check_secret(self) -> None:
        """The store's host signs SECRET_CHECK when it starts: a replica that cannot verify it holds another
        secret than the tier's and stops with one line, before it registers anywhere."""
        from splitprune.server.replicas.rendezvous import SECRET_CHECK, SECRET_ENV

        self.store.wait([SECRET_CHECK], timedelta(seconds=self.timeout_s))
        try:
            self.store.get(SECRET_CHECK)
        except PermissionError as exc:
            raise UserError(f"replica {self.replica_id}: refused by the tier: {exc} (a replica or joiner with another "
                            f"${SECRET_ENV})") from None

    def _registered(self, g: int) -> list[int]:
        members = []
        for rid in range(self.max_replicas):
            key = f"g{g}/member/{rid}"
            if not self.store.check([key]):
                continue
            try:
                self.store.get(key)
            except PermissionError:
                if (g, rid) not in self.refused:
                    self.refused.add((g, rid))
                    log.warning("replica %d: refused a registration as replica %d for generation %d: not signed "
                                "with this tier's secret", self.replica_id, rid, g)
                continue
            members.append(rid)
        return members

    def _latest(self) -> int:
        if not self.store.check([LATEST]):
            return 0
        try:
            return int(self.store.get(LATEST))
        except PermissionError:  # forged by someone without the secret: walk up from the first generation
            return 0

    def waiting(self) -> bool:
        """Whether a replica registered for the next generation (it then waits for this one to re-form)."""
        return self.generation is not None and self.store.check([f"g{self.generation.number + 1}/count"])

    def drop_store(self) -> None:
        """Forget the store connection (its host may be gone): the next form() connects anew."""
        self.store = None
