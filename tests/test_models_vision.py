"""Parity of the JAX Qwen3-VL / Qwen2.5-VL vision towers with transformers (fp32, CPU).

Each test builds a small random transformers vision tower, converts its state dict into the
stacked HF-named params, and feeds both the same images of different sizes (plus a 2-frame clip,
which attends per frame) in one call, with padding patches on the JAX side.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxrl_vl.models.vision import apply_vision, init_vision
from jaxrl_vl.models.vision_inputs import bucket_size, frame_slot_len, slot_shape, vision_inputs


@pytest.fixture(autouse=True)
def _full_fp32_matmuls():
    """GPUs default fp32 matmuls to TF32 (~1e-3 error); parity needs true fp32."""
    with jax.default_matmul_precision("highest"):
        yield


GRID_THW = np.array([[1, 4, 6], [1, 8, 4], [2, 4, 4], [1, 2, 2]])
TOL = 1e-5


def _tiny_config(arch: str):
    common = dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=24,
                  patch_size=4, temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
    if arch == "qwen3_vl":
        from transformers import Qwen3VLConfig
        config = Qwen3VLConfig(vision_config=dict(common, hidden_act="gelu_pytorch_tanh",
                                                  num_position_embeddings=36, deepstack_visual_indexes=[0, 2]))
    else:
        from transformers import Qwen2_5_VLConfig
        # window_size 16 px = 2x2 merged tokens per window, so the test images get several windows.
        config = Qwen2_5_VLConfig(vision_config=dict(common, hidden_act="silu", window_size=16,
                                                     fullatt_block_indexes=[1, 3]))
    vision_config = config.vision_config
    vision_config._attn_implementation = "eager"
    return vision_config


def _project_vision_config(arch: str, vision_config):
    """The project's ModelConfig.vision read from the HF config dict (what training code passes)."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    from jaxrl_vl.models.config import ModelConfig

    text_config = dict(hidden_size=vision_config.out_hidden_size, num_attention_heads=2, num_key_value_heads=1,
                       intermediate_size=32, num_hidden_layers=1, head_dim=12,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 2, 2]})
    hf_config = (Qwen3VLConfig if arch == "qwen3_vl" else Qwen2_5_VLConfig)(
        vision_config=vision_config.to_dict(), text_config=text_config)
    return ModelConfig.from_hf_dict(hf_config.to_dict()).vision


def _hf_vision_model(arch: str, vision_config):
    if arch == "qwen3_vl":
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel as cls
    else:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel as cls,
        )
    torch.manual_seed(0)
    model = cls(vision_config).eval()
    # Re-draw every weight at a scale that makes each sub-layer matter (HF init is std 0.02).
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.1)
            if re.search(r"(norm\d?|ln_q)\.weight$", name):
                param.add_(1.0)
    return model


def _stacked_params(state_dict: dict) -> dict:
    """HF dotted names -> nested dict; numbered entries of blocks / deepstack_merger_list stacked."""
    stacked_lists = ("blocks", "deepstack_merger_list")
    grouped: dict[str, dict[int, np.ndarray]] = {}
    params: dict = {}
    for name, tensor in state_dict.items():
        value = tensor.detach().numpy().astype(np.float32)
        parts = name.split(".")
        if parts[0] in stacked_lists:
            key = ".".join([parts[0]] + parts[2:])
            grouped.setdefault(key, {})[int(parts[1])] = value
            continue
        _set(params, parts, value)
    for key, by_index in grouped.items():
        _set(params, key.split("."), np.stack([by_index[i] for i in sorted(by_index)]))
    return jax.tree_util.tree_map(jnp.asarray, params)


def _set(tree: dict, parts: list[str], value) -> None:
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
    tree[parts[-1]] = value


def _hf_outputs(model, pixel_values: np.ndarray, grid_thw: np.ndarray):
    with torch.no_grad():
        out = model(torch.from_numpy(pixel_values), grid_thw=torch.from_numpy(grid_thw))
    if isinstance(out, tuple):  # older transformers returned (merged, deepstack_list) tuples
        merged, deepstack = out[0], (out[1] if len(out) > 1 else None)
    else:
        merged, deepstack = out.pooler_output, getattr(out, "deepstack_features", None)
    deepstack = None if not deepstack else np.stack([d.numpy() for d in deepstack])
    return merged.numpy(), deepstack


