"""A small, bounded arithmetic parser (Pratt / precedence climbing). Never uses `eval`.

The same parse tree is evaluated two ways: with Python numbers (the calculator tool) and with
exact sympy numbers (the geometry grader). Everything a model could abuse is bounded up front:
input length, token count, nesting depth, the size of integer results and exponents, and which
names and functions exist at all. Anything else is a `ExpressionError` with a message meant to
be shown to the model.

Grammar (lowest to highest precedence):
  expr    := term (('+' | '-') term)*
  term    := unary (('*' | '/' | '//' | '%') unary)*
  unary   := ('+' | '-') unary | power
  power   := atom (('**' | '^') unary)?        # right-associative, -2**2 == -(2**2)
  atom    := NUMBER | NAME | NAME '(' args ')' | '(' expr ')'
`^` means power (models write it that way), not xor.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Protocol

MAX_INPUT_CHARS = 1000
MAX_TOKENS = 400
MAX_NESTING_DEPTH = 40
# Integer results above this many bits are refused (about 1,200 decimal digits).
MAX_INTEGER_BITS = 4096


class ExpressionError(ValueError):
    """Bad or refused expression; `str(e)` is a message fit to show to the model."""


@dataclasses.dataclass(frozen=True)
class Token:
    kind: str  # "num" | "name" | "op" | "end"
    text: str
    position: int


# Node shapes (plain tuples keep the tree cheap and immutable):
#   ("num", text) | ("name", ident) | ("unary", op, node) | ("binary", op, left, right)
#   | ("call", ident, (args...))
Node = tuple

_TOKEN_RE = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z_0-9]*)
  | (?P<op>\*\*|//|[-+*/%^(),])
    """,
    re.VERBOSE,
)

_CHAR_HINTS = {
    ".": "attribute access ('.') is not allowed",
    "'": "strings are not allowed",
    '"': "strings are not allowed",
    "[": "indexing and lists are not allowed",
    "]": "indexing and lists are not allowed",
    "=": "assignment and comparison are not allowed",
    "<": "comparison is not allowed",
    ">": "comparison is not allowed",
    "&": "bitwise operators are not allowed",
    "|": "bitwise operators are not allowed",
    "~": "bitwise operators are not allowed",
    ";": "only a single expression is allowed",
    "\\": "LaTeX commands are not allowed here; write sqrt(3), pi, (a)/(b)",
}


def tokenize(text: str) -> list[Token]:
    if not isinstance(text, str):
        raise ExpressionError(f"expression must be a string, got {type(text).__name__}")
    if len(text) > MAX_INPUT_CHARS:
        raise ExpressionError(
            f"expression too long: {len(text)} characters (limit {MAX_INPUT_CHARS})"
        )
    tokens: list[Token] = []
    position = 0
    while position < len(text):
        match = _TOKEN_RE.match(text, position)
        if match is None:
            char = text[position]
            hint = _CHAR_HINTS.get(char, "only numbers, + - * / // % ** ^, parentheses and "
                                   "whitelisted names are allowed")
            raise ExpressionError(f"unexpected character {char!r} at position {position}: {hint}")
        kind = match.lastgroup
        if kind != "space":
            tokens.append(Token(kind, match.group(), position))
            if len(tokens) > MAX_TOKENS:
                raise ExpressionError(f"expression has too many tokens (limit {MAX_TOKENS})")
        position = match.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


_BINARY_PRECEDENCE = {"+": 10, "-": 10, "*": 20, "/": 20, "//": 20, "%": 20}
_POWER_OPS = ("**", "^")


