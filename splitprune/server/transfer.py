"""State transfer (FetchState, PushState) and split inference (Describe, Infer): the requests outside
the Train stream (docs/protocol.md, sections 4 and 5)."""
from __future__ import annotations

import json
import logging
import time
from typing import Iterator

from splitprune.errors import ProtocolError
from splitprune.proto import service_pb2 as spb
from splitprune.server.hosting import ClientRecord
from splitprune.server.service import SplitService, request_memory
from splitprune.server.validation import check_infer_budget, check_step_id
from splitprune.training.checkpoint import state_from_bytes
from splitprune.wire.envelopes import PROTOCOL_VERSION, STATE_CHUNK, join_chunks, state_chunks
from splitprune.wire.refusals import BadMessage, BadState

log = logging.getLogger("splitprune.serve")


def fetch_state(service: SplitService, req: spb.FetchStateRequest) -> Iterator[spb.StateChunk]:
    half = service.sessions.get(req.session_id).half
    with half.mutex:
        unchanged = req.known_version == half.version
        version, blob = (half.version, b"") if unchanged else half.state_bytes()
    if unchanged:
        yield spb.StateChunk(version=version, unchanged=True)
        return
    yield from state_chunks(blob, spb.StateChunk(version=version), STATE_CHUNK)


def _chain(first: spb.StateChunk, rest: Iterator[spb.StateChunk]) -> Iterator[spb.StateChunk]:
    yield first
    yield from rest


def push_state(service: SplitService, chunks: Iterator[spb.StateChunk]) -> spb.PushStateReply:
    first = next(chunks, None)
    if first is None:
        raise BadMessage("empty state push")
    check_step_id(first.step_id)
    s = service.sessions.get(first.session_id)
    half = s.half
    _, blob = join_chunks(_chain(first, chunks), half.state_limit())
    try:
        tensors = state_from_bytes(blob)
    except ProtocolError as exc:
        raise BadState(str(exc)) from None
    half.check_state(tensors)
    with half.mutex:
        service.check_draining()
        others = service.sessions.others(half, s.client_id)
        half.clients[s.client_id] = ClientRecord(last_step=first.step_id)
        if others:
            note, applied = f"kept the shared server half: {len(others)} other client(s) are training it", False
        else:
            half.load_state(tensors)
            note, applied = "server half restored from the client's checkpoint", True
        reply = spb.PushStateReply(applied=applied, note=note, version=half.version, last_step_id=first.step_id)
    log.info("session %s: state push at step %d: %s", s.id[:8], first.step_id, note)
    return reply


def describe(service: SplitService, req: spb.DescribeRequest) -> spb.DescribeReply:
    half = service.half(req.fingerprint)
    with half.mutex:
        digest, version = half.digest(), half.version
    return spb.DescribeReply(
        protocol_version=PROTOCOL_VERSION, fingerprint=half.fingerprint, config_json=json.dumps(half.cfg.to_dict()),
        num_classes=half.num_classes, in_channels=half.in_channels, wire_shape=list(half.geometry.wire_shape),
        weights_sha256=digest, version=version, max_batch=half.max_batch, read_only=half.read_only,
        attached_clients=service.sessions.attached(half), max_train_batch=half.max_train_batch,
        session_port=service.session_port)


def infer(service: SplitService, req: spb.InferRequest) -> spb.InferReply:
    start = time.perf_counter()
    half = service.half(req.fingerprint)
    check_infer_budget(req.budget, half.channels)
    with service.admission.hold(request_memory(half, req.eval.activations)):
        if service.batching.evaluates:
            reply = service.batching.evaluate(half, req.eval, None, req.budget)
        else:
            with half.mutex:
                reply = half.worker.evaluate(req.eval, max_kept=req.budget)
    service.count("infer")
    return spb.InferReply(eval=reply, server_ms=(time.perf_counter() - start) * 1e3)
