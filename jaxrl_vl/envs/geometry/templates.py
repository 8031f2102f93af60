"""Problem templates for the procedural Geometry3k-style generator.

Each template draws a figure TO SCALE from its givens and returns the exact answer (sympy) plus
`recomputed`: the same quantity measured independently from the drawn coordinates (distances,
angles, shoelace areas) or by substituting back into the figure's relations. The generator only
keeps a problem when both paths agree, so a wrong formula in a template cannot ship.
"""

from __future__ import annotations

import dataclasses
import math
import random

import sympy

from jaxrl_vl.envs.geometry.draw import (
    Figure, angle_at_deg, distance, lerp, polar, polygon_area,
)

LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"  # no I (looks like 1) or O (circle centers)


@dataclasses.dataclass(frozen=True)
class Spec:
    figure: Figure
    problem: str                  # Geometry3k style, without the leading "<image>"
    answer: sympy.Expr            # exact
    recomputed: float             # independent numeric recomputation (see module doc)
    graph_type: str               # Line | Triangle | Quadrilateral | Circle
    goal_type: str                # Angle | Length | Area | Ratio
    round_places: int | None = None   # answer is to be rounded to this many decimals
    wrong_values: tuple = ()      # plausible mistakes, used as distractor choices


def centroid(points):
    return (sum(p[0] for p in points) / len(points), sum(p[1] for p in points) / len(points))


def linear_label(value: int, x_value: int, rng: random.Random) -> tuple[str, int, int]:
    """An expression c*x + d equal to `value` at x = x_value: (text, c, d)."""
    c = rng.choice([c for c in (1, 2, 3, 4, 5) if c * x_value <= value + 20] or [1])
    d = value - c * x_value
    coef = "" if c == 1 else str(c)
    text = f"{coef}x" if d == 0 else f"{coef}x {'+' if d > 0 else '-'} {abs(d)}"
    return (f"({text})°" if d else f"{text}°"), c, d


