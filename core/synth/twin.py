"""A synthetic twin of a real release: one rendered photo per row of its ``partitions.csv`` (issue 11).

The twin rehearses the paper's scale without its photos. Every row of the release's
``metadata/partitions.csv`` becomes one synthetic photo with the row's name, label and five
folds, the size of the photo its bounding box implies, and its face placed on the row's five
landmarks:

* **placement**: the person's face without phenotypes is rendered (``render_face``) at a size where
  its eye distance is the row's, then warped onto the row's landmarks by a similarity plus a
  thin-plate-spline residual that is zero on a ring ``RING`` eye distances out (so only the face
  bends, and the person's five landmarks land on the row's exactly). Phenotypes are drawn before
  the warp, so a term that moves a landmark (hypertelorism, a wide mouth, a short nose) moves it
  from the row's position; the twin's ``partitions.csv`` records where the landmarks really are.
* **classes**: every label draws the drawable terms (``core.synth.phenotypes``) that the HPO's
  annotations of its syndrome carry (``core.hpo.ontology_priors``), directly or through the paper
  term they lie below; BWS carries none, so its macroglossia is drawn as a protruding tongue
  (``PROXIES``). The term fewest classes share is very frequent (0.9), the others frequent (0.5).
  Unaffected draws none.
* **annotated rows**: a row the clinicians annotated gets exactly the drawable terms they marked,
  severity by how many of the three marked it (``ANNOTATED_SEVERITY``), so RQ2 has a known truth.
  The release's annotation files are copied into the twin's ``metadata/annotated-hpo-terms/``
  unchanged (a slice of the twin keeps only its rows' lines), and they are read through
  ``core.annotations`` like any dataset's.

Every row has its own person (``related_samples.csv`` is not used); the random streams are keyed
by the row's index in the release, so a slice renders the same faces as the whole twin.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image
from scipy import ndimage
from scipy.spatial.distance import cdist
from skimage.transform import SimilarityTransform

from core.annotations import read_annotations
from core.dataset import FOLDS, label_from_name, open_dataset
from core.errors import UserFacingError
from core.hpo import SYNDROME_OMIM, ontology_priors
from core.layout import ANNOTATION_FOLDERS, DatasetLayout
from core.synth.classes import SyndromeClass, TermFrequency, sample_phenotypes
from core.synth.dataset import Summary, SyntheticImage, _rng, _write_ground_truth
from core.synth.faces import render_face
from core.synth.params import FaceParams, PlantedTerm, sample_face_shape, sample_photo
from core.synth.phenotypes import drawable_phenotypes

PROXIES = {"HP:0000158": "HP:0010808"}  # Macroglossia (BWS) is drawn as a protruding tongue
ANNOTATED_SEVERITY = {1: 0.6, 2: 0.8, 3: 1.0}  # raters who marked a term -> its severity
RING = 2.5  # the warp's residual is zero this many eye distances from the landmarks' centre
GRID = 8  # pixels between the points where the warp is evaluated exactly
MAX_SIDE = 4096  # largest photo side a twin writes (the size core.imageio reads without shrinking)
PROBE = 64  # size of the cheap render that measures a person's own landmarks
_BOX = ("bb_x1", "bb_y1", "bb_x2", "bb_y2")
_POINTS = tuple(f"{axis}{i}" for i in range(1, 6) for axis in ("x", "y"))
_SHAPE, _TERMS, _PHOTO = 0, 1, 2  # the same streams as core.synth.dataset, another seed's space


class TwinError(UserFacingError):
    """The release folder cannot be twinned (missing or malformed partitions.csv)."""


@dataclass(frozen=True)
class TwinSpec:
    """How to twin a release. ``rows`` renders a slice of about that many rows: a quarter of them test
    rows (the annotated ones), the rest every class's share, at least two, half of them fold-1 val."""

    seed: int = 0
    rows: int | None = None
    severity_range: tuple[float, float] = (0.6, 1.0)
    max_render: int = 640  # largest square the face is rendered at before the warp
    margin: float = 0.08  # the photo reaches this share of the box beyond its right and bottom edges


