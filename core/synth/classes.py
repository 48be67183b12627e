"""Synthetic syndrome classes: which drawable HPO terms each carries, and how often.

Frequencies follow HPO's categories: very frequent 80-99%, frequent 30-79%, occasional
5-29%. Every syndromic class has a very frequent term, and a syndromic person who draws no
term at all is drawn again, so every syndromic face shows at least one phenotype (this
conditioning raises the realised frequencies slightly; the ground truth records them).

The defaults borrow the paper's class names. KS is eye-only, 22q11DS nose-only and
Angelman mouth-only; NS, Down and WS mix regions. The overall terms (long face, narrow
face) are drawable but left out of the defaults on purpose: the shortcut test blanks the
eyes, nose and mouth and expects chance, which a face-outline term would defeat.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.synth.params import PlantedTerm
from core.synth.phenotypes import drawable_phenotypes

UNAFFECTED = "Unaffected"
VERY_FREQUENT, FREQUENT, OCCASIONAL = "very frequent", "frequent", "occasional"


@dataclass(frozen=True)
class TermFrequency:
    hpo_id: str
    frequency: float  # probability that a person of the class has the term

    @property
    def category(self) -> str:
        if self.frequency >= 0.8:
            return VERY_FREQUENT
        return FREQUENT if self.frequency >= 0.3 else OCCASIONAL


@dataclass(frozen=True)
class SyndromeClass:
    label: str
    terms: tuple[TermFrequency, ...] = ()

    def __post_init__(self) -> None:
        drawable = drawable_phenotypes()
        for term in self.terms:
            if term.hpo_id not in drawable:
                raise ValueError(f"class {self.label}: {term.hpo_id} cannot be drawn; use one of {sorted(drawable)}")
            if not 0.05 <= term.frequency <= 0.99:
                raise ValueError(f"class {self.label}: frequency of {term.hpo_id} must be in [0.05, 0.99]")
        if self.terms and not any(term.category == VERY_FREQUENT for term in self.terms):
            raise ValueError(f"class {self.label} needs at least one very frequent (>= 0.8) term")

    @property
    def regions(self) -> tuple[str, ...]:
        drawable = drawable_phenotypes()
        return tuple(sorted({drawable[term.hpo_id].term.region for term in self.terms}))


def _class(label: str, *terms: tuple[str, float]) -> SyndromeClass:
    return SyndromeClass(label, tuple(TermFrequency(hpo_id, frequency) for hpo_id, frequency in terms))


DEFAULT_CLASSES: tuple[SyndromeClass, ...] = (
    _class(UNAFFECTED),
    _class(  # eye only
        "KS",
        ("HP:0002553", 0.9),  # Highly arched eyebrow
        ("HP:0005338", 0.6),  # Sparse lateral eyebrow
        ("HP:0000527", 0.5),  # Long eyelashes
        ("HP:0000508", 0.2),  # Ptosis
    ),
    _class(  # nose only
        "22q11DS",
        ("HP:0000414", 0.9),  # Bulbous nose
        ("HP:0000426", 0.6),  # Prominent nasal bridge
        ("HP:0000431", 0.4),  # Wide nasal bridge
    ),
    _class(  # mouth only
        "Angelman",
        ("HP:0000154", 0.9),  # Wide mouth
        ("HP:0010808", 0.6),  # Protruding tongue
        ("HP:0010807", 0.2),  # Open bite
    ),
    _class(  # eye + nose
        "NS",
        ("HP:0000316", 0.9),  # Hypertelorism
        ("HP:0000494", 0.6),  # Down-slanted palpebral fissures
        ("HP:0000508", 0.5),  # Ptosis
        ("HP:0000431", 0.2),  # Wide nasal bridge
    ),
    _class(  # eye + mouth + nose
        "Down",
        ("HP:0000582", 0.9),  # Up-slanted palpebral fissure
        ("HP:0000286", 0.5),  # Epicanthus
        ("HP:0010808", 0.4),  # Protruding tongue
        ("HP:0003196", 0.2),  # Short nose
    ),
    _class(  # mouth + nose + eye
        "WS",
        ("HP:0000179", 0.9),  # Thick lower lip vermilion
        ("HP:0000343", 0.6),  # Long philtrum
        ("HP:0003196", 0.5),  # Short nose
        ("HP:0000286", 0.3),  # Epicanthus
        ("HP:0000154", 0.15),  # Wide mouth
    ),
)


def sample_phenotypes(
    syndrome: SyndromeClass, rng: np.random.Generator, severity_range: tuple[float, float]
) -> tuple[PlantedTerm, ...]:
    """Which of the class's terms one person has, and how strongly (severity to 3 decimals)."""
    if not syndrome.terms:
        return ()
    low, high = severity_range
    if not 0 < low <= high <= 1:
        raise ValueError(f"severity_range must satisfy 0 < low <= high <= 1, got {severity_range}")
    while True:  # resample until at least one term is present (see module docstring)
        present = [term for term in syndrome.terms if rng.random() < term.frequency]
        if present:
            break
    return tuple(PlantedTerm(term.hpo_id, round(float(rng.uniform(low, high)), 3)) for term in present)
