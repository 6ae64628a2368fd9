"""mmcv 1.7's `RoIAlign` (`aligned=True`, `sampling_ratio=0`, average pooling) and mmdet 2.11's
`SingleRoIExtractor`, at static shapes.

Semantics (mmcv `roi_align_forward` CPU kernel, which torchvision's `roi_align` shares): for a RoI
`(x1, y1, x2, y2)` in input pixels on a map of stride `1 / spatial_scale`, the sampling region
starts at `x1 * spatial_scale - 0.5` (aligned: pixel centres) and is `(x2 - x1) * spatial_scale`
wide (no minimum of 1 when aligned, so a zero-area RoI gives zeros). Each of the `out x out` bins
is sampled on a grid of `ceil(roi_h / out) x ceil(roi_w / out)` points (the adaptive grid of
`sampling_ratio=0`) at `start + bin * bin_size + (i + 0.5) * bin_size / grid`; a point with
`y < -1`, `y > H`, `x < -1` or `x > W` contributes 0, otherwise coordinates below 0 clamp to 0,
a point at or past the last row / column reads that row / column, and the value is bilinear. The
bin's value is the sum over its grid divided by `max(grid_h * grid_w, 1)`.

How it is computed here: every factor above is a product of a y part and an x part (the sample
grid is a Cartesian product, bilinear weights and the out-of-range test factorise), so a bin's
value is `sum_yx Ay[bin_y, y] * Ax[bin_x, x] * F[y, x]`, with `Ay` (out, H) the summed bilinear
weights of the bin's y samples (and `Ax` likewise). `roi_align` builds `Ay`, `Ax` per RoI and
contracts them with the map (two matmuls), so the result equals mmcv's up to float summation
order (measured against a transcription of the kernel: tests/test_roi_align.py).

Static shapes, and what they change: the adaptive grid varies per RoI, so `Ay` sums over a
fixed maximum of `max_grid` samples per bin side with the samples past the RoI's own grid
masked. The default bound is `ceil(L / out) + 1` for a map side of L cells: exact for every RoI
whose side spans at most the map (`roi_h <= H`, `roi_w <= W` in map cells), which holds for
proposals and detections (clipped to the image, which lies within the map). A larger RoI has
more samples per bin than the bound and loses those past it (its result then differs from
mmcv's): pass a larger `max_grid` for such RoIs.

Windows (the default forward): a RoI's samples touch only the map cells of its own span, so each
RoI is computed on a window of the map at its span: the smallest of `WINDOWS` (16, 32, 64 cells a
side, capped at the map's side) that holds the span, else the whole map (then with the bound
above). The choice is per RoI, made in a loop over the RoIs (`lax.map` with `lax.switch`), so the
cost follows each RoI's size: mmdet's SingleRoIExtractor likewise computes each RoI at its own
level only. The weights past the window are exactly the zero weights of the dense form, so the
window changes nothing but summation order. Gradients are the dense form's (a custom VJP: the
window's gradient would carry every level's map through the loop); the RoIs get none (mmcv's
RoIAlign has no gradient for its boxes, and mmdet detaches the proposals). `windows=()` selects
the dense form everywhere, as under `vmap`, where the per-RoI switch would run every branch.

Cost at a COCO size (800 x 1344, 1000 RoIs, C = 256, 2 CPU cores): dense, every level for every
RoI, 3.4-3.9 s; windowed 0.4 s for RoIs of level 0 (benchmarks/detection.py times Mask R-CNN).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

WINDOWS = (16, 32, 64)  # window sides (map cells) a RoI is tried on, smallest first


def default_max_grid(length: int, output_size: int) -> int:
    """Samples per bin side that cover any RoI spanning at most `length` map cells (+1 for rounding)."""
    return math.ceil(length / output_size) + 1


def _axis_weights(start, size, output_size: int, length: int, max_grid: int, origin=0, cells: Optional[int] = None):
    """(R,) starts and sizes on one axis (map cells) -> ((R, out, cells) summed sample weights on the
    map cells origin .. origin + cells - 1 (default: all `length`), (R,) int32 samples per bin).
    Float32 operations in mmcv's order."""
    f32 = jnp.float32
    bin_size = size / f32(output_size)  # (R,)
    grid = jnp.ceil(size / f32(output_size)).astype(jnp.int32)  # (R,) may be <= 0: no samples
    p = jnp.arange(output_size, dtype=f32)[None, :, None]  # (1, out, 1)
    i = jnp.arange(max_grid, dtype=jnp.int32)[None, None, :]  # (1, 1, G)
    b = bin_size[:, None, None]
    coord = start[:, None, None] + p * b + ((i.astype(f32) + f32(0.5)) * b) / grid[:, None, None].astype(f32)
    valid = (i < grid[:, None, None]) & (coord >= -1) & (coord <= length)  # (R, out, G)
    c = jnp.maximum(coord, 0)
    low = jnp.floor(c).astype(jnp.int32)
    edge = low >= length - 1
    low = jnp.where(edge, length - 1, low)
    high = jnp.where(edge, length - 1, low + 1)
    c = jnp.where(edge, low.astype(f32), c)
    frac = c - low.astype(f32)
    w_low = jnp.where(valid, 1 - frac, 0)
    w_high = jnp.where(valid, frac, 0)
    cells = origin + jnp.arange(length if cells is None else cells, dtype=jnp.int32)
    weights = jnp.sum(
        w_low[..., None] * (low[..., None] == cells) + w_high[..., None] * (high[..., None] == cells), axis=2
    )  # (R, out, length)
    return weights, grid