# ---------------------------------------------------------------- classes from the ontology


def drawable_terms_of(syndrome: str) -> tuple[str, ...]:
    """The drawable HPO ids the ontology's annotations of a syndrome carry, in its order (proxies last)."""
    if not SYNDROME_OMIM.get(syndrome):
        return ()
    drawable = drawable_phenotypes()
    found: list[str] = []
    for row in ontology_priors(syndrome).iter_rows(named=True):
        ids = [row["hpo_id"], PROXIES.get(row["hpo_id"], "")]
        ids += [hpo_id for hpo_id in drawable if row["via"].endswith(f"({hpo_id})")]  # below a paper term
        for hpo_id in ids:
            if hpo_id in drawable and hpo_id not in found:
                found.append(hpo_id)
    return tuple(found)


def twin_classes(labels: list[str] | tuple[str, ...]) -> tuple[SyndromeClass, ...]:
    """One class per label; its rarest term across the labels is very frequent, the others frequent."""
    terms = {label: drawable_terms_of(label) for label in labels}
    shared = {hpo_id: sum(hpo_id in ids for ids in terms.values()) for ids in terms.values() for hpo_id in ids}
    classes = []
    for label in labels:
        ids = terms[label]
        if SYNDROME_OMIM.get(label) and not ids:
            raise TwinError(f"{label}: the ontology gives no drawable term; add a proxy to PROXIES")
        leading = min(ids, key=lambda hpo_id: shared[hpo_id]) if ids else None
        frequencies = tuple(TermFrequency(hpo_id, 0.9 if hpo_id == leading else 0.5) for hpo_id in ids)
        classes.append(SyndromeClass(label, frequencies))
    return tuple(classes)


# ---------------------------------------------------------------- the release's rows


