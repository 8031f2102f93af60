"""The training core that SFT, RL and the Tinker backend share.

    trainer = Trainer(config, total_steps=config.train.num_steps, desc="sft")
    start_step, data_state = trainer.restore()          # the run dir's latest checkpoint, if any
    trainer.add_hook(evaluate, every=config.eval.every_steps)
    for step in ...:
        batch = trainer.place(local_batch)               # this process's rows -> global arrays on the mesh
        trainer.state, metrics = step_fn(trainer.state, batch)
        trainer.end_step(step, metrics, ...)             # throughput, checkpoint, hooks, metrics line, bar
    summary = trainer.finish(summary)                    # last checkpoint, export, plots, summary.json

One config gives: the run directory, the model (loaded, cast to `model.param_dtype`, sharded over the
("data", "fsdp", "tensor") mesh), LoRA, the optimizer, the sharded TrainState, the Forward/ParamsView the step
builders take (compute dtype, attention, loss chunking, cast once, FSDP gather), checkpoints, one metrics writer
and progress bar (process 0 only), and periodic actions as hooks (in the spirit of levanter's
`Trainer.add_hook(fn, every=N)`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from typing import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxrl_vl import models, sharding
from jaxrl_vl.train import distributed, flops, setup
from jaxrl_vl.train.checkpoints import CheckpointStore
from jaxrl_vl.train.config_overrides import ConfigError
from jaxrl_vl.train.metrics import MetricsWriter
from jaxrl_vl.train.optim import make_optimizer
from jaxrl_vl.train.precision import Precision, cast_floats
from jaxrl_vl.train.state import create_train_state, state_shardings
from jaxrl_vl.train.step import Forward, ParamsView, check_attention

log = logging.getLogger("jaxrl_vl.train")
FSDP_GATHERS = ("use", "step")


@dataclasses.dataclass
class Hook:
    """fn(step) -> metrics to log with that step (or None), run every `every` steps (0: never periodically);
    `at_end` also runs it after the last step (e.g. the final eval), where the loop calls `final_hooks`."""
    fn: Callable[[int], dict | None]
    every: int
    name: str
    at_end: bool = False


class _NoWriter:
    """The metrics writer of processes other than 0."""

    def write(self, step, metrics):
        return metrics

    def close(self):
        pass


def forward_of(config, model_config) -> Forward:
    precision = Precision.from_config(config)
    return Forward(model_config, dtype=precision.compute, remat=config.model.remat,
                   layer_loop=config.model.layer_loop, attention=config.model.attention,
                   loss_chunk_size=config.train.loss_chunk_size)


def target_positions_multiple(train_config) -> int:
    """train.target_positions_multiple where it applies: target positions need the chunked loss
    (train.loss_chunk_size > 0); 0 otherwise."""
    return train_config.target_positions_multiple if train_config.loss_chunk_size > 0 else 0


class Trainer:
    def __init__(self, config, *, total_steps: int, desc: str):
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
        distributed.initialize(config.get("distributed", "auto"))
        self.config, self.desc, self.total_steps = config, desc, total_steps
        self.wall_start = time.time()
        self.run_dir = setup.resolve_run_dir(config)
        if distributed.is_main():
            setup.save_run_config(config, self.run_dir)
        self.precision = Precision.from_config(config)
        if config.mesh.fsdp_gather not in FSDP_GATHERS:
            raise ConfigError(f"mesh.fsdp_gather={config.mesh.fsdp_gather!r}; choose one of {FSDP_GATHERS}")
        self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        self._load_model()
        self.forward = forward_of(config, self.model_config)
        try:
            check_attention(self.forward.attention, backend=jax.default_backend(), compute_dtype=self.forward.dtype,
                            packing=bool(config.data.get("packing", False)))
        except ValueError as error:
            raise ConfigError(str(error)) from None
        gather = config.mesh.fsdp_gather == "step" and self.mesh.shape["fsdp"] > 1
        self.view = ParamsView(self.precision.compute, cast_once=self.precision.cast_once,
                               lora_overlay=self.lora_overlay, gather_mesh=self.mesh if gather else None)
        self.store = CheckpointStore(setup.checkpoint_dir(config, self.run_dir),
                                     every_steps=config.checkpoint.every_steps, keep=config.checkpoint.keep,
                                     async_save=config.checkpoint.async_save)
        self.hooks: list[Hook] = []
        self.hooked: dict = {}  # the latest value of every metric a hook returned (e.g. for the bar)
        self.writer, self.bar, self.start_step = None, None, 0
        self.data_state_fn: Callable[[], object] = lambda: None  # the data iterator's position, saved with each checkpoint
        self.peak_flops = flops.peak_flops_per_device(jax.devices()[0].device_kind,
                                                      config.train.peak_flops_per_device)

    def _load_model(self) -> None:
        config = self.config
        self.model_dir, self.model_config, params, lora_rng, state_rng = setup.load_policy(config)
        params = cast_floats(jax.tree.map(np.asarray, params), self.precision.params)
        params = sharding.shard_params(params, self.mesh)
        lora, self.lora_overlay, self.lora_cfg = setup.lora_parts(config, params, lora_rng)
        if lora is not None:
            lora = sharding.shard_params(lora, self.mesh)
        self.optimizer, self.schedule = make_optimizer(config.optim, self.total_steps, self.precision.moments)
        self.state = create_train_state(params, self.optimizer, state_rng, lora=lora, mesh=self.mesh)

    # ---- steps -----------------------------------------------------------------------------------------
    def step_kwargs(self) -> dict:
        """What make_update_step takes from the trainer: the mesh, donation (not on CPU: an async checkpoint's
        host copy could alias a reused buffer) and output shardings fixed to the state's own."""
        return dict(mesh=self.mesh, donate=jax.default_backend() != "cpu", state_shardings=state_shardings(self.state),
                    metrics_sharding=sharding.replicated(self.mesh))

    @property
    def local_shards(self) -> int:
        """This process's batch shards: its share of the mesh's data x fsdp devices (the rows of a local
        micro-batch divide into them, each shard with its own vision inputs; models/inputs.py)."""
        split = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if split % jax.process_count():
            raise ConfigError(f"mesh data*fsdp={split} does not split over {jax.process_count()} processes")
        return split // jax.process_count()

    def place(self, local_batch: dict) -> dict:
        """This process's stacked micro-batches [A, ...] -> global arrays on the mesh: each micro-batch placed like
        a model batch (rows over ("data", "fsdp"); sharding.batch_shardings), process p's rows at its devices."""
        if jax.process_count() == 1:
            return jax.device_put(local_batch, sharding.stacked_batch_shardings(local_batch, self.mesh))
        # local shapes: the spec only depends on which dim is the batch dim
        rows, length = np.shape(local_batch["input_ids"])[1:]
        specs = {k: NamedSharding(self.mesh, PartitionSpec(None, *sharding.batch_partition_spec(
            k, np.shape(v)[1:], rows, length))) for k, v in local_batch.items()}
        return distributed.global_batch(local_batch, specs)

    def restore(self, data_state_default=None):
        """-> (start step, data state) from the run dir's latest checkpoint (state restored in place)."""
        store, config = self.store, self.config
        if not config.checkpoint.resume and store.latest_step() is not None:
            raise ConfigError(f"checkpoint.resume=false but {store.directory} already holds checkpoints (latest step "
                              f"{store.latest_step()}); use a new --config.run_dir or delete that folder")
        data_state = data_state_default
        if config.checkpoint.resume and store.latest_step() is not None:
            self.state, data_state, self.start_step = store.restore(self.state)
            log.warning("resumed from %s at step %d", store.directory, self.start_step)
        self._open_outputs()
        return self.start_step, data_state

    def _open_outputs(self) -> None:
        config = self.config
        if distributed.is_main():
            self.writer = MetricsWriter(self.run_dir, config=config.to_dict(), use_wandb=config.metrics.use_wandb,
                                        wandb_project=config.metrics.wandb_project, run_name=config.name,
                                        resume_from_step=self.start_step)
        else:
            self.writer = _NoWriter()
        if config.metrics.progress_bar and distributed.is_main():
            from tqdm import tqdm
            self.bar = tqdm(total=self.total_steps, initial=self.start_step, file=sys.stderr, dynamic_ncols=True,
                            desc=self.desc, mininterval=0.5)

    # ---- per step ----------------------------------------------------------------------------------------
    def add_hook(self, fn: Callable[[int], dict | None], *, every: int, name: str, at_end: bool = False) -> None:
        self.hooks.append(Hook(fn, every, name, at_end))

    def needs_state(self, step: int) -> bool:
        """Whether step `step` must be finished before the next one starts: a checkpoint or a hook is due (they
        read the state of that step), or it is the last."""
        hooks_due = any(h.every > 0 and step % h.every == 0 for h in self.hooks)
        return step % self.store.every_steps == 0 or hooks_due or step >= self.total_steps

    def run_hooks(self, step: int, *, final: bool = False) -> dict:
        out: dict = {}
        for hook in self.hooks:
            due = hook.at_end if final else (hook.every > 0 and step % hook.every == 0 and step < self.total_steps)
            if due:
                out.update(hook.fn(step) or {})
        self.hooked.update(out)
        return out

    def throughput(self, *, seconds: float, tokens: float, seq_len: int, num_patches: int, num_images: int,
                   logit_tokens: float | None = None, passes: float = 1.0, forward_passes: float = 0.0) -> dict:
        """tokens/s and MFU of `passes` training passes plus `forward_passes` forward-only passes over a batch of
        `tokens` non-padding tokens (all processes together)."""
        backward = 1.0 if self.state.lora is not None else 2.0
        one = flops.train_flops(self.model_config, num_tokens=int(tokens), seq_len=seq_len, num_patches=num_patches,
                                num_images=num_images, backward_factor=backward,
                                logit_tokens=None if logit_tokens is None else int(logit_tokens))
        total = one * passes + forward_passes * one / (1.0 + backward)
        out = {"tokens_per_second": tokens * passes / max(seconds, 1e-9),
               "mfu": flops.mfu(total, seconds, jax.device_count(), self.peak_flops)}
        peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices())
        if peak:  # accelerators report it; CPU does not
            out["peak_memory_gib"] = peak / 2**30
        return out

    def end_step(self, step: int, metrics: dict, *, log_now: bool = True, bar_postfix: dict | None = None) -> dict:
        """Checkpoint (on its interval), due hooks, the metrics line (process 0), the bar."""
        record = dict(metrics)
        if self.store.save(step, self.state, self.data_state_fn()):
            record["checkpoint/saved_step"] = step
        hooked = self.run_hooks(step)
        record.update(hooked)
        if log_now or hooked:
            self.writer.write(step, record)
        if self.bar is not None:
            self.bar.set_postfix(**(bar_postfix or {}))
            self.bar.update(1)
        return record

    # ---- end -------------------------------------------------------------------------------------------------
    def save_final(self, step: int) -> None:
        if self.store.latest_step() != step:
            self.store.save(step, self.state, self.data_state_fn(), force=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.store.close()
        if self.writer is not None:
            self.writer.close()

    def export_and_plot(self) -> tuple[str | None, list[str]]:
        """HF export of the final state (all processes gather, process 0 writes) and the metric plots."""
        from jaxrl_vl.train.export import export_state
        export_dir = None
        if self.config.export.at_end:
            export_dir = export_state(self.state, self.model_config, os.path.join(self.run_dir, "export"),
                                      copy_from=self.model_dir, lora_cfg=self.lora_cfg)
        plots = []
        if self.config.metrics.plot_at_end and distributed.is_main():
            from jaxrl_vl.train.plots import plot_run
            plots = plot_run(self.run_dir)
        return export_dir, plots

    def write_summary(self, summary: dict) -> dict:
        summary = dict(summary, run_dir=self.run_dir, resumed_from_step=int(self.start_step),
                       wall_seconds=round(time.time() - self.wall_start, 2),
                       checkpoint_dir=setup.checkpoint_dir(self.config, self.run_dir))
        if distributed.is_main():
            setup.write_json(os.path.join(self.run_dir, "summary.json"), summary)
        return summary

    def num_params(self) -> int:
        return models.num_params(self.state.params)
