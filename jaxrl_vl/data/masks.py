"""Token spans in rendered chats: assistant turns (for loss masks) and image placeholders.

An assistant turn is `<|im_start|>assistant\\n CONTENT <|im_end|>`. The loss covers CONTENT and the
closing `<|im_end|>` (so the model learns to stop) but not the header. `loss_mask[t] == 1` means
token t is a training target (it is predicted from tokens < t; the loss shifts).
"""

from __future__ import annotations

import numpy as np

LOSS_ON_CHOICES = ("last", "all")


def find_assistant_spans(input_ids: np.ndarray, header_ids, end_id: int) -> np.ndarray:
    """input_ids int[L], header_ids = token ids of "<|im_start|>assistant\\n" -> int32[k, 2] of
    [start, end) per assistant turn: start right after the header, end just past `<|im_end|>`
    (or L when the turn is unterminated, e.g. a truncated example)."""
    ids = np.asarray(input_ids)
    header = np.asarray(header_ids)
    n = len(header)
    spans = []
    if n == 0 or len(ids) < n:
        return np.zeros((0, 2), np.int32)
    starts = np.flatnonzero(ids[: len(ids) - n + 1] == header[0])
    for start in starts:
        if not np.array_equal(ids[start : start + n], header):
            continue
        content_start = start + n
        ends = np.flatnonzero(ids[content_start:] == end_id)
        content_end = content_start + int(ends[0]) + 1 if len(ends) else len(ids)
        spans.append((content_start, content_end))
    return np.asarray(spans, np.int32).reshape(-1, 2)


def find_image_spans(input_ids: np.ndarray, image_token_id: int) -> np.ndarray:
    """int32[n, 2] of [start, end) runs of the image placeholder token, one per image in order."""
    is_image = np.asarray(input_ids) == image_token_id
    edges = np.diff(np.concatenate([[0], is_image.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return np.stack([starts, ends], axis=1).astype(np.int32).reshape(-1, 2)


def loss_mask_from_spans(length: int, assistant_spans: np.ndarray, loss_on: str = "last") -> np.ndarray:
    """float32[length]: 1 on the chosen assistant spans ("last" turn only, or "all" turns)."""
    if loss_on not in LOSS_ON_CHOICES:
        raise ValueError(f"loss_on must be one of {LOSS_ON_CHOICES}, got {loss_on!r}")
    mask = np.zeros(length, np.float32)
    spans = assistant_spans[-1:] if loss_on == "last" else assistant_spans
    for start, end in spans:
        mask[start:end] = 1.0
    return mask
