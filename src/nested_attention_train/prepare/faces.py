"""Face and eye detection with the Haar cascades that ship inside opencv-python-headless (``cv2.data``).

Why these (docs/data.md): they are the only face detector with landmarks whose weights ship inside a well-kept pip
package that installs from wheels here with no GPU packages and no weights fetched at run time. OpenCV's YuNet
needs an ONNX file that is not in the wheel, mediapipe's current wheels ship no models (0.10.21, the last checked
that does, needs numpy < 2), dlib builds from source, and the RetinaFace / InsightFace packages download their
weights.

The landmarks are the two eye centres, found by the eye cascade inside the upper part of each face box; when it
does not find one eye on each side, the eyes are placed where they sit in an upright face box
(:data:`BOX_EYES`) and the face is counted as ``eyes_from_box``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nested_attention.errors import NestedAttentionError

DETECT_SIDE = 1024  # detection runs on a copy at most this large: Haar cascades cost grows with the pixel count
BOX_EYES = ((0.27, 0.37), (0.73, 0.37))  # (x, y) of the eyes in an upright frontal face box, as fractions of it
EYE_REGION = (0.15, 0.6)  # the eyes are searched between these fractions of the box height
MIN_NEIGHBORS = 5  # the cascade's vote threshold: OpenCV's recommended value against false detections


@dataclass(frozen=True)
class Face:
    """One face in image pixels: its box (x, y, w, h) and eye centres (x, y), left then right in the image."""

    box: tuple[float, float, float, float]
    left_eye: tuple[float, float]
    right_eye: tuple[float, float]
    eyes_found: bool  # False: the eyes are BOX_EYES placed in the box

    @property
    def size(self) -> float:
        return min(self.box[2], self.box[3])


def opencv():
    """The cv2 module, or a NestedAttentionError that says how to install it."""
    try:
        import cv2
    except ImportError:
        raise NestedAttentionError(
            "Preparing person data needs OpenCV (its face and eye detectors); install it with "
            "pip install 'nested-attention[prepare]' (opencv-python-headless)."
        ) from None
    if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
        raise NestedAttentionError(
            f"OpenCV {cv2.__version__} has no Haar cascades (cv2.data); install opencv-python-headless 4.x: "
            f"pip install 'nested-attention[prepare]'."
        )
    return cv2


class FaceDetector:
    """Frontal faces and their eyes in RGB images (uint8 arrays (H, W, 3))."""

    def __init__(self, min_detect: int = 24):
        cv2 = opencv()
        cv2.setNumThreads(1)  # parallelism comes from --workers processes
        self._cv2 = cv2
        self._faces = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        self._eyes = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_eye.xml")
        if self._faces.empty() or self._eyes.empty():
            raise NestedAttentionError(
                f"OpenCV could not load its Haar cascades from {cv2.data.haarcascades}; reinstall "
                f"opencv-python-headless 4.x."
            )
        self.min_detect = min_detect

    def __call__(self, pixels: np.ndarray) -> list[Face]:
        """Every frontal face at least `min_detect` pixels wide (in image pixels), largest first."""
        cv2 = self._cv2
        gray = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
        scale = min(1.0, DETECT_SIDE / max(gray.shape))
        small = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else gray
        small = cv2.equalizeHist(small)
        least = max(12, round(self.min_detect * scale))
        boxes = self._faces.detectMultiScale(small, scaleFactor=1.1, minNeighbors=MIN_NEIGHBORS,
                                             minSize=(least, least))
        faces = [self._face(gray, tuple(float(v) / scale for v in box)) for box in boxes]
        return sorted(faces, key=lambda face: -face.size)

    def _face(self, gray: np.ndarray, box: tuple[float, float, float, float]) -> Face:
        """The face in `box` with its eyes: from the eye cascade when it finds a pair, else BOX_EYES."""
        x, y, w, h = box
        top, bottom = int(y + EYE_REGION[0] * h), int(y + EYE_REGION[1] * h)
        region = self._cv2.equalizeHist(np.ascontiguousarray(gray[top:bottom, int(x):int(x + w)]))
        least = max(8, round(w / 10))
        eyes = self._eyes.detectMultiScale(region, scaleFactor=1.05, minNeighbors=3, minSize=(least, least),
                                           maxSize=(round(w / 2.5), round(w / 2.5)))
        centres = [(x + ex + ew / 2, top + ey + eh / 2, ew) for ex, ey, ew, eh in eyes]
        pair = _eye_pair(centres, x + w / 2, w)
        if pair is None:
            (lx, ly), (rx, ry) = BOX_EYES
            return Face(box, (x + lx * w, y + ly * h), (x + rx * w, y + ry * h), eyes_found=False)
        return Face(box, pair[0], pair[1], eyes_found=True)


def _eye_pair(centres: list[tuple[float, float, float]], middle: float, width: float):
    """The most plausible (left, right) eye centres: one on each side of the box's middle, at most 35 degrees
    apart from level and 0.25 to 0.75 face widths apart, the largest such pair; None if there is none."""
    best, best_size = None, -1.0
    for lx, ly, lw in centres:
        for rx, ry, rw in centres:
            if not (lx < middle < rx):
                continue
            distance = float(np.hypot(rx - lx, ry - ly))
            level = abs(ry - ly) <= np.tan(np.radians(35)) * (rx - lx)
            if level and 0.25 * width <= distance <= 0.75 * width and lw + rw > best_size:
                best, best_size = ((lx, ly), (rx, ry)), lw + rw
    return best
