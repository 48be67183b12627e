"""Parts from 68 landmarks checked to the pixel against an independent rasteriser (matplotlib's point-in-path
on pixel centres), the five points and the alignment check against hand computation."""

import numpy as np
import pytest
from matplotlib.path import Path as OutlinePath

from core import landmark_parts as lp
from core.parse import LAPA_LABELS

SIZE = 120


def hand_made_68() -> np.ndarray:
    """An upright face drawn by hand on a 120 px grid (iBUG order), jittered off the pixel grid so no
    pixel centre falls on an outline (where rasterisers may differ by convention)."""
    jaw = [(20 + 80 * (1 - np.cos(t)) / 2, 50 + 45 * np.sin(t)) for t in np.linspace(0, np.pi, 17)]
    brows = [(30, 38), (35, 35), (40, 34), (45, 35), (50, 37), (70, 37), (75, 35), (80, 34), (85, 35), (90, 38)]
    bridge = [(60, 45), (60, 52), (60, 59), (60, 66)]
    nostrils = [(53, 70), (56, 71), (60, 72), (64, 71), (67, 70)]
    eyes = []
    for cx in (40, 80):  # image-left eye centred at (40, 47), image-right at (80, 47)
        eyes += [(cx - 8, 47), (cx - 4, 44), (cx + 4, 44), (cx + 8, 47), (cx + 4, 50), (cx - 4, 50)]
    outer = [(46, 84), (50, 81), (55, 80), (60, 81), (65, 80), (70, 81), (74, 84), (70, 89), (65, 91)]
    outer += [(60, 92), (55, 91), (50, 89)]
    inner = [(49, 84), (55, 83), (60, 83.5), (65, 83), (71, 84), (65, 86), (60, 86.5), (55, 86)]
    points = np.array(jaw + brows + bridge + nostrils + eyes + outer + inner, dtype=np.float64)
    assert points.shape == (68, 2)
    return points + np.random.default_rng(0).uniform(-0.2, 0.2, points.shape) + 0.0137


def independent_draw(parts: list[tuple[int, np.ndarray]], size: int) -> np.ndarray:
    """Each polygon's pixels whose centre (x = column, y = row) lies inside it, later parts winning."""
    rows, cols = np.mgrid[0:size, 0:size]
    centres = np.column_stack([cols.ravel(), rows.ravel()]).astype(np.float64)
    label_map = np.zeros(size * size, dtype=np.uint8)
    for label, outline in parts:
        label_map[OutlinePath(outline).contains_points(centres)] = label
    return label_map.reshape(size, size)


def test_label_ids_are_lapa_ids():
    names = {
        lp.FACE_SKIN: "face skin",
        lp.RIGHT_BROW: "right brow",
        lp.LEFT_BROW: "left brow",
        lp.RIGHT_EYE: "right eye",
        lp.LEFT_EYE: "left eye",
        lp.NOSE: "nose",
        lp.UPPER_LIP: "upper lip",
        lp.INNER_MOUTH: "inner mouth",
        lp.LOWER_LIP: "lower lip",
    }
    assert all(LAPA_LABELS[i] == name for i, name in names.items())


def test_a_rectangle_fills_the_pixels_whose_centres_it_holds():
    # x from 2.5 to 5.5 and y from 1.5 to 3.5 hold the pixel centres of columns 3..5 and rows 2..3.
    label_map = lp.draw_polygons([(7, np.array([[2.5, 1.5], [5.5, 1.5], [5.5, 3.5], [2.5, 3.5]]))], 8)
    expected = np.zeros((8, 8), dtype=np.uint8)
    expected[2:4, 3:6] = 7
    np.testing.assert_array_equal(label_map, expected)


def test_polygons_are_drawn_to_the_pixel_later_parts_winning():
    rng = np.random.default_rng(1)
    parts = [(label, rng.uniform(5, 55, (7, 2)) + 0.01) for label in (1, 2, 3)]
    np.testing.assert_array_equal(lp.draw_polygons(parts, 60), independent_draw(parts, 60))


def test_the_label_map_is_its_parts_drawn_to_the_pixel():
    points = hand_made_68()
    label_map = lp.label_map_from_68(points, SIZE)
    np.testing.assert_array_equal(label_map, independent_draw(lp.part_polygons(points), SIZE))
    assert set(np.unique(label_map)) == set(range(10))  # hair (10) is left out
    # Centres of the hand-made parts carry their labels; right (person's) = image-left.
    for (x, y), label in {
        (40, 47): lp.RIGHT_EYE,
        (80, 47): lp.LEFT_EYE,
        (40, 36.5): lp.RIGHT_BROW,
        (80, 36.5): lp.LEFT_BROW,
        (60, 62): lp.NOSE,
        (60, 82): lp.UPPER_LIP,
        (60, 85): lp.INNER_MOUTH,
        (60, 89.5): lp.LOWER_LIP,
        (30, 70): lp.FACE_SKIN,
        (60, 20): lp.FACE_SKIN,  # forehead
        (60, 0): 0,  # above the forehead's estimated top (y ≈ 2)
        (5, 60): 0,
    }.items():
        assert label_map[round(y), round(x)] == label, (x, y)


