"""The envelope of the gRPC protocol (docs/protocol.md is the specification): service and method names,
metadata keys, the oneof framing of ClientMessage / ServerMessage, step digests and chunked state transfers.

Torch-free (the device package ships it); nothing here is pickled: step messages are protobuf, state
transfers safetensors files cut in StateChunk messages.
"""
from __future__ import annotations

import hashlib
import re
from typing import Iterable, Iterator

import numpy as np

from splitprune.errors import ProtocolError
from splitprune.proto import pb
from splitprune.proto import service_pb2 as spb
from splitprune.wire.refusals import BadState, TooLarge

PROTOCOL_VERSION = 1
SERVICE = "splitprune.v1.SplitPrune"
TRAIN_METHOD = f"/{SERVICE}/Train"
FETCH_STATE_METHOD = f"/{SERVICE}/FetchState"
PUSH_STATE_METHOD = f"/{SERVICE}/PushState"
DESCRIBE_METHOD = f"/{SERVICE}/Describe"
INFER_METHOD = f"/{SERVICE}/Infer"

AUTH_KEY = "authorization"    # metadata: "Bearer <token>"
ERROR_KEY = "splitprune-error"  # trailing metadata: an ErrorReason name

STATE_CHUNK = 1 << 20

# Field numbers of the oneof `body` in ClientMessage / ServerMessage.
HELLO = WELCOME = 1
PHASE = 2
TRAIN = 3
EVAL = 4
CHECKPOINT = 5
CALIBRATE = 6
KIND_NAMES = {HELLO: "hello", PHASE: "phase", TRAIN: "train", EVAL: "eval", CHECKPOINT: "checkpoint",
              CALIBRATE: "calibrate"}

CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


# ---------------------------------------------------------------- envelopes
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
    raise ProtocolError("malformed envelope: truncated varint")


def leading_step_id(data: bytes) -> int:
    """step_id (field 1) of a serialized TrainRequest, read without parsing the tensor behind it."""
    if data[:1] == b"\x08":  # standard serializers write fields in number order
        return _read_varint(data, 1)[0]
    return pb.TrainRequest.FromString(data).step_id


def frame(field: int, payload: bytes) -> bytes:
    """Protobuf encoding of a ClientMessage/ServerMessage whose oneof holds `payload` (a serialized message)."""
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def unframe(data: bytes) -> tuple[int, bytes]:
    """(field number, inner message bytes) of an envelope; exact bytes when it is one field (the usual case)."""
    try:
        key, pos = _read_varint(data, 0)
        length, pos = _read_varint(data, pos)
        if key & 7 == 2 and pos + length == len(data):
            return key >> 3, data[pos:]
    except ProtocolError:
        pass
    # Any other valid encoding (e.g. unknown extra fields from a newer peer): parse it properly.
    msg = spb.ServerMessage()
    try:
        msg.ParseFromString(data)
    except Exception as exc:
        raise ProtocolError(f"malformed ServerMessage: {exc}") from None
    kind = msg.WhichOneof("body")
    if kind is None:
        raise ProtocolError("empty ServerMessage")
    field = msg.DESCRIPTOR.fields_by_name[kind].number
    return field, getattr(msg, kind).SerializeToString()


# ---------------------------------------------------------------- digests
def request_digest(req: pb.TrainRequest) -> bytes:
    """Content digest of a training step, to recognise a retried step (same id, same content)."""
    h = hashlib.sha256()
    act = req.activations
    dtype = act.dtype & 0xFFFFFFFFFFFFFFFF  # an open enum: a hostile peer may send a negative value
    h.update(np.asarray([req.step_id, dtype, len(act.shape), *act.shape], dtype="<u8").tobytes())
    for part in (act.channels, act.scales, act.offsets, act.data, req.labels.data):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    h.update(req.labels.width.to_bytes(4, "little"))
    return h.digest()


# ---------------------------------------------------------------- state transfer
def state_chunks(data: bytes, first: spb.StateChunk, chunk: int = STATE_CHUNK) -> Iterator[spb.StateChunk]:
    """Cut a state file in StateChunk messages; `first` carries the header fields."""
    first.total_bytes = len(data)
    first.data = data[:chunk]
    yield first
    for start in range(chunk, len(data), chunk):
        yield spb.StateChunk(data=data[start:start + chunk])


def join_chunks(chunks: Iterable[spb.StateChunk], limit: int) -> tuple[spb.StateChunk, bytes]:
    """Reassemble a chunked state: (first chunk, whole file); refuses files over `limit` bytes."""
    first = None
    parts: list[bytes] = []
    size = 0
    for c in chunks:
        if first is None:
            first = c
            if c.total_bytes > limit:
                raise TooLarge(f"state of {c.total_bytes} bytes exceeds the limit of {limit}")
        size += len(c.data)
        if size > limit:
            raise TooLarge(f"state larger than the limit of {limit} bytes")
        if first.total_bytes and size > first.total_bytes:
            raise BadState(f"state larger than announced ({first.total_bytes} bytes)")
        parts.append(c.data)
    if first is None:
        raise BadState("empty state transfer")
    data = b"".join(parts)
    if not first.unchanged and len(data) != first.total_bytes:
        raise BadState(f"state transfer ended after {len(data)} of {first.total_bytes} bytes")
    return first, data
