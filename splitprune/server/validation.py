"""Checks of every field the server receives, against its type and against the session; typed refusals.

Tensor and label rules, the budget, the lr and phase settings live in ServerWorker (training/server_worker.py),
which applies them once for in-process and network training alike; this module checks what only a
network session has: the handshake, step and phase numbers, checkpoint requests, inference budgets.
Everything here runs before the server allocates anything for the request.
"""
from __future__ import annotations

import json
import re
from typing import TypeVar

from google.protobuf.message import Message

from splitprune.compression.codec import WIRE_DTYPES
from splitprune.config import RunConfig, make_config, resolve_schedule
from splitprune.errors import UserError
from splitprune.models import check_model
from splitprune.proto import service_pb2 as spb
from splitprune.wire.envelopes import CLIENT_ID_RE, PROTOCOL_VERSION
from splitprune.wire.refusals import BadHandshake, BadMessage, BudgetExceeded, FingerprintMismatch, VersionMismatch

M = TypeVar("M", bound=Message)
MAX_STEP_ID = (1 << 63) - 1  # step ids are saved as int64
MAX_CONFIG_JSON = 64 * 1024  # a run configuration is about 1 KiB
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def parse(cls: type[M], data: bytes) -> M:
    msg = cls()
    try:
        msg.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError and others on garbage
        raise BadMessage(f"malformed {cls.__name__}: {exc}") from None
    return msg


def check_hello(hello: spb.Hello, max_message: int) -> RunConfig:
    """The handshake's own fields, and a config whose cut tensor could fit a message (nothing built yet)."""
    if hello.protocol_version != PROTOCOL_VERSION:
        raise VersionMismatch(f"protocol version {hello.protocol_version} is not supported; "
                              f"this server speaks version {PROTOCOL_VERSION}")
    if not CLIENT_ID_RE.match(hello.client_id):
        raise BadHandshake("client_id must be 1-128 characters of A-Z a-z 0-9 . _ : -")
    if len(hello.config_json) > MAX_CONFIG_JSON:
        raise BadHandshake(f"config_json of {len(hello.config_json)} characters exceeds {MAX_CONFIG_JSON}")
    try:
        values = json.loads(hello.config_json)
    except (ValueError, RecursionError) as exc:
        raise BadHandshake(f"config_json is not valid JSON: {exc}") from None
    if not isinstance(values, dict):
        raise BadHandshake("config_json must be a JSON object")
    try:
        cfg = make_config(values)
        fingerprint = cfg.fingerprint()
    except (UserError, TypeError, ValueError) as exc:
        raise BadHandshake(f"bad config: {exc}") from None
    cfg.weights = None  # a path on the client's machine: the server uses its own files (serve --weights)
    if hello.fingerprint and fingerprint != hello.fingerprint:  # empty: the client lets the server compute it
        raise FingerprintMismatch(f"fingerprint {hello.fingerprint[:32]!r} is not that of the config sent "
                                  f"({fingerprint})")
    if not 2 <= hello.num_classes <= 65535:
        raise BadHandshake(f"num_classes must be 2..65535, got {hello.num_classes}")
    if hello.in_channels not in (1, 3):
        raise BadHandshake(f"in_channels must be 1 or 3, got {hello.in_channels}")
    for side, declared, configured in (("up", hello.dtype_up, cfg.dtype_up), ("down", hello.dtype_down, cfg.dtype_down)):
        if configured not in WIRE_DTYPES or declared != WIRE_DTYPES[configured]:
            raise BadHandshake(f"dtype_{side} {declared} differs from the config's {configured}")
    if hello.resume_step_id > MAX_STEP_ID:
        raise BadHandshake(f"resume_step_id must be below 2^63, got {hello.resume_step_id}")
    if hello.resume_step_id and hello.fresh_start:
        raise BadHandshake("fresh_start and resume_step_id exclude each other")
    if hello.continue_step_id > MAX_STEP_ID:
        raise BadHandshake(f"continue_step_id must be below 2^63, got {hello.continue_step_id}")
    if hello.resume_state_sha256 and not _SHA256_RE.match(hello.resume_state_sha256):
        raise BadHandshake("resume_state_sha256 must be 64 lowercase hexadecimal digits")
    return cfg


def check_buildable(cfg: RunConfig, num_classes: int, in_channels: int, max_message: int) -> None:
    """Before a new half is built (its model allowed): the model can be cut as asked, and one sample's cut tensor
    fits a message (computed on the meta device)."""
    try:
        c, h, w = check_model(cfg.model, cfg.split, num_classes, in_channels, cfg.input_size)
    except (UserError, TypeError, ValueError) as exc:
        raise BadHandshake(f"cannot build the server half: {exc}") from None
    if c * h * w * 4 > max_message:
        raise BadHandshake(f"one cut tensor of {c}x{h}x{w} float32 values would exceed the server's message "
                           f"limit of {max_message} bytes")


def check_session(hello: spb.Hello, half) -> None:
    """A Hello against the half it joins (a HostedHalf)."""
    if (half.num_classes, half.in_channels) != (hello.num_classes, hello.in_channels):
        raise BadHandshake(f"the server half has {half.num_classes} classes and {half.in_channels} input "
                           f"channels, the client {hello.num_classes} and {hello.in_channels}")
    wire = list(half.geometry.wire_shape)
    if hello.wire_shape and list(hello.wire_shape) != wire:
        raise BadHandshake(f"client expects wire shape {list(hello.wire_shape)}, the model has {wire}")
    if hello.max_budget > half.channels:
        raise BadHandshake(f"max_budget {hello.max_budget} exceeds the {half.channels} channels")
    for kind, size, limit in (("training", half.cfg.batch_size, half.max_train_batch),
                              ("evaluation", half.cfg.test_batch_size, half.max_batch)):
        if size > limit:
            raise BadHandshake(f"the config's {kind} batch of {size} samples exceeds this server's largest "
                               f"{kind} batch for this model, {limit} (serve --max-batch, --max-request-mb)")


def check_phase_number(phase: int, cfg: RunConfig, channels: int) -> None:
    """A phase index must name a phase of the config's schedule (so it also fits Welcome's int32)."""
    try:
        count = len(resolve_schedule(cfg, channels))
    except UserError as exc:
        raise BadMessage(f"the config's schedule is invalid: {exc}") from None
    if phase >= count:
        raise BadMessage(f"phase {phase} does not exist: the config's schedule has {count} phase(s)")


def check_step_id(step_id: int, what: str = "step_id") -> None:
    if step_id > MAX_STEP_ID:
        raise BadMessage(f"{what} must be below 2^63, got {step_id}")


def check_infer_budget(budget: int, channels: int) -> None:
    if not 1 <= budget <= channels:
        raise BudgetExceeded(f"budget must be 1..{channels}, got {budget}")
