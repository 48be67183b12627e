"""A dataset × fold models × saliency methods -> the score table (one row per image × model × method × region).

For each classifier, the images of the chosen split in *its* fold: ``val`` is the model's own
held-out cross-validation part (the paper's RQ1: over the folds every image appears once), ``test``
the HPO-annotated test set every fold model scores (RQ2), ``all`` every image. Faces are aligned from
the landmarks in partitions.csv (detected when there are none); label maps come from the dataset's
stored segmaps, else the face parser, else the landmark template; then ``core.explain``'s own steps
(``prepare_face``, ``attribution_sums``, ``relevance_from_sums``, ``region_scores``) run batched.

With a ``cache`` every attribution is looked up per image before a batch runs, so a killed run
resumes where it stopped and a rerun computes nothing. With a ``store`` the normalised maps and the
label maps are kept (``core.relevance_store``), so another region spec re-scores without any model.
"""
from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from cache import MISSING, DiskCache, content_hash, memo_key, source_salt
from core import attribute as attribute_module
from core import score as score_module
from core.attribute import METHODS
from core.dataset import Dataset, DatasetError, image_file, names_in, read_photo, segmap_file
from core.errors import ImageError, NoFaceError, UserFacingError
from core.explain import PreparedFace, attribution_sums, prepare_face
from core.regions import PAPER_REGIONS, RegionSpec
from core.relevance_store import (SCORE_SCHEMA, SKIPPED, Progress, RelevanceStore, StoreContents, StoredModel,
                                  StoreError, score_block)
from core.score import RELEVANCE_MODES, region_scores, relevance_from_sums
from models import checkpoint as checkpoint_module
from models import resnet as resnet_module
from models.checkpoint import Classifier, classify, load_classifier, preprocess
from models.parser import FaceParser

SPLITS = ("val", "test", "all")
TARGETS = ("predicted", "label")


def results_dir(dataset_root: str | Path) -> Path:
    return Path(dataset_root) / "results"


def score_table_path(dataset_root: str | Path, split: str) -> Path:
    return results_dir(dataset_root) / f"scores-{split}.parquet"


def relevance_store_dir(dataset_root: str | Path, split: str) -> Path:
    """One store per split (``results/relevance/<split>``): a store mirrors one score table."""
    return results_dir(dataset_root) / "relevance" / split


def default_model_cards(dataset_root: str | Path) -> list[Path]:
    """The dataset's fold classifiers, ``models/classifier-fold-*.json``, in fold order."""
    return sorted((Path(dataset_root) / "models").glob("classifier-fold-*.json"))


def load_classifiers(card_paths: Sequence[str | Path]) -> dict[str, Classifier]:
    """Classifiers by model name: the card's file stem, as the score table's ``model`` column says."""
    classifiers = {}
    for path in card_paths:
        name = Path(path).stem
        if name in classifiers:
            raise UserFacingError(f"two model cards are named {name!r}; the score table tells models apart by "
                                  "their card's file name, so rename one")
        classifiers[name] = load_classifier(path)
    return classifiers


def split_images(dataset: Dataset, classifier: Classifier, split: str) -> list[str]:
    """The images a fold model explains: those of ``split`` in its card's fold (every image for ``all``)."""
    if split not in SPLITS:
        raise UserFacingError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    if split == "all":
        return dataset.table["image_name"].to_list()
    fold = classifier.card.fold
    if fold is None:
        raise UserFacingError(f"the model card of classes {', '.join(classifier.card.classes)} names no fold, so its "
                              f"{split} images are unknown; add \"fold\" to the card or use --split all")
    return names_in(dataset, fold, split)


def extract_scores(
    dataset: Dataset,
    classifiers: Mapping[str, Classifier],
    methods: Sequence[str],
    split: str = "val",
    spec: RegionSpec = PAPER_REGIONS,
    mode: str = "abs",
    parser: FaceParser | None = None,
    cache: DiskCache | None = None,
    store: RelevanceStore | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
    target: str = "predicted",
) -> pl.DataFrame:
    """The score table (``core.relevance_store.SCORE_SCHEMA``) of ``classifiers`` (model name -> classifier).

    ``target`` is ``"predicted"`` (the paper) or ``"label"`` (the image's true class). Photos that cannot
    be used (unreadable, no face, landmarks or label map that do not fit) are left out with one warning
    naming them, so a few bad files do not sink a dataset; when none can be used the first problem is
    raised. ``progress(done, total, what)`` counts images × methods. The store, when given, is filled
    as the work goes and locked meanwhile.
    """
    _check_arguments(classifiers, methods, mode, target, batch_size)
    plan = {name: split_images(dataset, classifier, split) for name, classifier in classifiers.items()}
    if not any(plan.values()):
        raise UserFacingError(f"no {split} images in the fold(s) of the models "
                              f"({', '.join(sorted({str(c.card.fold) for c in classifiers.values()}))})")
    labels = dict(zip(dataset.table["image_name"], dataset.table["label"]))
    if target == "label":
        for name, classifier in classifiers.items():
            unknown = sorted({labels[n] for n in plan[name]} - set(classifier.card.classes))
            if unknown:
                raise UserFacingError(f"{name} cannot explain the true label of every image: it has no class "
                                      f"{', '.join(unknown)} (it knows {', '.join(classifier.card.classes)})")
    try:
        if store is not None:
            store.begin(_store_contents(dataset, classifiers, plan, methods, mode, target, parser))
        return _extract(dataset, classifiers, plan, labels, methods, spec, mode, parser, cache, store, batch_size,
                        progress, target)
    finally:
        if store is not None:
            store.close()


