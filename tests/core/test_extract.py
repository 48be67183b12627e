"""Dataset extraction on a tiny synthetic dataset: against per-photo ``explain``, resumed after a kill."""

import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import diskcache
import numpy as np
import polars as pl
import pytest

from cache import MISSING, DiskCache
from core.cli import main as cli_main
from core.dataset import Dataset, Photo, image_file, landmarks_of, names_in, open_dataset, segmap_file
from core.explain import explain
from core.extract import ExtractionPlan, extract_scores, load_classifiers
from core.imageio import load_image, load_label_map
from core.layout import DatasetLayout
from core.pipeline import ExplainSettings, prepare_face
from core.regions import PAPER_REGIONS, bundled_region_specs
from core.relevance_store import RelevanceStore, StoreError
from core.rescore import rescore
from core.score import region_scores
from core.score_table import SCORE_SCHEMA
from models.checkpoint import ModelCard, save_checkpoint
from tests.conftest import REPO, counting_attributions, tiny_card, tiny_resnet, tiny_synthetic_dataset

CLASSES = ("KS", "Unaffected", "WS")
METHODS = ("Gradient", "LayerGradCam")
SIZE = 64
KEY = ["model", "method", "image_name", "region"]


def card(fold: str | None) -> ModelCard:
    return tiny_card(CLASSES, SIZE, weights="w", fold=fold)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """18 faces of 3 classes, one per person: per class 2 test persons and one val person in folds 1-4."""
    root = tmp_path_factory.mktemp("extract") / "data"
    tiny_synthetic_dataset(root, CLASSES, n_per_class=6, test_fraction=0.34)
    cards = [
        save_checkpoint(tiny_resnet(num_classes=3, seed=f), card(f"fold-{f}"), root / "models", f"classifier-fold-{f}")
        for f in (1, 2)
    ]
    return open_dataset(root), load_classifiers(cards)


def sorted_table(table: pl.DataFrame) -> pl.DataFrame:
    return table.sort(KEY)


def stored_photos(dataset: Dataset, names: list[str]) -> list[Photo]:
    """Each photo with the landmarks and label map the dataset stores for it (the tiny dataset has both)."""
    landmarks = landmarks_of(dataset, names)
    assert landmarks is not None
    photos = []
    for name, points in zip(names, landmarks):
        segmap = segmap_file(dataset, name)
        assert segmap is not None, name
        photos.append(Photo(load_image(image_file(dataset, name)), points, load_label_map(segmap)))
    return photos


def test_val_split_table_schema_rows_and_one_model_per_image(tiny):
    dataset, classifiers = tiny
    table = extract_scores(ExtractionPlan(dataset, classifiers, "val"), ExplainSettings(methods=METHODS))
    assert dict(table.schema) == SCORE_SCHEMA
    val = {name: names_in(dataset, c.card.fold, "val") for name, c in classifiers.items()}
    assert table.height == sum(len(v) for v in val.values()) * len(METHODS) * 3
    for name, names in val.items():
        rows = table.filter(pl.col("model") == name)
        assert set(rows["image_name"]) == set(names) and set(rows["fold"]) == {classifiers[name].card.fold}
    # RQ1: over the folds every val image is scored by exactly one model, once per method and region.
    assert table.group_by("image_name", "method", "region").len()["len"].max() == 1
    assert set(table["region"]) == {"eye", "nose", "mouth"} and not table["score"].is_nan().any()


@pytest.fixture(scope="module")
def extracted(tiny, tmp_path_factory):
    """The test split through both models, with a cache and a store (shared by the tests that read it)."""
    dataset, classifiers = tiny
    folder = tmp_path_factory.mktemp("extracted")
    cache = DiskCache(folder / "cache")
    table = extract_scores(
        ExtractionPlan(dataset, classifiers, "test"),
        ExplainSettings(methods=METHODS, batch_size=4),
        cache=cache,
        store=RelevanceStore(folder / "store"),
    )
    return table, RelevanceStore(folder / "store"), cache


