"""Regions, Statistics (RQ1) and HPO correlation (RQ2) pages through AppTest, against core computed directly."""

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cache.spec_store import SpecStore
from core.annotations import read_annotations
from core.dataset import open_dataset
from core.extract import ExtractionPlan, extract_scores, load_classifiers
from core.hpo import region_counts
from core.layout import DatasetLayout
from core.pipeline import ExplainSettings
from core.regions import PAPER_REGIONS, BoxRule, RegionSpec, bundled_region_specs
from core.relevance_store import RelevanceStore
from core.rescore import rescore
from core.score_table import write_score_table
from core.stats import compare_groups, hpo_correlation
from tests.conftest import REPO
from tests.dashboard.conftest import link_of, no_trouble, open_app, plain

METHODS = ["Gradient", "LayerGradCam"]
REGIONS, STATISTICS, HPO = "views/regions.py", "views/statistics.py", "views/hpo.py"


@pytest.fixture(scope="session")
def extracted(tiny_dataset, tmp_path_factory) -> Path:
    """A copy of the tiny dataset with both splits extracted (score tables and relevance stores)."""
    root = tmp_path_factory.mktemp("extracted") / "dataset"
    shutil.copytree(tiny_dataset, root)
    dataset = open_dataset(root)
    classifiers = load_classifiers(sorted((root / "models").glob("classifier-fold-*.json")))
    for split in ("val", "test"):
        table = extract_scores(
            ExtractionPlan(dataset, classifiers, split),
            ExplainSettings(methods=tuple(METHODS)),
            store=RelevanceStore(DatasetLayout(root).relevance_store(split)),
        )
        write_score_table(table, DatasetLayout(root).score_table(split))
    return root


def fresh_copy(source: Path, target: Path, without: tuple[str, ...] = ()) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*without))
    return target


def query(root: Path, **more) -> dict:
    return {"dataset": str(root), "methods": METHODS, **more}


def widget_key(app, kind: str, fragment: str) -> str:
    keys = [w.key for w in getattr(app, kind) if w.key and fragment in w.key]
    assert len(keys) == 1, keys
    return keys[0]


def current_spec(app) -> RegionSpec:
    return SpecStore().resolve(app.sidebar.selectbox(key="spec").value)


def frame(element) -> pl.DataFrame:
    return pl.from_pandas(element.value)


# ---------------------------------------------------------------- Regions


def test_dragging_a_growth_slider_stores_the_spec_puts_its_id_in_the_url_and_rescores(extracted):
    app = open_app(query(extracted), page=REGIONS)
    no_trouble(app)
    assert app.sidebar.selectbox(key="spec").value == "paper"
    app.slider(key=widget_key(app, "slider", "grow_left-2-0")).set_value(0.5).run()
    no_trouble(app)
    wider = dataclasses.replace(
        PAPER_REGIONS,
        name="paper (edited)",
        regions=(
            *PAPER_REGIONS.regions[:2],
            dataclasses.replace(PAPER_REGIONS.regions[2], boxes=(BoxRule((7, 9), grow_left=0.5, grow_right=0.2),)),
        ),
    )
    identifier = app.sidebar.selectbox(key="spec").value
    assert identifier is not None
    assert SpecStore().load(identifier) == wider
    assert link_of(app)[1]["spec"] == identifier and link_of(app)[0] == "/regions"
    assert any(m.value.startswith("**Table 3** (split val, re-scored in ") for m in app.markdown)
    assert any(m.value.startswith("**Table 4** (split test, re-scored in ") for m in app.markdown)
    # Every page now uses the edited spec: the Statistics page's tests are those of the re-scored store.
    app.switch_page(STATISTICS).run()
    no_trouble(app)
    assert app.sidebar.selectbox(key="spec").value == identifier
    expected = compare_groups(rescore(RelevanceStore(DatasetLayout(extracted).relevance_store("val")), wider, METHODS))
    shown = frame(app.dataframe[-1])
    assert shown.select("method", "syndrome", "region", "n_syndrome", "note").equals(
        expected.select("method", "syndrome", "region", "n_syndrome", "note")
    )
    np.testing.assert_allclose(shown["mean_syndrome"].to_numpy(), expected["mean_syndrome"].to_numpy())


def test_removing_a_region_drops_the_links_and_splits_that_named_it(extracted):
    app = open_app(query(extracted), page=REGIONS)
    app.button(key=widget_key(app, "button", "remove-0")).click().run()
    no_trouble(app)
    spec = current_spec(app)
    assert [rule.name for rule in spec.regions] == ["nose", "mouth"]
    assert spec.regions[0].top is None and spec.gap_splits == PAPER_REGIONS.gap_splits
    assert any("Removed 'eye' and what pointed at it: nose's top link" in plain(i.value) for i in app.info)
    app.button(key=widget_key(app, "button", "remove-0")).click().run()
    assert [rule.name for rule in current_spec(app).regions] == ["mouth"]
    assert current_spec(app).gap_splits == ()


