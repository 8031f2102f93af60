"""Chat records (the project's jsonl/in-memory format) -> OpenAI messages that vLLM renders.

Images in records are `{"type": "image", "image": <PIL.Image | path relative to base_dir | bytes>}`;
vLLM wants `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`. PNG keeps
pixels exact, so vLLM sees the same pixels the env produced. Assistant `tool_calls` get string
`arguments` (vLLM re-serialises them) and `content: None` when empty (an empty string would render
an extra newline before the first tool call).
"""
import base64
import io
import json
from pathlib import Path
from typing import Any


def image_data_uri(image: Any, base_dir: str | Path | None = None) -> str:
    """PIL image, file path (relative to base_dir) or encoded bytes -> data URI (PNG for PIL)."""
    if isinstance(image, str) and image.startswith("data:"):
        return image
    if isinstance(image, (str, Path)):
        path = Path(base_dir or ".") / image
        if not path.exists():
            raise FileNotFoundError(f"image {str(image)!r} not found (looked at {path})")
        mime = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp", ".gif": "gif"}.get(path.suffix.lower())
        if mime is None:
            raise ValueError(f"image {path}: unsupported extension {path.suffix!r} (png, jpg, webp, gif)")
        return f"data:image/{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    if isinstance(image, bytes):
        return "data:image/png;base64," + base64.b64encode(image).decode("ascii")
    if hasattr(image, "save"):  # PIL.Image
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    raise TypeError(f"image of type {type(image).__name__}: expected PIL.Image, path, bytes or data URI")


def _content_item(item: dict, base_dir) -> dict:
    kind = item.get("type")
    if kind == "image" or (kind is None and "image" in item):
        return {"type": "image_url", "image_url": {"url": image_data_uri(item["image"], base_dir)}}
    if kind == "image_url":
        return item
    if kind == "text" or (kind is None and "text" in item):
        return {"type": "text", "text": item["text"]}
    raise ValueError(f"message content item with type {kind!r}: expected 'text', 'image' or 'image_url'")


def _tool_call(call: dict) -> dict:
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    return {"id": call.get("id", "call_0"), "type": "function",
            "function": {"name": function["name"],
                         "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}}


def to_openai_messages(messages: list[dict], base_dir: str | Path | None = None) -> list[dict]:
    """Converts a record's messages for /v1/chat/completions/render (see module doc)."""
    converted = []
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"messages[{index}].role={role!r}: expected system, user, assistant or tool")
        content = message.get("content")
        if isinstance(content, list):
            content = [_content_item(item, base_dir) for item in content]
        out = {"role": role, "content": content}
        if role == "assistant" and message.get("tool_calls"):
            out["tool_calls"] = [_tool_call(c) for c in message["tool_calls"]]
            if not content:
                out["content"] = None
        if role == "tool" and "tool_call_id" in message:
            out["tool_call_id"] = message["tool_call_id"]
        converted.append(out)
    return converted
