"""Import the classifiers the paper's authors trained (their ``train.py``) as safetensors plus a card.

Their ``train.py`` saves whole modules, ``torch.save(model)``, of their class
``models.VGGFace2_ResNet.resnet50_adapted``: a zip whose ``data.pkl`` names that class, its
blocks and torch's layers, and whose tensors lie beside it. Unpickling that normally imports the
classes and runs their code. Here it is read by an unpickler that knows a short list of names
and nothing else: the authors' and torch's module classes become inert stand-ins that only keep
their pickled attributes, tensors are rebuilt through torch's own tensor-rebuild function from
the zip's raw bytes, and any other name (``os.system``, ``builtins.eval``, even another function
of the authors' module) stops the read before anything runs. Their code is never imported.

The weights then go into this project's ``resnet50-caffe`` network, after checking that every
convolution and pooling of the saved module has the settings of that layout (the Caffe ResNet-50
downsamples in each stage's first 1×1 convolution; torchvision's ResNet-50 has the same keys and
shapes but computes something else). The card says how their ``datasets/nih_faces.py`` fed the
network: BGR, 0..255 minus the fold's BGR mean (the table in their ``test.py``), no std, 224 px.
"""

from __future__ import annotations

import _compat_pickle
import dataclasses
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import ModelError
from models.checkpoint import check_finite, save_checkpoint
from models.resnet import CAFFE_RESNET50, build_resnet
from models.vggface2 import vggface2_card

# code/datasets/nih_faces.py: NIHFacesDataset.categories, the order of the network's outputs.
RELEASED_CLASSES = ("22q11DS", "Angelman", "BWS", "CdLS", "Down", "KS", "NS", "PWS", "RSTS1", "Unaffected", "WHS", "WS")
# code/test.py: "Pre-calculated channel means", each fold's BGR mean of its aligned training faces.
RELEASED_MEAN_BGR = {
    "fold-1": (112.482, 123.050, 147.127),
    "fold-2": (112.475, 123.011, 147.073),
    "fold-3": (112.359, 122.850, 147.066),
    "fold-4": (112.912, 123.480, 147.665),
    "fold-5": (112.554, 123.063, 147.243),
}
RELEASED_INPUT_SIZE = 224  # image_size=224 in train.py and test.py; their AvgPool2d(7) needs exactly a 7×7 map
RELEASED_CLASS = "models.VGGFace2_ResNet.resnet50_adapted"
CHECKPOINT_NAME = re.compile(r"^epoch-(?P<epoch>\d+)-test_accuracy-(?P<accuracy>\d+(?:\.\d*)?)\.pt$")
# Far above a ResNet-50 (95 MB of tensors, a 73 kB pickle): bounds memory for a hostile file.
MAX_PICKLE_BYTES = 16 * 2**20
MAX_TENSOR_BYTES = 2 * 2**30
MAX_DEPTH = 16

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
# The classes a pickled resnet50_adapted names (their module's and torch.nn's): each becomes an inert stand-in.
_MODULE_CLASSES = {
    "models.VGGFace2_ResNet": ("resnet50_adapted", "ResNet", "Bottleneck", "BasicBlock"),
    "torch.nn.modules.conv": ("Conv2d",),
    "torch.nn.modules.batchnorm": ("BatchNorm2d",),
    "torch.nn.modules.activation": ("ReLU",),
    "torch.nn.modules.pooling": ("MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d"),
    "torch.nn.modules.container": ("Sequential",),
    "torch.nn.modules.linear": ("Linear",),
}


class _Refused(pickle.UnpicklingError):
    """The pickle asks for something a saved resnet50_adapted never holds."""


class SavedModule:
    """Stands in for a module class the checkpoint names: keeps the pickled attributes, runs nothing."""

    class_name = ""

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, dict):
            raise _Refused(f"a {self.class_name} whose state is not a dict of attributes")
        self.attributes = state

    def attribute(self, name: str) -> Any:
        return getattr(self, "attributes", {}).get(name)


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


def _stand_in(module: str, name: str) -> type[SavedModule]:
    return type(name, (SavedModule,), {"class_name": f"{module}.{name}"})


def _checked_tensor(value: object, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise _Refused(f"a {what} that is not a tensor")
    return value


def _is_ints(value: object) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _rebuild_tensor(storage, offset, size, stride, requires_grad, hooks, metadata=None) -> torch.Tensor:
    """torch's own ``_rebuild_tensor_v2``, called only on a storage read here and plain integers."""
    if not isinstance(storage, torch.storage.TypedStorage) or not isinstance(offset, int):
        raise _Refused("a tensor that is not built on a storage of the file")
    if not (_is_ints(size) and _is_ints(stride) and len(size) == len(stride)):
        raise _Refused("a tensor with a malformed shape")
    if hooks is not None and not (isinstance(hooks, OrderedDict) and not hooks):
        raise _Refused("a tensor with backward hooks")
    try:
        return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())
    except RuntimeError as error:  # a shape or offset beyond the storage
        raise _Refused(f"a tensor that does not fit its storage ({error})") from None