def test_scores_equal_explain_on_each_photo(tiny, extracted):
    """``explain`` runs one photo at a time with its own classification: an independent path."""
    dataset, classifiers = tiny
    table = extracted[0]
    classifier = classifiers["classifier-fold-2"]
    names = names_in(dataset, "fold-2", "test")[::2]
    for name, photo in zip(names, stored_photos(dataset, names)):
        result = explain(photo, classifier, ExplainSettings(methods=METHODS))
        rows = table.filter(pl.col("model") == "classifier-fold-2", pl.col("image_name") == name)
        for method in METHODS:
            got = rows.filter(pl.col("method") == method)
            assert got["region"].to_list() == list(result.face.region_names)
            np.testing.assert_allclose(got["score"].to_numpy(), result.scores[method], atol=1e-5)
        assert set(rows["predicted"]) == set(rows["target"]) == {CLASSES[result.predicted]}
        np.testing.assert_allclose(
            rows["target_probability"].to_numpy(), result.probabilities[result.predicted], atol=1e-5
        )


def test_true_label_target_and_every_model_on_the_test_split(tiny):
    dataset, classifiers = tiny
    table = extract_scores(
        ExtractionPlan(dataset, classifiers, "test"), ExplainSettings(methods=("Gradient",), target="label")
    )
    assert (table["target"] == table["label"]).all()
    per_model = table.group_by("model").agg(pl.col("image_name").unique().sort())
    assert per_model["image_name"][0].to_list() == per_model["image_name"][1].to_list()


def test_rescore_equals_extraction_and_a_new_spec_equals_region_scores(tiny, extracted):
    dataset, classifiers = tiny
    extracted, store, cache = extracted
    again = rescore(store, PAPER_REGIONS)
    assert dict(again.schema) == SCORE_SCHEMA
    joined = sorted_table(extracted).join(again, on=KEY, suffix="_store")
    assert joined.height == extracted.height == again.height
    np.testing.assert_allclose(joined["score"], joined["score_store"], atol=5e-4)  # float16 maps
    for column in ("label", "fold", "predicted", "target", "target_probability"):
        assert (joined[column] == joined[f"{column}_store"]).all()

    extended = bundled_region_specs()["extended"]
    rescored = rescore(store, extended)
    # Independently: masks from prepare_face (the stored segmap carried into the aligned frame) and eq. 4.
    classifier = classifiers["classifier-fold-1"]
    names = names_in(dataset, "fold-1", "test")
    masks = np.stack(
        [prepare_face(photo, SIZE, ExplainSettings(spec=extended)).masks for photo in stored_photos(dataset, names)]
    )
    maps = store.maps("classifier-fold-1", "LayerGradCam").astype(np.float32)
    expected = region_scores(maps, masks)
    got = rescored.filter(pl.col("model") == "classifier-fold-1", pl.col("method") == "LayerGradCam")
    assert got["image_name"].unique(maintain_order=True).to_list() == names
    np.testing.assert_allclose(got["score"].to_numpy().reshape(expected.shape), expected, atol=1e-6)
    # And a fresh extraction under the new spec (all attributions from the cache) agrees.
    fresh = extract_scores(
        ExtractionPlan(dataset, {"classifier-fold-1": classifier}, "test"),
        ExplainSettings(methods=("LayerGradCam",), spec=extended),
        cache=cache,
    )
    joined = sorted_table(fresh).join(got, on=KEY)
    assert joined.height == fresh.height
    np.testing.assert_allclose(joined["score"], joined["score_right"], atol=5e-4)


class Interrupted(Exception):
    pass


def test_an_interrupted_extraction_resumes_without_recomputing(tiny, tmp_path, monkeypatch):
    dataset, classifiers = tiny
    cache = DiskCache(tmp_path / "cache")
    stopped_at: list[int] = []

    def interrupt(done, total, what):
        if done >= 4 and not stopped_at:
            stopped_at.append(done)
            raise Interrupted

    with pytest.raises(Interrupted):
        extract_scores(
            ExtractionPlan(dataset, classifiers, "val"),
            ExplainSettings(methods=METHODS, batch_size=2),
            cache=cache,
            store=RelevanceStore(tmp_path / "store"),
            progress=interrupt,
        )
    half = RelevanceStore(tmp_path / "store")
    assert not half.complete and half.missing()
    with pytest.raises(StoreError, match="incomplete"):
        rescore(half, PAPER_REGIONS)

    calls = counting_attributions(monkeypatch)
    progress = []
    resumed = extract_scores(
        ExtractionPlan(dataset, classifiers, "val"),
        ExplainSettings(methods=METHODS, batch_size=2),
        cache=cache,
        store=RelevanceStore(tmp_path / "store"),
        progress=lambda *p: progress.append(p),
    )
    total = progress[-1][1]
    assert sum(calls) == total - stopped_at[0] > 0  # only what the interrupted run had not finished
    calls.clear()
    rerun = extract_scores(
        ExtractionPlan(dataset, classifiers, "val"), ExplainSettings(methods=METHODS, batch_size=2), cache=cache
    )
    assert calls == []  # a rerun computes nothing

    uninterrupted = extract_scores(
        ExtractionPlan(dataset, classifiers, "val"), ExplainSettings(methods=METHODS, batch_size=2)
    )
    assert resumed.equals(uninterrupted) and rerun.equals(uninterrupted)
    assert RelevanceStore(tmp_path / "store").complete


