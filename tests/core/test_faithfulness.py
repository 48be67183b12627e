"""Region faithfulness (blanking) and the model-randomisation sanity check, on planted answers."""

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image
from scipy import ndimage, stats
from torch import nn

import core.pipeline as pipeline_module
from cache import DiskCache
from core.cli import main as cli_main
from core.dataset import names_in, open_dataset
from core.faithfulness import (
    CHANGED_BELOW,
    Cascade,
    blank_regions,
    faithfulness_summary,
    map_similarity,
    randomisation_check,
    randomised_classifier,
    region_faithfulness,
)
from core.pipeline import ExplainSettings, FaceSet, dataset_face_set
from core.regions import RegionMasks
from core.synth import SyntheticSpec, generate_dataset
from models.checkpoint import Classifier, ModelCard, save_checkpoint
from tests.conftest import face_in_a_wide_photo, tiny_resnet

SIZE = 32
REGIONS = ("eye", "nose", "mouth")

GRADIENT = ExplainSettings(methods=("Gradient",))


def unmasked(faces: np.ndarray, names: list[str]) -> FaceSet:
    """Faces for the randomisation check, which needs no regions."""
    return FaceSet(tuple(names), faces, RegionMasks((), np.zeros((len(faces), 0, *faces.shape[1:3]), bool)))


def _card(classes=("A", "B"), size=SIZE, **overrides) -> ModelCard:
    fields = dict(
        kind="classifier",
        architecture="resnet18",
        classes=classes,
        input_size=size,
        channel_order="RGB",
        input_scale=1.0,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        weights="none.safetensors",
    )
    return ModelCard(**{**fields, **overrides})


def _box_masks(n: int) -> np.ndarray:
    """Three disjoint boxes, the same on every face: N×3×SIZE×SIZE."""
    masks = np.zeros((3, SIZE, SIZE), dtype=bool)
    masks[0, 4:10, 4:28] = True
    masks[1, 12:20, 12:20] = True
    masks[2, 22:28, 8:24] = True
    return np.repeat(masks[None], n, axis=0)


class RegionReader(nn.Module):
    """Class A's logit is 8 × (mean input over one region − 0.5), class B's is 0: only that region matters."""

    mask: torch.Tensor  # a buffer

    def __init__(self, mask: np.ndarray):
        super().__init__()
        self.register_buffer("mask", torch.tensor(mask, dtype=torch.float32))

    def forward(self, x):
        mean = (x * self.mask).sum(dim=(1, 2, 3)) / (3 * self.mask.sum())
        return torch.stack([8 * (mean - 0.5), torch.zeros_like(mean)], dim=1)


@pytest.fixture(scope="module")
def planted():
    rng = np.random.default_rng(0)
    n = 8
    faces = rng.integers(0, 120, size=(n, SIZE, SIZE, 3), dtype=np.uint8)
    masks = _box_masks(n)
    eye = masks[0, 0]
    faces[:, eye] = rng.integers(150, 256, size=(n, eye.sum(), 3), dtype=np.uint8)
    network = RegionReader(eye).eval()
    classifier = Classifier(network=network, card=_card(), fingerprint="planted-region-reader")
    return classifier, faces, masks, [f"face{i}.png" for i in range(n)]


@pytest.mark.parametrize("mode", ["mean", "blur"])
def test_blanking_changes_the_region_and_leaves_every_other_pixel_byte_identical(planted, mode):
    _, faces, masks, _ = planted
    blanked = blank_regions(faces, masks, mode)
    assert blanked.shape == (len(faces), 3, SIZE, SIZE, 3) and blanked.dtype == np.uint8
    for r in range(3):
        outside = ~masks[:, r]
        np.testing.assert_array_equal(blanked[:, r][outside], faces[outside])
        assert (blanked[:, r][masks[:, r]] != faces[masks[:, r]]).any()
    if mode == "mean":
        expected = np.round(faces.reshape(len(faces), -1, 3).mean(axis=1))  # hand-computed fill colour
        np.testing.assert_array_equal(blanked[:, 1, 15, 15], expected)
    else:  # the region's pixels are a Gaussian blur of the face (σ = 5% of the side), independently computed
        sigma = 0.05 * SIZE
        reference = np.stack(
            [ndimage.gaussian_filter(faces[0, ..., c].astype(float), sigma, mode="reflect") for c in range(3)], axis=-1
        )
        inside = masks[0, 1]
        np.testing.assert_allclose(blanked[0, 1][inside], np.clip(reference[inside].round(), 0, 255), atol=1)


def test_blanking_refuses_an_unknown_mode(planted):
    _, faces, masks, _ = planted
    with pytest.raises(ValueError, match="blank must be one of mean, blur"):
        blank_regions(faces, masks, "erase")