def _rebuild_parameter(data, requires_grad, hooks) -> torch.Tensor:
    """A parameter's tensor, without making it a Parameter (nothing here trains it)."""
    return _checked_tensor(data, "parameter")


_FUNCTIONS: dict[tuple[str, str], Callable[..., object]] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
}


class _SavedModuleUnpickler(pickle.Unpickler):
    """Rebuilds a torch.save'd module from stand-ins and raw tensors; every other name is refused."""

    def __init__(self, file, archive: zipfile.ZipFile, root: str) -> None:
        super().__init__(file)
        self.archive, self.root = archive, root
        self.storages: dict[str, torch.storage.TypedStorage] = {}
        self.stand_ins: dict[tuple[str, str], type[SavedModule]] = {}
        self.tensor_bytes = 0

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2 (torch.save's) writes Python 3 modules under their Python 2 names (__builtin__).
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _FUNCTIONS:
            return _FUNCTIONS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if name in _MODULE_CLASSES.get(module, ()):
            return self.stand_ins.setdefault((module, name), _stand_in(module, name))
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: object) -> torch.storage.TypedStorage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Refused("a persistent object that is not a tensor storage")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise _Refused("a malformed tensor storage")
        if key not in self.storages:
            self.storages[key] = self._storage(storage_type.dtype, key, numel)
        return self.storages[key]

    def _storage(self, dtype: torch.dtype, key: str, numel: int) -> torch.storage.TypedStorage:
        """The storage's bytes, read from the zip as they are (map_location is always the CPU)."""
        try:
            info = self.archive.getinfo(f"{self.root}/data/{key}")
        except KeyError:
            raise _Refused(f"a tensor storage {key!r} that the file does not hold") from None
        expected = numel * torch.empty(0, dtype=dtype).element_size()
        if info.file_size != expected:
            raise _Refused(f"storage {key!r} of {info.file_size} bytes where {expected} are declared")
        self.tensor_bytes += expected
        if self.tensor_bytes > MAX_TENSOR_BYTES:
            raise _Refused("more tensor data than any ResNet-50 checkpoint holds")
        raw = bytearray(self.archive.read(info))
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return torch.storage.TypedStorage(wrap_storage=flat.untyped_storage(), dtype=dtype, _internal=True)


def _pickle_root(archive: zipfile.ZipFile, path: Path) -> str:
    roots = [name[: -len("/data.pkl")] for name in archive.namelist() if name.endswith("/data.pkl")]
    if len(roots) != 1 or "/" in roots[0]:
        raise ModelError(f"{path} is not a checkpoint written by torch.save (no data.pkl in its zip)")
    byteorder = f"{roots[0]}/byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
        raise ModelError(f"{path} was saved on a big-endian machine; load and re-save it on a little-endian one")
    return roots[0]


def read_saved_module(path: str | Path) -> object:
    """The object a ``torch.save`` zip holds, with module classes as ``SavedModule`` stand-ins.

    Only the names a saved ``resnet50_adapted`` uses are known; any other refuses the file before
    it is acted on (``ModelError`` naming it). No code of the file, nor of the authors, runs.
    """
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise ModelError(f"checkpoint {path} not found") from None
    except (zipfile.BadZipFile, OSError) as error:
        raise ModelError(
            f"cannot read {path} as a checkpoint of the authors' train.py: it is not a torch.save zip "
            f"({error}); files from torch before 1.6 must be re-saved by a recent torch first"
        ) from None
    with archive:
        root = _pickle_root(archive, path)
        info = archive.getinfo(f"{root}/data.pkl")
        if info.file_size > MAX_PICKLE_BYTES:
            raise ModelError(f"{path}: its pickle is {info.file_size} bytes, far more than a saved ResNet-50 holds")
        try:
            with archive.open(info) as file:
                return _SavedModuleUnpickler(file, archive, root).load()
        except _Refused as error:
            raise ModelError(
                f"refused to load {path}: it asks for {error}, which a checkpoint of the authors' "
                f"{RELEASED_CLASS} never holds, and unpickling it could run code; nothing in it was run"
            ) from None
        except MemoryError:
            raise ModelError(f"cannot read {path}: it declares an object larger than memory") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
            raise ModelError(f"cannot read {path} as a torch checkpoint ({error}); the file may be truncated") from None
        except (zipfile.BadZipFile, OSError) as error:
            raise ModelError(f"cannot read {path} ({error}); the file may be truncated") from None


