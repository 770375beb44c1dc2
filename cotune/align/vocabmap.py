"""The MinED vocabulary map as a value: src id -> dst id plus the edit distance, keyed by both tokenizers'
content hashes and the algorithm version, serialized as safetensors (never pickle)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Bump when anything that changes a map's content changes (normalization, tie-break, special-token rules).
ALGORITHM_VERSION = "mined-bytes/1"

_HEX64 = set("0123456789abcdef")


def _check_hash(name: str, value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"vocab map metadata '{name}' must be a string, got {type(value).__name__}")
    if value and not (len(value) == 64 and set(value) <= _HEX64):
        raise ValueError(f"vocab map metadata '{name}' must be a sha256 hex digest (64 lowercase hex chars): {value!r}")
    return value


@dataclass(frozen=True, eq=False)
class VocabMap:
    ids: np.ndarray  # int32 [n_src]: the dst id each src id maps to
    distance: np.ndarray  # int32 [n_src]: Levenshtein distance (bytes) between the normalized forms
    src_hash: str
    dst_hash: str
    version: str = ALGORITHM_VERSION

    def __post_init__(self):
        ids = np.ascontiguousarray(self.ids)
        distance = np.ascontiguousarray(self.distance)
        if ids.ndim != 1 or distance.ndim != 1:
            raise ValueError(f"vocab map 'ids' and 'distance' must be 1-D, got shapes {ids.shape} and {distance.shape}")
        if ids.shape != distance.shape:
            raise ValueError(f"vocab map 'ids' {ids.shape} and 'distance' {distance.shape} differ in length")
        if ids.dtype != np.int32 or distance.dtype != np.int32:
            raise ValueError(f"vocab map arrays must be int32, got {ids.dtype} and {distance.dtype}")
        if ids.size and int(ids.min()) < 0:
            raise ValueError(f"vocab map has a negative dst id ({int(ids.min())})")
        if distance.size and int(distance.min()) < 0:
            raise ValueError(f"vocab map has a negative distance ({int(distance.min())})")
        _check_hash("src_hash", self.src_hash)
        _check_hash("dst_hash", self.dst_hash)
        if not isinstance(self.version, str) or not self.version:
            raise ValueError("vocab map 'version' must be a non-empty string")
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "distance", distance)

    @property
    def n_src(self) -> int:
        return int(self.ids.shape[0])

    def __eq__(self, other) -> bool:
        if not isinstance(other, VocabMap):
            return NotImplemented
        return (
            self.src_hash == other.src_hash
            and self.dst_hash == other.dst_hash
            and self.version == other.version
            and np.array_equal(self.ids, other.ids)
            and np.array_equal(self.distance, other.distance)
        )

    def check_dst_size(self, n_dst: int) -> None:
        """Raise ValueError unless every dst id is < n_dst (use when the dst vocabulary size is known)."""
        if self.ids.size and int(self.ids.max()) >= n_dst:
            raise ValueError(f"vocab map points at dst id {int(self.ids.max())}, but the dst vocabulary has {n_dst}")

    def check_sizes(self, src_vocab: int, dst_vocab: int) -> None:
        """Raise ValueError unless the map covers exactly the sender's vocabulary (one entry per id, src_vocab of
        them: a shorter map would silently drop the mass of the ids past its end) and maps into the receiver's
        (every dst id < dst_vocab). Both sizes are the models' output vocabularies as the parties describe them."""
        if self.n_src != src_vocab:
            raise ValueError(f"vocab map has {self.n_src} source entries, but the sender's vocabulary has {src_vocab} "
                             f"ids (receiver's: {dst_vocab}); it must cover exactly the sender's vocabulary")
        if self.ids.size and int(self.ids.max()) >= dst_vocab:
            raise ValueError(f"vocab map points at id {int(self.ids.max())}, outside the receiver's vocabulary of "
                             f"{dst_vocab} ids (sender's: {src_vocab})")

    def to_bytes(self) -> bytes:
        from cotune.wire.safetensors_io import (
            dumps,  # deterministic bytes (safetensors' own metadata order is not)
        )

        return dumps(
            {"ids": self.ids, "distance": self.distance},
            metadata={"src_hash": self.src_hash, "dst_hash": self.dst_hash, "version": self.version},
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> VocabMap:
        from cotune.wire.safetensors_io import load_checked

        arrays, meta = load_checked(data, what="vocab map", tensors={"ids": "I32", "distance": "I32"},
                                    metadata=("src_hash", "dst_hash", "version"))
        return cls(
            ids=arrays["ids"],
            distance=arrays["distance"],
            src_hash=meta["src_hash"],
            dst_hash=meta["dst_hash"],
            version=meta["version"],
        )
