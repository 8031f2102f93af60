"""Offline demo data: scikit-learn's bundled 8x8 digits as RGB images, in memory or as an image folder.

    digit_examples("train", image_px=64)  ->  [(sklearn index, PIL RGB image, "seven"), ...]
    write_image_folder("/tmp/digits")     ->  /tmp/digits/{train,test}/{zero,...,nine}/NNNN.png

NNNN is the sklearn index, so the folder and the in-memory examples name the same digit. Read the
folder back with `sources.image_folder_records(root, "train")`: each image becomes "What is the
name of the subject in this photo?" -> "The subject in this photo is: seven". The split is a
seeded permutation (deterministic); a `digits.json` marker makes rewriting the same folder free.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEFAULT_IMAGE_PX = 64  # 64x64 -> 4 merged image tokens for patch 16 / merge 2 (Qwen3-VL)
SPLITS = ("train", "test")


def digit_image(pixels_8x8: np.ndarray, image_px: int) -> Image.Image:
    """float [8, 8] in 0..16 -> RGB image_px x image_px, dark digit on white, nearest upsampling
    (keeps the 8x8 cells crisp, so the task stays about shape, not interpolation)."""
    gray = (255 - np.clip(pixels_8x8 / 16.0, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").resize((image_px, image_px), Image.NEAREST).convert("RGB")


def split_indices(split: str, *, test_fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """sklearn indices of a split: a seeded permutation whose last test_fraction is "test"."""
    from sklearn.datasets import load_digits

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    num_images = len(load_digits().target)
    order = np.random.default_rng(seed).permutation(num_images)
    num_test = int(round(num_images * test_fraction))
    return order[num_images - num_test :] if split == "test" else order[: num_images - num_test]


def digit_examples(split: str, image_px: int = DEFAULT_IMAGE_PX, *, test_fraction: float = 0.2,
                   seed: int = 0) -> list[tuple[int, Image.Image, str]]:
    """[(sklearn index, RGB image, class name)] of a split, in split order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return [(int(i), digit_image(digits.images[i], image_px), DIGIT_NAMES[int(digits.target[i])])
            for i in split_indices(split, test_fraction=test_fraction, seed=seed)]


def write_image_folder(root: str, *, image_px: int = DEFAULT_IMAGE_PX, test_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write `<root>/<split>/<name>/<index:04d>.png` for both splits; returns the params and
    per-split counts. Does nothing when root already holds a folder written with the same params."""
    params = {"image_px": image_px, "test_fraction": test_fraction, "seed": seed}
    marker = os.path.join(root, "digits.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            existing = json.load(f)
        if {k: existing.get(k) for k in params} == params:
            return existing
    counts = {}
    for split in SPLITS:
        for name in DIGIT_NAMES:
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
        examples = digit_examples(split, image_px, test_fraction=test_fraction, seed=seed)
        for index, image, name in examples:
            image.save(os.path.join(root, split, name, f"{index:04d}.png"))
        counts[split] = len(examples)
    result = {**params, **counts}
    with open(marker, "w") as f:  # written last: a crash mid-way leaves no marker, so it reruns
        json.dump(result, f)
    return result
