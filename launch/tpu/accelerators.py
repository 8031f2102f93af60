"""TPU slice names -> what gcloud needs (accelerator type, default runtime) and how many hosts.

Users write the marketing name (`v5e-8`, `v5p-16`, `v6e-16`, `v4-32`) or gcloud's own accelerator
type (`v5litepod-8`). The number after the dash is chips for v5e/v6e and TensorCores for v4/v5p
(two per chip), as gcloud counts them.
"""
import dataclasses
import re

# generation -> (gcloud accelerator-type prefix, default runtime version, chips per host in
# multi-host slices, largest single-host slice in chips, TensorCores per chip in the name)
_GENERATIONS = {
    "v4": ("v4", "tpu-ubuntu2204-base", 4, 4, 2),
    "v5e": ("v5litepod", "v2-alpha-tpuv5-lite", 4, 8, 1),
    "v5p": ("v5p", "v2-alpha-tpuv5", 4, 4, 2),
    "v6e": ("v6e", "v2-alpha-tpuv6e", 4, 8, 1),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    generation: str        # "v4" | "v5e" | "v5p" | "v6e"
    accelerator_type: str  # gcloud --accelerator-type, e.g. "v5litepod-8"
    runtime_version: str   # default gcloud --runtime-version for this generation
    num_chips: int
    num_hosts: int         # TPU VM workers per slice (gcloud --worker=0..num_hosts-1)


def parse_tpu(name: str) -> TpuSlice:
    """'v5e-8' | 'v5litepod-8' | 'v5p-16' | 'v6e-16' | 'v4-32' -> TpuSlice. Raises ValueError naming
    the accepted forms."""
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
    generation = match and _ALIASES.get(match.group(1), match.group(1))
    if not match or generation not in _GENERATIONS:
        raise ValueError(f"--tpu={name!r}: expected GENERATION-SIZE with GENERATION in "
                         f"{sorted(_GENERATIONS)} (or v5litepod), e.g. v5e-8, v5p-16, v6e-16, v4-32")
    prefix, runtime, chips_per_host, max_single_host_chips, cores_per_chip = _GENERATIONS[generation]
    size = int(match.group(2))
    if size % cores_per_chip:
        raise ValueError(f"--tpu={name!r}: {generation} sizes count TensorCores ({cores_per_chip} per chip); "
                         f"use a multiple of {cores_per_chip}")
    num_chips = size // cores_per_chip
    if num_chips <= max_single_host_chips:
        num_hosts = 1
    elif num_chips % chips_per_host:
        raise ValueError(f"--tpu={name!r}: multi-host {generation} slices have {chips_per_host} chips per host")
    else:
        num_hosts = num_chips // chips_per_host
    return TpuSlice(generation=generation, accelerator_type=f"{prefix}-{size}", runtime_version=runtime,
                    num_chips=num_chips, num_hosts=num_hosts)
