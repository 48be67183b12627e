"""prepare_face's label-map rule (issue 14: stored > the user's parser > dlib's 68 points > template), its
alignment check, and the memoised 68-point detection, on a real photo (skimage's astronaut)."""

import numpy as np
import pytest
import torch
from skimage import data
from skimage.transform import AffineTransform

import core.pipeline as pipeline_module
from cache import DiskCache, source_salt
from core import align as align_module
from core.dataset import Photo
from core.landmark_parts import label_map_from_68
from core.parse import LAPA_LABELS, landmark_template
from core.pipeline import ExplainSettings, SettingsError, found_landmarks68, prepare_face
from models import landmarks68 as landmarks68_module
from models.checkpoint import ModelCard
from models.landmarks68 import DenseLandmarksUnavailable, landmarks_68
from models.parser import build_face_parser, load_face_parser, predict_label_maps, save_face_parser

# MTCNN's landmarks of the astronaut (test_align measures them); given, so detection is skipped.
ASTRONAUT_LANDMARKS = np.array([[204.5, 101.6], [247.2, 103.9], [224.7, 129.0], [202.1, 140.2], [245.0, 142.5]])
SIZE = 96


@pytest.fixture(scope="module")
def astronaut():
    return data.astronaut()


@pytest.fixture(scope="module")
def parser(tmp_path_factory):
    torch.manual_seed(0)
    card = ModelCard(
        kind="face_parser",
        architecture="unet-resnet18",
        classes=LAPA_LABELS,
        input_size=32,
        channel_order="RGB",
        input_scale=1.0,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        weights="w",
    )
    return load_face_parser(save_face_parser(build_face_parser("resnet18"), card, tmp_path_factory.mktemp("p"), "p"))


def no_dlib(monkeypatch):
    def unavailable(*args, **kwargs):
        raise DenseLandmarksUnavailable("dlib is not installed here")

    monkeypatch.setattr(pipeline_module, "landmarks_68", unavailable)


@pytest.mark.filterwarnings("ignore:region .* is empty")  # the untrained parser and the one-label map miss parts
def test_the_sources_rank_stored_parser_landmarks68_template(astronaut, parser, monkeypatch):
    stored = np.full((SIZE, SIZE), 6, np.uint8)
    photo = Photo(astronaut, ASTRONAUT_LANDMARKS)
    with_map = Photo(astronaut, ASTRONAUT_LANDMARKS, stored)
    assert prepare_face(with_map, SIZE, ExplainSettings(parser=parser)).parse_source == "stored"
    by_parser = prepare_face(photo, SIZE, ExplainSettings(parser=parser))
    assert by_parser.parse_source == "parser"
    np.testing.assert_array_equal(by_parser.label_map, predict_label_maps(parser, by_parser.aligned[None])[0])

    dense = prepare_face(photo, SIZE, ExplainSettings())
    assert dense.parse_source == "landmarks68"
    # By hand: dlib's points carried into the aligned frame by the face's matrix, then drawn.
    points = landmarks_68(astronaut, ASTRONAUT_LANDMARKS).points
    aligned_points = AffineTransform(matrix=np.vstack([dense.matrix, [0, 0, 1]]))(points)
    np.testing.assert_array_equal(dense.label_map, label_map_from_68(aligned_points, SIZE))
    assert dense.alignment_check is not None and dense.alignment_check.warning is None

    template = prepare_face(photo, SIZE, ExplainSettings(landmark_parser="template"))
    assert template.parse_source == "template" and template.alignment_check is None  # nothing needed dlib
    np.testing.assert_array_equal(template.label_map, landmark_template(template.aligned_landmarks, SIZE))

    no_dlib(monkeypatch)  # dlib missing or failing: the template, and a note saying so
    fallback = prepare_face(photo, SIZE, ExplainSettings())
    assert fallback.parse_source == "template" and any("dlib is not installed" in n for n in fallback.notes)
    np.testing.assert_array_equal(fallback.label_map, template.label_map)
    assert fallback.alignment_check is not None and fallback.alignment_check.disagreement_iod is None
    # A stored map needs no dlib: nothing is looked up, no note.
    assert not any("dlib" in note for note in prepare_face(with_map, SIZE, ExplainSettings()).notes)


def test_a_detected_face_is_checked_even_when_parsed_otherwise(astronaut):
    face = prepare_face(Photo(astronaut), SIZE, ExplainSettings(landmark_parser="template"))
    assert face.parse_source == "template"
    check = face.alignment_check
    assert check is not None and check.dlib_detected and not check.cut_by_border
    assert check.disagreement_iod is not None and check.disagreement_iod < check.threshold_iod


def test_a_face_cut_through_an_eye_is_prepared_with_a_warning(astronaut):
    face = prepare_face(Photo(np.ascontiguousarray(astronaut[:, 215:])), SIZE, ExplainSettings())
    assert face.alignment_check is not None and face.alignment_check.cut_by_border
    assert face.alignment_check.warning is not None and "alignment is likely wrong" in face.alignment_check.warning


def test_the_68_points_are_memoised_under_their_modules(astronaut, tmp_path, monkeypatch):
    cache = DiskCache(tmp_path / "cache")
    first = prepare_face(Photo(astronaut, ASTRONAUT_LANDMARKS), SIZE, ExplainSettings(), cache)
    no_dlib(monkeypatch)
    again = prepare_face(Photo(astronaut, ASTRONAUT_LANDMARKS), SIZE, ExplainSettings(), cache)
    assert again.parse_source == "landmarks68" and again.notes == ()
    np.testing.assert_array_equal(first.label_map, again.label_map)
    assert found_landmarks68.salt() == source_salt(pipeline_module, landmarks68_module, align_module)


def test_an_unknown_landmark_parser_is_refused():
    with pytest.raises(SettingsError, match="landmark parser must be one of landmarks68, template"):
        ExplainSettings(landmark_parser="mediapipe")
