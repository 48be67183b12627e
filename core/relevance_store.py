"""Relevance maps kept on disk, so that a new region spec re-scores a whole dataset without any model.

A store holds what ``python -m core extract`` computed for one split of a dataset: the normalised
relevance map of every image × fold model × method (float16), the aligned label map of every image
(uint8) and, per model and image, the predicted class, the explained class and its probability.
``rescore(store, spec)`` turns those into the score table for any region spec. Layout::

    manifest.json            what the store holds: map size, relevance mode, target rule, images (names,
                             labels), models (name, fold, classes, fingerprint, which images), methods
    label-maps-<key>.npy     N_images×S×S uint8, memory-mapped
    maps-<key>.npy           one per model × method: N_rows×S×S float16, memory-mapped
    journal.jsonl            one line per finished batch: which rows of which file are written; for the
                             predictions of a model the classes and probabilities themselves
    region-masks/<label maps>/<key>.npz   memo: a region spec's masks over those label maps, run-length encoded
    .lock                    held (flock) while an extraction writes, so two writers never interleave

Kill safety: data files are created under a temporary name and renamed into place; rows are written
into the memory map and flushed, and only then journaled; a torn last journal line is ignored (and cut
before the next append). A killed writer therefore leaves a store whose journal may undercount, never
one that claims rows it lacks: the store is *detectably incomplete* (``missing()`` says what is
missing) and ``rescore`` refuses it until an extraction finishes it.

File names carry a content key of everything that decides their content (image list and files, model
fingerprint, target rule, method, relevance mode, the attribution code's version), so a rerun keeps
the finished rows of unchanged files, and files nothing refers to any more are deleted.

Scoring reads each map once, from its first to its last region pixel, in float32 chunks that stay in
the CPU cache: masks never overlap, so each label map becomes runs of equal region index along its
flattened pixels, and a region's sum is ``np.add.reduceat`` over those runs followed by a ``bincount``
(alternatives and timings: docs/DECISIONS.md, "Extraction and re-scoring"; ``bench/rescore_speed.py``).
"""
from __future__ import annotations

import collections
import dataclasses
import fcntl
import functools
import io
import json
import os
import shutil
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from cache import content_hash, source_salt
from core import regions as regions_module
from core.errors import UserFacingError
from core.regions import RegionSpec, region_masks

FORMAT = 1
SKIPPED = -1  # the predicted class stored for a photo that could not be used (unreadable, no face)
SCORE_SCHEMA = {
    "image_name": pl.String, "label": pl.String, "fold": pl.String, "model": pl.String, "method": pl.String,
    "region": pl.String, "score": pl.Float64, "predicted": pl.String, "target": pl.String,
    "target_probability": pl.Float64,
}
Progress = Callable[[int, int, str], None]  # (done, total, what): the CLI's tqdm bar or the dashboard's
_MANIFEST, _JOURNAL, _LOCK, _MASKS = "manifest.json", "journal.jsonl", ".lock", "region-masks"
_CHUNK = 16  # maps per float32 chunk: 3.2 MB at 224², about what one core's L2 and L3 share keeps hot
_PIECE = 32768  # elements per float16 -> float32 copy: torch's GRAIN_SIZE, so the copy runs on this thread
_MERGE_GAP = 8192  # elements between two spans below which one copy reads both (a copy call costs ~3 µs)
_MASK_CHUNK = 64  # label maps per region_masks call: bounds the N×R×S×S bool masks in memory
_KEPT_SEGMENTS = 4  # region specs whose encoded masks stay in memory


class StoreError(UserFacingError):
    """The relevance store is missing, incomplete, busy, or asked for something it does not hold."""


@dataclass(frozen=True)
class StoredModel:
    """One fold model of a store: which of the store's images (indices, in row order) it explains."""

    name: str
    fold: str | None
    classes: tuple[str, ...]
    fingerprint: str
    images: tuple[int, ...]


