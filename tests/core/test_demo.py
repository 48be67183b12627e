"""The demo build (tiny preset), the parser trainer and the ground-truth leaderboard's bookkeeping."""

import dataclasses
import json

import numpy as np
import polars as pl
import pytest

import core.leaderboard as leaderboard_module
import core.pipeline as pipeline_module
from cache import DiskCache
from core.dataset import names_in, open_dataset
from core.demo import build_demo
from core.errors import UserFacingError
from core.layout import DatasetLayout
from core.leaderboard import leaderboard, planted_counts
from core.pipeline import ExplainSettings
from core.relevance_store import RelevanceStore
from core.train_parser import intersection_over_union
from models.checkpoint import ModelCard, load_classifier, save_checkpoint
from models.parser import load_face_parser
from tests.conftest import TINY, tiny_resnet


def test_iou_against_hand_counts():
    truth = np.array([[0, 0, 1, 1]])
    predicted = np.array([[0, 1, 1, 1]])
    iou = intersection_over_union(predicted, truth)
    # background: 1 shared pixel of 2 in the union; face skin: 2 of 3.
    assert iou[0] == 0.5 and iou[1] == pytest.approx(2 / 3)
    assert np.isnan(iou[5])  # absent from both


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    cache = DiskCache(root / "cache")
    lines: list[str] = []
    report = build_demo(root, TINY, log=lines.append, cache=cache)
    return root, report, cache


@pytest.mark.slow
def test_the_demo_builds_every_stage_and_its_models_load(tiny_demo):
    root, report, _ = tiny_demo
    assert set(report["stages"]) == {
        "dataset",
        "parser",
        "classifier-fold-1",
        "domain-fold-1",
        "scores-val",
        "scores-test",
        "leaderboard",
    }
    dataset = open_dataset(root)
    for split in ("val", "test"):
        table = pl.read_parquet(DatasetLayout(root).score_table(split))
        assert set(table["image_name"]) == set(names_in(dataset, "fold-1", split))
        assert set(table["method"]) == set(TINY.cheap_methods)
        assert table["domain_score"].is_not_null().all() and table["out_of_domain"].is_not_null().all()
        assert RelevanceStore(DatasetLayout(root).relevance_store(split)).complete
    assert set(pl.read_csv(root / "models" / "leaderboard.csv")["method"]) == set(TINY.cheap_methods)
    classifier = load_classifier(root / "models" / "classifier-fold-1.json")
    assert classifier.card.input_size == 32 and "Unaffected" in classifier.card.classes
    assert classifier.domain is not None and classifier.domain.fitted_on["fold"] == "fold-1"
    assert load_face_parser(root / "models" / "parser.json").card.kind == "face_parser"
    table2 = pl.read_csv(root / "models" / "table2.csv")
    assert "Overall" in table2["class"].to_list()
    assert pl.read_csv(root / "models" / "parser-iou.csv").height == 11


@pytest.mark.slow
def test_a_second_build_does_nothing_and_a_changed_preset_redoes_only_its_stage(tiny_demo):
    root, _, cache = tiny_demo
    before = (root / "models" / "classifier-fold-1.safetensors").stat().st_mtime_ns
    lines: list[str] = []
    assert build_demo(root, TINY, log=lines.append, cache=cache)["stages"] == {}
    assert any("up to date" in line for line in lines)
    assert (root / "models" / "classifier-fold-1.safetensors").stat().st_mtime_ns == before
    changed = dataclasses.replace(TINY, classifier=dataclasses.replace(TINY.classifier, seed=1))
    assert set(build_demo(root, changed, log=lines.append, cache=cache)["stages"]) == {
        "classifier-fold-1",
        "domain-fold-1",  # the retrained model's guard is fitted again (its old one is refused)
        "scores-val",
        "scores-test",
        "leaderboard",
    }


@pytest.mark.slow
def test_leaderboard_recovers_a_planted_answer(tiny_demo, monkeypatch):
    """A stand-in method whose relevance is exactly the planted regions must score hit rate 1 and ρ > 0."""
    root, _, _ = tiny_demo
    dataset = open_dataset(root)
    classifier = load_classifier(root / "models" / "classifier-fold-1.json")
    names = names_in(dataset, "fold-1", "test")
    face_set = leaderboard_module.true_faces(dataset, names, 32, ExplainSettings())
    faces, masks = face_set.aligned, face_set.masks
    counts = planted_counts(dataset, names, masks.names)
    truth_map = {n: (masks.masks[i] * counts[i][:, None, None]).sum(0).astype(np.float32) for i, n in enumerate(names)}
    face_to_name = {faces[i].tobytes(): n for i, n in enumerate(names)}

    def oracle(classifier, images, targets, method, params=None, cache=None):
        maps = np.stack([truth_map[face_to_name[image.tobytes()]] for image in images])
        return maps, maps

    monkeypatch.setattr(pipeline_module, "attribution_sums", oracle)
    table = leaderboard(dataset, classifier, names, ExplainSettings(methods=("Gradient",)))
    row = table.row(0, named=True)
    assert row["n_single_region"] == int(((counts > 0).sum(1) == 1).sum()) > 0
    assert row["hit_rate"] == 1.0
    assert row["rho_mean"] > 0.5


def test_planted_counts_read_the_ground_truth(tmp_path):
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "ground_truth.csv").write_text(
        "image_name,person_id,label,hpo_id,term,region,severity\n"
        "a.jpg,P1,X,HP:1,t1,eye,0.5\na.jpg,P1,X,HP:2,t2,eye,0.7\na.jpg,P1,X,HP:3,t3,mouth,0.9\nb.jpg,P2,U,,,,\n"
    )
    dataset = type("D", (), {"root": tmp_path})()
    np.testing.assert_array_equal(
        planted_counts(dataset, ["a.jpg", "b.jpg"], ("eye", "nose", "mouth")), [[2, 0, 1], [0, 0, 0]]
    )
    assert json.dumps(dataclasses.asdict(TINY.parser))  # presets are plain data


def test_a_model_lacking_a_class_of_the_faces_is_refused_naming_both(tmp_path):
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "partitions.csv").write_text(
        "image_name,label,fold-1\nWSSlide1.png,WS,test\nKSSlide2.png,KS,test\nUnaffectedSlide3.png,Unaffected,test\n"
    )
    card = ModelCard(
        kind="classifier",
        architecture="resnet18",
        classes=("Unaffected", "WS"),
        input_size=32,
        channel_order="RGB",
        input_scale=1.0,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        weights="m.safetensors",
    )
    classifier = load_classifier(save_checkpoint(tiny_resnet(num_classes=2), card, tmp_path, "m"))
    # Refused before any photo is read (there are none).
    with pytest.raises(
        UserFacingError,
        match=r"the model lacks the class\(es\) KS of the faces to score "
        r"\(the model's classes: Unaffected, WS\)",
    ):
        leaderboard(
            open_dataset(tmp_path),
            classifier,
            ["WSSlide1.png", "KSSlide2.png", "UnaffectedSlide3.png"],
            ExplainSettings(),
        )
