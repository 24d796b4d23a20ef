from splitprune.proto import splitprune_pb2 as _splitprune_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    BAD_MESSAGE: _ClassVar[ErrorReason]
    BAD_HANDSHAKE: _ClassVar[ErrorReason]
    VERSION_MISMATCH: _ClassVar[ErrorReason]
    FINGERPRINT_MISMATCH: _ClassVar[ErrorReason]
    BAD_TENSOR: _ClassVar[ErrorReason]
    BUDGET_EXCEEDED: _ClassVar[ErrorReason]
    STEP_OUT_OF_ORDER: _ClassVar[ErrorReason]
    NO_PHASE: _ClassVar[ErrorReason]
    UNKNOWN_MODEL: _ClassVar[ErrorReason]
    UNKNOWN_SESSION: _ClassVar[ErrorReason]
    READ_ONLY_MODEL: _ClassVar[ErrorReason]
    BAD_STATE: _ClassVar[ErrorReason]
    UNAUTHENTICATED_TOKEN: _ClassVar[ErrorReason]
    TOO_MANY_SESSIONS: _ClassVar[ErrorReason]
    TOO_LARGE: _ClassVar[ErrorReason]
    SHUTTING_DOWN: _ClassVar[ErrorReason]
    SESSION_REPLACED: _ClassVar[ErrorReason]
    INTERNAL_ERROR: _ClassVar[ErrorReason]
    NO_CHECKPOINT: _ClassVar[ErrorReason]
    SERVER_BUSY: _ClassVar[ErrorReason]
ERROR_REASON_UNSPECIFIED: ErrorReason
BAD_MESSAGE: ErrorReason
BAD_HANDSHAKE: ErrorReason
VERSION_MISMATCH: ErrorReason
FINGERPRINT_MISMATCH: ErrorReason
BAD_TENSOR: ErrorReason
BUDGET_EXCEEDED: ErrorReason
STEP_OUT_OF_ORDER: ErrorReason
NO_PHASE: ErrorReason
UNKNOWN_MODEL: ErrorReason
UNKNOWN_SESSION: ErrorReason
READ_ONLY_MODEL: ErrorReason
BAD_STATE: ErrorReason
UNAUTHENTICATED_TOKEN: ErrorReason
TOO_MANY_SESSIONS: ErrorReason
TOO_LARGE: ErrorReason
SHUTTING_DOWN: ErrorReason
SESSION_REPLACED: ErrorReason
INTERNAL_ERROR: ErrorReason
NO_CHECKPOINT: ErrorReason
SERVER_BUSY: ErrorReason