def test_reordering_and_adding_a_template_region(extracted):
    app = open_app(query(extracted), page=REGIONS)
    app.button(key=widget_key(app, "button", "down-0")).click().run()
    assert [rule.name for rule in current_spec(app).regions] == ["nose", "eye", "mouth"]
    app.selectbox(key=widget_key(app, "selectbox", "template")).set_value("hair")
    app.button(key=widget_key(app, "button", "add-region")).click().run()
    no_trouble(app)
    spec = current_spec(app)
    hair = next(r for r in bundled_region_specs()["extended"].regions if r.name == "hair")
    assert spec.regions[-1] == hair


def test_an_empty_label_list_is_refused_and_an_empty_region_is_a_warning(extracted):
    app = open_app(query(extracted), page=REGIONS)
    app.multiselect(key=widget_key(app, "multiselect", "labels-2-0")).set_value([]).run()
    assert not app.exception
    assert any(plain(e.value).startswith("Not applied: ") and "at least one label" in plain(e.value) for e in app.error)
    assert app.sidebar.selectbox(key="spec").value == "paper"
    app = open_app(query(extracted), page=REGIONS)
    app.slider(key=widget_key(app, "slider", "grow_left-2-0")).set_value(-0.5).run()
    app.slider(key=widget_key(app, "slider", "grow_right-2-0")).set_value(-0.5).run()  # no width left
    assert not app.exception
    assert any(
        plain(w.value).startswith("Region 'mouth' is empty on ") and " of 4 preview faces" in w.value
        for w in app.warning
    )


def test_import_and_export_of_a_spec(extracted):
    app = open_app(query(extracted), page=REGIONS)
    extended = (REPO / "core" / "region_specs" / "extended.json").read_bytes()
    app.file_uploader(key="spec_upload").upload("extended.json", extended, "application/json").run()
    no_trouble(app)
    assert app.sidebar.selectbox(key="spec").value == "extended"
    exported = app.get("download_button")[0]
    assert exported.proto.label == "Export this spec (JSON)"
    app.file_uploader(key="spec_upload").clear().upload(
        "bad.json", b'{"regions": [{"name": "x"}]}', "application/json"
    ).run()
    assert not app.exception
    assert any(plain(e.value).startswith("Not imported: region 'x'") for e in app.error)
    assert app.sidebar.selectbox(key="spec").value == "extended"
    assert RegionSpec.from_json(json.dumps(json.loads(extended))) == bundled_region_specs()["extended"]


# ---------------------------------------------------------------- Statistics (RQ1)


def test_statistics_page_shows_the_tests_core_computes_with_the_chosen_options(extracted):
    app = open_app(query(extracted, reference="KS", alpha="0.05", correction="holm", ttest="welch"), page=STATISTICS)
    no_trouble(app)
    expected = compare_groups(
        rescore(RelevanceStore(DatasetLayout(extracted).relevance_store("val")), PAPER_REGIONS, METHODS),
        reference="KS",
        alpha=0.05,
        correction="holm",
        ttest="welch",
    )
    shown = frame(app.dataframe[-1])
    assert shown["syndrome"].to_list() == expected["syndrome"].to_list()
    assert "KS" not in shown["syndrome"].to_list()
    # Six images per class, so a fold's val split has fewer than three of each: every group is degenerate.
    assert any("comparisons ran no test" in w.value for w in app.warning)
    assert [b.proto.label for b in app.get("download_button")] == [
        "Tests (CSV)",
        "Tests (Parquet)",
        "Score table (Parquet)",
    ]
    assert len(app.get("plotly_chart")) == 1 + 2  # Table 3 and one box plot per method
    assert link_of(app)[1]["reference"] == "KS" and link_of(app)[1]["correction"] == "holm"


def test_statistics_falls_back_to_the_parquet_table_without_a_store(extracted, tmp_path):
    root = fresh_copy(extracted, tmp_path / "dataset", without=("relevance",))
    app = open_app(query(root), page=STATISTICS)
    no_trouble(app)
    assert any("scored with the region spec it was extracted with" in c.value for c in app.caption)
    assert len(frame(app.dataframe[-1])) == len(compare_groups(pl.read_parquet(DatasetLayout(root).score_table("val"))))


def test_statistics_extracts_in_the_background_when_nothing_was_extracted(tiny_dataset, tmp_path):
    root = fresh_copy(tiny_dataset, tmp_path / "dataset")
    app = open_app(query(root, methods="Gradient"), page=STATISTICS)
    no_trouble(app)
    assert any("No region scores for split 'val'" in plain(i.value) for i in app.info)
    app.button(key="extract-val").click().run()
    deadline = time.monotonic() + 300
    while not app.dataframe and time.monotonic() < deadline:
        assert not app.exception and not app.error
        time.sleep(1)
        app.run()
    no_trouble(app)
    assert (
        DatasetLayout(root).score_table("val").is_file()
        and RelevanceStore(DatasetLayout(root).relevance_store("val")).complete
    )
    assert frame(app.dataframe[-1])["method"].unique().to_list() == ["Gradient"]


