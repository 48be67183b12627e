"""An out-of-domain guard: how unlike a model's training faces a face is, in the model's own features.

Lee et al. 2018 ("A simple unified framework for detecting out-of-distribution samples and adversarial
attacks"): class-conditional Gaussians with one shared covariance on the penultimate-layer features;
a face's score is its Mahalanobis distance to the nearest class mean. The shared covariance is the
pooled within-class covariance shrunk by Ledoit–Wolf (scikit-learn's ``LedoitWolf``, towards a
multiple of the identity): with a few hundred training faces and 512 or 2048 features the plain
estimate is singular. The threshold is the ``percentile`` (99 by default) of the validation faces'
scores, so about 1% of faces like the validation faces are flagged by design.

Pure: feature arrays in, a frozen ``DomainGuard`` and scores out. Reading and writing a guard beside
its model card lives in ``models.domain_guard``; the features in ``core.pipeline.face_features``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
from sklearn.covariance import LedoitWolf

from core.errors import UserFacingError

DEFAULT_PERCENTILE = 99.0


class DomainGuardError(UserFacingError, ValueError):
    """A guard that cannot be fitted or used (too few faces, wrong shapes, non-finite numbers)."""


NO_GUARD_REASON = (
    "this model has no out-of-domain guard, so nothing says whether the photo is like its training faces; "
    "fit one with python -m core fit-domain CARD DATASET"
)


@dataclass(frozen=True)
class DomainVerdict:
    """One face's domain score and the guard's threshold; past it, the face is out of domain."""

    score: float
    threshold: float

    @property
    def out_of_domain(self) -> bool:
        return self.score > self.threshold

    def summary(self) -> dict[str, float | bool]:
        return {
            "score": round(self.score, 4),
            "threshold": round(self.threshold, 4),
            "out_of_domain": self.out_of_domain,
        }


def verdict_summary(verdict: DomainVerdict | None) -> dict[str, float | bool | str | None]:
    """The JSON form ``explain`` prints: the verdict, or nulls and the reason there is none."""
    if verdict is None:
        return {"score": None, "threshold": None, "out_of_domain": None, "reason": NO_GUARD_REASON}
    return dict(verdict.summary())


@dataclass(frozen=True)
class DomainGuard:
    """Class means (M×D), the shared precision matrix (D×D) and the calibrated threshold.

    ``fingerprint`` names the classifier whose features these are (``Classifier.fingerprint``): a guard
    is meaningless for other weights. ``shrinkage`` is Ledoit–Wolf's intensity; ``fitted_on`` says what
    it was fitted on (fold, face counts), for the reader only.
    """

    means: np.ndarray = field(repr=False)
    precision: np.ndarray = field(repr=False)
    threshold: float
    fingerprint: str
    percentile: float = DEFAULT_PERCENTILE
    shrinkage: float = 0.0
    fitted_on: Mapping[str, str | int | float | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        means = np.asarray(self.means, dtype=np.float64)
        precision = np.asarray(self.precision, dtype=np.float64)
        if means.ndim != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise DomainGuardError(f"class means must be a non-empty M×D matrix, got shape {means.shape}")
        dim = means.shape[1]
        if precision.shape != (dim, dim):
            raise DomainGuardError(f"the precision matrix must be {dim}×{dim} like the means, got {precision.shape}")
        if not (np.isfinite(means).all() and np.isfinite(precision).all()):
            raise DomainGuardError("the guard's means or precision hold NaN or infinite values")
        for name in ("threshold", "percentile", "shrinkage"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise DomainGuardError(f"the guard's {name} must be a finite number, got {value!r}")
        if self.threshold < 0 or not 0 < self.percentile <= 100 or not 0 <= self.shrinkage <= 1:
            raise DomainGuardError(
                f"the guard's threshold ({self.threshold}), percentile ({self.percentile}) or shrinkage "
                f"({self.shrinkage}) is out of range"
            )
        if not isinstance(self.fingerprint, str) or not self.fingerprint:
            raise DomainGuardError("the guard names no model fingerprint")
        means.setflags(write=False)
        precision.setflags(write=False)
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "precision", precision)
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "percentile", float(self.percentile))
        object.__setattr__(self, "shrinkage", float(self.shrinkage))
        object.__setattr__(self, "fitted_on", MappingProxyType(dict(self.fitted_on)))

    @property
    def key(self) -> str:
        """A content key of what decides the guard's answers (means, precision, threshold, model)."""
        digest = hashlib.sha256(f"{self.fingerprint}\0{self.threshold!r}\0{self.means.shape}\0".encode())
        digest.update(np.ascontiguousarray(self.means).tobytes())
        digest.update(np.ascontiguousarray(self.precision).tobytes())
        return digest.hexdigest()[:32]

    @property
    def feature_dim(self) -> int:
        return int(self.means.shape[1])

    def scores(self, features: np.ndarray) -> np.ndarray:
        """N domain scores: each feature row's Mahalanobis distance to its nearest class mean."""
        return domain_scores(features, self.means, self.precision)

    def verdict(self, score: float) -> DomainVerdict:
        return DomainVerdict(float(score), self.threshold)

    def flags(self, scores: np.ndarray) -> np.ndarray:
        """True where a score is past the threshold: the face is unlike the training faces."""
        return np.asarray(scores) > self.threshold


