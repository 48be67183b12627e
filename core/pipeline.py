"""The pipeline: one settings object, one way a photo becomes a prepared face, one scoring loop.

``explain`` (one photo), ``extract`` (a dataset), the faithfulness and sanity checks, the
leaderboard and the dashboard all go through these functions, so they cannot drift apart.
Memoisation sits here, at the pipeline's edge: every function that runs a network or a parser
takes an optional ``cache`` and looks its results up by content; the science below never sees it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from cache import DiskCache, memo_key, memoised, memoised_rows, source_salt
from core import align as align_module
from core import attribute as attribute_module
from core import fused_rules as fused_rules_module
from core import landmark_parts as landmark_parts_module
from core import parse as parse_module
from core.align import AlignedFace, align_face, detect_faces, warp_to_aligned
from core.attribute import METHOD_NAMES, METHODS, attribute
from core.dataset import Dataset, DatasetError, Photo, read_photo
from core.devices import module_device, module_dtype, precision_tag, resolve_device
from core.errors import ImageError, NoFaceError, UserFacingError
from core.landmark_parts import AlignmentCheck, alignment_check
from core.parse import ParsedFace, parse_face
from core.regions import PAPER_REGIONS, RegionMasks, RegionSpec, region_masks
from core.score import RELEVANCE_MODES, channel_sums, region_scores, relevance_from_sums
from models import checkpoint as checkpoint_module
from models import domain_guard as domain_guard_module
from models import landmarks68 as landmarks68_module
from models import parser as parser_module
from models import resnet as resnet_module
from models.checkpoint import Classifier, classify, preprocess
from models.domain_guard import penultimate_features
from models.landmarks68 import DenseLandmarks, DenseLandmarksUnavailable, landmarks_68
from models.parser import FaceParser, predict_label_maps


class SettingsError(UserFacingError, ValueError):
    """An explanation setting no step knows (also a ValueError: a bad argument value)."""


class TargetError(UserFacingError, ValueError):
    """A class to explain that the model does not have (also a ValueError: a bad argument value)."""


class LabelMapError(UserFacingError):
    """A stored label map that cannot be placed on its face."""


# What parses a face that has neither a stored label map nor a face parser (``ExplainSettings.landmark_parser``):
# dlib's 68 landmarks (real faces; the template when dlib is missing) or the five-point template.
LANDMARK_PARSERS = ("landmarks68", "template")


@dataclass(frozen=True)
class ExplainSettings:
    """Everything that decides an explanation besides the photo and the model.

    ``params`` maps a method name to overrides of its paper defaults. ``target`` is ``"predicted"``
    (the paper), ``"label"`` (each dataset image's true class), or one class name or index for all.
    ``parser`` is consulted only for faces without a stored label map, ``landmark_parser`` only for faces
    with neither (see ``prepare_face``). ``detector_device`` is where MTCNN looks for faces (``cpu``,
    ``cuda:N``); the classifier and the parser run where they were loaded (``Classifier.device``).
    """

    methods: tuple[str, ...] = METHOD_NAMES
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    mode: str = "abs"
    spec: RegionSpec = PAPER_REGIONS
    parser: FaceParser | None = None
    target: str | int = "predicted"
    batch_size: int = 16
    landmark_parser: str = "landmarks68"
    detector_device: str = "cpu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "detector_device", str(resolve_device(self.detector_device, "detector device")))
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise SettingsError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        resolved = {m: MappingProxyType(METHODS[m].params((self.params or {}).get(m))) for m in self.methods}
        object.__setattr__(self, "params", MappingProxyType(resolved))
        if self.mode not in RELEVANCE_MODES:
            raise SettingsError(f"mode must be one of {', '.join(RELEVANCE_MODES)}, not {self.mode!r}")
        if self.batch_size < 1:
            raise SettingsError(f"batch size must be at least 1, got {self.batch_size}")
        if self.landmark_parser not in LANDMARK_PARSERS:
            raise SettingsError(
                f"landmark parser must be one of {', '.join(LANDMARK_PARSERS)}, not {self.landmark_parser!r}"
            )

    def method_params(self, method: str) -> dict[str, Any]:
        """The full parameters of one of ``methods``: its paper defaults with this run's overrides."""
        return dict(self.params[method])


@dataclass(frozen=True)
class PreparedFace:
    """A photo made ready for explanation: aligned, parsed, cut into regions. Needs no classifier."""

    landmarks: np.ndarray  # 5×2 in the original photo
    matrix: np.ndarray  # 2×3, original -> aligned
    aligned: np.ndarray  # size×size×3 uint8
    aligned_landmarks: np.ndarray
    label_map: np.ndarray  # size×size uint8, LaPa
    parse_source: str  # "stored" | "parser" | "landmarks68" | "template"
    region_names: tuple[str, ...]
    masks: np.ndarray  # R×size×size bool
    notes: tuple[str, ...] = ()
    alignment_check: AlignmentCheck | None = None  # detected faces and faces parsed from dlib's 68 points


# --- One photo -> one prepared face -------------------------------------------------------------


@memoised("faces", depends=(align_module,))
def found_faces(image: np.ndarray, device: str | None = None) -> tuple[np.ndarray, int]:
    """Landmarks of the largest face and how many faces there were; MTCNN runs on ``device`` (None: the CPU,
    so a CPU run's cache key has no device in it, and a GPU's does)."""
    faces = detect_faces(image, align_module.default_detector(device or "cpu"))
    if not faces:
        raise NoFaceError(align_module.NO_FACE_MESSAGE)
    return faces[0].landmarks, len(faces)


@memoised("landmarks68", depends=(landmarks68_module, align_module))
def found_landmarks68(image: np.ndarray, five: np.ndarray) -> DenseLandmarks:
    """dlib's 68 points of the face whose five points are ``five`` (``models.landmarks68.landmarks_68``)."""
    return landmarks_68(image, five)


@memoised("parse", depends=(parse_module, landmark_parts_module, parser_module))
def parsed_face(
    aligned: np.ndarray,
    aligned_landmarks: np.ndarray,
    parser: FaceParser | None,
    stored_map: np.ndarray | None,
    aligned_landmarks68: np.ndarray | None = None,
    parser_on: str | None = None,
) -> ParsedFace:
    """The face's label map (``core.parse.parse_face``). ``parser_on`` is the parser's ``device_tag`` when it
    is not the CPU's: it only keys the cache, so a label map parsed on a GPU is not served as a CPU one."""
    network = None if parser is None else functools.partial(predict_label_maps, parser)
    return parse_face(
        aligned, parser=network, stored_map=stored_map, landmarks=aligned_landmarks, landmarks68=aligned_landmarks68
    )


def align_photo(
    photo: Photo, size: int, cache: DiskCache | None = None, device: str = "cpu"
) -> tuple[AlignedFace, np.ndarray, list[str]]:
    """The face aligned to size×size from the photo's landmarks, detected (on ``device``) when it has none;
    the landmarks used (5×2, photo pixels) and notes for the reader."""
    notes = []
    landmarks = photo.landmarks
    if landmarks is None:
        on = {} if device == "cpu" else {"device": device}
        landmarks, n_faces = found_faces(photo.image, **on, cache=cache)
        if n_faces > 1:
            notes.append(f"{n_faces} faces found; the largest was explained.")
    return align_face(photo.image, landmarks, size=size), np.asarray(landmarks, dtype=np.float64), notes


def prepare_face(photo: Photo, size: int, settings: ExplainSettings, cache: DiskCache | None = None) -> PreparedFace:
    """Align (detecting the face unless the photo has landmarks), parse, cut into ``settings.spec``'s regions.

    The one label-map rule: the photo's stored map (a dataset's own, what its results were scored
    with) wins, then ``settings.parser``, then dlib's 68 landmarks (``settings.landmark_parser``, the
    default), then the landmark template (``core.parse.parse_face``). dlib's 68 points are also found for
    every detected face, to check its alignment (``alignment_check``).
    """
    aligned, landmarks, notes = align_photo(photo, size, cache, settings.detector_device)
    stored = None
    if photo.label_map is not None:
        stored = stored_map_in_aligned_frame(photo.label_map, photo.image.shape, aligned.matrix, size)
    parse_from_68 = stored is None and settings.parser is None and settings.landmark_parser == "landmarks68"
    dense, check = None, None
    if parse_from_68 or photo.landmarks is None:
        dense, check = dense_landmarks_and_check(photo.image, landmarks, notes, cache)
    aligned68 = None
    if parse_from_68 and dense is not None:
        aligned68 = dense.points @ aligned.matrix[:, :2].T + aligned.matrix[:, 2]
    parser_on = {} if settings.parser is None else _device_kwargs(settings.parser.network)
    parsed = parsed_face(aligned.image, aligned.landmarks, settings.parser, stored, aligned68, **parser_on, cache=cache)
    masks = region_masks(parsed.label_map, settings.spec)
    notes.extend(
        f"Region {name!r} is empty on this face: its scores are NaN."
        for name, mask in zip(masks.names, masks.masks, strict=True)
        if not mask.any()
    )
    return PreparedFace(
        landmarks=landmarks,
        matrix=aligned.matrix,
        aligned=aligned.image,
        aligned_landmarks=aligned.landmarks,
        label_map=parsed.label_map,
        parse_source=parsed.source,
        region_names=masks.names,
        masks=masks.masks,
        notes=tuple(notes),
        alignment_check=check,
    )


def dense_landmarks_and_check(
    image: np.ndarray, five: np.ndarray, notes: list[str], cache: DiskCache | None = None
) -> tuple[DenseLandmarks | None, AlignmentCheck]:
    """dlib's 68 points of the face at ``five`` (None, with a note, when dlib is not installed) and the
    check of ``five`` against them and the photo's border (``core.landmark_parts.alignment_check``)."""
    try:
        dense = found_landmarks68(image, five, cache=cache)
    except DenseLandmarksUnavailable as error:
        notes.append(str(error))
        return None, alignment_check(five, None, image.shape)
    return dense, alignment_check(five, dense.points, image.shape, dense.dlib_detected)


def stored_map_in_aligned_frame(
    label_map: np.ndarray, photo_shape: tuple[int, ...], matrix: np.ndarray, size: int
) -> np.ndarray:
    """Stored label maps are drawn on the photo (same height and width); a map already of the
    aligned size is taken as aligned. Anything else cannot be placed and is refused."""
    if label_map.shape == tuple(photo_shape[:2]):
        return warp_to_aligned(label_map, matrix, size, order=0)
    if label_map.shape == (size, size):
        return label_map
    raise LabelMapError(
        f"the stored label map is {label_map.shape[1]}×{label_map.shape[0]} but the photo is "
        f"{photo_shape[1]}×{photo_shape[0]} (and the aligned face {size}×{size}); it fits neither"
    )


def aligned_dataset_photos(
    dataset: Dataset,
    names: Sequence[str],
    size: int,
    purpose: str = "training",
    skipped: dict[str, UserFacingError] | None = None,
) -> Iterator[tuple[Photo, AlignedFace]]:
    """The training path: each dataset photo (``read_photo``) and its face aligned from the dataset's
    landmarks, with no detection and no parsing (trainers must not learn from a detector's guesses).
    With ``skipped``, a photo that cannot be read (missing, unreadable, landmarks off it) goes there,
    name -> the error, and is passed over, as ``prepare_dataset_faces`` does; without it, it is raised."""
    if not dataset.has_landmarks:
        raise DatasetError(f"{purpose} needs landmarks in partitions.csv (x1,y1,…,x5,y5); run face detection first")
    for name in names:
        try:
            photo = read_photo(dataset, name)
        except DatasetError as error:
            if skipped is None:
                raise
            skipped[name] = error
            continue
        assert photo.landmarks is not None  # read_photo gives every photo of a dataset with landmarks its own
        yield photo, align_face(photo.image, photo.landmarks, size=size)


def prepare_dataset_faces(
    dataset: Dataset, names: Sequence[str], size: int, settings: ExplainSettings, cache: DiskCache | None = None
) -> tuple[dict[str, PreparedFace], dict[str, UserFacingError]]:
    """Each dataset image read (``read_photo``: landmarks and stored map follow a shrunk photo) and
    prepared; photos that cannot be used come back apart, name -> the error, for the caller to decide."""
    faces: dict[str, PreparedFace] = {}
    skipped: dict[str, UserFacingError] = {}
    for name in names:
        try:
            faces[name] = prepare_face(read_photo(dataset, name), size, settings, cache)
        except (DatasetError, ImageError, NoFaceError) as error:
            skipped[name] = error
    return faces, skipped


def stacked(faces: Sequence[PreparedFace]) -> tuple[np.ndarray, RegionMasks]:
    """Aligned images N×S×S×3 and region masks N×R×S×S of faces prepared with one spec."""
    return np.stack([f.aligned for f in faces]), RegionMasks(faces[0].region_names, np.stack([f.masks for f in faces]))


@dataclass(frozen=True)
class FaceSet:
    """Aligned faces with their names, region masks (N×R×S×S) and, for dataset faces, true labels."""

    names: tuple[str, ...]
    aligned: np.ndarray = field(repr=False)
    masks: RegionMasks = field(repr=False)
    labels: tuple[str, ...] | None = None
    parse_sources: tuple[str, ...] = ()  # where each face's label map came from, for dataset faces

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        if len(self.aligned) == 0:
            raise UserFacingError("no faces to check: the selection is empty")
        counts = {len(self.names), len(self.aligned), len(self.masks.masks)} | (
            set() if self.labels is None else {len(self.labels)}
        )
        if len(counts) > 1:
            raise ValueError(
                f"{len(self.aligned)} faces, {len(self.names)} names and {len(self.masks.masks)} mask "
                "sets: they must match"
            )


def dataset_face_set(
    dataset: Dataset,
    names: Sequence[str],
    size: int,
    settings: ExplainSettings | None = None,
    cache: DiskCache | None = None,
) -> FaceSet:
    """Every named face prepared (``prepare_dataset_faces``), or the first photo's problem raised."""
    faces, skipped = prepare_dataset_faces(dataset, names, size, settings or ExplainSettings(), cache)
    if skipped:
        raise next(iter(skipped.values()))
    prepared = [faces[n] for n in names]
    aligned, masks = stacked(prepared)
    labels = dataset.labels
    return FaceSet(
        tuple(names), aligned, masks, tuple(labels[n] for n in names), tuple(f.parse_source for f in prepared)
    )


# --- Faces -> probabilities, maps, region scores -------------------------------------------------


def class_probabilities(classifier: Classifier, aligned: np.ndarray, cache: DiskCache | None = None) -> np.ndarray:
    """N×K class probabilities of aligned uint8 faces, looked up per face, the missing ones as one batch."""

    def compute(rows: list[int]) -> list[np.ndarray]:
        return list(classify(classifier, preprocess(aligned[rows], classifier.card))[0])

    keys = [memo_key("probabilities", _model_salt(), classifier, face, *device_parts(classifier)) for face in aligned]
    return np.stack(memoised_rows(cache, keys, compute))


def face_features(classifier: Classifier, aligned: np.ndarray, cache: DiskCache | None = None) -> np.ndarray:
    """N×D penultimate features of aligned uint8 faces (``models.domain_guard``), looked up per face,
    the missing ones computed as one batch."""

    def compute(rows: list[int]) -> list[np.ndarray]:
        return list(penultimate_features(classifier.network, preprocess(aligned[rows], classifier.card)))

    keys = [memo_key("features", _features_salt(), classifier, face, *device_parts(classifier)) for face in aligned]
    return np.stack(memoised_rows(cache, keys, compute))


def domain_scores(classifier: Classifier, aligned: np.ndarray, cache: DiskCache | None = None) -> np.ndarray | None:
    """N out-of-domain scores under the classifier's guard (``core.domain``); None when it has none."""
    if classifier.domain is None:
        return None
    return classifier.domain.scores(face_features(classifier, aligned, cache))


def target_indices(
    target: str | int, classes: Sequence[str], probabilities: np.ndarray, labels: Sequence[str] | None = None
) -> np.ndarray:
    """The class each face is explained for, under ``ExplainSettings.target``."""
    if target == "predicted":
        return probabilities.argmax(axis=1)
    if target == "label":
        if labels is None:
            raise TargetError("target 'label' needs the faces' true classes; a single photo has none")
        unknown = sorted(set(labels) - set(classes))
        if unknown:
            raise TargetError(
                f"the model cannot explain the true label of every image: it has no class "
                f"{', '.join(unknown)} (it knows {', '.join(classes)})"
            )
        return np.array([list(classes).index(label) for label in labels], dtype=int)
    return np.full(len(probabilities), _class_index(target, classes), dtype=int)


def _class_index(target: str | int, classes: Sequence[str]) -> int:
    if isinstance(target, str) and not target.isdigit():
        if target not in classes:
            raise TargetError(f"unknown target class {target!r}; the model knows {', '.join(classes)}")
        return list(classes).index(target)
    index = int(target)
    if not 0 <= index < len(classes):
        raise TargetError(f"target index {index} is outside 0..{len(classes) - 1}")
    return index


def attribution_sums(
    classifier: Classifier,
    images: np.ndarray,
    targets: Sequence[int],
    method: str,
    params: Mapping[str, Any],
    cache: DiskCache | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Channel sums (Σ|a|, Σa), each N×H×W, of ``method`` for aligned uint8 images N×H×W×3.

    Looked up per image, so a resumed batch computes only what is missing, as one batch.
    """
    targets = [int(t) for t in targets]
    params = dict(params)

    def compute(rows: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        batch = preprocess(images[rows], classifier.card)
        abs_sum, signed_sum = channel_sums(
            attribute(classifier.network, batch, [targets[i] for i in rows], method, params)
        )
        return list(zip(abs_sum, signed_sum, strict=True))

    keys = [
        memo_key("attribution", _attribution_salt(), classifier, image, t, method, params, *device_parts(classifier))
        for image, t in zip(images, targets, strict=True)
    ]
    found = memoised_rows(cache, keys, compute)
    return np.stack([f[0] for f in found]), np.stack([f[1] for f in found])


def relevance_maps(
    classifier: Classifier,
    aligned: np.ndarray,
    targets: Sequence[int],
    method: str,
    settings: ExplainSettings,
    cache: DiskCache | None = None,
) -> np.ndarray:
    """N×H×W relevance maps (``settings.mode``) of ``method``, ``settings.batch_size`` faces per attribution."""
    step = settings.batch_size
    return np.concatenate(
        [
            relevance_from_sums(
                *attribution_sums(
                    classifier,
                    aligned[i : i + step],
                    targets[i : i + step],
                    method,
                    settings.method_params(method),
                    cache,
                ),
                settings.mode,
            )
            for i in range(0, len(aligned), step)
        ]
    )


@dataclass(frozen=True)
class MethodScores:
    method: str
    maps: np.ndarray = field(repr=False)  # N×H×W relevance
    scores: np.ndarray = field(repr=False)  # N×R region scores C_i (paper eq. 4)


def score_faces(
    classifier: Classifier,
    aligned: np.ndarray,
    masks: RegionMasks,
    targets: Sequence[int] | np.ndarray,
    settings: ExplainSettings,
    cache: DiskCache | None = None,
) -> Iterator[MethodScores]:
    """The one scoring loop: for each of ``settings.methods``, the relevance maps of the aligned faces and
    their region scores under ``masks`` (N×R×H×W). A generator, so callers report progress per method."""
    targets = [int(t) for t in targets]
    for method in settings.methods:
        maps = relevance_maps(classifier, aligned, targets, method, settings, cache)
        yield MethodScores(method, maps, region_scores(maps, masks.masks, masks.names))


CPU_TAG = "cpu/float32"


def device_tag(network) -> str:
    """Where a network computes and at what precision (``core.devices.precision_tag``): ``cpu/float32``,
    ``cuda/tf32`` …"""
    return precision_tag(module_device(network), module_dtype(network))


def device_parts(model: Classifier | FaceParser) -> tuple[str, ...]:
    """The part a content key gets for the model's device: none on the CPU in float32 (the keys from before
    devices), its ``device_tag`` elsewhere, so a map computed on a GPU is never served as a CPU one."""
    tag = device_tag(model.network)
    return () if tag == CPU_TAG else (tag,)


def _device_kwargs(network) -> dict[str, str]:
    tag = device_tag(network)
    return {} if tag == CPU_TAG else {"parser_on": tag}


@functools.lru_cache(maxsize=1)
def _attribution_salt() -> str:
    return source_salt(attribute_module, fused_rules_module, checkpoint_module, resnet_module)


@functools.lru_cache(maxsize=1)
def _model_salt() -> str:
    return source_salt(checkpoint_module, resnet_module)


@functools.lru_cache(maxsize=1)
def _features_salt() -> str:
    return source_salt(checkpoint_module, resnet_module, domain_guard_module)
