"""The relevance store: re-scoring equals eq. 4 on recomputed masks, and no kill leaves it lying."""

import dataclasses
import json
import os
import time
import warnings

import numpy as np
import polars as pl
import pytest

import core.score as store_module  # the run-length kernel: where masks are drawn and spans merged
from cache import content_hash
from core.parse import landmark_template
from core.regions import PAPER_REGIONS, RegionRule, RegionSpec, bundled_region_specs, region_masks
from core.relevance_store import (
    SKIPPED,
    RelevanceStore,
    StoreContents,
    StoredModel,
    StoreError,
    prune_region_masks,
)
from core.rescore import rescore
from core.score import region_scores
from core.score_table import SCORE_SCHEMA

SIZE = 48
# The ArcFace 5-point template at 112 px (DESIGN.md), scaled to SIZE.
TEMPLATE = (
    np.array([(38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366), (41.5493, 92.3655), (70.7299, 92.2041)])
    * SIZE
    / 112
)


def label_maps(n: int, seed: int = 0) -> np.ndarray:
    """Template faces with jittered landmarks, speckled with hair and holes so label regions are not boxes."""
    rng = np.random.default_rng(seed)
    maps = np.stack([landmark_template(TEMPLATE + rng.uniform(-2, 2, (5, 2)), SIZE) for _ in range(n)])
    speckle = rng.random(maps.shape)
    maps[(speckle < 0.05) & (maps == 1)] = 10
    maps[(speckle > 0.97) & (maps == 1)] = 0
    maps[3][maps[3] == 6] = 1  # one face without a nose: its nose (and mouth, split from it) are empty
    return maps


def contents(n: int, methods=("Gradient", "Occlusion"), fingerprint="f1", split=25, **changes) -> StoreContents:
    base = dict(
        size=SIZE,
        mode="abs",
        target="predicted",
        image_names=tuple(f"img{i}.png" for i in range(n)),
        labels=tuple("AB"[i % 2] for i in range(n)),
        faces_key="faces",
        label_maps_key="labels",
        code_version="v1",
        models=(
            StoredModel("classifier-fold-1", "fold-1", ("A", "B"), fingerprint, tuple(range(split))),
            StoredModel("classifier-fold-2", "fold-2", ("A", "B"), "f2", tuple(range(split, n))),
        ),
        methods=tuple(methods),
    )
    return StoreContents(**{**base, **changes})


def fill(store: RelevanceStore, n: int, maps: dict, skipped=(7,)) -> None:
    """Write everything of ``contents(n)``; ``skipped`` images count as unusable photos."""
    for model in store.contents.models:
        rows = list(range(len(model.images)))
        images = list(model.images)
        predicted = [SKIPPED if images[r] in skipped else images[r] % 2 for r in rows]
        store.write_predictions(model.name, rows, predicted, predicted, [0.5 + 0.01 * r for r in rows])
        usable = [r for r in rows if images[r] not in skipped]
        store.write_label_maps([images[r] for r in usable], maps["labels"][[images[r] for r in usable]])
        for method in store.contents.methods:
            store.write_maps(model.name, method, usable, maps[method][[images[r] for r in usable]])


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    n = 40
    return n, {
        "labels": label_maps(n),
        "Gradient": rng.random((n, SIZE, SIZE), dtype=np.float32),
        "Occlusion": rng.random((n, SIZE, SIZE), dtype=np.float32) ** 3,
    }


@pytest.fixture
def full_store(tmp_path, data):
    n, maps = data
    with RelevanceStore(tmp_path / "store") as store:
        store.begin(contents(n))
        fill(store, n, maps)
    return RelevanceStore(tmp_path / "store")


def expected_scores(data, spec, method, images):
    """Eq. 4 by ``region_scores`` on masks recomputed by ``region_masks`` from the label maps."""
    _, maps = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masks = region_masks(maps["labels"][images], spec)
        return region_scores(maps[method][images].astype(np.float16).astype(np.float32), masks.masks, masks.names)


