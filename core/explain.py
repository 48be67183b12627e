"""One photo through the whole pipeline: the function the CLI's ``explain`` and the dashboard share.

Every expensive step is memoised by content when a ``cache`` is given (landmarks, parse,
probabilities, and each method's attribution); without one nothing touches the disk, which
is the default for uploaded photos.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cache import DiskCache
from core.dataset import Photo
from core.domain import DomainVerdict, verdict_summary
from core.pipeline import (
    ExplainSettings,
    PreparedFace,
    class_probabilities,
    domain_scores,
    prepare_face,
    score_faces,
    target_indices,
)
from core.regions import RegionMasks
from models.checkpoint import Classifier


@dataclass(frozen=True)
class Explanation:
    """Everything a reader needs to see why the classifier decided what it did, for one photo."""

    face: PreparedFace
    classes: tuple[str, ...]
    probabilities: np.ndarray  # K
    target: int
    mode: str
    maps: Mapping[str, np.ndarray] = field(repr=False)  # method -> size×size relevance
    scores: Mapping[str, np.ndarray] = field(repr=False)  # method -> R region scores
    domain: DomainVerdict | None = None  # the classifier's out-of-domain guard on this face (None: no guard)

    @property
    def predicted(self) -> int:
        return int(np.argmax(self.probabilities))

    def summary(self) -> dict[str, Any]:
        """The JSON-ready part: no images."""
        return {
            "landmarks": np.round(self.face.landmarks, 2).tolist(),
            "parse_source": self.face.parse_source,
            "alignment_check": None if self.face.alignment_check is None else self.face.alignment_check.summary(),
            "prediction": {
                "class": self.classes[self.predicted],
                "probability": round(float(self.probabilities[self.predicted]), 4),
            },
            "target": self.classes[self.target],
            "probabilities": {c: round(float(p), 4) for c, p in zip(self.classes, self.probabilities)},
            "relevance_mode": self.mode,
            "regions": list(self.face.region_names),
            "region_scores": {
                method: {
                    r: (None if np.isnan(s) else round(float(s), 5)) for r, s in zip(self.face.region_names, scores)
                }
                for method, scores in self.scores.items()
            },
            "notes": list(self.face.notes),
            "domain": verdict_summary(self.domain),
        }


def explain(
    photo: Photo,
    classifier: Classifier,
    settings: ExplainSettings | None = None,
    cache: DiskCache | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Explanation:
    """Align, parse, classify and explain one RGB photo with each of ``settings.methods``.

    The photo's ``landmarks`` (5×2, its pixels) skip detection, its ``label_map`` wins over the parser.
    """
    settings = settings or ExplainSettings()
    face = prepare_face(photo, classifier.card.input_size, settings, cache)
    probabilities = class_probabilities(classifier, face.aligned[None], cache)
    domain = domain_scores(classifier, face.aligned[None], cache)
    target = int(target_indices(settings.target, classifier.card.classes, probabilities)[0])
    maps, scores = {}, {}
    masks = RegionMasks(face.region_names, face.masks[None])
    for i, result in enumerate(score_faces(classifier, face.aligned[None], masks, [target], settings, cache)):
        maps[result.method], scores[result.method] = result.maps[0], result.scores[0]
        if progress is not None:
            progress(settings.methods[i], i, len(settings.methods))
    if progress is not None:
        progress("done", len(settings.methods), len(settings.methods))
    return Explanation(
        face=face,
        classes=tuple(classifier.card.classes),
        probabilities=probabilities[0],
        target=target,
        mode=settings.mode,
        maps=maps,
        scores=scores,
        domain=None if domain is None or classifier.domain is None else classifier.domain.verdict(domain[0]),
    )
