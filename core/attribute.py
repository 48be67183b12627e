"""The fifteen saliency methods of the paper, batched over images, with the paper's settings.

Zennit composites and Captum hooks mutate the model while they run (hooks, merged batch
norms, overridden forwards), so every call holds that model's lock (``models.locks``):
concurrent callers on one shared model are serialised instead of corrupting each other.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import DeepLift, GuidedGradCam, LayerDeepLift, LayerGradCam, Occlusion
from torch import nn
from zennit import composites as zc
from zennit.attribution import Gradient, IntegratedGradients, SmoothGrad
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.torchvision import ResNetCanonizer

from core import fused_rules
from core.devices import device_batch, module_device
from models.locks import model_lock


@dataclass(frozen=True)
class Method:
    """One saliency method: how to run it and how many passes it costs per image."""

    name: str
    library: str
    defaults: Mapping[str, Any]
    run: Callable[..., torch.Tensor] = field(repr=False)
    # (forward passes, backward passes) per image for (params, image side): the method's floor.
    passes: Callable[[Mapping[str, Any], int], tuple[int, int]] = field(repr=False)
    # Our own fused reverse pass of the same rule (core.fused_rules), used where it supports the model;
    # the library's ``run`` stays the reference (implementation="library").
    fused: Callable[..., torch.Tensor] | None = field(default=None, repr=False)

    def params(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        unknown = set(overrides or {}) - set(self.defaults)
        if unknown:
            raise ValueError(
                f"{self.name} has no parameter {', '.join(sorted(unknown))}; "
                f"it takes {', '.join(sorted(self.defaults)) or 'no parameters'}"
            )
        return {**self.defaults, **(overrides or {})}


def _output_relevance(targets: torch.Tensor, initial: str):
    """Output relevance: the one-hot target (paper), or the target logit itself (textbook LRP)."""
    if initial == "onehot":
        return lambda out: F.one_hot(targets.to(out.device), out.shape[1]).to(out.dtype)
    if initial == "logit":
        return lambda out: F.one_hot(targets.to(out.device), out.shape[1]).to(out.dtype) * out
    raise ValueError(f"initial_relevance must be 'onehot' or 'logit', not {initial!r}")


class _ChunkedPasses:
    """Zennit's sampling attributors (SmoothGrad, IntegratedGradients) run one forward and backward pass per
    sample; ``per_pass`` samples of the whole batch go through one pass instead (stacked along the batch, the
    output relevance repeated per sample). 1, the CPU's value, is Zennit's own loop; a GPU gets more from its
    free memory (``_samples_per_pass``). Each sample's gradient is the same either way (eval mode: no image
    sees another), up to the rounding of a larger batch."""

    per_pass = 1
    n_iter: int
    grad: Callable[..., tuple[torch.Tensor, torch.Tensor]]

    def gradients(self, samples: Iterable[torch.Tensor], attr_output_fn) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(output, gradient) of each sample, in order, ``per_pass`` samples a pass (drawn as they are needed)."""
        pending = iter(samples)
        while chunk := list(itertools.islice(pending, self.per_pass)):
            if len(chunk) == 1:
                yield self.grad(chunk[0], attr_output_fn)
                continue
            rows = len(chunk[0])

            def repeated(out, fn=attr_output_fn, rows=rows):
                return torch.cat([fn(part) for part in out.split(rows)])

            outputs, gradients = self.grad(torch.cat(chunk), repeated)
            yield from zip(outputs.split(rows), gradients.split(rows), strict=True)

    def average(self, samples: Iterable[torch.Tensor], attr_output_fn) -> tuple[torch.Tensor, torch.Tensor]:
        """The last sample's output and the mean gradient over ``n_iter`` samples, summed in order as zennit does."""
        result: torch.Tensor | None = None
        output = None
        for output, gradient in self.gradients(samples, attr_output_fn):  # noqa: B007 (the last output is kept)
            if result is None:
                result = torch.zeros_like(gradient)
            result += gradient / self.n_iter
        assert output is not None and result is not None  # n_iter >= 1
        return output, result


