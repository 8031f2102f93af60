"""Weight push (`reload`, `stream` and `shm` transports) into the real CPU vLLM server of the session.

A push of perturbed weights changes vLLM's logprobs exactly as transformers predicts for those
weights (fp32), the version label follows the push, images seen before the push are served
again after it (a push clears the encoder cache), restoring the weights restores the logprobs
bit for bit, and a failed push leaves the server serving the previous version.
"""
import asyncio
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from jaxrl_vl.rollout.client import VLLMClient, VLLMError, sampled_logprobs, weight_versions
from jaxrl_vl.rollout.messages import to_openai_messages
from jaxrl_vl.rollout.mm_decode import decode_images, normalize_pixels
from jaxrl_vl.rollout import weight_routes
from jaxrl_vl.rollout.weight_push import (WeightPushError, _wire_arrays, check_weight_versions, push_state_dict,
                                          reload_from_folder, server_weight_version)

pytestmark = pytest.mark.vllm


def _read_state(model_dir: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(f"{model_dir}/model.safetensors")


def _hf_sampled_logprobs(model_dir, state, prompt_ids, sampled_ids, pixels, grid_thw, image_mean, image_std):
    """transformers fp32 logprobs of `sampled_ids` after `prompt_ids`, with `state` loaded."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False)
    ids = torch.tensor([prompt_ids + sampled_ids])
    mm_token_type_ids = (ids == model.config.image_token_id).long()  # 1 marks image tokens (M-RoPE)
    with torch.no_grad():
        logits = model(input_ids=ids, mm_token_type_ids=mm_token_type_ids, pixel_values=torch.from_numpy(normalize_pixels(pixels, image_mean, image_std)),
                       image_grid_thw=torch.from_numpy(grid_thw.astype(np.int64))).logits[0]
    logprobs = torch.log_softmax(logits.double(), -1)
    positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(sampled_ids) - 1)
    return logprobs[positions, torch.tensor(sampled_ids)].numpy()


@pytest.mark.parametrize("transport", ["reload", "stream", "shm"])
def test_push_changes_logprobs_as_transformers_predicts(vllm_server, tiny_model_dir, tmp_path, transport):
    from transformers import AutoProcessor

    image_processor = AutoProcessor.from_pretrained(tiny_model_dir).image_processor
    original = _read_state(tiny_model_dir)
    rng = np.random.default_rng(0)
    perturbed = {k: (v * np.float32(1.5) if k == "lm_head.weight" else
                     v + np.float32(0.02) * rng.standard_normal(v.shape, dtype=np.float32)) for k, v in original.items()}
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (80, 120, 3), dtype=np.uint8))
    messages = to_openai_messages([{"role": "user", "content": [{"type": "image", "image": image},
                                                                {"type": "text", "text": "Which way?"}]}])
    sampling = {"temperature": 1.0, "max_tokens": 10, "seed": 11, "logprobs": 0, "ignore_eos": True}

    async def scenario(client):
        rendered = await client.render(messages)
        # the baseline through the same transport: the restore below must match it bit for bit
        await push_state_dict(original, [client], version=0, transport=transport, root=str(tmp_path))
        before = await client.generate(rendered, sampling)
        try:
            # stream: 1 MB chunks, so the 4 MB model arrives in several requests
            pushed = await push_state_dict(perturbed, [client], version=7, transport=transport, root=str(tmp_path),
                                           chunk_bytes=1_000_000)
            after = await client.generate(rendered, sampling)  # same image again, after the reload
            version = await server_weight_version(client)
        finally:
            restored_push = await push_state_dict(original, [client], version=0, transport=transport,
                                                  root=str(tmp_path))
        restored = await client.generate(rendered, sampling)
        return rendered, before, pushed, after, version, restored_push, restored

    async def main():
        async with VLLMClient(vllm_server.url, vllm_server.served_model_name) as client:
            return await scenario(client)

    rendered, before, pushed, after, version, restored_push, restored = asyncio.run(main())
    assert version == "7" and pushed.version == "7" and pushed.transport == transport
    assert pushed.phase_seconds["server_load"] > 0  # the plugin's one-request route, not the fallback
    assert pushed.num_tensors == len(original)
    assert pushed.num_bytes == sum(v.nbytes for v in original.values()) and pushed.reload_seconds > 0
    choice = after["choices"][0]
    assert weight_versions(choice) == ["7"] and check_weight_versions(choice, 7)
    assert not check_weight_versions(before["choices"][0], 7) and weight_versions(before["choices"][0]) == ["0"]

    pixels, grid_thw = decode_images(rendered["features"])
    expected = _hf_sampled_logprobs(tiny_model_dir, perturbed, rendered["token_ids"], choice["token_ids"], pixels,
                                    grid_thw, image_processor.image_mean, image_processor.image_std)
    np.testing.assert_allclose(sampled_logprobs(choice), expected, atol=1e-4, rtol=0)
    before_choice = before["choices"][0]
    expected_before = _hf_sampled_logprobs(tiny_model_dir, original, rendered["token_ids"],
                                           before_choice["token_ids"], pixels, grid_thw,
                                           image_processor.image_mean, image_processor.image_std)
    np.testing.assert_allclose(sampled_logprobs(before_choice), expected_before, atol=1e-4, rtol=0)
    # restoring the weights restores the sample and its logprobs exactly
    assert restored["choices"][0]["token_ids"] == before_choice["token_ids"]
    assert sampled_logprobs(restored["choices"][0]) == sampled_logprobs(before_choice)
    assert weight_versions(restored["choices"][0]) == ["0"] and restored_push.version == "0"


def test_push_without_weights_is_refused_before_pausing(vllm_server, tmp_path):
    async def scenario(client):
        version_before = await server_weight_version(client)
        with pytest.raises(WeightPushError, match="no \\*.safetensors.*keeps its weights"):
            await reload_from_folder(client, str(tmp_path / "does-not-exist"), version=99)
        response = await client.generate([1, 2, 3], {"max_tokens": 2, "seed": 0, "ignore_eos": True})
        paused = await client.request("GET", "/is_paused")
        return version_before, await server_weight_version(client), response, paused

    async def main():
        async with VLLMClient(vllm_server.url, vllm_server.served_model_name) as client:
            return await scenario(client)

    version_before, version_after, response, paused = asyncio.run(main())
    assert version_after == version_before != "99"
    assert paused == {"is_paused": False} and len(response["choices"][0]["token_ids"]) == 2


def test_stock_route_fallback_serves_the_same_weights(vllm_server, tiny_model_dir, tmp_path):
    """A server without the plugin's routes (stock `vllm serve`) gets vLLM's own call sequence; it
    must end in exactly the state the one-request route gives (same tokens, same logprobs)."""
    original = _read_state(tiny_model_dir)
    scaled = {k: v * np.float32(1.25) if k == "lm_head.weight" else v for k, v in original.items()}
    sampling = {"temperature": 1.0, "max_tokens": 8, "seed": 3, "logprobs": 0, "ignore_eos": True}

    async def main():
        async with VLLMClient(vllm_server.url, vllm_server.served_model_name) as client:
            samples = {}
            for transport in ("reload", "stream"):
                fast = await push_state_dict(scaled, [client], version=11, transport=transport, root=str(tmp_path))
                samples[transport, "fast"] = (await client.generate([5, 6, 7], sampling))["choices"][0]
                stock = await push_state_dict(scaled, [client], version=12, transport=transport, root=str(tmp_path),
                                              plugin_routes=False)
                samples[transport, "stock"] = (await client.generate([5, 6, 7], sampling))["choices"][0]
                assert fast.phase_seconds and not stock.phase_seconds
            await push_state_dict(original, [client], version=0, root=str(tmp_path))
            return samples

    samples = asyncio.run(main())
    for transport in ("reload", "stream"):
        fast, stock = samples[transport, "fast"], samples[transport, "stock"]
        assert fast["token_ids"] == stock["token_ids"] and sampled_logprobs(fast) == sampled_logprobs(stock)
        assert weight_versions(fast) == ["11"] and weight_versions(stock) == ["12"]


def test_raw_stage_faults_leave_the_server_untouched(vllm_server, tiny_model_dir):
    """The stage route checks each chunk's crc32 as it arrives, and a commit needs every chunk staged
    since the last commit; a refused push never pauses the engine nor changes its version."""
    original = _read_state(tiny_model_dir)
    perturbed = {k: v + np.float32(0.05) for k, v in original.items()}
    arrays = _wire_arrays(perturbed)
    sampling = {"temperature": 1.0, "max_tokens": 6, "seed": 4, "logprobs": 0, "ignore_eos": True}

    async def main():
        async with VLLMClient(vllm_server.url, vllm_server.served_model_name, max_retries=0) as client:
            await push_state_dict(original, [client], version="base", transport="stream")
            before = (await client.generate([9, 8, 7], sampling))["choices"][0]
            blob = b"".join(bytes(piece) for piece in weight_routes.safetensors_pieces(arrays))
            corrupt = blob[:-3] + bytes(b ^ 0xFF for b in blob[-3:])  # flipped in transit; crc declared of the original

            async def body():
                yield corrupt
            with pytest.raises(VLLMError, match="crc32 mismatch"):
                await client.request("POST", weight_routes.STAGE_ROUTE, content=body, params={
                    "index": 0, "num_bytes": len(blob), "crc32": zlib.crc32(blob)})
            await weight_routes.stage_chunk(client, 0, arrays)
            manifest = {"num_chunks": 2, "num_bytes": sum(a.nbytes for a in arrays.values()),
                        "tensors": {n: [str(a.dtype), list(a.shape)] for n, a in arrays.items()}}
            with pytest.raises(weight_routes.PushRejected, match="incomplete push: 1 of 2 chunks"):
                await weight_routes.commit(client, 99, pause_mode="wait", num_chunks=2, manifest=manifest)
            with pytest.raises(weight_routes.PushRejected, match="incomplete push: 0 of 1"):  # slots were consumed
                await weight_routes.commit(client, 99, pause_mode="wait", num_chunks=1, manifest=manifest)
            after = (await client.generate([9, 8, 7], sampling))["choices"][0]
            return before, after, await server_weight_version(client), await client.request("GET", "/is_paused")

    before, after, version, paused = asyncio.run(main())
    assert version == "base" and paused == {"is_paused": False}
    assert after["token_ids"] == before["token_ids"] and sampled_logprobs(after) == sampled_logprobs(before)
