"""HFRenderer on the tiny Qwen3-VL checkpoint: tokens, uint8 pixels, loss masks (last vs all)."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxrl_vl.data.render import HFRenderer, normalize_pixels, render_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model_dir_for_data_tests(request, tmp_path_factory) -> str:
    """The shared `tiny_model_dir` fixture when conftest provides it, else a fresh build."""
    try:
        return request.getfixturevalue("tiny_model_dir")
    except pytest.FixtureLookupError:
        out = str(tmp_path_factory.mktemp("qwen3_vl_tiny"))
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_tiny_model.py"), "--arch", "qwen3_vl",
                        "--size", "tiny", "--out", out], check=True, capture_output=True)
        return out


@pytest.fixture(scope="module")
def renderer(request, tmp_path_factory):
    return HFRenderer.from_pretrained(tiny_model_dir_for_data_tests(request, tmp_path_factory))


def _image(seed, size=(90, 70)):
    return Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8))


def _decode(renderer, ids):
    return renderer.tokenizer.decode(ids)


def test_tokens_placeholders_and_pixels(renderer):
    images = [_image(0), _image(1, (64, 64))]
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "what is this"}]},
        {"role": "assistant", "content": "a photo"},
        {"role": "user", "content": [{"type": "text", "text": "and this"}, {"type": "image", "image": images[1]}]},
        {"role": "assistant", "content": "another"},
    ]
    example = renderer.render(messages)
    assert example.input_ids.dtype == np.int32 and example.pixel_values.dtype == np.uint8
    grid = example.image_grid_thw
    assert grid.shape == (2, 3) and example.pixel_values.shape == (int(grid.prod(1).sum()), 3 * 2 * 16 * 16)
    runs = example.image_spans[:, 1] - example.image_spans[:, 0]
    assert runs.tolist() == (grid.prod(1) // 4).tolist()
    # Collapsing each placeholder run back to one token gives exactly the chat template's text.
    ids = example.input_ids.tolist()
    collapsed = [t for i, t in enumerate(ids) if t != renderer.image_token_id or ids[i - 1] != renderer.image_token_id]
    assert _decode(renderer, collapsed) == renderer.render_text(messages)
    # uint8 pixels normalised host-side equal the image processor's own float output.
    reference = renderer.image_processor(images=images, return_tensors="np")
    np.testing.assert_array_equal(reference["image_grid_thw"], grid)
    normalized = normalize_pixels(example.pixel_values, renderer.image_mean, renderer.image_std)
    np.testing.assert_allclose(normalized, reference["pixel_values"], atol=1e-6)


def test_loss_masks_last_and_all(renderer):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": _image(2)}, {"type": "text", "text": "q1"}]},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "second answer"},
    ]
    example = renderer.render(messages)
    last = example.loss_mask("last")
    every = example.loss_mask("all")
    assert last.dtype == np.float32 and last.shape == example.input_ids.shape
    assert _decode(renderer, example.input_ids[last > 0]) == "second answer<|im_end|>"
    assert _decode(renderer, example.input_ids[every > 0]) == "first answer<|im_end|>second answer<|im_end|>"
    # the header "<|im_start|>assistant\n" and the newline after <|im_end|> are never targets
    header = renderer.header_ids
    for start, _ in example.assistant_spans:
        assert example.input_ids[start - len(header):start].tolist() == header
        assert every[start - len(header):start].sum() == 0
    with pytest.raises(ValueError, match="loss_on"):
        example.loss_mask("first")


def test_tool_calls_are_trained_and_tool_results_are_not(renderer):
    tools = [{"type": "function", "function": {"name": "add", "description": "add numbers",
                                               "parameters": {"type": "object", "properties": {}}}}]
    record = {"id": "tool-0", "tools": tools, "messages": [
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}}]},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "5"},
    ]}
    example = render_record(renderer, record)
    assert example.id == "tool-0" and example.pixel_values.shape[0] == 0
    trained = _decode(renderer, example.input_ids[example.loss_mask("all") > 0])
    assert trained == '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>5<|im_end|>'
    assert "# Tools" in _decode(renderer, example.input_ids)


def test_record_loss_on_overrides_the_default(renderer):
    messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    every_turn = render_record(renderer, {"id": "demo", "messages": messages, "loss_on": "all"})
    default = render_record(renderer, {"id": "plain", "messages": messages})
    assert every_turn.loss_mask("last").sum() == default.loss_mask("all").sum() > default.loss_mask("last").sum()
    with pytest.raises(ValueError, match="loss_on"):
        render_record(renderer, {"id": "bad", "messages": messages, "loss_on": "first"})


def test_qwen2_5_vl_checkpoint_pixels_use_its_clip_normalisation(tiny_model_dirs):
    renderer = HFRenderer.from_pretrained(tiny_model_dirs["qwen2_5_vl"])
    assert renderer.image_mean != (0.5, 0.5, 0.5) and renderer.patch_dim == 3 * 2 * 14 * 14
    image = _image(3, (100, 60))
    example = renderer.render([{"role": "user", "content": [{"type": "image", "image": image}]},
                               {"role": "assistant", "content": "x"}])
    reference = renderer.image_processor(images=[image], return_tensors="np")
    np.testing.assert_allclose(normalize_pixels(example.pixel_values, renderer.image_mean, renderer.image_std),
                               reference["pixel_values"], atol=1e-5)
    assert _decode(renderer, example.input_ids).startswith("<|im_start|>system\nYou are a helpful assistant.")


def test_chat_template_json_of_older_checkpoints_is_used(tiny_model_dir, tmp_path):
    import json
    import shutil

    model_dir = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, model_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    template = (model_dir / "chat_template.jinja").read_text()
    (model_dir / "chat_template.jinja").unlink()
    (model_dir / "chat_template.json").write_text(json.dumps({"chat_template": "{#- json -#}" + template}))
    renderer = HFRenderer.from_pretrained(str(model_dir))
    assert renderer.tokenizer.chat_template.startswith("{#- json -#}")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert renderer.render(messages).input_ids.tolist() == HFRenderer.from_pretrained(tiny_model_dir).render(messages).input_ids.tolist()
