"""The Tinker backend's JAX work on the shared training core (train/step.py): no trainer of its own.

    compute = TinkerCompute(model_config, params, CoreSettings(dtype="bfloat16", loss_chunk_size=1024, ...))
    total, logprobs, elementwise, grads = compute.loss(lora, lora_cfg, batch, loss_fn, loss_config, with_grad=True)
    lora, opt_state, grad_norm = compute.adam_update(lora, opt_state, grads, clip_norm)

The base params are stored in `param_dtype` and sharded over a ("data", "fsdp", "tensor") mesh of the local
devices (sharding.py), every training client's LoRA tree and AdamW state placed by the same rules. A
forward_backward is the core's grad step (make_grad_step) with a Tinker loss (losses/tinker_losses.py) on the
per-token target logprobs, computed by the same Forward as SFT and RL (compute dtype, attention, layer loop,
remat, chunked logits: never [B, L, V] fp32 with `loss_chunk_size` > 0); an optim_step is the core's optimizer
update with Tinker's per-call AdamW hyperparameters (optax.inject_hyperparams) after global-norm clipping.
Tinker returns a logprob for every position, so logits are computed at every position (no target positions).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrl_vl import sharding
from jaxrl_vl.losses.sft import chunked_token_logprobs, token_logprobs
from jaxrl_vl.losses.tinker_losses import tinker_loss
from jaxrl_vl.models.lora import LoraConfig, overlay
from jaxrl_vl.train.precision import DTYPES, cast_floats
from jaxrl_vl.train.step import Forward, ParamsView, StepLoss, check_attention, make_grad_step, make_loss_step

LOSS_INPUT_KEYS = ("weights", "logprobs", "advantages")
NOT_MODEL_KEYS = ("target_tokens", "loss_mask", *LOSS_INPUT_KEYS)


@dataclasses.dataclass(frozen=True)
class CoreSettings:
    """How the backend runs the model (launch/tinker_server.py flags); the defaults are exact fp32 on any device."""
    dtype: str = "float32"          # compute dtype
    param_dtype: str = "float32"    # stored dtype of the (frozen) base params
    attention: str = "auto"
    layer_loop: str = "scan"
    remat: str = "none"
    loss_chunk_size: int = 0        # > 0: logits chunk by chunk from the hidden states
    mesh_fsdp: int = -1             # the local devices, split by FSDP (data and tensor stay 1)


def make_optimizer() -> optax.GradientTransformation:
    """AdamW whose hyperparameters each optim_step sets (Tinker clients change the learning rate every step)."""
    return optax.inject_hyperparams(optax.adamw)(learning_rate=1e-4, b1=0.9, b2=0.95, eps=1e-12, weight_decay=0.0)


def tinker_step_loss(forward: Forward, loss_fn: str, loss_config: dict) -> StepLoss:
    """A Tinker loss for the core's grad step: the sum over tokens and datums of the loss's elementwise terms;
    stats carry the target logprobs and elementwise losses [B, L] the client gets back."""

    def loss(params, micro, _):
        model_batch = {k: v for k, v in micro.items() if k not in NOT_MODEL_KEYS}
        targets = micro["target_tokens"].astype(jnp.int32)
        if forward.loss_chunk_size > 0:
            hidden = forward.hidden(params, model_batch)
            target = chunked_token_logprobs(hidden, forward.unembedding(params), targets,
                                            chunk_size=forward.loss_chunk_size, dtype=hidden.dtype)
        else:
            target = token_logprobs(forward.logits(params, model_batch), targets)
        inputs = {k: micro[k] for k in LOSS_INPUT_KEYS if k in micro}
        total, elementwise = tinker_loss(loss_fn, target, inputs, loss_config, valid_mask=micro["loss_mask"])
        return total, {"target": target, "elementwise": elementwise}

    def summarize(losses, stats, _, __):
        return {"loss_sum": jnp.sum(losses), "target": stats["target"][0], "elementwise": stats["elementwise"][0]}

    return StepLoss(lambda batches: None, loss, summarize)


class TinkerCompute:
    def __init__(self, model_config, params: dict, settings: CoreSettings = CoreSettings()):
        compute_dtype = DTYPES[settings.dtype]
        check_attention(settings.attention, backend=jax.default_backend(), compute_dtype=compute_dtype, packing=False)
        self.settings = settings
        self.mesh = sharding.make_mesh(fsdp=settings.mesh_fsdp, devices=jax.local_devices())
        self.forward = Forward(model_config, dtype=compute_dtype, remat=settings.remat, layer_loop=settings.layer_loop,
                               attention=settings.attention, loss_chunk_size=settings.loss_chunk_size)
        self.params = sharding.shard_params(cast_floats(params, DTYPES[settings.param_dtype]), self.mesh)
        self._steps: dict[tuple, Any] = {}
        self._optimizer = make_optimizer()
        self._update = jax.jit(self._update_impl)

    def place(self, tree):
        """A LoRA tree or optimizer state on the mesh (the sharding rules of its param-shaped leaves)."""
        return sharding.shard_params(tree, self.mesh)

    def init_optimizer(self, lora: dict):
        return self.place(jax.jit(self._optimizer.init)(lora))

    def _grad_step(self, lora_cfg: LoraConfig, loss_fn: str, config_items: tuple, with_grad: bool):
        key = (lora_cfg, loss_fn, config_items, with_grad)
        if key not in self._steps:
            view = ParamsView(self.forward.dtype, lora_overlay=lambda p, lo: overlay(p, lo, lora_cfg))
            loss = tinker_step_loss(self.forward, loss_fn, dict(config_items))
            if with_grad:
                self._steps[key] = make_grad_step(loss, view, mesh=self.mesh)
            else:  # forward only: the same loss, no gradients
                value = make_loss_step(loss, view, mesh=self.mesh)
                self._steps[key] = lambda lora, frozen, batches: (None, value(lora, frozen, batches))
        return self._steps[key]

    def loss(self, lora: dict, lora_cfg: LoraConfig, batch: dict, loss_fn: str, loss_config: dict, *,
             with_grad: bool):
        """-> (loss sum, target logprobs [B, L], elementwise losses [B, L], grads | None) for one padded batch."""
        step = self._grad_step(lora_cfg, loss_fn, tuple(sorted(loss_config.items())), with_grad)
        stacked = {k: np.asarray(v)[None] for k, v in batch.items() if k != "image_grid_thw"}
        grads, metrics = step(lora, self.params, jax.device_put(stacked, sharding.stacked_batch_shardings(stacked,
                                                                                                       self.mesh)))
        return metrics["loss_sum"], metrics["target"], metrics["elementwise"], grads

    def _update_impl(self, lora, opt_state, grads, clip_norm):
        """Global-norm clipping (clip_norm <= 0: off), then AdamW with the injected hyperparameters. The norm is
        taken of grads / max|g| and scaled back, so gradients above ~1e19 (whose squares overflow float32) still
        clip to a finite update instead of turning it into NaN."""
        leaves = jax.tree_util.tree_leaves(grads)
        peak = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in leaves]))
        safe = jnp.where(peak > 0, peak, 1.0)
        norm = safe * jnp.sqrt(sum(jnp.sum(jnp.square(g / safe)) for g in leaves))
        scale = jnp.where((clip_norm > 0) & (norm > clip_norm), clip_norm / jnp.maximum(norm, 1e-12), 1.0)
        updates, opt_state = self._optimizer.update(jax.tree.map(lambda g: g * scale, grads), opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, norm

    def adam_update(self, lora, opt_state, grads, clip_norm: float):
        """-> (new LoRA, new optimizer state, gradient norm before clipping); the inputs are not changed."""
        return self._update(lora, opt_state, grads, jnp.float32(clip_norm))

