"""Label maps in the LaPa convention, from the best source available for an aligned face.

Preference: a label map stored with the dataset (what its results were scored with), then a
face-parsing network the user supplies, then parts drawn from dlib's 68 landmarks (real faces,
``core.landmark_parts``), then a template drawn from the five aligned landmarks (so the product works
with nothing but a photo, and without dlib).
"""

from collections.abc import Callable
from typing import Literal, NamedTuple

import numpy as np
from skimage.draw import polygon
from skimage.transform import resize

from core.landmark_parts import label_map_from_68

# Shapes in units of the inter-pupillary distance (IPD), from approximate adult norms in Farkas,
# "Anthropometry of the Head and Face" (1994): IPD ≈ 62 mm, eye fissure ≈ 31 × 10 mm, eyebrow
# ≈ 45 × 8 mm about 18 mm above the pupil, nose width (al–al) ≈ 34 mm, trichion ≈ 60 mm above the
# pupils, face width ≈ 130 mm; lips in units of mouth width (ch–ch ≈ 50 mm): upper vermilion ≈ 8 mm,
# lower ≈ 10 mm; chin (gnathion) below the mouth by ≈ 0.7 of the pupil–mouth distance.
_EYE_SEMI_AXES = (0.25, 0.085)
_BROW_SEMI_AXES, _BROW_RAISE, _BROW_OUTWARD = (0.36, 0.07), 0.30, 0.05
_NOSE_BRIDGE_HALF_WIDTH, _NOSE_BRIDGE_TOP = 0.12, -0.05
_NOSE_ALA_HALF_WIDTH, _NOSE_BASE_HALF_WIDTH, _NOSE_BOTTOM_BELOW_TIP = 0.28, 0.2, 0.15
_FOREHEAD_HEIGHT, _FACE_HALF_WIDTH, _CHIN_BELOW_MOUTH = 1.0, 1.05, 0.7  # last one in pupil–mouth units
_UPPER_LIP_HEIGHT, _LOWER_LIP_HEIGHT, _INNER_MOUTH_HALF_HEIGHT = 0.16, 0.19, 0.03  # in mouth widths
_HAIR_SCALE, _HAIR_LOWER_EDGE = 1.2, -0.45  # hair = face ellipse × scale, above this line (just over the brows)

# The LaPa convention of the FaRL/facer parser; "right" is the person's right (image-left).
LAPA_LABELS = (
    "background",
    "face skin",
    "right brow",
    "left brow",
    "right eye",
    "left eye",
    "nose",
    "upper lip",
    "inner mouth",
    "lower lip",
    "hair",
)


class ParsedFace(NamedTuple):
    label_map: np.ndarray  # H×W uint8, LaPa ids
    source: Literal["parser", "stored", "landmarks68", "template"]


def landmark_template(landmarks_aligned: np.ndarray, size: int = 224) -> np.ndarray:
    """Draw the LaPa parts from the 5 aligned landmarks, for faces that have no parsed label map.

    Parts are drawn in a frame attached to the face (origin between the pupils, x toward the
    image-right eye, y toward the mouth), so head roll is followed; later parts win overlaps.
    """
    landmarks = np.asarray(landmarks_aligned, dtype=np.float64)
    if landmarks.shape != (5, 2):
        raise ValueError(f"landmarks must be 5×2 (x, y), got shape {landmarks.shape}")
    left_eye, right_eye, nose_tip, mouth_left, mouth_right = landmarks
    origin = (left_eye + right_eye) / 2
    across = (right_eye - left_eye) / np.linalg.norm(right_eye - left_eye)
    down = np.array([-across[1], across[0]])
    ipd = np.linalg.norm(right_eye - left_eye)
    mouth_centre = (mouth_left + mouth_right) / 2
    mouth_width = np.linalg.norm(mouth_right - mouth_left)
    eye_to_mouth = (mouth_centre - origin) @ down

    def at(x: float, y: float) -> np.ndarray:
        """Face-frame coordinates in IPD units -> image (x, y)."""
        return origin + ipd * (x * across + y * down)

    face_top, face_bottom = -_FOREHEAD_HEIGHT * ipd, eye_to_mouth * (1 + _CHIN_BELOW_MOUTH)
    face_centre = origin + down * (face_top + face_bottom) / 2
    face_semi_axes = (_FACE_HALF_WIDTH * ipd, (face_bottom - face_top) / 2)
    nose_x, nose_y = (nose_tip - origin) @ across / ipd, (nose_tip - origin) @ down / ipd
    mouth_across = (mouth_right - mouth_left) / mouth_width

    label_map = np.zeros((size, size), dtype=np.uint8)

    def fill(outline: np.ndarray, label: int, where: np.ndarray | None = None) -> None:
        rows, cols = polygon(outline[:, 1], outline[:, 0], shape=label_map.shape)
        if where is not None:
            keep = where[rows, cols]
            rows, cols = rows[keep], cols[keep]
        label_map[rows, cols] = label

    grid_rows, grid_cols = np.mgrid[0:size, 0:size]
    above_brows = (np.stack([grid_cols, grid_rows], axis=-1) - origin) @ down < _HAIR_LOWER_EDGE * ipd
    hair_semi_axes = (face_semi_axes[0] * _HAIR_SCALE, face_semi_axes[1] * _HAIR_SCALE)
    fill(_ellipse(face_centre, across, hair_semi_axes), 10, where=above_brows)
    fill(_ellipse(face_centre, across, face_semi_axes), 1)
    fill(_nose_outline(at, nose_x, nose_y), 6)
    for eye, side, brow_label, eye_label in ((left_eye, -1, 2, 4), (right_eye, 1, 3, 5)):
        brow_centre = eye + ipd * (side * _BROW_OUTWARD * across - _BROW_RAISE * down)
        fill(_ellipse(brow_centre, across, np.multiply(_BROW_SEMI_AXES, ipd)), brow_label)
        fill(_ellipse(eye, across, np.multiply(_EYE_SEMI_AXES, ipd)), eye_label)
    half_mouth = mouth_width / 2
    fill(_ellipse(mouth_centre, mouth_across, (half_mouth, _UPPER_LIP_HEIGHT * mouth_width), half="upper"), 7)
    fill(_ellipse(mouth_centre, mouth_across, (half_mouth, _LOWER_LIP_HEIGHT * mouth_width), half="lower"), 9)
    fill(_ellipse(mouth_centre, mouth_across, (half_mouth, _INNER_MOUTH_HALF_HEIGHT * mouth_width)), 8)
    return label_map


