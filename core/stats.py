"""The paper's statistics over a score table (DESIGN "The pipeline", step 6).

RQ1 (``compare_groups``, ``significance_counts``): do region scores differ between a syndrome
and the reference group? RQ2 (``hpo_correlation``, ``table4_wide``): do region scores follow the
number of HPO terms raters marked in that region? Every test is scipy's; the multiple-testing
corrections are statsmodels'. Nothing here reads or writes files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy import stats
from statsmodels.stats.multitest import multipletests

from core.errors import UserFacingError

CORRECTIONS = ("bonferroni", "holm", "fdr_bh")  # statsmodels' names
TTESTS = ("paper", "student", "welch")
PRECONDITION_ALPHA = 0.05  # Shapiro–Wilk and Levene, as the paper (pingouin's defaults)
MIN_GROUP_SIZE = 3  # Shapiro–Wilk needs three observations

_RQ1_COLUMNS = ("image_name", "label", "method", "region", "score")
_RQ2_COLUMNS = ("image_name", "model", "method", "region", "score")

RQ1_SCHEMA = {
    "method": pl.Utf8,
    "syndrome": pl.Utf8,
    "region": pl.Utf8,
    "n_syndrome": pl.Int64,
    "n_reference": pl.Int64,
    "mean_syndrome": pl.Float64,
    "mean_reference": pl.Float64,
    "shapiro_p_syndrome": pl.Float64,
    "shapiro_p_reference": pl.Float64,
    "normal_syndrome": pl.Boolean,
    "normal_reference": pl.Boolean,
    "levene_p": pl.Float64,
    "equal_variance": pl.Boolean,
    "test": pl.Utf8,
    "statistic": pl.Float64,
    "p": pl.Float64,
    "p_corrected": pl.Float64,
    "significant": pl.Boolean,
    "cohens_d": pl.Float64,
    "note": pl.Utf8,
}


def _require_columns(table: pl.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise UserFacingError(f"the {what} lacks column(s) {', '.join(missing)} (it has: {', '.join(table.columns)})")


def _observations(scores: pl.DataFrame, model: str | None) -> pl.DataFrame:
    """The score table as RQ1 observations: one score per image × method × region.

    RQ1 compares groups of *images*. On split "val" every image is scored once, by the fold model
    that held it out, so rows are observations as they stand. If an image appears under several
    models for one method and region (split "test": every fold model scores it), counting each row
    would count one face several times and shrink every p-value; we refuse that and ask the user to
    choose one model (``model=``) or to use split "val", rather than averaging models silently.
    """
    _require_columns(scores, _RQ1_COLUMNS, "score table")
    if model is not None:
        if "model" not in scores.columns:
            raise UserFacingError(f"model {model!r} was asked for, but the score table has no model column")
        known = sorted(scores["model"].unique().to_list())
        if model not in known:
            raise UserFacingError(f"model {model!r} is not in the score table (it has: {', '.join(known)})")
        scores = scores.filter(pl.col("model") == model)
    key = ["image_name", "method", "region"]
    repeated = scores.group_by(key).agg(
        pl.len().alias("rows"), *([pl.col("model").n_unique().alias("models")] if "model" in scores.columns else [])
    )
    repeated = repeated.filter(pl.col("rows") > 1)
    if len(repeated):
        first = repeated.row(0, named=True)
        where = f"{first['image_name']!r} ({first['method']}, {first['region']})"
        if first.get("models", 1) > 1:
            raise UserFacingError(
                f"image {where} is scored by {first['models']} models; RQ1 counts each image once. Use the score "
                "table of split 'val' (each image scored by its own fold model) or choose one model (--model)."
            )
        raise UserFacingError(
            f"image {where} appears {first['rows']} times in the score table; each image × model "
            "× method × region must appear once"
        )
    return scores.with_columns(pl.col("score").cast(pl.Float64))


def in_domain(scores: pl.DataFrame) -> pl.DataFrame:
    """The score table without the faces its model's out-of-domain guard flagged (``core.domain``).

    Rows without a verdict (a model without a guard, a table from before guards) are kept: there is
    nothing to exclude them on. Whether to exclude is the caller's choice (README, docs/DECISIONS.md)."""
    if "out_of_domain" not in scores.columns:
        return scores
    return scores.filter(pl.col("out_of_domain").is_null() | ~pl.col("out_of_domain"))


# More flagged faces than this share is worth a warning: the guard's threshold flags about 1% of in-domain faces.
UNUSUAL_FLAGGED_SHARE = 0.05


