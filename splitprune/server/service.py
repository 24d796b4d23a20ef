"""The protocol behind the servicer: sessions on shared halves, phases, steps, evaluation and
server-side checkpoints of the Train stream (docs/protocol.md, section 3).

Requests arrive parsed; failures are typed refusals (wire/refusals.py). Every update of a half
happens under its one mutex, which is never held while waiting for a client.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable

from splitprune.config import RunConfig
from splitprune.errors import UserError
from splitprune.models import file_digest
from splitprune.proto import pb
from splitprune.proto import service_pb2 as spb
from splitprune.server.admission import Admission
from splitprune.server.batching import Batching
from splitprune.server.config import ServeConfig
from splitprune.server.hosting import ClientRecord, HostedHalf
from splitprune.server.sessions import Session, SessionRegistry, stored_reply
from splitprune.server.store import HalfStore
from splitprune.server.validation import check_buildable, check_hello, check_phase_number, check_session, check_step_id
from splitprune.wire.envelopes import (CALIBRATE, CHECKPOINT, EVAL, PHASE, PROTOCOL_VERSION, TRAIN, WELCOME, frame,
                                       request_digest)
from splitprune.wire.refusals import (BadHandshake, BadMessage, NoCheckpoint, ReadOnlyModel, ShuttingDown,
                                      StepOutOfOrder, TooManySessions, UnknownModel)

log = logging.getLogger("splitprune.serve")


class SplitService:
    """The hosted halves, the sessions on them, and what the Train stream's messages do to them."""

    def __init__(self, config: ServeConfig, shared_checkpoints: str | None = None) -> None:
        """`shared_checkpoints`: the clients' checkpoint folder shared by the replicas of a tier."""
        self.config = config
        self.halves: dict[str, HostedHalf] = {}
        self.halves_lock = threading.Lock()
        self.sessions = SessionRegistry(config.max_sessions)
        self.persistent = config.checkpoint is not None
        self.draining = False
        self.counters = {"steps": 0, "retried_steps": 0, "sessions": 0, "errors": 0, "infer": 0, "checkpoints": 0}
        self._count_lock = threading.Lock()
        self.tier = None  # replicas.Tier when this server is one replica of a tier (serve --distributed)
        self.session_port = 0  # the bound --session-port (0: none), announced by Describe
        self.infer_streams = threading.BoundedSemaphore(config.max_sessions)  # open InferStream sessions
        self.batching = Batching(config, self.check_draining, self._applied)
        self.admission = Admission(config.inflight_bytes, config.admission_wait)
        self.weights_files = {file_digest(path): path for path in config.weights}
        for path in config.model:
            self._add(HostedHalf.from_model(path, **self._half_options()))
        if self.persistent:
            self.store = HalfStore(Path(config.checkpoint), Path(shared_checkpoints) if shared_checkpoints else None)
            for half in self.store.load_all(**self._half_options()):
                self._add(half)
        else:  # made last: nothing above can fail and leave it behind
            self.store = HalfStore(Path(tempfile.mkdtemp(prefix="splitprune-serve-")))

    def _half_options(self) -> dict:
        c = self.config
        return {"accelerator": c.accelerator, "max_batch": c.max_batch, "request_memory": c.request_bytes,
                "weights_files": self.weights_files}

    def _add(self, half: HostedHalf) -> None:
        if half.fingerprint in self.halves:
            raise UserError(f"two models share the config fingerprint {half.fingerprint}; serve one of them")
        self.halves[half.fingerprint] = half

    def count(self, name: str) -> None:
        with self._count_lock:
            self.counters[name] += 1

    def attached(self) -> int:
        return self.sessions.attached()

    def half(self, fingerprint: str) -> HostedHalf:
        with self.halves_lock:
            half = self.halves.get(fingerprint)
        if half is None:
            raise UnknownModel(f"this server hosts no model with fingerprint {fingerprint[:32]!r}; "
                               "serve its checkpoint with `splitprune serve --model DIR`")
        return half

    def check_draining(self) -> None:
        if self.draining:
            raise ShuttingDown("the server is shutting down; it saves its state: reconnect to resume")

    # ---------------------------------------------------------------- handshake
    def _get_or_build(self, cfg: RunConfig, hello: spb.Hello) -> HostedHalf:
        fingerprint = cfg.fingerprint()
        with self.halves_lock:
            half = self.halves.get(fingerprint)
            count = len(self.halves)
        if half is None:
            if count >= self.config.max_models:
                raise TooManySessions(f"this server already hosts {count} models (limit {self.config.max_models})")
            if not self.config.allows(cfg.model):
                raise BadHandshake(f"this server does not build model {cfg.model} for clients: start it with "
                                   f"--allow-model {cfg.model}")
            if cfg.weights_sha256 and cfg.weights_sha256 not in self.weights_files:
                raise BadHandshake(f"this run starts from weights with SHA-256 {cfg.weights_sha256[:16]}..., which "
                                   "this server was not given: start it with --weights FILE")
            check_buildable(cfg, hello.num_classes, hello.in_channels, self.config.max_message_bytes)
            try:
                built = HostedHalf(cfg, hello.num_classes, hello.in_channels, **self._half_options())
            except UserError as exc:
                raise BadHandshake(f"cannot build the server half: {exc}") from None
            with self.halves_lock:
                half = self.halves.setdefault(fingerprint, built)
            if half is built:
                log.info("new server half %s: %s %s cut at %s, wire %s, largest batch %d (training %d)",
                         fingerprint, cfg.method, cfg.model, cfg.split, list(half.geometry.wire_shape),
                         half.max_batch, half.max_train_batch)
        if half.read_only:
            raise ReadOnlyModel(f"model {fingerprint} is hosted for inference only (--model); it cannot be trained")
        return half

    def open(self, msg: spb.ClientMessage, peer: str, cancel: Callable[[], object]) -> tuple[Session, bytes]:
        """A Hello: attach a session to its half (restoring a checkpoint when asked); the framed Welcome."""
        if msg.WhichOneof("body") != "hello":
            raise BadHandshake("the first message of a Train stream must be a Hello")
        hello = msg.hello
        cfg = check_hello(hello, self.config.max_message_bytes)
        if hello.resume_step_id and cfg.fingerprint() not in self.halves and not self.store.has_checkpoint(
                cfg.fingerprint(), hello.client_id, hello.resume_step_id, hello.resume_state_sha256):
            raise self._no_checkpoint(hello)  # nothing to resume here: no half is built for it
        half = self._get_or_build(cfg, hello)
        check_session(hello, half)
        if self.tier is not None:
            self.tier.admit(half)  # a half new to this replica first takes the tier's state
        session = Session(hello.client_id, half, cancel, hello.dtype_up, hello.max_budget or half.channels, peer)
        restored = ""
        with half.mutex:
            self.check_draining()
            self.sessions.check_room(half, hello.client_id)
            others = self.sessions.others(half, hello.client_id)
            if hello.resume_step_id:
                restored = self._resume(half, hello, alone=not others)
            elif hello.continue_step_id and self.tier is not None:
                self._continue(half, hello)
            elif hello.fresh_start:
                if not others and half.version > 1:  # a new run on a half nobody else is training
                    half.reset()
                    self.sessions.log("half %s re-initialised for a new run of %s", half.fingerprint,
                                      hello.client_id)
                half.clients[hello.client_id] = ClientRecord()
            record = half.record(hello.client_id, keep=others)
            old = self.sessions.attach(session)
            welcome = spb.Welcome(
                protocol_version=PROTOCOL_VERSION, session_id=session.id, fingerprint=half.fingerprint,
                wire_shape=list(half.geometry.wire_shape), last_step_id=record.last_step, phase=half.phase,
                budget=half.budget, attached_clients=self.sessions.attached(half),
                max_message_bytes=self.config.max_message_bytes, version=half.version, state_sha256=restored)
        if old is not None:
            old.cancel()
        self.count("sessions")
        how = " (fresh start)" if hello.fresh_start else (
            f" (resumed at step {hello.resume_step_id})" if hello.resume_step_id else "")
        self.sessions.log("session %s: client %s from %s on half %s (%d attached), last step %d%s", session.id[:8],
                          hello.client_id, peer, half.fingerprint, welcome.attached_clients, record.last_step, how)
        return session, frame(WELCOME, welcome.SerializeToString())

    def _resume(self, half: HostedHalf, hello: spb.Hello, alone: bool) -> str:
        """Restore the checkpoint saved at hello.resume_step_id (mutex held); its digest, or "" when the half
        is shared with attached clients and was kept (the client's step count is set either way)."""
        found = self.store.read_checkpoint(half, hello.client_id, hello.resume_step_id, hello.resume_state_sha256)
        if found is None:
            raise self._no_checkpoint(hello)
        tensors, phase, digest = found
        half.clients[hello.client_id] = ClientRecord(last_step=hello.resume_step_id)
        if not alone:
            self.sessions.log("half %s: client %s resumes at step %d on the shared half (kept: others train it)",
                              half.fingerprint, hello.client_id, hello.resume_step_id)
            return ""
        half.check_state(tensors)
        if phase is None:
            half.worker.optimizer, half.phase_req = None, None
        half.load_state(tensors, phase)
        self.sessions.log("half %s: restored from the checkpoint of client %s at step %d", half.fingerprint,
                          hello.client_id, hello.resume_step_id)
        return digest

    def _continue(self, half: HostedHalf, hello: spb.Hello) -> None:
        """A client of a lost replica continues here at its own step (mutex held): the tier's half is shared, so
        only this client's step count moves; what the lost replica applied since the last synchronisation is
        not in this half."""
        record = half.clients.get(hello.client_id)
        if record is None or record.last_step < hello.continue_step_id:
            half.clients[hello.client_id] = ClientRecord(last_step=hello.continue_step_id)
            self.sessions.log("half %s: client %s continues at step %d on this replica (its replica was lost)",
                              half.fingerprint, hello.client_id, hello.continue_step_id)

    def _no_checkpoint(self, hello: spb.Hello) -> NoCheckpoint:
        hint = "" if self.persistent else " (this server keeps checkpoints only while it runs: serve --checkpoint DIR)"
        return NoCheckpoint(f"this server holds no checkpoint of client {hello.client_id} at step "
                            f"{hello.resume_step_id}" + (f" with digest {hello.resume_state_sha256[:12]}..."
                                                         if hello.resume_state_sha256 else "") + hint)

    def close(self, session: Session) -> None:
        self.sessions.detach(session)

    # ---------------------------------------------------------------- requests
    def handle(self, s: Session, msg: spb.ClientMessage) -> bytes:
        s.check_current()
        kind = msg.WhichOneof("body")
        if kind == "train":
            with self.admission.hold(request_memory(s.half, msg.train.activations, train=True)):
                return self._train(s, msg.train)
        if kind == "eval":
            with self.admission.hold(request_memory(s.half, msg.eval.activations)):
                if self.batching.evaluates:
                    out = self.batching.evaluate(s.half, msg.eval, s.dtype_up, s.kept_limit)
                else:
                    with s.half.mutex:
                        out = s.half.worker.evaluate(msg.eval, s.dtype_up, s.kept_limit)
            return frame(EVAL, out.SerializeToString())
        if kind == "phase":
            return self._phase(s, msg.phase)
        if kind == "calibrate":
            with self.admission.hold(request_memory(s.half, msg.calibrate.activations)), s.half.mutex:
                self.check_draining()
                out = s.half.worker.calibrate(msg.calibrate, s.dtype_up, s.kept_limit)
                s.half.bump()  # its BatchNorm statistics changed
            return frame(CALIBRATE, out.SerializeToString())
        if kind == "checkpoint":
            return self._checkpoint(s, msg.checkpoint)
        if kind == "hello":
            raise BadMessage("a stream carries one Hello, as its first message")
        raise BadMessage("empty ClientMessage")

    def _train(self, s: Session, req: pb.TrainRequest) -> bytes:
        half = s.half
        check_step_id(req.step_id)
        digest = request_digest(req)
        if self.batching.trains:
            out, applied = self.batching.train(s, req, digest)  # a retry comes back not applied
            self.count("steps" if applied else "retried_steps")
            s.steps += applied
            return out
        with half.mutex:
            self.check_draining()
            s.check_current()
            record = half.record(s.client_id)
            retry = stored_reply(record, req.step_id, digest)
            if retry is not None:
                self.count("retried_steps")
                return retry  # a retry of the step already applied: same answer, not applied twice
            reply = half.worker.train(req, s.dtype_up, s.max_budget)
            out = frame(TRAIN, reply.SerializeToString())
            record.last_step, record.digest, record.reply = req.step_id, digest, out
            half.bump()
            self._applied(half, req.activations.shape[0])
        s.steps += 1
        self.count("steps")
        return out

    def _applied(self, half: HostedHalf, samples: int) -> None:
        if self.tier is not None:
            self.tier.applied(half, samples)  # the tier weighs each replica by the samples it trained

    def _phase(self, s: Session, req: pb.PhaseRequest) -> bytes:
        half = s.half
        check_phase_number(req.phase, half.cfg, half.channels)
        with half.mutex:
            self.check_draining()
            if half.start_phase(req):
                self.sessions.log("half %s: phase %d, budget %d, lr %g, momentum %g", half.fingerprint, req.phase,
                                  half.budget, req.lr, req.momentum)
        return frame(PHASE, pb.PhaseReply(phase=req.phase).SerializeToString())

    def _checkpoint(self, s: Session, req: spb.CheckpointRequest) -> bytes:
        half = s.half
        check_step_id(req.step_id)
        with half.mutex:
            self.check_draining()
            record = half.record(s.client_id)
            if req.step_id < record.last_step:
                raise StepOutOfOrder(f"checkpoint at step {req.step_id}, but this client's last applied step is "
                                     f"{record.last_step}")
            version, data = half.state_bytes()
            phase = half.phase_req
        saved = self.store.save_checkpoint(half.fingerprint, s.client_id, req.step_id, version, data, phase,
                                           keep=req.keep)
        self.count("checkpoints")
        self.sessions.log("half %s: checkpoint of client %s at step %d (%d bytes)", half.fingerprint, s.client_id,
                          saved.step_id, saved.size)
        reply = spb.CheckpointReply(step_id=saved.step_id, version=saved.version, state_sha256=saved.sha256,
                                    state_bytes=saved.size)
        return frame(CHECKPOINT, reply.SerializeToString())

    # ---------------------------------------------------------------- persistence
    def save_all(self) -> int:
        """Write every changed trainable half (only with a --checkpoint folder)."""
        if not self.persistent:
            return 0
        with self.halves_lock:
            halves = [h for h in self.halves.values() if not h.read_only]
        return sum(self.store.save(h) for h in halves)

    def discard_temporary(self) -> None:
        """Without --checkpoint, checkpoints live in a temporary folder for the server's lifetime."""
        if not self.persistent:
            shutil.rmtree(self.store.root, ignore_errors=True)


def request_memory(half: HostedHalf, activations: pb.EncodedTensor, train: bool = False) -> int:
    """What a request's batch may make the half allocate (its per-sample estimate times the batch, the batch
    capped at the half's limit: a larger one is refused by validation)."""
    limit = half.max_train_batch if train else half.max_batch
    batch = min(activations.shape[0], limit) if len(activations.shape) else 0
    return batch * (half.train_sample_bytes if train else half.sample_bytes)
