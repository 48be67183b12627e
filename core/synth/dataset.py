"""Write a synthetic dataset in the NIH-Faces layout of DESIGN.md, with its ground truth.

Under ``root``::

    images/<label>Slide<k>.jpg                    the photos (JPEG, quality drawn per photo)
    features/segmaps/<label>Slide<k>.png          LaPa label maps, lossless uint8
    metadata/partitions.csv                       image_name, label, fold-1..fold-5, x1, y1, ..., x5, y5
    metadata/hpo-annotations/<label>.csv          image_name, rater, the paper's 50 term names (0/1)
    metadata/ground_truth.csv                     image_name, person_id, label, hpo_id, term, region, severity

``ground_truth.csv`` is long: one row per image and planted term; an image without a term
(every Unaffected image) has one row whose term columns are empty, so every image appears.

Each person has ``photos_per_person`` photos (same face and phenotypes, new nuisance). A
fixed share of the persons of every class is the test set of all five folds (the paper's
HPO-annotated test set); the other persons are split in five groups, group k being the
validation set of fold k. A person never straddles two splits of a fold.

Randomness: ``SeedSequence(seed, spawn_key=(stream, index))`` gives every person, photo
and annotation its own generator, so images can be rendered in any order and any process
and the same seed gives byte-identical files.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from core.layout import DatasetLayout
from core.paper_terms import paper_terms
from core.synth.classes import DEFAULT_CLASSES, SyndromeClass, sample_phenotypes
from core.synth.faces import render_face
from core.synth.params import FaceParams, sample_face_shape, sample_photo
from core.synth.phenotypes import drawable_phenotypes

FOLDS = 5
_SHAPE, _TERMS, _PHOTO, _RATERS, _SPLIT = range(5)  # independent random streams


@dataclass(frozen=True)
class RaterModel:
    """Simulated clinicians: each misses a present term (more often when it is mild) and rarely adds one."""

    raters: int = 3
    miss_at_full_severity: float = 0.05
    miss_at_zero_severity: float = 0.6
    false_positive: float = 0.002

    def mark_probability(self, severity: np.ndarray) -> np.ndarray:
        """P(a rater marks the term) given its severity, 0 meaning absent."""
        miss = self.miss_at_full_severity + (self.miss_at_zero_severity - self.miss_at_full_severity) * (1 - severity)
        return np.where(severity > 0, 1 - miss, self.false_positive)


@dataclass(frozen=True)
class SyntheticImage:
    name: str
    label: str
    person_id: str
    index: int  # global image index: the key of its photo and annotation streams
    params: FaceParams


@dataclass(frozen=True)
class Summary:
    root: Path
    images: int
    persons: int
    images_per_class: tuple[tuple[str, int], ...]
    annotated_images: int
    seconds: float
    workers: int

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, index)))


def plan_images(
    n_per_class: int,
    seed: int,
    size: int = 224,
    classes: tuple[SyndromeClass, ...] = DEFAULT_CLASSES,
    photos_per_person: int = 3,
    severity_range: tuple[float, float] = (0.4, 1.0),
) -> list[SyntheticImage]:
    """Every image's name, person and render parameters; nothing is drawn yet."""
    images: list[SyntheticImage] = []
    person = 0
    for syndrome in classes:
        for first in range(0, n_per_class, photos_per_person):
            shape = sample_face_shape(_rng(seed, _SHAPE, person))
            terms = sample_phenotypes(syndrome, _rng(seed, _TERMS, person), severity_range)
            for k in range(first, min(first + photos_per_person, n_per_class)):
                index = len(images)
                photo = sample_photo(_rng(seed, _PHOTO, index))
                name = f"{syndrome.label}Slide{k + 1}.jpg"
                images.append(
                    SyntheticImage(name, syndrome.label, f"P{person:05d}", index, FaceParams(shape, photo, terms, size))
                )
            person += 1
    return images


def assign_folds(images: list[SyntheticImage], seed: int, test_fraction: float) -> dict[str, tuple[str, ...]]:
    """image name -> split (train|val|test) in each of the five folds, person by person."""
    persons_by_label: dict[str, list[str]] = {}
    for image in images:
        persons = persons_by_label.setdefault(image.label, [])
        if image.person_id not in persons:
            persons.append(image.person_id)
    split_of_person: dict[str, tuple[str, ...]] = {}
    for class_index, persons in enumerate(persons_by_label.values()):
        order = _rng(seed, _SPLIT, class_index).permutation(len(persons))
        n_test = round(test_fraction * len(persons))
        for position, person_index in enumerate(order):
            person = persons[person_index]
            if position < n_test:
                split_of_person[person] = ("test",) * FOLDS
            else:
                group = (position - n_test) % FOLDS
                split_of_person[person] = tuple("val" if fold == group else "train" for fold in range(FOLDS))
    return {image.name: split_of_person[image.person_id] for image in images}


def simulate_annotations(image: SyntheticImage, seed: int, raters: RaterModel) -> np.ndarray:
    """raters x 50 matrix of 0/1 marks over the paper's terms, in its table order."""
    severity = {term.hpo_id: term.severity for term in image.params.phenotypes}
    present = np.array([severity.get(term.hpo_id, 0.0) for term in paper_terms()])
    draws = _rng(seed, _RATERS, image.index).random((raters.raters, len(present)))
    return (draws < raters.mark_probability(present)).astype(np.uint8)


