"""Face regions as plain, editable data, and the masks they give on a LaPa label map.

A region is either a union of boxes around parsed parts (eye, nose, mouth) or the pixels of
some labels (face skin, hair), optionally with edges tied to other regions. The rules are
frozen data with a JSON form, so the dashboard can edit them live, put them in URLs
(``spec_id``) and key caches on them.

``PAPER_REGIONS`` reproduces the eye, nose and mouth masks of the paper's released code
(``extract_region_coefficients.py``) pixel for pixel, with two deliberate differences:
edges pushed past the image border are clipped to it (the released numpy slices wrap
around on negative starts and give an empty box), and every overlap is resolved by region
order (the released code only gives eye ∩ nose to the eye; it leaves the rarer eye ∩ mouth
pixels in both regions).

How a spec is evaluated on one label map (every coordinate an int, boxes half-open like
numpy slices ``[top:bottom, left:right]``, nothing clipped until the masks are drawn):

1. A ``BoxRule`` measures the union of its labels' largest 8-connected components as the
   released code does: top/left = min row/col, bottom/right = max row/col, so h = bottom −
   top and the part's last row and column fall outside unless grown. Each side grows by
   ``int(fraction × h or w)`` of that ungrown size.
   A label region's box is the half-open bounding box of its labels' pixels (all of them,
   not just the largest component: hair is often in pieces); its mask is those pixels
   inside its box.
2. ``EdgeLink``s set an edge of every box of a region, after the region they point to is
   final (including its gap splits).
3. ``GapSplit``s move edges at the gap between two regions, in spec order.
4. Masks are drawn; a pixel claimed by several regions goes to the first in spec order.

A region whose parts are absent, or that depends on such a region, is empty (its score
becomes NaN downstream) and ``region_masks`` warns, naming the region and the reason.
"""

from __future__ import annotations

import collections
import dataclasses
import graphlib
import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage.measure import label as connected_components

from core.errors import RegionSpecError
from core.parse import LAPA_LABELS

EDGES = ("top", "bottom", "left", "right")
REGION_SPECS_DIR = Path(__file__).with_name("region_specs")
# Default caps on a spec from a user (``SpecCaps``; a hosted deployment's ``[limits]`` may change them).
SPEC_BYTES, SPEC_REGIONS, NAME_CHARS = 64 * 1024, 32, 64
_SHOWN_CHARS = 40  # how much of a user's value an error message quotes


def shown(value) -> str:
    """``repr(value)`` cut to a few dozen characters: an error quoting a stranger's 20 MB name stays one short line."""
    text = (
        repr(value) if not isinstance(value, str) or len(value) <= 4 * _SHOWN_CHARS else repr(value[: 4 * _SHOWN_CHARS])
    )
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "…"


@dataclass(frozen=True)
class SpecCaps:
    """How large a spec from a user may be: its JSON bytes, its number of regions, and the length of its
    own and its regions' names. ``RegionSpec.from_json`` checks them before it parses or builds anything
    that grows with the text, so an oversized spec is refused in time proportional to nothing but its size."""

    spec_bytes: int = SPEC_BYTES
    regions: int = SPEC_REGIONS
    name_chars: int = NAME_CHARS