def test_planted_region_takes_the_whole_drop_and_gradient_ranks_it_first(planted):
    classifier, faces, masks, names = planted
    result = region_faithfulness(classifier, FaceSet(names, faces, RegionMasks(REGIONS, masks)), GRADIENT, blank="mean")
    drops = result.drops
    assert drops.columns == ["image_name", "region", "target", "baseline_probability", "blanked_probability", "drop"]
    assert drops.height == 8 * 3 and set(drops["target"]) == {"A"}
    # Hand-computed: p(A) = sigmoid(8 (m − 0.5)), m the mean of the eye pixels before and after blanking.
    eye = masks[0, 0]
    before = faces[:, eye].reshape(len(faces), -1).mean(axis=1) / 255
    after = np.round(faces.reshape(len(faces), -1, 3).mean(axis=1)).mean(axis=1) / 255
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    eye_rows = drops.filter(pl.col("region") == "eye")
    np.testing.assert_allclose(eye_rows["baseline_probability"], sigmoid(8 * (before - 0.5)), rtol=1e-5)
    np.testing.assert_allclose(eye_rows["drop"], sigmoid(8 * (before - 0.5)) - sigmoid(8 * (after - 0.5)), atol=1e-6)
    assert (eye_rows["drop"] > 0.1).all()
    assert (drops.filter(pl.col("region") != "eye")["drop"] == 0).all()
    # The gradient lives on the eye only: C = (1, 0, 0) on every face.
    scores = result.scores.filter(pl.col("region") == "eye")["score"]
    np.testing.assert_allclose(scores, 1.0)
    row = result.summary.row(0, named=True)
    assert row["method"] == "Gradient" and row["rho"] == pytest.approx(1.0) and row["n"] == 8
    assert row["p"] == pytest.approx(2 * 0.5**8)  # exact signed-rank p: all 8 per-image ρ positive
    # Pooled over 24 pairs: C ranks 8.5 (16 zeros) and 20.5 (8 ones); drop ranks 8.5 (16 zeros) and 17..24.
    # Centred: (−4)×16, 8×8 and (−4)×16, 4.5..11.5, so ρ = 768 / √(768 · 810) — below 1 only for the ties in C.
    assert row["rho_pooled"] == pytest.approx(np.sqrt(768 / 810)) and row["n_pooled"] == 24
    assert row["p_pooled"] < 1e-6


def test_an_empty_region_has_no_drop_and_no_score_and_is_left_out(planted):
    classifier, faces, masks, names = planted
    masks = masks.copy()
    masks[0, 2] = False  # face0 has no mouth
    with pytest.warns(RuntimeWarning, match="empty region"):
        result = region_faithfulness(classifier, FaceSet(names, faces, RegionMasks(REGIONS, masks)), GRADIENT)
    missing = result.drops.filter((pl.col("image_name") == "face0.png") & (pl.col("region") == "mouth"))
    assert np.isnan(missing["blanked_probability"][0]) and np.isnan(missing["drop"][0])
    row = result.summary.row(0, named=True)
    assert row["n"] == 7 and row["n_pooled"] == 23  # face0 keeps two regions: too few for its own ρ


def test_summary_against_hand_computed_correlations():
    drops = pl.DataFrame(
        {
            "image_name": ["a"] * 3 + ["b"] * 3 + ["c"] * 3,
            "region": list(REGIONS) * 3,
            "drop": [0.3, 0.2, 0.1, 0.3, 0.2, 0.1, 0.5, float("nan"), 0.0],
        },
        nan_to_null=False,
    )
    scores = pl.DataFrame(
        {
            "image_name": ["a"] * 3 + ["b"] * 3 + ["c"] * 3,
            "method": "M",
            "region": list(REGIONS) * 3,
            "score": [0.9, 0.5, 0.1, 0.1, 0.5, 0.9, 0.7, 0.2, 0.3],
        }
    )
    row = faithfulness_summary(drops, scores).row(0, named=True)
    # a agrees (ρ = 1), b is reversed (ρ = −1), c has only two regions with a drop: undefined, left out.
    assert row["rho"] == 0.0 and row["rho_std"] == pytest.approx(np.sqrt(2)) and row["n"] == 2
    # Pooled over the 8 finite pairs: drops (.3 .2 .1 .3 .2 .1 .5 0) vs scores (.9 .5 .1 .1 .5 .9 .7 .3);
    # ranks (6.5 4.5 2.5 6.5 4.5 2.5 8 1) and (7.5 4.5 1.5 1.5 4.5 7.5 6 3), both of mean 4.5; centred
    # (2 0 −2 2 0 −2 3.5 −3.5) and (3 0 −3 −3 0 3 1.5 −1.5): ρ = 10.5 / √(40.5 · 40.5).
    assert row["rho_pooled"] == pytest.approx(10.5 / 40.5)
    assert row["n_pooled"] == 8


