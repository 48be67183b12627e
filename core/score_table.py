"""The score table: one row per image × model × method × region, its columns, and how it is written.

``extract`` builds it from freshly computed maps and ``rescore`` from stored ones; both go through
``score_block`` so the two tables agree column for column.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

SCORE_SCHEMA = {
    "image_name": pl.String,
    "label": pl.String,
    "fold": pl.String,
    "model": pl.String,
    "method": pl.String,
    "region": pl.String,
    "score": pl.Float64,
    "predicted": pl.String,
    "target": pl.String,
    "target_probability": pl.Float64,
    # The model's out-of-domain guard on the image (core.domain): null when the model has none, and in
    # tables written before the guard existed (readers add the columns as nulls: ``with_domain_columns``).
    "domain_score": pl.Float64,
    "out_of_domain": pl.Boolean,
}
DOMAIN_COLUMNS = ("domain_score", "out_of_domain")


def score_block(
    model: str, fold: str | None, method: str, rows: pl.DataFrame, regions: Sequence[str], scores: np.ndarray
) -> pl.DataFrame:
    """Score-table rows of one model and method: ``rows`` has image_name, label, predicted, target,
    target_probability and, when the model has a guard, domain_score and out_of_domain per image;
    ``scores`` is images × regions. Eager gathers: no query plans."""
    n, r = scores.shape
    per_image = with_domain_columns(rows)[np.repeat(np.arange(n, dtype=np.int64), r)]  # one gather of each column
    constants = pl.select(
        fold=pl.repeat(fold, n * r, dtype=pl.String),
        model=pl.repeat(model, n * r, dtype=pl.String),
        method=pl.repeat(method, n * r, dtype=pl.String),
    )
    return pl.DataFrame(
        [
            per_image["image_name"],
            per_image["label"],
            constants["fold"],
            constants["model"],
            constants["method"],
            pl.Series("region", np.tile(np.asarray(regions, dtype=object), n), dtype=pl.String),
            pl.Series("score", scores.reshape(-1), dtype=pl.Float64),
            per_image["predicted"],
            per_image["target"],
            per_image["target_probability"].cast(pl.Float64),
            per_image["domain_score"].cast(pl.Float64),
            per_image["out_of_domain"].cast(pl.Boolean),
        ]
    )


def with_domain_columns(table: pl.DataFrame) -> pl.DataFrame:
    """The table with domain_score and out_of_domain, as nulls where it has none (an older score table)."""
    missing = [pl.lit(None, dtype=SCORE_SCHEMA[c]).alias(c) for c in DOMAIN_COLUMNS if c not in table.columns]
    return table.with_columns(missing) if missing else table


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