def _labels(value, where: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise RegionSpecError(f"{where}: labels must be a list of LaPa indices, got {shown(value)}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)) or not 0 <= item < len(LAPA_LABELS):
            raise RegionSpecError(
                f"{where}: unknown label {shown(item)}; LaPa labels are 0..{len(LAPA_LABELS) - 1} "
                f"({', '.join(f'{i} {n}' for i, n in enumerate(LAPA_LABELS))})"
            )
    return tuple(int(item) for item in value)


def _fraction(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RegionSpecError(f"{where}: expected a finite number, got {shown(value)}")
    return float(value)  # 0 and 0.0 must serialise alike, or equal specs get different ids


def _name(value, where: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise RegionSpecError(f"{where}: expected a non-empty region name, got {shown(value)}")


@dataclass(frozen=True)
class BoxRule:
    """Box around the union of the labels' largest components, each side grown by a fraction
    (negative shrinks) of the ungrown width (left/right) or height (top/bottom)."""

    labels: tuple[int, ...]
    grow_left: float = 0.0
    grow_right: float = 0.0
    grow_top: float = 0.0
    grow_bottom: float = 0.0

    def __post_init__(self):
        labels = _labels(self.labels, "box")
        if not labels:
            raise RegionSpecError("box: a box needs at least one label to go around")
        object.__setattr__(self, "labels", labels)
        for side in ("grow_left", "grow_right", "grow_top", "grow_bottom"):
            object.__setattr__(self, side, _fraction(getattr(self, side), f"box {labels}: {side}"))


@dataclass(frozen=True)
class EdgeLink:
    """Puts an edge at another region's ``edge`` plus ``offset`` × that region's smallest
    ungrown box height (top/bottom) or width (left/right)."""

    region: str
    edge: str
    offset: float = 0.0

    def __post_init__(self):
        _name(self.region, "edge link")
        if self.edge not in EDGES:
            raise RegionSpecError(
                f"edge link to {shown(self.region)}: edge must be one of {EDGES}, got {shown(self.edge)}"
            )
        object.__setattr__(self, "offset", _fraction(self.offset, f"edge link to {shown(self.region)}: offset"))


@dataclass(frozen=True)
class RegionRule:
    """A union of boxes, or the pixels of some labels; either way optionally bounded by links."""

    name: str
    boxes: tuple[BoxRule, ...] = ()
    labels: tuple[int, ...] = ()
    top: EdgeLink | None = None
    bottom: EdgeLink | None = None
    left: EdgeLink | None = None
    right: EdgeLink | None = None

    def __post_init__(self):
        _name(self.name, "region")
        if not isinstance(self.boxes, (list, tuple)) or not all(isinstance(box, BoxRule) for box in self.boxes):
            raise RegionSpecError(f"region {shown(self.name)}: boxes must be a list of box rules")
        boxes = tuple(self.boxes)
        labels = _labels(self.labels, f"region {shown(self.name)}")
        if bool(boxes) == bool(labels):
            raise RegionSpecError(
                f"region {shown(self.name)}: give either boxes (around parts) or labels (their pixels), not "
                + ("both" if boxes else "neither")
            )
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "labels", labels)
        for edge, link in self.links():
            if not isinstance(link, EdgeLink):
                raise RegionSpecError(
                    f"region {shown(self.name)}: {edge} must be an edge link or null, got {shown(link)}"
                )

    def links(self) -> tuple[tuple[str, EdgeLink], ...]:
        return tuple((edge, getattr(self, edge)) for edge in EDGES if getattr(self, edge) is not None)


@dataclass(frozen=True)
class GapSplit:
    """The paper's nose/mouth rule: ``lower``'s bottom extends by ``extend_lower_bottom`` × the
    gap, then ``upper``'s bottom and ``lower``'s top both move to the gap's midpoint."""

    upper: str
    lower: str
    extend_lower_bottom: float = 0.5

    def __post_init__(self):
        _name(self.upper, "gap split")
        _name(self.lower, "gap split")
        if self.upper == self.lower:
            raise RegionSpecError(f"gap split: upper and lower are both {shown(self.upper)}; name two regions")
        object.__setattr__(
            self,
            "extend_lower_bottom",
            _fraction(
                self.extend_lower_bottom, f"gap split {shown(self.upper)}/{shown(self.lower)}: extend_lower_bottom"
            ),
        )


@dataclass(frozen=True)
class RegionSpec:
    """Regions in overlap priority order (earlier wins); validated on construction."""

    regions: tuple[RegionRule, ...]
    gap_splits: tuple[GapSplit, ...] = ()
    name: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise RegionSpecError(f"region spec: name must be text, got {shown(self.name)}")
        regions, splits = tuple(self.regions), tuple(self.gap_splits)
        if not regions:
            raise RegionSpecError("region spec: define at least one region")
        if not all(isinstance(rule, RegionRule) for rule in regions):
            raise RegionSpecError("region spec: regions must be region rules")
        if not all(isinstance(split, GapSplit) for split in splits):
            raise RegionSpecError("region spec: gap_splits must be gap splits")
        object.__setattr__(self, "regions", regions)
        object.__setattr__(self, "gap_splits", splits)
        # Counted and looked up in a set: checking a spec stays linear in its regions.
        names = collections.Counter(rule.name for rule in regions)
        duplicates = sorted(name for name, count in names.items() if count > 1)
        if duplicates:
            raise RegionSpecError(f"region spec: region names must be unique; repeated: {shown(duplicates)}")
        known = shown(list(names))
        for rule in regions:
            for edge, link in rule.links():
                if link.region not in names:
                    raise RegionSpecError(
                        f"region {shown(rule.name)}: its {edge} links to unknown region {shown(link.region)}; "
                        f"known: {known}"
                    )
        for split in splits:
            for member in (split.upper, split.lower):
                if member not in names:
                    raise RegionSpecError(
                        f"gap split {shown(split.upper)}/{shown(split.lower)}: unknown region {shown(member)}; "
                        f"known: {known}"
                    )
        _evaluation_order(self)  # raises on cycles

    def to_json(self) -> str:
        """Canonical JSON (every field, fixed order), so equal specs give equal text and ids."""
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str | bytes, caps: SpecCaps | None = SpecCaps()) -> RegionSpec:
        """The spec a JSON text describes, refused with a one-line ``RegionSpecError`` when it is not one or
        exceeds ``caps`` (checked before the text is parsed, and the regions and names before anything is
        built). ``caps=None`` only for trusted files (the bundled specs)."""
        if caps is not None:
            _check_size(text, caps)
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RegionSpecError(f"region spec is not valid JSON: {error}") from None
        spec = _from_dict(cls, data, "region spec")
        regions = spec.get("regions")
        if not isinstance(regions, list):
            raise RegionSpecError("region spec: 'regions' must be a list of regions")
        if caps is not None:
            _check_count(len(regions), caps)
            _check_name(spec.get("name"), "its name", caps)
        rules = []
        for i, region in enumerate(regions):
            rule = _from_dict(RegionRule, region, f"region #{i + 1}")
            if caps is not None:
                _check_name(rule.get("name"), f"region #{i + 1}'s name", caps)
            boxes = rule.get("boxes", [])
            if not isinstance(boxes, list):
                raise RegionSpecError(f"region #{i + 1}: 'boxes' must be a list of boxes")
            where = f"region #{i + 1} box"
            rule["boxes"] = [_construct(BoxRule, _from_dict(BoxRule, box, where), where) for box in boxes]
            for edge in EDGES:
                if rule.get(edge) is not None:
                    where = f"region #{i + 1} {edge}"
                    rule[edge] = _construct(EdgeLink, _from_dict(EdgeLink, rule[edge], where), where)
            rules.append(_construct(RegionRule, rule, f"region #{i + 1}"))
        splits = spec.get("gap_splits", [])
        if not isinstance(splits, list):
            raise RegionSpecError("region spec: 'gap_splits' must be a list")
        spec["regions"] = rules
        spec["gap_splits"] = [_construct(GapSplit, _from_dict(GapSplit, s, "gap split"), "gap split") for s in splits]
        return _construct(cls, spec, "region spec")


def _check_size(text: str | bytes, caps: SpecCaps) -> None:
    # A str's characters are at most its UTF-8 bytes: a huge text is refused before it is encoded.
    size = len(text) if isinstance(text, bytes) or len(text) > caps.spec_bytes else len(text.encode())
    if size > caps.spec_bytes:
        raise RegionSpecError(
            f"region spec is {_amount(size)} of JSON; this server takes specs of at most {_amount(caps.spec_bytes)}"
        )


def _amount(size: int) -> str:
    return f"{size} bytes" if size < 10 * 1024 else f"{size // 1024} KB"


def _check_count(regions: int, caps: SpecCaps) -> None:
    if regions > caps.regions:
        raise RegionSpecError(f"region spec has {regions} regions; this server takes at most {caps.regions}")


def _check_name(name, what: str, caps: SpecCaps) -> None:
    if isinstance(name, str) and len(name) > caps.name_chars:
        raise RegionSpecError(
            f"region spec: {what} is {len(name)} characters long; names may have at most {caps.name_chars}"
        )


def check_caps(spec: RegionSpec, caps: SpecCaps = SpecCaps()) -> RegionSpec:
    """``spec`` when it is within ``caps`` (an edited spec, before it is stored or used), else a one-line
    ``RegionSpecError``; its JSON bytes are measured last, after the cheaper checks bounded them."""
    _check_count(len(spec.regions), caps)
    _check_name(spec.name, "its name", caps)
    for i, rule in enumerate(spec.regions):
        _check_name(rule.name, f"region #{i + 1}'s name", caps)
    _check_size(spec.to_json(), caps)
    return spec


def _from_dict(cls, data, where: str) -> dict:
    """A copy of ``data`` with its keys checked against ``cls``'s fields (typos are errors)."""
    if not isinstance(data, dict):
        raise RegionSpecError(f"{where}: expected a JSON object, got {shown(data)}")
    allowed = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise RegionSpecError(f"{where}: unknown key(s) {shown(unknown)}; allowed: {allowed}")
    return dict(data)


def _construct(cls, fields: dict, where: str):
    try:
        return cls(**fields)
    except TypeError as error:  # a required field is missing
        raise RegionSpecError(f"{where}: {error}") from None


def spec_id(spec: RegionSpec) -> str:
    """Short, stable content hash of the spec's canonical JSON (for URLs and cache keys)."""
    return hashlib.sha256(spec.to_json().encode()).hexdigest()[:12]


def bundled_region_specs() -> dict[str, RegionSpec]:
    """The ready-made specs shipped in ``core/region_specs/``, by file stem."""
    return {
        path.stem: RegionSpec.from_json(path.read_text(), caps=None) for path in sorted(REGION_SPECS_DIR.glob("*.json"))
    }


def _evaluation_order(spec: RegionSpec) -> list[tuple[str, str | int]]:
    """Steps ("region", name) and ("split", index) so that a region is built after every region
    it links to is final, i.e. after the last gap split that moves it; splits run in spec order."""
    final: dict[str, tuple[str, str | int]] = {rule.name: ("region", rule.name) for rule in spec.regions}
    graph: dict[tuple, set] = {("region", rule.name): set() for rule in spec.regions}
    for i, split in enumerate(spec.gap_splits):
        graph[("split", i)] = {("region", split.upper), ("region", split.lower), final[split.upper], final[split.lower]}
        final[split.upper] = final[split.lower] = ("split", i)
    for rule in spec.regions:
        graph[("region", rule.name)] |= {final[link.region] for _, link in rule.links()}
    try:
        return list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        steps = [
            f"region {step!r}"
            if kind == "region"
            else f"gap split {spec.gap_splits[step].upper}/{spec.gap_splits[step].lower}"
            for kind, step in error.args[1]
        ]
        raise RegionSpecError(
            "region spec: edge links form a cycle, so no region can be placed first: " + " -> ".join(steps)
        ) from None


PAPER_REGIONS = RegionSpec(
    name="paper",
    regions=(
        RegionRule(
            "eye",
            boxes=(
                BoxRule((2, 4), grow_left=0.2, grow_right=0.1, grow_top=0.2, grow_bottom=0.2),
                BoxRule((3, 5), grow_left=0.1, grow_right=0.2, grow_top=0.2, grow_bottom=0.2),
            ),
        ),
        RegionRule("nose", boxes=(BoxRule((6,)),), top=EdgeLink("eye", "top", 0.3)),
        # The released code grows the mouth sideways after the split; the split moves only
        # rows and the growth uses the lips' ungrown width, so growing first is the same.
        RegionRule("mouth", boxes=(BoxRule((7, 9), grow_left=0.2, grow_right=0.2),)),
    ),
    gap_splits=(GapSplit("nose", "mouth", 0.5),),
)


@dataclass(frozen=True, eq=False)
class RegionMasks:
    """``masks[..., r, :, :]`` is the bool mask of region ``names[r]``: R×H×W for one label map,
    N×R×H×W for N. Regions never overlap; an empty mask means the region is missing."""

    names: tuple[str, ...]
    masks: np.ndarray


class _Placement:
    """One region's boxes in one image while the spec is evaluated: [top, bottom, left, right]
    (half-open, unclipped), their ungrown (height, width), and for label regions the pixels."""

    def __init__(self, boxes: list[list[int]], sizes: list[tuple[int, int]], pixels: np.ndarray | None = None):
        self.boxes, self.sizes, self.pixels = boxes, sizes, pixels

    def edge(self, edge: str) -> int:
        values = [box[EDGES.index(edge)] for box in self.boxes]
        return min(values) if edge in ("top", "left") else max(values)

    def size(self, edge: str) -> int:
        return min(height if edge in ("top", "bottom") else width for height, width in self.sizes)

    def set_edge(self, edge: str, value: int) -> None:
        for box in self.boxes:
            box[EDGES.index(edge)] = value


def _describe(labels) -> str:
    return ", ".join(f"{label} ({LAPA_LABELS[label]})" for label in labels)


def _part_extents(label_map: np.ndarray, labels: set[int]) -> dict[int, tuple[int, int, int, int]]:
    """(min row, max row, min col, max col) of each present label's largest 8-connected component.

    One labelling of the whole map numbers the components of every value in raster order,
    as labelling each ``map == label`` mask would, so ``argmax`` breaks ties between equal
    components the same way as the released code."""
    components = connected_components(label_map, background=-1, connectivity=2)
    flat = components.ravel()
    component_sizes = np.bincount(flat)
    label_of_component = np.full(component_sizes.size, -1)
    label_of_component[flat] = label_map.ravel()
    extents = {}
    for label in labels:
        ids = np.flatnonzero(label_of_component == label)
        if ids.size:
            largest = components == ids[np.argmax(component_sizes[ids])]
            rows, cols = np.flatnonzero(largest.any(axis=1)), np.flatnonzero(largest.any(axis=0))
            extents[label] = (int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1]))
    return extents


