"""Fitting a classifier's out-of-domain guard on a tiny synthetic dataset, the CLI around it, and the
guard's scores in the score table (extract) and after re-scoring from the relevance store."""

import json

import numpy as np
import polars as pl
import pytest
from scipy.spatial.distance import mahalanobis

from core.cli import main as cli_main
from core.dataset import names_in, open_dataset
from core.errors import UserFacingError
from core.extract import ExtractionPlan, extract_scores, load_classifiers
from core.fit_domain import fit_domain
from core.pipeline import ExplainSettings, face_features
from core.regions import PAPER_REGIONS
from core.relevance_store import RelevanceStore
from core.rescore import rescore
from core.score_table import with_domain_columns
from core.train import aligned_faces
from models.checkpoint import load_classifier, save_checkpoint
from models.domain_guard import guard_path
from tests.conftest import tiny_card, tiny_resnet, tiny_synthetic_dataset

CLASSES = ("KS", "Unaffected", "WS")
SIZE = 48


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """24 faces of 3 classes, one per person, with fold-1's train, val and test splits; one tiny classifier."""
    root = tmp_path_factory.mktemp("fit-domain") / "data"
    tiny_synthetic_dataset(root, CLASSES, n_per_class=8, test_fraction=0.25)
    card = save_checkpoint(
        tiny_resnet(num_classes=3, seed=2),
        tiny_card(CLASSES, SIZE, fold="fold-1"),
        root / "models",
        "classifier-fold-1",
    )
    return open_dataset(root), card


@pytest.fixture(scope="module")
def fitted(tiny):
    dataset, card = tiny
    return fit_domain(card, dataset)


def test_the_guard_is_the_fold_faces_gaussians_and_its_val_percentile(tiny, fitted):
    dataset, card = tiny
    classifier = load_classifier(card)
    assert guard_path(card).is_file() and classifier.domain is not None
    guard = classifier.domain
    assert guard.fingerprint == classifier.fingerprint and guard.fitted_on["fold"] == "fold-1"
    features = {
        split: face_features(classifier, aligned_faces(dataset, names_in(dataset, "fold-1", split), SIZE))
        for split in ("train", "val", "test")
    }
    train_labels = np.array([dataset.labels[n] for n in names_in(dataset, "fold-1", "train")])
    # The class means are the train faces' per-class feature means, in sorted label order.
    expected_means = [features["train"][train_labels == label].mean(axis=0) for label in sorted(set(train_labels))]
    np.testing.assert_allclose(guard.means, expected_means, rtol=1e-6, atol=1e-9)
    # The threshold is numpy's 99th percentile of scipy's distances of the val faces to their nearest mean.
    val_scores = [min(mahalanobis(x, m, guard.precision) for m in guard.means) for x in features["val"]]
    assert guard.threshold == pytest.approx(np.percentile(val_scores, 99.0), rel=1e-9)
    assert fitted.counts == {s: len(names_in(dataset, "fold-1", s)) for s in ("train", "val", "test")}
    test_flags = np.array([min(mahalanobis(x, m, guard.precision) for m in guard.means) for x in features["test"]])
    assert fitted.flagged["test"] == pytest.approx(float((test_flags > guard.threshold).mean()))


def test_extract_records_each_faces_domain_score_and_rescoring_keeps_it(tiny, fitted, tmp_path):
    dataset, card = tiny
    classifiers = load_classifiers([card])
    classifier = classifiers["classifier-fold-1"]
    assert classifier.domain is not None
    store = RelevanceStore(tmp_path / "store")
    settings = ExplainSettings(methods=("Gradient",))
    table = extract_scores(ExtractionPlan(dataset, classifiers, "val"), settings, store=store)
    per_image = table.unique("image_name").sort("image_name")
    names = per_image["image_name"].to_list()
    expected = classifier.domain.scores(face_features(classifier, aligned_faces(dataset, names, SIZE)))
    np.testing.assert_allclose(per_image["domain_score"].to_numpy(), expected, rtol=1e-9)
    assert per_image["out_of_domain"].to_list() == (expected > classifier.domain.threshold).tolist()
    again = rescore(RelevanceStore(tmp_path / "store"), PAPER_REGIONS)
    key = ["image_name", "method", "region"]
    assert (
        again.sort(key)
        .select("domain_score", "out_of_domain")
        .equals(table.sort(key).select("domain_score", "out_of_domain"))
    )


def test_a_score_table_from_before_the_guard_reads_with_null_domain_columns(tiny, fitted, tmp_path):
    old = pl.DataFrame({"image_name": ["a"], "score": [1.0]})
    widened = with_domain_columns(old)
    assert widened["domain_score"].to_list() == [None] and widened["out_of_domain"].to_list() == [None]


def test_cli_fit_domain_prints_its_summary_and_a_card_without_fold_needs_one(tiny, tmp_path, capsys):
    dataset, card = tiny
    assert cli_main(["fit-domain", str(card), str(dataset.root), "--fold", "fold-1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["guard"] == "classifier-fold-1.domain.safetensors" and out["fold"] == "fold-1"
    assert out["threshold"] == pytest.approx(load_classifier(card).domain.threshold, abs=1e-4)  # type: ignore[union-attr]
    foldless = save_checkpoint(tiny_resnet(num_classes=3, seed=2), tiny_card(CLASSES, SIZE), tmp_path, "m")
    with pytest.raises(UserFacingError, match="--fold"):
        fit_domain(foldless, dataset)
    assert cli_main(["fit-domain", str(foldless), str(dataset.root)]) == 2
    assert "--fold" in capsys.readouterr().err


def test_cli_train_fits_each_folds_guard_beside_its_card(tiny, tmp_path):
    dataset, _ = tiny
    argv = ["train", str(dataset.root), "--out", str(tmp_path), "--folds", "fold-1", "--architecture", "resnet18"]
    assert cli_main([*argv, "--input-size", "32", "--epochs", "1", "--batch-size", "8", "--seed", "0"]) == 0
    classifier = load_classifier(tmp_path / "classifier-fold-1.json")
    assert classifier.domain is not None and classifier.domain.fitted_on["fold"] == "fold-1"
    assert classifier.domain.fitted_on["n_train"] == len(names_in(dataset, "fold-1", "train"))
