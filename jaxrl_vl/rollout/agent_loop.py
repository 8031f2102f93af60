"""Async multi-turn, multi-image agent rollouts through vLLM, with exact token alignment.

Each turn: render the visible conversation through vLLM (`/v1/chat/completions/render`), sample
with logprobs (`/inference/v1/generate`, token in / token out), decode the reply, step the env.
Many episodes run at once (asyncio, at most `max_concurrent_episodes`); each prompt/seed gets a
group of `samples_per_group` episodes with different sampling seeds.

Token alignment. Re-rendering the conversation does not reproduce the sampled tokens (decoding
them to text and tokenizing again can split differently; thinking templates drop old
reasoning), so the sequence the trainer scores is never a re-render. Instead, each turn's prompt
is the previous prompt + the ids vLLM sampled (+ `<|im_end|>` if the turn was cut by max_tokens)
+ only the NEW turn's tokens, taken from a fresh render's tail: the tokens after the `<|im_end|>`
that closes the last assistant turn (found by counting `<|im_start|>` turn headers, which earlier
turns keep however their content re-renders). The new images' placeholder offsets are shifted
to their place in the spliced sequence and their multimodal items appended, so vLLM sees exactly
the sequence the trainer will score. When an image budget (`env.keep_last_images`) drops an old
image the conversation stops being an extension of the previous prompt; the episode then starts a
new segment (a new training row) from a fresh render. See trajectory.py for the data kept.
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import time
from typing import Any, Callable, Sequence

import numpy as np

from jaxrl_vl.envs.base import (ChatEnv, StepResult, assistant_message, count_images, reset_async, step_async,
                                visible_messages)
from jaxrl_vl.rollout.client import VLLMClient, sampled_logprobs, weight_versions
from jaxrl_vl.rollout.messages import to_openai_messages
from jaxrl_vl.rollout.mm_decode import decode_kwargs_item
from jaxrl_vl.rollout.server_pool import ServerPool
from jaxrl_vl.rollout.trajectory import Segment, Trajectory

log = logging.getLogger(__name__)
# Feature fields vLLM's render returns per modality (lists parallel to mm_hashes).
_ITEM_FIELDS = ("mm_hashes", "kwargs_data", "mm_metadata")


class AlignmentError(RuntimeError):
    """A fresh render does not continue the conversation the way the spliced sequence assumes."""


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """Sampling and budgets of rollouts.

    max_turns: assistant turns per episode (None = the env's own `max_turns`).
    max_tokens_per_turn: vLLM max_tokens of each turn.
    max_sequence_tokens: tokens of one training sequence (prompt + every turn); the episode ends
      ("token_budget") when the next turn would not fit. Also bounded by the server's context.
    max_generated_tokens: sampled tokens per episode over all turns (None = no limit).
    """

    samples_per_group: int = 4
    max_concurrent_episodes: int = 16
    max_turns: int | None = None
    max_tokens_per_turn: int = 64
    max_sequence_tokens: int = 2048
    max_generated_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int = 0
    record_vllm_io: bool = False  # keep vLLM's prompt ids / placeholders per turn (tests, debugging)

    def __post_init__(self):
        for name in ("samples_per_group", "max_concurrent_episodes", "max_tokens_per_turn", "max_sequence_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"AgentConfig.{name}={getattr(self, name)} must be >= 1")
        if self.max_turns is not None and self.max_turns < 1:
            raise ValueError(f"AgentConfig.max_turns={self.max_turns} must be >= 1 or None")
        if self.temperature < 0:
            raise ValueError(f"AgentConfig.temperature={self.temperature} must be >= 0 (0 = greedy)")


# Tokens a reply must never contain: a sampled image placeholder would take a vision embedding
# in the trainer (every image token does) but a text embedding in vLLM.
BANNED_REPLY_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
BANNED_LOGIT_BIAS = -100.0  # the lowest vLLM accepts; exp(-100) leaves them no probability


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    im_start: int
    im_end: int
    image: int
    banned: tuple[int, ...] = ()  # never sampled (logit_bias -100; vLLM's raw logprobs are unaffected)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialTokens":
        names = ["<|im_start|>", "<|im_end|>", "<|image_pad|>"]
        ids = tokenizer.convert_tokens_to_ids(names)
        if any(i is None or i == tokenizer.unk_token_id for i in ids):
            raise ValueError(f"tokenizer lacks one of {names}: not a Qwen-VL chat tokenizer")
        banned = [tokenizer.convert_tokens_to_ids(t) for t in BANNED_REPLY_TOKENS]
        return cls(*ids, banned=tuple(i for i in banned if i is not None and i != tokenizer.unk_token_id))


def logit_bias(tokens: SpecialTokens) -> tuple[tuple[int, float], ...]:
    """The logit bias every rollout samples with, as (token id, bias) pairs: sent to vLLM, and the
    trainer's `logit_bias` (train/rl_step.py) wherever vLLM reports processed logprobs."""
    return tuple((t, BANNED_LOGIT_BIAS) for t in tokens.banned)


def episode_request_id(step: int, group: int, sample: int) -> str:
    """The episode's name in vLLM request ids (`<this>-turn<k>`), so server logs show which server
    sampled which turn."""
    return f"step{step}-group{group}-sample{sample}"


def sampling_seed(*parts: int) -> int:
    """A stable 31-bit seed from integers (step, group, sample, turn, ...)."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1)[0] % (2**31 - 1))


def tail_start(rendered_ids: Sequence[int], turns_before: int, tokens: SpecialTokens) -> int:
    """Index in a fresh render where the new turn's tokens begin.

    turns_before: `<|im_start|>` headers of the previous turn's render (its turns + the generation
    prompt, whose turn is the assistant reply just sampled). The new tokens start right after the
    `<|im_end|>` that closes that assistant turn."""
    starts = [i for i, t in enumerate(rendered_ids) if t == tokens.im_start]
    if len(starts) <= turns_before:
        raise AlignmentError(f"fresh render has {len(starts)} turn headers, expected more than {turns_before}")
    window = range(starts[turns_before - 1], starts[turns_before])
    closing = [i for i in window if rendered_ids[i] == tokens.im_end]
    if not closing:
        raise AlignmentError(f"no <|im_end|> closes assistant turn {turns_before} in the fresh render")
    return closing[-1] + 1


def _empty_features() -> dict:
    return {"mm_hashes": {}, "mm_placeholders": {}, "kwargs_data": {}, "mm_metadata": {}}


def _append_items(features: dict, rendered_features: dict | None, from_offset: int, shift: int) -> list[int]:
    """Appends rendered multimodal items whose placeholder starts at or after `from_offset` to
    `features`, offsets shifted by `shift`. Returns the appended items' indices (image modality)."""
    appended: list[int] = []
    if not rendered_features:
        return appended
    for modality, ranges in (rendered_features.get("mm_placeholders") or {}).items():
        for index, placeholder in enumerate(ranges):
            if placeholder["offset"] < from_offset:
                continue
            moved = dict(placeholder, offset=placeholder["offset"] + shift)
            features["mm_placeholders"].setdefault(modality, []).append(moved)
            for field in _ITEM_FIELDS:
                values = (rendered_features.get(field) or {}).get(modality)
                features[field].setdefault(modality, []).append(None if values is None else values[index])
            if modality == "image":
                appended.append(index)
    return appended


