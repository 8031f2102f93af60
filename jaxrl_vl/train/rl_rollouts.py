"""The RL loop's side of vLLM: the servers, the rollouts of a step, held-out evaluation, the weight push.

    rollouts = Rollouts(config, trainer)     # starts (or attaches to) the servers; asyncio in a thread
    groups = rollouts.collect(step)          # this process's groups of episodes for `step`
    seconds = rollouts.push(trainer.state, version)
    metrics = rollouts.evaluate("before_rl")

With several processes each one plays its own share of the step's groups (group g on process g % P), against
its own servers; weights go to every server. A server that dies is restarted on the current weights (or the
run stops, per vllm.on_server_failure) and the step's rollouts are generated again from scratch.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import glob
import json
import logging
import os
import pickle
import threading

import jax

from jaxrl_vl.envs import make_env
from jaxrl_vl.rollout import weight_push
from jaxrl_vl.rollout.agent_loop import AgentConfig, env_copier, load_decoder, run_groups
from jaxrl_vl.rollout.client import VLLMClient
from jaxrl_vl.rollout.supervisor import ServerSupervisor, run_supervised
from jaxrl_vl.rollout.trajectory import rollout_metrics, save_sample
from jaxrl_vl.train import distributed
from jaxrl_vl.train.config_overrides import ConfigError
from jaxrl_vl.train.distributed import host_local

log = logging.getLogger("jaxrl_vl.rl")


def agent_config(rl, *, evaluation: bool = False) -> AgentConfig:
    return AgentConfig(samples_per_group=rl.get("eval_samples_per_seed", 1) if evaluation else rl.samples_per_group,
                       max_concurrent_episodes=rl.max_concurrent_episodes, max_turns=rl.max_turns or None,
                       max_tokens_per_turn=rl.max_tokens_per_turn, max_sequence_tokens=rl.max_sequence_tokens,
                       max_generated_tokens=rl.max_generated_tokens or None,
                       temperature=rl.eval_temperature if evaluation else rl.temperature,
                       top_p=1.0 if evaluation else rl.top_p, seed=rl.sampling_seed)


def train_seeds(rl, step: int) -> list[int]:
    """Env seeds of RL step `step` (1-based): disjoint across steps, the same on resume."""
    return [rl.train_seed_offset + (step - 1) * rl.num_groups + g for g in range(rl.num_groups)]


def eval_seeds(rl) -> list[int]:
    return [rl.eval_seed_offset + i for i in range(rl.eval_episodes)]


def local_share(items: list) -> list:
    """This process's items: every process_count-th from process_index (one process: all of them)."""
    return items[jax.process_index()::jax.process_count()]


def image_normalization(model_dir: str) -> tuple[list[float], list[float]]:
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = os.path.join(model_dir, name)
        if os.path.exists(path):
            with open(path) as f:
                processor = json.load(f)
            processor = processor.get("image_processor", processor)
            if "image_mean" in processor:
                return list(processor["image_mean"]), list(processor["image_std"])
    raise FileNotFoundError(f"{model_dir} has no preprocessor_config.json with image_mean/image_std")


class Servers:
    """The vLLM servers rollouts use: attached by URL, or started here (stopped by stop())."""

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
            self.handles = [server_lib.attach_server(u, v.served_model_name or None, api_key=api_key)
                            for u in local_share(urls)]
        else:
            self.handles = [server_lib.start_server(self._server_config(config, model_dir, run_dir))]
            self.started = True
        self.make_client = lambda h: VLLMClient(h.url, h.served_model_name, max_concurrency=v.max_concurrent_requests,
                                                api_key=api_key)
        self.clients = [self.make_client(h) for h in self.handles]
        self.supervisor = ServerSupervisor(self.handles, on_failure=v.get("on_server_failure", "restart"),
                                           max_restarts=v.get("max_server_restarts", 3))

    def _server_config(self, config, model_dir: str, run_dir: str):
        v = config.vllm
        server_config = self._server_lib.ServerConfig(
            model=model_dir, served_model_name=v.served_model_name or "policy", device=v.device,
            max_model_len=v.max_model_len, max_num_seqs=v.max_num_seqs,
            max_num_batched_tokens=max(v.max_model_len, 2048), cpu_kv_cache_gib=v.cpu_kv_cache_gib,
            cpu_cores=v.cpu_cores, max_images_per_prompt=v.max_images_per_prompt, enforce_eager=v.enforce_eager,
            seed=config.seed, log_dir=os.path.join(run_dir, "vllm_logs", f"process_{jax.process_index()}"),
            weight_transfer_backend="jaxrl_stream" if self.transport == "stream" else None,
            shm_weights=self.transport == "shm")
        log.warning("starting a vLLM server on %s (log in %s)", model_dir, server_config.log_dir)
        return server_config

    async def aclose(self):
        for client in self.clients:
            await client.aclose()

    def stop(self):
        if self.started:
            for handle in self.handles:  # restarted ones included (the supervisor replaces them in place)
                self._server_lib.stop_server(handle)


