"""Drawing the toy world: numpy + PIL only, deterministic given (identity, context, size, seed).

Everything is drawn at twice the output size with PIL polygons (anti-aliased by the final 2x box reduction), then a
style pass turns the flat drawing into a photo, cartoon, pencil sketch, watercolor, pixel art or neon image. Subjects
are drawn in their own coordinates (x right, y up, the subject's base at the origin, its height about 1) through a
``_Pen`` that applies position, scale, rotation and mirroring, so pose jitter costs nothing.

Randomness: one ``numpy.random.default_rng`` per image, seeded from a purpose tag, the caller's seed, the identity and
the context, or from a ``layout_seed`` alone (never the global RNGs, never Python's salted ``hash``), so images are the
same across processes. Fixed textures come from fixed seeds.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .world import CONTEXT_FACTORS, DOMAINS, Context, Identity

RGB = tuple[int, int, int]

# ------------------------------------------------------------------------------------------------------ palettes

SKIN: dict[str, RGB] = {
    "pale": (255, 228, 206),
    "light": (240, 190, 145),
    "tan": (204, 146, 96),
    "brown": (146, 94, 58),
    "dark": (88, 56, 38),
}
HAIR: dict[str, RGB] = {
    "black": (34, 30, 36),
    "brown": (116, 68, 34),
    "blonde": (244, 206, 92),
    "red": (210, 70, 28),
    "white": (236, 236, 240),
    "blue": (80, 150, 240),
}
SHIRT: dict[str, RGB] = {
    "red": (220, 50, 50),
    "yellow": (248, 206, 36),
    "green": (90, 200, 90),
    "blue": (70, 140, 235),
    "purple": (110, 40, 150),
    "black": (42, 42, 48),
}
FUR: dict[str, RGB] = {
    "white": (246, 244, 238),
    "golden": (232, 190, 105),
    "ginger": (210, 95, 20),
    "brown": (126, 76, 42),
    "grey": (165, 167, 176),
    "black": (46, 42, 48),
}
MARK: dict[str, RGB] = {
    "black": (26, 24, 28),
    "white": (252, 252, 252),
    "brown": (88, 48, 24),
    "ginger": (216, 98, 26),
}
# A marking in the fur's own colour would be invisible: these (fur, marking) pairs get their own distinct shade.
MARK_ON_SAME_FUR: dict[str, RGB] = {
    "white": (168, 170, 178),  # silver marks on white
    "black": (118, 118, 126),  # charcoal-grey marks on black
    "brown": (214, 176, 120),  # tan marks on brown
    "ginger": (150, 36, 24),  # deep red marks on ginger
}
ACCESSORY: dict[str, RGB] = {"red collar": (222, 30, 40), "blue bandana": (30, 90, 220), "yellow bow tie": (250, 214, 30)}
INK: RGB = (24, 20, 28)
WHITE: RGB = (255, 255, 255)
PINK: RGB = (240, 140, 160)
EYE: RGB = (30, 24, 30)
TEAR: RGB = (90, 190, 255)
MOUTH: RGB = (130, 28, 40)
TONGUE: RGB = (238, 104, 120)
BEAK: RGB = (250, 160, 30)
ZZZ: RGB = (40, 60, 170)
LENS: RGB = (196, 228, 250)


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return (round(a[0] + (b[0] - a[0]) * t), round(a[1] + (b[1] - a[1]) * t), round(a[2] + (b[2] - a[2]) * t))


def _dark(c: RGB, f: float = 0.6) -> RGB:
    return (round(c[0] * f), round(c[1] * f), round(c[2] * f))


def _lum(c: RGB) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


# --------------------------------------------------------------------------------------------------------- pen

_CIRCLE = {n: [(math.cos(2 * math.pi * i / n), math.sin(2 * math.pi * i / n)) for i in range(n)] for n in (10, 14, 20, 28)}


class _Pen:
    """Draws shapes given in subject coordinates (x right, y up) onto a PIL image through an affine map."""

    __slots__ = ("draw", "a", "b", "c", "d", "tx", "ty", "s", "ow", "oc")

    def __init__(self, draw, ox, oy, scale, angle=0.0, flip=False, ow=0, oc=INK):
        f = -1.0 if flip else 1.0
        ca, sa = math.cos(angle), math.sin(angle)
        self.draw, self.s, self.ow, self.oc = draw, scale, ow, oc
        self.a, self.b = scale * f * ca, -scale * sa
        self.c, self.d = -scale * f * sa, -scale * ca
        self.tx, self.ty = ox, oy

    def rotated(self, angle: float, px: float, py: float) -> _Pen:
        """A pen whose shapes are rotated by ``angle`` (radians, counter-clockwise) about subject point (px, py)."""
        pen = object.__new__(_Pen)
        pen.draw, pen.s, pen.ow, pen.oc = self.draw, self.s, self.ow, self.oc
        ca, sa = math.cos(angle), math.sin(angle)
        pen.a, pen.b = self.a * ca + self.b * sa, -self.a * sa + self.b * ca
        pen.c, pen.d = self.c * ca + self.d * sa, -self.c * sa + self.d * ca
        qx, qy = px - (ca * px - sa * py), py - (sa * px + ca * py)
        pen.tx = self.a * qx + self.b * qy + self.tx
        pen.ty = self.c * qx + self.d * qy + self.ty
        return pen

    def shifted(self, dx: float, dy: float) -> _Pen:
        """A pen whose shapes are moved by (dx, dy) subject units."""
        pen = self.rotated(0.0, 0.0, 0.0)
        pen.tx += self.a * dx + self.b * dy
        pen.ty += self.c * dx + self.d * dy
        return pen

    def pts(self, xy):
        a, b, c, d, tx, ty = self.a, self.b, self.c, self.d, self.tx, self.ty
        return [(a * x + b * y + tx, c * x + d * y + ty) for x, y in xy]

    def width(self, w: float) -> int:
        return max(1, round(w * self.s))

    def poly(self, xy, fill, outline=True):
        p = self.pts(xy)
        self.draw.polygon(p, fill=fill)
        if outline and self.ow:
            self.draw.line(p + p[:1], fill=self.oc or _dark(fill, 0.45), width=self.ow, joint="curve")

    def ellipse(self, cx, cy, rx, ry, fill, outline=True, rot=0.0, n=20):
        if rot:
            cr, sr = math.cos(rot), math.sin(rot)
            xy = [(cx + rx * u * cr - ry * v * sr, cy + rx * u * sr + ry * v * cr) for u, v in _CIRCLE[n]]
        else:
            xy = [(cx + rx * u, cy + ry * v) for u, v in _CIRCLE[n]]
        self.poly(xy, fill, outline)

    def line(self, xy, fill, w, curve=True):
        self.draw.line(self.pts(xy), fill=fill, width=self.width(w), joint="curve" if curve else None)


def _arc(cx, cy, rx, ry, a0, a1, n=9):
    """Points on an ellipse from angle a0 to a1 (degrees, counter-clockwise, y up)."""
    return [
        (cx + rx * math.cos(math.radians(a0 + (a1 - a0) * i / (n - 1))), cy + ry * math.sin(math.radians(a0 + (a1 - a0) * i / (n - 1))))
        for i in range(n)
    ]


def _star(cx, cy, r, points=5, inner=0.45):
    return [
        (cx + (r if i % 2 == 0 else r * inner) * math.sin(math.pi * i / points), cy + (r if i % 2 == 0 else r * inner) * math.cos(math.pi * i / points))
        for i in range(2 * points)
    ]


# ----------------------------------------------------------------------------------------------- expressions

def _zzz(pen: _Pen, x, y, h):
    """Two "z" letters rising from (x, y): the sleeping sign, ``h`` the first one's height."""
    for i, k in enumerate((1.0, 0.75)):
        zx, zy, zh = x + i * 1.05 * h, y + i * 0.95 * h, h * k
        pen.line([(zx, zy + zh), (zx + zh, zy + zh), (zx, zy), (zx + zh, zy)], ZZZ, 0.25 * h, curve=False)


HEART: RGB = (232, 48, 110)
CLOUD: RGB = (128, 138, 168)
BANG: RGB = (255, 200, 0)
BURST: RGB = (225, 25, 25)


def _emote(pen: _Pen, expression: str | None, x: float, y: float):
    """A comic emotion symbol beside the head: a heart (smiling), a rain cloud (sad), "!" (surprised), a red burst
    (angry), "Z z" (sleepy). (x, y) is the subject point beside the head where it goes (as drawn unmirrored); it
    moves to the head's other side when the frame has more room there, and is then pushed inside the frame, so it
    is never cut. It is upright whatever the subject's tilt or mirroring, and about 12 px across (at least 11.5) at 64 px whatever
    the subject's size, so that the expression stays readable where the face's own features are a few pixels."""
    if expression is None:
        return
    h = max(0.21, 24.0 / pen.s)  # subject units; pen.s is pixels (of the 2x canvas) per unit
    width, height = pen.draw.im.size
    margin = 0.75 * h * pen.s
    (ax, ay), (bx, by) = pen.pts([(x + 0.5 * h, y + 0.5 * h), (-x - 0.5 * h, y + 0.5 * h)])

    def room(px: float) -> float:
        return min(px - margin, width - margin - px)

    cx, cy = (ax, ay) if room(ax) >= room(bx) else (bx, by)
    cx, cy = min(max(cx, margin), width - margin), min(max(cy, margin), height - margin)
    pen = _Pen(pen.draw, cx, cy, pen.s, ow=pen.ow, oc=pen.oc)  # upright, unmirrored, centred on the symbol
    _symbol(pen, expression, h)
    layer = getattr(pen.draw, "symbols", None)  # a pencil sketch keeps the symbol's colour (_compose, _style_pass)
    if layer is not None:
        _symbol(_Pen(layer, cx, cy, pen.s, ow=pen.ow, oc=pen.oc), expression, h)


