"""Explain one face: landmarks, alignment, parts, regions, prediction, saliency maps, region scores."""
from __future__ import annotations


import numpy as np
import plotly.graph_objects as go
import streamlit as st

from cache import DiskCache
from core.attribute import METHOD_NAMES
from core.errors import UserFacingError
from core.explain import explain, prepare_face
from core.imageio import load_image
from core.demo import DemoPreset
from core.dataset import Dataset, DatasetError, image_file, landmarks_of, names_in, open_dataset
from core.paths import demo_dataset, demo_model_cards, demo_parser_card
from core.regions import bundled_region_specs
from core.score import RELEVANCE_MODES
from dashboard import render
from models.checkpoint import Classifier, load_classifier
from models.parser import FaceParser, load_face_parser

# The demo precomputes these for its held-out faces, so they are the page's opening choice.
FAST_METHODS = list(DemoPreset().cheap_methods)


@st.cache_resource(show_spinner="Opening the result cache …")
def result_cache() -> DiskCache:
    return DiskCache()


@st.cache_resource(show_spinner="Loading the classifier …", max_entries=4)
def classifier_from(card_path: str) -> Classifier:
    return load_classifier(card_path)


@st.cache_resource(show_spinner="Loading the face parser …", max_entries=2)
def parser_from(card_path: str) -> FaceParser:
    return load_face_parser(card_path)


@st.cache_resource(show_spinner=False, max_entries=2)
def dataset_at(root: str) -> Dataset | None:
    try:
        return open_dataset(root)
    except DatasetError:
        return None


@st.cache_data(show_spinner=False, max_entries=1)
def sample_photo() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def sidebar() -> dict:
    st.sidebar.header("Model")
    cards = [str(p) for p in demo_model_cards()]
    card = st.sidebar.text_input(
        "Classifier model card (JSON)", value=cards[0] if cards else "",
        help="A JSON card beside its weights; see README 'Bring your own model'.",
    )
    default_parser = demo_parser_card()
    parser = st.sidebar.text_input(
        "Face parser model card (JSON, optional)", value=str(default_parser) if default_parser else "",
        help="Without a parser, the face parts are drawn from the five landmarks (a template).",
    )
    st.sidebar.header("Explanation")
    methods = st.sidebar.multiselect("Saliency methods", METHOD_NAMES, default=FAST_METHODS)
    mode = st.sidebar.selectbox("Relevance map", RELEVANCE_MODES, help="abs: the paper's |a| summed over channels, "
                                "min–max per image; positive: evidence for the class only; signed: both signs.")
    specs = bundled_region_specs()
    spec_name = st.sidebar.selectbox("Regions", list(specs), index=list(specs).index("paper") if "paper" in specs else 0)
    return {"card": card.strip(), "parser": parser.strip(), "methods": methods, "mode": mode,
            "spec": specs[spec_name]}


def photo_input() -> tuple[np.ndarray | None, np.ndarray | None, bool]:
    """The photo to explain, its known landmarks (or None), and whether results may be cached on disk."""
    dataset = dataset_at(str(demo_dataset()))
    sources = (["Demo dataset (held-out faces)"] if dataset is not None else []) + [
        "Sample photo (scikit-image astronaut)", "Upload a photo"]
    source = st.radio("Photo", sources, horizontal=True)
    if source.startswith("Demo"):
        fold = dataset.folds[0]
        names = names_in(dataset, fold, "test")
        labels = dict(zip(dataset.table["image_name"], dataset.table["label"]))
        name = st.selectbox("Face", names, format_func=lambda n: f"{n} ({labels[n]})")
        return load_image(image_file(dataset, name)), landmarks_of(dataset, [name])[0], True
    if source.startswith("Sample"):
        return sample_photo(), None, True
    upload = st.file_uploader("Face photo", type=["jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp"])
    keep = st.checkbox("Cache results of this upload on disk", value=False,
                       help="Off by default: uploaded photos are patient data and stay in memory only.")
    if upload is None:
        return None, None, False
    return load_image(upload.getvalue()), None, keep


def show_face(face, image: np.ndarray) -> None:
    left, middle, right = st.columns(3)
    left.markdown("**Photo and landmarks**")
    left.plotly_chart(render.image_figure(image, face.landmarks), width="stretch")
    middle.markdown(f"**Face parts** ({face.parse_source})")
    middle.plotly_chart(render.image_figure(render.blend(face.aligned, render.label_map_rgb(face.label_map), 0.55,
                                                         where=face.label_map > 0)), width="stretch")
    right.markdown("**Regions**: " + ", ".join(face.region_names))
    right.plotly_chart(render.image_figure(render.regions_rgb(face.aligned, face.masks)), width="stretch")
    for note in face.notes:
        st.info(note)


def show_explanation(result) -> None:
    order = np.argsort(result.probabilities)[::-1][:5]
    st.subheader(f"Predicted {result.classes[result.predicted]} "
                 f"({result.probabilities[result.predicted]:.2f}); explaining {result.classes[result.target]}")
    st.plotly_chart(go.Figure(go.Bar(x=result.probabilities[order][::-1], y=[result.classes[i] for i in order][::-1],
                                     orientation="h")).update_layout(height=220, margin=dict(l=0, r=0, t=0, b=0),
                                                                     xaxis_title="probability"), width="stretch")
    columns = st.columns(4)
    for i, (method, relevance) in enumerate(result.maps.items()):
        with columns[i % 4]:
            st.markdown(f"**{method}**")
            st.image(render.heatmap_rgb(result.face.aligned, relevance), width="stretch")
    scores = go.Figure()
    for r, region in enumerate(result.face.region_names):
        scores.add_bar(name=region, x=list(result.scores), y=[s[r] for s in result.scores.values()])
    scores.update_layout(barmode="group", height=340, yaxis_title="region score C_i", margin=dict(t=10))
    st.markdown("**Region scores per method** (mean relevance inside each region, paper eq. 4)")
    st.plotly_chart(scores, width="stretch")


def main() -> None:
    st.title("Explain a face")
    options = sidebar()
    try:
        image, landmarks, may_cache = photo_input()
        if image is None:
            st.info("Upload a frontal face photo to explain it.")
            return
        cache = result_cache() if may_cache else None
        classifier = classifier_from(options["card"]) if options["card"] else None
        parser = parser_from(options["parser"]) if options["parser"] else None
        size = classifier.card.input_size if classifier else 224
        face = prepare_face(image, size, options["spec"], landmarks=landmarks, parser=parser, cache=cache)
        show_face(face, image)
        if classifier is None:
            st.warning("No classifier model card given: alignment, parts and regions are shown; predictions and "
                       "saliency maps need a model (enter its card in the sidebar).")
            return
        bar = st.progress(0.0, text="Explaining …")
        result = explain(image, classifier, options["methods"], options["spec"], landmarks=face.landmarks,
                         parser=parser, mode=options["mode"], cache=cache,
                         progress=lambda m, i, n: bar.progress(i / max(n, 1), text=f"{m} ({i + 1}/{n})"))
        bar.empty()
        show_explanation(result)
    except UserFacingError as error:
        st.error(str(error))


main()