def test_unusable_photos_are_left_out_with_a_warning(tiny, tmp_path):
    dataset, classifiers = tiny
    copy = tmp_path / "data"
    shutil.copytree(dataset.root, copy)
    broken = names_in(dataset, "fold-1", "test")[1]
    (copy / "images" / broken).write_bytes(b"not a photo")
    with pytest.warns(UserWarning, match=f"1 photo.* left out .*{broken}"):
        table = extract_scores(
            ExtractionPlan(open_dataset(copy), classifiers, "test"),
            ExplainSettings(methods=("Gradient",)),
            store=RelevanceStore(tmp_path / "store"),
        )
    assert broken not in set(table["image_name"])
    store = RelevanceStore(tmp_path / "store")
    assert store.complete
    assert sorted_table(rescore(store, PAPER_REGIONS)).select(KEY).equals(sorted_table(table).select(KEY))


def test_cli_writes_the_table_and_the_store(tiny, tmp_path, monkeypatch, capsys):
    dataset, _ = tiny
    monkeypatch.setenv("XAI_CACHE_DIR", str(tmp_path / "cache"))
    copy = tmp_path / "data"
    shutil.copytree(dataset.root, copy)
    assert cli_main(["extract", str(copy), "--methods", "Gradient", "--folds", "fold-2", "--batch-size", "3"]) == 0
    table = pl.read_parquet(DatasetLayout(copy).score_table("val"))
    assert dict(table.schema) == SCORE_SCHEMA and set(table["model"]) == {"classifier-fold-2"}
    assert RelevanceStore(DatasetLayout(copy).relevance_store("val")).complete
    assert not [p for p in DatasetLayout(copy).score_table("val").parent.iterdir() if p.name.endswith(".tmp")]
    err = capsys.readouterr().err
    assert "map/s" in err and f"{table.height} rows" in err


def test_cli_errors_are_one_clear_line(tiny, tmp_path, capsys):
    dataset, _ = tiny
    no_fold = save_checkpoint(tiny_resnet(num_classes=3), card(None), tmp_path, "classifier-nofold")
    assert cli_main(["extract", str(dataset.root), "--models", str(no_fold), "--no-store", "--no-cache"]) == 2
    assert "names no fold" in capsys.readouterr().err
    assert cli_main(["extract", str(dataset.root), "--folds", "fold-9", "--no-store"]) == 2
    assert "fold(s) fold-9" in capsys.readouterr().err
    fifth = save_checkpoint(tiny_resnet(num_classes=3), card("fold-5"), tmp_path, "classifier-fold-5")
    assert cli_main(["extract", str(dataset.root), "--models", str(fifth), "--no-store", "--no-cache"]) == 2
    assert "no val images in the fold(s) of the models (fold-5)" in capsys.readouterr().err


COUNTING_CLI = """
import sys, time
import core.pipeline as explain
real = explain.attribute
def counting(model, batch, targets, method, params):
    with open(sys.argv[1], "a") as log:
        log.write(f"{len(batch)}\\n")
    time.sleep(float(sys.argv[2]))
    return real(model, batch, targets, method, params)
explain.attribute = counting
from core.cli import main
sys.exit(main(sys.argv[3:]))
"""


