"""Multi-host start-up: call `maybe_initialize()` first thing in a training entry point, before any
JAX computation (jax.distributed.initialize must precede backend initialisation).

Decides from the environment, so one command line works on a laptop, one TPU host and a pod:
  - JAXRL_VL_DISTRIBUTED=1 (set by `python -m launch.tpu` when the slice has several hosts or
    slices): `jax.distributed.initialize()` with no arguments; on Cloud TPU JAX finds the
    coordinator, process count and process id itself (multi-slice too).
  - JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID (GPU clusters, tests): those values.
  - neither: single process, nothing to do.
JAXRL_VL_DISTRIBUTED=0 forces single-process even when the JAX_* variables are set.
"""
import dataclasses
import os

_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no")


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    process_index: int
    process_count: int
    initialized_here: bool  # True when this call ran jax.distributed.initialize


def _int_env(environ, name: str) -> int:
    value = environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected an integer") from None


def initialize_arguments(environ=None) -> dict | None:
    """The keyword arguments for jax.distributed.initialize chosen from `environ` (default os.environ),
    or None when this is a single-process run. Raises ValueError naming the variable at fault."""
    environ = os.environ if environ is None else environ
    flag = environ.get("JAXRL_VL_DISTRIBUTED", "").strip().lower()
    if flag and flag not in _TRUE + _FALSE:
        raise ValueError(f"JAXRL_VL_DISTRIBUTED={flag!r}: expected 1 or 0")
    if flag in _FALSE and flag:
        return None
    explicit = [name for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if environ.get(name)]
    if explicit and len(explicit) < 3:
        missing = sorted({"JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"} - set(explicit))
        raise ValueError(f"{', '.join(explicit)} set but {', '.join(missing)} not: set all three (or none)")
    if explicit:
        num_processes, process_id = _int_env(environ, "JAX_NUM_PROCESSES"), _int_env(environ, "JAX_PROCESS_ID")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"JAX_PROCESS_ID={process_id} must be in [0, JAX_NUM_PROCESSES={num_processes})")
        return {"coordinator_address": environ["JAX_COORDINATOR_ADDRESS"], "num_processes": num_processes,
                "process_id": process_id}
    return {} if flag in _TRUE else None


def maybe_initialize(environ=None) -> DistributedInfo:
    """Initialises jax.distributed when the environment asks for it (see module doc); idempotent.
    Returns this process's index and the process count."""
    import jax

    arguments = initialize_arguments(environ)
    initialized_here = False
    if arguments is not None and not _already_initialized():
        jax.distributed.initialize(**arguments)
        initialized_here = True
    return DistributedInfo(process_index=jax.process_index(), process_count=jax.process_count(),
                           initialized_here=initialized_here)


def _already_initialized() -> bool:
    import jax

    return bool(jax.distributed.is_initialized())
