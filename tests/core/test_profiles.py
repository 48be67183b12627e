"""The fidelity profiles: the paper profile gives the released code's behaviour, knob by knob, checked
against independent computations; the project profile changes nothing; the CLI flag reaches each command."""

import dataclasses

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerAttribution, LayerDeepLift
from scipy import stats
from sklearn.feature_selection import chi2 as sklearn_chi2
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonPlusFlat

from core.annotations import read_annotations
from core.attribute import METHOD_NAMES, attribute
from core.cli import _settings, build_parser, main
from core.hpo import region_counts, term_tsne, term_vectors
from core.pipeline import ExplainSettings, SettingsError, relevance_maps
from core.profiles import PAPER, PAPER_RQ1_SYNDROMES, PROFILE_NAMES, PROFILES, PROJECT, ProfileError, apply, profile
from core.score import channel_sums, region_scores, relevance_from_sums
from core.stats import compare_groups
from models.checkpoint import Classifier
from tests.conftest import tiny_card, tiny_resnet

LRP = ("LRP-EpsilonPlus", "LRP-EpsilonPlusFlat", "LRP-EpsilonAlpha2Beta1", "LRP-EpsilonAlpha2Beta1Flat")


def test_the_project_profile_changes_no_setting_and_so_no_cache_key():
    for split in (None, "val", "test", "all"):
        assert apply(ExplainSettings(), profile(PROJECT), split=split) == ExplainSettings()
    positive = ExplainSettings(mode="positive")
    assert apply(positive, profile(PROJECT), split="val") == positive


def test_the_paper_profile_sets_every_released_knob():
    paper = profile(PAPER)
    rq1 = apply(ExplainSettings(), paper, split="val")
    assert rq1.mode == "abs-raw"
    assert apply(ExplainSettings(), paper, split="test").mode == "abs"
    assert apply(ExplainSettings(mode="positive"), paper).mode == "positive"  # no RQ split: the user's mode
    assert apply(ExplainSettings(), paper, split="val", mode="signed").mode == "signed"  # an explicit mode wins
    assert rq1.method_params("LayerDeepLIFT")["reduce_channels"] is False
    assert all(rq1.method_params(m)["canonizer"] == "batchnorm-only" for m in LRP)
    # Only those: every other method keeps its parameters.
    for method in set(METHOD_NAMES) - {"LayerDeepLIFT", *LRP}:
        assert rq1.method_params(method) == ExplainSettings().method_params(method)
    assert paper.rq1_syndromes == ("22q11DS", "Angelman", "KS", "NS", "WS")
    assert paper.region_count_options() == {"weighting": "paper"}
    assert paper.chi2_options() == {"statistic": "paper"}
    assert paper.tsne_options() == {"perplexity": 10.0, "init": "random", "method": "barnes_hut"}
    assert set(PROFILES) == set(PROFILE_NAMES)
    with pytest.raises(ProfileError, match="unknown profile 'authors'"):
        profile("authors")
    with pytest.raises(ValueError, match="canonizer must be one of"):
        dataclasses.replace(paper, lrp_canonizer="none")


def test_a_profile_keeps_to_the_chosen_methods_and_refuses_a_bad_mode():
    settings = apply(ExplainSettings(methods=("Gradient",)), profile(PAPER), split="val")
    assert settings.methods == ("Gradient",) and settings.mode == "abs-raw"
    with pytest.raises(SettingsError, match="mode must be one of"):
        apply(ExplainSettings(), profile(PAPER), mode="log")


# --- raw relevance (Table 3) ----------------------------------------------------------------------


def test_abs_raw_region_scores_are_the_mean_of_the_absolute_channel_sum_by_hand(rng):
    attribution = rng.normal(size=(2, 3, 8, 8)).astype(np.float32) * np.float32(1e-4)  # LRP-sized values
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 1:4, 2:6] = True
    masks[1, 5:8, 0:3] = True
    maps = relevance_from_sums(*channel_sums(attribution), "abs-raw")
    scores = region_scores(maps, masks)
    for image in range(2):
        for region in range(2):
            total = 0.0
            for y, x in zip(*np.nonzero(masks[region])):
                total += sum(abs(float(attribution[image, c, y, x])) for c in range(3))
            assert scores[image, region] == pytest.approx(total / masks[region].sum(), rel=1e-5)
    # Not the min–max scores: the released Table 3 and Table 4 differ in exactly this.
    assert not np.allclose(scores, region_scores(relevance_from_sums(*channel_sums(attribution), "abs"), masks))


# --- LayerDeepLIFT per channel -----------------------------------------------------------------------


