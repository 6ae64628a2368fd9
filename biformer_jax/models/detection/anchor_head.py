"""mmdetection 2.11's `AnchorHead` test and training computations, as pure functions of head outputs.

Ported from mmdet `models/dense_heads/anchor_head.py` (`_get_bboxes`, `get_targets`, `loss`),
with sigmoid classification (RetinaNet's `use_sigmoid_cls`, no background channel) and the
pseudo sampler (every positive and negative anchor counts: `sampling=False`).

Static shapes, and what they change:
- `get_bboxes`: per level the top `nms_pre` anchors by their best class score (`lax.top_k`:
  equal scores keep the lower index; a level with at most `nms_pre` anchors keeps them all in
  their order, as mmdet does), decoded and clipped to each image's size, then
  `multiclass_nms` (fixed size, see `biformer_jax.detection.nms`); every image returns
  `max_per_img` rows and a count;
- `losses`: ground truth padded to G boxes per image with a validity mask (images without boxes
  have none valid: every anchor is then negative, the average factor counts 1 for the image, as
  in mmdet); anchors outside an image's padded size are masked (mmdet drops them before
  assignment, so they also take no part in its maxima), not removed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from biformer_jax.detection import (
    AnchorGenerator,
    DeltaXYWHBBoxCoder,
    Detections,
    MaxIoUAssigner,
    l1_loss,
    multiclass_nms,
    sigmoid_focal_loss,
)


@dataclasses.dataclass(frozen=True)
class TestConfig:
    """mmdet's `test_cfg` of RetinaNet: `nms_pre`, `score_thr`, NMS IoU, `max_per_img`."""

    nms_pre: int = 1000
    score_thr: float = 0.05
    iou_threshold: float = 0.5
    max_per_img: int = 100


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """mmdet's `train_cfg` of RetinaNet: the assigner, focal loss (gamma, alpha), loss weights."""

    assigner: MaxIoUAssigner = MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0)
    gamma: float = 2.0
    alpha: float = 0.25
    loss_cls_weight: float = 1.0
    loss_bbox_weight: float = 1.0


def featmap_sizes(maps: Sequence[jax.Array]) -> list[tuple[int, int]]:
    return [(int(m.shape[1]), int(m.shape[2])) for m in maps]


def _flatten(maps: Sequence[jax.Array], last: int) -> list[jax.Array]:
    # (N, H, W, A * last) -> (N, H * W * A, last): mmdet's permute(0, 2, 3, 1).reshape(N, -1, last)
    return [m.reshape(m.shape[0], -1, last) for m in maps]


def get_bboxes(
    cls_scores: Sequence[jax.Array],
    bbox_preds: Sequence[jax.Array],
    anchor_generator: AnchorGenerator,
    coder: DeltaXYWHBBoxCoder,
    image_sizes: jax.Array,
    scale_factors: Optional[jax.Array] = None,
    cfg: TestConfig = TestConfig(),
) -> Detections:
    """Detections of a batch from per-level (N, H, W, A * C) logits and (N, H, W, A * 4) deltas.

    `image_sizes` (N, 2) int (height, width) of each image as fed (boxes are clipped to it);
    `scale_factors` (N, 4) or (N,) float: boxes are divided by them (mmdet's `rescale=True`,
    back to the original image) before NMS, as 2.11 does. Returns `Detections` with a leading
    batch axis: boxes (N, max_per_img, 4), scores, labels (-1 past count), count (N,).
    """
    num_classes = cls_scores[0].shape[-1] // anchor_generator.num_base_anchors
    anchors = anchor_generator.grid_anchors(featmap_sizes(cls_scores))
    n = cls_scores[0].shape[0]
    if scale_factors is None:
        scale_factors = jnp.ones((n, 4), jnp.float32)
    scale_factors = jnp.broadcast_to(jnp.asarray(scale_factors, jnp.float32).reshape(n, -1), (n, 4))

    def one_image(scores_l, deltas_l, size, scale):
        boxes, scores = [], []
        for s, d, a in zip(scores_l, deltas_l, anchors):
            s = jax.nn.sigmoid(s)  # (M, C)
            a = jnp.asarray(a)
            if cfg.nms_pre > 0 and s.shape[0] > cfg.nms_pre:
                _, top = jax.lax.top_k(jnp.max(s, axis=-1), cfg.nms_pre)
                s, d, a = s[top], d[top], a[top]
            boxes.append(coder.decode(a, d, max_shape=size))
            scores.append(s)
        boxes = jnp.concatenate(boxes) / scale
        scores = jnp.concatenate(scores)
        valid = jnp.ones(scores.shape[:1], bool)
        return multiclass_nms(boxes, scores, valid, cfg.score_thr, cfg.iou_threshold, cfg.max_per_img)

    flat_scores = _flatten(cls_scores, num_classes)
    flat_deltas = _flatten(bbox_preds, 4)
    return jax.vmap(one_image)(flat_scores, flat_deltas, jnp.asarray(image_sizes), scale_factors)


