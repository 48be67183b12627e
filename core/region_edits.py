"""The editing operations the Regions page offers, as pure functions ``RegionSpec -> RegionSpec``.

Each returns a new, validated spec (the frozen dataclasses check themselves), or raises
``RegionSpecError`` and leaves the caller's spec as it was. Removing a region also drops what
named it (edge links, gap splits), so an edit never leaves a dangling reference behind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from core.errors import RegionSpecError
from core.regions import EDGES, BoxRule, GapSplit, RegionRule, RegionSpec, bundled_region_specs

GROW_SIDES = tuple(field.name for field in dataclasses.fields(BoxRule) if field.name.startswith("grow_"))
TEMPLATE_SPEC = "extended"  # the bundled spec whose regions the page offers to add
NEW_BOX_LABELS = (1,)  # face skin: present on every parsed face, so a new box is never empty


def _checked(index: int, count: int, what: str) -> int:
    """Positions come from the page's widgets; a negative one would silently pick from the end."""
    if not 0 <= index < count:
        raise IndexError(f"{what} #{index + 1} does not exist; there are {count}")
    return index


def _region(spec: RegionSpec, index: int) -> RegionRule:
    return spec.regions[_checked(index, len(spec.regions), "region")]


def _replaced(items: tuple, index: int, what: str, **changes) -> tuple:
    """``items`` with item ``index`` rebuilt with ``changes`` (and so validated again)."""
    at = _checked(index, len(items), what)
    return (*items[:at], dataclasses.replace(items[at], **changes), *items[at + 1 :])


def _without(items: tuple, index: int, what: str) -> tuple:
    at = _checked(index, len(items), what)
    return items[:at] + items[at + 1 :]


def _with_region(spec: RegionSpec, index: int, **changes) -> RegionSpec:
    return dataclasses.replace(spec, regions=_replaced(spec.regions, index, "region", **changes))


def _with_box(spec: RegionSpec, index: int, box: int, **changes) -> RegionSpec:
    return _with_region(spec, index, boxes=_replaced(_region(spec, index).boxes, box, "box", **changes))


def move_region(spec: RegionSpec, index: int, by: int) -> RegionSpec:
    """Order is overlap priority (earlier wins), so moving is how a user settles a contested pixel."""
    regions = list(_without(spec.regions, index, "region"))
    regions.insert(_checked(index + by, len(spec.regions), "region"), spec.regions[index])
    return dataclasses.replace(spec, regions=tuple(regions))


def remove_region(spec: RegionSpec, index: int) -> tuple[RegionSpec, tuple[str, ...]]:
    """The spec without region ``index`` nor the links and splits that named it, and what was dropped
    (e.g. "nose's top link", "gap split nose/mouth"), so the user learns what else changed."""
    name = _region(spec, index).name
    dropped, regions = [], []
    for rule in _without(spec.regions, index, "region"):
        unlinked = {edge: None for edge, link in rule.links() if link.region == name}
        dropped += [f"{rule.name}'s {edge} link" for edge in unlinked]
        regions.append(dataclasses.replace(rule, **unlinked))
    splits = [split for split in spec.gap_splits if name not in (split.upper, split.lower)]
    dropped += [f"gap split {s.upper}/{s.lower}" for s in spec.gap_splits if s not in splits]
    return dataclasses.replace(spec, regions=tuple(regions), gap_splits=tuple(splits)), tuple(dropped)


def region_templates(spec: RegionSpec) -> tuple[RegionRule, ...]:
    """The template regions ``spec`` lacks; each keeps its links, so one may need a region removed earlier."""
    present = {rule.name for rule in spec.regions}
    return tuple(rule for rule in bundled_region_specs()[TEMPLATE_SPEC].regions if rule.name not in present)


def add_region(spec: RegionSpec, rule: RegionRule) -> RegionSpec:
    """Added last: lowest overlap priority, so it never takes pixels from the regions already there."""
    return dataclasses.replace(spec, regions=(*spec.regions, rule))


def add_box(spec: RegionSpec, index: int) -> RegionSpec:
    return _with_region(spec, index, boxes=(*_region(spec, index).boxes, BoxRule(NEW_BOX_LABELS)))


def remove_box(spec: RegionSpec, index: int, box: int) -> RegionSpec:
    return _with_region(spec, index, boxes=_without(_region(spec, index).boxes, box, "box"))


def add_split(spec: RegionSpec, upper: str, lower: str) -> RegionSpec:
    return dataclasses.replace(spec, gap_splits=(*spec.gap_splits, GapSplit(upper, lower)))


def remove_split(spec: RegionSpec, index: int) -> RegionSpec:
    return dataclasses.replace(spec, gap_splits=_without(spec.gap_splits, index, "gap split"))


def set_box_labels(spec: RegionSpec, index: int, box: int, labels: Sequence[int]) -> RegionSpec:
    """Sorted, so the same parts give the same spec id whatever order they were picked in."""
    return _with_box(spec, index, box, labels=tuple(sorted(labels)))


def set_box_growth(spec: RegionSpec, index: int, box: int, side: str, fraction: float) -> RegionSpec:
    if side not in GROW_SIDES:
        raise RegionSpecError(f"box: side must be one of {GROW_SIDES}, got {side!r}")
    return _with_box(spec, index, box, **{side: fraction})


def set_pixel_labels(spec: RegionSpec, index: int, labels: Sequence[int]) -> RegionSpec:
    """Sorted for the same reason as ``set_box_labels``."""
    return _with_region(spec, index, labels=tuple(sorted(labels)))


def set_link_offset(spec: RegionSpec, index: int, edge: str, offset: float) -> RegionSpec:
    rule = _region(spec, index)
    link = getattr(rule, edge) if edge in EDGES else None
    if link is None:
        linked = [edge for edge, _ in rule.links()]
        raise RegionSpecError(f"region {rule.name!r} has no {edge} link to offset; its linked edges: {linked}")
    return _with_region(spec, index, **{edge: dataclasses.replace(link, offset=offset)})


def set_split_extension(spec: RegionSpec, index: int, fraction: float) -> RegionSpec:
    return dataclasses.replace(
        spec, gap_splits=_replaced(spec.gap_splits, index, "gap split", extend_lower_bottom=fraction)
    )


def rename(spec: RegionSpec, name: str) -> RegionSpec:
    return dataclasses.replace(spec, name=name)


def without_bundled_name(spec: RegionSpec) -> RegionSpec:
    """An edited bundled spec named like it (say "paper") would pass for the bundled one in tables and
    URLs, so it becomes "paper (edited)"; the bundled spec itself and other names stay as they are."""
    bundled = bundled_region_specs()
    if spec.name in bundled and spec != bundled[spec.name]:
        return rename(spec, f"{spec.name} (edited)")
    return spec