def many_out_of_domain(flagged: int, judged: int) -> bool:
    """Whether a table has clearly more out-of-domain faces than the guard flags by design."""
    return flagged > UNUSUAL_FLAGGED_SHARE * judged


def domain_counts(scores: pl.DataFrame) -> tuple[int, int]:
    """Faces (image × model) the guard flagged, and faces it judged at all, in a score table."""
    if "out_of_domain" not in scores.columns:
        return 0, 0
    key = [c for c in ("image_name", "model") if c in scores.columns]
    faces = scores.filter(pl.col("out_of_domain").is_not_null()).unique(key)
    return int(faces["out_of_domain"].sum()), len(faces)


def cohens_d(x: np.ndarray, y: np.ndarray) -> float:
    """(mean x − mean y) / pooled SD (ddof 1 per group), as pingouin's ``compute_effsize(eftype="cohen")``."""
    nx, ny = len(x), len(y)
    pooled = np.sqrt(((nx - 1) * x.var(ddof=1) + (ny - 1) * y.var(ddof=1)) / (nx + ny - 2))
    return float((x.mean() - y.mean()) / pooled)


def _uses_welch(ttest: str, n_syndrome: int, n_reference: int) -> bool:
    """pingouin's ``ttest(correction="auto")``, which the paper ran, applies Welch whenever the sizes differ."""
    return ttest == "welch" or (ttest == "paper" and n_syndrome != n_reference)


def _degenerate(name: str, values: np.ndarray) -> str | None:
    if len(values) == 0:
        return f"no finite scores in the {name} group"
    if len(values) < MIN_GROUP_SIZE:
        return f"n < {MIN_GROUP_SIZE} in the {name} group ({len(values)})"
    if np.ptp(values) == 0:
        return f"constant values in the {name} group"
    return None


def _compare(syndrome_scores: np.ndarray, reference_scores: np.ndarray, ttest: str) -> dict:
    """One comparison: the paper's test choice, statistic, raw p and Cohen's d (syndrome minus reference)."""
    x, y = syndrome_scores, reference_scores
    row = {
        "n_syndrome": len(x),
        "n_reference": len(y),
        "mean_syndrome": float(x.mean()) if len(x) else None,
        "mean_reference": float(y.mean()) if len(y) else None,
    }
    notes = [n for n in (_degenerate("syndrome", x), _degenerate("reference", y)) if n]
    if notes:
        return row | {"note": "; ".join(notes)}
    shapiro_x, shapiro_y = stats.shapiro(x).pvalue, stats.shapiro(y).pvalue
    levene = stats.levene(x, y, center="median").pvalue
    normal_x, normal_y = shapiro_x > PRECONDITION_ALPHA, shapiro_y > PRECONDITION_ALPHA
    equal_variance = levene > PRECONDITION_ALPHA
    if normal_x and normal_y and equal_variance:
        welch = _uses_welch(ttest, len(x), len(y))
        result = stats.ttest_ind(x, y, equal_var=not welch)
        test = "welch" if welch else "t-test"
    else:
        result = stats.mannwhitneyu(x, y, use_continuity=True, alternative="two-sided")
        test = "mann-whitney"
    return row | {
        "shapiro_p_syndrome": float(shapiro_x),
        "shapiro_p_reference": float(shapiro_y),
        "normal_syndrome": bool(normal_x),
        "normal_reference": bool(normal_y),
        "levene_p": float(levene),
        "equal_variance": bool(equal_variance),
        "test": test,
        "statistic": float(result.statistic),
        "p": float(result.pvalue),
        "cohens_d": cohens_d(x, y),
    }


def _corrected(rows: list[dict], alpha: float, correction: str) -> None:
    """Correct, in place, the p-values of one method's tests; rows without a test stay out of the family."""
    family = [r for r in rows if r.get("p") is not None]
    if not family:
        return
    reject, corrected, _, _ = multipletests([r["p"] for r in family], alpha=alpha, method=correction)
    for r, significant, p in zip(family, reject, corrected):
        r["p_corrected"], r["significant"] = float(p), bool(significant)


