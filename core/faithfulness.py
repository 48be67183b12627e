"""Two checks beyond the paper: do region scores follow what the classifier needs, and do they follow the
classifier at all?

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import polars as pl
import torch
from scipy import ndimage, stats
from skimage.metrics import structural_similarity

from cache import DiskCache
from core.errors import UserFacingError
from core.pipeline import ExplainSettings, FaceSet, class_probabilities, relevance_maps, score_faces, target_indices
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
Progress = Callable[[str, int, int], None]  # (method, index, count)


@dataclass(frozen=True)
class RegionFaithfulness:
    drops: pl.DataFrame  # image_name, region, target, baseline_probability, blanked_probability, drop
    scores: pl.DataFrame  # image_name, method, region, score (C_i)
    summary: pl.DataFrame  # one row per method, see faithfulness_summary


@dataclass(frozen=True)
class RandomisationCheck:
    per_image: pl.DataFrame  # image_name, method, randomised, rank_correlation, ssim
    summary: pl.DataFrame  # one row per method × randomised, see randomisation_summary


def blank_regions(
    faces: np.ndarray, masks: np.ndarray, mode: str = "mean", blur_sigma: float = BLUR_SIGMA
) -> np.ndarray:
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


def region_drops(
    classifier: Classifier,
    faces: FaceSet,
    targets: Sequence[int] | np.ndarray,
    blank: str = "mean",
    batch_size: int = 64,
) -> pl.DataFrame:
    """Drop in the probability of class ``targets[n]`` when each region of face n is blanked: one row per
    image × region. The N×R blanked faces go through the classifier about ``batch_size`` at a time.
    An empty region has NaN blanked probability and drop (blanking nothing says nothing).
    """
    aligned, region_names, masks = faces.aligned, faces.masks.names, np.asarray(faces.masks.masks, dtype=bool)
    n, r = len(aligned), len(region_names)
    targets = np.asarray(targets, dtype=np.int64)
    baseline = class_probabilities(classifier, aligned)
    blanked = np.empty((n, r), dtype=np.float64)
    per_chunk = max(1, batch_size // r)
    for start in range(0, n, per_chunk):
        chunk = slice(start, start + per_chunk)
        images = blank_regions(aligned[chunk], masks[chunk], blank)
        probabilities, _ = classify(classifier, preprocess(images.reshape(-1, *aligned.shape[1:]), classifier.card))
        probabilities = probabilities.reshape(len(images), r, -1)
        blanked[chunk] = np.take_along_axis(probabilities, targets[chunk, None, None], axis=2)[..., 0]
    blanked[~masks.any(axis=(2, 3))] = np.nan
    base = np.take_along_axis(baseline, targets[:, None], axis=1)[:, 0].astype(np.float64)
    classes = classifier.card.classes
    return pl.DataFrame(
        {
            "image_name": np.repeat(list(faces.names), r).tolist(),
            "region": list(region_names) * n,
            "target": np.repeat([classes[t] for t in targets], r).tolist(),
            "baseline_probability": np.repeat(base, r),
            "blanked_probability": blanked.ravel(),
            "drop": (base[:, None] - blanked).ravel(),
        },
        nan_to_null=False,
    )


def region_method_scores(
    classifier: Classifier,
    faces: FaceSet,
    targets: Sequence[int] | np.ndarray,
    settings: ExplainSettings,
    cache: DiskCache | None = None,
    progress: Progress | None = None,
) -> pl.DataFrame:
    """C_i of every image × method × region (paper eq. 4), long: image_name, method, region, score."""
    n, r = len(faces.names), len(faces.masks.names)
    tables = []
    results = score_faces(classifier, faces.aligned, faces.masks, targets, settings, cache)
    for m, method in enumerate(settings.methods):
        if progress is not None:
            progress(method, m, len(settings.methods))
        scores = next(results).scores
        tables.append(
            pl.DataFrame(
                {
                    "image_name": np.repeat(list(faces.names), r).tolist(),
                    "method": [method] * (n * r),
                    "region": list(faces.masks.names) * n,
                    "score": scores.astype(np.float64).ravel(),
                },
                nan_to_null=False,
            )
        )
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
        per_image = np.array(
            [
                _spearman(group["score"].to_numpy(), group["drop"].to_numpy())[0]
                for _, group in table.group_by("image_name", maintain_order=True)
            ]
        )
        per_image = per_image[np.isfinite(per_image)]
        rho_pooled, p_pooled = _spearman(table["score"].to_numpy(), table["drop"].to_numpy())
        rows.append(
            {
                "method": method,
                "rho": float(per_image.mean()) if len(per_image) else float("nan"),
                "rho_std": float(per_image.std(ddof=1)) if len(per_image) > 1 else float("nan"),
                "p": _signed_rank_p(per_image),
                "n": len(per_image),
                "rho_pooled": rho_pooled,
                "p_pooled": p_pooled,
                "n_pooled": table.height,
            }
        )
    return pl.DataFrame(
        rows,
        schema={
            "method": pl.Utf8,
            "rho": pl.Float64,
            "rho_std": pl.Float64,
            "p": pl.Float64,
            "n": pl.Int64,
            "rho_pooled": pl.Float64,
            "p_pooled": pl.Float64,
            "n_pooled": pl.Int64,
        },
        nan_to_null=False,
    )


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


def explained_targets(classifier: Classifier, faces: FaceSet, settings: ExplainSettings) -> np.ndarray:
    """The class each face is explained for (``settings.target``), from the trained model's predictions."""
    probabilities = class_probabilities(classifier, faces.aligned)
    return target_indices(settings.target, classifier.card.classes, probabilities, faces.labels)


