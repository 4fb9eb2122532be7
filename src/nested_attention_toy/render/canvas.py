"""Drawing primitives of the toy renderer: colours, a pen that draws in a subject's own units, seeded generators.

Everything is drawn with PIL polygons at twice the output size and reduced by a 2 x 2 box filter (anti-aliasing).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from PIL import ImageDraw

RGB = tuple[int, int, int]
INK: RGB = (28, 24, 32)
WHITE: RGB = (255, 255, 255)


def mix(a: RGB, b: RGB, t: float) -> RGB:
    """``a`` moved a fraction ``t`` of the way to ``b``."""
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def shade(c: RGB, f: float) -> RGB:
    """Darker (``f`` < 1) or lighter (``f`` > 1, toward white) version of ``c``."""
    return mix(c, (0, 0, 0), 1 - f) if f <= 1 else mix(c, WHITE, f - 1)


def seeded(tag: str, *parts: int) -> np.random.Generator:
    """A generator that depends on a purpose tag and integers only (never on Python's salted ``hash``)."""
    key = int.from_bytes(hashlib.sha256(tag.encode()).digest()[:8], "big")
    return np.random.default_rng([key, *(int(p) % 2**63 for p in parts)])


def check_size(size: int) -> int:
    size = int(size)
    if size < 32 or size % 16:
        raise ValueError(f"size must be a multiple of 16 and >= 32 (64 and 128 are the supported sizes), got {size}")
    return size


def ellipse_points(cx: float, cy: float, rx: float, ry: float, n: int = 28, a0: float = 0.0, a1: float = 2 * math.pi):
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in np.linspace(a0, a1, n, endpoint=a1 - a0 < 6.28)]


class Pen:
    """Draws on a PIL image in a subject's own units: a point ``(x, y)`` lands at ``(ox ± x * unit, oy + y * unit)``
    (mirrored when ``flip``); shapes get an ``outline`` px wide ink line when the style draws outlines."""

    def __init__(self, image, ox: float, oy: float, unit: float, flip: bool = False, outline: int = 0, ink: RGB = INK):
        self.draw = ImageDraw.Draw(image)
        self.ox, self.oy, self.unit, self.flip, self.outline, self.ink = ox, oy, unit, flip, outline, ink

    def pts(self, xy) -> list[tuple[float, float]]:
        sign = -1.0 if self.flip else 1.0
        return [(self.ox + sign * x * self.unit, self.oy + y * self.unit) for x, y in xy]

    def poly(self, xy, fill: RGB, outline: bool = True) -> None:
        width = self.outline if outline else 0
        self.draw.polygon(self.pts(xy), fill=fill, outline=self.ink if width else None, width=width)

    def ellipse(self, cx, cy, rx, ry, fill: RGB, outline: bool = True, n: int = 28) -> None:
        self.poly(ellipse_points(cx, cy, rx, ry, n), fill, outline)

    def line(self, xy, fill: RGB, width: float) -> None:
        """A stroke ``width`` units wide (at least 2 px), round-jointed."""
        self.draw.line(self.pts(xy), fill=fill, width=max(2, round(width * self.unit)), joint="curve")
