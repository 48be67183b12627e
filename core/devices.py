"""Where a network runs: ``auto | cpu | cuda | cuda:N`` resolved once at the edge, then read off the model.

A loaded model carries its device (its parameters live there); every step that feeds it moves its
inputs to ``module_device(model)``, so nothing below the CLI or the dashboard takes a device argument
besides the loaders and the trainers. Batch sizes that were tuned for 2 CPU cores follow the device:
on a GPU they come from its free memory (``device_batch``), on the CPU they stay today's constants.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from core.errors import UserFacingError

DEVICE_NAMES = "auto, cpu, cuda or cuda:N"
_CUDA = re.compile(r"cuda(?::(\d+))?")


class DeviceError(UserFacingError, ValueError):
    """A device name no step knows, or a GPU this machine does not have."""


def resolve_device(name: str | torch.device | None = "auto", source: str = "device") -> torch.device:
    """``auto`` (the first GPU when PyTorch sees one, else the CPU), ``cpu``, ``cuda`` (= ``cuda:0``) or
    ``cuda:N`` as a ``torch.device``; a bad name or a missing GPU is one ``DeviceError`` line naming ``source``
    (the flag or variable it came from)."""
    if isinstance(name, torch.device):
        name = str(name)
    text = (name or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA.fullmatch(text)
    if match is None:
        raise DeviceError(f"{source} {name!r} is not a device; use {DEVICE_NAMES}")
    index = int(match.group(1) or 0)
    if not torch.cuda.is_available():
        raise DeviceError(
            f"{source} {name!r}: PyTorch sees no CUDA GPU on this machine (no driver, no GPU, or a CPU-only "
            "torch build); use cpu or auto"
        )
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"{source} {name!r}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def module_device(module: nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); the CPU for a model with neither."""
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")


def module_dtype(module: nn.Module) -> torch.dtype:
    for tensor in module.parameters():
        return tensor.dtype
    return torch.float32


def precision_tag(device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """What decides a result's rounding besides the code: ``cpu/float32``, or ``cuda/tf32`` when cuDNN may
    run float32 convolutions in TF32 (PyTorch's default on Ampere and later), else ``cuda/float32``."""
    precision = str(dtype).removeprefix("torch.")
    if device.type == "cuda" and dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        precision = "tf32"
    return f"{device.type}/{precision}"


def free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device (``torch.cuda.mem_get_info``); None elsewhere (the CPU's constants apply)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


# Bytes per input element (pixel × channel) one image holds in a pass of a ResNet at its input size: a
# conservative estimate, not measured on a GPU here (ResNet-50 at 224 px: ~30 MB per image for a forward
# without a graph, ~120 MB for a forward and backward with Zennit's or Captum's hooks).
FORWARD_BYTES_PER_INPUT = 200
BACKWARD_BYTES_PER_INPUT = 800
MEMORY_FRACTION = 0.5  # of the free memory a derived batch may plan to use: the rest for the allocator's slack


def device_batch(
    device: torch.device,
    cpu_value: int,
    image_elements: int,
    backward: bool,
    cap: int = 1024,
    free: int | None = None,
) -> int:
    """Images one pass may hold on ``device``: ``cpu_value`` on the CPU (today's tuned constant, so CPU
    results and speed are unchanged); on a GPU, what ``MEMORY_FRACTION`` of its free memory holds at the
    per-image estimate above, between 1 and ``cap``. ``free`` overrides the measured free bytes (tests)."""
    if device.type != "cuda":
        return cpu_value
    if free is None:
        free = free_memory(device) or 0
    per_image = image_elements * (BACKWARD_BYTES_PER_INPUT if backward else FORWARD_BYTES_PER_INPUT)
    return max(1, min(cap, int(free * MEMORY_FRACTION) // max(1, per_image)))
