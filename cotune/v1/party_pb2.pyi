from cotune.v1 import common_pb2 as _common_pb2
from cotune.v1 import operations_pb2 as _operations_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DescribeRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class PartyInfo(_message.Message):
    __slots__ = ("party_id", "role", "model_name", "tokenizer_hash", "vocab_size", "public_set_hash", "public_set_size", "private_set_size", "eval_set_size", "device", "trainable_params", "tokenizer_bundle", "public_set", "lora_hash", "ready", "lora_layout_hash", "companion", "loaded_model", "num_layers", "current_run", "described_run")
    PARTY_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_HASH_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_SET_HASH_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_SET_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_SET_SIZE_FIELD_NUMBER: _ClassVar[int]
    EVAL_SET_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_PARAMS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_SET_FIELD_NUMBER: _ClassVar[int]
    LORA_HASH_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    LORA_LAYOUT_HASH_FIELD_NUMBER: _ClassVar[int]
    COMPANION_FIELD_NUMBER: _ClassVar[int]
    LOADED_MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_RUN_FIELD_NUMBER: _ClassVar[int]
    DESCRIBED_RUN_FIELD_NUMBER: _ClassVar[int]
    party_id: str
    role: str
    model_name: str
    tokenizer_hash: str
    vocab_size: int
    public_set_hash: str
    public_set_size: int
    private_set_size: int
    eval_set_size: int
    device: str
    trainable_params: int
    tokenizer_bundle: _common_pb2.BlobRef
    public_set: _common_pb2.BlobRef
    lora_hash: str
    ready: bool
    lora_layout_hash: str
    companion: CompanionInfo
    loaded_model: str
    num_layers: int
    current_run: str
    described_run: str
    def __init__(self, party_id: _Optional[str] = ..., role: _Optional[str] = ..., model_name: _Optional[str] = ..., tokenizer_hash: _Optional[str] = ..., vocab_size: _Optional[int] = ..., public_set_hash: _Optional[str] = ..., public_set_size: _Optional[int] = ..., private_set_size: _Optional[int] = ..., eval_set_size: _Optional[int] = ..., device: _Optional[str] = ..., trainable_params: _Optional[int] = ..., tokenizer_bundle: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., public_set: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., lora_hash: _Optional[str] = ..., ready: _Optional[bool] = ..., lora_layout_hash: _Optional[str] = ..., companion: _Optional[_Union[CompanionInfo, _Mapping]] = ..., loaded_model: _Optional[str] = ..., num_layers: _Optional[int] = ..., current_run: _Optional[str] = ..., described_run: _Optional[str] = ...) -> None: ...

class CompanionInfo(_message.Message):
    __slots__ = ("model_name", "tokenizer_hash", "vocab_size", "lora_hash", "lora_layout_hash", "trainable_params")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_HASH_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    LORA_HASH_FIELD_NUMBER: _ClassVar[int]
    LORA_LAYOUT_HASH_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_PARAMS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    tokenizer_hash: str
    vocab_size: int
    lora_hash: str
    lora_layout_hash: str
    trainable_params: int
    def __init__(self, model_name: _Optional[str] = ..., tokenizer_hash: _Optional[str] = ..., vocab_size: _Optional[int] = ..., lora_hash: _Optional[str] = ..., lora_layout_hash: _Optional[str] = ..., trainable_params: _Optional[int] = ...) -> None: ...

class RunContext(_message.Message):
    __slots__ = ("run_id", "round", "task_key", "public_set_hash", "resumes", "parallel_tasks")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TASK_KEY_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_SET_HASH_FIELD_NUMBER: _ClassVar[int]
    RESUMES_FIELD_NUMBER: _ClassVar[int]
    PARALLEL_TASKS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    task_key: str
    public_set_hash: str
    resumes: bool
    parallel_tasks: int
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., task_key: _Optional[str] = ..., public_set_hash: _Optional[str] = ..., resumes: _Optional[bool] = ..., parallel_tasks: _Optional[int] = ...) -> None: ...

