"""Face parts from dlib's 68 landmarks (the iBUG 300-W mark-up), and a second opinion on alignment.

Pure functions on points: 68×2 (x, y) in the iBUG order (0–16 jaw from the image-left ear to the
image-right ear, 17–21 image-left brow, 22–26 image-right brow, 27–30 nose bridge down to the tip,
31–35 nostrils, 36–41 image-left eye, 42–47 image-right eye, 48–59 outer lips from the image-left
corner, 60–67 inner lips).

The label map (``label_map_from_68``) fills polygons, later parts winning overlaps, in this order:

- face skin: the jaw line 0–16 closed over the forehead by the upper half of an ellipse through
  points 0 and 16 whose top lies one facial third above the glabella (the midpoint of the inner
  brow ends 21 and 22); the facial third is the glabella–subnasale (33) distance, after the
  neoclassical canon that the upper, middle and lower thirds of the face are about equal (Farkas,
  "Anthropometry of the Head and Face", 1994). Where the hairline really is, no landmark says.
- hair: left out (label 0). No landmark sees the hair; an ellipse guessed above the forehead would
  be the landmark template's guess again, not evidence. A region built on hair is empty (NaN score).
- nose: the bridge from 27 (between the eyes) to the nostrils 31–35, ``NOSE_BRIDGE_HALF_WIDTH``
  wide either side of the bridge line at the top and widening to the alae, which lie
  ``NOSE_ALA_OUTSET`` outside 31 and 35.
- brows: the five points of each brow trace its upper edge; the part is the band between them and
  the same points moved ``BROW_THICKNESS`` toward the eyes.
- eyes: the six-point outlines 36–41 and 42–47.
- lips: upper lip = outer points 48–54 and inner points 64–60; lower lip = outer 54–59, 48 and
  inner 60, 67–64; inner mouth = the inner outline 60–67.

Lengths are in inter-ocular distances (IOD: between the eye centres), directions in the face's own
frame (``across`` from the image-left to the image-right eye, ``down`` perpendicular, toward the
mouth), so head roll is followed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.draw import polygon as fill_polygon

# LaPa ids, as core.parse.LAPA_LABELS numbers them ("right" = the person's right = image-left); not
# imported from core.parse, which draws with this module (tests check the two agree).
FACE_SKIN, RIGHT_BROW, LEFT_BROW, RIGHT_EYE, LEFT_EYE, NOSE, UPPER_LIP, INNER_MOUTH, LOWER_LIP = range(1, 10)

JAW, RIGHT_BROW_POINTS, LEFT_BROW_POINTS = range(17), range(17, 22), range(22, 27)
BRIDGE, NOSTRILS, RIGHT_EYE_POINTS, LEFT_EYE_POINTS = range(27, 31), range(31, 36), range(36, 42), range(42, 48)
OUTER_LIPS, INNER_LIPS = range(48, 60), range(60, 68)
NOSE_TIP, SUBNASALE, MOUTH_LEFT, MOUTH_RIGHT = 30, 33, 48, 54

BROW_THICKNESS = 0.12  # IOD; LaPa brows are about a tenth of the eye distance thick
NOSE_BRIDGE_HALF_WIDTH = 0.1  # IOD, at the top of the bridge (point 27)
NOSE_ALA_OUTSET = 0.06  # IOD outside the outer nostril points 31 and 35
FOREHEAD_ARC_POINTS = 33

# Alignment check (issue 14): measured on skimage's astronaut (whole face, flipped, halved, turned 10°),
# MTCNN's five points and those from dlib's 68 differ by 0.03–0.07 IOD on average; cropped through an
# eye, by 0.44 (the issue measured about 1 on other portraits). 0.2 is three times the worst whole-face
# value and half the cut one: a disagreement past it means one of the two detectors is wrong by about
# an eye's half-width, which moves the aligned face and its regions visibly.
DISAGREEMENT_THRESHOLD_IOD = 0.2
# A point the alignment rests on (the five, or dlib's eyes, nose and mouth) closer than this to the
# photo's edge, or past it, means the face is cut by the border and the hidden part was guessed.
BORDER_MARGIN_IOD = 0.1
ALIGNMENT_POINTS = range(27, 68)


def _checked(points68: np.ndarray) -> np.ndarray:
    points = np.asarray(points68, dtype=np.float64)
    if points.shape != (68, 2):
        raise ValueError(f"dense landmarks must be 68×2 (x, y), got shape {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError("dense landmarks must be finite numbers")
    return points


def five_points(points68: np.ndarray) -> np.ndarray:
    """The five alignment points from the 68, in core.align's order: image-left eye centre, image-right
    eye centre (each the mean of its six outline points), nose tip (30), image-left and image-right
    mouth corners (48, 54)."""
    points = _checked(points68)
    return np.array(
        [
            points[RIGHT_EYE_POINTS].mean(axis=0),
            points[LEFT_EYE_POINTS].mean(axis=0),
            points[NOSE_TIP],
            points[MOUTH_LEFT],
            points[MOUTH_RIGHT],
        ]
    )


def _frame(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Unit vectors across (image-left eye -> image-right eye) and down, and the IOD."""
    eyes = five_points(points)[:2]
    iod = float(np.linalg.norm(eyes[1] - eyes[0]))
    if iod < 1e-6:
        raise ValueError("the dense landmarks put both eyes at one point")
    across = (eyes[1] - eyes[0]) / iod
    return across, np.array([-across[1], across[0]]), iod


