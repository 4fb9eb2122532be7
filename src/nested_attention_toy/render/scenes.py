"""The scene factor: backgrounds drawn at twice the output size, each told apart by its large colour bands.

``SCENES`` maps a scene name to a function ``(canvas, rng, outline)`` that paints the whole canvas (an RGB PIL image,
square or wider than tall);
``outline`` is the style's line width for the scene's objects (0: none). Layout jitter comes from ``rng``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from .canvas import INK, RGB, mix

Scene = Callable[[Image.Image, np.random.Generator, int], None]


def _size(canvas: Image.Image) -> tuple[int, float]:
    """The canvas height (every length is a fraction of it) and its width in heights (1 for a square, 2 for a scene
    of a person and a pet): objects spread across the width, as many per height as on a square."""
    return canvas.size[1], canvas.size[0] / canvas.size[1]


def _count(n: int, wide: float) -> int:
    return max(1, round(n * wide))


def _bands(canvas: Image.Image, bands: list[tuple[float, RGB, RGB]]) -> None:
    """Horizontal gradients: each ``(from_y, top colour, bottom colour)`` runs down to the next band's ``from_y``."""
    W, S = canvas.size
    draw = ImageDraw.Draw(canvas)
    edges = [round(y * S) for y, _, _ in bands] + [S]
    for (_, top, bottom), y0, y1 in zip(bands, edges, edges[1:]):
        for y in range(y0, y1):
            draw.line([(0, y), (W, y)], fill=mix(top, bottom, (y - y0) / max(1, y1 - y0 - 1)))


def _shape(draw: ImageDraw.ImageDraw, points, fill: RGB, outline: int) -> None:
    draw.polygon(points, fill=fill, outline=INK if outline else None, width=outline)


def _disc(draw: ImageDraw.ImageDraw, x, y, r, fill: RGB, outline: int = 0) -> None:
    draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=INK if outline else None, width=outline)