def _place(rule: RegionRule, label_map: np.ndarray, parts: dict) -> _Placement | str:
    """The region's boxes before links and splits, or why it is missing."""
    if rule.labels:
        pixels = np.isin(label_map, rule.labels)
        rows, cols = np.flatnonzero(pixels.any(axis=1)), np.flatnonzero(pixels.any(axis=0))
        if rows.size == 0:
            return f"none of its labels {_describe(rule.labels)} is in the label map"
        box = [int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1]
        return _Placement([box], [(box[1] - box[0], box[3] - box[2])], pixels)
    boxes, sizes = [], []
    for box_rule in rule.boxes:
        absent = [label for label in box_rule.labels if label not in parts]
        if absent:
            return f"label{'s' * (len(absent) > 1)} {_describe(absent)} not in the label map"
        top = min(parts[label][0] for label in box_rule.labels)
        bottom = max(parts[label][1] for label in box_rule.labels)
        left = min(parts[label][2] for label in box_rule.labels)
        right = max(parts[label][3] for label in box_rule.labels)
        height, width = bottom - top, right - left
        boxes.append(
            [
                top - int(box_rule.grow_top * height),
                bottom + int(box_rule.grow_bottom * height),
                left - int(box_rule.grow_left * width),
                right + int(box_rule.grow_right * width),
            ]
        )
        sizes.append((height, width))
    return _Placement(boxes, sizes)


