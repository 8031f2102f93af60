"""SFT data and held-out evaluation: rendered train/eval examples, the collate, held-out NLL and greedy accuracy.

The evaluator is the SFT loop's "eval" hook (every `eval.every_steps`, and at the end). Held-out NLL runs on
the mesh like training (each process scores its slice of every eval batch; the sums are global). Greedy
accuracy decodes through vLLM (weights pushed first) or the JAX model (`eval.generation_backend`).
"""
from __future__ import annotations

import logging
import os

import jax

from jaxrl_vl.data.collate import sft_collate_fn, split_host_stats
from jaxrl_vl.data.pipeline import render_records
from jaxrl_vl.data.render import HFRenderer
from jaxrl_vl.data.validation import DataReport
from jaxrl_vl.train import distributed, setup
from jaxrl_vl.train.config_overrides import ConfigError
from jaxrl_vl.train.evaluation import JaxGreedyGenerator, generation_accuracy, prompt_from_example
from jaxrl_vl.train.sft_step import make_eval_nll
from jaxrl_vl.train.trainer import Trainer, target_positions_multiple
from jaxrl_vl.train.vllm_eval import ServerStartError

log = logging.getLogger("jaxrl_vl.sft")
GENERATION_BACKENDS = ("auto", "vllm", "jax")


class SFTData:
    """Rendered train/eval examples and the renderer (rendering happens once per run)."""

    def __init__(self, config, model_dir: str):
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


def make_collate(config, trainer: Trainer, data: SFTData, *, grad_accum_steps: int | None = None,
                 packing: bool | None = None):
    """The training collate (stacked micro-batches, shapes agreed across processes)."""
    return sft_collate_fn(trainer.model_config, grad_accum_steps=grad_accum_steps or config.train.grad_accum_steps,
                          packing=config.data.packing if packing is None else packing, **data.collate_kwargs,
                          num_shards=trainer.local_shards,
                          target_positions_multiple=target_positions_multiple(config.train),
                          agree=lambda needs: distributed.agree_max(needs, "sft_collate"))


class SFTEvaluator:
    """The eval hook: held-out NLL and greedy accuracy on a fixed subset."""

    def __init__(self, config, trainer: Trainer, data: SFTData):
        self.config, self.trainer, self.data = config, trainer, data
        self.eval_nll = make_eval_nll(trainer.forward, trainer.view, mesh=trainer.mesh)
        self.collate = sft_collate_fn(trainer.model_config, grad_accum_steps=1, packing=False, **data.collate_kwargs,
                                      num_shards=trainer.local_shards,
                                      agree=lambda needs: distributed.agree_max(needs, "sft_eval"))
        self.generator = make_generator(config, trainer, data)

    def __call__(self, step: int) -> dict:
        split, results = self.config.data.eval_split, {}
        if self.data.eval[:self.config.eval.nll_num_examples]:
            results[f"eval/{split}_nll"] = self.nll()
        count = self.config.eval.num_generation_examples
        if count > 0 and self.data.eval:
            results.update(self.accuracy(step, count))
        return results

    def nll(self) -> float:
        """Mean NLL per target token of the eval subset: global batches of (micro-batch rows x processes), each
        process collating its slice."""
        examples = self.data.eval[:self.config.eval.nll_num_examples]
        micro = self.config.train.batch_size // self.config.train.grad_accum_steps
        per_batch, process = micro * jax.process_count(), jax.process_index()
        state, total_nll, total_targets = self.trainer.state, 0.0, 0.0
        for start in range(0, len(examples), per_batch):
            chunk = examples[start:start + per_batch][process * micro:(process + 1) * micro]
            rows = [[e] for e in chunk] + [[] for _ in range(micro - len(chunk))]  # empty rows: padding only
            batch, _ = split_host_stats(self.collate(rows))
            batch = self.trainer.place(batch)
            nll, count = self.eval_nll(state.params, state.lora, {k: v[0] for k, v in batch.items()})
            total_nll, total_targets = total_nll + float(nll), total_targets + float(count)
        return total_nll / max(total_targets, 1.0)

    def accuracy(self, step: int, count: int) -> dict:
        prompts = [prompt_from_example(e, r) for e, r in zip(self.data.eval[:count], self.data.eval_records[:count])]
        params = self.trainer.state.params
        if self.trainer.lora_cfg is not None:  # plain weights for vLLM (and the same numbers for the JAX decode)
            from jaxrl_vl.models.lora import merge
            params = merge(params, self.trainer.state.lora, self.trainer.lora_cfg)
        accuracy, samples = generation_accuracy(
            lambda ps: self.generator.generate(params, ps, self.config.eval.max_new_tokens, version=step), prompts)
        split = self.config.data.eval_split
        return {f"eval/{split}_accuracy": accuracy, "eval/generation_backend": self.generator.name,
                "eval/sample": f"{samples[0]['generated']!r} (reference {samples[0]['reference']!r})"}

    def close(self) -> None:
        self.generator.close()


def make_generator(config, trainer: Trainer, data: SFTData):
    """The eval's greedy generation backend (see evaluation.py): vLLM when configured or installed ("auto"), else
    the JAX decode. Several processes: the JAX decode (every process runs the same program on the sharded
    params); vLLM generation there is not wired (the weights would be gathered and pushed by process 0)."""
    backend = config.eval.generation_backend
    if backend not in GENERATION_BACKENDS:
        raise ConfigError(f"eval.generation_backend={backend!r}; choose one of {GENERATION_BACKENDS}")
    if config.eval.num_generation_examples <= 0 or (backend == "auto" and jax.process_count() > 1):
        backend = "jax"  # nothing to generate: do not start a server
    if backend == "vllm" and jax.process_count() > 1:
        raise ConfigError("eval.generation_backend='vllm' is not supported with several processes yet; use 'jax'")
    if backend == "auto":
        from jaxrl_vl.train.vllm_eval import vllm_available
        backend = "vllm" if (config.eval.vllm_url or vllm_available()) else "jax"
    renderer = data.renderer
    jax_generator = JaxGreedyGenerator(trainer.model_config, renderer.tokenizer, image_mean=renderer.image_mean,
                                       image_std=renderer.image_std, stop_token_ids=(renderer.end_id,),
                                       pad_id=renderer.pad_token_id, dtype=trainer.precision.compute)
    if backend == "jax":
        return jax_generator
    from jaxrl_vl.train.vllm_eval import VLLMGenerator
    vllm_generator = VLLMGenerator(trainer.model_dir, trainer.model_config, renderer.tokenizer,
                                   url=config.eval.vllm_url, log_dir=os.path.join(trainer.run_dir, "vllm_logs"))
    if config.eval.generation_backend == "vllm":
        return vllm_generator
    return FallbackGenerator(vllm_generator, jax_generator)


class FallbackGenerator:
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
