"""Server-wide admission control (`serve --max-inflight-mb`): every request that makes a half compute
reserves the memory its batch may take (the half's per-sample estimate times the batch, as --max-request-mb
sizes batches) before it runs, and gives it back after. A request that does not fit waits up to
`wait_s` for others to finish, then is refused with RESOURCE_EXHAUSTED / SERVER_BUSY. Each request is
at most --max-request-mb, so the memory all requests in flight may take is bounded by the budget, however
many halves and clients the server has.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

from splitprune.wire.refusals import ServerBusy


class Admission:
    def __init__(self, capacity: int, wait_s: float) -> None:
        self.capacity, self.wait_s = capacity, wait_s
        self.in_flight = self.peak = self.refused = 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        need = min(max(0, int(nbytes)), self.capacity)  # a request is never larger than the budget
        with self._changed:
            deadline = time.monotonic() + self.wait_s
            while self.in_flight + need > self.capacity:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.refused += 1
                    raise ServerBusy(f"the server's memory budget for requests in flight "
                                     f"({self.capacity / 2**20:.0f} MiB, serve --max-inflight-mb) stayed full "
                                     f"for {self.wait_s:g} s; retry later")
                self._changed.wait(left)
            self.in_flight += need
            self.peak = max(self.peak, self.in_flight)
        try:
            yield
        finally:
            with self._changed:
                self.in_flight -= need
                self._changed.notify_all()
