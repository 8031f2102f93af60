"""LoRA as a functional overlay on the params tree, merge, and PEFT-format export/import.

A LoRA tree mirrors the params tree down to each adapted linear module:
  lora["model"]["language_model"]["layers"]["self_attn"]["q_proj"] = {"lora_A": [L, r, in],
                                                                      "lora_B": [L, out, r]}
(stacked lists keep their leading layer axis; unstacked modules such as lm_head have [r, in] /
[out, r]). `overlay` inserts lora_A / lora_B / lora_scale (= alpha / rank, [L] for stacked
modules so lax.scan can slice it) into the module dicts, where `layers.linear` and
`qwen_vl.unembed` apply y += scale * (x A^T) B^T. Differentiate the loss w.r.t. the LoRA tree
only: `loss(overlay(params, lora, cfg))`.

Targets (LoraConfig.targets): "attention" (q/k/v/o_proj; vision attn.qkv/attn.proj), "mlp"
(gate/up/down_proj; vision block MLPs), "merger" (vision merger + DeepStack mergers), "unembed"
(lm_head, also on tied-embedding models), or a module name / dotted suffix ("q_proj",
"self_attn.o_proj", "visual.merger.linear_fc1"). Vision modules only with include_vision=True.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_vl.models.layout import is_unstacked, stack_layers, unstack_layers

STACKED_LISTS = ("layers", "blocks", "deepstack_merger_list")
NOT_LINEAR = ("embed_tokens", "pos_embed", "patch_embed")  # embeddings / conv: never adapted
CATEGORY_PATTERNS = {
    "attention": r"(language_model\.layers\.self_attn\.[qkvo]_proj|visual\.blocks\.attn\.(qkv|proj))$",
    "mlp": r"(language_model\.layers\.mlp|visual\.blocks\.mlp)\.[a-z_0-9]+$",
    "merger": r"visual\.(merger|deepstack_merger_list)\.",
    "unembed": r"^lm_head$",
}
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
OUR_CONFIG_FILE = "jaxrl_vl_lora.json"
_HF_CLASS = {"qwen3_vl": "Qwen3VLForConditionalGeneration",
             "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 32
    alpha: float = 32.0  # Tinker's convention (alpha is not on its wire)
    targets: tuple[str, ...] = ("attention", "mlp")
    include_vision: bool = False

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be >= 1, got {self.rank}")
        if not self.targets:
            raise ValueError("LoraConfig.targets is empty; use e.g. ('attention', 'mlp')")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_config_from_tinker(rank: int, train_attn: bool = True, train_mlp: bool = True,
                            train_unembed: bool = True, alpha: float = 32.0) -> LoraConfig:
    """Tinker's create_model LoRA request -> LoraConfig (language model only, as Tinker)."""
    targets = tuple(name for name, on in (("attention", train_attn), ("mlp", train_mlp),
                                          ("unembed", train_unembed)) if on)
    if not targets:
        raise ValueError("LoRA request trains nothing: set one of train_attn/train_mlp/"
                         "train_unembed")
    return LoraConfig(rank=rank, alpha=alpha, targets=targets)


def _is_stacked(path: tuple[str, ...]) -> bool:
    return any(part in STACKED_LISTS for part in path)


def _is_vision(path: tuple[str, ...]) -> bool:
    return "visual" in path


def _linear_modules(params: dict, prefix: tuple[str, ...] = ()):
    """Yield (path, weight shape) of every linear module ({"weight": [..., out, in]})."""
    for key, value in params.items():
        path = prefix + (key,)
        if not isinstance(value, dict):
            continue
        weight = value.get("weight")
        if weight is not None and not isinstance(weight, dict) and key not in NOT_LINEAR:
            if np.ndim(weight) == 2 + int(_is_stacked(path)):
                yield path, tuple(np.shape(weight))
        yield from _linear_modules(value, path)


def _matches(target: str, dotted: str) -> bool:
    if target in CATEGORY_PATTERNS:
        return re.search(CATEGORY_PATTERNS[target], dotted) is not None
    return dotted == target or dotted.endswith("." + target)


