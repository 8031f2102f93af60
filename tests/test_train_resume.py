"""Kill-and-resume: a short SFT run killed with SIGKILL mid-training, rerun with the same command,
ends with the same bits as an uninterrupted run (params, optimizer state, step; CPU)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 10


def _small_image_folder(root):
    """A 10-class image folder with 4 train / 1 test image per class (copied from the digits)."""
    from jaxrl_vl.data.digits import digit_examples
    for split, per_class in (("train", 4), ("test", 1)):
        counts = {}
        for index, image, name in digit_examples(split):
            if counts.get(name, 0) < per_class:
                os.makedirs(os.path.join(root, split, name), exist_ok=True)
                image.save(os.path.join(root, split, name, f"{index:04d}.png"))
                counts[name] = counts.get(name, 0) + 1
    return root


def _command(model_dir, data_dir, run_dir):
    return [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", os.path.join(ROOT, "configs", "sft_digits.py"),
            f"--config.model.path={model_dir}", "--config.model.build_size=", "--config.data.source=image_folder",
            f"--config.data.path={data_dir}", f"--config.run_dir={run_dir}", f"--config.train.num_steps={NUM_STEPS}",
            "--config.train.batch_size=4", "--config.train.grad_accum_steps=2", "--config.optim.warmup_steps=2",
            "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=3", "--config.eval.every_steps=0",
            "--config.eval.nll_num_examples=4", "--config.eval.num_generation_examples=2",
            # JAX greedy eval: a vLLM server started by the run that gets SIGKILLed would be orphaned
            "--config.eval.max_new_tokens=4", "--config.eval.generation_backend=jax",
            "--config.metrics.use_wandb=false", "--config.metrics.progress_bar=false",
            "--config.metrics.plot_at_end=false"]


def _env(cache_dir):
    # a shared persistent compilation cache: the three processes compile the step once
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache_dir}


def _finished_steps(run_dir):
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def _restore_state(run_dir, step):
    manager = ocp.CheckpointManager(os.path.join(run_dir, "checkpoints"), item_names=("state", "data"))
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                            data=ocp.args.JsonRestore()))
    manager.close()
    return restored.state, restored.data


def _summary(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_sigkill_then_rerun_matches_uninterrupted_run_bitwise(tmp_path, tiny_model_dir):
    data_dir = _small_image_folder(str(tmp_path / "data"))
    env = _env(str(tmp_path / "jax_cache"))
    reference_dir, resumed_dir = str(tmp_path / "reference"), str(tmp_path / "resumed")

    reference = subprocess.run(_command(tiny_model_dir, data_dir, reference_dir), env=env, capture_output=True,
                               text=True, timeout=600, cwd=ROOT)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert _summary(reference.stdout)["steps"] == NUM_STEPS

    # Kill as soon as a checkpoint past the first one is finished (steps run ~0.1-1 s apart).
    killed = subprocess.Popen(_command(tiny_model_dir, data_dir, resumed_dir), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 600
    while time.time() < deadline and killed.poll() is None:
        if any(step >= 4 for step in _finished_steps(resumed_dir)):
            break
        time.sleep(0.02)
    assert killed.poll() is None, "the run finished before it could be killed:\n" + killed.stderr.read()[-3000:]
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    killed.stdout.close()
    killed.stderr.close()
    steps_at_kill = _finished_steps(resumed_dir)
    assert steps_at_kill and max(steps_at_kill) < NUM_STEPS
    assert not os.path.exists(os.path.join(resumed_dir, "summary.json"))

    rerun = subprocess.run(_command(tiny_model_dir, data_dir, resumed_dir), env=env, capture_output=True, text=True,
                           timeout=600, cwd=ROOT)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = _summary(rerun.stdout)
    assert summary["steps"] == NUM_STEPS
    assert 0 < summary["resumed_from_step"] < NUM_STEPS

    want_state, want_data = _restore_state(reference_dir, NUM_STEPS)
    got_state, got_data = _restore_state(resumed_dir, NUM_STEPS)
    assert got_data == want_data  # the data iterator ended at the same position
    want_leaves, want_tree = jax.tree.flatten(want_state)
    got_leaves, got_tree = jax.tree.flatten(got_state)
    assert got_tree == want_tree
    for want, got in zip(want_leaves, got_leaves):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # bitwise: exact equality
    # the HF exports of the final params are byte-identical too
    with open(os.path.join(reference_dir, "export", "model.safetensors"), "rb") as f:
        want_bytes = f.read()
    with open(os.path.join(resumed_dir, "export", "model.safetensors"), "rb") as f:
        assert f.read() == want_bytes
    _check_exports(reference_dir)
    # metrics.jsonl of the resumed run has one record per step (killed steps replaced, not duplicated)
    with open(os.path.join(resumed_dir, "metrics.jsonl")) as f:
        train_steps = [json.loads(line)["step"] for line in f if '"train/loss"' in line]
    assert train_steps == list(range(1, NUM_STEPS + 1))


def _check_exports(run_dir):
    """The final export loads in transformers with our weights; any checkpoint exports on demand."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoTokenizer, Qwen3VLForConditionalGeneration

    export_dir = os.path.join(run_dir, "export")
    model = Qwen3VLForConditionalGeneration.from_pretrained(export_dir, dtype=torch.float32)
    ours = load_file(os.path.join(export_dir, "model.safetensors"))
    theirs = model.state_dict()
    for name, value in ours.items():
        np.testing.assert_array_equal(theirs[name].numpy(), value)
    assert AutoTokenizer.from_pretrained(export_dir).chat_template  # tokenizer files copied
    result = subprocess.run([sys.executable, "-m", "jaxrl_vl.train.export", run_dir, "--step", str(NUM_STEPS - 2)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    older = json.loads(result.stdout.strip().splitlines()[-1])["export_dir"]
    assert AutoConfig.from_pretrained(older).model_type == "qwen3_vl"
    older_weights = load_file(os.path.join(older, "model.safetensors"))
    assert older_weights.keys() == ours.keys()
    assert any(not np.array_equal(older_weights[k], ours[k]) for k in ours)  # two steps earlier differs
