"""Things loaded once per server and shared by every session: models, datasets, caches, stores.

Loading goes through core/models/cache; this module only decides how long each lives.
"""

# No ``from __future__ import annotations`` here: it binds the name ``annotations``, which this module
# defines as a function (every annotation below is valid at run time).
import os
from pathlib import Path

import polars as pl
import streamlit as st

from cache import CACHE_DIR_ENV, DEFAULT_CACHE_DIR, DiskCache
from cache.spec_store import SpecStore, default_spec_dir
from core.annotations import AnnotationRead, load_annotations
from core.dataset import Dataset, open_dataset
from core.devices import resolve_device
from core.hpo import region_counts
from core.layout import DatasetLayout
from dashboard import hosting
from models.checkpoint import Classifier, load_classifier
from models.domain_guard import guard_path
from models.parser import FaceParser, load_face_parser

DEVICE_ENV = "XAI_DEVICE"  # where the dashboard's networks run: auto (default), cpu, cuda or cuda:N


def keep_uploads_in_memory() -> None:
    """Starlette's multipart parser (the web server's upload route) spools a part over ``spool_max_size`` (1 MB)
    to a temporary file; raise it above ``server.maxUploadSize`` (plus the route's framing margin) so an
    uploaded photo stays in memory. Called by ``dashboard/app.py`` before the first page runs; the route reads
    the class attribute on every upload, so this holds however the server was started."""
    from starlette.formparsers import MultiPartParser
    from streamlit import config

    limit = (int(config.get_option("server.maxUploadSize")) + 2) * 2**20
    if MultiPartParser.spool_max_size < limit:
        MultiPartParser.spool_max_size = limit


def device() -> str:
    """``$XAI_DEVICE`` resolved (``core.devices.resolve_device``; unset: auto, the first GPU if there is one),
    read on every call, so the models below are loaded again when it changes."""
    return str(resolve_device(os.environ.get(DEVICE_ENV) or "auto", DEVICE_ENV))


# Keyed by folder, read from the environment on every call, so a changed $XAI_CACHE_DIR is honoured.
@st.cache_resource(show_spinner="Opening the result cache …")
def _result_cache(directory: str) -> DiskCache:
    return DiskCache(directory)


@st.cache_resource(show_spinner=False)
def _spec_store(directory: str) -> SpecStore:
    return SpecStore(directory)


def result_cache() -> DiskCache:
    """Hosted mode: the deployment's cache folder; local: ``$XAI_CACHE_DIR`` or the default."""
    current = hosting.deployment()
    if current is not None:
        return _result_cache(str(current.cache_dir))
    return _result_cache(str(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR))


def spec_store() -> SpecStore:
    """Hosted mode: the deployment's spec folder; local: the default (``$XAI_DATA_DIR``)."""
    current = hosting.deployment()
    return _spec_store(str(current.spec_dir if current is not None else default_spec_dir()))


@st.cache_resource(show_spinner="Loading the classifier …", max_entries=4)
def classifier_from(card_path: str, modified: float, guard_modified: float = 0.0, device: str = "cpu") -> Classifier:
    """``modified`` (the card's mtime) is part of the key, so a retrained model is reloaded; and
    ``guard_modified`` (its out-of-domain guard's), so a guard fitted later is picked up; ``device``, where
    it runs."""
    return load_classifier(card_path, device=device)


@st.cache_resource(show_spinner="Loading the face parser …", max_entries=2)
def parser_from(card_path: str, modified: float, device: str = "cpu") -> FaceParser:
    return load_face_parser(card_path, device=device)


@st.cache_resource(show_spinner=False, max_entries=4)
def dataset_from(root: str, modified: float) -> Dataset:
    """Raises ``DatasetError`` (not cached) when the folder is not a dataset."""
    return open_dataset(root)


def modified(path: str | Path) -> float:
    """A file's modification time, or 0 when it is missing (the loader then names the problem)."""
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return 0.0


def classifier(card_path: str) -> Classifier:
    return classifier_from(card_path, modified(card_path), modified(guard_path(card_path)), device())


def parser(card_path: str) -> FaceParser:
    return parser_from(card_path, modified(card_path), device())


def dataset(root: str) -> Dataset:
    return dataset_from(root, modified(DatasetLayout(Path(root)).partitions))


@st.cache_data(show_spinner="Reading the HPO annotations …", max_entries=4)
def _annotation_read(root: str, version: tuple[float, ...], keep_unlisted: bool = False) -> AnnotationRead:
    """The read and its note together: a cached read raises no warning on the next run, so the page shows
    the note itself (``annotation_note``)."""
    return load_annotations(root, keep_unlisted=keep_unlisted)


def _annotations(root: str, version: tuple[float, ...], keep_unlisted: bool = False) -> pl.DataFrame:
    return _annotation_read(root, version, keep_unlisted).table


@st.cache_data(show_spinner=False, max_entries=4)
def _region_counts(root: str, version: tuple[float, ...], weighting: str = "counts") -> pl.DataFrame:
    return region_counts(_annotations(root, version), weighting=weighting)


def annotations_version(dataset: Dataset) -> tuple[float, ...]:
    """What ``load_annotations`` reads: partitions.csv (it checks each annotated image's label there), both
    annotation folders and each of their files, by modification time (a tuple: any one changing counts)."""
    return (
        modified(dataset.layout.partitions),
        *(
            stamp
            for folder in dataset.layout.annotation_folders
            for stamp in (modified(folder), *(modified(path) for path in sorted(folder.glob("*.csv"))))
        ),
    )


def annotations(dataset: Dataset, keep_unlisted: bool = False) -> pl.DataFrame:
    """The raters' HPO annotations (``core.annotations.load_annotations``); raises ``AnnotationError`` if
    none. ``keep_unlisted``: keep annotated images partitions.csv lacks (the published Figure 4 did)."""
    return _annotations(str(dataset.root), annotations_version(dataset), keep_unlisted)


def annotation_note(dataset: Dataset, keep_unlisted: bool = False) -> str | None:
    """The read's note naming annotated images partitions.csv does not list (left out or kept), or None."""
    return _annotation_read(str(dataset.root), annotations_version(dataset), keep_unlisted).note


def hpo_region_counts(dataset: Dataset, weighting: str = "counts") -> pl.DataFrame:
    """Per image and region, the raters' marks (``core.hpo.region_counts``, its ``weighting``)."""
    return _region_counts(str(dataset.root), annotations_version(dataset), weighting)
