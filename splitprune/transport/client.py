"""The gRPC client: the server half as a ServerEndpoint for the Trainer, and split inference.

`RemoteServer` is a Link (train / evaluate / start_phase take and return the same serialized messages
as the in-process LocalLink, so the device side counts the same payload bytes) over ONE persistent
bidirectional `Train` stream. It reconnects on its own when the stream breaks (server restart,
network failure, step timeout) and resumes by step id: a step the server applied but whose reply was
lost is answered again from the server's memory, never applied twice. Checkpoints of the server half
are saved by the server where it runs (CheckpointRequest); the device keeps their identity, and a
resumed run asks the server to restore one (Hello.resume_step_id). Every message is counted by
purpose (splitprune.transport.accounting); socket bytes only with `measure`.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Callable

import grpc
import torch

from splitprune.compression.codec import WIRE_DTYPES
from splitprune.config import RunConfig, resolve_schedule
from splitprune.errors import ProtocolError, UserError
from splitprune.proto import pb
from splitprune.proto import service_pb2 as spb
from splitprune.training.setup import ServerHalfRecord
from splitprune.transport.channel import (RETRIABLE, Connection, RemoteError, Stream, StreamFailed, remote_error,
                                          rpc_status)
from splitprune.transport.protocol import (CHECKPOINT, DESCRIBE_METHOD, EVAL, FETCH_STATE_METHOD, HELLO, INFER_METHOD,
                                           KIND_NAMES, PHASE, PROTOCOL_VERSION, PUSH_STATE_METHOD, TOKEN_ENV, TRAIN,
                                           TRAIN_METHOD, WELCOME, TlsFiles, frame, join_chunks, leading_step_id,
                                           state_chunks, state_to_bytes, unframe)

log = logging.getLogger("splitprune.client")
PURPOSE = {TRAIN: "training", EVAL: "evaluation", PHASE: "control", CHECKPOINT: "control"}
__all__ = ["RemoteServer", "RemoteError", "InferenceClient", "connect", "connect_for_training", "make_hello"]


class RemoteServer:
    """The server half behind a `splitprune serve` server, as a ServerEndpoint (and its Link)."""

    def __init__(self, conn: Connection, hello: spb.Hello, step_timeout: float = 300.0,
                 reconnect_s: float = 120.0, connect_timeout: float = 20.0) -> None:
        self.opened_at = time.perf_counter()
        self.conn = conn
        self.traffic = conn.traffic
        self.hello = hello
        self.step_timeout, self.reconnect_s, self.connect_timeout = step_timeout, reconnect_s, connect_timeout
        self.link = self
        steps, self._meter = conn.channel("control")
        self._train_method = steps.stream_stream(TRAIN_METHOD)
        self._state_methods: tuple[Callable, Callable] | None = None  # a channel of its own, opened when needed
        self._stream: Stream | None = None
        self.welcome: spb.Welcome | None = None
        self.last_step = 0                    # last step whose reply this client received
        self._phase: pb.PhaseRequest | None = None  # last phase the server acknowledged
        self._pending: tuple[int, bytes, int] | None = None
        self.reconnects = self.retried_requests = 0
        self.checkpoints = self.fetches = self.pushes = 0
        self._closed = False
        self._connect(initial=True)
        self.hello.resume_step_id, self.hello.resume_state_sha256 = 0, ""  # a reconnect continues this run

    # ---------------------------------------------------------------- connection
    def _handshake(self, timeout: float) -> spb.Welcome:
        stream = Stream(self._train_method, self.conn.metadata)
        hello = frame(HELLO, self.hello.SerializeToString())
        try:
            out = stream.exchange(hello, timeout)
        except StreamFailed:
            stream.cancel()
            raise
        kind, payload = unframe(out)
        if kind != WELCOME:
            stream.cancel()
            raise ProtocolError(f"server answered the Hello with a {KIND_NAMES.get(kind, kind)} message")
        self.traffic.exchange("control", len(hello), len(out))
        welcome = spb.Welcome.FromString(payload)
        self._stream = stream
        return welcome

    def _connect(self, initial: bool) -> None:
        """(Re)open the Train stream, retrying while the server is unreachable, then reconcile step ids."""
        window = self.connect_timeout if initial else self.reconnect_s
        deadline = time.monotonic() + window
        delay = 0.1
        diagnosed = not initial
        while True:
            try:
                welcome = self._handshake(min(self.step_timeout, max(window, 1.0)))
                self._check_welcome(welcome)
                if initial:
                    self.last_step = welcome.last_step_id
                    self.hello.fresh_start = False  # a reconnect continues this run
                else:
                    self._reconcile(welcome)
                    self.reconnects += 1
                return
            except StreamFailed as exc:
                self._drop_stream()
                if exc.code == grpc.StatusCode.UNAVAILABLE and not diagnosed:
                    diagnosed = True  # the first failure: a TLS mismatch never heals, say so at once
                    hint = self.conn.tls_mismatch()
                    if hint:
                        raise RemoteError(f"cannot reach the server: {hint}", exc.code) from None
                if exc.reason == "NO_CHECKPOINT":
                    raise RemoteError(self._no_checkpoint(exc.details), exc.code, exc.reason) from None
                if not exc.retriable or time.monotonic() + delay > deadline:
                    what = (f"cannot reach the server at {self.conn.target}" if exc.retriable
                            else "server refused the session")
                    if exc.exc is not None:
                        raise remote_error(exc.exc, what) from None
                    raise RemoteError(f"{what}: {exc.code.name}: {exc.details}", exc.code, exc.reason) from None
                time.sleep(delay)
                delay = min(2 * delay, 2.0)
            except ProtocolError as exc:
                self._drop_stream()
                raise RemoteError(f"the server at {self.conn.target} broke the protocol: {exc}") from None
            except RemoteError:
                self._drop_stream()
                raise

    def _no_checkpoint(self, details: str) -> str:
        return (f"the server at {self.conn.target} no longer has this run's server half as checkpointed at step "
                f"{self.hello.resume_step_id} ({details}); it was restarted without --checkpoint, or its checkpoint "
                "folder was removed. Start the run afresh: remove the run folder or pass another --out")

    def _check_welcome(self, welcome: spb.Welcome) -> None:
        if welcome.protocol_version != PROTOCOL_VERSION:
            raise RemoteError(f"server speaks protocol {welcome.protocol_version}, this client {PROTOCOL_VERSION}")
        if self.hello.wire_shape and list(welcome.wire_shape) != list(self.hello.wire_shape):
            raise RemoteError(f"server's wire shape {list(welcome.wire_shape)} != {list(self.hello.wire_shape)}")
        if self.hello.resume_step_id and welcome.state_sha256 != self.hello.resume_state_sha256:
            raise RemoteError(f"the server restored another server half than this run's checkpoint (digest "
                              f"{welcome.state_sha256[:12] or 'none'}, the checkpoint's "
                              f"{self.hello.resume_state_sha256[:12]}); start the run afresh with another --out")
        self.welcome = welcome

    def _reconcile(self, w: spb.Welcome) -> None:
        pending_step = self._pending[2] if self._pending and self._pending[0] == TRAIN else 0
        if w.last_step_id < self.last_step:
            raise RemoteError(
                f"the server lost training steps of this client (it restarted from an older state: step "
                f"{w.last_step_id}, this client is at step {self.last_step}); "
                "rerun the same command to resume both halves from the last checkpoint")
        if w.last_step_id not in (self.last_step, pending_step):
            raise RemoteError(f"the server applied step {w.last_step_id} but this client is at step "
                              f"{self.last_step}: is another process using client id {self.hello.client_id}?")
        log.warning("reconnected to %s (server at step %d, client at %d%s)", self.conn.target, w.last_step_id,
                    self.last_step, f", retrying step {pending_step}" if pending_step else "")
        pending_phase = self._pending is not None and self._pending[0] == PHASE
        if self._phase is not None and w.phase != self._phase.phase and not pending_phase:
            self._exchange(frame(PHASE, self._phase.SerializeToString()), PHASE)  # the server lost the phase

    def _drop_stream(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None

    def _exchange(self, envelope: bytes, kind: int) -> tuple[bytes, int]:
        """(reply payload, size of the reply message) of one request on the open stream."""
        if self._stream is None:
            raise StreamFailed(grpc.StatusCode.UNAVAILABLE, "not connected")
        before = self._meter.read() if self._meter else None
        out = self._stream.exchange(envelope, self.step_timeout)
        if self._meter:
            self.traffic.attribute(PURPOSE[kind], self._meter, before, self._meter.read())
        got, payload = unframe(out)
        if got != kind:
            raise ProtocolError(f"expected a {KIND_NAMES[kind]} reply, got {KIND_NAMES.get(got, got)}")
        return payload, len(out)

    def _request(self, kind: int, inner: bytes, step_id: int = 0) -> bytes:
        if self._closed:
            raise RemoteError("the connection to the server is closed")
        envelope = frame(kind, inner)
        self._pending = (kind, envelope, step_id)
        first_failure = None
        try:
            while True:
                try:
                    if self._stream is None:
                        self._connect(initial=False)
                    payload, received = self._exchange(envelope, kind)
                    break
                except StreamFailed as exc:
                    self._drop_stream()
                    if not exc.retriable:
                        if exc.exc is not None:
                            raise remote_error(exc.exc, f"server refused the {KIND_NAMES[kind]} request") from None
                        raise RemoteError(f"{KIND_NAMES[kind]} request failed: {exc.details}", exc.code) from None
                    now = time.monotonic()
                    first_failure = first_failure or now
                    if now - first_failure > self.reconnect_s:
                        raise RemoteError(f"lost the server at {self.conn.target} for more than {self.reconnect_s:g} s: "
                                          f"{exc.code.name}: {exc.details}", exc.code) from None
                    self.retried_requests += 1
                    log.warning("stream to %s broke (%s: %s); reconnecting", self.conn.target, exc.code.name,
                                exc.details)
                    time.sleep(0.05)
        finally:
            self._pending = None
        self.traffic.exchange(PURPOSE[kind], len(envelope), received)
        return payload

    # ---------------------------------------------------------------- Link
    def train(self, request: bytes) -> bytes:
        step_id = leading_step_id(request)
        reply = self._request(TRAIN, request, step_id)
        self.last_step = step_id
        return reply

    def evaluate(self, request: bytes) -> bytes:
        return self._request(EVAL, request)

    def start_phase(self, request: bytes) -> bytes:
        reply = self._request(PHASE, request)
        self._phase = pb.PhaseRequest.FromString(request)
        return reply

    # ---------------------------------------------------------------- ServerEndpoint
    def checkpoint(self, step_id: int) -> ServerHalfRecord:
        """The server saves its half where it runs; the device keeps only what identifies that save."""
        del step_id  # the device's counter also numbers evaluations; the server counts training steps
        req = spb.CheckpointRequest(step_id=self.last_step).SerializeToString()
        reply = spb.CheckpointReply.FromString(self._request(CHECKPOINT, req))
        if reply.step_id != self.last_step or len(reply.state_sha256) != 64:
            raise RemoteError(f"the server saved its half at step {reply.step_id} with digest "
                              f"{reply.state_sha256!r}; this client asked for step {self.last_step}")
        self.checkpoints += 1
        return ServerHalfRecord(identity={
            "server": self.conn.target, "client_id": self.hello.client_id, "fingerprint": self.welcome.fingerprint,
            "step_id": reply.step_id, "version": reply.version, "state_sha256": reply.state_sha256,
            "state_bytes": reply.state_bytes})

    def restore(self, record: ServerHalfRecord, step_id: int) -> None:
        """Resume: the server restored its own checkpoint when the session opened (Hello.resume_step_id);
        a run begun in-process (its checkpoint holds the server half) pushes that half instead."""
        if record.identity:
            if self.welcome.state_sha256 != record.identity["state_sha256"]:
                raise RemoteError(f"the server at {self.conn.target} did not restore this run's server half "
                                  f"(step {record.identity['step_id']}): connect with connect(..., out=RUN) so "
                                  "that the session asks for it")
            return
        if not any(k.startswith("server.") for k in record.tensors):
            raise UserError("this run's checkpoint holds neither the server half nor where it was saved")
        self.push_state(record.tensors, step_id)

    def _state_call(self, what: str, call: Callable):
        """Run a state RPC with the current session id; reconnect once if the session is gone."""
        if self._state_methods is None:
            channel, _ = self.conn.channel("state")  # bulk transfers never delay steps; counted as state
            self._state_methods = (channel.unary_stream(FETCH_STATE_METHOD), channel.stream_unary(PUSH_STATE_METHOD))
        for attempt in range(2):
            if self._stream is None:
                self._connect(initial=False)
            try:
                return call(self.welcome.session_id)
            except grpc.RpcError as exc:
                code, _, reason = rpc_status(exc)
                if attempt == 0 and (code in RETRIABLE or reason == "UNKNOWN_SESSION"):
                    self._drop_stream()
                    continue
                raise remote_error(exc, what) from None

    def fetch_state(self) -> tuple[spb.StateChunk, bytes]:
        """The server half's state file as it is now (an explicit, counted transfer): (first chunk, file)."""
        def fetch(session_id: str):
            req = spb.FetchStateRequest(session_id=session_id).SerializeToString()
            replies = [spb.StateChunk.FromString(b) for b in self._state_methods[0](
                req, metadata=self.conn.metadata, timeout=self.step_timeout)]
            self.traffic.count("state", len(req), sum(c.ByteSize() for c in replies), 1, len(replies))
            return join_chunks(replies, 1 << 40)

        first, data = self._state_call("cannot fetch the server half's state", fetch)
        self.fetches += 1
        return first, data

    def push_state(self, tensors: dict[str, torch.Tensor], step_id: int) -> spb.PushStateReply:
        state = {k: v for k, v in tensors.items()
                 if k.startswith("server.") or k.startswith("opt.server.") or k == "rng.server"}
        data = state_to_bytes(state)

        def push(session_id: str):
            chunks = [c.SerializeToString() for c in state_chunks(data, spb.StateChunk(session_id=session_id,
                                                                                       step_id=step_id))]
            reply = self._state_methods[1](iter(chunks), metadata=self.conn.metadata, timeout=self.step_timeout)
            self.traffic.count("state", sum(map(len, chunks)), len(reply), len(chunks), 1)
            return spb.PushStateReply.FromString(reply)

        reply = self._state_call("cannot push the server half's state", push)
        self.pushes += 1
        self.last_step = step_id
        if not reply.applied:
            log.warning("server: %s", reply.note)
        return reply

    def transport_stats(self) -> dict:
        """This process's traffic (counts only, so that resumed runs add up) and where it went."""
        return {
            "server": self.conn.target, "tls": self.conn.credentials is not None,
            "mutual_tls": bool(self.conn.tls and self.conn.tls.cert), "client_id": self.hello.client_id,
            **self.traffic.report(), "reconnects": self.reconnects, "retried_requests": self.retried_requests,
            "checkpoints": self.checkpoints, "state_fetches": self.fetches, "state_pushes": self.pushes,
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._stream is not None:
            self._stream.close(wait=2.0)
            self._stream = None
        self.conn.close()


# ---------------------------------------------------------------- training entry point
def _num_classes(cfg: RunConfig) -> int:
    from splitprune.data import dataset_info, resolve_data_dir
    from splitprune.data.folder import folder_classes

    info = dataset_info(cfg.dataset)
    if info.num_classes:
        return info.num_classes
    classes = folder_classes(resolve_data_dir(info, cfg.data_dir))
    if len(classes) < 2:
        raise UserError(f"{cfg.dataset} data in {cfg.data_dir} has {len(classes)} class folders; need at least 2")
    return len(classes)


def max_budget(cfg: RunConfig) -> int:
    """Most channels any phase of the schedule sends (0 = all)."""
    phases = resolve_schedule(cfg, 65535)
    return 0 if any(p.budget is None for p in phases) else max(p.budget for p in phases)


def client_id_for(out: str | None) -> str:
    """A stable id per run folder (kept in OUT/.splitprune-client-id), so a rerun resumes as the same client."""
    fresh = f"{socket.gethostname()[:40]}-{uuid.uuid4().hex[:16]}"
    fresh = "".join(c if c.isalnum() or c in "._:-" else "-" for c in fresh)
    if not out:
        return fresh
    path = Path(out) / ".splitprune-client-id"
    try:
        text = path.read_text().strip()
        if text:
            return text
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(fresh + "\n")
    return fresh


def make_hello(cfg: RunConfig, client_id: str, fresh_start: bool, num_classes: int | None = None,
               in_channels: int | None = None) -> spb.Hello:
    from splitprune.training.setup import input_channels

    return spb.Hello(protocol_version=PROTOCOL_VERSION, client_id=client_id, fingerprint=cfg.fingerprint(),
                     config_json=json.dumps(cfg.to_dict()), num_classes=num_classes or _num_classes(cfg),
                     in_channels=in_channels or input_channels(cfg), dtype_up=WIRE_DTYPES[cfg.dtype_up],
                     dtype_down=WIRE_DTYPES[cfg.dtype_down], max_budget=max_budget(cfg), fresh_start=fresh_start)


def tls_from_args(args) -> TlsFiles | None:
    ca, cert, key = (getattr(args, name, None) for name in ("tls_ca", "tls_cert", "tls_key"))
    return TlsFiles(ca, cert, key) if (ca or cert or key) else None


def token_from_args(args) -> str | None:
    return getattr(args, "token", None) or os.environ.get(TOKEN_ENV) or None


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{name} must be a number of seconds, got {text!r}") from None
    if value <= 0:
        raise UserError(f"{name} must be positive, got {text!r}")
    return value


def saved_server_half(out: str | Path | None, cfg: RunConfig) -> dict | None:
    """Where a run folder's checkpoint says the server saved its half (None: no such checkpoint of `cfg`)."""
    from splitprune.training.checkpoint import read_meta

    if not out or not (Path(out) / "checkpoint" / "meta.json").exists():
        return None
    meta = read_meta(Path(out) / "checkpoint")
    identity = meta.get("server_half")
    if meta.get("fingerprint") != cfg.fingerprint() or not isinstance(identity, dict):
        return None  # the Trainer refuses another config's folder; an in-process one pushes its half
    return identity


def connect(cfg: RunConfig, server: str, *, out: str | None = None, token: str | None = None,
            tls: TlsFiles | None = None, client_id: str | None = None, fresh_start: bool | None = None,
            measure: bool = False, step_timeout: float = 300.0, reconnect_s: float = 120.0,
            connect_timeout: float = 20.0) -> RemoteServer:
    """Open a training session for `cfg` on `server`. Without `fresh_start`, it is inferred from `out`:
    a run folder holding a checkpoint resumes (the server restores the half that checkpoint names),
    anything else starts afresh. `measure`: count bytes on the socket too (a relay per connection)."""
    if fresh_start is None:
        fresh_start = not (out and (Path(out) / "checkpoint" / "meta.json").exists())
    hello = make_hello(cfg, client_id or client_id_for(out), fresh_start)
    saved = None if fresh_start else saved_server_half(out, cfg)
    if saved:
        hello.resume_step_id, hello.resume_state_sha256 = int(saved["step_id"]), str(saved["state_sha256"])
    conn = Connection(server, token, tls, measure)
    try:
        endpoint = RemoteServer(conn, hello, step_timeout, reconnect_s, connect_timeout)
    except BaseException:
        conn.close()
        raise
    if fresh_start and cfg.from_checkpoint:
        try:
            _push_pretrained(endpoint, cfg)
        except BaseException:
            endpoint.close()
            raise
    return endpoint


def _push_pretrained(endpoint: RemoteServer, cfg: RunConfig) -> None:
    """prune starts from a trained model: its server half travels to the server before the first phase."""
    from splitprune.training.setup import read_pretrained

    tensors = {k: v for k, v in read_pretrained(cfg).items() if k.startswith("server.")}
    reply = endpoint.push_state(tensors, 0)
    if not reply.applied:
        raise RemoteError(f"cannot start from {cfg.from_checkpoint}: {reply.note}")


def connect_for_training(cfg: RunConfig, args) -> RemoteServer:
    """What `splitprune train --server HOST:PORT` calls: a ServerEndpoint for the Trainer."""
    return connect(cfg, args.server, out=getattr(args, "out", None), token=token_from_args(args),
                   tls=tls_from_args(args), measure=bool(getattr(args, "measure_socket", False)),
                   step_timeout=_env_seconds("SPLITPRUNE_STEP_TIMEOUT", 300.0),
                   reconnect_s=_env_seconds("SPLITPRUNE_RECONNECT_SECONDS", 120.0),
                   connect_timeout=_env_seconds("SPLITPRUNE_CONNECT_TIMEOUT", 20.0))


# ---------------------------------------------------------------- split inference
class InferenceClient:
    """Unary Describe / Infer calls for one hosted model (identified by its config fingerprint)."""

    def __init__(self, server: str, fingerprint: str, token: str | None = None, tls: TlsFiles | None = None,
                 measure: bool = False, timeout: float = 60.0, connect_timeout: float = 20.0) -> None:
        self.conn = Connection(server, token, tls, measure)
        self.traffic = self.conn.traffic
        channel, self._meter = self.conn.channel("control")
        self._describe = channel.unary_unary(DESCRIBE_METHOD)
        self._infer = channel.unary_unary(INFER_METHOD)
        self.fingerprint = fingerprint
        self.timeout, self.connect_timeout = timeout, connect_timeout
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