class TrainLocalTask(_message.Message):
    __slots__ = ("epochs", "lr", "batch_size", "max_samples")
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    epochs: int
    lr: float
    batch_size: int
    max_samples: int
    def __init__(self, epochs: _Optional[int] = ..., lr: _Optional[float] = ..., batch_size: _Optional[int] = ..., max_samples: _Optional[int] = ...) -> None: ...

class TrainLocalResult(_message.Message):
    __slots__ = ("samples", "loss_first", "loss_last")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIRST_FIELD_NUMBER: _ClassVar[int]
    LOSS_LAST_FIELD_NUMBER: _ClassVar[int]
    samples: int
    loss_first: float
    loss_last: float
    def __init__(self, samples: _Optional[int] = ..., loss_first: _Optional[float] = ..., loss_last: _Optional[float] = ...) -> None: ...

class PublicLogitsTask(_message.Message):
    __slots__ = ("top_k", "max_samples", "bits", "max_length")
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    top_k: int
    max_samples: int
    bits: int
    max_length: int
    def __init__(self, top_k: _Optional[int] = ..., max_samples: _Optional[int] = ..., bits: _Optional[int] = ..., max_length: _Optional[int] = ...) -> None: ...

class PublicLogitsResult(_message.Message):
    __slots__ = ("shard", "public_loss_bpb")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_LOSS_BPB_FIELD_NUMBER: _ClassVar[int]
    shard: _common_pb2.BlobRef
    public_loss_bpb: float
    def __init__(self, shard: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., public_loss_bpb: _Optional[float] = ...) -> None: ...

class TeacherShard(_message.Message):
    __slots__ = ("sender_id", "shard", "vocab_map", "sequence_alignment")
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    VOCAB_MAP_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    sender_id: str
    shard: _common_pb2.BlobRef
    vocab_map: _common_pb2.BlobRef
    sequence_alignment: _common_pb2.BlobRef
    def __init__(self, sender_id: _Optional[str] = ..., shard: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., vocab_map: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., sequence_alignment: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ...) -> None: ...

class DistillTask(_message.Message):
    __slots__ = ("teachers", "ce_weight", "epochs", "selection", "max_samples", "lr", "batch_size", "max_length", "projection", "skip_span_mismatch")
    TEACHERS_FIELD_NUMBER: _ClassVar[int]
    CE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PROJECTION_FIELD_NUMBER: _ClassVar[int]
    SKIP_SPAN_MISMATCH_FIELD_NUMBER: _ClassVar[int]
    teachers: _containers.RepeatedCompositeFieldContainer[TeacherShard]
    ce_weight: float
    epochs: int
    selection: str
    max_samples: int
    lr: float
    batch_size: int
    max_length: int
    projection: str
    skip_span_mismatch: bool
    def __init__(self, teachers: _Optional[_Iterable[_Union[TeacherShard, _Mapping]]] = ..., ce_weight: _Optional[float] = ..., epochs: _Optional[int] = ..., selection: _Optional[str] = ..., max_samples: _Optional[int] = ..., lr: _Optional[float] = ..., batch_size: _Optional[int] = ..., max_length: _Optional[int] = ..., projection: _Optional[str] = ..., skip_span_mismatch: _Optional[bool] = ...) -> None: ...

class DistillResult(_message.Message):
    __slots__ = ("kd_before", "kd_after")
    KD_BEFORE_FIELD_NUMBER: _ClassVar[int]
    KD_AFTER_FIELD_NUMBER: _ClassVar[int]
    kd_before: float
    kd_after: float
    def __init__(self, kd_before: _Optional[float] = ..., kd_after: _Optional[float] = ...) -> None: ...

class EvaluateTask(_message.Message):
    __slots__ = ("max_samples", "target")
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    max_samples: int
    target: str
    def __init__(self, max_samples: _Optional[int] = ..., target: _Optional[str] = ...) -> None: ...

class EvaluateResult(_message.Message):
    __slots__ = ("public_loss", "eval_accuracy")
    PUBLIC_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    public_loss: float
    eval_accuracy: float
    def __init__(self, public_loss: _Optional[float] = ..., eval_accuracy: _Optional[float] = ...) -> None: ...

