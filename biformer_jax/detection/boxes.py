"""Axis-aligned boxes `(x1, y1, x2, y2)`: areas and pairwise overlaps, as mmdetection 2.11 computes them.

Ported from mmdet `core/bbox/iou_calculators/iou2d_calculator.py` (`bbox_overlaps`): widths are
`x2 - x1` (no +1), intersections clamp at 0, and the union is floored at `eps` (1e-6), so a
zero-area box against itself has IoU 0, not NaN. Same float32 operation order as the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MODES = ("iou", "iof")


def box_area(boxes: jax.Array) -> jax.Array:
    """(..., 4) -> (...): `(x2 - x1) * (y2 - y1)`. Static shapes: elementwise, unchanged."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def bbox_overlaps(boxes1: jax.Array, boxes2: jax.Array, mode: str = "iou", eps: float = 1e-6) -> jax.Array:
    """Pairwise overlaps (..., N, 4) x (..., M, 4) -> (..., N, M).

    mode 'iou': intersection / union; 'iof': intersection / area of boxes1 (mmdet's
    "intersection over foreground", used for ignored regions). Static shapes: padded rows give
    meaningless values; callers mask them (none of mmdet's empty-input branches is needed).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}.")
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])  # (..., N, M, 2)
    rb = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])  # (..., N, M, 2)
    wh = jnp.maximum(rb - lt, 0)
    overlap = wh[..., 0] * wh[..., 1]
    union = area1[..., :, None] + area2[..., None, :] - overlap if mode == "iou" else area1[..., :, None]
    return overlap / jnp.maximum(union, jnp.asarray(eps, union.dtype))


def clip_boxes(boxes: jax.Array, height, width) -> jax.Array:
    """Clamps x to [0, width] and y to [0, height] (mmdet's `clip_border`).

    Static shapes: elementwise, unchanged; the sizes may be traced (one per image under vmap).
    """
    x = jnp.clip(boxes[..., 0::2], 0, width)
    y = jnp.clip(boxes[..., 1::2], 0, height)
    return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)
