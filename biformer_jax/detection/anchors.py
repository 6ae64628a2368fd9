"""mmdetection 2.11's `AnchorGenerator`: base anchors per level, tiled over each feature map.

Ported from mmdet `core/anchor/anchor_generator.py`. For a level of stride s, the base anchors
are `(cx - w/2, cy - h/2, cx + w/2, cy + h/2)` with `w = s * w_ratio * scale`,
`h = s * h_ratio * scale`, `h_ratio = sqrt(ratio)`, `w_ratio = 1 / h_ratio`, centre
`center_offset * s` (0 in every config here), ordered ratio-major (`scale_major=True`:
`a = ratio_index * num_scales + scale_index`). Grid anchors add `(x*s, y*s, x*s, y*s)`; the
flattened index in a level is `(y * W + x) * A + a`, the order of mmdet's
`permute(0, 2, 3, 1).reshape(N, -1, C)` of the head outputs. Computed in float32 with the
reference's operation order, so they equal mmdet's anchors bit for bit.

Static shapes: anchors depend only on the feature-map sizes, so they are NumPy constants built
at trace time; `valid_flags` takes each image's (traced) padded size and returns a mask instead
of mmdet's per-image boolean indexing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class AnchorGenerator:
    """`strides` per level; `scales`, or `octave_base_scale` with `scales_per_octave` (RetinaNet:
    4 and 3 -> scales 4 * 2**(k/3)); `ratios` are h / w."""

    strides: Sequence[int] = (8, 16, 32, 64, 128)
    ratios: Sequence[float] = (0.5, 1.0, 2.0)
    scales: Sequence[float] | None = None
    octave_base_scale: float | None = 4
    scales_per_octave: int | None = 3
    center_offset: float = 0.0
    scale_major: bool = True

    def __post_init__(self):
        if (self.scales is None) == (self.octave_base_scale is None):
            raise ValueError(
                "AnchorGenerator: give either scales or octave_base_scale (with scales_per_octave), not both."
            )
        if not 0 <= self.center_offset <= 1:
            raise ValueError(f"center_offset={self.center_offset} must lie in [0, 1].")

    @property
    def scale_values(self) -> np.ndarray:
        if self.scales is not None:
            return np.asarray(self.scales, np.float32)
        # mmdet builds these in float64 NumPy, then torch.Tensor rounds them to float32.
        octave = np.array([2 ** (i / self.scales_per_octave) for i in range(self.scales_per_octave)])
        return (octave * self.octave_base_scale).astype(np.float32)

    @property
    def num_base_anchors(self) -> int:
        return len(self.ratios) * len(self.scale_values)

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    def base_anchors(self, level: int) -> np.ndarray:
        """(A, 4) float32 anchors of one level centred at its first cell."""
        s = np.float32(self.strides[level])
        scales = self.scale_values
        h_ratios = np.sqrt(np.asarray(self.ratios, np.float32))
        w_ratios = np.float32(1) / h_ratios
        if self.scale_major:
            ws = (s * w_ratios[:, None] * scales[None, :]).reshape(-1)
            hs = (s * h_ratios[:, None] * scales[None, :]).reshape(-1)
        else:
            ws = (s * scales[:, None] * w_ratios[None, :]).reshape(-1)
            hs = (s * scales[:, None] * h_ratios[None, :]).reshape(-1)
        cx = cy = np.float32(self.center_offset * float(s))
        half = np.float32(0.5)
        return np.stack([cx - half * ws, cy - half * hs, cx + half * ws, cy + half * hs], axis=-1)

    def grid_anchors(self, featmap_sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Per level (H_l * W_l * A, 4) float32 anchors for feature maps of (H_l, W_l).

        Static shapes: NumPy constants at trace time (they depend on the map sizes only).
        """
        self._check_levels(featmap_sizes)
        out = []
        for level, (h, w) in enumerate(featmap_sizes):
            stride = self.strides[level]
            sx = (np.arange(w) * stride).astype(np.float32)
            sy = (np.arange(h) * stride).astype(np.float32)
            xx, yy = np.meshgrid(sx, sy)  # (h, w) each, x fastest as in mmdet's _meshgrid
            shifts = np.stack([xx, yy, xx, yy], axis=-1).reshape(-1, 1, 4)  # (h*w, 1, 4)
            out.append((self.base_anchors(level)[None] + shifts).reshape(-1, 4))
        return out

    def valid_flags(self, featmap_sizes: Sequence[tuple[int, int]], pad_hw: jax.Array) -> list[jax.Array]:
        """Per level (H_l * W_l * A,) bool: the anchor's cell lies within `ceil(pad / stride)`.

        `pad_hw`: (2,) int, one image's padded size (mmdet's `img_meta['pad_shape']`, before
        the batch's own padding); may be traced. Static shapes: a mask over every anchor
        instead of mmdet's per-image boolean indexing.
        """
        self._check_levels(featmap_sizes)
        out = []
        for level, (h, w) in enumerate(featmap_sizes):
            s = self.strides[level]
            valid_h = jnp.minimum((pad_hw[0] + s - 1) // s, h)
            valid_w = jnp.minimum((pad_hw[1] + s - 1) // s, w)
            cell = (jnp.arange(h)[:, None] < valid_h) & (jnp.arange(w)[None, :] < valid_w)  # (h, w)
            out.append(jnp.repeat(cell.reshape(-1), self.num_base_anchors))
        return out

    def _check_levels(self, featmap_sizes) -> None:
        if len(featmap_sizes) != self.num_levels:
            raise ValueError(
                f"AnchorGenerator has {self.num_levels} strides {tuple(self.strides)} but got "
                f"{len(featmap_sizes)} feature maps: one stride per level."
            )


RETINANET_ANCHORS = AnchorGenerator()
