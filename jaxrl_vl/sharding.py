"""Device mesh, parameter/batch placement and jit shardings for data, FSDP and tensor parallelism.

One mesh with axes ("data", "fsdp", "tensor"):
  data    pure data parallelism: params replicated, batch split.
  fsdp    ZeRO-3 style: batch split AND each param split along its first (major) remaining dim
          that the axis divides (XLA all-gathers it for the matmul and reduce-scatters its gradient).
  tensor  Megatron style: column-parallel linears (q/k/v, gate/up, fc1, the vocab dim of the
          embedding and lm_head) split their output dim; row-parallel ones (o_proj, down, fc2)
          their input dim.
Rules are regexes over a param's dotted path (HF names, e.g.
"model.language_model.layers.self_attn.q_proj.weight"); the leading layer axis of stacked lists
("layers", "blocks", "deepstack_merger_list") is never split (lax.scan slices it). In the unstacked
layout (models.layout) those lists are Python lists: a leaf's path carries the layer index
("...layers.3.self_attn.q_proj.weight"), it has no layer axis, and it gets the stacked leaf's spec
without the leading entry (the size threshold counts the whole list, as for the stack). A dim that a
mesh axis does not divide stays replicated and the fallback is logged (and listed by
`describe_param_sharding`). Any placement is numerically correct (XLA inserts the collectives);
the rules only decide the communication pattern.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_MESH_AXES = ("data", "fsdp")  # the batch dim is split over both
STACKED_LIST_NAMES = ("layers", "blocks", "deepstack_merger_list")
# Arrays smaller than this stay replicated: splitting them saves nothing and costs collectives.
MIN_SHARDED_SIZE = 2 ** 12

# (regex on the dotted path, which trailing dim the tensor axis splits). -2 = output dim of an
# [out, in] weight (column parallel), -1 = input dim (row parallel) or a column-parallel bias.
TENSOR_PARALLEL_RULES: tuple[tuple[str, int], ...] = (
    (r"(^|\.)(embed_tokens|lm_head)\.weight$", -2),                       # [vocab, hidden]
    (r"\.(q_proj|k_proj|v_proj|qkv|gate_proj|up_proj|linear_fc1)\.weight$", -2),
    (r"\.merger\.mlp\.0\.weight$", -2),                                    # Qwen2.5-VL merger fc1
    (r"\.(q_proj|k_proj|v_proj|qkv|gate_proj|up_proj|linear_fc1)\.bias$", -1),
    (r"\.merger\.mlp\.0\.bias$", -1),
    (r"\.(o_proj|proj|down_proj|linear_fc2)\.weight$", -1),
    (r"\.merger\.mlp\.2\.weight$", -1),
)
# LoRA factors: never tensor-split (rank is tiny); fsdp still splits their largest dim.
LORA_LEAF = re.compile(r"\.lora_(A|B|scale)$")


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """Mesh of shape (data, fsdp, tensor) over `devices` (default: all). One size may be -1:
    it takes whatever the device count leaves (fsdp=-1 by default)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one of data/fsdp/tensor may be -1, got {sizes}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive or -1, got data/fsdp/tensor={sizes}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices are not divisible by the fixed mesh sizes "
                             f"{sizes} (product {known})")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh data*fsdp*tensor = {sizes} needs {math.prod(sizes)} devices, "
                         f"{len(devices)} available; change the sizes or pass devices=")
    try:  # topology-aware order on GPU/TPU (tensor axis on the fastest links)
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # noqa: BLE001 — CPU / odd shapes: plain order is fine
        grid = np.array(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def path_to_name(path) -> str:
    """jax tree path -> dotted name ("model.language_model.layers.self_attn.q_proj.weight")."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)


def _is_stacked(name: str) -> bool:
    """Inside a stacked list: a list name not followed by a layer index (unstacked: "layers.3.")."""
    parts = name.split(".")
    return any(part in STACKED_LIST_NAMES and not (i + 1 < len(parts) and parts[i + 1].isdigit())
               for i, part in enumerate(parts))


def _unstacked_lengths(params) -> dict[str, int]:
    """Dotted prefix of each unstacked layer list (e.g. "model.language_model.layers") -> its length."""
    lengths: dict[str, int] = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        parts = path_to_name(path).split(".")
        for i, part in enumerate(parts[:-1]):
            if part in STACKED_LIST_NAMES and parts[i + 1].isdigit():
                prefix = ".".join(parts[:i + 1])
                lengths[prefix] = max(lengths.get(prefix, 0), int(parts[i + 1]) + 1)
    return lengths


def _list_length(name: str, lengths: dict[str, int]) -> int:
    """How many layers share a leaf of this name (1 outside unstacked lists)."""
    return math.prod(n for prefix, n in lengths.items() if name.startswith(prefix + "."))


def param_partition_spec(name: str, shape: tuple[int, ...], mesh: Mesh,
                         min_sharded_size: int = MIN_SHARDED_SIZE,
                         list_length: int = 1) -> tuple[P, list[str]]:
    """PartitionSpec for one param (by dotted name and shape) + notes about fallbacks.
    list_length: for a leaf of an unstacked list, the list's length (the threshold then sees the
    stacked leaf's size, so both layouts get the same spec)."""
    axes: list[Any] = [None] * len(shape)
    notes: list[str] = []
    first = 1 if _is_stacked(name) and len(shape) >= 1 else 0  # stacked layer axis: never split
    inner = list(range(first, len(shape)))
    if not inner or math.prod(shape) * list_length < min_sharded_size:
        return P(*axes), notes
    tensor_size, fsdp_size = mesh.shape["tensor"], mesh.shape["fsdp"]

    if tensor_size > 1 and not LORA_LEAF.search(name):
        for pattern, dim in TENSOR_PARALLEL_RULES:
            if re.search(pattern, name):
                dim = len(shape) + dim
                if dim < first:
                    break
                if shape[dim] % tensor_size == 0:
                    axes[dim] = "tensor"
                else:
                    notes.append(f"dim {dim} (size {shape[dim]}) not divisible by "
                                 f"tensor={tensor_size}: replicated")
                break

    if fsdp_size > 1 and len(inner) >= 2:
        free = [d for d in inner if axes[d] is None]
        # The major-most dim it divides: gathers and reduce-scatters then move contiguous row blocks (a minor
        # dim makes XLA transpose around each collective: 19 ms of copies per 2-GPU 2B step, session 8).
        # LoRA factors [r, in] / [out, r]: the largest dim, never the tiny rank.
        order = sorted(free, key=lambda d: (shape[d], d), reverse=True) if LORA_LEAF.search(name) else free
        for dim in order:
            if shape[dim] % fsdp_size == 0:
                axes[dim] = "fsdp"
                break
        else:
            notes.append(f"no dim of {tuple(shape[d] for d in free)} divisible by "
                         f"fsdp={fsdp_size}: replicated over fsdp")
    return P(*axes), notes


def param_partition_specs(params, mesh: Mesh, min_sharded_size: int = MIN_SHARDED_SIZE):
    """Tree of PartitionSpecs mirroring `params` (also works for optimizer states holding
    param-shaped trees: the rules match path suffixes). Logs the replication fallbacks."""
    fallbacks, lengths = [], _unstacked_lengths(params)

    def spec(path, leaf):
        name = path_to_name(path)
        pspec, notes = param_partition_spec(name, tuple(np.shape(leaf)), mesh, min_sharded_size,
                                            _list_length(name, lengths))
        fallbacks.extend(f"{name} {tuple(np.shape(leaf))}: {note}" for note in notes)
        return pspec
    specs = jax.tree_util.tree_map_with_path(spec, params)
    if fallbacks:
        logger.warning("sharding: %d params partly replicated because a mesh axis does not "
                       "divide their dims:\n  %s", len(fallbacks), "\n  ".join(fallbacks))
    return specs


def param_shardings(params, mesh: Mesh, min_sharded_size: int = MIN_SHARDED_SIZE):
    """Tree of NamedShardings for params (for jit in_shardings/out_shardings)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s),
                        param_partition_specs(params, mesh, min_sharded_size),
                        is_leaf=lambda x: isinstance(x, P))


def shard_params(params, mesh: Mesh, min_sharded_size: int = MIN_SHARDED_SIZE):
    """Place every param on the mesh by the rules above."""
    return jax.device_put(params, param_shardings(params, mesh, min_sharded_size))


def describe_param_sharding(params, mesh: Mesh,
                            min_sharded_size: int = MIN_SHARDED_SIZE) -> list[str]:
    """Human-readable lines 'name shape -> spec [notes]' (what got split, what fell back)."""
    lines, lengths = [], _unstacked_lengths(params)

    def visit(path, leaf):
        name = path_to_name(path)
        pspec, notes = param_partition_spec(name, tuple(np.shape(leaf)), mesh, min_sharded_size,
                                            _list_length(name, lengths))
        lines.append(f"{name} {tuple(np.shape(leaf))} -> {pspec}"
                     + (f"  [{'; '.join(notes)}]" if notes else ""))
        return leaf
    jax.tree_util.tree_map_with_path(visit, params)
    return lines


def is_vision_shard_key(key: str) -> bool:
    """Arrays with a leading batch-shard axis (models.inputs.make_batch): pixel_values and the vision_* metadata."""
    return key == "pixel_values" or key.startswith("vision_")


def batch_partition_spec(key: str, shape: tuple[int, ...], batch_size: int,
                         seq_len: int | None) -> P:
    """Per-token arrays [B, L, ...], `target_positions` [B, T] and per-row arrays [B] (make_batch's scalar
    extras) split dim 0 over (data, fsdp); M-RoPE `position_ids` [3, B, L] split dim 1; the vision arrays
    (pixel_values [S, P_s, D], vision_* [S, ...]) split their batch-shard axis S, dim 0, over (data, fsdp) too,
    so each device holds its own rows' images (`batch_shardings` checks that the mesh divides S);
    `image_grid_thw` (host side) and anything else is replicated."""
    if is_vision_shard_key(key):
        return P(BATCH_MESH_AXES)
    if key == "image_grid_thw":
        return P()
    if len(shape) >= 2 and shape[:2] == (batch_size, seq_len):
        return P(BATCH_MESH_AXES)
    if key == "target_positions" and shape[:1] == (batch_size,):  # [B, T], T <= L: per row like the tokens
        return P(BATCH_MESH_AXES)
    if shape == (batch_size,):
        return P(BATCH_MESH_AXES)
    if len(shape) >= 3 and shape[0] == 3 and shape[1:3] == (batch_size, seq_len):
        return P(None, BATCH_MESH_AXES)
    return P()


def _check_vision_shards(batch: dict, split: int) -> None:
    """Every vision array has the same number S of batch shards, and data*fsdp divides it."""
    shards = {key: int(np.shape(value)[0]) for key, value in batch.items() if is_vision_shard_key(key)}
    counts = set(shards.values())
    if len(counts) > 1:
        raise ValueError(f"the vision arrays disagree on the number of batch shards (leading axis): {shards}; "
                         "build them together with models.make_batch")
    if counts and next(iter(counts)) % split:
        num_shards = next(iter(counts))
        raise ValueError(f"the batch has {num_shards} vision batch shard(s) (pixel_values' leading axis) but the "
                         f"mesh splits the batch over data*fsdp={split} devices; build it with "
                         f"models.make_batch(..., num_shards={split}) (or a multiple of {split}), so each "
                         "device holds its own rows' images")


def batch_shardings(batch: dict, mesh: Mesh, extra_batch_keys: tuple[str, ...] = ()) -> dict:
    """NamedShardings for a model batch dict (see `batch_partition_spec`). `extra_batch_keys`
    names other arrays with leading dim B (e.g. [B, K] per-row features) to split as well.
    B must divide by data*fsdp (pad the batch otherwise), and so must the vision arrays' batch shards S."""
    if "input_ids" not in batch:
        raise ValueError(f"batch needs 'input_ids' [B, L] to find the batch size; keys: "
                         f"{sorted(batch)}")
    batch_size, seq_len = np.shape(batch["input_ids"])
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % split:
        raise ValueError(f"batch size {batch_size} is not divisible by data*fsdp={split}; pad "
                         f"the batch to a multiple of {split} rows (padding rows have "
                         f"segment_ids 0) or change the mesh")
    _check_vision_shards(batch, split)
    out = {}
    for key, value in batch.items():
        shape = tuple(np.shape(value))
        if key in extra_batch_keys:
            if not shape or shape[0] != batch_size:
                raise ValueError(f"batch[{key!r}] has shape {shape}; extra_batch_keys need "
                                 f"leading dim B={batch_size}")
            spec = P(BATCH_MESH_AXES)
        else:
            spec = batch_partition_spec(key, shape, batch_size, seq_len)
        out[key] = NamedSharding(mesh, spec)
    return out


def stacked_batch_shardings(batches: dict, mesh: Mesh) -> dict:
    """NamedShardings for stacked micro-batches [A, ...]: each micro-batch placed like a model batch
    (`batch_shardings`), the leading micro-batch axis whole."""
    inner = batch_shardings({k: v[0] for k, v in batches.items()}, mesh)
    return {k: NamedSharding(mesh, P(None, *inner[k].spec)) for k in batches}


def shard_batch(batch: dict, mesh: Mesh, extra_batch_keys: tuple[str, ...] = ()) -> dict:
    """Place a batch dict (numpy or jax arrays) on the mesh."""
    return jax.device_put(dict(batch), batch_shardings(batch, mesh, extra_batch_keys))


def gathered_once(tree, mesh: Mesh):
    """`tree` (params placed by `param_shardings`) replicated on every device for the rest of the step: one
    all-gather per leaf, kept for the backward (PyTorch FSDP's SHARD_GRAD_OP), instead of XLA's gathers at
    every use. The gradient goes back to each leaf's own sharding, so XLA reduce-scatters it; the plain
    transpose of a replicating sharding constraint would all-reduce it (twice the bytes) and slice."""
    own = param_shardings(tree, mesh)

    @jax.custom_vjp
    def gather(t):
        return jax.lax.with_sharding_constraint(t, replicated(mesh))

    def gather_fwd(t):
        return gather(t), None

    def gather_bwd(_, cotangent):
        return (jax.lax.with_sharding_constraint(cotangent, own),)

    gather.defvjp(gather_fwd, gather_bwd)
    return gather(tree)


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding for scalars / small things every device holds (loss, metrics, step counter)."""
    return NamedSharding(mesh, P())
