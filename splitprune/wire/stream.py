"""The client side of a streaming inference session (`InferStream`, docs/protocol.md 5.1), torch-free.

One bidirectional stream per session: the InferOpen says once what stays the same (the half, the budget,
the dtype, the kept channels, the tables' digest, all taken from the first request's EncodedTensor); each
request is then an InferItem with the tensor's data alone, answered in order on the same stream.
"""
from __future__ import annotations

import queue
import time
from dataclasses import dataclass

import grpc

from splitprune.proto import pb
from splitprune.proto import service_pb2 as spb
from splitprune.wire.timing import server_seconds

INFER_STREAM_METHOD = "/splitprune.v1.SplitPrune/InferStream"


def item_data(tensor: pb.EncodedTensor) -> bytes:
    """What an InferItem carries of an EncodedTensor: INT8/INT4's scales and offsets, then the data."""
    return bytes(tensor.scales) + bytes(tensor.offsets) + bytes(tensor.data)


def open_message(fingerprint: str, budget: int, tensor: pb.EncodedTensor) -> spb.InferOpen:
    return spb.InferOpen(fingerprint=fingerprint, budget=budget, dtype=tensor.dtype, channels=tensor.channels,
                         prefix=tensor.prefix, tables=tensor.tables)


def session_key(fingerprint: str, budget: int, tensor: pb.EncodedTensor) -> tuple:
    """Requests that can share a session: the same model, budget and tensor header but for the sample count."""
    return fingerprint, budget, tensor.dtype, bytes(tensor.channels), tensor.prefix, tensor.tables


@dataclass
class ItemResult:
    reply: spb.InferItemReply
    round_trip_ms: float
    bytes_up: int      # the serialized InferItem
    bytes_down: int    # the serialized InferItemReply
    server_s: float    # reply.server_us in seconds, checked against the round trip
    open_bytes: int = 0  # the serialized InferOpen, when this request opened its session


class StreamRefused(Exception):
    """The server refused the session or one item: `reason` is an ErrorReason name."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class InferStreamClient:
    """One open InferStream on `channel`; `infer` sends one item and waits for its reply."""

    def __init__(self, channel: grpc.Channel, opened: spb.InferOpen, metadata=()) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._queue.put(opened.SerializeToString())
        self.open_bytes = opened.ByteSize()
        call = channel.stream_stream(INFER_STREAM_METHOD)
        self._replies = call(iter(self._queue.get, None), metadata=metadata)
        self.opened = spb.InferOpened.FromString(next(self._replies))

    def infer(self, data: bytes, samples: int = 1) -> ItemResult:
        """One item's result; StreamRefused for a refused item, ProtocolError for a server time that cannot
        be true (splitprune.wire.timing)."""
        item = spb.InferItem(data=data, samples=0 if samples == 1 else samples).SerializeToString()
        start = time.perf_counter()
        self._queue.put(item)
        out = next(self._replies)
        elapsed = time.perf_counter() - start
        reply = spb.InferItemReply.FromString(out)
        if reply.error:
            raise StreamRefused(spb.ErrorReason.Name(reply.error), reply.message)
        server = server_seconds(reply.server_us / 1e6, elapsed, "InferItemReply")
        return ItemResult(reply, elapsed * 1e3, len(item), len(out), server)

    def close(self) -> None:
        self._queue.put(None)  # half-close: the server ends the stream
        self._replies.cancel()


class InferSessions:
    """The InferStream sessions of one channel: one per model, budget and tensor header, opened on the first
    request that needs it; a session whose stream broke is dropped (the next request opens another)."""

    def __init__(self, channel: grpc.Channel, metadata=()) -> None:
        self.channel, self.metadata = channel, metadata
        self._sessions: dict[tuple, InferStreamClient] = {}

    def infer(self, fingerprint: str, budget: int, tensor: pb.EncodedTensor) -> ItemResult:
        """One request: `tensor` (an EncodedTensor of N samples) on its session. Raises grpc.RpcError for a
        refused or broken session, StreamRefused for a refused item, ProtocolError for a bad server time."""
        key = session_key(fingerprint, budget, tensor)
        opened = 0
        try:
            if key not in self._sessions:
                self._sessions[key] = InferStreamClient(self.channel, open_message(fingerprint, budget, tensor),
                                                        self.metadata)
                opened = self._sessions[key].open_bytes
            result = self._sessions[key].infer(item_data(tensor), tensor.shape[0])
        except grpc.RpcError:
            self._sessions.pop(key, None)
            raise
        result.open_bytes = opened
        return result

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()