def beach(canvas: Image.Image, rng: np.random.Generator, outline: int) -> None:
    S, wide = _size(canvas)
    horizon = float(rng.uniform(0.42, 0.5))
    _bands(canvas, [(0.0, (90, 170, 240), (170, 215, 245)), (horizon, (30, 110, 200), (60, 150, 215)),
                    (horizon + 0.16, (240, 218, 160), (225, 195, 130))])
    draw = ImageDraw.Draw(canvas)
    _disc(draw, S * wide * rng.uniform(0.1, 0.9), S * rng.uniform(0.08, 0.18), S * 0.08, (255, 225, 60), outline)
    for _ in range(_count(3, wide)):
        x, y = S * wide * rng.uniform(0.0, 0.9), S * (horizon + rng.uniform(0.03, 0.13))
        draw.line([(x, y), (x + S * 0.1, y)], fill=(235, 245, 255), width=max(2, S // 64))


def forest(canvas: Image.Image, rng: np.random.Generator, outline: int) -> None:
    S, wide = _size(canvas)
    ground = float(rng.uniform(0.68, 0.76))
    _bands(canvas, [(0.0, (185, 225, 240), (215, 235, 225)), (ground, (70, 150, 55), (50, 120, 40))])
    draw = ImageDraw.Draw(canvas)
    for x in sorted(rng.uniform(-0.05, 1.05, _count(8, wide)) * wide):
        top, half = ground - rng.uniform(0.45, 0.65), rng.uniform(0.09, 0.14)
        draw.rectangle([S * (x - 0.015), S * (ground - 0.1), S * (x + 0.015), S * (ground + 0.02)], fill=(100, 65, 35))
        color = mix((25, 95, 45), (55, 130, 50), float(rng.random()))
        _shape(draw, [(S * (x - half), S * (ground - 0.06)), (S * x, S * top), (S * (x + half), S * (ground - 0.06))], color, outline)


def city_street(canvas: Image.Image, rng: np.random.Generator, outline: int) -> None:
    S, wide = _size(canvas)
    street = float(rng.uniform(0.74, 0.8))
    _bands(canvas, [(0.0, (165, 195, 230), (200, 215, 235)), (street, (150, 150, 155), (150, 150, 155)),
                    (street + 0.07, (70, 70, 78), (60, 60, 66))])
    draw = ImageDraw.Draw(canvas)
    x = -rng.uniform(0.0, 0.1)
    while x < wide:
        width, top = rng.uniform(0.18, 0.28), rng.uniform(0.08, 0.3)
        wall = mix((120, 120, 135), (185, 160, 140), float(rng.random()))
        _shape(draw, [(S * x, S * street), (S * x, S * top), (S * (x + width), S * top), (S * (x + width), S * street)], wall, outline)
        for wy in np.arange(top + 0.04, street - 0.06, 0.09):
            for wx in np.arange(x + 0.03, x + width - 0.05, 0.07):
                lit = (250, 225, 120) if rng.random() < 0.5 else (60, 70, 95)
                draw.rectangle([S * wx, S * wy, S * (wx + 0.035), S * (wy + 0.045)], fill=lit)
        x += width
    for lx in np.arange(rng.uniform(0.0, 0.15), wide, 0.25):
        draw.rectangle([S * lx, S * (street + 0.13), S * (lx + 0.1), S * (street + 0.145)], fill=(240, 230, 120))


def snow_field(canvas: Image.Image, rng: np.random.Generator, outline: int) -> None:
    S, wide = _size(canvas)
    ground = float(rng.uniform(0.58, 0.66))
    _bands(canvas, [(0.0, (160, 195, 235), (215, 230, 245)), (ground, (248, 250, 253), (228, 236, 246))])
    draw = ImageDraw.Draw(canvas)
    for cx in rng.uniform(0.0, 1.0, _count(3, wide)) * wide:
        peak, half = ground - rng.uniform(0.22, 0.35), rng.uniform(0.2, 0.3)
        _shape(draw, [(S * (cx - half), S * ground), (S * cx, S * peak), (S * (cx + half), S * ground)], (150, 165, 190), outline)
        _shape(draw, [(S * (cx - half * 0.35), S * (peak + 0.35 * (ground - peak))), (S * cx, S * peak),
                      (S * (cx + half * 0.35), S * (peak + 0.35 * (ground - peak)))], (250, 252, 255), 0)
    for x, y in rng.uniform(0.0, 1.0, (_count(14, wide), 2)):
        _disc(draw, S * wide * x, S * y * ground, max(1.5, S / 110), (255, 255, 255))


def desert(canvas: Image.Image, rng: np.random.Generator, outline: int) -> None:
    S, wide = _size(canvas)
    ground = float(rng.uniform(0.6, 0.7))
    _bands(canvas, [(0.0, (245, 150, 70), (252, 205, 130)), (ground, (235, 185, 95), (215, 150, 70))])
    draw = ImageDraw.Draw(canvas)
    _disc(draw, S * wide * rng.uniform(0.1, 0.9), S * rng.uniform(0.1, 0.22), S * 0.1, (255, 240, 170), outline)
    for cx in rng.uniform(0.0, 1.0, _count(2, wide)) * wide:
        draw.ellipse([S * (cx - 0.35), S * (ground - 0.08), S * (cx + 0.35), S * (ground + 0.08)], fill=(225, 170, 85))
    x = float(rng.choice([rng.uniform(0.02, 0.15), rng.uniform(0.85, 0.98)])) * wide
    green = (60, 140, 60)
    _shape(draw, [(S * (x - 0.03), S * (ground + 0.05)), (S * (x - 0.03), S * (ground - 0.25)), (S * (x + 0.03), S * (ground - 0.25)),
                  (S * (x + 0.03), S * (ground + 0.05))], green, outline)


def night_sky(canvas: Image.Image, rng: np.random.Generator, outline: int) -> None:
    S, wide = _size(canvas)
    ground = float(rng.uniform(0.72, 0.8))
    _bands(canvas, [(0.0, (12, 16, 50), (40, 40, 95)), (ground, (25, 40, 55), (15, 25, 35))])
    draw = ImageDraw.Draw(canvas)
    for x, y in rng.uniform(0.0, 1.0, (_count(18, wide), 2)):
        _disc(draw, S * wide * x, S * y * ground, max(1.5, S / 100), (255, 250, 210))
    mx, my, r = S * wide * rng.uniform(0.1, 0.9), S * rng.uniform(0.08, 0.2), S * 0.08
    _disc(draw, mx, my, r, (250, 240, 180), outline)
    _disc(draw, mx + 0.45 * r, my - 0.2 * r, r * 0.85, (22, 25, 65))


SCENES: dict[str, Scene] = {"beach": beach, "forest": forest, "city street": city_street, "snow field": snow_field,
                            "desert": desert, "night sky": night_sky}

# A soft light disc behind the subject where the scene is dark, so that black hair and fur stay visible.
HALO: dict[str, RGB] = {"night sky": (95, 100, 150)}