def get_targets(
    anchors: jax.Array,
    anchor_valid: jax.Array,
    gt_bboxes: jax.Array,
    gt_labels: jax.Array,
    gt_valid: jax.Array,
    num_classes: int,
    coder: DeltaXYWHBBoxCoder,
    assigner: MaxIoUAssigner,
):
    """One image's targets over all (A_total) anchors: labels (A_total,) (num_classes for
    background), label weights, box targets (A_total, 4), box weights, number of positives."""
    res = assigner.assign(anchors, gt_bboxes, gt_valid, gt_labels, bboxes_valid=anchor_valid)
    pos = (res.gt_inds > 0) & anchor_valid
    neg = (res.gt_inds == 0) & anchor_valid
    labels = jnp.where(pos, res.labels, num_classes)
    label_weights = (pos | neg).astype(jnp.float32)
    matched = gt_bboxes[jnp.maximum(res.gt_inds - 1, 0)]
    targets = jnp.where(pos[:, None], coder.encode(anchors, matched), 0.0)
    return labels, label_weights, targets, pos.astype(jnp.float32), jnp.sum(pos)


def losses(
    cls_scores: Sequence[jax.Array],
    bbox_preds: Sequence[jax.Array],
    anchor_generator: AnchorGenerator,
    coder: DeltaXYWHBBoxCoder,
    gt_bboxes: jax.Array,
    gt_labels: jax.Array,
    gt_valid: jax.Array,
    pad_sizes: jax.Array,
    cfg: TrainConfig = TrainConfig(),
) -> dict[str, jax.Array]:
    """mmdet's `AnchorHead.loss` with focal loss and L1 for a batch.

    `gt_bboxes` (N, G, 4) float in input pixels, `gt_labels` (N, G) int in [0, C), `gt_valid`
    (N, G) bool; `pad_sizes` (N, 2) int, each image's padded (height, width) (mmdet's
    `pad_shape`; the batch's input size when images were not padded further). Returns
    `loss_cls` and `loss_bbox` (sums over levels, as mmdet's `_parse_losses` adds them),
    `loss_cls_levels` and `loss_bbox_levels` (L,), and `num_pos` (the average factor: sum over
    images of max(positives, 1)).
    """
    a_count = anchor_generator.num_base_anchors
    num_classes = cls_scores[0].shape[-1] // a_count
    sizes = featmap_sizes(cls_scores)
    anchors_l = anchor_generator.grid_anchors(sizes)
    anchors = jnp.asarray(np.concatenate(anchors_l))

    def one_image(gb, gl, gv, pad):
        valid = jnp.concatenate(anchor_generator.valid_flags(sizes, pad))
        return get_targets(anchors, valid, gb, gl, gv, num_classes, coder, cfg.assigner)

    labels, label_w, targets, box_w, num_pos = jax.vmap(one_image)(
        jnp.asarray(gt_bboxes, jnp.float32), jnp.asarray(gt_labels), jnp.asarray(gt_valid, bool), jnp.asarray(pad_sizes)
    )
    avg_factor = jnp.sum(jnp.maximum(num_pos, 1)).astype(jnp.float32)
    onehot = jax.nn.one_hot(labels, num_classes + 1, dtype=jnp.float32)[..., :num_classes]  # (N, A_total, C)
    loss_cls, loss_bbox, start = [], [], 0
    for s, d, a in zip(_flatten(cls_scores, num_classes), _flatten(bbox_preds, 4), anchors_l):
        sl = slice(start, start + a.shape[0])
        start += a.shape[0]
        focal = sigmoid_focal_loss(s, onehot[:, sl], cfg.gamma, cfg.alpha) * label_w[:, sl, None]
        loss_cls.append(cfg.loss_cls_weight * jnp.sum(focal) / avg_factor)
        l1 = l1_loss(d, targets[:, sl]) * box_w[:, sl, None]
        loss_bbox.append(cfg.loss_bbox_weight * jnp.sum(l1) / avg_factor)
    loss_cls, loss_bbox = jnp.stack(loss_cls), jnp.stack(loss_bbox)
    return {
        "loss_cls": jnp.sum(loss_cls),
        "loss_bbox": jnp.sum(loss_bbox),
        "loss_cls_levels": loss_cls,
        "loss_bbox_levels": loss_bbox,
        "num_pos": avg_factor,
    }