def counting_extract(dataset, folder: Path, log: str, pause: float) -> subprocess.Popen:
    """``extract`` of the val split in a subprocess, one image per batch, logging (and slowing) each attribution."""
    env = {**os.environ, "XAI_CACHE_DIR": str(folder / "cache"), "PYTHONPATH": str(REPO)}
    arguments = [
        "extract",
        str(dataset.root),
        "--split",
        "val",
        "--methods",
        ",".join(METHODS),
        "--batch-size",
        "1",
        "--out",
        str(folder / "scores.parquet"),
        "--store",
        str(folder / "store"),
    ]
    return subprocess.Popen(
        [sys.executable, "-c", COUNTING_CLI, str(folder / log), str(pause), *arguments],
        env=env,
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def attribution_entries(directory: Path) -> int:
    """Cached attributions: pairs of float32 maps (probabilities are vectors, label maps uint8)."""
    with diskcache.Cache(str(directory)) as cache:
        values = [cache.get(key) for key in cache]
    return sum(
        isinstance(v, tuple)
        and len(v) == 2
        and all(isinstance(a, np.ndarray) and a.dtype == np.float32 and a.ndim == 2 for a in v)
        for v in values
    )


@pytest.mark.slow
def test_a_killed_cli_run_resumes_with_identical_results(tiny, tmp_path):
    dataset, classifiers = tiny
    run = functools.partial(counting_extract, dataset, tmp_path)

    first = run("first.log", 0.15)  # slowed down, so that it is surely killed half-way
    deadline = time.monotonic() + 120
    while attribution_entries(tmp_path / "cache") < 3 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert first.returncode == -signal.SIGKILL
    assert not (tmp_path / "scores.parquet").exists()
    finished = attribution_entries(tmp_path / "cache")
    assert not RelevanceStore(tmp_path / "store").complete

    second = run("second.log", 0.0)
    _, err = second.communicate(timeout=300)
    assert second.returncode == 0, err.decode()
    total = sum(len(names_in(dataset, c.card.fold, "val")) for c in classifiers.values()) * len(METHODS)
    recomputed = sum(int(line) for line in (tmp_path / "second.log").read_text().split())
    assert 0 < finished < total and recomputed == total - finished

    uninterrupted = extract_scores(
        ExtractionPlan(dataset, classifiers, "val"), ExplainSettings(methods=METHODS, batch_size=1)
    )
    resumed = pl.read_parquet(tmp_path / "scores.parquet")
    assert sorted_table(resumed).equals(sorted_table(uninterrupted))
    store = RelevanceStore(tmp_path / "store")
    joined = sorted_table(rescore(store, PAPER_REGIONS)).join(resumed, on=KEY)
    np.testing.assert_allclose(joined["score"], joined["score_right"], atol=5e-4)


def cache_is_sound(directory: Path) -> bool:
    """Every entry reads back: ``DiskCache.lookup`` reports (and drops) a damaged one as MISSING."""
    with diskcache.Cache(str(directory)) as raw:
        keys = list(raw)
    cache = DiskCache(directory)
    try:
        return bool(keys) and all(cache.lookup(key) is not MISSING for key in keys)
    finally:
        cache.close()


@pytest.mark.slow
def test_five_kills_at_random_points_then_a_complete_run_equal_an_uninterrupted_run(tiny, tmp_path):
    """Issue 6: SIGKILL five times at random moments (during start-up, attribution or writing), then finish."""
    dataset, classifiers = tiny
    run = functools.partial(counting_extract, dataset, tmp_path)
    total = sum(len(names_in(dataset, c.card.fold, "val")) for c in classifiers.values()) * len(METHODS)
    rng = np.random.default_rng(6)

    def calls(log: str) -> int:
        path = tmp_path / log
        return sum(int(line) for line in path.read_text().split()) if path.exists() else 0

    killed_mid_work = 0
    for k in range(5):
        finished_before = attribution_entries(tmp_path / "cache") if (tmp_path / "cache").exists() else 0
        process = run(f"kill-{k}.log", 0.5)
        if k == 0:  # while it starts up
            time.sleep(rng.uniform(0.2, 1.5))
        else:  # at a random moment of its attribution work
            deadline = time.monotonic() + 120
            while not calls(f"kill-{k}.log") and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.5 * (total - finished_before)))
        process.send_signal(signal.SIGKILL)
        process.communicate()
        if process.returncode == -signal.SIGKILL and calls(f"kill-{k}.log"):
            killed_mid_work += 1
        # A resumed run attempts only what was not finished before it started.
        assert calls(f"kill-{k}.log") <= total - finished_before
    assert killed_mid_work >= 3  # the kills did land inside the work

    finished_before = attribution_entries(tmp_path / "cache")
    final = run("final.log", 0.0)
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err.decode()
    assert calls("final.log") == total - finished_before
    assert cache_is_sound(tmp_path / "cache")
    uninterrupted = extract_scores(
        ExtractionPlan(dataset, classifiers, "val"), ExplainSettings(methods=METHODS, batch_size=1)
    )
    assert sorted_table(pl.read_parquet(tmp_path / "scores.parquet")).equals(sorted_table(uninterrupted))
    store = RelevanceStore(tmp_path / "store")
    assert store.complete
    joined = sorted_table(rescore(store, PAPER_REGIONS)).join(uninterrupted, on=KEY)
    np.testing.assert_allclose(joined["score"], joined["score_right"], atol=5e-4)


