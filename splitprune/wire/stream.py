"""The client side of a streaming inference session, torch-free: an `InferStream` (docs/protocol.md 5.1), or a
connection to the server's TCP session port (5.2, wire/session_socket.py).

One bidirectional stream per session: the InferOpen says once what stays the same (the half, the budget,
the dtype, the kept channels, the tables' digest, all taken from the first request's EncodedTensor); each
request is then an InferItem with the tensor's data alone, answered in order on the same stream.

`submit` sends an item and returns at once (`--hedge`, splitprune.adaptive.hedge): a reader thread takes the
answers in order, each for the oldest item still unanswered, so an answer the device stopped waiting for is
read and dropped, never taken for the next item's.
"""
from __future__ import annotations

import collections
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Iterator

import grpc
import numpy as np

from splitprune.errors import ProtocolError
from splitprune.proto import pb
from splitprune.proto import service_pb2 as spb
from splitprune.wire.codec import encode_label_array
from splitprune.wire.timing import server_seconds

CLOSE_WAIT_S = 2.0   # how long closing a session waits for the server to end it too

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


class SessionLost(StreamRefused):
    """A session's connection broke or closed (a session on a TCP port; an InferStream's is a grpc.RpcError)."""

    def __init__(self, message: str) -> None:
        super().__init__("UNAVAILABLE", message)


BROKEN = (grpc.RpcError, SessionLost)  # what ends a session, whatever carries it


class Session:
    """One open inference session, whatever carries it: `infer` sends one item and waits for its reply, `submit`
    returns at once. A transport gives `_send` (one serialized item), `_replies` (the answers, in order, raising
    one of BROKEN when the session ends) and `_end`."""

    def __init__(self, opened: spb.InferOpened, open_bytes: int) -> None:
        self.opened, self.open_bytes = opened, open_bytes
        self._lock, self._sending = threading.Lock(), threading.Lock()
        self._unanswered: collections.deque = collections.deque()   # (future, sent at, item bytes), in order
        self._reader: threading.Thread | None = None

    def _send(self, item: bytes) -> None:
        raise NotImplementedError

    _replies: Iterator[bytes]

    def _end(self) -> None:
        raise NotImplementedError

    def infer(self, data: bytes, samples: int = 1) -> ItemResult:
        """One item's result; StreamRefused for a refused item, ProtocolError for a server time that cannot
        be true (splitprune.wire.timing)."""
        if self._reader is not None:   # items were submitted: the reader thread takes every answer
            return self.submit(data, samples).result()
        item = item_message(data, samples)
        start = time.perf_counter()
        self._send(item)
        out = next(self._replies)
        return item_result(out, time.perf_counter() - start, len(item))

    def submit(self, data: bytes, samples: int = 1) -> Future:
        """Send one item and return at once: a Future of its ItemResult (or of the exception `infer` raises).
        Not waiting for it abandons it: its answer is still read, in turn, and dropped."""
        return self.send_item(item_message(data, samples))

    def send_item(self, item: bytes) -> Future:
        """`submit` of an InferItem already serialized (item_message)."""
        future: Future = Future()
        with self._sending:   # items leave in the order they are queued for their answers
            with self._lock:
                if self._reader is None:
                    self._reader = threading.Thread(target=self._read, name="splitprune-infer-stream", daemon=True)
                    self._reader.start()
                self._unanswered.append((future, time.perf_counter(), len(item)))
            try:
                self._send(item)   # outside _lock: a send waiting for room must not stop the reader making it
            except BROKEN as exc:
                with self._lock:
                    if self._unanswered and self._unanswered[-1][0] is future:
                        self._unanswered.pop()
                if not future.done():   # the reader may have failed it already, with the session
                    future.set_exception(exc)
        return future

    def _read(self) -> None:
        failure: Exception = SessionLost("the server ended the session")
        try:
            for out in self._replies:
                received = time.perf_counter()
                with self._lock:
                    if not self._unanswered:
                        failure = ProtocolError("the server answered an item that was not sent")
                        break
                    future, sent, size = self._unanswered.popleft()
                try:
                    future.set_result(item_result(out, received - sent, size))
                except (StreamRefused, ProtocolError) as exc:
                    future.set_exception(exc)
        except BROKEN as exc:
            failure = exc
        with self._lock:
            while self._unanswered:
                self._unanswered.popleft()[0].set_exception(failure)

    def close(self) -> None:
        self._end()