@dataclass(frozen=True)
class StoreContents:
    """Everything that decides what a store holds; its files are named after content keys of it.

    ``faces_key`` identifies the aligned faces (image files, landmarks, size) and ``label_maps_key``
    where their label maps come from; ``code_version`` the source of the attribution code.
    """

    size: int
    mode: str
    target: str
    image_names: tuple[str, ...]
    labels: tuple[str, ...]
    faces_key: str
    label_maps_key: str
    code_version: str
    models: tuple[StoredModel, ...]
    methods: tuple[str, ...]

    def label_maps_file(self) -> str:
        return f"label-maps-{_key('label-maps', self.size, self.label_maps_key, self.image_names)}.npy"

    def predictions_file(self, model: StoredModel) -> str:
        names = tuple(self.image_names[i] for i in model.images)
        return f"predictions-{_key('predictions', self.size, self.faces_key, model.fingerprint, names, self.target, self.code_version)}"

    def maps_file(self, model: StoredModel, method: str) -> str:
        return f"maps-{_key('maps', self.predictions_file(model), method, self.mode)}.npy"

    def model(self, name: str) -> StoredModel:
        for model in self.models:
            if model.name == name:
                return model
        raise StoreError(f"the relevance store has no model {name!r}; it has {', '.join(m.name for m in self.models)}")

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **dataclasses.asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> StoreContents:
        try:
            data = json.loads(text)
        except ValueError:
            raise StoreError("the relevance store's manifest.json is damaged; run extract again") from None
        if data.pop("format", None) != FORMAT:
            raise StoreError("the relevance store was written by another version of this tool; run extract again")
        models = tuple(StoredModel(**{**m, "classes": tuple(m["classes"]), "images": tuple(m["images"])})
                       for m in data.pop("models"))
        return cls(**{**data, "models": models, "image_names": tuple(data["image_names"]),
                      "labels": tuple(data["labels"]), "methods": tuple(data["methods"])})


@dataclass(frozen=True, eq=False)
class RegionSegments:
    """A region spec's masks over every stored label map, as runs of equal region index along each
    flattened map (index ``len(names)`` = no region), from its first to its last region pixel only:
    the rest of a map is never read. Regions never overlap, so this is exact."""

    names: tuple[str, ...]
    starts: np.ndarray  # int32: first pixel of each run, per image, concatenated
    regions: np.ndarray  # uint8: region index of each run
    offsets: np.ndarray  # int64, N_images + 1: image i's runs are [offsets[i], offsets[i + 1])
    spans: np.ndarray  # int32, N_images × 2: first and end pixel of the runs (first to last region pixel)
    areas: np.ndarray  # int64, N_images × R: pixels of each region


