"""The offline checkpoint builder (jaxrl_vl/models/tiny_checkpoint.py, CLI tools/make_tiny_model.py): deterministic
bytes, loads in transformers, image tokens, chat template."""
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


from jaxrl_vl.models import tiny_checkpoint as make_tiny_model  # noqa: E402


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_build_is_byte_identical(tmp_path, tiny_model_dirs, arch):
    make_tiny_model.build(tmp_path / "again", arch=arch, size="tiny")
    first, second = _digests(Path(tiny_model_dirs[arch])), _digests(tmp_path / "again")
    assert first.keys() == second.keys()
    assert first == second


def test_seed_changes_weights_only(tmp_path, tiny_model_dir):
    make_tiny_model.build(tmp_path / "seed1", arch="qwen3_vl", size="tiny", seed=1)
    base, other = _digests(Path(tiny_model_dir)), _digests(tmp_path / "seed1")
    assert base["model.safetensors"] != other["model.safetensors"]
    assert {k: v for k, v in base.items() if k != "model.safetensors"} == \
           {k: v for k, v in other.items() if k != "model.safetensors"}


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_loads_in_transformers_with_all_weights(tiny_model_dirs, arch):
    import torch
    from transformers import AutoModelForImageTextToText

    model, info = AutoModelForImageTextToText.from_pretrained(tiny_model_dirs[arch], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    num_params = sum(p.numel() for p in model.parameters())
    assert 0.6e6 < num_params < 1.5e6, num_params
    logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    # lm_head std 0.2 keeps distributions far from flat (a sampled token's logprob varies).
    assert logits.float().std() > 1.0


@pytest.mark.parametrize("arch,patch,mean", [("qwen3_vl", 16, 0.5), ("qwen2_5_vl", 14, 0.48145466)])
def test_processor_expands_image_tokens(tiny_model_dirs, arch, patch, mean):
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dirs[arch])
    assert processor.image_processor.patch_size == patch
    assert processor.image_processor.image_mean[0] == pytest.approx(mean)
    images = [Image.fromarray(np.full((h, w, 3), 200, np.uint8)) for h, w in [(100, 150), (64, 64)]]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"},
                                             {"type": "image"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    batch = processor(text=[text], images=images, return_tensors="np")
    grid = batch["image_grid_thw"]
    config = json.loads((Path(tiny_model_dirs[arch]) / "config.json").read_text())
    expected_tokens = int(sum(math.prod(g) for g in grid) // 4)
    assert (batch["input_ids"] == config["image_token_id"]).sum() == expected_tokens
    assert batch["pixel_values"].shape == (int(sum(math.prod(g) for g in grid)), 3 * 2 * patch * patch)
    # small min/max pixels: 4..64 merged tokens per image
    assert all(4 <= math.prod(g) // 4 <= 64 for g in grid)


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_chat_template_renders_tools_and_tool_responses(tiny_model_dirs, arch):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs[arch])
    tools = [{"type": "function", "function": {"name": "calc_score", "description": "Grade an answer.",
              "parameters": {"type": "object", "properties": {"answer": {"type": "string"}}}}}]
    messages = [
        {"role": "user", "content": "What is 6 * 7?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "calc_score", "arguments": '{"answer": "42"}'}}]},
        {"role": "tool", "content": "correct"},
        {"role": "tool", "content": "score: 1.0"},
    ]
    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n")
    assert '<tools>\n{"type": "function", "function": {"name": "calc_score"' in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "calc_score", "arguments": {"answer": "42"}}\n</tool_call><|im_end|>' in text
    assert ("<|im_start|>user\n<tool_response>\ncorrect\n</tool_response>\n<tool_response>\nscore: 1.0\n"
            "</tool_response><|im_end|>\n<|im_start|>assistant\n") in text
    assert ("You are a helpful assistant." in text) == (arch == "qwen2_5_vl")
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level BPE round-trips everything
    assert tokenizer.convert_tokens_to_ids("<tool_call>") in ids


def test_tokenizer_expresses_env_text_compactly(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in ["<action>left</action>", "Cannot move into a wall.", '{"name": "calc_score", "arguments": {"answer": "2\\sqrt{3}"}}',
                 "x = 3.14, 1234567890 ÄÖü 漢字"]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert len(tokenizer("<action>left</action>")["input_ids"]) <= 6
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


PUBLISHED_PARAMS = {"qwen3_vl_2b": 2_127_532_032, "qwen3_vl_4b": 4_437_815_808, "qwen3_vl_8b": 8_767_123_696,
                    "qwen2_5_vl_3b": 3_754_622_976, "qwen2_5_vl_7b": 8_292_166_656}


@pytest.mark.parametrize("like", sorted(PUBLISHED_PARAMS))
def test_like_configs_have_published_shapes(tmp_path, like):
    spec = dict(make_tiny_model.LIKE[like], real=True)
    ids = make_tiny_model.token_ids(make_tiny_model.QWEN_BASE_VOCAB_SIZE)
    assert ids["<|image_pad|>"] == 151655 and ids["<|im_end|>"] == 151645 and ids["</think>"] == 151668
    make_config = make_tiny_model.qwen3_vl_config if spec["arch"] == "qwen3_vl" else make_tiny_model.qwen2_5_vl_config
    make_tiny_model.write_json(tmp_path / "config.json", make_config(spec, ids, spec["vocab"], spec["tie"], 128000))
    shapes = make_tiny_model.weight_shapes(tmp_path)  # meta-device model: no memory for weights
    assert sum(math.prod(s) for s in shapes.values()) == PUBLISHED_PARAMS[like]


def test_padded_tokenizer_puts_added_tokens_at_qwen_ids():
    tok = make_tiny_model.train_tokenizer(300, seed=1, pad_base_vocab_to=make_tiny_model.QWEN_BASE_VOCAB_SIZE)
    assert tok.token_to_id("<|im_start|>") == 151644 and tok.token_to_id("<|video_pad|>") == 151656
    ids = tok.encode("<|im_start|>user\nleft<|im_end|>").ids
    assert ids[0] == 151644 and ids[-1] == 151645 and max(ids[1:-1]) < 300


def test_bad_arguments_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="--arch"):
        make_tiny_model.build(tmp_path, arch="llama", size="tiny")
    with pytest.raises(ValueError, match="--like"):
        make_tiny_model.build(tmp_path, like="qwen3_vl_1000b")


def test_sharded_weights_load_like_single_file(tmp_path, tiny_model_dir, monkeypatch):
    import torch
    from transformers import AutoModelForImageTextToText

    monkeypatch.setattr(make_tiny_model, "SHARD_BYTES", 1_000_000)  # forces the --like shard path
    make_tiny_model.build(tmp_path, arch="qwen3_vl", size="tiny")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / "model.safetensors").exists()
    ids = torch.tensor([[1, 5, 9, 42]])
    sharded = AutoModelForImageTextToText.from_pretrained(tmp_path)(input_ids=ids).logits
    single = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    assert torch.equal(sharded, single)
