"""Fine-tune a classifier per fold with the paper's recipe, and report Table 2.

Paper (released ``train.py``): SGD, lr 0.001 (10× on the new head), momentum 0.9, no weight
decay, cosine annealing with warm restarts (T_0 = 25 epochs), 35 epochs, batch 32, random
horizontal flips, per-fold mean subtraction, and the epoch with the best validation accuracy
kept. Every knob is a field of ``TrainConfig``; its defaults are those numbers.

With ``vggface2`` (``train --vggface2 resnet50_ft_weight.pkl``) the rest of the paper's recipe
applies too: the VGGFace2 Caffe ResNet-50 with a new head, fed BGR pixels 0..255 minus the BGR
mean of the fold's aligned training faces and no std (their ``datasets/nih_faces.py``), the
stem's batch norm left out of the optimiser, and a last batch of one face doubled, not dropped.
Without it a network of ``architecture`` starts from random weights (or ``init``) and is fed RGB
0..1 normalised by the training pixels' mean and std.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from tqdm import tqdm

from core.dataset import Dataset, DatasetError, names_in
from core.devices import module_device, resolve_device
from core.errors import UserFacingError
from core.pipeline import aligned_dataset_photos
from models.checkpoint import ModelCard, preprocess, save_checkpoint
from models.resnet import ARCHITECTURES, CAFFE_RESNET50, build_resnet
from models.vggface2 import vggface2_card, vggface2_state_dict


class TrainingConfigError(UserFacingError, ValueError):
    """A training option (``TrainConfig``, ``ParserConfig``) no trainer knows (also a ValueError: a bad value)."""


OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine-restarts", "one-cycle")
PRECISIONS = ("float32", "bfloat16", "auto")


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of the fine-tuning; the defaults are the paper's. ``python -m core train`` has a flag per field,
    with the field's ``metadata`` help (and ``choices``, where the values are a closed set)."""

    architecture: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "classifier network (default: resnet50, or resnet50-caffe with --vggface2; resnet50-caffe "
            "is the VGGFace2 ResNet-50 the paper fine-tunes)",
            "choices": ARCHITECTURES,
        },
    )
    input_size: int = dataclasses.field(default=224, metadata={"help": "side of the aligned face, in pixels"})
    epochs: int = dataclasses.field(default=35, metadata={"help": "training epochs"})
    batch_size: int = dataclasses.field(default=32, metadata={"help": "faces per training step"})
    learning_rate: float = dataclasses.field(default=0.001, metadata={"help": "learning rate of the pretrained layers"})
    head_lr_factor: float = dataclasses.field(
        default=10.0, metadata={"help": "the new head learns this many times faster than the pretrained layers"}
    )
    momentum: float = dataclasses.field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = dataclasses.field(default=0.0, metadata={"help": "weight decay"})
    restart_epochs: int = dataclasses.field(default=25, metadata={"help": "cosine warm-restart period T_0"})
    flip: bool = dataclasses.field(default=True, metadata={"help": "random horizontal flips of the training faces"})
    seed: int = dataclasses.field(default=42, metadata={"help": "seed of the initialisation, shuffling and flips"})
    init: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "state dict to start from (.safetensors/.pt, torchvision keys; the head is replaced)",
            "metavar": "PATH",
        },
    )
    vggface2: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "the paper's recipe: start from VGGFace2's resnet50_ft_weight.pkl (resnet50-caffe, new head), "
            "feed BGR 0..255 minus the fold's BGR training mean with no std, keep the stem's batch norm out "
            "of the optimiser, as the authors' train.py does",
            "metavar": "PATH",
        },
    )
    optimizer: str = dataclasses.field(
        default="sgd", metadata={"help": "sgd (the paper) or adamw", "choices": OPTIMIZERS}
    )
    schedule: str = dataclasses.field(
        default="cosine-restarts",
        metadata={
            "help": "cosine-restarts (the paper, stepped per epoch) or one-cycle (stepped per batch)",
            "choices": SCHEDULES,
        },
    )
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
        if self.optimizer not in OPTIMIZERS:
            raise TrainingConfigError(f"optimizer must be {' or '.join(map(repr, OPTIMIZERS))}, not {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise TrainingConfigError(f"schedule must be {' or '.join(map(repr, SCHEDULES))}, not {self.schedule!r}")
        if self.vggface2 and self.init:
            raise TrainingConfigError("start from --init or from --vggface2, not both")
        if self.vggface2 and self.architecture not in (None, CAFFE_RESNET50):
            raise TrainingConfigError(
                f"--vggface2 weights are the Caffe ResNet-50 ({CAFFE_RESNET50}), not {self.architecture!r}"
            )

    @property
    def network(self) -> str:
        """The architecture trained: the one given, else resnet50-caffe with ``vggface2``, else resnet50."""
        return self.architecture or (CAFFE_RESNET50 if self.vggface2 else "resnet50")


@dataclass(frozen=True)
class FoldResult:
    fold: str
    card_path: Path
    best_epoch: int
    val_accuracy: float
    test_accuracy: float | None
    report: pl.DataFrame  # per-class precision / recall / F1 / support on the validation split
    seconds: float


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise TrainingConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")


def in_memory_format(network: torch.nn.Module, memory_format: torch.memory_format) -> torch.nn.Module:
    """``network.to(memory_format=...)``, which torch accepts but its typed overloads of ``Module.to`` omit."""
    return network.to(memory_format=memory_format)  # type: ignore[call-overload]


def training_autocast(precision: str, device: torch.device | str = "cpu") -> torch.autocast:
    """bfloat16 autocast on devices with native bf16 (on a CPU, with channels-last, 2.2× faster ResNet-18
    training here; on a GPU, ``torch.cuda.is_bf16_supported()``: Ampere and later); weights and the saved
    model stay float32, so attribution never sees bfloat16. ``bfloat16`` on a GPU without it is refused."""
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        if precision == "bfloat16" and not native:
            raise TrainingConfigError(
                f"precision bfloat16: the GPU {device} has no native bfloat16; use float32 or auto"
            )
    else:
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    enabled = precision == "bfloat16" or (precision == "auto" and native)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def aligned_faces(
    dataset: Dataset,
    names: list[str],
    size: int,
    progress: Callable[[int, int], None] | None = None,
    skipped: dict[str, UserFacingError] | None = None,
) -> np.ndarray:
    """N×size×size×3 uint8 faces aligned from the dataset's landmarks (needed for training). With
    ``skipped``, photos that cannot be read go there and get no row; without it, the first is raised."""
    faces = np.empty((len(names), size, size, 3), dtype=np.uint8)
    count = 0
    for _, aligned in aligned_dataset_photos(dataset, names, size, skipped=skipped):
        faces[count] = aligned.image
        count += 1
        if progress is not None:
            progress(count + len(skipped or ()), len(names))
    return faces[:count]


def training_faces(
    dataset: Dataset, size: int, progress: Callable[[int, int], None] | None = None
) -> tuple[Dataset, np.ndarray]:
    """The aligned faces of every photo of the dataset that can be read, in its table's order, and the
    dataset less the photos that cannot (missing from a partial download, say): one warning names
    them, as ``extract`` does, and no fold trains or validates on them."""
    names = dataset.table["image_name"].to_list()
    skipped: dict[str, UserFacingError] = {}
    faces = aligned_faces(dataset, names, size, progress, skipped)
    if not skipped:
        return dataset, faces
    if len(skipped) == len(names):
        raise DatasetError(f"no photo could be used: {next(iter(skipped.values()))}")
    shown = "; ".join(f"{name} ({error})" for name, error in list(skipped.items())[:5])
    warnings.warn(
        f"{len(skipped)} photo(s) left out of training: {shown}" + (" …" if len(skipped) > 5 else ""), stacklevel=2
    )
    usable = dataset.table.filter(~pl.col("image_name").is_in(list(skipped)))
    return dataclasses.replace(dataset, table=usable), faces


def classification_report(labels: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...]) -> pl.DataFrame:
    """Per-class precision, recall, F1 and support (a class never predicted has precision 0)."""
    k = len(classes)
    confusion = np.bincount(labels * k + predicted, minlength=k * k).reshape(k, k)
    true_positive = np.diag(confusion).astype(float)
    predicted_count = confusion.sum(axis=0)
    support = confusion.sum(axis=1)
    precision = np.divide(true_positive, predicted_count, out=np.zeros(k), where=predicted_count > 0)
    recall = np.divide(true_positive, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=precision + recall > 0)
    return pl.DataFrame(
        {
            "class": list(classes),
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": support.astype(np.int64),
        }
    )


