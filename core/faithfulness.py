"""Two checks beyond the paper: do region scores follow what the classifier needs, and do they follow the classifier at all?

*Region faithfulness*: blank one region of a face (its pixels replaced by the face's mean
colour, or by a strong blur of themselves) and measure how much the probability of the
explained class drops. A faithful method gives its highest C_i to the regions whose loss
hurts most: Spearman ρ between C_i and the drop, per method.

*Model randomisation* (Adebayo et al. 2018, "Sanity checks for saliency maps"): re-initialise
the classifier's top layers, cascading downwards, and recompute the maps. A method whose maps
barely change explains the image (edges, contrast), not the model.
"""
from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch
from scipy import ndimage, stats
from skimage.metrics import structural_similarity

from cache import DiskCache
from core.dataset import Dataset, read_photo
from core.errors import UserFacingError
from core.explain import attribution_sums, prepare_face
from core.regions import PAPER_REGIONS, RegionMasks, RegionSpec
from core.score import RELEVANCE_MODES, region_scores, relevance_from_sums
from models.checkpoint import Classifier, classify, model_fingerprint, preprocess
from models.locks import model_lock

BLANK_MODES = ("mean", "blur")
# Blur standard deviation as a fraction of the image side: 11 px at 224, about half an eye's width,
# so an eye, a nostril or a lip line is smeared into its surroundings.
BLUR_SIGMA = 0.05
# A rank correlation needs at least this many pairs (two always give ±1): per image, regions with a score and a drop.
MIN_PAIRS = 3
# ResNet top-level modules from the output down: the order Adebayo et al. randomise in.
CASCADE = ("fc", "layer4", "layer3", "layer2", "layer1", "bn1", "conv1")
# A map "changed" under randomisation when its mean pixel rank correlation with the trained map is below this.
CHANGED_BELOW = 0.5


@dataclass(frozen=True)
class RegionFaithfulness:
    drops: pl.DataFrame  # image_name, region, target, baseline_probability, blanked_probability, drop
    scores: pl.DataFrame  # image_name, method, region, score (C_i)
    summary: pl.DataFrame  # one row per method, see faithfulness_summary


@dataclass(frozen=True)
class RandomisationCheck:
    per_image: pl.DataFrame  # image_name, method, randomised, rank_correlation, ssim
    summary: pl.DataFrame  # one row per method × randomised, see randomisation_summary


def dataset_faces(dataset: Dataset, names: Sequence[str], size: int, spec: RegionSpec = PAPER_REGIONS,
                  parser=None, cache: DiskCache | None = None) -> tuple[np.ndarray, RegionMasks]:
    """Aligned faces N×size×size×3 and their region masks, each through ``prepare_face``: the dataset's
    landmarks and stored label maps where it has them, detection and the parser (or template) otherwise.
    Photos come through ``read_photo``, so a photo shrunk on loading keeps its landmarks and map on it."""
    faces, masks = [], []
    for name in names:
        photo = read_photo(dataset, name)
        face = prepare_face(photo.image, size, spec, landmarks=photo.landmarks,
                            parser=None if photo.label_map is not None else parser, stored_map=photo.label_map,
                            cache=cache)
        faces.append(face.aligned)
        masks.append(face.masks)
    return np.stack(faces), RegionMasks(tuple(rule.name for rule in spec.regions), np.stack(masks))


