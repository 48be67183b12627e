"""Detection on a real photo (skimage's astronaut), alignment checked against independent computations."""

import numpy as np
import pytest
import skimage.data
from PIL import Image
from scipy import ndimage
from skimage.draw import disk

from core.align import ARCFACE_TEMPLATE_112, align_face, detect_faces, detect_landmarks, template_for, warp_to_original
from core.errors import NoFaceError


@pytest.fixture(scope="module")
def astronaut():
    return skimage.data.astronaut()


@pytest.fixture(scope="module")
def astronaut_faces(astronaut):
    return detect_faces(astronaut)


@pytest.fixture(scope="module")
def astronaut_landmarks(astronaut_faces):
    return astronaut_faces[0].landmarks


def least_squares_similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Fit u = a·x − b·y + tx, v = b·x + a·y + ty by linear least squares; return [[a, −b, tx], [b, a, ty]]."""
    x, y = source.T
    ones, zeros = np.ones_like(x), np.zeros_like(x)
    design = np.concatenate([np.stack([x, -y, ones, zeros], axis=1), np.stack([y, x, zeros, ones], axis=1)])
    (a, b, tx, ty), *_ = np.linalg.lstsq(design, np.concatenate([target[:, 0], target[:, 1]]), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def test_template_scales_with_size():
    np.testing.assert_allclose(template_for(224), 2 * ARCFACE_TEMPLATE_112)
    np.testing.assert_allclose(template_for(112), ARCFACE_TEMPLATE_112)


def test_astronaut_has_one_face_with_plausible_landmarks(astronaut_faces, astronaut_landmarks):
    assert len(astronaut_faces) == 1
    assert astronaut_faces[0].probability > 0.99
    left_eye, right_eye, nose, mouth_left, mouth_right = astronaut_landmarks
    # Measured: eyes near (205, 102) and (247, 104), nose (225, 129), mouth corners (202, 139), (245, 142).
    assert ((astronaut_landmarks[:, 0] > 190) & (astronaut_landmarks[:, 0] < 260)).all()
    assert ((astronaut_landmarks[:, 1] > 90) & (astronaut_landmarks[:, 1] < 155)).all()
    x1, y1, x2, y2 = astronaut_faces[0].box
    assert ((astronaut_landmarks >= (x1, y1)) & (astronaut_landmarks <= (x2, y2))).all()
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
    assert left_eye[0] < nose[0] < right_eye[0]  # index 0 is the image-left eye
    assert mouth_left[0] < mouth_right[0]


def test_matrix_is_the_least_squares_similarity(astronaut, astronaut_landmarks):
    aligned = align_face(astronaut, astronaut_landmarks)
    expected = least_squares_similarity(astronaut_landmarks, template_for(224))
    np.testing.assert_allclose(aligned.matrix, expected, atol=1e-6)
    assert aligned.image.shape == (224, 224, 3) and aligned.image.dtype == np.uint8


def test_aligned_landmarks_land_near_the_template(astronaut, astronaut_landmarks):
    aligned = align_face(astronaut, astronaut_landmarks)
    mapped = astronaut_landmarks @ aligned.matrix[:, :2].T + aligned.matrix[:, 2]
    np.testing.assert_allclose(aligned.landmarks, mapped, atol=1e-9)
    errors = np.linalg.norm(aligned.landmarks - template_for(224), axis=1)
    assert errors.mean() < 12  # a similarity cannot fit five points exactly; measured 9.5 px (of 224)


def test_aligned_pixels_sample_the_original_at_the_inverse_matrix(astronaut, astronaut_landmarks):
    aligned = align_face(astronaut, astronaut_landmarks)
    rows, cols = np.mgrid[40:200:23, 40:200:23]
    aligned_xy = np.stack([cols.ravel(), rows.ravel()], axis=1).astype(float)
    linear, shift = aligned.matrix[:, :2], aligned.matrix[:, 2]
    original_xy = np.linalg.solve(linear, (aligned_xy - shift).T).T
    for channel in range(3):
        sampled = ndimage.map_coordinates(
            astronaut[:, :, channel].astype(float), [original_xy[:, 1], original_xy[:, 0]], order=1
        )
        actual = aligned.image[rows.ravel(), cols.ravel(), channel]
        assert np.abs(actual - sampled).max() <= 1.0


def test_round_trip_of_a_known_point(astronaut, astronaut_landmarks):
    aligned = align_face(astronaut, astronaut_landmarks)
    point = np.array([218.0, 118.0])  # on the cheek, original pixels
    x, y = aligned.matrix[:, :2] @ point + aligned.matrix[:, 2]
    mask = np.zeros((224, 224), dtype=bool)
    mask[disk((y, x), 6, shape=mask.shape)] = True
    back = warp_to_original(mask, aligned.matrix, astronaut.shape, order=0)
    assert back.dtype == bool and back.shape == astronaut.shape[:2]
    rows, cols = np.nonzero(back)
    np.testing.assert_allclose([cols.mean(), rows.mean()], point, atol=0.5)
    grid_rows, grid_cols = np.mgrid[0:224, 0:224]
    bump = np.exp(-((grid_cols - x) ** 2 + (grid_rows - y) ** 2) / (2 * 8.0**2))
    relevance = warp_to_original(bump, aligned.matrix, astronaut.shape, order=1)
    assert relevance.dtype == np.float64
    peak_row, peak_col = np.unravel_index(relevance.argmax(), relevance.shape)
    np.testing.assert_allclose([peak_col, peak_row], point, atol=1.0)
    assert relevance[0, 0] == 0  # outside the aligned crop


def test_label_maps_go_back_without_new_labels(astronaut, astronaut_landmarks):
    aligned = align_face(astronaut, astronaut_landmarks)
    labels = np.random.default_rng(0).choice(np.array([0, 3, 7], dtype=np.uint8), size=(224, 224))
    back = warp_to_original(labels, aligned.matrix, astronaut.shape, order=0)
    assert back.dtype == np.uint8 and set(np.unique(back)) <= {0, 3, 7}


@pytest.mark.parametrize(
    "image",
    [
        np.full((200, 200, 3), 128, dtype=np.uint8),
        np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8),
    ],
    ids=["grey", "noise"],
)
def test_no_face_raises(image):
    with pytest.raises(NoFaceError, match="No face found"):
        detect_landmarks(image)


def test_two_faces_picks_the_larger_and_warns(astronaut, astronaut_landmarks):
    canvas = np.full((512, 800, 3), 255, dtype=np.uint8)
    canvas[:, :512] = astronaut
    canvas[128:384, 530:786] = np.asarray(Image.fromarray(astronaut).resize((256, 256), Image.Resampling.LANCZOS))
    with pytest.warns(UserWarning, match="2 faces found in the image; the largest was used"):
        landmarks = detect_landmarks(canvas)
    np.testing.assert_allclose(landmarks, astronaut_landmarks, atol=2.0)


class BlobDetector:
    """Stands in for MTCNN: reports the centroid of a bright blob as all five landmarks."""

    def __init__(self):
        self.seen_shape: tuple[int, ...] | None = None

    def detect(self, image, landmarks):
        self.seen_shape = image.shape
        centre = ndimage.center_of_mass(image[:, :, 0].astype(float))[::-1]
        points = np.tile(centre, (1, 5, 1))
        return np.array([[centre[0] - 5, centre[1] - 5, centre[0] + 5, centre[1] + 5]]), np.array([0.9]), points


def test_large_images_are_searched_downscaled_and_mapped_back():
    rows, cols = np.mgrid[0:2000, 0:3000]
    blob = np.exp(-((cols - 2100.0) ** 2 + (rows - 700.0) ** 2) / (2 * 60.0**2))
    image = np.repeat(np.round(255 * blob).astype(np.uint8)[:, :, None], 3, axis=2)
    detector = BlobDetector()
    landmarks = detect_landmarks(image, detector)
    assert detector.seen_shape is not None and max(detector.seen_shape[:2]) == 1024
    np.testing.assert_allclose(landmarks, np.tile([2100.0, 700.0], (5, 1)), atol=1.0)


def test_degenerate_landmarks_raise(astronaut):
    with pytest.raises(NoFaceError, match="do not define a face"):
        align_face(astronaut, np.full((5, 2), 100.0))
