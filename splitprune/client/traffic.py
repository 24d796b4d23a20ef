"""Byte accounting of a client's traffic, by purpose: every message is counted; socket bytes on request.

Purposes: `training` (TrainRequest / TrainReply), `evaluation` (EvalRequest / EvalReply, and Infer),
`state` (PushState / FetchState: the server half's weights travelling), `control` (Hello / Welcome,
PhaseRequest / PhaseReply, CheckpointRequest / CheckpointReply, Describe, and on the socket everything
no message accounts for: connection setup, HTTP/2 settings, pings, stream ends).

Message bytes are the encoded gRPC messages (ClientMessage / ServerMessage envelopes, StateChunk, ...),
always counted. Socket bytes are counted only when asked for (`measure`): each connection then runs
through an in-process relay (splitprune.link.proxy.LinkProxy) and the bytes crossing it while a
request waits for its reply are that request's purpose; the rest is `control`.
"""
from __future__ import annotations

from splitprune.link.proxy import LinkProfile, LinkProxy
from splitprune.wire.accounting import PURPOSES, describe


class SocketMeter:
    """A counting relay in front of the server for one connection."""

    def __init__(self, upstream: tuple[str, int], purpose: str) -> None:
        self.proxy = LinkProxy(("127.0.0.1", 0), upstream, LinkProfile()).start()
        self.purpose = purpose     # of the bytes no request accounts for
        self.attributed = [0, 0]   # bytes already given to the purpose of a request

    @property
    def address(self) -> tuple[str, int]:
        return self.proxy.address

    def read(self) -> tuple[int, int]:
        c = self.proxy.counters()
        return c.bytes_up, c.bytes_down

    def connections(self) -> int:
        return self.proxy.counters().connections

    def stop(self) -> None:
        self.proxy.stop()


class Traffic:
    """Bytes per purpose and direction of one client process."""

    def __init__(self) -> None:
        self.messages = {p: {"bytes_up": 0, "bytes_down": 0, "messages_up": 0, "messages_down": 0} for p in PURPOSES}
        self.socket = {p: [0, 0] for p in PURPOSES}
        self.meters: list[SocketMeter] = []

    @property
    def measured(self) -> bool:
        return bool(self.meters)

    def count(self, purpose: str, up: int = 0, down: int = 0, messages_up: int = 0, messages_down: int = 0) -> None:
        m = self.messages[purpose]
        m["bytes_up"] += up
        m["bytes_down"] += down
        m["messages_up"] += messages_up
        m["messages_down"] += messages_down

    def exchange(self, purpose: str, up: int, down: int) -> None:
        """One request of `up` message bytes answered by one of `down` bytes."""
        self.count(purpose, up, down, 1, 1)

    def attribute(self, purpose: str, meter: SocketMeter, before: tuple[int, int], after: tuple[int, int]) -> None:
        """Socket bytes that crossed `meter` between `before` and `after` (meter.read()) belong to `purpose`."""
        for i in (0, 1):
            self.socket[purpose][i] += after[i] - before[i]
            meter.attributed[i] += after[i] - before[i]

    def report(self) -> dict:
        """Counts only (so reports of several processes add up with add_counts)."""
        socket = {p: list(v) for p, v in self.socket.items()}
        connections = 0
        for meter in self.meters:  # what no request accounts for goes to the meter's own purpose
            up, down = meter.read()
            connections += meter.connections()
            socket[meter.purpose][0] += up - meter.attributed[0]
            socket[meter.purpose][1] += down - meter.attributed[1]
        purposes = {}
        for p in PURPOSES:
            m = self.messages[p]
            entry = {"message_bytes_up": m["bytes_up"], "message_bytes_down": m["bytes_down"],
                     "messages_up": m["messages_up"], "messages_down": m["messages_down"]}
            if self.measured:
                entry.update(socket_bytes_up=socket[p][0], socket_bytes_down=socket[p][1])
            purposes[p] = entry
        out = {"processes": 1, "socket_processes": int(self.measured), "purposes": purposes}
        if self.measured:
            out["connections"] = connections
        return describe(out)


