"""Whole images: a subject (or a person and a pet) in a context, and the input view.

``render_target`` and ``render_scene`` return a ``Rendered``: the image and the coverage of what the prompt's words
name (the subject, its emotion symbol), for the word-grounding loss. Every image draws its jitter from one generator
seeded by a purpose tag, the seed, the identity and the context, so the same arguments give the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from ..world import CONTEXT_FACTORS, DOMAINS, SCENE_POSITIONS, Context, Identity
from .canvas import WHITE, Pen, check_size, mix, seeded
from .faces import draw_symbol
from .scenes import HALO, SCENES
from .styles import STYLES, pixelate
from .subjects import draw_subject, extent

# Centre x of a subject's head by position, as a fraction of the width.
POSITION_X = {"left": 0.3, "center": 0.5, "right": 0.7}
PERSON_UNIT = 0.165  # a person's head radius as a fraction of the frame height, in a target view
PET_HEIGHT = 0.8  # a pet's height (ears to paws) as a fraction of the frame height, in a target view
SYMBOL_RADIUS = 0.6  # the emotion symbol's half-size in the subject's units
SCENE_SIZE = (128, 64)  # (width, height) of a person + pet scene at the toy model's 64 pixels


@dataclass
class Rendered:
    """An image and, as (size, size) float32 coverage in [0, 1], its subject (for a person + pet scene, the person)
    and that subject's emotion symbol; in a scene also the pet's visible coverage (``pet``)."""

    image: Image.Image
    subject: np.ndarray
    symbol: np.ndarray
    pet: np.ndarray | None = None


@dataclass(frozen=True)
class Placement:
    """Where a subject is drawn on the canvas: its head centre (x, y) in px, its unit in px, whether mirrored."""

    x: float
    y: float
    unit: float
    flip: bool


def _coverage(layer: Image.Image) -> np.ndarray:
    alpha = np.asarray(layer, np.float32)[:, :, 3] / 255.0
    H, W = alpha.shape
    return alpha.reshape(H // 2, 2, W // 2, 2).mean((1, 3))


def _target_place(identity: Identity, position: str, S: int, rng: np.random.Generator, scale: float = 1.0) -> Placement:
    x = S * (POSITION_X[position] + float(rng.uniform(-0.03, 0.03)))
    flip = bool(rng.random() < 0.5)
    if identity.domain == "person":
        unit = S * PERSON_UNIT * scale * float(rng.uniform(0.95, 1.05))
        return Placement(x, S * float(rng.uniform(0.37, 0.43)) + (1 - scale) * 2.2 * unit, unit, flip)
    reach = extent(identity)
    unit = S * PET_HEIGHT * scale * float(rng.uniform(0.95, 1.03)) / (reach.top + reach.bottom)
    return Placement(x, S * float(rng.uniform(0.95, 0.98)) - reach.bottom * unit, unit, flip)


def _draw(canvas: Image.Image, identity: Identity, place: Placement, expression: str | None, outline: int,
          symbol_side: float, halo: tuple | None) -> tuple[np.ndarray, np.ndarray]:
    """Draw one subject (on its own layer) and its symbol (on another) onto ``canvas``; returns both coverages."""
    S = canvas.size[0]  # the width: the symbol stays inside the canvas
    if halo is not None:
        glow = Image.new("L", canvas.size, 0)
        Pen(glow, place.x, place.y, place.unit).ellipse(0.0, 0.8, 2.4, 2.6, 110, outline=False)
        canvas.paste(Image.new("RGB", canvas.size, halo), mask=glow.filter(ImageFilter.GaussianBlur(S / 24)))
    layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw_subject(Pen(layer, place.x, place.y, place.unit, place.flip, outline), identity, expression)
    symbol = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    if expression is not None:
        r = SYMBOL_RADIUS * place.unit
        sx = min(max(place.x + symbol_side * 1.85 * place.unit, r + 2), S - r - 2)
        sy = max(place.y - 1.3 * place.unit, r + 2)
        draw_symbol(Pen(symbol, 0.0, 0.0, place.unit, False, outline), expression, sx / place.unit, sy / place.unit,
                    SYMBOL_RADIUS)
    canvas.paste(layer, mask=layer)
    canvas.paste(symbol, mask=symbol)
    return _coverage(layer), _coverage(symbol)


def _finish(style: str, canvas: Image.Image, subject: np.ndarray, rng: np.random.Generator) -> Image.Image:
    cover = np.repeat(np.repeat(subject, 2, 0), 2, 1)[..., None]
    array = STYLES[style].finish(np.asarray(canvas, np.float32), cover, rng)
    image = Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8)).reduce(2)
    return pixelate(image) if style == "pixel art" else image


def _outline(style: str, S: int) -> int:
    width = STYLES[style].outline
    return max(1, round(width * S)) if width else 0


def _toward_room(x: float, S: int, rng: np.random.Generator) -> float:
    """+1 or -1: the side of ``x`` with more room in the frame (a coin toss near the centre)."""
    if abs(x - S / 2) < 0.05 * S:
        return 1.0 if rng.random() < 0.5 else -1.0
    return 1.0 if x < S / 2 else -1.0


def render_target(identity: Identity, context: Context, size: int = 64, seed: int = 0, *,
                  layout_seed: int | None = None) -> Rendered:
    """The subject in the prompted context: scene, style over the whole image, expression (face and emotion symbol)
    and position. Jitter inside each value: position and scale by a few percent, mirroring, the scene's layout.
    With ``layout_seed`` the jitter comes from it alone (``seed`` is ignored), the same for every identity and
    context: for controlled comparisons."""
    S = 2 * check_size(size)
    rng = (seeded("target", seed, DOMAINS.index(identity.domain), identity.index, *context.values)
           if layout_seed is None else seeded("target-layout", layout_seed))
    style, scene = context.name("style"), context.name("scene")
    canvas = Image.new("RGB", (S, S))
    outline = _outline(style, S)
    SCENES[scene](canvas, rng, outline)
    place = _target_place(identity, context.name("position"), S, rng)
    subject, symbol = _draw(canvas, identity, place, context.name("expression"), outline, _toward_room(place.x, S, rng),
                            HALO.get(scene))
    return Rendered(_finish(style, canvas, subject, rng), subject, symbol)


def render_scene(person: Identity, pet: Identity, context: Context, size: int = 64, seed: int = 0,
                 pet_expression: int | None = None) -> Rendered:
    """A person and a pet in one scene twice as wide as tall (``size`` x ``2 * size``), each in its own half and drawn
    as large as alone, so that both keep as many latent pixels as a subject alone. Position says the person's half
    (left or right: a scene has no centre, see `SCENE_POSITIONS`); the pet takes the other. ``pet_expression`` (an
    index into the expression factor) defaults to the context's. Coverages are (size, 2 * size)."""
    if person.domain != "person" or pet.domain != "pet":
        raise ValueError("render_scene takes a person identity and a pet identity")
    if context.name("position") not in SCENE_POSITIONS:
        raise ValueError(f"a scene puts the person in the left or the right half; got position "
                         f"{context.name('position')!r} (draw scene contexts with sample_context(rng, 'scene'))")
    S = 2 * check_size(size)
    extra = 0 if pet_expression is None else 1 + int(pet_expression)
    rng = seeded("scene", seed, person.index, pet.index, *context.values, extra)
    style, scene = context.name("style"), context.name("scene")
    canvas = Image.new("RGB", (2 * S, S))
    outline = _outline(style, S)
    SCENES[scene](canvas, rng, outline)
    halves = {"person": scene_half(context), "pet": 1 - scene_half(context)}
    places = {}
    for identity in (person, pet):
        place = _target_place(identity, "center", S, rng)
        places[identity.domain] = Placement(place.x + halves[identity.domain] * S, place.y, place.unit, place.flip)
    expression = CONTEXT_FACTORS["expression"][context["expression"] if pet_expression is None else int(pet_expression)]
    pet_cover, _ = _draw(canvas, pet, places["pet"], expression, outline, _toward_room(S / 2, S, rng), HALO.get(scene))
    subject, symbol = _draw(canvas, person, places["person"], context.name("expression"), outline,
                            _toward_room(S / 2, S, rng), HALO.get(scene))
    both = np.maximum(subject, pet_cover)  # what a photo keeps sharp and lights: both subjects
    return Rendered(_finish(style, canvas, both, rng), subject, symbol, pet=pet_cover * (1 - subject))


