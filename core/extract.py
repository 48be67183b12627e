"""A dataset × fold models × saliency methods -> the score table (one row per image × model × method × region).

For each classifier, the images of the chosen split in *its* fold: ``val`` is the model's own
held-out cross-validation part (the paper's RQ1: over the folds every image appears once), ``test``
the HPO-annotated test set every fold model scores (RQ2), ``all`` every image. Faces come through
the pipeline's ``prepare_dataset_faces`` (stored label maps win over the parser), and are scored
by its one loop, ``score_faces``, a batch at a time.

With a ``cache`` every attribution is looked up per image before a batch runs, so a killed run
resumes where it stopped and a rerun computes nothing. With a ``store`` the normalised maps and the
label maps are kept (``core.relevance_store``), so another region spec re-scores without any model.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from cache import DiskCache, content_hash, source_salt
from core import attribute as attribute_module
from core import score as score_module
from core.attribute import METHODS
from core.dataset import Dataset, DatasetError, image_file, names_in, segmap_file
from core.errors import UserFacingError
from core.pipeline import (
    ExplainSettings,
    class_probabilities,
    device_tag,
    domain_scores,
    prepare_dataset_faces,
    score_faces,
    stacked,
    target_indices,
)
from core.relevance_store import SKIPPED, RelevanceStore, StoreContents, StoredModel, StoreError, stored_device
from core.rescore import Progress
from core.score_table import DOMAIN_COLUMNS, SCORE_SCHEMA, score_block
from models import checkpoint as checkpoint_module
from models import resnet as resnet_module
from models.checkpoint import Classifier, load_classifier

SPLITS = ("val", "test", "all")


def load_classifiers(card_paths: Sequence[str | Path], device: str = "cpu") -> dict[str, Classifier]:
    """Classifiers by model name: the card's file stem, as the score table's ``model`` column says; each on
    ``device`` (``core.devices.resolve_device``'s names)."""
    classifiers = {}
    for path in card_paths:
        name = Path(path).stem
        if name in classifiers:
            raise UserFacingError(
                f"two model cards are named {name!r}; the score table tells models apart by "
                "their card's file name, so rename one"
            )
        classifiers[name] = load_classifier(path, device=device)
    return classifiers


def split_images(dataset: Dataset, classifier: Classifier, split: str) -> list[str]:
    """The images a fold model explains: those of ``split`` in its card's fold (every image for ``all``)."""
    if split not in SPLITS:
        raise UserFacingError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    if split == "all":
        return dataset.table["image_name"].to_list()
    fold = classifier.card.fold
    if fold is None:
        raise UserFacingError(
            f"the model card of classes {', '.join(classifier.card.classes)} names no fold, so its "
            f'{split} images are unknown; add "fold" to the card or use --split all'
        )
    return names_in(dataset, fold, split)


@dataclass(frozen=True)
class ExtractionPlan:
    """Which images each model scores: ``split`` of each classifier's fold (model name -> classifier)."""

    dataset: Dataset
    classifiers: Mapping[str, Classifier]
    split: str = "val"

    @functools.cached_property
    def _images(self) -> dict[str, list[str]]:
        if not self.classifiers:
            raise UserFacingError("no classifier to explain: give at least one model card")
        plan = {name: split_images(self.dataset, c, self.split) for name, c in self.classifiers.items()}
        if not any(plan.values()):
            folds = ", ".join(sorted({str(c.card.fold) for c in self.classifiers.values()}))
            raise UserFacingError(f"no {self.split} images in the fold(s) of the models ({folds})")
        return plan

    def images(self) -> dict[str, list[str]]:
        """Model name -> the names of the images it scores, in partitions.csv order."""
        return self._images

    def labels(self) -> dict[str, str]:
        return self.dataset.labels

    def store_rows(self) -> dict[str, int]:
        """Each image's row in the store's image list: first appearance over the models, in plan order."""
        rows: dict[str, int] = {}
        for names in self.images().values():
            for n in names:
                rows.setdefault(n, len(rows))
        return rows


def extract_scores(
    plan: ExtractionPlan,
    settings: ExplainSettings,
    cache: DiskCache | None = None,
    store: RelevanceStore | None = None,
    progress: Progress | None = None,
) -> pl.DataFrame:
    """The score table (``core.score_table.SCORE_SCHEMA``) of the plan's models under ``settings``.

    Photos that cannot be used (unreadable, no face, landmarks or label map that do not fit) are left
    out with one warning naming them, so a few bad files do not sink a dataset; when none can be used
    the first problem is raised. ``progress(done, total, what)`` counts images × methods. The store,
    when given, is filled as the work goes and locked meanwhile.
    """
    check_request(plan, settings)
    run = ExtractionRun(plan, settings, store, progress)
    try:
        run.begin()
        for work in run.batches:
            run.record(score_batch(plan.dataset, plan.classifiers[work.model], work, settings, cache))
    finally:
        run.close()
    return run.table()


def check_request(plan: ExtractionPlan, settings: ExplainSettings) -> None:
    """Refuse, before any work, what no batch could do: no method, or a label target a model lacks."""
    if not settings.methods:
        raise UserFacingError(f"no method chosen; choose from {', '.join(METHODS)}")
    images = plan.images()
    if settings.target == "label":  # refuse before any work: a model without some image's class
        labels = plan.labels()
        for name, classifier in plan.classifiers.items():
            target_indices("label", classifier.card.classes, np.empty((0, 0)), [labels[n] for n in images[name]])


@dataclass(frozen=True)
class BatchWork:
    """One unit of work: rows ``start``… of model ``model``'s image list (its names, in order)."""

    model: str
    start: int
    names: tuple[str, ...]


def plan_batches(plan: ExtractionPlan, settings: ExplainSettings) -> list[BatchWork]:
    """The plan cut into batches of ``settings.batch_size`` images per model, in plan order."""
    images = plan.images()
    return [
        BatchWork(name, start, tuple(images[name][start : start + settings.batch_size]))
        for name in plan.classifiers
        for start in range(0, len(images[name]), settings.batch_size)
    ]


@dataclass
class BatchResult:
    """What one batch computed, before anything is written: the engines hand it to ``ExtractionRun.record``.

    ``skipped`` maps an unusable photo to its message; ``outputs`` a usable one to its predicted and
    target class and the target's probability; ``label_maps`` and each method's ``maps`` are rows of
    the usable photos, in ``work.names`` order.
    """

    work: BatchWork
    skipped: dict[str, str]
    usable: list[str]
    outputs: dict[str, tuple[int, int, float]]
    domain: np.ndarray | None
    flags: np.ndarray | None
    label_maps: np.ndarray | None
    blocks: dict[str, pl.DataFrame]
    maps: dict[str, np.ndarray]


def score_batch(
    dataset: Dataset,
    classifier: Classifier,
    work: BatchWork,
    settings: ExplainSettings,
    cache: DiskCache | None = None,
) -> BatchResult:
    """Prepare, classify and score one batch of one model's images; writes nothing but cache entries."""
    size = classifier.card.input_size
    batch = list(work.names)
    faces, skipped = prepare_dataset_faces(dataset, batch, size, settings, cache)
    usable = [n for n in batch if n in faces]
    result = BatchResult(work, {n: str(e) for n, e in skipped.items()}, usable, {}, None, None, None, {}, {})
    if not usable:
        return result
    labels = dataset.labels
    aligned, masks = stacked([faces[n] for n in usable])
    probabilities = class_probabilities(classifier, aligned, cache)
    classes = classifier.card.classes
    targets = target_indices(settings.target, classes, probabilities, [labels[n] for n in usable])
    predicted = probabilities.argmax(axis=1)
    target_probability = probabilities[np.arange(len(usable)), targets].astype(np.float64)
    domain = domain_scores(classifier, aligned, cache)
    flags = None if domain is None or classifier.domain is None else classifier.domain.flags(domain)
    per_image = pl.DataFrame(
        {
            "image_name": usable,
            "label": [labels[n] for n in usable],
            "predicted": [classes[p] for p in predicted],
            "target": [classes[t] for t in targets],
            "target_probability": target_probability,
            "domain_score": domain,
            "out_of_domain": flags,
        },
        schema={
            c: SCORE_SCHEMA[c]
            for c in ("image_name", "label", "predicted", "target", "target_probability", *DOMAIN_COLUMNS)
        },
    )
    result.domain, result.flags = domain, flags
    result.label_maps = np.stack([faces[n].label_map for n in usable])
    for scored in score_faces(classifier, aligned, masks, targets, settings, cache):
        result.blocks[scored.method] = score_block(
            work.model, classifier.card.fold, scored.method, per_image, masks.names, scored.scores
        )
        result.maps[scored.method] = scored.maps
    result.outputs = {
        n: (int(p), int(t), float(q)) for n, p, t, q in zip(usable, predicted, targets, target_probability, strict=True)
    }
    return result


class ExtractionRun:
    """The writing side of one extraction, shared by the engines: it opens the store, writes each
    ``BatchResult`` into it (in whatever order batches finish), counts progress and assembles the table."""

    def __init__(
        self,
        plan: ExtractionPlan,
        settings: ExplainSettings,
        store: RelevanceStore | None = None,
        progress: Progress | None = None,
    ):
        self.plan, self.settings, self.store, self.progress = plan, settings, store, progress
        self.batches = plan_batches(plan, settings)
        self.total = sum(len(w.names) for w in self.batches) * len(settings.methods)
        self.done = 0
        self.store_rows = plan.store_rows() if store is not None else {}
        self.blocks: dict[tuple[str, str], list[tuple[int, pl.DataFrame]]] = {}
        self.skipped: dict[str, str] = {}

    def begin(self) -> None:
        if self.store is not None:
            self.store.begin(_store_contents(self.plan, self.settings))

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def record(self, result: BatchResult) -> None:
        """Write one batch's results into the store (domain scores, label maps, maps, then predictions:
        a row whose predictions are journaled has everything else too) and keep its score blocks."""
        work, usable = result.work, result.usable
        self.skipped.update(result.skipped)
        rows = {name: work.start + i for i, name in enumerate(work.names)}
        if self.store is not None and usable:
            if result.domain is not None and result.flags is not None:
                self.store.write_domain(
                    work.model, [rows[n] for n in usable], result.domain.tolist(), result.flags.tolist()
                )
            assert result.label_maps is not None
            self.store.write_label_maps([self.store_rows[n] for n in usable], result.label_maps)
        for method in self.settings.methods:
            if method in result.blocks:
                self.blocks.setdefault((work.model, method), []).append((work.start, result.blocks[method]))
                if self.store is not None:
                    self.store.write_maps(work.model, method, [rows[n] for n in usable], result.maps[method])
        if self.store is not None:
            self.store.write_predictions(
                work.model,
                list(rows.values()),
                *zip(
                    *(result.outputs.get(n, (SKIPPED, SKIPPED, float("nan"))) for n in work.names),
                    strict=True,
                ),
            )
        for method in self.settings.methods:
            self.done += len(work.names)
            if self.progress is not None:
                self.progress(self.done, self.total, f"{work.model} · {method}")

    def table(self) -> pl.DataFrame:
        if self.skipped and not self.blocks:
            raise DatasetError(f"no photo could be used: {next(iter(self.skipped.values()))}")
        if self.skipped:
            shown = "; ".join(f"{n} ({error})" for n, error in list(self.skipped.items())[:5])
            warnings.warn(
                f"{len(self.skipped)} photo(s) left out of the score table: {shown}"
                + (" …" if len(self.skipped) > 5 else ""),
                stacklevel=3,
            )
        ordered = [
            frame
            for name in self.plan.classifiers
            for method in self.settings.methods
            for _, frame in sorted(self.blocks.get((name, method), []), key=lambda block: block[0])
        ]
        return pl.concat(ordered) if ordered else pl.DataFrame(schema=SCORE_SCHEMA)


def _store_contents(plan: ExtractionPlan, settings: ExplainSettings) -> StoreContents:
    sizes = {c.card.input_size for c in plan.classifiers.values()}
    if len(sizes) > 1:
        raise StoreError(
            f"the models take faces of different sizes ({', '.join(map(str, sorted(sizes)))} px) but a "
            "relevance store holds one size; extract them separately, each with its own --store"
        )
    size = sizes.pop()
    rows = plan.store_rows()
    images = list(rows)
    labels = plan.labels()
    dataset = plan.dataset
    partitions = dataset.layout.partitions.read_bytes()
    files = [_file_identity(image_file(dataset, n)) for n in images]
    faces_key = content_hash("faces", size, partitions, images, files)
    segmaps = [_file_identity(segmap_file(dataset, n)) for n in images]
    label_maps_key = content_hash("label-maps", faces_key, settings.parser, segmaps)
    plan_images = plan.images()
    models = tuple(
        StoredModel(
            name,
            c.card.fold,
            tuple(c.card.classes),
            c.fingerprint,
            tuple(rows[n] for n in plan_images[name]),
            None if c.domain is None else c.domain.key,
            stored_device(device_tag(c.network)),
        )
        for name, c in plan.classifiers.items()
    )
    return StoreContents(
        size=size,
        mode=settings.mode,
        target=str(settings.target),
        image_names=tuple(images),
        labels=tuple(labels[n] for n in images),
        faces_key=faces_key,
        label_maps_key=label_maps_key,
        code_version=source_salt(attribute_module, score_module, checkpoint_module, resnet_module),
        models=models,
        methods=settings.methods,
        method_params={m: settings.method_params(m) for m in settings.methods},
    )


def _file_identity(path: Path | None) -> list | None:
    """Name, size and modification time: enough to notice a replaced file without reading it."""
    if path is None:
        return None
    stat = path.stat()
    return [path.name, stat.st_size, stat.st_mtime_ns]
