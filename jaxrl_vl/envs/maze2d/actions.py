"""Parsing of the model's reply into a Maze2D action, VisGym's feedback strings and the prompts.

Two action formats:
- "tuple" (VisGym): `('move', d)` with d 0=right, 1=up (row-1), 2=left, 3=down, or
  `('stop', 'stop')`. Like VisGym's Interactor, the reply is normalised (code fences, backticks,
  "Action:" labels dropped), the inside of the last <answer>...</answer> is used when present, and
  the LAST balanced (...) that literal-evaluates to a tuple with a string head is the action
  (a bare identifier head like `(move, 0)` is quoted first).
- "keyword" (SkyRL instruct): the last `<action>left|right|up|down|stop</action>`.
"""

from __future__ import annotations

import ast
import dataclasses
import re

Action = tuple  # ('move', 0..3) | ('stop', 'stop') | any other parsed tuple (rejected by the env)

DIRECTION_TO_DELTA = {0: (0, 1), 1: (-1, 0), 2: (0, -1), 3: (1, 0)}  # right, up, left, down
KEYWORD_TO_ACTION = {
    "right": ("move", 0),
    "up": ("move", 1),
    "left": ("move", 2),
    "down": ("move", 3),
    "stop": ("stop", "stop"),
}
ACTION_TO_KEYWORD = {v: k for k, v in KEYWORD_TO_ACTION.items()}
ACTION_FORMATS = ("tuple", "keyword")

# VisGym's env_feedback strings.
FEEDBACK_OK = "Action executed successfully."
FEEDBACK_WALL = "Cannot move into a wall."
FEEDBACK_BAD_FORMAT = (
    "The action format is invalid. The action should be a tuple of two elements with the first "
    "element being the action name and the second element being the action payload."
)
# SkyRL's instruct-variant parse error.
FEEDBACK_NO_KEYWORD = (
    "Action parsing failed. Could not find a valid action in your response.\n"
    "Please end your response with <action>ACTION</action> where ACTION is one of: "
    "down, left, right, stop, up"
)
# VisGym echoes the whole unparseable reply; we cut it so a rambling reply cannot flood a small
# context window.
MAX_ECHO_CHARS = 80


def feedback_unparseable(text: str, error: Exception) -> str:
    shown = text if len(text) <= MAX_ECHO_CHARS else text[:MAX_ECHO_CHARS] + "..."
    return f"Cannot parse action string {shown!r}: {error} so the action is invalid."


def feedback_bad_payload(branch: str, payload: object) -> str:
    return f"The action {payload} is not in the valid action space of {branch} so nothing is executed."


def feedback_unknown_name(branch: object) -> str:
    return f"The action name '{branch}' is not recognized in the available action space."


@dataclasses.dataclass(frozen=True)
class ParsedAction:
    """`action` is the tuple found (None when nothing parsed); `error` the feedback when None."""

    action: Action | None
    error: str | None = None


_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_KEYWORD_RE = re.compile(r"<action>\s*(\w+)\s*</action>", re.IGNORECASE)
_BARE_HEAD_RE = re.compile(r"^\(\s*([A-Za-z_]\w*)(\s*,)")


