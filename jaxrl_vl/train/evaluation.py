"""Evaluation during training: held-out NLL and greedy generation accuracy.

Generation runs through a backend with one method, `generate(prompts, max_new_tokens) -> texts`:
  - `VLLMGenerator` (train/vllm_eval.py): pushes the current weights into a vLLM server and samples
    greedily there (the design's source of truth; default whenever a server is configured).
  - `JaxGreedyGenerator` (here): a KV-cache-free greedy decode over our own model, for machines
    without vLLM. Each new token re-runs the forward over a fixed [B, prompt + new] buffer, which is
    cheap for the short answers of classification evals and needs no extra model code.
A prompt is a rendered example cut right before its last assistant turn's content, i.e. ending in
`<|im_start|>assistant\\n` exactly as add_generation_prompt renders it.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_vl import models
from jaxrl_vl.data.render import RenderedExample, normalize_pixels


@dataclasses.dataclass(frozen=True)
class GenerationPrompt:
    """A prompt's token ids int32 [L], uint8/float pixels [P, D], grid [n, 3]; the reference answer."""
    id: str
    input_ids: np.ndarray
    pixel_values: np.ndarray
    image_grid_thw: np.ndarray
    reference: str
    label: str | None = None
    messages: tuple = ()  # the chat up to (not including) the evaluated assistant turn, for vLLM render


def prompt_from_example(example: RenderedExample, record: dict) -> GenerationPrompt:
    """Cut the rendered chat before the last assistant turn; the reference is that turn's text."""
    if len(example.assistant_spans) == 0:
        raise ValueError(f"record {example.id}: no assistant turn to evaluate")
    start = int(example.assistant_spans[-1][0])
    keep_images = int(np.sum(example.image_spans[:, 1] <= start)) if len(example.image_spans) else 0
    keep_patches = int(example.image_grid_thw[:keep_images].prod(axis=1).sum())
    roles = [m.get("role") for m in record["messages"]]
    last_assistant = len(roles) - 1 - roles[::-1].index("assistant")
    last = record["messages"][last_assistant]
    reference = last["content"] if isinstance(last.get("content"), str) else " ".join(
        part.get("text", "") for part in last.get("content") or [] if isinstance(part, dict))
    return GenerationPrompt(id=example.id, input_ids=example.input_ids[:start],
                            pixel_values=example.pixel_values[:keep_patches],
                            image_grid_thw=example.image_grid_thw[:keep_images], reference=reference,
                            label=record.get("label"), messages=tuple(record["messages"][:last_assistant]))


def _normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def is_correct(generated: str, prompt: GenerationPrompt) -> bool:
    """Classification records (with `label`): the text after the last ':' equals the label.
    Others: the whole answer equals the reference (whitespace/case-insensitive)."""
    generated = re.sub(r"<\|im_end\|>.*$", "", generated, flags=re.S)
    if prompt.label is not None:
        answer = generated.rsplit(":", 1)[-1]
        return _normalize(answer) == _normalize(str(prompt.label))
    return _normalize(generated) == _normalize(prompt.reference)


class JaxGreedyGenerator:
    """Greedy decoding with our JAX model (see module doc)."""

    name = "jax"

    def __init__(self, model_config, tokenizer, *, image_mean, image_std, stop_token_ids: tuple[int, ...],
                 pad_id: int, batch_size: int = 32, dtype=jnp.float32):
        self.model_config, self.tokenizer = model_config, tokenizer
        self.image_mean, self.image_std = image_mean, image_std
        self.stop_token_ids, self.pad_id, self.batch_size = tuple(stop_token_ids), pad_id, batch_size
        self.dtype = dtype
        self._next_token = jax.jit(self._next_token_impl)

    def _next_token_impl(self, params, batch, cursor):
        """batch [B, L] with rows valid up to cursor[b] -> argmax token at position cursor[b]."""
        logits = models.apply(params, batch, self.model_config, dtype=self.dtype)
        last = jnp.take_along_axis(logits, (cursor - 1)[:, None, None], axis=1)[:, 0]
        return jnp.argmax(last, axis=-1).astype(jnp.int32)

    def _decode_chunk(self, params, prompts: list[GenerationPrompt], max_new_tokens: int) -> list[list[int]]:
        prompt_lengths = np.array([len(p.input_ids) for p in prompts])
        total = int(prompt_lengths.max()) + max_new_tokens
        total = -(-total // 16) * 16  # few distinct shapes across evals
        rows = [{"input_ids": np.concatenate([p.input_ids, np.full(total - len(p.input_ids), self.pad_id)]),
                 "pixel_values": normalize_pixels(p.pixel_values, self.image_mean, self.image_std),
                 "image_grid_thw": p.image_grid_thw} for p in prompts]
        num_patches = sum(int(p.image_grid_thw.prod(axis=1).sum()) for p in prompts)
        from jaxrl_vl.data.batching import patch_bucket
        # Positions of text tokens do not depend on their ids, so the buffer's M-RoPE positions are
        # computed once (generated slots hold pads) and stay valid as tokens are written.
        batch = models.make_batch(rows, self.model_config, pad_to_length=total,
                                  pad_patches_to=patch_bucket(num_patches), pad_id=self.pad_id)
        batch = {k: v for k, v in batch.items() if k != "image_grid_thw"}
        input_ids = batch["input_ids"]
        cursor = prompt_lengths.copy()
        done = np.zeros(len(prompts), bool)
        generated: list[list[int]] = [[] for _ in prompts]
        for _ in range(max_new_tokens):
            batch["input_ids"] = input_ids
            batch["segment_ids"] = (np.arange(total)[None, :] < cursor[:, None]).astype(np.int32)
            tokens = np.asarray(self._next_token(params, batch, cursor.astype(np.int32)))
            for b, token in enumerate(tokens):
                if done[b]:
                    continue
                generated[b].append(int(token))
                input_ids[b, cursor[b]] = token
                cursor[b] += 1
                done[b] = int(token) in self.stop_token_ids or cursor[b] >= total
            if done.all():
                break
        return generated

    def close(self) -> None:
        pass

    def generate_ids(self, params, prompts: list[GenerationPrompt], max_new_tokens: int) -> list[list[int]]:
        """Greedy token ids per prompt (ending with the stop token, or max_new_tokens long)."""
        ids: list[list[int]] = []
        for start in range(0, len(prompts), self.batch_size):
            ids += self._decode_chunk(params, prompts[start:start + self.batch_size], max_new_tokens)
        return ids

    def generate(self, params, prompts: list[GenerationPrompt], max_new_tokens: int, version: int = 0) -> list[str]:
        return [self.tokenizer.decode(ids, skip_special_tokens=True)
                for ids in self.generate_ids(params, prompts, max_new_tokens)]


def generation_accuracy(generate: Callable[[list[GenerationPrompt]], list[str]],
                        prompts: list[GenerationPrompt]) -> tuple[float, list[dict]]:
    """-> (accuracy in [0, 1], samples [{id, generated, reference, correct}])."""
    texts = generate(prompts)
    samples = [{"id": p.id, "generated": t, "reference": p.reference, "correct": is_correct(t, p)}
               for p, t in zip(prompts, texts)]
    return (float(np.mean([s["correct"] for s in samples])) if samples else 0.0), samples
