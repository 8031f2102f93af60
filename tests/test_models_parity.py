"""Logit parity of the JAX Qwen-VL models with transformers (fp32 CPU) on tiny random checkpoints.

Checkpoints are built in-test with transformers itself (Qwen3VLForConditionalGeneration(config) etc.) and
their weights re-drawn with a large spread (norm weights around 1, biases non-zero), so a wrong norm,
bias, rotary layout or mask moves the logits far beyond the 1e-4 tolerance.
"""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import check_parity  # noqa: E402

from jaxrl_vl.models import load, make_batch, unembed  # noqa: E402
from jaxrl_vl.models import apply as apply_eager  # noqa: E402

# jitted once per (config, dtype, remat, return_hidden): eager dispatch of every op is what makes
# un-jitted model tests slow on a busy CPU
apply = jax.jit(apply_eager, static_argnames=("config", "dtype", "remat", "return_hidden", "layer_loop"))

TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    """fp32 parity needs fp32 matmuls: on GPUs XLA would otherwise use TF32 (no effect on CPU)."""
    with jax.default_matmul_precision("highest"):
        yield


SPECIAL_IDS = dict(image_token_id=250, video_token_id=251, vision_start_token_id=248, vision_end_token_id=249)


def hf_config(arch: str, tie: bool = False, text_overrides: dict | None = None):
    text = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "qwen3_vl":
        text.update(head_dim=16, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                      mrope_section=[2, 3, 3], mrope_interleaved=True))
        vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                      patch_size=4, num_position_embeddings=64, deepstack_visual_indexes=[0, 2])
        cls = transformers.Qwen3VLConfig
    else:
        text.update(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]))
        vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                      patch_size=4, window_size=16, fullatt_block_indexes=[1])
        cls = transformers.Qwen2_5_VLConfig
    text.update(text_overrides or {})
    return cls(text_config=text, vision_config=vision, tie_word_embeddings=tie, **SPECIAL_IDS)


