"""Builds a Hugging Face-format Qwen-VL checkpoint with random weights, offline and deterministically.

    python tools/make_tiny_model.py --arch qwen3_vl --size tiny --out /tmp/qwen3_vl_tiny    (the CLI: `main`)
    python tools/make_tiny_model.py --like qwen3_vl_8b --out /tmp/qwen3_vl_8b_random
    build(out, arch="qwen3_vl", size="small")                                                 (library use)

Writes config.json, model.safetensors (or shards + index), tokenizer.json, tokenizer_config.json,
chat_template.jinja, preprocessor_config.json, video_preprocessor_config.json and
processor_config.json. The same arguments give the same bytes on every run (seeded per-tensor
init, fixed safetensors metadata, single-threaded tokenizer training on a seeded corpus).

Sizes (`--size`, fp32): `tiny` about 1 M params (tests), `small` about 6 M params (CPU demos that
must learn). Images are bounded to 4..64 merged tokens so CPU runs stay small.

`--like NAME` gives the real model's exact shapes (values from ../shared/notes/qwen_vl_configs.md)
with random weights (bf16 by default), the real 151936/152064 vocabulary and the real special-token
ids: the tokenizer's small BPE vocabulary is padded with unreachable `<|unused_N|>` entries to
151643 so `<|im_start|>`, `<|image_pad|>`, ... get ids 151644, 151655, ... as in Qwen; the text it
produces uses only the first few hundred ids, so this is for benchmarks, not for reading output.
Weights are generated tensor by tensor into <= 2 GB shards from a meta-device model (no torch model
is materialised), so an 8B checkpoint needs a few GB of RAM.
"""
import argparse
import json
import math
import os
import zlib
from pathlib import Path

import numpy as np

from jaxrl_vl.models.tiny_tokenizer import QWEN_ADDED_TOKENS, QWEN_BASE_VOCAB_SIZE, train_tokenizer

CHAT_TEMPLATE = Path(__file__).resolve().parent / "tiny_chat_template.jinja"
# The builder's sources: a checkpoint built from other sources may differ (tests key their cache on this).
SOURCES = (Path(__file__).resolve(), Path(__file__).resolve().parent / "tiny_tokenizer.py", CHAT_TEMPLATE)
ARCHS = ("qwen3_vl", "qwen2_5_vl")
TOKENIZER_SEED = 1234
SHARD_BYTES = 2 * 1024**3

# Text and vision shapes of the tiny/small checkpoints. `bpe` is the BPE vocabulary size before
# the 26 Qwen added tokens (at most: the corpus may support fewer merges); the embedding
# is padded to a multiple of 64.
SIZES = {
    "tiny": dict(hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32, inter=256, bpe=900,
                 v_depth=2, v_hidden=64, v_heads=2, v_inter=128, deepstack=[0, 1], fullatt=[1],
                 mrope3=[6, 5, 5], mrope25=[4, 6, 6], v_pos=256),
    "small": dict(hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, inter=768, bpe=1500,
                  v_depth=4, v_hidden=128, v_heads=2, v_inter=256, deepstack=[1, 3], fullatt=[1, 3],
                  mrope3=[12, 10, 10], mrope25=[8, 12, 12], v_pos=256),
}
# The published shapes (see ../shared/notes/qwen_vl_configs.md, which reproduce the parameter counts).
LIKE = {
    "qwen3_vl_2b": dict(arch="qwen3_vl", hidden=2048, layers=28, heads=16, kv_heads=8, head_dim=128,
                        inter=6144, vocab=151936, tie=True, v_depth=24, v_hidden=1024, v_heads=16,
                        v_inter=4096, deepstack=[5, 11, 17]),
    "qwen3_vl_4b": dict(arch="qwen3_vl", hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128,
                        inter=9728, vocab=151936, tie=True, v_depth=24, v_hidden=1024, v_heads=16,
                        v_inter=4096, deepstack=[5, 11, 17]),
    "qwen3_vl_8b": dict(arch="qwen3_vl", hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128,
                        inter=12288, vocab=151936, tie=False, v_depth=27, v_hidden=1152, v_heads=16,
                        v_inter=4304, deepstack=[8, 16, 24]),
    "qwen2_5_vl_3b": dict(arch="qwen2_5_vl", hidden=2048, layers=36, heads=16, kv_heads=2, head_dim=128,
                          inter=11008, vocab=151936, tie=True, max_window_layers=70),
    "qwen2_5_vl_7b": dict(arch="qwen2_5_vl", hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128,
                          inter=18944, vocab=152064, tie=False, max_window_layers=28),
}


