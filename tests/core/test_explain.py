"""The whole pipeline on a real photo, its memoisation, and the CLI around it."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.distance import mahalanobis
from skimage import data

import core.pipeline as pipeline_module
from cache import DiskCache
from core.align import align_face
from core.attribute import attribute
from core.cli import main as cli_main
from core.dataset import Photo
from core.domain import fit_domain_guard
from core.errors import UserFacingError
from core.explain import explain
from core.parse import landmark_template
from core.pipeline import ExplainSettings, LabelMapError, TargetError, attribution_sums, prepare_face
from core.regions import PAPER_REGIONS, region_masks
from core.score import region_scores, relevance_map
from models.checkpoint import load_classifier, preprocess, save_checkpoint
from models.domain_guard import penultimate_features, save_domain_guard
from tests.conftest import counting_attributions, face_in_a_wide_photo, tiny_card, tiny_resnet

# MTCNN's landmarks of skimage's astronaut (see test_align); given here so most tests skip detection.
ASTRONAUT_LANDMARKS = np.array([[204.5, 101.6], [247.2, 103.9], [224.7, 129.0], [202.1, 140.2], [245.0, 142.5]])
SIZE = 64  # tiny classifier input: fast, and still a real ResNet


@pytest.fixture(scope="module")
def card_path(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    card = tiny_card(("A", "B", "Unaffected"), SIZE, weights="tiny.safetensors", fold="fold-1")
    return save_checkpoint(tiny_resnet(num_classes=3, seed=4), card, folder, "tiny")


@pytest.fixture(scope="module")
def classifier(card_path):
    return load_classifier(card_path)


GRADIENT = ExplainSettings(methods=("Gradient",)).method_params("Gradient")


@pytest.fixture(scope="module")
def photo():
    return data.astronaut()


def test_explain_equals_the_pipeline_composed_by_hand(classifier, photo):
    settings = ExplainSettings(methods=("Gradient", "DeepLIFT"), landmark_parser="template")
    result = explain(Photo(photo, ASTRONAUT_LANDMARKS), classifier, settings)
    aligned = align_face(photo, ASTRONAUT_LANDMARKS, size=SIZE)
    masks = region_masks(landmark_template(aligned.landmarks, SIZE), PAPER_REGIONS)
    batch = preprocess(aligned.image[None], classifier.card)
    predicted = int(classifier.network(batch).argmax())
    assert result.target == result.predicted == predicted
    for method in ("Gradient", "DeepLIFT"):
        maps = relevance_map(attribute(classifier.network, batch, [predicted], method))
        np.testing.assert_allclose(result.maps[method], maps[0], atol=1e-6)
        np.testing.assert_allclose(result.scores[method], region_scores(maps, masks.masks)[0], atol=1e-6)
    assert result.face.parse_source == "template"
    assert result.face.region_names == ("eye", "nose", "mouth")
    np.testing.assert_allclose(result.probabilities.sum(), 1.0, atol=1e-5)


def test_target_by_name_and_relevance_modes(classifier, photo):
    result = explain(
        Photo(photo, ASTRONAUT_LANDMARKS), classifier, ExplainSettings(methods=("Gradient",), target="B", mode="signed")
    )
    assert result.target == 1 and result.summary()["target"] == "B"
    assert result.maps["Gradient"].min() < 0 <= result.maps["Gradient"].max() <= 1
    assert issubclass(TargetError, UserFacingError) and issubclass(TargetError, ValueError)
    with pytest.raises(TargetError, match="unknown target class 'Z'; the model knows A, B, Unaffected"):
        explain(Photo(photo, ASTRONAUT_LANDMARKS), classifier, ExplainSettings(methods=("Gradient",), target="Z"))
    with pytest.raises(TargetError, match=r"target index 3 is outside 0\.\.2"):
        explain(Photo(photo, ASTRONAUT_LANDMARKS), classifier, ExplainSettings(methods=("Gradient",), target="3"))


def test_cached_explanations_are_identical_and_skip_the_model(classifier, photo, tmp_path, monkeypatch):
    cache = DiskCache(tmp_path / "cache")
    first = explain(
        Photo(photo, ASTRONAUT_LANDMARKS), classifier, ExplainSettings(methods=("LRP-EpsilonPlus", "SmoothGrad")), cache
    )
    calls = []

    def recomputed(*a, **k):
        calls.append(a)
        pytest.fail("recomputed")

    monkeypatch.setattr(pipeline_module, "attribute", recomputed)
    second = explain(
        Photo(photo, ASTRONAUT_LANDMARKS), classifier, ExplainSettings(methods=("LRP-EpsilonPlus", "SmoothGrad")), cache
    )
    assert not calls
    for method in first.maps:
        np.testing.assert_array_equal(first.maps[method], second.maps[method])
    # Another relevance mode or region spec reuses the same cached attributions.
    explain(
        Photo(photo, ASTRONAUT_LANDMARKS), classifier, ExplainSettings(methods=("SmoothGrad",), mode="positive"), cache
    )


def test_batch_lookup_computes_only_missing_images(classifier, photo, tmp_path, monkeypatch):
    cache = DiskCache(tmp_path / "cache")
    faces = np.stack([align_face(photo, ASTRONAUT_LANDMARKS + shift, SIZE).image for shift in (0, 3, 6)])
    attribution_sums(classifier, faces[:2], [0, 1], "Gradient", GRADIENT, cache)
    seen = counting_attributions(monkeypatch)
    abs_sum, _ = attribution_sums(classifier, faces, [0, 1, 2], "Gradient", GRADIENT, cache)
    assert seen == [1]
    direct = attribute(classifier.network, preprocess(faces, classifier.card), [0, 1, 2], "Gradient")
    np.testing.assert_allclose(abs_sum, direct.abs().sum(1).numpy(), atol=1e-6)


def test_prepare_face_detects_the_face_itself(photo):
    face = prepare_face(Photo(photo), 224, ExplainSettings())
    assert np.abs(face.landmarks - ASTRONAUT_LANDMARKS).max() < 2.0
    assert face.masks.shape == (3, 224, 224) and all(m.any() for m in face.masks)


def test_cli_explain_prints_json(card_path, tmp_path, capsys):
    path = tmp_path / "face.png"
    Image.fromarray(data.astronaut()).save(path)
    landmarks = ",".join(f"{v:g}" for v in ASTRONAUT_LANDMARKS.ravel())
    code = cli_main(
        [
            "explain",
            str(path),
            "--model",
            str(card_path),
            "--methods",
            "Gradient,LayerGradCam",
            "--landmarks",
            landmarks,
            "--quiet",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["region_scores"]) == {"Gradient", "LayerGradCam"}
    assert set(out["region_scores"]["Gradient"]) == {"eye", "nose", "mouth"}
    assert out["prediction"]["class"] in ("A", "B", "Unaffected")
    # Issue 14: a photo's parts come from dlib's 68 points, which also check the five given ones.
    assert out["parse_source"] == "landmarks68"
    check = out["alignment_check"]
    assert check["warning"] is None and check["cut_by_border"] is False and check["dlib_detected"] is True
    assert 0 <= check["disagreement_iod"] < check["threshold_iod"]
    # Issue 14: a model without an out-of-domain guard says so instead of a verdict.
    assert out["domain"]["out_of_domain"] is None and "fit-domain" in out["domain"]["reason"]


def test_cli_explain_warns_when_the_face_is_cut_through_an_eye(card_path, tmp_path, capsys):
    path = tmp_path / "cut.png"
    Image.fromarray(data.astronaut()[:, 215:]).save(path)
    assert cli_main(["explain", str(path), "--model", str(card_path), "--methods", "Gradient", "--quiet"]) == 0
    check = json.loads(capsys.readouterr().out)["alignment_check"]
    assert check["cut_by_border"] is True and check["disagreement_iod"] > check["threshold_iod"]
    assert check["warning"].startswith("The alignment is likely wrong")
    whole = tmp_path / "face.png"
    Image.fromarray(data.astronaut()).save(whole)
    landmarks = ",".join(f"{v:g}" for v in ASTRONAUT_LANDMARKS.ravel())
    template = ["--landmark-parser", "template", "--landmarks", landmarks, "--methods", "Gradient", "--quiet"]
    assert cli_main(["explain", str(whole), "--model", str(card_path), *template]) == 0
    given = json.loads(capsys.readouterr().out)
    assert given["parse_source"] == "template" and given["alignment_check"] is None  # nothing asked for dlib


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"", "empty"), (b"just some text", "not an image"), (None, "no face")],
)
def test_cli_turns_bad_input_into_one_clear_line(content, expected, card_path, tmp_path, capsys):
    path = tmp_path / "upload.jpg"
    if content is None:
        Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(path)
    else:
        path.write_bytes(content)
    assert cli_main(["explain", str(path), "--model", str(card_path), "--methods", "Gradient"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err.lower() and "Traceback" not in err


def test_a_stored_label_map_that_fits_neither_photo_nor_face_is_a_user_facing_error(card_path, photo, tmp_path, capsys):
    wrong = np.zeros((40, 50), np.uint8)  # the photo is 512×512, the aligned face 64×64
    message = r"the stored label map is 50×40 but the photo is 512×512 \(and the aligned face 64×64\); it fits neither"
    with pytest.raises(LabelMapError, match=message):
        prepare_face(Photo(photo, ASTRONAUT_LANDMARKS, wrong), SIZE, ExplainSettings())
    assert issubclass(LabelMapError, UserFacingError)
    # Both frames a map may come in are accepted: the photo's (warped) and the aligned face's (as is).
    for fitting in (np.ones(photo.shape[:2], np.uint8), np.ones((SIZE, SIZE), np.uint8)):
        assert (
            prepare_face(Photo(photo, ASTRONAUT_LANDMARKS, fitting), SIZE, ExplainSettings()).parse_source == "stored"
        )
    path, segmap = tmp_path / "face.png", tmp_path / "map.png"
    Image.fromarray(photo).save(path)
    Image.fromarray(wrong).save(segmap)
    landmarks = ",".join(f"{v:g}" for v in ASTRONAUT_LANDMARKS.ravel())
    assert (
        cli_main(
            [
                "explain",
                str(path),
                "--model",
                str(card_path),
                "--methods",
                "Gradient",
                "--landmarks",
                landmarks,
                "--segmap",
                str(segmap),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: the stored label map is 50×40") and "Traceback" not in err


def test_cli_explain_of_a_photo_over_4096_px_scales_the_given_landmarks_and_label_map(card_path, tmp_path, capsys):
    """A rendered face at the right end of a 4400 px wide photo, shrunk to 4096 px on loading: its landmarks
    and photo-sized label map, given in the file's pixels, shrink with it, so the explanation is the face
    alone's up to resampling, and the landmarks printed are the file's again. (Unscaled, every landmark lay
    past the shrunk photo's edge and the map fitted neither photo nor face.)"""
    face, wide, wide_map, wide_points = face_in_a_wide_photo()
    outputs = {}
    for name, image, label_map, points in (
        ("alone", face.image, face.label_map, face.landmarks),
        ("wide", wide, wide_map, wide_points),
    ):
        Image.fromarray(image).save(tmp_path / f"{name}.png", compress_level=1)
        Image.fromarray(label_map).save(tmp_path / f"{name}-map.png", compress_level=1)
        assert (
            cli_main(
                [
                    "explain",
                    str(tmp_path / f"{name}.png"),
                    "--model",
                    str(card_path),
                    "--quiet",
                    "--methods",
                    "Gradient,LayerGradCam",
                    "--segmap",
                    str(tmp_path / f"{name}-map.png"),
                    "--landmarks",
                    ",".join(f"{v:.4f}" for v in points.ravel()),
                ]
            )
            == 0
        )
        outputs[name] = json.loads(capsys.readouterr().out)
    alone, shrunk = outputs["alone"], outputs["wide"]
    np.testing.assert_allclose(shrunk["landmarks"], wide_points, atol=0.01)
    assert shrunk["parse_source"] == alone["parse_source"] == "stored"
    assert shrunk["prediction"]["class"] == alone["prediction"]["class"]
    # Measured: probabilities within 0.007, region scores (0..1) within 0.05 (masks move by a pixel at 64 px).
    np.testing.assert_allclose(list(shrunk["probabilities"].values()), list(alone["probabilities"].values()), atol=0.02)
    for method in ("Gradient", "LayerGradCam"):
        np.testing.assert_allclose(
            list(shrunk["region_scores"][method].values()), list(alone["region_scores"][method].values()), atol=0.1
        )


def test_cli_without_a_model_says_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XAI_DATA_DIR", str(tmp_path))
    path = tmp_path / "face.png"
    Image.fromarray(data.astronaut()).save(path)
    assert cli_main(["explain", str(path)]) == 2
    assert "--model" in capsys.readouterr().err


def test_cli_refuses_a_card_that_does_not_fit_its_weights(card_path, tmp_path, capsys):
    card = json.loads(card_path.read_text())
    card["classes"] = ["only", "two"]
    card["weights"] = str(card_path.with_suffix(".safetensors"))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(card))
    path = tmp_path / "face.png"
    Image.fromarray(data.astronaut()).save(path)
    assert cli_main(["explain", str(path), "--model", str(wrong)]) == 2
    assert "2 classes" in capsys.readouterr().err


