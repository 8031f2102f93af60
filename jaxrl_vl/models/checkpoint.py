"""Hugging Face checkpoints <-> params trees.

In-memory params use the transformers-5 module names (`model.language_model.*`, `model.visual.*`,
`lm_head.weight`) as a nested dict, with the identical-layer lists "layers", "blocks" and
"deepstack_merger_list" stacked on axis 0. Loading accepts both the transformers-5 names and the older
published Qwen2.5-VL names (`model.layers.*`, `model.embed_tokens.*`, `visual.*`); export writes the names
transformers' own `save_pretrained` writes for the architecture (legacy names for Qwen2.5-VL, new names
for Qwen3-VL), so transformers, vLLM and this loader all read the result.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np

from jaxrl_vl.models import safetensors_io
from jaxrl_vl.models.config import ModelConfig

STACKED_LISTS = ("layers", "blocks", "deepstack_merger_list")
_IGNORED_TENSORS = re.compile(r"(rotary_emb\.inv_freq|\.rotary_pos_emb\.inv_freq)$")
_MAX_SHARD_BYTES = 4 * 1024 ** 3
_COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                 "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
                 "video_preprocessor_config.json", "processor_config.json", "generation_config.json")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model under its transformers-5 name, with its shape (layers unstacked)."""
    t, v = config.text, config.vision
    shapes: dict[str, tuple[int, ...]] = {}
    lm = "model.language_model."
    shapes[lm + "embed_tokens.weight"] = (t.vocab_size, t.hidden_size)
    q_out, kv_out = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    for i in range(t.num_hidden_layers):
        p = f"{lm}layers.{i}."
        shapes[p + "input_layernorm.weight"] = (t.hidden_size,)
        shapes[p + "post_attention_layernorm.weight"] = (t.hidden_size,)
        for name, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            shapes[f"{p}self_attn.{name}.weight"] = (out, t.hidden_size)
            if t.qkv_bias:
                shapes[f"{p}self_attn.{name}.bias"] = (out,)
        shapes[p + "self_attn.o_proj.weight"] = (t.hidden_size, q_out)
        if t.o_proj_bias:
            shapes[p + "self_attn.o_proj.bias"] = (t.hidden_size,)
        if t.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (t.head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (t.head_dim,)
        shapes[p + "mlp.gate_proj.weight"] = (t.intermediate_size, t.hidden_size)
        shapes[p + "mlp.up_proj.weight"] = (t.intermediate_size, t.hidden_size)
        shapes[p + "mlp.down_proj.weight"] = (t.hidden_size, t.intermediate_size)
    shapes[lm + "norm.weight"] = (t.hidden_size,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (t.vocab_size, t.hidden_size)
    shapes.update(_vision_shapes(config))
    return shapes


def _linear(shapes: dict, name: str, out_dim: int, in_dim: int, bias: bool = True) -> None:
    shapes[name + ".weight"] = (out_dim, in_dim)
    if bias:
        shapes[name + ".bias"] = (out_dim,)


def _vision_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    v = config.vision
    hid, inter, out = v.hidden_size, v.intermediate_size, v.out_hidden_size
    merged = hid * v.spatial_merge_size ** 2
    pre = "model.visual."
    shapes: dict[str, tuple[int, ...]] = {
        pre + "patch_embed.proj.weight": (hid, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)}
    qwen3 = config.arch == "qwen3_vl"
    if qwen3:
        shapes[pre + "patch_embed.proj.bias"] = (hid,)
        shapes[pre + "pos_embed.weight"] = (v.num_position_embeddings, hid)
    for i in range(v.depth):
        b = f"{pre}blocks.{i}."
        for norm in ("norm1", "norm2"):
            shapes[f"{b}{norm}.weight"] = (hid,)
            if qwen3:
                shapes[f"{b}{norm}.bias"] = (hid,)
        _linear(shapes, b + "attn.qkv", 3 * hid, hid)
        _linear(shapes, b + "attn.proj", hid, hid)
        if qwen3:
            _linear(shapes, b + "mlp.linear_fc1", inter, hid)
            _linear(shapes, b + "mlp.linear_fc2", hid, inter)
        else:
            _linear(shapes, b + "mlp.gate_proj", inter, hid)
            _linear(shapes, b + "mlp.up_proj", inter, hid)
            _linear(shapes, b + "mlp.down_proj", hid, inter)
    if qwen3:
        shapes[pre + "merger.norm.weight"] = (hid,)
        shapes[pre + "merger.norm.bias"] = (hid,)
        _linear(shapes, pre + "merger.linear_fc1", merged, merged)
        _linear(shapes, pre + "merger.linear_fc2", out, merged)
        for j in range(len(v.deepstack_visual_indexes)):
            d = f"{pre}deepstack_merger_list.{j}."
            shapes[d + "norm.weight"] = (merged,)
            shapes[d + "norm.bias"] = (merged,)
            _linear(shapes, d + "linear_fc1", merged, merged)
            _linear(shapes, d + "linear_fc2", out, merged)
    else:
        shapes[pre + "merger.ln_q.weight"] = (hid,)
        _linear(shapes, pre + "merger.mlp.0", merged, merged)
        _linear(shapes, pre + "merger.mlp.2", out, merged)
    return shapes


def canonical_name(name: str) -> str:
    """Map a stored tensor name to its transformers-5 name (as transformers' Qwen2-VL conversion does)."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model.") and not name.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + name[len("model."):]
    return name


def stored_name(name: str, config: ModelConfig) -> str:
    """transformers-5 name -> the name transformers' save_pretrained writes for this architecture."""
    if config.arch == "qwen2_5_vl":
        if name.startswith("model.visual."):
            return name[len("model."):]
        if name.startswith("model.language_model."):
            return "model." + name[len("model.language_model."):]
    return name


def _split_stacked(name: str) -> tuple[list[str], int | None]:
    """'a.layers.3.b' -> (['a', 'layers', 'b'], 3); names outside stacked lists -> (parts, None)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in STACKED_LISTS and parts[i + 1].isdigit():
            return parts[:i + 1] + parts[i + 2:], int(parts[i + 1])
    return parts, None


def from_hf_state_dict(state: dict, config: ModelConfig, dtype=np.float32) -> dict:
    """{HF name: array} (either naming) -> nested params with stacked lists, in `dtype` (fp32 master).

    Raises ValueError naming the tensor for a missing tensor, a wrong shape or an unexpected tensor."""
    expected = expected_shapes(config)
    canonical: dict[str, np.ndarray] = {}
    for name, array in state.items():
        cname = canonical_name(name)
        if _IGNORED_TENSORS.search(cname):
            continue
        if cname == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: transformers ties lm_head to embed_tokens and ignores a stored copy
        if cname not in expected:
            raise ValueError(f"unexpected tensor {name!r} (shape {tuple(np.shape(array))}) in checkpoint: "
                             f"not part of a {config.arch} model with this config")
        if tuple(np.shape(array)) != expected[cname]:
            raise ValueError(f"tensor {name!r} has shape {tuple(np.shape(array))} but the config expects "
                             f"{expected[cname]}")
        canonical[cname] = array
    missing = [n for n in expected if n not in canonical]
    if missing:
        raise ValueError(f"missing tensor {stored_name(missing[0], config)!r} (expected shape "
                         f"{expected[missing[0]]}); {len(missing)} missing in all")
    grouped: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    params: dict = {}
    for cname, array in canonical.items():
        parts, index = _split_stacked(cname)
        if index is None:
            _set(params, parts, np.asarray(array, dtype=dtype))
        else:
            grouped.setdefault(tuple(parts), {})[index] = array
    for parts, by_index in grouped.items():
        stacked = np.stack([np.asarray(by_index[i], dtype=dtype) for i in range(len(by_index))])
        _set(params, list(parts), stacked)
    return params


def _set(tree: dict, parts: list[str], value) -> None:
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
    tree[parts[-1]] = value


def _flatten(tree, prefix: str = "") -> dict:
    """{dotted name: leaf}; a list (unstacked layers, models.layout) names its items by index."""
    out = {}
    for key, value in (enumerate(tree) if isinstance(tree, list) else tree.items()):
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, (dict, list)):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def to_hf_state_dict(params: dict, config: ModelConfig, stored_names: bool = True) -> dict[str, np.ndarray]:
    """Nested params (layers stacked, or unstacked lists) -> {HF name: numpy array}, one tensor per layer.
    LoRA keys (lora_A/lora_B/lora_scale) are rejected: merge them first (models.lora.merge).
    stored_names=True gives the names save_pretrained writes for this architecture; False gives the
    transformers-5 module names."""
    state = {}
    for name, array in _flatten(params).items():
        if "lora_" in name:
            raise ValueError(f"params contain LoRA tensor {name!r}; merge the adapter before exporting")
        parts = name.split(".")
        stacked_at = next((i for i, p in enumerate(parts[:-1]) if p in STACKED_LISTS), None)
        array = np.asarray(array)
        if stacked_at is None or parts[stacked_at + 1].isdigit():  # not in a list, or one layer of a list
            names_arrays = [(name, array)]
        else:
            names_arrays = [(".".join(parts[:stacked_at + 1] + [str(i)] + parts[stacked_at + 1:]), array[i])
                            for i in range(array.shape[0])]
        for hf_name, value in names_arrays:
            state[stored_name(hf_name, config) if stored_names else hf_name] = value
    return state


def _resolve_dir(path_or_hub_id: str) -> str:
    if os.path.isdir(path_or_hub_id):
        return path_or_hub_id
    if os.path.exists(path_or_hub_id):
        raise ValueError(f"checkpoint path {path_or_hub_id!r} is a file; pass the model folder")
    if path_or_hub_id.startswith((".", "/")) or path_or_hub_id.count("/") != 1:
        raise FileNotFoundError(f"checkpoint folder {path_or_hub_id!r} does not exist (and is not a hub id "
                                "of the form owner/name)")
    from huggingface_hub import snapshot_download  # hub ids only; needs network (or a filled HF cache)
    try:
        return snapshot_download(path_or_hub_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"])
    except Exception as e:  # offline, unknown repo, gated, ...: say both readings of the argument
        raise FileNotFoundError(f"{path_or_hub_id!r} is not a local folder, and fetching it as a Hugging Face hub "
                                f"id failed ({type(e).__name__}: {e})") from e


def read_state_dict(folder: str) -> dict[str, np.ndarray]:
    """All tensors of a folder's safetensors (single file or sharded with an index), memory-mapped."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        weight_map = None
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder!r}")
    state: dict[str, np.ndarray] = {}
    for file in files:
        file_path = os.path.join(folder, file)
        if not os.path.exists(file_path):
            raise FileNotFoundError(f"{index_path} lists shard {file!r}, which is missing")
        for name, array in safetensors_io.read(file_path).items():
            if weight_map is not None and weight_map.get(name) != file:
                continue
            state[name] = array
    if weight_map is not None:
        absent = [n for n in weight_map if n not in state]
        if absent:
            raise ValueError(f"tensor {absent[0]!r} is listed in {index_path} under {weight_map[absent[0]]!r} "
                             "but that file does not hold it")
    return state


def load(path_or_hub_id: str, dtype=np.float32) -> tuple[ModelConfig, dict]:
    """(config, params) from a local HF folder or a hub id (downloaded when the machine has network)."""
    folder = _resolve_dir(path_or_hub_id)
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{folder!r} has no config.json")
    with open(config_path) as f:
        config = ModelConfig.from_hf_dict(json.load(f))
    return config, from_hf_state_dict(read_state_dict(folder), config, dtype)


def export(params: dict, config: ModelConfig, path: str, dtype=None, copy_from: str | None = None,
           max_shard_bytes: int = _MAX_SHARD_BYTES) -> None:
    """Write config.json + model.safetensors (sharded with model.safetensors.index.json when larger than
    max_shard_bytes) that transformers' from_pretrained loads back exactly. dtype: tensor dtype to store
    (default: as in params). copy_from: a folder whose tokenizer/processor/generation files are copied."""
    os.makedirs(path, exist_ok=True)
    state = to_hf_state_dict(params, config)
    if dtype is not None:
        state = {k: np.asarray(v).astype(dtype) for k, v in state.items()}
    hf_config = config.to_hf_dict()
    hf_config["dtype"] = safetensors_io.dtype_name(next(iter(state.values())).dtype)
    hf_config.pop("torch_dtype", None)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    shards: list[dict] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    for stale in os.listdir(path):
        if stale.endswith(".safetensors") or stale == "model.safetensors.index.json":
            os.remove(os.path.join(path, stale))
    if len(shards) == 1:
        safetensors_io.write(os.path.join(path, "model.safetensors"), shards[0])
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            safetensors_io.write(os.path.join(path, file), shard)
            weight_map.update({name: file for name in shard})
        total = sum(v.nbytes for v in state.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    if copy_from:
        for file in _COPIED_FILES:
            source = os.path.join(copy_from, file)
            if os.path.exists(source) and os.path.abspath(source) != os.path.abspath(os.path.join(path, file)):
                shutil.copyfile(source, os.path.join(path, file))
