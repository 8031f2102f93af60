"""The RL loop: rollouts (vLLM) -> advantages -> micro-batched update (JAX) -> weight push -> repeat.

    summary = run_rl(config)     # configs/rl_maze.py, rl_digits.py document config.rl / config.vllm

Each step: `rl.num_groups` env seeds x `rl.samples_per_group` episodes through the agent loop
(rollout/agent_loop.py) on the current weights; group advantages (`rl.advantage`), optionally
dropping groups whose rewards are all equal; trajectories -> training rows -> one optimizer update
(train/rl_step.py, `train.grad_accum_steps` micro-batches); the new params pushed into every vLLM
server as weight version = step (rollout/weight_push.py). Synchronous: every rollout of step k uses
the weights of step k-1 (drift ~1e-6 fp32). Held-out success is measured greedily on fixed seeds
before RL and at the end. A vLLM server is started on the base checkpoint when `vllm.url` is empty.
With `rl.max_staleness=1` (async mode) the rollouts of step k+1 run while step k trains and take
the pushed weights mid-episode; the loss's ratio against vLLM's logprobs (`loss.old_logprobs=
"rollout"`, or truncated IS with "trainer") corrects for the staleness, and drift then measures it.
Resume: rerunning the same command restores the latest checkpoint (state + step), pushes those
weights and goes on with the seeds of the next step.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_vl.envs import make_env
from jaxrl_vl.losses import step_advantages
from jaxrl_vl.losses.advantages import compute_advantages, weight_negative, zero_variance_groups
from jaxrl_vl.losses.policy import PolicyLossConfig
from jaxrl_vl.rollout import weight_push
from jaxrl_vl.rollout.agent_loop import AgentConfig, env_copier, load_decoder, run_groups
from jaxrl_vl.rollout.client import VLLMClient
from jaxrl_vl.rollout.supervisor import ServerSupervisor, run_supervised
from jaxrl_vl.rollout.trajectory import rollout_metrics, save_sample, training_rows
from jaxrl_vl.train import setup
from jaxrl_vl.train.checkpoints import CheckpointStore
from jaxrl_vl.train.metrics import MetricsWriter
from jaxrl_vl.train.optim import make_optimizer
from jaxrl_vl.train.rl_step import build_micro_batches, make_rl_step, make_score_logprobs
from jaxrl_vl.train.sft_step import loss_target_positions_multiple
from jaxrl_vl.train.state import create_train_state

log = logging.getLogger("jaxrl_vl.rl")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def agent_config(rl, *, evaluation: bool = False) -> AgentConfig:
    return AgentConfig(samples_per_group=rl.get("eval_samples_per_seed", 1) if evaluation else rl.samples_per_group,
                       max_concurrent_episodes=rl.max_concurrent_episodes, max_turns=rl.max_turns or None,
                       max_tokens_per_turn=rl.max_tokens_per_turn, max_sequence_tokens=rl.max_sequence_tokens,
                       max_generated_tokens=rl.max_generated_tokens or None,
                       temperature=rl.eval_temperature if evaluation else rl.temperature,
                       top_p=1.0 if evaluation else rl.top_p, seed=rl.sampling_seed)


def policy_loss_config(loss) -> PolicyLossConfig:
    return PolicyLossConfig(name=loss.name, aggregation=loss.aggregation, clip_eps_low=loss.clip_eps_low,
                            clip_eps_high=loss.clip_eps_high, dual_clip_c=loss.dual_clip_c or None,
                            tis_cap=loss.tis_cap or None, kl_coef=loss.kl_coef, kl_estimator=loss.kl_estimator,
                            token_sum_divisor=loss.token_sum_divisor)


def _image_normalization(model_dir: str) -> tuple[list[float], list[float]]:
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = os.path.join(model_dir, name)
        if os.path.exists(path):
            with open(path) as f:
                processor = json.load(f)
            processor = processor.get("image_processor", processor)
            if "image_mean" in processor:
                return list(processor["image_mean"]), list(processor["image_std"])
    raise FileNotFoundError(f"{model_dir} has no preprocessor_config.json with image_mean/image_std")


def _train_mini_batches(step_fn, state, batch: dict, updates: int):
    """One optimizer update per mini-batch (PPO-style: later ones are off-policy, the policy loss's ratio to
    the rollout logprobs corrects for it). Metrics are averaged over the updates, except counts (summed) and
    drift_*: only the first update scores the tokens with the weights vLLM sampled them with."""
    size = batch["input_ids"].shape[0] // updates
    per_update = []
    for u in range(updates):
        state, metrics = step_fn(state, {k: v[u * size:(u + 1) * size] for k, v in batch.items()})
        per_update.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    merged = {k: float(np.mean([m[k] for m in per_update])) for k in per_update[0]}
    merged.update({k: v for k, v in per_update[0].items() if k.startswith("drift")})
    merged["loss_tokens"] = sum(m["loss_tokens"] for m in per_update)
    merged.update(ratio_min=min(m["ratio_min"] for m in per_update), ratio_max=max(m["ratio_max"] for m in per_update),
                  updates=float(updates))
    return state, {f"train/{k}": v for k, v in merged.items()}


def turn_level_advantages(groups, episode_advantages, rl) -> tuple[list[list[np.ndarray]], dict]:
    """Per group, per episode, per turn: A_episode + rl.step_advantage_weight * A_step (GiGPO)."""
    out, credited, turns, cluster_sizes = [], 0, 0, []
    for group, row in zip(groups, episode_advantages):
        step = step_advantages.step_advantages([t.turn_states for t in group], [t.turn_rewards for t in group],
                                               rl.step_discount)
        out.append(step_advantages.combine(row, step, rl.step_advantage_weight))
        credited += sum(int(np.count_nonzero(s)) for s in step)
        turns += sum(len(s) for s in step)
        keys = [k for t in group for k in t.turn_states if k is not None]
        cluster_sizes += [keys.count(k) for k in set(keys)]
    return out, {"rollout/step_credited_turns": credited / max(turns, 1),
                 "rollout/step_group_size_mean": float(np.mean(cluster_sizes or [0.0]))}


def train_seeds(rl, step: int) -> list[int]:
    """Env seeds of RL step `step` (1-based): disjoint across steps, the same on resume."""
    return [rl.train_seed_offset + (step - 1) * rl.num_groups + g for g in range(rl.num_groups)]


def eval_seeds(rl) -> list[int]:
    return [rl.eval_seed_offset + i for i in range(rl.eval_episodes)]


class _Servers:
    """The vLLM servers rollouts use: attached by URL, or started here (stopped by close())."""

    def __init__(self, config, model_dir: str, run_dir: str):
        from jaxrl_vl.rollout import server as server_lib
        v = config.vllm
        self._server_lib, self.handles, self.started = server_lib, [], False
        urls = [u for u in (v.url.split(",") if v.url else []) if u]
        self.transport = v.get("transport", "reload")
        if self.transport not in weight_push.TRANSPORTS:
            raise ValueError(f"vllm.transport={self.transport!r}: choose one of {weight_push.TRANSPORTS}")
        token_env = v.get("token_env", "")
        api_key = os.environ.get(token_env) if token_env else None
        if token_env and not api_key:
            raise ValueError(f"vllm.token_env={token_env!r}: that environment variable is empty; export the "
                             "server's token (the JAXRL_VL_SERVER_TOKEN given to launch/vllm_gpu_server.sh)")
        if urls:
            self.handles = [server_lib.attach_server(u, v.served_model_name or None, api_key=api_key) for u in urls]
        else:
            server_config = server_lib.ServerConfig(
                model=model_dir, served_model_name=v.served_model_name or "policy", device=v.device,
                max_model_len=v.max_model_len, max_num_seqs=v.max_num_seqs,
                max_num_batched_tokens=max(v.max_model_len, 2048), cpu_kv_cache_gib=v.cpu_kv_cache_gib,
                cpu_cores=v.cpu_cores,
                max_images_per_prompt=v.max_images_per_prompt, enforce_eager=v.enforce_eager, seed=config.seed,
                log_dir=os.path.join(run_dir, "vllm_logs"),
                weight_transfer_backend="jaxrl_stream" if self.transport == "stream" else None,
                shm_weights=self.transport == "shm")
            log.warning("starting a vLLM server on %s (log in %s)", model_dir, server_config.log_dir)
            self.handles = [server_lib.start_server(server_config)]
            self.started = True
        self.make_client = lambda h: VLLMClient(h.url, h.served_model_name, max_concurrency=v.max_concurrent_requests,
                                                api_key=api_key)
        self.clients = [self.make_client(h) for h in self.handles]
        self.supervisor = ServerSupervisor(self.handles, on_failure=v.get("on_server_failure", "restart"),
                                           max_restarts=v.get("max_server_restarts", 3))

    async def aclose(self):
        for client in self.clients:
            await client.aclose()

    def stop(self):
        if self.started:
            for handle in self.handles:  # restarted ones included (the supervisor replaces them in place)
                self._server_lib.stop_server(handle)


class _LoopThread:
    """An asyncio loop in a background thread: rollouts and pushes run there while the main
    thread trains (async mode), or the main thread just waits on them (synchronous mode)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="rl-rollouts", daemon=True)
        self.thread.start()

    def submit(self, coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine):
        return self.submit(coroutine).result()

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


