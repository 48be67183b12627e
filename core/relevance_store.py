"""Relevance maps kept on disk, so that a new region spec re-scores a whole dataset without any model.

A store holds what ``python -m core extract`` computed for one split of a dataset: the normalised
relevance map of every image × fold model × method (float16), the aligned label map of every image
(uint8) and, per model and image, the predicted class, the explained class and its probability.
``core.rescore`` turns those into the score table for any region spec. Layout::

    manifest.json            what the store holds: map size, relevance mode, target rule, images (names,
                             labels), models (name, fold, classes, fingerprint, which images), methods
    label-maps-<key>.npy     N_images×S×S uint8, memory-mapped
    maps-<key>.npy           one per model × method: N_rows×S×S float16 (float32 for mode abs-raw), memory-mapped
    journal.jsonl            one line per finished batch: which rows of which file are written; for the
                             predictions of a model the classes and probabilities themselves, and for
                             a model with an out-of-domain guard each image's domain score and flag
    region-masks/<label maps>/<key>.npz   memo: a region spec's masks over those label maps, run-length encoded
                             (``core.score.RegionSegments``; ``core.rescore`` names and fills them); one per
                             spec ever scored, so ``prune_region_masks`` deletes those unused for a while
    .lock                    held (flock) while an extraction writes, so two writers never interleave

Kill safety: data files are created under a temporary name and renamed into place; rows are written
into the memory map and flushed, and only then journaled; a torn last journal line is ignored (and cut
before the next append). A killed writer therefore leaves a store whose journal may undercount, never
one that claims rows it lacks: the store is *detectably incomplete* (``missing()`` says what is
missing) and re-scoring refuses it until an extraction finishes it.

File names carry a content key of everything that decides their content (image list and files, model
fingerprint, target rule, method and its parameters, relevance mode, the attribution code's version), so a rerun keeps
the finished rows of unchanged files, and files nothing refers to any more are deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import io
import json
import os
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np
import polars as pl

from cache import content_hash
from core.errors import UserFacingError
from core.score import RegionSegments, stored_map_dtype

FORMAT = 1
SKIPPED = -1  # the predicted class stored for a photo that could not be used (unreadable, no face)
CPU_FLOAT32 = "cpu/float32"  # ``core.devices.precision_tag`` of the CPU in float32: what a store assumes unsaid
_MANIFEST, _JOURNAL, _LOCK, _MASKS = "manifest.json", "journal.jsonl", ".lock", "region-masks"
_DAY = 24 * 3600.0


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
    domain: str | None = None  # content key of the model's out-of-domain guard (core.domain); None: no guard
    # Where its predictions and maps were computed and at what precision (``core.devices.precision_tag``:
    # ``cuda/tf32`` …); None for the CPU in float32, as in stores written before devices (``stored_device``).
    # A GPU's SmoothGrad noise and rounding differ from the CPU's, so it is part of the files' keys.
    device: str | None = None


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
    # Each method's full parameters (``ExplainSettings.method_params``): maps of other parameters (another
    # fidelity profile, core.profiles) are other files. Empty in stores written before it was recorded.
    method_params: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def label_maps_file(self) -> str:
        return f"label-maps-{_key('label-maps', self.size, self.label_maps_key, self.image_names)}.npy"

    def predictions_file(self, model: StoredModel) -> str:
        names = tuple(self.image_names[i] for i in model.images)
        on = () if model.device is None else (model.device,)  # the CPU's keys are those from before devices
        key = _key(
            "predictions", self.size, self.faces_key, model.fingerprint, names, self.target, self.code_version, *on
        )
        return f"predictions-{key}"

    def maps_file(self, model: StoredModel, method: str) -> str:
        params = json.dumps(self.method_params.get(method, {}), sort_keys=True)
        return f"maps-{_key('maps', self.predictions_file(model), method, self.mode, params)}.npy"

    def domain_file(self, model: StoredModel) -> str | None:
        """The journal's name for the model's per-image domain scores; None when it has no guard."""
        if model.domain is None:
            return None
        return f"domain-{_key('domain', self.predictions_file(model), model.domain)}"

    def computed_elsewhere(self, tag: str) -> tuple[StoredModel, ...]:
        """The models whose maps were computed on another device or precision than ``tag``
        (``core.devices.precision_tag``, e.g. ``cpu/float32``): to a reader there, other settings."""
        return tuple(m for m in self.models if (m.device or CPU_FLOAT32) != tag)

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
        models = tuple(
            StoredModel(**{**m, "classes": tuple(m["classes"]), "images": tuple(m["images"])})
            for m in data.pop("models")
        )
        return cls(
            **{
                **data,
                "models": models,
                "image_names": tuple(data["image_names"]),
                "labels": tuple(data["labels"]),
                "methods": tuple(data["methods"]),
                "method_params": data.get("method_params", {}),
            }
        )


class RelevanceStore:
    """A store folder (see the module docstring). Reading needs nothing; writing happens between
    ``begin(contents)`` and ``close()`` (or as a context manager) under an exclusive lock."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._contents: StoreContents | None = None
        self._done: dict[str, set[int]] = {}
        self._predictions: dict[str, dict[int, tuple[int, int, float]]] = {}
        self._domains: dict[str, dict[int, tuple[float, bool]]] = {}  # per-image domain score and flag
        self._writable: dict[str, np.memmap] = {}
        self._journal: BinaryIO | None = None
        self._lock: TextIO | None = None
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
            raise StoreError(
                f"the relevance store in {self.root} is incomplete (missing: {shown}); an extraction "
                "was interrupted or is still running: run `python -m core extract` again to finish it"
            )

    def label_maps(self) -> np.ndarray:
        """N_images×S×S uint8 (memory-mapped); rows never written are zero."""
        return self._mapped(self.contents.label_maps_file())

    def label_maps_written(self) -> np.ndarray:
        """Indices of the images whose label map is written, ascending; the other rows are zero."""
        return np.array(sorted(self._done.get(self.contents.label_maps_file(), set())), dtype=np.int64)

    def maps(self, model: str, method: str) -> np.ndarray:
        """N_rows×S×S float16 (abs-raw: float32) relevance maps of one model and method (memory-mapped)."""
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
        target, target_probability (class names; photos that could not be used are left out), and the
        out-of-domain guard's domain_score and out_of_domain (null for models without a guard)."""
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
            domain_file = contents.domain_file(model)
            domain = {} if domain_file is None else self._domains.get(domain_file, {})
            frames.append(
                pl.DataFrame(
                    {
                        "model": [model.name] * len(rows),
                        "fold": pl.Series([model.fold] * len(rows), dtype=pl.String),
                        "row": pl.Series(rows, dtype=pl.Int64),
                        "image": pl.Series(images, dtype=pl.Int64),
                        "image_name": pl.Series([contents.image_names[i] for i in images], dtype=pl.String),
                        "label": pl.Series([contents.labels[i] for i in images], dtype=pl.String),
                        "predicted": pl.Series([model.classes[predictions[r][0]] for r in rows], dtype=pl.String),
                        "target": pl.Series([model.classes[predictions[r][1]] for r in rows], dtype=pl.String),
                        "target_probability": pl.Series([predictions[r][2] for r in rows], dtype=pl.Float64),
                        "domain_score": pl.Series([domain.get(r, (None,))[0] for r in rows], dtype=pl.Float64),
                        "out_of_domain": pl.Series([domain.get(r, (None, None))[1] for r in rows], dtype=pl.Boolean),
                    }
                )
            )
        return pl.concat(frames) if frames else pl.DataFrame()

    def read_region_segments(self, key: str) -> RegionSegments | None:
        """The memoised segments ``key`` over the held label maps; None when absent or unreadable
        (then the caller computes them again)."""
        path = self._segments_path(key)
        if not path.is_file():
            return None
        try:
            if time.time() - path.stat().st_mtime > _DAY:  # a use, for prune_region_masks (at most daily)
                with contextlib.suppress(OSError):
                    os.utime(path)
            with np.load(path) as data:
                return RegionSegments(
                    tuple(str(n) for n in data["names"]),
                    data["starts"],
                    data["regions"],
                    data["offsets"],
                    data["spans"],
                    data["areas"],
                )
        except (OSError, ValueError, KeyError, EOFError):
            return None

    def write_region_segments(self, key: str, segments: RegionSegments) -> None:
        """Memoise ``segments`` under ``key``; ``begin`` drops them with the label maps they were made of.
        Needs no lock: the file appears whole, and two writers of one key write the same content."""
        buffer = io.BytesIO()
        np.savez(
            buffer,
            names=np.array(segments.names),
            starts=segments.starts,
            regions=segments.regions,
            offsets=segments.offsets,
            spans=segments.spans,
            areas=segments.areas,
        )
        _write_atomically(self._segments_path(key), buffer.getvalue())

    def _segments_path(self, key: str) -> Path:
        return self.root / _MASKS / Path(self.contents.label_maps_file()).stem / f"{key}.npz"

    # ---------------------------------------------------------------- writing

    def begin(self, contents: StoreContents) -> None:
        """Lock the store and make it hold ``contents``: keep the finished rows of files whose key is
        unchanged, create the missing files, drop everything else, except that methods extracted
        before stay while they are complete and still valid (same models, images, mode and target):
        extracting another method adds it."""
        self._acquire_lock()
        self._reload()
        if self._contents is not None:
            old = self._contents
            same_models = {model.name for model in contents.models} == {model.name for model in old.models}
            # An old method is judged with its own parameters: the new contents know only the new methods'.
            merged = dataclasses.replace(contents, method_params={**old.method_params, **contents.method_params})
            kept = tuple(
                m
                for m in old.methods
                if m not in contents.methods
                and same_models
                and all(merged.maps_file(model, m) == old.maps_file(model, m) for model in contents.models)
                and not self.missing([m])
            )
            methods = contents.methods + kept
            contents = dataclasses.replace(
                contents,
                methods=methods,
                method_params={m: merged.method_params[m] for m in methods if m in merged.method_params},
            )
        shapes: dict[str, tuple[tuple[int, ...], type[np.generic]]] = {
            contents.label_maps_file(): ((len(contents.image_names), contents.size, contents.size), np.uint8)
        }
        for model in contents.models:
            for method in contents.methods:
                shapes[contents.maps_file(model, method)] = (
                    (len(model.images), contents.size, contents.size),
                    stored_map_dtype(contents.mode),
                )
        for name, (shape, dtype) in shapes.items():
            path = self.root / name
            if not path.is_file() or _npy_shape(path) != (shape, np.dtype(dtype)):
                temporary = path.with_name(path.name + ".tmp")
                np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=shape).flush()
                os.replace(temporary, path)
        keep = set(shapes) | {contents.predictions_file(m) for m in contents.models}
        keep |= {name for name in map(contents.domain_file, contents.models) if name is not None}
        entries, _ = _journal_entries(self.root / _JOURNAL)
        # Rewritten without a torn last line (which the next append would otherwise extend).
        journal = b"".join(json.dumps(e).encode() + b"\n" for e in entries if e.get("file") in keep)
        _write_atomically(self.root / _JOURNAL, journal)
        _write_atomically(self.root / _MANIFEST, contents.to_json().encode())
        for path in self.root.iterdir():
            if path.is_file() and path.name not in keep | {_MANIFEST, _JOURNAL, _LOCK}:
                path.unlink()
        if (self.root / _MASKS).is_dir():  # memoised masks of label maps no longer held
            for path in (self.root / _MASKS).iterdir():
                if path.name != Path(contents.label_maps_file()).stem:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        self._reload()
        self._journal = open(self.root / _JOURNAL, "ab")  # noqa: SIM115 (appended to until close())

    def write_label_maps(self, images: Sequence[int], label_maps: np.ndarray) -> None:
        self._write(self.contents.label_maps_file(), images, label_maps)

    def write_maps(self, model: str, method: str, rows: Sequence[int], maps: np.ndarray) -> None:
        """Relevance maps (rows × S × S, any float dtype) of ``rows`` of one model; finished rows are kept."""
        contents = self.contents
        self._write(contents.maps_file(contents.model(model), method), rows, maps)

    def write_predictions(
        self,
        model: str,
        rows: Sequence[int],
        predicted: Sequence[int],
        target: Sequence[int],
        probability: Sequence[float],
    ) -> None:
        """Class indices (``SKIPPED`` for an unusable photo) and the target's probability, per row."""
        contents = self.contents
        name = contents.predictions_file(contents.model(model))
        columns = {"predicted": (predicted, int), "target": (target, int), "probability": (probability, float)}
        self._journal_rows(name, self._predictions, rows, columns)

    def write_domain(self, model: str, rows: Sequence[int], scores: Sequence[float], flags: Sequence[bool]) -> None:
        """Out-of-domain scores and flags of usable ``rows`` of a model with a guard (journaled like predictions)."""
        contents = self.contents
        name = contents.domain_file(contents.model(model))
        if name is None:
            raise StoreError(f"model {model!r} has no out-of-domain guard in this store's manifest")
        self._journal_rows(name, self._domains, rows, {"domain_score": (scores, float), "out_of_domain": (flags, bool)})

    def _journal_rows(
        self, name: str, written: dict, rows: Sequence[int], columns: dict[str, tuple[Sequence, type]]
    ) -> None:
        """Journal the per-row values of ``rows`` not yet in ``written[name]`` (finished rows are kept)."""
        known = written.setdefault(name, {})
        new = [i for i, row in enumerate(rows) if int(row) not in known]
        if not new:
            return
        entry: dict[str, Any] = {"file": name, "rows": [int(rows[i]) for i in new]}
        entry |= {column: [kind(values[i]) for i in new] for column, (values, kind) in columns.items()}
        self._append(entry)
        _apply(entry, self._done, self._predictions, self._domains)
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
        _apply(entry, self._done, self._predictions, self._domains)

    def _append(self, entry: dict) -> None:
        if self._journal is None:
            raise StoreError("call begin() before writing into a relevance store")
        self._journal.write(json.dumps(entry).encode() + b"\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def _acquire_lock(self) -> None:
        if self._lock is not None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.root / _LOCK, "a")  # noqa: SIM115 (held, with its flock, until close())
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StoreError(
                f"another extraction is writing the relevance store in {self.root}; wait for it to "
                "finish, or give this one another --store folder"
            ) from None
        self._lock = handle

    def _reload(self) -> None:
        manifest = self.root / _MANIFEST
        self._contents = StoreContents.from_json(manifest.read_text()) if manifest.is_file() else None
        self._done, self._predictions, self._domains = {}, {}, {}
        self._rows = None
        self._readable.clear()
        if self._contents is None:
            return
        entries, _ = _journal_entries(self.root / _JOURNAL)
        for entry in entries:
            _apply(entry, self._done, self._predictions, self._domains)


