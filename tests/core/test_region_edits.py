"""The Regions page's editing operations, against specs written out by hand."""

import pytest

from core import region_edits as edits
from core.errors import RegionSpecError
from core.regions import PAPER_REGIONS, BoxRule, EdgeLink, GapSplit, RegionRule, RegionSpec, bundled_region_specs

EYE = RegionRule(
    "eye",
    boxes=(
        BoxRule((2, 4), grow_left=0.2, grow_right=0.1, grow_top=0.2, grow_bottom=0.2),
        BoxRule((3, 5), grow_left=0.1, grow_right=0.2, grow_top=0.2, grow_bottom=0.2),
    ),
)
NOSE = RegionRule("nose", boxes=(BoxRule((6,)),), top=EdgeLink("eye", "top", 0.3))
MOUTH = RegionRule("mouth", boxes=(BoxRule((7, 9), grow_left=0.2, grow_right=0.2),))
HAIR = RegionRule("hair", labels=(10,))


def round_trips(spec: RegionSpec) -> RegionSpec:
    assert RegionSpec.from_json(spec.to_json()) == spec
    return spec


def test_the_hand_written_paper_spec_is_the_bundled_one():
    assert RegionSpec((EYE, NOSE, MOUTH), (GapSplit("nose", "mouth", 0.5),), "paper") == PAPER_REGIONS


def test_removing_a_region_drops_exactly_the_link_that_named_it():
    spec, dropped = edits.remove_region(PAPER_REGIONS, 0)
    assert dropped == ("nose's top link",)
    assert round_trips(spec) == RegionSpec(
        (RegionRule("nose", boxes=(BoxRule((6,)),)), MOUTH), (GapSplit("nose", "mouth", 0.5),), "paper"
    )


def test_removing_a_region_drops_its_gap_split_and_every_link_to_it():
    extended = bundled_region_specs()["extended"]
    spec, dropped = edits.remove_region(extended, 2)  # mouth
    assert dropped == ("cheeks's bottom link", "chin's top link", "gap split nose/mouth")
    assert [rule.name for rule in spec.regions] == ["eye", "nose", "forehead", "cheeks", "chin", "hair"]
    cheeks, chin = spec.regions[3], spec.regions[4]
    assert cheeks == RegionRule("cheeks", labels=(1,), top=EdgeLink("eye", "bottom"))
    assert chin == RegionRule("chin", labels=(1,))
    assert spec.gap_splits == () and spec.name == "extended"
    round_trips(spec)


def test_removing_a_region_nothing_names_drops_nothing_else():
    spec, dropped = edits.remove_region(PAPER_REGIONS, 1)  # nose: it links, nothing links to it; the split does
    assert dropped == ("gap split nose/mouth",)
    assert spec == RegionSpec((EYE, MOUTH), (), "paper")


def test_the_last_region_cannot_be_removed():
    only = RegionSpec((HAIR,))
    with pytest.raises(RegionSpecError, match="at least one region"):
        edits.remove_region(only, 0)


def test_moving_changes_priority_order_only():
    assert edits.move_region(PAPER_REGIONS, 0, 1).regions == (NOSE, EYE, MOUTH)
    assert edits.move_region(PAPER_REGIONS, 2, -1).regions == (EYE, MOUTH, NOSE)
    assert edits.move_region(PAPER_REGIONS, 0, 1).gap_splits == PAPER_REGIONS.gap_splits
    with pytest.raises(IndexError):
        edits.move_region(PAPER_REGIONS, 0, -1)  # would wrap around to the end
    with pytest.raises(IndexError):
        edits.move_region(PAPER_REGIONS, 2, 1)


def test_templates_are_the_extended_regions_the_spec_lacks_and_one_is_added_last():
    assert [rule.name for rule in edits.region_templates(PAPER_REGIONS)] == ["forehead", "cheeks", "chin", "hair"]
    spec = edits.add_region(PAPER_REGIONS, HAIR)
    assert spec.regions == (EYE, NOSE, MOUTH, HAIR)
    assert [rule.name for rule in edits.region_templates(spec)] == ["forehead", "cheeks", "chin"]
    round_trips(spec)


def test_a_template_whose_anchor_was_removed_is_refused():
    without_eye, _ = edits.remove_region(PAPER_REGIONS, 0)
    forehead = next(r for r in edits.region_templates(without_eye) if r.name == "forehead")
    with pytest.raises(RegionSpecError, match="unknown region 'eye'"):
        edits.add_region(without_eye, forehead)
    with pytest.raises(RegionSpecError, match="unique"):
        edits.add_region(PAPER_REGIONS, EYE)


def test_adding_and_removing_boxes():
    spec = edits.add_box(PAPER_REGIONS, 2)
    assert spec.regions[2].boxes == (BoxRule((7, 9), grow_left=0.2, grow_right=0.2), BoxRule((1,)))
    assert edits.remove_box(spec, 2, 1) == PAPER_REGIONS
    assert edits.remove_box(PAPER_REGIONS, 0, 0).regions[0].boxes == (EYE.boxes[1],)
    with pytest.raises(RegionSpecError, match="neither"):
        edits.remove_box(PAPER_REGIONS, 1, 0)  # the nose's only box
    with pytest.raises(RegionSpecError, match="not both"):
        edits.add_box(RegionSpec((HAIR,)), 0)  # a pixel region has no boxes
    with pytest.raises(IndexError):
        edits.remove_box(PAPER_REGIONS, 1, -1)


