"""SIGKILL of the vLLM server mid-rollout during RL (issue 10, item 1).

A tiny RL run starts its own CPU vLLM server; a hook around the agent loop's generate call sends
one request of step `kill_step` and SIGKILLs the server process while that request is in flight
(other episodes of the step are rendering or sampling at the same time).
- vllm.on_server_failure="restart": the death is noticed within seconds, the server restarts, gets
  the trainer's current weights under the current version, the step's rollouts are generated again,
  and the run finishes all steps: every turn of every trajectory carries exactly the pushed version
  (no mixing), and the trainer/vLLM logprob drift stays at fp32 noise on every step (a server left
  on the base checkpoint would be off by the step-1 update, lr 3e-3).
- "stop": run_rl raises ServerFailure within seconds, naming the server, its log and the config key.
"""
import os
import signal
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def _tiny_config(model_dir: str, run_dir: str, on_failure: str):
    from test_rl_step import _LetterRewardMaze  # a maze whose reward varies with the text: non-zero updates

    from jaxrl_vl.envs.base import _REGISTRY, register_env
    from jaxrl_vl.train.config_overrides import load_config_file

    if "test/letter_maze" not in _REGISTRY:
        register_env("test/letter_maze", _LetterRewardMaze)
    config = load_config_file(str(REPO / "configs" / "rl_maze.py"))
    config.model.path, config.run_dir = model_dir, run_dir
    config.vllm.url = ""  # the run starts (and may restart) its own server
    config.vllm.on_server_failure = on_failure
    config.vllm.max_images_per_prompt, config.vllm.cpu_kv_cache_gib = 4, 1
    config.rl.env = "test/letter_maze"
    config.rl.env_kwargs.cell_px, config.rl.env_kwargs.max_steps = 8, 3
    config.rl.num_groups, config.rl.samples_per_group, config.rl.eval_episodes = 2, 2, 0
    config.rl.max_tokens_per_turn = 8
    config.rl.filter_zero_variance_groups = False  # every trajectory counts in rollout/stale_turns
    config.optim.learning_rate = 3e-3
    config.train.num_steps = 3
    config.checkpoint.every_steps, config.checkpoint.async_save = 100, False
    config.metrics.use_wandb = config.metrics.progress_bar = config.metrics.plot_at_end = False
    config.export.at_end = False
    return config


@pytest.fixture
def kill_hook(monkeypatch):
    """Records the servers the run starts and SIGKILLs the newest one while the first generate
    request of step `hook["kill_step"]` is in flight."""
    import asyncio

    from jaxrl_vl.rollout import agent_loop, server
    from jaxrl_vl.train import rl_rollouts

    hook = {"kill_step": None, "armed": False, "killed_at": None, "started": [], "start_times": []}
    real_start, real_generate, real_run_groups = server.start_server, agent_loop.generate_tokens, rl_rollouts.run_groups

    def start_server(config):
        hook["start_times"].append(time.monotonic())
        handle = real_start(config)
        hook["started"].append(handle)
        return handle

    async def run_groups(*args, step=0, **kwargs):
        if step == hook["kill_step"] and hook["killed_at"] is None:
            hook["armed"] = True
        return await real_run_groups(*args, step=step, **kwargs)

    async def generate_tokens(client, *args, **kwargs):
        if not hook["armed"]:
            return await real_generate(client, *args, **kwargs)
        hook["armed"] = False
        request = asyncio.ensure_future(real_generate(client, *args, **kwargs))
        await asyncio.sleep(0.05)  # the request is on the wire / being sampled
        os.kill(hook["started"][-1].process.pid, signal.SIGKILL)
        hook["killed_at"] = time.monotonic()
        return await request

    monkeypatch.setattr(server, "start_server", start_server)
    monkeypatch.setattr(agent_loop, "generate_tokens", generate_tokens)
    monkeypatch.setattr(rl_rollouts, "run_groups", run_groups)
    return hook


def test_sigkilled_server_is_restarted_on_current_weights_and_run_finishes(tiny_model_dir, tmp_path, kill_hook):
    from jaxrl_vl.train.metrics import read_metrics
    from jaxrl_vl.train.rl_loop import run_rl

    config = _tiny_config(tiny_model_dir, str(tmp_path / "run"), "restart")
    kill_hook["kill_step"] = 2
    summary = run_rl(config)

    assert summary["rl_steps"] == 3 and kill_hook["killed_at"] is not None
    first, second = kill_hook["started"]  # exactly one restart
    assert first.process.returncode == -signal.SIGKILL and second.url != first.url
    detected_within = kill_hook["start_times"][1] - kill_hook["killed_at"]
    assert 0 < detected_within < 15, detected_within  # the liveness check, not the clients' retries or timeouts
    steps = [r for r in read_metrics(config.run_dir) if "train/drift_mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert [r["rollout/server_restarts"] for r in steps] == [0.0, 1.0, 1.0]
    assert steps[0]["train/grad_norm"] > 0  # the trainer's weights left the base checkpoint before the kill
    for record in steps:
        # every turn of every trajectory was sampled by exactly the version pushed before its step:
        # no trajectory mixes versions, and the restarted server carries version 1, then 2
        assert record["rollout/stale_turns"] == 0.0, record
        assert record["train/drift_mean"] <= 1e-4, record  # the restarted server has the trainer's weights


def test_sigkilled_server_with_stop_policy_raises_a_clear_error(tiny_model_dir, tmp_path, kill_hook):
    from jaxrl_vl.rollout.supervisor import ServerFailure
    from jaxrl_vl.train.rl_loop import run_rl

    config = _tiny_config(tiny_model_dir, str(tmp_path / "run"), "stop")
    kill_hook["kill_step"] = 1
    with pytest.raises(ServerFailure) as caught:
        run_rl(config)
    raised_after = time.monotonic() - kill_hook["killed_at"]
    (handle,) = kill_hook["started"]  # never restarted
    message = str(caught.value)
    assert handle.url in message and handle.log_path in message and "vllm.on_server_failure" in message, message
    assert raised_after < 60, raised_after  # includes stopping the loop; detection itself takes ~1 s
    assert handle.process.poll() is not None
