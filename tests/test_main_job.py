"""The README's main job (configs/demo.py -> configs/maze_sft_rl.py), shrunk onto the tiny model:
demonstrations -> SFT -> RL with a vLLM server the pipeline starts itself, then a rerun that skips
the finished stages. The full-size run (`make demo`) is what the README reports."""
import json
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SUMMARY_KEYS = ("success_before_rl", "success_after_rl", "eval_episodes", "rl_steps", "max_drift", "wall_seconds",
                "run_dir")


def _tiny_main_job(model_dir: str, run_dir: str):
    from jaxrl_vl.train.config_overrides import load_config_file

    config = load_config_file(str(REPO / "configs" / "demo.py"))
    assert config.trainer == "sft_then_rl", "the README's main job is SFT then RL on Maze2D"
    config.run_dir = run_dir
    config.maze.num_demos, config.maze.num_test_demos = 6, 2
    sft = config.sft
    sft.model.path, sft.model.build_size, sft.model.random_init = model_dir, "", False
    sft.train.num_steps, sft.train.batch_size, sft.train.grad_accum_steps = 2, 2, 1
    sft.optim.warmup_steps = 1
    sft.checkpoint.async_save = sft.metrics.progress_bar = sft.metrics.plot_at_end = sft.metrics.use_wandb = False
    sft.eval.every_steps, sft.eval.nll_num_examples = 2, 2
    rl = config.rl
    rl.train.num_steps = 1
    rl.rl.num_groups, rl.rl.samples_per_group, rl.rl.eval_episodes = 2, 2, 2
    rl.rl.max_tokens_per_turn = 6
    rl.rl.env_kwargs.max_steps = 3
    rl.vllm.cpu_kv_cache_gib = 1
    rl.checkpoint.async_save = rl.metrics.progress_bar = rl.metrics.plot_at_end = rl.metrics.use_wandb = False
    rl.export.at_end = False
    return config


def config_samples_per_seed() -> int:
    from jaxrl_vl.train.config_overrides import load_config_file

    return int(load_config_file(str(REPO / "configs" / "demo.py")).rl.rl.eval_samples_per_seed)


@pytest.mark.vllm
@pytest.mark.slow
def test_main_job_runs_sft_then_rl_and_resumes(tiny_model_dir, tmp_path):
    from jaxrl_vl.train.pipeline import run_sft_then_rl

    run_dir = str(tmp_path / "run")
    summary = run_sft_then_rl(_tiny_main_job(tiny_model_dir, run_dir))
    assert all(summary[key] is not None for key in SUMMARY_KEYS), summary
    assert summary["rl_steps"] == 1 and summary["sft_steps"] == 2 and summary["eval_seeds"] == 2
    assert summary["eval_episodes"] == 2 * config_samples_per_seed()
    assert 0.0 <= summary["success_before_rl"] <= 1.0 and summary["max_drift"] <= 1e-4
    data = pathlib.Path(run_dir, "data", "train.jsonl").read_text().splitlines()
    assert len(data) == 6 and "Environment feedback" not in data[0]  # config.maze.include_feedback = False
    assert json.loads(pathlib.Path(run_dir, "summary.json").read_text())["rl_steps"] == 1

    # rerun with one more RL step: demonstrations and SFT are skipped, RL resumes from its checkpoint
    config = _tiny_main_job(tiny_model_dir, run_dir)
    config.rl.train.num_steps = 2
    resumed = run_sft_then_rl(config)
    assert resumed["resumed_from_step"] == 1 and resumed["rl_steps"] == 2
    assert resumed["success_before_rl"] == summary["success_before_rl"]  # the same held-out seeds, measured once


@pytest.mark.vllm
@pytest.mark.slow
def test_main_job_with_unstacked_layers(tiny_model_dir, tmp_path):
    """The fast GPU settings end to end: model.layer_loop = "unrolled" stores params as per-layer lists (SFT
    checkpoints and exports them, RL pushes them into vLLM and its logprobs still agree with the trainer's), and
    SFT's and RL's chunked losses take logits at the target positions only."""
    from jaxrl_vl.train.pipeline import run_sft_then_rl

    config = _tiny_main_job(tiny_model_dir, str(tmp_path / "run"))
    config.sft.model.layer_loop = config.rl.model.layer_loop = "unrolled"
    for phase in (config.sft, config.rl):
        phase.train.loss_chunk_size, phase.train.target_positions_multiple = 32, 16
    summary = run_sft_then_rl(config)
    assert summary["rl_steps"] == 1 and summary["sft_steps"] == 2 and summary["max_drift"] <= 1e-4
