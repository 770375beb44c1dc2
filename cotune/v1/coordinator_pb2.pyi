from cotune.v1 import common_pb2 as _common_pb2
from cotune.v1 import party_pb2 as _party_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATE_UNSPECIFIED: _ClassVar[RunState]
    RUN_PENDING: _ClassVar[RunState]
    RUN_RUNNING: _ClassVar[RunState]
    RUN_SUCCEEDED: _ClassVar[RunState]
    RUN_FAILED: _ClassVar[RunState]
    RUN_CANCELLED: _ClassVar[RunState]
RUN_STATE_UNSPECIFIED: RunState
RUN_PENDING: RunState
RUN_RUNNING: RunState
RUN_SUCCEEDED: RunState
RUN_FAILED: RunState
RUN_CANCELLED: RunState

class ClientDescriptor(_message.Message):
    __slots__ = ("client_id", "address", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    address: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, client_id: _Optional[str] = ..., address: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RegisterClientRequest(_message.Message):
    __slots__ = ("client",)
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    client: ClientDescriptor
    def __init__(self, client: _Optional[_Union[ClientDescriptor, _Mapping]] = ...) -> None: ...

class ClientRecord(_message.Message):
    __slots__ = ("client", "info", "registered_at")
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    client: ClientDescriptor
    info: _party_pb2.PartyInfo
    registered_at: float
    def __init__(self, client: _Optional[_Union[ClientDescriptor, _Mapping]] = ..., info: _Optional[_Union[_party_pb2.PartyInfo, _Mapping]] = ..., registered_at: _Optional[float] = ...) -> None: ...

class DeregisterClientRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class DeregisterClientResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListClientsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListClientsResponse(_message.Message):
    __slots__ = ("clients",)
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    clients: _containers.RepeatedCompositeFieldContainer[ClientRecord]
    def __init__(self, clients: _Optional[_Iterable[_Union[ClientRecord, _Mapping]]] = ...) -> None: ...

class RunSpec(_message.Message):
    __slots__ = ("name", "algorithm", "rounds", "clients", "public_set_hash", "min_clients", "step_timeout_s", "max_public_samples", "eval_max_samples", "max_length", "local_epochs", "overlap_steps", "adapter_max_abs", "fedmkt", "fedcollm", "fedbiot", "fedavg")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_SET_HASH_FIELD_NUMBER: _ClassVar[int]
    MIN_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    STEP_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_PUBLIC_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    EVAL_MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_STEPS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_MAX_ABS_FIELD_NUMBER: _ClassVar[int]
    FEDMKT_FIELD_NUMBER: _ClassVar[int]
    FEDCOLLM_FIELD_NUMBER: _ClassVar[int]
    FEDBIOT_FIELD_NUMBER: _ClassVar[int]
    FEDAVG_FIELD_NUMBER: _ClassVar[int]
    name: str
    algorithm: str
    rounds: int
    clients: _containers.RepeatedScalarFieldContainer[str]
    public_set_hash: str
    min_clients: int
    step_timeout_s: float
    max_public_samples: int
    eval_max_samples: int
    max_length: int
    local_epochs: int
    overlap_steps: bool
    adapter_max_abs: float
    fedmkt: FedMKTSpec
    fedcollm: FedCoLLMSpec
    fedbiot: FedBiOTSpec
    fedavg: FedAvgSpec
    def __init__(self, name: _Optional[str] = ..., algorithm: _Optional[str] = ..., rounds: _Optional[int] = ..., clients: _Optional[_Iterable[str]] = ..., public_set_hash: _Optional[str] = ..., min_clients: _Optional[int] = ..., step_timeout_s: _Optional[float] = ..., max_public_samples: _Optional[int] = ..., eval_max_samples: _Optional[int] = ..., max_length: _Optional[int] = ..., local_epochs: _Optional[int] = ..., overlap_steps: _Optional[bool] = ..., adapter_max_abs: _Optional[float] = ..., fedmkt: _Optional[_Union[FedMKTSpec, _Mapping]] = ..., fedcollm: _Optional[_Union[FedCoLLMSpec, _Mapping]] = ..., fedbiot: _Optional[_Union[FedBiOTSpec, _Mapping]] = ..., fedavg: _Optional[_Union[FedAvgSpec, _Mapping]] = ...) -> None: ...

class FedMKTSpec(_message.Message):
    __slots__ = ("setting", "top_k", "ce_weight", "distill_epochs", "selection", "logits_bits", "alignment_method", "projection", "skip_span_mismatch")
    SETTING_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    CE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    DISTILL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    LOGITS_BITS_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_METHOD_FIELD_NUMBER: _ClassVar[int]
    PROJECTION_FIELD_NUMBER: _ClassVar[int]
    SKIP_SPAN_MISMATCH_FIELD_NUMBER: _ClassVar[int]
    setting: str
    top_k: int
    ce_weight: float
    distill_epochs: int
    selection: str
    logits_bits: int
    alignment_method: str
    projection: str
    skip_span_mismatch: bool
    def __init__(self, setting: _Optional[str] = ..., top_k: _Optional[int] = ..., ce_weight: _Optional[float] = ..., distill_epochs: _Optional[int] = ..., selection: _Optional[str] = ..., logits_bits: _Optional[int] = ..., alignment_method: _Optional[str] = ..., projection: _Optional[str] = ..., skip_span_mismatch: _Optional[bool] = ...) -> None: ...

class FedCoLLMSpec(_message.Message):
    __slots__ = ("kl_weight", "distill_epochs", "aggregation", "align_tokenizers", "top_k", "kl_direction")
    KL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    DISTILL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    ALIGN_TOKENIZERS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    KL_DIRECTION_FIELD_NUMBER: _ClassVar[int]
    kl_weight: float
    distill_epochs: int
    aggregation: str
    align_tokenizers: bool
    top_k: int
    kl_direction: str
    def __init__(self, kl_weight: _Optional[float] = ..., distill_epochs: _Optional[int] = ..., aggregation: _Optional[str] = ..., align_tokenizers: _Optional[bool] = ..., top_k: _Optional[int] = ..., kl_direction: _Optional[str] = ...) -> None: ...

class FedBiOTSpec(_message.Message):
    __slots__ = ("adapter_layers", "drop", "pre_align_steps", "align_steps", "kl_weight", "prox_eps", "align_lr", "aggregation")
    ADAPTER_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DROP_FIELD_NUMBER: _ClassVar[int]
    PRE_ALIGN_STEPS_FIELD_NUMBER: _ClassVar[int]
    ALIGN_STEPS_FIELD_NUMBER: _ClassVar[int]
    KL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PROX_EPS_FIELD_NUMBER: _ClassVar[int]
    ALIGN_LR_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    adapter_layers: int
    drop: float
    pre_align_steps: int
    align_steps: int
    kl_weight: float
    prox_eps: float
    align_lr: float
    aggregation: str
    def __init__(self, adapter_layers: _Optional[int] = ..., drop: _Optional[float] = ..., pre_align_steps: _Optional[int] = ..., align_steps: _Optional[int] = ..., kl_weight: _Optional[float] = ..., prox_eps: _Optional[float] = ..., align_lr: _Optional[float] = ..., aggregation: _Optional[str] = ...) -> None: ...

class FedAvgSpec(_message.Message):
    __slots__ = ("aggregation",)
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    aggregation: str
    def __init__(self, aggregation: _Optional[str] = ...) -> None: ...

class PartyMetrics(_message.Message):
    __slots__ = ("party_id", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PARTY_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    party_id: str
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, party_id: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RoundRecord(_message.Message):
    __slots__ = ("round", "parties", "dropped", "notes", "bytes_sent", "bytes_received", "started_at", "finished_at", "artifacts")
    class BytesSentEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class BytesReceivedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ArtifactsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PARTIES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    round: int
    parties: _containers.RepeatedCompositeFieldContainer[PartyMetrics]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    notes: _containers.RepeatedScalarFieldContainer[str]
    bytes_sent: _containers.ScalarMap[str, int]
    bytes_received: _containers.ScalarMap[str, int]
    started_at: float
    finished_at: float
    artifacts: _containers.ScalarMap[str, str]
    def __init__(self, round: _Optional[int] = ..., parties: _Optional[_Iterable[_Union[PartyMetrics, _Mapping]]] = ..., dropped: _Optional[_Iterable[str]] = ..., notes: _Optional[_Iterable[str]] = ..., bytes_sent: _Optional[_Mapping[str, int]] = ..., bytes_received: _Optional[_Mapping[str, int]] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., artifacts: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Run(_message.Message):
    __slots__ = ("run_id", "spec", "state", "current_round", "current_step", "rounds", "error", "created_at", "updated_at", "exports")
    class ExportsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    CURRENT_STEP_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPORTS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    spec: RunSpec
    state: RunState
    current_round: int
    current_step: str
    rounds: _containers.RepeatedCompositeFieldContainer[RoundRecord]
    error: str
    created_at: float
    updated_at: float
    exports: _containers.ScalarMap[str, str]
    def __init__(self, run_id: _Optional[str] = ..., spec: _Optional[_Union[RunSpec, _Mapping]] = ..., state: _Optional[_Union[RunState, str]] = ..., current_round: _Optional[int] = ..., current_step: _Optional[str] = ..., rounds: _Optional[_Iterable[_Union[RoundRecord, _Mapping]]] = ..., error: _Optional[str] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ..., exports: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RunEvent(_message.Message):
    __slots__ = ("run_id", "seq", "time", "kind", "round", "step", "party_id", "done", "total", "message", "state")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PARTY_ID_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    seq: int
    time: float
    kind: str
    round: int
    step: str
    party_id: str
    done: int
    total: int
    message: str
    state: RunState
    def __init__(self, run_id: _Optional[str] = ..., seq: _Optional[int] = ..., time: _Optional[float] = ..., kind: _Optional[str] = ..., round: _Optional[int] = ..., step: _Optional[str] = ..., party_id: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., message: _Optional[str] = ..., state: _Optional[_Union[RunState, str]] = ...) -> None: ...

class StartRunRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: RunSpec
    def __init__(self, spec: _Optional[_Union[RunSpec, _Mapping]] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class WatchRunRequest(_message.Message):
    __slots__ = ("run_id", "after_seq")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    after_seq: int
    def __init__(self, run_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class CancelRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class ResumeRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class ExportRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class ExportRunResponse(_message.Message):
    __slots__ = ("adapters", "model_card_markdown")
    class AdaptersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.BlobRef
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ...) -> None: ...
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_CARD_MARKDOWN_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.MessageMap[str, _common_pb2.BlobRef]
    model_card_markdown: str
    def __init__(self, adapters: _Optional[_Mapping[str, _common_pb2.BlobRef]] = ..., model_card_markdown: _Optional[str] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[Run]
    def __init__(self, runs: _Optional[_Iterable[_Union[Run, _Mapping]]] = ...) -> None: ...