@pytest.mark.parametrize("spec_name", ["paper", "extended"])
def test_rescore_equals_region_scores_on_recomputed_masks(full_store, data, spec_name):
    spec = bundled_region_specs()[spec_name]
    with pytest.warns(UserWarning) as caught:
        table = rescore(full_store, spec)
    assert any("region 'nose' is empty on 1 of 39 faces (e.g. img3.png)" in str(w.message) for w in caught)
    assert dict(table.schema) == SCORE_SCHEMA
    regions = [rule.name for rule in spec.regions]
    assert table.height == 39 * 2 * len(regions)  # image 7 was unusable
    for model in full_store.contents.models:
        images = [i for i in model.images if i != 7]
        for method in ("Gradient", "Occlusion"):
            got = (
                table.filter((pl.col("model") == model.name) & (pl.col("method") == method))["score"]
                .to_numpy()
                .reshape(len(images), len(regions))
            )
            np.testing.assert_allclose(got, expected_scores(data, spec, method, images), atol=2e-6, equal_nan=True)
    assert table.filter(pl.col("image_name") == "img3.png", pl.col("region") == "nose")["score"].is_nan().all()
    row = table.filter(pl.col("image_name") == "img10.png").row(0, named=True)
    assert (row["label"], row["predicted"], row["target"], row["fold"]) == ("A", "A", "A", "fold-1")
    assert row["target_probability"] == pytest.approx(0.6)


def test_hand_computed_label_regions(tmp_path):
    """4×4 maps: relevance (4r + c)/16; hair = pixels (0,0),(0,1),(3,0); skin (0,3),(1,1),(1,2),(1,3),(2,2)."""
    first = np.array([[10, 10, 0, 1], [0, 1, 1, 1], [0, 0, 1, 0], [10, 0, 0, 0]], np.uint8)
    second = np.where(first == 10, 0, first).astype(np.uint8)  # no hair at all
    relevance = np.arange(16, dtype=np.float32).reshape(4, 4) / 16
    spec = RegionSpec(regions=(RegionRule("hair", labels=(10,)), RegionRule("skin", labels=(1,))))
    layout = StoreContents(
        size=4,
        mode="abs",
        target="predicted",
        image_names=("a", "b"),
        labels=("A", "A"),
        faces_key="x",
        label_maps_key="y",
        code_version="z",
        models=(StoredModel("m", None, ("A",), "f", (0, 1)),),
        methods=("Gradient",),
    )
    with RelevanceStore(tmp_path) as store:
        store.begin(layout)
        store.write_predictions("m", [0, 1], [0, 0], [0, 0], [1.0, 1.0])
        store.write_label_maps([0, 1], np.stack([first, second]))
        store.write_maps("m", "Gradient", [0, 1], np.stack([relevance, relevance]))
    with pytest.warns(UserWarning, match="region 'hair' is empty on 1 of 2 faces"):
        table = rescore(RelevanceStore(tmp_path), spec)
    scores = table["score"].to_numpy()
    np.testing.assert_allclose(scores[[0, 1, 3]], [13 / 48, 31 / 80, 31 / 80], rtol=1e-6)
    assert np.isnan(scores[2])


@pytest.mark.filterwarnings("ignore:region")
def test_incomplete_store_is_refused_and_says_what_is_missing(tmp_path, data):
    n, maps = data
    with RelevanceStore(tmp_path) as store:
        store.begin(contents(n))
        fill(store, n, maps)
    # A writer killed between writing rows and journaling them: the rows are there, the journal says nothing.
    journal = tmp_path / "journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:-1]) + lines[-1][:-7])  # the last line torn mid-way
    reopened = RelevanceStore(tmp_path)
    assert not reopened.complete
    assert reopened.missing() == ["classifier-fold-2 · Occlusion: 15 of 15 relevance maps"]
    with pytest.raises(StoreError, match="incomplete .*classifier-fold-2 · Occlusion"):
        rescore(reopened, PAPER_REGIONS)
    # Methods that are complete can still be re-scored.
    assert rescore(reopened, PAPER_REGIONS, ["Gradient"]).height == 39 * 3
    # The next writer cuts the torn line, so its own lines stay readable.
    with RelevanceStore(tmp_path) as store:
        store.begin(contents(n))
        fill(store, n, maps)
    assert all(json.loads(line) for line in journal.read_bytes().splitlines())
    assert RelevanceStore(tmp_path).complete


