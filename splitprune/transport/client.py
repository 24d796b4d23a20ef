"""The gRPC client: the server half as a ServerEndpoint for the Trainer, and split inference.

`RemoteServer` is a Link (train / evaluate / start_phase take and return the same serialized messages
as the in-process LocalLink, so the device side counts the same payload bytes) over ONE persistent
bidirectional `Train` stream. It reconnects on its own when the stream breaks (server restart,
network failure, step timeout) and resumes by step id: a step the server applied but whose reply was
lost is answered again from the server's memory, never applied twice. Its traffic goes through an
in-process, unshaped TCP relay (splitprune.transport.link.LinkProxy) that counts the bytes on the
socket, so the summary reports payload and framing per direction from measurements.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
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
from splitprune.transport.addresses import format_hostport, parse_hostport
from splitprune.transport.link import LinkProfile, LinkProxy
from splitprune.transport.protocol import (AUTH_KEY, DEFAULT_HOST, DEFAULT_MAX_MESSAGE, DESCRIBE_METHOD, ERROR_KEY,
                                           EVAL, FETCH_STATE_METHOD, HELLO, INFER_METHOD, KIND_NAMES, PHASE,
                                           PROTOCOL_VERSION, PUSH_STATE_METHOD, TOKEN_ENV, TRAIN, TRAIN_METHOD,
                                           WELCOME, TlsFiles, channel_credentials, client_options, frame,
                                           join_chunks, leading_step_id, state_chunks, state_from_bytes, state_to_bytes, unframe)

log = logging.getLogger("splitprune.client")

# Status codes after which the client reconnects and retries (step ids make that safe).
RETRIABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.UNKNOWN}
MEASURED_AT = ("bytes counted on the client's TCP socket by an in-process relay: HTTP/2 and gRPC framing, "
               "headers, pings and TLS records included; TCP/IP headers not")


class RemoteError(UserError):
    """The server refused a request or could not be reached; `code` and `reason` say why."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.code, self.reason = code, reason


def _status(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str, str]:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    reason = ""
    try:
        reason = dict(exc.trailing_metadata() or ()).get(ERROR_KEY, "")
    except Exception:  # noqa: BLE001 - not every RpcError carries metadata
        pass
    return code, details or "", reason


def remote_error(exc: grpc.RpcError, what: str) -> RemoteError:
    code, details, reason = _status(exc)
    hint = ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        hint = " (pass --token or set SPLITPRUNE_TOKEN)"
    elif code == grpc.StatusCode.UNAVAILABLE and ("handshake" in details.lower() or "ssl" in details.lower()):
        hint = " (TLS on one side only, or the certificate does not match?)"
    text = f"{what}: {code.name}" + (f" [{reason}]" if reason else "") + f": {details}{hint}"
    return RemoteError(text, code, reason)


class _StreamFailed(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, reason: str = "", exc: grpc.RpcError | None = None):
        super().__init__(details)
        self.code, self.details, self.reason, self.exc = code, details, reason, exc

    @property
    def retriable(self) -> bool:
        return self.code in RETRIABLE


_CLOSE = object()


