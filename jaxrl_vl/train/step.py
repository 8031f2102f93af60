"""The training step every trainer builds (SFT, RL and the Tinker backend), from the same pieces:

    forward  = Forward(model_config, dtype=..., attention=..., loss_chunk_size=...)   # how the model runs
    view     = ParamsView(compute_dtype, cast_once=..., lora_overlay=..., gather_mesh=...)  # state -> params
    step     = make_update_step(loss, optimizer, schedule, view, mesh=mesh, ...)
    state, metrics = step(state, batches)          # batches: a dict of arrays [A, ...], A micro-batches

A `StepLoss` is the only thing a trainer supplies: `totals(batches)` (normalisers over all micro-batches,
e.g. the target token count), `loss(params, micro_batch, totals) -> (scalar, stats)` where the micro-batch
losses SUM to the batch loss, and `summarize(losses [A], stats [A, ...], totals, batches) -> metrics`.
The step scans the micro-batches (gradients summed in fp32 when A > 1), casts the gradient to the trained
tree's dtype, applies the optimizer (global-norm clipping is part of the optax chain, train/optim.py) and
adds grad_norm and learning_rate. `make_grad_step` / `make_apply_step` are the two halves, for the Tinker
backend (forward_backward accumulates gradients across requests, optim_step applies them).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxrl_vl import models, sharding
from jaxrl_vl.activation_sharding import traced_under_mesh
from jaxrl_vl.train.precision import compute_copy
from jaxrl_vl.train.state import TrainState, with_trainable

# Host-side keys that the jitted model never reads (their shapes vary with the image count).
HOST_ONLY_KEYS = ("image_grid_thw", "num_examples", "group_id")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "cudnn_causal")


@dataclasses.dataclass(frozen=True)
class Forward:
    """How the model runs in a step: compute dtype, remat policy, layer loop, attention, loss chunking
    (`loss_chunk_size` > 0: logits chunk by chunk from the final hidden states, never [B, L, V] at once)."""
    model_config: Any
    dtype: Any = jnp.float32
    remat: str = "none"
    layer_loop: str = "scan"
    attention: str = "auto"
    loss_chunk_size: int = 0

    def hidden(self, params: dict, batch: dict) -> jax.Array:
        """Final normed hidden states [B, L, D] in the compute dtype."""
        return models.apply(params, batch, self.model_config, dtype=self.dtype, remat=self.remat, return_hidden=True,
                            attention=self.attention, layer_loop=self.layer_loop)

    def logits(self, params: dict, batch: dict) -> jax.Array:
        """Full logits [B, L, V] fp32 (only where loss_chunk_size == 0)."""
        return models.apply(params, batch, self.model_config, dtype=self.dtype, remat=self.remat,
                            attention=self.attention, layer_loop=self.layer_loop)

    def unembedding(self, params: dict):
        return models.unembedding(params, self.model_config)


@dataclasses.dataclass(frozen=True)
class ParamsView:
    """The params one forward pass reads, from the state's trees: the LoRA overlay on the frozen base, the
    compute-dtype copy cast once per step, and (FSDP "step" gather) that copy gathered once per micro-batch
    and kept for the backward, its gradient reduce-scattered (sharding.gathered_once)."""
    compute_dtype: Any = jnp.float32
    cast_once: bool = True
    lora_overlay: Callable | None = None
    gather_mesh: Any = None

    def __call__(self, frozen, trainable) -> dict:
        params = trainable if self.lora_overlay is None else self.lora_overlay(frozen, trainable)
        if self.cast_once or self.gather_mesh is not None:
            params = compute_copy(params, self.compute_dtype)
        if self.gather_mesh is not None:
            params = sharding.gathered_once(params, self.gather_mesh)
        return params

    def of(self, params: dict, lora=None) -> dict:
        """The params a forward reads for a params tree and an optional LoRA tree (None: the params as they
        are, e.g. the base model as the reference policy)."""
        if lora is not None:
            return self(params, lora)
        return dataclasses.replace(self, lora_overlay=None)(None, params)


@dataclasses.dataclass(frozen=True)
class StepLoss:
    totals: Callable      # batches [A, ...] -> pytree of normalisers
    loss: Callable        # (params, micro_batch, totals) -> (scalar loss share, stats pytree)
    summarize: Callable   # (losses [A], stats [A, ...], totals, batches) -> {name: fp32 scalar}


def device_keys(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in HOST_ONLY_KEYS}


def global_norm(tree) -> jax.Array:
    """sqrt(sum of squares) over all leaves, in fp32 (the norm clip_by_global_norm compares)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _frozen(state: TrainState):
    return state.params if state.lora is not None else None


