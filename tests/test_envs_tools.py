"""Tool calling: parser edge cases, registry dispatch and timeouts, the safe calculator."""

import json
import math
import time

import pytest

from jaxrl_vl.envs.tools import (
    ExpressionError, Tool, ToolRegistry, calculator, calculator_tool, parse_tool_calls,
    to_openai_tool_calls,
)
from jaxrl_vl.envs.tools.calculator import evaluate
from jaxrl_vl.envs.tools.parsing import MAX_CALL_CHARS, MAX_CALLS_PER_MESSAGE


def call(name, arguments):
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


# ----------------------------------------------------------------------------------- parser


def test_parse_single_call_with_surrounding_text():
    text = "Let me compute.\n" + call("calculator", {"expression": "1+1"}) + "\nDone."
    parsed = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in parsed.calls] == [("calculator", {"expression": "1+1"})]
    assert parsed.errors == []
    assert parsed.content == "Let me compute.\n\nDone."


def test_parse_two_calls_keep_order_and_indices():
    text = call("a", {"x": 1}) + " and " + call("b", {"y": [1, 2]})
    parsed = parse_tool_calls(text)
    assert [(c.index, c.name) for c in parsed.calls] == [(0, "a"), (1, "b")]
    assert parsed.calls[1].arguments == {"y": [1, 2]}


def test_parse_no_calls():
    parsed = parse_tool_calls("The answer is \\boxed{4}.")
    assert not parsed.has_tool_calls and parsed.content == "The answer is \\boxed{4}."


@pytest.mark.parametrize("body, fragment", [
    ("{not json}", "invalid JSON"),
    ('{"arguments": {}}', 'missing a "name"'),
    ('{"name": "", "arguments": {}}', 'missing a "name"'),
    ('{"name": "calc", "arguments": [1, 2]}', "must be a JSON object"),
    ('{"name": "calc", "arguments": "not json"}', "not valid JSON"),
    ("[1, 2, 3]", "must be a JSON object"),
    ("", "empty tool call"),
    ('{"name": "calc", "arguments": {"x": NaN}}', "invalid JSON"),
    ("[" * 500 + "]" * 500, "nested too deeply"),
    ('{"name": "c", "arguments": {"x": "' + "a" * (MAX_CALL_CHARS + 10) + '"}}', "too large"),
])
def test_parse_bad_blocks_become_errors(body, fragment):
    parsed = parse_tool_calls(f"text <tool_call>{body}</tool_call> " + call("ok", {}))
    assert [c.name for c in parsed.calls] == ["ok"]  # the good call still parses
    assert len(parsed.errors) == 1 and fragment in parsed.errors[0].message
    assert parsed.errors[0].index == 0 and parsed.calls[0].index == 1


