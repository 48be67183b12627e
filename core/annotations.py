"""Raters' HPO annotation files of a dataset, read into one long table for ``core.hpo``'s statistics.

Files follow the NIH-Faces layout, ``<dataset>/metadata/hpo-annotations/<label>.csv`` or, as the
release unpacks, ``metadata/annotated-hpo-terms/`` (``DatasetLayout.annotations``; see
``read_annotations``). This is the only module that reads them, so the file format and its error
messages live in one place and the statistics stay free of disk.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import polars as pl

from core.dataset import Dataset, open_dataset
from core.hpo import AnnotationError, paper_rows, term_spellings

# Columns of the NIH-Faces release's annotation files that are not terms: a row index, and free
# text, recognised by name: any column whose normalised name starts with "other" ("Other",
# "Other prominent dysmorphic features" in NS.csv, "other_notes").
_RELEASE_INDEX_COLUMN = "image num"  # normalised "image_num"
_FREE_TEXT_PREFIX = "other"
_RELEASE_VALUE = re.compile(r"^([1-9]\d*)X$")  # "2X": two raters marked the term

ANNOTATION_SCHEMA = {
    "image_name": pl.Utf8,
    "label": pl.Utf8,
    "rater": pl.Utf8,
    "term": pl.Utf8,
    "hpo_id": pl.Utf8,
    "region": pl.Utf8,
    "value": pl.Int64,
}


class UnlistedAnnotationsWarning(UserWarning):
    """Annotated images that partitions.csv does not list were left out of (or kept in) the read."""


@dataclass(frozen=True)
class AnnotationRead:
    """``table``: the long annotations; ``unlisted``: (image_name, file name) of the annotated images
    partitions.csv does not list, left out of ``table`` unless ``kept``."""

    table: pl.DataFrame
    unlisted: tuple[tuple[str, str], ...] = ()
    kept: bool = False

    @property
    def note(self) -> str | None:
        """One line for the user naming the unlisted images, or None when there are none."""
        if not self.unlisted:
            return None
        named = ", ".join(f"{name} ({file})" for name, file in self.unlisted)
        if self.kept:
            return (
                f"{len(self.unlisted)} annotated image(s) not in partitions.csv, kept under their file's label: {named}"
            )
        return (
            f"{len(self.unlisted)} annotated image(s) not listed in partitions.csv, left out: {named} "
            "(as the authors' RQ2 notebook does; strict refuses them instead)"
        )


def read_annotations(dataset: Dataset | str | Path, strict: bool = False, keep_unlisted: bool = False) -> pl.DataFrame:
    """All rater annotations of a dataset, long: image_name, label, rater, term, hpo_id, region, value.

    ``load_annotations``' table; its note about annotated images missing from partitions.csv, if
    any, is one ``UnlistedAnnotationsWarning``. Front ends that cache the read use
    ``load_annotations`` and show ``note`` themselves.
    """
    read = load_annotations(dataset, strict=strict, keep_unlisted=keep_unlisted)
    if read.note:
        warnings.warn(read.note, UnlistedAnnotationsWarning, stacklevel=2)
    return read.table


def load_annotations(
    dataset: Dataset | str | Path, strict: bool = False, keep_unlisted: bool = False
) -> AnnotationRead:
    """The rater annotations of a dataset, and which annotated images partitions.csv does not list.

    Each ``<label>.csv`` of the annotation folder (``DatasetLayout.annotations``) has ``image_name``,
    an optional ``rater``, and one column per annotated term (the paper's name, the ontology's name
    or the HP id; case, punctuation and spacing aside). Either one row per image × rater with 0/1
    cells (``value`` 0/1), or one row per image without ``rater``: 0/1 cells, or the NIH-Faces
    release's counts ("1X".."3X", empty = 0; ``value`` = number of raters). Its ``image_num`` and
    free-text columns (a name starting with "other") are ignored; any other column must be a term.
    Cells are read with surrounding white space (non-breaking spaces too) removed. A term without a
    column was not annotated in that file and counts as unmarked downstream. ``term`` is the
    paper's name.

    An image partitions.csv lists under another label is refused: it would be counted for the wrong
    syndrome. An image it does not list at all (four in the NIH-Faces release) is left out and
    named in ``unlisted``, kept under its file's label with ``keep_unlisted`` (the authors' Figure 4
    used all 175), or refused with ``strict``.
    """
    if strict and keep_unlisted:
        raise ValueError("strict refuses unlisted annotated images and keep_unlisted keeps them; choose one")
    dataset = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    folder = _annotation_folder(dataset)
    files = sorted(folder.glob("*.csv")) if folder.is_dir() else []
    if not files:
        raise AnnotationError(f"no HPO annotations: {folder} has no <label>.csv files (see README 'Data layout')")
    labels = dataset.labels
    tables, unlisted = [], []
    for path in files:
        table, missing = _parse_file(path, path.stem, labels, strict, keep_unlisted)
        tables.append(table)
        unlisted += [(name, path.name) for name in missing]
    return AnnotationRead(pl.concat(tables), tuple(unlisted), keep_unlisted)


def _annotation_folder(dataset: Dataset) -> Path:
    """The layout's annotation folder, refused when both names exist and hold different files."""
    present = [f for f in dataset.layout.annotation_folders if f.is_dir() and any(f.glob("*.csv"))]
    if len(present) > 1:
        contents = [{path.name: path.read_bytes() for path in folder.glob("*.csv")} for folder in present]
        if any(c != contents[0] for c in contents[1:]):
            names = " and ".join(f"metadata/{folder.name}/" for folder in present)
            raise AnnotationError(
                f"{dataset.root}: both {names} hold HPO annotations, and they differ; keep one of them"
            )
    return dataset.layout.annotations