def _extract(dataset, classifiers, plan, labels, methods, spec, mode, parser, cache, store, batch_size, progress,
             target) -> pl.DataFrame:
    store_rows = _store_image_rows(plan)
    total = sum(len(names) for names in plan.values()) * len(methods)
    done = 0
    blocks: dict[tuple[str, str], list[pl.DataFrame]] = {}
    skipped: dict[str, str] = {}
    for name, classifier in classifiers.items():
        names = plan[name]
        for start in range(0, len(names), batch_size):
            batch = names[start:start + batch_size]
            rows = list(range(start, start + len(batch)))
            faces = {}
            for image_name in batch:
                try:
                    faces[image_name] = _prepared(dataset, image_name, classifier.card.input_size, spec, parser,
                                                  cache)
                except (DatasetError, ImageError, NoFaceError) as error:
                    skipped[image_name] = str(error)
            usable = [i for i, n in enumerate(batch) if n in faces]
            aligned = np.stack([faces[batch[i]].aligned for i in usable]) if usable else None
            probabilities = _probabilities(classifier, aligned, cache) if usable else np.empty((0, 0))
            predicted = probabilities.argmax(axis=1) if usable else np.empty(0, dtype=int)
            targets = (predicted if target == "predicted"
                       else np.array([classifier.card.classes.index(labels[batch[i]]) for i in usable], dtype=int))
            if store is not None:
                _store_faces(store, name, batch, rows, usable, faces, predicted, targets, probabilities,
                             store_rows)
            table_rows = pl.DataFrame({
                "image_name": [batch[i] for i in usable],
                "label": [labels[batch[i]] for i in usable],
                "predicted": [classifier.card.classes[p] for p in predicted],
                "target": [classifier.card.classes[t] for t in targets],
                "target_probability": probabilities[np.arange(len(usable)), targets].astype(np.float64)
                if usable else np.empty(0),
            }, schema={c: SCORE_SCHEMA[c] for c in ("image_name", "label", "predicted", "target",
                                                    "target_probability")})
            for method in methods:
                if usable:
                    abs_sum, signed_sum = attribution_sums(classifier, aligned, targets, method, cache=cache)
                    maps = relevance_from_sums(abs_sum, signed_sum, mode)
                    masks = np.stack([faces[batch[i]].masks for i in usable])
                    region_names = faces[batch[usable[0]]].region_names
                    scores = region_scores(maps, masks, region_names)
                    blocks.setdefault((name, method), []).append(
                        score_block(name, classifier.card.fold, method, table_rows, region_names, scores))
                    if store is not None:
                        store.write_maps(name, method, [rows[i] for i in usable], maps)
                done += len(batch)
                if progress is not None:
                    progress(done, total, f"{name} · {method}")
    if skipped and not blocks:
        raise DatasetError(f"no photo could be used: {next(iter(skipped.values()))}")
    if skipped:
        shown = "; ".join(f"{n} ({reason})" for n, reason in list(skipped.items())[:5])
        warnings.warn(f"{len(skipped)} photo(s) left out of the score table: {shown}"
                      + (" …" if len(skipped) > 5 else ""), stacklevel=3)
    ordered = [frame for name in classifiers for method in methods for frame in blocks.get((name, method), [])]
    return pl.concat(ordered) if ordered else pl.DataFrame(schema=SCORE_SCHEMA)