def test_parse_string_arguments_openai_style():
    parsed = parse_tool_calls('<tool_call>{"name": "c", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert parsed.calls[0].arguments == {"a": 1}


def test_parse_latex_backslashes_are_repaired():
    parsed = parse_tool_calls(r'<tool_call>{"name": "c", "arguments": {"answer": "2\sqrt{3}"}}</tool_call>')
    assert parsed.calls[0].arguments == {"answer": r"2\sqrt{3}"}


def test_parse_unclosed_and_too_many_calls():
    parsed = parse_tool_calls(call("a", {}) + ' <tool_call>{"name": "b"')
    assert [c.name for c in parsed.calls] == ["a"]
    assert "unclosed" in parsed.errors[0].message
    many = parse_tool_calls(call("a", {}) * (MAX_CALLS_PER_MESSAGE + 5))
    assert len(many.calls) == MAX_CALLS_PER_MESSAGE
    assert "too many" in many.errors[-1].message


def test_parse_is_linear_on_hostile_input():
    start = time.monotonic()
    parse_tool_calls("<tool_call>" * 20_000 + "x" * 200_000)
    parse_tool_calls("<tool_call></tool_call>" * 20_000)
    assert time.monotonic() - start < 2.0


def test_parse_non_text_never_raises():
    assert parse_tool_calls(None).errors  # type: ignore[arg-type]


def test_openai_tool_calls_have_string_arguments():
    parsed = parse_tool_calls(call("calculator", {"expression": "2*3"}))
    (entry,) = to_openai_tool_calls(parsed.calls)
    assert entry["type"] == "function" and entry["function"]["name"] == "calculator"
    assert json.loads(entry["function"]["arguments"]) == {"expression": "2*3"}


# ---------------------------------------------------------------------------------- registry


def slow_tool(seconds):
    return Tool("slow", "sleeps", {"type": "object", "properties": {}}, lambda: time.sleep(seconds),
                timeout_s=0.2)


def test_registry_schemas_are_openai_function_format():
    registry = ToolRegistry([calculator()])
    (schema,) = registry.schemas()
    assert schema["type"] == "function"
    assert schema["function"]["name"] == "calculator"
    assert schema["function"]["parameters"]["required"] == ["expression"]


def test_registry_dispatch_results_and_errors_in_order():
    def boom():
        raise RuntimeError("tool exploded")

    registry = ToolRegistry([calculator(), Tool("boom", "fails", {"type": "object"}, boom)])
    text = (call("calculator", {"expression": "sqrt(3**2+4**2)"}) + call("nope", {})
            + "<tool_call>{oops}</tool_call>" + call("calculator", {"expr": "1"})
            + call("calculator", {"expression": 5}) + call("boom", {}))
    _, results = registry.execute_message(text)
    assert [r.call_index for r in results] == [0, 1, 2, 3, 4, 5]
    assert results[0].ok and results[0].content == "5"
    assert "unknown tool 'nope'" in results[1].content and "calculator" in results[1].content
    assert "invalid JSON" in results[2].content
    assert "missing required argument(s): expression" in results[3].content
    assert "must be of type string" in results[4].content
    assert "tool exploded" in results[5].content
    assert not any(r.ok for r in results[1:])
    assert results[0].message() == {"role": "tool", "content": "5"}


def test_registry_slow_tool_times_out_without_blocking():
    registry = ToolRegistry([slow_tool(3.0), calculator()])
    start = time.monotonic()
    _, results = registry.execute_message(call("slow", {}) + call("calculator", {"expression": "2"}))
    assert time.monotonic() - start < 1.5
    assert not results[0].ok and "timed out after 0.2 s" in results[0].content
    assert results[1].ok and results[1].content == "2"


def test_registry_async_dispatch_times_out():
    import asyncio

    registry = ToolRegistry([slow_tool(2.0)])
    parsed = parse_tool_calls(call("slow", {}))
    result = asyncio.run(registry.aexecute(parsed.calls[0]))
    assert not result.ok and "timed out" in result.content


def test_registry_rejects_bad_tool_definitions():
    with pytest.raises(ValueError, match="type 'object'"):
        Tool("t", "d", {"type": "string"}, lambda: "")
    registry = ToolRegistry([calculator()])
    with pytest.raises(ValueError, match="already registered"):
        registry.register(calculator())


def test_registry_truncates_huge_results():
    registry = ToolRegistry([Tool("big", "d", {"type": "object"}, lambda: "x" * 100_000)])
    _, (result,) = registry.execute_message(call("big", {}))
    assert result.ok and len(result.content) < 10_000 and "truncated" in result.content


# -------------------------------------------------------------------------------- calculator


@pytest.mark.parametrize("expression, expected", [
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("-2**2", -4), ("2**-1", 0.5), ("2^10", 1024),
    ("2**3**2", 512), ("7 // 2", 3), ("-7 // 2", -4), ("7 % 3", 1), ("10 / 4", 2.5),
    ("6 / 3", 2), ("sqrt(16)", 4), ("sqrt(2)", math.sqrt(2)), ("abs(-3.5)", 3.5),
    ("round(3.14159, 2)", 3.14), ("sin(pi / 6)", 0.5), ("cos(0)", 1), ("tan(pi / 4)", 1),
    ("log(e)", 1), ("log(8, 2)", 3), ("1.5e3", 1500), (".5 + 1.", 1.5), ("max(1, 5, 3)", 5),
    ("degrees(pi)", 180), ("hypot(3, 4)", 5), ("--3", 3), ("2 * (3 + 4) ^ 2", 98),
])
def test_calculator_correct(expression, expected):
    assert evaluate(expression) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_calculator_keeps_integers_exact():
    assert evaluate("2**100 + 1") == 2**100 + 1
    assert calculator_tool("10 / 5") == "2" and calculator_tool("1 / 4") == "0.25"


@pytest.mark.parametrize("expression, fragment", [
    ("__import__('os')", "strings are not allowed"),
    ("__import__(os)", "unknown function '__import__'"),
    ("os.system", "attribute access"),
    ("(1).__class__", "attribute access"),
    ("open", "unknown name 'open'"),
    ("eval(1)", "unknown function 'eval'"),
    ("[1, 2]", "lists are not allowed"),
    ("x = 1", "assignment"),
    ("lambda: 1", "unexpected character ':'"),
    ("lambda", "unknown name 'lambda'"),
    ("2 ** 99999999", "exponent too large"),
    ("9 ** 9 ** 9", "exponent too large"),
    ("10 ** 1000 * 10 ** 1000", "result too large"),
    ("2.0 ** 5000", "too large"),
    ("1e999", "not a finite number"),
    ("exp(1000)", "too large"),
    ("(" * 60 + "1" + ")" * 60, "nested too deeply"),
    ("(" * 300 + "1" + ")" * 300, "too many tokens"),
    ("-" * 200 + "1", "nested too deeply"),
    ("1+" * 600 + "1", "too long"),
    ("1 / 0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("sqrt(-1)", "sqrt of a negative"),
    ("(-8) ** (1/3)", "fractional power"),
    ("log(0)", "non-positive"),
    ("sqrt(1, 2)", "takes 1 argument"),
    ("sqrt", "is a function"),
    ("", "empty expression"),
    ("1 2", "unexpected '2'"),
    ("2 +", "found end of input"),
    ("(1 + 2", "expected ')'"),
    ("round(1.5, 100)", "round digits"),
])
def test_calculator_refuses_with_clear_error(expression, fragment):
    with pytest.raises(ExpressionError) as info:
        evaluate(expression)
    assert fragment in str(info.value)


def test_calculator_refusals_are_fast():
    start = time.monotonic()
    for expression in ("2**4096**4096", "10**4000", "(" * 10_000, "9" * 999 + "**9" ):
        with pytest.raises(ExpressionError):
            evaluate(expression)
    assert time.monotonic() - start < 1.0


def test_calculator_via_registry_reports_errors_to_the_model():
    registry = ToolRegistry([calculator()])
    _, (result,) = registry.execute_message(call("calculator", {"expression": "__import__('os')"}))
    assert not result.ok
    assert result.content.startswith("Error in tool call 1 (calculator): unexpected character")


# --------------------------------------------------------------------- chat template round trip


def test_schemas_and_calls_round_trip_through_the_chat_template(tiny_model_dir):
    """Schemas land in the system turn via `tools=`; an assistant turn rendered from OpenAI
    `tool_calls` parses back to the same calls; tool results render as <tool_response>."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    registry = ToolRegistry([calculator()])
    calls = parse_tool_calls(call("calculator", {"expression": "2*3"})
                             + call("calculator", {"expression": "sqrt(2)"})).calls
    _, results = registry.execute_message(call("calculator", {"expression": "2*3"}))
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Let me compute.",
                 "tool_calls": to_openai_tool_calls(calls)},
                results[0].message()]
    text = tokenizer.apply_chat_template(messages, tools=registry.schemas(), tokenize=False)
    system_turn = text.split("<|im_end|>")[0]
    assert system_turn.startswith("<|im_start|>system") and '"name": "calculator"' in system_turn
    assistant_turn = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    reparsed = parse_tool_calls(assistant_turn)
    assert [(c.name, c.arguments) for c in reparsed.calls] == [(c.name, c.arguments) for c in calls]
    assert reparsed.content == "Let me compute." and not reparsed.errors
    assert "<tool_response>\n6\n</tool_response>" in text
