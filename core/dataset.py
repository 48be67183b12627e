"""Reading a dataset in the NIH-Faces layout (see README "Data layout"), refusing what would mislead.

Every problem names the file and the row, so a user can fix their CSV instead of guessing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from core.align import check_landmarks
from core.errors import ImageError, NoFaceError, UserFacingError
from core.imageio import load_image_and_scale, load_label_map
from core.layout import DatasetLayout

FOLDS = tuple(f"fold-{i}" for i in range(1, 6))
SPLITS = ("train", "val", "test")
LANDMARK_COLUMNS = tuple(f"{axis}{i}" for i in range(1, 6) for axis in ("x", "y"))
_PREFIX = re.compile(r"^(?P<label>.+?)Slide\d+")


class DatasetError(UserFacingError):
    """The dataset folder or its metadata is not in the expected layout."""


@dataclass(frozen=True)
class Dataset:
    """A dataset folder and its partition table (one row per image, labels resolved)."""

    root: Path
    table: pl.DataFrame  # image_name, label, fold-1..fold-5 (those present), x1..y5 (if present)

    @property
    def layout(self) -> DatasetLayout:
        return DatasetLayout(self.root)

    @property
    def labels(self) -> dict[str, str]:
        """Image name -> its class."""
        return dict(zip(self.table["image_name"], self.table["label"], strict=True))

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(sorted(self.table["label"].unique().to_list()))

    @property
    def folds(self) -> tuple[str, ...]:
        return tuple(f for f in FOLDS if f in self.table.columns)

    @property
    def has_landmarks(self) -> bool:
        return all(c in self.table.columns for c in LANDMARK_COLUMNS)


def label_from_name(image_name: str) -> str | None:
    """The NIH-Faces release encodes the label as the prefix before ``Slide`` (``WSSlide12.jpg`` -> ``WS``)."""
    match = _PREFIX.match(image_name)
    return match.group("label") if match else None


@dataclass(frozen=True)
class Photo:
    """A photo ready for ``core.pipeline.prepare_face``, everything in the same pixels."""

    image: np.ndarray  # RGB uint8, upright, as core.imageio.load_image gives it
    landmarks: np.ndarray | None = None  # 5×2 in the pixels of ``image`` (scaled if the photo was shrunk)
    label_map: np.ndarray | None = None  # a stored LaPa map, in the pixels of ``image`` or at the aligned size


def open_dataset(root: str | Path) -> Dataset:
    root = Path(root)
    partitions = DatasetLayout(root).partitions
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    if not partitions.is_file():
        raise DatasetError(
            f"{partitions} is missing; a dataset needs metadata/partitions.csv (see README 'Data layout')"
        )
    with partitions.open("rb") as file:
        if file.read(2) in (b"\xff\xfe", b"\xfe\xff"):
            raise DatasetError(f"{partitions}: the file is UTF-16; save it as UTF-8 CSV")
    try:
        table = pl.read_csv(partitions, infer_schema_length=10_000)
    except (pl.exceptions.PolarsError, UnicodeDecodeError) as error:
        raise DatasetError(f"{partitions}: not a readable CSV ({error})") from None
    table = _validated(table, partitions)
    _check_annotation_labels(root, set(table["label"].to_list()))
    return Dataset(root=root, table=table)


def _check_annotation_labels(root: Path, classes: set[str]) -> None:
    """Each metadata/hpo-annotations/<label>.csv must be named after a class of partitions.csv: a
    misspelt or extra file would otherwise be read as annotations of no image."""
    folder = DatasetLayout(root).annotations
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.csv")):
        if path.stem not in classes:
            raise DatasetError(
                f"{path}: label {path.stem!r} is not a class of partitions.csv (classes: "
                f"{', '.join(sorted(classes))}); rename the file after its class, or remove it"
            )


def _row(table: pl.DataFrame, index: int) -> str:
    return f"row {index + 2} ({table['image_name'][index]!r})"  # +2: header line, 1-based


def _validated(table: pl.DataFrame, where: Path) -> pl.DataFrame:
    if "image_name" not in table.columns:
        raise DatasetError(f"{where}: no image_name column (columns: {', '.join(table.columns)})")
    if table.is_empty():
        raise DatasetError(f"{where}: lists no images; add one row per photo")
    table = table.with_columns(pl.col("image_name").cast(pl.Utf8))
    names = table["image_name"]
    for i, name in enumerate(names):
        if name is None or not name.strip():
            raise DatasetError(f"{where}: row {i + 2} has an empty image_name")
        if "/" in name or "\\" in name or name in (".", "..") or any(ord(c) < 32 for c in name):
            raise DatasetError(f"{where}: {_row(table, i)}: image names must be plain file names inside images/")
    duplicated = names.filter(names.is_duplicated()).unique().to_list()
    if duplicated:
        raise DatasetError(f"{where}: image name(s) listed twice: {', '.join(sorted(duplicated)[:5])}")
    if "label" not in table.columns:
        labels = [label_from_name(n) for n in names]
        missing = [i for i, label in enumerate(labels) if label is None]
        if missing:
            raise DatasetError(
                f"{where}: no label column, and {_row(table, missing[0])} does not start with "
                "'<label>Slide<number>'; add a label column"
            )
        table = table.with_columns(pl.Series("label", labels))
    table = table.with_columns(pl.col("label").cast(pl.Utf8))
    unlabelled = table.with_row_index().filter(pl.col("label").is_null() | (pl.col("label").str.strip_chars() == ""))
    if len(unlabelled):
        raise DatasetError(f"{where}: {_row(table, unlabelled['index'][0])} has an empty label")
    for fold in (f for f in FOLDS if f in table.columns):
        bad = table.with_row_index().filter(~pl.col(fold).is_in(SPLITS) | pl.col(fold).is_null())
        if len(bad):
            raise DatasetError(
                f"{where}: {_row(table, bad['index'][0])} has {fold} = {bad[fold][0]!r}; use one of {', '.join(SPLITS)}"
            )
    present = [c for c in LANDMARK_COLUMNS if c in table.columns]
    if present and len(present) != len(LANDMARK_COLUMNS):
        raise DatasetError(f"{where}: landmark columns incomplete: need all of {', '.join(LANDMARK_COLUMNS)}")
    if present:
        try:
            table = table.with_columns([pl.col(c).cast(pl.Float64, strict=True) for c in present])
        except pl.exceptions.PolarsError:
            raise DatasetError(f"{where}: landmark columns must be numbers") from None
        for column in present:
            bad = table.with_row_index().filter(~pl.col(column).is_finite() | pl.col(column).is_null())
            if len(bad):
                raise DatasetError(
                    f"{where}: {_row(table, bad['index'][0])} has {column} = {bad[column][0]}; every "
                    "row needs all ten landmark numbers (or drop the columns to detect faces)"
                )
    keep = ["image_name", "label", *[f for f in FOLDS if f in table.columns], *present]
    return table.select(keep)


def image_file(dataset: Dataset, image_name: str) -> Path:
    """The photo's path, refusing names (or symlinks) that lead outside ``images/``."""
    folder = dataset.layout.images.resolve()
    path = (folder / image_name).resolve()
    if folder not in path.parents:
        raise DatasetError(f"image {image_name!r} resolves outside {folder}; refusing to read it")
    if not path.is_file():
        raise DatasetError(f"image {image_name!r} is listed in partitions.csv but {path} does not exist")
    return path


