"""The view a URL describes: a hosted link opens a new session on exactly the same view.

Every choice that shapes a page is a widget bound to a query parameter of the same name
(``bind="query-params"``): the widget starts from the URL and writes back when it changes.
Region specs travel by a short content id (``cache.spec_store``) or a bundled spec's name.
The sidebar is shared by all pages; each page reads the resulting ``View`` with ``current()``.
Bound widgets take no ``format_func``: Streamlit would put the formatted label in the URL, so
options are the URL values themselves and ``view_query`` can write them out explicitly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlencode

import streamlit as st

from cache.spec_store import UnknownSpecError
from core.attribute import METHOD_NAMES, QUICK_METHODS
from core.dataset import Dataset
from core.deployment import Deployment
from core.errors import UserFacingError
from core.layout import demo_dataset
from core.pipeline import ExplainSettings
from core.profiles import PROFILE_NAMES, Profile, apply, profile
from core.regions import RegionSpec, bundled_region_specs
from core.score import RELEVANCE_MODES
from dashboard import hosting, render, resources

DATASET_ENV = "XAI_DATASET"
URL: Final = "query-params"  # Final keeps the Literal type Streamlit's ``bind=`` wants
OTHER_CARD = "other card"
DEFAULT_SPEC = "paper"
# The demo precomputes these for its held-out faces, so they are the opening choice.
DEFAULT_METHODS = list(QUICK_METHODS)
SIDEBAR_KEYS = ("dataset", "model", "card", "parser", "methods", "mode", "spec", "profile")
# Page-level URL parameters, by page url path ("" is the default page, Explain); a link carries its page's.
PAGE_KEYS = {
    "": ("source", "split", "image", "target"),
    "regions": ("preview",),
    "statistics": ("reference", "alpha", "correction", "ttest", "figure_methods"),
    "hpo": ("scatter_method", "scatter_region"),
}
# Choices that only make sense for one dataset: forgotten when the dataset changes.
_DATASET_DEPENDENT = ("model", "card", "parser", "split", "image", "target", "reference", "preview")
_EDITED_SPEC = "_edited_spec"
_VIEW = "_view"


@dataclass(frozen=True)
class View:
    """What the sidebar chose, shared by every page."""

    dataset: Dataset | None  # None when the folder is missing or not in the dataset layout
    dataset_path: str
    card: str  # classifier model card path, "" for none
    cards: tuple[str, ...]  # every fold model card of the dataset
    parser: str  # face parser card path, "" for none (parts from dlib's 68 landmarks or the template)
    methods: tuple[str, ...]
    mode: str
    spec: RegionSpec
    spec_ref: str  # bundled name or stored id, as in the URL
    parser_is_default: bool = False  # ``parser`` is the dataset's own card, not one the user entered
    profile: str = PROFILE_NAMES[0]  # core.profiles: "project" or "paper"
    dataset_id: str = ""  # hosted mode: the deployment's id of the dataset ("" in local mode)

    @property
    def fidelity(self) -> Profile:
        return profile(self.profile)

    def settings(self, split: str | None = None, **changes) -> ExplainSettings:
        """The pipeline's settings for this view under its profile (``changes`` override fields, e.g. a
        page's target). Scores of RQ1's or RQ2's ``split`` get the profile's relevance mode, if it has one."""
        parser = resources.parser(self.parser) if self.parser else None
        settings = ExplainSettings(
            **{
                "methods": self.methods,
                "mode": self.mode,
                "spec": self.spec,
                "parser": parser,
                "detector_device": resources.device(),
                **changes,
            }
        )
        return apply(settings, self.fidelity, split=split, mode=changes.get("mode"))


def default_dataset() -> str:
    return os.environ.get(DATASET_ENV) or str(demo_dataset())


def fold_model_cards(dataset: Dataset | None) -> list[Path]:
    """The dataset's fold classifiers, ``models/classifier-fold-*.json``, in fold order."""
    if dataset is None:
        return []
    return dataset.layout.classifier_cards()


def _forget_dataset_choices() -> None:
    for key in _DATASET_DEPENDENT:
        st.session_state.pop(key, None)


def use_spec(reference: str) -> None:
    """Make a stored or bundled spec the current one (call from a widget callback, before the sidebar runs)."""
    if reference not in bundled_region_specs():
        st.session_state[_EDITED_SPEC] = reference
    st.session_state["spec"] = reference


