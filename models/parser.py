"""The face parser: a segmentation-models-pytorch U-Net giving LaPa label maps.

Label ids are categories, not intensities: only the image is resized with interpolation;
label maps are resized with nearest neighbour, which can only copy existing labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from core.devices import module_device, resolve_device
from core.errors import ModelError
from core.parse import LAPA_LABELS, resize_label_map
from models.checkpoint import (
    CARD_BYTES,
    PARSER_ARCHITECTURE_PREFIX,
    WEIGHTS_BYTES,
    ModelCard,
    load_weights,
    normalise_pixels,
    read_card,
    save_checkpoint,
)

_HEAD_KEY = "segmentation_head.0.weight"


def build_face_parser(encoder: str = "resnet18", classes: int = len(LAPA_LABELS)) -> nn.Module:
    """An untrained U-Net; ``encoder_weights=None`` because nothing may be downloaded at run time."""
    if encoder not in smp.encoders.get_encoder_names():
        raise ModelError(
            f"unknown face-parser encoder {encoder!r}; segmentation-models-pytorch offers e.g. "
            "resnet18, resnet34, resnet50"
        )
    return smp.Unet(encoder_name=encoder, encoder_weights=None, in_channels=3, classes=classes)


@dataclass(frozen=True)
class FaceParser:
    """A face parser ready for inference (eval mode, parameters frozen); ``fingerprint`` and ``device`` as
    for classifiers."""

    network: nn.Module
    card: ModelCard
    fingerprint: str

    @property
    def device(self) -> torch.device:
        return module_device(self.network)


def load_face_parser(
    card_path: str | Path,
    device: str | torch.device = "cpu",
    card_bytes: int = CARD_BYTES,
    weights_bytes: int = WEIGHTS_BYTES,
) -> FaceParser:
    """The card's face parser; the card and weights are read only as regular files under the two caps
    (``?parser=/dev/zero`` is refused at once)."""
    where = resolve_device(device)
    card = read_card(card_path, kind="face_parser", max_bytes=card_bytes)
    if len(card.classes) != len(LAPA_LABELS):
        raise ModelError(
            f"model card {card_path}: a face parser predicts the {len(LAPA_LABELS)} LaPa classes "
            f"({', '.join(LAPA_LABELS)}), but the card lists {len(card.classes)}"
        )
    network = build_face_parser(card.architecture.removeprefix(PARSER_ARCHITECTURE_PREFIX), len(card.classes))
    network, fingerprint = load_weights(network, card, card_path, head_key=_HEAD_KEY, max_bytes=weights_bytes)
    return FaceParser(network=network.to(where), card=card, fingerprint=fingerprint)


def save_face_parser(network: nn.Module, card: ModelCard, folder: str | Path, name: str) -> Path:
    if card.kind != "face_parser":
        raise ModelError(f"save_face_parser needs a face_parser card, got a {card.kind} card")
    return save_checkpoint(network, card, folder, name)


def predict_label_maps(parser: FaceParser, images: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """RGB uint8 images N×H×W×3 -> LaPa label maps N×H×W uint8 at the images' own size."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(
            f"expected RGB uint8 images N×H×W×3, got {getattr(images, 'dtype', type(images))} "
            f"{getattr(images, 'shape', '')}"
        )
    height, width = images.shape[1:3]
    size = parser.card.input_size
    label_maps = []
    device = parser.device
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            pixels = torch.tensor(images[start : start + batch_size]).to(device).permute(0, 3, 1, 2).float()
            if (height, width) != (size, size):
                pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            logits = parser.network(normalise_pixels(pixels, parser.card))
            label_maps.append(logits.argmax(dim=1).to(torch.uint8).cpu().numpy())
    low_res = np.concatenate(label_maps) if label_maps else np.zeros((0, size, size), np.uint8)
    if (height, width) == (size, size):
        return low_res
    return np.stack([resize_label_map(label_map, (height, width)) for label_map in low_res])
