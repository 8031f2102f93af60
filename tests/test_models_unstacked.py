"""The unstacked params layout (models.layout): per-layer lists of "layers" / "blocks" /
"deepstack_merger_list" run by Python loops. On tiny random Qwen3-VL (DeepStack) and Qwen2.5-VL
(windowed + full-attention blocks, sliding-window text layers) models, fp32 CPU: the conversion round-trips exactly, logits and
gradients equal the stacked lax.scan path, and sharding specs equal the stacked ones minus the layer axis."""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_parity  # noqa: E402
from tiny_vl import spread_params  # noqa: E402

from jaxrl_vl import models, sharding  # noqa: E402
from jaxrl_vl.models.config import ModelConfig  # noqa: E402
from jaxrl_vl.models.lora import LoraConfig, init_lora, overlay  # noqa: E402

ARCHS = ("qwen3_vl", "qwen2_5_vl")
SPECIAL_IDS = dict(image_token_id=250, video_token_id=251, vision_start_token_id=248, vision_end_token_id=249)
LORA = LoraConfig(rank=4, targets=("attention", "mlp", "merger"), include_vision=True)


def _config(arch: str) -> ModelConfig:
    text = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6)
    vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=4)
    if arch == "qwen3_vl":
        text.update(head_dim=16, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                      mrope_section=[2, 3, 3], mrope_interleaved=True))
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0, 2])  # taps at both ends
    else:
        text.update(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
                    use_sliding_window=True, sliding_window=6, max_window_layers=1)  # layers 1, 2 slide
        vision.update(window_size=16, fullatt_block_indexes=[1])
    return ModelConfig.from_hf_dict({"model_type": arch, "tie_word_embeddings": False, "text_config": text,
                                     "vision_config": vision, **SPECIAL_IDS})


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    config = _config(request.param)
    rows = check_parity._synthetic_rows(config, np.random.default_rng(0))
    return config, spread_params(config), models.make_batch(rows, config)


def _assert_trees_equal(a, b, atol=0.0):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.shape(x) == np.shape(y) and np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


def test_round_trip_is_exact(model):
    config, params, _ = model
    unstacked = models.unstack_layers(params)
    text, visual = unstacked["model"]["language_model"], unstacked["model"]["visual"]
    assert isinstance(text["layers"], list) and len(text["layers"]) == config.text.num_hidden_layers
    assert isinstance(visual["blocks"], list) and len(visual["blocks"]) == config.vision.depth
    if config.arch == "qwen3_vl":
        assert len(visual["deepstack_merger_list"]) == 2
    assert models.is_unstacked(unstacked) and not models.is_unstacked(params)
    _assert_trees_equal(models.stack_layers(unstacked), params)
    _assert_trees_equal(models.unstack_layers(unstacked), unstacked)  # idempotent both ways
    _assert_trees_equal(models.stack_layers(params), params)
    # LoRA: the adapter tree and the overlaid params (lora_scale [L] -> per-layer scalars)
    lora = init_lora(params, LORA, jax.random.key(2))
    _assert_trees_equal(models.stack_layers(models.unstack_layers(lora)), lora)
    _assert_trees_equal(init_lora(unstacked, LORA, jax.random.key(2)), models.unstack_layers(lora))
    wrapped = overlay(params, lora, LORA)
    _assert_trees_equal(models.stack_layers(models.unstack_layers(wrapped)), wrapped)
    _assert_trees_equal(overlay(unstacked, models.unstack_layers(lora), LORA), models.unstack_layers(wrapped))
    with pytest.raises(ValueError, match="layout"):
        overlay(unstacked, lora, LORA)


def _loss_fn(config, batch, layer_loop):
    def loss(params):
        logits = models.apply(params, batch, config, remat="dots", layer_loop=layer_loop)
        return jnp.mean(logits ** 2), logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def test_unstacked_unrolled_equals_stacked_scan(model):
    """Logits and gradients (also of LoRA adapters on unstacked params) equal the scanned stack."""
    config, params, batch = model
    (scan_loss, scan_logits), scan_grads = _loss_fn(config, batch, "scan")(params)
    (loss, logits), grads = _loss_fn(config, batch, "unrolled")(models.unstack_layers(params))
    assert float(jnp.abs(scan_logits).max()) > 1.0
    np.testing.assert_allclose(np.asarray(logits), np.asarray(scan_logits), rtol=0, atol=1e-5)
    np.testing.assert_allclose(float(loss), float(scan_loss), rtol=1e-6)
    assert isinstance(grads["model"]["visual"]["blocks"], list)  # gradients come in the params' layout
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["model"]["visual"]["blocks"]))
    _assert_trees_equal(models.stack_layers(grads), scan_grads, atol=1e-5)
    # the layout decides: unstacked params run the Python loop whatever layer_loop says
    np.testing.assert_allclose(np.asarray(models.apply(models.unstack_layers(params), batch, config, layer_loop="scan")),
                               np.asarray(scan_logits), rtol=0, atol=1e-5)

    lora = init_lora(params, LORA, jax.random.key(2))
    lora = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(3), a.shape), lora)  # B != 0

    def lora_grads(base, adapters, layer_loop):
        def loss(a):
            return jnp.mean(models.apply(overlay(base, a, LORA), batch, config, remat="dots",
                                         layer_loop=layer_loop) ** 2)
        return jax.jit(jax.grad(loss))(adapters)
    _assert_trees_equal(models.stack_layers(lora_grads(models.unstack_layers(params), models.unstack_layers(lora),
                                                       "unrolled")),
                        lora_grads(params, lora, "scan"), atol=1e-5)


