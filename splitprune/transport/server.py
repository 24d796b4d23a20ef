"""The gRPC server: hosts server halves for many training clients and for split inference.

One `HostedHalf` per config fingerprint: every training session whose config has that fingerprint
shares it, and updates are applied one at a time under the half's mutex. A session is one `Train`
stream; the server validates every message against the session's handshake before it touches the
model, answers bad input with a gRPC status (never by crashing), and remembers per client id the last
applied step and its reply, so a client that reconnects resumes without losing or re-applying a step.
With a checkpoint folder, halves (weights, optimizer, random state, per-client step ids and last
replies) are saved atomically, periodically and on shutdown, and loaded again on start.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import shutil
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import grpc
import torch

from splitprune.compression.codec import WIRE_DTYPES, dtype_name
from splitprune.config import RunConfig, make_config
from splitprune.errors import ProtocolError, UserError
from splitprune.models import cut_shape
from splitprune.proto import pb
from splitprune.proto import service_pb2 as spb
from splitprune.training.checkpoint import (load_module, module_tensors, read_meta, read_tensors,
                                            write_checkpoint)
from splitprune.training.setup import InProcessServer, build_workers
from splitprune.training.step import ServerWorker, check_lr_scale
from splitprune.transport.addresses import format_hostport, parse_hostport
from splitprune.transport.protocol import (AUTH_KEY, CLIENT_ID_RE, DEFAULT_HOST, DEFAULT_MAX_MESSAGE, ERROR_KEY, EVAL,
                                           PHASE, PROTOCOL_VERSION, SERVICE, STATE_CHUNK, TRAIN, WELCOME, frame,
                                           join_chunks, kept_count, request_digest, server_credentials,
                                           server_options, state_chunks, state_from_bytes, state_to_bytes,
                                           weights_digest)

log = logging.getLogger("splitprune.serve")
R = spb.ErrorReason
HALF_KIND = "splitprune-server-half/1"
_FP_RE = re.compile(r"^[0-9a-f]{16}$")


class Abort(Exception):
    """Ends the current RPC with a status code, an ErrorReason and a clear message."""

    def __init__(self, code: grpc.StatusCode, reason: int, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


def _invalid(reason: int, message: str) -> Abort:
    return Abort(grpc.StatusCode.INVALID_ARGUMENT, reason, message)


@dataclass
class ClientRecord:
    """What the server remembers of one client id on one half: its last applied step and that reply."""

    last_step: int = 0
    digest: bytes = b""
    reply: bytes = b""  # framed ServerMessage answering last_step


@dataclass
class Session:
    """One attached Train stream."""

    id: str
    client_id: str
    half: "HostedHalf"
    context: grpc.ServicerContext
    dtype_up: int
    dtype_down: int
    max_budget: int
    peer: str = ""
    last_activity: float = field(default_factory=time.monotonic)
    replaced: bool = False
    busy: bool = False   # inside a request (never reaped for idleness then)
    steps: int = 0

    def touch(self) -> None:
        self.last_activity = time.monotonic()


class HostedHalf:
    """A server half for one config fingerprint, shared by all sessions with that fingerprint."""

    def __init__(self, cfg: RunConfig, num_classes: int, in_channels: int, read_only: bool = False,
                 source: str = "", accelerator: str = "cpu") -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.fingerprint = cfg.fingerprint()
        self.num_classes, self.in_channels = num_classes, in_channels
        self.read_only, self.source = read_only, source
        self.mutex = threading.Lock()        # held for every update (step, phase, push) and for snapshots
        self.clients: dict[str, ClientRecord] = {}
        self.attached: dict[str, Session] = {}
        self.phase_req: pb.PhaseRequest | None = None
        self.version = 1
        self.saved_version = 0
        self._state_cache: tuple[int, bytes] | None = None
        self._digest_cache: tuple[int, str] | None = None
        self._build()

    def _build(self) -> None:
        _, worker, geometry = build_workers(self.cfg, self.num_classes, self.in_channels)
        if self.accelerator == "cuda":  # the server's choice (serve --accelerator), whatever the client's config says
            worker.half.cuda()
        self.worker: ServerWorker = worker
        self.geometry = geometry
        self.channels = geometry.wire_shape[0]

    @property
    def budget(self) -> int:
        return self.worker.budget or self.channels

    def reset(self) -> None:
        """A new run: weights, optimizer and random state as the config's seed makes them (mutex held)."""
        self._build()
        self.clients.clear()
        self.phase_req = None
        self.version += 1

    def bump(self) -> None:
        self.version += 1

    # -- state (caller holds the mutex) ---------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        with self.worker.lock:
            return InProcessServer(self.worker).server_state()

    def state_bytes(self) -> tuple[int, bytes]:
        if self._state_cache is None or self._state_cache[0] != self.version:
            self._state_cache = (self.version, state_to_bytes(self.state_tensors()))
        return self._state_cache

    def digest(self) -> str:
        if self._digest_cache is None or self._digest_cache[0] != self.version:
            with self.worker.lock:
                tensors = module_tensors("server", self.worker.half)
            self._digest_cache = (self.version, weights_digest(tensors))
        return self._digest_cache[1]

    def state_limit(self) -> int:
        """Largest acceptable pushed state: weights + momentum buffers + random state + headers."""
        weights = sum(t.numel() * t.element_size() for t in self.worker.half.state_dict().values())
        return 2 * weights + (1 << 20) + 64 * len(self.worker.half.state_dict())

    def check_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Every pushed tensor must be one the half has, with its shape and dtype, and finite."""
        reference = {f"server.{k}": v for k, v in self.worker.half.state_dict().items()}
        reference.update({f"opt.server.{k}": v for k, v in self.worker.half.named_parameters()})
        reference["rng.server"] = self.worker.rng.state
        unknown = sorted(set(tensors) - set(reference))
        if unknown:
            raise _invalid(R.BAD_STATE, f"state holds tensors the server half does not have: {unknown[:3]}")
        missing = sorted(k for k in reference if k.startswith("server.") and k not in tensors)
        if missing:
            raise _invalid(R.BAD_STATE, f"state lacks {len(missing)} server tensors (e.g. {missing[0]})")
        for name, t in tensors.items():
            ref = reference[name]
            if tuple(t.shape) != tuple(ref.shape) or t.dtype != ref.dtype:
                raise _invalid(R.BAD_STATE, f"state tensor {name} has shape {list(t.shape)} and dtype {t.dtype}; "
                                            f"the server half needs shape {list(ref.shape)} and dtype {ref.dtype}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise _invalid(R.BAD_STATE, f"state tensor {name} holds NaN or Inf")

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """As the in-process resume does: a fresh optimizer for the current phase, then the saved state."""
        if self.phase_req is not None:
            self.worker.start_phase(self.phase_req)
        with self.worker.lock:
            InProcessServer(self.worker).load_server_state(tensors)
        self.bump()

    # -- persistence ----------------------------------------------------------------------------
    def snapshot(self) -> tuple[dict, dict, dict]:
        """(model tensors, state tensors, meta) for a checkpoint folder (caller holds the mutex)."""
        state = self.state_tensors()
        model = {k: v for k, v in state.items() if k.startswith("server.")}
        rest = {k: v for k, v in state.items() if not k.startswith("server.")}
        clients = []
        for i, (cid, rec) in enumerate(sorted(self.clients.items())):
            entry = {"client_id": cid, "last_step": rec.last_step, "digest": rec.digest.hex(), "reply": None}
            if rec.reply:
                entry["reply"] = f"reply.{i}"
                rest[entry["reply"]] = torch.frombuffer(bytearray(rec.reply), dtype=torch.uint8)
            clients.append(entry)
        phase = None
        if self.phase_req is not None:
            r = self.phase_req
            phase = {"phase": r.phase, "budget": r.budget, "lr": r.lr, "momentum": r.momentum,
                     "weight_decay": r.weight_decay}
        meta = {"kind": HALF_KIND, "config": self.cfg.to_dict(), "fingerprint": self.fingerprint,
                "num_classes": self.num_classes, "in_channels": self.in_channels,
                "cut_shape": list(self.geometry.cut_shape), "wire_shape": list(self.geometry.wire_shape),
                "budget": self.budget, "phase": phase, "version": self.version, "clients": clients}
        return model, rest, meta

    @classmethod
    def from_folder(cls, folder: Path, accelerator: str = "cpu") -> "HostedHalf":
        meta = read_meta(folder)
        if meta.get("kind") != HALF_KIND:
            raise UserError(f"{folder} is not a server-half checkpoint")
        half = cls(make_config(meta["config"]), int(meta["num_classes"]), int(meta["in_channels"]),
                   source=str(folder), accelerator=accelerator)
        model = read_tensors(meta["_folder"])
        state = read_tensors(meta["_folder"], "state.safetensors")
        if meta.get("phase"):
            half.phase_req = pb.PhaseRequest(**meta["phase"])
            half.worker.start_phase(half.phase_req)
        InProcessServer(half.worker).load_server_state({**model, **state})
        for entry in meta.get("clients", []):
            reply = state.get(entry["reply"]) if entry.get("reply") else None
            half.clients[entry["client_id"]] = ClientRecord(
                int(entry["last_step"]), bytes.fromhex(entry.get("digest", "")),
                reply.numpy().tobytes() if reply is not None else b"")
        half.version = half.saved_version = int(meta.get("version", 1))
        return half

    @classmethod
    def from_model(cls, path: str, accelerator: str = "cpu") -> "HostedHalf":
        """A trained model checkpoint (from `splitprune train`), hosted read-only for inference."""
        meta = read_meta(path)
        if "config" not in meta or "num_classes" not in meta:
            raise UserError(f"{path} is not a model checkpoint of `splitprune train`")
        half = cls(make_config(meta["config"]), int(meta["num_classes"]), int(meta["in_channels"]),
                   read_only=True, source=meta["_folder"], accelerator=accelerator)
        if meta.get("fingerprint") and meta["fingerprint"] != half.fingerprint:
            raise UserError(f"{path}: the config's fingerprint does not match the recorded one")
        load_module("server", half.worker.half, read_tensors(meta["_folder"]))
        return half


class SplitServer:
    """The servicer: handshakes, validation, the shared halves, state transfer, inference, persistence."""

    def __init__(self, checkpoint: str | None = None, models: tuple[str, ...] = (), token: str | None = None,
                 max_sessions: int = 16, max_halves: int = 8, max_message: int = DEFAULT_MAX_MESSAGE,
                 idle_timeout_s: float = 600.0, save_every_s: float = 60.0, accelerator: str = "cpu") -> None:
        if accelerator not in ("cpu", "cuda"):
            raise UserError(f"accelerator must be 'cpu' or 'cuda', got {accelerator!r}")
        if accelerator == "cuda" and not torch.cuda.is_available():
            raise UserError("--accelerator cuda: no CUDA device is available here")
        self.accelerator = accelerator
        self.token = token
        self.max_sessions, self.max_halves, self.max_message = max_sessions, max_halves, max_message
        self.idle_timeout_s, self.save_every_s = idle_timeout_s, save_every_s
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.halves: dict[str, HostedHalf] = {}
        self.sessions: dict[str, Session] = {}
        self.registry = threading.Lock()
        self.save_lock = threading.Lock()
        self.draining = False
        self.client_checkpoints: dict[tuple, tuple] = {}  # test shim: (fingerprint, client, step, sha) -> save
        self._stop = threading.Event()
        self.counters = {"steps": 0, "retried_steps": 0, "sessions": 0, "errors": 0, "infer": 0}
        self._count_lock = threading.Lock()
        for path in models:
            half = HostedHalf.from_model(path, accelerator)
            if half.fingerprint in self.halves:
                raise UserError(f"two models share the config fingerprint {half.fingerprint}; serve one of them")
            self.halves[half.fingerprint] = half
        if self.checkpoint is not None:
            self._load_all()

    # ---------------------------------------------------------------- plumbing
    def count(self, name: str) -> None:
        with self._count_lock:
            self.counters[name] += 1

    def handler(self) -> grpc.GenericRpcHandler:
        # No (de)serializers: handlers get raw bytes and parse them, so malformed input gets a clear status.
        methods = {
            "Train": grpc.stream_stream_rpc_method_handler(self.Train),
            "FetchState": grpc.unary_stream_rpc_method_handler(self.FetchState),
            "PushState": grpc.stream_unary_rpc_method_handler(self.PushState),
            "Describe": grpc.unary_unary_rpc_method_handler(self.Describe),
            "Infer": grpc.unary_unary_rpc_method_handler(self.Infer),
        }
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    def _authorize(self, context: grpc.ServicerContext) -> None:
        if self.token is None:
            return
        given = dict(context.invocation_metadata()).get(AUTH_KEY)
        if given is None:
            raise Abort(grpc.StatusCode.UNAUTHENTICATED, R.UNAUTHENTICATED_TOKEN,
                        "this server requires a bearer token: pass --token (or set SPLITPRUNE_TOKEN)")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise Abort(grpc.StatusCode.UNAUTHENTICATED, R.UNAUTHENTICATED_TOKEN, "wrong bearer token")

    def _fail(self, context: grpc.ServicerContext, exc: BaseException, what: str):
        """Turn any exception into a status; the server itself goes on."""
        if isinstance(exc, Abort):
            abort = exc
        elif isinstance(exc, ProtocolError):
            abort = _invalid(R.BAD_TENSOR, str(exc))
        elif isinstance(exc, UserError):
            abort = _invalid(R.BAD_HANDSHAKE, str(exc))
        else:
            log.exception("internal error in %s from %s", what, context.peer())
            abort = Abort(grpc.StatusCode.INTERNAL, R.INTERNAL_ERROR, f"internal server error: {exc!r}")
        self.count("errors")
        log.info("%s from %s refused: %s %s: %s", what, context.peer(), abort.code.name, R.Name(abort.reason),
                 abort.message)
        context.set_trailing_metadata(((ERROR_KEY, R.Name(abort.reason)),))
        context.abort(abort.code, abort.message)

    @staticmethod
    def _parse(cls, data: bytes):
        msg = cls()
        try:
            msg.ParseFromString(data)
        except Exception as exc:
            raise _invalid(R.BAD_MESSAGE, f"malformed {cls.__name__}: {exc}") from None
        return msg

    def _half(self, fingerprint: str) -> HostedHalf:
        with self.registry:
            half = self.halves.get(fingerprint)
        if half is None:
            raise Abort(grpc.StatusCode.NOT_FOUND, R.UNKNOWN_MODEL,
                        f"this server hosts no model with fingerprint {fingerprint!r}; "
                        "serve its checkpoint with `splitprune serve --model DIR`")
        return half

    def _check_draining(self) -> None:
        if self.draining:
            raise Abort(grpc.StatusCode.UNAVAILABLE, R.SHUTTING_DOWN,
                        "the server is shutting down; it saves its state: reconnect to resume")

    # ---------------------------------------------------------------- handshake
    def _hello_config(self, hello: spb.Hello) -> RunConfig:
        if hello.protocol_version != PROTOCOL_VERSION:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION, R.VERSION_MISMATCH,
                        f"protocol version {hello.protocol_version} is not supported; "
                        f"this server speaks version {PROTOCOL_VERSION}")
        if not CLIENT_ID_RE.match(hello.client_id):
            raise _invalid(R.BAD_HANDSHAKE, "client_id must be 1-128 characters of A-Z a-z 0-9 . _ : -")
        try:
            values = json.loads(hello.config_json)
        except ValueError as exc:
            raise _invalid(R.BAD_HANDSHAKE, f"config_json is not valid JSON: {exc}") from None
        if not isinstance(values, dict):
            raise _invalid(R.BAD_HANDSHAKE, "config_json must be a JSON object")
        try:
            cfg = make_config(values)
            fingerprint = cfg.fingerprint()
        except UserError as exc:
            raise _invalid(R.BAD_HANDSHAKE, f"bad config: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise _invalid(R.BAD_HANDSHAKE, f"bad config: {exc}") from None
        if hello.fingerprint and fingerprint != hello.fingerprint:  # empty: the client lets the server compute it
            raise _invalid(R.FINGERPRINT_MISMATCH,
                           f"fingerprint {hello.fingerprint!r} is not that of the config sent ({fingerprint})")
        if not 2 <= hello.num_classes <= 65535:
            raise _invalid(R.BAD_HANDSHAKE, f"num_classes must be 2..65535, got {hello.num_classes}")
        if hello.in_channels not in (1, 3):
            raise _invalid(R.BAD_HANDSHAKE, f"in_channels must be 1 or 3, got {hello.in_channels}")
        for side, declared, configured in (("up", hello.dtype_up, cfg.dtype_up), ("down", hello.dtype_down, cfg.dtype_down)):
            if declared != WIRE_DTYPES[configured]:
                raise _invalid(R.BAD_HANDSHAKE, f"dtype_{side} {declared} differs from the config's {configured}")
        return cfg

    def _check_size(self, cfg: RunConfig, hello: spb.Hello) -> None:
        """Refuse, before allocating anything, a model whose cut tensor for one sample could not fit in a message."""
        try:
            c, h, w = cut_shape(cfg.model, cfg.split, hello.in_channels, cfg.input_size)  # meta device: no memory
        except UserError as exc:
            raise _invalid(R.BAD_HANDSHAKE, f"cannot build the server half: {exc}") from None
        if c * h * w * 4 > self.max_message:
            raise _invalid(R.BAD_HANDSHAKE, f"one cut tensor of {c}x{h}x{w} float32 values would exceed the "
                                            f"server's message limit of {self.max_message} bytes")

    def _get_or_build(self, cfg: RunConfig, hello: spb.Hello) -> HostedHalf:
        fingerprint = cfg.fingerprint()
        with self.registry:
            half = self.halves.get(fingerprint)
            count = len(self.halves)
        if half is None:
            if count >= self.max_halves:
                raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, R.TOO_MANY_SESSIONS,
                            f"this server already hosts {count} models (limit {self.max_halves})")
            self._check_size(cfg, hello)
            try:
                built = HostedHalf(cfg, hello.num_classes, hello.in_channels, accelerator=self.accelerator)
            except UserError as exc:
                raise _invalid(R.BAD_HANDSHAKE, f"cannot build the server half: {exc}") from None
            with self.registry:
                half = self.halves.setdefault(fingerprint, built)
            if half is built:
                log.info("new server half %s: %s %s cut at %s, wire %s", fingerprint, cfg.method, cfg.model,
                         cfg.split, list(half.geometry.wire_shape))
        if half.read_only:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION, R.READ_ONLY_MODEL,
                        f"model {fingerprint} is hosted for inference only (--model); it cannot be trained")
        if (half.num_classes, half.in_channels) != (hello.num_classes, hello.in_channels):
            raise _invalid(R.BAD_HANDSHAKE, f"the server half has {half.num_classes} classes and "
                                            f"{half.in_channels} input channels, the client {hello.num_classes} "
                                            f"and {hello.in_channels}")
        return half

    def _open(self, hello: spb.Hello, context: grpc.ServicerContext) -> tuple[Session, spb.Welcome]:
        cfg = self._hello_config(hello)
        half = self._get_or_build(cfg, hello)
        wire = list(half.geometry.wire_shape)
        if hello.wire_shape and list(hello.wire_shape) != wire:
            raise _invalid(R.BAD_HANDSHAKE, f"client expects wire shape {list(hello.wire_shape)}, the model has {wire}")
        if hello.max_budget > half.channels:
            raise _invalid(R.BAD_HANDSHAKE, f"max_budget {hello.max_budget} exceeds the {half.channels} channels")
        session = Session(secrets.token_hex(16), hello.client_id, half, context, hello.dtype_up, hello.dtype_down,
                          hello.max_budget or half.channels, peer=context.peer())
        with half.mutex:
            self._check_draining()
            with self.registry:
                others = [c for c in half.attached if c != hello.client_id]
                attached = sum(len(h.attached) for h in self.halves.values())
            if attached >= self.max_sessions and hello.client_id not in half.attached:
                raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, R.TOO_MANY_SESSIONS,
                            f"the server is at its limit of {self.max_sessions} training sessions")
            if hello.fresh_start:
                if not others and half.version > 1:  # a new run on a half nobody else is training
                    half.reset()
                    log.info("half %s re-initialised for a new run of %s", half.fingerprint, hello.client_id)
                half.clients[hello.client_id] = ClientRecord()
            record = half.clients.setdefault(hello.client_id, ClientRecord())
            restored = self._restore_for_client(half, hello) if hello.resume_step_id else ""
            with self.registry:
                old = half.attached.get(hello.client_id)
                if old is not None:
                    old.replaced = True
                    self.sessions.pop(old.id, None)
                half.attached[hello.client_id] = session
                self.sessions[session.id] = session
            welcome = spb.Welcome(
                protocol_version=PROTOCOL_VERSION, session_id=session.id, fingerprint=half.fingerprint,
                wire_shape=wire, last_step_id=record.last_step,
                phase=half.phase_req.phase if half.phase_req is not None else -1, budget=half.budget,
                attached_clients=len(half.attached), max_message_bytes=self.max_message, version=half.version,
                state_sha256=restored)
        if old is not None:
            old.context.cancel()
        self.count("sessions")
        log.info("session %s: client %s from %s on half %s (%d attached), last step %d%s", session.id[:8],
                 hello.client_id, context.peer(), half.fingerprint, welcome.attached_clients, record.last_step,
                 " (fresh start)" if hello.fresh_start else "")
        return session, welcome

    def _close(self, session: Session) -> None:
        half = session.half
        with self.registry:
            if half.attached.get(session.client_id) is session:
                del half.attached[session.client_id]
            self.sessions.pop(session.id, None)
        log.info("session %s: client %s detached after %d steps", session.id[:8], session.client_id, session.steps)

    # ---------------------------------------------------------------- Train stream
    def Train(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        session = None
        try:
            self._authorize(context)
            try:
                first = next(request_iterator)
            except StopIteration:
                return
            msg = self._parse(spb.ClientMessage, first)
            if msg.WhichOneof("body") != "hello":
                raise _invalid(R.BAD_HANDSHAKE, "the first message of a Train stream must be a Hello")
            session, welcome = self._open(msg.hello, context)
            yield frame(WELCOME, welcome.SerializeToString())
            for data in request_iterator:
                session.touch()
                session.busy = True
                try:
                    out = self._dispatch(session, data)
                finally:
                    session.busy = False
                yield out
                session.touch()
        except grpc.RpcError:
            pass  # the client went away (cancelled, disconnected): nothing to answer
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            if session is not None and session.replaced:
                exc = Abort(grpc.StatusCode.ABORTED, R.SESSION_REPLACED, "a newer stream of this client took over")
            self._fail(context, exc, "Train")
        finally:
            if session is not None:
                self._close(session)

    def _dispatch(self, s: Session, data: bytes) -> bytes:
        msg = self._parse(spb.ClientMessage, data)
        kind = msg.WhichOneof("body")
        if s.replaced:
            raise Abort(grpc.StatusCode.ABORTED, R.SESSION_REPLACED, "a newer stream of this client took over")
        if kind == "train":
            return self._train(s, msg.train)
        if kind == "eval":
            return self._eval(s, msg.eval)
        if kind == "phase":
            return self._phase(s, msg.phase)
        if kind == "checkpoint":
            return self._save_for_client(s, msg.checkpoint)
        if kind == "hello":
            raise _invalid(R.BAD_MESSAGE, "a stream carries one Hello, as its first message")
        raise _invalid(R.BAD_MESSAGE, "empty ClientMessage")

    # -- client-branch test shim for server-side checkpoints (CheckpointRequest, Hello.resume_step_id);
    # -- the server helper's implementation replaces it. Kept in memory, and on disk with --checkpoint.
    def _save_for_client(self, s: Session, req: spb.CheckpointRequest) -> bytes:
        half = s.half
        with half.mutex:
            last = half.clients.setdefault(s.client_id, ClientRecord()).last_step
            if req.step_id != last:
                raise Abort(grpc.StatusCode.FAILED_PRECONDITION, R.STEP_OUT_OF_ORDER,
                            f"checkpoint at step {req.step_id}, but the last step applied is {last}")
            model, state, meta = half.snapshot()
        state = {k: v for k, v in state.items() if not k.startswith("reply.")}
        blob = state_to_bytes({**model, **state})  # = what FetchState sends right now
        sha, size = hashlib.sha256(blob).hexdigest(), len(blob)
        del blob
        meta.update(step_id=req.step_id, state_sha256=sha, clients=[])
        if self.checkpoint is not None:  # on disk, the latest per client; in memory, the last 4 per client
            write_checkpoint(self.checkpoint / "clients" / half.fingerprint / s.client_id, model, meta, state)
        else:
            with self.registry:
                mine = [k for k in self.client_checkpoints if k[:2] == (half.fingerprint, s.client_id)]
                for key in mine[:-3]:
                    del self.client_checkpoints[key]
                self.client_checkpoints[(half.fingerprint, s.client_id, req.step_id, sha)] = (model, state, meta)
        return frame(5, spb.CheckpointReply(step_id=req.step_id, version=meta["version"], state_sha256=sha,
                                            state_bytes=size).SerializeToString())

    def _restore_for_client(self, half: HostedHalf, hello: spb.Hello) -> str:
        key = (half.fingerprint, hello.client_id, hello.resume_step_id, hello.resume_state_sha256)
        with self.registry:
            found = self.client_checkpoints.get(key)
        folder = self.checkpoint / "clients" / half.fingerprint / hello.client_id if self.checkpoint else None
        if found is None and folder is not None and (folder / "meta.json").exists():
            meta = read_meta(folder)
            if (meta.get("step_id"), meta.get("state_sha256")) == key[2:]:
                found = (read_tensors(folder), read_tensors(folder, "state.safetensors"), meta)
        if found is None:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION, R.NO_CHECKPOINT,
                        f"no checkpoint of client {hello.client_id} at step {hello.resume_step_id} here")
        model, state, meta = found
        half.phase_req = pb.PhaseRequest(**meta["phase"]) if meta.get("phase") else None
        half.load_state({**model, **state})
        record = half.clients.setdefault(hello.client_id, ClientRecord())
        record.last_step, record.digest, record.reply = hello.resume_step_id, b"", b""
        return meta["state_sha256"]

    @staticmethod
    def _check_activations(s: Session, t: pb.EncodedTensor, limit: int) -> None:
        if t.dtype != s.dtype_up:
            raise _invalid(R.BAD_TENSOR, f"activations are of dtype {t.dtype}, the session declared "
                                         f"{dtype_name(s.dtype_up)} ({s.dtype_up})")
        k = kept_count(t)
        if k > limit:
            raise _invalid(R.BUDGET_EXCEEDED, f"{k} channels sent but the budget is {limit}")

    def _train(self, s: Session, req: pb.TrainRequest) -> bytes:
        half = s.half
        self._check_activations(s, req.activations, min(s.max_budget, half.budget))
        try:
            check_lr_scale(req.lr_scale)
        except ProtocolError as exc:
            raise _invalid(R.BAD_MESSAGE, str(exc)) from None
        digest = request_digest(req)
        with half.mutex:
            self._check_draining()
            if s.replaced:
                raise Abort(grpc.StatusCode.ABORTED, R.SESSION_REPLACED, "a newer stream of this client took over")
            record = half.clients.setdefault(s.client_id, ClientRecord())
            if req.step_id == record.last_step and record.reply and record.digest == digest:
                self.count("retried_steps")
                return record.reply  # a retry of the step already applied: same answer, not applied twice
            if req.step_id <= record.last_step:
                raise Abort(grpc.StatusCode.FAILED_PRECONDITION, R.STEP_OUT_OF_ORDER,
                            f"step {req.step_id} out of order: step ids must increase, and the last step applied "
                            f"for client {s.client_id} is {record.last_step}")
            if half.worker.optimizer is None:
                raise Abort(grpc.StatusCode.FAILED_PRECONDITION, R.NO_PHASE,
                            "no training phase started: send a PhaseRequest first")
            try:
                reply = half.worker.train(req)
            except ProtocolError as exc:
                text = str(exc)
                raise _invalid(R.BUDGET_EXCEEDED if "budget" in text else R.BAD_TENSOR, text) from None
            out = frame(TRAIN, reply.SerializeToString())
            record.last_step, record.digest, record.reply = req.step_id, digest, out
            half.bump()
        s.steps += 1
        self.count("steps")
        return out

    def _eval(self, s: Session, req: pb.EvalRequest) -> bytes:
        self._check_activations(s, req.activations, min(s.max_budget, s.half.budget))
        return frame(EVAL, s.half.worker.evaluate(req).SerializeToString())

    def _phase(self, s: Session, req: pb.PhaseRequest) -> bytes:
        half = s.half
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(req, name)
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise _invalid(R.BAD_MESSAGE, f"phase {name} must be a finite {'positive' if name == 'lr' else 'non-negative'} "
                                              f"number, got {value}")
        if req.budget > half.channels:
            raise _invalid(R.BUDGET_EXCEEDED, f"budget {req.budget} exceeds the {half.channels} channels at the cut")
        with half.mutex:
            self._check_draining()
            if half.phase_req is None or half.phase_req != req:  # the same phase again (a reconnect): keep it
                half.worker.start_phase(req)
                half.phase_req = pb.PhaseRequest()
                half.phase_req.CopyFrom(req)
                half.bump()
                log.info("half %s: phase %d, budget %d, lr %g, momentum %g", half.fingerprint, req.phase,
                         half.budget, req.lr, req.momentum)
        return frame(PHASE, pb.PhaseReply(phase=req.phase).SerializeToString())

    # ---------------------------------------------------------------- state transfer
    def _session(self, session_id: str) -> Session:
        with self.registry:
            s = self.sessions.get(session_id)
        if s is None:
            raise Abort(grpc.StatusCode.NOT_FOUND, R.UNKNOWN_SESSION,
                        "no open training session with this id: open a Train stream (Hello) first")
        return s

    def FetchState(self, data: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            self._authorize(context)
            req = self._parse(spb.FetchStateRequest, data)
            half = self._session(req.session_id).half
            with half.mutex:
                version, blob = half.state_bytes()
            if req.known_version == version:
                yield spb.StateChunk(version=version, unchanged=True).SerializeToString()
                return
            for chunk in state_chunks(blob, spb.StateChunk(version=version), STATE_CHUNK):
                yield chunk.SerializeToString()
        except grpc.RpcError:
            pass
        except Exception as exc:  # noqa: BLE001
            self._fail(context, exc, "FetchState")

    def PushState(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        try:
            self._authorize(context)
            chunks = (self._parse(spb.StateChunk, c) for c in request_iterator)
            first = next(chunks, None)
            if first is None:
                raise _invalid(R.BAD_MESSAGE, "empty state push")
            s = self._session(first.session_id)
            half = s.half
            try:
                _, blob = join_chunks(_chain(first, chunks), half.state_limit())
            except ProtocolError as exc:
                code = grpc.StatusCode.RESOURCE_EXHAUSTED if "limit" in str(exc) else grpc.StatusCode.INVALID_ARGUMENT
                raise Abort(code, R.TOO_LARGE if "limit" in str(exc) else R.BAD_STATE, str(exc)) from None
            try:
                tensors = state_from_bytes(blob)
            except ProtocolError as exc:
                raise _invalid(R.BAD_STATE, str(exc)) from None
            half.check_state(tensors)
            with half.mutex:
                self._check_draining()
                others = [c for c in half.attached if c != s.client_id]
                record = half.clients.setdefault(s.client_id, ClientRecord())
                record.last_step, record.digest, record.reply = first.step_id, b"", b""
                if others:
                    note = (f"kept the shared server half: {len(others)} other client(s) are training it")
                    applied = False
                else:
                    half.load_state(tensors)
                    note, applied = "server half restored from the client's checkpoint", True
                reply = spb.PushStateReply(applied=applied, note=note, version=half.version,
                                           last_step_id=record.last_step)
            log.info("session %s: state push at step %d: %s", s.id[:8], first.step_id, note)
            return reply.SerializeToString()
        except grpc.RpcError:
            return b""
        except Exception as exc:  # noqa: BLE001
            self._fail(context, exc, "PushState")

    # ---------------------------------------------------------------- inference
    def Describe(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            self._authorize(context)
            req = self._parse(spb.DescribeRequest, data)
            half = self._half(req.fingerprint)
            with half.mutex:
                digest, version = half.digest(), half.version
            return spb.DescribeReply(
                protocol_version=PROTOCOL_VERSION, fingerprint=half.fingerprint,
                config_json=json.dumps(half.cfg.to_dict()), num_classes=half.num_classes,
                in_channels=half.in_channels, wire_shape=list(half.geometry.wire_shape), weights_sha256=digest,
                version=version, max_batch=half.worker.spec.max_batch, read_only=half.read_only,
                attached_clients=len(half.attached)).SerializeToString()
        except Exception as exc:  # noqa: BLE001
            self._fail(context, exc, "Describe")

    def Infer(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            start = time.perf_counter()
            self._authorize(context)
            req = self._parse(spb.InferRequest, data)
            half = self._half(req.fingerprint)
            if not 1 <= req.budget <= half.channels:
                raise _invalid(R.BUDGET_EXCEEDED, f"budget must be 1..{half.channels}, got {req.budget}")
            k = kept_count(req.eval.activations)
            if k > req.budget:
                raise _invalid(R.BUDGET_EXCEEDED, f"{k} channels sent but the request's budget is {req.budget}")
            reply = half.worker.evaluate(req.eval)
            self.count("infer")
            return spb.InferReply(eval=reply, server_ms=(time.perf_counter() - start) * 1e3).SerializeToString()
        except Exception as exc:  # noqa: BLE001
            self._fail(context, exc, "Infer")

    # ---------------------------------------------------------------- housekeeping
    def attached(self) -> int:
        with self.registry:
            return sum(len(h.attached) for h in self.halves.values())

    def reap_idle(self) -> int:
        """Cancel streams idle for longer than idle_timeout_s (their clients may reconnect)."""
        now = time.monotonic()
        with self.registry:
            idle = [s for s in self.sessions.values()
                    if not s.busy and now - s.last_activity > self.idle_timeout_s]
        for s in idle:
            log.info("session %s: client %s idle for %.0f s, dropped", s.id[:8], s.client_id, now - s.last_activity)
            s.context.cancel()
        return len(idle)

    def _half_folder(self, half: HostedHalf) -> Path:
        return self.checkpoint / "halves" / half.fingerprint

    def save_all(self, force: bool = False) -> int:
        """Write every changed half atomically (a consistent snapshot, taken between steps)."""
        if self.checkpoint is None:
            return 0
        written = 0
        with self.save_lock:
            with self.registry:
                halves = [h for h in self.halves.values() if not h.read_only]
            for half in halves:
                with half.mutex:
                    if half.version == half.saved_version and not force:
                        continue
                    model, state, meta = half.snapshot()
                    version = half.version
                write_checkpoint(self._half_folder(half), model, meta, state)
                half.saved_version = version
                written += 1
        return written

    def _load_all(self) -> None:
        root = self.checkpoint / "halves"
        if not root.is_dir():
            return
        names = {p.name.removesuffix(".old") for p in root.iterdir() if p.is_dir() and not p.name.endswith(".tmp")}
        for name in sorted(names):
            if not _FP_RE.match(name):
                continue
            folder = root / name
            if not (folder / "meta.json").exists() and (root / f"{name}.old" / "meta.json").exists():
                shutil.move(str(root / f"{name}.old"), str(folder))  # a save was cut between its two renames
            try:
                half = HostedHalf.from_folder(folder, self.accelerator)
            except UserError as exc:
                raise UserError(f"cannot resume the server half in {folder}: {exc}") from None
            if half.fingerprint in self.halves:
                raise UserError(f"model {half.fingerprint} is both in --checkpoint and given with --model")
            self.halves[half.fingerprint] = half
            log.info("resumed server half %s from %s (version %d, %d clients)", half.fingerprint, folder,
                     half.version, len(half.clients))

    def background(self) -> None:
        """Periodic saves and idle-session reaping, until stop()."""
        last_save = time.monotonic()
        while not self._stop.wait(min(1.0, self.idle_timeout_s / 2, self.save_every_s)):
            self.reap_idle()
            if self.checkpoint is not None and time.monotonic() - last_save >= self.save_every_s:
                try:
                    self.save_all()
                except Exception:  # noqa: BLE001 - a failed save must not kill the server
                    log.exception("periodic save failed")
                last_save = time.monotonic()

    def stop_background(self) -> None:
        self._stop.set()


def _chain(first, rest):
    yield first
    yield from rest


class ServerHandle:
    """A running server: its address, and a stop() that drains, saves and shuts down."""

    def __init__(self, servicer: SplitServer, server: grpc.Server, address: tuple[str, int], tls: bool) -> None:
        self.servicer, self.server, self.tls = servicer, server, tls
        self.host, self.port = address
        self._thread = threading.Thread(target=servicer.background, name="splitprune-serve-bg", daemon=True)
        self._thread.start()
        self._stopped = False

    @property
    def address(self) -> str:
        return format_hostport((self.host, self.port))

    def stop(self, grace: float = 2.0) -> None:
        """Stop taking steps, save every half, then end all calls (clients get UNAVAILABLE and may resume)."""
        if self._stopped:
            return
        self._stopped = True
        self.servicer.draining = True
        done = self.server.stop(grace)
        try:
            self.servicer.save_all()
        finally:
            self.servicer.stop_background()
            done.wait()
            self._thread.join(timeout=5)

    def wait(self, timeout: float | None = None) -> bool:
        return self.server.wait_for_termination(timeout)


def start_server(listen: str = f"{DEFAULT_HOST}:0", *, checkpoint: str | None = None, models: tuple[str, ...] = (),
                 token: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                 tls_client_ca: str | None = None, max_sessions: int = 16, max_halves: int = 8,
                 max_message: int = DEFAULT_MAX_MESSAGE, keepalive_s: float = 30.0, idle_timeout_s: float = 600.0,
                 save_every_s: float = 60.0, accelerator: str = "cpu") -> ServerHandle:
    """Start a server in this process (background threads) and return its handle."""
    host, port = parse_hostport(listen, default_host=DEFAULT_HOST)
    if token is not None and not token:
        raise UserError("the token must not be empty")
    credentials = server_credentials(tls_cert, tls_key, tls_client_ca)
    servicer = SplitServer(checkpoint, tuple(models), token, max_sessions, max_halves, max_message,
                           idle_timeout_s, save_every_s, accelerator)
    workers = max_sessions + 16
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="splitprune-rpc"),
                         handlers=(servicer.handler(),), options=server_options(max_message, keepalive_s),
                         maximum_concurrent_rpcs=4 * workers)
    target = format_hostport((host, port))
    try:
        bound = server.add_secure_port(target, credentials) if credentials else server.add_insecure_port(target)
    except RuntimeError as exc:
        raise UserError(f"cannot listen on {target}: {exc}") from None
    if not bound:
        raise UserError(f"cannot listen on {target} (address in use or not local?)")
    server.start()
    return ServerHandle(servicer, server, (host, bound), credentials is not None)