def _save_samples(groups, run_dir: str, step: int, count: int, tag: str = "step") -> None:
    for index, group in enumerate(groups[:count]):
        save_sample(group[0], os.path.join(run_dir, "samples", f"{tag}_{step:05d}", f"group_{index}"))


def run_rl(config) -> dict:
    """Train per `config` (config.trainer == "rl"); returns the JSON summary dict."""
    wall_start = time.time()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    rl = config.rl
    run_dir = setup.resolve_run_dir(config)
    setup.save_run_config(config, run_dir)
    model_dir, model_config, params, lora_rng, state_rng = setup.load_policy(config)
    params = jax.tree.map(jnp.asarray, params)
    lora, lora_overlay, lora_cfg = setup.lora_parts(config, params, lora_rng)
    optimizer, schedule = make_optimizer(config.optim, config.train.num_steps)
    state = create_train_state(params, optimizer, state_rng, lora=lora)
    store = CheckpointStore(setup.checkpoint_dir(config, run_dir), every_steps=config.checkpoint.every_steps,
                            keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    start_step = 0
    if config.checkpoint.resume and store.latest_step() is not None:
        state, _, start_step = store.restore(state)
        log.warning("resumed RL from %s at step %d", store.directory, start_step)

    dtype = _DTYPES[config.model.dtype]
    loss_config = policy_loss_config(config.loss)
    step_fn = make_rl_step(model_config, optimizer, schedule, loss_config, old_logprobs=config.loss.old_logprobs,
                           max_turns_logged=rl.drift_turns_logged, dtype=dtype, remat=config.model.remat,
                           layer_loop=config.model.layer_loop,
                           loss_chunk_size=config.train.loss_chunk_size, lora_overlay=lora_overlay,
                           donate=jax.default_backend() != "cpu")
    ref_score = make_score_logprobs(model_config, dtype=dtype, loss_chunk_size=config.train.loss_chunk_size) \
        if config.loss.kl_coef > 0 else None
    # a copy: the step donates the state (params included) on accelerators
    ref_params = jax.tree.map(jnp.copy, params) if ref_score is not None else None
    image_mean, image_std = _image_normalization(model_dir)
    decode, tokens = load_decoder(model_dir)
    train_env = make_env(rl.env, **dict(rl.env_kwargs))
    eval_env = make_env(rl.env, **{**dict(rl.env_kwargs), **dict(rl.eval_env_kwargs)})
    writer = MetricsWriter(run_dir, config=config.to_dict(), use_wandb=config.metrics.use_wandb,
                           wandb_project=config.metrics.wandb_project, run_name=config.name,
                           resume_from_step=start_step)
    if rl.max_staleness not in (0, 1):
        raise ValueError(f"rl.max_staleness={rl.max_staleness}: 0 (synchronous) or 1 (generate step k+1 while "
                         "training step k)")
    if rl.updates_per_step < 1:
        raise ValueError(f"rl.updates_per_step={rl.updates_per_step}: at least 1 optimizer update per RL step")
    loop = _LoopThread()
    servers = _Servers(config, model_dir, run_dir)
    run = loop.run
    pushed_version, pending = start_step, None

    def merged_params():
        if state.lora is None:
            return jax.device_get(state.params)
        from jaxrl_vl.models import lora as lora_lib
        return jax.device_get(lora_lib.merge(state.params, state.lora, lora_cfg))

    def push(version: int, indices: list[int] | None = None) -> float:
        clients = servers.clients if indices is None else [servers.clients[i] for i in indices]
        try:
            return run(weight_push.push_params(merged_params(), model_config, clients, version,
                                               transport=servers.transport)).total_seconds
        except weight_push.WeightPushError:
            restarted = servers.supervisor.restart_failed(f"the weight push of version {version}")
            if not restarted:
                raise
            return on_restart(restarted, version)

    def on_restart(indices: list[int], version: int) -> float:
        """Restarted servers serve the base checkpoint: give them new clients and the trainer's
        current weights under the current version (nothing else changes version)."""
        for i in indices:
            old, servers.clients[i] = servers.clients[i], servers.make_client(servers.handles[i])
            run(old.aclose())
        return push(version, indices)

    def supervised(submit, first=None, what="rollouts"):
        return run_supervised(servers.supervisor, submit, lambda indices: on_restart(indices, pushed_version),
                              first=first, what=what)

    def evaluate(tag: str) -> dict:
        groups = supervised(lambda: loop.submit(run_groups(
            servers.clients, env_copier(eval_env), eval_seeds(rl), agent_config(rl, evaluation=True), decode=decode,
            tokens=tokens, step=0)), what=f"evaluation ({tag})")
        _save_samples(groups, run_dir, state_step(), rl.save_samples, tag=tag)
        return rollout_metrics(groups, prefix=f"eval_{tag}/")

    def state_step() -> int:
        return int(jax.device_get(state.step))

    try:
        push(start_step)  # the server starts on the base checkpoint: serve the trainer's weights
        before_path = os.path.join(run_dir, "eval_before_rl.json")
        if os.path.exists(before_path):
            with open(before_path) as f:
                before = json.load(f)
        else:
            before = evaluate("before_rl") if rl.eval_episodes else {}
            setup.write_json(before_path, before)
            writer.write(start_step, before)
        bar = _progress(config, start_step)
        max_drift, last = 0.0, {}

        def rollouts(step: int):
            return loop.submit(run_groups(servers.clients, env_copier(train_env), train_seeds(rl, step),
                                          agent_config(rl), decode=decode, tokens=tokens, step=step))

        for step in range(start_step + 1, config.train.num_steps + 1):
            t0 = time.perf_counter()
            # A server that dies meanwhile is restarted on the current weights (or the run stops, per
            # vllm.on_server_failure) and the step's rollouts are generated again from scratch.
            groups = supervised(lambda: rollouts(step), first=pending, what=f"the rollouts of step {step}")
            t_rollout = time.perf_counter() - t0  # in async mode: the wait not hidden behind training
            # Async mode: step+1's episodes sample on these weights while we train, and pick up the
            # pushed ones mid-episode (vLLM drains in-flight requests on pause): staleness <= 1 step.
            pending = ((rollouts(step + 1), servers.supervisor.generation)
                       if rl.max_staleness and step < config.train.num_steps else None)
            metrics = rollout_metrics(groups)
            rewards = np.asarray([[t.reward for t in g] for g in groups], np.float32)
            advantages = np.asarray(compute_advantages(rl.advantage, rewards))
            keep = ~zero_variance_groups(rewards) if rl.filter_zero_variance_groups else np.ones(len(groups), bool)
            per_episode = [list(map(float, row)) for row in advantages]
            if rl.step_advantage_weight > 0:  # GiGPO turn-level credit (losses/step_advantages.py)
                per_episode, step_metrics = turn_level_advantages(groups, advantages, rl)
                metrics.update(step_metrics)
                # a group of equal rewards can still hold turn-level credit (e.g. all succeed, some sooner)
                keep = keep | np.asarray([any(np.any(a != 0) for a in g) for g in per_episode])
            per_episode = weight_negative(per_episode, rl.negative_advantage_weight)
            kept = [t for g, k in zip(groups, keep) for t in g if k]
            kept_adv = [a for a_row, k in zip(per_episode, keep) for a in a_row if k]
            metrics["rollout/groups_kept"] = float(keep.sum())
            metrics["rollout/stale_turns"] = float(np.mean(
                [v != str(pushed_version) for t in kept for versions in t.weight_versions for v in versions] or [0.0]))
            t1 = time.perf_counter()
            rows = training_rows(kept, kept_adv, image_mean=image_mean, image_std=image_std)
            t_train = t_push = 0.0
            if rows:
                # every mini-batch holds real rows (build_micro_batches deals them round-robin): a mini-batch
                # of fillers only would still move the weights by Adam's momentum
                updates = min(rl.updates_per_step, -(-len(rows) // config.train.grad_accum_steps))
                micro_batches = config.train.grad_accum_steps * updates
                if updates > 1:  # mini-batches mix the groups (same order on a resumed step)
                    rows = [rows[i] for i in np.random.default_rng([config.seed, step]).permutation(len(rows))]
                batch = build_micro_batches(rows, model_config, num_micro_batches=micro_batches,
                                            length_multiple=rl.length_multiple, patch_multiple=rl.patch_multiple,
                                            rows_multiple=max(1, rl.num_groups * rl.samples_per_group
                                                              // micro_batches),
                                            target_positions_multiple=loss_target_positions_multiple(config.train))
                if ref_score is not None:
                    batch["ref_logprobs"] = np.stack([np.asarray(ref_score(ref_params, None, {k: v[a] for k, v in
                                                                                             batch.items()}))
                                                      for a in range(batch["input_ids"].shape[0])])
                t_batch = time.perf_counter() - t1
                t1 = time.perf_counter()
                state, train_metrics = _train_mini_batches(step_fn, state, batch, updates)
                t_train = time.perf_counter() - t1
                metrics.update(train_metrics)
                max_drift = max(max_drift, train_metrics["train/drift_mean"])
                t_push, pushed_version = push(step), step
                metrics["time/batch"] = t_batch
            metrics.update({"time/rollout": t_rollout, "time/train": t_train, "time/push": t_push,
                            "time/step": time.perf_counter() - t0,
                            "rollout/server_restarts": float(servers.supervisor.restarts)})
            if rl.save_samples and (step % rl.save_samples_every_steps == 0 or step == 1):
                _save_samples(groups, run_dir, step, rl.save_samples)
            if store.save(step, state, {"rl_step": step}):
                metrics["checkpoint/saved_step"] = step
            writer.write(step, metrics)
            last = metrics
            if bar is not None:
                bar.set_postfix(reward=f"{metrics['rollout/reward_mean']:.3f}",
                                drift=f"{metrics.get('train/drift_mean', 0.0):.1e}")
                bar.update(1)
        if bar is not None:
            bar.close()
        final_step = max(start_step, config.train.num_steps)
        if store.latest_step() != final_step:
            store.save(final_step, state, {"rl_step": final_step}, force=True)
        after = evaluate("after_rl") if rl.eval_episodes else {}
        writer.write(final_step, after)
    finally:
        if pending is not None:
            pending[0].cancel()
        run(servers.aclose())
        servers.stop()
        loop.close()
        store.close()
        writer.close()
    return _finish(config, run_dir, model_dir, model_config, state, lora_cfg, final_step, start_step, before, after,
                   last, max_drift, wall_start)


def _progress(config, start_step: int):
    if not config.metrics.progress_bar:
        return None
    from tqdm import tqdm
    return tqdm(total=config.train.num_steps, initial=start_step, file=sys.stderr, dynamic_ncols=True, desc="rl",
                mininterval=0.5)


def _finish(config, run_dir, model_dir, model_config, state, lora_cfg, final_step, start_step, before, after, last,
            max_drift, wall_start) -> dict:
    export_dir, plots = None, []
    if config.export.at_end:
        from jaxrl_vl.train.export import export_state
        export_dir = export_state(state, model_config, os.path.join(run_dir, "export"), copy_from=model_dir,
                                  lora_cfg=lora_cfg)
    if config.metrics.plot_at_end:
        from jaxrl_vl.train.plots import plot_run
        plots = plot_run(run_dir)
    summary = {
        "run_dir": run_dir, "rl_steps": int(final_step), "resumed_from_step": int(start_step),
        "wall_seconds": round(time.time() - wall_start, 2),
        "success_before_rl": before.get("eval_before_rl/success_rate"),
        "success_after_rl": after.get("eval_after_rl/success_rate"),
        "eval_episodes": int(config.rl.eval_episodes) * int(config.rl.get("eval_samples_per_seed", 1)),
        "eval_seeds": int(config.rl.eval_episodes), "eval_temperature": float(config.rl.eval_temperature),
        "max_drift": max_drift if final_step > start_step else None,
        "last_reward_mean": last.get("rollout/reward_mean"),
        "export_dir": export_dir, "plots": plots, "checkpoint_dir": setup.checkpoint_dir(config, run_dir),
        "samples_dir": os.path.join(run_dir, "samples"),
    }
    setup.write_json(os.path.join(run_dir, "summary.json"), summary)
    return summary
