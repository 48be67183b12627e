"""Untrusted model files: code in a pickle never runs, a card that does not fit its weights and
weights that are not numbers are refused with a message.

Extends tests/test_models.py, which covers the basic cases (os.system in zip, legacy and raw torch
pickles and in the VGGFace2 file; a card with the wrong class count or architecture).
"""

from __future__ import annotations

import builtins
import os
import pickle
import shutil
import struct
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from core.errors import ModelError
from models.checkpoint import ModelCard, load_classifier, load_state_dict_file, save_checkpoint
from models.parser import load_face_parser
from models.vggface2 import vggface2_state_dict
from tests.conftest import tiny_card, tiny_resnet


class Runs:
    """Unpickling this calls ``function(*arguments)``; every variant below would create ``marker``."""

    def __init__(self, function, *arguments):
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return self.function, self.arguments


def payloads(marker) -> dict[str, object]:
    touch = f"open({str(marker)!r}, 'w').close()"
    return {
        "builtins.exec": Runs(builtins.exec, touch),
        "builtins.eval": Runs(builtins.eval, touch.replace("open(", "__import__('builtins').open(")),
        "subprocess.call": Runs(subprocess.call, ["touch", str(marker)]),
        "shutil.copyfile": Runs(shutil.copyfile, "/dev/null", str(marker)),  # writes a file, runs no program
    }


def assert_live(obj, marker) -> None:
    """Unpickled without restrictions, the payload really acts (then the marker is removed)."""
    pickle.loads(pickle.dumps(obj, protocol=2))
    assert marker.exists()
    marker.unlink()


# ---------------------------------------------------------------- code in pickles never runs


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("payload", ["builtins.exec", "builtins.eval", "subprocess.call", "shutil.copyfile"])
@pytest.mark.parametrize("where", ["top level", "nested in state_dict", "inside a list"])
def test_torch_checkpoints_with_code_are_refused_without_running_it(tmp_path, payload, where):
    marker = tmp_path / "ran"
    evil = payloads(marker)[payload]
    assert_live(evil, marker)
    tensors = {"fc.weight": torch.zeros(2, 2)}
    content = {
        "top level": {**tensors, "fc.bias": evil},
        "nested in state_dict": {"state_dict": {**tensors, "fc.bias": evil}, "epoch": 1},
        "inside a list": {**tensors, "extra": [torch.ones(1), evil]},
    }[where]
    path = tmp_path / "model.pt"
    torch.save(content, path)
    with pytest.raises(ModelError, match="refused to load .* unpickling it could run code"):
        load_state_dict_file(path)
    assert not marker.exists()


def test_a_pickle_named_safetensors_is_not_unpickled(tmp_path):
    marker = tmp_path / "ran"
    evil = payloads(marker)["builtins.exec"]
    assert_live(evil, marker)
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"w": evil}))
    with pytest.raises(ModelError, match="cannot read .* as safetensors"):
        load_state_dict_file(path)
    assert not marker.exists()


@pytest.mark.parametrize("payload", ["builtins.exec", "builtins.eval", "subprocess.call", "shutil.copyfile"])
@pytest.mark.parametrize("where", ["dict value", "inside an object array", "dict key"])
def test_vggface2_pickles_with_code_are_refused_without_running_it(tmp_path, payload, where):
    marker = tmp_path / "ran"
    evil = payloads(marker)[payload]
    assert_live(evil, marker)
    weights: dict[object, object] = {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}
    content = {
        "dict value": {**weights, "fc.bias": evil},
        "inside an object array": {**weights, "fc.bias": np.array([1.0, evil], dtype=object)},
        "dict key": {**weights, evil: np.zeros(3, np.float32)},
    }[where]
    path = tmp_path / "resnet50_ft_weight.pkl"
    path.write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(ModelError, match=r"refused to load .* asks to unpickle \w+\.\w+"):
        vggface2_state_dict(path)
    assert not marker.exists()


