"""The SFT loop: config -> data pipeline -> jitted steps -> metrics, checkpoints, evals, export.

    summary = run_sft(config)     # configs/base.py documents every field

Resume: when RUN_DIR/checkpoints holds a finished checkpoint (and checkpoint.resume), the state
(params, optimizer, step, rng) and the data iterator's position are restored, so the rerun takes
exactly the steps the killed run would have taken; on CPU its final params are bitwise equal
to an uninterrupted run's (tests/test_train_resume.py).
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jaxrl_vl import models, sharding
from jaxrl_vl.data.pipeline import PipelineSpec, make_dataset, render_records
from jaxrl_vl.data.render import HFRenderer
from jaxrl_vl.data.validation import DataReport
from jaxrl_vl.train import flops, setup
from jaxrl_vl.train.vllm_eval import ServerStartError
from jaxrl_vl.train.config_overrides import ConfigError
from jaxrl_vl.train.batches import make_stacked_collate, split_host_stats
from jaxrl_vl.train.checkpoints import CheckpointStore
from jaxrl_vl.train.evaluation import JaxGreedyGenerator, generation_accuracy, prompt_from_example
from jaxrl_vl.train.metrics import MetricsWriter
from jaxrl_vl.train.optim import make_optimizer
from jaxrl_vl.train.sft_step import FSDP_GATHERS, loss_target_positions_multiple, make_eval_nll, make_sft_step
from jaxrl_vl.train.state import TrainState, create_train_state, state_shardings

log = logging.getLogger("jaxrl_vl.sft")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _stacked_shardings(batch: dict, mesh) -> dict:
    """Shardings of a [A, ...] stacked batch: each micro-batch placed like a model batch."""
    first = {k: v[0] for k, v in batch.items()}
    inner = sharding.batch_shardings(first, mesh)
    return {k: NamedSharding(mesh, PartitionSpec(None, *inner[k].spec)) for k in batch}


class _Data:
    """Rendered train/eval examples and the renderer (rendering happens once per run)."""

    def __init__(self, config, model_dir: str, model_config):
        self.renderer = HFRenderer.from_pretrained(model_dir)
        data = config.data
        self.report = DataReport()
        train_records = setup.load_records(data, data.train_split, self.report)
        self.train = render_records(train_records, self.renderer, max_length=data.max_length,
                                    on_bad_record=data.bad_examples, report=self.report)
        wanted = max(config.eval.nll_num_examples, config.eval.num_generation_examples)
        self.eval_records, self.eval = [], []
        if wanted > 0:
            eval_records = setup.fixed_subset(setup.load_records(data, data.eval_split), wanted)
            by_id = {r["id"]: r for r in eval_records}
            self.eval = render_records(eval_records, self.renderer, max_length=data.max_length,
                                       on_bad_record=data.bad_examples)
            self.eval_records = [by_id[e.id] for e in self.eval]
        self.collate_kwargs = dict(max_length=data.max_length, loss_on=data.loss_on,
                                   image_mean=self.renderer.image_mean, image_std=self.renderer.image_std,
                                   pad_id=self.renderer.pad_token_id)


def _evaluate(config, step: int, state: TrainState, *, data: _Data, model_config, eval_nll, generator,
              lora_cfg) -> dict:
    """-> {"eval/<split>_nll": ..., "eval/<split>_accuracy": ...} on the fixed held-out subset."""
    split, results = config.data.eval_split, {}
    micro = config.train.batch_size // config.train.grad_accum_steps
    nll_examples = data.eval[:config.eval.nll_num_examples]
    if nll_examples:
        collate = make_stacked_collate(model_config, grad_accum_steps=1, packing=False, **data.collate_kwargs)
        total_nll, total_targets = 0.0, 0.0
        for start in range(0, len(nll_examples), micro):
            chunk = nll_examples[start:start + micro]
            batch, _ = split_host_stats(collate([[e] for e in chunk]))
            nll, count = eval_nll(state.params, state.lora, {k: v[0] for k, v in batch.items()})
            total_nll, total_targets = total_nll + float(nll), total_targets + float(count)
        results[f"eval/{split}_nll"] = total_nll / max(total_targets, 1.0)
    count = config.eval.num_generation_examples
    if count > 0 and data.eval:
        prompts = [prompt_from_example(e, r) for e, r in zip(data.eval[:count], data.eval_records[:count])]
        params = state.params
        if lora_cfg is not None:  # plain weights for vLLM (and the same numbers for the JAX decode)
            from jaxrl_vl.models.lora import merge
            params = merge(state.params, state.lora, lora_cfg)
        accuracy, samples = generation_accuracy(
            lambda ps: generator.generate(params, ps, config.eval.max_new_tokens, version=step), prompts)
        results[f"eval/{split}_accuracy"] = accuracy
        results["eval/generation_backend"] = generator.name
        results["eval/sample"] = f"{samples[0]['generated']!r} (reference {samples[0]['reference']!r})"
    return results


def _make_generator(config, model_dir, model_config, data, dtype, run_dir):
    """The eval's greedy generation backend (see evaluation.py): vLLM when configured or installed
    ("auto"), else the JAX decode."""
    backend = config.eval.generation_backend
    if backend not in ("auto", "vllm", "jax"):
        raise ConfigError(f"eval.generation_backend={backend!r}; choose 'auto', 'vllm' or 'jax'")
    if config.eval.num_generation_examples <= 0:
        backend = "jax"  # nothing to generate: do not start a server
    if backend == "auto":
        from jaxrl_vl.train.vllm_eval import vllm_available
        backend = "vllm" if (config.eval.vllm_url or vllm_available()) else "jax"
    jax_generator = JaxGreedyGenerator(model_config, data.renderer.tokenizer, image_mean=data.renderer.image_mean,
                                       image_std=data.renderer.image_std, stop_token_ids=(data.renderer.end_id,),
                                       pad_id=data.renderer.pad_token_id, dtype=dtype)
    if backend == "jax":
        return jax_generator
    from jaxrl_vl.train.vllm_eval import VLLMGenerator
    vllm_generator = VLLMGenerator(model_dir, model_config, data.renderer.tokenizer, url=config.eval.vllm_url,
                                   log_dir=os.path.join(run_dir, "vllm_logs"))
    if config.eval.generation_backend == "vllm":
        return vllm_generator
    return _FallbackGenerator(vllm_generator, jax_generator)


class _FallbackGenerator:
    """"auto" mode: vLLM, but if its server cannot start, say so once and use the JAX decode."""

    def __init__(self, primary, fallback):
        self.primary, self.fallback = primary, fallback
        self.name = primary.name

    def generate(self, params, prompts, max_new_tokens, version=0):
        if self.primary is not None:
            try:
                return self.primary.generate(params, prompts, max_new_tokens, version=version)
            except ServerStartError as err:
                log.warning("eval: vLLM unavailable (%s); falling back to the JAX greedy decode", err)
                self.primary.close()
                self.primary, self.name = None, self.fallback.name
        return self.fallback.generate(params, prompts, max_new_tokens, version=version)

    def close(self):
        if self.primary is not None:
            self.primary.close()


def _progress(config, start_step: int):
    if not config.metrics.progress_bar:
        return None
    from tqdm import tqdm
    return tqdm(total=config.train.num_steps, initial=start_step, file=sys.stderr, dynamic_ncols=True,
                desc="sft", mininterval=0.5)


def run_sft(config) -> dict:
    """Train per `config`; returns the JSON summary (run_dir, steps, wall_seconds, final eval...)."""
    wall_start = time.time()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    train_cfg = config.train
    if config.model.dtype not in _DTYPES:
        raise ConfigError(f"model.dtype={config.model.dtype!r}; choose one of {sorted(_DTYPES)}")
    if config.mesh.fsdp_gather not in FSDP_GATHERS:
        raise ConfigError(f"mesh.fsdp_gather={config.mesh.fsdp_gather!r}; choose one of {FSDP_GATHERS}")
    if train_cfg.batch_size % train_cfg.grad_accum_steps:
        raise ConfigError(f"train.batch_size={train_cfg.batch_size} must be a multiple of "
                         f"train.grad_accum_steps={train_cfg.grad_accum_steps}")
    run_dir = setup.resolve_run_dir(config)
    setup.save_run_config(config, run_dir)
    model_dir, model_config, params, lora_rng, state_rng = setup.load_policy(config)
    data = _Data(config, model_dir, model_config)

    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    params = sharding.shard_params(jax.tree.map(jnp.asarray, params), mesh)
    lora, lora_overlay, lora_cfg = setup.lora_parts(config, params, lora_rng)
    optimizer, schedule = make_optimizer(config.optim, train_cfg.num_steps)
    state = create_train_state(params, optimizer, state_rng, lora=lora, mesh=mesh)

    spec = PipelineSpec(batch_size=train_cfg.batch_size, max_length=config.data.max_length, seed=config.seed,
                        shuffle=config.data.shuffle, num_epochs=config.data.num_epochs or None,
                        packing=config.data.packing, prefetch_batches=config.data.prefetch,
                        process_index=jax.process_index(), process_count=jax.process_count())
    collate = make_stacked_collate(model_config, grad_accum_steps=train_cfg.grad_accum_steps,
                                   packing=config.data.packing, **data.collate_kwargs,
                                   num_slots_multiple=mesh.shape["data"] * mesh.shape["fsdp"],
                                   target_positions_multiple=loss_target_positions_multiple(train_cfg))
    iterator = iter(make_dataset(data.train, spec, collate))

    store = CheckpointStore(setup.checkpoint_dir(config, run_dir), every_steps=config.checkpoint.every_steps,
                            keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    start_step = 0
    if not config.checkpoint.resume and store.latest_step() is not None:
        raise ConfigError(f"checkpoint.resume=false but {store.directory} already holds checkpoints (latest step "
                          f"{store.latest_step()}); use a new --config.run_dir or delete that folder")
    if config.checkpoint.resume and store.latest_step() is not None:
        state, data_state, start_step = store.restore(state)
        iterator.set_state(data_state)
        log.warning("resumed from %s at step %d", store.directory, start_step)

    dtype = _DTYPES[config.model.dtype]
    # CPU: no donation, so an async checkpoint's host copy can never alias a reused buffer.
    donate = jax.default_backend() != "cpu"
    step_fn = make_sft_step(model_config, optimizer, schedule, dtype=dtype, remat=config.model.remat,
                            layer_loop=config.model.layer_loop,
                            loss_chunk_size=train_cfg.loss_chunk_size, lora_overlay=lora_overlay, donate=donate,
                            state_shardings=state_shardings(state), metrics_sharding=sharding.replicated(mesh),
                            mesh=mesh, fsdp_gather=config.mesh.fsdp_gather)
    eval_nll = make_eval_nll(model_config, dtype=dtype, loss_chunk_size=train_cfg.loss_chunk_size,
                             lora_overlay=lora_overlay, mesh=mesh)
    generator = _make_generator(config, model_dir, model_config, data, dtype, run_dir)
    peak = flops.peak_flops_per_device(jax.devices()[0].device_kind, train_cfg.peak_flops_per_device)
    backward_factor = 1.0 if lora is not None else 2.0

    writer = MetricsWriter(run_dir, config=config.to_dict(), use_wandb=config.metrics.use_wandb,
                           wandb_project=config.metrics.wandb_project, run_name=config.name,
                           resume_from_step=start_step)
    try:
        if start_step == 0:
            writer.write(0, {"data/examples": len(data.train), "data/skipped": data.report.num_skipped,
                             "data/truncated": data.report.num_truncated, "model/params": models.num_params(params)})
        evaluate = functools.partial(_evaluate, config, data=data, model_config=model_config, eval_nll=eval_nll,
                                     generator=generator, lora_cfg=lora_cfg)
        step_context = dict(step_fn=step_fn, iterator=iterator, mesh=mesh, store=store, writer=writer,
                            evaluate=evaluate, model_config=model_config, backward_factor=backward_factor,
                            peak_flops=peak)
        state, final_step, last_train = _train_steps(config, state, start_step, **step_context)
        if store.latest_step() != final_step:
            store.save(final_step, state, iterator.get_state(), force=True)
        final_eval = evaluate(final_step, state)
        writer.write(final_step, final_eval)
    finally:
        generator.close()
        store.close()
        writer.close()
    return _finish(config, run_dir, model_dir, model_config, state, lora_cfg, final_step, start_step,
                   last_train, final_eval, wall_start)


def _train_steps(config, state, start_step, *, step_fn, iterator, mesh, store, writer, evaluate, model_config,
                 backward_factor, peak_flops):
    """Steps start_step+1 .. train.num_steps -> (state, last step, last train metrics)."""
    train_cfg = config.train
    bar = _progress(config, start_step)
    last_eval: dict = {}
    last_train: dict = {}
    step = start_step
    for step in range(start_step + 1, train_cfg.num_steps + 1):
        try:
            batch, host = split_host_stats(next(iterator))
        except StopIteration:  # data.num_epochs ran out before train.num_steps
            log.warning("data exhausted after %d epochs at step %d (train.num_steps=%d); stopping",
                        config.data.num_epochs, step - 1, train_cfg.num_steps)
            step -= 1
            break
        batch = jax.device_put(batch, _stacked_shardings(batch, mesh))
        step_start = time.perf_counter()
        state, metrics = step_fn(state, batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        seconds = time.perf_counter() - step_start
        step_flops = flops.train_flops(model_config, num_tokens=int(metrics["tokens"]),
                                       seq_len=int(batch["input_ids"].shape[-1]),
                                       num_patches=host["host_num_patches"], num_images=host["host_num_images"],
                                       backward_factor=backward_factor, logit_tokens=(
                                           int(metrics["target_tokens"]) if "target_positions" in batch else None))
        last_train = {f"train/{k}": v for k, v in metrics.items()}
        last_train.update({"train/step_seconds": seconds, "train/tokens_per_second": metrics["tokens"] / seconds,
                           "train/mfu": flops.mfu(step_flops, seconds, jax.device_count(), peak_flops)})
        if store.save(step, state, iterator.get_state()):
            last_train["checkpoint/saved_step"] = step
        # the last step's eval is the final eval, done by the caller
        due_eval = (config.eval.every_steps > 0 and step % config.eval.every_steps == 0
                    and step < train_cfg.num_steps)
        if due_eval:
            last_eval = evaluate(step, state)
        if step % train_cfg.log_every_steps == 0 or due_eval:
            writer.write(step, {**last_train, **(last_eval if due_eval else {})})
        if bar is not None:
            accuracy = last_eval.get(f"eval/{config.data.eval_split}_accuracy")
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{last_train['train/tokens_per_second']:.0f}",
                            **({"acc": f"{accuracy:.2f}"} if accuracy is not None else {}))
            bar.update(1)
    if bar is not None:
        bar.close()
    return state, step, last_train


def _finish(config, run_dir, model_dir, model_config, state, lora_cfg, final_step, start_step, last_train,
            final_eval, wall_start) -> dict:
    """Export, plots and the summary dict."""
    from jaxrl_vl.train.export import export_state
    export_dir = None
    if config.export.at_end:
        export_dir = export_state(state, model_config, os.path.join(run_dir, "export"), copy_from=model_dir,
                                  lora_cfg=lora_cfg)
    from jaxrl_vl.train.plots import text_curve
    print(text_curve(run_dir), file=sys.stderr, flush=True)
    plots = []
    if config.metrics.plot_at_end:
        from jaxrl_vl.train.plots import plot_run
        plots = plot_run(run_dir)
    split = config.data.eval_split
    summary = {
        "run_dir": run_dir, "steps": int(final_step), "resumed_from_step": int(start_step),
        "wall_seconds": round(time.time() - wall_start, 2),
        "train_loss": last_train.get("train/loss"),
        f"{split}_nll": final_eval.get(f"eval/{split}_nll"),
        f"{split}_accuracy": final_eval.get(f"eval/{split}_accuracy"),
        "generation_backend": final_eval.get("eval/generation_backend"),
        "export_dir": export_dir, "plots": plots,
        "checkpoint_dir": setup.checkpoint_dir(config, run_dir),
    }
    setup.write_json(os.path.join(run_dir, "summary.json"), summary)
    return summary