def _add_images(segment: Segment, rendered_features: dict, indices: list[int]) -> None:
    for index in indices:
        item = decode_kwargs_item(rendered_features["kwargs_data"]["image"][index])
        segment.pixel_chunks.append(item["pixel_values"])
        segment.grid_chunks.append(np.asarray(item["image_grid_thw"]).reshape(3).astype(np.int32))


def _wire_features(features: dict) -> dict | None:
    if not features["mm_hashes"]:
        return None
    return {k: v for k, v in features.items() if v}


@dataclasses.dataclass
class _EpisodeState:
    segment: Segment
    features: dict
    turn_headers: int  # <|im_start|> headers of the latest render (its generation prompt included)


async def generate_tokens(client: VLLMClient, token_ids: list[int], features: dict | None,
                          sampling_params: dict, request_id: str | None = None) -> dict:
    """POST /inference/v1/generate with `return_token_ids` so vLLM echoes the prompt it saw."""
    body: dict[str, Any] = {"model": client.model, "token_ids": token_ids, "sampling_params": sampling_params,
                            "return_token_ids": True}
    if request_id is not None:
        body["request_id"] = request_id  # vLLM logs it (--enable-log-requests) as generate-tokens-<request_id>
    if features:
        body["features"] = features
    return await client.request("POST", "/inference/v1/generate", json=body)