def release_rows(release: Path, rows: int | None = None) -> pl.DataFrame:
    """The release's partitions.csv with ``label`` and ``row`` (its index); a slice if ``rows``."""
    path = DatasetLayout(release).partitions
    if not path.is_file():
        raise TwinError(f"{path} is missing: give the release folder that holds metadata/partitions.csv")
    table = pl.read_csv(path, infer_schema_length=10_000)
    needed = ["image_name", *_BOX, *_POINTS, *FOLDS]
    missing = [column for column in needed if column not in table.columns]
    if missing:
        raise TwinError(f"{path}: a twin needs the release's columns; missing {', '.join(missing)}")
    try:
        numbers = table.select([pl.col(c).cast(pl.Float64, strict=True) for c in (*_BOX, *_POINTS)])
    except pl.exceptions.PolarsError:
        raise TwinError(f"{path}: box and landmark columns must be numbers") from None
    if not np.isfinite(numbers.to_numpy()).all() or numbers.to_numpy().max() > MAX_SIDE:
        raise TwinError(f"{path}: box and landmark values must be finite and under {MAX_SIDE} pixels")
    table = table.with_columns(numbers)
    labels = [label_from_name(name) for name in table["image_name"]]
    if None in labels:
        raise TwinError(f"{path}: every image name must start with '<label>Slide'")
    table = table.with_columns(pl.Series("label", labels), pl.int_range(pl.len()).alias("row"))
    if rows is None or rows >= len(table):
        return table
    if rows < 2:
        raise TwinError("a twin slice needs at least 2 rows")
    test = table.filter(pl.col(FOLDS[0]) == "test")
    n_test = min(len(test), math.ceil(rows / 4))
    rest = table.filter(pl.col(FOLDS[0]) != "test")
    picked = [_evenly(test, n_test)]
    for _label, group in rest.group_by("label", maintain_order=True):
        quota = max(2, round((rows - n_test) * len(group) / len(rest)))  # every class, in val and train
        val = group.filter(pl.col(FOLDS[0]) == "val")
        picked += [_evenly(val, math.ceil(quota / 2)), _evenly(group.filter(pl.col(FOLDS[0]) == "train"), quota // 2)]
    return pl.concat(picked).sort("row")


def _evenly(table: pl.DataFrame, n: int) -> pl.DataFrame:
    if n <= 0 or table.is_empty():
        return table.clear()
    return table[np.unique(np.linspace(0, len(table) - 1, n).round().astype(int)).tolist()]


def photo_size(row: dict, margin: float) -> tuple[int, int]:
    """(width, height) of a row's photo: its box's far edges plus a margin, and every landmark inside."""
    width = max(row["bb_x2"], max(row[f"x{i}"] for i in range(1, 6)))
    height = max(row["bb_y2"], max(row[f"y{i}"] for i in range(1, 6)))
    box = max(row["bb_x2"] - row["bb_x1"], row["bb_y2"] - row["bb_y1"])
    return math.ceil(width + margin * box), math.ceil(height + margin * box)


# ---------------------------------------------------------------- the warp


def _tps_fit(points: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Thin-plate spline through ``values`` at ``points`` (n×2 each): (n+3)×2 coefficients."""
    n = len(points)
    kernel = _tps_kernel(cdist(points, points))
    affine = np.column_stack([np.ones(n), points])
    system = np.block([[kernel, affine], [affine.T, np.zeros((3, 3))]])
    return np.linalg.solve(system, np.vstack([values, np.zeros((3, 2))]))


def _tps_kernel(distance: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(distance > 0, distance**2 * np.log(distance), 0.0)


def _tps_eval(coefficients: np.ndarray, points: np.ndarray, where: np.ndarray) -> np.ndarray:
    n = len(points)
    return _tps_kernel(cdist(where, points)) @ coefficients[:n] + coefficients[n] + where @ coefficients[n + 1 :]


@dataclass(frozen=True)
class Warp:
    """Output pixel (x, y) -> rendered pixel: a similarity's inverse plus a local spline residual.

    ``source(target)`` maps the row's landmarks onto the person's own (unphenotyped) landmarks."""

    similarity: SimilarityTransform  # rendered -> output
    anchors: np.ndarray  # output points where the residual is pinned
    coefficients: np.ndarray

    @classmethod
    def fit(cls, person: np.ndarray, target: np.ndarray) -> Warp:
        similarity = SimilarityTransform.from_estimate(person, target)
        if not isinstance(similarity, SimilarityTransform):  # a FailedEstimation
            raise TwinError("cannot place a face on degenerate landmarks")
        eye_distance = float(np.linalg.norm(target[1] - target[0]))
        angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
        ring = target.mean(axis=0) + RING * eye_distance * np.column_stack([np.cos(angles), np.sin(angles)])
        anchors = np.vstack([target, ring])
        residual = np.vstack([person - similarity.inverse(target), np.zeros((len(ring), 2))])
        return cls(similarity, anchors, _tps_fit(anchors, residual))

    def source(self, target: np.ndarray) -> np.ndarray:
        target = np.asarray(target, dtype=float).reshape(-1, 2)
        inverse = np.linalg.inv(self.similarity.params)[:2]
        return target @ inverse[:, :2].T + inverse[:, 2] + _tps_eval(self.coefficients, self.anchors, target)

    def target(self, source: np.ndarray, iterations: int = 30) -> np.ndarray:
        """Where rendered points land in the output: ``source`` inverted by fixed-point steps."""
        source = np.asarray(source, dtype=float).reshape(-1, 2)
        linear = self.similarity.params[:2, :2]
        guess = source @ self.similarity.params[:2, :2].T + self.similarity.params[:2, 2]
        for _ in range(iterations):
            error = self.source(guess) - source
            guess = guess - error @ linear.T
            if np.abs(error).max() < 1e-4:
                break
        return guess

    def apply(self, image: np.ndarray, labels: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """The rendered photo and label map resampled onto the output's width × height."""
        width, height = size
        # The map is smooth: exact on a grid every GRID pixels, bilinear in between (under 0.05 px off).
        y, x = np.mgrid[0 : height + GRID : GRID, 0 : width + GRID : GRID].astype(np.float64)
        coarse = self.source(np.column_stack([x.ravel(), y.ravel()])).reshape(*x.shape, 2)
        fine = np.mgrid[0:height, 0:width].astype(np.float32) / GRID
        coordinates = [ndimage.map_coordinates(coarse[..., k], fine, order=1) for k in (1, 0)]
        channels = [
            ndimage.map_coordinates(image[..., c].astype(np.float32), coordinates, order=1, mode="nearest")
            for c in range(3)
        ]
        warped = np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)
        warped_labels = ndimage.map_coordinates(labels, coordinates, order=0, mode="constant", cval=0)
        return warped, warped_labels.astype(np.uint8)


# ---------------------------------------------------------------- one row


@dataclass(frozen=True)
class TwinFace:
    """One row's person, photo nuisance and planted terms; its pose comes from the row's landmarks."""

    name: str
    params: FaceParams  # its size is unused: each render sets its own (a probe, then one from the eye distance)
    landmarks: np.ndarray  # the row's real landmarks, 5×2
    size: tuple[int, int]  # the output photo's width, height


def render_twin_face(face: TwinFace, max_render: int = 640) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, label map, landmarks) of one twin photo; landmarks where the drawn features are."""
    probe = render_face(replace(face.params, phenotypes=(), size=PROBE)).landmarks
    scale = np.linalg.norm(face.landmarks[1] - face.landmarks[0]) / np.linalg.norm(probe[1] - probe[0])
    render_size = int(np.clip(round(PROBE * scale), PROBE, max_render))
    person = probe * render_size / PROBE  # the render is linear in its size
    rendered = render_face(replace(face.params, size=render_size))
    warp = Warp.fit(person, face.landmarks)
    image, labels = warp.apply(rendered.image, rendered.label_map, face.size)
    return image, labels, warp.target(rendered.landmarks)


def _render_and_write(job: tuple[str, TwinFace, int]) -> np.ndarray:
    root, face, max_render = job
    image, labels, landmarks = render_twin_face(face, max_render)
    layout = DatasetLayout(Path(root))
    Image.fromarray(image).save(layout.images / face.name, compress_level=1)
    Image.fromarray(labels).save(layout.segmaps / Path(face.name).with_suffix(".png").name)
    return landmarks


# ---------------------------------------------------------------- the whole twin


def marked_terms(annotations: pl.DataFrame) -> dict[str, tuple[PlantedTerm, ...]]:
    """Image name -> the drawable terms its raters marked, severity by how many marked it.

    ``annotations`` is ``core.annotations.read_annotations``' long table (``value`` = raters)."""
    by_name = {phenotype.term.name: hpo_id for hpo_id, phenotype in drawable_phenotypes().items()}
    counts = annotations.group_by("image_name", "term").agg(pl.col("value").sum())
    planted: dict[str, list[PlantedTerm]] = {name: [] for name in annotations["image_name"].unique()}
    for name, term, raters in counts.sort("image_name", "term").iter_rows():
        if term in by_name and raters > 0:
            severity = ANNOTATED_SEVERITY[min(int(raters), max(ANNOTATED_SEVERITY))]
            planted[name].append(PlantedTerm(by_name[term], severity))
    return {name: tuple(terms) for name, terms in planted.items()}


def copy_annotations(release: Path, root: Path, names: set[str], labels: set[str]) -> list[Path]:
    """The release's annotation files into the twin, line for line, less the rows the twin lacks.

    Whole files stay byte-identical when the twin has all the release's rows (the four annotated
    images the release's partitions.csv does not list stay in them too, as published); a slice
    without a label's images gets no file for it."""
    source = DatasetLayout(release).annotations
    if not source.is_dir():
        raise TwinError(f"{DatasetLayout(release).metadata} has no annotation folder ({', '.join(ANNOTATION_FOLDERS)})")
    target = DatasetLayout(root).annotation_folders[-1]  # the release's own name
    target.mkdir(parents=True, exist_ok=True)
    listed = set(pl.read_csv(DatasetLayout(release).partitions, columns=["image_name"])["image_name"])
    written = []
    for path in sorted(source.glob("*.csv")):
        if path.stem not in labels:
            continue
        lines = path.read_bytes().decode("utf-8").splitlines(keepends=True)
        header = next(csv.reader(io.StringIO(lines[0])))
        column = header.index("image_name")
        keep = [
            line
            for line in lines[1:]
            if (name := next(csv.reader(io.StringIO(line)))[column].strip()) in names or name not in listed
        ]
        if len(keep) == len(lines) - 1:
            shutil.copyfile(path, target / path.name)
        else:
            (target / path.name).write_bytes("".join([lines[0], *keep]).encode("utf-8"))
        written.append(target / path.name)
    return written


def plan_twin(rows: pl.DataFrame, seed: int, planted: dict[str, tuple[PlantedTerm, ...]], spec: TwinSpec):
    """Every row's ``TwinFace``, and its ``SyntheticImage`` for the ground truth."""
    classes = {c.label: c for c in twin_classes(sorted(set(rows["label"])))}
    faces, images = [], []
    for row in rows.iter_rows(named=True):
        index = row["row"]
        shape = sample_face_shape(_rng(seed, _SHAPE, index))
        photo = replace(sample_photo(_rng(seed, _PHOTO, index)), rotation_deg=0.0, scale=1.0, shift_x=0.0, shift_y=0.0)
        name = row["image_name"]
        terms = planted.get(name)
        if terms is None:
            terms = sample_phenotypes(classes[row["label"]], _rng(seed, _TERMS, index), spec.severity_range)
        params = FaceParams(shape, photo, terms)
        landmarks = np.array([[row[f"x{i}"], row[f"y{i}"]] for i in range(1, 6)], dtype=float)
        faces.append(TwinFace(name, params, landmarks, photo_size(row, spec.margin)))
        images.append(SyntheticImage(name, row["label"], f"P{index:05d}", index, params))
    return faces, images


def generate_twin(release: Path, root: Path, spec: TwinSpec = TwinSpec(), workers: int = 2) -> Summary:
    """Write the twin of ``release`` under ``root`` (a new or empty folder)."""
    release, root = Path(release), Path(root)
    layout = DatasetLayout(root)
    if layout.images.exists() and any(layout.images.iterdir()):
        raise FileExistsError(f"{layout.images} is not empty: choose a new folder or delete the old twin first")
    started = time.perf_counter()
    rows = release_rows(release, spec.rows)
    for folder in (layout.images, layout.segmaps, layout.metadata):
        folder.mkdir(parents=True, exist_ok=True)
    copy_annotations(release, root, set(rows["image_name"]), set(rows["label"]))
    _write_partitions(root, rows, rows.select(_POINTS).to_numpy().reshape(-1, 5, 2))  # the real ones, for now
    planted = marked_terms(read_annotations(open_dataset(root)))
    faces, images = plan_twin(rows, spec.seed, planted, spec)
    jobs = [(str(root), face, spec.max_render) for face in faces]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            chunk = max(1, math.ceil(len(jobs) / (8 * workers)))
            landmarks = list(pool.map(_render_and_write, jobs, chunksize=chunk))
    else:
        landmarks = [_render_and_write(job) for job in jobs]
    _write_partitions(root, rows, np.stack(landmarks))
    _write_ground_truth(root, images)
    counts = tuple((label, int(n)) for label, n in rows["label"].value_counts().sort("label").iter_rows())
    annotated = sum(name in planted for name in rows["image_name"])
    return Summary(root, len(rows), len(rows), counts, annotated, time.perf_counter() - started, workers)


def _write_partitions(root: Path, rows: pl.DataFrame, landmarks: np.ndarray) -> None:
    """The release's columns in its order, the landmarks the twin's own."""
    columns = [c for c in rows.columns if c not in ("label", "row")]
    points = np.round(landmarks, 3)
    table = rows.with_columns(
        [pl.Series(f"{axis}{i + 1}", points[:, i, k]) for i in range(5) for k, axis in enumerate(("x", "y"))]
    )
    table.select(columns).write_csv(DatasetLayout(root).partitions, float_precision=3)