def target_modules(params: dict, cfg: LoraConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Adapted modules: path -> base weight shape ([L,] out, in). Each target must match one.

    With tied embeddings (no params["lm_head"]), "unembed" adapts a virtual lm_head whose shape
    is the token embedding's [V, H]."""
    modules = {p: s for p, s in _linear_modules(params)
               if cfg.include_vision or not _is_vision(p)}
    if "lm_head" not in params:  # tied embeddings
        embed = params.get("model", {}).get("language_model", {}).get("embed_tokens", {})
        if "weight" in embed:
            modules[("lm_head",)] = tuple(np.shape(embed["weight"]))
    chosen = {}
    for target in cfg.targets:
        hits = {p: s for p, s in modules.items() if _matches(target, ".".join(p))}
        if not hits:
            hint = "" if cfg.include_vision else " (vision modules need include_vision=True)"
            raise ValueError(f"LoRA target {target!r} matches no linear module{hint}; use "
                             f"{sorted(CATEGORY_PATTERNS)} or a module name such as 'q_proj'")
        chosen.update(hits)
    return dict(sorted(chosen.items()))


def init_lora(params: dict, cfg: LoraConfig, rng: jax.Array) -> dict:
    """LoRA tree for `params`: lora_A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform with
    a=sqrt(5)), lora_B = 0, so the overlaid model starts equal to the base model. fp32.
    Unstacked params (models.layout) get an unstacked LoRA tree with the same values."""
    if is_unstacked(params):  # the module walk below reads stacked shapes: use the stacked shapes
        return unstack_layers(init_lora(jax.eval_shape(stack_layers, params), cfg, rng))
    lora: dict = {}
    for path, shape in target_modules(params, cfg).items():
        *layers, out_dim, in_dim = shape
        key = jax.random.fold_in(rng, zlib.crc32(".".join(path).encode()) & 0x7FFFFFFF)
        bound = 1.0 / np.sqrt(in_dim)
        module = {
            "lora_A": jax.random.uniform(key, (*layers, cfg.rank, in_dim), jnp.float32,
                                         -bound, bound),
            "lora_B": jnp.zeros((*layers, out_dim, cfg.rank), jnp.float32),
        }
        _set(lora, path, module)
    return lora


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _lora_modules(lora, prefix: tuple = ()):
    """Yield (path, {"lora_A", "lora_B"}) for every module of a LoRA tree. A list of layers (the unstacked
    layout, models.layout) contributes the layer's index to the path."""
    for key, value in (enumerate(lora) if isinstance(lora, list) else lora.items()):
        if isinstance(value, dict) and "lora_A" in value:
            yield prefix + (key,), value
        else:
            yield from _lora_modules(value, prefix + (key,))


def overlay(params: dict, lora: dict, cfg: LoraConfig) -> dict:
    """params with lora_A / lora_B / lora_scale inserted into each adapted module. Only the dicts
    on the way to adapted modules are copied; base arrays are shared (no memory copy)."""
    def insert(p: dict, lo: dict, path: tuple[str, ...]) -> dict:
        if isinstance(lo, list) or isinstance(p, list):  # unstacked layout (models.layout): one tree per layer
            if not (isinstance(lo, list) and isinstance(p, list) and len(p) == len(lo)):
                raise ValueError(f"{'.'.join(path)!r}: LoRA tree and params differ in layout (stacked vs a "
                                 "list of layers); convert both alike with models.stack_layers/unstack_layers")
            return [insert(pi, li, path + (str(i),)) for i, (pi, li) in enumerate(zip(p, lo))]
        out = dict(p)
        for key, sub in lo.items():
            if "lora_A" in sub:
                module = dict(p.get(key, {}))
                stacked_shape = np.shape(sub["lora_A"])[:-2]
                module["lora_A"], module["lora_B"] = sub["lora_A"], sub["lora_B"]
                module["lora_scale"] = jnp.full(stacked_shape, cfg.scale, jnp.float32)
                out[key] = module
            else:
                if key not in p:
                    raise ValueError(f"LoRA module {'.'.join(path + (key,))!r} is not in params")
                out[key] = insert(p[key], sub, path + (key,))
        return out
    return insert(params, lora, ())


def _delta(module: dict, scale: float) -> jax.Array:
    """scale * B @ A, per stacked layer: [..., out, r] @ [..., r, in] -> [..., out, in]."""
    return scale * jnp.matmul(module["lora_B"].astype(jnp.float32),
                              module["lora_A"].astype(jnp.float32))


def merge(params: dict, lora: dict, cfg: LoraConfig, *, untie_embeddings: bool = False) -> dict:
    """Plain params with W <- W + (alpha/r) B A (same dtype as W). No LoRA keys remain.

    An "unembed" adapter on a tied-embedding model cannot be folded into the shared table (it
    would change the input embedding too): pass untie_embeddings=True to get an explicit
    lm_head.weight = embed + delta, and use the config with tie_word_embeddings=False."""
    out = jax.tree_util.tree_map(lambda x: x, params)  # fresh dict structure, shared arrays
    for path, module in _lora_modules(lora):
        node = out
        for part in path[:-1]:
            node = node[part]
        base = node.get(path[-1], {})
        if "weight" not in base:
            if path != ("lm_head",):
                raise ValueError(f"LoRA module {'.'.join(path)!r} has no base weight in params")
            if not untie_embeddings:
                raise ValueError("LoRA on lm_head of a tied-embedding model: merge(..., "
                                 "untie_embeddings=True) and set tie_word_embeddings=False in "
                                 "the model config to use the merged params")
            base = {"weight": out["model"]["language_model"]["embed_tokens"]["weight"]}
        weight = base["weight"]
        node[path[-1]] = {**base, "weight": (weight.astype(jnp.float32)
                                             + _delta(module, cfg.scale)).astype(weight.dtype)}
    return out


def _hf_module_names(path: tuple[str, ...], num_layers: int | None) -> list[str]:
    """Our path -> the HF module name per stacked layer (layer index after the list's name)."""
    stacked_at = next((i for i, p in enumerate(path) if p in STACKED_LISTS), None)
    if stacked_at is None:
        return [".".join(path)]
    return [".".join(path[:stacked_at + 1] + (str(i),) + path[stacked_at + 1:])
            for i in range(num_layers)]


def export_peft(lora: dict, cfg: LoraConfig, model_config, out_dir: str, *,
                base_model_name_or_path: str | None = None, dtype=np.float32) -> str:
    """Write a PEFT LoRA adapter (adapter_model.safetensors + adapter_config.json) that
    `peft.PeftModel.from_pretrained(hf_model, out_dir)` and vLLM's LoRA loader read. Tensor
    names: base_model.model.<transformers-5 module name>.lora_{A,B}.weight, e.g.
    base_model.model.model.language_model.layers.3.self_attn.q_proj.lora_A.weight [r, in]."""
    from safetensors.numpy import save_file

    lora = stack_layers(jax.device_get(lora))  # unstacked layers: stacked on the host (the adapter is small)
    tensors: dict[str, np.ndarray] = {}
    short_names: set[str] = set()
    touches_vision = False
    for path, module in _lora_modules(lora):
        a = np.asarray(module["lora_A"], dtype=dtype)
        b = np.asarray(module["lora_B"], dtype=dtype)
        stacked = _is_stacked(path)
        names = _hf_module_names(path, a.shape[0] if stacked else None)
        for i, name in enumerate(names):
            tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(
                a[i] if stacked else a)
            tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(
                b[i] if stacked else b)
        short_names.add(path[-1])
        touches_vision |= _is_vision(path)
    if not tensors:
        raise ValueError("export_peft: the LoRA tree is empty")
    # PEFT matches target_modules by module-name suffix; names shared with modules we did not
    # adapt (e.g. Qwen2.5-VL vision gate_proj) would get extra zero adapters, so list the exact
    # module names as a regex (full match), which PEFT and vLLM both accept.
    exact = sorted({name for key in tensors
                    for name in [key[len("base_model.model."):].rsplit(".lora_", 1)[0]]})
    target_regex = "^(" + "|".join(re.escape(n) for n in exact) + ")$"
    adapter_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "auto_mapping": {"base_model_class": _HF_CLASS.get(model_config.arch),
                         "parent_library": f"transformers.models.{model_config.arch}."
                                           f"modeling_{model_config.arch}"},
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": 0.0,
        "target_modules": target_regex,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    # Our own config beside PEFT's (PEFT and vLLM read only adapter_config.json).
    ours = {"rank": cfg.rank, "alpha": cfg.alpha, "targets": list(cfg.targets),
            "include_vision": cfg.include_vision, "adapted_modules": sorted(short_names),
            "touches_vision": touches_vision}
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(out_dir, PEFT_CONFIG_FILE), "w") as f:
        json.dump(adapter_config, f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, OUR_CONFIG_FILE), "w") as f:
        json.dump(ours, f, indent=2, sort_keys=True)
    return out_dir