def segmap_file(dataset: Dataset, image_name: str) -> Path | None:
    """The stored label map of an image (same name, or same stem as .png), if the dataset has one.

    A map that resolves outside ``features/segmaps/`` (a symlink) is refused, not silently skipped.
    """
    folder = dataset.layout.segmaps.resolve()
    for candidate in (folder / image_name, folder / Path(image_name).with_suffix(".png").name):
        if not (candidate.is_symlink() or candidate.exists()):
            continue
        path = candidate.resolve()
        if folder not in path.parents:
            raise DatasetError(f"label map {candidate.name!r} resolves outside {folder}; refusing to read it")
        if path.is_file():
            return path
    return None


def read_photo(dataset: Dataset, image_name: str) -> Photo:
    """A dataset image with its landmarks and stored label map, checked against each other.

    Landmarks are scaled if the photo was shrunk on loading and must lie on the photo; a stored map
    must have the photo's size (it is then shrunk with it) or be square (taken as aligned already).
    Every problem is a DatasetError naming the row of partitions.csv.
    """
    where = _where(dataset, image_name)
    try:
        image, factors = load_image_and_scale(image_file(dataset, image_name))
    except (ImageError, DatasetError) as error:
        raise DatasetError(f"{where}: {error}") from None
    landmarks = landmarks_of(dataset, [image_name])
    if landmarks is not None:
        try:
            landmarks = check_landmarks(landmarks[0] * factors, image.shape)
        except NoFaceError as error:
            raise DatasetError(f"{where}: {error}") from None
    return Photo(image, landmarks, _stored_label_map(dataset, image_name, image.shape, factors, where))


