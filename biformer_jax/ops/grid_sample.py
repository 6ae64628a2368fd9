"""Bilinear grid sampling, `torch.nn.functional.grid_sample(..., mode='bilinear',
padding_mode='zeros', align_corners=True)` on channels-last input.

DeBiFormer samples its deformed query points from the feature map and its relative
position bias from a table with it. Coordinates are normalised to [-1, 1]; with
align_corners=True, -1 and 1 are the centres of the first and last pixel. Corners that
fall outside the input contribute zero. Gradients flow to the input (a scatter-add) and to
the coordinates (through the bilinear weights), as in PyTorch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grid_sample(image: jax.Array, grid: jax.Array) -> jax.Array:
    """Samples `image` at `grid`.

    Args:
      image: (B, H, W, C).
      grid: (B, *points, 2), float; grid[..., 0] is x (along W), grid[..., 1] is y (along H),
        both in [-1, 1] (PyTorch's order, not (y, x)).
    Returns:
      (B, *points, C) in image.dtype; coordinates are handled in float32 at least.
    """
    if image.ndim != 4 or grid.shape[-1] != 2 or grid.shape[0] != image.shape[0]:
        raise ValueError(
            f"grid_sample takes image (B, H, W, C) and grid (B, ..., 2) with the same B, got "
            f"{tuple(image.shape)} and {tuple(grid.shape)}."
        )
    b, h, w, c = image.shape
    points = grid.shape[1:-1]
    coords = grid.reshape(b, -1, 2).astype(jnp.promote_types(grid.dtype, jnp.float32))  # (B, P, 2)
    # align_corners=True: -1 -> 0, +1 -> size - 1.
    ix = (coords[..., 0] + 1) / 2 * (w - 1)  # (B, P)
    iy = (coords[..., 1] + 1) / 2 * (h - 1)  # (B, P)
    x0, y0 = jnp.floor(ix), jnp.floor(iy)
    fx, fy = ix - x0, iy - y0  # (B, P) fractional parts
    # The four neighbours (y0,x0), (y0,x1), (y1,x0), (y1,x1), gathered in one go.
    xs = x0[..., None] + jnp.array([0, 1, 0, 1], x0.dtype)  # (B, P, 4)
    ys = y0[..., None] + jnp.array([0, 0, 1, 1], y0.dtype)  # (B, P, 4)
    wx = jnp.stack([1 - fx, fx, 1 - fx, fx], axis=-1)  # (B, P, 4)
    wy = jnp.stack([1 - fy, 1 - fy, fy, fy], axis=-1)  # (B, P, 4)
    inside = (xs >= 0) & (xs <= w - 1) & (ys >= 0) & (ys <= h - 1)  # zero padding outside
    weight = jnp.where(inside, wx * wy, 0).astype(image.dtype)  # (B, P, 4)
    idx = jnp.clip(ys, 0, h - 1).astype(jnp.int32) * w + jnp.clip(xs, 0, w - 1).astype(jnp.int32)  # (B, P, 4)
    flat = image.reshape(b, h * w, c)  # (B, H*W, C)
    vals = jnp.take_along_axis(flat, idx.reshape(b, -1, 1), axis=1).reshape(b, -1, 4, c)  # (B, P, 4, C)
    out = jnp.sum(weight[..., None] * vals, axis=2)  # (B, P, C)
    return out.reshape(b, *points, c)