class InferStreamClient(Session):
    """One open InferStream on `channel`."""

    def __init__(self, channel: grpc.Channel, opened: spb.InferOpen, metadata=()) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._queue.put(opened.SerializeToString())
        call = channel.stream_stream(INFER_STREAM_METHOD)
        self._replies = call(iter(self._queue.get, None), metadata=metadata)
        super().__init__(spb.InferOpened.FromString(next(self._replies)), opened.ByteSize())

    def _send(self, item: bytes) -> None:
        self._queue.put(item)

    def _end(self) -> None:
        """Half-close, then wait (CLOSE_WAIT_S at most) for the server to end the stream, which it does once the
        session's place is free again, so that the next session can open at once; then cancel."""
        ended = threading.Event()
        self._replies.add_done_callback(lambda _: ended.set())
        self._queue.put(None)
        ended.wait(CLOSE_WAIT_S)
        self._replies.cancel()


def on_channel(channel: grpc.Channel, metadata=()) -> Callable[[spb.InferOpen], Session]:
    """What opens sessions as InferStreams on `channel` (InferSessions' `open`)."""
    return lambda opened: InferStreamClient(channel, opened, metadata)


def item_message(data: bytes, samples: int) -> bytes:
    """The serialized InferItem of one request's tensor data for `samples` samples (0, unset, means 1)."""
    return spb.InferItem(data=data, samples=0 if samples == 1 else samples).SerializeToString()


def exchange_sizes(fingerprint: str, budget: int, request: pb.EvalRequest, stream: bool) -> tuple[int, int]:
    """(up, down): the serialized sizes of one request of `request`'s tensor and of its answer (predictions, a
    1 ms server time) as they travel: an item on a session and its InferItemReply (the session's opening is
    not counted), or a unary InferRequest and InferReply. What `--budget auto` plans each option with."""
    tensor = request.activations
    samples = int(tensor.shape[0])
    labels = encode_label_array(np.zeros(samples, dtype=np.int64))
    if stream:
        answer = spb.InferItemReply(labels=labels.data, server_us=1000)
        return len(item_message(item_data(tensor), samples)), answer.ByteSize()
    reply = pb.EvalReply(request_id=request.request_id, predictions=labels)
    return (spb.InferRequest(fingerprint=fingerprint, budget=budget, eval=request).ByteSize(),
            spb.InferReply(eval=reply, server_ms=1.0).ByteSize())


def item_result(out: bytes, elapsed: float, item_bytes: int) -> ItemResult:
    """The ItemResult of one answer `elapsed` seconds after its item (`item_bytes`) was sent."""
    reply = spb.InferItemReply.FromString(out)
    if reply.error:
        raise StreamRefused(spb.ErrorReason.Name(reply.error), reply.message)
    server = server_seconds(reply.server_us / 1e6, elapsed, "InferItemReply")
    return ItemResult(reply, elapsed * 1e3, item_bytes, len(out), server)


class InferSessions:
    """The sessions of one client: one per model, budget and tensor header, opened by `open` (on_channel, or
    session_socket.on_port) on the first request that needs it; a session that broke is dropped (the next
    request opens another)."""

    def __init__(self, open: Callable[[spb.InferOpen], Session]) -> None:
        self.open = open
        self._sessions: dict[tuple, Session] = {}

    def infer(self, fingerprint: str, budget: int, tensor: pb.EncodedTensor) -> ItemResult:
        """One request: `tensor` (an EncodedTensor of N samples) on its session. Raises one of BROKEN for a
        refused or broken session, StreamRefused for a refused item, ProtocolError for a bad server time."""
        key = session_key(fingerprint, budget, tensor)
        try:
            opened = self._open(key, fingerprint, budget, tensor)
            result = self._sessions[key].infer(item_data(tensor), tensor.shape[0])
        except BROKEN:
            self._sessions.pop(key, None)
            raise
        result.open_bytes = opened
        return result

    def submit(self, fingerprint: str, budget: int, tensor: pb.EncodedTensor) -> tuple[Future, int, int]:
        """`infer` returning at once: (a Future of the ItemResult, the bytes of its InferItem, of the InferOpen
        if it opened its session). Opening may raise one of BROKEN; a broken session fails the Future with it."""
        key = session_key(fingerprint, budget, tensor)
        try:
            opened = self._open(key, fingerprint, budget, tensor)
        except BROKEN:
            self._sessions.pop(key, None)
            raise
        session, item = self._sessions[key], item_message(item_data(tensor), tensor.shape[0])
        future = session.send_item(item)

        def drop_broken(done: Future) -> None:
            if isinstance(done.exception(), BROKEN) and self._sessions.get(key) is session:
                self._sessions.pop(key, None)

        future.add_done_callback(drop_broken)
        return future, len(item), opened

    def _open(self, key: tuple, fingerprint: str, budget: int, tensor: pb.EncodedTensor) -> int:
        """Open the session of `key` unless open: the bytes of its InferOpen (0: it was open)."""
        if key in self._sessions:
            return 0
        self._sessions[key] = self.open(open_message(fingerprint, budget, tensor))
        return self._sessions[key].open_bytes

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()
