"""Grade geometry answers: numeric and symbolic equivalents (sympy), never `eval`.

Accepted as equal to a reference like `2\\sqrt{3}`: `2*sqrt(3)`, `sqrt(12)`, `\\sqrt{12}`,
`2√3`, and decimals that round correctly (`3.46`, `3.5`: a decimal with k places is accepted
when it is within half a unit of its last place). Exact answers must be exactly equal (checked at
40 significant digits), so `3` does not match `2\\sqrt{3}` and unreduced fractions match their
values. Degrees signs, units, `x =` prefixes and `$...$` are ignored; a single choice letter (A-D)
is mapped through `choices`. Parsing reuses the bounded arithmetic parser of the calculator
tool with an exact sympy backend, so model output is never executed.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import sympy

from jaxrl_vl.envs.tools.expression import (
    ExpressionError,
    Token,
    check_integer_size,
    check_power_size,
    evaluate_tree,
    parse,
    tokenize,
)

# ---------------------------------------------------------------------------------------------
# Answer extraction.


def _read_group(text: str, start: int) -> tuple[str, int] | None:
    """Read a balanced {...} group starting at text[start] == '{'; return (inner, end index)."""
    if start >= len(text) or text[start] != "{":
        return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    return None


def extract_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced; None if absent."""
    best: str | None = None
    for match in re.finditer(r"\\(?:boxed|fbox)\s*", text):
        group = _read_group(text, match.end())
        if group is not None:
            best = group[0]
        elif match.end() < len(text) and text[match.end() - 1] == " ":
            # "\boxed 5" form: the next whitespace-free run.
            best = re.match(r"\S+", text[match.end():]).group(0).rstrip("$.")
    return best


def extract_final_answer(text: str) -> str | None:
    """The boxed answer, else what follows the last 'Answer:' on its line, else None."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed.strip()
    matches = re.findall(r"(?im)answer\s*(?:is)?\s*[:=]\s*(.+?)\s*$", text)
    return matches[-1].strip().rstrip(".") if matches else None


# ---------------------------------------------------------------------------------------------
# LaTeX -> plain arithmetic text for the parser.

_DROP = [r"\left", r"\right", r"\displaystyle", r"\!", r"\,", r"\;", r"\:", r"\ ", "$", "~",
         r"\(", r"\)", r"\[", r"\]"]
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°|\bdegrees?\b|\bdeg\b")
_UNIT_RE = re.compile(
    r"\s*(?:square\s+|sq\.?\s+)?(?:units?|cm|mm|km|m|in|inches|ft|feet|yd|yards|meters|"
    r"centimeters|millimeters)\s*(?:\^\s*\{?\s*[23]\s*\}?|²|³)?\s*$"
)
_JSON_ESCAPE_CONTROL_CHARS = {0x0C: r"\f", 0x08: r"\b", 0x09: r"\t", 0x0D: r"\r"}
_COMMANDS = {r"\pi": " pi ", r"\cdot": "*", r"\times": "*", r"\div": "/", r"\sin": " sin ",
             r"\cos": " cos ", r"\tan": " tan ", r"\ln": " ln ", r"\log": " log "}


def _replace_fracs_and_roots(text: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        frac = re.match(r"\\[dt]?frac\s*", text[i:])
        root = re.match(r"\\sqrt\s*", text[i:])
        if frac:
            j = i + frac.end()
            args = []
            for _ in range(2):
                group = _read_group(text, j)
                if group is None:  # \frac12 shorthand: single characters
                    if j >= len(text):
                        raise ExpressionError("\\frac needs two arguments")
                    args.append(text[j])
                    j += 1
                else:
                    args.append(group[0])
                    j = group[1]
                while j < len(text) and text[j] == " ":
                    j += 1
            out.append(f"(({_replace_fracs_and_roots(args[0])})/({_replace_fracs_and_roots(args[1])}))")
            i = j
        elif root:
            j = i + root.end()
            degree = None
            if j < len(text) and text[j] == "[":
                close = text.find("]", j)
                if close < 0:
                    raise ExpressionError("unclosed \\sqrt[...]")
                degree, j = text[j + 1:close], close + 1
            group = _read_group(text, j)
            if group is None:
                single = re.match(r"\d+(?:\.\d+)?|[A-Za-z]", text[j:])
                if single is None:
                    raise ExpressionError("\\sqrt needs an argument")
                radicand, j = single.group(0), j + single.end()
            else:
                radicand, j = group
            radicand = _replace_fracs_and_roots(radicand)
            out.append(f"sqrt({radicand})" if degree is None
                       else f"(({radicand})**(1/({_replace_fracs_and_roots(degree)})))")
            i = j
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def latex_to_plain(answer: str) -> str:
    """Rewrite a LaTeX-ish answer into the calculator's syntax (still untrusted text)."""
    # LaTeX that went through JSON unescaped: "\frac" decodes to form feed + "rac", etc.
    text = answer.translate(_JSON_ESCAPE_CONTROL_CHARS).strip()
    for token in _DROP:
        text = text.replace(token, " ")
    text = re.sub(r"\\(?:text|mathrm|mbox|textbf|mathbf)\s*\{([^{}]*)\}", r" \1 ", text)
    text = _DEGREE_RE.sub(" ", text)
    if "=" in text:  # "x = 5", "m\angle ABC = 40"
        text = text.rsplit("=", 1)[1]
    text = text.replace("{,}", "").replace("√", r"\sqrt")
    text = _UNIT_RE.sub("", text).strip().rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", text):
        text = text.replace(",", "")
    text = _replace_fracs_and_roots(text)
    for command, plain in _COMMANDS.items():
        text = text.replace(command, plain)
    return text.replace("{", "(").replace("}", ")")


