"""Re-scoring: the score table of any region spec from a relevance store, without running any model.

A spec's masks over every stored label map are computed once (``region_segments``: milliseconds per
map) and memoised twice: on disk in the store, and in memory per store object, where the dashboard
keeps one store object for every session. The sums of each model's maps then take one pass over the
stored maps (``core.score.segment_sums``).
"""

from __future__ import annotations

import collections
import functools
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from cache import content_hash, source_salt
from core import regions as regions_module
from core.regions import RegionSpec
from core.relevance_store import RelevanceStore, StoreError
from core.score import RegionSegments, SumPlan, encode_segments, join_segments, plan_sums, region_means, segment_sums
from core.score_table import SCORE_SCHEMA, score_block

Progress = Callable[[int, int, str], None]  # (done, total, what): the CLI's tqdm bar or the dashboard's
_MASK_CHUNK = 64  # label maps per region_masks call: bounds the N×R×S×S bool masks in memory
_KEPT_SEGMENTS = 4  # region specs whose encoded masks stay in memory


def rescore(
    store: RelevanceStore, spec: RegionSpec, methods: Sequence[str] | None = None, progress: Progress | None = None
) -> pl.DataFrame:
    """The score table (``SCORE_SCHEMA``) of ``spec`` from the stored maps, without running any model.

    Equals extraction with that spec up to the float16 rounding of the stored maps. The first call
    per spec computes its masks (``progress`` reports them)."""
    contents = store.contents
    methods = list(contents.methods if methods is None else methods)
    unknown = [m for m in methods if m not in contents.methods]
    if unknown:
        raise StoreError(
            f"the relevance store has no maps of {', '.join(unknown)}; it has "
            f"{', '.join(contents.methods)} (extract them first)"
        )
    store.require_complete(methods)
    segments = region_segments(store, spec, progress)
    index = store.rows()
    by_model = index.partition_by("model", as_dict=True) if len(index) else {}
    blocks = []
    total, done = len(index) * len(methods), 0
    for model in contents.models:
        rows = by_model.get((model.name,), index.clear())
        areas = segments.areas[rows["image"].to_numpy()]
        plans = _sum_plans(store, spec, model.name, rows["row"].to_numpy())
        for method in methods:
            sums = segment_sums(store.maps(model.name, method), plans, len(segments.names))
            blocks.append(score_block(model.name, model.fold, method, rows, segments.names, region_means(sums, areas)))
            done += len(rows)
            if progress is not None:
                progress(done, total, f"{model.name} · {method}")
    return pl.concat(blocks) if blocks else pl.DataFrame(schema=SCORE_SCHEMA)


def region_segments(store: RelevanceStore, spec: RegionSpec, progress: Progress | None = None) -> RegionSegments:
    """The spec's masks over every stored label map, computed once per spec and label maps (memoised
    in memory and in the store's ``region-masks/``): ``region_masks`` costs milliseconds per map."""
    key = _segments_key(spec, store.contents.label_maps_file())
    names = tuple(rule.name for rule in spec.regions)
    memo = _memo(store)
    with memo.lock:  # a second session asking for the same spec waits instead of recomputing
        if key in memo.segments:
            memo.segments.move_to_end(key)
            return memo.segments[key]
        segments = store.read_region_segments(key)
        if segments is None or segments.names != names:
            segments = _compute_segments(store, spec, progress)
            store.write_region_segments(key, segments)
        memo.segments[key] = segments
        while len(memo.segments) > _KEPT_SEGMENTS:
            memo.segments.popitem(last=False)
        return segments


@dataclass(eq=False)
class _Memo:
    """One store object's segments (by spec) and sum plans (by spec, model and rows; shared by every method)."""

    segments: collections.OrderedDict[str, RegionSegments] = field(default_factory=collections.OrderedDict)
    plans: collections.OrderedDict[tuple, list[SumPlan]] = field(default_factory=collections.OrderedDict)
    lock: threading.RLock = field(default_factory=threading.RLock)


_MEMOS: weakref.WeakKeyDictionary[RelevanceStore, _Memo] = weakref.WeakKeyDictionary()
_MEMOS_LOCK = threading.Lock()


def _memo(store: RelevanceStore) -> _Memo:
    """The store object's memo, gone with the object; its keys name contents, so a ``begin`` that
    changes the store can never serve stale entries."""
    with _MEMOS_LOCK:
        memo = _MEMOS.get(store)
        if memo is None:
            memo = _MEMOS[store] = _Memo()
        return memo


def _compute_segments(store: RelevanceStore, spec: RegionSpec, progress: Progress | None) -> RegionSegments:
    """Segments of every written label map, ``_MASK_CHUNK`` maps at a time; images without one (unusable
    photos) have no runs. Empty regions are reported once, naming a few faces."""
    contents, label_maps = store.contents, store.label_maps()
    present = store.label_maps_written()
    names = tuple(rule.name for rule in spec.regions)
    parts = []
    for first in range(0, len(present), _MASK_CHUNK):
        chunk = present[first : first + _MASK_CHUNK]
        parts.append((chunk, encode_segments(np.asarray(label_maps[chunk]), spec)))
        if progress is not None:
            progress(min(first + _MASK_CHUNK, len(present)), len(present), "region masks")
    segments = join_segments(names, len(contents.image_names), parts)
    empty = segments.areas[present] == 0
    for r in np.flatnonzero(empty.any(axis=0)):
        which = [contents.image_names[i] for i in present[empty[:, r]]]
        warnings.warn(
            f"region {names[r]!r} is empty on {len(which)} of {len(present)} faces "
            f"(e.g. {', '.join(which[:3])}): their scores are NaN",
            stacklevel=3,
        )
    return segments


def _sum_plans(store: RelevanceStore, spec: RegionSpec, model: str, rows: np.ndarray) -> list[SumPlan]:
    """The plans that sum ``rows`` of one model's maps under ``spec``; memoised, shared by every method."""
    contents = store.contents
    stored = contents.model(model)
    rows = np.asarray(rows, dtype=np.int64)
    key = (_segments_key(spec, contents.label_maps_file()), contents.predictions_file(stored), rows.tobytes())
    memo = _memo(store)
    with memo.lock:
        if key not in memo.plans:
            images = np.asarray(stored.images, dtype=np.int64)[rows]
            memo.plans[key] = plan_sums(region_segments(store, spec), rows, images, contents.size**2)
            while len(memo.plans) > _KEPT_SEGMENTS * max(1, len(contents.models)):
                memo.plans.popitem(last=False)
        return memo.plans[key]


@functools.lru_cache(maxsize=64)
def _segments_key(spec: RegionSpec, label_maps_file: str) -> str:
    """Content key of a spec's segments over some label maps, memoised: a spec's canonical JSON takes
    milliseconds to build, hashing the frozen spec microseconds."""
    return content_hash("region-segments", spec.to_json(), label_maps_file, _regions_salt())[:20]


@functools.lru_cache(maxsize=1)
def _regions_salt() -> str:
    """Source of core/regions.py: a change to how masks are drawn invalidates the memoised masks."""
    return source_salt(regions_module)