def test_paper_layer_deeplift_is_captum_upsampled_per_channel_then_abs_summed(small_model, small_batch):
    targets = [0, 2, 3]
    settings = apply(ExplainSettings(methods=("LayerDeepLIFT",)), profile(PAPER))
    ours = channel_sums(
        attribute(small_model, small_batch, targets, "LayerDeepLIFT", settings.method_params("LayerDeepLIFT"))
    )[0]
    # As extract_region_coefficients.py: Captum's layer attribution, every channel upsampled, then |·| summed.
    layer = LayerDeepLift(small_model, small_model.layer4).attribute(
        small_batch.clone().requires_grad_(True), baselines=0.0, target=torch.tensor(targets)
    )
    assert layer.shape[1] == 512  # all channels of the tiny ResNet-18's layer4 (2048 in a ResNet-50)
    released = LayerAttribution.interpolate(layer.detach(), (32, 32), interpolate_mode="bicubic").abs().sum(dim=1)
    np.testing.assert_allclose(ours, released.numpy(), rtol=1e-4, atol=1e-6)
    project = channel_sums(attribute(small_model, small_batch, targets, "LayerDeepLIFT"))[0]
    assert not np.allclose(project, ours, rtol=0.05)


# --- LRP without residual canonizers ---------------------------------------------------------------------


def test_paper_lrp_is_zennit_with_only_the_batch_norm_merges(small_model, small_batch):
    targets = torch.tensor([0, 2, 3])
    settings = apply(ExplainSettings(methods=LRP), profile(PAPER))
    ours = attribute(small_model, small_batch, targets, "LRP-EpsilonPlusFlat", settings.method_params(LRP[1]))
    x = small_batch.clone().requires_grad_(True)
    composite = EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()], epsilon=1e-6, stabilizer=1e-6)
    with Gradient(model=small_model, composite=composite) as attributor:
        _, expected = attributor(x, lambda out: F.one_hot(targets, out.shape[1]).to(out.dtype))
    torch.testing.assert_close(ours, expected)


# --- the statistics' knobs ----------------------------------------------------------------------------


def _study(labels: tuple[str, ...], seed: int = 3) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for label in labels:
        shift = 0.1 if label in ("KS", "Down") else 0.0
        for k in range(12):
            for region in ("eye", "nose", "mouth"):
                rows.append(
                    {
                        "image_name": f"{label}Slide{k}.jpg",
                        "label": label,
                        "model": "classifier-fold-1",
                        "method": "Gradient",
                        "region": region,
                        "score": float(rng.normal(0.4 + shift, 0.05)),
                    }
                )
    return pl.DataFrame(rows)


def test_rq1_cli_paper_profile_corrects_over_the_five_annotated_syndromes(tmp_path, capsys):
    table = _study(("Unaffected", *PAPER_RQ1_SYNDROMES, "Down", "BWS"))
    path = tmp_path / "scores-val.parquet"
    table.write_parquet(path)
    assert main(["rq1", str(path), "--profile", "paper", "--alpha", "0.05", "--out", str(tmp_path / "paper")]) == 0
    assert main(["rq1", str(path), "--alpha", "0.05", "--out", str(tmp_path / "project")]) == 0
    paper = pl.read_csv(tmp_path / "paper" / "rq1-tests.csv")
    project = pl.read_csv(tmp_path / "project" / "rq1-tests.csv")
    assert sorted(set(paper["syndrome"])) == sorted(PAPER_RQ1_SYNDROMES) and len(paper) == 15
    assert set(project["syndrome"]) == {*PAPER_RQ1_SYNDROMES, "Down", "BWS"} and len(project) == 21
    # Bonferroni over the family the notebook corrected: 5 syndromes × 3 regions = 15 tests.
    np.testing.assert_allclose(paper["p_corrected"], np.minimum(1.0, 15 * paper["p"]))
    np.testing.assert_allclose(project["p_corrected"], np.minimum(1.0, 21 * project["p"]))
    # --syndromes still wins over the profile's family.
    assert main(["rq1", str(path), "--profile", "paper", "--syndromes", "KS", "--out", str(tmp_path / "ks")]) == 0
    assert set(pl.read_csv(tmp_path / "ks" / "rq1-tests.csv")["syndrome"]) == {"KS"}
    capsys.readouterr()
    # A table without some of the five: the family is the rest, and the user is told.
    without = _study(("Unaffected", "KS", "WS", "Down"))
    without.write_parquet(path)
    assert main(["rq1", str(path), "--profile", "paper", "--out", str(tmp_path / "some")]) == 0
    assert "no 22q11DS, Angelman, NS" in capsys.readouterr().err
    assert set(pl.read_csv(tmp_path / "some" / "rq1-tests.csv")["syndrome"]) == {"KS", "WS"}
    expected = compare_groups(without, syndromes=["KS", "WS"])
    np.testing.assert_allclose(pl.read_csv(tmp_path / "some" / "rq1-tests.csv")["p"], expected["p"])


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    from core.synth.dataset import SyntheticSpec, generate_dataset

    root = tmp_path_factory.mktemp("profiles") / "synth"
    generate_dataset(root, SyntheticSpec(n_per_class=4, seed=5, size=48, photos_per_person=1), workers=1)
    return root


