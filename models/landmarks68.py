"""dlib's 68-point face landmarks, offline: the frontal face detector and the shape predictor that
``face-recognition-models`` ships (``shape_predictor_68_face_landmarks.dat``, trained on iBUG 300-W,
whose licence excludes commercial use: see README "Real faces").

Both are loaded once per process and used under one lock (dlib's objects are not documented as safe to
share between threads, and the dashboard serves several sessions from one process).
"""

from __future__ import annotations

import threading
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from core.align import DETECTION_MAX_SIDE
from core.errors import UserFacingError

MODEL_PACKAGE, MODEL_FILE = "face_recognition_models", "models/shape_predictor_68_face_landmarks.dat"
# dlib's detector box from the five points, fitted on skimage's astronaut (whole, flipped, halved, turned
# 10°): the box is square, centred between the eyes' midpoint and the mouth's, and about 1.1 × (eye
# distance + eyes-to-mouth distance) wide. The shape predictor was trained from boxes like these.
BOX_SIDE_PER_FACE_SCALE = 1.1
# A dlib detection is this face when its box overlaps the box built from the five points this much.
SAME_FACE_IOU = 0.3
UPSAMPLE_UP_TO_SIDE = 600  # the detector looks at a 2× copy of photos up to this side (faces ≥ 40 px)

_LOCK = threading.Lock()
_UNAVAILABLE = (
    "{what} not installed (pip install dlib-bin face-recognition-models): the face's alignment is not "
    "double-checked, and faces without a stored label map or a face parser get the landmark template's parts."
)


class DenseLandmarksUnavailable(UserFacingError):
    """dlib or its 68-point model is not installed; the caller falls back to the landmark template."""


class DenseLandmarks(NamedTuple):
    points: np.ndarray  # 68×2 (x, y) in photo pixels, iBUG order
    box: np.ndarray  # (x1, y1, x2, y2) the shape predictor started from
    dlib_detected: bool  # the box is dlib's own detection (else it was built from the five points)


@lru_cache(maxsize=1)
def _models() -> tuple[Any, Any, Any]:
    """dlib, its frontal face detector and the 68-point shape predictor (call under ``_LOCK``)."""
    try:
        import dlib
    except ImportError as error:
        raise DenseLandmarksUnavailable(_UNAVAILABLE.format(what="dlib is")) from error
    model = model_file()
    if model is None:
        raise DenseLandmarksUnavailable(_UNAVAILABLE.format(what="dlib's 68-point model is"))
    return dlib, dlib.get_frontal_face_detector(), dlib.shape_predictor(str(model))


def model_file() -> Path | None:
    """The 68-point model inside the installed ``face_recognition_models`` package, found without importing
    it (its ``__init__`` imports ``pkg_resources``, which new setuptools no longer has); None if absent."""
    spec = find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    return path if path.is_file() else None


def available() -> bool:
    """Whether dlib and its 68-point model load here."""
    try:
        with _LOCK:
            _models()
    except DenseLandmarksUnavailable:
        return False
    return True


def dlib_faces(image: np.ndarray) -> list[np.ndarray]:
    """Boxes (x1, y1, x2, y2, photo pixels) of the faces dlib's own frontal detector finds, largest first.

    Photos are searched at most ``DETECTION_MAX_SIDE`` pixels on their longest side, as MTCNN searches them.
    """
    image = _rgb(image)
    height, width = image.shape[:2]
    scale = min(1.0, DETECTION_MAX_SIDE / max(height, width))
    searched = image
    if scale < 1.0:
        small = (max(1, round(width * scale)), max(1, round(height * scale)))
        searched = np.asarray(Image.fromarray(image).resize(small, Image.Resampling.LANCZOS))
    upsample = 1 if max(searched.shape[:2]) <= UPSAMPLE_UP_TO_SIDE else 0
    with _LOCK:
        _, detector, _ = _models()
        found = detector(np.ascontiguousarray(searched), upsample)
    boxes = [np.array([r.left(), r.top(), r.right(), r.bottom()], dtype=np.float64) / scale for r in found]
    return sorted(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)


def box_from_five(five: np.ndarray) -> np.ndarray:
    """A dlib-like square box (x1, y1, x2, y2) around a face given by its five points (core.align's order)."""
    five = np.asarray(five, dtype=np.float64)
    eyes, mouth = five[:2].mean(axis=0), five[3:].mean(axis=0)
    scale = float(np.linalg.norm(five[1] - five[0]) + np.linalg.norm(mouth - eyes))
    centre, half = (eyes + mouth) / 2, BOX_SIDE_PER_FACE_SCALE * scale / 2
    return np.array([centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half])


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def shape_68(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """dlib's 68 points (68×2 float, photo pixels) of the face in ``box`` (x1, y1, x2, y2)."""
    image = _rgb(image)
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    with _LOCK:
        dlib, _, predictor = _models()
        shape = predictor(np.ascontiguousarray(image), dlib.rectangle(x1, y1, x2, y2))
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)


def landmarks_68(image: np.ndarray, five: np.ndarray) -> DenseLandmarks:
    """The 68 points of the face whose five points (core.align's order, photo pixels) are ``five``.

    The shape predictor starts from dlib's own detection of that face (the one overlapping the box
    built from the five points by at least ``SAME_FACE_IOU``); when dlib finds none, from that built
    box, so a face found by MTCNN always gets its 68 points.
    """
    guess = box_from_five(five)
    matches = [(box_iou(box, guess), box) for box in dlib_faces(image)]
    best = max(matches, key=lambda m: m[0], default=(0.0, guess))
    detected = best[0] >= SAME_FACE_IOU
    box = best[1] if detected else guess
    return DenseLandmarks(shape_68(image, box), box, detected)


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 H×W×3 image, got {image.dtype} {image.shape}")
    return image
