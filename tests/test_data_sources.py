"""Sources: jsonl (paths, file:// URLs, data URIs, bytes), image folders, HF datasets on disk, digits."""

import base64
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from jaxrl_vl.data import digits, images, sources
from jaxrl_vl.data.validation import BadRecordError, DataReport


def _png_bytes(color, size=(8, 6)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _chat(record_id, image_ref, answer="ok"):
    return {"id": record_id, "messages": [
        {"role": "user", "content": [{"type": "image", "image": image_ref}, {"type": "text", "text": "what?"}]},
        {"role": "assistant", "content": answer}]}


def test_jsonl_resolves_every_image_reference_kind(tmp_path):
    os.makedirs(tmp_path / "images")
    (tmp_path / "images" / "red.png").write_bytes(_png_bytes((255, 0, 0)))
    (tmp_path / "green.png").write_bytes(_png_bytes((0, 255, 0)))
    blue_b64 = base64.b64encode(_png_bytes((0, 0, 255))).decode()
    rows = [
        _chat("relative", "images/red.png"),
        _chat("file_url", "file://" + str(tmp_path / "green.png")),
        _chat("data_uri", "data:image/png;base64," + blue_b64),
        _chat("bytes_dict", {"bytes": blue_b64}),
        {"messages": _chat("x", "images/red.png")["messages"]},  # no id -> "<file>:<line>"
        _chat("path_dict", {"path": "images/red.png"}),
        {"id": "openai_style", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "green.png"}}]},
            {"role": "assistant", "content": "green"}]},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = sources.read_jsonl(str(path))
    assert [r["id"] for r in records] == ["relative", "file_url", "data_uri", "bytes_dict", "data.jsonl:5",
                                          "path_dict", "openai_style"]
    colors = [images.load_image(r["messages"][0]["content"][0]["image"]).getpixel((0, 0)) for r in records]
    assert colors == [(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 255), (255, 0, 0), (255, 0, 0), (0, 255, 0)]
    assert records[0]["messages"][0]["content"][0]["image"] == str(tmp_path / "images" / "red.png")


def test_jsonl_bad_lines_are_named_and_skipped_or_raised(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_chat("good", "a.png")) + "\n{not json\n[1, 2]\n")
    report = DataReport()
    records = sources.read_jsonl(str(path), on_bad_record="skip", report=report)
    assert [r["id"] for r in records] == ["good"]
    assert report.num_skipped == 2 and report.skipped_ids["schema"] == ["bad.jsonl:2", "bad.jsonl:3"]
    with pytest.raises(BadRecordError, match="bad.jsonl:2"):
        sources.read_jsonl(str(path), on_bad_record="raise")


def test_image_folder_records(tmp_path):
    for split, cls, name in [("train", "Golden_Retriever", "b.jpg"), ("train", "Golden_Retriever", "a.png"),
                             ("train", "cat", "c.png"), ("test", "cat", "d.png")]:
        os.makedirs(tmp_path / split / cls, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / split / cls / name)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("ignored")
    records = sources.image_folder_records(str(tmp_path), "train")
    assert [r["id"] for r in records] == ["train/Golden_Retriever/a.png", "train/Golden_Retriever/b.jpg", "train/cat/c.png"]
    first = records[0]
    assert first["label"] == "golden retriever"
    assert first["messages"][0]["content"][1]["text"] == "What is the name of the subject in this photo?"
    assert first["messages"][1]["content"] == "The subject in this photo is: golden retriever"
    assert os.path.isfile(first["messages"][0]["content"][0]["image"])
    with pytest.raises(FileNotFoundError, match="val"):
        sources.image_folder_records(str(tmp_path), "val")


def test_hf_dataset_on_disk_chat_and_classification(tmp_path):
    datasets = pytest.importorskip("datasets")
    red = Image.new("RGB", (5, 5), (255, 0, 0))
    chat = datasets.Dataset.from_dict({
        "id": ["c0"],
        "messages": [[{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "hi"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]],
        "images": [[red]],
    }, features=datasets.Features({
        "id": datasets.Value("string"),
        "messages": [{"role": datasets.Value("string"),
                      "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "images": datasets.Sequence(datasets.Image()),
    }))
    chat.save_to_disk(str(tmp_path / "chat"))
    records = sources.hf_disk_records(str(tmp_path / "chat"))
    assert records[0]["id"] == "c0"
    image_item = records[0]["messages"][0]["content"][0]
    assert images.load_image(image_item["image"]).getpixel((0, 0)) == (255, 0, 0)
    assert records[0]["messages"][0]["content"][1] == {"type": "text", "text": "hi"}

    labelled = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"image": [red, red], "label": [1, 0]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["dog", "Red_Panda"])}))})
    labelled.save_to_disk(str(tmp_path / "cls"))
    records = sources.hf_disk_records(str(tmp_path / "cls"), "train")
    assert [r["id"] for r in records] == ["train/0", "train/1"]
    assert records[0]["messages"][1]["content"] == "The subject in this photo is: red panda"
    with pytest.raises(KeyError, match="available"):
        sources.hf_disk_records(str(tmp_path / "cls"), "test")


def test_digits_folder_matches_in_memory_examples(tmp_path):
    summary = digits.write_image_folder(str(tmp_path), image_px=32)
    assert summary["train"] + summary["test"] == 1797 and summary["test"] == 359
    records = sources.image_folder_records(str(tmp_path), "test")
    assert len(records) == 359 and {r["label"] for r in records} == set(digits.DIGIT_NAMES)
    in_memory = {f"test/{name}/{i:04d}.png": image for i, image, name in digits.digit_examples("test", 32)}
    first = records[0]
    image = images.load_image(first["messages"][0]["content"][0]["image"])
    assert image.size == (32, 32)
    assert np.array_equal(np.asarray(image), np.asarray(in_memory[first["id"]]))
    assert digits.write_image_folder(str(tmp_path), image_px=32) == summary  # marker: no rewrite
