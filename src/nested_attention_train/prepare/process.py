"""One photo -> its training files (subject crop, target) and metadata record, or the reason it is skipped.

Runs in the worker processes: :func:`prepare_one` takes plain values and returns an outcome dict (:func:`kept` or
:func:`skipped`) that the runner writes to its log. Files are written under a temporary name and renamed, so an interrupted run never
leaves a half-written image under its final name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from nested_attention.errors import NestedAttentionError
from nested_attention.images import decode_image

from .crops import aligned_face, mask_box, on_white, pet_square, square_around
from .faces import Face, FaceDetector
from .settings import IMAGE_SUFFIXES, PrepareSettings

SUBJECTS, TARGETS = "subjects", "targets"
JPEG_QUALITY = 95
SECOND_FACE = 0.5  # see counted_faces

# reasons a photo is not used: input errors (--strict stops at the first) and photos filtered out
ERRORS = ("unreadable", "unreadable_mask", "no_caption", "no_subject_word")
FILTERED = ("duplicate", "small_image", "no_face", "several_faces", "small_face", "no_eyes", "empty_mask")


@dataclass(frozen=True)
class Task:
    """One photo to prepare: its path relative to the input folder, its content key, and its rewritten prompt."""

    relative: str
    path: str
    key: str  # the first 16 hex digits of the file's SHA-256: the output files' names
    prompt: str


def kept(task: Task, record: dict, notes: list[str]) -> dict:
    """The outcome of a prepared photo: its metadata.jsonl `record`, and `notes` such as "eyes_from_box"."""
    return {"file": task.relative, "status": "kept", "record": record, "notes": notes}


def skipped(relative: str, reason: str, message: str) -> dict:
    """The outcome of a photo that is not used: `reason` one of ERRORS or FILTERED, `message` one sentence."""
    return {"file": relative, "status": "skipped", "reason": reason, "message": message}


_detectors: dict[int, FaceDetector] = {}  # per process, by the smallest face they find


def prepare_one(task: Task, settings: PrepareSettings, out: str) -> dict:
    """Prepare one photo into `out`; returns the outcome (never raises for a bad photo)."""
    try:
        image = decode_image(task.path, f"the photo {task.relative}")
    except NestedAttentionError as error:
        return skipped(task.relative, "unreadable", str(error))
    if min(image.size) < settings.min_side:
        return skipped(task.relative, "small_image",
                       f"the photo {task.relative} is {image.width}x{image.height}; its short side must be at least "
                       f"{settings.min_side} pixels (min_side).")
    if settings.domain == "person":
        return _person(task, image, settings, Path(out))
    return _pet(task, image, settings, Path(out))


def _person(task: Task, image: Image.Image, settings: PrepareSettings, out: Path) -> dict:
    """Aligned face crop -> prompt -> the photo squared around the face."""
    least = max(12, settings.min_face // 2)  # smaller faces are found too, to say why a photo is skipped
    if least not in _detectors:
        _detectors[least] = FaceDetector(min_detect=least)
    pixels = np.asarray(image)
    found = _detectors[least](pixels)
    faces = counted_faces(found, settings.min_face)
    if not faces:
        if found:
            return skipped(task.relative, "small_face",
                           f"the face in {task.relative} is {found[0].size:.0f} pixels wide; faces under "
                           f"{settings.min_face} pixels (min_face) are dropped.")
        return skipped(task.relative, "no_face", f"no face was found in {task.relative}.")
    if len(faces) > 1 and not settings.keep_largest_face:
        return skipped(task.relative, "several_faces",
                       f"{task.relative} shows {len(faces)} faces; one is needed (keep_largest_face keeps the "
                       f"largest).")
    if not faces[0].eyes_found and not settings.keep_faces_without_eyes:
        return skipped(task.relative, "no_eyes",
                       f"the eyes of the face in {task.relative} were not found, so it cannot be aligned "
                       f"(keep_faces_without_eyes keeps it upright).")
    face = faces[0]
    subject = f"{SUBJECTS}/{task.key}.png"
    target = f"{TARGETS}/{task.key}.jpg"
    _save(aligned_face(pixels, face, settings.subject_size), out / subject)
    _save(square_around(image, face.box, settings.resolution), out / target)
    record = {"subject": subject, "target": target, "prompt": task.prompt, "word": settings.word}
    return kept(task, record, [] if face.eyes_found else ["eyes_from_box"])


def counted_faces(found: list[Face], min_face: int) -> list[Face]:
    """The detections that count as faces, largest first: at least `min_face` wide, and either with their eyes
    found or at least SECOND_FACE times as wide as the largest. Small detections without eyes are mostly the
    cascade's false hits (on clothing, a flag) or far background people: they neither make a photo one of
    several faces nor replace its face."""
    faces = [face for face in found if face.size >= min_face]
    return [face for face in faces if face.eyes_found or face.size >= SECOND_FACE * faces[0].size]


def _pet(task: Task, image: Image.Image, settings: PrepareSettings, out: Path) -> dict:
    """The pet on white around its mask (or the whole photo squared) -> prompt -> the same image (as the paper)."""
    mask = None
    if settings.masks is not None:
        mask_file = find_mask(Path(settings.masks), task.relative)
        if mask_file is not None:
            try:
                mask = decode_image(mask_file, f"the mask {mask_file}").convert("L")
            except NestedAttentionError as error:
                return skipped(task.relative, "unreadable_mask", str(error))
            if mask.size != image.size:
                return skipped(task.relative, "unreadable_mask",
                               f"the mask {mask_file} is {mask.width}x{mask.height} but its photo is "
                               f"{image.width}x{image.height}; a mask must have the photo's size.")
    if mask is None:
        mask = _alpha(task.path)
    subject = f"{SUBJECTS}/{task.key}.png"
    notes = []
    if mask is None:
        box = (0, 0, image.width, image.height)
        crop = square_around(image, box, settings.resolution)
        notes.append("whole_image")
    else:
        box = mask_box(mask)
        if box is None:
            return skipped(task.relative, "empty_mask", f"the mask of {task.relative} is empty (no white pixels).")
        crop = pet_square(on_white(image, mask), box, settings.resolution)
    _save(crop, out / subject)
    record = {"subject": subject, "target": subject, "prompt": task.prompt, "word": settings.word}
    return kept(task, record, notes)


def find_mask(masks: Path, relative: str) -> Path | None:
    """The mask of photo `relative`: the same relative path under `masks`, with any image suffix."""
    stem = masks / Path(relative).with_suffix("")
    for suffix in IMAGE_SUFFIXES:
        for candidate in (stem.with_suffix(suffix), stem.with_suffix(suffix.upper())):
            if candidate.is_file():
                return candidate
    return None


def _alpha(path: str) -> Image.Image | None:
    """The alpha channel of a transparent photo, as a mask; None for an opaque one."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            return image.convert("RGBA").getchannel("A")
    return None


def _save(image: Image.Image, path: Path) -> None:
    """Write an image atomically (a temporary name in the same folder, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    if path.suffix == ".jpg":
        image.save(partial, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(partial, format="PNG")
    os.replace(partial, path)