class RelevanceStore:
    """A store folder (see the module docstring). Reading needs nothing; writing happens between
    ``begin(contents)`` and ``close()`` (or as a context manager) under an exclusive lock."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._contents: StoreContents | None = None
        self._done: dict[str, set[int]] = {}
        self._predictions: dict[str, dict[int, tuple[int, int, float]]] = {}
        self._writable: dict[str, np.memmap] = {}
        self._journal = None
        self._lock = None
        self._segments: collections.OrderedDict[str, RegionSegments] = collections.OrderedDict()
        self._plans: collections.OrderedDict[tuple, list] = collections.OrderedDict()
        self._rows: pl.DataFrame | None = None
        self._readable: dict[str, np.ndarray] = {}
        self._memo_lock = threading.RLock()  # one store object serves every dashboard session
        self._reload()

    # ---------------------------------------------------------------- reading

    @property
    def contents(self) -> StoreContents:
        if self._contents is None:
            raise StoreError(f"there is no relevance store in {self.root}; run `python -m core extract` to fill it")
        return self._contents

    @property
    def exists(self) -> bool:
        return self._contents is not None

    def missing(self, methods: Sequence[str] | None = None) -> list[str]:
        """What is not written yet for ``methods`` (default: all), one line per file; empty when complete."""
        contents = self.contents
        methods = contents.methods if methods is None else methods
        lines = []
        needed_images: set[int] = set()
        for model in contents.models:
            predictions = self._predictions.get(contents.predictions_file(model), {})
            absent = len(model.images) - len(predictions)
            if absent:
                lines.append(f"{model.name}: predictions of {absent} of {len(model.images)} images")
            rows = {row for row, (predicted, _, _) in predictions.items() if predicted != SKIPPED}
            needed_images.update(model.images[row] for row in rows)
            for method in methods:
                done = self._done.get(contents.maps_file(model, method), set())
                lacking = len(rows - done) + absent
                if lacking:
                    lines.append(f"{model.name} · {method}: {lacking} of {len(model.images)} relevance maps")
        lacking = len(needed_images - self._done.get(contents.label_maps_file(), set()))
        if lacking:
            lines.append(f"label maps of {lacking} images")
        return lines

    @property
    def complete(self) -> bool:
        return self.exists and not self.missing()

    def require_complete(self, methods: Sequence[str] | None = None) -> None:
        missing = self.missing(methods)
        if missing:
            shown = "; ".join(missing[:3]) + (f"; and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise StoreError(f"the relevance store in {self.root} is incomplete (missing: {shown}); an extraction "
                             "was interrupted or is still running: run `python -m core extract` again to finish it")

    def label_maps(self) -> np.ndarray:
        """N_images×S×S uint8 (memory-mapped); rows never written are zero."""
        return self._mapped(self.contents.label_maps_file())

    def maps(self, model: str, method: str) -> np.ndarray:
        """N_rows×S×S float16 relevance maps of one model and method (memory-mapped)."""
        contents = self.contents
        if method not in contents.methods:
            raise StoreError(f"the relevance store has no method {method!r}; it has {', '.join(contents.methods)}")
        return self._mapped(contents.maps_file(contents.model(model), method))

    def _mapped(self, name: str) -> np.ndarray:
        """One mapping per file, kept: a new mapping page-faults on every page again (×5 slower, measured).
        Copy-on-write, so it is writable for torch yet never writes to the file."""
        with self._memo_lock:
            if name not in self._readable:
                self._readable[name] = np.load(self.root / name, mmap_mode="c")
            return self._readable[name]

    def rows(self) -> pl.DataFrame:
        """One row per model × usable image: model, fold, row, image, image_name, label, predicted,
        target, target_probability (class names; photos that could not be used are left out)."""
        with self._memo_lock:
            if self._rows is None:
                self._rows = self._read_rows()
            return self._rows

    def _read_rows(self) -> pl.DataFrame:
        contents = self.contents
        frames = []
        for model in contents.models:
            predictions = self._predictions.get(contents.predictions_file(model), {})
            rows = sorted(r for r, p in predictions.items() if p[0] != SKIPPED)
            images = [model.images[r] for r in rows]
            frames.append(pl.DataFrame({
                "model": [model.name] * len(rows),
                "fold": pl.Series([model.fold] * len(rows), dtype=pl.String),
                "row": pl.Series(rows, dtype=pl.Int64),
                "image": pl.Series(images, dtype=pl.Int64),
                "image_name": pl.Series([contents.image_names[i] for i in images], dtype=pl.String),
                "label": pl.Series([contents.labels[i] for i in images], dtype=pl.String),
                "predicted": pl.Series([model.classes[predictions[r][0]] for r in rows], dtype=pl.String),
                "target": pl.Series([model.classes[predictions[r][1]] for r in rows], dtype=pl.String),
                "target_probability": pl.Series([predictions[r][2] for r in rows], dtype=pl.Float64),
            }))
        return pl.concat(frames) if frames else pl.DataFrame()

    def region_segments(self, spec: RegionSpec, progress: Progress | None = None) -> RegionSegments:
        """The spec's masks over every stored label map, computed once per spec and label maps (memoised
        in memory and in ``region-masks/``): ``region_masks`` costs milliseconds per map."""
        key = self._segments_key(spec)
        with self._memo_lock:  # a second session asking for the same spec waits instead of recomputing
            if key in self._segments:
                self._segments.move_to_end(key)
                return self._segments[key]
            path = self.root / _MASKS / Path(self.contents.label_maps_file()).stem / f"{key}.npz"
            segments = _read_segments(path, spec) if path.is_file() else None
            if segments is None:
                segments = self._compute_segments(spec, progress)
                _write_atomically(path, _segments_bytes(segments))
            self._segments[key] = segments
            while len(self._segments) > _KEPT_SEGMENTS:
                self._segments.popitem(last=False)
            return segments

    def _segments_key(self, spec: RegionSpec) -> str:
        return _key("region-segments", _spec_json(spec), self.contents.label_maps_file(), _regions_salt())

    def _compute_segments(self, spec: RegionSpec, progress: Progress | None) -> RegionSegments:
        contents = self.contents
        names = tuple(rule.name for rule in spec.regions)
        n, size = len(contents.image_names), contents.size
        label_maps = self.label_maps()
        have = np.zeros(n, dtype=bool)
        have[sorted(self._done.get(contents.label_maps_file(), set()))] = True
        starts, regions = [], []
        counts = np.zeros(n, dtype=np.int64)  # images without a label map (unusable photos) have no runs
        spans = np.zeros((n, 2), dtype=np.int32)
        areas = np.zeros((n, len(names)), dtype=np.int64)
        present = np.flatnonzero(have)
        for first in range(0, len(present), _MASK_CHUNK):
            chunk = present[first:first + _MASK_CHUNK]
            with warnings.catch_warnings():  # empty regions are summarised once below, by image name
                warnings.simplefilter("ignore")
                masks = region_masks(np.asarray(label_maps[chunk]), spec).masks
            areas[chunk] = masks.sum(axis=(2, 3))
            index = np.full((len(chunk), size * size), len(names), dtype=np.uint8)
            for r in range(len(names)):
                index[masks[:, r].reshape(len(chunk), -1)] = r
            for image, pixels in zip(chunk, index):
                inside = np.flatnonzero(pixels != len(names))
                if not inside.size:
                    continue
                span = pixels[inside[0]:inside[-1] + 1]
                change = np.flatnonzero(np.concatenate(([True], span[1:] != span[:-1])))
                starts.append((change + inside[0]).astype(np.int32))
                regions.append(span[change])
                counts[image], spans[image] = len(change), (inside[0], inside[-1] + 1)
            if progress is not None:
                progress(min(first + _MASK_CHUNK, len(present)), len(present), "region masks")
        run_starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int32)
        run_regions = np.concatenate(regions) if regions else np.zeros(0, dtype=np.uint8)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        empty = (areas[present] == 0)
        for r in np.flatnonzero(empty.any(axis=0)):
            which = [contents.image_names[i] for i in present[empty[:, r]]]
            warnings.warn(f"region {names[r]!r} is empty on {len(which)} of {len(present)} faces "
                          f"(e.g. {', '.join(which[:3])}): their scores are NaN", stacklevel=3)
        return RegionSegments(names, run_starts, run_regions, offsets, spans, areas)

    def region_sums(self, model: str, method: str, spec: RegionSpec, rows: np.ndarray | None = None) -> np.ndarray:
        """rows × R sums Σ(map · mask_r) of one model and method (all usable rows by default).

        One thread: two threads over halves of the chunks gave no consistent gain on the 2 cores (the copy
        loop holds the GIL between pieces), and a second session keeps its own core."""
        segments = self.region_segments(spec)
        if rows is None:
            rows = self.rows().filter(pl.col("model") == model)["row"].to_numpy()
        rows = np.array(rows, dtype=np.int64)
        maps = self.maps(model, method)
        sums = np.empty((len(rows), len(segments.names)), dtype=np.float64)
        _sum_runs(torch.from_numpy(maps.reshape(-1)), self._chunk_plans(spec, model, rows), sums, len(segments.names))
        return sums

    def _chunk_plans(self, spec: RegionSpec, model: str, rows: np.ndarray) -> list:
        """Per chunk of rows: (first, end, reduceat boundaries, bincount slots); shared by every method."""
        key = (self._segments_key(spec), model, rows.tobytes())
        with self._memo_lock:
            if key not in self._plans:
                segments = self.region_segments(spec)
                images = np.asarray(self.contents.model(model).images, dtype=np.int64)[rows]
                pixels = self.contents.size ** 2
                self._plans[key] = [(lo, min(lo + _CHUNK, len(rows)),
                                     *_chunk_plan(segments, rows[lo:lo + _CHUNK], images[lo:lo + _CHUNK], pixels))
                                    for lo in range(0, len(rows), _CHUNK)]
                while len(self._plans) > _KEPT_SEGMENTS * max(1, len(self.contents.models)):
                    self._plans.popitem(last=False)
            return self._plans[key]

    # ---------------------------------------------------------------- writing

    def begin(self, contents: StoreContents) -> None:
        """Lock the store and make it hold ``contents``: keep the finished rows of files whose key is
        unchanged, create the missing files, drop everything else, except that methods extracted
        before stay while they are complete and still valid (same models, images, mode and target):
        extracting another method adds it."""
        self._acquire_lock()
        self._reload()
        if self._contents is not None:
            kept = tuple(m for m in self._contents.methods if m not in contents.methods
                         and all(contents.maps_file(model, m) == self._contents.maps_file(model, m)
                                 for model in contents.models)
                         and {model.name for model in contents.models} == {model.name for model in self._contents.models}
                         and not self.missing([m]))
            contents = dataclasses.replace(contents, methods=contents.methods + kept)
        shapes = {contents.label_maps_file(): ((len(contents.image_names), contents.size, contents.size), np.uint8)}
        for model in contents.models:
            for method in contents.methods:
                shapes[contents.maps_file(model, method)] = ((len(model.images), contents.size, contents.size),
                                                             np.float16)
        for name, (shape, dtype) in shapes.items():
            path = self.root / name
            if not path.is_file() or _npy_shape(path) != (shape, np.dtype(dtype)):
                temporary = path.with_name(path.name + ".tmp")
                np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=shape).flush()
                os.replace(temporary, path)
        keep = set(shapes) | {contents.predictions_file(m) for m in contents.models}
        entries, _ = _journal_entries(self.root / _JOURNAL)
        # Rewritten without a torn last line (which the next append would otherwise extend).
        kept = b"".join(json.dumps(e).encode() + b"\n" for e in entries if e.get("file") in keep)
        _write_atomically(self.root / _JOURNAL, kept)
        _write_atomically(self.root / _MANIFEST, contents.to_json().encode())
        for path in self.root.iterdir():
            if path.is_file() and path.name not in keep | {_MANIFEST, _JOURNAL, _LOCK}:
                path.unlink()
        if (self.root / _MASKS).is_dir():  # memoised masks of label maps no longer held
            for path in (self.root / _MASKS).iterdir():
                if path.name != Path(contents.label_maps_file()).stem:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        self._reload()
        self._journal = open(self.root / _JOURNAL, "ab")

    def write_label_maps(self, images: Sequence[int], label_maps: np.ndarray) -> None:
        self._write(self.contents.label_maps_file(), images, label_maps)

    def write_maps(self, model: str, method: str, rows: Sequence[int], maps: np.ndarray) -> None:
        """Relevance maps (rows × S × S, any float dtype) of ``rows`` of one model; finished rows are kept."""
        contents = self.contents
        self._write(contents.maps_file(contents.model(model), method), rows, maps)

    def write_predictions(self, model: str, rows: Sequence[int], predicted: Sequence[int], target: Sequence[int],
                          probability: Sequence[float]) -> None:
        """Class indices (``SKIPPED`` for an unusable photo) and the target's probability, per row."""
        contents = self.contents
        name = contents.predictions_file(contents.model(model))
        known = self._predictions.setdefault(name, {})
        new = [i for i, row in enumerate(rows) if int(row) not in known]
        if not new:
            return
        entry = {"file": name, "rows": [int(rows[i]) for i in new], "predicted": [int(predicted[i]) for i in new],
                 "target": [int(target[i]) for i in new], "probability": [float(probability[i]) for i in new]}
        self._append(entry)
        _apply(entry, self._done, self._predictions)
        self._rows = None

    def close(self) -> None:
        for memmap in self._writable.values():
            memmap.flush()
        self._writable.clear()
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def __enter__(self) -> RelevanceStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self, name: str, rows: Sequence[int], values: np.ndarray) -> None:
        if self._journal is None:
            raise StoreError("call begin() before writing into a relevance store")
        done = self._done.setdefault(name, set())
        new = [i for i, row in enumerate(rows) if int(row) not in done]
        if not new:
            return
        memmap = self._writable.get(name)
        if memmap is None:
            memmap = self._writable[name] = np.load(self.root / name, mmap_mode="r+")
        targets = np.asarray(rows, dtype=np.int64)[new]
        memmap[targets] = np.asarray(values)[new]
        memmap.flush()  # the rows are on disk before the journal says so
        entry = {"file": name, "rows": targets.tolist()}
        self._append(entry)
        _apply(entry, self._done, self._predictions)

    def _append(self, entry: dict) -> None:
        self._journal.write(json.dumps(entry).encode() + b"\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def _acquire_lock(self) -> None:
        if self._lock is not None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.root / _LOCK, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StoreError(f"another extraction is writing the relevance store in {self.root}; wait for it to "
                             "finish, or give this one another --store folder") from None
        self._lock = handle

    def _reload(self) -> None:
        manifest = self.root / _MANIFEST
        self._contents = StoreContents.from_json(manifest.read_text()) if manifest.is_file() else None
        self._done, self._predictions = {}, {}
        self._segments.clear()
        self._plans.clear()
        self._rows = None
        self._readable.clear()
        if self._contents is None:
            return
        entries, _ = _journal_entries(self.root / _JOURNAL)
        for entry in entries:
            _apply(entry, self._done, self._predictions)


def rescore(store: RelevanceStore, spec: RegionSpec, methods: Sequence[str] | None = None,
            progress: Progress | None = None) -> pl.DataFrame:
    """The score table (``SCORE_SCHEMA``) of ``spec`` from the stored maps, without running any model.

    Equals extraction with that spec up to the float16 rounding of the stored maps. The first call
    per spec computes its masks (``progress`` reports them)."""
    contents = store.contents
    methods = list(contents.methods if methods is None else methods)
    unknown = [m for m in methods if m not in contents.methods]
    if unknown:
        raise StoreError(f"the relevance store has no maps of {', '.join(unknown)}; it has {', '.join(contents.methods)}"
                         " (extract them first)")
    store.require_complete(methods)
    segments = store.region_segments(spec, progress)
    index = store.rows()
    by_model = index.partition_by("model", as_dict=True) if len(index) else {}
    blocks = []
    total, done = len(index) * len(methods), 0
    for model in contents.models:
        rows = by_model.get((model.name,), index.clear())
        areas = segments.areas[rows["image"].to_numpy()].astype(np.float64)
        for method in methods:
            sums = store.region_sums(model.name, method, spec, rows["row"].to_numpy())
            scores = np.divide(sums, areas, out=np.full(sums.shape, np.nan), where=areas > 0)
            blocks.append(score_block(model.name, model.fold, method, rows, segments.names, scores))
            done += len(rows)
            if progress is not None:
                progress(done, total, f"{model.name} · {method}")
    return pl.concat(blocks) if blocks else pl.DataFrame(schema=SCORE_SCHEMA)


def score_block(model: str, fold: str | None, method: str, rows: pl.DataFrame, regions: Sequence[str],
                scores: np.ndarray) -> pl.DataFrame:
    """Score-table rows of one model and method: ``rows`` has image_name, label, predicted, target,
    target_probability per image; ``scores`` is images × regions. Eager gathers: no query plans."""
    n, r = scores.shape
    per_image = rows[np.repeat(np.arange(n, dtype=np.int64), r)]  # one gather of every per-image column
    constants = pl.select(fold=pl.repeat(fold, n * r, dtype=pl.String), model=pl.repeat(model, n * r, dtype=pl.String),
                          method=pl.repeat(method, n * r, dtype=pl.String))
    return pl.DataFrame([
        per_image["image_name"], per_image["label"], constants["fold"], constants["model"], constants["method"],
        pl.Series("region", np.tile(np.asarray(regions, dtype=object), n), dtype=pl.String),
        pl.Series("score", scores.reshape(-1), dtype=pl.Float64),
        per_image["predicted"], per_image["target"], per_image["target_probability"].cast(pl.Float64),
    ])


def _sum_runs(source: torch.Tensor, plans: list, sums: np.ndarray, regions: int) -> None:
    """Fill ``sums[lo:hi]`` for each planned chunk: float16 spans of the flattened maps file ``source``
    -> float32 buffer -> run sums -> region sums."""
    flat = torch.empty(max((plan[-1] for plan in plans), default=0), dtype=torch.float32)
    for lo, hi, bounds, labels, copies, used in plans:
        # torch casts float16 -> float32 with SIMD (numpy's cast is ~20× slower) into a buffer that stays in
        # cache, in pieces below torch's parallel grain: waking the OpenMP pool between numpy calls stalls
        # ~10× on a busy machine (measured).
        for first, end, at in copies:
            for start in range(first, end, _PIECE):
                stop = min(start + _PIECE, end)
                flat[at + start - first:at + stop - first].copy_(source[start:stop])
        k = hi - lo
        totals = np.zeros(k * (regions + 1))
        if len(bounds):
            totals = np.bincount(labels, weights=np.add.reduceat(flat[:used].numpy(), bounds), minlength=len(totals))
        sums[lo:hi] = totals.reshape(k, regions + 1)[:, :-1]


def _chunk_plan(segments: RegionSegments, rows: np.ndarray, images: np.ndarray, pixels: int) -> tuple:
    """For a chunk of maps (``rows`` of the maps file, showing ``images``): reduceat boundaries into the
    buffer, each run's bincount slot (image × (R + 1) + region), the copies (first and end element of
    the flattened maps file, place in the buffer) and the buffer length used.

    Only the spans of the maps are copied (first to last region pixel), and neighbouring spans are
    merged into one copy when less than ``_MERGE_GAP`` elements lie between them: skipping a gap
    saves reading it but costs a copy call."""
    take = _run_positions(segments.offsets, images)
    counts = segments.offsets[images + 1] - segments.offsets[images]
    first = rows * pixels + segments.spans[images, 0]
    end = rows * pixels + segments.spans[images, 1]
    copies, placed = [], np.zeros(len(images), dtype=np.int64)  # placed: buffer position of each span's start
    used = 0
    for i in np.flatnonzero(end > first):
        if copies and first[i] - copies[-1][1] < _MERGE_GAP:
            copies[-1][1] = int(end[i])
        else:
            copies.append([int(first[i]), int(end[i]), used])
        placed[i] = copies[-1][2] + first[i] - copies[-1][0]
        used = copies[-1][2] + copies[-1][1] - copies[-1][0]
    image = np.repeat(np.arange(len(images), dtype=np.int64), counts)
    bounds = segments.starts[take].astype(np.int64) - segments.spans[images, 0][image] + placed[image]
    labels = segments.regions[take].astype(np.int64) + image * (len(segments.names) + 1)
    # Where a merged copy carries a gap after a span, a run of "no region" must start there, or the
    # span's last run would sum the gap too.
    spanned = np.flatnonzero(end > first)
    span_ends = placed[spanned] + (end - first)[spanned]
    gap = span_ends[:-1] < placed[spanned[1:]]
    gap_bounds = span_ends[:-1][gap]
    gap_labels = spanned[:-1][gap] * (len(segments.names) + 1) + len(segments.names)
    order = np.argsort(np.concatenate([bounds, gap_bounds]), kind="stable")
    return (np.concatenate([bounds, gap_bounds])[order], np.concatenate([labels, gap_labels])[order],
            [tuple(c) for c in copies], used)


def _run_positions(offsets: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Indices of the runs of ``images`` (in that order) in the concatenated run arrays."""
    counts = offsets[images + 1] - offsets[images]
    firsts = np.repeat(offsets[images] - (np.cumsum(counts) - counts), counts)
    return firsts + np.arange(int(counts.sum()), dtype=np.int64)


def _apply(entry: dict, done: dict[str, set[int]], predictions: dict[str, dict]) -> None:
    name, rows = entry.get("file"), entry.get("rows")
    if not isinstance(name, str) or not isinstance(rows, list):
        return
    if "predicted" in entry:
        known = predictions.setdefault(name, {})
        for row, p, t, q in zip(rows, entry["predicted"], entry["target"], entry["probability"]):
            known[int(row)] = (int(p), int(t), float(q))
    else:
        done.setdefault(name, set()).update(int(r) for r in rows)


def _journal_entries(path: Path) -> tuple[list[dict], int]:
    """Parsed complete lines, and the byte length of the complete part (a torn last line is not)."""
    if not path.is_file():
        return [], 0
    data = path.read_bytes()
    intact = data.rfind(b"\n") + 1
    entries = []
    for line in data[:intact].splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # only disk damage produces this; the rows it named count as missing
        if isinstance(entry, dict):
            entries.append(entry)
    return entries, intact


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _npy_shape(path: Path) -> tuple[tuple[int, ...], np.dtype] | None:
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    return array.shape, array.dtype


def _segments_bytes(segments: RegionSegments) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, names=np.array(segments.names), starts=segments.starts, regions=segments.regions,
             offsets=segments.offsets, spans=segments.spans, areas=segments.areas)
    return buffer.getvalue()


def _read_segments(path: Path, spec: RegionSpec | None) -> RegionSegments | None:
    """The memo, or None when it is unreadable (then it is recomputed) or belongs to another spec."""
    try:
        with np.load(path) as data:
            segments = RegionSegments(tuple(str(n) for n in data["names"]), data["starts"], data["regions"],
                                      data["offsets"], data["spans"], data["areas"])
    except (OSError, ValueError, KeyError, EOFError):
        return None
    if spec is not None and segments.names != tuple(rule.name for rule in spec.regions):
        return None
    return segments


@functools.lru_cache(maxsize=256)
def _key(*parts) -> str:
    """Content key of a store file (memoised: the image lists of a paper-sized dataset take ms to hash)."""
    return content_hash(*parts)[:20]


@functools.lru_cache(maxsize=64)
def _spec_json(spec: RegionSpec) -> str:
    """A spec's canonical JSON, memoised: building it takes milliseconds, hashing the frozen spec microseconds."""
    return spec.to_json()


@functools.lru_cache(maxsize=1)
def _regions_salt() -> str:
    """Source of core/regions.py: a change to how masks are drawn invalidates the memoised masks."""
    return source_salt(regions_module)
