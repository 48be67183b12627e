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

from collections.abc import Sequence

import numpy as np
import polars as pl
from scipy import stats

from cache import DiskCache
from core.align import align_face
from core.attribute import METHOD_NAMES
from core.dataset import Dataset, DatasetError, read_photo
from core.errors import UserFacingError
from core.explain import attribution_sums, stored_map_in_aligned_frame
from core.regions import PAPER_REGIONS, RegionSpec, region_masks
from core.score import region_scores, relevance_from_sums
from models.checkpoint import Classifier


def planted_counts(dataset: Dataset, names: Sequence[str], regions: Sequence[str]) -> np.ndarray:
    """N×R: how many terms were planted in each region of each face (``metadata/ground_truth.csv``)."""
    truth = pl.read_csv(dataset.root / "metadata" / "ground_truth.csv").filter(pl.col("region").is_not_null())
    counts = truth.group_by("image_name", "region").len()
    lookup = {(row["image_name"], row["region"]): row["len"] for row in counts.iter_rows(named=True)}
    return np.array([[lookup.get((n, r), 0) for r in regions] for n in names], dtype=np.int64)


def _faces_and_masks(dataset: Dataset, names: Sequence[str], size: int, spec: RegionSpec):
    """Aligned faces and the region masks of their true label maps (photos through ``read_photo``)."""
    faces, maps = [], []
    for name in names:
        photo = read_photo(dataset, name)
        if photo.landmarks is None or photo.label_map is None:
            raise DatasetError(f"the leaderboard needs landmarks and a stored label map for {name}; "
                               "a synthetic dataset (python -m core demo) has both")
        aligned = align_face(photo.image, photo.landmarks, size=size)
        faces.append(aligned.image)
        maps.append(stored_map_in_aligned_frame(photo.label_map, photo.image.shape, aligned.matrix, size))
    return np.stack(faces), region_masks(np.stack(maps), spec)


def leaderboard(dataset: Dataset, classifier: Classifier, names: Sequence[str], methods: Sequence[str] = METHOD_NAMES,
                spec: RegionSpec = PAPER_REGIONS, batch_size: int = 16, cache: DiskCache | None = None,
                progress=None) -> pl.DataFrame:
    """One row per method: hit rate (with interval and n) and Spearman ρ per region and on average."""
    labels = dict(zip(dataset.table["image_name"], dataset.table["label"]))
    classes = list(classifier.card.classes)
    missing = sorted({labels[n] for n in names} - set(classes))
    if missing:
        raise UserFacingError(f"the model lacks the class(es) {', '.join(missing)} of the faces to score (the "
                              f"model's classes: {', '.join(classes)}); the leaderboard explains each face's true "
                              "class, so use a model trained on this dataset")
    targets = [classes.index(labels[n]) for n in names]
    faces, masks = _faces_and_masks(dataset, names, classifier.card.input_size, spec)
    regions = masks.names
    counts = planted_counts(dataset, names, regions)
    syndromic = counts.sum(axis=1) > 0
    single = (counts > 0).sum(axis=1) == 1
    rows = []
    for m, method in enumerate(methods):
        scores = np.empty((len(names), len(regions)), dtype=np.float32)
        for start in range(0, len(names), batch_size):
            if progress is not None:
                progress(method, m, len(methods), start, len(names))
            chunk = slice(start, start + batch_size)
            abs_sum, signed_sum = attribution_sums(classifier, faces[chunk], targets[chunk], method, cache=cache)
            scores[chunk] = region_scores(relevance_from_sums(abs_sum, signed_sum), masks.masks[chunk], regions)
        hits = np.nanargmax(np.where(np.isnan(scores), -np.inf, scores), axis=1) == counts.argmax(axis=1)
        n_single = int(single.sum())
        n_hits = int(hits[single].sum())
        interval = stats.binomtest(n_hits, n_single).proportion_ci() if n_single else None
        row = {"method": method, "hit_rate": n_hits / n_single if n_single else float("nan"),
               "hit_ci_low": interval.low if interval else float("nan"),
               "hit_ci_high": interval.high if interval else float("nan"), "n_single_region": n_single}
        rhos = []
        for r, region in enumerate(regions):
            rho = stats.spearmanr(counts[syndromic, r], scores[syndromic, r], nan_policy="omit").statistic
            row[f"rho_{region}"] = float(rho)
            rhos.append(rho)
        row["rho_mean"] = float(np.nanmean(rhos))
        row["n_syndromic"] = int(syndromic.sum())
        rows.append(row)
    return pl.DataFrame(rows).sort("hit_rate", descending=True)
