"""HPO terms the renderer can draw, each as an edit of the face's own region.

A phenotype is a list of (FaceShape field, change at severity 1); severity in (0, 1] scales
it linearly. The fields a term touches belong to one region's drawing only (eye: eyes and
brows; nose; mouth: lips, inner mouth, philtrum; overall: the face outline), which is what
makes the planted region the only place the class can be seen.
Names and regions come from the paper's table of 50 terms (``core.paper_terms``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from core.paper_terms import HpoTerm, paper_terms
from core.synth.params import FaceShape, PlantedTerm


@dataclass(frozen=True)
class Phenotype:
    term: HpoTerm
    edits: tuple[tuple[str, float], ...]  # (FaceShape field, change at severity 1)


# Sizes in canonical units (pixels of a 224 px photo): big enough to see at 224 px.
_EDITS: dict[str, tuple[tuple[str, float], ...]] = {
    "HP:0000316": (("eye_half_distance", 5.0),),  # Hypertelorism
    "HP:0000582": (("eye_tilt_deg", 11.0),),  # Up-slanted palpebral fissure
    "HP:0000494": (("eye_tilt_deg", -13.0),),  # Down-slanted palpebral fissures (baseline tilt is +2)
    "HP:0000508": (("lid_droop", 1.0),),  # Ptosis
    "HP:0002553": (("brow_arch", 5.0), ("brow_gap", 1.5)),  # Highly arched eyebrow
    "HP:0005338": (("brow_sparse", 1.0),),  # Sparse lateral eyebrow
    "HP:0000527": (("lash_length", 1.0),),  # Long eyelashes
    "HP:0000286": (("epicanthus", 1.0),),  # Epicanthus
    "HP:0000431": (("bridge_half_width", 4.0),),  # Wide nasal bridge
    "HP:0000426": (("bridge_relief", 1.0),),  # Prominent nasal bridge
    "HP:0000414": (("tip_radius", 4.0), ("alar_half_width", 3.0)),  # Bulbous nose
    "HP:0003196": (("nose_length", -6.0), ("nostril_show", 1.0)),  # Short nose
    "HP:0000343": (("mouth_y", 5.0),),  # Long philtrum
    "HP:0000154": (("mouth_half_width", 6.0),),  # Wide mouth
    "HP:0000179": (("lower_lip", 4.0),),  # Thick lower lip vermilion
    "HP:0010808": (("tongue", 1.0),),  # Protruding tongue
    "HP:0010807": (("open_bite", 1.0),),  # Open bite
    "HP:0000276": (("chin_y", 12.0),),  # Long face
    "HP:0000275": (("face_narrowing", 1.0),),  # Narrow face
}


@lru_cache(maxsize=1)  # derived from the bundled table, read once
def drawable_phenotypes() -> dict[str, Phenotype]:
    """The terms the renderer can plant, keyed by HPO id."""
    terms = {term.hpo_id: term for term in paper_terms()}
    return {hpo_id: Phenotype(terms[hpo_id], edits) for hpo_id, edits in _EDITS.items()}


def apply_phenotypes(shape: FaceShape, planted: tuple[PlantedTerm, ...]) -> FaceShape:
    """The person's face with the planted terms drawn in, each scaled by its severity."""
    phenotypes = drawable_phenotypes()
    changes: dict[str, float] = {}
    for term in planted:
        if term.hpo_id not in phenotypes:
            raise ValueError(f"{term.hpo_id} cannot be drawn; drawable terms: {sorted(phenotypes)}")
        if not 0 < term.severity <= 1:
            raise ValueError(f"severity of {term.hpo_id} must be in (0, 1], got {term.severity}")
        for field, change in phenotypes[term.hpo_id].edits:
            changes[field] = changes.get(field, 0.0) + change * term.severity
    return replace(shape, **{field: getattr(shape, field) + change for field, change in changes.items()})
