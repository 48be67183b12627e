"""How well each saliency method recovers the phenotypes planted in synthetic faces.

Real data never says which region *should* carry the evidence; the synthetic set does. Two
scores per method, on the held-out test faces, with the true label map (so parsing errors do
not blur the comparison) and the true class as target:

- *hit rate*: for faces whose planted terms all lie in one region, how often that region gets
  the highest C_i (chance: one over the number of regions), with its 95% Clopper–Pearson interval;
- *Spearman ρ* per region between the number of planted terms there and C_i, over all
  syndromic test faces: the paper's RQ2 with the truth in place of the raters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import polars as pl
from scipy import stats

from cache import DiskCache
from core.dataset import Dataset, DatasetError
from core.errors import UserFacingError
from core.layout import DatasetLayout
from core.pipeline import ExplainSettings, FaceSet, dataset_face_set, score_faces
from models.checkpoint import Classifier


def planted_counts(dataset: Dataset, names: Sequence[str], regions: Sequence[str]) -> np.ndarray:
    """N×R: how many terms were planted in each region of each face (``metadata/ground_truth.csv``)."""
    truth = pl.read_csv(DatasetLayout(dataset.root).ground_truth).filter(pl.col("region").is_not_null())
    counts = truth.group_by("image_name", "region").len()
    lookup = {(row["image_name"], row["region"]): row["len"] for row in counts.iter_rows(named=True)}
    return np.array([[lookup.get((n, r), 0) for r in regions] for n in names], dtype=np.int64)


def true_faces(dataset: Dataset, names: Sequence[str], size: int, settings: ExplainSettings) -> FaceSet:
    """The faces with the region masks of their true label maps: stored maps win (the one rule), so a
    face whose map came from elsewhere, or that had to be detected, has no truth to score against."""
    if not dataset.has_landmarks:
        raise DatasetError(
            "the leaderboard needs landmarks and stored label maps; a synthetic dataset (python -m core demo) has both"
        )
    faces = dataset_face_set(dataset, names, size, settings)
    for name, source in zip(faces.names, faces.parse_sources, strict=True):
        if source != "stored":
            raise DatasetError(
                f"the leaderboard needs landmarks and a stored label map for {name}; "
                "a synthetic dataset (python -m core demo) has both"
            )
    return faces


def leaderboard(
    dataset: Dataset,
    classifier: Classifier,
    names: Sequence[str],
    settings: ExplainSettings,
    cache: DiskCache | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> pl.DataFrame:
    """One row per method of ``settings``: hit rate (with interval and n) and Spearman ρ per region and on
    average. Each face is explained for its true class, whatever ``settings.target`` says."""
    settings = dataclasses.replace(settings, target="label", parser=None)
    classes = list(classifier.card.classes)
    labels = dataset.labels
    missing = sorted({labels[n] for n in names} - set(classes))
    if missing:
        raise UserFacingError(
            f"the model lacks the class(es) {', '.join(missing)} of the faces to score (the "
            f"model's classes: {', '.join(classes)}); the leaderboard explains each face's true "
            "class, so use a model trained on this dataset"
        )
    faces = true_faces(dataset, names, classifier.card.input_size, settings)
    assert faces.labels is not None  # true_faces gives every face its true label
    targets = [classes.index(label) for label in faces.labels]
    counts = planted_counts(dataset, names, faces.masks.names)
    results = score_faces(classifier, faces.aligned, faces.masks, targets, settings, cache)
    rows = []
    for m, method in enumerate(settings.methods):
        if progress is not None:
            progress(method, m, len(settings.methods))
        rows.append({"method": method, **_recovery(next(results).scores, counts, faces.masks.names)})
    return pl.DataFrame(rows).sort("hit_rate", descending=True)


def _recovery(scores: np.ndarray, counts: np.ndarray, regions: Sequence[str]) -> dict[str, float | int]:
    """Hit rate on single-region faces (with its Clopper–Pearson interval) and ρ per region on syndromic ones."""
    syndromic = counts.sum(axis=1) > 0
    single = (counts > 0).sum(axis=1) == 1
    hits = np.nanargmax(np.where(np.isnan(scores), -np.inf, scores), axis=1) == counts.argmax(axis=1)
    n_single = int(single.sum())
    n_hits = int(hits[single].sum())
    interval = stats.binomtest(n_hits, n_single).proportion_ci() if n_single else None
    row: dict[str, float | int] = {
        "hit_rate": n_hits / n_single if n_single else float("nan"),
        "hit_ci_low": interval.low if interval else float("nan"),
        "hit_ci_high": interval.high if interval else float("nan"),
        "n_single_region": n_single,
    }
    rhos = []
    for r, region in enumerate(regions):
        rho = stats.spearmanr(counts[syndromic, r], scores[syndromic, r], nan_policy="omit").statistic
        row[f"rho_{region}"] = float(rho)
        rhos.append(rho)
    row["rho_mean"] = float(np.nanmean(rhos))
    row["n_syndromic"] = int(syndromic.sum())
    return row
