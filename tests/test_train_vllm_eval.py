"""Generation eval through vLLM: pushed weights are what vLLM samples from (its greedy texts equal
our JAX greedy decode on the same, perturbed, weights)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_vl import models
from jaxrl_vl.data.digits import digit_examples
from jaxrl_vl.data.pipeline import render_records
from jaxrl_vl.data.render import HFRenderer
from jaxrl_vl.data.sources import classifier_record
from jaxrl_vl.train.evaluation import JaxGreedyGenerator, prompt_from_example
from jaxrl_vl.train.vllm_eval import VLLMGenerator


@pytest.mark.vllm
def test_vllm_greedy_equals_jax_greedy_after_push(vllm_server, tiny_model_dir):
    config, params = models.load(tiny_model_dir)
    params = jax.tree.map(jnp.asarray, params)
    renderer = HFRenderer.from_pretrained(tiny_model_dir)
    records = [classifier_record(f"d{i}", image, name) for i, image, name in digit_examples("test")[:4]]
    prompts = [prompt_from_example(e, r) for e, r in zip(render_records(records, renderer, max_length=128), records)]
    head = "lm_head" if not config.tie_word_embeddings else None
    noise = jax.random.normal(jax.random.PRNGKey(3), params["lm_head"]["weight"].shape) * 0.5 if head else None
    perturbed = dict(params, lm_head={"weight": params["lm_head"]["weight"] + noise}) if head else jax.tree.map(
        lambda x: x * 1.5, params)

    jax_generator = JaxGreedyGenerator(config, renderer.tokenizer, image_mean=renderer.image_mean,
                                       image_std=renderer.image_std, stop_token_ids=(renderer.end_id,),
                                       pad_id=renderer.pad_token_id)
    want = jax_generator.generate(perturbed, prompts, max_new_tokens=8)
    original = jax_generator.generate(params, prompts, max_new_tokens=8)
    assert want != original  # the perturbation changes the answers, so equality below proves the push

    generator = VLLMGenerator(tiny_model_dir, config, renderer.tokenizer, url=vllm_server.url)
    try:
        got = generator.generate(perturbed, prompts, max_new_tokens=8, version=7)
        assert got == want
    finally:
        generator.generate(params, prompts[:1], max_new_tokens=1, version=0)  # leave the shared server as found
        generator.close()