def _nose_outline(at: Callable[[float, float], np.ndarray], nose_x: float, nose_y: float) -> np.ndarray:
    """The nose polygon, from the bridge between the eyes down to the base under the tip (face frame)."""
    bottom = nose_y + _NOSE_BOTTOM_BELOW_TIP
    return np.array(
        [
            at(-_NOSE_BRIDGE_HALF_WIDTH, _NOSE_BRIDGE_TOP),
            at(_NOSE_BRIDGE_HALF_WIDTH, _NOSE_BRIDGE_TOP),
            at(nose_x + _NOSE_ALA_HALF_WIDTH, nose_y),
            at(nose_x + _NOSE_BASE_HALF_WIDTH, bottom),
            at(nose_x - _NOSE_BASE_HALF_WIDTH, bottom),
            at(nose_x - _NOSE_ALA_HALF_WIDTH, nose_y),
        ]
    )


def _ellipse(
    centre: np.ndarray, along: np.ndarray, semi_axes, half: Literal["upper", "lower"] | None = None
) -> np.ndarray:
    """Outline (x, y) of an ellipse whose first axis points along `along`; "upper" is away from the chin."""
    start, stop = {"upper": (np.pi, 2 * np.pi), "lower": (0.0, np.pi), None: (0.0, 2 * np.pi)}[half]
    angles = np.linspace(start, stop, 65)
    perpendicular = np.array([-along[1], along[0]])
    return (
        centre + np.outer(np.cos(angles) * semi_axes[0], along) + np.outer(np.sin(angles) * semi_axes[1], perpendicular)
    )


def resize_label_map(label_map: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize: interpolating label ids would invent labels on every boundary."""
    shape = (size, size) if isinstance(size, int) else tuple(size)
    return resize(label_map, shape, order=0, anti_aliasing=False, preserve_range=True).astype(np.uint8)


def parse_face(
    aligned_image: np.ndarray,
    parser: Callable[[np.ndarray], np.ndarray] | None = None,
    stored_map: np.ndarray | None = None,
    landmarks: np.ndarray | None = None,
    landmarks68: np.ndarray | None = None,
) -> ParsedFace:
    """Label map of an aligned face from the best source given, and which source that was.

    The one precedence rule: a stored map (the dataset's own: what its results were scored with), then
    the parser, then dlib's 68 landmarks (``landmarks68``, 68×2 in the aligned frame), then the landmark
    template from the five aligned ``landmarks``. `parser` is any callable mapping N×H×W×3 uint8 images
    to N×H×W label maps.
    """
    height, width = aligned_image.shape[:2]
    if stored_map is not None:
        check_labels(stored_map, "the stored label map")
        return ParsedFace(resize_label_map(stored_map, (height, width)), "stored")
    if parser is not None:
        label_map = np.asarray(parser(aligned_image[None]))[0]
        check_labels(label_map, "the face parser's output")
        if label_map.shape != (height, width):
            raise ValueError(f"the face parser returned a {label_map.shape} map for a {(height, width)} image")
        return ParsedFace(label_map.astype(np.uint8), "parser")
    if (landmarks68 is not None or landmarks is not None) and height != width:
        raise ValueError(f"aligned images are square, got {height}×{width}")
    if landmarks68 is not None:
        return ParsedFace(label_map_from_68(landmarks68, size=height), "landmarks68")
    if landmarks is not None:
        return ParsedFace(landmark_template(landmarks, size=height), "template")
    raise ValueError(
        "no face parser, stored label map or aligned landmarks (5 or 68) was given, so there is "
        "nothing to build a label map from; pass one of them"
    )


def check_labels(label_map: np.ndarray, what: str) -> None:
    """Refuse a label map that is not 2-D integer LaPa ids: wrong ids would silently become wrong regions."""
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"{what} must be a 2-D label map, got shape {label_map.shape}")
    if label_map.dtype == bool or not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"{what} must hold integer LaPa ids, got dtype {label_map.dtype}")
    outside = np.unique(label_map[(label_map < 0) | (label_map >= len(LAPA_LABELS))])
    if outside.size:
        raise ValueError(
            f"{what} has values outside the LaPa labels 0..{len(LAPA_LABELS) - 1} "
            f"(found {outside[:5].tolist()}); it must use LaPa indices"
        )
