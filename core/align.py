"""Put every face in one canonical frame (the ArcFace 5-point template), and keep the way back.

The classifier and the region masks live in the aligned frame; clinicians look at the original
photo. The 2×3 matrix returned with every aligned face is what carries maps and masks between the two.
"""

import warnings
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from PIL import Image
from skimage.transform import AffineTransform, SimilarityTransform, warp

from core.errors import NoFaceError

# ArcFace (insightface) template for a 112×112 crop, in the landmark order used everywhere:
# image-left eye, image-right eye, nose tip, image-left mouth corner, image-right mouth corner.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ]
)

# MTCNN's image pyramid is slow and memory-hungry on big photos, and faces in clinical portraits are
# large: search a copy whose longest side is at most this.
DETECTION_MAX_SIDE = 1024
# MTCNN's smallest face is 20 pixels (its min_face_size): on a smaller picture its image pyramid is
# empty and it fails inside torch instead of finding nothing.
DETECTION_MIN_SIDE = 20

NO_FACE_MESSAGE = (
    "No face found in the image; use a frontal, well-lit photo in which the face is clearly "
    "visible (at least about 40 pixels wide), or give the five landmarks (x1,y1…x5,y5 in "
    "partitions.csv)."
)


class DetectedFace(NamedTuple):
    box: np.ndarray  # (x1, y1, x2, y2) in image pixels
    probability: float
    landmarks: np.ndarray  # 5×2 (x, y) in image pixels, the order above


class AlignedFace(NamedTuple):
    image: np.ndarray  # size×size×3 uint8
    matrix: np.ndarray  # 2×3 float64: original pixel (x, y, 1) -> aligned pixel (x, y)
    landmarks: np.ndarray  # 5×2 in the aligned frame


def template_for(size: int) -> np.ndarray:
    """The ArcFace template for a size×size crop (×2 for 224, as the paper's pipeline does)."""
    return ARCFACE_TEMPLATE_112 * (size / 112)


@lru_cache(maxsize=4)
def default_detector(device: str = "cpu"):
    """The bundled MTCNN on ``device`` (a resolved name: ``cpu``, ``cuda:0``): the one cached resource of this
    module, one per device (its weights ship in the wheel)."""
    from facenet_pytorch import MTCNN  # torch import cost is paid only when detection is needed

    return MTCNN(keep_all=True, device=device)


def detect_faces(image: np.ndarray, detector=None) -> list[DetectedFace]:
    """All faces MTCNN finds, largest box first, in the coordinates of `image`.

    `detector` is anything with MTCNN's `detect(image, landmarks=True)`; None uses default_detector().
    """
    _check_rgb(image)
    height, width = image.shape[:2]
    scale = min(1.0, DETECTION_MAX_SIDE / max(height, width))
    if scale < 1.0:
        small_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        searched = np.asarray(Image.fromarray(image).resize(small_size, Image.Resampling.LANCZOS))
    else:
        searched = image
    if min(searched.shape[:2]) < DETECTION_MIN_SIDE:
        return []
    boxes, probabilities, points = (detector or default_detector()).detect(searched, landmarks=True)
    if boxes is None:
        return []
    # Back to the original pixel grid, pixel centres aligned: x = (x_small + 0.5) / s - 0.5 per axis.
    factors = np.array([width / searched.shape[1], height / searched.shape[0]])
    boxes = (np.asarray(boxes, dtype=np.float64).reshape(-1, 2, 2) + 0.5) * factors - 0.5
    points = (np.asarray(points, dtype=np.float64) + 0.5) * factors - 0.5
    faces = [
        DetectedFace(box.reshape(4), float(probability), landmarks)
        for box, probability, landmarks in zip(boxes, probabilities, points)
    ]
    return sorted(faces, key=_box_area, reverse=True)


def detect_landmarks(image: np.ndarray, detector=None) -> np.ndarray:
    """The 5 landmarks of the largest face; warns when there were several, since the others are ignored."""
    faces = detect_faces(image, detector)
    if not faces:
        raise NoFaceError(NO_FACE_MESSAGE)
    if len(faces) > 1:
        warnings.warn(f"{len(faces)} faces found in the image; the largest was used.", stacklevel=2)
    return faces[0].landmarks


