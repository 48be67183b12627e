"""Import the VGGFace2 ResNet-50 weights (``resnet50_ft_weight.pkl``) that the paper fine-tunes.

The file is a (Python 2) pickle of a dict from layer names to numpy arrays, converted from
the authors' Caffe model. Its names and array layouts are already torchvision's (conv
weights out×in×kh×kw, fc 8631×2048, BatchNorm weight/bias/running_mean/running_var); only
BatchNorm's ``num_batches_tracked`` is absent. The network is Caffe's ResNet-50 layout
(``CAFFE_RESNET50``), which differs from torchvision's in strides, not in keys.

The file is read by an unpickler that can rebuild numpy arrays and nothing else, so a
tampered file is refused before any of its code runs.
"""

from __future__ import annotations

import codecs
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from core.errors import ModelError
from models.checkpoint import ModelCard, check_finite
from models.resnet import CAFFE_RESNET50, build_resnet

VGGFACE2_CLASSES = 8631
VGGFACE2_MEAN_BGR = (91.4953, 103.8827, 131.0912)  # from the authors' resnet50_ft.prototxt
VGGFACE2_INPUT_SIZE = 224

_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's array rebuilder, wherever this numpy version keeps it
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # name in pickles from numpy < 2
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how Python 3 protocol-2 pickles store the arrays' bytes
}


class _RefusedGlobal(pickle.UnpicklingError):
    """The pickle asks for a Python object that is not part of a numpy array."""


class _NumpyArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with path.open("rb") as file:
            arrays = _NumpyArraysOnly(file, encoding="latin1").load()
    except OSError as error:
        raise ModelError(f"cannot read VGGFace2 weights {path} ({error.strerror}); check the path") from None
    except _RefusedGlobal as error:
        raise ModelError(
            f"refused to load {path}: it asks to unpickle {error}, but a VGGFace2 weight file holds only "
            "numpy arrays. The file is damaged or was tampered with; download resnet50_ft_weight.pkl again"
        ) from None
    except MemoryError:  # a length field larger than memory: the allocation fails before any byte is read
        raise ModelError(
            f"cannot read {path} as VGGFace2 weights: it declares an object larger than memory; "
            "the file is damaged or was tampered with"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise ModelError(f"cannot read {path} as VGGFace2 weights ({error}); the file may be truncated") from None
    if not isinstance(arrays, dict) or not all(
        isinstance(key, str) and isinstance(value, np.ndarray) and value.dtype.kind in "fiu"
        for key, value in arrays.items()
    ):
        raise ModelError(f"{path} is not a VGGFace2 weight file: expected a dict of layer names to numeric arrays")
    return arrays


def _expected_shapes() -> dict[str, torch.Size]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        network = build_resnet(CAFFE_RESNET50, VGGFACE2_CLASSES)
    return {key: tensor.shape for key, tensor in network.state_dict().items()}


def vggface2_state_dict(path: str | Path, num_classes: int | None = None) -> dict[str, torch.Tensor]:
    """The file's weights as a complete state dict for ``build_resnet(CAFFE_RESNET50, ...)``.

    With ``num_classes`` the 8631-identity head is replaced by a freshly initialised one of
    that size (PyTorch's default ``nn.Linear`` init), so the result still loads strictly and
    the new head can be fine-tuned, as the paper does.
    """
    path = Path(path)
    arrays = _read_arrays(path)
    expected = _expected_shapes()
    wanted = [key for key in expected if not key.endswith("num_batches_tracked")]
    missing = [key for key in wanted if key not in arrays]
    unexpected = sorted(set(arrays) - set(wanted))
    mismatched = [
        f"{key} {arrays[key].shape} vs {tuple(expected[key])}"
        for key in wanted
        if key in arrays and arrays[key].shape != tuple(expected[key])
    ]
    problems = [
        f"{what}: {', '.join(keys[:3])}{', …' if len(keys) > 3 else ''}"
        for what, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape (file vs ResNet-50)", mismatched),
        )
        if keys
    ]
    if problems:
        raise ModelError(f"{path} is not the VGGFace2 ResNet-50 weight file ({'; '.join(problems)})")
    state_dict = {key: torch.from_numpy(np.array(arrays[key], dtype=np.float32)) for key in wanted}
    check_finite(state_dict, path)
    state_dict.update({key: torch.tensor(0) for key in expected if key.endswith("num_batches_tracked")})
    if num_classes is not None:
        head = nn.Linear(state_dict["fc.weight"].shape[1], num_classes)
        state_dict["fc.weight"], state_dict["fc.bias"] = head.weight.detach(), head.bias.detach()
    return state_dict


def vggface2_card(
    classes: Sequence[str],
    weights: str,
    mean_bgr: Sequence[float] = VGGFACE2_MEAN_BGR,
    fold: str | None = None,
    training_data_hash: str | None = None,
    notes: str = "",
) -> ModelCard:
    """The card of a classifier fine-tuned from VGGFace2: Caffe layout, BGR pixels 0..255 minus a mean.

    The paper's training code subtracts the BGR mean of each fold's aligned training images
    rather than VGGFace2's; pass it as ``mean_bgr`` to reproduce that.
    """
    return ModelCard(
        kind="classifier",
        architecture=CAFFE_RESNET50,
        classes=tuple(classes),
        input_size=VGGFACE2_INPUT_SIZE,
        channel_order="BGR",
        input_scale=255.0,
        mean=cast("tuple[float, float, float]", tuple(mean_bgr)),
        std=(1.0, 1.0, 1.0),
        weights=weights,
        fold=fold,
        training_data_hash=training_data_hash,
        notes=notes,
    )
