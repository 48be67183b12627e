"""The out-of-domain guard's science: Mahalanobis distances against scipy, the threshold against numpy,
Ledoit–Wolf against scikit-learn, and planted far-away points flagged."""

from typing import Any

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis
from sklearn.covariance import LedoitWolf

from core.domain import (
    DomainGuard,
    DomainGuardError,
    calibrated_threshold,
    domain_scores,
    fit_domain_guard,
    mahalanobis_distances,
    shared_gaussians,
)


def planted(rng, n_per_class=200, dim=8, separation=6.0):
    """Three Gaussian classes sharing one random covariance, means ``separation`` apart: training
    features, their labels, the planted means and covariance, and a sampler of fresh faces like them."""
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    means = rng.normal(size=(3, dim)) * separation

    def sample(n: int) -> np.ndarray:
        return means[rng.integers(0, 3, n)] + rng.normal(size=(n, dim)) @ mixing.T

    labels = np.repeat(["a", "b", "c"], n_per_class)
    features = means[np.repeat(np.arange(3), n_per_class)] + rng.normal(size=(3 * n_per_class, dim)) @ mixing.T
    return features, labels, means, sample


def test_distances_match_scipy(rng):
    features = rng.normal(size=(7, 5))
    means = rng.normal(size=(3, 5))
    a = rng.normal(size=(5, 5))
    precision = np.linalg.inv(a @ a.T + np.eye(5))
    distances = mahalanobis_distances(features, means, precision)
    expected = np.array([[mahalanobis(x, m, precision) for m in means] for x in features])
    np.testing.assert_allclose(distances, expected, rtol=1e-10)
    np.testing.assert_allclose(domain_scores(features, means, precision), expected.min(axis=1), rtol=1e-10)


def test_distance_to_a_mean_itself_is_zero(rng):
    means = rng.normal(size=(2, 4)) * 100
    assert np.all(mahalanobis_distances(means, means, np.eye(4)).diagonal() == 0)


def test_threshold_is_numpys_percentile(rng):
    scores = rng.gamma(2.0, size=501)
    assert calibrated_threshold(scores, 99.0) == np.percentile(scores, 99.0)
    assert calibrated_threshold(scores, 50.0) == np.median(scores)
    with pytest.raises(DomainGuardError, match="validation faces"):
        calibrated_threshold(np.array([]))


def test_shared_gaussians_are_ledoit_wolf_of_the_pooled_within_class_scatter(rng):
    features, labels, true_means, _ = planted(rng)
    means, precision, shrinkage = shared_gaussians(features, labels)
    np.testing.assert_allclose(means, [features[labels == c].mean(axis=0) for c in "abc"])
    centred = features - means[np.searchsorted(["a", "b", "c"], labels)]
    reference = LedoitWolf(assume_centered=True).fit(centred)
    np.testing.assert_allclose(precision, reference.precision_)
    assert shrinkage == pytest.approx(reference.shrinkage_)
    np.testing.assert_allclose(means, true_means, atol=0.3)  # 200 draws per class find the planted means


def test_planted_guard_flags_about_one_percent_of_like_faces_and_all_far_ones(rng):
    features, labels, means, sample = planted(rng, n_per_class=400)
    val = sample(1200)
    guard = fit_domain_guard(features, labels, val, "fingerprint")
    val_scores = guard.scores(val)
    assert guard.threshold == np.percentile(val_scores, 99.0)
    assert guard.flags(val_scores).mean() == pytest.approx(0.01, abs=0.002)
    # Fresh draws of the same distribution: false alarms stay near the 1% the 99th percentile promises.
    assert 0.002 < guard.flags(guard.scores(sample(3000))).mean() < 0.03
    far = means[0] + 50.0 * rng.normal(size=(20, 8))
    assert guard.flags(guard.scores(far)).all()
    assert guard.fitted_on["n_train"] == 1200 and guard.fitted_on["n_val"] == 1200


def test_guard_refuses_broken_numbers(rng):
    good: dict[str, Any] = dict(means=np.zeros((2, 3)), precision=np.eye(3), threshold=1.0, fingerprint="f")
    DomainGuard(**good)
    changes: list[tuple[dict[str, Any], str]] = [
        ({"precision": np.eye(4)}, "3×3"),
        ({"means": np.full((2, 3), np.nan)}, "NaN"),
        ({"threshold": float("inf")}, "finite"),
        ({"threshold": -1.0}, "out of range"),
        ({"fingerprint": ""}, "fingerprint"),
        ({"means": np.zeros(3)}, "M×D"),
    ]
    for change, message in changes:
        with pytest.raises(DomainGuardError, match=message):
            DomainGuard(**{**good, **change})
    with pytest.raises(DomainGuardError, match="N×3"):
        DomainGuard(**good).scores(np.zeros((2, 4)))