def _data_hash(names: list[str], labels: list[str]) -> str:
    return hashlib.sha256(json.dumps(sorted(zip(names, labels))).encode()).hexdigest()[:16]


def _predict(network: torch.nn.Module, batch: torch.Tensor, batch_size: int) -> np.ndarray:
    network.eval()
    device = module_device(network)
    with torch.no_grad():
        return (
            np.concatenate(
                [
                    network(batch[i : i + batch_size].to(device)).argmax(1).cpu().numpy()
                    for i in range(0, len(batch), batch_size)
                ]
            )
            if len(batch)
            else np.zeros(0, int)
        )


def train_fold(
    dataset: Dataset,
    fold: str,
    config: TrainConfig,
    out_dir: Path,
    faces: Callable[[list[str]], np.ndarray],
    log=print,
    device: str | torch.device = "cpu",
) -> FoldResult:
    """Train on the fold's ``train`` split, keep the best ``val`` epoch, write its checkpoint and card.

    On ``device`` (``core.devices.resolve_device``'s names): the network, its optimiser and each batch live
    there; the faces, the shuffling and the flips stay on the CPU (its generator), so every device sees the
    same batches in the same order."""
    where = resolve_device(device)
    started = time.perf_counter()
    classes = dataset.classes
    splits = {s: names_in(dataset, fold, s) for s in ("train", "val", "test")}
    if not splits["train"] or not splits["val"]:
        raise DatasetError(f"{fold} needs images in both its train and val splits")
    label_of = dataset.labels
    targets = {s: torch.tensor([classes.index(label_of[n]) for n in names]) for s, names in splits.items()}
    pixels = {s: faces(names) for s, names in splits.items()}
    card = _fold_card(
        fold, config, classes, pixels["train"], _data_hash(splits["train"], [label_of[n] for n in splits["train"]])
    )
    inputs = {s: preprocess(p, card) if len(p) else torch.zeros(0) for s, p in pixels.items()}
    inputs = {s: x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x for s, x in inputs.items()}
    network, best_epoch, val_accuracy = _train(
        initial_network(config, len(classes)).to(where),
        inputs,
        targets,
        config,
        lambda epoch, loss, accuracy: log(f"{fold} epoch {epoch:2d}: loss {loss:.3f}, val accuracy {accuracy:.3f}"),
    )
    val_predicted = _predict(network, inputs["val"], 64)
    test_accuracy = None
    if len(inputs["test"]):
        test_accuracy = float((_predict(network, inputs["test"], 64) == targets["test"].numpy()).mean())
    card_path = save_checkpoint(network, card, out_dir, f"classifier-{fold}")
    return FoldResult(
        fold=fold,
        card_path=card_path,
        best_epoch=best_epoch,
        val_accuracy=val_accuracy,
        test_accuracy=test_accuracy,
        report=classification_report(targets["val"].numpy(), val_predicted, classes),
        seconds=time.perf_counter() - started,
    )


