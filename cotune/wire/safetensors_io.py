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

LORA_FORMAT = "cotune.lora/1"  # the `format` tag of every LoRA adapter blob (cotune.lm.lora and adapter_bytes write it)

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


def adapter_bytes(state: dict[str, np.ndarray]) -> bytes:
    """The canonical bytes of a LoRA adapter held as numpy arrays: byte for byte what `cotune.lm.lora.lora_to_bytes`
    writes for the same tensors (the sha256 of these bytes is the adapter's identity), without importing torch."""
    return dumps(state, {"format": LORA_FORMAT, "keys": json.dumps(len(state))})


_DTYPE_NAMES = {"I64": "int64", "I32": "int32", "F32": "float32", "F16": "float16", "U8": "uint8"}


def _read_header(data: bytes, what: str) -> dict:
    if len(data) < 8:
        raise ValueError(f"{what} is not a safetensors blob: only {len(data)} bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > 100 << 20:
        raise ValueError(f"{what} is not a safetensors blob: header length {n} exceeds the data")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} is not a safetensors blob: bad header ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{what} is not a safetensors blob: header is not an object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict):
        raise ValueError(f"{what}: safetensors __metadata__ is not an object")
    return header


def read_metadata(data: bytes, what: str = "safetensors data") -> dict[str, str]:
    """The `__metadata__` of safetensors bytes; ValueError on a malformed header."""
    return {str(k): str(v) for k, v in _read_header(data, what).get("__metadata__", {}).items()}


def load_checked(data, *, what: str, tensors: dict[str, str], metadata: tuple[str, ...],
                 expect: dict[str, str] | None = None) -> tuple[dict, dict[str, str]]:
    """Parse safetensors bytes that must hold exactly `tensors` (name -> safetensors dtype, each 1-D), carry the
    `metadata` keys, and have the metadata values in `expect` (checked first, e.g. a format tag); everything is
    checked from the header before any array is materialized. Returns (numpy arrays, metadata). Every failure is
    a ValueError that names `what`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"{what} must be bytes, got {type(data).__name__}")
    data = bytes(data)
    header = _read_header(data, what)
    meta = {str(k): str(v) for k, v in header.get("__metadata__", {}).items()}
    for key, value in (expect or {}).items():
        if meta.get(key) != value:
            raise ValueError(f"{what} has {key} {meta.get(key)!r}, expected {value!r}")
    missing = [k for k in metadata if k not in meta]
    if missing:
        raise ValueError(f"{what} metadata lacks {missing}")
    found = {k: v for k, v in header.items() if k != "__metadata__"}
    if set(found) != set(tensors):
        raise ValueError(f"{what} must hold exactly tensors {sorted(tensors)}, found {sorted(found)}")
    for name, dtype in tensors.items():
        info = found[name]
        if not isinstance(info, dict) or info.get("dtype") != dtype or len(info.get("shape", [])) != 1:
            raise ValueError(f"{what} tensor '{name}' must be 1-D {_DTYPE_NAMES.get(dtype, dtype)}, found {info!r}")
    from safetensors.numpy import load

    try:
        arrays = load(data)
    except Exception as exc:  # noqa: BLE001 - any parse failure is bad input
        raise ValueError(f"{what} safetensors data is corrupt: {exc}") from exc
    return arrays, meta


def load_arrays(data, what: str = "safetensors data") -> dict[str, np.ndarray]:
    """Every tensor of safetensors bytes as a writable numpy array, without torch. numpy has no bfloat16, so BF16
    tensors come back widened (exactly) to float32. ValueError on malformed or corrupt data."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"{what} must be bytes, got {type(data).__name__}")
    data = bytes(data)
    header = _read_header(data, what)
    bf16 = [k for k, v in header.items() if k != "__metadata__" and isinstance(v, dict) and v.get("dtype") == "BF16"]
    if bf16:  # load the raw bits as uint16 (data offsets are relative to the end of the header, so it may change size)
        (n,) = struct.unpack("<Q", data[:8])
        for key in bf16:
            header[key] = {**header[key], "dtype": "U16"}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
        text += b" " * (-len(text) % 8)
        data = struct.pack("<Q", len(text)) + text + data[8 + n :]
    from safetensors.numpy import load

    try:
        arrays = load(data)
    except Exception as exc:  # noqa: BLE001 - any parse failure is bad data
        raise ValueError(f"{what} safetensors data is corrupt: {exc}") from exc
    out = {}
    for key, array in arrays.items():
        out[key] = (array.astype(np.uint32) << 16).view(np.float32) if key in bf16 else array.copy()
    return out
