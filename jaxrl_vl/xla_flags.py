"""XLA flags the entry points set by default, before JAX starts its backends.

A flag the user already put in XLA_FLAGS (any value) is left alone.

--xla_gpu_dot_merger_threshold_mb=0: XLA's dot merger joins matmuls that share an operand (q/k/v
  projections of one input, and in the backward their weight gradients, which share the layer input),
  which needs a concatenate of the weights in the forward and of the three output gradients
  ([tokens, (heads + 2 kv_heads) * head_dim]) in the backward, then slices: copies that cost more than
  the larger matmul saves. Off: Qwen3-VL 2B full fine-tune on one H100 +0.3% / +1.2% tokens/s in two
  same-machine A/B pairs, 0.4 GiB less memory (tools/bench_results/2026-11-26g_h100/). GPU only.
"""
from __future__ import annotations

import os

DEFAULTS = ("--xla_gpu_dot_merger_threshold_mb=0",)


def with_defaults(xla_flags: str) -> str:
    """xla_flags plus each of DEFAULTS whose flag name it does not already set."""
    present = {flag.split("=", 1)[0] for flag in xla_flags.split()}
    missing = [flag for flag in DEFAULTS if flag.split("=", 1)[0] not in present]
    return " ".join([xla_flags.strip()] + missing).strip()


def apply_defaults() -> None:
    """Adds DEFAULTS to os.environ["XLA_FLAGS"]; call before the first JAX computation."""
    os.environ["XLA_FLAGS"] = with_defaults(os.environ.get("XLA_FLAGS", ""))
