"""The one-sentence reading, on hand-made explanations whose vote is known by construction."""

import numpy as np
import polars as pl
import pytest

from core.explain import Explanation
from core.pipeline import PreparedFace
from core.reading import reading, region_votes

REGIONS = ("eye", "nose", "mouth")


def explanation(
    scores: dict[str, list[float]], probabilities=(0.05, 0.87, 0.08), target: int | None = None, regions=REGIONS
) -> Explanation:
    size = 4
    face = PreparedFace(
        landmarks=np.zeros((5, 2)),
        matrix=np.eye(2, 3),
        aligned=np.zeros((size, size, 3), np.uint8),
        aligned_landmarks=np.zeros((5, 2)),
        label_map=np.zeros((size, size), np.uint8),
        parse_source="template",
        region_names=regions,
        masks=np.zeros((len(regions), size, size), bool),
    )
    probabilities = np.array(probabilities)
    return Explanation(
        face=face,
        classes=("Unaffected", "WS", "KS"),
        probabilities=probabilities,
        target=int(np.argmax(probabilities)) if target is None else target,
        mode="abs",
        maps={m: np.zeros((size, size)) for m in scores},
        scores={m: np.array(v, dtype=float) for m, v in scores.items()},
    )


PRIORS = pl.DataFrame(
    {
        "term": ["Wide mouth", "Thick lower lip vermilion", "Long philtrum", "Open bite", "Periorbital fullness"],
        "hpo_id": ["HP:0000154", "HP:0000179", "HP:0000343", "HP:0010807", "HP:0000629"],
        "region": ["mouth", "mouth", "mouth", "mouth", "eye"],
    }
)


def test_votes_count_the_argmax_region_of_each_method_and_skip_nan():
    scores = {
        "A": np.array([0.1, 0.2, 0.9]),  # mouth
        "B": np.array([0.5, np.nan, 0.4]),  # eye (NaN never wins)
        "C": np.array([np.nan, np.nan, np.nan]),  # votes for nothing
        "D": np.array([0.3, 0.3, 0.1]),  # tie eye/nose -> eye, the earlier region
    }
    assert region_votes(scores, REGIONS) == {"eye": 2, "nose": 0, "mouth": 1}


def test_votes_refuse_scores_of_the_wrong_length():
    with pytest.raises(ValueError, match="expected 3 region scores"):
        region_votes({"A": np.array([0.1, 0.2])}, REGIONS)


def test_the_paper_example_sentence():
    scores = {f"m{i}": [0.1, 0.2, 0.9] for i in range(12)} | {f"n{i}": [0.8, 0.2, 0.1] for i in range(3)}
    text = reading(explanation(scores), PRIORS)
    assert text == (
        "Predicted Williams syndrome, 0.87; the mouth region carries most relevance under 12 of 15 "
        "methods; expected mouth terms: wide mouth, thick lower lip vermilion, long philtrum …"
    )


def test_another_target_ties_and_no_expected_terms():
    scores = {"A": [0.9, 0.1, 0.2], "B": [0.1, 0.2, 0.9]}
    text = reading(explanation(scores, target=2), PRIORS, max_terms=5)
    assert text.startswith("Predicted Williams syndrome, 0.87; explaining Kabuki syndrome (0.08); ")
    assert "the eye and mouth regions carry most relevance under 1 of 2 methods each" in text
    assert "expected eye terms: periorbital fullness" in text
    assert text.endswith("expected mouth terms: wide mouth, thick lower lip vermilion, long philtrum, open bite.")


def test_without_priors_without_methods_and_with_empty_regions():
    assert reading(explanation({"A": [0.2, 0.9, 0.1]})) == (
        "Predicted Williams syndrome, 0.87; the nose region carries most relevance under 1 of 1 methods."
    )
    assert reading(explanation({})).endswith("no saliency method was chosen.")
    assert reading(explanation({"A": [np.nan] * 3})).endswith(
        "no region could be scored (every region is empty on this face)."
    )
    no_nose_terms = reading(explanation({"A": [0.2, 0.9, 0.1]}), PRIORS)
    assert no_nose_terms.endswith("the ontology expects no nose term for Williams syndrome.")
    assert reading(explanation({"A": [0.2, 0.9, 0.1]}), PRIORS.clear()).endswith("under 1 of 1 methods.")