def _split_gap(split: GapSplit, upper: _Placement, lower: _Placement) -> None:
    """Order of the released code: extend from the gap first, then meet at its midpoint."""
    upper_bottom, lower_top = upper.edge("bottom"), lower.edge("top")
    lower.set_edge("bottom", lower.edge("bottom") + int(split.extend_lower_bottom * (lower_top - upper_bottom)))
    midpoint = int(0.5 * (lower_top + upper_bottom))
    upper.set_edge("bottom", midpoint)
    lower.set_edge("top", midpoint)


def _masks_of_one_map(label_map: np.ndarray, spec: RegionSpec, order: list) -> tuple[np.ndarray, dict[str, str]]:
    """R×H×W masks of one label map and, per empty region, why it is empty."""
    parts = _part_extents(label_map, {label for rule in spec.regions for box in rule.boxes for label in box.labels})
    rules = {rule.name: rule for rule in spec.regions}
    placed: dict[str, _Placement | str] = {}
    for kind, step in order:
        if kind == "region":
            rule = rules[step]
            placement = _place(rule, label_map, parts)
            for edge, link in rule.links():
                if isinstance(placement, str):
                    break
                target = placed[link.region]
                if isinstance(target, str):
                    placement = f"its {edge} links to region {link.region!r}, which is empty"
                else:
                    placement.set_edge(edge, target.edge(link.edge) + int(link.offset * target.size(link.edge)))
            placed[step] = placement
        else:
            split = spec.gap_splits[step]
            upper, lower = placed[split.upper], placed[split.lower]
            if isinstance(upper, str) or isinstance(lower, str):
                for member, other in ((split.upper, split.lower), (split.lower, split.upper)):
                    if not isinstance(placed[member], str):
                        placed[member] = f"its gap split with region {other!r} needs that region, which is empty"
            else:
                _split_gap(split, upper, lower)

    height, width = label_map.shape
    rows, cols = np.arange(height), np.arange(width)
    masks = np.zeros((len(spec.regions), height, width), dtype=bool)
    for r, rule in enumerate(spec.regions):
        placement = placed[rule.name]
        if isinstance(placement, str):
            continue
        top, bottom, left, right = np.array(placement.boxes).T[:, :, None]  # comparing clips to the image
        in_rows = (rows >= top) & (rows < bottom)
        in_cols = (cols >= left) & (cols < right)
        masks[r] = (in_rows[:, :, None] & in_cols[:, None, :]).any(axis=0)
        if placement.pixels is not None:
            masks[r] &= placement.pixels
    claimed = masks[0].copy()  # earlier regions win; a loop over regions is 30× faster than ufunc.accumulate
    for mask in masks[1:]:
        mask &= ~claimed
        claimed |= mask

    reasons = {rule.name: reason for rule in spec.regions if isinstance(reason := placed[rule.name], str)}
    for rule, mask in zip(spec.regions, masks):
        if rule.name not in reasons and not mask.any():
            reasons[rule.name] = (
                "it covers no pixel once clipped to the image and cut by its bounds and by earlier regions"
            )
    return masks, reasons