# ---------------------------------------------------------------- the VGGFace2 importer takes arrays only


@pytest.mark.parametrize(
    "content",
    [
        {"conv1.weight": "a string"},
        {"conv1.weight": 3.0},
        {"conv1.weight": [0.0, 1.0]},
        {"conv1.weight": b"\x00" * 16},
        {"conv1.weight": None},
        {"conv1": {"weight": np.zeros(3, np.float32)}},
        {"conv1.weight": np.array(["a", "b"], dtype=object)},
        {"conv1.weight": np.array(["a", "b"])},
        {"conv1.weight": np.zeros(3, bool)},
        {"conv1.weight": np.zeros(3, complex)},
        {1: np.zeros(3, np.float32)},
        [np.zeros(3, np.float32)],
        np.zeros(3, np.float32),
    ],
    ids=[
        "str",
        "float",
        "list",
        "bytes",
        "None",
        "nested dict",
        "object array",
        "string array",
        "bool array",
        "complex array",
        "int key",
        "top-level list",
        "top-level array",
    ],
)
def test_vggface2_importer_refuses_anything_but_named_numeric_arrays(tmp_path, content):
    path = tmp_path / "weights.pkl"
    path.write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(ModelError, match="expected a dict of layer names to numeric arrays"):
        vggface2_state_dict(path)


def test_vggface2_importer_survives_length_bombs_and_truncation(tmp_path):
    """Length fields far beyond the file (1 TB, 4 GB), an array whose shape does not fit its bytes,
    and a real pickle cut short: each is a ModelError, none allocates what it declares."""
    reduced = np.zeros(4, np.float32).__reduce__()
    assert isinstance(reduced, tuple)
    reconstruct, args, _ = reduced

    class ShapeBomb:
        def __reduce__(self):
            return reconstruct, args, (1, (10**10,), np.dtype(np.float32), False, b"\x00" * 16)

    real = pickle.dumps({"conv1.weight": np.arange(1000, dtype=np.float32)}, protocol=2)
    files = {
        "binbytes8-1TB": b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"abc",
        "binbytes8-4GB": b"\x80\x04\x8e" + struct.pack("<Q", 2**32) + b"abc",
        "binunicode8-8GB": b"\x80\x04\x8d" + struct.pack("<Q", 2**33) + b"abc",
        "shape-bomb": pickle.dumps({"a": ShapeBomb()}, protocol=2),
        **{f"cut-{k}": real[: len(real) * k // 6] for k in range(1, 6)},
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ModelError, match="cannot read .* as VGGFace2 weights"):
            vggface2_state_dict(tmp_path / name)


def test_safetensors_header_bombs_are_refused(tmp_path):
    for name, declared in (("huge", 2**62), ("beyond-file", 10**6)):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(struct.pack("<Q", declared) + b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}')
        with pytest.raises(ModelError, match="cannot read .* as safetensors"):
            load_state_dict_file(path)


# ---------------------------------------------------------------- a card must fit its weights


def card(**changes) -> ModelCard:
    fields = dict(
        kind="classifier",
        architecture="resnet18",
        classes=("A", "B", "C"),
        input_size=32,
        channel_order="RGB",
        input_scale=1.0,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        weights="w.safetensors",
    )
    return ModelCard(**{**fields, **changes})


def saved_with(tmp_path, change_state) -> Path:
    """A resnet18 card beside weights whose state dict went through ``change_state``."""
    card_path = save_checkpoint(tiny_resnet(num_classes=3), card(), tmp_path, "m")
    weights = tmp_path / "m.safetensors"
    state = safetensors.torch.load_file(weights)
    safetensors.torch.save_file(change_state(state), weights)
    return card_path


def _reshaped(state, key, shape):
    state[key] = torch.zeros(shape)
    return state


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda s: _reshaped(s, "layer2.0.conv1.weight", (128, 64, 5, 5)),
            r"1 shape mismatches \(file vs card\) \(layer2\.0\.conv1\.weight \(128, 64, 5, 5\) vs \(128, 64, 3, 3\)\)",
        ),
        (lambda s: _reshaped(s, "fc.weight", (3, 1024)), r"fc\.weight \(3, 1024\) vs \(3, 512\)"),
        (lambda s: {k: v for k, v in s.items() if not k.startswith("layer4.1.")}, r"\d+ missing keys \(layer4\.1\."),
        (lambda s: {**s, "layer5.0.conv1.weight": torch.zeros(1)}, r"1 unexpected keys \(layer5\.0\.conv1\.weight\)"),
        (
            lambda s: {**s, "fc.bias": torch.tensor([0.0, float("nan"), 0.0])},
            r"1 tensor\(s\) hold NaN or infinite values "
            r"\(fc\.bias\)",
        ),
        (
            lambda s: {**s, "conv1.weight": s["conv1.weight"].index_fill(0, torch.tensor([0]), float("inf"))},
            r"hold NaN or infinite values \(conv1\.weight\)",
        ),
    ],
    ids=["conv shape", "fc input width", "missing block", "extra layer", "NaN bias", "infinite weights"],
)
def test_weights_that_do_not_fit_the_card_are_refused_naming_the_layer(tmp_path, change, message):
    with pytest.raises(ModelError, match=message):
        load_classifier(saved_with(tmp_path, change))


