"""Model configuration for Qwen3-VL and Qwen2.5-VL, read from / written to Hugging Face config dicts.

Two HF layouts are accepted:
  * transformers >= 4.5x / 5.x nested layout: `text_config` and `vision_config` sub-dicts
    (rope settings as `rope_parameters` or the older `rope_scaling` + `rope_theta`).
  * the flat Qwen2.5-VL layout published with transformers 4.41 (text fields at the top level,
    `rope_scaling: {"type": "mrope", "mrope_section": [...]}`).
The configs are frozen, hashable dataclasses so they can be static arguments of jitted functions.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

SUPPORTED_ARCHS = ("qwen3_vl", "qwen2_5_vl")
_ARCH_BY_CLASS = {
    "Qwen3VLForConditionalGeneration": "qwen3_vl",
    "Qwen3VLModel": "qwen3_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
    "Qwen2_5_VLModel": "qwen2_5_vl",
}
_ARCH_CLASS = {"qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
_DEFAULT_MROPE_SECTION = {"qwen3_vl": (24, 20, 20), "qwen2_5_vl": (16, 24, 24)}
_DEFAULT_THETA = {"qwen3_vl": 500000.0, "qwen2_5_vl": 1000000.0}
# Defaults of the transformers config classes, used for fields a config.json leaves out (so a file that
# transformers accepts builds the same model here).
_TEXT_DEFAULTS = {
    "qwen3_vl": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                     num_attention_heads=32, head_dim=128, hidden_act="silu", max_position_embeddings=128000,
                     rms_norm_eps=1e-6),
    "qwen2_5_vl": dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, hidden_act="silu",
                       max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=4096,
                       max_window_layers=80),
}
_VISION_DEFAULTS = {
    "qwen3_vl": dict(depth=27, hidden_size=1152, hidden_act="gelu_pytorch_tanh", intermediate_size=4304,
                     num_heads=16, patch_size=16, out_hidden_size=3584, num_position_embeddings=2304,
                     deepstack_visual_indexes=(8, 16, 24)),
    "qwen2_5_vl": dict(depth=32, hidden_size=3584, hidden_act="silu", intermediate_size=3420, num_heads=16,
                       patch_size=14, out_hidden_size=3584, window_size=112, tokens_per_second=4,
                       fullatt_block_indexes=(7, 15, 23, 31)),
}


@dataclasses.dataclass(frozen=True)
class TextConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    mrope_interleaved: bool = False  # Qwen3-VL: True
    rope_type: str = "default"  # "default" | "linear" | "yarn" (transformers' rope_parameters.rope_type)
    rope_scaling: tuple = ()  # sorted (key, value) pairs: factor, beta_fast, ... for linear / yarn
    qkv_bias: bool = False  # Qwen2.5-VL: True (architectural)
    o_proj_bias: bool = False  # Qwen3-VL: equals attention_bias
    qk_norm: bool = False  # Qwen3-VL: RMSNorm over head_dim on q and k
    max_position_embeddings: int = 128000
    # Qwen2.5-VL only: layers with index >= max_window_layers use a sliding window when enabled.
    sliding_window: int | None = None
    max_window_layers: int = 0

    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: True where the layer uses sliding-window attention (as transformers' layer_types)."""
        return tuple(self.sliding_window is not None and i >= self.max_window_layers
                     for i in range(self.num_hidden_layers))


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    arch: str
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    hidden_act: str
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    rope_theta: float = 10000.0  # vision 2-D rotary base (HF vision_config.rope_parameters.rope_theta)
    # Qwen3-VL only
    num_position_embeddings: int = 0
    deepstack_visual_indexes: tuple[int, ...] = ()
    # Qwen2.5-VL only
    window_size: int = 0
    fullatt_block_indexes: tuple[int, ...] = ()
    tokens_per_second: int = 0

    @property
    def patch_dim(self) -> int:
        """Length of one flattened pixel patch: C * T * p * p."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: Any = None
    # The HF dict this config was read from (JSON text), kept so export writes back every field,
    # including ones this code does not interpret. Not part of equality / hashing.
    hf_json: str = dataclasses.field(default="", compare=False, hash=False, repr=False)

    @staticmethod
    def from_hf_dict(d: dict) -> "ModelConfig":
        return from_hf_dict(d)

    def to_hf_dict(self) -> dict:
        return to_hf_dict(self)

    @property
    def num_deepstack_layers(self) -> int:
        return len(self.vision.deepstack_visual_indexes) if self.arch == "qwen3_vl" else 0


def _field(d: dict, key: str, defaults: dict, where: str):
    """d[key], else the transformers class default; error naming the field when neither exists."""
    if d.get(key) is not None:
        return d[key]
    if key in defaults:
        return defaults[key]
    raise ValueError(f"config {where}: missing required field {key!r}")


def detect_arch(d: dict) -> str:
    """Architecture from `model_type` (or `architectures`); clear error naming the field when unknown."""
    model_type = d.get("model_type")
    if model_type in SUPPORTED_ARCHS:
        return model_type
    for cls in d.get("architectures") or ():
        if cls in _ARCH_BY_CLASS:
            return _ARCH_BY_CLASS[cls]
    raise ValueError(
        f"unknown architecture: config field model_type={model_type!r}, architectures={d.get('architectures')!r}; "
        f"supported model_type values are {list(SUPPORTED_ARCHS)} "
        f"(architectures {sorted(_ARCH_BY_CLASS)})")


ROPE_TYPES = ("default", "linear", "yarn")
_ROPE_EXTRA_KEYS = ("factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                    "original_max_position_embeddings", "truncate")


def _rope_settings(t: dict, arch: str):
    """(theta, mrope_section, interleaved, rope_type, extra scaling params as sorted (key, value) pairs)."""
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope_type = "default" if rope_type == "mrope" else rope_type
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"config text_config.rope_parameters.rope_type={rope_type!r} is not supported; "
                         f"implemented: {list(ROPE_TYPES)}")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("config text_config.rope_parameters.partial_rotary_factor != 1 is not supported")
    theta = rope.get("rope_theta", t.get("rope_theta", _DEFAULT_THETA[arch]))
    section = tuple(int(s) for s in rope.get("mrope_section", _DEFAULT_MROPE_SECTION[arch]))
    # transformers' Qwen3-VL rotary always interleaves (it never reads mrope_interleaved); Qwen2.5-VL never does
    interleaved = arch == "qwen3_vl"
    extra = {k: rope[k] for k in _ROPE_EXTRA_KEYS if rope.get(k) is not None}
    if rope_type == "yarn":
        extra.setdefault("original_max_position_embeddings", int(t.get("max_position_embeddings") or
                                                                 _TEXT_DEFAULTS[arch]["max_position_embeddings"]))
    if rope_type in ("linear", "yarn") and "factor" not in extra:
        raise ValueError(f"config text_config.rope_parameters: rope_type={rope_type!r} needs 'factor'")
    return float(theta), section, interleaved, rope_type, tuple(sorted(extra.items()))


def _text_config(t: dict, arch: str) -> TextConfig:
    defaults = _TEXT_DEFAULTS[arch]

    def get(key):
        return _field(t, key, defaults, "text_config")

    hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    kv_heads = int(t["num_key_value_heads"]) if t.get("num_key_value_heads") is not None else (
        int(defaults.get("num_key_value_heads", heads)) if "num_key_value_heads" not in t else heads)
    theta, section, interleaved, rope_type, rope_extra = _rope_settings(t, arch)
    if arch == "qwen3_vl":
        head_dim = int(t.get("head_dim") or defaults["head_dim"])
        attention_bias = bool(t.get("attention_bias", False))
        qkv_bias, o_bias, qk_norm = attention_bias, attention_bias, True
        sliding, max_window_layers = None, 0
    else:
        # transformers' Qwen2.5-VL attention always uses hidden_size // num_heads (ignores head_dim).
        head_dim = hidden // heads
        qkv_bias, o_bias, qk_norm = True, False, False
        sliding = get("sliding_window") if t.get("use_sliding_window", False) else None
        max_window_layers = int(get("max_window_layers"))
        num_layers = int(get("num_hidden_layers"))
        if t.get("layer_types") not in (None, [], ()):
            expected = ["sliding_attention" if sliding is not None and i >= max_window_layers else "full_attention"
                        for i in range(num_layers)]
            if list(t["layer_types"]) != expected:
                raise ValueError(f"config text_config.layer_types={t['layer_types']!r} differs from the pattern "
                                 f"implied by use_sliding_window/max_window_layers; custom layer_types unsupported")
    # Qwen2.5-VL splits the frequencies by mrope_section (must tile head_dim/2 exactly); Qwen3-VL's
    # interleaved layout only reads H/W below 3*section and leaves the rest to T, so any section works.
    if head_dim % 2 or (not interleaved and sum(section) != head_dim // 2):
        raise ValueError(f"config text_config.rope_parameters.mrope_section={list(section)} must sum to "
                         f"head_dim/2={head_dim // 2}")
    if heads % kv_heads:
        raise ValueError(f"config text_config.num_attention_heads={heads} must be a multiple of "
                         f"num_key_value_heads={kv_heads}")
    _check_activation(get("hidden_act"), "text_config")
    return TextConfig(
        arch=arch, vocab_size=int(get("vocab_size")), hidden_size=hidden,
        intermediate_size=int(get("intermediate_size")), num_hidden_layers=int(get("num_hidden_layers")),
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, hidden_act=get("hidden_act"),
        rms_norm_eps=float(get("rms_norm_eps")), rope_theta=theta, mrope_section=section,
        rope_type=rope_type, rope_scaling=rope_extra,
        mrope_interleaved=interleaved, qkv_bias=qkv_bias, o_proj_bias=o_bias, qk_norm=qk_norm,
        max_position_embeddings=int(get("max_position_embeddings")),
        sliding_window=None if sliding is None else int(sliding), max_window_layers=max_window_layers)


def _check_activation(name: str, where: str) -> None:
    from jaxrl_vl.models.layers import activation
    try:
        activation(name)
    except ValueError as e:
        raise ValueError(f"config {where}.hidden_act: {e}") from None


def _int_field(v: dict, key: str, default: int) -> int:
    value = v.get(key) if v.get(key) is not None else default
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"config vision_config.{key}={value!r}: non-square values are not supported")
        value = value[0]
    return int(value)


def _vision_config(v: dict, arch: str) -> VisionConfig:
    defaults = _VISION_DEFAULTS[arch]

    def get(key):
        return _field(v, key, defaults, "vision_config")

    common = dict(
        arch=arch, depth=int(get("depth")), hidden_size=int(get("hidden_size")),
        intermediate_size=int(get("intermediate_size")), num_heads=int(get("num_heads")),
        out_hidden_size=int(get("out_hidden_size")), hidden_act=get("hidden_act"),
        in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
        patch_size=_int_field(v, "patch_size", defaults["patch_size"]),
        spatial_merge_size=_int_field(v, "spatial_merge_size", 2),
        temporal_patch_size=_int_field(v, "temporal_patch_size", 2),
        rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", v.get("rope_theta", 10000.0))))
    _check_activation(common["hidden_act"], "vision_config")
    if common["hidden_size"] % common["num_heads"]:
        raise ValueError(f"config vision_config.hidden_size={common['hidden_size']} must be a multiple of "
                         f"num_heads={common['num_heads']}")
    if arch == "qwen3_vl":
        return VisionConfig(**common, num_position_embeddings=int(get("num_position_embeddings")),
                            deepstack_visual_indexes=tuple(int(i) for i in get("deepstack_visual_indexes")))
    return VisionConfig(**common, window_size=int(get("window_size")),
                        fullatt_block_indexes=tuple(int(i) for i in get("fullatt_block_indexes")),
                        tokens_per_second=int(get("tokens_per_second")))


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def from_hf_dict(d: dict) -> ModelConfig:
    """ModelConfig from a HF config.json dict (nested transformers-5 layout or flat Qwen2.5-VL 4.x layout)."""
    arch = detect_arch(d)
    if "vision_config" not in d:
        raise ValueError("config: missing required field 'vision_config'")
    text_dict = d.get("text_config")
    if text_dict is None:
        if arch != "qwen2_5_vl":
            raise ValueError("config: missing required field 'text_config'")
        text_dict = d  # flat 4.x Qwen2.5-VL layout: text fields live at the top level
    text = _text_config(text_dict, arch)
    vision = _vision_config(d["vision_config"], arch)
    if vision.out_hidden_size != text.hidden_size:
        raise ValueError(f"config vision_config.out_hidden_size={vision.out_hidden_size} must equal "
                         f"text_config.hidden_size={text.hidden_size}")
    tie = bool(d.get("tie_word_embeddings", False))
    if arch == "qwen2_5_vl" and text_dict.get("tie_word_embeddings", False):
        tie = True  # Qwen2_5_VLConfig.__post_init__ ties when the text config asks for it
    return ModelConfig(
        arch=arch, text=text, vision=vision,
        image_token_id=int(d.get("image_token_id", 151655)), video_token_id=int(d.get("video_token_id", 151656)),
        vision_start_token_id=int(d.get("vision_start_token_id", 151652)),
        vision_end_token_id=int(d.get("vision_end_token_id", 151653)), tie_word_embeddings=tie,
        pad_token_id=text_dict.get("pad_token_id", d.get("pad_token_id")),
        bos_token_id=text_dict.get("bos_token_id", d.get("bos_token_id")),
        eos_token_id=_hashable(text_dict.get("eos_token_id", d.get("eos_token_id"))),
        hf_json=json.dumps(d, sort_keys=True))


def _text_to_hf(t: TextConfig, config: ModelConfig) -> dict:
    out = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
               num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
               num_key_value_heads=t.num_key_value_heads, hidden_act=t.hidden_act, rms_norm_eps=t.rms_norm_eps,
               max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=config.tie_word_embeddings,
               bos_token_id=config.bos_token_id, pad_token_id=config.pad_token_id,
               eos_token_id=list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else
               config.eos_token_id)
    rope = {"rope_type": t.rope_type, "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section),
            **dict(t.rope_scaling)}
    if t.arch == "qwen3_vl":
        rope["mrope_interleaved"] = t.mrope_interleaved
        out.update(model_type="qwen3_vl_text", head_dim=t.head_dim, attention_bias=t.qkv_bias)
    else:
        out.update(model_type="qwen2_5_vl_text", use_sliding_window=t.sliding_window is not None,
                   sliding_window=t.sliding_window, max_window_layers=t.max_window_layers)
    out["rope_parameters"] = rope
    return out


def _vision_to_hf(v: VisionConfig) -> dict:
    out = dict(depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
               num_heads=v.num_heads, out_hidden_size=v.out_hidden_size, hidden_act=v.hidden_act,
               in_channels=v.in_channels, patch_size=v.patch_size, spatial_merge_size=v.spatial_merge_size,
               temporal_patch_size=v.temporal_patch_size,
               rope_parameters={"rope_theta": v.rope_theta, "rope_type": "axial"})
    if v.arch == "qwen3_vl":
        out.update(model_type="qwen3_vl_vision", num_position_embeddings=v.num_position_embeddings,
                   deepstack_visual_indexes=list(v.deepstack_visual_indexes))
    else:
        out.update(model_type="qwen2_5_vl_vision", window_size=v.window_size,
                   fullatt_block_indexes=list(v.fullatt_block_indexes), tokens_per_second=v.tokens_per_second)
    return out


def to_hf_dict(config: ModelConfig) -> dict:
    """HF config dict in the nested transformers-5 layout. Fields of the original dict that this code does
    not interpret (e.g. dtype, initializer_range) are carried over; the fields it does interpret are
    rewritten from the dataclass, so a config edited with dataclasses.replace exports its new values."""
    original = json.loads(config.hf_json) if config.hf_json else {}
    out = {k: v for k, v in original.items() if k not in ("text_config", "vision_config", "rope_scaling")}
    if "text_config" not in original and original:
        # flat 4.x layout: the text fields sat at the top level; move all of them under text_config
        text_original = {k: v for k, v in original.items() if k not in ("vision_config", "architectures",
                                                                      "model_type", "image_token_id",
                                                                      "video_token_id", "vision_start_token_id",
                                                                      "vision_end_token_id", "transformers_version",
                                                                      "tie_word_embeddings", "vision_token_id")}
        out = {k: v for k, v in out.items() if k not in text_original}
    else:
        text_original = dict(original.get("text_config", {}))
    for stale in ("rope_scaling", "rope_theta", "layer_types", "head_dim" if config.arch == "qwen2_5_vl" else ""):
        text_original.pop(stale, None)
    text = {**text_original, **_text_to_hf(config.text, config)}
    vision = {**original.get("vision_config", {}), **_vision_to_hf(config.vision)}
    vision.pop("in_chans", None)
    out.update(architectures=[_ARCH_CLASS[config.arch]], model_type=config.arch, text_config=text,
               vision_config=vision, image_token_id=config.image_token_id, video_token_id=config.video_token_id,
               vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id,
               tie_word_embeddings=config.tie_word_embeddings)
    return out
