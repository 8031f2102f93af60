"""Geometry3k-style diagrams with Pillow: white canvas, thin black lines, capital point labels.

A `Figure` collects primitives in world coordinates (y up); `render` fits them to the canvas
with a uniform scale, so templates can work in natural units (side lengths as numbers) and the
drawing stays to scale. Label offsets are given in pixels, after the fit, so text never scales.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

Point = tuple[float, float]
LINE_WIDTH_PX = 2
LABEL_OFFSET_PX = 13.0


def sub(a: Point, b: Point) -> Point:
    return (a[0] - b[0], a[1] - b[1])


def add(a: Point, b: Point) -> Point:
    return (a[0] + b[0], a[1] + b[1])


def scale(a: Point, k: float) -> Point:
    return (a[0] * k, a[1] * k)


def norm(a: Point) -> float:
    return math.hypot(a[0], a[1])


def unit(a: Point) -> Point:
    length = norm(a)
    return (a[0] / length, a[1] / length) if length > 0 else (0.0, 1.0)


def lerp(a: Point, b: Point, t: float) -> Point:
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)


def polar(center: Point, radius: float, angle_deg: float) -> Point:
    theta = math.radians(angle_deg)
    return (center[0] + radius * math.cos(theta), center[1] + radius * math.sin(theta))


def angle_at_deg(vertex: Point, p1: Point, p2: Point) -> float:
    """The (unsigned, <= 180) angle p1-vertex-p2 in degrees, measured from coordinates."""
    a, b = sub(p1, vertex), sub(p2, vertex)
    cos_value = (a[0] * b[0] + a[1] * b[1]) / (norm(a) * norm(b))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos_value))))


def distance(a: Point, b: Point) -> float:
    return norm(sub(a, b))


def polygon_area(points: Sequence[Point]) -> float:
    """Shoelace formula (absolute value)."""
    total = 0.0
    for i, (x1, y1) in enumerate(points):
        x2, y2 = points[(i + 1) % len(points)]
        total += x1 * y2 - x2 * y1
    return abs(total) / 2.0


@dataclasses.dataclass
class Figure:
    segments: list[tuple[Point, Point, bool]] = dataclasses.field(default_factory=list)  # dashed?
    circles: list[tuple[Point, float]] = dataclasses.field(default_factory=list)
    dots: list[Point] = dataclasses.field(default_factory=list)
    # (anchor, direction to push away from anchor in world coords, pixel offset, text)
    labels: list[tuple[Point, Point, float, str]] = dataclasses.field(default_factory=list)
    # (vertex, p1, p2, radius px, text, right-angle square?)
    angle_marks: list[tuple[Point, Point, Point, float, str, bool]] = dataclasses.field(
        default_factory=list)
    arrows: list[tuple[Point, Point]] = dataclasses.field(default_factory=list)  # parallel marks

    def segment(self, a: Point, b: Point, dashed: bool = False) -> None:
        self.segments.append((a, b, dashed))

    def polygon(self, points: Sequence[Point]) -> None:
        for i, p in enumerate(points):
            self.segment(p, points[(i + 1) % len(points)])

    def circle(self, center: Point, radius: float) -> None:
        self.circles.append((center, radius))

    def point(self, name: str, p: Point, away_from: Point, dot: bool = False) -> None:
        """Label point `p` with `name`, pushed away from `away_from` (e.g. the centroid)."""
        self.labels.append((p, unit(sub(p, away_from)), LABEL_OFFSET_PX, name))
        if dot:
            self.dots.append(p)

    def side(self, text: str, a: Point, b: Point, inside: Point) -> None:
        """Label segment ab at its midpoint, on the side away from `inside`."""
        mid = lerp(a, b, 0.5)
        d = unit(sub(b, a))
        normal = (-d[1], d[0])
        if (normal[0] * (inside[0] - mid[0]) + normal[1] * (inside[1] - mid[1])) > 0:
            normal = (-normal[0], -normal[1])
        self.labels.append((mid, normal, LABEL_OFFSET_PX + 2, text))

    def angle(self, vertex: Point, p1: Point, p2: Point, text: str = "", radius_px: float = 18.0,
              right: bool = False) -> None:
        """Mark the (smaller) angle p1-vertex-p2 with an arc (or a square when `right`)."""
        self.angle_marks.append((vertex, p1, p2, radius_px, text, right))

    def parallel_arrow(self, a: Point, b: Point) -> None:
        self.arrows.append((a, b))

    # ------------------------------------------------------------------------------------
    def _world_points(self) -> list[Point]:
        points = [p for a, b, _ in self.segments for p in (a, b)] + list(self.dots)
        for c, r in self.circles:
            points += [(c[0] - r, c[1] - r), (c[0] + r, c[1] + r)]
        points += [anchor for anchor, _, _, _ in self.labels]
        return points

    def render(self, size_px: int = 320, margin_px: int = 34, font_size: int = 15) -> Image.Image:
        points = self._world_points()
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        span = max(max(xs) - min(xs), max(ys) - min(ys), 1e-9)
        k = (size_px - 2 * margin_px) / span
        x0 = (size_px - k * (max(xs) - min(xs))) / 2 - k * min(xs)
        y0 = (size_px + k * (max(ys) - min(ys))) / 2 + k * min(ys)

        def px(p: Point) -> tuple[float, float]:
            return (x0 + k * p[0], y0 - k * p[1])

        image = Image.new("RGB", (size_px, size_px), "white")
        draw = ImageDraw.Draw(image)
        font = ImageFont.load_default(size=font_size)
        for a, b, dashed in self.segments:
            _line(draw, px(a), px(b), dashed)
        for c, r in self.circles:
            cx, cy = px(c)
            draw.ellipse([cx - k * r, cy - k * r, cx + k * r, cy + k * r], outline="black",
                         width=LINE_WIDTH_PX)
        for p in self.dots:
            x, y = px(p)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill="black")
        for a, b in self.arrows:
            _arrow_head(draw, px(a), px(b))
        for vertex, p1, p2, radius, text, right in self.angle_marks:
            _angle_mark(draw, font, px(vertex), px(p1), px(p2), radius, text, right)
        for anchor, direction, offset, text in self.labels:
            x, y = px(anchor)
            # World y is up, pixel y is down: flip the direction's y.
            _centered_text(draw, font, (x + direction[0] * offset, y - direction[1] * offset), text)
        return image


def _line(draw: ImageDraw.ImageDraw, a, b, dashed: bool) -> None:
    if not dashed:
        draw.line([a, b], fill="black", width=LINE_WIDTH_PX)
        return
    length = math.hypot(b[0] - a[0], b[1] - a[1])
    dash_px = 6.0
    steps = max(1, int(length // dash_px))
    for i in range(0, steps, 2):
        t0, t1 = i / steps, min(1.0, (i + 1) / steps)
        draw.line([lerp(a, b, t0), lerp(a, b, t1)], fill="black", width=1)


def _centered_text(draw, font, center, text: str) -> None:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text((center[0] - (right - left) / 2 - left, center[1] - (bottom - top) / 2 - top),
              text, fill="black", font=font)


def _arrow_head(draw, a, b) -> None:
    """A small '>' at the middle of segment ab, pointing from a to b (marks parallel lines)."""
    mid = lerp(a, b, 0.5)
    d = unit(sub(b, a))
    back = sub(mid, scale(d, 7))
    normal = (-d[1], d[0])
    draw.line([add(back, scale(normal, 5)), mid, sub(back, scale(normal, 5))], fill="black",
              width=LINE_WIDTH_PX)


def _angle_mark(draw, font, vertex, p1, p2, radius, text, right) -> None:
    d1, d2 = unit(sub(p1, vertex)), unit(sub(p2, vertex))
    if right:
        size = 10.0
        c1, c3 = add(vertex, scale(d1, size)), add(vertex, scale(d2, size))
        c2 = add(c1, scale(d2, size))
        draw.line([c1, c2, c3], fill="black", width=1)
    else:
        a1 = math.degrees(math.atan2(d1[1], d1[0]))
        a2 = math.degrees(math.atan2(d2[1], d2[0]))
        start, end = (a1, a2) if (a2 - a1) % 360 <= 180 else (a2, a1)
        box = [vertex[0] - radius, vertex[1] - radius, vertex[0] + radius, vertex[1] + radius]
        draw.arc(box, start=start, end=end if end > start else end + 360, fill="black", width=1)
    if text:
        bisector = unit(add(d1, d2)) if norm(add(d1, d2)) > 1e-6 else (-d1[1], d1[0])
        offset = radius + 6 + 3.2 * len(text)
        _centered_text(draw, font, add(vertex, scale(bisector, offset)), text)