def _symbol(pen: _Pen, expression: str, h: float):
    """The emotion symbol of height ``h`` centred on the pen's origin."""
    cx, cy = 0.0, 0.0
    if expression == "smiling":
        r = 0.29 * h
        pen.poly([(cx - 2 * r, cy + 0.15 * r)] + _arc(cx - r, cy + 0.2 * r, r, r, 180, 0, 7)
                 + _arc(cx + r, cy + 0.2 * r, r, r, 180, 0, 7)[1:] + [(cx + 2 * r, cy + 0.15 * r), (cx, cy - 1.9 * r)], HEART)
    elif expression == "sad":
        r = 0.24 * h
        for dx, dy, k in ((-r, 0.1 * h, 0.9), (r * 0.9, 0.12 * h, 0.85), (0, 0.32 * h, 1.05)):
            pen.ellipse(cx + dx, cy + dy, r * k * 1.25, r * k, CLOUD, n=14)
        for dx in (-0.8 * r, 0.0, 0.8 * r):
            pen.line([(cx + dx, cy - 0.15 * h), (cx + dx - 0.08 * h, cy - 0.45 * h)], TEAR, 0.09 * h, curve=False)
    elif expression == "surprised":
        w = 0.16 * h
        pen.poly([(cx - w, cy + 0.5 * h), (cx + w, cy + 0.5 * h), (cx + 0.45 * w, cy - 0.2 * h), (cx - 0.45 * w, cy - 0.2 * h)], BANG)
        pen.ellipse(cx, cy - 0.4 * h, w * 0.9, w * 0.9, BANG, n=10)
    elif expression == "angry":  # a filled spiky burst: the comic "anger pop". Up to the sixth build it was the thin
        # four-cornered anger vein, which the latents kept in half of the renders and the base model never drew
        pen.poly(_star(cx, cy, 0.5 * h, points=7, inner=0.6), BURST)
    elif expression == "sleepy":
        _zzz(pen, cx - 0.5 * h, cy - 0.6 * h, 0.55 * h)


def _face(pen: _Pen, expression: str | None, hy: float, eye_dx: float, eye_y: float, eye_r: float, mouth_y: float, mouth_w: float, brow: RGB, cheek: RGB | None, boost: float = 1.0):
    """Eyes, brows and mouth for one expression (None = the calm input-view face). Shared by persons and pets.

    ``boost`` enlarges the features (not the head) so that expressions stay readable on small subjects.
    """
    eye_r, mouth_w = eye_r * boost, mouth_w * boost
    lw = 0.02 * boost
    ex = (-eye_dx, eye_dx)
    if expression == "sleepy":
        for x in ex:
            pen.line(_arc(x, eye_y + eye_r * 0.3, eye_r * 1.1, eye_r * 0.9, 200, 340, 6), EYE, lw)
    elif expression == "surprised":
        for x in ex:  # tall white eyes without a rim (a rim would read as glasses)
            pen.ellipse(x, eye_y + eye_r * 0.2, eye_r * 1.0, eye_r * 1.5, WHITE, outline=False, n=14)
            pen.ellipse(x, eye_y + eye_r * 0.1, eye_r * 0.65, eye_r * 0.8, EYE, outline=False, n=10)
    else:
        for x in ex:
            pen.ellipse(x, eye_y, eye_r * 0.8, eye_r, EYE, outline=False, n=14)
            pen.ellipse(x + eye_r * 0.3, eye_y + eye_r * 0.35, eye_r * 0.3, eye_r * 0.3, WHITE, outline=False, n=10)
    bw = 0.028 * boost
    by = eye_y + eye_r * 1.9
    if expression == "sad":
        for s in (-1, 1):
            pen.line([(s * (eye_dx + eye_r * 1.2), by - eye_r * 0.5), (s * (eye_dx - eye_r * 1.2), by + eye_r * 0.5)], brow, bw)
    elif expression == "angry":
        for s in (-1, 1):
            pen.line([(s * (eye_dx + eye_r * 1.3), by + eye_r * 0.6), (s * (eye_dx - eye_r * 1.1), by - eye_r * 0.6)], brow, bw * 1.4)
    elif expression == "surprised":
        for x in ex:
            pen.line(_arc(x, by + eye_r * 0.5, eye_r * 1.3, eye_r * 0.9, 20, 160, 6), brow, bw)
    elif expression in ("smiling", None):
        for x in ex:
            pen.line(_arc(x, by - eye_r * 0.3, eye_r * 1.2, eye_r * 0.6, 30, 150, 5), brow, bw * 0.9)
    # mouth
    if expression == "smiling":
        top = mouth_y + mouth_w * 0.25
        xy = [(-mouth_w, top)] + _arc(0, top, mouth_w, mouth_w * 1.05, 180, 360, 9)[1:-1] + [(mouth_w, top)]
        pen.poly(xy, MOUTH)
        pen.ellipse(0, top - mouth_w * 0.7, mouth_w * 0.5, mouth_w * 0.28, TONGUE, outline=False, n=10)
        if cheek is not None:
            for s in (-1, 1):
                pen.ellipse(s * (eye_dx + eye_r * 0.6), eye_y - eye_r * 2.0, eye_r * 1.0, eye_r * 0.6, cheek, outline=False, n=10)
    elif expression == "sad":
        pen.line(_arc(0, mouth_y - mouth_w * 0.55, mouth_w * 0.8, mouth_w * 0.6, 25, 155, 7), EYE, lw * 1.2)
        tear = [(-eye_dx + eye_r * 0.2, eye_y - eye_r * 1.1)] + _arc(-eye_dx + eye_r * 0.2, eye_y - eye_r * 2.4, eye_r * 0.6, eye_r * 0.7, 20, -200, 8)
        pen.poly(tear, TEAR)
    elif expression == "surprised":
        pen.ellipse(0, mouth_y - mouth_w * 0.1, mouth_w * 0.42, mouth_w * 0.55, MOUTH, n=14)
    elif expression == "angry":
        h = mouth_w * 0.32
        pen.poly([(-mouth_w * 0.85, mouth_y - h), (mouth_w * 0.85, mouth_y - h), (mouth_w * 0.85, mouth_y + h), (-mouth_w * 0.85, mouth_y + h)], WHITE)
        pen.line([(-mouth_w * 0.85, mouth_y), (mouth_w * 0.85, mouth_y)], EYE, lw * 0.6, curve=False)
    elif expression == "sleepy":
        pen.ellipse(0, mouth_y, mouth_w * 0.22, mouth_w * 0.22, MOUTH, outline=False, n=10)
    else:
        pen.line(_arc(0, mouth_y + mouth_w * 0.5, mouth_w * 0.75, mouth_w * 0.5, 210, 330, 6), EYE, lw)


# -------------------------------------------------------------------------------------------------- persons


def _face_outline(shape: str, hy: float, fw: float, fh: float, n: int = 28):
    pts = []
    for u, v in _CIRCLE[n]:
        if shape == "round":
            x, y = 1.1 * u, 0.92 * v
        elif shape == "long":
            x, y = 0.76 * u, 1.18 * v
        elif shape == "square":
            x, y = math.copysign(abs(u) ** 0.25, u) * 1.02, math.copysign(abs(v) ** 0.25, v)
        else:  # pointed: round top, V chin
            x, y = (u, v) if v >= 0 else (u * (1 + 0.8 * v), 1.28 * v)
        pts.append((x * fw, hy + y * fh))
    return pts


_TORSO = [(-0.42, -1.2), (0.42, -1.2), (0.42, 0.22), (0.39, 0.295), (0.31, 0.345), (0.12, 0.37), (-0.12, 0.37), (-0.31, 0.345), (-0.39, 0.295), (-0.42, 0.22)]


_DOTS = [(-0.3, 0.29), (0.3, 0.29)] + [(x + (0.145 if k % 2 else 0.0), 0.2 - 0.11 * k) for k in range(10) for x in (-0.29, 0.0) + ((0.29,) if k % 2 == 0 else ())]


def _torso_half_width(y: float) -> float:
    if y <= 0.22:
        return 0.42
    for (x0, y0), (x1, y1) in zip(_TORSO[2:6], _TORSO[3:7]):
        if y0 <= y <= y1:
            return x0 + (x1 - x0) * (y - y0) / (y1 - y0)
    return 0.12


