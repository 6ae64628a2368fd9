"""mmcv RoIAlign (aligned=True, sampling_ratio=0) and the SingleRoIExtractor level mapping against a
direct loop transcription of mmcv 1.7's CPU kernel (`roi_align_forward`: pre_calc_for_bilinear_interpolate
and the averaging loop), on awkward RoIs: tiny, zero-area, inverted, huge, crossing every border,
fractional, at the last row / column."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biformer_jax.detection.roi_align import (
    _window_one,
    default_max_grid,
    map_roi_levels,
    multi_level_roi_align,
    roi_align,
)


def reference_roi_align(features: np.ndarray, rois: np.ndarray, output_size: int, spatial_scale: float) -> np.ndarray:
    """mmcv's kernel, loop by loop, in float32: features (H, W, C), rois (R, 4) -> (R, out, out, C)."""
    f32 = np.float32
    h, w, c = features.shape
    out = np.zeros((len(rois), output_size, output_size, c), f32)

    def bilinear(y, x):
        if y < -1.0 or y > h or x < -1.0 or x > w:
            return np.zeros(c, f32)
        y, x = max(y, f32(0)), max(x, f32(0))
        y_low, x_low = int(y), int(x)
        if y_low >= h - 1:
            y_high = y_low = h - 1
            y = f32(y_low)
        else:
            y_high = y_low + 1
        if x_low >= w - 1:
            x_high = x_low = w - 1
            x = f32(x_low)
        else:
            x_high = x_low + 1
        ly, lx = f32(y - y_low), f32(x - x_low)
        hy, hx = f32(1) - ly, f32(1) - lx
        return (
            hy * hx * features[y_low, x_low]
            + hy * lx * features[y_low, x_high]
            + ly * hx * features[y_high, x_low]
            + ly * lx * features[y_high, x_high]
        ).astype(f32)

    scale = f32(spatial_scale)
    for r, roi in enumerate(np.asarray(rois, f32)):
        sw, sh = roi[0] * scale - f32(0.5), roi[1] * scale - f32(0.5)
        ew, eh = roi[2] * scale - f32(0.5), roi[3] * scale - f32(0.5)
        rw, rh = f32(ew - sw), f32(eh - sh)
        bw, bh = f32(rw / f32(output_size)), f32(rh / f32(output_size))
        grid_h, grid_w = math.ceil(rh / f32(output_size)), math.ceil(rw / f32(output_size))
        count = f32(max(grid_h * grid_w, 1))
        for ph in range(output_size):
            for pw in range(output_size):
                acc = np.zeros(c, f32)
                for iy in range(grid_h):
                    y = f32(f32(sh + f32(ph) * bh) + f32(f32(iy + 0.5) * bh) / f32(grid_h))
                    for ix in range(grid_w):
                        x = f32(f32(sw + f32(pw) * bw) + f32(f32(ix + 0.5) * bw) / f32(grid_w))
                        acc = (acc + bilinear(y, x)).astype(f32)
                out[r, ph, pw] = acc / count
    return out


# Sums in another order than the kernel's (separable weights, see the module): float32 rounding of
# sums of up to 12 x 15 samples of O(1) values; measured at most 2.4e-6. A wrong sample, weight or
# count moves values by 1e-2 or more.
TOL = 1e-5
H, W = 11, 14  # map cells; stride 4 -> a 44 x 56 pixel image
ROIS = np.array(
    [
        [10.0, 8.0, 30.0, 20.0],  # inside, integral
        [3.3, 7.9, 17.25, 41.6],  # fractional, tall
        [20.0, 20.0, 20.0, 20.0],  # zero area: zeros
        [5.0, 0.0, 40.0, 0.0],  # clipped to the top edge (y2 == 0): zeros
        [30.0, 30.0, 10.0, 10.0],  # inverted: zeros
        [21.1, 13.7, 21.6, 14.0],  # tiny (under a cell)
        [-12.0, -9.0, 14.0, 12.0],  # crossing the top-left border
        [40.0, 30.0, 70.0, 52.0],  # crossing the bottom-right border, samples past H and W
        [0.0, 0.0, 56.0, 44.0],  # the whole image
        [-3.0, -2.0, 59.0, 47.5],  # a little past the whole image on every side
        [54.0, 42.0, 56.0, 44.0],  # the last row and column
        [0.0, 0.0, 1.0, 44.0],  # one column, full height
    ],
    np.float32,
)


