"""Each method checked against something independent: autograd, a second library, a conservation law."""

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import Deconvolution, DeepLift, GuidedBackprop, Saliency

from core.attribute import METHOD_NAMES, METHODS, attribute, method_passes
from tests.conftest import tiny_resnet

TARGETS = torch.tensor([0, 2, 3])


def target_logits(model, x, targets=TARGETS):
    with torch.no_grad():
        return model(x)[torch.arange(len(targets)), targets]


def test_all_fifteen_paper_methods_are_registered():
    assert METHOD_NAMES == (
        "Gradient",
        "SmoothGrad",
        "IntegratedGradients",
        "GuidedBackprop",
        "ExcitationBackprop",
        "DeconvNet",
        "LRP-EpsilonPlus",
        "LRP-EpsilonPlusFlat",
        "LRP-EpsilonAlpha2Beta1",
        "LRP-EpsilonAlpha2Beta1Flat",
        "DeepLIFT",
        "GuidedGradCam",
        "LayerDeepLIFT",
        "LayerGradCam",
        "Occlusion",
    )


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_gives_input_sized_finite_maps_and_leaves_the_model_intact(method, small_model, small_batch):
    before = small_model(small_batch)
    attribution = attribute(small_model, small_batch, TARGETS, method)
    assert attribution.shape[0] == 3 and attribution.shape[-2:] == small_batch.shape[-2:]
    assert attribution.shape[1] in (1, 3)
    assert torch.isfinite(attribution).all()
    if method != "GuidedGradCam":  # its ReLU'd CAM may be all zero on a random network
        assert attribution.abs().sum() > 0
    # Hooks, merged batch norms and canonizer overrides must all be undone.
    assert torch.equal(small_model(small_batch), before)
    assert all(not m._forward_hooks and not m._backward_hooks for m in small_model.modules())


def test_gradient_equals_autograd(small_model, small_batch):
    x = small_batch.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(small_model(x)[torch.arange(3), TARGETS].sum(), x)
    assert torch.allclose(attribute(small_model, small_batch, TARGETS, "Gradient"), expected, atol=1e-6)


def test_zennit_and_captum_plain_gradients_agree(small_model, small_batch):
    captum = Saliency(small_model).attribute(small_batch.clone(), target=TARGETS, abs=False)
    assert torch.allclose(attribute(small_model, small_batch, TARGETS, "Gradient"), captum, atol=1e-6)


@pytest.mark.parametrize(("ours", "captum_cls"), [("GuidedBackprop", GuidedBackprop), ("DeconvNet", Deconvolution)])
def test_modified_relu_backprop_matches_captum(ours, captum_cls, small_model, small_batch):
    # Zennit (ours) and Captum implement these rules independently.
    theirs = captum_cls(small_model).attribute(small_batch.clone(), target=TARGETS)
    assert torch.allclose(attribute(small_model, small_batch, TARGETS, ours), theirs, atol=1e-5)


def test_integrated_gradients_completeness(small_model, small_batch):
    attribution = attribute(small_model, small_batch, TARGETS, "IntegratedGradients", {"n_iter": 256})
    expected = target_logits(small_model, small_batch) - target_logits(small_model, torch.zeros_like(small_batch))
    assert torch.allclose(attribution.sum(dim=(1, 2, 3)), expected, rtol=0.02, atol=0.02)


def test_deeplift_sums_to_the_difference_from_baseline(small_model, small_batch):
    attribution = attribute(small_model, small_batch, TARGETS, "DeepLIFT")
    expected = target_logits(small_model, small_batch) - target_logits(small_model, torch.zeros_like(small_batch))
    assert torch.allclose(attribution.sum(dim=(1, 2, 3)), expected, atol=1e-4)


@pytest.mark.parametrize(
    "method", ["LRP-EpsilonPlus", "LRP-EpsilonPlusFlat", "LRP-EpsilonAlpha2Beta1", "LRP-EpsilonAlpha2Beta1Flat"]
)
def test_lrp_conserves_the_target_logit(method):
    # Biases absorb relevance, so conservation is exact only for a bias-free network; with
    # initial_relevance="logit" the input relevance must then sum to the target logit (1% tolerance).
    model = tiny_resnet(seed=3, zero_bias=True)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    logits = target_logits(model, x)
    relevance = attribute(model, x, TARGETS, method, {"initial_relevance": "logit"}).sum(dim=(1, 2, 3))
    assert torch.allclose(relevance, logits, rtol=0.01, atol=1e-4)