class _Parser:
    def __init__(self, tokens: list[Token]):
        self.tokens = tokens
        self.index = 0
        self.depth = 0

    def peek(self) -> Token:
        return self.tokens[self.index]

    def advance(self) -> Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def expect(self, text: str) -> None:
        token = self.advance()
        if token.text != text:
            found = "end of input" if token.kind == "end" else repr(token.text)
            raise ExpressionError(f"expected {text!r} at position {token.position}, found {found}")

    def _enter(self) -> None:
        # Depth counts every recursive descent (parentheses, unary chains, powers, calls).
        self.depth += 1
        if self.depth > MAX_NESTING_DEPTH:
            raise ExpressionError(f"expression nested too deeply (limit {MAX_NESTING_DEPTH} levels)")

    def expression(self, min_precedence: int = 0) -> Node:
        self._enter()
        left = self.unary()
        while True:
            token = self.peek()
            precedence = _BINARY_PRECEDENCE.get(token.text) if token.kind == "op" else None
            if precedence is None or precedence <= min_precedence:
                break
            self.advance()
            right = self.expression(precedence)
            left = ("binary", token.text, left, right)
        self.depth -= 1
        return left

    def unary(self) -> Node:
        token = self.peek()
        if token.kind == "op" and token.text in ("+", "-"):
            self.advance()
            self._enter()
            operand = self.unary()
            self.depth -= 1
            return ("unary", token.text, operand)
        return self.power()

    def power(self) -> Node:
        base = self.atom()
        token = self.peek()
        if token.kind == "op" and token.text in _POWER_OPS:
            self.advance()
            self._enter()
            exponent = self.unary()  # right-associative; allows 2**-1
            self.depth -= 1
            return ("binary", "**", base, exponent)
        return base

    def atom(self) -> Node:
        token = self.advance()
        if token.kind == "num":
            return ("num", token.text)
        if token.kind == "name":
            if self.peek().text == "(":
                self.advance()
                self._enter()
                args: list[Node] = []
                if self.peek().text != ")":
                    args.append(self.expression())
                    while self.peek().text == ",":
                        self.advance()
                        args.append(self.expression())
                self.expect(")")
                self.depth -= 1
                return ("call", token.text, tuple(args))
            return ("name", token.text)
        if token.text == "(":
            self._enter()
            inner = self.expression()
            self.expect(")")
            self.depth -= 1
            return inner
        found = "end of input" if token.kind == "end" else repr(token.text)
        raise ExpressionError(f"expected a number, name or '(' at position {token.position}, "
                              f"found {found}")


def parse(text: str) -> Node:
    """Parse `text` into a tree of tuples (see `Node`). Raises ExpressionError."""
    parser = _Parser(tokenize(text))
    if parser.peek().kind == "end":
        raise ExpressionError("empty expression")
    tree = parser.expression()
    trailing = parser.peek()
    if trailing.kind != "end":
        raise ExpressionError(f"unexpected {trailing.text!r} at position {trailing.position}")
    return tree


class Backend(Protocol):
    """How numbers, names, operators and calls are evaluated (Python floats or sympy)."""

    def number(self, text: str) -> Any: ...
    def name(self, ident: str) -> Any: ...
    def unary(self, op: str, value: Any) -> Any: ...
    def binary(self, op: str, left: Any, right: Any) -> Any: ...
    def check_function(self, ident: str) -> None: ...
    def call(self, ident: str, args: list[Any]) -> Any: ...


def evaluate_tree(tree: Node, backend: Backend) -> Any:
    kind = tree[0]
    if kind == "num":
        return backend.number(tree[1])
    if kind == "name":
        return backend.name(tree[1])
    if kind == "unary":
        return backend.unary(tree[1], evaluate_tree(tree[2], backend))
    if kind == "binary":
        return backend.binary(tree[1], evaluate_tree(tree[2], backend),
                              evaluate_tree(tree[3], backend))
    if kind == "call":
        backend.check_function(tree[1])  # refuse unknown functions before touching arguments
        return backend.call(tree[1], [evaluate_tree(arg, backend) for arg in tree[2]])
    raise ExpressionError(f"internal error: unknown node kind {kind!r}")


def check_integer_size(value: int) -> int:
    if abs(value).bit_length() > MAX_INTEGER_BITS:
        raise ExpressionError(
            f"result too large: an integer of about {int(abs(value).bit_length() * 0.30103)} "
            f"digits (limit about {int(MAX_INTEGER_BITS * 0.30103)})"
        )
    return value


def check_power_size(base_bits: int, exponent: int) -> None:
    """Refuse integer powers whose result would exceed MAX_INTEGER_BITS, before computing them."""
    if base_bits > 1 and exponent * (base_bits - 1) > MAX_INTEGER_BITS:
        raise ExpressionError(
            f"exponent too large: the result would have about "
            f"{int(exponent * (base_bits - 1) * 0.30103)} digits "
            f"(limit about {int(MAX_INTEGER_BITS * 0.30103)})"
        )