class Hello(_message.Message):
    __slots__ = ("protocol_version", "client_id", "fingerprint", "config_json", "num_classes", "in_channels", "wire_shape", "dtype_up", "dtype_down", "max_budget", "fresh_start", "resume_step_id", "resume_state_sha256", "continue_step_id")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    IN_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    WIRE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_UP_FIELD_NUMBER: _ClassVar[int]
    DTYPE_DOWN_FIELD_NUMBER: _ClassVar[int]
    MAX_BUDGET_FIELD_NUMBER: _ClassVar[int]
    FRESH_START_FIELD_NUMBER: _ClassVar[int]
    RESUME_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_STATE_SHA256_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    client_id: str
    fingerprint: str
    config_json: str
    num_classes: int
    in_channels: int
    wire_shape: _containers.RepeatedScalarFieldContainer[int]
    dtype_up: _splitprune_pb2.DType
    dtype_down: _splitprune_pb2.DType
    max_budget: int
    fresh_start: bool
    resume_step_id: int
    resume_state_sha256: str
    continue_step_id: int
    def __init__(self, protocol_version: _Optional[int] = ..., client_id: _Optional[str] = ..., fingerprint: _Optional[str] = ..., config_json: _Optional[str] = ..., num_classes: _Optional[int] = ..., in_channels: _Optional[int] = ..., wire_shape: _Optional[_Iterable[int]] = ..., dtype_up: _Optional[_Union[_splitprune_pb2.DType, str]] = ..., dtype_down: _Optional[_Union[_splitprune_pb2.DType, str]] = ..., max_budget: _Optional[int] = ..., fresh_start: _Optional[bool] = ..., resume_step_id: _Optional[int] = ..., resume_state_sha256: _Optional[str] = ..., continue_step_id: _Optional[int] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("protocol_version", "session_id", "fingerprint", "wire_shape", "last_step_id", "phase", "budget", "attached_clients", "max_message_bytes", "version", "state_sha256")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    WIRE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_SHA256_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    session_id: str
    fingerprint: str
    wire_shape: _containers.RepeatedScalarFieldContainer[int]
    last_step_id: int
    phase: int
    budget: int
    attached_clients: int
    max_message_bytes: int
    version: int
    state_sha256: str
    def __init__(self, protocol_version: _Optional[int] = ..., session_id: _Optional[str] = ..., fingerprint: _Optional[str] = ..., wire_shape: _Optional[_Iterable[int]] = ..., last_step_id: _Optional[int] = ..., phase: _Optional[int] = ..., budget: _Optional[int] = ..., attached_clients: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., version: _Optional[int] = ..., state_sha256: _Optional[str] = ...) -> None: ...

class ClientMessage(_message.Message):
    __slots__ = ("hello", "phase", "train", "eval", "checkpoint", "calibrate")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    CALIBRATE_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    phase: _splitprune_pb2.PhaseRequest
    train: _splitprune_pb2.TrainRequest
    eval: _splitprune_pb2.EvalRequest
    checkpoint: CheckpointRequest
    calibrate: _splitprune_pb2.CalibrateRequest
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., phase: _Optional[_Union[_splitprune_pb2.PhaseRequest, _Mapping]] = ..., train: _Optional[_Union[_splitprune_pb2.TrainRequest, _Mapping]] = ..., eval: _Optional[_Union[_splitprune_pb2.EvalRequest, _Mapping]] = ..., checkpoint: _Optional[_Union[CheckpointRequest, _Mapping]] = ..., calibrate: _Optional[_Union[_splitprune_pb2.CalibrateRequest, _Mapping]] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("welcome", "phase", "train", "eval", "checkpoint", "calibrate")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    CALIBRATE_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    phase: _splitprune_pb2.PhaseReply
    train: _splitprune_pb2.TrainReply
    eval: _splitprune_pb2.EvalReply
    checkpoint: CheckpointReply
    calibrate: _splitprune_pb2.CalibrateReply
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., phase: _Optional[_Union[_splitprune_pb2.PhaseReply, _Mapping]] = ..., train: _Optional[_Union[_splitprune_pb2.TrainReply, _Mapping]] = ..., eval: _Optional[_Union[_splitprune_pb2.EvalReply, _Mapping]] = ..., checkpoint: _Optional[_Union[CheckpointReply, _Mapping]] = ..., calibrate: _Optional[_Union[_splitprune_pb2.CalibrateReply, _Mapping]] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("step_id", "keep")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    keep: bool
    def __init__(self, step_id: _Optional[int] = ..., keep: _Optional[bool] = ...) -> None: ...

class CheckpointReply(_message.Message):
    __slots__ = ("step_id", "version", "state_sha256", "state_bytes")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_SHA256_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    version: int
    state_sha256: str
    state_bytes: int
    def __init__(self, step_id: _Optional[int] = ..., version: _Optional[int] = ..., state_sha256: _Optional[str] = ..., state_bytes: _Optional[int] = ...) -> None: ...

class FetchStateRequest(_message.Message):
    __slots__ = ("session_id", "known_version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KNOWN_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    known_version: int
    def __init__(self, session_id: _Optional[str] = ..., known_version: _Optional[int] = ...) -> None: ...

class StateChunk(_message.Message):
    __slots__ = ("session_id", "step_id", "version", "total_bytes", "data", "unchanged")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step_id: int
    version: int
    total_bytes: int
    data: bytes
    unchanged: bool
    def __init__(self, session_id: _Optional[str] = ..., step_id: _Optional[int] = ..., version: _Optional[int] = ..., total_bytes: _Optional[int] = ..., data: _Optional[bytes] = ..., unchanged: _Optional[bool] = ...) -> None: ...

class PushStateReply(_message.Message):
    __slots__ = ("applied", "note", "version", "last_step_id")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    note: str
    version: int
    last_step_id: int
    def __init__(self, applied: _Optional[bool] = ..., note: _Optional[str] = ..., version: _Optional[int] = ..., last_step_id: _Optional[int] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ("fingerprint",)
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    def __init__(self, fingerprint: _Optional[str] = ...) -> None: ...

class DescribeReply(_message.Message):
    __slots__ = ("protocol_version", "fingerprint", "config_json", "num_classes", "in_channels", "wire_shape", "weights_sha256", "version", "max_batch", "read_only", "attached_clients", "max_train_batch", "session_port")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    IN_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    WIRE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_TRAIN_BATCH_FIELD_NUMBER: _ClassVar[int]
    SESSION_PORT_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    fingerprint: str
    config_json: str
    num_classes: int
    in_channels: int
    wire_shape: _containers.RepeatedScalarFieldContainer[int]
    weights_sha256: str
    version: int
    max_batch: int
    read_only: bool
    attached_clients: int
    max_train_batch: int
    session_port: int
    def __init__(self, protocol_version: _Optional[int] = ..., fingerprint: _Optional[str] = ..., config_json: _Optional[str] = ..., num_classes: _Optional[int] = ..., in_channels: _Optional[int] = ..., wire_shape: _Optional[_Iterable[int]] = ..., weights_sha256: _Optional[str] = ..., version: _Optional[int] = ..., max_batch: _Optional[int] = ..., read_only: _Optional[bool] = ..., attached_clients: _Optional[int] = ..., max_train_batch: _Optional[int] = ..., session_port: _Optional[int] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("fingerprint", "budget", "eval")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    budget: int
    eval: _splitprune_pb2.EvalRequest
    def __init__(self, fingerprint: _Optional[str] = ..., budget: _Optional[int] = ..., eval: _Optional[_Union[_splitprune_pb2.EvalRequest, _Mapping]] = ...) -> None: ...

class InferReply(_message.Message):
    __slots__ = ("eval", "server_ms")
    EVAL_FIELD_NUMBER: _ClassVar[int]
    SERVER_MS_FIELD_NUMBER: _ClassVar[int]
    eval: _splitprune_pb2.EvalReply
    server_ms: float
    def __init__(self, eval: _Optional[_Union[_splitprune_pb2.EvalReply, _Mapping]] = ..., server_ms: _Optional[float] = ...) -> None: ...

class InferOpen(_message.Message):
    __slots__ = ("fingerprint", "budget", "dtype", "channels", "prefix", "tables")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    budget: int
    dtype: _splitprune_pb2.DType
    channels: bytes
    prefix: int
    tables: int
    def __init__(self, fingerprint: _Optional[str] = ..., budget: _Optional[int] = ..., dtype: _Optional[_Union[_splitprune_pb2.DType, str]] = ..., channels: _Optional[bytes] = ..., prefix: _Optional[int] = ..., tables: _Optional[int] = ...) -> None: ...

class InferOpened(_message.Message):
    __slots__ = ("wire_shape", "max_batch", "error", "message")
    WIRE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    wire_shape: _containers.RepeatedScalarFieldContainer[int]
    max_batch: int
    error: ErrorReason
    message: str
    def __init__(self, wire_shape: _Optional[_Iterable[int]] = ..., max_batch: _Optional[int] = ..., error: _Optional[_Union[ErrorReason, str]] = ..., message: _Optional[str] = ...) -> None: ...

class InferItem(_message.Message):
    __slots__ = ("data", "samples")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    samples: int
    def __init__(self, data: _Optional[bytes] = ..., samples: _Optional[int] = ...) -> None: ...

class InferItemReply(_message.Message):
    __slots__ = ("labels", "server_us", "error", "message")
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SERVER_US_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    labels: bytes
    server_us: int
    error: ErrorReason
    message: str
    def __init__(self, labels: _Optional[bytes] = ..., server_us: _Optional[int] = ..., error: _Optional[_Union[ErrorReason, str]] = ..., message: _Optional[str] = ...) -> None: ...
