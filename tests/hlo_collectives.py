"""The collectives of a compiled SPMD program (its optimized HLO text) and the devices each one joins, to tell
which of them cross batch shards: devices of a collective that differ in their (data, fsdp) mesh coordinates."""
from __future__ import annotations

import collections
import re

import numpy as np

COLLECTIVE = re.compile(r"= (.*?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
_IOTA = r"\[([0-9,]+)\](?:T\(([0-9,]+)\))?"  # iota over these dims, optionally transposed: "[2,4]T(1,0)"


def _iota(dims: str, perm: str | None) -> np.ndarray:
    shape = [int(d) for d in dims.split(",")]
    ids = np.arange(int(np.prod(shape))).reshape(shape)
    return ids.transpose([int(d) for d in perm.split(",")]) if perm else ids


def device_groups(line: str) -> list[list[int]]:
    """Partition ids of each group of one collective's HLO line, in any of XLA's replica-group formats."""
    if m := re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", line):
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))]
    if m := re.search(r"replica_groups=\[(\d+),(\d+)\]<=" + _IOTA, line):
        return _iota(m.group(3), m.group(4)).reshape(int(m.group(1)), int(m.group(2))).tolist()
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(" + _IOTA + r"\))? \{([^}]*)\}", line):
        names = re.findall(r"'([^']+)'=\d+", m.group(1))
        sizes = [int(x) for x in re.findall(r"'[^']+'=(\d+)", m.group(1))]
        ids = (_iota(m.group(2), m.group(3)) if m.group(2) else np.arange(int(np.prod(sizes)))).reshape(sizes)
        grouped = [names.index(name) for name in re.findall(r"'([^']+)'", m.group(4))]
        kept = [d for d in range(len(sizes)) if d not in grouped]
        return ids.transpose(kept + grouped).reshape(-1, int(np.prod([sizes[d] for d in grouped]))).tolist()
    if m := re.search(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}", line):
        return [[int(d) for d in group.split(",")] for group in re.findall(r"\{([0-9,]+)\}", m.group(1))]
    raise ValueError(f"no device groups found in the HLO line: {line[:300]}")


def collectives(hlo: str, mesh_shape: tuple[int, ...], batch_axes: int = 2) -> collections.Counter:
    """Counter of (op, result shape, crosses batch shards) over the program's collectives. Partition id k is the
    device at np.unravel_index(k, mesh_shape) (jit's device order is the mesh's); its first `batch_axes` mesh
    coordinates (data, fsdp) say which batch shards it holds."""
    found = collections.Counter()
    for line in hlo.splitlines():
        if m := COLLECTIVE.search(line):
            crosses = any(len({np.unravel_index(d, mesh_shape)[:batch_axes] for d in group}) > 1
                          for group in device_groups(line))
            found[(m.group(2), re.sub(r"\{[0-9,]*\}", "", m.group(1)), crosses)] += 1
    return found
