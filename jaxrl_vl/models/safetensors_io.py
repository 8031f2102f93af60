"""Minimal safetensors reader/writer over numpy (with ml_dtypes for bfloat16).

The `safetensors` package's numpy API cannot represent bfloat16, which is how published Qwen-VL weights
are stored; the format itself is tiny (8-byte little-endian header length, JSON header, raw bytes), so
reading it directly also gives zero-copy memory maps of large shards.
"""
from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def dtype_name(dtype) -> str:
    """numpy dtype -> the torch dtype name transformers writes in config.json ("float32", "bfloat16")."""
    return _TORCH_NAMES.get(_CODES.get(np.dtype(dtype), ""), str(np.dtype(dtype)))


def read(path: str) -> dict[str, np.ndarray]:
    """{name: read-only memory-mapped array} of one .safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    data_start = 8 + header_len
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        if data_start + end > raw.shape[0]:
            raise ValueError(f"{path}: tensor {name!r} extends past the end of the file (truncated checkpoint)")
        dtype = _DTYPES[info["dtype"]]
        out[name] = raw[data_start + begin:data_start + end].view(dtype).reshape(info["shape"])
    return out


def write(path: str, tensors: dict[str, np.ndarray]) -> None:
    """Write {name: array} as one .safetensors file (metadata format "pt", as transformers expects)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in _CODES:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": _CODES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for array in arrays:
            f.write(array.tobytes())