def test_occlusion_equals_a_brute_force_loop(small_model):
    x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(5))
    targets = torch.tensor([1, 3])
    attribution = attribute(small_model, x, targets, "Occlusion", {"window": 15, "stride": 8})
    base = target_logits(small_model, x, targets)
    total = torch.zeros_like(x)
    count = torch.zeros_like(x)
    # Captum slides ceil((40 - 15) / 8) + 1 = 5 windows per axis, the last one cut by the border.
    starts = [0, 8, 16, 24, 32]
    for top in starts:
        for left in starts:
            occluded = x.clone()
            occluded[:, :, top : top + 15, left : left + 15] = 0
            drop = base - target_logits(small_model, occluded, targets)
            total[:, :, top : top + 15, left : left + 15] += drop[:, None, None, None]
            count[:, :, top : top + 15, left : left + 15] += 1
    expected = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    assert torch.allclose(attribution, expected, atol=1e-5)


def test_layer_gradcam_is_upsampled_grad_weighted_activations(small_model, small_batch):
    activations: dict[str, torch.Tensor] = {}
    handle = small_model.layer4.register_forward_hook(lambda m, i, o: activations.setdefault("a", o))
    x = small_batch.clone().requires_grad_(True)
    logits = small_model(x)[torch.arange(3), TARGETS].sum()
    handle.remove()
    (grads,) = torch.autograd.grad(logits, activations["a"])
    cam = (grads.mean(dim=(2, 3), keepdim=True) * activations["a"]).sum(dim=1, keepdim=True)
    expected = F.interpolate(cam, size=(32, 32), mode="bicubic", align_corners=False)
    ours = attribute(small_model, small_batch, TARGETS, "LayerGradCam")
    assert ours.shape == (3, 1, 32, 32)
    assert torch.allclose(ours, expected, atol=1e-5)


def test_guided_gradcam_is_guided_backprop_times_relu_cam(small_model):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    targets = small_model(x).argmax(1)
    cam = attribute(small_model, x, targets, "LayerGradCam", {"relu_attributions": True, "upsample": "nearest"})
    guided = attribute(small_model, x, targets, "GuidedBackprop")
    ours = attribute(small_model, x, targets, "GuidedGradCam")
    assert cam.abs().sum() > 0
    assert torch.allclose(ours, guided * cam, atol=1e-5)


def test_smoothgrad_is_reproducible_and_reduces_to_gradient_with_one_sample(small_model, small_batch):
    first = attribute(small_model, small_batch, TARGETS, "SmoothGrad", {"n_iter": 4})
    assert torch.equal(first, attribute(small_model, small_batch, TARGETS, "SmoothGrad", {"n_iter": 4}))
    assert not torch.equal(first, attribute(small_model, small_batch, TARGETS, "SmoothGrad", {"n_iter": 4, "seed": 1}))
    one = attribute(small_model, small_batch, TARGETS, "SmoothGrad", {"n_iter": 1})
    assert torch.allclose(one, attribute(small_model, small_batch, TARGETS, "Gradient"))


def test_batched_equals_one_by_one(small_model, small_batch):
    for method in ("LRP-EpsilonPlusFlat", "DeepLIFT", "GuidedGradCam"):
        batched = attribute(small_model, small_batch, TARGETS, method)
        single = torch.cat(
            [attribute(small_model, small_batch[i : i + 1], TARGETS[i : i + 1], method) for i in range(3)]
        )
        assert torch.allclose(batched, single, atol=1e-5), method


def test_target_defaults_to_the_predicted_class(small_model, small_batch):
    predicted = small_model(small_batch).argmax(1)
    assert torch.equal(
        attribute(small_model, small_batch, None, "Gradient"),
        attribute(small_model, small_batch, predicted, "Gradient"),
    )


def test_bad_arguments_name_the_problem(small_model, small_batch):
    with pytest.raises(ValueError, match="unknown method"):
        attribute(small_model, small_batch, TARGETS, "Magic")
    with pytest.raises(ValueError, match="has no parameter n_steps"):
        attribute(small_model, small_batch, TARGETS, "IntegratedGradients", {"n_steps": 5})
    with pytest.raises(ValueError, match="2 targets for 3 images"):
        attribute(small_model, small_batch, [0, 1], "Gradient")


