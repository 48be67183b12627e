"""Shared by the dashboard tests: a tiny synthetic dataset with two untrained fold models, private cache
and data folders for every test, and the AppTest helpers."""

import io
import re
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from core.dataset import open_dataset
from core.synth import SyntheticSpec, generate_dataset
from models.checkpoint import save_checkpoint
from tests.conftest import REPO, tiny_card, tiny_resnet

APP = str(REPO / "dashboard" / "app.py")
INPUT_SIZE = 32  # tiny classifiers: fast, and still real ResNets


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """42 synthetic faces (7 classes × 6) with label maps, annotations and two untrained fold models."""
    root = tmp_path_factory.mktemp("tiny") / "dataset"
    generate_dataset(root, SyntheticSpec(n_per_class=6, seed=0, size=96, photos_per_person=1), workers=1)
    classes = open_dataset(root).classes
    for k, fold in enumerate(("fold-1", "fold-2")):
        card = tiny_card(classes, INPUT_SIZE, fold=fold)
        save_checkpoint(tiny_resnet(num_classes=len(classes), seed=k), card, root / "models", f"classifier-{fold}")
    return root


@pytest.fixture(autouse=True)
def private_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("XAI_CACHE_DIR", str(tmp_path / "cache" / "results"))
    monkeypatch.setenv("XAI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("XAI_DATASET", raising=False)


@pytest.fixture
def on_tiny(tiny_dataset, monkeypatch) -> Path:
    monkeypatch.setenv("XAI_DATASET", str(tiny_dataset))
    return tiny_dataset


def open_app(query: dict | None = None, page: str | None = None) -> AppTest:
    app = AppTest.from_file(APP, default_timeout=180)
    app.query_params.update(query or {})
    app.run()
    if page is not None:
        app.switch_page(page).run()
    return app


def plain(markdown: str) -> str:
    """What a reader sees of text ``dashboard.render.markdown_escape`` made Markdown-safe: without its
    backslashes and word joiners (so a test can look for a phrase, or make sure a path is absent)."""
    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", markdown).replace("\u2060", "")


def no_trouble(app: AppTest) -> None:
    assert not app.exception, [e.value for e in app.exception]
    assert not app.error, [e.value for e in app.error]


def link_of(app: AppTest) -> tuple[str, dict]:
    """The page path and the query of the sidebar's "Copy link to this view"."""
    link = urlsplit(app.sidebar.code[0].value)
    query: dict = {}
    for key, value in parse_qsl(link.query):
        query[key] = (
            [*query[key], value]
            if isinstance(query.get(key), list)
            else ([query[key], value] if key in query else value)
        )
    return link.path, query


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
