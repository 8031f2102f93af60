"""Offline procedural Geometry3k-style problems: Pillow diagrams, exact sympy answers, 4 choices.

`generate_problem(seed, index)` is deterministic in (seed, index) and returns a record in the
Geometry3k (hiyouga/geometry3k) schema:
  {"id", "images": [PIL.Image], "problem": "<image>Find x.", "answer": "2 \\sqrt{3}",
   "choices": [4 strings], "ground_truth": "A".."D", "problem_type_graph", "problem_type_goal",
   "template"}
Every record is verified before it is returned (`verify_spec`, `verify_choices`): the exact answer
agrees with an independent measurement on the drawn figure, the answer string parses back to the
same value through the grader, and exactly one choice is equivalent to it.
"""

from __future__ import annotations

import decimal
import math
import random
from typing import Any, Callable

import sympy

from jaxrl_vl.envs.geometry import templates as tri
from jaxrl_vl.envs.geometry import templates_circle_quad as cq
from jaxrl_vl.envs.geometry.grader import grade_answer, parse_answer
from jaxrl_vl.envs.geometry.templates import Spec

TEMPLATES: dict[str, Callable[[random.Random], Spec]] = {
    "triangle_angle_sum": tri.triangle_angle_sum,
    "right_triangle_side": tri.right_triangle_side,
    "right_triangle_trig": tri.right_triangle_trig,
    "trig_ratio": tri.trig_ratio,
    "triangle_area": tri.triangle_area,
    "similar_triangles": tri.similar_triangles,
    "parallel_transversal": tri.parallel_transversal,
    "inscribed_angle": cq.inscribed_angle,
    "chord_length": cq.chord_length,
    "circle_measure": cq.circle_measure,
    "quadrilateral_angles": cq.quadrilateral_angles,
    "quadrilateral_area": cq.quadrilateral_area,
}
CHOICE_LETTERS = "ABCD"
IMAGE_SIZE_PX = 320


class GenerationError(RuntimeError):
    """A generated problem failed verification (a template bug); names the template and seed."""


def format_answer(value: sympy.Expr, round_places: int | None) -> str:
    """Exact LaTeX ('2 \\sqrt{3}', '\\frac{15}{2}', '80') or a rounded decimal ('17.3')."""
    if round_places is None:
        return sympy.latex(sympy.nsimplify(value))
    digits = decimal.Decimal(str(sympy.N(value, 30)))
    quantum = decimal.Decimal(1).scaleb(-round_places)
    return str(digits.quantize(quantum, rounding=decimal.ROUND_HALF_UP))


def verify_spec(spec: Spec, answer: str, where: str) -> None:
    """Raise GenerationError unless the answer is confirmed by the second computation path."""
    exact = float(sympy.N(spec.answer, 30))
    if not math.isfinite(spec.recomputed) or not math.isfinite(exact):
        raise GenerationError(f"{where}: non-finite answer {exact} / recomputed {spec.recomputed}")
    if abs(exact - spec.recomputed) > 1e-6 * max(1.0, abs(exact)):
        raise GenerationError(f"{where}: exact answer {spec.answer} = {exact} disagrees with the "
                              f"value measured on the figure ({spec.recomputed})")
    parsed = float(sympy.N(parse_answer(answer).value, 30))
    tolerance = 1e-12 if spec.round_places is None else 0.5 * 10.0 ** -spec.round_places + 1e-9
    if abs(parsed - exact) > tolerance * max(1.0, abs(exact)):
        raise GenerationError(f"{where}: answer text {answer!r} parses to {parsed}, expected {exact}")
    if exact <= 0:
        raise GenerationError(f"{where}: geometric answer must be positive, got {exact}")


def _generic_wrong_values(value: sympy.Expr, rng: random.Random) -> list[sympy.Expr]:
    steps = [1, 2, 3, 5, 10]
    rng.shuffle(steps)
    out = [value + s for s in steps[:3]] + [value - s for s in steps[:3]]
    out += [value * 2, value / 2, value * sympy.Rational(3, 2), value * sympy.Rational(2, 3)]
    return out


def make_choices(spec: Spec, answer: str, rng: random.Random) -> tuple[list[str], str]:
    """Three distractors (template mistakes first, then generic perturbations) plus the answer,
    shuffled. Returns (choices, letter of the answer)."""
    distractors: list[str] = []
    candidates = [sympy.sympify(v) for v in spec.wrong_values]
    candidates += _generic_wrong_values(spec.answer, rng)
    for value in candidates:
        if len(distractors) == 3:
            break
        if not value.is_number or not value.is_real or float(value) <= 0:
            continue
        text = format_answer(value, spec.round_places)
        if grade_answer(text, answer).correct:
            continue
        if any(grade_answer(text, other).correct or grade_answer(other, text).correct
               for other in distractors):
            continue
        distractors.append(text)
    if len(distractors) < 3:
        raise GenerationError(f"could not find 3 distinct distractors for answer {answer!r}")
    position = rng.randrange(4)
    choices = distractors[:position] + [answer] + distractors[position:]
    return choices, CHOICE_LETTERS[position]


def verify_choices(record: dict[str, Any]) -> None:
    """Exactly one choice is equivalent to the answer, and it is the ground-truth letter."""
    matches = [i for i, c in enumerate(record["choices"]) if grade_answer(c, record["answer"]).correct]
    expected = CHOICE_LETTERS.index(record["ground_truth"])
    if matches != [expected]:
        raise GenerationError(f"record {record['id']}: choices {record['choices']} match the answer "
                              f"{record['answer']!r} at {matches}, expected only {expected}")


def generate_problem(seed: int, index: int, template: str | None = None) -> dict[str, Any]:
    """Problem number `index` of the stream for `seed` (templates cycle in a fixed order, so any
    run of len(TEMPLATES) consecutive indices covers every template)."""
    names = sorted(TEMPLATES)
    name = template if template is not None else names[index % len(names)]
    if name not in TEMPLATES:
        raise ValueError(f"unknown geometry template {name!r}; known: {', '.join(names)}")
    # Integer seeding is stable across Python runs (no hash randomisation).
    rng = random.Random(seed * 1_000_003 + index)
    where = f"template {name}, seed {seed}, index {index}"
    spec = TEMPLATES[name](rng)
    answer = format_answer(spec.answer, spec.round_places)
    verify_spec(spec, answer, where)
    choices, letter = make_choices(spec, answer, rng)
    record = {
        "id": f"gen-{seed}-{index:06d}",
        "images": [spec.figure.render(size_px=IMAGE_SIZE_PX)],
        "problem": "<image>" + spec.problem,
        "answer": answer,
        "choices": choices,
        "ground_truth": letter,
        "problem_type_graph": spec.graph_type,
        "problem_type_goal": spec.goal_type,
        "template": name,
    }
    verify_choices(record)
    return record


def generate_problems(n: int, seed: int = 0, start: int = 0) -> list[dict[str, Any]]:
    return [generate_problem(seed, index) for index in range(start, start + n)]