class _Stream:
    """One Train stream: requests go through a queue to gRPC's sender; the caller reads each reply itself.

    Reading in the caller's thread keeps thread hand-offs off the critical path of a step; a watchdog
    thread cancels the call when a reply is later than its deadline.
    """

    def __init__(self, method: Callable, metadata: tuple) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._call = method(iter(self._requests.get, _CLOSE), metadata=metadata)
        self._deadline: float | None = None
        self._timed_out = False
        self.closed = False      # no more requests
        self._finished = False   # the call is over: the watchdog may stop
        self._watchdog = threading.Thread(target=self._watch, name="splitprune-stream-watchdog", daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        while not self._finished:
            time.sleep(0.25)
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                self._timed_out = True
                self._call.cancel()
                return

    def exchange(self, data: bytes, timeout: float) -> bytes:
        if self.closed:
            raise _StreamFailed(grpc.StatusCode.UNAVAILABLE, "the stream is closed")
        self._requests.put(data)
        self._deadline = time.monotonic() + timeout
        try:
            return next(self._call)
        except StopIteration:
            self.cancel()
            raise _StreamFailed(grpc.StatusCode.UNAVAILABLE, "the server ended the stream") from None
        except grpc.RpcError as exc:
            self.cancel()
            if self._timed_out:
                raise _StreamFailed(grpc.StatusCode.DEADLINE_EXCEEDED, f"no reply within {timeout:g} s") from None
            raise _StreamFailed(*_status(exc), exc=exc) from None
        finally:
            self._deadline = None

    def close(self, wait: float = 0.0) -> None:
        """Half-close (the server ends the session); wait up to `wait` s for its end, then cancel."""
        if not self.closed:
            self.closed = True
            self._requests.put(_CLOSE)
            if wait:
                self._deadline = time.monotonic() + wait
                try:
                    for _ in self._call:  # drain until the server's OK (or an error, or the deadline)
                        pass
                except grpc.RpcError:
                    pass
        self._finished = True
        self._call.cancel()

    def cancel(self) -> None:
        if not self.closed:
            self.closed = True
            self._requests.put(_CLOSE)
        self._finished = True
        self._call.cancel()


class Meter:
    """Bytes of one channel: payload (messages handed to the transport) and wire (measured on the socket)."""

    def __init__(self, proxy: LinkProxy | None) -> None:
        self.proxy = proxy
        self.payload_up = self.payload_down = 0
        self.handshake_up = self.handshake_down = 0
        self.messages_up = self.messages_down = 0
        self.setup: tuple[int, int] | None = None  # socket bytes when the first session was set up

    def count(self, up: int, down: int) -> None:
        """One request of `up` payload bytes answered by `down` bytes."""
        self.payload_up += up
        self.payload_down += down
        self.messages_up += 1
        self.messages_down += 1

    def mark_setup(self) -> None:
        """Remember the socket counts once the connection and the first handshake are done."""
        if self.setup is None and self.proxy is not None:
            c = self.proxy.counters()
            self.setup = (c.bytes_up, c.bytes_down)

    def report(self) -> dict:
        out = {"payload_bytes_up": self.payload_up, "payload_bytes_down": self.payload_down,
               "messages_up": self.messages_up, "messages_down": self.messages_down}
        if self.handshake_up or self.handshake_down:
            out.update(handshake_bytes_up=self.handshake_up, handshake_bytes_down=self.handshake_down)
        if self.proxy is not None:
            c = self.proxy.counters()
            out.update(wire_bytes_up=c.bytes_up, wire_bytes_down=c.bytes_down, connections=c.connections,
                       framing_bytes_up=c.bytes_up - self.payload_up - self.handshake_up,
                       framing_bytes_down=c.bytes_down - self.payload_down - self.handshake_down,
                       wire_over_payload_up=round(c.bytes_up / self.payload_up, 5) if self.payload_up else None,
                       wire_over_payload_down=round(c.bytes_down / self.payload_down, 5) if self.payload_down else None)
            if self.setup is not None:  # steady state: what the messages cost after connection setup + handshake
                up, down = c.bytes_up - self.setup[0], c.bytes_down - self.setup[1]
                out.update(setup_wire_bytes_up=self.setup[0], setup_wire_bytes_down=self.setup[1],
                           wire_over_payload_after_setup_up=round(up / self.payload_up, 5) if self.payload_up else None,
                           wire_over_payload_after_setup_down=(round(down / self.payload_down, 5)
                                                               if self.payload_down else None))
        return out


class Connection:
    """Where the server is and how to reach it: address, TLS, token, and a measuring relay per channel."""

    def __init__(self, server: str, token: str | None = None, tls: TlsFiles | None = None, measure: bool = True,
                 max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.host, self.port = parse_hostport(server, default_host=DEFAULT_HOST)
        if self.port == 0:
            raise UserError(f"--server {server}: give the server's port")
        self.target = format_hostport((self.host, self.port))
        self.tls = tls
        self.credentials = channel_credentials(tls)
        if token is not None and not token:
            raise UserError("the token must not be empty")
        self.metadata = ((AUTH_KEY, f"Bearer {token}"),) if token else ()
        self.measure = measure
        self.max_message = max_message
        self.meters: dict[str, Meter] = {}
        self._channels: list[grpc.Channel] = []

    def channel(self, purpose: str) -> tuple[grpc.Channel, Meter]:
        """A channel with its own TCP connection, relayed (and counted) when measuring."""
        proxy = None
        target = self.target
        if self.measure:
            proxy = LinkProxy(("127.0.0.1", 0), (self.host, self.port), LinkProfile()).start()
            target = format_hostport(proxy.address)
        options = client_options(self.max_message, tls_host=self.host if self.credentials else None)
        if self.credentials is not None:
            ch = grpc.secure_channel(target, self.credentials, options=options)
        else:
            ch = grpc.insecure_channel(target, options=options)
        self._channels.append(ch)
        meter = self.meters[purpose] = Meter(proxy)
        return ch, meter

    def close(self) -> None:
        for ch in self._channels:
            ch.close()
        for meter in self.meters.values():
            if meter.proxy is not None:
                meter.proxy.stop()


class RemoteServer:
    """The server half behind a `splitprune serve` server, as a ServerEndpoint (and its Link)."""

    def __init__(self, conn: Connection, hello: spb.Hello, step_timeout: float = 300.0,
                 reconnect_s: float = 120.0, connect_timeout: float = 20.0) -> None:
        self.conn = conn
        self.hello = hello
        self.step_timeout, self.reconnect_s, self.connect_timeout = step_timeout, reconnect_s, connect_timeout
        self.link = self
        steps, self._steps_meter = conn.channel("steps")
        state, self._state_meter = conn.channel("state")
        self._train_method = steps.stream_stream(TRAIN_METHOD)
        self._fetch_method = state.unary_stream(FETCH_STATE_METHOD)
        self._push_method = state.stream_unary(PUSH_STATE_METHOD)
        self._stream: _Stream | None = None
        self.welcome: spb.Welcome | None = None
        self.last_step = 0                    # last step whose reply this client received
        self._phase: pb.PhaseRequest | None = None  # last phase the server acknowledged
        self._pending: tuple[int, bytes, int] | None = None
        self._state_cache: tuple[int, dict[str, torch.Tensor]] | None = None
        self.reconnects = 0
        self.retried_requests = 0
        self.fetches = self.fetches_unchanged = self.pushes = 0
        self._closed = False
        self._connect(initial=True)

    # ---------------------------------------------------------------- connection
    def _handshake(self, timeout: float) -> spb.Welcome:
        stream = _Stream(self._train_method, self.conn.metadata)
        hello = self.hello.SerializeToString()
        try:
            out = stream.exchange(frame(HELLO, hello), timeout)
        except _StreamFailed:
            stream.cancel()
            raise
        kind, payload = unframe(out)
        if kind != WELCOME:
            stream.cancel()
            raise ProtocolError(f"server answered the Hello with a {KIND_NAMES.get(kind, kind)} message")
        meter = self._steps_meter
        meter.handshake_up += len(hello)
        meter.handshake_down += len(payload)
        meter.mark_setup()
        welcome = spb.Welcome.FromString(payload)
        self._stream = stream
        return welcome

    def _connect(self, initial: bool) -> None:
        """(Re)open the Train stream, retrying while the server is unreachable, then reconcile step ids."""
        window = self.connect_timeout if initial else self.reconnect_s
        deadline = time.monotonic() + window
        delay = 0.1
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
            except _StreamFailed as exc:
                self._drop_stream()
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

    def _check_welcome(self, welcome: spb.Welcome) -> None:
        if welcome.protocol_version != PROTOCOL_VERSION:
            raise RemoteError(f"server speaks protocol {welcome.protocol_version}, this client {PROTOCOL_VERSION}")
        if self.hello.wire_shape and list(welcome.wire_shape) != list(self.hello.wire_shape):
            raise RemoteError(f"server's wire shape {list(welcome.wire_shape)} != {list(self.hello.wire_shape)}")
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

    def _exchange(self, envelope: bytes, kind: int) -> bytes:
        if self._stream is None:
            raise _StreamFailed(grpc.StatusCode.UNAVAILABLE, "not connected")
        out = self._stream.exchange(envelope, self.step_timeout)
        got, payload = unframe(out)
        if got != kind:
            raise ProtocolError(f"expected a {KIND_NAMES[kind]} reply, got {KIND_NAMES.get(got, got)}")
        return payload

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
                    payload = self._exchange(envelope, kind)
                    break
                except _StreamFailed as exc:
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
        self._steps_meter.count(len(inner), len(payload))
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
    def _state_call(self, what: str, call: Callable):
        """Run a state RPC with the current session id; reconnect once if the session is gone."""
        for attempt in range(2):
            if self._stream is None:
                self._connect(initial=False)
            try:
                return call(self.welcome.session_id)
            except grpc.RpcError as exc:
                code, _, reason = _status(exc)
                if attempt == 0 and (code in RETRIABLE or reason == "UNKNOWN_SESSION"):
                    self._drop_stream()
                    continue
                raise remote_error(exc, what) from None

    def server_state(self) -> dict[str, torch.Tensor]:
        known = self._state_cache[0] if self._state_cache else 0

        def fetch(session_id: str):
            req = spb.FetchStateRequest(session_id=session_id, known_version=known).SerializeToString()
            replies = self._fetch_method(req, metadata=self.conn.metadata, timeout=self.step_timeout)
            return join_chunks((spb.StateChunk.FromString(b) for b in replies), 1 << 40)

        first, data = self._state_call("cannot fetch the server half's state", fetch)
        self.fetches += 1
        meter = self._state_meter
        meter.messages_down += 1
        if first.unchanged and self._state_cache is not None:
            self.fetches_unchanged += 1
            return dict(self._state_cache[1])
        tensors = state_from_bytes(data)
        meter.payload_down += len(data)
        self._state_cache = (first.version, tensors)
        return dict(tensors)

    def push_state(self, tensors: dict[str, torch.Tensor], step_id: int) -> spb.PushStateReply:
        data = state_to_bytes(tensors)

        def push(session_id: str):
            chunks = state_chunks(data, spb.StateChunk(session_id=session_id, step_id=step_id))
            return spb.PushStateReply.FromString(self._push_method(
                (c.SerializeToString() for c in chunks), metadata=self.conn.metadata, timeout=self.step_timeout))

        reply = self._state_call("cannot push the server half's state", push)
        self.pushes += 1
        self._state_meter.payload_up += len(data)
        self._state_meter.messages_up += 1
        self._state_cache = None
        self.last_step = step_id
        if not reply.applied:
            log.warning("server: %s", reply.note)
        return reply

    def load_server_state(self, tensors: dict[str, torch.Tensor]) -> None:
        state = {k: v for k, v in tensors.items()
                 if k.startswith("server.") or k.startswith("opt.server.") or k == "rng.server"}
        step = int(tensors["step_id"][0]) if "step_id" in tensors else self.last_step
        self.push_state(state, step)

    def transport_stats(self) -> dict:
        return {
            "server": self.conn.target, "tls": self.conn.credentials is not None,
            "mutual_tls": bool(self.conn.tls and self.conn.tls.cert), "client_id": self.hello.client_id,
            "measured": MEASURED_AT if self.conn.measure else "not measured (measure=False)",
            "steps": self._steps_meter.report(),
            "state": {**self._state_meter.report(), "fetches": self.fetches,
                      "fetches_unchanged": self.fetches_unchanged, "pushes": self.pushes},
            "reconnects": self.reconnects, "retried_requests": self.retried_requests,
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


def connect(cfg: RunConfig, server: str, *, out: str | None = None, token: str | None = None,
            tls: TlsFiles | None = None, client_id: str | None = None, fresh_start: bool | None = None,
            measure: bool = True, step_timeout: float = 300.0, reconnect_s: float = 120.0,
            connect_timeout: float = 20.0) -> RemoteServer:
    """Open a training session for `cfg` on `server`. Without `fresh_start`, it is inferred from `out`:
    a run folder holding a checkpoint resumes, anything else starts afresh."""
    if fresh_start is None:
        fresh_start = not (out and (Path(out) / "checkpoint" / "meta.json").exists())
    hello = make_hello(cfg, client_id or client_id_for(out), fresh_start)
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
                   tls=tls_from_args(args), step_timeout=_env_seconds("SPLITPRUNE_STEP_TIMEOUT", 300.0),
                   reconnect_s=_env_seconds("SPLITPRUNE_RECONNECT_SECONDS", 120.0),
                   connect_timeout=_env_seconds("SPLITPRUNE_CONNECT_TIMEOUT", 20.0))


# ---------------------------------------------------------------- split inference
class InferenceClient:
    """Unary Describe / Infer calls for one hosted model (identified by its config fingerprint)."""

    def __init__(self, server: str, fingerprint: str, token: str | None = None, tls: TlsFiles | None = None,
                 measure: bool = True, timeout: float = 60.0, connect_timeout: float = 20.0) -> None:
        self.conn = Connection(server, token, tls, measure)
        channel, self.meter = self.conn.channel("infer")
        self._describe = channel.unary_unary(DESCRIBE_METHOD)
        self._infer = channel.unary_unary(INFER_METHOD)
        self.fingerprint = fingerprint
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.latencies_ms: list[float] = []
        self.server_ms: list[float] = []
        self._prefix = b""

    def describe(self) -> spb.DescribeReply:
        req = spb.DescribeRequest(fingerprint=self.fingerprint).SerializeToString()
        deadline = time.monotonic() + self.connect_timeout
        while True:
            try:
                return spb.DescribeReply.FromString(self._describe(req, metadata=self.conn.metadata,
                                                                   timeout=self.timeout, wait_for_ready=False))
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise remote_error(exc, f"cannot describe model {self.fingerprint} on {self.conn.target}") from None
                time.sleep(0.2)

    def link(self, budget: int) -> "InferenceLink":
        return InferenceLink(self, budget)

    def infer(self, request: bytes, budget: int) -> bytes:
        head = spb.InferRequest(fingerprint=self.fingerprint, budget=budget).SerializeToString()
        data = head + frame(3, request)  # field 3 = eval: the EvalRequest bytes as they are
        start = time.perf_counter()
        try:
            out = self._infer(data, metadata=self.conn.metadata, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise remote_error(exc, "inference request failed") from None
        self.latencies_ms.append((time.perf_counter() - start) * 1e3)
        reply = spb.InferReply.FromString(out)
        self.server_ms.append(reply.server_ms)
        payload = reply.eval.SerializeToString()
        self.meter.count(len(request), len(payload))
        return payload

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
