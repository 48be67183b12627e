import numpy as np
import pytest
import torch

from core.regions import EdgeLink, RegionRule, RegionSpec, region_masks
from core.score import (
    encode_segments,
    plan_sums,
    region_index_dtype,
    region_means,
    region_scores,
    relevance_map,
    segment_sums,
)


def test_abs_mode_sums_absolute_channels_then_min_max_per_image():
    a = np.zeros((2, 3, 2, 2), dtype=np.float32)
    a[0, :, 0, 0] = [1, -2, 3]  # |.| sum 6
    a[0, :, 1, 1] = [-1, 0, 0]  # 1
    a[1] = 5.0  # constant image -> all zeros, no division by zero
    maps = relevance_map(torch.from_numpy(a))
    np.testing.assert_allclose(maps[0], [[1.0, 0.0], [0.0, 1 / 6]], rtol=1e-6)
    np.testing.assert_array_equal(maps[1], np.zeros((2, 2)))
    assert maps.dtype == np.float32


def test_positive_and_signed_modes():
    a = np.array([[[[2.0, -4.0], [1.0, 0.0]]]], dtype=np.float32)  # one channel
    np.testing.assert_allclose(relevance_map(a, "positive")[0], [[1.0, 0.0], [0.5, 0.0]])
    np.testing.assert_allclose(relevance_map(a, "signed")[0], [[0.5, -1.0], [0.25, 0.0]])
    np.testing.assert_array_equal(relevance_map(np.zeros((1, 1, 2, 2)), "signed"), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="mode must be one of"):
        relevance_map(a, "log")


def test_region_scores_is_the_mean_relevance_inside_each_mask():
    maps = np.array([[[0.0, 1.0], [0.5, 0.25]], [[1.0, 1.0], [0.0, 0.0]]], dtype=np.float32)
    masks = np.array([[[True, True], [False, False]], [[False, True], [True, True]]])
    scores = region_scores(maps, masks)
    # Image 0: top row (0 + 1) / 2; three pixels (1 + 0.5 + 0.25) / 3. Image 1: 1 and 1/3.
    np.testing.assert_allclose(scores, [[0.5, 1.75 / 3], [1.0, 1 / 3]], rtol=1e-6)


def test_per_image_masks_equal_shared_masks_when_identical(rng):
    maps = rng.random((4, 16, 16)).astype(np.float32)
    masks = rng.random((3, 16, 16)) > 0.5
    np.testing.assert_allclose(
        region_scores(maps, masks), region_scores(maps, np.broadcast_to(masks, (4, 3, 16, 16))), rtol=1e-6
    )


def test_scores_match_a_direct_loop(rng):
    maps = rng.random((5, 20, 20)).astype(np.float32)
    masks = rng.random((5, 4, 20, 20)) > 0.7
    expected = [[maps[n][masks[n, r]].mean() for r in range(4)] for n in range(5)]
    np.testing.assert_allclose(region_scores(maps, masks), expected, rtol=1e-5)


def test_empty_region_gives_nan_and_a_warning_naming_it():
    maps = np.ones((1, 4, 4), dtype=np.float32)
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, :2] = True
    with pytest.warns(RuntimeWarning, match="mouth"):
        scores = region_scores(maps, masks, names=("eye", "mouth"))
    assert scores[0, 0] == 1.0 and np.isnan(scores[0, 1])


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="do not fit"):
        region_scores(np.zeros((2, 4, 4)), np.zeros((3, 2, 5, 5), dtype=bool))


def test_abs_raw_mode_is_the_absolute_channel_sum_unnormalised_and_stored_in_float32():
    from core.score import stored_map_dtype

    a = np.zeros((1, 3, 2, 2), dtype=np.float32)
    a[0, :, 0, 0] = [1e-5, -2e-5, 3e-5]
    a[0, :, 1, 1] = [-4.0, 0, 0]
    np.testing.assert_allclose(relevance_map(a, "abs-raw")[0], [[6e-5, 0.0], [0.0, 4.0]], rtol=1e-6)
    assert stored_map_dtype("abs-raw") == np.float32 and stored_map_dtype("abs") == np.float16
    # float16 would lose such values: below its normal range they keep only a few bits.
    assert abs(float(np.float16(6e-5 / 7)) - 6e-5 / 7) > 1e-5 * 6e-5 / 7


def test_three_hundred_regions_encode_as_uint16_and_score_like_their_masks():
    """Beyond 255 regions the run index needs 16 bits (uint8 overflowed: the Regions page's crash). Region k
    is the 4-pixel-wide stripe from column 4k (left at 'all''s left edge + k/512 × its 2048-px width, exact in
    binary), so every region's area is known by hand and its score is its stripe's mean."""
    height, width, count = 3, 2048, 300
    stripes = tuple(
        RegionRule(
            f"s{k}",
            labels=(1,),
            left=EdgeLink("all", "left", k / 512),
            right=EdgeLink("all", "left", (k + 1) / 512),
        )
        for k in range(count)
    )
    spec = RegionSpec((*stripes, RegionRule("all", labels=(1,))))
    label_maps = np.ones((2, height, width), dtype=np.uint8)
    segments = encode_segments(label_maps, spec)
    assert segments.regions.dtype == np.uint16 and region_index_dtype(255) == np.uint8
    expected_areas = np.array([4 * height] * count + [height * (width - 4 * count)])
    np.testing.assert_array_equal(segments.areas, np.stack([expected_areas] * 2))
    maps = np.random.default_rng(3).random((2, height, width)).astype(np.float32)
    plans = plan_sums(segments, np.arange(2), np.arange(2), height * width)
    sums = segment_sums(maps, plans, count + 1, compiled=False)
    by_hand = [[maps[n, :, 4 * k : 4 * k + 4].mean() for k in range(count)] for n in range(2)]
    np.testing.assert_allclose(region_means(sums, segments.areas)[:, :count], by_hand, rtol=1e-5)
    masks = region_masks(label_maps, spec).masks
    np.testing.assert_allclose(region_means(sums, segments.areas), region_scores(maps, masks), rtol=1e-5)
