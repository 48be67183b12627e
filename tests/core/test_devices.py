"""Devices (issue 12): one resolver for auto|cpu|cuda[:N], every tensor following the model's device, batch
sizes from a GPU's free memory, the device in the cache key, and --device on the CLI. This machine has no GPU:
the model's device is played by ``meta`` (shapes only: any CPU tensor reaching it fails the run) or by a probe
module that records where its inputs were, and a GPU's presence by patching ``torch.cuda``."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from torch import nn
from zennit.attribution import Gradient

from cache import memo_key
from core import attribute as attribute_module
from core import pipeline
from core.attribute import METHOD_NAMES, _ChunkedIntegratedGradients, _output_relevance, _SeededSmoothGrad
from core.cli import main as cli_main
from core.devices import DeviceError, device_batch, module_device, precision_tag, resolve_device
from core.train import TrainingConfigError, training_autocast
from models.checkpoint import Classifier, classify, load_classifier, preprocess, save_checkpoint
from models.domain_guard import penultimate_features
from models.parser import FaceParser, predict_label_maps
from tests.conftest import tiny_card, tiny_resnet

ASTRONAUT_LANDMARKS = np.array([[204.5, 101.6], [247.2, 103.9], [224.7, 129.0], [202.1, 140.2], [245.0, 142.5]])


@pytest.fixture
def two_gpus(monkeypatch):
    """PyTorch told it sees two GPUs (nothing runs on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_is_the_cpu_here_and_names_resolve():
    assert not torch.cuda.is_available()  # this test machine has no GPU
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert (
        resolve_device("cpu") == resolve_device(" CPU ") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    )


def test_auto_and_cuda_names_pick_the_gpus_pytorch_sees(two_gpus):
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"has 2 GPU\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2", "--device")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_a_missing_gpu_is_one_clear_line_naming_its_source(name):
    with pytest.raises(DeviceError) as caught:
        resolve_device(name, "XAI_DEVICE")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"XAI_DEVICE {name!r}") and "no CUDA GPU" in message


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cuda:-1", "mps0", "cpu:0"])
def test_a_bad_name_is_refused(name):
    with pytest.raises(DeviceError, match="is not a device; use auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_batch_sizes_keep_the_cpu_constants_and_follow_a_gpus_free_memory():
    elements = 3 * 224 * 224
    cpu = torch.device("cpu")
    gpu = torch.device("cuda", 0)
    assert device_batch(cpu, 16, elements, backward=False, free=10**12) == 16  # free memory ignored on the CPU
    # 8 GB free, half of it planned: 4e9 / (150528 × 800) = 33.2 images with a graph, 132.9 without.
    assert device_batch(gpu, 16, elements, backward=True, free=8 * 10**9) == 33
    assert device_batch(gpu, 16, elements, backward=False, free=8 * 10**9) == 132
    assert device_batch(gpu, 16, elements, backward=False, free=10**13, cap=512) == 512
    assert device_batch(gpu, 16, elements, backward=True, free=0) == 1


def test_occlusion_and_the_sampling_methods_batch_as_before_on_the_cpu(monkeypatch):
    x = torch.zeros(3, 3, 32, 32)
    assert attribute_module._samples_per_pass(x) == 1  # Zennit's own one-sample loop
    seen = {}

    def fake_attribute(self, inputs, **kwargs):
        seen.update(kwargs)
        return torch.zeros_like(inputs)

    monkeypatch.setattr(attribute_module.Occlusion, "attribute", fake_attribute)
    attribute_module._occlusion(tiny_resnet(), x, torch.tensor([0, 1, 2]))
    assert seen["perturbations_per_eval"] == 16 // 3  # today's constant


def test_a_gpus_free_memory_sets_the_passes(monkeypatch):
    """What a GPU would get, computed on a meta tensor standing for it (free memory patched)."""
    monkeypatch.setattr("core.devices.free_memory", lambda device: 8 * 10**9)
    monkeypatch.setattr(attribute_module, "device_batch", _as_if_cuda(attribute_module.device_batch))
    x = torch.zeros(4, 3, 224, 224, device="meta")
    assert attribute_module._samples_per_pass(x) == 33 // 4


def _as_if_cuda(function):
    def on_cuda(device, *args, **kwargs):
        return function(torch.device("cuda", 0), *args, **kwargs)

    return on_cuda


def test_smoothgrad_on_the_cpu_draws_the_same_noise_as_before_devices(small_model, small_batch):
    """An independent SmoothGrad: the private CPU generator seeded once, one draw per noisy sample, the last
    sample noise-free, gradients of the one-hot target averaged in order. Equal to the bit."""
    targets = torch.tensor([0, 1, 2])
    params = {"noise_level": 0.1, "n_iter": 5, "seed": 3}
    got = attribute_module.attribute(small_model, small_batch, targets, "SmoothGrad", params)
    generator = torch.Generator().manual_seed(3)
    x = small_batch.clone()
    std = 0.1 * (x.amax((1, 2, 3), keepdim=True) - x.amin((1, 2, 3), keepdim=True))
    expected = torch.zeros_like(x)
    for n in range(5):
        noisy = x if n == 4 else x + torch.randn(x.shape, generator=generator, dtype=x.dtype) * std
        with Gradient(small_model) as gradient:
            _, g = gradient(noisy.clone().requires_grad_(True), _output_relevance(targets, "onehot"))
        expected += g / 5
    assert torch.equal(got, expected)


@pytest.mark.parametrize("attributor", [_SeededSmoothGrad, _ChunkedIntegratedGradients])
def test_several_samples_per_pass_give_the_one_sample_loops_result(attributor, small_model, small_batch):
    """A GPU's path (several samples stacked in one pass), run here: the same map to float32 rounding."""
    params = {"n_iter": 7, **({"seed": 0, "noise_level": 0.2} if attributor is _SeededSmoothGrad else {})}
    targets = torch.tensor([2, 0, 1])
    maps = []
    for per_pass in (1, 3, 7):
        method = attributor(small_model, **params)
        method.per_pass = per_pass
        with method:
            output, result = method(small_batch.clone().requires_grad_(True), _output_relevance(targets, "logit"))
        maps.append(result)
        assert torch.allclose(output, small_model(small_batch), rtol=1e-5, atol=1e-6)
    for result in maps[1:]:
        assert torch.allclose(result, maps[0], rtol=1e-5, atol=1e-5 * float(maps[0].detach().abs().max()))


@pytest.mark.parametrize("method", [m for m in METHOD_NAMES if m != "SmoothGrad"])
def test_every_method_sends_inputs_targets_and_one_hot_to_the_models_device(method):
    """The model lives on ``meta``; the batch and the targets (numpy) arrive on the CPU. One CPU tensor
    reaching the model (the batch, the targets, the one-hot output relevance) fails the run."""
    model = tiny_resnet(num_classes=3).to("meta")
    result = attribute_module.attribute(model, torch.randn(2, 3, 32, 32), np.array([0, 2]), method)
    assert result.device.type == "meta" and result.shape[0] == 2 and result.shape[-2:] == (32, 32)


def test_smoothgrads_generator_lives_on_the_inputs_device(monkeypatch):
    """No generator lives on ``meta``: a CPU one stands in, and what counts is the device SmoothGrad asked for."""
    asked = []
    real = torch.Generator

    def recording(device="cpu"):
        asked.append(torch.device(device))
        return real(device="cpu")

    model, batch = tiny_resnet(3).to("meta"), torch.randn(1, 3, 32, 32)
    monkeypatch.setattr(torch, "Generator", recording)
    result = attribute_module.attribute(model, batch, [1], "SmoothGrad")
    assert result.device.type == "meta"
    assert asked == [torch.device("meta")]


def test_gpu_tensor_targets_are_read_without_numpy_on_them(monkeypatch):
    """np.asarray cannot read a CUDA tensor: a tensor's targets are brought to the CPU first."""
    real = np.asarray

    def no_tensors(value, *args, **kwargs):
        assert not isinstance(value, torch.Tensor), "np.asarray given a tensor (fails for a GPU's)"
        return real(value, *args, **kwargs)

    monkeypatch.setattr(attribute_module.np, "asarray", no_tensors)
    model = tiny_resnet(num_classes=3).to("meta")
    result = attribute_module.attribute(model, torch.randn(2, 3, 32, 32), torch.tensor([1, 0]), "Gradient")
    assert result.device.type == "meta"


class Probe(nn.Module):
    """A network whose parameters say it lives on ``meta`` and which records where its inputs come from; its
    outputs are real CPU zeros of the right shape (an ``fc`` head included, for the penultimate features)."""

    def __init__(self, outputs: tuple[int, ...]):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1, device="meta"))
        self.fc = nn.Linear(5, outputs[0])
        self.outputs = outputs
        self.seen: list[torch.device] = []

    def forward(self, x):
        self.seen.append(x.device)
        if len(self.outputs) > 1:
            return torch.zeros(len(x), *self.outputs)
        return self.fc(torch.zeros(len(x), 5))