def _render_and_write(job: tuple[str, str, FaceParams]) -> np.ndarray:
    root, name, params = job
    image, label_map, landmarks = render_face(params)
    layout = DatasetLayout(Path(root))
    Image.fromarray(image).save(layout.images / name, format="JPEG", quality=params.photo.jpeg_quality)
    Image.fromarray(label_map).save(layout.segmaps / Path(name).with_suffix(".png").name)
    return landmarks


@dataclass(frozen=True)
class SyntheticSpec:
    """What a synthetic dataset holds: its classes, persons, photos, folds, severities and raters."""

    n_per_class: int
    seed: int
    size: int = 224
    classes: tuple[SyndromeClass, ...] = DEFAULT_CLASSES
    photos_per_person: int = 3
    test_fraction: float = 0.2
    severity_range: tuple[float, float] = (0.4, 1.0)
    raters: RaterModel = RaterModel()
    annotated_per_class: int | None = None


def generate_dataset(root: Path, spec: SyntheticSpec, workers: int = 2) -> Summary:
    """Render and write the dataset; ``annotated_per_class=None`` annotates every syndromic test image."""
    root = Path(root)
    layout = DatasetLayout(root)
    if layout.images.exists() and any(layout.images.iterdir()):
        raise FileExistsError(f"{layout.images} is not empty: choose a new folder or delete the old dataset first")
    for folder in (layout.images, layout.segmaps, layout.annotations):
        folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    images = plan_images(
        spec.n_per_class, spec.seed, spec.size, spec.classes, spec.photos_per_person, spec.severity_range
    )
    jobs = [(str(root), image.name, image.params) for image in images]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            landmarks = list(pool.map(_render_and_write, jobs, chunksize=max(1, math.ceil(len(jobs) / (8 * workers)))))
    else:
        landmarks = [_render_and_write(job) for job in jobs]
    folds = assign_folds(images, spec.seed, spec.test_fraction)
    _write_partitions(root, images, folds, landmarks)
    _write_ground_truth(root, images)
    annotated = _write_annotations(root, images, folds, spec)
    seconds = time.perf_counter() - started
    counts = tuple(
        (syndrome.label, sum(image.label == syndrome.label for image in images)) for syndrome in spec.classes
    )
    persons = len({image.person_id for image in images})
    return Summary(root, len(images), persons, counts, annotated, seconds, workers)


def _write_partitions(
    root: Path, images: list[SyntheticImage], folds: dict[str, tuple[str, ...]], landmarks: list[np.ndarray]
) -> None:
    columns: dict[str, list] = {"image_name": [i.name for i in images], "label": [i.label for i in images]}
    for fold in range(FOLDS):
        columns[f"fold-{fold + 1}"] = [folds[i.name][fold] for i in images]
    points = np.round(np.stack(landmarks), 2)
    for point in range(5):
        columns[f"x{point + 1}"] = points[:, point, 0].tolist()
        columns[f"y{point + 1}"] = points[:, point, 1].tolist()
    pl.DataFrame(columns).write_csv(DatasetLayout(root).partitions, float_precision=2)


def _write_ground_truth(root: Path, images: list[SyntheticImage]) -> None:
    phenotypes = drawable_phenotypes()
    rows: list[dict[str, object]] = []
    for image in images:
        base = {"image_name": image.name, "person_id": image.person_id, "label": image.label}
        if not image.params.phenotypes:
            rows.append(base | {"hpo_id": None, "term": None, "region": None, "severity": None})
        for planted in image.params.phenotypes:
            term = phenotypes[planted.hpo_id].term
            rows.append(
                base | {"hpo_id": term.hpo_id, "term": term.name, "region": term.region, "severity": planted.severity}
            )
    schema = dict.fromkeys(("image_name", "person_id", "label", "hpo_id", "term", "region"), pl.String)
    table = pl.DataFrame(rows, schema=schema | {"severity": pl.Float64})
    table.write_csv(DatasetLayout(root).ground_truth, float_precision=3)


def _write_annotations(
    root: Path, images: list[SyntheticImage], folds: dict[str, tuple[str, ...]], spec: SyntheticSpec
) -> int:
    names = [term.name for term in paper_terms()]
    annotated = 0
    for syndrome in spec.classes:
        if not syndrome.terms:
            continue
        chosen = [i for i in images if i.label == syndrome.label and folds[i.name][0] == "test"]
        chosen = chosen[: spec.annotated_per_class] if spec.annotated_per_class is not None else chosen
        rows = []
        for image in chosen:
            for rater, marks in enumerate(simulate_annotations(image, spec.seed, spec.raters), start=1):
                rows.append([image.name, rater, *marks.tolist()])
        schema = {"image_name": pl.String, "rater": pl.Int64} | dict.fromkeys(names, pl.Int64)
        pl.DataFrame(rows, schema=schema, orient="row").write_csv(
            DatasetLayout(root).annotations / f"{syndrome.label}.csv"
        )
        annotated += len(chosen)
    return annotated