def test_rq2_cli_paper_profile_uses_the_released_weighting_chi2_and_tsne(annotated, tmp_path):
    annotations = read_annotations(annotated)
    images = annotations["image_name"].unique().to_list()
    rng = np.random.default_rng(1)
    scores = pl.DataFrame(
        [
            {"image_name": n, "label": n.split("Slide")[0], "model": m, "method": "Gradient", "region": r}
            | {"score": float(rng.random())}
            for m in ("classifier-fold-1", "classifier-fold-2")
            for n in images
            for r in ("eye", "nose", "mouth")
        ]
    )
    path = tmp_path / "scores-test.parquet"
    scores.write_parquet(path)
    for name in ("paper", "project"):
        assert (
            main(["rq2", str(path), "--dataset", str(annotated), "--profile", name, "--out", str(tmp_path / name)]) == 0
        )
    paper = {
        f: pl.read_csv(tmp_path / "paper" / f"rq2-{f}.csv") for f in ("per-model", "figure4b-chi2", "figure4a-tsne")
    }

    # Weighting: ρ against the raters' counts weighed 1X 0.333, 2X 0.666, 3X 1.0, by hand from the marks.
    marks = annotations.group_by("image_name", "term", "region").agg(pl.col("value").sum())
    weights = {0: 0.0, 1: 0.333, 2: 0.666, 3: 1.0}
    weighted = marks.with_columns(pl.col("value").map_elements(weights.get, return_dtype=pl.Float64))
    per_region = weighted.group_by("image_name", "region").agg(pl.col("value").sum().alias("count"))
    for row in paper["per-model"].iter_rows(named=True):
        if row["note"] is not None:
            continue
        mine = scores.filter(pl.col("model") == row["model"], pl.col("region") == row["region"])
        joined = mine.join(per_region.filter(pl.col("region") == row["region"]), on="image_name", how="left")
        counts = joined["count"].fill_null(0.0).to_numpy()
        assert row["rho"] == pytest.approx(stats.spearmanr(joined["score"], counts).statistic, abs=1e-9)
    assert not region_counts(annotations, weighting="paper")["count"].equals(region_counts(annotations)["count"])

    # χ²: scikit-learn's chi2 on the per-image rater counts against the syndrome (nb-02-b).
    vectors, matrix = term_vectors(annotations)
    labels = np.unique(vectors["label"].to_numpy(), return_inverse=True)[1]
    marked = matrix.sum(axis=0) > 0
    expected = sklearn_chi2(matrix[:, marked], labels)[0]
    got = paper["figure4b-chi2"].filter(pl.col("chi2").is_not_null())
    assert len(got) == marked.sum()
    np.testing.assert_allclose(np.sort(got["chi2"].to_numpy()), np.sort(expected), rtol=1e-9)
    project_chi2 = pl.read_csv(tmp_path / "project" / "rq2-figure4b-chi2.csv")["chi2"].drop_nulls()
    assert not np.allclose(np.sort(project_chi2.to_numpy()), np.sort(expected))

    # t-SNE: perplexity 10, random init, Barnes–Hut (nb-02-b), with the command's seed.
    tsne = term_tsne(annotations, seed=0, perplexity=10.0, init="random", method="barnes_hut")
    np.testing.assert_allclose(paper["figure4a-tsne"]["x"], tsne["x"], rtol=1e-6)


# --- the flag reaches every command that computes these numbers -------------------------------------------


