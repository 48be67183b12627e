"""What the extraction benchmarks share: a synthetic dataset of every class at 224 px and a random classifier card."""

from __future__ import annotations

from pathlib import Path

from core.synth.classes import DEFAULT_CLASSES
from core.synth.dataset import SyntheticSpec, generate_dataset
from models.checkpoint import ModelCard

CLASSES = tuple(c.label for c in DEFAULT_CLASSES)


def synthetic_photos(root: Path, per_class: int) -> None:
    """``per_class`` photos of each class, 224 × 224, one per person, seed 0."""
    generate_dataset(root, SyntheticSpec(n_per_class=per_class, seed=0, size=224, photos_per_person=1), workers=1)


def random_classifier_card(architecture: str, input_size: int) -> ModelCard:
    """The card of an untrained classifier of every class (speed does not depend on the weights)."""
    return ModelCard(
        kind="classifier",
        architecture=architecture,
        classes=CLASSES,
        input_size=input_size,
        channel_order="RGB",
        input_scale=1.0,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        weights="w",
        fold="fold-1",
    )
