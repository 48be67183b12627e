"""Region masks checked to the pixel against hand arithmetic and against a separate
transcription of the paper's released code."""

import dataclasses
import json
import warnings

import numpy as np
import pytest
from skimage.measure import label as skimage_label

from core.errors import RegionSpecError
from core.regions import (
    PAPER_REGIONS,
    BoxRule,
    EdgeLink,
    GapSplit,
    RegionRule,
    RegionSpec,
    SpecCaps,
    bundled_region_specs,
    check_caps,
    region_masks,
    spec_id,
)

SIZE = 224
# (label, first row, last row, first col, last col), inclusive, drawn in this order.
HAND_PARTS = (
    (1, 30, 200, 30, 194),  # face skin
    (10, 0, 29, 30, 194),  # hair
    (2, 60, 64, 50, 80),  # right brow (image-left)
    (4, 70, 80, 55, 78),  # right eye
    (3, 60, 64, 144, 174),  # left brow
    (5, 70, 80, 146, 169),  # left eye
    (6, 85, 130, 97, 127),  # nose
    (7, 150, 157, 85, 139),  # upper lip
    (8, 158, 160, 90, 134),  # inner mouth
    (9, 161, 170, 88, 136),  # lower lip
)


def draw(parts, size=SIZE):
    label_map = np.zeros((size, size), np.uint8)
    for label, row0, row1, col0, col1 in parts:
        label_map[row0 : row1 + 1, col0 : col1 + 1] = label
    return label_map


def rect(top, bottom, left, right, size=SIZE):
    """Half-open box, as a numpy slice [top:bottom, left:right]."""
    mask = np.zeros((size, size), bool)
    mask[top:bottom, left:right] = True
    return mask


def masks_by_name(result):
    return dict(zip(result.names, result.masks))


# Hand arithmetic for HAND_PARTS with PAPER_REGIONS (part boxes: w = max col - min col, h likewise):
# right box {2,4}: x 50..80, y 60..80, w=30, h=20
#   x1 = 50 - int(0.2*30)=50-6=44, x2 = 80 + int(0.1*30)=80+3=83, y1 = 60-int(0.2*20)=56, y2 = 80+4=84
# left box {3,5}: x 144..174, y 60..80, w=30, h=20
#   x1 = 144 - int(0.1*30)=141, x2 = 174 + int(0.2*30)=180, y1 = 56, y2 = 84
# nose {6}: x 97..127, y 85..130; top = min(56, 56) + int(0.3*min(20, 20)) = 56 + 6 = 62
# mouth {7,9}: x 85..139, y 150..170
#   y2 = 170 + int(0.5*(150-130)) = 180; split: mouth y1 = nose y2 = int(0.5*(150+130)) = 140
#   x1 = 85 - int(0.2*54)=85-10=75, x2 = 139 + 10 = 149; y2 = min(180, 224) = 180
HAND_EYE = rect(56, 84, 44, 83) | rect(56, 84, 141, 180)
HAND_NOSE = rect(62, 140, 97, 127)
HAND_MOUTH = rect(140, 180, 75, 149)


def released_code_masks(segmap):
    """The released extract_region_coefficients.py arithmetic on one label map, written out
    independently: each label labelled on its own, plain numpy slices, its eye/nose rule."""

    def extent(label):  # (y1, x1, y2, x2) of the label's largest component
        components = skimage_label(segmap == label)
        largest = components == np.argmax(np.bincount(components.ravel())[1:]) + 1
        points = np.argwhere(largest)
        return (*points.min(axis=0), *points.max(axis=0))

    def union(labels):
        extents = np.array([extent(label) for label in labels])
        return extents[:, 0].min(), extents[:, 1].min(), extents[:, 2].max(), extents[:, 3].max()

    ry1, rx1, ry2, rx2 = union([2, 4])
    rw, rh = rx2 - rx1, ry2 - ry1
    ry1, rx1, ry2, rx2 = ry1 - int(0.2 * rh), rx1 - int(0.2 * rw), ry2 + int(0.2 * rh), rx2 + int(0.1 * rw)
    ly1, lx1, ly2, lx2 = union([3, 5])
    lw, lh = lx2 - lx1, ly2 - ly1
    ly1, lx1, ly2, lx2 = ly1 - int(0.2 * lh), lx1 - int(0.1 * lw), ly2 + int(0.2 * lh), lx2 + int(0.2 * lw)
    ny1, nx1, ny2, nx2 = extent(6)
    ny1 = min(ry1, ly1) + int(0.3 * min(rh, lh))
    my1, mx1, my2, mx2 = union([7, 9])
    my2 += int(0.5 * (my1 - ny2))
    my1 = ny2 = int(0.5 * (my1 + ny2))
    mx1, mx2 = mx1 - int(0.2 * (mx2 - mx1)), mx2 + int(0.2 * (mx2 - mx1))
    my2 = min(my2, segmap.shape[0])
    eye, nose, mouth = (np.zeros(segmap.shape, bool) for _ in range(3))
    eye[ry1:ry2, rx1:rx2] = True
    eye[ly1:ly2, lx1:lx2] = True
    nose[ny1:ny2, nx1:nx2] = True
    mouth[my1:my2, mx1:mx2] = True
    nose[eye & nose & ~mouth] = False  # its per-pixel loop: (1, 1, 0) -> (1, 0, 0)
    return eye, nose, mouth


