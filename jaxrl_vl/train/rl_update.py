"""The RL update of one step: training rows -> sharded micro-batches -> old / reference logprobs -> optimizer
update(s) on the shared training core.

    update = RLUpdate(config, trainer)
    batch, host = update.collate(rows, step)     # this process's rows; shapes agreed across processes
    metrics = update(batch)                      # trainer.state updated in place

Old policy (`loss.old_logprobs`): "rollout" takes vLLM's logprobs as pi_old (the rollout policy IS the old
policy: the weights the trainer holds at the start of the step, pushed before sampling); "trainer" scores the
batch once with those weights before the first update (one extra forward), so every PPO mini-batch's ratio is
pi_theta / pi_old of the trainer's own numerics. KL to the reference (`loss.kl_coef` > 0): with LoRA the
reference is the base model (the frozen params without the adapter: no copy); a full fine-tune keeps one copy of
the initial params, sharded like them.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_vl.data.collate import rl_micro_batches, split_host_stats
from jaxrl_vl.losses.policy import PolicyLossConfig
from jaxrl_vl.train import distributed
from jaxrl_vl.train.config_overrides import ConfigError
from jaxrl_vl.train.rl_step import make_rl_step, make_score_batches
from jaxrl_vl.train.trainer import Trainer, target_positions_multiple

OLD_LOGPROBS_SOURCES = ("rollout", "trainer")


def policy_loss_config(loss) -> PolicyLossConfig:
    return PolicyLossConfig(name=loss.name, aggregation=loss.aggregation, clip_eps_low=loss.clip_eps_low,
                            clip_eps_high=loss.clip_eps_high, dual_clip_c=loss.dual_clip_c or None,
                            tis_cap=loss.tis_cap or None, kl_coef=loss.kl_coef, kl_estimator=loss.kl_estimator,
                            token_sum_divisor=loss.token_sum_divisor)


def check_loss_config(config) -> None:
    loss = config.loss
    if loss.old_logprobs not in OLD_LOGPROBS_SOURCES:
        raise ConfigError(f"loss.old_logprobs={loss.old_logprobs!r}; choose one of {OLD_LOGPROBS_SOURCES}")
    if loss.tis_cap and loss.old_logprobs == "rollout":
        raise ConfigError("loss.tis_cap weights tokens by pi_old / pi_rollout, which is 1 when "
                          "loss.old_logprobs='rollout'; set loss.old_logprobs='trainer' or loss.tis_cap=0")


def train_mini_batches(step_fn, state, batch: dict, updates: int):
    """One optimizer update per mini-batch (PPO-style: later ones are off-policy, the ratio to pi_old corrects for
    it). Metrics are averaged over the updates, except counts (summed) and drift_*: only the first update scores
    the tokens with the weights vLLM sampled them with."""
    size = batch["input_ids"].shape[0] // updates
    per_update = []
    for u in range(updates):
        state, metrics = step_fn(state, {k: v[u * size:(u + 1) * size] for k, v in batch.items()})
        per_update.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    merged = {k: float(np.mean([m[k] for m in per_update])) for k in per_update[0]}
    merged.update({k: v for k, v in per_update[0].items() if k.startswith("drift")})
    merged.update({k: sum(m[k] for m in per_update) for k in ("loss_tokens", "tokens") if k in per_update[0]})
    merged.update(ratio_min=min(m["ratio_min"] for m in per_update), ratio_max=max(m["ratio_max"] for m in per_update),
                  updates=float(updates))
    return state, {f"train/{k}": v for k, v in merged.items()}


class RLUpdate:
    def __init__(self, config, trainer: Trainer):
        check_loss_config(config)
        self.config, self.trainer = config, trainer
        temperature = float(config.rl.temperature)
        self.step_fn = make_rl_step(trainer.forward, trainer.optimizer, trainer.schedule,
                                    policy_loss_config(config.loss), trainer.view,
                                    max_turns_logged=config.rl.drift_turns_logged, temperature=temperature,
                                    **trainer.step_kwargs())
        self.score = make_score_batches(trainer.forward, trainer.view, temperature=temperature, mesh=trainer.mesh)
        self.reference = None
        if config.loss.kl_coef > 0 and trainer.state.lora is None:  # a copy: the step donates the state
            self.reference = jax.tree.map(jnp.copy, trainer.state.params)

    def num_updates(self, num_rows: int) -> int:
        """PPO mini-batches this step: rl.updates_per_step, but never one without a real row."""
        return min(self.config.rl.updates_per_step, -(-num_rows // self.config.train.grad_accum_steps))

    def collate(self, rows: list[dict], step: int) -> tuple[dict, dict, int]:
        """-> (global batch [A, ...] on the mesh, host stats, PPO updates)."""
        config, rl = self.config, self.config.rl
        updates = distributed.agree_max({"updates": self.num_updates(len(rows))}, "rl_updates")["updates"]
        micro_batches = config.train.grad_accum_steps * updates
        if updates > 1:  # mini-batches mix the groups (same order on a resumed step)
            rows = [rows[i] for i in np.random.default_rng([config.seed, step]).permutation(len(rows))]
        local_episodes = len(train_share(rl))
        rows_multiple = max(1, local_episodes // micro_batches)
        shards = self.trainer.local_shards
        batch = rl_micro_batches(rows, self.trainer.model_config, num_micro_batches=micro_batches,
                                 length_multiple=rl.length_multiple, patch_multiple=rl.patch_multiple,
                                 rows_multiple=-(-rows_multiple // shards) * shards,
                                 target_positions_multiple=target_positions_multiple(config.train),
                                 num_shards=shards, agree=lambda needs: distributed.agree_max(needs, "rl_collate"))
        batch, host = split_host_stats(batch)
        return self.trainer.place(batch), host, updates

    def __call__(self, batch: dict, updates: int) -> dict:
        """Scores (old / reference logprobs) and updates; trainer.state is replaced. -> metrics incl. times."""
        state, start = self.trainer.state, time.perf_counter()
        if self.config.loss.old_logprobs == "trainer":
            batch["old_logprobs"] = self.score(state.params, state.lora, batch)
        if self.config.loss.kl_coef > 0:
            reference = self.reference if self.reference is not None else state.params  # LoRA: the base
            batch["ref_logprobs"] = self.score(reference, None, batch)
        jax.block_until_ready(batch)
        scored = time.perf_counter()
        self.trainer.state, metrics = train_mini_batches(self.step_fn, state, batch, updates)
        metrics.update({"time/score": scored - start, "time/update": time.perf_counter() - scored})
        return metrics


def train_share(rl) -> list[int]:
    """The episode indices of one step this process plays (groups g with g % processes == process)."""
    groups = list(range(rl.num_groups))[jax.process_index()::jax.process_count()]
    return [g * rl.samples_per_group + s for g in groups for s in range(rl.samples_per_group)]
