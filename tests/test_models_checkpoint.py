"""Checkpoint load/export: transformers reads our export back exactly; bad checkpoints fail clearly."""
from __future__ import annotations

import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxrl_vl.models import ModelConfig, apply, export, init, load, make_batch, to_hf_state_dict  # noqa: E402
from jaxrl_vl.models import safetensors_io  # noqa: E402
from jaxrl_vl.models.checkpoint import read_state_dict  # noqa: E402

from test_models_parity import build_hf_model, check_parity  # noqa: E402

HF_CLASSES = {"qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    """fp32 parity needs fp32 matmuls: on GPUs XLA would otherwise use TF32 (no effect on CPU)."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen2_5_vl"])
def saved(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    build_hf_model(request.param, path, tie=request.param == "qwen3_vl", seed=2)
    return request.param, path


def _hf_load(arch, path, dtype=torch.float32):
    model, info = getattr(transformers, HF_CLASSES[arch]).from_pretrained(
        path, dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def test_export_round_trip_transformers_loads_it_exactly(saved, tmp_path):
    arch, path = saved
    config, params = load(path)
    export(params, config, str(tmp_path))
    original = read_state_dict(path)
    exported = read_state_dict(str(tmp_path))
    assert sorted(exported) == sorted(original)  # same names as transformers' own save_pretrained
    for name in original:
        np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
    reference = _hf_load(arch, path).state_dict()
    reloaded = _hf_load(arch, str(tmp_path)).state_dict()
    for name, tensor in reference.items():
        assert torch.equal(tensor, reloaded[name]), name
    # logits of transformers on our export equal ours
    config2, params2 = load(str(tmp_path))
    assert config2 == config
    rows = check_parity._synthetic_rows(config, np.random.default_rng(0))
    batch = make_batch(rows, config)
    hf_logits, _ = check_parity._torch_logits(str(tmp_path), config, batch)
    ours = np.asarray(apply(params2, batch, config))
    real = batch["segment_ids"] > 0
    np.testing.assert_allclose(ours[real], hf_logits[real], atol=1e-4)


def test_sharded_bfloat16_export_loads(saved, tmp_path):
    arch, path = saved
    config, params = load(path)
    export(params, config, str(tmp_path), dtype=ml_dtypes.bfloat16, max_shard_bytes=20_000)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    assert json.load(open(tmp_path / "config.json"))["dtype"] == "bfloat16"
    model = _hf_load(arch, str(tmp_path), dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    _, params_bf16 = load(str(tmp_path))
    leaf = params_bf16["model"]["language_model"]["layers"]["mlp"]["up_proj"]["weight"]
    assert leaf.dtype == np.float32  # fp32 master weights whatever the stored dtype
    np.testing.assert_allclose(leaf, params["model"]["language_model"]["layers"]["mlp"]["up_proj"]["weight"],
                               rtol=1e-2, atol=1e-3)


def test_both_naming_schemes_load(saved, tmp_path):
    """transformers-5 module names and the older published names (model.layers.*, visual.*) both load."""
    arch, path = saved
    config, params = load(path)
    new_names = to_hf_state_dict(params, config, stored_names=False)
    assert all(n.startswith(("model.language_model.", "model.visual.", "lm_head.")) for n in new_names)
    old_names = {("visual." + n[len("model.visual."):]) if n.startswith("model.visual.") else
                 ("model." + n[len("model.language_model."):]) if n.startswith("model.language_model.") else n: v
                 for n, v in new_names.items()}
    for variant, state in (("new", new_names), ("old", old_names)):
        folder = tmp_path / variant
        folder.mkdir()
        shutil.copy(os.path.join(path, "config.json"), folder / "config.json")
        safetensors_io.write(str(folder / "model.safetensors"), state)
        _, loaded = load(str(folder))
        jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)


def test_init_matches_checkpoint_structure_and_exports(saved, tmp_path):
    arch, path = saved
    config, params = load(path)
    fresh = init(config, jax.random.PRNGKey(0))
    shapes = jax.tree_util.tree_map(np.shape, params)
    assert jax.tree_util.tree_map(np.shape, fresh) == shapes
    export(fresh, config, str(tmp_path))
    _hf_load(arch, str(tmp_path))


def _rewrite(path, dst, edit):
    shutil.copytree(path, dst)
    state = {k: np.array(v) for k, v in read_state_dict(str(dst)).items()}
    edit(state)
    safetensors_io.write(os.path.join(dst, "model.safetensors"), state)


def test_missing_tensor_is_named(saved, tmp_path):
    arch, path = saved
    name = next(n for n in read_state_dict(path) if "layers.1.mlp.up_proj.weight" in n)
    _rewrite(path, tmp_path / "ckpt", lambda s: s.pop(name))
    with pytest.raises(ValueError, match=f"missing tensor '{name}'"):
        load(str(tmp_path / "ckpt"))


def test_wrong_shape_is_named_with_both_shapes(saved, tmp_path):
    arch, path = saved
    name = next(n for n in read_state_dict(path) if "blocks.0.attn.qkv.weight" in n)

    def shrink(state):
        state[name] = state[name][:-1]
    _rewrite(path, tmp_path / "ckpt", shrink)
    with pytest.raises(ValueError, match=rf"tensor '{name}' has shape \(95, 32\) but the config expects \(96, 32\)"):
        load(str(tmp_path / "ckpt"))


def test_unexpected_tensor_is_named(saved, tmp_path):
    arch, path = saved
    _rewrite(path, tmp_path / "ckpt", lambda s: s.update({"model.extra_head.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(ValueError, match="unexpected tensor 'model.extra_head.weight'"):
        load(str(tmp_path / "ckpt"))


def test_unknown_architecture_names_the_field(saved, tmp_path):
    _, path = saved
    shutil.copytree(path, tmp_path / "ckpt")
    cfg = json.load(open(tmp_path / "ckpt" / "config.json"))
    cfg["model_type"], cfg["architectures"] = "llava", ["LlavaForConditionalGeneration"]
    json.dump(cfg, open(tmp_path / "ckpt" / "config.json", "w"))
    with pytest.raises(ValueError, match="model_type='llava'"):
        load(str(tmp_path / "ckpt"))


def test_truncated_file_and_missing_folder_errors(saved, tmp_path):
    _, path = saved
    shutil.copytree(path, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load(str(tmp_path / "ckpt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(str(tmp_path / "no_such_folder"))


PUBLISHED_QWEN2_5_VL_3B = {  # the flat transformers-4.41 layout of Qwen/Qwen2.5-VL-3B-Instruct's config.json
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 128000,
    "max_window_layers": 70, "model_type": "qwen2_5_vl", "num_attention_heads": 16, "num_hidden_layers": 36,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936}


def test_flat_qwen2_5_vl_config_reads_like_transformers():
    config = ModelConfig.from_hf_dict(PUBLISHED_QWEN2_5_VL_3B)
    hf = transformers.Qwen2_5_VLConfig(**PUBLISHED_QWEN2_5_VL_3B)
    text = hf.text_config
    assert (config.text.hidden_size, config.text.num_key_value_heads, config.text.head_dim) == (2048, 2, 128)
    assert config.text.rope_theta == text.rope_parameters["rope_theta"] == 1e6
    assert config.text.mrope_section == tuple(text.rope_parameters["mrope_section"]) == (16, 24, 24)
    assert config.tie_word_embeddings == hf.tie_word_embeddings is True
    assert config.text.sliding_window is None and not config.text.mrope_interleaved
    assert config.vision.window_size == 112 and config.vision.fullatt_block_indexes == (7, 15, 23, 31)
    # our nested export of it is read by transformers into the same text/vision settings
    hf2 = transformers.Qwen2_5_VLConfig(**config.to_hf_dict())
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "rms_norm_eps", "vocab_size"):
        assert getattr(hf2.text_config, key) == getattr(text, key), key
    assert hf2.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    assert hf2.vision_config.fullatt_block_indexes == [7, 15, 23, 31] and hf2.tie_word_embeddings
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config


PUBLISHED_QWEN3_VL_2B = {  # Qwen/Qwen3-VL-2B-Instruct config.json (transformers 4.57 nested layout)
    "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655, "model_type": "qwen3_vl",
    "text_config": {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
                    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
                    "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 262144,
                    "model_type": "qwen3_vl_text", "num_attention_heads": 16, "num_hidden_layers": 28,
                    "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
                    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                     "rope_type": "default"},
                    "rope_theta": 5000000, "tie_word_embeddings": True, "use_cache": True, "vocab_size": 151936},
    "tie_word_embeddings": True, "transformers_version": "4.57.0.dev0", "video_token_id": 151656,
    "vision_config": {"deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh",
                      "hidden_size": 1024, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4096,
                      "model_type": "qwen3_vl", "num_heads": 16, "num_position_embeddings": 2304,
                      "out_hidden_size": 2048, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2},
    "vision_end_token_id": 151653, "vision_start_token_id": 151652}


@pytest.mark.parametrize("name,hf_dict,published_total", [
    ("qwen3_vl_2b", PUBLISHED_QWEN3_VL_2B, 2_127_532_032),
    ("qwen2_5_vl_3b", PUBLISHED_QWEN2_5_VL_3B, 3_754_622_976),
    ("qwen2_5_vl_7b", {**PUBLISHED_QWEN2_5_VL_3B, "hidden_size": 3584, "intermediate_size": 18944,
                       "max_window_layers": 28, "num_attention_heads": 28, "num_hidden_layers": 28,
                       "num_key_value_heads": 4, "tie_word_embeddings": False, "vocab_size": 152064,
                       "vision_config": {**PUBLISHED_QWEN2_5_VL_3B["vision_config"], "out_hidden_size": 3584}},
     8_292_166_656),
])
def test_published_configs_give_published_parameter_counts(name, hf_dict, published_total):
    from jaxrl_vl.models.checkpoint import expected_shapes
    config = ModelConfig.from_hf_dict(hf_dict)
    assert sum(int(np.prod(s)) for s in expected_shapes(config).values()) == published_total
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config
    if config.arch == "qwen3_vl":
        assert config.text.rope_theta == 5e6 and config.text.mrope_interleaved
        assert config.text.mrope_section == (24, 20, 20) and config.vision.deepstack_visual_indexes == (5, 11, 17)
