"""SFT then RL in one command: Maze2D solver demonstrations -> SFT -> RL on Maze2D.

    python launch/train.py --config configs/maze_sft_rl.py      # config.trainer == "sft_then_rl"

Stages, each resumable (rerunning the command skips what is finished and resumes the rest):
  1. demonstrations: tools/make_sft_data.py writes RUN_DIR/data/{train,test}.jsonl + images (skipped
     when RUN_DIR/data/train.jsonl exists). The held-out eval layouts are kept out of it.
  2. SFT (train/sft_loop.py) with `config.sft` into RUN_DIR/sft; its HF export is the RL start.
  3. RL (train/rl_loop.py) with `config.rl` into RUN_DIR/rl, on the same env settings as the data;
     held-out greedy success is measured on the same seeds before and after RL.
The summary (last printed line) is the RL summary plus `sft_*` fields, with `run_dir` and
`wall_seconds` of the whole pipeline.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from jaxrl_vl.train import setup


def write_maze_demos(maze, out_dir: str) -> str:
    """Runs tools/make_sft_data.py for Maze2D into out_dir (atomically: a temporary folder renamed
    when complete). Returns out_dir. Skips the work when out_dir/train.jsonl exists."""
    if os.path.exists(os.path.join(out_dir, "train.jsonl")):
        return out_dir
    tmp = f"{out_dir}.writing-{os.getpid()}"
    command = [sys.executable, os.path.join(setup.REPO_ROOT, "tools", "make_sft_data.py"), "--env", "maze2d",
               "--n", str(maze.num_demos), "--n-test", str(maze.num_test_demos), "--size", str(maze.size),
               "--cell-px", str(maze.cell_px), "--action-format", maze.action_format,
               "--prompt-style", maze.prompt_style, "--seed", str(maze.demo_seed), "--out", tmp]
    command += ["--positions", maze.positions, "--max-steps", str(maze.max_steps)]
    if not maze.include_feedback:
        command.append("--no-feedback")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    os.rename(tmp, out_dir)
    return out_dir


def _env_kwargs(maze) -> dict:
    from jaxrl_vl.envs.maze2d.generate import default_max_steps

    # the step cap appears in the prompt ("allowed to take N more steps"): the same as the demos'
    return {"size": maze.size, "cell_px": maze.cell_px, "action_format": maze.action_format,
            "prompt_style": maze.prompt_style, "include_feedback": maze.include_feedback,
            "positions": maze.positions, "max_steps": maze.max_steps or default_max_steps(maze.size)}


def run_sft_then_rl(config) -> dict:
    """Demonstrations -> SFT -> RL (see module doc). Returns the combined summary."""
    from jaxrl_vl.train.rl_loop import run_rl
    from jaxrl_vl.train.sft_loop import run_sft

    wall_start = time.time()
    run_dir = setup.resolve_run_dir(config)
    data_dir = write_maze_demos(config.maze, os.path.join(run_dir, "data"))

    sft = config.sft
    sft.run_dir = os.path.join(run_dir, "sft")
    sft.data.source, sft.data.path = "jsonl", data_dir
    sft_summary_path = os.path.join(sft.run_dir, "summary.json")
    if os.path.exists(sft_summary_path):  # finished earlier (e.g. the run was killed during RL)
        with open(sft_summary_path) as f:
            sft_summary = json.load(f)
    else:
        sft_summary = run_sft(sft)
    if not sft_summary.get("export_dir"):
        raise ValueError("the SFT stage wrote no export (set sft.export.at_end=True): RL starts from it")

    rl = config.rl
    rl.run_dir = os.path.join(run_dir, "rl")
    rl.model.path, rl.model.build_size, rl.model.random_init = sft_summary["export_dir"], "", False
    for key, value in _env_kwargs(config.maze).items():
        rl.rl.env_kwargs[key] = value
    # training episodes never land on a held-out layout; the held-out evaluation plays exactly those
    rl.rl.env_kwargs.exclude_eval_layouts = True
    rl.rl.eval_env_kwargs.exclude_eval_layouts = False
    rl.vllm.max_images_per_prompt = max(rl.vllm.max_images_per_prompt, rl.rl.env_kwargs.max_steps)
    summary = run_rl(rl)
    summary.update({f"sft_{k}": v for k, v in sft_summary.items() if k in ("steps", "wall_seconds", "run_dir")})
    summary.update(run_dir=run_dir, rl_run_dir=rl.run_dir, wall_seconds=round(time.time() - wall_start, 2))
    setup.write_json(os.path.join(run_dir, "summary.json"), summary)
    return summary