def _draw_person(pen: _Pen, identity: Identity, expression: str | None, head_tilt: float = 0.0, look: float = 0.0, boost: float = 1.0):
    a = identity.as_dict()
    skin, hair, shirt = SKIN[a["skin_tone"]], HAIR[a["hair_color"]], SHIRT[a["shirt_color"]]
    style, shape = a["hair_style"], a["face_shape"]
    hy, fw, fh = 0.64, 0.215, 0.24
    # torso and shirt pattern
    pen.poly(_TORSO, shirt)
    pattern_color = WHITE if _lum(shirt) < 150 else (40, 40, 90)
    pattern = a["shirt_pattern"]
    if pattern == "stripes":
        for y0 in (-0.85, -0.76, -0.67, -0.58, -0.49, -0.4, -0.31, -0.22, -0.13, -0.04, 0.05, 0.14, 0.23):
            y1 = y0 + 0.045
            w0, w1 = _torso_half_width(y0) - 0.01, _torso_half_width(y1) - 0.01
            pen.poly([(-w0, y0), (w0, y0), (w1, y1), (-w1, y1)], pattern_color, outline=False)
    elif pattern == "dots":
        for x, y in _DOTS:
            pen.ellipse(x, y, 0.042, 0.042, pattern_color, outline=False, n=10)
    elif pattern == "star":
        pen.poly(_star(0.0, 0.2, 0.13), pattern_color)
    head = pen.rotated(head_tilt, 0.0, 0.42) if head_tilt else pen
    head.poly([(-0.075, 0.3), (0.075, 0.3), (0.075, hy - 0.1), (-0.075, hy - 0.1)], _dark(skin, 0.88))
    # hair behind the head
    if style == "long":
        head.poly([(fw * 1.42, hy - 0.3)] + _arc(0, hy + 0.02, fw * 1.32, fh * 1.18, -5, 185, 11) + [(-fw * 1.42, hy - 0.3)], hair)
    elif style == "bob":
        head.poly(_arc(0, hy + 0.01, fw * 1.36, fh * 1.2, -40, 220, 15) + [(-fw * 0.9, hy - fh * 0.85), (fw * 0.9, hy - fh * 0.85)], hair)
    elif style == "curly":
        for u, v in _CIRCLE[14]:
            head.ellipse(u * fw * 1.25, hy + 0.05 + v * fh * 1.12, 0.085, 0.085, hair, n=10)
        head.ellipse(0, hy + 0.05, fw * 1.28, fh * 1.15, hair, outline=False)
    elif style == "ponytail":
        head.ellipse(fw * 1.25, hy - 0.02, 0.075, 0.17, hair, rot=-0.5, n=14)
        head.ellipse(fw * 1.02, hy + 0.08, 0.035, 0.035, (230, 40, 120), n=10)
    elif style == "bun":
        head.ellipse(0, hy + fh * 1.12, 0.085, 0.075, hair, n=14)
    # ears, face
    for s in (-1, 1):
        head.ellipse(s * fw * 0.98, hy - 0.01, 0.045, 0.06, skin, n=10)
    face = _face_outline(shape, hy, fw, fh)
    head.poly(face, skin)
    # facial hair below the features' layer
    if a["facial_hair"] == "beard":
        lower = [p for p in _face_outline(shape, hy, fw * 1.05, fh * 1.05) if p[1] < hy - fh * 0.05]
        lower.sort(key=lambda p: p[0])
        inner = [(fw * 0.8, hy - fh * 0.05), (fw * 0.45, hy - fh * 0.42), (0, hy - fh * 0.32), (-fw * 0.45, hy - fh * 0.42), (-fw * 0.8, hy - fh * 0.05)]
        head.poly(lower + inner, hair)
    # hair in front
    cap_y = hy + fh * 0.42
    if style in ("short", "long", "ponytail", "bun", "curly", "bob"):
        outer = _arc(0, hy + 0.01, fw * 1.1, fh * 1.1, -8, 188, 13)
        if style == "bob":
            fringe = [(-fw * 1.0, hy + fh * 0.1), (-fw * 0.9, cap_y - 0.01), (fw * 0.9, cap_y - 0.01), (fw * 1.0, hy + fh * 0.1)]
        elif style == "curly":
            outer = _arc(0, hy + 0.02, fw * 1.12, fh * 1.12, -8, 188, 13)
            fringe = [(-fw * 0.98, hy), (-fw * 0.6, cap_y), (0, cap_y + 0.01), (fw * 0.6, cap_y), (fw * 0.98, hy)]
        else:  # side part
            fringe = [(-fw * 1.02, hy - 0.01), (-fw * 0.85, cap_y - 0.03), (-fw * 0.2, cap_y + 0.01), (fw * 0.35, cap_y + 0.05), (fw * 0.85, cap_y + 0.01), (fw * 1.02, hy - 0.01)]
        head.poly(outer + fringe, hair)  # the arc ends on the left, the fringe runs left to right
        if style == "curly":
            for x in (-0.6, -0.2, 0.2, 0.6):
                head.ellipse(x * fw, cap_y + 0.005, 0.05, 0.04, hair, outline=False, n=10)
    elif style == "spiky":
        pts = []
        for i in range(11):
            ang = math.radians(-10 + 200 * i / 10)
            r = 1.42 if i % 2 else 1.05
            pts.append((math.cos(ang) * fw * r, hy + 0.02 + math.sin(ang) * fh * r))
        head.poly(pts + [(-fw * 0.9, cap_y - 0.02), (0, cap_y + 0.02), (fw * 0.9, cap_y - 0.02)], hair)
    elif style == "mohawk":
        crest = [(-0.05, cap_y - 0.015)] + [(-0.06, hy + fh * 1.0)] + _arc(0, hy + fh * 1.2, 0.06, 0.12, 180, 0, 7) + [(0.06, hy + fh * 1.0), (0.05, cap_y - 0.015)]
        head.poly(crest, hair)
        for i in (-1, 0, 1):
            head.poly([(i * 0.045 - 0.025, hy + fh * 1.3), (i * 0.045 + 0.025, hy + fh * 1.3), (i * 0.06, hy + fh * 1.75)], hair)
    # face
    brow = _dark(hair, 0.7) if _lum(hair) > 60 else hair
    eye_dx, eye_y, eye_r = fw * 0.42, hy - fh * 0.02, fh * 0.165
    face_pen = head.shifted(look * fw * 0.12, 0.0) if look else head  # the features turn a little with the gaze
    face_pen.line([(0, hy - fh * 0.1), (fw * 0.08, hy - fh * 0.32), (-fw * 0.02, hy - fh * 0.34)], _dark(skin, 0.7), 0.014)
    eyewear, lenses = a["eyewear"], []
    for s in (-1, 1):  # glasses: tinted lenses under the eyes, thick frames over them (after the face)
        x, r = s * eye_dx, eye_r * 1.8
        if eyewear == "round glasses":
            lenses.append(_arc(x, eye_y, r, r, 0, 360, 15))
        elif eyewear == "square glasses":
            lenses.append([(x - r * 1.1, eye_y + r * 0.8), (x + r * 1.1, eye_y + r * 0.8), (x + r * 1.1, eye_y - r * 0.8), (x - r * 1.1, eye_y - r * 0.8), (x - r * 1.1, eye_y + r * 0.8)])
    for lens in lenses:
        face_pen.poly(lens, LENS, outline=False)
    _face(face_pen, expression, hy, eye_dx, eye_y, eye_r, hy - fh * 0.58, fw * 0.38, brow, (240, 120, 130), boost)
    if a["facial_hair"] == "moustache" or a["facial_hair"] == "beard":
        my = hy - fh * 0.44
        face_pen.poly([(-fw * 0.66, my - 0.04), (-fw * 0.42, my + 0.035), (0, my + 0.03), (fw * 0.42, my + 0.035), (fw * 0.66, my - 0.04), (0, my - 0.012)], hair)
    if lenses:
        for lens in lenses:
            face_pen.line(lens, INK, 0.032, curve=eyewear == "round glasses")
        face_pen.line([(-eye_dx + eye_r * 1.8, eye_y + eye_r * 0.3), (eye_dx - eye_r * 1.8, eye_y + eye_r * 0.3)], INK, 0.032)
    _emote(head, expression, fw * 1.0, hy + fh * 0.3)


# ------------------------------------------------------------------------------------------------------ pets

# species -> body (cy, rx, ry), head (cy, rx, ry)
_PET_BODY = {
    "cat": ((0.25, 0.22, 0.26), (0.63, 0.26, 0.21)),
    "dog": ((0.27, 0.24, 0.26), (0.63, 0.235, 0.22)),
    "rabbit": ((0.24, 0.27, 0.25), (0.62, 0.22, 0.205)),
    "bear": ((0.27, 0.32, 0.28), (0.63, 0.265, 0.235)),
    "bird": ((0.3, 0.27, 0.31), (0.64, 0.2, 0.19)),
}


def _pet_colors(a: dict[str, str]) -> tuple[RGB, RGB]:
    fur = FUR[a["fur_color"]]
    mark = MARK_ON_SAME_FUR[a["fur_color"]] if a["fur_color"] == a["marking_color"] else MARK[a["marking_color"]]
    return fur, mark