@pytest.mark.parametrize(
    ("argv", "split", "mode"),
    [
        (["explain", "face.jpg"], None, "abs"),
        (["extract", "--split", "val"], "val", "abs-raw"),
        (["extract", "--split", "test"], "test", "abs"),
        (["extract", "--split", "val", "--mode", "positive"], "val", "positive"),
        (["faithfulness"], None, "abs"),
        (["sanity"], None, "abs"),
        (["benchmark"], None, "abs"),
    ],
)
def test_the_profile_flag_reaches_the_settings_of_each_command(argv, split, mode):
    args = build_parser().parse_args([*argv, "--profile", "paper", "--methods", "LayerDeepLIFT,LRP-EpsilonPlus"])
    settings = _settings(args, split=split)
    assert settings.mode == mode
    assert settings.method_params("LayerDeepLIFT")["reduce_channels"] is False
    assert settings.method_params("LRP-EpsilonPlus")["canonizer"] == "batchnorm-only"
    default = _settings(build_parser().parse_args([*argv, "--methods", "LayerDeepLIFT,LRP-EpsilonPlus"]), split=split)
    assert default.method_params("LayerDeepLIFT")["reduce_channels"] is True
    assert default.mode == (mode if "--mode" in argv else "abs")
    for command in ("rq1", "rq2"):
        assert build_parser().parse_args([command, "s.parquet", "--profile", "paper"]).profile == "paper"


def test_explain_cli_runs_under_the_paper_profile(monkeypatch):
    import core.explain

    seen = []

    def fake_explain(photo, classifier, settings, cache, progress):
        seen.append(settings)
        raise SettingsError("stop here")

    monkeypatch.setattr(core.explain, "explain", fake_explain)
    monkeypatch.setattr("core.cli._classifier_card", lambda path: path)
    monkeypatch.setattr("models.checkpoint.load_classifier", lambda path, device=None: None)
    monkeypatch.setattr("core.imageio.load_image_and_scale", lambda path: (np.zeros((8, 8, 3), np.uint8), np.ones(2)))
    assert main(["explain", "face.jpg", "--profile", "paper", "--methods", "LayerDeepLIFT"]) == 2
    assert seen and seen[0].method_params("LayerDeepLIFT")["reduce_channels"] is False


def test_paper_and_project_maps_are_cached_apart(tmp_path):
    from cache import DiskCache

    classifier = Classifier(network=tiny_resnet(num_classes=3), card=tiny_card(), fingerprint="tiny-resnet")
    faces = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    cache = DiskCache(tmp_path / "cache")
    project = ExplainSettings(methods=("LayerDeepLIFT",), mode="abs")
    paper = apply(project, profile(PAPER), split="test")  # min–max, as RQ2: only the method parameters differ
    first = relevance_maps(classifier, faces, [0, 1], "LayerDeepLIFT", project, cache)
    second = relevance_maps(classifier, faces, [0, 1], "LayerDeepLIFT", paper, cache)
    assert not np.allclose(first, second, atol=1e-3)  # a shared key would have returned the first maps
    fresh = relevance_maps(classifier, faces, [0, 1], "LayerDeepLIFT", paper, None)
    np.testing.assert_allclose(second, fresh, rtol=1e-5, atol=1e-6)


def test_rq2_paper_profile_draws_figure4_over_the_annotated_images_partitions_csv_lacks(annotated, tmp_path, capsys):
    import shutil

    root = tmp_path / "with-unlisted"
    shutil.copytree(annotated, root)
    first = sorted((root / "metadata" / "hpo-annotations").glob("*.csv"))[0]
    rows = first.read_text().splitlines()
    name = rows[1].split(",")[0]
    extra = [row.replace(name, "UnlistedSlide1.jpg", 1) for row in rows[1:] if row.split(",")[0] == name]
    first.write_text("\n".join([*rows, *extra]) + "\n")
    with pytest.warns(Warning, match="not listed in partitions.csv"):
        annotations = read_annotations(root)  # the unlisted image is left out
    scores = pl.DataFrame(
        [
            {"image_name": n, "label": "x", "model": m, "method": "Gradient", "region": r, "score": float(i % 7)}
            for i, n in enumerate(annotations["image_name"].unique().to_list())
            for m in ("classifier-fold-1", "classifier-fold-2")
            for r in ("eye", "nose", "mouth")
        ]
    )
    path = tmp_path / "scores-test.parquet"
    scores.write_parquet(path)
    n = annotations["image_name"].n_unique()
    for name, images in (("paper", n + 1), ("project", n)):
        assert main(["rq2", str(path), "--dataset", str(root), "--profile", name, "--out", str(tmp_path / name)]) == 0
        assert set(pl.read_csv(tmp_path / name / "rq2-figure4b-chi2.csv")["n"]) == {images}
        assert len(pl.read_csv(tmp_path / name / "rq2-figure4a-tsne.csv")) == images
    assert "Figure 4 keeps them" in capsys.readouterr().err
    # Table 4 has scores of listed images only, under both profiles.
    per_model = pl.read_csv(tmp_path / "paper" / "rq2-per-model.csv")
    assert set(per_model["n"]) == {n}