def import_peft(adapter_dir: str) -> tuple[dict, LoraConfig]:
    """Read a PEFT LoRA adapter (ours or peft's) back into (LoRA tree, LoraConfig). Layers of
    stacked lists are re-stacked; every layer of a list must be present."""
    from safetensors.numpy import load_file

    config_path = os.path.join(adapter_dir, PEFT_CONFIG_FILE)
    weights_path = os.path.join(adapter_dir, PEFT_WEIGHTS_FILE)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"PEFT adapter file missing: {path}")
    with open(config_path) as f:
        peft_config = json.load(f)
    unsupported = {k: peft_config.get(k) for k in ("use_dora", "use_rslora", "rank_pattern",
                                                    "alpha_pattern") if peft_config.get(k)}
    if peft_config.get("peft_type") != "LORA" or unsupported:
        raise ValueError(f"{config_path}: only plain LoRA adapters (one rank and alpha, "
                         f"scale alpha/r) are supported, got peft_type="
                         f"{peft_config.get('peft_type')!r} {unsupported}")
    grouped: dict[tuple[str, ...], dict[str, dict[int | None, np.ndarray]]] = {}
    pattern = re.compile(r"^base_model\.model\.(.+)\.lora_(A|B)(?:\.[^.]+)?\.weight$")
    for key, array in load_file(weights_path).items():
        match = pattern.match(key)
        if match is None:
            continue  # e.g. peft's copy of a tied lm_head base weight
        parts, index = match.group(1).split("."), None
        for i, part in enumerate(parts[:-1]):
            if part in STACKED_LISTS and parts[i + 1].isdigit():
                parts, index = parts[:i + 1] + parts[i + 2:], int(parts[i + 1])
                break
        grouped.setdefault(tuple(parts), {}).setdefault("lora_" + match.group(2), {})[index] = \
            np.asarray(array, np.float32)
    lora: dict = {}
    for path, factors in grouped.items():
        module = {}
        for name, by_index in factors.items():
            if None in by_index:
                module[name] = jnp.asarray(by_index[None])
            else:
                missing = sorted(set(range(max(by_index) + 1)) - set(by_index))
                if missing:
                    raise ValueError(f"{weights_path}: {'.'.join(path)} {name} misses layers "
                                     f"{missing}")
                module[name] = jnp.asarray(np.stack([by_index[i] for i in sorted(by_index)]))
        if set(module) != {"lora_A", "lora_B"}:
            raise ValueError(f"{weights_path}: {'.'.join(path)} needs both lora_A and lora_B")
        _set(lora, path, module)
    ours_path = os.path.join(adapter_dir, OUR_CONFIG_FILE)
    if os.path.isfile(ours_path):
        with open(ours_path) as f:
            ours = json.load(f)
        cfg = LoraConfig(rank=ours["rank"], alpha=ours["alpha"], targets=tuple(ours["targets"]),
                         include_vision=ours["include_vision"])
    else:
        cfg = LoraConfig(rank=int(peft_config["r"]), alpha=float(peft_config["lora_alpha"]),
                         targets=tuple(sorted({p[-1] for p in grouped})),
                         include_vision=any(_is_vision(p) for p in grouped))
    return lora, cfg