async def run_episode(client: VLLMClient, env: ChatEnv, env_seed: int, config: AgentConfig, *,
                      decode: Callable[[list[int]], str], tokens: SpecialTokens, max_model_len: int,
                      group_index: int = 0, sample_index: int = 0, step: int = 0) -> Trajectory:
    """One episode on `env` (a private instance: envs keep episode state). See module doc."""
    tools = getattr(env, "tools", None)
    history = await reset_async(env, env_seed)
    max_turns = env.max_turns if config.max_turns is None else min(config.max_turns, env.max_turns)
    segments: list[Segment] = []
    state: _EpisodeState | None = None
    turn_rewards, versions, finish_reasons, replies, io_records, turn_states = [], [], [], [], [], []
    timing = {"render": 0.0, "generate": 0.0, "env": 0.0}
    info: dict[str, Any] = {}
    generated = 0
    end_reason = "turn_budget"
    for turn in range(max_turns):
        visible = visible_messages(history, env.keep_last_images)
        omitted = count_images(history) - count_images(visible)
        started = time.perf_counter()
        rendered = await client.render(to_openai_messages(visible), tools=tools)
        timing["render"] += time.perf_counter() - started
        ids, rendered_features = rendered["token_ids"], rendered.get("features")
        if state is None or omitted != state.segment.omitted_images:
            # First turn, or the image budget changed earlier content: a new training sequence.
            state = _EpisodeState(Segment(omitted_images=omitted), _empty_features(), 0)
            segments.append(state.segment)
            state.segment.extend_prompt(ids)
            _add_images(state.segment, rendered_features, _append_items(state.features, rendered_features, 0, 0))
        else:
            start = tail_start(ids, state.turn_headers, tokens)
            shift = state.segment.num_tokens - start
            state.segment.extend_prompt(ids[start:])
            _add_images(state.segment, rendered_features,
                        _append_items(state.features, rendered_features, start, shift))
        state.turn_headers = sum(1 for t in ids if t == tokens.im_start)
        prompt = list(state.segment.token_ids)

        budget = min(config.max_tokens_per_turn, config.max_sequence_tokens - len(prompt),
                     max_model_len - len(prompt))
        if config.max_generated_tokens is not None:
            budget = min(budget, config.max_generated_tokens - generated)
        if budget < 1:
            end_reason = "context" if max_model_len - len(prompt) < 1 else "token_budget"
            break
        sampling = {"temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k,
                    "max_tokens": budget, "logprobs": 0, "stop_token_ids": [tokens.im_end],
                    "seed": sampling_seed(config.seed, step, group_index, sample_index, turn, env_seed)}
        if tokens.banned:
            sampling["logit_bias"] = {str(t): bias for t, bias in logit_bias(tokens)}
        started = time.perf_counter()
        response = await generate_tokens(client, prompt, _wire_features(state.features), sampling,
                                         request_id=f"{episode_request_id(step, group_index, sample_index)}-turn{turn}")
        timing["generate"] += time.perf_counter() - started
        choice = response["choices"][0]
        sampled = [int(t) for t in choice["token_ids"]]
        state.segment.extend_sampled(sampled, sampled_logprobs(choice), turn)
        generated += len(sampled)
        if config.record_vllm_io:
            io_records.append({"segment": len(segments) - 1, "prompt_token_ids": response.get("prompt_token_ids"),
                               "mm_placeholders": response.get("mm_placeholders"), "sampled": sampled,
                               "prompt_len": len(prompt)})
        if not sampled or sampled[-1] != tokens.im_end:
            state.segment.extend_prompt([tokens.im_end])  # cut by max_tokens: close the turn unsampled
        reply = decode(sampled)
        turn_states.append(env.state_key() if hasattr(env, "state_key") else None)
        started = time.perf_counter()
        try:
            result = await step_async(env, reply)
        except Exception as error:  # noqa: BLE001 - a broken env step ends this episode, not the run
            log.warning("env %s step failed (seed %d, turn %d): %r", type(env).__name__, env_seed, turn, error)
            result = StepResult(messages=[], reward=0.0, done=True, info={"env_error": repr(error)})
            end_reason = "env_error"
        timing["env"] += time.perf_counter() - started
        history = [*history, assistant_message(reply), *result.messages]
        turn_rewards.append(float(result.reward))
        versions.append(weight_versions(choice))
        finish_reasons.append(choice.get("finish_reason") or "")
        replies.append(reply)
        info = dict(result.info)
        if result.done:
            end_reason = "env_done" if end_reason != "env_error" else end_reason
            break
    if config.record_vllm_io:
        info["vllm_io"] = io_records
    return Trajectory(group_index=group_index, sample_index=sample_index, env_seed=env_seed, segments=segments,
                      turn_rewards=turn_rewards, weight_versions=versions, finish_reasons=finish_reasons,
                      replies=replies, messages=history, info=info, end_reason=end_reason, timing_seconds=timing,
                      turn_states=turn_states)


