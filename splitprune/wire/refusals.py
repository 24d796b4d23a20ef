"""Typed refusals: one exception class per ErrorReason of service.proto.

Validation raises these; the servicer maps a class to its gRPC status code and sends the reason's name
in the trailing metadata "splitprune-error". Nothing is classified by the text of a message. They are
ProtocolErrors, so code that knows nothing of the network (the in-process link) handles them as such.
"""
from __future__ import annotations

from splitprune.errors import ProtocolError


class Refusal(ProtocolError):
    """A request the server refuses: `status` is a grpc.StatusCode name, `reason` an ErrorReason name."""

    status = "INVALID_ARGUMENT"
    reason = "BAD_MESSAGE"


class BadMessage(Refusal):
    """Not the expected message, or a field out of its range."""

    status, reason = "INVALID_ARGUMENT", "BAD_MESSAGE"


class BadHandshake(Refusal):
    """Hello missing or inconsistent with the server or itself."""

    status, reason = "INVALID_ARGUMENT", "BAD_HANDSHAKE"


class VersionMismatch(Refusal):
    """A protocol version this server does not speak."""

    status, reason = "FAILED_PRECONDITION", "VERSION_MISMATCH"


class FingerprintMismatch(Refusal):
    """The fingerprint is not that of the config sent."""

    status, reason = "INVALID_ARGUMENT", "FINGERPRINT_MISMATCH"


class BadTensor(Refusal):
    """A tensor or labels that break a rule of section 2 or of the session."""

    status, reason = "INVALID_ARGUMENT", "BAD_TENSOR"


class BudgetExceeded(Refusal):
    """More channels than the budget allows."""

    status, reason = "INVALID_ARGUMENT", "BUDGET_EXCEEDED"


class StepOutOfOrder(Refusal):
    """A step id not above the last applied one (nor its retry)."""

    status, reason = "FAILED_PRECONDITION", "STEP_OUT_OF_ORDER"


class NoPhase(Refusal):
    """A training step before any phase."""

    status, reason = "FAILED_PRECONDITION", "NO_PHASE"


class UnknownModel(Refusal):
    """No server half with this fingerprint is hosted."""

    status, reason = "NOT_FOUND", "UNKNOWN_MODEL"


class UnknownSession(Refusal):
    """No open Train stream with this session id."""

    status, reason = "NOT_FOUND", "UNKNOWN_SESSION"


class ReadOnlyModel(Refusal):
    """A half hosted for inference only."""

    status, reason = "FAILED_PRECONDITION", "READ_ONLY_MODEL"


class BadState(Refusal):
    """A pushed state that does not fit the half."""

    status, reason = "INVALID_ARGUMENT", "BAD_STATE"


class Unauthenticated(Refusal):
    """A missing or wrong bearer token."""

    status, reason = "UNAUTHENTICATED", "UNAUTHENTICATED_TOKEN"


class TooManySessions(Refusal):
    """The session or model limit is reached."""

    status, reason = "RESOURCE_EXHAUSTED", "TOO_MANY_SESSIONS"


class TooLarge(Refusal):
    """A message or state over its size limit."""

    status, reason = "RESOURCE_EXHAUSTED", "TOO_LARGE"


class ShuttingDown(Refusal):
    """The server is stopping (it saves its state first)."""

    status, reason = "UNAVAILABLE", "SHUTTING_DOWN"


class SessionReplaced(Refusal):
    """A newer stream of the same client took over."""

    status, reason = "ABORTED", "SESSION_REPLACED"


class ServerBusy(Refusal):
    """The server-wide memory budget for requests in flight stayed full (serve --max-inflight-mb)."""

    status, reason = "RESOURCE_EXHAUSTED", "SERVER_BUSY"


class NoCheckpoint(Refusal):
    """No server-side checkpoint with this step id and digest."""

    status, reason = "FAILED_PRECONDITION", "NO_CHECKPOINT"


REFUSALS: dict[str, type[Refusal]] = {cls.reason: cls for cls in Refusal.__subclasses__()}
