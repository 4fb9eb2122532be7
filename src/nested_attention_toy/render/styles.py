"""The style factor: how the whole image is drawn. Every style keeps the subject's colours readable (identity is
carried by colour and shape), and each repaints the image in its own way.

``STYLES`` maps a style name to a ``Style``: the outline width of shapes (as a fraction of the canvas) and a finishing
pass over the composed canvas (float RGB at twice the output size, the subjects' coverage, a generator). Pixel art
also snaps the reduced image to a coarse grid and a fixed palette (``pixelate``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from .canvas import seeded

Finish = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]
PIXEL_GRID = 16  # cells per image height: at 64 pixels, one cell per latent pixel of the 4x VAE


def _blur(array: np.ndarray, radius: float) -> np.ndarray:
    image = Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8))
    return np.asarray(image.filter(ImageFilter.GaussianBlur(radius)), np.float32)


def _grain(height: int, width: int, kind: str) -> np.ndarray:
    """A fixed texture (the same in every process): photo grain or watercolour paper, a square tile of the canvas
    height repeated across a wider canvas."""
    tile = _tile(height, kind)
    return np.tile(tile, (1, -(-width // height)))[:, :width]


@functools.cache
def _tile(size: int, kind: str) -> np.ndarray:
    rng = seeded(f"texture-{kind}", size)
    noise = rng.normal(0.0, 1.0, (size, size)).astype(np.float32)
    if kind == "paper":
        noise = _blur(noise[..., None].repeat(3, -1) * 40 + 128, 2.0)[..., 0] - 128
        noise /= noise.std() + 1e-6
    return noise


def _photo(canvas: np.ndarray, subject: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Depth of field (the background blurred), soft light from above on the subject, a vignette and grain."""
    S, W = canvas.shape[:2]
    out = canvas * subject + _blur(canvas, S / 64) * (1 - subject)
    y = np.linspace(0.0, 1.0, S, dtype=np.float32)[:, None, None]
    out = out * (1 - subject * (0.22 * y - 0.08))
    r = np.hypot(*np.meshgrid(np.linspace(-1, 1, W), np.linspace(-1, 1, S)))
    out = out * (1 - 0.18 * np.clip(r - 0.6, 0, None))[..., None]
    return out + 5.0 * _grain(S, W, "photo")[..., None]


def _cartoon(canvas: np.ndarray, subject: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Saturated flat colours (the bold outlines, about 1.5 pixels wide at 64, are drawn with the shapes)."""
    grey = canvas.mean(-1, keepdims=True)
    return grey + (canvas - grey) * 1.3


def _watercolor(canvas: np.ndarray, subject: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Soft washes on paper: colours bleed (blur) and pale a little, pigment pools at colour edges, paper grain."""
    S, W = canvas.shape[:2]
    soft = _blur(canvas, S / 90)
    paper = np.array([250, 245, 232], np.float32)
    soft = soft + (paper - soft) * 0.22
    grey = soft.mean(-1)
    edge = np.hypot(*np.gradient(_blur(grey[..., None].repeat(3, -1), S / 128)[..., 0]))
    soft = soft * (1 - np.clip(edge / 40.0, 0, 0.3))[..., None]
    return soft + 6.0 * _grain(S, W, "paper")[..., None]


def _pixel_art(canvas: np.ndarray, subject: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return canvas


@dataclass(frozen=True)
class Style:
    outline: float  # ink line width as a fraction of the canvas (0: no outlines)
    finish: Finish


STYLES: dict[str, Style] = {"photo": Style(0.0, _photo), "cartoon": Style(0.024, _cartoon),
                            "pixel art": Style(0.0, _pixel_art), "watercolor": Style(0.0, _watercolor)}


@functools.cache
def _palette() -> Image.Image:
    """32 fixed colours: greys, and hues at three lightness levels (a pixel-art palette)."""
    colors = [(0, 0, 0), (60, 60, 66), (130, 130, 136), (200, 200, 205), (255, 255, 255), (250, 225, 205), (225, 178, 130),
              (160, 104, 66), (92, 58, 38)]
    for hue in ((220, 40, 40), (250, 130, 30), (250, 215, 40), (60, 170, 70), (40, 90, 210), (135, 60, 180),
                (245, 120, 185), (90, 170, 240)):
        colors += [hue, tuple(int(c * 0.55) for c in hue), tuple(int(c + (255 - c) * 0.5) for c in hue)]
    flat = [v for c in colors[:32] for v in c]
    palette = Image.new("P", (1, 1))
    palette.putpalette(flat + [0] * (768 - len(flat)))
    return palette


def pixelate(image: Image.Image) -> Image.Image:
    """The image on a grid of palette colours ``PIXEL_GRID`` cells tall (as many per height across), scaled back up
    (nearest)."""
    small = image.resize((PIXEL_GRID * image.size[0] // image.size[1], PIXEL_GRID), Image.Resampling.BOX)
    snapped = small.quantize(palette=_palette(), dither=Image.Dither.NONE).convert("RGB")
    return snapped.resize(image.size, Image.Resampling.NEAREST)
