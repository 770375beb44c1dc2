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

# Limits every party, the alignment service and the run configs apply to task fields (one definition).
MAX_LENGTH_RANGE = (8, 32768)  # tokens per public sample
MAX_TOP_K = 1024               # logits kept per position

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