async def run_groups(clients: Sequence[VLLMClient], make_episode_env: Callable[[], ChatEnv], env_seeds: Sequence[int],
                     config: AgentConfig, *, decode: Callable[[list[int]], str], tokens: SpecialTokens,
                     step: int = 0, samples_per_group: int | None = None,
                     pool: ServerPool | None = None) -> list[list[Trajectory]]:
    """`samples_per_group` episodes for each env seed (a group), at most
    `config.max_concurrent_episodes` at once. Returns groups [G][n] in seed order.

    make_episode_env: a fresh env per episode (envs hold episode state). Routing (rollout/server_pool.py):
    every turn of an episode goes to one server, whose prefix and encoder caches hold the conversation so
    far; a new episode goes to the server with the fewest active episodes. pool: the routing state, to share
    it across calls (default: a new one over `clients`)."""
    if not clients:
        raise ValueError("run_groups needs at least one VLLMClient")
    by_url = {c.base_url: c for c in clients}
    if len(by_url) != len(clients):
        raise ValueError(f"run_groups: two clients share a server URL in {[c.base_url for c in clients]}")
    pool = ServerPool(list(by_url)) if pool is None else pool
    if sorted(pool.urls) != sorted(by_url):
        raise ValueError(f"run_groups: pool servers {pool.urls} differ from the clients' {list(by_url)}")
    n = config.samples_per_group if samples_per_group is None else samples_per_group
    max_lens = {url: await c.server_max_model_len() for url, c in by_url.items()}
    semaphore = asyncio.Semaphore(config.max_concurrent_episodes)

    async def one(group: int, sample: int, env_seed: int) -> Trajectory:
        async with semaphore:
            episode = episode_request_id(step, group, sample)
            url = pool.assign(episode)
            try:
                return await run_episode(by_url[url], make_episode_env(), env_seed, config, decode=decode,
                                         tokens=tokens, max_model_len=max_lens[url], group_index=group,
                                         sample_index=sample, step=step)
            finally:
                pool.release(episode)

    tasks = [[asyncio.ensure_future(one(g, s, seed)) for s in range(n)] for g, seed in enumerate(env_seeds)]
    try:
        return [[await t for t in group] for group in tasks]
    finally:
        for group in tasks:
            for t in group:
                t.cancel()


def env_copier(env: ChatEnv) -> Callable[[], ChatEnv]:
    """A fresh-episode env factory from a prototype env (shallow copy: shares read-only data such
    as a dataset's example list, while reset() replaces all per-episode state)."""
    return lambda: copy.copy(env)


def load_decoder(model_dir: str) -> tuple[Callable[[list[int]], str], SpecialTokens]:
    """The checkpoint's tokenizer -> (decode(ids) -> reply text without special tokens, ids)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = SpecialTokens.from_tokenizer(tokenizer)
    return (lambda ids: tokenizer.decode(ids, skip_special_tokens=True)), tokens
