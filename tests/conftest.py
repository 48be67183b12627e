from pathlib import Path

import numpy as np
import pytest
import torch

import core.pipeline as pipeline_module
from core.demo import DemoPreset
from core.synth import (
    DEFAULT_CLASSES,
    FaceParams,
    SyntheticSpec,
    generate_dataset,
    render_face,
    sample_face_shape,
    sample_photo,
)
from core.train import TrainConfig
from core.train_parser import ParserConfig
from models.checkpoint import ModelCard
from models.resnet import build_resnet

REPO = Path(__file__).resolve().parent.parent
# The smallest demo build: what the demo and dashboard tests build in seconds.
TINY = DemoPreset(
    n_per_class=6,
    parser_n_per_class=3,
    parser=ParserConfig(input_size=32, epochs=1, batch_size=8),
    folds=("fold-1",),
    classifier=TrainConfig(
        architecture="resnet18",
        input_size=32,
        epochs=1,
        batch_size=8,
        learning_rate=0.002,
        head_lr_factor=1.0,
        optimizer="adamw",
        schedule="one-cycle",
        seed=0,
    ),
)


def tiny_synthetic_dataset(root: Path, classes: tuple[str, ...], n_per_class: int, test_fraction: float) -> None:
    """A small synthetic dataset of ``classes`` at 96 px, one photo per person, for jobs that need folds."""
    spec = SyntheticSpec(
        n_per_class=n_per_class,
        seed=0,
        size=96,
        photos_per_person=1,
        test_fraction=test_fraction,
        classes=tuple(c for c in DEFAULT_CLASSES if c.label in classes),
    )
    generate_dataset(root, spec, workers=1)


def tiny_card(classes: tuple[str, ...] = ("A", "B", "Unaffected"), input_size: int = 32, **changes) -> ModelCard:
    """The card of the tiny test classifiers: ResNet-18, RGB in 0..1, normalised by mean 0.5 and std 0.25."""
    fields = dict(
        kind="classifier",
        architecture="resnet18",
        classes=tuple(classes),
        input_size=input_size,
        channel_order="RGB",
        input_scale=1.0,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        weights="w.safetensors",
    )
    return ModelCard(**{**fields, **changes})


def randomised_batchnorm(model: torch.nn.Module, seed: int, zero_bias: bool) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics, as a trained network has; optionally bias-free."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            c = module.num_features
            module.weight.data = 0.5 + torch.rand(c, generator=g)
            module.running_var = 0.5 + torch.rand(c, generator=g)
            if zero_bias:
                assert module.running_mean is not None
                module.bias.data.zero_()
                module.running_mean.zero_()
            else:
                module.bias.data = 0.1 * torch.randn(c, generator=g)
                module.running_mean = 0.1 * torch.randn(c, generator=g)
    if zero_bias:
        assert isinstance(model.fc, torch.nn.Linear)
        model.fc.bias.data.zero_()
    return model


def tiny_resnet(num_classes: int = 4, seed: int = 0, zero_bias: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = randomised_batchnorm(build_resnet("resnet18", num_classes), seed, zero_bias).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def small_model():
    return tiny_resnet()


@pytest.fixture(scope="session")
def small_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 32, 32, generator=g)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def counting_attributions(monkeypatch) -> list[int]:
    """Patch the attribution under ``attribution_sums``; the list collects each call's batch size."""
    calls = []
    real = pipeline_module.attribute

    def counting(model, batch, targets, method, params):
        calls.append(len(batch))
        return real(model, batch, targets, method, params)

    monkeypatch.setattr(pipeline_module, "attribute", counting)
    return calls


def face_in_a_wide_photo(width: int = 4400, left: int = 4100, seed: int = 3):
    """A rendered 160 px face at the right end of a photo over 4096 px wide (shrunk on loading), with its label
    map drawn on the photo: (face, photo, photo-sized label map, the face's landmarks in the photo)."""
    rng = np.random.default_rng(seed)
    face = render_face(FaceParams(sample_face_shape(rng), sample_photo(rng), (), 160))
    photo = np.full((160, width, 3), 120, np.uint8)
    photo[:, left : left + 160] = face.image
    label_map = np.zeros((160, width), np.uint8)
    label_map[:, left : left + 160] = face.label_map
    return face, photo, label_map, face.landmarks + [left, 0]


# The authors' own NIH-Faces metadata (MIT), beside the clone as CI checks it out; never copied into the repo.
NIH_RELEASE = REPO.parent / "shared" / "reference" / "nih-faces-release"


@pytest.fixture
def release_dataset(tmp_path) -> Path:
    """A dataset folder holding a copy of the release's metadata/ as published (no photos: the release
    only links to them). Skipped where ../shared is absent, except in CI (``CI`` set), where it fails."""
    import os
    import shutil

    if not (NIH_RELEASE / "metadata" / "partitions.csv").is_file():
        message = f"the NIH-Faces release metadata is not at {NIH_RELEASE}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    root = tmp_path / "nih-faces"
    shutil.copytree(NIH_RELEASE / "metadata", root / "metadata")
    return root


# The four annotated images the release's partitions.csv does not list (the notebooks print the same list).
RELEASE_UNLISTED = {"22q11DSSlide150.png", "KSSlide133.png", "NSSlide6.png", "WSSlide316.png"}
# The release's column names where the paper's Table 1 spells the term differently.
RELEASE_SPELLING = {
    "Upslanted palpebral fissure": "Up-slanted palpebral fissure",
    "Downslanted palpebral fissures": "Down-slanted palpebral fissures",
    "Thick lower lip vermilion": "Thick lower lip vermillion",
    "Everted lower lip vermilion": "Everted lower lip vermillion",
}


def release_hand_parse(folder: Path) -> dict[str, tuple[str, dict[str, int]]]:
    """image_name -> (label, {term: raters}) for every row of the release's annotation files, parsed with
    the csv module as nb-02-b reads them: term columns between image_name and the last (free text)."""
    import csv

    parsed = {}
    for path in sorted(folder.glob("*.csv")):
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        header = rows[0]
        assert header[:2] == ["image_num", "image_name"]
        for row in rows[1:]:
            cells = {
                RELEASE_SPELLING.get(name, name): row[k].strip()
                for k, name in enumerate(header)
                if 2 <= k < len(header) - 1
            }
            parsed[row[1]] = (path.stem, {term: int(cell[:-1]) if cell else 0 for term, cell in cells.items()})
    return parsed
