"""Fidelity profiles: the project's own choices, or the paper's released code where the two differ.

One switch (``--profile`` on the CLI, "Fidelity profile" in the dashboard's sidebar) picks a
``Profile``; every knob it turns is a field here, and ``apply`` puts its attribution knobs into
``ExplainSettings`` (method parameters and the relevance mode), which the caches and the relevance
store already key on, so results of the two profiles never share a cache entry. The statistics knobs
are plain keyword arguments for ``core.stats`` and ``core.hpo``. docs/DECISIONS.md ("Issue 11:
released behaviour vs ours") says what each knob does and why the project's default differs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from core.attribute import CANONIZERS, METHODS
from core.errors import UserFacingError
from core.hpo import PAPER_TSNE
from core.pipeline import ExplainSettings, SettingsError
from core.score import RELEVANCE_MODES

PROJECT, PAPER = "project", "paper"
PROFILE_NAMES = (PROJECT, PAPER)
RQ1_SPLIT, RQ2_SPLIT = "val", "test"  # core.extract's splits: each model's held-out images, the annotated test set
# The syndromes the released notebook (nb-03-RQ1) compared with the unaffected group: its Bonferroni
# family is these five × three regions = 15 tests per method.
PAPER_RQ1_SYNDROMES = ("22q11DS", "Angelman", "KS", "NS", "WS")
_LRP_METHODS = tuple(name for name, method in METHODS.items() if "canonizer" in method.defaults)


@dataclass(frozen=True)
class Profile:
    """Every knob where the released code and the project differ (``None``: the user's own choice)."""

    name: str
    summary: str
    rq1_mode: str | None  # relevance mode of RQ1's scores (split val); None: the chosen --mode (default abs)
    rq2_mode: str | None  # relevance mode of RQ2's scores (split test)
    layer_deeplift_reduce_channels: bool  # False: all channels upsampled before the sum (released)
    lrp_canonizer: str  # core.attribute.CANONIZERS
    rq1_syndromes: tuple[str, ...] | None  # RQ1's comparisons and so its Bonferroni family; None: every label
    hpo_weighting: str  # core.hpo.region_counts' weighting of '1X'/'2X'/'3X'
    chi2_statistic: str  # core.hpo.term_syndrome_chi2's statistic
    tsne_perplexity: float
    tsne_init: str
    tsne_method: str  # core.hpo.term_tsne's gradient method ("auto": exact up to 1000 images)
    # Figure 4 over the annotated images partitions.csv does not list too (the published figure's 175)
    figure4_keep_unlisted: bool

    def __post_init__(self) -> None:
        for mode in (self.rq1_mode, self.rq2_mode):
            if mode is not None and mode not in RELEVANCE_MODES:
                raise ValueError(f"mode must be one of {', '.join(RELEVANCE_MODES)}, not {mode!r}")
        if self.lrp_canonizer not in CANONIZERS:
            raise ValueError(f"canonizer must be one of {', '.join(CANONIZERS)}, not {self.lrp_canonizer!r}")

    def method_params(self) -> dict[str, dict[str, Any]]:
        """The method parameters this profile decides, per method."""
        params: dict[str, dict[str, Any]] = {"LayerDeepLIFT": {"reduce_channels": self.layer_deeplift_reduce_channels}}
        params.update({method: {"canonizer": self.lrp_canonizer} for method in _LRP_METHODS})
        return params

    def mode_for(self, split: str | None) -> str | None:
        """The relevance mode this profile fixes for scores of ``split`` (None: it leaves the choice to the user)."""
        return {RQ1_SPLIT: self.rq1_mode, RQ2_SPLIT: self.rq2_mode}.get(split or "")

    def rq1_options(self, labels: Sequence[str], reference: str = "Unaffected") -> dict[str, Any]:
        """``core.stats.compare_groups`` keywords: the syndromes compared (its correction family), limited
        to those the score table has (``missing_syndromes`` names the others)."""
        if self.rq1_syndromes is None:
            return {}
        return {"syndromes": [s for s in self.rq1_syndromes if s in set(labels) and s != reference]}

    def missing_syndromes(self, labels: Sequence[str]) -> list[str]:
        return [s for s in self.rq1_syndromes or () if s not in set(labels)]

    def region_count_options(self) -> dict[str, Any]:
        """``core.hpo.region_counts`` keywords (also taken by RQ2's functions that count)."""
        return {"weighting": self.hpo_weighting}

    def chi2_options(self) -> dict[str, Any]:
        """``core.hpo.term_syndrome_chi2`` keywords."""
        return {"statistic": self.chi2_statistic}

    def tsne_options(self) -> dict[str, Any]:
        """``core.hpo.term_tsne`` keywords (the seed stays the caller's)."""
        return {"perplexity": self.tsne_perplexity, "init": self.tsne_init, "method": self.tsne_method}


PROFILES: Mapping[str, Profile] = {
    PROJECT: Profile(
        name=PROJECT,
        summary="the project's defaults: min–max maps for both research questions, channels summed before "
        "LayerDeepLIFT's upsampling, residual canonizers, counts 1/2/3, contingency χ², t-SNE perplexity 30 "
        "from PCA, every syndrome compared",
        rq1_mode=None,
        rq2_mode=None,
        layer_deeplift_reduce_channels=True,
        lrp_canonizer="resnet",
        rq1_syndromes=None,
        hpo_weighting="counts",
        chi2_statistic="contingency",
        tsne_perplexity=30.0,
        tsne_init="pca",
        tsne_method="auto",
        figure4_keep_unlisted=False,
    ),
    PAPER: Profile(
        name=PAPER,
        summary="the released code: raw Σ|a| for RQ1 and min–max for RQ2, all 2048 channels upsampled "
        "before LayerDeepLIFT's sum, batch-norm merges only in LRP, weights 1/3, 2/3, 1, scikit-learn's chi2, "
        "t-SNE perplexity 10 from a random start (Barnes–Hut), Figure 4 over all annotated images (also those "
        "partitions.csv lacks), the five annotated syndromes compared",
        rq1_mode="abs-raw",
        rq2_mode="abs",
        layer_deeplift_reduce_channels=False,
        lrp_canonizer="batchnorm-only",
        rq1_syndromes=PAPER_RQ1_SYNDROMES,
        hpo_weighting="paper",
        chi2_statistic="paper",
        tsne_perplexity=float(cast(float, PAPER_TSNE["perplexity"])),
        tsne_init=str(PAPER_TSNE["init"]),
        tsne_method=str(PAPER_TSNE["method"]),
        figure4_keep_unlisted=True,
    ),
}


class ProfileError(UserFacingError, ValueError):
    """A profile name nobody knows."""


def profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ProfileError(f"unknown profile {name!r}; choose from {', '.join(PROFILE_NAMES)}") from None


def apply(
    settings: ExplainSettings, chosen: Profile, split: str | None = None, mode: str | None = None
) -> ExplainSettings:
    """``settings`` with the profile's method parameters, and the relevance mode: ``mode`` when the user
    chose one, else the profile's for ``split`` (``mode_for``), else the settings' own."""
    params = {m: {**settings.params[m], **chosen.method_params().get(m, {})} for m in settings.methods}
    resolved = mode or chosen.mode_for(split) or settings.mode
    if resolved not in RELEVANCE_MODES:
        raise SettingsError(f"mode must be one of {', '.join(RELEVANCE_MODES)}, not {resolved!r}")
    return dataclasses.replace(settings, params=params, mode=resolved)
