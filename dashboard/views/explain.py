"""Explain one face: landmarks, alignment, parts, regions, prediction, saliency maps, region scores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import streamlit as st

from core.dataset import Dataset, names_in, read_photo
from core.dataset import Photo as SourcePhoto
from core.domain import NO_GUARD_REASON
from core.errors import UserFacingError
from core.explain import Explanation, explain
from core.hpo import ontology_priors
from core.imageio import load_image
from core.pipeline import PreparedFace, prepare_face
from core.reading import reading, syndrome_name
from dashboard import hosting, render, resources, state

DATASET_IMAGE, SAMPLE_PHOTO, UPLOAD = "dataset image", "sample photo", "upload"
SPLITS = ("test", "val", "train", "all")
PREDICTED = "predicted"


@dataclass(frozen=True)
class Photo:
    image: np.ndarray
    landmarks: np.ndarray | None  # known landmarks (dataset), else detected
    stored_map: np.ndarray | None  # the dataset's label map: it wins over the parser
    name: str | None  # dataset image name
    label: str | None  # dataset label
    may_cache: bool  # results may go to the disk cache (never for an upload unless opted in)
    uploaded: bool = False  # an upload's results, when cached, go to the upload cache, whose entries expire

    @property
    def source(self) -> SourcePhoto:
        return SourcePhoto(self.image, self.landmarks, self.stored_map)


@st.cache_data(show_spinner=False, max_entries=1)
def sample_photo() -> np.ndarray:
    from skimage import data

    return data.astronaut()


@st.cache_data(show_spinner=False, max_entries=16)
def expected_terms(syndrome: str) -> pl.DataFrame:
    return ontology_priors(syndrome)


def _fold_of(dataset: Dataset, card_fold: str | None) -> str | None:
    if card_fold in dataset.folds:
        return card_fold
    return dataset.folds[0] if dataset.folds else None


def dataset_photo(dataset: Dataset, fold: str | None) -> Photo:
    splits = SPLITS if fold is not None else ("all",)
    split = st.selectbox(
        "Split",
        splits,
        key="split",
        bind=state.URL,
        on_change=lambda: st.session_state.pop("image", None),
        help=f"Images of {fold}'s held-out test set, validation set, training set, or all images."
        if fold
        else "The dataset has no fold columns, so every image is listed.",
    )
    # Without fold columns "all" is the only split offered.
    names = dataset.table["image_name"].to_list() if split == "all" or fold is None else names_in(dataset, fold, split)
    if not names:
        raise UserFacingError(f"{fold} has no {split} images in this dataset; choose another split")
    labels = dataset.labels
    ids = hosting.image_ids(names)  # hosted mode: opaque ids in the page and the link; local: the file names
    name = ids[st.selectbox("Face", list(ids), key="image", bind=state.URL)]
    st.caption(f"True label: {render.markdown_escape(labels[name])}")
    photo = read_photo(dataset, name)
    return Photo(
        image=photo.image,
        landmarks=photo.landmarks,
        stored_map=photo.label_map,
        name=name,
        label=labels[name],
        may_cache=True,
    )


def photo_input(view: state.View, card_fold: str | None) -> Photo | None:
    sources = [DATASET_IMAGE, SAMPLE_PHOTO, UPLOAD] if view.dataset is not None else [SAMPLE_PHOTO, UPLOAD]
    source = st.radio(
        "Photo",
        sources,
        key="source",
        bind=state.URL,
        horizontal=True,
        help="A face of the dataset, scikit-image's astronaut photo, or your own photo.",
    )
    if source == DATASET_IMAGE and view.dataset is not None:  # only offered with a dataset
        return dataset_photo(view.dataset, _fold_of(view.dataset, card_fold))
    if source == SAMPLE_PHOTO:
        return Photo(sample_photo(), None, None, None, None, may_cache=True)
    upload = st.file_uploader("Face photo", type=["jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp"], key="upload")
    keep = st.checkbox(
        "Cache results of this upload on disk",
        value=False,
        key="keep_upload",
        help="Off by default: uploaded photos are patient data and stay in memory only.",
    )
    if upload is None:
        return None
    return Photo(load_image(upload.getvalue()), None, None, None, None, may_cache=keep, uploaded=True)


def show_face(face: PreparedFace, image: np.ndarray) -> None:
    limit = resources.display_pixels()  # the browser gets pictures at display size, never the full photo
    columns = st.columns(4)
    columns[0].markdown("**Photo and landmarks**")
    columns[0].plotly_chart(render.image_figure(image, face.landmarks, limit=limit), width="stretch")
    columns[1].markdown("**Aligned face**")
    columns[1].plotly_chart(render.image_figure(face.aligned, face.aligned_landmarks, limit=limit), width="stretch")
    columns[2].markdown(f"**Face parts** ({render.markdown_escape(face.parse_source)})")
    parts = render.parts_rgb(face.aligned, face.label_map)
    columns[2].plotly_chart(render.image_figure(parts, limit=limit), width="stretch")
    columns[3].markdown("**Regions**: " + render.region_legend(face.region_names))
    regions = render.regions_rgb(face.aligned, face.masks)
    columns[3].plotly_chart(render.image_figure(regions, limit=limit), width="stretch")
    for note in face.notes:
        st.info(render.markdown_escape(note))


def show_alignment(face: PreparedFace) -> None:
    """The second detector's opinion on the alignment (issue 14): a warning when it is likely wrong."""
    check = face.alignment_check
    if check is None:
        return
    if check.warning is not None:
        st.warning(check.warning, icon="⚠️")
    elif check.disagreement_iod is not None:
        st.caption(
            f"Alignment check: dlib's 68 landmarks agree with the five used to {check.disagreement_iod:.2f} eye "
            f"distances (warning past {check.threshold_iod})."
        )