def jittered_map(rng):
    """HAND_PARTS moved and resized a little, plus small stray blobs (ignored, unless a part
    drawn later buried the real one: both implementations must then agree on the odd box)."""
    parts = []
    for label, row0, row1, col0, col1 in HAND_PARTS:
        if label in (1, 10):
            parts.append((label, row0, row1, col0, col1))
            continue
        dy, dx = rng.integers(-6, 7, size=2)
        grow = rng.integers(-3, 4, size=4)
        parts.append(
            (
                label,
                row0 + dy + grow[0],
                max(row0 + dy + grow[0], row1 + dy + grow[1]),
                col0 + dx + grow[2],
                max(col0 + dx + grow[2], col1 + dx + grow[3]),
            )
        )
    if rng.random() < 0.5:  # pull the nose down onto the lips: small or negative gaps
        parts = [(label, r0, r1 + (15 if label == 6 else 0), c0, c1) for label, r0, r1, c0, c1 in parts]
    label_map = draw(parts)
    for _ in range(6):
        row, col = rng.integers(0, SIZE - 3, size=2)
        label_map[row : row + 2, col : col + 2] = rng.integers(2, 10)
    return label_map


def test_paper_regions_match_hand_arithmetic():
    masks = masks_by_name(region_masks(draw(HAND_PARTS), PAPER_REGIONS))
    assert list(masks) == ["eye", "nose", "mouth"]
    assert np.array_equal(masks["eye"], HAND_EYE)
    assert np.array_equal(masks["nose"], HAND_NOSE)
    assert np.array_equal(masks["mouth"], HAND_MOUTH)


def test_eye_wins_where_it_meets_the_nose():
    wide_nose = [(6, 85, 130, 70, 150) if part[0] == 6 else part for part in HAND_PARTS]
    masks = masks_by_name(region_masks(draw(wide_nose), PAPER_REGIONS))
    # nose x 70..150 -> cols 70:150, rows 62:140 as before; the eye boxes cut into its top corners
    assert np.array_equal(masks["eye"], HAND_EYE)
    assert np.array_equal(masks["nose"], rect(62, 140, 70, 150) & ~HAND_EYE)
    assert (masks["nose"] & HAND_EYE).sum() == 0 and (rect(62, 140, 70, 150) & HAND_EYE).sum() > 0


def test_largest_component_with_full_connectivity():
    label_map = draw(HAND_PARTS)
    label_map[200:203, 5:8] = 4  # stray right-eye blob: smaller, ignored
    label_map[10:13, 200:203] = 6  # stray nose blob, ignored
    label_map[215:218, 215:218] = 7  # stray lip blob, ignored
    masks = masks_by_name(region_masks(label_map, PAPER_REGIONS))
    assert np.array_equal(masks["eye"], HAND_EYE)
    assert np.array_equal(masks["nose"], HAND_NOSE)
    assert np.array_equal(masks["mouth"], HAND_MOUTH)

    label_map[131, 128] = 6  # touches the nose's corner (130, 127) diagonally only: joins it
    masks = masks_by_name(region_masks(label_map, PAPER_REGIONS))
    # nose x 97..128, y 85..131; mouth y2 = 170 + int(0.5*(150-131)) = 170+9 = 179;
    # split = int(0.5*(150+131)) = int(140.5) = 140
    assert np.array_equal(masks["nose"], rect(62, 140, 97, 128))
    assert np.array_equal(masks["mouth"], rect(140, 179, 75, 149))