def blank_regions(faces: np.ndarray, masks: np.ndarray, mode: str = "mean", blur_sigma: float = BLUR_SIGMA) -> np.ndarray:
    """N×R×H×W×3 uint8: face n with region r blanked; every pixel outside region r keeps its bytes.

    ``mean``: the region takes the face's mean colour (per channel, over the whole aligned image).
    ``blur``: the region takes a Gaussian blur of the face (σ = ``blur_sigma`` × image side, reflected
    at the border), so colour and brightness stay but shapes and edges go.
    """
    faces = np.asarray(faces)
    masks = np.asarray(masks, dtype=bool)
    if faces.dtype != np.uint8 or faces.ndim != 4 or faces.shape[3] != 3:
        raise ValueError(f"faces must be RGB uint8 N×H×W×3, got {faces.dtype} {faces.shape}")
    if masks.ndim == 3:
        masks = np.broadcast_to(masks, (faces.shape[0], *masks.shape))
    if masks.ndim != 4 or masks.shape[0] != faces.shape[0] or masks.shape[2:] != faces.shape[1:3]:
        raise ValueError(f"masks of shape {masks.shape} do not fit faces of shape {faces.shape}")
    if mode == "mean":
        fill = np.broadcast_to(faces.mean(axis=(1, 2)).round().astype(np.uint8)[:, None, None, :], faces.shape)
    elif mode == "blur":
        sigma = blur_sigma * max(faces.shape[1:3])
        blurred = ndimage.gaussian_filter(faces.astype(np.float32), sigma=(0, sigma, sigma, 0), mode="reflect")
        fill = np.clip(blurred.round(), 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"blank must be one of {', '.join(BLANK_MODES)}, not {mode!r}")
    return np.where(masks[..., None], fill[:, None], faces[:, None])


