"""Parse Qwen-style tool calls out of an assistant message. Never raises on model output.

Qwen2.5/Qwen3(-VL) chat templates ask the model to write, after any free text,
    <tool_call>
    {"name": "<function-name>", "arguments": {<args-json-object>}}
    </tool_call>
one block per call (several blocks per message are allowed). `parse_tool_calls` returns the
well-formed calls and one `ToolCallError` per bad block (malformed JSON, missing name, non-object
arguments, too large, too deep, unclosed tag); `error_observation` turns an error into text the
model sees on its next turn, so a malformed call costs a turn instead of crashing a run.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
MAX_CALLS_PER_MESSAGE = 8
MAX_CALL_CHARS = 16_384
MAX_JSON_DEPTH = 20
CALL_FORMAT_HINT = (
    'Write each call as <tool_call>{"name": "<tool name>", "arguments": {...}}</tool_call> '
    "with valid JSON."
)


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One well-formed call. `index` is its position among all blocks of the message (0-based)."""

    index: int
    name: str
    arguments: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ToolCallError:
    """One bad block; `message` says what is wrong and how to fix it."""

    index: int
    message: str


@dataclasses.dataclass(frozen=True)
class ParsedMessage:
    """`content` is the message text with every tool-call block removed (stripped)."""

    content: str
    calls: list[ToolCall]
    errors: list[ToolCallError]

    @property
    def has_tool_calls(self) -> bool:
        """True when the model attempted at least one call (well-formed or not)."""
        return bool(self.calls or self.errors)


def _json_depth_exceeds(text: str, limit: int) -> bool:
    """Bracket depth outside strings, checked before json.loads (deep nesting would otherwise hit
    Python's recursion limit)."""
    depth = 0
    in_string = False
    escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


# A backslash that does not start a JSON escape: models put LaTeX (\sqrt, \pi) in strings.
_LONE_BACKSLASH_RE = re.compile(r'(?<!\\)((?:\\\\)*)\\(?!["\\/bfnrtu])')


def _loads_lenient(body: str) -> Any:
    """json.loads; on failure, retry once with lone backslashes doubled (\\sqrt -> \\\\sqrt)."""
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except ValueError as first_error:
        repaired = _LONE_BACKSLASH_RE.sub(lambda m: m.group(1) + "\\\\", body)
        if repaired == body:
            raise
        try:
            return json.loads(repaired, parse_constant=_reject_constant)
        except ValueError:
            raise first_error from None


def _parse_block(index: int, body: str) -> ToolCall | ToolCallError:
    body = body.strip()
    if len(body) > MAX_CALL_CHARS:
        return ToolCallError(index, f"tool call is too large ({len(body)} characters, limit "
                                    f"{MAX_CALL_CHARS}).")
    if not body:
        return ToolCallError(index, f"empty tool call. {CALL_FORMAT_HINT}")
    if _json_depth_exceeds(body, MAX_JSON_DEPTH):
        return ToolCallError(index, f"tool call JSON is nested too deeply (limit {MAX_JSON_DEPTH}).")
    try:
        payload = _loads_lenient(body)
    except (ValueError, RecursionError) as e:
        return ToolCallError(index, f"invalid JSON ({e}). {CALL_FORMAT_HINT}")
    if not isinstance(payload, dict):
        return ToolCallError(index, f"tool call must be a JSON object, got {type(payload).__name__}. "
                                    f"{CALL_FORMAT_HINT}")
    name = payload.get("name")
    if not isinstance(name, str) or not name.strip():
        return ToolCallError(index, f'tool call is missing a "name" string. {CALL_FORMAT_HINT}')
    arguments = payload.get("arguments", {})
    if isinstance(arguments, str):
        # OpenAI style: arguments as a JSON string. Accept it if it holds an object.
        try:
            arguments = json.loads(arguments, parse_constant=_reject_constant) if arguments.strip() else {}
        except (ValueError, RecursionError) as e:
            return ToolCallError(index, f'"arguments" of {name!r} is a string that is not valid '
                                        f"JSON ({e}). {CALL_FORMAT_HINT}")
    if not isinstance(arguments, dict):
        return ToolCallError(index, f'"arguments" of {name!r} must be a JSON object, got '
                                    f"{type(arguments).__name__}. {CALL_FORMAT_HINT}")
    return ToolCall(index=index, name=name.strip(), arguments=arguments)


def parse_tool_calls(text: str) -> ParsedMessage:
    """Split an assistant message into free text, well-formed calls and errors. Never raises."""
    if not isinstance(text, str):
        return ParsedMessage("", [], [ToolCallError(0, "assistant message is not text.")])
    calls: list[ToolCall] = []
    errors: list[ToolCallError] = []
    pieces: list[str] = []
    cursor = 0
    index = 0
    # A linear scan with str.find (a regex would rescan the tail once per unclosed tag).
    while True:
        open_at = text.find(TOOL_CALL_OPEN, cursor)
        if open_at < 0:
            pieces.append(text[cursor:])
            break
        pieces.append(text[cursor:open_at])
        body_start = open_at + len(TOOL_CALL_OPEN)
        close_at = text.find(TOOL_CALL_CLOSE, body_start)
        if close_at < 0:
            # An opening tag with no closing tag (often a truncated generation).
            errors.append(ToolCallError(index, f"unclosed {TOOL_CALL_OPEN} (missing "
                                               f"{TOOL_CALL_CLOSE}). {CALL_FORMAT_HINT}"))
            break
        if index >= MAX_CALLS_PER_MESSAGE:
            errors.append(ToolCallError(index, f"too many tool calls in one message (limit "
                                               f"{MAX_CALLS_PER_MESSAGE}); the rest were ignored."))
            break
        cursor = close_at + len(TOOL_CALL_CLOSE)
        parsed = _parse_block(index, text[body_start:close_at])
        (calls if isinstance(parsed, ToolCall) else errors).append(parsed)
        index += 1
    return ParsedMessage(content="".join(pieces).strip(), calls=calls, errors=errors)


def error_observation(error: ToolCallError) -> str:
    return f"Error in tool call {error.index + 1}: {error.message}"


def to_openai_tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """OpenAI-style `tool_calls` for the assistant message of a chat record (string arguments)."""
    return [
        {
            "id": f"call_{call.index}",
            "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
        }
        for call in calls
    ]
