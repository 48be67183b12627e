"""Links and the spec store: a view reopens from its URL alone, edited specs travel by content id."""

import dataclasses
import json
import threading

import pytest

from cache.spec_store import SpecStore, UnknownSpecError, default_spec_dir
from core.regions import PAPER_REGIONS, BoxRule, RegionSpec, bundled_region_specs, spec_id
from tests.dashboard.conftest import link_of, no_trouble, open_app, plain

WIDE_MOUTH = dataclasses.replace(
    PAPER_REGIONS,
    name="wide mouth",
    regions=(
        *PAPER_REGIONS.regions[:2],
        dataclasses.replace(PAPER_REGIONS.regions[2], boxes=(BoxRule((7, 9), grow_left=0.5, grow_right=0.5),)),
    ),
)


def test_a_saved_spec_loads_back_by_its_content_id_and_saving_again_changes_nothing(tmp_path):
    store = SpecStore(tmp_path / "specs")
    identifier = store.save(WIDE_MOUTH)
    assert identifier == spec_id(WIDE_MOUTH) and len(identifier) == 12
    assert store.load(identifier) == WIDE_MOUTH
    path = tmp_path / "specs" / f"{identifier}.json"
    before = path.stat().st_mtime_ns
    assert store.save(RegionSpec.from_json(WIDE_MOUTH.to_json())) == identifier
    assert path.stat().st_mtime_ns == before
    # No temporary left over (beside the store's lock and its last-pruned mark).
    assert sorted(p.name for p in (tmp_path / "specs").iterdir()) == [".lock", ".pruned", f"{identifier}.json"]


def test_concurrent_saves_of_one_spec_leave_one_whole_file(tmp_path):
    store = SpecStore(tmp_path)
    threads = [threading.Thread(target=store.save, args=(WIDE_MOUTH,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    files = [path for path in tmp_path.iterdir() if path.name not in (".lock", ".pruned")]
    assert len(files) == 1 and RegionSpec.from_json(files[0].read_text()) == WIDE_MOUTH


def test_bundled_specs_by_name_and_unknown_or_tampered_ids_are_refused(tmp_path):
    store = SpecStore(tmp_path)
    assert store.resolve("paper") == bundled_region_specs()["paper"] == PAPER_REGIONS
    assert store.reference(bundled_region_specs()["extended"]) == "extended"
    with pytest.raises(UnknownSpecError, match="not stored on this server"):
        store.resolve("0123456789ab")
    with pytest.raises(UnknownSpecError, match="not a region spec id"):
        store.resolve("../../etc/passwd")
    identifier = store.reference(WIDE_MOUTH)
    (tmp_path / f"{identifier}.json").write_text(json.dumps({**json.loads(WIDE_MOUTH.to_json()), "name": "other"}))
    with pytest.raises(UnknownSpecError, match="changed after it was stored"):
        store.load(identifier)


def test_the_spec_folder_sits_beside_the_result_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XAI_CACHE_DIR", str(tmp_path / "somewhere" / "results"))
    assert default_spec_dir() == tmp_path / "somewhere" / "specs"


def test_a_shared_link_reopens_the_same_view_in_a_new_session(on_tiny):
    first = open_app(
        {
            "methods": ["Gradient", "LayerGradCam"],
            "mode": "positive",
            "spec": "extended",
            "model": "classifier-fold-2",
            "split": "val",
            "target": "WS",
        }
    )
    no_trouble(first)
    path, query = link_of(first)
    assert path == "/"  # the Explain page is the default page
    assert query["spec"] == "extended" and query["model"] == "classifier-fold-2" and query["target"] == "WS"
    assert query["dataset"] == str(on_tiny)  # explicit, even though it is the default
    second = open_app(query)
    no_trouble(second)
    for key in ("model", "mode", "spec"):
        assert second.sidebar.selectbox(key=key).value == first.sidebar.selectbox(key=key).value
    assert second.sidebar.multiselect(key="methods").value == ["Gradient", "LayerGradCam"]
    for key in ("split", "image", "target"):
        assert second.selectbox(key=key).value == first.selectbox(key=key).value
    assert [h.value for h in second.subheader] == [h.value for h in first.subheader]
    reading = [i.value for i in first.info if i.value.startswith("Predicted")]
    assert reading and reading == [i.value for i in second.info if i.value.startswith("Predicted")]
    assert link_of(second) == (path, query)


def test_an_edited_spec_opens_from_its_id_and_an_unknown_id_falls_back_to_the_paper_spec(on_tiny):
    identifier = SpecStore().save(WIDE_MOUTH)
    app = open_app({"spec": identifier, "methods": "Gradient"})
    no_trouble(app)
    assert app.sidebar.selectbox(key="spec").value == identifier
    assert "edited spec 'wide mouth'" in plain(app.sidebar.caption[-1].value)
    unknown = open_app({"spec": "0123456789ab", "methods": "Gradient"})
    assert not unknown.exception
    assert any("not stored on this server" in w.value and "paper" in w.value for w in unknown.sidebar.warning)
    assert unknown.sidebar.selectbox(key="spec").value == "paper"


def test_changing_the_dataset_forgets_the_choices_of_the_old_one(on_tiny, tmp_path):
    app = open_app({"model": "classifier-fold-2", "split": "val"})
    no_trouble(app)
    app.sidebar.text_input(key="dataset").set_value(str(tmp_path / "elsewhere")).run()
    assert not app.exception
    assert app.sidebar.selectbox(key="model").value == "other card"
    assert any("does not exist" in e.value for e in app.sidebar.error)


def test_the_fidelity_profile_switch_reaches_the_settings_and_the_link(on_tiny):
    app = open_app({"profile": "paper", "methods": ["LayerDeepLIFT", "LRP-EpsilonPlus"]})
    no_trouble(app)
    assert app.sidebar.selectbox(key="profile").value == "paper"
    assert any("Profile paper" in c.value for c in app.sidebar.caption)
    view = app.session_state["_view"]
    rq1, rq2, explain = view.settings(split="val"), view.settings(split="test"), view.settings()
    assert (rq1.mode, rq2.mode, explain.mode) == ("abs-raw", "abs", "abs")
    assert rq1.method_params("LayerDeepLIFT")["reduce_channels"] is False
    assert rq1.method_params("LRP-EpsilonPlus")["canonizer"] == "batchnorm-only"
    assert view.fidelity.chi2_options() == {"statistic": "paper"}
    _, query = link_of(app)
    assert query["profile"] == "paper"
    default = open_app({"methods": "LayerDeepLIFT"})
    no_trouble(default)
    assert default.sidebar.selectbox(key="profile").value == "project"
    assert default.session_state["_view"].settings(split="val").method_params("LayerDeepLIFT")["reduce_channels"]
    assert default.session_state["_view"].settings(split="val").mode == "abs"
