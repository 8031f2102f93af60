"""The calculator tool: safe arithmetic over the bounded parser in `expression.py` (never `eval`).

`evaluate(text)` returns an int (exact integer arithmetic where Python would give one) or a
float; `format_result` renders it for the model. Allowed: + - * / // % ** ^ (power), unary
signs, parentheses, numbers (including 1.5e3), the constants pi, e, tau, and the functions in
`FUNCTIONS`. Everything else (names, attributes, strings, code) is refused with a message.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from jaxrl_vl.envs.tools.expression import (
    MAX_INTEGER_BITS,
    ExpressionError,
    check_integer_size,
    check_power_size,
    evaluate_tree,
    parse,
)

Number = int | float

CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _finite(value: float) -> float:
    if isinstance(value, complex):
        raise ExpressionError("result is a complex number (e.g. a negative number to a fractional power)")
    if isinstance(value, float) and not math.isfinite(value):
        raise ExpressionError("result is not a finite number (overflow or undefined)")
    return value


def _as_float(value: Number) -> float:
    try:
        return float(value)
    except OverflowError:
        raise ExpressionError("number too large to convert to a float") from None


def _sqrt(x: Number) -> Number:
    if x < 0:
        raise ExpressionError(f"sqrt of a negative number ({x})")
    if isinstance(x, int):
        root = math.isqrt(x)
        if root * root == x:
            return root
    return math.sqrt(_as_float(x))


def _log(x: Number, base: Number | None = None) -> float:
    if x <= 0:
        raise ExpressionError(f"log of a non-positive number ({x})")
    if base is None:
        return math.log(x)
    if base <= 0 or base == 1:
        raise ExpressionError(f"log base must be positive and not 1, got {base}")
    return math.log(x) / math.log(base)


def _positive_log(fn: Callable[[float], float], name: str) -> Callable[[Number], float]:
    def wrapped(x: Number) -> float:
        if x <= 0:
            raise ExpressionError(f"{name} of a non-positive number ({x})")
        return fn(x)
    return wrapped


def _domain(fn: Callable[[float], float], name: str, low: float, high: float):
    def wrapped(x: Number) -> float:
        if not low <= x <= high:
            raise ExpressionError(f"{name} is only defined on [{low}, {high}], got {x}")
        return fn(_as_float(x))
    return wrapped


def _round(x: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return round(x)
    if not isinstance(ndigits, int) or not 0 <= ndigits <= 15:
        raise ExpressionError(f"round digits must be an integer in [0, 15], got {ndigits}")
    return round(x, ndigits)


def _exp(x: Number) -> float:
    if x > 700:
        raise ExpressionError(f"exp({x}) is too large")
    return math.exp(x)


def _tan(x: Number) -> float:
    value = math.tan(_as_float(x))
    if abs(value) > 1e15:
        raise ExpressionError(f"tan is undefined at {x}")
    return value


def _sin(x: Number) -> float:
    return math.sin(_as_float(x))


def _cos(x: Number) -> float:
    return math.cos(_as_float(x))


# name -> (function, min args, max args)
FUNCTIONS: dict[str, tuple[Callable[..., Number], int, int]] = {
    "sqrt": (_sqrt, 1, 1),
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
    "min": (min, 1, 16),
    "max": (max, 1, 16),
    "sin": (_sin, 1, 1),
    "cos": (_cos, 1, 1),
    "tan": (_tan, 1, 1),
    "asin": (_domain(math.asin, "asin", -1.0, 1.0), 1, 1),
    "acos": (_domain(math.acos, "acos", -1.0, 1.0), 1, 1),
    "atan": (lambda x: math.atan(_as_float(x)), 1, 1),
    "atan2": (lambda y, x: math.atan2(_as_float(y), _as_float(x)), 2, 2),
    "hypot": (lambda *xs: math.hypot(*map(_as_float, xs)), 1, 16),
    "degrees": (lambda x: math.degrees(_as_float(x)), 1, 1),
    "radians": (lambda x: math.radians(_as_float(x)), 1, 1),
    "log": (_log, 1, 2),
    "ln": (_positive_log(math.log, "ln"), 1, 1),
    "log10": (_positive_log(math.log10, "log10"), 1, 1),
    "log2": (_positive_log(math.log2, "log2"), 1, 1),
    "exp": (_exp, 1, 1),
}

ALLOWED_NAMES_TEXT = (
    "constants " + ", ".join(sorted(CONSTANTS)) + "; functions " + ", ".join(sorted(FUNCTIONS))
)


def _check_number(value: Any) -> Number:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return check_integer_size(value)
    return _finite(value)


class PythonNumberBackend:
    """Evaluates with Python ints (exact) and floats, bounded by MAX_INTEGER_BITS."""

    def number(self, text: str) -> Number:
        if any(c in text for c in ".eE"):
            return _finite(float(text))
        return check_integer_size(int(text))

    def name(self, ident: str) -> Number:
        if ident in CONSTANTS:
            return CONSTANTS[ident]
        if ident in FUNCTIONS:
            raise ExpressionError(f"{ident} is a function; call it like {ident}(x)")
        raise ExpressionError(f"unknown name {ident!r}; allowed: {ALLOWED_NAMES_TEXT}")

    def unary(self, op: str, value: Number) -> Number:
        return value if op == "+" else -value

    def binary(self, op: str, left: Number, right: Number) -> Number:
        try:
            if op == "+":
                return _check_number(left + right)
            if op == "-":
                return _check_number(left - right)
            if op == "*":
                if isinstance(left, int) and isinstance(right, int):
                    # Refuse before multiplying: the product has about this many bits.
                    if abs(left).bit_length() + abs(right).bit_length() > MAX_INTEGER_BITS + 1:
                        raise ExpressionError(
                            f"result too large: an integer product over {MAX_INTEGER_BITS} bits")
                return _check_number(left * right)
            if op == "/":
                if isinstance(left, int) and isinstance(right, int) and right != 0 \
                        and left % right == 0:
                    return left // right  # exact integer quotient: keeps 6/3 == 2
                return _check_number(left / right)
            if op == "//":
                return _check_number(left // right)
            if op == "%":
                return _check_number(left % right)
            if op == "**":
                return self._power(left, right)
        except ZeroDivisionError:
            raise ExpressionError("division by zero") from None
        except OverflowError:
            raise ExpressionError("result too large (overflow)") from None
        raise ExpressionError(f"unknown operator {op!r}")

    def _power(self, base: Number, exponent: Number) -> Number:
        if isinstance(base, int) and isinstance(exponent, int) and exponent >= 0:
            check_power_size(abs(base).bit_length(), exponent)
            return check_integer_size(base**exponent)
        if base < 0 and not float(exponent).is_integer():
            raise ExpressionError(f"negative number to a fractional power ({base} ** {exponent})")
        if base == 0 and exponent < 0:
            raise ExpressionError("division by zero (0 to a negative power)")
        try:
            return _finite(math.pow(_as_float(base), _as_float(exponent)))
        except OverflowError:
            raise ExpressionError(f"result too large ({base} ** {exponent})") from None

    def check_function(self, ident: str) -> None:
        if ident not in FUNCTIONS:
            raise ExpressionError(f"unknown function {ident!r}; allowed: {ALLOWED_NAMES_TEXT}")

    def call(self, ident: str, args: list[Number]) -> Number:
        self.check_function(ident)
        fn, min_args, max_args = FUNCTIONS[ident]
        if not min_args <= len(args) <= max_args:
            expected = str(min_args) if min_args == max_args else f"{min_args} to {max_args}"
            raise ExpressionError(f"{ident} takes {expected} argument(s), got {len(args)}")
        try:
            return _check_number(fn(*args))
        except (ValueError, OverflowError) as e:
            if isinstance(e, ExpressionError):
                raise
            raise ExpressionError(f"{ident}: {e}") from None


def evaluate(text: str) -> Number:
    """Evaluate an arithmetic expression safely. Raises ExpressionError with a clear message."""
    return evaluate_tree(parse(text), PythonNumberBackend())


def format_result(value: Number) -> str:
    if isinstance(value, int):
        return str(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def calculator_tool(expression: str) -> str:
    """The tool entry point: returns the result text, or raises ExpressionError (the registry
    turns that into an error observation)."""
    return format_result(evaluate(expression))


CALCULATOR_SCHEMA = {
    "type": "object",
    "properties": {
        "expression": {
            "type": "string",
            "description": (
                "Arithmetic expression, e.g. 'sqrt(3**2 + 4**2)' or '0.5*7*12*sin(pi/6)'. "
                "Operators + - * / // % ** (or ^); " + ALLOWED_NAMES_TEXT + ". Angles in radians."
            ),
        }
    },
    "required": ["expression"],
    "additionalProperties": False,
}
