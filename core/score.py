"""From attributions to relevance maps to one score per face region (paper eq. 4)."""
from __future__ import annotations

import warnings

import numpy as np
import torch

RELEVANCE_MODES = ("abs", "positive", "signed")


def channel_sums(attribution: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Σ|a|, Σa) over channels, N×H×W float32: all that every relevance mode needs, at 2/3 of the size."""
    a = attribution.detach().cpu().numpy() if isinstance(attribution, torch.Tensor) else np.asarray(attribution)
    if a.ndim != 4:
        raise ValueError(f"attribution must be N×C×H×W, got shape {a.shape}")
    a = a.astype(np.float32, copy=False)
    return np.abs(a).sum(axis=1), a.sum(axis=1)


def relevance_from_sums(abs_sum: np.ndarray, signed_sum: np.ndarray, mode: str = "abs") -> np.ndarray:
    """N×H×W maps from channel sums; see ``relevance_map`` for the modes."""
    if mode == "abs":
        maps = abs_sum
    elif mode == "positive":
        maps = np.clip(signed_sum, 0.0, None)
    elif mode == "signed":
        scale = np.abs(signed_sum).max(axis=(-2, -1), keepdims=True)
        return np.divide(signed_sum, scale, out=np.zeros_like(signed_sum), where=scale > 0)
    else:
        raise ValueError(f"mode must be one of {', '.join(RELEVANCE_MODES)}, not {mode!r}")
    low = maps.min(axis=(-2, -1), keepdims=True)
    span = maps.max(axis=(-2, -1), keepdims=True) - low
    return np.divide(maps - low, span, out=np.zeros_like(maps), where=span > 0)


def relevance_map(attribution: torch.Tensor | np.ndarray, mode: str = "abs") -> np.ndarray:
    """N×H×W float32 maps from N×C×H×W attributions.

    ``abs`` (the paper): sum of |a| over channels, min–max to [0, 1] per image.
    ``positive``: sum over channels, negatives set to 0, then min–max: evidence *for* the target only.
    ``signed``: sum over channels divided by the largest magnitude, so in [−1, 1] with 0 kept at 0.
    A constant map (e.g. an all-zero gradient) becomes all zeros instead of dividing by zero.
    """
    if mode not in RELEVANCE_MODES:
        raise ValueError(f"mode must be one of {', '.join(RELEVANCE_MODES)}, not {mode!r}")
    return relevance_from_sums(*channel_sums(attribution), mode)


def region_scores(maps: np.ndarray, masks: np.ndarray, names: tuple[str, ...] | None = None) -> np.ndarray:
    """N×R scores C_i = Σ(map·mask_i) / Σ mask_i (paper eq. 4).

    ``masks`` is R×H×W (one set for every image) or N×R×H×W (one set per image). An empty region
    gives NaN and a warning naming it, so one missing face part never sinks a whole dataset.
    """
    maps = np.asarray(maps, dtype=np.float32)
    masks = np.asarray(masks, dtype=bool)
    if maps.ndim != 3:
        raise ValueError(f"maps must be N×H×W, got shape {maps.shape}")
    if masks.ndim == 3:
        masks = masks[None]
    if masks.ndim != 4 or masks.shape[-2:] != maps.shape[-2:] or masks.shape[0] not in (1, maps.shape[0]):
        raise ValueError(f"masks of shape {masks.shape} do not fit maps of shape {maps.shape}")
    n, r = maps.shape[0], masks.shape[1]
    flat_maps = maps.reshape(n, -1)
    flat_masks = masks.reshape(masks.shape[0], r, -1).astype(np.float32)
    # One matrix product: no Python loop over images, pixels or regions.
    if masks.shape[0] == n:
        sums = np.einsum("nrp,np->nr", flat_masks, flat_maps)
    else:
        sums = flat_maps @ flat_masks[0].T
    areas = np.broadcast_to(flat_masks.sum(axis=2), (n, r)).astype(np.float32)
    empty = areas == 0
    if empty.any():
        which = sorted({(names[j] if names else f"region {j}") for j in np.nonzero(empty)[1]})
        warnings.warn(f"empty region(s) {', '.join(which)}: their scores are NaN", RuntimeWarning, stacklevel=2)
    return np.divide(sums, areas, out=np.full((n, r), np.nan, dtype=np.float32), where=~empty)
