"""The fused LRP, excitation-backprop and DeepLIFT passes against the libraries they replace (Zennit and Captum,
the references).

Agreement is measured as max |ours − Zennit| / max |Zennit| over the whole batch of maps (the max norm of the
difference relative to the max norm of the reference) and must stay within 1e-5.
"""

import pytest
import torch
import torchvision

from core import fused_rules
from core.attribute import IMPLEMENTATIONS, METHODS, attribute
from models.resnet import build_resnet
from tests.conftest import randomised_batchnorm, tiny_resnet

TOLERANCE = 1e-5
FUSED = [name for name, spec in METHODS.items() if spec.fused is not None]
LRP = [name for name in FUSED if name.startswith("LRP-")]
ZENNIT = [name for name in FUSED if METHODS[name].library == "zennit"]


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    assert reference.abs().max() > 0
    return float((ours - reference).abs().max() / reference.abs().max())


def both(model, x, targets, method, params=None) -> tuple[torch.Tensor, torch.Tensor]:
    fused = attribute(model, x, targets, method, params, implementation="fused")
    library = attribute(model, x, targets, method, params, implementation="library")
    return fused, library


def test_the_lrp_composites_and_excitation_backprop_have_fused_rules():
    assert set(FUSED) == {
        "LRP-EpsilonPlus",
        "LRP-EpsilonPlusFlat",
        "LRP-EpsilonAlpha2Beta1",
        "LRP-EpsilonAlpha2Beta1Flat",
        "ExcitationBackprop",
        "DeepLIFT",
    }
    assert IMPLEMENTATIONS == ("fused", "library")


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("canonizer", ["resnet", "batchnorm-only"])
@pytest.mark.parametrize("method", LRP)
def test_lrp_equals_zennit_on_a_tiny_resnet18(method, canonizer, seed):
    model = tiny_resnet(seed=seed)
    assert fused_rules.supports(model)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(10 + seed))
    targets = torch.tensor([0, 2, 3])
    ours, zennit = both(model, x, targets, method, {"canonizer": canonizer})
    assert relative_error(ours, zennit) <= TOLERANCE


@pytest.mark.parametrize("seed", [0, 1])
def test_excitation_backprop_equals_zennit_on_a_tiny_resnet18(seed):
    model = tiny_resnet(seed=seed)
    x = torch.randn(3, 3, 40, 40, generator=torch.Generator().manual_seed(20 + seed))
    ours, zennit = both(model, x, torch.tensor([1, 3, 0]), "ExcitationBackprop")
    assert relative_error(ours, zennit) <= TOLERANCE


@pytest.mark.parametrize("multiply_by_inputs", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_deeplift_equals_captum_on_a_tiny_resnet18(seed, multiply_by_inputs):
    model = tiny_resnet(seed=seed)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(30 + seed))
    ours, captum = both(model, x, torch.tensor([2, 0, 1]), "DeepLIFT", {"multiply_by_inputs": multiply_by_inputs})
    assert relative_error(ours, captum) <= TOLERANCE


def test_deeplift_equals_captum_on_images_that_share_pixels_with_the_baseline():
    # Zero pixels and whole zero images make |Δin| < eps at ReLUs and at the max-pool: Captum's fallbacks.
    model = tiny_resnet(seed=5, zero_bias=True)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    x[0, :, :16] = 0
    x[2] = 0
    ours, captum = both(model, x, torch.tensor([1, 1, 2]), "DeepLIFT")
    assert relative_error(ours[:2], captum[:2]) <= TOLERANCE
    assert torch.equal(ours[2], torch.zeros_like(ours[2])) and torch.equal(captum[2], torch.zeros_like(captum[2]))


@pytest.mark.parametrize("method", ZENNIT)
def test_logit_output_relevance_and_other_stabilisers_equal_zennit(method):
    model = tiny_resnet(seed=2)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    params = {"initial_relevance": "logit", "stabilizer": 1e-3}
    if method.startswith("LRP-"):
        params["epsilon"] = 0.01
    ours, zennit = both(model, x, torch.tensor([1, 2]), method, params)
    assert relative_error(ours, zennit) <= TOLERANCE


def _resnet50(architecture: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = randomised_batchnorm(build_resnet(architecture, 5), 0, zero_bias=False).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["resnet50", "resnet50-caffe"])
def test_every_fused_rule_equals_the_library_on_resnet50s_at_small_input(architecture):
    model = _resnet50(architecture)
    assert fused_rules.supports(model)
    targets = torch.tensor([0, 4])
    for seed, size in ((1, 64), (2, 72)):
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
        for method in FUSED:
            canonizers = ["resnet", "batchnorm-only"] if method in LRP else [None]
            for canonizer in canonizers:
                params = None if canonizer is None else {"canonizer": canonizer}
                ours, library = both(model, x, targets, method, params)
                assert relative_error(ours, library) <= TOLERANCE, (method, canonizer, seed)


def test_the_fused_pass_runs_and_the_library_path_is_a_different_code_path(monkeypatch):
    model = tiny_resnet()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    calls = []
    real = fused_rules.lrp

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_rules, "lrp", counting)
    attribute(model, x, [1], "LRP-EpsilonPlusFlat")
    assert calls == [1]
    attribute(model, x, [1], "LRP-EpsilonPlusFlat", implementation="library")
    assert calls == [1]
    with pytest.raises(ValueError, match="implementation must be one of"):
        attribute(model, x, [1], "LRP-EpsilonPlusFlat", implementation="numba")


