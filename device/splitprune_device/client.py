"""Describe and Infer against a `splitprune serve` server (docs/protocol.md §5), timed and byte-counted."""
from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import grpc

from splitprune.errors import ProtocolError, UserError
from splitprune.proto import pb
from splitprune.proto import service_pb2 as spb
from splitprune.wire.codec import MAX_MESSAGE_BYTES
from splitprune.wire.addresses import parse_hostport
from splitprune.wire.session_socket import client_context, on_port
from splitprune.wire.stream import InferSessions, ItemResult, SessionLost, StreamRefused, on_channel
from splitprune.wire.timing import server_seconds

_SERVICE = spb.DESCRIPTOR.services_by_name["SplitPrune"]
ERROR_KEY = "splitprune-error"  # trailing metadata holding the ErrorReason name (docs/protocol.md §8)
MAX_MESSAGE = MAX_MESSAGE_BYTES + 64 * 1024  # the codec's largest tensor plus the envelope, as the server allows


def method_path(name: str) -> str:
    return f"/{_SERVICE.full_name}/{_SERVICE.methods_by_name[name].name}"


def explain(exc: grpc.RpcError, what: str) -> UserError:
    """One clear message for a failed call: status, the server's reason name and its words."""
    reason = next((v for k, v in (exc.trailing_metadata() or ()) if k == ERROR_KEY), None)
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return UserError(f"{what}: the server is unreachable ({exc.details()})")
    tag = f"{code.name}" + (f"/{reason}" if reason else "")
    return UserError(f"{what}: {tag}: {exc.details()}")


def refused(exc: StreamRefused) -> UserError:
    """One clear message for a refused item or session (or one whose TCP connection broke)."""
    if isinstance(exc, SessionLost):
        return UserError(f"inference session failed: {exc}")
    return UserError(f"inference request refused: {exc}")


def broke_protocol(server: str, exc: ProtocolError) -> UserError:
    return UserError(f"the server at {server} broke the protocol: {exc}")


@dataclass
class InferResult:
    reply: spb.InferReply
    round_trip_ms: float   # uplink + server + downlink, as measured around the call
    bytes_up: int          # the serialized InferRequest
    bytes_down: int        # the serialized InferReply
    server_s: float        # reply.server_ms in seconds, checked against the round trip


