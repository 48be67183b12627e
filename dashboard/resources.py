"""Things loaded once per server and shared by every session: models, datasets, caches, stores.

Loading goes through core/models/cache; this module only decides how long each lives.
"""

# No ``from __future__ import annotations`` here: it binds the name ``annotations``, which this module
# defines as a function (every annotation below is valid at run time).
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
import streamlit as st

from cache import CACHE_DIR_ENV, DEFAULT_CACHE_DIR, DiskCache
from cache.spec_store import SpecStore, default_spec_dir
from core.annotations import AnnotationRead, load_annotations
from core.dataset import Dataset, open_dataset
from core.deployment import Limits
from core.devices import resolve_device
from core.errors import ModelError
from core.hpo import region_counts
from core.layout import DatasetLayout
from dashboard import hosting
from models.checkpoint import CARD_BYTES, Classifier, load_classifier, read_regular_file
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


def display_pixels() -> int:
    """The longest side of a photo or overlay sent to the browser: the deployment's ``Limits.display_pixels``,
    the same default in local mode."""
    current = hosting.deployment()
    return (current.limits if current is not None else Limits()).display_pixels


def device() -> str:
    """``$XAI_DEVICE`` resolved (``core.devices.resolve_device``; unset: auto, the first GPU if there is one),
    read on every call, so the models below are loaded again when it changes."""
    return str(resolve_device(os.environ.get(DEVICE_ENV) or "auto", DEVICE_ENV))


# Keyed by folder, read from the environment on every call, so a changed $XAI_CACHE_DIR is honoured.
@st.cache_resource(show_spinner="Opening the result cache …")
def _result_cache(directory: str) -> DiskCache:
    return DiskCache(directory)


@st.cache_resource(show_spinner="Opening the upload cache …")
def _upload_cache(directory: str, days: int) -> DiskCache:
    return DiskCache(directory, expire_days=days)


_CACHES_USED = "_caches_used"  # session state: the caches handed out since the last cache_notice
_PRUNE_SECONDS = 3600.0  # a long-lived upload cache drops its expired entries at least this often
_pruned: dict[str, float] = {}


def _usable(opener: Callable[..., DiskCache], kind: str, *key: object) -> DiskCache:
    """The cache ``opener(*key)`` keeps for the server; one that gave up (full or read-only disk) is not kept,
    so each run tries the disk again. Noted for ``cache_notice``."""
    cache = opener(*key)
    if cache.problem is not None:
        opener.clear()  # type: ignore[attr-defined]  # st.cache_resource's
        cache = opener(*key)
    st.session_state.setdefault(_CACHES_USED, {})[kind] = cache
    return cache


def cache_notice() -> str | None:
    """One line for the page when a cache this session used since the last call cannot be used (a full or
    read-only disk, a folder that cannot be created): the pages work without it. Names the folder only in
    local mode (the user owns the machine); hosted pages carry no server path."""
    used: dict[str, DiskCache] = st.session_state.pop(_CACHES_USED, None) or {}
    failing = [cache for cache in used.values() if cache.problem is not None]
    if not failing:
        return None
    where = "" if hosting.hosted() else f" (cache folder {failing[0].directory})"
    return (
        f"Results are not being cached: {failing[0].problem}{where}. The pages work without the cache; "
        "each result is computed again."
    )


@st.cache_resource(show_spinner=False)
def _spec_store(directory: str, limits: Limits) -> SpecStore:
    return SpecStore(directory, limits)


def limits() -> Limits:
    """The deployment's limits in hosted mode; the same defaults (``Limits()``) in local mode."""
    current = hosting.deployment()
    return current.limits if current is not None else Limits()


def _result_folder() -> Path:
    current = hosting.deployment()
    return current.cache_dir if current is not None else Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR)


def result_cache() -> DiskCache:
    """Hosted mode: the deployment's cache folder; local: ``$XAI_CACHE_DIR`` or the default. On a full or
    read-only disk a cache that misses every lookup and stores nothing (``cache_notice`` says so)."""
    return _usable(_result_cache, "results", str(_result_folder()))


