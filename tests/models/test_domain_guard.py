"""Penultimate features of the tiny classifiers, and the guard file beside a card: round trip, refused
for other weights, hostile files refused with clear messages."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from core.domain import DomainGuard, DomainGuardError
from models.checkpoint import load_classifier, save_checkpoint
from models.domain_guard import guard_path, max_guard_bytes, penultimate_features, save_domain_guard
from tests.conftest import tiny_card, tiny_resnet


def test_features_are_what_the_head_reads(small_model, small_batch):
    features = penultimate_features(small_model, small_batch, batch_size=2)
    m = small_model
    with torch.no_grad():
        x = m.maxpool(m.relu(m.bn1(m.conv1(small_batch))))
        pooled = torch.flatten(m.avgpool(m.layer4(m.layer3(m.layer2(m.layer1(x))))), 1)
        logits = m(small_batch)
    assert features.shape == (3, 512) and features.dtype == np.float64
    np.testing.assert_allclose(features, pooled.double().numpy(), rtol=1e-4, atol=1e-5)  # batches of 2 vs 3
    np.testing.assert_allclose(m.fc(torch.tensor(features, dtype=torch.float32)), logits, rtol=1e-4, atol=1e-5)
    assert not m.fc._forward_hooks  # the hook is gone afterwards


@pytest.fixture
def card_path(tmp_path):
    return save_checkpoint(tiny_resnet(num_classes=3), tiny_card(), tmp_path, "classifier-fold-1")


def guard_for(fingerprint: str, dim: int = 512, groups: int = 3) -> DomainGuard:
    rng = np.random.default_rng(0)
    return DomainGuard(
        means=rng.normal(size=(groups, dim)),
        precision=np.eye(dim) * 2.0,
        threshold=12.5,
        fingerprint=fingerprint,
        shrinkage=0.25,
        fitted_on={"fold": "fold-1", "n_train": 10},
    )


def test_guard_round_trip_beside_the_card(card_path):
    assert guard_path(card_path).name == "classifier-fold-1.domain.safetensors"
    assert load_classifier(card_path).domain is None
    fingerprint = load_classifier(card_path).fingerprint
    guard = guard_for(fingerprint)
    save_domain_guard(guard, card_path)
    loaded = load_classifier(card_path).domain
    assert loaded is not None
    np.testing.assert_array_equal(loaded.means, guard.means)
    np.testing.assert_array_equal(loaded.precision, guard.precision)
    assert (loaded.threshold, loaded.shrinkage, loaded.fingerprint) == (12.5, 0.25, fingerprint)
    assert dict(loaded.fitted_on) == {"fold": "fold-1", "n_train": 10}


def test_guard_for_other_weights_is_refused(card_path, tmp_path):
    other = save_checkpoint(tiny_resnet(num_classes=3, seed=5), tiny_card(), tmp_path / "other", "m")
    save_domain_guard(guard_for(load_classifier(other).fingerprint), card_path)
    with pytest.raises(DomainGuardError, match="other weights"):
        load_classifier(card_path)
    assert load_classifier(card_path, domain=False).domain is None  # fitting a new guard can still load it


def hostile(path, tensors, **metadata):
    save_file(tensors, str(path), metadata={k: str(v) for k, v in metadata.items()})


@pytest.mark.parametrize(
    "case, message",
    [
        ("garbage", "cannot be read as safetensors"),
        ("nan", "NaN or infinite"),
        ("wrong_dim", "penultimate features"),
        ("float32", "float64"),
        ("extra_tensor", "holds tensors"),
        ("no_format", "format"),
        ("bad_threshold", "finite number"),
        ("nested_note", "flat JSON"),
        ("oversized", "more than a guard"),
    ],
)
def test_hostile_guard_files_are_refused(card_path, case, message):
    fingerprint = load_classifier(card_path).fingerprint
    path = guard_path(card_path)
    meta = dict(format="1", fingerprint=fingerprint, threshold=1.0, percentile=99.0, shrinkage=0.1, fitted_on="{}")
    means, precision = np.zeros((3, 512)), np.eye(512)
    if case == "garbage":
        path.write_bytes(b"\x00\xff" * 100)
    elif case == "nan":
        hostile(path, {"means": np.full((3, 512), np.nan), "precision": precision}, **meta)
    elif case == "wrong_dim":
        hostile(path, {"means": np.zeros((3, 64)), "precision": np.eye(64)}, **meta)
    elif case == "float32":
        hostile(path, {"means": means.astype(np.float32), "precision": precision}, **meta)
    elif case == "extra_tensor":
        hostile(path, {"means": means, "precision": precision, "code": np.zeros(1)}, **meta)
    elif case == "no_format":
        hostile(path, {"means": means, "precision": precision}, **{**meta, "format": "9"})
    elif case == "bad_threshold":
        hostile(path, {"means": means, "precision": precision}, **{**meta, "threshold": "nan"})
    elif case == "nested_note":
        hostile(path, {"means": means, "precision": precision}, **{**meta, "fitted_on": json.dumps({"a": [1]})})
    elif case == "oversized":
        with open(path, "wb") as handle:
            handle.truncate(max_guard_bytes(512) + 1)  # sparse: nothing is written or read
    with pytest.raises(DomainGuardError, match=message):
        load_classifier(card_path)
