"""The MinED vocabulary map as a value: src id -> dst id plus the edit distance, and the first-token map beside it
(the projection option, `cotune.align.mined.first_token_map`), keyed by both tokenizers' content hashes and the
algorithm version, serialized as safetensors (never pickle)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Bump when anything that changes a map's content changes (normalization, tie-break, special-token rules).
# 2: equal byte forms prefer the target's own piece over its '<0xNN>' byte-fallback twin; the first-token map beside.
ALGORITHM_VERSION = "mined-bytes/2"

# How a sender's ids become receiver ids (`VocabMap.table`): the paper's MinED map (the default) or the first token of
# the receiver's own encoding of the sender token's text.
PROJECTIONS = ("mined", "first_token")

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
    first_ids: np.ndarray | None = None  # int32 [n_src]: the first-token map; None in maps of version 1

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
        if self.first_ids is not None:
            first = np.ascontiguousarray(self.first_ids)
            if first.dtype != np.int32 or first.shape != ids.shape:
                raise ValueError(f"vocab map 'first_ids' must be int32 of the shape of 'ids' {ids.shape}, got "
                                 f"{first.dtype} {first.shape}")
            if first.size and int(first.min()) < 0:
                raise ValueError(f"vocab map has a negative first-token id ({int(first.min())})")
            object.__setattr__(self, "first_ids", first)
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

    def table(self, projection: str = "mined") -> np.ndarray:
        """The src id -> dst id table of a projection (`PROJECTIONS`)."""
        if projection == "mined":
            return self.ids
        if projection == "first_token":
            if self.first_ids is None:
                raise ValueError(f"this vocab map (version {self.version}) has no first-token table; one built by "
                                 f"{ALGORITHM_VERSION} or later has")
            return self.first_ids
        raise ValueError(f"unknown projection {projection!r}; expected one of {', '.join(PROJECTIONS)}")

    def _tables(self) -> dict[str, np.ndarray]:
        out = {"ids": self.ids, "distance": self.distance}
        if self.first_ids is not None:
            out["first_ids"] = self.first_ids
        return out

    def __eq__(self, other) -> bool:
        if not isinstance(other, VocabMap):
            return NotImplemented
        return (
            self.src_hash == other.src_hash
            and self.dst_hash == other.dst_hash
            and self.version == other.version
            and self._tables().keys() == other._tables().keys()
            and all(np.array_equal(a, other._tables()[k]) for k, a in self._tables().items())
        )

    def _max_dst(self) -> int:
        return max((int(t.max()) for k, t in self._tables().items() if k != "distance" and t.size), default=-1)

    def check_dst_size(self, n_dst: int) -> None:
        """Raise ValueError unless every dst id is < n_dst (use when the dst vocabulary size is known)."""
        if self._max_dst() >= n_dst:
            raise ValueError(f"vocab map points at dst id {self._max_dst()}, but the dst vocabulary has {n_dst}")

    def check_sizes(self, src_vocab: int, dst_vocab: int) -> None:
        """Raise ValueError unless the map covers exactly the sender's vocabulary (one entry per id, src_vocab of
        them: a shorter map would silently drop the mass of the ids past its end) and maps into the receiver's
        (every dst id < dst_vocab). Both sizes are the models' output vocabularies as the parties describe them."""
        if self.n_src != src_vocab:
            raise ValueError(f"vocab map has {self.n_src} source entries, but the sender's vocabulary has {src_vocab} "
                             f"ids (receiver's: {dst_vocab}); it must cover exactly the sender's vocabulary")
        if self._max_dst() >= dst_vocab:
            raise ValueError(f"vocab map points at id {self._max_dst()}, outside the receiver's vocabulary of "
                             f"{dst_vocab} ids (sender's: {src_vocab})")

    def to_bytes(self) -> bytes:
        from cotune.wire.safetensors_io import (
            dumps,  # deterministic bytes (safetensors' own metadata order is not)
        )

        return dumps(
            self._tables(),
            metadata={"src_hash": self.src_hash, "dst_hash": self.dst_hash, "version": self.version},
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> VocabMap:
        from cotune.wire.safetensors_io import load_checked

        tensors = {"ids": "I32", "distance": "I32"}
        if _has_tensor(data, "first_ids"):  # maps of version 1 have no first-token table
            tensors["first_ids"] = "I32"
        arrays, meta = load_checked(data, what="vocab map", tensors=tensors,
                                    metadata=("src_hash", "dst_hash", "version"))
        return cls(
            ids=arrays["ids"],
            distance=arrays["distance"],
            first_ids=arrays.get("first_ids"),
            src_hash=meta["src_hash"],
            dst_hash=meta["dst_hash"],
            version=meta["version"],
        )


def _has_tensor(data, name: str) -> bool:
    """Whether safetensors bytes name tensor `name` in their header (False when the header is unreadable: the
    checked load that follows reports that)."""
    import json
    import struct

    try:
        (n,) = struct.unpack("<Q", bytes(data[:8]))
        return name in json.loads(bytes(data[8 : 8 + n]).decode("utf-8"))
    except Exception:  # noqa: BLE001 - any malformed header: let load_checked name the problem
        return False
