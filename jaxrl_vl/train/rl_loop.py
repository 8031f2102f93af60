"""The RL loop on the shared training core: collect -> assign credit -> collate -> update -> push.

    summary = run_rl(config)     # configs/rl_maze.py, rl_digits.py document config.rl / config.vllm

Each step: `rl.num_groups` env seeds x `rl.samples_per_group` episodes through the agent loop on the current
weights (train/rl_rollouts.py), group advantages (train/rl_credit.py), the rows collated and sharded over the
mesh, one or more optimizer updates (train/rl_update.py), the new weights pushed into every vLLM server as
version = step. Synchronous: every rollout of step k uses the weights of step k-1 (drift ~1e-6 fp32). With
`rl.max_staleness=1` the rollouts of step k+1 run while step k trains and take the pushed weights mid-episode;
the ratio against pi_old corrects for it and drift measures it. Held-out success on fixed seeds is measured
before RL, every `rl.eval_every_steps` and at the end. Resume: rerunning the same command restores the latest
checkpoint (state + step), pushes those weights and goes on with the seeds of the next step.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from jaxrl_vl.train import distributed, setup
from jaxrl_vl.train.config_overrides import ConfigError
from jaxrl_vl.train.rl_credit import assign_credit
from jaxrl_vl.train.rl_rollouts import Rollouts, all_processes_metrics
from jaxrl_vl.train.rl_update import RLUpdate
from jaxrl_vl.train.trainer import Trainer


def check_rl_config(rl) -> None:
    if rl.max_staleness not in (0, 1):
        raise ConfigError(f"rl.max_staleness={rl.max_staleness}: 0 (synchronous) or 1 (generate step k+1 while "
                          "training step k)")
    if rl.updates_per_step < 1:
        raise ConfigError(f"rl.updates_per_step={rl.updates_per_step}: at least 1 optimizer update per RL step")


def run_rl(config) -> dict:
    """Train per `config` (config.trainer == "rl"); returns the JSON summary dict."""
    check_rl_config(config.rl)
    trainer = Trainer(config, total_steps=config.train.num_steps, desc="rl")
    start_step, _ = trainer.restore()
    update = RLUpdate(config, trainer)
    rollouts = Rollouts(config, trainer)
    every = config.rl.get("eval_every_steps", 0)
    trainer.add_hook(lambda step: rollouts.evaluate(f"step_{step:05d}", step), every=every, name="eval")
    try:
        rollouts.push(trainer.state, start_step)  # the server starts on the base checkpoint: serve the trainer's
        before = _eval_before(trainer, rollouts)
        max_drift, last = 0.0, {}
        for step in range(start_step + 1, config.train.num_steps + 1):
            last = rl_step(config, trainer, rollouts, update, step)
            max_drift = max(max_drift, last.get("train/drift_mean", 0.0))
        final_step = max(start_step, config.train.num_steps)
        trainer.save_final(final_step)
        after = rollouts.evaluate("after_rl", final_step) if config.rl.eval_episodes else {}
        trainer.writer.write(final_step, after)
    finally:
        rollouts.close()
        trainer.close()
    return _finish(config, trainer, final_step, before, after, last, max_drift if final_step > start_step else None)


def rl_step(config, trainer: Trainer, rollouts: Rollouts, update: RLUpdate, step: int) -> dict:
    """One RL step (see module doc) -> its metrics record."""
    t0 = time.perf_counter()
    groups = rollouts.collect(step)
    t_rollout = time.perf_counter() - t0  # in async mode: the wait not hidden behind training
    metrics = all_processes_metrics(groups)
    credit = assign_credit(groups, config.rl, image_mean=rollouts.image_mean, image_std=rollouts.image_std)
    metrics.update(credit.metrics)
    metrics["rollout/stale_turns"] = float(np.mean([v != str(rollouts.pushed_version) for t in credit.kept
                                                    for versions in t.weight_versions for v in versions] or [0.0]))
    if credit.rows:
        t1 = time.perf_counter()
        batch, host, updates = update.collate(credit.rows, step)
        metrics["time/collate"] = time.perf_counter() - t1
        metrics.update(update(batch, updates))
        host = distributed.sum_over_processes(host, "rl_host_stats")
        metrics.update({f"train/{k}": v for k, v in trainer.throughput(
            seconds=metrics["time/score"] + metrics["time/update"], tokens=metrics["train/tokens"],
            seq_len=int(batch["input_ids"].shape[-1]), num_patches=host["host_num_patches"],
            num_images=host["host_num_images"], forward_passes=_scoring_passes(config)).items()})
        t2 = time.perf_counter()
        metrics["time/push"] = rollouts.push(trainer.state, step)
        metrics["time/push_wall"] = time.perf_counter() - t2
    if config.rl.save_samples and (step % config.rl.save_samples_every_steps == 0 or step == 1):
        rollouts.save_samples(groups, step)
    metrics.update({"time/rollout": t_rollout, "time/step": time.perf_counter() - t0,
                    "rollout/server_restarts": float(rollouts.restarts)})
    return trainer.end_step(step, metrics, bar_postfix=dict(reward=f"{metrics['rollout/reward_mean']:.3f}",
                                                            drift=f"{metrics.get('train/drift_mean', 0.0):.1e}"))


def _scoring_passes(config) -> float:
    return float(config.loss.old_logprobs == "trainer") + float(config.loss.kl_coef > 0)


def _eval_before(trainer: Trainer, rollouts: Rollouts) -> dict:
    """Held-out success before RL (kept in the run dir, so a resumed run does not measure it again)."""
    path = os.path.join(trainer.run_dir, "eval_before_rl.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    before = rollouts.evaluate("before_rl", trainer.start_step) if trainer.config.rl.eval_episodes else {}
    setup.write_json(path, before)
    trainer.writer.write(trainer.start_step, before)
    return before


def _finish(config, trainer: Trainer, final_step: int, before: dict, after: dict, last: dict, max_drift) -> dict:
    export_dir, plots = trainer.export_and_plot()
    rl = config.rl
    return trainer.write_summary({
        "rl_steps": int(final_step), "success_before_rl": before.get("eval_before_rl/success_rate"),
        "success_after_rl": after.get("eval_after_rl/success_rate"),
        "eval_episodes": int(rl.eval_episodes) * int(rl.get("eval_samples_per_seed", 1)),
        "eval_seeds": int(rl.eval_episodes), "eval_temperature": float(rl.eval_temperature), "max_drift": max_drift,
        "last_reward_mean": last.get("rollout/reward_mean"), "export_dir": export_dir, "plots": plots,
        "samples_dir": os.path.join(trainer.run_dir, "samples")})
