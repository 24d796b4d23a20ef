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

INFER_STREAM_METHOD = "/splitprune.v1.SplitPrune/InferStream"


def item_data(tensor: pb.EncodedTensor) -> bytes:
    """What an InferItem carries of an EncodedTensor: INT8/INT4's scales and offsets, then the data."""
    return bytes(tensor.scales) + bytes(tensor.offsets) + bytes(tensor.data)


def open_message(fingerprint: str, budget: int, tensor: pb.EncodedTensor) -> spb.InferOpen:
    return spb.InferOpen(fingerprint=fingerprint, budget=budget, dtype=tensor.dtype, channels=tensor.channels,
                         prefix=tensor.prefix, tables=tensor.tables)


def session_key(budget: int, tensor: pb.EncodedTensor) -> tuple:
    """Requests that can share a session: the same budget and tensor header but for the sample count."""
    return budget, tensor.dtype, bytes(tensor.channels), tensor.prefix, tensor.tables


@dataclass
class ItemResult:
    reply: spb.InferItemReply
    round_trip_ms: float
    bytes_up: int      # the serialized InferItem
    bytes_down: int    # the serialized InferItemReply


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
        item = spb.InferItem(data=data, samples=0 if samples == 1 else samples).SerializeToString()
        start = time.perf_counter()
        self._queue.put(item)
        out = next(self._replies)
        elapsed = (time.perf_counter() - start) * 1e3
        reply = spb.InferItemReply.FromString(out)
        if reply.error:
            raise StreamRefused(spb.ErrorReason.Name(reply.error), reply.message)
        return ItemResult(reply, elapsed, len(item), len(out))

    def close(self) -> None:
        self._queue.put(None)  # half-close: the server ends the stream
        self._replies.cancel()