def test_a_rerun_keeps_finished_rows_and_replaces_only_what_changed(tmp_path, data):
    n, maps = data
    with RelevanceStore(tmp_path) as store:
        store.begin(contents(n))
        fill(store, n, maps)
        kept = store.contents.maps_file(store.contents.models[1], "Gradient")
        replaced = store.contents.maps_file(store.contents.models[0], "Gradient")
    kept_bytes = (tmp_path / kept).read_bytes()
    journal = tmp_path / "journal.jsonl"

    def lines_about(name):
        return [line for line in journal.read_text().splitlines() if json.loads(line)["file"] == name]

    before = lines_about(kept)
    with RelevanceStore(tmp_path) as store:
        store.begin(contents(n, fingerprint="retrained"))  # model 1 changed: its files are new
        fill(store, n, maps)
        new = store.contents.maps_file(store.contents.models[0], "Gradient")
    assert lines_about(kept) == before and (tmp_path / kept).read_bytes() == kept_bytes  # nothing rewritten
    assert not (tmp_path / replaced).exists() and not lines_about(replaced) and len(lines_about(new)) == 1
    assert RelevanceStore(tmp_path).complete


def test_methods_accumulate_while_the_rest_is_unchanged(tmp_path, data):
    n, maps = data
    with RelevanceStore(tmp_path) as store:
        store.begin(contents(n, methods=("Gradient",)))
        fill(store, n, maps)
    with RelevanceStore(tmp_path) as store:
        store.begin(contents(n, methods=("Occlusion",)))
        assert store.contents.methods == ("Occlusion", "Gradient")
        fill(store, n, maps)
    with RelevanceStore(tmp_path) as store:
        store.begin(contents(n, methods=("Occlusion",), mode="positive"))  # other maps: the old ones are invalid
        assert store.contents.methods == ("Occlusion",)


def test_one_writer_at_a_time(tmp_path, data):
    n, _ = data
    with RelevanceStore(tmp_path) as first:
        first.begin(contents(n))
        with pytest.raises(StoreError, match="another extraction is writing"):
            RelevanceStore(tmp_path).begin(contents(n))
    RelevanceStore(tmp_path).begin(contents(n))  # released on close


@pytest.mark.filterwarnings("ignore:region")
def test_masks_are_memoised_per_spec_on_disk(full_store, tmp_path, monkeypatch):
    spec = bundled_region_specs()["extended"]
    first = rescore(full_store, spec)
    monkeypatch.setattr(store_module, "region_masks", lambda *a, **k: pytest.fail("masks recomputed"))
    second = rescore(RelevanceStore(tmp_path / "store"), spec)
    assert first.equals(second)


def test_writing_needs_begin_and_reading_an_empty_folder_says_what_to_do(tmp_path):
    store = RelevanceStore(tmp_path)
    assert not store.exists
    with pytest.raises(StoreError, match="python -m core extract"):
        rescore(store, PAPER_REGIONS)


@pytest.mark.filterwarnings("ignore:region")
def test_copying_each_span_alone_or_merged_gives_the_same_sums(full_store, tmp_path, monkeypatch):
    """Small maps merge every span into one copy; with no merging each span is copied alone."""
    spec = bundled_region_specs()["extended"]
    merged = rescore(full_store, spec)
    monkeypatch.setattr(store_module, "_MERGE_GAP", 0)
    assert rescore(RelevanceStore(tmp_path / "store"), spec).equals(merged)


