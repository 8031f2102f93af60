"""Dataset sources -> lists of chat records `{"id": str, "messages": [...], ...extras}`.

- `read_jsonl(path)`: the contract's on-disk format; relative image paths are resolved against the
  jsonl file's folder (to absolute paths), `file://` URLs, data URIs and `{"bytes": base64}` stay.
- `image_folder_records(root, split)`: `<root>/<split>/<class>/*.{jpg,jpeg,png}` (tinker-cookbook's
  classifier layout) -> one user question + assistant answer per image.
- `hf_disk_records(path, split)`: a Hugging Face dataset saved with `save_to_disk`: rows with
  `messages` (+ optional `images` filling image items in order, TRL style) or `image` + `label`.
Records are not validated here (see validation.py); images are loaded lazily by the renderer.
"""

from __future__ import annotations

import json
import os

from jaxrl_vl.data import images as images_lib
from jaxrl_vl.data.validation import BadRecordError, DataReport, handle_bad_record

CLASSIFIER_QUESTION = "What is the name of the subject in this photo?"
CLASSIFIER_ANSWER_PREFIX = "The subject in this photo is:"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def classifier_record(record_id: str, image_ref, class_name: str, *, question: str = CLASSIFIER_QUESTION,
                      answer_prefix: str = CLASSIFIER_ANSWER_PREFIX) -> dict:
    """One image + question -> answer record, with `label` kept for accuracy evaluation."""
    return {
        "id": record_id,
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": image_ref}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": f"{answer_prefix} {class_name}"},
        ],
        "label": class_name,
    }


def clean_class_name(folder_name: str) -> str:
    """Folder name -> spoken class name (lowercase, `_ . -` -> space), as the cookbook recipe does."""
    name = folder_name.lower()
    for sep in "_.-":
        name = name.replace(sep, " ")
    return " ".join(name.split())


def _resolve_image_refs(messages, base_dir: str):
    """Messages with relative image paths made absolute (against base_dir); other REFs untouched."""
    resolved = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            new_content = []
            for part in content:
                if images_lib.is_image_item(part):
                    ref = images_lib.image_ref(part)
                    path = images_lib.local_path_of(ref)
                    is_relative = path is not None and not os.path.isabs(path)
                    if isinstance(ref, str) and is_relative and not ref.startswith("file://"):
                        ref = os.path.normpath(os.path.join(base_dir, path))
                    elif isinstance(ref, dict) and is_relative:
                        ref = {**ref, "path": os.path.normpath(os.path.join(base_dir, path))}
                    part = {"type": "image", "image": ref}
                new_content.append(part)
            message = {**message, "content": new_content}
        resolved.append(message)
    return resolved


def read_jsonl(path: str, *, on_bad_record: str = "skip", report: DataReport | None = None) -> list[dict]:
    """Chat records from a jsonl file. Lines that are not JSON objects are bad records named
    `<file name>:<line number>`; a record without an id gets that name as its id."""
    base_dir = os.path.dirname(os.path.abspath(path))
    stem = os.path.basename(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fallback_id = f"{stem}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                handle_bad_record(BadRecordError(fallback_id, f"schema: line is not valid JSON ({err})"), on_bad_record, report)
                continue
            if not isinstance(record, dict):
                handle_bad_record(BadRecordError(fallback_id, "schema: line must be a JSON object"), on_bad_record, report)
                continue
            record.setdefault("id", fallback_id)
            if isinstance(record.get("messages"), list):
                record["messages"] = _resolve_image_refs(record["messages"], base_dir)
            records.append(record)
    return records


def write_jsonl(records, path: str) -> None:
    """Write records (image REFs must already be JSON-serialisable: paths, data URIs)."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def image_folder_classes(root: str, split: str) -> list[str]:
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"image folder split not found: {split_dir} (expected <root>/<split>/<class>/*.png)")
    return sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))


def image_folder_records(root: str, split: str, *, question: str = CLASSIFIER_QUESTION,
                         answer_prefix: str = CLASSIFIER_ANSWER_PREFIX) -> list[dict]:
    """One classifier record per image file, in sorted (class, file) order; id = `<split>/<class>/<file>`."""
    records = []
    for class_dir in image_folder_classes(root, split):
        folder = os.path.join(root, split, class_dir)
        for file_name in sorted(os.listdir(folder)):
            if file_name.lower().endswith(IMAGE_EXTENSIONS):
                records.append(classifier_record(f"{split}/{class_dir}/{file_name}", os.path.join(folder, file_name),
                                                 clean_class_name(class_dir), question=question,
                                                 answer_prefix=answer_prefix))
    if not records:
        raise FileNotFoundError(f"no {IMAGE_EXTENSIONS} images under {os.path.join(root, split)}/<class>/")
    return records


def _fill_images(messages, images):
    """TRL-style rows: image items without a value take the row's `images` in order."""
    images = list(images or [])
    filled = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            new_content = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image" and part.get("image") is None:
                    if not images:
                        raise ValueError("more image items than entries in the row's 'images'")
                    part = {"type": "image", "image": images.pop(0)}
                new_content.append({k: v for k, v in part.items() if v is not None})
            message = {**message, "content": new_content}
        filled.append({k: v for k, v in message.items() if v is not None})
    return filled


def hf_disk_records(path: str, split: str | None = None, *, on_bad_record: str = "skip",
                    report: DataReport | None = None) -> list[dict]:
    """Records from `datasets.load_from_disk(path)` (a Dataset, or a DatasetDict and a split)."""
    import datasets  # optional dependency, pinned in requirements.txt

    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise KeyError(f"split {split!r} not in the dataset at {path}; available: {list(loaded)}")
        loaded = loaded[split]
    columns = set(loaded.column_names)
    label_names = None
    if "label" in loaded.features and hasattr(loaded.features["label"], "names"):
        label_names = loaded.features["label"].names
    records = []
    for index, row in enumerate(loaded):
        record_id = str(row["id"]) if "id" in columns else f"{split or 'data'}/{index}"
        try:
            if "messages" in columns:
                messages = _fill_images(row["messages"], row.get("images"))
                extras = {k: v for k, v in row.items() if k not in ("messages", "images", "id")}
                records.append({"id": record_id, "messages": messages, **extras})
            elif "image" in columns and "label" in columns:
                label = row["label"]
                name = label_names[label] if label_names is not None else str(label)
                records.append(classifier_record(record_id, row["image"], clean_class_name(name)))
            else:
                raise ValueError(f"rows need 'messages' (chat) or 'image' + 'label' (classification); got {sorted(columns)}")
        except ValueError as err:
            handle_bad_record(BadRecordError(record_id, f"schema: {err}"), on_bad_record, report)
    return records