@pytest.fixture(scope="module")
def fmap():
    return np.random.default_rng(0).standard_normal((H, W, 3)).astype(np.float32)


@pytest.mark.parametrize("output_size", [7, 3, 2])
def test_roi_align_matches_the_kernel(fmap, output_size):
    ours = np.asarray(jax.jit(lambda f, r: roi_align(f, r, output_size, 0.25))(fmap, ROIS))
    theirs = reference_roi_align(fmap, ROIS, output_size, 0.25)
    assert ours.shape == theirs.shape == (len(ROIS), output_size, output_size, 3)
    err = np.abs(ours - theirs).max()
    print(f"out {output_size}: max |error| {err:.2e}")
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOL)
    for r in (2, 3, 4):  # empty sampling grids give exact zeros
        assert not ours[r].any()


def test_random_rois_and_other_scales(fmap):
    rng = np.random.default_rng(1)
    xy = rng.uniform(-20, 70, (40, 2)).astype(np.float32)
    wh = (rng.uniform(0, 1, (40, 2)) ** 3 * 60).astype(np.float32)
    rois = np.concatenate([xy, xy + wh], axis=1)
    for scale in (0.5, 0.125):
        ours = np.asarray(roi_align(jnp.asarray(fmap), jnp.asarray(rois), 7, scale))
        np.testing.assert_allclose(ours, reference_roi_align(fmap, rois, 7, scale), rtol=0, atol=TOL)


def test_the_sample_bound_is_where_exactness_ends(fmap):
    # A RoI three times the map's height needs more samples per bin than the default bound: the
    # result then differs from the kernel's, and an explicit larger bound restores it.
    roi = np.array([[0.0, -60.0, 20.0, 104.0]], np.float32)  # 41 cells tall on an 11-cell map
    assert math.ceil(41 / 7) > default_max_grid(H, 7)
    theirs = reference_roi_align(fmap, roi, 7, 0.25)
    assert np.abs(np.asarray(roi_align(fmap, roi, 7, 0.25)) - theirs).max() > 1e-3
    exact = np.asarray(roi_align(fmap, roi, 7, 0.25, max_grid=(7, 3)))
    np.testing.assert_allclose(exact, theirs, rtol=0, atol=TOL)


