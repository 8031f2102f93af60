"""Several processes (hosts) training one model: start-up, who writes, agreed shapes, global batches.

Every process runs the same program on its own slice of the data: it collates its local rows, agrees with the
others on the padded shapes (`agree_max`: a max over processes, through the coordinator's key-value store, so it
is safe from the data-prefetch thread and issues no device collective), and contributes its rows to global
arrays (`global_batch`: jax.make_array_from_process_local_data). Process 0 alone writes metrics, wandb, plots,
summaries and exports, and draws progress bars (`is_main`). With one process all of this is a no-op.

Processes are found from the environment: a multi-host Cloud TPU slice (TPU_WORKER_HOSTNAMES), or
JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and JAX_PROCESS_ID (any cluster; tests/multiprocess.py starts
such processes on 127.0.0.1). On CPU the collectives run over gloo.
"""
from __future__ import annotations

import itertools
import json
import os

import jax

MODES = ("auto", "on", "off")
_counters: dict[str, itertools.count] = {}


def initialize(mode: str) -> bool:
    """jax.distributed.initialize() per `distributed` (see module doc); returns whether it ran."""
    if mode not in MODES:
        raise ValueError(f"distributed={mode!r}; choose one of {MODES}")
    if mode == "off" or jax.distributed.is_initialized():
        return False
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not (mode == "on" or len(hosts) > 1 or address):
        return False
    kwargs = {}
    if address and "JAX_NUM_PROCESSES" in os.environ:
        kwargs = dict(coordinator_address=address, num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                      process_id=int(os.environ["JAX_PROCESS_ID"]))
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return True


def is_main() -> bool:
    """Whether this process writes run outputs (metrics, plots, exports, summaries) and draws bars."""
    return jax.process_index() == 0


def gather_json(value, tag: str) -> list:
    """`value` (JSON-able) of every process, in process order (each process calls it with the same tag, in the
    same order). Through the coordinator's key-value store: safe from any thread, no device collective."""
    if jax.process_count() == 1:
        return [value]
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    prefix = f"jaxrl_vl/{tag}/{next(_counters.setdefault(tag, itertools.count()))}"
    client.key_value_set(f"{prefix}/{jax.process_index()}", json.dumps(value))
    return [json.loads(client.blocking_key_value_get(f"{prefix}/{p}", 600_000)) for p in range(jax.process_count())]


def agree_max(needs: dict[str, int], tag: str = "collate") -> dict[str, int]:
    """The per-key max of `needs` over all processes (the padded shapes every process then pads to)."""
    values = gather_json(needs, tag)
    if any(sorted(v) != sorted(needs) for v in values):
        raise ValueError(f"processes disagree on the keys to agree on ({tag}): {values}")
    return {key: max(v[key] for v in values) for key in needs}


def sum_over_processes(counts: dict[str, float], tag: str) -> dict[str, float]:
    """The per-key sum of `counts` over all processes (e.g. tokens and patches for FLOPs)."""
    values = gather_json(counts, tag)
    return {key: sum(v[key] for v in values) for key in counts}


def global_batch(local: dict, shardings: dict) -> dict:
    """This process's rows -> global arrays placed by `shardings` (rows of process p at p's devices). Every
    key must be split over the batch axes (or be identical on every process)."""
    if jax.process_count() == 1:
        return jax.device_put(local, shardings)
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local.items()}


def host_local(tree):
    """Arrays -> numpy on this host; params sharded over several processes are all-gathered first (every
    process must call this)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)