def _fold_card(
    fold: str, config: TrainConfig, classes: tuple[str, ...], train_pixels: np.ndarray, data_hash: str
) -> ModelCard:
    """The card of a fold's classifier: its input normalised by the mean and std of its training pixels,
    or, with ``vggface2``, BGR 0..255 minus their BGR mean (their ``channel_mean``: borders included)."""
    if config.vggface2:
        mean_bgr = train_pixels.reshape(-1, 3).astype(np.float64).mean(axis=0)[::-1]
        card = vggface2_card(
            classes,
            f"classifier-{fold}.safetensors",
            mean_bgr=tuple(float(v) for v in mean_bgr),
            fold=fold,
            training_data_hash=data_hash,
            notes=json.dumps(dataclasses.asdict(config)),
        )
        return dataclasses.replace(card, input_size=config.input_size)
    values = train_pixels.reshape(-1, 3).astype(np.float64) / 255.0
    mean, std = tuple(values.mean(axis=0)), tuple(values.std(axis=0) + 1e-6)
    return ModelCard(
        kind="classifier",
        architecture=config.network,
        classes=classes,
        input_size=config.input_size,
        channel_order="RGB",
        input_scale=1.0,
        mean=mean,
        std=std,
        weights=f"classifier-{fold}.safetensors",
        fold=fold,
        training_data_hash=data_hash,
        notes=json.dumps(dataclasses.asdict(config)),
    )


