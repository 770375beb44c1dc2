"""The federated data protocol: one public set, K private client shards of equal size, a held-out eval set.

FedMKT and FedCoLLM (and the papers they follow) shuffle a task's training data with a seed and cut it into
1 public part + K private parts of equal size (K = 4 in the papers); evaluation uses a held-out set.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .example import Example

__all__ = ["FederatedSplit", "federated_split", "seeded_permutation", "split_task"]


@dataclass
class FederatedSplit:
    public: list[Example]
    clients: list[list[Example]]
    eval: list[Example]

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def sizes(self) -> dict[str, object]:
        return {"public": len(self.public), "clients": [len(c) for c in self.clients], "eval": len(self.eval)}


def seeded_permutation(n: int, seed: int) -> list[int]:
    """A permutation of range(n) that depends only on (n, seed): indices sorted by sha256(seed, index).

    Independent of the Python version and of the random module, so every process and machine agrees.
    """
    prefix = f"cotune-split\x1f{int(seed)}\x1f".encode("ascii")
    return sorted(range(n), key=lambda i: hashlib.sha256(prefix + str(i).encode("ascii")).digest())


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def federated_split(
    examples: Sequence[Example],
    num_clients: int,
    *,
    seed: int = 0,
    eval_examples: Sequence[Example] | None = None,
    per_part: int | None = None,
    eval_size: int | None = None,
) -> FederatedSplit:
    """Shuffle ``examples`` with ``seed`` and cut 1 public part + ``num_clients`` private parts of equal size.

    per_part:      size of each of the num_clients + 1 parts. Default: ``len(examples) // (num_clients + 1)``
                   when ``eval_examples`` is given; otherwise ``len(examples) // (num_clients + 2)``, so that the
                   eval set cut from the rest is at least as large as one part.
    eval_examples: the held-out eval set, used as given (its order kept). When None, the eval set is cut from
                   the shuffled examples left after the parts: ``eval_size`` of them (default: all that are left).
    The parts (and a cut eval set) are disjoint slices of one seeded permutation: the same inputs and seed give
    the same split in every process; a part's content does not depend on the sizes asked for later parts.
    Raises ValueError when there is not enough data for what is asked.
    """
    examples = list(examples)
    n = len(examples)
    k = _positive_int(num_clients, "num_clients")
    if per_part is not None:
        per_part = _positive_int(per_part, "per_part")
    if eval_size is not None:
        eval_size = _positive_int(eval_size, "eval_size")
        if eval_examples is not None:
            raise ValueError("give either eval_examples or eval_size, not both")

    if per_part is None:
        per_part = n // (k + 1) if eval_examples is not None else n // (k + 2)
        if per_part < 1:
            need = k + 1 if eval_examples is not None else k + 2
            raise ValueError(
                f"not enough examples for 1 public + {k} client parts"
                f"{'' if eval_examples is not None else ' + an eval set'}: have {n}, need at least {need}"
            )
    used = per_part * (k + 1)
    if used > n:
        raise ValueError(
            f"not enough examples: 1 public + {k} client parts of {per_part} need {used}, have {n}"
        )

    order = seeded_permutation(n, seed)
    parts = [[examples[i] for i in order[j * per_part : (j + 1) * per_part]] for j in range(k + 1)]

    if eval_examples is not None:
        held_out = list(eval_examples)
        if not held_out:
            raise ValueError("eval_examples is empty")
    else:
        left = n - used
        size = left if eval_size is None else eval_size
        if size < 1 or size > left:
            raise ValueError(
                f"not enough examples for the eval set: {left} left after 1 public + {k} client parts of "
                f"{per_part}, eval needs {max(size, 1)} (pass eval_examples, or a smaller per_part/eval_size)"
            )
        held_out = [examples[i] for i in order[used : used + size]]

    return FederatedSplit(public=parts[0], clients=parts[1:], eval=held_out)


def split_task(
    name: str,
    num_clients: int,
    *,
    seed: int = 0,
    per_part: int | None = None,
    eval_split: str | None = None,
    eval_limit: int | None = None,
    eval_seed: int | None = None,
    data_dir: Path | str | None = None,
) -> FederatedSplit:
    """:func:`federated_split` of a task: parts from its pool split, eval from its held-out split
    (:func:`cotune.data.tasks.federated_splits`: ``train`` and ``validation``; GSM8K ``train`` and ``test``;
    DialogSum, which has no train split here, ``validation`` and ``test``).

    eval_split overrides the held-out split (the papers evaluate on a split the parts never see). Where it is the
    pool itself, or the task has one split only (SciQ), the parts and the eval set are all cut from that split.
    eval_limit keeps the first ``eval_limit`` eval examples (a fast eval for small runs).
    eval_seed: where the eval set is cut from the pool, cut it first by this seed rather than by ``seed``, so that
    every ``seed`` evaluates on the same items (the experiment harness pairs seeds on them).
    """
    from .tasks import SPLIT_ALIASES, available_splits, get_task, load_task, pool_and_eval_split, resolve_source

    splits = available_splits(name, data_dir)
    if not splits:  # no file for any split: raise the informative FileNotFoundError
        resolve_source(name, next(iter(get_task(name).splits)), data_dir=data_dir)
    pool_split, held_split = pool_and_eval_split(splits)  # among the splits present
    if eval_split is not None:
        held_split = SPLIT_ALIASES.get(eval_split, eval_split)
    pool = load_task(name, pool_split, data_dir=data_dir)
    if held_split is not None and held_split != pool_split:
        held = load_task(name, held_split, data_dir=data_dir, limit=eval_limit)
        return federated_split(pool, num_clients, seed=seed, per_part=per_part, eval_examples=held)
    if eval_seed is not None:
        order = seeded_permutation(len(pool), eval_seed)
        held = [pool[i] for i in order[:eval_limit]]
        return federated_split([pool[i] for i in order[len(held):]], num_clients, seed=seed, per_part=per_part,
                               eval_examples=held)
    return federated_split(pool, num_clients, seed=seed, per_part=per_part, eval_size=eval_limit)
