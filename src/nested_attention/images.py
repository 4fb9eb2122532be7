"""Reading subject images: one clear sentence for anything unusable, sensible conversion for the rest."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import NestedAttentionError

logger = logging.getLogger(__name__)

MIN_SIDE = 16
MAX_PIXELS = 8192 * 8192
UNREADABLE = (Image.DecompressionBombError, UnidentifiedImageError, OSError, SyntaxError, ValueError)


def check_size(image: Image.Image, name: str) -> None:
    """Refuse images below MIN_SIDE pixels on a side or above MAX_PIXELS (read from the header, not decoded)."""
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


def check_image_file(path: str | Path, name: str) -> None:
    """A quick check of an image file without decoding it: a readable header, the size limits, and (for PNG and
    other formats whose Pillow plugin verifies) complete, uncorrupted data."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                check_size(image, name)
                image.verify()
    except NestedAttentionError:
        raise
    except UNREADABLE as error:
        raise _unreadable(error, name) from None


def to_rgb(image: Image.Image, name: str = "the image") -> Image.Image:
    """Check a subject image's size and return it as RGB.

    Transparent images are composited onto white, which the paper found best for pets; grayscale, palette
    and 16-bit images are converted, and 32-bit float images (mode F) are scaled from 0-1 (or taken as 0-255). Images smaller than MIN_SIDE pixels on a side carry no identity to
    encode, and images above MAX_PIXELS would only be downscaled after costing gigabytes: both are refused.
    """
    check_size(image, name)
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
    if image.mode == "F":
        image = Image.fromarray(_to_uint8(np.asarray(image), name))
    return image.convert("RGB")


def _to_uint8(values: np.ndarray, name: str) -> np.ndarray:
    """Pixel values as uint8: uint8 unchanged, floats scaled from 0-1 (or, above 1, taken as 0-255); else refused."""
    if values.dtype == np.uint8:
        return values
    if values.dtype.kind != "f":
        raise NestedAttentionError(
            f"{name} holds {values.dtype} pixel values; expected uint8 (0-255) or floats (0-1). Convert it first."
        )
    values = values.astype(np.float32)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not (np.isfinite(low) and np.isfinite(high) and low >= 0 and high <= 255):
        raise NestedAttentionError(
            f"{name} holds float pixel values from {low:g} to {high:g}; expected 0-1 (or 0-255). Rescale it first."
        )
    scale = 255.0 if high <= 1.0 else 1.0
    return np.round(values * scale).astype(np.uint8)


def from_array(values, name: str) -> Image.Image:
    """A numpy array (H, W) or (H, W, C) or a torch tensor (C, H, W), C in 1, 3, 4, as an RGB image.

    Values are uint8 (0-255) or floats (0-1), the layouts of Pillow / imageio and torchvision respectively.
    """
    if hasattr(values, "detach"):  # a torch tensor: channels first
        values = values.detach().cpu()
        values = values.float().numpy() if values.is_floating_point() else values.numpy()
        if values.ndim == 3:
            values = values.transpose(1, 2, 0)
        layout = "(C, H, W)"
    else:
        values = np.asarray(values)
        layout = "(H, W, C)"
    if values.ndim == 3 and values.shape[2] == 1:
        values = values[:, :, 0]
    if not (values.ndim == 2 or (values.ndim == 3 and values.shape[2] in (3, 4))):
        raise NestedAttentionError(
            f"{name} has shape {tuple(values.shape)} after reading it as {layout}; expected one image: a numpy array "
            f"(H, W) or (H, W, 3 or 4), or a torch tensor (3 or 4, H, W)."
        )
    return to_rgb(Image.fromarray(_to_uint8(values, name)), name=name)


def as_image(value, name: str) -> Image.Image:
    """A subject image given through the API (path, PIL image, numpy array, torch tensor) as checked RGB."""
    if isinstance(value, (str, Path)):
        return load_image(value)
    if isinstance(value, Image.Image):
        return checked_rgb(value, name)
    if isinstance(value, np.ndarray) or hasattr(value, "detach"):
        return from_array(value, name)
    raise NestedAttentionError(
        f"{name} is {type(value).__name__}; expected a file path, a PIL image, a numpy array (H, W, C) or a torch "
        f"tensor (C, H, W)."
    )


def checked_rgb(image: Image.Image, name: str) -> Image.Image:
    """to_rgb(image), decoded now: a truncated or corrupt file fails here, in one sentence naming `name`."""
    try:
        checked = to_rgb(image, name=name)
        checked.load()
        return checked
    except NestedAttentionError:
        raise
    except UNREADABLE as error:
        raise _unreadable(error, name) from None


def _unreadable(error: Exception, name: str) -> NestedAttentionError:
    if isinstance(error, Image.DecompressionBombError):
        return NestedAttentionError(
            f"{name} is too large to decode safely ({error}); the limit is {MAX_PIXELS / 1e6:.0f} MP. Downscale it first."
        )
    return NestedAttentionError(
        f"{name} could not be read as an image ({error.__class__.__name__}: {error}). "
        f"Expected a PNG, JPEG, WebP or other format Pillow reads."
    )


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
    except UNREADABLE as error:
        raise _unreadable(error, name) from None
    return checked_rgb(image, name)


def load_image(path: str | Path, role: str = "Subject image") -> Image.Image:
    """Open an image file as RGB, or raise a NestedAttentionError that names the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise NestedAttentionError(f"{role} {path} does not exist or is not a file.")
    return decode_image(path, name=f"{role} {path}")