def compare_groups(
    scores: pl.DataFrame,
    reference: str = "Unaffected",
    alpha: float = 0.001,
    correction: str = "bonferroni",
    ttest: str = "paper",
    syndromes: Sequence[str] | None = None,
    model: str | None = None,
) -> pl.DataFrame:
    """RQ1: one row per method × syndrome × region (columns ``RQ1_SCHEMA``).

    Per comparison: Shapiro–Wilk on both groups and Levene (median-centred) at 0.05; a two-sided
    t-test if both are normal with equal variances, else a two-sided Mann–Whitney U with continuity
    correction. ``ttest``: "paper" = pingouin's default that the paper ran (Welch when the group
    sizes differ, Student when equal), "student", "welch". Statistic, p and Cohen's d are of the
    syndrome against the reference (positive: higher relevance in the syndrome). The correction
    (statsmodels' "bonferroni", "holm" or "fdr_bh") runs over the syndromes × regions tests of one
    method at ``alpha``. NaN scores are dropped first; a comparison with an empty, constant or
    n < 3 group gets no test (test, p and significant null, ``note`` says why) and is left out
    of its method's correction family. ``syndromes`` restricts the comparisons (default: every
    label but the reference; the paper's Table 3 used its five annotated syndromes, 15 tests per
    method); ``model`` keeps one model's rows (see ``_observations``).
    """
    if correction not in CORRECTIONS:
        raise UserFacingError(f"unknown correction {correction!r}; choose from {', '.join(CORRECTIONS)}")
    if ttest not in TTESTS:
        raise UserFacingError(f"unknown t-test variant {ttest!r}; choose from {', '.join(TTESTS)}")
    if not 0 < alpha < 1:
        raise UserFacingError(f"alpha must lie between 0 and 1, got {alpha}")
    observations = _observations(scores, model)
    labels = sorted(observations["label"].drop_nulls().unique().to_list())
    if reference not in labels:
        raise UserFacingError(
            f"reference group {reference!r} is not a label of the score table (labels: {', '.join(labels) or 'none'})"
        )
    if syndromes is None:
        syndromes = [label for label in labels if label != reference]
    unknown = [s for s in syndromes if s not in labels or s == reference]
    if unknown:
        raise UserFacingError(
            f"syndrome(s) {', '.join(map(repr, unknown))} not comparable: choose labels of the score "
            f"table other than the reference {reference!r} ({', '.join(labels)})"
        )
    if not syndromes:
        raise UserFacingError(f"the score table has no label besides the reference {reference!r}")
    finite = observations.filter(pl.col("score").is_not_nan() & pl.col("score").is_not_null())
    groups = {key: frame["score"].to_numpy() for key, frame in finite.group_by("method", "region", "label")}
    empty = np.array([], dtype=np.float64)
    rows: list[dict] = []
    for method in observations["method"].unique(maintain_order=True).to_list():
        method_rows = []
        for syndrome in syndromes:
            for region in observations["region"].unique(maintain_order=True).to_list():
                compared = _compare(
                    groups.get((method, region, syndrome), empty), groups.get((method, region, reference), empty), ttest
                )
                method_rows.append({"method": method, "syndrome": syndrome, "region": region} | compared)
        _corrected(method_rows, alpha, correction)
        rows.extend(method_rows)
    return pl.DataFrame(rows, schema=RQ1_SCHEMA)


def significance_counts(table: pl.DataFrame) -> pl.DataFrame:
    """Table 3: ``region``, then one column per syndrome: how many methods differ significantly."""
    _require_columns(table, ("syndrome", "region", "significant"), "RQ1 table")
    counts = table.group_by("region", "syndrome", maintain_order=True).agg(
        pl.col("significant").fill_null(False).sum().cast(pl.Int64).alias("count")
    )
    return counts.pivot(on="syndrome", index="region", values="count", maintain_order=True).fill_null(0)


@dataclass(frozen=True)
class HpoCorrelation:
    """RQ2. ``per_model``: method, region, model, rho, p, n, note; ``summary`` (Table 4):
    method, region, rho_mean, rho_std (ddof 1, NaN with one model), n_models."""

    per_model: pl.DataFrame
    summary: pl.DataFrame


def _spearman(scores: np.ndarray, counts: np.ndarray) -> tuple[float, float, str | None]:
    if len(scores) < MIN_GROUP_SIZE:
        return float("nan"), float("nan"), f"n < {MIN_GROUP_SIZE}"
    for values, name in ((scores, "scores"), (counts, "HPO counts")):
        if np.ptp(values) == 0:
            return float("nan"), float("nan"), f"constant {name}"
    result = stats.spearmanr(scores, counts)
    return float(result.statistic), float(result.pvalue), None


