"""Tool calling for chat envs: parsing Qwen-style <tool_call> blocks, a registry with JSON
schemas and per-call timeouts, and a safe calculator tool."""

from jaxrl_vl.envs.tools.calculator import CALCULATOR_SCHEMA, calculator_tool
from jaxrl_vl.envs.tools.expression import ExpressionError
from jaxrl_vl.envs.tools.parsing import (
    ParsedMessage,
    ToolCall,
    ToolCallError,
    error_observation,
    parse_tool_calls,
    to_openai_tool_calls,
)
from jaxrl_vl.envs.tools.registry import Tool, ToolRegistry, ToolResult, validate_arguments


def calculator(timeout_s: float = 2.0) -> Tool:
    """The calculator as a registry tool (argument: {"expression": str})."""
    return Tool(
        name="calculator",
        description="Evaluate an arithmetic expression exactly where possible and return the result.",
        parameters=CALCULATOR_SCHEMA,
        function=calculator_tool,
        timeout_s=timeout_s,
    )


__all__ = [
    "ExpressionError", "ParsedMessage", "Tool", "ToolCall", "ToolCallError", "ToolRegistry",
    "ToolResult", "calculator", "calculator_tool", "error_observation", "parse_tool_calls",
    "to_openai_tool_calls", "validate_arguments",
]