class SetLoraTask(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: _common_pb2.BlobRef
    def __init__(self, adapter: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ...) -> None: ...

class SetLoraResult(_message.Message):
    __slots__ = ("lora_hash",)
    LORA_HASH_FIELD_NUMBER: _ClassVar[int]
    lora_hash: str
    def __init__(self, lora_hash: _Optional[str] = ...) -> None: ...

class GetLoraTask(_message.Message):
    __slots__ = ("target", "tag")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    target: str
    tag: bool
    def __init__(self, target: _Optional[str] = ..., tag: _Optional[bool] = ...) -> None: ...

class GetLoraResult(_message.Message):
    __slots__ = ("adapter", "lora_hash")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    LORA_HASH_FIELD_NUMBER: _ClassVar[int]
    adapter: _common_pb2.BlobRef
    lora_hash: str
    def __init__(self, adapter: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., lora_hash: _Optional[str] = ...) -> None: ...

class CoDistillTask(_message.Message):
    __slots__ = ("slm_adapter", "kl_weight", "epochs", "max_samples", "lr", "slm_lr", "batch_size", "max_length", "llm_to_slm_map", "slm_to_llm_map", "top_k", "kl_direction")
    SLM_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    KL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    SLM_LR_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LLM_TO_SLM_MAP_FIELD_NUMBER: _ClassVar[int]
    SLM_TO_LLM_MAP_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    KL_DIRECTION_FIELD_NUMBER: _ClassVar[int]
    slm_adapter: _common_pb2.BlobRef
    kl_weight: float
    epochs: int
    max_samples: int
    lr: float
    slm_lr: float
    batch_size: int
    max_length: int
    llm_to_slm_map: _common_pb2.BlobRef
    slm_to_llm_map: _common_pb2.BlobRef
    top_k: int
    kl_direction: str
    def __init__(self, slm_adapter: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., kl_weight: _Optional[float] = ..., epochs: _Optional[int] = ..., max_samples: _Optional[int] = ..., lr: _Optional[float] = ..., slm_lr: _Optional[float] = ..., batch_size: _Optional[int] = ..., max_length: _Optional[int] = ..., llm_to_slm_map: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., slm_to_llm_map: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., top_k: _Optional[int] = ..., kl_direction: _Optional[str] = ...) -> None: ...

class CoDistillResult(_message.Message):
    __slots__ = ("slm_adapter", "received_lora_hash", "llm_lora_hash", "llm_kl_before", "llm_kl_after")
    SLM_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_LORA_HASH_FIELD_NUMBER: _ClassVar[int]
    LLM_LORA_HASH_FIELD_NUMBER: _ClassVar[int]
    LLM_KL_BEFORE_FIELD_NUMBER: _ClassVar[int]
    LLM_KL_AFTER_FIELD_NUMBER: _ClassVar[int]
    slm_adapter: _common_pb2.BlobRef
    received_lora_hash: str
    llm_lora_hash: str
    llm_kl_before: float
    llm_kl_after: float
    def __init__(self, slm_adapter: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., received_lora_hash: _Optional[str] = ..., llm_lora_hash: _Optional[str] = ..., llm_kl_before: _Optional[float] = ..., llm_kl_after: _Optional[float] = ...) -> None: ...

class CompressTask(_message.Message):
    __slots__ = ("adapter_layers", "drop")
    ADAPTER_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DROP_FIELD_NUMBER: _ClassVar[int]
    adapter_layers: int
    drop: float
    def __init__(self, adapter_layers: _Optional[int] = ..., drop: _Optional[float] = ...) -> None: ...

class CompressResult(_message.Message):
    __slots__ = ("model", "layer_map", "original_layers", "adapter_layers")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_MAP_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_LAYERS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_LAYERS_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.BlobRef
    layer_map: _containers.RepeatedScalarFieldContainer[int]
    original_layers: int
    adapter_layers: int
    def __init__(self, model: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., layer_map: _Optional[_Iterable[int]] = ..., original_layers: _Optional[int] = ..., adapter_layers: _Optional[int] = ...) -> None: ...

class AlignEmulatorTask(_message.Message):
    __slots__ = ("adapter", "steps", "kl_weight", "lr", "batch_size", "max_length", "max_samples")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    KL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    adapter: _common_pb2.BlobRef
    steps: int
    kl_weight: float
    lr: float
    batch_size: int
    max_length: int
    max_samples: int
    def __init__(self, adapter: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., steps: _Optional[int] = ..., kl_weight: _Optional[float] = ..., lr: _Optional[float] = ..., batch_size: _Optional[int] = ..., max_length: _Optional[int] = ..., max_samples: _Optional[int] = ...) -> None: ...

class AlignEmulatorResult(_message.Message):
    __slots__ = ("lora_hash", "full_lora_hash")
    LORA_HASH_FIELD_NUMBER: _ClassVar[int]
    FULL_LORA_HASH_FIELD_NUMBER: _ClassVar[int]
    lora_hash: str
    full_lora_hash: str
    def __init__(self, lora_hash: _Optional[str] = ..., full_lora_hash: _Optional[str] = ...) -> None: ...

class LoadModelTask(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.BlobRef
    def __init__(self, model: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ...) -> None: ...

class LoadModelResult(_message.Message):
    __slots__ = ("model", "lora_hash", "lora_layout_hash")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LORA_HASH_FIELD_NUMBER: _ClassVar[int]
    LORA_LAYOUT_HASH_FIELD_NUMBER: _ClassVar[int]
    model: str
    lora_hash: str
    lora_layout_hash: str
    def __init__(self, model: _Optional[str] = ..., lora_hash: _Optional[str] = ..., lora_layout_hash: _Optional[str] = ...) -> None: ...

class TrainAdapterTask(_message.Message):
    __slots__ = ("epochs", "prox_eps", "lr", "batch_size", "max_samples")
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    PROX_EPS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    epochs: int
    prox_eps: float
    lr: float
    batch_size: int
    max_samples: int
    def __init__(self, epochs: _Optional[int] = ..., prox_eps: _Optional[float] = ..., lr: _Optional[float] = ..., batch_size: _Optional[int] = ..., max_samples: _Optional[int] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ("ctx", "train_local", "public_logits", "distill", "evaluate", "set_lora", "get_lora", "co_distill", "compress", "align_emulator", "load_model", "train_adapter")
    CTX_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOCAL_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_LOGITS_FIELD_NUMBER: _ClassVar[int]
    DISTILL_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_FIELD_NUMBER: _ClassVar[int]
    SET_LORA_FIELD_NUMBER: _ClassVar[int]
    GET_LORA_FIELD_NUMBER: _ClassVar[int]
    CO_DISTILL_FIELD_NUMBER: _ClassVar[int]
    COMPRESS_FIELD_NUMBER: _ClassVar[int]
    ALIGN_EMULATOR_FIELD_NUMBER: _ClassVar[int]
    LOAD_MODEL_FIELD_NUMBER: _ClassVar[int]
    TRAIN_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    ctx: RunContext
    train_local: TrainLocalTask
    public_logits: PublicLogitsTask
    distill: DistillTask
    evaluate: EvaluateTask
    set_lora: SetLoraTask
    get_lora: GetLoraTask
    co_distill: CoDistillTask
    compress: CompressTask
    align_emulator: AlignEmulatorTask
    load_model: LoadModelTask
    train_adapter: TrainAdapterTask
    def __init__(self, ctx: _Optional[_Union[RunContext, _Mapping]] = ..., train_local: _Optional[_Union[TrainLocalTask, _Mapping]] = ..., public_logits: _Optional[_Union[PublicLogitsTask, _Mapping]] = ..., distill: _Optional[_Union[DistillTask, _Mapping]] = ..., evaluate: _Optional[_Union[EvaluateTask, _Mapping]] = ..., set_lora: _Optional[_Union[SetLoraTask, _Mapping]] = ..., get_lora: _Optional[_Union[GetLoraTask, _Mapping]] = ..., co_distill: _Optional[_Union[CoDistillTask, _Mapping]] = ..., compress: _Optional[_Union[CompressTask, _Mapping]] = ..., align_emulator: _Optional[_Union[AlignEmulatorTask, _Mapping]] = ..., load_model: _Optional[_Union[LoadModelTask, _Mapping]] = ..., train_adapter: _Optional[_Union[TrainAdapterTask, _Mapping]] = ...) -> None: ...
