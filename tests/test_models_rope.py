"""M-RoPE: position ids equal transformers' get_rope_index; cos/sin equal transformers' rotary modules."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxrl_vl.models.config import ModelConfig  # noqa: E402
from jaxrl_vl.models.rope import mrope_position_ids, rotary_cos_sin  # noqa: E402

from test_models_parity import SPECIAL_IDS, hf_config  # noqa: E402

IMAGE = SPECIAL_IDS["image_token_id"]
ARCH_CLASSES = {"qwen3_vl": "Qwen3VLModel", "qwen2_5_vl": "Qwen2_5_VLModel"}


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen2_5_vl"])
def hf_model(request):
    torch.manual_seed(0)
    config = hf_config(request.param)
    return request.param, getattr(transformers, ARCH_CLASSES[request.param])(config).eval()


def _mixed_rows(rng, images_per_row):
    """Token rows with image blocks of random grids, and the grids in row-major order of appearance."""
    rows, grids = [], []
    for count in images_per_row:
        tokens = list(rng.integers(3, 240, rng.integers(1, 6)))
        for _ in range(count):
            grid = [1, 2 * int(rng.integers(1, 5)), 2 * int(rng.integers(1, 5))]
            grids.append(grid)
            tokens += [SPECIAL_IDS["vision_start_token_id"]] + [IMAGE] * (grid[1] * grid[2] // 4)
            tokens += [SPECIAL_IDS["vision_end_token_id"]] + list(rng.integers(3, 240, rng.integers(0, 4)))
        rows.append(tokens)
    return rows, np.asarray(grids, np.int64).reshape(-1, 3)


def _pad(rows, side, extra=2):
    length = max(map(len, rows)) + extra
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[i, span], mask[i, span] = row, 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_position_ids_equal_get_rope_index(hf_model, side, seed):
    _, model = hf_model
    rng = np.random.default_rng(seed)
    rows, grids = _mixed_rows(rng, images_per_row=[2, 0, 1, 3, 0])  # several images, text-only rows
    ids, mask = _pad(rows, side)
    expected, _ = model.get_rope_index(torch.tensor(ids), mm_token_type_ids=torch.tensor((ids == IMAGE).astype(int)),
                                       image_grid_thw=torch.tensor(grids), attention_mask=torch.tensor(mask))
    ours = mrope_position_ids(ids, mask, grids, IMAGE, spatial_merge_size=2)
    assert ours.dtype == np.int32 and ours.shape == (3,) + ids.shape
    np.testing.assert_array_equal(ours, expected.numpy())


def test_packed_segments_restart_positions():
    rng = np.random.default_rng(3)
    rows, grids = _mixed_rows(rng, images_per_row=[1, 2])
    alone = [mrope_position_ids(np.asarray([r]), np.ones((1, len(r)), int), g, IMAGE, 2)[:, 0]
             for r, g in ((rows[0], grids[:1]), (rows[1], grids[1:]))]
    packed_ids = np.asarray([rows[0] + rows[1] + [0, 0]])
    segments = np.asarray([[1] * len(rows[0]) + [2] * len(rows[1]) + [0, 0]])
    packed = mrope_position_ids(packed_ids, segments, grids, IMAGE, 2)[:, 0]
    np.testing.assert_array_equal(packed[:, :len(rows[0])], alone[0])
    np.testing.assert_array_equal(packed[:, len(rows[0]):-2], alone[1])
    np.testing.assert_array_equal(packed[:, -2:], 0)


def test_image_count_mismatch_is_reported():
    rows, grids = _mixed_rows(np.random.default_rng(4), images_per_row=[2])
    ids, mask = _pad(rows, "right")
    with pytest.raises(ValueError, match="image_grid_thw has 1 rows"):
        mrope_position_ids(ids, mask, grids[:1], IMAGE, 2)
    with pytest.raises(ValueError, match="image 0"):
        mrope_position_ids(ids, mask, grids[::-1] * np.array([1, 2, 2]), IMAGE, 2)


ROPE_VARIANTS = {
    "default": None,
    "linear": dict(rope_type="linear", factor=2.0),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=16, beta_slow=2),
}


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_cos_sin_equal_transformers_rotary(arch, variant):
    overrides = {}
    if ROPE_VARIANTS[variant]:
        section = [2, 3, 3]
        overrides["rope_parameters"] = dict(rope_theta=10000.0, mrope_section=section, **ROPE_VARIANTS[variant])
    torch.manual_seed(0)
    model = getattr(transformers, ARCH_CLASSES[arch])(hf_config(arch, text_overrides=overrides)).eval()
    config = ModelConfig.from_hf_dict(model.config.to_dict())
    text = config.text
    assert text.rope_type == variant
    positions = np.random.default_rng(0).integers(0, 300, (3, 2, 7))
    x = torch.zeros(1, dtype=torch.float32)
    cos_hf, sin_hf = model.language_model.rotary_emb(x, torch.tensor(positions))
    cos, sin = rotary_cos_sin(positions, text.head_dim, text.rope_theta, text.mrope_section, text.mrope_interleaved,
                              rope_type=text.rope_type, rope_scaling=text.rope_scaling)
    np.testing.assert_allclose(np.asarray(cos), cos_hf.numpy(), atol=2e-6)
    np.testing.assert_allclose(np.asarray(sin), sin_hf.numpy(), atol=2e-6)
    assert text.mrope_interleaved == (arch == "qwen3_vl")
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config


def test_unsupported_rope_type_names_the_field():
    d = hf_config("qwen3_vl").to_dict()
    d["text_config"]["rope_parameters"]["rope_type"] = "longrope"
    with pytest.raises(ValueError, match="rope_parameters.rope_type='longrope'"):
        ModelConfig.from_hf_dict(d)
