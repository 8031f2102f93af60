"""Circle and quadrilateral templates (see templates.py for the contract of a template)."""

from __future__ import annotations

import math
import random

import sympy

from jaxrl_vl.envs.geometry.draw import (
    Figure, angle_at_deg, distance, lerp, polar, polygon_area,
)
from jaxrl_vl.envs.geometry.templates import LETTERS, Spec, centroid, linear_label


def inscribed_angle(rng: random.Random) -> Spec:
    central = 2 * rng.randint(20, 80)  # even, so the inscribed angle is an integer
    radius, O = 5.0, (0.0, 0.0)
    start = rng.uniform(0, 360)
    A, B = polar(O, radius, start), polar(O, radius, start + central)
    C = polar(O, radius, start + central + (360 - central) * rng.uniform(0.3, 0.7))
    names = rng.sample(LETTERS, 3)
    fig = Figure()
    fig.circle(O, radius)
    fig.segment(C, A)
    fig.segment(C, B)
    fig.segment(O, A, dashed=True)
    fig.segment(O, B, dashed=True)
    fig.dots.append(O)
    fig.labels.append((O, (0.0, -1.0), 12.0, "O"))
    for name, p in zip(names, (A, B, C)):
        fig.point(name, p, O)
    if rng.random() < 0.5:
        fig.angle(O, A, B, f"{central}°", radius_px=16)
        fig.angle(C, A, B, "x°", radius_px=22)
        answer, recomputed = sympy.Integer(central // 2), angle_at_deg(C, A, B)
        wrong = (central, 180 - central // 2, 360 - central)
    else:
        fig.angle(O, A, B, "x°", radius_px=16)
        fig.angle(C, A, B, f"{central // 2}°", radius_px=22)
        answer, recomputed = sympy.Integer(central), angle_at_deg(O, A, B)
        wrong = (central // 2, 180 - central // 2, 360 - central)
    return Spec(fig, "Find x. O is the center of the circle.", answer, recomputed, "Circle",
                "Angle", None, wrong)


def chord_length(rng: random.Random) -> Spec:
    radius = rng.randint(5, 15)
    d = rng.randint(2, radius - 1)
    O = (0.0, 0.0)
    half = math.sqrt(radius * radius - d * d)
    tilt = rng.uniform(0, 360)
    M = polar(O, d, tilt)
    A, B = polar(M, half, tilt + 90), polar(M, half, tilt - 90)
    fig = Figure()
    fig.circle(O, radius)
    fig.segment(A, B)
    fig.segment(O, M, dashed=True)
    fig.segment(O, A)
    fig.angle(M, A, O, right=True)
    fig.dots.append(O)
    # "O" goes on the side of the center away from the chord.
    fig.labels.append((O, (-M[0] / d, -M[1] / d), 12.0, "O"))
    fig.side(str(radius), O, A, B)
    fig.side(str(d), O, M, A)
    names = rng.sample(LETTERS, 2)  # LETTERS excludes O (the center)
    fig.point(names[0], A, O)
    fig.point(names[1], B, O)
    answer = 2 * sympy.sqrt(radius * radius - d * d)
    wrong = (sympy.sqrt(radius * radius - d * d), 2 * sympy.sqrt(radius * radius + d * d),
             sympy.Integer(2 * (radius - d)))
    return Spec(fig, f"Find {names[0]}{names[1]}. O is the center of the circle.", answer,
                distance(A, B), "Circle", "Length", None, wrong)


def circle_measure(rng: random.Random) -> Spec:
    radius = rng.randint(3, 20)
    O = (0.0, 0.0)
    edge = polar(O, radius, rng.uniform(0, 360))
    fig = Figure()
    fig.circle(O, radius)
    fig.dots.append(O)
    use_diameter = rng.random() < 0.5
    if use_diameter:
        other = (-edge[0], -edge[1])
        fig.segment(other, edge)
        # Label the right half of the diameter so the text clears the center dot.
        fig.side(f"{2 * radius} cm", O, edge, (edge[1], -edge[0]))
    else:
        fig.segment(O, edge)
        fig.side(f"{radius} cm", O, edge, (edge[1], -edge[0]))
    measured_radius = distance(O, edge)
    if rng.random() < 0.5:
        problem, goal = "Find the area of the circle. Round to the nearest tenth.", "Area"
        answer, recomputed = sympy.pi * radius**2, math.pi * measured_radius**2
        wrong = (2 * sympy.pi * radius, sympy.pi * (2 * radius) ** 2, sympy.pi * radius)
    else:
        problem, goal = "Find the circumference of the circle. Round to the nearest tenth.", "Length"
        answer, recomputed = 2 * sympy.pi * radius, 2 * math.pi * measured_radius
        wrong = (sympy.pi * radius**2, sympy.pi * radius, 4 * sympy.pi * radius)
    return Spec(fig, problem, answer, recomputed, "Circle", goal, 1, wrong)


def _quadrilateral_from_angles(angles_deg, side1: float, side2: float):
    """Vertices A, B, C, D with interior angles (A, B, C, D) = angles_deg, AB = side1,
    BC = side2; D where the ray from C meets the ray from A. None if the shape is not convex."""
    alpha, beta, gamma, _ = angles_deg
    A, B = (0.0, 0.0), (side1, 0.0)
    heading_bc = 180 - beta
    C = polar(B, side2, heading_bc)
    heading_cd = heading_bc + 180 - gamma
    dcd = (math.cos(math.radians(heading_cd)), math.sin(math.radians(heading_cd)))
    dad = (math.cos(math.radians(alpha)), math.sin(math.radians(alpha)))
    # Solve C + s*dcd = A + t*dad.
    det = dcd[0] * (-dad[1]) - dcd[1] * (-dad[0])
    if abs(det) < 1e-9:
        return None
    rx, ry = A[0] - C[0], A[1] - C[1]
    s = (rx * (-dad[1]) - ry * (-dad[0])) / det
    t = (dcd[0] * ry - dcd[1] * rx) / det
    if s <= 0.5 or t <= 0.5:
        return None
    return A, B, C, (C[0] + s * dcd[0], C[1] + s * dcd[1])


def quadrilateral_angles(rng: random.Random) -> Spec:
    while True:
        angles = [rng.randint(60, 140) for _ in range(3)]
        angles.append(360 - sum(angles))
        if not 60 <= angles[3] <= 140:
            continue
        shape = _quadrilateral_from_angles(angles, rng.uniform(6, 10), rng.uniform(4, 8))
        if shape is not None:
            break
    x_value = rng.randint(8, 30)
    names = rng.sample(LETTERS, 4)
    fig, mid = Figure(), centroid(shape)
    fig.polygon(shape)
    coefficients = []
    for i, (name, p) in enumerate(zip(names, shape)):
        fig.point(name, p, mid)
        prev, nxt = shape[i - 1], shape[(i + 1) % 4]
        if i < 2:
            text, c, d = linear_label(angles[i], x_value, rng)
            coefficients.append((c, d))
        else:
            text = f"{angles[i]}°"
        fig.angle(p, prev, nxt, text, radius_px=18)
    measured = [angle_at_deg(p, shape[i - 1], shape[(i + 1) % 4]) for i, p in enumerate(shape)]
    (c1, d1), (c2, d2) = coefficients
    # 360 = (c1 + c2) x + d1 + d2 + measured C + measured D
    recomputed = (360 - d1 - d2 - measured[2] - measured[3]) / (c1 + c2)
    wrong = (x_value + 4, sympy.Rational(180 - d1 - d2, c1 + c2), angles[0])
    return Spec(fig, "Find x.", sympy.Integer(x_value), recomputed, "Quadrilateral", "Angle",
                None, wrong)


def quadrilateral_area(rng: random.Random) -> Spec:
    kind = rng.choice(("rectangle", "parallelogram", "trapezoid"))
    height = rng.randint(3, 12)
    bottom = rng.randint(6, 18)
    slant = 0.0 if kind == "rectangle" else rng.uniform(1.5, 4.0)
    top = bottom if kind != "trapezoid" else rng.randint(3, bottom - 2)
    A, B = (0.0, 0.0), (float(bottom), 0.0)
    D = (slant, float(height))
    C = (slant + top, float(height))
    shape = [A, B, C, D]
    fig, mid = Figure(), centroid(shape)
    fig.polygon(shape)
    fig.side(str(bottom), A, B, mid)
    if kind == "trapezoid":
        fig.side(str(top), D, C, mid)
    if kind == "rectangle":
        fig.side(str(height), B, C, mid)
        fig.angle(B, A, C, right=True)
    else:
        foot = (D[0], 0.0)
        fig.segment(D, foot, dashed=True)
        fig.angle(foot, B, D, right=True)
        fig.labels.append((lerp(D, foot, 0.5), (1.0, 0.0), 12.0, str(height)))
    answer = sympy.Rational((bottom + top) * height, 2)
    wrong = (sympy.Integer((bottom + top) * height), sympy.Integer(bottom + top + height),
             sympy.Integer(bottom * height + 1) if kind == "trapezoid"
             else sympy.Rational(bottom * height, 2))
    return Spec(fig, f"Find the area of the {kind}.", answer, polygon_area(shape),
                "Quadrilateral", "Area", None, wrong)
