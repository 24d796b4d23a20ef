"""Split inference against a server: Describe, then Infer calls for one hosted model, unary or on streaming
sessions (InferStream: the request's header said once per session)."""
from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Callable

import grpc

from splitprune.client.channel import Connection, RemoteError, remote_error
from splitprune.client.config import ConnectConfig
from splitprune.errors import ProtocolError, UserError
from splitprune.proto import pb
from splitprune.proto import service_pb2 as spb
from splitprune.wire.envelopes import DESCRIBE_METHOD, INFER_METHOD, frame
from splitprune.client.traffic import SocketMeter
from splitprune.wire.session_socket import client_context, on_port
from splitprune.wire.stream import InferSessions, SessionLost, StreamRefused, on_channel
from splitprune.wire.timing import server_seconds


class InferenceClient:
    """Describe and Infer calls for one hosted model (identified by its config fingerprint); with `stream`, each
    request goes on the InferStream session of its budget and tensor header (opened on first use)."""

    def __init__(self, config: ConnectConfig | str, fingerprint: str, stream: bool = False, tcp: bool = False) -> None:
        """`tcp`: sessions on the server's TCP session port (docs/protocol.md 5.2), not InferStreams."""
        self.conn = Connection(config)
        self.traffic = self.conn.traffic
        channel, self._meter = self.conn.channel("control")
        self.stream = stream or tcp
        tls = self.conn.tls
        self._sessions = InferSessions(on_port(self._session_address, self.conn.config.token,
                                               tls and client_context(tls.ca, tls.cert, tls.key),
                                               self.conn.config.step_timeout)
                                       if tcp else on_channel(channel, self.conn.metadata))
        self._describe = channel.unary_unary(DESCRIBE_METHOD)
        self._infer = channel.unary_unary(INFER_METHOD)
        self.fingerprint = fingerprint
        self.timeout, self.connect_timeout = self.conn.config.step_timeout, self.conn.config.connect_timeout
        self.latencies_ms: list[float] = []
        self.server_ms: list[float] = []

    def describe(self) -> spb.DescribeReply:
        req = spb.DescribeRequest(fingerprint=self.fingerprint).SerializeToString()
        deadline = time.monotonic() + self.connect_timeout
        diagnosed = False
        while True:
            try:
                out = self._describe(req, metadata=self.conn.metadata, timeout=self.timeout, wait_for_ready=False)
                self.traffic.exchange("control", len(req), len(out))
                return spb.DescribeReply.FromString(out)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE and not diagnosed:
                    diagnosed = True
                    hint = self.conn.tls_mismatch()
                    if hint:
                        raise RemoteError(f"cannot reach the server: {hint}", exc.code()) from None
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise remote_error(exc, f"cannot describe model {self.fingerprint} on {self.conn.target}") from None
                time.sleep(0.2)

    def _session_address(self, fingerprint: str) -> tuple[str, int] | None:
        """Where the session port the server announces is (through a counting relay when measuring)."""
        port = self.describe().session_port
        if not port:
            return None
        if not self.conn.measure:
            return self.conn.host, port
        meter = SocketMeter((self.conn.host, port), "evaluation")
        self.traffic.meters.append(meter)
        return meter.address

    def link(self, budget: int) -> "InferenceLink":
        return InferenceLink(self, budget)

    def infer(self, request: bytes, budget: int) -> bytes:
        """The EvalReply (bytes) to one EvalRequest (bytes) at `budget`: one Infer call, or one item of the
        InferStream session of its budget and tensor header."""
        if self.stream:
            req = pb.EvalRequest.FromString(request)
        else:
            data = self._unary_data(request, budget)
        before = self._meter.read() if self._meter else None
        start = time.perf_counter()
        try:
            if self.stream:
                reply, server_ms, up, down = self._on_session(req, budget)
            else:
                try:
                    out = self._infer(data, metadata=self.conn.metadata, timeout=self.timeout)
                except grpc.RpcError as exc:
                    raise remote_error(exc, "inference request failed") from None
                reply, server_s = unary_reply(out, time.perf_counter() - start)
                server_ms, up, down = server_s * 1e3, len(data), len(out)
        except ProtocolError as exc:
            raise self._broke(exc) from None
        self.latencies_ms.append((time.perf_counter() - start) * 1e3)
        if self._meter:
            self.traffic.attribute("evaluation", self._meter, before, self._meter.read())
        self.traffic.exchange("evaluation", up, down)
        self.server_ms.append(server_ms)
        return reply.SerializeToString()

    def _on_session(self, req: pb.EvalRequest, budget: int) -> tuple[pb.EvalReply, float, int, int]:
        """(the EvalReply a unary call would have carried, the server's ms, bytes up, bytes down) of one item;
        the session checked the server's time against the item's round trip."""
        try:
            result = self._sessions.infer(self.fingerprint, budget, req.activations)
        except (grpc.RpcError, StreamRefused) as exc:
            raise session_error(exc) from None
        if result.open_bytes:
            self.traffic.exchange("control", result.open_bytes, 0)
        return session_reply(req, result), result.server_s * 1e3, result.bytes_up, result.bytes_down

    def submit(self, request: bytes, budget: int) -> tuple[Future, Callable[[], None], int]:
        """`infer` returning at once (`--hedge`): a Future of (EvalReply bytes, round trip s, server s, bytes
        up, bytes down), what abandons it (a unary call is cancelled; an item on a session cannot be: its
        answer is read and dropped) and the bytes it sent. Counted as traffic when it is over."""
        done: Future = Future()

        def fail(exc: BaseException) -> None:
            if isinstance(exc, (grpc.RpcError, StreamRefused)):
                exc = session_error(exc) if self.stream else remote_error(exc, "inference request failed")
            elif isinstance(exc, ProtocolError):
                exc = self._broke(exc)
            done.set_exception(exc)

        def finish(reply: pb.EvalReply, elapsed: float, server: float, up: int, down: int) -> None:
            self.traffic.exchange("evaluation", up, down)
            done.set_result((reply.SerializeToString(), elapsed, server, up, down))

        req = pb.EvalRequest.FromString(request)
        if self.stream:
            try:
                item, up, opened = self._sessions.submit(self.fingerprint, budget, req.activations)
            except (grpc.RpcError, StreamRefused) as exc:   # a lost TCP session is a StreamRefused too
                raise session_error(exc) from None
            if opened:
                self.traffic.exchange("control", opened, 0)

            def answered(f: Future) -> None:
                if f.exception() is not None:
                    return fail(f.exception())
                r = f.result()
                finish(session_reply(req, r), r.round_trip_ms / 1e3, r.server_s, r.bytes_up, r.bytes_down)

            item.add_done_callback(answered)
            return done, lambda: None, up
        data = self._unary_data(request, budget)
        start = time.perf_counter()
        call = self._infer.future(data, metadata=self.conn.metadata, timeout=self.timeout)

        def replied(f) -> None:
            if f.cancelled():   # abandoned: its bytes were sent all the same
                self.traffic.count("evaluation", len(data), 0, 1, 0)
                return done.cancel() or None
            if f.exception() is not None:
                return fail(f.exception())
            elapsed, out = time.perf_counter() - start, f.result()
            try:
                reply, server = unary_reply(out, elapsed)
            except ProtocolError as exc:
                return fail(exc)
            finish(reply, elapsed, server, len(data), len(out))

        call.add_done_callback(replied)
        return done, call.cancel, len(data)

    def _unary_data(self, request: bytes, budget: int) -> bytes:
        """The InferRequest of one EvalRequest (bytes) at `budget`."""
        head = spb.InferRequest(fingerprint=self.fingerprint, budget=budget).SerializeToString()
        return head + frame(3, request)  # field 3 = eval: the EvalRequest bytes as they are

    def _broke(self, exc: ProtocolError) -> RemoteError:
        return RemoteError(f"the server at {self.conn.target} broke the protocol: {exc}")

    def close(self) -> None:
        self._sessions.close()
        self.conn.close()