def test_method_parameters_name_their_maps_and_an_old_method_is_kept_with_its_own(tmp_path, data):
    n, maps = data
    released = {"Gradient": {"initial_relevance": "onehot"}, "Occlusion": {"window": 15}}
    with RelevanceStore(tmp_path) as store:
        store.begin(contents(n, method_params=released))
        fill(store, n, maps)
        before = store.contents.maps_file(store.contents.models[0], "Occlusion")
    with RelevanceStore(tmp_path) as store:  # another Gradient: Occlusion, unchanged, is kept with its parameters
        store.begin(contents(n, methods=("Gradient",), method_params={"Gradient": {"initial_relevance": "logit"}}))
        assert store.contents.methods == ("Gradient", "Occlusion")
        assert store.contents.method_params["Occlusion"] == {"window": 15}
        assert store.contents.maps_file(store.contents.models[0], "Occlusion") == before
        assert store.missing(["Gradient"]) and not store.missing(["Occlusion"])  # other parameters, other files
    # A manifest written before parameters were recorded still opens (its maps are simply other files).
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest["method_params"]
    assert StoreContents.from_json(json.dumps(manifest)).method_params == {}


def test_raw_maps_are_kept_in_float32_and_rescored_without_rounding(tmp_path, data):
    n, maps = data
    small = {**maps, "Gradient": maps["Gradient"] * np.float32(3e-5), "Occlusion": maps["Occlusion"] * 40000}
    with RelevanceStore(tmp_path) as store:
        store.begin(contents(n, mode="abs-raw"))
        fill(store, n, small)
    store = RelevanceStore(tmp_path)
    assert store.maps("classifier-fold-1", "Gradient").dtype == np.float32
    table = rescore(store, PAPER_REGIONS)
    images = list(range(25))
    usable = [i for i in images if i != 7]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masks = region_masks(maps["labels"][usable], PAPER_REGIONS)
        for method in ("Gradient", "Occlusion"):
            expected = region_scores(small[method][usable], masks.masks, masks.names)  # float32 maps, no float16
            got = table.filter(pl.col("model") == "classifier-fold-1", pl.col("method") == method)
            np.testing.assert_allclose(got["score"].to_numpy().reshape(expected.shape), expected, rtol=1e-5)


def test_domain_scores_are_journaled_per_guard_and_read_back_as_columns(tmp_path):
    """Issue 14: a model with a guard keeps its images' domain scores (null for a model without one); a
    store reopened reads them from the journal; a new guard key starts a fresh domain file and keeps the maps."""
    guarded = StoredModel("m", None, ("A",), "f", (0, 1), domain="guard-1")
    plain = StoredModel("n", None, ("A",), "g", (0, 1))
    layout = StoreContents(
        size=4,
        mode="abs",
        target="predicted",
        image_names=("a", "b"),
        labels=("A", "A"),
        faces_key="x",
        label_maps_key="y",
        code_version="z",
        models=(guarded, plain),
        methods=("Gradient",),
    )
    with RelevanceStore(tmp_path) as store:
        store.begin(layout)
        store.write_domain("m", [0, 1], [3.5, 40.0], [False, True])
        with pytest.raises(StoreError, match="no out-of-domain guard"):
            store.write_domain("n", [0, 1], [1.0, 1.0], [False, False])
        for name in ("m", "n"):
            store.write_predictions(name, [0, 1], [0, 0], [0, 0], [1.0, 1.0])
            store.write_maps(name, "Gradient", [0, 1], np.ones((2, 4, 4)))
        store.write_label_maps([0, 1], np.ones((2, 4, 4), np.uint8))
    rows = RelevanceStore(tmp_path).rows().sort("model", "row")
    assert rows["domain_score"].to_list() == [3.5, 40.0, None, None]
    assert rows["out_of_domain"].to_list() == [False, True, None, None]
    refitted = dataclasses.replace(layout, models=(dataclasses.replace(guarded, domain="guard-2"), plain))
    with RelevanceStore(tmp_path) as store:
        store.begin(refitted)
        assert store.complete  # the maps and predictions stay; only the new guard's scores are not there yet
        assert store.rows()["domain_score"].null_count() == 4
    assert layout.maps_file(guarded, "Gradient") == refitted.maps_file(refitted.models[0], "Gradient")