def test_hf_export_lora_merge_and_checkpoint_restore_take_either_layout(model, tmp_path):
    """What the trainer does with unstacked params at its boundaries gives what the stacked params give: HF
    tensors (weight push, export), a merged LoRA adapter, a PEFT adapter, and an orbax checkpoint restored
    without a target (train/export.py)."""
    import orbax.checkpoint as ocp
    from safetensors.numpy import load_file

    from jaxrl_vl.models.lora import export_peft, merge

    config, params, _ = model
    unstacked = models.unstack_layers(params)
    want = models.to_hf_state_dict(params, config)
    got = models.to_hf_state_dict(unstacked, config)
    assert sorted(got) == sorted(want) and any(".layers.2." in name for name in got)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)

    lora = init_lora(params, LORA, jax.random.key(2))
    lora = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(3), a.shape), lora)
    _assert_trees_equal(models.stack_layers(merge(unstacked, models.unstack_layers(lora), LORA)),
                        merge(params, lora, LORA))
    for name, tree in (("stacked", lora), ("unstacked", models.unstack_layers(lora))):
        export_peft(tree, LORA, config, str(tmp_path / name))
    peft_stacked = load_file(str(tmp_path / "stacked" / "adapter_model.safetensors"))
    peft_unstacked = load_file(str(tmp_path / "unstacked" / "adapter_model.safetensors"))
    assert sorted(peft_unstacked) == sorted(peft_stacked)
    for name in peft_stacked:
        np.testing.assert_array_equal(peft_unstacked[name], peft_stacked[name], err_msg=name)

    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("state",)) as manager:
        manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": unstacked})))
        manager.wait_until_finished()
        restored = manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state["params"]
    restored_hf = models.to_hf_state_dict(jax.tree.map(np.asarray, restored), config)
    assert sorted(restored_hf) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(restored_hf[name], want[name], err_msg=name)


class _FakeMesh:
    def __init__(self, data=1, fsdp=1, tensor=1):
        self.shape = {"data": data, "fsdp": fsdp, "tensor": tensor}


def _specs_by_name(tree, mesh, min_sharded_size) -> dict[str, tuple]:
    specs = sharding.param_partition_specs(tree, mesh, min_sharded_size)
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return {sharding.path_to_name(path): tuple(spec) for path, spec in flat[0]}


def _stacked_name(name: str) -> tuple[str, bool]:
    """"a.layers.2.b" -> ("a.layers.b", True): the stacked leaf an unstacked one comes from."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in sharding.STACKED_LIST_NAMES and parts[i + 1].isdigit():
            return ".".join(parts[:i + 1] + parts[i + 2:]), True
    return name, False


@pytest.mark.parametrize("min_sharded_size", [0, 2048, sharding.MIN_SHARDED_SIZE])
def test_unstacked_specs_are_stacked_specs_minus_the_layer_axis(model, min_sharded_size):
    """Params, a LoRA tree and AdamW states; meshes with fsdp and/or tensor (the rules only read
    mesh.shape, so no devices are needed). Thresholds between a layer's and a stack's size included."""
    _, params, _ = model
    trees = [params, init_lora(params, LORA, jax.random.key(2)), optax.adamw(1e-3).init(params)]
    for mesh in (_FakeMesh(fsdp=2, tensor=2), _FakeMesh(fsdp=4), _FakeMesh(tensor=2)):
        for tree in trees:
            stacked = _specs_by_name(tree, mesh, min_sharded_size)
            unstacked = _specs_by_name(models.unstack_layers(tree), mesh, min_sharded_size)
            assert any(".layers.2." in name for name in unstacked) and any(".blocks.2." in name for name in unstacked)
            for name, spec in unstacked.items():
                source, per_layer = _stacked_name(name)
                assert spec == (stacked[source][1:] if per_layer else stacked[source]), (name, mesh.shape)
            if min_sharded_size == 0 and mesh.shape["tensor"] == 2 and tree is params:
                assert unstacked["model.language_model.layers.1.self_attn.q_proj.weight"][0] == "tensor"


def test_unstacked_params_place_on_a_real_mesh(model):
    config, params, _ = model
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    placed = sharding.shard_params(models.unstack_layers(params), mesh, min_sharded_size=0)
    assert isinstance(placed["model"]["language_model"]["layers"], list)
    lines = sharding.describe_param_sharding(placed, mesh)
    assert any(line.startswith("model.language_model.layers.2.self_attn.q_proj.weight (") for line in lines)
