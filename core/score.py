"""From attributions to relevance maps to one score per face region (paper eq. 4).

A score is C_i = Σ(map·mask_i) / Σ mask_i, divided in one place (``region_means``). The sums come
from boolean masks (``region_scores``: any masks, overlapping or not) or, for re-scoring stored
maps, from run-length segments (``encode_segments``, ``plan_sums``, ``segment_sums``): a region
spec's masks never overlap, so each label map becomes runs of equal region index along its
flattened pixels, and a region's sum is ``np.add.reduceat`` over those runs followed by a
``bincount``. That reads each map once, from its first to its last region pixel, in float32
chunks that stay in the CPU cache (alternatives and timings: docs/DECISIONS.md, "Extraction and
re-scoring"; ``bench/rescore_speed.py``). Where numba is installed, ``core.score_kernel`` walks the same
runs in one compiled loop instead (issue 12); either way the sums reach ``region_means``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from core import score_kernel
from core.regions import RegionSpec, region_masks

RELEVANCE_MODES = ("abs", "positive", "signed", "abs-raw")
_CHUNK = 16  # maps per float32 chunk: 3.2 MB at 224², about what one core's L2 and L3 share keeps hot
_PIECE = 32768  # elements per float16 -> float32 copy: torch's GRAIN_SIZE, so the copy runs on this thread
_MERGE_GAP = 8192  # elements between two spans below which one copy reads both (a copy call costs ~3 µs)


def channel_sums(attribution: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Σ|a|, Σa) over channels, N×H×W float32: all that every relevance mode needs, at 2/3 of the size."""
    a = attribution.detach().cpu().numpy() if isinstance(attribution, torch.Tensor) else np.asarray(attribution)
    if a.ndim != 4:
        raise ValueError(f"attribution must be N×C×H×W, got shape {a.shape}")
    a = a.astype(np.float32, copy=False)
    return np.abs(a).sum(axis=1), a.sum(axis=1)


