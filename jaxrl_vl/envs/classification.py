"""Single-turn image classification as a chat env (reward 1.0 for the right class name).

The user shows one image and asks tinker-cookbook's question "What is the name of the subject in
this photo?"; the expected reply is "The subject in this photo is: <name>". Grading follows the
cookbook's eval: the text after the last ':' (the whole reply if there is none), lowercased, with
punctuation and extra spaces dropped, must equal the class name.

Registered names:
- "digits": sklearn's digits, in memory (`split`, `image_px`) or from a folder written by
  `jaxrl_vl.data.digits` (`root`).
- "image_folder": any `<root>/<split>/<class>/*.{png,jpg}` folder (`root`, `split`).
An episode's example is `examples[seed % len(examples)]`, so seeds 0..n-1 visit each example once.
"""

from __future__ import annotations

import os
import re
from typing import Any

from PIL import Image

from jaxrl_vl.envs.base import Message, StepResult, image_part, register_env, text_part, user_message

QUESTION = "What is the name of the subject in this photo?"
ANSWER_PREFIX = "The subject in this photo is:"
FORMAT_HINT = f' Answer as "{ANSWER_PREFIX} <name>".'
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

# (id, image as PIL.Image or a file path, class name)
Example = tuple[str, Any, str]


def normalize_name(text: str) -> str:
    """Folder or answer text -> comparable class name: lowercase, `_ . -` and punctuation -> space."""
    text = re.sub(r"[^\w\s]|_", " ", text.lower())
    return " ".join(text.split())


def extract_answer(reply: str) -> str:
    """The predicted class name: the text after the last ':' (or the whole reply), normalized."""
    return normalize_name(reply.rsplit(":", 1)[-1])


def answer_text(class_name: str) -> str:
    return f"{ANSWER_PREFIX} {class_name}"


class ImageClassificationEnv:
    """One turn: image + question -> reply; reward 1.0 if the reply names the right class."""

    max_turns = 1
    keep_last_images = None

    def __init__(self, examples: list[Example], format_hint: bool = False):
        if not examples:
            raise ValueError("examples is empty; check the data folder or split name")
        self.examples = examples
        self.question = QUESTION + (FORMAT_HINT if format_hint else "")
        self.current: Example | None = None

    def reset(self, seed: int) -> list[Message]:
        self.current = self.examples[seed % len(self.examples)]
        image = self.current[1]
        if isinstance(image, str):
            with Image.open(image) as f:
                image = f.convert("RGB")
        return [user_message(image_part(image), text_part(self.question))]

    def step(self, assistant_text: str) -> StepResult:
        if self.current is None:
            raise RuntimeError("call reset(seed) before step")
        example_id, _, label = self.current
        predicted = extract_answer(assistant_text)
        correct = predicted == normalize_name(label)
        self.current = None
        info = {"id": example_id, "label": label, "predicted": predicted, "success": correct}
        return StepResult(messages=[], reward=1.0 if correct else 0.0, done=True, info=info)


def image_folder_examples(root: str, split: str) -> list[Example]:
    """`<root>/<split>/<class>/<file>` -> examples in sorted (class, file) order."""
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"no split folder {split_dir}; expected <root>/<split>/<class>/*.png")
    examples = []
    for class_dir in sorted(os.listdir(split_dir)):
        folder = os.path.join(split_dir, class_dir)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                examples.append((f"{split}/{class_dir}/{name}", os.path.join(folder, name), normalize_name(class_dir)))
    return examples


def make_image_folder_env(root: str, split: str = "train", format_hint: bool = False) -> ImageClassificationEnv:
    return ImageClassificationEnv(image_folder_examples(root, split), format_hint=format_hint)


def make_digits_env(
    split: str = "train", root: str | None = None, image_px: int | None = None, format_hint: bool = False
) -> ImageClassificationEnv:
    """Digits from `root` (a folder by jaxrl_vl.data.digits) or built in memory from sklearn."""
    if root is not None:
        if image_px is not None:
            raise ValueError("image_px applies only without root (the folder's images are already sized)")
        return make_image_folder_env(root, split, format_hint)
    from jaxrl_vl.data import digits

    px = digits.DEFAULT_IMAGE_PX if image_px is None else image_px
    # Same (class, index) order as the folder layout, so a seed picks the same digit either way.
    triples = sorted(digits.digit_examples(split, px), key=lambda t: (t[2], t[0]))
    examples = [(f"{split}/{name}/{i:04d}.png", im, name) for i, im, name in triples]
    return ImageClassificationEnv(examples, format_hint=format_hint)


register_env("digits", make_digits_env)
register_env("image_folder", make_image_folder_env)
