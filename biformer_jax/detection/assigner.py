"""mmdetection 2.11's `MaxIoUAssigner` on padded ground truth.

Ported from mmdet `core/bbox/assigners/max_iou_assigner.py`. With IoUs of every ground-truth box
(G) against every anchor (N):

1. every anchor starts ignored (-1);
2. an anchor whose best IoU is in `[0, neg_iou_thr)` (or within a `(lo, hi)` pair) is negative (0);
3. an anchor whose best IoU is `>= pos_iou_thr` takes its best box (first index among equal IoUs,
   as `torch.max` over a dim);
4. low-quality matches (`match_low_quality`): for each box i in order whose best IoU is
   `>= min_pos_iou`, the anchors at that IoU (all of them with `gt_max_assign_all`, else the
   first) take box i, later boxes overriding earlier ones. With `min_pos_iou=0` (RetinaNet) a
   box that overlaps no anchor at all has best IoU 0 and so takes every anchor: mmdet does
   this, so this does too.

Ignored regions (`ignore_iof_thr > 0`): anchors whose IoF with any ignore box exceeds the
threshold get IoU -1 with every box before the steps above (`ignore_wrt_candidates=True`).

Static shapes: ground truth and ignore boxes come padded with validity masks; padded boxes get
IoU -1 (they never win a max and never reach `min_pos_iou >= 0`), and the sequential loop of
step 4 becomes "the last valid box whose best IoU this anchor attains". No valid box at all
gives every anchor 0 (negative), as mmdet's `num_gts == 0` branch does.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from biformer_jax.detection.boxes import bbox_overlaps


class AssignResult(NamedTuple):
    """Per anchor: `gt_inds` (-1 ignored, 0 negative, i + 1 positive for box i), `max_overlaps`
    (IoU with its best box), `labels` (the box's label for positives, -1 otherwise)."""

    gt_inds: jax.Array
    max_overlaps: jax.Array
    labels: jax.Array


@dataclasses.dataclass(frozen=True)
class MaxIoUAssigner:
    """Thresholds as mmdet's (RetinaNet: 0.5 / 0.4 / 0; RPN 0.7 / 0.3 / 0.3; RoI 0.5 / 0.5 / 0.5)."""

    pos_iou_thr: float = 0.5
    neg_iou_thr: Union[float, tuple[float, float]] = 0.4
    min_pos_iou: float = 0.0
    gt_max_assign_all: bool = True
    ignore_iof_thr: float = -1.0
    match_low_quality: bool = True

    def assign(
        self,
        bboxes: jax.Array,
        gt_bboxes: jax.Array,
        gt_valid: jax.Array,
        gt_labels: Optional[jax.Array] = None,
        gt_bboxes_ignore: Optional[jax.Array] = None,
        ignore_valid: Optional[jax.Array] = None,
        bboxes_valid: Optional[jax.Array] = None,
    ) -> AssignResult:
        """`bboxes` (N, 4) anchors; `gt_bboxes` (G, 4) with `gt_valid` (G,) bool and optional
        `gt_labels` (G,) int; optional ignore boxes (K, 4) with `ignore_valid` (K,). Static
        shapes: padded boxes are masked to IoU -1 (see the module), not removed.

        `bboxes_valid` (N,) bool masks anchors mmdet would drop before assigning (outside the
        image's padded size): they get IoU -1, so they take no part in any maximum and are
        neither positive nor negative."""
        overlaps = bbox_overlaps(gt_bboxes, bboxes)  # (G, N)
        overlaps = jnp.where(gt_valid[:, None], overlaps, -1.0)
        if bboxes_valid is not None:
            overlaps = jnp.where(bboxes_valid[None, :], overlaps, -1.0)
        if self.ignore_iof_thr > 0 and gt_bboxes_ignore is not None and gt_bboxes_ignore.shape[0] > 0:
            if ignore_valid is None:
                ignore_valid = jnp.ones(gt_bboxes_ignore.shape[:1], bool)
            iof = bbox_overlaps(bboxes, gt_bboxes_ignore, mode="iof")  # (N, K)
            iof = jnp.where(ignore_valid[None, :], iof, -1.0)
            ignored = jnp.max(iof, axis=1) > self.ignore_iof_thr
            overlaps = jnp.where(ignored[None, :], -1.0, overlaps)
        return self.assign_wrt_overlaps(overlaps, gt_valid, gt_labels)

    def assign_wrt_overlaps(
        self, overlaps: jax.Array, gt_valid: jax.Array, gt_labels: Optional[jax.Array] = None
    ) -> AssignResult:
        """Steps 1-4 on (G, N) overlaps whose padded rows hold -1."""
        num_gts, num_boxes = overlaps.shape
        if num_gts == 0:  # no ground-truth slot at all: everything is background
            zeros = jnp.zeros((num_boxes,), jnp.int32)
            return AssignResult(zeros, jnp.zeros((num_boxes,), overlaps.dtype), zeros - 1)
        max_overlaps = jnp.max(overlaps, axis=0)  # (N,)
        argmax = jnp.argmax(overlaps, axis=0)  # (N,), first index among equals
        gt_max = jnp.max(overlaps, axis=1)  # (G,)

        assigned = jnp.full((num_boxes,), -1, jnp.int32)
        if isinstance(self.neg_iou_thr, (int, float)):
            negative = (max_overlaps >= 0) & (max_overlaps < self.neg_iou_thr)
        else:
            lo, hi = self.neg_iou_thr
            negative = (max_overlaps >= lo) & (max_overlaps < hi)
        assigned = jnp.where(negative, 0, assigned)
        assigned = jnp.where(max_overlaps >= self.pos_iou_thr, argmax.astype(jnp.int32) + 1, assigned)

        if self.match_low_quality:
            eligible = gt_valid & (gt_max >= self.min_pos_iou)  # (G,)
            if self.gt_max_assign_all:
                hits = eligible[:, None] & (overlaps == gt_max[:, None])  # (G, N)
            else:
                first = jnp.argmax(overlaps, axis=1)  # (G,)
                hits = eligible[:, None] & (jnp.arange(num_boxes)[None, :] == first[:, None])
            # The loop over boxes lets the last one win: the highest index with a hit.
            last = num_gts - 1 - jnp.argmax(hits[::-1], axis=0)  # (N,)
            assigned = jnp.where(jnp.any(hits, axis=0), last.astype(jnp.int32) + 1, assigned)

        any_gt = jnp.any(gt_valid)
        assigned = jnp.where(any_gt, assigned, 0)
        max_overlaps = jnp.where(any_gt, max_overlaps, 0.0)
        if gt_labels is None:
            labels = jnp.full((num_boxes,), -1, jnp.int32)
        else:
            labels = jnp.where(assigned > 0, gt_labels[jnp.maximum(assigned - 1, 0)].astype(jnp.int32), -1)
        return AssignResult(assigned, max_overlaps, labels)