class _SeededSmoothGrad(_ChunkedPasses, SmoothGrad):
    """Zennit's SmoothGrad with its noise drawn from a private generator on the input's device, so a cached
    map is reproducible. On the CPU the generator and its draws are the ones before devices existed (the same
    maps); a GPU's generator (Philox) draws other numbers from the same seed, so its maps differ from the CPU's
    by their noise, reproducibly, and are cached apart (the key carries the device)."""

    def __init__(self, *args, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed = seed

    def forward(self, input, attr_output_fn):
        generator = torch.Generator(device=input.device).manual_seed(self.seed)
        dims = tuple(range(1, input.ndim))
        std = self.noise_level * (input.amax(dims, keepdim=True) - input.amin(dims, keepdim=True))
        # As zennit: the last sample is noise-free, so n_iter=1 equals the plain gradient. Drawn in order, one
        # draw per sample, whatever per_pass is.
        noisy = (
            input + torch.randn(input.shape, generator=generator, dtype=input.dtype, device=input.device) * std
            for _ in range(self.n_iter - 1)
        )
        return self.average(itertools.chain(noisy, [input]), attr_output_fn)


class _ChunkedIntegratedGradients(_ChunkedPasses, IntegratedGradients):
    """Zennit's IntegratedGradients, its path steps ``per_pass`` at a time (``_ChunkedPasses``)."""

    def forward(self, input, attr_output_fn):
        baseline = self.baseline_fn(input)
        steps = (baseline + alpha * (input - baseline) for alpha in torch.linspace(1.0 / self.n_iter, 1.0, self.n_iter))
        # The last step is the input itself: its output is the original output, as zennit returns.
        output, result = self.average(steps, attr_output_fn)
        result *= input - baseline
        return output, result


def _samples_per_pass(x: torch.Tensor) -> int:
    """Samples of the whole batch ``x`` one backward pass holds: 1 on the CPU, from free memory on a GPU."""
    return max(1, device_batch(x.device, len(x), x[0].numel(), backward=True) // len(x))


def _zennit(attributor_factory):
    def run(model, x, targets, initial_relevance="onehot", **params):
        attributor = attributor_factory(model, **params)
        if isinstance(attributor, _ChunkedPasses):
            attributor.per_pass = _samples_per_pass(x)
        with attributor:
            _, relevance = attributor(x, _output_relevance(targets, initial_relevance))
        return relevance

    return run


# How an LRP composite canonizes the network: "resnet" (Zennit's ResNetCanonizer: batch norms merged
# into the preceding convolutions and each block's residual addition made a Sum module with its own
# rule) or "batchnorm-only" (only the merges, SequentialMergeBatchNorm): what the released code got,
# since Zennit's residual canonizer matches only torchvision's Bottleneck class and the authors'
# blocks are their own (docs/DECISIONS.md, "Issue 11").
CANONIZERS = ("resnet", "batchnorm-only")


def canonizers(name: str) -> list:
    """Fresh Zennit canonizers of one of ``CANONIZERS``."""
    if name == "resnet":
        return [ResNetCanonizer()]
    if name == "batchnorm-only":
        return [SequentialMergeBatchNorm()]
    raise ValueError(f"canonizer must be one of {', '.join(CANONIZERS)}, not {name!r}")


def _composite(composite_cls):
    def factory(model, **params):
        return Gradient(model=model, composite=composite_cls(**params))

    return factory


def _canonized_composite(composite_cls):
    def factory(model, canonizer="resnet", **params):
        return Gradient(model=model, composite=composite_cls(canonizers=canonizers(canonizer), **params))

    return factory


def _upsample(attribution: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    return F.interpolate(attribution, size=size, mode=mode, align_corners=False if mode != "nearest" else None)


def _deeplift(model, x, targets, multiply_by_inputs=True):
    return DeepLift(model, multiply_by_inputs=multiply_by_inputs).attribute(x, baselines=0.0, target=targets)


def _guided_gradcam(model, x, targets, layer="layer4", interpolate_mode="nearest"):
    explainer = GuidedGradCam(model, model.get_submodule(layer))
    return explainer.attribute(x, target=targets, interpolate_mode=interpolate_mode)


def _layer_deeplift(model, x, targets, layer="layer4", upsample="bicubic", reduce_channels=True):
    attribution = LayerDeepLift(model, model.get_submodule(layer)).attribute(x, baselines=0.0, target=targets)
    if reduce_channels:
        # Sum over channels before the (linear) upsampling: per-position DeepLIFT contributions that
        # still add up to f(x) - f(baseline), at 1/C of the memory. reduce_channels=False keeps all
        # channels, as the paper's released code did (abs-summed later by relevance_map; the ``paper``
        # profile, core.profiles).
        attribution = attribution.sum(dim=1, keepdim=True)
    return _upsample(attribution, x.shape[-2:], upsample)


def _layer_gradcam(model, x, targets, layer="layer4", upsample="bicubic", relu_attributions=False):
    attribution = LayerGradCam(model, model.get_submodule(layer)).attribute(
        x, target=targets, relu_attributions=relu_attributions
    )
    return _upsample(attribution, x.shape[-2:], upsample)


def _occlusion(model, x, targets, window=15, stride=8, baseline=0.0, perturbations_per_eval=None):
    channels = x.shape[1]
    if perturbations_per_eval is None:
        # Forward batches of about 16 images on a CPU: larger ones run slower per image there (measured:
        # 64 images in a batch cost 1.2× per image what 16 do), smaller ones pay per-call overhead. On a GPU,
        # as many as its free memory holds (core.devices.device_batch).
        perturbations_per_eval = max(1, device_batch(x.device, 16, x[0].numel(), backward=False) // len(x))
    return Occlusion(model).attribute(
        x,
        sliding_window_shapes=(channels, window, window),
        strides=(channels, stride, stride),
        baselines=baseline,
        target=targets,
        perturbations_per_eval=perturbations_per_eval,
    )


def _occlusion_passes(p, size):
    # Captum's count: the last window per axis may be cut by the border.
    positions = (math.ceil((size - p["window"]) / p["stride"]) + 1) ** 2
    return positions + 1, 0


def _fused_lrp(composite: str):
    def run(model, x, targets, **params):
        return fused_rules.lrp(model, x, targets, composite, **params)

    return run


def _fused_excitation(model, x, targets, **params):
    return fused_rules.excitation_backprop(model, x, targets, **params)


def _fused_deeplift(model, x, targets, multiply_by_inputs=True):
    return fused_rules.deeplift(model, x, targets, multiply_by_inputs=multiply_by_inputs)


def _z_plus_passes(p, size):
    return 3, 2


def _alpha_beta_passes(p, size):
    return 5, 4


_GRAD = {"initial_relevance": "onehot"}
_LRP = {"initial_relevance": "onehot", "epsilon": 1e-6, "stabilizer": 1e-6, "canonizer": "resnet"}

METHODS: Mapping[str, Method] = MappingProxyType(
    {
        m.name: m
        for m in [
            Method("Gradient", "zennit", dict(_GRAD), _zennit(lambda model: Gradient(model)), lambda p, size: (1, 1)),
            Method(
                "SmoothGrad",
                "zennit",
                {**_GRAD, "noise_level": 0.1, "n_iter": 20, "seed": 0},
                _zennit(lambda model, **p: _SeededSmoothGrad(model, **p)),
                lambda p, size: (p["n_iter"], p["n_iter"]),
            ),
            Method(
                "IntegratedGradients",
                "zennit",
                {**_GRAD, "n_iter": 20},
                _zennit(lambda model, **p: _ChunkedIntegratedGradients(model, **p)),
                lambda p, size: (p["n_iter"], p["n_iter"]),
            ),
            Method(
                "GuidedBackprop",
                "zennit",
                dict(_GRAD),
                _zennit(_composite(zc.GuidedBackprop)),
                lambda p, size: (1, 1),
            ),
            # Zennit evaluates each hooked layer again in the backward pass, once per input/weight
            # sign combination of its rule: z+ twice (3 forward, 2 backward in all), alpha-beta four
            # times (5 forward, 4 backward). Excitation backprop uses z+ on every conv and dense layer.
            Method(
                "ExcitationBackprop",
                "zennit",
                {**_GRAD, "stabilizer": 1e-6},
                _zennit(_composite(zc.ExcitationBackprop)),
                _z_plus_passes,
                _fused_excitation,
            ),
            Method("DeconvNet", "zennit", dict(_GRAD), _zennit(_composite(zc.DeconvNet)), lambda p, size: (1, 1)),
            Method(
                "LRP-EpsilonPlus",
                "zennit",
                dict(_LRP),
                _zennit(_canonized_composite(zc.EpsilonPlus)),
                _z_plus_passes,
                _fused_lrp("EpsilonPlus"),
            ),
            Method(
                "LRP-EpsilonPlusFlat",
                "zennit",
                dict(_LRP),
                _zennit(_canonized_composite(zc.EpsilonPlusFlat)),
                _z_plus_passes,
                _fused_lrp("EpsilonPlusFlat"),
            ),
            Method(
                "LRP-EpsilonAlpha2Beta1",
                "zennit",
                dict(_LRP),
                _zennit(_canonized_composite(zc.EpsilonAlpha2Beta1)),
                _alpha_beta_passes,
                _fused_lrp("EpsilonAlpha2Beta1"),
            ),
            Method(
                "LRP-EpsilonAlpha2Beta1Flat",
                "zennit",
                dict(_LRP),
                _zennit(_canonized_composite(zc.EpsilonAlpha2Beta1Flat)),
                _alpha_beta_passes,
                _fused_lrp("EpsilonAlpha2Beta1Flat"),
            ),
            # Captum's DeepLift runs input and baseline as one doubled batch: 2 forward, 2 backward rows.
            Method(
                "DeepLIFT",
                "captum",
                {"multiply_by_inputs": True},
                _deeplift,
                lambda p, size: (2, 2),
                _fused_deeplift,
            ),
            # Guided backprop and Grad-CAM each need their own forward and backward pass.
            Method(
                "GuidedGradCam",
                "captum",
                {"layer": "layer4", "interpolate_mode": "nearest"},
                _guided_gradcam,
                lambda p, size: (2, 2),
            ),
            Method(
                "LayerDeepLIFT",
                "captum",
                {"layer": "layer4", "upsample": "bicubic", "reduce_channels": True},
                _layer_deeplift,
                lambda p, size: (2, 2),
            ),
            Method(
                "LayerGradCam",
                "captum",
                {"layer": "layer4", "upsample": "bicubic", "relu_attributions": False},
                _layer_gradcam,
                lambda p, size: (1, 1),
            ),
            Method(
                "Occlusion",
                "captum",
                {"window": 15, "stride": 8, "baseline": 0.0, "perturbations_per_eval": None},
                _occlusion,
                _occlusion_passes,
            ),
        ]
    }
)
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
# How a method with a fused rule runs: "fused" (core.fused_rules, where it supports the model; else the
# library) or "library" (Zennit or Captum, the reference the fused rules are tested against).
IMPLEMENTATIONS = ("fused", "library")
# Cheap enough to score a whole dataset on a CPU in minutes: what the demo scores and the dashboard starts with.
QUICK_METHODS: tuple[str, ...] = ("Gradient", "GuidedBackprop", "LRP-EpsilonPlusFlat", "LayerGradCam")


def predicted_targets(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with model_lock(model), torch.no_grad():
        return model(batch.to(module_device(model))).argmax(dim=1)


def attribute(
    model: nn.Module,
    batch: torch.Tensor,
    targets: torch.Tensor | np.ndarray | list[int] | None,
    method: str,
    params: Mapping[str, Any] | None = None,
    implementation: str = "fused",
) -> torch.Tensor:
    """Attribution N×C×H×W of ``targets`` (default: the predicted classes) for a batch of model inputs.

    ``params`` overrides the paper's defaults of ``method`` (``METHODS[method].defaults``). The batch and
    the targets go to the model's device (``core.devices.module_device``); the attribution stays there.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHOD_NAMES)}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, not {implementation!r}")
    spec = METHODS[method]
    resolved = spec.params(params)
    if batch.ndim != 4:
        raise ValueError(f"batch must be N×C×H×W, got shape {tuple(batch.shape)}")
    if model.training:
        raise ValueError("attribution needs the model in eval mode (call model.eval())")
    device = module_device(model)
    if targets is None:
        targets = predicted_targets(model, batch)
    if isinstance(targets, torch.Tensor):
        targets = targets.detach().cpu().numpy()  # np.asarray cannot read a GPU tensor
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long).reshape(-1).to(device)
    if targets.shape[0] != batch.shape[0]:
        raise ValueError(f"{targets.shape[0]} targets for {batch.shape[0]} images")
    x = batch.detach().to(device).clone().requires_grad_(True)
    with model_lock(model):
        if implementation == "fused" and spec.fused is not None and fused_rules.supports(model):
            attribution = spec.fused(model, x, targets, **resolved)
        else:
            attribution = spec.run(model, x, targets, **resolved)
    return attribution.detach()


def method_passes(method: str, params: Mapping[str, Any] | None = None, size: int = 224) -> tuple[int, int]:
    """(forward, backward) passes per image: the floor a benchmark compares the method against."""
    spec = METHODS[method]
    return spec.passes(spec.params(params), size)