def test_concurrent_methods_on_one_shared_model_equal_the_serial_run(small_model, small_batch):
    methods = [
        "LRP-EpsilonPlus",
        "GuidedBackprop",
        "DeepLIFT",
        "LRP-EpsilonAlpha2Beta1Flat",
        "ExcitationBackprop",
        "Gradient",
        "DeconvNet",
        "LayerGradCam",
    ] * 2
    serial = [attribute(small_model, small_batch, TARGETS, m) for m in methods]
    results: list[torch.Tensor | None] = [None] * len(methods)
    barrier = threading.Barrier(len(methods))

    def work(i):
        barrier.wait()
        results[i] = attribute(small_model, small_batch, TARGETS, methods[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(methods))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(not t.is_alive() for t in threads)
    for method, expected, got in zip(methods, serial, results):
        assert got is not None and torch.equal(expected, got), method


def test_pass_counts_follow_the_parameters():
    assert method_passes("SmoothGrad") == (20, 20)
    assert method_passes("IntegratedGradients", {"n_iter": 50}) == (50, 50)
    # Paper: 15×15 window, stride 8 on 224 px. Captum slides ceil(209 / 8) + 1 = 28 windows per
    # axis (the last cut by the border): 784 occlusions plus the clean pass.
    assert method_passes("Occlusion") == (785, 0)
    assert set(METHODS["Occlusion"].defaults) >= {"window", "stride", "baseline"}


def test_torchvision_resnet_breaks_deeplift_and_ours_does_not():
    """The trap DESIGN warns about, reproduced: the shared ReLU makes Captum's DeepLift fail."""
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    shared = torchvision.models.resnet18(num_classes=4).eval()
    with pytest.raises(Exception):  # noqa: B017 (Captum's error type differs between versions)
        DeepLift(shared).attribute(x.clone(), target=0)
    ours = tiny_resnet()
    ours.load_state_dict(shared.state_dict())
    _, delta = DeepLift(ours).attribute(x.clone(), target=0, return_convergence_delta=True)
    assert delta.abs().max() < 1e-4


@pytest.mark.slow
def test_resnet50_with_torchvision_weights_runs_deeplift_with_zero_delta():
    from models.resnet import build_resnet

    reference = torchvision.models.resnet50(num_classes=12)
    model = build_resnet("resnet50", 12)
    result = model.load_state_dict(reference.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    model.eval()
    reference.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-5)
    _, delta = DeepLift(model).attribute(x, target=[3, 7], return_convergence_delta=True)
    assert delta.abs().max() < 1e-3
    np.testing.assert_array_less(-1, delta.numpy())  # finite


class _PlainBasicBlock(torch.nn.Module):
    """A ResNet basic block that is not torchvision's class, as the authors' blocks were not: the same
    layers in the same order, the residual added in forward."""

    def __init__(self, block):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = block.conv1, block.bn1, block.relu1
        self.conv2, self.bn2 = block.conv2, block.bn2
        self.downsample = block.downsample
        self.relu2 = block.relu2

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + identity)


def _with_plain_blocks(model):
    import copy

    plain = copy.deepcopy(model)
    for layer in (plain.layer1, plain.layer2, plain.layer3, plain.layer4):
        for i, block in enumerate(layer):
            layer[i] = _PlainBasicBlock(block)
    return plain


@pytest.mark.parametrize(
    "method", ["LRP-EpsilonPlus", "LRP-EpsilonPlusFlat", "LRP-EpsilonAlpha2Beta1", "LRP-EpsilonAlpha2Beta1Flat"]
)
def test_batchnorm_only_canonizer_equals_zennit_resnet_canonizer_on_blocks_it_does_not_recognise(method, small_model):
    from zennit import composites as zc
    from zennit.attribution import Gradient as ZennitGradient
    from zennit.torchvision import ResNetCanonizer

    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    plain = _with_plain_blocks(small_model)
    assert not any(isinstance(m, torchvision.models.resnet.BasicBlock) for m in plain.modules())
    torch.testing.assert_close(plain(x), small_model(x))
    # The released code: Zennit's ResNetCanonizer on a network whose blocks are not torchvision's classes.
    composite = getattr(zc, method.removeprefix("LRP-"))(canonizers=[ResNetCanonizer()], epsilon=1e-6, stabilizer=1e-6)
    with ZennitGradient(model=plain, composite=composite) as attributor:
        _, released = attributor(
            x.clone().requires_grad_(True), lambda out: F.one_hot(TARGETS, out.shape[1]).to(out.dtype)
        )
    ours = attribute(small_model, x, TARGETS, method, {"canonizer": "batchnorm-only"})
    torch.testing.assert_close(ours, released, rtol=1e-4, atol=1e-7)
    # Our blocks are torchvision's, so the default canonizes their residuals too: other maps.
    canonized = attribute(small_model, x, TARGETS, method)
    assert not torch.allclose(canonized, ours, rtol=0.05, atol=1e-6)
    with pytest.raises(ValueError, match="canonizer must be one of"):
        attribute(small_model, x, TARGETS, method, {"canonizer": "none"})
