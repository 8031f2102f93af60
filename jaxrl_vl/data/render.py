"""Chat messages -> token ids, uint8 pixel patches, grid sizes and assistant spans.

`Renderer` is the protocol; `HFRenderer` renders locally with the checkpoint's tokenizer (chat
template) and image processor, `VLLMRenderer` (render_vllm.py) asks a vLLM server, the source of
truth. Both return pixels as uint8 [P, C*T*p*p] (the resized image, before rescale/normalise), so
the two can be compared exactly; `normalize_pixels` turns them into the model's float32 input.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Protocol

import numpy as np

from jaxrl_vl.data import images as images_lib
from jaxrl_vl.data import masks

IMAGE_TOKEN = "<|image_pad|>"
ASSISTANT_HEADER = "<|im_start|>assistant\n"
TURN_END = "<|im_end|>"


@dataclasses.dataclass(frozen=True)
class RenderedExample:
    """One rendered chat. Shapes: input_ids int32[L]; pixel_values uint8 (or float32) [P, D] with
    P = sum(prod(image_grid_thw)) (P = 0 without images); image_grid_thw int32[n, 3];
    assistant_spans int32[k, 2] and image_spans int32[n, 2] are [start, end) token ranges.
    loss_on: the record's own "loss_on" ("last" | "all"), which overrides the pipeline default."""

    input_ids: np.ndarray
    pixel_values: np.ndarray
    image_grid_thw: np.ndarray
    assistant_spans: np.ndarray
    image_spans: np.ndarray
    id: str = ""
    loss_on: str | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def loss_mask(self, loss_on: str = "last") -> np.ndarray:
        """float32[L], 1 on assistant content + `<|im_end|>` of the last turn or of all turns
        (`loss_on`, unless the record set its own)."""
        return masks.loss_mask_from_spans(self.num_tokens, self.assistant_spans, self.loss_on or loss_on)


class Renderer(Protocol):
    """Renders OpenAI-style messages (images as content items, see images.py) and tool schemas."""

    image_mean: tuple[float, ...]  # per channel, for normalize_pixels
    image_std: tuple[float, ...]
    pad_token_id: int
    image_token_id: int
    end_id: int  # <|im_end|>, the stop token
    tokenizer: object  # the checkpoint's tokenizer (decoding, generation prompts)

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> RenderedExample: ...


