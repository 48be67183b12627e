import json
import os
import pickle
import shlex

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from core.errors import ModelError
from models.checkpoint import (
    ModelCard,
    classify,
    load_classifier,
    load_state_dict_file,
    model_fingerprint,
    preprocess,
    save_checkpoint,
)
from models.parser import LAPA_LABELS, build_face_parser, load_face_parser, predict_label_maps, save_face_parser
from models.resnet import CAFFE_RESNET50, build_resnet
from models.vggface2 import VGGFACE2_MEAN_BGR, vggface2_card, vggface2_state_dict

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def classifier_card(**changes) -> ModelCard:
    fields = dict(
        kind="classifier",
        architecture="resnet18",
        classes=("a", "b", "c"),
        input_size=32,
        channel_order="RGB",
        input_scale=1.0,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        weights="w.safetensors",
        fold="fold-1",
        training_data_hash="abc",
        notes="test",
    )
    return ModelCard(**{**fields, **changes})


def parser_card(**changes) -> ModelCard:
    return classifier_card(
        **{"kind": "face_parser", "architecture": "unet-resnet18", "classes": LAPA_LABELS, "input_size": 64, **changes}
    )


def randomise_batchnorm(network: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial running statistics, so eval-mode BatchNorm is not an identity."""
    generator = torch.Generator().manual_seed(0)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
    return network.eval()


def write_card(path, card_fields: dict) -> None:
    path.write_text(json.dumps(card_fields), encoding="utf-8")


class MarkerPayload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def assert_payload_is_live(payload: bytes, marker) -> None:
    """The malicious pickle really creates the marker when unpickled unsafely (then clean up)."""
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()


# --- model cards -------------------------------------------------------------------------------


def test_card_round_trips_through_json_text_and_file(tmp_path):
    card = classifier_card()
    assert ModelCard.from_json(card.to_json()) == card
    (tmp_path / "card.json").write_text(card.to_json(), encoding="utf-8")
    assert ModelCard.from_json(tmp_path / "card.json") == card
    assert ModelCard.from_json(str(tmp_path / "card.json")) == card


def test_card_canonicalises_json_lists_and_ints():
    card = classifier_card(classes=["a", "b"], mean=[0, 0, 0], std=[1, 1, 1], input_scale=255)
    assert card.classes == ("a", "b") and card.mean == (0.0, 0.0, 0.0) and card.input_scale == 255.0
    assert isinstance(card.input_scale, float) and hash(card)
    from_numpy = classifier_card(
        input_size=np.int64(32), mean=np.array([0.1, 0.2, 0.3], np.float32).tolist(), std=tuple(np.ones(3, np.float32))
    )
    assert type(from_numpy.input_size) is int and from_numpy.std == (1.0, 1.0, 1.0)
    assert ModelCard.from_json(from_numpy.to_json()) == from_numpy


def test_card_optional_fields_default():
    fields = json.loads(classifier_card().to_json())
    for optional in ("fold", "training_data_hash", "notes"):
        del fields[optional]
    card = ModelCard.from_json(json.dumps(fields))
    assert (card.fold, card.training_data_hash, card.notes) == (None, None, "")


@pytest.mark.parametrize(
    "change, words",
    [
        ({"mean": None}, ["missing field", "mean"]),
        ({"colour": "RGB"}, ["unknown field", "colour"]),
        ({"architecture": "vgg16"}, ["architecture", "vgg16", "resnet50"]),
        ({"kind": "detector"}, ["kind", "detector"]),
        ({"mean": [1, 2, 3, 4]}, ["mean", "3 numbers"]),
        ({"std": [1, 0, 1]}, ["std", "positive"]),
        ({"std": ["1", 1, 1]}, ["std", "3 numbers"]),
        ({"input_size": 22.5}, ["input_size", "integer"]),
        ({"input_size": True}, ["input_size"]),
        ({"channel_order": "rgb"}, ["channel_order"]),
        ({"classes": "abc"}, ["classes"]),
        ({"classes": ["a", "a"]}, ["classes", "twice"]),
        ({"weights": 3}, ["weights"]),
        ({"fold": 1}, ["fold"]),
        ({"kind": "face_parser", "architecture": "resnet18"}, ["architecture", "unet-"]),
    ],
)
def test_bad_card_names_path_and_field(tmp_path, change, words):
    fields = {**json.loads(classifier_card().to_json()), **change}
    fields = {key: value for key, value in fields.items() if value is not None}
    path = tmp_path / "bad_card.json"
    write_card(path, fields)
    with pytest.raises(ModelError) as raised:
        ModelCard.from_json(path)
    message = str(raised.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_unreadable_card_files(tmp_path):
    with pytest.raises(ModelError, match="cannot be read"):
        ModelCard.from_json(tmp_path / "absent.json")
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelError, match="not valid JSON"):
        ModelCard.from_json(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ModelError, match="JSON object"):
        ModelCard.from_json(tmp_path / "list.json")


# --- preprocessing -----------------------------------------------------------------------------


def test_preprocess_vggface2_bgr_by_hand():
    image = np.zeros((1, 224, 224, 3), np.uint8)
    image[0, 5, 7] = (200, 100, 50)  # R, G, B
    batch = preprocess(image, vggface2_card(["a", "b"], "w.safetensors"))
    assert batch.shape == (1, 3, 224, 224) and batch.dtype == torch.float32
    # BGR order, 0..255 scale, minus the BGR mean, std 1.
    expected = [50 - 91.4953, 100 - 103.8827, 200 - 131.0912]
    np.testing.assert_allclose(batch[0, :, 5, 7].numpy(), expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(batch[0, :, 0, 0].numpy(), [-91.4953, -103.8827, -131.0912], atol=1e-4)


def test_preprocess_rgb_unit_scale_by_hand():
    image = np.full((2, 32, 32, 3), (255, 0, 51), np.uint8)
    batch = preprocess(image, classifier_card())
    expected = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (0.2 - 0.406) / 0.225]
    np.testing.assert_allclose(batch[1, :, 31, 0].numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize(
    "images",
    [
        np.zeros((1, 64, 64, 3), np.uint8),  # not the card's size
        np.zeros((1, 32, 32, 3), np.float32),  # not uint8
        np.zeros((32, 32, 3), np.uint8),  # no batch axis
    ],
)
def test_preprocess_refuses_wrong_input(images):
    with pytest.raises(ValueError):
        preprocess(images, classifier_card())


# --- fingerprints ------------------------------------------------------------------------------


def test_fingerprint_ignores_order_and_identity_but_not_values():
    state = build_resnet("resnet18", 3).state_dict()
    reordered_copy = {key: state[key].clone() for key in reversed(list(state))}
    assert model_fingerprint(reordered_copy) == model_fingerprint(state)
    reordered_copy["layer3.1.conv2.weight"][0, 0, 0, 0] += 1e-3
    assert model_fingerprint(reordered_copy) != model_fingerprint(state)
    as_double = {key: value.double() for key, value in state.items()}
    assert model_fingerprint(as_double) != model_fingerprint(state)


# --- checkpoints -------------------------------------------------------------------------------


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    network = randomise_batchnorm(build_resnet("resnet18", 3))
    card_path = save_checkpoint(network, classifier_card(weights="ignored"), tmp_path / "models", "fold-1")
    assert card_path == tmp_path / "models" / "fold-1.json"
    assert (tmp_path / "models" / "fold-1.safetensors").is_file()
    classifier = load_classifier(card_path)
    assert classifier.card == classifier_card(weights="fold-1.safetensors")
    assert not classifier.network.training
    assert not any(parameter.requires_grad for parameter in classifier.network.parameters())
    batch = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(classifier.network(batch), network(batch))
    probabilities, predicted = classify(classifier, batch)
    assert probabilities.shape == (2, 3) and predicted.shape == (2,)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-6)
    np.testing.assert_array_equal(predicted, probabilities.argmax(axis=1))
    assert load_classifier(card_path).fingerprint == classifier.fingerprint


def test_fingerprint_of_loaded_model_follows_card_fields_that_change_outputs(tmp_path):
    network = build_resnet("resnet18", 3)
    first = load_classifier(save_checkpoint(network, classifier_card(), tmp_path, "a"))
    renamed_fold = load_classifier(save_checkpoint(network, classifier_card(fold="fold-2", notes="x"), tmp_path, "b"))
    other_mean = load_classifier(save_checkpoint(network, classifier_card(mean=(0.5, 0.5, 0.5)), tmp_path, "c"))
    assert renamed_fold.fingerprint == first.fingerprint
    assert other_mean.fingerprint != first.fingerprint


def test_card_with_wrong_class_count_is_refused(tmp_path):
    network = build_resnet("resnet18", 10)
    card_path = save_checkpoint(network, classifier_card(classes=tuple("abcdefghij")), tmp_path, "m")
    fields = json.loads(card_path.read_text(encoding="utf-8"))
    fields["classes"] = list("abcdefghijkl")
    write_card(card_path, fields)
    with pytest.raises(ModelError, match="card lists 12 classes but fc.weight has 10 rows"):
        load_classifier(card_path)


def test_card_with_wrong_architecture_is_refused(tmp_path):
    card_path = save_checkpoint(build_resnet("resnet18", 3), classifier_card(architecture="resnet34"), tmp_path, "m")
    with pytest.raises(ModelError, match=r"does not fit the card's architecture 'resnet34': \d+ missing keys"):
        load_classifier(card_path)


def test_card_of_other_kind_and_missing_weights(tmp_path):
    card_path = save_checkpoint(build_resnet("resnet18", 3), classifier_card(), tmp_path, "m")
    with pytest.raises(ModelError, match="describes a classifier, but a face_parser is needed"):
        load_face_parser(card_path)
    (tmp_path / "m.safetensors").unlink()
    with pytest.raises(ModelError, match=r"weights file \(the card's 'weights' field\) .* cannot be read"):
        load_classifier(card_path)


def test_torch_files_load_plain_and_wrapped(tmp_path):
    state = build_resnet("resnet18", 3).state_dict()
    for name, content in [
        ("plain.pt", state),
        ("wrapped.pth", {"state_dict": state, "epoch": 3}),
        ("model.bin", {"model": state}),
    ]:
        torch.save(content, tmp_path / name)
        assert model_fingerprint(load_state_dict_file(tmp_path / name)) == model_fingerprint(state)
    torch.save({"epoch": 3}, tmp_path / "no_tensors.pt")
    with pytest.raises(ModelError, match="not a state dict"):
        load_state_dict_file(tmp_path / "no_tensors.pt")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ModelError, match="unknown type"):
        load_state_dict_file(tmp_path / "weights.npz")
    (tmp_path / "broken.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="cannot read"):
        load_state_dict_file(tmp_path / "broken.safetensors")


SYSTEM_REFUSED = r"refused to load .*(posix|nt)\.system"
# writer -> the refusal. A raw pickle stores tensors through a global torch also refuses, and
# torch's unpickler rejects protocol-5 framing outright; either way it stops before the payload.
TORCH_PICKLE_WRITERS = {
    "zip": (lambda obj, path: torch.save(obj, path), SYSTEM_REFUSED),
    "legacy": (lambda obj, path: torch.save(obj, path, _use_new_zipfile_serialization=False), SYSTEM_REFUSED),
    "raw pickle, protocol 2": (
        lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=2)),
        "refused to load .*torch.storage._load_from_bytes",
    ),
    "raw pickle, protocol 5": (
        lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=5)),
        "cannot read .*nothing in it was run",
    ),
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", TORCH_PICKLE_WRITERS)
def test_malicious_torch_pickle_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "pwned"
    payload = {"fc.weight": torch.zeros(2, 2), "fc.bias": MarkerPayload(marker)}
    assert_payload_is_live(pickle.dumps(payload), marker)
    path = tmp_path / "evil.pt"
    write, refusal = TORCH_PICKLE_WRITERS[writer]
    write(payload, path)
    with pytest.raises(ModelError, match=refusal):
        load_state_dict_file(path)
    assert not marker.exists()


# --- torchvision and Caffe layouts -------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["resnet18", "resnet50"])
def test_torchvision_weights_load_with_no_missing_keys_and_equal_outputs(architecture):
    torch.manual_seed(0)
    reference = randomise_batchnorm(getattr(torchvision.models, architecture)(weights=None, num_classes=5))
    network = build_resnet(architecture, 5).eval()
    result = network.load_state_dict(reference.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    batch = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(network(batch), reference(batch), rtol=1e-5, atol=1e-5)


def caffe_resnet50_forward(state: dict, x: torch.Tensor) -> torch.Tensor:
    """ResNet-50 as in Caffe's prototxt (and VGGFace2-pytorch): stride-2 in each stage's first 1×1
    convolution and its projection, 3×3/2 max-pool without padding, rounding up."""

    def batch_norm(x, name):
        return F.batch_norm(
            x,
            state[f"{name}.running_mean"],
            state[f"{name}.running_var"],
            state[f"{name}.weight"],
            state[f"{name}.bias"],
            training=False,
            eps=1e-5,
        )

    x = F.relu(batch_norm(F.conv2d(x, state["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        for block in range(blocks):
            name = f"layer{stage}.{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            out = F.relu(batch_norm(F.conv2d(x, state[f"{name}.conv1.weight"], stride=stride), f"{name}.bn1"))
            out = F.relu(batch_norm(F.conv2d(out, state[f"{name}.conv2.weight"], padding=1), f"{name}.bn2"))
            out = batch_norm(F.conv2d(out, state[f"{name}.conv3.weight"]), f"{name}.bn3")
            if block == 0:
                x = batch_norm(F.conv2d(x, state[f"{name}.downsample.0.weight"], stride=stride), f"{name}.downsample.1")
            x = F.relu(out + x)
    return F.linear(x.mean(dim=(2, 3)), state["fc.weight"], state["fc.bias"])


def test_caffe_layout_matches_hand_written_caffe_resnet50():
    torch.manual_seed(0)
    network = randomise_batchnorm(build_resnet(CAFFE_RESNET50, 4))
    state = network.state_dict()
    torchvision_layout = build_resnet("resnet50", 4).eval()
    torchvision_layout.load_state_dict(state, strict=True)  # same keys and shapes...
    batch = torch.rand(2, 3, 67, 67)  # odd size: padding and rounding of the max-pool matter
    with torch.no_grad():
        torch.testing.assert_close(network(batch), caffe_resnet50_forward(state, batch), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(torchvision_layout(batch), network(batch), atol=1e-3)  # ...other network


# --- VGGFace2 ----------------------------------------------------------------------------------


def write_fake_vggface2_pickle(path, state_dict) -> None:
    """The released file's format: torchvision names, numpy float32 arrays, no num_batches_tracked."""
    arrays = {key: value.numpy().copy() for key, value in state_dict.items() if not key.endswith("num_batches_tracked")}
    path.write_bytes(pickle.dumps(arrays, protocol=2))


@pytest.mark.slow
def test_vggface2_pickle_imports_strictly_with_equal_outputs(tmp_path):
    torch.manual_seed(0)
    reference = randomise_batchnorm(torchvision.models.resnet50(weights=None, num_classes=8631))
    path = tmp_path / "resnet50_ft_weight.pkl"
    write_fake_vggface2_pickle(path, reference.state_dict())
    state = vggface2_state_dict(path)
    network = build_resnet("resnet50", 8631).eval()
    result = network.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    batch = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(network(batch), reference(batch), rtol=1e-5, atol=1e-5)
    caffe = build_resnet(CAFFE_RESNET50, 8631).eval()
    caffe.load_state_dict(state, strict=True)

    new_head = vggface2_state_dict(path, num_classes=12)
    assert new_head["fc.weight"].shape == (12, 2048) and new_head["fc.bias"].shape == (12,)
    build_resnet(CAFFE_RESNET50, 12).load_state_dict(new_head, strict=True)
    assert torch.equal(new_head["layer4.2.conv3.weight"], reference.state_dict()["layer4.2.conv3.weight"])


def test_vggface2_pickle_with_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(
        {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32), "fc.bias": MarkerPayload(marker)}, protocol=2
    )
    assert_payload_is_live(payload, marker)
    path = tmp_path / "resnet50_ft_weight.pkl"
    path.write_bytes(payload)
    with pytest.raises(ModelError, match=r"refused to load .*(posix|os)\.system"):
        vggface2_state_dict(path)
    assert not marker.exists()


