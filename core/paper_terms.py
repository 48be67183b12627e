"""The paper's Table 1: its 50 HPO terms and the face region each belongs to.

One reader for the bundled ``paper_terms.csv`` (region, paper_name, hpo_id, hpo_name, note), so
the ontology code (``core.hpo``) and the synthetic renderer (``core.synth``) share one list in
one order. ``hpo_name`` and ``note`` record what the ontology said of each id when the table was
made; ``core.hpo`` resolves the ids in the bundled ontology itself.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

TERMS_CSV = Path(__file__).with_name("paper_terms.csv")  # shipped with the code, never fetched


@dataclass(frozen=True)
class HpoTerm:
    """One row of the paper's Table 1."""

    hpo_id: str  # as the paper gives it (one is obsolete in today's ontology)
    name: str  # the paper's spelling: the annotation CSV column
    region: str


@lru_cache(maxsize=1)  # a constant table: read once per process
def paper_terms() -> tuple[HpoTerm, ...]:
    """The paper's 50 HPO terms in its table order (the order of every term vector)."""
    with TERMS_CSV.open(newline="") as handle:
        return tuple(HpoTerm(row["hpo_id"], row["paper_name"], row["region"]) for row in csv.DictReader(handle))
