"""The two domains' subjects, drawn large in their own units (head radius about 1, head centre at the origin).

A person is a head-and-shoulders bust whose torso runs on below the frame; a pet is the whole animal sitting and
facing the viewer. Every identity attribute is a large area: a person's hair mass (colour and style), skin, shirt and
beard; a pet's silhouette (species), fur, markings over its body and neckwear across its chest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..world import Identity
from .canvas import INK, RGB, WHITE, Pen, ellipse_points, mix, shade
from .faces import draw_face

HAIR: dict[str, RGB] = {"black": (38, 32, 32), "brown": (115, 70, 38), "blonde": (238, 206, 105), "red": (205, 72, 28),
                        "white": (242, 242, 236), "blue": (45, 95, 225), "pink": (245, 120, 185)}
SKIN: dict[str, RGB] = {"pale": (252, 226, 206), "tan": (226, 178, 130), "brown": (160, 104, 66), "dark": (92, 58, 38)}
SHIRT: dict[str, RGB] = {"red": (220, 38, 44), "yellow": (248, 214, 36), "green": (44, 165, 70), "blue": (36, 86, 205),
                         "purple": (132, 58, 176), "orange": (248, 128, 26)}
FUR: dict[str, RGB] = {"white": (246, 246, 240), "golden": (228, 182, 88), "ginger": (218, 108, 38),
                       "brown": (118, 78, 48), "grey": (140, 140, 146), "black": (40, 38, 40)}
NECKWEAR: dict[str, RGB] = {"red": (225, 30, 40), "blue": (35, 95, 230), "green": (40, 175, 70), "yellow": (250, 220, 30),
                            "purple": (140, 55, 190), "pink": (250, 110, 190)}
_LIGHT_FURS = ("white", "golden", "ginger")
PINK: RGB = (240, 150, 160)
GOLD: RGB = (250, 200, 40)


@dataclass(frozen=True)
class Extent:
    """How far a subject reaches from its head centre, in its units: up (``top``), down (``bottom``) and to each side
    (``half_width``)."""

    top: float
    bottom: float
    half_width: float


def extent(identity: Identity) -> Extent:
    if identity.domain == "person":
        top = {"short": 1.3, "long": 1.3, "curly": 1.9, "spiky": 1.8}[identity.value("hair_style")]
        return Extent(top, 4.5, 2.1)
    top = {"cat": 1.6, "dog": 1.0, "rabbit": 2.6, "bear": 1.15}[identity.value("species")]
    return Extent(top, 3.6, 1.4)


def draw_subject(pen: Pen, identity: Identity, expression: str | None) -> None:
    (draw_person if identity.domain == "person" else draw_pet)(pen, identity, expression)


def _cap(pen: Pen, hair: RGB, fringe: float, bumps: int = 0) -> None:
    """Hair over the top of the head down to ``fringe`` (y) on the forehead; ``bumps`` scallops its edge (curls)."""
    arc = ellipse_points(0.0, -0.18, 1.1, 1.08, 24, math.pi * 0.97, math.pi * 2.03)
    edge = [(x, fringe + (0.12 * abs(math.sin(x * bumps * 1.6)) if bumps else 0.0)) for x in [0.9 - i * 0.15 for i in range(13)]]
    pen.poly(arc + edge, hair)


def draw_person(pen: Pen, identity: Identity, expression: str | None) -> None:
    a = identity.as_dict()
    hair, skin, shirt = HAIR[a["hair_color"]], SKIN[a["skin_tone"]], SHIRT[a["shirt_color"]]
    style = a["hair_style"]
    pen.poly([(-2.1, 4.6), (-2.05, 2.2)] + ellipse_points(-1.25, 2.2, 0.8, 0.7, 8, math.pi, math.pi * 1.5)
             + ellipse_points(1.25, 2.2, 0.8, 0.7, 8, math.pi * 1.5, math.pi * 2) + [(2.05, 2.2), (2.1, 4.6)], shirt)
    pen.poly([(-0.38, 0.6), (0.38, 0.6), (0.42, 1.55), (0.0, 2.0), (-0.42, 1.55)], shade(skin, 0.9))
    if style == "long":
        pen.poly(ellipse_points(0.0, -0.2, 1.25, 1.15, 14, math.pi, math.pi * 2)
                 + [(1.3, 1.4), (1.15, 2.3), (0.55, 2.2), (0.6, 0.8), (-0.6, 0.8), (-0.55, 2.2), (-1.15, 2.3), (-1.3, 1.4)], hair)
    elif style == "curly":
        pen.poly([(math.cos(t) * r, -0.35 + math.sin(t) * r) for i in range(40)
                  for t, r in [(i * math.pi / 20, 1.62 - 0.12 * abs(math.sin(i * math.pi / 2.5)))]], hair)
    for side in (-1, 1):
        pen.ellipse(1.0 * side, 0.08, 0.2, 0.27, skin)
    pen.ellipse(0.0, 0.0, 1.0, 1.12, skin)
    if a["facial_hair"] == "beard":
        pen.poly(ellipse_points(0.0, 0.12, 1.02, 1.12, 16, 0.0, math.pi) + [(-0.8, 0.12), (-0.3, 0.3), (0.3, 0.3), (0.8, 0.12)], hair)
    if style == "spiky":
        for i in range(5):
            x = -0.8 + 0.4 * i
            pen.poly([(x - 0.3, -0.8), (x + 0.05 * (i - 2), -1.8 + 0.12 * abs(i - 2)), (x + 0.3, -0.8)], hair)
    _cap(pen, hair, -0.5, bumps=3 if style == "curly" else 0)
    brow = shade(hair, 0.55) if a["hair_color"] in ("blonde", "white", "pink") else hair
    draw_face(pen, expression, brow, mouth_y=0.55)


def _markings(pen: Pen, kind: str, color: RGB, head: bool) -> None:
    """The pet's markings over its body (``head`` False) or its head (drawn after the head)."""
    if kind == "spots":
        spots = ((0.45, -0.5, 0.28), (-0.55, 0.15, 0.2)) if head else \
            ((-0.62, 1.65, 0.34), (0.55, 2.35, 0.36), (-0.25, 2.85, 0.3), (0.72, 1.45, 0.28))
        for x, y, r in spots:
            pen.ellipse(x, y, r, r * 0.9, color, outline=False)
    elif kind == "stripes" and head:
        for x in (-0.3, 0.0, 0.3):
            pen.line([(x, -0.92), (x * 1.2, -0.5)], color, 0.16)
    elif kind == "stripes":
        for y in (1.5, 2.1, 2.7):
            half = 1.3 * math.sqrt(max(0.0, 1 - ((y - 2.1) / 1.35) ** 2)) * 0.92
            pen.line([(-half, y - 0.08), (0.0, y + 0.08), (half, y - 0.08)], color, 0.24)
    elif kind == "belly patch" and head:
        pen.ellipse(0.0, 0.42, 0.58, 0.42, color, outline=False)
    elif kind == "belly patch":
        pen.ellipse(0.0, 2.3, 0.72, 0.95, color, outline=False)


