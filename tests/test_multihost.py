"""Two real processes (jax.distributed on 127.0.0.1, 4 fake CPU devices each, gloo) run `launch/train.py`: SFT for
a few steps and RL updates on recorded rollouts. Losses, grad norms and final params equal one process on 8
devices; only process 0 writes metrics, the export and the progress bar; local batches that pad to different
lengths still agree on one shape."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from jax_processes import REPO, run_processes

TRAIN = REPO / "launch" / "train.py"


def _chats(folder: Path, count: int) -> Path:
    """Chats; with shuffle off, process 0 reads the even records (short, text only: its rows pad to 64 tokens,
    no pixels) and process 1 the odd ones (long, with an image of 32 or 64 px), so the processes must agree on
    the padded length and on the vision shapes."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "step", "turn", "left", "right", "maze", "goal"]
    for split, n in (("train", count), ("test", 4)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(n):
                length = 4 if i % 2 == 0 else 40
                answer = " ".join(rng.choice(words, length))
                content = [{"type": "text", "text": "say some words"}]
                if i % 2:
                    side = 32 if i % 4 == 1 else 64
                    path = folder / f"{split}{i}.png"
                    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
                    content.insert(0, {"type": "image", "image": str(path)})
                f.write(json.dumps({"id": f"{split}{i}", "messages": [
                    {"role": "user", "content": content}, {"role": "assistant", "content": answer}]}) + "\n")
    return folder


def _sft_args(model_dir, data_dir, run_dir) -> list[str]:
    return ["--config", str(REPO / "configs" / "base.py"), f"--config.model.path={model_dir}",
            "--config.data.source=jsonl", f"--config.data.path={data_dir}", "--config.data.shuffle=false",
            "--config.data.max_length=128", f"--config.run_dir={run_dir}", "--config.train.num_steps=3",
            "--config.train.batch_size=16", "--config.train.grad_accum_steps=2", "--config.optim.warmup_steps=1",
            "--config.optim.learning_rate=1e-3", "--config.checkpoint.every_steps=2",
            "--config.eval.nll_num_examples=4", "--config.eval.num_generation_examples=0",
            "--config.metrics.use_wandb=false", "--config.metrics.plot_at_end=false", "--config.mesh.data=2"]


def _rl_args(model_dir, replay_dir, run_dir) -> list[str]:
    return ["--config", str(REPO / "configs" / "rl_maze.py"), f"--config.model.path={model_dir}",
            "--config.model.build_size=", f"--config.rl.replay_rollouts_from={replay_dir}",
            "--config.rl.eval_episodes=0", "--config.rl.num_groups=4", "--config.rl.samples_per_group=2",
            f"--config.run_dir={run_dir}", "--config.train.num_steps=2", "--config.optim.learning_rate=1e-3",
            "--config.loss.old_logprobs=trainer", "--config.metrics.use_wandb=false",
            "--config.metrics.plot_at_end=false", "--config.mesh.data=-1", "--config.mesh.fsdp=2",
            "--config.mesh.tensor=2"]


def _one_process(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, str(TRAIN), *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def _steps(run_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    steps = [r["step"] for r in records if "train/loss" in r]
    assert len(steps) == len(set(steps)), steps  # one writer: every step logged once
    return {r["step"]: r for r in records if "train/loss" in r}


def _compare(one_dir: Path, two_dir: Path, keys: tuple[str, ...], model_dir) -> None:
    one, two = _steps(one_dir), _steps(two_dir)
    assert sorted(one) == sorted(two) and one
    for step in one:
        for key in keys:
            assert abs(one[step][key] - two[step][key]) <= 1e-5 * max(1.0, abs(one[step][key])), (step, key)
    params_one, params_two = load_file(one_dir / "export" / "model.safetensors"), \
        load_file(two_dir / "export" / "model.safetensors")
    assert params_one.keys() == params_two.keys()
    diff = max(float(np.abs(params_one[k].astype(np.float32) - params_two[k].astype(np.float32)).max())
               for k in params_one)
    assert diff < 1e-5, diff
    start = load_file(Path(model_dir) / "model.safetensors")
    moved = max(float(np.abs(params_one[k] - start[k]).max()) for k in params_one if k in start)
    assert moved > 1e-4, moved  # the runs trained: the comparison is not of two untouched copies


def _check_only_process_zero_writes(outputs) -> None:
    (out0, err0), (out1, err1) = outputs
    json_lines = [[line for line in out.splitlines() if line.startswith("{")] for out in (out0, out1)]
    assert json.loads(json_lines[0][-1])["run_dir"] and not json_lines[1]  # the summary line: process 0 only
    assert "it/s" in err0 and "it/s" not in err1  # the progress bar: process 0 only


@pytest.mark.slow
def test_two_processes_sft_equals_one_process_on_eight_devices(tiny_model_dir, tmp_path):
    data = _chats(tmp_path / "data", 24)
    _one_process(_sft_args(tiny_model_dir, data, tmp_path / "one"))
    outputs = run_processes(TRAIN, _sft_args(tiny_model_dir, data, tmp_path / "two"), num_processes=2,
                            devices_per_process=4, timeout_seconds=900)
    _check_only_process_zero_writes(outputs)
    _compare(tmp_path / "one", tmp_path / "two", ("train/loss", "train/grad_norm", "train/target_tokens"),
             tiny_model_dir)
    one, two = _steps(tmp_path / "one"), _steps(tmp_path / "two")
    assert one[1]["train/tokens"] == two[1]["train/tokens"]
    evals = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl") if "eval/test_nll" in line]
    assert evals and np.isfinite(evals[-1]["eval/test_nll"])


@pytest.mark.slow
def test_two_processes_rl_update_on_recorded_rollouts_equals_one_process(tiny_model_dir, tmp_path):
    replay = tmp_path / "rollouts"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_replay_rollouts.py"), "--model", str(tiny_model_dir),
                    "--out", str(replay), "--steps", "2", "--groups", "4", "--samples", "2", "--seq-len", "100",
                    "--images", "1", "--image-size", "32"], check=True, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    _one_process(_rl_args(tiny_model_dir, replay, tmp_path / "one"))
    outputs = run_processes(TRAIN, _rl_args(tiny_model_dir, replay, tmp_path / "two"), num_processes=2,
                            devices_per_process=4, timeout_seconds=900)
    _check_only_process_zero_writes(outputs)
    _compare(tmp_path / "one", tmp_path / "two", ("train/loss", "train/grad_norm", "train/drift_mean",
                                                  "train/loss_tokens"), tiny_model_dir)