def token_ids(num_base_tokens: int) -> dict:
    """Ids of the Qwen added tokens when they follow a BPE vocabulary of `num_base_tokens` entries."""
    return {content: num_base_tokens + i for i, (content, _) in enumerate(QWEN_ADDED_TOKENS)}


def qwen3_vl_config(s: dict, ids: dict, vocab: int, tie: bool, max_positions: int) -> dict:
    """config.json in the published Qwen3-VL layout (nested text/vision configs)."""
    text = dict(attention_bias=False, attention_dropout=0.0, bos_token_id=ids["<|endoftext|>"],
                dtype="bfloat16" if s.get("real") else "float32", eos_token_id=ids["<|im_end|>"],
                head_dim=s["head_dim"], hidden_act="silu", hidden_size=s["hidden"], initializer_range=0.02,
                intermediate_size=s["inter"], max_position_embeddings=max_positions, model_type="qwen3_vl_text",
                num_attention_heads=s["heads"], num_hidden_layers=s["layers"], num_key_value_heads=s["kv_heads"],
                rms_norm_eps=1e-06, rope_scaling=dict(mrope_interleaved=True, mrope_section=s.get("mrope3", [24, 20, 20]),
                                                      rope_type="default"),
                rope_theta=5000000, tie_word_embeddings=tie, use_cache=True, vocab_size=vocab)
    vision = dict(deepstack_visual_indexes=s["deepstack"], depth=s["v_depth"], hidden_act="gelu_pytorch_tanh",
                  hidden_size=s["v_hidden"], in_channels=3, initializer_range=0.02, intermediate_size=s["v_inter"],
                  model_type="qwen3_vl", num_heads=s["v_heads"], num_position_embeddings=s.get("v_pos", 2304),
                  out_hidden_size=s["hidden"], patch_size=16, spatial_merge_size=2, temporal_patch_size=2)
    return dict(architectures=["Qwen3VLForConditionalGeneration"], image_token_id=ids["<|image_pad|>"],
                model_type="qwen3_vl", text_config=text, tie_word_embeddings=tie,
                video_token_id=ids["<|video_pad|>"], vision_config=vision,
                vision_end_token_id=ids["<|vision_end|>"], vision_start_token_id=ids["<|vision_start|>"])


def qwen2_5_vl_config(s: dict, ids: dict, vocab: int, tie: bool, max_positions: int) -> dict:
    """config.json in the published (flat) Qwen2.5-VL layout."""
    vision = dict(depth=s.get("v_depth", 32), hidden_act="silu", hidden_size=s.get("v_hidden", 1280),
                  intermediate_size=s.get("v_inter", 3420), num_heads=s.get("v_heads", 16), in_chans=3,
                  out_hidden_size=s["hidden"], patch_size=14, spatial_merge_size=2, spatial_patch_size=14,
                  window_size=s.get("window", 112), fullatt_block_indexes=s.get("fullatt", [7, 15, 23, 31]),
                  tokens_per_second=2, temporal_patch_size=2)
    return dict(architectures=["Qwen2_5_VLForConditionalGeneration"], attention_dropout=0.0,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                vision_token_id=ids["<|vision_pad|>"], image_token_id=ids["<|image_pad|>"],
                video_token_id=ids["<|video_pad|>"], hidden_act="silu", hidden_size=s["hidden"],
                initializer_range=0.02, intermediate_size=s["inter"], max_position_embeddings=max_positions,
                max_window_layers=s.get("max_window_layers", s["layers"]), model_type="qwen2_5_vl",
                num_attention_heads=s["heads"], num_hidden_layers=s["layers"], num_key_value_heads=s["kv_heads"],
                rms_norm_eps=1e-06, rope_theta=1000000.0, sliding_window=32768, tie_word_embeddings=tie,
                torch_dtype="bfloat16" if s.get("real") else "float32", use_cache=True, use_sliding_window=False,
                vision_config=vision, rope_scaling=dict(type="mrope", mrope_section=s.get("mrope25", [16, 24, 24])),
                vocab_size=vocab)