def stored_device(tag: str) -> str | None:
    """What ``StoredModel.device`` records for a model computing at ``tag``: None for ``cpu/float32``."""
    return None if tag == CPU_FLOAT32 else tag


def _apply(entry: dict, done: dict[str, set[int]], predictions: dict[str, dict], domains: dict[str, dict]) -> None:
    name, rows = entry.get("file"), entry.get("rows")
    if not isinstance(name, str) or not isinstance(rows, list):
        return
    if "domain_score" in entry:
        known_domain = domains.setdefault(name, {})
        for row, score, flag in zip(rows, entry["domain_score"], entry["out_of_domain"]):
            known_domain[int(row)] = (float(score), bool(flag))
    elif "predicted" in entry:
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


@functools.lru_cache(maxsize=256)
def _key(*parts) -> str:
    """Content key of a store file (memoised: the image lists of a paper-sized dataset take ms to hash)."""
    return content_hash(*parts)[:20]


def prune_region_masks(results: str | Path, days: int, now: float | None = None) -> int:
    """Delete the memoised region masks of every relevance store under ``results`` not read or written for
    ``days`` (each spec ever scored leaves one per store), and return how many. They are memos: a store
    whose mask file is pruned, even between a reader's check and its read, computes the masks again
    (milliseconds per face), so pruning needs no lock."""
    cutoff = (time.time() if now is None else now) - days * _DAY
    pruned = 0
    for path in Path(results).rglob(f"{_MASKS}/*/*.npz"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                pruned += 1
        except OSError:
            continue
    return pruned