def test_missing_mouth_gives_empty_masks_and_warnings():
    no_lips = [part for part in HAND_PARTS if part[0] not in (7, 9)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        masks = masks_by_name(region_masks(draw(no_lips), PAPER_REGIONS))
    messages = [str(w.message) for w in caught]
    assert not masks["mouth"].any()
    assert not masks["nose"].any()  # its bottom is defined by the gap to the mouth
    assert np.array_equal(masks["eye"], HAND_EYE)
    assert any("'mouth'" in m and "7 (upper lip)" in m and "9 (lower lip)" in m for m in messages)
    assert any("'nose'" in m and "'mouth'" in m for m in messages)

    no_lower_lip = [part for part in HAND_PARTS if part[0] != 9]
    with pytest.warns(UserWarning) as recorded:
        region_masks(draw(no_lower_lip), PAPER_REGIONS)
    expected = "region 'mouth' is empty: label 9 (lower lip) not in the label map; its scores will be NaN"
    assert expected in [str(w.message) for w in recorded]


def test_growth_past_the_image_edge_clips_and_shrinking_to_nothing_is_empty():
    corner = [part for part in HAND_PARTS if part[0] not in (2, 4)] + [(2, 2, 5, 1, 20), (4, 8, 22, 3, 18)]
    masks = masks_by_name(region_masks(draw(corner), PAPER_REGIONS))
    # right box: x 1..20, y 2..22, w=19, h=20: x1 = 1-int(3.8) = -2, x2 = 20+int(1.9) = 21,
    # y1 = 2-4 = -2, y2 = 22+4 = 26 -> clipped to rows 0:26, cols 0:21
    assert np.array_equal(masks["eye"], rect(0, 26, 0, 21) | rect(56, 84, 141, 180))
    # the nose uses the unclipped top: min(-2, 56) + int(0.3*min(20, 20)) = 4
    assert np.array_equal(masks["nose"], rect(4, 140, 97, 127))

    thin_nose = dataclasses.replace(
        PAPER_REGIONS,
        regions=(
            PAPER_REGIONS.regions[0],
            dataclasses.replace(PAPER_REGIONS.regions[1], boxes=(BoxRule((6,), grow_left=-0.75, grow_right=-0.75),)),
            PAPER_REGIONS.regions[2],
        ),
    )
    # nose w=30: x1 = 97-int(-22.5) = 119 > x2 = 127+int(-22.5) = 105
    with pytest.warns(UserWarning, match="region 'nose' is empty: it covers no pixel"):
        masks = masks_by_name(region_masks(draw(HAND_PARTS), thin_nose))
    assert not masks["nose"].any()
    assert np.array_equal(masks["mouth"], HAND_MOUTH)


def test_extended_regions_follow_their_links():
    specs = bundled_region_specs()
    extended = specs["extended"]
    label_map = draw(HAND_PARTS)
    masks = masks_by_name(region_masks(label_map, extended))
    assert list(masks) == ["eye", "nose", "mouth", "forehead", "cheeks", "chin", "hair"]
    assert np.array_equal(masks["eye"], HAND_EYE)
    assert np.array_equal(masks["nose"], HAND_NOSE)
    assert np.array_equal(masks["mouth"], HAND_MOUTH)
    # forehead: skin above the eye top (56): rows 30..55, cols 30..194
    assert np.array_equal(masks["forehead"], rect(30, 56, 30, 195))
    # cheeks: skin from the eye bottom (84) to the mouth bottom (180), less the nose and mouth
    # boxes and the nose's last column (127: outside its box, x2 exclusive, and not skin)
    cheeks = rect(84, 180, 30, 195) & ~rect(62, 140, 97, 127) & ~rect(140, 180, 75, 149) & ~rect(85, 131, 127, 128)
    assert np.array_equal(masks["cheeks"], cheeks)
    # chin: skin from the extended mouth bottom (180) down: rows 180..200
    assert np.array_equal(masks["chin"], rect(180, 201, 30, 195))
    assert np.array_equal(masks["hair"], rect(0, 30, 30, 195))

    bald = [part for part in HAND_PARTS if part[0] != 10]
    with pytest.warns(UserWarning, match=r"region 'hair' is empty: none of its labels 10 \(hair\)"):
        assert not masks_by_name(region_masks(draw(bald), extended))["hair"].any()


def test_label_region_bounded_by_edges_with_offsets():
    spec = RegionSpec(
        (
            RegionRule("nose", boxes=(BoxRule((6,)),)),
            # skin beside the nose on the image-left, from the nose's top to its bottom,
            # ending half a nose width (int(0.5*30) = 15) left of the nose: cols < 97-15 = 82
            RegionRule(
                "side",
                labels=(1,),
                top=EdgeLink("nose", "top"),
                bottom=EdgeLink("nose", "bottom"),
                right=EdgeLink("nose", "left", -0.5),
            ),
        )
    )
    masks = masks_by_name(region_masks(draw(HAND_PARTS), spec))
    # nose box rows 85:130 (its last row is outside, as in the released code), cols 97:127
    assert np.array_equal(masks["nose"], rect(85, 130, 97, 127))
    assert np.array_equal(masks["side"], rect(85, 130, 30, 82))


def test_nose_overlapping_the_lips_truncates_toward_zero():
    # the nose (rows 85..153) is drawn over the upper lip, whose top stays at row 150 beside it
    parts = [part for part in HAND_PARTS if part[0] != 6] + [(6, 85, 153, 97, 127)]
    label_map = draw(parts)
    masks = masks_by_name(region_masks(label_map, PAPER_REGIONS))
    # gap = 150 - 153 = -3: mouth y2 = 170 + int(-1.5) = 169 (flooring would give 168);
    # split = int(0.5*(150+153)) = int(151.5) = 151
    assert np.array_equal(masks["nose"], rect(62, 151, 97, 127))
    assert np.array_equal(masks["mouth"], rect(151, 169, 75, 149))
    assert all(np.array_equal(ours, theirs) for ours, theirs in zip(masks.values(), released_code_masks(label_map)))


@pytest.mark.parametrize("seed", range(25))
def test_paper_regions_equal_the_released_code(seed):
    label_map = jittered_map(np.random.default_rng(seed))
    eye, nose, mouth = released_code_masks(label_map)
    assert not (eye & mouth).any()  # where the released code leaves overlaps, ours would differ
    result = masks_by_name(region_masks(label_map, PAPER_REGIONS))
    assert np.array_equal(result["eye"], eye)
    assert np.array_equal(result["nose"], nose)
    assert np.array_equal(result["mouth"], mouth)


def test_equal_components_break_ties_like_the_released_code():
    label_map = draw(HAND_PARTS)
    label_map[85:131, 97:128] = 1
    label_map[90:100, 100:110] = 6  # two noses of 100 pixels each:
    label_map[95:105, 140:150] = 6  # the first in raster order wins
    expected_nose = released_code_masks(label_map)[1]
    assert np.array_equal(masks_by_name(region_masks(label_map, PAPER_REGIONS))["nose"], expected_nose)
    assert expected_nose[80, 100] and not expected_nose[:, 140:].any()


def test_regions_never_overlap():
    rng = np.random.default_rng(99)
    maps = np.stack([draw(HAND_PARTS)] + [jittered_map(rng) for _ in range(8)])
    for spec in bundled_region_specs().values():
        masks = region_masks(maps, spec).masks
        assert masks.sum(axis=1).max() == 1


def test_batch_equals_single_maps():
    rng = np.random.default_rng(7)
    no_lips = draw([part for part in HAND_PARTS if part[0] not in (7, 9)])
    maps = np.stack([draw(HAND_PARTS), jittered_map(rng), no_lips, jittered_map(rng)])
    spec = bundled_region_specs()["extended"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = region_masks(maps, spec)
        singles = [region_masks(label_map, spec) for label_map in maps]
    assert batch.masks.shape == (4, 7, SIZE, SIZE) and batch.masks.dtype == bool
    for n, single in enumerate(singles):
        assert single.names == batch.names
        assert np.array_equal(batch.masks[n], single.masks)
    assert any("'mouth' is empty in image(s) 2:" in str(w.message) for w in caught)


def test_json_round_trip_and_ids():
    specs = bundled_region_specs()
    assert specs["paper"] == PAPER_REGIONS
    for spec in specs.values():
        assert RegionSpec.from_json(spec.to_json()) == spec
        assert spec_id(RegionSpec.from_json(spec.to_json())) == spec_id(spec)
    assert spec_id(specs["paper"]) != spec_id(specs["extended"])
    edited = dataclasses.replace(
        PAPER_REGIONS,
        regions=(
            PAPER_REGIONS.regions[0],
            dataclasses.replace(PAPER_REGIONS.regions[1], top=EdgeLink("eye", "top", 0.35)),
            PAPER_REGIONS.regions[2],
        ),
    )
    assert spec_id(edited) != spec_id(PAPER_REGIONS)
    # A list of labels on purpose: BoxRule normalises it to the tuple its annotation promises.
    as_ints = RegionSpec((RegionRule("nose", boxes=(BoxRule([6], grow_left=0),)),))  # type: ignore[arg-type]
    as_floats = RegionSpec((RegionRule("nose", boxes=(BoxRule((6,), grow_left=0.0),)),))
    assert as_ints == as_floats and spec_id(as_ints) == spec_id(as_floats)
    assert len(spec_id(PAPER_REGIONS)) == 12 and int(spec_id(PAPER_REGIONS), 16) >= 0


def _paper_dict():
    return json.loads(PAPER_REGIONS.to_json())


def _edited(edit):
    data = _paper_dict()
    edit(data)
    return json.dumps(data)


@pytest.mark.parametrize(
    "text, message",
    [
        (_edited(lambda d: d["regions"][0]["boxes"][0].update(labels=[2, 11])), "unknown label 11"),
        (_edited(lambda d: d["regions"].append({"name": "x", "labels": [-1]})), "unknown label -1"),
        (_edited(lambda d: d["regions"][1]["top"].update(region="brow")), "unknown region 'brow'"),
        (_edited(lambda d: d["regions"][1].update(name="eye")), r"repeated: \['eye'\]"),
        (_edited(lambda d: d["regions"][0].update(top={"region": "nose", "edge": "bottom"})), "cycle"),
        (_edited(lambda d: d["regions"][0].update(top={"region": "eye", "edge": "bottom"})), "cycle"),
        (_edited(lambda d: d["regions"][1].update(bottom={"region": "mouth", "edge": "top"})), "cycle"),
        (_edited(lambda d: d["gap_splits"][0].update(lower="chin")), "unknown region 'chin'"),
        (_edited(lambda d: d["regions"][1]["top"].update(edge="middle")), "edge must be one of"),
        (_edited(lambda d: d["regions"][2].update(labels=[1])), "not both"),
        (_edited(lambda d: d["regions"][2].update(boxes=[])), "not neither"),
        (_edited(lambda d: d["regions"][2]["boxes"][0].update(grow_lft=0.2)), r"unknown key\(s\) \['grow_lft'\]"),
        (_edited(lambda d: d["regions"][2]["boxes"][0].update(grow_left="0.2")), "expected a finite number"),
        (_edited(lambda d: d["regions"][2]["boxes"][0].pop("labels")), "labels"),
        ('{"regions": [', "not valid JSON"),
        ('{"regions": []}', "at least one region"),
    ],
)
def test_bad_specs_raise_region_spec_error(text, message):
    with pytest.raises(RegionSpecError, match=message):
        RegionSpec.from_json(text)


def test_specs_are_validated_when_built_in_code_too():
    with pytest.raises(RegionSpecError, match="cycle"):
        RegionSpec(
            (
                RegionRule("a", labels=(1,), top=EdgeLink("b", "bottom")),
                RegionRule("b", labels=(1,), top=EdgeLink("a", "bottom")),
            )
        )
    with pytest.raises(RegionSpecError, match="upper and lower"):
        GapSplit("nose", "nose")
    with pytest.raises(ValueError, match="integer"):
        region_masks(draw(HAND_PARTS).astype(float), PAPER_REGIONS)


def _spec_text(regions: int, name: str = "s", region_name=lambda i: f"r{i}") -> str:
    rules = [{"name": region_name(i), "labels": [1]} for i in range(regions)]
    return json.dumps({"name": name, "regions": rules}, ensure_ascii=False)


def test_a_spec_over_its_caps_is_refused_in_one_short_line_before_it_is_built():
    huge_name = "x" * 20_000_000
    text = _spec_text(1, name=huge_name)
    with pytest.raises(RegionSpecError) as refused:
        RegionSpec.from_json(text)  # the default caps: 64 KB of JSON
    assert str(refused.value) == "region spec is 19531 KB of JSON; this server takes specs of at most 64 KB"
    with pytest.raises(RegionSpecError) as refused:  # the same spec as bytes (an upload) is measured alike
        RegionSpec.from_json(text.encode())
    assert "19531 KB" in str(refused.value)
    roomy = SpecCaps(spec_bytes=1 << 30)  # a server that takes large texts still caps names and regions
    with pytest.raises(RegionSpecError, match="its name is 20000000 characters long; names may have at most 64"):
        RegionSpec.from_json(text, caps=roomy)
    with pytest.raises(RegionSpecError, match=r"region #2's name is 65 characters long"):
        RegionSpec.from_json(_spec_text(2, region_name=lambda i: "y" * (64 + i)))
    with pytest.raises(RegionSpecError, match="has 33 regions; this server takes at most 32"):
        RegionSpec.from_json(_spec_text(33))
    assert len(RegionSpec.from_json(_spec_text(32)).regions) == 32
    # Multi-byte characters count as their UTF-8 bytes: 40 000 'é' are 80 000 bytes > 64 KB.
    with pytest.raises(RegionSpecError, match="78 KB of JSON"):
        RegionSpec.from_json(_spec_text(1, name="é" * 40_000), caps=SpecCaps(name_chars=10**6))
    with pytest.raises(RegionSpecError, match="has 3 regions; this server takes at most 2"):
        RegionSpec.from_json(_spec_text(3), caps=SpecCaps(regions=2))


def test_check_caps_measures_an_edited_spec_and_errors_quote_little_of_a_strangers_text():
    spec = bundled_region_specs()["extended"]
    assert check_caps(spec) is spec and check_caps(PAPER_REGIONS, SpecCaps(regions=3)) is PAPER_REGIONS
    with pytest.raises(RegionSpecError, match="has 7 regions; this server takes at most 6"):
        check_caps(spec, SpecCaps(regions=6))
    with pytest.raises(RegionSpecError, match="its name is 65 characters long"):
        check_caps(dataclasses.replace(spec, name="n" * 65))
    with pytest.raises(RegionSpecError, match="of JSON; this server takes specs of at most 100 bytes"):
        check_caps(PAPER_REGIONS, SpecCaps(spec_bytes=100))
    # Unbounded (caps=None, as for trusted files): a long bad value is quoted in a few dozen characters.
    long_label = json.dumps({"regions": [{"name": "r", "labels": ["z" * 100_000]}]})
    with pytest.raises(RegionSpecError) as refused:
        RegionSpec.from_json(long_label, caps=None)
    assert "unknown label 'zzzz" in str(refused.value) and len(str(refused.value)) < 400
    with pytest.raises(RegionSpecError) as refused:
        RegionSpec(
            (RegionRule("w" * 100_000, labels=(1,)), RegionRule("v", labels=(1,), top=EdgeLink("q" * 10**5, "top")))
        )
    assert "links to unknown region 'qqq" in str(refused.value) and len(str(refused.value)) < 300


def test_checking_a_spec_does_not_compare_every_region_with_every_other():
    """Duplicate names and link targets were found with list.count and ``in list``: quadratic in the
    regions. Counted here by comparisons of names (str.__eq__ is not patchable, so names are a str
    subclass that counts): linear means a few per region."""
    compared = [0]

    class Name(str):
        __hash__ = str.__hash__

        def __eq__(self, other):
            compared[0] += 1
            return str.__eq__(self, other)

    count = 2000
    regions = [
        RegionRule(Name(f"r{i}"), labels=(1,), top=EdgeLink(Name(f"r{i - 1}"), "bottom") if i else None)
        for i in range(count)
    ]
    RegionSpec(tuple(regions))
    assert compared[0] < 10 * count
