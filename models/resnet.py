"""ResNets whose every activation is its own module, with torchvision's state-dict keys.

torchvision's blocks call one ``self.relu`` two or three times. Hook-based attribution
(Captum's DeepLift raises on it; Zennit and Captum guided/deconv rules store one input per
module) then sees the wrong tensors. The fix lives at class level: the blocks subclass
torchvision's, so Zennit's ``ResNetCanonizer`` still recognises them, and ``forward`` is a
data descriptor, so the canonizer's temporary ``forward`` override (which would call the
shared ``self.relu`` again) is recorded but never used. When the canonizer attaches its
``canonizer_sum`` module our forward routes the residual addition through it, which is all
the override was for.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet as tv

CAFFE_RESNET50 = "resnet50-caffe"
ARCHITECTURES = ("resnet18", "resnet34", "resnet50", CAFFE_RESNET50)


def _residual_sum(block: nn.Module, identity: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    canonizer_sum = getattr(block, "canonizer_sum", None)
    if canonizer_sum is None:
        return out + identity
    return canonizer_sum(torch.stack([identity, out], dim=-1))


class _CanonizerProofForward:
    """Class-level ``forward`` that instance assignment cannot shadow (see module docstring)."""

    def __init__(self, fn):
        self.fn = fn

    def __get__(self, instance, owner):
        return self.fn if instance is None else self.fn.__get__(instance, owner)

    def __set__(self, instance, value):
        instance.__dict__["_overridden_forward"] = value

    def __delete__(self, instance):
        instance.__dict__.pop("_overridden_forward", None)


class BasicBlock(tv.BasicBlock):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self.relu
        self.relu1 = nn.ReLU(inplace=False)
        self.relu2 = nn.ReLU(inplace=False)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(_residual_sum(self, identity, out))

    forward = _CanonizerProofForward(_forward)


class Bottleneck(tv.Bottleneck):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self.relu
        self.relu1 = nn.ReLU(inplace=False)
        self.relu2 = nn.ReLU(inplace=False)
        self.relu3 = nn.ReLU(inplace=False)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(_residual_sum(self, identity, out))

    forward = _CanonizerProofForward(_forward)


class ResNet(tv.ResNet):
    """torchvision's ResNet with the stem ReLU non-inplace (in-place ops break backward hooks)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.relu = nn.ReLU(inplace=False)


_LAYOUT = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


def _caffe_layout(network: ResNet) -> ResNet:
    """Turn torchvision's ResNet-50 into the original Caffe one (VGGFace2, the paper's classifier).

    Same keys and shapes, different computation: each stage downsamples in its first 1×1
    convolution instead of the 3×3 one, and the stem max-pool has no padding and rounds up.
    VGGFace2 weights load into torchvision's layout without complaint but compute something else.
    """
    network.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
    for stage in (network.layer2, network.layer3, network.layer4):
        first = stage[0]
        first.conv1.stride, first.conv2.stride = first.conv2.stride, first.conv1.stride
    return network


def build_resnet(architecture: str, num_classes: int) -> ResNet:
    """An untrained attribution-safe ResNet; load weights with ``load_state_dict`` as for torchvision."""
    if architecture == CAFFE_RESNET50:
        return _caffe_layout(build_resnet("resnet50", num_classes))
    if architecture not in _LAYOUT:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    block, layers = _LAYOUT[architecture]
    return ResNet(block, layers, num_classes=num_classes)
