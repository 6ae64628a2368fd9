"""What differs between the detection task's two model families: RetinaNet and Mask R-CNN.

The task's data, schedule, trainer hooks, evaluation and predict.py are shared; they ask this
module, by the model (or the config's model name), for the few things that differ:

- `with_mask`: Mask R-CNN trains on instance masks (the train split read with its segmentations,
  batches with "gt_masks") and is evaluated on `segm` AP too;
- `detect`: test-time detections of a preprocessed batch, boxes in the original images' pixels
  (divided by each image's scale factor, as mmdet's `rescale=True`), and for Mask R-CNN each
  detection's 28x28 mask probabilities at its label (mmdet's `simple_test_mask` up to the paste);
- `rle_masks`: those probabilities pasted at the original image's size (mmdet's `get_seg_masks`
  with `rescale=True`: the original-pixel boxes on an `ori_shape` canvas, `>= mask_thr_binary`)
  and encoded as COCO RLE, on the host (the canvas differs per image: no per-size compile).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from biformer_jax.data.detection import masks as mask_ops
from biformer_jax.models.detection import MASKRCNN_VARIANTS, maskrcnn, retinanet
from biformer_jax.models.detection.maskrcnn import MaskRCNN


class DetOutputs(NamedTuple):
    """Padded per image: boxes (N, K, 4) in original pixels, scores (N, K), labels (N, K), count (N,);
    mask_probs (N, K, 28, 28) sigmoid of each detection's mask logits (Mask R-CNN; None for RetinaNet)."""

    boxes: jax.Array
    scores: jax.Array
    labels: jax.Array
    count: jax.Array
    mask_probs: Optional[jax.Array] = None


def is_mask_model(model) -> bool:
    return isinstance(model, MaskRCNN)


def with_mask(config) -> bool:
    """Whether config.model trains on instance masks (a Mask R-CNN)."""
    return config.model in MASKRCNN_VARIANTS


def detect(model, variables, x: jax.Array, image_sizes: jax.Array, scale_factors: jax.Array) -> DetOutputs:
    """Detections of a batch (jit-able): images (N, H, W, 3), image_sizes (N, 2) each image's (h, w)
    within the batch, scale_factors (N, 4) mmdet's [w, h, w, h] resize factors."""
    if not is_mask_model(model):
        d = retinanet.detect(model, variables, x, image_sizes, scale_factors)
        return DetOutputs(d.boxes, d.scores, d.labels, d.count)
    rpn_cls, rpn_reg, _, fpn = model.apply(variables, x, train=False, return_features=True)
    props = maskrcnn.proposals_from_outputs(model, rpn_cls, rpn_reg, image_sizes)
    rois, valid = maskrcnn.front_pad(props)
    cls_score, bbox_pred = maskrcnn.roi_heads_on_proposals(model, variables, fpn, rois)
    dets = maskrcnn.bboxes_from_roi_outputs(model, rois, valid, cls_score, bbox_pred, image_sizes)
    logits = maskrcnn.mask_logits(model, variables, fpn, dets.boxes, dets.labels)  # (N, K, 28, 28)
    boxes = dets.boxes / jnp.asarray(scale_factors, jnp.float32)[:, None, :]
    return DetOutputs(boxes, dets.scores, dets.labels, dets.count, jax.nn.sigmoid(logits.astype(jnp.float32)))


@functools.lru_cache(maxsize=4)
def jitted_detect(model):
    """`detect` jitted for `model` (one compile per input shape)."""
    return jax.jit(functools.partial(detect, model))


def mask_threshold(model) -> float:
    return float(model.test_cfg.mask_thr_binary)


def rle_masks(probs: np.ndarray, boxes: np.ndarray, count: int, ori_shape, threshold: float) -> list[dict[str, Any]]:
    """COCO RLEs of one image's first `count` detections: probs (K, 28, 28), boxes (K, 4) in original
    pixels, pasted on the (H, W) `ori_shape` canvas."""
    h, w = (int(v) for v in ori_shape)
    pasted = mask_ops.paste(np.asarray(probs[:count]), np.asarray(boxes[:count]), h, w, threshold)
    return [mask_ops.encode(m) for m in pasted]
