"""The SFT loop on the shared training core: data pipeline -> Trainer -> steps, hooks, export.

    summary = run_sft(config)     # configs/base.py documents every field

Resume: when RUN_DIR/checkpoints holds a finished checkpoint (and checkpoint.resume), the state
(params, optimizer, step, rng) and the data iterator's position are restored, so the rerun takes
exactly the steps the killed run would have taken; on CPU its final params are bitwise equal
to an uninterrupted run's (tests/test_train_resume.py).
"""
from __future__ import annotations

import logging
import sys
import time

import jax

from jaxrl_vl.data.collate import split_host_stats
from jaxrl_vl.data.pipeline import PipelineSpec, make_dataset
from jaxrl_vl.train import distributed
from jaxrl_vl.train.config_overrides import ConfigError
from jaxrl_vl.train.sft_eval import SFTData, SFTEvaluator, make_collate
from jaxrl_vl.train.sft_step import make_sft_step
from jaxrl_vl.train.trainer import Trainer

log = logging.getLogger("jaxrl_vl.sft")


def run_sft(config) -> dict:
    """Train per `config`; returns the JSON summary (run_dir, steps, wall_seconds, final eval...)."""
    train_cfg = config.train
    if train_cfg.batch_size % train_cfg.grad_accum_steps:
        raise ConfigError(f"train.batch_size={train_cfg.batch_size} must be a multiple of "
                          f"train.grad_accum_steps={train_cfg.grad_accum_steps}")
    trainer = Trainer(config, total_steps=train_cfg.num_steps, desc="sft")
    data = SFTData(config, trainer.model_dir)
    iterator = iter(make_dataset(data.train, _pipeline_spec(config), make_collate(config, trainer, data)))
    trainer.data_state_fn = iterator.get_state
    start_step, data_state = trainer.restore()
    if data_state is not None:
        iterator.set_state(data_state)
    step_fn = make_sft_step(trainer.forward, trainer.optimizer, trainer.schedule, trainer.view,
                            **trainer.step_kwargs())
    evaluator = SFTEvaluator(config, trainer, data)
    trainer.add_hook(evaluator, every=config.eval.every_steps, name="eval", at_end=True)
    try:
        if start_step == 0:
            trainer.writer.write(0, {"data/examples": len(data.train), "data/skipped": data.report.num_skipped,
                                     "data/truncated": data.report.num_truncated, "model/params": trainer.num_params()})
        final_step, last_train = _train_steps(trainer, step_fn, iterator)
        trainer.save_final(final_step)
        final_eval = trainer.run_hooks(final_step, final=True)
        trainer.writer.write(final_step, final_eval)
    finally:
        evaluator.close()
        trainer.close()
    return _finish(config, trainer, final_step, last_train, final_eval)


def _pipeline_spec(config) -> PipelineSpec:
    data, train_cfg = config.data, config.train
    return PipelineSpec(batch_size=train_cfg.batch_size, max_length=data.max_length, seed=config.seed,
                        shuffle=data.shuffle, num_epochs=data.num_epochs or None, packing=data.packing,
                        prefetch_batches=data.prefetch, process_index=jax.process_index(),
                        process_count=jax.process_count())


def _train_steps(trainer: Trainer, step_fn, iterator) -> tuple[int, dict]:
    """Steps start_step+1 .. train.num_steps -> (last step, last train metrics).

    A step's metrics are fetched after the next step is dispatched (the host prepares and dispatches step k+1
    while the device runs step k), except where a checkpoint or a hook is due, which need the step's own state.
    `train/step_seconds` is the time from one fetch to the next: the steady-state period of a step."""
    config = trainer.config
    last_train: dict = {}
    pending, step, clock = None, trainer.start_step, time.perf_counter()
    for step in range(trainer.start_step + 1, config.train.num_steps + 1):
        data_start = time.perf_counter()
        try:
            batch, host = split_host_stats(next(iterator))
        except StopIteration:  # data.num_epochs ran out before train.num_steps
            log.warning("data exhausted after %d epochs at step %d (train.num_steps=%d); stopping",
                        config.data.num_epochs, step - 1, config.train.num_steps)
            step -= 1
            break
        batch, host = trainer.place(batch), distributed.sum_over_processes(host, "sft_host_stats")
        data_seconds = time.perf_counter() - data_start
        trainer.state, metrics = step_fn(trainer.state, batch)
        if pending is not None:
            last_train, clock = _end_step(trainer, *pending, clock)
        pending = (step, metrics, batch, host, data_seconds)
        if trainer.needs_state(step):
            last_train, clock = _end_step(trainer, *pending, clock)
            pending = None
    if pending is not None:
        last_train, clock = _end_step(trainer, *pending, clock)
    return step, last_train


def _end_step(trainer: Trainer, step: int, metrics, batch: dict, host: dict, data_seconds: float,
              clock: float) -> tuple[dict, float]:
    """Fetch a step's metrics (waits for it), add throughput, log; -> (train metrics, the fetch time)."""
    config = trainer.config
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    seconds = now - clock
    train = {f"train/{k}": v for k, v in metrics.items()}
    train.update({f"train/{k}": v for k, v in trainer.throughput(
        seconds=seconds, tokens=metrics["tokens"], seq_len=int(batch["input_ids"].shape[-1]),
        num_patches=host["host_num_patches"], num_images=host["host_num_images"],
        logit_tokens=metrics["target_tokens"] if "target_positions" in batch else None).items()})
    train.update({"train/step_seconds": seconds, "time/data": data_seconds})
    accuracy = trainer.hooked.get(f"eval/{config.data.eval_split}_accuracy")
    trainer.end_step(step, train, log_now=step % config.train.log_every_steps == 0, bar_postfix=dict(
        loss=f"{metrics['loss']:.4f}", tok_s=f"{train['train/tokens_per_second']:.0f}",
        **({"acc": f"{accuracy:.2f}"} if accuracy is not None else {})))
    return train, time.perf_counter()


def _finish(config, trainer: Trainer, final_step: int, last_train: dict, final_eval: dict) -> dict:
    export_dir, plots = trainer.export_and_plot()
    if distributed.is_main():
        from jaxrl_vl.train.plots import text_curve
        print(text_curve(trainer.run_dir), file=sys.stderr, flush=True)
    split = config.data.eval_split
    return trainer.write_summary({
        "steps": int(final_step), "train_loss": last_train.get("train/loss"),
        f"{split}_nll": final_eval.get(f"eval/{split}_nll"), f"{split}_accuracy": final_eval.get(f"eval/{split}_accuracy"),
        "generation_backend": final_eval.get("eval/generation_backend"), "export_dir": export_dir, "plots": plots})