def write_score_table(table: pl.DataFrame, path: str | Path) -> Path:
    """Write Parquet under a temporary name, then rename: a kill never leaves a broken table."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        table.write_parquet(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _check_arguments(classifiers, methods, mode, target, batch_size) -> None:
    if not classifiers:
        raise UserFacingError("no classifier to explain: give at least one model card")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserFacingError(f"unknown or no method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if mode not in RELEVANCE_MODES:
        raise UserFacingError(f"mode must be one of {', '.join(RELEVANCE_MODES)}, not {mode!r}")
    if target not in TARGETS:
        raise UserFacingError(f"target must be one of {', '.join(TARGETS)}, not {target!r}")
    if batch_size < 1:
        raise UserFacingError(f"batch size must be at least 1, got {batch_size}")


def _prepared(dataset: Dataset, image_name: str, size: int, spec: RegionSpec, parser: FaceParser | None,
              cache: DiskCache | None) -> PreparedFace:
    """Aligned, parsed and cut into regions. A stored label map wins over the parser (it is the dataset's
    own), the parser over the landmark template."""
    photo = read_photo(dataset, image_name)
    return prepare_face(photo.image, size, spec, photo.landmarks, None if photo.label_map is not None else parser,
                        photo.label_map, cache=cache)


def _probabilities(classifier: Classifier, aligned: np.ndarray, cache: DiskCache | None) -> np.ndarray:
    """N×K class probabilities, looked up per face and computed for the missing ones as one batch."""
    if cache is None:
        return classify(classifier, preprocess(aligned, classifier.card))[0]
    salt = _probability_salt()
    keys = [memo_key("extract-probabilities", salt, classifier, face) for face in aligned]
    found = [cache.lookup(k) for k in keys]
    todo = [i for i, value in enumerate(found) if value is MISSING]
    if todo:
        computed = classify(classifier, preprocess(aligned[todo], classifier.card))[0]
        for j, i in enumerate(todo):
            found[i] = computed[j]
            cache.store(keys[i], computed[j])
    return np.stack(found)


@functools.lru_cache(maxsize=1)
def _probability_salt() -> str:
    return source_salt(checkpoint_module, resnet_module)


def _store_image_rows(plan: Mapping[str, list[str]]) -> dict[str, int]:
    """Each image's row in the store's image list: first appearance over the models, in plan order."""
    rows: dict[str, int] = {}
    for names in plan.values():
        for n in names:
            rows.setdefault(n, len(rows))
    return rows


def _store_contents(dataset: Dataset, classifiers: Mapping[str, Classifier], plan: Mapping[str, list[str]],
                    methods: Sequence[str], mode: str, target: str, parser: FaceParser | None) -> StoreContents:
    sizes = {c.card.input_size for c in classifiers.values()}
    if len(sizes) > 1:
        raise StoreError(f"the models take faces of different sizes ({', '.join(map(str, sorted(sizes)))} px) but a "
                         "relevance store holds one size; extract them separately, each with its own --store")
    size = sizes.pop()
    rows = _store_image_rows(plan)
    images = list(rows)
    labels = dict(zip(dataset.table["image_name"], dataset.table["label"]))
    partitions = (dataset.root / "metadata" / "partitions.csv").read_bytes()
    files = [_file_identity(image_file(dataset, n)) for n in images]
    faces_key = content_hash("faces", size, partitions, images, files)
    segmaps = [_file_identity(segmap_file(dataset, n)) for n in images]
    label_maps_key = content_hash("label-maps", faces_key, parser, segmaps)
    models = tuple(StoredModel(name, c.card.fold, tuple(c.card.classes), c.fingerprint,
                               tuple(rows[n] for n in plan[name])) for name, c in classifiers.items())
    return StoreContents(size=size, mode=mode, target=target, image_names=tuple(images),
                         labels=tuple(labels[n] for n in images), faces_key=faces_key, label_maps_key=label_maps_key,
                         code_version=source_salt(attribute_module, score_module, checkpoint_module, resnet_module),
                         models=models, methods=tuple(methods))


def _file_identity(path: Path | None) -> list | None:
    """Name, size and modification time: enough to notice a replaced file without reading it."""
    if path is None:
        return None
    stat = path.stat()
    return [path.name, stat.st_size, stat.st_mtime_ns]


def _store_faces(store, model, batch, rows, usable, faces, predicted, targets, probabilities, store_rows) -> None:
    store.write_label_maps([store_rows[batch[i]] for i in usable],
                           np.stack([faces[batch[i]].label_map for i in usable]) if usable else np.empty(0))
    position = {i: j for j, i in enumerate(usable)}
    store.write_predictions(
        model, rows,
        [int(predicted[position[i]]) if i in position else SKIPPED for i in range(len(batch))],
        [int(targets[position[i]]) if i in position else SKIPPED for i in range(len(batch))],
        [float(probabilities[position[i], targets[position[i]]]) if i in position else float("nan")
         for i in range(len(batch))],
    )
