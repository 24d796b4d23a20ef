"""Pieces of the wire protocol shared by the gRPC server and client (docs/protocol.md is the specification).

Nothing here is pickled: step messages are protobuf (splitprune.proto, service.proto), state transfers
are safetensors files (a JSON header plus raw little-endian tensor bytes).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from splitprune.compression.codec import MAX_MESSAGE_BYTES
from splitprune.errors import ProtocolError, UserError
from splitprune.proto import pb
from splitprune.proto import service_pb2 as spb
from splitprune.transport.errors import BadState, TooLarge

PROTOCOL_VERSION = 1
SERVICE = "splitprune.v1.SplitPrune"
TRAIN_METHOD = f"/{SERVICE}/Train"
FETCH_STATE_METHOD = f"/{SERVICE}/FetchState"
PUSH_STATE_METHOD = f"/{SERVICE}/PushState"
DESCRIBE_METHOD = f"/{SERVICE}/Describe"
INFER_METHOD = f"/{SERVICE}/Infer"

AUTH_KEY = "authorization"    # metadata: "Bearer <token>"
ERROR_KEY = "splitprune-error"  # trailing metadata: an ErrorReason name

# The largest step message is MAX_MESSAGE_BYTES (the codec's limit); the envelope adds a few bytes.
DEFAULT_MAX_MESSAGE = MAX_MESSAGE_BYTES + 64 * 1024
STATE_CHUNK = 1 << 20

# Field numbers of the oneof `body` in ClientMessage / ServerMessage.
HELLO = WELCOME = 1
PHASE = 2
TRAIN = 3
EVAL = 4
CHECKPOINT = 5
KIND_NAMES = {HELLO: "hello", PHASE: "phase", TRAIN: "train", EVAL: "eval", CHECKPOINT: "checkpoint"}

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


def weights_digest(tensors: dict[str, torch.Tensor], prefix: str = "server.") -> str:
    """sha256 over the `prefix` tensors sorted by name: name NUL dtype NUL shape NUL raw-bytes, each."""
    h = hashlib.sha256()
    for name in sorted(k for k in tensors if k.startswith(prefix)):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode() + b"\0" + str(t.dtype).removeprefix("torch.").encode() + b"\0"
                 + ",".join(str(d) for d in t.shape).encode() + b"\0")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------- state transfer
def state_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def state_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    try:
        return st_load(bytes(data))
    except Exception as exc:  # safetensors raises SafetensorsError and others on garbage
        raise ProtocolError(f"state is not a valid safetensors file: {exc}") from None


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


# ---------------------------------------------------------------- TLS and channel options
@dataclass(frozen=True)
class TlsFiles:
    """PEM files. Server: cert + key (+ client_ca for mutual TLS). Client: ca (+ cert + key for mutual TLS)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    @staticmethod
    def read(path: str | None, what: str) -> bytes | None:
        if path is None:
            return None
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
        if b"-----BEGIN" not in data:
            raise UserError(f"{what} {path} is not a PEM file")
        return data


def server_credentials(cert: str | None, key: str | None, client_ca: str | None = None):
    """None for plaintext; TLS with the server certificate; mutual TLS when client_ca is given."""
    import grpc

    if cert is None and key is None:
        if client_ca:
            raise UserError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS runs over TLS)")
        return None
    if not (cert and key):
        raise UserError("TLS needs both --tls-cert and --tls-key")
    pair = (TlsFiles.read(key, "TLS key"), TlsFiles.read(cert, "TLS certificate"))
    ca = TlsFiles.read(client_ca, "client CA certificate")
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def channel_credentials(tls: TlsFiles | None):
    import grpc

    if tls is None:
        return None
    if bool(tls.cert) != bool(tls.key):
        raise UserError("mutual TLS needs both --tls-cert and --tls-key")
    return grpc.ssl_channel_credentials(root_certificates=TlsFiles.read(tls.ca, "TLS CA certificate"),
                                        private_key=TlsFiles.read(tls.key, "TLS key"),
                                        certificate_chain=TlsFiles.read(tls.cert, "TLS certificate"))


# A fixed 8 MiB HTTP/2 flow-control window instead of bandwidth-delay probing: no probe PINGs on the wire
# (they cost more than the framing of a B=4 step), and a window that already holds the largest step.
FLOW_CONTROL = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 8 * 1024 * 1024)]


def client_options(max_message: int = DEFAULT_MAX_MESSAGE, tls_host: str | None = None) -> list[tuple]:
    opts = [
        ("grpc.max_receive_message_length", max_message),
        ("grpc.max_send_message_length", max_message),
        ("grpc.keepalive_time_ms", 30_000),        # detect a dead server within ~40 s even when idle
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_http_proxy", 0),              # never route through an HTTP proxy from the environment
        ("grpc.enable_retries", 0),                 # the client does its own, step-id aware, retries
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        ("grpc.use_local_subchannel_pool", 1),      # own TCP connection per channel (clean byte counts)
    ] + FLOW_CONTROL
    if tls_host:
        opts.append(("grpc.ssl_target_name_override", tls_host))
    return opts


def server_options(max_message: int, keepalive_s: float) -> list[tuple]:
    return [
        ("grpc.max_receive_message_length", max_message),
        ("grpc.max_send_message_length", max_message),
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),  # ping idle clients; drop dead ones
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),                   # a second server on the same port fails loudly
    ] + FLOW_CONTROL
