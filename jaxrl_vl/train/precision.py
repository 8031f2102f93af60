"""Numeric formats of a run, from the config: one dtype table for every trainer.

  model.dtype        compute dtype of the forward and backward passes (matmul inputs; accumulation fp32)
  model.param_dtype  dtype the model params are stored in (the trained tree, and the frozen base with LoRA;
                     LoRA adapters stay fp32: they are small and their updates tiny)
  optim.moment_dtype AdamW's first moment; the second follows the trained tree's dtype (optax), so bf16
                     params + bf16 moments store both moments in bf16, as torch's AdamW on bf16 params does
  train.cast_once_per_step  cast the fp32 matrices to the compute dtype once per step (one bf16 copy that
                     FSDP gathers and the layers read) instead of at every use; same values either way
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxrl_vl.train.config_overrides import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_named(name: str, key: str):
    """DTYPES[name], or a ConfigError naming the config key."""
    if name not in DTYPES:
        raise ConfigError(f"{key}={name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class Precision:
    compute: Any = jnp.float32
    params: Any = jnp.float32
    moments: Any = jnp.float32
    cast_once: bool = True

    @classmethod
    def from_config(cls, config) -> "Precision":
        return cls(compute=dtype_named(config.model.dtype, "model.dtype"),
                   params=dtype_named(config.model.param_dtype, "model.param_dtype"),
                   moments=dtype_named(config.optim.moment_dtype, "optim.moment_dtype"),
                   cast_once=bool(config.train.cast_once_per_step))

    @property
    def name(self) -> str:
        """e.g. 'compute bfloat16, params bfloat16, moments bfloat16' (for logs and benchmark JSON)."""
        return ", ".join(f"{k} {jnp.dtype(getattr(self, k)).name}" for k in ("compute", "params", "moments"))


def cast_floats(tree, dtype):
    """Every floating leaf of `tree` in `dtype` (ints and bools unchanged)."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def compute_copy(tree, dtype):
    """The float32 matrices (ndim >= 2) of `tree` in the compute dtype; norms, biases and scalars unchanged.
    Cast once per step instead of at every use, so FSDP gathers the smaller copy."""
    return jax.tree.map(lambda a: a.astype(dtype) if a.ndim >= 2 and a.dtype == jnp.float32 else a, tree)
