"""Split inference against a server: unary Describe / Infer calls for one hosted model."""
from __future__ import annotations

import time

import grpc

from splitprune.client.channel import Connection, RemoteError, remote_error
from splitprune.client.config import ConnectConfig
from splitprune.errors import UserError
from splitprune.proto import service_pb2 as spb
from splitprune.wire.envelopes import DESCRIBE_METHOD, INFER_METHOD, frame


class InferenceClient:
    """Unary Describe / Infer calls for one hosted model (identified by its config fingerprint)."""

    def __init__(self, config: ConnectConfig | str, fingerprint: str) -> None:
        self.conn = Connection(config)
        self.traffic = self.conn.traffic
        channel, self._meter = self.conn.channel("control")
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

    def close(self) -> None:
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