def _features(features: np.ndarray, dim: int | None = None) -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or (dim is not None and array.shape[1] != dim):
        raise DomainGuardError(f"features must be an N×{dim or 'D'} matrix, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise DomainGuardError("features hold NaN or infinite values")
    return array


def mahalanobis_distances(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """N×M distances sqrt((x - μ_m)ᵀ P (x - μ_m)), vectorised by expanding the quadratic form."""
    x = _features(features, precision.shape[0])
    projected = x @ precision  # N×D
    squared = (
        (projected * x).sum(axis=1)[:, None]
        - 2.0 * projected @ means.T
        + ((means @ precision) * means).sum(axis=1)[None, :]
    )
    return np.sqrt(np.clip(squared, 0.0, None))  # rounding can make a zero distance slightly negative


def domain_scores(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Lee et al.'s score (as a distance, larger = less like the training faces): the minimum over classes."""
    return mahalanobis_distances(features, means, precision).min(axis=1)


def shared_gaussians(features: np.ndarray, labels: Sequence[object]) -> tuple[np.ndarray, np.ndarray, float]:
    """Class means (in sorted label order), the Ledoit–Wolf precision of the pooled within-class
    covariance, and the shrinkage intensity."""
    x = _features(features)
    names = np.asarray(labels).tolist()
    if len(names) != len(x):
        raise DomainGuardError(f"{len(x)} feature rows but {len(names)} labels")
    if len(x) < 2:
        raise DomainGuardError(f"fitting a domain guard needs at least 2 training faces, got {len(x)}")
    groups = sorted(set(names), key=str)
    group_of = {g: i for i, g in enumerate(groups)}
    members = np.array([group_of[g] for g in names])
    means = np.stack([x[members == i].mean(axis=0) for i in range(len(groups))])
    centred = x - means[members]
    estimator = LedoitWolf(assume_centered=True).fit(centred)
    return means, np.asarray(estimator.precision_, dtype=np.float64), float(estimator.shrinkage_)


def calibrated_threshold(scores: np.ndarray, percentile: float = DEFAULT_PERCENTILE) -> float:
    """The ``percentile`` of the validation scores (numpy's linear interpolation)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise DomainGuardError("calibrating a domain guard needs validation faces; the split has none")
    return float(np.percentile(scores, percentile))


def fit_domain_guard(
    train_features: np.ndarray,
    train_labels: Sequence[object],
    val_features: np.ndarray,
    fingerprint: str,
    percentile: float = DEFAULT_PERCENTILE,
    fitted_on: Mapping[str, str | int | float | None] | None = None,
) -> DomainGuard:
    """Gaussians fitted on the training faces' features, threshold calibrated on the validation faces'."""
    means, precision, shrinkage = shared_gaussians(train_features, train_labels)
    threshold = calibrated_threshold(domain_scores(val_features, means, precision), percentile)
    return DomainGuard(
        means=means,
        precision=precision,
        threshold=threshold,
        fingerprint=fingerprint,
        percentile=percentile,
        shrinkage=shrinkage,
        fitted_on={"n_train": len(train_features), "n_val": len(val_features), **(fitted_on or {})},
    )