def region_faithfulness(
    classifier: Classifier,
    faces: FaceSet,
    settings: ExplainSettings,
    blank: str = "mean",
    cache: DiskCache | None = None,
    progress: Progress | None = None,
) -> RegionFaithfulness:
    """Blank each region of each aligned face, measure the target's probability drop, correlate it with C_i.

    ``settings.batch_size`` images per attribution batch, four times as many blanked images per forward batch.
    """
    if blank not in BLANK_MODES:
        raise ValueError(f"blank must be one of {', '.join(BLANK_MODES)}, not {blank!r}")
    blank_batch_size = 4 * settings.batch_size
    targets = explained_targets(classifier, faces, settings)
    drops = region_drops(classifier, faces, targets, blank, blank_batch_size)
    scores = region_method_scores(classifier, faces, targets, settings, cache, progress)
    return RegionFaithfulness(drops=drops, scores=scores, summary=faithfulness_summary(drops, scores))


def check_layers(classifier: Classifier, layers: Sequence[str]) -> None:
    """Refuse layer names that are not top-level modules of the classifier, naming the ones it has."""
    children = dict(classifier.network.named_children())
    unknown = [name for name in layers if name not in children]
    if not layers or unknown:
        raise UserFacingError(
            f"the classifier has no layer(s) {', '.join(unknown) or '(none named)'}; "
            f"name some of {', '.join(children)} (e.g. fc,layer4)"
        )


def randomised_classifier(classifier: Classifier, layers: Sequence[str], seed: int = 0) -> Classifier:
    """A deep copy of ``classifier`` with the named top-level modules re-initialised (PyTorch's own
    initialisers; batch norms back to identity statistics), in the order given, from ``seed``.

    The original is never touched. The copy's fingerprint differs from the original's, so cached
    attributions of one are never served for the other. The new weights are drawn on the CPU (the CPU's
    generator, whatever the device), so a GPU's copy holds the same weights as a CPU's; it then runs on
    the original's device.
    """
    check_layers(classifier, layers)
    device = classifier.device
    with model_lock(classifier.network):
        network = copy.deepcopy(classifier.network).cpu()
    modules = dict(network.named_children())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in layers:
            for module in modules[name].modules():
                reset = getattr(module, "reset_parameters", None)  # hasattr would leave it typed Tensor | Module
                if reset is not None:
                    reset()
    network.to(device).eval().requires_grad_(False)
    fingerprint = hashlib.sha256(
        f"{classifier.fingerprint}\0randomised {','.join(layers)} seed {seed}\0"
        f"{model_fingerprint(network.state_dict())}".encode()
    ).hexdigest()
    return Classifier(network=network, card=classifier.card, fingerprint=fingerprint)