def normalize_pixels(pixel_values: np.ndarray, image_mean, image_std) -> np.ndarray:
    """uint8 [P, C*T*p*p] -> float32 (x/255 - mean[c]) / std[c]; float input passes through.

    The patch layout is channel-major (C, T, p, p), as Qwen-VL's processors flatten it."""
    if pixel_values.dtype != np.uint8:
        return pixel_values.astype(np.float32, copy=False)
    num_channels = len(image_mean)
    num_patches, dim = pixel_values.shape
    x = pixel_values.astype(np.float32).reshape(num_patches, num_channels, dim // num_channels) / 255.0
    mean = np.asarray(image_mean, np.float32)[None, :, None]
    std = np.asarray(image_std, np.float32)[None, :, None]
    return ((x - mean) / std).reshape(num_patches, dim)


def make_rendered_example(input_ids, pixel_values, image_grid_thw, *, image_token_id: int, header_ids,
                          end_id: int, merge_size: int, patch_dim: int, record_id: str = "") -> RenderedExample:
    """Assemble and check a RenderedExample: placeholder runs must match grid sizes."""
    input_ids = np.asarray(input_ids, np.int32)
    grid = np.asarray(image_grid_thw if image_grid_thw is not None else np.zeros((0, 3)), np.int32).reshape(-1, 3)
    pixels = np.zeros((0, patch_dim), np.uint8) if pixel_values is None else np.asarray(pixel_values)
    image_spans = masks.find_image_spans(input_ids, image_token_id)
    want_lengths = grid.prod(axis=1) // (merge_size**2)
    got_lengths = image_spans[:, 1] - image_spans[:, 0]
    if len(want_lengths) != len(got_lengths) or not np.array_equal(want_lengths, got_lengths):
        raise ValueError(f"image placeholder runs {got_lengths.tolist()} do not match grid sizes "
                         f"{want_lengths.tolist()} (does the chat template render every image item?)")
    if pixels.shape[0] != int(grid.prod(axis=1).sum()):
        raise ValueError(f"{pixels.shape[0]} pixel patches but grids need {int(grid.prod(axis=1).sum())}")
    return RenderedExample(input_ids=input_ids, pixel_values=pixels, image_grid_thw=grid,
                           assistant_spans=masks.find_assistant_spans(input_ids, header_ids, end_id),
                           image_spans=image_spans, id=record_id)


def _template_messages(messages):
    """Messages for the chat template (image items become bare `{"type": "image"}`) and the decoded
    images in order of appearance."""
    images, out = [], []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            new_content = []
            for part in content:
                if images_lib.is_image_item(part):
                    images.append(images_lib.load_image(images_lib.image_ref(part)))
                    part = {"type": "image"}
                new_content.append(part)
            message = {**message, "content": new_content}
        out.append(message)
    return out, images


def processor_chat_template(model_dir: str) -> str | None:
    """The processor's chat template (chat_template.jinja, or the older chat_template.json), which
    vLLM prefers over the tokenizer's: Qwen-VL checkpoints ship the multimodal template there."""
    jinja_path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    json_path = os.path.join(model_dir, "chat_template.json")
    if os.path.isfile(json_path):
        with open(json_path, encoding="utf-8") as f:
            return json.load(f).get("chat_template")
    return None


def _tokenizer_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def set_vocab_facts(renderer, tokenizer, image_processor) -> None:
    """The token ids and image-processor constants every renderer exposes (shared by both renderers,
    so local and vLLM rendering agree on what an image, a turn end and an assistant header are)."""
    renderer.tokenizer = tokenizer
    renderer.image_mean = tuple(float(v) for v in image_processor.image_mean)
    renderer.image_std = tuple(float(v) for v in image_processor.image_std)
    renderer.merge_size = int(image_processor.merge_size)
    renderer.patch_dim = 3 * int(image_processor.temporal_patch_size) * int(image_processor.patch_size) ** 2
    renderer.image_token_id = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    renderer.end_id = int(tokenizer.convert_tokens_to_ids(TURN_END))
    pad = tokenizer.pad_token_id
    renderer.pad_token_id = int(pad if pad is not None else tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    renderer.header_ids = _tokenizer_ids(tokenizer, ASSISTANT_HEADER)


class HFRenderer:
    """Local renderer: the checkpoint's tokenizer (with its chat template) + image processor.

    Loads `AutoTokenizer` and `AutoImageProcessor` rather than `AutoProcessor` because the Qwen-VL
    processors also build a video processor, which needs torchvision (absent from the trainer env).
    The placeholder expansion (`<|image_pad|>` x prod(grid)/merge^2) is the processor's rule.
    """

    def __init__(self, tokenizer, image_processor):
        self.image_processor = image_processor
        set_vocab_facts(self, tokenizer, image_processor)
        if tokenizer.chat_template is None:
            raise ValueError("the tokenizer has no chat_template; save one with the checkpoint (chat_template.jinja)")

    @classmethod
    def from_pretrained(cls, model_dir: str) -> "HFRenderer":
        from transformers import AutoImageProcessor, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        template = processor_chat_template(model_dir)
        if template is not None:
            tokenizer.chat_template = template
        return cls(tokenizer, AutoImageProcessor.from_pretrained(model_dir))

    def render_text(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The chat template's text (one `<|image_pad|>` per image, not yet expanded)."""
        template_messages, _ = _template_messages(messages)
        return self.tokenizer.apply_chat_template(template_messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=False)

    def image_patches(self, images) -> tuple[np.ndarray, np.ndarray]:
        """PIL images -> (uint8 [P, D] resized pixels, int32 [n, 3] grids)."""
        if not images:
            return np.zeros((0, self.patch_dim), np.uint8), np.zeros((0, 3), np.int32)
        out = self.image_processor(images=images, do_rescale=False, do_normalize=False, return_tensors="np")
        raw = np.asarray(out["pixel_values"])
        uint8 = np.clip(np.round(raw), 0, 255).astype(np.uint8)
        if not np.array_equal(uint8, raw):
            raise ValueError("image processor returned non-integer pixels with do_rescale=False; cannot keep uint8")
        return uint8, np.asarray(out["image_grid_thw"], np.int32)

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> RenderedExample:
        template_messages, images = _template_messages(messages)
        text = self.tokenizer.apply_chat_template(template_messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=False)
        pixels, grid = self.image_patches(images)
        pieces = text.split(IMAGE_TOKEN)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"chat template rendered {len(pieces) - 1} image tokens for {len(images)} images")
        expanded = pieces[0]
        for index, piece in enumerate(pieces[1:]):
            expanded += IMAGE_TOKEN * int(grid[index].prod() // self.merge_size**2) + piece
        return make_rendered_example(_tokenizer_ids(self.tokenizer, expanded), pixels, grid,
                                     image_token_id=self.image_token_id, header_ids=self.header_ids,
                                     end_id=self.end_id, merge_size=self.merge_size, patch_dim=self.patch_dim)


def render_record(renderer: Renderer, record: dict) -> RenderedExample:
    """Render a chat record (uses its optional `tools`); the result carries the record's id and
    its optional `loss_on` ("last" | "all", e.g. multi-turn demonstrations train on every turn)."""
    loss_on = record.get("loss_on")
    if loss_on is not None and loss_on not in masks.LOSS_ON_CHOICES:
        raise ValueError(f"record field loss_on={loss_on!r}; expected one of {masks.LOSS_ON_CHOICES}")
    example = renderer.render(record["messages"], tools=record.get("tools"))
    return dataclasses.replace(example, id=record["id"], loss_on=loss_on)
