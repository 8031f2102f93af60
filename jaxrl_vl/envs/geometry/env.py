"""Geometry with a `calc_score` tool: multi-turn (default 3), SkyRL/slime geometry3k semantics.

Each turn the model either
  - calls `<tool_call>{"name": "calc_score", "arguments": {"answer": "..."}}</tool_call>`: the env
    grades the answer; correct -> reward 1.0 and the episode ends; incorrect -> a tool message
    with the feedback and the episode goes on (or ends with reward 0.0 on the last turn), or
  - answers without a tool call: the final answer (\\boxed{...} or 'Answer: ...') is graded
    and the episode ends with reward 1.0 / 0.0.
Malformed tool calls and unknown tools come back as error observations and cost a turn. With
`calculator=True` the model may also call the safe calculator tool (its result costs a turn too). Only one
calc_score call per turn is graded (the last, as in SkyRL), so listing every choice in one turn
does not help. `info["turn_rewards"]` holds the reward of every turn so far.

Problems come from a Geometry3k-format dataset (`data_path`) or, by default, from the offline
generator (`generate_problem(generator_seed, seed)`, a fresh problem per episode seed).
Feedback goes in "tool" messages (Qwen3-VL renders them as <tool_response> in a user turn);
`observation_role="user"` sends plain user messages instead, as SkyRL does, for chat templates
without tool support (Qwen2.5-VL).
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any, Sequence

from jaxrl_vl.envs.base import StepResult, image_part, text_part, user_message
from jaxrl_vl.envs.geometry.generator import generate_problem
from jaxrl_vl.envs.geometry.grader import Grade, extract_final_answer, grade_answer
from jaxrl_vl.envs.geometry.loader import GeometryDataError, load_geometry3k
from jaxrl_vl.envs.tools.parsing import error_observation, parse_tool_calls
from jaxrl_vl.envs.tools import calculator as make_calculator
from jaxrl_vl.envs.tools.registry import Tool, ToolRegistry, run_with_timeout, validate_arguments

CALC_SCORE_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": ["string", "number"],
                              "description": "Your candidate final answer, e.g. '2\\sqrt{3}' or '42'."}},
    "required": ["answer"],
    "additionalProperties": False,
}

PROMPT_TEMPLATE = (
    "{problem}\n\n"
    "Reason step by step inside <think>...</think>. You may check a candidate answer by calling "
    "the calc_score tool:\n"
    '<tool_call>{{"name": "calc_score", "arguments": {{"answer": "<your answer>"}}}}</tool_call>\n'
    "It tells you whether the answer is correct. You have {max_turns} turns in total. "
    "When you are sure, give the final answer as \\boxed{{answer}}."
)


CALCULATOR_HINT = (
    "\nYou may also evaluate arithmetic with the calculator tool: "
    '<tool_call>{"name": "calculator", "arguments": {"expression": "sqrt(3**2 + 4**2)"}}</tool_call>'
)


def _calc_score_unbound(answer: str) -> str:
    raise RuntimeError("calc_score is graded by GeometryEnv.step, not called directly")


CALC_SCORE_TOOL = Tool(
    name="calc_score",
    description="Check whether a candidate final answer to the geometry problem is correct.",
    parameters=CALC_SCORE_SCHEMA,
    function=_calc_score_unbound,
)


def _modified_ns(path: pathlib.Path) -> int:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return max((f.stat().st_mtime_ns for f in files), default=0)


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, split: str, limit: int | None, modified_ns: int) -> tuple:
    return tuple(load_geometry3k(path, split, limit))


def cached_records(path: str, split: str = "train", limit: int | None = None) -> tuple:
    """Records of a dataset, decoded once per process (envs are often built once per episode);
    rereads when a file under `path` changes. The records are shared: treat them as read-only."""
    resolved = pathlib.Path(path).resolve()
    if not resolved.exists():
        raise GeometryDataError(f"geometry data path {str(path)!r} does not exist")
    return _load_cached(str(resolved), split, limit, _modified_ns(resolved))


class GeometryEnv:
    """ChatEnv over Geometry3k-format problems (see module doc)."""

    keep_last_images: int | None = None

    def __init__(self, data_path: str | None = None, split: str = "train",
                 records: Sequence[dict[str, Any]] | None = None, generator_seed: int = 0,
                 max_turns: int = 3, show_choices: bool = False, grade_timeout_s: float = 5.0,
                 limit: int | None = None, observation_role: str = "tool",
                 calculator: bool = False):
        if observation_role not in ("tool", "user"):
            raise ValueError(f"observation_role must be 'tool' or 'user', got {observation_role!r}"
                             " ('user' suits chat templates without tool support, e.g. Qwen2.5-VL)")
        self.observation_role = observation_role
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        if records is not None and data_path is not None:
            raise ValueError("pass either records or data_path, not both")
        self.records = list(records) if records is not None else (
            cached_records(data_path, split, limit) if data_path is not None else None)
        self.generator_seed = generator_seed
        self.max_turns = max_turns
        self.show_choices = show_choices
        self.grade_timeout_s = grade_timeout_s
        # OpenAI function schemas for chat templates with tool support (Qwen3-VL `tools=`).
        self.extra_tools = ToolRegistry([make_calculator()] if calculator else [])
        self.tools = [CALC_SCORE_TOOL.openai_schema()] + self.extra_tools.schemas()
        self.record: dict[str, Any] | None = None
        self.turn = 0
        self.done = False
        self.turn_rewards: list[float] = []

    def problem_for_seed(self, seed: int) -> dict[str, Any]:
        if self.records is None:
            return generate_problem(self.generator_seed, seed)
        return self.records[seed % len(self.records)]

    def reset(self, seed: int) -> list[dict[str, Any]]:
        self.record = self.problem_for_seed(seed)
        self.turn = 0
        self.done = False
        self.turn_rewards = []
        problem = self.record["problem"].replace("<image>", "").strip()
        if self.show_choices and self.record.get("choices"):
            letters = "ABCDEFGH"
            problem += "\nChoices: " + "  ".join(
                f"{letters[i]}. {c}" for i, c in enumerate(self.record["choices"]))
        text = PROMPT_TEMPLATE.format(problem=problem, max_turns=self.max_turns)
        if "calculator" in self.extra_tools:
            text += CALCULATOR_HINT
        parts = [image_part(image) for image in self.record["images"]] + [text_part(text)]
        return [user_message(*parts)]

    def _grade(self, predicted: str | None) -> Grade:
        choices = self.record.get("choices") if self.show_choices else None
        status, value = run_with_timeout(
            lambda: grade_answer(predicted, self.record["answer"], choices), self.grade_timeout_s)
        if status == "ok":
            return value
        reason = "grading timed out" if status == "timeout" else f"grading failed: {value}"
        return Grade(False, reason, predicted)

    def _finish(self, reward: float, done: bool, messages: list[dict[str, Any]],
                **info: Any) -> StepResult:
        self.turn_rewards.append(reward)
        self.done = done
        info.update(turn=self.turn, turn_rewards=list(self.turn_rewards),
                    reference=self.record["answer"], record_id=self.record.get("id"))
        return StepResult(messages=messages, reward=reward, done=done, info=info)

    def step(self, assistant_text: str) -> StepResult:
        if self.record is None:
            raise RuntimeError("call reset(seed) before step()")
        if self.done:
            raise RuntimeError(f"episode already finished after {self.turn} turn(s); call reset")
        self.turn += 1
        last_turn = self.turn >= self.max_turns
        parsed = parse_tool_calls(assistant_text)
        if not parsed.has_tool_calls:
            grade = self._grade(extract_final_answer(assistant_text))
            return self._finish(float(grade.correct), True, [], correct=grade.correct,
                                answer_source="final", predicted=grade.predicted,
                                grade_reason=grade.reason, tool_errors=0)

        observations: list[tuple[int, str]] = [(e.index, error_observation(e)) for e in parsed.errors]
        tool_errors = len(parsed.errors)
        score_calls = []
        for call in parsed.calls:
            if call.name in self.extra_tools:
                result = self.extra_tools.execute(call)
                observations.append((call.index, result.content))
                tool_errors += not result.ok
                continue
            if call.name != CALC_SCORE_TOOL.name:
                available = ", ".join([CALC_SCORE_TOOL.name, *self.extra_tools.names()])
                observations.append((call.index, f"Error in tool call {call.index + 1}: unknown "
                                                 f"tool {call.name!r}; available tools: {available}."))
                tool_errors += 1
                continue
            problem = validate_arguments(call.arguments, CALC_SCORE_SCHEMA)
            if problem is not None:
                observations.append((call.index, f"Error in tool call {call.index + 1} "
                                                 f"(calc_score): {problem}."))
                tool_errors += 1
            else:
                score_calls.append(call)
        grade: Grade | None = None
        for call in score_calls[:-1]:
            observations.append((call.index, f"calc_score call {call.index + 1} ignored: only the "
                                             "last calc_score call of a turn is graded."))
        if score_calls:
            call = score_calls[-1]
            grade = self._grade(str(call.arguments["answer"]))
            if grade.correct:
                feedback = "calc_score result: 1.0. The answer is correct."
            elif grade.reason.startswith("could not parse"):
                feedback = f"calc_score result: 0.0. {grade.reason}."
            else:  # the grader's reason may quote the reference, so it stays in info only
                feedback = (f"calc_score result: 0.0. Parsed answer {grade.predicted!r} does not "
                            "match the correct answer.")
            observations.append((call.index, feedback))
        correct = bool(grade and grade.correct)
        source = "tool"
        if not correct and last_turn and extract_final_answer(parsed.content) is not None:
            # Last turn: a boxed answer next to a failed check still counts.
            grade, source = self._grade(extract_final_answer(parsed.content)), "final"
            correct = grade.correct
        done = correct or last_turn
        observations.sort(key=lambda item: item[0])
        messages = [{"role": self.observation_role, "content": text} for _, text in observations]
        if not done and messages:
            remaining = self.max_turns - self.turn
            messages[-1] = {**messages[-1], "content": messages[-1]["content"]
                            + f" You have {remaining} turn{'s' if remaining != 1 else ''} left."}
        return self._finish(float(correct), done, messages, correct=correct, answer_source=source,
                            predicted=grade.predicted if grade else None,
                            grade_reason=grade.reason if grade else "no valid calc_score call",
                            tool_errors=tool_errors)