def _dense_roi_align(features, rois, output_size: int, spatial_scale: float, max_grid, batch_size: int):
    """The dense form (every RoI on the whole map): see `roi_align`."""
    h, w, c = features.shape
    gy, gx = max_grid if max_grid is not None else (default_max_grid(h, output_size), default_max_grid(w, output_size))
    rois = rois.astype(jnp.float32)
    scale = jnp.float32(spatial_scale)
    x1, y1 = rois[:, 0] * scale - jnp.float32(0.5), rois[:, 1] * scale - jnp.float32(0.5)
    x2, y2 = rois[:, 2] * scale - jnp.float32(0.5), rois[:, 3] * scale - jnp.float32(0.5)
    ay, grid_y = _axis_weights(y1, y2 - y1, output_size, h, gy)  # (R, out, H)
    ax, grid_x = _axis_weights(x1, x2 - x1, output_size, w, gx)  # (R, out, W)
    count = jnp.maximum(grid_y * grid_x, 1).astype(jnp.float32)  # (R,)
    fmap = features.astype(jnp.float32)

    def one(args):
        ay_r, ax_r, count_r = args
        cols = jnp.einsum("qx,yxc->yqc", ax_r, fmap)  # (H, out, C)
        return (jnp.einsum("py,yqc->pqc", ay_r, cols) / count_r).astype(features.dtype)

    if rois.shape[0] == 0:
        return jnp.zeros((0, output_size, output_size, c), features.dtype)
    return jax.lax.map(one, (ay, ax, count), batch_size=min(batch_size, rois.shape[0]))


def _span(start, end, length: int):
    """First map cell a RoI's samples on one axis can touch, and how many cells from there (with
    one cell of margin for float rounding at the end)."""
    first = jnp.clip(jnp.floor(jnp.maximum(start, 0)), 0, length - 1).astype(jnp.int32)
    last = jnp.clip(jnp.floor(jnp.maximum(end, 0)) + 2, 0, length - 1).astype(jnp.int32)
    return first, last - first + 1


