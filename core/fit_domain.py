"""Fit a classifier's out-of-domain guard on a dataset fold and store it beside the model card.

The guard (``core.domain``) learns the penultimate features of the fold's ``train`` faces and sets
its threshold at the 99th percentile of the ``val`` faces' scores; the ``test`` faces, when the fold
has any, say how many held-out faces like the training ones it flags. Faces are aligned from the
dataset's landmarks (``core.pipeline.aligned_dataset_photos``, the training path), as the classifier
learnt them. ``python -m core train`` and the demo build call this after each fold; ``python -m core
fit-domain`` for a model trained elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache import DiskCache
from core.dataset import Dataset, DatasetError, names_in
from core.domain import DEFAULT_PERCENTILE, DomainGuard, fit_domain_guard
from core.errors import UserFacingError
from core.pipeline import face_features
from core.train import aligned_faces
from models.checkpoint import load_classifier
from models.domain_guard import save_domain_guard

Faces = Callable[[list[str]], np.ndarray]  # image names -> N×S×S×3 aligned uint8 faces


@dataclass(frozen=True)
class DomainFit:
    """A fitted guard, where it was written, and the fraction of each split's faces it flags."""

    guard: DomainGuard = field(repr=False)
    path: Path
    fold: str
    flagged: dict[str, float]  # split -> fraction of its faces past the threshold
    counts: dict[str, int]  # split -> faces

    def summary(self) -> dict:
        return {
            "guard": str(self.path.name),
            "fold": self.fold,
            "threshold": round(self.guard.threshold, 4),
            "percentile": self.guard.percentile,
            "shrinkage": round(self.guard.shrinkage, 4),
            "faces": self.counts,
            "flagged": {split: round(fraction, 4) for split, fraction in self.flagged.items()},
        }


def fit_domain(
    card_path: str | Path,
    dataset: Dataset,
    fold: str | None = None,
    faces: Faces | None = None,
    cache: DiskCache | None = None,
    percentile: float = DEFAULT_PERCENTILE,
    device: str = "cpu",
) -> DomainFit:
    """Fit the guard of the classifier at ``card_path`` on ``fold`` of ``dataset`` (default: the card's
    fold) and write it beside the card; ``faces`` supplies aligned faces (default: aligned here). The features
    come from the classifier on ``device``."""
    classifier = load_classifier(card_path, domain=False, device=device)
    fold = fold or classifier.card.fold
    if fold is None:
        raise UserFacingError(
            "the model card names no fold, so its training and validation faces are unknown; give --fold fold-N"
        )
    splits = {split: names_in(dataset, fold, split) for split in ("train", "val", "test")}
    if not splits["train"] or not splits["val"]:
        raise DatasetError(f"{fold} needs images in both its train and val splits to fit a domain guard")
    size = classifier.card.input_size
    supply: Faces = faces or (lambda names: aligned_faces(dataset, names, size))
    features = {split: _features(classifier, supply(names), cache) for split, names in splits.items() if names}
    labels = dataset.labels
    guard = fit_domain_guard(
        features["train"],
        [labels[n] for n in splits["train"]],
        features["val"],
        classifier.fingerprint,
        percentile,
        fitted_on={"fold": fold},
    )
    path = save_domain_guard(guard, card_path)
    flagged = {split: float(guard.flags(guard.scores(f)).mean()) for split, f in features.items()}
    return DomainFit(guard, path, fold, flagged, {split: len(names) for split, names in splits.items()})


def _features(classifier, aligned: np.ndarray, cache: DiskCache | None, chunk: int = 256) -> np.ndarray:
    """Penultimate features a chunk at a time, so a large split never needs all its inputs at once."""
    return np.concatenate(
        [face_features(classifier, aligned[i : i + chunk], cache) for i in range(0, len(aligned), chunk)]
    )
