"""Tools with JSON schemas, and dispatch of parsed tool calls with per-call timeouts.

`ToolRegistry.schemas()` gives the OpenAI function format that chat templates accept as
`tools=` (Qwen3-VL renders them into the system turn inside <tools>...</tools>).
`execute(call)` never raises: unknown tools, arguments that do not match the schema, tool
exceptions and timeouts all come back as a `ToolResult` with ok=False and a message for the model.

Timeouts: each call runs in its own daemon thread and is abandoned (not killed; Python cannot
kill threads) when it overruns, so a hung tool costs a thread but never blocks the episode or
interpreter exit. Tools must therefore be side-effect free or idempotent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from typing import Any, Callable, Iterable

from jaxrl_vl.envs.tools.parsing import ParsedMessage, ToolCall, error_observation, parse_tool_calls

MAX_RESULT_CHARS = 8_192
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}


@dataclasses.dataclass(frozen=True)
class Tool:
    """`function(**arguments) -> str` (other JSON-serialisable results are dumped as JSON).
    `parameters` is a JSON schema of type object (properties, required, additionalProperties)."""

    name: str
    description: str
    parameters: dict[str, Any]
    function: Callable[..., Any]
    timeout_s: float = 5.0

    def __post_init__(self):
        if self.parameters.get("type") != "object":
            raise ValueError(f"tool {self.name!r}: parameters must be a JSON schema with "
                             f"type 'object', got {self.parameters.get('type')!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"tool {self.name!r}: timeout_s must be > 0, got {self.timeout_s}")

    def openai_schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description,
                         "parameters": self.parameters},
        }


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """Outcome of one call (or of one malformed block, with name "")."""

    call_index: int
    name: str
    content: str
    ok: bool
    elapsed_s: float = 0.0

    def message(self) -> dict[str, Any]:
        """The chat message carrying this result (rendered by Qwen templates as <tool_response>)."""
        return {"role": "tool", "content": self.content}


def _type_matches(value: Any, type_name: str) -> bool:
    if type_name in ("number", "integer") and isinstance(value, bool):
        return False  # JSON true is not a number, although bool subclasses int in Python
    return isinstance(value, _JSON_TYPES.get(type_name, (object,)))


def validate_arguments(arguments: dict[str, Any], schema: dict[str, Any]) -> str | None:
    """Check top-level arguments against an object schema; return an error message or None."""
    properties: dict[str, Any] = schema.get("properties", {})
    missing = [key for key in schema.get("required", []) if key not in arguments]
    if missing:
        return f"missing required argument(s): {', '.join(missing)}"
    if schema.get("additionalProperties") is False:
        unknown = sorted(set(arguments) - set(properties))
        if unknown:
            return (f"unknown argument(s): {', '.join(unknown)}; expected: "
                    f"{', '.join(properties) or 'none'}")
    for key, value in arguments.items():
        spec = properties.get(key, {})
        types = spec.get("type")
        if types is not None:
            types = [types] if isinstance(types, str) else list(types)
            if not any(_type_matches(value, t) for t in types):
                return f"argument {key!r} must be of type {' or '.join(types)}, got " \
                       f"{type(value).__name__}"
        if "enum" in spec and value not in spec["enum"]:
            return f"argument {key!r} must be one of {spec['enum']}, got {value!r}"
    return None


def _result_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) > MAX_RESULT_CHARS:
        text = text[:MAX_RESULT_CHARS] + f"... [truncated, {len(text)} characters in total]"
    return text


def run_with_timeout(function: Callable[[], Any], timeout_s: float) -> tuple[str, Any]:
    """Run `function()` in a daemon thread. Returns ("ok", value), ("error", exception) or
    ("timeout", None)."""
    outcome: list[tuple[str, Any]] = []

    def target():
        try:
            outcome.append(("ok", function()))
        except BaseException as e:  # noqa: BLE001 - everything becomes an observation
            outcome.append(("error", e))

    thread = threading.Thread(target=target, name="tool-call", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive() or not outcome:
        return ("timeout", None)
    return outcome[0]


class ToolRegistry:
    """Named tools; dispatches `ToolCall`s with per-call timeouts."""

    def __init__(self, tools: Iterable[Tool] = ()):
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> Tool:
        if tool.name in self._tools:
            raise ValueError(f"tool {tool.name!r} is already registered")
        self._tools[tool.name] = tool
        return tool

    def names(self) -> list[str]:
        return sorted(self._tools)

    def __contains__(self, name: str) -> bool:
        return name in self._tools

    def schemas(self) -> list[dict[str, Any]]:
        """OpenAI function-format schemas, for `apply_chat_template(..., tools=...)`."""
        return [tool.openai_schema() for tool in self._tools.values()]

    def execute(self, call: ToolCall) -> ToolResult:
        tool = self._tools.get(call.name)
        if tool is None:
            return ToolResult(call.index, call.name,
                              f"Error in tool call {call.index + 1}: unknown tool {call.name!r}; "
                              f"available tools: {', '.join(self.names()) or 'none'}.", ok=False)
        problem = validate_arguments(call.arguments, tool.parameters)
        if problem is not None:
            return ToolResult(call.index, call.name,
                              f"Error in tool call {call.index + 1} ({call.name}): {problem}.",
                              ok=False)
        start = time.monotonic()
        status, value = run_with_timeout(lambda: tool.function(**call.arguments), tool.timeout_s)
        elapsed_s = time.monotonic() - start
        if status == "timeout":
            content = (f"Error in tool call {call.index + 1} ({call.name}): timed out after "
                       f"{tool.timeout_s:g} s.")
            return ToolResult(call.index, call.name, content, ok=False, elapsed_s=elapsed_s)
        if status == "error":
            content = f"Error in tool call {call.index + 1} ({call.name}): {value}"
            return ToolResult(call.index, call.name, _result_text(content), ok=False,
                              elapsed_s=elapsed_s)
        try:
            text = _result_text(value)
        except (TypeError, ValueError) as e:
            return ToolResult(call.index, call.name, f"Error in tool call {call.index + 1} "
                              f"({call.name}): result is not serialisable ({e}).", ok=False)
        return ToolResult(call.index, call.name, text, ok=True, elapsed_s=elapsed_s)

    async def aexecute(self, call: ToolCall) -> ToolResult:
        # execute() is already bounded by the tool's timeout, so the worker thread returns.
        return await asyncio.to_thread(self.execute, call)

    def execute_message(self, text: str) -> tuple[ParsedMessage, list[ToolResult]]:
        """Parse an assistant message and run its calls; malformed blocks become error results.
        Results come back in block order."""
        parsed = parse_tool_calls(text)
        results = [self.execute(call) for call in parsed.calls]
        results += [ToolResult(e.index, "", error_observation(e), ok=False) for e in parsed.errors]
        return parsed, sorted(results, key=lambda r: r.call_index)
