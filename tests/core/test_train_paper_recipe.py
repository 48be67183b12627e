"""`train --vggface2 PATH` is the authors' train.py: VGGFace2 weights with a new head, BGR 0..255 minus
the fold's BGR training mean, no std, the stem's batch norm out of the optimiser; and `train` leaves
out photos it cannot read with one warning, as `extract` does."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from core.cli import main as cli_main
from core.dataset import DatasetError, open_dataset
from core.train import (
    TrainConfig,
    TrainingConfigError,
    aligned_faces,
    initial_network,
    train_fold,
    training_faces,
    training_optimiser,
)
from models.checkpoint import load_classifier
from models.resnet import CAFFE_RESNET50, build_resnet

SIZE = 64


@pytest.fixture
def small_dataset(tmp_path):
    """Two classes, five train and two val faces of fold-1 (a last training batch of one at batch size 4)."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "metadata").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, split in enumerate(["train"] * 5 + ["val"] * 2):
        label = ("Down", "Unaffected")[i % 2]
        name = f"{label}Slide{i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "images" / name)
        rows.append(f"{name},{label},{split},20,28,44,28,32,38,22,48,42,48")
    (root / "metadata" / "partitions.csv").write_text(
        "image_name,label,fold-1,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5\n" + "\n".join(rows) + "\n"
    )
    return open_dataset(root)


def test_training_leaves_out_unreadable_photos_with_one_warning(small_dataset):
    (small_dataset.root / "images" / "DownSlide2.png").unlink()
    (small_dataset.root / "images" / "UnaffectedSlide5.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match=r"^2 photo\(s\) left out of training: DownSlide2.png .*UnaffectedSlide5"):
        usable, faces = training_faces(small_dataset, SIZE)
    assert usable.table["image_name"].to_list() == [
        f"{label}Slide{i}.png" for i, label in enumerate(["Down", "Unaffected"] * 4) if i not in (2, 5, 7)
    ]
    expected = aligned_faces(small_dataset, usable.table["image_name"].to_list(), SIZE)
    assert faces.shape == (5, SIZE, SIZE, 3) and np.array_equal(faces, expected)
    with pytest.raises(DatasetError, match="DownSlide2.png"):  # without a place for them, the first is raised
        aligned_faces(small_dataset, small_dataset.table["image_name"].to_list(), SIZE)


def test_a_dataset_whose_photos_all_fail_is_an_error_not_an_empty_training(small_dataset):
    for path in (small_dataset.root / "images").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match="no photo could be used"):
        training_faces(small_dataset, SIZE)


def test_a_readable_dataset_trains_unchanged_and_silently(small_dataset):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        usable, faces = training_faces(small_dataset, SIZE)
    assert usable is small_dataset and len(faces) == 7


def test_vggface2_recipe_options_are_checked():
    assert TrainConfig(vggface2="w.pkl").network == CAFFE_RESNET50
    assert TrainConfig().network == "resnet50" and TrainConfig(architecture="resnet18").network == "resnet18"
    with pytest.raises(TrainingConfigError, match="not both"):
        TrainConfig(vggface2="w.pkl", init="start.pt")
    with pytest.raises(TrainingConfigError, match="Caffe ResNet-50 .*not 'resnet50'"):
        TrainConfig(vggface2="w.pkl", architecture="resnet50")


@pytest.fixture(scope="module")
def vggface2_file(tmp_path_factory):
    """resnet50_ft_weight.pkl's format (torchvision names, numpy float32, no num_batches_tracked), random."""
    torch.manual_seed(0)
    network = build_resnet(CAFFE_RESNET50, 8631)
    generator = torch.Generator().manual_seed(1)
    arrays = {}
    for key, tensor in network.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        value = tensor.float()
        if key.endswith(("running_var", "bn1.weight", "bn2.weight", "bn3.weight")):
            value = 0.5 + torch.rand(tensor.shape, generator=generator)
        elif key.endswith(("running_mean", "bias")):
            value = 0.1 * torch.randn(tensor.shape, generator=generator)
        arrays[key] = value.numpy().copy()
    path = tmp_path_factory.mktemp("vggface2") / "resnet50_ft_weight.pkl"
    path.write_bytes(pickle.dumps(arrays, protocol=2))
    return path, arrays


@pytest.mark.slow
def test_the_initial_network_is_the_files_weights_with_a_new_head(vggface2_file):
    path, arrays = vggface2_file
    network = initial_network(TrainConfig(vggface2=str(path)), 2)
    state = network.state_dict()
    for key, array in arrays.items():
        if not key.startswith("fc."):
            assert torch.equal(state[key], torch.from_numpy(array)), key
    assert state["fc.weight"].shape == (2, 2048) and state["fc.bias"].shape == (2,)
    maxpool = network.maxpool
    assert isinstance(maxpool, torch.nn.MaxPool2d) and maxpool.ceil_mode  # the Caffe layout, as the file's weights