def _normalised(name: str) -> str:
    """Case, punctuation and spacing do not distinguish terms ("Low-set, posteriorly" = "low set posteriorly")."""
    return " ".join(re.sub(r"[^0-9a-z:]+", " ", name.casefold()).split())


@lru_cache(maxsize=1)
def _column_names() -> dict[str, dict]:
    """Every spelling an annotation column may use for a paper term, normalised, to its row; cached
    because it asks the ontology 50 times and every file needs it."""
    lookup: dict[str, dict] = {}
    for row in paper_rows():
        for name in term_spellings(row):
            key = _normalised(name)
            if lookup.get(key, row) is not row:
                raise AssertionError(f"two paper terms share the spelling {name!r}")
            lookup[key] = row
    return lookup


def _parse_file(
    path: Path, label: str, labels: dict[str, str], strict: bool, keep_unlisted: bool
) -> tuple[pl.DataFrame, list[str]]:
    """One ``<label>.csv`` as long rows and the names of its images partitions.csv does not list, or
    an AnnotationError naming the file, row and column at fault."""
    try:
        table = pl.read_csv(path, infer_schema=False)
    except (pl.exceptions.PolarsError, UnicodeDecodeError) as error:
        raise AnnotationError(f"{path}: not a readable CSV ({error})") from None
    if "image_name" not in table.columns:
        raise AnnotationError(f"{path}: no image_name column (columns: {', '.join(table.columns)})")
    terms = _term_columns(path, table.columns)
    names = [name.strip() if isinstance(name, str) else name for name in table["image_name"].to_list()]
    unlisted = _check_images(path, names, label, labels, strict)
    values = _cell_values(path, table, terms, names)
    raters = table["rater"].to_list() if "rater" in table.columns else [None] * len(table)
    _check_unique(path, names, raters, "rater" in table.columns)
    keep = [i for i in range(len(names)) if keep_unlisted or i not in unlisted]
    rows = [
        (names[i], label, raters[i], row["paper_name"], row["hpo_id"], row["region"], int(values[i, j]))
        for i in keep
        for j, row in enumerate(terms.values())
    ]
    return pl.DataFrame(rows, schema=ANNOTATION_SCHEMA, orient="row"), [names[i] for i in unlisted]


