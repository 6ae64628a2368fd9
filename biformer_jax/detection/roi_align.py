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
The multi-level extractor computes every level for every RoI and keeps the RoI's own level
(mmdet indexes the RoIs of each level instead).

Cost: dense in the map, `out * W * H * C` multiply-adds per RoI and level for the first
contraction (7 x 80 x 64 x 256 = 9.2M at the golden 256x320 input's stride-4 level; about 120M
on a COCO-size 200x336 map), against mmcv's `out^2 * samples * 4 * C`: fine on accelerators and
for the parity tests, the thing to revisit (windowed maps per level) if RoI extraction dominates
a profile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp


def default_max_grid(length: int, output_size: int) -> int:
    """Samples per bin side that cover any RoI spanning at most `length` map cells (+1 for rounding)."""
    return math.ceil(length / output_size) + 1


def _axis_weights(start, size, output_size: int, length: int, max_grid: int):
    """(R,) starts and sizes on one axis (map cells) -> ((R, out, length) summed sample weights,
    (R,) int32 samples per bin). Float32 operations in mmcv's order."""
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
    cells = jnp.arange(length, dtype=jnp.int32)
    weights = jnp.sum(
        w_low[..., None] * (low[..., None] == cells) + w_high[..., None] * (high[..., None] == cells), axis=2
    )  # (R, out, length)
    return weights, grid


def roi_align(
    features: jax.Array,
    rois: jax.Array,
    output_size: int,
    spatial_scale: float,
    max_grid: Optional[tuple[int, int]] = None,
    batch_size: int = 128,
) -> jax.Array:
    """mmcv `roi_align(..., sampling_ratio=0, aligned=True)` of one image.

    features (H, W, C); rois (R, 4) `(x1, y1, x2, y2)` in input pixels -> (R, out, out, C) in
    features.dtype. `max_grid` (rows, cols): samples per bin side kept (default
    `default_max_grid` of H and W: exact for RoIs within the map, see the module). RoIs run in
    groups of `batch_size` (memory: batch_size * out * H * C floats).
    """
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
) -> jax.Array:
    """mmdet's `SingleRoIExtractor` with mmcv `RoIAlign(out, 1 / stride, 0, aligned=True)` per level,
    for one image: features per level (H_l, W_l, C) (the first `len(strides)` are used), rois
    (R, 4) -> (R, out, out, C). Static shapes: each level is computed for every RoI and the RoI's
    own level kept (see the module)."""
    if len(features) < len(strides):
        raise ValueError(f"{len(features)} feature maps for {len(strides)} RoI extractor strides.")
    levels = map_roi_levels(rois, len(strides), finest_scale)
    out = None
    for level, stride in enumerate(strides):
        pooled = roi_align(features[level], rois, output_size, 1.0 / stride, batch_size=batch_size)
        here = (levels == level)[:, None, None, None]
        out = jnp.where(here, pooled, 0 if out is None else out)
    return out
