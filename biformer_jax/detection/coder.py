"""mmdetection 2.11's `DeltaXYWHBBoxCoder`: boxes <-> (dx, dy, dw, dh) relative to reference boxes.

Ported from mmdet `core/bbox/coder/delta_xywh_bbox_coder.py` (`bbox2delta`, `delta2bbox`):
centres and sizes of the references p and targets g, `dx = (gx - px) / pw`,
`dw = log(gw / pw)`, then `(delta - means) / stds`. Decoding multiplies by the stds, adds the
means, clamps dw and dh to `+-|log(wh_ratio_clip)|`, computes `gx = px + pw * dx`,
`gw = pw * exp(dw)`, corners `gx -+ gw / 2`, and clips to the image (`[0, W] x [0, H]`).
Deltas may be class-specific (last axis 4k, class-major), as the RoI head's are.

Static shapes: elementwise, so unchanged; padded rows decode to meaningless boxes that the
callers mask. The image size may be traced (one per image under `vmap`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from biformer_jax.detection.boxes import clip_boxes


@dataclasses.dataclass(frozen=True)
class DeltaXYWHBBoxCoder:
    """`target_means` / `target_stds` per (dx, dy, dw, dh); RetinaNet and RPN use 0 / 1, the
    Mask R-CNN box head 0 / (0.1, 0.1, 0.2, 0.2)."""

    target_means: Sequence[float] = (0.0, 0.0, 0.0, 0.0)
    target_stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
    wh_ratio_clip: float = 16 / 1000
    clip_border: bool = True

    def encode(self, bboxes: jax.Array, gt_bboxes: jax.Array) -> jax.Array:
        """(..., 4) reference boxes and (..., 4) targets -> (..., 4) normalised deltas.

        Static shapes: elementwise, unchanged (padded rows give values the caller masks).
        """
        px, py = (bboxes[..., 0] + bboxes[..., 2]) * 0.5, (bboxes[..., 1] + bboxes[..., 3]) * 0.5
        pw, ph = bboxes[..., 2] - bboxes[..., 0], bboxes[..., 3] - bboxes[..., 1]
        gx, gy = (gt_bboxes[..., 0] + gt_bboxes[..., 2]) * 0.5, (gt_bboxes[..., 1] + gt_bboxes[..., 3]) * 0.5
        gw, gh = gt_bboxes[..., 2] - gt_bboxes[..., 0], gt_bboxes[..., 3] - gt_bboxes[..., 1]
        deltas = jnp.stack([(gx - px) / pw, (gy - py) / ph, jnp.log(gw / pw), jnp.log(gh / ph)], axis=-1)
        means = jnp.asarray(self.target_means, deltas.dtype)
        stds = jnp.asarray(self.target_stds, deltas.dtype)
        return (deltas - means) / stds

    def decode(self, bboxes: jax.Array, deltas: jax.Array, max_shape=None) -> jax.Array:
        """(..., 4) reference boxes and (..., 4k) deltas -> (..., 4k) boxes.

        `max_shape`: (height, width) to clip to (may be traced), or None for no clipping.
        Static shapes: elementwise, unchanged.
        """
        k = deltas.shape[-1] // 4
        if deltas.shape[-1] != 4 * k or k == 0:
            raise ValueError(f"deltas must have 4k entries on the last axis, got shape {deltas.shape}.")
        d = deltas.reshape(*deltas.shape[:-1], k, 4)  # (..., k, 4)
        stds = jnp.asarray(self.target_stds, d.dtype)
        means = jnp.asarray(self.target_means, d.dtype)
        d = d * stds + means
        max_ratio = float(np.abs(np.log(self.wh_ratio_clip)))
        dw = jnp.clip(d[..., 2], -max_ratio, max_ratio)
        dh = jnp.clip(d[..., 3], -max_ratio, max_ratio)
        b = bboxes[..., None, :]  # (..., 1, 4)
        px, py = (b[..., 0] + b[..., 2]) * 0.5, (b[..., 1] + b[..., 3]) * 0.5
        pw, ph = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
        gw, gh = pw * jnp.exp(dw), ph * jnp.exp(dh)
        gx, gy = px + pw * d[..., 0], py + ph * d[..., 1]
        out = jnp.stack([gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5], axis=-1)  # (..., k, 4)
        if self.clip_border and max_shape is not None:
            out = clip_boxes(out, max_shape[0], max_shape[1])
        return out.reshape(deltas.shape)
