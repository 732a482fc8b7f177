from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("device_id", "enrollment_secret", "description", "base_model_hash")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_SECRET_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    enrollment_secret: str
    description: str
    base_model_hash: str
    def __init__(self, device_id: _Optional[str] = ..., enrollment_secret: _Optional[str] = ..., description: _Optional[str] = ..., base_model_hash: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("device_token", "cloud_public_key", "adapter_version", "base_model_hash")
    DEVICE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLOUD_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    device_token: str
    cloud_public_key: bytes
    adapter_version: int
    base_model_hash: str
    def __init__(self, device_token: _Optional[str] = ..., cloud_public_key: _Optional[bytes] = ..., adapter_version: _Optional[int] = ..., base_model_hash: _Optional[str] = ...) -> None: ...

class VisualTokens(_message.Message):
    __slots__ = ("values", "scales", "positions", "grid", "feature_space")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SPACE_FIELD_NUMBER: _ClassVar[int]
    values: Tensor
    scales: Tensor
    positions: Tensor
    grid: _containers.RepeatedScalarFieldContainer[int]
    feature_space: str
    def __init__(self, values: _Optional[_Union[Tensor, _Mapping]] = ..., scales: _Optional[_Union[Tensor, _Mapping]] = ..., positions: _Optional[_Union[Tensor, _Mapping]] = ..., grid: _Optional[_Iterable[int]] = ..., feature_space: _Optional[str] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("sample_id", "media_kind", "question", "device_answer", "confidence", "tokens", "frames", "meta")
    class MetaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    MEDIA_KIND_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ANSWER_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    sample_id: str
    media_kind: str
    question: str
    device_answer: str
    confidence: float
    tokens: VisualTokens
    frames: Tensor
    meta: _containers.ScalarMap[str, str]
    def __init__(self, sample_id: _Optional[str] = ..., media_kind: _Optional[str] = ..., question: _Optional[str] = ..., device_answer: _Optional[str] = ..., confidence: _Optional[float] = ..., tokens: _Optional[_Union[VisualTokens, _Mapping]] = ..., frames: _Optional[_Union[Tensor, _Mapping]] = ..., meta: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SampleBatch(_message.Message):
    __slots__ = ("adapter_version", "samples")
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    adapter_version: int
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    def __init__(self, adapter_version: _Optional[int] = ..., samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("upload_id", "index", "count", "sha256", "total_bytes", "data")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    index: int
    count: int
    sha256: bytes
    total_bytes: int
    data: bytes
    def __init__(self, upload_id: _Optional[str] = ..., index: _Optional[int] = ..., count: _Optional[int] = ..., sha256: _Optional[bytes] = ..., total_bytes: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadReceipt(_message.Message):
    __slots__ = ("upload_id", "stored_samples", "duplicate", "pending_samples")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    STORED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    PENDING_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    stored_samples: int
    duplicate: bool
    pending_samples: int
    def __init__(self, upload_id: _Optional[str] = ..., stored_samples: _Optional[int] = ..., duplicate: _Optional[bool] = ..., pending_samples: _Optional[int] = ...) -> None: ...

class GetUpdateRequest(_message.Message):
    __slots__ = ("have_version",)
    HAVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    have_version: int
    def __init__(self, have_version: _Optional[int] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("base_version", "version", "codec", "base_model_hash", "payload_sha256", "payload_bytes", "device_id", "signature")
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    base_version: int
    version: int
    codec: str
    base_model_hash: str
    payload_sha256: bytes
    payload_bytes: int
    device_id: str
    signature: bytes
    def __init__(self, base_version: _Optional[int] = ..., version: _Optional[int] = ..., codec: _Optional[str] = ..., base_model_hash: _Optional[str] = ..., payload_sha256: _Optional[bytes] = ..., payload_bytes: _Optional[int] = ..., device_id: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "index", "count", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    index: int
    count: int
    data: bytes
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., index: _Optional[int] = ..., count: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class AckUpdateRequest(_message.Message):
    __slots__ = ("version", "outcome", "probe_accuracy", "previous_probe_accuracy", "detail")
    class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OUTCOME_UNSPECIFIED: _ClassVar[AckUpdateRequest.Outcome]
        APPLIED: _ClassVar[AckUpdateRequest.Outcome]
        ROLLED_BACK: _ClassVar[AckUpdateRequest.Outcome]
        REJECTED: _ClassVar[AckUpdateRequest.Outcome]
    OUTCOME_UNSPECIFIED: AckUpdateRequest.Outcome
    APPLIED: AckUpdateRequest.Outcome
    ROLLED_BACK: AckUpdateRequest.Outcome
    REJECTED: AckUpdateRequest.Outcome
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    PROBE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_PROBE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    version: int
    outcome: AckUpdateRequest.Outcome
    probe_accuracy: float
    previous_probe_accuracy: float
    detail: str
    def __init__(self, version: _Optional[int] = ..., outcome: _Optional[_Union[AckUpdateRequest.Outcome, str]] = ..., probe_accuracy: _Optional[float] = ..., previous_probe_accuracy: _Optional[float] = ..., detail: _Optional[str] = ...) -> None: ...

class AckUpdateResponse(_message.Message):
    __slots__ = ("adapter_version",)
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    adapter_version: int
    def __init__(self, adapter_version: _Optional[int] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("device_id", "adapter_version", "latest_version", "pending_samples", "stored_samples", "rounds")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    PENDING_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STORED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    adapter_version: int
    latest_version: int
    pending_samples: int
    stored_samples: int
    rounds: int
    def __init__(self, device_id: _Optional[str] = ..., adapter_version: _Optional[int] = ..., latest_version: _Optional[int] = ..., pending_samples: _Optional[int] = ..., stored_samples: _Optional[int] = ..., rounds: _Optional[int] = ...) -> None: ...