def processor_configs(arch: str, real: bool) -> dict[str, dict]:
    """File name -> JSON of the image processor, video processor and processor configs."""
    patch = 16 if arch == "qwen3_vl" else 14
    factor = patch * 2
    if arch == "qwen3_vl":
        mean = std = [0.5, 0.5, 0.5]
        image_size = [65536, 16777216] if real else [4 * factor**2, 64 * factor**2]
        video_size = [4096, 25165824] if real else [4 * factor**2, 64 * factor**2]
        processor, video_type = "Qwen3VLProcessor", "Qwen3VLVideoProcessor"
    else:  # Qwen2.5-VL keeps CLIP statistics, as the real one does
        mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
        image_size = [3136, 12845056] if real else [4 * factor**2, 64 * factor**2]
        video_size = image_size
        processor, video_type = "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"
    common = dict(do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True, image_mean=mean,
                  image_std=std, merge_size=2, patch_size=patch, resample=3, rescale_factor=1 / 255,
                  temporal_patch_size=2)
    image = dict(common, image_processor_type="Qwen2VLImageProcessor", processor_class=processor,
                 size=dict(shortest_edge=image_size[0], longest_edge=image_size[1]),
                 min_pixels=image_size[0], max_pixels=image_size[1])
    video = dict(common, video_processor_type=video_type, processor_class=processor,
                 size=dict(shortest_edge=video_size[0], longest_edge=video_size[1]), fps=2.0,
                 min_frames=4, max_frames=768 if real else 8, do_sample_frames=arch == "qwen3_vl")
    return {"preprocessor_config.json": image, "video_preprocessor_config.json": video,
            "processor_config.json": dict(processor_class=processor)}


def tokenizer_config(chat_template_file: str, max_length: int) -> dict:
    """tokenizer_config.json; the tokenizer itself (vocab, merges, added tokens) is tokenizer.json."""
    return dict(tokenizer_class="Qwen2Tokenizer", add_prefix_space=False, bos_token=None,
                clean_up_tokenization_spaces=False, eos_token="<|im_end|>", errors="replace",
                model_max_length=max_length, pad_token="<|endoftext|>", split_special_tokens=False,
                unk_token=None, extra_special_tokens=[t for t, special in QWEN_ADDED_TOKENS if special],
                chat_template_file=chat_template_file)


def weight_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """HF weight name -> shape, read off a meta-device model built from model_dir/config.json
    (no memory for the weights). Tied lm_head is left out, as transformers saves it."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return dict(sorted(shapes.items()))


def init_tensor(name: str, shape: tuple[int, ...], seed: int, real: bool) -> np.ndarray:
    """Seeded per-name float32 init. Norm weights ~1, biases small, matrices N(0, 1/fan_in) for
    tiny/small (so attention is not uniform and parity tests see every term) or N(0, 0.02) like HF
    for --like; lm_head gets std 0.2 on tiny/small so sampled distributions are not flat."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    noise = rng.standard_normal(shape, dtype=np.float32)
    is_norm = len(shape) == 1 and ("norm" in name or "ln_q" in name)
    if is_norm:
        return np.float32(1.0) + (np.float32(0.0) if real else np.float32(0.1)) * noise
    if len(shape) == 1:  # biases
        return noise * np.float32(0.0 if real else 0.02)
    if name == "lm_head.weight" and not real:
        std = 0.2
    else:
        std = 0.02 if real else 1.0 / math.sqrt(math.prod(shape[1:]))
    return noise * np.float32(std)