def test_unused_region_masks_are_pruned_and_a_pruned_memo_is_computed_again(full_store, tmp_path):
    """Every spec scored leaves a mask file in the store: those not read for ``days`` go, used ones stay
    (a read marks them), and a store whose memo was pruned re-scores the same numbers."""
    old, used = bundled_region_specs()["extended"], PAPER_REGIONS
    expected = rescore(full_store, old)
    rescore(full_store, used)
    masks = sorted((tmp_path / "store" / "region-masks").rglob("*.npz"))
    assert len(masks) == 2
    long_ago = time.time() - 100 * 24 * 3600
    for path in masks:
        os.utime(path, (long_ago, long_ago))
    rescore(RelevanceStore(tmp_path / "store"), used)  # a fresh store object reads (and marks) the paper memo
    assert prune_region_masks(tmp_path, days=90) == 1
    (kept,) = (tmp_path / "store" / "region-masks").rglob("*.npz")
    assert kept.stat().st_mtime > long_ago
    assert rescore(RelevanceStore(tmp_path / "store"), old).equals(expected)
    assert prune_region_masks(tmp_path / "nowhere", days=1) == 0


def test_a_store_computed_on_another_device_is_told_apart_and_not_kept(tmp_path, data):
    # No GPU here: the device is a label ("cuda/tf32", what core.devices.precision_tag gives a GPU by default).
    n, maps = data
    with RelevanceStore(tmp_path) as store:
        store.begin(contents(n))
        fill(store, n, maps)
        cpu_files = {store.contents.maps_file(m, "Gradient") for m in store.contents.models}
    cpu = RelevanceStore(tmp_path)
    assert cpu.complete and all(m.device is None for m in cpu.contents.models)
    assert cpu.contents.computed_elsewhere("cpu/float32") == ()
    assert [m.name for m in cpu.contents.computed_elsewhere("cuda/tf32")] == [m.name for m in cpu.contents.models]
    # A CPU store's keys are the ones from before devices (stores written then stay valid): the same hash parts.
    model = cpu.contents.models[0]
    names = tuple(f"img{i}.png" for i in model.images)
    before = content_hash("predictions", SIZE, "faces", "f1", names, "predicted", "v1")[:20]
    assert cpu.contents.predictions_file(model) == f"predictions-{before}"

    on_gpu = contents(n)
    on_gpu = dataclasses.replace(
        on_gpu, models=tuple(dataclasses.replace(m, device="cuda/tf32") for m in on_gpu.models)
    )
    with RelevanceStore(tmp_path) as store:
        store.begin(on_gpu)
        # Nothing computed on the CPU counts for the GPU's files: every map and prediction is missing again.
        assert len(store.missing()) == 2 * (1 + len(on_gpu.methods))
        gpu_files = {store.contents.maps_file(m, "Gradient") for m in store.contents.models}
        fill(store, n, maps)
    assert not gpu_files & cpu_files and not any((tmp_path / name).exists() for name in cpu_files)
    gpu = RelevanceStore(tmp_path)
    assert gpu.complete and {m.device for m in gpu.contents.models} == {"cuda/tf32"}
    assert gpu.contents.computed_elsewhere("cuda/tf32") == ()
    assert len(gpu.contents.computed_elsewhere("cpu/float32")) == 2


def test_a_manifest_from_before_devices_reads_as_the_cpu(tmp_path, data):
    n, maps = data
    with RelevanceStore(tmp_path) as store:
        store.begin(contents(n))
        fill(store, n, maps)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for model in manifest["models"]:
        assert model.pop("device") is None
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    old = RelevanceStore(tmp_path)
    assert old.complete and old.contents.computed_elsewhere("cpu/float32") == ()