def map_similarity(
    trained: np.ndarray, randomised: np.ndarray, data_range: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
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
    ssim = np.array(
        [
            structural_similarity(a, b, data_range=data_range)
            for a, b in zip(trained.astype(np.float64), randomised.astype(np.float64))
        ]
    )
    return rank_correlation, ssim


@dataclass(frozen=True)
class Cascade:
    """The top-level layers re-initialised one after another (from the output down), and the seed."""

    layers: tuple[str, ...] = CASCADE[:2]
    seed: int = 0


def randomisation_check(
    classifier: Classifier,
    faces: FaceSet,
    settings: ExplainSettings,
    cascade: Cascade = Cascade(),
    cache: DiskCache | None = None,
    progress: Progress | None = None,
) -> RandomisationCheck:
    """Adebayo et al.'s cascading model randomisation: for each step k, the layers ``cascade.layers[:k+1]``
    re-initialised; each method's maps of the randomised copy against the trained model's.

    The explained class is the trained model's (``settings.target``) at every step, so only the model
    changes. Maps are relevance maps of ``settings.mode`` (min–max leaves ranks alone); raw maps
    (``abs-raw``) are compared min–max normalised, since SSIM needs one value range for every map.
    """
    if settings.mode == "abs-raw":
        settings = replace(settings, mode="abs")
    layers = cascade.layers
    check_layers(classifier, layers)
    targets = [int(t) for t in explained_targets(classifier, faces, settings)]
    steps = [randomised_classifier(classifier, layers[: k + 1], cascade.seed) for k in range(len(layers))]
    data_range = 2.0 if settings.mode == "signed" else 1.0
    tables = []
    for m, method in enumerate(settings.methods):
        if progress is not None:
            progress(method, m, len(settings.methods))
        trained = relevance_maps(classifier, faces.aligned, targets, method, settings, cache)
        for k, randomised in enumerate(steps):
            rank_correlation, ssim = map_similarity(
                trained, relevance_maps(randomised, faces.aligned, targets, method, settings, cache), data_range
            )
            tables.append(
                pl.DataFrame(
                    {
                        "image_name": list(faces.names),
                        "method": method,
                        "randomised": "+".join(layers[: k + 1]),
                        "rank_correlation": rank_correlation,
                        "ssim": ssim,
                    },
                    nan_to_null=False,
                )
            )
    per_image = pl.concat(tables)
    return RandomisationCheck(per_image=per_image, summary=randomisation_summary(per_image))


def randomisation_summary(per_image: pl.DataFrame) -> pl.DataFrame:
    """Per method × randomised layers: mean and std over images of the rank correlation and SSIM, ``n``
    images with a defined correlation, and ``changed`` = mean rank correlation < ``CHANGED_BELOW``."""
    return (
        per_image.with_columns(pl.col("rank_correlation").fill_nan(None))
        .group_by("method", "randomised", maintain_order=True)
        .agg(
            rank_correlation_mean=pl.col("rank_correlation").mean(),
            rank_correlation_std=pl.col("rank_correlation").std(),
            ssim_mean=pl.col("ssim").mean(),
            ssim_std=pl.col("ssim").std(),
            n=pl.col("rank_correlation").count().cast(pl.Int64),
        )
        .with_columns(changed=pl.col("rank_correlation_mean") < CHANGED_BELOW)
    )
