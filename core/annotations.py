"""Raters' HPO annotation files of a dataset, read into one long table for ``core.hpo``'s statistics.

Files follow the NIH-Faces layout, ``<dataset>/metadata/hpo-annotations/<label>.csv`` (see
``read_annotations``). This is the only module that reads them, so the file format and its error
messages live in one place and the statistics stay free of disk.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import polars as pl

from core.dataset import Dataset, open_dataset
from core.hpo import AnnotationError, paper_rows, term_spellings

# Columns of the NIH-Faces release's annotation files that are not terms: a row index and free text.
_RELEASE_EXTRA_COLUMNS = ("image_num", "other")
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


def read_annotations(dataset: Dataset | str | Path) -> pl.DataFrame:
    """All rater annotations of a dataset, long: image_name, label, rater, term, hpo_id, region, value.

    Each ``metadata/hpo-annotations/<label>.csv`` has ``image_name``, an optional ``rater``, and one
    column per annotated term (the paper's name, the ontology's name or the HP id). Either one row
    per image × rater with 0/1 cells (``value`` 0/1), or one row per image without ``rater``: 0/1
    cells, or the NIH-Faces release's counts ("1X".."3X", empty = 0; ``value`` = number of raters;
    its ``image_num`` and free-text ``Other`` columns are ignored). A term without a column was not
    annotated in that file and counts as unmarked downstream. ``term`` is the paper's name.

    Every annotated image must be listed in ``metadata/partitions.csv`` under the label its file
    is named after: an annotation of an unlisted or differently labelled image would be counted
    for the wrong syndrome (or none) without anyone noticing.
    """
    dataset = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    folder = dataset.layout.annotations
    files = sorted(folder.glob("*.csv")) if folder.is_dir() else []
    if not files:
        raise AnnotationError(f"no HPO annotations: {folder} has no <label>.csv files (see README 'Data layout')")
    labels = dataset.labels
    return pl.concat([_parse_file(path, path.stem, labels) for path in files])


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


def _parse_file(path: Path, label: str, labels: dict[str, str]) -> pl.DataFrame:
    """One ``<label>.csv`` as long rows, or an AnnotationError naming the file, row and column at fault."""
    try:
        table = pl.read_csv(path, infer_schema=False)
    except (pl.exceptions.PolarsError, UnicodeDecodeError) as error:
        raise AnnotationError(f"{path}: not a readable CSV ({error})") from None
    if "image_name" not in table.columns:
        raise AnnotationError(f"{path}: no image_name column (columns: {', '.join(table.columns)})")
    terms = _term_columns(path, table.columns)
    names = table["image_name"].to_list()
    _check_images(path, names, label, labels)
    values = _cell_values(path, table, terms, names)
    raters = table["rater"].to_list() if "rater" in table.columns else [None] * len(table)
    _check_unique(path, names, raters, "rater" in table.columns)
    rows = [
        (names[i], label, raters[i], row["paper_name"], row["hpo_id"], row["region"], int(values[i, j]))
        for i in range(len(names))
        for j, row in enumerate(terms.values())
    ]
    return pl.DataFrame(rows, schema=ANNOTATION_SCHEMA, orient="row")


def _term_columns(path: Path, columns: list[str]) -> dict[str, dict]:
    """The file's term columns and the paper term each names; other columns must be known extras."""
    lookup = _column_names()
    terms: dict[str, dict] = {}
    for column in columns:
        if column in ("image_name", "rater") or column.casefold() in _RELEASE_EXTRA_COLUMNS:
            continue
        row = lookup.get(_normalised(column))
        if row is None:
            raise AnnotationError(
                f"{path}: column {column!r} is not one of the paper's 50 HPO terms "
                "(use its name as in the paper or the ontology, or its HP id)"
            )
        clash = [c for c, r in terms.items() if r is row]
        if clash:
            raise AnnotationError(f"{path}: columns {clash[0]!r} and {column!r} are the same term")
        terms[column] = row
    return terms


def _check_images(path: Path, names: list, label: str, labels: dict[str, str]) -> None:
    """Every row annotates an image partitions.csv lists under this file's label."""
    for i, name in enumerate(names):
        if name is None or not name.strip():
            raise AnnotationError(f"{path}: row {i + 2} has an empty image_name")
        if name not in labels:
            raise AnnotationError(
                f"{path}: row {i + 2} ({name!r}) annotates an image that partitions.csv does not "
                "list; add the image to partitions.csv or remove the row"
            )
        if labels[name] != label:
            raise AnnotationError(
                f"{path}: row {i + 2} ({name!r}) annotates an image labelled {labels[name]!r} in "
                f"partitions.csv under {label!r}; move the row to {labels[name]}.csv"
            )


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