class LoopThread:
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


class Rollouts:
    """Servers + envs + the agent loop for one RL run (see module doc)."""

    def __init__(self, config, trainer):
        rl = config.rl
        self.config, self.rl, self.trainer = config, rl, trainer
        self.image_mean, self.image_std = image_normalization(trainer.model_dir)
        self.decode, self.tokens = load_decoder(trainer.model_dir)
        self.train_env = make_env(rl.env, **dict(rl.env_kwargs))
        self.eval_env = make_env(rl.env, **{**dict(rl.env_kwargs), **dict(rl.eval_env_kwargs)})
        self.loop = LoopThread()
        self.pushed_version, self.pending = trainer.start_step, None
        self.replay = replay_folder(rl)
        self.servers = None if self.replay else Servers(config, trainer.model_dir, trainer.run_dir)

    # ---- weights ---------------------------------------------------------------------------------------
    def _merged_params(self, state):
        if state.lora is None:
            return host_local(state.params)
        from jaxrl_vl.models import lora as lora_lib
        return host_local(lora_lib.merge(state.params, state.lora, self.trainer.lora_cfg))

    def push(self, state, version: int, indices: list[int] | None = None) -> float:
        """The state's weights into this process's servers as `version`; -> seconds (0 when replaying)."""
        if self.servers is None:
            self.pushed_version = version
            return 0.0
        clients = self.servers.clients if indices is None else [self.servers.clients[i] for i in indices]
        params = self._merged_params(state)
        try:
            seconds = self.loop.run(weight_push.push_params(params, self.trainer.model_config, clients, version,
                                                            transport=self.servers.transport)).total_seconds
        except weight_push.WeightPushError:
            restarted = self.servers.supervisor.restart_failed(f"the weight push of version {version}")
            if not restarted:
                raise
            return self._on_restart(restarted, version)
        self.pushed_version = version
        return seconds

    @property
    def restarts(self) -> int:
        return 0 if self.servers is None else self.servers.supervisor.restarts

    def _on_restart(self, indices: list[int], version: int) -> float:
        """Restarted servers serve the base checkpoint: give them new clients and the trainer's current weights
        under the current version (nothing else changes version)."""
        for i in indices:
            old, self.servers.clients[i] = self.servers.clients[i], self.servers.make_client(self.servers.handles[i])
            self.loop.run(old.aclose())
        return self.push(self.trainer.state, version, indices)

    def _supervised(self, submit, first=None, what="rollouts"):
        return run_supervised(self.servers.supervisor, submit,
                              lambda indices: self._on_restart(indices, self.pushed_version), first=first, what=what)

    # ---- episodes ----------------------------------------------------------------------------------------
    def _submit(self, env, seeds: list[int], agent: AgentConfig, step: int):
        return self.loop.submit(run_groups(self.servers.clients, env_copier(env), seeds, agent, decode=self.decode,
                                           tokens=self.tokens, step=step))

    def collect(self, step: int) -> list[list]:
        """This process's groups of step `step`. Async mode (rl.max_staleness=1): step+1's episodes start now on
        these weights and pick up the pushed ones mid-episode (vLLM drains in-flight requests on pause).
        rl.replay_rollouts_from: the groups recorded for that step instead (no server); rl.record_rollouts
        writes them (RUN_DIR/rollouts)."""
        if self.replay:
            return local_share(replay_step(self.replay, step))
        groups = self._sample(step)
        if self.rl.get("record_rollouts", False):
            record_step(os.path.join(self.trainer.run_dir, "rollouts"), step, groups)
        return groups

    def _sample(self, step: int) -> list[list]:
        submit = lambda: self._submit(self.train_env, local_share(train_seeds(self.rl, step)),  # noqa: E731
                                      agent_config(self.rl), step)
        groups = self._supervised(submit, first=self.pending, what=f"the rollouts of step {step}")
        self.pending = None
        if self.rl.max_staleness and step < self.config.train.num_steps:
            self.pending = (self._submit(self.train_env, local_share(train_seeds(self.rl, step + 1)),
                                         agent_config(self.rl), step + 1), self.servers.supervisor.generation)
        return groups

    def evaluate(self, tag: str, step: int) -> dict:
        """Held-out episodes (fixed seeds, rl.eval_* sampling) -> eval_<tag>/ metrics of this process's share."""
        submit = lambda: self._submit(self.eval_env, local_share(eval_seeds(self.rl)),  # noqa: E731
                                      agent_config(self.rl, evaluation=True), 0)
        groups = self._supervised(submit, what=f"evaluation ({tag})")
        self.save_samples(groups, step, tag=tag)
        return all_processes_metrics(groups, prefix=f"eval_{tag}/")

    def save_samples(self, groups, step: int, tag: str = "step") -> None:
        if not distributed.is_main():
            return
        for index, group in enumerate(groups[:self.rl.save_samples]):
            save_sample(group[0], os.path.join(self.trainer.run_dir, "samples", f"{tag}_{step:05d}", f"group_{index}"))

    def close(self) -> None:
        if self.pending is not None:
            self.pending[0].cancel()
        if self.servers is not None:
            self.loop.run(self.servers.aclose())
            self.servers.stop()
        self.loop.close()


