"""Tinker model inputs -> token rows for the JAX model, with image chunks expanded.

Tinker clients send `<|vision_start|>`, an image chunk (encoded png/jpeg + expected_tokens), then
`<|vision_end|>` - never `<|image_pad|>` ids. The server decodes each image, runs the checkpoint's own
HF image processor (so the count equals the client's `get_number_of_image_patches // merge**2` and
vLLM's placeholder length), inserts that many `<|image_pad|>` ids, and checks the count against
`expected_tokens` (a mismatch is a user error naming both numbers).
"""
from __future__ import annotations

import hashlib
import io
from collections import OrderedDict

import numpy as np

from jaxrl_vl.tinker.protocol import Chunk, ImageChunk, TextChunk, UserError


def decode_image(chunk: ImageChunk, where: str):
    from PIL import Image
    try:
        image = Image.open(io.BytesIO(chunk.data))
        image.load()
    except Exception as error:
        raise UserError(f"{where}: image data ({len(chunk.data)} bytes, format {chunk.format!r}) could not be "
                        f"decoded: {error}") from error
    return image.convert("RGB")


class ImageExpander:
    """Holds the checkpoint's image processor; caches processed images by content hash."""

    def __init__(self, model_dir: str, image_token_id: int, merge_size: int, text_substitute_id: int):
        from transformers import AutoImageProcessor
        self.processor = AutoImageProcessor.from_pretrained(model_dir)
        self.image_token_id = int(image_token_id)
        # The JAX model finds image positions by id, so an <|image_pad|> id inside a TEXT chunk (a policy
        # can sample it) would be taken for an image. Such inputs get this id instead (the video pad:
        # never an image, never a video here); only that token's input embedding differs, targets keep
        # the real ids.
        self.text_substitute_id = int(text_substitute_id)
        self.merge_size = int(merge_size)
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.max_cached = 1024  # eval sets send the same images every evaluation

    def _processed(self, chunk: ImageChunk, where: str) -> tuple[np.ndarray, np.ndarray]:
        digest = hashlib.sha1(chunk.data).hexdigest()
        if digest in self._cache:
            self._cache.move_to_end(digest)
            return self._cache[digest]
        out = self.processor(images=[decode_image(chunk, where)], return_tensors="np")
        value = (np.asarray(out["pixel_values"], np.float32),
                 np.asarray(out["image_grid_thw"], np.int64).reshape(-1, 3))
        self._cache[digest] = value
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return value

    def process(self, chunk: ImageChunk, where: str) -> tuple[np.ndarray, np.ndarray, int]:
        """-> (pixel_values float32 [P, D] normalized, image_grid_thw int64 [1, 3], image tokens)."""
        pixels, grid = self._processed(chunk, where)
        tokens = int(np.prod(grid, axis=1).sum()) // (self.merge_size ** 2)
        if chunk.expected_tokens is not None and int(chunk.expected_tokens) != tokens:
            raise UserError(f"{where}: image expands to {tokens} image tokens with this checkpoint's processor, "
                            f"but expected_tokens={chunk.expected_tokens}; compute expected_tokens with the "
                            "same processor config (image_processor.get_number_of_image_patches(h, w) // "
                            "merge_size**2)")
        return pixels, grid, tokens

    def expand(self, chunks: list[Chunk], where: str) -> dict:
        """-> {"input_ids": int32 [N] (model inputs), "token_ids": int32 [N] (the client's ids),
        "pixel_values": float32 [P, D] | None, "image_grid_thw": [n, 3], "is_image": bool [N],
        "images": [(offset, length, ImageChunk)]}."""
        ids: list[np.ndarray] = []
        client_ids: list[np.ndarray] = []  # as the client meant them (no substitution)
        pixels, grids, images = [], [], []
        offset = 0
        for j, chunk in enumerate(chunks):
            if isinstance(chunk, TextChunk):
                tokens = np.asarray(chunk.tokens, np.int32)
                client_ids.append(tokens)
                ids.append(np.where(tokens == self.image_token_id, self.text_substitute_id, tokens).astype(np.int32))
                offset += len(chunk.tokens)
                continue
            p, g, n = self.process(chunk, f"{where}.chunks[{j}]")
            pixels.append(p)
            grids.append(g)
            images.append((offset, n, chunk))
            ids.append(np.full(n, self.image_token_id, np.int32))
            client_ids.append(ids[-1])
            offset += n
        input_ids = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        if len(input_ids) == 0:
            raise UserError(f"{where}: the model input is empty")
        return {"input_ids": input_ids, "token_ids": np.concatenate(client_ids),
                "pixel_values": np.concatenate(pixels) if pixels else None,
                "image_grid_thw": np.concatenate(grids) if grids else np.zeros((0, 3), np.int64),
                "is_image": input_ids == self.image_token_id, "images": images}