def test_parts_are_the_documented_outlines():
    points = hand_made_68()
    parts = dict(lp.part_polygons(points))
    np.testing.assert_array_equal(parts[lp.RIGHT_EYE], points[36:42])
    np.testing.assert_array_equal(parts[lp.LEFT_EYE], points[42:48])
    np.testing.assert_array_equal(parts[lp.INNER_MOUTH], points[60:68])
    np.testing.assert_array_equal(parts[lp.UPPER_LIP], points[[48, 49, 50, 51, 52, 53, 54, 64, 63, 62, 61, 60]])
    np.testing.assert_array_equal(parts[lp.LOWER_LIP], points[[54, 55, 56, 57, 58, 59, 48, 60, 67, 66, 65, 64]])
    eyes = np.array([points[36:42].mean(0), points[42:48].mean(0)])
    iod = np.hypot(*(eyes[1] - eyes[0]))
    across = (eyes[1] - eyes[0]) / iod
    down = np.array([-across[1], across[0]])
    brow = parts[lp.RIGHT_BROW]
    np.testing.assert_array_equal(brow[:5], points[17:22])
    np.testing.assert_allclose(brow[5:], (points[17:22] + 0.12 * iod * down)[::-1])
    nose = parts[lp.NOSE]
    np.testing.assert_array_equal(nose[2:7], points[31:36])
    np.testing.assert_allclose(nose[[0, -1]], [points[27] - 0.1 * iod * across, points[27] + 0.1 * iod * across])


def test_the_forehead_closes_the_jaw_one_facial_third_above_the_brows():
    points = hand_made_68()
    outline = lp.face_outline(points)
    np.testing.assert_array_equal(outline[:17], points[:17])
    # By hand on the unjittered face: glabella = brows 21, 22 -> (60, 37); subnasale 33 at y 72, so one
    # third is 35 px and the top is at y = 2. The jitter moves points by under 0.25 px.
    top = outline[17:][np.argmin(outline[17:, 1])]
    assert abs(top[1] - 2) < 0.6 and abs(top[0] - 60) < 1.5
    # The arc ends next to the ears (points 16 and 0) and stays above them.
    assert np.hypot(*(outline[17] - points[16])) < 10 and np.hypot(*(outline[-1] - points[0])) < 10
    assert (outline[17:, 1] < points[[0, 16], 1].max()).all()


def test_a_quarter_turn_of_the_points_turns_the_map():
    """Parts follow the face's own frame: the 68 turned by 90° about the grid's centre give the map turned."""
    points = hand_made_68()
    turned = np.column_stack([points[:, 1], SIZE - 1 - points[:, 0]])  # (x, y) -> (y, n-1-x): np.rot90's turn
    np.testing.assert_array_equal(lp.label_map_from_68(turned, SIZE), np.rot90(lp.label_map_from_68(points, SIZE)))


def test_five_points_by_hand():
    points = hand_made_68()
    expected = np.array(
        [
            points[36:42].sum(0) / 6,
            points[42:48].sum(0) / 6,
            points[30],
            points[48],
            points[54],
        ]
    )
    np.testing.assert_allclose(lp.five_points(points), expected)
    # The unjittered hand-made eyes are hexagons centred at (40, 47) and (80, 47).
    np.testing.assert_allclose(lp.five_points(points)[:2], [[40, 47], [80, 47]], atol=0.35)


def test_bad_point_sets_are_refused():
    with pytest.raises(ValueError, match="68×2"):
        lp.five_points(np.zeros((5, 2)))
    with pytest.raises(ValueError, match="finite"):
        lp.label_map_from_68(np.full((68, 2), np.nan), SIZE)


def test_disagreement_is_the_mean_distance_in_eye_distances():
    points = hand_made_68()
    five = lp.five_points(points)
    iod = np.hypot(*(five[1] - five[0]))
    moved = five + np.array([[3.0, 4.0], [0, 0], [0, 0], [0, 0], [0, 0]])  # one point 5 px away
    # Eyes of `moved` are farther apart: its own eye distance is the unit.
    moved_iod = np.hypot(*(moved[1] - moved[0]))
    assert lp.disagreement_iod(five, points) == pytest.approx(0.0, abs=1e-12)
    assert lp.disagreement_iod(moved, points) == pytest.approx(5 / 5 / moved_iod)
    assert moved_iod != pytest.approx(iod)


def test_the_check_warns_past_the_threshold_and_on_a_cut_face():
    points = hand_made_68()
    five = lp.five_points(points)
    iod = np.hypot(*(five[1] - five[0]))
    whole = lp.alignment_check(five, points, (SIZE, SIZE, 3), dlib_detected=True)
    assert whole.warning is None and not whole.cut_by_border and whole.disagreement_iod == pytest.approx(0.0, abs=1e-9)
    shifted = five + [0.25 * iod, 0]  # every point a quarter eye distance off: past 0.2
    off = lp.alignment_check(shifted, points, (SIZE, SIZE, 3))
    assert off.disagreement_iod == pytest.approx(0.25)
    assert off.warning is not None and "disagree" in off.warning and "border" not in off.warning
    near = five + [0.15 * iod, 0]
    assert lp.alignment_check(near, points, (SIZE, SIZE, 3)).warning is None
    # The image-left eye's outer corner (x ≈ 32) within 0.1 eye distance (4 px) of the edge: cut.
    cut = lp.alignment_check(five - [29, 0], points - [29, 0], (SIZE, SIZE, 3))
    assert cut.cut_by_border and cut.warning is not None and "border" in cut.warning
    assert not lp.alignment_check(five - [27, 0], points - [27, 0], (SIZE, SIZE, 3)).cut_by_border
    # Without the 68 points only the five are checked against the border.
    assert lp.alignment_check(five, None, (SIZE, SIZE, 3)).summary() == {
        "disagreement_iod": None,
        "threshold_iod": lp.DISAGREEMENT_THRESHOLD_IOD,
        "cut_by_border": False,
        "dlib_detected": None,
        "warning": None,
    }
