"""Synthetic face photos with planted HPO phenotypes and their exact ground truth (issue 3).

``render_face`` draws one photo (image, LaPa label map, 5 landmarks) from ``FaceParams``;
``generate_dataset`` writes a whole dataset in the NIH-Faces layout, deterministically.
"""

from core.synth.classes import DEFAULT_CLASSES, SyndromeClass, TermFrequency, sample_phenotypes
from core.synth.dataset import RaterModel, Summary, SyntheticSpec, generate_dataset, plan_images
from core.synth.faces import RenderedFace, render_face
from core.synth.params import FaceParams, FaceShape, Photo, PlantedTerm, sample_face_shape, sample_photo
from core.synth.phenotypes import drawable_phenotypes

__all__ = [
    "DEFAULT_CLASSES",
    "FaceParams",
    "FaceShape",
    "Photo",
    "PlantedTerm",
    "RaterModel",
    "RenderedFace",
    "Summary",
    "SyndromeClass",
    "SyntheticSpec",
    "TermFrequency",
    "drawable_phenotypes",
    "generate_dataset",
    "plan_images",
    "render_face",
    "sample_face_shape",
    "sample_phenotypes",
    "sample_photo",
]