def _is_extra(column: str) -> bool:
    """Not a term: the image, its rater, the release's row index, or free text ("Other…")."""
    normalised = _normalised(column)
    return (
        column in ("image_name", "rater")
        or normalised == _RELEASE_INDEX_COLUMN
        or normalised.startswith(_FREE_TEXT_PREFIX)
    )


def _term_columns(path: Path, columns: list[str]) -> dict[str, dict]:
    """The file's term columns and the paper term each names; other columns must be known extras."""
    lookup = _column_names()
    terms: dict[str, dict] = {}
    for column in columns:
        if _is_extra(column):
            continue
        row = lookup.get(_normalised(column))
        if row is None:
            raise AnnotationError(
                f"{path}: column {column!r} is not one of the paper's 50 HPO terms "
                "(use its name as in the paper or the ontology, or its HP id; free text goes in a "
                "column whose name starts with 'Other')"
            )
        clash = [c for c, r in terms.items() if r is row]
        if clash:
            raise AnnotationError(f"{path}: columns {clash[0]!r} and {column!r} are the same term")
        terms[column] = row
    return terms


def _check_images(path: Path, names: list, label: str, labels: dict[str, str], strict: bool) -> list[int]:
    """The rows annotating images partitions.csv does not list (refused when ``strict``); a row
    annotating an image it lists under another label is refused."""
    unlisted = []
    for i, name in enumerate(names):
        if name is None or not name:
            raise AnnotationError(f"{path}: row {i + 2} has an empty image_name")
        if name not in labels:
            if strict:
                raise AnnotationError(
                    f"{path}: row {i + 2} ({name!r}) annotates an image that partitions.csv does not "
                    "list; add the image to partitions.csv or remove the row"
                )
            unlisted.append(i)
        elif labels[name] != label:
            raise AnnotationError(
                f"{path}: row {i + 2} ({name!r}) annotates an image labelled {labels[name]!r} in "
                f"partitions.csv under {label!r}; move the row to {labels[name]}.csv"
            )
    return unlisted


def _cell_values(path: Path, table: pl.DataFrame, terms: dict[str, dict], names: list) -> np.ndarray:
    """Rows × term columns of marks: 0/1 per rater, or the release's rater counts ("2X" → 2, empty → 0)."""
    cells = table.select(list(terms)).to_numpy() if terms else np.empty((len(table), 0), dtype=object)
    release = any(isinstance(v, str) and _RELEASE_VALUE.match(v.strip()) for v in cells.ravel())
    if release and "rater" in table.columns:
        raise AnnotationError(
            f"{path}: rater counts ('2X') and a rater column do not go together; "
            "use one row per image × rater with 0/1, or the release's counts without raters"
        )
    values = np.zeros(cells.shape, dtype=np.int64)
    for (i, j), cell in np.ndenumerate(cells):
        text = (cell or "").strip()
        match = _RELEASE_VALUE.match(text)
        if release and (text == "" or match):
            values[i, j] = int(match.group(1)) if match else 0
        elif not release and text in ("0", "1"):
            values[i, j] = int(text)
        else:
            expected = "empty or a rater count such as '2X'" if release else "0 or 1"
            raise AnnotationError(
                f"{path}: row {i + 2} ({names[i]!r}), column {list(terms)[j]!r}: {cell!r} is not {expected}"
            )
    return values


def _check_unique(path: Path, names: list, raters: list, has_raters: bool) -> None:
    """One row per image (and rater): a repeated row would count one rater's marks twice."""
    seen: dict[tuple, int] = {}
    for i, key in enumerate(zip(names, raters)):
        if key in seen:
            who = f"rater {key[1]!r}" if has_raters else "no rater column"
            raise AnnotationError(
                f"{path}: rows {seen[key] + 2} and {i + 2} both annotate {key[0]!r} ({who}); "
                "add a rater column for several raters"
            )
        seen[key] = i