@pytest.mark.slow
def test_the_stem_batch_norm_is_in_no_parameter_group(vggface2_file):
    path, _ = vggface2_file
    config = TrainConfig(vggface2=str(path))
    network = initial_network(config, 2)
    optimiser, _ = training_optimiser(network, config, steps_per_epoch=1)
    optimised = {id(p) for group in optimiser.param_groups for p in group["params"]}
    left_out = {name for name, p in network.named_parameters() if id(p) not in optimised}
    assert left_out == {"bn1.weight", "bn1.bias"}
    rates = [group["lr"] for group in optimiser.param_groups]
    assert rates == [0.001] * 5 + [0.01]  # conv1, layer1..4, then the head at 10×, as train.py
    # Without --vggface2 every parameter is trained.
    plain = build_resnet("resnet18", 2)
    optimiser, _ = training_optimiser(plain, TrainConfig(architecture="resnet18"), steps_per_epoch=1)
    assert sum(len(g["params"]) for g in optimiser.param_groups) == len(list(plain.parameters()))


@pytest.mark.slow
def test_vggface2_training_writes_the_papers_card_and_keeps_the_stem_batch_norm(small_dataset, vggface2_file, tmp_path):
    path, arrays = vggface2_file
    config = TrainConfig(vggface2=str(path), input_size=SIZE, epochs=1, batch_size=4, seed=0)
    names = small_dataset.table["image_name"].to_list()
    faces = aligned_faces(small_dataset, names, SIZE)
    position = {n: i for i, n in enumerate(names)}
    result = train_fold(
        small_dataset, "fold-1", config, tmp_path, lambda ns: faces[[position[n] for n in ns]], log=lambda line: None
    )
    classifier = load_classifier(result.card_path)
    card = classifier.card
    assert (card.architecture, card.channel_order, card.input_scale, card.std) == (
        CAFFE_RESNET50,
        "BGR",
        255.0,
        (1.0, 1.0, 1.0),
    )
    assert card.fold == "fold-1" and card.input_size == SIZE and card.classes == ("Down", "Unaffected")
    # The BGR mean of the fold's aligned training faces, by hand: per-image channel means, averaged, reversed.
    train = [n for n in names if small_dataset.table.filter(image_name=n)["fold-1"][0] == "train"]
    per_image = np.array([faces[position[n]].reshape(-1, 3).mean(axis=0) for n in train])
    np.testing.assert_allclose(card.mean, per_image.mean(axis=0)[::-1], rtol=1e-9)
    state = classifier.network.state_dict()
    for key in ("bn1.weight", "bn1.bias"):
        assert torch.equal(state[key], torch.from_numpy(arrays[key])), key  # not in the optimiser
    assert not torch.equal(state["conv1.weight"], torch.from_numpy(arrays["conv1.weight"]))  # a step was taken
    assert not torch.equal(state["bn1.running_mean"], torch.from_numpy(arrays["bn1.running_mean"]))  # train mode


def test_table2_from_a_val_score_table_matches_hand_counts(tmp_path):
    """Imported models have no training run: Table 2 comes from their predictions in the val score table."""
    rows = []
    predictions = {  # fold -> (label, predicted) per val image
        "fold-1": [("A", "A"), ("A", "B"), ("B", "B"), ("B", "B")],
        "fold-2": [("A", "A"), ("A", "A"), ("B", "A"), ("B", "B")],
    }
    for fold, pairs in predictions.items():
        for i, (label, predicted) in enumerate(pairs):
            for method in ("Gradient", "Occlusion"):
                for region in ("eyes", "nose"):
                    rows.append(
                        (f"{label}Slide{i}{fold}.png", label, fold, f"classifier-{fold}", method, region, predicted)
                    )
    scores = pl.DataFrame(
        rows, schema=["image_name", "label", "fold", "model", "method", "region", "predicted"], orient="row"
    )
    path = tmp_path / "scores-val.parquet"
    scores.write_parquet(path)
    assert cli_main(["table2", str(path)]) == 0
    table = pl.read_csv(tmp_path / "table2.csv")
    a = table.filter(pl.col("class") == "A")
    # A: fold-1 P 1/1, R 1/2; fold-2 P 2/3, R 2/2. Means 5/6 and 3/4, population std 1/6 and 1/4.
    assert a["N"][0] == 4
    assert a["precision_mean"][0] == pytest.approx(5 / 6) and a["precision_std"][0] == pytest.approx(1 / 6)
    assert a["recall_mean"][0] == pytest.approx(3 / 4) and a["recall_std"][0] == pytest.approx(1 / 4)
    overall = table.filter(pl.col("class") == "Overall")
    assert overall["accuracy_mean"][0] == pytest.approx(0.75) and overall["accuracy_std"][0] == pytest.approx(0)
