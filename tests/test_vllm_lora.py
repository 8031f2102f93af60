"""LoRA push into a LoRA-enabled CPU vLLM server: sampled-token logprobs equal the JAX model with
the adapter overlaid (fp32), and a second version replaces the first in place."""
import asyncio

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxrl_vl.rollout.client import VLLMClient, sampled_logprobs
from jaxrl_vl.rollout.messages import to_openai_messages
from jaxrl_vl.rollout.mm_decode import decode_images, normalize_pixels
from jaxrl_vl.rollout.weight_push import push_lora

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def lora_server(tiny_model_dir, tmp_path_factory):
    from jaxrl_vl.rollout.server import ServerConfig, start_server, stop_server

    handle = start_server(ServerConfig(model=tiny_model_dir, served_model_name="tiny", enable_lora=True,
                                       max_lora_rank=8, max_loras=1, cpu_kv_cache_gib=1,
                                       log_dir=str(tmp_path_factory.mktemp("vllm_lora_logs"))))
    try:
        yield handle
    finally:
        stop_server(handle)


def _random_adapter(params, cfg, seed):
    from jaxrl_vl.models.lora import init_lora

    lora = init_lora(params, cfg, jax.random.PRNGKey(seed))
    # non-zero B so the adapter changes the model
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (0.05 * jax.random.normal(jax.random.PRNGKey(seed + len(path)), x.shape)
                         if "lora_B" in jax.tree_util.keystr(path) else x), lora)


def _jax_logprobs(params, lora, cfg, config, rendered, sampled, mean, std):
    from jaxrl_vl.models import apply, make_batch
    from jaxrl_vl.models.lora import overlay

    pixels, grid = decode_images(rendered["features"])
    row = {"input_ids": np.asarray(rendered["token_ids"] + sampled, np.int32),
           "pixel_values": normalize_pixels(pixels, mean, std), "image_grid_thw": grid}
    batch = {k: jnp.asarray(v) for k, v in make_batch([row], config).items()}
    logprobs = jax.nn.log_softmax(apply(overlay(params, lora, cfg), batch, config)[0], -1)
    n = len(sampled)
    positions = np.arange(len(row["input_ids"]) - n - 1, len(row["input_ids"]) - 1)
    return np.asarray(logprobs[positions, row["input_ids"][-n:]])


def test_lora_push_matches_jax_overlay(lora_server, tiny_model_dir, tmp_path):
    import json
    from pathlib import Path

    from jaxrl_vl.models import load
    from jaxrl_vl.models.lora import LoraConfig

    config, params = load(tiny_model_dir)
    cfg = LoraConfig(rank=4, alpha=8.0, targets=("attention", "mlp"))
    adapters = [_random_adapter(params, cfg, seed) for seed in (1, 2)]
    processor = json.loads((Path(tiny_model_dir) / "preprocessor_config.json").read_text())
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    messages = to_openai_messages([{"role": "user", "content": [{"type": "image", "image": image},
                                                                {"type": "text", "text": "Go."}]}])
    sampling = {"temperature": 1.0, "max_tokens": 8, "seed": 4, "logprobs": 0, "ignore_eos": True,
                "logit_bias": {str(config.image_token_id): -100.0}}

    async def scenario():
        outputs = []
        async with VLLMClient(lora_server.url, "policy-lora") as client:
            for version, lora in enumerate(adapters, start=1):
                await push_lora(lora, cfg, config, [client], version, lora_name="policy-lora", root=str(tmp_path))
                rendered = await client.render(messages)
                outputs.append((rendered, (await client.generate(rendered, sampling))["choices"][0]))
        return outputs

    outputs = asyncio.run(scenario())
    assert len(list(tmp_path.glob("jaxrl_vl_lora_*"))) == 2  # a new folder per version
    for lora, (rendered, choice) in zip(adapters, outputs):
        expected = _jax_logprobs(params, lora, cfg, config, rendered, choice["token_ids"],
                                 processor["image_mean"], processor["image_std"])
        np.testing.assert_allclose(sampled_logprobs(choice), expected, atol=1e-4, rtol=0)
    # version 2 replaced version 1: its logprobs are not version 1's
    rendered, second = outputs[1]
    first_adapter_view = _jax_logprobs(params, adapters[0], cfg, config, rendered, second["token_ids"],
                                       processor["image_mean"], processor["image_std"])
    assert np.abs(first_adapter_view - np.asarray(sampled_logprobs(second))).max() > 1e-2
