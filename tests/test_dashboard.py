"""The dashboard through Streamlit's AppTest: pages load, compose core calls, and show bad input as messages."""
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.test_explain import card_path  # noqa: F401  (fixture)

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")


def run_app() -> AppTest:
    app = AppTest.from_file(APP, default_timeout=120)
    app.run()
    return app


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XAI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("XAI_DATA_DIR", str(tmp_path / "data"))


def test_explain_page_without_a_model_shows_alignment_and_regions():
    app = run_app()
    assert not app.exception
    assert any("No classifier model card" in w.value for w in app.warning)
    assert len(app.get("plotly_chart")) == 3  # photo + landmarks, parts, regions


def test_explain_page_with_a_model_shows_prediction_maps_and_scores(card_path):  # noqa: F811
    app = run_app()
    app.sidebar.text_input[0].set_value(str(card_path))
    app.sidebar.multiselect[0].set_value(["Gradient", "LayerGradCam"])
    app.run()
    assert not app.exception, app.exception
    assert any(h.value.startswith("Predicted ") for h in app.subheader)
    assert len(app.get("imgs")) >= 1 or len(app.get("image")) >= 2


def test_a_wrong_model_card_is_a_message_not_a_traceback(tmp_path):
    bad = tmp_path / "card.json"
    bad.write_text("{not json")
    app = run_app()
    app.sidebar.text_input[0].set_value(str(bad))
    app.run()
    assert not app.exception
    assert any("not valid JSON" in e.value for e in app.error)


@pytest.mark.slow
def test_explain_page_opens_on_a_demo_face_with_the_demo_models(tmp_path, monkeypatch):
    from core.demo import build_demo
    from tests.test_demo import TINY

    monkeypatch.setenv("XAI_DATA_DIR", str(tmp_path / "data"))
    build_demo(tmp_path / "data" / "demo", TINY, log=lambda line: None)
    app = run_app()
    assert not app.exception, app.exception
    assert app.radio[0].value.startswith("Demo dataset")
    assert any(h.value.startswith("Predicted ") for h in app.subheader)
    assert any("(parser)" in m.value for m in app.markdown)