def _normalise(text: str) -> str:
    text = re.sub(r"```[\w-]*", "", text).replace("`", "")
    text = re.sub(r"\bAction\s*:\s*", " ", text, flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", text).strip()


def _balanced_tuples(text: str) -> list[tuple]:
    """Every (...) span (outermost first at each start) that evaluates to a tuple with a str head."""
    found = []
    for start, ch in enumerate(text):
        if ch != "(":
            continue
        depth = 0
        for end in range(start, len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                raw = _BARE_HEAD_RE.sub(lambda m: f"('{m.group(1)}'{m.group(2)}", text[start : end + 1])
                try:
                    value = ast.literal_eval(raw)
                except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                    break
                if isinstance(value, tuple) and value and isinstance(value[0], str):
                    found.append(value)
                break
    return found


def parse_tuple_action(text: str) -> ParsedAction:
    answers = _ANSWER_RE.findall(text)
    body = _normalise(answers[-1] if answers else text)
    candidates = _balanced_tuples(body)
    if not candidates:
        # Report the literal_eval error VisGym would show for the whole reply.
        try:
            value = ast.literal_eval(body)
        except Exception as e:  # noqa: BLE001 - any literal_eval failure becomes feedback text
            return ParsedAction(None, feedback_unparseable(body, e))
        candidates = [value]
    action = candidates[-1]
    if not isinstance(action, tuple) or len(action) != 2:
        return ParsedAction(None, FEEDBACK_BAD_FORMAT)
    return ParsedAction(action)


def parse_keyword_action(text: str) -> ParsedAction:
    matches = _KEYWORD_RE.findall(text)
    if not matches or matches[-1].lower() not in KEYWORD_TO_ACTION:
        return ParsedAction(None, FEEDBACK_NO_KEYWORD)
    return ParsedAction(KEYWORD_TO_ACTION[matches[-1].lower()])


def parse_action(text: str, action_format: str = "tuple") -> ParsedAction:
    if action_format == "tuple":
        return parse_tuple_action(text)
    if action_format == "keyword":
        return parse_keyword_action(text)
    raise ValueError(f"action_format must be one of {ACTION_FORMATS}, got {action_format!r}")


def format_action(action: Action, action_format: str = "tuple") -> str:
    """The canonical reply text for an action: "('move', 0)" or "<action>right</action>"."""
    if action_format == "keyword":
        return f"<action>{ACTION_TO_KEYWORD[tuple(action)]}</action>"
    return repr(tuple(action))


# ---------------------------------------------------------------------------------------------
# Prompts. "visgym" reproduces VisGym's get_prompt() (rgb mode); "compact" keeps the same facts in
# about a third of the tokens for small models with short contexts.

VERBALIZE_SUFFIX = (
    "\n\nVerbalize your reasoning in <think>…</think> and give the final result in <answer>…</answer>."
)
KEYWORD_SUFFIX = (
    "\n\nIMPORTANT: You must end your response with your chosen action in this exact format: "
    "<action>ACTION</action> where ACTION is one of: left, right, up, down, stop."
)
PROMPT_STYLES = ("visgym", "compact")


def visgym_prompt(size: int) -> str:
    return (
        f"You are navigating a {size}x{size} maze. The maze consists of walls (gray) and paths "
        "(white). You are represented by a blue circle, and your goal is to reach the red target "
        "square.\n\nAvailable actions:\n"
        "1. 'move': Move in one of four directions. Format: `('move', direction)` where direction "
        "is an integer:\n   - 0=right, 1=up, 2=left, 3=down\n"
        "2. 'stop': End the navigation session. Format: `('stop', 'stop')`\n\n"
        "Success: You succeed if you reach the red target square.\n\n"
        "Please respond with exactly one action and its arguments in the specified format. "
        "For example:\n- To move right: `('move', 0)`\n- To move up: `('move', 1)`\n"
        "- To move left: `('move', 2)`\n- To move down: `('move', 3)`\n- To stop: `('stop', 'stop')`"
    )


def compact_prompt(size: int, action_format: str) -> str:
    head = (
        f"{size}x{size} maze: gray walls, white paths. You are the blue circle; reach the red square, "
        "then stop. "
    )
    if action_format == "keyword":
        return head + "Reply with one action: <action>X</action>, X in left, right, up, down, stop."
    return head + "Reply with one action: ('move', d) with d 0=right 1=up 2=left 3=down, or ('stop', 'stop')."


def instructions(size: int, action_format: str, prompt_style: str, verbalize: bool) -> str:
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
    if action_format not in ACTION_FORMATS:
        raise ValueError(f"action_format must be one of {ACTION_FORMATS}, got {action_format!r}")
    if prompt_style == "compact":
        text = compact_prompt(size, action_format)
    else:
        text = visgym_prompt(size) + (KEYWORD_SUFFIX if action_format == "keyword" else "")
    if verbalize and action_format == "tuple":
        text += VERBALIZE_SUFFIX
    return text


def step_line(step_index: int, max_steps: int) -> str:
    """VisGym's per-turn line; `step_index` counts from 0."""
    return f"This is step {step_index + 1}. You are allowed to take {max_steps - step_index - 1} more steps."
