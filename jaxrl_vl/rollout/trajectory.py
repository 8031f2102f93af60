"""RL trajectories as the agent loop records them, and their conversion to training rows.

A trajectory is one episode. Its tokens live in one or more `Segment`s: a segment is one token
sequence exactly as vLLM saw it, where every turn's prompt is the previous turn's prompt + the
tokens sampled there + only the new turn's rendered tokens (see agent_loop.py). A new segment
starts only when the visible conversation stops being an extension of the previous one (an
image budget, `keep_last_images`, replaced an older image by a text marker), so each segment is
one training row and the trainer scores exactly the ids vLLM sampled.

Per-token arrays of a segment are aligned with its tokens (index t describes token t):
  token_ids        int   [L]  prompt and sampled tokens, as sent to / returned by vLLM
  loss_mask        float [L]  1.0 on tokens vLLM sampled, 0.0 on prompt/template tokens
  rollout_logprobs float [L]  vLLM's logprob of each sampled token (0.0 off the mask)
  turn_ids         int   [L]  the episode turn that sampled the token, -1 off the mask
Images: `pixel_values` uint8 [P, C*T*p*p] as vLLM rendered them (before normalisation) and
`image_grid_thw` int32 [N_img, 3], in order of appearance.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxrl_vl.models.inputs import normalize_pixels


@dataclasses.dataclass
class Segment:
    token_ids: list[int] = dataclasses.field(default_factory=list)
    loss_mask: list[float] = dataclasses.field(default_factory=list)
    rollout_logprobs: list[float] = dataclasses.field(default_factory=list)
    turn_ids: list[int] = dataclasses.field(default_factory=list)
    pixel_chunks: list[np.ndarray] = dataclasses.field(default_factory=list)  # uint8 [p_i, D] per image
    grid_chunks: list[np.ndarray] = dataclasses.field(default_factory=list)  # int32 [3] per image
    omitted_images: int = 0  # images the image budget had dropped when this segment started

    def extend_prompt(self, ids: list[int]) -> None:
        self.token_ids.extend(int(i) for i in ids)
        self.loss_mask.extend([0.0] * len(ids))
        self.rollout_logprobs.extend([0.0] * len(ids))
        self.turn_ids.extend([-1] * len(ids))

    def extend_sampled(self, ids: list[int], logprobs: list[float], turn: int) -> None:
        if len(ids) != len(logprobs):
            raise ValueError(f"{len(ids)} sampled ids but {len(logprobs)} logprobs")
        self.token_ids.extend(int(i) for i in ids)
        self.loss_mask.extend([1.0] * len(ids))
        self.rollout_logprobs.extend(float(x) for x in logprobs)
        self.turn_ids.extend([turn] * len(ids))

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_images(self) -> int:
        return len(self.grid_chunks)

    @property
    def pixel_values(self) -> np.ndarray:
        """uint8 [P, D] (P = 0 without images)."""
        if not self.pixel_chunks:
            return np.zeros((0, 0), np.uint8)
        return np.concatenate(self.pixel_chunks, axis=0)

    @property
    def image_grid_thw(self) -> np.ndarray:
        """int32 [N_img, 3]."""
        if not self.grid_chunks:
            return np.zeros((0, 3), np.int32)
        return np.stack(self.grid_chunks).astype(np.int32)


@dataclasses.dataclass
class Trajectory:
    """One episode. `turn_rewards[k]` is the env's reward for turn k; `reward` their sum (what
    advantages use). `weight_versions[k]` lists the vLLM weight versions that sampled turn k."""

    group_index: int  # which prompt/seed group (samples of one group share the env seed)
    sample_index: int  # 0..n-1 within its group
    env_seed: int
    segments: list[Segment]
    turn_rewards: list[float]
    weight_versions: list[list[str]]
    finish_reasons: list[str]  # vLLM's per turn: "stop" | "length"
    replies: list[str]  # decoded assistant text per turn (what the env saw)
    messages: list[dict]  # the full conversation (every image kept), for saved samples
    info: dict[str, Any]  # the env's last info
    end_reason: str  # "env_done" | "turn_budget" | "token_budget" | "context" | "env_error"
    timing_seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # render/generate/env
    # per turn, the env's state_key() when the action was taken (None: the env has none); see
    # losses/step_advantages.py
    turn_states: list = dataclasses.field(default_factory=list)

    @property
    def reward(self) -> float:
        return float(sum(self.turn_rewards))

    @property
    def num_turns(self) -> int:
        return len(self.turn_rewards)

    @property
    def generated_tokens(self) -> int:
        return int(sum(sum(s.loss_mask) for s in self.segments))

    @property
    def success(self) -> bool:
        """The env's `info["success"]` when it reports one, else reward > 0."""
        if "success" in self.info:
            return bool(self.info["success"])
        return self.reward > 0