def show_terms(result: Explanation, photo: Photo, view: state.View) -> pl.DataFrame | None:
    """The ontology's facial terms for the explained class and, for dataset images, the raters' terms."""
    target = result.classes[result.target]
    priors = None
    st.markdown(f"**Facial HPO terms the ontology expects for {render.markdown_escape(syndrome_name(target))}**")
    try:
        priors = expected_terms(target)
    except UserFacingError as error:
        st.caption(hosting.shown_error(error))
    if priors is not None:
        if priors.is_empty():
            st.caption("none listed")
        else:
            st.dataframe(priors.sort("region"), hide_index=True, width="stretch", height=200)
    if photo.name is not None and view.dataset is not None:  # a named photo comes from the dataset
        st.markdown(
            f"**Terms the raters annotated on {render.markdown_escape(hosting.image_label(photo.name))}** "
            f"(true label {render.markdown_escape(photo.label)})"
        )
        try:
            annotations = resources.annotations(view.dataset)
        except UserFacingError as error:
            st.caption(hosting.shown_error(error))
        else:
            marked = annotations.filter((pl.col("image_name") == photo.name) & (pl.col("value") > 0))
            if marked.is_empty():
                st.caption("no annotated term (or the image is not in the annotated set)")
            else:
                st.dataframe(
                    marked.group_by("region", "term", "hpo_id").agg(marks=pl.col("value").sum()).sort("region", "term"),
                    hide_index=True,
                    width="stretch",
                    height=200,
                )
    return priors


def show_prediction(result: Explanation, photo: Photo, view: state.View) -> None:
    left, right = st.columns([3, 2])
    with left:
        st.subheader(
            render.markdown_escape(
                f"Predicted {result.classes[result.predicted]} "
                f"({result.probabilities[result.predicted]:.2f}); explaining {result.classes[result.target]}"
            )
        )
        show_alignment(result.face)
        show_domain(result)
        reading_slot = st.empty()
        st.plotly_chart(render.probability_bars(result.classes, result.probabilities), width="stretch")
    with right:
        priors = show_terms(result, photo, view)
    reading_slot.info(render.markdown_escape(reading(result, priors)))  # plain text naming regions and classes


