"""Grain pipeline: seeded shuffles, epochs, host sharding, exact resume; bad records named by id."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from jaxrl_vl.data import batching, sources
from jaxrl_vl.data.pipeline import PipelineSpec, make_dataset, render_records
from jaxrl_vl.data.render import HFRenderer, RenderedExample
from jaxrl_vl.data.validation import BadRecordError, DataReport
from test_data_render import tiny_model_dir_for_data_tests


def _examples(n, lengths=None):
    rng = np.random.default_rng(1)
    lengths = lengths if lengths is not None else rng.integers(3, 9, size=n)
    return [RenderedExample(input_ids=np.full(int(length), i, np.int32), pixel_values=np.zeros((0, 6), np.uint8),
                            image_grid_thw=np.zeros((0, 3), np.int32), assistant_spans=np.asarray([[1, int(length)]], np.int32),
                            image_spans=np.zeros((0, 2), np.int32), id=f"e{i}")
            for i, length in enumerate(lengths)]


def ids_of(rows):
    """collate_fn for these tests: the example ids, row by row."""
    return [[e.id for e in row] for row in rows]


def _flat(batches):
    return [i for batch in batches for row in batch for i in row]


def test_seeded_shuffle_epochs_and_determinism():
    examples = _examples(10)
    spec = PipelineSpec(batch_size=2, max_length=16, seed=3, num_epochs=2)
    first = list(make_dataset(examples, spec, ids_of))
    again = list(make_dataset(examples, spec, ids_of))
    assert first == again and len(first) == 10
    order = _flat(first)
    assert sorted(order[:10]) == sorted(order[10:]) == sorted(e.id for e in examples)  # each epoch is a permutation
    assert order[:10] != order[10:]  # and epochs are shuffled differently
    other_seed = _flat(make_dataset(examples, PipelineSpec(batch_size=2, max_length=16, seed=4, num_epochs=2), ids_of))
    assert other_seed != order
    unshuffled = _flat(make_dataset(examples, PipelineSpec(batch_size=2, max_length=16, shuffle=False), ids_of))
    assert unshuffled == [f"e{i}" for i in range(10)]


def test_each_step_reads_the_same_examples_whatever_the_process_count():
    examples = _examples(11)
    one = list(make_dataset(examples, PipelineSpec(batch_size=6, max_length=16, num_epochs=2), ids_of))
    hosts = [list(make_dataset(examples, PipelineSpec(batch_size=6, max_length=16, num_epochs=2, process_index=i,
                                                      process_count=3), ids_of)) for i in range(3)]
    assert all(len(h) == len(one) == 3 for h in hosts)  # 22 examples, cut to whole global batches of 6
    for step, batch in enumerate(one):
        assert sorted(_flat([h[step] for h in hosts])) == sorted(_flat([batch]))  # the same 6, 2 per host
        assert not set(_flat([hosts[0][step]])) & set(_flat([hosts[1][step]]))
    with pytest.raises(ValueError, match="process_index"):
        make_dataset(examples, PipelineSpec(batch_size=6, max_length=16, process_index=3, process_count=3), ids_of)
    with pytest.raises(ValueError, match="multiple of the process count"):
        make_dataset(examples, PipelineSpec(batch_size=4, max_length=16, process_count=3), ids_of)


@pytest.mark.parametrize("packing", [False, True])
def test_resume_from_saved_state_continues_at_the_exact_next_example(packing):
    examples = _examples(13)
    spec = PipelineSpec(batch_size=2, max_length=12, seed=0, num_epochs=3, packing=packing, drop_remainder=False)
    uninterrupted = list(make_dataset(examples, spec, ids_of))
    for stop_after in (1, 4, len(uninterrupted) - 1):
        iterator = iter(make_dataset(examples, spec, ids_of))
        head = [next(iterator) for _ in range(stop_after)]
        state = json.loads(json.dumps(iterator.get_state()))  # survives a JSON round trip (checkpoint)
        resumed = iter(make_dataset(examples, spec, ids_of))
        resumed.set_state(state)
        assert head + list(resumed) == uninterrupted
    if packing:  # rows really hold several examples, each within max_length
        lengths = {e.id: e.num_tokens for e in examples}
        assert any(len(row) > 1 for batch in uninterrupted for row in batch)
        assert all(sum(lengths[i] for i in row) <= 12 for batch in uninterrupted for row in batch)
        assert sorted(_flat(uninterrupted)) == sorted([e.id for e in examples] * 3)


def _png(tmp_path, name, size=(64, 64), seed=0):
    path = tmp_path / name
    Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(path)
    return name


@pytest.fixture(scope="module")
def model_dir(request, tmp_path_factory):
    return tiny_model_dir_for_data_tests(request, tmp_path_factory)


@pytest.fixture(scope="module")
def renderer(model_dir):
    return HFRenderer.from_pretrained(model_dir)


def _bad_data_jsonl(tmp_path):
    good = _png(tmp_path, "good.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    (tmp_path / "truncated.png").write_bytes(buffer.getvalue()[:60])

    def chat(record_id, image, answer="fine", question="what"):
        return {"id": record_id, "messages": [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer}]}

    rows = [chat("ok-1", good), chat("missing", "nope.png"), chat("corrupt", "corrupt.png"),
            chat("truncated-file", "truncated.png"), chat("empty-answer", good, answer="  "),
            {"id": "no-assistant", "messages": [{"role": "user", "content": "hi"}]},
            {"id": "bad-role", "messages": [{"role": "robot", "content": "hi"}]},
            chat("too-long", good, answer="word " * 200), chat("ok-2", good, question="which")]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_records_are_skipped_with_ids_and_counts(tmp_path, renderer):
    records = sources.read_jsonl(_bad_data_jsonl(tmp_path))
    report = DataReport()
    examples = render_records(records, renderer, max_length=64, truncate=False, on_bad_record="skip", report=report,
                              num_threads=3)
    assert [e.id for e in examples] == ["ok-1", "ok-2"]
    assert report.num_ok == 2 and report.num_skipped == 7
    assert report.skipped_ids == {"missing image": ["missing"], "corrupt image": ["corrupt", "truncated-file"],
                                  "empty assistant turn": ["empty-answer", "no-assistant"], "schema": ["bad-role"],
                                  "over-long": ["too-long"]}


@pytest.mark.parametrize("record_id, policy", [("missing", "raise"), ("corrupt", "raise"), ("empty-answer", "raise"),
                                               ("bad-role", "fail"), ("too-long", "fail")])
def test_bad_records_raise_naming_the_record(tmp_path, renderer, record_id, policy):
    records = [r for r in sources.read_jsonl(_bad_data_jsonl(tmp_path)) if r["id"] in ("ok-1", record_id)]
    with pytest.raises(BadRecordError, match=f"id='{record_id}'"):
        render_records(records, renderer, max_length=64, truncate=False, on_bad_record=policy)
    with pytest.raises(ValueError, match="on_bad_record"):
        render_records(records, renderer, max_length=64, on_bad_record="ignore")


def test_end_to_end_digits_batches_and_resume(tmp_path, model_dir, renderer):
    from jaxrl_vl.data import digits
    from jaxrl_vl.models.config import from_hf_dict

    root = str(tmp_path / "digits")
    digits.write_image_folder(root, image_px=32)
    records = sources.image_folder_records(root, "test")[:12]
    examples = render_records(records, renderer, max_length=128)
    with open(os.path.join(model_dir, "config.json")) as f:
        config = from_hf_dict(json.load(f))
    collate = batching.make_collate_fn(config, max_length=128, image_mean=renderer.image_mean,
                                       image_std=renderer.image_std, pad_id=renderer.pad_token_id)
    spec = PipelineSpec(batch_size=4, max_length=128, seed=7, num_epochs=2)
    batches = list(make_dataset(examples, spec, collate))
    assert len(batches) == 6
    batch = batches[0]
    assert batch["input_ids"].shape == (4, 64) and batch["position_ids"].shape == (3, 4, 64)
    assert batch["pixel_values"].dtype == np.float32 and batch["pixel_values"].shape[:2] == (1, 64)
    assert batch["loss_mask"].sum() > 0 and set(np.unique(batch["segment_ids"])) == {0, 1}
    iterator = iter(make_dataset(examples, spec, collate))
    next(iterator), next(iterator)
    resumed = iter(make_dataset(examples, spec, collate))
    resumed.set_state(iterator.get_state())
    for want, got in zip(batches[2:], resumed, strict=True):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_process_exits_cleanly_with_a_live_prefetching_iterator():
    """grain's prefetch thread used to abort the interpreter at exit (exit code 134)."""
    import subprocess
    import sys

    code = ("import itertools, sys; sys.path.insert(0, 'tests')\n"
            "from test_data_pipeline import _examples, ids_of\n"
            "from jaxrl_vl.data.pipeline import PipelineSpec, make_dataset\n"
            "it = iter(make_dataset(_examples(5), PipelineSpec(batch_size=2, max_length=16, num_epochs=None), ids_of))\n"
            "print(len(list(itertools.islice(it, 3))))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "3" and "Exception ignored" not in result.stderr


class CountingRenderer:
    """The real HFRenderer, counting how often each chat is rendered."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        for name in ("image_mean", "image_std", "pad_token_id", "image_token_id", "end_id", "tokenizer"):
            setattr(self, name, getattr(inner, name))

    def render(self, messages, tools=None):
        self.calls += 1
        return self.inner.render(messages, tools=tools)


def test_lazy_rendering_matches_eager_renders_once_and_resumes(tmp_path, renderer):
    from jaxrl_vl.data.pipeline import LazyRenderedRecords

    records = sources.read_jsonl(_bad_data_jsonl(tmp_path))  # 2 good records, 7 bad ones
    records = records + [dict(r, id=r["id"] + "-copy") for r in records if r["id"].startswith("ok")]
    eager = render_records(records, renderer, max_length=64, truncate=False)
    spec = PipelineSpec(batch_size=1, max_length=64, seed=2, num_epochs=3)
    want = _flat(make_dataset(LazyRenderedRecords(records, renderer, max_length=64, truncate=False), spec, ids_of))
    assert sorted(want) == sorted([e.id for e in eager] * 3)  # shuffled over all records, bad ones dropped
    counting = CountingRenderer(renderer)
    lazy = LazyRenderedRecords(records, counting, max_length=64, truncate=False)
    iterator = iter(make_dataset(lazy, spec, ids_of))
    head = [next(iterator) for _ in range(5)]
    resumed = iter(make_dataset(lazy, spec, ids_of))
    resumed.set_state(iterator.get_state())
    assert _flat(head + list(resumed)) == want and len(want) == 12
    # the ones that got as far as the renderer (schema-valid, images loadable) rendered once each
    assert counting.calls == 5 and lazy.report.num_ok == 4 and lazy.report.num_skipped == 7
    with pytest.raises(BadRecordError, match="id='missing'"):
        list(make_dataset(LazyRenderedRecords(records, renderer, max_length=64, on_bad_record="raise"),
                          PipelineSpec(batch_size=1, max_length=64, shuffle=False), ids_of))
