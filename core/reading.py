"""One sentence beside a prediction, for a reader who will not study fifteen heatmaps.

It says what was predicted, which region most methods find most relevant (a vote: for each
method, the region with the highest C_i), and which facial HPO terms the ontology expects
there for the explained syndrome. Counting the votes is the only computation; it lives here so
the dashboard holds none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

from core.explain import Explanation

# The paper's class abbreviations, spelled out for sentences; unknown labels are shown as they are.
SYNDROME_NAMES = {
    "22q11DS": "22q11.2 deletion syndrome",
    "Angelman": "Angelman syndrome",
    "BWS": "Beckwith–Wiedemann syndrome",
    "CdLS": "Cornelia de Lange syndrome",
    "Down": "Down syndrome",
    "KS": "Kabuki syndrome",
    "NS": "Noonan syndrome",
    "PWS": "Prader–Willi syndrome",
    "RSTS1": "Rubinstein–Taybi syndrome 1",
    "Unaffected": "unaffected",
    "WHS": "Wolf–Hirschhorn syndrome",
    "WS": "Williams syndrome",
}


def syndrome_name(label: str) -> str:
    return SYNDROME_NAMES.get(label, label)


def region_votes(scores: Mapping[str, np.ndarray], regions: Sequence[str]) -> dict[str, int]:
    """For each region, how many methods give it the highest score.

    NaN scores (empty regions) never win; a method whose scores are all NaN votes for nothing;
    an exact tie goes to the earlier region of the spec, as overlaps do."""
    votes = dict.fromkeys(regions, 0)
    for values in scores.values():
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (len(regions),):
            raise ValueError(f"expected {len(regions)} region scores per method, got shape {values.shape}")
        if np.isfinite(values).any():
            votes[regions[int(np.argmax(np.where(np.isfinite(values), values, -np.inf)))]] += 1
    return votes


def _expected_terms(priors: pl.DataFrame, region: str, limit: int) -> str | None:
    terms = priors.filter(pl.col("region") == region)["term"].unique(maintain_order=True).to_list()
    if not terms:
        return None
    # HPO names capitalise their first word ("Wide mouth"); mid-sentence it reads lower case, acronyms kept.
    shown = ", ".join(term[0].lower() + term[1:] if term[1:2].islower() else term for term in terms[:limit])
    return shown + (" …" if len(terms) > limit else "")


def reading(explanation: Explanation, priors: pl.DataFrame | None = None, max_terms: int = 3) -> str:
    """ "Predicted Williams syndrome, 0.87; the mouth region carries most relevance under 12 of 15
    methods; expected mouth terms: wide mouth, thick lower lip …".

    ``priors``: the ontology's facial terms for the *explained* class (``term, hpo_id, region``,
    as ``core.hpo.ontology_priors`` gives them); without them, or when they hold no term at all (the
    unaffected class), the sentence stops after the vote.
    """
    classes, probabilities = explanation.classes, explanation.probabilities
    predicted, target = explanation.predicted, explanation.target
    parts = [f"Predicted {syndrome_name(classes[predicted])}, {probabilities[predicted]:.2f}"]
    if target != predicted:
        parts.append(f"explaining {syndrome_name(classes[target])} ({probabilities[target]:.2f})")
    if not explanation.scores:
        return "; ".join(parts) + "; no saliency method was chosen."
    regions = explanation.face.region_names
    votes = region_votes(explanation.scores, regions)
    voting = sum(votes.values())
    if voting == 0:
        return "; ".join(parts) + "; no region could be scored (every region is empty on this face)."
    best = max(votes.values())
    winners = [region for region in regions if votes[region] == best]
    methods = len(explanation.scores)
    if len(winners) == 1:
        parts.append(f"the {winners[0]} region carries most relevance under {best} of {methods} methods")
    else:
        named = ", ".join(winners[:-1]) + f" and {winners[-1]}"
        parts.append(f"the {named} regions carry most relevance under {best} of {methods} methods each")
    if priors is not None and not priors.is_empty():  # no facial term at all (unaffected): nothing to add
        for region in winners:
            terms = _expected_terms(priors, region, max_terms)
            parts.append(
                f"expected {region} terms: {terms}"
                if terms
                else f"the ontology expects no {region} term for {syndrome_name(classes[target])}"
            )
    return "; ".join(parts) + ("" if parts[-1].endswith("…") else ".")