class InferenceClient:
    """One channel to the server; the token travels as `authorization: Bearer T`, TLS when a CA is given."""

    def __init__(self, server: str, token: str | None = None, tls_ca: str | None = None,
                 timeout_s: float = 60.0, connect_timeout_s: float = 20.0, stream: bool = False,
                 tcp: bool = False) -> None:
        """`stream`: requests go on InferStream sessions (one per budget and dtype, opened on first use); `tcp`: on
        sessions on the server's TCP session port instead (docs/protocol.md 5.2)."""
        self.stream = stream or tcp
        if ":" not in server:
            raise UserError(f"--server {server!r}: give HOST:PORT")
        options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE),
                   ("grpc.enable_http_proxy", 0)]
        if tls_ca:
            try:
                ca = open(tls_ca, "rb").read()
            except OSError as exc:
                raise UserError(f"cannot read --tls-ca {tls_ca}: {exc.strerror or exc}") from None
            self.channel = grpc.secure_channel(server, grpc.ssl_channel_credentials(ca), options)
        else:
            self.channel = grpc.insecure_channel(server, options)
        if token is not None and not token:
            raise UserError("the token must not be empty")
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.server, self.timeout_s = server, timeout_s
        self._describe = self.channel.unary_unary(method_path("Describe"))  # bytes in, bytes out
        self._infer = self.channel.unary_unary(method_path("Infer"))
        if tcp:
            host = parse_hostport(server, default_host="localhost")[0]

            def address_of(fingerprint: str) -> tuple[str, int] | None:
                port = self.describe(fingerprint).session_port
                return (host, port) if port else None

            self._sessions = InferSessions(on_port(address_of, token, client_context(tls_ca) if tls_ca else None,
                                                   timeout_s))
        else:
            self._sessions = InferSessions(on_channel(self.channel, self.metadata))
        try:
            grpc.channel_ready_future(self.channel).result(timeout=connect_timeout_s)
        except grpc.FutureTimeoutError:
            self.channel.close()
            raise UserError(f"cannot reach the server at {server} within {connect_timeout_s:g} s") from None

    def describe(self, fingerprint: str) -> spb.DescribeReply:
        req = spb.DescribeRequest(fingerprint=fingerprint).SerializeToString()
        try:
            return spb.DescribeReply.FromString(self._describe(req, metadata=self.metadata, timeout=self.timeout_s))
        except grpc.RpcError as exc:
            raise explain(exc, f"cannot describe model {fingerprint} on {self.server}") from None

    def infer(self, data: bytes) -> InferResult:
        """Send one serialized InferRequest (see `infer_request`) and wait for its reply."""
        start = time.perf_counter()
        try:
            out = self._infer(data, metadata=self.metadata, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise explain(exc, "inference request failed") from None
        elapsed = time.perf_counter() - start
        reply = spb.InferReply.FromString(out)
        try:
            server = server_seconds(reply.server_ms / 1e3, elapsed, "InferReply")
        except ProtocolError as exc:
            raise broke_protocol(self.server, exc) from None
        return InferResult(reply, elapsed * 1e3, len(data), len(out), server)

    @staticmethod
    def infer_request(fingerprint: str, budget: int, request: pb.EvalRequest) -> bytes:
        return spb.InferRequest(fingerprint=fingerprint, budget=budget, eval=request).SerializeToString()

    def infer_stream(self, fingerprint: str, budget: int, tensor: pb.EncodedTensor) -> ItemResult:
        """One request on the session of its budget and tensor header (opened on first use)."""
        try:
            return self._sessions.infer(fingerprint, budget, tensor)
        except grpc.RpcError as exc:
            raise explain(exc, "inference session failed") from None
        except StreamRefused as exc:
            raise refused(exc) from None
        except ProtocolError as exc:
            raise broke_protocol(self.server, exc) from None

    def submit(self, fingerprint: str, budget: int, tensor: pb.EncodedTensor, request_id: int,
               label_width: int) -> tuple[Future, Callable[[], None], int]:
        """One request returning at once (`--hedge`): a Future of (its predictions as pb.Labels, round trip s,
        server s, bytes up, bytes down), what abandons it (a unary call is cancelled; an item on a session
        cannot be: its answer is read and dropped) and the bytes it sent."""
        done: Future = Future()

        def fail(exc: BaseException, what: str) -> None:
            if isinstance(exc, grpc.RpcError):
                exc = explain(exc, what)
            elif isinstance(exc, StreamRefused):
                exc = refused(exc)
            elif isinstance(exc, ProtocolError):
                exc = broke_protocol(self.server, exc)
            done.set_exception(exc)

        if self.stream:
            try:
                item, up, _ = self._sessions.submit(fingerprint, budget, tensor)
            except grpc.RpcError as exc:
                raise explain(exc, "inference session failed") from None
            except StreamRefused as exc:
                raise refused(exc) from None

            def answered(f: Future) -> None:
                if f.exception() is not None:
                    return fail(f.exception(), "inference session failed")
                r = f.result()
                done.set_result((pb.Labels(width=label_width, data=r.reply.labels), r.round_trip_ms / 1e3,
                                 r.server_s, r.bytes_up, r.bytes_down))

            item.add_done_callback(answered)
            return done, lambda: None, up
        data = self.infer_request(fingerprint, budget, pb.EvalRequest(request_id=request_id, activations=tensor))
        start = time.perf_counter()
        call = self._infer.future(data, metadata=self.metadata, timeout=self.timeout_s)

        def replied(f) -> None:
            if f.cancelled():
                return done.cancel() or None
            if f.exception() is not None:
                return fail(f.exception(), "inference request failed")
            elapsed, out = time.perf_counter() - start, f.result()
            reply = spb.InferReply.FromString(out)
            if reply.eval.request_id != request_id:
                return fail(UserError(f"reply to request {reply.eval.request_id} received for {request_id}"), "")
            try:
                server = server_seconds(reply.server_ms / 1e3, elapsed, "InferReply")
            except ProtocolError as exc:
                return fail(exc, "")
            done.set_result((reply.eval.predictions, elapsed, server, len(data), len(out)))

        call.add_done_callback(replied)
        return done, call.cancel, len(data)

    def close(self) -> None:
        self._sessions.close()
        self.channel.close()
