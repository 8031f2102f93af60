"""RL token alignment: every training sequence is exactly what vLLM saw and sampled, turn by turn.

The vLLM tests run multi-turn Maze2D episodes (one frame per turn, so several images per
sequence) through the real CPU vLLM server and check, for every turn, that vLLM's echoed prompt
ids equal the training sequence's prefix, the sampled ids follow it under a loss mask that covers
exactly them, vLLM's image placeholders sit on the sequence's image tokens, the pixels are the
env's frames as vLLM renders them, and the JAX model scores the sequence with vLLM's logprobs.
"""
import asyncio

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_vl.envs import make_env
from jaxrl_vl.rollout.agent_loop import (AgentConfig, AlignmentError, SpecialTokens, _append_items, _empty_features,
                                         env_copier, load_decoder, run_groups, tail_start)
from jaxrl_vl.rollout.client import VLLMClient
from jaxrl_vl.rollout.messages import to_openai_messages
from jaxrl_vl.rollout.mm_decode import decode_images
from jaxrl_vl.rollout.trajectory import Segment, Trajectory, rollout_metrics, save_sample, training_rows

TOKENS = SpecialTokens(im_start=1, im_end=2, image=9)


def test_tail_start_after_closing_im_end():
    # <s>sys..</e>\n <s>user 9 9</e>\n <s>asst X Y</e>\n <s>user 9</e>\n <s>asst
    ids = [1, 5, 2, 3, 1, 6, 9, 9, 2, 3, 1, 7, 40, 41, 2, 3, 1, 6, 9, 2, 3, 1, 7]
    # the previous render had 3 headers (system, user, generation prompt)
    start = tail_start(ids, 3, TOKENS)
    assert ids[start - 1] == 2 and ids[start:] == [3, 1, 6, 9, 2, 3, 1, 7]
    with pytest.raises(AlignmentError):
        tail_start(ids, 5, TOKENS)


def test_append_items_shifts_only_new_placeholders():
    rendered = {"mm_hashes": {"image": ["a", "b"]}, "kwargs_data": {"image": ["ka", "kb"]},
                "mm_metadata": {"image": ["ma", "mb"]},
                "mm_placeholders": {"image": [{"offset": 4, "length": 4}, {"offset": 30, "length": 4}]}}
    features = _empty_features()
    assert _append_items(features, rendered, 0, 0) == [0, 1]
    later = _empty_features()
    assert _append_items(later, rendered, 20, 7) == [1]
    assert later["mm_placeholders"]["image"] == [{"offset": 37, "length": 4}]
    assert later["mm_hashes"]["image"] == ["b"] and later["kwargs_data"]["image"] == ["kb"]


def _trajectory(group, sample, rewards, success, segments):
    return Trajectory(group_index=group, sample_index=sample, env_seed=group, segments=segments,
                      turn_rewards=rewards, weight_versions=[["0"]] * len(rewards),
                      finish_reasons=["stop"] * len(rewards), replies=["x"] * len(rewards),
                      messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                      info={"success": success}, end_reason="env_done")