_FUNCTION_NAMES = {"sqrt", "sin", "cos", "tan", "ln", "log", "abs", "exp"}


def insert_implicit_multiplication(text: str) -> str:
    """`2sqrt(3)` -> `2*sqrt(3)`, `2pi` -> `2*pi`, `(1)(2)` -> `(1)*(2)`."""
    tokens = tokenize(text)[:-1]  # drop the end token
    out: list[str] = []
    previous: Token | None = None
    for token in tokens:
        if previous is not None:
            ends_value = previous.kind == "num" or previous.text == ")" or (
                previous.kind == "name" and previous.text not in _FUNCTION_NAMES)
            starts_value = token.kind in ("num", "name") or token.text == "("
            if ends_value and starts_value:
                out.append("*")
        out.append(token.text)
        previous = token
    return " ".join(out)


# ---------------------------------------------------------------------------------------------
# Exact evaluation.


class SympyBackend:
    """Exact sympy numbers. Records the most decimal places seen in any decimal literal."""

    FUNCTIONS = {"sqrt": sympy.sqrt, "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan,
                 "ln": sympy.log, "log": sympy.log, "abs": sympy.Abs, "exp": sympy.exp}
    CONSTANTS = {"pi": sympy.pi, "e": sympy.E}

    def __init__(self):
        self.decimal_places: int | None = None

    def _check(self, value: sympy.Expr) -> sympy.Expr:
        if value.is_Rational:
            check_integer_size(int(value.p))
            check_integer_size(int(value.q))
        if value.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo):
            raise ExpressionError("undefined value (division by zero?)")
        return value

    def number(self, text: str) -> sympy.Expr:
        mantissa = re.split(r"[eE]", text)[0]
        if "." in mantissa:
            places = len(mantissa.split(".")[1])
            self.decimal_places = max(self.decimal_places or 0, places)
        return self._check(sympy.Rational(text))

    def name(self, ident: str) -> sympy.Expr:
        if ident not in self.CONSTANTS:
            raise ExpressionError(f"unknown name {ident!r}")
        return self.CONSTANTS[ident]

    def unary(self, op: str, value: sympy.Expr) -> sympy.Expr:
        return value if op == "+" else -value

    def binary(self, op: str, left: sympy.Expr, right: sympy.Expr) -> sympy.Expr:
        if op == "+":
            return self._check(left + right)
        if op == "-":
            return self._check(left - right)
        if op == "*":
            return self._check(left * right)
        if op == "/":
            if right == 0:
                raise ExpressionError("division by zero")
            return self._check(left / right)
        if op == "**":
            if right.is_Rational and abs(right) > 64:
                raise ExpressionError("exponent too large")
            if left.is_Integer and right.is_Integer and right > 0:
                check_power_size(abs(int(left)).bit_length(), int(right))
            return self._check(left**right)
        raise ExpressionError(f"operator {op!r} is not allowed in an answer")

    def check_function(self, ident: str) -> None:
        if ident not in self.FUNCTIONS:
            raise ExpressionError(f"unknown function {ident!r}")

    def call(self, ident: str, args: list[sympy.Expr]) -> sympy.Expr:
        fn = self.FUNCTIONS.get(ident)
        if fn is None or len(args) != 1:
            raise ExpressionError(f"function {ident!r} with {len(args)} argument(s) is not allowed")
        return self._check(fn(args[0]))


