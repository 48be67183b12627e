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
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from safetensors.torch import save_file
from tqdm import tqdm

from cache import DiskCache
from core.dataset import names_in, open_dataset
from core.extract import extract_scores, load_classifiers, relevance_store_dir, score_table_path, write_score_table
from core.leaderboard import leaderboard
from core.paths import demo_dataset
from core.relevance_store import RelevanceStore
from core.synth import generate_dataset
from core.train import FoldResult, TrainConfig, aligned_faces, table2, train_fold
from core.train_parser import ParserConfig, train_face_parser
from models.parser import load_face_parser


@dataclass(frozen=True)
class DemoPreset:
    """The fast preset: sized so a fresh 2-core machine builds it in a few minutes."""

    n_per_class: int = 200
    photos_per_person: int = 1
    severity_range: tuple[float, float] = (0.6, 1.0)
    seed: int = 0
    parser_n_per_class: int = 86
    parser: ParserConfig = ParserConfig(input_size=112, epochs=8, precision="auto")
    folds: tuple[str, ...] = ("fold-1", "fold-2")
    # Scored on the held-out faces by every fold model, so the dashboard's pages open at once.
    cheap_methods: tuple[str, ...] = ("Gradient", "GuidedBackprop", "LRP-EpsilonPlusFlat", "LayerGradCam")
    classifier: TrainConfig = field(default_factory=lambda: TrainConfig(
        architecture="resnet18", input_size=112, epochs=10, batch_size=32, learning_rate=0.002,
        head_lr_factor=1.0, weight_decay=1e-4, optimizer="adamw", schedule="one-cycle", seed=0, precision="auto"))


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Stages:
    """Markers in ``<root>/.demo/``: a stage is done when its marker holds the current settings hash."""

    def __init__(self, root: Path):
        self.folder = root / ".demo"

    def done(self, stage: str, digest: str) -> bool:
        marker = self.folder / stage
        return marker.is_file() and marker.read_text() == digest

    def digest_of(self, stage: str) -> str | None:
        marker = self.folder / stage
        return marker.read_text() if marker.is_file() else None

    def mark(self, stage: str, digest: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / stage).write_text(digest)


def build_demo(root: Path | None = None, preset: DemoPreset = DemoPreset(), log=print,
               cache: DiskCache | None = None) -> dict:
    """Build (or confirm) the demo under ``root``; returns what was done and how long it took.

    With a ``cache``, the cheap methods' attributions of the held-out faces are stored in it."""
    root = Path(root or demo_dataset())
    stages = _Stages(root)
    report: dict = {"root": str(root), "stages": {}}
    started = time.perf_counter()

    data_digest = _hash("data", preset.n_per_class, preset.photos_per_person, preset.severity_range, preset.seed)
    if not stages.done("dataset", data_digest):
        log(f"generating the synthetic dataset in {root} …")
        for folder in ("images", "metadata", "features", "models", ".demo"):
            shutil.rmtree(root / folder, ignore_errors=True)
        summary = generate_dataset(root, n_per_class=preset.n_per_class, seed=preset.seed,
                                   photos_per_person=preset.photos_per_person, severity_range=preset.severity_range)
        log(f"  {summary.images} images in {summary.seconds:.0f} s ({summary.images_per_second:.0f} images/s)")
        report["stages"]["dataset"] = {"images": summary.images, "seconds": summary.seconds,
                                       "images_per_second": summary.images_per_second}
        stages.mark("dataset", data_digest)

    parser_root = root / "external" / "parser-faces"
    parser_digest = _hash("parser", data_digest, preset.parser_n_per_class, dataclasses.asdict(preset.parser))
    models = root / "models"
    if not stages.done("parser", parser_digest):
        shutil.rmtree(parser_root, ignore_errors=True)
        log("generating the parser's own synthetic faces (no person shared with the demo) …")
        generate_dataset(parser_root, n_per_class=preset.parser_n_per_class, seed=preset.seed + 1_000,
                         photos_per_person=1, severity_range=preset.severity_range)
        log("training the face parser …")
        result = train_face_parser(open_dataset(parser_root), preset.parser, models, log=lambda line: log("  " + line))
        result.iou.write_csv(models / "parser-iou.csv")
        parser = load_face_parser(result.card_path)
        encoder = {k.removeprefix("encoder."): v.contiguous() for k, v in parser.network.state_dict().items()
                   if k.startswith("encoder.")}
        save_file(encoder, str(models / "parser-encoder.safetensors"))
        log(f"  mean IoU {result.mean_iou:.3f} on held-out faces ({result.seconds:.0f} s)")
        report["stages"]["parser"] = {"mean_iou": result.mean_iou, "seconds": result.seconds}
        stages.mark("parser", parser_digest)

    dataset = open_dataset(root)
    config = dataclasses.replace(preset.classifier, init=str(models / "parser-encoder.safetensors"))
    names = dataset.table["image_name"].to_list()
    faces = None
    results = []
    for fold in preset.folds:
        digest = _hash("classifier", parser_digest, fold, dataclasses.asdict(config))
        if stages.done(f"classifier-{fold}", digest):
            continue
        if faces is None:
            log(f"aligning {len(names)} faces at {config.input_size} px …")
            faces = aligned_faces(dataset, names, config.input_size)
            position = {n: i for i, n in enumerate(names)}
        log(f"training the {fold} classifier …")
        result = train_fold(dataset, fold, config, models, lambda subset: faces[[position[n] for n in subset]],
                            log=lambda line: log("  " + line))
        log(f"  {fold}: val accuracy {result.val_accuracy:.3f}, test accuracy {result.test_accuracy:.3f} "
            f"({result.seconds:.0f} s)")
        _store_result(result, models)
        report["stages"][f"classifier-{fold}"] = {"val_accuracy": result.val_accuracy,
                                                  "test_accuracy": result.test_accuracy, "seconds": result.seconds}
        results.append(result)
        stages.mark(f"classifier-{fold}", digest)
    if results:
        table = table2([_stored_result(models, fold) for fold in preset.folds])
        table.write_csv(models / "table2.csv")
        log(str(table))
    if cache is not None and preset.cheap_methods:
        _analyse(dataset, preset, models, cache, stages, log, report)
    report["seconds"] = time.perf_counter() - started
    if not report["stages"]:
        log(f"the demo in {root} is up to date")
    return report


