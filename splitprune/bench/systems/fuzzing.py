"""Structured fuzzing of the server: valid sessions whose fields are mutated one at a time.

Each case opens a real session (Hello, PhaseRequest, as a client would) or reuses the client's open
one, then sends one message with one field changed to a value at the edge of its type or of the
session (0, 2^31, 2^63, NaN, a truncated or flipped byte string, an unknown enum, ...), or the
serialized bytes of a valid message damaged. Describe, Infer, FetchState and PushState requests, the
health service's Check and Watch, and calls to methods the server does not have are mutated the same
way: every service and method the server exposes. A case passes when the server answers with a status that is not INTERNAL or UNKNOWN. The
test suite drives the cases with Hypothesis (tests/test_fuzz.py); `splitprune bench fuzz`
(splitprune/bench/fuzz.py) sends many of them to a server subprocess.
"""
from __future__ import annotations

import queue
import time
from collections import Counter
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health_pb2

from splitprune.bench.systems.mutation import Choose, bytes_variant, mutate
from splitprune.client.connect import make_hello
from splitprune.compression import ChannelCodec, encode_labels
from splitprune.proto import pb
from splitprune.proto import service_pb2 as spb
from splitprune.wire.envelopes import (DESCRIBE_METHOD, FETCH_STATE_METHOD, INFER_METHOD, PUSH_STATE_METHOD,
                                       TRAIN_METHOD, frame, unframe)
from splitprune.wire.stream import INFER_STREAM_METHOD, item_data, open_message

KINDS = ("hello", "phase", "train", "eval", "checkpoint", "calibrate", "envelope", "describe", "infer", "fetch",
         "push", "health_check", "health_watch", "unknown", "infer_stream")
