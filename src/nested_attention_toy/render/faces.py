"""Faces and the expression factor: eyes, brows and mouth drawn large on a head of radius 1, and the comic emotion
symbol beside the head (a pink heart, a grey rain cloud, a yellow "!", a red burst) that names the expression even
where a face is small. ``expression`` None draws the calm face of an input view."""

from __future__ import annotations

import math

from .canvas import INK, RGB, WHITE, Pen, ellipse_points

MOUTH: RGB = (150, 30, 45)
TONGUE: RGB = (240, 110, 120)
CHEEK: RGB = (245, 130, 140)
TEAR: RGB = (70, 150, 245)
SYMBOL_COLORS: dict[str, RGB] = {"smiling": (245, 80, 150), "sad": (120, 130, 150), "surprised": (250, 205, 20),
                                 "angry": (225, 30, 30)}


def draw_face(pen: Pen, expression: str | None, brow: RGB, mouth_y: float = 0.45, nose: RGB | None = None) -> None:
    """Eyes at y -0.05, brows above them in ``brow``, the mouth at ``mouth_y``; a pet's ``nose`` above its mouth."""
    surprised = expression == "surprised"
    ry = 0.3 if surprised else 0.23
    for side in (-1, 1):
        x = 0.38 * side
        pen.ellipse(x, -0.05, 0.2, ry, WHITE, outline=False)
        pen.ellipse(x, -0.02, 0.12, 0.14, INK, outline=False)
        inner, outer = x - 0.16 * side, x + 0.18 * side
        lift = {"sad": (-0.14, 0.04), "angry": (0.1, -0.1), "surprised": (-0.12, -0.12)}.get(expression, (0.0, 0.0))
        pen.line([(inner, -0.4 + lift[0]), (outer, -0.4 + lift[1])], brow, 0.11)
    if nose is not None:
        pen.poly([(-0.14, mouth_y - 0.3), (0.14, mouth_y - 0.3), (0.0, mouth_y - 0.16)], nose, outline=False)
    y = mouth_y
    if expression is None:
        pen.line([(-0.25, y), (0.0, y + 0.08), (0.25, y)], MOUTH, 0.08)
    elif expression == "smiling":
        pen.poly(ellipse_points(0.0, y - 0.06, 0.42, 0.32, 16, 0.0, math.pi), MOUTH, outline=False)
        pen.ellipse(0.0, y + 0.14, 0.18, 0.09, TONGUE, outline=False)
        for side in (-1, 1):
            pen.ellipse(0.62 * side, y - 0.12, 0.16, 0.1, CHEEK, outline=False)
    elif expression == "sad":
        pen.line(ellipse_points(0.0, y + 0.22, 0.34, 0.22, 9, math.pi * 1.1, math.pi * 1.9), MOUTH, 0.1)
        pen.poly([(0.4, 0.18), (0.33, 0.38), (0.4, 0.46), (0.47, 0.38)], TEAR, outline=False)
    elif expression == "surprised":
        pen.ellipse(0.0, y + 0.04, 0.18, 0.24, MOUTH, outline=False)
    else:  # angry: gritted teeth
        pen.poly([(-0.36, y - 0.1), (0.36, y - 0.1), (0.36, y + 0.14), (-0.36, y + 0.14)], WHITE)
        pen.line([(-0.36, y + 0.02), (0.36, y + 0.02)], INK, 0.05)


def _heart(x: float, y: float, r: float) -> list[tuple[float, float]]:
    return [(x + r * 0.9 * math.sin(t) ** 3, y - r * (0.8 * math.cos(t) - 0.3 * math.cos(2 * t) - 0.1 * math.cos(3 * t)
                                                     - 0.05 * math.cos(4 * t))) for t in [i * math.pi / 14 for i in range(28)]]


def draw_symbol(pen: Pen, expression: str, x: float, y: float, r: float) -> None:
    """The emotion symbol of ``expression`` centred at (x, y), about ``2 r`` units across, upright."""
    color = SYMBOL_COLORS[expression]
    if expression == "smiling":
        pen.poly(_heart(x, y, r), color)
    elif expression == "sad":
        for dx, dy, rr in ((-0.45, 0.05, 0.5), (0.0, -0.2, 0.62), (0.45, 0.05, 0.5)):
            pen.ellipse(x + dx * r, y + dy * r, rr * r, rr * r * 0.85, color)
        pen.ellipse(x, y + 0.15 * r, 0.8 * r, 0.35 * r, color, outline=False)
        for dx in (-0.4, 0.0, 0.4):
            pen.line([(x + dx * r, y + 0.55 * r), (x + dx * r - 0.1 * r, y + 0.95 * r)], TEAR, 0.16 * r)
    elif expression == "surprised":
        pen.poly([(x - 0.32 * r, y - r), (x + 0.32 * r, y - r), (x + 0.16 * r, y + 0.35 * r), (x - 0.16 * r, y + 0.35 * r)], color)
        pen.ellipse(x, y + 0.75 * r, 0.24 * r, 0.24 * r, color)
    else:
        points = []
        for i in range(14):
            a = i * math.pi / 7 - math.pi / 2
            rr = r if i % 2 == 0 else 0.5 * r
            points.append((x + rr * math.cos(a), y + rr * math.sin(a)))
        pen.poly(points, color)