def accumulate_grads(loss: StepLoss, view: ParamsView, trainable, frozen, batches: dict):
    """-> (grads in the trained tree's dtype, losses [A], stats [A, ...], totals) over the A micro-batches.
    One micro-batch: no accumulator (the plain value-and-grad). Several: a lax.scan summing fp32 gradients."""
    totals = loss.totals(batches)

    def value(tree, micro):
        return loss.loss(view(frozen, tree), micro, totals)

    grad_fn = jax.value_and_grad(value, has_aux=True)
    if jax.tree.leaves(batches)[0].shape[0] == 1:
        (one_loss, stats), grads = grad_fn(trainable, jax.tree.map(lambda x: x[0], batches))
        return grads, one_loss[None], jax.tree.map(lambda x: x[None], stats), totals

    def body(acc, micro):
        (micro_loss, stats), grads = grad_fn(trainable, micro)
        return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads), (micro_loss, stats)

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
    grads, (losses, stats) = jax.lax.scan(body, zeros, batches)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)
    return grads, losses, stats, totals


def apply_gradients(optimizer: optax.GradientTransformation, state: TrainState, grads) -> TrainState:
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    return with_trainable(state, optax.apply_updates(state.trainable, updates), opt_state)


def _jit(fn, mesh, donate: tuple[int, ...], out_shardings):
    return jax.jit(traced_under_mesh(fn, mesh), donate_argnums=donate, out_shardings=out_shardings)


def make_update_step(loss: StepLoss, optimizer, schedule: optax.Schedule, view: ParamsView, *, mesh=None,
                     donate: bool = True, state_shardings=None, metrics_sharding=None):
    """-> jitted step(state, batches [A, ...]) -> (state, metrics): gradients of all micro-batches, one
    optimizer update. state_shardings / metrics_sharding pin the outputs (the state keeps its placement, so the
    step compiles once). mesh: the activations' batch split (jaxrl_vl.activation_sharding); None: one device."""

    def step(state: TrainState, batches: dict):
        batches = device_keys(batches)
        grads, losses, stats, totals = accumulate_grads(loss, view, state.trainable, _frozen(state), batches)
        metrics = dict(loss.summarize(losses, stats, totals, batches), grad_norm=global_norm(grads),
                       learning_rate=jnp.asarray(schedule(state.step), jnp.float32))
        return apply_gradients(optimizer, state, grads), metrics

    out = None if state_shardings is None else (state_shardings, metrics_sharding)
    return _jit(step, mesh, (0,) if donate else (), out)


def make_grad_step(loss: StepLoss, view: ParamsView, *, mesh=None):
    """-> jitted grads(trainable, frozen, batches [A, ...]) -> (grads, metrics): the first half of the step."""

    def grads_of(trainable, frozen, batches: dict):
        batches = device_keys(batches)
        grads, losses, stats, totals = accumulate_grads(loss, view, trainable, frozen, batches)
        return grads, dict(loss.summarize(losses, stats, totals, batches), grad_norm=global_norm(grads))

    return _jit(grads_of, mesh, (), None)


def make_loss_step(loss: StepLoss, view: ParamsView, *, mesh=None):
    """-> jitted value(trainable, frozen, batches [A, ...]) -> metrics: the loss's summary without gradients (a
    forward pass per micro-batch)."""

    def value(trainable, frozen, batches: dict):
        batches = device_keys(batches)
        totals, params = loss.totals(batches), view(frozen, trainable)
        losses, stats = jax.lax.map(lambda micro: loss.loss(params, micro, totals), batches)
        return loss.summarize(losses, stats, totals, batches)

    return _jit(value, mesh, (), None)


def make_apply_step(optimizer, *, mesh=None, donate: bool = True):
    """-> jitted apply(state, grads) -> state: the second half (one optimizer update of the trained tree)."""
    return _jit(lambda state, grads: apply_gradients(optimizer, state, grads), mesh, (0,) if donate else (), None)


def check_attention(attention: str, *, backend: str, compute_dtype, packing: bool) -> None:
    """ValueError naming `model.attention` where the implementation cannot run this configuration."""
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention={attention!r}; choose one of {ATTENTION_IMPLS}")
    if attention.startswith("cudnn"):
        if backend != "gpu":
            raise ValueError(f"model.attention={attention!r} needs a GPU (this backend is {backend}); use 'auto' "
                             "(cuDNN on GPU in bf16, XLA elsewhere) or 'xla'")
        if jnp.dtype(compute_dtype) not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"model.attention={attention!r} needs model.dtype=bfloat16 (cuDNN flash attention "
                             "has no fp32 kernel); use 'xla' for fp32")
    if attention == "cudnn_causal" and packing:
        raise ValueError("model.attention='cudnn_causal' masks only causally and cannot keep packed examples "
                         "apart; use 'cudnn' (segment mask) with data.packing=True")
