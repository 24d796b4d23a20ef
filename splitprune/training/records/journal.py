"""A remote run's byte journal (`OUT/transport.jsonl`): what each process of the run has sent and received,
appended after every training step and flushed, so that the bytes of a process killed after its last
checkpoint are not lost from the run's totals.

The checkpoint's `progress.transport` holds the traffic of every process up to its save, and
`progress.journal` which part of each process's traffic that is. On resume, every earlier process's last
journal line minus what the checkpoint holds of it is traffic that was sent and then thrown away (the
steps it paid for are redone): the summary reports it as `transport.discarded`. Exact to the step: a
process killed in the middle of a step may leave that one step's messages out. The file stays small:
past MAX_BYTES it is rewritten with the last line of each process only.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from splitprune.wire.accounting import describe, totals

MAX_BYTES = 1 << 20


def process_totals(stats: dict) -> tuple[int, int]:
    """(up, down) of one process's transport report: socket bytes where measured, else message bytes."""
    return totals(describe({"processes": 1, **stats}))


class ByteJournal:
    """This process's lines in the run's journal; `included`: what the resumed checkpoint holds of each
    earlier process (its `progress.journal`), empty for a fresh start."""

    def __init__(self, path: Path, included: dict[str, list[int]] | None) -> None:
        self.path, self.process = path, uuid.uuid4().hex[:16]
        if included is None and path.exists():
            path.unlink()  # a run started afresh: earlier processes' traffic belongs to another run
        self._included = dict(included or {})
        self.discarded = self._discarded(self._included)
        self._file = open(path, "a")
        self._last: tuple[int, int] | None = None

    @classmethod
    def for_run(cls, out: Path, endpoint, included: dict | None) -> "ByteJournal | None":
        """The journal of a remote run (an endpoint that reports its traffic); None in-process."""
        return cls(out / "transport.jsonl", included) if hasattr(endpoint, "transport_stats") else None

    def included(self, stats: dict) -> dict[str, list[int]]:
        """What a checkpoint saved now holds of each process (its `progress.journal`)."""
        return {**self._included, self.process: list(process_totals(stats))}

    def record(self, stats: dict) -> None:
        """This process's traffic so far (its transport report), appended if it changed."""
        up, down = process_totals(stats)
        if self._last == (up, down):
            return
        self._last = (up, down)
        self._file.write(json.dumps({"process": self.process, "up": up, "down": down}) + "\n")
        self._file.flush()
        if self._file.tell() > MAX_BYTES:
            self._compact()

    def last_totals(self) -> dict[str, tuple[int, int]]:
        """Each process's last line."""
        last: dict[str, tuple[int, int]] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    last[str(entry["process"])] = (int(entry["up"]), int(entry["down"]))
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a kill
        return last

    def _discarded(self, included: dict[str, list[int]]) -> dict:
        """Bytes earlier processes sent and received after the checkpoint being resumed (`included`: what it
        holds of each process)."""
        up = down = processes = 0
        for process, (u, d) in self.last_totals().items():
            if process == self.process:
                continue
            held = included.get(process, [0, 0])
            if u > held[0] or d > held[1]:
                processes += 1
                up, down = up + max(0, u - held[0]), down + max(0, d - held[1])
        return {"bytes_up": up, "bytes_down": down, "processes": processes}

    def _compact(self) -> None:
        self._file.close()
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"process": p, "up": u, "down": d}) + "\n"
                               for p, (u, d) in self.last_totals().items()))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")

    def close(self) -> None:
        self._file.close()
