"""Crops: the FFHQ-style aligned face (eyes level), the square target around the subject, the pet on white."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .faces import Face, opencv

# FFHQ's crop (Karras et al., ffhq-dataset's recreate_aligned_images): a square of side max(4 |eye_to_eye|,
# 3.6 |eye_to_mouth|) along the eye line, centred 0.1 eye_to_mouth below the eyes. The detector gives no mouth, so
# eye_to_mouth is taken perpendicular to the eye line with MOUTH_RATIO times the eye distance (about its length in
# adult faces), which leaves the eye distance as the side's measure, as in most FFHQ crops.
MOUTH_RATIO = 1.0
PET_MARGIN = 0.15  # the pet's square crop is its mask's box widened by this fraction on each side


def aligned_face(pixels: np.ndarray, face: Face, size: int) -> Image.Image:
    """The face rotated so that its eyes are level, cropped as FFHQ does and resized to (size, size).

    `pixels`: (H, W, 3) uint8 RGB. Parts of the square outside the photo are filled by reflecting it (as FFHQ's
    padding does, without its blur).
    """
    cv2 = opencv()
    left, right = np.asarray(face.left_eye, dtype=np.float64), np.asarray(face.right_eye, dtype=np.float64)
    eye_to_eye = right - left
    eye_to_mouth = np.array([-eye_to_eye[1], eye_to_eye[0]]) * MOUTH_RATIO  # perpendicular, pointing down (y down)
    x = eye_to_eye / np.hypot(*eye_to_eye) * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.array([-x[1], x[0]])
    centre = (left + right) / 2 + 0.1 * eye_to_mouth
    side = 2 * np.hypot(*x)
    shrink = min(1.0, 2 * size / side)  # downscale a large photo first, so the warp does not alias
    if shrink < 1.0:
        pixels = cv2.resize(pixels, None, fx=shrink, fy=shrink, interpolation=cv2.INTER_AREA)
    corners = np.array([centre - x - y, centre + x - y, centre + x + y]) * shrink  # top-left, top-right, bottom-right
    target = np.float32([[0, 0], [size, 0], [size, size]])
    matrix = cv2.getAffineTransform(np.float32(corners), target)
    warped = cv2.warpAffine(pixels, matrix, (size, size), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101)
    return Image.fromarray(warped)


def square_around(image: Image.Image, box: tuple[float, float, float, float], resolution: int) -> Image.Image:
    """The largest square of the photo centred on `box` (x, y, w, h) as far as the borders allow, resized to
    (resolution, resolution): the trainer's centre crop of it then keeps the whole subject."""
    width, height = image.size
    side = min(width, height)
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))


def on_white(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The photo composited onto white through `mask` (L, same size: 255 is the subject, 0 the background)."""
    white = Image.new("RGB", image.size, (255, 255, 255))
    return Image.composite(image.convert("RGB"), white, mask)


def mask_box(mask: Image.Image, threshold: int = 128) -> tuple[int, int, int, int] | None:
    """The (x, y, w, h) box of the mask's pixels at or above `threshold`, or None if there are none."""
    values = np.asarray(mask) >= threshold
    rows, cols = np.flatnonzero(values.any(axis=1)), np.flatnonzero(values.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def pet_square(image: Image.Image, box: tuple[int, int, int, int], resolution: int) -> Image.Image:
    """A white-padded square around the pet's mask box (widened by PET_MARGIN), resized to the resolution."""
    x, y, w, h = box
    side = int(round(max(w, h) * (1 + 2 * PET_MARGIN)))
    left, top = int(round(x + w / 2 - side / 2)), int(round(y + h / 2 - side / 2))
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    inside = image.crop((max(left, 0), max(top, 0), min(left + side, image.width), min(top + side, image.height)))
    canvas.paste(inside, (max(-left, 0), max(-top, 0)))
    return canvas.resize((resolution, resolution), Image.Resampling.LANCZOS)