def _spec_selector() -> tuple[RegionSpec, str]:
    store = resources.spec_store()
    bundled = bundled_region_specs()
    requested = st.session_state.get("spec") or st.query_params.get("spec")
    stored: dict[str, RegionSpec] = {}
    for reference in (st.session_state.get(_EDITED_SPEC), requested):
        if reference and reference not in bundled and reference not in stored:
            try:
                stored[reference] = store.load(reference)
            except UnknownSpecError as error:
                if reference == requested:
                    st.sidebar.warning(render.markdown_escape(f"{error}. Showing the {DEFAULT_SPEC} spec instead."))
                    st.session_state.pop("spec", None)
    # The default first, so no index is passed: Streamlit warns when a widget given a default is also set
    # through the session state (as ``use_spec`` does).
    options = [DEFAULT_SPEC, *(name for name in bundled if name != DEFAULT_SPEC), *stored]
    specs = {**bundled, **stored}
    reference = st.sidebar.selectbox(
        "Region spec",
        options,
        key="spec",
        bind=URL,
        help="Bundled specs by name; your edits (Regions page) by a short content id kept on the server.",
    )
    spec = specs[reference]
    st.sidebar.caption(
        render.markdown_escape(
            f"Regions: {', '.join(rule.name for rule in spec.regions)}"
            + ("" if reference in bundled else f" (edited spec {spec.name or 'unnamed'!r})")
        )
    )
    return spec, reference


@dataclass(frozen=True)
class _Data:
    """The sidebar's dataset, model and parser choice (local: free paths; hosted: the deployment's ids)."""

    dataset: Dataset | None
    dataset_path: str
    card: str
    cards: tuple[str, ...]
    parser: str
    parser_is_default: bool
    dataset_id: str = ""


UNKNOWN_ID = "The link names a {what} this service does not offer you; showing {shown} instead."


def _by_id(bar, label: str, what: str, ids: list[str], key: str, **options) -> str:
    """A selectbox of ids bound to the URL. An id that is unknown, or not visible to this person, gets the
    same message (nobody can probe for what exists) and the first id instead."""
    requested = st.session_state.get(key) or st.query_params.get(key)
    if requested and requested not in ids:
        bar.warning(UNKNOWN_ID.format(what=what, shown=ids[0]))
        st.session_state.pop(key, None)
        st.query_params.pop(key, None)
    return bar.selectbox(label, ids, key=key, bind=URL, **options)


def _hosted_data(bar, current: Deployment) -> _Data:
    """Hosted mode: the datasets this person may open and their fold models, by id; no server path at all
    (the parser is the deployment's, or the dataset's own card)."""
    person = hosting.signed_in_person()
    visible = current.visible(person) if person is not None else ()
    if not visible:
        st.info("No dataset is shared with you on this service yet; ask its administrator.")
        st.stop()
    dataset_id = _by_id(
        bar,
        "Dataset",
        "dataset",
        [entry.id for entry in visible],
        "dataset",
        on_change=_forget_dataset_choices,
        help="The datasets this service shares with you, by id.",
    )
    entry = current.dataset(dataset_id)
    if entry.title != entry.id:
        bar.caption(render.markdown_escape(entry.title))
    dataset = None
    try:
        dataset = resources.dataset(str(entry.folder))
    except UserFacingError as error:
        bar.error(hosting.shown_error(error))
    cards = tuple(str(card) for card in entry.models.values())
    card = ""
    if entry.models:
        model = _by_id(bar, "Fold model", "model", list(entry.models), "model", help="This dataset's models, by id.")
        card = str(entry.models[model])
    # The deployment's parser is chosen on purpose (photos too); the dataset's own card, as in local mode, only
    # for its stored images (photos: dlib's landmarks).
    parser, own = entry.parser, False
    if parser is None and dataset is not None and dataset.layout.parser_card.is_file():
        parser, own = dataset.layout.parser_card, True
    return _Data(dataset, dataset_id, card, cards, str(parser) if parser else "", own, dataset_id)


def sidebar() -> View:
    """Draw the shared sidebar and remember its view for the pages of this run."""
    bar = st.sidebar
    try:
        resources.device()  # $XAI_DEVICE: a bad name or a missing GPU is one line, before any model loads
    except UserFacingError as error:
        st.error(render.markdown_escape(str(error)))
        st.stop()
    bar.header("Data and model")
    current = hosting.deployment()
    data = _hosted_data(bar, current) if current is not None else _local_data(bar)
    return _explanation(bar, data)