def hpo_correlation(scores: pl.DataFrame, counts: pl.DataFrame) -> HpoCorrelation:
    """RQ2 (Table 4): Spearman ρ between C_i and the per-image HPO count of that region.

    One ρ per method × region × model over the images that have both a finite score and an
    annotation (images without annotations, e.g. unaffected ones, are left out: not annotated is
    not "no terms"), then mean and standard deviation (ddof 1) over the models with a ρ.
    ``counts`` is ``core.hpo.region_counts``' table: image_name, region, count.
    """
    per_model = _per_model_rho(_annotated_scores(scores, counts))
    return HpoCorrelation(per_model=per_model, summary=_over_models(per_model))


def _annotated_scores(scores: pl.DataFrame, counts: pl.DataFrame) -> pl.DataFrame:
    """Each finite score beside its image's HPO count in that region; refused when none or a repeat."""
    _require_columns(scores, _RQ2_COLUMNS, "score table")
    _require_columns(counts, ("image_name", "region", "count"), "HPO count table")
    joined = (
        scores.select(_RQ2_COLUMNS)
        .with_columns(pl.col("score").cast(pl.Float64))
        .join(
            counts.select("image_name", "region", pl.col("count").cast(pl.Float64)),
            on=["image_name", "region"],
            how="inner",
        )
        .filter(pl.col("score").is_not_nan() & pl.col("score").is_not_null())
    )
    if joined.is_empty():
        raise UserFacingError(
            "no image × region of the score table has HPO annotations: score the annotated "
            "test images (split 'test') of the same dataset, with regions named as the "
            "annotations' (eye, nose, mouth, …)"
        )
    repeated = joined.group_by("image_name", "model", "method", "region").len().filter(pl.col("len") > 1)
    if len(repeated):
        first = repeated.row(0, named=True)
        raise UserFacingError(
            f"image {first['image_name']!r} appears {first['len']} times for model {first['model']}, "
            f"{first['method']}, {first['region']}; each must appear once"
        )
    return joined


def _per_model_rho(joined: pl.DataFrame) -> pl.DataFrame:
    """Spearman ρ (with p, n and a note when there is none) per method × region × model."""
    groups = dict(joined.group_by("method", "region", "model"))
    rows = []
    for method in joined["method"].unique(maintain_order=True):
        for region in joined["region"].unique(maintain_order=True):
            for model in sorted(joined["model"].unique()):
                frame = groups.get((method, region, model))
                if frame is None:
                    continue
                rho, p, note = _spearman(frame["score"].to_numpy(), frame["count"].to_numpy())
                rows.append(
                    {
                        "method": method,
                        "region": region,
                        "model": model,
                        "rho": rho,
                        "p": p,
                        "n": len(frame),
                        "note": note,
                    }
                )
    return pl.DataFrame(
        rows,
        schema={
            "method": pl.Utf8,
            "region": pl.Utf8,
            "model": pl.Utf8,
            "rho": pl.Float64,
            "p": pl.Float64,
            "n": pl.Int64,
            "note": pl.Utf8,
        },
    )


def _over_models(per_model: pl.DataFrame) -> pl.DataFrame:
    """Mean and std (ddof 1) of ρ over the models that have one; NaN where none has."""
    summary = (
        per_model.filter(pl.col("rho").is_not_nan())
        .group_by("method", "region", maintain_order=True)
        .agg(
            pl.col("rho").mean().alias("rho_mean"),
            pl.col("rho").std(ddof=1).alias("rho_std"),
            pl.len().cast(pl.Int64).alias("n_models"),
        )
    )
    summary = (
        per_model.select("method", "region")
        .unique(maintain_order=True)
        .join(summary, on=["method", "region"], how="left", maintain_order="left")
        .with_columns(
            pl.col("rho_std").fill_null(float("nan")),
            pl.col("rho_mean").fill_null(float("nan")),
            pl.col("n_models").fill_null(0),
        )
    )
    return summary


def table4_wide(summary: pl.DataFrame, decimals: int = 3) -> pl.DataFrame:
    """Table 4 for display: one row per method, one column per region, cells "mean (std)"."""
    _require_columns(summary, ("method", "region", "rho_mean", "rho_std"), "Table 4 summary")

    def cell(mean: float, std: float) -> str:
        text = "n/a" if mean is None or np.isnan(mean) else f"{mean:.{decimals}f}"
        return text if std is None or np.isnan(std) else f"{text} ({std:.{decimals}f})"

    cells = summary.with_columns(
        pl.struct("rho_mean", "rho_std")
        .map_elements(lambda s: cell(s["rho_mean"], s["rho_std"]), return_dtype=pl.Utf8)
        .alias("cell")
    )
    return cells.pivot(on="region", index="method", values="cell", maintain_order=True)