def all_processes_metrics(groups: list[list], prefix: str = "rollout/") -> dict:
    """rollout_metrics over every process's groups: episode-weighted means; sums, counts and maxima combined as
    such (one process: rollout_metrics itself)."""
    local = rollout_metrics(groups, prefix=prefix)
    if jax.process_count() == 1:
        return local
    every = [m for m in distributed.gather_json(local, f"metrics_{prefix}") if m]
    episodes = [m[prefix + "episodes"] for m in every]
    combined = {}
    for key in set().union(*every):
        values = [m.get(key) for m in every]
        if key.endswith("_max"):
            combined[key] = max(v for v in values if v is not None)
        elif key.endswith(("_total", "_sum", "episodes")):
            combined[key] = sum(v for v in values if v is not None)
        else:
            pairs = [(v, n) for v, n in zip(values, episodes) if v is not None]
            combined[key] = sum(v * n for v, n in pairs) / max(sum(n for _, n in pairs), 1.0)
    return combined


def replay_folder(rl) -> str:
    """rl.replay_rollouts_from, checked: recorded groups replace sampling (no vLLM server, no weight push, so no
    held-out episodes either)."""
    folder = rl.get("replay_rollouts_from", "")
    if not folder:
        return ""
    if not os.path.isdir(folder):
        raise ConfigError(f"rl.replay_rollouts_from={folder!r} is not a folder of recorded rollouts "
                          "(RUN_DIR/rollouts of a run with rl.record_rollouts=True)")
    if rl.eval_episodes or rl.get("eval_every_steps", 0):
        raise ConfigError("rl.replay_rollouts_from replays recorded rollouts without a vLLM server, so it cannot "
                          "play held-out episodes: set rl.eval_episodes=0 and rl.eval_every_steps=0")
    return folder


def record_step(folder: str, step: int, groups: list[list]) -> None:
    """This process's groups of one step -> folder/step_<step>.p<process>.pkl (written whole, then renamed)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step_{step:05d}.p{jax.process_index()}.pkl")
    with open(path + ".tmp", "wb") as f:
        pickle.dump(groups, f)
    os.replace(path + ".tmp", path)


def replay_step(folder: str, step: int) -> list[list]:
    """Every process's recorded groups of one step, in group order (so any process count replays the same)."""
    paths = sorted(glob.glob(os.path.join(folder, f"step_{step:05d}.p*.pkl")))
    if not paths:
        raise FileNotFoundError(f"{folder} has no recorded rollouts for RL step {step} (step_{step:05d}.p*.pkl); "
                                "record at least train.num_steps steps")
    groups = []
    for path in paths:
        with open(path, "rb") as f:
            groups += pickle.load(f)
    return sorted(groups, key=lambda g: g[0].env_seed)  # the step's seeds are distinct, in group order