def test_classification_features_and_parsing_feed_the_models_device():
    card = tiny_card(("A", "B", "C"), 32)
    images = np.zeros((2, 32, 32, 3), np.uint8)
    probe = Probe((3,))
    assert module_device(probe).type == "meta"
    probabilities, predicted = classify(Classifier(probe, card, "x"), preprocess(images, card))
    assert probabilities.shape == (2, 3) and predicted.shape == (2,)
    features = penultimate_features(probe, preprocess(images, card))
    assert features.shape == (2, 5)
    parser_card = tiny_card(("A",) * 1, 16, kind="face_parser", architecture="unet-resnet18")
    parser_probe = Probe((11, 16, 16))
    maps = predict_label_maps(FaceParser(parser_probe, parser_card, "y"), np.zeros((3, 40, 40, 3), np.uint8))
    assert maps.shape == (3, 40, 40)
    assert {d.type for d in probe.seen + parser_probe.seen} == {"meta"}


def test_the_cache_key_carries_a_gpus_device_and_precision_and_not_the_cpus(monkeypatch, small_model):
    """On the CPU the key is the one from before devices (what is salted by the code changed once, since the
    modules' source did); a GPU's map gets its own key."""
    classifier = Classifier(small_model, tiny_card(("A", "B", "C", "D"), 32), "fingerprint")
    image = np.zeros((32, 32, 3), np.uint8)
    salt = pipeline._attribution_salt()
    before = memo_key("attribution", salt, classifier, image, 1, "Gradient", {"initial_relevance": "onehot"})
    keys: list[str] = []
    sums = (np.zeros((32, 32)), np.zeros((32, 32)))

    def rows(cache, new_keys, compute):
        keys.extend(new_keys)
        return [sums]

    monkeypatch.setattr(pipeline, "memoised_rows", rows)
    pipeline.attribution_sums(classifier, image[None], [1], "Gradient", {"initial_relevance": "onehot"})
    assert keys == [before]
    assert pipeline.device_parts(classifier) == ()
    monkeypatch.setattr(pipeline, "module_device", lambda network: torch.device("cuda", 0))
    assert pipeline.device_parts(classifier) == (precision_tag(torch.device("cuda", 0)),)
    pipeline.attribution_sums(classifier, image[None], [1], "Gradient", {"initial_relevance": "onehot"})
    assert keys[1] != before
    assert precision_tag(torch.device("cuda", 0)) == (
        "cuda/tf32" if torch.backends.cudnn.allow_tf32 else "cuda/float32"
    )
    assert precision_tag(torch.device("cpu")) == pipeline.CPU_TAG == "cpu/float32"


