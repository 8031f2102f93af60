"""LoRA overlay / merge / PEFT export on tiny random Qwen-VL checkpoints (fp32, CPU).

Checked: zero-initialised B equals the base model; merge equals overlay; the PEFT export loads in
`peft` on the transformers model and gives our overlay's logits (with images, vision LoRA, tied
and untied lm_head); import_peft round-trips; gradients reach the LoRA factors.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import check_parity  # noqa: E402  (synthetic multi-image rows)

from jaxrl_vl import models  # noqa: E402
from jaxrl_vl.models import lora as lora_lib  # noqa: E402

TOLERANCE = 1e-4
pytestmark = pytest.mark.slow  # ~45 s CPU: two tiny HF models, their peft twins, a few compiles
SPECIAL_IDS = dict(image_token_id=250, video_token_id=251, vision_start_token_id=248,
                   vision_end_token_id=249)


def _hf_config(arch: str, tie: bool):
    text = dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
    vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=32,
                  patch_size=4)
    if arch == "qwen3_vl":
        text.update(head_dim=8, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                     mrope_section=[2, 1, 1],
                                                     mrope_interleaved=True))
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0])
        return transformers.Qwen3VLConfig(text_config=text, vision_config=vision,
                                          tie_word_embeddings=tie, **SPECIAL_IDS)
    text.update(rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                     mrope_section=[2, 1, 1]))
    vision.update(window_size=16, fullatt_block_indexes=[1])
    return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                         tie_word_embeddings=tie, **SPECIAL_IDS)


CASES = {  # name: (arch, tied embeddings, LoraConfig)
    "qwen3_vl_vision": ("qwen3_vl", False, lora_lib.LoraConfig(
        rank=4, alpha=8.0, targets=("attention", "mlp", "merger", "unembed"),
        include_vision=True)),
    "qwen2_5_vl_tied": ("qwen2_5_vl", True, lora_lib.LoraConfig(
        rank=2, alpha=4.0, targets=("attention", "mlp", "unembed"))),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    arch, tie, cfg = CASES[request.param]
    model_dir = str(tmp_path_factory.mktemp(request.param))
    torch.manual_seed(0)
    cls = {"qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
           "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration}[arch]
    hf_model = cls(_hf_config(arch, tie)).eval()
    with torch.no_grad():  # spread-out weights so every term moves the logits
        for name, param in hf_model.named_parameters():
            if "norm" in name or "ln_q" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    hf_model.save_pretrained(model_dir)
    config, params = models.load(model_dir)
    batch = models.make_batch(check_parity._synthetic_rows(config, np.random.default_rng(0)),
                              config)
    forward = jax.jit(lambda p, b: models.apply(p, b, config))
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    return dict(name=request.param, arch=arch, tie=tie, cfg=cfg, model_dir=model_dir,
                config=config, params=params, batch=batch, jbatch=jbatch, forward=forward,
                base_logits=np.asarray(forward(params, jbatch)))


def _random_lora(params, cfg, seed=1):
    """init_lora, then a non-zero B (as after training)."""
    lora = lora_lib.init_lora(params, cfg, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, leaves)


def _real(case):
    return case["batch"]["segment_ids"] > 0


def test_targets_cover_expected_modules(case):
    modules = {".".join(p) for p in lora_lib.target_modules(case["params"], case["cfg"])}
    assert "model.language_model.layers.self_attn.q_proj" in modules
    assert "model.language_model.layers.mlp.down_proj" in modules
    assert "lm_head" in modules
    if case["cfg"].include_vision:
        assert {"model.visual.blocks.attn.qkv", "model.visual.blocks.mlp.linear_fc1",
                "model.visual.merger.linear_fc2",
                "model.visual.deepstack_merger_list.linear_fc1"} <= modules
    else:
        assert not any("visual" in m for m in modules)


def test_zero_b_equals_base(case):
    lora = lora_lib.init_lora(case["params"], case["cfg"], jax.random.key(0))
    b_factors = [v for k, v in jax.tree_util.tree_flatten_with_path(lora)[0] if "lora_B" in str(k)]
    assert b_factors and all(float(jnp.abs(b).max()) == 0.0 for b in b_factors)
    out = case["forward"](lora_lib.overlay(case["params"], lora, case["cfg"]), case["jbatch"])
    np.testing.assert_allclose(np.asarray(out)[_real(case)], case["base_logits"][_real(case)],
                               atol=1e-5)  # fp32 rounding: the overlay adds x A^T B^T with B = 0


def test_merge_equals_overlay(case):
    lora = _random_lora(case["params"], case["cfg"])
    overlaid = np.asarray(case["forward"](lora_lib.overlay(case["params"], lora, case["cfg"]),
                                          case["jbatch"]))
    real = _real(case)
    assert np.abs(overlaid[real] - case["base_logits"][real]).max() > 0.1  # LoRA does something
    if case["tie"]:
        with pytest.raises(ValueError, match="untie_embeddings"):
            lora_lib.merge(case["params"], lora, case["cfg"])
        merged_params = lora_lib.merge(case["params"], lora, case["cfg"], untie_embeddings=True)
        untied = dataclasses.replace(case["config"], tie_word_embeddings=False)
        merged = np.asarray(jax.jit(lambda p, b: models.apply(p, b, untied))(
            merged_params, case["jbatch"]))
    else:
        merged_params = lora_lib.merge(case["params"], lora, case["cfg"])
        merged = np.asarray(case["forward"](merged_params, case["jbatch"]))
    assert not any("lora" in str(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        merged_params)[0])
    np.testing.assert_allclose(merged[real], overlaid[real], atol=TOLERANCE)


def test_peft_export_loads_in_peft_with_same_logits(case, tmp_path):
    lora = _random_lora(case["params"], case["cfg"], seed=3)
    overlaid = np.asarray(case["forward"](lora_lib.overlay(case["params"], lora, case["cfg"]),
                                          case["jbatch"]))
    adapter_dir = lora_lib.export_peft(lora, case["cfg"], case["config"], str(tmp_path / "adapter"),
                                       base_model_name_or_path=case["model_dir"])
    assert sorted(os.listdir(adapter_dir)) == ["adapter_config.json", "adapter_model.safetensors",
                                               "jaxrl_vl_lora.json"]
    from safetensors.numpy import load_file
    keys = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    assert "base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_A.weight" in keys
    assert keys["base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_B.weight"
                ].shape == (case["config"].text.num_attention_heads * case["config"].text.head_dim,
                            case["cfg"].rank)

    cls = {"qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
           "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration}[case["arch"]]
    hf_model = cls.from_pretrained(case["model_dir"], dtype=torch.float32).eval()
    peft_model = peft.PeftModel.from_pretrained(hf_model, adapter_dir).eval()
    # Every tensor we wrote became a LoRA layer in peft, and nothing else did.
    peft_state = {k for k in peft_model.state_dict() if ".lora_" in k}
    assert {k.replace(".weight", ".default.weight") for k in keys} == peft_state

    batch = case["batch"]
    input_ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    grid = batch["image_grid_thw"]
    real_patches = int(np.prod(grid, axis=1).sum())
    with torch.no_grad():
        theirs = peft_model(
            input_ids=input_ids,
            attention_mask=torch.tensor(batch["segment_ids"] > 0, dtype=torch.long),
            mm_token_type_ids=(input_ids == case["config"].image_token_id).long(),
            pixel_values=torch.tensor(batch["pixel_values"][0, :real_patches]),  # one batch shard
            image_grid_thw=torch.tensor(grid, dtype=torch.long)).logits.float().numpy()
    real = _real(case)
    np.testing.assert_allclose(theirs[real], overlaid[real], atol=TOLERANCE)

    lora_back, cfg_back = lora_lib.import_peft(adapter_dir)
    assert cfg_back == case["cfg"]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 lora, lora_back)


def test_grads_reach_lora_factors(case):
    lora = lora_lib.init_lora(case["params"], case["cfg"], jax.random.key(0))
    jbatch = case["jbatch"]

    def loss(lo):
        logits = models.apply(lora_lib.overlay(case["params"], lo, case["cfg"]), jbatch,
                              case["config"])
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    grads = jax.jit(jax.grad(loss))(lora)
    q_proj = grads["model"]["language_model"]["layers"]["self_attn"]["q_proj"]
    # With B = 0 the gradient reaches B (not A): dL/dB = scale * dL/dy (x A^T)^T.
    assert float(jnp.abs(q_proj["lora_B"]).max()) > 0
    assert float(jnp.abs(grads["lm_head"]["lora_B"]).max()) > 0


def test_bad_targets_and_tinker_config():
    params = {"model": {"language_model": {"layers": {"self_attn": {
        "q_proj": {"weight": jnp.zeros((2, 8, 4))}}}, "embed_tokens": {"weight": jnp.zeros((16, 4))}},
        "visual": {"blocks": {"attn": {"qkv": {"weight": jnp.zeros((2, 12, 4))}}}}}}
    with pytest.raises(ValueError, match="matches no linear module.*include_vision"):
        lora_lib.target_modules(params, lora_lib.LoraConfig(targets=("qkv",)))
    with pytest.raises(ValueError, match="'attention', 'merger', 'mlp', 'unembed'"):
        lora_lib.target_modules(params, lora_lib.LoraConfig(targets=("attn_typo",)))
    modules = lora_lib.target_modules(params, lora_lib.LoraConfig(targets=("q_proj", "qkv"),
                                                                   include_vision=True))
    assert set(modules) == {("model", "language_model", "layers", "self_attn", "q_proj"),
                            ("model", "visual", "blocks", "attn", "qkv")}
    # tied model: "unembed" adapts a virtual lm_head shaped like the embedding [V, H]
    assert lora_lib.target_modules(params, lora_lib.LoraConfig(targets=("unembed",))) == \
        {("lm_head",): (16, 4)}
    cfg = lora_lib.lora_config_from_tinker(rank=8, train_mlp=False)
    assert cfg.targets == ("attention", "unembed") and cfg.alpha == 32.0 and cfg.scale == 4.0
    with pytest.raises(ValueError, match="rank"):
        lora_lib.LoraConfig(rank=0)
