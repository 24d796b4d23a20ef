"""Training sessions: the registry of attached Train streams, the session limit, idle reaping, and the
per-client step ids that make a retried step answer from memory instead of being applied twice."""
from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from splitprune.server.hosting import ClientRecord, HostedHalf
from splitprune.server.telemetry.ratelog import BoundedLog
from splitprune.wire.refusals import SessionReplaced, StepOutOfOrder, TooManySessions, UnknownSession

log = logging.getLogger("splitprune.serve")


@dataclass
class Session:
    """One attached Train stream."""

    client_id: str
    half: HostedHalf
    cancel: Callable[[], object]       # ends the stream (its client may reconnect)
    dtype_up: int
    max_budget: int
    peer: str = ""
    id: str = field(default_factory=lambda: secrets.token_hex(16))
    last_activity: float = field(default_factory=time.monotonic)
    replaced: bool = False
    busy: bool = False   # inside a request (never reaped for idleness then)
    steps: int = 0

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def check_current(self) -> None:
        if self.replaced:
            raise SessionReplaced("a newer stream of this client took over")

    @property
    def kept_limit(self) -> int:
        return min(self.max_budget, self.half.budget)


class SessionRegistry:
    """Attached sessions by id and by (half, client id); at most `limit` at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.log = BoundedLog(log, "session and half events")  # a peer in a loop cannot flood the log
        self.lock = threading.Lock()
        self.by_id: dict[str, Session] = {}
        self.by_half: dict[str, dict[str, Session]] = {}

    def attached(self, half: HostedHalf | None = None) -> int:
        with self.lock:
            if half is not None:
                return len(self.by_half.get(half.fingerprint, {}))
            return len(self.by_id)

    def others(self, half: HostedHalf, client_id: str) -> list[str]:
        with self.lock:
            return [c for c in self.by_half.get(half.fingerprint, {}) if c != client_id]

    def check_room(self, half: HostedHalf, client_id: str) -> None:
        with self.lock:
            if client_id not in self.by_half.get(half.fingerprint, {}) and len(self.by_id) >= self.limit:
                raise TooManySessions(f"the server is at its limit of {self.limit} training sessions")

    def attach(self, session: Session) -> Session | None:
        """Register a session; returns the older stream of the same client it replaces (to be cancelled)."""
        with self.lock:
            on_half = self.by_half.setdefault(session.half.fingerprint, {})
            old = on_half.get(session.client_id)
            if old is None and len(self.by_id) >= self.limit:
                raise TooManySessions(f"the server is at its limit of {self.limit} training sessions")
            if old is not None:
                old.replaced = True
                self.by_id.pop(old.id, None)
            on_half[session.client_id] = session
            self.by_id[session.id] = session
        return old

    def detach(self, session: Session) -> None:
        with self.lock:
            on_half = self.by_half.get(session.half.fingerprint, {})
            if on_half.get(session.client_id) is session:
                del on_half[session.client_id]
            self.by_id.pop(session.id, None)
        self.log("session %s: client %s detached after %d steps", session.id[:8], session.client_id, session.steps)

    def get(self, session_id: str) -> Session:
        with self.lock:
            s = self.by_id.get(session_id)
        if s is None:
            raise UnknownSession("no open training session with this id: open a Train stream (Hello) first")
        return s

    def reap_idle(self, timeout_s: float) -> int:
        """Cancel streams idle for longer than timeout_s (their clients may reconnect)."""
        now = time.monotonic()
        with self.lock:
            idle = [s for s in self.by_id.values() if not s.busy and now - s.last_activity > timeout_s]
        for s in idle:
            log.info("session %s: client %s idle for %.0f s, dropped", s.id[:8], s.client_id, now - s.last_activity)
            s.cancel()
        return len(idle)


def stored_reply(record: ClientRecord, step_id: int, digest: bytes) -> bytes | None:
    """The stored reply when this is a retry of the last applied step; None when the step is new;
    StepOutOfOrder for anything else."""
    if step_id == record.last_step and record.reply and record.digest == digest:
        return record.reply
    if step_id <= record.last_step:
        raise StepOutOfOrder(f"step {step_id} out of order: step ids must increase, and the last step applied "
                             f"for this client is {record.last_step}")
    return None
