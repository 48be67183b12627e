"""LRP composites, excitation backprop and DeepLIFT as one hand-written reverse pass over the project's ResNets.

Zennit implements a rule per layer as a backward hook: autograd runs the layer's own backward, the
hook throws that result away and re-evaluates the layer once per input/weight sign combination of
its rule (z⁺: twice, α-β: four times), then takes one more gradient through those copies. The rules
themselves are a few convolutions per layer. This module computes the same relevance directly:
one forward pass that keeps each convolution's input, then one reverse sweep that applies each
layer's rule with plain tensor operations (no autograd, no hooks). Two facts make it cheaper than
Zennit's pass counts:

- every convolution of a ResNet after the stem reads a ReLU (or max-pool of a ReLU) output, so the
  negative-input half of z⁺ and α-β is exactly zero and is skipped (Zennit computes it and adds
  zero);
- α-β's positive and negative weight halves run as one convolution with both halves stacked along
  the output channels, and their backward as one transposed convolution.

The reference is Zennit itself (``tests/core/test_fused_rules.py`` compares the two on several
networks, inputs and both canonizers to 1e-5 of the map's largest magnitude). What is reproduced,
rule by rule, from Zennit 0.5.1:

- canonizing (``canonizer="resnet"`` or ``"batchnorm-only"``): every batch norm merged into the
  convolution before it (``w·γ/√(σ²+ε)``, ``(b-μ)·γ/√(σ²+ε)+β``); the merged batch norm is then
  the identity with ε left in, i.e. a scale of ``1/√(1+ε)`` in the forward pass and ``Pass`` (no
  change) in the reverse one. ``"resnet"`` also turns each block's residual addition into a ``Sum``
  with the ``Norm`` rule (each summand's share ``x_k·R/stab(Σx)``); ``"batchnorm-only"`` leaves the
  addition to the gradient (both branches get the whole relevance);
- ReLUs pass relevance unchanged (``Pass``); max-pooling passes it to the maximum (the gradient);
  the global average pool uses ``Norm``; the dense layer ``Epsilon``;
- convolutions z⁺ (``ZPlus``: positive weights and biases, stabilised by ``stabilizer``) or
  α=2, β=1 (``AlphaBeta``); the ``Flat`` variants give the first convolution the flat rule
  (all weights one, no bias, independent of the input);
- excitation backprop (``zennit.composites.ExcitationBackprop``, no canonizer): z⁺ on every
  convolution and on the dense layer, batch norms and ReLUs by their gradient, ``Norm`` on the
  average pool.

DeepLIFT (``deeplift``) reproduces Captum 0.9's ``DeepLift`` with a zero baseline, quirks included (see
the function), and is tested against it the same way.

Only networks whose structure is known are taken (``supports``): torchvision's ResNet forward with
the attribution-safe blocks of ``models.resnet`` (matched by class name and module, since this layer
may not import ``models``), no hooks. Anything else goes to the library.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input
from torchvision.models import resnet as tv

# (conv rule, first-layer rule, dense rule, canonized): what each Zennit composite maps to.
COMPOSITES = {
    "EpsilonPlus": ("zplus", "zplus", "epsilon"),
    "EpsilonPlusFlat": ("zplus", "flat", "epsilon"),
    "EpsilonAlpha2Beta1": ("alpha2beta1", "alpha2beta1", "epsilon"),
    "EpsilonAlpha2Beta1Flat": ("alpha2beta1", "flat", "epsilon"),
}
_BLOCK_CLASSES = {("models.resnet", "BasicBlock"), ("models.resnet", "Bottleneck")}


def supports(model: nn.Module) -> bool:
    """Whether ``model`` is one of the project's ResNets, unhooked, so the fused pass computes what it computes."""
    if not isinstance(model, tv.ResNet):
        return False
    cls = type(model)
    if cls.forward is not tv.ResNet.forward or cls._forward_impl is not tv.ResNet._forward_impl:
        return False
    if not (
        type(model.conv1) is nn.Conv2d
        and type(model.bn1) is nn.BatchNorm2d
        and type(model.relu) is nn.ReLU
        and type(model.maxpool) is nn.MaxPool2d
        and type(model.avgpool) is nn.AdaptiveAvgPool2d
        and model.avgpool.output_size in (1, (1, 1))
        and type(model.fc) is nn.Linear
    ):
        return False
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        if type(layer) is not nn.Sequential:
            return False
        for block in layer:
            if (type(block).__module__, type(block).__name__) not in _BLOCK_CLASSES:
                return False
            if "_overridden_forward" in vars(block) or hasattr(block, "canonizer_sum"):
                return False
            if block.downsample is not None and not (
                type(block.downsample) is nn.Sequential
                and len(block.downsample) == 2
                and type(block.downsample[0]) is nn.Conv2d
                and type(block.downsample[1]) is nn.BatchNorm2d
            ):
                return False
    for module in model.modules():
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
            return False
        if getattr(module, "_backward_pre_hooks", None):
            return False
        if isinstance(module, nn.BatchNorm2d) and (module.running_mean is None or not module.affine):
            return False
        if isinstance(module, nn.ReLU) and module.inplace:
            return False
    return not model.training


