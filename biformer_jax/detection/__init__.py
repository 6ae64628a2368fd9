"""The detection toolkit: boxes, anchors, box coder, assigner, losses, NMS (mmdetection 2.11 semantics).

Every op is jit-able with static shapes: ground truth comes padded with a validity mask, results
come padded with a count; each module's docstring says where static shapes change the algorithm.
Shared by RetinaNet (`biformer_jax.models.detection`) and the two-stage detectors to come: the
RPN's per-level NMS is `batched_nms` with the level as the group, the RoI head's class-specific
deltas (stds 0.1/0.1/0.2/0.2) decode with `DeltaXYWHBBoxCoder`, its assigners are
`MaxIoUAssigner`s with other thresholds; its RoI features come from `roi_align` (mmcv RoIAlign) via
`multi_level_roi_align` (mmdet's SingleRoIExtractor); a sampler is still to come.
"""

from biformer_jax.detection.anchors import RETINANET_ANCHORS, AnchorGenerator
from biformer_jax.detection.assigner import AssignResult, MaxIoUAssigner
from biformer_jax.detection.boxes import bbox_overlaps, box_area, clip_boxes
from biformer_jax.detection.coder import DeltaXYWHBBoxCoder
from biformer_jax.detection.losses import l1_loss, sigmoid_focal_loss, weighted_sum
from biformer_jax.detection.nms import Detections, batched_nms, multiclass_nms
from biformer_jax.detection.roi_align import map_roi_levels, multi_level_roi_align, roi_align

__all__ = [
    "RETINANET_ANCHORS",
    "AnchorGenerator",
    "AssignResult",
    "DeltaXYWHBBoxCoder",
    "Detections",
    "MaxIoUAssigner",
    "batched_nms",
    "bbox_overlaps",
    "box_area",
    "clip_boxes",
    "l1_loss",
    "map_roi_levels",
    "multi_level_roi_align",
    "multiclass_nms",
    "roi_align",
    "sigmoid_focal_loss",
    "weighted_sum",
]