def test_training_rows_and_rollout_metrics(tmp_path):
    with_image = Segment()
    with_image.extend_prompt([1, 9, 9, 3])
    with_image.pixel_chunks.append(np.full((16, 6), 255, np.uint8))
    with_image.grid_chunks.append(np.array([1, 4, 4], np.int32))
    with_image.extend_sampled([40, 41, 2], [-0.5, -1.0, -0.1], turn=0)
    prompt_only = Segment()
    prompt_only.extend_prompt([1, 5, 3])
    text = Segment()
    text.extend_prompt([1, 5])
    text.extend_sampled([42, 2], [-0.2, -0.3], turn=1)
    trajectories = [_trajectory(0, 0, [0.0, 1.0], True, [with_image, prompt_only]),
                    _trajectory(0, 1, [0.0], False, [text])]
    rows = training_rows(trajectories, [0.5, -0.5], image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    assert len(rows) == 2  # the prompt-only segment trains nothing
    assert rows[0]["loss_mask"].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert rows[0]["advantages"].tolist() == [0, 0, 0, 0, 0.5, 0.5, 0.5]
    assert rows[0]["rollout_logprobs"][4:].tolist() == pytest.approx([-0.5, -1.0, -0.1])
    assert rows[0]["turn_ids"].tolist() == [-1, -1, -1, -1, 0, 0, 0]
    assert rows[0]["pixel_values"].dtype == np.float32 and np.all(rows[0]["pixel_values"] == 1.0)
    assert "pixel_values" not in rows[1] and rows[1]["advantages"].tolist() == [0, 0, -0.5, -0.5]
    metrics = rollout_metrics([trajectories])
    assert metrics["rollout/reward_mean"] == 0.5 and metrics["rollout/success_rate"] == 0.5
    assert metrics["rollout/pass_at_2"] == 1.0 and metrics["rollout/turns_mean"] == 1.5
    assert metrics["rollout/generated_tokens_total"] == 5
    assert metrics["rollout/turn_0_reward_mean"] == 0.0 and metrics["rollout/turn_1_reward_mean"] == 1.0
    assert save_sample(trajectories[0], str(tmp_path / "sample")).endswith("rollout.json")


def _image_runs(ids, image_id):
    """[(offset, length)] of maximal runs of the image token."""
    runs, i = [], 0
    while i < len(ids):
        if ids[i] == image_id:
            j = i
            while j < len(ids) and ids[j] == image_id:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs


async def _rollouts(server, model_dir, env, config, seeds):
    decode, tokens = load_decoder(model_dir)
    async with VLLMClient(server.url, server.served_model_name) as client:
        groups = await run_groups([client], env_copier(env), seeds, config, decode=decode, tokens=tokens)
        # The frames as vLLM renders them from the full conversation (every image kept).
        reference_pixels = []
        for trajectory in [t for g in groups for t in g]:
            rendered = await client.render(to_openai_messages(trajectory.messages), add_generation_prompt=False)
            reference_pixels.append(decode_images(rendered["features"]))
    return groups, tokens, reference_pixels


def _check_alignment(trajectory, tokens):
    """Every turn: vLLM's prompt == the segment prefix; sampled ids follow under the mask."""
    records = trajectory.info["vllm_io"]
    assert len(records) == trajectory.num_turns
    masked_positions = {i: set() for i in range(len(trajectory.segments))}
    for turn, record in enumerate(records):
        segment = trajectory.segments[record["segment"]]
        length, sampled = record["prompt_len"], record["sampled"]
        assert record["prompt_token_ids"] == segment.token_ids[:length], f"turn {turn}: prompt differs from vLLM's"
        assert segment.token_ids[length:length + len(sampled)] == sampled
        assert not set(sampled) & set(tokens.banned), "a reply sampled an image/vision token"
        assert all(segment.turn_ids[length + k] == turn for k in range(len(sampled)))
        masked_positions[record["segment"]].update(range(length, length + len(sampled)))
        # vLLM's placeholders are exactly the image-token runs of the prompt it saw
        runs = [(p["offset"], p["length"]) for p in (record["mm_placeholders"] or {}).get("image", [])]
        assert runs == _image_runs(segment.token_ids[:length], tokens.image)
    for index, segment in enumerate(trajectory.segments):
        mask = np.asarray(segment.loss_mask)
        assert set(np.nonzero(mask)[0].tolist()) == masked_positions[index], "loss mask != sampled tokens"
        assert len(segment.rollout_logprobs) == segment.num_tokens == len(segment.turn_ids)
        assert segment.num_images == len(_image_runs(segment.token_ids, tokens.image))
        assert all(v == 0.0 for v, m in zip(segment.rollout_logprobs, mask) if m == 0)


def _jax_drift(model_dir, trajectories):
    from jaxrl_vl import models
    from jaxrl_vl.losses.sft import token_logprobs

    config, params = models.load(model_dir)
    rows = training_rows(trajectories, [1.0] * len(trajectories), image_mean=[0.5] * 3, image_std=[0.5] * 3)
    batch = models.make_batch(rows, config)
    logits = models.apply(params, {k: v for k, v in batch.items() if k != "image_grid_thw"}, config)
    logprobs = np.asarray(token_logprobs(logits[:, :-1], jnp.asarray(batch["input_ids"][:, 1:])))
    mask = batch["loss_mask"][:, 1:]
    diff = np.abs(logprobs - batch["rollout_logprobs"][:, 1:]) * mask
    return float(diff.sum() / mask.sum()), float(diff.max())


@pytest.mark.vllm
def test_multi_turn_maze_sequences_equal_what_vllm_saw(vllm_server, tiny_model_dir):
    env = make_env("maze2d", size=9, cell_px=8, prompt_style="compact", max_steps=4)
    config = AgentConfig(samples_per_group=2, max_tokens_per_turn=12, record_vllm_io=True, seed=3)
    groups, tokens, reference_pixels = asyncio.run(_rollouts(vllm_server, tiny_model_dir, env, config, [5, 6]))
    trajectories = [t for g in groups for t in g]
    assert [t.env_seed for t in trajectories] == [5, 5, 6, 6]
    for trajectory, (pixels, grids) in zip(trajectories, reference_pixels):
        assert trajectory.num_turns >= 2 and len(trajectory.segments) == 1
        segment = trajectory.segments[0]
        assert segment.num_images == trajectory.num_turns >= 2  # one frame per turn
        _check_alignment(trajectory, tokens)
        # the segment holds the env's frames as vLLM renders them (the last frame is never shown
        # to the policy when the episode ends on the turn cap, so compare the shown ones)
        assert np.array_equal(segment.image_grid_thw, grids[:segment.num_images])
        assert np.array_equal(segment.pixel_values, pixels[:segment.pixel_values.shape[0]])
        assert all(v for versions in trajectory.weight_versions for v in versions)
    # samples of a group differ (different sampling seeds), groups have different mazes
    assert trajectories[0].segments[0].token_ids != trajectories[1].segments[0].token_ids
    drift_mean, drift_max = _jax_drift(tiny_model_dir, trajectories)
    assert drift_mean <= 1e-4 and drift_max <= 1e-3, (drift_mean, drift_max)


@pytest.mark.vllm
def test_image_budget_starts_new_segments(vllm_server, tiny_model_dir):
    env = make_env("maze2d", size=9, cell_px=8, prompt_style="compact", max_steps=4, keep_last_images=2)
    config = AgentConfig(samples_per_group=1, max_tokens_per_turn=8, record_vllm_io=True)
    groups, tokens, _ = asyncio.run(_rollouts(vllm_server, tiny_model_dir, env, config, [7]))
    trajectory = groups[0][0]
    assert trajectory.num_turns == 4
    # turns 1-2 see every frame; from turn 3 the oldest frame is replaced each turn
    assert [s.num_images for s in trajectory.segments] == [2, 2, 2]
    assert [s.omitted_images for s in trajectory.segments] == [0, 1, 2]
    _check_alignment(trajectory, tokens)
    drift_mean, _ = _jax_drift(tiny_model_dir, [trajectory])
    assert drift_mean <= 1e-4


@pytest.mark.vllm
def test_token_budgets_end_episodes(vllm_server, tiny_model_dir):
    env = make_env("maze2d", size=9, cell_px=8, prompt_style="compact", max_steps=6)
    config = AgentConfig(samples_per_group=1, max_tokens_per_turn=10, max_generated_tokens=15, max_turns=5)
    groups, _, _ = asyncio.run(_rollouts(vllm_server, tiny_model_dir, env, config, [1]))
    trajectory = groups[0][0]
    assert trajectory.generated_tokens <= 15
    assert trajectory.end_reason in ("token_budget", "env_done")
    assert trajectory.finish_reasons[0] in ("stop", "length")


@pytest.mark.vllm
def test_tail_of_a_tool_turn_is_the_tool_response_and_generation_prompt(vllm_server, tiny_model_dir):
    """Geometry with the calc_score tool: after an assistant tool call, the new turn's tokens found
    by `tail_start` are exactly what the fresh render adds after the assistant turn."""
    from jaxrl_vl.envs.base import assistant_message

    _, tokens = load_decoder(tiny_model_dir)
    env = make_env("geometry", max_turns=3)
    history = env.reset(0)
    reply = '<tool_call>\n{"name": "calc_score", "arguments": {"answer": "12345"}}\n</tool_call>'
    result = env.step(reply)
    assert not result.done and result.messages[0]["role"] == "tool"

    async def renders():
        async with VLLMClient(vllm_server.url, vllm_server.served_model_name) as client:
            first = await client.render(to_openai_messages(history), tools=env.tools)
            closed = await client.render(to_openai_messages([*history, assistant_message(reply)]), tools=env.tools,
                                         add_generation_prompt=False)
            full = await client.render(to_openai_messages([*history, assistant_message(reply), *result.messages]),
                                       tools=env.tools)
            return first["token_ids"], closed["token_ids"], full["token_ids"]

    first, closed, full = asyncio.run(renders())
    start = tail_start(full, sum(t == tokens.im_start for t in first), tokens)
    # the assistant turn closes with <|im_end|> at the same place in both renders ...
    assert full[:start] == closed[:start] and full[start - 1] == tokens.im_end
    # ... and the tail is the tool response turn plus the generation prompt
    assert full[start:].count(tokens.im_start) == 2 and full[:len(first)] == first


class _BrokenStepEnv:
    """Maze2D whose step raises: the episode must end ("env_error"), the rollout batch must not."""

    def __init__(self):
        from jaxrl_vl.envs.maze2d import Maze2DEnv
        self.maze = Maze2DEnv(size=9, cell_px=8, prompt_style="compact", max_steps=3)
        self.max_turns, self.keep_last_images = 3, None

    def reset(self, seed):
        return self.maze.reset(seed)

    def step(self, text):
        raise RuntimeError("grader crashed")


@pytest.mark.vllm
def test_env_errors_end_the_episode_not_the_run(vllm_server, tiny_model_dir):
    config = AgentConfig(samples_per_group=2, max_tokens_per_turn=4)
    groups, _, _ = asyncio.run(_rollouts(vllm_server, tiny_model_dir, _BrokenStepEnv(), config, [0]))
    for trajectory in groups[0]:
        assert trajectory.end_reason == "env_error" and trajectory.num_turns == 1
        assert "grader crashed" in trajectory.info["env_error"] and trajectory.turn_rewards == [0.0]