def upload_cache() -> DiskCache:
    """Where results of an upload go when its user opts in: a cache of its own whose entries expire after
    ``Limits.upload_cache_days`` (the deployment's, or the default in local mode). Hosted mode: the
    deployment's ``upload_cache_dir``; local: ``uploads`` beside the result cache folder."""
    current = hosting.deployment()
    if current is not None:
        folder, days = current.upload_cache_dir, current.limits.upload_cache_days
    else:
        folder, days = _result_folder().with_name("uploads"), Limits().upload_cache_days
    cache = _usable(_upload_cache, "uploads", str(folder), days)
    now = time.monotonic()
    if now - _pruned.setdefault(str(folder), now) > _PRUNE_SECONDS:  # opening pruned it
        _pruned[str(folder)] = now
        cache.prune()
    return cache


def spec_store() -> SpecStore:
    """Hosted mode: the deployment's spec folder; local: the default (``$XAI_DATA_DIR``)."""
    current = hosting.deployment()
    return _spec_store(str(current.spec_dir if current is not None else default_spec_dir()), limits())


@st.cache_resource(show_spinner="Loading the classifier …", max_entries=4)
def classifier_from(
    card_path: str,
    modified: float,
    guard_modified: float = 0.0,
    device: str = "cpu",
    weights: tuple[int, int] = (0, 0),
    caps: Limits = Limits(),  # noqa: B008 (frozen; its card and weights caps are part of the key)
) -> Classifier:
    """``modified`` (the card's mtime) is part of the key, so a retrained model is reloaded; ``weights`` (its
    weights file's ``weights_stamp``), so weights replaced on disk under an untouched card are too;
    ``guard_modified`` (its out-of-domain guard's), so a guard fitted later is picked up; ``device``, where
    it runs; ``caps``, the largest card and weights file read."""
    return load_classifier(card_path, device=device, card_bytes=caps.card_bytes, weights_bytes=caps.weights_bytes)


@st.cache_resource(show_spinner="Loading the face parser …", max_entries=2)
def parser_from(
    card_path: str,
    modified: float,
    device: str = "cpu",
    weights: tuple[int, int] = (0, 0),
    caps: Limits = Limits(),  # noqa: B008 (as classifier_from's)
) -> FaceParser:
    return load_face_parser(card_path, device=device, card_bytes=caps.card_bytes, weights_bytes=caps.weights_bytes)


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


def weights_stamp(card_path: str | Path) -> tuple[int, int]:
    """(modification time in ns, size) of the weights file the card names, or (0, 0) when the card or the file
    cannot be read (the loader then names the problem). The card is read as the loader reads it: a regular file
    under the card cap (``models.checkpoint.read_regular_file``)."""
    try:
        name = json.loads(read_regular_file(card_path, CARD_BYTES, "model card")).get("weights")
        if not isinstance(name, str) or not name:
            return (0, 0)
        found = (Path(card_path).parent / name).stat()
    except (ModelError, OSError, ValueError, AttributeError):  # AttributeError: a JSON card that is not an object
        return (0, 0)
    return (found.st_mtime_ns, found.st_size)


def classifier(card_path: str) -> Classifier:
    return classifier_from(
        card_path, modified(card_path), modified(guard_path(card_path)), device(), weights_stamp(card_path), limits()
    )


def parser(card_path: str) -> FaceParser:
    return parser_from(card_path, modified(card_path), device(), weights_stamp(card_path), limits())


def dataset(root: str) -> Dataset:
    return dataset_from(root, modified(DatasetLayout(Path(root)).partitions))


@st.cache_resource(show_spinner="Reading the HPO annotations …", max_entries=4)
def _annotation_read(root: str, version: tuple[float, ...], keep_unlisted: bool = False) -> AnnotationRead:
    """The read and its note together: a cached read raises no warning on the next run, so the page shows
    the note itself (``annotation_note``)."""
    return load_annotations(root, keep_unlisted=keep_unlisted)


def _annotations(root: str, version: tuple[float, ...], keep_unlisted: bool = False) -> pl.DataFrame:
    return _annotation_read(root, version, keep_unlisted).table


@st.cache_resource(show_spinner=False, max_entries=4)
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