def test_level_mapping_and_multi_level():
    # sqrt(area) thresholds 112, 224, 448 (finest scale 56): floor(log2(s / 56 + 1e-6)), clamped to 0..3
    rois = np.array(
        [[0, 0, 111.9, 112], [0, 0, 112, 112], [0, 0, 224, 224], [0, 0, 447, 448], [0, 0, 900, 900], [5, 5, 5, 5]],
        np.float32,
    )
    np.testing.assert_array_equal(np.asarray(map_roi_levels(jnp.asarray(rois), 4)), [0, 1, 2, 2, 3, 0])
    rng = np.random.default_rng(2)
    feats = [rng.standard_normal((64 // s, 80 // s, 2)).astype(np.float32) for s in (1, 2, 4, 8)]
    rois = np.array([[3, 4, 60, 50], [10, 2, 250, 200], [0, 0, 320, 256], [100, 100, 101, 103]], np.float32)
    ours = np.asarray(multi_level_roi_align([jnp.asarray(f) for f in feats], jnp.asarray(rois), 7, (4, 8, 16, 32)))
    levels = np.asarray(map_roi_levels(jnp.asarray(rois), 4))
    for r, level in enumerate(levels):
        ref = reference_roi_align(feats[level], rois[r : r + 1], 7, 1 / (4, 8, 16, 32)[level])
        np.testing.assert_allclose(ours[r : r + 1], ref, rtol=0, atol=TOL)


def test_windows_equal_the_kernel_and_the_dense_form_on_a_large_map():
    """Each RoI on the smallest window (8 or 16 cells here) that holds its span, else the whole map:
    RoIs of every tier, at the borders, and ones whose clipped span is small but whose size (and so
    its sample grid) is not."""
    rng = np.random.default_rng(4)
    big = rng.standard_normal((40, 52, 3)).astype(np.float32)  # map cells; stride 4 -> 160 x 208 pixels
    rois = np.array(
        [
            [10.0, 12.0, 30.0, 26.0],  # ~5 x 4 cells: the 8-cell window
            [40.3, 20.7, 95.1, 70.2],  # ~14 x 13 cells: the 16-cell window
            [3.0, 5.0, 150.0, 120.0],  # ~37 x 29 cells: the whole map
            [100.0, 2.0, 104.0, 158.0],  # 1 x 39 cells, tall: the whole map
            [-100.0, -90.0, 10.0, 8.0],  # a span of 3 x 2 cells inside the map, a size of 27 x 24
            [150.0, 140.0, 400.0, 300.0],  # past the bottom-right corner
            [200.0, 150.0, 208.0, 160.0],  # the last rows and columns
            [60.0, 60.0, 60.0, 60.0],  # zero area
        ],
        np.float32,
    )
    windowed = jax.jit(lambda f, r: roi_align(f, r, 7, 0.25, windows=(8, 16)))
    jaxpr = str(jax.make_jaxpr(lambda f, r: roi_align(f, r, 7, 0.25, windows=(8, 16)))(big, rois))
    assert "cond[" in jaxpr and jaxpr.count("branches=") == 1, "one switch: 8, 16 and the whole map"
    ours = np.asarray(windowed(big, rois))
    dense = np.asarray(roi_align(big, rois, 7, 0.25, windows=()))
    np.testing.assert_allclose(ours, dense, rtol=0, atol=TOL)
    within = [0, 1, 2, 3, 4, 6, 7]  # RoIs no larger than the map: exact (the bound of the module)
    theirs = reference_roi_align(big, rois[within], 7, 0.25)
    np.testing.assert_allclose(ours[within], theirs, rtol=0, atol=TOL)
    # RoI 4 needs 4 samples per bin side: on the 8-cell window that holds its span (3 per side) its
    # value would be another one
    small = np.asarray(jax.jit(lambda f, r: _window_one(f, r, 7, 0.25, 8, 8))(big, rois[4]))
    assert np.abs(small - theirs[4]).max() > 1e-3


def test_windowed_multi_level_gradients_are_the_dense_forms():
    rng = np.random.default_rng(5)
    feats = [jnp.asarray(rng.standard_normal((96 // s, 128 // s, 2)).astype(np.float32)) for s in (1, 2, 4, 8)]
    xy = rng.uniform(-10, 300, (24, 2))
    wh = np.geomspace(4, 700, 24)[:, None] * rng.uniform(0.5, 2, (24, 2))  # sqrt(area) 4 to ~700 pixels
    rois = jnp.asarray(np.concatenate([xy, xy + wh], 1).astype(np.float32))
    cot = jnp.asarray(rng.standard_normal((24, 7, 7, 2)).astype(np.float32))

    def loss(fs, r, windows):
        return jnp.sum(multi_level_roi_align(fs, r, 7, (4, 8, 16, 32), windows=windows) * cot)

    assert len(set(np.asarray(map_roi_levels(rois, 4)).tolist())) == 4  # every level used
    w_val, (w_grad, r_grad) = jax.jit(jax.value_and_grad(lambda f, r: loss(f, r, (4, 8)), (0, 1)))(feats, rois)
    d_val, d_grad = jax.jit(jax.value_and_grad(lambda f: loss(f, rois, ())))(feats)
    np.testing.assert_allclose(float(w_val), float(d_val), rtol=1e-5)
    for a, b in zip(w_grad, d_grad):  # one formula in two programs: float32 summation order (1.6e-5 at 2.6 seen)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert not np.asarray(r_grad).any()  # no gradient for the boxes, as mmcv's RoIAlign
