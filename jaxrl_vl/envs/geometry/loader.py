"""Load Geometry3k-format data (`images`, `problem`, `answer`, `choices`) from local files only.

Accepted `path`s:
  - a .parquet file (HF `hiyouga/geometry3k` layout: images = list of {"bytes", "path"} structs),
  - a .jsonl file (images = list of paths relative to the file's folder, as make_geometry writes),
  - a .arrow file written by `datasets.Dataset.save_to_disk` (Arrow IPC stream),
  - a folder holding any of those: `{split}.parquet|jsonl`, `data/{split}-*.parquet` (a hub
    snapshot), `{split}/data-*.arrow` (save_to_disk of a DatasetDict) or `data-*.arrow`.
Every record is validated; a bad record raises `GeometryDataError` naming its id and field.
Returned records hold decoded RGB PIL images.
"""

from __future__ import annotations

import io
import json
import pathlib
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REQUIRED_FIELDS = ("images", "problem", "answer")


class GeometryDataError(ValueError):
    """Bad dataset file or record; the message names the file, the record id and the field."""


def _files_for(path: pathlib.Path, split: str) -> list[pathlib.Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise GeometryDataError(f"geometry data path {str(path)!r} does not exist")
    patterns = [f"{split}.parquet", f"{split}.jsonl", f"data/{split}-*.parquet",
                f"{split}-*.parquet", f"{split}/data-*.arrow", f"{split}/*.parquet"]
    for pattern in patterns:
        found = sorted(path.glob(pattern))
        if found:
            return found
    found = sorted(path.glob("data-*.arrow")) or sorted(path.glob("*.parquet")) \
        or sorted(path.glob("*.jsonl"))
    if not found:
        raise GeometryDataError(f"no {split!r} split found in {str(path)!r}: expected one of "
                                f"{', '.join(patterns)}, data-*.arrow, *.parquet or *.jsonl")
    return found


def _rows(file: pathlib.Path) -> Iterator[dict[str, Any]]:
    suffix = file.suffix.lower()
    try:
        if suffix == ".parquet":
            yield from pq.read_table(file).to_pylist()
        elif suffix == ".arrow":
            with pa.memory_map(str(file)) as source:
                try:
                    table = pa.ipc.open_stream(source).read_all()
                except pa.ArrowInvalid:
                    table = pa.ipc.open_file(source).read_all()
            yield from table.to_pylist()
        elif suffix == ".jsonl":
            with open(file, encoding="utf-8") as f:
                for line_number, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except json.JSONDecodeError as e:
                            raise GeometryDataError(f"{file}:{line_number}: invalid JSON ({e})") from None
        else:
            raise GeometryDataError(f"unsupported geometry data file {str(file)!r}: use .parquet, "
                                    ".jsonl or .arrow")
    except (pa.ArrowException, OSError) as e:
        raise GeometryDataError(f"cannot read {str(file)!r}: {e}") from None


def _decode_image(item: Any, base_dir: pathlib.Path, where: str) -> Image.Image:
    try:
        if isinstance(item, dict) and item.get("bytes"):
            image = Image.open(io.BytesIO(item["bytes"]))
        elif isinstance(item, dict) and item.get("path"):
            image = Image.open(base_dir / item["path"])
        elif isinstance(item, str):
            relative = pathlib.PurePosixPath(item)
            if relative.is_absolute() or ".." in relative.parts:
                raise GeometryDataError(f"{where}: image path {item!r} must be relative to the "
                                        "data file's folder, without '..'")
            image = Image.open(base_dir / relative)
        elif isinstance(item, (bytes, bytearray)):
            image = Image.open(io.BytesIO(item))
        else:
            raise GeometryDataError(f"{where}: expected image bytes, a {{'bytes','path'}} struct or "
                                    f"a relative path, got {type(item).__name__}")
        image.load()
    except GeometryDataError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise GeometryDataError(f"{where}: cannot decode image ({e})") from None
    return image.convert("RGB")


def validate_record(row: dict[str, Any], base_dir: pathlib.Path, where: str) -> dict[str, Any]:
    """Check one raw row and return a clean record with decoded images."""
    if not isinstance(row, dict):
        raise GeometryDataError(f"{where}: record must be an object, got {type(row).__name__}")
    record_id = str(row.get("id", where))
    where = f"{where} (id {record_id})"
    for field in REQUIRED_FIELDS:
        if row.get(field) is None:
            raise GeometryDataError(f"{where}: missing field {field!r}; Geometry3k records need "
                                    f"{', '.join(REQUIRED_FIELDS)} (and optionally choices)")
    images = row["images"] if isinstance(row["images"], list) else [row["images"]]
    if not images:
        raise GeometryDataError(f"{where}: field 'images' is empty; each problem needs a diagram")
    if not isinstance(row["problem"], str):
        raise GeometryDataError(f"{where}: field 'problem' must be a string")
    answer = row["answer"]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise GeometryDataError(f"{where}: field 'answer' must be a non-empty string")
    choices = row.get("choices") or []
    if not isinstance(choices, list) or not all(isinstance(c, (str, int, float)) for c in choices):
        raise GeometryDataError(f"{where}: field 'choices' must be a list of strings")
    record = {k: v for k, v in row.items() if k not in ("images", "answer", "choices")}
    record.update(
        id=record_id,
        images=[_decode_image(item, base_dir, f"{where}: images[{i}]") for i, item in enumerate(images)],
        answer=answer.strip(),
        choices=[str(c) for c in choices],
    )
    return record


def load_geometry3k(path: str | pathlib.Path, split: str = "train",
                    limit: int | None = None) -> list[dict[str, Any]]:
    """Records with keys id, images (PIL), problem, answer, choices (+ any extra columns)."""
    path = pathlib.Path(path)
    records: list[dict[str, Any]] = []
    for file in _files_for(path, split):
        for row_number, row in enumerate(_rows(file)):
            if limit is not None and len(records) >= limit:
                return records
            records.append(validate_record(row, file.parent, f"{file.name} row {row_number}"))
    if not records:
        raise GeometryDataError(f"no records found under {str(path)!r} (split {split!r})")
    return records