def scene_half(context: Context) -> int:
    """The half of a person + pet scene the person takes: 0 (left) or 1 (right)."""
    return SCENE_POSITIONS.index(context.name("position"))


def split_scene(image: Image.Image, context: Context) -> dict[str, Image.Image]:
    """A person + pet scene (rendered or generated for ``context``) cut into its halves: domain -> its square."""
    H = image.size[1]
    if image.size[0] != 2 * H:
        raise ValueError(f"a person + pet scene is twice as wide as tall; got {image.size[0]} x {H}")
    halves = [image.crop((0, 0, H, H)), image.crop((H, 0, 2 * H, H))]
    return {"person": halves[scene_half(context)], "pet": halves[1 - scene_half(context)]}


_INPUT_BACKGROUNDS = ((238, 236, 230), (226, 233, 242), (242, 232, 220), (230, 238, 228), (236, 230, 238))


def render_input(identity: Identity, size: int = 64, seed: int = 0, *, layout_seed: int | None = None) -> Image.Image:
    """The "input view", like an aligned crop: the subject centred on a plain light background, calm face, flat
    colours with thin outlines, larger than in any target. Jitter: a few pixels of shift, a few percent of scale,
    mirroring, lighting (brightness and colour cast), background tint; ``layout_seed`` as in ``render_target``."""
    S = 2 * check_size(size)
    rng = (seeded("input", seed, DOMAINS.index(identity.domain), identity.index)
           if layout_seed is None else seeded("input-layout", layout_seed))
    background = _INPUT_BACKGROUNDS[int(rng.integers(len(_INPUT_BACKGROUNDS)))]
    canvas = Image.new("RGB", (S, S), mix(background, WHITE, float(rng.uniform(0.0, 0.4))))
    x = S * (0.5 + float(rng.uniform(-0.03, 0.03)))
    if identity.domain == "person":
        unit = S * 0.2 * float(rng.uniform(0.96, 1.04))
        place = Placement(x, S * float(rng.uniform(0.41, 0.45)), unit, bool(rng.random() < 0.5))
    else:
        reach = extent(identity)
        unit = S * 0.88 * float(rng.uniform(0.96, 1.02)) / (reach.top + reach.bottom)
        place = Placement(x, S * 0.96 - reach.bottom * unit, unit, bool(rng.random() < 0.5))
    _draw(canvas, identity, place, None, max(1, S // 128), 1.0, None)
    light = float(rng.uniform(0.9, 1.06)) * (1.0 + rng.uniform(-0.04, 0.04, 3)).astype(np.float32)
    array = np.asarray(canvas, np.float32) * light
    return Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8)).reduce(2)