def _window_one(fmap, roi, output_size: int, spatial_scale: float, kh: int, kw: int):
    """One RoI (4,) on a (kh, kw) window of fmap (H, W, C) placed at its span -> (out, out, C) float32."""
    h, w, c = fmap.shape
    scale = jnp.float32(spatial_scale)
    x1, y1 = roi[0] * scale - jnp.float32(0.5), roi[1] * scale - jnp.float32(0.5)
    x2, y2 = roi[2] * scale - jnp.float32(0.5), roi[3] * scale - jnp.float32(0.5)
    oy = jnp.minimum(_span(y1, y2, h)[0], h - kh)  # window origin: at the span, inside the map
    ox = jnp.minimum(_span(x1, x2, w)[0], w - kw)
    gy, gx = default_max_grid(kh, output_size), default_max_grid(kw, output_size)
    ay, grid_y = _axis_weights(y1[None], (y2 - y1)[None], output_size, h, gy, oy, kh)  # (1, out, kh)
    ax, grid_x = _axis_weights(x1[None], (x2 - x1)[None], output_size, w, gx, ox, kw)  # (1, out, kw)
    window = jax.lax.dynamic_slice(fmap, (oy, ox, 0), (kh, kw, c)).astype(jnp.float32)  # (kh, kw, C)
    cols = jnp.einsum("qx,yxc->yqc", ax[0], window)  # (kh, out, C)
    count = jnp.maximum(grid_y[0] * grid_x[0], 1).astype(jnp.float32)
    return jnp.einsum("py,yqc->pqc", ay[0], cols) / count


def _windowed_levels(features, rois, levels, output_size: int, scales, windows):
    """Each RoI at its level, on the smallest window that holds its span (module docstring)."""
    sides = []  # per level: the window sides tried, the whole map last
    for fmap in features:
        h, w = fmap.shape[:2]
        sides.append(sorted({(min(k, h), min(k, w)) for k in windows} - {(h, w)}) + [(h, w)])
    firsts = np.cumsum([0] + [len(s) for s in sides[:-1]])
    fns = [
        functools.partial(lambda f, sc, kh, kw, r: _window_one(f, r, output_size, sc, kh, kw), fmap, scale, kh, kw)
        for fmap, scale, level_sides in zip(features, scales, sides)
        for kh, kw in level_sides
    ]

    def one(args):
        roi, level = args
        index = jnp.int32(0)
        for lvl, (fmap, scale) in enumerate(zip(features, scales)):
            h, w = fmap.shape[:2]
            s = jnp.float32(scale)
            x1, y1 = roi[0] * s - jnp.float32(0.5), roi[1] * s - jnp.float32(0.5)
            x2, y2 = roi[2] * s - jnp.float32(0.5), roi[3] * s - jnp.float32(0.5)
            need_h = jnp.maximum(_span(y1, y2, h)[1], jnp.ceil(y2 - y1))  # the span, and the size (sample grid)
            need_w = jnp.maximum(_span(x1, x2, w)[1], jnp.ceil(x2 - x1))
            fits = [(need_h <= kh) & (need_w <= kw) for kh, kw in sides[lvl][:-1]] + [jnp.bool_(True)]
            tier = jnp.argmax(jnp.stack(fits)).astype(jnp.int32)  # the first window that fits
            index = jnp.where(level == lvl, int(firsts[lvl]) + tier, index)
        return jax.lax.switch(index, fns, roi)

    return jax.lax.map(one, (rois.astype(jnp.float32), levels))


def _dense_levels(features, rois, levels, output_size: int, scales, batch_size: int):
    """Every level for every RoI (dense), each RoI keeping its own level -> float32."""
    out = None
    for level, (fmap, scale) in enumerate(zip(features, scales)):
        pooled = _dense_roi_align(fmap.astype(jnp.float32), rois, output_size, scale, None, batch_size)
        here = (levels == level)[:, None, None, None]
        out = jnp.where(here, pooled, 0 if out is None else out)
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _levels_roi_align(features, rois, levels, output_size, scales, windows, batch_size):
    return _windowed_levels(features, rois, levels, output_size, scales, windows)