def show_domain(result: Explanation) -> None:
    """The out-of-domain guard's verdict beside the prediction; past the threshold, a warning."""
    verdict = result.domain
    if verdict is None:
        st.caption(f"Out-of-domain check: none — {NO_GUARD_REASON}.")
    elif verdict.out_of_domain:
        st.warning(
            f"**This photo is unlike the faces the model was trained on** (domain score {verdict.score:.1f}, "
            f"past the threshold {verdict.threshold:.1f}). The prediction and its explanation may not mean much "
            "for this photo.",
            icon="⚠️",
        )
    else:
        st.caption(
            f"Out-of-domain check: domain score {verdict.score:.1f}, within the threshold {verdict.threshold:.1f} "
            "(like the model's training faces)."
        )


def show_maps(result: Explanation) -> None:
    target = render.markdown_escape(result.classes[result.target])
    st.markdown(f"**Saliency maps** ({result.mode} relevance, explaining {target})")
    if result.mode == "abs-raw":
        st.caption("Raw Σ|a| has each method's own units: each map is shown divided by its maximum.")
    columns = st.columns(5)
    limit = resources.display_pixels()
    for i, (method, relevance) in enumerate(result.maps.items()):
        with columns[i % 5]:
            shown = render.scaled_for_display(relevance) if result.mode == "abs-raw" else relevance
            overlay, _ = render.display_size(render.heatmap_rgb(result.face.aligned, shown), limit=limit)
            st.image(overlay, caption=method, width="stretch")
    st.markdown("**Region scores per method** (mean relevance inside each region, paper eq. 4)")
    st.plotly_chart(render.region_score_bars(result.scores, result.face.region_names), width="stretch")


def main() -> None:
    view = state.current()
    st.title("Explain a face")
    try:
        classifier = resources.classifier(view.card) if view.card else None
        photo = photo_input(view, classifier.card.fold if classifier else None)
        if photo is None:
            st.info("Upload a frontal face photo to explain it.")
            return
        cache = None
        if photo.may_cache:
            cache = resources.upload_cache() if photo.uploaded else resources.result_cache()
        target = PREDICTED
        if classifier is not None:
            options = [PREDICTED, *classifier.card.classes]
            if st.session_state.get("target") not in (None, *options):
                st.session_state.pop("target")
            chosen = st.selectbox(
                "Explain the class",
                options,
                key="target",
                bind=state.URL,
                help="Saliency for the predicted class (default) or any other class of the model.",
            )
            target = chosen
        changes: dict = {"target": target}
        if photo.name is None and view.parser_is_default:
            # A photo, not a dataset face: parts from dlib's 68 landmarks, not the parser the dataset's own
            # faces were parsed with, unless the user entered another card (DECISIONS, issue 14).
            changes["parser"] = None
        settings = view.settings(**changes)
        if classifier is None:
            face = prepare_face(photo.source, 224, settings, cache)
            show_face(face, photo.image)
            show_alignment(face)
            st.warning(
                "No classifier model card given: alignment, parts and regions are shown; predictions and "
                "saliency maps need a model (choose a fold model or enter a card in the sidebar)."
            )
            return
        bar = st.progress(0.0, text="Explaining …")

        def progress(method: str, i: int, n: int) -> None:
            bar.progress(i / max(n, 1), text=f"{method} ({i + 1}/{n})")

        result = explain(photo.source, classifier, settings, cache, progress=progress)
        bar.empty()
        show_face(result.face, photo.image)
        show_prediction(result, photo, view)
        show_maps(result)
    except (UserFacingError, ValueError) as error:
        st.error(hosting.shown_error(error))


main()
