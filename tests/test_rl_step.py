"""The RL update on the tiny Qwen3-VL model (CPU, fp32): loss goes down on a fixed batch, drift
metrics are exact, micro-batching does not change the update; and (vLLM, slow) several RL steps
with weight push keep the logged trainer-vs-vLLM drift <= 1e-4."""
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxrl_vl import models
from jaxrl_vl.losses.policy import PolicyLossConfig
from jaxrl_vl.train.optim import make_optimizer
from jaxrl_vl.train.rl_step import make_rl_step
from rl_batches import build_micro_batches, score_logprobs
from jaxrl_vl.train.step import Forward
from jaxrl_vl.train.state import create_train_state

REPO = Path(__file__).resolve().parents[1]




@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return models.load(tiny_model_dir)


def _optimizer(learning_rate=1e-2):
    optim = ml_collections.ConfigDict(dict(learning_rate=learning_rate, schedule="constant", warmup_steps=0,
                                           end_learning_rate_fraction=1.0, weight_decay=0.0, b1=0.9, b2=0.999,
                                           eps=1e-8, max_grad_norm=0.0))
    return make_optimizer(optim, total_steps=100)


def _rows(config, seed=0):
    """Four sequences: two with an image (4 merged tokens), random text, sampled spans masked."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(4):
        ids = rng.integers(0, 800, size=30 + 5 * i).astype(np.int32)
        row = {"input_ids": ids}
        if i % 2 == 0:
            ids[2:6] = config.image_token_id
            row["pixel_values"] = rng.uniform(-1, 1, (16, config.vision.patch_dim)).astype(np.float32)
            row["image_grid_thw"] = np.array([[1, 4, 4]], np.int32)
        mask = np.zeros(len(ids), np.float32)
        mask[12:20] = 1.0
        mask[24:28] = 1.0
        row["loss_mask"] = mask
        row["advantages"] = mask * (1.0 if i < 2 else -1.0)
        row["turn_ids"] = np.where(np.arange(len(ids)) < 22, 0, 1).astype(np.int32) * (mask > 0) - (mask == 0)
        row["rollout_logprobs"] = np.zeros(len(ids), np.float32)
        rows.append(row)
    return rows


def _with_trainer_logprobs(rows, config, params):
    """rollout_logprobs := the trainer's own logprobs on the masked tokens (an exact sampler)."""
    batch = build_micro_batches(rows, config, num_micro_batches=1)
    logprobs = score_logprobs(config, params, {k: v[0] for k, v in batch.items()})
    for b, row in enumerate(rows):
        row["rollout_logprobs"] = logprobs[b, :len(row["input_ids"])] * row["loss_mask"]
    return rows


@pytest.fixture(scope="module")
def ppo_step(tiny):
    """One compiled step shared by the tests below (wide clip range so a few updates keep moving)."""
    optimizer, schedule = _optimizer(3e-3)
    config, params = tiny
    step = make_rl_step(Forward(config), optimizer, schedule, PolicyLossConfig(name="ppo", clip_eps_high=10.0, clip_eps_low=0.9),
                        donate=False)
    return step, create_train_state(params, optimizer, jax.random.PRNGKey(0))


def test_drift_metrics_are_exact(tiny, ppo_step):
    config, params = tiny
    rows = _with_trainer_logprobs(_rows(config), config, params)
    step, state = ppo_step  # metrics are of the pre-update params
    _, metrics = step(state, build_micro_batches(rows, config, num_micro_batches=1))
    assert float(metrics["drift_mean"]) < 1e-5 and float(metrics["drift_max"]) < 1e-4
    assert abs(float(metrics["ratio_mean"]) - 1.0) < 1e-5
    # shift vLLM's logprobs by 0.01 on turn-0 tokens and 0.03 on turn-1 tokens
    for row in rows:
        row["rollout_logprobs"] = row["rollout_logprobs"] - np.where(row["turn_ids"] == 1, 0.03, 0.01) * row["loss_mask"]
    _, metrics = step(state, build_micro_batches(rows, config, num_micro_batches=1))
    assert float(metrics["drift_turn_0"]) == pytest.approx(0.01, abs=1e-5)
    assert float(metrics["drift_turn_1"]) == pytest.approx(0.03, abs=1e-5)
    assert float(metrics["drift_mean"]) == pytest.approx((8 * 0.01 + 4 * 0.03) / 12, abs=1e-5)
    assert float(metrics["drift_max"]) == pytest.approx(0.03, abs=1e-5)
    assert float(metrics["loss_tokens"]) == 48
    assert float(metrics["entropy"]) > 0


