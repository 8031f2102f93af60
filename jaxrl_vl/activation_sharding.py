"""Sharding constraints on activations, so XLA's SPMD partitioner splits the compute by batch.

Params and batches get their placements from jaxrl_vl.sharding, but nothing in between is pinned,
and XLA's propagation then sometimes picks the wrong plan for a matmul whose weight is FSDP-split
along its contracting dim: it all-gathers the [B, L, H] activations over the batch, multiplies the
full batch by its weight slice and all-reduces the [B, L, out] result, instead of all-gathering the
weight. Every device then touches the whole batch. `constrain` pins the batch dim of an activation
to ("data", "fsdp") (and, optionally, a head / intermediate dim to "tensor", Megatron style), which
leaves XLA only the FSDP plan: gather the weights, reduce-scatter their gradients.

The mesh is the ambient abstract mesh (`jax.sharding.get_abstract_mesh()`, the same call in jax
0.10 and 0.11). Step builders that own a mesh trace their body under `activation_mesh(mesh)`
(`jax.sharding.use_abstract_mesh`, which, unlike `jax.set_mesh`, may be entered inside jit), so
the jit cache never holds a version traced without it. With no mesh (single device), inside
shard_map (manual axes), or where a mesh axis does not divide the dim, `constrain` leaves the
array alone: constraints only choose the communication pattern, never change values.
"""
from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxrl_vl.sharding import BATCH_MESH_AXES

BATCH = "batch"    # split over the mesh's ("data", "fsdp") axes
TENSOR = "tensor"  # split over the "tensor" axis (attention heads, MLP intermediate, vocab)


@contextlib.contextmanager
def activation_mesh(mesh):
    """Makes `mesh` (a jax Mesh, or None for no-op) the one `constrain` uses, also inside jit."""
    if mesh is None:
        yield
        return
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        yield


def traced_under_mesh(fn, mesh):
    """fn, traced with `activation_mesh(mesh)` in force (wrap before jax.jit)."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activation_mesh(mesh):
            return fn(*args, **kwargs)
    return wrapped


def _axes_dividing(mesh, names: tuple[str, ...], size: int) -> tuple[str, ...]:
    """The axes of `names` (in order, size > 1) whose running product divides `size`."""
    chosen: list[str] = []
    for name in names:
        extent = mesh.shape.get(name, 1)
        if extent > 1 and size % (math.prod(mesh.shape[a] for a in chosen) * extent) == 0:
            chosen.append(name)
    return tuple(chosen)


def activation_spec(mesh, shape: tuple[int, ...], dims: tuple[str | None, ...]) -> P:
    """PartitionSpec for an activation of `shape` whose dims are labelled BATCH / TENSOR / None."""
    if len(dims) != len(shape):
        raise ValueError(f"activation of shape {shape} got {len(dims)} dim labels {dims}; "
                         f"give one label (BATCH, TENSOR or None) per dim")
    spec = []
    for label, size in zip(dims, shape):
        if label == BATCH:
            axes = _axes_dividing(mesh, BATCH_MESH_AXES, size)
            spec.append(axes if axes else None)
        elif label == TENSOR:
            spec.append(TENSOR if _axes_dividing(mesh, (TENSOR,), size) else None)
        elif label is None:
            spec.append(None)
        else:
            raise ValueError(f"unknown activation dim label {label!r}; use BATCH, TENSOR or None")
    return P(*spec)


def constrain(x: jax.Array, *dims: str | None) -> jax.Array:
    """x with its dims pinned as labelled (BATCH / TENSOR / None = whole on every device) on the
    ambient mesh; unchanged without one. E.g. hidden states: constrain(x, BATCH, None, None)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
        return x
    return jax.lax.with_sharding_constraint(x, activation_spec(mesh, tuple(x.shape), dims))


def take_per_shard(table: jax.Array, index: jax.Array, axis: int = 0) -> jax.Array:
    """`jnp.take(mode="fill", fill_value=0)` within each batch shard (models.inputs): table has the shard axis
    at `axis` and the gathered one after it, index [S, ...] holds rows local to each shard (out of range: 0).
    -> table's shape with the gathered axis replaced by index.shape[1:].

    A gather batched over the shard axis, which is pinned to the batch mesh axes on table, index and result, so
    every device gathers from its own shards: nothing is all-gathered. One shard: the plain gather of an
    unsharded batch (same program, no batching dims)."""
    take = lambda t, i: jnp.take(t, i, axis=axis, mode="fill", fill_value=0)
    if table.shape[axis] == 1:
        return jnp.expand_dims(take(jnp.squeeze(table, axis), index[0]), axis)
    shard_dims = lambda ndim, at: [BATCH if d == at else None for d in range(ndim)]
    table = constrain(table, *shard_dims(table.ndim, axis))
    index = constrain(index, *shard_dims(index.ndim, 0))
    out = jax.vmap(take, in_axes=(axis, 0), out_axes=axis)(table, index)
    return constrain(out, *shard_dims(out.ndim, axis))
