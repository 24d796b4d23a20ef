"""The server half behind a `splitprune serve` server, as the Trainer's Endpoint (and its Link).

`RemoteEndpoint` is a Link (train / evaluate / start_phase take and return the same serialized messages
as the in-process LocalLink, so the device side counts the same payload bytes) over ONE persistent
bidirectional `Train` stream. It reconnects on its own when the stream breaks (server restart,
network failure, step timeout) and resumes by step id: a step the server applied but whose reply was
lost is answered again from the server's memory, never applied twice. Checkpoints of the server half
are saved by the server where it runs (CheckpointRequest); the device keeps their identity, and a
resumed run asks the server to restore one (Hello.resume_step_id). Every message is counted by
purpose (splitprune.client.traffic); socket bytes only when the Connection measures them.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import grpc
import torch

from splitprune.client.channel import RETRIABLE, Connection, RemoteError, Stream, StreamFailed, remote_error, rpc_status
from splitprune.errors import ProtocolError, UserError
from splitprune.proto import pb
from splitprune.proto import service_pb2 as spb
from splitprune.training.checkpoint import state_to_bytes
from splitprune.training.setup import HalfSnapshot
from splitprune.wire.envelopes import (CALIBRATE, CHECKPOINT, EVAL, FETCH_STATE_METHOD, HELLO, KIND_NAMES, PHASE,
                                       PROTOCOL_VERSION, PUSH_STATE_METHOD, TRAIN, TRAIN_METHOD, WELCOME, frame,
                                       join_chunks, leading_step_id, state_chunks, unframe)

log = logging.getLogger("splitprune.client")
FAILOVER_S = 3.0  # a replica unreachable this long: the next one of --server's list
PURPOSE = {TRAIN: "training", EVAL: "evaluation", CALIBRATE: "evaluation", PHASE: "control", CHECKPOINT: "control"}


class RemoteEndpoint:
    """The server half behind a `splitprune serve` server, as a Endpoint (and its Link)."""

    def __init__(self, conn: Connection, hello: spb.Hello) -> None:
        self.opened_at = time.perf_counter()
        self.conn = conn
        self.traffic = conn.traffic
        self.hello = hello
        settings = conn.config
        self.step_timeout, self.reconnect_s, self.connect_timeout = (settings.step_timeout, settings.reconnect,
                                                                     settings.connect_timeout)
        self.link = self
        self._open_channel()
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
    def _open_channel(self) -> None:
        steps, self._meter = self.conn.channel("control")
        self._train_method = steps.stream_stream(TRAIN_METHOD)
        self._state_methods = None

    def _failover(self) -> bool:
        """The replica in use is gone: continue on the next one of --server's list, at this client's step."""
        lost = self.conn.target
        if not self.conn.failover():
            return False
        self._open_channel()
        log.warning("replica %s is gone; continuing on %s at step %d", lost, self.conn.target, self.last_step)
        return True

    def _handshake(self, timeout: float) -> spb.Welcome:
        stream = Stream(self._train_method, self.conn.metadata)
        hello = frame(HELLO, self.hello.SerializeToString())
        self.traffic.count("control", up=len(hello), messages_up=1)
        try:
            out = stream.exchange(hello, timeout)
        except StreamFailed:
            stream.cancel()
            raise
        kind, payload = unframe(out)
        if kind != WELCOME:
            stream.cancel()
            raise ProtocolError(f"server answered the Hello with a {KIND_NAMES.get(kind, kind)} message")
        self.traffic.count("control", down=len(out), messages_down=1)
        welcome = spb.Welcome.FromString(payload)
        self._stream = stream
        return welcome

    def _connect(self, initial: bool) -> None:
        """(Re)open the Train stream, retrying while the server is unreachable, then reconcile step ids."""
        window = self.connect_timeout if initial else self.reconnect_s
        deadline = time.monotonic() + window
        failover_at = time.monotonic() + FAILOVER_S
        if not initial:  # a replica of a tier takes this step count when its record of this client is older
            self.hello.continue_step_id = self.last_step
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
                if exc.retriable and not initial and time.monotonic() >= failover_at and self._failover():
                    failover_at = time.monotonic() + FAILOVER_S
                    continue
                if exc.retriable and not initial and time.monotonic() + delay > deadline:
                    raise self._gone(exc) from None
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

    def _gone(self, exc: StreamFailed) -> RemoteError:
        """The server (or the replica of a tier this client trains on) did not come back in time."""
        details = " ".join(exc.details.split())[:200]
        return RemoteError(f"the server at {self.conn.target} is gone (no answer for {self.reconnect_s:g} s: "
                           f"{exc.code.name}: {details}); once it (or its restarted replica tier) is back, rerun the "
                           "same command: the run resumes from its last checkpoint", exc.code, exc.reason)

    def _no_checkpoint(self, details: str) -> str:
        return (f"the server at {self.conn.target} no longer has this run's server half as checkpointed at step "
                f"{self.hello.resume_step_id} ({details}); it was restarted without --checkpoint, or its checkpoint "
                "folder was removed. Start the run afresh: remove the run folder or pass another --out")

    def _check_welcome(self, welcome: spb.Welcome) -> None:
        if welcome.protocol_version != PROTOCOL_VERSION:
            raise RemoteError(f"server speaks protocol {welcome.protocol_version}, this client {PROTOCOL_VERSION}")
        if self.hello.wire_shape and list(welcome.wire_shape) != list(self.hello.wire_shape):
            raise RemoteError(f"server's wire shape {list(welcome.wire_shape)} != {list(self.hello.wire_shape)}")
        if self.hello.resume_step_id and not welcome.state_sha256 and welcome.attached_clients > 1:
            log.warning("resumed at step %d on a server half shared with %d other client(s): the server kept its "
                        "half (their training goes on), this client's device half continues from its checkpoint",
                        self.hello.resume_step_id, welcome.attached_clients - 1)
        elif self.hello.resume_step_id and welcome.state_sha256 != self.hello.resume_state_sha256:
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
                    self.traffic.count(PURPOSE[kind], up=len(envelope), messages_up=1)  # every attempt is sent
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
                        raise self._gone(exc) from None
                    self.retried_requests += 1
                    log.warning("stream to %s broke (%s: %s); reconnecting", self.conn.target, exc.code.name,
                                exc.details)
                    time.sleep(0.05)
        finally:
            self._pending = None
        self.traffic.count(PURPOSE[kind], down=received, messages_down=1)
        return payload

    # ---------------------------------------------------------------- Link
    def train(self, request: bytes) -> bytes:
        step_id = leading_step_id(request)
        reply = self._request(TRAIN, request, step_id)
        self.last_step = step_id
        return reply

    def evaluate(self, request: bytes) -> bytes:
        return self._request(EVAL, request)

    def calibrate(self, request: bytes) -> bytes:
        return self._request(CALIBRATE, request)

    def start_phase(self, request: bytes) -> bytes:
        reply = self._request(PHASE, request)
        self._phase = pb.PhaseRequest.FromString(request)
        return reply

    # ---------------------------------------------------------------- Endpoint
    def checkpoint(self, step_id: int, keep: bool = False) -> HalfSnapshot:
        """The server saves its half where it runs; the device keeps only what identifies that save."""
        del step_id  # the device's counter also numbers evaluations; the server counts training steps
        req = spb.CheckpointRequest(step_id=self.last_step, keep=keep).SerializeToString()
        reply = spb.CheckpointReply.FromString(self._request(CHECKPOINT, req))
        if reply.step_id != self.last_step or len(reply.state_sha256) != 64:
            raise RemoteError(f"the server saved its half at step {reply.step_id} with digest "
                              f"{reply.state_sha256!r}; this client asked for step {self.last_step}")
        self.checkpoints += 1
        return HalfSnapshot(identity={
            "server": self.conn.target, "client_id": self.hello.client_id, "fingerprint": self.welcome.fingerprint,
            "step_id": reply.step_id, "version": reply.version, "state_sha256": reply.state_sha256,
            "state_bytes": reply.state_bytes})

    def restore(self, record: HalfSnapshot, step_id: int) -> None:
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