def test_networks_it_does_not_know_go_to_the_library():
    model = tiny_resnet()
    assert fused_rules.supports(model)
    # torchvision's own blocks share one ReLU module: not the structure the fused pass assumes.
    assert not fused_rules.supports(torchvision.models.resnet18(num_classes=4).eval())
    assert not fused_rules.supports(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3)))
    handle = model.get_submodule("layer1.0.conv1").register_forward_hook(lambda m, i, o: None)
    assert not fused_rules.supports(model)
    handle.remove()
    assert fused_rules.supports(model)
    model.train()
    assert not fused_rules.supports(model)
    model.eval()


def test_a_hooked_model_falls_back_to_the_library_and_gets_its_result():
    model = tiny_resnet(seed=4)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    seen = []
    handle = model.get_submodule("layer2.0.conv2").register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        hooked = attribute(model, x, [0, 1], "LRP-EpsilonAlpha2Beta1")
    finally:
        handle.remove()
    assert seen  # the library's forward ran through the hooked module
    assert torch.equal(hooked, attribute(model, x, [0, 1], "LRP-EpsilonAlpha2Beta1", implementation="library"))


def test_unknown_composite_or_canonizer_is_refused():
    model = tiny_resnet()
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="composite must be one of"):
        fused_rules.lrp(model, x, torch.tensor([0]), "Gamma")
    with pytest.raises(ValueError, match="canonizer must be one of"):
        fused_rules.lrp(model, x, torch.tensor([0]), "EpsilonPlus", canonizer="none")


# The memo of prepared networks (merged weights, sign-split copies): reused while the model is unchanged, made
# again as soon as any parameter or buffer changes, and checked against the library after every change.


def _count_preparations(monkeypatch) -> list[bool]:
    calls: list[bool] = []
    real = fused_rules._network

    def counting(model, merge):
        calls.append(merge)
        return real(model, merge)

    monkeypatch.setattr(fused_rules, "_network", counting)
    return calls


def test_a_model_explained_again_is_prepared_once_with_the_same_result(monkeypatch):
    fused_rules.clear_memo()
    calls = _count_preparations(monkeypatch)
    model = tiny_resnet(seed=6)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    first = attribute(model, x, [0, 1], "LRP-EpsilonAlpha2Beta1")
    again = attribute(model, x, [0, 1], "LRP-EpsilonPlusFlat")  # the same merged network, other weights' signs
    third = attribute(model, x, [0, 1], "LRP-EpsilonAlpha2Beta1")
    assert calls == [True]
    assert torch.equal(first, third)
    attribute(model, x, [0, 1], "ExcitationBackprop")  # the unmerged network: prepared once more
    attribute(model, x, [0, 1], "DeepLIFT")
    assert calls == [True, False]
    fused_rules.clear_memo()
    assert torch.equal(attribute(model, x, [0, 1], "LRP-EpsilonPlusFlat"), again)


def _edits():
    def in_place(model):
        with torch.no_grad():
            model.get_submodule("layer2.0.conv1").weight.mul_(-1.5)

    def data_assigned(model):
        conv = model.get_submodule("layer3.1.conv2")
        conv.weight.data = torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(1))

    def buffer_replaced(model):
        bn = model.get_submodule("layer1.0.bn2")
        bn.running_var = 0.1 + torch.rand(bn.num_features, generator=torch.Generator().manual_seed(2))

    def loaded(model):
        model.load_state_dict(tiny_resnet(seed=9).state_dict())

    def eps_changed(model):
        model.get_submodule("layer4.1.bn1").eps = 0.5

    def fc_replaced(model):
        fc = model.fc
        model.fc = torch.nn.Linear(fc.in_features, fc.out_features).requires_grad_(False)

    return [in_place, data_assigned, buffer_replaced, loaded, eps_changed, fc_replaced]


@pytest.mark.parametrize("edit", _edits(), ids=lambda edit: edit.__name__)
@pytest.mark.parametrize("method", ["LRP-EpsilonAlpha2Beta1", "ExcitationBackprop", "DeepLIFT"])
def test_a_changed_model_is_prepared_again_and_still_equals_the_library(monkeypatch, edit, method):
    fused_rules.clear_memo()
    calls = _count_preparations(monkeypatch)
    model = tiny_resnet(seed=7)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    before = attribute(model, x, [2, 3], method)
    edit(model)
    assert fused_rules.supports(model)
    ours, library = both(model, x, [2, 3], method)
    assert len(calls) == 2  # prepared before and after the edit
    assert not torch.allclose(ours, before)  # the edit changed the maps, and the memo did not hide it
    assert relative_error(ours, library) <= TOLERANCE


def test_the_memo_is_bounded_and_keeps_no_model_alive():
    import gc
    import weakref

    fused_rules.clear_memo()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    models = [tiny_resnet(seed=s) for s in range(fused_rules.MEMO_MODELS + 2)]
    for model in models:
        attribute(model, x, [0], "LRP-EpsilonPlusFlat")
    assert len(fused_rules._memo) == fused_rules.MEMO_MODELS
    last = weakref.ref(models[-1])
    del model, models
    gc.collect()
    assert last() is None
