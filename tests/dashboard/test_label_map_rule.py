"""One label-map rule (issue 10): the Regions page, ``extract`` and ``explain`` cut the same masks.

A dataset's stored label map wins over the face parser, the parser over the landmark template. The
dataset here has a random (untrained) face parser as its default card, so a parser label map would
differ from the stored one everywhere, and one face whose stored map is removed, so that face must be
parsed by the network in all three places alike.
"""

import shutil

import numpy as np
import pytest
import torch

import dashboard.render as render_module
from core.dataset import names_in, open_dataset, read_photo, segmap_file
from core.explain import explain
from core.extract import ExtractionPlan, extract_scores, load_classifiers
from core.parse import LAPA_LABELS
from core.pipeline import ExplainSettings
from core.regions import PAPER_REGIONS, region_masks
from core.relevance_store import RelevanceStore
from models.checkpoint import ModelCard
from models.parser import build_face_parser, load_face_parser, save_face_parser
from tests.dashboard.conftest import no_trouble, open_app

REGIONS = "views/regions.py"


@pytest.fixture
def parsed_dataset(tiny_dataset, tmp_path):
    """The tiny dataset with a random face parser as its default card and one fold-1 test face unmapped."""
    root = tmp_path / "dataset"
    shutil.copytree(tiny_dataset, root)
    torch.manual_seed(0)
    card = ModelCard(
        kind="face_parser",
        architecture="unet-resnet18",
        classes=LAPA_LABELS,
        input_size=32,
        channel_order="RGB",
        input_scale=1.0,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        weights="w",
    )
    save_face_parser(build_face_parser("resnet18"), card, root / "models", "parser")
    dataset = open_dataset(root)
    unmapped = names_in(dataset, "fold-1", "test")[1]
    segmap = segmap_file(dataset, unmapped)
    assert segmap is not None
    segmap.unlink()
    return dataset, unmapped


def test_regions_page_extract_and_explain_cut_the_same_masks(parsed_dataset, monkeypatch, tmp_path):
    dataset, unmapped = parsed_dataset
    drawn = []
    original = render_module.regions_rgb

    def drawing(image, masks):
        drawn.append((image, masks))
        return original(image, masks)

    monkeypatch.setattr(render_module, "regions_rgb", drawing)
    app = open_app({"dataset": str(dataset.root), "methods": ["Gradient"]}, page=REGIONS)
    no_trouble(app)
    parser = app.sidebar.text_input(key="parser").value
    assert parser is not None and parser.endswith("parser.json")  # the page runs with the parser
    page = {image.tobytes(): masks for image, masks in drawn}

    classifiers = load_classifiers(dataset.layout.classifier_cards()[:1])
    classifier = next(iter(classifiers.values()))
    settings = ExplainSettings(methods=("Gradient",), parser=load_face_parser(dataset.layout.parser_card))
    store = RelevanceStore(tmp_path / "store")
    extract_scores(ExtractionPlan(dataset, classifiers, "test"), settings, store=store)
    stored_names = list(store.contents.image_names)
    extracted = region_masks(store.label_maps(), PAPER_REGIONS).masks

    checked: set[str] = set()
    sources: set[str] = set()
    for name in names_in(dataset, "fold-1", "test"):
        face = explain(read_photo(dataset, name), classifier, settings).face
        if face.aligned.tobytes() not in page:
            continue
        np.testing.assert_array_equal(page[face.aligned.tobytes()], face.masks)
        np.testing.assert_array_equal(extracted[stored_names.index(name)], face.masks)
        checked = checked | {name}
        sources = sources | {face.parse_source}
    assert unmapped in checked and len(checked) == len(page) >= 4
    assert sources == {"stored", "parser"}


def test_photos_are_parsed_from_dlibs_68_points_unless_the_user_enters_a_parser(parsed_dataset, tmp_path):
    """Issue 14: the dataset's own parser (its default card) parses its faces that lack stored maps; the
    sample photo and uploads get parts from dlib's 68 landmarks, unless another parser card is entered."""
    dataset, _ = parsed_dataset
    app = open_app({"dataset": str(dataset.root), "methods": ["Gradient"], "source": "sample photo"})
    no_trouble(app)
    assert app.sidebar.text_input(key="parser").value == str(dataset.layout.parser_card)
    parts = " ".join(m.value for m in app.markdown)
    assert "**Face parts** (landmarks68)" in parts
    assert any(c.value.startswith("Alignment check: dlib's 68 landmarks agree") for c in app.caption)
    other = tmp_path / "other-parser"
    shutil.copytree(dataset.layout.parser_card.parent, other)
    app.sidebar.text_input(key="parser").set_value(str(other / dataset.layout.parser_card.name)).run()
    no_trouble(app)
    assert "**Face parts** (parser)" in " ".join(m.value for m in app.markdown)
