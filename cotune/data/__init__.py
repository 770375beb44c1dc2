"""Datasets: the Example type, task loaders with prompt templates, the federated split, JSONL and content ids."""

from .example import Example
from .paths import require_shared_data, shared_data_dir
from .split import FederatedSplit, federated_split, seeded_permutation, split_task
from .tasks import (
    SPLIT_ALIASES,
    TASKS,
    MalformedDataError,
    TaskSpec,
    available_splits,
    canonical_jsonl_bytes,
    dataset_hash,
    datasets_root,
    get_task,
    load_task,
    read_jsonl,
    read_jsonl_bytes,
    resolve_source,
    write_jsonl,
)

__all__ = [
    "Example",
    "shared_data_dir",
    "require_shared_data",
    "TASKS",
    "TaskSpec",
    "SPLIT_ALIASES",
    "MalformedDataError",
    "get_task",
    "load_task",
    "available_splits",
    "resolve_source",
    "datasets_root",
    "write_jsonl",
    "read_jsonl",
    "read_jsonl_bytes",
    "dataset_hash",
    "canonical_jsonl_bytes",
    "FederatedSplit",
    "federated_split",
    "seeded_permutation",
    "split_task",
]