@pytest.fixture(scope="module")
def resnet_classifier():
    network = tiny_resnet(num_classes=3, seed=2)
    card = _card(classes=("A", "B", "C"), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    return Classifier(network=network, card=card, fingerprint="tiny-resnet")


@pytest.fixture(scope="module")
def textured_faces():
    rng = np.random.default_rng(5)
    smooth = ndimage.gaussian_filter(rng.normal(size=(4, SIZE, SIZE, 3)), sigma=(0, 2, 2, 0))
    return np.clip(128 + 400 * smooth, 0, 255).astype(np.uint8)


def test_randomising_top_layers_copies_the_model_and_changes_gradient_maps(resnet_classifier, textured_faces, tmp_path):
    before = {k: v.clone() for k, v in resnet_classifier.network.state_dict().items()}
    names = [f"f{i}" for i in range(len(textured_faces))]
    # Through a cache: were the randomised copy's fingerprint the trained one's, its maps would be served
    # from the trained model's entries and correlate perfectly.
    result = randomisation_check(
        resnet_classifier,
        unmasked(textured_faces, names),
        GRADIENT,
        cascade=Cascade(("fc", "layer4")),
        cache=DiskCache(tmp_path / "cache"),
    )
    after = resnet_classifier.network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit
    summary = result.summary
    assert summary["randomised"].to_list() == ["fc", "fc+layer4"]
    assert summary.columns == [
        "method",
        "randomised",
        "rank_correlation_mean",
        "rank_correlation_std",
        "ssim_mean",
        "ssim_std",
        "n",
        "changed",
    ]
    assert (result.per_image["rank_correlation"] < 1).all() and (result.per_image["ssim"] < 1).all()
    assert summary["n"].to_list() == [4, 4]


def test_randomised_copy_differs_only_in_the_named_layers(resnet_classifier):
    copy = randomised_classifier(resnet_classifier, ["fc", "layer4"], seed=1)
    trained, randomised = resnet_classifier.network.state_dict(), copy.network.state_dict()
    changed = {k.split(".")[0] for k in trained if not torch.equal(trained[k], randomised[k])}
    assert changed == {"fc", "layer4"}
    assert copy.fingerprint != resnet_classifier.fingerprint
    again = randomised_classifier(resnet_classifier, ["fc", "layer4"], seed=1)
    assert again.fingerprint == copy.fingerprint  # seeded: reproducible
    assert randomised_classifier(resnet_classifier, ["fc"], seed=1).fingerprint != copy.fingerprint
    with pytest.raises(Exception, match="no layer"):
        randomised_classifier(resnet_classifier, ["layer9"])


def test_a_model_independent_map_scores_correlation_one(resnet_classifier, textured_faces, monkeypatch):
    """An edge detector ignores the model: the check must see its maps unchanged under randomisation."""

    def edges(classifier, images, targets, method, params=None, cache=None):
        grey = images.astype(np.float32).mean(axis=3)
        magnitude = np.hypot(ndimage.sobel(grey, axis=1), ndimage.sobel(grey, axis=2))
        return magnitude, magnitude

    monkeypatch.setattr(pipeline_module, "attribution_sums", edges)
    names = [f"f{i}" for i in range(len(textured_faces))]
    result = randomisation_check(
        resnet_classifier, unmasked(textured_faces, names), GRADIENT, cascade=Cascade(("fc", "layer4"))
    )
    np.testing.assert_allclose(result.per_image["rank_correlation"], 1.0)
    np.testing.assert_allclose(result.per_image["ssim"], 1.0)
    assert not result.summary["changed"].any()


def test_map_similarity_matches_scipy_and_marks_constant_maps(rng):
    a, b = rng.random((2, 3, 16, 16))
    b[2] = 0.0
    rank_correlation, _ssim = map_similarity(a, b)
    for i in range(2):
        assert rank_correlation[i] == pytest.approx(stats.spearmanr(a[i].ravel(), b[i].ravel()).statistic)
    assert np.isnan(rank_correlation[2])
    assert map_similarity(a, a)[1] == pytest.approx(np.ones(3))
    assert CHANGED_BELOW == 0.5


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("faithfulness") / "data"
    generate_dataset(root, SyntheticSpec(n_per_class=4, seed=3, size=64, photos_per_person=1), workers=1)
    dataset = open_dataset(root)
    card = _card(classes=dataset.classes, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), fold="fold-1")
    card_path = save_checkpoint(
        tiny_resnet(num_classes=len(dataset.classes), seed=1), card, root / "models", "classifier-fold-1"
    )
    return root, card_path