def part_polygons(points68: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(LaPa id, K×2 polygon outline (x, y)) for every part, in drawing order (later parts win)."""
    points = _checked(points68)
    across, down, iod = _frame(points)
    parts = [(FACE_SKIN, face_outline(points))]
    nostrils = points[NOSTRILS]
    bridge_top = points[BRIDGE[0]]
    nose = np.vstack(
        [
            bridge_top - NOSE_BRIDGE_HALF_WIDTH * iod * across,
            nostrils[0] - NOSE_ALA_OUTSET * iod * across,
            nostrils,
            nostrils[-1] + NOSE_ALA_OUTSET * iod * across,
            bridge_top + NOSE_BRIDGE_HALF_WIDTH * iod * across,
        ]
    )
    parts.append((NOSE, nose))
    for label, brow in ((RIGHT_BROW, RIGHT_BROW_POINTS), (LEFT_BROW, LEFT_BROW_POINTS)):
        upper = points[brow]
        parts.append((label, np.vstack([upper, (upper + BROW_THICKNESS * iod * down)[::-1]])))
    parts.append((RIGHT_EYE, points[RIGHT_EYE_POINTS]))
    parts.append((LEFT_EYE, points[LEFT_EYE_POINTS]))
    outer, inner = points[OUTER_LIPS], points[INNER_LIPS]
    parts.append((UPPER_LIP, np.vstack([outer[0:7], inner[4::-1]])))  # 48..54, then 64..60
    parts.append((LOWER_LIP, np.vstack([outer[6:12], outer[0:1], inner[0:1], inner[7:3:-1]])))  # 54..59,48,60,67..64
    parts.append((INNER_MOUTH, inner))
    return parts


def face_outline(points68: np.ndarray) -> np.ndarray:
    """The jaw (0–16) closed over the forehead by an upper half-ellipse from 16 back to 0 (see the module)."""
    points = _checked(points68)
    _, down, _ = _frame(points)
    ear_left, ear_right = points[JAW[0]], points[JAW[-1]]
    centre = (ear_left + ear_right) / 2
    glabella = (points[RIGHT_BROW_POINTS[-1]] + points[LEFT_BROW_POINTS[0]]) / 2
    third = float((points[SUBNASALE] - glabella) @ down)
    top = glabella - third * down
    half_width = float(np.linalg.norm(ear_right - ear_left)) / 2
    height = float((centre - top) @ down)
    # The ellipse's axes: the ear-to-ear line and its perpendicular through the centre.
    along = (ear_right - ear_left) / (2 * half_width)
    up = np.array([along[1], -along[0]])
    angles = np.linspace(0.0, np.pi, FOREHEAD_ARC_POINTS)[1:-1]  # open: the ends are the points 16 and 0
    arc = centre + np.outer(np.cos(angles) * half_width, along) + np.outer(np.sin(angles) * max(height, 0.0), up)
    return np.vstack([points[JAW], arc])


def draw_polygons(parts: list[tuple[int, np.ndarray]], size: int) -> np.ndarray:
    """size×size uint8 label map: each polygon's pixels (centre inside, skimage.draw.polygon) get its id."""
    label_map = np.zeros((size, size), dtype=np.uint8)
    for label, outline in parts:
        rows, cols = fill_polygon(outline[:, 1], outline[:, 0], shape=label_map.shape)
        label_map[rows, cols] = label
    return label_map


def label_map_from_68(points68_aligned: np.ndarray, size: int) -> np.ndarray:
    """LaPa label map (size×size uint8) drawn from 68 landmarks in the aligned face's frame."""
    return draw_polygons(part_polygons(points68_aligned), size)


@dataclass(frozen=True)
class AlignmentCheck:
    """A second opinion on the five points a face was aligned with.

    ``disagreement_iod``: mean distance between the five points used and those from dlib's 68, in
    inter-ocular distances (None when no 68 points were found); ``cut_by_border``: a point the
    alignment rests on lies at or past the photo's edge; ``dlib_detected``: dlib's own detector found
    this face (otherwise its 68 points started from a box built from the five, and agree more readily).
    """

    disagreement_iod: float | None
    cut_by_border: bool
    dlib_detected: bool | None
    threshold_iod: float = DISAGREEMENT_THRESHOLD_IOD
    warning: str | None = None

    def summary(self) -> dict[str, object]:
        """The JSON form (CLI ``explain``)."""
        return {
            "disagreement_iod": None if self.disagreement_iod is None else round(self.disagreement_iod, 3),
            "threshold_iod": self.threshold_iod,
            "cut_by_border": self.cut_by_border,
            "dlib_detected": self.dlib_detected,
            "warning": self.warning,
        }


def disagreement_iod(five: np.ndarray, points68: np.ndarray) -> float:
    """Mean distance between ``five`` (5×2) and the five points of the 68, in the eye distance of ``five``."""
    five = np.asarray(five, dtype=np.float64)
    iod = float(np.linalg.norm(five[1] - five[0]))
    if iod < 1e-6:
        raise ValueError("the five landmarks put both eyes at one point")
    return float(np.linalg.norm(five - five_points(points68), axis=1).mean() / iod)


def cut_by_border(five: np.ndarray, points68: np.ndarray | None, image_shape: tuple[int, ...]) -> bool:
    """Whether a point the alignment rests on is within ``BORDER_MARGIN_IOD`` of the edge, or past it."""
    five = np.asarray(five, dtype=np.float64)
    points = five if points68 is None else np.vstack([five, _checked(points68)[ALIGNMENT_POINTS]])
    margin = BORDER_MARGIN_IOD * float(np.linalg.norm(five[1] - five[0]))
    height, width = image_shape[:2]
    low, high = margin, np.array([width - 1, height - 1]) - margin
    return bool(((points < low) | (points > high)).any())


def alignment_check(
    five: np.ndarray,
    points68: np.ndarray | None,
    image_shape: tuple[int, ...],
    dlib_detected: bool | None = None,
    threshold_iod: float = DISAGREEMENT_THRESHOLD_IOD,
) -> AlignmentCheck:
    """The five points used against dlib's 68 (both in photo pixels), with a warning when they disagree by
    more than ``threshold_iod`` or the face is cut by the photo's border."""
    disagreement = None if points68 is None else disagreement_iod(five, points68)
    cut = cut_by_border(five, points68, image_shape)
    problems = []
    if cut:
        problems.append("the face is cut by the photo's border, so the hidden part of it was guessed")
    if disagreement is not None and disagreement > threshold_iod:
        problems.append(
            f"two face detectors disagree on where the eyes, nose and mouth are by {disagreement:.2f} "
            f"eye distances (whole faces agree within about 0.05; warning past {threshold_iod})"
        )
    warning = None
    if problems:
        warning = (
            "The alignment is likely wrong: "
            + "; ".join(problems)
            + ". The regions and the prediction may not fit this face; use a photo that shows the whole face."
        )
    return AlignmentCheck(disagreement, cut, dlib_detected, threshold_iod, warning)
