"""TrainState: everything a training step reads and writes, as one pytree.

Fields
  step       int32 []   optimizer updates applied so far
  params     pytree     model params (fp32 master weights, HF-named; see models/)
  opt_state  pytree     optax state of the *trained* tree (params, or lora when LoRA is on)
  lora       pytree | None  LoRA tree (models/lora.py) when training adapters, else None
  rng        uint32 [2] a raw PRNG key (raw, not typed, so checkpoints stay plain arrays)

Being a plain pytree it can be jitted, donated, sharded and checkpointed with Orbax as is.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    lora: Any
    rng: jax.Array

    @property
    def trainable(self):
        """The tree the optimizer updates: the LoRA tree when present, else the full params."""
        return self.params if self.lora is None else self.lora


def create_train_state(params, optimizer: optax.GradientTransformation, rng: jax.Array,
                       lora=None, mesh=None) -> TrainState:
    """Fresh state at step 0. `rng`: a raw key (jax.random.PRNGKey(seed)).

    The optimizer state is built under jit so its moments inherit the (possibly sharded) layout
    of the trained tree. With `mesh`, every leaf that is not yet placed on it (step, rng, Adam's
    count) is replicated over it, so the state's shardings are a fixed point of the train step."""
    trainable = params if lora is None else lora
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=jax.jit(optimizer.init)(trainable), lora=lora, rng=rng)
    if mesh is None:
        return state
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(x):
        on_mesh = isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
        return x if on_mesh else jax.device_put(x, replicated)
    return jax.tree.map(place, state)


def state_shardings(state: TrainState) -> TrainState:
    """The TrainState of each leaf's sharding (for jit out_shardings and checkpoint restore)."""
    return jax.tree.map(lambda x: x.sharding, state)


def with_trainable(state: TrainState, trainable, opt_state) -> TrainState:
    """The state after an update of the trained tree."""
    if state.lora is None:
        return state.replace(params=trainable, opt_state=opt_state, step=state.step + 1)
    return state.replace(lora=trainable, opt_state=opt_state, step=state.step + 1)


def count_params(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))