# ---------------------------------------------------------------- HPO correlation (RQ2)


def test_hpo_page_shows_table4_as_core_computes_it_and_figure4(extracted):
    app = open_app(query(extracted, scatter_method="LayerGradCam", scatter_region="mouth"), page=HPO)
    no_trouble(app)
    counts = region_counts(read_annotations(extracted))
    expected = hpo_correlation(
        rescore(RelevanceStore(DatasetLayout(extracted).relevance_store("test")), PAPER_REGIONS, METHODS), counts
    )
    per_model = frame(app.dataframe[0])
    assert per_model.select("method", "region", "model", "n").equals(
        expected.per_model.select("method", "region", "model", "n")
    )
    assert app.selectbox(key="scatter_method").value == "LayerGradCam"
    assert any(s.value.startswith("Table 4: Spearman ρ") for s in app.subheader)
    assert len(app.get("plotly_chart")) == 4  # Table 4, scatter, χ² bars, t-SNE
    assert any("python -m core benchmark" in c.value for c in app.code)  # synthetic data, no leaderboard yet


def test_hpo_page_shows_the_leaderboard_when_there_is_one(extracted, tmp_path):
    root = fresh_copy(extracted, tmp_path / "dataset")
    pl.DataFrame({"method": ["Gradient"], "hit_rate": [0.5]}).write_csv(root / "models" / "leaderboard.csv")
    app = open_app(query(root), page=HPO)
    no_trouble(app)
    assert frame(app.dataframe[-1])["method"].to_list() == ["Gradient"]


def test_a_dataset_without_annotations_says_what_is_missing(extracted, tmp_path):
    root = fresh_copy(extracted, tmp_path / "dataset", without=("hpo-annotations",))
    app = open_app(query(root), page=HPO)
    no_trouble(app)
    assert any("no HPO annotations" in plain(i.value) and "hpo-annotations" in plain(i.value) for i in app.info)


def test_hpo_page_names_annotated_images_partitions_csv_lacks(extracted, tmp_path):
    """As in the NIH-Faces release: an annotated image that partitions.csv does not list is left out, and
    the page says which (one warning), instead of refusing the whole page."""
    root = fresh_copy(extracted, tmp_path / "dataset")
    path = sorted(DatasetLayout(root).annotations.glob("*.csv"))[0]
    written = pl.read_csv(path)
    written.vstack(written.head(1).with_columns(pl.lit("Unlisted999.png").alias("image_name"))).write_csv(path)
    app = open_app(query(root), page=HPO)
    no_trouble(app)
    notes = [plain(w.value) for w in app.warning if "not listed in partitions.csv" in plain(w.value)]
    assert len(notes) == 1 and "Unlisted999.png" in notes[0] and path.name in notes[0]
    assert any(s.value.startswith("Table 4: Spearman ρ") for s in app.subheader)


def test_the_paper_profile_reaches_the_statistics_and_hpo_pages(extracted):
    from core.profiles import PAPER_RQ1_SYNDROMES

    app = open_app(query(extracted, profile="paper"), page=STATISTICS)
    no_trouble(app)
    scores_val = rescore(RelevanceStore(DatasetLayout(extracted).relevance_store("val")), PAPER_REGIONS, METHODS)
    five = [s for s in PAPER_RQ1_SYNDROMES if s in set(scores_val["label"])]
    expected = compare_groups(scores_val, syndromes=five)
    shown = frame(app.dataframe[-1])
    assert shown["syndrome"].to_list() == expected["syndrome"].to_list() and set(shown["syndrome"]) == set(five)
    # The store holds min–max maps; the paper's Table 3 wants raw sums: the page says so.
    assert any("relevance mode 'abs', not 'abs-raw'" in plain(c.value) for c in app.caption)
    assert app.button(key="extract-val")  # and it offers the extraction that makes them

    app = open_app(query(extracted, profile="paper"), page=HPO)
    no_trouble(app)
    counts = region_counts(read_annotations(extracted), weighting="paper")
    expected_rho = hpo_correlation(
        rescore(RelevanceStore(DatasetLayout(extracted).relevance_store("test")), PAPER_REGIONS, METHODS), counts
    ).per_model
    np.testing.assert_allclose(frame(app.dataframe[0])["rho"].to_numpy(), expected_rho["rho"].to_numpy())
    assert any("(paper)" in m.value for m in app.markdown)
    assert any("perplexity 10.0" in m.value and "random" in m.value for m in app.markdown)
