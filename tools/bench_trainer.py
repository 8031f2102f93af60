#!/usr/bin/env python
"""Times what a user launches: `launch/train.py` itself (SFT, or RL updates), end to end on real batches (the
data pipeline, bucketed shapes, host collation, sharding, the step, metrics), in a child process. The last line
printed is a JSON summary of the steady-state steps (the first `--warmup` steps, which compile, are left out).

    python tools/bench_trainer.py --config configs/gpu.py:sft_2b --steps 12 -- --config.data.path=DATA
    python tools/bench_trainer.py --config configs/gpu.py:rl_2b --steps 6 -- \
        --config.rl.replay_rollouts_from=ROLLOUTS --config.rl.eval_episodes=0 --config.model.path=DIR

SFT: tokens/s and MFU as the trainer logs them (`train/tokens_per_second`, `train/mfu`: FLOPs of the real tokens,
images and target positions of each batch), the step period split into host data (waiting for the next collated
batch and placing it: `time/data`) and the rest (device step + dispatch). RL: the update's tokens/s and MFU
(scoring forward passes included) and the step split into rollout / collate / score / update / push / other.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--config.metrics.use_wandb=false", "--config.metrics.progress_bar=false", "--config.metrics.plot_at_end=false",
         "--config.export.at_end=false", "--config.train.log_every_steps=1", "--config.checkpoint.every_steps=100000",
         "--config.checkpoint.async_save=false"]
SFT_QUIET = ["--config.eval.every_steps=0", "--config.eval.nll_num_examples=0", "--config.eval.num_generation_examples=0",
             "--config.optim.warmup_steps=0"]
RL_SPLIT = ("time/rollout", "time/collate", "time/score", "time/update", "time/push")


def median(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(records: list[dict], trainer: str) -> dict:
    out = {"steps_timed": len(records), "tokens_per_second": median(records, "train/tokens_per_second"),
           "mfu": median(records, "train/mfu"), "peak_memory_gib": median(records, "train/peak_memory_gib")}
    if trainer == "rl":
        step = median(records, "time/step")
        split = {key.split("/")[1]: median(records, key) for key in RL_SPLIT}
        split["other"] = step - sum(v for v in split.values() if v is not None)
        return {**out, "step_seconds": step, "split_seconds": split}
    step, data = median(records, "train/step_seconds"), median(records, "time/data")
    return {**out, "step_seconds": step, "split_seconds": {"host_data": data, "device_step_and_dispatch": step - data}}


def run(config: str, steps: int, warmup: int, overrides: list[str], run_dir: str) -> tuple[list[dict], dict, str]:
    """launch/train.py in a child process -> (steady-state step records, summary, trainer kind)."""
    sys.path.insert(0, str(REPO))
    from jaxrl_vl.train.config_overrides import load_config_file
    trainer = load_config_file(config).trainer
    args = [sys.executable, str(REPO / "launch" / "train.py"), "--config", config, f"--config.run_dir={run_dir}",
            f"--config.train.num_steps={steps}", *QUIET, *(SFT_QUIET if trainer == "sft" else []), *overrides]
    # the GPU memory share the step benchmark gives JAX (tools/bench_train.py), unless the caller set one
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94"))
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env)
    sys.stderr.write(proc.stderr[-6000:])
    if proc.returncode != 0:
        raise SystemExit(f"launch/train.py exited {proc.returncode}")
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps_seen = [r for r in records if "train/loss" in r and r["step"] > warmup]
    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    return steps_seen, summary, trainer


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="a config file (path[:preset]) as launch/train.py takes it")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out (compilation)")
    p.add_argument("--run-dir", default="", help="default: a temporary folder")
    p.add_argument("--json-out", default="")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="bench_trainer_")
    records, run_summary, trainer = run(args.config, args.steps, args.warmup, overrides, run_dir)
    summary = {"benchmark": "trainer", "trainer": trainer,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": "python tools/bench_trainer.py " + " ".join(argv), "config": args.config,
               "overrides": overrides, "xla_flags": os.environ.get("XLA_FLAGS", ""), **summarize(records, trainer),
               "run_wall_seconds": run_summary.get("wall_seconds")}
    with open(os.path.join(run_dir, "config.json")) as f:
        resolved = json.load(f)
    summary["recipe"] = {k: resolved["model"].get(k) for k in ("dtype", "param_dtype", "attention", "layer_loop",
                                                                "remat")}
    summary["recipe"].update(moment_dtype=resolved["optim"].get("moment_dtype"),
                             batch_size=resolved["train"]["batch_size"], max_length=resolved["data"]["max_length"],
                             packing=resolved["data"]["packing"], lora=resolved["lora"]["enabled"])
    line = json.dumps(summary)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    print(line)
    return summary


if __name__ == "__main__":
    main()