def _analyse(dataset, preset: DemoPreset, models: Path, cache: DiskCache, stages: _Stages, log,
             report: dict) -> None:
    """What the dashboard opens on: the cheap methods' score tables and relevance stores for RQ1 (each
    fold model's val faces) and RQ2 (the annotated test faces), and their ground-truth leaderboard."""
    cards = [models / f"classifier-{fold}.json" for fold in preset.folds]
    classifiers = load_classifiers(cards)
    digest = _hash("analysis", [stages.digest_of(f"classifier-{fold}") for fold in preset.folds],
                   preset.cheap_methods)
    for split in ("val", "test"):
        if stages.done(f"scores-{split}", digest):
            continue
        log(f"scoring the {split} faces with {', '.join(preset.cheap_methods)} …")
        started = time.perf_counter()
        with tqdm(total=0, unit="map", desc=f"  {split}", file=sys.stderr, leave=False) as bar:
            def progress(done: int, total: int, what: str) -> None:
                bar.total = total
                bar.update(done - bar.n)

            table = extract_scores(dataset, classifiers, preset.cheap_methods, split=split, cache=cache,
                                   store=RelevanceStore(relevance_store_dir(dataset.root, split)), progress=progress)
        write_score_table(table, score_table_path(dataset.root, split))
        report["stages"][f"scores-{split}"] = {"images": table["image_name"].n_unique(),
                                               "seconds": time.perf_counter() - started}
        stages.mark(f"scores-{split}", digest)
    if not stages.done("leaderboard", digest):
        log("ranking the cheap methods against the planted phenotypes …")
        started = time.perf_counter()
        first = classifiers[cards[0].stem]
        leaderboard(dataset, first, names_in(dataset, preset.folds[0], "test"), preset.cheap_methods,
                    cache=cache).write_csv(models / "leaderboard.csv")
        report["stages"]["leaderboard"] = {"seconds": time.perf_counter() - started}
        stages.mark("leaderboard", digest)


def _store_result(result: FoldResult, models: Path) -> None:
    result.report.write_csv(models / f"report-{result.fold}.csv")
    (models / f"result-{result.fold}.json").write_text(json.dumps({
        "fold": result.fold, "card": result.card_path.name, "best_epoch": result.best_epoch,
        "val_accuracy": result.val_accuracy, "test_accuracy": result.test_accuracy, "seconds": result.seconds}))


def _stored_result(models: Path, fold: str) -> FoldResult:
    saved = json.loads((models / f"result-{fold}.json").read_text())
    return FoldResult(fold=fold, card_path=models / saved["card"], best_epoch=saved["best_epoch"],
                      val_accuracy=saved["val_accuracy"], test_accuracy=saved["test_accuracy"],
                      report=pl.read_csv(models / f"report-{fold}.csv"), seconds=saved["seconds"])