HEALTH_CHECK, HEALTH_WATCH = "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"
UNKNOWN_METHODS = ("/splitprune.v1.SplitPrune/Nope", "/grpc.health.v1.Health/List", "/x/y",
                   "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
PUSH_PREFIX = 4096  # a pushed state is the first bytes of a real one: the stream ends before the rest
FAILURES = ("INTERNAL", "UNKNOWN")
class Fuzzer:
    """Builds valid sessions against a server and sends one mutated message per case."""

    def __init__(self, address: str, cfg, clients: int = 4, token: str | None = None,
                 stream_timeout: float = 120.0) -> None:
        self.cfg, self.clients, self.stream_timeout = cfg, clients, stream_timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.channel = grpc.insecure_channel(address)
        self.train = self.channel.stream_stream(TRAIN_METHOD)
        self.unary = {"describe": self.channel.unary_unary(DESCRIBE_METHOD),
                      "infer": self.channel.unary_unary(INFER_METHOD),
                      "health_check": self.channel.unary_unary(HEALTH_CHECK)}
        self.fetch = self.channel.unary_stream(FETCH_STATE_METHOD)
        self.watch = self.channel.unary_stream(HEALTH_WATCH)
        self.push = self.channel.stream_unary(PUSH_STATE_METHOD)
        self.infer_stream = self.channel.stream_stream(INFER_STREAM_METHOD)
        self._state_prefix: tuple[int, bytes] | None = None  # (total bytes, first bytes) of a real state
        self.live: dict[str, _Session] = {}
        self.codes: Counter = Counter()
        self.failures: list[dict] = []
        self.messages = 0

    def end_sessions(self, timeout_s: float = 30.0) -> None:
        """Close every stream and wait until the server has none attached to the half."""
        for client in list(self.live):
            self._end(client)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = spb.DescribeReply.FromString(self.unary["describe"](
                spb.DescribeRequest(fingerprint=self.cfg.fingerprint()).SerializeToString(),
                metadata=self.metadata, timeout=30))
            if info.attached_clients == 0:
                return
            time.sleep(0.05)

    def close(self) -> None:
        for client in list(self.live):
            self._end(client)
        self.channel.close()

    # ---------------------------------------------------------------- valid messages
    def _hello(self, client: str, fresh: bool = False):
        return make_hello(self.cfg, client, fresh, 10, 1)

    def _phase(self):
        return pb.PhaseRequest(phase=0, budget=self.cfg.budget, lr=0.01, momentum=0.9, weight_decay=5e-4)

    def _tensor(self, n: int = 2):
        values = torch.linspace(-1, 1, n * self.cfg.budget * 16).reshape(n, self.cfg.budget, 4, 4)
        return ChannelCodec(self.cfg.dtype_up).compress(values, torch.arange(self.cfg.budget) * 3, 512)

    def _train(self, step_id: int):
        return pb.TrainRequest(step_id=step_id, activations=self._tensor(), labels=encode_labels(torch.tensor([1, 7])))

    # ---------------------------------------------------------------- one case
    def _session(self, client: str) -> "_Session":
        """This client's open stream (Hello and the valid phase sent), opened when it has none."""
        live = self.live.get(client)
        if live is not None:
            return live
        stream = _Stream(self)
        welcome = spb.Welcome.FromString(unframe(stream.exchange(frame(1, self._hello(client).SerializeToString())))[1])
        if welcome.last_step_id >= 1 << 62:  # a mutated step id used this client's range up: start afresh
            stream.close()
            stream = _Stream(self)
            welcome = spb.Welcome.FromString(unframe(stream.exchange(
                frame(1, self._hello(client, fresh=True).SerializeToString())))[1])
        stream.exchange(frame(2, self._phase().SerializeToString()))
        self.live[client] = live = _Session(stream, welcome.session_id, welcome.version, welcome.last_step_id)
        return live

    def _end(self, client: str) -> None:
        live = self.live.pop(client, None)
        if live is not None:
            live.stream.close()

    def reset(self) -> None:
        """Close every stream; a fresh start re-initialises the half (whatever the cases did to it)."""
        for client in list(self.live):
            self._end(client)
        stream = _Stream(self)
        try:
            stream.exchange(frame(1, self._hello("fuzz-reset", fresh=True).SerializeToString()))
        except _Refused:
            pass
        finally:
            stream.close()

    def case(self, choose: Choose) -> tuple[str, str, str]:
        """(kind, mutation, status name) of one mutated message, sent on a live session of the client
        (one is opened when needed; a refusal ends it, a mutated phase too, so the next one is valid)."""

        kind = choose(KINDS)
        client = f"fuzz-{choose(range(self.clients))}"
        if kind in ("health_check", "health_watch"):
            msg = health_pb2.HealthCheckRequest(service=choose(("", "splitprune.v1.SplitPrune")))
            if choose((True, False)):
                change, data = mutate(msg, choose), msg.SerializeToString()
            else:
                data = bytes_variant(msg.SerializeToString() + b"\x0a\x01x", choose)
                change = f"request of {len(data)} bytes"
            return kind, change, self._unary(kind, data) if kind == "health_check" else self._watch(data)
        if kind == "unknown":
            method = choose(UNKNOWN_METHODS)
            return kind, method, self._call_unknown(method, bytes_variant(b"\x0a\x01x", choose))
        if kind == "infer_stream":
            return (kind, *self._infer_session(choose))
        if kind in ("describe", "infer"):
            msg = spb.DescribeRequest(fingerprint=self.cfg.fingerprint()) if kind == "describe" else spb.InferRequest(
                fingerprint=self.cfg.fingerprint(), budget=self.cfg.budget,
                eval=pb.EvalRequest(request_id=1, activations=self._tensor()))
            change = mutate(msg, choose)
            return kind, change, self._unary(kind, msg.SerializeToString())
        change = ""
        try:
            if kind == "hello":
                self._end(client)
                hello = self._hello(client)
                change = mutate(hello, choose)
                stream = _Stream(self)
                try:
                    stream.exchange(frame(1, hello.SerializeToString()))
                finally:
                    stream.close()
                return kind, change, "OK"
            live = self._session(client)
            if kind == "fetch":
                req = spb.FetchStateRequest(session_id=live.session_id, known_version=live.version)
                change = mutate(req, choose)
                if req.session_id == live.session_id:
                    req.known_version = live.version  # a whole state transfer per case would be slow
                return kind, change, self._fetch(req.SerializeToString())
            if kind == "push":
                total, prefix = self._prefix(live)
                chunk = spb.StateChunk(session_id=live.session_id, step_id=live.last_step, total_bytes=total,
                                       data=prefix)
                change = mutate(chunk, choose)
                chunks = [chunk.SerializeToString()] * choose((1, 2))
                return kind, change, self._push(chunks)
            step = live.last_step + 1
            msg = {"phase": self._phase(), "train": self._train(step), "envelope": self._train(step),
                   "eval": pb.EvalRequest(request_id=step, activations=self._tensor()),
                   "checkpoint": spb.CheckpointRequest(step_id=live.last_step),
                   "calibrate": pb.CalibrateRequest(request_id=step, activations=self._tensor(), first=True,
                                                    last=True)}[kind]
            field = {"phase": 2, "train": 3, "envelope": 3, "eval": 4, "checkpoint": 5, "calibrate": 6}[kind]
            if kind == "envelope":
                data = bytes_variant(frame(field, msg.SerializeToString()), choose)
                change = f"envelope of {len(data)} bytes"
            else:
                change = mutate(msg, choose)
                data = frame(field, msg.SerializeToString())
            live.stream.exchange(data)
            if kind == "phase":
                self._end(client)
            elif kind in ("train", "envelope"):
                live.last_step = max(live.last_step, msg.step_id)
            return kind, change, "OK"
        except _Refused as refused:
            self._end(client)
            return kind, change, refused.code

    def _infer_session(self, choose: Choose) -> tuple[str, str]:
        """An InferStream session: its InferOpen or its first item mutated (or an item's bytes damaged), then
        two items; the status of the stream, or the reason of the first item refused in-band."""
        tensor = self._tensor(choose((1, 2)))
        opened = open_message(self.cfg.fingerprint(), self.cfg.budget, tensor)
        item = spb.InferItem(data=item_data(tensor), samples=tensor.shape[0] if tensor.shape[0] > 1 else 0)
        target = choose(("open", "item", "item bytes"))
        if target == "item bytes":
            first = bytes_variant(item.SerializeToString(), choose)
            change = f"item of {len(first)} bytes"
        else:
            change = f"{target}: {mutate(opened if target == 'open' else item, choose)}"
            first = item.SerializeToString()  # mutated in place when it is the target
        requests: queue.SimpleQueue = queue.SimpleQueue()
        call = self.infer_stream(iter(requests.get, None), metadata=self.metadata, timeout=60)
        status = "OK"
        try:
            for i, data in enumerate((opened.SerializeToString(), first, first)):
                self.messages += 1
                requests.put(data)
                out = next(call)
                if i and status == "OK":
                    reply = spb.InferItemReply.FromString(out)
                    status = spb.ErrorReason.Name(reply.error) if reply.error else "OK"
        except grpc.RpcError as exc:
            status = exc.code().name
        except StopIteration:
            pass
        finally:
            requests.put(None)
            call.cancel()
        return change, status

    def _unary(self, kind: str, data: bytes) -> str:
        self.messages += 1
        try:
            self.unary[kind](data, metadata=self.metadata, timeout=60)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name

    def _prefix(self, live: "_Session") -> tuple[int, bytes]:
        """(size, first PUSH_PREFIX bytes) of the half's real state, fetched once."""
        if self._state_prefix is None:
            req = spb.FetchStateRequest(session_id=live.session_id, known_version=0)
            chunks = [spb.StateChunk.FromString(b) for b in self.fetch(req.SerializeToString(), metadata=self.metadata,
                                                                         timeout=120)]
            self._state_prefix = (chunks[0].total_bytes, b"".join(c.data for c in chunks)[:PUSH_PREFIX])
        return self._state_prefix

    def _push(self, chunks: list[bytes]) -> str:
        self.messages += len(chunks)
        try:
            self.push(iter(chunks), metadata=self.metadata, timeout=60)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name

    def _watch(self, data: bytes) -> str:
        """The first answer of a Watch (it stays open while the server runs), then cancelled."""
        self.messages += 1
        call = self.watch(data, metadata=self.metadata, timeout=60)
        try:
            next(call)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name
        finally:
            call.cancel()

    def _call_unknown(self, method: str, data: bytes) -> str:
        self.messages += 1
        try:
            self.channel.unary_unary(method)(data, metadata=self.metadata, timeout=60)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name

    def _fetch(self, data: bytes) -> str:
        self.messages += 1
        try:
            for _ in self.fetch(data, metadata=self.metadata, timeout=60):
                pass
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name

    def run(self, choose: Choose) -> str:
        kind, change, code = self.case(choose)
        self.codes[code] += 1
        if code in FAILURES:
            self.failures.append({"kind": kind, "mutation": change, "status": code})
        return code


@dataclass
class _Session:
    stream: "_Stream"
    session_id: str
    version: int
    last_step: int


class _Refused(Exception):
    def __init__(self, code: str) -> None:
        self.code = code


class _Stream:
    """A Train stream driven one message at a time; a refusal raises _Refused with the status name."""

    def __init__(self, fuzzer: Fuzzer) -> None:
        self.fuzzer = fuzzer
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.call = fuzzer.train(iter(self.requests.get, None), metadata=fuzzer.metadata,
                                 timeout=fuzzer.stream_timeout)

    def exchange(self, data: bytes) -> bytes:
        self.fuzzer.messages += 1
        self.requests.put(data)
        try:
            return next(self.call)
        except grpc.RpcError as exc:
            raise _Refused(exc.code().name) from None
        except StopIteration:
            raise _Refused("OK") from None

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()