def training_rows(trajectories: list[Trajectory], advantages: list, *, image_mean, image_std,
                  group_ids: list[int] | None = None) -> list[dict]:
    """Trajectories (with one advantage each, or one per turn) -> rows for `jaxrl_vl.models.inputs.make_batch`.

    One row per segment: {"input_ids" int32 [L], "loss_mask" float32 [L], "rollout_logprobs"
    float32 [L], "advantages" float32 [L] (the trajectory's advantage, or its turn's, on its sampled tokens),
    "turn_ids" int32 [L], and with images "pixel_values" float32 [P, D] (normalised with the
    processor's mean/std) + "image_grid_thw" int32 [n, 3]}. Rows without sampled tokens are
    dropped (they teach nothing). `group_ids`, if given, adds a per-row scalar "group_id".
    """
    if len(trajectories) != len(advantages):
        raise ValueError(f"{len(trajectories)} trajectories but {len(advantages)} advantages")
    rows = []
    for index, (trajectory, advantage) in enumerate(zip(trajectories, advantages)):
        for segment in trajectory.segments:
            mask = np.asarray(segment.loss_mask, np.float32)
            if not mask.any():
                continue
            turn_ids = np.asarray(segment.turn_ids, np.int32)
            if np.ndim(advantage) == 0:
                token_advantages = mask * np.float32(advantage)
            else:  # per-turn advantages: each sampled token gets its turn's
                per_turn = np.asarray(advantage, np.float32)
                if len(per_turn) != trajectory.num_turns:
                    raise ValueError(f"trajectory {index}: {len(per_turn)} turn advantages for "
                                     f"{trajectory.num_turns} turns")
                token_advantages = mask * per_turn[np.clip(turn_ids, 0, None)]
            row = {
                "input_ids": np.asarray(segment.token_ids, np.int32),
                "loss_mask": mask,
                "rollout_logprobs": np.asarray(segment.rollout_logprobs, np.float32),
                "advantages": token_advantages,
                "turn_ids": turn_ids,
            }
            if segment.num_images:
                row["pixel_values"] = normalize_pixels(segment.pixel_values, image_mean, image_std)
                row["image_grid_thw"] = segment.image_grid_thw
            if group_ids is not None:
                row["group_id"] = np.int32(group_ids[index])
            rows.append(row)
    return rows


def rollout_metrics(groups: list[list[Trajectory]], prefix: str = "rollout/",
                    max_turns_logged: int = 8) -> dict[str, float]:
    """Scalars over groups [G][n]: reward mean/std, success rate, pass@n (a group with at least one
    success), turns, per-turn reward means, generated tokens, sequence tokens, end reasons, and
    summed per-episode timing."""
    trajectories = [t for g in groups for t in g]
    if not trajectories:
        return {}
    rewards = np.asarray([t.reward for t in trajectories], np.float64)
    n = max(len(g) for g in groups)
    out = {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "success_rate": float(np.mean([t.success for t in trajectories])),
        f"pass_at_{n}": float(np.mean([any(t.success for t in g) for g in groups])),
        "episodes": float(len(trajectories)),
        "turns_mean": float(np.mean([t.num_turns for t in trajectories])),
        "generated_tokens_mean": float(np.mean([t.generated_tokens for t in trajectories])),
        "generated_tokens_total": float(sum(t.generated_tokens for t in trajectories)),
        "sequence_tokens_max": float(max(s.num_tokens for t in trajectories for s in t.segments)),
        "segments_mean": float(np.mean([len(t.segments) for t in trajectories])),
        "images_mean": float(np.mean([sum(s.num_images for s in t.segments) for t in trajectories])),
        "turn_cut_by_max_tokens": float(np.mean([r == "length" for t in trajectories for r in t.finish_reasons]
                                                or [0.0])),
    }
    # per-turn rewards (multi-turn tool envs): mean over the episodes that reached turn k
    for k in range(min(max(t.num_turns for t in trajectories), max_turns_logged)):
        reached = [t.turn_rewards[k] for t in trajectories if t.num_turns > k]
        out[f"turn_{k}_reward_mean"] = float(np.mean(reached))
    for reason in ("env_done", "turn_budget", "token_budget", "context", "env_error"):
        out[f"end_{reason}"] = float(np.mean([t.end_reason == reason for t in trajectories]))
    for phase in ("render", "generate", "env"):
        out[f"{phase}_seconds_sum"] = float(sum(t.timing_seconds.get(phase, 0.0) for t in trajectories))
    return {prefix + k: v for k, v in out.items()}


def save_sample(trajectory: Trajectory, folder: str) -> str:
    """Writes one rollout for inspection: folder/rollout.json (conversation with image file names,
    replies, per-turn rewards, weight versions, end reason) and folder/image_<k>.png."""
    import json
    import os

    os.makedirs(folder, exist_ok=True)
    image_count = 0
    messages = []
    for message in trajectory.messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "image" and hasattr(part.get("image"), "save"):
                    name = f"image_{image_count}.png"
                    part["image"].save(os.path.join(folder, name))
                    image_count += 1
                    parts.append({"type": "image", "image": name})
                else:
                    parts.append(part)
            content = parts
        messages.append({**message, "content": content})
    record = {
        "env_seed": trajectory.env_seed, "group_index": trajectory.group_index,
        "sample_index": trajectory.sample_index, "reward": trajectory.reward, "success": trajectory.success,
        "turn_rewards": trajectory.turn_rewards, "weight_versions": trajectory.weight_versions,
        "finish_reasons": trajectory.finish_reasons, "end_reason": trajectory.end_reason,
        "generated_tokens": trajectory.generated_tokens, "messages": messages,
        "info": {k: v for k, v in trajectory.info.items() if k != "vllm_io"},
    }
    path = os.path.join(folder, "rollout.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1, default=str)
    return path