def test_cli_paper_profile_extracts_raw_sums_kept_in_float32_and_rescored_alike(tiny, tmp_path, monkeypatch):
    import torch

    from models.checkpoint import preprocess

    dataset, classifiers = tiny
    monkeypatch.setenv("XAI_CACHE_DIR", str(tmp_path / "cache"))
    copy = tmp_path / "data"
    shutil.copytree(dataset.root, copy)
    argv = ["extract", str(copy), "--methods", "Gradient,LayerDeepLIFT", "--folds", "fold-2", "--profile", "paper"]
    assert cli_main(argv) == 0
    layout = DatasetLayout(copy)
    table = pl.read_parquet(layout.score_table("val"))
    store = RelevanceStore(layout.relevance_store("val"))
    assert store.contents.mode == "abs-raw"
    assert store.maps("classifier-fold-2", "Gradient").dtype == np.float32
    assert store.contents.method_params["LayerDeepLIFT"]["reduce_channels"] is False
    joined = sorted_table(table).join(rescore(store, PAPER_REGIONS), on=KEY, suffix="_store")
    assert joined.height == table.height
    np.testing.assert_allclose(joined["score"], joined["score_store"], rtol=1e-5)  # float32 maps: no rounding
    # By hand, as the released code: the target logit's input gradient, |·| summed over channels, no
    # min–max, averaged inside each region.
    classifier = classifiers["classifier-fold-2"]
    names = names_in(dataset, "fold-2", "val")
    assert names
    for name, photo in zip(names, stored_photos(dataset, names)):
        face = prepare_face(photo, SIZE, ExplainSettings())
        x = preprocess(face.aligned[None], classifier.card).requires_grad_(True)
        logits = classifier.network(x)
        (gradient,) = torch.autograd.grad(logits[0, int(logits.argmax())], x)
        raw = gradient.abs().sum(dim=1)[0].numpy()
        for mask, region in zip(face.masks, face.region_names):
            got = table.filter(pl.col("image_name") == name, pl.col("region") == region, pl.col("method") == "Gradient")
            assert got["score"].item() == pytest.approx(float(raw[mask].mean()), rel=1e-4)
    # The project profile's maps of the same split are other files (min–max, channels summed first).
    assert cli_main(["extract", str(copy), "--methods", "LayerDeepLIFT", "--folds", "fold-2"]) == 0
    assert RelevanceStore(layout.relevance_store("val")).contents.mode == "abs"
    project = sorted_table(pl.read_parquet(layout.score_table("val")))["score"]
    paper = sorted_table(table.filter(pl.col("method") == "LayerDeepLIFT"))["score"]
    assert len(project) == len(paper) and float(project.max()) <= 1.0  # type: ignore[arg-type]
    assert not np.allclose(project, paper)


def test_the_store_records_where_its_maps_were_computed_and_another_device_replaces_them(tiny, tmp_path, monkeypatch):
    # No GPU here: the classifiers' device tag is faked for the store (the cache keys are not involved).
    dataset, classifiers = tiny
    plan, settings = ExtractionPlan(dataset, classifiers, "test"), ExplainSettings(methods=("Gradient",), batch_size=4)
    monkeypatch.setattr("core.extract.device_tag", lambda network: "cuda/tf32")
    extract_scores(plan, settings, store=RelevanceStore(tmp_path / "store"))
    gpu = RelevanceStore(tmp_path / "store")
    assert gpu.complete and {m.device for m in gpu.contents.models} == {"cuda/tf32"}
    assert len(gpu.contents.computed_elsewhere("cpu/float32")) == len(classifiers)
    gpu_files = {gpu.contents.maps_file(m, "Gradient") for m in gpu.contents.models}
    monkeypatch.undo()
    extract_scores(plan, settings, store=RelevanceStore(tmp_path / "store"))
    cpu = RelevanceStore(tmp_path / "store")
    assert cpu.complete and all(m.device is None for m in cpu.contents.models)
    assert cpu.contents.computed_elsewhere("cpu/float32") == ()
    assert not any((tmp_path / "store" / name).exists() for name in gpu_files)  # replaced, not mixed