def _finishes(call):
    """Run ``call`` in a thread and return what it raised; a read that never ends (the old ``?parser=/dev/zero``)
    fails the test instead of hanging the suite."""
    outcome: list[BaseException | None] = []

    def run():
        try:
            call()
            outcome.append(None)
        except BaseException as error:  # handed back to the test
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    assert outcome, "the loader is still reading"
    return outcome[0]


def test_cards_that_are_not_small_regular_files_are_refused_at_once_with_one_message(tmp_path):
    """/dev/zero (read forever before), a FIFO (open blocked forever), a folder, a missing path and an
    oversized card all give the same sentence naming only the typed path: it tells a prober nothing about
    what is there."""
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    big = tmp_path / "big.json"
    big.write_text(tiny_card(notes="n" * (1 << 20)).to_json(), encoding="utf-8")
    paths = {
        "/dev/zero": "/dev/zero",
        "fifo": fifo,
        "folder": tmp_path,
        "missing": tmp_path / "absent.json",
        "big": big,
    }
    messages = {}
    for name, path in paths.items():
        for load in (load_face_parser, load_classifier):
            error = _finishes(lambda path=path, load=load: load(path))
            assert isinstance(error, ModelError), (name, error)
            messages[name] = str(error).replace(str(path), "PATH")
    assert set(messages.values()) == {
        "model card PATH cannot be read: it must be an existing, readable file of at most 1 MB"
    }
    assert ModelCard.from_json(big, max_bytes=2 << 20).notes == "n" * (1 << 20)  # a deployment may allow more


def test_weights_are_read_only_as_regular_files_under_their_cap(tmp_path):
    card_path = save_checkpoint(tiny_resnet(3), tiny_card(), tmp_path, "m")
    size = (tmp_path / "m.safetensors").stat().st_size
    with pytest.raises(
        ModelError, match=r"weights file \(the card's 'weights' field\) .*m\.safetensors cannot be read"
    ):
        load_classifier(card_path, weights_bytes=size - 1)
    assert load_classifier(card_path, weights_bytes=size).card.classes == ("A", "B", "Unaffected")
    linked = tmp_path / "linked.json"
    linked.symlink_to(card_path)  # a symbolic link to a regular file is fine
    assert load_classifier(linked).fingerprint == load_classifier(card_path).fingerprint
    (tmp_path / "m.safetensors").unlink()
    os.mkfifo(tmp_path / "m.safetensors")
    error = _finishes(lambda: load_classifier(card_path))
    assert isinstance(error, ModelError) and "cannot be read" in str(error)
    assert isinstance(_finishes(lambda: load_state_dict_file("/dev/zero")), ModelError)
