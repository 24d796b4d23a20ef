from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FP32: _ClassVar[DType]
    FP16: _ClassVar[DType]
    INT8: _ClassVar[DType]
    INT4: _ClassVar[DType]
    EC: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FP32: DType
FP16: DType
INT8: DType
INT4: DType
EC: DType

class EncodedTensor(_message.Message):
    __slots__ = ("dtype", "shape", "channels", "scales", "offsets", "data", "prefix", "tables")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    channels: bytes
    scales: bytes
    offsets: bytes
    data: bytes
    prefix: int
    tables: int
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., channels: _Optional[bytes] = ..., scales: _Optional[bytes] = ..., offsets: _Optional[bytes] = ..., data: _Optional[bytes] = ..., prefix: _Optional[int] = ..., tables: _Optional[int] = ...) -> None: ...

class Labels(_message.Message):
    __slots__ = ("width", "data")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    width: int
    data: bytes
    def __init__(self, width: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("step_id", "activations", "labels", "lr_scale")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LR_SCALE_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    activations: EncodedTensor
    labels: Labels
    lr_scale: float
    def __init__(self, step_id: _Optional[int] = ..., activations: _Optional[_Union[EncodedTensor, _Mapping]] = ..., labels: _Optional[_Union[Labels, _Mapping]] = ..., lr_scale: _Optional[float] = ...) -> None: ...

class TrainReply(_message.Message):
    __slots__ = ("step_id", "gradient", "loss", "correct", "server_us")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    SERVER_US_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    gradient: EncodedTensor
    loss: float
    correct: int
    server_us: int
    def __init__(self, step_id: _Optional[int] = ..., gradient: _Optional[_Union[EncodedTensor, _Mapping]] = ..., loss: _Optional[float] = ..., correct: _Optional[int] = ..., server_us: _Optional[int] = ...) -> None: ...

class EvalRequest(_message.Message):
    __slots__ = ("request_id", "activations")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    activations: EncodedTensor
    def __init__(self, request_id: _Optional[int] = ..., activations: _Optional[_Union[EncodedTensor, _Mapping]] = ...) -> None: ...

class EvalReply(_message.Message):
    __slots__ = ("request_id", "predictions")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    predictions: Labels
    def __init__(self, request_id: _Optional[int] = ..., predictions: _Optional[_Union[Labels, _Mapping]] = ...) -> None: ...

class CalibrateRequest(_message.Message):
    __slots__ = ("request_id", "activations", "first", "last")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    activations: EncodedTensor
    first: bool
    last: bool
    def __init__(self, request_id: _Optional[int] = ..., activations: _Optional[_Union[EncodedTensor, _Mapping]] = ..., first: _Optional[bool] = ..., last: _Optional[bool] = ...) -> None: ...

class CalibrateReply(_message.Message):
    __slots__ = ("request_id", "batches")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    batches: int
    def __init__(self, request_id: _Optional[int] = ..., batches: _Optional[int] = ...) -> None: ...

class PhaseRequest(_message.Message):
    __slots__ = ("phase", "budget", "lr", "momentum", "weight_decay")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    phase: int
    budget: int
    lr: float
    momentum: float
    weight_decay: float
    def __init__(self, phase: _Optional[int] = ..., budget: _Optional[int] = ..., lr: _Optional[float] = ..., momentum: _Optional[float] = ..., weight_decay: _Optional[float] = ...) -> None: ...

class PhaseReply(_message.Message):
    __slots__ = ("phase",)
    PHASE_FIELD_NUMBER: _ClassVar[int]
    phase: int
    def __init__(self, phase: _Optional[int] = ...) -> None: ...