def test_update_reduces_loss_on_fixed_batch(tiny, ppo_step):
    config, params = tiny
    rows = _with_trainer_logprobs(_rows(config), config, params)
    step, state = ppo_step
    batch = build_micro_batches(rows, config, num_micro_batches=1)
    losses = []
    for _ in range(4):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
    assert losses[-1] < losses[0] - 1e-3, losses


def test_micro_batches_accumulate_to_the_same_update(tiny):
    config, params = tiny
    rows = _with_trainer_logprobs(_rows(config), config, params)
    optimizer, schedule = _optimizer(1e-3)
    # sequence-mean: micro-batches are weighted by their share of sequences, not of tokens
    step = make_rl_step(Forward(config), optimizer, schedule, PolicyLossConfig(name="ppo", aggregation="sequence-mean"),
                        donate=False)
    state = create_train_state(params, optimizer, jax.random.PRNGKey(0))
    _, one = step(state, build_micro_batches(rows, config, num_micro_batches=1))
    _, two = step(state, build_micro_batches(rows, config, num_micro_batches=2))
    assert float(two["loss"]) == pytest.approx(float(one["loss"]), rel=1e-4, abs=1e-6)
    assert float(two["grad_norm"]) == pytest.approx(float(one["grad_norm"]), rel=1e-3)
    assert float(two["drift_mean"]) == pytest.approx(float(one["drift_mean"]), abs=1e-7)