def predicted_classes(classifier: Classifier, faces: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The classifier's predicted class index for each aligned face."""
    return np.concatenate([classify(classifier, preprocess(faces[i:i + batch_size], classifier.card))[1]
                           for i in range(0, len(faces), batch_size)])


def region_drops(classifier: Classifier, faces: np.ndarray, masks: np.ndarray, region_names: Sequence[str],
                 image_names: Sequence[str], targets: Sequence[int], blank: str = "mean",
                 batch_size: int = 64) -> pl.DataFrame:
    """Drop in the probability of class ``targets[n]`` when each region of face n is blanked: one row per
    image × region. The N×R blanked faces go through the classifier about ``batch_size`` at a time.
    An empty region has NaN blanked probability and drop (blanking nothing says nothing).
    """
    n, r = len(faces), len(region_names)
    masks = np.asarray(masks, dtype=bool)
    targets = np.asarray(targets, dtype=np.int64)
    baseline = np.concatenate([classify(classifier, preprocess(faces[i:i + batch_size], classifier.card))[0]
                               for i in range(0, n, batch_size)])
    blanked = np.empty((n, r), dtype=np.float64)
    per_chunk = max(1, batch_size // r)
    for start in range(0, n, per_chunk):
        chunk = slice(start, start + per_chunk)
        images = blank_regions(faces[chunk], masks[chunk], blank)
        probabilities, _ = classify(classifier, preprocess(images.reshape(-1, *faces.shape[1:]), classifier.card))
        probabilities = probabilities.reshape(len(images), r, -1)
        blanked[chunk] = np.take_along_axis(probabilities, targets[chunk, None, None], axis=2)[..., 0]
    blanked[~masks.any(axis=(2, 3))] = np.nan
    base = np.take_along_axis(baseline, targets[:, None], axis=1)[:, 0].astype(np.float64)
    classes = classifier.card.classes
    return pl.DataFrame({
        "image_name": np.repeat(list(image_names), r).tolist(),
        "region": list(region_names) * n,
        "target": np.repeat([classes[t] for t in targets], r).tolist(),
        "baseline_probability": np.repeat(base, r),
        "blanked_probability": blanked.ravel(),
        "drop": (base[:, None] - blanked).ravel(),
    }, nan_to_null=False)


def relevance_maps(classifier: Classifier, faces: np.ndarray, targets: Sequence[int], method: str, mode: str = "abs",
                   params: Mapping[str, Mapping[str, Any]] | None = None, cache: DiskCache | None = None,
                   batch_size: int = 16) -> np.ndarray:
    """N×H×W relevance maps of ``method`` for aligned faces, ``batch_size`` faces per attribution batch."""
    return np.concatenate([
        relevance_from_sums(*attribution_sums(classifier, faces[i:i + batch_size], targets[i:i + batch_size], method,
                                              (params or {}).get(method), cache=cache), mode)
        for i in range(0, len(faces), batch_size)])


def region_method_scores(classifier: Classifier, faces: np.ndarray, masks: np.ndarray, region_names: Sequence[str],
                         image_names: Sequence[str], methods: Sequence[str], targets: Sequence[int],
                         mode: str = "abs", params: Mapping[str, Mapping[str, Any]] | None = None,
                         cache: DiskCache | None = None, batch_size: int = 16,
                         progress: Callable[[str, int, int], None] | None = None) -> pl.DataFrame:
    """C_i of every image × method × region (paper eq. 4), long: image_name, method, region, score."""
    n, r = len(faces), len(region_names)
    tables = []
    for m, method in enumerate(methods):
        if progress is not None:
            progress(method, m, len(methods))
        maps = relevance_maps(classifier, faces, targets, method, mode, params, cache, batch_size)
        scores = region_scores(maps, masks, tuple(region_names))
        tables.append(pl.DataFrame({
            "image_name": np.repeat(list(image_names), r).tolist(), "method": [method] * (n * r),
            "region": list(region_names) * n, "score": scores.astype(np.float64).ravel()}, nan_to_null=False))
    return pl.concat(tables)


def faithfulness_summary(drops: pl.DataFrame, scores: pl.DataFrame) -> pl.DataFrame:
    """Per method, Spearman ρ between C_i and the drop its region's blanking causes.

    Headline (``rho``, ``p``, ``n``): within-image. For each image with ≥ ``MIN_PAIRS``
    regions holding both numbers (and neither constant), ρ across its regions; ``rho`` is their mean,
    ``rho_std`` their standard deviation, ``n`` how many images, ``p`` a two-sided Wilcoxon signed-rank
    test of the per-image ρ against 0 (images are the independent units). ``rho_pooled``, ``p_pooled``,
    ``n_pooled``: one Spearman ρ over all image × region pairs, which also rewards getting *between-image*
    differences right and treats a face's regions as independent (its p is optimistic).
    """
    joined = scores.join(drops.select("image_name", "region", "drop"), on=["image_name", "region"], how="inner")
    joined = joined.filter(pl.col("score").is_not_nan() & pl.col("drop").is_not_nan())
    rows = []
    for method in dict.fromkeys(scores["method"].to_list()):
        table = joined.filter(pl.col("method") == method)
        per_image = np.array([_spearman(group["score"].to_numpy(), group["drop"].to_numpy())[0]
                              for _, group in table.group_by("image_name", maintain_order=True)])
        per_image = per_image[np.isfinite(per_image)]
        rho_pooled, p_pooled = _spearman(table["score"].to_numpy(), table["drop"].to_numpy())
        rows.append({
            "method": method,
            "rho": float(per_image.mean()) if len(per_image) else float("nan"),
            "rho_std": float(per_image.std(ddof=1)) if len(per_image) > 1 else float("nan"),
            "p": _signed_rank_p(per_image),
            "n": len(per_image),
            "rho_pooled": rho_pooled,
            "p_pooled": p_pooled,
            "n_pooled": table.height,
        })
    return pl.DataFrame(rows, schema={"method": pl.Utf8, "rho": pl.Float64, "rho_std": pl.Float64, "p": pl.Float64,
                                      "n": pl.Int64, "rho_pooled": pl.Float64, "p_pooled": pl.Float64,
                                      "n_pooled": pl.Int64}, nan_to_null=False)


def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(ρ, p), NaN when fewer than 3 pairs or either side is constant."""
    if len(x) < MIN_PAIRS or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    result = stats.spearmanr(x, y)
    return float(result.statistic), float(result.pvalue)


def _signed_rank_p(values: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p of ``values`` against 0; 1 when all are 0, NaN when there are none."""
    if len(values) == 0:
        return float("nan")
    if not np.any(values != 0):
        return 1.0
    return float(stats.wilcoxon(values).pvalue)


def region_faithfulness(classifier: Classifier, faces: np.ndarray, masks: RegionMasks, image_names: Sequence[str],
                        methods: Sequence[str], targets: Sequence[int] | None = None, blank: str = "mean",
                        mode: str = "abs", params: Mapping[str, Mapping[str, Any]] | None = None,
                        cache: DiskCache | None = None, batch_size: int = 16, blank_batch_size: int = 64,
                        progress: Callable[[str, int, int], None] | None = None) -> RegionFaithfulness:
    """Blank each region of each aligned face, measure the target's probability drop, correlate it with C_i.

    ``masks`` holds N×R×H×W region masks; ``targets`` are class indices (default: the predicted classes).
    ``batch_size`` images per attribution batch, ``blank_batch_size`` blanked images per forward batch.
    """
    if blank not in BLANK_MODES:
        raise ValueError(f"blank must be one of {', '.join(BLANK_MODES)}, not {blank!r}")
    if mode not in RELEVANCE_MODES:
        raise ValueError(f"mode must be one of {', '.join(RELEVANCE_MODES)}, not {mode!r}")
    _check_batch(faces, masks.masks, image_names)
    targets = predicted_classes(classifier, faces, blank_batch_size) if targets is None else targets
    drops = region_drops(classifier, faces, masks.masks, masks.names, image_names, targets, blank, blank_batch_size)
    scores = region_method_scores(classifier, faces, masks.masks, masks.names, image_names, methods,
                                  [int(t) for t in targets], mode, params, cache, batch_size, progress)
    return RegionFaithfulness(drops=drops, scores=scores, summary=faithfulness_summary(drops, scores))


def _check_batch(faces: np.ndarray, masks: np.ndarray | None, image_names: Sequence[str]) -> None:
    if len(faces) == 0:
        raise UserFacingError("no faces to check: the selection is empty")
    if len(image_names) != len(faces) or (masks is not None and len(masks) != len(faces)):
        raise ValueError(f"{len(faces)} faces, {len(image_names)} names"
                         + ("" if masks is None else f" and {len(masks)} mask sets") + ": they must match")


def check_layers(classifier: Classifier, layers: Sequence[str]) -> None:
    """Refuse layer names that are not top-level modules of the classifier, naming the ones it has."""
    children = dict(classifier.network.named_children())
    unknown = [name for name in layers if name not in children]
    if not layers or unknown:
        raise UserFacingError(f"the classifier has no layer(s) {', '.join(unknown) or '(none named)'}; "
                              f"name some of {', '.join(children)} (e.g. fc,layer4)")


def randomised_classifier(classifier: Classifier, layers: Sequence[str], seed: int = 0) -> Classifier:
    """A deep copy of ``classifier`` with the named top-level modules re-initialised (PyTorch's own
    initialisers; batch norms back to identity statistics), in the order given, from ``seed``.

    The original is never touched. The copy's fingerprint differs from the original's, so cached
    attributions of one are never served for the other.
    """
    check_layers(classifier, layers)
    with model_lock(classifier.network):
        network = copy.deepcopy(classifier.network)
    modules = dict(network.named_children())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in layers:
            for module in modules[name].modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    network.eval().requires_grad_(False)
    fingerprint = hashlib.sha256(
        f"{classifier.fingerprint}\0randomised {','.join(layers)} seed {seed}\0"
        f"{model_fingerprint(network.state_dict())}".encode()).hexdigest()
    return Classifier(network=network, card=classifier.card, fingerprint=fingerprint)


def map_similarity(trained: np.ndarray, randomised: np.ndarray, data_range: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Per image (N×H×W pairs): Spearman rank correlation over pixels, and SSIM. A constant map gives NaN
    correlation (ranks carry nothing)."""
    if trained.shape != randomised.shape or trained.ndim != 3:
        raise ValueError(f"maps must be two N×H×W arrays of one shape, got {trained.shape} and {randomised.shape}")
    n = len(trained)
    ranks = [stats.rankdata(maps.reshape(n, -1), axis=1) for maps in (trained, randomised)]
    centred = [r - r.mean(axis=1, keepdims=True) for r in ranks]
    numerator = (centred[0] * centred[1]).sum(axis=1)
    denominator = np.sqrt((centred[0] ** 2).sum(axis=1) * (centred[1] ** 2).sum(axis=1))
    rank_correlation = np.divide(numerator, denominator, out=np.full(n, np.nan), where=denominator > 0)
    ssim = np.array([structural_similarity(a, b, data_range=data_range)
                     for a, b in zip(trained.astype(np.float64), randomised.astype(np.float64))])
    return rank_correlation, ssim


def randomisation_check(classifier: Classifier, faces: np.ndarray, image_names: Sequence[str], methods: Sequence[str],
                        cascade: Sequence[str] = CASCADE[:2], targets: Sequence[int] | None = None,
                        mode: str = "abs", seed: int = 0, params: Mapping[str, Mapping[str, Any]] | None = None,
                        cache: DiskCache | None = None, batch_size: int = 16,
                        progress: Callable[[str, int, int], None] | None = None) -> RandomisationCheck:
    """Adebayo et al.'s cascading model randomisation: for each step k, the layers ``cascade[:k+1]``
    re-initialised; each method's maps of the randomised copy against the trained model's.

    The explained class is the trained model's (``targets``, default its predicted classes) at every
    step, so only the model changes. Maps are relevance maps of ``mode`` (min–max leaves ranks alone).
    """
    if mode not in RELEVANCE_MODES:
        raise ValueError(f"mode must be one of {', '.join(RELEVANCE_MODES)}, not {mode!r}")
    check_layers(classifier, cascade)
    _check_batch(faces, None, image_names)
    targets = [int(t) for t in (predicted_classes(classifier, faces) if targets is None else targets)]
    steps = [randomised_classifier(classifier, cascade[:k + 1], seed) for k in range(len(cascade))]
    data_range = 2.0 if mode == "signed" else 1.0
    tables = []
    for m, method in enumerate(methods):
        if progress is not None:
            progress(method, m, len(methods))
        trained = relevance_maps(classifier, faces, targets, method, mode, params, cache, batch_size)
        for k, randomised in enumerate(steps):
            rank_correlation, ssim = map_similarity(
                trained, relevance_maps(randomised, faces, targets, method, mode, params, cache, batch_size), data_range)
            tables.append(pl.DataFrame({
                "image_name": list(image_names), "method": method, "randomised": "+".join(cascade[:k + 1]),
                "rank_correlation": rank_correlation, "ssim": ssim}, nan_to_null=False))
    per_image = pl.concat(tables)
    return RandomisationCheck(per_image=per_image, summary=randomisation_summary(per_image))


def randomisation_summary(per_image: pl.DataFrame) -> pl.DataFrame:
    """Per method × randomised layers: mean and std over images of the rank correlation and SSIM, ``n``
    images with a defined correlation, and ``changed`` = mean rank correlation < ``CHANGED_BELOW``."""
    return (per_image.with_columns(pl.col("rank_correlation").fill_nan(None))
            .group_by("method", "randomised", maintain_order=True)
            .agg(rank_correlation_mean=pl.col("rank_correlation").mean(),
                 rank_correlation_std=pl.col("rank_correlation").std(),
                 ssim_mean=pl.col("ssim").mean(), ssim_std=pl.col("ssim").std(),
                 n=pl.col("rank_correlation").count().cast(pl.Int64))
            .with_columns(changed=pl.col("rank_correlation_mean") < CHANGED_BELOW))