@dataclasses.dataclass(frozen=True)
class ParsedAnswer:
    value: sympy.Expr
    decimal_places: int | None  # None when the answer has no decimal literal (exact)


def parse_answer(answer: str) -> ParsedAnswer:
    """LaTeX/plain answer -> exact sympy value. Raises ExpressionError when it is not a number."""
    plain = insert_implicit_multiplication(latex_to_plain(answer))
    backend = SympyBackend()
    value = evaluate_tree(parse(plain), backend)
    if not value.is_number:
        raise ExpressionError(f"answer {answer!r} is not a number")
    return ParsedAnswer(value=value, decimal_places=backend.decimal_places)


# ---------------------------------------------------------------------------------------------
# Grading.


@dataclasses.dataclass(frozen=True)
class Grade:
    correct: bool
    reason: str
    predicted: str | None = None  # the answer text actually compared (after letter mapping)


_LETTER_RE = re.compile(r"^\(?([A-Z])\)?[.:]?$|^\(([a-z])\)$")


def map_choice_letter(answer: str, choices: Sequence[str] | None) -> str:
    """'B', '(B)', 'B.' or '(b)' -> choices[1]; anything else unchanged."""
    if not choices:
        return answer
    match = _LETTER_RE.match(answer.strip())
    if match is None:
        return answer
    index = ord((match.group(1) or match.group(2)).upper()) - ord("A")
    return choices[index] if index < len(choices) else answer


def _normalise_text(answer: str) -> str:
    return re.sub(r"[\s$]", "", answer).lower()


def values_equivalent(predicted: ParsedAnswer, reference: ParsedAnswer) -> bool:
    try:
        p = complex(sympy.N(predicted.value, 40))
        r = complex(sympy.N(reference.value, 40))
    except (TypeError, ValueError):
        return False
    if abs(p.imag) > 1e-12 or abs(r.imag) > 1e-12:
        return False
    places = [d for d in (predicted.decimal_places, reference.decimal_places) if d is not None]
    if places:
        # A rounded decimal matches if within half a unit of its coarsest last place.
        tolerance = 0.5 * 10.0 ** (-min(places)) * (1 + 1e-9) + 1e-12
        return abs(p.real - r.real) <= tolerance
    return abs(p.real - r.real) <= 1e-25 * max(1.0, abs(r.real))


def grade_answer(predicted: str | None, reference: str,
                 choices: Sequence[str] | None = None) -> Grade:
    """Is `predicted` (free-form model answer) equivalent to `reference`? Never raises."""
    if predicted is None or not str(predicted).strip():
        return Grade(False, "no answer found")
    predicted = map_choice_letter(str(predicted), choices)
    reference = map_choice_letter(str(reference), choices)
    if _normalise_text(predicted) == _normalise_text(reference):
        return Grade(True, "identical text", predicted)
    try:
        reference_value = parse_answer(reference)
    except ExpressionError as e:
        return Grade(False, f"reference {reference!r} is not numeric ({e}); text differs", predicted)
    try:
        predicted_value = parse_answer(predicted)
    except (ExpressionError, RecursionError) as e:
        return Grade(False, f"could not parse answer {predicted!r}: {e}", predicted)
    if values_equivalent(predicted_value, reference_value):
        return Grade(True, "equivalent value", predicted)
    return Grade(False, f"{predicted!r} is not equal to the expected answer", predicted)


def grade_response(response: str, reference: str,
                   choices: Sequence[str] | None = None) -> Grade:
    """Extract the final answer (\\boxed{} or 'Answer:') from a model response and grade it."""
    return grade_answer(extract_final_answer(response), reference, choices)

