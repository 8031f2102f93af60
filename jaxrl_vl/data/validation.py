"""Bad-record policy: every problem names the record's id; `on_bad_record` skips (counted) or raises.

Problems detected: wrong schema, missing image file, corrupt image, empty assistant turn,
over-long example (see batching.truncate_example), render failures.
"""

from __future__ import annotations

import collections
import dataclasses
import logging

from jaxrl_vl.data import images as images_lib

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
ON_BAD_RECORD_CHOICES = ("skip", "raise", "fail")  # "fail" is configs/base.py's spelling of "raise"


class BadRecordError(ValueError):
    """A record that cannot be used. `record_id` and `reason` say which and why."""

    def __init__(self, record_id: str, reason: str):
        super().__init__(f"bad record id={record_id!r}: {reason}")
        self.record_id = record_id
        self.reason = reason


@dataclasses.dataclass
class DataReport:
    """Counts of what happened to records; `skipped_ids` keeps the first few ids per reason kind."""

    num_ok: int = 0
    num_skipped: int = 0
    num_truncated: int = 0
    skipped_by_kind: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skipped_ids: dict = dataclasses.field(default_factory=dict)
    max_ids_per_kind: int = 20

    def record_skip(self, err: BadRecordError) -> None:
        kind = err.reason.split(":")[0]
        self.num_skipped += 1
        self.skipped_by_kind[kind] += 1
        ids = self.skipped_ids.setdefault(kind, [])
        if len(ids) < self.max_ids_per_kind:
            ids.append(err.record_id)

    def summary(self) -> str:
        parts = [f"{self.num_ok} ok", f"{self.num_skipped} skipped", f"{self.num_truncated} truncated"]
        for kind, count in sorted(self.skipped_by_kind.items()):
            parts.append(f"{kind}: {count} (ids {self.skipped_ids[kind][:5]})")
        return "; ".join(parts)


def check_on_bad_record(on_bad_record: str) -> None:
    if on_bad_record not in ON_BAD_RECORD_CHOICES:
        raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD_CHOICES}, got {on_bad_record!r}")


def handle_bad_record(err: BadRecordError, on_bad_record: str, report: DataReport | None) -> None:
    """Raise `err` when on_bad_record == "raise", else log it and count it in `report`."""
    check_on_bad_record(on_bad_record)
    if on_bad_record in ("raise", "fail"):
        raise err
    log.warning("skipping %s", err)
    if report is not None:
        report.record_skip(err)


def _text_of(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content if isinstance(part, dict) and part.get("type") == "text")


def _check_content(record_id: str, index: int, content) -> None:
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise BadRecordError(record_id, f"schema: messages[{index}].content must be a str or a list of parts, "
                             f"got {type(content).__name__}")
    for j, part in enumerate(content):
        where = f"messages[{index}].content[{j}]"
        if not isinstance(part, dict) or part.get("type") not in ("text", "image", "image_url"):
            raise BadRecordError(record_id, f"schema: {where} must be a dict with type text|image|image_url, got {part!r:.80}")
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise BadRecordError(record_id, f"schema: {where} of type text needs a str 'text'")
        if images_lib.is_image_item(part) and images_lib.image_ref(part) is None:
            raise BadRecordError(record_id, f"schema: {where} is an image with no 'image' (or image_url.url) value")


def check_record_schema(record) -> None:
    """Raise BadRecordError for a record that does not follow the contract's chat-record schema."""
    record_id = record.get("id", "<no id>") if isinstance(record, dict) else "<not a dict>"
    if not isinstance(record, dict):
        raise BadRecordError(record_id, f"schema: record must be a dict, got {type(record).__name__}")
    if not isinstance(record.get("id"), str) or not record["id"]:
        raise BadRecordError(str(record_id), "schema: 'id' must be a non-empty str")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRecordError(record_id, "schema: 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise BadRecordError(record_id, f"schema: messages[{i}] needs a role in {ROLES}, got {message!r:.80}")
        _check_content(record_id, i, message.get("content"))
    assistants = [m for m in messages if m["role"] == "assistant"]
    if not assistants:
        raise BadRecordError(record_id, "empty assistant turn: the record has no assistant message to train on")
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and not _text_of(message.get("content")).strip() and not message.get("tool_calls"):
            raise BadRecordError(record_id, f"empty assistant turn: messages[{i}] has no text and no tool_calls")


def load_record_images(record: dict) -> dict:
    """A copy of `record` with every image item's REF replaced by a decoded RGB PIL image.

    Raises BadRecordError("missing image: ...") / ("corrupt image: ...") naming the record id.
    """
    messages = []
    for i, message in enumerate(record["messages"]):
        content = message.get("content")
        if isinstance(content, list):
            new_content = []
            for j, part in enumerate(content):
                if images_lib.is_image_item(part):
                    ref = images_lib.image_ref(part)
                    try:
                        part = {"type": "image", "image": images_lib.load_image(ref)}
                    except images_lib.ImageLoadError as err:
                        kind = "missing image" if "not found" in str(err) else "corrupt image"
                        raise BadRecordError(record["id"], f"{kind}: messages[{i}].content[{j}]: {err}") from err
                new_content.append(part)
            message = {**message, "content": new_content}
        messages.append(message)
    return {**record, "messages": messages}