def _stabilize(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Zennit's ``stabilize``: ``z + ε·sign(z)`` with sign(0) = +1."""
    return torch.where(z >= 0, z + epsilon, z - epsilon)


def _stabilize_nonnegative_(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``_stabilize`` of a ``z`` that should hold no negative value (a z⁺ or a pooled ReLU output), in place
    where it holds none: then ``z + ε`` everywhere is exactly ``_stabilize`` (−0 counts as ≥ 0 in both), at one
    read-only pass (the minimum) and one in-place add instead of four passes and three new tensors. Where a
    convolution's rounding left a negative value (or a NaN), the general rule runs. On a GPU the check would
    wait for the device, so the general rule runs there."""
    if z.device.type == "cpu" and (z.numel() == 0 or bool(z.min() >= 0)):
        return z.add_(epsilon)
    return _stabilize(z, epsilon)


@dataclass(eq=False)
class _Conv:
    """One convolution as the rules see it: its (possibly merged) weight and bias, and how it slides.

    The sign-split weights the rules convolve with (``positive``, ``stacked``) are made on first use and kept
    with the prepared network (``_prepared``), so a model explained again does not clamp them again."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    # Unmerged batch norm after it (excitation backprop): the module itself, run as is.
    bn: nn.BatchNorm2d | None = None
    # Merged batch norm (canonized): the identity batch norm that is left scales by 1/sqrt(1 + eps).
    identity_eps: float | None = None
    _positive: tuple[torch.Tensor, torch.Tensor | None] | None = field(default=None, repr=False)
    _stacked: tuple[torch.Tensor, torch.Tensor | None] | None = field(default=None, repr=False)
    _identity: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _flat: tuple[tuple, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def conv_input_grad(self, shape: torch.Size, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return conv2d_input(shape, weight, grad, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x, self.weight, self.bias)
        if self.bn is not None:
            return self.bn(out)
        if self.identity_eps is not None:
            if self._identity is None:
                zeros = torch.zeros(out.shape[1], dtype=out.dtype, device=out.device)
                self._identity = (zeros, torch.ones_like(zeros))
            zeros, ones = self._identity
            return F.batch_norm(out, zeros, ones, ones, zeros, False, 0.0, self.identity_eps)
        return out

    def positive(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(w⁺, b⁺)``: the weight and bias clamped at zero from below."""
        if self._positive is None:
            bias = None if self.bias is None else self.bias.clamp(min=0)
            self._positive = (self.weight.clamp(min=0), bias)
        return self._positive

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``w⁺`` and ``w⁻`` stacked along the output channels (and the biases likewise): α-β's one convolution.
        ``positive`` then reads the first half of it rather than keeping a copy of its own."""
        if self._stacked is None:
            w_pos, b_pos = self.positive()
            weight = torch.cat([w_pos, self.weight.clamp(max=0)])
            bias = None if self.bias is None or b_pos is None else torch.cat([b_pos, self.bias.clamp(max=0)])
            self._stacked = (weight, bias)
            channels = w_pos.shape[0]
            self._positive = (weight[:channels], None if bias is None else bias[:channels])
        return self._stacked

    def flat(self, x: torch.Tensor, stabilizer: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The flat rule's all-ones weight and its stabilised ``z`` for inputs shaped as ``x`` (it reads only the
        shape): kept for the last shape seen."""
        key = (tuple(x.shape), x.dtype, x.device, stabilizer)
        if self._flat is None or self._flat[0] != key:
            ones = torch.ones_like(self.weight, dtype=x.dtype)
            z = self.conv(torch.ones_like(x), ones, torch.zeros(ones.shape[0], dtype=x.dtype, device=x.device))
            self._flat = (key, ones, _stabilize(z, stabilizer))
        return self._flat[1], self._flat[2]


def _conv(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, merge: bool) -> _Conv:
    common = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    if bn is None or not merge:
        return _Conv(conv.weight, conv.bias, bn=bn, **common)  # type: ignore[arg-type]
    # zennit.canonizers.MergeBatchNorm.merge_batch_norm, operation for operation.
    assert bn.running_var is not None and bn.running_mean is not None
    scale = bn.weight / (bn.running_var + bn.eps) ** 0.5
    bias = conv.bias if conv.bias is not None else torch.zeros(1, dtype=conv.weight.dtype, device=conv.weight.device)
    return _Conv(
        conv.weight * scale[:, None, None, None],
        (bias - bn.running_mean) * scale + bn.bias,
        identity_eps=bn.eps,
        **common,  # type: ignore[arg-type]
    )


@dataclass
class _Block:
    convs: list[_Conv]  # the main branch, in order
    downsample: _Conv | None


def _network(model: nn.Module, merge: bool) -> tuple[_Conv, list[_Block]]:
    stem = _conv(model.conv1, model.bn1, merge)  # type: ignore[arg-type]
    blocks = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:  # type: ignore[union-attr]
            convs = [_conv(block.conv1, block.bn1, merge), _conv(block.conv2, block.bn2, merge)]
            if hasattr(block, "conv3"):
                convs.append(_conv(block.conv3, block.bn3, merge))
            down = None if block.downsample is None else _conv(block.downsample[0], block.downsample[1], merge)
            blocks.append(_Block(convs, down))
    return stem, blocks


# The prepared networks (merged weights, sign-split copies) of the models explained last, so that explaining
# one model batch after batch prepares it once. Not a hidden copy of a model: every call checks that the
# model's parameters and buffers are the very tensors they were (same storage, which the entry keeps alive
# so its address cannot be reused; same shape, strides, dtype, device), unmodified (the version counter
# that every in-place edit bumps), and that its convolutions' geometry and batch norms' eps are unchanged;
# anything else prepares the model again. ``model.to(...)``, ``load_state_dict``, ``reset_parameters``,
# ``param.data = ...`` and in-place edits under ``torch.no_grad()`` are all seen. Not seen: an in-place edit
# through ``param.data`` (PyTorch does not count those), the same blind spot autograd has. Bounded: at most
# ``MEMO_MODELS`` models (least recently used dropped), weakly referenced (a deleted model is not kept),
# ResNet-50: ~0.1 GB per merged or unmerged network and its w⁺, ~0.2 GB more once α-β ran.
MEMO_MODELS = 2


@dataclass(eq=False)
class _Prepared:
    model: weakref.ref
    signature: tuple
    sources: tuple[torch.Tensor, ...]  # aliases of the model's tensors: their storage cannot be freed and reused
    networks: dict[bool, tuple[_Conv, list[_Block]]]


_memo: OrderedDict[int, _Prepared] = OrderedDict()
_memo_lock = threading.Lock()


def _signature(model: nn.Module) -> tuple[tuple, tuple[torch.Tensor, ...]] | None:
    """What a prepared network depends on; None where the version counters cannot be read (inference-mode
    tensors), and then nothing is kept."""
    tensors = tuple(model.parameters()) + tuple(model.buffers())
    try:
        state = tuple((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device, t._version) for t in tensors)
    except RuntimeError:
        return None
    geometry = tuple(
        (m.stride, m.padding, m.dilation, m.groups) if isinstance(m, nn.Conv2d) else m.eps
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.BatchNorm2d)
    )
    return (state, geometry), tuple(t.detach() for t in tensors)


def _prepared(model: nn.Module, merge: bool) -> tuple[_Conv, list[_Block]]:
    """The model's network for the rules (``_network``), from the memo where it is still valid."""
    signed = _signature(model)
    if signed is None:
        return _network(model, merge)
    signature, sources = signed
    key = id(model)
    with _memo_lock:
        entry = _memo.get(key)
        if entry is None or entry.model() is not model or entry.signature != signature:
            entry = _Prepared(weakref.ref(model), signature, sources, {})
            _memo[key] = entry
        _memo.move_to_end(key)
        while len(_memo) > MEMO_MODELS:
            _memo.popitem(last=False)
        if merge not in entry.networks:
            entry.networks[merge] = _network(model, merge)
        return entry.networks[merge]


def clear_memo() -> None:
    """Forget every prepared network (they are made again on the next call)."""
    with _memo_lock:
        _memo.clear()


# Reverse rules of one convolution: relevance at its output -> relevance at its input.


def _zplus(conv: _Conv, x: torch.Tensor, relevance: torch.Tensor, stabilizer: float, signed: bool) -> torch.Tensor:
    w_pos, b_pos = conv.positive()
    if not signed:  # x >= 0: the negative-input half is exactly zero, and z >= 0
        z = _stabilize_nonnegative_(conv.conv(x, w_pos, b_pos), stabilizer)
        grad = torch.div(relevance, z, out=z)
        return conv.conv_input_grad(x.shape, w_pos, grad).mul_(x)
    w_neg = conv.weight.clamp(max=0)
    x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
    z = conv.conv(x_pos, w_pos, b_pos) + conv.conv(x_neg, w_neg, None)
    grad = relevance / _stabilize(z, stabilizer)
    return x_pos * conv.conv_input_grad(x.shape, w_pos, grad) + x_neg * conv.conv_input_grad(x.shape, w_neg, grad)


def _alpha2beta1(
    conv: _Conv, x: torch.Tensor, relevance: torch.Tensor, stabilizer: float, signed: bool
) -> torch.Tensor:
    if not signed:
        # Both weight halves in one convolution, stacked along the output channels, and back in one; the
        # halves of z become the gradient in place: 2·R/stab(z⁺) and −R/stab(z⁻).
        weight, bias = conv.stacked()
        channels = weight.shape[0] // 2
        z = conv.conv(x, weight, bias)
        z_pos, z_neg = z[:, :channels], z[:, channels:]
        torch.div(relevance, _stabilize_nonnegative_(z_pos, stabilizer), out=z_pos).mul_(2.0)
        torch.div(relevance, _stabilize(z_neg, stabilizer), out=z_neg).neg_()
        return conv.conv_input_grad(x.shape, weight, z).mul_(x)
    w_pos, w_neg = conv.weight.clamp(min=0), conv.weight.clamp(max=0)
    if conv.bias is None:
        b_pos = b_neg = None
    else:
        b_pos, b_neg = conv.bias.clamp(min=0), conv.bias.clamp(max=0)
    x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
    grad_pos = relevance / _stabilize(conv.conv(x_pos, w_pos, b_pos) + conv.conv(x_neg, w_neg, None), stabilizer)
    grad_neg = relevance / _stabilize(conv.conv(x_pos, w_neg, b_neg) + conv.conv(x_neg, w_pos, None), stabilizer)

    def back(weight, grad):
        return conv.conv_input_grad(x.shape, weight, grad)

    return 2 * (x_pos * back(w_pos, grad_pos) + x_neg * back(w_neg, grad_pos)) - 1 * (
        x_pos * back(w_neg, grad_neg) + x_neg * back(w_pos, grad_neg)
    )


def _flat(conv: _Conv, x: torch.Tensor, relevance: torch.Tensor, stabilizer: float, signed: bool) -> torch.Tensor:
    ones, z = conv.flat(x, stabilizer)
    return conv.conv_input_grad(x.shape, ones, relevance / z)


_CONV_RULES = {"zplus": _zplus, "alpha2beta1": _alpha2beta1, "flat": _flat}


def _output_relevance(logits: torch.Tensor, targets: torch.Tensor, initial: str) -> torch.Tensor:
    onehot = F.one_hot(targets.to(logits.device), logits.shape[1]).to(logits.dtype)
    if initial == "onehot":
        return onehot
    if initial == "logit":
        return onehot * logits
    raise ValueError(f"initial_relevance must be 'onehot' or 'logit', not {initial!r}")


def _avgpool_norm(x: torch.Tensor, relevance: torch.Tensor, stabilizer: float) -> torch.Tensor:
    """``Norm`` on the global average pool: ``x · (R / stab(mean x)) / (H·W)`` (``x`` a ReLU output, ≥ 0)."""
    pooled = x.mean(dim=(2, 3))
    grad = relevance / _stabilize_nonnegative_(pooled, stabilizer)
    return x * (grad / (x.shape[2] * x.shape[3]))[:, :, None, None]


def _maxpool(pool: nn.MaxPool2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The max-pool's output and where each maximum came from (for its backward)."""
    return F.max_pool2d(
        x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, ceil_mode=pool.ceil_mode, return_indices=True
    )


def _maxpool_backward(
    pool: nn.MaxPool2d, x: torch.Tensor, relevance: torch.Tensor, indices: torch.Tensor | None = None
) -> torch.Tensor:
    """The max-pool's gradient: ``relevance`` to each window's maximum (``indices`` from ``_maxpool``, or found
    again)."""
    if indices is None:
        _, indices = _maxpool(pool, x)
    return torch.ops.aten.max_pool2d_with_indices_backward(
        relevance,
        x,
        _pair(pool.kernel_size),
        _pair(pool.stride),
        _pair(pool.padding),
        _pair(pool.dilation),
        pool.ceil_mode,
        indices,
    )


def _pair(value) -> list[int]:
    return list(value) if isinstance(value, tuple | list) else [value, value]


class _BlockTrace(NamedTuple):
    """What the reverse rules read of one residual block's forward pass."""

    inputs: list[torch.Tensor]  # each convolution's input
    identity: torch.Tensor  # the shortcut (downsampled where the block has a downsample)
    branch: torch.Tensor  # the last convolution's output, before the addition
    pre: torch.Tensor  # the addition, before its ReLU (the block's output is its ReLU: the next block's input)


class _Trace(NamedTuple):
    """What the reverse rules read of the forward pass."""

    stem_out: torch.Tensor  # the stem's ReLU output
    pool_indices: torch.Tensor  # where the max-pool took each maximum
    blocks: list[_BlockTrace]
    h: torch.Tensor  # the last block's output
    pooled: torch.Tensor
    logits: torch.Tensor


def _forward(net: tv.ResNet, stem: _Conv, blocks: list[_Block], x: torch.Tensor) -> _Trace:
    """One forward pass that keeps what the reverse rules read. The residual addition is a plain ``+``: the sum
    of two floats is one rounding in any order, so it equals Zennit's stacked sum to the bit."""
    stem_out = stem.forward(x).relu_()
    h, pool_indices = _maxpool(net.maxpool, stem_out)
    traces = []
    for block in blocks:
        inputs = [h]
        out = h
        for k, conv in enumerate(block.convs):
            out = conv.forward(out)
            if k < len(block.convs) - 1:
                out = out.relu_()
                inputs.append(out)
        identity = h if block.downsample is None else block.downsample.forward(h)
        pre = out + identity
        h = torch.relu(pre)
        traces.append(_BlockTrace(inputs, identity, out, pre))
    pooled = torch.flatten(net.avgpool(h), 1)
    return _Trace(stem_out, pool_indices, traces, h, pooled, net.fc(pooled))


@torch.no_grad()
def lrp(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    composite: str,
    canonizer: str = "resnet",
    epsilon: float = 1e-6,
    stabilizer: float = 1e-6,
    initial_relevance: str = "onehot",
) -> torch.Tensor:
    """The relevance Zennit's ``composite`` (one of ``COMPOSITES``) with ``canonizer`` gives, N×C×H×W."""
    if composite not in COMPOSITES:
        raise ValueError(f"composite must be one of {', '.join(COMPOSITES)}, not {composite!r}")
    if canonizer not in ("resnet", "batchnorm-only"):
        raise ValueError(f"canonizer must be one of resnet, batchnorm-only, not {canonizer!r}")
    conv_rule, first_rule, _ = COMPOSITES[composite]
    rule, first = _CONV_RULES[conv_rule], _CONV_RULES[first_rule]
    residual_norm = canonizer == "resnet"
    net = cast(tv.ResNet, model)
    stem, blocks = _prepared(net, merge=True)
    x = x.detach()

    # Forward: keep what the reverse rules read.
    trace = _forward(net, stem, blocks, x)

    # Reverse sweep.
    relevance = _output_relevance(trace.logits, targets, initial_relevance)
    grad = relevance / _stabilize(trace.logits, epsilon)  # Epsilon on the dense layer
    relevance = trace.pooled * (grad @ net.fc.weight)
    relevance = _avgpool_norm(trace.h, relevance, stabilizer)
    for block, block_trace in zip(reversed(blocks), reversed(trace.blocks)):
        inputs, identity, out = block_trace.inputs, block_trace.identity, block_trace.branch
        # ReLU after the addition: Pass.
        if residual_norm:
            grad = relevance / _stabilize(block_trace.pre, stabilizer)
            r_identity, r_branch = identity * grad, out * grad
        else:
            r_identity = r_branch = relevance
        for conv, conv_input in zip(reversed(block.convs), reversed(inputs)):
            r_branch = rule(conv, conv_input, r_branch, stabilizer, False)  # the ReLUs between: Pass
        if block.downsample is not None:
            r_identity = rule(block.downsample, inputs[0], r_identity, stabilizer, False)
        relevance = r_branch.add_(r_identity)
    relevance = _maxpool_backward(net.maxpool, trace.stem_out, relevance, trace.pool_indices)
    return first(stem, x, relevance, stabilizer, True)


@torch.no_grad()
def excitation_backprop(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    stabilizer: float = 1e-6,
    initial_relevance: str = "onehot",
) -> torch.Tensor:
    """The relevance of ``zennit.composites.ExcitationBackprop`` (no canonizer), N×C×H×W."""
    net = cast(tv.ResNet, model)
    stem, blocks = _prepared(net, merge=False)
    x = x.detach()
    trace = _forward(net, stem, blocks, x)
    stem_out, pooled = trace.stem_out, trace.pooled

    def bn_grad(conv: _Conv, relevance: torch.Tensor) -> torch.Tensor:
        assert conv.bn is not None
        return _bn_backward(conv.bn, relevance)

    relevance = _output_relevance(trace.logits, targets, initial_relevance)
    fc_w = net.fc.weight.clamp(min=0)
    z = F.linear(pooled, fc_w, net.fc.bias.clamp(min=0) if net.fc.bias is not None else None)
    relevance = pooled * ((relevance / _stabilize(z, stabilizer)) @ fc_w)
    relevance = _avgpool_norm(trace.h, relevance, stabilizer)
    for block, block_trace in zip(reversed(blocks), reversed(trace.blocks)):
        inputs = block_trace.inputs
        relevance = torch.where(block_trace.pre > 0, relevance, 0.0)  # the ReLU's gradient
        r_branch = relevance
        for k in reversed(range(len(block.convs))):
            conv = block.convs[k]
            r_branch = bn_grad(conv, r_branch)
            r_branch = _zplus(conv, inputs[k], r_branch, stabilizer, False)
            if k > 0:
                r_branch = torch.where(inputs[k] > 0, r_branch, 0.0)
        r_identity = relevance
        if block.downsample is not None:
            r_identity = _zplus(block.downsample, inputs[0], bn_grad(block.downsample, r_identity), stabilizer, False)
        relevance = r_branch.add_(r_identity)
    relevance = _maxpool_backward(net.maxpool, stem_out, relevance, trace.pool_indices)
    relevance = torch.where(stem_out > 0, relevance, 0.0)
    return _zplus(stem, x, bn_grad(stem, relevance), stabilizer, True)


def _bn_backward(bn: nn.BatchNorm2d, grad: torch.Tensor) -> torch.Tensor:
    """The gradient through an eval-mode batch norm: ``grad · γ/√(σ²+ε)`` per channel."""
    assert bn.running_var is not None
    return grad * (bn.weight * torch.rsqrt(bn.running_var + bn.eps))[:, None, None]


def _rescale(grad: torch.Tensor, pre: tuple[torch.Tensor, torch.Tensor], out: tuple[torch.Tensor, torch.Tensor], eps):
    """Captum's rescale rule on one ReLU (``deep_lift.nonlinear``): ``grad·Δout/Δin``, the plain gradient where
    ``|Δin| < eps``."""
    delta_in, delta_out = pre[0] - pre[1], out[0] - out[1]
    return torch.where(delta_in.abs() < eps, torch.where(out[0] > 0, grad, 0.0), grad * delta_out / delta_in)


def _maxpool_rescale(pool: nn.MaxPool2d, grad: torch.Tensor, x: torch.Tensor, ref: torch.Tensor, eps) -> torch.Tensor:
    """Captum's ``deep_lift.maxpool`` for the input half of its doubled batch. The reference half's gradient
    at the pool's output equals the input half's (every layer above treats both halves alike), so it is not
    computed; the reference's max positions come from pooling the reference once."""
    kernel, stride, padding = pool.kernel_size, pool.stride, pool.padding
    out_x, idx_x = F.max_pool2d(x, kernel, stride, padding, pool.dilation, pool.ceil_mode, True)
    out_ref, idx_ref = F.max_pool2d(ref, kernel, stride, padding, pool.dilation, pool.ceil_mode, True)
    delta_in = x - ref
    cross_max = torch.max(out_x, out_ref)
    size = list(x.shape)
    to_x = F.max_unpool2d(grad * (cross_max - out_ref), idx_x, kernel, stride, padding, size)  # type: ignore[arg-type]
    to_ref = F.max_unpool2d(
        grad * (out_x - cross_max),
        idx_ref.expand_as(idx_x).contiguous(),
        kernel,  # type: ignore[arg-type]
        stride,  # type: ignore[arg-type]
        padding,  # type: ignore[arg-type]
        size,
    )
    # Where |Δin| < eps Captum falls back to ``grad_input[0]``; its hook receives the gradient as one tensor,
    # so that is the plain gradient of the batch's first image, for every image. Reproduced as it is.
    plain = _maxpool_backward(pool, x[:1], grad[:1])
    return torch.where(delta_in.abs() < eps, plain, (to_x + to_ref) / delta_in)


@torch.no_grad()
def deeplift(
    model: nn.Module, x: torch.Tensor, targets: torch.Tensor, multiply_by_inputs: bool = True, eps: float = 1e-10
) -> torch.Tensor:
    """Captum's ``DeepLift(model).attribute(x, baselines=0.0, target=targets)`` (rescale rule), N×C×H×W.

    Captum runs input and baseline as one doubled batch and backpropagates both halves. The baseline is the
    same zero image for every row, so its forward runs once (batch of one) and only the input half goes
    backward: one forward of N+1 images and one backward of N, against Captum's 2N and 2N.
    """
    net = cast(tv.ResNet, model)
    stem, blocks = _prepared(net, merge=False)
    x = x.detach()
    both = torch.cat([x, torch.zeros_like(x[:1])])  # the inputs, then the (one) baseline
    n = len(x)

    def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return t[:n], t[n:]

    stem_pre = stem.forward(both)
    stem_out = torch.relu(stem_pre)
    h = net.maxpool(stem_out)
    saved = []
    for block in blocks:
        inputs, pres = [h], []
        out = h
        for k, conv in enumerate(block.convs):
            out = conv.forward(out)
            if k < len(block.convs) - 1:
                pres.append(out)
                out = torch.relu(out)
                inputs.append(out)
        identity = h if block.downsample is None else block.downsample.forward(h)
        pre = out + identity
        h = torch.relu(pre)
        saved.append((inputs, pres, pre, h))
    pooled = torch.flatten(net.avgpool(h), 1)
    logits = net.fc(pooled)

    grad = F.one_hot(targets.to(logits.device), logits.shape[1]).to(logits.dtype)[:n]
    grad = (grad @ net.fc.weight)[:, :, None, None].expand(-1, -1, *h.shape[2:]) / (h.shape[2] * h.shape[3])
    for block, (inputs, pres, pre, block_out) in zip(reversed(blocks), reversed(saved)):
        grad = _rescale(grad, split(pre), split(block_out), eps)
        g_branch = grad
        for k in reversed(range(len(block.convs))):
            conv = block.convs[k]
            g_branch = _bn_backward(conv.bn, g_branch)  # type: ignore[arg-type]
            g_branch = conv.conv_input_grad(inputs[k][:n].shape, conv.weight, g_branch)
            if k > 0:
                g_branch = _rescale(g_branch, split(pres[k - 1]), split(inputs[k]), eps)
        g_identity = grad
        if block.downsample is not None:
            down = block.downsample
            g_identity = down.conv_input_grad(inputs[0][:n].shape, down.weight, _bn_backward(down.bn, grad))  # type: ignore[arg-type]
        grad = g_branch + g_identity
    # The stem's ReLU feeds the max-pool directly. Captum's hook on the ReLU records the gradient at its output
    # before the max-pool's hook rewrites it (tensor hooks run in the order they were registered), so the
    # ReLU's multipliers apply to the max-pool's plain gradient; only where |Δin| < eps does the rewritten
    # gradient pass (as the ReLU's own gradient). Reproduced as it is.
    plain = _maxpool_backward(net.maxpool, stem_out[:n], grad)
    grad = _maxpool_rescale(net.maxpool, grad, stem_out[:n], stem_out[n:], eps)
    delta_in = stem_pre[:n] - stem_pre[n:]
    grad = torch.where(
        delta_in.abs() < eps,
        torch.where(stem_out[:n] > 0, grad, 0.0),
        plain * (stem_out[:n] - stem_out[n:]) / delta_in,
    )
    grad = stem.conv_input_grad(x.shape, stem.weight, _bn_backward(stem.bn, grad))  # type: ignore[arg-type]
    return x * grad if multiply_by_inputs else grad
