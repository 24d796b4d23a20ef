"""Split inference against a server: Describe, then Infer calls for one hosted model, unary or on streaming
sessions (InferStream: the request's header said once per session)."""
from __future__ import annotations

import time

import grpc

from splitprune.client.channel import Connection, RemoteError, remote_error
from splitprune.client.config import ConnectConfig
from splitprune.errors import UserError
from splitprune.proto import pb
from splitprune.proto import service_pb2 as spb
from splitprune.wire.envelopes import DESCRIBE_METHOD, INFER_METHOD, frame
from splitprune.wire.stream import InferStreamClient, StreamRefused, item_data, open_message, session_key


class InferenceClient:
    """Describe and Infer calls for one hosted model (identified by its config fingerprint); with `stream`, each
    request goes on the InferStream session of its budget and tensor header (opened on first use)."""

    def __init__(self, config: ConnectConfig | str, fingerprint: str, stream: bool = False) -> None:
        self.conn = Connection(config)
        self.traffic = self.conn.traffic
        channel, self._meter = self.conn.channel("control")
        self._channel, self.stream = channel, stream
        self._sessions: dict[tuple, InferStreamClient] = {}
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

    def link(self, budget: int) -> "InferenceLink":
        return InferenceLink(self, budget)

    def infer(self, request: bytes, budget: int) -> bytes:
        """The EvalReply (bytes) to one EvalRequest (bytes) at `budget`."""
        if self.stream:
            return self._infer_on_session(pb.EvalRequest.FromString(request), budget)
        head = spb.InferRequest(fingerprint=self.fingerprint, budget=budget).SerializeToString()
        data = head + frame(3, request)  # field 3 = eval: the EvalRequest bytes as they are
        before = self._meter.read() if self._meter else None
        start = time.perf_counter()
        try:
            out = self._infer(data, metadata=self.conn.metadata, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise remote_error(exc, "inference request failed") from None
        self.latencies_ms.append((time.perf_counter() - start) * 1e3)
        if self._meter:
            self.traffic.attribute("evaluation", self._meter, before, self._meter.read())
        self.traffic.exchange("evaluation", len(data), len(out))
        reply = spb.InferReply.FromString(out)
        self.server_ms.append(reply.server_ms)
        return reply.eval.SerializeToString()

    def _infer_on_session(self, req: pb.EvalRequest, budget: int) -> bytes:
        tensor, key = req.activations, session_key(budget, req.activations)
        before = self._meter.read() if self._meter else None
        start = time.perf_counter()
        try:
            if key not in self._sessions:
                self._sessions[key] = InferStreamClient(self._channel, open_message(self.fingerprint, budget, tensor),
                                                        self.conn.metadata)
                self.traffic.exchange("control", self._sessions[key].open_bytes, 0)
            result = self._sessions[key].infer(item_data(tensor), tensor.shape[0])
        except grpc.RpcError as exc:
            self._sessions.pop(key, None)
            raise remote_error(exc, "inference session failed") from None
        except StreamRefused as exc:
            raise RemoteError(f"inference request refused: {exc}", reason=exc.reason) from None
        self.latencies_ms.append((time.perf_counter() - start) * 1e3)
        if self._meter:
            self.traffic.attribute("evaluation", self._meter, before, self._meter.read())
        self.traffic.exchange("evaluation", result.bytes_up, result.bytes_down)
        self.server_ms.append(result.reply.server_us / 1e3)
        width = max(len(result.reply.labels) // max(tensor.shape[0], 1), 1)
        return pb.EvalReply(request_id=req.request_id,
                            predictions=pb.Labels(width=width, data=result.reply.labels)).SerializeToString()

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        self.conn.close()


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