def initial_network(config: TrainConfig, n_classes: int) -> torch.nn.Module:
    """A fresh network of the config's architecture (seeded), started from ``config.init`` but for its
    head, or from the VGGFace2 weights with a new head (PyTorch's default init, seeded) as the paper."""
    torch.manual_seed(config.seed)
    network = build_resnet(config.network, n_classes)
    if config.vggface2:
        network.load_state_dict(vggface2_state_dict(config.vggface2, num_classes=n_classes), strict=True)
    elif config.init:
        from models.checkpoint import load_state_dict_file

        state = {k: v for k, v in load_state_dict_file(config.init).items() if not k.startswith("fc.")}
        network.load_state_dict(state, strict=False)
    return network.to(memory_format=torch.channels_last)


def _parameters(network: torch.nn.Module, *prefixes: str) -> list[torch.nn.Parameter]:
    return [p for n, p in network.named_parameters() if n.startswith(prefixes)]


def training_optimiser(network: torch.nn.Module, config: TrainConfig, steps_per_epoch: int):
    """The optimiser (the new head at ``head_lr_factor`` × the rate) and its learning-rate schedule.

    With ``vggface2`` its groups are train.py's: conv1, layer1 … layer4, then the head; the stem's
    batch norm (bn1) is in none, so its scale and shift keep their VGGFace2 values (its running
    statistics still follow the data in training mode, as theirs did).
    """
    head = _parameters(network, "fc.")
    if config.vggface2:
        body = [{"params": _parameters(network, f"{name}.")} for name in ("conv1", *(f"layer{i}" for i in range(1, 5)))]
    else:
        body = [{"params": [p for n, p in network.named_parameters() if not n.startswith("fc.")]}]
    groups: list[dict[str, Any]] = [*body, {"params": head, "lr": config.learning_rate * config.head_lr_factor}]
    optimiser: torch.optim.Optimizer
    if config.optimizer == "sgd":
        optimiser = torch.optim.SGD(
            groups, lr=config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay
        )
    else:
        optimiser = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler: torch.optim.lr_scheduler.LRScheduler
    if config.schedule == "one-cycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimiser, max_lr=[g["lr"] for g in optimiser.param_groups], total_steps=config.epochs * steps_per_epoch
        )
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimiser, T_0=config.restart_epochs)
    return optimiser, scheduler