def unary_reply(out: bytes, elapsed: float) -> tuple[pb.EvalReply, float]:
    """The EvalReply of an InferReply received `elapsed` s after its request was sent, and the server's time
    in seconds, checked against that round trip (ProtocolError)."""
    unary = spb.InferReply.FromString(out)
    return unary.eval, server_seconds(unary.server_ms / 1e3, elapsed, "InferReply")


def session_error(exc: grpc.RpcError | StreamRefused) -> RemoteError:
    if isinstance(exc, SessionLost):
        return RemoteError(f"inference session failed: {exc}", reason=exc.reason)
    if isinstance(exc, StreamRefused):
        return RemoteError(f"inference request refused: {exc}", reason=exc.reason)
    return remote_error(exc, "inference session failed")


def session_reply(req: pb.EvalRequest, result) -> pb.EvalReply:
    """The EvalReply a unary call would have carried for the item of `req` (its labels, its request id)."""
    labels = result.reply.labels
    width = max(len(labels) // max(req.activations.shape[0], 1), 1)
    return pb.EvalReply(request_id=req.request_id, predictions=pb.Labels(width=width, data=labels))


class InferenceLink:
    """A Link whose evaluate() is one Infer call (training verbs are refused)."""

    def __init__(self, client: InferenceClient, budget: int) -> None:
        self.client, self.budget = client, budget

    def evaluate(self, request: bytes) -> bytes:
        return self.client.infer(request, self.budget)

    def train(self, request: bytes) -> bytes:
        raise UserError("an inference connection cannot train")

    def start_phase(self, request: bytes) -> bytes:
        raise UserError("an inference connection cannot train")

    def calibrate(self, request: bytes) -> bytes:
        raise UserError("an inference connection cannot calibrate a model: it serves the model as it is")