def test_vggface2_pickle_of_other_network_is_refused(tmp_path):
    path = tmp_path / "resnet18.pkl"
    write_fake_vggface2_pickle(path, build_resnet("resnet18", 8631).state_dict())
    with pytest.raises(ModelError, match="not the VGGFace2 ResNet-50 weight file.*missing"):
        vggface2_state_dict(path)


def test_vggface2_card_preprocessing():
    card = vggface2_card(["Down", "Unaffected"], "fold-1.safetensors", fold="fold-1")
    assert (card.architecture, card.channel_order, card.input_scale, card.input_size) == (
        CAFFE_RESNET50,
        "BGR",
        255.0,
        224,
    )
    assert card.mean == VGGFACE2_MEAN_BGR and card.std == (1.0, 1.0, 1.0)


# --- face parser -------------------------------------------------------------------------------


def random_faces(count, height, width, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def parser_card_path(tmp_path_factory):
    torch.manual_seed(0)
    network = randomise_batchnorm(build_face_parser("resnet18"))
    return save_face_parser(network, parser_card(), tmp_path_factory.mktemp("parser"), "parser")


@pytest.mark.parametrize("size", [32, 64, 224])
def test_unet_runs_offline_at_sizes_divisible_by_32(size):
    with torch.no_grad():
        logits = build_face_parser("resnet18").eval()(torch.rand(1, 3, size, size))
    assert logits.shape == (1, len(LAPA_LABELS), size, size)


def test_parser_round_trip_and_prediction_at_input_size(parser_card_path):
    parser = load_face_parser(parser_card_path)
    assert parser.card.architecture == "unet-resnet18" and not parser.network.training
    images = random_faces(3, 64, 64)
    label_maps = predict_label_maps(parser, images, batch_size=2)
    assert label_maps.shape == (3, 64, 64) and label_maps.dtype == np.uint8
    with torch.no_grad():
        expected = parser.network(preprocess(images, parser.card)).argmax(dim=1).numpy()
    np.testing.assert_array_equal(label_maps, expected)
    assert len(np.unique(label_maps)) > 1  # the checks below are not vacuous


@pytest.mark.parametrize("height, width", [(100, 100), (50, 70)])
def test_parser_resizes_image_in_and_labels_out_without_new_labels(parser_card_path, height, width):
    parser = load_face_parser(parser_card_path)
    low_res_batches: list[torch.Tensor] = []
    hook = parser.network.register_forward_hook(lambda module, inputs, output: low_res_batches.append(output.argmax(1)))
    try:
        label_maps = predict_label_maps(parser, random_faces(3, height, width, seed=1), batch_size=2)
    finally:
        hook.remove()
    assert label_maps.shape == (3, height, width) and label_maps.dtype == np.uint8
    assert label_maps.max() < len(LAPA_LABELS)
    low_res = torch.cat(low_res_batches).numpy()
    assert low_res.shape == (3, 64, 64)
    for label_map, low_res_map in zip(label_maps, low_res):
        assert set(np.unique(label_map)) <= set(np.unique(low_res_map))


def test_parser_card_must_list_lapa_classes(tmp_path):
    card_path = save_face_parser(
        build_face_parser("resnet18", classes=3), parser_card(classes=("a", "b", "c")), tmp_path, "p"
    )
    with pytest.raises(ModelError, match="11 LaPa classes"):
        load_face_parser(card_path)
    fields = {**json.loads(parser_card().to_json()), "architecture": "unet-nosuchnet", "weights": "p.safetensors"}
    write_card(tmp_path / "q.json", fields)
    with pytest.raises(ModelError, match="unknown face-parser encoder 'nosuchnet'"):
        load_face_parser(tmp_path / "q.json")


def test_save_face_parser_needs_parser_card(tmp_path):
    with pytest.raises(ModelError, match="face_parser card"):
        save_face_parser(build_face_parser("resnet18"), classifier_card(), tmp_path, "p")
