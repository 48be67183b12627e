"""The authors' checkpoints: built here exactly as their train.py saves them (their class, random
weights, ``torch.save(model)``) in a subprocess that imports their transcribed module, imported
without their code, and checked against their own module's logits on the same faces. Pickles that
would run code are refused before their payload runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from core.cli import main as cli_main
from core.errors import ModelError
from models.checkpoint import load_classifier, preprocess
from models.released import (
    RELEASED_CLASSES,
    RELEASED_MEAN_BGR,
    best_checkpoint,
    import_released_model,
    read_saved_module,
)

RELEASED_CODE = Path(__file__).resolve().parent / "released_code" / "models" / "VGGFace2_ResNet.py"
FOLD = "fold-3"
PAYLOADS = ("builtins.exec", "posix.system", "builtins.eval", "their load_state_dict")

# Run with their module importable as models.VGGFace2_ResNet, as in their code/ folder. The project's
# own `models` package is not on this interpreter's path ahead of it (`-I`, and the copy comes first).
AUTHORS_SIDE = textwrap.dedent(
    """
    import builtins, os, pickle, sys
    from pathlib import Path
    import numpy as np
    import torch, torchvision

    work = Path(sys.argv[1])
    sys.path.insert(0, str(work / "code"))
    import models.VGGFace2_ResNet as theirs
    assert Path(theirs.__file__).parent == work / "code" / "models", theirs.__file__
    torch.manual_seed(0)

    # A weight file in the VGGFace2 format (their load_state_dict copies the names it finds).
    with open(work / "resnet50_ft_weight.pkl", "wb") as file:
        pickle.dump({"conv1.weight": np.random.default_rng(0).normal(0, 0.05, (64, 3, 7, 7)).astype(np.float32)},
                    file, protocol=2)
    model = theirs.resnet50_adapted(weight_file=str(work / "resnet50_ft_weight.pkl"), num_classes=12)

    # Their datasets/nih_faces.py, after alignment: RGB -> BGR, minus the fold's mean, to_tensor.
    mean_bgr = np.array(MEAN_BGR)
    def their_input(face):
        image = face[:, :, ::-1]
        image = np.asarray(image).astype(np.float32) - mean_bgr
        return torchvision.transforms.functional.to_tensor(image).float()

    faces = np.load(work / "faces.npy")
    batch = torch.stack([their_input(face) for face in faces])
    # Random, trained-looking batch norms: statistics of these faces, then a random affine part.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        model.train()(batch)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    model.eval()
    with torch.no_grad():
        np.save(work / "their_logits.npy", model(batch).numpy())

    folder = work / "results" / "VGGFace2_ResNet50" / "FOLD"
    folder.mkdir(parents=True)
    torch.save(model, folder / "epoch-07-test_accuracy-0.812.pt")  # exactly train.py's call

    # The same network in torchvision's layout (stride in the 3x3 convolutions): same keys, other network.
    for stage in (model.layer2, model.layer3, model.layer4):
        stage[0].conv1.stride, stage[0].conv2.stride = (1, 1), (2, 2)
    torch.save(model, work / "torchvision-layout.pt")

    class Runs:
        def __init__(self, function, *arguments):
            self.function, self.arguments = function, arguments
        def __reduce__(self):
            return self.function, self.arguments

    def payload(kind, marker):
        touch = f"open({str(marker)!r}, 'w').close()"
        return {
            "builtins.exec": Runs(builtins.exec, touch),
            "builtins.eval": Runs(builtins.eval, touch.replace("open(", "__import__('builtins').open(")),
            "posix.system": Runs(os.system, f"touch '{marker}'"),
            "their load_state_dict": Runs(theirs.load_state_dict, None, str(work / f"{marker.name}.pkl")),
        }[kind]

    for index, kind in enumerate(PAYLOADS):
        for use in ("evil", "live"):
            marker = work / f"{use}-marker-{index}"
            if kind == "their load_state_dict":  # their loader unpickles a second file, which runs the code
                inner = Runs(builtins.exec, f"open({str(marker)!r}, 'w').close()")
                (work / f"{marker.name}.pkl").write_bytes(pickle.dumps(inner))
            block = theirs.Bottleneck(64, 16)  # a small module of their class, the payload deep inside it
            block.bn3.note = payload(kind, marker)
            torch.save(block, work / f"{use}-{index}.pt")
        # Loaded as their test.py does (torch.load, code runs), the "live" copy creates its marker.
        try:
            torch.load(work / f"live-{index}.pt", weights_only=False)
        except Exception:
            pass  # their load_state_dict fails after the inner pickle has run
        assert (work / f"live-marker-{index}").exists(), kind
    """
)


@pytest.fixture(scope="module")
def authors_side(tmp_path_factory) -> Path:
    """Their checkpoint (and variants) written by a subprocess with their code; their logits on faces."""
    work = tmp_path_factory.mktemp("authors")
    (work / "code" / "models").mkdir(parents=True)
    shutil.copy(RELEASED_CODE, work / "code" / "models" / RELEASED_CODE.name)
    (work / "code" / "models" / "__init__.py").write_text("")  # outranks any other `models` on the path
    faces = np.random.default_rng(1).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    faces[0] = np.linspace(0, 255, 224, dtype=np.uint8)[None, :, None]  # one smooth face-sized gradient
    np.save(work / "faces.npy", faces)
    script = (
        AUTHORS_SIDE.replace("MEAN_BGR", repr(list(RELEASED_MEAN_BGR[FOLD])))
        .replace('"FOLD"', repr(FOLD))
        .replace("PAYLOADS", repr(PAYLOADS))
    )
    (work / "authors_side.py").write_text(script)
    run = subprocess.run(
        [sys.executable, "-I", str(work / "authors_side.py"), str(work)],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return work


@pytest.mark.slow
def test_their_checkpoint_imports_and_gives_their_logits(authors_side, tmp_path, capsys):
    folder = authors_side / "results" / "VGGFace2_ResNet50" / FOLD
    for decoy in ("epoch-01-test_accuracy-0.400.pt", "epoch-35-test_accuracy-0.811.pt"):
        (folder / decoy).write_bytes(b"")  # lower accuracy: never opened
    out = tmp_path / "models"
    assert cli_main(["import-model", str(folder), "--out", str(out)]) == 0
    assert "epoch-07-test_accuracy-0.812.pt" in capsys.readouterr().err
    card_path = out / f"classifier-{FOLD}.json"
    classifier = load_classifier(card_path)
    card = classifier.card
    assert (card.architecture, card.channel_order, card.input_scale, card.std) == (
        "resnet50-caffe",
        "BGR",
        255.0,
        (1.0, 1.0, 1.0),
    )
    assert card.mean == RELEASED_MEAN_BGR[FOLD] == (112.359, 122.850, 147.066)
    assert card.classes == RELEASED_CLASSES and card.fold == FOLD and card.input_size == 224
    faces = np.load(authors_side / "faces.npy")
    with torch.no_grad():
        ours = classifier.network(preprocess(faces, card)).numpy()
    theirs = np.load(authors_side / "their_logits.npy")
    assert theirs.std() > 0.1  # the faces are told apart: the comparison is not of constants
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


@pytest.mark.slow
def test_their_weights_under_a_resnet50_card_are_refused_or_compute_something_else(authors_side, tmp_path):
    imported = import_released_model(
        authors_side / "results" / "VGGFace2_ResNet50" / FOLD / "epoch-07-test_accuracy-0.812.pt", tmp_path
    )
    card_path = imported.card_path
    fields = json.loads(card_path.read_text())
    card_path.write_text(json.dumps({**fields, "architecture": "resnet50"}))
    with pytest.raises(ModelError, match="saved from a 'resnet50-caffe' network but the card says 'resnet50'"):
        load_classifier(card_path)
    # Re-saved without the record (e.g. converted by hand) the mistake cannot be seen, only its effect.
    weights = tmp_path / fields["weights"]
    safetensors.torch.save_file(safetensors.torch.load_file(weights), weights)
    wrong = load_classifier(card_path)
    card_path.write_text(json.dumps(fields))
    right = load_classifier(card_path)
    faces = np.load(authors_side / "faces.npy")
    with torch.no_grad():
        difference = wrong.network(preprocess(faces, wrong.card)) - right.network(preprocess(faces, right.card))
    assert difference.abs().max() > 1e-2


@pytest.mark.slow
def test_a_torchvision_layout_module_is_refused(authors_side, tmp_path):
    with pytest.raises(ModelError, match="not the Caffe-layout ResNet-50.*layer2.0.conv1"):
        import_released_model(authors_side / "torchvision-layout.pt", tmp_path, fold=FOLD)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(PAYLOADS)))
def test_a_checkpoint_that_would_run_code_is_refused_and_its_payload_never_runs(authors_side, tmp_path, index, capsys):
    assert (authors_side / f"live-marker-{index}").exists()  # loaded as their test.py does, it ran
    refused = {
        "builtins.exec": "builtins.exec",
        "posix.system": "posix.system",
        "builtins.eval": "builtins.eval",
        "their load_state_dict": "models.VGGFace2_ResNet.load_state_dict",
    }[PAYLOADS[index]]
    with pytest.raises(ModelError, match=rf"^refused to load .*it asks for {refused}, .*nothing in it was run$"):
        read_saved_module(authors_side / f"evil-{index}.pt")
    capsys.readouterr()
    code = cli_main(["import-model", str(authors_side / f"evil-{index}.pt"), "--fold", FOLD, "--out", str(tmp_path)])
    assert code == 2 and not list(tmp_path.iterdir())
    error = capsys.readouterr().err
    assert error.startswith("error: refused to load ") and error.count("\n") == 1  # one line, no traceback
    assert not (authors_side / f"evil-marker-{index}").exists()


@pytest.mark.slow
def test_a_truncated_checkpoint_is_a_clear_error(authors_side, tmp_path):
    whole = (authors_side / "results" / "VGGFace2_ResNet50" / FOLD / "epoch-07-test_accuracy-0.812.pt").read_bytes()
    for cut in (len(whole) // 2, len(whole) - 100):
        path = tmp_path / f"cut-{cut}.pt"
        path.write_bytes(whole[:cut])
        with pytest.raises(ModelError, match="cannot read"):
            import_released_model(path, tmp_path / "out", fold=FOLD)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "found"),
    [
        (lambda: torch.nn.Linear(2, 2), "torch.nn.modules.linear.Linear"),
        (lambda: {"fc.weight": torch.zeros(2, 2)}, "dict"),
    ],
)
def test_other_objects_than_their_network_are_refused(tmp_path, content, found):
    path = tmp_path / "other.pt"
    torch.save(content(), path)
    with pytest.raises(ModelError, match=rf"holds a {found}, not the authors' models.VGGFace2_ResNet.resnet50_adapted"):
        import_released_model(path, tmp_path / "out", fold=FOLD)


def test_best_epoch_is_their_argmax_of_the_named_accuracy_earliest_on_ties(tmp_path):
    names = [
        "epoch-01-test_accuracy-0.500.pt",
        "epoch-10-test_accuracy-0.812.pt",
        "epoch-02-test_accuracy-0.812.pt",
        "epoch-03-test_accuracy-0.790.pt",
        "epoch-35-test_accuracy-0.100.pt",
    ]
    for name in [*names, "notes.txt", "model.pt"]:
        (tmp_path / name).write_bytes(b"")
    best, tied = best_checkpoint(tmp_path)
    # test.py: np.argmax of float(name.split('-test_accuracy-')[-1].replace('.pt', '')) over its glob,
    # here listed by epoch: the first maximum.
    in_epoch_order = sorted(names)
    accuracies = [float(name.split("-test_accuracy-")[-1].replace(".pt", "")) for name in in_epoch_order]
    assert best.path.name == in_epoch_order[int(np.argmax(accuracies))] == "epoch-02-test_accuracy-0.812.pt"
    assert (best.epoch, best.accuracy) == (2, 0.812)
    assert [t.path.name for t in tied] == ["epoch-10-test_accuracy-0.812.pt"]


def test_a_folder_without_their_checkpoints_and_unknown_folds_are_refused(tmp_path):
    with pytest.raises(ModelError, match="holds no epoch-NN-test_accuracy-A.pt checkpoint"):
        import_released_model(tmp_path, tmp_path / "out", fold="fold-1")
    (tmp_path / "epoch-01-test_accuracy-0.5.pt").write_bytes(b"")
    with pytest.raises(ModelError, match="which fold is .*pass --fold"):
        import_released_model(tmp_path, tmp_path / "out")
    with pytest.raises(ModelError, match="unknown fold 'fold-9'"):
        import_released_model(tmp_path, tmp_path / "out", fold="fold-9")
    with pytest.raises(ModelError, match="not a torch.save zip"):
        import_released_model(tmp_path, tmp_path / "out", fold="fold-1")
    assert not (tmp_path / "out").exists()


def test_modules_nested_deeper_than_any_resnet_are_refused(tmp_path, monkeypatch):
    """A file claiming to be their network but nesting modules far deeper than a ResNet is refused with a
    message (a hostile pickle can nest thousands deep, which walking it would turn into a RecursionError)."""

    class resnet50_adapted(torch.nn.Module):  # their class's name, under which pickle records it
        pass

    their_module = types.ModuleType("models.VGGFace2_ResNet")
    resnet50_adapted.__module__ = their_module.__name__
    resnet50_adapted.__qualname__ = "resnet50_adapted"
    their_module.resnet50_adapted = resnet50_adapted  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, their_module.__name__, their_module)
    root = resnet50_adapted()
    inner: torch.nn.Module = root
    for _ in range(100):
        deeper = torch.nn.Sequential()
        inner.add_module("deeper", deeper)
        inner = deeper
    path = tmp_path / "deep.pt"
    torch.save(root, path)
    with pytest.raises(ModelError, match="nest deeper than 16 levels"):
        import_released_model(path, tmp_path / "out", fold=FOLD)