def build_hf_model(arch: str, out_dir: str, tie: bool = False, seed: int = 0, text_overrides: dict | None = None):
    """Save a tiny random transformers model with spread-out weights to out_dir; returns the torch model."""
    torch.manual_seed(seed)
    cls = {"qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
           "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration}[arch]
    model = cls(hf_config(arch, tie, text_overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif "norm" in name or "ln_q" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    model.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = {}
    for arch, tie in (("qwen3_vl", True), ("qwen3_vl", False), ("qwen2_5_vl", False), ("qwen2_5_vl", True)):
        path = str(tmp_path_factory.mktemp(f"{arch}_tie{int(tie)}"))
        build_hf_model(arch, path, tie=tie)
        dirs[(arch, tie)] = path
    return dirs


@pytest.mark.parametrize("arch,tie", [("qwen3_vl", True), ("qwen3_vl", False), ("qwen2_5_vl", False),
                                      ("qwen2_5_vl", True)])
def test_logits_match_transformers(model_dirs, arch, tie):
    result = check_parity.run(model_dirs[(arch, tie)])
    assert result["arch"] == arch
    assert result["num_images"] == 5 and result["batch_source"] == "synthetic"
    assert result["max_abs_logit"] > 1.0  # the comparison is not between near-zero logits
    assert result["max_abs_logit_diff"] <= TOLERANCE, result


@pytest.mark.slow
@pytest.mark.parametrize("arch,overrides", [
    ("qwen3_vl", dict(attention_bias=True, num_key_value_heads=4)),
    ("qwen2_5_vl", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1, num_key_value_heads=1)),
])
def test_logits_match_transformers_variants(tmp_path, arch, overrides):
    build_hf_model(arch, str(tmp_path), seed=1, text_overrides=overrides)
    result = check_parity.run(str(tmp_path))
    assert result["max_abs_logit_diff"] <= TOLERANCE, result


def test_text_only_batch_matches_transformers(model_dirs):
    path = model_dirs[("qwen2_5_vl", False)]
    config, params = load(path)
    rows = [{"input_ids": np.array([5, 6, 7, 8, 9, 10], np.int32)}, {"input_ids": np.array([11, 12, 13], np.int32)}]
    batch = make_batch(rows, config)
    assert "pixel_values" not in batch
    ours = np.asarray(apply(params, batch, config))
    hf_logits, _ = check_parity._torch_logits(path, config, batch)
    real = batch["segment_ids"] > 0
    np.testing.assert_allclose(ours[real], hf_logits[real], atol=TOLERANCE)


def _synthetic_batch(config, seed=0):
    rows = check_parity._synthetic_rows(config, np.random.default_rng(seed))
    return rows, make_batch(rows, config)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_remat_policies_and_hidden_states_agree(model_dirs, arch):
    config, params = load(model_dirs[(arch, False)])
    _, batch = _synthetic_batch(config)
    reference = np.asarray(apply(params, batch, config))
    for remat in ("full", "dots"):
        np.testing.assert_allclose(np.asarray(apply(params, batch, config, remat=remat)), reference, atol=1e-5)
    hidden = apply(params, batch, config, return_hidden=True)
    assert hidden.shape == batch["input_ids"].shape + (config.text.hidden_size,)
    np.testing.assert_allclose(np.asarray(jax.jit(unembed, static_argnums=2)(params, hidden, config)), reference,
                               atol=1e-5)
    with pytest.raises(ValueError, match="remat"):
        apply_eager(params, batch, config, remat="sometimes")


@pytest.mark.slow
def test_unrolled_layer_loop_matches_scan(model_dirs):
    """layer_loop="unrolled" (a Python loop over the stacked layers) = lax.scan: logits and gradients."""
    config, params = load(model_dirs[("qwen3_vl", False)])
    _, batch = _synthetic_batch(config)

    def loss(p, layer_loop):
        return jnp.mean(apply(p, batch, config, remat="dots", layer_loop=layer_loop) ** 2)

    scan_loss, scan_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, "scan")
    loop_loss, loop_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, "unrolled")
    np.testing.assert_allclose(float(loop_loss), float(scan_loss), rtol=1e-6)
    layers_grad = jax.tree.leaves(loop_grads["model"]["language_model"]["layers"])
    assert all(np.abs(np.asarray(g)).max() > 0 for g in layers_grad)  # every stacked layer weight learns
    for a, b in zip(jax.tree.leaves(loop_grads), jax.tree.leaves(scan_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    with pytest.raises(ValueError, match="layer_loop"):
        apply_eager(params, batch, config, layer_loop="while")


@pytest.mark.slow
def test_bfloat16_compute_close_to_float32(model_dirs):
    config, params = load(model_dirs[("qwen3_vl", False)])
    _, batch = _synthetic_batch(config)
    full = np.asarray(apply(params, batch, config))
    half = apply(params, batch, config, dtype=jnp.bfloat16)
    assert half.dtype == jnp.float32
    real = batch["segment_ids"] > 0
    scale = np.abs(full[real]).max()
    assert np.abs(np.asarray(half)[real] - full[real]).max() < 0.1 * scale


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_packed_row_equals_separate_rows(model_dirs, arch):
    """Two examples packed into one row (segment ids 1, 2) give the same logits as two separate rows."""
    config, params = load(model_dirs[(arch, False)])
    rows, separate = _synthetic_batch(config)
    first, second = rows[0], rows[2]  # both have images
    packed_row = {
        "input_ids": np.concatenate([first["input_ids"], second["input_ids"]]),
        "segment_ids": np.concatenate([np.full(len(first["input_ids"]), 1), np.full(len(second["input_ids"]), 2)]),
        "pixel_values": np.concatenate([first["pixel_values"], second["pixel_values"]]),
        "image_grid_thw": np.concatenate([first["image_grid_thw"], second["image_grid_thw"]]),
    }
    packed = make_batch([packed_row], config)
    packed_logits = np.asarray(apply(params, packed, config))[0]
    separate_logits = np.asarray(apply(params, separate, config))
    n_first = len(first["input_ids"])
    np.testing.assert_allclose(packed_logits[:n_first], separate_logits[0, :n_first], atol=1e-4)
    np.testing.assert_allclose(packed_logits[n_first:n_first + len(second["input_ids"])],
                               separate_logits[2, :len(second["input_ids"])], atol=1e-4)


@pytest.mark.slow
def test_gradients_are_finite_with_padding(model_dirs):
    config, params = load(model_dirs[("qwen3_vl", True)])
    _, batch = _synthetic_batch(config)
    mask = jnp.asarray(batch["segment_ids"] > 0, jnp.float32)

    def loss(p):
        logits = apply(p, batch, config, remat="full")
        return jnp.sum(jax.nn.logsumexp(logits, axis=-1) * mask) / jnp.sum(mask)

    grads = jax.jit(jax.grad(loss))(params)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    visual_grad = grads["model"]["visual"]["blocks"]["attn"]["qkv"]["weight"]
    assert float(jnp.abs(visual_grad).max()) > 0  # gradients reach the vision tower


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_left_padded_batch_matches_transformers(model_dirs, arch):
    """apply() does not assume right padding: a left-padded batch (as generation uses) matches too."""
    from jaxrl_vl.models.rope import mrope_position_ids

    path = model_dirs[(arch, False)]
    config, params = load(path)
    _, batch = _synthetic_batch(config, seed=5)
    lengths = (batch["segment_ids"] > 0).sum(axis=1)
    width = batch["input_ids"].shape[1]
    left = dict(batch)
    left["input_ids"] = np.stack([np.roll(row, width - n) for row, n in zip(batch["input_ids"], lengths)])
    left["segment_ids"] = np.stack([np.roll(row, width - n) for row, n in zip(batch["segment_ids"], lengths)])
    left["position_ids"] = mrope_position_ids(left["input_ids"], left["segment_ids"], batch["image_grid_thw"],
                                              config.image_token_id, config.vision.spatial_merge_size)
    ours = np.asarray(apply(params, left, config))
    hf_logits, _ = check_parity._torch_logits(path, config, left)
    real = left["segment_ids"] > 0
    assert not real[:, 0].all()  # some rows really are left-padded
    np.testing.assert_allclose(ours[real], hf_logits[real], atol=TOLERANCE)


def test_make_batch_fixed_shapes_and_errors(model_dirs):
    config, params = load(model_dirs[("qwen3_vl", False)])
    rows = [{"input_ids": np.array([5, 6, 7], np.int32), "loss_mask": np.array([0, 1, 1], np.float32)},
            {"input_ids": np.array([8, 9], np.int32), "loss_mask": np.array([1, 1], np.float32)}]
    plain = make_batch(rows, config)
    padded = make_batch(rows, config, pad_to_length=8, pad_patches_to=32)
    assert padded["input_ids"].shape == (2, 8) and padded["pixel_values"].shape == (1, 32, config.vision.patch_dim)
    np.testing.assert_array_equal(padded["loss_mask"], [[0, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]])
    # padding patches (no image tokens) change nothing
    np.testing.assert_allclose(np.asarray(apply(params, padded, config))[:, :3],
                               np.asarray(apply(params, plain, config)), atol=1e-5)
    image_row, = [r for r in check_parity._synthetic_rows(config, np.random.default_rng(0)) if "pixel_values" in r][:1]
    with pytest.raises(ValueError, match="image tokens"):
        first_image_token = int(np.argmax(image_row["input_ids"] == config.image_token_id))
        make_batch([{**image_row, "input_ids": np.delete(image_row["input_ids"], first_image_token)}], config)
    with pytest.raises(ValueError, match="uint8"):
        make_batch([{**image_row, "pixel_values": np.zeros(image_row["pixel_values"].shape, np.uint8)}], config)
    with pytest.raises(ValueError, match="pad_to_length=2"):
        make_batch(rows, config, pad_to_length=2)
    with pytest.raises(ValueError, match="'loss_mask' is missing in row 1"):
        make_batch([rows[0], {"input_ids": rows[1]["input_ids"]}], config)


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_tiny_checkpoint_with_processor_matches_transformers(tiny_model_dirs, arch):
    """The project's tiny checkpoints (tools/make_tiny_model.py): batch made by their own processor."""
    result = check_parity.run(tiny_model_dirs[arch])
    assert result["batch_source"] == "processor" and result["num_images"] == 3
    assert result["max_abs_logit_diff"] <= TOLERANCE, result
