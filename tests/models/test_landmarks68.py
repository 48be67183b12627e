"""dlib's 68 points on a real photo (skimage's astronaut) against MTCNN, an independent detector: whole, they
agree within the alignment check's threshold; cropped through an eye, the check warns."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from skimage import data

from core.align import detect_faces
from core.landmark_parts import DISAGREEMENT_THRESHOLD_IOD, alignment_check, five_points
from models.landmarks68 import available, box_from_five, box_iou, dlib_faces, landmarks_68, shape_68
from tests.conftest import REPO

CUT_AT = 215  # columns left of this are dropped: the cut runs through the image-left eye (MTCNN's x ≈ 205)


@pytest.fixture(scope="module")
def astronaut():
    return data.astronaut()


@pytest.fixture(scope="module")
def mtcnn_five(astronaut):
    faces = detect_faces(astronaut)
    assert len(faces) == 1
    return faces[0].landmarks


def test_dlib_and_its_model_are_installed():
    assert available()


def test_dlib_finds_the_astronaut_where_the_box_from_mtcnns_points_says(astronaut, mtcnn_five):
    boxes = dlib_faces(astronaut)
    guess = box_from_five(mtcnn_five)
    assert max(box_iou(box, guess) for box in boxes) > 0.7
    assert dlib_faces(np.full((200, 200, 3), 128, np.uint8)) == []


def test_the_68_points_agree_with_mtcnn_on_the_whole_face(astronaut, mtcnn_five):
    dense = landmarks_68(astronaut, mtcnn_five)
    assert dense.points.shape == (68, 2) and dense.dlib_detected
    x1, y1, x2, y2 = dense.box
    assert ((dense.points[17:] >= [x1 - 5, y1 - 5]) & (dense.points[17:] <= [x2 + 5, y2 + 5])).all()
    iod = np.linalg.norm(mtcnn_five[1] - mtcnn_five[0])
    per_point = np.linalg.norm(five_points(dense.points) - mtcnn_five, axis=1) / iod
    assert per_point.max() < DISAGREEMENT_THRESHOLD_IOD  # measured: at most 0.05
    check = alignment_check(mtcnn_five, dense.points, astronaut.shape, dense.dlib_detected)
    assert check.warning is None and not check.cut_by_border
    assert check.disagreement_iod == pytest.approx(per_point.mean())


def test_the_check_warns_on_the_astronaut_cut_through_an_eye(astronaut):
    cut = np.ascontiguousarray(astronaut[:, CUT_AT:])
    faces = detect_faces(cut)
    assert faces, "MTCNN still finds the cut face (and guesses its hidden half)"
    five = faces[0].landmarks
    dense = landmarks_68(cut, five)
    check = alignment_check(five, dense.points, cut.shape, dense.dlib_detected)
    assert check.cut_by_border and check.warning is not None
    # The two detectors disagree past the threshold too (measured 0.44), even from the box MTCNN implies.
    assert check.disagreement_iod is not None and check.disagreement_iod > DISAGREEMENT_THRESHOLD_IOD
    from_guess = alignment_check(five, shape_68(cut, box_from_five(five)), cut.shape)
    assert from_guess.disagreement_iod is not None and from_guess.disagreement_iod > DISAGREEMENT_THRESHOLD_IOD


def test_without_a_dlib_detection_the_box_comes_from_the_five_points(astronaut, mtcnn_five):
    """A face dlib's own detector misses (here: too small for it) still gets its 68 points."""
    small = np.ascontiguousarray(astronaut[::8, ::8])
    five = (mtcnn_five + 0.5) / 8 - 0.5
    dense = landmarks_68(small, five)
    assert not dense.dlib_detected
    np.testing.assert_array_equal(dense.box, box_from_five(five))
    assert dense.points.shape == (68, 2) and np.isfinite(dense.points).all()


def test_concurrent_calls_give_the_same_points(astronaut, mtcnn_five):
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: landmarks_68(astronaut, mtcnn_five).points, range(4)))
    for points in results[1:]:
        np.testing.assert_array_equal(points, results[0])


def test_a_box_from_five_points_is_a_square_around_eyes_and_mouth():
    five = np.array([[40.0, 50.0], [80.0, 50.0], [60.0, 70.0], [45.0, 90.0], [75.0, 90.0]])
    # By hand: eye-mouth midpoints (60, 50) and (60, 90); scale 40 + 40 = 80, side 88, centre (60, 70).
    np.testing.assert_allclose(box_from_five(five), [16, 26, 104, 114])
    assert box_iou(np.array([0, 0, 10, 10]), np.array([5, 0, 15, 10])) == pytest.approx(50 / 150)


def test_the_model_is_found_without_importing_its_package():
    """face_recognition_models' __init__ imports pkg_resources, which new setuptools lacks."""
    code = "import sys, models.landmarks68 as m; assert m.available(); print('face_recognition_models' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stderr


def test_a_missing_model_package_is_reported_not_raised_as_a_crash(monkeypatch):
    import models.landmarks68 as module

    found = module.model_file()
    assert found is not None and found.stat().st_size > 90_000_000
    monkeypatch.setattr(module, "MODEL_PACKAGE", "no_such_package_here")
    module._models.cache_clear()
    try:
        assert module.model_file() is None and not module.available()
        with pytest.raises(module.DenseLandmarksUnavailable, match="68-point model is not installed"):
            module.landmarks_68(
                np.zeros((64, 64, 3), np.uint8), np.array([[20, 30], [40, 30], [30, 40], [22, 50], [38, 50]])
            )
    finally:
        module._models.cache_clear()