def test_adding_and_removing_gap_splits():
    with_hair = edits.add_region(PAPER_REGIONS, HAIR)
    spec = edits.add_split(with_hair, "hair", "eye")
    assert spec.gap_splits == (GapSplit("nose", "mouth", 0.5), GapSplit("hair", "eye", 0.5))
    round_trips(spec)
    assert edits.remove_split(spec, 1) == with_hair
    with pytest.raises(RegionSpecError, match="cycle"):  # the nose's top is tied to the eye it would move
        edits.add_split(PAPER_REGIONS, "eye", "nose")
    assert edits.remove_split(PAPER_REGIONS, 0).gap_splits == ()
    with pytest.raises(RegionSpecError, match="both 'eye'"):
        edits.add_split(PAPER_REGIONS, "eye", "eye")
    with pytest.raises(RegionSpecError, match="unknown region 'hair'"):
        edits.add_split(PAPER_REGIONS, "mouth", "hair")


def test_box_labels_are_sorted_and_may_not_be_empty():
    spec = edits.set_box_labels(PAPER_REGIONS, 2, 0, [9, 8, 7])
    assert spec.regions[2].boxes == (BoxRule((7, 8, 9), grow_left=0.2, grow_right=0.2),)
    assert edits.set_box_labels(PAPER_REGIONS, 2, 0, [9, 7]) == PAPER_REGIONS
    with pytest.raises(RegionSpecError, match="at least one label"):
        edits.set_box_labels(PAPER_REGIONS, 2, 0, [])
    with pytest.raises(RegionSpecError, match="unknown label 11"):
        edits.set_box_labels(PAPER_REGIONS, 2, 0, [11])


def test_growth_sets_one_side_of_one_box():
    assert edits.GROW_SIDES == ("grow_left", "grow_right", "grow_top", "grow_bottom")
    spec = edits.set_box_growth(PAPER_REGIONS, 0, 1, "grow_top", 0.5)
    assert spec.regions[0].boxes == (
        EYE.boxes[0],
        BoxRule((3, 5), grow_left=0.1, grow_right=0.2, grow_top=0.5, grow_bottom=0.2),
    )
    assert spec.regions[1:] == PAPER_REGIONS.regions[1:]
    with pytest.raises(RegionSpecError, match="side must be one of"):
        edits.set_box_growth(PAPER_REGIONS, 0, 1, "labels", 0.5)
    with pytest.raises(RegionSpecError, match="finite number"):
        edits.set_box_growth(PAPER_REGIONS, 0, 1, "grow_top", float("nan"))


def test_pixel_labels_link_offsets_split_extension_and_name():
    spec = edits.set_pixel_labels(edits.add_region(PAPER_REGIONS, HAIR), 3, [10, 1])
    assert spec.regions[3] == RegionRule("hair", labels=(1, 10))
    assert edits.set_link_offset(PAPER_REGIONS, 1, "top", -0.1).regions[1] == RegionRule(
        "nose", boxes=(BoxRule((6,)),), top=EdgeLink("eye", "top", -0.1)
    )
    with pytest.raises(RegionSpecError, match="no bottom link"):
        edits.set_link_offset(PAPER_REGIONS, 1, "bottom", 0.1)
    assert edits.set_split_extension(PAPER_REGIONS, 0, 1.0).gap_splits == (GapSplit("nose", "mouth", 1.0),)
    assert edits.rename(PAPER_REGIONS, "mine").name == "mine"


def test_an_edited_bundled_spec_loses_the_bundled_name():
    wider = edits.set_box_growth(PAPER_REGIONS, 2, 0, "grow_left", 0.5)
    assert wider.name == "paper"
    assert edits.without_bundled_name(wider) == edits.rename(wider, "paper (edited)")
    assert edits.without_bundled_name(PAPER_REGIONS) is PAPER_REGIONS
    mine = edits.rename(wider, "mine")
    assert edits.without_bundled_name(mine) is mine
    extended = bundled_region_specs()["extended"]
    assert edits.without_bundled_name(edits.move_region(extended, 0, 1)).name == "extended (edited)"


def test_a_chain_of_edits_gives_a_valid_spec_with_its_own_id():
    spec = PAPER_REGIONS
    for edit, args in (
        (edits.add_region, (HAIR,)),
        (edits.move_region, (3, -3)),
        (edits.add_box, (2,)),
        (edits.set_box_labels, (2, 1, [6, 1])),
        (edits.remove_region, (1,)),
    ):
        edited = edit(spec, *args)
        spec = edited[0] if isinstance(edited, tuple) else edited
    assert [rule.name for rule in spec.regions] == ["hair", "nose", "mouth"]
    assert spec.regions[1] == RegionRule("nose", boxes=(BoxRule((6,)), BoxRule((1, 6))))  # its eye link went
    assert round_trips(spec).gap_splits == PAPER_REGIONS.gap_splits