def _children(module: SavedModule) -> Iterator[tuple[str, SavedModule]]:
    children = module.attribute("_modules") or {}
    if not isinstance(children, Mapping):
        raise ModelError(f"{module.class_name} in the checkpoint has malformed sub-modules")
    for name, child in children.items():
        if child is None:
            continue
        if not isinstance(name, str) or not isinstance(child, SavedModule):
            raise ModelError(f"{module.class_name} in the checkpoint holds a sub-module that is not a module")
        yield name, child


def _named_modules(module: SavedModule, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, SavedModule]]:
    if depth > MAX_DEPTH:  # theirs nest 4 deep (layer1.0.downsample.0); a hostile file could nest thousands
        raise ModelError(f"the checkpoint's modules nest deeper than {MAX_DEPTH} levels; no ResNet-50 does")
    yield prefix, module
    for name, child in _children(module):
        yield from _named_modules(child, f"{prefix}{name}.", depth + 1)


def saved_state_dict(root: SavedModule) -> dict[str, torch.Tensor]:
    """``root.state_dict()`` as torch would compute it: parameters and persistent buffers, by dotted name."""
    state: dict[str, torch.Tensor] = {}
    for prefix, module in _named_modules(root):
        non_persistent = module.attribute("_non_persistent_buffers_set") or set()
        for group in ("_parameters", "_buffers"):
            tensors = module.attribute(group) or {}
            if not isinstance(tensors, Mapping):
                raise ModelError(f"{module.class_name} in the checkpoint has malformed {group}")
            for name, tensor in tensors.items():
                if tensor is None or name in non_persistent:
                    continue
                if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                    raise ModelError(f"{module.class_name} in the checkpoint holds a {group[1:-1]} that is no tensor")
                state[f"{prefix}{name}"] = tensor.detach().clone()
    return state


_LAYER_SETTINGS = {
    nn.Conv2d: ("kernel_size", "stride", "padding", "dilation", "groups"),
    nn.MaxPool2d: ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    nn.BatchNorm2d: ("eps",),
}


def _layer_settings(module: nn.Module | SavedModule) -> tuple[str, tuple] | None:
    """A convolution's, pooling's or batch norm's kind and the settings that decide what it computes."""
    for kind, names in _LAYER_SETTINGS.items():
        if isinstance(module, kind):
            return kind.__name__, tuple(_pair(getattr(module, name)) for name in names)
        if isinstance(module, SavedModule) and module.class_name.endswith(f".{kind.__name__}"):
            return kind.__name__, tuple(_pair(module.attribute(name)) for name in names)
    return None


def _pair(value: object) -> object:
    return (value, value) if isinstance(value, int) and not isinstance(value, bool) else value


def check_caffe_layout(root: SavedModule, path: Path) -> None:
    """Every convolution, max-pool and batch norm of the saved module has the settings of the same layer
    of ``resnet50-caffe``, and its average pool covers the 7×7 map of a 224 px input, so the project's
    network computes what theirs did."""
    with torch.device("meta"):
        ours = dict(build_resnet(CAFFE_RESNET50, len(RELEASED_CLASSES)).named_modules())
    differences = []
    for prefix, module in _named_modules(root):
        name = prefix.rstrip(".")
        saved = _layer_settings(module)
        if saved is not None and (name not in ours or saved != _layer_settings(ours[name])):
            differences.append(name)
    pool = dict(_named_modules(root)).get("avgpool.")
    averages_7x7 = pool is not None and (
        (pool.class_name.endswith(".AvgPool2d") and _pair(pool.attribute("kernel_size")) == (7, 7))
        or (pool.class_name.endswith(".AdaptiveAvgPool2d") and _pair(pool.attribute("output_size")) == (1, 1))
    )
    if not averages_7x7:
        differences.append("avgpool")
    if differences:
        raise ModelError(
            f"{path}: the saved network is not the Caffe-layout ResNet-50 of the authors' code ("
            f"{', '.join(differences[:3])}{', …' if len(differences) > 3 else ''} differ), so its weights would "
            "compute something else here; nothing was written"
        )