def test_cli_faithfulness_and_sanity_write_their_tables(tiny_dataset, tmp_path, capsys):
    root, card_path = tiny_dataset
    n_test = len(names_in(open_dataset(root), "fold-1", "test"))
    assert n_test >= 2
    out = tmp_path / "faith.csv"
    assert (
        cli_main(
            [
                "faithfulness",
                str(root),
                "--model",
                str(card_path),
                "--methods",
                "Gradient,LayerGradCam",
                "--limit",
                "2",
                "--blank",
                "blur",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    summary = pl.read_csv(out)
    assert summary["method"].to_list() == ["Gradient", "LayerGradCam"] and summary["blank"].to_list() == ["blur"] * 2
    drops = pl.read_csv(tmp_path / "faith-drops.csv")
    assert drops.height == 2 * 3 and set(drops["region"]) == set(REGIONS)
    assert "rho_pooled" in capsys.readouterr().out

    out = tmp_path / "sanity.csv"
    assert (
        cli_main(
            [
                "sanity",
                str(root),
                "--methods",
                "Gradient",
                "--limit",
                "2",
                "--target",
                "true",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )  # default model: the dataset's fold-1 card
    summary = pl.read_csv(out)
    assert summary["randomised"].to_list() == ["fc", "fc+layer4"] and summary["n"].to_list() == [2, 2]
    assert pl.read_csv(tmp_path / "sanity-per-image.csv").height == 2 * 2


def test_cli_refuses_an_unknown_layer_in_one_line(tiny_dataset, capsys):
    root, card_path = tiny_dataset
    assert (
        cli_main(
            [
                "sanity",
                str(root),
                "--model",
                str(card_path),
                "--methods",
                "Gradient",
                "--limit",
                "1",
                "--cascade",
                "fc,layer9",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "layer9" in err and "Traceback" not in err


def _one_face_dataset(root, image: np.ndarray, label_map: np.ndarray, landmarks: np.ndarray):
    for folder in ("images", "metadata", "features/segmaps"):
        (root / folder).mkdir(parents=True)
    Image.fromarray(image).save(root / "images" / "WSSlide1.png", compress_level=1)
    Image.fromarray(label_map).save(root / "features" / "segmaps" / "WSSlide1.png", compress_level=1)
    (root / "metadata" / "partitions.csv").write_text(
        "image_name,label,fold-1,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5\n"
        "WSSlide1.png,WS,test," + ",".join(f"{v:.4f}" for v in landmarks.ravel()) + "\n"
    )
    return open_dataset(root)


def _box(mask: np.ndarray) -> np.ndarray:
    """First and last row and column of a mask."""
    pixels = np.argwhere(mask)
    return np.concatenate([pixels.min(axis=0), pixels.max(axis=0)])


def test_dataset_faces_of_a_photo_over_4096_px_match_the_face_alone(tmp_path):
    """A rendered face at the right end of a 4400 px wide photo: loading shrinks the photo to 4096 px,
    so its landmarks and label map (in the file's pixels) must shrink with it. Unscaled, every landmark
    lies past the shrunk photo's right edge (a NoFaceError) and the map fits neither photo nor face."""
    face, photo, label_map, points = face_in_a_wide_photo()
    alone = _one_face_dataset(tmp_path / "alone", face.image, face.label_map, face.landmarks)
    wide = _one_face_dataset(tmp_path / "wide", photo, label_map, points)
    reference_set, face_set = (
        dataset_face_set(alone, ["WSSlide1.png"], 64),
        dataset_face_set(wide, ["WSSlide1.png"], 64),
    )
    reference, reference_masks = reference_set.aligned, reference_set.masks
    faces, masks = face_set.aligned, face_set.masks
    assert np.abs(faces.astype(int) - reference.astype(int)).mean() < 6  # measured 1.4: resampling only
    assert all(m.any() for m in reference_masks.masks[0])
    for region, got, want in zip(masks.names, masks.masks[0], reference_masks.masks[0]):
        assert np.abs(_box(got) - _box(want)).max() <= 1, region  # each edge of each region within a pixel


def test_raw_maps_are_compared_min_max_normalised_in_the_randomisation_check(resnet_classifier, textured_faces):
    import dataclasses

    faces = unmasked(textured_faces, [f"f{i}" for i in range(len(textured_faces))])
    cascade = Cascade(("fc",))
    raw = randomisation_check(resnet_classifier, faces, dataclasses.replace(GRADIENT, mode="abs-raw"), cascade)
    normalised = randomisation_check(resnet_classifier, faces, dataclasses.replace(GRADIENT, mode="abs"), cascade)
    assert raw.per_image.equals(normalised.per_image)