def _draw_tail(pen: _Pen, kind: str, fur: RGB, tip: RGB | None, bird: bool):
    w = 0.07
    if bird:
        feathers = {"long": (0.5, 3), "bushy": (0.3, 5), "stub": (0.18, 3), "curly": (0.3, 3)}[kind]
        length, count = feathers
        for i in range(count):
            ang = math.radians(-40 + 30 * (i - (count - 1) / 2))
            ex, ey = 0.2 + math.cos(ang) * length, 0.12 + math.sin(ang + 1.2) * length * 0.6
            pen.ellipse((0.2 + ex) / 2, (0.12 + ey) / 2, length / 2, 0.045, tip if tip is not None and i == count // 2 else fur, rot=math.atan2(ey - 0.12, ex - 0.2), n=14)
        if kind == "curly":
            pen.line(_arc(0.56, 0.34, 0.08, 0.08, 200, 520, 12), _dark(fur, 0.75), 0.035)
        return
    if kind == "long":
        xy = [(0.16, 0.1), (0.32, 0.06), (0.42, 0.14), (0.46, 0.3), (0.44, 0.46)]
        pen.line(xy, pen.oc if pen.ow and pen.oc else _dark(fur, 0.5), w + 2 * pen.ow / pen.s if pen.ow else w)
        pen.line(xy, fur, w)
        if tip is not None:
            pen.ellipse(0.44, 0.46, w * 0.7, w * 0.9, tip, n=10)
    elif kind == "bushy":
        xy = [(0.14, 0.06), (0.34, 0.02), (0.5, 0.16), (0.52, 0.38), (0.44, 0.56), (0.34, 0.48), (0.34, 0.3), (0.26, 0.16), (0.14, 0.14)]
        pen.poly(xy, fur)
        if tip is not None:
            pen.poly([(0.52, 0.38), (0.44, 0.56), (0.34, 0.48), (0.39, 0.4)], tip)
    elif kind == "stub":
        pen.ellipse(0.28, 0.08, 0.09, 0.085, fur if tip is None else tip, n=14)
    else:  # curly
        xy = [(0.16, 0.08), (0.3, 0.06)] + _arc(0.36, 0.2, 0.12, 0.13, -70, 250, 12) + _arc(0.36, 0.24, 0.06, 0.07, 250, 70, 6)
        pen.line(xy, pen.oc if pen.ow and pen.oc else _dark(fur, 0.5), w * 0.9 + 2 * pen.ow / pen.s if pen.ow else w * 0.9)
        pen.line(xy, fur, w * 0.9)
        if tip is not None:
            pen.ellipse(xy[-1][0], xy[-1][1], w * 0.6, w * 0.6, tip, n=10)


def _draw_ears(pen: _Pen, kind: str, hy: float, hrx: float, hry: float, fur: RGB, inner: RGB, tip: RGB | None, bird: bool):
    top = hy + hry
    for s in (-1, 1):
        if kind == "pointed":
            base = [(s * hrx * 0.95, hy + hry * 0.35), (s * hrx * 0.25, top - 0.01)]
            apex = (s * hrx * 0.95, top + 0.17)
            pen.poly([base[0], apex, base[1]], fur)
            if not bird:
                pen.poly([(s * hrx * 0.82, hy + hry * 0.55), (s * hrx * 0.88, top + 0.1), (s * hrx * 0.42, top + 0.0)], inner, outline=False)
            if tip is not None:
                pen.poly([apex, (s * hrx * 0.92, top + 0.1), (s * hrx * 0.72, top + 0.1)], tip, outline=False)
        elif kind == "round":
            pen.ellipse(s * hrx * 0.72, top - 0.01, 0.085, 0.08, fur if tip is None else tip, n=14)
            if not bird:
                pen.ellipse(s * hrx * 0.72, top - 0.015, 0.045, 0.042, inner, outline=False, n=10)
        elif kind == "floppy":
            pen.ellipse(s * hrx * 1.0, hy - 0.01, 0.075, 0.16, fur if tip is None else tip, rot=s * 0.28, n=14)
        else:  # long
            pen.ellipse(s * 0.085, top + 0.17, 0.052, 0.21, fur, rot=-s * 0.12, n=14)
            if not bird:
                pen.ellipse(s * 0.085, top + 0.17, 0.024, 0.15, inner, outline=False, rot=-s * 0.12, n=10)
            if tip is not None:
                pen.ellipse(s * 0.085 - s * 0.04 * math.sin(0.12) * 3, top + 0.33, 0.04, 0.06, tip, outline=False, n=10)


def _draw_pet(pen: _Pen, identity: Identity, expression: str | None, boost: float = 1.0):
    a = identity.as_dict()
    species, markings = a["species"], a["markings"]
    fur, mark = _pet_colors(a)
    bird = species == "bird"
    (by, brx, bry), (hy, hrx, hry) = _PET_BODY[species]
    inner = PINK if not bird else fur
    socks = mark if markings == "socks" else None
    _draw_tail(pen, a["tail"], fur, socks, bird)
    if a["ear_shape"] == "long" or (a["ear_shape"] == "pointed" and bird):
        _draw_ears(pen, a["ear_shape"], hy, hrx, hry, fur, inner, socks, bird)
    # body
    pen.ellipse(0, by, brx, bry, fur, n=28)
    if markings == "belly patch":
        pen.ellipse(0, by - bry * 0.15, brx * 0.6, bry * 0.7, mark, outline=False, n=20)
    elif markings == "spots":
        for x, y, r in ((-0.55, 0.2, 0.32), (0.45, -0.3, 0.28), (0.2, 0.45, 0.22), (-0.3, -0.45, 0.2)):
            pen.ellipse(x * brx, by + y * bry, r * brx, r * brx * 0.85, mark, outline=False, n=10)
    elif markings == "stripes":
        for y in (0.35, 0.0, -0.35):
            for s in (-1, 1):
                w = math.sqrt(max(0.0, 1 - y * y))
                pen.poly([(s * w * brx * 1.0, by + (y + 0.1) * bry), (s * w * brx * 0.45, by + (y + 0.02) * bry), (s * w * brx * 1.0, by + (y - 0.1) * bry)], mark, outline=False)
    if bird:
        for s in (-1, 1):
            pen.ellipse(s * brx * 0.92, by + 0.02, 0.08, 0.19, socks or _dark(fur, 0.85), rot=-s * 0.35, n=14)
        for s in (-1, 1):
            x = s * 0.09
            pen.line([(x - 0.05, -0.005), (x, 0.05), (x + 0.05, -0.005)], BEAK, 0.025)
            pen.line([(x, -0.005), (x, 0.05)], BEAK, 0.025)
    elif species == "dog":  # straight front legs
        for s in (-1, 1):
            pen.ellipse(s * brx * 0.36, 0.13, 0.058, 0.13, fur, n=14)
            pen.ellipse(s * brx * 0.38, 0.03, 0.07, 0.045, socks or fur, n=14)
    elif species == "bear":  # teddy arms and padded feet
        for s in (-1, 1):
            pen.ellipse(s * brx * 0.9, by + 0.03, 0.075, 0.15, socks or fur, rot=s * 0.55, n=14)
            pen.ellipse(s * brx * 0.5, 0.05, 0.09, 0.075, fur, n=14)
            pen.ellipse(s * brx * 0.5, 0.05, 0.05, 0.04, socks or _mix(fur, WHITE, 0.5), outline=False, n=10)
    elif species == "rabbit":  # long hind feet, small front paws
        for s in (-1, 1):
            pen.ellipse(s * brx * 0.72, 0.035, 0.13, 0.048, socks or fur, n=14)
            pen.ellipse(s * brx * 0.25, by + 0.02, 0.05, 0.04, fur, n=10)
    else:  # cat: small neat paws
        for s in (-1, 1):
            pen.ellipse(s * brx * 0.36, 0.035, 0.065, 0.045, socks or fur, n=14)
    # head
    if a["ear_shape"] not in ("long",) and not (a["ear_shape"] == "pointed" and bird) and a["ear_shape"] != "floppy":
        _draw_ears(pen, a["ear_shape"], hy, hrx, hry, fur, inner, socks, bird)
    if species == "cat":
        head = [(x, y) for x, y in _face_outline("round", hy, hrx, hry, 28)]
        head = [(x * (1.1 if hy - 0.09 < y < hy - 0.02 else 1.0), y) for x, y in head]
        pen.poly(head, fur)
    else:
        pen.ellipse(0, hy, hrx, hry, fur, n=28)
    if markings == "eye patch":
        pen.ellipse(-hrx * 0.38, hy + 0.005, 0.085, 0.075, mark, outline=False, n=14)
    elif markings == "stripes":
        for x in (-0.05, 0.0, 0.05):
            pen.poly([(x - 0.018, hy + hry * 0.95), (x + 0.018, hy + hry * 0.95), (x, hy + hry * 0.5)], mark, outline=False)
    elif markings == "spots":
        pen.ellipse(hrx * 0.5, hy + hry * 0.45, 0.045, 0.04, mark, outline=False, n=10)
    elif markings == "belly patch":
        pen.ellipse(0, hy - hry * 0.45, hrx * 0.55, hry * 0.42, mark, outline=False, n=14)
    if a["ear_shape"] == "floppy":
        _draw_ears(pen, a["ear_shape"], hy, hrx, hry, fur, inner, socks, bird)
    # muzzle, nose
    nose_y = hy - hry * 0.3
    if species == "dog":  # long muzzle with jowls and a big nose
        muzzle = _mix(fur, WHITE, 0.45) if markings != "belly patch" else _mix(mark, WHITE, 0.3)
        pen.ellipse(0, hy - hry * 0.4, hrx * 0.36, hry * 0.42, muzzle, n=14)
        for s in (-1, 1):
            pen.ellipse(s * hrx * 0.2, hy - hry * 0.62, hrx * 0.24, hry * 0.24, muzzle, n=14)
        pen.poly([(-0.055, nose_y + 0.02), (0.055, nose_y + 0.02), (0, nose_y - 0.04)], INK)
    elif species == "bear":  # small round muzzle, round nose
        muzzle = _mix(fur, WHITE, 0.45) if markings != "belly patch" else _mix(mark, WHITE, 0.3)
        pen.ellipse(0, hy - hry * 0.45, hrx * 0.3, hry * 0.3, muzzle, n=14)
        pen.ellipse(0, nose_y - 0.005, 0.035, 0.026, INK, outline=False, n=10)
    elif species in ("cat", "rabbit"):
        pen.poly([(-0.025, nose_y + 0.012), (0.025, nose_y + 0.012), (0, nose_y - 0.015)], PINK, outline=False)
        wc = _dark(fur, 0.45) if _lum(fur) > 90 else (200, 200, 200)
        for s in (-1, 1):
            for dy in (-0.01, 0.015):
                pen.line([(s * hrx * 0.3, nose_y - 0.01), (s * hrx * 1.05, nose_y + dy * 2)], wc, 0.008, curve=False)
        if species == "rabbit" and expression not in ("smiling", "surprised"):
            pen.poly([(-0.022, nose_y - 0.03), (0.022, nose_y - 0.03), (0.022, nose_y - 0.07), (-0.022, nose_y - 0.07)], WHITE)
    eye_y = hy + hry * 0.12
    _face(pen, expression, hy, hrx * 0.42, eye_y, hry * 0.17, hy - hry * 0.62, hrx * 0.28, INK, PINK, boost)
    if bird:
        pen.poly([(-0.05, nose_y + 0.03), (0.05, nose_y + 0.03), (0, nose_y - 0.06)], BEAK)
    acc = a["accessory"]
    ny = hy - hry * 0.98
    if acc == "red collar":
        pen.poly([(-0.17, ny - 0.04), (0.17, ny - 0.04), (0.17, ny + 0.02), (-0.17, ny + 0.02)], ACCESSORY[acc])
        pen.ellipse(0, ny - 0.07, 0.04, 0.04, (250, 210, 40), n=10)
    elif acc == "blue bandana":
        pen.poly([(-0.2, ny + 0.03), (0.2, ny + 0.03), (0, ny - 0.19)], ACCESSORY[acc])
        for x, y in ((-0.07, ny - 0.0), (0.07, ny - 0.0), (0.0, ny - 0.09)):
            pen.ellipse(x, y, 0.02, 0.02, WHITE, outline=False, n=10)
    elif acc == "yellow bow tie":
        pen.poly([(0, ny - 0.015), (-0.16, ny + 0.055), (-0.16, ny - 0.09)], ACCESSORY[acc])
        pen.poly([(0, ny - 0.015), (0.16, ny + 0.055), (0.16, ny - 0.09)], ACCESSORY[acc])
        pen.ellipse(0, ny - 0.017, 0.038, 0.038, _dark(ACCESSORY[acc], 0.8), n=10)
    _emote(pen, expression, hrx * 0.95, hy + hry * 0.45)


def _draw_subject(pen: _Pen, identity: Identity, expression: str | None, head_tilt: float = 0.0, look: float = 0.0, boost: float = 1.0):
    if identity.domain == "person":
        _draw_person(pen, identity, expression, head_tilt, look, boost)
    else:
        _draw_pet(pen, identity, expression, boost)


# ---------------------------------------------------------------------------------------------------- scenes

SCENES = CONTEXT_FACTORS["scene"]


@lru_cache(maxsize=64)
def _gradient(S: int, top: RGB, bottom: RGB) -> Image.Image:
    t = np.linspace(0.0, 1.0, S, dtype=np.float32)[:, None, None]
    rows = np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t
    return Image.fromarray(np.broadcast_to(np.rint(rows), (S, S, 3)).astype(np.uint8))


class _Scene:
    """Drawing helpers in image fractions (x right, y down) with the style's outline width for scene objects."""

    def __init__(self, img: Image.Image, rng: np.random.Generator, ow: int):
        self.img, self.d, self.S, self.r, self.ow = img, ImageDraw.Draw(img), img.size[0], rng, ow

    def u(self, a, b):
        return float(self.r.uniform(a, b))

    def poly(self, pts, fill, outline=True):
        S = self.S
        p = [(x * S, y * S) for x, y in pts]
        self.d.polygon(p, fill=fill)
        if outline and self.ow:
            self.d.line(p + p[:1], fill=INK, width=self.ow, joint="curve")

    def rect(self, x0, y0, x1, y1, fill, outline=True):
        S = self.S
        self.d.rectangle((x0 * S, y0 * S, x1 * S, y1 * S), fill=fill, outline=INK if outline and self.ow else None, width=self.ow or 1)

    def ellipse(self, cx, cy, rx, ry, fill, outline=True, width=None):
        S = self.S
        box = ((cx - rx) * S, (cy - ry) * S, (cx + rx) * S, (cy + ry) * S)
        if fill is None:
            self.d.ellipse(box, outline=WHITE if outline is True else outline, width=width or max(1, self.S // 64))
        else:
            self.d.ellipse(box, fill=fill, outline=INK if outline and self.ow else None, width=self.ow or 1)

    def line(self, pts, fill, w):
        S = self.S
        self.d.line([(x * S, y * S) for x, y in pts], fill=fill, width=max(1, round(w * S)), joint="curve")

    def wavy(self, y, amp, freq, phase, n=17):
        return [(i / (n - 1), y + amp * math.sin(phase + freq * 2 * math.pi * i / (n - 1))) for i in range(n)]


def _beach(c: _Scene):
    c.img.paste(_gradient(c.S, (96, 170, 236), (196, 228, 250)))
    h = c.u(0.4, 0.47)
    shore = h + c.u(0.12, 0.16)
    c.ellipse(c.u(0.1, 0.9), c.u(0.08, 0.17), 0.075, 0.075, (255, 222, 60))
    c.rect(-0.01, h, 1.01, shore + 0.05, (30, 118, 200), outline=False)
    c.rect(-0.01, h, 1.01, h + 0.025, (70, 150, 220), outline=False)
    for _ in range(5):
        x, y = c.u(0.0, 0.95), c.u(h + 0.03, shore - 0.02)
        c.line([(x, y), (x + 0.03, y - 0.012), (x + 0.06, y)], (230, 245, 255), 0.012)
    sand = c.wavy(shore, 0.012, 2.0, c.u(0, 6.3))
    c.poly(sand + [(1, 1), (0, 1)], (240, 214, 156), outline=False)
    c.line(sand, (250, 250, 250), 0.015)
    x = c.u(0.04, 0.16) if c.r.random() < 0.5 else c.u(0.84, 0.96)
    if c.r.random() < 0.5:  # striped umbrella
        base = c.u(0.8, 0.9)
        c.line([(x, base), (x, base - 0.36)], (120, 90, 60), 0.012)
        top = base - 0.4
        for i in range(4):
            a0, a1 = math.pi * i / 4, math.pi * (i + 1) / 4
            pts = [(x, top)] + [(x - 0.14 * math.cos(a0 + (a1 - a0) * k / 3), top + 0.06 - 0.06 * math.sin(a0 + (a1 - a0) * k / 3) + 0.05) for k in range(4)]
            c.poly(pts, (230, 40, 50) if i % 2 == 0 else (250, 250, 250))
    else:  # palm tree
        base = c.u(0.78, 0.9)
        trunk = [(x, base), (x + 0.02, base - 0.2), (x + 0.05, base - 0.42)]
        c.line(trunk, (140, 96, 50), 0.035)
        tx, ty = trunk[-1]
        for ang in (-2.6, -2.0, -1.1, -0.5, 0.2):
            ex, ey = tx + 0.17 * math.cos(ang), ty + 0.1 * math.sin(ang) + 0.08
            c.poly([(tx, ty), ((tx + ex) / 2 + 0.02, (ty + ey) / 2 - 0.05), (ex, ey), ((tx + ex) / 2, (ty + ey) / 2 + 0.01)], (40, 150, 60))


def _tree(c: _Scene, x, base, h, pine: bool):
    trunk = (96, 62, 34)
    c.rect(x - 0.022 * h / 0.5, base - h * 0.35, x + 0.022 * h / 0.5, base, trunk)
    if pine:
        green = (24, 96, 52)
        for k in range(3):
            y0 = base - h * (0.22 + 0.24 * k)
            w = 0.2 * h * (1 - 0.22 * k)
            c.poly([(x - w, y0), (x + w, y0), (x, y0 - h * 0.42)], green)
    else:
        green = (62, 150, 56)
        c.ellipse(x, base - h * 0.68, 0.2 * h, 0.32 * h, green)


def _forest(c: _Scene):
    c.img.paste(_gradient(c.S, (150, 204, 236), (206, 232, 238)))
    g = c.u(0.56, 0.64)
    pts = [(0, g)] + [(i / 12, g - 0.12 - 0.07 * (i % 2) - 0.03 * c.r.random()) for i in range(13)] + [(1, g)]
    c.poly(pts, (40, 102, 62), outline=False)
    c.rect(-0.01, g, 1.01, 1.01, (92, 164, 62), outline=False)
    n = int(c.r.integers(6, 9))
    xs = (np.arange(n) + c.r.uniform(0.15, 0.85, n)) / n
    trees = sorted(zip(c.r.uniform(0.0, 0.16, n).tolist(), xs.tolist(), (c.r.random(n) < 0.55).tolist()))
    for dy, x, pine in trees:
        _tree(c, x, g + 0.03 + dy, c.u(0.55, 0.8), pine)
    for _ in range(6):
        x, y = c.u(0, 1), c.u(g + 0.05, 0.98)
        c.line([(x - 0.02, y), (x, y - 0.03), (x + 0.02, y)], (50, 120, 40), 0.01)


def _city(c: _Scene):
    c.img.paste(_gradient(c.S, (130, 190, 236), (204, 226, 246)))
    walk = c.u(0.62, 0.68)
    road = walk + c.u(0.08, 0.1)
    colors = [(172, 172, 184), (186, 112, 92), (214, 194, 150), (116, 138, 172), (156, 96, 86), (200, 200, 200)]
    x = -c.u(0.0, 0.08)
    while x < 1.0:
        w = c.u(0.16, 0.27)
        top = c.u(0.06, 0.36)
        col = colors[int(c.r.integers(len(colors)))]
        c.rect(x, top, x + w, walk, col)
        lit = (250, 228, 130) if c.r.random() < 0.5 else (60, 84, 130)
        wy = top + 0.04
        while wy < walk - 0.08:
            wx = x + 0.03
            while wx < x + w - 0.06:
                c.rect(wx, wy, wx + 0.04, wy + 0.05, lit, outline=False)
                wx += 0.075
            wy += 0.09
        x += w + c.u(0.0, 0.02)
    c.rect(-0.01, walk, 1.01, road, (182, 182, 188))
    c.rect(-0.01, road, 1.01, 1.01, (68, 68, 76), outline=False)
    lane = (road + 1.0) / 2
    x = -c.u(0.0, 0.2)
    while x < 1.0:
        c.rect(x, lane - 0.012, x + 0.12, lane + 0.012, (250, 250, 250), outline=False)
        x += 0.22


def _snow(c: _Scene):
    c.img.paste(_gradient(c.S, (176, 198, 228), (226, 234, 246)))
    g = c.u(0.52, 0.6)
    x = -c.u(0.1, 0.3)
    while x < 1.0:
        w, h = c.u(0.25, 0.4), c.u(0.18, 0.3)
        c.poly([(x, g), (x + w / 2, g - h), (x + w, g)], (120, 136, 170))
        c.poly([(x + w / 2 - w * 0.14, g - h * 0.72), (x + w / 2, g - h), (x + w / 2 + w * 0.14, g - h * 0.72), (x + w / 2 + 0.02, g - h * 0.78), (x + w / 2 - 0.02, g - h * 0.7)], (250, 252, 255), outline=False)
        x += w * c.u(0.6, 0.9)
    ground = c.wavy(g, 0.01, 1.5, c.u(0, 6.3))
    c.poly(ground + [(1, 1), (0, 1)], (246, 249, 254), outline=False)
    for _ in range(4):
        c.ellipse(c.u(0, 1), c.u(g + 0.08, 0.98), c.u(0.06, 0.14), 0.02, (214, 226, 244), outline=False)
    x = c.u(0.04, 0.14) if c.r.random() < 0.5 else c.u(0.86, 0.96)
    base = c.u(0.82, 0.9)
    if c.r.random() < 0.5:  # snowman
        c.ellipse(x, base - 0.07, 0.075, 0.07, (252, 252, 255))
        c.ellipse(x, base - 0.18, 0.055, 0.05, (252, 252, 255))
        c.poly([(x, base - 0.185), (x + 0.05, base - 0.175), (x, base - 0.17)], (250, 130, 30), outline=False)
        c.rect(x - 0.04, base - 0.24, x + 0.04, base - 0.225, INK, outline=False)
        c.rect(x - 0.025, base - 0.29, x + 0.025, base - 0.23, INK, outline=False)
    else:  # snowy pine
        for k in range(3):
            y0, w = base - 0.1 - 0.12 * k, 0.1 - 0.025 * k
            c.poly([(x - w, y0), (x + w, y0), (x, y0 - 0.16)], (30, 96, 60))
            c.poly([(x - w * 0.45, y0 - 0.09), (x, y0 - 0.16), (x + w * 0.45, y0 - 0.09)], (250, 252, 255), outline=False)
        c.rect(x - 0.015, base - 0.1, x + 0.015, base, (96, 62, 34))
    for _ in range(26):
        c.ellipse(c.u(0, 1), c.u(0, 0.95), 0.008, 0.008, (255, 255, 255), outline=False)


def _living_room(c: _Scene):
    walls = [(236, 214, 168), (222, 196, 206), (206, 222, 188), (242, 204, 164)]
    wall = walls[int(c.r.integers(len(walls)))]
    c.rect(-0.01, -0.01, 1.01, 1.01, wall, outline=False)
    stripe = _dark(wall, 0.93)
    off = c.u(0, 0.1)
    for i in range(11):
        c.rect(off + i * 0.1, 0, off + i * 0.1 + 0.03, 0.7, stripe, outline=False)
    f = c.u(0.68, 0.73)
    c.rect(-0.01, f, 1.01, 1.01, (164, 106, 60))
    for i in range(1, 6):
        y = f + i * 0.06
        c.line([(0, y), (1, y)], (122, 76, 40), 0.006)
    c.ellipse(0.5 + c.u(-0.1, 0.1), f + 0.17, 0.36, 0.07, (200, 74, 70))
    left = c.r.random() < 0.5
    wx = c.u(0.05, 0.2) if left else c.u(0.62, 0.77)
    wy = c.u(0.08, 0.14)
    c.rect(wx, wy, wx + 0.23, wy + 0.28, (250, 250, 250))
    c.rect(wx + 0.02, wy + 0.02, wx + 0.21, wy + 0.26, (164, 214, 246), outline=False)
    c.rect(wx + 0.105, wy, wx + 0.125, wy + 0.28, (250, 250, 250), outline=False)
    c.rect(wx, wy + 0.13, wx + 0.23, wy + 0.15, (250, 250, 250), outline=False)
    for cx in (wx - 0.03, wx + 0.23 - 0.01):
        c.rect(cx, wy - 0.03, cx + 0.04, wy + 0.33, (190, 48, 60))
    px = c.u(0.66, 0.78) if left else c.u(0.08, 0.2)
    c.rect(px, 0.14, px + 0.16, 0.3, (120, 78, 40))
    c.rect(px + 0.02, 0.16, px + 0.14, 0.28, (160, 210, 240), outline=False)
    c.poly([(px + 0.02, 0.28), (px + 0.07, 0.2), (px + 0.14, 0.28)], (70, 150, 70), outline=False)
    sofa = [(60, 108, 170), (170, 62, 62), (88, 140, 88)][int(c.r.integers(3))]
    sx = c.u(0.1, 0.2)
    c.rect(sx, f - 0.28, 1 - sx + 0.05, f - 0.04, sofa)
    c.rect(sx - 0.04, f - 0.18, sx + 0.06, f + 0.02, _dark(sofa, 0.85))
    c.rect(1 - sx - 0.01, f - 0.18, 1 - sx + 0.09, f + 0.02, _dark(sofa, 0.85))
    c.rect(sx + 0.06, f - 0.12, 1 - sx - 0.01, f - 0.02, _mix(sofa, WHITE, 0.15))


def _desert(c: _Scene):
    c.img.paste(_gradient(c.S, (250, 170, 92), (252, 228, 160)))
    c.ellipse(c.u(0.15, 0.85), c.u(0.1, 0.2), 0.1, 0.1, (255, 244, 176))
    g = c.u(0.52, 0.6)
    if c.r.random() < 0.6:
        px, pw = c.u(0.2, 0.8), c.u(0.12, 0.18)
        c.poly([(px - pw, g + 0.02), (px, g - pw * 0.9), (px + pw, g + 0.02)], (224, 176, 104))
        c.poly([(px, g - pw * 0.9), (px + pw, g + 0.02), (px + pw * 0.3, g + 0.02)], (196, 146, 80), outline=False)
    far = c.wavy(g, 0.03, 1.3, c.u(0, 6.3))
    c.poly(far + [(1, 1), (0, 1)], (232, 170, 96), outline=False)
    near = c.wavy(g + 0.14, 0.04, 0.8, c.u(0, 6.3))
    c.poly(near + [(1, 1), (0, 1)], (242, 196, 120))
    x = c.u(0.05, 0.15) if c.r.random() < 0.5 else c.u(0.85, 0.95)
    base, h, green = c.u(0.84, 0.94), c.u(0.3, 0.38), (62, 146, 70)
    c.line([(x, base), (x, base - h)], green, 0.05)
    c.line([(x - 0.02, base - h * 0.45), (x - 0.08, base - h * 0.45), (x - 0.08, base - h * 0.75)], green, 0.035)
    c.line([(x + 0.02, base - h * 0.6), (x + 0.07, base - h * 0.6), (x + 0.07, base - h * 0.85)], green, 0.035)
    for _ in range(3):
        c.ellipse(c.u(0, 1), c.u(g + 0.2, 0.97), 0.02, 0.012, (180, 130, 80), outline=False)


def _night(c: _Scene):
    c.img.paste(_gradient(c.S, (6, 10, 36), (44, 46, 104)))
    for _ in range(34):
        r = 0.004 if c.r.random() < 0.7 else 0.008
        c.ellipse(c.u(0, 1), c.u(0, 0.75), r, r, (255, 255, 220) if c.r.random() < 0.5 else WHITE, outline=False)
    for _ in range(3):
        x, y, r = c.u(0.05, 0.95), c.u(0.05, 0.5), 0.03
        c.line([(x - r, y), (x + r, y)], (255, 255, 230), 0.006)
        c.line([(x, y - r), (x, y + r)], (255, 255, 230), 0.006)
    mx, my = c.u(0.15, 0.85), c.u(0.1, 0.22)
    c.ellipse(mx, my, 0.08, 0.08, (252, 240, 170), outline=False)
    sky = tuple(int(v) for v in _gradient(c.S, (6, 10, 36), (44, 46, 104)).getpixel((0, int(my * c.S))))
    c.ellipse(mx + 0.035, my - 0.02, 0.07, 0.07, sky, outline=False)
    hills = c.wavy(c.u(0.72, 0.78), 0.03, 1.7, c.u(0, 6.3))
    c.poly(hills + [(1, 1), (0, 1)], (18, 30, 44), outline=False)


def _underwater(c: _Scene):
    c.img.paste(_gradient(c.S, (64, 176, 224), (12, 56, 124)))
    for _ in range(3):
        x = c.u(0, 1)
        c.poly([(x, 0), (x + 0.08, 0), (x + 0.2, 0.7), (x + 0.12, 0.7)], (78, 164, 214), outline=False)
    sand = c.wavy(c.u(0.84, 0.9), 0.015, 2.0, c.u(0, 6.3))
    c.poly(sand + [(1, 1), (0, 1)], (214, 196, 140), outline=False)
    for _ in range(int(c.r.integers(3, 6))):
        x, h = c.u(0, 1), c.u(0.25, 0.45)
        ph = c.u(0, 6.3)
        c.line([(x + 0.025 * math.sin(ph + 7 * t), 0.95 - h * t) for t in np.linspace(0, 1, 8).tolist()], (40, 150, 80), 0.025)
    for _ in range(2):
        x, y = c.u(0.05, 0.95), c.u(0.86, 0.95)
        for dx, dy in ((0, 0), (-0.03, -0.03), (0.03, -0.035), (0, -0.06)):
            c.ellipse(x + dx, y + dy, 0.03, 0.03, (244, 110, 130))
    for _ in range(int(c.r.integers(2, 4))):
        x, y, col = c.u(0.08, 0.92), c.u(0.1, 0.6), [(250, 150, 40), (252, 220, 60), (240, 90, 90)][int(c.r.integers(3))]
        d = 1 if c.r.random() < 0.5 else -1
        c.poly([(x - d * 0.04, y), (x - d * 0.08, y - 0.03), (x - d * 0.08, y + 0.03)], col)
        c.ellipse(x, y, 0.05, 0.03, col)
        c.ellipse(x + d * 0.025, y - 0.005, 0.007, 0.007, INK, outline=False)
    for _ in range(9):
        r = c.u(0.01, 0.03)
        c.ellipse(c.u(0, 1), c.u(0, 0.8), r, r, None, outline=(220, 240, 255))


_SCENE_DRAW = {
    "beach": _beach,
    "forest": _forest,
    "city street": _city,
    "snow field": _snow,
    "living room": _living_room,
    "desert": _desert,
    "night sky": _night,
    "underwater": _underwater,
}


# ----------------------------------------------------------------------------------------------------- styles


@lru_cache(maxsize=16)
def _texture(S: int, kind: str) -> np.ndarray:
    """Fixed textures (seeded once, never per image): paper grain, pencil hatching, photo grain. Values in [0, 1]."""
    rng = np.random.default_rng({"paper": 11, "hatch": 12, "grain": 13}[kind])
    if kind == "hatch":  # channel 0: diagonal strokes, channel 1: the crossing strokes
        y, x = np.mgrid[0:S, 0:S]
        period = max(4, S // 16)
        width = max(1, period // 3)
        return np.stack([((x + y) % period) < width, ((x - y) % period) < width], axis=2).astype(np.float32)
    if kind == "grain":
        return rng.normal(0.0, 1.0, (S, S, 1)).astype(np.float32)
    small = rng.random((S // 4, S // 4)).astype(np.float32)
    coarse = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((S, S), Image.BICUBIC), np.float32) / 255.0
    fine = rng.random((S, S)).astype(np.float32)
    return (0.7 * coarse + 0.3 * fine)[:, :, None]


@lru_cache(maxsize=16)
def _vignette(S: int) -> np.ndarray:
    y, x = np.mgrid[0:S, 0:S].astype(np.float32) / (S - 1) - 0.5
    return (1.0 - 0.55 * (x * x + y * y))[:, :, None].astype(np.float32)


@lru_cache(maxsize=16)
def _paper_border(S: int) -> np.ndarray:
    """Soft irregular mask of the painted area of a watercolor: unpainted paper shows at the edges."""
    rng = np.random.default_rng(14)
    y, x = np.mgrid[0:S, 0:S].astype(np.float32) / (S - 1)
    edge = np.minimum(np.minimum(x, 1 - x), np.minimum(y, 1 - y))
    wobble = np.asarray(Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).resize((S, S), Image.BICUBIC), np.float32) / 255.0
    return np.clip((edge - 0.015 - 0.03 * wobble) / 0.03, 0.0, 1.0)[:, :, None]


def _blur(arr: np.ndarray, factor: int) -> np.ndarray:
    """A cheap blur: box-reduce by ``factor``, bilinear back up."""
    S = arr.shape[0]
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return np.asarray(img.reduce(factor).resize((S, S), Image.BILINEAR), np.float32)


def _chmax(a: np.ndarray) -> np.ndarray:
    """Max over the colour axis (much faster than ``a.max(axis=2)`` for 3 channels)."""
    return np.maximum(np.maximum(a[..., 0], a[..., 1]), a[..., 2])


def _edges(arr: np.ndarray) -> np.ndarray:
    """Max-over-channels absolute colour difference to the right and lower neighbours, shape (S, S)."""
    e = np.zeros(arr.shape[:2], np.float32)
    dx = _chmax(np.abs(arr[:, 1:] - arr[:, :-1]))
    dy = _chmax(np.abs(arr[1:] - arr[:-1]))
    e[:, 1:] = dx
    e[:, :-1] = np.maximum(e[:, :-1], dx)
    e[1:] = np.maximum(e[1:], dy)
    e[:-1] = np.maximum(e[:-1], dy)
    return e


def _roll(tex: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    S = tex.shape[0]
    return np.roll(tex, (int(rng.integers(S)), int(rng.integers(S))), axis=(0, 1))


def _style_pass(style: str, img: Image.Image, rng: np.random.Generator, subject_mask: np.ndarray | None,
                symbols: np.ndarray | None = None) -> np.ndarray:
    """The style applied to the whole 2x image; returns float32 RGB in [0, 255] (not yet clipped). ``symbols``: the
    emotion symbols drawn alone, (S, S, 4) RGBA, which a pencil sketch draws in coloured pencil."""
    arr = np.asarray(img, np.float32)
    S = arr.shape[0]
    if style == "photo":
        arr = arr * _vignette(S) + _roll(_texture(S, "grain"), rng) * 5.0
        return arr * np.asarray([1.0, 0.98, 0.94], np.float32)
    if style == "cartoon":
        lum = ((arr[:, :, 0] + arr[:, :, 1] + arr[:, :, 2]) * (1.0 / 3.0))[:, :, None]
        return lum + (arr - lum) * 1.3
    if style == "pencil sketch":
        lum = (arr @ np.asarray([0.299, 0.587, 0.114], np.float32))[:, :, None]
        line = np.clip(_edges(arr)[:, :, None] / 90.0, 0, 1)
        dark = 1.0 - lum / 255.0
        hatch = _roll(_texture(S, "hatch"), rng)
        strokes = np.maximum(hatch[:, :, :1] * (dark > 0.2), hatch[:, :, 1:] * (dark > 0.55))
        paper = np.asarray([246, 243, 234], np.float32) * (0.96 + 0.04 * _roll(_texture(S, "paper"), rng))
        graphite = np.clip(0.85 * line + dark * (0.45 + 0.4 * strokes), 0, 1)
        sketch = paper * (1 - graphite) + np.asarray([50, 50, 58], np.float32) * graphite
        if symbols is None:
            return sketch
        # the emotion symbol in coloured pencil, its outline in graphite: in grey alone only its outline told the
        # expressions apart, and the base model drew the prompted one in 31 % of pencil sketches (docs/toyworld.md)
        cover = symbols[:, :, 3:] / 255.0
        tint = paper - (paper - symbols[:, :, :3]) * (0.8 + 0.2 * hatch[:, :, :1])
        tint = tint * (1 - 0.85 * line) + np.asarray([50, 50, 58], np.float32) * 0.85 * line
        return sketch * (1 - cover) + tint * cover
    if style == "watercolor":
        soft = _blur(arr, 2)
        edge = np.clip(_edges(_blur(arr, 4))[:, :, None] / 60.0, 0, 1)
        wash = 255.0 - (255.0 - soft) * 0.78
        wash = wash * (1 - 0.22 * edge)
        paper = np.asarray([250, 247, 240], np.float32)
        grain = _roll(_texture(S, "paper"), rng)
        wash = wash * (0.88 + 0.14 * grain)
        mask = _paper_border(S)
        return wash * mask + paper * (1 - mask)
    if style == "neon":
        e = np.clip(_edges(arr)[:, :, None] / 60.0, 0, 1)
        peak = np.maximum(_chmax(arr), 1.0)[:, :, None]
        vivid = arr / peak * 255.0
        vivid = np.where(peak < 70, np.asarray([120, 140, 255], np.float32), vivid)
        glow_src = vivid * e
        glow = _blur(glow_src, 4)
        dim = np.asarray([0.1, 0.1, 0.16], np.float32)
        base = arr * (dim if subject_mask is None else dim + 0.32 * subject_mask)
        return base + glow_src * 0.75 + glow * 1.1
    return arr  # pixel art: handled after the reduction


@lru_cache(maxsize=1)
def _pixel_palette() -> Image.Image:
    colors: list[RGB] = []
    for table in (SKIN, HAIR, SHIRT, FUR, MARK, MARK_ON_SAME_FUR, ACCESSORY):
        colors.extend(table.values())
    colors += [INK, WHITE, PINK, TEAR, MOUTH, TONGUE, BEAK, ZZZ, EYE]
    colors += [(g, g, g) for g in (60, 100, 140, 180, 215)]
    for r in (0, 85, 170, 255):  # a coarse RGB cube for scenes
        for g in (0, 85, 170, 255):
            for b in (0, 85, 170, 255):
                colors.append((r, g, b))
    colors += [(96, 170, 236), (30, 118, 200), (240, 214, 156), (92, 164, 62), (24, 96, 52), (246, 249, 254), (164, 106, 60), (250, 170, 92), (12, 56, 124), (44, 46, 104)]
    colors = list(dict.fromkeys(colors))[:256]
    flat = [v for c in colors for v in c]
    flat += flat[:3] * (256 - len(colors))
    pal = Image.new("P", (1, 1))
    pal.putpalette(flat)
    return pal


def _pixelate(img: Image.Image) -> Image.Image:
    size = img.size[0]
    grid = 32 if size >= 64 else max(8, size // 2)
    small = img.resize((grid, grid), Image.BOX)
    small = small.quantize(palette=_pixel_palette(), dither=Image.Dither.NONE).convert("RGB")
    return small.resize((size, size), Image.NEAREST)


# --------------------------------------------------------------------------------------------------- placement


def _extent(identity: Identity) -> float:
    """The height of the subject's drawing (top of hair / ears) in subject units, used to normalise sizes."""
    if identity.domain == "person":
        return {"curly": 0.97, "spiky": 0.98, "bun": 1.0, "mohawk": 1.04}.get(identity.value("hair_style"), 0.9)
    (_, _, _), (hy, _, hry) = _PET_BODY[identity.value("species")]
    ears = {"pointed": 0.17, "round": 0.07, "floppy": 0.0, "long": 0.38}[identity.value("ear_shape")]
    return hy + hry + ears


_X_RANGE = {
    "small": {"left": (0.16, 0.32), "center": (0.42, 0.58), "right": (0.68, 0.84)},
    "large": {"left": (0.24, 0.32), "center": (0.45, 0.55), "right": (0.68, 0.76)},
}


def _placement(identity: Identity, context: Context, rng: np.random.Generator, S: int):
    """(ox, oy, scale, angle, flip) of a subject for the context's position and size, with jitter inside the value."""
    size = context.name("size")
    h = float(rng.uniform(0.4, 0.48) if size == "small" else rng.uniform(0.74, 0.82))
    x = float(rng.uniform(*_X_RANGE[size][context.name("position")]))
    if size == "small":
        base = float(rng.uniform(0.8, 0.93))
    elif identity.domain == "person":
        base = float(rng.uniform(0.98, 1.04))
    else:
        base = float(rng.uniform(0.94, 0.98))
    angle = float(rng.uniform(-0.12, 0.12))
    flip = bool(rng.random() < 0.5)
    return x * S, base * S, h * S / _extent(identity), angle, flip


# ------------------------------------------------------------------------------------------------------ public

_TAGS = {"input": 1, "target": 2, "scene": 3, "layout": 4, "input-layout": 5}


def _rng(tag: str, seed: int, *parts: int) -> np.random.Generator:
    return np.random.default_rng([_TAGS[tag], int(seed) % 2**63, *parts])


def _check_size(size: int) -> int:
    size = int(size)
    if size < 32 or size % 16:
        raise ValueError(f"size must be a multiple of 16 and >= 32 (64 and 128 are the supported sizes), got {size}")
    return size


def _outline(style: str, scale: float) -> tuple[int, RGB | None]:
    if style == "cartoon":
        return max(2, round(0.026 * scale)), INK
    if style == "pixel art":
        return max(2, round(0.022 * scale)), INK
    if style == "pencil sketch":
        return max(1, round(0.012 * scale)), INK
    return 0, None


def _scene_outline(style: str, S: int) -> int:
    return {"cartoon": max(2, S // 64), "pixel art": max(1, S // 64), "pencil sketch": max(1, S // 128)}.get(style, 0)


def _compose(context: Context, S: int, rng: np.random.Generator, subjects) -> tuple[Image.Image, np.ndarray | None, np.ndarray | None]:
    """Scene, subjects ``[(identity, expression, (ox, oy, scale, angle, flip), head_tilt, look)]``, at 2x.

    Returns the flat image, for the styles that treat the subjects apart (photo, neon) their (S, S, 1) alpha, and for
    the pencil sketch, which keeps their colour, the emotion symbols drawn alone ((S, S, 4) RGBA).
    """
    style = context.name("style")
    img = Image.new("RGB", (S, S))
    _SCENE_DRAW[context.name("scene")](_Scene(img, rng, _scene_outline(style, S)))
    layered = style in ("photo", "neon")
    if context.name("scene") == "night sky":  # a soft moonlit halo behind each subject keeps dark fur and hair visible
        q = 4
        halo = Image.new("L", (S // q, S // q), 0)
        hd = ImageDraw.Draw(halo)
        for identity, _, (ox, oy, scale, _, _), _, _ in subjects:
            h = scale * _extent(identity)
            cx, cy, rx, ry = ox / q, (oy - 0.55 * h) / q, 0.55 * h / q, 0.6 * h / q
            hd.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=150)
        halo = halo.resize((S, S), Image.BILINEAR).filter(ImageFilter.BoxBlur(max(1, S // 32)))
        img = Image.composite(Image.new("RGB", (S, S), (120, 132, 190)), img, halo)
    if style == "photo":  # contact shadows, then depth of field on the background
        d = ImageDraw.Draw(img)
        for _, _, (ox, oy, scale, _, _), _, _ in subjects:
            if oy < S * 0.97:
                col = _dark(img.getpixel((int(min(max(ox, 0), S - 1)), int(min(oy, S - 1)))), 0.62)
                d.ellipse((ox - 0.38 * scale, oy - 0.05 * scale, ox + 0.38 * scale, oy + 0.05 * scale), fill=col)
        img = Image.fromarray(np.clip(_blur(np.asarray(img, np.float32), 4 if S >= 128 else 2), 0, 255).astype(np.uint8))
    layer = Image.new("RGBA", (S, S), (0, 0, 0, 0)) if layered else img
    draw = ImageDraw.Draw(layer)
    symbols = Image.new("RGBA", (S, S), (0, 0, 0, 0)) if style == "pencil sketch" else None
    if symbols is not None:
        draw.symbols = ImageDraw.Draw(symbols)  # _emote draws each symbol here too
    for identity, expression, (ox, oy, scale, angle, flip), head_tilt, look in subjects:
        ow, oc = _outline(style, scale)
        boost = 1.3 if scale * _extent(identity) < 0.6 * S else 1.0
        _draw_subject(_Pen(draw, ox, oy, scale, angle, flip, ow, oc), identity, expression, head_tilt, look, boost)
    if not layered:
        return img, None, None if symbols is None else np.asarray(symbols, np.float32)
    rgba = np.asarray(layer, np.float32)
    alpha = rgba[:, :, 3:] / 255.0
    subject = rgba[:, :, :3]
    if style == "photo":  # soft shading: darker towards the silhouette's edges and towards the bottom
        soft = _blur(np.repeat(rgba[:, :, 3:], 3, axis=2), 4)[:, :, :1] / 255.0
        ramp = np.linspace(1.1, 0.86, S, dtype=np.float32)[:, None, None]
        subject = subject * (0.72 + 0.28 * soft) * ramp
    out = np.asarray(img, np.float32) * (1 - alpha) + subject * alpha
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)), alpha, None


def _finish(style: str, img: Image.Image, mask: np.ndarray | None, rng: np.random.Generator,
            symbols: np.ndarray | None = None) -> Image.Image:
    arr = _style_pass(style, img, rng, mask, symbols)
    out = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8)).reduce(2)
    return _pixelate(out) if style == "pixel art" else out


def _pose(identity: Identity, rng: np.random.Generator) -> tuple[float, float]:
    tilt = float(rng.uniform(-0.12, 0.12)) if identity.domain == "person" else 0.0
    return tilt, float(rng.uniform(-1.0, 1.0))


def render_target(identity: Identity, context: Context, size: int = 64, seed: int = 0, *, layout_seed: int | None = None) -> Image.Image:
    """The subject in the prompted context: scene, style over the whole image, expression, position and size.

    Jitter (inside each factor value): position and size ranges, rotation, mirroring, head tilt, gaze, and the
    scene's own layout; drawn from (seed, identity, context). With ``layout_seed`` the jitter comes from
    ``layout_seed`` alone (``seed`` is ignored): the same layout_seed gives the same scene layout and pose for every
    identity and every value of the other factors, for controlled comparisons. ``size`` x ``size`` RGB; 64 and 128
    are supported.
    """
    return _target(identity, context, size, seed, layout_seed, with_mask=False)[0]


def render_target_with_mask(identity: Identity, context: Context, size: int = 64, seed: int = 0, *,
                            layout_seed: int | None = None) -> tuple[Image.Image, np.ndarray]:
    """``render_target``'s image (the same pixels) and the subject's silhouette: (size, size) float32 coverage in [0, 1]
    (the subject as drawn, expression symbols included, before the style pass)."""
    return _target(identity, context, size, seed, layout_seed, with_mask=True)


def render_target_with_masks(identity: Identity, context: Context, size: int = 64, seed: int = 0, *,
                             layout_seed: int | None = None) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """``render_target_with_mask``'s image and silhouette, and the expression's emotion symbol: (size, size) float32
    coverage in [0, 1] of what the symbol adds to the silhouette (the subject drawn with its expression minus drawn
    without; the face inside the head adds nothing)."""
    image, mask, subject = _target(identity, context, size, seed, layout_seed, with_mask=True, keep_subject=True)
    identity, _, place, tilt, look = subject
    bare = _silhouette(context.name("style"), 2 * size, (identity, None, place, tilt, look))
    return image, mask, np.clip(mask - bare, 0.0, 1.0)


def _target(identity: Identity, context: Context, size: int, seed: int, layout_seed: int | None, with_mask: bool,
            keep_subject: bool = False):
    S = 2 * _check_size(size)
    if layout_seed is None:
        rng = _rng("target", seed, DOMAINS.index(identity.domain), identity.index, *context.values)
    else:
        rng = _rng("layout", layout_seed)
    place = _placement(identity, context, rng, S)
    tilt, look = _pose(identity, rng)
    subject = (identity, context.name("expression"), place, tilt, look)
    img, mask, symbols = _compose(context, S, rng, [subject])
    image = _finish(context.name("style"), img, mask, rng, symbols)
    if not with_mask:
        return image, None
    mask = _silhouette(context.name("style"), S, subject)
    return (image, mask, subject) if keep_subject else (image, mask)


def _silhouette(style: str, S: int, subject) -> np.ndarray:
    """The coverage of one subject drawn alone on a transparent layer at 2x, averaged down to the image size."""
    identity, expression, (ox, oy, scale, angle, flip), head_tilt, look = subject
    layer = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    ow, oc = _outline(style, scale)
    boost = 1.3 if scale * _extent(identity) < 0.6 * S else 1.0
    _draw_subject(_Pen(ImageDraw.Draw(layer), ox, oy, scale, angle, flip, ow, oc), identity, expression, head_tilt, look, boost)
    alpha = np.asarray(layer, np.float32)[:, :, 3] / 255.0
    return alpha.reshape(S // 2, 2, S // 2, 2).mean((1, 3))


_INPUT_BACKGROUNDS: tuple[RGB, ...] = ((238, 236, 230), (226, 233, 242), (242, 232, 220), (230, 238, 228), (236, 230, 238))


def render_input(identity: Identity, size: int = 64, seed: int = 0, *, layout_seed: int | None = None) -> Image.Image:
    """The "input view": the subject centred on a plain light background, calm face, like an aligned crop.

    Persons: head and shoulders, large; pets: the whole animal. Seeded jitter: a few pixels of shift, a few percent of
    scale, a few degrees of rotation, mirroring, lighting (brightness and colour cast), background tint. As in
    ``render_target``, ``layout_seed`` makes the jitter independent of the identity.
    """
    size = _check_size(size)
    S = 2 * size
    if layout_seed is None:
        rng = _rng("input", seed, DOMAINS.index(identity.domain), identity.index)
    else:
        rng = _rng("input-layout", layout_seed)
    bg = _INPUT_BACKGROUNDS[int(rng.integers(len(_INPUT_BACKGROUNDS)))]
    img = Image.new("RGB", (S, S), _mix(bg, WHITE, float(rng.uniform(0.0, 0.4))))
    extent = _extent(identity)
    if identity.domain == "person":
        scale = S * float(rng.uniform(1.0, 1.1))
        ox, oy = S * (0.5 + float(rng.uniform(-0.04, 0.04))), S * (0.42 + float(rng.uniform(-0.03, 0.03))) + 0.64 * scale
    else:
        scale = S * 0.84 / extent * float(rng.uniform(0.94, 1.04))
        ox, oy = S * (0.47 + float(rng.uniform(-0.04, 0.04))), S * (0.92 + float(rng.uniform(-0.03, 0.03)))
    angle, flip = float(rng.uniform(-0.07, 0.07)), bool(rng.random() < 0.5)
    ow = max(1, round(0.012 * scale))
    _draw_subject(_Pen(ImageDraw.Draw(img), ox, oy, scale, angle, flip, ow, None), identity, None, 0.0, float(rng.uniform(-0.5, 0.5)))
    light = float(rng.uniform(0.9, 1.06)) * (1.0 + rng.uniform(-0.04, 0.04, 3)).astype(np.float32)
    arr = np.asarray(img, np.float32) * light
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8)).reduce(2)


# The pet's height in a scene, as a fraction of the frame (the fifth build's; up to the fourth 0.3 / 0.45, where the
# pet identity network recognized the pet in only 38.5 % of real scenes, here in 68 %; docs/toyworld.md).
_SCENE_PET_HEIGHT = {"small": 0.4, "large": 0.6}


def render_scene(person: Identity, pet: Identity, context: Context, size: int = 64, seed: int = 0, pet_expression: int | None = None) -> Image.Image:
    """A person and a pet in one scene. Position and size refer to the person; the pet (smaller, ``_SCENE_PET_HEIGHT``)
    stands beside, on the side with more room. ``pet_expression`` (an index into the expression factor) defaults to
    the context's."""
    if person.domain != "person" or pet.domain != "pet":
        raise ValueError("render_scene takes a person identity and a pet identity")
    S = 2 * _check_size(size)
    rng = _rng("scene", seed, person.index, pet.index, *context.values, 0 if pet_expression is None else 1 + int(pet_expression))
    place = _placement(person, context, rng, S)
    ox, oy, scale, _, _ = place
    pet_h = _SCENE_PET_HEIGHT[context.name("size")] * float(rng.uniform(0.95, 1.05))
    pet_scale = pet_h * S / _extent(pet)
    side = 1.0 if ox < S / 2 else -1.0
    if context.name("position") == "center":
        side = 1.0 if rng.random() < 0.5 else -1.0
    px = ox + side * (0.3 * scale + 0.3 * pet_scale)
    px = min(max(px, 0.32 * pet_scale), S - 0.32 * pet_scale)
    py = min(S * 0.97, (oy if context.name("size") == "small" else S * 0.97) + float(rng.uniform(0.0, 0.04)) * S)
    pet_place = (px, py, pet_scale, float(rng.uniform(-0.1, 0.1)), side < 0)
    tilt, look = _pose(person, rng)
    pet_expr = context.name("expression") if pet_expression is None else CONTEXT_FACTORS["expression"][int(pet_expression)]
    subjects = [(person, context.name("expression"), place, tilt, look), (pet, pet_expr, pet_place, 0.0, 0.0)]
    img, mask, symbols = _compose(context, S, rng, subjects)
    return _finish(context.name("style"), img, mask, rng, symbols)


# ------------------------------------------------------------------------------------------------------- docs

# Fixed, varied identities for the documentation grid: 3 persons and one pet of 4 species.
EXAMPLE_IDENTITIES: tuple[tuple[str, dict[str, str]], ...] = (
    ("person", dict(face_shape="round", skin_tone="light", hair_style="long", hair_color="blonde", eyewear="none",
                    facial_hair="none", shirt_color="red", shirt_pattern="stripes")),
    ("person", dict(face_shape="square", skin_tone="dark", hair_style="mohawk", hair_color="blue",
                    eyewear="square glasses", facial_hair="beard", shirt_color="yellow", shirt_pattern="star")),
    ("person", dict(face_shape="pointed", skin_tone="tan", hair_style="bun", hair_color="red", eyewear="round glasses",
                    facial_hair="moustache", shirt_color="blue", shirt_pattern="dots")),
    ("pet", dict(species="cat", ear_shape="pointed", fur_color="ginger", markings="stripes", marking_color="brown",
                 tail="long", accessory="red collar")),
    ("pet", dict(species="dog", ear_shape="floppy", fur_color="white", markings="spots", marking_color="black",
                 tail="bushy", accessory="blue bandana")),
    ("pet", dict(species="rabbit", ear_shape="long", fur_color="grey", markings="belly patch", marking_color="white",
                 tail="stub", accessory="none")),
    ("pet", dict(species="bird", ear_shape="round", fur_color="golden", markings="socks", marking_color="black",
                 tail="curly", accessory="yellow bow tie")),
)


def example_context(row: int, column: int) -> Context:
    """The context of grid cell (row, column): column = scene, the other factors rotate so that all values show."""
    counts = [len(v) for v in CONTEXT_FACTORS.values()]
    scene = column % counts[0]
    style = (column + row) % counts[1]
    expression = (column + 2 * row) % counts[2]
    position = (column + 2 * row) % counts[3]
    size = column % counts[4]
    return Context((scene, style, expression, position, size))


def render_example_grid(
    identities: list[Identity] | None = None,
    contexts: list[Context] | None = None,
    size: int = 64,
    seed: int = 0,
    pad: int = 2,
    pairs: bool = True,
) -> Image.Image:
    """A sample sheet. One row per identity: its input view, then its target renders (``contexts`` for every row, or
    by default ``example_context(row, column)`` for the 8 scenes). With ``pairs``, a last row of ``render_scene``
    images pairing the first person and the first pet in the same default contexts."""
    from .world import identity_from_names

    if identities is None:
        identities = [identity_from_names(d, **values) for d, values in EXAMPLE_IDENTITIES]
    columns = len(contexts) if contexts is not None else len(SCENES)
    rows: list[list[Image.Image]] = []
    for r, identity in enumerate(identities):
        row = [render_input(identity, size, seed)]
        for c in range(columns):
            context = contexts[c] if contexts is not None else example_context(r, c)
            row.append(render_target(identity, context, size, seed))
        rows.append(row)
    persons = [i for i in identities if i.domain == "person"]
    pets = [i for i in identities if i.domain == "pet"]
    if pairs and persons and pets:
        row = [render_input(pets[0], size, seed)]
        for c in range(columns):
            context = contexts[c] if contexts is not None else example_context(len(identities), c)
            row.append(render_scene(persons[0], pets[0], context, size, seed))
        rows.append(row)
    gap = size // 8  # the input-view column stands apart from the targets
    width = pad + (size + pad) * (columns + 1) + gap
    sheet = Image.new("RGB", (width, pad + (size + pad) * len(rows)), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            sheet.paste(tile, (pad + c * (size + pad) + (gap if c else 0), pad + r * (size + pad)))
    return sheet


if __name__ == "__main__":  # python -m nested_attention_toy.render docs/toyworld-samples.png
    import sys

    render_example_grid().save(sys.argv[1] if len(sys.argv) > 1 else "toyworld-samples.png", optimize=True)