def released_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint saved by the authors' train.py, checked to fit ``resnet50-caffe``."""
    path = Path(path)
    root = read_saved_module(path)
    if not isinstance(root, SavedModule) or root.class_name != RELEASED_CLASS:
        found = root.class_name if isinstance(root, SavedModule) else type(root).__name__
        hint = (
            "; if it is that network's state_dict(), point a card with architecture resnet50-caffe at it "
            "(README 'Bring your own model')"
            if isinstance(root, dict)
            else ""
        )
        raise ModelError(f"{path} holds a {found}, not the authors' {RELEASED_CLASS} that train.py saves{hint}")
    check_caffe_layout(root, path)
    state = saved_state_dict(root)
    with torch.device("meta"):
        expected = build_resnet(CAFFE_RESNET50, len(RELEASED_CLASSES)).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    if missing or unexpected or mismatched:
        problems = ", ".join(
            f"{what} {', '.join(keys[:3])}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
            if keys
        )
        raise ModelError(f"{path}: its weights do not fit a 12-class ResNet-50 ({problems})")
    check_finite(state, path)
    return {key: tensor.to(expected[key].dtype) for key, tensor in state.items()}


@dataclass(frozen=True)
class EpochCheckpoint:
    path: Path
    epoch: int
    accuracy: float


def epoch_checkpoints(folder: str | Path) -> list[EpochCheckpoint]:
    """The ``epoch-NN-test_accuracy-A.pt`` files train.py wrote into one fold's folder, by epoch."""
    found = []
    for path in Path(folder).glob("epoch-*.pt"):
        match = CHECKPOINT_NAME.match(path.name)
        if match:
            found.append(EpochCheckpoint(path, int(match["epoch"]), float(match["accuracy"])))
    return sorted(found, key=lambda checkpoint: (checkpoint.epoch, checkpoint.path.name))


def best_checkpoint(folder: str | Path) -> tuple[EpochCheckpoint, list[EpochCheckpoint]]:
    """The checkpoint test.py evaluates: the highest accuracy in the file names; and those it ties with.

    test.py takes ``np.argmax`` over ``glob('epoch-*.pt')``, i.e. the first of the tied files in the
    directory's listing order, which the file system decides. Here the earliest epoch wins a tie, the
    same on every machine, and the tied files are returned so the caller can say so.
    """
    checkpoints = epoch_checkpoints(folder)
    if not checkpoints:
        raise ModelError(f"{folder} holds no epoch-NN-test_accuracy-A.pt checkpoint of the authors' train.py")
    best = max(checkpoint.accuracy for checkpoint in checkpoints)
    tied = [checkpoint for checkpoint in checkpoints if checkpoint.accuracy == best]
    return tied[0], tied[1:]


def fold_of(path: Path) -> str | None:
    """The fold named by the path, as train.py's results/<architecture>/<fold>/ layout names it."""
    folds = [part for part in path.resolve().parts if re.fullmatch(r"fold-[1-5]", part)]
    return folds[-1] if folds else None


@dataclass(frozen=True)
class ImportedModel:
    card_path: Path
    checkpoint: Path
    fold: str
    tied_with: tuple[Path, ...] = ()


def import_released_model(checkpoint: str | Path, out: str | Path, fold: str | None = None) -> ImportedModel:
    """Write ``classifier-<fold>.safetensors`` and its card from a checkpoint of the authors' train.py.

    ``checkpoint`` is one ``.pt`` file, or a fold's folder of them (the best is taken, as test.py
    does). ``fold`` defaults to the fold the path names (``.../fold-3/...``); it picks the BGR mean.
    """
    checkpoint = Path(checkpoint)
    tied: list[EpochCheckpoint] = []
    if checkpoint.is_dir():
        chosen, tied = best_checkpoint(checkpoint)
        checkpoint = chosen.path
    fold = fold or fold_of(checkpoint)
    if fold not in RELEASED_MEAN_BGR:
        raise ModelError(
            f"which fold is {checkpoint.name}? pass --fold fold-1 … fold-5 (it picks the BGR mean of that "
            "fold's training faces, from the authors' test.py)"
            if fold is None
            else f"unknown fold {fold!r}: the authors' models are fold-1 … fold-5"
        )
    network = build_resnet(CAFFE_RESNET50, len(RELEASED_CLASSES))
    network.load_state_dict(released_state_dict(checkpoint), strict=True)
    card = vggface2_card(
        RELEASED_CLASSES,
        weights=f"classifier-{fold}.safetensors",
        mean_bgr=RELEASED_MEAN_BGR[fold],
        fold=fold,
        notes=(
            f"Imported from {checkpoint.name}, saved by the authors' train.py (facial-gestalt-xai); "
            f"input as their datasets/nih_faces.py: BGR, 0..255 minus {fold}'s mean from their test.py."
        ),
    )
    card = dataclasses.replace(card, input_size=RELEASED_INPUT_SIZE)
    card_path = save_checkpoint(network, card, out, f"classifier-{fold}")
    return ImportedModel(card_path, checkpoint, fold, tuple(t.path for t in tied))
