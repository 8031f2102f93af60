"""Image references in chat records -> RGB PIL images, and back to data URIs for vLLM.

An image item in a message's content is `{"type": "image", "image": REF}` where REF is one of:
- an absolute path (sources resolve relative paths against the jsonl file's folder),
- a `file://` URL to a local file,
- a data URI `data:image/<fmt>;base64,<payload>`,
- a dict `{"bytes": <bytes | base64 str>}` or `{"path": <str>}` (Hugging Face datasets' Image layout),
- raw `bytes` of an encoded image, or a `PIL.Image.Image`.
No network: http(s) URLs are rejected with a clear error.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from urllib.parse import unquote, urlparse

from PIL import Image


class ImageLoadError(ValueError):
    """An image reference that does not resolve to a decodable image (missing file, corrupt bytes)."""


def is_image_item(item) -> bool:
    return isinstance(item, dict) and item.get("type") in ("image", "image_url")


def image_ref(item: dict):
    """The REF of an image content item (`image` key, or OpenAI `image_url.url`)."""
    if item.get("type") == "image_url":
        url = item.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    return item.get("image")


def local_path_of(ref) -> str | None:
    """The filesystem path a REF points at, or None when the REF carries its own bytes."""
    if isinstance(ref, dict):
        return ref.get("path") if not ref.get("bytes") else None
    if not isinstance(ref, str) or ref.startswith("data:"):
        return None
    if ref.startswith("file://"):
        return unquote(urlparse(ref).path)
    return ref


def _decode_base64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageLoadError(f"{what} is not valid base64 ({err})") from err


def _encoded_bytes(ref) -> bytes:
    """The encoded (png/jpeg/...) bytes of a REF; raises ImageLoadError naming the problem."""
    if isinstance(ref, (bytes, bytearray)):
        return bytes(ref)
    if isinstance(ref, dict):
        if ref.get("bytes"):
            payload = ref["bytes"]
            return payload if isinstance(payload, bytes) else _decode_base64(payload, "image bytes")
        if ref.get("path"):
            return _encoded_bytes(ref["path"])
        raise ImageLoadError("image dict has neither 'bytes' nor 'path'")
    if not isinstance(ref, str) or not ref:
        raise ImageLoadError(f"image reference must be a path, file:// URL, data URI or bytes, got {type(ref).__name__}")
    if ref.startswith("data:"):
        header, _, payload = ref.partition(",")
        if ";base64" not in header:
            raise ImageLoadError("data URI must be base64 encoded (data:image/png;base64,...)")
        return _decode_base64(payload, "data URI payload")
    if ref.startswith(("http://", "https://")):
        raise ImageLoadError(f"remote image URLs are not fetched (no network): {ref[:80]}; download it and use a path")
    path = local_path_of(ref)
    if not os.path.isfile(path):
        raise ImageLoadError(f"image file not found: {path}")
    with open(path, "rb") as f:
        return f.read()


def load_image(ref) -> Image.Image:
    """REF -> fully decoded RGB image. Corrupt or truncated files raise ImageLoadError."""
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    data = _encoded_bytes(ref)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now so truncated files fail here, not inside a processor
    except Exception as err:  # PIL raises several unrelated types for bad data
        raise ImageLoadError(f"cannot decode image ({type(err).__name__}: {err})") from err
    return image.convert("RGB")


def png_data_uri(image: Image.Image) -> str:
    """Lossless data URI of a decoded image: vLLM then sees exactly the pixels the HF path sees."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
