"""Numpy-only decoding of vLLM's rendered multimodal data (no vllm or torch import).

vLLM's `/v1/chat/completions/render` returns `features.kwargs_data.image`: one base64 string per
image, each a msgpack map written by vLLM 0.32's `MsgpackEncoder` for a `MultiModalKwargsItem`
(`vllm/entrypoints/scale_out/token_in_token_out/mm_serde.py`, `vllm/v1/serial_utils.py`):

    {field_name: {"data": [dtype_name, shape, Ext(3, raw bytes)] | nested lists of those | number,
                  "field": [factory_name, factory_kwargs]}}

Ext code 3 (`CUSTOM_TYPE_RAW_VIEW`) holds the tensor bytes inline (mm_serde forces inline).
For Qwen-VL images the fields are `pixel_values` uint8 [patches, C*T*p*p] (vLLM normalises on
device, `mm_device_do_normalize`; apply `(x/255 - mean)/std` host-side) and `image_grid_thw`
int64 [3]. tests/test_vllm_render.py pins this format to the served vLLM version.
"""
import base64
import math
from typing import Any

import msgpack
import numpy as np

_RAW_VIEW_EXT_CODE = 3  # vllm.v1.serial_utils.CUSTOM_TYPE_RAW_VIEW
_TORCH_TO_NUMPY_DTYPE = {
    "uint8": np.uint8, "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
    "float16": np.float16, "float32": np.float32, "float64": np.float64, "bool": np.bool_,
}


def _numpy_dtype(name: str):
    if name in _TORCH_TO_NUMPY_DTYPE:
        return np.dtype(_TORCH_TO_NUMPY_DTYPE[name])
    if name == "bfloat16":
        import ml_dtypes  # a jax dependency

        return np.dtype(ml_dtypes.bfloat16)
    try:  # numpy arrays are encoded with their dtype.str, e.g. "<f4"
        return np.dtype(name)
    except TypeError as error:
        raise ValueError(f"kwargs_data: unknown tensor dtype {name!r}") from error


def _ext_hook(code: int, data: bytes):
    if code != _RAW_VIEW_EXT_CODE:
        raise ValueError(f"kwargs_data: msgpack extension type {code} is not an inline tensor "
                         f"(expected {_RAW_VIEW_EXT_CODE}); was the server started with pickle fallback?")
    return data


def _decode_nested(obj: Any):
    """[dtype, shape, bytes] -> ndarray; lists of those -> lists; numbers pass through."""
    if isinstance(obj, (int, float)):
        return obj
    if not isinstance(obj, list):
        raise ValueError(f"kwargs_data: unexpected tensor payload of type {type(obj).__name__}")
    if obj and isinstance(obj[0], str):
        dtype_name, shape, data = obj
        if not isinstance(data, bytes):
            raise ValueError("kwargs_data: tensor bytes are out-of-band (an index), expected inline data")
        dtype = _numpy_dtype(dtype_name)
        if len(data) != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"kwargs_data: {len(data)} bytes do not fill shape {shape} of {dtype_name}")
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    return [_decode_nested(x) for x in obj]


def decode_kwargs_item(encoded: str) -> dict[str, Any]:
    """One base64 kwargs_data entry -> {field_name: ndarray (or nested list / number)}."""
    raw = base64.b64decode(encoded)
    item = msgpack.unpackb(raw, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    if not isinstance(item, dict):
        raise ValueError(f"kwargs_data: expected a map of fields, got {type(item).__name__}")
    return {name: (None if elem["data"] is None else _decode_nested(elem["data"])) for name, elem in item.items()}


def decode_images(features: dict | None, merge_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Render `features` -> (pixel_values uint8 [P, C*T*p*p], image_grid_thw int32 [N_img, 3]).

    Images keep their order in the prompt. With no images returns empty arrays ([0, 0], [0, 3]).
    Checks each image's placeholder length equals prod(grid_thw) / merge_size**2.
    """
    encoded_items = ((features or {}).get("kwargs_data") or {}).get("image") or []
    if not encoded_items:
        return np.zeros((0, 0), np.uint8), np.zeros((0, 3), np.int32)
    placeholders = ((features.get("mm_placeholders") or {}).get("image")) or []
    pixels, grids = [], []
    for index, encoded in enumerate(encoded_items):
        item = decode_kwargs_item(encoded)
        for key in ("pixel_values", "image_grid_thw"):
            if not isinstance(item.get(key), np.ndarray):
                raise ValueError(f"kwargs_data.image[{index}] has no {key} array (fields: {sorted(item)}); "
                                 "is this a Qwen-VL checkpoint?")
        grid = item["image_grid_thw"].reshape(3).astype(np.int32)
        if item["pixel_values"].shape[0] != math.prod(grid):
            raise ValueError(f"image {index}: {item['pixel_values'].shape[0]} patches but grid_thw {grid.tolist()}")
        if index < len(placeholders) and placeholders[index]["length"] != math.prod(grid) // merge_size**2:
            raise ValueError(f"image {index}: placeholder length {placeholders[index]['length']} != "
                             f"prod(grid_thw)/{merge_size**2} = {math.prod(grid) // merge_size**2}")
        pixels.append(item["pixel_values"])
        grids.append(grid)
    dtypes = {p.dtype for p in pixels}
    if len(dtypes) != 1:
        raise ValueError(f"images have different pixel dtypes {sorted(map(str, dtypes))}")
    return np.concatenate(pixels, axis=0), np.stack(grids)


def normalize_pixels(pixel_values: np.ndarray, mean, std) -> np.ndarray:
    """uint8 [P, C*T*p*p] -> float32 `(x/255 - mean)/std`, mean/std per channel (the flattened
    patch is channel-major: C, then T, then p*p, as in the HF processor)."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    channels = mean.shape[0]
    num_patches, dim = pixel_values.shape
    x = pixel_values.astype(np.float32).reshape(num_patches, channels, dim // channels) / np.float32(255.0)
    x = (x - mean[None, :, None]) / std[None, :, None]
    return x.reshape(num_patches, dim)