def _train(
    network: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    config: TrainConfig,
    log: Callable[[int, float, float], None],
) -> tuple[torch.nn.Module, int, float]:
    """Every epoch of the config; the network of the best validation epoch (eval mode), that epoch, its accuracy."""
    n_train = len(inputs["train"])
    device = module_device(network)
    optimiser, scheduler = training_optimiser(network, config, math.ceil(n_train / config.batch_size))
    generator = torch.Generator().manual_seed(config.seed)
    best: tuple[float, int, dict | None] = (-1.0, 0, None)
    for epoch in range(1, config.epochs + 1):
        network.train()
        order = torch.randperm(n_train, generator=generator)
        losses = []
        batches = range(0, n_train, config.batch_size)
        for start in tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", leave=False, file=sys.stderr):
            chosen = order[start : start + config.batch_size]
            if len(chosen) < 2 and not config.vggface2:  # batch norm cannot train on one image
                continue
            batch = inputs["train"][chosen]
            if config.flip:
                flip = torch.rand(len(batch), generator=generator) < 0.5
                batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
            if len(chosen) < 2:  # train.py doubles a last batch of one face (its flip included)
                chosen, batch = chosen.repeat(2), batch.repeat(2, 1, 1, 1)
            with training_autocast(config.precision, device):
                loss = F.cross_entropy(network(batch.to(device)), targets["train"][chosen].to(device))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if config.schedule == "one-cycle":
                scheduler.step()
            losses.append(loss.item())
        if config.schedule == "cosine-restarts":
            scheduler.step()
        val_accuracy = float((_predict(network, inputs["val"], 64) == targets["val"].numpy()).mean())
        log(epoch, float(np.mean(losses)), val_accuracy)
        if val_accuracy > best[0]:
            best = (val_accuracy, epoch, {k: v.detach().clone() for k, v in network.state_dict().items()})
    if best[2] is None:  # no epoch ran
        raise TrainingConfigError(f"epochs must be at least 1, not {config.epochs}")
    network.load_state_dict(best[2])
    return in_memory_format(network, torch.contiguous_format).eval(), best[1], best[0]


def table2(results: list[FoldResult]) -> pl.DataFrame:
    """The paper's Table 2: per class N, precision, recall, F1 as mean (std) over folds; Overall is the
    macro average per fold (then mean (std) over folds) with the validation accuracy."""
    long = pl.concat([r.report.with_columns(pl.lit(r.fold).alias("fold")) for r in results])
    per_class = long.group_by("class", maintain_order=True).agg(
        pl.col("support").sum().alias("N"),
        *[pl.col(m).mean().alias(f"{m}_mean") for m in ("precision", "recall", "f1")],
        *[pl.col(m).std(ddof=0).alias(f"{m}_std") for m in ("precision", "recall", "f1")],
    )
    macro = long.group_by("fold", maintain_order=True).agg(
        pl.col("support").sum(), *[pl.col(m).mean() for m in ("precision", "recall", "f1")]
    )
    accuracy = [r.val_accuracy for r in results]
    overall = pl.DataFrame(
        {
            "class": ["Overall"],
            "N": [int(macro["support"].sum())],
            **{f"{m}_mean": [macro[m].mean()] for m in ("precision", "recall", "f1")},
            **{f"{m}_std": [macro[m].std(ddof=0)] for m in ("precision", "recall", "f1")},
            "accuracy_mean": [float(np.mean(accuracy))],
            "accuracy_std": [float(np.std(accuracy))],
        }
    )
    return pl.concat([per_class, overall], how="diagonal")


def table2_from_scores(scores: pl.DataFrame) -> pl.DataFrame:
    """Table 2 from a ``val`` score table (``extract --split val``): each fold model's prediction on each of
    its own val images, for models imported rather than trained here. One method's and region's rows
    carry every prediction; the accuracy is the share of the fold's val images predicted right."""
    if scores.is_empty():
        raise DatasetError("the score table is empty: no predictions to make Table 2 from")
    rows = scores.filter((pl.col("method") == scores["method"][0]) & (pl.col("region") == scores["region"][0]))
    classes = tuple(sorted(set(rows["label"].to_list()) | set(rows["predicted"].to_list())))
    results = []
    for (model,), fold_rows in rows.group_by("model", maintain_order=True):
        labels = np.array([classes.index(c) for c in fold_rows["label"]])
        predicted = np.array([classes.index(c) for c in fold_rows["predicted"]])
        results.append(
            FoldResult(
                fold=fold_rows["fold"][0] or str(model),
                card_path=Path(str(model)),  # the model's name in the table; no epoch or timing is known here
                best_epoch=0,
                val_accuracy=float((labels == predicted).mean()),
                test_accuracy=None,
                report=classification_report(labels, predicted, classes),
                seconds=0.0,
            )
        )
    return table2(results)