def test_the_detector_device_is_resolved_and_keys_found_faces_only_off_the_cpu(monkeypatch):
    assert pipeline.ExplainSettings().detector_device == "cpu"
    with pytest.raises(DeviceError, match="detector device 'cuda'"):
        pipeline.ExplainSettings(detector_device="cuda")
    calls = []

    def found(image, cache=None, **on):
        calls.append(on)
        return ASTRONAUT_LANDMARKS, 1

    monkeypatch.setattr(pipeline, "found_faces", found)
    photo = pipeline.Photo(data.astronaut())
    pipeline.align_photo(photo, 32)
    pipeline.align_photo(photo, 32, device="cuda:1")
    assert calls == [{}, {"device": "cuda:1"}]


def test_bfloat16_training_on_a_gpu_without_it_is_refused_and_the_cpu_is_unchanged(monkeypatch):
    assert training_autocast("float32").device == "cpu"
    assert not training_autocast("float32")._enabled
    assert training_autocast("bfloat16")._enabled
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    with pytest.raises(TrainingConfigError, match="no native bfloat16"):
        training_autocast("bfloat16", "cuda:0")


@pytest.fixture(scope="module")
def card_path(tmp_path_factory):
    card = tiny_card(("A", "B", "Unaffected"), 32, fold="fold-1")
    return save_checkpoint(tiny_resnet(num_classes=3, seed=4), card, tmp_path_factory.mktemp("model"), "tiny")


def test_loaded_models_carry_their_device(card_path):
    classifier = load_classifier(card_path, device="cpu")
    assert classifier.device == torch.device("cpu")
    with pytest.raises(DeviceError):
        load_classifier(card_path, device="cuda")


def test_cli_device_cpu_gives_what_no_flag_gives_and_cuda_one_line(card_path, tmp_path, capsys):
    path = tmp_path / "face.png"
    Image.fromarray(data.astronaut()).save(path)
    landmarks = ",".join(f"{v:g}" for v in ASTRONAUT_LANDMARKS.ravel())
    argv = ["explain", str(path), "--model", str(card_path), "--landmarks", landmarks, "--quiet"]
    argv += ["--methods", "Gradient,SmoothGrad,Occlusion", "--landmark-parser", "template"]
    outputs = []
    for extra in ([], ["--device", "cpu"], ["--device", "auto"]):
        assert cli_main([*argv, *extra]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1] == outputs[2]
    assert cli_main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device 'cuda'") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "command",
    ["explain", "train", "fit-domain", "train-parser", "benchmark", "faithfulness", "sanity", "extract", "demo"],
)
def test_every_command_that_runs_a_network_has_the_flag(command):
    from core.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = commands.choices[command]
    assert any("--device" in action.option_strings and action.default == "auto" for action in sub._actions)