def _patches(vision_config, grid_thw, num_padding: int, seed: int):
    patch_dim = 3 * vision_config.temporal_patch_size * vision_config.patch_size ** 2
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(int(np.prod(grid_thw, axis=1).sum()), patch_dim)).astype(np.float32)
    padding = 100.0 * rng.normal(size=(num_padding, patch_dim)).astype(np.float32)  # junk must not leak
    return real, np.concatenate([real, padding])


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_vision_tower_matches_transformers(arch):
    vision_config = _tiny_config(arch)
    model = _hf_vision_model(arch, vision_config)
    params = _stacked_params(model.state_dict())
    real, padded = _patches(vision_config, GRID_THW, num_padding=12, seed=1)
    num_real_tokens = real.shape[0] // 4

    want_embeds, want_deepstack = _hf_outputs(model, real, GRID_THW)
    # The JAX side reads the project's own VisionConfig (converted from the HF config dict).
    project_config = _project_vision_config(arch, vision_config)
    vinputs = vision_inputs(project_config, GRID_THW, padded.shape[0])
    forward = jax.jit(lambda p, x, v: apply_vision(p, project_config, x, v, jnp.float32))
    embeds, deepstack = forward(params, jnp.asarray(padded), vinputs)

    assert embeds.shape == (padded.shape[0] // 4, vision_config.out_hidden_size)
    np.testing.assert_allclose(np.asarray(embeds)[:num_real_tokens], want_embeds, atol=TOL, rtol=0)
    if arch == "qwen3_vl":
        assert want_deepstack.shape[0] == 2 and deepstack.shape[0] == 2
        np.testing.assert_allclose(np.asarray(deepstack)[:, :num_real_tokens], want_deepstack, atol=TOL, rtol=0)
    else:
        assert deepstack is None and want_deepstack is None


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_padding_and_other_images_do_not_change_an_image(arch):
    vision_config = _tiny_config(arch)
    params = _stacked_params(_hf_vision_model(arch, vision_config).state_dict())
    real, padded = _patches(vision_config, GRID_THW, num_padding=20, seed=2)
    alone = real[: 4 * 6]  # the first image on its own, no padding
    jitted = jax.jit(lambda x, v: apply_vision(params, vision_config, x, v))
    forward = lambda x, grid: jitted(jnp.asarray(x), vision_inputs(vision_config, grid, x.shape[0]))
    together, _ = forward(padded, GRID_THW)
    single, _ = forward(alone, GRID_THW[:1])
    np.testing.assert_allclose(np.asarray(together)[:6], np.asarray(single), atol=TOL, rtol=0)
    # Changing one frame's pixels (the second frame of the 2-frame clip) changes its own merged tokens
    # and no other frame's: frames of one batch never attend to each other.
    frame_tokens = np.repeat(np.arange(5), [6, 8, 4, 4, 1])  # merged tokens per frame of GRID_THW
    start = 4 * int(np.sum(frame_tokens < 3))
    changed = padded.copy()
    changed[start:start + 16] += 3.0
    after, _ = forward(changed, GRID_THW)
    delta = np.abs(np.asarray(after) - np.asarray(together))[:len(frame_tokens)].max(axis=1)
    assert delta[frame_tokens == 3].min() > 1e-3
    np.testing.assert_allclose(delta[frame_tokens != 3], 0.0, atol=TOL)


def test_vision_inputs_reject_bad_shapes():
    vision_config = _tiny_config("qwen2_5_vl")
    with pytest.raises(ValueError, match="num_patches_padded"):
        vision_inputs(vision_config, GRID_THW, 10)
    with pytest.raises(ValueError, match="multiple of spatial_merge_size"):
        vision_inputs(vision_config, GRID_THW, int(np.prod(GRID_THW, axis=1).sum()) + 1)
    with pytest.raises(ValueError, match="spatial_merge_size"):
        vision_inputs(vision_config, np.array([[1, 3, 4]]), 16)


def test_apply_vision_names_missing_inputs():
    vision_config = _tiny_config("qwen3_vl")
    params = init_vision(vision_config, jax.random.PRNGKey(0))
    wrong_arch_inputs = vision_inputs(_tiny_config("qwen2_5_vl"), GRID_THW[:1], 24)
    with pytest.raises(ValueError, match="vision_slot_interp_indices"):
        apply_vision(params, vision_config, jnp.zeros((24, 96)), wrong_arch_inputs)
    with pytest.raises(ValueError, match="pixel_values"):
        apply_vision(params, vision_config, jnp.zeros((24, 95)), vision_inputs(vision_config, GRID_THW[:1], 24))


def test_windows_match_transformers():
    """Every Qwen2.5-VL window of the slot layout holds exactly the patches of one transformers window."""
    from transformers.vision_utils import get_vision_window_index

    vision_config = _tiny_config("qwen2_5_vl")
    grid = np.array([[1, 6, 10], [2, 4, 4], [1, 8, 2]])
    window_index, cu_window_seqlens = get_vision_window_index(
        torch.from_numpy(grid), spatial_merge_size=2, window_size=16, patch_size=4)
    unit = 4
    ordered_patches = (window_index.numpy()[:, None] * unit + np.arange(unit)).reshape(-1)
    bounds = cu_window_seqlens.numpy()
    want = {frozenset(ordered_patches[a:b].tolist()) for a, b in zip(bounds[:-1], bounds[1:]) if b > a}

    num_patches = int(np.prod(grid, axis=1).sum())
    v = vision_inputs(vision_config, grid, num_patches + 8)
    slot_patches, index = v["vision_slot_patches"], v["vision_slot_window_index"]
    got = set()
    for n, w in np.ndindex(index.shape[:2]):
        positions = index[n, w][index[n, w] < slot_patches.shape[1]]
        patches = slot_patches[n, positions]
        assert (patches < num_patches).all()
        if len(patches):
            assert len(patches) == v["vision_slot_window_lengths"][n, w]
            got.add(frozenset(patches.tolist()))
    assert got == want
    # the inverse puts every real slot position back where the window gather took it from
    real = slot_patches < num_patches
    flat_index = index.reshape(index.shape[0], -1)
    inverse = v["vision_slot_window_inverse"]
    for n in range(slot_patches.shape[0]):
        np.testing.assert_array_equal(flat_index[n, inverse[n, real[n]]], np.flatnonzero(real[n]))


def test_mixed_sizes_share_slots_and_layout_is_checked():
    vision_config = _tiny_config("qwen3_vl")
    v = vision_inputs(vision_config, GRID_THW, 120)
    # frames of 24, 32, 16, 16, 4 patches -> slots of 32 (power of two), largest first into the first
    # slot with room: [frame 1], [frame 0 + frame 4 + 4 padding], [the clip's two frames]
    np.testing.assert_array_equal(v["vision_slot_patches"][:, 0], [24, 0, 56])
    np.testing.assert_array_equal(v["vision_slot_patches"][1, 24:], [88, 89, 90, 91, 120, 120, 120, 120])
    np.testing.assert_array_equal(v["vision_slot_segments"][1, 20:], [1] * 4 + [5] * 4 + [0] * 4)
    np.testing.assert_array_equal(v["vision_slot_segments"][2], [3] * 16 + [4] * 16)
    assert "vision_slot_lengths" not in v and v["vision_merged_rows"].shape == (30,)
    assert (v["vision_merged_rows"][23:] == 3 * 32 // 4).all()  # 92 real patches -> 23 merged tokens
    shape = slot_shape(vision_config, GRID_THW, GRID_THW[:1])
    assert shape == (3, 32, 0, True)
    alone = vision_inputs(vision_config, GRID_THW[:1], 24, shape)  # shares the stacked batch's layout
    assert alone["vision_slot_patches"].shape == (3, 32) and "vision_slot_segments" in alone
    with pytest.raises(ValueError, match="slot_shape"):
        vision_inputs(vision_config, GRID_THW, 120, (2, 32, 0, True))
    with pytest.raises(ValueError, match="packed=True"):
        vision_inputs(vision_config, GRID_THW, 120, (8, 32))
    assert [bucket_size(n) for n in (0, 3, 17, 100, 784, 1000)] == [1, 3, 18, 104, 832, 1024]
    assert [bucket_size(n, 4) for n in (5, 9, 17, 33)] == [5, 10, 20, 40]
    sizes = (1, 9, 25, 36, 49, 100, 127, 144, 196, 300, 784, 840, 1024)
    assert [frame_slot_len(n) for n in sizes] == [1, 9, 26, 36, 52, 104, 128, 144, 200, 304, 784, 848, 1024]
    assert all(frame_slot_len(n) == bucket_size(n) for n in range(1, 128))


def test_uniform_frames_take_one_slot_each_without_mask():
    """Same-size frames (Maze turns, fixed-size benchmarks) keep the mask-free layout: one frame per
    slot, slot_len the frame rounded up by frame_slot_len, a key length per slot."""
    from transformers import Qwen3VLConfig

    vision_config = Qwen3VLConfig(vision_config=dict(patch_size=16, num_position_embeddings=2304)).vision_config
    grid = np.array([[1, 28, 28]] * 8)  # eight 448x448 images
    assert slot_shape(vision_config, grid) == (8, 784, 0, False)
    assert slot_shape(vision_config, np.array([[1, 28, 30]] * 2)) == (2, 848, 0, False)  # 840 -> 848
    v = vision_inputs(vision_config, grid, 8 * 784)
    assert "vision_slot_segments" not in v
    np.testing.assert_array_equal(v["vision_slot_lengths"], [784] * 8)


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_mixed_sizes_pack_with_bounded_padding(arch):
    """300 batches of 8 rows with 1-3 images of random sizes (4-28 patches a side, real patch sizes and
    windows): slot positions stay close to the real patches and few distinct shapes reach jit (one frame
    per slot, sized for the largest frame, had a median 3.0x, max 4.8x, over 22 shapes)."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    vision_config = (Qwen3VLConfig(vision_config=dict(patch_size=16, num_position_embeddings=2304)) if arch == "qwen3_vl"
                     else Qwen2_5_VLConfig(vision_config=dict(patch_size=14, window_size=112))).vision_config
    rng = np.random.default_rng(0)
    ratios, shapes = [], set()
    for _ in range(300):
        images = int(rng.integers(1, 4, size=8).sum())
        grid = np.concatenate([np.ones((images, 1), np.int64), 2 * rng.integers(2, 15, size=(images, 2))], axis=1)
        shape = slot_shape(vision_config, grid)
        ratios.append(shape.num_slots * shape.slot_len / np.prod(grid, axis=1).sum())
        shapes.add(shape)
    assert np.median(ratios) < 1.2 and max(ratios) < 1.6, (np.median(ratios), max(ratios))
    assert len(shapes) <= 12, sorted(shapes)


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_init_vision_has_transformers_names_and_shapes(arch):
    vision_config = _tiny_config(arch)
    want = _stacked_params(_hf_vision_model(arch, vision_config).state_dict())
    got = init_vision(vision_config, jax.random.PRNGKey(0))
    shapes = lambda tree: jax.tree_util.tree_map(lambda a: tuple(a.shape), tree)
    assert shapes(got) == shapes(want)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_remat_keeps_gradients(arch):
    vision_config = _tiny_config(arch)
    params = init_vision(vision_config, jax.random.PRNGKey(2), initializer_range=0.1)
    _, padded = _patches(vision_config, GRID_THW, num_padding=4, seed=4)
    vinputs = vision_inputs(vision_config, GRID_THW, padded.shape[0])

    def loss(p, remat):
        embeds, deepstack = apply_vision(p, vision_config, jnp.asarray(padded), vinputs, remat=remat)
        return jnp.sum(embeds ** 2) + (0.0 if deepstack is None else jnp.sum(deepstack ** 2))

    grads = [jax.jit(jax.grad(loss), static_argnums=1)(params, remat) for remat in ("none", "full", "dots_attn")]
    for other in grads[1:]:
        for plain, remat in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(other)):
            # Recomputation may fuse differently, so compare relative to each leaf's gradient scale.
            scale = float(jnp.abs(plain).max()) + 1e-12
            np.testing.assert_allclose(np.asarray(remat) / scale, np.asarray(plain) / scale, atol=1e-5, rtol=0)
    assert float(jnp.abs(grads[0]["blocks"]["attn"]["qkv"]["weight"]).max()) > 0


def test_dots_attn_policy_saves_the_cudnn_attention_forward():
    """The "dots_attn" remat policy recognises jax's cuDNN flash-attention forward primitives by name
    (they only trace on a GPU, so the name is what this CPU test can pin)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    from jaxrl_vl.models.layers import REMAT_POLICIES

    policy = REMAT_POLICIES["dots_attn"]
    for prim in (cudnn_attention._dot_product_attention_fwd_p, cudnn_attention._dot_product_attention_fwd_p_wrapper):
        assert policy(prim) is True
    assert policy(cudnn_attention._dot_product_attention_bwd_p_wrapper) is False


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_real_patch_and_window_geometry_matches_float64_transformers(arch):
    """Real patch sizes (16 / 14), the real 48x48 position grid and 112 px windows (4x4 merged
    tokens, with partial windows), checked against transformers run in float64."""
    common = dict(depth=3, hidden_size=64, num_heads=2, intermediate_size=64, out_hidden_size=32,
                  temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
    if arch == "qwen3_vl":
        from transformers import Qwen3VLConfig
        vision_config = Qwen3VLConfig(vision_config=dict(
            common, patch_size=16, hidden_act="gelu_pytorch_tanh", num_position_embeddings=2304,
            deepstack_visual_indexes=[0, 1])).vision_config
    else:
        from transformers import Qwen2_5_VLConfig
        vision_config = Qwen2_5_VLConfig(vision_config=dict(
            common, patch_size=14, hidden_act="silu", window_size=112, fullatt_block_indexes=[1])).vision_config
    vision_config._attn_implementation = "eager"
    grid = np.array([[1, 10, 14], [1, 22, 8], [1, 4, 4], [2, 8, 10]])
    model = _hf_vision_model(arch, vision_config)
    params = _stacked_params(model.state_dict())
    real, padded = _patches(vision_config, grid, num_padding=8, seed=5)
    real, padded = 0.3 * real, 0.3 * padded  # normalized-image scale
    want_embeds, want_deepstack = _hf_outputs(model.double(), real.astype(np.float64), grid)
    embeds, deepstack = jax.jit(lambda p, x, v: apply_vision(p, vision_config, x, v))(
        params, jnp.asarray(padded), vision_inputs(vision_config, grid, padded.shape[0]))
    num_real_tokens = real.shape[0] // 4
    np.testing.assert_allclose(np.asarray(embeds)[:num_real_tokens], want_embeds, atol=TOL, rtol=0)
    if arch == "qwen3_vl":
        np.testing.assert_allclose(np.asarray(deepstack)[:, :num_real_tokens], want_deepstack, atol=TOL, rtol=0)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention exists on GPUs only")
@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_cudnn_bf16_packed_slots_keep_frames_apart(arch):
    """On GPU in bf16 the tower takes cuDNN attention, with the in-slot segment mask for packed
    mixed sizes: a frame's tokens match fp32 XLA within bf16 noise, and changing one frame moves no
    other frame sharing its slot."""
    from jaxrl_vl.models import vision

    vision_config = _tiny_config(arch)
    assert vision._attention_implementation(jnp.bfloat16, 16, 32, True) == "cudnn"
    params = _stacked_params(_hf_vision_model(arch, vision_config).state_dict())
    _, padded = _patches(vision_config, GRID_THW, num_padding=20, seed=3)
    vinputs = vision_inputs(vision_config, GRID_THW, padded.shape[0])
    assert "vision_slot_segments" in vinputs  # packed: several frames share a slot
    run = jax.jit(lambda x, dtype: apply_vision(params, vision_config, x, vinputs, dtype)[0], static_argnums=1)
    frame_tokens = np.repeat(np.arange(5), [6, 8, 4, 4, 1])
    want = np.asarray(run(jnp.asarray(padded), jnp.float32))[:len(frame_tokens)]
    got = np.asarray(run(jnp.asarray(padded), jnp.bfloat16).astype(jnp.float32))[:len(frame_tokens)]
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()
    changed = padded.copy()
    changed[:4 * 6] += 3.0  # frame 0, packed together with frame 4 (tests above pin the layout)
    after = np.asarray(run(jnp.asarray(changed), jnp.bfloat16).astype(jnp.float32))[:len(frame_tokens)]
    delta = np.abs(after - got).max(axis=1)
    assert delta[frame_tokens == 0].min() > 1e-2
    np.testing.assert_allclose(delta[frame_tokens != 0], 0.0, atol=1e-6)
