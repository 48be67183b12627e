"""``python -m core demo``: the embedded demo, built from nothing and idempotently.

Stages: the synthetic dataset; a separate synthetic set for the face parser (like LaPa for
FaRL, it shares no person with the demo data); the parser; one classifier per demo fold,
initialised from the parser's encoder (our stand-in for the paper's face-recognition
pretraining: from scratch, a CPU-sized budget does not learn the phenotypes, see
docs/DECISIONS.md). Each finished stage leaves a marker holding the hash of its settings, so a
second call does nothing and a changed preset redoes only what it changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from safetensors.torch import save_file
from tqdm import tqdm

from cache import DiskCache
from core.attribute import QUICK_METHODS
from core.dataset import Dataset, names_in, open_dataset
from core.domain import DEFAULT_PERCENTILE, DomainGuardError
from core.extract import ExtractionPlan, extract_scores, load_classifiers
from core.fit_domain import fit_domain
from core.layout import DatasetLayout, demo_dataset
from core.leaderboard import leaderboard
from core.pipeline import ExplainSettings
from core.relevance_store import RelevanceStore
from core.score_table import write_score_table
from core.synth import SyntheticSpec, generate_dataset
from core.train import FoldResult, TrainConfig, aligned_faces, table2, train_fold
from core.train_parser import ParserConfig, train_face_parser
from models.checkpoint import load_classifier
from models.parser import load_face_parser


@dataclass(frozen=True)
class DemoPreset:
    """The fast preset: sized so a fresh 2-core machine builds it in a few minutes."""

    n_per_class: int = 200
    photos_per_person: int = 1
    severity_range: tuple[float, float] = (0.6, 1.0)
    seed: int = 0
    parser_n_per_class: int = 86
    parser: ParserConfig = field(default_factory=lambda: ParserConfig(input_size=112, epochs=8, precision="auto"))
    folds: tuple[str, ...] = ("fold-1", "fold-2")
    # Scored on the held-out faces by every fold model, so the dashboard's pages open at once.
    cheap_methods: tuple[str, ...] = QUICK_METHODS
    classifier: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            architecture="resnet18",
            input_size=112,
            epochs=10,
            batch_size=32,
            learning_rate=0.002,
            head_lr_factor=1.0,
            weight_decay=1e-4,
            optimizer="adamw",
            schedule="one-cycle",
            seed=0,
            precision="auto",
        )
    )


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Stages:
    """Markers in ``<root>/.demo/``: a stage is done when its marker holds the current settings hash."""

    def __init__(self, root: Path):
        self.folder = DatasetLayout(root).build_markers

    def done(self, stage: str, digest: str) -> bool:
        marker = self.folder / stage
        return marker.is_file() and marker.read_text() == digest

    def digest_of(self, stage: str) -> str | None:
        marker = self.folder / stage
        return marker.read_text() if marker.is_file() else None

    def mark(self, stage: str, digest: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / stage).write_text(digest)


def build_demo(
    root: Path | None = None,
    preset: DemoPreset = DemoPreset(),
    log=print,
    cache: DiskCache | None = None,
    device: str = "cpu",
) -> dict:
    """Build (or confirm) the demo under ``root``; returns what was done and how long it took.

    With a ``cache``, the cheap methods' attributions of the held-out faces are stored in it. The networks
    train and run on ``device`` (a resolved name); the stages' markers do not depend on it."""
    build = _Build(DatasetLayout(Path(root or demo_dataset())), preset, log, device)
    started = time.perf_counter()
    parser_digest = build.parser(build.dataset())
    dataset = open_dataset(build.layout.root)
    build.classifiers(dataset, parser_digest)
    build.domain_guards(dataset)
    if cache is not None and preset.cheap_methods:
        _analyse(dataset, preset, cache, build.stages, log, build.report, device)
    build.report["seconds"] = time.perf_counter() - started
    if not build.report["stages"]:
        log(f"the demo in {build.layout.root} is up to date")
    return build.report


