"""One photo through the whole pipeline: the function the CLI's ``explain`` and the dashboard share.

Every expensive step is memoised by content when a ``cache`` is given (landmarks, parse,
probabilities, and each method's attribution); without one nothing touches the disk, which
is the default for uploaded photos.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cache import MISSING, DiskCache, memo_key, memoised, source_salt
from core import align as align_module
from core import attribute as attribute_module
from core import parse as parse_module
from core.align import align_face, detect_faces, warp_to_aligned
from core.attribute import METHOD_NAMES, METHODS, attribute
from core.errors import NoFaceError, UserFacingError
from core.parse import parse_face
from core.regions import PAPER_REGIONS, RegionSpec, region_masks
from core.score import channel_sums, region_scores, relevance_from_sums
from models import checkpoint as checkpoint_module
from models import parser as parser_module
from models import resnet as resnet_module
from models.checkpoint import Classifier, classify, preprocess
from models.parser import FaceParser, predict_label_maps


@dataclass(frozen=True)
class PreparedFace:
    """A photo made ready for explanation: aligned, parsed, cut into regions. Needs no classifier."""

    landmarks: np.ndarray  # 5×2 in the original photo
    matrix: np.ndarray  # 2×3, original -> aligned
    aligned: np.ndarray  # size×size×3 uint8
    aligned_landmarks: np.ndarray
    label_map: np.ndarray  # size×size uint8, LaPa
    parse_source: str  # "parser" | "stored" | "template"
    region_names: tuple[str, ...]
    masks: np.ndarray  # R×size×size bool
    notes: tuple[str, ...] = ()


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

    @property
    def predicted(self) -> int:
        return int(np.argmax(self.probabilities))

    def summary(self) -> dict[str, Any]:
        """The JSON-ready part: no images."""
        return {
            "landmarks": np.round(self.face.landmarks, 2).tolist(),
            "parse_source": self.face.parse_source,
            "prediction": {
                "class": self.classes[self.predicted],
                "probability": round(float(self.probabilities[self.predicted]), 4),
            },
            "target": self.classes[self.target],
            "probabilities": {c: round(float(p), 4) for c, p in zip(self.classes, self.probabilities)},
            "relevance_mode": self.mode,
            "regions": list(self.face.region_names),
            "region_scores": {
                method: {r: (None if np.isnan(s) else round(float(s), 5)) for r, s in zip(self.face.region_names, scores)}
                for method, scores in self.scores.items()
            },
            "notes": list(self.face.notes),
        }


@memoised("faces", depends=(align_module,))
def found_faces(image: np.ndarray) -> tuple[np.ndarray, int]:
    """Landmarks of the largest face and how many faces there were."""
    faces = detect_faces(image)
    if not faces:
        raise NoFaceError(align_module.NO_FACE_MESSAGE)
    return faces[0].landmarks, len(faces)


@memoised("parse", depends=(parse_module, parser_module))
def parsed_face(aligned: np.ndarray, aligned_landmarks: np.ndarray, parser: FaceParser | None,
                stored_map: np.ndarray | None):
    network = None if parser is None else (lambda images: predict_label_maps(parser, images))
    return parse_face(aligned, parser=network, stored_map=stored_map, landmarks=aligned_landmarks)


@memoised("probabilities", depends=(checkpoint_module, resnet_module))
def class_probabilities(classifier: Classifier, aligned: np.ndarray) -> np.ndarray:
    probabilities, _ = classify(classifier, preprocess(aligned[None], classifier.card))
    return probabilities[0]


def attribution_sums(
    classifier: Classifier,
    images: np.ndarray,
    targets: Sequence[int],
    method: str,
    params: Mapping[str, Any] | None = None,
    cache: DiskCache | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Channel sums (Σ|a|, Σa), each N×H×W, of ``method`` for aligned uint8 images N×H×W×3.

    Looked up per image, so a resumed batch computes only what is missing, as one batch.
    """
    targets = [int(t) for t in targets]
    params = METHODS[method].params(params)

    def compute(rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        batch = preprocess(images[rows], classifier.card)
        return channel_sums(attribute(classifier.network, batch, [targets[i] for i in rows], method, params))

    if cache is None:
        return compute(list(range(len(images))))
    salt = _attribution_salt()
    keys = [memo_key("attribution", salt, classifier, image, t, method, params) for image, t in zip(images, targets)]
    found = [cache.lookup(k) for k in keys]
    todo = [i for i, value in enumerate(found) if value is MISSING]
    if todo:
        abs_sum, signed_sum = compute(todo)
        for j, i in enumerate(todo):
            found[i] = (abs_sum[j], signed_sum[j])
            cache.store(keys[i], found[i])
    return np.stack([f[0] for f in found]), np.stack([f[1] for f in found])


@functools.lru_cache(maxsize=1)
def _attribution_salt() -> str:
    return source_salt(attribute_module, checkpoint_module, resnet_module)


def prepare_face(
    image: np.ndarray,
    size: int,
    spec: RegionSpec = PAPER_REGIONS,
    landmarks: np.ndarray | None = None,
    parser: FaceParser | None = None,
    stored_map: np.ndarray | None = None,
    cache: DiskCache | None = None,
) -> PreparedFace:
    """Detect (unless ``landmarks`` are given, 5×2 in the photo), align to size×size, parse, cut regions."""
    notes = []
    if landmarks is None:
        landmarks, n_faces = found_faces(image, cache=cache)
        if n_faces > 1:
            notes.append(f"{n_faces} faces found; the largest was explained.")
    aligned = align_face(image, landmarks, size=size)
    if stored_map is not None:
        stored_map = stored_map_in_aligned_frame(stored_map, image.shape, aligned.matrix, size)
    parsed = parsed_face(aligned.image, aligned.landmarks, parser, stored_map, cache=cache)
    masks = region_masks(parsed.label_map, spec)
    notes.extend(f"Region {name!r} is empty on this face: its scores are NaN."
                 for name, mask in zip(masks.names, masks.masks) if not mask.any())
    return PreparedFace(
        landmarks=np.asarray(landmarks, dtype=np.float64),
        matrix=aligned.matrix,
        aligned=aligned.image,
        aligned_landmarks=aligned.landmarks,
        label_map=parsed.label_map,
        parse_source=parsed.source,
        region_names=masks.names,
        masks=masks.masks,
        notes=tuple(notes),
    )


class LabelMapError(UserFacingError):
    """A stored label map that cannot be placed on its face."""


class TargetError(UserFacingError, ValueError):
    """A class to explain that the model does not have (also a ValueError: a bad argument value)."""


def stored_map_in_aligned_frame(label_map: np.ndarray, photo_shape: tuple[int, ...], matrix: np.ndarray,
                                size: int) -> np.ndarray:
    """Stored label maps are drawn on the photo (same height and width); a map already of the
    aligned size is taken as aligned. Anything else cannot be placed and is refused."""
    if label_map.shape == tuple(photo_shape[:2]):
        return warp_to_aligned(label_map, matrix, size, order=0)
    if label_map.shape == (size, size):
        return label_map
    raise LabelMapError(f"the stored label map is {label_map.shape[1]}×{label_map.shape[0]} but the photo is "
                        f"{photo_shape[1]}×{photo_shape[0]} (and the aligned face {size}×{size}); it fits neither")


def explain(
    image: np.ndarray,
    classifier: Classifier,
    methods: Sequence[str] = METHOD_NAMES,
    spec: RegionSpec = PAPER_REGIONS,
    landmarks: np.ndarray | None = None,
    parser: FaceParser | None = None,
    stored_map: np.ndarray | None = None,
    target: int | str | None = None,
    mode: str = "abs",
    params: Mapping[str, Mapping[str, Any]] | None = None,
    cache: DiskCache | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Explanation:
    """Align, parse, classify and explain one RGB photo with each of ``methods``.

    ``landmarks`` (5×2, original photo) skip detection; ``target`` is a class index or name
    (default: the predicted class); ``params`` maps a method name to overrides of its defaults.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_NAMES)}")
    face = prepare_face(image, classifier.card.input_size, spec, landmarks, parser, stored_map, cache=cache)
    probabilities = class_probabilities(classifier, face.aligned, cache=cache)
    target_index = _target_index(target, classifier.card.classes, probabilities)
    maps, scores = {}, {}
    for i, method in enumerate(methods):
        if progress is not None:
            progress(method, i, len(methods))
        abs_sum, signed_sum = attribution_sums(
            classifier, face.aligned[None], [target_index], method, (params or {}).get(method), cache=cache
        )
        maps[method] = relevance_from_sums(abs_sum, signed_sum, mode)[0]
        scores[method] = region_scores(maps[method][None], face.masks, face.region_names)[0]
    if progress is not None:
        progress("done", len(methods), len(methods))
    return Explanation(
        face=face,
        classes=tuple(classifier.card.classes),
        probabilities=probabilities,
        target=target_index,
        mode=mode,
        maps=maps,
        scores=scores,
    )


def _target_index(target: int | str | None, classes: Sequence[str], probabilities: np.ndarray) -> int:
    if target is None:
        return int(np.argmax(probabilities))
    if isinstance(target, str) and not target.isdigit():
        if target not in classes:
            raise TargetError(f"unknown target class {target!r}; the model knows {', '.join(classes)}")
        return list(classes).index(target)
    index = int(target)
    if not 0 <= index < len(classes):
        raise TargetError(f"target index {index} is outside 0..{len(classes) - 1}")
    return index
