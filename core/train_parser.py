"""Train the SMP face parser on any dataset with stored label maps (``features/segmaps/``).

Faces and their maps are aligned exactly as the pipeline aligns them, so the parser learns the
frame it will see. Loss: cross-entropy plus Dice, so small parts (eyes, brows, lips) are not
drowned by skin and background; the cross-entropy is also weighted by 1/sqrt(class frequency).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import polars as pl
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from tqdm import tqdm

from core.dataset import Dataset, DatasetError
from core.devices import resolve_device
from core.parse import LAPA_LABELS
from core.pipeline import aligned_dataset_photos, stored_map_in_aligned_frame
from core.train import PRECISIONS, check_precision, in_memory_format, training_autocast
from models.checkpoint import ModelCard, normalise_pixels
from models.parser import build_face_parser, save_face_parser


@dataclass(frozen=True)
class ParserConfig:
    """Every knob of the face parser's training. ``python -m core train-parser`` has a flag per field, with the
    field's ``metadata`` help (and ``choices``, where the values are a closed set)."""

    encoder: str = dataclasses.field(
        default="resnet18", metadata={"help": "encoder of the U-Net (a segmentation_models_pytorch encoder name)"}
    )
    input_size: int = dataclasses.field(default=112, metadata={"help": "side of the aligned face, in pixels"})
    epochs: int = dataclasses.field(default=8, metadata={"help": "training epochs"})
    batch_size: int = dataclasses.field(default=32, metadata={"help": "faces per training step"})
    learning_rate: float = dataclasses.field(default=3e-3, metadata={"help": "learning rate"})
    weight_decay: float = dataclasses.field(default=1e-4, metadata={"help": "weight decay"})
    held_out_fraction: float = dataclasses.field(
        default=0.15, metadata={"help": "share of the images kept out of training to measure IoU"}
    )
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the initialisation, split and shuffling"})
    precision: str = dataclasses.field(
        default="float32",
        metadata={
            "help": "bfloat16 autocast: ~2× faster on CPUs with native bf16; auto: bfloat16 where the device "
            "(CPU or GPU) has it",
            "choices": PRECISIONS,
        },
    )

    def __post_init__(self):
        check_precision(self.precision)


@dataclass(frozen=True)
class ParserResult:
    card_path: Path
    iou: pl.DataFrame  # label, name, iou on the held-out faces
    seconds: float

    @property
    def mean_iou(self) -> float:
        return float(cast(float, self.iou["iou"].mean()))  # Series.mean is typed as any scalar


