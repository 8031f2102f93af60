"""The SFT step (gradient accumulation, LoRA), FLOPs formula and the JAX greedy eval decode,
on the tiny checkpoint with real rendered digit examples."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from jaxrl_vl import models
from jaxrl_vl.data.digits import digit_examples
from jaxrl_vl.data.pipeline import render_records
from jaxrl_vl.data.render import HFRenderer
from jaxrl_vl.data.sources import classifier_record
from jaxrl_vl.train import flops
from jaxrl_vl.data.collate import sft_collate_fn, split_host_stats
from jaxrl_vl.losses.target_positions import target_positions
from jaxrl_vl.train.evaluation import JaxGreedyGenerator, is_correct, prompt_from_example
from jaxrl_vl.train.optim import make_optimizer
from jaxrl_vl.train.sft_step import make_sft_step
from jaxrl_vl.train.step import Forward, ParamsView
from jaxrl_vl.train.state import create_train_state

OPTIM = ConfigDict(dict(learning_rate=1e-3, schedule="constant", warmup_steps=0, end_learning_rate_fraction=1.0,
                        weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, max_grad_norm=0.0))


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    config, params = models.load(tiny_model_dir)
    renderer = HFRenderer.from_pretrained(tiny_model_dir)
    records = [classifier_record(f"d{i}", image, name) for i, image, name in digit_examples("test")[:4]]
    examples = render_records(records, renderer, max_length=128)
    return config, jax.tree.map(jnp.asarray, params), renderer, records, examples


def _collate(config, renderer, accum):
    return sft_collate_fn(config, grad_accum_steps=accum, max_length=128, loss_on="last",
                                image_mean=renderer.image_mean, image_std=renderer.image_std, packing=False,
                                pad_id=renderer.pad_token_id)


def test_target_positions_list_where_a_target_follows_padded_with_the_last_position():
    mask = np.zeros((2, 3, 10), np.float32)
    mask[0, 0, [3, 4, 9]] = 1   # positions 2, 3, 8 predict them
    mask[1, 2, [1]] = 0.5       # any nonzero weight counts
    mask[1, 1, 0] = 1           # token 0 is never predicted (nothing precedes it)
    positions = target_positions(mask, multiple=4)
    assert positions.shape == (2, 3, 4) and positions.dtype == np.int32
    assert positions[0, 0].tolist() == [2, 3, 8, 9]
    assert positions[1, 2].tolist() == [0, 9, 9, 9]
    assert positions[1, 1].tolist() == [9, 9, 9, 9]
    assert target_positions(np.ones((1, 10)), multiple=4).shape == (1, 10)  # capped at L
    with pytest.raises(ValueError, match="multiple"):
        target_positions(mask, multiple=0)


def test_grad_accumulation_equals_one_big_batch(setup):
    config, params, renderer, _, examples = setup
    # plain SGD: the update is the gradient itself, so params compare like gradients do (Adam's
    # first step, ~lr * sign(g), would amplify float-order noise on near-zero gradients)
    optimizer, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
    results = []
    for accum in (1, 2):
        batch, host = split_host_stats(_collate(config, renderer, accum)([[e] for e in examples]))
        assert batch["input_ids"].shape[:2] == (accum, 4 // accum) and host["host_num_images"] == 4
        step = make_sft_step(Forward(config), optimizer, schedule, donate=False)
        state = create_train_state(params, optimizer, jax.random.PRNGKey(0))
        new_state, metrics = step(state, batch)
        results.append((new_state, metrics))
    (state1, m1), (state2, m2) = results
    assert int(state1.step) == 1
    assert float(m1["target_tokens"]) == float(m2["target_tokens"]) > 0
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state2.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    moved = sum(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(params)))
    assert moved > 0  # the step changed the params


def test_chunked_fused_loss_gives_the_full_logits_update(setup):
    """loss_chunk_size > 0 takes the fused cross-entropy (gradient formed in the forward pass): same loss, same
    gradient norm and same SGD update as the plain full-logits loss."""
    config, params, renderer, _, examples = setup
    optimizer, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
    batch, _ = split_host_stats(_collate(config, renderer, 2)([[e] for e in examples]))
    results = []
    for chunk in (0, 24):  # 24: rows of 128 tokens in 6 chunks
        step = make_sft_step(Forward(config, loss_chunk_size=chunk), optimizer, schedule, donate=False)
        results.append(step(create_train_state(params, optimizer, jax.random.PRNGKey(0)), batch))
    (plain, m_plain), (fused, m_fused) = results
    np.testing.assert_allclose(float(m_fused["loss"]), float(m_plain["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m_fused["grad_norm"]), float(m_plain["grad_norm"]), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(fused.params), jax.tree.leaves(plain.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("lm_head_lora", [False, True])
def test_logits_at_target_positions_only_give_the_same_update(setup, lm_head_lora):
    """target_positions (the chunked loss computes logits only where a target follows): the same loss and the
    same update as logits everywhere, for the fused loss and for the logprobs path a LoRA'd lm_head takes."""
    from jaxrl_vl.models import lora as lora_lib
    config, params, renderer, _, examples = setup
    if lm_head_lora and config.tie_word_embeddings:
        pytest.skip("tied embeddings: no separate lm_head to adapt")
    optimizer, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
    lora_cfg = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("unembed",)) if lm_head_lora else None
    results = []
    for multiple in (0, 8):
        collate = sft_collate_fn(config, grad_accum_steps=2, max_length=128, loss_on="last",
                                       image_mean=renderer.image_mean, image_std=renderer.image_std, packing=False,
                                       pad_id=renderer.pad_token_id, target_positions_multiple=multiple)
        batch, _ = split_host_stats(collate([[e] for e in examples]))
        if multiple:  # loss_on="last": a handful of targets per row, far fewer positions than tokens
            assert batch["target_positions"].shape[:2] == (2, 2)
            assert batch["target_positions"].shape[2] % multiple == 0
            assert batch["target_positions"].shape[2] < batch["input_ids"].shape[2]
        overlay = None if lora_cfg is None else (lambda p, l: lora_lib.overlay(p, l, lora_cfg))
        lora = None if lora_cfg is None else lora_lib.init_lora(params, lora_cfg, jax.random.PRNGKey(1))
        if lora is not None:  # B starts at 0; a nonzero B makes the adapter part of the logits
            lora = jax.tree.map(lambda a: a + 0.01, lora)
        step = make_sft_step(Forward(config, loss_chunk_size=16), optimizer, schedule, ParamsView(lora_overlay=overlay),
                             donate=False)
        results.append(step(create_train_state(params, optimizer, jax.random.PRNGKey(0), lora=lora), batch))
    (full, m_full), (picked, m_picked) = results
    assert float(m_picked["target_tokens"]) == float(m_full["target_tokens"]) > 0
    np.testing.assert_allclose(float(m_picked["loss"]), float(m_full["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m_picked["grad_norm"]), float(m_full["grad_norm"]), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(picked.trainable), jax.tree.leaves(full.trainable)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_repeated_steps_reduce_the_loss_and_lora_trains_only_the_adapter(setup):
    from jaxrl_vl.models import lora as lora_lib
    config, params, renderer, _, examples = setup
    batch, _ = split_host_stats(_collate(config, renderer, 1)([[e] for e in examples]))
    lora_cfg = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("attention", "mlp"))
    lora = lora_lib.init_lora(params, lora_cfg, jax.random.PRNGKey(1))
    optimizer, schedule = make_optimizer(OPTIM.copy_and_resolve_references(), 10)
    step = make_sft_step(Forward(config), optimizer, schedule,
                         ParamsView(lora_overlay=lambda p, l: lora_lib.overlay(p, l, lora_cfg)), donate=False)
    state = create_train_state(params, optimizer, jax.random.PRNGKey(0), lora=lora)
    losses = []
    for _ in range(5):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # base weights frozen
    assert any(float(jnp.abs(a - b).max()) > 0 for a, b in zip(jax.tree.leaves(state.lora), jax.tree.leaves(lora)))


def test_text_flops_match_the_weight_shapes(setup):
    """Per token, the forward matmul FLOPs are 2 x the decoder's matmul weights + lm_head (+ the
    attention term), counted here from the actual params tree."""
    config, params, *_ = setup
    text = params["model"]["language_model"]["layers"]
    matmul_weights = sum(int(np.prod(leaf.shape)) for path, leaf in jax.tree_util.tree_flatten_with_path(text)[0]
                         if path[-1].key == "weight" and leaf.ndim == 3)  # stacked [layers, out, in]
    head = models.qwen_vl.embedding_table(params) if config.tie_word_embeddings else params["lm_head"]["weight"]
    seq_len = 64
    attention = config.text.num_hidden_layers * 4 * config.text.num_attention_heads * config.text.head_dim * seq_len
    want = 2 * matmul_weights + 2 * int(np.prod(head.shape)) + attention
    assert flops.text_forward_flops_per_token(config.text, seq_len) == want
    assert flops.train_flops(config, num_tokens=10, seq_len=seq_len) == 3 * 10 * want
    assert flops.train_flops(config, num_tokens=10, seq_len=seq_len, num_patches=16, num_images=1) > 3 * 10 * want
    # logits at 4 of the 10 tokens only (target_positions): 6 tokens' lm_head less
    assert flops.train_flops(config, num_tokens=10, seq_len=seq_len, logit_tokens=4) == \
        3 * (10 * want - 6 * 2 * int(np.prod(head.shape)))
    assert flops.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops_per_device("cpu", override=5.0) == 5.0
    assert flops.mfu(1e12, 1.0, 2, 1e12) == 0.5


def test_greedy_decode_matches_teacher_forced_argmax(setup):
    """One full forward over prompt + generated tokens: each generated token is the argmax at the
    position before it (what greedy decoding means), and decoding stopped at <|im_end|> or the cap."""
    from jaxrl_vl.data.render import normalize_pixels
    config, params, renderer, records, examples = setup
    prompts = [prompt_from_example(e, r) for e, r in zip(examples, records)]
    assert prompts[0].messages and prompts[0].messages[-1]["role"] == "user"
    generator = JaxGreedyGenerator(config, renderer.tokenizer, image_mean=renderer.image_mean,
                                   image_std=renderer.image_std, stop_token_ids=(renderer.end_id,),
                                   pad_id=renderer.pad_token_id, batch_size=3)  # 2 chunks, uneven
    max_new = 6
    generated_ids = generator.generate_ids(params, prompts, max_new_tokens=max_new)
    texts = generator.generate(params, prompts, max_new_tokens=max_new)
    assert texts == [renderer.tokenizer.decode(ids, skip_special_tokens=True) for ids in generated_ids]
    rows = [{"input_ids": np.concatenate([p.input_ids, ids]).astype(np.int32), "image_grid_thw": p.image_grid_thw,
             "pixel_values": normalize_pixels(p.pixel_values, renderer.image_mean, renderer.image_std)}
            for p, ids in zip(prompts[:3], generated_ids)]
    batch = {k: v for k, v in models.make_batch(rows, config).items() if k != "image_grid_thw"}
    logits = models.apply(params, batch, config)
    for b, (prompt, ids) in enumerate(zip(prompts[:3], generated_ids)):
        start = len(prompt.input_ids)
        assert len(ids) == max_new or ids[-1] == renderer.end_id
        predicted = np.asarray(jnp.argmax(logits[b, start - 1:start - 1 + len(ids)], axis=-1))
        np.testing.assert_array_equal(predicted, np.asarray(ids))


def test_answer_scoring():
    prompt = prompt_from_example.__globals__["GenerationPrompt"](
        id="x", input_ids=np.zeros(1, np.int32), pixel_values=np.zeros((0, 1)), image_grid_thw=np.zeros((0, 3)),
        reference="The subject in this photo is: seven", label="seven")
    assert is_correct("The subject in this photo is: Seven ", prompt)
    assert is_correct("The subject in this photo is: seven<|im_end|>junk", prompt)
    assert not is_correct("The subject in this photo is: one", prompt)
    assert not is_correct("The subject in this photo is: seventy", prompt)
    free = prompt.__class__(id="y", input_ids=prompt.input_ids, pixel_values=prompt.pixel_values,
                            image_grid_thw=prompt.image_grid_thw, reference="Go  left.")
    assert is_correct("go left.", free) and not is_correct("go right.", free)