def triangle_angle_sum(rng: random.Random) -> Spec:
    while True:
        a_deg, b_deg = rng.randint(35, 95), rng.randint(35, 95)
        c_deg = 180 - a_deg - b_deg
        if 25 <= c_deg <= 110:
            break
    names = rng.sample(LETTERS, 3)
    base = 10.0
    side_ac = base * math.sin(math.radians(b_deg)) / math.sin(math.radians(c_deg))
    A, B = (0.0, 0.0), (base, 0.0)
    C = polar(A, side_ac, a_deg)
    fig, mid = Figure(), centroid([A, B, C])
    fig.polygon([A, B, C])
    for name, p in zip(names, (A, B, C)):
        fig.point(name, p, mid)
    if rng.random() < 0.5:
        fig.angle(A, B, C, f"{a_deg}°")
        fig.angle(B, C, A, f"{b_deg}°")
        fig.angle(C, A, B, "x°")
        answer, recomputed = sympy.Integer(c_deg), angle_at_deg(C, A, B)
        wrong = (180 - a_deg, a_deg + b_deg - 90, 90 - c_deg if c_deg < 90 else c_deg - 45)
    else:
        x_value = rng.randint(5, 18)
        text_a, ca, da = linear_label(a_deg, x_value, rng)
        text_b, cb, db = linear_label(b_deg, x_value, rng)
        fig.angle(A, B, C, text_a)
        fig.angle(B, C, A, text_b)
        fig.angle(C, A, B, f"{c_deg}°")
        answer = sympy.Integer(x_value)
        # Solve (ca + cb) x + da + db + c = 180 using the MEASURED angle at C.
        recomputed = (180 - angle_at_deg(C, A, B) - da - db) / (ca + cb)
        wrong = (x_value + 2, (180 - c_deg) // max(ca, cb), a_deg)
    return Spec(fig, "Find x.", answer, recomputed, "Triangle", "Angle", None, wrong)


def right_triangle_side(rng: random.Random) -> Spec:
    a = rng.randint(2, 14)
    if rng.random() < 0.5:
        b = rng.randint(2, 14)
        hyp, x_is_hypotenuse = math.hypot(a, b), True
        answer = sympy.sqrt(a * a + b * b)
        wrong = (sympy.Integer(a + b), sympy.sqrt(abs(a * a - b * b)) if a != b else 2 * a, a * b)
    else:
        hyp = rng.randint(a + 1, a + 12)
        b, x_is_hypotenuse = math.sqrt(hyp * hyp - a * a), False
        answer = sympy.sqrt(hyp * hyp - a * a)
        wrong = (sympy.sqrt(hyp * hyp + a * a), sympy.Integer(hyp - a), sympy.Integer(hyp + a))
    C, A, B = (0.0, 0.0), (float(a), 0.0), (0.0, float(b))
    fig, mid = Figure(), centroid([A, B, C])
    fig.polygon([A, B, C])
    fig.angle(C, A, B, right=True)
    fig.side(str(a), C, A, mid)
    if x_is_hypotenuse:
        fig.side(str(b), C, B, mid)
        fig.side("x", A, B, mid)
        recomputed = distance(A, B)
    else:
        fig.side(str(hyp), A, B, mid)
        fig.side("x", C, B, mid)
        recomputed = distance(C, B)
    return Spec(fig, "Find x.", answer, recomputed, "Triangle", "Length", None, wrong)


def right_triangle_trig(rng: random.Random) -> Spec:
    theta, hyp = rng.randint(20, 70), rng.randint(5, 25)
    rad = sympy.pi * theta / 180
    C = (0.0, 0.0)
    A = (hyp * math.cos(math.radians(theta)), 0.0)
    B = (0.0, hyp * math.sin(math.radians(theta)))
    fig, mid = Figure(), centroid([A, B, C])
    fig.polygon([A, B, C])
    fig.angle(C, A, B, right=True)
    fig.angle(A, B, C, f"{theta}°", radius_px=24)
    fig.side(str(hyp), A, B, mid)
    if rng.random() < 0.5:
        fig.side("x", C, B, mid)
        answer, recomputed = hyp * sympy.sin(rad), distance(C, B)
        wrong = (hyp * sympy.cos(rad), hyp * sympy.tan(rad), hyp / sympy.sin(rad))
    else:
        fig.side("x", C, A, mid)
        answer, recomputed = hyp * sympy.cos(rad), distance(C, A)
        wrong = (hyp * sympy.sin(rad), hyp / sympy.cos(rad), hyp * sympy.tan(rad))
    return Spec(fig, "Find x. Round to the nearest tenth.", answer, recomputed, "Triangle",
                "Length", 1, wrong)


PYTHAGOREAN_TRIPLES = ((3, 4, 5), (5, 12, 13), (8, 15, 17), (7, 24, 25), (20, 21, 29), (9, 40, 41))


def trig_ratio(rng: random.Random) -> Spec:
    a, b, c = rng.choice(PYTHAGOREAN_TRIPLES)
    if rng.random() < 0.5:
        a, b = b, a
    k = rng.choice((1, 1, 2, 3))
    a, b, c = a * k, b * k, c * k
    names = rng.sample(LETTERS, 3)
    C, A, B = (0.0, 0.0), (float(b), 0.0), (0.0, float(a))  # side a = BC opposite A
    fig, mid = Figure(), centroid([A, B, C])
    fig.polygon([A, B, C])
    fig.angle(C, A, B, right=True)
    for name, p in zip(names, (A, B, C)):
        fig.point(name, p, mid)
    fig.side(str(a), B, C, mid)
    fig.side(str(b), C, A, mid)
    fig.side(str(c), A, B, mid)
    opposite, adjacent, hyp = distance(B, C), distance(C, A), distance(A, B)
    function = rng.choice(("sin", "cos", "tan"))
    exact = {"sin": sympy.Rational(a, c), "cos": sympy.Rational(b, c), "tan": sympy.Rational(a, b)}
    measured = {"sin": opposite / hyp, "cos": adjacent / hyp, "tan": opposite / adjacent}
    wrong = tuple(v for key, v in exact.items() if key != function) + (1 / exact[function],)
    problem = f"Find \\{function} {names[0]}. Express your answer as a fraction."
    return Spec(fig, problem, exact[function], measured[function], "Triangle", "Ratio", None, wrong)


def triangle_area(rng: random.Random) -> Spec:
    base, height = rng.randint(6, 20), rng.randint(4, 16)
    foot_t = rng.uniform(0.2, 0.8)
    A, B = (0.0, 0.0), (float(base), 0.0)
    H = (base * foot_t, 0.0)
    C = (H[0], float(height))
    fig, mid = Figure(), centroid([A, B, C])
    fig.polygon([A, B, C])
    fig.segment(C, H, dashed=True)
    fig.angle(H, B, C, right=True)
    fig.side(str(base), A, B, C)
    fig.labels.append((lerp(C, H, 0.5), (1.0, 0.0), 12.0, str(height)))
    answer = sympy.Rational(base * height, 2)
    wrong = (base * height, base + height, sympy.Rational(base * height, 4))
    return Spec(fig, "Find the area of the triangle.", answer, polygon_area([A, B, C]),
                "Triangle", "Area", None, wrong)


def similar_triangles(rng: random.Random) -> Spec:
    p, q, s = rng.randint(2, 9), rng.randint(2, 9), rng.randint(6, 18)
    B, C = (0.0, 0.0), (float(s), 0.0)
    A = polar(B, p + q, rng.uniform(50, 80))
    t = p / (p + q)
    D, E = lerp(A, B, t), lerp(A, C, t)
    names = rng.sample(LETTERS, 5)
    fig, mid = Figure(), centroid([A, B, C])
    fig.polygon([A, B, C])
    fig.segment(D, E)
    fig.parallel_arrow(D, E)
    fig.parallel_arrow(B, C)
    for name, point in zip(names, (A, B, C, D, E)):
        fig.point(name, point, mid)
    fig.side(str(p), A, D, mid)
    fig.side(str(q), D, B, mid)
    parallel = f"{names[3]}{names[4]} \\parallel {names[1]}{names[2]}."
    small, large = (f"\\triangle {names[0]}{names[3]}{names[4]}",
                    f"\\triangle {names[0]}{names[1]}{names[2]}")
    k = sympy.Rational(p, p + q)  # similarity ratio of the small triangle to the large one
    goal = rng.choice(("length", "length", "perimeter ratio", "area ratio"))
    if goal == "length":
        fig.side(str(s), B, C, mid)
        fig.labels.append((lerp(D, E, 0.5), (0.0, 1.0), 10.0, "x"))
        answer = s * k
        wrong = (sympy.Rational(s * q, p + q), sympy.Rational(s * p, q), sympy.Rational(s, 2))
        return Spec(fig, f"{parallel} Find x.", answer, distance(D, E), "Triangle", "Length",
                    None, wrong)
    if goal == "perimeter ratio":
        measured = (sum(distance(*e) for e in ((A, D), (D, E), (E, A)))
                    / sum(distance(*e) for e in ((A, B), (B, C), (C, A))))
        problem = (f"{parallel} Find the ratio of the perimeter of {small} to the perimeter of "
                   f"{large}.")
        return Spec(fig, problem, k, measured, "Triangle", "Ratio", None,
                    (k**2, sympy.Rational(q, p + q), sympy.Rational(p, q)))
    measured = polygon_area([A, D, E]) / polygon_area([A, B, C])
    problem = f"{parallel} Find the ratio of the area of {small} to the area of {large}."
    return Spec(fig, problem, k**2, measured, "Triangle", "Ratio", None,
                (k, sympy.Rational(p, q) ** 2, 1 - k**2))


# Ray pairs at an intersection of a horizontal line with the transversal (direction t):
# R = +x, L = -x, U = +t, D = -t. angle(R,U) = theta, angle(U,L) = 180 - theta, etc.
_PAIRS = {
    "corresponding": (("P", "R", "U"), ("Q", "R", "U"), "equal"),
    "alternate interior": (("P", "R", "U"), ("Q", "L", "D"), "equal"),
    "alternate exterior": (("P", "L", "D"), ("Q", "R", "U"), "equal"),
    "same-side interior": (("P", "R", "U"), ("Q", "R", "D"), "supplementary"),
}


def parallel_transversal(rng: random.Random) -> Spec:
    theta = rng.choice(list(range(35, 81)) + list(range(100, 146)))
    height = 6.0
    P = (0.0, 0.0)
    Q = polar(P, height / math.sin(math.radians(theta)), theta)
    t = ((Q[0] - P[0]) / distance(P, Q), (Q[1] - P[1]) / distance(P, Q))
    fig = Figure()
    span = 8.0
    for y, center in ((0.0, P), (height, Q)):
        left, right = (center[0] - span, y), (center[0] + span, y)
        fig.segment(left, right)
        fig.parallel_arrow(center, right)  # arrow midway along the right half, off the crossing
    fig.segment((P[0] - 3 * t[0], P[1] - 3 * t[1]), (Q[0] + 3 * t[0], Q[1] + 3 * t[1]))
    relation = rng.choice(sorted(_PAIRS))
    first, second, kind = _PAIRS[relation]
    points = {"P": P, "Q": Q}

    def ray_point(vertex, ray):
        d = {"R": (1.0, 0.0), "L": (-1.0, 0.0), "U": t, "D": (-t[0], -t[1])}[ray]
        return (vertex[0] + d[0], vertex[1] + d[1])

    def measured(position):
        vertex = points[position[0]]
        return vertex, ray_point(vertex, position[1]), ray_point(vertex, position[2])

    m1, m2 = angle_at_deg(*measured(first)), angle_at_deg(*measured(second))
    v1, v2 = round(m1), round(m2)
    x_value = rng.randint(6, 25)
    if rng.random() < 0.5:
        text1, c1, d1 = linear_label(v1, x_value, rng)
        text2, c2, d2 = linear_label(v2, x_value, rng)
        answer = sympy.Integer(x_value)
        # Both labelled relations must give the same x from the measured angles.
        x_first, x_second = (m1 - d1) / c1, (m2 - d2) / c2
        recomputed = x_first if abs(x_first - x_second) < 1e-6 else float("nan")
        wrong = (x_value + 3, sympy.Rational(180 - d1 - d2, c1 + c2) if c1 + c2 else 1, v1)
    else:
        text1, text2 = f"{v1}°", "x°"
        answer, recomputed = sympy.Integer(v2), m2
        wrong = (180 - v2, v1 if v1 != v2 else 90 - v2 % 90 + 1, abs(90 - v2) or 45)
    fig.angle(*measured(first), text=text1, radius_px=16)
    fig.angle(*measured(second), text=text2, radius_px=16)
    return Spec(fig, "Find x.", answer, recomputed, "Line", "Angle", None, wrong)