def draw_pet(pen: Pen, identity: Identity, expression: str | None) -> None:
    a = identity.as_dict()
    species, fur = a["species"], FUR[a["fur_color"]]
    mark = shade(fur, 0.6) if a["fur_color"] in _LIGHT_FURS else mix(fur, WHITE, 0.65)
    if species == "cat":
        pen.line([(0.9, 3.0), (1.8, 2.6), (2.0, 1.7), (1.75, 1.1)], fur, 0.3)
    elif species == "dog":
        pen.line([(1.0, 2.8), (1.7, 2.2), (2.0, 1.6)], fur, 0.38)
    else:
        pen.ellipse(1.2, 3.05, 0.36 if species == "rabbit" else 0.26, 0.32 if species == "rabbit" else 0.24,
                    mix(fur, WHITE, 0.5) if species == "rabbit" else fur)
    pen.ellipse(0.0, 2.1, 1.3 if species != "bear" else 1.42, 1.35, fur)
    _markings(pen, a["markings"], mark, head=False)
    for side in (-1, 1):
        pen.ellipse(0.55 * side, 3.32, 0.42, 0.28, fur)
    inner = PINK
    for side in (-1, 1):
        if species == "cat":
            pen.poly([(0.9 * side, -0.4), (0.95 * side, -1.6), (0.22 * side, -0.85)], fur)
            pen.poly([(0.8 * side, -0.55), (0.85 * side, -1.3), (0.4 * side, -0.85)], inner, outline=False)
        elif species == "rabbit":
            pen.ellipse(0.42 * side, -1.6, 0.3, 1.0, fur)
            pen.ellipse(0.42 * side, -1.55, 0.14, 0.75, inner, outline=False)
        elif species == "bear":
            pen.ellipse(0.78 * side, -0.78, 0.37, 0.37, fur)
            pen.ellipse(0.78 * side, -0.78, 0.2, 0.2, shade(fur, 0.75), outline=False)
    pen.ellipse(0.0, 0.0, 1.05, 0.98, fur)
    _markings(pen, a["markings"], mark, head=True)
    if species == "dog":
        for side in (-1, 1):
            pen.ellipse(1.0 * side, 0.2, 0.36, 0.78, shade(fur, 0.75))
        pen.ellipse(0.0, 0.5, 0.55, 0.38, mix(fur, WHITE, 0.45))
    elif species == "bear":
        pen.ellipse(0.0, 0.45, 0.48, 0.36, mix(fur, WHITE, 0.35))
    color, kind = a["neckwear"].split(" ")
    band = NECKWEAR[color]
    pen.poly([(-0.9, 0.9), (0.9, 0.9), (0.98, 1.42), (-0.98, 1.42)], band)
    if kind == "collar":
        pen.ellipse(0.0, 1.58, 0.18, 0.18, GOLD)
    else:
        pen.poly([(-1.0, 1.2), (1.0, 1.2), (0.0, 2.75)], band)
    nose = INK if species in ("dog", "bear") else PINK
    brow = shade(fur, 0.5) if a["fur_color"] in _LIGHT_FURS else mix(fur, WHITE, 0.5)
    draw_face(pen, expression, brow, mouth_y=0.6, nose=nose)
    if species in ("cat", "rabbit"):
        for side in (-1, 1):
            for dy in (-0.06, 0.1):
                pen.line([(0.35 * side, 0.4 + dy), (1.15 * side, 0.3 + 2 * dy)], INK, 0.04)
