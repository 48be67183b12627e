"""Model cards, tensor-only checkpoint loading, and the classifier the pipeline explains.

A model is a weights file beside a small JSON card saying how to feed the network (channel
order, pixel scale, mean/std, size) and what its outputs mean (class names). Weights load as
tensors only (safetensors, or torch files through ``weights_only=True``), so opening a
checkpoint someone sent you never runs code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
import pickle
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from core.devices import module_device, resolve_device
from core.domain import DomainGuard
from core.errors import ModelError
from models.domain_guard import feature_dim, read_domain_guard
from models.locks import model_lock
from models.resnet import ARCHITECTURES, CAFFE_RESNET50, build_resnet

KINDS = ("classifier", "face_parser")
CHANNEL_ORDERS = ("RGB", "BGR")
CLASSIFIER_ARCHITECTURES = ARCHITECTURES
PARSER_ARCHITECTURE_PREFIX = "unet-"
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
ARCHITECTURE_METADATA = "architecture"  # safetensors header entry save_checkpoint writes
# The largest card (JSON) and weights file read (a hosted deployment's [limits] card_bytes and weights_bytes):
# a path typed into a URL is read only when it is a regular file under the cap, never a device or a pipe.
CARD_BYTES = 1 << 20
WEIGHTS_BYTES = 4 << 30
# Card fields that change what a network's outputs mean; with the weights they key cached results.
_OUTPUT_FIELDS = ("kind", "architecture", "classes", "input_size", "channel_order", "input_scale", "mean", "std")


@dataclass(frozen=True)
class ModelCard:
    """How to feed a network and what its outputs mean; stored as JSON beside the weights.

    ``mean`` and ``std`` are in the card's channel order and pixel scale (``input_scale`` 255
    for networks fed 0..255 pixels, as VGGFace2; 1 for 0..1). ``weights`` is a file name
    relative to the card's folder.
    """

    kind: str
    architecture: str
    classes: tuple[str, ...]
    input_size: int
    channel_order: str
    input_scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str
    fold: str | None = None
    training_data_hash: str | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        for name, value in _canonical_fields(self).items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_json(cls, source: str | Path, max_bytes: int = CARD_BYTES) -> ModelCard:
        """Read a card from a file path (a regular file of at most ``max_bytes``), or from JSON text (a
        string starting with ``{``)."""
        is_text = isinstance(source, str) and source.lstrip().startswith("{")
        where = "model card (JSON text)" if is_text else f"model card {source}"
        text: str | bytes = str(source) if is_text else read_regular_file(source, max_bytes, "model card")
        try:
            fields = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            if isinstance(error, UnicodeDecodeError):
                raise ModelError(f"{where}: not UTF-8 text, so not a JSON card") from None
            raise ModelError(f"{where}: not valid JSON ({error.msg}, line {error.lineno})") from None
        if not isinstance(fields, dict):
            raise ModelError(f"{where}: expected a JSON object holding the card's fields")
        declared = [field.name for field in dataclasses.fields(cls)]
        required = [field.name for field in dataclasses.fields(cls) if field.default is dataclasses.MISSING]
        missing = [name for name in required if name not in fields]
        unknown = sorted(set(fields) - set(declared))
        if missing:
            raise ModelError(f"{where}: missing field(s) {', '.join(missing)}")
        if unknown:
            raise ModelError(f"{where}: unknown field(s) {', '.join(unknown)}; a card has {', '.join(declared)}")
        try:
            return cls(**fields)
        except ModelError as error:
            raise ModelError(f"{where}: {error}") from None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _three_numbers(name: str, value: object, positive: bool) -> tuple[float, float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(_is_number(v) for v in value):
        raise ModelError(
            f"field {name!r} must be 3 numbers (one per channel, in the card's channel order), got {value!r}"
        )
    if positive and not all(v > 0 for v in value):
        raise ModelError(f"field {name!r} must be positive, got {value!r}")
    first, second, third = (float(v) for v in value)
    return first, second, third


def _optional_text(name: str, value: object) -> None:
    if value is not None and not isinstance(value, str):
        raise ModelError(f"field {name!r} must be a string or null, got {value!r}")


def _canonical_fields(card: ModelCard) -> dict[str, object]:
    """Check every field; return those with a canonical form (tuples, Python ints and floats, e.g. from numpy)."""
    if card.kind not in KINDS:
        raise ModelError(f"field 'kind' must be one of {', '.join(KINDS)}, got {card.kind!r}")
    if card.kind == "classifier" and card.architecture not in CLASSIFIER_ARCHITECTURES:
        raise ModelError(
            f"field 'architecture': unknown classifier architecture {card.architecture!r}; choose one of "
            f"{', '.join(CLASSIFIER_ARCHITECTURES)} ({CAFFE_RESNET50} is the VGGFace2 ResNet-50 the paper fine-tunes)"
        )
    if card.kind == "face_parser" and not (
        isinstance(card.architecture, str) and card.architecture.startswith(PARSER_ARCHITECTURE_PREFIX)
    ):
        raise ModelError(
            f"field 'architecture': a face parser is '{PARSER_ARCHITECTURE_PREFIX}<encoder>', "
            f"e.g. 'unet-resnet18', got {card.architecture!r}"
        )
    classes = card.classes
    if not isinstance(classes, (list, tuple)) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise ModelError(f"field 'classes' must be a non-empty list of class names, got {classes!r}")
    if len(set(classes)) != len(classes):
        repeated = sorted(c for c in set(classes) if classes.count(c) > 1)
        raise ModelError(f"field 'classes' lists a class twice: {', '.join(repeated)}")
    if not isinstance(card.input_size, numbers.Integral) or isinstance(card.input_size, bool) or card.input_size <= 0:
        raise ModelError(f"field 'input_size' must be a positive integer (pixels per side), got {card.input_size!r}")
    if card.channel_order not in CHANNEL_ORDERS:
        raise ModelError(f"field 'channel_order' must be 'RGB' or 'BGR', got {card.channel_order!r}")
    if not _is_number(card.input_scale) or card.input_scale <= 0:
        raise ModelError(f"field 'input_scale' must be a positive number (255 or 1), got {card.input_scale!r}")
    if not isinstance(card.weights, str) or not card.weights:
        raise ModelError(f"field 'weights' must be the weights file name, got {card.weights!r}")
    _optional_text("fold", card.fold)
    _optional_text("training_data_hash", card.training_data_hash)
    if not isinstance(card.notes, str):
        raise ModelError(f"field 'notes' must be a string, got {card.notes!r}")
    return {
        "classes": tuple(classes),
        "input_size": int(card.input_size),
        "input_scale": float(card.input_scale),
        "mean": _three_numbers("mean", card.mean, positive=False),
        "std": _three_numbers("std", card.std, positive=True),
    }


def _size(limit: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if limit >= scale and limit % scale == 0:
            return f"{limit // scale} {unit}"
    return f"{limit} bytes"


def _refused(path: str | Path, limit: int, what: str) -> ModelError:
    # One message whatever the reason (missing, unreadable, a folder, a device, a pipe, too large): a typed
    # path learns nothing more about the server's files than that this one cannot be used.
    return ModelError(f"{what} {path} cannot be read: it must be an existing, readable file of at most {_size(limit)}")


def check_regular_file(path: str | Path, limit: int, what: str) -> Path:
    """``path`` when it is a regular file (symbolic links followed) of at most ``limit`` bytes, else a
    ``ModelError`` that says only that; for loaders that open the file by name themselves."""
    try:
        status = os.stat(path)
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        raise _refused(path, limit, what) from None
    if not stat.S_ISREG(status.st_mode) or status.st_size > limit:
        raise _refused(path, limit, what)
    return Path(path)


def read_regular_file(path: str | Path, limit: int, what: str) -> bytes:
    """The bytes of ``path`` when it is a regular file of at most ``limit`` bytes, else a ``ModelError``.

    Checked on the opened file (``fstat``), opened without blocking, so neither ``/dev/zero`` nor a pipe
    nor a file swapped in between the check and the read is ever read from; at most ``limit + 1`` bytes
    are read, so a file growing meanwhile is refused too."""
    check_regular_file(path, limit, what)  # a cheap refusal before anything is opened
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError):
        raise _refused(path, limit, what) from None
    with os.fdopen(handle, "rb") as file:
        status = os.fstat(file.fileno())
        if not stat.S_ISREG(status.st_mode) or status.st_size > limit:
            raise _refused(path, limit, what)
        try:
            data = file.read(limit + 1)
        except OSError:
            raise _refused(path, limit, what) from None
    if len(data) > limit:
        raise _refused(path, limit, what)
    return data


def read_card(card_path: str | Path, kind: str, max_bytes: int = CARD_BYTES) -> ModelCard:
    card = ModelCard.from_json(Path(card_path), max_bytes=max_bytes)
    if card.kind != kind:
        raise ModelError(f"model card {card_path} describes a {card.kind}, but a {kind} is needed here")
    return card


def preprocess(images: np.ndarray, card: ModelCard) -> torch.Tensor:
    """Aligned RGB uint8 faces N×H×W×3 -> the network's input N×3×H×W float32.

    No resizing: alignment already produced the card's size, and a silent resize would
    move every pixel the attribution maps refer to.
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(
            f"expected RGB uint8 images N×H×W×3, got {getattr(images, 'dtype', type(images))} "
            f"{getattr(images, 'shape', '')}"
        )
    size = card.input_size
    if images.shape[1:3] != (size, size):
        raise ValueError(
            f"images are {images.shape[1]}×{images.shape[2]} but the model expects {size}×{size}; "
            f"align the faces at size={size}"
        )
    return normalise_pixels(torch.tensor(images).permute(0, 3, 1, 2).float(), card)


def normalise_pixels(pixels: torch.Tensor, card: ModelCard) -> torch.Tensor:
    """RGB float pixels in 0..255, N×3×H×W -> the card's channel order, scale and mean/std."""
    if card.channel_order == "BGR":
        pixels = pixels.flip(1)
    mean = torch.tensor(card.mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(card.std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return ((pixels * (card.input_scale / 255.0) - mean) / std).contiguous()


def save_checkpoint(network: nn.Module, card: ModelCard, folder: str | Path, name: str) -> Path:
    """Write ``<name>.safetensors`` and ``<name>.json`` (the card, pointed at those weights); return the card path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights_path = folder / f"{name}.safetensors"
    state_dict = {key: tensor.detach().cpu().contiguous() for key, tensor in network.state_dict().items()}
    # The network the weights were saved from: ResNet-50's two layouts have the same keys and shapes, so
    # only this record tells a card's wrong 'architecture' from the right one (see _check_weights_fit).
    safetensors.torch.save_file(state_dict, weights_path, metadata={ARCHITECTURE_METADATA: card.architecture})
    card_path = folder / f"{name}.json"
    card_path.write_text(dataclasses.replace(card, weights=weights_path.name).to_json() + "\n", encoding="utf-8")
    return card_path


def load_state_dict_file(path: str | Path, max_bytes: int = WEIGHTS_BYTES) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` or torch (``.pt/.pth/.bin``) file, a regular file of at most
    ``max_bytes``; pickled objects are refused unopened."""
    path = check_regular_file(path, max_bytes, "weights file (the card's 'weights' field)")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except (SafetensorError, OSError) as error:
            raise ModelError(f"cannot read {path} as safetensors ({error}); the file may be truncated") from None
    if suffix not in TORCH_SUFFIXES:
        raise ModelError(
            f"weights file {path} has an unknown type; use .safetensors or one of {', '.join(TORCH_SUFFIXES)}"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))
        if refused:
            raise ModelError(
                f"refused to load {path}: besides tensors it holds the Python object {refused.group(1)}, and "
                "unpickling it could run code. If the file is a whole model saved with torch.save(model) from a "
                "source you trust, re-save model.state_dict() (or safetensors) and point the card at that"
            ) from None
        raise ModelError(
            f"cannot read {path} as a tensors-only torch checkpoint: it is corrupt or was not "
            "written by torch.save; nothing in it was run"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ModelError(f"cannot read {path} as a torch checkpoint ({error})") from None
    if isinstance(loaded, dict):
        loaded = next((loaded[key] for key in ("state_dict", "model") if isinstance(loaded.get(key), dict)), loaded)
    if not isinstance(loaded, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise ModelError(
            f"{path} is not a state dict (layer names -> tensors), nor a dict holding one under 'state_dict' or 'model'"
        )
    return loaded


def model_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 of names, dtypes, shapes and bytes in key order: equal weights, equal fingerprint."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _loaded_fingerprint(network: nn.Module, card: ModelCard) -> str:
    """The weights plus the card fields that change what the outputs mean: editing the card's mean
    or class order must not reuse results cached under the old card."""
    output_fields = json.dumps({name: getattr(card, name) for name in _OUTPUT_FIELDS}, sort_keys=True)
    return hashlib.sha256(f"{model_fingerprint(network.state_dict())}\0{output_fields}".encode()).hexdigest()


def _examples(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", …" if len(keys) > 3 else "")


def check_finite(state_dict: Mapping[str, torch.Tensor], where: str | Path) -> None:
    """Refuse weights holding NaN or infinity: the network would answer NaN for every photo, and the
    explanation would look like a result (every score 0) instead of an error."""
    bad = [key for key, tensor in state_dict.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise ModelError(
            f"{where}: {len(bad)} tensor(s) hold NaN or infinite values ({_examples(bad)}); the weights "
            "are damaged or their training diverged"
        )


def _check_weights_fit(
    network: nn.Module, state_dict: Mapping[str, torch.Tensor], card: ModelCard, weights_path: Path, head_key: str
) -> None:
    """Say in the user's terms why weights do not fit the network their card describes."""
    expected = network.state_dict()
    head = state_dict.get(head_key)
    if (
        head is not None
        and head_key in expected
        and head.shape[1:] == expected[head_key].shape[1:]
        and head.shape[0] != len(card.classes)
    ):
        raise ModelError(
            f"{weights_path}: card lists {len(card.classes)} classes but {head_key} has "
            f"{head.shape[0]} rows; fix the card's 'classes' or its 'weights' file"
        )
    # BatchNorm fills a missing num_batches_tracked itself (older checkpoints lack it).
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    problems = [
        f"{len(keys)} {what} ({_examples(keys)})"
        for what, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (file vs card)", mismatched),
        )
        if keys
    ]
    if problems:
        raise ModelError(
            f"{weights_path} does not fit the card's architecture {card.architecture!r}: "
            f"{'; '.join(problems)}. Check the card's 'architecture' and 'weights'"
        )
    recorded = recorded_architecture(weights_path)
    if recorded is not None and recorded != card.architecture:
        raise ModelError(
            f"{weights_path} was saved from a {recorded!r} network but the card says {card.architecture!r}: "
            "the keys and shapes fit, the computation would not. Set the card's 'architecture' to "
            f"{recorded!r}"
        )


def recorded_architecture(weights_path: Path) -> str | None:
    """The architecture save_checkpoint recorded in a safetensors header; None for other files."""
    if weights_path.suffix.lower() != ".safetensors":
        return None
    try:
        with safetensors.safe_open(weights_path, framework="pt") as file:
            metadata = file.metadata() or {}
    except (SafetensorError, OSError):
        return None  # load_state_dict_file has read the same file already; nothing recorded to compare
    return metadata.get(ARCHITECTURE_METADATA)


def load_weights(
    network: nn.Module, card: ModelCard, card_path: str | Path, head_key: str, max_bytes: int = WEIGHTS_BYTES
) -> tuple[nn.Module, str]:
    """Load the card's weights strictly into ``network``, freeze it in eval mode; return it and its fingerprint.

    Parameters stop requiring grad: attribution needs gradients of the input only, and the
    backward pass is cheaper without weight gradients. The weights are read and fingerprinted on the CPU.
    """
    weights_path = Path(card_path).parent / card.weights
    state_dict = load_state_dict_file(weights_path, max_bytes)
    _check_weights_fit(network, state_dict, card, weights_path, head_key)
    check_finite(state_dict, weights_path)
    network.load_state_dict(state_dict, strict=True)
    network.eval().requires_grad_(False)
    return network, _loaded_fingerprint(network, card)


@dataclass(frozen=True)
class Classifier:
    """A classifier ready for inference and attribution (eval mode, parameters frozen).

    ``fingerprint`` covers the weights and the card fields that change the outputs. ``domain`` is the
    out-of-domain guard stored beside the card (``models.domain_guard``), when one was fitted. The network
    runs where its weights are (``device``): every step that feeds it moves its inputs there.
    """

    network: nn.Module
    card: ModelCard
    fingerprint: str
    domain: DomainGuard | None = None

    @property
    def device(self) -> torch.device:
        return module_device(self.network)


def load_classifier(
    card_path: str | Path,
    domain: bool = True,
    device: str | torch.device = "cpu",
    card_bytes: int = CARD_BYTES,
    weights_bytes: int = WEIGHTS_BYTES,
) -> Classifier:
    """The card's classifier, with its out-of-domain guard when the card has one (a guard that is not
    this model's is refused with a ``DomainGuardError``); ``domain=False`` leaves the guard unread
    (fitting a new one). Its network is moved to ``device`` (``core.devices.resolve_device``'s names).
    The card and the weights are read only as regular files of at most ``card_bytes`` and ``weights_bytes``."""
    where = resolve_device(device)
    card = read_card(card_path, kind="classifier", max_bytes=card_bytes)
    network: nn.Module = build_resnet(card.architecture, len(card.classes))
    network, fingerprint = load_weights(network, card, card_path, head_key="fc.weight", max_bytes=weights_bytes)
    network = network.to(where)
    guard = read_domain_guard(card_path, fingerprint, feature_dim(network)) if domain else None
    return Classifier(network=network, card=card, fingerprint=fingerprint, domain=guard)


def classify(classifier: Classifier, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities N×K (float32) and predicted class indices N for a preprocessed batch.

    Holds the model's lock: an attribution running in another thread may have merged its batch norms.
    The batch goes to the model's device; the answers come back to the CPU.
    """
    with model_lock(classifier.network), torch.no_grad():
        probabilities = torch.softmax(classifier.network(batch.to(classifier.device)), dim=1).cpu()
    return probabilities.numpy(), probabilities.argmax(dim=1).numpy()
