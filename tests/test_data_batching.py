"""Truncation (never inside an image), length buckets, first-fit packing, and packed == unpacked loss."""

import logging

import numpy as np
import pytest
from PIL import Image

from jaxrl_vl.data import batching
from jaxrl_vl.data.pipeline import render_records
from jaxrl_vl.data.render import HFRenderer, RenderedExample
from jaxrl_vl.data.validation import BadRecordError, DataReport
from test_data_render import tiny_model_dir_for_data_tests


def _example(num_tokens=20, image_spans=((2, 6),), assistant_spans=((10, 20),), record_id="ex"):
    ids = np.arange(num_tokens, dtype=np.int32) + 100
    grid = np.asarray([[1, 4, 4]] * len(image_spans), np.int32).reshape(-1, 3)
    pixels = np.arange(len(image_spans) * 16 * 6, dtype=np.uint8).reshape(-1, 6)
    return RenderedExample(input_ids=ids, pixel_values=pixels, image_grid_thw=grid,
                           assistant_spans=np.asarray(assistant_spans, np.int32).reshape(-1, 2),
                           image_spans=np.asarray(image_spans, np.int32).reshape(-1, 2), id=record_id)


def test_truncation_keeps_prefix_and_drops_later_images():
    example = _example(30, image_spans=((2, 6), (20, 24)), assistant_spans=((8, 12), (16, 30)))
    same, was_truncated = batching.truncate_example(example, 30)
    assert same is example and not was_truncated
    cut, was_truncated = batching.truncate_example(example, 18)
    assert was_truncated and cut.num_tokens == 18
    assert cut.image_grid_thw.shape == (1, 3) and cut.pixel_values.shape[0] == 16  # 2nd image dropped whole
    assert cut.assistant_spans.tolist() == [[8, 12], [16, 18]]
    np.testing.assert_array_equal(cut.loss_mask("all")[16:], 1.0)


@pytest.mark.parametrize("max_length, truncate, match", [
    (22, True, "inside image 1"),                 # cut lands in the second image's placeholders
    (10, False, "truncation is off"),
    (7, True, "no assistant token"),              # the only assistant turn starts after the cut
])
def test_truncation_refusals_name_the_record(max_length, truncate, match):
    example = _example(30, image_spans=((2, 6), (20, 24)), assistant_spans=((8, 30),), record_id="rec-7")
    with pytest.raises(BadRecordError, match=match) as info:
        batching.truncate_example(example, max_length, truncate=truncate)
    assert info.value.record_id == "rec-7" and info.value.reason.startswith("over-long")


def test_length_buckets_and_patch_buckets():
    assert batching.length_buckets(512, 64) == (64, 128, 256, 512)
    assert batching.length_buckets(300, 64) == (64, 128, 256, 300)
    assert batching.length_buckets(32, 64) == (32,)
    assert [batching.bucket_for(n, (64, 128, 300)) for n in (1, 64, 65, 300)] == [64, 64, 128, 300]
    with pytest.raises(ValueError, match="largest bucket"):
        batching.bucket_for(301, (64, 128, 300))
    assert [batching.patch_bucket(n, 64) for n in (0, 64, 65, 1000)] == [64, 64, 128, 1024]


def test_first_fit_packing_plan():
    assert batching.pack_first_fit([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    with pytest.raises(ValueError, match="row_length"):
        batching.pack_first_fit([11], 10)


@pytest.fixture(scope="module")
def model_dir(request, tmp_path_factory):
    return tiny_model_dir_for_data_tests(request, tmp_path_factory)


def _records():
    rng = np.random.default_rng(0)
    records = []
    for i, size in enumerate([(64, 64), (96, 64), (64, 64)]):
        image = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))
        records.append({"id": f"r{i}", "messages": [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": f"what is {i}"}]},
            {"role": "assistant", "content": f"answer number {i}"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "the same"}]})
    return records


def test_render_records_warns_with_counts(model_dir, caplog):
    renderer = HFRenderer.from_pretrained(model_dir)
    report = DataReport()
    with caplog.at_level(logging.WARNING, logger="jaxrl_vl.data.pipeline"):
        examples = render_records(_records(), renderer, max_length=38, report=report)
    assert report.num_truncated == 3 and report.num_ok == 3 and all(e.num_tokens == 38 for e in examples)
    assert "3 of 3 records truncated to max_length=38" in caplog.text


def test_packed_and_unpacked_batches_give_the_same_loss(model_dir):
    import jax
    import jax.numpy as jnp

    from jaxrl_vl.models import apply, load

    config, params = load(model_dir)
    renderer = HFRenderer.from_pretrained(model_dir)
    examples = render_records(_records(), renderer, max_length=256)
    common = dict(max_length=256, loss_on="all", image_mean=renderer.image_mean, image_std=renderer.image_std,
                  pad_id=renderer.pad_token_id)
    unpacked = batching.make_collate_fn(config, packing=False, **common)([[e] for e in examples])
    packed = batching.make_collate_fn(config, packing=True, **common)([examples])
    assert unpacked["input_ids"].shape == (3, 64) and packed["input_ids"].shape == (1, 256)
    assert packed["segment_ids"].max() == 3 and packed["num_examples"].tolist() == [3]
    # per-segment M-RoPE: each packed segment's positions equal that example's unpacked positions
    offset = 0
    for b, example in enumerate(examples):
        n = example.num_tokens
        np.testing.assert_array_equal(packed["position_ids"][:, 0, offset:offset + n], unpacked["position_ids"][:, b, :n])
        offset += n

    def summed_nll(batch):
        arrays = {k: jnp.asarray(v) for k, v in batch.items()}
        logits = apply(params, arrays, config)
        logprobs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        target = jnp.take_along_axis(logprobs, arrays["input_ids"][:, 1:, None], axis=-1)[..., 0]
        return float(-(target * arrays["loss_mask"][:, 1:]).sum()), float(arrays["loss_mask"].sum())

    nll_unpacked, tokens_unpacked = summed_nll(unpacked)
    nll_packed, tokens_packed = summed_nll(packed)
    assert tokens_packed == tokens_unpacked > 0
    np.testing.assert_allclose(nll_packed, nll_unpacked, rtol=1e-5)
