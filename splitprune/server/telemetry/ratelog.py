"""A log that says at most `burst` lines per `period_s` and counts the rest in one line: what the
server logs per call (refusals, sessions opening and closing) cannot be grown without bound by a peer."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable


class BoundedLog:
    def __init__(self, logger: logging.Logger, what: str, burst: int = 20, period_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.what = logger, what
        self.burst, self.period_s, self.clock = burst, period_s, clock
        self._lock = threading.Lock()
        self._start, self._logged, self._quiet = clock(), 0, 0

    def __call__(self, message: str, *args: object) -> None:
        with self._lock:
            now = self.clock()
            if now - self._start >= self.period_s:
                if self._quiet:
                    self.logger.warning("%d more %s in the last %.0f s were not logged", self._quiet, self.what,
                                        now - self._start)
                self._start, self._logged, self._quiet = now, 0, 0
            if self._logged >= self.burst:
                self._quiet += 1
                return
            self._logged += 1
        self.logger.info(message, *args)
