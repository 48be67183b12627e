"""A classifier's penultimate features, and its out-of-domain guard stored beside its model card.

The guard (``core.domain.DomainGuard``) is one safetensors file, ``<card stem>.domain.safetensors``
next to the card (``guard_path`` is the one place that name is made): the class means and the
precision matrix as float64 tensors, the threshold and the rest in the header's metadata. Reading it
is defensive, since a card folder may come from anyone: the file is size-capped by what a guard of
this model can hold, safetensors never runs code, every number must be finite, the dimensions must
be the model's, and the stored fingerprint must be the loaded weights' (a guard fitted for other
weights is refused, not silently applied).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from torch import nn

from core.devices import module_device
from core.domain import DomainGuard, DomainGuardError
from models.locks import model_lock

GUARD_SUFFIX = ".domain.safetensors"
FORMAT = "1"
MAX_GROUPS = 1_000  # class means a guard may hold: far more classes than any syndrome classifier has
_HEADER_SLACK = 1 << 20  # bytes for the safetensors header and metadata
_TENSORS = ("means", "precision")


def guard_path(card_path: str | Path) -> Path:
    """Where the guard of the model card ``card_path`` lives: ``classifier-fold-1.json`` ->
    ``classifier-fold-1.domain.safetensors``."""
    card_path = Path(card_path)
    return card_path.with_name(card_path.stem + GUARD_SUFFIX)


def feature_dim(network: nn.Module) -> int:
    """Width of the penultimate layer: the input of the network's final ``fc`` layer."""
    head = getattr(network, "fc", None)
    if not isinstance(head, nn.Linear):
        raise DomainGuardError("this network has no final linear layer 'fc' to take penultimate features from")
    return int(head.in_features)


def penultimate_features(network: nn.Module, batch: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """N×D float64 penultimate features (the pooled features the ``fc`` head reads) of a preprocessed batch.

    A forward hook on ``fc`` catches its input; batched, without gradients, under the model's lock
    (attribution in another thread may have merged the batch norms meanwhile)."""
    dim = feature_dim(network)
    head = network.get_submodule("fc")
    caught: list[torch.Tensor] = []

    def catch(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        caught.append(inputs[0].detach().flatten(1))

    device = module_device(network)
    with model_lock(network), torch.no_grad():
        handle = head.register_forward_hook(catch)
        try:
            for start in range(0, len(batch), batch_size):
                network(batch[start : start + batch_size].to(device))
        finally:
            handle.remove()
    if not caught:
        return np.zeros((0, dim), dtype=np.float64)
    return torch.cat(caught).cpu().to(torch.float64).numpy()


def save_domain_guard(guard: DomainGuard, card_path: str | Path) -> Path:
    """Write the guard beside the card (under a temporary name, then renamed); return its path."""
    path = guard_path(card_path)
    metadata = {
        "format": FORMAT,
        "fingerprint": guard.fingerprint,
        "threshold": repr(guard.threshold),
        "percentile": repr(guard.percentile),
        "shrinkage": repr(guard.shrinkage),
        "fitted_on": json.dumps(dict(guard.fitted_on)),
    }
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(
            {"means": np.ascontiguousarray(guard.means), "precision": np.ascontiguousarray(guard.precision)},
            str(temporary),
            metadata=metadata,
        )
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def max_guard_bytes(dim: int) -> int:
    """The largest file a guard of ``dim`` features can be: MAX_GROUPS means and a dim×dim precision."""
    return (MAX_GROUPS * dim + dim * dim) * 8 + _HEADER_SLACK


def read_domain_guard(card_path: str | Path, fingerprint: str, dim: int) -> DomainGuard | None:
    """The guard beside ``card_path`` for the model of ``fingerprint`` with ``dim`` features; None when
    there is none. A file that is not a guard of this model raises ``DomainGuardError`` saying why."""
    path = guard_path(card_path)
    if not path.is_file():
        return None
    where = f"the out-of-domain guard {path.name}"
    size = path.stat().st_size
    if size > max_guard_bytes(dim):
        raise DomainGuardError(
            f"{where} is {size} bytes, more than a guard of this model ({dim} features) can hold; "
            "delete it, or fit it again with python -m core fit-domain"
        )
    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            keys = sorted(handle.keys())
            if keys != sorted(_TENSORS):
                raise DomainGuardError(f"{where} holds tensors {keys}, not {list(_TENSORS)}")
            tensors = {key: handle.get_tensor(key) for key in _TENSORS}
    except (SafetensorError, OSError, ValueError) as error:
        if isinstance(error, DomainGuardError):
            raise
        raise DomainGuardError(f"{where} cannot be read as safetensors ({error}); delete it or fit it again") from None
    fields = _metadata_fields(metadata, where)
    if fields["fingerprint"] != fingerprint:
        raise DomainGuardError(
            f"{where} was fitted for other weights than this model's; run python -m core fit-domain "
            "for this model, or delete the file"
        )
    for key, tensor in tensors.items():
        if tensor.dtype != np.float64:
            raise DomainGuardError(f"{where}: tensor {key!r} is {tensor.dtype}, not float64")
    means = tensors["means"]
    if means.ndim != 2 or means.shape[1] != dim or not 1 <= means.shape[0] <= MAX_GROUPS:
        raise DomainGuardError(
            f"{where}: its class means are {means.shape}, but this model has {dim} penultimate features"
        )
    try:
        return DomainGuard(means=means, precision=tensors["precision"], **fields)
    except DomainGuardError as error:
        raise DomainGuardError(f"{where}: {error}") from None


def _metadata_fields(metadata: dict[str, str], where: str) -> dict[str, Any]:
    if metadata.get("format") != FORMAT:
        raise DomainGuardError(f"{where} is not a guard this version writes (format {metadata.get('format')!r})")
    try:
        numbers = {name: float(metadata[name]) for name in ("threshold", "percentile", "shrinkage")}
        fitted_on = json.loads(metadata.get("fitted_on", "{}"))
        fingerprint = metadata["fingerprint"]
    except (KeyError, ValueError) as error:
        raise DomainGuardError(f"{where}: its header is incomplete or damaged ({error})") from None
    if not all(math.isfinite(v) for v in numbers.values()):
        raise DomainGuardError(f"{where}: its threshold, percentile or shrinkage is not a finite number")
    if not isinstance(fitted_on, dict) or not all(
        isinstance(v, (str, int, float)) or v is None for v in fitted_on.values()
    ):
        raise DomainGuardError(f"{where}: its 'fitted_on' note is not a flat JSON object")
    return {**numbers, "fingerprint": fingerprint, "fitted_on": fitted_on}