def test_unknown_method_is_an_argument_error(capsys):
    with pytest.raises(SystemExit):
        cli_main(["explain", "x.jpg", "--methods", "Magic"])
    assert "unknown method" in capsys.readouterr().err


def test_explain_module_has_no_torch_state_leak(classifier, photo):
    before = {k: v.clone() for k, v in classifier.network.state_dict().items()}
    explain(
        Photo(photo, ASTRONAUT_LANDMARKS),
        classifier,
        ExplainSettings(methods=("LRP-EpsilonAlpha2Beta1Flat", "GuidedGradCam")),
    )
    after = classifier.network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("shift, flagged", [(0.0, False), (50.0, True)])
def test_explain_reports_a_planted_guard_in_its_json(tmp_path, capsys, shift, flagged):
    """Issue 14: a guard fitted on features planted around the photo's own (shift 0) passes it; one planted
    50 units away in every feature flags it. The score is scipy's Mahalanobis distance to the nearest mean."""
    card_path = save_checkpoint(
        tiny_resnet(num_classes=3, seed=4), tiny_card(("A", "B", "Unaffected"), SIZE), tmp_path, "m"
    )
    classifier = load_classifier(card_path)
    settings = ExplainSettings(methods=("Gradient",))
    face = prepare_face(Photo(data.astronaut(), ASTRONAUT_LANDMARKS), SIZE, settings)
    features = penultimate_features(classifier.network, preprocess(face.aligned[None], classifier.card))[0]
    rng = np.random.default_rng(0)
    planted = features + shift + 0.05 * rng.normal(size=(120, features.size))
    guard = fit_domain_guard(planted[:80], ["a", "b"] * 40, planted[80:], classifier.fingerprint)
    save_domain_guard(guard, card_path)
    result = explain(Photo(data.astronaut(), ASTRONAUT_LANDMARKS), load_classifier(card_path), settings)
    assert result.domain is not None and result.domain.out_of_domain is flagged
    expected = min(mahalanobis(features, mean, guard.precision) for mean in guard.means)
    assert result.domain.score == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert result.summary()["domain"] == {
        "score": round(result.domain.score, 4),
        "threshold": round(guard.threshold, 4),
        "out_of_domain": flagged,
    }
    path = tmp_path / "face.png"
    Image.fromarray(data.astronaut()).save(path)
    landmarks = ",".join(f"{v:g}" for v in ASTRONAUT_LANDMARKS.ravel())
    argv = ["explain", str(path), "--model", str(card_path), "--methods", "Gradient", "--landmarks", landmarks]
    assert cli_main([*argv, "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["domain"]["out_of_domain"] is flagged
