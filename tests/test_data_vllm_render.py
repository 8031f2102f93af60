"""HFRenderer and VLLMRenderer (a real CPU vLLM server) give the same tokens, pixels and spans."""

import numpy as np
import pytest
from PIL import Image

from jaxrl_vl.data.render import HFRenderer
from jaxrl_vl.data.render_vllm import VLLMRenderer

pytestmark = pytest.mark.vllm


def _image(seed, size):
    return Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8))


def _chats(tmp_path):
    jpeg_path = str(tmp_path / "photo.jpg")
    _image(5, (123, 77)).save(jpeg_path, quality=85)
    tools = [{"type": "function", "function": {"name": "add", "description": "add two numbers",
                                               "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}]
    return [
        ("one image", [{"role": "user", "content": [{"type": "image", "image": _image(0, (64, 64))},
                                                   {"type": "text", "text": "what is this"}]},
                       {"role": "assistant", "content": "The subject in this photo is: seven"}], None),
        ("resized jpeg file + text-only turn", [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image", "image": jpeg_path}]},
            {"role": "assistant", "content": "a photo"},
            {"role": "user", "content": "again?"},
            {"role": "assistant", "content": "yes"}], None),
        ("two images in two turns", [
            {"role": "user", "content": [{"type": "image", "image": _image(1, (200, 90))}, {"type": "text", "text": "a"}]},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": [{"type": "image", "image": _image(2, (50, 150))}, {"type": "text", "text": "c"}]},
            {"role": "assistant", "content": "d"}], None),
        ("tools", [{"role": "user", "content": "2+3?"},
                   {"role": "assistant", "content": None,
                    "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": "{\"a\": 2}"}}]},
                   {"role": "tool", "content": "5"},
                   {"role": "assistant", "content": "5"}], tools),
    ]


def test_hf_and_vllm_renderers_agree(vllm_server, tiny_model_dir, tmp_path):
    hf = HFRenderer.from_pretrained(tiny_model_dir)
    with VLLMRenderer(vllm_server.url, vllm_server.served_model_name, tiny_model_dir) as remote:
        chats = _chats(tmp_path)
        remote_examples = remote.render_many([(messages, tools) for _, messages, tools in chats])
        for (name, messages, tools), got in zip(chats, remote_examples):
            want = hf.render(messages, tools=tools)
            assert got.input_ids.tolist() == want.input_ids.tolist(), name
            assert got.pixel_values.dtype == want.pixel_values.dtype == np.uint8, name
            np.testing.assert_array_equal(got.pixel_values, want.pixel_values, err_msg=name)
            np.testing.assert_array_equal(got.image_grid_thw, want.image_grid_thw, err_msg=name)
            np.testing.assert_array_equal(got.assistant_spans, want.assistant_spans, err_msg=name)
            np.testing.assert_array_equal(got.image_spans, want.image_spans, err_msg=name)
            assert len(got.assistant_spans) >= 1
        assert remote.render(chats[0][1]).input_ids.tolist() == remote_examples[0].input_ids.tolist()
