"""mmdetection 2.11's `RPNHead` and its test-time proposals (`RPNHead._get_bboxes`), on NHWC maps.

Ported from mmdet `models/dense_heads/rpn_head.py`: a 3x3 `rpn_conv` (+ bias) and ReLU shared by
the levels, then 1x1 `rpn_cls` (A channels: one sigmoid objectness per anchor) and 1x1 `rpn_reg`
(A * 4: channel `a * 4 + j` is anchor a's delta j). Init normal(0, 0.01), zero bias (mmdet's).

`get_proposals` per image: per level the sigmoid scores, the top `nms_pre` by sorting (a level
with fewer anchors keeps them all, sorted), decoded (means 0, stds 1) and clipped to the image;
then one NMS over all levels with the level as the group (mmcv's `batched_nms`, offset trick),
the kept boxes by descending score, the first `max_per_img`. Zero-area boxes are kept
(`min_bbox_size=0`, the configs' value, filters nothing).

Static shapes, and what they change: `lax.top_k` ranks equal scores by index (torch's CPU sort
does not promise an order for ties); the result is `max_per_img` rows padded with zeros and a
count per image (`Proposals`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from biformer_jax.detection import AnchorGenerator, DeltaXYWHBBoxCoder, batched_nms
from biformer_jax.models.detection.fpn import Conv2d
from biformer_jax.models.layers import Dtype

head_init = nn.initializers.normal(0.01)


class RPNHead(nn.Module):
    """Input: the neck's maps; output `(cls_scores, bbox_preds)`, per level (N, H, W, A) logits
    and (N, H, W, A * 4) deltas, float32."""

    num_anchors: int = 3
    feat_channels: int = 256
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feats: Sequence[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
        kw = dict(kernel_init=head_init, dtype=self.dtype, param_dtype=self.param_dtype)
        conv = Conv2d(self.feat_channels, 3, name="rpn_conv", **kw)
        cls = Conv2d(self.num_anchors, 1, name="rpn_cls", **kw)
        reg = Conv2d(self.num_anchors * 4, 1, name="rpn_reg", **kw)
        cls_scores, bbox_preds = [], []
        for x in feats:
            x = nn.relu(conv(x))
            cls_scores.append(cls(x).astype(jnp.float32))
            bbox_preds.append(reg(x).astype(jnp.float32))
        return cls_scores, bbox_preds


@dataclasses.dataclass(frozen=True)
class RPNTestConfig:
    """mmdet's `test_cfg.rpn` of the Mask R-CNN configs (`min_bbox_size=0`: no size filter)."""

    nms_pre: int = 1000
    iou_threshold: float = 0.7
    max_per_img: int = 1000


class Proposals(NamedTuple):
    """Per image: `boxes` (N, P, 4) `(x1, y1, x2, y2)`, `scores` (N, P) by descending score, zeros
    past `count` (N,)."""

    boxes: jax.Array
    scores: jax.Array
    count: jax.Array


def get_proposals(
    cls_scores: Sequence[jax.Array],
    bbox_preds: Sequence[jax.Array],
    anchor_generator: AnchorGenerator,
    coder: DeltaXYWHBBoxCoder,
    image_sizes: jax.Array,
    cfg: RPNTestConfig = RPNTestConfig(),
) -> Proposals:
    """The RPN's proposals of a batch from per-level (N, H, W, A) logits and (N, H, W, A * 4) deltas;
    `image_sizes` (N, 2) int (height, width) each image is clipped to."""
    sizes = [(int(m.shape[1]), int(m.shape[2])) for m in cls_scores]
    anchors = [jnp.asarray(a) for a in anchor_generator.grid_anchors(sizes)]
    n = cls_scores[0].shape[0]

    def one_image(scores_l, deltas_l, size):
        boxes, scores, levels = [], [], []
        for level, (s, d, a) in enumerate(zip(scores_l, deltas_l, anchors)):
            s = jax.nn.sigmoid(s)  # (M,)
            k = min(cfg.nms_pre, s.shape[0]) if cfg.nms_pre > 0 else s.shape[0]
            s, top = jax.lax.top_k(s, k)
            boxes.append(coder.decode(a[top], d[top], max_shape=size))
            scores.append(s)
            levels.append(jnp.full((k,), level, jnp.int32))
        boxes, scores, levels = jnp.concatenate(boxes), jnp.concatenate(scores), jnp.concatenate(levels)
        valid = jnp.ones(scores.shape, bool)
        keep, count = batched_nms(boxes, scores, valid, cfg.iou_threshold, cfg.max_per_img, levels)
        present = keep >= 0
        idx = jnp.maximum(keep, 0)
        return Proposals(
            boxes=jnp.where(present[:, None], boxes[idx], 0.0),
            scores=jnp.where(present, scores[idx], 0.0),
            count=count,
        )

    flat_scores = [m.reshape(n, -1) for m in cls_scores]
    flat_deltas = [m.reshape(n, -1, 4) for m in bbox_preds]
    return jax.vmap(one_image)(flat_scores, flat_deltas, jnp.asarray(image_sizes))
