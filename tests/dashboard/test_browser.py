"""The dashboard in a real headless Chromium: pages load, an upload is explained, a shared link reopens a view.

Needs Debian's Chromium at /usr/bin/chromium (``apt-get install chromium``); skipped without it.
"""

import io
import shutil
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from core.dataset import open_dataset
from core.extract import ExtractionPlan, extract_scores, load_classifiers
from core.layout import DatasetLayout
from core.pipeline import ExplainSettings
from core.relevance_store import RelevanceStore
from core.score_table import write_score_table
from core.synth import plan_images
from core.synth.faces import render_face
from dashboard.screenshots import CHROMIUM, PAGES, browser, serve, settled

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is absent (apt-get install chromium)"),
]
METHODS = "methods=Gradient&methods=LayerGradCam"


@pytest.fixture(scope="module")
def server(tiny_dataset, tmp_path_factory):
    """A Streamlit server on a copy of the tiny dataset with both splits extracted, private cache folders."""
    folder = tmp_path_factory.mktemp("browser")
    root = folder / "dataset"
    shutil.copytree(tiny_dataset, root)
    classifiers = load_classifiers(sorted((root / "models").glob("classifier-fold-*.json")))
    for split in ("val", "test"):
        table = extract_scores(
            ExtractionPlan(open_dataset(root), classifiers, split),
            ExplainSettings(methods=("Gradient", "LayerGradCam")),
            store=RelevanceStore(DatasetLayout(root).relevance_store(split)),
        )
        write_score_table(table, DatasetLayout(root).score_table(split))
    env = {
        "XAI_DATASET": str(root),
        "XAI_CACHE_DIR": str(folder / "cache" / "results"),
        "XAI_DATA_DIR": str(folder / "data"),
    }
    with serve(env) as base:
        yield base, folder


def problems(page) -> list[str]:
    """Exception boxes and error messages the app shows."""
    boxes = page.locator('[data-testid="stException"], [data-testid="stAlertContentError"]')
    return [boxes.nth(i).inner_text() for i in range(boxes.count())]


def test_every_page_loads_without_an_exception(server, tmp_path):
    base, _ = server
    with browser(tmp_path / "profile") as context:
        page = context.new_page()
        for name, path in PAGES.items():
            page.goto(f"{base}/{path}?{METHODS}")
            settled(page)
            assert page.locator("h1").first.is_visible(), name
            assert problems(page) == [], name
            assert "Traceback" not in page.inner_text("body"), name


def test_an_uploaded_photo_is_explained(server, tmp_path):
    base, folder = server
    face = render_face(plan_images(1, seed=5, size=224)[0].params).image
    buffer = io.BytesIO()
    Image.fromarray(face).save(buffer, format="PNG")
    with browser(tmp_path / "profile") as context:
        page = context.new_page()
        page.goto(f"{base}/?source=upload&{METHODS}")
        settled(page)
        page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(
            files=[{"name": "face.png", "mimeType": "image/png", "buffer": buffer.getvalue()}]
        )
        page.get_by_text("Predicted ", exact=False).first.wait_for(timeout=180_000)
        # One heatmap per method; the upload may rerun the script more than once, so wait for them to render.
        page.locator('[data-testid="stImage"]').nth(1).wait_for(timeout=120_000)
        settled(page)
        assert problems(page) == []
    cache = folder / "cache" / "results"
    assert not cache.exists() or not any(cache.rglob("*.val"))  # the upload stayed in memory


def test_a_shared_link_reopens_the_same_view_in_a_fresh_browser(server, tmp_path):
    base, _ = server
    with browser(tmp_path / "first") as context:
        page = context.new_page()
        page.goto(f"{base}/?{METHODS}&split=val")
        settled(page)
        # Change a widget by hand: its value must reach the address bar.
        page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').filter(has_text="Relevance map").click()
        page.get_by_role("option", name="positive").click()
        page.wait_for_url("**mode=positive**", timeout=60_000)
        settled(page)
        link = page.locator('[data-testid="stSidebar"] [data-testid="stCode"]').inner_text().strip()
        reading = page.locator('[data-testid="stAlertContentInfo"]').filter(has_text="Predicted").inner_text()
        heading = page.locator("h3").filter(has_text="Predicted").inner_text()
    shared = parse_qs(urlsplit(link).query)
    assert (
        shared["mode"] == ["positive"]
        and shared["split"] == ["val"]
        and shared["methods"] == ["Gradient", "LayerGradCam"]
    )
    with browser(tmp_path / "second") as context:
        page = context.new_page()
        page.goto(link)
        settled(page)
        assert page.locator('[data-testid="stSidebar"] [data-testid="stCode"]').inner_text().strip() == link
        assert page.locator('[data-testid="stAlertContentInfo"]').filter(has_text="Predicted").inner_text() == reading
        assert page.locator("h3").filter(has_text="Predicted").inner_text() == heading
        assert problems(page) == []
