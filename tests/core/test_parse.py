"""The landmark template's anatomy, label-safe resizing and parse_face's choice of source."""

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from core.align import template_for
from core.errors import ImageError
from core.imageio import load_label_map
from core.landmark_parts import label_map_from_68
from core.parse import LAPA_LABELS, landmark_template, parse_face, resize_label_map

TEMPLATE_LANDMARKS = template_for(224)


def rolled(landmarks: np.ndarray, degrees: float, centre=(112.0, 112.0)) -> np.ndarray:
    angle = np.deg2rad(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return (landmarks - centre) @ rotation.T + centre


@pytest.fixture(params=[0.0, 15.0], ids=["upright", "rolled 15°"])
def face(request):
    landmarks = rolled(TEMPLATE_LANDMARKS, request.param)
    return landmarks, landmark_template(landmarks)


def label_at(label_map: np.ndarray, point: np.ndarray) -> int:
    x, y = np.round(point).astype(int)
    return int(label_map[y, x])


def test_every_label_is_drawn(face):
    _, label_map = face
    assert label_map.dtype == np.uint8 and label_map.shape == (224, 224)
    assert set(np.unique(label_map)) == set(range(len(LAPA_LABELS)))


def test_right_parts_are_on_the_image_left(face):
    landmarks, label_map = face
    axis = landmarks[1] - landmarks[0]  # image-left eye -> image-right eye
    for right_label, left_label in ((2, 3), (4, 5)):
        right_centroid = np.array(ndimage.center_of_mass(label_map == right_label))[::-1]
        left_centroid = np.array(ndimage.center_of_mass(label_map == left_label))[::-1]
        assert right_centroid @ axis < left_centroid @ axis
    assert ndimage.center_of_mass(label_map == 4)[1] < ndimage.center_of_mass(label_map == 5)[1]


def test_parts_contain_their_landmarks(face):
    landmarks, label_map = face
    assert label_at(label_map, landmarks[0]) == 4
    assert label_at(label_map, landmarks[1]) == 5
    assert label_at(label_map, landmarks[2]) == 6


def test_brows_are_above_the_eyes(face):
    landmarks, label_map = face
    axis = landmarks[1] - landmarks[0]
    down = np.array([-axis[1], axis[0]]) / np.linalg.norm(axis)
    for brow, eye in ((2, 4), (3, 5)):
        brow_centroid = np.array(ndimage.center_of_mass(label_map == brow))[::-1]
        eye_centroid = np.array(ndimage.center_of_mass(label_map == eye))[::-1]
        assert brow_centroid @ down < eye_centroid @ down


def test_lips_lie_between_the_mouth_corners(face):
    landmarks, label_map = face
    mouth_left, mouth_right = landmarks[3], landmarks[4]
    width = np.linalg.norm(mouth_right - mouth_left)
    along = (mouth_right - mouth_left) / width
    rows, cols = np.nonzero(np.isin(label_map, (7, 8, 9)))
    projection = (np.stack([cols, rows], axis=1) - mouth_left) @ along
    assert projection.min() >= -1 and projection.max() <= width + 1
    upper = np.array(ndimage.center_of_mass(label_map == 7))[::-1]
    lower = np.array(ndimage.center_of_mass(label_map == 9))[::-1]
    down = np.array([-along[1], along[0]])
    assert upper @ down < lower @ down


def test_hair_is_above_the_brows(face):
    landmarks, label_map = face
    axis = landmarks[1] - landmarks[0]
    down = np.array([-axis[1], axis[0]]) / np.linalg.norm(axis)
    rows, cols = np.nonzero(label_map == 10)
    hair_depth = (np.stack([cols, rows], axis=1) @ down).max()
    brow_rows, brow_cols = np.nonzero(np.isin(label_map, (2, 3)))
    assert hair_depth < (np.stack([brow_cols, brow_rows], axis=1) @ down).max()


def test_template_scales_with_the_crop():
    small = landmark_template(template_for(112), size=112)
    large = landmark_template(TEMPLATE_LANDMARKS, size=224)
    agreement = (resize_label_map(large, 112) == small).mean()
    assert agreement > 0.95


@pytest.mark.parametrize("size", [37, 64, 224, (300, 150)])
def test_resize_never_invents_labels(size):
    label_map = np.random.default_rng(0).choice(np.array([0, 2, 5, 9], dtype=np.uint8), size=(96, 96))
    resized = resize_label_map(label_map, size)
    assert resized.dtype == np.uint8
    assert resized.shape == ((size, size) if isinstance(size, int) else size)
    assert set(np.unique(resized)) <= {0, 2, 5, 9}


def test_resize_by_an_integer_factor_repeats_pixels():
    label_map = np.arange(16, dtype=np.uint8).reshape(4, 4) % 11
    np.testing.assert_array_equal(resize_label_map(label_map, 8), np.kron(label_map, np.ones((2, 2), np.uint8)))


IMAGE = np.zeros((224, 224, 3), dtype=np.uint8)
STORED = np.full((112, 112), 6, dtype=np.uint8)


def constant_parser(images: np.ndarray) -> np.ndarray:
    return np.full(images.shape[:3], 3, dtype=np.uint8)


def test_stored_map_is_preferred_over_everything():
    """The one label-map rule (issue 10): a stored map wins over the parser, the parser over the template."""
    parsed = parse_face(IMAGE, parser=constant_parser, stored_map=STORED, landmarks=TEMPLATE_LANDMARKS)
    assert parsed.source == "stored" and (parsed.label_map == 6).all()


def test_parser_is_preferred_over_the_template():
    parsed = parse_face(IMAGE, parser=constant_parser, landmarks=TEMPLATE_LANDMARKS)
    assert parsed.source == "parser" and (parsed.label_map == 3).all()


def test_stored_map_is_preferred_over_the_template_and_resized():
    parsed = parse_face(IMAGE, stored_map=STORED, landmarks=TEMPLATE_LANDMARKS)
    assert parsed.source == "stored"
    assert parsed.label_map.shape == (224, 224) and (parsed.label_map == 6).all()


def test_template_is_the_fallback():
    parsed = parse_face(IMAGE, landmarks=TEMPLATE_LANDMARKS)
    assert parsed.source == "template"
    np.testing.assert_array_equal(parsed.label_map, landmark_template(TEMPLATE_LANDMARKS))


def dense_points(landmarks: np.ndarray) -> np.ndarray:
    """68 points around the five (each eye a hexagon about its centre, nose and mouth at theirs): enough
    for ``label_map_from_68`` to draw from."""
    left_eye, right_eye, nose, mouth_left, mouth_right = landmarks
    ring = np.array([[-8, 0], [-4, -3], [4, -3], [8, 0], [4, 3], [-4, 3]], dtype=np.float64)
    jaw = np.linspace(left_eye - [30, 0], right_eye + [30, 0], 17) + np.outer(
        np.sin(np.linspace(0, np.pi, 17)), [0, 90]
    )
    brows = np.vstack([np.linspace(eye - [12, 12], eye + [12, 12] - [0, 24], 5) for eye in (left_eye, right_eye)])
    bridge = np.linspace((left_eye + right_eye) / 2, nose, 4)
    nostrils = np.linspace(nose + [-10, 8], nose + [10, 8], 5)
    outer = np.vstack([np.linspace(mouth_left, mouth_right, 7), np.linspace(mouth_right, mouth_left, 7)[1:-1] + [0, 8]])
    inner = np.vstack(
        [np.linspace(mouth_left, mouth_right, 5) + [0, 2], np.linspace(mouth_right, mouth_left, 5)[1:-1] + [0, 4]]
    )
    return np.vstack([jaw, brows, bridge, nostrils, left_eye + ring, right_eye + ring, outer, inner]) + 0.013


def test_the_sources_rank_stored_parser_landmarks68_template():
    """Issue 14's rule: stored > parser > dlib's 68 points > five-point template, whatever else is given."""
    dense = dense_points(TEMPLATE_LANDMARKS)
    stored = parse_face(IMAGE, constant_parser, STORED, landmarks=TEMPLATE_LANDMARKS, landmarks68=dense)
    assert stored.source == "stored"
    assert parse_face(IMAGE, constant_parser, None, TEMPLATE_LANDMARKS, dense).source == "parser"
    from_68 = parse_face(IMAGE, landmarks=TEMPLATE_LANDMARKS, landmarks68=dense)
    assert from_68.source == "landmarks68"
    np.testing.assert_array_equal(from_68.label_map, label_map_from_68(dense, 224))
    assert not np.array_equal(from_68.label_map, landmark_template(TEMPLATE_LANDMARKS))
    assert parse_face(IMAGE, landmarks=TEMPLATE_LANDMARKS).source == "template"
    with pytest.raises(ValueError, match="square"):
        parse_face(IMAGE[:, :200], landmarks68=dense)


def test_no_source_raises():
    with pytest.raises(ValueError, match="nothing to build a label map from"):
        parse_face(IMAGE)


def test_stored_map_with_unknown_label_raises():
    stored = STORED.copy()
    stored[0, 0] = 11
    with pytest.raises(ValueError, match=r"outside the LaPa labels 0..10 \(found \[11\]\)"):
        parse_face(IMAGE, stored_map=stored)


def test_parser_with_unknown_label_raises():
    with pytest.raises(ValueError, match="the face parser's output has values outside"):
        parse_face(IMAGE, parser=lambda images: np.full(images.shape[:3], 12, dtype=np.uint8))


def test_load_label_map_reads_palette_indices_not_colours(tmp_path):
    label_map = np.arange(11, dtype=np.uint8).repeat(3).reshape(3, 11)
    image = Image.fromarray(label_map, "P")
    image.putpalette(np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8).tobytes())
    image.save(tmp_path / "segmap.png")
    np.testing.assert_array_equal(load_label_map(tmp_path / "segmap.png"), label_map)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda path: Image.new("RGB", (4, 4)).save(path), "single-channel"),
        (lambda path: Image.fromarray(np.full((4, 4), 11, dtype=np.uint8)).save(path), "outside the LaPa labels"),
        (lambda path: path.write_text("not an image"), "cannot read the label map"),
    ],
    ids=["colour", "label 11", "text"],
)
def test_load_label_map_refuses_what_is_not_a_label_map(tmp_path, content, message):
    path = tmp_path / "segmap.png"
    content(path)
    with pytest.raises(ImageError, match=message):
        load_label_map(path)