def _local_data(bar) -> _Data:
    """Local mode: any folder and card the user names (they own the machine)."""
    dataset_path = bar.text_input(
        "Dataset folder",
        value=default_dataset(),
        key="dataset",
        bind=URL,
        on_change=_forget_dataset_choices,
        help="A folder in the NIH-Faces layout (images/, metadata/partitions.csv). Default: the synthetic demo, "
        f"or ${DATASET_ENV}.",
    ).strip()
    dataset = None
    try:
        dataset = resources.dataset(dataset_path)
    except UserFacingError as error:  # it quotes the typed path
        bar.error(render.markdown_escape(str(error)))
    cards = fold_model_cards(dataset)
    stems = [card.stem for card in cards]
    model = bar.selectbox(
        "Fold model",
        [*stems, OTHER_CARD],
        key="model",
        bind=URL,
        help="The dataset's models/classifier-fold-*.json, or any classifier card (other card).",
    )
    if model == OTHER_CARD:
        card = bar.text_input(
            "Classifier model card (JSON)",
            value="",
            key="card",
            bind=URL,
            help="A JSON card beside its weights; see README 'Bring your own model'.",
        ).strip()
    else:
        card = str(cards[stems.index(model)])
    default_parser = dataset.layout.parser_card if dataset is not None else None
    default_parser_value = str(default_parser) if default_parser is not None and default_parser.is_file() else ""
    parser = bar.text_input(
        "Face parser model card (JSON, optional)",
        value=default_parser_value,
        key="parser",
        bind=URL,
        help="Dataset images: their stored label maps (features/segmaps/) win, then this parser. Photos (sample, "
        "upload): parts drawn from dlib's 68 landmarks, unless you enter a card other than the dataset's own here. "
        "Without dlib, a landmark template.",
    ).strip()
    return _Data(
        dataset,
        dataset_path,
        card,
        tuple(map(str, cards)),
        parser,
        bool(parser) and parser == default_parser_value,
    )


def _explanation(bar, data: _Data) -> View:
    bar.header("Explanation")
    methods = bar.multiselect("Saliency methods", METHOD_NAMES, default=DEFAULT_METHODS, key="methods", bind=URL)
    mode = bar.selectbox(
        "Relevance map",
        RELEVANCE_MODES,
        key="mode",
        bind=URL,
        help="abs: the paper's |a| summed over channels, min–max per image; positive: evidence "
        "for the class only; signed: both signs; abs-raw: |a| summed, not normalised (the released "
        "code's Table 3). The paper profile fixes the Statistics and HPO pages' modes (abs-raw, abs).",
    )
    spec, spec_ref = _spec_selector()
    chosen_profile = bar.selectbox(
        "Fidelity profile",
        PROFILE_NAMES,
        key="profile",
        bind=URL,
        help="project: this tool's choices. paper: the released code's where they differ (raw Σ|a| for "
        "Table 3, LayerDeepLIFT per channel, LRP without residual canonizers, weights 1/3, χ² and t-SNE "
        "of Figure 4, the five annotated syndromes). README 'Fidelity profiles'.",
    )
    if chosen_profile != PROFILE_NAMES[0]:
        bar.caption(f"Profile {chosen_profile}: {profile(chosen_profile).summary}.")
    view = View(
        dataset=data.dataset,
        dataset_path=data.dataset_path,
        card=data.card,
        cards=data.cards,
        parser=data.parser,
        parser_is_default=data.parser_is_default,
        dataset_id=data.dataset_id,
        methods=tuple(methods),
        mode=mode,
        spec=spec,
        spec_ref=spec_ref,
        profile=chosen_profile,
    )
    st.session_state[_VIEW] = view
    return view


def current() -> View:
    """The view the sidebar drew in this run (pages run after it)."""
    return st.session_state[_VIEW]


def _encoded(value) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if isinstance(value, bool):
        return [str(value).lower()]
    return [str(value)]


def view_query(page_path: str) -> str:
    """Every sidebar choice and the page's own, explicitly (defaults included): the link survives a changed default."""
    pairs: list[tuple[str, str]] = []
    for key in (*SIDEBAR_KEYS, *PAGE_KEYS.get(page_path, ())):
        if key in st.session_state and st.session_state[key] is not None:
            pairs.extend((key, v) for v in _encoded(st.session_state[key]))
    return urlencode(pairs)


def link_hint(slot, page_path: str) -> None:
    """Show the link that reopens this view (with the browser's address when Streamlit knows it)."""
    base = (st.context.url or "").rstrip("/")
    if page_path and base.endswith(f"/{page_path}"):  # Streamlit leaves the page's own path in the URL
        base = base[: -len(page_path) - 1]
    link = f"{base}/{page_path}?{view_query(page_path)}"  # the default page's path is ""
    with slot.container():
        st.markdown("**Copy link to this view**")
        st.code(link, language=None, wrap_lines=True)