def relevance_from_sums(abs_sum: np.ndarray, signed_sum: np.ndarray, mode: str = "abs") -> np.ndarray:
    """N×H×W maps from channel sums; see ``relevance_map`` for the modes."""
    if mode == "abs-raw":
        return np.array(abs_sum, dtype=np.float32)  # a copy: callers may write into their maps
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
    ``abs-raw`` (the released code's RQ1, Table 3: its min–max line is commented out): sum of |a| over
    channels, not normalised, so in the attribution's own units.
    A constant map (e.g. an all-zero gradient) becomes all zeros instead of dividing by zero.
    """
    if mode not in RELEVANCE_MODES:
        raise ValueError(f"mode must be one of {', '.join(RELEVANCE_MODES)}, not {mode!r}")
    return relevance_from_sums(*channel_sums(attribution), mode)


def stored_map_dtype(mode: str) -> type[np.floating]:
    """What a relevance store keeps maps of ``mode`` in: float16 for maps in [0, 1] or [−1, 1]; float32
    for raw sums, whose small values (an LRP map of 224² pixels sharing a relevance of about 1 puts
    ~2e-5 on a pixel) fall below float16's normal range (6e-5) and would lose their precision."""
    return np.float32 if mode == "abs-raw" else np.float16


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
    sums = np.einsum("nrp,np->nr", flat_masks, flat_maps) if masks.shape[0] == n else flat_maps @ flat_masks[0].T
    areas = np.broadcast_to(flat_masks.sum(axis=2), (n, r)).astype(np.float32)
    empty = areas == 0
    if empty.any():
        which = sorted({(names[j] if names else f"region {j}") for j in np.nonzero(empty)[1]})
        warnings.warn(f"empty region(s) {', '.join(which)}: their scores are NaN", RuntimeWarning, stacklevel=2)
    return region_means(sums, areas)


def region_means(sums: np.ndarray, areas: np.ndarray) -> np.ndarray:
    """C_i = Σ(map·mask_i) / Σ mask_i from N×R sums and areas (areas broadcast), in the sums' precision.

    The one division of eq. 4, whichever way the sums were made; an empty region gives NaN."""
    areas = np.broadcast_to(areas, sums.shape)
    out = np.full(sums.shape, np.nan, dtype=np.result_type(sums.dtype, np.float32))
    return np.divide(sums, areas, out=out, where=areas > 0)


@dataclass(frozen=True, eq=False)
class RegionSegments:
    """A region spec's masks over N label maps, as runs of equal region index along each flattened
    map (index ``len(names)`` = no region), from its first to its last region pixel only: the rest
    of a map is never read. Regions never overlap, so this is exact."""

    names: tuple[str, ...]
    starts: np.ndarray  # int32: first pixel of each run, per image, concatenated
    regions: np.ndarray  # region index of each run: uint8, uint16 beyond 255 regions (``region_index_dtype``)
    offsets: np.ndarray  # int64, N + 1: image i's runs are [offsets[i], offsets[i + 1])
    spans: np.ndarray  # int32, N × 2: first and end pixel of the runs (first to last region pixel)
    areas: np.ndarray  # int64, N × R: pixels of each region


def region_index_dtype(regions: int) -> type[np.unsignedinteger]:
    """The smallest unsigned type holding region indices 0..``regions`` (``regions`` itself means no
    region): uint8 up to 255 regions, uint16 beyond (a stored spec's caps normally keep it far lower)."""
    if regions <= np.iinfo(np.uint8).max:
        return np.uint8
    if regions <= np.iinfo(np.uint16).max:
        return np.uint16
    raise ValueError(f"a spec of {regions} regions is beyond any region index type here (at most 65535)")


def encode_segments(label_maps: np.ndarray, spec: RegionSpec) -> RegionSegments:
    """``spec``'s masks over N×S×S label maps as run-length segments.

    ``region_masks``' empty-region warnings are silenced: ``areas`` shows them, and the caller names
    the faces once for a whole dataset instead of once per chunk."""
    names = tuple(rule.name for rule in spec.regions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masks = region_masks(np.asarray(label_maps), spec).masks
    n = len(masks)
    dtype = region_index_dtype(len(names))
    index = np.full((n, masks.shape[2] * masks.shape[3]), len(names), dtype=dtype)
    for r in range(len(names)):
        index[masks[:, r].reshape(n, -1)] = r
    starts, regions = [], []
    counts = np.zeros(n, dtype=np.int64)
    spans = np.zeros((n, 2), dtype=np.int32)
    for image, pixels in enumerate(index):
        inside = np.flatnonzero(pixels != len(names))
        if not inside.size:
            continue
        span = pixels[inside[0] : inside[-1] + 1]
        change = np.flatnonzero(np.concatenate(([True], span[1:] != span[:-1])))
        starts.append((change + inside[0]).astype(np.int32))
        regions.append(span[change])
        counts[image], spans[image] = len(change), (inside[0], inside[-1] + 1)
    return RegionSegments(
        names,
        _concatenate(starts, np.int32),
        _concatenate(regions, dtype),
        np.concatenate([[0], np.cumsum(counts)]),
        spans,
        masks.sum(axis=(2, 3)),
    )


def join_segments(names: tuple[str, ...], n: int, parts: Sequence[tuple[np.ndarray, RegionSegments]]) -> RegionSegments:
    """One set of segments over ``n`` images from ``(images, segments of those images)`` parts in
    ascending image order (so masks are computed a bounded chunk at a time); images no part
    covers have no runs and zero areas."""
    counts = np.zeros(n, dtype=np.int64)
    spans = np.zeros((n, 2), dtype=np.int32)
    areas = np.zeros((n, len(names)), dtype=np.int64)
    for images, part in parts:
        counts[images], spans[images], areas[images] = np.diff(part.offsets), part.spans, part.areas
    return RegionSegments(
        names,
        _concatenate([p.starts for _, p in parts], np.int32),
        _concatenate([p.regions for _, p in parts], region_index_dtype(len(names))),
        np.concatenate([[0], np.cumsum(counts)]),
        spans,
        areas,
    )


@dataclass(frozen=True, eq=False)
class SumPlan:
    """How ``segment_sums`` sums rows ``lo:hi`` of a maps file: the copies (first and end element of
    the flattened file, place in the float32 buffer), the buffer length used, and per run its
    ``reduceat`` boundary in the buffer and ``bincount`` slot (row × (R + 1) + region)."""

    lo: int
    hi: int
    bounds: np.ndarray
    labels: np.ndarray
    copies: tuple[tuple[int, int, int], ...]
    used: int


def plan_sums(segments: RegionSegments, rows: np.ndarray, images: np.ndarray, pixels: int) -> list[SumPlan]:
    """The plans that sum ``rows`` of a maps file of ``pixels``-pixel maps, row k showing ``images[k]``.

    Depends only on the segments and rows, so one plan serves every method of a model. ``rows`` must
    ascend (as a store's rows do): a chunk's copies follow the file forwards."""
    if np.any(np.diff(np.asarray(rows, dtype=np.int64)) <= 0):
        raise ValueError("plan_sums needs strictly ascending rows")
    return [
        SumPlan(
            lo,
            min(lo + _CHUNK, len(rows)),
            *_chunk_plan(segments, rows[lo : lo + _CHUNK], images[lo : lo + _CHUNK], pixels),
        )
        for lo in range(0, len(rows), _CHUNK)
    ]


def segment_sums(maps: np.ndarray, plans: Sequence[SumPlan], regions: int, compiled: bool | None = None) -> np.ndarray:
    """rows × R float64 sums Σ(map·mask_r) of a (memory-mapped, writable) N×S×S float16 (or float32,
    ``stored_map_dtype``) maps file.

    ``compiled`` (default: when numba is installed) walks the plans with ``core.score_kernel``: float64
    sums read in place, equal to this numpy path to float32 rounding (the path below adds each run in
    float32). ``compiled=False`` forces the numpy path, which needs nothing beyond numpy and torch."""
    if compiled is None:
        compiled = score_kernel.available()
    if compiled:
        return _compiled_segment_sums(maps, plans, regions)
    return _numpy_segment_sums(maps, plans, regions)


def _compiled_segment_sums(maps: np.ndarray, plans: Sequence[SumPlan], regions: int) -> np.ndarray:
    flat = maps.reshape(-1)
    values = flat.view(np.uint16) if flat.dtype == np.float16 else flat.astype(np.float32, copy=False)
    reach = max((end for plan in plans for _, end, _ in plan.copies), default=0)
    if reach > values.size:  # the kernel does not check its reads: a short file is refused here
        raise ValueError(f"the maps file has {values.size} values, the plans read up to {reach}")
    sums = np.zeros((plans[-1].hi if plans else 0, regions + 1), dtype=np.float64)
    for plan in plans:
        if len(plan.bounds):
            copies = np.array(plan.copies, dtype=np.int64).reshape(-1, 3)
            score_kernel.chunk_sums(
                values, plan.bounds, plan.labels, copies, plan.used, regions, sums[plan.lo : plan.hi]
            )
    return sums[:, :-1]


def _numpy_segment_sums(maps: np.ndarray, plans: Sequence[SumPlan], regions: int) -> np.ndarray:
    """``segment_sums`` without numba. Per chunk: float16 spans -> float32 buffer -> run sums -> region
    sums. One thread: two threads over halves of the chunks gave no consistent gain on 2 cores (the copy
    loop holds the GIL between pieces), and a second dashboard session keeps its own core."""
    source = torch.from_numpy(maps.reshape(-1))
    sums = np.empty((plans[-1].hi if plans else 0, regions), dtype=np.float64)
    flat = torch.empty(max((plan.used for plan in plans), default=0), dtype=torch.float32)
    for plan in plans:
        # torch casts float16 -> float32 with SIMD (numpy's cast is ~20× slower) into a buffer that stays in
        # cache, in pieces below torch's parallel grain: waking the OpenMP pool between numpy calls stalls
        # ~10× on a busy machine (measured).
        for first, end, at in plan.copies:
            for start in range(first, end, _PIECE):
                stop = min(start + _PIECE, end)
                flat[at + start - first : at + stop - first].copy_(source[start:stop])
        k = plan.hi - plan.lo
        totals: np.ndarray = np.zeros(k * (regions + 1))
        if len(plan.bounds):
            totals = np.bincount(
                plan.labels, weights=np.add.reduceat(flat[: plan.used].numpy(), plan.bounds), minlength=len(totals)
            )
        sums[plan.lo : plan.hi] = totals.reshape(k, regions + 1)[:, :-1]
    return sums


def _chunk_plan(segments: RegionSegments, rows: np.ndarray, images: np.ndarray, pixels: int) -> tuple:
    """``SumPlan``'s bounds, labels, copies and used for one chunk of rows.

    Only the spans of the maps are copied (first to last region pixel), and neighbouring spans are
    merged into one copy when less than ``_MERGE_GAP`` elements lie between them: skipping a gap
    saves reading it but costs a copy call."""
    take = _run_positions(segments.offsets, images)
    counts = segments.offsets[images + 1] - segments.offsets[images]
    first = rows * pixels + segments.spans[images, 0]
    end = rows * pixels + segments.spans[images, 1]
    copies: list[list[int]] = []  # [first, end, place in the buffer]
    placed = np.zeros(len(images), dtype=np.int64)  # buffer position of each span's start
    used = 0
    for i in np.flatnonzero(end > first):
        if copies and first[i] - copies[-1][1] < _MERGE_GAP:
            copies[-1][1] = int(end[i])
        else:
            copies.append([int(first[i]), int(end[i]), used])
        placed[i] = copies[-1][2] + first[i] - copies[-1][0]
        used = copies[-1][2] + copies[-1][1] - copies[-1][0]
    image = np.repeat(np.arange(len(images), dtype=np.int64), counts)
    bounds = segments.starts[take].astype(np.int64) - segments.spans[images, 0][image] + placed[image]
    labels = segments.regions[take].astype(np.int64) + image * (len(segments.names) + 1)
    # Where a merged copy carries a gap after a span, a run of "no region" must start there, or the
    # span's last run would sum the gap too.
    spanned = np.flatnonzero(end > first)
    span_ends = placed[spanned] + (end - first)[spanned]
    gap = span_ends[:-1] < placed[spanned[1:]]
    gap_bounds = span_ends[:-1][gap]
    gap_labels = spanned[:-1][gap] * (len(segments.names) + 1) + len(segments.names)
    order = np.argsort(np.concatenate([bounds, gap_bounds]), kind="stable")
    return (
        np.concatenate([bounds, gap_bounds])[order],
        np.concatenate([labels, gap_labels])[order],
        tuple(tuple(c) for c in copies),
        used,
    )


def _run_positions(offsets: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Indices of the runs of ``images`` (in that order) in the concatenated run arrays."""
    counts = offsets[images + 1] - offsets[images]
    firsts = np.repeat(offsets[images] - (np.cumsum(counts) - counts), counts)
    return firsts + np.arange(int(counts.sum()), dtype=np.int64)


def _concatenate(arrays: Sequence[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(arrays) if len(arrays) else np.zeros(0, dtype=dtype)