def _where(dataset: Dataset, image_name: str) -> str:
    index = dataset.table["image_name"].to_list().index(image_name)
    return f"{dataset.layout.partitions}: {_row(dataset.table, index)}"


def _stored_label_map(
    dataset: Dataset, image_name: str, image_shape: tuple[int, ...], factors: np.ndarray, where: str
) -> np.ndarray | None:
    path = segmap_file(dataset, image_name)
    if path is None:
        return None
    photo_size = tuple(int(round(n)) for n in np.array(image_shape[1::-1]) / factors)  # the file's own width, height
    try:
        with Image.open(path) as header:  # sizes from the header, before decoding anything
            map_size = header.size
    except (OSError, Image.DecompressionBombError) as error:
        raise DatasetError(f"{where}: cannot read the label map {path} ({error})") from None
    if map_size != photo_size and map_size[0] != map_size[1]:
        raise DatasetError(
            f"{where}: the label map {path.name} is {map_size[0]}×{map_size[1]} but the photo is "
            f"{photo_size[0]}×{photo_size[1]}; a label map is drawn on its photo (same size) or on "
            "the aligned face (square)"
        )
    try:
        label_map = load_label_map(path)
    except ImageError as error:
        raise DatasetError(f"{where}: {error}") from None
    if map_size == photo_size and label_map.shape != image_shape[:2]:
        shrunk = Image.fromarray(label_map).resize((image_shape[1], image_shape[0]), Image.Resampling.NEAREST)
        label_map = np.asarray(shrunk)
    return label_map


def landmarks_of(dataset: Dataset, image_names: list[str]) -> np.ndarray | None:
    """N×5×2 landmarks in the photos' pixels, or None when the dataset has none."""
    if not dataset.has_landmarks:
        return None
    rows = dataset.table.filter(pl.col("image_name").is_in(image_names))
    order = {n: i for i, n in enumerate(rows["image_name"])}
    values = rows.select(LANDMARK_COLUMNS).to_numpy()
    return np.stack([values[order[n]] for n in image_names]).reshape(-1, 5, 2)


def names_in(dataset: Dataset, fold: str, split: str) -> list[str]:
    if fold not in dataset.folds:
        raise DatasetError(f"the dataset has no {fold} column (it has {', '.join(dataset.folds) or 'no folds'})")
    return dataset.table.filter(pl.col(fold) == split)["image_name"].to_list()


def evenly_spaced(names: list[str], limit: int | None) -> list[str]:
    """``limit`` of ``names``, evenly spaced from the first to the last, so every class keeps its share
    (partitions.csv is usually ordered by class); all of them when ``limit`` is None or not smaller."""
    if limit is not None and limit < 1:
        raise DatasetError(f"a limit of {limit} faces leaves none to use; give at least 1")
    if limit is None or limit >= len(names):
        return list(names)
    return [names[i] for i in np.linspace(0, len(names) - 1, limit).round().astype(int)]
