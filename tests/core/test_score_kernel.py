"""The compiled re-scoring kernel against float64 sums over boolean masks, against the numpy path it
replaces, and against numpy's own float16 -> float32 cast for every float16 value."""

import warnings

import numpy as np
import pytest

from core import score_kernel
from core.regions import bundled_region_specs, region_masks
from core.score import encode_segments, plan_sums, region_means, region_scores, segment_sums

pytestmark = pytest.mark.skipif(not score_kernel.available(), reason="numba is not installed")


def label_maps(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Pixel noise (many one-pixel runs), blocky parts (longer runs) and a map with no face (every region empty)."""
    noise = rng.integers(0, 11, (n, size, size)).astype(np.uint8)
    blocks = np.kron(rng.integers(0, 11, (n, size // 6, size // 6)), np.ones((6, 6), dtype=np.uint8))
    maps = np.concatenate([noise, blocks.astype(np.uint8)])
    maps[1] = 0
    return maps


def case(seed: int, spec_name: str, dtype: type, size: int = 48):
    """Label maps, a maps file with more rows than are scored (rows out of order) and the plans."""
    rng = np.random.default_rng(seed)
    labels = label_maps(rng, 5, size)
    spec = bundled_region_specs()[spec_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        segments = encode_segments(labels, spec)
        masks = region_masks(labels, spec).masks
    n = len(labels)
    file_rows = 3 * n
    values: np.ndarray = rng.normal(0.0, 1.0, (file_rows, size, size)).astype(dtype)
    if dtype == np.float16:
        values.reshape(-1)[::97] = np.float16(3e-7)  # float16 subnormals
    rows = np.sort(rng.permutation(file_rows)[: 2 * n])  # some rows never read, so copies skip and merge gaps
    images = rng.integers(0, n, len(rows))
    plans = plan_sums(segments, rows, images, size * size)
    return values, rows, images, masks, segments, plans


@pytest.mark.parametrize("spec_name", ["paper", "extended"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_compiled_sums_equal_float64_sums_over_the_masks(spec_name, dtype):
    values, rows, images, masks, segments, plans = case(0, spec_name, dtype)
    got = segment_sums(values, plans, len(segments.names), compiled=True)
    flat_masks = masks.reshape(len(masks), masks.shape[1], -1).astype(np.float64)
    expected = np.einsum("krp,kp->kr", flat_masks[images], values[rows].reshape(len(rows), -1).astype(np.float64))
    # float64 sums of exactly converted values: only the order of the additions differs.
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_compiled_and_numpy_paths_give_the_same_scores_with_nan_for_empty_regions(seed):
    values, rows, images, masks, segments, plans = case(seed, "extended", np.float16)
    areas = segments.areas[images]
    assert (areas == 0).any() and (areas > 0).any()  # empty regions are part of the case
    compiled = region_means(segment_sums(values, plans, len(segments.names), compiled=True), areas)
    numpy = region_means(segment_sums(values, plans, len(segments.names), compiled=False), areas)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        direct = region_scores(values[rows].astype(np.float32), masks[images])
    np.testing.assert_array_equal(np.isnan(compiled), areas == 0)
    # The numpy path adds each run in float32, region_scores in float32: equal to float32 rounding.
    np.testing.assert_allclose(compiled, numpy, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(compiled, direct, rtol=2e-5, atol=2e-6)


def test_every_float16_value_is_converted_exactly():
    bits = np.arange(65536, dtype=np.uint16)  # every float16: subnormals, ±0, ±inf and NaNs included
    regions = len(bits)
    bounds = np.arange(regions, dtype=np.int64)  # one run per value, each its own region
    labels = np.arange(regions, dtype=np.int64)
    copies = np.array([[0, regions, 0]], dtype=np.int64)
    out = np.zeros((1, regions + 1))
    score_kernel.chunk_sums(bits, bounds, labels, copies, regions, regions, out)
    np.testing.assert_array_equal(out[0, :-1], bits.view(np.float16).astype(np.float64))


def test_runs_outside_every_region_are_never_read():
    regions = 2
    values = np.array([1.0, 2.0, np.nan, 4.0, 8.0], dtype=np.float32)  # the NaN lies in a "no region" run
    bounds = np.array([0, 2, 3], dtype=np.int64)
    labels = np.array([0, regions, 1], dtype=np.int64)
    out = np.zeros((1, regions + 1))
    score_kernel.chunk_sums(values, bounds, labels, np.array([[0, 5, 0]], dtype=np.int64), 5, regions, out)
    np.testing.assert_array_equal(out, [[3.0, 12.0, 0.0]])


def test_without_numba_segment_sums_takes_the_numpy_path(monkeypatch):
    values, _rows, _images, _masks, segments, plans = case(4, "paper", np.float16)
    compiled = segment_sums(values, plans, len(segments.names))
    monkeypatch.setattr(score_kernel, "_kernels", lambda: None)
    assert not score_kernel.available()
    fallback = segment_sums(values, plans, len(segments.names))
    np.testing.assert_allclose(fallback, compiled, rtol=2e-5, atol=2e-5)
    with pytest.raises(RuntimeError, match="numba is not installed"):
        score_kernel.chunk_sums(
            values.reshape(-1).view(np.uint16),
            plans[0].bounds,
            plans[0].labels,
            np.zeros((1, 3), np.int64),
            0,
            3,
            np.zeros((1, 4)),
        )


def test_plans_need_ascending_rows():
    values, rows, images, _masks, segments, _plans = case(5, "paper", np.float16)
    with pytest.raises(ValueError, match="ascending"):
        plan_sums(segments, rows[::-1], images, values.shape[1] * values.shape[2])


def test_a_maps_file_shorter_than_the_plans_is_refused_not_read_past():
    values, _rows, _images, _masks, segments, plans = case(6, "paper", np.float16)
    last = max(end for plan in plans for _, end, _ in plan.copies)
    short = values.reshape(-1)[: last - 1]
    with pytest.raises(ValueError, match="plans read up to"):
        segment_sums(short, plans, len(segments.names), compiled=True)