def region_masks(label_maps: np.ndarray, spec: RegionSpec = PAPER_REGIONS) -> RegionMasks:
    """Masks of the spec's regions on an H×W label map (R×H×W) or a batch N×H×W (N×R×H×W).

    Missing regions get an empty mask and one ``warnings.warn`` per region and reason,
    listing the images of a batch it concerns."""
    maps = np.asarray(label_maps)
    if maps.ndim not in (2, 3) or not np.issubdtype(maps.dtype, np.integer):
        raise ValueError(f"label maps must be integer H×W or N×H×W arrays, got {maps.dtype} {maps.shape}")
    batch = maps if maps.ndim == 3 else maps[None]
    order = _evaluation_order(spec)
    masks = np.zeros((batch.shape[0], len(spec.regions), *batch.shape[1:]), dtype=bool)
    empty: dict[tuple[str, str], list[int]] = {}
    for n, label_map in enumerate(batch):
        masks[n], reasons = _masks_of_one_map(label_map, spec, order)
        for region, reason in reasons.items():
            empty.setdefault((region, reason), []).append(n)
    for (region, reason), images in empty.items():
        where = ""
        if maps.ndim == 3:
            shown = ", ".join(map(str, images[:10])) + (f" and {len(images) - 10} more" if len(images) > 10 else "")
            where = f" in image(s) {shown}"
        warnings.warn(f"region {region!r} is empty{where}: {reason}; its scores will be NaN", stacklevel=2)
    return RegionMasks(tuple(rule.name for rule in spec.regions), masks if maps.ndim == 3 else masks[0])
