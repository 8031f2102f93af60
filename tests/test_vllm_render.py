"""Integration tests against a real CPU vLLM server (session fixture `vllm_server`, tiny qwen3_vl).

Render parity with the HF processor (tokens equal, pixels equal after normalisation), seeded
generation reproducible (also under concurrency), logprobs and prompt logprobs, stop ids and n,
context-length errors that name the lengths, and derender.
"""
import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxrl_vl.rollout.client import ContextLengthError, VLLMClient, VLLMError, sampled_logprobs, weight_versions
from jaxrl_vl.rollout.messages import to_openai_messages
from jaxrl_vl.rollout.mm_decode import decode_images, normalize_pixels
from jaxrl_vl.rollout.server import attach_server

pytestmark = pytest.mark.vllm

TOOLS = [{"type": "function", "function": {"name": "calc_score", "description": "Grade an answer.",
          "parameters": {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}}}]


def _image(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _run(coro_fn, server):
    async def main():
        async with VLLMClient(server.url, server.served_model_name, max_concurrency=4) as client:
            return await coro_fn(client)

    return asyncio.run(main())


def _conversation():
    """Two images of different sizes over two user turns, a tool call and a tool response."""
    first, second = _image(100, 150, 0), _image(64, 96, 1)
    messages = [
        {"role": "system", "content": "You navigate mazes."},
        {"role": "user", "content": [{"type": "image", "image": first}, {"type": "text", "text": "Where is the agent?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "calc_score", "arguments": {"answer": "left"}}}]},
        {"role": "tool", "content": "score: 0.0"},
        {"role": "user", "content": [{"type": "text", "text": "And now?"}, {"type": "image", "image": second}]},
    ]
    return messages, [first, second]


def test_render_matches_hf_processor_tokens_and_pixels(vllm_server, tiny_model_dir):
    from transformers import AutoProcessor

    messages, images = _conversation()
    rendered = _run(lambda c: c.render(to_openai_messages(messages), tools=TOOLS), vllm_server)

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    # HF takes the images separately and `{"type": "image"}` markers in the messages.
    hf_messages = [dict(m, content=[{"type": "image"} if i.get("type") == "image" else i for i in m["content"]])
                   if isinstance(m["content"], list) else m for m in messages]
    text = processor.apply_chat_template(hf_messages, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    hf = processor(text=[text], images=images, return_tensors="np")

    assert rendered["token_ids"] == hf["input_ids"][0].tolist()
    pixels_uint8, grid_thw = decode_images(rendered["features"])
    assert pixels_uint8.dtype == np.uint8 and grid_thw.dtype == np.int32
    np.testing.assert_array_equal(grid_thw, hf["image_grid_thw"])
    ip = processor.image_processor
    pixels = normalize_pixels(pixels_uint8, ip.image_mean, ip.image_std)
    assert pixels.shape == hf["pixel_values"].shape
    np.testing.assert_allclose(pixels, hf["pixel_values"], atol=1e-6, rtol=0)
    # placeholder offsets point at the image tokens, in order
    image_token_id = json.loads((Path(tiny_model_dir) / "config.json").read_text())["image_token_id"]
    for placeholder, grid in zip(rendered["features"]["mm_placeholders"]["image"], grid_thw):
        span = rendered["token_ids"][placeholder["offset"]:placeholder["offset"] + placeholder["length"]]
        assert span == [image_token_id] * (int(np.prod(grid)) // 4)


def test_seeded_generation_is_reproducible_also_concurrently(vllm_server):
    messages, _ = _conversation()
    sampling = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 12, "seed": 7, "logprobs": 0,
                "ignore_eos": True}

    async def scenario(client):
        rendered = await client.render(to_openai_messages(messages), tools=TOOLS)
        alone = await client.generate(rendered, sampling)
        together = await asyncio.gather(*[client.generate(rendered, dict(sampling, seed=s)) for s in (7, 8, 7, 9)])
        return alone, together

    alone, together = _run(scenario, vllm_server)
    choice = alone["choices"][0]
    assert len(choice["token_ids"]) == 12 and choice["finish_reason"] == "length"
    for other in (together[0], together[2]):
        assert other["choices"][0]["token_ids"] == choice["token_ids"]
        assert sampled_logprobs(other["choices"][0]) == sampled_logprobs(choice)
    assert together[1]["choices"][0]["token_ids"] != choice["token_ids"]  # another seed, another sample
    assert all(lp <= 0.0 for lp in sampled_logprobs(choice))
    assert weight_versions(choice)  # every response names the weights that produced it


def test_prompt_logprobs_n_and_stop_ids(vllm_server):
    async def scenario(client):
        rendered = await client.render([{"role": "user", "content": "Say left or right."}])
        scored = await client.generate(rendered, {"max_tokens": 1, "prompt_logprobs": 0, "temperature": 0.0})
        several = await client.generate(rendered, {"n": 3, "max_tokens": 6, "seed": 3, "temperature": 1.0,
                                                   "ignore_eos": True})
        first_sampled = several["choices"][0]["token_ids"][2]
        stopped = await client.generate(rendered, {"n": 1, "max_tokens": 6, "seed": 3, "temperature": 1.0,
                                                   "ignore_eos": True, "stop_token_ids": [first_sampled]})
        return rendered, scored, several, stopped

    rendered, scored, several, stopped = _run(scenario, vllm_server)
    prompt_logprobs = scored["prompt_logprobs"]
    assert len(prompt_logprobs) == len(rendered["token_ids"]) and prompt_logprobs[0] is None
    for token, entry in zip(rendered["token_ids"][1:], prompt_logprobs[1:]):
        assert str(token) in entry and entry[str(token)]["logprob"] <= 0.0
    assert len(several["choices"]) == 3
    # a stop id ends the sample and is the last returned token
    expected = several["choices"][0]["token_ids"][:3]
    assert stopped["choices"][0]["token_ids"] == expected and stopped["choices"][0]["finish_reason"] == "stop"


def test_prompt_longer_than_context_names_the_lengths(vllm_server):
    async def scenario(client):
        with pytest.raises(ContextLengthError, match="2100 tokens.*2048") as server_side:
            await client.generate([5] * 2100, {"max_tokens": 4})
        client.max_model_len = await client.server_max_model_len()
        with pytest.raises(ContextLengthError, match="2049 tokens.*2048"):
            await client.generate([5] * 2049, {"max_tokens": 4})  # caught before sending
        with pytest.raises(VLLMError, match="404.*does not exist"):
            await client.generate([5, 6], {"max_tokens": 1}, model="no-such-model")
        return server_side.value

    error = _run(scenario, vllm_server)
    assert error.prompt_tokens == 2100 and error.max_model_len == 2048 and "maximum model length" in error.body


def test_derender_turns_tokens_back_into_text_and_attach_reads_model_name(vllm_server):
    async def scenario(client):
        messages = [{"role": "user", "content": "Hello"}]
        rendered = await client.render(messages)
        response = await client.generate(rendered, {"max_tokens": 5, "seed": 1, "ignore_eos": True})
        completion = await client.derender(response, prompt_token_ids=rendered["token_ids"],
                                           chat_request=client.chat_request(messages))
        return rendered, response, completion

    rendered, response, completion = _run(scenario, vllm_server)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(vllm_server.config.model)
    expected_text = tokenizer.decode(response["choices"][0]["token_ids"], skip_special_tokens=True)
    assert completion["choices"][0]["message"]["content"] == expected_text
    attached = attach_server(vllm_server.url)
    assert attached.served_model_name == "tiny" and attached.process is None


@pytest.mark.slow
def test_server_log_is_kept_and_a_crashing_server_is_reported(vllm_server, tmp_path):
    import shutil

    from jaxrl_vl.rollout.server import ServerConfig, start_server

    log = Path(vllm_server.log_path).read_text()
    assert log.startswith("$ ") and "--enable-scale-out" in log.splitlines()[0]
    # A checkpoint vLLM cannot serve: the start fails fast, quoting the server's own log.
    broken = tmp_path / "broken"
    shutil.copytree(vllm_server.config.model, broken)
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match=r"(?s)exited with code .*NoSuchModelForCausalLM") as failure:
        start_server(ServerConfig(model=str(broken), served_model_name="broken", log_dir=str(tmp_path),
                                  startup_timeout_seconds=240))
    log_path = next(tmp_path.glob("vllm-broken-*.log"))
    assert str(log_path) in str(failure.value)
    # stop_server killed the whole process group: nothing still runs on the broken checkpoint
    leftovers = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(broken).encode() in cmdline.read_bytes():
                leftovers.append(cmdline.parent.name)
        except OSError:
            pass  # the process ended while we looked
    assert not leftovers
