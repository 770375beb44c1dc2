"""Deterministic safetensors bytes.

`safetensors.save` emits its `__metadata__` map in hash-map order, so the same tensors and metadata can
serialize to different bytes from call to call. Cotune addresses blobs by content hash and promises
byte-identical artifacts across processes, so every adapter, map and alignment is written here instead:
sorted tensor names, sorted metadata, compact JSON, 8-byte aligned. The output is plain safetensors.
"""

from __future__ import annotations

import json
import struct

import numpy as np

_DTYPES = {
    np.dtype("float64"): "F64", np.dtype("float32"): "F32", np.dtype("float16"): "F16",
    np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("int16"): "I16", np.dtype("int8"): "I8",
    np.dtype("uint64"): "U64", np.dtype("uint32"): "U32", np.dtype("uint16"): "U16", np.dtype("uint8"): "U8",
    np.dtype("bool"): "BOOL",
}


def _as_numpy(value) -> tuple[str, tuple[int, ...], bytes]:
    if hasattr(value, "detach"):  # torch.Tensor
        import torch

        tensor = value.detach().to("cpu").contiguous()
        if tensor.dtype == torch.bfloat16:
            return "BF16", tuple(tensor.shape), tensor.view(torch.int16).numpy().astype("<i2").tobytes()
        value = tensor.numpy()
    array = np.ascontiguousarray(value)
    dtype = array.dtype.newbyteorder("=") if array.dtype.byteorder not in ("=", "|") else array.dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {array.dtype} cannot be stored in safetensors")
    return _DTYPES[dtype], tuple(array.shape), array.astype(dtype.newbyteorder("<"), copy=False).tobytes()


def dumps(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    chunks, offset = [], 0
    for name in sorted(tensors):
        dtype, shape, data = _as_numpy(tensors[name])
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def read_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes; ValueError on a malformed header."""
    if len(data) < 8:
        raise ValueError("safetensors data is shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > 100 << 20:
        raise ValueError(f"safetensors header claims {n} bytes, more than the data holds")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"safetensors header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict):
        raise ValueError("safetensors __metadata__ is not an object")
    return {str(k): str(v) for k, v in meta.items()}