def write_weights(out: Path, shapes: dict, seed: int, real: bool, dtype: str) -> int:
    """Writes model.safetensors (one file) or <= 2 GB shards plus an index. Returns the param count."""
    import torch
    from safetensors.torch import save_file

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    bytes_per = torch.tensor([], dtype=torch_dtype).element_size()
    total_bytes = sum(math.prod(s) for s in shapes.values()) * bytes_per
    shards, current, current_bytes = [], {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape) * bytes_per
        if current and current_bytes + size > SHARD_BYTES:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name] = shape
        current_bytes += size
    shards.append(current)
    metadata = {"format": "pt"}
    weight_map = {}
    for index, shard in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: torch.from_numpy(init_tensor(n, s, seed, real)).to(torch_dtype) for n, s in shard.items()}
        save_file(tensors, str(out / file), metadata=metadata)
        weight_map.update({n: file for n in shard})
        del tensors
    if len(shards) > 1:
        index_json = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
    return sum(math.prod(s) for s in shapes.values())


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def build(out: str | os.PathLike, arch: str | None = None, size: str | None = "tiny", like: str | None = None,
          seed: int = 0, dtype: str | None = None) -> dict:
    """Builds the checkpoint into `out` (created; existing files overwritten). Returns a summary dict
    {"out", "arch", "num_params", "vocab_size"}. Give either arch+size or like."""
    if like is not None:
        if like not in LIKE:
            raise ValueError(f"--like {like!r}: expected one of {sorted(LIKE)}")
        spec, real = dict(LIKE[like], real=True), True
        arch, vocab, tie = spec["arch"], spec["vocab"], spec["tie"]
        max_positions = 262144 if arch == "qwen3_vl" else 128000
        dtype = dtype or "bfloat16"
    else:
        if arch not in ARCHS:
            raise ValueError(f"--arch {arch!r}: expected one of {ARCHS}")
        if size not in SIZES:
            raise ValueError(f"--size {size!r}: expected one of {sorted(SIZES)}")
        spec, real = dict(SIZES[size], window=56), False
        tie, max_positions = False, 32768
        dtype = dtype or "float32"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # The corpus may support fewer merges than asked for: ids follow the trained vocabulary.
    tokenizer = train_tokenizer(spec.get("bpe", 900), TOKENIZER_SEED, QWEN_BASE_VOCAB_SIZE if real else None)
    num_base = tokenizer.get_vocab_size(with_added_tokens=False)
    if not real:
        vocab = -(-(num_base + len(QWEN_ADDED_TOKENS)) // 64) * 64
    ids = token_ids(num_base)
    make_config = qwen3_vl_config if arch == "qwen3_vl" else qwen2_5_vl_config
    write_json(out / "config.json", make_config(spec, ids, vocab, tie, max_positions))
    tokenizer.save(str(out / "tokenizer.json"))
    template = CHAT_TEMPLATE.read_text()
    default_system = "You are a helpful assistant." if arch == "qwen2_5_vl" else ""
    (out / "chat_template.jinja").write_text(template.replace("@@DEFAULT_SYSTEM@@", default_system))
    write_json(out / "tokenizer_config.json", tokenizer_config("chat_template.jinja", max_positions))
    for name, obj in processor_configs(arch, real).items():
        write_json(out / name, obj)

    num_params = write_weights(out, weight_shapes(out), seed, real, dtype)
    return {"out": str(out), "arch": arch, "num_params": num_params, "vocab_size": vocab}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=ARCHS, help="architecture (with --size)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--like", choices=sorted(LIKE), help="the real model's shapes, random weights")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="weight init seed")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: float32, or bfloat16 with --like")
    args = parser.parse_args(argv)
    if (args.arch is None) == (args.like is None):
        parser.error("give exactly one of --arch (with --size) or --like")
    print(json.dumps(build(args.out, args.arch, args.size, args.like, args.seed, args.dtype)))
