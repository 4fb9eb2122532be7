"""Reading subject images: one clear sentence for anything unusable, sensible conversion for the rest."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import NestedAttentionError

logger = logging.getLogger(__name__)

MIN_SIDE = 16
MAX_PIXELS = 8192 * 8192


def to_rgb(image: Image.Image, name: str = "the image") -> Image.Image:
    """Check a subject image's size and return it as RGB.

    Transparent images are composited onto white, which the paper found best for pets; grayscale, palette
    and 16-bit images are converted. Images smaller than MIN_SIDE pixels on a side carry no identity to
    encode, and images above MAX_PIXELS would only be downscaled after costing gigabytes: both are refused.
    """
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        raise NestedAttentionError(
            f"{name} is {width}x{height} pixels; an image needs at least {MIN_SIDE} pixels on each side. "
            f"Use a larger image."
        )
    if width * height > MAX_PIXELS:
        raise NestedAttentionError(
            f"{name} is {width}x{height} pixels ({width * height / 1e6:.0f} MP); the limit is "
            f"{MAX_PIXELS / 1e6:.0f} MP. Downscale it first: the encoder sees a few hundred pixels anyway."
        )
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        logger.info("%s has transparency; compositing it onto white.", name)
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda value: value / 256).convert("L")  # 16-bit to 8-bit
    return image.convert("RGB")


def decode_image(file: str | Path | bytes, name: str) -> Image.Image:
    """Decode an image file (or its bytes) as RGB, or raise a NestedAttentionError naming `name`.

    The file is read whole first, so no handle stays open on a refused image; huge images are refused from
    their header, before decoding.
    """
    try:
        data = file if isinstance(file, bytes) else Path(file).read_bytes()
        with warnings.catch_warnings():  # Pillow warns from 89 MP; to_rgb refuses from MAX_PIXELS, in one sentence
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        checked = to_rgb(image, name=name)
        checked.load()
        return checked
    except NestedAttentionError:
        raise
    except Image.DecompressionBombError as error:
        raise NestedAttentionError(
            f"{name} is too large to decode safely ({error}); the limit is {MAX_PIXELS / 1e6:.0f} MP. Downscale it first."
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise NestedAttentionError(
            f"{name} could not be read as an image ({error.__class__.__name__}: {error}). "
            f"Expected a PNG, JPEG, WebP or other format Pillow reads."
        ) from None


def load_image(path: str | Path, role: str = "Subject image") -> Image.Image:
    """Open an image file as RGB, or raise a NestedAttentionError that names the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise NestedAttentionError(f"{role} {path} does not exist or is not a file.")
    return decode_image(path, name=f"{role} {path}")