def _levels_fwd(features, rois, levels, output_size, scales, windows, batch_size):
    out = _windowed_levels(features, rois, levels, output_size, scales, windows)
    return out, (features, rois, levels)


def _levels_bwd(output_size, scales, windows, batch_size, res, g):
    features, rois, levels = res
    _, vjp = jax.vjp(lambda f: _dense_levels(f, rois, levels, output_size, scales, batch_size), features)
    (ct,) = vjp(g)
    return ct, jnp.zeros_like(rois), np.zeros(levels.shape, jax.dtypes.float0)


_levels_roi_align.defvjp(_levels_fwd, _levels_bwd)


def roi_align(
    features: jax.Array,
    rois: jax.Array,
    output_size: int,
    spatial_scale: float,
    max_grid: Optional[tuple[int, int]] = None,
    batch_size: int = 128,
    windows: Sequence[int] = WINDOWS,
) -> jax.Array:
    """mmcv `roi_align(..., sampling_ratio=0, aligned=True)` of one image.

    features (H, W, C); rois (R, 4) `(x1, y1, x2, y2)` in input pixels -> (R, out, out, C) in
    features.dtype. Each RoI on a window of the map at its span (`windows`, see the module); the
    dense form with `windows=()` or an explicit `max_grid` (rows, cols): samples per bin side kept
    (default `default_max_grid` of H and W: exact for RoIs within the map, see the module), RoIs
    in groups of `batch_size` (memory: batch_size * out * H * C floats).
    """
    if max_grid is not None or not windows or rois.shape[0] == 0:
        return _dense_roi_align(features, rois, output_size, spatial_scale, max_grid, batch_size)
    levels = jnp.zeros(rois.shape[:1], jnp.int32)
    out = _levels_roi_align((features,), rois, levels, output_size, (spatial_scale,), tuple(windows), batch_size)
    return out.astype(features.dtype)


def map_roi_levels(rois: jax.Array, num_levels: int, finest_scale: float = 56.0) -> jax.Array:
    """mmdet's `SingleRoIExtractor.map_roi_levels`: `clamp(floor(log2(sqrt(w * h) / 56 + 1e-6)), 0,
    num_levels - 1)` in float32 -> (R,) int32."""
    scale = jnp.sqrt((rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1]))
    levels = jnp.floor(jnp.log2(scale / jnp.float32(finest_scale) + jnp.float32(1e-6)))
    return jnp.clip(levels, 0, num_levels - 1).astype(jnp.int32)


def multi_level_roi_align(
    features: Sequence[jax.Array],
    rois: jax.Array,
    output_size: int,
    strides: Sequence[int],
    finest_scale: float = 56.0,
    batch_size: int = 128,
    windows: Sequence[int] = WINDOWS,
) -> jax.Array:
    """mmdet's `SingleRoIExtractor` with mmcv `RoIAlign(out, 1 / stride, 0, aligned=True)` per level,
    for one image: features per level (H_l, W_l, C) (the first `len(strides)` are used), rois
    (R, 4) -> (R, out, out, C). Each RoI computed at its own level on a window (`windows`, see the
    module); `windows=()`: every level for every RoI, densely, the RoI's own level kept."""
    if len(features) < len(strides):
        raise ValueError(f"{len(features)} feature maps for {len(strides)} RoI extractor strides.")
    features = tuple(features[: len(strides)])
    levels = map_roi_levels(rois, len(strides), finest_scale)
    scales = tuple(1.0 / s for s in strides)
    dtype = features[0].dtype
    if not windows or rois.shape[0] == 0:
        return _dense_levels(features, rois, levels, output_size, scales, batch_size).astype(dtype)
    out = _levels_roi_align(features, rois.astype(jnp.float32), levels, output_size, scales, tuple(windows), batch_size)
    return out.astype(dtype)