def check_landmarks(landmarks: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    """The 5×2 landmarks as floats, refused (NoFaceError) when they cannot be a face in this photo.

    Refused: values that are not finite; eyes less than 2 pixels apart (coordinates normalised to
    0..1, or all points equal); no landmark on the photo, or one farther outside it than twice the
    eye distance, which is more than a face is wide (coordinates of another photo or scale, x and y
    swapped). A face cut by the border, as MTCNN still finds it, keeps its outer landmarks just off
    the photo; that is allowed.
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (5, 2):
        raise ValueError(f"landmarks must be 5×2 (x, y), got shape {landmarks.shape}")
    if not np.isfinite(landmarks).all():
        raise NoFaceError(f"The five landmarks must be finite numbers, got {np.round(landmarks, 1).tolist()}.")
    eye_distance = float(np.linalg.norm(landmarks[1] - landmarks[0]))
    if eye_distance < 2:
        raise NoFaceError(
            f"The five landmarks do not define a face: the eyes are {eye_distance:.2g} pixels apart. "
            "Give them in the photo's pixels (not normalised to 0..1), in the order left eye, "
            "right eye, nose, left and right mouth corner."
        )
    height, width = image_shape[:2]
    size = np.array([width, height])
    hint = "landmarks must be in the pixels of this photo, x before y."
    if not ((landmarks >= 0) & (landmarks <= size)).all(axis=1).any():
        raise NoFaceError(f"None of the five landmarks lies on the {width}×{height} photo; {hint}")
    reach = 2 * eye_distance
    too_far = ((landmarks < -reach) | (landmarks > size + reach)).any(axis=1)
    if too_far.any():
        x, y = landmarks[np.argmax(too_far)]
        raise NoFaceError(
            f"The landmark ({x:.1f}, {y:.1f}) lies farther outside the {width}×{height} photo than the "
            f"face is wide; {hint}"
        )
    return landmarks


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 224) -> AlignedFace:
    """Warp `image` so its landmarks best match the template (least squares over all five points)."""
    _check_rgb(image)
    landmarks = check_landmarks(landmarks, image.shape)
    transform = SimilarityTransform.from_estimate(landmarks, template_for(size))
    if not transform:
        raise NoFaceError(
            f"The five landmarks do not define a face ({transform}); check that they are "
            "distinct points in the order left eye, right eye, nose, left and right mouth corner."
        )
    aligned = warp(
        image, transform.inverse, output_shape=(size, size), order=1, mode="constant", cval=0, preserve_range=True
    )
    return AlignedFace(
        image=_round_to(aligned, np.dtype(np.uint8)), matrix=transform.params[:2].copy(), landmarks=transform(landmarks)
    )


def warp_to_aligned(array: np.ndarray, matrix: np.ndarray, size: int, order: int) -> np.ndarray:
    """Carry a map drawn on the original photo (e.g. a stored label map) into the aligned frame.

    order=0 for masks and label maps, 1 for images. The result has the dtype of `array`.
    """
    original_to_aligned = AffineTransform(matrix=np.vstack([matrix, [0.0, 0.0, 1.0]]))
    values = array.astype(np.uint8) if array.dtype == bool else array
    aligned = warp(
        values,
        original_to_aligned.inverse,
        output_shape=(size, size),
        order=order,
        mode="constant",
        cval=0,
        preserve_range=True,
    )
    return _round_to(aligned, array.dtype)


def warp_to_original(array: np.ndarray, matrix: np.ndarray, original_shape: tuple[int, ...], order: int) -> np.ndarray:
    """Carry an aligned-frame map or mask back onto the original photo (zero outside the aligned crop).

    order=0 for masks and label maps (never mixes label ids), 1 for relevance maps. The result has
    the dtype of `array` and the height and width of `original_shape`.
    """
    original_to_aligned = AffineTransform(matrix=np.vstack([matrix, [0.0, 0.0, 1.0]]))
    values = array.astype(np.uint8) if array.dtype == bool else array
    back = warp(
        values,
        original_to_aligned,
        output_shape=tuple(original_shape[:2]),
        order=order,
        mode="constant",
        cval=0,
        preserve_range=True,
    )
    return _round_to(back, array.dtype)


def _box_area(face: DetectedFace) -> float:
    x1, y1, x2, y2 = face.box
    return (x2 - x1) * (y2 - y1)


def _round_to(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        return values.astype(dtype)
    if dtype == np.dtype(bool):
        return values > 0.5
    info = np.iinfo(dtype)
    return np.clip(np.round(values), info.min, info.max).astype(dtype)


def _check_rgb(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 H×W×3 image, got {image.dtype} {image.shape}")