@dataclass
class _Build:
    """One demo build: its stages run in order, each skipped when its marker holds the current settings."""

    layout: DatasetLayout
    preset: DemoPreset
    log: Callable[[str], object]
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.stages = _Stages(self.layout.root)
        self.report: dict = {"root": str(self.layout.root), "stages": {}}

    def dataset(self) -> str:
        preset, layout = self.preset, self.layout
        digest = _hash("data", preset.n_per_class, preset.photos_per_person, preset.severity_range, preset.seed)
        if not self.stages.done("dataset", digest):
            self.log(f"generating the synthetic dataset in {layout.root} …")
            for folder in (layout.images, layout.metadata, layout.segmaps.parent, layout.models, layout.build_markers):
                shutil.rmtree(folder, ignore_errors=True)
            summary = generate_dataset(
                layout.root,
                SyntheticSpec(
                    n_per_class=preset.n_per_class,
                    seed=preset.seed,
                    photos_per_person=preset.photos_per_person,
                    severity_range=preset.severity_range,
                ),
            )
            self.log(f"  {summary.images} images in {summary.seconds:.0f} s ({summary.images_per_second:.0f} images/s)")
            self.report["stages"]["dataset"] = {
                "images": summary.images,
                "seconds": summary.seconds,
                "images_per_second": summary.images_per_second,
            }
            self.stages.mark("dataset", digest)
        return digest

    def parser(self, data_digest: str) -> str:
        preset, layout = self.preset, self.layout
        digest = _hash("parser", data_digest, preset.parser_n_per_class, dataclasses.asdict(preset.parser))
        if self.stages.done("parser", digest):
            return digest
        shutil.rmtree(layout.parser_training_faces, ignore_errors=True)
        self.log("generating the parser's own synthetic faces (no person shared with the demo) …")
        generate_dataset(
            layout.parser_training_faces,
            SyntheticSpec(
                n_per_class=preset.parser_n_per_class,
                seed=preset.seed + 1_000,
                photos_per_person=1,
                severity_range=preset.severity_range,
            ),
        )
        self.log("training the face parser …")
        result = train_face_parser(
            open_dataset(layout.parser_training_faces),
            preset.parser,
            layout.models,
            log=lambda line: self.log("  " + line),
            device=self.device,
        )
        result.iou.write_csv(layout.parser_iou)
        parser = load_face_parser(result.card_path)
        encoder = {
            k.removeprefix("encoder."): v.contiguous()
            for k, v in parser.network.state_dict().items()
            if k.startswith("encoder.")
        }
        save_file(encoder, str(layout.parser_encoder))
        self.log(f"  mean IoU {result.mean_iou:.3f} on held-out faces ({result.seconds:.0f} s)")
        self.report["stages"]["parser"] = {"mean_iou": result.mean_iou, "seconds": result.seconds}
        self.stages.mark("parser", digest)
        return digest

    def domain_guards(self, dataset: Dataset) -> None:
        """Each fold classifier's out-of-domain guard (``core.fit_domain``), redone when its classifier is."""
        for fold in self.preset.folds:
            card = self.layout.classifier_card(fold)
            digest = _hash("domain", self.stages.digest_of(f"classifier-{fold}"), DEFAULT_PERCENTILE)
            if self.stages.done(f"domain-{fold}", digest) and _has_its_guard(card):
                continue
            self.log(f"fitting the {fold} classifier's out-of-domain guard …")
            fitted = fit_domain(card, dataset, fold, device=self.device)
            self.log(f"  threshold {fitted.guard.threshold:.1f}; flagged: {fitted.summary()['flagged']}")
            self.report["stages"][f"domain-{fold}"] = fitted.summary()
            self.stages.mark(f"domain-{fold}", digest)

    def classifiers(self, dataset: Dataset, parser_digest: str) -> None:
        config = dataclasses.replace(self.preset.classifier, init=str(self.layout.parser_encoder))
        names = dataset.table["image_name"].to_list()
        faces = None
        trained = False
        for fold in self.preset.folds:
            digest = _hash("classifier", parser_digest, fold, dataclasses.asdict(config))
            if self.stages.done(f"classifier-{fold}", digest):
                continue
            if faces is None:
                self.log(f"aligning {len(names)} faces at {config.input_size} px …")
                faces = aligned_faces(dataset, names, config.input_size)
                position = {n: i for i, n in enumerate(names)}
            self.log(f"training the {fold} classifier …")
            result = train_fold(
                dataset,
                fold,
                config,
                self.layout.models,
                lambda subset: faces[[position[n] for n in subset]],  # noqa: B023 (used in this iteration only)
                log=lambda line: self.log("  " + line),
                device=self.device,
            )
            self.log(
                f"  {fold}: val accuracy {result.val_accuracy:.3f}, test accuracy {result.test_accuracy:.3f} "
                f"({result.seconds:.0f} s)"
            )
            _store_result(result, self.layout)
            self.report["stages"][f"classifier-{fold}"] = {
                "val_accuracy": result.val_accuracy,
                "test_accuracy": result.test_accuracy,
                "seconds": result.seconds,
            }
            trained = True
            self.stages.mark(f"classifier-{fold}", digest)
        if trained:
            table = table2([_stored_result(self.layout, fold) for fold in self.preset.folds])
            table.write_csv(self.layout.table2)
            self.log(str(table))