def test_logits_at_target_positions_give_the_same_update(tiny):
    """target_positions (the chunked loss computes logits only where a sampled token follows): the same loss,
    drift, entropy and update as logits at every position."""
    config, params = tiny
    rows = _with_trainer_logprobs(_rows(config), config, params)
    optimizer, schedule = _optimizer(1e-3)
    step = make_rl_step(Forward(config, loss_chunk_size=16), optimizer, schedule, PolicyLossConfig(name="ppo"),
                        donate=False)
    state = create_train_state(params, optimizer, jax.random.PRNGKey(0))
    full = build_micro_batches(rows, config, num_micro_batches=2)
    picked = build_micro_batches(rows, config, num_micro_batches=2, target_positions_multiple=8)
    assert picked["target_positions"].shape == (2, 2, 16) and full["input_ids"].shape[-1] == 128
    (s_full, m_full), (s_picked, m_picked) = step(state, full), step(state, picked)
    for key in ("loss", "drift_mean", "drift_max", "entropy", "grad_norm", "loss_tokens"):
        assert float(m_picked[key]) == pytest.approx(float(m_full[key]), rel=1e-4, abs=1e-6), key
    # Adam's first update is ~lr * sign(g): float-order noise on near-zero gradients shows up to ~lr * 1e-3
    for a, b in zip(jax.tree.leaves(s_picked.params), jax.tree.leaves(s_full.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-6)


def test_filler_rows_train_nothing(tiny):
    config, params = tiny
    rows = _with_trainer_logprobs(_rows(config)[:3], config, params)
    batch = build_micro_batches(rows, config, num_micro_batches=2)
    assert batch["input_ids"].shape[:2] == (2, 2) and batch["input_ids"].shape[2] % 128 == 0
    assert batch["loss_mask"][1, 1].sum() == 0
    assert batch["pixel_values"].shape[0] == 2


class _LetterRewardMaze:
    """Maze2D episodes (one frame per turn) whose per-turn reward is the share of 'e' in the
    reply, so a random tiny model gets rewards that vary within a group and RL updates the params."""

    def __init__(self, **kwargs):
        from jaxrl_vl.envs.maze2d import Maze2DEnv
        self.maze = Maze2DEnv(**kwargs)
        self.max_turns, self.keep_last_images = self.maze.max_turns, self.maze.keep_last_images

    def reset(self, seed):
        return self.maze.reset(seed)

    def step(self, text):
        from jaxrl_vl.envs.base import StepResult
        result = self.maze.step(text)
        return StepResult(result.messages, text.count("e") / max(len(text), 1), result.done, result.info)

    def __copy__(self):  # env_copier makes one env per episode: the inner maze must not be shared
        import copy
        new = object.__new__(_LetterRewardMaze)
        new.__dict__.update(self.__dict__, maze=copy.copy(self.maze))
        return new


@pytest.mark.vllm
@pytest.mark.slow
def test_rl_steps_with_weight_push_keep_drift_small_and_resume(tiny_model_dir, tmp_path):
    """Several RL steps (multi-turn, several images per sequence) with a weight push after each:
    the logged fp32 drift stays <= 1e-4 on every step, rollouts use the pushed version, and a
    rerun resumes from the last checkpoint."""
    from jaxrl_vl.envs.base import _REGISTRY, register_env
    from jaxrl_vl.rollout.server import ServerConfig, start_server, stop_server
    from jaxrl_vl.train.config_overrides import load_config_file
    from jaxrl_vl.train.metrics import read_metrics
    from jaxrl_vl.train.rl_loop import run_rl

    if "test/letter_maze" not in _REGISTRY:
        register_env("test/letter_maze", _LetterRewardMaze)
    handle = start_server(ServerConfig(model=tiny_model_dir, served_model_name="rl_test", cpu_kv_cache_gib=1,
                                       max_images_per_prompt=4, log_dir=str(tmp_path / "vllm_logs")))
    try:
        config = load_config_file(str(REPO / "configs" / "rl_maze.py"))
        config.model.path = tiny_model_dir
        config.run_dir = str(tmp_path / "run")
        config.vllm.url = handle.url
        config.rl.env = "test/letter_maze"
        config.rl.env_kwargs.cell_px = 8
        config.rl.env_kwargs.max_steps = 3
        config.rl.num_groups, config.rl.samples_per_group, config.rl.eval_episodes = 2, 2, 2
        config.rl.max_tokens_per_turn = 8
        config.optim.learning_rate = 3e-3
        config.train.num_steps = 2
        config.rl.updates_per_step = 2  # PPO mini-batches: the next step's drift checks the final weights were pushed
        config.checkpoint.every_steps = 1
        config.checkpoint.async_save = False
        config.metrics.use_wandb = config.metrics.progress_bar = config.metrics.plot_at_end = False
        config.export.at_end = False
        summary = run_rl(config)
        assert summary["rl_steps"] == 2 and summary["max_drift"] <= 1e-4
        config.train.num_steps = 3
        resumed = run_rl(config)
        assert resumed["resumed_from_step"] == 2 and resumed["rl_steps"] == 3
    finally:
        stop_server(handle)
    steps = [r for r in read_metrics(config.run_dir) if "train/drift_mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for record in steps:
        assert record["train/drift_mean"] <= 1e-4, record
        assert record["train/grad_norm"] > 0 and record["rollout/stale_turns"] == 0.0
        assert 1 <= record["train/updates"] <= 2
        assert record["rollout/images_mean"] >= 2  # several images per training sequence
    assert summary["success_before_rl"] is not None


@pytest.mark.parametrize("name", ["rl_maze", "rl_digits", "rl_geometry", "maze_sft_rl"])
def test_rl_configs_build_valid_agent_loss_and_env(name):
    from jaxrl_vl.envs import make_env
    from jaxrl_vl.train.config_overrides import load_config_file
    from jaxrl_vl.train.rl_rollouts import agent_config, train_seeds
    from jaxrl_vl.train.rl_update import policy_loss_config

    config = load_config_file(str(REPO / "configs" / f"{name}.py"))
    if name == "maze_sft_rl":
        assert config.trainer == "sft_then_rl" and config.sft.trainer == "sft"
        config = config.rl
    assert config.trainer == "rl"
    assert agent_config(config.rl).samples_per_group == config.rl.samples_per_group
    assert agent_config(config.rl, evaluation=True).temperature == config.rl.eval_temperature
    policy_loss_config(config.loss)
    env = make_env(config.rl.env, **dict(config.rl.env_kwargs))
    assert env.reset(train_seeds(config.rl, 1)[0])
    assert train_seeds(config.rl, 2)[0] == train_seeds(config.rl, 1)[-1] + 1
