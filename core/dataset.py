"""Reading a dataset in the NIH-Faces layout (see README "Data layout"), refusing what would mislead.

Every problem names the file and the row, so a user can fix their CSV instead of guessing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from core.errors import UserFacingError

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


def open_dataset(root: str | Path) -> Dataset:
    root = Path(root)
    partitions = root / "metadata" / "partitions.csv"
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    if not partitions.is_file():
        raise DatasetError(f"{partitions} is missing; a dataset needs metadata/partitions.csv (see README 'Data layout')")
    try:
        table = pl.read_csv(partitions, infer_schema_length=10_000)
    except (pl.exceptions.PolarsError, UnicodeDecodeError) as error:
        raise DatasetError(f"{partitions}: not a readable CSV ({error})") from None
    return Dataset(root=root, table=_validated(table, partitions))


def _row(table: pl.DataFrame, index: int) -> str:
    return f"row {index + 2} ({table['image_name'][index]!r})"  # +2: header line, 1-based


def _validated(table: pl.DataFrame, where: Path) -> pl.DataFrame:
    if "image_name" not in table.columns:
        raise DatasetError(f"{where}: no image_name column (columns: {', '.join(table.columns)})")
    table = table.with_columns(pl.col("image_name").cast(pl.Utf8))
    names = table["image_name"]
    for i, name in enumerate(names):
        if name is None or not name.strip():
            raise DatasetError(f"{where}: row {i + 2} has an empty image_name")
        if Path(name).is_absolute() or ".." in Path(name).parts or "/" in name or "\\" in name:
            raise DatasetError(f"{where}: {_row(table, i)}: image names must be plain file names inside images/")
    duplicated = names.filter(names.is_duplicated()).unique().to_list()
    if duplicated:
        raise DatasetError(f"{where}: image name(s) listed twice: {', '.join(sorted(duplicated)[:5])}")
    if "label" not in table.columns:
        labels = [label_from_name(n) for n in names]
        missing = [i for i, label in enumerate(labels) if label is None]
        if missing:
            raise DatasetError(f"{where}: no label column, and {_row(table, missing[0])} does not start with "
                               "'<label>Slide<number>'; add a label column")
        table = table.with_columns(pl.Series("label", labels))
    table = table.with_columns(pl.col("label").cast(pl.Utf8))
    for fold in (f for f in FOLDS if f in table.columns):
        bad = table.with_row_index().filter(~pl.col(fold).is_in(SPLITS) | pl.col(fold).is_null())
        if len(bad):
            raise DatasetError(f"{where}: {_row(table, bad['index'][0])} has {fold} = {bad[fold][0]!r}; "
                               f"use one of {', '.join(SPLITS)}")
    present = [c for c in LANDMARK_COLUMNS if c in table.columns]
    if present and len(present) != len(LANDMARK_COLUMNS):
        raise DatasetError(f"{where}: landmark columns incomplete: need all of {', '.join(LANDMARK_COLUMNS)}")
    if present:
        try:
            table = table.with_columns([pl.col(c).cast(pl.Float64, strict=True) for c in present])
        except pl.exceptions.PolarsError:
            raise DatasetError(f"{where}: landmark columns must be numbers") from None
    keep = ["image_name", "label", *[f for f in FOLDS if f in table.columns], *present]
    return table.select(keep)


def image_file(dataset: Dataset, image_name: str) -> Path:
    """The photo's path, refusing names (or symlinks) that lead outside ``images/``."""
    folder = (dataset.root / "images").resolve()
    path = (folder / image_name).resolve()
    if folder not in path.parents:
        raise DatasetError(f"image {image_name!r} resolves outside {folder}; refusing to read it")
    if not path.is_file():
        raise DatasetError(f"image {image_name!r} is listed in partitions.csv but {path} does not exist")
    return path


def segmap_file(dataset: Dataset, image_name: str) -> Path | None:
    """The stored label map of an image (same name, or same stem as .png), if the dataset has one."""
    folder = (dataset.root / "features" / "segmaps").resolve()
    for candidate in (folder / image_name, folder / Path(image_name).with_suffix(".png").name):
        path = candidate.resolve()
        if folder in path.parents and path.is_file():
            return path
    return None


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