def _has_its_guard(card: Path) -> bool:
    """Whether the card's classifier has a guard fitted for its present weights (a retrained model's
    old guard is refused on loading)."""
    try:
        return load_classifier(card).domain is not None
    except DomainGuardError:
        return False


def _analyse(
    dataset, preset: DemoPreset, cache: DiskCache, stages: _Stages, log, report: dict, device: str = "cpu"
) -> None:
    """What the dashboard opens on: the cheap methods' score tables and relevance stores for RQ1 (each
    fold model's val faces) and RQ2 (the annotated test faces), and their ground-truth leaderboard."""
    cards = [dataset.layout.classifier_card(fold) for fold in preset.folds]
    settings = ExplainSettings(methods=preset.cheap_methods, detector_device=device)
    classifiers = load_classifiers(cards, device)
    digest = _hash(
        "analysis",
        [stages.digest_of(f"classifier-{fold}") for fold in preset.folds],
        preset.cheap_methods,
        *[stages.digest_of(f"domain-{fold}") for fold in preset.folds],  # the score tables hold the guards' scores
    )
    for split in ("val", "test"):
        if stages.done(f"scores-{split}", digest):
            continue
        log(f"scoring the {split} faces with {', '.join(preset.cheap_methods)} …")
        started = time.perf_counter()
        with tqdm(total=0, unit="map", desc=f"  {split}", file=sys.stderr, leave=False) as bar:

            def progress(done: int, total: int, what: str) -> None:
                bar.total = total
                bar.update(done - bar.n)

            table = extract_scores(
                ExtractionPlan(dataset, classifiers, split),
                settings,
                cache=cache,
                store=RelevanceStore(dataset.layout.plain_relevance_store(split)),
                progress=progress,
            )
        write_score_table(table, dataset.layout.plain_score_table(split))
        report["stages"][f"scores-{split}"] = {
            "images": table["image_name"].n_unique(),
            "seconds": time.perf_counter() - started,
        }
        stages.mark(f"scores-{split}", digest)
    if not stages.done("leaderboard", digest):
        log("ranking the cheap methods against the planted phenotypes …")
        started = time.perf_counter()
        first = classifiers[cards[0].stem]
        leaderboard(dataset, first, names_in(dataset, preset.folds[0], "test"), settings, cache=cache).write_csv(
            dataset.layout.leaderboard
        )
        report["stages"]["leaderboard"] = {"seconds": time.perf_counter() - started}
        stages.mark("leaderboard", digest)


def _store_result(result: FoldResult, layout: DatasetLayout) -> None:
    result.report.write_csv(layout.fold_report(result.fold))
    layout.fold_result(result.fold).write_text(
        json.dumps(
            {
                "fold": result.fold,
                "card": result.card_path.name,
                "best_epoch": result.best_epoch,
                "val_accuracy": result.val_accuracy,
                "test_accuracy": result.test_accuracy,
                "seconds": result.seconds,
            }
        )
    )


def _stored_result(layout: DatasetLayout, fold: str) -> FoldResult:
    saved = json.loads(layout.fold_result(fold).read_text())
    return FoldResult(
        fold=fold,
        card_path=layout.models / saved["card"],
        best_epoch=saved["best_epoch"],
        val_accuracy=saved["val_accuracy"],
        test_accuracy=saved["test_accuracy"],
        report=pl.read_csv(layout.fold_report(fold)),
        seconds=saved["seconds"],
    )