def aligned_faces_and_maps(dataset: Dataset, names: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Aligned faces and their stored label maps in the same frame (photos through ``read_photo``)."""
    faces = np.empty((len(names), size, size, 3), np.uint8)
    maps = np.empty((len(names), size, size), np.uint8)
    for i, (photo, aligned) in enumerate(aligned_dataset_photos(dataset, names, size, "parser training")):
        if photo.label_map is None:
            raise DatasetError(f"no stored label map for {names[i]} in features/segmaps/")
        faces[i] = aligned.image
        maps[i] = stored_map_in_aligned_frame(photo.label_map, photo.image.shape, aligned.matrix, size)
    return faces, maps


def intersection_over_union(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-class IoU over a whole set of maps (NaN for a class absent from both)."""
    k = len(LAPA_LABELS)
    confusion = np.bincount(truth.ravel().astype(np.int64) * k + predicted.ravel(), minlength=k * k).reshape(k, k)
    intersection = np.diag(confusion).astype(float)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    return np.divide(intersection, union, out=np.full(k, np.nan), where=union > 0)


def train_face_parser(
    dataset: Dataset,
    config: ParserConfig,
    out_dir: Path,
    name: str = "parser",
    log=print,
    device: str | torch.device = "cpu",
) -> ParserResult:
    """Train the U-Net on ``device`` (as ``core.train.train_fold``: batches moved there, the shuffling on the
    CPU), score it on the held-out faces, write it and its card."""
    where = resolve_device(device)
    started = time.perf_counter()
    names = dataset.table["image_name"].to_list()
    faces, maps = aligned_faces_and_maps(dataset, names, config.input_size)
    order = np.random.default_rng(config.seed).permutation(len(names))
    n_held = max(1, int(round(config.held_out_fraction * len(names))))
    held, train = order[:n_held], order[n_held:]
    card = _parser_card(config, name, faces[train])
    x = normalise_pixels(torch.from_numpy(faces).permute(0, 3, 1, 2).float(), card)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(maps.astype(np.int64))
    network = _trained_parser(config, x, y, train, _class_weights(maps[train]), log, where)
    with torch.no_grad():
        predicted = torch.cat(
            [network(x[held[i : i + 64]].to(where)).argmax(1).cpu() for i in range(0, len(held), 64)]
        ).numpy()
    iou = intersection_over_union(predicted.astype(np.int64), maps[held])
    card_path = save_face_parser(network, card, out_dir, name)
    table = pl.DataFrame({"label": list(range(len(LAPA_LABELS))), "name": list(LAPA_LABELS), "iou": iou})
    return ParserResult(card_path=card_path, iou=table, seconds=time.perf_counter() - started)


def _parser_card(config: ParserConfig, name: str, train_faces: np.ndarray) -> ModelCard:
    """The parser's card: input normalised by the mean and std of its training pixels."""
    pixels = train_faces.reshape(-1, 3).astype(np.float64) / 255.0
    return ModelCard(
        kind="face_parser",
        architecture=f"unet-{config.encoder}",
        classes=LAPA_LABELS,
        input_size=config.input_size,
        channel_order="RGB",
        input_scale=1.0,
        mean=tuple(pixels.mean(0)),
        std=tuple(pixels.std(0) + 1e-6),
        weights=f"{name}.safetensors",
        notes=json.dumps(dataclasses.asdict(config)),
    )


def _class_weights(train_maps: np.ndarray) -> torch.Tensor:
    """Eyes, brows and lips cover ~1% of the face each: weight classes by 1/sqrt(frequency)
    (normalised so the average pixel weighs 1), or the parser learns them last."""
    frequency = np.bincount(train_maps.ravel(), minlength=len(LAPA_LABELS)) / train_maps.size
    weights = 1.0 / np.sqrt(frequency + 1e-4)
    return torch.tensor(weights / (frequency * weights).sum(), dtype=torch.float32)


def _trained_parser(
    config: ParserConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    train: np.ndarray,
    class_weights: torch.Tensor,
    log,
    device: torch.device | str = "cpu",
) -> torch.nn.Module:
    """The U-Net trained on the ``train`` rows of x (normalised faces) and y (label maps), in eval mode."""
    torch.manual_seed(config.seed)
    network = in_memory_format(build_face_parser(config.encoder, len(LAPA_LABELS)), torch.channels_last).to(device)
    class_weights = class_weights.to(device)
    dice = smp.losses.DiceLoss("multiclass")
    optimiser = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = config.epochs * math.ceil(len(train) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.learning_rate, total_steps=steps)
    generator = torch.Generator().manual_seed(config.seed)
    train_index = torch.from_numpy(train)
    for epoch in range(1, config.epochs + 1):
        network.train()
        shuffled = train_index[torch.randperm(len(train_index), generator=generator)]
        losses = []
        for start in tqdm(
            range(0, len(shuffled), config.batch_size),
            desc=f"parser epoch {epoch}/{config.epochs}",
            leave=False,
            file=sys.stderr,
        ):
            batch = shuffled[start : start + config.batch_size]
            if len(batch) < 2:
                continue
            labels = y[batch].to(device)
            with training_autocast(config.precision, device):
                logits = network(x[batch].to(device))
            logits = logits.float()
            loss = F.cross_entropy(logits, labels, weight=class_weights) + dice(logits, labels)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            scheduler.step()
            losses.append(loss.item())
        log(f"parser epoch {epoch:2d}: loss {np.mean(losses):.3f}")
    return in_memory_format(network, torch.contiguous_format).eval().requires_grad_(False)
