"""The party task contract shared by the coordinator and the parties (no torch): which typed result each task kind
returns, and every blob a task request or result names.

A strategy builds a `TaskRequest`; the coordinator's driver pushes every blob the request names to the party before
starting it and pulls every blob the result names afterwards, counting bytes by field (e.g. `distill.teachers.shard`).
Strategies therefore never move bytes themselves.
"""

from __future__ import annotations

from collections.abc import Iterator

from google.protobuf.message import Message

from cotune.v1 import common_pb2, party_pb2

# Limits every party, the alignment service and the run configs apply to task fields (one definition). A party refuses
# a task with a value outside them before any work starts (cotune.party.base), so no request can make a party spin for
# days or blow up its optimizer; the run configs apply the same limits, so a spec that validates never hits them.
MAX_LENGTH_RANGE = (8, 32768)  # tokens per public sample
MAX_TOP_K = 1024               # logits kept per position
MAX_EPOCHS = 1000              # passes over a data set in one task (train_local, train_adapter, distill, co_distill)
MAX_STEPS = 1_000_000          # optimizer steps in one task (align_emulator)
MAX_BATCH_SIZE = 4096          # samples per optimizer step
MAX_LR = 1.0                   # learning rates are in (0, MAX_LR]
MAX_LOSS_WEIGHT = 1e6          # loss weights without a natural bound (KL weights λ/β, FedBiOT's ε) are in [0, 1e6]
MAX_ADAPTER_LAYERS = 1024      # FedBiOT: decoder layers in the adapter
# Largest |value| accepted in a LoRA tensor someone else sent (a client's upload before averaging, an adapter a party
# is asked to load). Trained LoRA factors are O(1e-2..1); 1e4 leaves four orders of magnitude of headroom, yet keeps
# a sample-weighted float32 mean of many uploads (and B·A products) far from overflow.
MAX_ADAPTER_ABS = 1e4

RESULT_TYPES: dict[str, type[Message]] = {
    "train_local": party_pb2.TrainLocalResult,
    "train_adapter": party_pb2.TrainLocalResult,
    "public_logits": party_pb2.PublicLogitsResult,
    "distill": party_pb2.DistillResult,
    "evaluate": party_pb2.EvaluateResult,
    "set_lora": party_pb2.SetLoraResult,
    "get_lora": party_pb2.GetLoraResult,
    "co_distill": party_pb2.CoDistillResult,
    "compress": party_pb2.CompressResult,
    "align_emulator": party_pb2.AlignEmulatorResult,
    "load_model": party_pb2.LoadModelResult,
}
# The blobs a result of each kind must name (a result without one is malformed: cotune.algorithms.base.MalformedResult).
REQUIRED_RESULT_BLOBS: dict[str, tuple[str, ...]] = {
    "public_logits": ("shard",),
    "get_lora": ("adapter",),
    "co_distill": ("slm_adapter",),
    "compress": ("model",),
}
_HEX = set("0123456789abcdef")
TASK_KINDS = tuple(f.name for f in party_pb2.TaskRequest.DESCRIPTOR.oneofs_by_name["task"].fields)
assert set(TASK_KINDS) == set(RESULT_TYPES), "every TaskRequest task needs a result type"


def task_kind(request: party_pb2.TaskRequest) -> str:
    kind = request.WhichOneof("task")
    if kind is None:
        raise ValueError("TaskRequest names no task")
    return kind


def blob_refs(message: Message, prefix: str = "") -> Iterator[tuple[str, common_pb2.BlobRef]]:
    """(field path, BlobRef) for every set BlobRef in `message`, depth first, repeated fields included."""
    for field, value in message.ListFields():
        path = f"{prefix}.{field.name}" if prefix else field.name
        if field.message_type is None:
            continue
        items = value if field.is_repeated else [value]
        for item in items:
            if isinstance(item, common_pb2.BlobRef):
                if item.sha256:
                    yield path, item
            else:
                yield from blob_refs(item, path)


def request_blobs(request: party_pb2.TaskRequest) -> list[tuple[str, common_pb2.BlobRef]]:
    """The blobs a task reads, named `<task>.<field path>`."""
    kind = task_kind(request)
    return list(blob_refs(getattr(request, kind), kind))


def result_blobs(kind: str, result: Message) -> list[tuple[str, common_pb2.BlobRef]]:
    """The blobs a task's result names, `<task>.<field path>`."""
    return list(blob_refs(result, kind))


def result_problems(kind: str, result: Message) -> list[str]:
    """What is wrong with a typed result of `kind` before anyone reads it: a blob its kind must return that it does
    not name, a blob named by something other than a sha256 hex digest. [] when nothing is."""
    problems = [f"it names no {name} (a {kind} result must return one)" for name in REQUIRED_RESULT_BLOBS.get(kind, ())
                if not getattr(result, name).sha256]
    for name, ref in blob_refs(result, kind):
        if len(ref.sha256) != 64 or not set(ref.sha256) <= _HEX:
            problems.append(f"{name} is named by {ref.sha256!r:.80}, not a sha256 hex digest")
    return problems
